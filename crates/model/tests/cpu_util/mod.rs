//! Helpers shared by the `cpu_*` integration tests.
#![allow(dead_code)]

use std::sync::Arc;

use model::cpu::toy::{self, ToyExperts};
use model::cpu::CpuModel;

/// Every toy variant: (name, model).
pub fn toys() -> Vec<(&'static str, CpuModel)> {
    let mk = |(c, w)| CpuModel::new(Arc::new(c), Arc::new(w)).expect("toy model is valid");
    vec![
        ("gpt-oss/mxfp4", mk(toy::gpt_oss(1, ToyExperts::Mxfp4))),
        ("gpt-oss/dense", mk(toy::gpt_oss(1, ToyExperts::Dense))),
        ("qwen3-moe/dense", mk(toy::qwen3_moe(2, ToyExperts::Dense))),
        ("qwen3-moe/mxfp4", mk(toy::qwen3_moe(2, ToyExperts::Mxfp4))),
        (
            "mimo-v2-flash/dense",
            mk(toy::mimo_v2_flash(3, ToyExperts::Dense)),
        ),
        (
            "mimo-v2-flash/mxfp4",
            mk(toy::mimo_v2_flash(3, ToyExperts::Mxfp4)),
        ),
    ]
}

/// Deterministic pseudo-random token ids in `[2, vocab)`.
pub fn tokens(seed: u64, n: usize, vocab: usize) -> Vec<u32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (2 + (s >> 33) % (vocab as u64 - 2)) as u32
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
            "{what}: element {i} differs: {x} vs {y} (Δ {})",
            (x - y).abs()
        );
    }
}

/// Largest absolute difference.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}
