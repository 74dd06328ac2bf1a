//! The order of a restore (`swarm/tests/trainer_restore*.rs` run it with real peers): from a
//! checkpoint, from the seed, a foreign checkpoint, answers out of order.

use super::*;

const RUN: RunId = RunId([1; 16]);

fn all(r: &mut Restore) -> Vec<RestoreAction> {
    std::iter::from_fn(|| r.poll_action()).take(20).collect()
}

#[test]
fn a_restore_from_a_checkpoint_reloads_every_replica_at_its_step() {
    let (a, b, c) = (PeerId([1; 32]), PeerId([2; 32]), PeerId([3; 32]));
    let mut r = Restore::new(RUN);
    assert_eq!(all(&mut r), vec![RestoreAction::Load]);
    r.handle(RestoreEvent::Loaded(Some(Found { run: RUN, step: 6 })));
    assert_eq!(
        all(&mut r),
        vec![RestoreAction::Install {
            step: 6,
            from_checkpoint: true
        }]
    );
    r.handle(RestoreEvent::Installed {
        epoch: 3,
        replicas: vec![(0, a), (0, b), (1, c)],
    });
    assert_eq!(
        all(&mut r),
        vec![RestoreAction::Drain],
        "old messages first"
    );
    r.handle(RestoreEvent::Drained);
    assert_eq!(
        all(&mut r),
        vec![
            RestoreAction::Reload {
                stage: 0,
                peer: a,
                step: 6
            },
            RestoreAction::Reload {
                stage: 0,
                peer: b,
                step: 6
            },
            RestoreAction::Reload {
                stage: 1,
                peer: c,
                step: 6
            },
            RestoreAction::Trim { step: 6 },
            RestoreAction::Announce {
                step: 6,
                epoch: 3,
                from_checkpoint: true
            },
        ]
    );
    assert_eq!(all(&mut r), vec![], "done");
}

#[test]
fn without_a_checkpoint_the_run_restarts_from_the_seed() {
    let mut r = Restore::new(RUN);
    assert_eq!(all(&mut r), vec![RestoreAction::Load]);
    r.handle(RestoreEvent::Loaded(None));
    assert_eq!(
        all(&mut r),
        vec![RestoreAction::Install {
            step: 0,
            from_checkpoint: false
        }]
    );
    r.handle(RestoreEvent::Installed {
        epoch: 1,
        replicas: vec![],
    });
    assert_eq!(all(&mut r), vec![RestoreAction::Drain]);
    r.handle(RestoreEvent::Drained);
    assert_eq!(
        all(&mut r),
        vec![
            RestoreAction::Trim { step: 0 },
            RestoreAction::Announce {
                step: 0,
                epoch: 1,
                from_checkpoint: false
            },
        ],
        "no replica left: nothing to reload"
    );
}

#[test]
fn a_checkpoint_of_another_run_fails_the_restore_before_anything_changes() {
    let other = RunId([2; 16]);
    let mut r = Restore::new(RUN);
    r.poll_action();
    r.handle(RestoreEvent::Loaded(Some(Found {
        run: other,
        step: 4,
    })));
    assert_eq!(
        all(&mut r),
        vec![RestoreAction::Foreign { found: other }],
        "no install, no reload"
    );
}

#[test]
fn answers_out_of_order_are_ignored() {
    let mut r = Restore::new(RUN);
    r.handle(RestoreEvent::Drained);
    assert_eq!(all(&mut r), vec![RestoreAction::Load], "nothing asked yet");
    r.handle(RestoreEvent::Drained);
    assert_eq!(all(&mut r), vec![], "Load is unanswered");
    r.handle(RestoreEvent::Loaded(None));
    assert_eq!(all(&mut r).len(), 1);
}

#[test]
fn a_death_or_a_leave_outlives_the_epoch_and_the_rest_is_void() {
    assert_eq!(stale(Queued::Down), Stale::Lose);
    assert_eq!(stale(Queued::Leave), Stale::Release);
    assert_eq!(stale(Queued::SyncReport), Stale::CountTraffic);
    assert_eq!(stale(Queued::Other), Stale::Void);
}
