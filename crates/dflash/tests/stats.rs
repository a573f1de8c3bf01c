//! Acceptance statistics arithmetic.

use dflash::{accept_greedy, AcceptError, AcceptanceStats};

const ROUNDS: [(usize, usize); 4] = [(3, 4), (0, 4), (4, 4), (1, 2)];

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

#[test]
fn arithmetic() {
    let mut s = AcceptanceStats::new();
    assert_eq!(s.tau(), None);
    assert_eq!(s.mean_accepted(), None);
    assert_eq!(s.acceptance_rate(), None);
    assert_eq!(s.position_acceptance_rate(0), None);
    for (a, n) in ROUNDS {
        s.record(a, n).unwrap();
    }
    assert_eq!(s.rounds(), 4);
    assert_eq!(s.accepted_tokens(), 8);
    assert_eq!(s.drafted_tokens(), 14);
    assert_eq!(s.emitted_tokens(), 12);
    assert!(close(s.tau().unwrap(), 3.0)); // (4 + 1 + 5 + 2) / 4
    assert!(close(s.mean_accepted().unwrap(), 2.0));
    assert!(close(s.acceptance_rate().unwrap(), 8.0 / 14.0));
    assert_eq!(s.histogram(), &[1, 1, 0, 1, 1]);
    // Examined: pos 0 by every round; pos 1 by rounds 1, 3, 4; pos 2, 3 by rounds 1, 3.
    assert_eq!(s.position_examined(), &[4, 3, 2, 2]);
    assert_eq!(s.position_accepted(), &[3, 2, 2, 1]);
    let rates: Vec<f64> = (0..4)
        .map(|i| s.position_acceptance_rate(i).unwrap())
        .collect();
    assert!(close(rates[0], 0.75));
    assert!(close(rates[1], 2.0 / 3.0));
    assert!(close(rates[2], 1.0));
    assert!(close(rates[3], 0.5));
    assert_eq!(s.position_acceptance_rate(4), None);
}

#[test]
fn merge_equals_recording_everything() {
    let mut all = AcceptanceStats::new();
    for (a, n) in ROUNDS {
        all.record(a, n).unwrap();
    }
    for split in 0..=ROUNDS.len() {
        let (mut x, mut y) = (AcceptanceStats::new(), AcceptanceStats::new());
        for &(a, n) in &ROUNDS[..split] {
            x.record(a, n).unwrap();
        }
        for &(a, n) in &ROUNDS[split..] {
            y.record(a, n).unwrap();
        }
        let mut xy = x.clone();
        xy.merge(&y);
        assert_eq!(xy, all, "split {split}");
        y.merge(&x);
        assert_eq!(y, all, "split {split}, reversed");
    }
    let mut e = all.clone();
    e.merge(&AcceptanceStats::new());
    assert_eq!(e, all);
}

#[test]
fn zero_drafts_and_errors() {
    let mut s = AcceptanceStats::new();
    s.record(0, 0).unwrap(); // plain decoding step: τ = 1, nothing examined
    assert_eq!(s.tau(), Some(1.0));
    assert_eq!(s.acceptance_rate(), None);
    assert_eq!(s.position_acceptance_rate(0), None);
    assert_eq!(
        s.record(3, 2),
        Err(AcceptError::AcceptedExceedsDrafted {
            accepted: 3,
            drafted: 2
        })
    );
    assert_eq!(s.rounds(), 1); // the bad round was not recorded
}

#[test]
fn greedy_rounds_feed_stats() {
    let mut s = AcceptanceStats::new();
    let rounds: [(&[u32], &[u32]); 3] = [
        (&[1, 2, 3], &[1, 2, 3, 4]),
        (&[1, 2, 3], &[1, 9, 3, 4]),
        (&[7, 2, 3], &[1, 2, 3, 4]),
    ];
    for (d, t) in rounds {
        let acc = accept_greedy(d, t).unwrap();
        s.record(acc.accepted, d.len()).unwrap();
    }
    assert_eq!(s.histogram(), &[1, 1, 0, 1]);
    assert!(close(s.tau().unwrap(), (4.0 + 2.0 + 1.0) / 3.0));
}
