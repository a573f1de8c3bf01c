//! `gpu-dflash`: DFlash speculative decoding on the GPU at real gpt-oss-20b dimensions
//! (`GpuModel::synthetic`, random device weights) with synthetic drafters of z-lab shape
//! (hidden 2880, 32 heads / 8 KV heads of 128, intermediate 3 × hidden, full non-causal
//! attention, `target_layer_ids` from `dflash::config::build_target_layer_ids(24, layers)`,
//! random device weights) of 1, 3 and 5 layers.
//!
//! (a) Round cost per block size B = 2, 4, 8, 16: draft forward (+ the B − 1 draft ids back),
//!     verify(B) (+ the B target ids back), context append of the committed tokens (timed for
//!     B of them, the most a round commits), against one greedy decode step; round / decode is
//!     the break-even τ.
//! (b) Controlled acceptance at B = 8: a drafter that runs the real draft forward (its cost) but
//!     proposes the target's greedy continuation (from a greedy run of the same prompt through
//!     8-token verify passes), each position accepted independently with probability α (the
//!     first rejected one replaced by a random wrong token), α solved from
//!     τ = (1 − α⁸)/(1 − α) for τ = 4.3, 5.6, 6.3. Effective tokens/s of the whole speculative
//!     generation (`dflash::run_speculative` on `dflash::gpu::GpuSpec`, wall clock) against
//!     plain greedy decoding of the same tokens.
//!
//! Writes markdown (stdout and `<json stem>.md`) and JSON (`--json`).

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use clap::Parser;
use dflash::controlled::{accepted_for, alpha_for_tau, synthetic_drafter_config, van_der_corput};
use dflash::gpu::GpuSpec;
use dflash::{DrafterConfig, Rows, SpecBackend, SpecError, SpecOptions, Want};
use model::sampling::SamplingParams;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::Serialize;
use tilert::arena::dtoh;
use tilert::draft::{GpuDraftSession, GpuDrafter};
use tilert::exec::GpuSession;
use ultra_benches::median;

#[derive(Parser)]
struct Args {
    /// Write the full results here (JSON); the markdown goes beside it.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Prompt length.
    #[arg(long, default_value_t = 64)]
    prompt: usize,
    /// Tokens generated per controlled-acceptance run.
    #[arg(long, default_value_t = 384)]
    tokens: usize,
    /// Session capacity.
    #[arg(long, default_value_t = 2048)]
    max_seq: usize,
    /// Drafter depths measured (comma-separated).
    #[arg(long, default_value = "1,3,5", value_delimiter = ',')]
    draft_layers: Vec<usize>,
}

#[derive(Serialize)]
struct RoundRow {
    draft_layers: usize,
    block: usize,
    draft_ms: f64,
    verify_ms: f64,
    context_ms: f64,
    round_ms: f64,
    break_even_tau: f64,
}

#[derive(Serialize)]
struct ControlledRow {
    draft_layers: usize,
    target_tau: f64,
    alpha: f64,
    measured_tau: f64,
    rounds: u64,
    tokens: usize,
    ms: f64,
    tokens_per_s: f64,
    speedup: f64,
    identical_to_reference: bool,
}

#[derive(Serialize)]
struct Report {
    device: String,
    date: String,
    drafter_shape: String,
    drafter_weight_bytes: Vec<(usize, usize)>,
    decode_ms: f64,
    plain_tokens_per_s: f64,
    /// First token where plain (T = 1) and 8-token-verify greedy continuations differ.
    first_divergence_decode_vs_verify: Option<usize>,
    rounds: Vec<RoundRow>,
    controlled: Vec<ControlledRow>,
}

fn drafter_config(layers: usize, vocab: usize, target_layers: usize) -> Result<DrafterConfig> {
    Ok(synthetic_drafter_config(
        2880,
        vocab,
        target_layers,
        layers,
        8,
    )?)
}

/// The controlled-acceptance drafter: the real draft forward runs (its cost), then the
/// proposals are the reference greedy tokens except the first rejected one, a random other
/// token. Drafts are accepted independently with probability `alpha` each: the number `a`
/// accepted before the first mismatch follows P(a = k) = αᵏ(1 − α) (k < B − 1), P(a = B − 1) =
/// α^(B−1), drawn by inverse CDF from a stratified sequence (van der Corput, randomly rotated),
/// so the measured τ settles on (1 − α^B)/(1 − α) within a few dozen rounds.
struct Controlled<'a, 'r> {
    inner: GpuSpec<'a>,
    reference: &'r [u32],
    prompt_len: usize,
    alpha: f64,
    rng: ChaCha20Rng,
    rotation: f64,
    round: u32,
    vocab: u32,
}

