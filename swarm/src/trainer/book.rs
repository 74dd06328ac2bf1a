//! Exactly-once accounting of one step's micro-batches (pure: no I/O, no clock).
//!
//! A micro-batch `mb` of a step is complete when every stage and both ends (head, embedding) have
//! added its gradient to an accumulator exactly once. The book records who counted what
//! (`counted[mb][column] = Some(holder)`), which attempt of each micro-batch is current, and which
//! peers are excluded from this step (dead, banned, or caught counting for a stale attempt). A
//! peer's exclusion clears everything it counted in this step, since its accumulator is gone or
//! no longer trusted; those micro-batches are re-run for those stages only.
//!
//! The trainer drives it: [`StepBook::start_attempt`] before sending a Forward (its result is the
//! accumulate bitmask), [`StepBook::count`] on every `Counted` report and for the trainer's own
//! ends, [`StepBook::fail_attempt`] on a failed hop or a deadline, [`StepBook::exclude`] when a peer
//! is lost.

use std::collections::{BTreeSet, HashMap};

use crate::identity::PeerId;

/// Who holds a micro-batch's gradient for one column.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Holder {
    /// A stage replica.
    Peer(PeerId),
    /// The trainer's own ends shard (head and embedding columns).
    Trainer,
}

/// Which accumulator a count belongs to: stage `k`, the head, or the embedding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Column {
    /// Stage `k`'s replicas.
    Stage(u16),
    /// The trainer's head (loss and its gradient).
    Head,
    /// The trainer's embedding (its gradient from stage 0's input gradient).
    Embedding,
}

/// What a count report turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CountOutcome {
    /// Recorded: this accumulator now holds the micro-batch for this column.
    Counted,
    /// The micro-batch is now complete (every column counted once).
    Completed,
    /// The reporter had already been excluded this step: ignored (its accumulator is dropped).
    IgnoredExcluded,
    /// The report is for an attempt that is not current, or a column the attempt was not asked to
    /// accumulate, or a column already counted: the reporter accumulated something it must not
    /// have. It is excluded for this step (the caller must treat it as suspected).
    Tainted,
}

#[derive(Clone, Debug)]
struct Mb {
    /// Current attempt number (attempts start at 0); `None` before the first.
    attempt: Option<u32>,
    /// Columns the current attempt was told to accumulate, with the peer routed for each stage.
    mask: HashMap<Column, Holder>,
    counted: HashMap<Column, Holder>,
    /// Loss of the attempt whose head was counted.
    loss: Option<f64>,
}

/// One step's accounting.
#[derive(Clone, Debug)]
pub struct StepBook {
    stages: u16,
    mbs: Vec<Mb>,
    excluded: BTreeSet<PeerId>,
    /// Stages whose replicas already summed their gradients this step: their counts are final.
    frozen: BTreeSet<u16>,
    retries: u64,
}

impl StepBook {
    /// A step of `micro_batches` through `stages` stages.
    pub fn new(stages: u16, micro_batches: usize) -> StepBook {
        let mb = Mb {
            attempt: None,
            mask: HashMap::new(),
            counted: HashMap::new(),
            loss: None,
        };
        StepBook {
            stages,
            mbs: vec![mb; micro_batches],
            excluded: BTreeSet::new(),
            frozen: BTreeSet::new(),
            retries: 0,
        }
    }

    /// Micro-batches of the step.
    pub fn micro_batches(&self) -> usize {
        self.mbs.len()
    }

    /// All columns in a fixed order: stages, head, embedding.
    pub fn columns(&self) -> Vec<Column> {
        let mut v: Vec<Column> = (0..self.stages).map(Column::Stage).collect();
        v.push(Column::Head);
        v.push(Column::Embedding);
        v
    }

