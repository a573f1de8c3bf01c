//! GPU tests of `comm`: the one-shot all-reduce (`kernels/comm.cu`) with N = 2, 4, 8 VIRTUAL
//! ranks on one GPU (each rank its own buffers, flag table and stream; the kernels of all ranks
//! run concurrently and wait for each other through the same flags real peers use), and NCCL on a
//! single-GPU communicator. Skipped without a GPU (fails with `ULTRA_REQUIRE_GPU=1`). The seed of
//! each test is printed; `ULTRA_TEST_SEED` replays one.
//!
//! Tolerances. The kernel sums the ranks' partials in rank order in fp32 (`__fadd_rn`), so f32
//! results must be BIT-EQUAL to the host's rank-order f32 sum, and bf16 results bit-equal to
//! that sum of the (exact) bf16 inputs rounded once to bf16. Against the f64 reference:
//! f32 `|out − ref| ≤ N·2⁻²³·Σ|p|` (rank-order summation bound); bf16 additionally
//! `+ 2⁻⁸·|ref|` (one bf16 rounding). Fused residual + RMSNorm: `x` bit-equal to the host's
//! `x + Σ` in f32; `h` within `2e-5` relative of the f64 RMSNorm of that `x` (f32 sum of squares
//! in another order, then two roundings).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use comm::{AllReduce, CommError, DType, Epilogue, SymmetricGroup};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DeviceRepr};
use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// One test at a time on the GPU: virtual ranks need all their blocks co-resident, which a
/// concurrently running test's kernels could prevent (the test would then time out).
static GPU_LOCK: Mutex<()> = Mutex::new(());

