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
