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
    /// The weights sharded over tensor-parallel GPU ranks (`--device cuda --tensor-parallel N`).
    pub tp: Option<TpLoaded>,
    /// The GPU engine of `generate` / `score` sequences (`--engine`).
    pub engine: Engine,
}

/// Which GPU engine runs a sequence's decode steps (`--engine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Engine {
    /// A kernel per op, replayed as CUDA graphs (`tilert::exec`).
    #[default]
    Graph,
    /// One resident kernel per decode step (`tilert::persistent`); prefill on the graph executor.
    Persistent,
}

impl Engine {
    /// The engine of `--engine NAME` for a run on `cuda` (or not) with `ranks` tensor-parallel
    /// ranks: the persistent engine runs one unsharded model on one GPU.
    pub fn select(persistent: bool, cuda: bool, ranks: usize) -> Result<Engine> {
        if !persistent {
            return Ok(Engine::Graph);
        }
        if !cuda {
            bail!("--engine persistent runs on a GPU: add --device cuda");
        }
        if ranks > 1 {
            bail!("--engine persistent runs one GPU (no --tensor-parallel)");
        }
        Ok(Engine::Persistent)
    }
}

/// The error of a run the persistent engine does not support (`what` names it).
pub fn persistent_unsupported(what: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "--engine persistent: {what} is not supported by the persistent engine yet (it runs \
         plain decoding of one sequence); use --engine graph"
    )
}

/// A new sequence of `g` on the persistent engine (says on stderr what runs where).
pub fn persistent_session(
    g: &tilert::exec::GpuModel,
) -> Result<tilert::persistent::PersistentSession> {
    let s = tilert::persistent::PersistentSession::new(g, gpu_max_seq(g))
        .context("--engine persistent")?;
    eprintln!("engine: {}", s.engine());
    Ok(s)
}

/// A model sharded over tensor-parallel GPU ranks ([`tilert::exec::tp`]) and the host views of
/// its embedding and LM head (a DFlash drafter runs on the host against a TP target and reads
/// them: `dflash::WithTables`).
pub struct TpLoaded {
    pub model: tilert::exec::tp::TpModel,
    pub embed: model::weights::Mat,
    pub lm_head: model::weights::Mat,
}

impl TpLoaded {
    /// A new sequence of [`tp_max_seq`] positions.
    pub fn session(&self) -> Result<tilert::exec::tp::TpSession> {
        Ok(self.model.session(tp_max_seq(&self.model))?)
    }
}

/// Where `--tensor-parallel N [--devices A,B,..] [--virtual-ranks]` puts the ranks, checked before
/// anything loads: `None` for an unsharded model (or the CPU's simulated ranks, `cuda` false),
/// else the GPU of each rank — one GPU per rank (`--devices`, default `0..N`) or every rank on one
/// GPU (`--virtual-ranks`: the first `--devices` entry, default 0). Contradictory flags are an
/// error naming them.
pub fn tp_placement(
    ranks: usize,
    cuda: bool,
    devices: Option<&[usize]>,
    virtual_ranks: bool,
) -> Result<Option<tilert::exec::tp::RankPlacement>> {
    use tilert::exec::tp::RankPlacement;
    if ranks == 0 {
        bail!("--tensor-parallel must be at least 1");
    }
    if !cuda {
        if devices.is_some() || virtual_ranks {
            bail!("--devices and --virtual-ranks place GPU ranks: add --device cuda");
        }
        return Ok(None);
    }
    if let Some(d) = devices {
        if d.is_empty() {
            bail!("--devices is empty");
        }
    }
    if virtual_ranks {
        if ranks == 1 {
            bail!("--virtual-ranks needs --tensor-parallel N with N > 1");
        }
        if devices.is_some_and(|d| d.len() > 1) {
            bail!("--virtual-ranks runs every rank on one GPU: give at most one --devices entry");
        }
        let device = devices.and_then(|d| d.first().copied()).unwrap_or(0);
        return Ok(Some(RankPlacement::Virtual { device }));
    }
    match devices {
        Some(d) if d.len() != ranks && ranks > 1 => bail!(
            "--devices lists {} GPU(s) for --tensor-parallel {ranks}: one GPU per rank (or \
             --virtual-ranks to run every rank on one GPU)",
            d.len()
        ),
        Some(d) if d.len() > 1 && ranks == 1 => bail!(
            "--devices lists {} GPUs for one rank: add --tensor-parallel {}",
            d.len(),
            d.len()
        ),
        _ => {}
    }
    if ranks == 1 {
        return Ok(None);
    }
    let d = devices.map_or_else(|| (0..ranks).collect(), <[usize]>::to_vec);
    // Duplicates are refused here too, before anything loads.
    RankPlacement::Devices(d.clone()).ordinals(ranks)?;
    Ok(Some(RankPlacement::Devices(d)))
}

