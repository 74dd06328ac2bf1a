//! Hand-checked planning cases: slow links avoided, load spread, bans, lone replicas, fallbacks.

mod common;

use common::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use swarm_router::{
    Coord, Error, HealthConfig, Outcome, PeerState, Plan, PlanConfig, plan, replacement,
};

fn count(plans: &[Plan], stage: usize, k: swarm_router::PeerKey) -> usize {
    plans.iter().filter(|p| p.hops[stage].peer == k).count()
}

#[test]
fn slow_link_is_avoided() {
    let mut v = view(2);
    // Same compute; peer 2's 1 Mbit/s link makes each hop ~2 s instead of ~10 ms.
    v.insert(key(1), peer(0..1, 50_000.0, 100.0), 0).unwrap();
    v.insert(key(2), peer(0..1, 50_000.0, 1.0), 0).unwrap();
    v.insert(key(3), peer(1..2, 50_000.0, 100.0), 0).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for _ in 0..200 {
        let p = plan(&v, &client(), 0, &PlanConfig::default(), &mut rng).unwrap();
        assert_eq!(p.hops[0].peer, key(1));
        assert_eq!(p.hops[0].fallback, Some(key(2)));
        assert_eq!(p.hops[1].peer, key(3));
        assert_eq!(p.hops[1].fallback, None, "lone replica has no fallback");
    }
}

#[test]
fn far_peer_is_avoided_when_links_are_equal() {
    let mut v = view(1);
    let mut near = peer(0..1, 50_000.0, 100.0);
    near.link.coord = Coord {
        x_ms: 5.0,
        y_ms: 0.0,
        height_ms: 1.0,
    };
    let mut far = peer(0..1, 50_000.0, 100.0);
    far.link.coord = Coord {
        x_ms: 250.0,
        y_ms: 0.0,
        height_ms: 1.0,
    };
    v.insert(key(1), far, 0).unwrap();
    v.insert(key(2), near, 0).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for _ in 0..50 {
        let p = plan(&v, &client(), 0, &PlanConfig::default(), &mut rng).unwrap();
        assert_eq!(p.hops[0].peer, key(2));
    }
    // A measured RTT overrides the coordinates.
    v.set_rtt(&key(2), &key(1), 0.0).unwrap();
    assert!(v.set_rtt(&key(2), &key(9), 1.0).is_err());
    assert!(v.set_rtt(&key(2), &key(1), f64::NAN).is_err());
}

/// The demo's shape: 2 stages x 2 equal replicas. Dispatching with load reports alternates.
#[test]
fn load_spreads_over_equal_replicas() {
    let mut v = view(2);
    for (i, s) in [(1, 0), (2, 0), (3, 1), (4, 1)] {
        v.insert(key(i), peer(s..s + 1, 50_000.0, 100.0), 0)
            .unwrap();
    }
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut in_flight = std::collections::VecDeque::new();
    let mut plans = Vec::new();
    for _ in 0..400 {
        let p = plan(&v, &client(), 0, &PlanConfig::default(), &mut rng).unwrap();
        v.note_dispatched(&p);
        in_flight.push_back(p.clone());
        plans.push(p);
        if in_flight.len() > 6 {
            for h in in_flight.pop_front().unwrap().hops {
                v.add_load(&h.peer, -1);
            }
        }
    }
    for (stage, a, b) in [(0, 1, 2), (1, 3, 4)] {
        let (na, nb) = (count(&plans, stage, key(a)), count(&plans, stage, key(b)));
        assert_eq!(na + nb, 400);
        assert!((190..=210).contains(&na), "stage {stage}: {na} vs {nb}");
    }
}

/// Many micro-batches planned at once, before any load is reported, still split between equal
/// replicas (ties are broken at random), instead of piling onto one.
#[test]
fn concurrent_plans_without_load_reports_split_ties() {
    let mut v = view(2);
    for (i, s) in [(1, 0), (2, 0), (3, 1), (4, 1)] {
        v.insert(key(i), peer(s..s + 1, 50_000.0, 100.0), 0)
            .unwrap();
    }
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let plans: Vec<Plan> = (0..400)
        .map(|_| plan(&v, &client(), 0, &PlanConfig::default(), &mut rng).unwrap())
        .collect();
    let n1 = count(&plans, 0, key(1));
    assert!((140..=260).contains(&n1), "{n1} of 400");
}

