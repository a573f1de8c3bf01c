//! The `ultra` command-line tool.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::{Parser, Subcommand, ValueEnum};
use serve::commands;

#[derive(Parser)]
#[command(name = "ultra", version, about = "Ultra: low-latency MoE inference")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// CPU executor: how MXFP4 experts take activations. `q8` (default): int8 per block of 32
    /// and integer dot products (AVX-512-VNNI / AVX2; deterministic, bounded error, see README);
    /// `f32`: exact f32 activations (the reference the goldens and GPU tests use).
    #[arg(long, global = true, default_value = "q8")]
    activations: model::cpu::Activations,
}

/// Where to run.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Device {
    Cpu,
    Cuda,
}

/// The GPU engine of the decode steps (`--engine`).
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum EngineArg {
    /// A kernel per op, replayed as CUDA graphs.
    Graph,
    /// One resident kernel per decode step (gpt-oss-style models, plain decoding of one
    /// sequence; prefill runs on the graph executor).
    Persistent,
}

/// The default engine: `graph` until the persistent engine is measured faster (BENCHMARKS.md).
const ENGINE_DEFAULT: EngineArg = EngineArg::Graph;

/// Model and prompt arguments shared by `generate` and `score`.
#[derive(clap::Args)]
struct ModelArgs {
    /// Checkpoint directory (config.json, *.safetensors, tokenizer.json). Default: the embedded
    /// ultra-tiny-code model (and, for `generate`, its DFlash drafter).
    #[arg(long)]
    model: Option<PathBuf>,
    /// `cpu` (the reference executor) or `cuda` (the GPU executor on GPU 0, or the GPU of
    /// --devices; with --tensor-parallel N, N GPU ranks).
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    device: Device,
    /// With --device cuda, the engine of the decode steps: `graph` (a kernel per op, CUDA
    /// graphs) or `persistent` (one resident kernel per step: gpt-oss-style models, plain
    /// decoding; prefill runs on the graph executor). Unsupported models or modes are an error.
    #[arg(long, value_enum, default_value_t = ENGINE_DEFAULT)]
    engine: EngineArg,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Comma-separated token ids instead of a text prompt.
    #[arg(long, value_delimiter = ',')]
    token_ids: Option<Vec<u32>>,
    #[command(flatten)]
    par: ParallelArgs,
}

/// Tensor parallelism: how many ranks and where they run.
#[derive(clap::Args)]
struct ParallelArgs {
    /// Run the step plan sharded over N tensor-parallel ranks: attention by KV-head group, FFNs
    /// along the intermediate dimension, an all-reduce after each block. On the CPU the ranks
    /// are simulated in this process; with --device cuda each rank is a GPU (--devices) or all
    /// of them share one (--virtual-ranks), joined by the one-shot NVLink/peer all-reduce.
    /// Logits equal the unsharded model's up to f32 summation order.
    #[arg(long, default_value_t = 1)]
    tensor_parallel: usize,
    /// Expert parallelism: the routed experts of every MoE layer placed whole on the ranks
    /// (contiguous id ranges; the expert count must divide by the ranks). With --tensor-parallel
    /// N: over those N ranks, attention staying tensor-parallel (vLLM's
    /// --enable-expert-parallel). `--expert-parallel=N` alone: N ranks with attention and dense
    /// MLPs replicated on each. Tokens need no dispatch (every rank holds the replicated residual
    /// stream and routing); the combine is the all-reduce after the experts.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "0", value_name = "N")]
    expert_parallel: Option<usize>,
    /// The all-reduce between GPU ranks: `auto` (the one-shot peer-memory kernel with the
    /// residual add and next RMSNorm fused; NCCL, with a printed note, where two GPUs have no
    /// peer access), `oneshot`, or `nccl` (NCCL's all-reduce then the residual add and norm:
    /// the reference and fallback; one GPU per rank).
    #[arg(long, value_enum, default_value_t = AllReduceArg::Auto)]
    all_reduce: AllReduceArg,
    /// GPUs of the ranks, one per rank (default 0,1,..,N-1); with --virtual-ranks the one GPU
    /// every rank runs on; without --tensor-parallel the GPU to run on.
    #[arg(long, value_delimiter = ',')]
    devices: Option<Vec<usize>>,
    /// Put every tensor-parallel rank on one GPU (separate weights shards, buffers, streams and
    /// flags): the multi-GPU protocol on a single GPU, for testing and single-GPU benchmarks.
    #[arg(long)]
    virtual_ranks: bool,
}

/// `--all-reduce`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum AllReduceArg {
    Auto,
    Oneshot,
    Nccl,
}

impl ParallelArgs {
    /// How the model is split (one rank: unsharded).
    fn split(&self) -> Result<model::plan::tp::Parallelism> {
        commands::generate::parallelism(self.tensor_parallel, self.expert_parallel)
    }

    /// Ranks of the split (1: unsharded).
    fn ranks(&self) -> Result<usize> {
        Ok(self.split()?.ranks)
    }

    /// The split and the all-reduce for GPU ranks.
    fn tp_options(&self) -> Result<tilert::exec::tp::TpOptions> {
        use tilert::exec::tp::AllReduceKind;
        Ok(tilert::exec::tp::TpOptions {
            parallelism: self.split()?,
            all_reduce: match self.all_reduce {
                AllReduceArg::Auto => AllReduceKind::Auto,
                AllReduceArg::Oneshot => AllReduceKind::OneShot,
                AllReduceArg::Nccl => AllReduceKind::Nccl,
            },
        })
    }

    /// The rank placement (`None`: unsharded, or the CPU's simulated ranks), checked before
    /// anything loads.
    fn placement(&self, device: Device) -> Result<Option<tilert::exec::tp::RankPlacement>> {
        if self.all_reduce != AllReduceArg::Auto && device != Device::Cuda {
            bail!("--all-reduce chooses the collective between GPU ranks: add --device cuda");
        }
        commands::generate::tp_placement(
            self.ranks()?,
            device == Device::Cuda,
            self.devices.as_deref(),
            self.virtual_ranks,
        )
    }

    /// The GPU of an unsharded `--device cuda` run.
    fn ordinal(&self) -> usize {
        self.devices
            .as_ref()
            .and_then(|d| d.first().copied())
            .unwrap_or(0)
    }
}

/// `ultra bench-serve --workload` of the shared-prefix run (`commands::bench_prefix`), which is
/// not a `--streams` sweep workload.
const SHARED_PREFIX: &str = "shared-prefix";

