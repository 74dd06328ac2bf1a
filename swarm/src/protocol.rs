//! The training protocol (issue #6): the messages that move activations, gradients, replica-sync
//! shares and stage state between the trainer and stage peers.
//!
//! Every message is a request answered on the same stream (see [`crate::rpc`]). Requests whose
//! only purpose is to deliver something are answered with [`Ack`]; a refusal travels back as an
//! `rpc::RemoteError` (`BUSY` when a stage's context table is full, `BAD_REQUEST` for a stale epoch
//! or an unknown micro-batch). Work is never done while the sender waits longer than it takes to
//! accept it: a Forward is acknowledged once it is queued, and its result travels on as a *new*
//! request to the next hop, so one slow stage never holds a chain of open streams.
//!
//! One micro-batch attempt, `K` stages (route[k] serves stage k):
//!
//! ```text
//! trainer --Forward(hop 0)--> route[0] --Forward(hop 1)--> ... route[K-1] --ForwardOut--> trainer
//! trainer --Backward(stage K-1)--> route[K-1] --Backward--> ... route[0] --BackwardOut--> trainer
//!          each stage that accumulated also sends Counted to the trainer;
//!          a sender whose next hop fails sends HopFailed to the trainer.
//! ```
//!
//! Step boundary, per stage: `SyncStart` (trainer -> every replica), `GradShare` (all-gather between
//! participants), `SyncDone` (participant -> trainer), `Apply` (trainer -> participant, answered by
//! `Applied` with the weights digest). State moves with `FetchState` / `StateChunk`; membership in a
//! run with `RunInfoRequest` / `RunInfo`, `Admit` / `AdmitReply`, `Ready`, `Reload`, `Leave` /
//! `LeaveReply`.
//!
//! Every message carries the run id and the run's *epoch* (incremented on each restore from a
//! checkpoint) so a message from before a restore is refused, never applied to the new state.
//! Tensors travel as compression frames (`swarm_compression::frame`), carried as length-prefixed
//! bytes; the receiver checks a frame's element count against the run config before decoding it.
//!
//! Size caps: a tensor-carrying kind accepts frames of up to [`MAX_FRAME_BYTES`] (a dense fp32 frame
//! of 64 Mi elements plus its header, far above any stage boundary or stage gradient of the
//! models the run config accepts on home links); control messages are capped at a few KiB.

use std::net::SocketAddr;

use crate::identity::PeerId;
use crate::membership::RunId;
use crate::receipt::{Receipt, get_opt_receipt, put_opt_receipt};
use crate::wire::{KindInfo, KindSet, Reader, WireError, WireMessage, Writer};

/// Largest compression frame carried by one message (activations, gradients, grad shares).
pub const MAX_FRAME_BYTES: usize = 256 * 1024 * 1024;
/// Largest route: one hop per stage (stage numbers fit the 64-bit accumulate mask).
pub const MAX_STAGES: usize = 64;
/// Most replicas listed for one stage (RunInfo occupancy, SyncStart participants, state sources).
pub const MAX_REPLICAS: usize = 1024;
/// Largest run config TOML carried in [`RunInfo`].
pub const MAX_CONFIG_BYTES: usize = 64 * 1024;
/// Largest state chunk carried by one [`StateChunk`].
pub const MAX_CHUNK_BYTES: usize = 8 * 1024 * 1024;
/// Longest human-readable reason ([`HopFailed`]).
pub const MAX_REASON_BYTES: usize = 512;
/// Longest export of one stage's state (weights + optimizer moments + step) served by FetchState.
pub const MAX_STATE_BYTES: u64 = 64 * 1024 * 1024 * 1024;

/// Wire overhead allowance of a tensor message besides its frame (ids, route, varints).
const TENSOR_MSG_OVERHEAD: usize = 16 * 1024;

/// Per-kind body caps, the rows of [`KINDS`].
pub mod caps {
    use super::*;
    pub const FORWARD: usize = MAX_FRAME_BYTES + TENSOR_MSG_OVERHEAD;
    pub const FORWARD_OUT: usize = MAX_FRAME_BYTES + TENSOR_MSG_OVERHEAD;
    pub const BACKWARD: usize = MAX_FRAME_BYTES + TENSOR_MSG_OVERHEAD;
    pub const BACKWARD_OUT: usize = MAX_FRAME_BYTES + TENSOR_MSG_OVERHEAD;
    pub const GRAD_SHARE: usize = MAX_FRAME_BYTES + TENSOR_MSG_OVERHEAD;
    pub const STATE_CHUNK: usize = MAX_CHUNK_BYTES + 1024;
    pub const RUN_INFO: usize = MAX_CONFIG_BYTES + MAX_STAGES * 8 + MAX_REPLICAS * 40 + 1024;
    pub const SYNC_START: usize = MAX_REPLICAS * (32 + 10) + 256;
    pub const SMALL: usize = 4 * 1024;
    pub const ADMIT_REPLY: usize = MAX_REPLICAS * 60 + 256;
    pub const RELOAD: usize = MAX_REPLICAS * 60 + 256;
}

/// Training's message kinds: pipeline (30-59) and replica sync and state (60-79).
pub mod kind {
    // Pipeline: see each message's doc for sender and receiver.
    /// Activations into a stage ([`Forward`](super::Forward)).
    pub const FORWARD: u16 = 30;
    /// Last stage's output to the trainer ([`ForwardOut`](super::ForwardOut)).
    pub const FORWARD_OUT: u16 = 31;
    /// Output gradient into a stage ([`Backward`](super::Backward)).
    pub const BACKWARD: u16 = 32;
    /// Stage 0's input gradient to the trainer ([`BackwardOut`](super::BackwardOut)).
    pub const BACKWARD_OUT: u16 = 33;
    /// A stage accumulated a micro-batch ([`Counted`](super::Counted)).
    pub const COUNTED: u16 = 34;
    /// A send to the next hop failed ([`HopFailed`](super::HopFailed)).
    pub const HOP_FAILED: u16 = 35;
    /// Drop an attempt's contexts ([`Abandon`](super::Abandon)).
    pub const ABANDON: u16 = 36;
    /// Empty acknowledgement ([`Ack`](super::Ack)).
    pub const ACK: u16 = 37;
    /// Ask the trainer for the run ([`RunInfoRequest`](super::RunInfoRequest)).
    pub const RUN_INFO: u16 = 38;
    /// The run described ([`RunInfo`](super::RunInfo)).
    pub const RUN_INFO_REPLY: u16 = 39;
    /// Ask to serve a stage ([`Admit`](super::Admit)).
    pub const ADMIT: u16 = 40;
    /// Admission and where to get the state ([`AdmitReply`](super::AdmitReply)).
    pub const ADMIT_REPLY: u16 = 41;
    /// State loaded, serving ([`Ready`](super::Ready)).
    pub const READY: u16 = 42;
    /// Graceful leave announced ([`Leave`](super::Leave)).
    pub const LEAVE: u16 = 43;
    /// When a leaving peer may go ([`LeaveReply`](super::LeaveReply)).
    pub const LEAVE_REPLY: u16 = 44;
    // Replica sync and state.
    /// Start a stage's step-end sync ([`SyncStart`](super::SyncStart)).
    pub const SYNC_START: u16 = 60;
    /// One replica's compressed accumulated gradient ([`GradShare`](super::GradShare)).
    pub const GRAD_SHARE: u16 = 61;
    /// A replica summed all shares ([`SyncDone`](super::SyncDone)).
    pub const SYNC_DONE: u16 = 62;
    /// Run the optimizer step ([`Apply`](super::Apply)).
    pub const APPLY: u16 = 63;
    /// Weights digest after the step ([`Applied`](super::Applied)).
    pub const APPLIED: u16 = 64;
    /// Ask for a chunk of a stage's state ([`FetchState`](super::FetchState)).
    pub const FETCH_STATE: u16 = 65;
    /// A chunk of a stage's state ([`StateChunk`](super::StateChunk)).
    pub const STATE_CHUNK: u16 = 66;
    /// Replace a replica's state ([`Reload`](super::Reload)).
    pub const RELOAD: u16 = 67;
}

