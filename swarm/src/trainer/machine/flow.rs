//! The order of one step, with no I/O: the micro-batch phase (the [`StepMachine`]), the replica
//! probe, the audits, the sync rounds and their redos, the optimizer step, the apply, and a
//! multi-step sync's outer rounds; and when the step is given up because a stage's state is gone.
//!
//! The driver (`driver/step.rs`) asks [`StepFlow::poll_action`] what to do, performs it, and
//! answers with the matching [`FlowEvent`]; it tells the flow when a stage lost its state
//! ([`StepFlow::state_lost`]). The flow owns the step's [`StepMachine`] and feeds it what the
//! phases learn (replicas lost, stages synced or reset, the step discarded), so the exactly-once
//! accounting sees every phase in the order the flow decided.
//!
//! The order, and why:
//! 1. Micro-batches until every one is counted exactly once.
//! 2. A probe of the replicas still to sync: one that died after counting must not be asked to
//!    sync (a crash during the sync costs a redo). A death makes micro-batches incomplete: back
//!    to 1. Skipped when every replica of the run sent something in the micro-batch phase just
//!    ended (each was alive moments ago, as a probe would show; the probe's round trip was on
//!    every step's critical path).
//! 3. Audits, while the first sync round of every stage runs (nobody applies before both are
//!    done, so the replicas still hold the step's weights, receipts and frames, and the audits'
//!    round trips hide behind the sync's). A ban discards the step's gradients everywhere, the
//!    round's sums included (they may hold the cheater's outputs): every stage is reset and
//!    every micro-batch runs again (1).
//! 4. The sync of the stages not yet synced (a redo, below: no audit runs again). A stage whose round broke (a participant lost
//!    before every survivor summed) is reset to the step's start and its micro-batches run
//!    again for that stage only (1), in its next round.
//! 5. The optimizer step of the ends (with the global norm of every stage's), then the apply on
//!    every replica.
//! 6. At a multi-step sync's boundary, outer rounds until every stage synced (a lost participant
//!    makes the survivors redo their stage's round), at most [`MAX_OUTER_ROUNDS`], then their
//!    apply.
//!
//! A lost stage state (no replica and nobody holds it) abandons the step before the
//! micro-batches or a sync start; after the apply it only skips the outer rounds (the driver
//! restores the run and the step does not count).

use std::time::Instant;

use super::sync::SyncOutcome;
use super::{Event, StepMachine};
use crate::identity::PeerId;
use crate::protocol::SyncPhase;

#[cfg(test)]
mod tests;

/// Outer rounds one boundary tries before the run gives up (each loses at least one
/// participant).
pub const MAX_OUTER_ROUNDS: u32 = 8;

/// The step's sync mode.
#[derive(Clone, Copy, Debug)]
pub struct FlowConfig {
    /// Stages of the run.
    pub stages: usize,
    /// A multi-step sync: replicas drift between sync boundaries, so the step's gradient rounds
    /// are local ([`SyncPhase::Local`]) rather than all-reduces.
    pub drifts: bool,
    /// The step ends at a multi-step sync's boundary: outer rounds follow the apply.
    pub outer_boundary: bool,
}

