//! The trainer's state snapshot (issue #15): what a monitor shows of a running swarm, published
//! through a `tokio::sync::watch` channel at every step and every event. The driver owns an
//! [`Observer`] and calls it from a few lines; readers (the HTTP monitor, `swarm top`) hold
//! receivers and never touch the run. The snapshot is versioned JSON (`/api/v1/state`): fields
//! are only added within a version, and `version` changes when one is removed or changes meaning.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use swarm_model::RunConfig;
use swarm_nat::Reachability;
use swarm_router as router;
use tokio::sync::watch;

use super::audit::AuditStats;
use super::driver::TrainerEvent;
use super::metrics::{Metrics, StepReport, WireStats};
use crate::identity::PeerId;
use crate::ledger::{Credit, Head};
use crate::membership::{RunId, StatusReply};

/// Version of the snapshot's JSON schema.
pub const SCHEMA_VERSION: u32 = 1;
/// Steps kept in `history` (older points are thinned to every other one).
pub const MAX_HISTORY: usize = 2048;
/// Events kept (the oldest are dropped).
pub const MAX_EVENTS: usize = 512;
/// The ledger file is re-read for credit at most this often.
const CREDIT_EVERY: Duration = Duration::from_secs(3);

/// The whole state of a run as a monitor sees it (the JSON of `/api/v1/state`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// [`SCHEMA_VERSION`].
    pub version: u32,
    /// Incremented at every publication.
    pub seq: u64,
    /// Unix milliseconds of this publication.
    pub updated_unix_ms: u64,
    /// The run's identity and config.
    pub run: RunSummary,
    /// Steps, losses, throughput and fault counters.
    pub progress: Progress,
    /// One point per finished step (thinned beyond [`MAX_HISTORY`]).
    pub history: Vec<StepPoint>,
    /// Every validation of the whole model so far.
    #[serde(default)]
    pub val_history: Vec<ValPoint>,
    /// Coverage: every stage and its replicas.
    pub stages: Vec<StageCoverage>,
    /// Every peer that ever served (lost, left and banned ones stay, with that state).
    pub peers: Vec<PeerRow>,
    /// Cumulative bytes per channel (activations, gradients, sync, state).
    pub channels: Vec<ChannelBytes>,
    /// Audit counters.
    pub audits: AuditTotals,
    /// The last [`MAX_EVENTS`] events, oldest first.
    pub events: Vec<EventRow>,
    /// Where the ledger is and its head.
    pub ledger: LedgerSummary,
}

/// What run this is.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// Hex run id (BLAKE3 of the canonical config).
    pub run_id: String,
    /// The trainer's peer id (hex).
    pub trainer_id: String,
    /// Where joiners reach the trainer.
    pub trainer_addr: String,
    /// Bumped at every restore.
    pub epoch: u32,
    /// `running`, `paused` or `finished`.
    pub phase: String,
    /// The run's config, summarised.
    pub config: ConfigSummary,
}

/// The config fields a monitor shows.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ConfigSummary {
    /// The run's seed.
    pub seed: u64,
    /// Pipeline stages.
    pub stages: u32,
    /// Stage boundaries (layer indices, `stages + 1` of them).
    pub stage_bounds: Vec<usize>,
    /// Decoder layers.
    pub layers: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Steps of the run.
    pub steps: u64,
    /// Micro-batches per step.
    pub micro_batches: usize,
    /// Sequences per micro-batch.
    pub micro_batch_size: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Codec of the activations.
    pub codec_activations: String,
    /// Codec of the gradients.
    pub codec_gradients: String,
    /// Codec of the sync channel.
    pub codec_sync: String,
}

/// How far the run is.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Steps done.
    pub step: u64,
    /// Steps of the run.
    pub total_steps: u64,
    /// Loss of the last finished step (nats/token).
    pub loss: Option<f64>,
    /// The last validation loss of the whole model (every `train.eval_every` steps and at the
    /// last; `None` before the first evaluation).
    pub val_loss: Option<f64>,
    /// Learning rate of the last finished step.
    pub lr: Option<f64>,
    /// Tokens per second over the training time so far.
    pub tokens_per_s: f64,
    /// Tokens trained so far.
    pub tokens: u64,
    /// Unix milliseconds when this trainer started.
    pub started_unix_ms: u64,
    /// Seconds spent training (from the first step).
    pub train_s: f64,
    /// Estimated seconds to the last step at the mean step time so far.
    pub eta_s: Option<f64>,
    /// Micro-batch attempts retried.
    pub retries: u64,
    /// Replicas that died, timed out or were banned.
    pub peers_lost: u64,
    /// Replicas that left gracefully.
    pub peers_left: u64,
    /// Restores after a stage lost its state.
    pub restores: u64,
    /// Replicas whose digest differed from their stage's majority.
    pub replica_hash_mismatches: u64,
}

