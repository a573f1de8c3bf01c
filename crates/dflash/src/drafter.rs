//! The drafter: weights, loading (z-lab DFlash-1 and MiMo checkpoints), validation against a
//! target, and the CPU draft forward.
//!
//! # Forward (research/dflash.md §2, §3.1)
//! * **Context**: for each committed token, the outputs of the target layers
//!   `target_layer_ids` are concatenated (`[K·H_t]`), fused `ctx = hidden_norm(fc(·))`, and
//!   every draft layer projects `ctx` with its own `k_proj` (+ `k_norm`, + RoPE at the token's
//!   absolute position) and `v_proj` (× `value_scale`) into that layer's context cache
//!   ([`DraftCache`]). Context is appended once per committed token and never recomputed; the
//!   context stream does not pass through the layers.
//! * **Block**: `[x_last, MASK × (B−1)]` at positions `start .. start+B` (`start` = the number
//!   of committed context tokens = `x_last`'s position), embedded with the **target's**
//!   embedding table (MiMo: the separate mask embedding replaces the mask row), × the input
//!   embedding scale. Each layer is a pre-norm Qwen3 block whose queries come from the block
//!   only and whose keys/values are `[context cache | block]`; the attention range per query
//!   follows [`DraftAttn`]. Output: the drafter's final `norm`, then the **target's** LM head on
//!   rows `1 .. B` — the logits of the draft tokens at positions `start+1 .. start+B`.
//!
//! Numerics: f32 throughout with the executor's ops (`model::cpu::ops`), so every matrix product
//! and attention is multithreaded the same way and a row's result does not depend on the split.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use model::checkpoint::{Checkpoint, CheckpointError};
use model::config::{Activation, ConfigError, ModelConfig};
use model::cpu::ops::{self, AttnShape, PAR_MIN_WORK};
use model::cpu::rope::RopeTable;
use model::drafter::tensor_err;
use model::weights::{Attention, GateUpLayout, Layer, Linear, Mat, Mlp};
use rayon::prelude::*;

use crate::config::{DraftAttn, DrafterConfig, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE};
/// The drafter's weights and errors are model data (`model::drafter`), shared with the GPU
/// drafter; re-exported here at their old paths.
pub use model::drafter::{DrafterError, DrafterWeights};

/// The mask-embedding file of MiMo drafters, converted to safetensors (tensor `embedding`
/// `[hidden_size]`).
pub const MASK_EMBEDDING_FILE: &str = "mask_embedding.safetensors";
/// The mask-embedding file as MiMo ships it (`torch.save` of `{mask_token_id, embedding}`,
/// read by [`crate::torch_pt`]).
pub const MASK_EMBEDDING_PT: &str = "mask_embedding.pt";

/// A drafter ready to run on the CPU: config, weights (shared, immutable), RoPE table. Cheap to
/// clone; `Send + Sync`.
#[derive(Debug, Clone)]
pub struct Drafter {
    config: Arc<DrafterConfig>,
    weights: Arc<DrafterWeights>,
    rope: Arc<RopeTable>,
    shape: AttnShape,
}

impl Drafter {
    /// Validates `weights` against `config` (every shape, [`DrafterWeights::check`]) and builds
    /// the RoPE table.
    pub fn new(config: DrafterConfig, weights: DrafterWeights) -> Result<Drafter, DrafterError> {
        weights.check(&config)?;
        let (nh, nkv, d) = (config.n_heads, config.n_kv_heads, config.head_dim);
        let rope = RopeTable::new(&config.rope);
        let shape = AttnShape {
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: d,
            v_head_dim: d,
            window: None,
            scale: (1.0 / (d as f64).sqrt()) as f32,
        };
        Ok(Drafter {
            config: Arc::new(config),
            weights: Arc::new(weights),
            rope: Arc::new(rope),
            shape,
        })
    }

