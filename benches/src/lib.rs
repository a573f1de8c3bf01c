//! # ultra-benches — GPU benchmark programs and their shared timing helpers
//!
//! Owns the event-timed GPU measurements that `BENCHMARKS.md` reports. Every program here measures
//! its bandwidth ceiling (a streaming-read kernel, `kernels/bench.cu`) in the same run as the thing
//! it reports, checks the result against a CPU reference before timing, and writes full results as
//! JSON. They are built by `cargo xtask gpu-bundle` and run on the GPU machine by
//! `gpu-bundle/run.sh`.
//!
//! CPU benchmarks use criterion and live beside their crates (`crates/fp4/benches`).

use std::sync::Arc;

use anyhow::Result;
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};

/// gpt-oss-20b's configuration (`fixtures/configs/gpt-oss-20b.json`), embedded.
pub const GPT_OSS_20B_CONFIG: &str = include_str!("../../fixtures/configs/gpt-oss-20b.json");

/// gpt-oss-20b at its true dimensions with random weights generated on GPU 0 (no EOS ids, so
/// benchmarks decode as long as they ask); prints the device and the build time.
pub fn synthetic_gpt_oss_20b() -> Result<tilert::exec::GpuModel> {
    let mut config = model::config::ModelConfig::from_json_str(GPT_OSS_20B_CONFIG)?;
    config.eos_token_ids.clear();
    let t_build = std::time::Instant::now();
    let gpu = tilert::exec::GpuModel::synthetic(0, Arc::new(config), 20261121)?;
    eprintln!(
        "{}\nsynthetic gpt-oss-20b: {:.2} GB on the device in {:.1} s",
        gpu.device().info,
        gpu.weight_bytes() as f64 / 1e9,
        t_build.elapsed().as_secs_f64()
    );
    Ok(gpu)
}

/// Median of a sample (sorts a copy).
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        0.5 * (v[m - 1] + v[m])
    }
}

/// Times `iters` back-to-back calls of `f(i)` between two events, `samples` times, after one
/// warm-up sample; returns the per-call times in microseconds (one per sample).
pub fn time_us(
    stream: &Arc<CudaStream>,
    samples: usize,
    iters: usize,
    mut f: impl FnMut(usize) -> Result<()>,
) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(samples);
    for s in 0..=samples {
        let start = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        for i in 0..iters {
            f(s * iters + i)?;
        }
        let end = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        let ms = start.elapsed_ms(&end)? as f64;
        if s > 0 {
            out.push(ms * 1e3 / iters as f64);
        }
    }
    Ok(out)
}

/// The measurement kernels of `kernels/bench.cu`.
pub struct BenchKernels {
    stream: Arc<CudaStream>,
    stream_read: CudaFunction,
    fill: CudaFunction,
    sink: CudaSlice<u32>,
    sm_count: u32,
}

impl BenchKernels {
    pub fn new(stream: Arc<CudaStream>, sm_count: u32) -> Result<Self> {
        let module = ultra_kernels::load(stream.context(), &ultra_kernels::BENCH)?;
        Ok(Self {
            stream_read: module.load_function("stream_read")?,
            fill: module.load_function("fill_random_u8")?,
            sink: stream.alloc_zeros::<u32>(1)?,
            stream,
            sm_count,
        })
    }

    /// Fills `buf[offset..offset+len]` with bytes `lo + (hash % span)`.
    pub fn fill(&self, buf: &mut CudaSlice<u8>, seed: u64, lo: u32, span: u32) -> Result<()> {
        let n = buf.len() as u64;
        let cfg = LaunchConfig {
            grid_dim: (self.sm_count * 8, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(&self.fill);
        b.arg(buf).arg(&n).arg(&seed).arg(&lo).arg(&span);
        // SAFETY: argument types match `fill_random_u8`.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// Streams `len` bytes (a multiple of 16) of `buf` starting at `offset` (16-aligned).
    pub fn stream_read(&mut self, buf: &CudaSlice<u8>, offset: usize, len: usize) -> Result<()> {
        let view = buf.slice(offset..offset + len);
        let n16 = (len / 16) as u64;
        let cfg = LaunchConfig {
            grid_dim: (self.sm_count * 8, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(&self.stream_read);
        b.arg(&view).arg(&n16).arg(&mut self.sink);
        // SAFETY: argument types match `stream_read`; the view is in bounds.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }
}