/// Bytes of one channel: on the wire and as fp32.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ChannelBytes {
    /// `activations`, `gradients`, `sync` or `state`.
    pub channel: String,
    /// Bytes of the frames as sent.
    pub wire_bytes: u64,
    /// What the same tensors weigh as fp32.
    pub dense_bytes: u64,
    /// Frames counted.
    pub frames: u64,
}

/// One validation of the whole model.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ValPoint {
    /// Steps done when it was evaluated.
    pub step: u64,
    /// Validation loss (nats/token).
    pub loss: f64,
}

/// One finished step.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepPoint {
    /// The step (steps done before it).
    pub step: u64,
    /// Mean loss of its micro-batches.
    pub loss: f64,
    /// Learning rate applied.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens per second of this step alone.
    pub tokens_per_s: f64,
    /// Seconds since the first step started, at the end of this step.
    pub train_s: f64,
    /// Micro-batch attempts retried in it.
    pub retries: u64,
    /// Cumulative wire and fp32 bytes per channel at the end of this step.
    pub channels: Vec<ChannelBytes>,
}

/// One stage and who serves it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StageCoverage {
    /// The stage.
    pub stage: u32,
    /// Layers `[first, end)`.
    pub layers: [usize; 2],
    /// Its replicas.
    pub replicas: Vec<ReplicaRow>,
    /// Replicas that can be routed to.
    pub serving: usize,
    /// `healthy` (>= 2 serving), `thin` (1) or `broken` (0).
    pub health: String,
}

/// One replica of a stage.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplicaRow {
    /// Its peer id.
    pub peer: String,
    /// `joining`, `serving` or `leaving`.
    pub state: String,
    /// Micro-batches in flight through it (the router's load).
    pub load: u32,
}

/// One peer that served the run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerRow {
    /// Its peer id.
    pub id: String,
    /// Its address.
    pub addr: String,
    /// The stage it serves (served).
    pub stage: Option<u32>,
    /// `joining`, `serving`, `leaving`, `left`, `lost` or `banned`.
    pub state: String,
    /// How its stage links run, from its reachability verdict: `direct` (public), `punched`
    /// (behind an endpoint-independent NAT, reached by hole punches) or `relayed` (symmetric or
    /// UDP-blocked NAT: through the trainer's relay).
    pub path: String,
    /// Throughput the router uses for it (tokens/s through its stage).
    pub throughput_tokens_per_s: Option<f64>,
    /// Micro-batches in flight through it.
    pub load: Option<u32>,
    /// Smoothed RTT of the trainer's QUIC connection to it.
    pub rtt_ms: Option<f64>,
    /// UDP bytes the trainer sent to / received from it on that connection (all channels).
    pub tx_bytes: Option<u64>,
    /// UDP bytes the trainer received from it on that connection.
    pub rx_bytes: Option<u64>,
    /// Its reachability verdict from the check at join (`public`, `punchable`, `symmetric`,
    /// `blocked`, `unknown`), and the bytes the trainer's relay forwarded from and to it.
    #[serde(default)]
    pub reach: Option<String>,
    /// Bytes the trainer's relay forwarded from and to it.
    #[serde(default)]
    pub relay_bytes: Option<u64>,
    /// Tensor bytes it reports having sent per channel (activations, gradients, sync), as of its
    /// latest step: self-reported, for monitoring only.
    #[serde(default)]
    pub channels: Vec<ChannelBytes>,
    /// Audits of it that passed (from the ledger).
    pub audits_passed: u64,
    /// Audits of it that failed (from the ledger).
    pub audits_failed: u64,
    /// Micro-batches of work verified by a later passed audit (from the ledger).
    pub credited_micro_batches: u64,
    /// Micro-batches served since its last passed audit (from the ledger).
    pub pending_micro_batches: u64,
    /// The version string of its signed record.
    pub version: Option<String>,
    /// Seconds since the trainer last heard from or about it.
    pub last_seen_s: Option<f64>,
    /// Step at which it joined (became routable), and how long it took to load its state.
    pub joined_step: Option<u64>,
    /// How long its state load took, ms.
    pub sync_ms: Option<u64>,
    /// Why it was banned, when it was.
    pub ban_reason: Option<String>,
}

