//! The scheduler's path for speculative requests whose drafter runs "on the device"
//! (`Backend::device_spec` / `Backend::Spec`: the GPU backend's), exercised on the CPU: a
//! backend whose speculative states are `dflash::CpuBackend`s over CPU sessions, offered through
//! the device hooks (`new_spec`, `spec_record_features`, `spec_take_features`,
//! `spec_share_block`, `spec_adopt_prefix`) instead of the host-drafter path. The same loop on
//! the same executor: its outputs, drafts and acceptances must be the host path's, with and
//! without prefix caching; cached prefixes are adopted with their drafter features; the targets
//! take their blocks from the pool (no byte reservations) and give them back on every kind of
//! end. With `spec_accept_batch` (the GPU's `accept_rows`, emulated here by the acceptance rule
//! run over the rows the states kept), sampled rounds are accepted "on the device" from the
//! streams' `acceptance_input` — the outputs are still the host path's.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use dflash::toy::{self as dtoy, ToyKind};
use dflash::{
    accept_greedy, accept_sampled, Acceptance, Drafter, Rows, SamplingDist, SpecBackend,
    SpecDecoder, SpecError, SpecOptions, Want, DEFAULT_PROB_TOLERANCE,
};
use model::config::ModelConfig;
use model::cpu::toy::{self, ToyExperts};
use model::cpu::{CpuModel, Session, SharedBlock};
use model::sampling::{FinishReason, Sampler, SamplingParams};
use serve::engine::{
    Backend, CpuBackend, EngineConfig, EngineHandle, KvBytes, SpecAccept, SpecConfig,
};

#[path = "common/engine.rs"]
#[allow(dead_code)]
mod engine_common;
use engine_common::{
    assert_blocks_freed, load_with_aborts_and_disconnects, request, run_all, settle, tokens,
};

/// The CPU executor with its speculative states offered as a device drafter's; with
/// `accept`, it also runs acceptances "on the device" (`spec_accept_batch`).
struct DeviceLike {
    cpu: CpuBackend,
    drafter: Arc<Drafter>,
    opts: SpecOptions,
    accept: bool,
}

/// A CPU speculative state that keeps the rows of its latest draft and verify where a device
/// would keep them (the emulated device acceptance reads them there).
struct State {
    inner: dflash::CpuBackend<Session, Arc<Drafter>>,
    draft_rows: Vec<f32>,
    verify_rows: Vec<f32>,
}

fn logits(rows: &Rows) -> Vec<f32> {
    match rows {
        Rows::Logits(l) => l.clone(),
        Rows::Argmax(_) => Vec::new(),
    }
}

impl SpecBackend for State {
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn prefill(&mut self, chunk: &[u32], want: Option<Want>) -> Result<Option<Rows>, SpecError> {
        self.inner.prefill(chunk, want)
    }
    fn draft(&mut self, x_last: u32, block_size: usize, want: Want) -> Result<Rows, SpecError> {
        let r = self.inner.draft(x_last, block_size, want)?;
        self.draft_rows = logits(&r);
        Ok(r)
    }
    fn verify(&mut self, tokens: &[u32], want: Want) -> Result<Rows, SpecError> {
        let r = self.inner.verify(tokens, want)?;
        self.verify_rows = logits(&r);
        Ok(r)
    }
    fn commit(&mut self, keep: usize) -> Result<(), SpecError> {
        self.inner.commit(keep)
    }
    fn reset(&mut self) -> Result<(), SpecError> {
        self.inner.reset()
    }
}

/// Blocks accepted through `spec_accept_batch` (any engine of this binary).
static DEVICE_ACCEPTED: AtomicUsize = AtomicUsize::new(0);

/// The acceptance rule over a state's kept rows and the stream's input (what `accept_rows`
/// computes on the GPU), and the uniforms it read.
fn emulated_accept(s: &State, r: &SpecAccept, v: usize) -> (Acceptance, usize) {
    let (input, params): (&dflash::AcceptanceInput, &SamplingParams) = (&r.input, r.params);
    let n = input.drafts.len();
    let (target, draft) = (&s.verify_rows, &s.draft_rows);
    let mut generated = input.generated.to_vec();
    if params.is_greedy() {
        let mut sm = Sampler::new(params).unwrap();
        let mut targets = Vec::new();
        for i in 0..=n {
            targets.push(
                sm.try_sample(&target[i * v..(i + 1) * v], input.prompt, &generated)
                    .unwrap(),
            );
            if i < n {
                generated.push(input.drafts[i]);
            }
        }
        return (accept_greedy(input.drafts, &targets).unwrap(), 0);
    }
    let mut dist = SamplingDist::new(params).unwrap();
    let (mut p, mut q) = (vec![0f32; (n + 1) * v], vec![0f32; n * v]);
    for i in 0..=n {
        let row = &target[i * v..(i + 1) * v];
        dist.probs(row, input.prompt, &generated, &mut p[i * v..(i + 1) * v])
            .unwrap();
        if i < n {
            let row = &draft[i * v..(i + 1) * v];
            dist.probs(row, input.prompt, &generated, &mut q[i * v..(i + 1) * v])
                .unwrap();
            generated.push(input.drafts[i]);
        }
    }
    let mut at = input.stream;
    let mut used = 0;
    let mut uniform = || {
        let u = at.uniform();
        at = at.next();
        used += 1;
        u
    };
    let a = accept_sampled(
        &p,
        &q,
        input.drafts,
        v,
        DEFAULT_PROB_TOLERANCE,
        &mut uniform,
    )
    .unwrap();
    (a, used)
}

