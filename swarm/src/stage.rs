//! The stage worker a peer runs (issue #6): it holds the [`Shard`] of one pipeline stage and serves
//! the training protocol of [`crate::protocol`] for it.
//!
//! - Forward / Backward: every request is checked (run, epoch, stage, hop, the shard's step) and
//!   acknowledged once queued; the compute runs on tokio's blocking pool so the runtime keeps
//!   serving, and the result travels on as a new request to the next hop (or the trainer). A send
//!   that fails is reported to the trainer as `HopFailed`.
//! - The context table holds what backward needs per attempt, keyed by [`MbKey`]; it has a hard
//!   cap (`BUSY` past it), and entries leave on backward, on `Abandon`, and at the step's
//!   `SyncStart`, so memory stays bounded.
//! - Exactly once: a stage accumulates a micro-batch only if the Forward's bitmask says so and it
//!   has not counted that micro-batch in this step already; otherwise it runs
//!   [`Shard::backward_input_only`]. Each accumulation is reported with `Counted`.
//! - Sync: `SyncStart` -> the participant encodes its accumulated gradient with the sync codec and
//!   its error-feedback residual (one stream per (stage, this replica)), sends it as `GradShare`
//!   to the others, decodes *all* shares (its own encoded one too, so every replica sums the same
//!   values) in participant order, sets the sum as the shard's gradients and reports `SyncDone`.
//!   `Apply` -> optimizer step, zero the gradients, reply `Applied` with the weights digest. With a
//!   single participant nothing is exchanged and the gradients are used as they are.
//! - State: `FetchState` is served in chunks from a cached export (BLAKE3 of the whole and the
//!   weights digest in every chunk); [`fetch_state`] downloads and verifies both. `Reload`
//!   replaces the state (re-sync after a digest mismatch, restore after a checkpoint).
//!
//! Wire accounting: [`StageStats`] counts frames sent per channel (wire bytes and fp32 bytes), and
//! every pipeline message carries the upstream [`Traffic`] so the trainer sees all links. What no
//! message carried to the trainer is reported with the next `SyncDone`: the frames of passes it
//! abandoned without a report (it names them in `Abandon`) and the shares of dropped sync rounds
//! that reached their receiver.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use swarm_compression::{Codec, Decoder, Encoder, ErrorFeedback, Limits};
use swarm_model::{AdamW, ForwardCtx, Piece, RunConfig, Shard};

use crate::error::{Error, Result};
use crate::identity::PeerId;
use crate::membership::RunId;
use crate::peer::{Peer, PeerShared, RequestCtx};
use crate::protocol::{
    Abandon, Ack, Admit, AdmitReply, Applied, Apply, Backward, BackwardOut, Counted, Endpoint,
    FetchState, Forward, ForwardOut, GradShare, Hop, HopFailed, MbKey, Ready, Reload, RunInfo,
    RunInfoRequest, StateSource, SyncDone, SyncPhase, SyncStart, Traffic,
};
use crate::receipt::{Pass, Receipt};
use crate::rpc::{self, RpcError, code};
use crate::state_transfer::{StateRequest, fetch_verified, serve_chunk};
use crate::wire::{self, WireMessage, kind};

// Audits (issue #7): receipts, kept frames, recomputation.
mod audit;
mod hook;
mod join;
mod pipeline;
mod state;
mod sync;

pub use join::{Joined, choose_stage, find_trainer, join_run, join_run_within};
pub use state::{fetch_state, load_state};

/// How a stage worker runs. Build with [`StageOptions::new`].
#[derive(Debug, Clone)]
pub struct StageOptions {
    /// The run it serves.
    pub run: RunId,
    /// The run's config (model shape, codecs, batch geometry).
    pub config: RunConfig,
    /// The stage it serves.
    pub stage: u32,
    /// Most forward contexts held at once (in flight between forward and backward).
    pub max_contexts: usize,
    /// Bytes asked per `FetchState` chunk.
    pub chunk_bytes: u32,
    /// Tries per send to a next hop or a sync partner before giving up.
    pub send_tries: u32,
    /// Misbehave on purpose (issue #7 fault injection; tests and demos only).
    #[cfg(feature = "fault")]
    pub fault: Option<crate::fault::FaultSpec>,
}

