//! The `ultra` command-line tool.

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ultra", version, about = "Ultra: low-latency MoE inference")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// CPU MXFP4 expert GEMV/GEMM at gpt-oss-20b expert shapes: checked, then timed (weight GB/s).
    BenchFp4 {
        /// Timed repetitions per case (median reported).
        #[arg(long, default_value_t = 10)]
        iters: usize,
        /// Batch sizes (activation rows per weight pass), 1..=16.
        #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
        batch: Vec<usize>,
        /// Worker threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        #[arg(long, default_value_t = 0x0FF4)]
        seed: u64,
    },
    /// List the GPUs Ultra can use and the NCCL library found.
    Devices,
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::BenchFp4 {
            iters,
            batch,
            threads,
            seed,
        } => {
            if let Some(t) = threads {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(t)
                    .build_global()?;
            }
            println!(
                "CPU MXFP4 GEMV at gpt-oss-20b expert shapes, {} threads (each case checked against the f64 reference first)",
                rayon::current_num_threads()
            );
            let rows = serve::fp4_bench::run(iters.max(1), &batch, seed)?;
            println!("| case | weight MB | median ms | weight GB/s |");
            println!("|---|---:|---:|---:|");
            for r in rows {
                println!(
                    "| {} | {:.1} | {:.3} | {:.2} |",
                    r.case,
                    r.weight_bytes as f64 / 1e6,
                    r.median_ms,
                    r.gb_per_s
                );
            }
        }
        Cmd::Devices => {
            let n = tilert::Device::count();
            if n == 0 {
                println!("no CUDA device (driver absent or no GPU): Ultra runs on the CPU");
            }
            for i in 0..n {
                match tilert::Device::open(i) {
                    Ok(d) => println!("{}", d.info),
                    Err(e) => println!("GPU {i}: {e}"),
                }
            }
            match comm::nccl_version() {
                Ok(v) => println!("NCCL {v}"),
                Err(e) => println!("NCCL: {e}"),
            }
        }
    }
    Ok(())
}