/// The audits of the run so far.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditTotals {
    /// Audits run.
    pub audits: u64,
    /// Audits that found a cheater.
    pub failures: u64,
    /// Peers banned, by id.
    pub banned: Vec<String>,
    /// Bytes the audits moved.
    pub bytes: u64,
    /// Seconds the trainer spent auditing.
    pub seconds: f64,
}

/// Something that happened to the run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EventRow {
    /// When (Unix ms).
    pub unix_ms: u64,
    /// Steps done when it happened.
    pub step: u64,
    /// `join`, `lost`, `left`, `ban`, `restore`, `checkpoint`, `paused` or `waiting`.
    pub kind: String,
    /// The peer it is about, if any.
    pub peer: Option<String>,
    /// The stage it is about, if any.
    pub stage: Option<u32>,
    /// What happened, in words.
    pub detail: String,
}

/// The contribution ledger.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LedgerSummary {
    /// Its file, if one is written.
    pub path: Option<String>,
    /// `SEQ:HEX` of the last entry written.
    pub head: Option<String>,
}

/// The snapshot's name of a run phase.
pub fn phase_name(p: crate::protocol::RunPhase) -> &'static str {
    match p {
        crate::protocol::RunPhase::Running => "running",
        crate::protocol::RunPhase::Paused => "paused",
        crate::protocol::RunPhase::Finished => "finished",
    }
}

/// A replica as the driver's registry holds it.
pub struct ReplicaInput {
    /// Its stage.
    pub stage: u32,
    /// The replica.
    pub peer: PeerId,
    /// Its address.
    pub addr: SocketAddr,
    /// `joining`, `serving` or `leaving`.
    pub state: &'static str,
}

/// What the driver hands over at each publication (borrowed, cheap to gather).
pub struct Inputs<'a> {
    /// Steps done.
    pub step: u64,
    /// The run's epoch.
    pub epoch: u32,
    /// `running`, `paused` or `finished`.
    pub phase: &'static str,
    /// Every replica in the registry.
    pub replicas: Vec<ReplicaInput>,
    /// The router's view (load, throughput).
    pub view: &'a router::SwarmView,
    /// The run's metrics.
    pub metrics: &'a Metrics,
    /// Audit counters.
    pub audit: &'a AuditStats,
    /// The ledger's head.
    pub ledger_head: Option<Head>,
    /// The trainer peer's own status (membership, versions).
    pub status: StatusReply,
    /// (peer, RTT, UDP bytes sent, received) of the trainer's cached connections.
    pub connections: Vec<(PeerId, Duration, u64, u64)>,
}

