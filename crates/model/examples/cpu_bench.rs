//! Rough CPU-executor timings on a random gpt-oss-20b-shaped model (hidden 2880, 64 heads of 64,
//! 8 KV heads, 32 MXFP4 experts of 2880 top-4, sliding window 128 on even layers, vocab 32000),
//! with a chosen number of layers (default 2):
//!
//! ```text
//! cargo run --release -p model --example cpu_bench -- [layers]
//! ```
//! Prints prefill (128 tokens), decode (ms/token) and verify (8-token block, ms/block) times.

use std::sync::Arc;
use std::time::Instant;

use model::config::AttnKind;
use model::cpu::{toy, CpuModel};

fn main() {
    let nl: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("layers"))
        .unwrap_or(2);
    let (mut cfg, _) = toy::gpt_oss(0, toy::ToyExperts::Mxfp4);
    cfg.vocab_size = 32000;
    cfg.hidden_size = 2880;
    cfg.n_experts = 32;
    cfg.top_k = 4;
    cfg.moe_intermediate_size = 2880;
    let l0 = cfg.layers[0];
    cfg.layers = (0..nl)
        .map(|i| {
            let mut l = l0;
            (l.n_heads, l.n_kv_heads, l.head_dim, l.v_head_dim) = (64, 8, 64, 64);
            l.rope.rotary_dim = 64;
            l.attn = if i % 2 == 0 {
                AttnKind::Sliding { window: 128 }
            } else {
                AttnKind::Full
            };
            l
        })
        .collect();
    let t = Instant::now();
    let w = toy::random_weights(&cfg, 1, toy::ToyExperts::Mxfp4);
    println!("built {nl} layers in {:.1} s", t.elapsed().as_secs_f64());
    let m = CpuModel::new(Arc::new(cfg), Arc::new(w)).expect("valid");
    let mut s = m.session();
    let toks: Vec<u32> = (0..128u32).map(|i| i * 37 % 31000 + 2).collect();
    let t = Instant::now();
    s.prefill(&toks).expect("prefill");
    println!("prefill 128 tokens: {:.3} s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    for i in 0..16 {
        s.decode(100 + i).expect("decode");
    }
    println!(
        "decode: {:.1} ms/token",
        t.elapsed().as_secs_f64() * 1e3 / 16.0
    );
    let n = s.len();
    let t = Instant::now();
    for _ in 0..4 {
        s.verify(&[5, 6, 7, 8, 9, 10, 11, 12], &[1])
            .expect("verify");
        s.truncate(n).expect("truncate");
    }
    println!(
        "verify(8): {:.1} ms/block",
        t.elapsed().as_secs_f64() * 1e3 / 4.0
    );
}
