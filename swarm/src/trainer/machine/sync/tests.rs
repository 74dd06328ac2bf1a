//! Deterministic orderings of a sync round on the trainer's side: deaths before and after the
//! survivors reported, late and repeated reports, the deadline, disagreement.

use std::time::Duration;

use super::*;
use crate::trainer::book::{Column, Holder};

fn p(i: u8) -> PeerId {
    PeerId([i; 32])
}

/// A step of 6 micro-batches on 2 stages, all counted: stage 0 by replicas 1 and 2 in turn,
/// stage 1 by `stage1[mb % len]`.
fn counted(stage1: &[PeerId]) -> StepBook {
    let mut b = StepBook::new(2, 6);
    for mb in 0..6 {
        let route = [p(1 + (mb % 2) as u8), stage1[mb % stage1.len()]];
        let a = b.start_attempt(mb, &route);
        for (k, peer) in route.iter().enumerate() {
            b.count(mb, a.attempt, Column::Stage(k as u16), Holder::Peer(*peer));
        }
        b.count(mb, a.attempt, Column::Head, Holder::Trainer);
        b.count(mb, a.attempt, Column::Embedding, Holder::Trainer);
    }
    assert!(b.all_complete());
    b
}

fn round(book: &StepBook, stage1: &[PeerId], now: Instant) -> SyncRound {
    let replicas = vec![vec![p(1), p(2)], stage1.to_vec()];
    SyncRound::plan(
        3,
        SyncPhase::Gradient,
        book,
        &[0, 1],
        &replicas,
        &[0, 2],
        now + Duration::from_secs(120),
    )
    .unwrap()
}

const D: [u8; 32] = [7; 32];

#[test]
fn plan_asks_every_unexcluded_replica_with_its_counts() {
    let now = Instant::now();
    let three = [p(3), p(4), p(5)];
    let mut book = counted(&three);
    let r = round(&book, &three, now);
    let s1 = &r.starts()[1];
    assert_eq!((s1.stage, s1.round), (1, 2));
    assert_eq!(s1.participants, three.to_vec());
    assert_eq!(s1.mb_counts, vec![2, 2, 2]);
    // An excluded replica is told (it is in `to`) but takes no part; its micro-batches must
    // have run again elsewhere before a round can start.
    book.exclude(p(5));
    let replicas = vec![vec![p(1), p(2)], three.to_vec()];
    let err =
        SyncRound::plan(3, SyncPhase::Gradient, &book, &[1], &replicas, &[0, 0], now).unwrap_err();
    assert_eq!(
        err,
        SyncPlanError::Miscounted {
            stage: 1,
            counted: 4,
            expected: 6
        }
    );
    for mb in [2, 5] {
        let a = book.start_attempt(mb, &[p(1), p(4)]);
        book.count(mb, a.attempt, Column::Stage(1), Holder::Peer(p(4)));
    }
    let r = SyncRound::plan(3, SyncPhase::Gradient, &book, &[1], &replicas, &[0, 1], now).unwrap();
    let s = &r.starts()[0];
    assert_eq!(s.participants, vec![p(3), p(4)]);
    assert_eq!(s.mb_counts, vec![2, 4]);
    assert_eq!(s.to, three.to_vec());
    book.exclude(p(3));
    book.exclude(p(4));
    assert_eq!(
        SyncRound::plan(3, SyncPhase::Gradient, &book, &[1], &replicas, &[0, 1], now).unwrap_err(),
        SyncPlanError::NoParticipant(1)
    );
}

/// `replica_crash_at_sync_start_resets_the_stage_and_reruns`: a participant dies before the
/// survivor has reported: the survivor is stuck, stage 1 is redone; stage 0 completes.
#[test]
fn death_before_the_survivor_reported_redoes_the_stage() {
    let now = Instant::now();
    let two = [p(3), p(4)];
    let book = counted(&two);
    let mut r = round(&book, &two, now);
    r.handle_report(p(1), 3, 0, 0, 1.5, D);
    r.handle_report(p(2), 3, 0, 0, 1.5, D);
    assert!(!r.is_finished());
    assert!(r.handle_down(p(4)));
    assert!(
        r.is_finished(),
        "nobody else is awaited: the round ends now"
    );
    assert_eq!(r.poll_timeout(), None);
    // The stuck survivor's report, should it still come, belongs to a dropped round.
    r.handle_report(p(3), 3, 1, 2, 9.0, D);
    let out = r.finish();
    assert_eq!(out.broken, BTreeSet::from([1]));
    assert_eq!(out.failed_peers, vec![p(4)]);
    assert_eq!(out.done, vec![(0, 1.5, 2)]);
}

