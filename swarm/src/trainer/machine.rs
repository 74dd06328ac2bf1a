//! The decisions of one step, as a state machine with no I/O (issue #16), in the style of
//! quinn-proto's `Connection`: the driver feeds what happened with [`StepMachine::handle`] (and
//! [`StepMachine::handle_timeout`] when [`StepMachine::poll_timeout`] has passed), then performs
//! every [`Action`] that [`StepMachine::poll_action`] returns. Time is passed in; the machine
//! draws no randomness (routes come from the router, a pure function the driver calls on its
//! view when the machine asks for one).
//!
//! It decides, for the micro-batch phase: which micro-batch starts next (up to `max_in_flight`
//! at once), its attempt number and what each column accumulates (through [`StepBook`]), its
//! deadline, which reports belong to the current attempt (only the route's last replica may
//! deliver the forward output, only its first the input gradient, each once), who is blamed for
//! a failure, when an attempt is released (done, failed, timed out, or back without all its
//! counts) and whether its route must be told to `Abandon` it (and which passes went
//! unreported), exactly-once counting, and which micro-batches run again after a replica is lost
//! or excluded, a stage's sync is redone, or the step's gradients are discarded.
//!
//! The driver (`driver/step.rs`) owns the sockets, the compute, the router's view, metrics and
//! the payload of each attempt (frames, contexts, targets); it holds no decision of its own.
//!
//! The step boundary's sync rounds are [`sync::SyncRound`]: who takes part with which counts,
//! which reports count, who is stuck when a participant dies, the deadline, the majority. When
//! joiners are answered and how long a boundary waits for them is [`join`].

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use super::book::{Column, CountOutcome, Holder, StepBook};
use crate::identity::PeerId;
use crate::protocol::{Abandon, MbKey, Traffic};
use crate::receipt::Pass;

pub mod flow;
pub mod join;
pub mod replicas;
pub mod restore;
pub mod sync;
pub mod wait;

#[cfg(test)]
mod tests;

/// The shape of a step.
#[derive(Clone, Copy, Debug)]
pub struct MachineConfig {
    /// Pipeline stages (every route has one replica of each).
    pub stages: usize,
    /// Micro-batches of the step (each counted exactly once in every column).
    pub micro_batches: usize,
    /// Micro-batches in flight at once (at least 1).
    pub max_in_flight: usize,
    /// An attempt not finished after this long (or 4x the router's expected time, if longer)
    /// fails and the micro-batch runs again.
    pub attempt_timeout: Duration,
}

/// What happened, fed to [`StepMachine::handle`].
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Answer to [`Action::Route`]: the router's route for `mb` (`route[k]` serves stage `k`) and
    /// its expected seconds end to end.
    Routed {
        /// The micro-batch routed.
        mb: usize,
        /// One replica per stage, in stage order.
        route: Vec<PeerId>,
        /// The router's expected seconds end to end.
        expected_s: f64,
    },
    /// Answer to [`Action::Route`]: some stage has no routable replica; `mb` waits.
    Unroutable {
        /// The micro-batch that waits.
        mb: usize,
    },
    /// The head ran on the forward output of `key` (accepted by [`StepMachine::accept_output`]):
    /// it counted if it was asked to, with this loss, and the loss gradient was sent back.
    HeadDone {
        /// The attempt.
        key: MbKey,
        /// Its micro-batch's loss.
        loss: f64,
    },
    /// The embedding took the input gradient of `key` (accepted by
    /// [`StepMachine::accept_output`]), accumulating if it was asked to.
    EmbedDone {
        /// The attempt.
        key: MbKey,
    },
    /// An output of `key` accepted by [`StepMachine::accept_output`] proved bad (its receipt,
    /// its frame): the attempt fails on the route's end that delivered it.
    Rejected {
        /// The attempt.
        key: MbKey,
        /// Which output proved bad.
        pass: Pass,
    },
    /// Our send of attempt `key` to `peer` failed (`busy`: it refused for lack of room, no
    /// fault of its own).
    Failed {
        /// The attempt.
        key: MbKey,
        /// Who the send went to.
        peer: PeerId,
        /// It refused for lack of room.
        busy: bool,
    },
    /// A hop of `key`'s route (`from`) reports that the next one (`failed`) failed, with what
    /// the failed pass had sent (`traffic`, echoed in [`Action::ChargeFailedPass`]).
    HopFailed {
        /// The reporting hop.
        from: PeerId,
        /// The attempt.
        key: MbKey,
        /// The next hop, which failed.
        failed: PeerId,
        /// It refused for lack of room.
        busy: bool,
        /// What the failed pass had sent.
        traffic: Traffic,
    },
    /// `from`, a replica of `stage`, added `key`'s gradient to its accumulator.
    Counted {
        /// The replica that counted.
        from: PeerId,
        /// The attempt.
        key: MbKey,
        /// Its stage.
        stage: u32,
    },
    /// A replica is gone for this step (dead, banned, failed its sync): what it counted is
    /// dropped (unless its stage already synced) and its attempts fail.
    PeerLost(PeerId),
    /// Stage `k`'s replicas summed every share: their counts are final.
    StageSynced(u16),
    /// Stage `k`'s sync is redone from the step's start (its replicas were reset): its counts
    /// are dropped and those micro-batches run again for that stage only.
    StageReset(u16),
    /// The step's gradients were discarded everywhere (an audit banned a replica): every
    /// micro-batch runs again from a fresh book.
    Discarded,
}

