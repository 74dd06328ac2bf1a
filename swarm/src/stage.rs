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

use candle_core::{DType, Device, Tensor};
use swarm_compression::{Codec, Decoder, Encoder, ErrorFeedback, Limits};
use swarm_model::{AdamW, ForwardCtx, Piece, RunConfig, Shard};

use crate::error::{Error, Result};
use crate::identity::PeerId;
use crate::membership::RunId;
use crate::peer::{Peer, PeerShared, RequestCtx};
use crate::protocol::{
    Abandon, Ack, Admit, AdmitReply, Applied, Apply, Backward, BackwardOut, Counted, Endpoint,
    FetchState, Forward, ForwardOut, GradShare, Hop, HopFailed, MbKey, Ready, Reload, RunInfo,
    RunInfoRequest, StateSource, SyncDone, SyncStart, Traffic,
};
use crate::receipt::{Pass, Receipt};
use crate::rpc::{self, RpcError, code};
use crate::state_transfer::{StateRequest, fetch_verified, serve_chunk};
use crate::wire::{self, WireMessage, kind};

// Audits (issue #7): receipts, kept frames, recomputation; a child module for field access.
#[path = "audit_worker.rs"]
pub mod audit_worker;

/// How a stage worker runs. Build with [`StageOptions::new`].
#[derive(Debug, Clone)]
pub struct StageOptions {
    pub run: RunId,
    pub config: RunConfig,
    pub stage: u32,
    /// Most forward contexts held at once (in flight between forward and backward).
    pub max_contexts: usize,
    /// Bytes asked per `FetchState` chunk.
    pub chunk_bytes: u32,
    /// Tries per send to a next hop or a sync partner before giving up.
    pub send_tries: u32,
    /// Misbehave on purpose (issue #7 fault injection; tests and demos only).
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
            fault: None,
        }
    }
}

/// Tensor bytes this worker sent, per channel: frames as sent, and their fp32 size.
#[derive(Debug, Default)]
pub struct StageStats {
    pub activations_wire: AtomicU64,
    pub activations_dense: AtomicU64,
    pub gradients_wire: AtomicU64,
    pub gradients_dense: AtomicU64,
    pub sync_wire: AtomicU64,
    pub sync_dense: AtomicU64,
    /// State bytes served through FetchState.
    pub state_served: AtomicU64,
    pub forwards: AtomicU64,
    pub backwards: AtomicU64,
    /// Requests refused with BUSY (context table full).
    pub busy: AtomicU64,
    /// Pipeline messages refused for a missing or bad sender receipt.
    pub bad_receipts: AtomicU64,
}

impl StageStats {
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
    trainer: SocketAddr,
    trainer_id: PeerId,
    summing: bool,
    summed: bool,
    share_bytes: u64,
    share_dense: u64,
    /// Shares of this round that reached their receiver so far (counted if the round is dropped
    /// before it reports: then `share_bytes` never reaches the trainer).
    delivered: Traffic,
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
    export: Option<Arc<Export>>,
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
    adamw: AdamW,
    act_codec: Codec,
    grad_codec: Codec,
    sync_codec: Codec,
    /// Elements of one boundary tensor: micro_batch_size x seq_len x hidden.
    boundary_elems: usize,
    num_params: usize,
    pieces: Vec<Piece>,
    stats: StageStats,
    fault: Option<Arc<crate::fault::Fault>>,
    audit: Mutex<audit_worker::AuditStore>,
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
        .ok_or_else(|| Error::Run(format!("the run has no stage {stage}")))
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
    for x in v {
        h.update(&x.to_le_bytes());
    }
    *h.finalize().as_bytes()
}

fn tensor_f32(t: &Tensor) -> Result<Vec<f32>> {
    cand(
        t.flatten_all()
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.to_vec1::<f32>()),
    )
}

