//! RoPE frequency tables: default RoPE and YaRN as transformers computes them
//! (`_compute_default_rope_parameters` / `_compute_yarn_parameters` in `modeling_rope_utils.py`).
//!
//! transformers computes the frequencies in f32 tensors from Python-float parameters; this module
//! follows the same sequence of f32 operations (`base^(2i/d)` is evaluated in f64 and rounded
//! once, i.e. within an ulp of torch's f32 `pow`). The angle of position p is the f32 product
//! `inv_freq_i · p` (torch's `inv_freq @ position_ids` in f32), `cos`/`sin` are evaluated in f64
//! from that f32 angle, rounded to f32 and multiplied (in f32) by the attention factor, as
//! transformers does with `emb.cos() * attention_scaling`.

use crate::config::{Rope, Yarn};

/// The frequency table of one [`Rope`]: `rotary_dim / 2` inverse frequencies and the factor that
/// multiplies cos and sin (YaRN `attention_factor`, 1 otherwise).
#[derive(Debug, Clone, PartialEq)]
pub struct RopeTable {
    pub rotary_dim: usize,
    pub inv_freq: Vec<f32>,
    pub attention_factor: f32,
}

/// transformers' `find_correction_dim`: the (fractional) dimension index whose wavelength makes
/// `num_rotations` turns over `max_pos` positions.
pub fn yarn_correction_dim(num_rotations: f64, dim: usize, base: f64, max_pos: usize) -> f64 {
    (dim as f64 * (max_pos as f64 / (num_rotations * 2.0 * std::f64::consts::PI)).ln())
        / (2.0 * base.ln())
}

/// transformers' `find_correction_range` for a YaRN rope of `dim` rotary dims: `(low, high)` from
/// `beta_fast` and `beta_slow`, floored/ceiled when `truncate`, clamped to `[0, dim − 1]`.
pub fn yarn_correction_range(dim: usize, base: f64, yarn: &Yarn) -> (f64, f64) {
    let l0 = yarn.original_max_position_embeddings;
    let mut low = yarn_correction_dim(yarn.beta_fast, dim, base, l0);
    let mut high = yarn_correction_dim(yarn.beta_slow, dim, base, l0);
    if yarn.truncate {
        low = low.floor();
        high = high.ceil();
    }
    (low.max(0.0), high.min(dim as f64 - 1.0))
}

/// `base^(2i/dim)` for `i < dim/2`: the exponent `2i/dim` is an f32 division (torch
/// `arange(0, dim, 2).float() / dim`), the power is rounded once to f32.
fn pos_freqs(base: f64, dim: usize) -> impl Iterator<Item = f32> {
    (0..dim / 2).map(move |i| {
        let e = (2 * i) as f32 / dim as f32;
        base.powf(e as f64) as f32
    })
}

impl RopeTable {
    /// Builds the table of `rope` (default RoPE, or YaRN when `rope.yarn` is set).
    pub fn new(rope: &Rope) -> Self {
        let dim = rope.rotary_dim;
        match &rope.yarn {
            None => RopeTable {
                rotary_dim: dim,
                inv_freq: pos_freqs(rope.theta, dim).map(|p| 1.0 / p).collect(),
                attention_factor: 1.0,
            },
            Some(y) => {
                let factor = y.factor as f32;
                let (low, mut high) = yarn_correction_range(dim, rope.theta, y);
                if low == high {
                    high += 0.001; // transformers' "prevent singularity"
                }
                let (low32, span32) = (low as f32, (high - low) as f32);
                let inv_freq = pos_freqs(rope.theta, dim)
                    .enumerate()
                    .map(|(i, p)| {
                        let extrap = 1.0 / p;
                        let interp = 1.0 / (factor * p);
                        let ramp = ((i as f32 - low32) / span32).clamp(0.0, 1.0);
                        let m = 1.0 - ramp; // inv_freq_extrapolation_factor
                        interp * (1.0 - m) + extrap * m
                    })
                    .collect();
                RopeTable {
                    rotary_dim: dim,
                    inv_freq,
                    attention_factor: y.attention_factor as f32,
                }
            }
        }
    }

    /// Half the rotary dims: the length of `cos` / `sin`.
    pub fn half(&self) -> usize {
        self.inv_freq.len()
    }

    /// Writes `cos`/`sin` (each `rotary_dim / 2` long, attention factor included) of position `pos`.
    pub fn cos_sin(&self, pos: usize, cos: &mut [f32], sin: &mut [f32]) {
        let p = pos as f32;
        for ((c, s), &f) in cos.iter_mut().zip(sin.iter_mut()).zip(&self.inv_freq) {
            let a = (f * p) as f64;
            *c = a.cos() as f32 * self.attention_factor;
            *s = a.sin() as f32 * self.attention_factor;
        }
    }
}
