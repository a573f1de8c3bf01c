//! Tiny random models of each architecture, for tests that need no checkpoint (this crate's
//! and the GPU executors', which compare against the CPU executor on the same weights).
//!
//! The shapes mirror the HF fixtures of `research/models.md` §5 (hidden 64, 3–4 layers, 4 heads,
//! 8 experts top-2, sliding window 4 so a 12-token prompt crosses it, every MXFP4 K a multiple
//! of 32). Weights are uniform with standard deviation 0.1 (norm weights `1 + 0.1·u`, biases and
//! sinks 0.5·u), deterministic in the seed. With [`ToyExperts::Mxfp4`] the expert matrices are
//! quantized with `fp4::quantize_matrix`; with [`ToyExperts::Dense`] they hold the
//! *dequantized* values of that same quantization, so both variants describe the same model.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::{Activation, Arch, AttnKind, LayerSpec, ModelConfig, Rope, RouterSpec, Yarn};
use crate::weights::{
    Attention, Expert, ExpertMat, GateUpLayout, Layer, Linear, Mat, Mlp, Moe, Weights,
};

/// How the toy stores expert matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToyExperts {
    Dense,
    Mxfp4,
}

/// The toys' deterministic weight generator (shared with `dflash`'s toy drafters): uniform
/// values of a given standard deviation, norm weights `1 + 0.1·u`, matrices of std 0.1.
pub struct ToyGen(pub ChaCha8Rng);

impl ToyGen {
    pub fn new(seed: u64) -> ToyGen {
        ToyGen(ChaCha8Rng::seed_from_u64(seed))
    }
    /// Uniform with standard deviation `std`.
    pub fn vec(&mut self, n: usize, std: f32) -> Vec<f32> {
        let a = std * 3f32.sqrt();
        (0..n).map(|_| self.0.random_range(-a..a)).collect()
    }
    pub fn norm(&mut self, n: usize) -> Vec<f32> {
        self.vec(n, 0.1).into_iter().map(|v| 1.0 + v).collect()
    }
    pub fn mat(&mut self, rows: usize, cols: usize) -> Mat {
        Mat::from_f32(rows, cols, self.vec(rows * cols, 0.1))
    }
    /// A linear layer with std-0.1 weights and, if `bias_std` is given, a bias of that std.
    pub fn linear(&mut self, rows: usize, cols: usize, bias_std: Option<f32>) -> Linear {
        Linear {
            w: self.mat(rows, cols),
            bias: bias_std.map(|s| self.vec(rows, s)),
        }
    }
    fn expert_mat(&mut self, rows: usize, cols: usize, kind: ToyExperts) -> ExpertMat {
        let m = self.vec(rows * cols, 0.1);
        let q = fp4::quantize_matrix(&m, rows, cols, fp4::ScaleRounding::Up)
            .expect("toy expert K is a multiple of 32");
        match kind {
            ToyExperts::Mxfp4 => ExpertMat::Mxfp4(q.into()),
            ToyExperts::Dense => ExpertMat::Dense(Mat::from_f32(
                rows,
                cols,
                fp4::dequantize(q.view().expect("valid")),
            )),
        }
    }
}

/// Random weights (the toys' distribution) for any config: gate/up interleaved for gpt-oss,
/// halves otherwise; expert and router biases for gpt-oss, a correction bias for sigmoid
/// routers. Every MXFP4 expert K (hidden size, expert intermediate size) must be a multiple of
/// 32.
pub fn random_weights(cfg: &ModelConfig, seed: u64, experts: ToyExperts) -> Weights {
    let layout = match cfg.arch {
        Arch::GptOss => GateUpLayout::Interleaved,
        _ => GateUpLayout::Halves,
    };
    build(cfg, seed, experts, layout)
}