impl Backend for DeviceLike {
    type Sequence = Session;
    type Spec = State;
    type Block = SharedBlock;

    fn config(&self) -> &ModelConfig {
        self.cpu.config()
    }
    fn device(&self) -> String {
        "cpu (as a device)".into()
    }
    fn kv_bytes_fn(&self) -> KvBytes {
        self.cpu.kv_bytes_fn()
    }
    fn new_sequence(&self, positions: usize) -> Result<Session> {
        self.cpu.new_sequence(positions)
    }
    fn decode_batch(&self, seqs: &mut [&mut Session], tokens: &[u32]) -> Vec<Result<Vec<f32>>> {
        self.cpu.decode_batch(seqs, tokens)
    }
    fn use_paged_kv(&mut self, block_size: usize) -> bool {
        self.cpu.use_paged_kv(block_size)
    }
    fn share_block(&self, seq: &Session, b: usize) -> Option<SharedBlock> {
        self.cpu.share_block(seq, b)
    }
    fn fork_sequence(&self, seq: &Session) -> Option<Session> {
        self.cpu.fork_sequence(seq)
    }
    fn adopt_blocks(&self, seq: &mut Session, blocks: &[SharedBlock]) -> Result<()> {
        self.cpu.adopt_blocks(seq, blocks)
    }
    fn device_spec(&self) -> Option<&SpecOptions> {
        Some(&self.opts)
    }
    fn new_spec(&self, positions: usize) -> Result<State> {
        Ok(State {
            inner: dflash::CpuBackend::new(
                self.cpu.new_sequence(positions)?,
                self.drafter.clone(),
            )?,
            draft_rows: Vec::new(),
            verify_rows: Vec::new(),
        })
    }
    fn spec_accepts_on_device(&self) -> bool {
        self.accept
    }
    fn spec_accept_batch(
        &self,
        specs: &mut [&mut State],
        rounds: &[SpecAccept],
    ) -> Option<Vec<Result<(Acceptance, usize)>>> {
        let v = self.config().vocab_size;
        DEVICE_ACCEPTED.fetch_add(specs.len(), Ordering::Relaxed);
        self.accept.then(|| {
            specs
                .iter()
                .zip(rounds)
                .map(|(s, r)| Ok(emulated_accept(s, r, v)))
                .collect()
        })
    }
    fn spec_record_features(&self, spec: &mut State) -> bool {
        spec.inner.record_features();
        true
    }
    fn spec_take_features(&self, spec: &mut State) -> Vec<f32> {
        spec.inner.take_features()
    }
    fn spec_feature_dim(&self, spec: &State) -> usize {
        spec.inner.feature_dim()
    }
    fn spec_share_block(&self, spec: &State, b: usize) -> Option<SharedBlock> {
        spec.inner.target().full_block(b)
    }
    fn spec_adopt_prefix(
        &self,
        spec: &mut State,
        blocks: &[SharedBlock],
        features: &[f32],
    ) -> Result<()> {
        Ok(spec.inner.adopt_prefix(features, |t| {
            t.adopt_prefix(blocks)
                .map_err(|e| SpecError::Target(Box::new(e)))
        })?)
    }
}

fn models() -> Vec<(CpuModel, ToyKind)> {
    let (c, w) = toy::gpt_oss(11, ToyExperts::Mxfp4);
    let a = CpuModel::new(Arc::new(c), Arc::new(w)).unwrap();
    let (c, w) = toy::mimo_v2_flash(12, ToyExperts::Dense);
    let b = CpuModel::new(Arc::new(c), Arc::new(w)).unwrap();
    vec![(a, ToyKind::ZLab), (b, ToyKind::MiMo)]
}

/// How an engine runs its speculative requests.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Path {
    Host,
    Device,
    /// The device hooks, acceptances on the "device" too.
    DeviceAccept,
}

