//! The trainer process: a peer of the swarm that creates the run, admits stage replicas, drives
//! steps (micro-batches through the pipeline with several in flight, retries, exactly-once
//! accounting), coordinates the replica sync, and checkpoints.
//!
//! One task (the driver, [`Trainer::run`]) owns all mutable run state: the ends shard (embedding
//! and head), the step book, the router's view. Message handlers only validate, answer with a small
//! acknowledgement and forward what they received to the driver through a channel, so nothing is
//! shared but the registry that answers `RunInfo` and `Admit`.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use swarm_compression::{Codec, Decoder, Encoder, Limits};
use swarm_model::{Corpus, ForwardCtx, Piece, RunConfig, Shard, clip_scale};
use swarm_router as router;
use tokio::sync::mpsc;

use super::book::{Column, CountOutcome, Holder, StepBook};
use super::checkpoint;
use super::metrics::{Channel, Metrics, StepReport};
use crate::error::{Error, Result};
use crate::identity::{Identity, PeerId};
use crate::membership::RunId;
use crate::peer::{Peer, PeerConfig, PeerShared, RequestCtx};
use crate::protocol::{
    Abandon, Ack, Admit, AdmitReply, Applied, Apply, Backward, BackwardOut, Counted, Endpoint,
    FetchState, Forward, ForwardOut, Hop, HopFailed, Leave, LeaveReply, MbKey, Ready, Reload,
    RunInfo, RunInfoRequest, RunPhase, StateSource, SyncDone, SyncStart, Traffic,
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
    pub config: RunConfig,
    pub identity: Identity,
    /// Address to listen on (port 0 picks one).
    pub listen: SocketAddr,
    /// Addresses to announce (empty: the listen address).
    pub announce: Vec<SocketAddr>,
    /// Checkpoint directory (HF format); a checkpoint found there is resumed from.
    pub out: Option<PathBuf>,
    pub shape: Option<LinkShape>,
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
}