/// Training's kind numbers, names and caps, registered on every peer that serves or calls them.
pub const KINDS: KindSet = KindSet {
    layer: "training",
    first: 30,
    last: 79,
    kinds: &[
        KindInfo::new(kind::FORWARD, "forward", caps::FORWARD),
        KindInfo::new(kind::FORWARD_OUT, "forward_out", caps::FORWARD_OUT),
        KindInfo::new(kind::BACKWARD, "backward", caps::BACKWARD),
        KindInfo::new(kind::BACKWARD_OUT, "backward_out", caps::BACKWARD_OUT),
        KindInfo::new(kind::COUNTED, "counted", caps::SMALL),
        KindInfo::new(kind::HOP_FAILED, "hop_failed", caps::SMALL),
        KindInfo::new(kind::ABANDON, "abandon", caps::SMALL),
        KindInfo::new(kind::ACK, "ack", 0),
        KindInfo::new(kind::RUN_INFO, "run_info", 0),
        KindInfo::new(kind::RUN_INFO_REPLY, "run_info_reply", caps::RUN_INFO),
        KindInfo::new(kind::ADMIT, "admit", caps::SMALL),
        KindInfo::new(kind::ADMIT_REPLY, "admit_reply", caps::ADMIT_REPLY),
        KindInfo::new(kind::READY, "ready", caps::SMALL),
        KindInfo::new(kind::LEAVE, "leave", caps::SMALL),
        KindInfo::new(kind::LEAVE_REPLY, "leave_reply", 64),
        KindInfo::new(kind::SYNC_START, "sync_start", caps::SYNC_START),
        KindInfo::new(kind::GRAD_SHARE, "grad_share", caps::GRAD_SHARE),
        KindInfo::new(kind::SYNC_DONE, "sync_done", caps::SMALL),
        KindInfo::new(kind::APPLY, "apply", caps::SMALL),
        KindInfo::new(kind::APPLIED, "applied", caps::SMALL),
        KindInfo::new(kind::FETCH_STATE, "fetch_state", caps::SMALL),
        KindInfo::new(kind::STATE_CHUNK, "state_chunk", caps::STATE_CHUNK),
        KindInfo::new(kind::RELOAD, "reload", caps::RELOAD),
    ],
};

// ---------------------------------------------------------------------------------------------
// Shared pieces

/// Identifies one attempt of one micro-batch: contexts on stage peers are keyed by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MbKey {
    pub step: u64,
    /// Micro-batch index within the step.
    pub mb: u32,
    /// Retry number of this micro-batch (0 first).
    pub attempt: u32,
}

/// A peer and an address to reach it at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub peer: PeerId,
    pub addr: SocketAddr,
}

/// One hop of a route: the replica chosen for `stage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Hop {
    pub stage: u32,
    pub peer: PeerId,
    pub addr: SocketAddr,
}

impl Hop {
    pub fn endpoint(&self) -> Endpoint {
        Endpoint {
            peer: self.peer,
            addr: self.addr,
        }
    }
}

/// Tensor bytes of the earlier hops of one pass (forward or backward) of one micro-batch attempt:
/// frames as sent (`wire`) and what fp32 would have needed (`dense`). Each hop adds its own frame
/// before passing it on, so the trainer learns what crossed every link of the route, including
/// the stage-to-stage links it does not see: a pass's total is the `upstream` of the message that
/// reaches the trainer plus that message's frame (the trainer's own first frame is in `upstream`,
/// so it must not count it again).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Traffic {
    pub wire: u64,
    pub dense: u64,
}

impl Traffic {
    /// This traffic plus one frame of `wire` bytes standing for `elements` fp32 values.
    pub fn plus_frame(self, wire: usize, elements: usize) -> Traffic {
        Traffic {
            wire: self.wire.saturating_add(wire as u64),
            dense: self.dense.saturating_add(4 * elements as u64),
        }
    }
}

fn put_traffic(w: &mut Writer, t: &Traffic) {
    w.varint(t.wire).varint(t.dense);
}

fn get_traffic(r: &mut Reader<'_>) -> Result<Traffic, WireError> {
    Ok(Traffic {
        wire: r.varint()?,
        dense: r.varint()?,
    })
}

fn put_run(w: &mut Writer, run: &RunId, epoch: u32) {
    w.array(&run.0).u32(epoch);
}

fn get_run(r: &mut Reader<'_>) -> Result<(RunId, u32), WireError> {
    Ok((RunId(r.array()?), r.u32()?))
}

fn put_key(w: &mut Writer, k: &MbKey) {
    w.varint(k.step).u32(k.mb).u32(k.attempt);
}

fn get_key(r: &mut Reader<'_>) -> Result<MbKey, WireError> {
    Ok(MbKey {
        step: r.varint()?,
        mb: r.u32()?,
        attempt: r.u32()?,
    })
}

fn put_endpoint(w: &mut Writer, e: &Endpoint) {
    w.array(&e.peer.0);
    w.socket_addr(&e.addr);
}

fn get_endpoint(r: &mut Reader<'_>) -> Result<Endpoint, WireError> {
    Ok(Endpoint {
        peer: PeerId(r.array()?),
        addr: r.socket_addr()?,
    })
}

fn put_endpoints(w: &mut Writer, v: &[Endpoint]) {
    w.len_prefix(v.len());
    for e in v {
        put_endpoint(w, e);
    }
}

fn get_endpoints(r: &mut Reader<'_>, what: &'static str) -> Result<Vec<Endpoint>, WireError> {
    // An endpoint is at least 32 + 1 + 4 + 2 bytes.
    let n = r.len(what, MAX_REPLICAS, 39)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(get_endpoint(r)?);
    }
    Ok(out)
}

fn put_peers(w: &mut Writer, v: &[PeerId]) {
    w.len_prefix(v.len());
    for p in v {
        w.array(&p.0);
    }
}

fn get_peers(r: &mut Reader<'_>, what: &'static str) -> Result<Vec<PeerId>, WireError> {
    let n = r.len(what, MAX_REPLICAS, 32)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(PeerId(r.array()?));
    }
    Ok(out)
}

fn get_stage(r: &mut Reader<'_>) -> Result<u32, WireError> {
    let s = r.u32()?;
    if s as usize >= MAX_STAGES {
        return Err(WireError::Invalid("stage index beyond MAX_STAGES"));
    }
    Ok(s)
}

fn get_frame(r: &mut Reader<'_>, what: &'static str) -> Result<Vec<u8>, WireError> {
    Ok(r.bytes(what, MAX_FRAME_BYTES)?.to_vec())
}

fn get_finite(r: &mut Reader<'_>, what: &'static str) -> Result<f64, WireError> {
    let v = r.f64()?;
    if !v.is_finite() {
        return Err(WireError::Invalid(what));
    }
    Ok(v)
}

// ---------------------------------------------------------------------------------------------
// Pipeline (kinds 30-59)

/// Empty acknowledgement: the reply to every request whose only job is to deliver something
/// (Forward, ForwardOut, Backward, BackwardOut, Counted, HopFailed, Abandon, Ready, SyncStart,
/// GradShare, SyncDone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ack;

impl WireMessage for Ack {
    const INFO: &'static KindInfo = KINDS.row(kind::ACK);
    fn encode(&self, _w: &mut Writer) {}
    fn decode(_r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(Ack)
    }
}