/// An engine over `m` with a toy drafter of `kind`, its requests on `path`.
fn start(m: &CpuModel, kind: ToyKind, path: Path, caching: bool, blocks: u64) -> EngineHandle {
    let bs = 4;
    let decoder =
        Arc::new(SpecDecoder::new(m, dtoy::drafter(m.config(), kind, 8, 21), Some(4)).unwrap());
    let block_bytes = CpuBackend::new(m.clone()).kv_bytes_fn()(bs);
    let cfg = EngineConfig {
        max_running: 6,
        max_batched_tokens: 16,
        kv_budget_bytes: blocks * block_bytes,
        kv_block_size: bs,
        prefix_caching: caching,
        ..EngineConfig::default()
    };
    let m = m.clone();
    if path != Path::Host {
        let (drafter, opts) = (decoder.drafter_arc().clone(), decoder.options().clone());
        EngineHandle::start(
            move || {
                Ok(DeviceLike {
                    cpu: CpuBackend::new(m),
                    drafter,
                    opts,
                    accept: path == Path::DeviceAccept,
                })
            },
            None,
            vec![1],
            cfg,
            None,
        )
        .unwrap()
    } else {
        let spec = SpecConfig { decoder };
        EngineHandle::start(
            move || Ok(CpuBackend::new(m)),
            None,
            vec![1],
            cfg,
            Some(spec),
        )
        .unwrap()
    }
}

/// One request alone (it fills the cache), then four continuing its context at once (greedy
/// and seeded), then a chat turn extending the first. Returns the outputs, the prefix-cache
/// hits and the (draft, accepted) token counters.
fn workload(engine: &EngineHandle, ctx: &[u32]) -> (Vec<Vec<u32>>, u64, (u64, u64)) {
    let mut first = ctx.to_vec();
    first.extend(tokens(100, 3));
    let mut outs = run_all(engine, vec![request(first.clone(), 20, None)]);
    let reqs = (0..4u64)
        .map(|i| {
            let mut p = ctx.to_vec();
            p.extend(tokens(200 + i, 1 + i as usize));
            request(p, 20, (i % 2 == 1).then_some(i))
        })
        .collect();
    outs.extend(run_all(engine, reqs));
    let mut turn = first;
    turn.extend(&outs[0]);
    turn.extend(tokens(300, 5));
    outs.extend(run_all(engine, vec![request(turn, 12, Some(7))]));
    settle(engine, Duration::from_secs(30));
    let mt = engine.metrics();
    assert_eq!(mt.kv_cache_usage_perc.get(), 0.0);
    assert_eq!(mt.num_requests_running.get(), 0);
    let spec = (
        mt.spec_decode_num_draft_tokens.get(),
        mt.spec_decode_num_accepted_tokens.get(),
    );
    (outs, mt.prefix_cache_hits.get(), spec)
}

#[test]
fn device_speculative_path_equals_the_host_path_with_and_without_caching() {
    let ctx = tokens(5, 37);
    for (m, kind) in models() {
        let host = start(&m, kind, Path::Host, true, 256);
        let (want, want_hits, want_spec) = workload(&host, &ctx);
        host.shutdown();
        for (path, caching) in [
            (Path::Device, true),
            (Path::Device, false),
            (Path::DeviceAccept, true),
        ] {
            let dev = start(&m, kind, path, caching, 256);
            let before = DEVICE_ACCEPTED.load(Ordering::Relaxed);
            let (got, hits, spec) = workload(&dev, &ctx);
            dev.shutdown();
            if path == Path::DeviceAccept {
                // The sampled requests' rounds were accepted through the device hook.
                assert!(DEVICE_ACCEPTED.load(Ordering::Relaxed) > before);
            }
            assert_eq!(got, want, "{kind:?} {path:?} caching {caching}: outputs");
            assert_eq!(
                spec, want_spec,
                "{kind:?} {path:?} caching {caching}: drafts"
            );
            if caching {
                // The same cached blocks adopted, each with its drafter features.
                assert_eq!(hits, want_hits, "{kind:?}: prefix hits");
                assert!(hits >= 4 * 36 + 36, "{kind:?}: {hits} hits");
            } else {
                assert_eq!(hits, 0);
            }
        }
    }
}

#[test]
fn device_speculative_requests_wait_for_blocks_and_free_them_on_every_end() {
    let (m, kind) = models().swap_remove(0);
    // 40 blocks of 4: at most a few requests of 31..37 + 24 positions at once.
    let engine = start(&m, kind, Path::DeviceAccept, true, 40);
    let ctx = tokens(5, 30);
    let kept = load_with_aborts_and_disconnects(&engine, &ctx, 24, 24);
    for (toks, f) in kept {
        if f.reason == FinishReason::Length {
            assert_eq!(toks.len(), 24);
        }
    }
    settle(&engine, Duration::from_secs(30));
    assert_blocks_freed(&engine);
    engine.shutdown();
}
