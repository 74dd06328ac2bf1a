//! Deterministic fault orderings of a step, on the machine alone: no sockets, no sleeps, a
//! virtual clock. Each test plays the replicas' reports in the order the fault produces them
//! (the same orderings `swarm/tests/trainer_faults.rs` provokes with real peers and timing).

use super::*;

fn p(i: u8) -> PeerId {
    PeerId([i; 32])
}

const TIMEOUT: Duration = Duration::from_secs(10);

/// A step driven by hand: routes come from `router` (micro-batch -> route), every action is
/// recorded.
struct Run {
    sm: StepMachine,
    now: Instant,
    router: Box<dyn Fn(usize) -> Vec<PeerId>>,
    /// Attempts started, in order.
    forwards: Vec<(MbKey, u64, bool, bool)>,
    releases: Vec<(MbKey, Outcome, Option<u8>)>,
    charges: Vec<(MbKey, bool, Traffic)>,
    /// Most attempts in flight at once.
    peak: usize,
}

impl Run {
    fn new(
        stages: usize,
        micro_batches: usize,
        max_in_flight: usize,
        router: impl Fn(usize) -> Vec<PeerId> + 'static,
    ) -> Run {
        let cfg = MachineConfig {
            stages,
            micro_batches,
            max_in_flight,
            attempt_timeout: TIMEOUT,
        };
        let mut r = Run {
            sm: StepMachine::new(cfg, 7),
            now: Instant::now(),
            router: Box::new(router),
            forwards: Vec::new(),
            releases: Vec::new(),
            charges: Vec::new(),
            peak: 0,
        };
        r.perform();
        r
    }

    /// Performs every action (as the driver does), answering routes at once.
    fn perform(&mut self) {
        for _ in 0..10_000 {
            let Some(a) = self.sm.poll_action() else {
                return;
            };
            match a {
                Action::Route { mb } => {
                    let route = (self.router)(mb);
                    self.sm.handle(
                        Event::Routed {
                            mb,
                            route,
                            expected_s: 0.1,
                        },
                        self.now,
                    );
                }
                Action::Forward {
                    key,
                    accumulate,
                    head,
                    embedding,
                } => {
                    self.forwards.push((key, accumulate, head, embedding));
                    self.peak = self.peak.max(self.sm.in_flight());
                }
                Action::ChargeFailedPass {
                    key,
                    backward,
                    traffic,
                } => self.charges.push((key, backward, traffic)),
                Action::Release {
                    key,
                    outcome,
                    abandon,
                } => self.releases.push((key, outcome, abandon)),
            }
        }
        panic!("the machine never ran out of actions");
    }

    fn event(&mut self, e: Event) {
        self.sm.handle(e, self.now);
        self.sm.handle_timeout(self.now);
        self.perform();
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        self.sm.handle_timeout(self.now);
        self.perform();
    }

    /// The current key of `mb` (its latest Forward).
    fn key(&self, mb: usize) -> MbKey {
        self.forwards
            .iter()
            .rev()
            .find(|f| f.0.mb as usize == mb)
            .map(|f| f.0)
            .expect("micro-batch started")
    }

    fn started(&self, mb: usize) -> Vec<(MbKey, u64, bool, bool)> {
        self.forwards
            .iter()
            .filter(|f| f.0.mb as usize == mb)
            .copied()
            .collect()
    }

    /// The whole pipeline pass of the current attempt of `mb` along `route`: forward to the
    /// end, the head, the backward with each stage counting what it was asked to, the embedding.
    fn complete(&mut self, mb: usize, route: &[PeerId]) {
        let (key, mask, _, _) = *self.started(mb).last().expect("started");
        let last = *route.last().unwrap();
        assert!(self.sm.accept_output(last, key, Pass::Forward).is_some());
        self.event(Event::HeadDone { key, loss: 1.0 });
        for k in (0..route.len()).rev() {
            if mask & (1 << k) != 0 {
                self.event(Event::Counted {
                    from: route[k],
                    key,
                    stage: k as u32,
                });
            }
        }
        assert!(
            self.sm
                .accept_output(route[0], key, Pass::Backward)
                .is_some()
        );
        self.event(Event::EmbedDone { key });
    }

