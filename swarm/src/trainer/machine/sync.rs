//! The trainer's side of one sync round of some stages, with no I/O: who takes part (and with
//! how many micro-batches), which reports count, who is stuck when a participant dies, when the
//! round gives up, and what the replicas agreed on. The driver (`driver/sync.rs`) sends the
//! `SyncStart`s it plans, feeds the reports and deaths, and acts on its [`SyncOutcome`].
//!
//! The round's [`SyncPhase`] changes three rules: an `Outer` round (a multi-step sync's
//! boundary) syncs weights, not micro-batches, so counts are neither checked nor sent; in a
//! `Local` round (a multi-step sync's inner step) nothing is exchanged, so nobody is stuck when a
//! participant dies, and the stage's norm is the mean of its replicas' own (in peer order) rather
//! than a bitwise agreement.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

use crate::identity::PeerId;
use crate::protocol::SyncPhase;
use crate::trainer::book::StepBook;

/// Why a round cannot start.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SyncPlanError {
    /// Every replica of the stage is excluded from this step (or there is none).
    #[error("stage {0} has no replica left to sync")]
    NoParticipant(usize),
    /// The participants' counts do not add up to the step's micro-batches (a bug upstream).
    #[error("stage {stage}: participants counted {counted} micro-batches of {expected}")]
    Miscounted {
        /// The stage.
        stage: usize,
        /// Micro-batches its participants hold together.
        counted: u32,
        /// The step's micro-batches.
        expected: usize,
    },
}

/// The `SyncStart` of one stage: sent to every replica of `to` (participants and excluded ones
/// alike; the latter see they are not in `participants`).
#[derive(Clone, Debug, PartialEq)]
pub struct StageStart {
    /// The stage.
    pub stage: usize,
    /// Its round number in this step (bumped at each redo).
    pub round: u32,
    /// In a fixed order (by peer id), with the micro-batches each holds.
    pub participants: Vec<PeerId>,
    /// Micro-batches each participant holds, in `participants`' order.
    pub mb_counts: Vec<u32>,
    /// Who gets the `SyncStart`.
    pub to: Vec<PeerId>,
}

/// What a round ended with.
#[derive(Debug, Default)]
pub struct SyncOutcome {
    /// (stage, agreed grad_sq_norm, participants)
    pub done: Vec<(usize, f64, usize)>,
    /// Participants that died or never reported in time: out of the run.
    pub failed_peers: Vec<PeerId>,
    /// Stages whose sync must be redone (a participant was lost before every survivor summed).
    pub broken: BTreeSet<usize>,
    /// Reports that disagreed with their stage's majority.
    pub norm_mismatches: u64,
}

/// One round. See the module documentation.
#[derive(Debug)]
pub struct SyncRound {
    step: u64,
    phase: SyncPhase,
    deadline: Instant,
    starts: Vec<StageStart>,
    waiting: BTreeSet<(usize, PeerId)>,
    reports: BTreeMap<usize, Vec<(PeerId, f64, [u8; 32])>>,
    out: SyncOutcome,
}

impl SyncRound {
    /// Plans the round of `stages` (`replicas[k]`: stage `k`'s replicas that hold the step's
    /// state, i.e. not joining; `rounds[k]`: its round number): participants are those not
    /// excluded this step, and together they must hold every micro-batch once (but in an
    /// `Outer` round).
    pub fn plan(
        step: u64,
        phase: SyncPhase,
        book: &StepBook,
        stages: &[usize],
        replicas: &[Vec<PeerId>],
        rounds: &[u32],
        deadline: Instant,
    ) -> Result<SyncRound, SyncPlanError> {
        let mut starts = Vec::new();
        let mut waiting = BTreeSet::new();
        for &k in stages {
            let counts = book.stage_counts(k as u16);
            let to = replicas.get(k).cloned().unwrap_or_default();
            let participants: Vec<PeerId> = to
                .iter()
                .filter(|p| !book.is_excluded(p))
                .copied()
                .collect();
            if participants.is_empty() {
                return Err(SyncPlanError::NoParticipant(k));
            }
            let mb_counts: Vec<u32> = participants
                .iter()
                .map(|p| match phase {
                    SyncPhase::Outer => 0,
                    _ => counts.get(p).copied().unwrap_or(0),
                })
                .collect();
            let counted: u32 = mb_counts.iter().sum();
            if phase != SyncPhase::Outer && counted as usize != book.micro_batches() {
                return Err(SyncPlanError::Miscounted {
                    stage: k,
                    counted,
                    expected: book.micro_batches(),
                });
            }
            waiting.extend(participants.iter().map(|p| (k, *p)));
            starts.push(StageStart {
                stage: k,
                round: rounds.get(k).copied().unwrap_or(0),
                participants,
                mb_counts,
                to,
            });
        }
        Ok(SyncRound {
            step,
            phase,
            deadline,
            starts,
            waiting,
            reports: BTreeMap::new(),
            out: SyncOutcome::default(),
        })
    }

    /// The `SyncStart`s to send.
    pub fn starts(&self) -> &[StageStart] {
        &self.starts
    }