impl SpecBackend for Controlled<'_, '_> {
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn prefill_granularity(&self) -> usize {
        self.inner.prefill_granularity()
    }
    fn prefill(&mut self, chunk: &[u32], want: Option<Want>) -> Result<Option<Rows>, SpecError> {
        self.inner.prefill(chunk, want)
    }
    fn draft(&mut self, x_last: u32, block: usize, want: Want) -> Result<Rows, SpecError> {
        let start = self.inner.len();
        let Rows::Argmax(mut ids) = self.inner.draft(x_last, block, Want::Argmax)? else {
            return Err(SpecError::TargetOutput("expected argmax rows".into()));
        };
        debug_assert_eq!(want, Want::Argmax);
        let u = (van_der_corput(self.round) + self.rotation).fract();
        self.round += 1;
        let accept = accepted_for(u, self.alpha, block - 1);
        for (i, id) in ids.iter_mut().enumerate() {
            // Draft i is for position start + 1 + i = generated token start + 1 + i − prompt.
            let Some(&r) = self.reference.get(start + 1 + i - self.prompt_len) else {
                continue;
            };
            *id = if i != accept {
                r
            } else {
                let wrong = self.rng.random_range(0..self.vocab - 1);
                if wrong >= r {
                    wrong + 1
                } else {
                    wrong
                }
            };
        }
        Ok(Rows::Argmax(ids))
    }
    fn verify(&mut self, tokens: &[u32], want: Want) -> Result<Rows, SpecError> {
        self.inner.verify(tokens, want)
    }
    fn commit(&mut self, keep: usize) -> Result<(), SpecError> {
        self.inner.commit(keep)
    }
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_tokens,
        ignore_eos: true,
        ..SamplingParams::greedy()
    }
}