/// Keeps the snapshot up to date and publishes it.
pub struct Observer {
    tx: watch::Sender<Arc<Snapshot>>,
    snap: Snapshot,
    peers: BTreeMap<PeerId, PeerRow>,
    events: VecDeque<EventRow>,
    ledger: Option<PathBuf>,
    credits: HashMap<PeerId, Credit>,
    credits_read: Option<Instant>,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn channels(w: &WireStats) -> Vec<ChannelBytes> {
    [
        ("activations", &w.activations),
        ("gradients", &w.gradients),
        ("sync", &w.sync),
        ("state", &w.state),
    ]
    .into_iter()
    .map(|(name, c)| ChannelBytes {
        channel: name.into(),
        wire_bytes: c.wire_bytes,
        dense_bytes: c.dense_bytes,
        frames: c.frames,
    })
    .collect()
}

impl Observer {
    /// An observer of a run with nothing published yet but its identity and config.
    pub fn new(
        cfg: &RunConfig,
        run: RunId,
        trainer: PeerId,
        addr: SocketAddr,
        ledger: Option<PathBuf>,
    ) -> Observer {
        let snap = Snapshot {
            version: SCHEMA_VERSION,
            run: RunSummary {
                run_id: run.to_string(),
                trainer_id: trainer.to_string(),
                trainer_addr: addr.to_string(),
                epoch: 0,
                phase: "running".into(),
                config: ConfigSummary {
                    seed: cfg.seed,
                    stages: (cfg.stages.len() - 1) as u32,
                    stage_bounds: cfg.stages.clone(),
                    layers: cfg.model.num_hidden_layers,
                    hidden_size: cfg.model.hidden_size,
                    vocab_size: cfg.model.vocab_size,
                    steps: cfg.train.steps,
                    micro_batches: cfg.train.micro_batches,
                    micro_batch_size: cfg.train.micro_batch_size,
                    seq_len: cfg.train.seq_len,
                    codec_activations: cfg.codec.activations.clone(),
                    codec_gradients: cfg.codec.gradients.clone(),
                    // What the sync channel actually carries in this run's sync mode.
                    codec_sync: match cfg.sync.mode {
                        swarm_model::SyncMode::Step => cfg.codec.sync.clone(),
                        swarm_model::SyncMode::Sparseloco => format!(
                            "sparseloco every {} steps: {} per {} values",
                            cfg.sync.every, cfg.sync.codec, cfg.sync.chunk
                        ),
                    },
                },
            },
            progress: Progress {
                total_steps: cfg.train.steps,
                started_unix_ms: unix_ms(),
                ..Progress::default()
            },
            ledger: LedgerSummary {
                path: ledger.as_ref().map(|p| p.display().to_string()),
                head: None,
            },
            ..Snapshot::default()
        };
        let (tx, _) = watch::channel(Arc::new(snap.clone()));
        Observer {
            tx,
            snap,
            peers: BTreeMap::new(),
            events: VecDeque::new(),
            ledger,
            credits: HashMap::new(),
            credits_read: None,
        }
    }

    /// A receiver of every publication (the latest is always readable with `borrow`).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    fn push_event(
        &mut self,
        step: u64,
        kind: &str,
        peer: Option<&PeerId>,
        stage: Option<u32>,
        detail: String,
    ) {
        if self.events.len() >= MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(EventRow {
            unix_ms: unix_ms(),
            step,
            kind: kind.into(),
            peer: peer.map(|p| p.to_string()),
            stage: stage.filter(|&s| s != u32::MAX),
            detail,
        });
    }

    fn row(&mut self, peer: &PeerId) -> &mut PeerRow {
        self.peers.entry(*peer).or_insert_with(|| PeerRow {
            id: peer.to_string(),
            path: "direct".into(),
            ..PeerRow::default()
        })
    }

    /// Records an event of the driver (`step`: steps done).
    pub fn event(&mut self, e: &TrainerEvent, step: u64) {
        match e {
            TrainerEvent::Step(r) => self.step(r),
            TrainerEvent::Joined {
                peer,
                stage,
                sync_ms,
            } => {
                let row = self.row(peer);
                row.joined_step = Some(step);
                row.sync_ms = Some(*sync_ms);
                row.ban_reason = None;
                self.push_event(
                    step,
                    "join",
                    Some(peer),
                    Some(*stage),
                    format!("state loaded in {sync_ms} ms"),
                );
            }
            TrainerEvent::Lost { peer, stage } => {
                let banned = self.row(peer).ban_reason.is_some();
                self.row(peer).state = if banned { "banned" } else { "lost" }.into();
                let detail = if banned {
                    "removed after a ban"
                } else {
                    "stopped answering, crashed or timed out"
                };
                self.push_event(step, "lost", Some(peer), Some(*stage), detail.into());
            }
            TrainerEvent::Left {
                peer,
                stage,
                handed_off,
            } => {
                self.row(peer).state = "left".into();
                let detail = if *handed_off {
                    "left; the trainer kept its stage's state"
                } else {
                    "left gracefully"
                };
                self.push_event(step, "left", Some(peer), Some(*stage), detail.into());
            }
            TrainerEvent::Checkpoint { step, dir } => {
                self.push_event(
                    *step,
                    "checkpoint",
                    None,
                    None,
                    format!("written to {}", dir.display()),
                );
            }
            TrainerEvent::Eval { step, val_loss } => {
                self.push_event(
                    *step,
                    "eval",
                    None,
                    None,
                    format!("validation loss {val_loss:.4}"),
                );
            }
            TrainerEvent::Restored {
                step,
                epoch,
                from_checkpoint,
            } => {
                let from = if *from_checkpoint {
                    "the latest checkpoint"
                } else {
                    "the seed"
                };
                self.snap.history.retain(|p| p.step < *step);
                self.push_event(
                    *step,
                    "restore",
                    None,
                    None,
                    format!("restored from {from} at step {step}, epoch {epoch}"),
                );
            }
            TrainerEvent::Paused { stage } => self.push_event(
                step,
                "paused",
                None,
                Some(*stage),
                "no replica left: waiting for a peer".into(),
            ),
            TrainerEvent::Waiting { serving, need } => self.push_event(
                step,
                "waiting",
                None,
                None,
                format!("replicas per stage {serving:?}, need {need}"),
            ),
        }
    }

