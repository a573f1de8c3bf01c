//! The scheduler's path for speculative requests whose drafter runs "on the device"
//! (`Backend::device_spec` / `Backend::Spec`: the GPU backend's), exercised on the CPU: a
//! backend whose speculative states are `dflash::CpuBackend`s over CPU sessions, offered through
//! the device hooks (`new_spec`, `spec_record_features`, `spec_take_features`,
//! `spec_share_block`, `spec_adopt_prefix`) instead of the host-drafter path. The same loop on
//! the same executor: its outputs, drafts and acceptances must be the host path's, with and
//! without prefix caching; cached prefixes are adopted with their drafter features; the targets
//! take their blocks from the pool (no byte reservations) and give them back on every kind of
//! end.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use dflash::toy::{self as dtoy, ToyKind};
use dflash::{Drafter, SpecDecoder, SpecError, SpecOptions};
use model::config::ModelConfig;
use model::cpu::toy::{self, ToyExperts};
use model::cpu::{CpuModel, Session, SharedBlock};
use model::sampling::FinishReason;
use serve::engine::{Backend, CpuBackend, EngineConfig, EngineHandle, KvBytes, SpecConfig};

#[path = "common/engine.rs"]
#[allow(dead_code)]
mod engine_common;
use engine_common::{drain, request, run_all, tokens};

/// The CPU executor with its speculative states offered as a device drafter's.
struct DeviceLike {
    cpu: CpuBackend,
    drafter: Arc<Drafter>,
    opts: SpecOptions,
}

type State = dflash::CpuBackend<Session, Arc<Drafter>>;

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
        Ok(dflash::CpuBackend::new(
            self.cpu.new_sequence(positions)?,
            self.drafter.clone(),
        )?)
    }
    fn spec_record_features(&self, spec: &mut State) -> bool {
        spec.record_features();
        true
    }
    fn spec_take_features(&self, spec: &mut State) -> Vec<f32> {
        spec.take_features()
    }
    fn spec_feature_dim(&self, spec: &State) -> usize {
        spec.feature_dim()
    }
    fn spec_share_block(&self, spec: &State, b: usize) -> Option<SharedBlock> {
        spec.target().full_block(b)
    }
    fn spec_adopt_prefix(
        &self,
        spec: &mut State,
        blocks: &[SharedBlock],
        features: &[f32],
    ) -> Result<()> {
        Ok(spec.adopt_prefix(features, |t| {
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

/// An engine over `m` with a toy drafter of `kind`, through the device hooks (`device`) or the
/// host-drafter path.
fn start(m: &CpuModel, kind: ToyKind, device: bool, caching: bool, blocks: u64) -> EngineHandle {
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
    if device {
        let (drafter, opts) = (decoder.drafter_arc().clone(), decoder.options().clone());
        EngineHandle::start(
            move || {
                Ok(DeviceLike {
                    cpu: CpuBackend::new(m),
                    drafter,
                    opts,
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
        EngineHandle::start(move || Ok(CpuBackend::new(m)), None, vec![1], cfg, Some(spec))
            .unwrap()
    }
}

fn settle(engine: &EngineHandle) {
    let t = Instant::now();
    while engine.load().1 > 0 || engine.metrics().num_requests_running.get() != 0 {
        assert!(t.elapsed() < Duration::from_secs(30), "requests still live");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(120));
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
    settle(engine);
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
        let host = start(&m, kind, false, true, 256);
        let (want, want_hits, want_spec) = workload(&host, &ctx);
        host.shutdown();
        for caching in [true, false] {
            let dev = start(&m, kind, true, caching, 256);
            let (got, hits, spec) = workload(&dev, &ctx);
            dev.shutdown();
            assert_eq!(got, want, "{kind:?} caching {caching}: outputs");
            assert_eq!(spec, want_spec, "{kind:?} caching {caching}: drafts");
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
    let engine = start(&m, kind, true, true, 40);
    let ctx = tokens(5, 30);
    let mut keep = Vec::new();
    for i in 0..24u64 {
        let mut p = ctx.clone();
        p.extend(tokens(200 + i, 1 + (i % 7) as usize));
        let sub = engine.submit(request(p, 24, Some(i))).unwrap();
        match i % 4 {
            0 => keep.push(sub),
            1 => drop(sub.events),
            2 => {
                let mut ev = sub.events;
                let _ = ev.blocking_recv();
                engine.abort(&sub.id);
                keep.push(serve::engine::Submitted { events: ev, ..sub });
            }
            _ => {
                let mut ev = sub.events;
                let _ = ev.blocking_recv();
                let _ = ev.blocking_recv();
                drop(ev);
            }
        }
    }
    for s in keep {
        let (toks, f) = drain(s.events);
        assert!(
            matches!(f.reason, FinishReason::Length | FinishReason::Abort),
            "{f:?}"
        );
        if f.reason == FinishReason::Length {
            assert_eq!(toks.len(), 24);
        }
    }
    settle(&engine);
    let mt = engine.metrics();
    assert_eq!(mt.kv_cache_usage_perc.get(), 0.0);
    assert_eq!(mt.num_requests_running.get(), 0);
    assert!(mt.prefix_cache_hits.get() > 0);
    engine.shutdown();
}
