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
//! One target sequence serves every plain decode and one speculative sequence (target + drafter
//! state) every speculative one, each emptied between prompts: [`run_sets`], generic over the
//! executor contract (`model::Executor`) and `dflash::SpecBackend`. Plain greedy decoding is
//! `Executor::decode_greedy` — on the GPU the argmax is taken on the device (4 bytes back per
//! token), as the greedy speculative loop brings back ids only. On the GPU one untimed warm-up
//! prompt runs first, so CUDA-graph captures stay out of the timings.

use std::io::BufRead;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use dflash::{SpecBackend, SpecOptions};
use model::executor::Executor;
use model::sampling::SamplingParams;

use super::generate::{
    gpu_max_seq, gpu_spec_setup, prompt_ids, spec_decoder, tp_max_seq, tp_spec_setup, Loaded,
};

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
    /// Adaptive speculation (`dflash::BlockPolicy::Adaptive`): decode tok/s and what it chose
    /// at the end of each prompt (`off` or the block size → prompts).
    pub adaptive_tokens_per_s: f64,
    pub adaptive_choices: std::collections::BTreeMap<String, usize>,
    /// Prompts whose speculative output (fixed or adaptive) differs from the plain output.
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

/// Runs every set of `sets` (JSONL paths) against the drafter in `draft`, on the executor
/// `loaded` runs on ([`run_sets`]).
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
    if let Some(tp) = &loaded.tp {
        // Target on the tensor-parallel ranks, drafter on rank 0's GPU (see `tp_spec_setup`).
        let (drafter, opts) = tp_spec_setup(loaded, draft, block_size)?;
        let mut plain = tp.session()?;
        let mut spec = dflash::gpu::GpuSpecOn::new(tp.session()?, &drafter)?;
        let mut seqs = Sequences {
            plain: &mut plain,
            spec: &mut spec,
            opts: &opts,
            capacity: Some(tp_max_seq(&tp.model)),
        };
        seqs.warm_up()?;
        return run_sets(loaded, seqs, sets, &params, limit);
    }
    match &loaded.gpu {
        None => {
            let decoder = spec_decoder(loaded, draft, block_size)?;
            let mut plain = decoder.model().session();
            let mut target = decoder.model().session();
            let mut spec = dflash::CpuBackend::new(&mut target, decoder.drafter())?;
            let opts = decoder.options();
            let seqs = Sequences {
                plain: &mut plain,
                spec: &mut spec,
                opts,
                capacity: None,
            };
            run_sets(loaded, seqs, sets, &params, limit)
        }
        Some(gpu) => {
            let (drafter, opts) = gpu_spec_setup(loaded, draft, block_size)?;
            let max_seq = gpu_max_seq(gpu);
            let mut plain = gpu.session(max_seq)?;
            let mut spec = dflash::gpu::GpuSpecOn::new(gpu.session(max_seq)?, &drafter)?;
            let mut seqs = Sequences {
                plain: &mut plain,
                spec: &mut spec,
                opts: &opts,
                capacity: Some(max_seq),
            };
            seqs.warm_up()?;
            run_sets(loaded, seqs, sets, &params, limit)
        }
    }
}

/// Where the plain and speculative decodes run: a target sequence, a speculative sequence and
/// the loop's options.
pub struct Sequences<'a, E, S> {
    pub plain: &'a mut E,
    pub spec: &'a mut S,
    pub opts: &'a SpecOptions,
    /// The most positions a sequence holds (`None`: no fixed size), checked per prompt.
    pub capacity: Option<usize>,
}

/// Runs every set of `sets` on `seqs` with the greedy `params` (every prompt decodes
/// `params.max_tokens` tokens).
pub fn run_sets<E: Executor, S: SpecBackend>(
    loaded: &Loaded,
    mut seqs: Sequences<'_, E, S>,
    sets: &[PathBuf],
    params: &SamplingParams,
    limit: Option<usize>,
) -> Result<Vec<SetReport>> {
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
        let (mut ad_tok, mut ad_s) = (0usize, 0f64);
        let mut choices = std::collections::BTreeMap::new();
        for p in &prompts {
            let ids = prompt_ids(loaded, Some(p), None, false)?;
            if let Some(cap) = seqs.capacity.filter(|&c| ids.len() + params.max_tokens > c) {
                bail!(
                    "prompt ({} tokens) + --max-tokens {} exceed the GPU sequence size {cap}",
                    ids.len(),
                    params.max_tokens,
                );
            }
            let (plain, n, s) = seqs.plain(&ids, params)?;
            plain_tok += n;
            plain_s += s;
            let (out, n, s) = seqs.speculative(&ids, params, dflash::BlockPolicy::Fixed)?;
            spec_tok += n;
            spec_s += s;
            let (ad, n, s) = seqs.speculative(&ids, params, dflash::BlockPolicy::Adaptive)?;
            ad_tok += n;
            ad_s += s;
            let choice = ad.adaptive.as_ref().map_or("-".to_string(), |a| {
                if a.chosen <= 1 {
                    "off".to_string()
                } else {
                    format!("B={}", a.chosen)
                }
            });
            *choices.entry(choice).or_insert(0) += 1;
            if out.tokens != plain || ad.tokens != plain {
                mismatches += 1;
            }
            generated += out.tokens.len();
            stats.merge(&out.stats);
        }
        let b = seqs.opts.block_size;
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
            adaptive_tokens_per_s: ad_tok as f64 / ad_s.max(1e-12),
            adaptive_choices: choices,
            mismatches,
        });
    }
    Ok(reports)
}

