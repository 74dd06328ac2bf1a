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

pub use crate::ids::{MAX_FRAME_BYTES, MAX_STAGES, MbKey};

use crate::identity::PeerId;
use crate::ids::get_frame;
use crate::membership::RunId;
use crate::receipt::{Receipt, get_opt_receipt, put_opt_receipt};
use crate::wire::{KindInfo, KindSet, Reader, WireError, WireMessage, Writer};

mod pipeline;
mod run;
mod state;
mod sync;

pub use pipeline::*;
pub use run::*;
pub use state::*;
pub use sync::*;

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
    /// Body cap of [`Forward`]: one frame and its ids.
    pub const FORWARD: usize = MAX_FRAME_BYTES + TENSOR_MSG_OVERHEAD;
    /// Body cap of [`ForwardOut`].
    pub const FORWARD_OUT: usize = MAX_FRAME_BYTES + TENSOR_MSG_OVERHEAD;
    /// Body cap of [`Backward`].
    pub const BACKWARD: usize = MAX_FRAME_BYTES + TENSOR_MSG_OVERHEAD;
    /// Body cap of [`BackwardOut`].
    pub const BACKWARD_OUT: usize = MAX_FRAME_BYTES + TENSOR_MSG_OVERHEAD;
    /// Body cap of [`GradShare`].
    pub const GRAD_SHARE: usize = MAX_FRAME_BYTES + TENSOR_MSG_OVERHEAD;
    /// Body cap of [`StateChunk`]: one chunk and its header.
    pub const STATE_CHUNK: usize = MAX_CHUNK_BYTES + 1024;
    /// Body cap of [`RunInfo`]: the config and every replica id.
    pub const RUN_INFO: usize = MAX_CONFIG_BYTES + MAX_STAGES * 8 + MAX_REPLICAS * 40 + 1024;
    /// Body cap of [`SyncStart`]: its participants and counts.
    pub const SYNC_START: usize = MAX_REPLICAS * (32 + 10) + 256;
    /// Body cap of the small control messages.
    pub const SMALL: usize = 4 * 1024;
    /// Body cap of [`AdmitReply`]: a state source listing replicas.
    pub const ADMIT_REPLY: usize = MAX_REPLICAS * 60 + 256;
    /// Body cap of [`Reload`]: a state source listing replicas.
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

/// A peer and an address to reach it at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// The peer (TLS pins it).
    pub peer: PeerId,
    /// Where it is reached.
    pub addr: SocketAddr,
}

/// One hop of a route: the replica chosen for `stage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Hop {
    /// The stage it serves in the route.
    pub stage: u32,
    /// The replica.
    pub peer: PeerId,
    /// Where it is reached.
    pub addr: SocketAddr,
}

impl Hop {
    /// The replica and its address.
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
    /// Bytes of the frames as sent.
    pub wire: u64,
    /// What the same tensors weigh as fp32.
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

/// Where the stage peers of one pass (forward or backward) of a micro-batch attempt spent its
/// time, summed over the hops so far, in microseconds (issue #18's time breakdown): the stage
/// pass itself, the boundary codec (decode of what came in, encode of what goes out), and the
/// wait behind the stage's other micro-batches (the stage's state lock and blocking pool). Each
/// hop adds its own before passing the pass on; self-reported, for monitoring only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PassTime {
    /// The stage passes.
    pub compute_us: u64,
    /// Decoding what came in and encoding what goes out.
    pub codec_us: u64,
    /// Waiting behind the stage's other micro-batches.
    pub queued_us: u64,
}

impl PassTime {
    /// This time plus one hop's.
    pub fn plus(self, hop: PassTime) -> PassTime {
        PassTime {
            compute_us: self.compute_us.saturating_add(hop.compute_us),
            codec_us: self.codec_us.saturating_add(hop.codec_us),
            queued_us: self.queued_us.saturating_add(hop.queued_us),
        }
    }
}

fn put_pass_time(w: &mut Writer, t: &PassTime) {
    w.varint(t.compute_us)
        .varint(t.codec_us)
        .varint(t.queued_us);
}

fn get_pass_time(r: &mut Reader<'_>) -> Result<PassTime, WireError> {
    Ok(PassTime {
        compute_us: r.varint()?,
        codec_us: r.varint()?,
        queued_us: r.varint()?,
    })
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

fn get_finite(r: &mut Reader<'_>, what: &'static str) -> Result<f64, WireError> {
    let v = r.f64()?;
    if !v.is_finite() {
        return Err(WireError::Invalid(what));
    }
    Ok(v)
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
mod tests;