fn cand<T>(r: candle_core::Result<T>) -> Result<T> {
    r.map_err(|e| Error::Model(e.into()))
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
            return Err(Error::Run(
                "the shard holds other pieces than the stage".into(),
            ));
        }
        let boundary_elems = cfg.train.micro_batch_size * cfg.train.seq_len * cfg.model.hidden_size;
        let me = peer.node().peer_id();
        Ok(StageWorker {
            inner: Arc::new(Inner {
                me,
                adamw: cfg.adamw(),
                act_codec: codec(&cfg.codec.activations)?,
                grad_codec: codec(&cfg.codec.gradients)?,
                sync_codec: codec(&cfg.codec.sync)?,
                boundary_elems,
                num_params,
                pieces,
                feedback: Arc::new(Mutex::new(ErrorFeedback::new(num_params))),
                shard: Arc::new(Mutex::new(shard)),
                state: Mutex::new(State {
                    epoch: 0,
                    contexts: HashMap::new(),
                    counted: BTreeSet::new(),
                    acc_step: 0,
                    round: None,
                    early: HashMap::new(),
                    export: None,
                    trainer: None,
                    generation: 0,
                    dropped_shares: Traffic::default(),
                    reported: Vec::new(),
                    sent: HashMap::new(),
                    abandoned: Default::default(),
                }),
                stats: StageStats::default(),
                fault: opts
                    .fault
                    .map(|f| Arc::new(crate::fault::Fault::new(f, &me.0))),
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

    pub fn stage(&self) -> u32 {
        self.inner.opts.stage
    }

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
                .await
                .map_err(|e| Error::Run(e.to_string()))?
                .transpose()?,
        )
    }

    /// Runs `f` on the held shard on a blocking thread.
    pub async fn with_shard<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Shard) -> T + Send + 'static,
    ) -> Result<T> {
        let shard = self.inner.shard.clone();
        tokio::task::spawn_blocking(move || {
            let mut g = lock(&shard);
            g.as_mut().map(f)
        })
        .await
        .map_err(|e| Error::Run(e.to_string()))?
        .ok_or_else(|| Error::Run("no state loaded".into()))
    }

    /// Replaces the state: a new shard for `epoch`; contexts, accumulator, sync round and the
    /// error-feedback residual are dropped (they refer to the old state).
    pub fn install(&self, shard: Shard, epoch: u32) -> Result<()> {
        if shard.pieces() != self.inner.pieces.as_slice() {
            return Err(Error::Run(
                "the shard holds other pieces than the stage".into(),
            ));
        }
        let step = shard.step();
        *lock(&self.inner.shard) = Some(shard);
        lock(&self.inner.feedback).reset();
        let mut st = lock(&self.inner.state);
        st.epoch = epoch;
        st.contexts.clear();
        st.counted.clear();
        st.acc_step = step;
        st.end_round();
        st.early.clear();
        st.sent.clear();
        st.export = None;
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

    // ---- forward ------------------------------------------------------------------------

    async fn on_forward(&self, ctx: RequestCtx, body: Vec<u8>) -> Result<rpc::Reply, RpcError> {
        let f: Forward = wire::decode_body(&body)?;
        self.check_run(&f.run, f.epoch)?;
        let hop = f.route[f.hop as usize];
        if hop.peer != self.inner.me {
            return Err(refuse(code::BAD_REQUEST, "this hop is another peer"));
        }
        self.check_stage(hop.stage)?;
        let num_stages = self.inner.opts.config.stages.len().saturating_sub(1);
        if f.route.len() != num_stages {
            return Err(refuse(
                code::BAD_REQUEST,
                "route length is not the stage count",
            ));
        }
        match self.step() {
            Some(s) if s == f.key.step => {}
            Some(s) => {
                return Err(refuse(
                    code::BAD_REQUEST,
                    format!("step {}, this stage is at step {s}", f.key.step),
                ));
            }
            None => return Err(refuse(code::BUSY, "state not loaded yet")),
        }
        // A peer's frame must come with its signed receipt for exactly those bytes; the
        // trainer (trusted) sends none.
        if ctx.from != f.trainer.peer {
            let Some(prev) = (f.hop as usize).checked_sub(1).map(|i| f.route[i]) else {
                return Err(refuse(code::FORBIDDEN, "hop 0 comes from the trainer"));
            };
            if prev.peer != ctx.from {
                return Err(refuse(code::FORBIDDEN, "not sent by the previous hop"));
            }
            if let Err(why) = Receipt::check_received(
                f.receipt.as_ref(),
                &ctx.from,
                &f.run,
                f.epoch,
                f.key,
                prev.stage,
                Pass::Forward,
                &f.activations,
            ) {
                let traffic = f
                    .upstream
                    .plus_frame(f.activations.len(), self.inner.boundary_elems);
                return Err(self.refuse_receipt(f.trainer, f.key, ctx.from, why, traffic));
            }
        }
        {
            let mut st = lock(&self.inner.state);
            if st.contexts.contains_key(&f.key) {
                return Err(refuse(code::BAD_REQUEST, "attempt already held"));
            }
            if st.contexts.len() >= self.inner.opts.max_contexts {
                self.inner.stats.busy.fetch_add(1, Ordering::Relaxed);
                return Err(refuse(code::BUSY, "context table full"));
            }
            st.trainer = Some(f.trainer);
            st.contexts.insert(
                f.key,
                CtxEntry {
                    ctx: None,
                    route: f.route.clone(),
                    trainer: f.trainer,
                    accumulate: f.accumulates(hop.stage),
                },
            );
        }
        let w = self.clone();
        tokio::spawn(async move { w.run_forward(f).await });
        rpc::reply(&Ack)
    }

    async fn run_forward(&self, f: Forward) {
        let key = f.key;
        let stage = self.inner.opts.stage;
        let hidden = self.inner.opts.config.model.hidden_size;
        let limits = self.limits();
        let shard = self.inner.shard.clone();
        let act_codec = self.inner.act_codec;
        let frame = f.activations;
        let in_len = frame.len();
        let (kept_in, fault) = (frame.clone(), self.inner.fault.clone());
        let received = f.receipt;
        let computed =
            tokio::task::spawn_blocking(move || -> Result<(ForwardCtx, Vec<u8>, usize, usize)> {
                let mut dec = Decoder::new();
                let mut x = Vec::new();
                let info = dec.decode(&frame, &limits, &mut x)?;
                let shape = info.shape();
                if shape.len() != 3 || shape[2] != hidden {
                    return Err(Error::Run(format!("activations of shape {shape:?}")));
                }
                let x = cand(Tensor::from_vec(
                    x,
                    (shape[0], shape[1], shape[2]),
                    &Device::Cpu,
                ))?;
                let g = lock(&shard);
                let s = g.as_ref().ok_or_else(|| Error::Run("no state".into()))?;
                let (y, c) = s.stage_forward(stage as usize, &x)?;
                let y = match &fault {
                    Some(f) => f.forward(key.step, key.mb, stage as usize, &x, y)?,
                    None => y,
                };
                drop(g);
                let dims = y.dims().to_vec();
                let y = tensor_f32(&y)?;
                let mut out = Vec::new();
                Encoder::new(act_codec)?.encode(&y, &dims, &mut out)?;
                Ok((c, out, y.len(), info.elements))
            })
            .await
            .map_err(|e| Error::Run(e.to_string()))
            .and_then(|r| r);
        let (c, out, elems, in_elems) = match computed {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(stage, step = key.step, microbatch = key.mb, error = %e, "forward failed");
                let entry = lock(&self.inner.state).contexts.remove(&key);
                if let Some(entry) = entry {
                    let traffic = f.upstream.plus_frame(in_len, self.inner.boundary_elems);
                    self.report_failure(
                        &entry.trainer,
                        key,
                        self.inner.me,
                        false,
                        e.to_string(),
                        traffic,
                    )
                    .await;
                }
                return;
            }
        };
        self.inner.stats.forwards.fetch_add(1, Ordering::Relaxed);
        let receipt = self.record_pass(
            Pass::Forward,
            f.run,
            f.epoch,
            key,
            kept_in,
            out.clone(),
            received,
        );
        // Keep the context unless the attempt was abandoned meanwhile.
        let (route, trainer) = {
            let mut st = lock(&self.inner.state);
            match st.contexts.get_mut(&key) {
                Some(e) => {
                    e.ctx = Some(c);
                    (e.route.clone(), e.trainer)
                }
                None => return,
            }
        };
        StageStats::add(
            &self.inner.stats.activations_wire,
            &self.inner.stats.activations_dense,
            out.len(),
            elems,
        );
        // What the previous hop sent us is upstream of the next message.
        let upstream = f.upstream.plus_frame(in_len, in_elems);
        let with_ours = upstream.plus_frame(out.len(), elems);
        let ours = Traffic::default().plus_frame(out.len(), elems);
        let next = f.hop as usize + 1;
        let (target, result) = if next < route.len() {
            let msg = Forward {
                run: f.run,
                epoch: f.epoch,
                key,
                route: route.clone(),
                hop: next as u32,
                trainer,
                accumulate: f.accumulate,
                upstream,
                activations: out,
                receipt,
            };
            let h = route[next];
            (h.peer, self.send(h.addr, h.peer, &msg).await)
        } else {
            let msg = ForwardOut {
                run: f.run,
                epoch: f.epoch,
                key,
                stage,
                upstream,
                activations: out,
                receipt,
            };
            (
                trainer.peer,
                self.send(trainer.addr, trainer.peer, &msg).await,
            )
        };
        // Our frame arrived (a refusal is an answer too): if the trainer abandons the attempt
        // without a report of this pass, it learns of the frame from us.
        if matches!(&result, Ok(()) | Err(Error::Remote(_))) {
            lock(&self.inner.state).frame_delivered(key, false, ours);
        }
        if let Err(e) = result {
            let busy = matches!(&e, Error::Remote(r) if r.code == code::BUSY);
            tracing::info!(stage, step = key.step, microbatch = key.mb, error = %e, "forward send failed");
            if matches!(&e, Error::Remote(r) if r.code == code::BAD_RECEIPT) {
                // The receiver reported us; blaming it back would only muddy the record.
                lock(&self.inner.state).contexts.remove(&key);
                return;
            }
            lock(&self.inner.state).contexts.remove(&key);
            // A refusal means our frame arrived: it crossed the network too.
            let traffic = if matches!(&e, Error::Remote(_)) {
                with_ours
            } else {
                upstream
            };
            self.report_failure(&trainer, key, target, busy, e.to_string(), traffic)
                .await;
        }
    }

    async fn send<M: WireMessage>(&self, addr: SocketAddr, peer: PeerId, msg: &M) -> Result<()> {
        let mut last = None;
        for attempt in 0..self.inner.opts.send_tries.max(1) {
            match self
                .inner
                .peer
                .call::<M, Ack>(addr, Some(peer), msg)
                .await
                .map_err(Error::from)
            {
                Ok(_) => return Ok(()),
                // A refusal is an answer: retrying would get the same one.
                Err(e @ Error::Remote(_)) => return Err(e),
                Err(e) => {
                    tracing::debug!(attempt, error = %e, "send failed");
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(50 << attempt.min(4))).await;
                }
            }
        }
        Err(last.unwrap_or_else(|| Error::Run("no send attempted".into())))
    }

    async fn report_failure(
        &self,
        trainer: &Endpoint,
        key: MbKey,
        failed: PeerId,
        busy: bool,
        reason: String,
        traffic: Traffic,
    ) {
        let msg = HopFailed {
            run: self.inner.opts.run,
            epoch: self.epoch(),
            key,
            failed,
            busy,
            reason,
            traffic,
        };
        if let Err(e) = self.send(trainer.addr, trainer.peer, &msg).await {
            tracing::warn!(error = %e, "could not report a failed hop to the trainer");
        }
    }

    /// Refuses a pipeline message whose receipt does not hold, reporting its sender to the
    /// trainer as the failed hop (the receipt check binds the fault to the TLS-proven sender).
    fn refuse_receipt(
        &self,
        trainer: Endpoint,
        key: MbKey,
        sender: PeerId,
        why: &'static str,
        traffic: Traffic,
    ) -> RpcError {
        tracing::warn!(peer = %sender.short(), step = key.step, microbatch = key.mb, why, "bad receipt");
        self.inner
            .stats
            .bad_receipts
            .fetch_add(1, Ordering::Relaxed);
        let w = self.clone();
        tokio::spawn(async move {
            let reason = format!("bad receipt from {}: {why}", sender.short());
            w.report_failure(&trainer, key, sender, false, reason, traffic)
                .await;
        });
        refuse(code::BAD_RECEIPT, why)
    }

    // ---- backward -----------------------------------------------------------------------

    async fn on_backward(&self, ctx: RequestCtx, body: Vec<u8>) -> Result<rpc::Reply, RpcError> {
        let b: Backward = wire::decode_body(&body)?;
        self.check_run(&b.run, b.epoch)?;
        self.check_stage(b.stage)?;
        let entry = {
            let mut st = lock(&self.inner.state);
            let (trainer, next) = match st.contexts.get(&b.key) {
                Some(e) if e.ctx.is_some() => {
                    (e.trainer, e.route.get(b.stage as usize + 1).copied())
                }
                Some(_) => return Err(refuse(code::BAD_REQUEST, "forward still running")),
                None => return Err(refuse(code::BAD_REQUEST, "no context for this attempt")),
            };
            // The gradient comes from the trainer (last stage) or the next hop, with its receipt.
            if ctx.from != trainer.peer {
                let Some(next) = next.filter(|h| h.peer == ctx.from) else {
                    return Err(refuse(code::FORBIDDEN, "not sent by the next hop"));
                };
                if let Err(why) = Receipt::check_received(
                    b.receipt.as_ref(),
                    &ctx.from,
                    &b.run,
                    b.epoch,
                    b.key,
                    next.stage,
                    Pass::Backward,
                    &b.grad,
                ) {
                    drop(st);
                    let traffic = b
                        .upstream
                        .plus_frame(b.grad.len(), self.inner.boundary_elems);
                    return Err(self.refuse_receipt(trainer, b.key, ctx.from, why, traffic));
                }
            }
            let mut e = st.contexts.remove(&b.key).expect("checked above");
            // Exactly once per step: never accumulate a micro-batch twice.
            if e.accumulate {
                if st.acc_step != b.key.step && st.counted.is_empty() {
                    st.acc_step = b.key.step;
                }
                if st.acc_step != b.key.step || st.counted.contains(&b.key.mb) {
                    e.accumulate = false;
                } else {
                    st.counted.insert(b.key.mb);
                }
            }
            e
        };
        let w = self.clone();
        tokio::spawn(async move { w.run_backward(b, entry).await });
        rpc::reply(&Ack)
    }

    async fn run_backward(&self, b: Backward, mut entry: CtxEntry) {
        let key = b.key;
        let stage = self.inner.opts.stage;
        let limits = self.limits();
        let shard = self.inner.shard.clone();
        let grad_codec = self.inner.grad_codec;
        let accumulate = entry.accumulate;
        let ctx = entry.ctx.take().expect("held context");
        let frame = b.grad;
        let in_len = frame.len();
        let (kept_in, fault) = (frame.clone(), self.inner.fault.clone());
        let received = b.receipt;
        let computed = tokio::task::spawn_blocking(move || -> Result<(Vec<u8>, usize, usize)> {
            let mut dec = Decoder::new();
            let mut g = Vec::new();
            let info = dec.decode(&frame, &limits, &mut g)?;
            let shape = info.shape().to_vec();
            let g = cand(Tensor::from_vec(g, shape.as_slice(), &Device::Cpu))?;
            let mut guard = lock(&shard);
            let s = guard
                .as_mut()
                .ok_or_else(|| Error::Run("no state".into()))?;
            let dx = if accumulate {
                s.backward(ctx, &g)?
            } else {
                s.backward_input_only(ctx, &g)?
            };
            drop(guard);
            let dx = dx.ok_or_else(|| Error::Run("stage input has no gradient".into()))?;
            let dx = match &fault {
                Some(f) => f.backward(key.step, key.mb, &g, dx)?,
                None => dx,
            };
            let dims = dx.dims().to_vec();
            let dx = tensor_f32(&dx)?;
            let mut out = Vec::new();
            Encoder::new(grad_codec)?.encode(&dx, &dims, &mut out)?;
            Ok((out, dx.len(), info.elements))
        })
        .await
        .map_err(|e| Error::Run(e.to_string()))
        .and_then(|r| r);
        let trainer = entry.trainer;
        let (out, elems, in_elems) = match computed {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(stage, step = key.step, microbatch = key.mb, error = %e, "backward failed");
                if accumulate {
                    // The gradient may be half-added: this replica's accumulator is unreliable
                    // for the step; the trainer excludes it when told (it never got Counted).
                    lock(&self.inner.state).counted.remove(&key.mb);
                }
                let traffic = b.upstream.plus_frame(in_len, self.inner.boundary_elems);
                self.report_failure(&trainer, key, self.inner.me, false, e.to_string(), traffic)
                    .await;
                return;
            }
        };
        self.inner.stats.backwards.fetch_add(1, Ordering::Relaxed);
        let receipt = self.record_pass(
            Pass::Backward,
            b.run,
            b.epoch,
            key,
            kept_in,
            out.clone(),
            received,
        );
        let epoch = b.epoch;
        let upstream = b.upstream.plus_frame(in_len, in_elems);
        if accumulate {
            let msg = Counted {
                run: b.run,
                epoch,
                key,
                stage,
            };
            if let Err(e) = self.send(trainer.addr, trainer.peer, &msg).await {
                tracing::warn!(error = %e, "could not report Counted");
            }
        }
        StageStats::add(
            &self.inner.stats.gradients_wire,
            &self.inner.stats.gradients_dense,
            out.len(),
            elems,
        );
        let with_ours = upstream.plus_frame(out.len(), elems);
        let ours = Traffic::default().plus_frame(out.len(), elems);
        let (target, result) = if stage > 0 {
            let h = entry.route[stage as usize - 1];
            let msg = Backward {
                run: b.run,
                epoch,
                key,
                stage: stage - 1,
                upstream,
                grad: out,
                receipt,
            };
            (h.peer, self.send(h.addr, h.peer, &msg).await)
        } else {
            let msg = BackwardOut {
                run: b.run,
                epoch,
                key,
                upstream,
                grad: out,
                receipt,
            };
            (
                trainer.peer,
                self.send(trainer.addr, trainer.peer, &msg).await,
            )
        };
        // Our frame arrived (a refusal is an answer too): if the trainer abandons the attempt
        // without a report of this pass, it learns of the frame from us.
        if matches!(&result, Ok(()) | Err(Error::Remote(_))) {
            lock(&self.inner.state).frame_delivered(key, true, ours);
        }
        if let Err(e) = result {
            let busy = matches!(&e, Error::Remote(r) if r.code == code::BUSY);
            if matches!(&e, Error::Remote(r) if r.code == code::BAD_RECEIPT) {
                tracing::info!(stage, step = key.step, microbatch = key.mb, error = %e, "backward refused for its receipt");
                return;
            }
            let traffic = if matches!(&e, Error::Remote(_)) {
                with_ours
            } else {
                upstream
            };
            self.report_failure(&trainer, key, target, busy, e.to_string(), traffic)
                .await;
        }
    }

    async fn on_abandon(&self, _ctx: RequestCtx, body: Vec<u8>) -> Result<rpc::Reply, RpcError> {
        let a: Abandon = wire::decode_body(&body)?;
        self.check_run(&a.run, a.epoch)?;
        let mut st = lock(&self.inner.state);
        st.contexts.remove(&a.key);
        st.attempt_abandoned(a.key, a.uncounted);
        drop(st);
        rpc::reply(&Ack)
    }

    // ---- sync ---------------------------------------------------------------------------

    async fn on_sync_start(&self, ctx: RequestCtx, body: Vec<u8>) -> Result<rpc::Reply, RpcError> {
        let s: SyncStart = wire::decode_body(&body)?;
        self.check_run(&s.run, s.epoch)?;
        self.check_stage(s.stage)?;
        if s.mb_counts.len() != s.participants.len() || s.addrs.len() != s.participants.len() {
            return Err(refuse(
                code::BAD_REQUEST,
                "participants, counts and addresses differ",
            ));
        }
        if self.step() != Some(s.step) {
            return Err(refuse(code::BAD_REQUEST, "this stage is not at that step"));
        }
        let me = s.participants.iter().position(|p| *p == self.inner.me);
        let mut st = lock(&self.inner.state);
        // The step is over: its contexts can never be used.
        st.contexts.retain(|k, _| k.step > s.step);
        let Some(me) = me else {
            // Excluded: drop the accumulator; the trainer re-syncs our weights afterwards.
            st.counted.clear();
            st.end_round();
            drop(st);
            if let Some(sh) = lock(&self.inner.shard).as_mut() {
                sh.zero_grads();
            }
            return rpc::reply(&Ack);
        };
        let mine = if st.acc_step == s.step {
            st.counted.len() as u32
        } else {
            0
        };
        if mine != s.mb_counts[me] {
            return Err(refuse(
                code::BAD_REQUEST,
                format!(
                    "this replica counted {mine} micro-batches, the trainer says {}",
                    s.mb_counts[me]
                ),
            ));
        }
        if st.round.as_ref().is_some_and(|r| r.step == s.step) {
            return Err(refuse(code::BAD_REQUEST, "sync already started"));
        }
        let n = s.participants.len();
        let mut shares = vec![None; n];
        for (i, p) in s.participants.iter().enumerate() {
            match st.early.remove(&(s.step, *p)) {
                Some((round, f)) if round == s.round => shares[i] = Some(f),
                Some((round, _)) => {
                    tracing::debug!(peer = %p.short(), step = s.step, round, "share of a dropped sync round ignored")
                }
                None => {}
            }
        }
        st.early.clear();
        st.end_round();
        st.generation += 1;
        let generation = st.generation;
        st.round = Some(Round {
            step: s.step,
            round: s.round,
            generation,
            participants: s.participants.clone(),
            me,
            shares,
            trainer: ctx.remote_addr,
            trainer_id: ctx.from,
            summing: false,
            summed: false,
            share_bytes: 0,
            share_dense: 0,
            delivered: Traffic::default(),
        });
        drop(st);
        let w = self.clone();
        tokio::spawn(async move { w.run_sync(s, generation).await });
        rpc::reply(&Ack)
    }

    async fn run_sync(&self, s: SyncStart, generation: u64) {
        let n = s.participants.len();
        if n > 1 {
            // Encode our accumulated gradient with error feedback.
            let shard = self.inner.shard.clone();
            let fb = self.inner.feedback.clone();
            let sync_codec = self.inner.sync_codec;
            let seed = self.inner.opts.config.seed;
            let enc = tokio::task::spawn_blocking(move || -> Result<Vec<u8>> {
                let g = lock(&shard)
                    .as_ref()
                    .ok_or_else(|| Error::Run("no state".into()))?
                    .grads_flat()?;
                let mut out = Vec::new();
                let mut enc = Encoder::new(sync_codec)?.with_seed(seed);
                lock(&fb).encode(&mut enc, &g, &[g.len()], &mut out)?;
                Ok(out)
            })
            .await
            .map_err(|e| Error::Run(e.to_string()))
            .and_then(|r| r);
            let frame = match enc {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!(error = %e, "encoding the grad share failed");
                    return;
                }
            };
            let me = {
                let mut st = lock(&self.inner.state);
                let Some(r) = st
                    .round
                    .as_mut()
                    .filter(|r| r.step == s.step && r.generation == generation)
                else {
                    return;
                };
                r.shares[r.me] = Some(frame.clone());
                r.share_bytes = (frame.len() * (n - 1)) as u64;
                r.share_dense = (4 * self.inner.num_params * (n - 1)) as u64;
                r.me
            };
            let msg = GradShare {
                run: s.run,
                epoch: s.epoch,
                step: s.step,
                stage: s.stage,
                round: s.round,
                from: self.inner.me,
                frame,
            };
            let share = Traffic::default().plus_frame(msg.frame.len(), self.inner.num_params);
            let sends = (0..n).filter(|i| *i != me).map(|i| {
                let (addr, peer) = (s.addrs[i], s.participants[i]);
                let msg = &msg;
                async move {
                    let r = self.send(addr, peer, msg).await;
                    // Noted as each send ends: a dropped round reports what arrived (a refusal
                    // is an answer, so the share arrived too).
                    if matches!(r, Ok(()) | Err(Error::Remote(_))) {
                        lock(&self.inner.state).share_delivered(generation, share);
                    }
                    (peer, r)
                }
            });
            for (peer, r) in futures::future::join_all(sends).await {
                match r {
                    Ok(()) => StageStats::add(
                        &self.inner.stats.sync_wire,
                        &self.inner.stats.sync_dense,
                        msg.frame.len(),
                        self.inner.num_params,
                    ),
                    Err(e) => {
                        tracing::warn!(peer = %peer.short(), error = %e, "grad share not delivered")
                    }
                }
            }
        }
        self.try_finish_sync(s.step).await;
    }

    async fn on_grad_share(&self, ctx: RequestCtx, body: Vec<u8>) -> Result<rpc::Reply, RpcError> {
        let g: GradShare = wire::decode_body(&body)?;
        self.check_run(&g.run, g.epoch)?;
        self.check_stage(g.stage)?;
        if g.from != ctx.from {
            return Err(refuse(code::FORBIDDEN, "a share must come from its author"));
        }
        // Cheap header check before holding the bytes.
        swarm_compression::FrameInfo::read(&g.frame, &Limits::new(self.inner.num_params))
            .map_err(|e| refuse(code::BAD_REQUEST, format!("grad share: {e}")))?;
        let step = g.step;
        {
            let mut st = lock(&self.inner.state);
            // A share of a round the trainer dropped (a participant died) must not be summed
            // into a later one: it holds an outdated gradient.
            let stale = st
                .round
                .as_ref()
                .is_some_and(|r| r.step == step && g.round < r.round)
                || st
                    .early
                    .get(&(step, g.from))
                    .is_some_and(|(round, _)| g.round < *round);
            if stale {
                tracing::debug!(peer = %g.from.short(), step, round = g.round, "share of a dropped sync round ignored");
                return rpc::reply(&Ack);
            }
            match st.round.as_mut() {
                Some(r) if r.step == step && r.round == g.round => {
                    let Some(i) = r.participants.iter().position(|p| *p == g.from) else {
                        return Err(refuse(code::FORBIDDEN, "not a participant of this sync"));
                    };
                    if r.shares[i].is_some() {
                        return Err(refuse(code::BAD_REQUEST, "share already received"));
                    }
                    r.shares[i] = Some(g.frame);
                }
                _ => {
                    // Before our SyncStart: keep it, bounded, for the current step only (a newer
                    // round's share replaces an older one's).
                    let key = (step, g.from);
                    if self.step() != Some(step)
                        || (!st.early.contains_key(&key)
                            && st.early.len() >= crate::protocol::MAX_REPLICAS)
                    {
                        return Err(refuse(code::BAD_REQUEST, "no sync of that step here"));
                    }
                    st.early.insert(key, (g.round, g.frame));
                    return rpc::reply(&Ack);
                }
            }
        }
        let w = self.clone();
        tokio::spawn(async move { w.try_finish_sync(step).await });
        rpc::reply(&Ack)
    }

    /// When every share of the round is in: decode all in participant order, sum, set the shard's
    /// gradients and report SyncDone.
    async fn try_finish_sync(&self, step: u64) {
        let (frames, trainer, trainer_id, share_bytes, share_dense, generation) = {
            let mut st = lock(&self.inner.state);
            let Some(r) = st.round.as_mut().filter(|r| r.step == step) else {
                return;
            };
            let n = r.participants.len();
            if r.summing || r.summed || (n > 1 && r.shares.iter().any(Option::is_none)) {
                return;
            }
            r.summing = true;
            let frames: Vec<Vec<u8>> = r.shares.iter().flatten().cloned().collect();
            (
                frames,
                r.trainer,
                r.trainer_id,
                r.share_bytes,
                r.share_dense,
                r.generation,
            )
        };
        let shard = self.inner.shard.clone();
        let feedback = self.inner.feedback.clone();
        let n_params = self.inner.num_params;
        let done = tokio::task::spawn_blocking(move || -> Result<(f64, [u8; 32])> {
            let mut g = lock(&shard);
            let s = g.as_mut().ok_or_else(|| Error::Run("no state".into()))?;
            if frames.len() > 1 {
                let limits = Limits::new(n_params);
                let mut dec = Decoder::new();
                let mut sum: Vec<f32> = Vec::new();
                let mut buf = Vec::new();
                for (i, f) in frames.iter().enumerate() {
                    let info = dec.decode(f, &limits, &mut buf)?;
                    if info.elements != n_params {
                        return Err(Error::Run(format!(
                            "share of {} elements for {n_params} parameters",
                            info.elements
                        )));
                    }
                    if i == 0 {
                        sum.clone_from(&buf);
                    } else {
                        sum.iter_mut().zip(&buf).for_each(|(a, b)| *a += *b);
                    }
                }
                s.set_grads_flat(&sum)?;
                Ok((s.grad_sq_norm()?, f32_digest(&sum)))
            } else {
                // Alone, nothing is compressed: what earlier shares left in the error-feedback
                // residual is delivered now, in full, rather than steps later when a second
                // replica arrives (a stale residual then lands as one large, outdated update).
                let mut flat = s.grads_flat()?;
                let mut fb = lock(&feedback);
                if fb.residual().iter().any(|r| *r != 0.0) {
                    flat = fb.compensate(&flat)?.to_vec();
                    s.set_grads_flat(&flat)?;
                }
                fb.reset();
                Ok((s.grad_sq_norm()?, f32_digest(&flat)))
            }
        })
        .await
        .map_err(|e| Error::Run(e.to_string()))
        .and_then(|r| r);
        let (norm, digest) = match done {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(step, error = %e, "summing the grad shares failed");
                if let Some(r) = lock(&self.inner.state)
                    .round
                    .as_mut()
                    .filter(|r| r.generation == generation)
                {
                    r.summing = false;
                }
                return;
            }
        };
        let dropped = {
            let mut st = lock(&self.inner.state);
            let Some(r) = st.round.as_mut().filter(|r| r.generation == generation) else {
                // Reset while summing: this round is void (the reset zeroed the gradients).
                return;
            };
            r.summing = false;
            r.summed = true;
            if st.reported.len() >= 8 {
                st.reported.remove(0);
            }
            st.reported.push(generation);
            (
                std::mem::take(&mut st.dropped_shares),
                std::mem::take(&mut st.abandoned),
            )
        };
        let (dropped, (abandoned_activations, abandoned_gradients)) = dropped;
        let msg = SyncDone {
            run: self.inner.opts.run,
            epoch: self.epoch(),
            step,
            stage: self.inner.opts.stage,
            grad_sq_norm: norm,
            grad_digest: digest,
            share_bytes: share_bytes.saturating_add(dropped.wire),
            share_dense_bytes: share_dense.saturating_add(dropped.dense),
            abandoned_activations,
            abandoned_gradients,
        };
        if let Err(e) = self.send(trainer, trainer_id, &msg).await {
            tracing::warn!(step, error = %e, "could not report SyncDone");
        }
    }

    async fn on_apply(&self, _ctx: RequestCtx, body: Vec<u8>) -> Result<rpc::Reply, RpcError> {
        let a: Apply = wire::decode_body(&body)?;
        self.check_run(&a.run, a.epoch)?;
        self.check_stage(a.stage)?;
        {
            let st = lock(&self.inner.state);
            match &st.round {
                Some(r) if r.step == a.step && r.summed => {}
                _ => return Err(refuse(code::BAD_REQUEST, "no finished sync of that step")),
            }
        }
        let shard = self.inner.shard.clone();
        let hp = self.inner.adamw;
        let fault = self.inner.fault.clone();
        let digest = tokio::task::spawn_blocking(move || -> Result<[u8; 32]> {
            let mut g = lock(&shard);
            let s = g.as_mut().ok_or_else(|| Error::Run("no state".into()))?;
            if let Some(f) = &fault {
                f.before_apply(a.step, s)?;
            }
            s.optimizer_step(&hp, a.lr, a.clip_scale)?;
            s.zero_grads();
            Ok(s.weights_digest()?)
        })
        .await
        .map_err(|e| refuse(code::INTERNAL, e.to_string()))?
        .map_err(|e| refuse(code::INTERNAL, e.to_string()))?;
        {
            let mut st = lock(&self.inner.state);
            st.round = None;
            st.counted.clear();
            st.acc_step = a.step + 1;
            st.contexts.retain(|k, _| k.step > a.step);
            st.sent.retain(|k, _| k.step > a.step);
            st.export = None;
        }
        rpc::reply(&Applied {
            run: a.run,
            epoch: a.epoch,
            step: a.step,
            stage: a.stage,
            digest,
        })
    }

    // ---- state --------------------------------------------------------------------------

    async fn export(&self) -> Result<Arc<Export>> {
        let epoch = self.epoch();
        if let Some(e) = lock(&self.inner.state).export.clone()
            && e.epoch == epoch
            && Some(e.step) == self.step()
        {
            return Ok(e);
        }
        let shard = self.inner.shard.clone();
        let e = tokio::task::spawn_blocking(move || -> Result<Export> {
            let g = lock(&shard);
            let s = g.as_ref().ok_or_else(|| Error::Run("no state".into()))?;
            let bytes = s.export_state()?;
            Ok(Export {
                epoch,
                step: s.step(),
                hash: *blake3::hash(&bytes).as_bytes(),
                digest: s.weights_digest()?,
                bytes: Arc::new(bytes),
            })
        })
        .await
        .map_err(|e| Error::Run(e.to_string()))??;
        let e = Arc::new(e);
        lock(&self.inner.state).export = Some(e.clone());
        Ok(e)
    }

    async fn on_fetch_state(
        &self,
        _ctx: RequestCtx,
        body: Vec<u8>,
    ) -> Result<rpc::Reply, RpcError> {
        let f: FetchState = wire::decode_body(&body)?;
        self.check_run(&f.run, f.epoch)?;
        self.check_stage(f.stage)?;
        if self.step() != Some(f.step) {
            return Err(refuse(
                code::BAD_REQUEST,
                "this replica is not at that step",
            ));
        }
        let e = self
            .export()
            .await
            .map_err(|e| refuse(code::INTERNAL, e.to_string()))?;
        let reply = serve_chunk(&f, &e.bytes, e.hash, e.digest)?;
        self.inner
            .stats
            .state_served
            .fetch_add(reply.data.len() as u64, Ordering::Relaxed);
        rpc::reply(&reply)
    }

    async fn on_reload(&self, _ctx: RequestCtx, body: Vec<u8>) -> Result<rpc::Reply, RpcError> {
        let r: Reload = wire::decode_body(&body)?;
        if r.run != self.inner.opts.run {
            return Err(refuse(code::BAD_REQUEST, "another run"));
        }
        self.check_stage(r.stage)?;
        if let Some(digest) = self.reset_in_place(&r).await {
            return rpc::reply(&Applied {
                run: r.run,
                epoch: r.epoch,
                step: r.step,
                stage: r.stage,
                digest,
            });
        }
        let shard = load_state(
            &self.inner.peer,
            &self.inner.opts,
            r.epoch,
            r.step,
            &r.source,
        )
        .await
        .map_err(|e| refuse(code::INTERNAL, format!("reload: {e}")))?;
        let digest = shard
            .weights_digest()
            .map_err(|e| refuse(code::INTERNAL, e.to_string()))?;
        self.install(shard, r.epoch)
            .map_err(|e| refuse(code::INTERNAL, e.to_string()))?;
        rpc::reply(&Applied {
            run: r.run,
            epoch: r.epoch,
            step: r.step,
            stage: r.stage,
            digest,
        })
    }
}