/// `replica_crash_before_apply` (and a crash during the share exchange after the survivor
/// summed): the survivor reported, so it summed every share; the stage completes without the
/// dead one.
#[test]
fn death_after_the_survivor_reported_completes_the_stage() {
    let now = Instant::now();
    let two = [p(3), p(4)];
    let book = counted(&two);
    let mut r = round(&book, &two, now);
    r.handle_report(p(3), 3, 1, 2, 2.5, D);
    assert!(r.handle_down(p(4)));
    r.handle_report(p(1), 3, 0, 0, 1.5, D);
    r.handle_report(p(2), 3, 0, 0, 1.5, D);
    assert!(r.is_finished());
    let out = r.finish();
    assert!(out.broken.is_empty());
    assert_eq!(out.failed_peers, vec![p(4)]);
    assert_eq!(out.done, vec![(0, 1.5, 2), (1, 2.5, 1)]);
}

/// `stage_sync_redone_with_three_replicas`: the third replica takes SyncStart and never shares,
/// then dies; the two others are both stuck and both dropped from the round at once.
#[test]
fn death_with_two_stuck_survivors_drops_both() {
    let now = Instant::now();
    let three = [p(3), p(4), p(5)];
    let book = counted(&three);
    let mut r = round(&book, &three, now);
    r.handle_report(p(1), 3, 0, 0, 1.5, D);
    r.handle_report(p(2), 3, 0, 0, 1.5, D);
    assert!(r.handle_down(p(5)));
    assert!(r.is_finished());
    let out = r.finish();
    assert_eq!(out.broken, BTreeSet::from([1]));
    assert_eq!(out.failed_peers, vec![p(5)]);
}

/// Reports of another step, from a replica that takes no part, or repeated, change nothing;
/// a replica that takes no part dying is not the round's business.
#[test]
fn late_and_stray_reports_are_ignored() {
    let now = Instant::now();
    let two = [p(3), p(4)];
    let book = counted(&two);
    let mut r = round(&book, &two, now);
    r.handle_report(p(3), 2, 1, 2, 9.0, D);
    r.handle_report(p(9), 3, 1, 2, 9.0, D);
    r.handle_report(p(3), 3, 0, 0, 9.0, D);
    r.handle_report(p(3), 3, 1, 2, 2.5, D);
    r.handle_report(p(3), 3, 1, 2, 9.0, D);
    assert!(!r.handle_down(p(9)));
    r.handle_report(p(4), 3, 1, 2, 2.5, D);
    r.handle_report(p(1), 3, 0, 0, 1.5, D);
    r.handle_report(p(2), 3, 0, 0, 1.5, D);
    let out = r.finish();
    assert_eq!(out.done, vec![(0, 1.5, 2), (1, 2.5, 2)]);
    assert_eq!(out.norm_mismatches, 0);
    assert!(out.failed_peers.is_empty());
}

/// Silence until the deadline fails whoever is still awaited and redoes their stages.
#[test]
fn deadline_fails_the_silent_participants() {
    let now = Instant::now();
    let two = [p(3), p(4)];
    let book = counted(&two);
    let mut r = round(&book, &two, now);
    r.handle_report(p(1), 3, 0, 0, 1.5, D);
    r.handle_report(p(2), 3, 0, 0, 1.5, D);
    r.handle_report(p(3), 3, 1, 2, 2.5, D);
    let deadline = r.poll_timeout().unwrap();
    r.handle_timeout(deadline - Duration::from_millis(1));
    assert!(!r.is_finished());
    r.handle_timeout(deadline);
    assert!(r.is_finished());
    let out = r.finish();
    assert_eq!(out.broken, BTreeSet::from([1]));
    assert_eq!(out.failed_peers, vec![p(4)]);
    assert_eq!(out.done, vec![(0, 1.5, 2)]);
}

