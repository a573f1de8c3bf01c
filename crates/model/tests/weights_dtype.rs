//! Dtype-true weights: a matrix stored as bf16, f16 or FP8 (+ block scales) gives bit for bit
//! the results of the same values held as f32 in every CPU kernel (the widening is exact and the
//! f32 operations are the same), and the loader hands out views of the mapped checkpoint in the
//! stored dtype (tied embeddings share the embedding's storage; adjacent gate/up tensors are one
//! view).

mod load_common;

use half::{bf16, f16};
use load_common::*;
use model::cpu::ops;
use model::load::load;
use model::weights::{Bytes, DenseDtype, ExpertMat, Mat, Mlp};

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn rand_vals(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut r = Rng(seed | 1);
    (0..n)
        .map(|_| {
            let u = (r.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
            scale * (2.0 * u - 1.0)
        })
        .collect()
}

/// Every kernel path (serial and rayon matvec, token tiles of matmul, row tails) on a matrix in
/// its narrow dtype equals the f32 matrix of the widened values exactly.
fn assert_same_as_widened(m: &Mat, what: &str) {
    let wide = Mat::from_f32(m.rows, m.cols, m.to_f32());
    assert_eq!(wide.dtype(), DenseDtype::F32);
    for t in [1, 3, 33] {
        let x = rand_vals(7 + t as u64, t * m.cols, 1.0);
        let (mut a, mut b) = (vec![0f32; t * m.rows], vec![0f32; t * m.rows]);
        ops::matmul(m, &x, t, &mut a);
        ops::matmul(&wide, &x, t, &mut b);
        assert_eq!(bits(&a), bits(&b), "{what}: t = {t}");
    }
    for r in [0, m.rows / 2, m.rows - 1] {
        let x = rand_vals(99, m.cols, 1.0);
        assert_eq!(
            ops::dot_row(m.data(), r, &x, &mut Vec::new()).to_bits(),
            ops::dot_portable(&wide.row(r), &x).to_bits(),
            "{what}: row {r} against the portable dot"
        );
    }
}

#[test]
fn narrow_dtypes_compute_exactly_like_their_f32_widening() {
    // 61 columns: a 32-lane chunk and a 29-value tail; 700 x 261 is over PAR_MIN_WORK.
    for (rows, cols) in [(9, 61), (700, 261), (64, 32)] {
        let v = rand_vals(rows as u64, rows * cols, 2.0);
        let b = Mat::from_bf16(rows, cols, v.iter().map(|&x| bf16::from_f32(x)).collect());
        assert_eq!(b.dtype(), DenseDtype::Bf16);
        assert_same_as_widened(&b, "bf16");
        let h = Mat::from_f16(rows, cols, v.iter().map(|&x| f16::from_f32(x)).collect());
        assert_same_as_widened(&h, "f16");
        let codes: Vec<u8> = (0..rows * cols).map(|k| (k * 37 % 0x7E) as u8).collect();
        let plain = Mat::from_bytes(
            DenseDtype::F8E4M3,
            rows,
            cols,
            Bytes::from_vec(codes.clone()),
            None,
        )
        .unwrap();
        assert_same_as_widened(&plain, "fp8");
        let block = [16, 16];
        let sc = cols.div_ceil(16);
        let scales = rand_vals(3, rows.div_ceil(16) * sc, 4.0);
        let scaled = Mat::from_bytes(
            DenseDtype::F8E4M3,
            rows,
            cols,
            Bytes::from_vec(codes),
            Some((block, sc, scales.clone())),
        )
        .unwrap();
        // Element (r, c) is f8(code) · scale of its block, rounded once in f32.
        let r = rows - 1;
        let c = cols - 1;
        let want = model::checkpoint::f8_e4m3_to_f32(((r * cols + c) * 37 % 0x7E) as u8)
            * scales[(r / 16) * sc + c / 16];
        assert_eq!(scaled.row(r)[c].to_bits(), want.to_bits());
        assert_same_as_widened(&scaled, "fp8 with block scales");
    }
}

#[test]
fn bad_storage_is_an_error_and_edits_copy_on_write() {
    let e =
        Mat::from_bytes(DenseDtype::Bf16, 2, 3, Bytes::from_vec(vec![0; 10]), None).unwrap_err();
    assert!(e.contains("10 bytes for a 2x3 Bf16 matrix"), "{e}");
    let e = Mat::from_bytes(
        DenseDtype::F8E4M3,
        4,
        4,
        Bytes::from_vec(vec![0; 16]),
        Some(([2, 2], 2, vec![1.0; 3])),
    )
    .unwrap_err();
    assert!(e.contains("FP8 scales"), "{e}");
    let a = Mat::from_bf16(1, 2, vec![bf16::from_f32(1.5), bf16::from_f32(-2.0)]);
    let mut b = a.clone();
    b.make_f32_mut()[0] = 7.0;
    assert_eq!(&*a.row(0), &[1.5, -2.0]);
    assert_eq!(&*b.row(0), &[7.0, -2.0]);
    assert_eq!(b.dtype(), DenseDtype::F32);
}

#[test]
fn loaded_weights_are_mapped_views_in_the_stored_dtype() {
    let ts = qwen3_tensors(5);
    let d = TempDir::new("dtype-views");
    write_model(&d, QWEN3_CONFIG, &ts);
    let (_, w) = load(d.path()).unwrap();
    assert_eq!(w.embed.dtype(), DenseDtype::Bf16);
    assert!(
        w.embed.bytes().is_mapped(),
        "the embedding is a view of the file"
    );
    let a = &w.layers[0].attn;
    for m in [&a.q.w, &a.k.w, &a.v.w, &a.o.w] {
        assert_eq!(m.dtype(), DenseDtype::Bf16);
        assert!(m.bytes().is_mapped());
    }
    let Mlp::Moe(moe) = &w.layers[0].mlp else {
        panic!("layer 0 is MoE")
    };
    let ExpertMat::Dense(gu) = &moe.experts[0].gate_up else {
        panic!("bf16 experts are dense")
    };
    // gate_proj and up_proj lie back to back in the file: one view, no copy.
    assert!(
        gu.bytes().is_mapped(),
        "gate/up of adjacent tensors is a view"
    );
    assert_eq!(gu.stored_bytes(), gu.numel() * 2);
    // Stored bf16 bytes are the checkpoint's.
    let want = &ts["model.embed_tokens.weight"].data;
    assert_eq!(w.embed.bytes().as_slice(), &want[..]);

    // Tied embeddings (from the config): the head is the embedding's storage.
    let mut t2 = ts.clone();
    t2.remove("lm_head.weight");
    let d2 = TempDir::new("dtype-tied");
    write_model(
        &d2,
        &patch_config(QWEN3_CONFIG, r#"{"tie_word_embeddings": true}"#),
        &t2,
    );
    let (_, w2) = load(d2.path()).unwrap();
    assert_eq!(
        w2.lm_head.bytes().as_slice().as_ptr(),
        w2.embed.bytes().as_slice().as_ptr(),
        "tied lm_head shares the embedding's bytes"
    );
    assert!(w2.stored_bytes() < w.stored_bytes());
}

#[test]
fn mxfp4_experts_are_views_of_the_packed_bytes() {
    let ts = gpt_oss_tensors(3, true);
    let d = TempDir::new("dtype-mx");
    write_model(
        &d,
        &patch_config(
            GPT_OSS_CONFIG,
            r#"{"quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": ["lm_head"]}}"#,
        ),
        &ts,
    );
    let (_, w) = load(d.path()).unwrap();
    let Mlp::Moe(m) = &w.layers[0].mlp else {
        panic!("gpt-oss layers are MoE")
    };
    let ExpertMat::Mxfp4(q) = &m.experts[1].gate_up else {
        panic!("MXFP4 experts stay MXFP4")
    };
    let blocks = &ts["model.layers.0.mlp.experts.gate_up_proj_blocks"].data;
    let per = q.blocks().unwrap().len();
    assert_eq!(q.blocks().unwrap(), &blocks[per..2 * per]);
    // A view of the mapping: the bytes live inside the file's mapped region, not in a copy.
    let mut owned = q.clone();
    owned.scales_mut()[0] ^= 1;
    assert_ne!(owned, *q, "editing a clone copies on write");
    assert_eq!(q.view().unwrap().rows(), q.rows);
}

/// `Mat::columns` keeps the stored dtype (FP8 with its scale columns when the range starts a
/// scale block) and takes exactly the widened values of those columns.
#[test]
fn column_blocks_keep_the_stored_dtype() {
    let (rows, cols) = (20, 48);
    let v = rand_vals(11, rows * cols, 2.0);
    let wide = |m: &Mat, c0: usize, n: usize| -> Vec<u32> {
        let all = m.to_f32();
        (0..m.rows)
            .flat_map(|r| all[r * m.cols + c0..r * m.cols + c0 + n].to_vec())
            .map(f32::to_bits)
            .collect()
    };
    let codes: Vec<u8> = (0..rows * cols).map(|k| (k * 37 % 0x7E) as u8).collect();
    let sc = cols.div_ceil(16);
    let mats = [
        Mat::from_f32(rows, cols, v.clone()),
        Mat::from_bf16(rows, cols, v.iter().map(|&x| bf16::from_f32(x)).collect()),
        Mat::from_f16(rows, cols, v.iter().map(|&x| f16::from_f32(x)).collect()),
        Mat::from_bytes(
            DenseDtype::F8E4M3,
            rows,
            cols,
            Bytes::from_vec(codes),
            Some(([16, 16], sc, rand_vals(5, rows.div_ceil(16) * sc, 4.0))),
        )
        .unwrap(),
    ];
    for m in &mats {
        for (c0, n) in [(0, 16), (16, 32), (32, 16), (8, 20), (0, 48), (47, 1)] {
            let b = m.columns(c0, n);
            assert_eq!((b.rows, b.cols), (rows, n));
            let kept = m.dtype() != DenseDtype::F8E4M3 || c0 % 16 == 0;
            let want = if kept { m.dtype() } else { DenseDtype::F32 };
            assert_eq!(b.dtype(), want, "{:?} {c0}+{n}", m.dtype());
            let got: Vec<u32> = b.to_f32().into_iter().map(f32::to_bits).collect();
            assert_eq!(got, wide(m, c0, n), "{:?} {c0}+{n}", m.dtype());
        }
    }
}

/// An MXFP4 matrix held as row segments (MiMo's `[gate; up]` as two views) computes bit for bit
/// what the contiguous matrix does, in the exact and the int8-activation kernels, and reads the
/// same rows.
#[test]
fn segmented_mxfp4_rows_equal_the_contiguous_matrix() {
    let (rows, k) = (40, 96);
    let mut r = Rng(99);
    let blocks: Vec<u8> = (0..rows * k / 2).map(|_| r.next_u64() as u8).collect();
    let scales: Vec<u8> = (0..rows * k / 32)
        .map(|_| 118 + (r.next_u64() % 8) as u8)
        .collect();
    let whole = model::weights::MxMat::from_bytes(
        rows,
        k,
        Bytes::from_vec(blocks.clone()),
        Bytes::from_vec(scales.clone()),
    );
    let cut = 24;
    let parts = model::weights::MxMat::from_parts(
        k,
        vec![
            (
                cut,
                Bytes::from_vec(blocks[..cut * k / 2].to_vec()),
                Bytes::from_vec(scales[..cut * k / 32].to_vec()),
            ),
            (
                rows - cut,
                Bytes::from_vec(blocks[cut * k / 2..].to_vec()),
                Bytes::from_vec(scales[cut * k / 32..].to_vec()),
            ),
        ],
    );
    assert_eq!(parts.num_parts(), 2);
    assert_eq!(parts, whole);
    assert!(parts.view().is_err(), "no single view of two segments");
    assert!(parts.blocks().is_none());
    assert_eq!(parts.to_owned_matrix(), whole.to_owned_matrix());
    let (pw, ww) = (ExpertMat::Mxfp4(parts), ExpertMat::Mxfp4(whole));
    for t in [1, 5, 17] {
        let x = rand_vals(t as u64, t * k, 1.0);
        let (mut a, mut b) = (vec![0f32; t * rows], vec![0f32; t * rows]);
        model::cpu::ffn::expert_matmul(&pw, &x, t, &mut a).unwrap();
        model::cpu::ffn::expert_matmul(&ww, &x, t, &mut b).unwrap();
        assert_eq!(bits(&a), bits(&b), "exact, t = {t}");
        let mut q = fp4::Q8Rows::new(k).unwrap();
        q.push_rows(&x).unwrap();
        let (ExpertMat::Mxfp4(p), ExpertMat::Mxfp4(w)) = (&pw, &ww) else {
            unreachable!()
        };
        model::cpu::ffn::mx_segments(p, t, &mut a, |v, o| fp4::gemm_q8(v, &q, o)).unwrap();
        fp4::gemm_q8(w.view().unwrap(), &q, &mut b).unwrap();
        assert_eq!(bits(&a), bits(&b), "q8, t = {t}");
    }
}

/// A dense matrix held as row segments (MiMo's FP8 `[gate; up]` as two views, each with its own
/// block scales) reads the same rows and computes bit for bit what the contiguous matrix does —
/// matvec / matmul (serial and rayon, token tiles), row reads, TP row and column shards, column
/// blocks — in every stored dtype, FP8 with scale blocks straddling the seam included.
#[test]
fn segmented_dense_rows_equal_the_contiguous_matrix() {
    // 700 x 261 is over PAR_MIN_WORK (rayon tasks); the 300-row cut is not a multiple of the
    // FP8 scale block (128), nor of 2 (the kernels' row pairs) once offset by 1.
    for (rows, cols, cut) in [(9, 61, 4), (700, 261, 300), (700, 261, 301), (64, 256, 32)] {
        let v = rand_vals(rows as u64 + cut as u64, rows * cols, 2.0);
        let halves = |m: &dyn Fn(usize, usize) -> Mat| -> (Mat, Mat) {
            let whole = m(0, rows);
            let seg = Mat::from_segments(vec![m(0, cut), m(cut, rows)]).unwrap();
            (whole, seg)
        };
        let rows_of = |r0: usize, r1: usize| v[r0 * cols..r1 * cols].to_vec();
        let bf = |r0, r1| {
            let x = rows_of(r0, r1).iter().map(|&x| bf16::from_f32(x)).collect();
            Mat::from_bf16(r1 - r0, cols, x)
        };
        let hf = |r0, r1| {
            let x = rows_of(r0, r1).iter().map(|&x| f16::from_f32(x)).collect();
            Mat::from_f16(r1 - r0, cols, x)
        };
        let f32m = |r0, r1| Mat::from_f32(r1 - r0, cols, rows_of(r0, r1));
        // FP8 codes with 128 x 128 block scales, block rows counted from each tensor's first
        // row (as the checkpoint stores gate and up); the whole matrix repeats each scale row
        // per weight row ([1, 128] blocks), the form a concatenation needed at a straddling seam.
        let block = 128;
        let sc = cols.div_ceil(block);
        let codes: Vec<u8> = (0..rows * cols)
            .map(|i| ((i * 37 + cut) % 255) as u8 & 0x7e)
            .collect();
        let scale_of = |r: usize, c: usize| -> f32 {
            let local = if r < cut { r } else { r - cut };
            let tensor = usize::from(r >= cut);
            0.5 + ((tensor * 7 + local / block) * sc + c) as f32 / 64.0
        };
        let f8 = |r0: usize, r1: usize| {
            let n = r1 - r0;
            let scales = (0..n.div_ceil(block))
                .flat_map(|b| (0..sc).map(move |c| scale_of(r0 + b * block, c)))
                .collect();
            Mat::from_bytes(
                DenseDtype::F8E4M3,
                n,
                cols,
                Bytes::from_vec(codes[r0 * cols..r1 * cols].to_vec()),
                Some(([block, block], sc, scales)),
            )
            .unwrap()
        };
        let f8_whole = |_, _| {
            let scales = (0..rows)
                .flat_map(|r| (0..sc).map(move |c| scale_of(r, c)))
                .collect();
            Mat::from_bytes(
                DenseDtype::F8E4M3,
                rows,
                cols,
                Bytes::from_vec(codes.clone()),
                Some(([1, block], sc, scales)),
            )
            .unwrap()
        };
        let cases: Vec<(&str, Mat, Mat)> = vec![
            ("bf16", halves(&bf).0, halves(&bf).1),
            ("f16", halves(&hf).0, halves(&hf).1),
            ("f32", halves(&f32m).0, halves(&f32m).1),
            (
                "fp8",
                f8_whole(0, rows),
                Mat::from_segments(vec![f8(0, cut), f8(cut, rows)]).unwrap(),
            ),
        ];
        for (what, whole, seg) in cases {
            let what = format!("{what} {rows}x{cols} cut {cut}");
            assert_eq!(seg.num_segments(), 2, "{what}");
            assert_eq!(
                (seg.rows, seg.cols, seg.dtype()),
                (rows, cols, whole.dtype())
            );
            assert_eq!(seg, whole, "{what}: rows");
            assert_eq!(bits(&seg.to_f32()), bits(&whole.to_f32()), "{what}");
            let segs = seg.segments();
            assert_eq!(
                segs.iter().map(|s| (s.0, s.1)).collect::<Vec<_>>(),
                [(0, cut), (cut, rows - cut)]
            );
            for r in [0, cut - 1, cut, rows - 1] {
                let (d, i) = seg.row_data(r);
                assert_eq!(i, if r < cut { r } else { r - cut }, "{what}: row {r}");
                let x = rand_vals(5, cols, 1.0);
                assert_eq!(
                    ops::dot_row(d, i, &x, &mut Vec::new()).to_bits(),
                    ops::dot_row(whole.data(), r, &x, &mut Vec::new()).to_bits(),
                    "{what}: dot of row {r}"
                );
                assert_eq!(
                    seg.row_bytes(r),
                    whole.row_bytes(r),
                    "{what}: bytes of row {r}"
                );
            }
            for t in [1, 3, 33] {
                let x = rand_vals(3 + t as u64, t * cols, 1.0);
                let (mut a, mut b) = (vec![0f32; t * rows], vec![0f32; t * rows]);
                ops::matmul(&seg, &x, t, &mut a);
                ops::matmul(&whole, &x, t, &mut b);
                assert_eq!(bits(&a), bits(&b), "{what}: t = {t}");
            }
            // Tensor-parallel shards: rows across the seam, a column range.
            let rs = [1..cut + 2, rows - 3..rows];
            let (a, b) = (
                model::shard::rows_of(&seg, &rs),
                model::shard::rows_of(&whole, &rs),
            );
            assert_eq!(bits(&a.to_f32()), bits(&b.to_f32()), "{what}: row shard");
            let (a, b) = (
                model::shard::cols_of(&seg, 1..cols - 2),
                model::shard::cols_of(&whole, 1..cols - 2),
            );
            assert_eq!(bits(&a.to_f32()), bits(&b.to_f32()), "{what}: column shard");
            let (a, b) = (seg.columns(0, cols / 2), whole.columns(0, cols / 2));
            assert_eq!(a.dtype(), b.dtype(), "{what}: column block dtype");
            assert_eq!(bits(&a.to_f32()), bits(&b.to_f32()), "{what}: column block");
            assert!(seg.stored_bytes() >= rows * cols * seg.dtype().size());
        }
    }
    // Segments must agree.
    let a = Mat::from_f32(2, 3, vec![0.0; 6]);
    let e = Mat::from_segments(vec![a.clone(), Mat::from_f32(1, 4, vec![0.0; 4])]).unwrap_err();
    assert!(e.contains("segment 1"), "{e}");
    let e = Mat::from_segments(vec![a, Mat::from_bf16(1, 3, vec![bf16::ZERO; 3])]).unwrap_err();
    assert!(e.contains("Bf16"), "{e}");
    assert!(Mat::from_segments(vec![]).is_err());
    let f8 = |scales| {
        Mat::from_bytes(
            DenseDtype::F8E4M3,
            2,
            4,
            Bytes::from_vec(vec![0x38; 8]),
            scales,
        )
        .unwrap()
    };
    let e = Mat::from_segments(vec![f8(Some(([128, 128], 1, vec![1.0]))), f8(None)]).unwrap_err();
    assert!(e.contains("block scales"), "{e}");
}