    fn close(&mut self) {
        self.sm.close_micro_batches();
        self.perform();
    }
}

/// Two stages, replicas `1, 2` of stage 0 and `3, 4` of stage 1: micro-batch `mb` goes through
/// `1 + mb % 2` and `3 + mb % 2`.
fn alternate(mb: usize) -> Vec<PeerId> {
    vec![p(1 + (mb % 2) as u8), p(3 + (mb % 2) as u8)]
}

#[test]
fn every_micro_batch_counts_once_within_the_window() {
    let mut r = Run::new(2, 6, 2, alternate);
    assert_eq!(r.forwards.len(), 2, "the window holds 2 attempts");
    for mb in 0..6 {
        r.complete(mb, &alternate(mb));
    }
    assert!(r.sm.micro_batches_done());
    assert_eq!(r.peak, 2);
    assert_eq!(r.sm.book().retries(), 0);
    assert_eq!(r.sm.book().mean_loss(), Some(1.0));
    assert_eq!(r.sm.book().stage_counts(1)[&p(3)], 3);
    assert_eq!(r.sm.book().stage_counts(1)[&p(4)], 3);
    // Every attempt asked every column, and was released as done without an Abandon.
    assert!(
        r.forwards
            .iter()
            .all(|f| (f.1, f.2, f.3) == (0b11, true, true))
    );
    assert_eq!(r.releases.len(), 6);
    assert!(
        r.releases
            .iter()
            .all(|x| x.1 == Outcome::Completed && x.2.is_none())
    );
    assert_eq!(r.sm.poll_timeout(), None);
}

#[test]
fn outputs_are_accepted_only_from_the_route_ends_and_once() {
    let mut r = Run::new(2, 1, 1, alternate);
    let key = r.key(0);
    // The forward output only from the last hop, the input gradient only from the first.
    assert_eq!(r.sm.accept_output(p(1), key, Pass::Forward), None);
    assert_eq!(
        r.sm.accept_output(p(3), key, Pass::Forward),
        Some(Accepted { accumulate: true })
    );
    assert_eq!(r.sm.accept_output(p(3), key, Pass::Backward), None);
    // Another attempt or step: not ours.
    let old = MbKey { attempt: 9, ..key };
    assert_eq!(r.sm.accept_output(p(3), old, Pass::Forward), None);
    r.event(Event::HeadDone { key, loss: 2.0 });
    // A second copy of the forward output is refused.
    assert_eq!(r.sm.accept_output(p(3), key, Pass::Forward), None);
    assert!(r.sm.accept_output(p(1), key, Pass::Backward).is_some());
}

/// A replica of stage 1 acknowledges a Forward and does nothing (`frames_of_an_attempt_failed_
/// by_deadline_count_as_wire_bytes`): nothing happens until the deadline, which fails the
/// attempt with every hop suspected and an `Abandon` of the unreported forward pass; the
/// micro-batch is routed again and counted once.
#[test]
fn swallowed_forward_fails_at_its_deadline_and_reruns_once() {
    let routes = |mb: usize| -> Vec<PeerId> {
        // The first attempt of micro-batch 0 reaches the swallowing replica 3.
        if mb == 0 {
            vec![p(1), p(3)]
        } else {
            vec![p(1), p(4)]
        }
    };
    let mut r = Run::new(2, 1, 1, routes);
    let first = r.key(0);
    let deadline = r.sm.poll_timeout().expect("a deadline");
    assert_eq!(deadline, r.now + TIMEOUT);
    r.advance(TIMEOUT - Duration::from_millis(1));
    assert!(r.releases.is_empty(), "no failure before the deadline");
    // The router now avoids replica 3 (its health took the timeout).
    r.router = Box::new(|_| vec![p(1), p(4)]);
    r.advance(Duration::from_millis(1));
    assert_eq!(
        r.releases,
        vec![(first, Outcome::TimedOut, Some(Abandon::FORWARD))]
    );
    let second = r.key(0);
    assert_eq!(second.attempt, 1);
    // Nothing counted in the swallowed attempt: the retry accumulates every column.
    assert_eq!(r.started(0)[1].1, 0b11);
    // The swallowed attempt's output, should it ever come, is not taken.
    assert_eq!(r.sm.accept_output(p(3), first, Pass::Forward), None);
    r.complete(0, &[p(1), p(4)]);
    assert!(r.sm.micro_batches_done());
    assert_eq!(r.sm.book().retries(), 1);
    assert_eq!(
        r.sm.book().holder(0, Column::Stage(1)),
        Some(Holder::Peer(p(4)))
    );
}

