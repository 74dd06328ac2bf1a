//! Waiting for replicas, with no I/O: before the first step until every stage has the replicas
//! it needs, and whenever a stage has none left (the run pauses). The driver
//! (`driver/peers.rs`) feeds [`ReplicaWait`] the serving counts after every message it handles,
//! performs each [`WaitAction`], and handles messages until [`ReplicaWait::poll_timeout`].
//!
//! The order, and why: a lost stage state restores the run first (the counts are of the old
//! epoch); then enough replicas end the wait; otherwise a change of the counts is reported once
//! (a stage with none after the first step is a pause, said to the user and the monitor), and at
//! the deadline the run fails rather than waiting forever.

use std::time::{Duration, Instant};

/// How often the counts are read again while no message arrives (a handler may have changed
/// them without waking the driver).
pub const RECHECK: Duration = Duration::from_millis(500);

/// What happened, fed to [`ReplicaWait::handle`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WaitEvent {
    /// The registry now: `serving[k]` replicas serve stage `k`, after `steps_done` steps.
    Counts {
        /// Serving replicas per stage.
        serving: Vec<usize>,
        /// Steps done (the run's state).
        steps_done: u64,
    },
    /// A stage lost its last replica and nobody holds its state.
    StateLost,
}

/// What the driver must do, from [`ReplicaWait::poll_action`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WaitAction {
    /// Restore the run from its latest checkpoint (or the seed), then feed the counts again.
    Restore,
    /// Every stage has the replicas it needs: the wait is over.
    Ready,
    /// Tell the user how many replicas serve each stage (they changed).
    Waiting {
        /// Serving replicas per stage.
        serving: Vec<usize>,
        /// Replicas each stage needs.
        need: usize,
    },
    /// Stage `stage` has no replica after the run started: mark the run paused.
    Paused {
        /// The first stage with none.
        stage: u32,
    },
    /// The deadline passed: the run cannot start (or go on).
    GiveUp {
        /// Serving replicas per stage.
        serving: Vec<usize>,
        /// Replicas each stage needs.
        need: usize,
    },
}

/// One wait for replicas. See the module documentation.
#[derive(Debug)]
pub struct ReplicaWait {
    need: usize,
    deadline: Instant,
    serving: Option<Vec<usize>>,
    steps_done: u64,
    state_lost: bool,
    /// The counts last reported.
    reported: Option<Vec<usize>>,
    /// A pause is reported with the counts that made it.
    paused: Option<u32>,
    /// The counts were last fed at this instant.
    checked: Option<Instant>,
    done: bool,
}

impl ReplicaWait {
    /// Waits until every stage has `need` serving replicas, at most until `deadline`.
    pub fn new(need: usize, deadline: Instant) -> ReplicaWait {
        ReplicaWait {
            need,
            deadline,
            serving: None,
            steps_done: 0,
            state_lost: false,
            reported: None,
            paused: None,
            checked: None,
            done: false,
        }
    }

    /// Feeds what the driver learnt at `now`.
    pub fn handle(&mut self, event: WaitEvent, now: Instant) {
        match event {
            WaitEvent::Counts {
                serving,
                steps_done,
            } => {
                self.serving = Some(serving);
                self.steps_done = steps_done;
                self.checked = Some(now);
            }
            WaitEvent::StateLost => self.state_lost = true,
        }
    }

    /// The next thing to do at `now` (`None`: handle messages until
    /// [`ReplicaWait::poll_timeout`], then feed the counts again; also after the end).
    pub fn poll_action(&mut self, now: Instant) -> Option<WaitAction> {
        if self.done {
            return None;
        }
        if self.state_lost {
            self.state_lost = false;
            // The counts were of the old epoch.
            self.serving = None;
            return Some(WaitAction::Restore);
        }
        let serving = self.serving.clone()?;
        if serving.iter().all(|&n| n >= self.need) {
            self.done = true;
            return Some(WaitAction::Ready);
        }
        if let Some(stage) = self.paused.take() {
            return Some(WaitAction::Paused { stage });
        }
        if self.reported.as_ref() != Some(&serving) {
            self.reported = Some(serving.clone());
            if self.steps_done > 0 {
                self.paused = serving.iter().position(|&n| n == 0).map(|k| k as u32);
            }
            return Some(WaitAction::Waiting {
                serving,
                need: self.need,
            });
        }
        if now >= self.deadline {
            self.done = true;
            return Some(WaitAction::GiveUp {
                serving,
                need: self.need,
            });
        }
        // Read the counts again after the next message or the recheck.
        self.serving = None;
        None
    }

    /// Until when the driver handles messages before feeding the counts again: the deadline,
    /// or [`RECHECK`] after the last count.
    pub fn poll_timeout(&self) -> Instant {
        match self.checked {
            Some(t) => self.deadline.min(t + RECHECK),
            None => self.deadline,
        }
    }
}

#[cfg(test)]
mod tests;