/// What `serve` and `bench-serve` load and how they schedule.
#[derive(clap::Args)]
struct ServeArgs {
    /// Checkpoint directory (config.json, *.safetensors, tokenizer.json). Default: the embedded
    /// ultra-tiny-code model with its DFlash drafter.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Instead of --model: the synthetic ~100M-parameter gpt-oss-style MoE of `bench-decode`
    /// (random MXFP4 experts, no tokenizer: token ids only).
    #[arg(long, conflicts_with_all = ["model", "draft"])]
    synthetic: bool,
    /// Instead of --model: a model of this config.json's dimensions with random weights
    /// generated on the GPU (--device cuda; e.g. fixtures/configs/gpt-oss-20b.json; token ids
    /// only, no EOS).
    #[arg(long, value_name = "CONFIG", conflicts_with_all = ["model", "draft", "synthetic"])]
    synthetic_config: Option<PathBuf>,
    /// With --synthetic-config: every request decodes speculatively with a synthetic drafter
    /// whose rounds accept this acceptance length τ on average (controlled acceptance: the real
    /// draft forward and batched verify run, the verdict is drawn; the tokens are not the
    /// target's). For `bench-serve --streams N --compare-draft` against plain decoding.
    #[arg(long, value_name = "TAU", requires = "synthetic_config")]
    controlled_tau: Option<f64>,
    /// Layers of the --controlled-tau drafter (z-lab shape).
    #[arg(long, default_value_t = 5, requires = "controlled_tau")]
    controlled_draft_layers: usize,
    /// A DFlash drafter directory: every request decodes speculatively.
    #[arg(long)]
    draft: Option<PathBuf>,
    /// With the default model: no speculative decoding (its drafter is used otherwise).
    #[arg(long, conflicts_with_all = ["draft", "synthetic"])]
    no_draft: bool,
    /// Speculation block size 2..=16 (default: the drafter's); with adaptive speculation the
    /// largest block a request may choose.
    #[arg(long)]
    block_size: Option<usize>,
    /// Every round drafts the full block. Default: adaptive speculation — each request picks
    /// its block size, or plain steps without drafts, by its measured acceptance and the
    /// measured cost of a round vs a plain step (same output either way).
    #[arg(long)]
    fixed_block: bool,
    /// `cpu` (the reference executor, batched decode) or `cuda` (the GPU executor on GPU 0,
    /// batched decode: one pass per 16 running sequences each step; with --draft the drafter
    /// runs on the GPU too).
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    device: Device,
    /// The GPU engine: `graph`, or `persistent` (not for serving yet: the server batches
    /// sequences, which the persistent engine does not run; an error).
    #[arg(long, value_enum, default_value_t = ENGINE_DEFAULT)]
    engine: EngineArg,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// The model's name in the APIs (default: the last two path components of --model).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Most sequences decoded together.
    #[arg(long, default_value_t = 16)]
    max_running: usize,
    /// Most requests waiting for admission (more get RESOURCE_EXHAUSTED / HTTP 429).
    #[arg(long, default_value_t = 256)]
    max_waiting: usize,
    /// KV-cache budget in MiB. CPU: a pool of --kv-block-size blocks; a request is admitted
    /// when the blocks of its uncached prompt are free and takes more as it decodes (preempted
    /// and recomputed when they run out); speculative requests reserve prompt + max_tokens at
    /// admission. GPU: each request reserves one whole sequence's device memory.
    #[arg(long, default_value_t = 4096)]
    kv_cache_mib: u64,
    /// Context limit per request (default: the model's; on the GPU at most 8192 unless given:
    /// every GPU sequence holds this many positions).
    #[arg(long)]
    max_model_len: Option<usize>,
    /// Tokens one scheduler step may run: the running sequences' decode tokens first, the rest
    /// prefills waiting prompts in chunks (chunked prefill; at least one chunk per step).
    #[arg(long, default_value_t = serve::engine::DEFAULT_MAX_BATCHED_TOKENS)]
    max_num_batched_tokens: usize,
    #[command(flatten)]
    par: ParallelArgs,
    /// Positions per KV-cache block (the CPU executor's paged KV; vLLM's --block-size).
    /// --kv-cache-mib is divided into blocks of this size; admission and kv_cache_usage_perc
    /// count blocks.
    #[arg(long, default_value_t = serve::engine::DEFAULT_KV_BLOCK_SIZE as u64,
          value_parser = clap::value_parser!(u64).range(1..=serve::engine::MAX_KV_BLOCK_SIZE as u64))]
    kv_block_size: u64,
    /// No automatic prefix caching (by default a request reuses the cached KV blocks of the
    /// longest prefix of its prompt that an earlier request computed; CPU executor).
    #[arg(long)]
    no_prefix_caching: bool,
}

/// The front door of `ultra serve`: limits, timeouts and who may call.
#[derive(clap::Args)]
struct FrontArgs {
    /// On SIGTERM / SIGINT, seconds running requests get to finish; then they end with
    /// finish_reason "abort" and the process exits 0. A second signal exits at once.
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    shutdown_timeout: u64,
    /// Seconds a request's headers (HTTP) or a new connection's first call (gRPC) may take.
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    header_read_timeout: u64,
    /// Seconds a request body may take to arrive in full (both APIs).
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    body_read_timeout: u64,
    /// Seconds a connection with no request in flight stays open (HTTP keep-alive, gRPC).
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    idle_timeout: u64,
    /// Open connections over both ports (more are refused: HTTP 503, gRPC closed). Default:
    /// the open-file limit (raised to its hard limit at start) less a reserve, at most 10000.
    #[arg(long)]
    max_connections: Option<usize>,
    /// Largest request body in bytes (HTTP JSON body, gRPC message).
    #[arg(long, default_value_t = 4 << 20, value_name = "BYTES")]
    max_request_bytes: usize,
    /// Require `Authorization: Bearer KEY` (HTTP) / `authorization: Bearer KEY` metadata
    /// (gRPC); /health, /metrics and gRPC health are exempt. Also from ULTRA_API_KEY.
    #[arg(long, value_name = "KEY")]
    api_key: Option<String>,
    /// Browser origins allowed cross-origin access (comma-separated, `*` for any). Default:
    /// none (requests carrying another Origin get 403).
    #[arg(long, value_delimiter = ',', value_name = "ORIGINS")]
    allowed_origins: Vec<String>,
}