/// Why an attempt was released.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every column counted: its hops did well.
    Completed,
    /// It failed on this peer.
    Failed(PeerId),
    /// This peer refused it for lack of room: no fault.
    Busy(PeerId),
    /// Its deadline passed: every hop is mildly suspect.
    TimedOut,
    /// It came back but lost counts meanwhile (a replica died after counting): the micro-batch
    /// runs again for the missing columns.
    Requeued,
    /// The micro-batch phase ended (or the step was given up) while it was in flight.
    Dropped,
}

/// What the driver must do, from [`StepMachine::poll_action`].
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Ask the router for a route for `mb`, then answer with [`Event::Routed`] or
    /// [`Event::Unroutable`] before anything else.
    Route {
        /// The micro-batch to route.
        mb: usize,
    },
    /// Start attempt `key` along the route just given: embedding forward, `Forward` to stage 0
    /// with `accumulate` (bit `k`: stage `k` adds this attempt's gradient). `head` and
    /// `embedding`: whether the trainer's ends accumulate it.
    Forward {
        /// The new attempt.
        key: MbKey,
        /// Bit `k`: stage `k` adds this attempt's gradient.
        accumulate: u64,
        /// The head accumulates it.
        head: bool,
        /// The embedding accumulates it.
        embedding: bool,
    },
    /// Count what a failed pass of `key` had sent (`traffic` of its [`Event::HopFailed`]) on
    /// the activation channel, or the gradient one if `backward`.
    ChargeFailedPass {
        /// The attempt.
        key: MbKey,
        /// The failed pass was the backward one.
        backward: bool,
        /// What it had sent.
        traffic: Traffic,
    },
    /// Attempt `key` is over: release its router load, report `outcome` to the router's health,
    /// and when `abandon` is set, send `Abandon { uncounted: abandon }` to its route.
    Release {
        /// The attempt.
        key: MbKey,
        /// Why it is over.
        outcome: Outcome,
        /// The passes its route must abandon (`Abandon::uncounted`), if any.
        abandon: Option<u8>,
    },
}

/// An output accepted by [`StepMachine::accept_output`]: whether the trainer's end (the head
/// for a forward output, the embedding for an input gradient) accumulates it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Accepted {
    /// The trainer's end accumulates this output's gradient.
    pub accumulate: bool,
}

/// One attempt in flight.
#[derive(Clone, Debug)]
struct Attempt {
    key: MbKey,
    route: Vec<PeerId>,
    head: bool,
    embedding: bool,
    deadline: Instant,
    /// The forward output came back and the loss gradient went out.
    forward_back: bool,
    /// The input gradient came back: the pipeline pass is over; only counts may be missing.
    returned: bool,
    /// A `HopFailed` reported what the failed pass had sent.
    reported: bool,
}

/// One step's decisions. See the module documentation.
#[derive(Debug)]
pub struct StepMachine {
    cfg: MachineConfig,
    step: u64,
    book: StepBook,
    queue: VecDeque<usize>,
    inflight: BTreeMap<usize, Attempt>,
    /// A route asked for and not answered yet.
    routing: Option<usize>,
    actions: VecDeque<Action>,
}

impl StepMachine {
    /// The machine of step `step`: every micro-batch queued, none in flight.
    pub fn new(cfg: MachineConfig, step: u64) -> StepMachine {
        StepMachine {
            cfg,
            step,
            book: StepBook::new(cfg.stages as u16, cfg.micro_batches),
            queue: (0..cfg.micro_batches).collect(),
            inflight: BTreeMap::new(),
            routing: None,
            actions: VecDeque::new(),
        }
    }

    /// The step this machine runs.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The step's exactly-once accounting (read by the sync, the audits and the report).
    pub fn book(&self) -> &StepBook {
        &self.book
    }

    /// Every micro-batch counted exactly once in every column.
    pub fn micro_batches_done(&self) -> bool {
        self.book.all_complete()
    }

