//! Step plans (`model::plan`): op order and parameters per architecture and pass shape, cost
//! totals against `footprint`, drafter passes, the tensor-parallel transform and its CPU
//! execution (logits against the unsharded model on every fixture), the split MoE ops against
//! `ffn::moe_block`, and the executor trait over a CPU session.
//!
//! Tensor-parallel tolerance: a sharded pass changes only the association of f32 sums (each
//! all-reduce adds per-rank partial dot products of the o / down projections; every other op is
//! the same f32 sequence on the same values). One reassociated sum of n terms moves by at most
//! ~n·2⁻²⁴·Σ|terms|; through the fixtures' 3–4 layers and the LM head that is ~1e-6 relative, so
//! logits must agree within 1e-5 · max(1, max |logit|): ~25× the largest difference observed on
//! the fixtures and toys (3.9e-7 relative, N = 2 and 4; printed), and ~1000× below the
//! bf16-vs-f32 logit gap of these models (2.4e-2..4.1e-2 on logits ≤ 3.4, cpu_goldens.rs).

mod cpu_util;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cpu_util::{assert_bits, max_abs_diff, tokens, toys};
use model::config::ModelConfig;
use model::cpu::{CpuError, CpuModel};
use model::executor::{Executor, LAST_LAYER_PRE_NORM};
use model::footprint::{Footprint, StoragePlan};
use model::plan::draft::{DraftLayer, DraftPass, DraftSpec};
use model::plan::tp::{split_range, Parallelism, TpLayout};
use model::plan::{
    Buf, Logits, OpKind, PassKind, PassShape, Placement, Plan, PlanError, WeightStorage,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

const FIXTURES: &[&str] = &[
    "gpt-oss/bf16",
    "gpt-oss/bf16-hub",
    "gpt-oss/mxfp4",
    "qwen3-moe/native",
    "qwen3-moe/hub",
    "qwen3-moe/sharded",
    "mimo-v2-flash/native",
    "mimo-v2-flash/hub",
];

fn load(d: &str) -> CpuModel {
    let (c, w) = model::load::load(&fixtures().join(d)).expect("fixture loads");
    CpuModel::new(Arc::new(c), Arc::new(w)).expect("fixture is valid")
}

fn storage_of(path: &Path) -> (ModelConfig, StoragePlan) {
    let file = if path.is_dir() {
        path.join("config.json")
    } else {
        path.to_path_buf()
    };
    let text = std::fs::read_to_string(&file).expect("config");
    let raw: serde_json::Value = serde_json::from_str(&text).expect("json");
    let cfg = ModelConfig::from_json_str(&text).expect("config parses");
    (cfg, StoragePlan::from_config_json(&raw))
}

fn names(p: &Plan) -> Vec<&'static str> {
    p.ops.iter().map(|o| o.kind.name()).collect()
}

#[test]
fn decode_weight_bytes_equal_the_footprint() {
    let mut paths: Vec<PathBuf> = FIXTURES.iter().map(|d| fixtures().join(d)).collect();
    paths.push(fixtures().join("configs/gpt-oss-20b.json"));
    for p in paths {
        let (cfg, sp) = storage_of(&p);
        let fp = Footprint::new(&cfg, sp);
        let plan = Plan::new(&cfg, WeightStorage::from_plan(sp), PassShape::decode(100)).unwrap();
        let t = plan.totals();
        let rel = (t.weight_bytes - fp.bytes_per_token).abs() / fp.bytes_per_token;
        assert!(
            rel < 1e-12,
            "{}: plan {} vs footprint {}",
            p.display(),
            t.weight_bytes,
            fp.bytes_per_token
        );
        // FLOPs of a decode: ~2 per active matrix parameter (one row) + attention.
        let active = fp.active_params as f64;
        assert!(
            t.flops > 1.9 * active && t.flops < 3.0 * active + 1e9,
            "{}: {} FLOPs for {active} active parameters",
            p.display(),
            t.flops
        );
        let kv = Footprint::kv_bytes(&cfg, sp, 101);
        assert!(
            (t.kv_bytes - kv).abs() / kv < 1e-12,
            "{}: KV read at context 100 {} vs KV of 101 positions {}",
            p.display(),
            t.kv_bytes,
            kv
        );
    }
}

