//! The trainer process: a peer of the swarm that creates the run, admits stage replicas, drives
//! steps (micro-batches through the pipeline with several in flight, retries, exactly-once
//! accounting), coordinates the replica sync, and checkpoints.
//!
//! One task (the driver, [`Trainer::run`]) owns all mutable run state: the ends shard (embedding
//! and head), the step book, the router's view. Message handlers only validate, answer with a small
//! acknowledgement and forward what they received to the driver through a channel, so nothing is
//! shared but the registry that answers `RunInfo` and `Admit`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use swarm_compression::{Codec, Limits};
use swarm_model::{Corpus, ForwardCtx, Piece, RunConfig, Shard, clip_scale};
use swarm_router as router;
use tokio::sync::mpsc;

use super::book::StepBook;
use super::checkpoint;
use super::machine::{
    self,
    join::{Admissions, AdmitEvent, Ticket},
    replicas::{ReplicaState, StageHolders},
};
use super::metrics::{Channel, Metrics, StepReport};
use super::timing::Part;
use crate::error::{Error, Result};
use crate::identity::{Identity, PeerId};
use crate::membership::RunId;
use crate::peer::{Peer, PeerConfig, PeerShared, RequestCtx};
use crate::protocol::{
    Abandon, Ack, Admit, AdmitReply, Applied, Apply, Backward, BackwardOut, Counted, Endpoint,
    FetchState, Forward, ForwardOut, Hop, HopFailed, Leave, LeaveReply, MbKey, Ready, Reload,
    RunInfo, RunInfoRequest, RunPhase, StateSource, SyncDone, SyncPhase, SyncStart, Traffic,
};
use crate::receipt::{Pass, Receipt};
use crate::rpc::{self, RpcError, code};
use crate::rpc::{Ping, Pong};
use crate::shaping::LinkShape;
use crate::state_transfer::{
    BadState, FetchFailed, Fetched, StateRequest, endpoints, fetch_verified, serve_chunk,
};
use crate::transport::TransportConfig;
use crate::wire::{self, kind};

mod peers;
mod pipeline;
mod restore;
mod service;
mod step;
mod sync;

use service::{ping_loop, register_handlers};

/// The run id of a config: the first 16 bytes of BLAKE3 of its canonical TOML, so that anyone
/// holding the config can recompute it.
pub fn run_id_of(config_toml: &str) -> RunId {
    let h = blake3::hash(config_toml.as_bytes());
    let mut id = [0u8; 16];
    id.copy_from_slice(&h.as_bytes()[..16]);
    RunId(id)
}

/// How the trainer runs. `TrainerOptions::new(config)` gives loopback defaults.
#[derive(Clone, Debug)]
pub struct TrainerOptions {
    /// The run.
    pub config: RunConfig,
    /// The trainer's key (its peer id); a resumed run needs no particular one.
    pub identity: Identity,
    /// Address to listen on (port 0 picks one).
    pub listen: SocketAddr,
    /// Addresses to announce (empty: the listen address).
    pub announce: Vec<SocketAddr>,
    /// Checkpoint directory (HF format); a checkpoint found there is resumed from.
    pub out: Option<PathBuf>,
    /// Link shaping of the trainer's socket (benchmarks, demos).
    pub shape: Option<LinkShape>,
    /// QUIC settings (windows, congestion control).
    pub transport: TransportConfig,
    /// Serving replicas each stage needs before the first step.
    pub min_replicas: usize,
    /// Micro-batches in flight at once (0: twice the number of stages).
    pub max_in_flight: usize,
    /// An attempt of a micro-batch that has not finished after this long is retried.
    pub attempt_timeout: Duration,
    /// Longest wait for the replicas' sync reports and optimizer steps.
    pub sync_timeout: Duration,
    /// Longest wait for the replicas needed to start (or to resume after a stage lost them all).
    pub wait_for_peers: Duration,
    /// Longest wait at a step boundary for an admitted joiner to load its state.
    pub join_timeout: Duration,
    /// Stop after this many steps of this process (the run's own step count still bounds it).
    pub max_steps: Option<u64>,
    /// Audits and the contribution ledger (issue #7); the ledger defaults to `<out>.ledger` (beside the checkpoint folder).
    pub audit: super::audit::AuditConfig,
    /// Relay for volunteers that cannot reach each other, within these quotas (issue #14; on by
    /// default, `None` turns it off).
    pub relay: Option<swarm_nat::RelayConfig>,
    /// Where the joiners' reachability checker listens (`None`: the listen IP, any port). On a
    /// second IP of the host it also detects firewalls that pass UDP only to the trainer.
    pub checker: Option<SocketAddr>,
}

