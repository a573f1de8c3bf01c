//! GPU tests of the paged KV cache (`tilert::ops::KvPaging`, `kernels/common/kv.cuh`): a cache
//! whose slots live in a pool of fixed-size blocks, read and written through a block table, must
//! give **bit-identical** results to the same keys and values in a contiguous cache — in decode
//! (one query), verify (causal blocks of queries), a drafter's bidirectional block, batched rows
//! (`ops::rows`, each row its own table) and in the KV writes (`rope_kv_write`,
//! `linear_qkv_rope`, and their row variants).
//!
//! The block tables are random: distinct pool blocks in shuffled order (never the identity),
//! pools with blocks no table names, odd block sizes, sequences whose last block is partial.
//! Every pool slot a correct kernel never reads holds NaN, so a misaddressed read shows up in the
//! output; after a write, the pool read back through the table must equal the contiguous cache
//! and every other pool slot must still be NaN.
//!
//! Skipped without a GPU (fails with `ULTRA_REQUIRE_GPU=1`). The seed of each test is printed;
//! set `ULTRA_TEST_SEED` to replay one.

use std::sync::Arc;

use cudarc::driver::CudaStream;
use half::bf16;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use tilert::arena::{dtoh, Arena, DPtr};
use tilert::ops::rows::{decode_splits, KvRow, RowOps, KV_ROW_WORDS};
use tilert::ops::{check_block_ids, AttnArgs, KvPaging, Ops};
use tilert::tensor::DeviceMatrix;

struct Gpu {
    stream: Arc<CudaStream>,
    arena: Arena,
    ops: Ops,
}

fn gpu(test: &str) -> Option<(Gpu, ChaCha20Rng)> {
    let ctx = ultra_kernels::gpu_for_test(test)?;
    let stream = ctx.default_stream();
    let ops = Ops::load(&ctx).expect("load ops kernels");
    let seed = ultra_kernels::test_seed(test);
    Some((
        Gpu {
            arena: Arena::new(stream.clone()),
            stream,
            ops,
        },
        ChaCha20Rng::seed_from_u64(seed),
    ))
}

impl Gpu {
    fn up<T: cudarc::driver::DeviceRepr>(&mut self, v: &[T]) -> DPtr<T> {
        self.arena.upload(v, "test input").unwrap()
    }
    fn zeros<T: cudarc::driver::DeviceRepr>(&mut self, n: usize) -> DPtr<T> {
        self.arena.alloc(n, "test output").unwrap()
    }
    fn down<T: cudarc::driver::DeviceRepr + Default + Clone>(&self, p: DPtr<T>) -> Vec<T> {
        dtoh(&self.stream, p).unwrap()
    }
    fn bits(&self, p: DPtr<f32>) -> Vec<u32> {
        self.down(p).iter().map(|x| x.to_bits()).collect()
    }
}