impl<E: Executor, S: SpecBackend> Sequences<'_, E, S> {
    /// One untimed prompt, so the timed decodes replay captured graphs.
    fn warm_up(&mut self) -> Result<()> {
        let warm = SamplingParams {
            max_tokens: 64,
            ignore_eos: true,
            ..SamplingParams::greedy()
        };
        let ids = [0u32, 100, 200, 300];
        self.plain(&ids, &warm)?;
        self.speculative(&ids, &warm, dflash::BlockPolicy::Fixed)?;
        Ok(())
    }

    /// Plain greedy decoding of `params.max_tokens` tokens from `ids` in the emptied target
    /// sequence: the tokens, the tokens after the first one and the seconds they took.
    fn plain(&mut self, ids: &[u32], params: &SamplingParams) -> Result<(Vec<u32>, usize, f64)> {
        let e = &mut *self.plain;
        e.truncate(0)?;
        let mut tokens = vec![e.prefill_greedy(ids)?];
        let t0 = Instant::now();
        while tokens.len() < params.max_tokens {
            let next = e.decode_greedy(*tokens.last().expect("one token"))?;
            tokens.push(next);
        }
        let s = t0.elapsed().as_secs_f64();
        let n = tokens.len() - 1;
        Ok((tokens, n, s))
    }

    /// Greedy DFlash decoding of `ids` in the emptied speculative sequence: the output, the
    /// tokens after the first one and the seconds they took.
    fn speculative(
        &mut self,
        ids: &[u32],
        params: &SamplingParams,
        policy: dflash::BlockPolicy,
    ) -> Result<(dflash::SpecOutput, usize, f64)> {
        self.spec.reset()?;
        let t0 = Instant::now();
        let mut first = None;
        let mut on_token = |_, _: Option<&[f32]>| {
            first.get_or_insert_with(|| t0.elapsed().as_secs_f64());
            ControlFlow::Continue(())
        };
        let out = dflash::run_speculative_with(
            &mut *self.spec,
            self.opts,
            policy,
            ids,
            params,
            false,
            &mut on_token,
            &mut |_| {},
        )?;
        let total = t0.elapsed().as_secs_f64();
        let n = out.tokens.len().saturating_sub(1);
        Ok((out, n, total - first.unwrap_or(total)))
    }
}

/// Prints the reports as a Markdown table.
pub fn print(reports: &[SetReport]) {
    let block_size = reports.first().map_or(0, |r| r.block_size);
    println!(
        "| set | prompts | tokens | τ (block {block_size}) | rounds | acceptance by draft position | plain tok/s | DFlash tok/s | speedup | adaptive tok/s | adaptive chose | spec ≠ plain |"
    );
    println!("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---|---:|");
    for r in reports {
        let pos: Vec<String> = r
            .position_acceptance
            .iter()
            .map(|x| x.map_or("-".into(), |v| format!("{v:.2}")))
            .collect();
        println!(
            "| {} | {} | {} | {:.2} | {} | {} | {:.1} | {:.1} | {:.2}x | {:.1} | {} | {} |",
            r.name,
            r.prompts,
            r.generated_tokens,
            r.tau,
            r.rounds,
            pos.join(" "),
            r.plain_tokens_per_s,
            r.spec_tokens_per_s,
            r.spec_tokens_per_s / r.plain_tokens_per_s.max(1e-12),
            r.adaptive_tokens_per_s,
            r.adaptive_choices
                .iter()
                .map(|(c, n)| format!("{c} ×{n}"))
                .collect::<Vec<_>>()
                .join(", "),
            r.mismatches
        );
    }
}
