//! Helpers shared by the speculative-decoding tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::borrow::Cow;

use dflash::target::{DraftTarget, Executor};
use model::config::ModelConfig;
use model::cpu::toy::{self, ToyExperts};
use model::cpu::{CpuError, CpuModel, Session, VerifyOutput};
use model::sampling::{Sampler, SamplingParams, StopChecker, StopStatus};
use model::weights::Mat;
use model::weights::Weights;

/// The repository's `fixtures/` directory.
pub fn fixtures_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// The target fixtures speculative decoding is checked on.
pub const TARGET_FIXTURES: [&str; 4] = [
    "gpt-oss/bf16",
    "gpt-oss/mxfp4",
    "qwen3-moe/native",
    "mimo-v2-flash/native",
];

/// Loads a fixture checkpoint (relative to `fixtures/`).
pub fn load_target(rel: &str) -> CpuModel {
    let dir = fixtures_root().join(rel);
    let (cfg, w) = model::load::load(&dir).unwrap_or_else(|e| panic!("loading {rel}: {e}"));
    CpuModel::new(Arc::new(cfg), Arc::new(w)).expect("fixture model is valid")
}

/// The 12-token prompt of a fixture's HF goldens.
pub fn fixture_prompt(rel: &str) -> Vec<u32> {
    let text = std::fs::read_to_string(fixtures_root().join(rel).join("golden_f32.json"))
        .expect("golden_f32.json");
    let v: serde_json::Value = serde_json::from_str(&text).expect("golden JSON");
    v["input_ids"]
        .as_array()
        .expect("input_ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// Plain decoding through the executor (prefill, then one decode per token) with the Sampler and
/// the StopChecker, as `ultra generate` does.
pub fn plain_decode(m: &CpuModel, prompt: &[u32], params: &SamplingParams) -> Vec<u32> {
    plain_decode_rows(m, prompt, params).0
}

/// [`plain_decode`] and the raw logits row each token was chosen from.
pub fn plain_decode_rows(
    m: &CpuModel,
    prompt: &[u32],
    params: &SamplingParams,
) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut sampler = Sampler::new(params).unwrap();
    let mut stop = StopChecker::from_params(params, &m.config().eos_token_ids);
    let mut s = m.session();
    let mut logits = s.prefill(prompt).unwrap().to_vec();
    let (mut out, mut rows) = (Vec::new(), Vec::new());
    loop {
        let t = sampler.try_sample(&logits, prompt, &out).unwrap();
        out.push(t);
        if let StopStatus::Stop { .. } = stop.push(t, "") {
            rows.push(logits);
            return (out, rows);
        }
        let next = s.decode(t).unwrap().to_vec();
        rows.push(std::mem::replace(&mut logits, next));
    }
}

/// A tiny Qwen3-MoE-shaped target with `vocab` tokens and `layers` layers (hidden 64), dense
/// experts, deterministic in `seed`.
pub fn tiny_target(vocab: usize, layers: usize, seed: u64) -> CpuModel {
    let (mut cfg, _) = toy::qwen3_moe(seed, ToyExperts::Dense);
    cfg.vocab_size = vocab;
    cfg.layers.truncate(layers);
    cfg.eos_token_ids.clear();
    build(cfg, seed)
}

/// A tiny model of each architecture with a small vocabulary (so random drafts are often
/// accepted), dense experts.
pub fn tiny_targets(vocab: usize) -> Vec<(&'static str, CpuModel)> {
    let mut out = Vec::new();
    for (name, (mut cfg, _)) in [
        ("gpt-oss", toy::gpt_oss(5, ToyExperts::Dense)),
        ("qwen3-moe", toy::qwen3_moe(6, ToyExperts::Dense)),
        ("mimo-v2-flash", toy::mimo_v2_flash(7, ToyExperts::Dense)),
    ] {
        cfg.vocab_size = vocab;
        cfg.eos_token_ids.clear();
        out.push((name, build(cfg, 11)));
    }
    out
}

fn build(cfg: ModelConfig, seed: u64) -> CpuModel {
    let w: Weights = toy::random_weights(&cfg, seed, ToyExperts::Dense);
    CpuModel::new(Arc::new(cfg), Arc::new(w)).expect("tiny model is valid")
}

/// Deterministic pseudo-random token ids in `[lo, vocab)`.
pub fn tokens(seed: u64, n: usize, lo: u32, vocab: usize) -> Vec<u32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            lo + ((s >> 33) % (vocab as u64 - lo as u64)) as u32
        })
        .collect()
}