impl StageOptions {
    /// Defaults: room for every micro-batch of a step twice (retries) plus slack.
    pub fn new(run: RunId, config: RunConfig, stage: u32) -> StageOptions {
        let max_contexts = 2 * config.train.micro_batches + 4;
        StageOptions {
            run,
            config,
            stage,
            max_contexts,
            chunk_bytes: 4 * 1024 * 1024,
            send_tries: 3,
            #[cfg(feature = "fault")]
            fault: None,
        }
    }
}

/// Tensor bytes this worker sent, per channel: frames as sent, and their fp32 size.
#[derive(Debug, Default)]
pub struct StageStats {
    /// Activation frames sent, bytes on the wire.
    pub activations_wire: AtomicU64,
    /// The same activations as fp32.
    pub activations_dense: AtomicU64,
    /// Gradient frames sent, bytes on the wire.
    pub gradients_wire: AtomicU64,
    /// The same gradients as fp32.
    pub gradients_dense: AtomicU64,
    /// Sync shares sent, bytes on the wire.
    pub sync_wire: AtomicU64,
    /// The same shares as fp32.
    pub sync_dense: AtomicU64,
    /// State bytes served through FetchState.
    pub state_served: AtomicU64,
    /// Forward passes served.
    pub forwards: AtomicU64,
    /// Backward passes served.
    pub backwards: AtomicU64,
    /// Requests refused with BUSY (context table full).
    pub busy: AtomicU64,
    /// Pipeline messages refused for a missing or bad sender receipt.
    pub bad_receipts: AtomicU64,
    /// This peer's standing in the trainer's ledger, as the trainer last reported it with an
    /// `Apply` (`credit_reported` false: never reported).
    pub credit_reported: std::sync::atomic::AtomicBool,
    /// Audits of this peer passed, per the ledger.
    pub audits_passed: AtomicU64,
    /// Audits of this peer failed, per the ledger.
    pub audits_failed: AtomicU64,
    /// Micro-batches credited to this peer, per the ledger.
    pub credited_micro_batches: AtomicU64,
    /// Micro-batches served but not credited yet.
    pub pending_micro_batches: AtomicU64,
}

impl StageStats {
    /// The trainer's ledger report, or `None` before the first.
    pub fn credit(&self) -> Option<crate::protocol::CreditReport> {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        self.credit_reported
            .load(Ordering::Relaxed)
            .then(|| crate::protocol::CreditReport {
                audits_passed: r(&self.audits_passed),
                audits_failed: r(&self.audits_failed),
                credited_micro_batches: r(&self.credited_micro_batches),
                pending_micro_batches: r(&self.pending_micro_batches),
            })
    }

    fn set_credit(&self, c: &crate::protocol::CreditReport) {
        let w = |a: &AtomicU64, v| a.store(v, Ordering::Relaxed);
        w(&self.audits_passed, c.audits_passed);
        w(&self.audits_failed, c.audits_failed);
        w(&self.credited_micro_batches, c.credited_micro_batches);
        w(&self.pending_micro_batches, c.pending_micro_batches);
        self.credit_reported.store(true, Ordering::Relaxed);
    }

    /// What this worker has sent so far per channel (activations, gradients, sync), as
    /// [`crate::protocol::Applied`] reports it.
    pub fn sent(&self) -> [crate::protocol::Traffic; 3] {
        let t = |wire: &AtomicU64, dense: &AtomicU64| crate::protocol::Traffic {
            wire: wire.load(Ordering::Relaxed),
            dense: dense.load(Ordering::Relaxed),
        };
        [
            t(&self.activations_wire, &self.activations_dense),
            t(&self.gradients_wire, &self.gradients_dense),
            t(&self.sync_wire, &self.sync_dense),
        ]
    }

    fn add(wire: &AtomicU64, dense: &AtomicU64, frame: usize, elements: usize) {
        wire.fetch_add(frame as u64, Ordering::Relaxed);
        dense.fetch_add(4 * elements as u64, Ordering::Relaxed);
    }
}