/// The swallowing replica wakes up late and counts the abandoned attempt after the retry and
/// another micro-batch it had counted honestly: it is excluded for the step, and every
/// micro-batch it had counted runs again for its stage (before this machine, the other one was
/// left incomplete and never re-queued: the micro-batch phase could not end).
#[test]
fn late_count_of_an_abandoned_attempt_excludes_the_replica_and_reruns_its_counts() {
    let mut r = Run::new(2, 2, 1, |_| vec![p(1), p(3)]);
    // Micro-batch 0 through replica 3, completed.
    r.complete(0, &[p(1), p(3)]);
    // Micro-batch 1's first attempt is swallowed by replica 3 and times out.
    let first = r.key(1);
    r.router = Box::new(|_| vec![p(1), p(4)]);
    r.advance(TIMEOUT);
    assert_eq!(r.key(1).attempt, 1);
    r.complete(1, &[p(1), p(4)]);
    assert!(r.sm.micro_batches_done());
    // Now replica 3 reports a count for the abandoned attempt.
    r.event(Event::Counted {
        from: p(3),
        key: first,
        stage: 1,
    });
    assert!(r.sm.book().is_excluded(&p(3)));
    assert!(!r.sm.micro_batches_done());
    // Micro-batch 0 runs again, for stage 1 only, on the other replica.
    let rerun = *r.started(0).last().unwrap();
    assert_eq!(
        (rerun.0.attempt, rerun.1, rerun.2, rerun.3),
        (1, 0b10, false, false)
    );
    r.complete(0, &[p(1), p(4)]);
    assert!(r.sm.micro_batches_done());
    assert_eq!(r.sm.book().stage_counts(1)[&p(4)], 2);
}

/// A replica of stage 1 crashes mid-step (`replica_crash_mid_step_loses_no_micro_batch`):
/// attempts through it fail on it (with the passes nobody reported abandoned), what it counted
/// runs again for its stage only, and nothing else is counted twice.
#[test]
fn replica_crash_mid_step_reruns_only_its_columns() {
    let mut r = Run::new(2, 4, 4, alternate);
    // Micro-batches 0 and 1 complete; 2 (through 1 and 3) has its forward back; 3 (through 2
    // and 4) is still in its forward pass.
    r.complete(0, &alternate(0));
    r.complete(1, &alternate(1));
    let k2 = r.key(2);
    r.event(Event::HeadDone { key: k2, loss: 1.0 });
    r.event(Event::Counted {
        from: p(3),
        key: k2,
        stage: 1,
    });
    let k3 = r.key(3);
    r.router = Box::new(|_| vec![p(1), p(3)]);
    r.event(Event::PeerLost(p(4)));
    // Micro-batch 3's attempt failed on the dead replica with its forward pass abandoned.
    assert!(
        r.releases
            .contains(&(k3, Outcome::Failed(p(4)), Some(Abandon::FORWARD)))
    );
    assert!(r.sm.book().is_excluded(&p(4)));
    // Micro-batch 1 (counted by 4 for stage 1) runs again for stage 1 only; 3 runs whole.
    let again1 = *r.started(1).last().unwrap();
    assert_eq!(
        (again1.0.attempt, again1.1, again1.2, again1.3),
        (1, 0b10, false, false)
    );
    let again3 = *r.started(3).last().unwrap();
    assert_eq!((again3.0.attempt, again3.1), (1, 0b11));
    // Micro-batch 2 was not through 4: untouched, it finishes its backward pass.
    r.event(Event::Counted {
        from: p(1),
        key: k2,
        stage: 0,
    });
    r.event(Event::EmbedDone { key: k2 });
    r.complete(1, &[p(1), p(3)]);
    r.complete(3, &[p(1), p(3)]);
    assert!(r.sm.micro_batches_done());
    let book = r.sm.book();
    assert_eq!(book.retries(), 2);
    assert_eq!(book.stage_counts(1)[&p(3)], 4);
    assert_eq!(book.stage_counts(0)[&p(1)], 3);
    assert_eq!(
        book.stage_counts(0)[&p(2)],
        1,
        "replica 2's count of mb 1 kept"
    );
}

