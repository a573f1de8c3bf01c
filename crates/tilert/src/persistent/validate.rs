//! The schedule validator: checks a compiled [`Program`] on the CPU before it is uploaded.
//!
//! * **Structure**: every instruction names a phase, its opcode, a non-empty tile range inside
//!   the phase and at most the ABI's waits and signals; every tile of every phase runs exactly
//!   once over all streams.
//! * **Counters**: each counter receives, per step, exactly the target every wait on it names
//!   (what makes the epoch targets `(step + 1) · target` of never-reset counters correct).
//! * **Progress**: two consecutive steps are simulated with the kernel's rule (a block runs its
//!   stream in order; an instruction starts once every counter it waits on has reached its
//!   epoch target, compared wrap-safely as the kernel does) from counters already far into
//!   their range, so that the targets wrap around `u32`. Counters only grow, so if any order
//!   finishes, this greedy one does: a stall is a deadlock, reported with the waiting
//!   instructions.
//! * **Races**: happens-before is program order on one SM plus signal → wait (a wait is
//!   satisfied only when every signaller of the counter has run). With vector clocks over the
//!   simulated order, every two accesses of different instructions to overlapping boxes of one
//!   buffer, at least one a write, must be ordered. Accesses of distinct expert slots (parts)
//!   do not overlap: the router's distinct expert list gives each slot its own entries.

use std::collections::HashMap;

use super::abi::{Opcode, PK_MAX_SIGNALS, PK_MAX_WAITS};
use super::compile::{Program, Space};

/// What the validator found wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("SM {sm} instruction {at}: {why}")]
    Malformed { sm: usize, at: usize, why: String },
    #[error("phase {phase} ({name}) tile {tile} runs {times} times")]
    Coverage {
        phase: usize,
        name: &'static str,
        tile: u32,
        times: u32,
    },
    #[error("counter {counter}: {why}")]
    Counter { counter: u32, why: String },
    #[error("deadlock in step {step}: {blocked}")]
    Deadlock { step: u64, blocked: String },
    #[error("race on {space:?}: {a} and {b} may run concurrently and touch {region}")]
    Race {
        space: Space,
        a: String,
        b: String,
        region: String,
    },
}

/// What a valid program looks like.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Report {
    pub instructions: usize,
    pub tiles: usize,
    pub counters: usize,
    /// Instructions of the longest stream.
    pub longest_stream: usize,
    /// Access pairs checked for ordering.
    pub pairs_checked: usize,
}

/// The first step simulated: counters start at `FIRST_STEP · target`, which wraps `u32`.
const FIRST_STEP: u64 = (1 << 31) + 5;

fn label(p: &Program, sm: usize, at: usize) -> String {
    let i = &p.streams[sm][at];
    let ph = &p.phases[i.phase as usize];
    format!(
        "SM {sm} #{at} ({} of phase {}{}, tiles {}..{})",
        ph.opcode.name(),
        i.phase,
        ph.layer.map_or(String::new(), |l| format!(", layer {l}")),
        i.tile_begin,
        i.tile_end
    )
}