/// One held forward context.
struct CtxEntry {
    /// `None` while the forward is computing.
    ctx: Option<ForwardCtx>,
    route: Vec<Hop>,
    trainer: Endpoint,
    accumulate: bool,
}

/// The step-end sync of the current step.
struct Round {
    step: u64,
    /// The trainer's number of this sync of the step (bumped when it redoes the stage's sync).
    round: u32,
    /// `State::generation` when the round started: tasks of an older round (reset meanwhile)
    /// must not touch this one.
    generation: u64,
    participants: Vec<PeerId>,
    me: usize,
    shares: Vec<Option<Vec<u8>>>,
    /// Our own share decoded (by the error feedback, which decodes it as the receivers do):
    /// summed in its place instead of decoding our frame a second time.
    own_decoded: Option<Vec<f32>>,
    trainer: SocketAddr,
    trainer_id: PeerId,
    phase: crate::protocol::SyncPhase,
    summing: bool,
    summed: bool,
    share_bytes: u64,
    share_dense: u64,
    /// Shares of this round that reached their receiver so far (counted if the round is dropped
    /// before it reports: then `share_bytes` never reaches the trainer).
    delivered: Traffic,
}

/// A replica's multi-step sync state (`[sync] mode = "sparseloco"`): between sync boundaries the
/// replica's weights drift from `anchor`, the weights every replica of the stage held at the last
/// boundary.
pub(crate) struct Drift {
    /// The weights at the last sync boundary (set by every state load and every outer step).
    anchor: Vec<f32>,
    /// This replica's error feedback on its pseudo-gradient stream.
    feedback: swarm_compression::outer::SparseFeedback,
    encoder: Encoder,
    /// `[sync] warmup_codec`'s, for the boundaries within the LR warmup.
    warmup_encoder: Encoder,
    warmup_steps: u64,
    /// The residual before the outer round of this state step encoded (restored if the round is
    /// redone or reset, so a share that was never applied is not forgotten).
    backup: Option<(u64, Vec<f32>)>,
    /// The new anchor computed by the outer round (step, round), committed by `Apply`.
    pending: Option<(u64, u32, Vec<f32>)>,
}

impl Drift {
    fn new(cfg: &RunConfig, num_params: usize) -> Result<Drift> {
        let s = &cfg.sync;
        Ok(Drift {
            anchor: Vec::new(),
            feedback: swarm_compression::outer::SparseFeedback::new(num_params, s.chunk, s.beta),
            encoder: Encoder::new(codec(&s.codec)?)?.with_seed(cfg.seed),
            warmup_encoder: Encoder::new(codec(&s.warmup_codec)?)?.with_seed(cfg.seed),
            warmup_steps: cfg.train.warmup_steps,
            backup: None,
            pending: None,
        })
    }

    /// A new state (loaded or built): it is the anchor, and nothing is owed.
    fn reset_to(&mut self, weights: Vec<f32>) {
        self.anchor = weights;
        self.feedback.reset();
        self.backup = None;
        self.pending = None;
    }

    /// Undoes an outer round that was not applied.
    fn undo_round(&mut self) {
        if let Some((_, snap)) = self.backup.take() {
            // Same stream, same length: cannot fail.
            let _ = self.feedback.restore(&snap);
        }
        self.pending = None;
    }
}

/// A cached export served by FetchState.
struct Export {
    epoch: u32,
    step: u64,
    bytes: Arc<Vec<u8>>,
    hash: [u8; 32],
    digest: [u8; 32],
}

