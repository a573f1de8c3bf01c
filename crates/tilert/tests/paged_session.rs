//! Paged GPU sessions (`tilert::exec::paged`: a `GpuKvPool` of blocks, sessions reading and
//! writing their KV through a block table) against contiguous sessions fed the same calls, on
//! every fixture checkpoint and the toy models of the three architectures: prefill, decode,
//! verify + truncation, a prefix adopted from another session's blocks (only blocks computed by
//! full aligned prefill passes are offered), a fork whose shared
//! blocks are copied on write, and batched decode mixing paged and contiguous sessions. Logits
//! must be **bit-identical** (the kernels read the same keys in the same order). The pool's
//! blocks must all be free again once the sessions are gone, and an exhausted pool is an error
//! that leaves the session as it was.
//!
//! Skipped without a GPU (fails with `ULTRA_REQUIRE_GPU=1`).

#[allow(dead_code)] // the helpers this binary does not use
mod common;

use std::sync::Arc;

use common::{fixture, FIXTURES};
use model::config::ModelConfig;
use model::cpu::toy::{self, ToyExperts};
use model::weights::Weights;
use tilert::exec::{GpuModel, GpuSession};

/// One call on a session (replayed on a contiguous session as the reference).
#[derive(Clone, Debug)]
enum Call {
    Prefill(Vec<u32>),
    Decode(u32),
    Verify(Vec<u32>),
    Truncate(usize),
}

/// Runs `call` on `s`; returns the logits it produced (empty for a truncation).
fn run(s: &mut GpuSession, call: &Call) -> Vec<Vec<f32>> {
    match call {
        Call::Prefill(t) => vec![s.prefill(t).unwrap()],
        Call::Decode(t) => vec![s.decode(*t).unwrap()],
        Call::Verify(t) => s.verify(t, &[]).unwrap().logits,
        Call::Truncate(n) => {
            s.truncate(*n).unwrap();
            Vec::new()
        }
    }
}

fn bits(v: &[Vec<f32>]) -> Vec<Vec<u32>> {
    v.iter()
        .map(|r| r.iter().map(|x| x.to_bits()).collect())
        .collect()
}

/// A paged session and its log of calls (its reference is a contiguous session replaying it).
struct Tracked {
    s: GpuSession,
    log: Vec<Call>,
}

const MAX_SEQ: usize = 256;

impl Tracked {
    /// Runs `call` on the paged session and on a fresh contiguous session replaying the whole
    /// log: the call's logits must be bit-identical.
    fn check(&mut self, gpu: &GpuModel, call: Call, what: &str) {
        let got = run(&mut self.s, &call);
        self.log.push(call);
        let mut r = gpu.session(MAX_SEQ).unwrap();
        let mut want = Vec::new();
        for c in &self.log {
            want = run(&mut r, c);
        }
        assert_eq!(r.len(), self.s.len(), "{what}: lengths");
        assert_eq!(bits(&got), bits(&want), "{what}: logits");
    }
}

fn prompt(n: usize, vocab: u32, salt: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|j| (j * 31 + salt * 7 + 3) % vocab)
        .collect()
}