/// Activations entering stage `route[hop].stage`.
///
/// Sender: the trainer (hop 0, embedding output) or the stage peer of `route[hop - 1]`.
/// Receiver: the peer `route[hop].peer`. It runs the stage forward, keeps the context under
/// (`key`, stage) for the backward, then sends `Forward` with `hop + 1` to the next hop, or
/// [`ForwardOut`] to `trainer` after the last stage. If that send fails it reports [`HopFailed`].
/// `accumulate` bit `s` says whether stage `s` adds this micro-batch's parameter gradients to its
/// accumulator on backward (off for stages that already counted this micro-batch on an earlier
/// attempt). Reply: [`Ack`] once queued, or `BUSY` when the context table is full.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub run: RunId,
    pub epoch: u32,
    pub key: MbKey,
    /// One hop per stage, in stage order (`route[i].stage == i`).
    pub route: Vec<Hop>,
    /// Index into `route` of the receiver.
    pub hop: u32,
    /// Where results and reports go.
    pub trainer: Endpoint,
    /// Bit `s`: stage `s` accumulates parameter gradients for this attempt.
    pub accumulate: u64,
    /// The activations, a compression frame of shape `[batch, seq, hidden]`.
    /// Tensor bytes sent by the earlier hops of this pass (not counting this message's frame).
    pub upstream: Traffic,
    pub activations: Vec<u8>,
    /// The sending stage peer's signed forward receipt for `activations` (`None` from the
    /// trainer, which is trusted and hashes what it sends itself).
    pub receipt: Option<Receipt>,
}

impl Forward {
    /// Whether stage `stage` accumulates on this attempt.
    pub fn accumulates(&self, stage: u32) -> bool {
        stage < 64 && self.accumulate & (1u64 << stage) != 0
    }
}

impl WireMessage for Forward {
    const INFO: &'static KindInfo = KINDS.row(kind::FORWARD);
    fn encode(&self, w: &mut Writer) {
        put_run(w, &self.run, self.epoch);
        put_key(w, &self.key);
        w.len_prefix(self.route.len());
        for h in &self.route {
            w.u32(h.stage).array(&h.peer.0);
            w.socket_addr(&h.addr);
        }
        w.u32(self.hop);
        put_endpoint(w, &self.trainer);
        w.u64(self.accumulate);
        put_traffic(w, &self.upstream);
        w.bytes(&self.activations);
        put_opt_receipt(w, &self.receipt);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let (run, epoch) = get_run(r)?;
        let key = get_key(r)?;
        let n = r.len("route", MAX_STAGES, 4 + 32 + 7)?;
        if n == 0 {
            return Err(WireError::Invalid("empty route"));
        }
        let mut route = Vec::with_capacity(n);
        for i in 0..n {
            let stage = get_stage(r)?;
            if stage as usize != i {
                return Err(WireError::Invalid("route hops out of stage order"));
            }
            route.push(Hop {
                stage,
                peer: PeerId(r.array()?),
                addr: r.socket_addr()?,
            });
        }
        let hop = r.u32()?;
        if hop as usize >= route.len() {
            return Err(WireError::Invalid("hop index beyond the route"));
        }
        Ok(Forward {
            run,
            epoch,
            key,
            route,
            hop,
            trainer: get_endpoint(r)?,
            accumulate: r.u64()?,
            upstream: get_traffic(r)?,
            activations: get_frame(r, "activations")?,
            receipt: get_opt_receipt(r)?,
        })
    }
}

/// Output of the last stage.
///
/// Sender: the peer of the route's last hop. Receiver: the trainer, which runs the head forward
/// (loss) and backward and starts the backward pass with [`Backward`]. Reply: [`Ack`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardOut {
    pub run: RunId,
    pub epoch: u32,
    pub key: MbKey,
    /// The stage that produced it (the last one).
    pub stage: u32,
    /// Tensor bytes sent by the earlier hops of this pass (not counting this message's frame).
    pub upstream: Traffic,
    pub activations: Vec<u8>,
    /// The sender's signed forward receipt for `activations`.
    pub receipt: Option<Receipt>,
}

impl WireMessage for ForwardOut {
    const INFO: &'static KindInfo = KINDS.row(kind::FORWARD_OUT);
    fn encode(&self, w: &mut Writer) {
        put_run(w, &self.run, self.epoch);
        put_key(w, &self.key);
        w.u32(self.stage);
        put_traffic(w, &self.upstream);
        w.bytes(&self.activations);
        put_opt_receipt(w, &self.receipt);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let (run, epoch) = get_run(r)?;
        Ok(ForwardOut {
            run,
            epoch,
            key: get_key(r)?,
            stage: get_stage(r)?,
            upstream: get_traffic(r)?,
            activations: get_frame(r, "activations")?,
            receipt: get_opt_receipt(r)?,
        })
    }
}

/// Gradient of the loss with respect to the output of `stage`.
///
/// Sender: the trainer (to the last stage's peer on the route) or the peer of stage `stage + 1`.
/// Receiver: the peer holding the context of (`key`, `stage`) from the Forward. It runs the stage
/// backward (accumulating parameter gradients if the Forward said so, then sending [`Counted`]),
/// drops the context and passes the input gradient on: `Backward` to the route's hop `stage - 1`,
/// or [`BackwardOut`] to the trainer from stage 0. Reply: [`Ack`] once queued, or `BAD_REQUEST`
/// when no context exists (abandoned, or never seen).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backward {
    pub run: RunId,
    pub epoch: u32,
    pub key: MbKey,
    pub stage: u32,
    /// Tensor bytes sent by the earlier hops of this pass (not counting this message's frame).
    pub upstream: Traffic,
    pub grad: Vec<u8>,
    /// The sending stage peer's signed backward receipt for `grad` (`None` from the trainer).
    pub receipt: Option<Receipt>,
}

impl WireMessage for Backward {
    const INFO: &'static KindInfo = KINDS.row(kind::BACKWARD);
    fn encode(&self, w: &mut Writer) {
        put_run(w, &self.run, self.epoch);
        put_key(w, &self.key);
        w.u32(self.stage);
        put_traffic(w, &self.upstream);
        w.bytes(&self.grad);
        put_opt_receipt(w, &self.receipt);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let (run, epoch) = get_run(r)?;
        Ok(Backward {
            run,
            epoch,
            key: get_key(r)?,
            stage: get_stage(r)?,
            upstream: get_traffic(r)?,
            grad: get_frame(r, "gradient")?,
            receipt: get_opt_receipt(r)?,
        })
    }
}

/// Gradient with respect to stage 0's input (the embedding output).
///
/// Sender: the peer of stage 0. Receiver: the trainer, which runs the embedding backward; the
/// micro-batch attempt is then finished. Reply: [`Ack`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackwardOut {
    pub run: RunId,
    pub epoch: u32,
    pub key: MbKey,
    /// Tensor bytes sent by the earlier hops of this pass (not counting this message's frame).
    pub upstream: Traffic,
    pub grad: Vec<u8>,
    /// The sender's signed backward receipt for `grad`.
    pub receipt: Option<Receipt>,
}

impl WireMessage for BackwardOut {
    const INFO: &'static KindInfo = KINDS.row(kind::BACKWARD_OUT);
    fn encode(&self, w: &mut Writer) {
        put_run(w, &self.run, self.epoch);
        put_key(w, &self.key);
        put_traffic(w, &self.upstream);
        w.bytes(&self.grad);
        put_opt_receipt(w, &self.receipt);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let (run, epoch) = get_run(r)?;
        Ok(BackwardOut {
            run,
            epoch,
            key: get_key(r)?,
            upstream: get_traffic(r)?,
            grad: get_frame(r, "gradient")?,
            receipt: get_opt_receipt(r)?,
        })
    }
}

/// A stage peer added micro-batch `key.mb`'s parameter gradients to its accumulator for `stage`.
///
/// Sender: the stage peer (the replica is the TLS-proven sender), right after the accumulating
/// backward. Receiver: the trainer, which records `counted[mb][stage] = sender`. Reply: [`Ack`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counted {
    pub run: RunId,
    pub epoch: u32,
    pub key: MbKey,
    pub stage: u32,
}