impl StageWorker {
    /// Serves one pipeline, sync or state request of `kind` as the registered handlers do (for
    /// wrappers that filter or observe requests, e.g. fault-injection tests).
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

    /// A `Reload` naming this replica as the source of the state it already holds (same epoch,
    /// step and digest) is a reset of the step's work, done in place without a transfer.
    /// Returns the digest when it was.
    async fn reset_in_place(&self, r: &Reload) -> Option<[u8; 32]> {
        let StateSource::Fetch { from, digest } = &r.source else {
            return None;
        };
        if !from.iter().any(|e| e.peer == self.inner.me)
            || self.epoch() != r.epoch
            || self.step() != Some(r.step)
        {
            return None;
        }
        let mine = self.digest().await.ok().flatten()?;
        if mine != *digest {
            return None;
        }
        self.reset_step();
        tracing::info!(
            stage = self.inner.opts.stage,
            step = r.step,
            "step work reset"
        );
        Some(mine)
    }
}

/// Downloads the state of `stage` at `step` from `from` (tried in order) and verifies it against
/// the stage's agreed weights `digest` ([`crate::state_transfer::fetch_verified`]).
pub async fn fetch_state(
    peer: &PeerShared,
    opts: &StageOptions,
    epoch: u32,
    step: u64,
    from: &[Endpoint],
    digest: [u8; 32],
) -> Result<Shard> {
    let req = StateRequest {
        run: opts.run,
        epoch,
        stage: opts.stage,
        step,
        chunk_bytes: opts.chunk_bytes,
    };
    Ok(fetch_verified(peer, &opts.config, &req, from, digest)
        .await?
        .shard)
}