/// How `--tensor-parallel N` and `--expert-parallel[=N]` split the model (one rank: unsharded):
/// tensor parallelism over N; with `--expert-parallel` (no value) the MoE layers' experts placed
/// whole on those N ranks, attention tensor-parallel; `--expert-parallel=N` alone: experts over N
/// ranks, attention and dense MLPs replicated on each. `expert_parallel` is `Some(0)` for the
/// flag without a value.
pub fn parallelism(
    tensor_parallel: usize,
    expert_parallel: Option<usize>,
) -> Result<model::plan::tp::Parallelism> {
    use model::plan::tp::Parallelism;
    if tensor_parallel == 0 {
        bail!("--tensor-parallel must be at least 1");
    }
    Ok(match expert_parallel {
        None => Parallelism::tensor(tensor_parallel),
        Some(0) if tensor_parallel > 1 => Parallelism::tensor_expert(tensor_parallel),
        Some(0) => bail!(
            "--expert-parallel needs a rank count: --tensor-parallel N --expert-parallel (experts \
             over the N ranks, attention tensor-parallel), or --expert-parallel=N (attention \
             replicated on every rank)"
        ),
        Some(n) if tensor_parallel > 1 && n != tensor_parallel => bail!(
            "--expert-parallel={n} with --tensor-parallel {tensor_parallel}: experts and \
             attention share the ranks, give one count (or --expert-parallel without a value)"
        ),
        Some(n) if tensor_parallel > 1 => Parallelism::tensor_expert(n),
        Some(n) => Parallelism::expert(n),
    })
}

/// Positions of a tensor-parallel GPU sequence (as [`gpu_max_seq`]).
pub fn tp_max_seq(m: &tilert::exec::tp::TpModel) -> usize {
    m.config().max_position_embeddings.clamp(1, GPU_MAX_SEQ)
}

