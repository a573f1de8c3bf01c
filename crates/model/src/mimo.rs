//! `model_type: mimo_v2` (MiMo-V2.5, V2.5-Pro, V2.6 and the MiMo-V2.5-Pro-FP4-DFlash checkpoint):
//! the config rules and the two tensor layouts that differ from MiMo-V2-Flash. The block math is
//! MiMo-V2-Flash's (the executors see an ordinary [`crate::config::Arch::MiMoV2`] config and
//! ordinary [`crate::weights`]); facts and sources: `research/mimo-v2.md` §1.
//!
//! * **Fused `qkv_proj`** (`attention_projection_layout: fused_qkv`):
//!   `self_attn.qkv_proj.weight [groups·(Q_g + K_g + V_g), H]`, one group per KV head, each
//!   `[Q_g | K_g | V_g]` (Q_g = heads/kv · head_dim rows, K_g = head_dim, V_g = v_head_dim).
//!   In FP8 every group is block-quantized on its own and padded to whole `weight_block_size`
//!   rows, so `weight_scale_inv` is `[groups · ⌈G/b₀⌉, ⌈H/b₁⌉]` (V2.5-Pro: 8 × 27 = 216 rows for
//!   27136 weight rows, not ⌈27136/128⌉ = 212). The loader splits it into q / k / v in head order
//!   ([`split_fused_qkv`]): every value is the checkpoint's code times its own block scale
//!   (exact); a part whose rows stay aligned to whole blocks keeps block scales, the others
//!   (K and V, which straddle blocks) carry one scale row per weight row. BF16 / F16 / F32
//!   fused weights (e.g. `ignored_layers` qkv) are split the same way without scales.
//!   The grouping is by the layer's KV heads (vLLM `_shard_fp8_qkv_proj`); miles' converter
//!   groups by the top-level `num_key_value_heads` — the same when full and sliding layers
//!   have equal KV heads, which a fused layout therefore requires.
//! * **MXFP4 experts** (`quantization_config.store_dtype: mxfp4`):
//!   `mlp.experts.E.{gate,up,down}_proj.weight` U8 `[out, in/2]` (element 2j in the low nibble
//!   of byte j — the `fp4` crate's order) + `.weight_scale` U8 `[out, in/32]` (E8M0). The views
//!   point into the mapped file; `gate_up` (`[2I, H]`, halves order) is one view when gate and
//!   up lie back to back in the file, else two row segments ([`MxMat::from_parts`]: the gate
//!   view, then the up view) — the packed bytes are never copied.
//! * **MTP layers** (`model.mtp.*`, usually in `model_mtp.safetensors`): not used by the
//!   engine and skipped (see [`mtp_tensors`]); they never cause an error.
//! * Router `mlp.gate.weight` F32 (BF16 in V2.6) + F32 `e_score_correction_bias`; BF16 `o_proj`
//!   (`ignored_layers`); `attention_sink_bias` on sliding layers — as MiMo-V2-Flash.
//!
//! Config rules ([`check_config`]): the fields where the sources disagree on a default
//! (`rope_theta` 5e6 vs 1e7, `swa_rope_theta`, `partial_rotary_factor`, `attention_value_scale`,
//! `v_head_dim`, the layer patterns, the window) must be present; values the engine does not
//! implement are refused naming the field. The window follows the MiMo-V2-Flash rule of
//! [`crate::config`]: Hub `sliding_window_size` s = s previous keys plus the query (the
//! transformers port's reading of Xiaomi's SGLang reference; vLLM uses s keys in all).
//! `moe_router_dtype` (`float32` or `bfloat16`) is accepted; Ultra always computes the router in
//! f32 from the stored weights (exact for a BF16 router weight).

use crate::checkpoint::{Checkpoint, CheckpointError, Dtype, TensorView};
use crate::config::{CResult, LayerSpec, Obj};
use crate::spec::{FusedQkvSpec, Resolved, SpecError, TensorSpec};
use crate::weights::{Bytes, DenseDtype, ExpertMat, Mat, MxMat};

/// The prefix of the multi-token-prediction tensors (skipped).
pub const MTP_PREFIX: &str = "model.mtp.";