/// Plain greedy decoding of `n` tokens (a fresh sequence in `s`); returns them and the wall ms.
fn plain(s: &mut GpuSession, prompt: &[u32], n: usize) -> Result<(Vec<u32>, f64)> {
    s.truncate(0)?;
    let t0 = Instant::now();
    let mut out = vec![s.prefill_greedy(prompt)?];
    while out.len() < n {
        out.push(s.decode_greedy(*out.last().unwrap())?);
    }
    Ok((out, t0.elapsed().as_secs_f64() * 1e3))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let gpu = ultra_benches::synthetic_gpt_oss_20b()?;
    let config = Arc::new(gpu.config().clone());
    let info = gpu.device().info.clone();
    let stream = gpu.stream().clone();
    let v = config.vocab_size;
    let nl = config.layers.len();
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let prompt: Vec<u32> = (0..args.prompt)
        .map(|_| rng.random_range(0..v as u32))
        .collect();

    // Plain greedy: the reference continuation and the decode rate (second, warm run).
    let mut s = gpu.session(args.max_seq)?;
    let (reference, _) = plain(&mut s, &prompt, args.tokens)?;
    let (again, plain_ms) = plain(&mut s, &prompt, args.tokens)?;
    anyhow::ensure!(
        again == reference,
        "plain greedy decoding is not deterministic"
    );
    let plain_tps = args.tokens as f64 * 1e3 / plain_ms;
    // One decode step, warm, after the prompt.
    s.truncate(0)?;
    let mut tok = s.prefill_greedy(&prompt)?;
    let mut decode = Vec::new();
    for _ in 0..48 {
        let t0 = Instant::now();
        tok = s.decode_greedy(tok)?;
        decode.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let decode_ms = median(&decode[16..]);
    eprintln!("plain greedy: {plain_tps:.1} tok/s, decode step {decode_ms:.3} ms");

    // The controlled drafter's reference: the target's greedy continuation as 8-token verify
    // passes compute it (row 0 of a pass [token, pad × 7], the other rows dropped). Plain decode
    // steps (T = 1) and verify rows (T = 8) sum in different orders, and on random weights the
    // top-2 logit gap is often below that difference, so the T = 1 continuation is not what
    // verification accepts.
    s.truncate(0)?;
    s.set_capture(&[])?;
    let mut verify_reference = vec![s.prefill_greedy(&prompt)?];
    while verify_reference.len() < args.tokens {
        let tok = *verify_reference.last().unwrap();
        let len = s.len();
        s.forward_device(&[tok; 8])?;
        let row0 = dtoh(&stream, s.argmax_device(1))?[0];
        s.truncate(len + 1)?;
        verify_reference.push(row0);
    }
    let first_divergence = reference
        .iter()
        .zip(&verify_reference)
        .position(|(a, b)| a != b);
    eprintln!("T = 1 and T = 8 greedy continuations first differ at token {first_divergence:?}");
    let reference = verify_reference;

    let mut rounds = Vec::new();
    let mut controlled = Vec::new();
    let mut sizes = Vec::new();
    for &layers in &args.draft_layers {
        let dc = drafter_config(layers, v, nl)?;
        let gd = GpuDrafter::synthetic(&gpu, dc, 99 + layers as u64)?;
        sizes.push((layers, gd.weight_bytes()));
        eprintln!(
            "drafter: {layers} layers, {:.2} GB",
            gd.weight_bytes() as f64 / 1e9
        );

        // (a) Round cost.
        s.truncate(0)?;
        s.set_capture(gd.hidden_indices())?;
        let mut ds: GpuDraftSession = gd.session(args.max_seq)?;
        for chunk in prompt.chunks(16) {
            s.forward_device(chunk)?;
            ds.append_context(&s, chunk.len())?;
        }
        let base = s.len();
        for block in [2usize, 4, 8, 16] {
            let (mut td, mut tv, mut tc) = (Vec::new(), Vec::new(), Vec::new());
            let mut x = reference[0];
            for rep in 0..12 {
                let t0 = Instant::now();
                ds.draft(x, block)?;
                let drafts = dtoh(&stream, ds.argmax_device(block - 1))?;
                let t1 = Instant::now();
                let mut toks = vec![x];
                toks.extend_from_slice(&drafts);
                s.forward_device(&toks)?;
                let ids = dtoh(&stream, s.argmax_device(block))?;
                let t2 = Instant::now();
                ds.append_context(&s, block)?;
                stream.synchronize()?;
                let t3 = Instant::now();
                s.truncate(base)?;
                ds.truncate(base)?;
                x = ids[0];
                if rep >= 2 {
                    td.push((t1 - t0).as_secs_f64() * 1e3);
                    tv.push((t2 - t1).as_secs_f64() * 1e3);
                    tc.push((t3 - t2).as_secs_f64() * 1e3);
                }
            }
            let (d, vv, c) = (median(&td), median(&tv), median(&tc));
            let round = d + vv + c;
            eprintln!("L={layers} B={block}: draft {d:.3} verify {vv:.3} context {c:.3} ms");
            rounds.push(RoundRow {
                draft_layers: layers,
                block,
                draft_ms: d,
                verify_ms: vv,
                context_ms: c,
                round_ms: round,
                break_even_tau: round / decode_ms,
            });
        }

        // (b) Controlled acceptance at B = 8.
        let opts = SpecOptions {
            block_size: 8,
            eos_token_ids: Vec::new(),
            prefill_chunk: None,
        };
        for target_tau in [4.3, 5.6, 6.3] {
            let alpha = alpha_for_tau(target_tau, 8);
            let mut best: Option<ControlledRow> = None;
            // Run 0 captures the graphs it meets; runs 1 and 2 are timed (the faster reported).
            for run in 0..3 {
                s.truncate(0)?;
                let spec = GpuSpec::with_draft_session(&mut s, ds)?;
                let mut c = Controlled {
                    inner: spec,
                    reference: &reference,
                    prompt_len: prompt.len(),
                    alpha,
                    rng: ChaCha20Rng::seed_from_u64(1000 + run),
                    rotation: ChaCha20Rng::seed_from_u64(run).random(),
                    round: 0,
                    vocab: v as u32,
                };
                let t0 = Instant::now();
                let out = dflash::run_speculative(
                    &mut c,
                    &opts,
                    &prompt,
                    &greedy(args.tokens),
                    &mut |_| ControlFlow::Continue(()),
                    &mut |_| {},
                )?;
                let ms = t0.elapsed().as_secs_f64() * 1e3;
                ds = c.inner.into_draft_session();
                let tps = out.tokens.len() as f64 * 1e3 / ms;
                let row = ControlledRow {
                    draft_layers: layers,
                    target_tau,
                    alpha,
                    measured_tau: out.stats.tau().unwrap_or(f64::NAN),
                    rounds: out.stats.rounds(),
                    tokens: out.tokens.len(),
                    ms,
                    tokens_per_s: tps,
                    speedup: tps / plain_tps,
                    identical_to_reference: out.tokens == reference,
                };
                if run > 0 && best.as_ref().is_none_or(|b| row.ms < b.ms) {
                    best = Some(row);
                }
            }
            let row = best.expect("timed runs");
            eprintln!(
                "L={layers} tau target {target_tau}: measured {:.2}, {:.1} tok/s ({:.2}×), identical {}",
                row.measured_tau, row.tokens_per_s, row.speedup, row.identical_to_reference
            );
            controlled.push(row);
        }
        drop(ds);
        s.set_capture(&[])?;
    }

    let report = Report {
        device: info.to_string(),
        date: "2026-11-21".into(),
        drafter_shape: "hidden 2880, 32 heads / 8 KV heads × 128, intermediate 8640, full \
                        non-causal attention, target layers build_target_layer_ids(24, L)"
            .into(),
        drafter_weight_bytes: sizes,
        decode_ms,
        plain_tokens_per_s: plain_tps,
        first_divergence_decode_vs_verify: first_divergence,
        rounds,
        controlled,
    };
    let md = markdown(&report, &args);
    println!("{md}");
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
        std::fs::write(path.with_extension("md"), &md)?;
    }
    Ok(())
}