    /// Loads a drafter directory and checks it against the target's config
    /// ([`Drafter::check_target`]).
    ///
    /// Files: `config.json`; weights from `model.safetensors`, else
    /// `model.safetensors.index.json`, else the directory's only other `*.safetensors` file
    /// (MiMo's `dflash_draft_model.safetensors`); optional `mask_embedding.safetensors` (tensor
    /// `embedding`), else `mask_embedding.pt` as MiMo ships it (a `torch.save` dict
    /// `{mask_token_id, embedding}`, read without Python by [`crate::torch_pt`]; an unreadable
    /// one is [`DrafterError::MaskEmbeddingPt`]). Tensor names as z-lab's (`fc.weight`, `layers.{i}…`),
    /// optionally under a `model.` prefix.
    pub fn load(dir: &Path, target: &ModelConfig) -> Result<Drafter, DrafterError> {
        let d = Drafter::load_unchecked(dir)?;
        d.check_target(target)?;
        Ok(d)
    }

    /// [`Drafter::load`] without the target check.
    pub fn load_unchecked(dir: &Path) -> Result<Drafter, DrafterError> {
        let cfg_path = dir.join("config.json");
        let cfg_err = |source| DrafterError::Config {
            path: dir.to_path_buf(),
            source,
        };
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| {
            cfg_err(ConfigError::Io {
                path: cfg_path.display().to_string(),
                message: e.to_string(),
            })
        })?;
        let config = DrafterConfig::from_json_str(&text).map_err(cfg_err)?;
        let ck_err = |source| DrafterError::Checkpoint {
            path: dir.to_path_buf(),
            source,
        };
        let ck = open_checkpoint(dir).map_err(ck_err)?;
        let mask_embedding = load_mask_embedding(dir, config.mask_token_id)?;
        let weights = load_weights(&config, &ck, mask_embedding)?;
        Drafter::new(config, weights)
    }

    pub fn config(&self) -> &DrafterConfig {
        &self.config
    }

    pub fn weights(&self) -> &DrafterWeights {
        &self.weights
    }

    /// Width of one token's context features: `K · H_t`.
    pub fn feature_width(&self) -> usize {
        self.weights.fc.cols
    }

    /// Checks the drafter against a target config (see [`Drafter::check_dims`]).
    pub fn check_target(&self, target: &ModelConfig) -> Result<(), DrafterError> {
        self.check_dims(target.vocab_size, target.hidden_size, target.layers.len())
    }

    /// Checks the drafter against a target of `vocab` tokens, hidden size `hidden` and
    /// `layers` decoder layers: drafter hidden size = target hidden (the drafter uses the
    /// target's embedding and LM head), `fc` input = K · target hidden, `vocab_size` (if given)
    /// = target vocab, `mask_token_id` < target vocab, every target layer id < `layers`,
    /// `num_target_layers` / `target_hidden_size` (if given) equal to the target's. Errors
    /// name the drafter field.
    pub fn check_dims(
        &self,
        vocab: usize,
        hidden: usize,
        layers: usize,
    ) -> Result<(), DrafterError> {
        self.config
            .check_target_dims(self.feature_width(), vocab, hidden, layers)
    }

    /// An empty per-sequence context cache.
    pub fn new_cache(&self) -> DraftCache {
        DraftCache {
            layers: vec![CtxKv::default(); self.config.num_layers()],
            len: 0,
            s: Scratch::default(),
        }
    }

    /// The fused context `hidden_norm(fc(features))` of `features` (`[n, K·H_t]`, one row per
    /// token): `[n, H]`.
    pub fn fuse(&self, features: &[f32]) -> Result<Vec<f32>, DrafterError> {
        let n = self.feature_rows(features)?;
        let mut out = vec![0f32; n * self.config.hidden_size];
        self.fuse_into(features, n, &mut out);
        Ok(out)
    }

    fn feature_rows(&self, features: &[f32]) -> Result<usize, DrafterError> {
        let w = self.feature_width();
        if !features.len().is_multiple_of(w) {
            return Err(DrafterError::Input(format!(
                "{} feature values are not a multiple of the feature width {w}",
                features.len()
            )));
        }
        Ok(features.len() / w)
    }

    fn fuse_into(&self, features: &[f32], n: usize, out: &mut [f32]) {
        ops::matmul(&self.weights.fc, features, n, out);
        ops::rms_norm_rows(out, &self.weights.hidden_norm, self.config.rms_norm_eps);
    }

    /// Appends committed context tokens at positions `cache.len() ..`: `features` is
    /// `[n, K·H_t]` (the target's outputs of the `target_layer_ids` layers, concatenated per
    /// token).
    pub fn append_context(
        &self,
        cache: &mut DraftCache,
        features: &[f32],
    ) -> Result<(), DrafterError> {
        let n = self.feature_rows(features)?;
        if n == 0 {
            return Ok(());
        }
        if cache.layers.len() != self.config.num_layers() {
            return Err(DrafterError::Input(
                "the cache belongs to a different drafter".into(),
            ));
        }
        let c = &*self.config;
        let (h, nkv, d) = (c.hidden_size, c.n_kv_heads, c.head_dim);
        let start = cache.len;
        let s = &mut cache.s;
        s.ctx.resize(n * h, 0.0);
        self.fuse_into(features, n, &mut s.ctx);
        self.rope_rows(s, start, n);
        for (lw, kv) in self.weights.layers.iter().zip(cache.layers.iter_mut()) {
            s.k.resize(n * nkv * d, 0.0);
            s.v.resize(n * nkv * d, 0.0);
            self.project_kv(lw, &s.ctx, n, &mut s.k, &mut s.v, &s.cos, &s.sin);
            if kv.k.is_empty() {
                kv.first = start;
            }
            kv.k.extend_from_slice(&s.k);
            kv.v.extend_from_slice(&s.v);
        }
        cache.len += n;
        // Sliding layers: the next block's first query is at position `len`; it sees context
        // keys from `len + 1 − W` on. Drop older rows once enough have piled up.
        let row = nkv * d;
        for (kv, attn) in cache.layers.iter_mut().zip(&c.layers) {
            if let Some(w) = attn.window {
                let need = (cache.len + 1).saturating_sub(w);
                let drop = need.saturating_sub(kv.first);
                if drop >= w.max(64) {
                    kv.k.drain(..drop * row);
                    kv.v.drain(..drop * row);
                    kv.first += drop;
                }
            }
        }
        Ok(())
    }

    /// cos/sin of positions `start .. start + n` into the scratch.
    fn rope_rows(&self, s: &mut Scratch, start: usize, n: usize) {
        let half = self.rope.half();
        s.cos.resize(n * half, 0.0);
        s.sin.resize(n * half, 0.0);
        for t in 0..n {
            self.rope.cos_sin(
                start + t,
                &mut s.cos[t * half..(t + 1) * half],
                &mut s.sin[t * half..(t + 1) * half],
            );
        }
    }

    /// Keys (`k_proj`, `k_norm`, RoPE with `cos`/`sin` per row) and values (`v_proj` ×
    /// value scale) of `n` rows of `x` (`[n, H]`, already normalized).
    #[allow(clippy::too_many_arguments)]
    fn project_kv(
        &self,
        lw: &Layer,
        x: &[f32],
        n: usize,
        k: &mut [f32],
        v: &mut [f32],
        cos: &[f32],
        sin: &[f32],
    ) {
        let c = &*self.config;
        let (nkv, d) = (c.n_kv_heads, c.head_dim);
        ops::linear(&lw.attn.k, x, n, k);
        if let Some(kn) = &lw.attn.k_norm {
            ops::rms_norm_rows(k, kn, c.rms_norm_eps);
        }
        self.rotate(k, nkv * d, n, cos, sin);
        ops::linear(&lw.attn.v, x, n, v);
        if c.value_scale != 1.0 {
            for x in v.iter_mut() {
                *x *= c.value_scale;
            }
        }
    }

    /// RoPE on `n` rows of `row` values (heads of `head_dim`).
    fn rotate(&self, x: &mut [f32], row: usize, n: usize, cos: &[f32], sin: &[f32]) {
        let half = self.rope.half();
        if half == 0 {
            return;
        }
        for t in 0..n {
            ops::apply_rope_heads(
                &mut x[t * row..(t + 1) * row],
                self.config.head_dim,
                &cos[t * half..(t + 1) * half],
                &sin[t * half..(t + 1) * half],
            );
        }
    }

    /// One draft forward: the block `[x_last, MASK × (block_size − 1)]` at positions
    /// `cache.len() ..` (so `x_last` is the token right after the committed context) →
    /// `(block_size − 1) · V` logits, row `i` predicting the token at position
    /// `cache.len() + 1 + i`. `embed` / `lm_head` are the target's `[V, H]` tables. The cache is
    /// left as it was (block keys and values are not kept).
    pub fn draft(
        &self,
        cache: &mut DraftCache,
        embed: &Mat,
        lm_head: &Mat,
        x_last: u32,
        block_size: usize,
    ) -> Result<Vec<f32>, DrafterError> {
        let c = &*self.config;
        let (h, nh, nkv, d, inter) = (
            c.hidden_size,
            c.n_heads,
            c.n_kv_heads,
            c.head_dim,
            c.intermediate_size,
        );
        if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
            return Err(DrafterError::Input(format!(
                "block size {block_size} is outside {MIN_BLOCK_SIZE}..={MAX_BLOCK_SIZE}"
            )));
        }
        if embed.cols != h || lm_head.cols != h {
            return Err(DrafterError::Input(format!(
                "target embedding [{}, {}] / LM head [{}, {}] do not have the drafter's hidden \
                 size {h}",
                embed.rows, embed.cols, lm_head.rows, lm_head.cols
            )));
        }
        if x_last as usize >= embed.rows || c.mask_token_id as usize >= embed.rows {
            return Err(DrafterError::Input(format!(
                "token {x_last} or mask token {} is outside the target vocabulary (size {})",
                c.mask_token_id, embed.rows
            )));
        }
        if cache.layers.len() != c.num_layers() {
            return Err(DrafterError::Input(
                "the cache belongs to a different drafter".into(),
            ));
        }
        let b = block_size;
        let start = cache.len;
        let eps = c.rms_norm_eps;
        let s = &mut cache.s;

        // Block embeddings.
        s.x.resize(b * h, 0.0);
        embed.row_into(x_last as usize, &mut s.x[..h]);
        for row in s.x[h..].chunks_exact_mut(h) {
            match &self.weights.mask_embedding {
                Some(m) => row.copy_from_slice(m),
                None => embed.row_into(c.mask_token_id as usize, row),
            }
        }
        if c.input_embedding_scale != 1.0 {
            for v in s.x.iter_mut() {
                *v *= c.input_embedding_scale;
            }
        }
        self.rope_rows(s, start, b);

        s.h.resize(b * h, 0.0);
        s.o.resize(b * h, 0.0);
        for ((lw, kv), attn) in self
            .weights
            .layers
            .iter()
            .zip(cache.layers.iter_mut())
            .zip(&c.layers)
        {
            for (x, hh) in s.x.chunks_exact(h).zip(s.h.chunks_exact_mut(h)) {
                ops::rms_norm(x, &lw.input_norm, eps, hh);
            }
            s.q.resize(b * nh * d, 0.0);
            ops::linear(&lw.attn.q, &s.h, b, &mut s.q);
            if let Some(qn) = &lw.attn.q_norm {
                ops::rms_norm_rows(&mut s.q, qn, eps);
            }
            self.rotate(&mut s.q, nh * d, b, &s.cos, &s.sin);
            s.k.resize(b * nkv * d, 0.0);
            s.v.resize(b * nkv * d, 0.0);
            self.project_kv(lw, &s.h, b, &mut s.k, &mut s.v, &s.cos, &s.sin);

            // Keys/values = [context | block], the block part transient.
            if kv.k.is_empty() {
                kv.first = start;
            }
            let (kl, vl) = (kv.k.len(), kv.v.len());
            kv.k.extend_from_slice(&s.k);
            kv.v.extend_from_slice(&s.v);
            s.attn.resize(b * nh * d, 0.0);
            block_attention(
                &self.shape,
                *attn,
                &s.q,
                &kv.k,
                &kv.v,
                kv.first,
                start,
                b,
                lw.attn.sinks.as_deref(),
                &mut s.scores,
                &mut s.attn,
            );
            kv.k.truncate(kl);
            kv.v.truncate(vl);

            ops::linear(&lw.attn.o, &s.attn, b, &mut s.o);
            ops::add_assign(&mut s.x, &s.o);

            for (x, hh) in s.x.chunks_exact(h).zip(s.h.chunks_exact_mut(h)) {
                ops::rms_norm(x, &lw.post_attn_norm, eps, hh);
            }
            let Mlp::Dense { gate_up, down } = &lw.mlp else {
                unreachable!("Drafter::new admits dense MLPs only");
            };
            s.gu.resize(b * 2 * inter, 0.0);
            ops::linear(gate_up, &s.h, b, &mut s.gu);
            s.act.resize(b * inter, 0.0);
            ops::glu_rows(
                Activation::Swiglu,
                GateUpLayout::Halves,
                &s.gu,
                &mut s.act,
                inter,
            );
            ops::linear(down, &s.act, b, &mut s.o);
            ops::add_assign(&mut s.x, &s.o);
        }

        // Final norm on rows 1..B, then the target's LM head.
        let rows = b - 1;
        for (x, hh) in s.x[h..].chunks_exact(h).zip(s.h.chunks_exact_mut(h)) {
            ops::rms_norm(x, &self.weights.norm, eps, hh);
        }
        let mut logits = vec![0f32; rows * lm_head.rows];
        ops::matmul(lm_head, &s.h[..rows * h], rows, &mut logits);
        Ok(logits)
    }
}