#[test]
fn gpt_oss_20b_decode_plan() {
    let (cfg, sp) = storage_of(&fixtures().join("configs/gpt-oss-20b.json"));
    let plan = Plan::new(&cfg, WeightStorage::from_plan(sp), PassShape::decode(0)).unwrap();
    let n = names(&plan);
    let layer = [
        "qkv_rope_kv",
        "attention",
        "o_proj",
        "norm_router_topk",
        "experts_gate_up",
        "experts_down",
    ];
    assert_eq!(n[..2], ["embed", "rms_norm"]);
    assert_eq!(n.len(), 2 + 24 * layer.len() + 1);
    for l in 0..24 {
        assert_eq!(n[2 + l * 6..2 + (l + 1) * 6], layer, "layer {l}");
    }
    assert_eq!(n.last(), Some(&"lm_head"));
    // gpt-oss alternates sliding (128) and full attention, sinks everywhere, one YaRN table.
    assert_eq!(plan.ropes.len(), 1);
    let attn: Vec<_> = plan
        .ops
        .iter()
        .filter_map(|o| match o.kind {
            OpKind::Attention(p) => Some(p),
            _ => None,
        })
        .collect();
    assert_eq!(attn[0].window, Some(128));
    assert_eq!(attn[1].window, None);
    assert!(attn
        .iter()
        .all(|a| a.sinks && a.geom.n_heads == 64 && a.geom.n_kv_heads == 8));
    // The experts read top-4 of 32 MXFP4 experts per token.
    let gu = plan
        .ops
        .iter()
        .find(|o| matches!(o.kind, OpKind::ExpertsGateUp(_)))
        .unwrap();
    let OpKind::ExpertsGateUp(p) = gu.kind else {
        unreachable!()
    };
    assert!(p.mxfp4 && p.top_k == 4 && p.intermediate == 2880);
    assert_eq!(
        gu.weight_bytes,
        4.0 * (2.0 * 2880.0 * 2880.0 * 17.0 / 32.0 + 2.0 * 2880.0 * 2.0)
    );
    // The plan prints every op with its bytes and FLOPs, and the totals.
    let text = plan.to_string();
    assert!(text.contains("layers.23.experts.down"), "{text}");
    assert!(text.lines().last().unwrap().starts_with("total: 147 ops"));
}

#[test]
fn pass_shapes_set_rows_logits_and_costs() {
    let m = load("qwen3-moe/native");
    let cfg = m.config();
    let st = WeightStorage::cpu(false);
    let d = Plan::new(cfg, st, PassShape::decode(10)).unwrap();
    let v = Plan::new(cfg, st, PassShape::verify(8, 10)).unwrap();
    let p = Plan::new(cfg, st, PassShape::prefill(16, 0, false)).unwrap();
    let b = Plan::new(cfg, st, PassShape::batched(16, 10).with_sample()).unwrap();
    assert!(!names(&p).contains(&"lm_head"));
    assert_eq!(names(&d)[..names(&d).len() - 1], names(&p)[..]);
    assert_eq!(names(&b).last(), Some(&"sample"));
    // Same layer ops; costs scale with rows (attention with the keys each row sees).
    assert_eq!(v.ops.len(), d.ops.len());
    assert!(v.totals().flops > 7.0 * d.totals().flops);
    // 8 rows of 2 of 8 experts read all 8 experts at most; a decode reads 2.
    let gu = |p: &Plan| {
        p.ops
            .iter()
            .find(|o| matches!(o.kind, OpKind::ExpertsGateUp(_)))
            .unwrap()
            .weight_bytes
    };
    assert_eq!(
        gu(&v),
        gu(&d) * (cfg.n_experts.min(8 * cfg.top_k) / cfg.top_k) as f64
    );
    // A batch of 16 sequences reads 16 caches; a verify block one.
    let kv = |p: &Plan| p.totals().kv_bytes;
    assert!(
        kv(&b) > 15.0 * kv(&d)
            && kv(&v) < 1.1 * kv(&Plan::new(cfg, st, PassShape::decode(17)).unwrap())
    );
    assert!(Plan::new(cfg, st, PassShape::verify(0, 0)).is_err());
    assert_eq!(PassShape::batched(4, 0).kind, PassKind::Batched);
}

