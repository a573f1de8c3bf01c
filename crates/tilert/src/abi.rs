//! The kernel ABI on the Rust side: every `#[repr(C)]` struct passed to a kernel by value (or read
//! by kernels from a table in device memory) and every kernel limit the host checks arguments
//! against. The one definition of each number is `kernels/common/abi.cuh`; this module mirrors it
//! and its tests check the mirror against the header (sizes, field offsets and limits, read by
//! `ultra_kernels::abi`), so a change on one side that the other lacks fails `cargo test`.

use cudarc::driver::DeviceRepr;

/// Most tokens (rows) one pass handles (verify blocks are 2..=16; prefill runs in chunks of
/// this; batched decode takes this many sequences per pass).
pub const MAX_TOKENS: usize = 16;
/// Threads per block of the vectorised linear kernels (4 warps).
pub(crate) const LINEAR_THREADS: u32 = 128;
/// Largest head dim (and v head dim) the RoPE and attention kernels take.
pub(crate) const MAX_HEAD_DIM: usize = 256;
/// Keys per shared-memory tile of the attention kernel, most warps (query heads served at
/// once) per attention block, most key splits.
pub(crate) const ATT_TILE: usize = 32;
pub(crate) const ATT_MAX_WARPS: usize = 8;
pub(crate) const ATT_MAX_SPLITS: usize = 64;
/// Most experts / selected experts the routing kernels take; threads of the fused router.
pub(crate) const MAX_EXPERTS: usize = 384;
pub(crate) const MAX_TOPK: usize = 16;
pub(crate) const ROUTER_THREADS: u32 = 256;
/// Threads of the sampler (one block per row); most rows of one `sample_rows` launch.
pub(crate) const SAMPLE_THREADS: u32 = 1024;
pub const SAMPLE_MAX_ROWS: usize = 64;
/// Routed experts (`kernels/mxfp4.cu`): most (token, expert) entries per launch, bitmap words of
/// the expert table (32 experts each), most warps per CTA.
pub(crate) const MOE_MAX_IDS: usize = 256;
pub(crate) const MOE_MAX_EXPERT_WORDS: usize = 64;
pub(crate) const MOE_MAX_WARPS: usize = 16;
/// Dense projections from tiled weights (`kernels/proj.cu`): most threads per CTA, rows per
/// tile (row group), the FP8 scale block edge (rows and columns), and the threads per CTA of the
/// stream-K kernels.
pub(crate) const PROJ_MAX_THREADS: u32 = 512;
pub(crate) const PROJ_SK_THREADS: u32 = 128;
pub const PROJ_TILE_ROWS: usize = 16;
pub const FP8_BLOCK: usize = 128;
/// The bulk-copy (TMA) projection kernels (`proj_bulk_*`): threads per CTA, 512-byte tiles per
/// shared-memory stage, most stages per CTA.
pub(crate) const PROJ_BULK_THREADS: u32 = 256;
pub(crate) const PROJ_BULK_STAGE_TILES: usize = 32;
pub(crate) const PROJ_BULK_MAX_STAGES: usize = 16;

// A full pass of routed entries fits the expert kernels' entry table.
const _: () = assert!(MOE_MAX_IDS >= MAX_TOKENS * crate::moe::MAX_TOP_K);

/// `struct RopeOut`: where the fused QKV projection's rows go (q rows, k / v cache, through the
/// cache's block table when `blocks` is not null), passed by value to `linear_qkv_rope_*`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct RopeOut {
    pub step: u64,
    pub inv_freq: u64,
    pub q_out: u64,
    pub k_cache: u64,
    pub v_cache: u64,
    pub nh: u32,
    pub nkv: u32,
    pub d: u32,
    pub dv: u32,
    pub rot: u32,
    pub capacity: u32,
    pub attn_factor: f32,
    pub value_scale: f32,
    pub blocks: u64,
    pub block_size: u32,
    pub _pad: u32,
}

/// `struct RouteSpec`: the routing parameters of one MoE layer, passed by value to `route` and
/// `router_route_*`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct RouteSpec {
    pub n_exp: u32,
    pub k: u32,
    pub kind: u32,
    pub norm_topk: u32,
    pub corr_bias: u64,
    pub n_group: u32,
    pub topk_group: u32,
    pub scaling: f32,
    pub _pad: u32,
}