/// Checks `p`; see the module docs.
pub fn validate(p: &Program) -> Result<Report, ScheduleError> {
    let n_counters = p.counters.len();
    // Structure and coverage.
    let mut runs: Vec<Vec<u32>> = p.phases.iter().map(|ph| vec![0; ph.n_tiles()]).collect();
    let mut signalled = vec![0u64; n_counters];
    if p.streams.len() != p.options.sms {
        return Err(ScheduleError::Malformed {
            sm: p.streams.len(),
            at: 0,
            why: format!("{} streams for {} SMs", p.streams.len(), p.options.sms),
        });
    }
    for (sm, s) in p.streams.iter().enumerate() {
        for (at, i) in s.iter().enumerate() {
            let bad = |why: String| ScheduleError::Malformed { sm, at, why };
            let ph = p
                .phases
                .get(i.phase as usize)
                .ok_or_else(|| bad(format!("phase {} of {}", i.phase, p.phases.len())))?;
            if Opcode::from_u32(i.opcode) != Some(ph.opcode) || i.arg != i.phase {
                return Err(bad(format!(
                    "opcode {} / argument block {} for phase {} ({})",
                    i.opcode,
                    i.arg,
                    i.phase,
                    ph.opcode.name()
                )));
            }
            if i.tile_begin >= i.tile_end || i.tile_end as usize > ph.n_tiles() {
                return Err(bad(format!(
                    "tiles {}..{} of a phase of {}",
                    i.tile_begin,
                    i.tile_end,
                    ph.n_tiles()
                )));
            }
            if i.n_waits as usize > PK_MAX_WAITS || i.n_signals as usize > PK_MAX_SIGNALS {
                return Err(bad(format!("{} waits, {} signals", i.n_waits, i.n_signals)));
            }
            if i.signal_add != i.tile_end - i.tile_begin {
                return Err(bad(format!(
                    "signals {} for {} tiles",
                    i.signal_add,
                    i.tile_end - i.tile_begin
                )));
            }
            for (c, target) in i.waits() {
                if c as usize >= n_counters || target == 0 {
                    return Err(bad(format!("waits on counter {c} for {target}")));
                }
            }
            for &c in i.signals() {
                if c as usize >= n_counters {
                    return Err(bad(format!("signals counter {c} of {n_counters}")));
                }
                signalled[c as usize] += u64::from(i.signal_add);
            }
            for t in i.tile_begin..i.tile_end {
                runs[i.phase as usize][t as usize] += 1;
            }
        }
    }
    for (phase, r) in runs.iter().enumerate() {
        if let Some((tile, &times)) = r.iter().enumerate().find(|(_, &n)| n != 1) {
            return Err(ScheduleError::Coverage {
                phase,
                name: p.phases[phase].opcode.name(),
                tile: tile as u32,
                times,
            });
        }
    }
    // Counter totals equal every target.
    for (c, &per_step) in p.counters.iter().enumerate() {
        if signalled[c] != u64::from(per_step) {
            return Err(ScheduleError::Counter {
                counter: c as u32,
                why: format!(
                    "receives {} signals per step, declared {per_step}",
                    signalled[c]
                ),
            });
        }
    }
    for s in &p.streams {
        for i in s {
            for (c, target) in i.waits() {
                if target != p.counters[c as usize] {
                    return Err(ScheduleError::Counter {
                        counter: c,
                        why: format!(
                            "waited on for {target} but receives {} per step",
                            p.counters[c as usize]
                        ),
                    });
                }
            }
        }
    }
    // Two steps of the kernel's rule; the first step's order gives the vector clocks.
    let sms = p.streams.len();
    let mut counters: Vec<u32> = p
        .counters
        .iter()
        .map(|&t| (FIRST_STEP as u32).wrapping_mul(t))
        .collect();
    let mut order: Vec<(usize, usize)> = Vec::with_capacity(p.instructions());
    for step in [FIRST_STEP, FIRST_STEP + 1] {
        let mut pc = vec![0usize; sms];
        let mut left = p.instructions();
        while left > 0 {
            let mut progressed = false;
            for (sm, at) in pc.iter_mut().enumerate() {
                while let Some(i) = p.streams[sm].get(*at) {
                    let ready = i.waits().all(|(c, target)| {
                        let goal = (step as u32).wrapping_add(1).wrapping_mul(target);
                        counters[c as usize].wrapping_sub(goal) as i32 >= 0
                    });
                    if !ready {
                        break;
                    }
                    for &c in i.signals() {
                        counters[c as usize] = counters[c as usize].wrapping_add(i.signal_add);
                    }
                    if step == FIRST_STEP {
                        order.push((sm, *at));
                    }
                    *at += 1;
                    left -= 1;
                    progressed = true;
                }
            }
            if !progressed {
                let blocked: Vec<String> = (0..sms)
                    .filter(|&sm| pc[sm] < p.streams[sm].len())
                    .take(4)
                    .map(|sm| {
                        let i = &p.streams[sm][pc[sm]];
                        let waits: Vec<String> = i
                            .waits()
                            .map(|(c, t)| {
                                let have = counters[c as usize]
                                    .wrapping_sub((step as u32).wrapping_mul(t));
                                format!("counter {c}: {have}/{t}")
                            })
                            .collect();
                        format!("{} waits [{}]", label(p, sm, pc[sm]), waits.join(", "))
                    })
                    .collect();
                return Err(ScheduleError::Deadlock {
                    step: step - FIRST_STEP,
                    blocked: blocked.join("; "),
                });
            }
        }
    }
    // Vector clocks: vc[node][sm] = instructions of `sm` that happen before or at the node.
    let mut base = vec![0usize; sms];
    for sm in 1..sms {
        base[sm] = base[sm - 1] + p.streams[sm - 1].len();
    }
    let node = |sm: usize, at: usize| base[sm] + at;
    let mut vc: Vec<Vec<u32>> = vec![Vec::new(); p.instructions()];
    let mut counter_vc: Vec<Vec<u32>> = vec![vec![0; sms]; n_counters];
    for &(sm, at) in &order {
        let mut v = if at == 0 {
            vec![0u32; sms]
        } else {
            vc[node(sm, at - 1)].clone()
        };
        let i = &p.streams[sm][at];
        for (c, _) in i.waits() {
            for (a, b) in v.iter_mut().zip(&counter_vc[c as usize]) {
                *a = (*a).max(*b);
            }
        }
        v[sm] = at as u32 + 1;
        for &c in i.signals() {
            for (a, b) in counter_vc[c as usize].iter_mut().zip(&v) {
                *a = (*a).max(*b);
            }
        }
        vc[node(sm, at)] = v;
    }
    let before = |a: (usize, usize), b: (usize, usize)| vc[node(b.0, b.1)][a.0] > a.1 as u32;
    // Accesses per buffer, writes and reads apart.
    struct Acc<'a> {
        who: (usize, usize),
        region: &'a super::compile::Region,
    }
    let mut writes: HashMap<Space, Vec<Acc>> = HashMap::new();
    let mut reads: HashMap<Space, Vec<Acc>> = HashMap::new();
    for (sm, s) in p.streams.iter().enumerate() {
        for (at, i) in s.iter().enumerate() {
            let ph = &p.phases[i.phase as usize];
            for t in i.tile_begin..i.tile_end {
                for a in &ph.tiles[t as usize] {
                    let m = if a.write { &mut writes } else { &mut reads };
                    m.entry(a.region.space).or_default().push(Acc {
                        who: (sm, at),
                        region: &a.region,
                    });
                }
            }
        }
    }
    let mut pairs = 0usize;
    for (space, ws) in &writes {
        let rs = reads.get(space).map_or(&[][..], |v| &v[..]);
        for (wi, w) in ws.iter().enumerate() {
            for o in ws[wi + 1..].iter().chain(rs) {
                if o.who == w.who || !w.region.overlaps(o.region) {
                    continue;
                }
                pairs += 1;
                if !before(w.who, o.who) && !before(o.who, w.who) {
                    return Err(ScheduleError::Race {
                        space: *space,
                        a: label(p, w.who.0, w.who.1),
                        b: label(p, o.who.0, o.who.1),
                        region: format!(
                            "rows {:?} cols {:?} part {:?} / rows {:?} cols {:?} part {:?}",
                            w.region.rows,
                            w.region.cols,
                            w.region.part,
                            o.region.rows,
                            o.region.cols,
                            o.region.part
                        ),
                    });
                }
            }
        }
    }
    Ok(Report {
        instructions: p.instructions(),
        tiles: p.tiles(),
        counters: n_counters,
        longest_stream: p.streams.iter().map(Vec::len).max().unwrap_or(0),
        pairs_checked: pairs,
    })
}
