//! The Rust mirror of `kernels/common/comm_abi.cuh`: the argument struct of the one-shot
//! all-reduce kernels, the limits and the flag-table layout. The header is the definition; the
//! tests below read it (embedded as [`COMM_ABI_HEADER`]) and check every limit and every
//! asserted size and field offset against this module.

/// `kernels/common/comm_abi.cuh`, embedded.
pub const COMM_ABI_HEADER: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../kernels/common/comm_abi.cuh"
));

/// Most ranks of one symmetric group.
pub const COMM_MAX_RANKS: u32 = 8;
/// Most blocks of one all-reduce launch (block slots, each with one flag per rank).
pub const COMM_MAX_BLOCKS: u32 = 128;
/// Most threads of one all-reduce block (the kernels' launch bound).
pub const COMM_MAX_THREADS: u32 = 512;
/// Threads of a block of the flat (no norm) all-reduce.
pub const COMM_FLAT_THREADS: u32 = 256;
/// Flag table word of the epoch of the last all-reduce the rank's kernels completed.
pub const COMM_EPOCH_WORD: u32 = 0;
/// Flag table word counting the finished blocks of the running all-reduce kernel.
pub const COMM_ARRIVE_WORD: u32 = 1;
/// Flag table word where rank q publishes block b's epoch: `COMM_FLAG_WORD + b·MAX_RANKS + q`.
pub const COMM_FLAG_WORD: u32 = 128;
/// Flag table word of the rank's status (0 or the first error).
pub const COMM_STATUS_WORD: u32 = 1152;
/// Flag table word of the epoch (call number since creation or reset) of the status's
/// all-reduce.
pub const COMM_STATUS_CALL_WORD: u32 = 1153;
/// u32 words of one rank's flag table.
pub const COMM_FLAG_WORDS: u32 = 1160;
/// Status bit: a wait for a peer timed out (`| block << 8 | peer`).
pub const COMM_STATUS_TIMEOUT: u32 = 2147483648;
/// `out = Σ` in the input's dtype.
pub const COMM_MODE_OUT: u32 = 0;
/// `x += Σ` (f32 residual).
pub const COMM_MODE_RESIDUAL: u32 = 1;
/// `x += Σ; h = rmsnorm(x)·w` per row.
pub const COMM_MODE_RESIDUAL_NORM: u32 = 2;

/// One rank's side of a one-shot all-reduce (`AllReduceArgs` of the header; passed by value).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AllReduceArgs {
    /// Every rank's data region as this rank addresses it (2 slots of `slot_bytes`).
    pub bufs: [u64; COMM_MAX_RANKS as usize],
    /// Every rank's flag table.
    pub flags: [u64; COMM_MAX_RANKS as usize],
    pub input: u64,
    pub out: u64,
    pub x: u64,
    pub h: u64,
    pub w: u64,
    pub slot_bytes: u64,
    pub timeout_ns: u64,
    pub rank: u32,
    pub ranks: u32,
    pub rows: u32,
    pub width: u32,
    pub chunk: u32,
    pub mode: u32,
    pub eps: f32,
    pub pad: u32,
}

// SAFETY: plain old data with the C layout the kernel expects (checked against the header).
unsafe impl cudarc::driver::DeviceRepr for AllReduceArgs {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    /// `constexpr uint32_t NAME = N;` lines of the header.
    fn limits() -> Vec<(&'static str, u64)> {
        COMM_ABI_HEADER
            .lines()
            .filter_map(|l| {
                let code = l.split("//").next()?;
                let rest = code.trim().strip_prefix("constexpr ")?;
                let (lhs, rhs) = rest.split_once('=')?;
                let name = lhs.split_whitespace().last()?;
                let v = rhs.trim().trim_end_matches(';').trim().parse().ok()?;
                Some((name, v))
            })
            .collect()
    }