    /// Starts a new attempt of `mb` routed through `route[k]` for stage `k`; returns the attempt
    /// number and the bitmask of stages that must accumulate (bit `k` = stage `k`), plus whether
    /// the head and the embedding must accumulate. Attempts after the first count as retries.
    pub fn start_attempt(&mut self, mb: usize, route: &[PeerId]) -> Attempt {
        let stages = self.stages;
        let m = &mut self.mbs[mb];
        let attempt = match m.attempt {
            None => 0,
            Some(a) => {
                self.retries += 1;
                a + 1
            }
        };
        m.attempt = Some(attempt);
        m.mask.clear();
        let mut stage_mask = 0u64;
        for k in 0..stages {
            let col = Column::Stage(k);
            if !m.counted.contains_key(&col) {
                stage_mask |= 1 << k;
                m.mask.insert(col, Holder::Peer(route[k as usize]));
            }
        }
        let head = !m.counted.contains_key(&Column::Head);
        let embedding = !m.counted.contains_key(&Column::Embedding);
        if head {
            m.mask.insert(Column::Head, Holder::Trainer);
        }
        if embedding {
            m.mask.insert(Column::Embedding, Holder::Trainer);
        }
        Attempt {
            attempt,
            stage_mask,
            head,
            embedding,
        }
    }

    /// The current attempt of `mb`, if started.
    pub fn current_attempt(&self, mb: usize) -> Option<u32> {
        self.mbs.get(mb).and_then(|m| m.attempt)
    }

    /// Whether `attempt` is the current attempt of `mb`.
    pub fn is_current(&self, mb: usize, attempt: u32) -> bool {
        self.current_attempt(mb) == Some(attempt)
    }

    /// Records that `holder` accumulated `mb`'s gradient for `column` in `attempt`.
    pub fn count(
        &mut self,
        mb: usize,
        attempt: u32,
        column: Column,
        holder: Holder,
    ) -> CountOutcome {
        if let Holder::Peer(p) = holder
            && self.excluded.contains(&p)
        {
            return CountOutcome::IgnoredExcluded;
        }
        let Some(m) = self.mbs.get_mut(mb) else {
            return self.taint(holder);
        };
        let expected = m.attempt == Some(attempt)
            && m.mask.get(&column) == Some(&holder)
            && !m.counted.contains_key(&column);
        if !expected {
            return self.taint(holder);
        }
        m.mask.remove(&column);
        m.counted.insert(column, holder);
        if self.is_complete(mb) {
            CountOutcome::Completed
        } else {
            CountOutcome::Counted
        }
    }

    fn taint(&mut self, holder: Holder) -> CountOutcome {
        if let Holder::Peer(p) = holder {
            self.exclude(p);
        }
        CountOutcome::Tainted
    }

    /// Records the loss of `mb` (from the attempt whose head counted).
    pub fn set_loss(&mut self, mb: usize, loss: f64) {
        if let Some(m) = self.mbs.get_mut(mb) {
            m.loss = Some(loss);
        }
    }

    /// Whether every column of `mb` is counted.
    pub fn is_complete(&self, mb: usize) -> bool {
        let m = &self.mbs[mb];
        self.columns().iter().all(|c| m.counted.contains_key(c))
    }

    /// Whether every micro-batch is complete.
    pub fn all_complete(&self) -> bool {
        (0..self.mbs.len()).all(|mb| self.is_complete(mb))
    }

    /// Micro-batches not complete.
    pub fn incomplete(&self) -> Vec<usize> {
        (0..self.mbs.len())
            .filter(|&mb| !self.is_complete(mb))
            .collect()
    }

    /// Excludes `peer` for the rest of this step: clears everything it counted and returns the
    /// micro-batches that lost a count (they must be re-run for those columns). Idempotent.
    pub fn exclude(&mut self, peer: PeerId) -> Vec<usize> {
        self.excluded.insert(peer);
        let mut lost = Vec::new();
        let frozen = &self.frozen;
        for (i, m) in self.mbs.iter_mut().enumerate() {
            let before = m.counted.len();
            m.counted.retain(|c, h| {
                *h != Holder::Peer(peer) || matches!(c, Column::Stage(k) if frozen.contains(k))
            });
            if m.counted.len() != before {
                lost.push(i);
            }
        }
        lost
    }

