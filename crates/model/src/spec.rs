//! The expected tensors of each architecture (HF checkpoint names, checkpoint-orientation shapes
//! and allowed storage), and their validation against a [`Checkpoint`].
//!
//! Every tensor is checked — name, shape, dtype, and for quantized storage the companion
//! tensors (FP8 `_scale_inv`, MXFP4 `_blocks`/`_scales`) — before the loader touches its data.
//! A missing tensor, wrong shape or wrong dtype is a [`SpecError`] naming the tensor, what was
//! expected and what was found.
//!
//! Tensors the checkpoint holds beyond the expected ones are ignored: MiMo's multi-token
//! prediction layers (`model.mtp.*`), a redundant `lm_head.weight` of a tied model, rotary
//! buffers, and anything else a future checkpoint adds.
//!
//! Names and shapes (H = hidden, I = expert intermediate, E = experts; per layer
//! `model.layers.{l}.`):
//! * all: `model.embed_tokens.weight [V, H]`, `model.norm.weight [H]`, `lm_head.weight [V, H]`
//!   (unless tied), `input_layernorm.weight [H]`, `post_attention_layernorm.weight [H]`,
//!   `self_attn.{q,k,v,o}_proj.weight` (`[heads·hd, H]`, `[kv·hd, H]`, `[kv·vd, H]`,
//!   `[H, heads·vd]`);
//! * gpt-oss: `self_attn.{q,k,v,o}_proj.bias`, `self_attn.sinks [heads]`,
//!   `mlp.router.{weight [E, H], bias [E]}`, `mlp.experts.gate_up_proj` — bf16 `[E, H, 2I]`
//!   (transformers' `[E, in, out]`) or MXFP4 `gate_up_proj_{blocks [E, 2I, H/32, 16], scales
//!   [E, 2I, H/32]}` — `gate_up_proj_bias [E, 2I]`, `down_proj` (`[E, I, H]` or MXFP4
//!   `[E, H, I/32, 16]` + `[E, H, I/32]`), `down_proj_bias [E, H]`;
//! * Qwen3-MoE: `self_attn.{q,k}_norm.weight [hd]`, `mlp.gate.weight [E, H]`,
//!   `mlp.experts.{e}.{gate,up}_proj.weight [I, H]`, `mlp.experts.{e}.down_proj.weight [H, I]`;
//!   dense layers (`mlp_only_layers`) `mlp.{gate,up}_proj.weight [Id, H]`, `mlp.down_proj.weight
//!   [H, Id]`;
//! * MiMo-V2-Flash: as Qwen3 without q/k norms, plus `mlp.gate.e_score_correction_bias [E]`
//!   and, on layers with sinks, `self_attn.sinks` or (Hub / `save_pretrained` spelling)
//!   `self_attn.attention_sink_bias` `[heads]`;
//! * `mimo_v2`: as MiMo-V2-Flash, with q/k/v either split or one fused KV-head-grouped
//!   `self_attn.qkv_proj.weight` ([`LayerTensors::qkv`], checked by [`crate::mimo`]), and
//!   experts dense or packed MXFP4 (`weight` U8 `[out, in/2]` + `weight_scale` U8
//!   `[out, in/32]`, [`Form::Mxfp4Packed`]).

use std::fmt;

use crate::checkpoint::{Checkpoint, CheckpointError, Dtype, TensorView};
use crate::config::{Arch, ModelConfig};

/// Float dtypes accepted for vectors and small matrices.
pub const FLOAT: &[Dtype] = &[Dtype::BF16, Dtype::F16, Dtype::F32];
/// Dtypes accepted for the large 2-D weights: the floats, or F8_E4M3 with optional
/// `<name>_scale_inv` block scales.
pub const WEIGHT: &[Dtype] = &[Dtype::BF16, Dtype::F16, Dtype::F32, Dtype::F8_E4M3];

