//! The embedded default model of `ultra`: **ultra-tiny-code**, a tiny gpt-oss-architecture MoE code
//! model (6 layers, 16 experts, top-4, alternating sliding / full attention with sinks, MXFP4
//! experts trained with quantization-aware training) and its DFlash drafter (3 sliding-window
//! layers, block 8), both trained by the recipes in `train/` (see the README section "The embedded
//! default model").
//!
//! The checkpoint files (`assets/target/*`: a Hugging Face gpt-oss checkpoint, `assets/drafter/*`:
//! a z-lab DFlash-1 drafter) are compiled into the binary with `include_bytes!`, so `ultra` works
//! from any directory and with no download. The loaders of the `model` and `dflash` crates read
//! directories (they memory-map safetensors), so [`materialize`] writes the files once into a cache
//! directory and returns their paths:
//!
//! * `$ULTRA_CACHE_DIR`, else `$XDG_CACHE_HOME/ultra`, else `$HOME/.cache/ultra`, else
//!   `<temp dir>/ultra-cache`;
//! * inside it `ultra-tiny-code-<first 16 hex digits of the assets' SHA-256>/{target,drafter}`; a
//!   changed asset gets a new directory, never a stale copy;
//! * written into a temporary sibling directory and renamed into place (concurrent first runs are
//!   safe); a directory whose marker or file sizes disagree with the embedded files is rewritten.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

include!(concat!(env!("OUT_DIR"), "/assets.rs"));

/// The model's name (the API model id of `ultra serve` when it runs the default).
pub const MODEL_NAME: &str = "ultra-tiny-code";
/// Environment variable that overrides the cache directory.
pub const CACHE_ENV: &str = "ULTRA_CACHE_DIR";
/// Marker file written last; holds [`FINGERPRINT`].
const MARKER: &str = "COMPLETE";

/// Failures to place the embedded files on disk.
#[derive(Debug, thiserror::Error)]
pub enum DefaultModelError {
    /// No usable cache directory.
    #[error(
        "no cache directory for the embedded default model: set {CACHE_ENV} to a writable directory"
    )]
    NoCacheDir,
    /// A file or directory could not be created, written or renamed.
    #[error("embedded default model: {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DefaultModelError + '_ {
    move |source| DefaultModelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where the default checkpoint and drafter lie on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    /// `…/ultra-tiny-code-<hash>`.
    pub root: PathBuf,
    /// The target checkpoint directory (config.json, model.safetensors, tokenizer.json, …).
    pub target: PathBuf,
    /// The DFlash drafter directory (config.json, model.safetensors).
    pub drafter: PathBuf,
}

impl Paths {
    fn new(root: PathBuf) -> Paths {
        Paths {
            target: root.join("target"),
            drafter: root.join("drafter"),
            root,
        }
    }
}

/// Bytes of every embedded file together.
pub fn total_bytes() -> usize {
    FILES.iter().map(|(_, _, b)| b.len()).sum()
}

/// The embedded files: (directory `target` / `drafter`, file name, bytes).
pub fn files() -> impl Iterator<Item = (&'static str, &'static str, &'static [u8])> {
    FILES.iter().copied()
}

/// The cache directory (see the crate docs).
pub fn cache_root() -> Result<PathBuf, DefaultModelError> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(p) = var(CACHE_ENV) {
        return Ok(p);
    }
    if let Some(p) = var("XDG_CACHE_HOME") {
        return Ok(p.join("ultra"));
    }
    if let Some(p) = var("HOME") {
        return Ok(p.join(".cache").join("ultra"));
    }
    let t = std::env::temp_dir();
    if t.as_os_str().is_empty() {
        return Err(DefaultModelError::NoCacheDir);
    }
    Ok(t.join("ultra-cache"))
}

/// Writes the embedded files into the cache directory (once) and returns their paths.
pub fn materialize() -> Result<Paths, DefaultModelError> {
    materialize_in(&cache_root()?)
}

