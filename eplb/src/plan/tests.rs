//! Planner properties over many generated inputs, and the acceptance shape (Zipf 1.2, 16 experts,
//! 4 workers × 5 slots) on exact loads.

use super::*;
use crate::replay::imbalance;

fn workers(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("w{i}")).collect()
}

/// A small deterministic generator (SplitMix64), so the properties run over many inputs.
struct Gen(u64);
impl Gen {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn zipf_loads(layers: u32, experts: usize, s: f64, seed: u64) -> LoadMatrix {
    let mut g = Gen(seed);
    let loads = (0..layers)
        .map(|_| {
            let mut perm: Vec<usize> = (0..experts).collect();
            for i in (1..experts).rev() {
                perm.swap(i, g.below(i as u64 + 1) as usize);
            }
            let mut row = vec![0.0; experts];
            for (rank, &e) in perm.iter().enumerate() {
                row[e] = 100_000.0 / ((rank + 1) as f64).powf(s);
            }
            row
        })
        .collect();
    LoadMatrix { layers: (0..layers).collect(), loads }
}

fn check_valid(p: &PlacementMap, loads: &LoadMatrix, ws: &[String], slots: usize) {
    assert_eq!(p.layers.len(), loads.layers.len());
    for l in &p.layers {
        assert_eq!(l.hosts.len(), loads.loads[0].len());
        for (e, hosts) in l.hosts.iter().enumerate() {
            assert!(!hosts.is_empty(), "layer {} expert {e} unplaced", l.layer);
            let set: BTreeSet<&String> = hosts.iter().collect();
            assert_eq!(set.len(), hosts.len(), "layer {} expert {e} twice on a worker", l.layer);
            assert!(hosts.iter().all(|h| ws.contains(h)));
        }
        for w in ws {
            let n = l.hosts.iter().filter(|h| h.contains(w)).count();
            assert!(n <= slots, "layer {}: {w} holds {n} > {slots}", l.layer);
        }
    }
}

#[test]
fn balanced_places_every_expert_within_capacity_and_is_deterministic() {
    let mut g = Gen(7);
    for case in 0..60 {
        let experts = 1 + g.below(40) as usize;
        let n = 1 + g.below(9) as usize;
        let slots = experts.div_ceil(n) + g.below(4) as usize;
        let layers = 1 + g.below(4) as u32;
        let mut loads = zipf_loads(layers, experts, g.below(25) as f64 / 10.0, case);
        // Some zero loads too.
        if case % 3 == 0 {
            loads.loads[0][0] = 0.0;
        }
        let ws = workers(n);
        let a = balanced(&loads, &ws, slots).expect("plan");
        check_valid(&a, &loads, &ws, slots);
        let b = balanced(&loads, &ws, slots).expect("plan");
        assert_eq!(a, b, "case {case}: not deterministic");
    }
}

#[test]
fn cost_aware_points_are_valid_pareto_and_deterministic() {
    let mut g = Gen(11);
    for case in 0..25 {
        let experts = 2 + g.below(24) as usize;
        let n = 1 + g.below(6) as usize;
        let slots = experts.div_ceil(n) + g.below(3) as usize;
        let loads = zipf_loads(2, experts, 1.0 + g.below(10) as f64 / 10.0, 100 + case);
        let ws = workers(n);
        let current = contiguous(&loads.layers, experts, &ws).expect("contiguous");
        let bytes = |_: u32, e: u32| 1000 + u64::from(e);
        let points = cost_aware(&loads, &ws, slots, &current, &bytes, None).expect("plan");
        assert_eq!(points[0].moved_bytes, 0);
        for w in points.windows(2) {
            assert!(w[1].moved_bytes > w[0].moved_bytes);
            assert!(w[1].imbalance_aggregate < w[0].imbalance_aggregate);
        }
        for p in &points {
            check_valid(&p.placement, &loads, &ws, slots);
            assert_eq!(moved_bytes(&current, &p.placement, &bytes), p.moved_bytes);
            let replayed = imbalance(&loads, &p.placement).expect("replay");
            assert!((replayed - p.imbalance_aggregate).abs() < 1e-9);
        }
        let again = cost_aware(&loads, &ws, slots, &current, &bytes, None).expect("plan");
        assert_eq!(points.len(), again.len());
        assert!(points.iter().zip(&again).all(|(a, b)| a.placement == b.placement));
        // A budget is respected.
        let budget = 2500;
        let capped = cost_aware(&loads, &ws, slots, &current, &bytes, Some(budget)).expect("plan");
        assert!(capped.iter().all(|p| p.moved_bytes <= budget));
    }
}

#[test]
fn zipf_1_2_acceptance_shape_on_exact_loads() {
    let loads = zipf_loads(8, 16, 1.2, 42);
    let ws = workers(4);
    let current = contiguous(&loads.layers, 16, &ws).expect("contiguous");
    let contiguous_imbalance = imbalance(&loads, &current).expect("replay");
    let plan = balanced(&loads, &ws, 5).expect("plan");
    let balanced_imbalance = imbalance(&loads, &plan).expect("replay");
    assert!(balanced_imbalance <= 1.05, "balanced {balanced_imbalance}");
    assert!(contiguous_imbalance > 1.3, "contiguous {contiguous_imbalance}");
    let bytes = |_: u32, _: u32| 3 << 20;
    let aligned = align_to(&plan, &current, &ws, &bytes);
    assert_eq!(imbalance(&loads, &aligned).expect("replay"), balanced_imbalance);
    let balanced_bytes = moved_bytes(&current, &aligned, &bytes);
    let points = cost_aware(&loads, &ws, 5, &current, &bytes, None).expect("plan");
    for p in &points {
        eprintln!("{} MiB: {:.4}", p.moved_bytes >> 20, p.imbalance_aggregate);
    }
    eprintln!("contiguous {contiguous_imbalance:.4} balanced {balanced_imbalance:.4} ({} MiB)", balanced_bytes >> 20);
    let chosen = choose(&points, Some(balanced_imbalance), 0.05).expect("points");
    let strict = choose(&points, None, 0.05).expect("points");
    assert!(strict.moved_bytes >= chosen.moved_bytes, "the best point is at most the balanced plan's imbalance");
    assert!(chosen.imbalance_aggregate <= balanced_imbalance + 0.05, "{}", chosen.imbalance_aggregate);
    // Issue 17's aim: within 0.05 of balanced for at most 30 % of its bytes (72 of 279 MiB here).
    assert!(
        chosen.moved_bytes * 10 <= balanced_bytes * 3,
        "cost-aware moved {} of balanced's {balanced_bytes}",
        chosen.moved_bytes
    );
}

#[test]
fn bad_arguments_are_errors() {
    let loads = zipf_loads(1, 16, 1.0, 1);
    assert!(matches!(balanced(&loads, &workers(3), 5), Err(PlanError::TooFewSlots { .. })));
    assert!(matches!(balanced(&loads, &[], 5), Err(PlanError::NoWorkers)));
    assert!(matches!(balanced(&loads, &workers(4), 0), Err(PlanError::NoSlots)));
    let dup = vec!["a".to_owned(), "a".to_owned()];
    assert!(matches!(balanced(&loads, &dup, 8), Err(PlanError::DuplicateWorker(_))));
    let mut nan = loads.clone();
    nan.loads[0][3] = f64::NAN;
    assert!(matches!(balanced(&nan, &workers(4), 4), Err(PlanError::BadLoad { expert: 3, .. })));
    let other = contiguous(&loads.layers, 16, &["x".to_owned(), "y".to_owned()]).expect("contiguous");
    let err = cost_aware(&loads, &workers(4), 8, &other, &|_, _| 1, None);
    assert!(matches!(err, Err(PlanError::Current(_))), "{err:?}");
    let too_full = contiguous(&loads.layers, 16, &workers(4)).expect("contiguous");
    let err = cost_aware(&loads, &workers(4), 3, &too_full, &|_, _| 1, None);
    assert!(err.is_err());
}