/// One allowed storage form of a tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Form {
    /// A single tensor of this shape in one of `dtypes`.
    Dense {
        shape: Vec<usize>,
        dtypes: &'static [Dtype],
    },
    /// An MXFP4 pair `<name>_blocks` U8 `[E?, rows, k/32, 16]` + `<name>_scales` U8
    /// `[E?, rows, k/32]` (`experts` = the optional leading dimension).
    Mxfp4 {
        experts: Option<usize>,
        rows: usize,
        k: usize,
    },
    /// MiMo's packed MXFP4: `<name>` U8 `[rows, k/2]` + `<name>_scale` U8 `[rows, k/32]`.
    Mxfp4Packed { rows: usize, k: usize },
}

impl fmt::Display for Form {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Form::Dense { shape, dtypes } => write!(f, "{dtypes:?} {shape:?}"),
            Form::Mxfp4 { experts, rows, k } => {
                let lead = experts.map(|e| format!("{e}, ")).unwrap_or_default();
                write!(
                    f,
                    "MXFP4 _blocks U8 [{lead}{rows}, {}, 16] + _scales U8 [{lead}{rows}, {}]",
                    k / 32,
                    k / 32
                )
            }
            Form::Mxfp4Packed { rows, k } => write!(
                f,
                "MXFP4 U8 [{rows}, {}] + _scale U8 [{rows}, {}]",
                k / 2,
                k / 32
            ),
        }
    }
}

/// An expected tensor: accepted names (canonical first) and allowed storage forms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub names: Vec<String>,
    pub forms: Vec<Form>,
}

impl TensorSpec {
    fn dense(name: String, shape: &[usize], dtypes: &'static [Dtype]) -> TensorSpec {
        TensorSpec {
            names: vec![name],
            forms: vec![Form::Dense {
                shape: shape.to_vec(),
                dtypes,
            }],
        }
    }

    /// The canonical name.
    pub fn name(&self) -> &str {
        &self.names[0]
    }

    fn describe(&self) -> String {
        let forms: Vec<String> = self.forms.iter().map(|f| f.to_string()).collect();
        format!("{} as {}", self.names.join(" or "), forms.join(" or "))
    }