fn markdown(r: &Report, args: &Args) -> String {
    let mut s = format!(
        "DFlash on the GPU: gpt-oss-20b dimensions, synthetic weights — {}\n\n\
         Drafters: {} (random device weights); sizes {}.\n\n",
        r.device,
        r.drafter_shape,
        r.drafter_weight_bytes
            .iter()
            .map(|(l, b)| format!("{l} layer(s) {:.2} GB", *b as f64 / 1e9))
            .collect::<Vec<_>>()
            .join(", ")
    );
    s += &format!(
        "Plain greedy decoding: **{:.1} tok/s** ({} tokens after a {}-token prompt, wall clock); \
         one decode step {:.3} ms.\n\n",
        r.plain_tokens_per_s, args.tokens, args.prompt, r.decode_ms
    );
    s += "Round cost (graphs; draft = draft forward + ids back, verify = verify(B) + ids back, \
          context = appending B committed tokens):\n\n\
          | drafter layers | B | draft ms | verify ms | context ms | round ms | round / decode (break-even τ) |\n\
          |---:|---:|---:|---:|---:|---:|---:|\n";
    for x in &r.rounds {
        s += &format!(
            "| {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.2} |\n",
            x.draft_layers,
            x.block,
            x.draft_ms,
            x.verify_ms,
            x.context_ms,
            x.round_ms,
            x.break_even_tau
        );
    }
    s += &format!(
        "\nThe controlled drafter proposes the target's greedy continuation as 8-token verify \
         passes compute it (plain T = 1 decode steps and T = 8 verify rows sum in different \
         orders; on random weights the top-2 logit gap is often smaller, and the two greedy \
         continuations first differ at token {}).\n",
        r.first_divergence_decode_vs_verify
            .map_or("— (never)".to_string(), |i| i.to_string())
    );
    s += &format!(
        "\nControlled acceptance, B = 8 ({} tokens, `dflash::run_speculative` on `GpuSpec`, \
         wall clock, faster of 2 warm runs):\n\n\
         | drafter layers | τ target | α | τ measured | rounds | tok/s | × plain decode | output = reference |\n\
         |---:|---:|---:|---:|---:|---:|---:|:---:|\n",
        args.tokens
    );
    for x in &r.controlled {
        s += &format!(
            "| {} | {:.1} | {:.3} | {:.2} | {} | {:.1} | {:.2} | {} |\n",
            x.draft_layers,
            x.target_tau,
            x.alpha,
            x.measured_tau,
            x.rounds,
            x.tokens_per_s,
            x.speedup,
            if x.identical_to_reference {
                "yes"
            } else {
                "no"
            }
        );
    }
    s
}