impl WireMessage for Counted {
    const INFO: &'static KindInfo = KINDS.row(kind::COUNTED);
    fn encode(&self, w: &mut Writer) {
        put_run(w, &self.run, self.epoch);
        put_key(w, &self.key);
        w.u32(self.stage);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let (run, epoch) = get_run(r)?;
        Ok(Counted {
            run,
            epoch,
            key: get_key(r)?,
            stage: get_stage(r)?,
        })
    }
}

/// Sending to the next hop of attempt `key` failed (connection, timeout or refusal).
///
/// Sender: the stage peer that could not deliver a Forward/Backward/ForwardOut. Receiver: the
/// trainer, which bans or suspects `failed` and retries the micro-batch. Reply: [`Ack`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HopFailed {
    pub run: RunId,
    pub epoch: u32,
    pub key: MbKey,
    pub failed: PeerId,
    /// Whether the next hop answered BUSY (overloaded, alive) rather than failing.
    pub busy: bool,
    pub reason: String,
    /// Tensor bytes of this attempt's failed pass known to have crossed the network: the
    /// upstream of the message the reporter got, its frame, and the reporter's own frame when
    /// the next hop received it (refused it). The trainer counts them: failed attempts use
    /// the links too.
    pub traffic: Traffic,
}

impl WireMessage for HopFailed {
    const INFO: &'static KindInfo = KINDS.row(kind::HOP_FAILED);
    fn encode(&self, w: &mut Writer) {
        put_run(w, &self.run, self.epoch);
        put_key(w, &self.key);
        w.array(&self.failed.0).bool(self.busy);
        w.str(truncate(&self.reason, MAX_REASON_BYTES));
        put_traffic(w, &self.traffic);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let (run, epoch) = get_run(r)?;
        Ok(HopFailed {
            run,
            epoch,
            key: get_key(r)?,
            failed: PeerId(r.array()?),
            busy: r.bool()?,
            reason: r.str("reason", MAX_REASON_BYTES)?.to_owned(),
            traffic: get_traffic(r)?,
        })
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Drop the contexts of attempt `key` (all stages this peer serves); best effort.
///
/// Sender: the trainer, when it gives up on an attempt. Receiver: every peer of that attempt's
/// route. Reply: [`Ack`] (also when nothing was held). `uncounted` says which of the attempt's
/// passes no message told the trainer about ([`Abandon::FORWARD`], [`Abandon::BACKWARD`]): the
/// receiver reports the frames it sent in those passes with its next [`SyncDone`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Abandon {
    pub run: RunId,
    pub epoch: u32,
    pub key: MbKey,
    pub uncounted: u8,
}

impl Abandon {
    /// The forward pass's frames are not counted yet.
    pub const FORWARD: u8 = 1;
    /// The backward pass's frames are not counted yet.
    pub const BACKWARD: u8 = 2;
}

impl WireMessage for Abandon {
    const INFO: &'static KindInfo = KINDS.row(kind::ABANDON);
    fn encode(&self, w: &mut Writer) {
        put_run(w, &self.run, self.epoch);
        put_key(w, &self.key);
        w.u8(self.uncounted);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let (run, epoch) = get_run(r)?;
        let key = get_key(r)?;
        let uncounted = r.u8()?;
        if uncounted & !(Abandon::FORWARD | Abandon::BACKWARD) != 0 {
            return Err(WireError::BadTag {
                what: "abandon passes",
                tag: uncounted as u64,
            });
        }
        Ok(Abandon {
            run,
            epoch,
            key,
            uncounted,
        })
    }
}

/// Asks for the run a peer serves. Sender: a joining peer. Receiver: the trainer. Reply: [`RunInfo`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RunInfoRequest;

impl WireMessage for RunInfoRequest {
    const INFO: &'static KindInfo = KINDS.row(kind::RUN_INFO);
    fn encode(&self, _w: &mut Writer) {}
    fn decode(_r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(RunInfoRequest)
    }
}

/// Where the run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunPhase {
    /// Steps are running.
    Running,
    /// Waiting for a peer to take a stage that has no replica left.
    Paused,
    /// All steps are done.
    Finished,
}

impl RunPhase {
    fn tag(self) -> u8 {
        match self {
            RunPhase::Running => 0,
            RunPhase::Paused => 1,
            RunPhase::Finished => 2,
        }
    }
    fn from_tag(t: u8) -> Result<RunPhase, WireError> {
        Ok(match t {
            0 => RunPhase::Running,
            1 => RunPhase::Paused,
            2 => RunPhase::Finished,
            t => {
                return Err(WireError::BadTag {
                    what: "run phase",
                    tag: t as u64,
                });
            }
        })
    }
}

/// The run, as its trainer describes it to a joining peer.
///
/// Sender: the trainer, in reply to [`RunInfoRequest`]. Receiver: a joining peer, which parses
/// `config_toml` (the run id is BLAKE3 of it, so the peer can check it), picks a stage from
/// `replicas` with the router's stage choice and asks for [`Admit`].
#[derive(Debug, Clone, PartialEq)]
pub struct RunInfo {
    pub run: RunId,
    pub epoch: u32,
    /// The next step to run (steps `0..step` are done).
    pub step: u64,
    pub phase: RunPhase,
    /// The run config (TOML) as the run id was computed from.
    pub config_toml: String,
    /// The trainer's endpoint (for results and reports).
    pub trainer: Endpoint,
    /// Replicas serving each stage (`replicas[s]` for stage `s`; length = number of stages).
    pub replicas: Vec<Vec<PeerId>>,
}

impl WireMessage for RunInfo {
    const INFO: &'static KindInfo = KINDS.row(kind::RUN_INFO_REPLY);
    fn encode(&self, w: &mut Writer) {
        put_run(w, &self.run, self.epoch);
        w.varint(self.step)
            .u8(self.phase.tag())
            .str(&self.config_toml);
        put_endpoint(w, &self.trainer);
        w.len_prefix(self.replicas.len());
        for s in &self.replicas {
            put_peers(w, s);
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let (run, epoch) = get_run(r)?;
        let step = r.varint()?;
        let phase = RunPhase::from_tag(r.u8()?)?;
        let config_toml = r.str("config", MAX_CONFIG_BYTES)?.to_owned();
        let trainer = get_endpoint(r)?;
        let n = r.len("stages", MAX_STAGES, 1)?;
        let mut replicas = Vec::with_capacity(n);
        let mut total = 0usize;
        for _ in 0..n {
            let s = get_peers(r, "replicas")?;
            total += s.len();
            if total > MAX_REPLICAS {
                return Err(WireError::TooLong {
                    what: "replicas",
                    len: total as u64,
                    max: MAX_REPLICAS as u64,
                });
            }
            replicas.push(s);
        }
        Ok(RunInfo {
            run,
            epoch,
            step,
            phase,
            config_toml,
            trainer,
            replicas,
        })
    }
}

/// Asks to serve `stage`.
///
/// Sender: a joining peer, after [`RunInfo`]. Receiver: the trainer, which admits it at the next
/// step boundary. Reply: [`AdmitReply`], or `BAD_REQUEST` for a stage the run does not have.
#[derive(Debug, Clone, PartialEq)]
pub struct Admit {
    pub run: RunId,
    pub epoch: u32,
    pub stage: u32,
    /// Where the peer serves (its announced address).
    pub addr: SocketAddr,
    /// Measured forward+backward throughput of this stage, micro-batches per second (0: unknown).
    pub throughput: f64,
}

impl WireMessage for Admit {
    const INFO: &'static KindInfo = KINDS.row(kind::ADMIT);
    fn encode(&self, w: &mut Writer) {
        put_run(w, &self.run, self.epoch);
        w.u32(self.stage);
        w.socket_addr(&self.addr);
        w.f64(self.throughput);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let (run, epoch) = get_run(r)?;
        let stage = get_stage(r)?;
        let addr = r.socket_addr()?;
        let throughput = get_finite(r, "throughput is not finite")?;
        if throughput < 0.0 {
            return Err(WireError::Invalid("negative throughput"));
        }
        Ok(Admit {
            run,
            epoch,
            stage,
            addr,
            throughput,
        })
    }
}

/// Where a stage's state comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateSource {
    /// Build the shard from the run seed (step 0, no state anywhere yet).
    Init,
    /// Fetch with [`FetchState`] from one of `from` (current replicas, or the trainer after a
    /// restore); the result must have weights digest `digest`.
    Fetch {
        from: Vec<Endpoint>,
        digest: [u8; 32],
    },
}