fn check_model(name: &str, config: ModelConfig, weights: Weights) {
    let config = Arc::new(config);
    let gpu = GpuModel::new(0, config.clone(), &weights).unwrap();
    let vocab = config.vocab_size as u32;
    // 140 positions: longer than every sliding ring of the contiguous reference.
    let p = prompt(140, vocab, 1);
    for bs in [16usize, 7] {
        let pool = gpu.kv_pool(bs, 3 * MAX_SEQ.div_ceil(bs) + 4).unwrap();
        let what = |w: &str| format!("{name} block {bs}: {w}");
        {
            let mut a = Tracked {
                s: gpu.session_paged(&pool, MAX_SEQ).unwrap(),
                log: Vec::new(),
            };
            a.check(&gpu, Call::Prefill(p.clone()), &what("prefill"));
            assert_eq!(a.s.kv_blocks_held(), 140usize.div_ceil(bs));
            for t in [5, 9, 1] {
                a.check(&gpu, Call::Decode(t), &what("decode"));
            }
            a.check(&gpu, Call::Verify(vec![4, 8, 15, 16, 23]), &what("verify"));
            a.check(&gpu, Call::Truncate(a.s.len() - 3), &what("truncate"));
            a.check(
                &gpu,
                Call::Decode(42 % vocab),
                &what("decode after truncate"),
            );

            // A prefix adopted from `a`'s full blocks (whole prefill chunks when bs = 16, so
            // the rest's chunks are the contiguous prefill's).
            if bs == 16 {
                let k = p.len() / bs;
                // Block k holds the prompt's last partial pass and decoded positions: not
                // offered (a prefill would compute those positions in other passes).
                assert!(a.s.len() >= (k + 1) * bs);
                assert!(
                    a.s.full_block(k).is_none(),
                    "{}",
                    what("unaligned block offered")
                );
                let blocks: Vec<_> = (0..k).map(|b| a.s.full_block(b).unwrap()).collect();
                let mut b = gpu.session_paged(&pool, MAX_SEQ).unwrap();
                b.adopt_prefix(&blocks).unwrap();
                assert_eq!(b.len(), k * bs);
                let got = b.prefill(&p[k * bs..]).unwrap();
                let mut r = gpu.session(MAX_SEQ).unwrap();
                let want = r.prefill(&p).unwrap();
                assert_eq!(
                    bits(&[got]),
                    bits(&[want]),
                    "{}",
                    what("prefill after an adopted prefix")
                );
                let mut bt = Tracked {
                    s: b,
                    log: vec![Call::Prefill(p.clone())],
                };
                bt.check(&gpu, Call::Decode(3), &what("decode after adopt"));
                // `a` still reads its own (shared) blocks unchanged.
                a.check(&gpu, Call::Decode(6), &what("decode of the lender"));
            }

            // A fork: every block shared, the partial last one copied by whichever writes first.
            let mut f = Tracked {
                s: a.s.fork().unwrap(),
                log: a.log.clone(),
            };
            f.check(&gpu, Call::Decode(11 % vocab), &what("decode of the fork"));
            a.check(
                &gpu,
                Call::Decode(12 % vocab),
                &what("decode of the forked"),
            );
            f.check(
                &gpu,
                Call::Verify(vec![1, 2, 3]),
                &what("verify of the fork"),
            );
            a.check(&gpu, Call::Truncate(100), &what("truncate of the forked"));
            a.check(
                &gpu,
                Call::Decode(7),
                &what("decode after truncate into shared"),
            );
            f.check(
                &gpu,
                Call::Decode(9),
                &what("the fork after the other's writes"),
            );

            // Batched decode: paged and contiguous sessions in one pass, each row as decoded alone.
            let mut c = gpu.session(MAX_SEQ).unwrap();
            c.prefill(&prompt(30, vocab, 2)).unwrap();
            let mut c_ref = gpu.session(MAX_SEQ).unwrap();
            c_ref.prefill(&prompt(30, vocab, 2)).unwrap();
            let mut batch = gpu.batch().unwrap();
            let toks = [3u32, 4, 5];
            let got = batch
                .decode(&mut [&mut a.s, &mut f.s, &mut c], &toks)
                .unwrap();
            let mut want = Vec::new();
            for (log, &t) in [&a.log, &f.log].into_iter().zip(&toks) {
                let mut r = gpu.session(MAX_SEQ).unwrap();
                for call in log {
                    run(&mut r, call);
                }
                want.push(r.decode(t).unwrap());
            }
            want.push(c_ref.decode(toks[2]).unwrap());
            assert_eq!(bits(&got), bits(&want), "{}", what("batched decode"));
        }
        assert_eq!(
            pool.free_blocks(),
            pool.blocks(),
            "{}",
            what("blocks left after every session is gone")
        );
    }

    // An exhausted pool: an error naming it, the session unchanged, its blocks given back.
    let pool = gpu.kv_pool(16, 4).unwrap();
    let mut s = gpu.session_paged(&pool, MAX_SEQ).unwrap();
    s.prefill(&p[..20]).unwrap();
    let e = s.prefill(&p[20..100]).unwrap_err();
    assert!(e.to_string().contains("exhausted"), "{name}: {e}");
    assert_eq!(s.len(), 20, "{name}: length after the failed prefill");
    assert_eq!(
        s.kv_blocks_held(),
        2,
        "{name}: blocks after the failed prefill"
    );
    let mut r = gpu.session(MAX_SEQ).unwrap();
    r.prefill(&p[..20]).unwrap();
    assert_eq!(
        bits(&[s.decode(9).unwrap()]),
        bits(&[r.decode(9).unwrap()]),
        "{name}: decode after the failed prefill"
    );
    drop(s);
    assert_eq!(pool.free_blocks(), 4);
    // Blocks of another pool, and adopting into a session that holds positions, are errors.
    let other = gpu.kv_pool(16, 4).unwrap();
    let mut a = gpu.session_paged(&pool, MAX_SEQ).unwrap();
    a.prefill(&p[..32]).unwrap();
    let mut b = gpu.session_paged(&other, MAX_SEQ).unwrap();
    let blocks = [a.full_block(0).unwrap()];
    assert!(b.adopt_prefix(&blocks).is_err());
    assert!(a.adopt_prefix(&blocks).is_err());
    assert!(gpu.session(MAX_SEQ).unwrap().adopt_prefix(&blocks).is_err());
    assert!(gpu.session(MAX_SEQ).unwrap().fork().is_err());
    assert!(gpu.kv_pool(0, 4).is_err());
    println!("{name}: paged sessions bit-identical to contiguous sessions");
}

#[test]
fn paged_sessions_match_contiguous_on_fixtures() {
    let Some(_ctx) = ultra_kernels::gpu_for_test("paged_sessions_match_contiguous_on_fixtures")
    else {
        return;
    };
    for rel in FIXTURES {
        let (config, weights) = model::load::load(&fixture(rel)).unwrap();
        check_model(rel, config, weights);
    }
}

#[test]
fn paged_sessions_match_contiguous_on_toys() {
    let Some(_ctx) = ultra_kernels::gpu_for_test("paged_sessions_match_contiguous_on_toys") else {
        return;
    };
    for experts in [ToyExperts::Dense, ToyExperts::Mxfp4] {
        for (name, (c, w)) in [
            ("toy gpt-oss", toy::gpt_oss(7, experts)),
            ("toy qwen3-moe", toy::qwen3_moe(8, experts)),
            ("toy mimo", toy::mimo_v2_flash(9, experts)),
        ] {
            check_model(&format!("{name} {experts:?}"), c, w);
        }
    }
}
