//! What a volunteer's own monitor shows (`swarm join --metrics ADDR`): its `/api/v1/state`.

use serde::{Deserialize, Serialize};
use swarm_core::trainer::observe::ChannelBytes;

/// Version of [`VolunteerState`]'s JSON schema.
pub const VOLUNTEER_SCHEMA_VERSION: u32 = 1;

/// A volunteer's state, refreshed by `swarm join` about once a second.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VolunteerState {
    /// [`VOLUNTEER_SCHEMA_VERSION`].
    pub version: u32,
    /// Incremented at every refresh.
    pub seq: u64,
    /// When this state was made (Unix ms).
    pub updated_unix_ms: u64,
    /// Its peer id (hex).
    pub peer_id: String,
    /// The address its QUIC socket listens on.
    pub listen_addr: String,
    /// The software version it announces.
    pub software: String,
    /// The run it serves and its trainer, once joined.
    pub run_id: Option<String>,
    /// The trainer's address.
    pub trainer_addr: Option<String>,
    /// The stage it serves.
    pub stage: Option<u32>,
    /// `membership` (no run), `serving` (the trainer lists it), `rejoining` (it does not, or the
    /// trainer is unreachable) or `leaving`.
    pub state: String,
    /// Forward and backward passes served.
    pub forwards: u64,
    /// Backward passes served.
    pub backwards: u64,
    /// Tensor bytes it sent, per channel (activations, gradients, sync), on the wire and as fp32.
    pub channels: Vec<ChannelBytes>,
    /// Stage-state bytes it served to joiners and checkpoints.
    pub state_served_bytes: u64,
    /// UDP bytes out / in over its open QUIC connections (all traffic, closed ones not counted).
    pub connection_bytes_out: u64,
    /// UDP bytes in over its open QUIC connections.
    pub connection_bytes_in: u64,
    /// Requests refused because its context table was full, and for a bad sender receipt.
    pub busy: u64,
    /// Requests refused for a bad sender receipt.
    pub bad_receipts: u64,
    /// Audits passed/failed and credited micro-batches as the trainer's ledger says (reported
    /// back with every step's `Apply`): `None` until the first report, or without a ledger.
    pub audits_passed: Option<u64>,
    /// Audits failed, as the ledger says.
    pub audits_failed: Option<u64>,
    /// Micro-batches credited to it, as the ledger says.
    pub credited_micro_batches: Option<u64>,
    /// The reachability verdict of the check at join (`public`, `punchable`, `symmetric`,
    /// `blocked`), or `unknown` for a swarm's first peer, which nobody checks.
    pub reachability: String,
}