    /// Finds and validates the tensor in a checkpoint.
    pub fn resolve<'a>(&self, ck: &'a Checkpoint) -> Result<Resolved<'a>, SpecError> {
        for name in &self.names {
            if let Some(t) = ck.get(name) {
                return self.check_dense(ck, t);
            }
            let (bn, sn) = (format!("{name}_blocks"), format!("{name}_scales"));
            if ck.contains(&bn) || ck.contains(&sn) {
                return self.check_mxfp4(ck, name, &bn, &sn);
            }
        }
        Err(SpecError::Missing {
            tensor: self.name().to_string(),
            expected: self.describe(),
        })
    }

    fn check_dense<'a>(
        &self,
        ck: &'a Checkpoint,
        t: TensorView<'a>,
    ) -> Result<Resolved<'a>, SpecError> {
        if t.dtype == Dtype::U8 {
            if let Some((rows, k)) = self.forms.iter().find_map(|f| match f {
                Form::Mxfp4Packed { rows, k } => Some((*rows, *k)),
                _ => None,
            }) {
                return crate::mimo::check_packed(ck, t, rows, k);
            }
        }
        let dense: Vec<(&Vec<usize>, &'static [Dtype])> = self
            .forms
            .iter()
            .filter_map(|f| match f {
                Form::Dense { shape, dtypes } => Some((shape, *dtypes)),
                Form::Mxfp4 { .. } | Form::Mxfp4Packed { .. } => None,
            })
            .collect();
        if dense.is_empty() {
            return Err(SpecError::WrongDtype {
                tensor: t.name.to_string(),
                expected: self.describe(),
                found: format!("{:?} {:?}", t.dtype, t.shape),
            });
        }
        if !dense.iter().any(|(_, d)| d.contains(&t.dtype)) {
            let mut allowed: Vec<Dtype> =
                dense.iter().flat_map(|(_, d)| d.iter().copied()).collect();
            allowed.dedup();
            return Err(SpecError::WrongDtype {
                tensor: t.name.to_string(),
                expected: format!("{allowed:?}"),
                found: format!("{:?}", t.dtype),
            });
        }
        if !dense
            .iter()
            .any(|(s, d)| s.as_slice() == t.shape && d.contains(&t.dtype))
        {
            let shapes: Vec<String> = dense.iter().map(|(s, _)| format!("{s:?}")).collect();
            return Err(SpecError::WrongShape {
                tensor: t.name.to_string(),
                expected: shapes.join(" or "),
                found: format!("{:?}", t.shape),
            });
        }
        ck.fp8_scale(&t)?;
        Ok(Resolved::Dense(t))
    }

    fn check_mxfp4<'a>(
        &self,
        ck: &'a Checkpoint,
        base: &str,
        bn: &str,
        sn: &str,
    ) -> Result<Resolved<'a>, SpecError> {
        let Some((experts, rows, k)) = self.forms.iter().find_map(|f| match f {
            Form::Mxfp4 { experts, rows, k } => Some((*experts, *rows, *k)),
            Form::Dense { .. } | Form::Mxfp4Packed { .. } => None,
        }) else {
            return Err(SpecError::WrongDtype {
                tensor: base.to_string(),
                expected: self.describe(),
                found: format!("an MXFP4 pair `{bn}` / `{sn}`"),
            });
        };
        let b = ck.get(bn).ok_or_else(|| SpecError::Missing {
            tensor: bn.to_string(),
            expected: format!("{} (the pair of {sn})", Form::Mxfp4 { experts, rows, k }),
        })?;
        let s = ck.get(sn).ok_or_else(|| SpecError::Missing {
            tensor: sn.to_string(),
            expected: format!("{} (the pair of {bn})", Form::Mxfp4 { experts, rows, k }),
        })?;
        let g = k / fp4::BLOCK;
        let lead: Vec<usize> = experts.into_iter().collect();
        let want_b: Vec<usize> = lead.iter().copied().chain([rows, g, 16]).collect();
        let want_s: Vec<usize> = lead.iter().copied().chain([rows, g]).collect();
        for (t, want) in [(&b, &want_b), (&s, &want_s)] {
            if t.dtype != Dtype::U8 {
                return Err(SpecError::WrongDtype {
                    tensor: t.name.to_string(),
                    expected: "U8 (MXFP4)".into(),
                    found: format!("{:?}", t.dtype),
                });
            }
            if t.shape != want.as_slice() {
                return Err(SpecError::WrongShape {
                    tensor: t.name.to_string(),
                    expected: format!("{want:?}"),
                    found: format!("{:?}", t.shape),
                });
            }
        }
        if k % fp4::BLOCK != 0 {
            return Err(SpecError::WrongShape {
                tensor: bn.to_string(),
                expected: format!("K = {k}, a multiple of 32"),
                found: format!("{:?}", b.shape),
            });
        }
        Ok(match experts {
            Some(_) => Resolved::Mxfp4Experts(ck.mxfp4_experts(base)?),
            None => Resolved::Mxfp4Matrix(ck.mxfp4_matrix(base)?),
        })
    }
}

