//! The kernel ABI as `kernels/common/abi.cuh` declares it, read from the embedded header: its
//! limits (`#define NAME N` / `constexpr T NAME = N;`) and struct layouts (`ULTRA_ABI_SIZE` /
//! `ULTRA_ABI_FIELD` asserts, which nvcc checks on the CUDA side). The Rust mirror of the ABI
//! (tilert's `abi` module) tests its `size_of` / `offset_of!` and constants against these, so the
//! numbers exist once, in the header.

use crate::ABI_HEADER;

/// One struct of the header: its size and the offsets of its (non-padding) fields, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StructLayout {
    pub name: &'static str,
    pub size: usize,
    pub fields: Vec<(&'static str, usize)>,
}

/// Every limit of the header, in order: `#define NAME <integer>` and
/// `constexpr <type> NAME = <integer>;`.
pub fn limits() -> Vec<(&'static str, u64)> {
    limits_in(ABI_HEADER)
}

/// The limits of another ABI header written in the same style (e.g.
/// [`crate::PERSISTENT_ABI_HEADER`]).
pub fn limits_in(header: &'static str) -> Vec<(&'static str, u64)> {
    let mut v = Vec::new();
    for line in header.lines() {
        let line = line.trim();
        let (name, value) = if let Some(rest) = line.strip_prefix("#define ") {
            let mut it = rest.split_whitespace();
            match (it.next(), it.next(), it.next()) {
                (Some(n), Some(val), None) => (n, val),
                _ => continue,
            }
        } else if let Some(rest) = line.strip_prefix("constexpr ") {
            let Some((lhs, rhs)) = rest.split_once('=') else {
                continue;
            };
            let Some(n) = lhs.split_whitespace().last() else {
                continue;
            };
            (n, rhs.trim().trim_end_matches(';').trim())
        } else {
            continue;
        };
        if let Ok(x) = value.parse::<u64>() {
            v.push((name, x));
        }
    }
    v
}

/// The limit `name` of the header.
pub fn limit(name: &str) -> Option<u64> {
    limits()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, x)| x)
}

/// The arguments of `MACRO(a, b, ...);` on a line that starts with `MACRO(`.
fn macro_args<'a>(line: &'a str, mac: &str) -> Option<Vec<&'a str>> {
    let rest = line.trim().strip_prefix(mac)?.strip_prefix('(')?;
    let inner = rest.strip_suffix(");")?;
    Some(inner.split(',').map(str::trim).collect())
}

/// Every struct layout the header asserts, in order.
pub fn layouts() -> Vec<StructLayout> {
    layouts_in(ABI_HEADER, "ULTRA_ABI")
}

/// The struct layouts of another ABI header whose asserts are `{prefix}_SIZE(S, N);` and
/// `{prefix}_FIELD(S, F, N);` (e.g. [`crate::PERSISTENT_ABI_HEADER`] with `PK_ABI`).
pub fn layouts_in(header: &'static str, prefix: &str) -> Vec<StructLayout> {
    let (size_macro, field_macro) = (format!("{prefix}_SIZE"), format!("{prefix}_FIELD"));
    let mut v: Vec<StructLayout> = Vec::new();
    for line in header.lines() {
        if let Some(a) = macro_args(line, &size_macro) {
            if let [name, size] = a[..] {
                if let Ok(size) = size.parse() {
                    v.push(StructLayout {
                        name,
                        size,
                        fields: Vec::new(),
                    });
                }
            }
        } else if let Some(a) = macro_args(line, &field_macro) {
            if let [name, field, off] = a[..] {
                if let (Some(s), Ok(off)) = (v.iter_mut().find(|s| s.name == name), off.parse()) {
                    s.fields.push((field, off));
                }
            }
        }
    }
    v
}

/// The layout of struct `name` as the header asserts it.
pub fn layout(name: &str) -> Option<StructLayout> {
    layouts().into_iter().find(|s| s.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_declares_the_limits_and_structs() {
        assert_eq!(limit("MAX_TOKENS"), Some(16));
        assert_eq!(limit("MOE_MAX_WARPS"), Some(16));
        assert_eq!(limit("NO_SUCH_LIMIT"), None);
        let names: Vec<_> = layouts().into_iter().map(|s| s.name).collect();
        assert_eq!(
            names,
            [
                "RopeOut",
                "KvRow",
                "RopeOutRows",
                "RouteSpec",
                "MoeParams",
                "SampleRow",
                "AcceptRow"
            ]
        );
        let rope = layout("RopeOut").unwrap();
        assert_eq!(rope.size, 88);
        assert_eq!(rope.fields.first(), Some(&("step", 0)));
        assert_eq!(rope.fields.len(), 15);
        // Every struct lists at least one field, and offsets ascend inside the size.
        for s in layouts() {
            assert!(!s.fields.is_empty(), "{}", s.name);
            assert!(s.fields.windows(2).all(|w| w[0].1 < w[1].1), "{}", s.name);
            assert!(s.fields.last().unwrap().1 < s.size, "{}", s.name);
        }
    }

    /// The header's asserts hold for the host C++ compiler too: the ABI that Rust's `#[repr(C)]`
    /// follows (and that CUDA's device ABI matches for these types). Needs `c++` (or `$CXX`).
    #[test]
    fn header_asserts_hold_on_the_host_compiler() {
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let dir = std::env::temp_dir().join(format!("ultra-abi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("abi_check.cpp");
        std::fs::write(&src, format!("{ABI_HEADER}\nint main() {{ return 0; }}\n")).unwrap();
        let out = std::process::Command::new(&cxx)
            .args([
                "-std=c++17",
                "-fsyntax-only",
                "-Wno-pragma-once-outside-header",
            ])
            .arg(&src)
            .output();
        let _ = std::fs::remove_dir_all(&dir);
        match out {
            Err(e) => {
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "SKIPPED header_asserts_hold_on_the_host_compiler: no host C++ compiler `{cxx}` ({e}); \
                     nvcc checks the same asserts in `cargo xtask kernels`"
                );
            }
            Ok(o) => assert!(
                o.status.success(),
                "{cxx} rejects kernels/common/abi.cuh:\n{}",
                String::from_utf8_lossy(&o.stderr)
            ),
        }
    }
}
