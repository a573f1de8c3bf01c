//! What adaptive speculation measured on this machine, remembered between `ultra generate`
//! runs (issue #20 item 5).
//!
//! One `ultra generate` is one request: its adaptive controller (`dflash::adapt`) spends its
//! first rounds measuring (full-block rounds, plain steps) before it can turn drafting off, and
//! the process loads the drafter before the first of them. Where drafting does not pay — the
//! embedded default model on a CPU: its drafter is as wide as the target — that start-up alone
//! made a short `ultra generate` slower than `--no-draft`. So the CLI keeps what the last
//! measuring run found, per model, drafter, block size, device, thread count and activation
//! mode, in `<cache>/adaptive/<key>.json` (`<cache>`: the default model's cache directory,
//! `$ULTRA_CACHE_DIR` / `$XDG_CACHE_HOME/ultra` / `~/.cache/ultra`): while that record is fresh
//! and says drafting did not pay, a run decodes plainly without loading the drafter. A record
//! is fresh for [`REMEASURE_RUNS`] runs and [`REMEASURE_SECS`] seconds; then a run measures
//! again (load and acceptance change). Each measuring run that finds what the record said
//! (drafting off again) doubles both, up to [`MAX_BACKOFF`] doublings: a measuring run costs
//! its full-block rounds (on the default model on this project's CPU 8–16 % of a 128-token
//! run), so a verdict confirmed again and again is re-checked ever more rarely (8, 16, 32, 64,
//! 128 runs) and the average cost falls below 1 %; a changed verdict starts over at 8. A run
//! that re-measures such a record warms up with one full-block round instead of two
//! (`dflash::BlockPolicy::Recheck`). Output
//! is the same either way (greedy: identical; sampled: the target's distribution).

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Runs that reuse a record before one measures again.
pub const REMEASURE_RUNS: u32 = 8;
/// Seconds a record stays fresh.
pub const REMEASURE_SECS: u64 = 3600;
/// Most doublings of [`REMEASURE_RUNS`] and [`REMEASURE_SECS`] by confirming measurements.
pub const MAX_BACKOFF: u32 = 4;

/// What one measuring run found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The width the controller chose last (1: drafting off).
    pub chosen: usize,
    /// The best drafting width's expected tokens/s over a plain step's.
    pub draft_speedup: f64,
    /// Seconds since the Unix epoch when it was measured.
    pub measured_unix: u64,
    /// Runs that reused it since.
    pub reused: u32,
    /// Measuring runs in a row that found drafting off, less one (absent in older records: 0).
    #[serde(default)]
    pub confirmed: u32,
}

impl Record {
    /// Runs it may be reused for: [`REMEASURE_RUNS`] doubled per confirmation.
    pub fn runs_allowed(&self) -> u32 {
        REMEASURE_RUNS << self.confirmed.min(MAX_BACKOFF)
    }

    /// Whether a run may reuse it at `now` (Unix seconds).
    pub fn fresh(&self, now: u64) -> bool {
        let secs = REMEASURE_SECS << self.confirmed.min(MAX_BACKOFF);
        self.reused < self.runs_allowed() && now.saturating_sub(self.measured_unix) < secs
    }

    /// The record to store after a measuring run that found `new`, `self` being the record
    /// that run replaced: a confirmed "drafting off" backs off further, anything else starts
    /// over.
    pub fn after(&self, new: Record) -> Record {
        let confirmed = if self.drafting_off() && new.drafting_off() {
            (self.confirmed + 1).min(MAX_BACKOFF)
        } else {
            0
        };
        Record { confirmed, ..new }
    }

    /// Whether it says drafting does not pay.
    pub fn drafting_off(&self) -> bool {
        self.chosen <= 1
    }
}

/// Where the record of one configuration lives.
#[derive(Debug, Clone)]
pub struct Memory {
    path: PathBuf,
}

