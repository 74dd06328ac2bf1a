//! Signed peer records: what a peer announces about itself, its canonical signed encoding, and why
//! a record is refused.

use std::fmt;
use std::net::SocketAddr;

use rand::Rng;
use serde::{Deserialize, Serialize};

use swarm_nat::Reachability;

use crate::identity::{self, Identity, PeerId};
use crate::wire::{Reader, WireError, Writer};

/// Wall-clock time in milliseconds since the Unix epoch.
pub type UnixMillis = u64;

/// Domain separation for record signatures: a signature over a record can never be replayed as a
/// signature over anything else this key signs, nor over a future record format.
pub const RECORD_DOMAIN: &[u8] = b"swarm-record-v1\0";

/// At most this many addresses in one record.
pub const MAX_ADDRS: usize = 8;
/// At most this many stages served by one peer.
pub const MAX_STAGES: usize = 64;
/// At most this many bytes of software version string.
pub const MAX_VERSION_LEN: usize = 64;
/// At most this many records in one gossip or status message.
pub const MAX_RECORDS_PER_MESSAGE: usize = 4096;
/// Upper bound on one encoded record (key, id, run, seq, times, state, throughput, 8 v6 addresses,
/// 64 stages, version, signature), used to size message caps.
pub const MAX_RECORD_LEN: usize = 32
    + 32
    + 16
    + 8
    + 8
    + 8
    + 1
    + 8
    + 1
    + 5
    + MAX_ADDRS * 19
    + 5
    + MAX_STAGES * 4
    + 5
    + MAX_VERSION_LEN
    + 64;

/// Identifies one training run; peers of different runs never merge views.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RunId(pub [u8; 16]);

impl RunId {
    /// A fresh random run id.
    pub fn random<R: Rng + ?Sized>(rng: &mut R) -> RunId {
        RunId(rng.random())
    }

    /// Parses the 32-hex-digit form.
    pub fn parse(s: &str) -> Option<RunId> {
        let bytes = hex::decode(s.trim()).ok()?;
        Some(RunId(bytes.try_into().ok()?))
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RunId({self})")
    }
}

/// A peer's lifecycle state as it announces it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PeerState {
    /// Connected, loading or syncing; not yet serving.
    Joining,
    /// Serving its stages.
    Online,
    /// Shutting down; others drop it from the live set at once.
    Leaving,
}

impl PeerState {
    fn to_u8(self) -> u8 {
        match self {
            PeerState::Joining => 0,
            PeerState::Online => 1,
            PeerState::Leaving => 2,
        }
    }

    fn from_u8(v: u8) -> Option<PeerState> {
        match v {
            0 => Some(PeerState::Joining),
            1 => Some(PeerState::Online),
            2 => Some(PeerState::Leaving),
            _ => None,
        }
    }

    /// The state's name in records and status output.
    pub fn as_str(self) -> &'static str {
        match self {
            PeerState::Joining => "JOINING",
            PeerState::Online => "ONLINE",
            PeerState::Leaving => "LEAVING",
        }
    }
}

impl fmt::Display for PeerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The fields a peer announces about itself, before signing.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordInfo {
    /// Where others can reach this peer (first one preferred).
    pub addrs: Vec<SocketAddr>,
    /// Indices of the pipeline stages this peer serves.
    pub stages: Vec<u32>,
    /// Measured throughput (tokens per second through its stages; 0 when unknown).
    pub throughput: f64,
    /// Whether it serves, joins or leaves.
    pub state: PeerState,
    /// Software version string (e.g. the crate version).
    pub version: String,
    /// How others can reach it, as its reachability check at join found (issue #14).
    pub reach: Reachability,
}

/// A signed announcement of one peer. Build with [`PeerRecord::sign`]; check with
/// [`PeerRecord::verify`] (the decoder only checks the shape, not the signature).
#[derive(Clone, Debug, PartialEq)]
pub struct PeerRecord {
    /// The ed25519 public key; `peer_id` must be its BLAKE3 hash.
    pub public_key: [u8; 32],
    /// The BLAKE3 hash of `public_key`.
    pub peer_id: PeerId,
    /// The run it belongs to.
    pub run_id: RunId,
    /// Strictly increasing per peer; a record is only replaced by one with a higher `seq`.
    pub seq: u64,
    /// When it was signed (unix milliseconds).
    pub issued_at: UnixMillis,
    /// When it stops counting (unix milliseconds).
    pub expires_at: UnixMillis,
    /// What it announces.
    pub info: RecordInfo,
    /// Ed25519 signature over every field above.
    pub signature: [u8; 64],
}

/// A record whose shape, id/key binding and signature have been checked
/// ([`PeerRecord::into_verified`]); the run, time and staleness checks still apply when stored.
#[derive(Clone, Debug, PartialEq)]
pub struct Verified(pub(super) PeerRecord);

impl Verified {
    /// The record, now known to be validly signed.
    pub fn record(&self) -> &PeerRecord {
        &self.0
    }
}

/// Verifies each record, moving the failures into `refused`.
pub fn verify_all(records: Vec<PeerRecord>, refused: &mut Vec<(PeerId, Refusal)>) -> Vec<Verified> {
    let mut ok = Vec::with_capacity(records.len());
    for r in records {
        let id = r.peer_id;
        match r.into_verified() {
            Ok(v) => ok.push(v),
            Err(e) => refused.push((id, e)),
        }
    }
    ok
}

