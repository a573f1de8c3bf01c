//! `ultra bench-spec`: DFlash acceptance length τ and plain vs speculative decode speed over eval
//! sets (JSONL, one `{"prompt": …}` object per line), greedy, on the CPU executor or, with
//! `--device cuda`, on the GPU executor (target and drafter on the device).
//!
//! Per prompt: plain greedy decoding of `max_tokens` tokens (`ignore_eos`, so every prompt gives the
//! same length), then greedy DFlash decoding of the same; τ = emitted tokens / verify rounds over
//! the whole set (counting the bonus token), decode tok/s = generated tokens after the first one /
//! time after the first token, summed over the set. Greedy speculative output must equal plain
//! output; the number of prompts where it does not is reported (it should be 0).
//!
//! On the GPU one target session serves every plain decode and one speculative sequence (target
//! session + draft state) every speculative one, each emptied between prompts, and one untimed
//! warm-up prompt runs first, so CUDA-graph captures stay out of the timings. Plain greedy decoding
//! there is `decode_greedy` (argmax on the device, 4 bytes back per token), as the greedy
//! speculative loop brings back ids only.

use std::io::BufRead;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use model::sampling::SamplingParams;

use super::generate::{generate, gpu_max_seq, gpu_spec_setup, prompt_ids, spec_decoder, Loaded};

/// What one eval set measured.
#[derive(Debug, Clone)]
pub struct SetReport {
    pub name: String,
    pub prompts: usize,
    pub generated_tokens: usize,
    /// Speculation block size.
    pub block_size: usize,
    pub tau: f64,
    pub rounds: u64,
    /// Acceptance rate of draft position i (given positions < i accepted).
    pub position_acceptance: Vec<Option<f64>>,
    pub plain_tokens_per_s: f64,
    pub spec_tokens_per_s: f64,
    /// Prompts whose speculative output differs from the plain output.
    pub mismatches: usize,
}

/// Reads the `prompt` of every line of a JSONL file.
pub fn read_prompts(path: &Path) -> Result<Vec<String>> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
        let Some(p) = v.get("prompt").and_then(|p| p.as_str()) else {
            bail!("{}:{}: no string field \"prompt\"", path.display(), i + 1);
        };
        out.push(p.to_string());
    }
    if out.is_empty() {
        bail!("{}: no prompts", path.display());
    }
    Ok(out)
}

/// Runs every set of `sets` (JSONL paths) against the drafter in `draft`.
pub fn run(
    loaded: &Loaded,
    draft: &Path,
    block_size: Option<usize>,
    sets: &[PathBuf],
    max_tokens: usize,
    limit: Option<usize>,
) -> Result<Vec<SetReport>> {
    if max_tokens < 2 {
        bail!("--max-tokens must be at least 2");
    }
    let params = SamplingParams {
        max_tokens,
        ignore_eos: true,
        ..SamplingParams::greedy()
    };
    let mut runner = Runner::new(loaded, draft, block_size)?;
    let mut reports = Vec::new();
    for path in sets {
        let mut prompts = read_prompts(path)?;
        if let Some(n) = limit {
            prompts.truncate(n);
        }
        let mut stats = dflash::AcceptanceStats::new();
        let (mut plain_tok, mut plain_s, mut spec_tok, mut spec_s) = (0usize, 0f64, 0usize, 0f64);
        let mut mismatches = 0;
        let mut generated = 0;
        for p in &prompts {
            let ids = prompt_ids(loaded, Some(p), None, false)?;
            let (plain, n, s) = runner.plain(loaded, &ids, &params)?;
            plain_tok += n;
            plain_s += s;
            let (out, n, s) = runner.speculative(&ids, &params)?;
            spec_tok += n;
            spec_s += s;
            if out.tokens != plain {
                mismatches += 1;
            }
            generated += out.tokens.len();
            stats.merge(&out.stats);
        }
        let b = runner.block_size();
        reports.push(SetReport {
            name: path
                .file_stem()
                .map_or("?".into(), |s| s.to_string_lossy().into_owned()),
            prompts: prompts.len(),
            generated_tokens: generated,
            block_size: b,
            tau: stats.tau().unwrap_or(0.0),
            rounds: stats.rounds(),
            position_acceptance: (0..b - 1)
                .map(|i| stats.position_acceptance_rate(i))
                .collect(),
            plain_tokens_per_s: plain_tok as f64 / plain_s.max(1e-12),
            spec_tokens_per_s: spec_tok as f64 / spec_s.max(1e-12),
            mismatches,
        });
    }
    Ok(reports)
}

/// Where the plain and speculative decodes run.
enum Runner {
    Cpu(dflash::SpecDecoder),
    Gpu {
        plain: Box<tilert::exec::GpuSession>,
        spec: Box<dflash::gpu::GpuSpecOn<tilert::exec::GpuSession>>,
        opts: dflash::SpecOptions,
    },
}