fn build(cfg: &ModelConfig, seed: u64, experts: ToyExperts, layout: GateUpLayout) -> Weights {
    let mut g = ToyGen::new(seed);
    let (v, h) = (cfg.vocab_size, cfg.hidden_size);
    let embed = g.mat(v, h);
    let layers = cfg
        .layers
        .iter()
        .map(|s| {
            let (nh, nkv, d, dv) = (s.n_heads, s.n_kv_heads, s.head_dim, s.v_head_dim);
            let attn = Attention {
                q: g.linear(nh * d, h, s.attn_bias.then_some(0.5)),
                k: g.linear(nkv * d, h, s.attn_bias.then_some(0.5)),
                v: g.linear(nkv * dv, h, s.attn_bias.then_some(0.5)),
                o: g.linear(h, nh * dv, s.attn_bias.then_some(0.5)),
                q_norm: s.qk_norm.then(|| g.norm(d)),
                k_norm: s.qk_norm.then(|| g.norm(d)),
                sinks: s.sinks.then(|| g.vec(nh, 0.5)),
            };
            let mlp = if s.moe {
                let (e, i) = (cfg.n_experts, cfg.moe_intermediate_size);
                let biases = matches!(cfg.arch, Arch::GptOss);
                Mlp::Moe(Moe {
                    router: g.linear(e, h, biases.then_some(0.5)),
                    correction_bias: matches!(cfg.router, RouterSpec::Sigmoid { .. })
                        .then(|| g.vec(e, 0.1)),
                    experts: (0..e)
                        .map(|_| Expert {
                            gate_up: g.expert_mat(2 * i, h, experts),
                            gate_up_bias: biases.then(|| g.vec(2 * i, 0.5)),
                            down: g.expert_mat(h, i, experts),
                            down_bias: biases.then(|| g.vec(h, 0.5)),
                        })
                        .collect(),
                    gate_up_layout: layout,
                })
            } else {
                let i = cfg.dense_intermediate_size.expect("dense size");
                Mlp::Dense {
                    gate_up: g.linear(2 * i, h, None),
                    down: g.linear(h, i, None),
                }
            };
            Layer {
                input_norm: g.norm(h),
                attn,
                post_attn_norm: g.norm(h),
                mlp,
            }
        })
        .collect();
    let final_norm = g.norm(h);
    // Tied embeddings share the embedding's storage (the toys' own configs are untied).
    let lm_head = if cfg.tie_word_embeddings {
        embed.clone()
    } else {
        g.mat(v, h)
    };
    Weights {
        embed,
        layers,
        final_norm,
        lm_head,
    }
}

fn base_config(arch: Arch, layers: Vec<LayerSpec>) -> ModelConfig {
    ModelConfig {
        arch,
        vocab_size: 96,
        hidden_size: 64,
        layers,
        rms_norm_eps: 1e-5,
        n_experts: 8,
        top_k: 2,
        moe_intermediate_size: 32,
        dense_intermediate_size: None,
        router: RouterSpec::GptOss,
        activation: Activation::Swiglu,
        value_scale: 1.0,
        tie_word_embeddings: false,
        max_position_embeddings: 4096,
        bos_token_id: None,
        eos_token_ids: vec![1],
        pad_token_id: Some(0),
    }
}

/// The sliding window of the toys (keys including the query).
pub const TOY_WINDOW: usize = 4;

/// gpt-oss: 4 layers sliding(4)/full alternating, 4 heads / 2 KV heads of 16, YaRN (θ 150000,
/// factor 32, β 32/1, original context 4096, truncate false), sinks, q/k/v/o biases, router
/// bias, 8 experts top-2 of I = 64 with biases, interleaved clamped SwiGLU (α 1.702, limit 7).
pub fn gpt_oss(seed: u64, experts: ToyExperts) -> (ModelConfig, Weights) {
    let rope = Rope {
        theta: 150000.0,
        rotary_dim: 16,
        yarn: Some(Yarn::gpt_oss()),
    };
    let layers = (0..4)
        .map(|l| LayerSpec {
            attn: if l % 2 == 0 {
                AttnKind::Sliding { window: TOY_WINDOW }
            } else {
                AttnKind::Full
            },
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 16,
            v_head_dim: 16,
            rope,
            sinks: true,
            qk_norm: false,
            attn_bias: true,
            moe: true,
        })
        .collect();
    let mut cfg = base_config(Arch::GptOss, layers);
    cfg.moe_intermediate_size = 64;
    cfg.activation = Activation::ClampedSwiglu {
        alpha: 1.702,
        limit: 7.0,
    };
    let w = build(&cfg, seed, experts, GateUpLayout::Interleaved);
    (cfg, w)
}

