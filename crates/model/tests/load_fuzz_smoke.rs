//! A deterministic, stable-toolchain companion of the cargo-fuzz target `fuzz/load_checkpoint`:
//! mutates valid synthetic checkpoints (config values, header bytes, data bytes, truncation) with
//! a fixed seed and checks that `load` always returns (Ok or Err) without panicking.

mod load_common;

use load_common::*;
use model::load::load;

fn mutate_config(cfg: &str, r: &mut Rng) -> String {
    let mut v: serde_json::Value = serde_json::from_str(cfg).unwrap();
    let obj = v.as_object_mut().unwrap();
    let keys: Vec<String> = obj.keys().cloned().collect();
    for _ in 0..1 + r.next_u64() % 3 {
        let k = &keys[(r.next_u64() % keys.len() as u64) as usize];
        let choice = r.next_u64() % 12;
        let new = match choice {
            0 => serde_json::json!(0),
            1 => serde_json::json!(-1),
            2 => serde_json::json!(1e30),
            3 => serde_json::json!("x"),
            4 => serde_json::Value::Null,
            5 => serde_json::json!([]),
            6 => serde_json::json!({}),
            7 => serde_json::json!(u64::MAX),
            8 => serde_json::json!(3),
            9 => serde_json::json!([0, 1, 1]),
            10 => serde_json::json!(0.5),
            _ => {
                obj.remove(k);
                continue;
            }
        };
        obj.insert(k.clone(), new);
    }
    v.to_string()
}

fn mutate_bytes(b: &mut Vec<u8>, r: &mut Rng) {
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    match r.next_u64() % 6 {
        // flip bytes in the header
        0 | 1 => {
            for _ in 0..1 + r.next_u64() % 4 {
                let i = 8 + (r.next_u64() as usize % n);
                b[i] = (r.next_u64() & 0xFF) as u8;
            }
        }
        // swap a digit in the header (shapes / offsets)
        2 => {
            let digits: Vec<usize> = (8..8 + n).filter(|&i| b[i].is_ascii_digit()).collect();
            if !digits.is_empty() {
                let i = digits[r.next_u64() as usize % digits.len()];
                b[i] = b'0' + (r.next_u64() % 10) as u8;
            }
        }
        // corrupt the header length
        3 => {
            let x = r.next_u64() % 4;
            let v: u64 = match x {
                0 => n as u64 + 1,
                1 => n as u64 - 1,
                2 => b.len() as u64,
                _ => r.next_u64(),
            };
            b[..8].copy_from_slice(&v.to_le_bytes());
        }
        // truncate
        4 => {
            let keep = r.next_u64() as usize % b.len();
            b.truncate(keep);
        }
        // flip data bytes (MXFP4 scales may become 0xFF)
        _ => {
            if b.len() > 8 + n {
                for _ in 0..8 {
                    let i = 8 + n + (r.next_u64() as usize % (b.len() - 8 - n));
                    b[i] = 0xFF;
                }
            }
        }
    }
}

#[test]
fn mutated_checkpoints_never_panic() {
    let bases: Vec<(&str, Vec<u8>)> = vec![
        (GPT_OSS_CONFIG, serialize(&gpt_oss_tensors(1, false))),
        (GPT_OSS_CONFIG, serialize(&gpt_oss_tensors(2, true))),
        (QWEN3_CONFIG, serialize(&qwen3_tensors(3))),
        (
            MIMO_CONFIG,
            serialize(&mimo_tensors(4, "attention_sink_bias")),
        ),
    ];
    let d = TempDir::new("fuzz-smoke");
    let mut r = Rng(0x9E37_79B9_7F4A_7C15);
    let (mut ok, mut err) = (0, 0);
    for it in 0..600 {
        let (cfg, st) = &bases[it % bases.len()];
        let mut st = st.clone();
        let cfg = match r.next_u64() % 3 {
            0 => mutate_config(cfg, &mut r),
            1 => {
                mutate_bytes(&mut st, &mut r);
                cfg.to_string()
            }
            _ => {
                mutate_bytes(&mut st, &mut r);
                mutate_config(cfg, &mut r)
            }
        };
        d.write("config.json", &cfg);
        d.write("model.safetensors", &st);
        match load(d.path()) {
            Ok(_) => ok += 1,
            Err(e) => {
                // Every error renders and names the directory.
                assert!(e.to_string().contains("ultra-load-fuzz-smoke"), "{e}");
                err += 1;
            }
        }
    }
    eprintln!("mutated loads: {ok} ok, {err} rejected");
    assert!(
        err > 300,
        "most mutations must be rejected ({ok} ok, {err} rejected)"
    );
}