/// The shard described by `source`: built from the seed (`Init`, step 0) or fetched and verified.
pub async fn load_state(
    peer: &PeerShared,
    opts: &StageOptions,
    epoch: u32,
    step: u64,
    source: &StateSource,
) -> Result<Shard> {
    match source {
        StateSource::Init => {
            if step != 0 {
                return Err(Error::Run(format!(
                    "cannot build step {step} from the seed"
                )));
            }
            let cfg = opts.config.clone();
            let stage = opts.stage;
            tokio::task::spawn_blocking(move || init_shard(&cfg, stage))
                .await
                .map_err(|e| Error::Run(e.to_string()))?
        }
        StateSource::Fetch { from, digest } => {
            fetch_state(peer, opts, epoch, step, from, *digest).await
        }
    }
}

/// Admission attempts of [`join_run`] (each waits up to the trainer's step-boundary wait), with
/// [`ADMIT_RETRY`] between them: about a minute in all, so that a joiner outlasts a restore of
/// every stage from a checkpoint on a loaded machine (30 x 250 ms once ran out in a test under
/// load average 11, leaving the restored stage without a replica).
const ADMIT_TRIES: u32 = 120;
/// Pause between admission attempts.
const ADMIT_RETRY: Duration = Duration::from_millis(500);

/// What [`join_run`] did.
#[derive(Debug)]
pub struct Joined {
    pub worker: StageWorker,
    pub info: RunInfo,
    /// Time to fetch (or build) the stage's state.
    pub sync_time: Duration,
    pub step: u64,
}

