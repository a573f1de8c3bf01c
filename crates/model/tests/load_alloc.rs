//! Host memory of loading a MiMo-layout checkpoint (`fixtures/mimo-v2/fp4` with its dense layer
//! widened to a 32768-row FP8 MLP): the FP8 `[gate; up]` of the dense MLP — `gate_proj.weight`,
//! its `weight_scale_inv`, `up_proj.weight` in the file's name order, not adjacent — is two
//! views of the mapped file, so loading allocates far less than the codes' size (a
//! concatenation allocated them all, 4 MiB here, plus one scale row per weight row). Counted by
//! this binary's global allocator: bytes live at the peak and bytes allocated in all. Measured
//! 2026-12-08: 0.30 MB live at the peak, 0.73 MB in all; the concatenating loader before it
//! (same test) 4.34 MB and 4.93 MB, and this test fails on it.

mod load_common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use load_common::{mimo_v2_fixture_tensors, patch_config, Rng, TempDir, Tensors, T};
use model::load::load;
use model::weights::{DenseDtype, Mlp};
use safetensors::Dtype;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static TOTAL: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let live = LIVE.fetch_add(n, Relaxed) + n;
    PEAK.fetch_max(live, Relaxed);
    TOTAL.fetch_add(n, Relaxed);
}

// SAFETY: every call forwards to the system allocator; the counters only observe sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, forwarded.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        // SAFETY: as above.
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            LIVE.fetch_sub(l.size(), Relaxed);
            grew(new);
        }
        q
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// A safetensors file with the tensors' data in name order (as the released MiMo files hold a
/// `gate_proj.weight_scale_inv` between `gate_proj.weight` and `up_proj.weight`;
/// `safetensors::serialize` groups by dtype first, which would put the FP8 codes together).
fn in_name_order(ts: &Tensors) -> Vec<u8> {
    let (mut header, mut at) = (String::from("{"), 0);
    for (i, (name, t)) in ts.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        let end = at + t.data.len();
        header += &format!(
            r#"{sep}"{name}":{{"dtype":"{:?}","shape":{:?},"data_offsets":[{at},{end}]}}"#,
            t.dtype, t.shape
        );
        at = end;
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    for t in ts.values() {
        out.extend_from_slice(&t.data);
    }
    out
}

#[test]
fn fp8_dense_gate_up_is_loaded_without_a_host_copy() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/mimo-v2/fp4");
    let (h, inter) = (64, 32768);
    let mut ts = mimo_v2_fixture_tensors(&root);
    let mut rng = Rng(17);
    // FP8 E4M3 codes without NaN (0x7f / 0xff), 128 x 128 block scales as F32.
    let mut fp8 = |rows: usize, cols: usize| -> (T, T) {
        let codes = (0..rows * cols)
            .map(|_| rng.next_u64() as u8 & 0xfe)
            .collect();
        let n = rows.div_ceil(128) * cols.div_ceil(128);
        let scales: Vec<u8> = (0..n)
            .flat_map(|i| (0.01 + i as f32 * 1e-4).to_le_bytes())
            .collect();
        (
            T {
                dtype: Dtype::F8_E4M3,
                shape: vec![rows, cols],
                data: codes,
            },
            T {
                dtype: Dtype::F32,
                shape: vec![rows.div_ceil(128), cols.div_ceil(128)],
                data: scales,
            },
        )
    };
    for (name, rows, cols) in [
        ("gate_proj", inter, h),
        ("up_proj", inter, h),
        ("down_proj", h, inter),
    ] {
        let (w, s) = fp8(rows, cols);
        let p = format!("model.layers.0.mlp.{name}.weight");
        assert!(ts.contains_key(&p), "the fixture's dense layer 0 has {p}");
        ts.insert(format!("{p}_scale_inv"), s);
        ts.insert(p, w);
    }
    let config = std::fs::read_to_string(root.join("config.json")).unwrap();
    let d = TempDir::new("mimo-alloc");
    let config = patch_config(&config, &format!(r#"{{"intermediate_size": {inter}}}"#));
    d.write("config.json", config);
    d.write("model.safetensors", in_name_order(&ts));
    drop(ts);

    let live0 = LIVE.load(Relaxed);
    PEAK.store(live0, Relaxed);
    let total0 = TOTAL.load(Relaxed);
    let (_, w) = load(d.path()).unwrap();
    let (peak, total) = (PEAK.load(Relaxed) - live0, TOTAL.load(Relaxed) - total0);

    let Mlp::Dense { gate_up, .. } = &w.layers[0].mlp else {
        panic!("layer 0 of mimo_v2 is dense")
    };
    let gu = &gate_up.w;
    assert_eq!(
        (gu.rows, gu.cols, gu.dtype()),
        (2 * inter, h, DenseDtype::F8E4M3)
    );
    assert_eq!(
        gu.num_segments(),
        2,
        "gate and up are not adjacent in the file"
    );
    assert!(gu.is_mapped(), "both segments are views of the mapped file");
    let codes = 2 * inter * h;
    eprintln!(
        "load of a MiMo-layout checkpoint with a {}x{h} FP8 dense gate_up ({codes} code bytes): \
         {peak} bytes live at the peak, {total} allocated in all",
        2 * inter
    );
    // A concatenation alone would have held `codes` bytes live at once.
    assert!(
        peak < codes / 4 && total < codes / 2,
        "loading allocated {total} bytes ({peak} live at once): the {codes} code bytes of \
         gate_up were copied"
    );
}