impl FrontArgs {
    fn options(
        self,
        grpc_addr: std::net::SocketAddr,
        http_addr: std::net::SocketAddr,
    ) -> Result<serve::server::ServeOptions> {
        // The open-file limit goes to its hard limit first: the connection cap is sized from it.
        serve::server::conn::raise_open_file_limit();
        let secs = std::time::Duration::from_secs;
        let api_key = match self.api_key {
            Some(k) => Some(k),
            None => std::env::var("ULTRA_API_KEY").ok(),
        };
        if api_key.as_deref().is_some_and(|k| k.trim().is_empty()) {
            bail!("--api-key / ULTRA_API_KEY is empty");
        }
        let opts = serve::server::ServeOptions {
            grpc_addr,
            http_addr,
            limits: serve::server::Limits {
                shutdown_timeout: secs(self.shutdown_timeout),
                header_read_timeout: secs(self.header_read_timeout),
                body_read_timeout: secs(self.body_read_timeout),
                idle_timeout: secs(self.idle_timeout),
                max_connections: self.max_connections,
                max_request_bytes: self.max_request_bytes,
            },
            security: serve::server::Security {
                api_key,
                allowed_origins: self
                    .allowed_origins
                    .into_iter()
                    .map(|o| o.trim().trim_end_matches('/').to_string())
                    .filter(|o| !o.is_empty())
                    .collect(),
            },
        };
        opts.limits.validate()?;
        Ok(opts)
    }
}

impl ServeArgs {
    /// Refuses limits that would make every request fail, naming the flag.
    fn validate(&self) -> Result<()> {
        let range = |name: &str, v: u64, max: u64| -> Result<()> {
            if v == 0 || v > max {
                bail!("{name} must be between 1 and {max}, got {v}");
            }
            Ok(())
        };
        range("--max-running", self.max_running as u64, 65_536)?;
        range("--max-waiting", self.max_waiting as u64, 1_000_000)?;
        range("--kv-cache-mib", self.kv_cache_mib, 1 << 24)?;
        range(
            "--max-num-batched-tokens",
            self.max_num_batched_tokens as u64,
            1 << 24,
        )?;
        if let Some(n) = self.max_model_len {
            range("--max-model-len", n as u64, 1 << 24)?;
        }
        Ok(())
    }

    fn setup(self) -> Result<commands::serve::ServeSetup> {
        self.validate()?;
        if self.engine == EngineArg::Persistent {
            return Err(commands::generate::persistent_unsupported(
                "serving (batched decode of many sequences)",
            ));
        }
        let placement = self.par.placement(self.device)?;
        if self.par.ranks()? > 1 && self.device == Device::Cpu {
            bail!("ultra serve runs tensor- and expert-parallel ranks on GPUs only: add --device cuda");
        }
        set_threads(self.threads)?;
        // No --model (and not --synthetic): the embedded default model and its drafter.
        if self.synthetic_config.is_some() && (self.device != Device::Cuda || placement.is_some()) {
            bail!("--synthetic-config runs on one GPU: add --device cuda (no parallelism)");
        }
        let controlled =
            self.controlled_tau
                .map(|tau| commands::bench_serve::controlled::ControlledDraft {
                    tau,
                    layers: self.controlled_draft_layers,
                });
        if let Some(c) = &controlled {
            c.check(self.block_size.unwrap_or(dflash::DEFAULT_BLOCK_SIZE))?;
        }
        let synthetic = self
            .synthetic_config
            .clone()
            .map(|config| commands::bench_serve::controlled::SyntheticGpu { config, controlled });
        let (model, draft, name) =
            if self.synthetic || self.model.is_some() || self.synthetic_config.is_some() {
                let name = self.served_model_name.or_else(|| {
                    let stem = self.synthetic_config.as_ref()?.file_stem()?;
                    Some(format!("synthetic-{}", stem.to_string_lossy()))
                });
                (self.model, self.draft, name)
            } else {
                let d = default_model_paths()?;
                let draft = match (self.draft, self.no_draft) {
                    (Some(x), _) => Some(x),
                    (None, false) => Some(d.drafter),
                    (None, true) => None,
                };
                let name = self
                    .served_model_name
                    .or_else(|| Some(default_model::MODEL_NAME.to_string()));
                (Some(d.target), draft, name)
            };
        if self.block_size.is_some() && draft.is_none() && controlled.is_none() {
            bail!("--block-size needs a drafter (--draft DIR, or the default model without --no-draft)");
        }
        Ok(commands::serve::ServeSetup {
            engine: serve::engine::EngineConfig {
                model_id: commands::serve::model_id(model.as_deref(), name),
                max_running: self.max_running,
                max_waiting: self.max_waiting,
                kv_budget_bytes: self.kv_cache_mib << 20,
                max_context: self.max_model_len,
                max_batched_tokens: self.max_num_batched_tokens,
                spec_policy: policy(self.fixed_block),
                kv_block_size: self.kv_block_size as usize,
                prefix_caching: !self.no_prefix_caching,
            },
            device: match (self.device, placement) {
                (Device::Cpu, _) => commands::serve::ServeDevice::Cpu,
                (Device::Cuda, None) => commands::serve::ServeDevice::Cuda(self.par.ordinal()),
                (Device::Cuda, Some(placement)) => commands::serve::ServeDevice::CudaTp {
                    opts: self.par.tp_options()?,
                    placement,
                },
            },
            model,
            draft,
            block_size: self.block_size,
            synthetic,
        })
    }
}

/// The block policy of `--fixed-block` (default: adaptive).
fn policy(fixed_block: bool) -> dflash::BlockPolicy {
    if fixed_block {
        dflash::BlockPolicy::Fixed
    } else {
        dflash::BlockPolicy::Adaptive
    }
}