    /// `MACRO(a, b, c);` arguments of the lines starting with `MACRO(`.
    fn asserts(mac: &str) -> Vec<Vec<&'static str>> {
        COMM_ABI_HEADER
            .lines()
            .filter_map(|l| {
                let inner = l.trim().strip_prefix(mac)?.strip_prefix('(')?;
                Some(
                    inner
                        .strip_suffix(");")?
                        .split(',')
                        .map(str::trim)
                        .collect(),
                )
            })
            .collect()
    }

    #[test]
    fn limits_match_the_header() {
        let mine = [
            ("COMM_MAX_RANKS", COMM_MAX_RANKS),
            ("COMM_MAX_BLOCKS", COMM_MAX_BLOCKS),
            ("COMM_MAX_THREADS", COMM_MAX_THREADS),
            ("COMM_FLAT_THREADS", COMM_FLAT_THREADS),
            ("COMM_EPOCH_WORD", COMM_EPOCH_WORD),
            ("COMM_ARRIVE_WORD", COMM_ARRIVE_WORD),
            ("COMM_FLAG_WORD", COMM_FLAG_WORD),
            ("COMM_STATUS_WORD", COMM_STATUS_WORD),
            ("COMM_STATUS_CALL_WORD", COMM_STATUS_CALL_WORD),
            ("COMM_FLAG_WORDS", COMM_FLAG_WORDS),
            ("COMM_STATUS_TIMEOUT", COMM_STATUS_TIMEOUT),
            ("COMM_MODE_OUT", COMM_MODE_OUT),
            ("COMM_MODE_RESIDUAL", COMM_MODE_RESIDUAL),
            ("COMM_MODE_RESIDUAL_NORM", COMM_MODE_RESIDUAL_NORM),
        ];
        let header = limits();
        assert_eq!(header.len(), mine.len(), "header limits: {header:?}");
        for (name, v) in mine {
            assert_eq!(
                header.iter().find(|(n, _)| *n == name).map(|(_, x)| *x),
                Some(u64::from(v)),
                "{name}"
            );
        }
        assert_eq!(
            COMM_STATUS_WORD,
            COMM_FLAG_WORD + COMM_MAX_BLOCKS * COMM_MAX_RANKS
        );
    }

    #[test]
    fn args_layout_matches_the_header() {
        let sizes = asserts("COMM_ABI_SIZE");
        assert_eq!(sizes, vec![vec!["AllReduceArgs", "216"]]);
        assert_eq!(size_of::<AllReduceArgs>(), 216);
        let fields = asserts("COMM_ABI_FIELD");
        let rust = [
            ("bufs", offset_of!(AllReduceArgs, bufs)),
            ("flags", offset_of!(AllReduceArgs, flags)),
            ("in", offset_of!(AllReduceArgs, input)),
            ("out", offset_of!(AllReduceArgs, out)),
            ("x", offset_of!(AllReduceArgs, x)),
            ("h", offset_of!(AllReduceArgs, h)),
            ("w", offset_of!(AllReduceArgs, w)),
            ("slot_bytes", offset_of!(AllReduceArgs, slot_bytes)),
            ("timeout_ns", offset_of!(AllReduceArgs, timeout_ns)),
            ("rank", offset_of!(AllReduceArgs, rank)),
            ("ranks", offset_of!(AllReduceArgs, ranks)),
            ("rows", offset_of!(AllReduceArgs, rows)),
            ("width", offset_of!(AllReduceArgs, width)),
            ("chunk", offset_of!(AllReduceArgs, chunk)),
            ("mode", offset_of!(AllReduceArgs, mode)),
            ("eps", offset_of!(AllReduceArgs, eps)),
        ];
        assert_eq!(fields.len(), rust.len());
        for (f, (name, off)) in fields.iter().zip(rust) {
            assert_eq!(f[0], "AllReduceArgs");
            assert_eq!(f[1], name);
            assert_eq!(f[2].parse::<usize>().unwrap(), off, "{name}");
        }
    }

    /// The header's asserts hold for the host C++ compiler (Rust's `#[repr(C)]` ABI).
    #[test]
    fn header_asserts_hold_on_the_host_compiler() {
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let dir = std::env::temp_dir().join(format!("ultra-comm-abi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("comm_abi_check.cpp");
        std::fs::write(
            &src,
            format!("{COMM_ABI_HEADER}\nint main() {{ return 0; }}\n"),
        )
        .unwrap();
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
                eprintln!("SKIPPED header_asserts_hold_on_the_host_compiler: no `{cxx}` ({e})")
            }
            Ok(o) => assert!(
                o.status.success(),
                "{cxx} rejects kernels/common/comm_abi.cuh:\n{}",
                String::from_utf8_lossy(&o.stderr)
            ),
        }
    }
}