#[test]
fn mimo_plan_has_two_rope_tables_and_a_dense_first_layer() {
    let m = load("mimo-v2-flash/native");
    let plan = m.plan(Logits::All);
    assert_eq!(
        plan.ropes.len(),
        2,
        "full and sliding layers use different RoPE"
    );
    let l0: Vec<_> = plan
        .ops
        .iter()
        .filter(|o| o.layer == Some(0))
        .map(|o| o.kind.name())
        .collect();
    assert_eq!(
        l0,
        [
            "rms_norm",
            "qkv_rope_kv",
            "attention",
            "o_proj",
            "rms_norm",
            "mlp_gate_up",
            "mlp_down"
        ]
    );
    let router = plan
        .ops
        .iter()
        .find_map(|o| match o.kind {
            OpKind::NormRouterTopK(p) => Some(p),
            _ => None,
        })
        .unwrap();
    assert!(router.correction_bias && !router.bias);
    assert_eq!(router.kind, m.config().router);
    let qkv: Vec<_> = plan
        .ops
        .iter()
        .filter_map(|o| match o.kind {
            OpKind::QkvRope(p) => Some(p),
            _ => None,
        })
        .collect();
    assert!(qkv.iter().all(|q| q.value_scale == m.config().value_scale));
    for (l, q) in qkv.iter().enumerate() {
        assert_eq!(q.rope, plan.layers[l].rope);
        assert_eq!(q.geom.n_kv_heads, m.config().layers[l].n_kv_heads);
    }
    // The taps: embeddings after embed, layer outputs on x, the final norm on h.
    let nl = m.config().layers.len();
    assert_eq!(plan.taps[0].hidden, 0);
    assert_eq!(plan.taps_of(nl).next().unwrap().buf, Buf::H);
    assert_eq!(
        plan.taps_of(LAST_LAYER_PRE_NORM).next().unwrap().buf,
        Buf::X
    );
}

fn draft_spec() -> DraftSpec {
    let (cfg, _) = storage_of(&fixtures().join("qwen3-moe/native"));
    DraftSpec {
        hidden: cfg.hidden_size,
        intermediate: 128,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 32,
        eps: 1e-6,
        rope: cfg.layers[0].rope,
        bias: false,
        qk_norm: true,
        sinks: false,
        value_scale: 1.0,
        input_embedding_scale: 1.0,
        activation: cfg.activation,
        layers: vec![
            DraftLayer {
                window: None,
                causal: false,
            };
            2
        ],
        features: 3 * cfg.hidden_size,
        vocab: cfg.vocab_size,
    }
}

#[test]
fn drafter_context_and_block_plans() {
    let spec = draft_spec();
    let st = WeightStorage::cpu(false);
    let ctx = Plan::draft(&spec, st, DraftPass::Context { n: 5 }, 10).unwrap();
    assert_eq!(names(&ctx), ["draft_context", "qkv_rope_kv", "qkv_rope_kv"]);
    assert!(ctx.ops[1..]
        .iter()
        .all(|o| matches!(o.kind, OpKind::QkvRope(p) if p.kv_only)
            && !o.outputs.contains(&Buf::Q(0))));
    let blk = Plan::draft(&spec, st, DraftPass::Block { b: 8 }, 10).unwrap();
    let n = names(&blk);
    assert_eq!(n[..2], ["embed", "rms_norm"]);
    assert_eq!(n[n.len() - 2..], ["lm_head", "sample"]);
    assert_eq!(n.iter().filter(|&&x| x == "draft_attention").count(), 2);
    let head = blk.ops.iter().find(|o| o.kind.name() == "lm_head").unwrap();
    let OpKind::LmHead(p) = head.kind else {
        unreachable!()
    };
    assert_eq!(
        p.skip_rows, 1,
        "the block's first row is the last committed token"
    );
    assert_eq!(head.flops, 2.0 * 7.0 * (spec.vocab * spec.hidden) as f64);
    assert!(Plan::draft(&spec, st, DraftPass::Block { b: 1 }, 0).is_err());
}

