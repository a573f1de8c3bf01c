//! The per-SM timeline of one persistent step: the resident kernel's [`PkTrace`] records (one per
//! executed instruction) joined with the program, summarised (per-layer fixed overhead, idle
//! share per SM, achieved GB/s per op) and written as a Chrome-trace / Perfetto JSON and an SVG
//! bubble chart.

use std::fmt::Write as _;

use super::abi::PkTrace;
use super::compile::Program;

/// One executed instruction, times in ns from the step's first start.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    pub block: usize,
    pub smid: u32,
    pub phase: usize,
    pub name: &'static str,
    pub layer: Option<usize>,
    pub tiles: u32,
    pub bytes: f64,
    pub start: f64,
    pub ready: f64,
    pub end: f64,
}

/// Per-layer numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerRow {
    pub layer: usize,
    /// From the previous layer's last end to this layer's last end, ns.
    pub time_ns: f64,
    pub bytes: f64,
    /// `time − bytes / bandwidth`, ns.
    pub fixed_ns: f64,
}

/// A summarised timeline.
#[derive(Debug, Clone, PartialEq)]
pub struct Timeline {
    pub spans: Vec<Span>,
    pub step_ns: f64,
    pub layers: Vec<LayerRow>,
    /// Per block: the share of the step it neither computed nor had work ready (waiting or done).
    pub idle: Vec<f64>,
    /// Per op name: (bytes, summed phase spans in ns) → GB/s = bytes / ns.
    pub ops: Vec<(&'static str, f64, f64)>,
    /// The bandwidth (bytes/s) the fixed overhead is measured against.
    pub bandwidth: f64,
}

/// Joins `trace` (flattened stream order) with `program`. `bandwidth`: the ceiling of the same
/// run (bytes/s).
pub fn build(program: &Program, trace: &[PkTrace], bandwidth: f64) -> Result<Timeline, String> {
    if trace.len() != program.instructions() {
        return Err(format!(
            "{} trace records for {} instructions",
            trace.len(),
            program.instructions()
        ));
    }
    let t0 = trace.iter().map(|t| t.t_start).min().unwrap_or(0);
    let mut spans = Vec::with_capacity(trace.len());
    let mut at = 0;
    for (block, s) in program.streams.iter().enumerate() {
        for i in s {
            let r = &trace[at];
            at += 1;
            if r.t_end < r.t_ready || r.t_ready < r.t_start || r.block as usize != block {
                return Err(format!(
                    "record {} of block {block} is inconsistent: {r:?}",
                    at - 1
                ));
            }
            let ph = &program.phases[i.phase as usize];
            spans.push(Span {
                block,
                smid: r.smid,
                phase: i.phase as usize,
                name: ph.opcode.name(),
                layer: ph.layer,
                tiles: i.tile_end - i.tile_begin,
                bytes: ph.tile_bytes * f64::from(i.tile_end - i.tile_begin),
                start: (r.t_start - t0) as f64,
                ready: (r.t_ready - t0) as f64,
                end: (r.t_end - t0) as f64,
            });
        }
    }
    let step_ns = spans.iter().map(|s| s.end).fold(0.0, f64::max);
    // Layers: ends and bytes.
    let n_layers = spans
        .iter()
        .filter_map(|s| s.layer)
        .max()
        .map_or(0, |l| l + 1);
    let mut last_end = vec![0.0f64; n_layers];
    let mut bytes = vec![0.0f64; n_layers];
    for s in &spans {
        if let Some(l) = s.layer {
            last_end[l] = last_end[l].max(s.end);
            bytes[l] += s.bytes;
        }
    }
    let mut layers = Vec::with_capacity(n_layers);
    let mut prev = spans
        .iter()
        .filter(|s| s.layer.is_none() && s.end <= last_end.first().copied().unwrap_or(0.0))
        .map(|s| s.end)
        .fold(0.0, f64::max);
    for l in 0..n_layers {
        let time_ns = last_end[l] - prev;
        layers.push(LayerRow {
            layer: l,
            time_ns,
            bytes: bytes[l],
            fixed_ns: time_ns - bytes[l] / bandwidth * 1e9,
        });
        prev = last_end[l];
    }
    let blocks = program.streams.len();
    let mut busy = vec![0.0f64; blocks];
    for s in &spans {
        busy[s.block] += s.end - s.ready;
    }
    let idle = busy
        .iter()
        .map(|b| {
            if step_ns > 0.0 {
                1.0 - b / step_ns
            } else {
                0.0
            }
        })
        .collect();
    // Per op: bytes over the sum of its phases' spans (first ready → last end).
    let mut phase_span: Vec<(f64, f64, f64)> =
        vec![(f64::INFINITY, 0.0, 0.0); program.phases.len()];
    for s in &spans {
        let e = &mut phase_span[s.phase];
        e.0 = e.0.min(s.ready);
        e.1 = e.1.max(s.end);
        e.2 += s.bytes;
    }
    let mut ops: Vec<(&'static str, f64, f64)> = Vec::new();
    for (p, &(a, b, by)) in phase_span.iter().enumerate() {
        if !a.is_finite() {
            continue;
        }
        let name = program.phases[p].opcode.name();
        match ops.iter_mut().find(|o| o.0 == name) {
            Some(o) => {
                o.1 += by;
                o.2 += b - a;
            }
            None => ops.push((name, by, b - a)),
        }
    }
    Ok(Timeline {
        spans,
        step_ns,
        layers,
        idle,
        ops,
        bandwidth,
    })
}

impl Timeline {
    /// The Chrome-trace (Perfetto) JSON: one thread per block, a `wait` slice before each
    /// instruction that waited, the instruction itself after (name, layer, tiles, bytes).
    pub fn chrome_json(&self) -> String {
        let mut s = String::from("{\"displayTimeUnit\":\"ns\",\"traceEvents\":[\n");
        let mut first = true;
        let mut ev = |s: &mut String, name: &str, tid: usize, ts: f64, dur: f64, args: String| {
            if !first {
                s.push_str(",\n");
            }
            first = false;
            let _ = write!(
                s,
                "{{\"name\":\"{name}\",\"ph\":\"X\",\"pid\":0,\"tid\":{tid},\"ts\":{:.3},\"dur\":{:.3},\"args\":{{{args}}}}}",
                ts / 1e3,
                dur / 1e3
            );
        };
        for sp in &self.spans {
            if sp.ready > sp.start {
                ev(
                    &mut s,
                    "wait",
                    sp.block,
                    sp.start,
                    sp.ready - sp.start,
                    String::new(),
                );
            }
            let layer = sp.layer.map_or("null".to_string(), |l| l.to_string());
            ev(
                &mut s,
                sp.name,
                sp.block,
                sp.ready,
                sp.end - sp.ready,
                format!(
                    "\"layer\":{layer},\"phase\":{},\"tiles\":{},\"bytes\":{:.0},\"sm\":{}",
                    sp.phase, sp.tiles, sp.bytes, sp.smid
                ),
            );
        }
        s.push_str("\n]}\n");
        s
    }

    /// An SVG bubble chart: one row per block, instructions coloured by op, waits grey.
    pub fn svg(&self) -> String {
        let blocks = self.idle.len().max(1);
        let (w, row) = (1600.0, 6.0);
        let left = 40.0;
        let h = blocks as f64 * row + 60.0;
        let x = |t: f64| left + t / self.step_ns.max(1.0) * (w - left - 10.0);
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"monospace\" font-size=\"10\">\n"
        );
        let _ = writeln!(
            s,
            "<text x=\"{left}\" y=\"12\">persistent step: {:.1} µs, {} instructions on {blocks} SMs (grey: waiting)</text>",
            self.step_ns / 1e3,
            self.spans.len()
        );
        let palette = [
            "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
            "#9c755f", "#bab0ac", "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b",
        ];
        let mut names: Vec<&str> = Vec::new();
        for sp in &self.spans {
            let y = 20.0 + sp.block as f64 * row;
            if sp.ready > sp.start {
                let _ = writeln!(
                    s,
                    "<rect x=\"{:.2}\" y=\"{y}\" width=\"{:.2}\" height=\"{}\" fill=\"#dddddd\"/>",
                    x(sp.start),
                    (x(sp.ready) - x(sp.start)).max(0.2),
                    row - 1.0
                );
            }
            let c = match names.iter().position(|n| *n == sp.name) {
                Some(i) => i,
                None => {
                    names.push(sp.name);
                    names.len() - 1
                }
            };
            let _ = writeln!(
                s,
                "<rect x=\"{:.2}\" y=\"{y}\" width=\"{:.2}\" height=\"{}\" fill=\"{}\"><title>{} layer {:?} {:.0} B</title></rect>",
                x(sp.ready),
                (x(sp.end) - x(sp.ready)).max(0.2),
                row - 1.0,
                palette[c % palette.len()],
                sp.name,
                sp.layer,
                sp.bytes
            );
        }
        let ly = 20.0 + blocks as f64 * row + 14.0;
        for (i, n) in names.iter().enumerate() {
            let lx = left + i as f64 * 105.0;
            let _ = writeln!(
                s,
                "<rect x=\"{lx}\" y=\"{}\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{}\" y=\"{ly}\">{n}</text>",
                ly - 9.0,
                palette[i % palette.len()],
                lx + 13.0
            );
        }
        s.push_str("</svg>\n");
        s
    }

    /// The printed summary: step time, per-layer fixed overhead, idle share, GB/s per op.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "step {:.1} µs over {} instructions; fixed overhead measured against {:.0} GB/s",
            self.step_ns / 1e3,
            self.spans.len(),
            self.bandwidth / 1e9
        );
        if !self.layers.is_empty() {
            let mut fixed: Vec<f64> = self.layers.iter().map(|l| l.fixed_ns).collect();
            fixed.sort_by(f64::total_cmp);
            let mean = fixed.iter().sum::<f64>() / fixed.len() as f64;
            let time =
                self.layers.iter().map(|l| l.time_ns).sum::<f64>() / self.layers.len() as f64;
            let _ = writeln!(
                s,
                "per layer: {:.2} µs, fixed overhead mean {:.2} µs, median {:.2} µs",
                time / 1e3,
                mean / 1e3,
                fixed[fixed.len() / 2] / 1e3
            );
        }
        let mut idle = self.idle.clone();
        idle.sort_by(f64::total_cmp);
        if !idle.is_empty() {
            let _ = writeln!(
                s,
                "idle share per SM: min {:.1} %, median {:.1} %, max {:.1} %",
                idle[0] * 100.0,
                idle[idle.len() / 2] * 100.0,
                idle[idle.len() - 1] * 100.0
            );
        }
        for (name, bytes, ns) in &self.ops {
            let _ = writeln!(
                s,
                "  {name:<16} {:>10.3} MB  {:>9.1} µs  {:>7.0} GB/s",
                bytes / 1e6,
                ns / 1e3,
                if *ns > 0.0 { bytes / ns } else { 0.0 }
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::DEVICE_STORAGE;
    use crate::persistent::{compile, CompileOptions};
    use model::cpu::toy::{self, ToyExperts};
    use model::plan::{PassShape, Plan};

    /// A synthetic trace of a program (each instruction 1 µs after its block's previous one)
    /// summarises and renders; a trace of the wrong length is an error.
    #[test]
    fn synthetic_trace_summarises_and_renders() {
        let cfg = toy::gpt_oss(1, ToyExperts::Mxfp4).0;
        let plan = Plan::new(&cfg, DEVICE_STORAGE, PassShape::decode(0).with_sample()).unwrap();
        let prog = compile(&plan, &CompileOptions::h100().with_sms(4)).unwrap();
        let mut trace = Vec::new();
        for (b, s) in prog.streams.iter().enumerate() {
            for k in 0..s.len() as u64 {
                let t = 1000 + k * 1000;
                trace.push(PkTrace {
                    t_start: t,
                    t_ready: t + 100,
                    t_end: t + 1000,
                    smid: b as u32,
                    block: b as u32,
                    ..PkTrace::default()
                });
            }
        }
        let tl = build(&prog, &trace, 3e12).unwrap();
        let longest = prog.streams.iter().map(Vec::len).max().unwrap() as f64;
        assert_eq!(tl.step_ns, longest * 1000.0);
        assert_eq!(tl.layers.len(), cfg.layers.len());
        assert!(tl.idle.iter().all(|&i| (0.0..1.0).contains(&i)));
        assert!(tl.ops.iter().any(|o| o.0 == "expert_gate_up"));
        let json = tl.chrome_json();
        assert!(json.starts_with("{\"displayTimeUnit\""));
        assert_eq!(json.matches("\"ph\":\"X\"").count(), 2 * trace.len());
        assert!(tl.svg().contains("<svg") && tl.svg().ends_with("</svg>\n"));
        assert!(tl.summary().contains("per layer"));
        assert!(build(&prog, &trace[1..], 3e12).is_err());
    }
}
