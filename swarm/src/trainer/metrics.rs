//! Run metrics: loss per step, throughput, tensor bytes on the wire per channel, faults.

use serde::Serialize;
use std::collections::HashMap;

use crate::identity::PeerId;
use crate::trainer::timing::{Clock, Part, TimeBreakdown};

/// A tensor channel of the pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    /// Forward activations between stages (and trainer <-> first/last stage).
    Activations,
    /// Backward activation gradients.
    Gradients,
    /// Gradient shares exchanged between replicas at the step boundary.
    Sync,
    /// Weights + optimizer state transfers (joins, checkpoints, restores); reported apart.
    State,
}

/// Bytes of one channel: what crossed the network and what fp32 would have needed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ChannelBytes {
    /// Bytes of the frames as sent.
    pub wire_bytes: u64,
    /// What the same tensors weigh as fp32.
    pub dense_bytes: u64,
    /// Frames counted.
    pub frames: u64,
}

impl ChannelBytes {
    /// Counts one frame of `wire` bytes standing for `dense` fp32 bytes.
    pub fn add(&mut self, wire: u64, dense: u64) {
        self.wire_bytes += wire;
        self.dense_bytes += dense;
        self.frames += 1;
    }

    /// Adds another counter's bytes and frames.
    pub fn merge(&mut self, other: &ChannelBytes) {
        self.wire_bytes += other.wire_bytes;
        self.dense_bytes += other.dense_bytes;
        self.frames += other.frames;
    }

    /// dense / wire (how many times fewer bytes than fp32); 0 when nothing was sent.
    pub fn ratio(&self) -> f64 {
        if self.wire_bytes == 0 {
            0.0
        } else {
            self.dense_bytes as f64 / self.wire_bytes as f64
        }
    }
}

/// Per-channel byte counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct WireStats {
    /// Forward activations.
    pub activations: ChannelBytes,
    /// Backward gradients.
    pub gradients: ChannelBytes,
    /// Replica sync shares.
    pub sync: ChannelBytes,
    /// State transfers.
    pub state: ChannelBytes,
}

impl WireStats {
    /// The counter of channel `c`.
    pub fn channel_mut(&mut self, c: Channel) -> &mut ChannelBytes {
        match c {
            Channel::Activations => &mut self.activations,
            Channel::Gradients => &mut self.gradients,
            Channel::Sync => &mut self.sync,
            Channel::State => &mut self.state,
        }
    }

    /// Adds every channel of `other`.
    pub fn merge(&mut self, other: &WireStats) {
        self.activations.merge(&other.activations);
        self.gradients.merge(&other.gradients);
        self.sync.merge(&other.sync);
        self.state.merge(&other.state);
    }

    /// Tensor bytes of training traffic (activations, gradients, sync; state transfers apart).
    pub fn tensor_wire_bytes(&self) -> u64 {
        self.activations.wire_bytes + self.gradients.wire_bytes + self.sync.wire_bytes
    }

    /// What fp32 would have needed for the same tensors.
    pub fn tensor_dense_bytes(&self) -> u64 {
        self.activations.dense_bytes + self.gradients.dense_bytes + self.sync.dense_bytes
    }
}

/// One finished step.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StepReport {
    /// The step (steps done before it).
    pub step: u64,
    /// Mean loss over the step's micro-batches (nats/token).
    pub loss: f64,
    /// Learning rate applied.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens trained in the step.
    pub tokens: u64,
    /// Seconds the step took (wall clock, informational).
    pub seconds: f64,
    /// Micro-batch attempts retried in the step.
    pub retries: u64,
    /// Replicas whose digest differed from the majority after the optimizer step.
    pub hash_mismatches: u64,
    /// Replicas per stage that took part in the sync.
    pub participants: Vec<usize>,
    /// Tensor bytes on the wire since the run started (activations, gradients, sync) and their
    /// fp32 size.
    pub wire_bytes: u64,
    /// Their fp32 size.
    pub dense_bytes: u64,
    /// Bytes per channel since the run started (state transfers included, apart).
    pub wire: WireStats,
}

/// The run's summary: the JSON of `swarm train` and `swarm demo`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Steps trained.
    pub steps: u64,
    /// Loss of the first step.
    pub initial_loss: f64,
    /// Loss of the last step.
    pub final_loss: f64,
    /// The last validation loss of the whole model (see `Metrics::val_losses`).
    pub val_loss: Option<f64>,
    /// Tokens trained per second of training.
    pub tokens_per_s: f64,
    /// Tensor bytes on the wire (activations, gradients, sync).
    pub wire_bytes: u64,
    /// Their fp32 size.
    pub dense_bytes: u64,
    /// Micro-batch attempts retried.
    pub retries: u64,
    /// Replicas that died, timed out or were banned.
    pub peers_lost: u64,
    /// Replicas that left gracefully (asked to leave, released at a step boundary).
    pub peers_left: u64,
    /// Replicas whose digest differed from their stage's majority.
    pub replica_hash_mismatches: u64,
    /// Replicas refused (and banned) for serving a state other than their stage's agreed one.
    pub bad_states: u64,
    /// Audits run, failed, and the peers they banned (issue #7).
    pub audits: u64,
    /// Audits that found a cheater.
    pub audit_failures: u64,
    /// Peers banned, by id.
    pub banned: Vec<String>,
    /// Per replica: the work routed to it and the bytes our relay carried for it (issue #14).
    pub peers: Vec<PeerWork>,
    /// Where the trainer's time went, to the end of the last step (issue #18).
    pub time_breakdown: TimeBreakdown,
}