    /// Forgets every count of `stage` (its replicas' accumulators were reset, e.g. after a
    /// replica died during the sync); returns the micro-batches to run again for it.
    pub fn clear_stage(&mut self, stage: u16) -> Vec<usize> {
        let col = Column::Stage(stage);
        let mut lost = Vec::new();
        for (i, m) in self.mbs.iter_mut().enumerate() {
            if m.counted.remove(&col).is_some() {
                lost.push(i);
            }
        }
        lost
    }

    /// Marks `stage` as synced: its survivors' summed gradient already holds every micro-batch
    /// (a replica lost afterwards, e.g. before `Apply`, takes no count with it).
    pub fn freeze_stage(&mut self, stage: u16) {
        self.frozen.insert(stage);
    }

    /// Peers excluded this step.
    pub fn excluded(&self) -> &BTreeSet<PeerId> {
        &self.excluded
    }

    /// Whether `peer` was excluded from this step (its counts dropped, no sync).
    pub fn is_excluded(&self, peer: &PeerId) -> bool {
        self.excluded.contains(peer)
    }

    /// Micro-batches each peer holds for `stage`, counted once each (the sync weights).
    pub fn stage_counts(&self, stage: u16) -> HashMap<PeerId, u32> {
        let mut out = HashMap::new();
        for m in &self.mbs {
            if let Some(Holder::Peer(p)) = m.counted.get(&Column::Stage(stage)) {
                *out.entry(*p).or_insert(0) += 1;
            }
        }
        out
    }

    /// Who counted `mb` for `column`.
    pub fn holder(&self, mb: usize, column: Column) -> Option<Holder> {
        self.mbs
            .get(mb)
            .and_then(|m| m.counted.get(&column).copied())
    }

    /// Retries so far (attempts after the first).
    pub fn retries(&self) -> u64 {
        self.retries
    }

    /// Mean loss over the micro-batches whose loss is known (all of them once complete).
    pub fn mean_loss(&self) -> Option<f64> {
        let losses: Vec<f64> = self.mbs.iter().filter_map(|m| m.loss).collect();
        (losses.len() == self.mbs.len() && !losses.is_empty())
            .then(|| losses.iter().sum::<f64>() / losses.len() as f64)
    }
}

