//! A plain, bounded loop driver for the `ultra serve` fuzz targets, for machines without
//! nightly + cargo-fuzz: `drive <http_request|grpc_request> <executions> [seed]`. Inputs are
//! the targets' seeds mutated at random (bit flips, random and "interesting" bytes, inserted,
//! deleted and duplicated ranges, splices of two inputs); a broken invariant or a panic is
//! written to `artifacts/<target>/` and counted. Prints executions, failures and executions
//! per second; exits 1 if any input failed.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use rand::{Rng, SeedableRng};
use ultra_fuzz::serve_targets as t;

const TOKENS: &[&[u8]] = &[
    b"\r\n",
    b"\r\n\r\n",
    b"Content-Length: ",
    b"Transfer-Encoding: chunked\r\n",
    b"Host: ",
    b"Origin: ",
    b"Authorization: Bearer ",
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b":",
    b",",
    b"-1",
    b"1e400",
    b"18446744073709551616",
    b"null",
    b"true",
    b"\xff\xfe",
    b"\\u0000",
    b"0\r\n\r\n",
    b"HTTP/1.1",
    b"OPTIONS ",
    b"GET ",
    b"POST ",
    b"/v1/completions",
    b"\x08\x80\x80\x80\x80\x10",
    b"\x12\xff\xff\xff\xff\x0f",
    b"\x2a\x00",
];

fn mutate(rng: &mut impl Rng, corpus: &[Vec<u8>], base: &[u8]) -> Vec<u8> {
    let mut v = base.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        let len = v.len();
        match rng.random_range(0..7) {
            0 if len > 0 => {
                let i = rng.random_range(0..len);
                v[i] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.random_range(0..len);
                v[i] = rng.random();
            }
            2 => {
                let i = rng.random_range(0..=len);
                let tok = TOKENS[rng.random_range(0..TOKENS.len())];
                v.splice(i..i, tok.iter().copied());
            }
            3 if len > 0 => {
                let a = rng.random_range(0..len);
                let b = (a + rng.random_range(1..=16)).min(len);
                v.drain(a..b);
            }
            4 if len > 0 => {
                let a = rng.random_range(0..len);
                let b = (a + rng.random_range(1..=64)).min(len);
                let chunk = v[a..b].to_vec();
                let i = rng.random_range(0..=len);
                v.splice(i..i, chunk);
            }
            5 => {
                let other = &corpus[rng.random_range(0..corpus.len())];
                let cut = rng.random_range(0..=v.len());
                let from = rng.random_range(0..=other.len());
                v.truncate(cut);
                v.extend_from_slice(&other[from..]);
            }
            _ => {
                let i = rng.random_range(0..=len);
                let n = rng.random_range(1..=8);
                let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                v.splice(i..i, bytes);
            }
        }
    }
    v.truncate(256 << 10);
    v
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: drive <http_request|grpc_request> <executions> [seed]";
    let target = args.get(1).expect(usage).as_str();
    let execs: u64 = args.get(2).and_then(|s| s.parse().ok()).expect(usage);
    let seed: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1);
    let (run, mut corpus): (fn(&[u8]) -> Result<(), String>, Vec<Vec<u8>>) = match target {
        "http_request" => (t::http_request, t::http_seeds()),
        "grpc_request" => (t::grpc_request, t::grpc_seeds()),
        _ => panic!("{usage}"),
    };
    std::panic::set_hook(Box::new(|_| {}));
    let dir = std::path::PathBuf::from("artifacts").join(target);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let t0 = Instant::now();
    let mut failures = 0u64;
    for i in 0..execs {
        let input = if (i as usize) < corpus.len() {
            corpus[i as usize].clone()
        } else {
            let base = corpus[rng.random_range(0..corpus.len())].clone();
            mutate(&mut rng, &corpus, &base)
        };
        let outcome = catch_unwind(AssertUnwindSafe(|| run(&input)));
        let failed = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(p) => Some(
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panic".into()),
            ),
        };
        if let Some(why) = failed {
            failures += 1;
            let _ = std::fs::create_dir_all(&dir);
            let path = dir.join(format!("failure-{i}"));
            let _ = std::fs::write(&path, &input);
            eprintln!("input {i} failed ({}): {why}", path.display());
        } else if corpus.len() < 4096 && rng.random_range(0..64) == 0 {
            // Keep some passing inputs to mutate further.
            corpus.push(input);
        }
    }
    let s = t0.elapsed().as_secs_f64();
    println!(
        "{target}: {execs} executions, {failures} failures, {:.1} s, {:.0} exec/s (seed {seed})",
        s,
        execs as f64 / s
    );
    if failures > 0 {
        std::process::exit(1);
    }
}