    /// Records a ban decided by an audit (the `Lost` event follows).
    pub fn ban(&mut self, peer: &PeerId, stage: u32, reason: &str, step: u64) {
        self.row(peer).ban_reason = Some(reason.to_string());
        self.push_event(step, "ban", Some(peer), Some(stage), reason.to_string());
    }

    fn step(&mut self, r: &StepReport) {
        let h = &mut self.snap.history;
        if h.len() >= MAX_HISTORY {
            // Keep the whole run visible at half the resolution.
            let mut i = 0;
            h.retain(|_| {
                i += 1;
                i % 2 == 1
            });
        }
        let train_s = h.last().map_or(0.0, |p| p.train_s) + r.seconds;
        h.push(StepPoint {
            step: r.step,
            loss: r.loss,
            lr: r.lr,
            grad_norm: r.grad_norm,
            tokens_per_s: if r.seconds > 0.0 {
                r.tokens as f64 / r.seconds
            } else {
                0.0
            },
            train_s,
            retries: r.retries,
            channels: channels(&r.wire),
        });
    }

    /// `peer`'s standing in the ledger as last read (`None` without a ledger, or before its
    /// first entry), for reporting back to it.
    pub fn credit(&self, peer: &PeerId) -> Option<crate::protocol::CreditReport> {
        self.ledger.as_ref()?;
        Some(
            self.credits
                .get(peer)
                .map(|c| crate::protocol::CreditReport {
                    audits_passed: c.audits_passed,
                    audits_failed: c.audits_failed,
                    credited_micro_batches: c.credited_micro_batches,
                    pending_micro_batches: c.pending_micro_batches,
                })
                .unwrap_or_default(),
        )
    }

    fn refresh_credits(&mut self) {
        let Some(path) = &self.ledger else { return };
        if self
            .credits_read
            .is_some_and(|t| t.elapsed() < CREDIT_EVERY)
        {
            return;
        }
        self.credits_read = Some(Instant::now());
        // The trainer writes this file itself; a read racing an append sees a shorter valid
        // prefix or fails to parse, and the next read catches up.
        if let Ok(bytes) = std::fs::read(path)
            && let Ok(entries) = crate::ledger::parse(&bytes)
        {
            self.credits = crate::ledger::credits(&entries)
                .into_iter()
                .map(|c| (c.peer, c))
                .collect();
        }
    }

