//! `ultra quantize`: a gpt-oss checkpoint with bf16/f32 experts → the released MXFP4 layout.
//!
//! Every `model.layers.N.mlp.experts.{gate_up_proj,down_proj}` tensor (transformers' layout
//! `[E, in, out]`) becomes `{name}_blocks` `[E, out, in/32, 16]` + `{name}_scales` `[E, out, in/32]`
//! (U8, gpt-oss nibble order, E8M0 scales), the layout of openai/gpt-oss-20b that transformers
//! and Ultra both load; `config.json` gains the released `quantization_config`. Every other
//! tensor is copied byte for byte, and every other file of the directory (tokenizer, generation
//! config, chat template) is copied. The output is written tensor by tensor (a streaming
//! safetensors writer), so memory stays at one expert stack plus the mmapped input.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Value};

use fp4::{quantize_matrix, ScaleRounding, BLOCK};

/// What can go wrong while quantizing.
#[derive(Debug, thiserror::Error)]
pub enum QuantizeError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
    #[error("tensor {name}: {source}")]
    Fp4 {
        name: String,
        #[source]
        source: fp4::Fp4Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> QuantizeError + '_ {
    move |source| QuantizeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn invalid(path: &Path, msg: impl Into<String>) -> QuantizeError {
    QuantizeError::Invalid {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// What was done.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizeReport {
    pub tensors_quantized: usize,
    pub tensors_copied: usize,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Largest |dequantized − original| relative to the largest |original| of its expert stack.
    pub max_relative_error: f64,
}

/// The safetensors files of a checkpoint directory (single file or sharded index).
fn shard_files(dir: &Path) -> Result<Vec<PathBuf>, QuantizeError> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = fs::read_to_string(&index).map_err(io(&index))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| invalid(&index, e.to_string()))?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| invalid(&index, "no weight_map object"))?;
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(Value::as_str)
            .map(|f| dir.join(f))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        Ok(vec![single])
    } else {
        Err(invalid(
            dir,
            "no model.safetensors or model.safetensors.index.json",
        ))
    }
}

fn to_f32(dtype: Dtype, bytes: &[u8], name: &str, path: &Path) -> Result<Vec<f32>, QuantizeError> {
    match dtype {
        Dtype::BF16 => Ok(bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect()),
        Dtype::F16 => Ok(bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect()),
        Dtype::F32 => Ok(bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()),
        other => Err(invalid(
            path,
            format!("tensor {name}: expert weights must be BF16, F16 or F32 to quantize, found {other:?}"),
        )),
    }
}

fn dtype_name(d: Dtype) -> String {
    // safetensors' serde names ("BF16", "U8", ...).
    serde_json::to_value(d)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{d:?}"))
}

/// One output tensor: its header entry and where its bytes come from.
enum Payload<'a> {
    Copy(&'a [u8]),
    Owned(Vec<u8>),
}

struct OutTensor<'a> {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    data: Payload<'a>,
}

impl OutTensor<'_> {
    fn bytes(&self) -> &[u8] {
        match &self.data {
            Payload::Copy(b) => b,
            Payload::Owned(v) => v,
        }
    }
}

/// Is this a gpt-oss stacked expert projection in transformers' bf16 layout?
fn is_expert_projection(name: &str) -> bool {
    name.starts_with("model.layers.")
        && (name.ends_with(".mlp.experts.gate_up_proj") || name.ends_with(".mlp.experts.down_proj"))
}