    /// No report is awaited any more.
    pub fn is_finished(&self) -> bool {
        self.waiting.is_empty()
    }

    /// The round's deadline (until it is finished).
    pub fn poll_timeout(&self) -> Option<Instant> {
        (!self.is_finished()).then_some(self.deadline)
    }

    /// A participant's `SyncDone`. Reports of another step, of a stage or peer not awaited,
    /// or a second one, are ignored (the caller still counts their bytes).
    pub fn handle_report(
        &mut self,
        from: PeerId,
        step: u64,
        stage: usize,
        round: u32,
        grad_sq_norm: f64,
        digest: [u8; 32],
    ) {
        // A report of another round of this stage (one given up on and redone) never counts.
        let this_round = self
            .starts
            .iter()
            .any(|s| s.stage == stage && s.round == round);
        if step == self.step && this_round && self.waiting.remove(&(stage, from)) {
            self.reports
                .entry(stage)
                .or_default()
                .push((from, grad_sq_norm, digest));
        }
    }

    /// A replica died (or its `SyncStart` failed). Returns whether it took part in the round
    /// (if not, the caller loses it as between steps). Survivors that have not reported never
    /// got (and never will get) its share: they are stuck in this round, so the stage's sync is
    /// redone. Those that reported summed every share, the dead one's included. In a `Local`
    /// round nothing is exchanged: nobody waits for its share.
    pub fn handle_down(&mut self, p: PeerId) -> bool {
        let mut participant = false;
        for s in &self.starts {
            if !s.participants.contains(&p) {
                continue;
            }
            participant = true;
            let k = s.stage;
            self.waiting.remove(&(k, p));
            let stuck: Vec<PeerId> = s
                .participants
                .iter()
                .filter(|q| self.waiting.contains(&(k, **q)))
                .filter(|_| self.phase != SyncPhase::Local)
                .copied()
                .collect();
            if !stuck.is_empty() {
                tracing::warn!(peer = %p.short(), stage = k, stuck = stuck.len(), "participant lost during the sync; the stage's sync restarts");
                self.out.broken.insert(k);
                for q in stuck {
                    self.waiting.remove(&(k, q));
                }
            }
        }
        if participant && !self.out.failed_peers.contains(&p) {
            self.out.failed_peers.push(p);
        }
        participant
    }

    /// At the deadline every participant still awaited is failed and its stage redone.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now < self.deadline {
            return;
        }
        for (k, p) in std::mem::take(&mut self.waiting) {
            tracing::warn!(peer = %p.short(), stage = k, "no sync report in time");
            self.out.broken.insert(k);
            if !self.out.failed_peers.contains(&p) {
                self.out.failed_peers.push(p);
            }
        }
    }

    /// What the round ended with: per stage not broken, the majority's norm (replicas must
    /// agree bitwise; the rest re-sync after Apply), or in a `Local` round the mean of their own
    /// norms, and how many reported.
    pub fn finish(mut self) -> SyncOutcome {
        for s in &self.starts {
            let k = s.stage;
            if self.out.broken.contains(&k) {
                continue;
            }
            let mut reps = self.reports.remove(&k).unwrap_or_default();
            let Some(first) = reps.first() else { continue };
            if self.phase == SyncPhase::Local {
                // Each replica reported its own gradient's norm: the stage's term of the global
                // norm is their mean (summed in peer order, so it does not depend on arrival).
                reps.sort_by_key(|(p, _, _)| *p);
                let mean = reps.iter().map(|(_, n, _)| n).sum::<f64>() / reps.len() as f64;
                self.out.done.push((k, mean, reps.len()));
                continue;
            }
            let mut tally: HashMap<(u64, [u8; 32]), usize> = HashMap::new();
            for (_, n, d) in &reps {
                *tally.entry((n.to_bits(), *d)).or_default() += 1;
            }
            let best = tally
                .iter()
                .max_by_key(|(key, c)| (**c, std::cmp::Reverse(key.0)))
                .map(|(key, _)| *key)
                .unwrap_or((first.1.to_bits(), first.2));
            let disagree = reps
                .iter()
                .filter(|(_, n, d)| (n.to_bits(), *d) != best)
                .count();
            if disagree > 0 {
                tracing::warn!(
                    stage = k,
                    disagree,
                    "replicas disagree on the summed gradient"
                );
                self.out.norm_mismatches += disagree as u64;
            }
            self.out.done.push((k, f64::from_bits(best.0), reps.len()));
        }
        self.out
    }
}

/// The weights digest a stage's replicas agree on after `Apply`: the most common one (ties to
/// the smallest, so every run picks the same). Replicas holding another are reloaded with it.
/// `None` when nobody answered.
pub fn digest_majority(digests: impl IntoIterator<Item = [u8; 32]>) -> Option<[u8; 32]> {
    let mut tally: HashMap<[u8; 32], usize> = HashMap::new();
    for d in digests {
        *tally.entry(d).or_default() += 1;
    }
    tally
        .iter()
        .max_by_key(|(d, c)| (**c, std::cmp::Reverse(**d)))
        .map(|(d, _)| *d)
}

#[cfg(test)]
mod tests;