/// What the driver must do next, from [`StepFlow::poll_action`]; each is answered with the
/// [`FlowEvent`] named.
#[derive(Clone, Debug, PartialEq)]
pub enum FlowAction {
    /// Drive the [`StepMachine`] ([`StepFlow::machine_mut`]) until every micro-batch is counted
    /// (or a stage's state is lost); answer [`FlowEvent::MicroBatchesDone`], saying whether every
    /// replica was heard from meanwhile.
    MicroBatches,
    /// Ping the replicas of these stages; answer [`FlowEvent::Probed`].
    Probe {
        /// The stages still to sync.
        stages: Vec<usize>,
    },
    /// Audit the step while running the first sync round of every stage (as
    /// [`FlowAction::Sync`]); answer [`FlowEvent::AuditedAndSynced`].
    AuditAndSync {
        /// Every stage.
        stages: Vec<usize>,
        /// Every stage's round number.
        rounds: Vec<u32>,
        /// A gradient all-reduce, or a multi-step sync's local round.
        phase: SyncPhase,
    },
    /// Discard the step's gradients: reset every stage's replicas to the step's start and zero
    /// the ends' gradients; answer [`FlowEvent::Discarded`].
    Discard {
        /// Every stage.
        stages: Vec<usize>,
    },
    /// Run one sync round of `stages` (`rounds[k]`: stage `k`'s round number); answer
    /// [`FlowEvent::Synced`].
    Sync {
        /// The stages not synced yet.
        stages: Vec<usize>,
        /// Every stage's round number (bumped at each redo).
        rounds: Vec<u32>,
        /// A gradient all-reduce, or a multi-step sync's local round.
        phase: SyncPhase,
    },
    /// Reset the replicas of these stages to the step's start (their round broke); answer
    /// [`FlowEvent::Reset`].
    Reset {
        /// The stages whose round broke.
        stages: Vec<usize>,
    },
    /// The ends' optimizer step with the global norm: `stage_sq_norms` (in stage order) plus
    /// the ends' own; answer [`FlowEvent::Optimized`].
    Optimize {
        /// Each stage's agreed squared gradient norm, in stage order.
        stage_sq_norms: Vec<f64>,
    },
    /// Apply the step on every replica (and reload the odd ones out); answer
    /// [`FlowEvent::Applied`].
    Apply {
        /// The phase of the step's sync rounds.
        phase: SyncPhase,
    },
    /// One outer round of `stages`; answer [`FlowEvent::OuterSynced`].
    OuterSync {
        /// The stages whose outer round is not done yet.
        stages: Vec<usize>,
        /// Every stage's outer round number.
        rounds: Vec<u32>,
    },
    /// Apply the outer step on every replica; answer [`FlowEvent::OuterApplied`].
    OuterApply,
    /// The step is done: report it, release the leavers.
    Finish,
    /// A stage's state is gone: give the step up (the run restores).
    Abandon,
    /// The outer sync failed [`MAX_OUTER_ROUNDS`] times: the run cannot go on.
    GiveUp {
        /// Outer rounds tried.
        rounds: u32,
    },
}

/// What a [`FlowAction`] ended with.
#[derive(Debug)]
pub enum FlowEvent {
    /// Every micro-batch is counted (the driver stopped driving the machine).
    MicroBatchesDone {
        /// Every replica of every stage sent a message during this micro-batch phase: none needs
        /// a probe.
        all_heard: bool,
    },
    /// These replicas did not answer the probe (the driver already took them out of the run).
    Probed {
        /// The replicas that did not answer.
        dead: Vec<PeerId>,
    },
    /// The audits banned these replicas (taken out of the run already), and the sync round run
    /// meanwhile ended with this outcome (its failed peers taken out of the run already).
    AuditedAndSynced {
        /// The replicas banned.
        banned: Vec<PeerId>,
        /// The sync round's outcome.
        outcome: SyncOutcome,
    },
    /// The step's gradients are discarded everywhere.
    Discarded,
    /// A sync round's outcome (its failed peers taken out of the run already).
    Synced(SyncOutcome),
    /// The broken stages' replicas are back at the step's start.
    Reset,
    /// The ends took their optimizer step.
    Optimized,
    /// The step was applied on every replica.
    Applied {
        /// Replicas whose digest disagreed with their stage's majority.
        mismatches: u64,
    },
    /// An outer round's outcome (its failed peers taken out of the run already).
    OuterSynced(SyncOutcome),
    /// The outer step was applied on every replica.
    OuterApplied {
        /// Replicas whose digest disagreed.
        mismatches: u64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    MicroBatches,
    Probe,
    Audit,
    Discard,
    Sync,
    Reset,
    Optimize,
    Apply,
    OuterSync,
    OuterApply,
    Finish,
    Abandon,
    GiveUp,
}

/// One step's order. See the module documentation.
#[derive(Debug)]
pub struct StepFlow {
    cfg: FlowConfig,
    sm: StepMachine,
    state: State,
    /// The current state's action was polled and is not answered yet.
    issued: bool,
    state_lost: bool,
    /// Stages whose gradients are not synced yet (ascending).
    pending: Vec<usize>,
    rounds: Vec<u32>,
    norms: Vec<Option<f64>>,
    participants: Vec<usize>,
    mismatches: u64,
    outer_pending: Vec<usize>,
    outer_rounds: Vec<u32>,
    outer_tries: u32,
}

impl StepFlow {
    /// The order of the step `sm` runs.
    pub fn new(cfg: FlowConfig, sm: StepMachine) -> StepFlow {
        StepFlow {
            sm,
            state: State::MicroBatches,
            issued: false,
            state_lost: false,
            pending: (0..cfg.stages).collect(),
            rounds: vec![0; cfg.stages],
            norms: vec![None; cfg.stages],
            participants: vec![0; cfg.stages],
            mismatches: 0,
            outer_pending: (0..cfg.stages).collect(),
            outer_rounds: vec![0; cfg.stages],
            outer_tries: 0,
            cfg,
        }
    }

