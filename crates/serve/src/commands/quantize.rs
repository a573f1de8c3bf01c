//! `ultra quantize --in DIR --out DIR`: bf16 gpt-oss experts → the released MXFP4 layout.

use std::path::Path;

use anyhow::Result;
use fp4::ScaleRounding;

/// Runs the quantizer and prints what it did.
pub fn run(input: &Path, output: &Path, rounding: ScaleRounding) -> Result<()> {
    let r = model::quantize::quantize_checkpoint(input, output, rounding)?;
    println!(
        "quantized {} expert tensors to MXFP4 ({:?} scales), copied {} tensors: {:.1} MB -> {:.1} MB; \
         max |error| / max |weight| per expert stack: {:.4}",
        r.tensors_quantized,
        rounding,
        r.tensors_copied,
        r.bytes_in as f64 / 1e6,
        r.bytes_out as f64 / 1e6,
        r.max_relative_error
    );
    println!("wrote {}", output.display());
    Ok(())
}
