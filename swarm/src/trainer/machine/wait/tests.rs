//! The waits for replicas of `swarm/tests/trainer_*.rs` (the first step's, a paused stage's, a
//! restore found while waiting, the deadline), on the machine alone with a virtual clock.

use std::time::{Duration, Instant};

use super::*;

fn counts(serving: &[usize], steps_done: u64) -> WaitEvent {
    WaitEvent::Counts {
        serving: serving.to_vec(),
        steps_done,
    }
}

fn actions(w: &mut ReplicaWait, now: Instant) -> Vec<WaitAction> {
    std::iter::from_fn(|| w.poll_action(now)).take(10).collect()
}

#[test]
fn enough_replicas_end_the_wait_at_once() {
    let t0 = Instant::now();
    let mut w = ReplicaWait::new(1, t0 + Duration::from_secs(600));
    w.handle(counts(&[1, 2], 0), t0);
    assert_eq!(actions(&mut w, t0), vec![WaitAction::Ready]);
    w.handle(counts(&[0, 0], 0), t0);
    assert_eq!(actions(&mut w, t0), vec![], "nothing after the end");
}

/// Before the first step: each change of the counts is reported once, a stage with none is no
/// pause, and the wait ends when every stage has what it needs.
#[test]
fn the_first_steps_wait_reports_each_change_once() {
    let t0 = Instant::now();
    let mut w = ReplicaWait::new(2, t0 + Duration::from_secs(600));
    w.handle(counts(&[0, 1], 0), t0);
    assert_eq!(
        actions(&mut w, t0),
        vec![WaitAction::Waiting {
            serving: vec![0, 1],
            need: 2
        }]
    );
    let t1 = t0 + Duration::from_millis(100);
    w.handle(counts(&[0, 1], 0), t1);
    assert_eq!(actions(&mut w, t1), vec![], "the same counts again");
    w.handle(counts(&[2, 1], 0), t1);
    assert_eq!(
        actions(&mut w, t1),
        vec![WaitAction::Waiting {
            serving: vec![2, 1],
            need: 2
        }]
    );
    w.handle(counts(&[2, 2], 0), t1);
    assert_eq!(actions(&mut w, t1), vec![WaitAction::Ready]);
}

/// `paused_stage_resumes_when_a_replica_joins`: after the run started, a stage with no replica
/// pauses the run (said once), and a joiner's Ready resumes it.
#[test]
fn a_stage_with_none_after_the_first_step_pauses_the_run() {
    let t0 = Instant::now();
    let mut w = ReplicaWait::new(1, t0 + Duration::from_secs(600));
    w.handle(counts(&[1, 0], 7), t0);
    assert_eq!(
        actions(&mut w, t0),
        vec![
            WaitAction::Waiting {
                serving: vec![1, 0],
                need: 1
            },
            WaitAction::Paused { stage: 1 }
        ]
    );
    w.handle(counts(&[1, 0], 7), t0);
    assert_eq!(actions(&mut w, t0), vec![], "said once");
    w.handle(counts(&[1, 1], 7), t0);
    assert_eq!(actions(&mut w, t0), vec![WaitAction::Ready]);
}

/// A stage's state lost while waiting: the run restores first, and the counts are read again
/// (those fed with the loss were of the old epoch).
#[test]
fn a_lost_state_restores_before_anything_else() {
    let t0 = Instant::now();
    let mut w = ReplicaWait::new(1, t0 + Duration::from_secs(600));
    w.handle(WaitEvent::StateLost, t0);
    w.handle(counts(&[1, 1], 4), t0);
    assert_eq!(actions(&mut w, t0), vec![WaitAction::Restore]);
    // After the restore every replica reloads: none serves yet.
    w.handle(counts(&[0, 0], 2), t0);
    assert_eq!(
        actions(&mut w, t0),
        vec![
            WaitAction::Waiting {
                serving: vec![0, 0],
                need: 1
            },
            WaitAction::Paused { stage: 0 }
        ]
    );
    w.handle(counts(&[1, 1], 2), t0);
    assert_eq!(actions(&mut w, t0), vec![WaitAction::Ready]);
}

/// The counts are read again every RECHECK while no message comes, and at the deadline the wait
/// gives up (after reporting counts it had not reported).
#[test]
fn the_wait_rechecks_and_gives_up_at_its_deadline() {
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(2);
    let mut w = ReplicaWait::new(1, deadline);
    assert_eq!(w.poll_timeout(), deadline, "no counts yet");
    w.handle(counts(&[0], 0), t0);
    assert_eq!(actions(&mut w, t0).len(), 1);
    assert_eq!(w.poll_timeout(), t0 + RECHECK);
    let t1 = deadline - Duration::from_millis(100);
    w.handle(counts(&[0], 0), t1);
    assert_eq!(actions(&mut w, t1), vec![]);
    assert_eq!(w.poll_timeout(), deadline, "the deadline is sooner");
    w.handle(counts(&[1, 0], 0), deadline);
    assert_eq!(
        actions(&mut w, deadline),
        vec![
            WaitAction::Waiting {
                serving: vec![1, 0],
                need: 1
            },
            WaitAction::GiveUp {
                serving: vec![1, 0],
                need: 1
            }
        ]
    );
    w.handle(counts(&[1, 1], 0), deadline);
    assert_eq!(actions(&mut w, deadline), vec![], "nothing after giving up");
}
