//! Progress of reading (or uploading) a large checkpoint, on stderr: a one-line bar with bytes,
//! rate and ETA on a terminal, plain log lines (every 10 %) otherwise, nothing at all for
//! checkpoints under [`MIN_BYTES`] (so small models print exactly what they always did).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Bytes done out of a total.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
}

/// Checkpoints smaller than this show no progress.
pub const MIN_BYTES: u64 = 256 << 20;

/// Redraws of the terminal bar at most this often.
const REDRAW: Duration = Duration::from_millis(100);

/// A progress display for one phase (`label`, e.g. "reading /models/x").
#[derive(Debug)]
pub struct Reporter {
    label: String,
    start: Instant,
    last_draw: Option<Instant>,
    last_tenth: u64,
    tty: bool,
    enabled: bool,
    finished: bool,
}

fn gb(b: u64) -> f64 {
    b as f64 / 1e9
}

impl Reporter {
    /// A reporter that draws on stderr when the phase is at least [`MIN_BYTES`] (`total`).
    pub fn new(label: impl Into<String>, total: u64) -> Reporter {
        Reporter {
            label: label.into(),
            start: Instant::now(),
            last_draw: None,
            last_tenth: 0,
            tty: std::io::stderr().is_terminal(),
            enabled: total >= MIN_BYTES,
            finished: false,
        }
    }

    /// The one line describing `p` after `elapsed` (bytes, rate, ETA).
    pub fn line(label: &str, p: Progress, elapsed: Duration) -> String {
        let s = elapsed.as_secs_f64().max(1e-9);
        let rate = p.done as f64 / s;
        let pct = 100.0 * p.done as f64 / (p.total.max(1)) as f64;
        let eta = if p.done >= p.total {
            format!("done in {s:.1} s")
        } else if rate > 0.0 {
            format!("ETA {:.0} s", (p.total - p.done) as f64 / rate)
        } else {
            "ETA ?".into()
        };
        format!(
            "{label}: {:.2}/{:.2} GB ({pct:.0} %), {:.2} GB/s, {eta}",
            gb(p.done),
            gb(p.total),
            rate / 1e9
        )
    }

    /// Reports progress `p`.
    pub fn update(&mut self, p: Progress) {
        if !self.enabled || self.finished {
            return;
        }
        let now = Instant::now();
        let el = now - self.start;
        let mut err = std::io::stderr().lock();
        if self.tty {
            if p.done < p.total && self.last_draw.is_some_and(|t| now - t < REDRAW) {
                return;
            }
            self.last_draw = Some(now);
            const W: usize = 24;
            let filled = ((p.done as f64 / p.total.max(1) as f64) * W as f64) as usize;
            let bar: String = (0..W).map(|i| if i < filled { '#' } else { '-' }).collect();
            let _ = write!(
                err,
                "\r\x1b[2K[{bar}] {}",
                Reporter::line(&self.label, p, el)
            );
            if p.done >= p.total {
                let _ = writeln!(err);
                self.finished = true;
            }
            let _ = err.flush();
        } else {
            let tenth = p.done * 10 / p.total.max(1);
            if tenth > self.last_tenth || p.done >= p.total {
                self.last_tenth = tenth;
                let _ = writeln!(err, "{}", Reporter::line(&self.label, p, el));
                if p.done >= p.total {
                    self.finished = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_shows_bytes_rate_and_eta() {
        let p = Progress {
            done: 1_000_000_000,
            total: 4_000_000_000,
        };
        let l = Reporter::line("reading m", p, Duration::from_secs(2));
        assert_eq!(l, "reading m: 1.00/4.00 GB (25 %), 0.50 GB/s, ETA 6 s");
        let done = Progress {
            done: 4_000_000_000,
            total: 4_000_000_000,
        };
        let l = Reporter::line("reading m", done, Duration::from_secs(8));
        assert_eq!(
            l,
            "reading m: 4.00/4.00 GB (100 %), 0.50 GB/s, done in 8.0 s"
        );
    }

    #[test]
    fn small_checkpoints_report_nothing() {
        let mut r = Reporter::new("x", MIN_BYTES - 1);
        assert!(!r.enabled);
        r.update(Progress {
            done: MIN_BYTES - 1,
            total: MIN_BYTES - 1,
        });
        assert!(!r.finished, "a disabled reporter does not draw");
        assert!(Reporter::new("x", MIN_BYTES).enabled);
    }
}
