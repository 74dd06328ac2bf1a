use std::net::SocketAddr;

use super::*;

fn p(i: u8) -> PeerId {
    PeerId([i; 32])
}

fn ep(i: u8) -> Endpoint {
    Endpoint {
        peer: p(i),
        addr: SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16)),
    }
}

fn holders(served: Option<u8>, replicas: &[u8], agreed: Option<u8>) -> StageHolders {
    StageHolders {
        served: served.map(|d| [d; 32]),
        replicas: replicas.iter().map(|&i| ep(i)).collect(),
        agreed: agreed.map(|d| [d; 32]),
    }
}

/// The trainer's own copy first (a checkpoint, a hand-off), then the seed of a fresh run
/// between steps, then the replicas with the agreed digest; nothing unverified otherwise.
#[test]
fn a_load_comes_from_a_verified_holder_or_the_seed() {
    let trainer = ep(0);
    assert_eq!(
        state_source(trainer, holders(Some(7), &[1], Some(8)), false, true),
        StateSource::Fetch {
            from: vec![trainer],
            digest: [7; 32]
        }
    );
    assert_eq!(
        state_source(trainer, holders(None, &[1], Some(8)), true, false),
        StateSource::Init
    );
    assert_eq!(
        state_source(trainer, holders(None, &[1, 2], Some(8)), true, true),
        StateSource::Fetch {
            from: vec![ep(1), ep(2)],
            digest: [8; 32]
        },
        "mid-step in a fresh run the replicas may have moved on"
    );
    assert_eq!(
        state_source(trainer, holders(None, &[], None), true, true),
        StateSource::Init
    );
    assert_eq!(
        state_source(trainer, holders(None, &[1], None), false, false),
        StateSource::Fetch {
            from: vec![ep(1)],
            digest: [0; 32]
        },
        "no agreed digest: a load that fails verification, never an unchecked one"
    );
}

#[test]
fn a_reset_returns_to_the_replica_own_state_only_while_replicas_drift() {
    let (own, agreed) = (Some([1; 32]), Some([2; 32]));
    assert_eq!(reset_digest(false, false, own, agreed), agreed);
    assert_eq!(reset_digest(false, true, own, agreed), own);
    assert_eq!(reset_digest(false, true, None, agreed), agreed);
    assert_eq!(reset_digest(true, true, own, agreed), None, "the seed's");
}

/// The odd one out reloads the majority's state at the step reached; a replica excluded from
/// the step reloads too (or is released while replicas drift); a local round compares nothing.
#[test]
fn after_an_apply_the_odd_ones_out_and_the_excluded_reload() {
    let applied = vec![
        vec![(p(1), [5; 32]), (p(2), [5; 32]), (p(3), [6; 32])],
        vec![(p(4), [9; 32])],
    ];
    let v = apply_verdict(SyncPhase::Gradient, false, 10, &applied, &[(1, p(5))]);
    assert_eq!(v.agreed, vec![Some([5; 32]), Some([9; 32])]);
    assert_eq!(v.reload, vec![(0, p(3), 11), (1, p(5), 11)]);
    assert!(v.release.is_empty());
    assert_eq!(v.mismatches, 1);

    // An outer round's step is the state step itself.
    let v = apply_verdict(SyncPhase::Outer, true, 12, &applied, &[]);
    assert_eq!(v.reload, vec![(0, p(3), 12)]);

    let v = apply_verdict(SyncPhase::Local, true, 10, &applied, &[(1, p(5))]);
    assert_eq!(v.agreed, vec![None, None]);
    assert!(v.reload.is_empty());
    assert_eq!(v.release, vec![(1, p(5))]);
    assert_eq!(v.mismatches, 0);
}

