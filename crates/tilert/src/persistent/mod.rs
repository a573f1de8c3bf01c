//! The persistent engine's host side: a step plan ([`model::plan::Plan`]) compiled into per-SM
//! instruction streams for one resident kernel per step (grid = SM count, one block per SM), and
//! the checks those streams must pass before they are uploaded.
//!
//! * [`abi`]: the instruction record, the per-phase argument block and the opcodes, mirrored
//!   from `kernels/common/persistent_abi.cuh` (layout-tested);
//! * [`compile`]: plan → phases → tiles with their declared accesses → dependencies → counters
//!   → a static list schedule ([`compile::compile`], [`compile::Program`]);
//! * [`validate`]: the schedule validator (structure, per-step counter totals, a two-step
//!   simulation across the `u32` wrap of the epoch targets, and a happens-before race check);
//! * [`device`]: a program on the GPU run by the resident runtime (`kernels/common/persistent.cuh`,
//!   `kernels/persistent.cu`) with schedule-replay tile bodies ([`Replay`]);
//! * [`session`]: the engine itself, [`PersistentSession`] — the decode program bound to a
//!   session's caches and buffers, run by `pk_step` (the ops' math through the standalone
//!   kernels' device functions), a [`model::Executor`];
//! * [`timeline`]: the per-SM timeline of a step (Chrome-trace JSON, SVG, per-layer overhead).
//!
//! Status: the decode step of gpt-oss-style models (fused QKV + RoPE, the fused router, MXFP4
//! experts) runs on the engine (`--engine persistent`); verify blocks, batched rows, dense MLPs
//! and q/k-norm attention are clear errors (prefill runs on the graph executor).
//!
//! Cross-SM dependencies are monotonic counters with epoch targets: nothing is reset between
//! steps, the step number is passed in, and an instruction waits for `(step + 1) · target`.

pub mod abi;
pub mod compile;
pub mod device;
pub mod session;
pub mod timeline;
pub mod validate;