/// [`materialize`] into `base` instead of the cache directory.
pub fn materialize_in(base: &Path) -> Result<Paths, DefaultModelError> {
    let root = base.join(format!("{MODEL_NAME}-{}", &FINGERPRINT[..16]));
    if is_complete(&root) {
        return Ok(Paths::new(root));
    }
    std::fs::create_dir_all(base).map_err(io(base))?;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let tmp = base.join(format!(
        ".{MODEL_NAME}-{}.{}.{nanos}.tmp",
        &FINGERPRINT[..16],
        std::process::id()
    ));
    let result = write_tree(&tmp).and_then(|()| {
        if root.exists() {
            // An incomplete or damaged copy (checked above): replace it.
            std::fs::remove_dir_all(&root).map_err(io(&root))?;
        }
        std::fs::rename(&tmp, &root).map_err(io(&root))
    });
    match result {
        Ok(()) => Ok(Paths::new(root)),
        // Another process finished first.
        Err(_) if is_complete(&root) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(Paths::new(root))
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

fn write_tree(tmp: &Path) -> Result<(), DefaultModelError> {
    for (dir, name, bytes) in FILES {
        let d = tmp.join(dir);
        std::fs::create_dir_all(&d).map_err(io(&d))?;
        let p = d.join(name);
        let mut f = std::fs::File::create(&p).map_err(io(&p))?;
        f.write_all(bytes).map_err(io(&p))?;
        f.sync_all().map_err(io(&p))?;
    }
    let m = tmp.join(MARKER);
    std::fs::write(&m, FINGERPRINT).map_err(io(&m))
}

/// The marker holds the fingerprint and every file has its embedded length.
fn is_complete(root: &Path) -> bool {
    let marker_ok = std::fs::read_to_string(root.join(MARKER)).is_ok_and(|m| m == FINGERPRINT);
    marker_ok
        && FILES.iter().all(|(dir, name, bytes)| {
            std::fs::metadata(root.join(dir).join(name))
                .is_ok_and(|m| m.is_file() && m.len() == bytes.len() as u64)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "ultra-default-model-test-{tag}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn materializes_once_and_repairs() {
        let base = scratch("repair");
        let p = materialize_in(&base).unwrap();
        for (dir, name, bytes) in files() {
            assert_eq!(std::fs::read(p.root.join(dir).join(name)).unwrap(), bytes);
        }
        assert!(p.target.join("config.json").is_file());
        assert!(p.drafter.join("model.safetensors").is_file());
        // A second call reuses the directory.
        let t0 = std::fs::metadata(p.target.join("model.safetensors"))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(materialize_in(&base).unwrap(), p);
        let t1 = std::fs::metadata(p.target.join("model.safetensors"))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(t0, t1);
        // A truncated file is noticed and the copy rewritten.
        std::fs::write(p.drafter.join("model.safetensors"), b"oops").unwrap();
        let p2 = materialize_in(&base).unwrap();
        assert_eq!(
            std::fs::metadata(p2.drafter.join("model.safetensors"))
                .unwrap()
                .len(),
            files()
                .find(|(d, n, _)| *d == "drafter" && *n == "model.safetensors")
                .unwrap()
                .2
                .len() as u64
        );
        // No temporary directories are left behind.
        let left: Vec<_> = std::fs::read_dir(&base)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(left.is_empty());
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn unwritable_base_is_an_error() {
        let base = scratch("file");
        std::fs::create_dir_all(base.parent().unwrap()).unwrap();
        std::fs::write(&base, b"a file, not a directory").unwrap();
        let e = materialize_in(&base).unwrap_err();
        assert!(matches!(e, DefaultModelError::Io { .. }), "{e}");
        std::fs::remove_file(&base).unwrap();
    }

    #[test]
    fn assets_fit_the_budget() {
        // issue #6: target + drafter at most 25 MB, the target at most 20 MB.
        assert!(total_bytes() <= 25_000_000, "{}", total_bytes());
        let target: usize = files()
            .filter(|(d, _, _)| *d == "target")
            .map(|(_, _, b)| b.len())
            .sum();
        assert!(target <= 20_000_000, "{target}");
        assert_eq!(FINGERPRINT.len(), 64);
    }
}