fn uniform(rng: &mut ChaCha20Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[derive(Debug, Clone, Copy)]
struct Geo {
    nh: usize,
    nkv: usize,
    d: usize,
    dv: usize,
    rot: usize,
    capacity: usize,
    window: Option<usize>,
    sinks: bool,
    qk_norm: bool,
    value_scale: f32,
    /// Positions per block of the paged copy (divides `capacity`).
    block_size: usize,
}

impl Geo {
    fn k_row(&self) -> usize {
        self.nkv * self.d
    }
    fn v_row(&self) -> usize {
        self.nkv * self.dv
    }
}

/// gpt-oss-20b full-attention layer (vectorised loads, sinks), blocks of 16.
const GPT_OSS_FULL: Geo = Geo {
    nh: 64,
    nkv: 8,
    d: 64,
    dv: 64,
    rot: 64,
    capacity: 2048,
    window: None,
    sinks: true,
    qk_norm: false,
    value_scale: 1.0,
    block_size: 16,
};

/// gpt-oss-20b sliding layer: a ring of 128 slots in 8 blocks of 16, wrapped many times.
const GPT_OSS_SLIDING: Geo = Geo {
    capacity: 128,
    window: Some(128),
    ..GPT_OSS_FULL
};

/// MiMo-like (d 192, dv 128, partial RoPE, value scale), blocks of 32.
const MIMO: Geo = Geo {
    nh: 16,
    nkv: 4,
    d: 192,
    dv: 128,
    rot: 64,
    capacity: 512,
    window: None,
    sinks: true,
    qk_norm: false,
    value_scale: 0.707,
    block_size: 32,
};

/// Tiny, scalar loads (d, dv not multiples of 4), q/k norm, a window, blocks of 5.
const TINY: Geo = Geo {
    nh: 4,
    nkv: 2,
    d: 6,
    dv: 6,
    rot: 4,
    capacity: 40,
    window: Some(7),
    sinks: false,
    qk_norm: true,
    value_scale: 1.0,
    block_size: 5,
};

/// One layer's contiguous cache and the same cache paged: `ids[j]` is the pool block of logical
/// block j (distinct, shuffled, drawn from a pool with `spare` blocks no table names).
struct Cache {
    contiguous: AttnArgs,
    paged: AttnArgs,
    ids: Vec<u32>,
    pool_blocks: usize,
}

/// A random table of `n` distinct blocks of a pool of `n + spare`, never the identity.
fn random_table(rng: &mut ChaCha20Rng, n: usize, spare: usize) -> Vec<u32> {
    let mut all: Vec<u32> = (0..(n + spare) as u32).collect();
    loop {
        all.shuffle(rng);
        let ids = all[..n].to_vec();
        if n < 2 || ids.iter().enumerate().any(|(j, &b)| b as usize != j) {
            return ids;
        }
    }
}

/// The pool holding `cache` (`capacity` rows of `width`) through `ids`: logical slot i at pool row
/// `ids[i / bs]·bs + i % bs`. Rows whose slot `keep` rejects, and every row of a block no table
/// names, are NaN.
fn scatter(
    cache: &[f32],
    width: usize,
    ids: &[u32],
    bs: usize,
    pool_blocks: usize,
    keep: &dyn Fn(usize) -> bool,
) -> Vec<f32> {
    let mut pool = vec![f32::NAN; pool_blocks * bs * width];
    for i in 0..ids.len() * bs {
        if keep(i) {
            let row = ids[i / bs] as usize * bs + i % bs;
            pool[row * width..(row + 1) * width]
                .copy_from_slice(&cache[i * width..(i + 1) * width]);
        }
    }
    pool
}

/// `pool` read back through `ids` (the contiguous layout), and whether every row of the pool's
/// other blocks is still NaN.
fn gather(pool: &[f32], width: usize, ids: &[u32], bs: usize) -> (Vec<f32>, bool) {
    let mut out = vec![0.0; ids.len() * bs * width];
    for i in 0..ids.len() * bs {
        let row = ids[i / bs] as usize * bs + i % bs;
        out[i * width..(i + 1) * width].copy_from_slice(&pool[row * width..(row + 1) * width]);
    }
    let blocks = pool.len() / (bs * width);
    let untouched = (0..blocks as u32).filter(|b| !ids.contains(b)).all(|b| {
        let at = b as usize * bs * width;
        pool[at..at + bs * width].iter().all(|x| x.is_nan())
    });
    (out, untouched)
}

/// A layer of `geo` (random RoPE tables, norms, sinks) with a random cache, contiguous and paged
/// (slots `keep` rejects are NaN in the pool only).
fn cache(g: &mut Gpu, rng: &mut ChaCha20Rng, geo: Geo, keep: &dyn Fn(usize) -> bool) -> Cache {
    let half = geo.rot / 2;
    let inv_freq: Vec<f32> = (0..half.max(1))
        .map(|i| 1.0 / 150_000f64.powf(2.0 * i as f64 / geo.rot.max(1) as f64) as f32)
        .collect();
    let q_norm: Vec<f32> = (0..geo.d).map(|_| rng.random_range(0.5..1.5)).collect();
    let k_norm: Vec<f32> = (0..geo.d).map(|_| rng.random_range(0.5..1.5)).collect();
    let sinks = uniform(rng, geo.nh, 2.0);
    let k = uniform(rng, geo.capacity * geo.k_row(), 1.0);
    let v = uniform(rng, geo.capacity * geo.v_row(), 1.0);
    let contiguous = AttnArgs {
        n_heads: geo.nh,
        n_kv_heads: geo.nkv,
        head_dim: geo.d,
        v_head_dim: geo.dv,
        rotary_dim: geo.rot,
        inv_freq: g.up(&inv_freq),
        attention_factor: 1.0,
        q_norm: geo.qk_norm.then(|| g.up(&q_norm)),
        k_norm: geo.qk_norm.then(|| g.up(&k_norm)),
        eps: 1e-6,
        value_scale: geo.value_scale,
        k_cache: g.up(&k),
        v_cache: g.up(&v),
        capacity: geo.capacity,
        paging: None,
        window: geo.window,
        sinks: geo.sinks.then(|| g.up(&sinks)),
        scale: (1.0 / (geo.d as f64).sqrt()) as f32,
    };
    let bs = geo.block_size;
    assert_eq!(geo.capacity % bs, 0, "{geo:?}");
    let n = geo.capacity / bs;
    let spare = 3 + n / 4;
    let ids = random_table(rng, n, spare);
    let pool_blocks = n + spare;
    check_block_ids("test", &ids, pool_blocks).unwrap();
    let pk = scatter(&k, geo.k_row(), &ids, bs, pool_blocks, keep);
    let pv = scatter(&v, geo.v_row(), &ids, bs, pool_blocks, keep);
    let paged = AttnArgs {
        k_cache: g.up(&pk),
        v_cache: g.up(&pv),
        paging: Some(KvPaging {
            blocks: g.up(&ids),
            block_size: bs,
            pool_blocks,
        }),
        ..contiguous
    };
    Cache {
        contiguous,
        paged,
        ids,
        pool_blocks,
    }
}

/// `Ops::attention` of `t` queries at `step` over the paged cache equals the contiguous cache's,
/// bit for bit. Without ring wrap, the slots past the pass's last position (the partial last
/// block's tail and every later block) are NaN in the pool.
#[allow(clippy::too_many_arguments)]
fn check_attention(
    g: &mut Gpu,
    rng: &mut ChaCha20Rng,
    geo: Geo,
    t: usize,
    step: usize,
    causal: bool,
    max_keys: usize,
) {
    let end = step + t;
    let wraps = end > geo.capacity;
    let c = cache(g, rng, geo, &|i| wraps || i < end);
    let q = uniform(rng, t * geo.nh * geo.d, 2.0);
    let dq = g.up(&q);
    let dstep = g.up(&[step as u32]);
    let what = format!("attention {geo:?} t {t} step {step} causal {causal} max_keys {max_keys}");
    let mut outs = Vec::new();
    for a in [&c.contiguous, &c.paged] {
        let scratch = g.zeros::<f32>(Ops::attention_scratch_len(a, t, max_keys));
        let out = g.zeros::<f32>(t * geo.nh * geo.dv);
        for rep in 0..2 {
            // Twice: the merge counters are back at zero for the next launch.
            g.ops
                .attention(&g.stream, a, dq, t, dstep, causal, max_keys, scratch, out)
                .unwrap();
            let o = g.bits(out);
            assert!(
                o.iter().all(|b| !f32::from_bits(*b).is_nan()),
                "{what}: NaN in the output (launch {rep}, paged {})",
                a.paging.is_some()
            );
            outs.push(o);
        }
    }
    assert_eq!(outs[0], outs[1], "{what}: contiguous launches differ");
    assert_eq!(outs[0], outs[2], "{what}: paged != contiguous");
    assert_eq!(outs[2], outs[3], "{what}: paged launches differ");
}

/// `rope_kv_write` (and, without q/k norm, `linear_qkv_rope`) of `t` tokens at `step` through the
/// table equals the contiguous write: the same q, the pool read back through the table equals the
/// contiguous cache, and the blocks no table names are untouched.
fn check_write(g: &mut Gpu, rng: &mut ChaCha20Rng, geo: Geo, t: usize, step: usize) {
    let (nh, nkv, d, dv) = (geo.nh, geo.nkv, geo.d, geo.dv);
    let roww = nh * d + nkv * d + nkv * dv;
    let qkv = uniform(rng, t * roww, 2.0);
    let cols = 64;
    let wv: Vec<f32> = uniform(rng, roww * cols, 0.5)
        .into_iter()
        .map(|x| bf16::from_f32(x).to_f32())
        .collect();
    let x = uniform(rng, t * cols, 1.0);
    let fused = !geo.qk_norm && tilert::ops::rope_pair_order(nh, nkv, d, dv, geo.rot).is_some();
    for pass in 0..1 + usize::from(fused) {
        let c = cache(g, rng, geo, &|_| true);
        let (dqkv, dstep, dx) = (g.up(&qkv), g.up(&[step as u32]), g.up(&x));
        let w = DeviceMatrix::upload(&mut g.arena, &wv, roww, cols, "qkv").unwrap();
        let bias = g.up(&uniform(rng, roww, 1.0));
        let mut qs = Vec::new();
        for a in [&c.contiguous, &c.paged] {
            let q = g.zeros::<f32>(t * nh * d);
            if pass == 0 {
                g.ops
                    .rope_kv_write(&g.stream, a, dqkv, t, dstep, q)
                    .unwrap();
            } else {
                g.ops
                    .linear_qkv_rope(&g.stream, &w, Some(bias), dx, t, a, dstep, q)
                    .unwrap();
            }
            qs.push(g.bits(q));
        }
        let op = ["rope_kv_write", "linear_qkv_rope"][pass];
        let what = format!("{op} {geo:?} t {t} step {step}");
        assert_eq!(qs[0], qs[1], "{what}: q");
        compare_pool(g, &c, geo, &what);
    }
}

/// The paged cache of `c`, read back through its table, equals its contiguous cache bit for bit,
/// and no block outside the table was written.
fn compare_pool(g: &Gpu, c: &Cache, geo: Geo, what: &str) {
    let bs = geo.block_size;
    for (name, width, cont, pool) in [
        ("k", geo.k_row(), c.contiguous.k_cache, c.paged.k_cache),
        ("v", geo.v_row(), c.contiguous.v_cache, c.paged.v_cache),
    ] {
        let pool = g.down(pool);
        assert_eq!(pool.len(), c.pool_blocks * bs * width);
        let (through, untouched) = gather(&pool, width, &c.ids, bs);
        assert_eq!(bits(&through), g.bits(cont), "{what}: {name} cache");
        assert!(
            untouched,
            "{what}: {name}: a block outside the table was written"
        );
    }
}

#[test]
fn paged_attention_matches_contiguous() {
    let Some((mut g, mut rng)) = gpu("paged_attention_matches_contiguous") else {
        return;
    };
    let g = &mut g;
    let r = &mut rng;
    // Decode: one query, first position, partial last blocks, a full last block, many splits.
    for step in [0, 1, 15, 16, 700, 2047] {
        check_attention(g, r, GPT_OSS_FULL, 1, step, true, 2048);
    }
    // Verify blocks (causal), crossing block boundaries, at several split counts.
    check_attention(g, r, GPT_OSS_FULL, 5, 14, true, 2048);
    check_attention(g, r, GPT_OSS_FULL, 16, 1000, true, 2048);
    check_attention(g, r, GPT_OSS_FULL, 8, 333, true, 512);
    // A drafter's bidirectional block.
    check_attention(g, r, GPT_OSS_FULL, 8, 77, false, 2048);
    // Sliding ring of 8 blocks, wrapped many times.
    check_attention(g, r, GPT_OSS_SLIDING, 1, 5000, true, 144);
    check_attention(g, r, GPT_OSS_SLIDING, 16, 4999, true, 144);
    check_attention(g, r, GPT_OSS_SLIDING, 3, 40, true, 144);
    // d 192 / dv 128, value scale, blocks of 32.
    check_attention(g, r, MIMO, 1, 300, true, 512);
    check_attention(g, r, MIMO, 7, 31, true, 512);
    // Scalar loads, blocks of 5, window, ring wrap inside the pass.
    check_attention(g, r, TINY, 1, 12, true, 40);
    check_attention(g, r, TINY, 16, 33, true, 40);
    check_attention(g, r, TINY, 4, 3, false, 40);
}

#[test]
fn paged_kv_write_matches_contiguous() {
    let Some((mut g, mut rng)) = gpu("paged_kv_write_matches_contiguous") else {
        return;
    };
    let g = &mut g;
    let r = &mut rng;
    check_write(g, r, GPT_OSS_FULL, 1, 0);
    check_write(g, r, GPT_OSS_FULL, 16, 1007); // crosses a block boundary
    check_write(g, r, GPT_OSS_SLIDING, 16, 5000); // ring wrap
    check_write(g, r, MIMO, 3, 100);
    check_write(g, r, TINY, 8, 37); // q/k norm, blocks of 5, wraps inside the pass
}

/// A batched pass of rows at `(pos, max_keys)`, every row over its own cache, once with
/// contiguous rows and once with paged rows (each its own random table; even rows paged, odd rows
/// contiguous in the mixed pass): attention, RoPE + KV write and the fused projection all
/// bit-identical.
fn check_rows(g: &mut Gpu, rng: &mut ChaCha20Rng, geo: Geo, rows: &[(usize, usize)]) {
    let rops = RowOps::load(&g.ops).unwrap();
    let t = rows.len();
    let (nh, nkv, d, dv) = (geo.nh, geo.nkv, geo.d, geo.dv);
    let what = format!("rows {geo:?} {rows:?}");
    // (contiguous, paged) caches per row; the pool's slots past a row's position are NaN.
    let make = |g: &mut Gpu, rng: &mut ChaCha20Rng, keep_all: bool| -> Vec<Cache> {
        rows.iter()
            .map(|&(pos, _)| {
                let wraps = pos + 1 > geo.capacity;
                cache(g, rng, geo, &|i| keep_all || wraps || i <= pos)
            })
            .collect()
    };
    // Tables: all contiguous, all paged, mixed.
    let table = |g: &mut Gpu, cs: &[Cache], mode: usize| -> (DPtr<u64>, usize) {
        let mut words = Vec::new();
        let mut max_s = 1;
        for (r, &(pos, max_keys)) in rows.iter().enumerate() {
            let paged = mode == 1 || (mode == 2 && r % 2 == 0);
            let a = if paged {
                &cs[r].paged
            } else {
                &cs[r].contiguous
            };
            let s = decode_splits(a, max_keys);
            max_s = max_s.max(s);
            let row = KvRow::paged(a, a.k_cache, a.v_cache, a.capacity, a.paging, pos, s).unwrap();
            words.extend(row.words());
        }
        assert_eq!(words.len(), t * KV_ROW_WORDS);
        (g.up(&words), max_s)
    };

    // Attention.
    let cs = make(g, rng, false);
    let q = g.up(&uniform(rng, t * nh * d, 2.0));
    let a = cs[0].contiguous;
    let mut outs = Vec::new();
    for mode in 0..3 {
        let (dt, max_s) = table(g, &cs, mode);
        let scratch = g.zeros::<f32>(RowOps::attention_scratch_len(&a, t, max_s));
        let out = g.zeros::<f32>(t * nh * dv);
        rops.attention(&g.stream, &a, q, t, dt, max_s, scratch, out)
            .unwrap();
        outs.push(g.bits(out));
    }
    assert!(
        outs[0].iter().all(|b| !f32::from_bits(*b).is_nan()),
        "{what}: NaN"
    );
    assert_eq!(outs[0], outs[1], "{what}: attention, paged rows");
    assert_eq!(outs[0], outs[2], "{what}: attention, mixed rows");

    // RoPE + KV write, then the fused projection.
    let qkv_w = nh * d + nkv * d + nkv * dv;
    let cols = 64;
    let wv: Vec<f32> = uniform(rng, qkv_w * cols, 0.5)
        .into_iter()
        .map(|x| bf16::from_f32(x).to_f32())
        .collect();
    let w = DeviceMatrix::upload(&mut g.arena, &wv, qkv_w, cols, "qkv").unwrap();
    let bias = g.up(&uniform(rng, qkv_w, 1.0));
    let x = g.up(&uniform(rng, t * cols, 1.0));
    let qkv = g.up(&uniform(rng, t * qkv_w, 1.0));
    let fused = !geo.qk_norm && tilert::ops::rope_pair_order(nh, nkv, d, dv, geo.rot).is_some();
    for pass in 0..1 + usize::from(fused) {
        let op = ["rope_kv_write_rows", "linear_qkv_rope_rows"][pass];
        let cs = make(g, rng, true);
        let mut qs = Vec::new();
        // Contiguous rows write the contiguous caches, paged rows the pools.
        for mode in [0, 1] {
            let (dt, _) = table(g, &cs, mode);
            let qb = g.zeros::<f32>(t * nh * d);
            if pass == 0 {
                rops.rope_kv_write(&g.stream, &a, qkv, t, dt, qb).unwrap();
            } else {
                rops.linear_qkv_rope(&g.stream, &w, Some(bias), x, t, &a, dt, qb)
                    .unwrap();
            }
            qs.push(g.bits(qb));
        }
        assert_eq!(qs[0], qs[1], "{what}: {op} q");
        for (r, c) in cs.iter().enumerate() {
            compare_pool(g, c, geo, &format!("{what}: {op} row {r}"));
        }
    }
    println!("{what}: paged rows bit-identical to contiguous rows");
}

#[test]
fn paged_rows_match_contiguous_rows() {
    let Some((mut g, mut rng)) = gpu("paged_rows_match_contiguous_rows") else {
        return;
    };
    let g = &mut g;
    let r = &mut rng;
    check_rows(
        g,
        r,
        GPT_OSS_FULL,
        &[
            (0, 2048),
            (17, 2048),
            (700, 512),
            (2047, 2048),
            (1023, 1024),
        ],
    );
    let sliding: Vec<(usize, usize)> = (0..16).map(|i| (i * 397 + 3, 144)).collect();
    check_rows(g, r, GPT_OSS_SLIDING, &sliding);
    check_rows(g, r, MIMO, &[(511, 512), (3, 512), (200, 256)]);
    check_rows(g, r, TINY, &[(39, 40), (0, 40), (57, 40)]);
}

#[test]
fn paged_kv_bad_tables_are_errors() {
    let Some((mut g, mut rng)) = gpu("paged_kv_bad_tables_are_errors") else {
        return;
    };
    let c = cache(&mut g, &mut rng, TINY, &|_| true);
    let (q, out) = (g.zeros::<f32>(1 << 10), g.zeros::<f32>(1 << 10));
    let step = g.up(&[3u32]);
    let scratch = g.zeros::<f32>(1 << 14);
    let p = c.paged.paging.unwrap();
    let run = |g: &Gpu, a: &AttnArgs| {
        g.ops
            .attention(&g.stream, a, q, 1, step, true, 40, scratch, out)
            .unwrap_err()
            .to_string()
    };
    // Capacity not a whole number of blocks.
    let bad = AttnArgs {
        paging: Some(KvPaging { block_size: 6, ..p }),
        ..c.paged
    };
    assert!(run(&g, &bad).contains("whole number of blocks"));
    // A table shorter than the capacity's blocks.
    let short = g.up(&c.ids[..c.ids.len() - 1]);
    let bad = AttnArgs {
        paging: Some(KvPaging { blocks: short, ..p }),
        ..c.paged
    };
    assert!(run(&g, &bad).contains("block table"));
    // A pool larger than its buffers.
    let bad = AttnArgs {
        paging: Some(KvPaging {
            pool_blocks: c.pool_blocks + 1,
            ..p
        }),
        ..c.paged
    };
    assert!(run(&g, &bad).contains("k_cache"));
    // The same checks for a row of a batched pass.
    let e = KvRow::paged(
        &c.paged,
        c.paged.k_cache,
        c.paged.v_cache,
        c.paged.capacity,
        Some(KvPaging { block_size: 0, ..p }),
        3,
        1,
    )
    .unwrap_err();
    assert!(e.to_string().contains("whole number of blocks"), "{e}");
    // Entries past the pool.
    let e = check_block_ids("table", &[0, 9, 2], 9).unwrap_err();
    assert!(e.to_string().contains("entry 1 is block 9"), "{e}");
}