/// Block attention of one draft layer: `b` queries at positions `start ..` over the keys
/// `first_pos ..` of `k_rows`/`v_rows` (context then block). Query `i` (position `p`) sees the
/// keys `lo .. hi` with `lo = p + 1 − W` (0 without a window) and `hi = p + 1` when causal,
/// else `min(start + b, p + W)` (all block keys without a window). Parallel over (query, head)
/// when the work is large; each output is computed the same way either way.
#[allow(clippy::too_many_arguments)]
fn block_attention(
    shape: &AttnShape,
    attn: DraftAttn,
    q: &[f32],
    k_rows: &[f32],
    v_rows: &[f32],
    first_pos: usize,
    start: usize,
    b: usize,
    sinks: Option<&[f32]>,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let (nh, d) = (shape.n_heads, shape.head_dim);
    let end = start + b;
    let range = |i: usize| {
        let p = start + i;
        let lo = attn.window.map_or(0, |w| (p + 1).saturating_sub(w));
        let hi = match (attn.causal, attn.window) {
            (true, _) => p + 1,
            (false, None) => end,
            (false, Some(w)) => (p + w).min(end),
        };
        lo..hi
    };
    let one = |idx: usize, sc: &mut Vec<f32>, o: &mut [f32]| {
        let (i, head) = (idx / nh, idx % nh);
        ops::attention_span(
            shape,
            &q[i * nh * d..(i + 1) * nh * d],
            k_rows,
            v_rows,
            first_pos,
            range(i),
            head,
            sinks,
            sc,
            o,
        );
    };
    let visible = end - first_pos;
    if b * nh * visible * 2 * d < PAR_MIN_WORK || rayon::current_num_threads() == 1 {
        for (idx, o) in out.chunks_exact_mut(d).enumerate() {
            one(idx, scores, o);
        }
    } else {
        out.par_chunks_mut(d)
            .enumerate()
            .for_each_init(Vec::new, |sc, (idx, o)| one(idx, sc, o));
    }
}