/// What decides a record's key: everything that changes the cost of a step or the acceptance.
pub struct Key<'a> {
    pub model: &'a Path,
    pub drafter: &'a Path,
    pub block_size: Option<usize>,
    pub device: &'a str,
    pub threads: usize,
    pub activations: &'a str,
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Memory {
    /// The record file of `key` under the cache directory (`None` when there is none).
    pub fn for_key(key: &Key<'_>) -> Option<Memory> {
        let root = default_model::cache_root().ok()?;
        Some(Memory::in_dir(&root.join("adaptive"), key))
    }

    /// The record file of `key` under `dir`.
    pub fn in_dir(dir: &Path, key: &Key<'_>) -> Memory {
        let abs = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        let mut h = Sha256::new();
        for part in [
            abs(key.model).display().to_string(),
            abs(key.drafter).display().to_string(),
            format!("{:?}", key.block_size),
            key.device.to_string(),
            key.threads.to_string(),
            key.activations.to_string(),
        ] {
            h.update(part.as_bytes());
            h.update([0u8]);
        }
        let hex: String = h.finalize()[..12]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Memory {
            path: dir.join(format!("{hex}.json")),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored record (`None`: none, or unreadable — then the run measures again).
    pub fn load(&self) -> Option<Record> {
        let text = std::fs::read_to_string(&self.path).ok()?;
        let r: Record = serde_json::from_str(&text).ok()?;
        (r.draft_speedup.is_finite() && r.chosen >= 1).then_some(r)
    }

    /// Stores `r` (best effort: a cache that cannot be written only costs the next run a
    /// measurement; the error is returned for the caller to mention).
    pub fn store(&self, r: &Record) -> std::io::Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        // Written whole, then renamed: a concurrent run reads the old or the new record.
        let tmp = self
            .path
            .with_extension(format!("json.{}.tmp", std::process::id()));
        std::fs::write(&tmp, serde_json::to_vec(r).map_err(std::io::Error::other)?)?;
        std::fs::rename(&tmp, &self.path)
    }

    /// The record of a measuring run's choice (`None` when it measured too little to choose).
    pub fn record_of(summary: &dflash::AdaptSummary) -> Option<Record> {
        Some(Record {
            chosen: summary.chosen,
            draft_speedup: summary.draft_speedup?,
            measured_unix: now_unix(),
            reused: 0,
            confirmed: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key<'a>(threads: usize) -> Key<'a> {
        Key {
            model: Path::new("/nonexistent/model"),
            drafter: Path::new("/nonexistent/drafter"),
            block_size: None,
            device: "cpu",
            threads,
            activations: "q8",
        }
    }

    #[test]
    fn a_record_round_trips_and_goes_stale() {
        let dir = std::env::temp_dir().join(format!("ultra-adapt-mem-{}", std::process::id()));
        let m = Memory::in_dir(&dir, &key(2));
        assert!(m.load().is_none());
        let summary = dflash::AdaptSummary {
            steps: vec![0, 40, 2],
            chosen: 1,
            cost: vec![None, Some(1e-3), Some(5e-3)],
            draft_speedup: Some(0.4),
        };
        let r = Memory::record_of(&summary).unwrap();
        m.store(&r).unwrap();
        let back = m.load().unwrap();
        assert_eq!(back, r);
        assert!(back.drafting_off());
        assert!(back.fresh(back.measured_unix + 10));
        assert!(!back.fresh(back.measured_unix + REMEASURE_SECS));
        let used = Record {
            reused: REMEASURE_RUNS,
            ..back
        };
        assert!(!used.fresh(used.measured_unix));
        // Another configuration has its own record.
        assert_ne!(Memory::in_dir(&dir, &key(1)).path(), m.path());
        // A summary without a measured speed-up records nothing; a corrupt file reads as none.
        let none = dflash::AdaptSummary {
            draft_speedup: None,
            ..summary
        };
        assert!(Memory::record_of(&none).is_none());
        // A record without `confirmed` (an older file) reads with 0.
        std::fs::write(
            m.path(),
            br#"{"chosen":1,"draft_speedup":0.4,"measured_unix":5,"reused":2}"#,
        )
        .unwrap();
        assert_eq!(m.load().unwrap().confirmed, 0);
        std::fs::write(m.path(), b"{not json").unwrap();
        assert!(m.load().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn confirmed_verdicts_back_off() {
        let off = Record {
            chosen: 1,
            draft_speedup: 0.5,
            measured_unix: 1000,
            reused: 0,
            confirmed: 0,
        };
        assert_eq!(off.runs_allowed(), REMEASURE_RUNS);
        // Off, then off again: the next record is reused twice as long, up to MAX_BACKOFF.
        let mut r = off.clone();
        for i in 1..=MAX_BACKOFF + 2 {
            r = r.after(off.clone());
            assert_eq!(r.confirmed, i.min(MAX_BACKOFF));
        }
        assert_eq!(r.runs_allowed(), REMEASURE_RUNS << MAX_BACKOFF);
        let used = Record {
            reused: REMEASURE_RUNS,
            ..r.clone()
        };
        assert!(used.fresh(1000 + REMEASURE_SECS));
        assert!(!Record {
            reused: r.runs_allowed(),
            ..r.clone()
        }
        .fresh(1000));
        // A measuring run that finds drafting pays starts over (and is never reused to skip).
        let on = Record {
            chosen: 8,
            draft_speedup: 1.3,
            ..off.clone()
        };
        assert_eq!(r.after(on.clone()).confirmed, 0);
        assert_eq!(on.after(off.clone()).confirmed, 0);
    }
}