/// With load reports, replicas receive work in proportion to their capacity.
#[test]
fn load_spreads_in_proportion_to_capacity() {
    let mut v = view(1);
    // Compute-bound peers (fast links): capacities 1 : 2 : 3.
    for (i, c) in [(1u8, 10_000.0), (2, 20_000.0), (3, 30_000.0)] {
        v.insert(key(i), peer(0..1, c, 10_000.0), 0).unwrap();
    }
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    // Each peer finishes its queue at its own speed: a small fluid model with 1 ms ticks.
    let service = |i: u8| 128.0 / (10_000.0 * f64::from(i));
    let mut queue = [0u32; 3];
    let mut busy = [0.0f64; 3];
    let mut done = [0u32; 3];
    for _ in 0..3000 {
        while queue.iter().sum::<u32>() < 12 {
            let p = plan(&v, &client(), 0, &PlanConfig::default(), &mut rng).unwrap();
            v.note_dispatched(&p);
            queue[usize::from(p.hops[0].peer.0[0] - 1)] += 1;
        }
        for i in 0..3 {
            busy[i] += 0.001;
            let s = service(i as u8 + 1);
            while queue[i] > 0 && busy[i] >= s {
                busy[i] -= s;
                queue[i] -= 1;
                done[i] += 1;
                v.add_load(&key(i as u8 + 1), -1);
            }
            if queue[i] == 0 {
                busy[i] = 0.0;
            }
        }
    }
    let total: u32 = done.iter().sum();
    for (i, want) in [(0, 1.0 / 6.0), (1, 2.0 / 6.0), (2, 3.0 / 6.0)] {
        let share = f64::from(done[i]) / f64::from(total);
        assert!(
            (share - want).abs() < 0.05,
            "peer {i}: share {share:.3}, want {want:.3}: {done:?}"
        );
    }
}

#[test]
fn banned_peer_is_skipped_until_the_ban_ends_and_success_clears_it() {
    let cfg = HealthConfig {
        base_ban_ms: 1_000,
        max_ban_ms: 60_000,
    };
    let mut v = view(1);
    v.insert(key(1), peer(0..1, 50_000.0, 100.0), 0).unwrap();
    v.insert(key(2), peer(0..1, 50_000.0, 100.0), 0).unwrap();
    v.report(&key(1), Outcome::Failure, 10_000, &cfg).unwrap();
    v.report(&key(1), Outcome::Timeout, 10_000, &cfg).unwrap(); // banned until 12_000
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    for _ in 0..100 {
        let p = plan(&v, &client(), 11_999, &PlanConfig::default(), &mut rng).unwrap();
        assert_eq!(p.hops[0].peer, key(2));
        assert_eq!(p.hops[0].fallback, None, "a banned peer is not a fallback");
    }
    // Ban over, but two recent failures: the equally fast healthy peer is preferred.
    for _ in 0..100 {
        let p = plan(&v, &client(), 12_000, &PlanConfig::default(), &mut rng).unwrap();
        assert_eq!(p.hops[0].peer, key(2));
        assert_eq!(p.hops[0].fallback, Some(key(1)));
    }
    v.report(&key(1), Outcome::Success, 12_500, &cfg).unwrap();
    let plans: Vec<Plan> = (0..200)
        .map(|_| plan(&v, &client(), 13_000, &PlanConfig::default(), &mut rng).unwrap())
        .collect();
    let n1 = count(&plans, 0, key(1));
    assert!(
        (60..=140).contains(&n1),
        "after success both are used: {n1}/200"
    );
}

#[test]
fn banned_lone_replica_is_still_used() {
    let cfg = HealthConfig::default();
    let mut v = view(2);
    v.insert(key(1), peer(0..1, 50_000.0, 100.0), 0).unwrap();
    v.insert(key(2), peer(1..2, 50_000.0, 100.0), 0).unwrap();
    v.report(&key(2), Outcome::Failure, 0, &cfg).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let p = plan(&v, &client(), 1, &PlanConfig::default(), &mut rng).unwrap();
    assert_eq!(p.hops[1].peer, key(2));
}

