//! Sampling on the device (`tilert::sample`, kernels `sample_rows` / `sample` in
//! kernels/sampling.cu) against the CPU's one definition, `model::sampling`:
//!
//! * every parameter combination (greedy / temperature, top-k, top-p, min-p, repetition,
//!   presence and frequency penalties over random histories, seeds) on fresh random logits, up
//!   to 64 rows per launch: the device's token equals `Sampler::try_sample`'s, draw after draw
//!   (the device reads the same ChaCha20 uniform stream the CPU sampler draws from);
//! * the single-row `sample` kernel at given uniforms against `Sampler::try_sample_at`;
//! * a batched decode pass of a toy model sampled on the device (`GpuBatch::decode_sampled`)
//!   against the CPU sampler on the same pass's logits (`GpuBatch::decode`), several steps;
//! * bad input: clear errors, no fault.
//!
//! The choice is exact except when the uniform lies within f64 rounding (~1e-16 relative) of a
//! boundary between two tokens (the kernel sums the masses in another association than the
//! CPU): with random logits that has probability ~1e-12 per draw, so the tests demand equality.

use std::sync::Arc;

use model::cpu::toy::{self, ToyExperts};
use model::sampling::{Sampler, SamplingParams, UniformStream};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use tilert::arena::{dtoh, Arena, DPtr};
use tilert::exec::{GpuModel, GpuSession};
use tilert::ops::{sample_scratch_len, Ops, SampleArgs};
use tilert::sample::{DeviceSampler, RowSample};

/// Random logits: uniform in ±`scale`; with `ties` rounded to halves (many equal values), and a
/// NaN, a −∞ and a +∞-free row.
fn logits(rng: &mut ChaCha20Rng, v: usize, scale: f32, ties: bool) -> Vec<f32> {
    let mut l: Vec<f32> = (0..v)
        .map(|_| rng.random_range(-scale..scale))
        .map(|x: f32| if ties { (x * 2.0).round() / 2.0 } else { x })
        .collect();
    l[rng.random_range(0..v)] = f32::NAN;
    l[rng.random_range(0..v)] = f32::NEG_INFINITY;
    l
}

