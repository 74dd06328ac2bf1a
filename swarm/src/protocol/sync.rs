//! Replica sync messages (kinds 60-64): the step-end gradient all-gather and the optimizer step.

use super::*;

/// What a sync round exchanges (see [`swarm_model::SyncMode`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncPhase {
    /// Per-step sync: the participants exchange and sum their accumulated gradients; `Apply`
    /// takes the AdamW step on the sum.
    #[default]
    Gradient,
    /// A multi-step sync's inner step: nothing is exchanged; each participant reports the norm of
    /// its own mean gradient and `Apply` takes its own AdamW step (replicas drift).
    Local,
    /// A multi-step sync's boundary: the participants exchange their compressed pseudo-gradients
    /// (`anchor - weights`) and average them; `Apply` takes the outer step, after which every
    /// participant holds the same weights.
    Outer,
}

impl SyncPhase {
    fn code(self) -> u8 {
        match self {
            SyncPhase::Gradient => 0,
            SyncPhase::Local => 1,
            SyncPhase::Outer => 2,
        }
    }

    fn get(r: &mut Reader<'_>) -> Result<SyncPhase, WireError> {
        match r.u8()? {
            0 => Ok(SyncPhase::Gradient),
            1 => Ok(SyncPhase::Local),
            2 => Ok(SyncPhase::Outer),
            _ => Err(WireError::Invalid("unknown sync phase")),
        }
    }
}

/// Starts the step-end sync of `stage`. Ends every context of step `step` on the receiver.
///
/// Sender: the trainer, when every micro-batch of the step is complete. Receiver: every replica of
/// `stage`. A participant (listed in `participants`) sends its [`GradShare`] to every other
/// participant, decodes all shares in participant order, sums them and reports [`SyncDone`]. A
/// non-participant drops its accumulator (it will re-sync its weights). `mb_counts[i]` is how many
/// micro-batches participant `i` counted (checked against the receiver's own count). Reply: [`Ack`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncStart {
    /// The run (a message of another run is refused).
    pub run: RunId,
    /// The run's epoch (a message of an older one is refused).
    pub epoch: u32,
    /// The step whose gradients are synced (for `Outer`: steps done in the state synced).
    pub step: u64,
    /// The stage.
    pub stage: u32,
    /// Which sync of `stage` in `step` this is (0 first; the trainer bumps it when it redoes the
    /// stage's sync after losing a participant), so shares of a dropped round are told apart.
    pub round: u32,
    /// A gradient all-reduce, a multi-step sync's local round or its outer round.
    pub phase: SyncPhase,
    /// The replicas that sync, in the order shares are summed.
    pub participants: Vec<PeerId>,
    /// Micro-batches each participant counted.
    pub mb_counts: Vec<u32>,
    /// Endpoints of the participants, same order (to send shares to).
    pub addrs: Vec<SocketAddr>,
}