#[test]
fn bans_in_a_large_stage_are_skipped_by_sampling() {
    let cfg = HealthConfig::default();
    let mut v = view(1);
    for i in 0..100u8 {
        v.insert(key(i), peer(0..1, 50_000.0, 100.0), 0).unwrap();
    }
    // Ban all but two: the sampler must still find the healthy ones.
    for i in 2..100u8 {
        v.report(&key(i), Outcome::Failure, 0, &cfg).unwrap();
    }
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    for _ in 0..50 {
        let p = plan(&v, &client(), 1, &PlanConfig::default(), &mut rng).unwrap();
        assert!(p.hops[0].peer == key(0) || p.hops[0].peer == key(1));
    }
    // All banned: bans are ignored rather than leaving the stage empty.
    v.report(&key(0), Outcome::Failure, 0, &cfg).unwrap();
    v.report(&key(1), Outcome::Failure, 0, &cfg).unwrap();
    assert!(plan(&v, &client(), 1, &PlanConfig::default(), &mut rng).is_ok());
}

#[test]
fn fallback_is_the_next_best_replica() {
    let mut v = view(1);
    v.insert(key(1), peer(0..1, 10_000.0, 10_000.0), 0).unwrap();
    v.insert(key(2), peer(0..1, 40_000.0, 10_000.0), 0).unwrap();
    v.insert(key(3), peer(0..1, 20_000.0, 10_000.0), 0).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let p = plan(&v, &client(), 0, &PlanConfig::default(), &mut rng).unwrap();
    assert_eq!(p.hops[0].peer, key(2));
    assert_eq!(p.hops[0].fallback, Some(key(3)));
    // Compute-bound: 128 tokens / 40k tok/s = 3.2 ms plus transfers and zero RTT.
    assert!(
        p.expected_s > 0.0032 && p.expected_s < 0.01,
        "{}",
        p.expected_s
    );
    // With the best and its fallback gone, a replacement is the remaining one.
    let r = replacement(
        &v,
        &client(),
        0,
        None,
        None,
        &[key(2), key(3)],
        0,
        &PlanConfig::default(),
        &mut rng,
    );
    assert_eq!(r, Ok(key(1)));
    let r = replacement(
        &v,
        &client(),
        0,
        None,
        None,
        &[key(1), key(2), key(3)],
        0,
        &PlanConfig::default(),
        &mut rng,
    );
    assert_eq!(r, Err(Error::NoReplica { stage: 0 }));
    let r = replacement(
        &v,
        &client(),
        5,
        None,
        None,
        &[],
        0,
        &PlanConfig::default(),
        &mut rng,
    );
    assert!(matches!(r, Err(Error::InvalidStage { .. })));
}

#[test]
fn a_multi_stage_peer_saves_the_transfer() {
    let mut v = view(2);
    v.insert(key(1), peer(0..2, 100_000.0, 20.0), 0).unwrap();
    v.insert(key(2), peer(0..1, 100_000.0, 20.0), 0).unwrap();
    v.insert(key(3), peer(1..2, 100_000.0, 20.0), 0).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    let p = plan(&v, &client(), 0, &PlanConfig::default(), &mut rng).unwrap();
    assert_eq!((p.hops[0].peer, p.hops[1].peer), (key(1), key(1)));
}

#[test]
fn uncovered_stage_and_non_serving_peers_are_errors_not_routes() {
    let mut v = view(2);
    v.insert(key(1), peer(0..1, 50_000.0, 100.0), 0).unwrap();
    let mut joining = peer(1..2, 50_000.0, 100.0);
    joining.state = PeerState::Joining;
    v.insert(key(2), joining, 0).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let cfg = PlanConfig::default();
    assert_eq!(
        plan(&v, &client(), 0, &cfg, &mut rng),
        Err(Error::NoReplica { stage: 1 })
    );
    v.set_state(&key(2), PeerState::Serving, 5).unwrap();
    assert_eq!(
        plan(&v, &client(), 0, &cfg, &mut rng).unwrap().hops[1].peer,
        key(2)
    );
    v.set_state(&key(2), PeerState::Leaving, 6).unwrap();
    assert_eq!(
        plan(&v, &client(), 0, &cfg, &mut rng),
        Err(Error::NoReplica { stage: 1 })
    );
    v.remove(&key(1)).unwrap();
    assert_eq!(
        plan(&v, &client(), 0, &cfg, &mut rng),
        Err(Error::NoReplica { stage: 0 })
    );
    let bad = PlanConfig {
        candidates_per_stage: 0,
        ..PlanConfig::default()
    };
    assert!(matches!(
        plan(&v, &client(), 0, &bad, &mut rng),
        Err(Error::InvalidConfig(_))
    ));
}