/// Every combination of the processors (greedy and sampled), seeds drawn from `rng`.
fn param_grid(rng: &mut ChaCha20Rng) -> Vec<SamplingParams> {
    let mut out = Vec::new();
    for temperature in [0.0f32, 0.7, 1.3] {
        for top_k in [None, Some(1), Some(20)] {
            for top_p in [None, Some(0.8f32)] {
                for min_p in [None, Some(0.05f32)] {
                    for (rep, pres, freq) in [
                        (None, 0.0f32, 0.0f32),
                        (Some(1.3f32), 0.0, 0.0),
                        (Some(0.8), 0.5, 0.3),
                        (None, -0.4, 0.8),
                    ] {
                        out.push(SamplingParams {
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
        }
    }
    out
}

/// A random history over `v` ids with repeats and a few ids outside the vocabulary.
fn history(rng: &mut ChaCha20Rng, v: usize) -> Vec<u32> {
    let n = rng.random_range(0..40);
    (0..n)
        .map(|_| match rng.random_range(0..10) {
            0 => v as u32 + rng.random_range(0..5),
            1..=4 => rng.random_range(0..8),
            _ => rng.random_range(0..v as u32),
        })
        .collect()
}

struct Row {
    logits: Vec<f32>,
    params: SamplingParams,
    prompt: Vec<u32>,
    generated: Vec<u32>,
    /// The CPU's sampler (draws with its own RNG) and the device's stream tracker.
    cpu: Sampler,
    dev: Sampler,
}

#[test]
fn sample_rows_match_the_cpu_sampler() {
    let test = "sample_rows_match_the_cpu_sampler";
    let Some(ctx) = ultra_kernels::gpu_for_test(test) else {
        return;
    };
    let mut rng = ChaCha20Rng::seed_from_u64(ultra_kernels::test_seed(test));
    let stream = ctx.default_stream();
    let ops = Ops::load(&ctx).unwrap();
    let mut arena = Arena::new(stream.clone());
    for v in [50usize, 3000, 50_000] {
        let mut sampler = DeviceSampler::new(stream.clone(), v).unwrap();
        let grid = param_grid(&mut rng);
        let mut checked = 0usize;
        for (chunk_i, chunk) in grid.chunks(64).enumerate() {
            let ties = chunk_i % 2 == 1;
            let mut rows: Vec<Row> = chunk
                .iter()
                .map(|p| Row {
                    logits: logits(&mut rng, v, 4.0, ties),
                    params: p.clone(),
                    prompt: history(&mut rng, v),
                    generated: history(&mut rng, v),
                    cpu: Sampler::new(p).unwrap(),
                    dev: Sampler::new(p).unwrap(),
                })
                .collect();
            let flat: Vec<f32> = rows.iter().flat_map(|r| r.logits.clone()).collect();
            let dl: DPtr<f32> = arena.upload(&flat, "logits").unwrap();
            // Several draws: the streams move through their ChaCha20 blocks, histories grow.
            for step in 0..4 {
                let descs: Vec<RowSample> = rows
                    .iter()
                    .enumerate()
                    .map(|(i, r)| RowSample {
                        logits: dl.slice(i * v..(i + 1) * v),
                        params: &r.params,
                        prompt: &r.prompt,
                        generated: &r.generated,
                        stream: Some(r.dev.stream()),
                    })
                    .collect();
                let got = sampler.sample(&ops, &descs).unwrap();
                for (i, r) in rows.iter_mut().enumerate() {
                    let want = r
                        .cpu
                        .try_sample(&r.logits, &r.prompt, &r.generated)
                        .unwrap();
                    assert_eq!(
                        got[i], want,
                        "v={v} step {step} row {i}: device {} vs CPU {want}, {:?}, prompt {:?}, \
                         generated {:?}",
                        got[i], r.params, r.prompt, r.generated
                    );
                    if !r.params.is_greedy() {
                        r.dev.skip_uniform();
                    }
                    assert_eq!(r.dev.stream(), r.cpu.stream(), "streams in step");
                    r.generated.push(want);
                    checked += 1;
                }
            }
        }
        println!("sample_rows v={v}: {checked} draws equal to the CPU sampler");
    }
}

#[test]
fn sample_kernel_is_the_samplers_draw_at_its_uniform() {
    let test = "sample_kernel_is_the_samplers_draw_at_its_uniform";
    let Some(ctx) = ultra_kernels::gpu_for_test(test) else {
        return;
    };
    let mut rng = ChaCha20Rng::seed_from_u64(ultra_kernels::test_seed(test));
    let stream = ctx.default_stream();
    let ops = Ops::load(&ctx).unwrap();
    let mut arena = Arena::new(stream.clone());
    let draws = 300usize;
    for v in [50usize, 3000] {
        let scratch: DPtr<u32> = arena.alloc(sample_scratch_len(v), "scratch").unwrap();
        let out: DPtr<u32> = arena.alloc(draws, "out").unwrap();
        for ties in [false, true] {
            let l = logits(&mut rng, v, 4.0, ties);
            let dl = arena.upload(&l, "logits").unwrap();
            for (temperature, top_k, top_p, min_p) in [
                (0.7f32, 0usize, 1.0f32, 0.0f32),
                (1.0, 10, 1.0, 0.0),
                (1.3, 0, 0.8, 0.0),
                (1.0, 0, 1.0, 0.05),
                (0.9, 20, 0.9, 0.02),
                (3.0, 0, 0.5, 0.0),
            ] {
                let args = SampleArgs {
                    temperature,
                    top_k,
                    top_p,
                    min_p,
                };
                let us: Vec<f32> = (0..draws).map(|_| rng.random::<f32>()).collect();
                let du = arena.upload(&us, "uniforms").unwrap();
                for i in 0..draws {
                    ops.sample(
                        &stream,
                        dl,
                        v,
                        &args,
                        du.slice(i..i + 1),
                        scratch,
                        out.slice(i..i + 1),
                    )
                    .unwrap();
                }
                let got = dtoh(&stream, out).unwrap();
                let params = SamplingParams {
                    temperature,
                    top_k: (top_k > 0).then_some(top_k),
                    top_p: Some(top_p),
                    min_p: Some(min_p),
                    seed: Some(0),
                    ..Default::default()
                };
                let mut cpu = Sampler::new(&params).unwrap();
                for (i, &u) in us.iter().enumerate() {
                    let want = cpu.try_sample_at(&l, &[], &[], u as f64).unwrap();
                    assert_eq!(got[i], want, "v={v} ties={ties} {args:?} u={u}");
                }
            }
        }
    }
}

#[test]
fn sample_rows_reject_bad_input() {
    let test = "sample_rows_reject_bad_input";
    let Some(ctx) = ultra_kernels::gpu_for_test(test) else {
        return;
    };
    let stream = ctx.default_stream();
    let ops = Ops::load(&ctx).unwrap();
    let mut arena = Arena::new(stream.clone());
    let v = 100;
    let dl: DPtr<f32> = arena.alloc(65 * v, "logits").unwrap();
    assert!(DeviceSampler::new(stream.clone(), 0).is_err());
    let mut s = DeviceSampler::new(stream.clone(), v).unwrap();
    let sampled = SamplingParams {
        temperature: 1.0,
        ..Default::default()
    };
    let greedy = SamplingParams::default();
    let row = |p, stream| RowSample {
        logits: dl.slice(0..v),
        params: p,
        prompt: &[],
        generated: &[],
        stream,
    };
    let at = Some(UniformStream {
        key: [1; 8],
        word_pos: 0,
    });
    assert!(s.sample(&ops, &[]).is_err(), "no rows");
    assert!(
        s.sample(&ops, &vec![row(&greedy, None); 65]).is_err(),
        "65 rows"
    );
    let e = s.sample(&ops, &[row(&sampled, None)]).unwrap_err();
    assert!(e.to_string().contains("uniform stream"), "{e}");
    let bad = SamplingParams {
        top_p: Some(1.5),
        ..sampled.clone()
    };
    let e = s
        .sample(&ops, &[row(&greedy, None), row(&bad, at)])
        .unwrap_err();
    assert!(
        e.to_string().contains("row 1") && e.to_string().contains("top_p"),
        "{e}"
    );
    let short = RowSample {
        logits: dl.slice(0..v - 1),
        ..row(&greedy, None)
    };
    assert!(s.sample(&ops, &[short]).is_err(), "short logits row");
    // All -inf / NaN: token 0, as Sampler::sample.
    let bad_row = arena
        .upload(&vec![f32::NEG_INFINITY; v], "no finite logit")
        .unwrap();
    let none = RowSample {
        logits: bad_row,
        ..row(&sampled, at)
    };
    assert_eq!(s.sample(&ops, &[none, row(&greedy, None)]).unwrap()[0], 0);
}

fn refs(v: &mut [GpuSession]) -> Vec<&mut GpuSession> {
    v.iter_mut().collect()
}

#[test]
fn batched_decode_samples_on_the_device_as_the_cpu_sampler() {
    let test = "batched_decode_samples_on_the_device_as_the_cpu_sampler";
    let Some(_ctx) = ultra_kernels::gpu_for_test(test) else {
        return;
    };
    let mut rng = ChaCha20Rng::seed_from_u64(ultra_kernels::test_seed(test));
    let (c, w) = toy::gpt_oss(5, ToyExperts::Mxfp4);
    let vocab = c.vocab_size;
    let gpu = GpuModel::new(0, Arc::new(c), &w).unwrap();
    let mut batch = gpu.batch().unwrap();
    let mut sampler = DeviceSampler::new(gpu.stream().clone(), vocab).unwrap();
    let n = 6;
    let params: Vec<SamplingParams> = (0..n)
        .map(|i| SamplingParams {
            temperature: [0.0, 0.8, 1.0, 1.2, 0.0, 0.6][i],
            top_k: [None, Some(8), None, None, None, Some(3)][i],
            top_p: [None, None, Some(0.9), None, None, Some(0.7)][i],
            min_p: [None, None, None, Some(0.02), None, None][i],
            repetition_penalty: [None, Some(1.2), None, None, Some(1.5), None][i],
            presence_penalty: [0.0, 0.0, 0.3, 0.0, 0.0, -0.2][i],
            frequency_penalty: [0.0, 0.0, 0.4, 0.0, 0.6, 0.0][i],
            seed: Some(rng.random()),
            ..Default::default()
        })
        .collect();
    let prompts: Vec<Vec<u32>> = (0..n)
        .map(|i| {
            (0..3 + 5 * i)
                .map(|_| rng.random_range(0..vocab as u32))
                .collect()
        })
        .collect();
    let make = || -> Vec<GpuSession> {
        prompts
            .iter()
            .map(|p| {
                let mut s = gpu.session(128).unwrap();
                s.prefill(p).unwrap();
                s
            })
            .collect()
    };
    // `host` decodes with logits back and samples on the CPU; `dev` samples on the device.
    let (mut host, mut dev) = (make(), make());
    let mut cpu: Vec<Sampler> = params.iter().map(|p| Sampler::new(p).unwrap()).collect();
    let mut streams: Vec<Sampler> = params.iter().map(|p| Sampler::new(p).unwrap()).collect();
    let mut generated: Vec<Vec<u32>> = vec![Vec::new(); n];
    let mut last: Vec<u32> = prompts.iter().map(|p| *p.last().unwrap()).collect();
    for step in 0..12 {
        let logits = batch.decode(&mut refs(&mut host), &last).unwrap();
        let want: Vec<u32> = (0..n)
            .map(|i| {
                cpu[i]
                    .try_sample(&logits[i], &prompts[i], &generated[i])
                    .unwrap()
            })
            .collect();
        let rows: Vec<RowSample> = (0..n)
            .map(|i| RowSample {
                logits: DPtr::null(),
                params: &params[i],
                prompt: &prompts[i],
                generated: &generated[i],
                stream: Some(streams[i].stream()),
            })
            .collect();
        let got = batch
            .decode_sampled(&mut refs(&mut dev), &last, &mut sampler, &rows)
            .unwrap();
        assert_eq!(
            got, want,
            "step {step}: device vs CPU sampling of the same pass"
        );
        for i in 0..n {
            if !params[i].is_greedy() {
                streams[i].skip_uniform();
            }
            generated[i].push(want[i]);
        }
        last = want;
    }
    for (h, d) in host.iter().zip(&dev) {
        assert_eq!(h.len(), d.len());
    }
}
