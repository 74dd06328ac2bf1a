//! The step's order on the flow alone: no sockets, no sleeps. Each test plays what the phases
//! end with in the order a fault produces it, and checks what the flow asks for next and what
//! its micro-batch machine then runs again.

use std::time::{Duration, Instant};

use super::*;
use crate::protocol::MbKey;
use crate::receipt::Pass;
use crate::trainer::machine::sync::SyncOutcome;
use crate::trainer::machine::{Action, MachineConfig};

fn p(i: u8) -> PeerId {
    PeerId([i; 32])
}

/// Two stages: replicas `1, 2` of stage 0 and `3, 4` of stage 1, alternating per micro-batch.
fn route(mb: usize) -> Vec<PeerId> {
    vec![p(1 + (mb % 2) as u8), p(3 + (mb % 2) as u8)]
}

fn flow(drifts: bool, outer_boundary: bool) -> StepFlow {
    let sm = StepMachine::new(
        MachineConfig {
            stages: 2,
            micro_batches: 4,
            max_in_flight: 4,
            attempt_timeout: Duration::from_secs(10),
        },
        3,
    );
    StepFlow::new(
        FlowConfig {
            stages: 2,
            drifts,
            outer_boundary,
        },
        sm,
    )
}

/// Runs the micro-batch phase to the end, every pass succeeding at once; returns the attempts
/// started (key, stage mask).
fn drive(f: &mut StepFlow, now: Instant) -> Vec<(MbKey, u64)> {
    drive_on(f, now, &route)
}

/// [`drive`] along the routes `route` gives.
fn drive_on(
    f: &mut StepFlow,
    now: Instant,
    route: &dyn Fn(usize) -> Vec<PeerId>,
) -> Vec<(MbKey, u64)> {
    let sm = f.machine_mut();
    let mut started = Vec::new();
    for _ in 0..1000 {
        if sm.micro_batches_done() {
            return started;
        }
        while let Some(a) = sm.poll_action() {
            match a {
                Action::Route { mb } => sm.handle(
                    Event::Routed {
                        mb,
                        route: route(mb),
                        expected_s: 0.1,
                    },
                    now,
                ),
                Action::Forward {
                    key, accumulate, ..
                } => started.push((key, accumulate)),
                Action::ChargeFailedPass { .. } | Action::Release { .. } => {}
            }
        }
        let live: Vec<(MbKey, u64)> = started
            .iter()
            .copied()
            .filter(|s| sm.book().current_attempt(s.0.mb as usize) == Some(s.0.attempt))
            .collect();
        for (key, mask) in live {
            let r = route(key.mb as usize);
            if sm.accept_output(r[1], key, Pass::Forward).is_some() {
                sm.handle(Event::HeadDone { key, loss: 1.0 }, now);
                for k in (0..2).filter(|k| mask & (1 << k) != 0) {
                    sm.handle(
                        Event::Counted {
                            from: r[k],
                            key,
                            stage: k as u32,
                        },
                        now,
                    );
                }
                if sm.accept_output(r[0], key, Pass::Backward).is_some() {
                    sm.handle(Event::EmbedDone { key }, now);
                }
            }
        }
        sm.handle_timeout(now);
    }
    panic!("the micro-batches never finished");
}

/// A step whose micro-batches ran and whose probe found nobody dead: the audits with the first
/// sync round of every stage were asked for (in the step's sync phase).
fn probed(drifts: bool, outer_boundary: bool, now: Instant) -> StepFlow {
    let mut f = flow(drifts, outer_boundary);
    next(&mut f, now);
    drive(&mut f, now);
    f.handle(FlowEvent::MicroBatchesDone { all_heard: false }, now);
    next(&mut f, now);
    f.handle(FlowEvent::Probed { dead: vec![] }, now);
    let phase = if drifts {
        SyncPhase::Local
    } else {
        SyncPhase::Gradient
    };
    assert_eq!(
        next(&mut f, now),
        FlowAction::AuditAndSync {
            stages: vec![0, 1],
            rounds: vec![0, 0],
            phase
        }
    );
    f
}