    /// The step's micro-batch machine.
    pub fn machine(&self) -> &StepMachine {
        &self.sm
    }

    /// The step's micro-batch machine, to drive in [`FlowAction::MicroBatches`] (and to settle
    /// the releases the phases cause).
    pub fn machine_mut(&mut self) -> &mut StepMachine {
        &mut self.sm
    }

    /// Replica hash and norm disagreements so far (sync rounds, applies).
    pub fn mismatches(&self) -> u64 {
        self.mismatches
    }

    /// The participants of each stage's sync.
    pub fn participants(&self) -> &[usize] {
        &self.participants
    }

    /// A stage lost its last replica and nobody holds its state: the step is given up at the
    /// next point where that is still possible.
    /// Before the micro-batches (or while they run: the driver stops driving them) or a sync
    /// round, the step is abandoned; before an outer round, the step finishes without it.
    pub fn state_lost(&mut self) {
        self.state_lost = true;
        let next = match self.state {
            State::MicroBatches => State::Abandon,
            State::Audit | State::Sync | State::OuterSync if !self.issued => {
                if self.state != State::OuterSync {
                    State::Abandon
                } else {
                    State::Finish
                }
            }
            _ => return,
        };
        self.state = next;
        self.issued = false;
    }

    /// The next thing to do, once per phase (`None` while the last one is unanswered, and
    /// after [`FlowAction::Finish`], [`FlowAction::Abandon`] or [`FlowAction::GiveUp`]).
    pub fn poll_action(&mut self, _now: Instant) -> Option<FlowAction> {
        if self.issued {
            return None;
        }
        self.issued = true;
        Some(match self.state {
            State::MicroBatches => FlowAction::MicroBatches,
            State::Probe => FlowAction::Probe {
                stages: self.pending.clone(),
            },
            State::Audit => FlowAction::AuditAndSync {
                stages: self.pending.clone(),
                rounds: self.rounds.clone(),
                phase: self.gradient_phase(),
            },
            State::Discard => FlowAction::Discard {
                stages: (0..self.cfg.stages).collect(),
            },
            State::Sync => FlowAction::Sync {
                stages: self.pending.clone(),
                rounds: self.rounds.clone(),
                phase: self.gradient_phase(),
            },
            State::Reset => FlowAction::Reset {
                stages: self.pending.clone(),
            },
            State::Optimize => FlowAction::Optimize {
                stage_sq_norms: self.norms.iter().map(|n| n.unwrap_or(0.0)).collect(),
            },
            State::Apply => FlowAction::Apply {
                phase: self.gradient_phase(),
            },
            State::OuterSync => FlowAction::OuterSync {
                stages: self.outer_pending.clone(),
                rounds: self.outer_rounds.clone(),
            },
            State::OuterApply => FlowAction::OuterApply,
            State::Finish => FlowAction::Finish,
            State::Abandon => FlowAction::Abandon,
            State::GiveUp => FlowAction::GiveUp {
                rounds: self.outer_tries,
            },
        })
    }