impl TrainerOptions {
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
    Waiting { serving: Vec<usize>, need: usize },
    /// A replica became routable (`sync_ms`: how long it took to load its state).
    Joined {
        peer: PeerId,
        stage: u32,
        sync_ms: u64,
    },
    /// A replica was lost (dead, banned or gone).
    Lost { peer: PeerId, stage: u32 },
    /// A replica that asked to leave was released at a step boundary (`handed_off`: it was its
    /// stage's last one and the trainer kept its state for the next peer to take the stage).
    Left {
        peer: PeerId,
        stage: u32,
        handed_off: bool,
    },
    /// A step finished.
    Step(StepReport),
    /// A checkpoint was written after `step` steps.
    Checkpoint { step: u64, dir: PathBuf },
    /// A stage lost its last replica and its state: every stage and the ends were restored from
    /// the checkpoint after `step` steps (`from_checkpoint` false: from the seed, step 0) in a
    /// new `epoch`; the steps since run again.
    Restored {
        step: u64,
        epoch: u32,
        from_checkpoint: bool,
    },
    /// The run is paused: stage `stage` has no replica left.
    Paused { stage: u32 },
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReplicaState {
    /// Admitted, loading its state.
    Joining,
    /// Routable.
    Serving,
    /// Announced it is leaving: no new work.
    Leaving,
}

impl ReplicaState {
    fn name(self) -> &'static str {
        match self {
            ReplicaState::Joining => "joining",
            ReplicaState::Serving => "serving",
            ReplicaState::Leaving => "leaving",
        }
    }
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

/// What handlers read and the driver updates.
struct Registry {
    epoch: u32,
    /// Steps done (the state replicas hold between steps).
    step: u64,
    /// A step is running: joiners must load the state after it.
    in_step: bool,
    phase: RunPhase,
    stages: Vec<BTreeMap<PeerId, Replica>>,
    /// The weights digest every replica of each stage holds at `step` (None before anyone knows).
    digests: Vec<Option<[u8; 32]>>,
    served: HashMap<u32, ServedState>,
    /// Whether stage state exists only from the seed (step 0 of a fresh run).
    fresh: bool,
    /// Peers banned by an audit: never admitted again.
    banned: std::collections::BTreeSet<PeerId>,
}

struct Shared {
    run: RunId,
    config_toml: String,
    endpoint: Endpoint,
    registry: Mutex<Registry>,
    inbox: mpsc::UnboundedSender<Inbound>,
    /// Steps done, published at every step boundary (joiners admitted mid-step wait for it).
    boundary: tokio::sync::watch::Sender<u64>,
}

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

/// One attempt of a micro-batch in flight.
struct InFlight {
    key: MbKey,
    route: Vec<Hop>,
    plan: router::Plan,
    embed_ctx: Option<ForwardCtx>,
    targets: Vec<u32>,
    embedding: bool,
    head: bool,
    deadline: Instant,
    /// BackwardOut seen (the pipeline pass is over; only Counted reports may be missing).
    returned: bool,
    /// Our own frames of this attempt, counted when sent: the first activations and (once the
    /// forward pass is back) the loss gradient. The passes' `upstream` includes them again.
    sent_act: Traffic,
    sent_grad: Option<Traffic>,
    /// A `HopFailed` told us what the failed pass had sent (counted then).
    reported: bool,
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
    limits: Limits,
    events: Vec<TrainerEvent>,
    pinger: Option<tokio::task::JoinHandle<()>>,
    /// A stage lost its last replica and nobody holds its state: the run restores every stage
    /// and the ends from the latest checkpoint (or the seed) before going on.
    restore_pending: bool,
    audit: super::audit::Auditor,
    /// The monitor's snapshot (issue #15), published at every event.
    observer: super::observe::Observer,
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
    pub async fn start(opts: TrainerOptions) -> Result<Trainer> {
        let cfg = opts.config.clone();
        cfg.validate()?;
        let config_toml = cfg.to_toml()?;
        let run = run_id_of(&config_toml);
        // The same corpus the local trainer reads, so batches match step for step.
        let corpus = swarm_model::train::load_corpus(&cfg.data)?;
        if corpus.vocab_size() > cfg.model.vocab_size {
            return Err(run_err(format!(
                "corpus vocab {} > model vocab {}",
                corpus.vocab_size(),
                cfg.model.vocab_size
            )));
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
                return Err(run_err(format!(
                    "{} holds a checkpoint of run {}, not of this config's run {run}",
                    dir.display(),
                    restored.run
                )));
            }
            ends.import_state(&restored.ends_state)?;
            epoch = restored.epoch + 1;
            step = restored.step;
            for (k, s) in restored.stages.into_iter().enumerate() {
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
                checker: Some(SocketAddr::new(opts.listen.ip(), 0)),
                ..PeerConfig::default()
            },
        )
        .await?;
        let addr = opts
            .announce
            .first()
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
                in_step: false,
                phase: RunPhase::Running,
                stages: vec![BTreeMap::new(); num_stages],
                digests,
                fresh: step == 0 && served.is_empty(),
                served,
                banned: Default::default(),
            }),
            inbox: tx,
            boundary: tokio::sync::watch::channel(step).0,
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
            limits: Limits::new(elems),
            events: Vec::new(),
            pinger: None,
            restore_pending: false,
            audit,
            observer,
        })
    }

    /// Where peers reach the trainer.
    pub fn addr(&self) -> SocketAddr {
        self.shared.endpoint.addr
    }

    pub fn peer_id(&self) -> PeerId {
        self.shared.endpoint.peer
    }

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
        self.events.push(e);
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
        let waited = train_start - started;
        tracing::debug!(?waited, "replicas ready");
        while self.step() < last {
            if self.restore_pending {
                self.restore(on_event).await?;
            }
            self.admit_joiners(on_event).await?;
            self.wait_for_replicas(1, on_event).await?;
            let Some(report) = self.run_step(on_event).await? else {
                continue;
            };
            if self.restore_pending {
                // A stage lost its state during this step's Apply: the step does not count.
                continue;
            }
            self.metrics.train_seconds = train_start.elapsed().as_secs_f64();
            let step = report.step + 1;
            self.emit(TrainerEvent::Step(report.clone()), on_event);
            self.metrics.steps.push(report);
            let every = self.cfg().train.checkpoint_every;
            if let Some(dir) = self.opts.out.clone()
                && ((every > 0 && step % every == 0) || step == last)
            {
                // A replica dying meanwhile costs this checkpoint, not the run.
                match self.save_checkpoint(&dir, on_event).await {
                    Ok(()) => self.emit(TrainerEvent::Checkpoint { step, dir }, on_event),
                    Err(e) => tracing::warn!(step, error = %e, "checkpoint not written"),
                }
            }
        }
        self.shared.reg(|r| {
            if r.step >= total {
                r.phase = RunPhase::Finished;
            }
        });
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

    /// Waits until every stage has `need` serving replicas, handling messages meanwhile.
    async fn wait_for_replicas(
        &mut self,
        need: usize,
        on_event: &mut dyn FnMut(&TrainerEvent),
    ) -> Result<()> {
        let deadline = Instant::now() + self.opts.wait_for_peers;
        let mut last_report: Option<Vec<usize>> = None;
        loop {
            if self.restore_pending {
                Box::pin(self.restore(on_event)).await?;
            }
            let serving: Vec<usize> = (0..self.num_stages())
                .map(|k| self.serving(k).len())
                .collect();
            if serving.iter().all(|&n| n >= need) {
                return Ok(());
            }
            if last_report.as_ref() != Some(&serving) {
                self.emit(
                    TrainerEvent::Waiting {
                        serving: serving.clone(),
                        need,
                    },
                    on_event,
                );
                if let Some(k) = serving.iter().position(|&n| n == 0)
                    && self.step() > 0
                {
                    self.shared.reg(|r| r.phase = RunPhase::Paused);
                    self.emit(TrainerEvent::Paused { stage: k as u32 }, on_event);
                }
                last_report = Some(serving.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(run_err(format!(
                    "waited {:?} for {need} replica(s) per stage; serving: {serving:?}",
                    self.opts.wait_for_peers
                )));
            }
            let wait = (deadline - now).min(Duration::from_millis(500));
            if let Ok(Some(msg)) = tokio::time::timeout(wait, self.inbox.recv()).await {
                self.handle_idle(msg, on_event).await;
            }
        }
        // (unreachable)
    }

    /// Between steps: Ready, Leave and Down are acted on; pipeline traffic is stale and dropped.
    async fn handle_idle(&mut self, msg: Inbound, on_event: &mut dyn FnMut(&TrainerEvent)) {
        match msg {
            Inbound::Ready(from, ready) => self.on_ready(from, ready, on_event),
            Inbound::Leave(_) => self.release_leavers(on_event).await,
            Inbound::Down(from) => {
                self.lose_peer(from, None, on_event);
            }
            Inbound::SyncDone(_, d) => self.count_sync_report(&d),
            other => tracing::debug!(?other, "message between steps ignored"),
        }
    }

    fn on_ready(&mut self, from: PeerId, ready: Ready, on_event: &mut dyn FnMut(&TrainerEvent)) {
        let stage = ready.stage as usize;
        let (ok, addr) = self.shared.reg(|r| {
            let expected_step = r.step;
            let want = r.digests.get(stage).copied().flatten();
            let Some(rep) = r.stages.get_mut(stage).and_then(|s| s.get_mut(&from)) else {
                return (false, None);
            };
            if rep.state == ReplicaState::Leaving {
                // Asked to leave while loading: it is released at the boundary, never routed.
                return (false, None);
            }
            let digest_ok = want.is_none_or(|d| d == ready.digest);
            if rep.state == ReplicaState::Serving && ready.step == expected_step && digest_ok {
                // A second report of the same load (a joiner the trainer also told to reload
                // after a restore answers both): one join, one entry.
                tracing::debug!(peer = %from.short(), stage, "replica already serving this state");
                return (false, None);
            }
            if ready.step != expected_step || !digest_ok {
                tracing::warn!(peer = %from.short(), stage, step = ready.step, expected_step, digest_ok, "replica ready with the wrong state");
                return (false, Some(rep.addr));
            }
            rep.state = ReplicaState::Serving;
            if want.is_none() {
                r.digests[stage] = Some(ready.digest);
            }
            (true, Some(rep.addr))
        });
        if !ok {
            if let Some(addr) = addr {
                let step = self.shared.reg(|r| r.step);
                self.send_reload(from, addr, stage as u32, step);
            }
            return;
        }
        let info = router::PeerInfo {
            stages: stage as u16..stage as u16 + 1,
            compute_tokens_per_s: 5_000.0,
            link: default_link(),
            state: router::PeerState::Serving,
        };
        let _ = self.view.remove(&key_of(&from));
        if let Err(e) = self.view.insert(key_of(&from), info, now_ms()) {
            tracing::warn!(error = %e, "router view refused a replica");
        }
        self.metrics
            .state_sync_seconds
            .push(ready.sync_ms as f64 / 1000.0);
        self.emit(
            TrainerEvent::Joined {
                peer: from,
                stage: stage as u32,
                sync_ms: ready.sync_ms,
            },
            on_event,
        );
    }

    /// The shares a replica reports in `SyncDone` crossed the network whether or not its report
    /// still matters (a late one of a sync that was redone): they always count.
    fn count_sync_report(&mut self, d: &SyncDone) {
        self.metrics
            .wire
            .channel_mut(Channel::Sync)
            .add(d.share_bytes, d.share_dense_bytes);
        // Likewise the frames of abandoned passes nobody had reported.
        for (channel, t) in [
            (Channel::Activations, d.abandoned_activations),
            (Channel::Gradients, d.abandoned_gradients),
        ] {
            if t.wire > 0 {
                self.metrics.wire.channel_mut(channel).add(t.wire, t.dense);
            }
        }
    }

    /// Tells a replica with the wrong state to load the stage's agreed state.
    /// `step`: the steps the state must have applied (the replicas' current state).
    fn send_reload(&self, peer: PeerId, addr: SocketAddr, stage: u32, step: u64) {
        let source = self.state_source(stage, Some(peer));
        let epoch = self.shared.reg(|r| r.epoch);
        let msg = Reload {
            run: self.shared.run,
            epoch,
            stage,
            step,
            source,
        };
        let ps = self.peer.shared().clone();
        let tx = self.shared.inbox.clone();
        tokio::spawn(async move {
            match ps.call::<Reload, Applied>(addr, Some(peer), &msg).await {
                Ok((_, applied)) => {
                    let _ = tx.send(Inbound::Ready(
                        peer,
                        Ready {
                            run: applied.run,
                            epoch: applied.epoch,
                            stage: applied.stage,
                            step: applied.step,
                            digest: applied.digest,
                            sync_ms: 0,
                        },
                    ));
                }
                Err(e) => {
                    tracing::warn!(peer = %peer.short(), error = %e, "reload failed");
                    let _ = tx.send(Inbound::Down(peer));
                }
            }
        });
    }

    fn state_source(&self, stage: u32, except: Option<PeerId>) -> StateSource {
        state_source(&self.shared, stage, except)
    }

    /// Removes a replica: from the registry, the router, and this step's accounting.
    fn lose_peer(
        &mut self,
        peer: PeerId,
        book: Option<&mut StepBook>,
        on_event: &mut dyn FnMut(&TrainerEvent),
    ) -> Vec<usize> {
        let stage = self.stage_of(&peer);
        let removed = self
            .shared
            .reg(|r| r.stages.iter_mut().any(|s| s.remove(&peer).is_some()));
        let _ = self.view.remove(&key_of(&peer));
        let lost = book.map(|b| b.exclude(peer)).unwrap_or_default();
        if let Some(k) = stage {
            self.check_stage_state(k as usize);
        }
        if removed {
            self.metrics.peers_lost += 1;
            tracing::warn!(peer = %peer.short(), ?stage, lost = lost.len(), "replica lost");
            self.emit(
                TrainerEvent::Lost {
                    peer,
                    stage: stage.unwrap_or(u32::MAX),
                },
                on_event,
            );
        }
        lost
    }

    /// At a step boundary: waits (bounded) for admitted joiners to report Ready.
    async fn admit_joiners(&mut self, on_event: &mut dyn FnMut(&TrainerEvent)) -> Result<()> {
        let deadline = Instant::now() + self.opts.join_timeout;
        // Drain what already arrived.
        while let Ok(msg) = self.inbox.try_recv() {
            self.handle_idle(msg, on_event).await;
        }
        loop {
            let joining: Vec<PeerId> = self.shared.reg(|r| {
                r.stages
                    .iter()
                    .flat_map(|s| s.iter())
                    .filter(|(_, rep)| rep.state == ReplicaState::Joining)
                    .map(|(p, _)| *p)
                    .collect()
            });
            if joining.is_empty() {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                for p in joining {
                    tracing::warn!(peer = %p.short(), "joiner did not load its state in time");
                    self.lose_peer(p, None, on_event);
                }
                return Ok(());
            }
            if let Ok(Some(msg)) = tokio::time::timeout(deadline - now, self.inbox.recv()).await {
                self.handle_idle(msg, on_event).await;
            }
        }
    }

    /// One optimizer step: every micro-batch counted exactly once, then the replica sync.
    /// `None`: the step was abandoned because a stage lost its last replica (see `restore`).
    async fn run_step(
        &mut self,
        on_event: &mut dyn FnMut(&TrainerEvent),
    ) -> Result<Option<StepReport>> {
        let started = Instant::now();
        let (step, epoch) = self.shared.reg(|r| {
            r.in_step = true;
            r.phase = RunPhase::Running;
            (r.step, r.epoch)
        });
        let stages = self.num_stages();
        let m = self.cfg().train.micro_batches;
        let mut book = StepBook::new(stages as u16, m);
        let mut queue: VecDeque<usize> = (0..m).collect();
        let mut inflight: HashMap<usize, InFlight> = HashMap::new();
        let max_in_flight = if self.opts.max_in_flight == 0 {
            2 * stages
        } else {
            self.opts.max_in_flight
        };
        let mut pending_sync: Vec<usize> = (0..stages).collect();
        let mut norms: HashMap<usize, f64> = HashMap::new();
        let mut mismatches = 0u64;
        let mut participants_per_stage = vec![0usize; stages];
        // Sync rounds per stage in this step: bumped when a stage's sync is redone.
        let mut sync_rounds = vec![0u32; stages];

        loop {
            // Micro-batch phase.
            while !book.all_complete() {
                while inflight.len() < max_in_flight
                    && let Some(mb) = queue.pop_front()
                {
                    if book.is_complete(mb) || inflight.contains_key(&mb) {
                        continue;
                    }
                    match self.dispatch(step, epoch, mb, &mut book).await {
                        Ok(f) => {
                            inflight.insert(mb, f);
                        }
                        Err(Error::Router(e)) => {
                            if self.restore_pending {
                                return Ok(self.abandon_step(&mut inflight));
                            }
                            // No routable replica for some stage: wait for one (pauses the run).
                            tracing::warn!(error = %e, "cannot route; waiting for replicas");
                            queue.push_front(mb);
                            self.wait_for_replicas(1, on_event).await?;
                            break;
                        }
                        Err(e) => return Err(e),
                    }
                }
                let next_deadline = inflight.values().map(|f| f.deadline).min();
                let wait = next_deadline
                    .map(|d| d.saturating_duration_since(Instant::now()))
                    .unwrap_or(Duration::from_millis(200))
                    .max(Duration::from_millis(1));
                let msg = match tokio::time::timeout(wait, self.inbox.recv()).await {
                    Ok(Some(msg)) => Some(msg),
                    Ok(None) => return Err(run_err("trainer inbox closed")),
                    Err(_) => None,
                };
                let mut failed: Vec<(usize, Option<PeerId>, bool)> = Vec::new();
                let mut lost_mbs: Vec<usize> = Vec::new();
                match msg {
                    None => {}
                    Some(Inbound::ForwardOut(from, out)) => {
                        let mb = out.key.mb as usize;
                        // Only the route's last replica may deliver the output.
                        if out.key.step == step
                            && let Some(f) = inflight.get_mut(&mb)
                            && f.key == out.key
                            && f.route.last().map(|h| h.peer) == Some(from)
                            && f.sent_grad.is_none()
                        {
                            let stage = f.route.last().map_or(0, |h| h.stage);
                            if let Err(why) = Receipt::check_received(
                                out.receipt.as_ref(),
                                &from,
                                &out.run,
                                out.epoch,
                                out.key,
                                stage,
                                Pass::Forward,
                                &out.activations,
                            ) {
                                tracing::warn!(peer = %from.short(), why, mb, "bad receipt with the forward output");
                                failed.push((mb, Some(from), false));
                            } else if let Err(e) = self.on_forward_out(&mut book, f, &out).await {
                                tracing::warn!(error = %e, mb, "bad forward output");
                                let last = f.route.last().map(|h| h.peer);
                                failed.push((mb, last, false));
                            }
                        }
                    }
                    Some(Inbound::BackwardOut(from, out)) => {
                        let mb = out.key.mb as usize;
                        if out.key.step == step
                            && let Some(f) = inflight.get_mut(&mb)
                            && f.key == out.key
                            && f.route.first().map(|h| h.peer) == Some(from)
                            && !f.returned
                        {
                            if let Err(why) = Receipt::check_received(
                                out.receipt.as_ref(),
                                &from,
                                &out.run,
                                out.epoch,
                                out.key,
                                0,
                                Pass::Backward,
                                &out.grad,
                            ) {
                                tracing::warn!(peer = %from.short(), why, mb, "bad receipt with the input gradient");
                                failed.push((mb, Some(from), false));
                            } else {
                                self.audit.got_backward(out.key, &out.grad);
                                let res = on_backward_out(
                                    &self.ends,
                                    &mut self.grad_dec(),
                                    &self.limits,
                                    f,
                                    &out,
                                    &mut self.metrics,
                                )
                                .await;
                                match res {
                                    Ok(()) => {
                                        f.returned = true;
                                        if f.embedding {
                                            book.count(
                                                mb,
                                                f.key.attempt,
                                                Column::Embedding,
                                                Holder::Trainer,
                                            );
                                        }
                                    }
                                    Err(e) => {
                                        tracing::warn!(error = %e, mb, "bad input gradient");
                                        failed.push((mb, f.route.first().map(|h| h.peer), false));
                                    }
                                }
                            }
                        }
                    }
                    Some(Inbound::Counted(from, c)) if c.key.step == step => {
                        let out = book.count(
                            c.key.mb as usize,
                            c.key.attempt,
                            Column::Stage(c.stage as u16),
                            Holder::Peer(from),
                        );
                        if out == CountOutcome::Tainted {
                            tracing::warn!(peer = %from.short(), mb = c.key.mb, attempt = c.key.attempt, "unexpected count: replica excluded from this step");
                            lost_mbs.extend(book.exclude(from));
                        }
                    }
                    Some(Inbound::Counted(..)) => {}
                    Some(Inbound::HopFailed(from, h)) => {
                        let mb = h.key.mb as usize;
                        let on_route = inflight
                            .get(&mb)
                            .is_some_and(|f| f.route.iter().any(|x| x.peer == from));
                        if h.key.step == step && book.is_current(mb, h.key.attempt) && on_route {
                            // What the failed pass had sent, less our own frame (counted when
                            // sent): the backward pass if it had begun, else the forward one.
                            if let Some(f) = inflight.get_mut(&mb) {
                                f.reported = true;
                                let (channel, ours) = match f.sent_grad {
                                    Some(g) => (Channel::Gradients, g),
                                    None => (Channel::Activations, f.sent_act),
                                };
                                self.metrics.wire.channel_mut(channel).add(
                                    h.traffic.wire.saturating_sub(ours.wire),
                                    h.traffic.dense.saturating_sub(ours.dense),
                                );
                            }
                            failed.push((mb, Some(h.failed), h.busy));
                        }
                    }
                    Some(Inbound::SendFailed { key, peer, busy }) => {
                        let mb = key.mb as usize;
                        if key.step == step && book.is_current(mb, key.attempt) {
                            failed.push((mb, Some(peer), busy));
                        }
                    }
                    Some(Inbound::Leave(p)) => {
                        // No new work; what it holds finishes, it syncs, and it is released at
                        // the boundary.
                        self.retire_from_view(p);
                    }
                    Some(Inbound::Down(p)) => {
                        lost_mbs.extend(self.lose_peer(p, Some(&mut book), on_event));
                        for (mb, f) in &inflight {
                            if f.route.iter().any(|h| h.peer == p) {
                                failed.push((*mb, Some(p), false));
                            }
                        }
                    }
                    Some(Inbound::Ready(from, r)) => self.on_ready(from, r, on_event),
                    Some(Inbound::SyncDone(from, d)) => {
                        self.count_sync_report(&d);
                        tracing::debug!(peer = %from.short(), step = d.step, "sync report outside a sync ignored");
                    }
                }
                if self.restore_pending {
                    return Ok(self.abandon_step(&mut inflight));
                }
                // Deadlines.
                let now = Instant::now();
                for (mb, f) in &inflight {
                    if f.deadline <= now {
                        failed.push((*mb, None, false));
                    }
                }
                for (mb, who, busy) in failed {
                    if let Some(f) = inflight.remove(&mb) {
                        self.fail_attempt(f, who, busy);
                        queue.push_front(mb);
                    }
                }
                for mb in lost_mbs {
                    if !inflight.contains_key(&mb) && !queue.contains(&mb) {
                        queue.push_back(mb);
                    }
                }
                // Finished attempts.
                let done: Vec<usize> = inflight
                    .iter()
                    .filter(|(mb, f)| f.returned && book.is_complete(**mb))
                    .map(|(mb, _)| *mb)
                    .collect();
                for mb in done {
                    if let Some(f) = inflight.remove(&mb) {
                        for hop in &f.plan.hops {
                            self.view.add_load(&hop.peer, -1);
                            let _ = self.view.report(
                                &hop.peer,
                                router::Outcome::Success,
                                now_ms(),
                                &router::HealthConfig::default(),
                            );
                        }
                    }
                }
                // An attempt that came back but whose counts were lost (a replica died after
                // counting) must run again for the missing columns.
                let stale: Vec<usize> = inflight
                    .iter()
                    .filter(|(mb, f)| f.returned && !book.is_complete(**mb))
                    .filter(|(_, f)| f.deadline <= Instant::now() + self.opts.attempt_timeout / 2)
                    .map(|(mb, _)| *mb)
                    .collect();
                for mb in stale {
                    if let Some(f) = inflight.remove(&mb) {
                        self.release(&f);
                        queue.push_back(mb);
                    }
                }
            }
            // Attempts still in flight are complete (their late messages are ignored).
            for (_, f) in inflight.drain() {
                self.release(&f);
            }

            // A replica that died after counting must not be asked to sync: probe them all
            // first (a crash during the sync itself is handled below, at a higher cost).
            let dead = self.probe_replicas(&pending_sync).await;
            if !dead.is_empty() {
                for p in dead {
                    for mb in self.lose_peer(p, Some(&mut book), on_event) {
                        if !queue.contains(&mb) {
                            queue.push_back(mb);
                        }
                    }
                }
                if !book.all_complete() {
                    continue;
                }
            }

            // Audits (issue #7), before any stage syncs: replicas still hold the step's weights,
            // receipts and frames. A ban discards the step's gradients everywhere (they may hold
            // the cheater's outputs) and re-runs the step on honest replicas.
            if pending_sync.len() == stages {
                let bans = self.audit_step(step, epoch, &book).await;
                if !bans.is_empty() {
                    for b in &bans {
                        self.observer.ban(&b.peer, b.stage, &b.reason, step);
                        self.shared.reg(|r| r.banned.insert(b.peer));
                        self.lose_peer(b.peer, Some(&mut book), on_event);
                    }
                    for k in 0..stages {
                        self.reset_stage(k, step).await;
                    }
                    let ends = self.ends.clone();
                    tokio::task::spawn_blocking(move || {
                        ends.lock().unwrap_or_else(|e| e.into_inner()).zero_grads()
                    })
                    .await
                    .map_err(|e| run_err(e.to_string()))?;
                    self.metrics.retries += book.retries();
                    book = StepBook::new(stages as u16, m);
                    queue = (0..m).collect();
                    continue;
                }
            }

            if self.restore_pending {
                return Ok(self.abandon_step(&mut inflight));
            }
            // Sync phase, for the stages not yet synced.
            let outcome = self
                .sync_stages(step, epoch, &book, &pending_sync, &sync_rounds, on_event)
                .await?;
            for (k, n, parts) in outcome.done {
                norms.insert(k, n);
                participants_per_stage[k] = parts;
                // Its replicas hold the summed gradient: losing one now costs no count.
                book.freeze_stage(k as u16);
            }
            mismatches += outcome.norm_mismatches;
            let mut lost_mbs = Vec::new();
            for p in &outcome.failed_peers {
                lost_mbs.extend(self.lose_peer(*p, Some(&mut book), on_event));
            }
            pending_sync = (0..stages).filter(|k| !norms.contains_key(k)).collect();
            if pending_sync.is_empty() {
                break;
            }
            // A replica died during the sync of these stages: the survivors are stuck in that
            // sync with their accumulators. Reset them to the step's starting state (which they
            // still hold: nobody applied) and run every micro-batch again for those stages.
            for &k in &pending_sync {
                sync_rounds[k] += 1;
                self.reset_stage(k, step).await;
                lost_mbs.extend(book.clear_stage(k as u16));
            }
            for mb in lost_mbs {
                if !queue.contains(&mb) {
                    queue.push_back(mb);
                }
            }
            tracing::warn!(stages = ?pending_sync, "sync failed; re-running lost micro-batches");
        }

        // Global norm, clip, learning rate, optimizer everywhere.
        let ends_norm = {
            let ends = self.ends.clone();
            tokio::task::spawn_blocking(move || {
                ends.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .grad_sq_norm()
            })
            .await
            .map_err(|e| run_err(e.to_string()))??
        };
        let total: f64 = (0..stages).map(|k| norms[&k]).sum::<f64>() + ends_norm;
        let cfg = self.cfg().clone();
        let scale = clip_scale(total, cfg.train.grad_clip);
        let lr = cfg.schedule().at(step);
        let hp = cfg.adamw();
        {
            let ends = self.ends.clone();
            tokio::task::spawn_blocking(move || -> Result<()> {
                let mut e = ends.lock().unwrap_or_else(|e| e.into_inner());
                e.optimizer_step(&hp, lr, scale)?;
                e.zero_grads();
                Ok(())
            })
            .await
            .map_err(|e| run_err(e.to_string()))??;
        }
        mismatches += self
            .apply_all(step, epoch, &book, lr, scale, on_event)
            .await?;
        let attempts: Vec<Option<u32>> = (0..m).map(|mb| book.current_attempt(mb)).collect();
        self.audit.end_step(step, &attempts, &cfg);
        self.metrics.audit = self.audit.stats.clone();
        self.metrics.replica_hash_mismatches += mismatches;
        self.metrics.retries += book.retries();
        let tokens = cfg.tokens_per_step() as u64;
        self.metrics.tokens += tokens;
        self.shared.reg(|r| {
            r.step = step + 1;
            r.in_step = false;
            r.fresh = false;
            r.served.retain(|_, s| s.step == step + 1);
        });
        self.shared.boundary.send_replace(step + 1);
        self.release_leavers(on_event).await;
        let loss = book
            .mean_loss()
            .ok_or_else(|| run_err("step finished without every loss"))?;
        Ok(Some(StepReport {
            step,
            loss,
            lr,
            grad_norm: total.sqrt(),
            tokens,
            seconds: started.elapsed().as_secs_f64(),
            retries: book.retries(),
            hash_mismatches: mismatches,
            participants: participants_per_stage,
            wire_bytes: self.metrics.wire.tensor_wire_bytes(),
            dense_bytes: self.metrics.wire.tensor_dense_bytes(),
            wire: self.metrics.wire,
        }))
    }

    /// Runs the step's audits (see `audit.rs`); returns the bans.
    async fn audit_step(
        &mut self,
        step: u64,
        epoch: u32,
        book: &StepBook,
    ) -> Vec<super::audit::Ban> {
        let stages = self.num_stages();
        let replicas = (0..stages)
            .map(|k| {
                let mut v = self.serving(k);
                v.retain(|(p, _)| !book.is_excluded(p));
                v
            })
            .collect();
        let ps = self.peer.shared().clone();
        let config = self.opts.config.clone();
        let view = super::audit::StepView {
            run: self.shared.run,
            epoch,
            step,
            config: &config,
            attempts: (0..book.micro_batches())
                .map(|mb| book.current_attempt(mb))
                .collect(),
            replicas,
            digests: self.shared.reg(|r| r.digests.clone()),
            peer: &ps,
        };
        self.audit.audit_step(&view).await
    }

    /// Audit counters so far.
    pub fn audit_stats(&self) -> &super::audit::AuditStats {
        &self.audit.stats
    }

    fn grad_dec(&self) -> Decoder {
        Decoder::new()
    }

    /// Starts an attempt of micro-batch `mb`: plan, embedding forward, Forward to stage 0.
    async fn dispatch(
        &mut self,
        step: u64,
        epoch: u32,
        mb: usize,
        book: &mut StepBook,
    ) -> Result<InFlight> {
        let cfg = self.cfg().clone();
        let stages = self.num_stages();
        let req = router::PlanRequest {
            workload: *self.view.workload(),
            client: default_link(),
        };
        let plan = router::plan(
            &self.view,
            &req,
            now_ms(),
            &router::PlanConfig::default(),
            &mut self.rng,
        )?;
        let mut route = Vec::with_capacity(stages);
        for hop in &plan.hops {
            let peer = PeerId(hop.peer.0);
            let addr = self
                .shared
                .reg(|r| r.stages[hop.stage as usize].get(&peer).map(|x| x.addr))
                .ok_or_else(|| {
                    run_err(format!("planned peer {} is not a replica", peer.short()))
                })?;
            route.push(Hop {
                stage: hop.stage as u32,
                peer,
                addr,
            });
        }
        if route.len() != stages {
            return Err(run_err("plan does not cover every stage"));
        }
        self.view.note_dispatched(&plan);
        let peers: Vec<PeerId> = route.iter().map(|h| h.peer).collect();
        let att = book.start_attempt(mb, &peers);
        let key = MbKey {
            step,
            mb: mb as u32,
            attempt: att.attempt,
        };
        let batch = self.corpus.train_batch(
            cfg.seed,
            step,
            mb as u64,
            cfg.train.micro_batch_size,
            cfg.train.seq_len,
        )?;
        let ends = self.ends.clone();
        let codec = self.act_codec;
        let inputs = batch.inputs.clone();
        let (bsz, seq) = (batch.batch_size, batch.seq_len);
        let (ctx, frame, dense) = tokio::task::spawn_blocking(move || -> Result<_> {
            let e = ends.lock().unwrap_or_else(|e| e.into_inner());
            let (x, ctx) = e.embed_forward(&inputs, bsz, seq)?;
            drop(e);
            let (frame, dense) = encode_tensor(&codec, &x)?;
            Ok((ctx, frame, dense))
        })
        .await
        .map_err(|e| run_err(e.to_string()))??;
        // Our frame crosses the network whatever happens to the attempt: count it now.
        let sent_act = Traffic {
            wire: frame.len() as u64,
            dense,
        };
        self.metrics
            .wire
            .channel_mut(Channel::Activations)
            .add(sent_act.wire, sent_act.dense);
        self.audit.sent_forward(key, &route, &frame);
        let msg = Forward {
            run: self.shared.run,
            epoch,
            key,
            route: route.clone(),
            hop: 0,
            trainer: self.shared.endpoint,
            accumulate: att.stage_mask,
            upstream: Traffic::default(),
            activations: frame,
            receipt: None,
        };
        self.send::<Forward>(route[0].addr, route[0].peer, key, msg);
        let timeout = self.opts.attempt_timeout.max(Duration::from_secs_f64(
            (4.0 * plan.expected_s).min(3600.0_f64),
        ));
        Ok(InFlight {
            key,
            route,
            plan,
            embed_ctx: att.embedding.then_some(ctx),
            targets: batch.targets,
            embedding: att.embedding,
            head: att.head,
            deadline: Instant::now() + timeout,
            returned: false,
            sent_act,
            sent_grad: None,
            reported: false,
        })
    }

    /// Sends a pipeline message in the background; a failure comes back as `SendFailed`.
    fn send<M: wire::WireMessage + Send + Sync + 'static>(
        &self,
        addr: SocketAddr,
        peer: PeerId,
        key: MbKey,
        msg: M,
    ) {
        let ps = self.peer.shared().clone();
        let tx = self.shared.inbox.clone();
        tokio::spawn(async move {
            if let Err(e) = ps
                .call::<M, Ack>(addr, Some(peer), &msg)
                .await
                .map_err(Error::from)
            {
                let busy = matches!(&e, Error::Remote(r) if r.code == code::BUSY);
                tracing::debug!(peer = %peer.short(), error = %e, busy, "pipeline send failed");
                let _ = tx.send(Inbound::SendFailed { key, peer, busy });
            }
        });
    }

    /// The last stage's output: loss, head backward, gradient to the last stage.
    async fn on_forward_out(
        &mut self,
        book: &mut StepBook,
        f: &mut InFlight,
        out: &ForwardOut,
    ) -> Result<()> {
        let ends = self.ends.clone();
        let limits = self.limits;
        let frame = out.activations.clone();
        let targets = f.targets.clone();
        let accumulate = f.head;
        let scale = 1.0 / self.cfg().train.micro_batches as f64;
        let codec = self.grad_codec;
        let (bsz, seq, hidden) = (
            self.cfg().train.micro_batch_size,
            self.cfg().train.seq_len,
            self.cfg().model.hidden_size,
        );
        let (loss, grad, dense) = tokio::task::spawn_blocking(move || -> Result<_> {
            let x = decode_tensor(&frame, &limits, &[bsz, seq, hidden])?;
            let mut e = ends.lock().unwrap_or_else(|e| e.into_inner());
            let (loss, ctx) = e.head_forward(&x, &targets)?;
            let grad = if accumulate {
                e.head_backward(ctx, scale)?
            } else {
                // The head already counted this micro-batch: compute the input gradient only.
                let saved = e.grads_flat()?;
                let g = e.head_backward(ctx, scale)?;
                e.set_grads_flat(&saved)?;
                g
            };
            drop(e);
            let (frame, dense) = encode_tensor(&codec, &grad)?;
            Ok((loss, frame, dense))
        })
        .await
        .map_err(|e| run_err(e.to_string()))??;
        // The rest of the forward pass (every hop's frame but our first, counted when sent) and
        // the gradient we send now; the rest of the backward pass comes with BackwardOut.
        self.metrics.wire.channel_mut(Channel::Activations).add(
            (out.upstream.wire + out.activations.len() as u64).saturating_sub(f.sent_act.wire),
            (out.upstream.dense + dense).saturating_sub(f.sent_act.dense),
        );
        let sent_grad = Traffic {
            wire: grad.len() as u64,
            dense,
        };
        self.metrics
            .wire
            .channel_mut(Channel::Gradients)
            .add(sent_grad.wire, sent_grad.dense);
        f.sent_grad = Some(sent_grad);
        if accumulate {
            book.count(
                f.key.mb as usize,
                f.key.attempt,
                Column::Head,
                Holder::Trainer,
            );
            book.set_loss(f.key.mb as usize, loss);
        }
        self.audit.got_forward(f.key, &out.activations);
        self.audit.sent_backward(f.key, &grad);
        let last = *f.route.last().expect("non-empty route");
        let msg = Backward {
            run: self.shared.run,
            epoch: out.epoch,
            key: f.key,
            stage: last.stage,
            upstream: Traffic::default(),
            grad,
            receipt: None,
        };
        self.send::<Backward>(last.addr, last.peer, f.key, msg);
        Ok(())
    }

    /// Gives up on an attempt: health report, Abandon to its route, load released.
    fn fail_attempt(&mut self, f: InFlight, who: Option<PeerId>, busy: bool) {
        let now = now_ms();
        let health = router::HealthConfig::default();
        match who {
            Some(p) if !busy => {
                let _ = self
                    .view
                    .report(&key_of(&p), router::Outcome::Failure, now, &health);
            }
            Some(_) => {}
            None => {
                // A deadline: we do not know which hop stalled; suspect them all mildly.
                for h in &f.route {
                    let _ =
                        self.view
                            .report(&key_of(&h.peer), router::Outcome::Timeout, now, &health);
                }
            }
        }
        tracing::info!(mb = f.key.mb, attempt = f.key.attempt, who = ?who.map(|p| p.short()), busy, "micro-batch attempt failed; retrying");
        self.release(&f);
    }

    /// Releases an attempt's router load and asks its route to drop the contexts.
    fn release(&mut self, f: &InFlight) {
        for hop in &f.plan.hops {
            self.view.add_load(&hop.peer, -1);
        }
        if f.returned {
            return;
        }
        let epoch = self.shared.reg(|r| r.epoch);
        // The pass no message told us about (a deadline, a dead hop): its hops report the frames
        // they sent in it with their next SyncDone.
        let uncounted = match (f.reported, f.sent_grad) {
            (true, _) => 0,
            (false, None) => Abandon::FORWARD,
            (false, Some(_)) => Abandon::BACKWARD,
        };
        for h in &f.route {
            let ps = self.peer.shared().clone();
            let msg = Abandon {
                run: self.shared.run,
                epoch,
                key: f.key,
                uncounted,
            };
            let (addr, peer) = (h.addr, h.peer);
            tokio::spawn(async move {
                let _ = ps.call::<Abandon, Ack>(addr, Some(peer), &msg).await;
            });
        }
    }

    /// Starts the sync of `stages` and waits for every participant's report.
    async fn sync_stages(
        &mut self,
        step: u64,
        epoch: u32,
        book: &StepBook,
        stages: &[usize],
        rounds: &[u32],
        on_event: &mut dyn FnMut(&TrainerEvent),
    ) -> Result<SyncOutcome> {
        let mut out = SyncOutcome::default();
        // participants per stage, in a fixed order (by peer id).
        let mut waiting: HashMap<(usize, PeerId), ()> = HashMap::new();
        let mut parts_of: HashMap<usize, Vec<PeerId>> = HashMap::new();
        for &k in stages {
            let replicas: Vec<(PeerId, SocketAddr)> = self.shared.reg(|r| {
                r.stages[k]
                    .iter()
                    .filter(|(_, rep)| rep.state != ReplicaState::Joining)
                    .map(|(p, rep)| (*p, rep.addr))
                    .collect()
            });
            let counts = book.stage_counts(k as u16);
            let parts: Vec<(PeerId, SocketAddr)> = replicas
                .iter()
                .filter(|(p, _)| !book.is_excluded(p))
                .copied()
                .collect();
            if parts.is_empty() {
                return Err(run_err(format!("stage {k} has no replica left to sync")));
            }
            let counted: u32 = parts
                .iter()
                .map(|(p, _)| counts.get(p).copied().unwrap_or(0))
                .sum();
            if counted as usize != book.micro_batches() {
                return Err(run_err(format!(
                    "stage {k}: participants counted {counted} micro-batches of {}",
                    book.micro_batches()
                )));
            }
            let msg = SyncStart {
                run: self.shared.run,
                epoch,
                step,
                stage: k as u32,
                round: rounds[k],
                participants: parts.iter().map(|(p, _)| *p).collect(),
                mb_counts: parts
                    .iter()
                    .map(|(p, _)| counts.get(p).copied().unwrap_or(0))
                    .collect(),
                addrs: parts.iter().map(|(_, a)| *a).collect(),
            };
            for (p, addr) in &replicas {
                let ps = self.peer.shared().clone();
                let tx = self.shared.inbox.clone();
                let (p, addr, msg) = (*p, *addr, msg.clone());
                tokio::spawn(async move {
                    if let Err(e) = ps.call::<SyncStart, Ack>(addr, Some(p), &msg).await {
                        tracing::warn!(peer = %p.short(), error = %e, "SyncStart failed");
                        let _ = tx.send(Inbound::Down(p));
                    }
                });
            }
            for (p, _) in &parts {
                waiting.insert((k, *p), ());
            }
            parts_of.insert(k, parts.iter().map(|(p, _)| *p).collect());
        }
        let mut reports: HashMap<usize, Vec<(PeerId, f64, [u8; 32])>> = HashMap::new();
        let deadline = Instant::now() + self.opts.sync_timeout;
        while !waiting.is_empty() {
            let now = Instant::now();
            if now >= deadline {
                for (k, p) in waiting.keys() {
                    tracing::warn!(peer = %p.short(), stage = k, "no sync report in time");
                    out.broken.insert(*k);
                    if !out.failed_peers.contains(p) {
                        out.failed_peers.push(*p);
                    }
                }
                break;
            }
            let Ok(msg) = tokio::time::timeout(deadline - now, self.inbox.recv()).await else {
                continue;
            };
            match msg {
                Some(Inbound::SyncDone(from, d)) => {
                    let k = d.stage as usize;
                    self.count_sync_report(&d);
                    if d.step == step && waiting.remove(&(k, from)).is_some() {
                        reports
                            .entry(k)
                            .or_default()
                            .push((from, d.grad_sq_norm, d.grad_digest));
                    }
                }
                Some(Inbound::Down(p)) => {
                    let mut participant = false;
                    for (&k, parts) in &parts_of {
                        if !parts.contains(&p) {
                            continue;
                        }
                        participant = true;
                        waiting.remove(&(k, p));
                        // Survivors that have not reported never got (and never will get) its
                        // share: they are stuck in this round, so the stage's sync is redone.
                        // Those that reported summed every share, the dead one's included.
                        let stuck: Vec<PeerId> = parts
                            .iter()
                            .filter(|q| waiting.contains_key(&(k, **q)))
                            .copied()
                            .collect();
                        if !stuck.is_empty() {
                            tracing::warn!(peer = %p.short(), stage = k, stuck = stuck.len(), "participant lost during the sync; the stage's sync restarts");
                            out.broken.insert(k);
                            for q in stuck {
                                waiting.remove(&(k, q));
                            }
                        }
                    }
                    if participant {
                        if !out.failed_peers.contains(&p) {
                            out.failed_peers.push(p);
                        }
                    } else {
                        self.lose_peer(p, None, on_event);
                    }
                }
                Some(Inbound::Leave(p)) => {
                    // Asked to leave during the sync: it still takes part; it is released at
                    // the step boundary.
                    self.retire_from_view(p);
                }
                Some(Inbound::Ready(from, r)) => self.on_ready(from, r, on_event),
                Some(other) => tracing::debug!(?other, "pipeline message during sync ignored"),
                None => return Err(run_err("trainer inbox closed")),
            }
        }
        for &k in stages {
            if out.broken.contains(&k) {
                continue;
            }
            let reps = reports.remove(&k).unwrap_or_default();
            let Some(first) = reps.first() else { continue };
            // Replicas must agree bitwise; the majority wins and the rest re-sync after Apply.
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
                out.norm_mismatches += disagree as u64;
            }
            out.done.push((k, f64::from_bits(best.0), reps.len()));
        }
        Ok(out)
    }

    /// Sends Apply to every participant, compares digests, reloads the odd ones out. Returns the
    /// number of replicas whose digest disagreed.
    async fn apply_all(
        &mut self,
        step: u64,
        epoch: u32,
        book: &StepBook,
        lr: f64,
        clip: f64,
        on_event: &mut dyn FnMut(&TrainerEvent),
    ) -> Result<u64> {
        let mut calls = Vec::new();
        let mut idle = Vec::new();
        for k in 0..self.num_stages() {
            let replicas: Vec<(PeerId, SocketAddr)> = self.shared.reg(|r| {
                r.stages[k]
                    .iter()
                    .filter(|(_, rep)| rep.state != ReplicaState::Joining)
                    .map(|(p, rep)| (*p, rep.addr))
                    .collect()
            });
            for (p, addr) in replicas {
                if book.is_excluded(&p) {
                    idle.push((k, p, addr));
                    continue;
                }
                let ps = self.peer.shared().clone();
                let msg = Apply {
                    run: self.shared.run,
                    epoch,
                    step,
                    stage: k as u32,
                    lr,
                    clip_scale: clip,
                };
                let timeout = self.opts.sync_timeout;
                calls.push(async move {
                    let r = tokio::time::timeout(
                        timeout,
                        ps.call::<Apply, Applied>(addr, Some(p), &msg),
                    )
                    .await;
                    (k, p, addr, r)
                });
            }
        }
        let results = futures::future::join_all(calls).await;
        let mut digests: Vec<Vec<(PeerId, SocketAddr, [u8; 32])>> =
            vec![Vec::new(); self.num_stages()];
        for (k, p, addr, r) in results {
            match r {
                Ok(Ok((_, a))) if a.step == step + 1 || a.step == step => {
                    digests[k].push((p, addr, a.digest))
                }
                Ok(Ok((_, a))) => {
                    tracing::warn!(peer = %p.short(), got = a.step, "Applied reports another step");
                    digests[k].push((p, addr, a.digest));
                }
                Ok(Err(e)) => {
                    tracing::warn!(peer = %p.short(), error = %e, "Apply failed");
                    self.lose_peer(p, None, on_event);
                }
                Err(_) => {
                    tracing::warn!(peer = %p.short(), "Apply timed out");
                    self.lose_peer(p, None, on_event);
                }
            }
        }
        let mut mismatches = 0u64;
        for (k, ds) in digests.iter().enumerate() {
            let mut tally: HashMap<[u8; 32], usize> = HashMap::new();
            for (_, _, d) in ds {
                *tally.entry(*d).or_default() += 1;
            }
            let Some(best) = tally
                .iter()
                .max_by_key(|(d, c)| (**c, std::cmp::Reverse(**d)))
                .map(|(d, _)| *d)
            else {
                continue;
            };
            self.shared.reg(|r| r.digests[k] = Some(best));
            for (p, addr, d) in ds {
                if *d != best {
                    mismatches += 1;
                    tracing::warn!(peer = %p.short(), stage = k, "replica digest differs; re-syncing it");
                    self.mark_joining(*p, k);
                    self.send_reload(*p, *addr, k as u32, step + 1);
                }
            }
        }
        for (k, p, addr) in idle {
            // Excluded this step (suspected but alive): it skipped the sync, so it loads the new
            // state from a replica that applied it.
            self.mark_joining(p, k);
            self.send_reload(p, addr, k as u32, step + 1);
        }
        Ok(mismatches)
    }

    /// Reloads every live replica of stage `k` with its own state at `step` (drops contexts,
    /// accumulators and any sync in progress); replicas that fail are lost.
    async fn reset_stage(&mut self, k: usize, step: u64) {
        let (epoch, reps, digest) = self.shared.reg(|r| {
            let reps: Vec<(PeerId, SocketAddr)> = r.stages[k]
                .iter()
                .filter(|(_, rep)| rep.state != ReplicaState::Joining)
                .map(|(p, rep)| (*p, rep.addr))
                .collect();
            (r.epoch, reps, r.digests[k])
        });
        let fresh = self.shared.reg(|r| r.fresh);
        let calls = reps.iter().map(|&(p, addr)| {
            let ps = self.peer.shared().clone();
            let source = match digest {
                Some(d) if !fresh => StateSource::Fetch {
                    from: vec![Endpoint { peer: p, addr }],
                    digest: d,
                },
                _ => StateSource::Init,
            };
            let msg = Reload {
                run: self.shared.run,
                epoch,
                stage: k as u32,
                step,
                source,
            };
            let timeout = self.opts.sync_timeout;
            async move {
                let r =
                    tokio::time::timeout(timeout, ps.call::<Reload, Applied>(addr, Some(p), &msg))
                        .await;
                (p, matches!(r, Ok(Ok(_))))
            }
        });
        for (p, ok) in futures::future::join_all(calls).await {
            if !ok {
                tracing::warn!(peer = %p.short(), stage = k, "reset after a failed sync did not work");
                self.lose_peer(p, None, &mut |_| {});
            }
        }
    }

    /// Pings every replica of `stages` (bounded wait); returns the ones that did not answer.
    async fn probe_replicas(&self, stages: &[usize]) -> Vec<PeerId> {
        let peers: Vec<(PeerId, SocketAddr)> = self.shared.reg(|r| {
            stages
                .iter()
                .flat_map(|&k| r.stages[k].iter())
                .filter(|(_, rep)| rep.state != ReplicaState::Joining)
                .map(|(p, rep)| (*p, rep.addr))
                .collect()
        });
        let ps = self.peer.shared().clone();
        let probes = peers.into_iter().map(|(p, addr)| {
            let ps = ps.clone();
            async move {
                let ok = tokio::time::timeout(
                    PROBE_TIMEOUT,
                    ps.call::<Ping, Pong>(addr, Some(p), &Ping { nonce: 0 }),
                )
                .await
                .is_ok_and(|r| r.is_ok());
                (p, ok)
            }
        });
        futures::future::join_all(probes)
            .await
            .into_iter()
            .filter(|(_, ok)| !ok)
            .map(|(p, _)| p)
            .collect()
    }

    /// Flags a restore when stage `k` has no replica left and nobody holds its current state.
    /// Fetches stage `k`'s state at `step` from `sources` (in order), verified against `digest`
    /// (the one state-transfer implementation the replicas use too). Counts the bytes taken.
    async fn fetch_stage_state(
        &mut self,
        epoch: u32,
        k: usize,
        step: u64,
        sources: &[(PeerId, SocketAddr)],
        digest: [u8; 32],
    ) -> std::result::Result<Fetched, FetchFailed> {
        let req = StateRequest {
            run: self.shared.run,
            epoch,
            stage: k as u32,
            step,
            chunk_bytes: 4 << 20,
        };
        let cfg = self.cfg().clone();
        let got = fetch_verified(self.peer.shared(), &cfg, &req, &endpoints(sources), digest).await;
        if let Ok(f) = &got {
            let n = f.bytes.len() as u64;
            self.metrics.wire.channel_mut(Channel::State).add(n, n);
        }
        got
    }

    /// Bans every replica that served a state failing verification: its bytes (over its own
    /// authenticated connection) are not the state its stage agreed on at this boundary.
    fn blame_bad_states(
        &mut self,
        bad: &[BadState],
        step: u64,
        on_event: &mut dyn FnMut(&TrainerEvent),
    ) {
        for b in bad {
            let stage = self.stage_of(&b.peer).unwrap_or(u32::MAX);
            let ban = self.audit.ban_proven(
                b.peer,
                step,
                stage,
                format!(
                    "served a state that is not its stage's agreed one: {}",
                    b.reason
                ),
                b.evidence,
            );
            self.shared.reg(|r| r.banned.insert(ban.peer));
            self.metrics.bad_states += 1;
            self.lose_peer(ban.peer, None, on_event);
        }
    }

    fn check_stage_state(&mut self, k: usize) {
        // Joiners do not count: they load from a holder, and there is none.
        let orphaned = self.shared.reg(|r| {
            !r.stages[k]
                .values()
                .any(|rep| rep.state != ReplicaState::Joining)
                && r.served.get(&(k as u32)).is_none_or(|s| s.step != r.step)
        });
        if orphaned && !self.restore_pending {
            tracing::warn!(stage = k, "the stage lost its last replica and its state");
            self.restore_pending = true;
        }
    }

    /// Gives up the current step (a stage's state is gone): attempts released, nothing applied.
    fn abandon_step(&mut self, inflight: &mut HashMap<usize, InFlight>) -> Option<StepReport> {
        for (_, f) in inflight.drain() {
            self.release(&f);
        }
        self.shared.reg(|r| r.in_step = false);
        None
    }

    /// Restores EVERY stage and the ends from the latest checkpoint in `out` (or, without one,
    /// from the seed at step 0) in a new epoch: the trainer serves the checkpoint's stage states,
    /// every remaining replica reloads, and the steps since the checkpoint run again. Data
    /// batches are a function of (seed, step, micro-batch), so the run continues on the same
    /// trajectory; lost are the compute since the checkpoint and, with lossy sync codecs, the
    /// error-feedback residuals (they restart at zero).
    async fn restore(&mut self, on_event: &mut dyn FnMut(&TrainerEvent)) -> Result<()> {
        self.restore_pending = false;
        let cfg = self.cfg().clone();
        let device = Device::Cpu;
        let ckpt = match &self.opts.out {
            Some(dir) if checkpoint::exists(dir) => {
                let dir = dir.clone();
                let cfg = cfg.clone();
                Some(
                    tokio::task::spawn_blocking(move || {
                        checkpoint::restore(&dir, &cfg, &Device::Cpu)
                    })
                    .await
                    .map_err(|e| run_err(e.to_string()))??,
                )
            }
            _ => None,
        };
        if let Some(c) = &ckpt
            && c.run != self.shared.run
        {
            return Err(run_err(
                "the checkpoint in the output folder is of another run",
            ));
        }
        let mut ends = Shard::new(&cfg.model, &ends_pieces(), cfg.seed, DType::F32, &device)?;
        let num_stages = self.num_stages();
        let mut served = HashMap::new();
        let mut digests = vec![None; num_stages];
        let step = match ckpt {
            Some(c) => {
                ends.import_state(&c.ends_state)?;
                for (k, st) in c.stages.into_iter().enumerate() {
                    digests[k] = Some(st.digest);
                    served.insert(
                        k as u32,
                        ServedState {
                            step: c.step,
                            hash: *blake3::hash(&st.bytes).as_bytes(),
                            bytes: st.bytes,
                            digest: st.digest,
                        },
                    );
                }
                c.step
            }
            None => 0,
        };
        *self.ends.lock().unwrap_or_else(|e| e.into_inner()) = ends;
        let from_checkpoint = !served.is_empty();
        let (epoch, replicas) = self.shared.reg(|r| {
            r.epoch += 1;
            r.step = step;
            r.in_step = false;
            r.phase = RunPhase::Paused;
            r.fresh = !from_checkpoint;
            r.served = served;
            r.digests = digests;
            let mut reps = Vec::new();
            for (k, st) in r.stages.iter_mut().enumerate() {
                for (p, rep) in st.iter_mut() {
                    rep.state = ReplicaState::Joining;
                    reps.push((k, *p, rep.addr));
                }
            }
            (r.epoch, reps)
        });
        self.shared.boundary.send_replace(step);
        // Messages of the old epoch still queued are void (Down/Leave still matter).
        while let Ok(msg) = self.inbox.try_recv() {
            match msg {
                Inbound::Down(p) => {
                    self.lose_peer(p, None, on_event);
                }
                Inbound::Leave(p) => {
                    self.shared.reg(|r| {
                        r.stages.iter_mut().for_each(|s| {
                            s.remove(&p);
                        })
                    });
                    self.metrics.peers_left += 1;
                }
                Inbound::SyncDone(_, d) => self.count_sync_report(&d),
                _ => {}
            }
        }
        self.restore_pending = false;
        for (k, p, _) in &replicas {
            let _ = self.view.remove(&key_of(p));
            let _ = k;
        }
        for (k, p, addr) in replicas {
            self.send_reload(p, addr, k as u32, step);
        }
        self.metrics.steps.retain(|s| s.step < step);
        self.metrics.restores += 1;
        tracing::warn!(step, epoch, from_checkpoint, "run restored");
        self.emit(
            TrainerEvent::Restored {
                step,
                epoch,
                from_checkpoint,
            },
            on_event,
        );
        Ok(())
    }

    /// Takes a leaving replica out of routing, unless it is the last routable one of its stage
    /// (then it serves until the boundary, where its state is handed to the trainer).
    fn retire_from_view(&mut self, p: PeerId) {
        let others = self.shared.reg(|r| {
            r.stages.iter().find(|s| s.contains_key(&p)).map(|s| {
                s.iter()
                    .filter(|(q, rep)| **q != p && rep.state == ReplicaState::Serving)
                    .count()
            })
        });
        if others.is_some_and(|n| n > 0) {
            let _ = self.view.remove(&key_of(&p));
        }
    }

    /// At a step boundary: releases every replica that asked to leave. The last replica of a
    /// stage hands its state to the trainer first (fetched and verified), so the next peer to take
    /// the stage loads it from the trainer and nothing is lost.
    async fn release_leavers(&mut self, on_event: &mut dyn FnMut(&TrainerEvent)) {
        let (epoch, step, leaving) = self.shared.reg(|r| {
            let leaving: Vec<(usize, PeerId, SocketAddr, bool)> = r
                .stages
                .iter()
                .enumerate()
                .flat_map(|(k, s)| {
                    s.iter()
                        .filter(|(_, rep)| rep.state == ReplicaState::Leaving)
                        .map(move |(p, rep)| {
                            let last = !s.values().any(|o| o.state == ReplicaState::Serving);
                            (k, *p, rep.addr, last)
                        })
                })
                .collect();
            (r.epoch, r.step, leaving)
        });
        let mut handed: HashSet<usize> = HashSet::new();
        for (k, p, addr, last) in leaving {
            let mut handed_off = false;
            if last
                && !handed.contains(&k)
                && !self.shared.reg(|r| r.served.contains_key(&(k as u32)))
            {
                // Verified against the stage's agreed digest like any state the trainer takes:
                // a leaver cannot hand the next replica (or a checkpoint) altered weights.
                let digest = self.shared.reg(|r| r.digests[k]);
                let fetched = match digest {
                    Some(digest) => {
                        tokio::time::timeout(
                            self.opts.sync_timeout,
                            self.fetch_stage_state(epoch, k, step, &[(p, addr)], digest),
                        )
                        .await
                    }
                    None => Ok(Err(FetchFailed {
                        error: run_err(format!("stage {k} has no agreed digest")),
                        bad: Vec::new(),
                    })),
                };
                match fetched {
                    Ok(Ok(got)) => {
                        let bytes = got.bytes;
                        let hash = *blake3::hash(&bytes).as_bytes();
                        let digest = digest.unwrap_or_default();
                        self.shared.reg(|r| {
                            r.served.insert(
                                k as u32,
                                ServedState {
                                    step,
                                    bytes,
                                    hash,
                                    digest,
                                },
                            )
                        });
                        handed.insert(k);
                        handed_off = true;
                    }
                    Ok(Err(f)) => {
                        self.blame_bad_states(&f.bad, step, on_event);
                        tracing::warn!(peer = %p.short(), stage = k, error = %f.error, "leaving replica's state could not be fetched")
                    }
                    Err(_) => {
                        tracing::warn!(peer = %p.short(), stage = k, "leaving replica's state fetch timed out")
                    }
                }
            }
            self.shared.reg(|r| r.stages[k].remove(&p));
            let _ = self.view.remove(&key_of(&p));
            self.check_stage_state(k);
            self.metrics.peers_left += 1;
            tracing::info!(peer = %p.short(), stage = k, handed_off, "replica left");
            self.emit(
                TrainerEvent::Left {
                    peer: p,
                    stage: k as u32,
                    handed_off,
                },
                on_event,
            );
        }
    }

    fn mark_joining(&mut self, p: PeerId, k: usize) {
        self.shared.reg(|r| {
            if let Some(rep) = r.stages[k].get_mut(&p) {
                rep.state = ReplicaState::Joining;
            }
        });
        let _ = self.view.remove(&key_of(&p));
    }

    /// Fetches every stage's state from a replica and writes the whole model to `dir`. Each state
    /// is verified against its stage's agreed digest; a replica serving another state is banned
    /// and the state is taken from the next replica.
    async fn save_checkpoint(
        &mut self,
        dir: &std::path::Path,
        on_event: &mut dyn FnMut(&TrainerEvent),
    ) -> Result<()> {
        let (epoch, step) = self.shared.reg(|r| (r.epoch, r.step));
        let mut stage_states = Vec::new();
        for k in 0..self.num_stages() {
            let digest = self
                .shared
                .reg(|r| r.digests[k])
                .ok_or_else(|| run_err(format!("stage {k} has no agreed digest")))?;
            let sources = self.serving(k);
            if sources.is_empty() {
                return Err(run_err(format!(
                    "stage {k} has no replica to checkpoint from"
                )));
            }
            let got = self
                .fetch_stage_state(epoch, k, step, &sources, digest)
                .await;
            let bad = match &got {
                Ok(f) => &f.bad,
                Err(f) => &f.bad,
            };
            self.blame_bad_states(&bad.clone(), step, on_event);
            stage_states.push(got?.bytes);
        }
        let ends_state = {
            let e = self.ends.lock().unwrap_or_else(|e| e.into_inner());
            e.export_state()?
        };
        let cfg = self.cfg().clone();
        let dir = dir.to_path_buf();
        let run = self.shared.run;
        let head = self.audit.ledger_head();
        tokio::task::spawn_blocking(move || {
            checkpoint::save_with_ledger(
                &dir,
                &cfg,
                run,
                epoch,
                step,
                &ends_state,
                &stage_states,
                head,
            )
        })
        .await
        .map_err(|e| run_err(e.to_string()))??;
        Ok(())
    }
}