/// A validated tensor.
#[derive(Debug, Clone, Copy)]
pub enum Resolved<'a> {
    /// A dense tensor (decode with [`Checkpoint::read_f32`] to apply FP8 scales).
    Dense(TensorView<'a>),
    /// A stacked MXFP4 expert tensor `[E, N, K]`.
    Mxfp4Experts(fp4::MxExpertsRef<'a>),
    /// One MXFP4 matrix `[N, K]` (a `_blocks`/`_scales` pair or MiMo's packed form).
    Mxfp4Matrix(fp4::MxMatrixRef<'a>),
}

/// A tensor that does not match the architecture's expectations.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("tensor `{tensor}` is missing (expected {expected})")]
    Missing { tensor: String, expected: String },
    #[error("tensor `{tensor}` has the wrong shape: expected {expected}, found {found}")]
    WrongShape {
        tensor: String,
        expected: String,
        found: String,
    },
    #[error("tensor `{tensor}` has the wrong dtype: expected {expected}, found {found}")]
    WrongDtype {
        tensor: String,
        expected: String,
        found: String,
    },
    /// A storage-level problem found while validating (NaN MXFP4 scale, bad FP8 scale tensor).
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
}

impl SpecError {
    /// The tensor the error is about.
    pub fn tensor(&self) -> Option<&str> {
        match self {
            SpecError::Missing { tensor, .. }
            | SpecError::WrongShape { tensor, .. }
            | SpecError::WrongDtype { tensor, .. } => Some(tensor),
            SpecError::Checkpoint(CheckpointError::Tensor { tensor, .. })
            | SpecError::Checkpoint(CheckpointError::NotFound { tensor, .. }) => Some(tensor),
            SpecError::Checkpoint(_) => None,
        }
    }
}

/// The model-level tensors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalTensors {
    pub embed: TensorSpec,
    pub final_norm: TensorSpec,
    /// `None` when the embeddings are tied.
    pub lm_head: Option<TensorSpec>,
}

/// The tensors of one routed expert (per-expert checkpoints).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertTensors {
    pub gate: TensorSpec,
    pub up: TensorSpec,
    pub down: TensorSpec,
}

/// The feed-forward tensors of one layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MlpTensors {
    /// A dense SwiGLU MLP.
    Dense {
        gate: TensorSpec,
        up: TensorSpec,
        down: TensorSpec,
    },
    /// gpt-oss: stacked experts (bf16 `[E, in, out]` or MXFP4 `[E, out, in]`), biased router.
    Stacked {
        router: TensorSpec,
        router_bias: TensorSpec,
        gate_up: TensorSpec,
        gate_up_bias: TensorSpec,
        down: TensorSpec,
        down_bias: TensorSpec,
    },
    /// Qwen3-MoE / MiMo: one tensor per expert projection.
    PerExpert {
        router: TensorSpec,
        correction_bias: Option<TensorSpec>,
        experts: Vec<ExpertTensors>,
    },
}

/// A fused `qkv_proj` (`mimo_v2`): the tensor and its row groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FusedQkvSpec {
    pub tensor: TensorSpec,
    pub layout: crate::mimo::FusedQkv,
    /// Columns (the hidden size).
    pub hidden: usize,
}

/// The tensors of one decoder layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerTensors {
    pub input_norm: TensorSpec,
    pub post_attn_norm: TensorSpec,
    pub q: TensorSpec,
    pub k: TensorSpec,
    pub v: TensorSpec,
    /// `mimo_v2`: the fused alternative to q/k/v, `self_attn.qkv_proj.weight` (used when the
    /// checkpoint holds it; its shape and scales are checked by [`crate::mimo`]).
    pub qkv: Option<FusedQkvSpec>,
    pub o: TensorSpec,
    /// q, k, v, o biases.
    pub biases: Option<[TensorSpec; 4]>,
    pub q_norm: Option<TensorSpec>,
    pub k_norm: Option<TensorSpec>,
    pub sinks: Option<TensorSpec>,
    pub mlp: MlpTensors,
}

impl LayerTensors {
    /// Every tensor of the layer.
    pub fn all(&self) -> Vec<&TensorSpec> {
        let mut v = vec![
            &self.input_norm,
            &self.post_attn_norm,
            &self.q,
            &self.k,
            &self.v,
            &self.o,
        ];
        if let Some(b) = &self.biases {
            v.extend(b.iter());
        }
        v.extend(self.q_norm.iter());
        v.extend(self.k_norm.iter());
        v.extend(self.sinks.iter());
        match &self.mlp {
            MlpTensors::Dense { gate, up, down } => v.extend([gate, up, down]),
            MlpTensors::Stacked {
                router,
                router_bias,
                gate_up,
                gate_up_bias,
                down,
                down_bias,
            } => v.extend([router, router_bias, gate_up, gate_up_bias, down, down_bias]),
            MlpTensors::PerExpert {
                router,
                correction_bias,
                experts,
            } => {
                v.push(router);
                v.extend(correction_bias.iter());
                for e in experts {
                    v.extend([&e.gate, &e.up, &e.down]);
                }
            }
        }
        v
    }

