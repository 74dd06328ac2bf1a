//! When joiners are let in, with no I/O. A peer asking to join (`Admit`) during a step, or
//! between the boundaries of a multi-step sync, is answered only at the next (sync) boundary,
//! when the replicas hold the state it must load; until it reports `Ready` it is neither routed
//! (the router's view holds serving replicas only) nor a sync participant. At a boundary the next
//! step waits for the joiners admitted so far, up to a deadline, after which the late ones are
//! dropped.
//!
//! [`Admissions`] decides when each pending `Admit` is answered: the trainer's handler feeds it
//! [`AdmitEvent::Asked`], the driver the step's start, an abandoned step and each boundary; every
//! [`AdmitAction`] it returns is an answer to send. Time is passed in: a pending `Admit` is
//! refused as busy at its deadline ([`Admissions::poll_timeout`]), below the joiner's own
//! request timeout, so the joiner asks again rather than giving up.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::identity::PeerId;

/// Whether an `Admit` is answered now: only between steps, at a state every replica agrees on.
fn admit_now(in_step: bool, at_sync_boundary: bool) -> bool {
    !in_step && at_sync_boundary
}

/// Names one pending `Admit` (the caller's count: a peer may ask twice).
pub type Ticket = u64;

/// What happened, fed to [`Admissions::handle`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdmitEvent {
    /// A peer asked to join `stage` (the registry already lists it as joining).
    Asked {
        /// Names the request in the answer.
        ticket: Ticket,
        /// The joiner.
        peer: PeerId,
        /// The stage it asked for.
        stage: u32,
    },
    /// A step started: replicas hold no state a joiner could load until it ends.
    StepStarted,
    /// The step was given up (a stage's state is gone): joiners wait for the restore's boundary,
    /// not for a state about to be replaced.
    StepAbandoned,
    /// Replicas hold the state after a finished step (or a restore). `at_sync_boundary`: every
    /// replica holds the same state (always, but between a multi-step sync's boundaries).
    Boundary {
        /// Every replica holds the same state.
        at_sync_boundary: bool,
    },
}

/// An answer to send, from [`Admissions::poll_action`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdmitAction {
    /// Admit `peer` to `stage`: tell it the current epoch, step and where it loads from.
    Admit {
        /// The request answered.
        ticket: Ticket,
        /// The joiner.
        peer: PeerId,
        /// Its stage.
        stage: u32,
    },
    /// No boundary came in time: take `peer` off `stage`'s joiners and refuse it as busy (it
    /// asks again).
    Refuse {
        /// The request answered.
        ticket: Ticket,
        /// The joiner.
        peer: PeerId,
        /// The stage it asked for.
        stage: u32,
    },
}

#[derive(Clone, Copy, Debug)]
struct Pending {
    ticket: Ticket,
    peer: PeerId,
    stage: u32,
    deadline: Instant,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Step,
    Abandoned,
    Boundary { at_sync_boundary: bool },
}

/// The pending `Admit`s and when each is answered. See the module documentation.
#[derive(Debug)]
pub struct Admissions {
    wait: Duration,
    phase: Phase,
    /// In arrival order.
    pending: Vec<Pending>,
    actions: VecDeque<AdmitAction>,
}

impl Admissions {
    /// Between steps (`at_sync_boundary`: at a state every replica holds); a pending `Admit`
    /// waits at most `wait` for a boundary.
    pub fn new(wait: Duration, at_sync_boundary: bool) -> Admissions {
        Admissions {
            wait,
            phase: Phase::Boundary { at_sync_boundary },
            pending: Vec::new(),
            actions: VecDeque::new(),
        }
    }

    /// A step is running (a state source chosen now is for the state after it).
    pub fn in_step(&self) -> bool {
        self.phase == Phase::Step
    }