fn put_source(w: &mut Writer, s: &StateSource) {
    match s {
        StateSource::Init => {
            w.u8(0);
        }
        StateSource::Fetch { from, digest } => {
            w.u8(1);
            put_endpoints(w, from);
            w.array(digest);
        }
    }
}

fn get_source(r: &mut Reader<'_>) -> Result<StateSource, WireError> {
    match r.u8()? {
        0 => Ok(StateSource::Init),
        1 => {
            let from = get_endpoints(r, "state sources")?;
            if from.is_empty() {
                return Err(WireError::Invalid("fetch with no source"));
            }
            Ok(StateSource::Fetch {
                from,
                digest: r.array()?,
            })
        }
        t => Err(WireError::BadTag {
            what: "state source",
            tag: t as u64,
        }),
    }
}

/// Admission granted: load the state of `stage` as of the start of step `step`, then send
/// [`Ready`]. The trainer holds step `step` until the peer is ready (bounded wait).
///
/// Sender: the trainer, in reply to [`Admit`]. Receiver: the joining peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmitReply {
    pub run: RunId,
    pub epoch: u32,
    pub stage: u32,
    /// The step the loaded state must be at (optimizer steps applied so far).
    pub step: u64,
    pub source: StateSource,
}

impl WireMessage for AdmitReply {
    const INFO: &'static KindInfo = KINDS.row(kind::ADMIT_REPLY);
    fn encode(&self, w: &mut Writer) {
        put_run(w, &self.run, self.epoch);
        w.u32(self.stage).varint(self.step);
        put_source(w, &self.source);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let (run, epoch) = get_run(r)?;
        Ok(AdmitReply {
            run,
            epoch,
            stage: get_stage(r)?,
            step: r.varint()?,
            source: get_source(r)?,
        })
    }
}

/// The peer holds the state of `stage` at `step` with weights digest `digest` and serves it.
///
/// Sender: a joined (or reloaded) peer. Receiver: the trainer, which routes to it from the next
/// step on (and counts a digest mismatch if `digest` is not the stage's). Reply: [`Ack`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ready {
    pub run: RunId,
    pub epoch: u32,
    pub stage: u32,
    pub step: u64,
    pub digest: [u8; 32],
    /// How long fetching (or building) the state took, in milliseconds.
    pub sync_ms: u64,
}

impl WireMessage for Ready {
    const INFO: &'static KindInfo = KINDS.row(kind::READY);
    fn encode(&self, w: &mut Writer) {
        put_run(w, &self.run, self.epoch);
        w.u32(self.stage)
            .varint(self.step)
            .array(&self.digest)
            .varint(self.sync_ms);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let (run, epoch) = get_run(r)?;
        Ok(Ready {
            run,
            epoch,
            stage: get_stage(r)?,
            step: r.varint()?,
            digest: r.array()?,
            sync_ms: r.varint()?,
        })
    }
}

/// The peer is leaving gracefully (Ctrl-C). Sender: a stage peer. Receiver: the trainer, which
/// stops routing new micro-batches to it. Reply: [`LeaveReply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leave {
    pub run: RunId,
    pub epoch: u32,
}

impl WireMessage for Leave {
    const INFO: &'static KindInfo = KINDS.row(kind::LEAVE);
    fn encode(&self, w: &mut Writer) {
        put_run(w, &self.run, self.epoch);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let (run, epoch) = get_run(r)?;
        Ok(Leave { run, epoch })
    }
}

/// When a leaving peer may go. Sender: the trainer, in reply to [`Leave`]. Receiver: the leaving
/// peer: with `stay_for_step = Some(s)` it finishes its in-flight work and takes part in step
/// `s`'s sync (until `Apply` of `s`, bounded wait) before exiting; with `None` it may go now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaveReply {
    pub stay_for_step: Option<u64>,
}

impl WireMessage for LeaveReply {
    const INFO: &'static KindInfo = KINDS.row(kind::LEAVE_REPLY);
    fn encode(&self, w: &mut Writer) {
        match self.stay_for_step {
            None => {
                w.u8(0);
            }
            Some(s) => {
                w.u8(1).varint(s);
            }
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let stay_for_step = match r.u8()? {
            0 => None,
            1 => Some(r.varint()?),
            t => {
                return Err(WireError::BadTag {
                    what: "leave reply",
                    tag: t as u64,
                });
            }
        };
        Ok(LeaveReply { stay_for_step })
    }
}

// ---------------------------------------------------------------------------------------------
// Replica sync and state (kinds 60-79)

/// Starts the step-end sync of `stage`. Ends every context of step `step` on the receiver.
///
/// Sender: the trainer, when every micro-batch of the step is complete. Receiver: every replica of
/// `stage`. A participant (listed in `participants`) sends its [`GradShare`] to every other
/// participant, decodes all shares in participant order, sums them and reports [`SyncDone`]. A
/// non-participant drops its accumulator (it will re-sync its weights). `mb_counts[i]` is how many
/// micro-batches participant `i` counted (checked against the receiver's own count). Reply: [`Ack`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncStart {
    pub run: RunId,
    pub epoch: u32,
    pub step: u64,
    pub stage: u32,
    /// Which sync of `stage` in `step` this is (0 first; the trainer bumps it when it redoes the
    /// stage's sync after losing a participant), so shares of a dropped round are told apart.
    pub round: u32,
    pub participants: Vec<PeerId>,
    pub mb_counts: Vec<u32>,
    /// Endpoints of the participants, same order (to send shares to).
    pub addrs: Vec<SocketAddr>,
}

impl WireMessage for SyncStart {
    const INFO: &'static KindInfo = KINDS.row(kind::SYNC_START);
    fn encode(&self, w: &mut Writer) {
        put_run(w, &self.run, self.epoch);
        w.varint(self.step).u32(self.stage).u32(self.round);
        put_peers(w, &self.participants);
        for c in &self.mb_counts {
            w.u32(*c);
        }
        for a in &self.addrs {
            w.socket_addr(a);
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let (run, epoch) = get_run(r)?;
        let step = r.varint()?;
        let stage = get_stage(r)?;
        let round = r.u32()?;
        let participants = get_peers(r, "participants")?;
        let n = participants.len();
        if n * 4 > r.remaining() {
            return Err(WireError::Truncated {
                need: n * 4,
                have: r.remaining(),
            });
        }
        let mut mb_counts = Vec::with_capacity(n);
        for _ in 0..n {
            mb_counts.push(r.u32()?);
        }
        let mut addrs = Vec::with_capacity(n);
        for _ in 0..n {
            addrs.push(r.socket_addr()?);
        }
        for (i, p) in participants.iter().enumerate() {
            if participants[..i].contains(p) {
                return Err(WireError::Invalid("duplicate sync participant"));
            }
        }
        Ok(SyncStart {
            run,
            epoch,
            step,
            stage,
            round,
            participants,
            mb_counts,
            addrs,
        })
    }
}

/// One participant's accumulated gradient of `stage` for step `step`, encoded with the run's sync
/// codec and the sender's error-feedback state.
///
/// Sender: participant `from` (also the TLS-proven sender). Receiver: every other participant of
/// the same sync. Reply: [`Ack`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GradShare {
    pub run: RunId,
    pub epoch: u32,
    pub step: u64,
    pub stage: u32,
    /// The [`SyncStart::round`] the share belongs to: a receiver drops shares of another round.
    pub round: u32,
    pub from: PeerId,
    pub frame: Vec<u8>,
}