/// The last replica of a stage hands its state off before it goes; a failed hand-off is tried
/// from the stage's next last leaver; one that succeeded is not repeated; others just leave.
#[test]
fn the_last_leaver_of_a_stage_hands_its_state_off_once() {
    let leavers = vec![
        Leaver {
            stage: 0,
            peer: p(1),
            last: true,
        },
        Leaver {
            stage: 0,
            peer: p(2),
            last: true,
        },
        Leaver {
            stage: 0,
            peer: p(3),
            last: true,
        },
        Leaver {
            stage: 1,
            peer: p(4),
            last: false,
        },
        Leaver {
            stage: 2,
            peer: p(5),
            last: true,
        },
    ];
    let mut l = Leavers::new(true, leavers, BTreeSet::from([2]));
    assert_eq!(
        l.poll_action(),
        Some(LeaveAction::HandOff {
            stage: 0,
            peer: p(1)
        })
    );
    assert_eq!(l.poll_action(), None, "waits for the hand-off");
    l.handed_off(false);
    assert_eq!(
        l.poll_action(),
        Some(LeaveAction::Release {
            stage: 0,
            peer: p(1),
            handed_off: false
        })
    );
    assert_eq!(
        l.poll_action(),
        Some(LeaveAction::HandOff {
            stage: 0,
            peer: p(2)
        })
    );
    l.handed_off(true);
    let rest: Vec<LeaveAction> = std::iter::from_fn(|| l.poll_action()).collect();
    assert_eq!(
        rest,
        vec![
            LeaveAction::Release {
                stage: 0,
                peer: p(2),
                handed_off: true
            },
            LeaveAction::Release {
                stage: 0,
                peer: p(3),
                handed_off: false
            },
            LeaveAction::Release {
                stage: 1,
                peer: p(4),
                handed_off: false
            },
            // The trainer already serves stage 2's state.
            LeaveAction::Release {
                stage: 2,
                peer: p(5),
                handed_off: false
            },
        ]
    );

    // Between the sync boundaries of a multi-step sync nobody leaves.
    let mut l = Leavers::new(
        false,
        vec![Leaver {
            stage: 0,
            peer: p(1),
            last: true,
        }],
        BTreeSet::new(),
    );
    assert_eq!(l.poll_action(), None);
}

/// A joiner's `Ready` with the stage's current state makes it serve (its digest adopted when the
/// stage had none); the wrong step or digest reloads it; a second report, a leaver's or a
/// stranger's changes nothing.
#[test]
fn a_ready_serves_reloads_or_is_ignored() {
    use ReplicaState::*;
    let (d, other) = ([1; 32], [2; 32]);
    assert_eq!(
        ready_verdict(Some(Joining), 5, d, 5, Some(d)),
        ReadyVerdict::Serve { adopt: false }
    );
    assert_eq!(
        ready_verdict(Some(Joining), 0, d, 0, None),
        ReadyVerdict::Serve { adopt: true }
    );
    assert_eq!(
        ready_verdict(Some(Joining), 4, d, 5, Some(d)),
        ReadyVerdict::Reload
    );
    assert_eq!(
        ready_verdict(Some(Joining), 5, other, 5, Some(d)),
        ReadyVerdict::Reload
    );
    assert_eq!(
        ready_verdict(Some(Serving), 5, other, 5, Some(d)),
        ReadyVerdict::Reload
    );
    assert_eq!(
        ready_verdict(Some(Serving), 5, d, 5, Some(d)),
        ReadyVerdict::Ignore
    );
    assert_eq!(
        ready_verdict(Some(Leaving), 5, d, 5, Some(d)),
        ReadyVerdict::Ignore
    );
    assert_eq!(ready_verdict(None, 5, d, 5, Some(d)), ReadyVerdict::Ignore);
}

/// A stage's state is lost only when nobody holds it: no serving or leaving replica, and no
/// copy of the trainer's at the current step.
#[test]
fn a_stage_state_is_lost_only_without_any_holder() {
    assert!(state_lost(0, false));
    assert!(!state_lost(1, false));
    assert!(
        !state_lost(0, true),
        "the trainer serves it (a checkpoint, a hand-off)"
    );
}