/// Why a record was refused. Refusals are normal in gossip (duplicates arrive all the time), so
/// these are values, not errors of the crate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The signature does not verify over the record's canonical encoding.
    BadSignature,
    /// The peer id is not the BLAKE3 hash of the record's public key.
    IdKeyMismatch,
    /// The record belongs to another run.
    WrongRun,
    /// The record has already expired.
    Expired,
    /// Issued in the future, or expiring further ahead than any honest lifetime allows.
    TooFarFuture,
    /// Not newer than the record already held for that peer (a duplicate or a replay).
    Stale,
    /// A field exceeds its cap, or the throughput is not a finite non-negative number.
    Malformed,
    /// A record about this peer itself, signed by someone else's view of it (ignored).
    SelfRecord,
    /// The view is full and this peer is not in it.
    ViewFull,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Refusal::BadSignature => "bad signature",
            Refusal::IdKeyMismatch => "peer id does not match key",
            Refusal::WrongRun => "wrong run id",
            Refusal::Expired => "expired",
            Refusal::TooFarFuture => "issued or expiring too far in the future",
            Refusal::Stale => "stale (not newer than the held record)",
            Refusal::Malformed => "malformed field",
            Refusal::SelfRecord => "record about ourselves",
            Refusal::ViewFull => "view full",
        };
        f.write_str(s)
    }
}

impl PeerRecord {
    /// Signs `info` as `identity` for `run_id`, valid from `now` for `ttl_ms`.
    pub fn sign(
        identity: &Identity,
        run_id: RunId,
        seq: u64,
        now: UnixMillis,
        ttl_ms: u64,
        info: RecordInfo,
    ) -> PeerRecord {
        let mut record = PeerRecord {
            public_key: identity.public_key().to_bytes(),
            peer_id: identity.peer_id(),
            run_id,
            seq,
            issued_at: now,
            expires_at: now.saturating_add(ttl_ms),
            info,
            signature: [0; 64],
        };
        record.signature = identity.sign(&record.signing_bytes());
        record
    }

    /// The exact bytes the signature covers: the domain tag, then every field but the signature.
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.raw(RECORD_DOMAIN);
        self.encode_fields(&mut w);
        w.into_vec()
    }

    pub(super) fn encode_fields(&self, w: &mut Writer) {
        w.array(&self.public_key);
        w.array(&self.peer_id.0);
        w.array(&self.run_id.0);
        w.u64(self.seq);
        w.u64(self.issued_at);
        w.u64(self.expires_at);
        w.u8(self.info.state.to_u8());
        w.f64(self.info.throughput);
        w.u8(self.info.reach.code());
        w.len_prefix(self.info.addrs.len());
        for a in &self.info.addrs {
            w.socket_addr(a);
        }
        w.len_prefix(self.info.stages.len());
        for s in &self.info.stages {
            w.u32(*s);
        }
        w.str(&self.info.version);
    }

    /// Checks the fields against their caps (also enforced by the decoder).
    pub fn check_shape(&self) -> Result<(), Refusal> {
        let i = &self.info;
        if i.addrs.len() > MAX_ADDRS
            || i.stages.len() > MAX_STAGES
            || i.version.len() > MAX_VERSION_LEN
            || !i.throughput.is_finite()
            || i.throughput < 0.0
            || self.issued_at > self.expires_at
        {
            return Err(Refusal::Malformed);
        }
        Ok(())
    }

    /// Checks everything a record must prove by itself: shape, id = BLAKE3(key), signature.
    pub fn verify(&self) -> Result<(), Refusal> {
        self.check_shape()?;
        if PeerId(*blake3::hash(&self.public_key).as_bytes()) != self.peer_id {
            return Err(Refusal::IdKeyMismatch);
        }
        if !identity::verify(&self.public_key, &self.signing_bytes(), &self.signature) {
            return Err(Refusal::BadSignature);
        }
        Ok(())
    }

    /// Checks the signature and id (see [`PeerRecord::verify`]) and wraps the record as verified.
    pub fn into_verified(self) -> Result<Verified, Refusal> {
        self.verify()?;
        Ok(Verified(self))
    }

    /// Writes the record (fields, then signature).
    pub fn encode(&self, w: &mut Writer) {
        self.encode_fields(w);
        w.array(&self.signature);
    }

    /// Reads one record, enforcing every cap before allocating. Does not check the signature.
    pub fn decode(r: &mut Reader<'_>) -> Result<PeerRecord, WireError> {
        let public_key = r.array::<32>()?;
        let peer_id = PeerId(r.array::<32>()?);
        let run_id = RunId(r.array::<16>()?);
        let seq = r.u64()?;
        let issued_at = r.u64()?;
        let expires_at = r.u64()?;
        let tag = r.u8()?;
        let state = PeerState::from_u8(tag).ok_or(WireError::BadTag {
            what: "peer state",
            tag: tag as u64,
        })?;
        let throughput = r.f64()?;
        let tag = r.u8()?;
        let reach = Reachability::from_code(tag).ok_or(WireError::BadTag {
            what: "reachability",
            tag: tag as u64,
        })?;
        let n = r.len("addresses", MAX_ADDRS, 7)?;
        let mut addrs = Vec::with_capacity(n);
        for _ in 0..n {
            addrs.push(r.socket_addr()?);
        }
        let n = r.len("stages", MAX_STAGES, 4)?;
        let mut stages = Vec::with_capacity(n);
        for _ in 0..n {
            stages.push(r.u32()?);
        }
        let version = r.str("version", MAX_VERSION_LEN)?.to_owned();
        let signature = r.array::<64>()?;
        Ok(PeerRecord {
            public_key,
            peer_id,
            run_id,
            seq,
            issued_at,
            expires_at,
            info: RecordInfo {
                addrs,
                stages,
                throughput,
                state,
                version,
                reach,
            },
            signature,
        })
    }
}