impl WireMessage for SyncStart {
    const INFO: &'static KindInfo = KINDS.row(kind::SYNC_START);
    fn encode(&self, w: &mut Writer) {
        put_run(w, &self.run, self.epoch);
        w.varint(self.step)
            .u32(self.stage)
            .u32(self.round)
            .u8(self.phase.code());
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
        let phase = SyncPhase::get(r)?;
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
            phase,
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
    /// The run (a message of another run is refused).
    pub run: RunId,
    /// The run's epoch (a message of an older one is refused).
    pub epoch: u32,
    /// The step it is about (optimizer steps done before it).
    pub step: u64,
    /// The stage.
    pub stage: u32,
    /// The [`SyncStart::round`] the share belongs to: a receiver drops shares of another round.
    pub round: u32,
    /// The participant that sent it.
    pub from: PeerId,
    /// Its gradient (or pseudo-gradient), a compression frame.
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
    /// The run (a message of another run is refused).
    pub run: RunId,
    /// The run's epoch (a message of an older one is refused).
    pub epoch: u32,
    /// The step it is about (optimizer steps done before it).
    pub step: u64,
    /// The stage.
    pub stage: u32,
    /// The round of `step`'s sync this reports (`SyncStart.round`): the trainer counts it only
    /// in that round, so a late report of a round it gave up on never counts in the redo.
    pub round: u32,
    /// Sum of squares of the summed gradient (before clipping).
    pub grad_sq_norm: f64,
    /// BLAKE3 of the summed gradient's f32 bytes (replicas must agree).
    pub grad_digest: [u8; 32],
    /// Wire bytes of the shares this participant sent (frames only) and their fp32 size: this
    /// round's, plus those of earlier rounds that were dropped unreported and reached their
    /// receiver.
    pub share_bytes: u64,
    /// The fp32 size of those shares.
    pub share_dense_bytes: u64,
    /// Frames this participant sent in passes of abandoned attempts that the trainer had no
    /// report of (see [`Abandon::uncounted`]), since its last `SyncDone`: activations, gradients.
    pub abandoned_activations: Traffic,
    /// The gradient frames of those passes.
    pub abandoned_gradients: Traffic,
}

impl WireMessage for SyncDone {
    const INFO: &'static KindInfo = KINDS.row(kind::SYNC_DONE);
    fn encode(&self, w: &mut Writer) {
        put_run(w, &self.run, self.epoch);
        w.varint(self.step)
            .u32(self.stage)
            .u32(self.round)
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
        let round = r.u32()?;
        // A non-finite norm is legal here: the trainer must see it to skip the step.
        let grad_sq_norm = r.f64()?;
        Ok(SyncDone {
            run,
            epoch,
            step,
            stage,
            round,
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
    /// The run (a message of another run is refused).
    pub run: RunId,
    /// The run's epoch (a message of an older one is refused).
    pub epoch: u32,
    /// The step it is about (optimizer steps done before it).
    pub step: u64,
    /// The stage.
    pub stage: u32,
    /// Learning rate of this step.
    pub lr: f64,
    /// Factor of the global-norm clip (1: none).
    pub clip_scale: f64,
    /// The sync phase this applies: the AdamW step (`Gradient`, `Local`) or the outer step of a
    /// multi-step sync (`Outer`; `lr` and `clip_scale` unused).
    pub phase: SyncPhase,
    /// The receiving replica's standing in the trainer's ledger, reported back so a volunteer
    /// sees its audits and credit: `None` without a ledger.
    pub credit: Option<CreditReport>,
}

/// A peer's audits and credited work as the trainer's ledger counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CreditReport {
    /// Audits of it that passed.
    pub audits_passed: u64,
    /// Audits of it that failed.
    pub audits_failed: u64,
    /// Micro-batches credited to it.
    pub credited_micro_batches: u64,
    /// Micro-batches served, not credited yet.
    pub pending_micro_batches: u64,
}

impl WireMessage for Apply {
    const INFO: &'static KindInfo = KINDS.row(kind::APPLY);
    fn encode(&self, w: &mut Writer) {
        put_run(w, &self.run, self.epoch);
        w.varint(self.step)
            .u32(self.stage)
            .f64(self.lr)
            .f64(self.clip_scale)
            .u8(self.phase.code());
        match &self.credit {
            None => {
                w.u8(0);
            }
            Some(c) => {
                w.u8(1)
                    .varint(c.audits_passed)
                    .varint(c.audits_failed)
                    .varint(c.credited_micro_batches)
                    .varint(c.pending_micro_batches);
            }
        }
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
        let phase = SyncPhase::get(r)?;
        let credit = match r.u8()? {
            0 => None,
            1 => Some(CreditReport {
                audits_passed: r.varint()?,
                audits_failed: r.varint()?,
                credited_micro_batches: r.varint()?,
                pending_micro_batches: r.varint()?,
            }),
            _ => return Err(WireError::Invalid("bad credit flag")),
        };
        Ok(Apply {
            run,
            epoch,
            step,
            stage,
            lr,
            clip_scale,
            phase,
            credit,
        })
    }
}

/// The optimizer step was applied: the replica's weights digest after step `step`.
///
/// Sender: a participant, in reply to [`Apply`] (or a reloaded peer, in reply to [`Reload`]).
/// Receiver: the trainer, which compares the digests of a stage's replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// The run (a message of another run is refused).
    pub run: RunId,
    /// The run's epoch (a message of an older one is refused).
    pub epoch: u32,
    /// The step it is about (optimizer steps done before it).
    pub step: u64,
    /// The stage.
    pub stage: u32,
    /// Its weights digest after the step.
    pub digest: [u8; 32],
    /// Tensor bytes this replica has sent since it started, per channel (activations,
    /// gradients, sync), as it reports them: for monitoring only, never for credit.
    pub sent: [Traffic; 3],
}

impl WireMessage for Applied {
    const INFO: &'static KindInfo = KINDS.row(kind::APPLIED);
    fn encode(&self, w: &mut Writer) {
        put_run(w, &self.run, self.epoch);
        w.varint(self.step).u32(self.stage).array(&self.digest);
        for t in &self.sent {
            put_traffic(w, t);
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let (run, epoch) = get_run(r)?;
        Ok(Applied {
            run,
            epoch,
            step: r.varint()?,
            stage: get_stage(r)?,
            digest: r.array()?,
            sent: [get_traffic(r)?, get_traffic(r)?, get_traffic(r)?],
        })
    }
}