#[test]
fn split_ranges() {
    assert_eq!(split_range(96, 4, 1), vec![0..24, 24..48, 48..72, 72..96]);
    assert_eq!(split_range(64, 2, 32), vec![0..32, 32..64]);
    // Two MXFP4 blocks over four ranks: whole blocks, two ranks hold none.
    assert_eq!(split_range(64, 4, 32), vec![0..0, 0..32, 32..32, 32..64]);
    assert_eq!(
        split_range(2880, 4, 32),
        vec![0..704, 704..1440, 1440..2144, 2144..2880]
    );
}

#[test]
fn tensor_parallel_plan_structure() {
    let m = load("mimo-v2-flash/native");
    let tp = m.tensor_parallel(2).unwrap();
    let plan = tp.plan(Logits::Last);
    assert_eq!(plan.ranks, 2);
    // Full layers have one KV head: replicated on both ranks, each with 2 of the 4 query heads.
    let layout = tp.tp_layout().unwrap();
    let full = m
        .config()
        .layers
        .iter()
        .position(|l| l.n_kv_heads == 1)
        .unwrap();
    assert_eq!(layout.layers[full].kv_heads, vec![0..1, 0..1]);
    assert_eq!(layout.layers[full].heads, vec![0..2, 2..4]);
    // Per layer: 2 ranks × (qkv, attention, o_proj), an all-reduce, the FFN per rank and an
    // all-reduce.
    let ar = plan
        .ops
        .iter()
        .filter(|o| matches!(o.kind, OpKind::AllReduce(_)))
        .count();
    assert_eq!(ar, 2 * m.config().layers.len());
    for o in &plan.ops {
        match o.kind {
            OpKind::QkvRope(_) | OpKind::Attention(_) | OpKind::OProj(_) => {
                assert!(matches!(o.placement, Placement::Rank(_)))
            }
            OpKind::NormRouterTopK(_) | OpKind::LmHead(_) | OpKind::Embed(_) => {
                assert_eq!(o.placement, Placement::Replicated)
            }
            _ => {}
        }
    }
    // Sharding moves weight bytes between ops but reads each weight once, except the replicated
    // KV heads (k/v projections of the full layers are read by both ranks).
    let one = m.plan(Logits::Last).totals().weight_bytes;
    assert!(plan.totals().weight_bytes >= one);
    assert!(plan.to_string().contains("all_reduce"));
}

#[test]
fn tensor_parallel_refuses_head_counts_that_do_not_split() {
    let m = load("gpt-oss/bf16");
    let e = m.tensor_parallel(3).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(
            e,
            CpuError::Plan(PlanError::TensorParallel { ranks: 3, .. })
        ),
        "{msg}"
    );
    assert!(msg.contains("4 query heads and 2 KV heads"), "{msg}");
    assert!(msg.contains("possible here: 1, 2, 4"), "{msg}");
    assert!(m.tensor_parallel(8).is_err());
    assert!(m.tensor_parallel(0).is_err());
    let cfg = m.config();
    assert!(TpLayout::new(cfg, 2, false).is_ok());
}

/// Largest |Δ| of two logits sets, relative to max(1, max |logit|).
fn rel_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    let scale = a.iter().flatten().fold(1.0f32, |m, &x| m.max(x.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| max_abs_diff(x, y))
        .fold(0.0, f32::max)
        / scale
}

const TP_TOL: f32 = 1e-5;