/// Writes the embedded default model into its cache directory (once) and says so.
fn default_model_paths() -> Result<default_model::Paths> {
    let p = default_model::materialize()?;
    eprintln!(
        "no --model: the embedded default model {} ({:.1} MB; files in {}; --model DIR for another checkpoint)",
        default_model::MODEL_NAME,
        default_model::total_bytes() as f64 / 1e6,
        p.root.display()
    );
    Ok(p)
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text from a prompt (stream to stdout; token counts and tokens/s on stderr).
    Generate {
        /// The prompt text.
        prompt: Option<String>,
        #[command(flatten)]
        m: ModelArgs,
        /// Wrap the prompt as a user message in the checkpoint's chat template.
        #[arg(long)]
        chat: bool,
        #[arg(long, default_value_t = 128)]
        max_tokens: usize,
        /// 0 = greedy (the default).
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long)]
        top_k: Option<usize>,
        #[arg(long)]
        top_p: Option<f32>,
        #[arg(long)]
        min_p: Option<f32>,
        /// HF repetition penalty (> 0; 1 = off) on every token of the prompt and the output.
        #[arg(long)]
        repetition_penalty: Option<f32>,
        /// OpenAI presence penalty in [-2, 2]: subtracted once from the logit of every token
        /// generated so far (the prompt does not count).
        #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
        presence_penalty: f32,
        /// OpenAI frequency penalty in [-2, 2]: subtracted from a token's logit once per time it
        /// was generated so far (the prompt does not count).
        #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
        frequency_penalty: f32,
        #[arg(long)]
        seed: Option<u64>,
        /// Stop string (repeatable).
        #[arg(long)]
        stop: Vec<String>,
        /// Keep going past the model's EOS token.
        #[arg(long)]
        ignore_eos: bool,
        /// A DFlash drafter directory: speculative decoding (same output for greedy decoding).
        /// The default model uses its own drafter unless --no-draft.
        #[arg(long)]
        draft: Option<PathBuf>,
        /// With the default model: plain decoding, no drafter.
        #[arg(long, conflicts_with = "draft")]
        no_draft: bool,
        /// Speculation block size 2..=16 (default: the drafter's); with adaptive speculation
        /// the largest block it may choose.
        #[arg(long)]
        block_size: Option<usize>,
        /// Every round drafts the full block. Default: adaptive speculation — the block size,
        /// or plain steps without drafts, chosen by measured acceptance and cost (same output).
        #[arg(long)]
        fixed_block: bool,
    },
    /// Per-token log-probabilities of a text or of --token-ids (entry i: log p(token i | before)).
    Score {
        /// The text to score.
        text: Option<String>,
        #[command(flatten)]
        m: ModelArgs,
        /// Print {"tokens":[...],"logprobs":[...]} (logprobs[0] is null).
        #[arg(long)]
        json: bool,
    },
    /// CPU MXFP4 expert GEMV/GEMM at gpt-oss-20b expert shapes: checked, then timed (weight GB/s).
    BenchFp4 {
        /// Timed repetitions per case (median reported).
        #[arg(long, default_value_t = 10)]
        iters: usize,
        /// Batch sizes (activation rows per weight pass), 1..=16.
        #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
        batch: Vec<usize>,
        /// Worker threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        #[arg(long, default_value_t = 0x0FF4)]
        seed: u64,
    },
    /// CPU decode tokens/s of checkpoints and of a synthetic ~100M-parameter MoE.
    BenchDecode {
        /// Checkpoint directories to include (default: the golden fixtures).
        #[arg(long)]
        model: Vec<PathBuf>,
        /// Decode steps per run.
        #[arg(long, default_value_t = 64)]
        tokens: usize,
        /// Runs per case (median reported).
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Ultra's half of `cargo xtask bench-cpu`: CPU decode / prompt tokens/s of a random-weight
    /// gpt-oss model of one shape (JSON lines), or (`--gguf`) that model as GGUF for llama.cpp.
    BenchShapes {
        #[arg(long, value_enum)]
        case: commands::bench_shapes::Case,
        /// Decode steps per run (llama-bench's tgN; 0: none).
        #[arg(long, default_value_t = 128)]
        tg: usize,
        /// Prompt tokens per run (llama-bench's ppN; 0: none).
        #[arg(long, default_value_t = 512)]
        pp: usize,
        /// Runs per test (median reported).
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        #[arg(long)]
        threads: Option<usize>,
        /// Write the model as GGUF to this path instead of timing it.
        #[arg(long)]
        gguf: Option<PathBuf>,
    },
    /// Serve a model over gRPC (ultra.v1.Engine, health, reflection) and an OpenAI-compatible
    /// HTTP API, with continuous batching; SIGINT / SIGTERM drain and stop.
    Serve {
        #[command(flatten)]
        s: ServeArgs,
        /// gRPC listen address.
        #[arg(long, default_value = "127.0.0.1:50051")]
        grpc_addr: std::net::SocketAddr,
        /// HTTP listen address.
        #[arg(long, default_value = "127.0.0.1:8000")]
        http_addr: std::net::SocketAddr,
        #[command(flatten)]
        front: FrontArgs,
    },
    /// Throughput and p50/p99 TTFT / inter-token latency of `ultra serve` on loopback: an
    /// in-process server driven by concurrent gRPC streams (random prompts, ignore_eos).
    BenchServe {
        #[command(flatten)]
        s: ServeArgs,
        #[arg(long, default_value_t = 256)]
        requests: usize,
        /// Streams in flight at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long, default_value_t = 16)]
        prompt_tokens: usize,
        /// Tokens generated per request.
        #[arg(long, default_value_t = 32)]
        max_tokens: usize,
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Instead of the throughput run: a soak of this many minutes under a mixed load
        /// (--concurrency clients: full and dropped gRPC streams, aborts, HTTP completions,
        /// HTTP streams whose clients leave, idle connections), printing RSS, open fds and the
        /// gauges every --soak-every seconds.
        #[arg(long, value_name = "MINUTES")]
        soak: Option<f64>,
        #[arg(long, default_value_t = 10, value_name = "SECS")]
        soak_every: u64,
        /// Instead of the throughput run: concurrent-stream sweep, e.g. 1,4,16,64 — N streams
        /// each sending --requests-per-stream requests one after another: aggregate and
        /// per-stream tok/s, TTFT and inter-token p50/p99 per N (max_running is raised to the
        /// largest N).
        #[arg(long, value_delimiter = ',', value_name = "N,N,…")]
        streams: Vec<usize>,
        /// With --streams: requests each stream sends.
        #[arg(long, default_value_t = 2)]
        requests_per_stream: usize,
        /// With --streams: run the sweep with the drafter (dflash) and without it (plain).
        #[arg(long)]
        compare_draft: bool,
        /// With --streams: a running server's gRPC address (http://HOST:PORT) instead of an
        /// in-process one.
        #[arg(long)]
        url: Option<String>,
        /// With --streams: what the streams send (default uniform: random prompts of
        /// --prompt-tokens). Without --streams, `shared-prefix`: instead of the throughput run,
        /// what prefix caching saves — a 2,000-token context continued by 32 requests at once,
        /// and n = 8 samples of one 2,000-token prompt, each with prefix caching off and on
        /// (TTFT, prompt tokens prefilled / served from cache). Needs a plain model (--no-draft
        /// with the default).
        #[arg(long, value_name = "NAME")]
        workload: Option<String>,
    },
    /// DFlash acceptance length τ and plain vs speculative decode tok/s over eval sets (JSONL,
    /// one {"prompt": ...} per line), greedy, on the CPU or (--device cuda) GPU executor.
    BenchSpec {
        /// Eval sets (default: train/eval/{code,math,prose}.jsonl of the repository).
        #[arg(long = "eval")]
        sets: Vec<PathBuf>,
        /// Checkpoint directory (default: the embedded model and its drafter).
        #[arg(long, requires = "draft")]
        model: Option<PathBuf>,
        /// DFlash drafter directory (default: the embedded model's).
        #[arg(long)]
        draft: Option<PathBuf>,
        /// Speculation block size 2..=16 (default: the drafter's).
        #[arg(long)]
        block_size: Option<usize>,
        /// Tokens generated per prompt (EOS ignored, so every prompt gives this many).
        #[arg(long, default_value_t = 128)]
        max_tokens: usize,
        /// Only the first N prompts of each set.
        #[arg(long)]
        limit: Option<usize>,
        /// `cpu` (the reference executor) or `cuda` (the GPU executor on GPU 0, the drafter on
        /// the GPU too; under --tensor-parallel the drafter runs on rank 0's GPU).
        #[arg(long, value_enum, default_value_t = Device::Cpu)]
        device: Device,
        /// The GPU engine: `graph`, or `persistent` (not for speculative decoding yet: an
        /// error).
        #[arg(long, value_enum, default_value_t = ENGINE_DEFAULT)]
        engine: EngineArg,
        /// Worker threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        #[command(flatten)]
        par: ParallelArgs,
    },
    /// List the GPUs Ultra can use, peer access and the link (NVLink / PCIe) between each pair,
    /// and the NCCL library found.
    Devices,
    /// What a checkpoint (or a bare config.json) holds and costs: parameters total/active, weight
    /// bytes per decoded token, KV cache, batch-1 roofline tokens/s at a bandwidth.
    Inspect {
        /// Checkpoint directory.
        #[arg(long, conflicts_with = "config")]
        model: Option<PathBuf>,
        /// A config.json alone (no weights needed).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Memory bandwidth for the roofline: 3e12, 3TB/s, 3350GB/s.
        #[arg(long, default_value = "3.0TB/s")]
        bandwidth: String,
        /// Context length for the KV-cache line (and the cached positions of --plan's pass).
        #[arg(long, default_value_t = 8192)]
        context: usize,
        /// Print the step plan of one pass: every op with its buffers, weights, parameters,
        /// weight bytes, KV bytes and FLOPs, and the totals.
        #[arg(long)]
        plan: bool,
        /// The pass --plan prints: decode, prefill:N, verify:B or batched:N.
        #[arg(long, default_value = "decode", requires = "plan")]
        pass: String,
        /// --plan sharded over N tensor-parallel ranks.
        #[arg(long, default_value_t = 1, requires = "plan")]
        tensor_parallel: usize,
        /// --plan with the experts placed on the ranks (as `generate --expert-parallel[=N]`).
        #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "0", value_name = "N", requires = "plan")]
        expert_parallel: Option<usize>,
        /// With --plan: also a DFlash drafter's context-append and block-draft passes.
        #[arg(long, requires = "plan")]
        draft: Option<PathBuf>,
        /// Draft block size for --draft (default: the drafter's).
        #[arg(long, requires = "draft")]
        block_size: Option<usize>,
    },
    /// Quantize a gpt-oss checkpoint's bf16 experts to MXFP4 in the released gpt-oss layout
    /// (loadable by transformers and by Ultra).
    Quantize {
        #[arg(long = "in")]
        input: PathBuf,
        #[arg(long = "out")]
        output: PathBuf,
        /// Scale rule: `up` (2^ceil(log2(amax/6)), never clips) or `floor` (OCP: floor(log2 amax) − 2).
        #[arg(long, value_enum, default_value_t = Rounding::Up)]
        scale_rounding: Rounding,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Rounding {
    Up,
    Floor,
}

/// Sizes the global worker pool (default: all cores).
fn set_threads(threads: Option<usize>) -> Result<()> {
    if let Some(t) = threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()?;
    }
    Ok(())
}

/// The checkpoint of `m`: `--model`, else the embedded default model (its paths returned too).
fn model_dir(m: &ModelArgs) -> Result<(PathBuf, Option<default_model::Paths>)> {
    match &m.model {
        Some(d) => Ok((d.clone(), None)),
        None => {
            let p = default_model_paths()?;
            Ok((p.target.clone(), Some(p)))
        }
    }
}

/// Loads a checkpoint for `device` with the tensor parallelism of `par` (placement checked by
/// the caller): the CPU executor (its ranks simulated), straight onto one GPU (no CPU model), or
/// sharded over GPU ranks.
fn load_on(
    dir: &Path,
    device: Device,
    par: &ParallelArgs,
    placement: Option<tilert::exec::tp::RankPlacement>,
) -> Result<commands::generate::Loaded> {
    match (device, placement) {
        (Device::Cuda, Some(p)) => commands::generate::load_gpu_tp(dir, par.tp_options()?, &p),
        (Device::Cuda, None) => commands::generate::load_gpu(dir, par.ordinal()),
        (Device::Cpu, _) => {
            let mut loaded = commands::generate::load(dir)?;
            let split = par.split()?;
            if split.ranks > 1 {
                loaded.parallel(split)?;
                if split.expert_parallel {
                    eprintln!("{split}: simulated ranks on the CPU");
                } else {
                    eprintln!(
                        "tensor parallel: {} simulated ranks on the CPU",
                        split.ranks
                    );
                }
            }
            Ok(loaded)
        }
    }
}

/// The engine of `m`'s `--engine` (checked against its device and ranks).
fn engine_of(m: &ModelArgs) -> Result<commands::generate::Engine> {
    commands::generate::Engine::select(
        m.engine == EngineArg::Persistent,
        m.device == Device::Cuda,
        m.par.tensor_parallel,
    )
}

/// Loads the model of `m` on its device (with its `--engine`).
fn open(m: &ModelArgs) -> Result<commands::generate::Loaded> {
    let placement = m.par.placement(m.device)?;
    let engine = engine_of(m)?;
    set_threads(m.threads)?;
    let (dir, _) = model_dir(m)?;
    let mut loaded = load_on(&dir, m.device, &m.par, placement)?;
    loaded.engine = engine;
    Ok(loaded)
}

/// Runs the command; an error is printed once, as one chain (`a: b: c`), with a backtrace only
/// when RUST_BACKTRACE asks for one.
fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ultra: error: {e:#}");
            let bt = e.backtrace();
            if bt.status() == std::backtrace::BacktraceStatus::Captured {
                eprintln!("{bt}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    commands::set_cpu_activations(cli.activations);
    match cli.cmd {
        Cmd::BenchFp4 {
            iters,
            batch,
            threads,
            seed,
        } => {
            set_threads(threads)?;
            println!(
                "CPU MXFP4 GEMV at gpt-oss-20b expert shapes, {} threads (each case checked against the f64 reference first)",
                rayon::current_num_threads()
            );
            let rows = serve::fp4_bench::run(iters.max(1), &batch, seed)?;
            println!("| case | weight MB | median ms | weight GB/s |");
            println!("|---|---:|---:|---:|");
            for r in rows {
                println!(
                    "| {} | {:.1} | {:.3} | {:.2} |",
                    r.case,
                    r.weight_bytes as f64 / 1e6,
                    r.median_ms,
                    r.gb_per_s
                );
            }
        }
        Cmd::Generate {
            prompt,
            m,
            chat,
            max_tokens,
            temperature,
            top_k,
            top_p,
            min_p,
            repetition_penalty,
            presence_penalty,
            frequency_penalty,
            seed,
            stop,
            ignore_eos,
            draft,
            no_draft,
            block_size,
            fixed_block,
        } => {
            let params = model::sampling::SamplingParams {
                temperature,
                top_k,
                top_p,
                min_p,
                repetition_penalty,
                presence_penalty,
                frequency_penalty,
                seed,
                max_tokens,
                stop_token_ids: Vec::new(),
                stop_strings: stop,
                ignore_eos,
            };
            // Bad flags are refused before the model loads, naming the flag.
            if let Err(e) = params.validate() {
                match e.param() {
                    Some(p) => bail!("--{}: {e}", p.replace('_', "-")),
                    None => bail!("{e}"),
                }
            }
            let placement = m.par.placement(m.device)?;
            let engine = engine_of(&m)?;
            set_threads(m.threads)?;
            let (dir, default) = model_dir(&m)?;
            // The default model speculates with its own drafter.
            let draft = match (draft, default) {
                (Some(d), _) => Some(d),
                (None, Some(p)) if !no_draft => Some(p.drafter),
                _ => None,
            };
            if engine == commands::generate::Engine::Persistent && draft.is_some() {
                return Err(commands::generate::persistent_unsupported(
                    "speculative decoding (--draft, or the default model without --no-draft)",
                ));
            }
            let mut loaded = load_on(&dir, m.device, &m.par, placement)?;
            loaded.engine = engine;
            if block_size.is_some() && draft.is_none() {
                bail!("--block-size needs a drafter (--draft DIR, or the default model without --no-draft)");
            }
            let ids = commands::generate::prompt_ids(
                &loaded,
                prompt.as_deref(),
                m.token_ids.as_deref(),
                chat,
            )?;
            let mut stdout = std::io::stdout();
            // Adaptive speculation on the CPU remembers between runs whether drafting paid
            // here (`commands::adapt_memory`); a seeded sampled request keeps its fixed block.
            let memory = match &draft {
                Some(draft_dir)
                    if !fixed_block
                        && loaded.gpu.is_none()
                        && loaded.tp.is_none()
                        && (params.is_greedy() || params.seed.is_none()) =>
                {
                    let acts = format!("{:?}", commands::cpu_activations());
                    commands::adapt_memory::Memory::for_key(&commands::adapt_memory::Key {
                        model: &dir,
                        drafter: draft_dir,
                        block_size,
                        device: "cpu",
                        threads: rayon::current_num_threads(),
                        activations: &acts,
                    })
                }
                _ => None,
            };
            let remembered = memory.as_ref().and_then(|m| m.load().map(|r| (m, r)));
            let skip = remembered
                .as_ref()
                .filter(|(_, r)| r.drafting_off() && r.fresh(commands::adapt_memory::now_unix()));
            let (g, spec) = match (&draft, skip) {
                (Some(_), Some((m, r))) => {
                    let g = commands::generate::generate(&loaded, &ids, &params, &mut stdout)?;
                    let reused = commands::adapt_memory::Record {
                        reused: r.reused + 1,
                        ..r.clone()
                    };
                    let _ = m.store(&reused);
                    eprintln!(
                        "speculation: drafting off, the drafter not loaded: on this machine its best block ran at {:.2}× plain speed (measured {} s ago; measured again after {} more runs; {})",
                        r.draft_speedup,
                        commands::adapt_memory::now_unix().saturating_sub(r.measured_unix),
                        reused.runs_allowed().saturating_sub(reused.reused),
                        m.path().display()
                    );
                    (g, None)
                }
                (Some(dir), None) => {
                    // Re-measuring a "drafting off" on record: one warm-up round, not two.
                    let rechecking = remembered.as_ref().is_some_and(|(_, r)| r.drafting_off());
                    let policy = match policy(fixed_block) {
                        dflash::BlockPolicy::Adaptive if rechecking => dflash::BlockPolicy::Recheck,
                        p => p,
                    };
                    let r = commands::generate::generate_speculative_with(
                        &loaded,
                        dir,
                        block_size,
                        policy,
                        &ids,
                        &params,
                        &mut stdout,
                    )?;
                    if let (Some(m), Some(rec)) = (
                        &memory,
                        r.adaptive
                            .as_ref()
                            .and_then(commands::adapt_memory::Memory::record_of),
                    ) {
                        // A verdict the previous record already held backs off further.
                        let rec = match &remembered {
                            Some((_, old)) => old.after(rec),
                            None => rec,
                        };
                        if let Err(e) = m.store(&rec) {
                            eprintln!(
                                "ultra: note: could not remember the adaptive choice in {}: {e}",
                                m.path().display()
                            );
                        }
                    }
                    (
                        r.generation,
                        Some((r.stats, r.block_size, r.adaptive, r.plain_steps)),
                    )
                }
                (None, _) => (
                    commands::generate::generate(&loaded, &ids, &params, &mut stdout)?,
                    None,
                ),
            };
            println!();
            if loaded.tokenizer.is_none() {
                println!("tokens: {:?}", g.tokens);
            }
            eprintln!(
                "prompt {} tokens, generated {} tokens (finish: {}), time to first token {:.1} ms, decode {:.1} tok/s",
                g.prompt_tokens,
                g.tokens.len(),
                g.finish_reason,
                g.time_to_first_token_s * 1e3,
                g.decode_tokens_per_s
            );
            if let Some((stats, b, adaptive, plain_steps)) = spec {
                let pos: Vec<String> = (0..b - 1)
                    .map(|i| {
                        stats
                            .position_acceptance_rate(i)
                            .map_or("-".into(), |r| format!("{r:.2}"))
                    })
                    .collect();
                eprintln!(
                    "speculative: block {b}, {} rounds, acceptance length tau {:.2} (counting the bonus), per-position acceptance [{}], accepted-drafts histogram {:?}",
                    stats.rounds(),
                    stats.tau().unwrap_or(0.0),
                    pos.join(", "),
                    stats.histogram()
                );
                match adaptive {
                    Some(a) => {
                        eprintln!("speculation: {plain_steps} plain steps; {}", a.describe())
                    }
                    None => eprintln!("speculation: fixed block {b}"),
                }
            }
        }
        Cmd::Score { text, m, json } => {
            let loaded = open(&m)?;
            let ids = commands::generate::prompt_ids(
                &loaded,
                text.as_deref(),
                m.token_ids.as_deref(),
                false,
            )?;
            let lp = commands::generate::score(&loaded, &ids)?;
            if json {
                println!("{}", serde_json::json!({"tokens": ids, "logprobs": lp}));
            } else {
                let mut total = 0.0;
                for (i, (&t, l)) in ids.iter().zip(&lp).enumerate() {
                    let piece = loaded
                        .tokenizer
                        .as_ref()
                        .and_then(|tk| tk.decode(&[t], false).ok())
                        .unwrap_or_default();
                    match l {
                        Some(l) => {
                            total += l;
                            println!("{i:>5} {t:>8} {piece:?} {l:.6}");
                        }
                        None => println!("{i:>5} {t:>8} {piece:?} -"),
                    }
                }
                let n = (ids.len() - 1).max(1) as f64;
                println!(
                    "sum {:.6}, mean {:.6} nats/token, perplexity {:.4}",
                    total,
                    total / n,
                    (-total / n).exp()
                );
            }
        }
        Cmd::Inspect {
            model,
            config,
            bandwidth,
            context,
            plan,
            pass,
            tensor_parallel,
            expert_parallel,
            draft,
            block_size,
        } => {
            let split = commands::generate::parallelism(tensor_parallel, expert_parallel)?;
            let Some(path) = model.or(config) else {
                bail!("give --model DIR or --config FILE");
            };
            let bw = commands::inspect::parse_bandwidth(&bandwidth)?;
            let shape = if plan {
                Some(commands::inspect::parse_pass(&pass, context)?)
            } else {
                None
            };
            let report = commands::inspect::inspect(&path)?;
            commands::inspect::print(&report, bw, context);
            commands::inspect::print_classes(&report, bw, context)?;
            if let Some(shape) = shape {
                let p = commands::inspect::plan_split(&report, shape, split)?;
                println!();
                print!("{p}");
                if let Some(dir) = draft {
                    let (ctx, blk) = commands::inspect::draft_plans(
                        &report, &dir, shape.rows, block_size, context,
                    )?;
                    println!();
                    print!("drafter {}: context-append\n{ctx}", dir.display());
                    println!();
                    print!("drafter {}: block-draft\n{blk}", dir.display());
                }
            }
        }
        Cmd::Quantize {
            input,
            output,
            scale_rounding,
        } => {
            let rounding = match scale_rounding {
                Rounding::Up => fp4::ScaleRounding::Up,
                Rounding::Floor => fp4::ScaleRounding::Floor,
            };
            commands::quantize::run(&input, &output, rounding)?;
        }
        Cmd::BenchDecode {
            model,
            tokens,
            repeats,
            threads,
        } => {
            set_threads(threads)?;
            let dirs: Vec<PathBuf> = if model.is_empty() {
                [
                    "gpt-oss/bf16",
                    "gpt-oss/mxfp4",
                    "qwen3-moe/native",
                    "mimo-v2-flash/native",
                ]
                .iter()
                .map(|d| PathBuf::from("fixtures").join(d))
                .filter(|d| d.exists())
                .collect()
            } else {
                model
            };
            let refs: Vec<&std::path::Path> = dirs.iter().map(|d| d.as_path()).collect();
            println!(
                "CPU decode, {} threads, {tokens} tokens after a 16-token prompt, median of {repeats}",
                rayon::current_num_threads()
            );
            let rows = commands::bench_decode::run(&refs, tokens, repeats)?;
            println!("| model | params total | active | tok/s | weight MB/token | GB/s |");
            println!("|---|---:|---:|---:|---:|---:|");
            for r in rows {
                println!(
                    "| {} | {:.1} M | {:.1} M | {:.1} | {:.2} | {:.2} |",
                    r.case,
                    r.total_params as f64 / 1e6,
                    r.active_params as f64 / 1e6,
                    r.tokens_per_s,
                    r.bytes_per_token / 1e6,
                    r.tokens_per_s * r.bytes_per_token / 1e9
                );
            }
        }
        Cmd::BenchShapes {
            case,
            tg,
            pp,
            repeats,
            threads,
            gguf,
        } => {
            set_threads(threads)?;
            match gguf {
                Some(path) => {
                    let n = commands::bench_shapes::write_gguf(case, &path)?;
                    println!("wrote {} ({:.1} MB)", path.display(), n as f64 / 1e6);
                }
                None => commands::bench_shapes::run(case, tg, pp, repeats)?,
            }
        }
        Cmd::Serve {
            s,
            grpc_addr,
            http_addr,
            front,
        } => {
            let opts = front.options(grpc_addr, http_addr)?;
            commands::serve::serve(s.setup()?, opts)?
        }
        Cmd::BenchServe {
            s,
            requests,
            concurrency,
            prompt_tokens,
            max_tokens,
            seed,
            soak,
            soak_every,
            streams,
            requests_per_stream,
            compare_draft,
            url,
            workload,
        } => {
            if !streams.is_empty() {
                let workload = workload.unwrap_or_else(|| "uniform".to_string());
                if workload == SHARED_PREFIX {
                    bail!(
                        "--workload {SHARED_PREFIX} is a run of its own: give it without --streams"
                    );
                }
                let sweep = commands::bench_serve::Sweep {
                    streams,
                    requests_per_stream,
                    prompt_tokens,
                    max_tokens,
                    seed,
                    workload,
                };
                println!(
                    "bench-serve sweep: {} workload, {prompt_tokens}-token prompts, {max_tokens} tokens each, {requests_per_stream} requests per stream",
                    sweep.workload
                );
                match url {
                    Some(url) => {
                        commands::bench_serve::run_url(&url, &sweep)?;
                    }
                    None => {
                        let setup = s.setup()?;
                        println!(
                            "in-process server, {}, {} threads",
                            match &setup.device {
                                commands::serve::ServeDevice::Cpu => "CPU".to_string(),
                                commands::serve::ServeDevice::Cuda(i) => format!("GPU {i}"),
                                commands::serve::ServeDevice::CudaTp { opts, .. } => {
                                    format!("{} on GPUs", opts.parallelism)
                                }
                            },
                            rayon::current_num_threads()
                        );
                        commands::bench_serve::run_local(setup, &sweep, compare_draft)?;
                    }
                }
                return Ok(());
            }
            if url.is_some() || compare_draft {
                bail!("--url and --compare-draft go with --streams");
            }
            if let Some(w) = workload.as_deref().filter(|&w| w != SHARED_PREFIX) {
                bail!(
                    "--workload {w} goes with --streams (without it: --workload {SHARED_PREFIX})"
                );
            }
            let setup = s.setup()?;
            if workload.is_some() {
                let load = commands::bench_prefix::PrefixLoad {
                    seed,
                    ..Default::default()
                };
                println!(
                    "shared-prefix workload, in-process engine, {} threads, KV block {}: {} requests on a {}-token context (+{} each), {} samples of one {}-token prompt, {} tokens each",
                    rayon::current_num_threads(),
                    setup.engine.kv_block_size,
                    load.requests,
                    load.context,
                    load.suffix,
                    load.samples,
                    load.context,
                    load.max_tokens
                );
                let runs = commands::bench_prefix::run(&setup, &load)?;
                commands::bench_prefix::print(&runs);
                return Ok(());
            }
            if let Some(minutes) = soak {
                if !(minutes > 0.0 && minutes <= 7.0 * 24.0 * 60.0) {
                    bail!("--soak must be between 0 and 10080 minutes, got {minutes}");
                }
                println!(
                    "soak of ultra serve on loopback, {minutes} min, {concurrency} clients, {prompt_tokens}-token prompts, {max_tokens} tokens each; RSS and fds of the whole process (server and clients)"
                );
                let samples = commands::serve::soak(
                    setup,
                    commands::serve::BenchLoad {
                        requests,
                        concurrency,
                        prompt_tokens,
                        max_tokens,
                        seed,
                    },
                    minutes,
                    std::time::Duration::from_secs(soak_every.max(1)),
                )?;
                let (first, last) = (&samples[0], &samples[samples.len() - 1]);
                let peak = samples.iter().map(|s| s.rss_mib).fold(0.0, f64::max);
                println!(
                    "RSS {:.1} → {:.1} MiB (peak {:.1}), fds {} → {}, {} requests, {} errors; idle gauges: running {}, waiting {}, KV {:.3}, in flight {}",
                    first.rss_mib, last.rss_mib, peak, first.fds, last.fds, last.done, last.errors,
                    last.running, last.waiting, last.kv_usage, last.inflight
                );
                return Ok(());
            }
            let device = match &setup.device {
                commands::serve::ServeDevice::Cpu => {
                    format!("CPU {} threads", rayon::current_num_threads())
                }
                commands::serve::ServeDevice::Cuda(i) => format!("GPU {i}"),
                commands::serve::ServeDevice::CudaTp { opts, placement } => {
                    format!("{} ({placement:?})", opts.parallelism)
                }
            };
            println!(
                "ultra serve on loopback, {device}, max_running {}: {requests} requests, {concurrency} concurrent gRPC streams, {prompt_tokens}-token prompts, {max_tokens} tokens each",
                setup.engine.max_running
            );
            let report = commands::serve::bench(
                setup,
                commands::serve::BenchLoad {
                    requests,
                    concurrency,
                    prompt_tokens,
                    max_tokens,
                    seed,
                },
            )?;
            report.print();
        }
        Cmd::BenchSpec {
            sets,
            model,
            draft,
            block_size,
            max_tokens,
            limit,
            device,
            engine,
            threads,
            par,
        } => {
            if engine == EngineArg::Persistent {
                return Err(commands::generate::persistent_unsupported(
                    "speculative decoding (bench-spec times DFlash)",
                ));
            }
            let placement = par.placement(device)?;
            set_threads(threads)?;
            let (dir, draft) = match (model, draft) {
                (Some(m), Some(d)) => (m, d),
                (None, d) => {
                    let p = default_model_paths()?;
                    (p.target, d.unwrap_or(p.drafter))
                }
                (Some(_), None) => bail!("--model needs --draft"),
            };
            let sets = if sets.is_empty() {
                let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../train/eval");
                let s: Vec<PathBuf> = ["code", "math", "prose"]
                    .iter()
                    .map(|n| root.join(format!("{n}.jsonl")))
                    .collect();
                if !s.iter().all(|p| p.is_file()) {
                    bail!(
                        "no --eval given and the repository's train/eval/*.jsonl are not at {}",
                        root.display()
                    );
                }
                s
            } else {
                sets
            };
            let loaded = load_on(&dir, device, &par, placement)?;
            let executor = match (&loaded.tp, &loaded.gpu) {
                (Some(tp), _) => format!(
                    "the GPU executor, {} ({}; drafter on rank 0's GPU)",
                    tp.model.parallelism(),
                    tp.model.rank(0).device().info
                ),
                (None, Some(gpu)) => format!("the GPU executor ({})", gpu.device().info),
                (None, None) if par.ranks()? > 1 => format!(
                    "the CPU executor, {} (simulated), {} threads",
                    par.split()?,
                    rayon::current_num_threads()
                ),
                (None, None) => {
                    format!("the CPU executor, {} threads", rayon::current_num_threads())
                }
            };
            println!("DFlash on {executor}, greedy, {max_tokens} tokens per prompt (EOS ignored)");
            let reports =
                commands::bench_spec::run(&loaded, &draft, block_size, &sets, max_tokens, limit)?;
            commands::bench_spec::print(&reports);
        }
        Cmd::Devices => println!("{}", commands::devices::report().trim_end()),
    }
    Ok(())
}