#[derive(Default)]
struct SyncOutcome {
    /// (stage, agreed grad_sq_norm, participants)
    done: Vec<(usize, f64, usize)>,
    failed_peers: Vec<PeerId>,
    /// Stages whose sync must be redone (a participant was lost before every survivor summed).
    broken: HashSet<usize>,
    norm_mismatches: u64,
}

/// Embedding backward for a returned attempt (accumulating if the embedding has not counted).
async fn on_backward_out(
    ends: &Arc<Mutex<Shard>>,
    dec: &mut Decoder,
    limits: &Limits,
    f: &mut InFlight,
    out: &BackwardOut,
    metrics: &mut Metrics,
) -> Result<()> {
    let _ = dec;
    let info = swarm_compression::frame::FrameInfo::read(&out.grad, limits)?;
    // The backward pass: every earlier hop and this frame, but our own Backward's frame (in
    // `upstream` too), counted when sent.
    let ours = f.sent_grad.unwrap_or_default();
    metrics.wire.channel_mut(Channel::Gradients).add(
        (out.upstream.wire + out.grad.len() as u64).saturating_sub(ours.wire),
        (out.upstream.dense + info.elements as u64 * 4).saturating_sub(ours.dense),
    );
    if !f.embedding {
        return Ok(());
    }
    let Some(ctx) = f.embed_ctx.take() else {
        return Err(run_err("embedding context already used"));
    };
    let ends = ends.clone();
    let frame = out.grad.clone();
    let limits = *limits;
    let shape = {
        let e = ends.lock().unwrap_or_else(|e| e.into_inner());
        let _ = &e;
        info.shape().to_vec()
    };
    tokio::task::spawn_blocking(move || -> Result<()> {
        let g = decode_tensor(&frame, &limits, &shape)?;
        let mut e = ends.lock().unwrap_or_else(|e| e.into_inner());
        e.backward(ctx, &g)?;
        Ok(())
    })
    .await
    .map_err(|e| run_err(e.to_string()))?
}