fn check_tp(name: &str, m: &CpuModel, ranks: usize) -> f32 {
    let tp = m.tensor_parallel(ranks).unwrap();
    let v = m.config().vocab_size;
    let toks = tokens(7, 24, v);
    let want = m.session().prefill_all(&toks).unwrap();
    // Prefill through the sharded KV caches, then decode and verify through them.
    let mut s = tp.session();
    let mut got = s.prefill_all(&toks[..12]).unwrap();
    for &t in &toks[12..16] {
        got.push(s.decode(t).unwrap().to_vec());
    }
    let out = s.verify(&toks[16..], &[1, LAST_LAYER_PRE_NORM]).unwrap();
    got.extend(out.logits);
    let d = rel_diff(&want, &got);
    assert!(
        d <= TP_TOL,
        "{name} TP={ranks}: logits differ by {d} (relative)"
    );
    // Truncation works across the ranks' caches: redo the block.
    s.truncate(16).unwrap();
    let again = s.verify(&toks[16..], &[]).unwrap();
    for (a, b) in again.logits.iter().zip(&got[16..]) {
        assert_bits(a, b, "TP verify after truncate");
    }
    // Batched decode over sharded sessions is row-wise the same as decode.
    let mut a = tp.session();
    let mut b = tp.session();
    a.prefill(&toks[..5]).unwrap();
    b.prefill(&toks[..9]).unwrap();
    let (mut a1, mut b1) = (a.clone(), b.clone());
    let rows = tp.decode_batch(&mut [&mut a, &mut b], &[3, 4]).unwrap();
    assert_bits(&rows[0], a1.decode(3).unwrap(), "batched row 0");
    assert_bits(&rows[1], b1.decode(4).unwrap(), "batched row 1");
    println!("{name} TP={ranks}: max relative logit difference {d:e}");
    d
}

#[test]
fn tensor_parallel_logits_match_unsharded_on_every_fixture() {
    for d in FIXTURES {
        let m = load(d);
        check_tp(d, &m, 2);
        check_tp(d, &m, 4);
    }
}

#[test]
fn tensor_parallel_logits_match_unsharded_on_toys() {
    for (name, m) in toys() {
        check_tp(name, &m, 2);
    }
}

#[test]
fn tensor_parallel_one_rank_is_the_unsharded_model() {
    let m = load("gpt-oss/mxfp4");
    let one = m.tensor_parallel(1).unwrap();
    assert_eq!(one.ranks(), 1);
    let toks = tokens(3, 9, m.config().vocab_size);
    let a = m.session().prefill_all(&toks).unwrap();
    let b = one.session().prefill_all(&toks).unwrap();
    for (x, y) in a.iter().zip(&b) {
        assert_bits(x, y, "TP=1");
    }
}

#[test]
fn split_moe_ops_equal_moe_block() {
    use model::cpu::ffn::{moe_block, FfnScratch};
    use model::cpu::moe_ops::{experts_down, experts_gate_up, route, ExpertScratch, Routing};
    use model::cpu::Activations;
    use model::weights::Mlp;
    for (name, m) in toys() {
        let cfg = m.config();
        let plan = m.plan(Logits::All);
        let (l, moe) = m
            .weights()
            .layers
            .iter()
            .enumerate()
            .find_map(|(l, lw)| match &lw.mlp {
                Mlp::Moe(x) => Some((l, x)),
                Mlp::Dense { .. } => None,
            })
            .unwrap();
        let find = |f: &dyn Fn(&OpKind) -> bool| {
            plan.ops
                .iter()
                .find(|o| o.layer == Some(l) && f(&o.kind))
                .unwrap()
                .kind
        };
        let OpKind::NormRouterTopK(rp) = find(&|k| matches!(k, OpKind::NormRouterTopK(_))) else {
            unreachable!()
        };
        let OpKind::ExpertsGateUp(gp) = find(&|k| matches!(k, OpKind::ExpertsGateUp(_))) else {
            unreachable!()
        };
        let OpKind::ExpertsDown(dp) = find(&|k| matches!(k, OpKind::ExpertsDown(_))) else {
            unreachable!()
        };
        let t = 11;
        let h: Vec<f32> = tokens(5, t * cfg.hidden_size, 1000)
            .iter()
            .map(|&x| x as f32 / 500.0 - 1.0)
            .collect();
        let mut want = vec![0.0; t * cfg.hidden_size];
        moe_block(cfg, moe, &h, t, &mut want, &mut FfnScratch::default()).unwrap();
        let (mut r, mut s, mut act) = (Routing::default(), ExpertScratch::default(), Vec::new());
        let mut got = vec![0.0; t * cfg.hidden_size];
        route(&rp, moe, &h, t, &mut r).unwrap();
        experts_gate_up(&gp, Activations::F32, moe, &h, &r, &mut act, &mut s).unwrap();
        experts_down(&dp, Activations::F32, moe, &act, &r, &mut got, &mut s).unwrap();
        assert_bits(&got, &want, name);
    }
}