/// The audits banned nobody and the round they ran with ended with `outcome`.
fn audited_and_synced(outcome: SyncOutcome) -> FlowEvent {
    FlowEvent::AuditedAndSynced {
        banned: vec![],
        outcome,
    }
}

/// [`probed`], then audited, synced, optimized and applied cleanly (the next action follows the
/// apply).
fn applied(drifts: bool, outer_boundary: bool, now: Instant) -> StepFlow {
    let mut f = probed(drifts, outer_boundary, now);
    for e in [
        audited_and_synced(synced(&[(0, 1.0), (1, 1.0)], &[])),
        FlowEvent::Optimized,
    ] {
        f.handle(e, now);
        next(&mut f, now);
    }
    f.handle(FlowEvent::Applied { mismatches: 0 }, now);
    f
}

fn next(f: &mut StepFlow, now: Instant) -> FlowAction {
    f.poll_action(now).expect("an action")
}

fn synced(done: &[(usize, f64)], failed: &[PeerId]) -> SyncOutcome {
    SyncOutcome {
        done: done.iter().map(|&(k, n)| (k, n, 2)).collect(),
        failed_peers: failed.to_vec(),
        ..Default::default()
    }
}

/// Micro-batches, probe, audits, sync, optimizer, apply, finish; one action at a time.
#[test]
fn a_clean_step_runs_the_phases_in_order() {
    let now = Instant::now();
    let mut f = flow(false, false);
    assert_eq!(next(&mut f, now), FlowAction::MicroBatches);
    assert_eq!(f.poll_action(now), None, "one action at a time");
    assert_eq!(drive(&mut f, now).len(), 4);
    f.handle(FlowEvent::MicroBatchesDone { all_heard: false }, now);
    assert_eq!(next(&mut f, now), FlowAction::Probe { stages: vec![0, 1] });
    f.handle(FlowEvent::Probed { dead: vec![] }, now);
    assert_eq!(
        next(&mut f, now),
        FlowAction::AuditAndSync {
            stages: vec![0, 1],
            rounds: vec![0, 0],
            phase: SyncPhase::Gradient
        }
    );
    f.handle(audited_and_synced(synced(&[(0, 1.5), (1, 2.5)], &[])), now);
    assert_eq!(
        next(&mut f, now),
        FlowAction::Optimize {
            stage_sq_norms: vec![1.5, 2.5]
        }
    );
    f.handle(FlowEvent::Optimized, now);
    assert_eq!(
        next(&mut f, now),
        FlowAction::Apply {
            phase: SyncPhase::Gradient
        }
    );
    f.handle(FlowEvent::Applied { mismatches: 1 }, now);
    assert_eq!(next(&mut f, now), FlowAction::Finish);
    assert_eq!(f.poll_action(now), None);
    assert_eq!(f.mismatches(), 1);
    assert_eq!(f.participants(), &[2, 2]);
}

/// A replica that died after counting is found by the probe: its stage's micro-batches run
/// again on the survivor (the other stage's counts stand), then the probe and audits again.
#[test]
fn a_death_found_by_the_probe_reruns_its_counts_before_any_sync() {
    let now = Instant::now();
    let mut f = flow(false, false);
    next(&mut f, now);
    drive(&mut f, now);
    f.handle(FlowEvent::MicroBatchesDone { all_heard: false }, now);
    next(&mut f, now);
    f.handle(FlowEvent::Probed { dead: vec![p(1)] }, now);
    assert!(!f.machine().micro_batches_done());
    assert_eq!(next(&mut f, now), FlowAction::MicroBatches);
    let rerun = drive_on(&mut f, now, &|mb| vec![p(2), p(3 + (mb % 2) as u8)]);
    // Micro-batches 0 and 2 went through peer 1: they run again for stage 0 only.
    assert_eq!(
        rerun.iter().map(|(k, m)| (k.mb, *m)).collect::<Vec<_>>(),
        vec![(0, 0b01), (2, 0b01)]
    );
    f.handle(FlowEvent::MicroBatchesDone { all_heard: false }, now);
    assert_eq!(next(&mut f, now), FlowAction::Probe { stages: vec![0, 1] });
    f.handle(FlowEvent::Probed { dead: vec![] }, now);
    assert!(matches!(next(&mut f, now), FlowAction::AuditAndSync { .. }));
}

