//! Run membership messages (kinds 38-44): a peer asks for the run, is admitted to a stage, says
//! it is ready, and leaves.

use super::*;

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
    /// The run (a message of another run is refused).
    pub run: RunId,
    /// The run's epoch (a message of an older one is refused).
    pub epoch: u32,
    /// The next step to run (steps `0..step` are done).
    pub step: u64,
    /// Running, paused (a stage has no replica) or finished.
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
    /// The run (a message of another run is refused).
    pub run: RunId,
    /// The run's epoch (a message of an older one is refused).
    pub epoch: u32,
    /// The stage it asks to serve.
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
        /// Sources, tried in order.
        from: Vec<Endpoint>,
        /// The weights digest the loaded state must have.
        digest: [u8; 32],
    },
}

/// Admission granted: load the state of `stage` as of the start of step `step`, then send
/// [`Ready`]. The trainer holds step `step` until the peer is ready (bounded wait).
///
/// Sender: the trainer, in reply to [`Admit`]. Receiver: the joining peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmitReply {
    /// The run (a message of another run is refused).
    pub run: RunId,
    /// The run's epoch (a message of an older one is refused).
    pub epoch: u32,
    /// The stage it serves.
    pub stage: u32,
    /// The step the loaded state must be at (optimizer steps applied so far).
    pub step: u64,
    /// Where it loads the state from.
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
    /// The run (a message of another run is refused).
    pub run: RunId,
    /// The run's epoch (a message of an older one is refused).
    pub epoch: u32,
    /// The stage.
    pub stage: u32,
    /// Steps applied in the state it holds.
    pub step: u64,
    /// Its weights digest.
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
    /// The run (a message of another run is refused).
    pub run: RunId,
    /// The run's epoch (a message of an older one is refused).
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
    /// `Some(s)`: stay through step `s`'s sync; `None`: go now.
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