/// One layer's context keys and values: rows of `[n_kv_heads · head_dim]` for the consecutive
/// positions `first ..`.
#[derive(Debug, Clone, Default)]
struct CtxKv {
    k: Vec<f32>,
    v: Vec<f32>,
    first: usize,
}

/// Reusable buffers of the draft forward.
#[derive(Debug, Clone, Default)]
struct Scratch {
    ctx: Vec<f32>,
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    o: Vec<f32>,
    gu: Vec<f32>,
    act: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    scores: Vec<f32>,
}

/// The drafter's per-sequence state: each layer's context keys/values of the committed tokens
/// (positions `0 .. len()`; sliding layers keep only the suffix they can still see), plus
/// reusable buffers. Only committed context is ever stored; block keys/values are transient.
#[derive(Debug, Clone)]
pub struct DraftCache {
    layers: Vec<CtxKv>,
    len: usize,
    s: Scratch,
}

impl DraftCache {
    /// Committed context tokens (the next block's `x_last` sits at this position).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

/// `model.safetensors`, else the sharded index, else the directory's only other `*.safetensors`.
fn open_checkpoint(dir: &Path) -> Result<Checkpoint, CheckpointError> {
    if dir.join(model::checkpoint::SINGLE_FILE).is_file()
        || dir.join(model::checkpoint::INDEX_FILE).is_file()
    {
        return Checkpoint::open(dir);
    }
    let entries = std::fs::read_dir(dir).map_err(|e| CheckpointError::Io {
        file: dir.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension().is_some_and(|x| x == "safetensors")
                && p.file_name().is_some_and(|n| n != MASK_EMBEDDING_FILE)
        })
        .collect();
    files.sort();
    match files.as_slice() {
        [one] => Checkpoint::open_file(one),
        _ => Err(CheckpointError::NoWeights {
            dir: dir.to_path_buf(),
        }),
    }
}

/// `mask_embedding.safetensors` (tensor `embedding` `[H]`, optional metadata `mask_token_id`
/// that must equal the config's), else `mask_embedding.pt` (dict `{mask_token_id, embedding}`),
/// if present.
fn load_mask_embedding(dir: &Path, mask_token_id: u32) -> Result<Option<Vec<f32>>, DrafterError> {
    let st = dir.join(MASK_EMBEDDING_FILE);
    if !st.is_file() {
        let pt = dir.join(MASK_EMBEDDING_PT);
        if !pt.is_file() {
            return Ok(None);
        }
        let (id, embedding) = crate::torch_pt::read_mask_embedding(&pt).map_err(|e| {
            DrafterError::MaskEmbeddingPt {
                path: pt.clone(),
                reason: e.to_string(),
            }
        })?;
        if let Some(id) = id {
            if id != i64::from(mask_token_id) {
                return Err(DrafterError::MaskTokenMismatch {
                    path: pt,
                    found: id.to_string(),
                    config: mask_token_id,
                });
            }
        }
        return Ok(Some(embedding));
    }
    if let Some(found) = header_metadata(&st, "mask_token_id") {
        if found.trim().parse::<u32>() != Ok(mask_token_id) {
            return Err(DrafterError::MaskTokenMismatch {
                path: st,
                found,
                config: mask_token_id,
            });
        }
    }
    let ck_err = |source| DrafterError::Checkpoint {
        path: st.clone(),
        source,
    };
    let ck = Checkpoint::open_file(&st).map_err(ck_err)?;
    let t = ck.tensor("embedding").map_err(ck_err)?;
    if !(t.shape.len() == 1 || (t.shape.len() == 2 && t.shape[0] == 1)) {
        return Err(tensor_err(
            "embedding (mask_embedding.safetensors)",
            "[hidden_size]",
            format!("{:?}", t.shape),
        ));
    }
    Ok(Some(ck.read_f32("embedding").map_err(ck_err)?))
}

/// One `__metadata__` entry of a safetensors header (`None` if absent or unreadable; the file
/// itself is validated by [`Checkpoint::open_file`]).
fn header_metadata(path: &Path, key: &str) -> Option<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).ok()?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).ok()?;
    let len = u64::from_le_bytes(len);
    if len > model::checkpoint::MAX_HEADER_BYTES {
        return None;
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&header).ok()?;
    Some(v.get("__metadata__")?.get(key)?.as_str()?.to_string())
}