impl TrainerOptions {
    /// Loopback defaults for `config`, with a new identity.
    pub fn new(config: RunConfig) -> TrainerOptions {
        TrainerOptions {
            config,
            identity: Identity::generate(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            announce: Vec::new(),
            out: None,
            shape: None,
            transport: TransportConfig::default(),
            min_replicas: 1,
            relay: Some(swarm_nat::RelayConfig::default()),
            checker: None,
            max_in_flight: 0,
            attempt_timeout: Duration::from_secs(60),
            sync_timeout: Duration::from_secs(120),
            wait_for_peers: Duration::from_secs(600),
            join_timeout: Duration::from_secs(120),
            max_steps: None,
            audit: Default::default(),
        }
    }
}

/// What the driver tells its caller as the run goes (progress bars, logs).
#[derive(Clone, Debug)]
pub enum TrainerEvent {
    /// Waiting for replicas: `serving[k]` replicas serve stage `k`, `need` per stage.
    Waiting {
        /// Serving replicas per stage.
        serving: Vec<usize>,
        /// Replicas each stage needs.
        need: usize,
    },
    /// A replica became routable (`sync_ms`: how long it took to load its state).
    Joined {
        /// The replica.
        peer: PeerId,
        /// Its stage.
        stage: u32,
        /// How long its load took, ms.
        sync_ms: u64,
    },
    /// A replica was lost (dead, banned or gone).
    Lost {
        /// The replica.
        peer: PeerId,
        /// Its stage (`u32::MAX` if it had none).
        stage: u32,
    },
    /// A replica that asked to leave was released at a step boundary (`handed_off`: it was its
    /// stage's last one and the trainer kept its state for the next peer to take the stage).
    Left {
        /// The replica.
        peer: PeerId,
        /// Its stage.
        stage: u32,
        /// Its state is the trainer's now.
        handed_off: bool,
    },
    /// A step finished.
    Step(StepReport),
    /// A checkpoint was written after `step` steps.
    Checkpoint {
        /// Steps done.
        step: u64,
        /// Its folder.
        dir: PathBuf,
    },
    /// The whole model's validation loss after `step` steps (every `train.eval_every` steps and
    /// at the last; the same batches as the local trainer's evaluation).
    Eval {
        /// Steps done.
        step: u64,
        /// Mean loss over the validation batches.
        val_loss: f64,
    },
    /// A stage lost its last replica and its state: every stage and the ends were restored from
    /// the checkpoint after `step` steps (`from_checkpoint` false: from the seed, step 0) in a
    /// new `epoch`; the steps since run again.
    Restored {
        /// Steps done in the restored state.
        step: u64,
        /// The new epoch.
        epoch: u32,
        /// From a checkpoint (else the seed).
        from_checkpoint: bool,
    },
    /// The run is paused: stage `stage` has no replica left.
    Paused {
        /// The stage with none.
        stage: u32,
    },
}

/// Messages from handlers (and helper tasks) to the driver.
#[derive(Debug)]
enum Inbound {
    ForwardOut(PeerId, ForwardOut),
    BackwardOut(PeerId, BackwardOut),
    Counted(PeerId, Counted),
    HopFailed(PeerId, HopFailed),
    SyncDone(PeerId, SyncDone),
    Ready(PeerId, Ready),
    Leave(PeerId),
    /// Our own send of attempt `key` to `peer` failed.
    SendFailed {
        key: MbKey,
        peer: PeerId,
        busy: bool,
    },
    /// A replica stopped answering pings.
    Down(PeerId),
}

#[derive(Clone, Debug)]
struct Replica {
    addr: SocketAddr,
    state: ReplicaState,
}

/// A stage state the trainer serves itself (after resuming from a checkpoint).
struct ServedState {
    step: u64,
    bytes: Vec<u8>,
    hash: [u8; 32],
    digest: [u8; 32],
}

/// The stage states of a checkpoint at `step`, which the trainer serves (every replica loads
/// from it), and their digests, the stages' agreed ones.
fn served_states(
    stages: Vec<checkpoint::StageState>,
    step: u64,
    num_stages: usize,
) -> (HashMap<u32, ServedState>, Vec<Option<[u8; 32]>>) {
    let mut served = HashMap::new();
    let mut digests = vec![None; num_stages];
    for (k, s) in stages.into_iter().enumerate() {
        digests[k] = Some(s.digest);
        served.insert(
            k as u32,
            ServedState {
                step,
                hash: *blake3::hash(&s.bytes).as_bytes(),
                bytes: s.bytes,
                digest: s.digest,
            },
        );
    }
    (served, digests)
}

/// What handlers read and the driver updates.
struct Registry {
    epoch: u32,
    /// Steps done (the state replicas hold between steps).
    step: u64,
    /// When each pending `Admit` is answered (and whether a step is running: joiners must load
    /// the state after it).
    admissions: Admissions,
    /// Where each pending `Admit`'s answer goes (its handler waits on it).
    admit_waiters: HashMap<Ticket, tokio::sync::oneshot::Sender<AdmitAnswer>>,
    next_ticket: Ticket,
    phase: RunPhase,
    stages: Vec<BTreeMap<PeerId, Replica>>,
    /// The weights digest every replica of each stage holds at `step` (None before anyone knows).
    digests: Vec<Option<[u8; 32]>>,
    served: HashMap<u32, ServedState>,
    /// Whether stage state exists only from the seed (step 0 of a fresh run).
    fresh: bool,
    /// Peers banned by an audit: never admitted again.
    banned: BTreeSet<PeerId>,
}

struct Shared {
    run: RunId,
    config_toml: String,
    endpoint: Endpoint,
    registry: Mutex<Registry>,
    inbox: mpsc::UnboundedSender<Inbound>,
}

/// The answer to an `Admit`, sent to its handler.
type AdmitAnswer = std::result::Result<AdmitReply, RpcError>;

impl Shared {
    fn reg<T>(&self, f: impl FnOnce(&mut Registry) -> T) -> T {
        f(&mut self.registry.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn check_run(&self, run: RunId, epoch: u32) -> std::result::Result<(), RpcError> {
        let current = self.reg(|r| r.epoch);
        if run != self.run || epoch != current {
            return Err(RpcError::refused(
                code::BAD_REQUEST,
                format!(
                    "run {run} epoch {epoch}; this trainer runs {} epoch {current}",
                    self.run
                ),
            ));
        }
        Ok(())
    }
}

/// A running trainer. [`Trainer::start`] binds and serves; [`Trainer::run`] trains.
pub struct Trainer {
    opts: TrainerOptions,
    peer: Peer,
    shared: Arc<Shared>,
    inbox: mpsc::UnboundedReceiver<Inbound>,
    corpus: Arc<Corpus>,
    ends: Arc<Mutex<Shard>>,
    /// Stage shards built from the seed, only to know the digests replicas must report at step 0.
    view: router::SwarmView,
    rng: ChaCha8Rng,
    metrics: Metrics,
    act_codec: Codec,
    grad_codec: Codec,
    /// Boundary encoders and decoders, kept across passes.
    codecs: Arc<crate::compute::Codecs>,
    limits: Limits,
    pinger: Option<tokio::task::JoinHandle<()>>,
    /// A stage lost its last replica and nobody holds its state: the run restores every stage
    /// and the ends from the latest checkpoint (or the seed) before going on.
    restore_pending: bool,
    audit: super::audit::Auditor,
    /// The monitor's snapshot (issue #15), published at every event.
    observer: super::observe::Observer,
    /// Each replica's weights digest as it last reported it (`Applied`, `Ready`): between the
    /// sync boundaries of a multi-step sync, the state a reset of its step work returns to.
    own_digests: HashMap<PeerId, [u8; 32]>,
}

fn ends_pieces() -> Vec<Piece> {
    vec![Piece::Embedding, Piece::Head]
}

fn key_of(p: &PeerId) -> router::PeerKey {
    router::PeerKey(p.0)
}

/// A link assumed for peers we have not measured (home broadband: 20 Mbit/s up, 80 down).
fn default_link() -> router::Link {
    router::Link {
        up_bytes_per_s: 2.5e6,
        down_bytes_per_s: 1.0e7,
        coord: router::Coord::default(),
    }
}

fn run_err(m: impl Into<String>) -> Error {
    Error::Run(m.into())
}

impl Trainer {
    /// Creates (or resumes, when `opts.out` holds a checkpoint) the run, binds the peer and starts
    /// serving. Must be called inside a tokio runtime.
    pub async fn start(mut opts: TrainerOptions) -> Result<Trainer> {
        opts.config.validate()?;
        // The run is its config as every peer reads it back: parsing fills what a config built in
        // code may leave to defaults (the subspace seed: U and the token table), and a trainer
        // on other values than its stages' would compute another model at the same boundaries.
        let cfg = RunConfig::from_toml(&opts.config.to_toml()?)?;
        opts.config = cfg.clone();
        let config_toml = cfg.to_toml()?;
        let run = run_id_of(&config_toml);
        // The same corpus the local trainer reads, so batches match step for step.
        let corpus = swarm_model::train::load_corpus(&cfg.data)?;
        if corpus.vocab_size() > cfg.model.vocab_size {
            return Err(Error::VocabMismatch {
                corpus: corpus.vocab_size(),
                model: cfg.model.vocab_size,
            });
        }
        let num_stages = cfg.stages.len() - 1;
        let device = Device::Cpu;
        let mut ends = Shard::new(&cfg.model, &ends_pieces(), cfg.seed, DType::F32, &device)?;

        // Resume from a checkpoint in `out`.
        let mut epoch = 0;
        let mut step = 0;
        let mut served = HashMap::new();
        let mut digests = vec![None; num_stages];
        if let Some(dir) = &opts.out
            && checkpoint::exists(dir)
        {
            let restored = checkpoint::restore(dir, &cfg, &device)?;
            if restored.run != run {
                return Err(Error::ForeignCheckpoint {
                    dir: dir.clone(),
                    found: restored.run,
                    expected: run,
                });
            }
            ends.import_state(&restored.ends_state)?;
            epoch = restored.epoch + 1;
            step = restored.step;
            (served, digests) = served_states(restored.stages, step, num_stages);
            tracing::info!(%run, step, epoch, dir = %dir.display(), "resumed from checkpoint");
        }

        let peer = Peer::start(
            opts.identity.clone(),
            PeerConfig {
                listen: opts.listen,
                run_id: Some(run),
                announce: opts.announce.clone(),
                transport: opts.transport.clone(),
                shape: opts.shape.clone(),
                seed: Some(cfg.seed),
                // Joiners learn their NAT verdict from the trainer's checker (issue #14).
                checker: Some(
                    opts.checker
                        .unwrap_or_else(|| SocketAddr::new(opts.listen.ip(), 0)),
                ),
                relay: opts.relay,
                ..PeerConfig::default()
            },
        )
        .await?;
        // What joiners should dial: what the operator announced, else the first address of our
        // record (IPv4 first: most home links have it), else the socket's.
        let record = peer.local_record().info.addrs;
        let addr = opts
            .announce
            .first()
            .or_else(|| record.iter().find(|a| a.is_ipv4()))
            .or(record.first())
            .copied()
            .unwrap_or_else(|| peer.local_addr());
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            run,
            config_toml,
            endpoint: Endpoint {
                peer: peer.peer_id(),
                addr,
            },
            registry: Mutex::new(Registry {
                epoch,
                step,
                admissions: Admissions::new(ADMIT_WAIT, cfg.is_sync_boundary(step)),
                admit_waiters: HashMap::new(),
                next_ticket: 0,
                phase: RunPhase::Running,
                stages: vec![BTreeMap::new(); num_stages],
                digests,
                fresh: step == 0 && served.is_empty(),
                served,
                banned: Default::default(),
            }),
            inbox: tx,
        });
        register_handlers(&peer, &shared);

        let workload = router::Workload {
            tokens: (cfg.train.micro_batch_size * cfg.train.seq_len) as u32,
            hidden: cfg.model.hidden_size as u32,
            codec_ratio: 1.0,
        };
        let view = router::SwarmView::new(num_stages as u16, workload)?;
        let act_codec: Codec = cfg.codec.activations.parse()?;
        let grad_codec: Codec = cfg.codec.gradients.parse()?;
        let elems = cfg.train.micro_batch_size * cfg.train.seq_len * cfg.model.hidden_size;
        let mut audit_cfg = opts.audit.clone();
        if audit_cfg.ledger.is_none() {
            // Beside the checkpoint, not in it: a checkpoint folder is replaced whole and only if
            // it holds nothing else.
            audit_cfg.ledger = opts.out.as_ref().map(|o| {
                let mut name = o.file_name().unwrap_or_default().to_os_string();
                name.push(".ledger");
                o.with_file_name(name)
            });
        }
        let audit =
            super::audit::Auditor::new(audit_cfg, &opts.identity, run, &cfg, opts.sync_timeout)?;
        tracing::info!(%run, addr = %addr, stages = num_stages, "trainer started");
        let ledger = audit.config().ledger.clone();
        let observer = super::observe::Observer::new(&cfg, run, peer.peer_id(), addr, ledger);
        Ok(Trainer {
            rng: ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x7261_6e64),
            opts,
            peer,
            shared,
            inbox: rx,
            corpus: Arc::new(corpus),
            ends: Arc::new(Mutex::new(ends)),
            view,
            metrics: Metrics::default(),
            act_codec,
            grad_codec,
            codecs: Arc::default(),
            limits: Limits::new(elems),
            pinger: None,
            restore_pending: false,
            audit,
            observer,
            own_digests: HashMap::new(),
        })
    }