/// `struct KvRow`: one row of a batched decode pass's row table in device memory (that row's
/// cache of the layer — contiguous, or a block pool read through the block table `blocks` —, the
/// position of its token, its key splits).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct KvRow {
    pub k_cache: u64,
    pub v_cache: u64,
    pub capacity: u32,
    pub pos: u32,
    pub splits: u32,
    pub block_size: u32,
    pub blocks: u64,
}

/// `u64` words of one [`KvRow`].
pub(crate) const KV_ROW_WORDS: usize = std::mem::size_of::<KvRow>() / 8;

impl KvRow {
    /// The row's bytes as the kernels read them, as `u64` words (the device is little-endian, as
    /// every host Ultra builds for).
    pub fn words(&self) -> [u64; KV_ROW_WORDS] {
        // SAFETY: KvRow is #[repr(C)] plain old data of exactly KV_ROW_WORDS · 8 bytes with no
        // implicit padding (every byte belongs to a field), so every bit pattern is a valid
        // [u64; KV_ROW_WORDS]; transmute checks the sizes at compile time.
        unsafe { std::mem::transmute::<KvRow, [u64; KV_ROW_WORDS]>(*self) }
    }
}

/// `struct RopeOutRows`: [`RopeOut`] for a batched pass, each row's cache and position from a
/// [`KvRow`] table, passed by value to `linear_qkv_rope_rows_*`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct RopeOutRows {
    pub ro: RopeOut,
    pub rows: u64,
}

/// `struct SampleRow`: one row of a batched sampling launch (`sample_rows`), read from a table
/// in device memory: the row's logits, the request's token history (for the penalties), its
/// sampling parameters with "off" as the neutral value, and the position of its uniform in its
/// seeded stream (`model::sampling::UniformStream`). Built by `crate::sample::RowSample`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct SampleRow {
    pub logits: u64,
    pub history: u64,
    pub prompt_len: u32,
    pub generated_len: u32,
    pub greedy: u32,
    pub top_k: u32,
    pub temperature: f32,
    pub top_p: f32,
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub key: [u32; 8],
    pub word_pos: u64,
}

/// `u32` words of one [`SampleRow`].
pub(crate) const SAMPLE_ROW_WORDS: usize = std::mem::size_of::<SampleRow>() / 4;

impl SampleRow {
    /// The row's bytes as the kernel reads them, as `u32` words (little-endian device and host).
    pub fn words(&self) -> [u32; SAMPLE_ROW_WORDS] {
        // SAFETY: SampleRow is #[repr(C)] plain old data of exactly SAMPLE_ROW_WORDS · 4 bytes
        // with no implicit padding (the u64 at offset 88 is 8-aligned after 22 words), so every
        // bit pattern is a valid [u32; 24]; transmute checks the sizes at compile time.
        unsafe { std::mem::transmute::<SampleRow, [u32; SAMPLE_ROW_WORDS]>(*self) }
    }
}

/// `struct AcceptRow`: one verify block of a batched exact-acceptance launch (`accept_rows`):
/// the block's [`SampleRow`] (its `logits` the `n + 1` target rows, its history the prompt, the
/// generated ids and then the drafts), the drafter's `n` rows and the `n` drafts. Built by
/// `crate::sample::DeviceSampler::accept`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct AcceptRow {
    pub s: SampleRow,
    pub draft_logits: u64,
    pub drafts: u64,
    pub n: u32,
    pub _pad: u32,
}

/// `u32` words of one [`AcceptRow`].
pub(crate) const ACCEPT_ROW_WORDS: usize = std::mem::size_of::<AcceptRow>() / 4;

impl AcceptRow {
    /// The block's bytes as the kernel reads them, as `u32` words.
    pub fn words(&self) -> [u32; ACCEPT_ROW_WORDS] {
        // SAFETY: AcceptRow is #[repr(C)] plain old data of exactly ACCEPT_ROW_WORDS · 4 bytes
        // with no implicit padding (SampleRow is 96 bytes, then two u64 and two u32), so every
        // bit pattern is a valid [u32; 30]; transmute checks the sizes at compile time.
        unsafe { std::mem::transmute::<AcceptRow, [u32; ACCEPT_ROW_WORDS]>(*self) }
    }
}

/// `struct MoeParams`: the routed-expert kernels' parameter block (`kernels/mxfp4.cu`), passed by
/// value.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct MoeParams {
    pub w: u64,
    pub scales: u64,
    pub ids: u64,
    pub x: u64,
    pub bias: u64,
    pub route_w: u64,
    pub out: u64,
    pub n_experts: u32,
    pub rows: u32,
    pub k: u32,
    pub n_ids: u32,
    pub x_div: u32,
    pub row_groups: u32,
    pub glu: u32,
    pub pad: u32,
    pub alpha: f32,
    pub limit: f32,
}