pub use compile::{compile, compile_tuned, CompileOptions, Program, Tuning};
pub use device::Replay;
pub use session::PersistentSession;
pub use validate::{validate, Report, ScheduleError};

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use model::config::ModelConfig;
    use model::cpu::toy::{self, ToyExperts};
    use model::plan::tp::{shard_plan, TpLayout};
    use model::plan::{PassShape, Plan};

    use super::abi::Opcode;
    use super::compile::{phases_of, Space};
    use super::*;
    use crate::exec::DEVICE_STORAGE;

    fn fixture(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures")
            .join(rel)
    }

    /// The toy model of every architecture and every fixture checkpoint's config.
    fn targets() -> Vec<(String, ModelConfig)> {
        let mut v = vec![
            ("toy gpt-oss".into(), toy::gpt_oss(1, ToyExperts::Mxfp4).0),
            (
                "toy qwen3-moe".into(),
                toy::qwen3_moe(2, ToyExperts::Dense).0,
            ),
            (
                "toy mimo-v2-flash".into(),
                toy::mimo_v2_flash(3, ToyExperts::Dense).0,
            ),
        ];
        for rel in [
            "gpt-oss/bf16",
            "gpt-oss/mxfp4",
            "qwen3-moe/native",
            "mimo-v2-flash/native",
            "mimo-v2/fp4",
        ] {
            v.push((rel.into(), ModelConfig::from_dir(&fixture(rel)).unwrap()));
        }
        v
    }

    fn shapes() -> Vec<PassShape> {
        vec![
            PassShape::decode(0).with_sample(),
            PassShape::decode(37),
            PassShape::verify(4, 9).with_sample(),
            PassShape::verify(16, 0).with_sample(),
            PassShape::batched(8, 3).with_sample(),
            PassShape::prefill(16, 0, false),
            PassShape::prefill(5, 16, true),
        ]
    }

    fn options() -> Vec<CompileOptions> {
        let h = CompileOptions::h100();
        vec![
            h,
            CompileOptions {
                attn_splits: 4,
                ..h.with_sms(16)
            },
            CompileOptions {
                attn_splits: 1,
                ..h.with_sms(3)
            },
            h.with_sms(1),
        ]
    }

    /// Every pass shape of every architecture's toy model and fixture compiles, on several
    /// machine sizes and attention splits, into streams the validator accepts.
    #[test]
    fn every_fixture_and_toy_plan_compiles_to_a_valid_schedule() {
        for (name, cfg) in targets() {
            for shape in shapes() {
                let plan = Plan::new(&cfg, DEVICE_STORAGE, shape).unwrap();
                for opts in options() {
                    let what = format!("{name}, {shape}, {} SMs", opts.sms);
                    let prog = compile(&plan, &opts).unwrap_or_else(|e| panic!("{what}: {e}"));
                    let r = validate(&prog).unwrap_or_else(|e| panic!("{what}: {e}"));
                    assert_eq!(r.tiles, prog.tiles(), "{what}");
                    assert!(r.instructions <= r.tiles && r.instructions > 0, "{what}");
                    assert!(r.pairs_checked > 0, "{what}");
                    // Every op of the plan has at least one phase, in order.
                    let ops: Vec<usize> = prog.phases.iter().map(|p| p.op).collect();
                    assert!(ops.windows(2).all(|w| w[0] <= w[1]), "{what}");
                    let mut uniq = ops.clone();
                    uniq.dedup();
                    assert_eq!(uniq.len(), plan.ops.len(), "{what}");
                    // The model's bytes take at least bytes/bandwidth.
                    let bytes = plan.totals().weight_bytes;
                    assert!(
                        prog.predicted_s >= bytes / opts.bandwidth * 0.99,
                        "{what}: {} s for {bytes} bytes",
                        prog.predicted_s
                    );
                }
            }
        }
    }

    /// The gpt-oss-20b-size decode on an H100: a full-size schedule validates, every SM has
    /// work, and the list scheduler's prediction is near the byte roofline.
    #[test]
    fn gpt_oss_20b_decode_schedule() {
        let text = std::fs::read_to_string(fixture("configs/gpt-oss-20b.json")).unwrap();
        let cfg = ModelConfig::from_json_str(&text).unwrap();
        let plan = Plan::new(&cfg, DEVICE_STORAGE, PassShape::decode(512).with_sample()).unwrap();
        let opts = CompileOptions::h100();
        let prog = compile(&plan, &opts).unwrap();
        let r = validate(&prog).unwrap();
        // Projections are cut into about one tile per SM (whole aligned row groups: 120 of
        // 2880 / 24 rows on 132 SMs).
        let busy = prog.streams.iter().filter(|s| !s.is_empty()).count();
        assert!(
            busy * 10 >= opts.sms * 9,
            "{busy} of {} SMs have work",
            opts.sms
        );
        let roofline = plan.totals().weight_bytes / opts.bandwidth;
        eprintln!(
            "gpt-oss-20b decode: {r:?}; predicted {:.1} µs, byte roofline {:.1} µs",
            prog.predicted_s * 1e6,
            roofline * 1e6
        );
        // The model's fixed cost is ~1 µs a tile: 24 layers of ~9 dependent phases stay
        // within 20 µs a layer of the bytes' time (the imbalance of whole row groups included).
        assert!(
            prog.predicted_s < 1.1 * roofline + 24.0 * 20e-6,
            "predicted {} s vs roofline {roofline} s ({r:?})",
            prog.predicted_s
        );
    }

    /// With the session's tuning (the graph executor's launch shapes), expert tiles are whole
    /// CTAs of that shape and every layer's attention has its given key splits; the schedule
    /// still validates and keeps every SM busy.
    #[test]
    fn tuned_programs_cut_tiles_at_the_graph_executors_launches() {
        let text = std::fs::read_to_string(fixture("configs/gpt-oss-20b.json")).unwrap();
        let cfg = ModelConfig::from_json_str(&text).unwrap();
        let plan = Plan::new(&cfg, DEVICE_STORAGE, PassShape::decode(0).with_sample()).unwrap();
        let layers = cfg.layers.len();
        let tuning = Tuning {
            attn_splits: (0..layers).map(|l| 1 + l % 5).collect(),
            gate_up: (11, 16),
            down: (2, 8),
        };
        let prog = compile_tuned(&plan, &CompileOptions::h100(), &tuning).unwrap();
        validate(&prog).unwrap();
        for ph in &prog.phases {
            match ph.opcode {
                Opcode::Attention => {
                    let l = ph.layer.unwrap();
                    assert_eq!(ph.dims[6] as usize, 1 + l % 5, "layer {l}");
                }
                Opcode::ExpertGateUp => {
                    // Act columns per tile: whole CTAs of 11 row groups (88 columns).
                    assert_eq!(ph.dims[6] % 88, 0, "{:?}", ph.dims);
                    assert_eq!(&ph.dims[9..11], &[11, 16]);
                }
                Opcode::ExpertDown => {
                    assert_eq!(ph.dims[6] % 32, 0, "{:?}", ph.dims);
                    assert_eq!(&ph.dims[7..9], &[2, 8]);
                }
                _ => {}
            }
        }
        // The attention of a 1-split layer has no combine phase; the others have one.
        let combines = prog
            .phases
            .iter()
            .filter(|p| p.opcode == Opcode::AttnCombine)
            .count();
        assert_eq!(combines, (0..layers).filter(|l| l % 5 != 0).count());
    }

    /// The argument layout `pk_step`'s bodies read (kernels/persistent.cu): per opcode, the
    /// operand, dim and float slots the compiler lays out (the session fills the *session*
    /// dims), within one argument block.
    #[test]
    fn argument_blocks_have_the_slots_pk_step_reads() {
        use super::abi::{PK_ARG_DIMS, PK_ARG_FLOATS, PK_ARG_PTRS};
        let want = |op: Opcode| -> Option<(usize, usize, usize)> {
            Some(match op {
                Opcode::Embed => (3, 4, 1),
                Opcode::RmsNorm => (3, 4, 1),
                Opcode::Qkv => (10, 10, 3),
                Opcode::Attention => (6, 8, 1),
                Opcode::AttnCombine => (4, 6, 0),
                Opcode::LinearResidual => (4, 5, 0),
                Opcode::RouterLogits => (4, 5, 0),
                Opcode::RouterTopK => (5, 7, 1),
                Opcode::ExpertGateUp => (7, 11, 2),
                Opcode::ExpertDown => (8, 9, 0),
                Opcode::CombineNorm => (5, 3, 1),
                Opcode::LmHead => (4, 6, 0),
                Opcode::Argmax => (3, 3, 0),
                Opcode::MlpGateUp | Opcode::MlpDown => return None,
            })
        };
        for (name, cfg) in targets() {
            let plan = Plan::new(&cfg, DEVICE_STORAGE, PassShape::decode(9).with_sample()).unwrap();
            for ph in phases_of(&plan, &CompileOptions::h100()).unwrap() {
                assert!(ph.operands.len() <= PK_ARG_PTRS, "{name}: {:?}", ph.opcode);
                assert!(ph.dims.len() <= PK_ARG_DIMS, "{name}: {:?}", ph.opcode);
                assert!(ph.floats.len() <= PK_ARG_FLOATS, "{name}: {:?}", ph.opcode);
                if let Some(w) = want(ph.opcode) {
                    let got = (ph.operands.len(), ph.dims.len(), ph.floats.len());
                    assert_eq!(got, w, "{name}: {:?}", ph.opcode);
                }
            }
        }
    }

    /// Dependencies are as fine as the data: attention of KV group g waits only for the QKV
    /// tiles of its own heads, an expert's down projection only for its own slot's gate/up
    /// tiles; no wait targets a whole earlier layer.
    #[test]
    fn waits_follow_the_data_not_the_phase() {
        let cfg = toy::gpt_oss(1, ToyExperts::Mxfp4).0;
        let plan = Plan::new(&cfg, DEVICE_STORAGE, PassShape::decode(0).with_sample()).unwrap();
        let opts = CompileOptions::h100();
        let prog = compile(&plan, &opts).unwrap();
        validate(&prog).unwrap();
        // Counter → (phase, tiles) of its signallers.
        let mut signallers: Vec<Vec<(u32, u32)>> = vec![Vec::new(); prog.counters.len()];
        for s in &prog.streams {
            for i in s {
                for &c in i.signals() {
                    for t in i.tile_begin..i.tile_end {
                        signallers[c as usize].push((i.phase, t));
                    }
                }
            }
        }
        let phase = |op: Opcode| {
            prog.phases
                .iter()
                .position(|p| p.opcode == op && p.layer == Some(0))
                .unwrap()
        };
        let (qkv, attn) = (phase(Opcode::Qkv), phase(Opcode::Attention));
        // The QKV tiles a group needs: those writing its q heads, its k head or its v head.
        let g = &cfg.layers[0];
        let (grp, hd) = (g.n_heads / g.n_kv_heads, g.head_dim);
        for s in &prog.streams {
            for i in s.iter().filter(|i| i.phase as usize == attn) {
                let mut want: Vec<u32> = Vec::new();
                for t in i.tile_begin..i.tile_end {
                    let gi = t as usize / (prog.phases[attn].dims[6] as usize);
                    let mine = |r: &compile::Region| match r.space {
                        Space::Plan(model::plan::Buf::Q(_)) => {
                            r.cols.start < ((gi + 1) * grp * hd) as u32
                                && r.cols.end > (gi * grp * hd) as u32
                        }
                        Space::Plan(model::plan::Buf::Kv { .. }) => {
                            let k = (gi * hd) as u32..((gi + 1) * hd) as u32;
                            let v0 = (g.n_kv_heads * hd + gi * g.v_head_dim) as u32;
                            let v = v0..v0 + g.v_head_dim as u32;
                            (r.cols.start < k.end && r.cols.end > k.start)
                                || (r.cols.start < v.end && r.cols.end > v.start)
                        }
                        _ => false,
                    };
                    for (qt, acc) in prog.phases[qkv].tiles.iter().enumerate() {
                        if acc.iter().any(|a| a.write && mine(&a.region)) {
                            want.push(qt as u32);
                        }
                    }
                }
                want.sort_unstable();
                want.dedup();
                let mut got: Vec<u32> = i
                    .waits()
                    .flat_map(|(c, _)| signallers[c as usize].iter())
                    .filter(|(p, _)| *p as usize == qkv)
                    .map(|(_, t)| *t)
                    .collect();
                got.sort_unstable();
                assert_eq!(got, want, "{i:?}");
                assert!(want.len() < prog.phases[qkv].n_tiles());
            }
        }
        let (gu, down) = (phase(Opcode::ExpertGateUp), phase(Opcode::ExpertDown));
        let gu_chunks = prog.phases[gu].n_tiles() / cfg.top_k;
        for s in &prog.streams {
            for i in s.iter().filter(|i| i.phase as usize == down) {
                let slots: Vec<u32> = i
                    .waits()
                    .flat_map(|(c, _)| signallers[c as usize].iter())
                    .filter(|(p, _)| *p as usize == gu)
                    .map(|(_, t)| *t / gu_chunks as u32)
                    .collect();
                assert_eq!(slots.len(), gu_chunks, "{i:?}");
                let down_chunks = prog.phases[down].n_tiles() as u32 / cfg.top_k as u32;
                assert!(slots.iter().all(|&s| s == i.tile_begin / down_chunks));
            }
        }
    }

    fn small() -> Program {
        let cfg = toy::qwen3_moe(2, ToyExperts::Dense).0;
        let plan = Plan::new(&cfg, DEVICE_STORAGE, PassShape::verify(3, 5).with_sample()).unwrap();
        compile(&plan, &CompileOptions::h100().with_sms(8)).unwrap()
    }

    /// The validator rejects broken schedules: a dropped wait (race), a wrong target (counter
    /// totals), a wait on work queued behind it (deadlock), a tile run twice or never.
    #[test]
    fn the_validator_catches_broken_schedules() {
        let good = small();
        validate(&good).unwrap();
        // Drop the waits of the first attention instruction: it races with the QKV tiles.
        let mut p = good.clone();
        let (sm, at) = find(&p, |i| {
            i.opcode == Opcode::Attention as u32 && i.n_waits > 0
        });
        p.streams[sm][at].n_waits = 0;
        let e = validate(&p).unwrap_err();
        assert!(matches!(e, ScheduleError::Race { .. }), "{e}");
        // A target short of the counter's signals.
        let mut p = good.clone();
        let (sm, at) = find(&p, |i| i.n_waits > 0);
        p.streams[sm][at].wait_target[0] += 1;
        let e = validate(&p).unwrap_err();
        assert!(matches!(e, ScheduleError::Counter { .. }), "{e}");
        // Move a producer behind its consumer on the same SM: a deadlock.
        let mut p = good.clone();
        let (sm, at) = find(&p, |i| {
            i.opcode == Opcode::Attention as u32 && i.n_waits > 0
        });
        let c = p.streams[sm][at].wait_counter[0];
        let (psm, pat) = find(&p, |i| i.signals().contains(&c));
        let producer = p.streams[psm].remove(pat);
        let at = if psm == sm && pat < at { at - 1 } else { at };
        p.streams[sm].insert(at + 1, producer);
        let e = validate(&p).unwrap_err();
        assert!(matches!(e, ScheduleError::Deadlock { .. }), "{e}");
        assert!(e.to_string().contains("attention"), "{e}");
        // A tile twice, and a tile never.
        let mut p = good.clone();
        let i = p.streams[0][0];
        p.streams[1].insert(0, i);
        let e = validate(&p).unwrap_err();
        assert!(matches!(e, ScheduleError::Coverage { times: 2, .. }), "{e}");
        let mut p = good;
        let last = p.streams.iter().rposition(|s| !s.is_empty()).unwrap();
        let i = p.streams[last].pop().unwrap();
        for c in i.signals() {
            p.counters[*c as usize] -= i.signal_add;
        }
        let e = validate(&p).unwrap_err();
        assert!(matches!(e, ScheduleError::Coverage { times: 0, .. }), "{e}");
    }

    fn find(p: &Program, f: impl Fn(&abi::PkInstr) -> bool) -> (usize, usize) {
        for (sm, s) in p.streams.iter().enumerate() {
            if let Some(at) = s.iter().position(&f) {
                return (sm, at);
            }
        }
        panic!("no such instruction");
    }

    /// Plans this engine does not run are errors naming the op or the shape.
    #[test]
    fn unsupported_plans_are_clear_errors() {
        let cfg = toy::gpt_oss(1, ToyExperts::Mxfp4).0;
        let plan = Plan::new(&cfg, DEVICE_STORAGE, PassShape::decode(0)).unwrap();
        let opts = CompileOptions::h100();
        let layout = TpLayout::new(&cfg, 2, true).unwrap();
        let sharded = shard_plan(&plan, &cfg, &layout).unwrap();
        let e = compile(&sharded, &opts).unwrap_err().to_string();
        assert!(e.contains("2 ranks"), "{e}");
        let big = Plan::new(&cfg, DEVICE_STORAGE, PassShape::verify(17, 0)).unwrap();
        assert!(compile(&big, &opts)
            .unwrap_err()
            .to_string()
            .contains("17 rows"));
        let e = compile(&plan, &CompileOptions { sms: 0, ..opts })
            .unwrap_err()
            .to_string();
        assert!(e.contains("must be positive"), "{e}");
        let e = compile(
            &plan,
            &CompileOptions {
                attn_splits: 65,
                ..opts
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("at most 64 attention splits"), "{e}");
        // The phases name every buffer an op touches; the expert slots are parts.
        let phases = phases_of(&plan, &opts).unwrap();
        let gu = phases
            .iter()
            .find(|p| p.opcode == Opcode::ExpertGateUp)
            .unwrap();
        assert!(gu
            .tiles
            .iter()
            .all(|t| t.iter().any(|a| a.write && a.region.part.is_some())));
        assert!(phases
            .iter()
            .flat_map(|p| &p.tiles)
            .flatten()
            .any(|a| a.region.space == Space::ExpertList));
    }
}