struct State {
    epoch: u32,
    contexts: HashMap<MbKey, CtxEntry>,
    /// Micro-batches of `acc_step` whose gradients the shard holds.
    counted: BTreeSet<u32>,
    acc_step: u64,
    round: Option<Round>,
    /// Shares that arrived before their SyncStart: (step, from) -> (round, frame).
    early: HashMap<(u64, PeerId), (u32, Vec<u8>)>,
    /// The state served to `FetchState`, by kind: `[full, weights only]` (audits of drifting
    /// replicas fetch the weights), each of the current step.
    exports: [Option<Arc<Export>>; 2],
    trainer: Option<Endpoint>,
    /// Bumped by every new sync round and every state reset.
    generation: u64,
    /// Shares of dropped rounds (a participant died, the stage's sync was redone) that reached
    /// their receiver: they crossed the network, so the next `SyncDone` reports them.
    dropped_shares: Traffic,
    /// Generations of the last rounds that reported `SyncDone` (their shares are in the report):
    /// a share delivered after its round was applied is not counted again.
    reported: Vec<u64>,
    /// Pipeline frames this replica sent (that reached their receiver) per attempt of the current
    /// steps: an `Abandon` naming passes the trainer has no report of moves them to `abandoned`.
    sent: HashMap<MbKey, SentFrames>,
    /// Frames of abandoned passes not reported yet (activations, gradients): in the next SyncDone.
    abandoned: (Traffic, Traffic),
}

/// Frames one attempt's passes sent from this replica.
#[derive(Default)]
struct SentFrames {
    forward: Traffic,
    backward: Traffic,
    /// Passes the trainer said were uncounted when it abandoned the attempt: frames of theirs
    /// that arrive after the `Abandon` go straight to the report.
    abandoned: u8,
}

/// Most attempts whose frames a replica remembers (a step has a few per micro-batch).
const MAX_SENT_RECORDS: usize = 4096;

impl State {
    /// Ends the current sync round, if any; an unreported one is dropped, its delivered shares
    /// kept for the next report.
    fn end_round(&mut self) {
        if let Some(r) = self.round.take()
            && !r.summed
        {
            self.dropped_shares = add_traffic(self.dropped_shares, r.delivered);
        }
    }

    /// A pipeline frame of attempt `key` reached its receiver.
    fn frame_delivered(&mut self, key: MbKey, backward: bool, t: Traffic) {
        if !self.sent.contains_key(&key) && self.sent.len() >= MAX_SENT_RECORDS {
            return;
        }
        let e = self.sent.entry(key).or_default();
        let (pass, report) = if backward {
            (Abandon::BACKWARD, &mut self.abandoned.1)
        } else {
            (Abandon::FORWARD, &mut self.abandoned.0)
        };
        if e.abandoned & pass != 0 {
            *report = add_traffic(*report, t);
        } else if backward {
            e.backward = add_traffic(e.backward, t);
        } else {
            e.forward = add_traffic(e.forward, t);
        }
    }

    /// The trainer abandoned attempt `key` without a report of the `uncounted` passes.
    fn attempt_abandoned(&mut self, key: MbKey, uncounted: u8) {
        let Some(e) = self.sent.get_mut(&key) else {
            if uncounted != 0 && self.sent.len() < MAX_SENT_RECORDS {
                self.sent.insert(
                    key,
                    SentFrames {
                        abandoned: uncounted,
                        ..Default::default()
                    },
                );
            }
            return;
        };
        e.abandoned |= uncounted;
        if uncounted & Abandon::FORWARD != 0 {
            self.abandoned.0 = add_traffic(self.abandoned.0, std::mem::take(&mut e.forward));
        }
        if uncounted & Abandon::BACKWARD != 0 {
            self.abandoned.1 = add_traffic(self.abandoned.1, std::mem::take(&mut e.backward));
        }
    }

    /// A share of the round of `generation` reached its receiver.
    fn share_delivered(&mut self, generation: u64, t: Traffic) {
        match self.round.as_mut() {
            Some(r) if r.generation == generation => r.delivered = add_traffic(r.delivered, t),
            _ if self.reported.contains(&generation) => {}
            _ => self.dropped_shares = add_traffic(self.dropped_shares, t),
        }
    }
}

fn add_traffic(a: Traffic, b: Traffic) -> Traffic {
    Traffic {
        wire: a.wire.saturating_add(b.wire),
        dense: a.dense.saturating_add(b.dense),
    }
}