impl WireMessage for GradShare {
    const INFO: &'static KindInfo = KINDS.row(kind::GRAD_SHARE);
    fn encode(&self, w: &mut Writer) {
        put_run(w, &self.run, self.epoch);
        w.varint(self.step)
            .u32(self.stage)
            .u32(self.round)
            .array(&self.from.0);
        w.bytes(&self.frame);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let (run, epoch) = get_run(r)?;
        Ok(GradShare {
            run,
            epoch,
            step: r.varint()?,
            stage: get_stage(r)?,
            round: r.u32()?,
            from: PeerId(r.array()?),
            frame: get_frame(r, "grad share")?,
        })
    }
}

/// A participant has summed every share of the sync and set its gradients.
///
/// Sender: a participant. Receiver: the trainer, which checks that the replicas of the stage agree
/// bitwise on `grad_sq_norm` (and `grad_digest`), computes the global norm and sends [`Apply`].
/// Reply: [`Ack`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SyncDone {
    pub run: RunId,
    pub epoch: u32,
    pub step: u64,
    pub stage: u32,
    /// Sum of squares of the summed gradient (before clipping).
    pub grad_sq_norm: f64,
    /// BLAKE3 of the summed gradient's f32 bytes (replicas must agree).
    pub grad_digest: [u8; 32],
    /// Wire bytes of the shares this participant sent (frames only) and their fp32 size: this
    /// round's, plus those of earlier rounds that were dropped unreported and reached their
    /// receiver.
    pub share_bytes: u64,
    pub share_dense_bytes: u64,
    /// Frames this participant sent in passes of abandoned attempts that the trainer had no
    /// report of (see [`Abandon::uncounted`]), since its last `SyncDone`: activations, gradients.
    pub abandoned_activations: Traffic,
    pub abandoned_gradients: Traffic,
}

impl WireMessage for SyncDone {
    const INFO: &'static KindInfo = KINDS.row(kind::SYNC_DONE);
    fn encode(&self, w: &mut Writer) {
        put_run(w, &self.run, self.epoch);
        w.varint(self.step)
            .u32(self.stage)
            .f64(self.grad_sq_norm)
            .array(&self.grad_digest)
            .varint(self.share_bytes)
            .varint(self.share_dense_bytes);
        put_traffic(w, &self.abandoned_activations);
        put_traffic(w, &self.abandoned_gradients);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let (run, epoch) = get_run(r)?;
        let step = r.varint()?;
        let stage = get_stage(r)?;
        // A non-finite norm is legal here: the trainer must see it to skip the step.
        let grad_sq_norm = r.f64()?;
        Ok(SyncDone {
            run,
            epoch,
            step,
            stage,
            grad_sq_norm,
            grad_digest: r.array()?,
            share_bytes: r.varint()?,
            share_dense_bytes: r.varint()?,
            abandoned_activations: get_traffic(r)?,
            abandoned_gradients: get_traffic(r)?,
        })
    }
}

/// Apply the optimizer step with the summed gradients.
///
/// Sender: the trainer, after every stage's [`SyncDone`]. Receiver: every participant of the sync
/// of `stage`. It runs `optimizer_step(hp, lr, clip_scale)`, zeroes its gradients and replies
/// [`Applied`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Apply {
    pub run: RunId,
    pub epoch: u32,
    pub step: u64,
    pub stage: u32,
    pub lr: f64,
    pub clip_scale: f64,
}

impl WireMessage for Apply {
    const INFO: &'static KindInfo = KINDS.row(kind::APPLY);
    fn encode(&self, w: &mut Writer) {
        put_run(w, &self.run, self.epoch);
        w.varint(self.step)
            .u32(self.stage)
            .f64(self.lr)
            .f64(self.clip_scale);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let (run, epoch) = get_run(r)?;
        let step = r.varint()?;
        let stage = get_stage(r)?;
        let lr = get_finite(r, "learning rate is not finite")?;
        let clip_scale = get_finite(r, "clip scale is not finite")?;
        if lr < 0.0 || !(0.0..=1.0).contains(&clip_scale) {
            return Err(WireError::Invalid(
                "learning rate or clip scale out of range",
            ));
        }
        Ok(Apply {
            run,
            epoch,
            step,
            stage,
            lr,
            clip_scale,
        })
    }
}

/// The optimizer step was applied: the replica's weights digest after step `step`.
///
/// Sender: a participant, in reply to [`Apply`] (or a reloaded peer, in reply to [`Reload`]).
/// Receiver: the trainer, which compares the digests of a stage's replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub run: RunId,
    pub epoch: u32,
    pub step: u64,
    pub stage: u32,
    pub digest: [u8; 32],
}

impl WireMessage for Applied {
    const INFO: &'static KindInfo = KINDS.row(kind::APPLIED);
    fn encode(&self, w: &mut Writer) {
        put_run(w, &self.run, self.epoch);
        w.varint(self.step).u32(self.stage).array(&self.digest);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let (run, epoch) = get_run(r)?;
        Ok(Applied {
            run,
            epoch,
            step: r.varint()?,
            stage: get_stage(r)?,
            digest: r.array()?,
        })
    }
}

/// Asks for a chunk of `stage`'s exported state (weights, optimizer moments, step).
///
/// Sender: a joining or re-syncing peer, or the trainer (checkpoints). Receiver: a replica of the
/// stage, or the trainer (serving a restored checkpoint). Reply: [`StateChunk`] of at most
/// `max_len` bytes from `offset`, or `BAD_REQUEST` when the server's state is not at `step`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchState {
    pub run: RunId,
    pub epoch: u32,
    pub stage: u32,
    /// The step the state must be at (optimizer steps applied).
    pub step: u64,
    pub offset: u64,
    pub max_len: u32,
}

impl WireMessage for FetchState {
    const INFO: &'static KindInfo = KINDS.row(kind::FETCH_STATE);
    fn encode(&self, w: &mut Writer) {
        put_run(w, &self.run, self.epoch);
        w.u32(self.stage)
            .varint(self.step)
            .varint(self.offset)
            .u32(self.max_len);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let (run, epoch) = get_run(r)?;
        let stage = get_stage(r)?;
        let step = r.varint()?;
        let offset = r.varint()?;
        if offset > MAX_STATE_BYTES {
            return Err(WireError::Invalid("state offset beyond MAX_STATE_BYTES"));
        }
        Ok(FetchState {
            run,
            epoch,
            stage,
            step,
            offset,
            max_len: r.u32()?,
        })
    }
}

/// A chunk of a stage's exported state.
///
/// Sender: the server of a [`FetchState`]. Receiver: its requester, which appends chunks until
/// `total_len`, checks BLAKE3 of the whole against `state_hash`, imports it and checks the weights
/// digest against `digest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateChunk {
    pub run: RunId,
    pub epoch: u32,
    pub stage: u32,
    pub step: u64,
    pub total_len: u64,
    pub offset: u64,
    /// BLAKE3 of the complete export.
    pub state_hash: [u8; 32],
    /// `Shard::weights_digest` of the state.
    pub digest: [u8; 32],
    pub data: Vec<u8>,
}