    /// Rebuilds the snapshot from the driver's state and publishes it.
    pub fn publish(&mut self, inp: Inputs<'_>) {
        self.refresh_credits();
        let m = inp.metrics;
        let s = &mut self.snap;
        s.seq += 1;
        s.updated_unix_ms = unix_ms();
        s.run.epoch = inp.epoch;
        s.run.phase = inp.phase.into();
        let p = &mut s.progress;
        p.step = inp.step;
        p.loss = m.steps.last().map(|r| r.loss);
        p.lr = m.steps.last().map(|r| r.lr);
        p.val_loss = m.val_losses.last().map(|v| v.1);
        s.val_history = m
            .val_losses
            .iter()
            .map(|&(step, loss)| ValPoint { step, loss })
            .collect();
        p.tokens = m.tokens;
        p.train_s = m.train_seconds;
        p.tokens_per_s = if m.train_seconds > 0.0 {
            m.tokens as f64 / m.train_seconds
        } else {
            0.0
        };
        let done = m.steps.len() as u64;
        p.eta_s = (done > 0 && m.train_seconds > 0.0)
            .then(|| m.train_seconds / done as f64 * p.total_steps.saturating_sub(inp.step) as f64);
        p.retries = m.retries;
        p.peers_lost = m.peers_lost;
        p.peers_left = m.peers_left;
        p.restores = m.restores;
        p.replica_hash_mismatches = m.replica_hash_mismatches;
        s.channels = channels(&m.wire);
        s.audits = AuditTotals {
            audits: inp.audit.audits,
            failures: inp.audit.audit_failures,
            banned: inp.audit.banned.iter().map(|p| p.to_string()).collect(),
            bytes: inp.audit.bytes,
            seconds: inp.audit.seconds,
        };
        s.ledger.head = inp.ledger_head.map(|h| h.to_string());

        // Coverage.
        let bounds = s.run.config.stage_bounds.clone();
        let stages = bounds.len().saturating_sub(1);
        let mut cov: Vec<StageCoverage> = (0..stages)
            .map(|k| StageCoverage {
                stage: k as u32,
                layers: [bounds[k], bounds[k + 1]],
                ..StageCoverage::default()
            })
            .collect();
        let load_of = |p: &PeerId| {
            inp.view
                .peer(&router::PeerKey(p.0))
                .map(|r| (r.load, r.info.compute_tokens_per_s))
        };
        for r in &inp.replicas {
            let load = load_of(&r.peer);
            if let Some(c) = cov.get_mut(r.stage as usize) {
                c.replicas.push(ReplicaRow {
                    peer: r.peer.to_string(),
                    state: r.state.into(),
                    load: load.map_or(0, |l| l.0),
                });
                if r.state == "serving" {
                    c.serving += 1;
                }
            }
            let row = self.peers.entry(r.peer).or_insert_with(|| PeerRow {
                id: r.peer.to_string(),
                path: "direct".into(),
                ..PeerRow::default()
            });
            row.addr = r.addr.to_string();
            row.stage = Some(r.stage);
            row.state = r.state.into();
            row.load = load.map(|l| l.0);
            row.throughput_tokens_per_s = load.map(|l| l.1).filter(|t| *t > 0.0);
        }
        for c in &mut cov {
            c.health = match c.serving {
                0 => "broken",
                1 => "thin",
                _ => "healthy",
            }
            .into();
        }
        s.stages = cov;

        // Per-peer measurements.
        let live: std::collections::HashSet<PeerId> = inp.replicas.iter().map(|r| r.peer).collect();
        for (id, row) in self.peers.iter_mut() {
            if !live.contains(id) {
                row.load = None;
            }
        }
        for (peer, rtt, tx, rx) in &inp.connections {
            if let Some(row) = self.peers.get_mut(peer) {
                row.rtt_ms = Some(rtt.as_secs_f64() * 1e3);
                row.tx_bytes = Some(*tx);
                row.rx_bytes = Some(*rx);
            }
        }
        for (peer, sent) in &m.peer_sent {
            if let Some(row) = self.peers.get_mut(peer) {
                row.channels = ["activations", "gradients", "sync"]
                    .iter()
                    .zip(sent)
                    .map(|(name, t)| ChannelBytes {
                        channel: (*name).into(),
                        wire_bytes: t.wire,
                        dense_bytes: t.dense,
                        frames: 0,
                    })
                    .collect();
            }
        }
        for e in &inp.status.entries {
            if let Some(row) = self.peers.get_mut(&e.record.peer_id) {
                row.version = Some(e.record.info.version.clone());
                row.last_seen_s = Some(e.last_seen_ago_ms as f64 / 1e3);
                let reach = e.record.info.reach;
                row.path = path_name(reach).into();
                row.reach = Some(reach.to_string());
                row.relay_bytes = Some(e.relay_bytes);
            }
        }
        for (id, row) in self.peers.iter_mut() {
            if let Some(c) = self.credits.get(id) {
                row.audits_passed = c.audits_passed;
                row.audits_failed = c.audits_failed;
                row.credited_micro_batches = c.credited_micro_batches;
                row.pending_micro_batches = c.pending_micro_batches;
            } else if let Some((run, failed)) = inp.audit.per_peer.get(id) {
                row.audits_passed = run.saturating_sub(*failed);
                row.audits_failed = *failed;
            }
        }
        s.peers = self.peers.values().cloned().collect();
        s.events = self.events.iter().cloned().collect();
        self.tx.send_replace(Arc::new(self.snap.clone()));
    }
}