    /// Whether the checkpoint holds the fused `qkv_proj` of this layer (then q/k/v are not
    /// expected).
    pub fn fused_qkv<'s>(&'s self, ck: &Checkpoint) -> Option<&'s FusedQkvSpec> {
        self.qkv.as_ref().filter(|t| ck.contains(t.tensor.name()))
    }

    /// Validates every tensor of the layer against a checkpoint.
    pub fn check(&self, ck: &Checkpoint) -> Result<(), SpecError> {
        let qkv = self.fused_qkv(ck);
        if let Some(f) = qkv {
            crate::mimo::check_fused_qkv(ck, f)?;
        }
        for t in self.all() {
            let split = [&self.q, &self.k, &self.v]
                .iter()
                .any(|x| std::ptr::eq(*x, t));
            if qkv.is_some() && split {
                continue;
            }
            t.resolve(ck)?;
        }
        Ok(())
    }
}

/// The model-level tensors of a config.
pub fn global_tensors(cfg: &ModelConfig) -> GlobalTensors {
    let (v, h) = (cfg.vocab_size, cfg.hidden_size);
    GlobalTensors {
        embed: TensorSpec::dense("model.embed_tokens.weight".into(), &[v, h], FLOAT),
        final_norm: TensorSpec::dense("model.norm.weight".into(), &[h], FLOAT),
        lm_head: (!cfg.tie_word_embeddings)
            .then(|| TensorSpec::dense("lm_head.weight".into(), &[v, h], FLOAT)),
    }
}

