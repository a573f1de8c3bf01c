//! Exact rejection sampling of verify blocks on the device (`tilert::sample::DeviceSampler::
//! accept`, kernel `accept_rows`) against dflash's CPU rule for the same rows and uniforms:
//! `accept_sampled` over `p_i` / `q_i` = `SamplingDist::probs` of the target / draft rows (the
//! history of row `i` ending with the first `i` drafts), its uniforms drawn from the request's
//! stream (`model::sampling::UniformStream`) in order; `accept_greedy` over the penalized
//! argmaxes for greedy parameters. Up to 64 blocks of 1..=8 drafts per launch, every parameter
//! combination, with and without penalties.
//!
//! Equality is demanded: the device's masses are f64 sums in another association than the
//! CPU's, which changes a decision only when a uniform falls within ~1e-16 (relative) of a
//! boundary — probability ~1e-12 per draw with random logits.

use dflash::{accept_greedy, accept_sampled, SamplingDist, DEFAULT_PROB_TOLERANCE};
use model::sampling::{Sampler, SamplingParams};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use tilert::arena::{Arena, DPtr};
use tilert::ops::Ops;
use tilert::sample::{BlockAccept, DeviceSampler};

struct Block {
    params: SamplingParams,
    prompt: Vec<u32>,
    generated: Vec<u32>,
    drafts: Vec<u32>,
    target: Vec<f32>,
    draft: Vec<f32>,
}

/// What the CPU's rule gives for a block and how many uniforms it read.
fn cpu_accept(b: &Block, v: usize) -> (usize, u32, usize) {
    let n = b.drafts.len();
    let mut hist_gen = b.generated.clone();
    if b.params.is_greedy() {
        let mut s = Sampler::new(&b.params).unwrap();
        let mut targets = Vec::new();
        for i in 0..=n {
            targets.push(
                s.try_sample(&b.target[i * v..(i + 1) * v], &b.prompt, &hist_gen)
                    .unwrap(),
            );
            if i < n {
                hist_gen.push(b.drafts[i]);
            }
        }
        let a = accept_greedy(&b.drafts, &targets).unwrap();
        return (a.accepted, a.bonus, 0);
    }
    let mut dist = SamplingDist::new(&b.params).unwrap();
    let mut p = vec![0.0f32; (n + 1) * v];
    let mut q = vec![0.0f32; n * v];
    for i in 0..=n {
        dist.probs(
            &b.target[i * v..(i + 1) * v],
            &b.prompt,
            &hist_gen,
            &mut p[i * v..(i + 1) * v],
        )
        .unwrap();
        if i < n {
            dist.probs(
                &b.draft[i * v..(i + 1) * v],
                &b.prompt,
                &hist_gen,
                &mut q[i * v..(i + 1) * v],
            )
            .unwrap();
            hist_gen.push(b.drafts[i]);
        }
    }
    let mut at = Sampler::new(&b.params).unwrap().stream();
    let mut used = 0;
    let mut uniform = || {
        let u = at.uniform();
        at = at.next();
        used += 1;
        u
    };
    let a = accept_sampled(&p, &q, &b.drafts, v, DEFAULT_PROB_TOLERANCE, &mut uniform).unwrap();
    (a.accepted, a.bonus, used)
}