impl Runner {
    /// The CPU decoder, or (when `loaded` is on a GPU) the device sessions, warmed up by one
    /// untimed greedy prompt so the timed decodes replay captured graphs.
    fn new(loaded: &Loaded, draft: &Path, block_size: Option<usize>) -> Result<Self> {
        let Some(gpu) = &loaded.gpu else {
            return Ok(Runner::Cpu(spec_decoder(loaded, draft, block_size)?));
        };
        let (drafter, opts) = gpu_spec_setup(loaded, draft, block_size)?;
        let max_seq = gpu_max_seq(gpu);
        let mut r = Runner::Gpu {
            plain: Box::new(gpu.session(max_seq)?),
            spec: Box::new(dflash::gpu::GpuSpecOn::new(
                gpu.session(max_seq)?,
                &drafter,
            )?),
            opts,
        };
        let warm = SamplingParams {
            max_tokens: 64,
            ignore_eos: true,
            ..SamplingParams::greedy()
        };
        let ids = [0u32, 100, 200, 300];
        r.plain(loaded, &ids, &warm)?;
        r.speculative(&ids, &warm)?;
        Ok(r)
    }

    fn block_size(&self) -> usize {
        match self {
            Runner::Cpu(d) => d.block_size(),
            Runner::Gpu { opts, .. } => opts.block_size,
        }
    }

    /// Plain greedy decoding of `ids`: the tokens, the tokens after the first one and the
    /// seconds they took.
    fn plain(
        &mut self,
        loaded: &Loaded,
        ids: &[u32],
        params: &SamplingParams,
    ) -> Result<(Vec<u32>, usize, f64)> {
        match self {
            Runner::Cpu(_) => {
                let g = generate(loaded, ids, params, &mut std::io::sink())?;
                let n = g.tokens.len().saturating_sub(1);
                Ok((g.tokens, n, n as f64 / g.decode_tokens_per_s.max(1e-12)))
            }
            Runner::Gpu { plain, .. } => {
                if ids.len() + params.max_tokens > plain.max_seq() {
                    bail!(
                        "prompt ({} tokens) + --max-tokens {} exceed the GPU sequence size {}",
                        ids.len(),
                        params.max_tokens,
                        plain.max_seq()
                    );
                }
                plain.reset();
                let mut tokens = vec![plain.prefill_greedy(ids)?];
                let t0 = Instant::now();
                while tokens.len() < params.max_tokens {
                    let next = plain.decode_greedy(*tokens.last().expect("one token"))?;
                    tokens.push(next);
                }
                let s = t0.elapsed().as_secs_f64();
                let n = tokens.len() - 1;
                Ok((tokens, n, s))
            }
        }
    }

    /// Greedy DFlash decoding of `ids`: the output, the tokens after the first one and the
    /// seconds they took.
    fn speculative(
        &mut self,
        ids: &[u32],
        params: &SamplingParams,
    ) -> Result<(dflash::SpecOutput, usize, f64)> {
        let t0 = Instant::now();
        let mut first = None;
        let mut on_token = |_| {
            first.get_or_insert_with(|| t0.elapsed().as_secs_f64());
            ControlFlow::Continue(())
        };
        let out = match self {
            Runner::Cpu(decoder) => decoder.generate(ids, params, &mut on_token)?,
            Runner::Gpu { spec, opts, .. } => {
                spec.reset();
                spec.generate(opts, ids, params, &mut on_token, &mut |_| {})?
            }
        };
        let total = t0.elapsed().as_secs_f64();
        let n = out.tokens.len().saturating_sub(1);
        Ok((out, n, total - first.unwrap_or(total)))
    }
}

/// Prints the reports as a Markdown table.
pub fn print(reports: &[SetReport]) {
    let block_size = reports.first().map_or(0, |r| r.block_size);
    println!(
        "| set | prompts | tokens | τ (block {block_size}) | rounds | acceptance by draft position | plain tok/s | DFlash tok/s | speedup | spec ≠ plain |"
    );
    println!("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|");
    for r in reports {
        let pos: Vec<String> = r
            .position_acceptance
            .iter()
            .map(|x| x.map_or("-".into(), |v| format!("{v:.2}")))
            .collect();
        println!(
            "| {} | {} | {} | {:.2} | {} | {} | {:.1} | {:.1} | {:.2}x | {} |",
            r.name,
            r.prompts,
            r.generated_tokens,
            r.tau,
            r.rounds,
            pos.join(" "),
            r.plain_tokens_per_s,
            r.spec_tokens_per_s,
            r.spec_tokens_per_s / r.plain_tokens_per_s.max(1e-12),
            r.mismatches
        );
    }
}