/// Loads a checkpoint sharded over `ranks` tensor-parallel ranks on the GPUs of `placement`
/// (`--device cuda --tensor-parallel N [--devices ..] [--virtual-ranks]`). The weights are
/// views of the mapped files, sliced per rank and uploaded; every setup error (heads or FFNs
/// that do not split, fewer GPUs than asked, no peer access) is reported before or instead of a
/// half-built model.
pub fn load_gpu_tp(
    dir: &Path,
    opts: tilert::exec::tp::TpOptions,
    placement: &tilert::exec::tp::RankPlacement,
) -> Result<Loaded> {
    let (ranks, par) = (opts.parallelism.ranks, opts.parallelism);
    // Virtual ranks spin on one GPU waiting for each other: their streams need hardware queues
    // of their own, set before the first CUDA call.
    comm::symmetric::prepare_virtual_ranks();
    let (config, weights) =
        model::load::load(dir).with_context(|| format!("loading {}", dir.display()))?;
    let config = Arc::new(config);
    let t0 = Instant::now();
    let mut progress = reporter("uploading weight shards".into());
    let tp =
        tilert::exec::tp::TpModel::build(config.clone(), &weights, opts, placement, &mut progress)
            .with_context(|| par.to_string())?;
    if let Some(note) = tp.all_reduce_note() {
        eprintln!("note: {note}");
    }
    let (gpus, what) = match placement {
        tilert::exec::tp::RankPlacement::Virtual { device } => {
            (format!("GPU {device}"), "virtual ranks on one GPU")
        }
        tilert::exec::tp::RankPlacement::Devices(d) => (
            format!(
                "GPUs {}",
                d.iter().map(usize::to_string).collect::<Vec<_>>().join(",")
            ),
            "one rank per GPU",
        ),
    };
    eprintln!(
        "{par}: {ranks} ranks on {gpus} ({what}, {} all-reduce); {} ({:.2} GB of weights over \
         all ranks) uploaded in {:.2} s",
        tp.all_reduce(),
        tp.rank(0).device().info,
        tp.weight_bytes() as f64 / 1e9,
        t0.elapsed().as_secs_f64()
    );
    Ok(Loaded {
        config,
        tokenizer: load_tokenizer(dir)?,
        cpu: None,
        gpu: None,
        tp: Some(TpLoaded {
            model: tp,
            embed: weights.embed.clone(),
            lm_head: weights.lm_head.clone(),
        }),
        engine: Engine::Graph,
    })
}

/// Positions a GPU sequence of `ultra generate` / `ultra score` can hold (its KV cache size):
/// the model's context, at most this many.
pub const GPU_MAX_SEQ: usize = 8192;

impl Loaded {
    /// Shards the CPU executor over `n` simulated tensor-parallel ranks
    /// ([`CpuModel::tensor_parallel`]).
    pub fn tensor_parallel(&mut self, n: usize) -> Result<()> {
        self.parallel(model::plan::tp::Parallelism::tensor(n))
    }

