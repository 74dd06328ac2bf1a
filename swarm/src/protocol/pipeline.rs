//! Pipeline messages (kinds 30-37): activations and gradients along a route, and what the
//! trainer hears about each micro-batch attempt.

use super::*;

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
    /// The run (a message of another run is refused).
    pub run: RunId,
    /// The run's epoch (a message of an older one is refused).
    pub epoch: u32,
    /// The micro-batch attempt.
    pub key: MbKey,
    /// One hop per stage, in stage order (`route[i].stage == i`).
    pub route: Vec<Hop>,
    /// Index into `route` of the receiver.
    pub hop: u32,
    /// Where results and reports go.
    pub trainer: Endpoint,
    /// Bit `s`: stage `s` accumulates parameter gradients for this attempt.
    pub accumulate: u64,
    /// Tensor bytes sent by the earlier hops of this pass (not counting this message's frame).
    pub upstream: Traffic,
    /// The stage peers' time on the earlier hops of this pass (this hop's included when it
    /// comes from a stage).
    pub time: PassTime,
    /// The activations, a compression frame of shape `[batch, seq, hidden]`.
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
        put_pass_time(w, &self.time);
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
            time: get_pass_time(r)?,
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
    /// The run (a message of another run is refused).
    pub run: RunId,
    /// The run's epoch (a message of an older one is refused).
    pub epoch: u32,
    /// The micro-batch attempt.
    pub key: MbKey,
    /// The stage that produced it (the last one).
    pub stage: u32,
    /// Tensor bytes sent by the earlier hops of this pass (not counting this message's frame).
    pub upstream: Traffic,
    /// The stage peers' time on the earlier hops of this pass (this hop's included when it
    /// comes from a stage).
    pub time: PassTime,
    /// The last stage's output, a compression frame of shape `[batch, seq, hidden]`.
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
        put_pass_time(w, &self.time);
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
            time: get_pass_time(r)?,
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
    /// The run (a message of another run is refused).
    pub run: RunId,
    /// The run's epoch (a message of an older one is refused).
    pub epoch: u32,
    /// The micro-batch attempt.
    pub key: MbKey,
    /// The receiving stage.
    pub stage: u32,
    /// Tensor bytes sent by the earlier hops of this pass (not counting this message's frame).
    pub upstream: Traffic,
    /// The stage peers' time on the earlier hops of this pass (this hop's included when it
    /// comes from a stage).
    pub time: PassTime,
    /// The gradient of the loss with respect to the stage's output, a compression frame.
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
        put_pass_time(w, &self.time);
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
            time: get_pass_time(r)?,
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
    /// The run (a message of another run is refused).
    pub run: RunId,
    /// The run's epoch (a message of an older one is refused).
    pub epoch: u32,
    /// The micro-batch attempt.
    pub key: MbKey,
    /// Tensor bytes sent by the earlier hops of this pass (not counting this message's frame).
    pub upstream: Traffic,
    /// The stage peers' time on the earlier hops of this pass (this hop's included when it
    /// comes from a stage).
    pub time: PassTime,
    /// The gradient with respect to stage 0's input, a compression frame.
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
        put_pass_time(w, &self.time);
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
            time: get_pass_time(r)?,
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
    /// The run (a message of another run is refused).
    pub run: RunId,
    /// The run's epoch (a message of an older one is refused).
    pub epoch: u32,
    /// The micro-batch attempt.
    pub key: MbKey,
    /// The stage whose accumulator it went into.
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
    /// The run (a message of another run is refused).
    pub run: RunId,
    /// The run's epoch (a message of an older one is refused).
    pub epoch: u32,
    /// The micro-batch attempt.
    pub key: MbKey,
    /// The next hop that could not be reached.
    pub failed: PeerId,
    /// Whether the next hop answered BUSY (overloaded, alive) rather than failing.
    pub busy: bool,
    /// What the send said (logs).
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
    /// The run (a message of another run is refused).
    pub run: RunId,
    /// The run's epoch (a message of an older one is refused).
    pub epoch: u32,
    /// The micro-batch attempt.
    pub key: MbKey,
    /// Bits [`Abandon::FORWARD`], [`Abandon::BACKWARD`]: passes the trainer has no report of.
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