/// Checks the `mimo_v2`-only rules of a config (see the module docs).
pub(crate) fn check_config(o: &Obj<'_>) -> CResult<()> {
    let fused = match o.str("attention_projection_layout")? {
        None => false,
        Some("fused_qkv") => true,
        Some(other) => {
            return Err(o.unsupported(
                "attention_projection_layout",
                format!("{other:?} (supported: fused_qkv, or absent for split q/k/v)"),
            ))
        }
    };
    if fused {
        if let (Some(full), Some(swa)) = (
            o.usize("num_key_value_heads")?,
            o.usize("swa_num_key_value_heads")?,
        ) {
            if full != swa {
                return Err(o.unsupported(
                    "swa_num_key_value_heads",
                    format!(
                        "{swa} ≠ num_key_value_heads {full} with a fused qkv_proj (vLLM groups \
                         it by each layer's KV heads, miles by num_key_value_heads)"
                    ),
                ));
            }
        }
    }
    if let Some(m) = o.str("topk_method")? {
        if m != "noaux_tc" {
            return Err(o.unsupported("topk_method", format!("{m:?} (supported: noaux_tc)")));
        }
    }
    if let Some(d) = o.str("moe_router_dtype")? {
        if !matches!(d, "float32" | "bfloat16") {
            return Err(o.unsupported(
                "moe_router_dtype",
                format!("{d:?} (supported: float32, bfloat16)"),
            ));
        }
    }
    let rp = o.obj("rope_parameters")?;
    let mut required = vec!["attention_value_scale", "v_head_dim"];
    if rp.is_none() {
        required.extend(["rope_theta", "partial_rotary_factor"]);
    }
    let any_sliding = o
        .arr("hybrid_layer_pattern")?
        .is_some_and(|p| p.iter().any(|v| crate::config::as_usize(v) == Some(1)));
    if any_sliding {
        if rp.is_none() {
            required.push("swa_rope_theta");
        }
        if !o.has("sliding_window_size") && !o.has("sliding_window") {
            required.push("sliding_window_size");
        }
    }
    for k in required {
        if !o.has(k) {
            return Err(o.missing(k));
        }
    }
    Ok(())
}

/// The `[Q_g | K_g | V_g]` row groups of a fused `qkv_proj`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FusedQkv {
    /// One group per KV head.
    pub groups: usize,
    /// Rows of Q, K, V in one group.
    pub q: usize,
    pub k: usize,
    pub v: usize,
}

impl FusedQkv {
    /// The layout of a layer's fused projection.
    pub fn of(ls: &LayerSpec) -> FusedQkv {
        let kv = ls.n_kv_heads.max(1);
        FusedQkv {
            groups: kv,
            q: ls.n_heads / kv * ls.head_dim,
            k: ls.head_dim,
            v: ls.v_head_dim,
        }
    }

    /// Rows of one group.
    pub fn group_rows(&self) -> usize {
        self.q + self.k + self.v
    }

    /// Rows of the fused weight.
    pub fn rows(&self) -> usize {
        self.groups * self.group_rows()
    }

    /// Scale rows of the FP8 form (each group padded to whole `b0`-row blocks).
    pub fn scale_rows(&self, b0: usize) -> usize {
        self.groups * self.group_rows().div_ceil(b0.max(1))
    }

    /// `(offset in the group, rows)` of q, k and v.
    fn parts(&self) -> [(usize, usize); 3] {
        [(0, self.q), (self.q, self.k), (self.q + self.k, self.v)]
    }
}

/// The fused projection's tensor name for layer `l`.
pub fn qkv_name(l: usize) -> String {
    format!("model.layers.{l}.self_attn.qkv_proj.weight")
}

/// The names of the multi-token-prediction tensors a checkpoint holds (skipped by the loader).
pub fn mtp_tensors(ck: &Checkpoint) -> Vec<&str> {
    ck.names().filter(|n| n.starts_with(MTP_PREFIX)).collect()
}

fn shape_err(t: &str, expected: String, found: String) -> SpecError {
    SpecError::WrongShape {
        tensor: t.to_string(),
        expected,
        found,
    }
}

/// A validated fused projection: the weight and its FP8 scales (if FP8).
struct Fused<'a> {
    w: TensorView<'a>,
    scales: Option<TensorView<'a>>,
}

fn resolve_fused<'a>(ck: &'a Checkpoint, spec: &FusedQkvSpec) -> Result<Fused<'a>, SpecError> {
    let (f, hidden, name) = (spec.layout, spec.hidden, spec.tensor.name());
    let w = ck.get(name).ok_or_else(|| SpecError::Missing {
        tensor: name.to_string(),
        expected: format!("{:?} [{}, {hidden}]", crate::spec::WEIGHT, f.rows()),
    })?;
    if !crate::spec::WEIGHT.contains(&w.dtype) {
        return Err(SpecError::WrongDtype {
            tensor: name.to_string(),
            expected: format!("{:?}", crate::spec::WEIGHT),
            found: format!("{:?}", w.dtype),
        });
    }
    if w.shape != [f.rows(), hidden] {
        return Err(shape_err(
            name,
            format!(
                "[{}, {hidden}] ({} KV-head groups of {} q + {} k + {} v rows)",
                f.rows(),
                f.groups,
                f.q,
                f.k,
                f.v
            ),
            format!("{:?}", w.shape),
        ));
    }
    let sn = format!("{name}_scale_inv");
    let scales = match (w.dtype, ck.get(&sn)) {
        (Dtype::F8_E4M3, Some(s)) => {
            let [b0, b1] = ck.fp8_block();
            let want = [f.scale_rows(b0), hidden.div_ceil(b1)];
            if s.shape != want {
                return Err(shape_err(
                    &sn,
                    format!(
                        "{want:?} ({} groups of {} rows, each padded to whole {b0}-row blocks, \
                         {b1}-column blocks)",
                        f.groups,
                        f.group_rows()
                    ),
                    format!("{:?}", s.shape),
                ));
            }
            if !matches!(s.dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16) {
                return Err(SpecError::WrongDtype {
                    tensor: sn,
                    expected: "F32, BF16 or F16".into(),
                    found: format!("{:?}", s.dtype),
                });
            }
            Some(s)
        }
        (Dtype::F8_E4M3, None) => {
            return Err(SpecError::Missing {
                tensor: sn,
                expected: "the FP8 block scales of the fused qkv_proj".into(),
            })
        }
        _ => None,
    };
    Ok(Fused { w, scales })
}