    /// Micro-batches in flight.
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// The next thing to do. Routes are asked for only when nothing else is pending, one at a
    /// time, while fewer than `max_in_flight` attempts are in flight.
    pub fn poll_action(&mut self) -> Option<Action> {
        if let Some(a) = self.actions.pop_front() {
            return Some(a);
        }
        if self.routing.is_some() || self.inflight.len() >= self.cfg.max_in_flight.max(1) {
            return None;
        }
        while let Some(mb) = self.queue.pop_front() {
            if self.book.is_complete(mb) || self.inflight.contains_key(&mb) {
                continue;
            }
            self.routing = Some(mb);
            return Some(Action::Route { mb });
        }
        None
    }

    /// When [`StepMachine::handle_timeout`] must run next: the earliest attempt deadline.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.inflight.values().map(|a| a.deadline).min()
    }

    /// Whether an output from `from` for `key` belongs to the attempt in flight: the forward
    /// output from the route's last replica, once; the input gradient from its first, once.
    /// The driver checks its receipt and computes only then, and answers with
    /// [`Event::HeadDone`] / [`Event::EmbedDone`] or [`Event::Rejected`].
    pub fn accept_output(&self, from: PeerId, key: MbKey, pass: Pass) -> Option<Accepted> {
        let a = self.current(key)?;
        match pass {
            Pass::Forward => (a.route.last() == Some(&from) && !a.forward_back)
                .then_some(Accepted { accumulate: a.head }),
            Pass::Backward => (a.route.first() == Some(&from) && !a.returned).then_some(Accepted {
                accumulate: a.embedding,
            }),
        }
    }

    /// Feeds what happened at `now`.
    pub fn handle(&mut self, event: Event, now: Instant) {
        match event {
            Event::Routed {
                mb,
                route,
                expected_s,
            } => self.start(mb, route, expected_s, now),
            Event::Unroutable { mb } => {
                if self.routing.take() == Some(mb) {
                    self.queue.push_front(mb);
                }
            }
            Event::HeadDone { key, loss } => {
                let Some(a) = self.current_mut(key) else {
                    return;
                };
                a.forward_back = true;
                if a.head {
                    let mb = key.mb as usize;
                    self.book
                        .count(mb, key.attempt, Column::Head, Holder::Trainer);
                    self.book.set_loss(mb, loss);
                }
            }
            Event::EmbedDone { key } => {
                let Some(a) = self.current_mut(key) else {
                    return;
                };
                a.returned = true;
                if a.embedding {
                    self.book.count(
                        key.mb as usize,
                        key.attempt,
                        Column::Embedding,
                        Holder::Trainer,
                    );
                }
            }
            Event::Rejected { key, pass } => {
                let Some(a) = self.current(key) else {
                    return;
                };
                let end = match pass {
                    Pass::Forward => a.route.last(),
                    Pass::Backward => a.route.first(),
                };
                if let Some(&peer) = end {
                    self.fail(key.mb as usize, Outcome::Failed(peer));
                }
            }
            Event::Failed { key, peer, busy } => {
                if self.current(key).is_some() {
                    let outcome = if busy {
                        Outcome::Busy(peer)
                    } else {
                        Outcome::Failed(peer)
                    };
                    self.fail(key.mb as usize, outcome);
                }
            }
            Event::HopFailed {
                from,
                key,
                failed,
                busy,
                traffic,
            } => {
                let Some(a) = self.current_mut(key) else {
                    return;
                };
                if !a.route.contains(&from) {
                    return;
                }
                a.reported = true;
                let backward = a.forward_back;
                self.actions.push_back(Action::ChargeFailedPass {
                    key,
                    backward,
                    traffic,
                });
                let outcome = if busy {
                    Outcome::Busy(failed)
                } else {
                    Outcome::Failed(failed)
                };
                self.fail(key.mb as usize, outcome);
            }
            Event::Counted { from, key, stage } => {
                if key.step != self.step {
                    return;
                }
                let out = self.book.count(
                    key.mb as usize,
                    key.attempt,
                    Column::Stage(stage as u16),
                    Holder::Peer(from),
                );
                if out == CountOutcome::Tainted {
                    tracing::warn!(peer = %from.short(), mb = key.mb, attempt = key.attempt, "unexpected count: replica excluded from this step");
                    // The book excluded it already: every micro-batch it had counted is
                    // incomplete again and must run again.
                    self.requeue_incomplete();
                }
            }
            Event::PeerLost(p) => {
                let through: Vec<usize> = self
                    .inflight
                    .iter()
                    .filter(|(_, a)| a.route.contains(&p))
                    .map(|(mb, _)| *mb)
                    .collect();
                self.book.exclude(p);
                for mb in through {
                    self.fail(mb, Outcome::Failed(p));
                }
                self.requeue_incomplete();
            }
            Event::StageSynced(k) => self.book.freeze_stage(k),
            Event::StageReset(k) => {
                self.book.clear_stage(k);
                self.requeue_incomplete();
            }
            Event::Discarded => {
                self.drop_all();
                self.book = StepBook::new(self.cfg.stages as u16, self.cfg.micro_batches);
                self.queue = (0..self.cfg.micro_batches).collect();
            }
        }
    }

    /// Deadlines at `now`, then attempts that are over: released when complete, or run again
    /// when they came back without every count and half their time is gone.
    pub fn handle_timeout(&mut self, now: Instant) {
        let late: Vec<usize> = self
            .inflight
            .iter()
            .filter(|(_, a)| a.deadline <= now)
            .map(|(mb, _)| *mb)
            .collect();
        for mb in late {
            self.fail(mb, Outcome::TimedOut);
        }
        let done: Vec<usize> = self
            .inflight
            .iter()
            .filter(|(mb, a)| a.returned && self.book.is_complete(**mb))
            .map(|(mb, _)| *mb)
            .collect();
        for mb in done {
            self.release(mb, Outcome::Completed);
        }
        let half = self.cfg.attempt_timeout / 2;
        let stale: Vec<usize> = self
            .inflight
            .iter()
            .filter(|(mb, a)| {
                a.returned && !self.book.is_complete(**mb) && a.deadline <= now + half
            })
            .map(|(mb, _)| *mb)
            .collect();
        for mb in stale {
            self.release(mb, Outcome::Requeued);
            self.queue.push_back(mb);
        }
    }

    /// Ends the micro-batch phase (every micro-batch is counted, or the step is given up):
    /// attempts still in flight are released, their late reports ignored, and nothing is
    /// routed until an event makes a micro-batch incomplete again (a loss, a reset, a discard),
    /// so that the actions polled meanwhile are releases only.
    pub fn close_micro_batches(&mut self) {
        self.drop_all();
        self.routing = None;
        self.queue.clear();
    }

    fn drop_all(&mut self) {
        let mbs: Vec<usize> = self.inflight.keys().copied().collect();
        for mb in mbs {
            self.release(mb, Outcome::Dropped);
        }
    }

    fn start(&mut self, mb: usize, route: Vec<PeerId>, expected_s: f64, now: Instant) {
        if self.routing.take() != Some(mb) || route.len() != self.cfg.stages {
            // Not asked for (or not a whole route): the micro-batch waits for another.
            if !self.queue.contains(&mb) && !self.book.is_complete(mb) {
                self.queue.push_front(mb);
            }
            return;
        }
        let att = self.book.start_attempt(mb, &route);
        let key = MbKey {
            step: self.step,
            mb: mb as u32,
            attempt: att.attempt,
        };
        let expected = if expected_s.is_finite() && expected_s > 0.0 {
            Duration::from_secs_f64((4.0 * expected_s).min(3600.0))
        } else {
            Duration::ZERO
        };
        self.inflight.insert(
            mb,
            Attempt {
                key,
                route,
                head: att.head,
                embedding: att.embedding,
                deadline: now + self.cfg.attempt_timeout.max(expected),
                forward_back: false,
                returned: false,
                reported: false,
            },
        );
        self.actions.push_back(Action::Forward {
            key,
            accumulate: att.stage_mask,
            head: att.head,
            embedding: att.embedding,
        });
    }

    fn current(&self, key: MbKey) -> Option<&Attempt> {
        self.inflight
            .get(&(key.mb as usize))
            .filter(|a| key.step == self.step && a.key == key)
    }

    fn current_mut(&mut self, key: MbKey) -> Option<&mut Attempt> {
        let step = self.step;
        self.inflight
            .get_mut(&(key.mb as usize))
            .filter(|a| key.step == step && a.key == key)
    }

    /// Gives up the attempt of `mb` and queues the micro-batch first.
    fn fail(&mut self, mb: usize, outcome: Outcome) {
        if self.inflight.contains_key(&mb) {
            self.release(mb, outcome);
            self.queue.push_front(mb);
        }
    }

    fn release(&mut self, mb: usize, outcome: Outcome) {
        let Some(a) = self.inflight.remove(&mb) else {
            return;
        };
        // The passes no message told us about (a deadline, a dead hop): its hops report the
        // frames they sent in them with their next SyncDone.
        let abandon = (!a.returned).then_some(match (a.reported, a.forward_back) {
            (true, _) => 0,
            (false, false) => Abandon::FORWARD,
            (false, true) => Abandon::BACKWARD,
        });
        self.actions.push_back(Action::Release {
            key: a.key,
            outcome,
            abandon,
        });
    }

    /// Queues (last) every incomplete micro-batch that is neither queued, in flight nor being
    /// routed: those that lost a count.
    fn requeue_incomplete(&mut self) {
        for mb in self.book.incomplete() {
            if !self.inflight.contains_key(&mb)
                && !self.queue.contains(&mb)
                && self.routing != Some(mb)
            {
                self.queue.push_back(mb);
            }
        }
    }
}