/// The stage a joining peer should serve given the run's occupancy: the router's stage choice
/// over a view where every current replica counts with equal capacity.
pub fn choose_stage(info: &RunInfo, config: &RunConfig) -> Result<u32> {
    use swarm_router::{Coord, Link, PeerInfo, PeerKey, PeerState as RState, SwarmView, Workload};
    let num_stages = config.stages.len().saturating_sub(1) as u16;
    let workload = Workload {
        tokens: (config.train.micro_batch_size * config.train.seq_len) as u32,
        hidden: config.model.hidden_size as u32,
        codec_ratio: 1.0,
    };
    let mut view = SwarmView::new(num_stages, workload)?;
    for (s, reps) in info.replicas.iter().enumerate() {
        for p in reps {
            let pi = PeerInfo {
                stages: s as u16..s as u16 + 1,
                compute_tokens_per_s: 10_000.0,
                link: Link {
                    up_bytes_per_s: 1e7,
                    down_bytes_per_s: 1e7,
                    coord: Coord::default(),
                },
                state: RState::Serving,
            };
            // A peer listed twice (serving two stages) keeps its first entry.
            let _ = view.insert(PeerKey(p.0), pi, 0);
        }
    }
    Ok(swarm_router::choose_stages(&view, 1, None)?.start as u32)
}

