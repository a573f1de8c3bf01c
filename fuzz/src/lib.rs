//! The `load_checkpoint` fuzz target's logic, shared with the seed generator.
//!
//! Input format: byte 0 = flags (bit 0: also write a `generation_config.json` taken from the
//! tail of the config part after a 0 byte; bit 1: write the safetensors bytes as a one-shard
//! sharded checkpoint with an index naming every tensor of the header, when parseable), bytes
//! 1..3 = config length n (u16 LE), then n bytes of `config.json`, then the `model.safetensors`
//! bytes. Everything is written to a per-process temp dir and `model::load::load` is called; it
//! must return (Ok or Err), never panic.

pub mod serve_targets;

use std::path::PathBuf;

/// Flag: write a `generation_config.json`.
pub const GEN_CONFIG: u8 = 1;
/// Flag: write a sharded checkpoint (index + one shard).
pub const SHARDED: u8 = 2;

/// Builds a fuzz input.
pub fn encode(flags: u8, config: &[u8], safetensors: &[u8]) -> Vec<u8> {
    let n = config.len().min(u16::MAX as usize);
    let mut v = vec![flags];
    v.extend_from_slice(&(n as u16).to_le_bytes());
    v.extend_from_slice(&config[..n]);
    v.extend_from_slice(safetensors);
    v
}

fn dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("ultra-fuzz-load-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&d);
    d
}

/// Tensor names of a safetensors header (best effort, for the sharded mode's index).
fn header_names(st: &[u8]) -> Vec<String> {
    if st.len() < 8 {
        return Vec::new();
    }
    let n = u64::from_le_bytes(st[..8].try_into().unwrap_or([0; 8]));
    let Some(h) = usize::try_from(n)
        .ok()
        .and_then(|n| n.checked_add(8))
        .and_then(|e| st.get(8..e))
    else {
        return Vec::new();
    };
    match serde_json::from_slice::<serde_json::Value>(h) {
        Ok(serde_json::Value::Object(m)) => {
            m.keys().filter(|k| *k != "__metadata__").cloned().collect()
        }
        _ => Vec::new(),
    }
}

/// Runs one input: writes the files and loads them. Returns whether the load succeeded.
pub fn run(data: &[u8]) -> bool {
    if data.len() < 3 {
        return false;
    }
    let flags = data[0];
    let n = u16::from_le_bytes([data[1], data[2]]) as usize;
    let rest = &data[3..];
    let (config, st) = rest.split_at(n.min(rest.len()));
    let d = dir();
    for f in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "model-00001-of-00001.safetensors",
    ] {
        let _ = std::fs::remove_file(d.join(f));
    }
    let (config, gen) = if flags & GEN_CONFIG != 0 {
        match config.iter().position(|&b| b == 0) {
            Some(i) => (&config[..i], Some(&config[i + 1..])),
            None => (config, None),
        }
    } else {
        (config, None)
    };
    let _ = std::fs::write(d.join("config.json"), config);
    if let Some(g) = gen {
        let _ = std::fs::write(d.join("generation_config.json"), g);
    }
    if flags & SHARDED != 0 {
        let shard = "model-00001-of-00001.safetensors";
        let wm: serde_json::Map<String, serde_json::Value> = header_names(st)
            .into_iter()
            .map(|k| (k, serde_json::Value::String(shard.into())))
            .collect();
        let index = serde_json::json!({ "metadata": {}, "weight_map": wm });
        let _ = std::fs::write(d.join("model.safetensors.index.json"), index.to_string());
        let _ = std::fs::write(d.join(shard), st);
    } else {
        let _ = std::fs::write(d.join("model.safetensors"), st);
    }
    model::load::load(&d).is_ok()
}