// SAFETY: plain old data laid out as the C struct the kernels take by value.
unsafe impl DeviceRepr for MoeParams {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};
    use ultra_kernels::abi::{layout, layouts, limit, StructLayout};

    /// The Rust layout of `$t` over its ABI fields (padding fields left out, as in the header).
    macro_rules! rust_layout {
        ($name:literal, $t:ty { $($f:ident),* $(,)? }) => {
            StructLayout {
                name: $name,
                size: size_of::<$t>(),
                fields: vec![$((stringify!($f), offset_of!($t, $f))),*],
            }
        };
    }

    #[test]
    fn structs_match_the_header() {
        let rust = [
            rust_layout!(
                "RopeOut",
                RopeOut {
                    step,
                    inv_freq,
                    q_out,
                    k_cache,
                    v_cache,
                    nh,
                    nkv,
                    d,
                    dv,
                    rot,
                    capacity,
                    attn_factor,
                    value_scale,
                    blocks,
                    block_size,
                }
            ),
            rust_layout!(
                "KvRow",
                KvRow {
                    k_cache,
                    v_cache,
                    capacity,
                    pos,
                    splits,
                    block_size,
                    blocks
                }
            ),
            rust_layout!("RopeOutRows", RopeOutRows { ro, rows }),
            rust_layout!(
                "SampleRow",
                SampleRow {
                    logits,
                    history,
                    prompt_len,
                    generated_len,
                    greedy,
                    top_k,
                    temperature,
                    top_p,
                    min_p,
                    repetition_penalty,
                    presence_penalty,
                    frequency_penalty,
                    key,
                    word_pos,
                }
            ),
            rust_layout!(
                "AcceptRow",
                AcceptRow {
                    s,
                    draft_logits,
                    drafts,
                    n,
                }
            ),
            rust_layout!(
                "RouteSpec",
                RouteSpec {
                    n_exp,
                    k,
                    kind,
                    norm_topk,
                    corr_bias,
                    n_group,
                    topk_group,
                    scaling,
                }
            ),
            rust_layout!(
                "MoeParams",
                MoeParams {
                    w,
                    scales,
                    ids,
                    x,
                    bias,
                    route_w,
                    out,
                    n_experts,
                    rows,
                    k,
                    n_ids,
                    x_div,
                    row_groups,
                    glu,
                    alpha,
                    limit,
                }
            ),
        ];
        for r in &rust {
            let c = layout(r.name)
                .unwrap_or_else(|| panic!("kernels/common/abi.cuh declares no struct {}", r.name));
            assert_eq!(&c, r, "layout of {} (left: abi.cuh, right: Rust)", r.name);
        }
        // Every struct of the header has its Rust mirror here.
        let names: Vec<_> = rust.iter().map(|r| r.name).collect();
        for c in layouts() {
            assert!(
                names.contains(&c.name),
                "no Rust mirror of struct {}",
                c.name
            );
        }
    }

    #[test]
    fn limits_match_the_header() {
        let rust: [(&str, u64); 21] = [
            ("MAX_TOKENS", MAX_TOKENS as u64),
            ("LINEAR_THREADS", LINEAR_THREADS.into()),
            ("MAX_HEAD_DIM", MAX_HEAD_DIM as u64),
            ("ATT_TILE", ATT_TILE as u64),
            ("ATT_MAX_WARPS", ATT_MAX_WARPS as u64),
            ("ATT_MAX_SPLITS", ATT_MAX_SPLITS as u64),
            ("MAX_EXPERTS", MAX_EXPERTS as u64),
            ("MAX_TOPK", MAX_TOPK as u64),
            ("ROUTER_THREADS", ROUTER_THREADS.into()),
            ("SAMPLE_THREADS", SAMPLE_THREADS.into()),
            ("SAMPLE_MAX_ROWS", SAMPLE_MAX_ROWS as u64),
            ("MOE_MAX_IDS", MOE_MAX_IDS as u64),
            ("MOE_MAX_EXPERT_WORDS", MOE_MAX_EXPERT_WORDS as u64),
            ("MOE_MAX_WARPS", MOE_MAX_WARPS as u64),
            ("PROJ_MAX_THREADS", PROJ_MAX_THREADS.into()),
            ("PROJ_SK_THREADS", PROJ_SK_THREADS.into()),
            ("PROJ_TILE_ROWS", PROJ_TILE_ROWS as u64),
            ("FP8_BLOCK", FP8_BLOCK as u64),
            ("PROJ_BULK_THREADS", PROJ_BULK_THREADS.into()),
            ("PROJ_BULK_STAGE_TILES", PROJ_BULK_STAGE_TILES as u64),
            ("PROJ_BULK_MAX_STAGES", PROJ_BULK_MAX_STAGES as u64),
        ];
        for (name, value) in rust {
            assert_eq!(limit(name), Some(value), "limit {name} (abi.cuh vs Rust)");
        }
        // GEMV_MAX_WARPS is mirrored (and tested) by fp4's GEMV launcher.
        for (name, _) in ultra_kernels::abi::limits() {
            assert!(
                rust.iter().any(|(n, _)| *n == name) || name == "GEMV_MAX_WARPS",
                "limit {name} of abi.cuh has no Rust mirror"
            );
        }
        assert_eq!(crate::moe::MAX_EXPERTS, MOE_MAX_EXPERT_WORDS * 32);
    }

    #[test]
    fn sample_row_words_are_its_c_layout() {
        let r = SampleRow {
            logits: 0x1111_2222_3333_4444,
            history: 0x5555_6666_7777_8888,
            prompt_len: 3,
            generated_len: 4,
            greedy: 1,
            top_k: 50,
            temperature: 0.7,
            top_p: 0.9,
            min_p: 0.05,
            repetition_penalty: 1.2,
            presence_penalty: -0.5,
            frequency_penalty: 0.25,
            key: [10, 11, 12, 13, 14, 15, 16, 17],
            word_pos: 0x0123_4567_89ab_cdef,
        };
        let w = r.words();
        let c = layout("SampleRow").unwrap();
        let off = |f: &str| c.fields.iter().find(|(n, _)| *n == f).unwrap().1 / 4;
        let u64_at = |i: usize| u64::from(w[i]) | (u64::from(w[i + 1]) << 32);
        assert_eq!(u64_at(off("logits")), r.logits);
        assert_eq!(u64_at(off("history")), r.history);
        assert_eq!(w[off("prompt_len")], 3);
        assert_eq!(w[off("generated_len")], 4);
        assert_eq!(w[off("greedy")], 1);
        assert_eq!(w[off("top_k")], 50);
        assert_eq!(f32::from_bits(w[off("temperature")]), 0.7);
        assert_eq!(f32::from_bits(w[off("top_p")]), 0.9);
        assert_eq!(f32::from_bits(w[off("min_p")]), 0.05);
        assert_eq!(f32::from_bits(w[off("repetition_penalty")]), 1.2);
        assert_eq!(f32::from_bits(w[off("presence_penalty")]), -0.5);
        assert_eq!(f32::from_bits(w[off("frequency_penalty")]), 0.25);
        assert_eq!(&w[off("key")..off("key") + 8], &r.key);
        assert_eq!(u64_at(off("word_pos")), r.word_pos);
    }

    #[test]
    fn kv_row_words_are_its_c_layout() {
        let r = KvRow {
            k_cache: 0x1111_2222_3333_4444,
            v_cache: 0x5555_6666_7777_8888,
            capacity: 0x9999_aaaa,
            pos: 0xbbbb_cccc,
            splits: 0xdddd_eeee,
            block_size: 0x0f0f_1e1e,
            blocks: 0x2233_4455_6677_8899,
        };
        let w = r.words();
        let bytes: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
        let at = |off: usize, n: usize| {
            u64::from_le_bytes({
                let mut b = [0u8; 8];
                b[..n].copy_from_slice(&bytes[off..off + n]);
                b
            })
        };
        let c = layout("KvRow").unwrap();
        let off = |f: &str| c.fields.iter().find(|(n, _)| *n == f).unwrap().1;
        assert_eq!(at(off("k_cache"), 8), r.k_cache);
        assert_eq!(at(off("v_cache"), 8), r.v_cache);
        assert_eq!(at(off("capacity"), 4), u64::from(r.capacity));
        assert_eq!(at(off("pos"), 4), u64::from(r.pos));
        assert_eq!(at(off("splits"), 4), u64::from(r.splits));
        assert_eq!(at(off("block_size"), 4), u64::from(r.block_size));
        assert_eq!(at(off("blocks"), 8), r.blocks);
    }
}
