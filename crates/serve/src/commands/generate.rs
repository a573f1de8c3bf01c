//! `ultra generate` and `ultra score` on the CPU executor or, with `--device cuda`, on the GPU
//! executor (`tilert::exec`: [`load_gpu`] uploads the checkpoint tensor by tensor from the
//! mapped files and keeps no CPU model; the GPU drafter reads the target's device tables).
//! Each command is one function generic over the executor contract ([`model::Executor`]; the
//! speculative one over `dflash::SpecBackend`), run on a CPU session or a GPU session.
//! Loading a checkpoint of [`model::progress::MIN_BYTES`] or more shows its progress on stderr.
//!
//! `generate`: prompt (plain, or through the checkpoint's chat template with `--chat`) → streamed
//! text, then prompt/generated token counts, time to first token and decode tokens/s on stderr.
//! `score`: per-token log-probabilities of a text or of `--token-ids`; entry i of `logprobs` is
//! log p(token i | tokens before it) for i ≥ 1 (entry 0 has no context and is `null`).

use std::io::Write;
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use model::config::ModelConfig;
use model::cpu::CpuModel;
use model::executor::Executor;
use model::progress::{Progress, Reporter};
use model::sampling::{logprob_of, SamplingParams};
use model::tokenizer::{ChatMessage, Tokenizer};

use crate::stream::TokenOutput;

/// A loaded model ready to run on the CPU ([`load`]) or on a GPU ([`load_gpu`],
/// [`Loaded::to_gpu`]).
pub struct Loaded {
    /// The model's config.
    pub config: Arc<ModelConfig>,
    pub tokenizer: Option<Tokenizer>,
    /// The CPU executor (`None` once the model lives on a GPU).
    cpu: Option<CpuModel>,
    /// The weights resident on a GPU (`--device cuda`): `generate` and `score` run there.
    pub gpu: Option<tilert::exec::GpuModel>,
}

/// Positions a GPU sequence of `ultra generate` / `ultra score` can hold (its KV cache size):
/// the model's context, at most this many.
pub const GPU_MAX_SEQ: usize = 8192;

impl Loaded {
    /// Shards the CPU executor over `n` simulated tensor-parallel ranks
    /// ([`CpuModel::tensor_parallel`]).
    pub fn tensor_parallel(&mut self, n: usize) -> Result<()> {
        let sharded = self.cpu()?.tensor_parallel(n)?;
        self.cpu = Some(sharded);
        Ok(())
    }

    /// The CPU executor, or an error when the model was loaded for a GPU.
    pub fn cpu(&self) -> Result<&CpuModel> {
        match &self.cpu {
            Some(m) => Ok(m),
            None => bail!("the model is on the GPU: the CPU executor was not loaded"),
        }
    }

    /// The CPU executor by value (see [`Loaded::cpu`]).
    pub fn into_cpu(self) -> Result<CpuModel> {
        match self.cpu {
            Some(m) => Ok(m),
            None => bail!("the model is on the GPU: the CPU executor was not loaded"),
        }
    }

    /// Uploads the weights to GPU `ordinal`; later `generate` / `score` calls run there, and
    /// the CPU model is dropped.
    pub fn to_gpu(&mut self, ordinal: usize) -> Result<()> {
        let cpu = self.cpu()?;
        let gpu = upload(ordinal, self.config.clone(), cpu.weights())?;
        self.cpu = None;
        self.gpu = Some(gpu);
        Ok(())
    }
}

/// A progress callback for `label` (see [`model::progress`]).
fn reporter(label: String) -> impl FnMut(Progress) {
    let mut r: Option<Reporter> = None;
    move |p| {
        r.get_or_insert_with(|| Reporter::new(label.clone(), p.total))
            .update(p)
    }
}

/// Uploads `weights` to GPU `ordinal`, with progress for a large model.
fn upload(
    ordinal: usize,
    config: Arc<ModelConfig>,
    weights: &model::weights::Weights,
) -> Result<tilert::exec::GpuModel> {
    let t0 = Instant::now();
    let mut progress = reporter("uploading weights".into());
    let gpu = tilert::exec::GpuModel::new_with_progress(ordinal, config, weights, &mut progress)?;
    eprintln!(
        "{}; weights uploaded ({:.2} GB) in {:.2} s",
        gpu.device().info,
        gpu.weight_bytes() as f64 / 1e9,
        t0.elapsed().as_secs_f64()
    );
    Ok(gpu)
}