struct Reader<'a> {
    ck: &'a Checkpoint,
    prefix: &'static str,
}

impl Reader<'_> {
    fn err(&self, source: CheckpointError) -> DrafterError {
        DrafterError::Checkpoint {
            path: self.ck.dir().to_path_buf(),
            source,
        }
    }

    fn shape(&self, name: &str) -> Result<Vec<usize>, DrafterError> {
        let full = format!("{}{name}", self.prefix);
        match self.ck.get(&full) {
            Some(t) => Ok(t.shape.to_vec()),
            None => Err(tensor_err(&full, "a tensor", "nothing")),
        }
    }

    fn read(&self, name: &str, shape: &[usize], out: &mut [f32]) -> Result<(), DrafterError> {
        let full = format!("{}{name}", self.prefix);
        let found = self.shape(name)?;
        if found != shape {
            return Err(tensor_err(
                &full,
                format!("{shape:?}"),
                format!("{found:?}"),
            ));
        }
        self.ck.read_f32_into(&full, out).map_err(|e| self.err(e))
    }

    fn vector(&self, name: &str, n: usize) -> Result<Vec<f32>, DrafterError> {
        let mut v = vec![0f32; n];
        self.read(name, &[n], &mut v)?;
        Ok(v)
    }

    fn mat(&self, name: &str, rows: usize, cols: usize) -> Result<Mat, DrafterError> {
        let mut data = vec![0f32; rows * cols];
        self.read(name, &[rows, cols], &mut data)?;
        Ok(Mat::from_f32(rows, cols, data))
    }

    fn linear(
        &self,
        base: &str,
        rows: usize,
        cols: usize,
        bias: bool,
    ) -> Result<Linear, DrafterError> {
        Ok(Linear {
            w: self.mat(&format!("{base}.weight"), rows, cols)?,
            bias: if bias {
                Some(self.vector(&format!("{base}.bias"), rows)?)
            } else {
                None
            },
        })
    }
}