/// Encodes a tensor as one frame; returns the frame and its fp32 size.
fn encode_tensor(codec: &Codec, x: &Tensor) -> Result<(Vec<u8>, u64)> {
    let shape = x.dims().to_vec();
    let data = x
        .flatten_all()
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(swarm_model::Error::from)?;
    let mut enc = Encoder::new(*codec)?;
    let mut frame = Vec::new();
    enc.encode(&data, &shape, &mut frame)?;
    Ok((frame, data.len() as u64 * 4))
}

/// Decodes a frame that must have shape `shape` into an f32 tensor.
fn decode_tensor(frame: &[u8], limits: &Limits, shape: &[usize]) -> Result<Tensor> {
    let mut out = Vec::new();
    let info = Decoder::new().decode(frame, limits, &mut out)?;
    if info.shape() != shape {
        return Err(run_err(format!(
            "tensor of shape {:?}, expected {shape:?}",
            info.shape()
        )));
    }
    Tensor::from_vec(out, shape, &Device::Cpu).map_err(|e| swarm_model::Error::from(e).into())
}

fn now_ms() -> u64 {
    crate::peer::unix_now()
}

fn state_source(shared: &Shared, stage: u32, except: Option<PeerId>) -> StateSource {
    shared.reg(|r| {
        if let Some(s) = r.served.get(&stage)
            && s.step == r.step
        {
            return StateSource::Fetch {
                from: vec![shared.endpoint],
                digest: s.digest,
            };
        }
        if r.fresh && !r.in_step {
            return StateSource::Init;
        }
        let from: Vec<Endpoint> = r.stages[stage as usize]
            .iter()
            .filter(|(p, rep)| rep.state == ReplicaState::Serving && Some(**p) != except)
            .map(|(p, rep)| Endpoint {
                peer: *p,
                addr: rep.addr,
            })
            .collect();
        match r.digests[stage as usize] {
            Some(digest) if !from.is_empty() => StateSource::Fetch { from, digest },
            _ if r.fresh => StateSource::Init,
            _ => StateSource::Fetch {
                from,
                digest: [0; 32],
            },
        }
    })
}

