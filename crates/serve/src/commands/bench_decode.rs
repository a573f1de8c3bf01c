//! `ultra bench-decode`: CPU decode tokens/s of the golden fixtures and of a synthetic ~100M
//! parameter gpt-oss-style MoE with MXFP4 experts (random weights built in memory).
//!
//! Each case: prefill a prompt, then time `tokens` greedy decode steps (EOS ignored); the median
//! of `repeats` runs is reported, with the weight bytes one decode step reads and the implied
//! GB/s.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use model::cpu::toy::{random_weights, synthetic_gpt_oss_100m, ToyExperts};
use model::cpu::CpuModel;
use model::footprint::{Footprint, StoragePlan};

/// One measured case.
#[derive(Debug, Clone)]
pub struct DecodeRow {
    pub case: String,
    pub total_params: u64,
    pub active_params: u64,
    pub tokens_per_s: f64,
    /// Weight bytes per decode step as this executor holds them (dense f32, experts as stored).
    pub bytes_per_token: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Times `tokens` decode steps after a `prompt`-token prefill, `repeats` times.
fn time_decode(model: &CpuModel, prompt: &[u32], tokens: usize, repeats: usize) -> Result<f64> {
    let mut rates = Vec::new();
    for _ in 0..repeats.max(1) {
        let mut s = model.session();
        let mut logits = s.prefill(prompt)?.to_vec();
        let t0 = Instant::now();
        for _ in 0..tokens {
            let next = argmax(&logits);
            logits = s.decode(next)?.to_vec();
        }
        rates.push(tokens as f64 / t0.elapsed().as_secs_f64());
    }
    Ok(median(rates))
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

fn row(case: String, model: &CpuModel, plan: StoragePlan, rate: f64) -> DecodeRow {
    // The CPU executor reads dense weights in their stored dtype (the embedding's stands for
    // all of them: checkpoints are uniform, the synthetic model is f32).
    let dense = model.weights().embed.dtype().size() as f64;
    let plan = StoragePlan {
        dense_bytes_per_weight: dense,
        expert_bytes_per_weight: if plan.expert_bytes_per_weight < 1.0 {
            plan.expert_bytes_per_weight
        } else {
            dense
        },
        ..plan
    };
    let f = Footprint::new(model.config(), plan);
    DecodeRow {
        case,
        total_params: f.total_params,
        active_params: f.active_params,
        tokens_per_s: rate,
        bytes_per_token: f.bytes_per_token,
    }
}

/// Runs the benchmark over `fixtures` (checkpoint dirs) and the synthetic model.
pub fn run(fixtures: &[&Path], tokens: usize, repeats: usize) -> Result<Vec<DecodeRow>> {
    let mut rows = Vec::new();
    let prompt: Vec<u32> = (2..18).collect();
    for dir in fixtures {
        let (cfg, weights) = model::load::load(dir)?;
        let raw: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
        let plan = StoragePlan::from_config_json(&raw);
        let m = super::cpu_model(Arc::new(cfg), Arc::new(weights))?;
        let rate = time_decode(&m, &prompt, tokens, repeats)?;
        rows.push(row(dir.display().to_string(), &m, plan, rate));
    }
    let cfg = synthetic_gpt_oss_100m();
    let weights = random_weights(&cfg, 7, ToyExperts::Mxfp4);
    let m = super::cpu_model(Arc::new(cfg), Arc::new(weights))?;
    let rate = time_decode(&m, &prompt, tokens, repeats)?;
    rows.push(row(
        "synthetic gpt-oss-style MoE (MXFP4 experts)".into(),
        &m,
        StoragePlan::MXFP4_EXPERTS,
        rate,
    ));
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_model_is_about_100m_parameters() {
        let f = Footprint::new(&synthetic_gpt_oss_100m(), StoragePlan::MXFP4_EXPERTS);
        assert!(
            (100_000_000..130_000_000).contains(&f.total_params),
            "{}",
            f.total_params
        );
    }
}