    /// Where peers reach the trainer.
    pub fn addr(&self) -> SocketAddr {
        self.shared.endpoint.addr
    }

    /// The trainer's peer id (replicas pin it).
    pub fn peer_id(&self) -> PeerId {
        self.shared.endpoint.peer
    }

    /// The run's id.
    pub fn run_id(&self) -> RunId {
        self.shared.run
    }

    /// The run's canonical config TOML.
    pub fn config_toml(&self) -> &str {
        &self.shared.config_toml
    }

    /// Steps done so far (the next step to run).
    pub fn step(&self) -> u64 {
        self.shared.reg(|r| r.step)
    }

    /// The current epoch (bumped by each restore).
    pub fn epoch(&self) -> u32 {
        self.shared.reg(|r| r.epoch)
    }

    /// Metrics so far.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn cfg(&self) -> &RunConfig {
        &self.opts.config
    }

    fn num_stages(&self) -> usize {
        self.cfg().stages.len() - 1
    }

    /// The run's state snapshot, republished at every step and event (issue #15).
    pub fn observe(&self) -> tokio::sync::watch::Receiver<Arc<super::observe::Snapshot>> {
        self.observer.subscribe()
    }

    fn publish(&mut self) {
        let (epoch, phase, replicas) = self.shared.reg(|r| {
            let rows = r.stages.iter().enumerate().flat_map(|(k, s)| {
                s.iter().map(move |(p, rep)| super::observe::ReplicaInput {
                    stage: k as u32,
                    peer: *p,
                    addr: rep.addr,
                    state: rep.state.name(),
                })
            });
            (r.epoch, r.phase, rows.collect::<Vec<_>>())
        });
        let inputs = super::observe::Inputs {
            step: self.step(),
            epoch,
            phase: super::observe::phase_name(phase),
            replicas,
            view: &self.view,
            metrics: &self.metrics,
            audit: &self.audit.stats,
            ledger_head: self.audit.ledger_head(),
            status: self.peer.status(),
            connections: self.peer.shared().connection_stats(),
        };
        self.observer.publish(inputs);
    }

    fn emit(&mut self, e: TrainerEvent, on_event: &mut dyn FnMut(&TrainerEvent)) {
        on_event(&e);
        let step = self.step();
        self.observer.event(&e, step);
        self.publish();
    }

    /// Trains until the run's last step (or `max_steps` steps of this process), calling
    /// `on_event` as it goes. Returns the metrics.
    pub async fn run(&mut self, on_event: &mut dyn FnMut(&TrainerEvent)) -> Result<Metrics> {
        self.start_pinger();
        let total = self.cfg().train.steps;
        let first = self.step();
        let last = match self.opts.max_steps {
            Some(n) => total.min(first + n),
            None => total,
        };
        let started = Instant::now();
        self.wait_for_replicas(self.opts.min_replicas.max(1), on_event)
            .await?;
        let train_start = Instant::now();
        self.metrics.clock = Some(super::timing::Clock::new(train_start));
        let waited = train_start - started;
        tracing::debug!(?waited, "replicas ready");
        while self.step() < last {
            if self.restore_pending {
                self.restore(on_event).await?;
            }
            self.admit_joiners(on_event).await?;
            self.wait_for_replicas(1, on_event).await?;
            self.metrics.enter(Part::Pipeline);
            let report = self.run_step(on_event).await?;
            self.metrics.enter(Part::Idle);
            let Some(report) = report else {
                continue;
            };
            if self.restore_pending {
                // A stage lost its state during this step's Apply: the step does not count.
                continue;
            }
            let now = Instant::now();
            self.metrics.train_seconds = (now - train_start).as_secs_f64();
            if let Some(c) = &self.metrics.clock {
                self.metrics.time_breakdown = c.breakdown(now);
            }
            let step = report.step + 1;
            self.emit(TrainerEvent::Step(report.clone()), on_event);
            self.metrics.steps.push(report);
            let t = &self.cfg().train;
            // Between the boundaries of a multi-step sync no agreed state exists to fetch.
            let agreed = self.opts.config.is_sync_boundary(step);
            let due = |every: u64| agreed && ((every > 0 && step % every == 0) || step == last);
            let checkpoint = self.opts.out.clone().filter(|_| due(t.checkpoint_every));
            let eval = due(t.eval_every);
            if checkpoint.is_some() || eval {
                // One fetch of the whole (verified) model serves both. A replica dying meanwhile
                // costs this checkpoint or evaluation, not the run.
                match self.fetch_model(on_event).await.map(Arc::new) {
                    Ok(m) => {
                        if let Some(dir) = checkpoint {
                            match self.save_checkpoint(&dir, m.clone()).await {
                                Ok(()) => {
                                    self.emit(TrainerEvent::Checkpoint { step, dir }, on_event)
                                }
                                Err(e) => {
                                    tracing::warn!(step, error = %e, "checkpoint not written")
                                }
                            }
                        }
                        if eval {
                            match self.evaluate(m).await {
                                Ok(val_loss) => {
                                    tracing::info!(step, val_loss, "eval");
                                    self.metrics.val_losses.push((step, val_loss));
                                    self.emit(TrainerEvent::Eval { step, val_loss }, on_event);
                                }
                                Err(e) => tracing::warn!(step, error = %e, "evaluation failed"),
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(step, error = %e, "model not fetched for a checkpoint or evaluation")
                    }
                }
            }
        }
        self.shared.reg(|r| {
            if r.step >= total {
                r.phase = RunPhase::Finished;
            }
        });
        self.note_relay_bytes();
        self.publish();
        Ok(self.metrics.clone())
    }

    /// Stops serving (peers see the connection close).
    pub async fn shutdown(mut self) {
        if let Some(p) = self.pinger.take() {
            p.abort();
        }
        self.peer.leave().await;
    }

    fn start_pinger(&mut self) {
        if self.pinger.is_some() {
            return;
        }
        let shared = self.shared.clone();
        let peer_shared = self.peer.shared().clone();
        self.pinger = Some(tokio::spawn(ping_loop(shared, peer_shared)));
    }

    fn serving(&self, stage: usize) -> Vec<(PeerId, SocketAddr)> {
        self.shared.reg(|r| {
            r.stages[stage]
                .iter()
                .filter(|(_, rep)| rep.state == ReplicaState::Serving)
                .map(|(p, rep)| (*p, rep.addr))
                .collect()
        })
    }

    fn stage_of(&self, peer: &PeerId) -> Option<u32> {
        self.shared.reg(|r| {
            r.stages
                .iter()
                .position(|s| s.contains_key(peer))
                .map(|k| k as u32)
        })
    }
}

fn now_ms() -> u64 {
    crate::peer::unix_now()
}

/// Where a replica of `stage` (other than `except`) loads its state from now (see
/// [`machine::replicas::state_source`]), with the registry `r` of the trainer at `trainer`.
fn state_source(
    r: &Registry,
    trainer: Endpoint,
    stage: u32,
    except: Option<PeerId>,
) -> StateSource {
    {
        let holders = StageHolders {
            served: r
                .served
                .get(&stage)
                .filter(|s| s.step == r.step)
                .map(|s| s.digest),
            replicas: r.stages[stage as usize]
                .iter()
                .filter(|(p, rep)| rep.state == ReplicaState::Serving && Some(**p) != except)
                .map(|(p, rep)| Endpoint {
                    peer: *p,
                    addr: rep.addr,
                })
                .collect(),
            agreed: r.digests[stage as usize],
        };
        machine::replicas::state_source(trainer, holders, r.fresh, r.admissions.in_step())
    }
}

/// Longest wait for a replica's answer to the liveness probe before a sync.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Longest an Admit waits for the step boundary (below the joiner's request timeout).
const ADMIT_WAIT: Duration = Duration::from_secs(8);
