//! `tilert::exec::GpuSession` through the executor contract (`model::Executor`), against the CPU
//! session through the same generic code, on every fixture: greedy decoding (the argmax of the
//! logits, and `prefill_greedy` / `decode_greedy`: the device argmax on the GPU), `forward` over more than one
//! `FORWARD_CHUNK` with decoder-layer outputs (the drafter's view), truncation within
//! `max_rollback` then decode, and a layer beyond the model refused with the session unchanged.
//!
//! Tolerances as `exec.rs`: |Δ| ≤ tol·(1 + max |x|), tol = 1e-3 for dense paths and 3e-2 with
//! MXFP4 experts (the GPU's fp16 activation blocks); greedy tokens match exactly.

mod common;

use std::sync::Arc;

use common::{argmax, fixture, tolerance, FIXTURES};
use model::cpu::CpuModel;
use model::executor::{Executor, FORWARD_CHUNK};
use tilert::exec::GpuModel;

/// Greedy decoding of `n` tokens from `prompt` written against the trait only, in the emptied
/// sequence: by the argmax of the logits the executor returns, and by its greedy calls.
fn greedy<E: Executor>(
    e: &mut E,
    prompt: &[u32],
    n: usize,
) -> Result<(Vec<u32>, Vec<u32>), E::Error> {
    e.truncate(0)?;
    let mut by_logits = vec![argmax(&e.prefill(prompt)?)];
    while by_logits.len() < n {
        let t = *by_logits.last().expect("one token");
        by_logits.push(argmax(&e.decode(t)?));
    }
    e.truncate(0)?;
    let mut by_id = vec![e.prefill_greedy(prompt)?];
    while by_id.len() < n {
        let t = *by_id.last().expect("one token");
        by_id.push(e.decode_greedy(t)?);
    }
    Ok((by_logits, by_id))
}

/// `forward` of `tokens` from empty, then truncation of the last `back` positions and one decode
/// of `next` (written against the trait only): the forward output and the decode's logits.
fn forward_then_rollback<E: Executor>(
    e: &mut E,
    tokens: &[u32],
    layers: &[usize],
    back: usize,
    next: u32,
) -> Result<(model::VerifyOutput, Vec<f32>), E::Error> {
    e.truncate(0)?;
    let out = e.forward(tokens, layers)?;
    assert_eq!(e.len(), tokens.len());
    e.truncate(tokens.len() - back)?;
    let logits = e.decode(next)?.into_owned();
    Ok((out, logits))
}

/// max |a − b| and max |b| over rows.
fn max_err(a: &[Vec<f32>], b: &[Vec<f32>]) -> (f32, f32) {
    assert_eq!(a.len(), b.len(), "row counts differ");
    let (mut err, mut mag) = (0f32, 0f32);
    for (ra, rb) in a.iter().zip(b) {
        assert_eq!(ra.len(), rb.len());
        for (x, y) in ra.iter().zip(rb) {
            assert!(x.is_finite(), "non-finite GPU value {x}");
            err = err.max((x - y).abs());
            mag = mag.max(y.abs());
        }
    }
    (err, mag)
}

#[test]
fn gpu_session_is_an_executor() {
    let Some(_ctx) = ultra_kernels::gpu_for_test("gpu_session_is_an_executor") else {
        return;
    };
    for rel in FIXTURES {
        let (config, weights) = model::load::load(&fixture(rel)).unwrap();
        let tol = tolerance(&weights);
        let (config, weights) = (Arc::new(config), Arc::new(weights));
        let cpu = CpuModel::new(config.clone(), weights.clone()).unwrap();
        let gpu = GpuModel::new(0, config.clone(), &weights).unwrap();
        let mut cs = cpu.session();
        let mut gs = gpu.session(256).unwrap();
        let v = config.vocab_size as u32;
        let nl = config.layers.len();
        assert_eq!(Executor::config(&gs).vocab_size, config.vocab_size);
        assert!(Executor::max_rollback(&gs) >= 16, "{rel}");

        let prompt: Vec<u32> = (0..21).map(|i| (i * 13 + 5) % v).collect();
        let (c_logits, c_ids) = greedy(&mut cs, &prompt, 9).unwrap();
        let (g_logits, g_ids) = greedy(&mut gs, &prompt, 9).unwrap();
        assert_eq!(c_ids, c_logits, "{rel}: CPU greedy calls vs its logits");
        assert_eq!(g_ids, g_logits, "{rel}: device argmax vs the GPU's logits");
        assert_eq!(g_ids, c_ids, "{rel}: GPU vs CPU greedy tokens");

        let long: Vec<u32> = (0..FORWARD_CHUNK as u32 + 9)
            .map(|i| (i * 7 + 3) % v)
            .collect();
        let layers = [0, nl - 1];
        let (co, c_after) = forward_then_rollback(&mut cs, &long, &layers, 5, 1).unwrap();
        let (go, g_after) = forward_then_rollback(&mut gs, &long, &layers, 5, 1).unwrap();
        let (err, mag) = max_err(&go.logits, &co.logits);
        assert!(err <= tol * (1.0 + mag), "{rel}: forward logits |Δ| {err}");
        assert_eq!(go.hidden.len(), 2);
        for (l, (g, c)) in layers.iter().zip(go.hidden.iter().zip(&co.hidden)) {
            let (err, mag) = max_err(g, c);
            assert!(
                err <= tol * (1.0 + mag),
                "{rel}: layer {l} output |Δ| {err} (max {mag})"
            );
        }
        let (err, mag) = max_err(&[g_after], &[c_after]);
        assert!(
            err <= tol * (1.0 + mag),
            "{rel}: truncate + decode |Δ| {err}"
        );

        let held = gs.len();
        assert!(Executor::forward(&mut gs, &[1, 2], &[nl]).is_err(), "{rel}");
        assert_eq!(
            gs.len(),
            held,
            "{rel}: a refused forward changed the session"
        );
    }
}
