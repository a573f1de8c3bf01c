//! # fp4 — exact MXFP4 for Ultra (usable on its own)
//!
//! This crate owns the MXFP4 format of the OCP Microscaling spec v1.0 as Ultra uses it for MoE
//! expert weights:
//!
//! * **Tables** ([`format`]): the 16 E2M1 codes (±{0, 0.5, 1, 1.5, 2, 3, 4, 6}), the E8M0 scale
//!   byte (2^(s−127), `0xFF` = NaN), blocks of [`BLOCK`] = 32 values along the reduction axis K,
//!   16 code bytes + 1 scale byte = 17 bytes per block (4.25 bits per value).
//! * **Quantization** ([`quant`]): f32/bf16 → MXFP4 with the OCP shared exponent
//!   `floor(log2(amax)) − 2`, round-to-nearest-even, saturation at ±6; or the "round the scale
//!   up" variant that never clips.
//! * **Layouts** ([`layout`]): the gpt-oss checkpoint order (element 2j in the low nibble of
//!   byte j; blocks `[.., out, K/32, 16]`, scales `[.., out, K/32]`) and the GGUF `block_mxfp4`
//!   order (scale byte first, element j low / j+16 high).
//! * **CPU kernels** ([`cpu`]): dequantize, GEMV and small-batch GEMM (1–16 rows) of f32/bf16
//!   activations against MXFP4 weights; multithreaded with rayon.
//! * **Integer CPU path** ([`q8`]): activations quantized to int8 per block of 32 and integer dot
//!   products (AVX-512-VNNI / AVX2 / portable, bit-identical), with a stated error bound.
//! * **GPU kernels** (`cuda` feature, module `cuda`): dequantize and GEMV on NVIDIA GPUs
//!   (sm_90a cubin, compute_90 PTX fallback) through cudarc, with no CUDA install needed to build.
//!
//! Every fallible entry point returns [`Fp4Error`]; malformed shapes or NaN scale bytes never panic.

pub mod cpu;
pub mod format;
pub mod layout;
pub mod q8;
pub mod quant;
pub mod tiled;

#[cfg(feature = "cuda")]
pub mod cuda;

pub use cpu::{
    dequantize, dequantize_bf16, dequantize_bf16_into, dequantize_into, dot_error_bound, gemm,
    gemm_bf16, gemm_bf16_with, gemm_with, gemv, gemv_bf16, gemv_error_bound, gemv_f64_reference,
    CpuKernel, MAX_BATCH,
};
pub use format::{
    e2m1_to_f32, e8m0_to_f32, e8m0_to_f64, Fp4Error, MxExpertsRef, MxMatrix, MxMatrixRef, BLOCK,
    BLOCK_BYTES, E2M1_VALUES, E8M0_NAN,
};
pub use layout::{from_gguf, pack_codes, to_gguf, unpack_codes, GGUF_BLOCK_BYTES};
pub use q8::{gemm_q8, gemm_q8_with, q8_error_bound, Q8Kernel, Q8Rows};
pub use quant::{quantize_block, quantize_matrix, quantize_matrix_bf16, ScaleRounding};
