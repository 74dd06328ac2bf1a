//! Stage choice for joiners and the rebalancing rule.

mod common;

use common::*;
use swarm_router::{PeerState, RebalanceConfig, choose_stages, should_move};

#[test]
fn joiner_takes_the_stage_with_least_capacity() {
    let mut v = view(3);
    // Empty swarm: the first stage, then the next empty one.
    assert_eq!(choose_stages(&v, 1, None).unwrap(), 0..1);
    v.insert(key(1), peer(0..1, 20_000.0, 10_000.0), 0).unwrap();
    assert_eq!(choose_stages(&v, 1, None).unwrap(), 1..2);
    v.insert(key(2), peer(1..2, 10_000.0, 10_000.0), 0).unwrap();
    v.insert(key(3), peer(2..3, 30_000.0, 10_000.0), 0).unwrap();
    assert_eq!(choose_stages(&v, 1, None).unwrap(), 1..2);
    // A peer already joining stage 1 counts: the next joiner goes elsewhere.
    let mut joining = peer(1..2, 40_000.0, 10_000.0);
    joining.state = PeerState::Joining;
    v.insert(key(4), joining, 0).unwrap();
    assert_eq!(choose_stages(&v, 1, None).unwrap(), 0..1);
    // Demand: stage 2 costs 4x as much, so it is the weakest relative to demand.
    assert_eq!(choose_stages(&v, 1, Some(&[1.0, 1.0, 4.0])).unwrap(), 2..3);
    assert!(choose_stages(&v, 1, Some(&[1.0, 1.0])).is_err());
    assert!(choose_stages(&v, 1, Some(&[1.0, f64::NAN, 1.0])).is_err());
}

#[test]
fn multi_stage_joiner_takes_the_weakest_window() {
    let mut v = view(4);
    for (i, s, c) in [
        (1, 0, 10_000.0),
        (2, 1, 40_000.0),
        (3, 2, 20_000.0),
        (4, 3, 30_000.0),
    ] {
        v.insert(key(i), peer(s..s + 1, c, 10_000.0), 0).unwrap();
    }
    // Windows sorted: [1,4], [2,4], [2,3]: the first holds the weakest stage.
    assert_eq!(choose_stages(&v, 2, None).unwrap(), 0..2);
    assert_eq!(choose_stages(&v, 4, None).unwrap(), 0..4);
    assert!(choose_stages(&v, 5, None).is_err());
    assert!(choose_stages(&v, 0, None).is_err());
}

fn lopsided() -> swarm_router::SwarmView {
    // Stage 0: five peers; stage 1: one. Moving one peer from 0 to 1 doubles the bottleneck.
    let mut v = view(2);
    for i in 0..5 {
        v.insert(key(i), peer(0..1, 10_000.0, 10_000.0), 0).unwrap();
    }
    v.insert(key(9), peer(1..2, 10_000.0, 10_000.0), 0).unwrap();
    v
}

#[test]
fn a_peer_moves_to_the_bottleneck_when_it_pays() {
    let v = lopsided();
    let cfg = RebalanceConfig {
        stage_state_bytes: 1e9,
        ..RebalanceConfig::default()
    };
    let mv = should_move(&v, &key(0), cfg.min_dwell_ms, &cfg)
        .unwrap()
        .expect("should move");
    assert_eq!(mv.to, 1..2);
    assert!((mv.after / mv.before - 2.0).abs() < 1e-9, "{mv:?}");
    // 1 GB over a 10 Gbit/s link.
    assert!((mv.download_s - 0.8).abs() < 1e-9);
    // The lone replica of stage 1 never moves: it would empty its stage.
    assert_eq!(
        should_move(&v, &key(9), cfg.min_dwell_ms, &cfg).unwrap(),
        None
    );
}

#[test]
fn moves_are_debounced_and_costed() {
    let v = lopsided();
    let cfg = RebalanceConfig {
        stage_state_bytes: 1e9,
        ..RebalanceConfig::default()
    };
    // Too soon after joining.
    assert_eq!(
        should_move(&v, &key(0), cfg.min_dwell_ms - 1, &cfg).unwrap(),
        None
    );
    // A balanced swarm: moving only creates a new bottleneck.
    let mut b = view(2);
    for i in 0..3 {
        b.insert(key(i), peer(0..1, 10_000.0, 10_000.0), 0).unwrap();
        b.insert(key(10 + i), peer(1..2, 10_000.0, 10_000.0), 0)
            .unwrap();
    }
    assert_eq!(
        should_move(&b, &key(0), cfg.min_dwell_ms, &cfg).unwrap(),
        None,
        "no gain"
    );
    // A gain below the threshold is ignored.
    let strict = RebalanceConfig {
        min_relative_gain: 1.5,
        ..cfg.clone()
    };
    assert_eq!(
        should_move(&v, &key(0), strict.min_dwell_ms, &strict).unwrap(),
        None
    );
    // A peer expected to leave before its download (1 GB at 1 Mbit/s = 8000 s) ends never moves.
    let mut c = view(2);
    for i in 1..4 {
        c.insert(key(i), peer(0..1, 10_000.0, 1.0), 0).unwrap();
    }
    c.insert(key(4), peer(1..2, 10_000.0, 1.0), 0).unwrap();
    let short = RebalanceConfig {
        horizon_s: 7_999.0,
        min_dwell_ms: 0,
        ..cfg.clone()
    };
    let long = RebalanceConfig {
        horizon_s: 8_001.0,
        min_dwell_ms: 0,
        ..cfg.clone()
    };
    assert_eq!(should_move(&c, &key(1), 0, &short).unwrap(), None);
    assert!(should_move(&c, &key(1), 0, &long).unwrap().is_some());
    assert!(should_move(&c, &key(77), 0, &cfg).is_err());
}
