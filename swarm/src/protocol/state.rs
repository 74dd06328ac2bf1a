//! Stage state messages (kinds 65-67): state moved in chunks, and a replica's state replaced.

use super::*;

/// Asks for a chunk of `stage`'s exported state (weights, optimizer moments, step).
///
/// Sender: a joining or re-syncing peer, or the trainer (checkpoints). Receiver: a replica of the
/// stage, or the trainer (serving a restored checkpoint). Reply: [`StateChunk`] of at most
/// `max_len` bytes from `offset`, or `BAD_REQUEST` when the server's state is not at `step`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchState {
    /// The run (a message of another run is refused).
    pub run: RunId,
    /// The run's epoch (a message of an older one is refused).
    pub epoch: u32,
    /// The stage.
    pub stage: u32,
    /// The step the state must be at (optimizer steps applied).
    pub step: u64,
    /// Where the chunk starts in the export.
    pub offset: u64,
    /// Most bytes wanted (the server may send fewer).
    pub max_len: u32,
    /// The weights without the moments (`Shard::export_weights`, a third of the bytes): what an
    /// audit's recomputation of passes needs. Replicas only; the trainer serves full states.
    pub weights_only: bool,
}

impl WireMessage for FetchState {
    const INFO: &'static KindInfo = KINDS.row(kind::FETCH_STATE);
    fn encode(&self, w: &mut Writer) {
        put_run(w, &self.run, self.epoch);
        w.u32(self.stage)
            .varint(self.step)
            .varint(self.offset)
            .u32(self.max_len)
            .bool(self.weights_only);
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
            weights_only: r.bool()?,
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
    /// The run (a message of another run is refused).
    pub run: RunId,
    /// The run's epoch (a message of an older one is refused).
    pub epoch: u32,
    /// The stage.
    pub stage: u32,
    /// Steps applied in the state.
    pub step: u64,
    /// Length of the whole export.
    pub total_len: u64,
    /// Where this chunk starts.
    pub offset: u64,
    /// BLAKE3 of the complete export.
    pub state_hash: [u8; 32],
    /// `Shard::weights_digest` of the state.
    pub digest: [u8; 32],
    /// The chunk's bytes.
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
    /// The run (a message of another run is refused).
    pub run: RunId,
    /// The run's epoch (a message of an older one is refused).
    pub epoch: u32,
    /// The stage.
    pub stage: u32,
    /// Steps applied in the state to load.
    pub step: u64,
    /// Where to load it from.
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
