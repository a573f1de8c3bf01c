//! Helpers shared by the executor test binaries (`exec.rs`, `batch.rs`).

use std::path::PathBuf;

use model::weights::{ExpertMat, Mlp, Weights};

/// A fixture checkpoint folder: `$ULTRA_FIXTURES/<rel>` if set (a GPU bundle run elsewhere), else
/// the repository's `fixtures/<rel>`.
pub fn fixture(rel: &str) -> PathBuf {
    std::env::var_os("ULTRA_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures"))
        .join(rel)
}

/// Every fixture checkpoint the GPU executor is compared on.
pub const FIXTURES: &[&str] = &[
    "gpt-oss/bf16",
    "gpt-oss/bf16-hub",
    "gpt-oss/mxfp4",
    "qwen3-moe/native",
    "qwen3-moe/hub",
    "qwen3-moe/sharded",
    "mimo-v2-flash/native",
    "mimo-v2-flash/hub",
    "mimo-v2/fp4",
];

/// Whether any expert is MXFP4.
pub fn has_mxfp4(w: &Weights) -> bool {
    w.layers.iter().any(|l| match &l.mlp {
        Mlp::Moe(m) => m
            .experts
            .iter()
            .any(|e| matches!(e.gate_up, ExpertMat::Mxfp4(_))),
        Mlp::Dense { .. } => false,
    })
}

/// GPU-vs-CPU logit tolerance relative to `1 + max |logit|`: MXFP4 experts (the GPU's fp16
/// activation path) 3e-2, otherwise 1e-3.
pub fn tolerance(w: &Weights) -> f32 {
    if has_mxfp4(w) {
        3e-2
    } else {
        1e-3
    }
}

/// Index of the largest value (the first among ties).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}