/// Qwen3-MoE: 3 full layers, 4 heads / 2 KV heads of 32, θ = 1e6, q/k RMSNorm, softmax router
/// with renormalization, 8 experts top-2 of I = 32, SwiGLU, eps 1e-6.
pub fn qwen3_moe(seed: u64, experts: ToyExperts) -> (ModelConfig, Weights) {
    let layers = (0..3)
        .map(|_| LayerSpec {
            attn: AttnKind::Full,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 32,
            v_head_dim: 32,
            rope: Rope {
                theta: 1e6,
                rotary_dim: 32,
                yarn: None,
            },
            sinks: false,
            qk_norm: true,
            attn_bias: false,
            moe: true,
        })
        .collect();
    let mut cfg = base_config(Arch::Qwen3Moe, layers);
    cfg.rms_norm_eps = 1e-6;
    cfg.router = RouterSpec::Qwen3 {
        norm_topk_prob: true,
    };
    let w = build(&cfg, seed, experts, GateUpLayout::Halves);
    (cfg, w)
}

/// MiMo-V2-Flash: 4 layers full, sliding(4), sliding(4), full; layer 0 dense (I = 96); 4 heads;
/// 1 KV head on full layers, 2 on sliding ones; q/k head 48, v head 32, partial RoPE on 16
/// dims (θ 5e6 full, 1e4 sliding); sinks on sliding layers only; value scale 0.707; sigmoid
/// router with correction bias (renormalized, scaling 1); 8 experts top-2 of I = 32; SwiGLU.
pub fn mimo_v2_flash(seed: u64, experts: ToyExperts) -> (ModelConfig, Weights) {
    let layers = (0..4)
        .map(|l| {
            let sliding = l == 1 || l == 2;
            LayerSpec {
                attn: if sliding {
                    AttnKind::Sliding { window: TOY_WINDOW }
                } else {
                    AttnKind::Full
                },
                n_heads: 4,
                n_kv_heads: if sliding { 2 } else { 1 },
                head_dim: 48,
                v_head_dim: 32,
                rope: Rope {
                    theta: if sliding { 1e4 } else { 5e6 },
                    rotary_dim: 16,
                    yarn: None,
                },
                sinks: sliding,
                qk_norm: false,
                attn_bias: false,
                moe: l != 0,
            }
        })
        .collect();
    let mut cfg = base_config(Arch::MiMoV2Flash, layers);
    cfg.dense_intermediate_size = Some(96);
    cfg.value_scale = 0.707;
    cfg.router = RouterSpec::Sigmoid {
        n_group: 1,
        topk_group: 1,
        norm_topk_prob: true,
        routed_scaling_factor: 1.0,
    };
    let w = build(&cfg, seed, experts, GateUpLayout::Halves);
    (cfg, w)
}

/// The synthetic ~100M-parameter benchmark model (`ultra bench-decode`, DFlash round costs): gpt-oss architecture, vocab 32000, hidden 512, 5 layers
/// (sliding 128 / full), 8 heads × 64 (2 KV heads), 16 experts top-4 of intermediate 704.
pub fn synthetic_gpt_oss_100m() -> ModelConfig {
    let rope = Rope {
        theta: 150000.0,
        rotary_dim: 64,
        yarn: Some(Yarn::gpt_oss()),
    };
    ModelConfig {
        arch: Arch::GptOss,
        vocab_size: 32000,
        hidden_size: 512,
        layers: (0..5)
            .map(|l| LayerSpec {
                attn: if l % 2 == 0 {
                    AttnKind::Sliding { window: 128 }
                } else {
                    AttnKind::Full
                },
                n_heads: 8,
                n_kv_heads: 2,
                head_dim: 64,
                v_head_dim: 64,
                rope,
                sinks: true,
                qk_norm: false,
                attn_bias: true,
                moe: true,
            })
            .collect(),
        rms_norm_eps: 1e-5,
        n_experts: 16,
        top_k: 4,
        moe_intermediate_size: 704,
        dense_intermediate_size: None,
        router: RouterSpec::GptOss,
        activation: Activation::ClampedSwiglu {
            alpha: 1.702,
            limit: 7.0,
        },
        value_scale: 1.0,
        tie_word_embeddings: false,
        max_position_embeddings: 131072,
        bos_token_id: None,
        eos_token_ids: vec![1],
        pad_token_id: None,
    }
}