/// The stage worker. Cheap to clone (shared state).
#[derive(Clone)]
pub struct StageWorker {
    inner: Arc<Inner>,
}

struct Inner {
    opts: StageOptions,
    me: PeerId,
    peer: Arc<PeerShared>,
    shard: Arc<Mutex<Option<Shard>>>,
    state: Mutex<State>,
    feedback: Arc<Mutex<ErrorFeedback>>,
    /// The multi-step sync's state; `None` in per-step mode.
    drift: Option<Arc<Mutex<Drift>>>,
    adamw: AdamW,
    act_codec: Codec,
    grad_codec: Codec,
    /// Boundary encoders and decoders, kept across passes.
    codecs: Arc<crate::compute::Codecs>,
    /// The sync codec's encoder, kept across steps: its scratch (positions, values, zstd
    /// context) is reused rather than allocated and faulted in at every sync.
    sync_encoder: Arc<Mutex<Encoder>>,
    /// Stage-sized f32 buffers of the sync (our share as decoded, the sum, a decoded share),
    /// reused across steps rather than allocated and faulted in at every sync.
    sync_bufs: Arc<Mutex<Vec<Vec<f32>>>>,
    /// Elements of one boundary tensor: micro_batch_size x seq_len x hidden.
    boundary_elems: usize,
    num_params: usize,
    pieces: Vec<Piece>,
    stats: StageStats,
    fault: hook::Hook,
    audit: Mutex<audit::AuditStore>,
}

impl std::fmt::Debug for StageWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StageWorker(stage {})", self.inner.opts.stage)
    }
}