fn logits(rng: &mut ChaCha20Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

#[test]
fn device_acceptance_is_dflashs_rule() {
    let test = "device_acceptance_is_dflashs_rule";
    let Some(ctx) = ultra_kernels::gpu_for_test(test) else {
        return;
    };
    let mut rng = ChaCha20Rng::seed_from_u64(ultra_kernels::test_seed(test));
    let stream = ctx.default_stream();
    let ops = Ops::load(&ctx).unwrap();
    let mut arena = Arena::new(stream.clone());
    let mut grid = Vec::new();
    for temperature in [0.0f32, 0.6, 1.0, 1.4] {
        for (top_k, top_p, min_p) in [
            (None, None, None),
            (Some(12), None, None),
            (None, Some(0.85f32), None),
            (None, None, Some(0.05f32)),
            (Some(30), Some(0.9), Some(0.02)),
        ] {
            for (rep, pres, freq) in [(None, 0.0f32, 0.0f32), (Some(1.3f32), 0.4, 0.2)] {
                grid.push(SamplingParams {
                    temperature,
                    top_k,
                    top_p,
                    min_p,
                    repetition_penalty: rep,
                    presence_penalty: pres,
                    frequency_penalty: freq,
                    seed: Some(rng.random()),
                    ..Default::default()
                });
            }
        }
    }
    let mut hist = [0usize; 10];
    for v in [64usize, 2000] {
        let mut sampler = DeviceSampler::new(stream.clone(), v).unwrap();
        for round in 0..3 {
            let blocks: Vec<Block> = grid
                .iter()
                .map(|p| {
                    let n = rng.random_range(1..=8);
                    let target = logits(&mut rng, (n + 1) * v, 3.0);
                    // Drafts near the target's argmax often (so blocks accept some), else random;
                    // the drafter's rows: the target's plus noise (q close to p).
                    let mut draft: Vec<f32> = target[..n * v]
                        .iter()
                        .map(|&x| x + rng.random_range(-0.7f32..0.7))
                        .collect();
                    if round == 2 {
                        draft = logits(&mut rng, n * v, 3.0);
                    }
                    let drafts = (0..n)
                        .map(|i| {
                            let row = &target[i * v..(i + 1) * v];
                            if rng.random_bool(0.6) {
                                (0..v).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap() as u32
                            } else {
                                rng.random_range(0..v as u32)
                            }
                        })
                        .collect();
                    Block {
                        params: p.clone(),
                        prompt: (0..rng.random_range(0..20))
                            .map(|_| rng.random_range(0..v as u32))
                            .collect(),
                        generated: (0..rng.random_range(0..20))
                            .map(|_| rng.random_range(0..v as u32 + 3))
                            .collect(),
                        drafts,
                        target,
                        draft,
                    }
                })
                .collect();
            let dev: Vec<(DPtr<f32>, DPtr<f32>)> = blocks
                .iter()
                .map(|b| {
                    (
                        arena.upload(&b.target, "target rows").unwrap(),
                        arena.upload(&b.draft, "draft rows").unwrap(),
                    )
                })
                .collect();
            let streams: Vec<_> = blocks
                .iter()
                .map(|b| Sampler::new(&b.params).unwrap().stream())
                .collect();
            let descs: Vec<BlockAccept> = blocks
                .iter()
                .zip(&dev)
                .zip(&streams)
                .map(|((b, &(t, d)), &s)| BlockAccept {
                    target_logits: t,
                    draft_logits: d,
                    drafts: &b.drafts,
                    params: &b.params,
                    prompt: &b.prompt,
                    generated: &b.generated,
                    stream: Some(s),
                })
                .collect();
            let got = sampler.accept(&ops, &descs).unwrap();
            for (i, (b, g)) in blocks.iter().zip(&got).enumerate() {
                let (accepted, bonus, used) = cpu_accept(b, v);
                assert_eq!(
                    (g.accepted, g.bonus, g.uniforms),
                    (accepted, bonus, used),
                    "v={v} round {round} block {i}: device vs CPU (accepted, bonus, uniforms), \
                     {:?}, drafts {:?}",
                    b.params,
                    b.drafts
                );
                hist[accepted] += 1;
            }
        }
    }
    println!("accepted-count histogram: {hist:?}");
    // Both outcomes were exercised.
    assert!(
        hist[0] > 0 && hist[1..].iter().sum::<usize>() > 0,
        "{hist:?}"
    );
}

#[test]
fn device_acceptance_rejects_bad_blocks() {
    let test = "device_acceptance_rejects_bad_blocks";
    let Some(ctx) = ultra_kernels::gpu_for_test(test) else {
        return;
    };
    let stream = ctx.default_stream();
    let ops = Ops::load(&ctx).unwrap();
    let mut arena = Arena::new(stream.clone());
    let v = 50;
    let rows: DPtr<f32> = arena.alloc(17 * v, "rows").unwrap();
    let mut s = DeviceSampler::new(stream.clone(), v).unwrap();
    let p = SamplingParams {
        temperature: 1.0,
        seed: Some(1),
        ..Default::default()
    };
    let at = Some(Sampler::new(&p).unwrap().stream());
    let block = |drafts: &'static [u32], t: usize| BlockAccept {
        target_logits: rows.slice(0..t * v),
        draft_logits: rows,
        drafts,
        params: &p,
        prompt: &[],
        generated: &[],
        stream: at,
    };
    assert!(s.accept(&ops, &[]).is_err());
    let e = s
        .accept(&ops, &[block(&[1, 2], 3), block(&[99], 2)])
        .unwrap_err();
    assert!(e.to_string().contains("block 1"), "{e}");
    let e = s.accept(&ops, &[block(&[1, 2], 2)]).unwrap_err();
    assert!(e.to_string().contains("target logits"), "{e}");
    let e = s.accept(&ops, &[block(&[0; 16], 17)]).unwrap_err();
    assert!(e.to_string().contains("16 drafts"), "{e}");
    let no_stream = BlockAccept {
        stream: None,
        ..block(&[1], 2)
    };
    assert!(s.accept(&ops, &[no_stream]).is_err());
    let ok = s.accept(&ops, &[block(&[1], 2)]).unwrap();
    assert_eq!(ok.len(), 1);
    assert!(ok[0].accepted <= 1 && (ok[0].bonus as usize) < v);
}
