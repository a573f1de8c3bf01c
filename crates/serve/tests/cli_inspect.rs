//! `ultra inspect` on gpt-oss-20b's released config.json (no weights): 3.61 B active
//! parameters and 3.71 GB per decoded token (research/models.md §6.1).

use std::path::Path;

use serve::commands::inspect::inspect;

#[test]
fn gpt_oss_20b_real_config() {
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/configs/gpt-oss-20b.json");
    let r = inspect(&cfg).unwrap();
    assert_eq!(r.footprint.active_params, 3_608_307_264);
    assert_eq!(r.footprint.total_params, 20_914_757_184);
    assert_eq!((r.footprint.bytes_per_token / 1e7).round() / 100.0, 3.71);
    assert_eq!(r.plan.label, "MXFP4 experts, bf16 rest");
}

#[test]
fn checkpoint_dirs_and_errors() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
    let r = inspect(&root.join("qwen3-moe/native")).unwrap();
    assert!(r.footprint.active_params < r.footprint.total_params);
    let err = format!("{:#}", inspect(&root.join("no-such-dir")).err().unwrap());
    assert!(err.contains("no-such-dir"), "{err}");
}

/// Bytes per token by tensor class sum to the plan's total, and the busiest rank of an N-way
/// split reads between 1/N of it and the whole (replicated ops: router, norms): MiMo-V2.5-Pro's
/// committed config, where attention projections, not experts, are most of a token's bytes.
#[test]
fn mimo_v2_5_pro_classes_and_ranks() {
    use model::plan::PassShape;
    use serve::commands::inspect::{bytes_by_class, max_rank_bytes, plan};
    let cfg =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/configs/mimo-v2.5-pro.json");
    let r = inspect(&cfg).unwrap();
    let p = plan(&r, PassShape::decode(0), 1).unwrap();
    let total: f64 = p.ops.iter().map(|o| o.weight_bytes).sum();
    let classes = bytes_by_class(&p);
    let sum: f64 = classes.iter().map(|(_, b)| b).sum();
    assert!((sum - total).abs() <= 1e-9 * total, "{sum} vs {total}");
    let get = |n: &str| {
        classes
            .iter()
            .find(|(c, _)| *c == n)
            .map_or(0.0, |(_, b)| *b)
    };
    let attn = get("qkv_rope_kv") + get("o_proj");
    let experts = get("experts_gate_up") + get("experts_down");
    assert!(
        attn > 0.0 && experts > 0.0 && get("lm_head") > 0.0,
        "{classes:?}"
    );
    assert!(attn > experts, "attention {attn} vs experts {experts}");
    for n in [4usize, 8] {
        let sp = plan(&r, PassShape::decode(0), n).unwrap();
        let b = max_rank_bytes(&sp);
        assert!(
            b >= total / n as f64 * 0.999 && b < total,
            "{n} ranks: {b} of {total}"
        );
    }
}