/// One replica's share of the run.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PeerWork {
    /// Its peer id.
    pub peer: String,
    /// The stage it served.
    pub stage: u32,
    /// Its reachability verdict (`public`, `punchable`, `symmetric`, `blocked`, `unknown`).
    pub reach: String,
    /// Micro-batch hops routed to it (retries included).
    pub micro_batches: u64,
    /// Bytes the trainer's relay forwarded from and to it.
    pub relay_bytes: u64,
}

/// Everything measured during a run.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    /// Each finished step, in order (a restore drops those it reruns).
    pub steps: Vec<StepReport>,
    /// Bytes per channel.
    pub wire: WireStats,
    /// Micro-batch attempts retried.
    pub retries: u64,
    /// Replicas that died, timed out or were banned.
    pub peers_lost: u64,
    /// Replicas that left gracefully (not counted in `peers_lost`).
    pub peers_left: u64,
    /// Restores of the whole run from a checkpoint (or the seed) after a stage lost its state.
    pub restores: u64,
    /// Replicas whose digest differed from their stage's majority.
    pub replica_hash_mismatches: u64,
    /// Replicas refused (and banned) for serving a state other than their stage's agreed one.
    pub bad_states: u64,
    /// Tokens trained.
    pub tokens: u64,
    /// Validation losses `(steps done, loss)` of the whole model, every `train.eval_every` steps
    /// and at the last.
    pub val_losses: Vec<(u64, f64)>,
    /// What each replica reports it has sent per channel (activations, gradients, sync), from
    /// its latest `Applied`: monitoring only (self-reported, never credited).
    pub peer_sent: HashMap<PeerId, [crate::protocol::Traffic; 3]>,
    /// Seconds spent training (excludes waiting for peers before the first step).
    pub train_seconds: f64,
    /// Seconds joiners took to fetch their stage state (one entry per join).
    pub state_sync_seconds: Vec<f64>,
    /// Audit counters (issue #7).
    pub audit: super::audit::AuditStats,
    /// Per replica (by peer id text): work routed and relay bytes.
    pub peers: std::collections::BTreeMap<String, PeerWork>,
    /// Where the trainer's time went, to the end of the last step (`train_seconds`).
    pub time_breakdown: TimeBreakdown,
    /// The part clock of the current `Trainer::run` (`None` outside one).
    pub(crate) clock: Option<Clock>,
}

impl Metrics {
    /// The run's JSON summary.
    pub fn summary(&self) -> Summary {
        Summary {
            steps: self.steps.len() as u64,
            initial_loss: self.steps.first().map_or(f64::NAN, |s| s.loss),
            final_loss: self.steps.last().map_or(f64::NAN, |s| s.loss),
            val_loss: self.val_losses.last().map(|v| v.1),
            tokens_per_s: if self.train_seconds > 0.0 {
                self.tokens as f64 / self.train_seconds
            } else {
                0.0
            },
            wire_bytes: self.wire.tensor_wire_bytes(),
            dense_bytes: self.wire.tensor_dense_bytes(),
            retries: self.retries,
            peers_lost: self.peers_lost,
            peers_left: self.peers_left,
            replica_hash_mismatches: self.replica_hash_mismatches,
            bad_states: self.bad_states,
            audits: self.audit.audits,
            audit_failures: self.audit.audit_failures,
            banned: self.audit.banned.iter().map(|p| p.to_string()).collect(),
            peers: self.peers.values().cloned().collect(),
            time_breakdown: self.time_breakdown,
        }
    }

    /// Enters `part` of the trainer's time now; returns the part left (`Idle` without a clock).
    pub(crate) fn enter(&mut self, part: Part) -> Part {
        match &mut self.clock {
            Some(c) => c.switch(part, std::time::Instant::now()),
            None => Part::Idle,
        }
    }

    /// Moves `d` of the time charged to `from` over to `to`.
    pub(crate) fn reassign(&mut self, from: Part, to: Part, d: std::time::Duration) {
        if let Some(c) = &mut self.clock {
            c.reassign(from, to, d);
        }
    }

    /// A pipeline pass came back after `round_trip`, with its stages' time.
    pub(crate) fn pass(&mut self, round_trip: std::time::Duration, t: crate::protocol::PassTime) {
        if let Some(c) = &mut self.clock {
            c.pass(round_trip, t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_sums_tensor_channels_but_not_state() {
        let mut m = Metrics::default();
        m.wire.channel_mut(Channel::Activations).add(10, 100);
        m.wire.channel_mut(Channel::Gradients).add(20, 100);
        m.wire.channel_mut(Channel::Sync).add(5, 400);
        m.wire.channel_mut(Channel::State).add(1000, 1000);
        m.tokens = 300;
        m.train_seconds = 3.0;
        let s = m.summary();
        assert_eq!((s.wire_bytes, s.dense_bytes), (35, 600));
        assert_eq!(s.tokens_per_s, 100.0);
        assert!(s.initial_loss.is_nan());
        assert_eq!(m.wire.activations.ratio(), 10.0);
    }
}