    /// Feeds what happened at `now`.
    pub fn handle(&mut self, event: AdmitEvent, now: Instant) {
        match event {
            AdmitEvent::Asked {
                ticket,
                peer,
                stage,
            } => self.pending.push(Pending {
                ticket,
                peer,
                stage,
                deadline: now + self.wait,
            }),
            AdmitEvent::StepStarted => self.phase = Phase::Step,
            AdmitEvent::StepAbandoned => self.phase = Phase::Abandoned,
            AdmitEvent::Boundary { at_sync_boundary } => {
                self.phase = Phase::Boundary { at_sync_boundary }
            }
        }
        let open = match self.phase {
            Phase::Boundary { at_sync_boundary } => admit_now(false, at_sync_boundary),
            Phase::Step | Phase::Abandoned => false,
        };
        if open {
            for p in self.pending.drain(..) {
                self.actions.push_back(AdmitAction::Admit {
                    ticket: p.ticket,
                    peer: p.peer,
                    stage: p.stage,
                });
            }
        }
    }

    /// Refuses the pending `Admit`s whose deadline passed at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        let (late, waiting): (Vec<Pending>, Vec<Pending>) =
            self.pending.drain(..).partition(|p| p.deadline <= now);
        self.pending = waiting;
        self.actions
            .extend(late.into_iter().map(|p| AdmitAction::Refuse {
                ticket: p.ticket,
                peer: p.peer,
                stage: p.stage,
            }));
    }

    /// The next answer to send.
    pub fn poll_action(&mut self) -> Option<AdmitAction> {
        self.actions.pop_front()
    }

    /// When [`Admissions::handle_timeout`] must be called next (`None`: nothing pending).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.pending.iter().map(|p| p.deadline).min()
    }
}

/// What a step boundary does about the joiners still loading their state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BoundaryWait {
    /// Start the next step.
    Start,
    /// Hold it (handling messages) until this instant at the latest.
    Hold(Instant),
    /// The deadline passed: drop these joiners and start.
    Drop(Vec<PeerId>),
}