impl WireMessage for StateChunk {
    const INFO: &'static KindInfo = KINDS.row(kind::STATE_CHUNK);
    fn encode(&self, w: &mut Writer) {
        put_run(w, &self.run, self.epoch);
        w.u32(self.stage)
            .varint(self.step)
            .varint(self.total_len)
            .varint(self.offset)
            .array(&self.state_hash)
            .array(&self.digest)
            .bytes(&self.data);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let (run, epoch) = get_run(r)?;
        let stage = get_stage(r)?;
        let step = r.varint()?;
        let total_len = r.varint()?;
        let offset = r.varint()?;
        if total_len > MAX_STATE_BYTES {
            return Err(WireError::TooLong {
                what: "state",
                len: total_len,
                max: MAX_STATE_BYTES,
            });
        }
        let state_hash = r.array()?;
        let digest = r.array()?;
        let data = r.bytes("state chunk", MAX_CHUNK_BYTES)?.to_vec();
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|end| end > total_len)
        {
            return Err(WireError::Invalid("state chunk beyond the total length"));
        }
        Ok(StateChunk {
            run,
            epoch,
            stage,
            step,
            total_len,
            offset,
            state_hash,
            digest,
            data,
        })
    }
}

/// Replace the state of `stage` with the one from `source` (a replica whose digest disagreed
/// re-syncs; after a restore, every replica loads the checkpoint; `Init` rebuilds from the seed).
///
/// Sender: the trainer. Receiver: a replica of `stage`. It drops its contexts and accumulator,
/// loads the state and replies [`Applied`] with the new digest (the epoch in the message becomes
/// the peer's epoch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reload {
    pub run: RunId,
    pub epoch: u32,
    pub stage: u32,
    pub step: u64,
    pub source: StateSource,
}

impl WireMessage for Reload {
    const INFO: &'static KindInfo = KINDS.row(kind::RELOAD);
    fn encode(&self, w: &mut Writer) {
        put_run(w, &self.run, self.epoch);
        w.u32(self.stage).varint(self.step);
        put_source(w, &self.source);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let (run, epoch) = get_run(r)?;
        Ok(Reload {
            run,
            epoch,
            stage: get_stage(r)?,
            step: r.varint()?,
            source: get_source(r)?,
        })
    }
}