/// Replicas that disagree: the majority's norm is the stage's, each other report a mismatch.
#[test]
fn the_majority_wins_and_dissenters_are_counted() {
    let now = Instant::now();
    let three = [p(3), p(4), p(5)];
    let book = counted(&three);
    let mut r = round(&book, &three, now);
    r.handle_report(p(1), 3, 0, 0, 1.5, D);
    r.handle_report(p(2), 3, 0, 0, 1.5, D);
    r.handle_report(p(3), 3, 1, 2, 2.5, D);
    r.handle_report(p(4), 3, 1, 2, 2.5, [8; 32]);
    r.handle_report(p(5), 3, 1, 2, 2.5, D);
    let out = r.finish();
    assert_eq!(out.done, vec![(0, 1.5, 2), (1, 2.5, 3)]);
    assert_eq!(out.norm_mismatches, 1);
}

/// A multi-step sync's inner step (`Local`): nothing is exchanged, so a death strands nobody
/// and the stage completes with the survivors; its norm is the mean of the replicas' own.
#[test]
fn local_round_strands_nobody_and_takes_the_mean_norm() {
    let now = Instant::now();
    let three = [p(3), p(4), p(5)];
    let book = counted(&three);
    let replicas = vec![vec![p(1), p(2)], three.to_vec()];
    let mut r = SyncRound::plan(3, SyncPhase::Local, &book, &[1], &replicas, &[0, 0], now).unwrap();
    r.handle_report(p(4), 3, 1, 0, 4.0, [1; 32]);
    assert!(r.handle_down(p(5)));
    assert!(!r.is_finished(), "replica 3 is still awaited, not stuck");
    r.handle_report(p(3), 3, 1, 0, 2.0, [2; 32]);
    let out = r.finish();
    assert!(out.broken.is_empty());
    assert_eq!(out.failed_peers, vec![p(5)]);
    assert_eq!(out.done, vec![(1, 3.0, 2)]);
    assert_eq!(out.norm_mismatches, 0, "drifting replicas are not compared");
}

/// A multi-step sync's boundary (`Outer`) syncs weights: micro-batch counts are neither
/// checked nor sent (the book is empty).
#[test]
fn outer_round_sends_no_counts() {
    let now = Instant::now();
    let book = StepBook::new(2, 6);
    let replicas = vec![vec![p(1), p(2)], vec![p(3), p(4)]];
    let r = SyncRound::plan(3, SyncPhase::Outer, &book, &[0, 1], &replicas, &[0, 0], now).unwrap();
    assert!(r.starts().iter().all(|s| s.mb_counts == vec![0, 0]));
    assert!(SyncRound::plan(3, SyncPhase::Gradient, &book, &[0], &replicas, &[0, 0], now).is_err());
}

/// After `Apply`: the most common digest is the stage's, a replica holding another is the odd
/// one out; a tie goes to the smallest digest whatever the order of the answers.
#[test]
fn the_digest_majority_is_deterministic() {
    let (a, b) = ([1; 32], [2; 32]);
    assert_eq!(digest_majority([b, a, b]), Some(b));
    assert_eq!(digest_majority([a, b]), Some(a));
    assert_eq!(digest_majority([b, a]), Some(a));
    assert_eq!(digest_majority([]), None);
}

#[test]
fn a_report_of_a_round_given_up_on_never_counts_in_its_redo() {
    let now = Instant::now();
    let two = [p(3), p(4)];
    let book = counted(&two);
    // Stage 1's sync is being redone: this round is its round 2. A report replica 3 sent in
    // round 1 (it summed the shares of that round) arrives late: it is not this round's.
    let mut r = round(&book, &two, now);
    r.handle_report(p(3), 3, 1, 1, 9.0, D);
    r.handle_report(p(4), 3, 1, 2, 2.5, D);
    r.handle_report(p(1), 3, 0, 0, 1.5, D);
    r.handle_report(p(2), 3, 0, 0, 1.5, D);
    assert!(
        !r.is_finished(),
        "stage 1 still waits for replica 3's round-2 report"
    );
    // Its report of this round counts.
    r.handle_report(p(3), 3, 1, 2, 2.5, D);
    assert!(r.is_finished());
}