/// Pings every replica each second; two misses in a row report it down.
async fn ping_loop(shared: Arc<Shared>, ps: Arc<PeerShared>) {
    let mut misses: HashMap<PeerId, u32> = HashMap::new();
    let mut reported: HashSet<PeerId> = HashSet::new();
    let mut nonce = 0u64;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let peers: Vec<(PeerId, SocketAddr)> = shared.reg(|r| {
            r.stages
                .iter()
                .flat_map(|s| s.iter().map(|(p, rep)| (*p, rep.addr)))
                .collect()
        });
        reported.retain(|p| peers.iter().any(|(q, _)| q == p));
        let pings = peers.iter().map(|(p, addr)| {
            nonce += 1;
            let ps = ps.clone();
            let (p, addr, n) = (*p, *addr, nonce);
            async move {
                let ok = tokio::time::timeout(
                    Duration::from_secs(3),
                    ps.call::<Ping, Pong>(addr, Some(p), &Ping { nonce: n }),
                )
                .await
                .is_ok_and(|r| r.is_ok());
                (p, ok)
            }
        });
        for (p, ok) in futures::future::join_all(pings).await {
            if ok {
                misses.remove(&p);
            } else {
                let m = misses.entry(p).or_default();
                *m += 1;
                if *m >= 2 && reported.insert(p) {
                    let _ = shared.inbox.send(Inbound::Down(p));
                }
            }
        }
    }
}

