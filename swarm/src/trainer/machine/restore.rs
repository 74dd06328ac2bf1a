//! Restoring the run after a stage lost its state, with no I/O. The driver (`driver/restore.rs`)
//! performs each [`RestoreAction`] of [`Restore::poll_action`] and answers the ones that name an
//! event.
//!
//! The order, and why:
//! 1. Load the latest checkpoint of the run's folder (none: the seed at step 0). A checkpoint of
//!    another run is refused: restoring it would silently train another model.
//! 2. Install it: the ends, the stage states the trainer serves, the registry in a new epoch
//!    with every replica joining (its state is of the abandoned timeline). Joiners are answered
//!    from here on with the restored state.
//! 3. Drain the old epoch's queued messages ([`stale`]): what still matters is acted on, the
//!    rest is void. A stage that looks lost meanwhile is not: every stage was just installed.
//! 4. Every replica registered at the install reloads from the trainer at the restored step
//!    (out of the router's view until it is ready again).
//! 5. The steps (and evaluations) after the restored step are forgotten: they run again.
//! 6. The restore is announced.

use crate::identity::PeerId;
use crate::membership::RunId;

/// The latest checkpoint found, from [`RestoreAction::Load`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Found {
    /// The run it belongs to.
    pub run: RunId,
    /// Steps done when it was written.
    pub step: u64,
}

/// What happened, fed to [`Restore::handle`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RestoreEvent {
    /// Answer to [`RestoreAction::Load`]: the latest checkpoint, if any.
    Loaded(Option<Found>),
    /// Answer to [`RestoreAction::Install`]: the new epoch and the replicas registered, (stage,
    /// replica) in stage order, now all joining.
    Installed {
        /// The restored run's epoch.
        epoch: u32,
        /// Every replica of the run.
        replicas: Vec<(usize, PeerId)>,
    },
    /// Answer to [`RestoreAction::Drain`].
    Drained,
}

/// What the driver must do, from [`Restore::poll_action`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RestoreAction {
    /// Read the latest checkpoint (if any); answer [`RestoreEvent::Loaded`].
    Load,
    /// The checkpoint belongs to another run: the restore fails.
    Foreign {
        /// The run the checkpoint belongs to.
        found: RunId,
    },
    /// Install the checkpoint's state (or the seed's) at `step` in a new epoch, every replica
    /// joining; answer [`RestoreEvent::Installed`].
    Install {
        /// Steps done in the restored state.
        step: u64,
        /// From a checkpoint (else the seed).
        from_checkpoint: bool,
    },
    /// Act on the old epoch's queued messages as [`stale`] says; a stage state loss they show is
    /// void. Answer [`RestoreEvent::Drained`].
    Drain,
    /// Take `peer` out of the router's view and tell it to reload `stage` at `step` from the
    /// trainer.
    Reload {
        /// Its stage.
        stage: usize,
        /// The replica.
        peer: PeerId,
        /// Steps done in the restored state.
        step: u64,
    },
    /// Forget the step reports after `step` and the evaluations after it (they run again).
    Trim {
        /// Steps done in the restored state.
        step: u64,
    },
    /// Tell the user: restored at `step` in `epoch`.
    Announce {
        /// Steps done in the restored state.
        step: u64,
        /// The new epoch.
        epoch: u32,
        /// From a checkpoint (else the seed).
        from_checkpoint: bool,
    },
}

/// A message of the old epoch still queued when the run restores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Queued {
    /// A replica stopped answering pings.
    Down,
    /// A replica asked to leave.
    Leave,
    /// A replica's sync report.
    SyncReport,
    /// Anything else (the abandoned step's pipeline traffic, a Ready of the old epoch).
    Other,
}

/// What the driver does with a queued message of the old epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stale {
    /// The replica is lost to the run.
    Lose,
    /// The replica is released at once, counted as left (its state is the trainer's copy now:
    /// nothing to hand off).
    Release,
    /// Only its traffic counts: the shares crossed the network.
    CountTraffic,
    /// Nothing: it belongs to the abandoned step.
    Void,
}

/// The verdict on a message of the old epoch: a death or a leave still holds in the new epoch;
/// a sync report's bytes were spent; the rest was about the abandoned step.
pub fn stale(q: Queued) -> Stale {
    match q {
        Queued::Down => Stale::Lose,
        Queued::Leave => Stale::Release,
        Queued::SyncReport => Stale::CountTraffic,
        Queued::Other => Stale::Void,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Load,
    Foreign(RunId),
    Install,
    Drain,
    Reload,
    Done,
}

/// One restore of the run. See the module documentation.
#[derive(Debug)]
pub struct Restore {
    run: RunId,
    state: State,
    /// The current state's action was polled and is not answered yet.
    issued: bool,
    step: u64,
    from_checkpoint: bool,
    epoch: u32,
    replicas: std::vec::IntoIter<(usize, PeerId)>,
    trimmed: bool,
}

impl Restore {
    /// A restore of run `run`.
    pub fn new(run: RunId) -> Restore {
        Restore {
            run,
            state: State::Load,
            issued: false,
            step: 0,
            from_checkpoint: false,
            epoch: 0,
            replicas: Vec::new().into_iter(),
            trimmed: false,
        }
    }

    /// The next thing to do (`None` while an action is unanswered, and at the end).
    pub fn poll_action(&mut self) -> Option<RestoreAction> {
        if self.issued {
            return None;
        }
        match self.state {
            State::Load => {
                self.issued = true;
                Some(RestoreAction::Load)
            }
            State::Foreign(found) => {
                self.state = State::Done;
                Some(RestoreAction::Foreign { found })
            }
            State::Install => {
                self.issued = true;
                Some(RestoreAction::Install {
                    step: self.step,
                    from_checkpoint: self.from_checkpoint,
                })
            }
            State::Drain => {
                self.issued = true;
                Some(RestoreAction::Drain)
            }
            State::Reload => {
                if let Some((stage, peer)) = self.replicas.next() {
                    return Some(RestoreAction::Reload {
                        stage,
                        peer,
                        step: self.step,
                    });
                }
                if !self.trimmed {
                    self.trimmed = true;
                    return Some(RestoreAction::Trim { step: self.step });
                }
                self.state = State::Done;
                Some(RestoreAction::Announce {
                    step: self.step,
                    epoch: self.epoch,
                    from_checkpoint: self.from_checkpoint,
                })
            }
            State::Done => None,
        }
    }

    /// Feeds the answer to the last action. An event that does not answer it is ignored.
    pub fn handle(&mut self, event: RestoreEvent) {
        if !self.issued {
            return;
        }
        let next = match (self.state, event) {
            (State::Load, RestoreEvent::Loaded(found)) => match found {
                Some(f) if f.run != self.run => State::Foreign(f.run),
                Some(f) => {
                    self.step = f.step;
                    self.from_checkpoint = true;
                    State::Install
                }
                None => State::Install,
            },
            (State::Install, RestoreEvent::Installed { epoch, replicas }) => {
                self.epoch = epoch;
                self.replicas = replicas.into_iter();
                State::Drain
            }
            (State::Drain, RestoreEvent::Drained) => State::Reload,
            (_, other) => {
                tracing::debug!(?other, state = ?self.state, "restore event out of order ignored");
                return;
            }
        };
        self.state = next;
        self.issued = false;
    }
}

#[cfg(test)]
mod tests;