/// Validates a fused `qkv_proj` of a layer (shape, dtype, per-group FP8 scales).
pub fn check_fused_qkv(ck: &Checkpoint, spec: &FusedQkvSpec) -> Result<(), SpecError> {
    resolve_fused(ck, spec).map(|_| ())
}

fn ck_err(ck: &Checkpoint, tensor: &str, message: String) -> SpecError {
    SpecError::Checkpoint(CheckpointError::Tensor {
        file: ck.dir().to_path_buf(),
        tensor: tensor.to_string(),
        message,
    })
}

/// Splits a fused `qkv_proj` into `[q, k, v]` (`[heads·hd, H]`, `[kv·hd, H]`, `[kv·vd, H]`,
/// heads in order) in the stored dtype; FP8 values keep their exact code × block scale.
pub fn split_fused_qkv(ck: &Checkpoint, spec: &FusedQkvSpec) -> Result<[Mat; 3], SpecError> {
    let fu = resolve_fused(ck, spec)?;
    let (f, hidden, name) = (spec.layout, spec.hidden, spec.tensor.name());
    let dtype = match fu.w.dtype {
        Dtype::F32 => DenseDtype::F32,
        Dtype::BF16 => DenseDtype::Bf16,
        Dtype::F16 => DenseDtype::F16,
        Dtype::F8_E4M3 => DenseDtype::F8E4M3,
        other => {
            return Err(ck_err(
                ck,
                name,
                format!("dtype {other:?} is not a weight dtype"),
            ))
        }
    };
    let row_bytes = hidden * dtype.size();
    let g_rows = f.group_rows();
    let shared = ck.shared_bytes(name)?;
    if shared.len() != f.rows() * row_bytes {
        return Err(ck_err(
            ck,
            name,
            format!("{} bytes for {} rows", shared.len(), f.rows()),
        ));
    }
    let scales = match &fu.scales {
        Some(s) => Some(s.to_f32()?),
        None => None,
    };
    let [b0, b1] = ck.fp8_block();
    let (sr, sc) = (g_rows.div_ceil(b0), hidden.div_ceil(b1));
    let mut out = Vec::with_capacity(3);
    for (off, n) in f.parts() {
        let rows = f.groups * n;
        // One group: the part is contiguous in the file (a view); else gathered.
        let bytes = if f.groups == 1 {
            shared.slice(off * row_bytes, n * row_bytes)
        } else {
            let src = shared.as_slice();
            let mut v = Vec::with_capacity(rows * row_bytes);
            for g in 0..f.groups {
                let at = (g * g_rows + off) * row_bytes;
                v.extend_from_slice(&src[at..at + n * row_bytes]);
            }
            Bytes::from_vec(v)
        };
        let part_scales = scales.as_ref().map(|s| {
            let aligned = off.is_multiple_of(b0)
                && (n.is_multiple_of(b0) || (f.groups == 1 && off + n == g_rows));
            if aligned {
                // Whole blocks: the part's scale rows, group after group.
                let per = n.div_ceil(b0);
                let mut v = Vec::with_capacity(f.groups * per * sc);
                for g in 0..f.groups {
                    let r0 = g * sr + off / b0;
                    v.extend_from_slice(&s[r0 * sc..(r0 + per) * sc]);
                }
                ([b0, b1], sc, v)
            } else {
                // Blocks straddle the part's edges: one scale row per weight row.
                let mut v = Vec::with_capacity(rows * sc);
                for g in 0..f.groups {
                    for r in off..off + n {
                        let sr_at = g * sr + r / b0;
                        v.extend_from_slice(&s[sr_at * sc..(sr_at + 1) * sc]);
                    }
                }
                ([1, b1], sc, v)
            }
        });
        let m = Mat::from_bytes(dtype, rows, hidden, bytes, part_scales)
            .map_err(|m| ck_err(ck, name, m))?;
        out.push(m);
    }
    let [q, k, v]: [Mat; 3] = out
        .try_into()
        .map_err(|_| ck_err(ck, name, "internal: three parts".into()))?;
    Ok([q, k, v])
}