/// The checkpoint's tokenizer (`tokenizer.json`), if it has one.
pub fn load_tokenizer(dir: &Path) -> Result<Option<Tokenizer>> {
    Ok(if dir.join("tokenizer.json").exists() {
        Some(Tokenizer::from_dir(dir)?)
    } else {
        None
    })
}

/// Loads a checkpoint straight onto GPU `ordinal` (`--device cuda`): the weights are views of
/// the mapped files, uploaded tensor by tensor and released; no CPU model is built.
pub fn load_gpu(dir: &Path, ordinal: usize) -> Result<Loaded> {
    let mut loaded = load_gpu_weights(dir, ordinal)?;
    loaded.tokenizer = load_tokenizer(dir)?;
    Ok(loaded)
}

/// [`load_gpu`] without the tokenizer (for a caller that holds it already: the server).
pub fn load_gpu_weights(dir: &Path, ordinal: usize) -> Result<Loaded> {
    let (config, weights) =
        model::load::load(dir).with_context(|| format!("loading {}", dir.display()))?;
    let config = Arc::new(config);
    let gpu = upload(ordinal, config.clone(), &weights)?;
    drop(weights);
    Ok(Loaded {
        config,
        tokenizer: None,
        cpu: None,
        gpu: Some(gpu),
    })
}

/// Loads weights (checked against the spec) and, when present, the tokenizer.
pub fn load(dir: &Path) -> Result<Loaded> {
    let t0 = Instant::now();
    let mut progress = reporter(format!("reading {}", dir.display()));
    let (config, weights) = model::load::load_with_progress(dir, &mut progress)
        .with_context(|| format!("loading {}", dir.display()))?;
    let config = Arc::new(config);
    let model = super::cpu_model(config.clone(), Arc::new(weights))?;
    let tokenizer = load_tokenizer(dir)?;
    eprintln!(
        "loaded {} ({} layers) in {:.2} s",
        dir.display(),
        model.config().layers.len(),
        t0.elapsed().as_secs_f64()
    );
    Ok(Loaded {
        config,
        tokenizer,
        cpu: Some(model),
        gpu: None,
    })
}

/// What one generation produced.
#[derive(Debug, Clone)]
pub struct Generation {
    pub prompt_tokens: usize,
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish_reason: String,
    pub time_to_first_token_s: f64,
    pub decode_tokens_per_s: f64,
}

/// Prompt token ids: `token_ids` if given, else the prompt text (through the chat template with
/// `chat`).
pub fn prompt_ids(
    loaded: &Loaded,
    prompt: Option<&str>,
    token_ids: Option<&[u32]>,
    chat: bool,
) -> Result<Vec<u32>> {
    if let Some(ids) = token_ids {
        if ids.is_empty() {
            bail!("--token-ids is empty");
        }
        return Ok(ids.to_vec());
    }
    let Some(prompt) = prompt else {
        bail!("give a prompt or --token-ids");
    };
    let Some(tok) = &loaded.tokenizer else {
        bail!("the checkpoint has no tokenizer.json: pass --token-ids");
    };
    let ids = if chat {
        let text = tok.apply_chat_template(&[ChatMessage::user(prompt)], true)?;
        tok.encode(&text, false)?
    } else {
        tok.encode(prompt, true)?
    };
    if ids.is_empty() {
        bail!("the prompt encodes to no tokens");
    }
    Ok(ids)
}

/// The ids that end generation: the tokenizer's EOS ids when it names any, else the config's.
pub fn eos_ids(loaded: &Loaded) -> Vec<u32> {
    eos_ids_of(loaded.tokenizer.as_ref(), &loaded.config)
}

/// [`eos_ids`] of a tokenizer and a config.
pub fn eos_ids_of(tokenizer: Option<&Tokenizer>, config: &ModelConfig) -> Vec<u32> {
    match tokenizer {
        Some(t) if !t.eos_token_ids().is_empty() => t.eos_token_ids().to_vec(),
        _ => config.eos_token_ids.clone(),
    }
}