/// Longest wait for a replica's answer to the liveness probe before a sync.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Longest an Admit waits for the step boundary (below the joiner's request timeout).
const ADMIT_WAIT: Duration = Duration::from_secs(8);

/// A message to the trainer that names its run and epoch: checked before it is handled.
trait RunScoped: wire::WireMessage + Send + 'static {
    fn run_epoch(&self) -> (RunId, u32);
}

macro_rules! run_scoped {
    ($($ty:ty),*) => {
        $(impl RunScoped for $ty {
            fn run_epoch(&self) -> (RunId, u32) {
                (self.run, self.epoch)
            }
        })*
    };
}
run_scoped!(
    ForwardOut,
    BackwardOut,
    Counted,
    HopFailed,
    SyncDone,
    Ready,
    Admit,
    Leave,
    FetchState
);

/// Registers the trainer's handler of `M`: `handle` gets the message decoded (malformed bytes
/// close the connection) and of this run and epoch (else refused), with the shared state.
fn serve<M, F, Fut>(peer: &Peer, shared: &Arc<Shared>, handle: F)
where
    M: RunScoped,
    F: Fn(Arc<Shared>, RequestCtx, M) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = crate::peer::HandlerResult> + Send + 'static,
{
    let shared = shared.clone();
    peer.register(
        M::KIND,
        move |_p: Arc<PeerShared>, ctx: RequestCtx, body: Vec<u8>| {
            // The handler's future is made here so that it owns what it needs (not `handle`).
            let checked = wire::decode_body::<M>(&body)
                .map_err(RpcError::from)
                .and_then(|msg| {
                    let (run, epoch) = msg.run_epoch();
                    shared.check_run(run, epoch)?;
                    Ok(msg)
                })
                .map(|msg| handle(shared.clone(), ctx, msg));
            async move { checked?.await }
        },
    );
}