/// A caller written against the executor trait only.
fn greedy<E: Executor>(e: &mut E, prompt: &[u32], n: usize) -> Result<Vec<u32>, E::Error> {
    let mut out = vec![cpu_util::argmax(&e.prefill(prompt)?)];
    while out.len() < n {
        let last = *out.last().unwrap();
        out.push(cpu_util::argmax(&e.decode(last)?));
    }
    Ok(out)
}

#[test]
fn executor_trait_over_a_cpu_session() {
    let m = load("qwen3-moe/native");
    let v = m.config().vocab_size;
    let toks = tokens(11, 10, v);
    let mut s = m.session();
    let g = greedy(&mut s, &toks, 5).unwrap();
    assert_eq!(Executor::len(&s), 14);
    assert_eq!(
        Executor::max_rollback(&s),
        model::executor::DEFAULT_MAX_ROLLBACK
    );
    // truncate back to the prompt and replay the continuation as one verify block.
    Executor::truncate(&mut s, 10).unwrap();
    let o = Executor::verify(&mut s, &[toks.clone(), g.clone()].concat()[10..14], &[]).unwrap();
    assert_eq!(
        o.logits
            .iter()
            .map(|l| cpu_util::argmax(l))
            .collect::<Vec<_>>(),
        g[1..5]
    );
    // forward: decoder-layer outputs (the drafter's view) equal verify's hidden indices.
    Executor::truncate(&mut s, 0).unwrap();
    let nl = m.config().layers.len();
    let f = Executor::forward(&mut s, &toks, &[0, nl - 1]).unwrap();
    let mut s2 = m.session();
    let vv = s2.verify(&toks, &[1, LAST_LAYER_PRE_NORM]).unwrap();
    assert_eq!(f, vv);
    assert!(matches!(
        Executor::forward(&mut s, &toks, &[nl]),
        Err(CpuError::HiddenIndex { .. })
    ));
    assert_eq!(Executor::config(&s).vocab_size, v);
}

#[test]
fn layer_tables_size_kv_caches() {
    let m = load("gpt-oss/bf16");
    let plan = m.plan(Logits::Last);
    let (sliding, full) = (plan.layers[0], plan.layers[1]);
    let w = sliding.window.expect("gpt-oss layer 0 slides");
    assert_eq!(full.window, None);
    assert_eq!(sliding.kv_capacity(8192, 16, 64), w + 16 + 64);
    assert_eq!(sliding.kv_capacity(8, 16, 64), 8);
    assert_eq!(full.kv_capacity(8192, 16, 64), 8192);
    assert_eq!(sliding.max_keys(8192, 16), w + 16);
    assert_eq!(sliding.kv_keep(64), w - 1 + 64);
    assert_eq!(full.kv_keep(64), 0);
    // The session's caches are built from the same tables.
    let s = m.session();
    assert_eq!(s.kv().layers.len(), plan.layers.len());
}

