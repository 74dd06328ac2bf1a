//! Property tests: every plan covers all stages in order with live serving peers, and the view's
//! per-stage pools stay consistent through any sequence of inserts, moves, state changes and
//! removals.

mod common;

use common::*;
use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use swarm_router::{Error, HealthConfig, Outcome, PeerState, PlanConfig, plan};

#[derive(Clone, Debug)]
enum Op {
    Insert {
        id: u8,
        start: u16,
        len: u16,
        compute: f64,
        up: f64,
        state: u8,
    },
    Remove {
        id: u8,
    },
    State {
        id: u8,
        state: u8,
    },
    Move {
        id: u8,
        start: u16,
        len: u16,
    },
    Fail {
        id: u8,
        at: u64,
    },
    Load {
        id: u8,
        delta: i8,
    },
    Observe {
        id: u8,
        s: f64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..40, 0u16..6, 1u16..3, 1.0f64..1e6, 0.1f64..1000.0, 0u8..4)
            .prop_map(|(id, start, len, compute, up, state)| Op::Insert { id, start, len, compute, up, state }),
        1 => (0u8..40).prop_map(|id| Op::Remove { id }),
        1 => (0u8..40, 0u8..3).prop_map(|(id, state)| Op::State { id, state }),
        1 => (0u8..40, 0u16..6, 1u16..3).prop_map(|(id, start, len)| Op::Move { id, start, len }),
        1 => (0u8..40, 0u64..20_000).prop_map(|(id, at)| Op::Fail { id, at }),
        1 => (0u8..40, -3i8..4).prop_map(|(id, delta)| Op::Load { id, delta }),
        1 => (0u8..40, 1e-4f64..100.0).prop_map(|(id, s)| Op::Observe { id, s }),
    ]
}

fn state(s: u8) -> PeerState {
    match s {
        0 => PeerState::Joining,
        3 => PeerState::Leaving,
        _ => PeerState::Serving,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn plans_cover_every_stage_in_order_with_serving_peers(
        stages in 1u16..6,
        ops in prop::collection::vec(op(), 0..120),
        seed in any::<u64>(),
        now in 0u64..20_000,
        k in 1usize..10,
    ) {
        let mut v = view(stages);
        let health = HealthConfig::default();
        for o in ops {
            // Invalid operations must be refused with an error, never a panic or a corrupt view.
            let _ = match o {
                Op::Insert { id, start, len, compute, up, state: s } => {
                    let mut p = peer(start..start + len, compute, up);
                    p.state = state(s);
                    v.insert(key(id), p, 0)
                }
                Op::Remove { id } => v.remove(&key(id)).map(|_| ()),
                Op::State { id, state: s } => v.set_state(&key(id), state(s), 1),
                Op::Move { id, start, len } => v.set_stages(&key(id), start..start + len, PeerState::Serving, 2),
                Op::Fail { id, at } => v.report(&key(id), Outcome::Failure, at, &health),
                Op::Load { id, delta } => { v.add_load(&key(id), i32::from(delta)); Ok(()) }
                Op::Observe { id, s } => v.observe_service(&key(id), s),
            };
        }
        // Pools agree with the peers' records.
        for s in 0..stages {
            let serving: Vec<_> = v.peers()
                .filter(|p| p.info.state == PeerState::Serving && p.info.stages.contains(&s))
                .collect();
            prop_assert_eq!(v.replicas(s), serving.len());
        }
        let cfg = PlanConfig { candidates_per_stage: k, ..PlanConfig::default() };
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        match plan(&v, &client(), now, &cfg, &mut rng) {
            Ok(p) => {
                prop_assert_eq!(p.hops.len(), usize::from(stages));
                prop_assert!(p.expected_s.is_finite() && p.expected_s > 0.0);
                for (i, h) in p.hops.iter().enumerate() {
                    prop_assert_eq!(usize::from(h.stage), i);
                    let info = v.peer(&h.peer).expect("planned peer is in the view").info;
                    prop_assert_eq!(info.state, PeerState::Serving);
                    prop_assert!(info.stages.contains(&h.stage));
                    if let Some(f) = h.fallback {
                        prop_assert_ne!(f, h.peer);
                        let fi = v.peer(&f).expect("fallback is in the view").info;
                        prop_assert_eq!(fi.state, PeerState::Serving);
                        prop_assert!(fi.stages.contains(&h.stage));
                    }
                }
            }
            Err(Error::NoReplica { stage }) => prop_assert_eq!(v.replicas(stage), 0),
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
    }
}