/// The scale tensor of a packed MXFP4 weight `<name>` (`…weight` → `…weight_scale`).
pub fn packed_scale_name(name: &str) -> String {
    format!("{name}_scale")
}

/// Validates a packed MXFP4 weight: `t` U8 `[rows, k/2]` + `<name>_scale` U8 `[rows, k/32]`
/// (E8M0; NaN bytes rejected).
pub(crate) fn check_packed<'a>(
    ck: &'a Checkpoint,
    t: TensorView<'a>,
    rows: usize,
    k: usize,
) -> Result<Resolved<'a>, SpecError> {
    let sn = packed_scale_name(t.name);
    if !k.is_multiple_of(fp4::BLOCK) {
        return Err(shape_err(
            t.name,
            format!("K = {k}, a multiple of 32"),
            format!("{:?}", t.shape),
        ));
    }
    let s = ck.get(&sn).ok_or_else(|| SpecError::Missing {
        tensor: sn.clone(),
        expected: format!(
            "U8 [{rows}, {}] (E8M0 scales of `{}`)",
            k / fp4::BLOCK,
            t.name
        ),
    })?;
    for (v, want) in [(&t, [rows, k / 2]), (&s, [rows, k / fp4::BLOCK])] {
        if v.dtype != Dtype::U8 {
            return Err(SpecError::WrongDtype {
                tensor: v.name.to_string(),
                expected: "U8 (MXFP4)".into(),
                found: format!("{:?}", v.dtype),
            });
        }
        if v.shape != want {
            return Err(shape_err(
                v.name,
                format!("{want:?}"),
                format!("{:?}", v.shape),
            ));
        }
    }
    let m = fp4::MxMatrixRef::new(rows, k, t.data, s.data)
        .map_err(|e| ck_err(ck, &sn, format!("MXFP4 pair `{}` / `{sn}`: {e}", t.name)))?;
    Ok(Resolved::Mxfp4Matrix(m))
}

/// The packed MXFP4 tensor behind a spec (its checkpoint name), if the checkpoint holds it so.
pub(crate) fn packed_name(ck: &Checkpoint, t: &TensorSpec) -> Result<Option<String>, SpecError> {
    Ok(match t.resolve(ck)? {
        Resolved::Mxfp4Matrix(_) => t
            .names
            .iter()
            .find(|n| ck.get(n).is_some_and(|v| v.dtype == Dtype::U8))
            .cloned(),
        _ => None,
    })
}

/// One MXFP4 expert (`[gate; up]` halves, `down`) from packed per-expert tensors.
pub(crate) fn mx_expert(
    ck: &Checkpoint,
    gate: &str,
    up: &str,
    down: &str,
) -> Result<(ExpertMat, ExpertMat), SpecError> {
    let shape = |n: &str| -> Result<(usize, usize), SpecError> {
        let v = ck.tensor(n)?;
        match *v.shape {
            [r, half] => Ok((r, 2 * half)),
            _ => Err(shape_err(n, "[out, in/2]".into(), format!("{:?}", v.shape))),
        }
    };
    let ((gr, gk), (ur, uk), (dr, dk)) = (shape(gate)?, shape(up)?, shape(down)?);
    if gk != uk {
        return Err(shape_err(
            up,
            format!("[_, {}] like `{gate}`", gk / 2),
            format!("[{ur}, {}]", uk / 2),
        ));
    }
    let (gs, us, ds) = (
        packed_scale_name(gate),
        packed_scale_name(up),
        packed_scale_name(down),
    );
    // One view when gate and up (codes and scales) lie back to back, else a view of each: the
    // packed bytes are never copied.
    let gu = match (
        ck.shared_bytes_adjacent(gate, up)?,
        ck.shared_bytes_adjacent(&gs, &us)?,
    ) {
        (Some(b), Some(s)) => MxMat::from_bytes(gr + ur, gk, b, s),
        _ => MxMat::from_parts(
            gk,
            vec![
                (gr, ck.shared_bytes(gate)?, ck.shared_bytes(&gs)?),
                (ur, ck.shared_bytes(up)?, ck.shared_bytes(&us)?),
            ],
        ),
    };
    let dn = MxMat::from_bytes(dr, dk, ck.shared_bytes(down)?, ck.shared_bytes(&ds)?);
    for (m, n) in [(&gu, gate), (&dn, down)] {
        m.parts()
            .map_err(|e| ck_err(ck, n, format!("MXFP4 expert: {e}")))?;
    }
    Ok((ExpertMat::Mxfp4(gu), ExpertMat::Mxfp4(dn)))
}