/// Decodes a body of any training kind and re-encodes it; `None` for kinds not defined here.
/// Used by the fuzz target and tests: a decoded message must re-encode to the same bytes.
pub fn roundtrip_any(kind: u16, body: &[u8]) -> Option<Result<Vec<u8>, WireError>> {
    use crate::wire::{decode_body, encode_body};
    fn rt<M: WireMessage>(body: &[u8]) -> Result<Vec<u8>, WireError> {
        let m: M = decode_body(body)?;
        encode_body(&m)
    }
    Some(match kind {
        kind::ACK => rt::<Ack>(body),
        kind::FORWARD => rt::<Forward>(body),
        kind::FORWARD_OUT => rt::<ForwardOut>(body),
        kind::BACKWARD => rt::<Backward>(body),
        kind::BACKWARD_OUT => rt::<BackwardOut>(body),
        kind::COUNTED => rt::<Counted>(body),
        kind::HOP_FAILED => rt::<HopFailed>(body),
        kind::ABANDON => rt::<Abandon>(body),
        kind::RUN_INFO => rt::<RunInfoRequest>(body),
        kind::RUN_INFO_REPLY => rt::<RunInfo>(body),
        kind::ADMIT => rt::<Admit>(body),
        kind::ADMIT_REPLY => rt::<AdmitReply>(body),
        kind::READY => rt::<Ready>(body),
        kind::LEAVE => rt::<Leave>(body),
        kind::LEAVE_REPLY => rt::<LeaveReply>(body),
        kind::SYNC_START => rt::<SyncStart>(body),
        kind::GRAD_SHARE => rt::<GradShare>(body),
        kind::SYNC_DONE => rt::<SyncDone>(body),
        kind::APPLY => rt::<Apply>(body),
        kind::APPLIED => rt::<Applied>(body),
        kind::FETCH_STATE => rt::<FetchState>(body),
        kind::STATE_CHUNK => rt::<StateChunk>(body),
        kind::RELOAD => rt::<Reload>(body),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{decode_body, decode_envelope, encode_body, encode_envelope};
    use proptest::prelude::*;

    fn pid(b: u8) -> PeerId {
        PeerId([b; 32])
    }
    fn addr(p: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], p))
    }
    fn addr6(p: u16) -> SocketAddr {
        "[::1]:9"
            .parse::<SocketAddr>()
            .map(|mut a| {
                a.set_port(p);
                a
            })
            .unwrap()
    }
    const RUN: RunId = RunId([7; 16]);
    const KEY: MbKey = MbKey {
        step: 300,
        mb: 5,
        attempt: 2,
    };

    fn forward() -> Forward {
        Forward {
            run: RUN,
            epoch: 3,
            key: KEY,
            route: vec![
                Hop {
                    stage: 0,
                    peer: pid(1),
                    addr: addr(1000),
                },
                Hop {
                    stage: 1,
                    peer: pid(2),
                    addr: addr6(2000),
                },
            ],
            hop: 1,
            trainer: Endpoint {
                peer: pid(9),
                addr: addr(9000),
            },
            accumulate: 0b10,
            upstream: Traffic {
                wire: 10,
                dense: 40,
            },
            activations: vec![1, 2, 3, 4, 5],
            receipt: Some(receipt(0, crate::receipt::Pass::Forward, &[1, 2, 3, 4, 5])),
        }
    }

    fn receipt(stage: u32, pass: crate::receipt::Pass, out: &[u8]) -> Receipt {
        let id = crate::identity::Identity::from_secret([5; 32]);
        Receipt::sign(&id, RUN, 3, KEY, stage, pass, [6; 32], b"in", out)
    }

    /// One message of every kind, encoded as (kind, body).
    fn samples() -> Vec<(u16, Vec<u8>)> {
        fn e<M: WireMessage>(m: &M) -> (u16, Vec<u8>) {
            (M::KIND, encode_body(m).unwrap())
        }
        let fetch = StateSource::Fetch {
            from: vec![Endpoint {
                peer: pid(3),
                addr: addr(3),
            }],
            digest: [4; 32],
        };
        vec![
            e(&Ack),
            e(&forward()),
            e(&ForwardOut {
                run: RUN,
                epoch: 1,
                key: KEY,
                stage: 1,
                upstream: Traffic::default(),
                activations: vec![9; 40],
                receipt: Some(receipt(1, crate::receipt::Pass::Forward, &[9; 40])),
            }),
            e(&Backward {
                run: RUN,
                epoch: 1,
                key: KEY,
                stage: 1,
                upstream: Traffic { wire: 1, dense: 2 },
                grad: vec![8; 33],
                receipt: None,
            }),
            e(&BackwardOut {
                run: RUN,
                epoch: 1,
                key: KEY,
                upstream: Traffic {
                    wire: 300,
                    dense: 1 << 40,
                },
                grad: vec![],
                receipt: Some(receipt(0, crate::receipt::Pass::Backward, &[])),
            }),
            e(&Counted {
                run: RUN,
                epoch: 0,
                key: KEY,
                stage: 3,
            }),
            e(&HopFailed {
                run: RUN,
                epoch: 0,
                key: KEY,
                failed: pid(5),
                busy: true,
                reason: "timed out ü".into(),
                traffic: Traffic {
                    wire: 300,
                    dense: 1 << 40,
                },
            }),
            e(&Abandon {
                run: RUN,
                epoch: 0,
                key: KEY,
                uncounted: Abandon::FORWARD,
            }),
            e(&RunInfoRequest),
            e(&RunInfo {
                run: RUN,
                epoch: 2,
                step: 17,
                phase: RunPhase::Paused,
                config_toml: "[model]\nhidden_size = 64\n".into(),
                trainer: Endpoint {
                    peer: pid(9),
                    addr: addr(9),
                },
                replicas: vec![vec![pid(1), pid(2)], vec![]],
            }),
            e(&Admit {
                run: RUN,
                epoch: 2,
                stage: 1,
                addr: addr(77),
                throughput: 3.5,
            }),
            e(&AdmitReply {
                run: RUN,
                epoch: 2,
                stage: 1,
                step: 17,
                source: fetch.clone(),
            }),
            e(&AdmitReply {
                run: RUN,
                epoch: 0,
                stage: 0,
                step: 0,
                source: StateSource::Init,
            }),
            e(&Ready {
                run: RUN,
                epoch: 2,
                stage: 1,
                step: 17,
                digest: [1; 32],
                sync_ms: 1234,
            }),
            e(&Leave { run: RUN, epoch: 2 }),
            e(&LeaveReply {
                stay_for_step: Some(18),
            }),
            e(&LeaveReply {
                stay_for_step: None,
            }),
            e(&SyncStart {
                run: RUN,
                epoch: 2,
                step: 17,
                stage: 1,
                round: 2,
                participants: vec![pid(1), pid(2)],
                mb_counts: vec![3, 5],
                addrs: vec![addr(1), addr6(2)],
            }),
            e(&GradShare {
                run: RUN,
                epoch: 2,
                step: 17,
                stage: 1,
                round: 2,
                from: pid(1),
                frame: vec![0; 100],
            }),
            e(&SyncDone {
                run: RUN,
                epoch: 2,
                step: 17,
                stage: 1,
                grad_sq_norm: 0.25,
                grad_digest: [6; 32],
                share_bytes: 100,
                share_dense_bytes: 4000,
                abandoned_activations: Traffic {
                    wire: 300,
                    dense: 1200,
                },
                abandoned_gradients: Traffic::default(),
            }),
            e(&Apply {
                run: RUN,
                epoch: 2,
                step: 17,
                stage: 1,
                lr: 3e-4,
                clip_scale: 0.5,
            }),
            e(&Applied {
                run: RUN,
                epoch: 2,
                step: 17,
                stage: 1,
                digest: [2; 32],
            }),
            e(&FetchState {
                run: RUN,
                epoch: 2,
                stage: 1,
                step: 17,
                offset: 1 << 20,
                max_len: 1 << 20,
            }),
            e(&StateChunk {
                run: RUN,
                epoch: 2,
                stage: 1,
                step: 17,
                total_len: 10,
                offset: 4,
                state_hash: [3; 32],
                digest: [4; 32],
                data: vec![1; 6],
            }),
            e(&Reload {
                run: RUN,
                epoch: 3,
                stage: 1,
                step: 17,
                source: fetch,
            }),
        ]
    }

    #[test]
    fn every_kind_is_registered_in_its_range_with_its_cap() {
        KINDS.check().unwrap();
        assert_eq!((KINDS.first, KINDS.last), (30, 79));
        assert_eq!(KINDS.row(kind::FORWARD).max_len, caps::FORWARD);
        assert_eq!(KINDS.row(kind::STATE_CHUNK).max_len, caps::STATE_CHUNK);
        // Every sample round-trips and fits its cap.
        let s = samples();
        let kinds: std::collections::HashSet<u16> = s.iter().map(|(k, _)| *k).collect();
        assert_eq!(kinds.len(), KINDS.kinds.len(), "a sample per kind");
        for (k, body) in &s {
            assert!(body.len() <= KINDS.row(*k).max_len);
            let again = roundtrip_any(*k, body).unwrap().unwrap();
            assert_eq!(&again, body, "kind {}", KINDS.row(*k).name);
        }
    }

    #[test]
    fn forward_round_trips_through_an_envelope() {
        let f = forward();
        let bytes = encode_envelope(&f).unwrap();
        assert_eq!(decode_envelope::<Forward>(&bytes).unwrap(), f);
        assert!(f.accumulates(1) && !f.accumulates(0) && !f.accumulates(200));
    }

    #[test]
    fn every_truncation_and_extension_is_refused() {
        for (k, body) in samples() {
            for cut in 0..body.len() {
                assert!(
                    roundtrip_any(k, &body[..cut]).unwrap().is_err(),
                    "{} cut at {cut}",
                    KINDS.row(k).name
                );
            }
            let mut longer = body.clone();
            longer.push(0);
            assert!(roundtrip_any(k, &longer).unwrap().is_err());
        }
    }

    #[test]
    fn invariants_are_checked() {
        let mut f = forward();
        f.hop = 2;
        let b = encode_body(&f).unwrap();
        assert_eq!(
            decode_body::<Forward>(&b),
            Err(WireError::Invalid("hop index beyond the route"))
        );
        let mut f = forward();
        f.route.swap(0, 1);
        let b = encode_body(&f).unwrap();
        assert!(matches!(
            decode_body::<Forward>(&b),
            Err(WireError::Invalid(_))
        ));
        let mut f = forward();
        f.route.clear();
        f.hop = 0;
        assert!(decode_body::<Forward>(&encode_body(&f).unwrap()).is_err());

        let a = Apply {
            run: RUN,
            epoch: 0,
            step: 1,
            stage: 0,
            lr: f64::NAN,
            clip_scale: 1.0,
        };
        assert!(decode_body::<Apply>(&encode_body(&a).unwrap()).is_err());
        let a = Apply {
            lr: 1e-3,
            clip_scale: 2.0,
            ..a
        };
        assert!(decode_body::<Apply>(&encode_body(&a).unwrap()).is_err());

        let c = StateChunk {
            run: RUN,
            epoch: 0,
            stage: 0,
            step: 0,
            total_len: 5,
            offset: 4,
            state_hash: [0; 32],
            digest: [0; 32],
            data: vec![0; 2],
        };
        assert_eq!(
            decode_body::<StateChunk>(&encode_body(&c).unwrap()),
            Err(WireError::Invalid("state chunk beyond the total length"))
        );

        let s = SyncStart {
            run: RUN,
            epoch: 0,
            step: 0,
            stage: 0,
            round: 0,
            participants: vec![pid(1), pid(1)],
            mb_counts: vec![1, 1],
            addrs: vec![addr(1), addr(1)],
        };
        assert!(decode_body::<SyncStart>(&encode_body(&s).unwrap()).is_err());

        let c = Counted {
            run: RUN,
            epoch: 0,
            key: KEY,
            stage: 64,
        };
        assert!(decode_body::<Counted>(&encode_body(&c).unwrap()).is_err());
    }

    #[test]
    fn hostile_counts_do_not_allocate() {
        // A SyncStart claiming 2^30 participants with a few bytes behind it.
        let mut w = Writer::new();
        w.array(&RUN.0)
            .u32(0)
            .varint(1)
            .u32(0)
            .varint(1 << 30)
            .raw(&[0; 40]);
        assert!(matches!(
            decode_body::<SyncStart>(w.as_slice()),
            Err(WireError::TooLong { .. })
        ));
        // A frame length beyond the cap.
        let mut w = Writer::new();
        w.array(&RUN.0).u32(0);
        put_key(&mut w, &KEY);
        put_traffic(&mut w, &Traffic::default());
        w.varint(u64::MAX >> 1);
        assert!(matches!(
            decode_body::<BackwardOut>(w.as_slice()),
            Err(WireError::TooLong { .. })
        ));
    }

    proptest! {
        #[test]
        fn random_bodies_never_panic(kind_ix in 0usize..KINDS.kinds.len(),
                                     bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = roundtrip_any(KINDS.kinds[kind_ix].kind, &bytes);
        }

        #[test]
        fn mutated_samples_never_panic_and_reencode_exactly(ix in 0usize..25, pos in any::<usize>(), val in any::<u8>()) {
            let s = samples();
            let (k, mut body) = s[ix % s.len()].clone();
            if !body.is_empty() {
                let p = pos % body.len();
                body[p] = val;
            }
            if let Ok(again) = roundtrip_any(k, &body).unwrap() {
                // Canonical encodings: anything accepted re-encodes to the same bytes, except
                // over-long varints, which decode but re-encode shorter.
                prop_assert!(again.len() <= body.len());
            }
        }
    }
}
