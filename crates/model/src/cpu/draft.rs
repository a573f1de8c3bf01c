//! The CPU drafter: a DFlash drafter's two passes (research/dflash.md §2, §3.1) as step plans
//! ([`Plan::draft`], from [`DrafterConfig::draft_spec_dims`] — the plans the GPU drafter lowers)
//! run by the CPU plan interpreter (`run_pass`), with the drafter's context caches.
//!
//! * **Context append** (`draft_context` + one k/v-only `qkv_rope` per draft layer): for each
//!   committed token the concatenated target features `[K·H_t]` are fused,
//!   `ctx = hidden_norm(fc(·))`, and every draft layer projects `ctx` with its own `k_proj`
//!   (+ `k_norm`, + RoPE at the token's absolute position) and `v_proj` (× `value_scale`) into
//!   that layer's context cache. Context is appended once per committed token and never
//!   recomputed; the context stream does not pass through the layers.
//! * **Block draft** (`embed`, then per layer `qkv_rope` → `draft_attention` → `o_proj` → norm →
//!   `mlp_gate_up` → `mlp_down`, then the LM head on rows `1..B`): `[x_last, MASK × (B−1)]` at
//!   positions `start .. start+B` (`start` = the committed context length = `x_last`'s
//!   position), embedded with the **target's** embedding table (the separate mask embedding of
//!   MiMo drafters replaces the rows `1..`), × the input embedding scale. Block keys/values are
//!   appended to each layer's cache for the pass (queries see `[context | block]` as
//!   `draft_attention`'s window / causal rule says) and dropped after it.
//!
//! The caches are the executor's paged [`LayerKv`] (blocks of [`DEFAULT_BLOCK_SIZE`] positions
//! unless [`CpuDrafter::new_cache_with_block_size`] says otherwise; attention reads them through
//! their block tables, so the block size never changes a result). Sliding draft layers keep the
//! `W − 1` context rows the next block can still see; the drafter never rolls back, so
//! `max_rollback` is 0. A block pass appends its rows into the cache and truncates them away
//! afterwards (blocks past the committed context are released; a cloned cache shares its blocks
//! copy-on-write, so neither copy sees the other's passes).
//! Numerics: f32 with the executor's ops, a row's result independent of the thread split.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::kv::{KvCache, LayerKv, DEFAULT_BLOCK_SIZE};
use super::{run_pass, Bound, CpuError, DraftTensors, PassInput, Scratch, Segment};
use crate::drafter::{DrafterConfig, DrafterError, DrafterWeights, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE};
use crate::plan::draft::{DraftPass, DraftSpec};
use crate::plan::{OpKind, Plan, PlanError, WeightStorage};
use crate::rope::RopeTable;
use crate::weights::Mat;

/// A drafter ready to run on the CPU: config, weights (shared, immutable), its plans and RoPE
/// table. Cheap to clone; `Send + Sync`.
#[derive(Debug, Clone)]
pub struct CpuDrafter {
    config: Arc<DrafterConfig>,
    weights: Arc<DrafterWeights>,
    /// The plan-level view; `vocab` is set per block plan (the drafter borrows the target's
    /// embedding and LM head, known at draft time).
    spec: Arc<DraftSpec>,
    ropes: Arc<[RopeTable]>,
    /// The context-append plan. A plan's ops do not depend on its row count (only its costs
    /// do), so one plan serves every `n`.
    context: Arc<Plan>,
    /// The context plan's first op alone (`draft_context`: the fused context).
    fuse: Arc<Plan>,
    /// Block plans by vocabulary size, built on first use (every `b` shares one).
    blocks: Arc<Mutex<HashMap<usize, Arc<Plan>>>>,
}

/// A drafter plan on f32 weights, validated.
fn plan(spec: &DraftSpec, pass: DraftPass) -> Result<Plan, DrafterError> {
    let p = Plan::draft(spec, WeightStorage::cpu(false), pass, 0).map_err(CpuError::from)?;
    p.validate().map_err(CpuError::from)?;
    Ok(p)
}