/// Joins the run served by the trainer at `trainer`: RunInfo (checked against the run id),
/// stage choice (`stage` or [`choose_stage`]), admission, state (built or fetched and verified),
/// then the worker serves and the trainer is told `Ready`.
pub async fn join_run(
    peer: &Peer,
    trainer: SocketAddr,
    stage: Option<u32>,
    tweak: impl FnOnce(&mut StageOptions),
) -> Result<Joined> {
    join_run_within(peer, trainer, stage, None, tweak).await
}

/// [`join_run`] for a peer with `memory` bytes to spare: the stage must fit
/// ([`crate::stage_fit::fitting_stage`]), or joining fails with what each stage needs.
pub async fn join_run_within(
    peer: &Peer,
    trainer: SocketAddr,
    stage: Option<u32>,
    memory: Option<u64>,
    tweak: impl FnOnce(&mut StageOptions),
) -> Result<Joined> {
    let shared = peer.shared();
    let (tid, info): (PeerId, RunInfo) = shared.call(trainer, None, &RunInfoRequest).await?;
    let h = blake3::hash(info.config_toml.as_bytes());
    if h.as_bytes()[..16] != info.run.0 || info.run != peer.run_id() {
        return Err(Error::Run("the run info does not match the run id".into()));
    }
    let config = RunConfig::from_toml(&info.config_toml)?;
    let replicas: Vec<usize> = info.replicas.iter().map(Vec::len).collect();
    let stage = crate::stage_fit::fitting_stage(
        &config,
        &replicas,
        stage,
        || choose_stage(&info, &config),
        memory,
    )?;
    let mut opts = StageOptions::new(info.run, config, stage);
    tweak(&mut opts);
    let worker = StageWorker::start(peer, opts.clone(), None)?;
    let addr = peer
        .local_record()
        .info
        .addrs
        .first()
        .copied()
        .unwrap_or(peer.local_addr());
    // Admission waits for a step boundary; a long step (or a restore in a new epoch) makes the
    // trainer answer BUSY or refuse the old epoch: ask again, boundedly.
    let mut epoch = info.epoch;
    let mut tries = 0;
    let (reply, shard, sync_time) = loop {
        let admit = Admit {
            run: info.run,
            epoch,
            stage,
            addr,
            throughput: 0.0,
        };
        match shared
            .call::<Admit, AdmitReply>(trainer, Some(tid), &admit)
            .await
            .map_err(Error::from)
        {
            Ok((_, reply)) => {
                let t0 = Instant::now();
                match load_state(shared, &opts, reply.epoch, reply.step, &reply.source).await {
                    Ok(shard) => break (reply, shard, t0.elapsed()),
                    // The stage may have no holder left (its last replica died): the trainer
                    // restores the run and serves the state itself; ask again.
                    Err(e) if tries < ADMIT_TRIES => {
                        tracing::info!(error = %e, "state not loaded; asking again");
                        tries += 1;
                        tokio::time::sleep(ADMIT_RETRY).await;
                        let (_, now): (PeerId, RunInfo) =
                            shared.call(trainer, Some(tid), &RunInfoRequest).await?;
                        epoch = now.epoch;
                    }
                    Err(e) => return Err(e),
                }
            }
            // FORBIDDEN is final (a peer banned by an audit); the rest may pass later.
            Err(Error::Remote(r)) if tries < ADMIT_TRIES && r.code != code::FORBIDDEN => {
                tracing::info!(code = r.code, message = %r.message, "admission refused; asking again");
                tries += 1;
                tokio::time::sleep(ADMIT_RETRY).await;
                let (_, now): (PeerId, RunInfo) =
                    shared.call(trainer, Some(tid), &RunInfoRequest).await?;
                epoch = now.epoch;
            }
            Err(e) => return Err(e),
        }
    };
    let digest = shard.weights_digest()?;
    worker.install(shard, reply.epoch)?;
    peer.update_local(|r| r.stages = vec![stage]);
    let ready = Ready {
        run: info.run,
        epoch: reply.epoch,
        stage,
        step: reply.step,
        digest,
        sync_ms: sync_time.as_millis() as u64,
    };
    shared
        .call::<Ready, Ack>(trainer, Some(tid), &ready)
        .await?;
    tracing::info!(
        stage,
        step = reply.step,
        sync_ms = sync_time.as_millis() as u64,
        "joined the run"
    );
    Ok(Joined {
        worker,
        info,
        sync_time,
        step: reply.step,
    })
}