    /// Splits the CPU executor over simulated ranks as `par` says ([`CpuModel::parallel`]:
    /// tensor and/or expert parallelism).
    pub fn parallel(&mut self, par: model::plan::tp::Parallelism) -> Result<()> {
        let sharded = self.cpu()?.parallel(par)?;
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
        tp: None,
        engine: Engine::Graph,
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
        tp: None,
        engine: Engine::Graph,
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
    if let Some(tp) = &loaded.tp {
        return generate_on(&mut tp.session()?, loaded, ids, params, out);
    }
    match &loaded.gpu {
        Some(g) if loaded.engine == Engine::Persistent => {
            generate_on(&mut persistent_session(g)?, loaded, ids, params, out)
        }
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
    /// With adaptive speculation: what it chose.
    pub adaptive: Option<dflash::AdaptSummary>,
    /// Plain steps adaptive speculation chose (not counted in `stats`).
    pub plain_steps: u64,
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

/// Loads a DFlash drafter for a tensor- or expert-parallel target (`loaded.tp`) onto rank 0's
/// GPU (it reads rank 0's captured hidden states and uses rank 0's embedding and LM head, which
/// every rank replicates) and the loop options (block size: `block_size` or the drafter's; EOS
/// ids as [`eos_ids`]).
pub fn tp_spec_setup(
    loaded: &Loaded,
    draft: &Path,
    block_size: Option<usize>,
) -> Result<(tilert::draft::GpuDrafter, dflash::SpecOptions)> {
    let Some(tp) = &loaded.tp else {
        bail!("the model is not on tensor-parallel GPU ranks");
    };
    let drafter = dflash::Drafter::load(draft, &loaded.config)
        .with_context(|| format!("loading drafter {}", draft.display()))?;
    let block_size = block_size.unwrap_or(drafter.config().block_size);
    if !(dflash::MIN_BLOCK_SIZE..=dflash::MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(dflash::SpecError::BlockSize(block_size).into());
    }
    let rank0 = tp.model.rank(0);
    rank0.device().ctx.bind_to_thread()?;
    let gd = tilert::draft::GpuDrafter::new(rank0, drafter.config(), drafter.weights())
        .with_context(|| format!("uploading drafter {} to rank 0's GPU", draft.display()))?;
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
/// (`loaded.gpu`, or rank 0 of `loaded.tp`) the drafter runs on the device
/// ([`dflash::gpu::GpuSpec`], [`dflash::gpu::GpuTpSpec`]); else on the CPU
/// ([`dflash::CpuBackend`]); either way [`generate_speculative_on`] runs the loop.
pub fn generate_speculative(
    loaded: &Loaded,
    draft: &Path,
    block_size: Option<usize>,
    ids: &[u32],
    params: &SamplingParams,
    out: &mut dyn Write,
) -> Result<SpecReport> {
    generate_speculative_with(
        loaded,
        draft,
        block_size,
        dflash::BlockPolicy::Fixed,
        ids,
        params,
        out,
    )
}

/// [`generate_speculative`] with a block policy: [`dflash::BlockPolicy::Adaptive`] chooses each
/// round's block size (at most `block_size`) or no drafts by measured acceptance and cost
/// ([`SpecReport::adaptive`] says what it chose; the output is the same).
pub fn generate_speculative_with(
    loaded: &Loaded,
    draft: &Path,
    block_size: Option<usize>,
    policy: dflash::BlockPolicy,
    ids: &[u32],
    params: &SamplingParams,
    out: &mut dyn Write,
) -> Result<SpecReport> {
    if loaded.engine == Engine::Persistent {
        return Err(persistent_unsupported(
            "speculative decoding (--draft; the default model drafts unless --no-draft)",
        ));
    }
    if let Some(tp) = &loaded.tp {
        let (drafter, opts) = tp_spec_setup(loaded, draft, block_size)?;
        let mut session = tp.session()?;
        let mut backend = dflash::gpu::GpuTpSpec::new(&mut session, &drafter)?;
        return generate_speculative_on(&mut backend, &opts, policy, loaded, ids, params, out);
    }
    match &loaded.gpu {
        None => {
            let decoder = spec_decoder(loaded, draft, block_size)?;
            let mut session = decoder.model().session();
            let mut backend = dflash::CpuBackend::new(&mut session, decoder.drafter())?;
            let opts = decoder.options();
            generate_speculative_on(&mut backend, opts, policy, loaded, ids, params, out)
        }
        Some(gpu) => {
            let (drafter, opts) = gpu_spec_setup(loaded, draft, block_size)?;
            let mut session = gpu.session(gpu_max_seq(gpu))?;
            let mut backend = dflash::gpu::GpuSpec::new(&mut session, &drafter)?;
            generate_speculative_on(&mut backend, &opts, policy, loaded, ids, params, out)
        }
    }
}

/// [`generate_speculative`] on `backend` (empty) of any device, with the loop options `opts`.
pub fn generate_speculative_on<B: dflash::SpecBackend>(
    backend: &mut B,
    opts: &dflash::SpecOptions,
    policy: dflash::BlockPolicy,
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
    let mut on_token = |token, _: Option<&[f32]>| {
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
    let out_spec = dflash::run_speculative_with(
        backend,
        opts,
        policy,
        ids,
        params,
        false,
        &mut on_token,
        &mut |_| {},
    )?;
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
        adaptive: out_spec.adaptive,
        plain_steps: out_spec.plain_steps,
    })
}

/// log p(token i | tokens before it) for every i ≥ 1, from one full pass (in a new sequence on
/// the model's executor: [`score_on`]).
pub fn score(loaded: &Loaded, ids: &[u32]) -> Result<Vec<Option<f64>>> {
    if let Some(tp) = &loaded.tp {
        return score_on(&mut tp.session()?, ids);
    }
    match &loaded.gpu {
        Some(g) if loaded.engine == Engine::Persistent => {
            score_by_steps(&mut persistent_session(g)?, ids)
        }
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

/// [`score_on`] one token at a time: the first token as a prefill, every later one as a decode
/// step (the persistent engine runs decode steps only), the logits of position i − 1 scoring
/// token i.
pub fn score_by_steps<E: Executor>(session: &mut E, ids: &[u32]) -> Result<Vec<Option<f64>>> {
    let mut out = vec![None];
    let Some((&first, rest)) = ids.split_first() else {
        return Ok(Vec::new());
    };
    let mut logits = session.prefill(&[first])?.into_owned();
    for (i, &t) in rest.iter().enumerate() {
        out.push(Some(logprob_of(&logits, t)));
        if i + 1 < rest.len() {
            logits = session.decode(t)?.into_owned();
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use tilert::exec::tp::RankPlacement;

    use super::{parallelism, tp_placement};
    use model::plan::tp::Parallelism;

    #[test]
    fn parallelism_flags() {
        assert_eq!(parallelism(1, None).unwrap(), Parallelism::tensor(1));
        assert_eq!(parallelism(4, None).unwrap(), Parallelism::tensor(4));
        assert_eq!(
            parallelism(4, Some(0)).unwrap(),
            Parallelism::tensor_expert(4)
        );
        assert_eq!(
            parallelism(4, Some(4)).unwrap(),
            Parallelism::tensor_expert(4)
        );
        assert_eq!(parallelism(1, Some(2)).unwrap(), Parallelism::expert(2));
        let err = |r: anyhow::Result<Parallelism>| r.unwrap_err().to_string();
        assert!(err(parallelism(1, Some(0))).contains("needs a rank count"));
        assert!(err(parallelism(2, Some(4))).contains("give one count"));
        assert!(err(parallelism(0, None)).contains("at least 1"));
    }

    fn err(r: anyhow::Result<Option<RankPlacement>>) -> String {
        format!("{:#}", r.unwrap_err())
    }

    #[test]
    fn tp_flags_place_ranks_or_name_the_conflict() {
        assert_eq!(tp_placement(1, false, None, false).unwrap(), None);
        assert_eq!(tp_placement(4, false, None, false).unwrap(), None);
        assert_eq!(tp_placement(1, true, Some(&[0]), false).unwrap(), None);
        assert_eq!(
            tp_placement(2, true, None, false).unwrap(),
            Some(RankPlacement::Devices(vec![0, 1]))
        );
        assert_eq!(
            tp_placement(2, true, Some(&[3, 1]), false).unwrap(),
            Some(RankPlacement::Devices(vec![3, 1]))
        );
        assert_eq!(
            tp_placement(4, true, None, true).unwrap(),
            Some(RankPlacement::Virtual { device: 0 })
        );
        assert_eq!(
            tp_placement(4, true, Some(&[2]), true).unwrap(),
            Some(RankPlacement::Virtual { device: 2 })
        );
        assert!(err(tp_placement(0, true, None, false)).contains("at least 1"));
        assert!(err(tp_placement(2, false, Some(&[0, 1]), false)).contains("add --device cuda"));
        assert!(err(tp_placement(2, false, None, true)).contains("add --device cuda"));
        assert!(err(tp_placement(1, true, None, true)).contains("N > 1"));
        assert!(err(tp_placement(2, true, Some(&[0, 1]), true)).contains("at most one"));
        let e = err(tp_placement(4, true, Some(&[0, 1]), false));
        assert!(
            e.contains("--devices lists 2 GPU(s) for --tensor-parallel 4"),
            "{e}"
        );
        assert!(err(tp_placement(1, true, Some(&[0, 1]), false)).contains("--tensor-parallel 2"));
        assert!(err(tp_placement(2, true, Some(&[1, 1]), false)).contains("GPU 1 is listed twice"));
        assert!(err(tp_placement(2, true, Some(&[]), false)).contains("empty"));
    }
}
