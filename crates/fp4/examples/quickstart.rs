//! The README's `fp4` example: quantize, GEMV against the f64 reference, GGUF round trip.

fn main() -> Result<(), fp4::Fp4Error> {
    use fp4::{quantize_matrix, ScaleRounding};

    let (rows, k) = (64, 2880); // K must be a multiple of 32
    let w: Vec<f32> = (0..rows * k).map(|i| (i as f32).sin()).collect();
    let q = quantize_matrix(&w, rows, k, ScaleRounding::Floor)?; // OCP rule; ::Up never clips
    let view = q.view()?; // or MxMatrixRef::new over mmap'd checkpoint bytes
    let x = vec![1.0f32; k];
    let mut y = vec![0.0f32; rows];
    fp4::gemv(view, &x, &mut y)?; // multithreaded; gemm() for batch 1..=16

    let exact = fp4::gemv_f64_reference(view, &vec![1.0f64; k]);
    let bound = fp4::gemv_error_bound(view, &x);
    for r in 0..rows {
        assert!((y[r] as f64 - exact[r]).abs() <= bound[r]);
    }
    let gguf = fp4::to_gguf(view); // 17-byte block_mxfp4, lossless both ways
    assert_eq!(fp4::from_gguf(&gguf, rows, k)?, q);
    println!("y[0..4] = {:?}; GGUF: {} bytes", &y[..4], gguf.len());
    Ok(())
}