    /// Feeds what the last action ended with. An event that does not answer the action polled
    /// last is ignored.
    pub fn handle(&mut self, event: FlowEvent, now: Instant) {
        if !self.issued {
            return;
        }
        let next = match (self.state, event) {
            (State::MicroBatches, FlowEvent::MicroBatchesDone { all_heard }) => {
                // Attempts still in flight are complete: their late messages are ignored.
                self.sm.close_micro_batches();
                if all_heard && self.sm.micro_batches_done() {
                    self.after_probe()
                } else {
                    State::Probe
                }
            }
            (State::Probe, FlowEvent::Probed { dead }) => {
                for p in &dead {
                    self.sm.handle(Event::PeerLost(*p), now);
                }
                if !self.sm.micro_batches_done() {
                    State::MicroBatches
                } else {
                    self.after_probe()
                }
            }
            (State::Audit, FlowEvent::AuditedAndSynced { banned, outcome }) => {
                if banned.is_empty() {
                    self.synced(outcome, now)
                } else {
                    // The banned are out of the run; the discard drops every count and every
                    // sum the round made, theirs too.
                    State::Discard
                }
            }
            (State::Discard, FlowEvent::Discarded) => {
                self.sm.handle(Event::Discarded, now);
                State::MicroBatches
            }
            (State::Sync, FlowEvent::Synced(outcome)) => self.synced(outcome, now),
            (State::Reset, FlowEvent::Reset) => {
                // The survivors were stuck in the sync with their accumulators; reset to the
                // step's start (nobody applied), their micro-batches run again.
                for &k in &self.pending {
                    self.sm.handle(Event::StageReset(k as u16), now);
                }
                State::MicroBatches
            }
            (State::Optimize, FlowEvent::Optimized) => State::Apply,
            (State::Apply, FlowEvent::Applied { mismatches }) => {
                self.mismatches += mismatches;
                if self.cfg.drifts && self.cfg.outer_boundary {
                    State::OuterSync
                } else {
                    State::Finish
                }
            }
            (State::OuterSync, FlowEvent::OuterSynced(outcome)) => {
                self.mismatches += outcome.norm_mismatches;
                self.outer_tries += 1;
                self.outer_pending
                    .retain(|k| !outcome.done.iter().any(|d| d.0 == *k));
                if self.outer_pending.is_empty() {
                    State::OuterApply
                } else if self.state_lost {
                    State::Finish
                } else if self.outer_tries >= MAX_OUTER_ROUNDS {
                    State::GiveUp
                } else {
                    for &k in &self.outer_pending {
                        self.outer_rounds[k] += 1;
                    }
                    State::OuterSync
                }
            }
            (State::OuterApply, FlowEvent::OuterApplied { mismatches }) => {
                self.mismatches += mismatches;
                State::Finish
            }
            (_, other) => {
                tracing::debug!(?other, state = ?self.state, "flow event out of order ignored");
                return;
            }
        };
        self.state = next;
        self.issued = false;
    }

    /// A sync round's outcome: the stages done keep their norms; the broken ones are reset.
    fn synced(&mut self, outcome: SyncOutcome, now: Instant) -> State {
        for &(k, norm, parts) in &outcome.done {
            self.norms[k] = Some(norm);
            self.participants[k] = parts;
            // Its replicas hold the summed gradient: losing one now costs no count.
            self.sm.handle(Event::StageSynced(k as u16), now);
        }
        self.mismatches += outcome.norm_mismatches;
        for p in &outcome.failed_peers {
            self.sm.handle(Event::PeerLost(*p), now);
        }
        self.pending.retain(|k| self.norms[*k].is_none());
        if self.pending.is_empty() {
            State::Optimize
        } else {
            for &k in &self.pending {
                self.rounds[k] += 1;
            }
            State::Reset
        }
    }

    /// After a probe that found every micro-batch still counted: audits with the first round
    /// while no stage synced (the replicas still hold the step's weights), else the sync of the
    /// rest.
    fn after_probe(&self) -> State {
        if self.pending.len() == self.cfg.stages {
            State::Audit
        } else {
            State::Sync
        }
    }

    fn gradient_phase(&self) -> SyncPhase {
        if self.cfg.drifts {
            SyncPhase::Local
        } else {
            SyncPhase::Gradient
        }
    }
}