/// An audit's ban discards the step, the sums of the round that ran meanwhile included: every
/// stage reset, every micro-batch runs again in every column from a fresh book.
#[test]
fn a_ban_discards_the_step_and_reruns_every_micro_batch() {
    let now = Instant::now();
    let mut f = probed(false, false, now);
    f.handle(
        FlowEvent::AuditedAndSynced {
            banned: vec![p(3)],
            outcome: synced(&[(0, 1.0), (1, 1.0)], &[]),
        },
        now,
    );
    assert_eq!(
        next(&mut f, now),
        FlowAction::Discard { stages: vec![0, 1] }
    );
    f.handle(FlowEvent::Discarded, now);
    assert_eq!(next(&mut f, now), FlowAction::MicroBatches);
    let rerun = drive(&mut f, now);
    assert_eq!(rerun.len(), 4);
    assert!(rerun.iter().all(|(_, m)| *m == 0b11));
}

/// A death mid-sync: the stage that synced keeps its norm; the broken one is reset, its
/// micro-batches run again for it alone, it is probed (no audit: a stage already synced) and
/// synced again in its next round.
#[test]
fn a_death_mid_sync_resets_and_redoes_only_the_broken_stage() {
    let now = Instant::now();
    let mut f = probed(false, false, now);
    // Stage 1 synced; stage 0 lost peer 2 before peer 1 summed.
    f.handle(audited_and_synced(synced(&[(1, 2.5)], &[p(2)])), now);
    assert_eq!(next(&mut f, now), FlowAction::Reset { stages: vec![0] });
    f.handle(FlowEvent::Reset, now);
    assert_eq!(next(&mut f, now), FlowAction::MicroBatches);
    let rerun = drive_on(&mut f, now, &|mb| vec![p(1), p(3 + (mb % 2) as u8)]);
    assert_eq!(rerun.len(), 4, "stage 0's whole column runs again");
    assert!(
        rerun.iter().all(|(_, m)| *m == 0b01),
        "stage 1 synced: {rerun:?}"
    );
    f.handle(FlowEvent::MicroBatchesDone { all_heard: false }, now);
    assert_eq!(next(&mut f, now), FlowAction::Probe { stages: vec![0] });
    f.handle(FlowEvent::Probed { dead: vec![] }, now);
    assert_eq!(
        next(&mut f, now),
        FlowAction::Sync {
            stages: vec![0],
            rounds: vec![1, 0],
            phase: SyncPhase::Gradient
        }
    );
    f.handle(FlowEvent::Synced(synced(&[(0, 1.5)], &[])), now);
    assert_eq!(
        next(&mut f, now),
        FlowAction::Optimize {
            stage_sq_norms: vec![1.5, 2.5]
        }
    );
}

/// Every replica heard from during the micro-batches: no probe, the audits and the first round
/// at once; after a redo, the broken stage's sync at once (no audit: a stage already synced).
#[test]
fn replicas_heard_from_during_the_micro_batches_are_not_probed() {
    let now = Instant::now();
    let mut f = flow(false, false);
    assert_eq!(next(&mut f, now), FlowAction::MicroBatches);
    drive(&mut f, now);
    f.handle(FlowEvent::MicroBatchesDone { all_heard: true }, now);
    assert_eq!(
        next(&mut f, now),
        FlowAction::AuditAndSync {
            stages: vec![0, 1],
            rounds: vec![0, 0],
            phase: SyncPhase::Gradient
        }
    );
    f.handle(audited_and_synced(synced(&[(1, 2.5)], &[p(2)])), now);
    assert_eq!(next(&mut f, now), FlowAction::Reset { stages: vec![0] });
    f.handle(FlowEvent::Reset, now);
    assert_eq!(next(&mut f, now), FlowAction::MicroBatches);
    drive_on(&mut f, now, &|mb| vec![p(1), p(3 + (mb % 2) as u8)]);
    f.handle(FlowEvent::MicroBatchesDone { all_heard: true }, now);
    assert_eq!(
        next(&mut f, now),
        FlowAction::Sync {
            stages: vec![0],
            rounds: vec![1, 0],
            phase: SyncPhase::Gradient
        }
    );
}

