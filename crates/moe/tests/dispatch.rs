//! Dispatch bookkeeping: the inverse property and errors.

use moe::{route, Dispatch, DispatchEntry, RouterKind, Routing, RoutingError};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn check_inverse(d: &Dispatch, routings: &[Routing], num_experts: usize) {
    assert_eq!(d.num_experts(), num_experts);
    assert_eq!(d.counts().len(), num_experts);
    assert_eq!(d.offsets().len(), num_experts + 1);
    assert_eq!(d.offsets()[0], 0);
    let total: usize = routings.iter().map(|r| r.len()).sum();
    assert_eq!(*d.offsets().last().unwrap(), total);
    assert_eq!(d.entries().len(), total);
    // Every (token, slot) appears exactly once, under the right expert, with its weight.
    let mut seen: Vec<Vec<u32>> = routings.iter().map(|r| vec![0; r.len()]).collect();
    for e in 0..num_experts {
        let list = d.expert_entries(e);
        assert_eq!(list.len(), d.counts()[e]);
        assert_eq!(d.offsets()[e + 1] - d.offsets()[e], d.counts()[e]);
        for w in list.windows(2) {
            assert!(w[0].token < w[1].token, "expert {e}: tokens not ascending");
        }
        for &DispatchEntry {
            token,
            slot,
            weight,
        } in list
        {
            assert_eq!(routings[token].experts[slot], e);
            assert_eq!(routings[token].weights[slot], weight);
            seen[token][slot] += 1;
        }
    }
    assert!(seen.iter().flatten().all(|&n| n == 1));
    // Distinct experts = experts with a non-zero count, ascending.
    let want: Vec<usize> = (0..num_experts).filter(|&e| d.counts()[e] > 0).collect();
    assert_eq!(d.active_experts(), &want[..]);
    let mut distinct: Vec<usize> = routings.iter().flat_map(|r| r.experts.clone()).collect();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(d.active_experts(), &distinct[..]);
    assert!(d.expert_entries(num_experts).is_empty());
}

#[test]
fn inverse_property_random_batches() {
    let mut rng = ChaCha8Rng::seed_from_u64(0xd15b);
    let mut reused = Dispatch::new();
    for case in 0..200 {
        let num_experts = [4usize, 16, 32, 128][case % 4];
        let k = 1 + case % 4.min(num_experts);
        let tokens = case % 41; // includes an empty batch
        let kind = RouterKind::Qwen3Moe {
            norm_topk_prob: true,
        };
        let routings: Vec<Routing> = (0..tokens)
            .map(|_| {
                let logits: Vec<f32> = (0..num_experts)
                    .map(|_| rng.random_range(-3.0..3.0))
                    .collect();
                route(&kind, &logits, k).unwrap()
            })
            .collect();
        let d = Dispatch::build(&routings, num_experts).unwrap();
        check_inverse(&d, &routings, num_experts);
        reused.build_into(&routings, num_experts).unwrap();
        check_inverse(&reused, &routings, num_experts);
    }
}

#[test]
fn hand_built_batch() {
    let routings = vec![
        Routing {
            experts: vec![2, 0],
            weights: vec![0.7, 0.3],
        },
        Routing {
            experts: vec![2, 3],
            weights: vec![0.6, 0.4],
        },
        Routing {
            experts: vec![0, 2],
            weights: vec![0.5, 0.5],
        },
    ];
    let d = Dispatch::build(&routings, 5).unwrap();
    assert_eq!(d.counts(), &[2, 0, 3, 1, 0]);
    assert_eq!(d.offsets(), &[0, 2, 2, 5, 6, 6]);
    assert_eq!(d.active_experts(), &[0, 2, 3]);
    let pairs: Vec<(usize, usize)> = d.entries().iter().map(|x| (x.token, x.slot)).collect();
    assert_eq!(pairs, vec![(0, 1), (2, 0), (0, 0), (1, 0), (2, 1), (1, 1)]);
    check_inverse(&d, &routings, 5);
}

#[test]
fn dispatch_errors() {
    let ok = Routing {
        experts: vec![0, 1],
        weights: vec![0.5, 0.5],
    };
    let mismatch = Routing {
        experts: vec![0, 1],
        weights: vec![1.0],
    };
    assert_eq!(
        Dispatch::build(&[ok.clone(), mismatch], 4).unwrap_err(),
        RoutingError::RoutingLengthMismatch {
            token: 1,
            experts: 2,
            weights: 1
        }
    );
    let out_of_range = Routing {
        experts: vec![4],
        weights: vec![1.0],
    };
    assert_eq!(
        Dispatch::build(&[out_of_range], 4).unwrap_err(),
        RoutingError::ExpertOutOfRange {
            token: 0,
            expert: 4,
            num_experts: 4
        }
    );
    let dup = Routing {
        experts: vec![3, 1, 3],
        weights: vec![0.2, 0.3, 0.5],
    };
    let mut d = Dispatch::build(std::slice::from_ref(&ok), 4).unwrap();
    assert_eq!(
        d.build_into(&[ok, dup], 4).unwrap_err(),
        RoutingError::DuplicateExpert {
            token: 1,
            expert: 3
        }
    );
    // After an error the bookkeeping is empty, not stale.
    assert!(d.entries().is_empty());
    assert!(d.active_experts().is_empty());
    assert!(d.counts().iter().all(|&c| c == 0));
    assert!(d.expert_entries(0).is_empty());
}