#[test]
fn every_plan_is_a_valid_schedule() {
    let st = WeightStorage::cpu(true);
    for d in FIXTURES {
        let m = load(d);
        let cfg = m.config();
        for shape in [
            PassShape::decode(3),
            PassShape::verify(8, 3),
            PassShape::prefill(16, 0, false),
            PassShape::batched(4, 3).with_sample(),
        ] {
            let p = Plan::new(cfg, st, shape).unwrap();
            p.validate().unwrap();
            for n in [2, 4] {
                let layout = TpLayout::new(cfg, n, true).unwrap();
                let s = model::plan::tp::shard_plan(&p, cfg, &layout).unwrap();
                s.validate()
                    .unwrap_or_else(|e| panic!("{d} {shape} TP={n}: {e}"));
                // Sharding a sharded plan is refused.
                assert!(model::plan::tp::shard_plan(&s, cfg, &layout).is_err());
            }
        }
    }
    let spec = draft_spec();
    for pass in [DraftPass::Context { n: 4 }, DraftPass::Block { b: 16 }] {
        Plan::draft(&spec, st, pass, 7).unwrap().validate().unwrap();
    }
    // A schedule that reads a buffer before it is written is rejected, naming the op.
    let m = load("qwen3-moe/native");
    let mut p = m.plan(Logits::Last).clone();
    p.ops.swap(2, 3); // attention before the projection that writes q
    let e = p.validate().unwrap_err().to_string();
    assert!(
        e.contains("op 2 (attention") && e.contains("reads q"),
        "{e}"
    );
    let mut p = m.plan(Logits::Last).clone();
    p.taps.push(model::plan::Tap {
        hidden: 0,
        after: p.ops.len() + 3,
        buf: Buf::X,
    });
    assert!(p.validate().is_err());
}

// ---- expert parallelism -------------------------------------------------------------------------
//
// Tolerance: an expert-parallel rank sums its own experts' weighted outputs (ascending id) and the
// all-reduce adds the ranks' sums in rank order — the same k terms per row as the unsharded
// ascending-id sum, re-associated at rank boundaries (plus, with tensor-parallel attention, the
// o-projection reassociation above). The same bound as tensor parallelism applies: TP_TOL.

/// Logits of prefill + decode + verify through `par`'s sharded sessions against the unsharded
/// model, and greedy continuations equal.
fn check_par(name: &str, m: &CpuModel, par: Parallelism) -> f32 {
    let sharded = m.parallel(par).unwrap();
    assert_eq!(sharded.ranks(), par.ranks);
    let v = m.config().vocab_size;
    let toks = tokens(11, 24, v);
    let want = m.session().prefill_all(&toks).unwrap();
    let mut s = sharded.session();
    let mut got = s.prefill_all(&toks[..12]).unwrap();
    for &t in &toks[12..16] {
        got.push(s.decode(t).unwrap().to_vec());
    }
    got.extend(s.verify(&toks[16..], &[1]).unwrap().logits);
    let d = rel_diff(&want, &got);
    assert!(d <= TP_TOL, "{name} {par}: logits differ by {d} (relative)");
    let a = greedy(&mut m.session(), &toks[..7], 12).unwrap();
    let b = greedy(&mut sharded.session(), &toks[..7], 12).unwrap();
    assert_eq!(a, b, "{name} {par}: greedy continuation");
    println!("{name} {par}: max relative logit difference {d:e}");
    d
}

#[test]
fn expert_parallel_logits_match_unsharded_on_every_fixture() {
    for d in FIXTURES {
        let m = load(d);
        for n in [2, 4] {
            check_par(d, &m, Parallelism::expert(n));
            check_par(d, &m, Parallelism::tensor_expert(n));
        }
        // One expert per rank.
        check_par(d, &m, Parallelism::expert(8));
    }
}

#[test]
fn expert_parallel_logits_match_unsharded_on_toys() {
    for (name, m) in toys() {
        let e = m.config().n_experts;
        for n in [2, 4] {
            if e.is_multiple_of(n) {
                check_par(name, &m, Parallelism::expert(n));
                check_par(name, &m, Parallelism::tensor_expert(n));
            }
        }
    }
}

/// With every expert of every row on one rank (top-k within one rank's range), the rank sums
/// exactly the unsharded terms: expert parallelism over one rank's worth is bit-identical.
#[test]
fn expert_parallel_one_rank_is_the_unsharded_model() {
    let m = load("qwen3-moe/native");
    let one = m.parallel(Parallelism::expert(1)).unwrap();
    let toks = tokens(5, 9, m.config().vocab_size);
    let a = m.session().prefill_all(&toks).unwrap();
    let b = one.session().prefill_all(&toks).unwrap();
    for (x, y) in a.iter().zip(&b) {
        assert_bits(x, y, "EP=1");
    }
}