/// A stage's state lost while micro-batches run abandons the step; lost after the apply, the
/// step finishes without its outer round (the run restores and the step does not count).
#[test]
fn a_lost_state_abandons_before_work_and_skips_the_outer_round() {
    let now = Instant::now();
    let mut f = flow(false, false);
    assert_eq!(next(&mut f, now), FlowAction::MicroBatches);
    f.state_lost();
    assert_eq!(next(&mut f, now), FlowAction::Abandon);
    assert_eq!(f.poll_action(now), None);

    // Lost before the audits and the first sync round: neither starts.
    let mut f = flow(true, true);
    next(&mut f, now);
    drive(&mut f, now);
    f.handle(FlowEvent::MicroBatchesDone { all_heard: false }, now);
    next(&mut f, now);
    f.handle(FlowEvent::Probed { dead: vec![] }, now);
    f.state_lost();
    assert_eq!(next(&mut f, now), FlowAction::Abandon);

    let mut f = applied(true, true, now);
    f.state_lost();
    assert_eq!(next(&mut f, now), FlowAction::Finish);
}

/// A multi-step sync's boundary: local rounds, then outer rounds redone among the survivors
/// (next round number) until every stage synced, then the outer apply; a boundary that loses
/// a participant in every round gives up after [`MAX_OUTER_ROUNDS`].
#[test]
fn outer_rounds_are_redone_for_the_stages_that_lost_a_participant() {
    let now = Instant::now();
    let mut f = probed(true, true, now);
    f.handle(audited_and_synced(synced(&[(0, 1.0), (1, 1.0)], &[])), now);
    next(&mut f, now);
    f.handle(FlowEvent::Optimized, now);
    assert_eq!(
        next(&mut f, now),
        FlowAction::Apply {
            phase: SyncPhase::Local
        }
    );
    f.handle(FlowEvent::Applied { mismatches: 0 }, now);
    assert_eq!(
        next(&mut f, now),
        FlowAction::OuterSync {
            stages: vec![0, 1],
            rounds: vec![0, 0]
        }
    );
    f.handle(FlowEvent::OuterSynced(synced(&[(0, 0.0)], &[p(4)])), now);
    assert_eq!(
        next(&mut f, now),
        FlowAction::OuterSync {
            stages: vec![1],
            rounds: vec![0, 1]
        }
    );
    f.handle(FlowEvent::OuterSynced(synced(&[(1, 0.0)], &[])), now);
    assert_eq!(next(&mut f, now), FlowAction::OuterApply);
    f.handle(FlowEvent::OuterApplied { mismatches: 2 }, now);
    assert_eq!(next(&mut f, now), FlowAction::Finish);
    assert_eq!(f.mismatches(), 2);

    // Every round loses someone.
    let mut f = applied(true, true, now);
    next(&mut f, now);
    for i in 1..MAX_OUTER_ROUNDS {
        f.handle(FlowEvent::OuterSynced(synced(&[], &[p(i as u8)])), now);
        assert!(matches!(next(&mut f, now), FlowAction::OuterSync { .. }));
    }
    f.handle(FlowEvent::OuterSynced(synced(&[], &[p(9)])), now);
    assert_eq!(
        next(&mut f, now),
        FlowAction::GiveUp {
            rounds: MAX_OUTER_ROUNDS
        }
    );
}

/// Without a multi-step sync's boundary there is no outer round; an event that does not answer
/// the action asked is ignored.
#[test]
fn events_out_of_order_are_ignored() {
    let now = Instant::now();
    let mut f = flow(false, false);
    f.handle(FlowEvent::MicroBatchesDone { all_heard: false }, now);
    assert_eq!(
        next(&mut f, now),
        FlowAction::MicroBatches,
        "nothing was asked yet"
    );
    f.handle(FlowEvent::Optimized, now);
    assert_eq!(
        f.poll_action(now),
        None,
        "still waiting for the micro-batches"
    );
    drive(&mut f, now);
    f.handle(FlowEvent::MicroBatchesDone { all_heard: false }, now);
    assert_eq!(next(&mut f, now), FlowAction::Probe { stages: vec![0, 1] });
}