fn load_weights(
    c: &DrafterConfig,
    ck: &Checkpoint,
    mask_embedding: Option<Vec<f32>>,
) -> Result<DrafterWeights, DrafterError> {
    let prefix = if !ck.contains("fc.weight") && ck.contains("model.fc.weight") {
        "model."
    } else {
        ""
    };
    for name in ["d2t", "t2d", "lm_head.weight", "embed_tokens.weight"] {
        let full = format!("{prefix}{name}");
        if ck.contains(&full) || ck.contains(name) {
            return Err(DrafterError::UnsupportedTensor {
                tensor: full,
                reason: "drafter-owned LM heads, embeddings and reduced-vocabulary maps are not \
                         implemented (DFlash drafters use the target's)"
                    .into(),
            });
        }
    }
    let r = Reader { ck, prefix };
    let (h, nh, nkv, d, inter) = (
        c.hidden_size,
        c.n_heads,
        c.n_kv_heads,
        c.head_dim,
        c.intermediate_size,
    );
    let fc_shape = r.shape("fc.weight")?;
    let fc_cols = match fc_shape.as_slice() {
        [rows, cols] if *rows == h => *cols,
        _ => {
            return Err(tensor_err(
                &format!("{prefix}fc.weight"),
                format!("[{h}, K·H_t]"),
                format!("{fc_shape:?}"),
            ))
        }
    };
    let fc = r.mat("fc.weight", h, fc_cols)?;
    let hidden_norm = r.vector("hidden_norm.weight", h)?;
    let norm = r.vector("norm.weight", h)?;
    let layers = (0..c.num_layers())
        .into_par_iter()
        .map(|l| {
            let p = format!("layers.{l}");
            let a = format!("{p}.self_attn");
            let b = c.attention_bias;
            let attn = Attention {
                q: r.linear(&format!("{a}.q_proj"), nh * d, h, b)?,
                k: r.linear(&format!("{a}.k_proj"), nkv * d, h, b)?,
                v: r.linear(&format!("{a}.v_proj"), nkv * d, h, b)?,
                o: r.linear(&format!("{a}.o_proj"), h, nh * d, b)?,
                q_norm: Some(r.vector(&format!("{a}.q_norm.weight"), d)?),
                k_norm: Some(r.vector(&format!("{a}.k_norm.weight"), d)?),
                sinks: if c.sinks {
                    Some(r.vector(&format!("{a}.attention_sink_bias"), nh)?)
                } else {
                    None
                },
            };
            let mut gu = vec![0f32; 2 * inter * h];
            let (g, u) = gu.split_at_mut(inter * h);
            r.read(&format!("{p}.mlp.gate_proj.weight"), &[inter, h], g)?;
            r.read(&format!("{p}.mlp.up_proj.weight"), &[inter, h], u)?;
            Ok(Layer {
                input_norm: r.vector(&format!("{p}.input_layernorm.weight"), h)?,
                attn,
                post_attn_norm: r.vector(&format!("{p}.post_attention_layernorm.weight"), h)?,
                mlp: Mlp::Dense {
                    gate_up: Linear {
                        w: Mat::from_f32(2 * inter, h, gu),
                        bias: None,
                    },
                    down: r.linear(&format!("{p}.mlp.down_proj"), h, inter, false)?,
                },
            })
        })
        .collect::<Result<Vec<_>, DrafterError>>()?;
    Ok(DrafterWeights {
        fc,
        hidden_norm,
        layers,
        norm,
        mask_embedding,
    })
}