#[test]
fn expert_parallel_plan_structure() {
    let m = load("gpt-oss/mxfp4");
    let nl = m.config().layers.len();
    // Alone: attention replicated, one all-reduce per MoE layer, experts 0..4 and 4..8.
    let ep = m.parallel(Parallelism::expert(2)).unwrap();
    let plan = ep.plan(Logits::Last);
    plan.validate().unwrap();
    let ar = plan
        .ops
        .iter()
        .filter(|o| matches!(o.kind, OpKind::AllReduce(_)))
        .count();
    assert_eq!(ar, nl);
    let mut held = Vec::new();
    for o in &plan.ops {
        match o.kind {
            OpKind::QkvRope(_) | OpKind::Attention(_) | OpKind::OProj(_) => {
                assert_eq!(o.placement, Placement::Replicated)
            }
            OpKind::ExpertsGateUp(p) => {
                assert_eq!(p.intermediate, m.config().moe_intermediate_size);
                held.push((o.placement, p.experts.lo, p.experts.hi));
            }
            OpKind::ExpertsDown(p) => {
                assert!(!p.residual && p.next_norm.is_none() && p.bias);
            }
            _ => {}
        }
    }
    assert_eq!(
        &held[..2],
        &[(Placement::Rank(0), 0, 4), (Placement::Rank(1), 4, 8)]
    );
    let text = plan.to_string();
    assert!(text.contains("(experts 4..8)"), "{text}");
    assert!(text.contains("experts.down[experts 0..4]"), "{text}");
    // With tensor-parallel attention: two all-reduces per layer, attention on ranks.
    let tep = m.parallel(Parallelism::tensor_expert(2)).unwrap();
    let plan = tep.plan(Logits::Last);
    plan.validate().unwrap();
    assert_eq!(
        plan.ops
            .iter()
            .filter(|o| matches!(o.kind, OpKind::AllReduce(_)))
            .count(),
        2 * nl
    );
    assert!(plan
        .ops
        .iter()
        .filter(|o| matches!(o.kind, OpKind::Attention(_)))
        .all(|o| matches!(o.placement, Placement::Rank(_))));
    // The expected expert bytes of a decode split evenly: the ranks' sum is the unsharded total
    // (the next norm's weight moves from experts_down to the all-reduce).
    let bytes = |p: &Plan| -> f64 {
        p.ops
            .iter()
            .filter(|o| {
                matches!(
                    o.kind,
                    OpKind::ExpertsGateUp(_) | OpKind::ExpertsDown(_) | OpKind::AllReduce(_)
                ) && !matches!(o.kind, OpKind::AllReduce(a) if a.next_norm.is_none())
            })
            .map(|o| o.weight_bytes)
            .sum()
    };
    let one = bytes(m.plan(Logits::Last));
    assert!(
        (bytes(plan) - one).abs() <= 1e-6 * one,
        "{} vs {one}",
        bytes(plan)
    );
}

#[test]
fn expert_parallel_refuses_experts_that_do_not_divide() {
    let m = load("gpt-oss/bf16");
    for n in [3, 16] {
        let e = m.parallel(Parallelism::expert(n)).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, CpuError::Plan(PlanError::TensorParallel { ranks, .. }) if ranks == n),
            "{msg}"
        );
        assert!(
            msg.contains("places 8 routed experts on") && msg.contains("possible here: 1, 2, 4, 8"),
            "{msg}"
        );
    }
    // The attention split is checked too with tensor-parallel attention (3 does not divide 4
    // heads), and a model without MoE layers has nothing to place.
    assert!(m.parallel(Parallelism::tensor_expert(3)).is_err());
    let mut dense = m.config().clone();
    for l in &mut dense.layers {
        l.moe = false;
    }
    dense.dense_intermediate_size = Some(64);
    let e = TpLayout::with(&dense, Parallelism::expert(2), false).unwrap_err();
    assert!(e.to_string().contains("no MoE layer"), "{e}");
}
