//! `ultra inspect`: what a checkpoint (or a bare `config.json`) holds and costs: architecture,
//! layers, parameters total/active, weight bytes per decoded token, KV bytes, and the batch-1
//! decode roofline at a given bandwidth. With `--plan`: the step plan of one pass (`model::plan`:
//! every op with its buffers, weights, parameters, bytes read and FLOPs, and the totals),
//! optionally sharded over `--tensor-parallel N` ranks, and a drafter's passes (`--draft DIR`).

use std::path::Path;

use anyhow::{bail, Context, Result};
use model::config::{AttnKind, ModelConfig};
use model::footprint::{Footprint, StoragePlan};
use model::plan::draft::DraftPass;
use model::plan::tp::{shard_plan, Parallelism, TpLayout};
use model::plan::{PassShape, Plan, WeightStorage};

/// Parses a bandwidth: bytes/s as a plain number (`3e12`) or with a unit (`3TB/s`, `3350GB/s`).
pub fn parse_bandwidth(s: &str) -> Result<f64> {
    let t = s.trim().to_ascii_lowercase();
    let (num, mult) = if let Some(n) = t.strip_suffix("tb/s") {
        (n, 1e12)
    } else if let Some(n) = t.strip_suffix("gb/s") {
        (n, 1e9)
    } else if let Some(n) = t.strip_suffix("mb/s") {
        (n, 1e6)
    } else {
        (t.as_str(), 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .with_context(|| format!("bandwidth {s:?}: expected e.g. 3e12, 3TB/s or 3350GB/s"))?;
    if !(v.is_finite() && v > 0.0) {
        bail!("bandwidth {s:?} must be positive");
    }
    Ok(v * mult)
}

/// The report `ultra inspect` prints.
pub struct Inspection {
    pub config: ModelConfig,
    pub plan: StoragePlan,
    pub footprint: Footprint,
}

/// Reads `path`: a checkpoint directory (its config.json) or a config.json file.
pub fn inspect(path: &Path) -> Result<Inspection> {
    let config_file = if path.is_dir() {
        path.join("config.json")
    } else {
        path.to_path_buf()
    };
    let text = std::fs::read_to_string(&config_file)
        .with_context(|| format!("reading {}", config_file.display()))?;
    let raw: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: invalid JSON", config_file.display()))?;
    let config = if path.is_dir() {
        ModelConfig::from_dir(path)
    } else {
        ModelConfig::from_json_str(&text)
    }
    .with_context(|| format!("{}", config_file.display()))?;
    let plan = StoragePlan::from_config_json(&raw);
    let footprint = Footprint::new(&config, plan);
    Ok(Inspection {
        config,
        plan,
        footprint,
    })
}

fn gb(b: f64) -> String {
    format!("{:.3} GB", b / 1e9)
}

fn billions(p: u64) -> String {
    format!("{:.3} B", p as f64 / 1e9)
}

/// Prints the report.
pub fn print(i: &Inspection, bandwidth: f64, context: usize) {
    let c = &i.config;
    let f = &i.footprint;
    let sliding = c
        .layers
        .iter()
        .filter(|l| matches!(l.attn, AttnKind::Sliding { .. }))
        .count();
    let moe_layers = c.layers.iter().filter(|l| l.moe).count();
    println!("architecture        {:?}", c.arch);
    println!(
        "layers              {} ({} sliding-window, {} full; {} MoE, {} dense)",
        c.layers.len(),
        sliding,
        c.layers.len() - sliding,
        moe_layers,
        c.layers.len() - moe_layers
    );
    println!("hidden / vocab      {} / {}", c.hidden_size, c.vocab_size);
    println!(
        "experts             {} routed, top-{}, intermediate {}",
        c.n_experts, c.top_k, c.moe_intermediate_size
    );
    println!("storage             {}", i.plan.label);
    println!("parameters total    {}", billions(f.total_params));
    println!(
        "parameters active   {} per token (input embedding excluded)",
        billions(f.active_params)
    );
    println!(
        "bytes per token     {} (experts {}, rest {})",
        gb(f.bytes_per_token),
        gb(f.expert_bytes_per_token),
        gb(f.bytes_per_token - f.expert_bytes_per_token)
    );
    let kv = Footprint::kv_bytes(c, i.plan, context);
    println!("KV cache at {context} tokens  {}", gb(kv));
    println!(
        "roofline at {:.2} TB/s: {:.0} tok/s (weights only), {:.0} tok/s with the KV cache at {context} tokens",
        bandwidth / 1e12,
        f.roofline_tokens_per_s(bandwidth, 0.0),
        f.roofline_tokens_per_s(bandwidth, kv)
    );
}

/// Weight bytes of one decode step by op (tensor class: `qkv_rope_kv`, `o_proj`,
/// `norm_router_topk`, `experts_*`, `mlp_*`, `lm_head`, ...), from the step plan, in plan order
/// of first appearance.
pub fn bytes_by_class(plan: &Plan) -> Vec<(&'static str, f64)> {
    let mut out: Vec<(&'static str, f64)> = Vec::new();
    for op in &plan.ops {
        if op.weight_bytes == 0.0 {
            continue;
        }
        let name = op.kind.name();
        match out.iter_mut().find(|(n, _)| *n == name) {
            Some((_, b)) => *b += op.weight_bytes,
            None => out.push((name, op.weight_bytes)),
        }
    }
    out
}

/// The weight bytes the busiest rank reads in one step of a sharded plan (its own ops plus the
/// replicated ones).
pub fn max_rank_bytes(plan: &Plan) -> f64 {
    let mut per_rank = vec![0f64; plan.ranks.max(1)];
    for op in &plan.ops {
        match op.placement {
            model::plan::Placement::Replicated => {
                per_rank.iter_mut().for_each(|b| *b += op.weight_bytes)
            }
            model::plan::Placement::Rank(r) => {
                if let Some(b) = per_rank.get_mut(r) {
                    *b += op.weight_bytes
                }
            }
        }
    }
    per_rank.into_iter().fold(0.0, f64::max)
}

/// Prints the decode step's weight bytes by tensor class and the weights-only roofline on 1, 4
/// and 8 GPUs (tensor parallel as `--tensor-parallel` shards it: each GPU streams its busiest
/// rank's bytes at `bandwidth`; all-reduce latency not included), or why a split does not apply.
pub fn print_classes(i: &Inspection, bandwidth: f64, context: usize) -> Result<()> {
    let p = plan(i, PassShape::decode(context), 1)?;
    let total: f64 = p.ops.iter().map(|o| o.weight_bytes).sum();
    println!("bytes per token by tensor class (decode plan):");
    for (name, b) in bytes_by_class(&p) {
        println!(
            "  {name:<20} {:>10}  {:>5.1} %",
            gb(b),
            100.0 * b / total.max(1.0)
        );
    }
    for n in [1usize, 4, 8] {
        match plan(i, PassShape::decode(context), n) {
            Ok(sp) => {
                let b = if n == 1 { total } else { max_rank_bytes(&sp) };
                println!(
                    "roofline on {n} GPU{} at {:.2} TB/s each: {:.0} tok/s ({} per GPU per token; \
                     weights only, no all-reduce time)",
                    if n == 1 { "" } else { "s" },
                    bandwidth / 1e12,
                    bandwidth / b.max(1.0),
                    gb(b)
                );
            }
            Err(e) => println!("roofline on {n} GPUs: no tensor-parallel split ({e})"),
        }
    }
    Ok(())
}

/// Parses `--pass`: `decode`, `prefill:N`, `verify:B` or `batched:N`, at `context` cached
/// positions.
pub fn parse_pass(s: &str, context: usize) -> Result<PassShape> {
    let (name, n) = match s.split_once(':') {
        Some((a, b)) => {
            let n: usize = b
                .trim()
                .parse()
                .with_context(|| format!("--pass {s:?}: {b:?} is not a row count"))?;
            if n == 0 {
                bail!("--pass {s:?}: the row count must be at least 1");
            }
            (a.trim(), Some(n))
        }
        None => (s.trim(), None),
    };
    Ok(match (name, n) {
        ("decode", None | Some(1)) => PassShape::decode(context),
        ("prefill", Some(n)) => PassShape::prefill(n, context, true),
        ("verify", Some(n)) => PassShape::verify(n, context),
        ("batched", Some(n)) => PassShape::batched(n, context),
        _ => bail!("--pass {s:?}: expected decode, prefill:N, verify:B or batched:N"),
    })
}

/// The plan of `shape` for the inspected model, sharded over `ranks` tensor-parallel ranks
/// when `ranks > 1` (an error names the head counts that do not split).
pub fn plan(i: &Inspection, shape: PassShape, ranks: usize) -> Result<Plan> {
    plan_split(i, shape, Parallelism::tensor(ranks))
}

/// The plan of `shape` split as `par` says (tensor and/or expert parallelism; an error names
/// the heads or experts that do not split).
pub fn plan_split(i: &Inspection, shape: PassShape, par: Parallelism) -> Result<Plan> {
    let storage = WeightStorage::from_plan(i.plan);
    let p = Plan::new(&i.config, storage, shape)?;
    if par.ranks <= 1 {
        return Ok(p);
    }
    let layout = TpLayout::with(&i.config, par, storage.mxfp4_experts)?;
    Ok(shard_plan(&p, &i.config, &layout)?)
}

/// The drafter in `dir`'s context-append (`n` tokens) and block-draft (`block` rows, default
/// the drafter's) plans, at `context` positions already in its caches.
pub fn draft_plans(
    i: &Inspection,
    dir: &Path,
    n: usize,
    block: Option<usize>,
    context: usize,
) -> Result<(Plan, Plan)> {
    let file = dir.join("config.json");
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let d = dflash::DrafterConfig::from_json_str(&text)
        .with_context(|| format!("{}", file.display()))?;
    let spec = d.draft_spec(&i.config);
    let storage = WeightStorage::from_plan(StoragePlan {
        // The drafter is dense: its storage is the target's dense dtype.
        expert_bytes_per_weight: i.plan.dense_bytes_per_weight,
        ..i.plan
    });
    let b = block.unwrap_or(d.block_size);
    let ctx = Plan::draft(&spec, storage, DraftPass::Context { n }, context)?;
    let blk = Plan::draft(&spec, storage, DraftPass::Block { b }, context)?;
    Ok((ctx, blk))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pass_names() {
        assert_eq!(parse_pass("decode", 5).unwrap(), PassShape::decode(5));
        assert_eq!(parse_pass("verify:8", 0).unwrap(), PassShape::verify(8, 0));
        assert_eq!(parse_pass("batched:16", 0).unwrap().rows, 16);
        assert_eq!(parse_pass("prefill:256", 0).unwrap().rows, 256);
        for bad in ["verify", "verify:0", "verify:x", "sample:3", "decode:2"] {
            assert!(parse_pass(bad, 0).is_err(), "{bad}");
        }
    }

    #[test]
    fn bandwidth_units() {
        assert_eq!(parse_bandwidth("3e12").unwrap(), 3e12);
        assert_eq!(parse_bandwidth("3TB/s").unwrap(), 3e12);
        assert_eq!(parse_bandwidth("3350 GB/s").unwrap(), 3.35e12);
        assert!(parse_bandwidth("fast").is_err());
        assert!(parse_bandwidth("-1").is_err());
    }
}