/// Asserts bit-identical f32 slices.
#[track_caller]
pub fn assert_bits(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            x.to_bits() == y.to_bits(),
            "{what}: element {i} differs: {x} vs {y}"
        );
    }
}

/// Largest absolute difference.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A fresh scratch directory (removed first if it exists).
pub fn scratch_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dflash-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Writes a drafter checkpoint the way z-lab / MiMo ship it: `config.json`, the weights as F32
/// safetensors in `file` with tensor names under `prefix`, and `mask_embedding.safetensors`
/// (tensor `embedding`) when the weights have a mask embedding.
pub fn write_drafter(
    dir: &Path,
    config: &serde_json::Value,
    w: &dflash::DrafterWeights,
    prefix: &str,
    file: &str,
) {
    use model::weights::Mlp;
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let mut t: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut push = |name: String, shape: Vec<usize>, data: &[f32]| {
        t.push((format!("{prefix}{name}"), shape, data.to_vec()))
    };
    push(
        "fc.weight".into(),
        vec![w.fc.rows, w.fc.cols],
        &w.fc.to_f32(),
    );
    push(
        "hidden_norm.weight".into(),
        vec![w.hidden_norm.len()],
        &w.hidden_norm,
    );
    push("norm.weight".into(), vec![w.norm.len()], &w.norm);
    for (l, lw) in w.layers.iter().enumerate() {
        let p = format!("layers.{l}");
        push(
            format!("{p}.input_layernorm.weight"),
            vec![lw.input_norm.len()],
            &lw.input_norm,
        );
        push(
            format!("{p}.post_attention_layernorm.weight"),
            vec![lw.post_attn_norm.len()],
            &lw.post_attn_norm,
        );
        let a = &lw.attn;
        for (n, lin) in [
            ("q_proj", &a.q),
            ("k_proj", &a.k),
            ("v_proj", &a.v),
            ("o_proj", &a.o),
        ] {
            push(
                format!("{p}.self_attn.{n}.weight"),
                vec![lin.w.rows, lin.w.cols],
                &lin.w.to_f32(),
            );
            if let Some(b) = &lin.bias {
                push(format!("{p}.self_attn.{n}.bias"), vec![b.len()], b);
            }
        }
        for (n, v) in [("q_norm", &a.q_norm), ("k_norm", &a.k_norm)] {
            let v = v.as_ref().unwrap();
            push(format!("{p}.self_attn.{n}.weight"), vec![v.len()], v);
        }
        if let Some(s) = &a.sinks {
            push(
                format!("{p}.self_attn.attention_sink_bias"),
                vec![s.len()],
                s,
            );
        }
        let Mlp::Dense { gate_up, down } = &lw.mlp else {
            panic!("dense MLP expected")
        };
        let (i, h) = (gate_up.w.rows / 2, gate_up.w.cols);
        push(
            format!("{p}.mlp.gate_proj.weight"),
            vec![i, h],
            &gate_up.w.to_f32()[..i * h],
        );
        push(
            format!("{p}.mlp.up_proj.weight"),
            vec![i, h],
            &gate_up.w.to_f32()[i * h..],
        );
        push(
            format!("{p}.mlp.down_proj.weight"),
            vec![down.w.rows, down.w.cols],
            &down.w.to_f32(),
        );
    }
    save(&dir.join(file), &t);
    if let Some(m) = &w.mask_embedding {
        save(
            &dir.join("mask_embedding.safetensors"),
            &[("embedding".to_string(), vec![m.len()], m.clone())],
        );
    }
}