fn refuse(c: u16, m: impl Into<String>) -> RpcError {
    RpcError::refused(c, m)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn codec(name: &str) -> Result<Codec> {
    Ok(name.parse::<Codec>()?)
}

/// The pieces of stage `stage` of `config`.
pub fn stage_pieces(config: &RunConfig, stage: u32) -> Result<Vec<Piece>> {
    let all = Piece::stages(&config.stages);
    all.get(stage as usize)
        .cloned()
        .map(|p| vec![p])
        .ok_or(Error::NoSuchStage(stage))
}

/// The stage's shard as built from the run seed (step 0).
pub fn init_shard(config: &RunConfig, stage: u32) -> Result<Shard> {
    let pieces = stage_pieces(config, stage)?;
    Ok(Shard::new(
        &config.model,
        &pieces,
        config.seed,
        DType::F32,
        &Device::Cpu,
    )?)
}

/// BLAKE3 of f32 values (little-endian), for comparing summed gradients across replicas.
pub fn f32_digest(v: &[f32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    swarm_model::shard::hash_f32(&mut h, v);
    *h.finalize().as_bytes()
}

impl StageWorker {
    /// A worker for `opts.stage`, holding `shard` if given (else it waits for a state: see
    /// [`StageWorker::install`]). Registers its handlers on `peer`.
    pub fn start(peer: &Peer, opts: StageOptions, shard: Option<Shard>) -> Result<StageWorker> {
        let w = StageWorker::new(peer.shared().clone(), opts, shard)?;
        w.register(peer);
        Ok(w)
    }

    fn new(peer: Arc<PeerShared>, opts: StageOptions, shard: Option<Shard>) -> Result<StageWorker> {
        let cfg = &opts.config;
        let pieces = stage_pieces(cfg, opts.stage)?;
        let num_params: usize = pieces
            .iter()
            .flat_map(|p| p.parameters(&cfg.model))
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        if let Some(s) = &shard
            && s.pieces() != pieces.as_slice()
        {
            return Err(Error::WrongPieces);
        }
        let boundary_elems = cfg.train.micro_batch_size * cfg.train.seq_len * cfg.model.hidden_size;
        let me = peer.node().peer_id();
        let drift = if cfg.sync.drifts() {
            let mut d = Drift::new(cfg, num_params)?;
            if let Some(s) = &shard {
                d.reset_to(s.weights_flat()?);
            }
            Some(Arc::new(Mutex::new(d)))
        } else {
            None
        };
        Ok(StageWorker {
            inner: Arc::new(Inner {
                me,
                adamw: cfg.adamw(),
                act_codec: codec(&cfg.codec.activations)?,
                grad_codec: codec(&cfg.codec.gradients)?,
                codecs: Arc::default(),
                sync_bufs: Arc::default(),
                sync_encoder: Arc::new(Mutex::new(
                    Encoder::new(codec(&cfg.codec.sync)?)?.with_seed(cfg.seed),
                )),
                boundary_elems,
                num_params,
                pieces,
                feedback: Arc::new(Mutex::new(ErrorFeedback::new(num_params))),
                drift,
                shard: Arc::new(Mutex::new(shard)),
                state: Mutex::new(State {
                    epoch: 0,
                    contexts: HashMap::new(),
                    counted: BTreeSet::new(),
                    acc_step: 0,
                    round: None,
                    early: HashMap::new(),
                    exports: Default::default(),
                    trainer: None,
                    generation: 0,
                    dropped_shares: Traffic::default(),
                    reported: Vec::new(),
                    sent: HashMap::new(),
                    abandoned: Default::default(),
                }),
                stats: StageStats::default(),
                fault: hook::Hook::new(&opts, &me),
                audit: Mutex::new(Default::default()),
                peer,
                opts,
            }),
        })
    }

    /// Serves the training kinds on `peer` with this worker.
    pub fn register(&self, peer: &Peer) {
        peer.register_kinds(&crate::protocol::KINDS)
            .expect("layer kind ranges are disjoint (tested)");
        macro_rules! reg {
            ($kind:expr, $method:ident) => {{
                let w = self.clone();
                peer.register(
                    $kind,
                    move |_p: Arc<PeerShared>, ctx: RequestCtx, body: Vec<u8>| {
                        let w = w.clone();
                        async move { w.$method(ctx, body).await }
                    },
                );
            }};
        }
        reg!(kind::FORWARD, on_forward);
        reg!(kind::BACKWARD, on_backward);
        reg!(kind::ABANDON, on_abandon);
        reg!(kind::SYNC_START, on_sync_start);
        reg!(kind::GRAD_SHARE, on_grad_share);
        reg!(kind::APPLY, on_apply);
        reg!(kind::FETCH_STATE, on_fetch_state);
        reg!(kind::RELOAD, on_reload);
        self.register_audit(peer);
    }

    /// The stage it serves.
    pub fn stage(&self) -> u32 {
        self.inner.opts.stage
    }

    /// Its traffic and ledger counters (the monitor reads them).
    pub fn stats(&self) -> &StageStats {
        &self.inner.stats
    }

    /// The run epoch the worker is in.
    pub fn epoch(&self) -> u32 {
        lock(&self.inner.state).epoch
    }

    /// Forward contexts currently held.
    pub fn contexts(&self) -> usize {
        lock(&self.inner.state).contexts.len()
    }

    /// Micro-batches accumulated in the current step.
    pub fn counted(&self) -> Vec<u32> {
        lock(&self.inner.state).counted.iter().copied().collect()
    }

    /// Optimizer steps the held shard has taken (`None` without a shard).
    pub fn step(&self) -> Option<u64> {
        lock(&self.inner.shard).as_ref().map(Shard::step)
    }

    /// The held shard's weights digest.
    pub async fn digest(&self) -> Result<Option<[u8; 32]>> {
        let shard = self.inner.shard.clone();
        Ok(
            tokio::task::spawn_blocking(move || lock(&shard).as_ref().map(Shard::weights_digest))
                .await?
                .transpose()?,
        )
    }

    /// Runs `f` on the held shard on a blocking thread (tests read its gradients).
    #[cfg(feature = "test-hooks")]
    pub async fn with_shard<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Shard) -> T + Send + 'static,
    ) -> Result<T> {
        let shard = self.inner.shard.clone();
        tokio::task::spawn_blocking(move || {
            let mut g = lock(&shard);
            g.as_mut().map(f)
        })
        .await?
        .ok_or_else(|| Error::NoState)
    }

    /// Replaces the state: a new shard for `epoch`; contexts, accumulator, sync round and the
    /// error-feedback residual are dropped (they refer to the old state).
    pub fn install(&self, shard: Shard, epoch: u32) -> Result<()> {
        if shard.pieces() != self.inner.pieces.as_slice() {
            return Err(Error::WrongPieces);
        }
        let step = shard.step();
        if let Some(d) = &self.inner.drift {
            // A loaded state is a sync boundary's (joiners and reloads load only there) or the
            // stage's only copy: either way it is the anchor.
            lock(d).reset_to(shard.weights_flat()?);
        }
        *lock(&self.inner.shard) = Some(shard);
        self.forget_step_digest();
        lock(&self.inner.feedback).reset();
        let mut st = lock(&self.inner.state);
        st.epoch = epoch;
        st.contexts.clear();
        st.counted.clear();
        st.acc_step = step;
        st.end_round();
        st.early.clear();
        st.sent.clear();
        st.exports = Default::default();
        st.generation += 1;
        Ok(())
    }

    /// Drops the step's work but keeps the weights: contexts, accumulator (gradients zeroed),
    /// sync round, early shares and the error-feedback residual (its last update was for a share
    /// that will not be applied). The trainer's reset of a stage whose sync lost a participant.
    fn reset_step(&self) {
        if let Some(s) = lock(&self.inner.shard).as_mut() {
            s.zero_grads();
        }
        lock(&self.inner.feedback).reset();
        if let Some(d) = &self.inner.drift {
            // The drift itself (weights, anchor, residual) is the replica's state: kept.
            lock(d).undo_round();
        }
        let mut st = lock(&self.inner.state);
        st.contexts.clear();
        st.counted.clear();
        st.end_round();
        st.early.clear();
        st.generation += 1;
    }

    fn check_run(&self, run: &RunId, epoch: u32) -> Result<(), RpcError> {
        if *run != self.inner.opts.run {
            return Err(refuse(code::BAD_REQUEST, format!("not run {run}")));
        }
        let mine = lock(&self.inner.state).epoch;
        if epoch != mine {
            return Err(refuse(
                code::BAD_REQUEST,
                format!("epoch {epoch}, this stage is in epoch {mine}"),
            ));
        }
        Ok(())
    }

    fn check_stage(&self, stage: u32) -> Result<(), RpcError> {
        if stage != self.inner.opts.stage {
            return Err(refuse(
                code::BAD_REQUEST,
                format!("stage {stage}, this peer serves {}", self.inner.opts.stage),
            ));
        }
        Ok(())
    }

    fn limits(&self) -> Limits {
        Limits::new(self.inner.boundary_elems)
    }

    /// Elements of a sync share: the parameters, padded to whole chunks for pseudo-gradients.
    fn share_elements(&self) -> usize {
        let c = &self.inner.opts.config.sync;
        if c.drifts() {
            swarm_compression::outer::SparseFeedback::padded_len(self.inner.num_params, c.chunk)
        } else {
            self.inner.num_params
        }
    }
}

impl StageWorker {
    /// Serves one pipeline, sync or state request of `kind` as the registered handlers do (for
    /// wrappers that filter or observe requests, e.g. fault-injection tests).
    #[cfg(feature = "test-hooks")]
    pub async fn handle(
        &self,
        kind: u16,
        ctx: RequestCtx,
        body: Vec<u8>,
    ) -> Result<rpc::Reply, RpcError> {
        match kind {
            kind::FORWARD => self.on_forward(ctx, body).await,
            kind::BACKWARD => self.on_backward(ctx, body).await,
            kind::ABANDON => self.on_abandon(ctx, body).await,
            kind::SYNC_START => self.on_sync_start(ctx, body).await,
            kind::GRAD_SHARE => self.on_grad_share(ctx, body).await,
            kind::APPLY => self.on_apply(ctx, body).await,
            kind::FETCH_STATE => self.on_fetch_state(ctx, body).await,
            kind::RELOAD => self.on_reload(ctx, body).await,
            other => Err(refuse(
                code::BAD_REQUEST,
                format!("kind {other} is not a stage request"),
            )),
        }
    }
}