/// Registers a handler that only forwards `M` to the driver (as `wrap(sender, message)`).
fn forward_to_driver<M: RunScoped>(
    peer: &Peer,
    shared: &Arc<Shared>,
    wrap: fn(PeerId, M) -> Inbound,
) {
    serve(
        peer,
        shared,
        move |s: Arc<Shared>, ctx: RequestCtx, msg: M| {
            let _ = s.inbox.send(wrap(ctx.from, msg));
            async { rpc::reply(&Ack) }
        },
    );
}

fn register_handlers(peer: &Peer, shared: &Arc<Shared>) {
    peer.register_kinds(&crate::protocol::KINDS)
        .expect("layer kind ranges are disjoint (tested)");
    forward_to_driver(peer, shared, Inbound::ForwardOut);
    forward_to_driver(peer, shared, Inbound::BackwardOut);
    forward_to_driver(peer, shared, Inbound::Counted);
    forward_to_driver(peer, shared, Inbound::HopFailed);
    forward_to_driver(peer, shared, Inbound::SyncDone);
    forward_to_driver(peer, shared, Inbound::Ready);

    let s = shared.clone();
    peer.register(
        kind::RUN_INFO,
        move |_p: Arc<PeerShared>, _ctx: RequestCtx, body: Vec<u8>| {
            let s = s.clone();
            async move {
                wire::decode_body::<RunInfoRequest>(&body).map_err(RpcError::from)?;
                let info = s.reg(|r| RunInfo {
                    run: s.run,
                    epoch: r.epoch,
                    step: r.step,
                    phase: r.phase,
                    config_toml: s.config_toml.clone(),
                    trainer: s.endpoint,
                    replicas: r
                        .stages
                        .iter()
                        .map(|st| st.keys().copied().collect())
                        .collect(),
                });
                rpc::reply(&info)
            }
        },
    );

    serve(
        peer,
        shared,
        |s: Arc<Shared>, ctx: RequestCtx, a: Admit| async move {
            let stages = s.reg(|r| r.stages.len());
            if s.reg(|r| r.banned.contains(&ctx.from)) {
                return Err(RpcError::refused(
                    code::FORBIDDEN,
                    "banned from this run by an audit",
                ));
            }
            if a.stage as usize >= stages {
                return Err(RpcError::refused(
                    code::BAD_REQUEST,
                    format!("stage {} of a {stages}-stage run", a.stage),
                ));
            }
            // Registered as joining at once, so the driver holds the next step boundary until it
            // is ready; answered at a boundary, when replicas hold the state it must load.
            let mut boundary = s.boundary.subscribe();
            s.reg(|r| {
                for st in r.stages.iter_mut() {
                    st.remove(&ctx.from);
                }
                r.stages[a.stage as usize].insert(
                    ctx.from,
                    Replica {
                        addr: a.addr,
                        state: ReplicaState::Joining,
                    },
                );
            });
            let deadline = tokio::time::Instant::now() + ADMIT_WAIT;
            while s.reg(|r| r.in_step) {
                if tokio::time::timeout_at(deadline, boundary.changed())
                    .await
                    .is_err()
                {
                    s.reg(|r| r.stages[a.stage as usize].remove(&ctx.from));
                    return Err(RpcError::refused(
                        code::BUSY,
                        "the current step did not end in time; ask again",
                    ));
                }
            }
            let (epoch, step) = s.reg(|r| (r.epoch, r.step));
            let source = state_source(&s, a.stage, Some(ctx.from));
            tracing::info!(peer = %ctx.from.short(), stage = a.stage, step, "admitted");
            rpc::reply(&AdmitReply {
                run: s.run,
                epoch,
                stage: a.stage,
                step,
                source,
            })
        },
    );

    serve(
        peer,
        shared,
        |s: Arc<Shared>, ctx: RequestCtx, _: Leave| async move {
            let (known, step) = s.reg(|r| {
                let mut known = false;
                for st in r.stages.iter_mut() {
                    if let Some(rep) = st.get_mut(&ctx.from) {
                        rep.state = ReplicaState::Leaving;
                        known = true;
                    }
                }
                (known, r.step)
            });
            if known {
                let _ = s.inbox.send(Inbound::Leave(ctx.from));
            }
            // It stays until released (no longer listed in RunInfo): mid-step it finishes
            // its work and takes part in this step's sync; the driver releases it at the
            // boundary, after taking its state if it was its stage's last replica.
            rpc::reply(&LeaveReply {
                stay_for_step: known.then_some(step),
            })
        },
    );

    serve(
        peer,
        shared,
        |s: Arc<Shared>, _ctx: RequestCtx, f: FetchState| async move {
            s.reg(|r| {
                let Some(st) = r.served.get(&f.stage) else {
                    return Err(RpcError::refused(
                        code::BAD_REQUEST,
                        "the trainer serves no state for this stage",
                    ));
                };
                if st.step != f.step {
                    return Err(RpcError::refused(
                        code::BAD_REQUEST,
                        format!("state at step {}, asked for {}", st.step, f.step),
                    ));
                }
                rpc::reply(&serve_chunk(&f, &st.bytes, st.hash, st.digest)?)
            })
        },
    );
}