/// The tensors of layer `l` (`None` when `l` is out of range).
pub fn layer_tensors(cfg: &ModelConfig, l: usize) -> Option<LayerTensors> {
    let h = cfg.hidden_size;
    let p = format!("model.layers.{l}.");
    let ls = cfg.layers.get(l)?;
    let (nh, nkv, hd, vd) = (ls.n_heads, ls.n_kv_heads, ls.head_dim, ls.v_head_dim);
    let w = |n: &str, shape: &[usize], dt: &'static [Dtype]| {
        TensorSpec::dense(format!("{p}{n}"), shape, dt)
    };
    let biases = ls.attn_bias.then(|| {
        [
            w("self_attn.q_proj.bias", &[nh * hd], FLOAT),
            w("self_attn.k_proj.bias", &[nkv * hd], FLOAT),
            w("self_attn.v_proj.bias", &[nkv * vd], FLOAT),
            w("self_attn.o_proj.bias", &[h], FLOAT),
        ]
    });
    let sinks = ls.sinks.then(|| {
        let mut t = w("self_attn.sinks", &[nh], FLOAT);
        if cfg.arch.is_mimo() {
            t.names.push(format!("{p}self_attn.attention_sink_bias"));
        }
        t
    });
    let (e, i) = (cfg.n_experts, cfg.moe_intermediate_size);
    let mlp = if !ls.moe {
        let id = cfg.dense_intermediate_size.unwrap_or(0);
        MlpTensors::Dense {
            gate: w("mlp.gate_proj.weight", &[id, h], WEIGHT),
            up: w("mlp.up_proj.weight", &[id, h], WEIGHT),
            down: w("mlp.down_proj.weight", &[h, id], WEIGHT),
        }
    } else if cfg.arch == Arch::GptOss {
        let stacked = |n: &str, dense_shape: [usize; 3], rows: usize, k: usize| TensorSpec {
            names: vec![format!("{p}mlp.experts.{n}")],
            forms: vec![
                Form::Dense {
                    shape: dense_shape.to_vec(),
                    dtypes: FLOAT,
                },
                Form::Mxfp4 {
                    experts: Some(e),
                    rows,
                    k,
                },
            ],
        };
        MlpTensors::Stacked {
            router: w("mlp.router.weight", &[e, h], FLOAT),
            router_bias: w("mlp.router.bias", &[e], FLOAT),
            gate_up: stacked("gate_up_proj", [e, h, 2 * i], 2 * i, h),
            gate_up_bias: w("mlp.experts.gate_up_proj_bias", &[e, 2 * i], FLOAT),
            down: stacked("down_proj", [e, i, h], h, i),
            down_bias: w("mlp.experts.down_proj_bias", &[e, h], FLOAT),
        }
    } else {
        // mimo_v2 experts may be packed MXFP4 (`store_dtype: mxfp4`).
        let ew = |n: &str, shape: [usize; 2]| {
            let mut t = w(n, &shape, WEIGHT);
            if cfg.arch == Arch::MiMoV2 {
                t.forms.push(Form::Mxfp4Packed {
                    rows: shape[0],
                    k: shape[1],
                });
            }
            t
        };
        MlpTensors::PerExpert {
            router: w("mlp.gate.weight", &[e, h], FLOAT),
            correction_bias: cfg
                .arch
                .is_mimo()
                .then(|| w("mlp.gate.e_score_correction_bias", &[e], FLOAT)),
            experts: (0..e)
                .map(|x| ExpertTensors {
                    gate: ew(&format!("mlp.experts.{x}.gate_proj.weight"), [i, h]),
                    up: ew(&format!("mlp.experts.{x}.up_proj.weight"), [i, h]),
                    down: ew(&format!("mlp.experts.{x}.down_proj.weight"), [h, i]),
                })
                .collect(),
        }
    };
    Some(LayerTensors {
        input_norm: w("input_layernorm.weight", &[h], FLOAT),
        post_attn_norm: w("post_attention_layernorm.weight", &[h], FLOAT),
        q: w("self_attn.q_proj.weight", &[nh * hd, h], WEIGHT),
        k: w("self_attn.k_proj.weight", &[nkv * hd, h], WEIGHT),
        v: w("self_attn.v_proj.weight", &[nkv * vd, h], WEIGHT),
        qkv: (cfg.arch == Arch::MiMoV2).then(|| {
            let layout = crate::mimo::FusedQkv::of(ls);
            FusedQkvSpec {
                tensor: w("self_attn.qkv_proj.weight", &[layout.rows(), h], WEIGHT),
                layout,
                hidden: h,
            }
        }),
        o: w("self_attn.o_proj.weight", &[h, nh * vd], WEIGHT),
        biases,
        q_norm: ls
            .qk_norm
            .then(|| w("self_attn.q_norm.weight", &[hd], FLOAT)),
        k_norm: ls
            .qk_norm
            .then(|| w("self_attn.k_norm.weight", &[hd], FLOAT)),
        sinks,
        mlp,
    })
}

/// The full list of expected tensors (model-level first, then layer by layer).
pub fn expected_tensors(cfg: &ModelConfig) -> Vec<TensorSpec> {
    let g = global_tensors(cfg);
    let mut v = vec![g.embed, g.final_norm];
    v.extend(g.lm_head);
    for t in (0..cfg.layers.len()).filter_map(|l| layer_tensors(cfg, l)) {
        v.extend(t.all().into_iter().cloned());
    }
    v
}

/// Validates every expected tensor (layer by layer, so a huge config fails at its first
/// missing tensor without building the whole list).
pub fn check(cfg: &ModelConfig, ck: &Checkpoint) -> Result<(), SpecError> {
    let g = global_tensors(cfg);
    g.embed.resolve(ck)?;
    g.final_norm.resolve(ck)?;
    if let Some(t) = &g.lm_head {
        t.resolve(ck)?;
    }
    for t in (0..cfg.layers.len()).filter_map(|l| layer_tensors(cfg, l)) {
        t.check(ck)?;
    }
    Ok(())
}