#[test]
fn view_rejects_bad_input() {
    let mut v = view(2);
    assert!(swarm_router::SwarmView::new(0, WL).is_err());
    let zero = swarm_router::Workload { tokens: 0, ..WL };
    assert!(swarm_router::SwarmView::new(2, zero).is_err());
    v.insert(key(1), peer(0..1, 1.0, 1.0), 0).unwrap();
    assert_eq!(
        v.insert(key(1), peer(0..1, 1.0, 1.0), 0),
        Err(Error::DuplicatePeer(key(1)))
    );
    assert!(matches!(
        v.insert(key(2), peer(1..3, 1.0, 1.0), 0),
        Err(Error::InvalidStage { .. })
    ));
    assert!(matches!(
        v.insert(key(2), peer(1..1, 1.0, 1.0), 0),
        Err(Error::InvalidStage { .. })
    ));
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        assert!(matches!(
            v.insert(key(2), peer(0..1, bad, 1.0), 0),
            Err(Error::InvalidMeasurement { .. })
        ));
        assert!(v.update_measurements(&key(1), bad, link(1.0, 1.0)).is_err());
        assert!(v.observe_service(&key(1), bad).is_err());
    }
    let mut nan_coord = peer(0..1, 1.0, 1.0);
    nan_coord.link.coord.x_ms = f32::NAN;
    assert!(v.insert(key(2), nan_coord, 0).is_err());
    assert_eq!(v.remove(&key(9)), Err(Error::UnknownPeer(key(9))));
    assert!(
        v.report(&key(9), Outcome::Success, 0, &HealthConfig::default())
            .is_err()
    );
    assert!(v.set_stages(&key(1), 0..3, PeerState::Serving, 0).is_err());
    assert_eq!(v.len(), 1);
}

#[test]
fn observed_service_corrects_a_wrong_announcement() {
    let mut v = view(1);
    // Peer 1 announces 4x its real speed; peer 2 is honest and truly faster.
    v.insert(key(1), peer(0..1, 40_000.0, 10_000.0), 0).unwrap();
    v.insert(key(2), peer(0..1, 20_000.0, 10_000.0), 0).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let cfg = PlanConfig::default();
    assert_eq!(
        plan(&v, &client(), 0, &cfg, &mut rng).unwrap().hops[0].peer,
        key(1)
    );
    let before = v.serving_capacity(0);
    for _ in 0..20 {
        v.observe_service(&key(1), 128.0 / 10_000.0).unwrap();
    }
    assert_eq!(
        plan(&v, &client(), 0, &cfg, &mut rng).unwrap().hops[0].peer,
        key(2)
    );
    assert!(v.serving_capacity(0) < before * 0.7);
}

/// A relayed replica (its link capped by the relay's per-peer rate, its RTTs longer by the detour)
/// gets less of a stage's work than an equal direct one, but still some: SWARM's capacity-weighted
/// wiring keeps it busy in proportion to what it can do.
#[test]
fn a_relayed_replica_gets_less_work() {
    let mut v = view(2);
    v.insert(key(1), peer(0..1, 50_000.0, 100.0), 0).unwrap();
    let mut relayed = peer(0..1, 50_000.0, 100.0);
    relayed.link = relayed.link.relayed(mbit(50.0), 20.0);
    assert_eq!(relayed.link.up_bytes_per_s, mbit(50.0));
    assert_eq!(relayed.link.coord.height_ms, 20.0);
    v.insert(key(2), relayed, 0).unwrap();
    v.insert(key(3), peer(1..2, 50_000.0, 100.0), 0).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let mut in_flight = std::collections::VecDeque::new();
    let mut plans = Vec::new();
    for _ in 0..400 {
        let p = plan(&v, &client(), 0, &PlanConfig::default(), &mut rng).unwrap();
        v.note_dispatched(&p);
        in_flight.push_back(p.clone());
        plans.push(p);
        if in_flight.len() > 12 {
            for h in in_flight.pop_front().unwrap().hops {
                v.add_load(&h.peer, -1);
            }
        }
    }
    let (direct, relayed) = (count(&plans, 0, key(1)), count(&plans, 0, key(2)));
    eprintln!("direct {direct}, relayed {relayed}");
    assert!(direct > 2 * relayed, "direct {direct}, relayed {relayed}");
    assert!(relayed > 0, "the relayed replica got no work at all");
}
