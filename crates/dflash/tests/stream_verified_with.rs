//! `SpecStream::verified_with`: a round whose acceptance was computed where the verify rows are
//! (a device's `accept_rows`, from `SpecStream::acceptance_input`) goes on exactly as one accepted
//! by `SpecStream::verified` on the host. Here the "device" is the acceptance rule run on the
//! host over the input it is handed — the target and draft rows, the history before the drafts
//! and the uniform stream's position (what `tilert::sample::DeviceSampler::accept` reads; its
//! kernel is checked against this rule in `gpu_accept.rs`) — so both streams must emit the same
//! tokens and the same per-round acceptances, greedy with penalties and sampled (seeded, with and
//! without penalties), on the tiny targets of every architecture.

mod common;

use std::ops::ControlFlow;

use common::{tiny_targets, tokens};
use dflash::toy::{self, ToyKind};
use dflash::{
    accept_greedy, accept_sampled, Acceptance, BlockPolicy, CpuBackend, Rows, SamplingDist,
    SpecBackend, SpecOptions, SpecStream, Want, DEFAULT_PROB_TOLERANCE,
};
use model::sampling::{Sampler, SamplingParams};

/// The acceptance a device computes from `stream.acceptance_input()` and the rows: the rule of
/// `verified`, its uniforms drawn from the given stream position. Returns it and the uniforms
/// read.
fn device_accept(
    input: &dflash::AcceptanceInput<'_>,
    params: &SamplingParams,
    target: &[f32],
    draft: &[f32],
    v: usize,
) -> (Acceptance, usize) {
    let n = input.drafts.len();
    let mut generated = input.generated.to_vec();
    if params.is_greedy() {
        let mut s = Sampler::new(params).unwrap();
        let mut targets = Vec::new();
        for i in 0..=n {
            targets.push(
                s.try_sample(&target[i * v..(i + 1) * v], input.prompt, &generated)
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
        dist.probs(
            &target[i * v..(i + 1) * v],
            input.prompt,
            &generated,
            &mut p[i * v..(i + 1) * v],
        )
        .unwrap();
        if i < n {
            dist.probs(
                &draft[i * v..(i + 1) * v],
                input.prompt,
                &generated,
                &mut q[i * v..(i + 1) * v],
            )
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

/// Runs the loop over a CPU backend; `device`: acceptance through `verified_with`. Returns the
/// emitted tokens and each round's (accepted, bonus).
fn run(
    m: &model::cpu::CpuModel,
    kind: ToyKind,
    prompt: &[u32],
    params: &SamplingParams,
    device: bool,
) -> (Vec<u32>, Vec<(usize, u32)>) {
    let drafter = std::sync::Arc::new(toy::drafter(m.config(), kind, 4, 33));
    let mut session = m.session();
    let mut backend = CpuBackend::new(&mut session, drafter).unwrap();
    let opts = SpecOptions {
        block_size: 4,
        eos_token_ids: vec![],
        prefill_chunk: None,
    };
    let v = m.config().vocab_size;
    let mut stream = SpecStream::new(&opts, BlockPolicy::Fixed, prompt, params, v, false).unwrap();
    let mut out = Vec::new();
    let mut on_token = |t: u32, _: Option<&[f32]>| {
        out.push(t);
        ControlFlow::Continue(())
    };
    let rows = backend
        .prefill(prompt, Some(stream.prefill_want()))
        .unwrap()
        .unwrap();
    stream.start(&rows, &mut on_token).unwrap();
    let mut rounds = Vec::new();
    while let Some(plan) = stream.plan().unwrap() {
        let start = backend.len();
        let drafts = plan
            .draft_block
            .map(|b| backend.draft(plan.x_last, b, Want::Logits).unwrap());
        let draft_logits = match &drafts {
            Some(Rows::Logits(l)) => l.clone(),
            _ => Vec::new(),
        };
        let block = stream.drafted(drafts).unwrap().to_vec();
        let rows = backend.verify(&block, Want::Logits).unwrap();
        let mut on_round = |r: &dflash::Round<'_>| {
            rounds.push((r.acceptance.accepted, r.acceptance.bonus));
        };
        let keep = if device {
            let Rows::Logits(target) = &rows else {
                unreachable!("the CPU backend returns logits")
            };
            let input = stream.acceptance_input().expect("drafted, no logprobs");
            let (acc, used) = device_accept(&input, params, target, &draft_logits, v);
            stream
                .verified_with(start, acc, used, &mut on_round)
                .unwrap()
        } else {
            stream.verified(start, rows, &mut on_round).unwrap()
        };
        backend.commit(keep).unwrap();
        stream.emit(&mut on_token).unwrap();
    }
    (out, rounds)
}

#[test]
fn verified_with_a_device_acceptance_equals_verified() {
    let cases = [
        SamplingParams {
            presence_penalty: 0.4,
            frequency_penalty: 0.7,
            ..SamplingParams::greedy()
        },
        SamplingParams {
            temperature: 0.9,
            top_p: Some(0.95),
            seed: Some(5),
            ..SamplingParams::default()
        },
        SamplingParams {
            temperature: 1.3,
            top_k: Some(7),
            repetition_penalty: Some(1.2),
            seed: Some(9),
            ..SamplingParams::default()
        },
    ];
    for (name, m) in tiny_targets(40) {
        for kind in [ToyKind::ZLab, ToyKind::MiMo] {
            for p in &cases {
                let params = SamplingParams {
                    max_tokens: 30,
                    ignore_eos: true,
                    ..p.clone()
                };
                let prompt = tokens(3, 11, 0, 40);
                let host = run(&m, kind, &prompt, &params, false);
                let dev = run(&m, kind, &prompt, &params, true);
                assert_eq!(host.0.len(), 30, "{name} {kind:?}");
                assert_eq!(dev, host, "{name} {kind:?} {params:?}");
            }
        }
    }
}

#[test]
fn verified_with_checks_its_input() {
    let (_, m) = tiny_targets(40).swap_remove(0);
    let drafter = std::sync::Arc::new(toy::drafter(m.config(), ToyKind::ZLab, 4, 1));
    let mut session = m.session();
    let mut backend = CpuBackend::new(&mut session, drafter).unwrap();
    let opts = SpecOptions {
        block_size: 4,
        eos_token_ids: vec![],
        prefill_chunk: None,
    };
    let params = SamplingParams {
        max_tokens: 10,
        ..SamplingParams::greedy()
    };
    let v = m.config().vocab_size;
    let prompt = tokens(3, 5, 0, 40);
    // With logprobs the rows must come back: no device acceptance.
    let with_rows = SpecStream::new(&opts, BlockPolicy::Fixed, &prompt, &params, v, true).unwrap();
    assert!(with_rows.acceptance_input().is_none());
    let mut stream =
        SpecStream::new(&opts, BlockPolicy::Fixed, &prompt, &params, v, false).unwrap();
    let rows = backend
        .prefill(&prompt, Some(Want::Logits))
        .unwrap()
        .unwrap();
    stream
        .start(&rows, &mut |_, _| ControlFlow::Continue(()))
        .unwrap();
    assert!(stream.acceptance_input().is_none(), "not drafted yet");
    let err = stream
        .verified_with(
            0,
            Acceptance {
                accepted: 0,
                bonus: 1,
            },
            0,
            &mut |_| {},
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("verified_with called in phase"), "{err}");
    let plan = stream.plan().unwrap().unwrap();
    let d = backend
        .draft(plan.x_last, plan.draft_block.unwrap(), Want::Logits)
        .unwrap();
    stream.drafted(Some(d)).unwrap();
    let input = stream.acceptance_input().unwrap();
    assert_eq!(input.drafts.len(), 3);
    assert_eq!(input.prompt, prompt.as_slice());
    assert_eq!(input.generated.len(), 1);
    for (acc, uniforms, what) in [
        (
            Acceptance {
                accepted: 4,
                bonus: 1,
            },
            0,
            "acceptance of 4 drafts of 3",
        ),
        (
            Acceptance {
                accepted: 1,
                bonus: v as u32,
            },
            0,
            "bonus token",
        ),
        (
            Acceptance {
                accepted: 1,
                bonus: 2,
            },
            1,
            "1 uniforms for a block of 3",
        ),
    ] {
        let err = stream
            .verified_with(1, acc, uniforms, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains(what), "{what}: {err}");
    }
    assert_eq!(
        stream
            .verified_with(
                5,
                Acceptance {
                    accepted: 2,
                    bonus: 3
                },
                0,
                &mut |_| {}
            )
            .unwrap(),
        3
    );
}