/// How a peer's stage links run, from the verdict of its reachability check: the same rule the
/// router prices links by ([`Reachability::direct_possible`]). Relay bytes alone do not make a
/// peer relayed: a peer with a public or punchable address also moves bytes through the relay
/// when it talks to a relayed one (e.g. the sync between two replicas of a stage).
fn path_name(reach: Reachability) -> &'static str {
    if !reach.direct_possible() {
        "relayed"
    } else if reach == Reachability::Punchable {
        "punched"
    } else {
        "direct"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_round_trips_through_json() {
        let cfg = RunConfig::default();
        let id = crate::Identity::generate().peer_id();
        let mut o = Observer::new(
            &cfg,
            RunId([7; 16]),
            id,
            "127.0.0.1:1".parse().unwrap(),
            None,
        );
        let rx = o.subscribe();
        o.event(
            &TrainerEvent::Joined {
                peer: id,
                stage: 1,
                sync_ms: 5,
            },
            0,
        );
        let relayed_identity = crate::Identity::generate();
        let relayed = relayed_identity.peer_id();
        o.event(
            &TrainerEvent::Joined {
                peer: relayed,
                stage: 0,
                sync_ms: 5,
            },
            0,
        );
        o.ban(&id, 1, "output <peer> & \"quotes\"", 3);
        o.event(&TrainerEvent::Lost { peer: id, stage: 1 }, 3);
        let view = router::SwarmView::new(
            2,
            router::Workload {
                tokens: 1,
                hidden: 1,
                codec_ratio: 1.0,
            },
        )
        .unwrap();
        let metrics = Metrics::default();
        // The symmetric peer as the trainer's membership holds it, with the bytes our relay
        // carried for it.
        let record = crate::membership::PeerRecord::sign(
            &relayed_identity,
            RunId([7; 16]),
            1,
            0,
            60_000,
            crate::membership::RecordInfo {
                addrs: vec!["127.0.0.1:2".parse().unwrap()],
                stages: vec![0],
                throughput: 0.0,
                state: crate::membership::PeerState::Online,
                version: "test".into(),
                reach: Reachability::Symmetric,
            },
        );
        o.publish(Inputs {
            step: 3,
            epoch: 0,
            phase: "running",
            replicas: Vec::new(),
            view: &view,
            metrics: &metrics,
            audit: &AuditStats::default(),
            ledger_head: None,
            status: StatusReply {
                run_id: RunId([7; 16]),
                entries: vec![crate::membership::StatusEntry {
                    record,
                    last_seen_ago_ms: 10,
                    path: None,
                    relay_bytes: 1000,
                }],
            },
            connections: Vec::new(),
        });
        let s = rx.borrow().clone();
        assert_eq!(s.version, SCHEMA_VERSION);
        assert_eq!(s.peers.len(), 2);
        let row = |p: &PeerId| s.peers.iter().find(|q| q.id == p.to_string()).unwrap();
        assert_eq!(row(&id).state, "banned");
        // A symmetric peer's stage links run through the relay, and the page says so.
        let r = row(&relayed);
        assert_eq!(
            (r.path.as_str(), r.reach.as_deref(), r.relay_bytes),
            ("relayed", Some("symmetric"), Some(1000))
        );
        assert_eq!(row(&id).path, "direct");
        // The rule, verdict by verdict.
        assert_eq!(path_name(Reachability::Public), "direct");
        assert_eq!(path_name(Reachability::Unknown), "direct");
        assert_eq!(path_name(Reachability::Punchable), "punched");
        assert_eq!(path_name(Reachability::Symmetric), "relayed");
        assert_eq!(path_name(Reachability::Blocked), "relayed");
        assert_eq!(s.stages.len(), cfg.stages.len() - 1);
        assert!(s.stages.iter().all(|c| c.health == "broken"));
        assert_eq!(
            s.events.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
            ["join", "join", "ban", "lost"]
        );
        let json = serde_json::to_string(&*s).unwrap();
        let back: Snapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back, *s);
    }
}