/// Writes F32 tensors to a safetensors file.
pub fn save(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    save_with_metadata(path, tensors, None);
}

/// [`save`] with header metadata.
pub fn save_with_metadata(
    path: &Path,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    metadata: Option<std::collections::HashMap<String, String>>,
) {
    use safetensors::tensor::TensorView;
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, d)| d.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| {
            (
                n.clone(),
                TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::tensor::serialize_to_file(views, metadata, path).unwrap();
}

/// A drafter that proposes `token` at every position (whatever the context): a toy drafter of
/// `kind` whose attention and MLP outputs are zeroed (so each block row keeps its embedding)
/// with the mask embedding set to the target's LM-head row of `token` — the whole draft
/// pipeline still runs. Against a target that repeats `token`, long runs of drafts are accepted.
pub fn copycat(m: &CpuModel, kind: dflash::toy::ToyKind, token: u32) -> dflash::Drafter {
    use model::weights::Mlp;
    let d = dflash::toy::drafter(m.config(), kind, 8, 1);
    let mut w = d.weights().clone();
    for l in &mut w.layers {
        l.attn.o.w.make_f32_mut().fill(0.0);
        if let Mlp::Dense { down, .. } = &mut l.mlp {
            down.w.make_f32_mut().fill(0.0);
        }
    }
    w.norm.fill(1.0);
    w.mask_embedding = Some(m.weights().lm_head.row(token as usize).to_vec());
    dflash::Drafter::new(d.config().clone(), w).unwrap()
}

/// The most frequent token of a sequence (lowest id on ties).
pub fn most_frequent(tokens: &[u32]) -> u32 {
    let mut best = (0, 0u32);
    for &t in tokens {
        let c = tokens.iter().filter(|&&x| x == t).count();
        if c > best.0 || (c == best.0 && t < best.1) {
            best = (c, t);
        }
    }
    best.1
}

/// What a test observes of a target session inside the speculative loop.
pub trait Watch {
    /// After `tokens` ran (the session now holds them), with their output.
    fn forwarded(&mut self, _s: &Session, _tokens: &[u32], _out: &VerifyOutput) {}
    /// After the session was truncated from `from` to `len` positions.
    fn truncated(&mut self, _s: &Session, _from: usize, _len: usize) -> Result<(), CpuError> {
        Ok(())
    }
}

/// A CPU session as a [`DraftTarget`] that reports every forward and truncation to `watch`.
pub struct Watched<W> {
    pub s: Session,
    pub watch: W,
}

impl<W: Watch> Executor for Watched<W> {
    type Error = CpuError;
    fn config(&self) -> &ModelConfig {
        Executor::config(&self.s)
    }
    fn len(&self) -> usize {
        self.s.len()
    }
    fn max_rollback(&self) -> usize {
        Executor::max_rollback(&self.s)
    }
    fn prefill(&mut self, tokens: &[u32]) -> Result<Cow<'_, [f32]>, CpuError> {
        Executor::prefill(&mut self.s, tokens)
    }
    fn decode(&mut self, token: u32) -> Result<Cow<'_, [f32]>, CpuError> {
        Executor::decode(&mut self.s, token)
    }
    fn verify(&mut self, tokens: &[u32], hidden: &[usize]) -> Result<VerifyOutput, CpuError> {
        self.s.verify(tokens, hidden)
    }
    fn forward(&mut self, tokens: &[u32], layers: &[usize]) -> Result<VerifyOutput, CpuError> {
        let out = self.s.forward(tokens, layers)?;
        self.watch.forwarded(&self.s, tokens, &out);
        Ok(out)
    }
    fn truncate(&mut self, len: usize) -> Result<(), CpuError> {
        let from = self.s.len();
        self.s.truncate(len)?;
        self.watch.truncated(&self.s, from, len)
    }
}

impl<W: Watch> DraftTarget for Watched<W> {
    fn embedding(&self) -> &Mat {
        self.s.embedding()
    }
    fn lm_head(&self) -> &Mat {
        self.s.lm_head()
    }
}