/// A hop reports that the next one failed: the failed pass's traffic is charged on the channel
/// of the pass that was running, the route is told nothing more is unreported, and a busy
/// refusal blames nobody.
#[test]
fn hop_failures_charge_the_failed_pass_and_blame_the_failed_hop() {
    let mut r = Run::new(2, 2, 2, alternate);
    let (k0, k1) = (r.key(0), r.key(1));
    let t = Traffic {
        wire: 10,
        dense: 40,
    };
    // A report from a peer off the route is ignored.
    r.event(Event::HopFailed {
        from: p(9),
        key: k0,
        failed: p(3),
        busy: false,
        traffic: t,
    });
    assert!(r.releases.is_empty());
    r.event(Event::HopFailed {
        from: p(1),
        key: k0,
        failed: p(3),
        busy: false,
        traffic: t,
    });
    assert_eq!(r.charges, vec![(k0, false, t)]);
    assert!(r.releases.contains(&(k0, Outcome::Failed(p(3)), Some(0))));
    // Micro-batch 1's backward pass is refused for lack of room at stage 0.
    r.event(Event::HeadDone { key: k1, loss: 1.0 });
    r.event(Event::HopFailed {
        from: p(4),
        key: k1,
        failed: p(2),
        busy: true,
        traffic: t,
    });
    assert_eq!(r.charges[1], (k1, true, t));
    assert!(r.releases.contains(&(k1, Outcome::Busy(p(2)), Some(0))));
    // Our own send failing fails the attempt without a HopFailed: its passes are abandoned.
    let k0b = r.key(0);
    r.event(Event::Failed {
        key: k0b,
        peer: p(1),
        busy: false,
    });
    assert!(
        r.releases
            .contains(&(k0b, Outcome::Failed(p(1)), Some(Abandon::FORWARD)))
    );
    // A failure of an attempt that is no longer current changes nothing.
    let n = r.releases.len();
    r.event(Event::Failed {
        key: k0,
        peer: p(1),
        busy: false,
    });
    assert_eq!(r.releases.len(), n);
}

/// An attempt back from its pipeline pass whose count was lost (the replica that counted it
/// died after counting) runs again once half its time is gone.
#[test]
fn returned_attempt_missing_a_count_runs_again() {
    let mut r = Run::new(2, 1, 1, |_| vec![p(1), p(3)]);
    let key = r.key(0);
    r.event(Event::HeadDone { key, loss: 1.0 });
    // Stage 1 never reports its count; stage 0 does; the input gradient comes back.
    r.event(Event::Counted {
        from: p(1),
        key,
        stage: 0,
    });
    r.event(Event::EmbedDone { key });
    assert!(r.releases.is_empty());
    r.advance(TIMEOUT / 2);
    assert_eq!(r.releases, vec![(key, Outcome::Requeued, None)]);
    let again = *r.started(0).last().unwrap();
    assert_eq!(
        (again.0.attempt, again.1, again.2, again.3),
        (1, 0b10, false, false)
    );
}

/// Four micro-batches on 2 stages x 2 replicas, all counted (stage 1's replicas are 3 and 4).
fn counted_step() -> Run {
    let mut r = Run::new(2, 4, 4, alternate);
    for mb in 0..4 {
        r.complete(mb, &alternate(mb));
    }
    assert!(r.sm.micro_batches_done());
    r.close();
    r
}

