//! The drafter: loading (z-lab DFlash-1 and MiMo checkpoints), validation against a target,
//! and the CPU drafter it runs on.
//!
//! The forward itself — the context-append and block-draft passes — is the drafter's step plan
//! (`model::plan::Plan::draft`) interpreted by the CPU executor ([`model::cpu::draft`], the same
//! plans the GPU drafter lowers); see there for the math. [`Drafter`] adds the checkpoint
//! loading and the target checks.

use std::path::{Path, PathBuf};

use model::checkpoint::{Checkpoint, CheckpointError};
use model::config::{ConfigError, ModelConfig};
use model::cpu::draft::CpuDrafter;
use model::drafter::tensor_err;
use model::spec::SpecError;
use model::weights::{Attention, Layer, Linear, Mat, Mlp};
use rayon::prelude::*;

use crate::config::DrafterConfig;
/// The drafter's per-sequence context cache (the CPU executor's).
pub use model::cpu::draft::DraftCache;
/// The drafter's weights and errors are model data (`model::drafter`), shared with the GPU
/// drafter; re-exported here at their old paths.
pub use model::drafter::{DrafterError, DrafterWeights};

/// The mask-embedding file of MiMo drafters, converted to safetensors (tensor `embedding`
/// `[hidden_size]`).
pub const MASK_EMBEDDING_FILE: &str = "mask_embedding.safetensors";
/// The mask-embedding file as MiMo ships it (`torch.save` of `{mask_token_id, embedding}`,
/// read by [`crate::torch_pt`]).
pub const MASK_EMBEDDING_PT: &str = "mask_embedding.pt";

/// A drafter ready to run on the CPU (a [`CpuDrafter`]: config, weights, plans, RoPE table).
/// Cheap to clone; `Send + Sync`.
#[derive(Debug, Clone)]
pub struct Drafter {
    cpu: CpuDrafter,
}

impl Drafter {
    /// Validates `weights` against `config` (every shape, [`DrafterWeights::check`]) and builds
    /// the drafter's plans and RoPE table.
    pub fn new(config: DrafterConfig, weights: DrafterWeights) -> Result<Drafter, DrafterError> {
        Ok(Drafter {
            cpu: CpuDrafter::new(config, weights)?,
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
        self.cpu.config()
    }

    pub fn weights(&self) -> &DrafterWeights {
        self.cpu.weights()
    }

    /// The CPU executor's drafter (its plans and passes).
    pub fn cpu(&self) -> &CpuDrafter {
        &self.cpu
    }

    /// Width of one token's context features: `K · H_t`.
    pub fn feature_width(&self) -> usize {
        self.cpu.feature_width()
    }

    /// Checks the drafter against a target config (see [`Drafter::check_dims`]).
    pub fn check_target(&self, target: &ModelConfig) -> Result<(), DrafterError> {
        self.check_dims(target.vocab_size, target.hidden_size, target.layers.len())
    }

    /// Checks the drafter against a target of `vocab` tokens, hidden size `hidden` and
    /// `layers` decoder layers: drafter hidden size = target hidden (the drafter uses the
    /// target's embedding and LM head), `fc` input = K · target hidden, `vocab_size` (if given)
    /// ≤ target vocab, `mask_token_id` < target vocab, every target layer id < `layers`,
    /// `num_target_layers` / `target_hidden_size` (if given) equal to the target's. Errors
    /// name the drafter field.
    pub fn check_dims(
        &self,
        vocab: usize,
        hidden: usize,
        layers: usize,
    ) -> Result<(), DrafterError> {
        self.config()
            .check_target_dims(self.feature_width(), vocab, hidden, layers)
    }

    /// The fused context `hidden_norm(fc(features))` of `features` (`[n, K·H_t]`, one row per
    /// token): `[n, H]`.
    pub fn fuse(&self, features: &[f32]) -> Result<Vec<f32>, DrafterError> {
        self.cpu.fuse(features)
    }

    /// An empty per-sequence context cache (paged like the target's KV cache).
    pub fn new_cache(&self) -> DraftCache {
        self.cpu.new_cache()
    }

    /// [`Drafter::new_cache`] paged in blocks of `block_size` positions (the block size never
    /// changes a draft). See [`CpuDrafter::new_cache_with_block_size`].
    pub fn new_cache_with_block_size(&self, block_size: usize) -> DraftCache {
        self.cpu.new_cache_with_block_size(block_size)
    }

    /// Appends committed context tokens at positions `cache.len() ..`: `features` is
    /// `[n, K·H_t]` (the target's outputs of the `target_layer_ids` layers, concatenated per
    /// token). See [`CpuDrafter::append_context`].
    pub fn append_context(
        &self,
        cache: &mut DraftCache,
        features: &[f32],
    ) -> Result<(), DrafterError> {
        self.cpu.append_context(cache, features)
    }

    /// One draft forward: the block `[x_last, MASK × (block_size − 1)]` at positions
    /// `cache.len() ..` → `(block_size − 1) · V` logits, row `i` predicting the token at
    /// position `cache.len() + 1 + i`. `embed` / `lm_head` are the target's `[V, H]` tables.
    /// The cache is left as it was. See [`CpuDrafter::draft`].
    pub fn draft(
        &self,
        cache: &mut DraftCache,
        embed: &Mat,
        lm_head: &Mat,
        x_last: u32,
        block_size: usize,
    ) -> Result<Vec<f32>, DrafterError> {
        self.cpu.draft(cache, embed, lm_head, x_last, block_size)
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

    /// A `[rows, cols]` weight in its stored dtype: a view of the mapped file (as the target's
    /// weights, `model::weights`).
    fn mat(&self, name: &str, rows: usize, cols: usize) -> Result<Mat, DrafterError> {
        let full = format!("{}{name}", self.prefix);
        model::load::weight_mat(self.ck, &full, rows, cols).map_err(|e| self.spec_err(e))
    }

    /// `gate_proj` then `up_proj` (`[inter, hidden]` each) as one `[2·inter, hidden]` matrix in
    /// the stored dtype: a view when they lie back to back in the file (as `save_file` writes
    /// them), else one copy in the stored dtype.
    fn gate_up(&self, mlp: &str, inter: usize, hidden: usize) -> Result<Mat, DrafterError> {
        let (g, u) = (
            format!("{}{mlp}.gate_proj.weight", self.prefix),
            format!("{}{mlp}.up_proj.weight", self.prefix),
        );
        model::load::gate_up_mat(self.ck, &g, &u, inter, hidden).map_err(|e| self.spec_err(e))
    }

    /// A tensor-level loader error as a [`DrafterError`] naming the tensor.
    fn spec_err(&self, e: SpecError) -> DrafterError {
        match e {
            SpecError::Missing { tensor, expected } => tensor_err(&tensor, expected, "nothing"),
            SpecError::WrongShape {
                tensor,
                expected,
                found,
            }
            | SpecError::WrongDtype {
                tensor,
                expected,
                found,
            } => tensor_err(&tensor, expected, found),
            SpecError::Checkpoint(e) => self.err(e),
        }
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
            Ok(Layer {
                input_norm: r.vector(&format!("{p}.input_layernorm.weight"), h)?,
                attn,
                post_attn_norm: r.vector(&format!("{p}.post_attention_layernorm.weight"), h)?,
                mlp: Mlp::Dense {
                    gate_up: Linear {
                        w: r.gate_up(&format!("{p}.mlp"), inter, h)?,
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