/// At a boundary (`at_sync_boundary`: joiners are answered here) with `joining` still loading,
/// given the boundary's `deadline`.
pub fn boundary_wait(
    joining: Vec<PeerId>,
    at_sync_boundary: bool,
    deadline: Instant,
    now: Instant,
) -> BoundaryWait {
    if !at_sync_boundary || joining.is_empty() {
        BoundaryWait::Start
    } else if now >= deadline {
        BoundaryWait::Drop(joining)
    } else {
        BoundaryWait::Hold(deadline)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const WAIT: Duration = Duration::from_secs(8);

    fn asked(ticket: Ticket, peer: PeerId) -> AdmitEvent {
        AdmitEvent::Asked {
            ticket,
            peer,
            stage: 1,
        }
    }

    fn actions(a: &mut Admissions) -> Vec<AdmitAction> {
        std::iter::from_fn(|| a.poll_action()).collect()
    }

    /// `peer_joining_mid_run_syncs_its_stage_and_serves`: a joiner asking during a step is
    /// answered at the boundary (not before), and the next step waits for it (bounded).
    #[test]
    fn a_joiner_during_a_step_is_answered_at_the_boundary_and_holds_the_next_step() {
        let j = PeerId([9; 32]);
        let t0 = Instant::now();
        let mut a = Admissions::new(WAIT, true);
        a.handle(AdmitEvent::StepStarted, t0);
        assert!(a.in_step());
        a.handle(asked(1, j), t0 + Duration::from_secs(1));
        assert_eq!(actions(&mut a), vec![], "not mid-step");
        assert_eq!(a.poll_timeout(), Some(t0 + Duration::from_secs(9)));
        a.handle_timeout(t0 + Duration::from_secs(5));
        assert_eq!(actions(&mut a), vec![], "its deadline has not come");
        a.handle(
            AdmitEvent::Boundary {
                at_sync_boundary: true,
            },
            t0 + Duration::from_secs(6),
        );
        assert!(!a.in_step());
        assert_eq!(
            actions(&mut a),
            vec![AdmitAction::Admit {
                ticket: 1,
                peer: j,
                stage: 1
            }]
        );
        assert_eq!(a.poll_timeout(), None, "nothing pending");

        // The next step holds for it until it is Ready, or drops it at the deadline.
        let now = t0 + Duration::from_secs(6);
        let deadline = now + Duration::from_secs(120);
        assert_eq!(
            boundary_wait(vec![j], true, deadline, now),
            BoundaryWait::Hold(deadline)
        );
        assert_eq!(
            boundary_wait(vec![], true, deadline, now),
            BoundaryWait::Start
        );
        assert_eq!(
            boundary_wait(vec![j], true, deadline, deadline),
            BoundaryWait::Drop(vec![j])
        );
    }

    /// Between steps, at a state every replica holds, a joiner is answered at once.
    #[test]
    fn a_joiner_between_steps_is_answered_at_once() {
        let j = PeerId([9; 32]);
        let now = Instant::now();
        let mut a = Admissions::new(WAIT, true);
        a.handle(asked(4, j), now);
        assert_eq!(
            actions(&mut a),
            vec![AdmitAction::Admit {
                ticket: 4,
                peer: j,
                stage: 1
            }]
        );
    }

    /// A step longer than the wait: the joiner is refused as busy at its deadline (it asks
    /// again), and a later boundary does not answer it twice.
    #[test]
    fn an_admit_still_pending_at_its_deadline_is_refused_once() {
        let (j, k) = (PeerId([9; 32]), PeerId([8; 32]));
        let t0 = Instant::now();
        let mut a = Admissions::new(WAIT, true);
        a.handle(AdmitEvent::StepStarted, t0);
        a.handle(asked(1, j), t0);
        a.handle(asked(2, k), t0 + Duration::from_secs(3));
        assert_eq!(
            a.poll_timeout(),
            Some(t0 + WAIT),
            "the earlier deadline first"
        );
        a.handle_timeout(t0 + WAIT);
        assert_eq!(
            actions(&mut a),
            vec![AdmitAction::Refuse {
                ticket: 1,
                peer: j,
                stage: 1
            }]
        );
        assert_eq!(a.poll_timeout(), Some(t0 + Duration::from_secs(11)));
        a.handle(
            AdmitEvent::Boundary {
                at_sync_boundary: true,
            },
            t0 + Duration::from_secs(10),
        );
        assert_eq!(
            actions(&mut a),
            vec![AdmitAction::Admit {
                ticket: 2,
                peer: k,
                stage: 1
            }],
            "only the one still waiting"
        );
    }

    /// A multi-step sync: between its boundaries replicas hold drifted states, so a joiner waits
    /// for the next sync boundary even between steps, and no step waits for it meanwhile.
    #[test]
    fn between_sync_boundaries_a_joiner_waits_and_holds_nothing() {
        let j = PeerId([9; 32]);
        let now = Instant::now();
        let mut a = Admissions::new(WAIT, true);
        a.handle(
            AdmitEvent::Boundary {
                at_sync_boundary: false,
            },
            now,
        );
        a.handle(asked(1, j), now);
        assert_eq!(actions(&mut a), vec![], "between sync boundaries");
        assert_eq!(boundary_wait(vec![j], false, now, now), BoundaryWait::Start);
        a.handle(AdmitEvent::StepStarted, now);
        a.handle(
            AdmitEvent::Boundary {
                at_sync_boundary: true,
            },
            now + Duration::from_secs(1),
        );
        assert_eq!(actions(&mut a).len(), 1, "at the sync boundary");
    }

    /// An abandoned step is no boundary: the joiner waits for the restore's, whose state it
    /// then loads.
    #[test]
    fn a_joiner_of_an_abandoned_step_waits_for_the_restore() {
        let j = PeerId([9; 32]);
        let now = Instant::now();
        let mut a = Admissions::new(WAIT, true);
        a.handle(AdmitEvent::StepStarted, now);
        a.handle(asked(1, j), now);
        a.handle(AdmitEvent::StepAbandoned, now);
        assert!(!a.in_step(), "no step runs");
        assert_eq!(actions(&mut a), vec![]);
        a.handle(
            AdmitEvent::Boundary {
                at_sync_boundary: true,
            },
            now,
        );
        assert_eq!(actions(&mut a).len(), 1);
    }
}