/// A replica of stage 1 dies after counting and before the sync (found by the probe): its
/// micro-batches run again for stage 1 only, on the survivor.
#[test]
fn death_before_the_sync_reruns_its_stage_column_on_the_survivor() {
    let mut r = counted_step();
    r.router = Box::new(|_| vec![p(1), p(3)]);
    r.event(Event::PeerLost(p(4)));
    assert_eq!(r.sm.book().incomplete(), vec![1, 3]);
    for mb in [1, 3] {
        let again = *r.started(mb).last().unwrap();
        assert_eq!(
            (again.0.attempt, again.1, again.2, again.3),
            (1, 0b10, false, false)
        );
        r.complete(mb, &[p(1), p(3)]);
    }
    assert!(r.sm.micro_batches_done());
    assert_eq!(r.sm.book().stage_counts(1)[&p(3)], 4);
    assert_eq!(r.sm.book().stage_counts(0).len(), 2, "stage 0 untouched");
}

/// A death mid-sync (`replica_crash_at_sync_start_resets_the_stage_and_reruns`): stage 0 has
/// synced, stage 1's survivor is stuck waiting for the dead replica's share, so stage 1's sync
/// is redone: its counts are dropped and every micro-batch runs again for stage 1 only, on the
/// survivor; stage 0's counts (frozen) and the ends' stay.
#[test]
fn death_mid_sync_redoes_only_the_stuck_stage() {
    let mut r = counted_step();
    r.event(Event::StageSynced(0));
    r.router = Box::new(|_| vec![p(2), p(3)]);
    // The driver's order: the lost participant, then the stage reset.
    r.sm.handle(Event::PeerLost(p(4)), r.now);
    r.sm.handle(Event::StageReset(1), r.now);
    r.perform();
    assert_eq!(r.sm.book().incomplete(), vec![0, 1, 2, 3]);
    let reruns: Vec<usize> = r.forwards[4..].iter().map(|f| f.0.mb as usize).collect();
    // The dead replica's first (lost with it), then the rest of the stage's (reset).
    assert_eq!(reruns, vec![1, 3, 0, 2]);
    assert!(
        r.forwards[4..]
            .iter()
            .all(|f| (f.1, f.2, f.3) == (0b10, false, false))
    );
    for mb in 0..4 {
        r.complete(mb, &[p(2), p(3)]);
    }
    let book = r.sm.book();
    assert!(book.all_complete());
    assert_eq!(book.stage_counts(1)[&p(3)], 4);
    assert!(!book.stage_counts(1).contains_key(&p(4)));
    // Stage 0's counts are those of the first pass (the reruns asked it nothing).
    assert_eq!(book.stage_counts(0)[&p(1)], 2);
    assert_eq!(book.stage_counts(0)[&p(2)], 2);
}

/// A death after its stage synced (`replica_crash_before_apply`): the survivor summed every
/// share, the dead one's included, so its counts stay and nothing runs again.
#[test]
fn death_after_its_stage_synced_costs_nothing() {
    let mut r = counted_step();
    r.event(Event::StageSynced(0));
    r.event(Event::StageSynced(1));
    let started = r.forwards.len();
    r.event(Event::PeerLost(p(4)));
    assert!(r.sm.micro_batches_done());
    assert_eq!(r.forwards.len(), started);
    assert_eq!(r.sm.book().stage_counts(1)[&p(4)], 2);
}

/// An audit ban discards the step's gradients everywhere: a fresh book, every micro-batch from
/// attempt 0 again, in order.
#[test]
fn discarded_step_runs_every_micro_batch_again() {
    let mut r = counted_step();
    r.router = Box::new(|_| vec![p(1), p(3)]);
    r.event(Event::Discarded);
    assert_eq!(r.sm.book().retries(), 0);
    let again: Vec<(u32, u32)> = r.forwards[4..]
        .iter()
        .map(|f| (f.0.mb, f.0.attempt))
        .collect();
    assert_eq!(again, vec![(0, 0), (1, 0), (2, 0), (3, 0)]);
}