/// What one attempt must accumulate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attempt {
    /// Its attempt number.
    pub attempt: u32,
    /// Bit `k` set: stage `k` accumulates this attempt.
    pub stage_mask: u64,
    /// The trainer's head accumulates this attempt.
    pub head: bool,
    /// The trainer's embedding accumulates this attempt.
    pub embedding: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(i: u8) -> PeerId {
        PeerId([i; 32])
    }

    fn count_all(b: &mut StepBook, mb: usize, a: Attempt, route: &[PeerId]) -> CountOutcome {
        let mut last = CountOutcome::Counted;
        for (k, peer) in route.iter().enumerate() {
            if a.stage_mask & (1 << k) != 0 {
                last = b.count(mb, a.attempt, Column::Stage(k as u16), Holder::Peer(*peer));
            }
        }
        if a.head {
            last = b.count(mb, a.attempt, Column::Head, Holder::Trainer);
        }
        if a.embedding {
            last = b.count(mb, a.attempt, Column::Embedding, Holder::Trainer);
        }
        last
    }

    #[test]
    fn happy_path_completes_every_mb_once() {
        let mut b = StepBook::new(2, 3);
        for mb in 0..3 {
            let route = [p(1), p(2)];
            let a = b.start_attempt(mb, &route);
            assert_eq!(
                (a.attempt, a.stage_mask, a.head, a.embedding),
                (0, 0b11, true, true)
            );
            assert_eq!(count_all(&mut b, mb, a, &route), CountOutcome::Completed);
            b.set_loss(mb, mb as f64);
        }
        assert!(b.all_complete());
        assert_eq!(b.retries(), 0);
        assert_eq!(b.stage_counts(0)[&p(1)], 3);
        assert_eq!(b.mean_loss(), Some(1.0));
    }

    #[test]
    fn retry_accumulates_only_uncounted_columns() {
        let mut b = StepBook::new(2, 1);
        let a0 = b.start_attempt(0, &[p(1), p(2)]);
        // Stage 1 and the head counted, then stage 0's backward failed.
        assert_eq!(
            b.count(0, 0, Column::Stage(1), Holder::Peer(p(2))),
            CountOutcome::Counted
        );
        assert_eq!(
            b.count(0, 0, Column::Head, Holder::Trainer),
            CountOutcome::Counted
        );
        assert_eq!(a0.stage_mask, 0b11);
        let a1 = b.start_attempt(0, &[p(3), p(4)]);
        assert_eq!(
            (a1.attempt, a1.stage_mask, a1.head, a1.embedding),
            (1, 0b01, false, true)
        );
        // Stage 1 on p(4) must not count: it was not asked to.
        assert_eq!(
            b.count(0, 1, Column::Stage(1), Holder::Peer(p(4))),
            CountOutcome::Tainted
        );
        assert!(b.is_excluded(&p(4)));
        assert_eq!(
            b.count(0, 1, Column::Stage(0), Holder::Peer(p(3))),
            CountOutcome::Counted
        );
        assert_eq!(
            b.count(0, 1, Column::Embedding, Holder::Trainer),
            CountOutcome::Completed
        );
        assert_eq!(b.retries(), 1);
        assert_eq!(b.holder(0, Column::Stage(1)), Some(Holder::Peer(p(2))));
    }

    #[test]
    fn late_count_of_a_stale_attempt_taints_the_reporter() {
        let mut b = StepBook::new(2, 1);
        let _ = b.start_attempt(0, &[p(1), p(2)]);
        let _ = b.start_attempt(0, &[p(1), p(3)]);
        // p(2) finishes the abandoned attempt 0 late: it accumulated, so it can't be trusted.
        assert_eq!(
            b.count(0, 0, Column::Stage(1), Holder::Peer(p(2))),
            CountOutcome::Tainted
        );
        assert!(b.is_excluded(&p(2)));
        // Its later reports are ignored.
        assert_eq!(
            b.count(0, 1, Column::Stage(1), Holder::Peer(p(2))),
            CountOutcome::IgnoredExcluded
        );
        assert_eq!(
            b.count(0, 1, Column::Stage(1), Holder::Peer(p(3))),
            CountOutcome::Counted
        );
    }

    #[test]
    fn excluding_a_peer_clears_its_counts_for_rerun() {
        let mut b = StepBook::new(2, 4);
        for mb in 0..4 {
            let route = if mb % 2 == 0 {
                [p(1), p(3)]
            } else {
                [p(2), p(3)]
            };
            let a = b.start_attempt(mb, &route);
            count_all(&mut b, mb, a, &route);
        }
        assert!(b.all_complete());
        let lost = b.exclude(p(2));
        assert_eq!(lost, vec![1, 3]);
        assert_eq!(b.incomplete(), vec![1, 3]);
        let a = b.start_attempt(1, &[p(1), p(3)]);
        assert_eq!((a.stage_mask, a.head, a.embedding), (0b01, false, false));
        assert_eq!(
            b.count(1, a.attempt, Column::Stage(0), Holder::Peer(p(1))),
            CountOutcome::Completed
        );
        assert_eq!(b.stage_counts(0)[&p(1)], 3);
        assert!(!b.stage_counts(0).contains_key(&p(2)));
        // Once stage 1 is synced, losing its replica clears nothing.
        b.freeze_stage(1);
        assert!(b.exclude(p(3)).is_empty());
        assert_eq!(b.incomplete(), vec![3]);
        // Double count of an already counted column is refused.
        assert_eq!(
            b.count(1, a.attempt, Column::Stage(0), Holder::Peer(p(1))),
            CountOutcome::Tainted
        );
    }
}
