//! `ultra inspect`: what a checkpoint (or a bare `config.json`) holds and costs: architecture,
//! layers, parameters total/active, weight bytes per decoded token, KV bytes, and the batch-1
//! decode roofline at a given bandwidth.

use std::path::Path;

use anyhow::{bail, Context, Result};
use model::config::{AttnKind, ModelConfig};
use model::footprint::{Footprint, StoragePlan};

/// Parses a bandwidth: bytes/s as a plain number (`3e12`) or with a unit (`3TB/s`, `3350GB/s`).
pub fn parse_bandwidth(s: &str) -> Result<f64> {
    let t = s.trim().to_ascii_lowercase();
    let (num, mult) = if let Some(n) = t.strip_suffix("tb/s") {
        (n, 1e12)
    } else if let Some(n) = t.strip_suffix("gb/s") {
        (n, 1e9)
    } else if let Some(n) = t.strip_suffix("mb/s") {
        (n, 1e6)
    } else {
        (t.as_str(), 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .with_context(|| format!("bandwidth {s:?}: expected e.g. 3e12, 3TB/s or 3350GB/s"))?;
    if !(v.is_finite() && v > 0.0) {
        bail!("bandwidth {s:?} must be positive");
    }
    Ok(v * mult)
}

/// The report `ultra inspect` prints.
pub struct Inspection {
    pub config: ModelConfig,
    pub plan: StoragePlan,
    pub footprint: Footprint,
}

/// Reads `path`: a checkpoint directory (its config.json) or a config.json file.
pub fn inspect(path: &Path) -> Result<Inspection> {
    let config_file = if path.is_dir() {
        path.join("config.json")
    } else {
        path.to_path_buf()
    };
    let text = std::fs::read_to_string(&config_file)
        .with_context(|| format!("reading {}", config_file.display()))?;
    let raw: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: invalid JSON", config_file.display()))?;
    let config = if path.is_dir() {
        ModelConfig::from_dir(path)
    } else {
        ModelConfig::from_json_str(&text)
    }
    .with_context(|| format!("{}", config_file.display()))?;
    let plan = StoragePlan::from_config_json(&raw);
    let footprint = Footprint::new(&config, plan);
    Ok(Inspection {
        config,
        plan,
        footprint,
    })
}

fn gb(b: f64) -> String {
    format!("{:.3} GB", b / 1e9)
}

fn billions(p: u64) -> String {
    format!("{:.3} B", p as f64 / 1e9)
}

/// Prints the report.
pub fn print(i: &Inspection, bandwidth: f64, context: usize) {
    let c = &i.config;
    let f = &i.footprint;
    let sliding = c
        .layers
        .iter()
        .filter(|l| matches!(l.attn, AttnKind::Sliding { .. }))
        .count();
    let moe_layers = c.layers.iter().filter(|l| l.moe).count();
    println!("architecture        {:?}", c.arch);
    println!(
        "layers              {} ({} sliding-window, {} full; {} MoE, {} dense)",
        c.layers.len(),
        sliding,
        c.layers.len() - sliding,
        moe_layers,
        c.layers.len() - moe_layers
    );
    println!("hidden / vocab      {} / {}", c.hidden_size, c.vocab_size);
    println!(
        "experts             {} routed, top-{}, intermediate {}",
        c.n_experts, c.top_k, c.moe_intermediate_size
    );
    println!("storage             {}", i.plan.label);
    println!("parameters total    {}", billions(f.total_params));
    println!(
        "parameters active   {} per token (input embedding excluded)",
        billions(f.active_params)
    );
    println!(
        "bytes per token     {} (experts {}, rest {})",
        gb(f.bytes_per_token),
        gb(f.expert_bytes_per_token),
        gb(f.bytes_per_token - f.expert_bytes_per_token)
    );
    let kv = Footprint::kv_bytes(c, i.plan, context);
    println!("KV cache at {context} tokens  {}", gb(kv));
    println!(
        "roofline at {:.2} TB/s: {:.0} tok/s (weights only), {:.0} tok/s with the KV cache at {context} tokens",
        bandwidth / 1e12,
        f.roofline_tokens_per_s(bandwidth, 0.0),
        f.roofline_tokens_per_s(bandwidth, kv)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bandwidth_units() {
        assert_eq!(parse_bandwidth("3e12").unwrap(), 3e12);
        assert_eq!(parse_bandwidth("3TB/s").unwrap(), 3e12);
        assert_eq!(parse_bandwidth("3350 GB/s").unwrap(), 3.35e12);
        assert!(parse_bandwidth("fast").is_err());
        assert!(parse_bandwidth("-1").is_err());
    }
}
