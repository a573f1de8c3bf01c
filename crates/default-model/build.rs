//! Embeds `assets/` into the library: writes `$OUT_DIR/assets.rs` with one `include_bytes!` per
//! file and the SHA-256 of all of them (the cache directory's name, so a changed asset never
//! reuses a stale copy).

use std::fmt::Write as _;
use std::path::Path;

use sha2::{Digest, Sha256};

/// (subdirectory, files) — every file of the default checkpoint and drafter.
const FILES: &[(&str, &[&str])] = &[
    (
        "target",
        &[
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        ],
    ),
    ("drafter", &["config.json", "model.safetensors"]),
];

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets");
    let mut hasher = Sha256::new();
    let mut code = String::new();
    writeln!(
        code,
        "/// (directory, file name, bytes) of every embedded file."
    )
    .unwrap();
    writeln!(code, "pub(crate) static FILES: &[(&str, &str, &[u8])] = &[").unwrap();
    for (dir, names) in FILES {
        for name in *names {
            let path = root.join(dir).join(name);
            println!("cargo:rerun-if-changed={}", path.display());
            let bytes = std::fs::read(&path)
                .unwrap_or_else(|e| panic!("default-model asset {}: {e}", path.display()));
            hasher.update(dir.as_bytes());
            hasher.update([0]);
            hasher.update(name.as_bytes());
            hasher.update([0]);
            hasher.update((bytes.len() as u64).to_le_bytes());
            hasher.update(&bytes);
            writeln!(
                code,
                "    ({dir:?}, {name:?}, include_bytes!({:?})),",
                path.display().to_string()
            )
            .unwrap();
        }
    }
    writeln!(code, "];").unwrap();
    let digest = hasher.finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    writeln!(
        code,
        "/// SHA-256 over every embedded file (names, lengths, bytes)."
    )
    .unwrap();
    writeln!(code, "pub const FINGERPRINT: &str = {hex:?};").unwrap();
    let out = Path::new(&std::env::var("OUT_DIR").unwrap()).join("assets.rs");
    std::fs::write(out, code).unwrap();
}