/// Finds the trainer of the run: the first of `candidates` (the bootstrap first, then peers from
/// the view) that answers [`RunInfoRequest`]. `None` when nobody does (a swarm without a run).
pub async fn find_trainer(peer: &Peer, bootstrap: Option<SocketAddr>) -> Option<SocketAddr> {
    let mut candidates: Vec<SocketAddr> = bootstrap.into_iter().collect();
    for e in peer.status().entries.iter().skip(1) {
        for a in &e.record.info.addrs {
            if !candidates.contains(a) {
                candidates.push(*a);
            }
        }
    }
    // Bounded: a handful of candidates, each within the peer's RPC timeout.
    for addr in candidates.into_iter().take(16) {
        match peer
            .shared()
            .call::<RunInfoRequest, RunInfo>(addr, None, &RunInfoRequest)
            .await
        {
            Ok(_) => return Some(addr),
            Err(e) => tracing::debug!(%addr, error = %e, "no run info there"),
        }
    }
    None
}

impl StageWorker {
    /// Graceful leave: tells the trainer, which stops routing new work here, then keeps serving
    /// (in-flight micro-batches, this step's sync and `Apply`, a state hand-off if this is the
    /// stage's last replica) until the trainer releases it at a step boundary (it no longer lists
    /// this peer in `RunInfo`) or `max_wait` passes. Returns whether it was released.
    pub async fn leave(&self, trainer: SocketAddr, max_wait: Duration) -> Result<bool> {
        let msg = crate::protocol::Leave {
            run: self.inner.opts.run,
            epoch: self.epoch(),
        };
        let (tid, reply): (PeerId, crate::protocol::LeaveReply) =
            self.inner.peer.call(trainer, None, &msg).await?;
        if reply.stay_for_step.is_none() {
            return Ok(true);
        }
        let deadline = Instant::now() + max_wait;
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            match self
                .inner
                .peer
                .call::<RunInfoRequest, RunInfo>(trainer, Some(tid), &RunInfoRequest)
                .await
            {
                Ok((_, info)) if !info.replicas.iter().flatten().any(|p| *p == self.inner.me) => {
                    return Ok(true);
                }
                Ok(_) => {}
                // The trainer is gone: nothing is left to hand over.
                Err(e) => {
                    tracing::warn!(error = %e, "trainer unreachable while leaving");
                    return Ok(false);
                }
            }
        }
        Ok(false)
    }
}