/// Generates from `ids`, streaming text to `out` as it becomes final (in a new sequence on the
/// model's executor: [`generate_on`]).
pub fn generate(
    loaded: &Loaded,
    ids: &[u32],
    params: &SamplingParams,
    out: &mut dyn Write,
) -> Result<Generation> {
    match &loaded.gpu {
        Some(g) => generate_on(&mut g.session(gpu_max_seq(g))?, loaded, ids, params, out),
        None => generate_on(&mut loaded.cpu()?.session(), loaded, ids, params, out),
    }
}

/// [`generate`] on `session` (empty) of any executor.
pub fn generate_on<E: Executor>(
    session: &mut E,
    loaded: &Loaded,
    ids: &[u32],
    params: &SamplingParams,
    out: &mut dyn Write,
) -> Result<Generation> {
    let tok = loaded.tokenizer.as_ref();
    let mut output = TokenOutput::new(params, &eos_ids(loaded), ids, tok.is_some())?;
    let t0 = Instant::now();
    let mut e = output.sample(&session.prefill(ids)?, tok)?;
    let ttft = t0.elapsed().as_secs_f64();
    let t_decode = Instant::now();
    let finish_reason = loop {
        out.write_all(e.text.as_bytes())?;
        out.flush()?;
        if let Some((reason, _)) = e.finish {
            break reason.as_str().to_string();
        }
        e = output.sample(&session.decode(e.token)?, tok)?;
    };
    let decode_s = t_decode.elapsed().as_secs_f64();
    let tokens = output.tokens().to_vec();
    let decode_steps = tokens.len().saturating_sub(1).max(1);
    Ok(Generation {
        prompt_tokens: ids.len(),
        text: output.text(),
        tokens,
        finish_reason,
        time_to_first_token_s: ttft,
        decode_tokens_per_s: decode_steps as f64 / decode_s.max(1e-9),
    })
}

/// What a speculative generation produced, beyond [`Generation`].
pub struct SpecReport {
    pub generation: Generation,
    pub stats: dflash::AcceptanceStats,
    pub block_size: usize,
}

/// Loads a DFlash drafter for `loaded` and builds the speculative decoder (EOS ids as
/// [`eos_ids`]).
pub fn spec_decoder(
    loaded: &Loaded,
    draft: &Path,
    block_size: Option<usize>,
) -> Result<dflash::SpecDecoder> {
    let drafter = dflash::Drafter::load(draft, &loaded.config)
        .with_context(|| format!("loading drafter {}", draft.display()))?;
    Ok(
        dflash::SpecDecoder::new(loaded.cpu()?, drafter, block_size)?
            .with_eos_token_ids(eos_ids(loaded)),
    )
}

/// Loads a DFlash drafter for `loaded` onto its GPU (`--device cuda`): the device drafter and
/// the loop options (block size: `block_size` or the drafter's; EOS ids as [`eos_ids`]).
pub fn gpu_spec_setup(
    loaded: &Loaded,
    draft: &Path,
    block_size: Option<usize>,
) -> Result<(tilert::draft::GpuDrafter, dflash::SpecOptions)> {
    let Some(gpu) = &loaded.gpu else {
        bail!("the model is not on a GPU");
    };
    let drafter = dflash::Drafter::load(draft, &loaded.config)
        .with_context(|| format!("loading drafter {}", draft.display()))?;
    let block_size = block_size.unwrap_or(drafter.config().block_size);
    if !(dflash::MIN_BLOCK_SIZE..=dflash::MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(dflash::SpecError::BlockSize(block_size).into());
    }
    let gd = tilert::draft::GpuDrafter::new(gpu, drafter.config(), drafter.weights())
        .with_context(|| format!("uploading drafter {}", draft.display()))?;
    let opts = dflash::SpecOptions {
        block_size,
        eos_token_ids: eos_ids(loaded),
        prefill_chunk: None,
    };
    Ok((gd, opts))
}

/// The KV-cache size (positions) of a GPU sequence of `ultra generate` / `ultra score` and of the
/// server's GPU sequences: the model's context, at most [`GPU_MAX_SEQ`]. (The attention kernels
/// split keys by this size, so sequences of the same size compute bit-identical logits.)
pub fn gpu_max_seq(gpu: &tilert::exec::GpuModel) -> usize {
    gpu.config().max_position_embeddings.clamp(1, GPU_MAX_SEQ)
}