/// A count for another step is ignored; one for a micro-batch or column the attempt was not
/// asked for excludes the reporter.
#[test]
fn counts_of_another_step_are_ignored() {
    let mut r = Run::new(2, 1, 1, |_| vec![p(1), p(3)]);
    let key = r.key(0);
    r.event(Event::Counted {
        from: p(3),
        key: MbKey { step: 6, ..key },
        stage: 1,
    });
    assert!(!r.sm.book().is_excluded(&p(3)));
    r.event(Event::Counted {
        from: p(3),
        key,
        stage: 0,
    });
    assert!(
        r.sm.book().is_excluded(&p(3)),
        "counted a column it does not serve"
    );
}

/// No route: the micro-batch waits first in line and is asked for again at the next poll.
#[test]
fn unroutable_micro_batch_waits_first_in_line() {
    let cfg = MachineConfig {
        stages: 2,
        micro_batches: 3,
        max_in_flight: 3,
        attempt_timeout: TIMEOUT,
    };
    let mut sm = StepMachine::new(cfg, 0);
    let now = Instant::now();
    assert_eq!(sm.poll_action(), Some(Action::Route { mb: 0 }));
    // One route at a time.
    assert_eq!(sm.poll_action(), None);
    sm.handle(Event::Unroutable { mb: 0 }, now);
    assert_eq!(sm.poll_action(), Some(Action::Route { mb: 0 }));
    // A route of the wrong length is not an attempt.
    sm.handle(
        Event::Routed {
            mb: 0,
            route: vec![p(1)],
            expected_s: 1.0,
        },
        now,
    );
    assert_eq!(sm.in_flight(), 0);
    assert_eq!(sm.poll_action(), Some(Action::Route { mb: 0 }));
    // A slow route gets 4x its expected time when that is longer than the timeout.
    sm.handle(
        Event::Routed {
            mb: 0,
            route: vec![p(1), p(3)],
            expected_s: 5.0,
        },
        now,
    );
    assert_eq!(sm.poll_timeout(), Some(now + Duration::from_secs(20)));
}

/// A closed phase (the step given up for a restore, or every micro-batch counted) only
/// releases: its attempts are abandoned and no route is asked for until an event makes a
/// micro-batch incomplete again.
#[test]
fn a_closed_phase_releases_and_routes_nothing_until_reopened() {
    let mut r = Run::new(2, 2, 2, alternate);
    let (k0, k1) = (r.key(0), r.key(1));
    r.sm.close_micro_batches();
    let mut polled = Vec::new();
    while let Some(a) = r.sm.poll_action() {
        polled.push(a);
    }
    let dropped = |key| Action::Release {
        key,
        outcome: Outcome::Dropped,
        abandon: Some(Abandon::FORWARD),
    };
    assert_eq!(polled, vec![dropped(k0), dropped(k1)]);
    assert!(!r.sm.micro_batches_done());
    // A discard (an audit's ban) reopens it: both micro-batches from a fresh book.
    r.event(Event::Discarded);
    let again: Vec<(u32, u32)> = r.forwards[2..]
        .iter()
        .map(|f| (f.0.mb, f.0.attempt))
        .collect();
    assert_eq!(again, vec![(0, 0), (1, 0)]);
}

/// An accepted output that proves bad (its receipt or frame) fails the attempt on the route's
/// end that delivered it: the last hop for a forward output, the first for an input gradient.
#[test]
fn a_rejected_output_blames_the_end_that_delivered_it() {
    let mut r = Run::new(2, 2, 2, alternate);
    let (k0, k1) = (r.key(0), r.key(1));
    r.event(Event::Rejected {
        key: k0,
        pass: Pass::Forward,
    });
    assert!(
        r.releases
            .contains(&(k0, Outcome::Failed(p(3)), Some(Abandon::FORWARD)))
    );
    r.event(Event::HeadDone { key: k1, loss: 1.0 });
    r.event(Event::Rejected {
        key: k1,
        pass: Pass::Backward,
    });
    assert!(
        r.releases
            .contains(&(k1, Outcome::Failed(p(2)), Some(Abandon::BACKWARD)))
    );
    // A rejection of an attempt that is over changes nothing.
    let n = r.releases.len();
    r.event(Event::Rejected {
        key: k0,
        pass: Pass::Forward,
    });
    assert_eq!(r.releases.len(), n);
}