type Setup = (Arc<CudaContext>, ChaCha20Rng, MutexGuard<'static, ()>);

fn gpu(test: &str) -> Option<Setup> {
    // Before the first CUDA call: separate hardware queues for the ranks' streams.
    comm::symmetric::prepare_virtual_ranks();
    let guard = GPU_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let ctx = ultra_kernels::gpu_for_test(test)?;
    // SAFETY: this test synchronises explicitly; cudarc's per-buffer events are not needed.
    unsafe { ctx.disable_event_tracking() };
    let seed = ultra_kernels::test_seed(test);
    Some((ctx, ChaCha20Rng::seed_from_u64(seed), guard))
}

fn up<T: DeviceRepr>(s: &Arc<CudaStream>, v: &[T]) -> CudaSlice<T> {
    let d = s.clone_htod(v).unwrap();
    s.synchronize().unwrap();
    d
}

fn ptr<T>(s: &Arc<CudaStream>, d: &CudaSlice<T>) -> u64 {
    d.device_ptr(s).0
}

fn down<T: DeviceRepr + Clone + Default>(s: &Arc<CudaStream>, d: &CudaSlice<T>) -> Vec<T> {
    s.clone_dtoh(d).unwrap()
}

/// Random partials: `ranks` vectors of `n` values in [-2, 2) (bf16-exact for bf16), as f32.
fn partials(rng: &mut ChaCha20Rng, ranks: usize, n: usize, dtype: DType) -> Vec<Vec<f32>> {
    (0..ranks)
        .map(|_| {
            (0..n)
                .map(|_| {
                    let v: f32 = rng.random_range(-2.0..2.0);
                    match dtype {
                        DType::Bf16 => bf16::from_f32(v).to_f32(),
                        DType::F32 => v,
                    }
                })
                .collect()
        })
        .collect()
}

/// Uploads `v` in `dtype` (bf16 values are exact) as raw bytes.
fn up_as(s: &Arc<CudaStream>, v: &[f32], dtype: DType) -> CudaSlice<u8> {
    let bytes: Vec<u8> = match dtype {
        DType::Bf16 => v
            .iter()
            .flat_map(|x| bf16::from_f32(*x).to_le_bytes())
            .collect(),
        DType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    };
    up(s, &bytes)
}

fn down_as(s: &Arc<CudaStream>, d: &CudaSlice<u8>, dtype: DType) -> Vec<f32> {
    let b = down(s, d);
    match dtype {
        DType::Bf16 => b
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    }
}

/// NaN bytes (a poison every output element must overwrite): 0xFFFF is NaN in bf16 and f32.
fn poison(s: &Arc<CudaStream>, bytes: usize) -> CudaSlice<u8> {
    up(s, &vec![0xFFu8; bytes])
}

/// Checks `out` of an `Out` all-reduce against the host's rank-order f32 sum (bit-equal) and
/// the f64 reference (bound of the module docs).
fn check_sum(what: &str, parts: &[Vec<f32>], out: &[f32], dtype: DType) {
    let n = out.len();
    let ranks = parts.len() as f64;
    for i in 0..n {
        let mut s32 = parts[0][i];
        for p in &parts[1..] {
            s32 += p[i];
        }
        let want = match dtype {
            DType::Bf16 => bf16::from_f32(s32).to_f32(),
            DType::F32 => s32,
        };
        let r64: f64 = parts.iter().map(|p| p[i] as f64).sum();
        let abs: f64 = parts.iter().map(|p| (p[i] as f64).abs()).sum();
        let mut tol = ranks * 2f64.powi(-23) * abs;
        if dtype == DType::Bf16 {
            tol += 2f64.powi(-8) * r64.abs();
        }
        assert!(
            (out[i] as f64 - r64).abs() <= tol,
            "{what}: element {i} of {n}: {} vs f64 {r64} (tolerance {tol})",
            out[i]
        );
        assert_eq!(
            out[i].to_bits(),
            want.to_bits(),
            "{what}: element {i} of {n}: {} vs rank-order f32 sum {want}",
            out[i]
        );
    }
}

/// Runs one `Out` all-reduce of `n` elements on every rank of `g` with fresh inputs and checks
/// every rank's output.
fn run_sum(g: &SymmetricGroup, s: &Arc<CudaStream>, rng: &mut ChaCha20Rng, n: usize, dtype: DType) {
    let ranks = g.ranks();
    let parts = partials(rng, ranks, n, dtype);
    let ins: Vec<_> = parts.iter().map(|p| up_as(s, p, dtype)).collect();
    let outs: Vec<_> = (0..ranks).map(|_| poison(s, n * dtype.size())).collect();
    for r in 0..ranks {
        let op = AllReduce {
            dtype,
            rows: 1,
            width: n,
            input: ptr(s, &ins[r]),
            epilogue: Epilogue::Out {
                out: ptr(s, &outs[r]),
            },
        };
        // SAFETY: the buffers hold n elements and outlive the check below.
        unsafe { g.all_reduce(r, &op) }.unwrap();
    }
    g.check().unwrap();
    for (r, o) in outs.iter().enumerate() {
        let what = format!("{ranks} ranks, {dtype:?}, n={n}, rank {r}");
        check_sum(&what, &parts, &down_as(s, o, dtype), dtype);
    }
}

#[test]
fn one_shot_matches_the_f64_reference() {
    let Some((ctx, mut rng, _gpu)) = gpu("one_shot_matches_the_f64_reference") else {
        return;
    };
    let s = ctx.default_stream();
    for ranks in [2, 4, 8] {
        let g = SymmetricGroup::virtual_ranks(&ctx, ranks, 1 << 20).unwrap();
        for dtype in [DType::Bf16, DType::F32] {
            // 8 KB, 64 KB, 1 MB, and odd sizes (tails, single elements, not a multiple of 8).
            let sizes = [8 << 10, 64 << 10, 1 << 20].map(|b| b / dtype.size());
            for n in sizes.into_iter().chain([1, 3, 4097, 33_333]) {
                // Twice: the second call reuses the buffers at the next epoch.
                for _ in 0..2 {
                    run_sum(&g, &s, &mut rng, n, dtype);
                }
            }
        }
    }
}

#[test]
fn in_place_and_nan_passthrough() {
    let Some((ctx, mut rng, _gpu)) = gpu("in_place_and_nan_passthrough") else {
        return;
    };
    let s = ctx.default_stream();
    let ranks = 4;
    let g = SymmetricGroup::virtual_ranks(&ctx, ranks, 64 << 10).unwrap();
    let n = 5000;
    let mut parts = partials(&mut rng, ranks, n, DType::F32);
    parts[2][17] = f32::NAN;
    parts[1][4999] = f32::INFINITY;
    let bufs: Vec<_> = parts.iter().map(|p| up_as(&s, p, DType::F32)).collect();
    for (r, b) in bufs.iter().enumerate() {
        let p = ptr(&s, b);
        let op = AllReduce {
            dtype: DType::F32,
            rows: 1,
            width: n,
            input: p,
            epilogue: Epilogue::Out { out: p },
        };
        // SAFETY: in place on a live buffer of n f32.
        unsafe { g.all_reduce(r, &op) }.unwrap();
    }
    g.check().unwrap();
    for b in &bufs {
        let out = down_as(&s, b, DType::F32);
        assert!(out[17].is_nan(), "NaN must propagate, got {}", out[17]);
        assert_eq!(out[4999], f32::INFINITY);
        for i in (0..n).filter(|&i| i != 17 && i != 4999) {
            let want: f32 = parts.iter().map(|p| p[i]).fold(0.0, |a, b| a + b);
            assert_eq!(
                out[i].to_bits(),
                (parts[0][i] + parts[1][i] + parts[2][i] + parts[3][i]).to_bits(),
                "element {i}: {} vs {want}",
                out[i]
            );
        }
    }
}

/// Thousands of back-to-back all-reduces without host synchronisation, alternating two shapes
/// (8 KB bf16 in one block, 160 KB f32 over several): the data ranges of the block slots change
/// from one call to the next while peers may still be reading the previous call.
#[test]
fn thousands_of_back_to_back_calls() {
    let Some((ctx, mut rng, _gpu)) = gpu("thousands_of_back_to_back_calls") else {
        return;
    };
    let s = ctx.default_stream();
    let ranks = 8;
    let (na, nb) = (4096, 40_000);
    let g = SymmetricGroup::virtual_ranks(&ctx, ranks, nb * 4).unwrap();
    let parts_a = partials(&mut rng, ranks, na, DType::Bf16);
    let parts_b = partials(&mut rng, ranks, nb, DType::F32);
    let ins_a: Vec<_> = parts_a.iter().map(|p| up_as(&s, p, DType::Bf16)).collect();
    let ins_b: Vec<_> = parts_b.iter().map(|p| up_as(&s, p, DType::F32)).collect();
    let outs_a: Vec<_> = (0..ranks).map(|_| poison(&s, na * 2)).collect();
    let outs_b: Vec<_> = (0..ranks).map(|_| poison(&s, nb * 4)).collect();
    let iters = 1500;
    for _ in 0..iters {
        for r in 0..ranks {
            let a = AllReduce {
                dtype: DType::Bf16,
                rows: 1,
                width: na,
                input: ptr(&s, &ins_a[r]),
                epilogue: Epilogue::Out {
                    out: ptr(&s, &outs_a[r]),
                },
            };
            let b = AllReduce {
                dtype: DType::F32,
                rows: 1,
                width: nb,
                input: ptr(&s, &ins_b[r]),
                epilogue: Epilogue::Out {
                    out: ptr(&s, &outs_b[r]),
                },
            };
            // SAFETY: live buffers of na bf16 / nb f32.
            unsafe { g.all_reduce(r, &a).and_then(|_| g.all_reduce(r, &b)) }.unwrap();
        }
    }
    g.check().unwrap();
    for r in 0..ranks {
        let what = format!("after {iters} call pairs, rank {r}");
        check_sum(
            &what,
            &parts_a,
            &down_as(&s, &outs_a[r], DType::Bf16),
            DType::Bf16,
        );
        check_sum(
            &what,
            &parts_b,
            &down_as(&s, &outs_b[r], DType::F32),
            DType::F32,
        );
    }
    // And one more with fresh data: the epochs after thousands of calls still line up.
    run_sum(&g, &s, &mut rng, 777, DType::F32);
}

#[test]
fn captured_graphs_replay_with_fresh_inputs() {
    let Some((ctx, mut rng, _gpu)) = gpu("captured_graphs_replay_with_fresh_inputs") else {
        return;
    };
    let s = ctx.default_stream();
    for ranks in [2, 4, 8] {
        let n = 32 << 10; // 64 KB of bf16
        let g = SymmetricGroup::virtual_ranks(&ctx, ranks, n * 2).unwrap();
        let mut ins: Vec<_> = (0..ranks).map(|_| poison(&s, n * 2)).collect();
        let mids: Vec<_> = (0..ranks).map(|_| poison(&s, n * 2)).collect();
        let x0: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        let xs: Vec<_> = (0..ranks).map(|_| up(&s, &x0)).collect();
        // Per rank, one graph of two chained all-reduces captured on the rank's own stream (as
        // each GPU of a real group captures its own): mid = Σ in (bf16), then x += Σ mid.
        let mut graphs = Vec::new();
        for r in 0..ranks {
            let st = g.stream(r).clone();
            st.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                .unwrap();
            let first = AllReduce {
                dtype: DType::Bf16,
                rows: 1,
                width: n,
                input: ptr(&s, &ins[r]),
                epilogue: Epilogue::Out {
                    out: ptr(&s, &mids[r]),
                },
            };
            let second = AllReduce {
                dtype: DType::Bf16,
                rows: 1,
                width: n,
                input: ptr(&s, &mids[r]),
                epilogue: Epilogue::Residual { x: ptr(&s, &xs[r]) },
            };
            // SAFETY: live buffers of n elements, alive until the graphs are dropped.
            let launched = unsafe {
                g.all_reduce(r, &first)
                    .and_then(|_| g.all_reduce(r, &second))
            };
            let graph = st
                .end_capture(CUgraphInstantiate_flags(0))
                .unwrap()
                .unwrap();
            launched.unwrap();
            graphs.push(graph);
        }
        let mut x_host = x0.clone();
        for replay in 0..4 {
            let parts = partials(&mut rng, ranks, n, DType::Bf16);
            for (r, p) in parts.iter().enumerate() {
                let bytes: Vec<u8> = p
                    .iter()
                    .flat_map(|x| bf16::from_f32(*x).to_le_bytes())
                    .collect();
                s.memcpy_htod(&bytes, &mut ins[r]).unwrap();
            }
            s.synchronize().unwrap();
            for gr in &graphs {
                gr.launch().unwrap();
            }
            g.check().unwrap();
            let mid0 = down_as(&s, &mids[0], DType::Bf16);
            for (r, m) in mids.iter().enumerate() {
                let what = format!("graph replay {replay}, {ranks} ranks, rank {r}, mid");
                check_sum(&what, &parts, &down_as(&s, m, DType::Bf16), DType::Bf16);
            }
            // Every rank's mid is the same m: x += m + m + … (rank order, f32).
            for i in 0..n {
                let mut acc = mid0[i];
                for _ in 1..ranks {
                    acc += mid0[i];
                }
                x_host[i] += acc;
            }
            for (r, x) in xs.iter().enumerate() {
                let gx = down(&s, x);
                for i in 0..n {
                    assert_eq!(
                        gx[i].to_bits(),
                        x_host[i].to_bits(),
                        "graph replay {replay}, {ranks} ranks, rank {r}, x[{i}]: {} vs {}",
                        gx[i],
                        x_host[i]
                    );
                }
            }
        }
    }
}

/// `x += Σ partial; h = rmsnorm(x)·w` against the host.
#[test]
fn fused_residual_rmsnorm() {
    let Some((ctx, mut rng, _gpu)) = gpu("fused_residual_rmsnorm") else {
        return;
    };
    let s = ctx.default_stream();
    let eps = 1e-5f32;
    for ranks in [2, 4, 8] {
        let g = SymmetricGroup::virtual_ranks(&ctx, ranks, 16 * 7168 * 4).unwrap();
        for dtype in [DType::Bf16, DType::F32] {
            for (rows, width) in [
                (1, 2880),
                (1, 7168),
                (3, 1000),
                (16, 2880),
                (5, 37),
                (2, 4099),
            ] {
                let n = rows * width;
                let parts = partials(&mut rng, ranks, n, dtype);
                let x0: Vec<f32> = (0..n).map(|_| rng.random_range(-4.0..4.0)).collect();
                let w: Vec<f32> = (0..width).map(|_| rng.random_range(0.5..1.5)).collect();
                let ins: Vec<_> = parts.iter().map(|p| up_as(&s, p, dtype)).collect();
                let xs: Vec<_> = (0..ranks).map(|_| up(&s, &x0)).collect();
                let hs: Vec<_> = (0..ranks).map(|_| up(&s, &vec![f32::NAN; n])).collect();
                let dw = up(&s, &w);
                for r in 0..ranks {
                    let op = AllReduce {
                        dtype,
                        rows,
                        width,
                        input: ptr(&s, &ins[r]),
                        epilogue: Epilogue::ResidualNorm {
                            x: ptr(&s, &xs[r]),
                            h: ptr(&s, &hs[r]),
                            w: ptr(&s, &dw),
                            eps,
                        },
                    };
                    // SAFETY: live buffers of rows × width (w: width).
                    unsafe { g.all_reduce(r, &op) }.unwrap();
                }
                g.check().unwrap();
                // Host: x' = x + rank-order f32 Σ; h = f64 RMSNorm of x'.
                let mut x1 = x0.clone();
                for i in 0..n {
                    let mut acc = parts[0][i];
                    for p in &parts[1..] {
                        acc += p[i];
                    }
                    x1[i] += acc;
                }
                for r in 0..ranks {
                    let what = format!("{ranks} ranks, {dtype:?}, {rows}×{width}, rank {r}");
                    let gx = down(&s, &xs[r]);
                    let gh = down(&s, &hs[r]);
                    for i in 0..n {
                        assert_eq!(
                            gx[i].to_bits(),
                            x1[i].to_bits(),
                            "{what}: x[{i}] {} vs {}",
                            gx[i],
                            x1[i]
                        );
                        let r64: f64 =
                            parts.iter().map(|p| p[i] as f64).sum::<f64>() + x0[i] as f64;
                        assert!(
                            (gx[i] as f64 - r64).abs() <= 1e-5 * (1.0 + r64.abs()),
                            "{what}: x[{i}] vs f64 {r64}"
                        );
                    }
                    for row in 0..rows {
                        let xr = &x1[row * width..(row + 1) * width];
                        let ms: f64 =
                            xr.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / width as f64;
                        let rr = 1.0 / (ms + eps as f64).sqrt();
                        for j in 0..width {
                            let want = w[j] as f64 * xr[j] as f64 * rr;
                            let got = gh[row * width + j] as f64;
                            assert!(
                                (got - want).abs() <= 2e-5 * want.abs() + 1e-30,
                                "{what}: h[{row}][{j}] {got} vs f64 {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn residual_only_and_errors() {
    let Some((ctx, mut rng, _gpu)) = gpu("residual_only_and_errors") else {
        return;
    };
    let s = ctx.default_stream();
    let ranks = 2;
    let mut g = SymmetricGroup::virtual_ranks(&ctx, ranks, 4096).unwrap();
    let n = 1000;
    let parts = partials(&mut rng, ranks, n, DType::F32);
    let x0: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    let ins: Vec<_> = parts.iter().map(|p| up_as(&s, p, DType::F32)).collect();
    let xs: Vec<_> = (0..ranks).map(|_| up(&s, &x0)).collect();
    let op = |r: usize| AllReduce {
        dtype: DType::F32,
        rows: 1,
        width: n,
        input: ptr(&s, &ins[r]),
        epilogue: Epilogue::Residual { x: ptr(&s, &xs[r]) },
    };
    for r in 0..ranks {
        // SAFETY: live buffers of n f32.
        unsafe { g.all_reduce(r, &op(r)) }.unwrap();
    }
    g.check().unwrap();
    for x in &xs {
        let gx = down(&s, x);
        for i in 0..n {
            assert_eq!(
                gx[i].to_bits(),
                (x0[i] + (parts[0][i] + parts[1][i])).to_bits(),
                "x[{i}]"
            );
        }
    }
    // Too large for the slot, misaligned, unknown rank: errors before anything is launched.
    let mut big = op(0);
    big.width = 2000;
    assert!(matches!(
        unsafe { g.all_reduce(0, &big) },
        Err(CommError::Invalid(_))
    ));
    let mut skew = op(0);
    skew.input += 4;
    assert!(matches!(
        unsafe { g.all_reduce(0, &skew) },
        Err(CommError::Invalid(_))
    ));
    assert!(matches!(
        unsafe { g.all_reduce(2, &op(0)) },
        Err(CommError::Invalid(_))
    ));
    // A rank whose peer never comes: a timeout error naming the rank, the peer and the call, not
    // a hang; the rank's later calls give up at once (one timeout per stuck pass, not one per
    // call); reset, then it works again.
    g.reset().unwrap();
    run_sum(&g, &s, &mut rng, 999, DType::Bf16);
    g.set_timeout(Some(Duration::from_millis(200)));
    let t0 = std::time::Instant::now();
    // SAFETY: as above.
    for _ in 0..20 {
        unsafe { g.all_reduce(0, &op(0)) }.unwrap();
    }
    let res = g.check();
    let took = t0.elapsed();
    match res {
        Err(CommError::Timeout {
            rank: 0,
            peer: 1,
            call: 2,
            timeout_ms: 200,
            ..
        }) => {}
        other => panic!("expected a timeout of rank 0's call 2 waiting for rank 1, got {other:?}"),
    }
    let msg = res.unwrap_err().to_string();
    assert!(
        msg.contains("rank 0: all-reduce call 2") && msg.contains("rank 1 never issued"),
        "{msg}"
    );
    assert!(
        took < Duration::from_secs(2),
        "20 calls of a stuck rank took {took:?}: the calls after the first timeout must not wait"
    );
    g.reset().unwrap();
    g.set_timeout(Some(Duration::from_secs(10)));
    run_sum(&g, &s, &mut rng, 999, DType::Bf16);
}

#[test]
fn nccl_on_one_rank() {
    let Some((ctx, mut rng, _gpu)) = gpu("nccl_on_one_rank") else {
        return;
    };
    let nccl = match comm::NcclComms::new(vec![ctx.new_stream().unwrap()]) {
        Ok(c) => c,
        Err(CommError::NoNccl) if std::env::var("ULTRA_REQUIRE_GPU").as_deref() != Ok("1") => {
            eprintln!("SKIPPED nccl_on_one_rank: libnccl not found");
            return;
        }
        Err(e) => panic!(
            "NCCL communicator on GPU 0: {e} (searched the loader path and {:?})",
            comm::nccl::nccl_candidates()
        ),
    };
    println!("NCCL {}", comm::nccl_version().unwrap());
    let st = nccl.stream(0).clone();
    let n = 3000;
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    let send = vec![st.clone_htod(&v).unwrap()];
    let mut recv = vec![st.clone_htod(&vec![f32::NAN; n]).unwrap()];
    nccl.all_reduce(&send, &mut recv).unwrap();
    assert_eq!(
        st.clone_dtoh(&recv[0]).unwrap(),
        v,
        "all_reduce on one rank is a copy"
    );
    let vb: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
    let send_b = vec![st.clone_htod(&vb).unwrap()];
    let mut recv_b = vec![st.clone_htod(&vec![bf16::NAN; n]).unwrap()];
    nccl.all_gather(&send_b, &mut recv_b).unwrap();
    assert_eq!(
        st.clone_dtoh(&recv_b[0]).unwrap(),
        vb,
        "all_gather on one rank is a copy"
    );
    let mut recv_c = vec![st.clone_htod(&vec![f32::NAN; n]).unwrap()];
    nccl.all_to_all(&send, &mut recv_c).unwrap();
    assert_eq!(
        st.clone_dtoh(&recv_c[0]).unwrap(),
        v,
        "all_to_all on one rank is a copy"
    );
    // Mismatched buffer counts are errors, not panics.
    assert!(matches!(
        nccl.all_reduce(&send, &mut []),
        Err(CommError::Invalid(_))
    ));
    // Two ranks on one GPU: NCCL refuses, we say why.
    let dup = comm::NcclComms::new(vec![ctx.new_stream().unwrap(), ctx.new_stream().unwrap()]);
    assert!(matches!(dup, Err(CommError::DuplicateDevice(0))));
}