/// Generates from `ids` with DFlash block speculation (`draft` = a drafter directory), streaming
/// text to `out`; the output is the same as [`generate`]'s for greedy decoding. On the GPU
/// (`loaded.gpu`) the drafter runs on the device ([`dflash::gpu::GpuSpec`]); else on the CPU
/// ([`dflash::CpuBackend`]); either way [`generate_speculative_on`] runs the loop.
pub fn generate_speculative(
    loaded: &Loaded,
    draft: &Path,
    block_size: Option<usize>,
    ids: &[u32],
    params: &SamplingParams,
    out: &mut dyn Write,
) -> Result<SpecReport> {
    match &loaded.gpu {
        None => {
            let decoder = spec_decoder(loaded, draft, block_size)?;
            let mut session = decoder.model().session();
            let mut backend = dflash::CpuBackend::new(&mut session, decoder.drafter())?;
            generate_speculative_on(&mut backend, decoder.options(), loaded, ids, params, out)
        }
        Some(gpu) => {
            let (drafter, opts) = gpu_spec_setup(loaded, draft, block_size)?;
            let mut session = gpu.session(gpu_max_seq(gpu))?;
            let mut backend = dflash::gpu::GpuSpec::new(&mut session, &drafter)?;
            generate_speculative_on(&mut backend, &opts, loaded, ids, params, out)
        }
    }
}

/// [`generate_speculative`] on `backend` (empty) of any device, with the loop options `opts`.
pub fn generate_speculative_on<B: dflash::SpecBackend>(
    backend: &mut B,
    opts: &dflash::SpecOptions,
    loaded: &Loaded,
    ids: &[u32],
    params: &SamplingParams,
    out: &mut dyn Write,
) -> Result<SpecReport> {
    // Stops (EOS, stop strings, length) are applied to the streamed text by the same
    // TokenOutput as plain generation; the speculative loop also knows EOS and max tokens.
    let tok = loaded.tokenizer.as_ref();
    let mut output = TokenOutput::new(params, &eos_ids(loaded), ids, tok.is_some())?;
    let mut reason = String::from("length");
    let mut failure = None;
    let t0 = Instant::now();
    let mut first = None;
    let mut on_token = |token| {
        first.get_or_insert_with(|| t0.elapsed().as_secs_f64());
        let step = output.push(token, tok).and_then(|e| {
            out.write_all(e.text.as_bytes())?;
            out.flush()?;
            Ok(e.finish)
        });
        match step {
            Ok(None) => ControlFlow::Continue(()),
            Ok(Some((r, _))) => {
                reason = r.as_str().to_string();
                ControlFlow::Break(())
            }
            Err(e) => {
                failure = Some(e);
                ControlFlow::Break(())
            }
        }
    };
    let out_spec = dflash::run_speculative(backend, opts, ids, params, &mut on_token, &mut |_| {})?;
    if let Some(e) = failure {
        return Err(e);
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let ttft = first.unwrap_or(elapsed);
    let n = out_spec.tokens.len();
    if out_spec.stop_cause.is_some() {
        reason = out_spec.finish_reason().as_str().to_string();
    }
    Ok(SpecReport {
        generation: Generation {
            prompt_tokens: ids.len(),
            text: output.text(),
            tokens: out_spec.tokens,
            finish_reason: reason,
            time_to_first_token_s: ttft,
            decode_tokens_per_s: n.saturating_sub(1).max(1) as f64 / (elapsed - ttft).max(1e-9),
        },
        stats: out_spec.stats,
        block_size: opts.block_size,
    })
}

/// log p(token i | tokens before it) for every i ≥ 1, from one full pass (in a new sequence on
/// the model's executor: [`score_on`]).
pub fn score(loaded: &Loaded, ids: &[u32]) -> Result<Vec<Option<f64>>> {
    match &loaded.gpu {
        Some(g) => score_on(&mut g.session(gpu_max_seq(g))?, ids),
        None => score_on(&mut loaded.cpu()?.session(), ids),
    }
}

/// [`score`] on `session` (empty) of any executor: one [`Executor::forward`] of `ids`.
pub fn score_on<E: Executor>(session: &mut E, ids: &[u32]) -> Result<Vec<Option<f64>>> {
    let logits = session.forward(ids, &[])?.logits;
    let mut out = vec![None];
    for i in 1..ids.len() {
        out.push(Some(logprob_of(&logits[i - 1], ids[i])));
    }
    Ok(out)
}
