//! Controlled acceptance for benchmarks on random weights (where a real drafter accepts
//! nothing): the number of drafts a round accepts follows a chosen acceptance length τ. Each
//! draft is accepted independently with probability α, so a block of `B` tokens (`B − 1`
//! drafts) accepts `a` drafts with P(a = k) = αᵏ(1 − α) for k < B − 1 and P(a = B − 1) =
//! α^(B−1), and τ = (1 − α^B)/(1 − α) counting the bonus token ([`alpha_for_tau`]). Rounds draw
//! `a` by inverse CDF ([`accepted_for`]) from a stratified sequence ([`van_der_corput`], randomly
//! rotated per sequence), so the measured τ settles on the chosen one within a few dozen rounds.
//!
//! Used by `gpu-dflash` (its drafter proposes the target's greedy continuation) and by
//! `ultra bench-serve --controlled-tau` (the server's verify verdict is forced), with
//! [`synthetic_drafter_config`] for a z-lab-shaped drafter of random weights.

use crate::config::build_target_layer_ids;
use crate::DrafterConfig;
use model::config::ConfigError;

/// τ = (1 − α^B)/(1 − α) solved for α by bisection (`tau` in `1..=block`; clamped).
pub fn alpha_for_tau(tau: f64, block: usize) -> f64 {
    let f = |a: f64| (0..block).map(|j| a.powi(j as i32)).sum::<f64>();
    let (mut lo, mut hi) = (0.0, 1.0);
    for _ in 0..60 {
        let mid = 0.5 * (lo + hi);
        if f(mid) < tau {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// The `i`-th element of the base-2 van der Corput sequence in [0, 1).
pub fn van_der_corput(i: u32) -> f64 {
    i.reverse_bits() as f64 / 2f64.powi(32)
}

/// The accepted count for uniform `u`: inverse CDF of the truncated geometric distribution of
/// `drafts` drafts accepted with probability `alpha` each.
pub fn accepted_for(u: f64, alpha: f64, drafts: usize) -> usize {
    let mut cdf = 0.0;
    for k in 0..drafts {
        cdf += alpha.powi(k as i32) * (1.0 - alpha);
        if u < cdf {
            return k;
        }
    }
    drafts
}

/// A DFlash drafter config of z-lab shape for a target of `hidden` / `vocab` / `target_layers`:
/// `layers` layers of 32 heads / 8 KV heads of 128, intermediate 3 × hidden, full non-causal
/// attention, `target_layer_ids` by [`build_target_layer_ids`], block size `block`.
pub fn synthetic_drafter_config(
    hidden: usize,
    vocab: usize,
    target_layers: usize,
    layers: usize,
    block: usize,
) -> Result<DrafterConfig, ConfigError> {
    let json = serde_json::json!({
        "architectures": ["DFlashDraftModel"],
        "hidden_size": hidden,
        "intermediate_size": 3 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1e6,
        "max_position_embeddings": 131072,
        "hidden_act": "silu",
        "attention_bias": false,
        "vocab_size": vocab,
        "num_target_layers": target_layers,
        "layer_types": vec!["full_attention"; layers],
        "dflash_config": {
            "mask_token_id": 200017usize.min(vocab.saturating_sub(1)),
            "target_layer_ids": build_target_layer_ids(target_layers, layers),
            "block_size": block,
        },
    });
    DrafterConfig::from_json_str(&json.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpha_gives_tau_and_the_draws_follow_it() {
        for (tau, block) in [(4.3, 8), (5.6, 8), (6.3, 8), (2.0, 4)] {
            let a = alpha_for_tau(tau, block);
            let got = (1.0 - a.powi(block as i32)) / (1.0 - a);
            assert!((got - tau).abs() < 1e-9, "τ {tau}: α {a} gives {got}");
            // The stratified draws: mean accepted + 1 over 4096 rounds is τ within 1 %.
            let n = 4096u32;
            let mean = (0..n)
                .map(|i| accepted_for(van_der_corput(i), a, block - 1) as f64 + 1.0)
                .sum::<f64>()
                / n as f64;
            assert!((mean - tau).abs() < 0.01 * tau, "τ {tau}: measured {mean}");
        }
        assert!(alpha_for_tau(1.0, 8).abs() < 1e-9);
        assert_eq!(accepted_for(0.0, 0.5, 7), 0);
        assert_eq!(accepted_for(0.999_999, 0.5, 7), 7);
    }

    #[test]
    fn synthetic_config_at_gpt_oss_20b_dims() {
        let c = synthetic_drafter_config(2880, 201_088, 24, 5, 8).unwrap();
        assert_eq!(c.block_size, 8);
        assert_eq!(c.target_layer_ids.len(), 5);
        assert!(synthetic_drafter_config(2880, 100, 24, 0, 8).is_err());
    }
}
