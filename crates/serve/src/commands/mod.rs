//! The `ultra` subcommands, one module each; `src/bin/ultra.rs` only parses arguments.

pub mod adapt_memory;
pub mod bench_decode;
pub mod bench_prefix;
pub mod bench_serve;
pub mod bench_shapes;
pub mod bench_spec;
pub mod devices;
pub mod generate;
pub mod inspect;
pub mod quantize;
pub mod serve;

use std::sync::atomic::{AtomicBool, Ordering};

use model::cpu::{Activations, CpuModel};

/// Whether the CPU models this process builds feed MXFP4 experts int8 activations.
static CPU_Q8: AtomicBool = AtomicBool::new(false);

/// Sets how the CPU models built by these commands take expert activations (the `ultra`
/// binary's `--activations`, default `q8`; the library default is the exact `f32`).
pub fn set_cpu_activations(a: Activations) {
    CPU_Q8.store(a == Activations::Q8, Ordering::Relaxed);
}

/// The mode of [`set_cpu_activations`].
pub fn cpu_activations() -> Activations {
    if CPU_Q8.load(Ordering::Relaxed) {
        Activations::Q8
    } else {
        Activations::F32
    }
}

/// A CPU model in the process's activation mode.
pub fn cpu_model(
    config: std::sync::Arc<model::config::ModelConfig>,
    weights: std::sync::Arc<model::weights::Weights>,
) -> Result<CpuModel, model::cpu::CpuError> {
    Ok(CpuModel::new(config, weights)?.with_activations(cpu_activations()))
}