/// Quantizes the gpt-oss checkpoint in `input` into `output` (created; must not exist or be empty).
pub fn quantize_checkpoint(
    input: &Path,
    output: &Path,
    rounding: ScaleRounding,
) -> Result<QuantizeReport, QuantizeError> {
    let config_path = input.join("config.json");
    let config_text = fs::read_to_string(&config_path).map_err(io(&config_path))?;
    let mut config: Value =
        serde_json::from_str(&config_text).map_err(|e| invalid(&config_path, e.to_string()))?;
    let model_type = config
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or("");
    if model_type != "gpt_oss" {
        return Err(invalid(
            &config_path,
            format!("model_type {model_type:?}: MXFP4 quantization writes the gpt-oss layout and needs a gpt_oss checkpoint"),
        ));
    }
    if config.get("quantization_config").is_some() {
        return Err(invalid(
            &config_path,
            "the checkpoint is already quantized (quantization_config present)",
        ));
    }
    if output.exists() && fs::read_dir(output).map_err(io(output))?.next().is_some() {
        return Err(invalid(output, "output directory exists and is not empty"));
    }
    fs::create_dir_all(output).map_err(io(output))?;

    let files = shard_files(input)?;
    let maps: Vec<(PathBuf, Mmap)> = files
        .iter()
        .map(|p| {
            let f = File::open(p).map_err(io(p))?;
            // SAFETY: read-only map of a file we do not modify; a concurrent writer could change
            // the bytes under us, as with any mmap-based loader.
            let m = unsafe { Mmap::map(&f) }.map_err(io(p))?;
            Ok((p.clone(), m))
        })
        .collect::<Result<_, QuantizeError>>()?;
    let parsed: Vec<(PathBuf, SafeTensors<'_>)> = maps
        .iter()
        .map(|(p, m)| {
            SafeTensors::deserialize(m)
                .map(|st| (p.clone(), st))
                .map_err(|e| invalid(p, format!("invalid safetensors: {e}")))
        })
        .collect::<Result<_, _>>()?;

    let mut report = QuantizeReport {
        tensors_quantized: 0,
        tensors_copied: 0,
        bytes_in: 0,
        bytes_out: 0,
        max_relative_error: 0.0,
    };
    let mut out: Vec<OutTensor<'_>> = Vec::new();
    for (path, st) in &parsed {
        let mut names: Vec<String> = st.names().into_iter().map(str::to_owned).collect();
        names.sort();
        for name in names {
            let t = st
                .tensor(&name)
                .map_err(|e| invalid(path, format!("tensor {name}: {e}")))?;
            report.bytes_in += t.data().len() as u64;
            if !is_expert_projection(&name) {
                out.push(OutTensor {
                    name,
                    dtype: dtype_name(t.dtype()),
                    shape: t.shape().to_vec(),
                    data: Payload::Copy(t.data()),
                });
                report.tensors_copied += 1;
                continue;
            }
            let &[e, k, n] = t.shape() else {
                return Err(invalid(
                    path,
                    format!("tensor {name}: expected [E, in, out], got {:?}", t.shape()),
                ));
            };
            if !k.is_multiple_of(BLOCK) {
                return Err(invalid(
                    path,
                    format!("tensor {name}: input dimension {k} is not a multiple of 32"),
                ));
            }
            let values = to_f32(t.dtype(), t.data(), &name, path)?;
            let mut blocks = Vec::with_capacity(e * n * k / 2);
            let mut scales = Vec::with_capacity(e * n * k / BLOCK);
            for x in 0..e {
                // [in, out] → [out, in]: quantization blocks run along the input (reduction) axis.
                let src = &values[x * k * n..(x + 1) * k * n];
                let mut rows = vec![0f32; n * k];
                for i in 0..k {
                    for o in 0..n {
                        rows[o * k + i] = src[i * n + o];
                    }
                }
                let q = quantize_matrix(&rows, n, k, rounding).map_err(|source| {
                    QuantizeError::Fp4 {
                        name: name.clone(),
                        source,
                    }
                })?;
                let view = q.view().map_err(|source| QuantizeError::Fp4 {
                    name: name.clone(),
                    source,
                })?;
                let back = fp4::dequantize(view);
                let amax = rows.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
                let err = rows
                    .iter()
                    .zip(&back)
                    .fold(0f64, |m, (a, b)| m.max((*a as f64 - *b as f64).abs()));
                if amax > 0.0 {
                    report.max_relative_error = report.max_relative_error.max(err / amax);
                }
                blocks.extend_from_slice(&q.blocks);
                scales.extend_from_slice(&q.scales);
            }
            out.push(OutTensor {
                name: format!("{name}_blocks"),
                dtype: "U8".into(),
                shape: vec![e, n, k / BLOCK, 16],
                data: Payload::Owned(blocks),
            });
            out.push(OutTensor {
                name: format!("{name}_scales"),
                dtype: "U8".into(),
                shape: vec![e, n, k / BLOCK],
                data: Payload::Owned(scales),
            });
            report.tensors_quantized += 1;
        }
    }
    if report.tensors_quantized == 0 {
        return Err(invalid(
            input,
            "no bf16 expert tensors (model.layers.N.mlp.experts.*_proj) to quantize",
        ));
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    let st_path = output.join("model.safetensors");
    report.bytes_out = write_safetensors(&st_path, &out)?;

    // config.json with the released quantization_config; every other file copied.
    config["quantization_config"] = json!({
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head"
        ]
    });
    let out_config = output.join("config.json");
    fs::write(
        &out_config,
        serde_json::to_string_pretty(&config).expect("a JSON value serializes"),
    )
    .map_err(io(&out_config))?;
    for entry in fs::read_dir(input).map_err(io(input))? {
        let entry = entry.map_err(io(input))?;
        let p = entry.path();
        let fname = entry.file_name().to_string_lossy().into_owned();
        let skip = fname == "config.json"
            || fname.ends_with(".safetensors")
            || fname == "model.safetensors.index.json"
            || fname.starts_with("golden_");
        if p.is_file() && !skip {
            fs::copy(&p, output.join(&fname)).map_err(io(&p))?;
        }
    }
    Ok(report)
}

/// Writes tensors as one safetensors file, streaming their data; returns the file size.
fn write_safetensors(path: &Path, tensors: &[OutTensor<'_>]) -> Result<u64, QuantizeError> {
    let mut header = BTreeMap::new();
    let mut offset = 0usize;
    for t in tensors {
        let len = t.bytes().len();
        header.insert(
            t.name.clone(),
            json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    let mut obj = serde_json::Map::new();
    obj.insert("__metadata__".into(), json!({"format": "pt"}));
    obj.extend(header);
    let mut head = serde_json::to_string(&Value::Object(obj)).expect("JSON serializes");
    while !head.len().is_multiple_of(8) {
        head.push(' ');
    }
    let file = File::create(path).map_err(io(path))?;
    let mut w = BufWriter::new(file);
    w.write_all(&(head.len() as u64).to_le_bytes())
        .map_err(io(path))?;
    w.write_all(head.as_bytes()).map_err(io(path))?;
    for t in tensors {
        w.write_all(t.bytes()).map_err(io(path))?;
    }
    w.flush().map_err(io(path))?;
    Ok(8 + head.len() as u64 + offset as u64)
}