impl CpuDrafter {
    /// Validates `weights` against `config` (every shape, [`DrafterWeights::check`]) and builds
    /// the context plan and the RoPE table.
    pub fn new(config: DrafterConfig, weights: DrafterWeights) -> Result<Self, DrafterError> {
        weights.check(&config)?;
        let spec = config.draft_spec_dims(weights.fc.cols, 0);
        let context = plan(&spec, DraftPass::Context { n: 1 })?;
        let ropes = context.ropes.iter().map(RopeTable::new).collect();
        let mut fuse = context.clone();
        fuse.ops.truncate(1);
        if !matches!(
            fuse.ops.first().map(|o| &o.kind),
            Some(OpKind::DraftContext(_))
        ) {
            return Err(CpuError::Plan(PlanError::Invalid(
                "a drafter's context plan starts with draft_context".into(),
            ))
            .into());
        }
        Ok(CpuDrafter {
            fuse: Arc::new(fuse),
            config: Arc::new(config),
            weights: Arc::new(weights),
            spec: Arc::new(spec),
            ropes,
            context: Arc::new(context),
            blocks: Arc::default(),
        })
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

    /// The context-append plan (the same ops for any number of tokens).
    pub fn context_plan(&self) -> &Plan {
        &self.context
    }

    /// The block-draft plan for a target of `vocab` tokens (the same ops for any block size).
    pub fn block_plan(&self, vocab: usize) -> Result<Arc<Plan>, DrafterError> {
        let mut blocks = self
            .blocks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(p) = blocks.get(&vocab) {
            return Ok(p.clone());
        }
        let spec = DraftSpec {
            vocab,
            ..(*self.spec).clone()
        };
        let p = Arc::new(plan(&spec, DraftPass::Block { b: MIN_BLOCK_SIZE })?);
        blocks.insert(vocab, p.clone());
        Ok(p)
    }

    /// An empty per-sequence context cache (paged in blocks of [`DEFAULT_BLOCK_SIZE`]
    /// positions).
    pub fn new_cache(&self) -> DraftCache {
        self.new_cache_with_block_size(DEFAULT_BLOCK_SIZE)
    }

    /// [`CpuDrafter::new_cache`] paged in blocks of `block_size` positions (at least 1). The
    /// block size changes where rows are stored, never a draft's result.
    pub fn new_cache_with_block_size(&self, block_size: usize) -> DraftCache {
        let layers = self
            .context
            .layers
            .iter()
            .map(|t| LayerKv::new(t.k_width, t.v_width, t.window, 0, block_size))
            .collect();
        DraftCache {
            kv: vec![KvCache { layers }],
            len: 0,
            s: Scratch::default(),
        }
    }

    /// What the drafter's passes read: its own layers and norms, `fc` / `hidden_norm`, the mask
    /// embedding, and the target's embedding and LM head when the pass embeds tokens.
    fn bound<'a>(
        &'a self,
        plan: &'a Plan,
        embed: Option<&'a Mat>,
        lm_head: Option<&'a Mat>,
    ) -> Bound<'a> {
        let w = &*self.weights;
        Bound {
            plan,
            hidden: self.config.hidden_size,
            ropes: &self.ropes,
            embed,
            lm_head,
            layers: &w.layers,
            rank_layers: None,
            final_norm: &w.norm,
            drafter: Some(DraftTensors {
                fc: &w.fc,
                hidden_norm: &w.hidden_norm,
                mask_embedding: w.mask_embedding.as_deref(),
            }),
            acts: super::Activations::F32,
        }
    }

    /// The fused context `hidden_norm(fc(features))` of `features` (`[n, K·H_t]`, one row per
    /// token): `[n, H]` (the context plan's `draft_context` op alone).
    pub fn fuse(&self, features: &[f32]) -> Result<Vec<f32>, DrafterError> {
        let n = self.feature_rows(features)?;
        let mut kv = [KvCache { layers: Vec::new() }];
        let mut s = Scratch::default();
        let mut segs = [Segment {
            kv: &mut kv,
            start: 0,
            len: n,
        }];
        run_pass(
            &self.bound(&self.fuse, None, None),
            &mut segs,
            &mut s,
            PassInput::Features(features),
            &[],
            &mut [],
        )?;
        Ok(s.h)
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

    fn check_cache(&self, cache: &DraftCache) -> Result<(), DrafterError> {
        let mine = &self.context.layers;
        let same = cache.kv[0].layers.len() == mine.len()
            && cache.kv[0]
                .layers
                .iter()
                .zip(mine.iter())
                .all(|(kv, t)| kv.row_widths() == (t.k_width, t.v_width));
        if same {
            Ok(())
        } else {
            Err(DrafterError::Input(
                "the cache belongs to a different drafter".into(),
            ))
        }
    }

    /// Appends committed context tokens at positions `cache.len() ..`: `features` is
    /// `[n, K·H_t]` (the target's outputs of the `target_layer_ids` layers, concatenated per
    /// token). All-or-nothing: on error the cache is left as it was.
    pub fn append_context(
        &self,
        cache: &mut DraftCache,
        features: &[f32],
    ) -> Result<(), DrafterError> {
        let n = self.feature_rows(features)?;
        if n == 0 {
            return Ok(());
        }
        self.check_cache(cache)?;
        let start = cache.len;
        let r = cache.pass(
            &self.bound(&self.context, None, None),
            PassInput::Features(features),
            n,
        );
        match r {
            Ok(()) => {
                cache.len += n;
                Ok(())
            }
            Err(e) => {
                cache.truncate_layers(start);
                Err(e.into())
            }
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
        let h = c.hidden_size;
        if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
            return Err(DrafterError::Input(format!(
                "block size {block_size} is outside {MIN_BLOCK_SIZE}..={MAX_BLOCK_SIZE}"
            )));
        }
        if embed.cols != h || lm_head.cols != h || embed.rows != lm_head.rows {
            return Err(DrafterError::Input(format!(
                "target embedding [{}, {}] / LM head [{}, {}] do not have the drafter's hidden \
                 size {h} and one vocabulary",
                embed.rows, embed.cols, lm_head.rows, lm_head.cols
            )));
        }
        if x_last as usize >= embed.rows || c.mask_token_id as usize >= embed.rows {
            return Err(DrafterError::Input(format!(
                "token {x_last} or mask token {} is outside the target vocabulary (size {})",
                c.mask_token_id, embed.rows
            )));
        }
        self.check_cache(cache)?;
        let plan = self.block_plan(lm_head.rows)?;
        let mut tokens = [c.mask_token_id; MAX_BLOCK_SIZE];
        tokens[0] = x_last;
        let start = cache.len;
        let r = cache.pass(
            &self.bound(&plan, Some(embed), Some(lm_head)),
            PassInput::Tokens(&tokens[..block_size]),
            block_size,
        );
        // The block's keys and values are transient.
        cache.truncate_layers(start);
        r?;
        let n = (block_size - 1) * lm_head.rows;
        Ok(cache.s.logits[..n].to_vec())
    }
}

/// The drafter's per-sequence state: each layer's context keys/values of the committed tokens
/// (positions `0 .. len()`; sliding layers keep only the suffix they can still see), plus
/// reusable buffers. Only committed context is kept between calls.
#[derive(Debug, Clone)]
pub struct DraftCache {
    /// One rank.
    kv: Vec<KvCache>,
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

    /// One pass of `rows` rows at positions `len ..` (sliding layers compact first).
    fn pass(
        &mut self,
        bound: &Bound<'_>,
        input: PassInput<'_>,
        rows: usize,
    ) -> Result<(), CpuError> {
        for l in &mut self.kv[0].layers {
            l.begin_pass();
        }
        let mut segs = [Segment {
            kv: &mut self.kv,
            start: self.len,
            len: rows,
        }];
        run_pass(bound, &mut segs, &mut self.s, input, &[], &mut [])
    }

    /// Drops every cached row at or after `len` (always a pass's own rows).
    fn truncate_layers(&mut self, len: usize) {
        for l in &mut self.kv[0].layers {
            l.truncate(len);
        }
    }
}
