//! Membership: signed peer records and the gossip state machine.
//!
//! Every peer announces a [`PeerRecord`] (id, key, addresses, run, stages served, throughput, state,
//! version, issue and expiry times, sequence number) signed with its identity key over a canonical,
//! domain-separated encoding of every field. Peers exchange records push-pull with a few random
//! peers every few seconds; a record is kept until it expires, so a peer that vanishes leaves every
//! view within one record lifetime, and a LEAVING record removes it from the live set at once.
//!
//! [`Membership`] is a deterministic state machine in the quinn-proto style: no sockets, no clock,
//! randomness passed in. The caller (`peer.rs`) feeds it records with `handle_records(now, ..)`,
//! asks whom to gossip with via `poll_gossip_targets(now, rng)`, and calls `expire(now)` and
//! `refresh_local(now)` when `poll_timeout()` says so. Time is wall-clock milliseconds since the
//! Unix epoch, because expiry times are compared across machines.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;

use rand::Rng;
use rand::seq::IndexedRandom;
use serde::{Deserialize, Serialize};

use swarm_nat::{PathKind, Reachability};

use crate::identity::{self, Identity, PeerId};
use crate::wire::{KindInfo, NET_KINDS, Reader, WireError, WireMessage, Writer, kind};

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
    pub peer_id: PeerId,
    pub run_id: RunId,
    /// Strictly increasing per peer; a record is only replaced by one with a higher `seq`.
    pub seq: u64,
    pub issued_at: UnixMillis,
    pub expires_at: UnixMillis,
    pub info: RecordInfo,
    pub signature: [u8; 64],
}

/// A record whose shape, id/key binding and signature have been checked
/// ([`PeerRecord::into_verified`]); the run, time and staleness checks still apply when stored.
#[derive(Clone, Debug, PartialEq)]
pub struct Verified(PeerRecord);

impl Verified {
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

    fn encode_fields(&self, w: &mut Writer) {
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

/// Timing and limits of membership. Defaults suit real swarms on home links; tests shrink them.
#[derive(Clone, Debug)]
pub struct MembershipConfig {
    /// Lifetime of the records this peer signs. A peer killed without a goodbye leaves every view
    /// at most this long after its last refresh.
    pub record_ttl_ms: u64,
    /// How often this peer re-signs its record (must be well under the ttl so that gossip can carry
    /// the fresh one everywhere before the old one expires).
    pub refresh_interval_ms: u64,
    /// Interval between gossip rounds.
    pub gossip_interval_ms: u64,
    /// Peers contacted per gossip round.
    pub fanout: usize,
    /// Lifetime of the LEAVING record, kept as a tombstone so that older ONLINE records of the
    /// departed peer are refused as stale while they still circulate.
    pub leave_ttl_ms: u64,
    /// Tolerated clock difference between peers.
    pub max_clock_skew_ms: u64,
    /// Longest lifetime accepted from others (bounds how long a record can pin a slot).
    pub max_ttl_ms: u64,
    /// Most peers held in the view (a bound on memory whatever others send).
    pub max_peers: usize,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        MembershipConfig {
            record_ttl_ms: 60_000,
            refresh_interval_ms: 15_000,
            gossip_interval_ms: 2_000,
            fanout: 3,
            leave_ttl_ms: 60_000,
            max_clock_skew_ms: 30_000,
            max_ttl_ms: 10 * 60_000,
            max_peers: 10_000,
        }
    }
}

impl MembershipConfig {
    /// Fast timing for tests: everything scaled from one record lifetime.
    pub fn with_ttl(record_ttl_ms: u64) -> Self {
        MembershipConfig {
            record_ttl_ms,
            refresh_interval_ms: (record_ttl_ms / 4).max(1),
            gossip_interval_ms: (record_ttl_ms / 10).max(1),
            leave_ttl_ms: record_ttl_ms,
            ..MembershipConfig::default()
        }
    }
}

/// One peer in the view.
#[derive(Clone, Debug)]
pub struct ViewEntry {
    pub record: PeerRecord,
    /// When this peer last heard something first-hand or fresh about it: the arrival of its newest
    /// record, or a successful exchange with it.
    pub last_seen: UnixMillis,
}

/// Whom to gossip with: a known peer, or a seed address when nobody is known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GossipTarget {
    /// `None` for a seed (bootstrap) address whose id is not known yet.
    pub peer: Option<PeerId>,
    pub addr: SocketAddr,
}

/// What `handle_records` did with a batch.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HandleOutcome {
    /// Peers whose record was new or newer and is now held.
    pub accepted: Vec<PeerId>,
    /// Records not taken, with the peer they claimed to be and why.
    pub refused: Vec<(PeerId, Refusal)>,
}

impl HandleOutcome {
    /// Refusals that point at a dishonest or broken sender rather than ordinary gossip overlap.
    pub fn suspicious(&self) -> usize {
        self.refused
            .iter()
            .filter(|(_, r)| {
                matches!(
                    r,
                    Refusal::BadSignature
                        | Refusal::IdKeyMismatch
                        | Refusal::Malformed
                        | Refusal::TooFarFuture
                )
            })
            .count()
    }
}

/// The membership state machine of one peer. See the module docs.
#[derive(Debug)]
pub struct Membership {
    identity: Identity,
    run_id: RunId,
    config: MembershipConfig,
    local: PeerRecord,
    peers: HashMap<PeerId, ViewEntry>,
    seeds: Vec<SocketAddr>,
    next_gossip: UnixMillis,
}

impl Membership {
    /// Starts membership for `identity` in `run_id`, announcing `info` from `now`. `seeds` are
    /// addresses to fall back to whenever no live peer is known (e.g. the bootstrap peer).
    pub fn new(
        identity: Identity,
        run_id: RunId,
        config: MembershipConfig,
        info: RecordInfo,
        seeds: Vec<SocketAddr>,
        now: UnixMillis,
    ) -> Membership {
        // The sequence starts at the clock so that a restarted peer (same key, counter lost) still
        // announces records newer than the ones it left behind.
        let local = PeerRecord::sign(&identity, run_id, now, now, config.record_ttl_ms, info);
        Membership {
            identity,
            run_id,
            config,
            local,
            peers: HashMap::new(),
            seeds,
            next_gossip: now,
        }
    }

    pub fn run_id(&self) -> RunId {
        self.run_id
    }

    pub fn peer_id(&self) -> PeerId {
        self.identity.peer_id()
    }

    pub fn config(&self) -> &MembershipConfig {
        &self.config
    }

    /// This peer's current signed record.
    pub fn local_record(&self) -> &PeerRecord {
        &self.local
    }

    /// Changes what this peer announces (stages, throughput, state, addresses) and re-signs.
    pub fn update_local(&mut self, now: UnixMillis, f: impl FnOnce(&mut RecordInfo)) {
        let mut info = self.local.info.clone();
        f(&mut info);
        self.resign(now, info);
    }

    fn resign(&mut self, now: UnixMillis, info: RecordInfo) {
        let seq = self.local.seq.saturating_add(1).max(now);
        let ttl = if info.state == PeerState::Leaving {
            self.config.leave_ttl_ms
        } else {
            self.config.record_ttl_ms
        };
        self.local = PeerRecord::sign(&self.identity, self.run_id, seq, now, ttl, info);
    }

    /// Re-signs the local record if it is due for refresh; returns whether it did.
    pub fn refresh_local(&mut self, now: UnixMillis) -> bool {
        if self.local.info.state == PeerState::Leaving
            || now
                < self
                    .local
                    .issued_at
                    .saturating_add(self.config.refresh_interval_ms)
        {
            return false;
        }
        let info = self.local.info.clone();
        self.resign(now, info);
        true
    }

    /// Announces LEAVING: returns the record to push to a few peers before closing.
    pub fn leave(&mut self, now: UnixMillis) -> PeerRecord {
        self.update_local(now, |i| i.state = PeerState::Leaving);
        self.local.clone()
    }

    /// Every check but the signature: shape, run, time window, self, staleness. Cheap.
    fn check_cheap(&self, now: UnixMillis, record: &PeerRecord) -> Result<(), Refusal> {
        record.check_shape()?;
        if record.run_id != self.run_id {
            return Err(Refusal::WrongRun);
        }
        if record.expires_at <= now {
            return Err(Refusal::Expired);
        }
        let skew = self.config.max_clock_skew_ms;
        if record.issued_at > now.saturating_add(skew)
            || record.expires_at.saturating_sub(record.issued_at) > self.config.max_ttl_ms
        {
            return Err(Refusal::TooFarFuture);
        }
        if record.peer_id == self.identity.peer_id() {
            return Err(Refusal::SelfRecord);
        }
        if let Some(held) = self.peers.get(&record.peer_id)
            && record.seq <= held.record.seq
        {
            return Err(Refusal::Stale);
        }
        Ok(())
    }

    /// Checks one record against the time window, the run and the held one, without storing it.
    ///
    /// The cheap checks run first and the signature last: in gossip most records are duplicates
    /// of held ones, and those are refused as stale without an ed25519 verification.
    pub fn check(&self, now: UnixMillis, record: &PeerRecord) -> Result<(), Refusal> {
        self.check_cheap(now, record)?;
        record.verify()
    }

    /// First half of [`Membership::handle_records`], for callers that verify signatures outside
    /// a lock: returns the records worth verifying and the ones refused by the cheap checks. A
    /// record of ourselves newer than ours is passed on (it may make us jump our sequence).
    pub fn triage(
        &self,
        now: UnixMillis,
        records: impl IntoIterator<Item = PeerRecord>,
    ) -> (Vec<PeerRecord>, Vec<(PeerId, Refusal)>) {
        let mut pass = Vec::new();
        let mut refused = Vec::new();
        for record in records {
            match self.check_cheap(now, &record) {
                Ok(()) => pass.push(record),
                Err(Refusal::SelfRecord) if record.seq >= self.local.seq => pass.push(record),
                Err(r) => refused.push((record.peer_id, r)),
            }
        }
        (pass, refused)
    }

    /// Second half of [`Membership::handle_records`]: stores verified records that still pass
    /// the cheap checks (the state may have changed since `triage`).
    pub fn handle_verified(
        &mut self,
        now: UnixMillis,
        records: impl IntoIterator<Item = Verified>,
    ) -> HandleOutcome {
        let mut out = HandleOutcome::default();
        for Verified(record) in records {
            let id = record.peer_id;
            if let Err(refusal) = self.check_cheap(now, &record) {
                if refusal == Refusal::SelfRecord && record.seq >= self.local.seq {
                    // A valid record of ours newer than the one we hold was signed by an earlier
                    // run of this process: jump past it so ours wins everywhere.
                    self.local.seq = record.seq;
                    let info = self.local.info.clone();
                    self.resign(now, info);
                }
                out.refused.push((id, refusal));
                continue;
            }
            if !self.peers.contains_key(&id) && self.peers.len() >= self.config.max_peers {
                out.refused.push((id, Refusal::ViewFull));
                continue;
            }
            self.peers.insert(
                id,
                ViewEntry {
                    record,
                    last_seen: now,
                },
            );
            out.accepted.push(id);
        }
        out
    }

    /// Takes a batch of records from gossip: each is checked and stored if newer than the held
    /// one. (`triage`, then `PeerRecord::into_verified`, then `handle_verified`.)
    pub fn handle_records(
        &mut self,
        now: UnixMillis,
        records: impl IntoIterator<Item = PeerRecord>,
    ) -> HandleOutcome {
        let (pass, mut refused) = self.triage(now, records);
        let verified = verify_all(pass, &mut refused);
        let mut out = self.handle_verified(now, verified);
        refused.append(&mut out.refused);
        out.refused = refused;
        out
    }

    /// Notes a successful direct exchange with `peer` (it is alive right now).
    pub fn handle_contact(&mut self, now: UnixMillis, peer: PeerId) {
        if let Some(e) = self.peers.get_mut(&peer) {
            e.last_seen = e.last_seen.max(now);
        }
    }

    /// Drops every record that has expired; returns whose.
    pub fn expire(&mut self, now: UnixMillis) -> Vec<PeerId> {
        let mut gone: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, e)| e.record.expires_at <= now)
            .map(|(id, _)| *id)
            .collect();
        gone.sort();
        for id in &gone {
            self.peers.remove(id);
        }
        gone
    }

    /// Picks the peers to gossip with if a round is due (else nothing), and schedules the next
    /// round. Live peers (not LEAVING) with an address are chosen uniformly; with none, the seeds.
    pub fn poll_gossip_targets<R: Rng + ?Sized>(
        &mut self,
        now: UnixMillis,
        rng: &mut R,
    ) -> Vec<GossipTarget> {
        if now < self.next_gossip {
            return Vec::new();
        }
        // Up to 10% jitter so that peers started together do not gossip in lockstep.
        let interval = self.config.gossip_interval_ms;
        self.next_gossip = now + interval + rng.random_range(0..=interval / 10);
        let mut live: Vec<GossipTarget> = self
            .live()
            .filter_map(|e| {
                e.record.info.addrs.first().map(|a| GossipTarget {
                    peer: Some(e.record.peer_id),
                    addr: *a,
                })
            })
            .collect();
        // HashMap order is random per process: sort so a seeded rng gives the same choice.
        live.sort_by_key(|t| t.peer);
        if live.is_empty() {
            return self
                .seeds
                .choose_multiple(rng, self.config.fanout)
                .map(|a| GossipTarget {
                    peer: None,
                    addr: *a,
                })
                .collect();
        }
        live.choose_multiple(rng, self.config.fanout)
            .cloned()
            .collect()
    }

    /// The next time something is due: a gossip round, a refresh of the local record, or an expiry.
    pub fn poll_timeout(&self) -> UnixMillis {
        let refresh = if self.local.info.state == PeerState::Leaving {
            UnixMillis::MAX
        } else {
            self.local.issued_at + self.config.refresh_interval_ms
        };
        let expiry = self
            .peers
            .values()
            .map(|e| e.record.expires_at)
            .min()
            .unwrap_or(UnixMillis::MAX);
        self.next_gossip.min(refresh).min(expiry)
    }

    /// Records to send in a gossip exchange: ours first, then every held one (LEAVING included, so
    /// departures spread), at most `MAX_RECORDS_PER_MESSAGE`.
    pub fn records_for_exchange(&self) -> Vec<PeerRecord> {
        std::iter::once(&self.local)
            .chain(self.peers.values().map(|e| &e.record))
            .take(MAX_RECORDS_PER_MESSAGE)
            .cloned()
            .collect()
    }

    /// What this peer holds, as (id, seq) pairs: ours first, then every held record. Sent instead
    /// of the records themselves so that an exchange costs 40 bytes per known peer, plus only the
    /// records that actually differ.
    pub fn digest(&self) -> Vec<Digest> {
        std::iter::once(&self.local)
            .chain(self.peers.values().map(|e| &e.record))
            .take(MAX_RECORDS_PER_MESSAGE)
            .map(|r| Digest {
                peer: r.peer_id,
                seq: r.seq,
            })
            .collect()
    }

    /// Compares a remote digest with what this peer holds at `now`: returns the unexpired records
    /// the remote lacks or holds older (ours included), and the ids of which the remote holds a
    /// newer record than we do (to ask for).
    pub fn diff(&self, now: UnixMillis, remote: &[Digest]) -> (Vec<PeerRecord>, Vec<PeerId>) {
        let theirs: HashMap<PeerId, u64> = remote.iter().map(|d| (d.peer, d.seq)).collect();
        let newer: Vec<PeerRecord> = std::iter::once(&self.local)
            .chain(self.peers.values().map(|e| &e.record))
            .filter(|r| r.expires_at > now && theirs.get(&r.peer_id).is_none_or(|s| *s < r.seq))
            .take(MAX_RECORDS_PER_MESSAGE)
            .cloned()
            .collect();
        let me = self.identity.peer_id();
        let want: Vec<PeerId> = remote
            .iter()
            .filter(|d| {
                d.peer != me && self.peers.get(&d.peer).is_none_or(|e| e.record.seq < d.seq)
            })
            .map(|d| d.peer)
            .take(MAX_RECORDS_PER_MESSAGE)
            .collect();
        (newer, want)
    }

    /// The held records (ours included) of `ids`, for answering a `want` list.
    pub fn records_of(&self, ids: &[PeerId]) -> Vec<PeerRecord> {
        ids.iter()
            .filter_map(|id| {
                if *id == self.identity.peer_id() {
                    Some(&self.local)
                } else {
                    self.peers.get(id).map(|e| &e.record)
                }
            })
            .take(MAX_RECORDS_PER_MESSAGE)
            .cloned()
            .collect()
    }

    /// Every held peer, LEAVING ones included, sorted by id.
    pub fn view(&self) -> Vec<&ViewEntry> {
        let mut v: Vec<&ViewEntry> = self.peers.values().collect();
        v.sort_by_key(|e| e.record.peer_id);
        v
    }

    /// Peers that are JOINING or ONLINE (the ones to route to and gossip with).
    pub fn live(&self) -> impl Iterator<Item = &ViewEntry> {
        self.peers
            .values()
            .filter(|e| e.record.info.state != PeerState::Leaving)
    }

    /// The held entry for `peer`.
    pub fn get(&self, peer: &PeerId) -> Option<&ViewEntry> {
        self.peers.get(peer)
    }
}

// ---------------------------------------------------------------------------------------------
// Messages. The newcomer sends `JoinRequest` to its bootstrap and learns the run, its own address
// as seen from outside, and the bootstrap's full view. After that, an exchange is anti-entropy by
// digest (as in Scuttlebutt / Cassandra): A sends `GossipPush { records: [A's own], digest: A's
// (id, seq) list }`; B takes the records and answers `GossipReply { records: those A lacks or holds
// older, want: ids A holds newer }`; if `want` is not empty A sends those records in a
// `GossipPush` without digest (push only; B answers an empty reply). A LEAVING announcement is
// such a push-only message. `StatusRequest` asks a peer for its view with last-seen ages.

fn encode_records(w: &mut Writer, records: &[PeerRecord]) {
    w.len_prefix(records.len());
    for r in records {
        r.encode(w);
    }
}

/// Smallest encoded record (no addresses, stages or version), for the count check.
const MIN_RECORD_LEN: usize = 32 + 32 + 16 + 8 * 3 + 1 + 8 + 1 + 1 + 1 + 1 + 64;

fn decode_records(r: &mut Reader<'_>) -> Result<Vec<PeerRecord>, WireError> {
    let n = r.len("records", MAX_RECORDS_PER_MESSAGE, MIN_RECORD_LEN)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(PeerRecord::decode(r)?);
    }
    Ok(out)
}

/// One entry of a digest: a peer and the sequence number of the record held for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Digest {
    pub peer: PeerId,
    pub seq: u64,
}

/// Opening of a gossip exchange: records pushed (the sender's own, or wanted ones), and with
/// `digest` what the sender holds, asking for what it lacks. Without a digest: push only.
#[derive(Clone, Debug, PartialEq)]
pub struct GossipPush {
    pub records: Vec<PeerRecord>,
    pub digest: Option<Vec<Digest>>,
}

/// Answer to a [`GossipPush`]: records the sender lacks or holds older, and the ids of which the
/// sender holds newer records (it pushes them next). Both empty for a push-only message.
#[derive(Clone, Debug, PartialEq)]
pub struct GossipReply {
    pub records: Vec<PeerRecord>,
    pub want: Vec<PeerId>,
}

impl WireMessage for GossipPush {
    const INFO: &'static KindInfo = NET_KINDS.row(kind::GOSSIP);
    fn encode(&self, w: &mut Writer) {
        encode_records(w, &self.records);
        w.bool(self.digest.is_some());
        if let Some(d) = &self.digest {
            w.len_prefix(d.len());
            for e in d {
                w.array(&e.peer.0).u64(e.seq);
            }
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let records = decode_records(r)?;
        let digest = if r.bool()? {
            let n = r.len("digest", MAX_RECORDS_PER_MESSAGE, 40)?;
            let mut d = Vec::with_capacity(n);
            for _ in 0..n {
                d.push(Digest {
                    peer: PeerId(r.array()?),
                    seq: r.u64()?,
                });
            }
            Some(d)
        } else {
            None
        };
        Ok(GossipPush { records, digest })
    }
}

impl WireMessage for GossipReply {
    const INFO: &'static KindInfo = NET_KINDS.row(kind::GOSSIP_REPLY);
    fn encode(&self, w: &mut Writer) {
        encode_records(w, &self.records);
        w.len_prefix(self.want.len());
        for id in &self.want {
            w.array(&id.0);
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let records = decode_records(r)?;
        let n = r.len("want", MAX_RECORDS_PER_MESSAGE, 32)?;
        let mut want = Vec::with_capacity(n);
        for _ in 0..n {
            want.push(PeerId(r.array()?));
        }
        Ok(GossipReply { records, want })
    }
}

/// A newcomer's first request to its bootstrap peer (it does not know the run yet).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinRequest;

/// The bootstrap's answer: the run to join, the newcomer's address as the bootstrap sees it (so a
/// peer listening on 0.0.0.0 can announce something reachable), and the bootstrap's records.
#[derive(Clone, Debug, PartialEq)]
pub struct JoinReply {
    pub run_id: RunId,
    pub observed_addr: SocketAddr,
    pub records: Vec<PeerRecord>,
}

impl WireMessage for JoinRequest {
    const INFO: &'static KindInfo = NET_KINDS.row(kind::JOIN);
    fn encode(&self, _w: &mut Writer) {}
    fn decode(_r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(JoinRequest)
    }
}

impl WireMessage for JoinReply {
    const INFO: &'static KindInfo = NET_KINDS.row(kind::JOIN_REPLY);
    fn encode(&self, w: &mut Writer) {
        w.array(&self.run_id.0);
        w.socket_addr(&self.observed_addr);
        encode_records(w, &self.records);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(JoinReply {
            run_id: RunId(r.array()?),
            observed_addr: r.socket_addr()?,
            records: decode_records(r)?,
        })
    }
}

/// Asks a peer for its view (`swarm status`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusRequest;

/// One peer as the answering peer sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusEntry {
    pub record: PeerRecord,
    /// Milliseconds since the answering peer last heard from or about it.
    pub last_seen_ago_ms: u64,
    /// How the answering peer's connection to it runs, if it has one.
    pub path: Option<PathKind>,
}

/// A peer's view: its own record first (seen 0 ms ago), then every record it holds.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusReply {
    pub run_id: RunId,
    pub entries: Vec<StatusEntry>,
}

impl WireMessage for StatusRequest {
    const INFO: &'static KindInfo = NET_KINDS.row(kind::STATUS);
    fn encode(&self, _w: &mut Writer) {}
    fn decode(_r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(StatusRequest)
    }
}

impl WireMessage for StatusReply {
    const INFO: &'static KindInfo = NET_KINDS.row(kind::STATUS_REPLY);
    fn encode(&self, w: &mut Writer) {
        w.array(&self.run_id.0);
        w.len_prefix(self.entries.len());
        for e in &self.entries {
            e.record.encode(w);
            w.varint(e.last_seen_ago_ms);
            w.u8(match e.path {
                None => 0,
                Some(PathKind::Direct) => 1,
                Some(PathKind::Punched) => 2,
                Some(PathKind::Relayed) => 3,
            });
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let run_id = RunId(r.array()?);
        let n = r.len(
            "status entries",
            MAX_RECORDS_PER_MESSAGE,
            MIN_RECORD_LEN + 2,
        )?;
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            let record = PeerRecord::decode(r)?;
            let last_seen_ago_ms = r.varint()?;
            let path = match r.u8()? {
                0 => None,
                1 => Some(PathKind::Direct),
                2 => Some(PathKind::Punched),
                3 => Some(PathKind::Relayed),
                tag => {
                    return Err(WireError::BadTag {
                        what: "path kind",
                        tag: tag as u64,
                    });
                }
            };
            entries.push(StatusEntry {
                record,
                last_seen_ago_ms,
                path,
            });
        }
        Ok(StatusReply { run_id, entries })
    }
}

impl Membership {
    /// This peer's view as a status answer at `now`.
    pub fn status(&self, now: UnixMillis) -> StatusReply {
        let mut entries = vec![StatusEntry {
            record: self.local.clone(),
            last_seen_ago_ms: 0,
            path: None,
        }];
        entries.extend(
            self.view()
                .into_iter()
                .take(MAX_RECORDS_PER_MESSAGE - 1)
                .map(|e| StatusEntry {
                    record: e.record.clone(),
                    last_seen_ago_ms: now.saturating_sub(e.last_seen),
                    path: None,
                }),
        );
        StatusReply {
            run_id: self.run_id,
            entries,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{decode_body, encode_body};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    const RUN: RunId = RunId([7; 16]);
    const T0: UnixMillis = 1_700_000_000_000;

    fn ident(n: u8) -> Identity {
        Identity::from_secret([n; 32])
    }

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 9000 + n as u16))
    }

    fn info(n: u8) -> RecordInfo {
        RecordInfo {
            addrs: vec![addr(n)],
            stages: vec![n as u32 % 3],
            throughput: 100.0 * n as f64,
            state: PeerState::Online,
            version: "0.1.0".into(),
            reach: swarm_nat::Reachability::Punchable,
        }
    }

    fn record(n: u8, seq: u64, now: UnixMillis) -> PeerRecord {
        PeerRecord::sign(&ident(n), RUN, seq, now, 60_000, info(n))
    }

    fn member(n: u8, config: MembershipConfig, now: UnixMillis) -> Membership {
        Membership::new(ident(n), RUN, config, info(n), vec![], now)
    }

    fn round_trip(r: &PeerRecord) -> PeerRecord {
        let mut w = Writer::new();
        r.encode(&mut w);
        let bytes = w.into_vec();
        assert!(bytes.len() <= MAX_RECORD_LEN);
        let mut rd = Reader::new(&bytes);
        let back = PeerRecord::decode(&mut rd).unwrap();
        rd.finish().unwrap();
        back
    }

    #[test]
    fn record_round_trips_and_verifies() {
        let mut r = record(1, 5, T0);
        r.info.addrs.push("[::1]:7000".parse().unwrap());
        r = PeerRecord::sign(&ident(1), RUN, 5, T0, 60_000, r.info.clone());
        let back = round_trip(&r);
        assert_eq!(back, r);
        assert_eq!(back.verify(), Ok(()));
    }

    #[test]
    fn every_field_is_covered_by_the_signature() {
        let good = record(1, 5, T0);
        let other = ident(2);
        let tampered: Vec<PeerRecord> = vec![
            PeerRecord {
                run_id: RunId([8; 16]),
                ..good.clone()
            },
            PeerRecord {
                seq: 6,
                ..good.clone()
            },
            PeerRecord {
                issued_at: T0 + 1,
                ..good.clone()
            },
            PeerRecord {
                expires_at: T0 + 70_000,
                ..good.clone()
            },
            {
                let mut r = good.clone();
                r.info.addrs[0] = addr(9);
                r
            },
            {
                let mut r = good.clone();
                r.info.stages.push(2);
                r
            },
            {
                let mut r = good.clone();
                r.info.throughput += 1.0;
                r
            },
            {
                let mut r = good.clone();
                r.info.state = PeerState::Leaving;
                r
            },
            {
                let mut r = good.clone();
                r.info.version.push('x');
                r
            },
            {
                let mut r = good.clone();
                r.signature[10] ^= 1;
                r
            },
        ];
        for (i, r) in tampered.iter().enumerate() {
            assert_eq!(r.verify(), Err(Refusal::BadSignature), "case {i}");
        }
        // Claiming another peer's id with our own key: the id no longer hashes from the key.
        let forged = PeerRecord {
            peer_id: other.peer_id(),
            ..good.clone()
        };
        assert_eq!(forged.verify(), Err(Refusal::IdKeyMismatch));
        // Another peer's key and id, signed by us: the signature fails.
        let mut forged = good.clone();
        forged.public_key = other.public_key().to_bytes();
        forged.peer_id = other.peer_id();
        assert_eq!(forged.verify(), Err(Refusal::BadSignature));
    }

    #[test]
    fn signature_is_domain_separated() {
        let r = record(1, 5, T0);
        let mut w = Writer::new();
        r.encode_fields(&mut w);
        // A signature over the same fields without the domain tag does not verify.
        let mut undomained = r.clone();
        undomained.signature = ident(1).sign(w.as_slice());
        assert_eq!(undomained.verify(), Err(Refusal::BadSignature));
        assert!(r.signing_bytes().starts_with(RECORD_DOMAIN));
    }

    #[test]
    fn caps_are_enforced_when_signing_and_decoding() {
        let mut i = info(1);
        i.version = "v".repeat(MAX_VERSION_LEN + 1);
        let r = PeerRecord::sign(&ident(1), RUN, 1, T0, 1000, i);
        assert_eq!(r.verify(), Err(Refusal::Malformed));
        let mut w = Writer::new();
        r.encode(&mut w);
        assert!(matches!(
            PeerRecord::decode(&mut Reader::new(w.as_slice())),
            Err(WireError::TooLong {
                what: "version",
                ..
            })
        ));

        let mut i = info(1);
        i.addrs = vec![addr(1); MAX_ADDRS + 1];
        let r = PeerRecord::sign(&ident(1), RUN, 1, T0, 1000, i);
        assert_eq!(r.verify(), Err(Refusal::Malformed));
        let mut w = Writer::new();
        r.encode(&mut w);
        assert!(matches!(
            PeerRecord::decode(&mut Reader::new(w.as_slice())),
            Err(WireError::TooLong {
                what: "addresses",
                ..
            })
        ));

        for bad in [f64::NAN, f64::INFINITY, -1.0] {
            let mut i = info(1);
            i.throughput = bad;
            let r = PeerRecord::sign(&ident(1), RUN, 1, T0, 1000, i);
            assert_eq!(r.verify(), Err(Refusal::Malformed));
        }
    }

    #[test]
    fn largest_messages_fit_their_kind_limits() {
        let mut i = info(1);
        i.addrs = vec!["[::1]:1".parse().unwrap(); MAX_ADDRS];
        i.stages = vec![u32::MAX; MAX_STAGES];
        i.version = "v".repeat(MAX_VERSION_LEN);
        let r = PeerRecord::sign(&ident(1), RUN, u64::MAX, T0, 1000, i);
        let mut w = Writer::new();
        r.encode(&mut w);
        assert!(w.len() <= MAX_RECORD_LEN, "{} > {MAX_RECORD_LEN}", w.len());
        let push = GossipPush {
            records: vec![r.clone(); MAX_RECORDS_PER_MESSAGE],
            digest: Some(vec![
                Digest {
                    peer: r.peer_id,
                    seq: u64::MAX
                };
                MAX_RECORDS_PER_MESSAGE
            ]),
        };
        let body = encode_body(&push).unwrap();
        assert_eq!(decode_body::<GossipPush>(&body).unwrap(), push);
        let reply = GossipReply {
            records: vec![r.clone(); MAX_RECORDS_PER_MESSAGE],
            want: vec![r.peer_id; MAX_RECORDS_PER_MESSAGE],
        };
        let body = encode_body(&reply).unwrap();
        assert_eq!(decode_body::<GossipReply>(&body).unwrap(), reply);
        let status = StatusReply {
            run_id: RUN,
            entries: vec![
                StatusEntry {
                    record: r,
                    last_seen_ago_ms: u64::MAX,
                    path: Some(PathKind::Relayed),
                };
                MAX_RECORDS_PER_MESSAGE
            ],
        };
        let body = encode_body(&status).unwrap();
        assert_eq!(decode_body::<StatusReply>(&body).unwrap(), status);
    }

    #[test]
    fn messages_round_trip_and_refuse_truncation() {
        let records = vec![record(1, 1, T0), record(2, 9, T0)];
        let join = JoinReply {
            run_id: RUN,
            observed_addr: "[2001:db8::1]:443".parse().unwrap(),
            records: records.clone(),
        };
        let body = encode_body(&join).unwrap();
        assert_eq!(decode_body::<JoinReply>(&body).unwrap(), join);
        for cut in 0..body.len() {
            assert!(decode_body::<JoinReply>(&body[..cut]).is_err(), "cut {cut}");
        }
        let reply = GossipReply {
            records: records.clone(),
            want: vec![ident(5).peer_id()],
        };
        let body = encode_body(&reply).unwrap();
        assert_eq!(decode_body::<GossipReply>(&body).unwrap(), reply);
        for push in [
            GossipPush {
                records: records.clone(),
                digest: None,
            },
            GossipPush {
                records,
                digest: Some(vec![Digest {
                    peer: ident(3).peer_id(),
                    seq: 4,
                }]),
            },
        ] {
            let body = encode_body(&push).unwrap();
            assert_eq!(decode_body::<GossipPush>(&body).unwrap(), push);
            for cut in 0..body.len() {
                assert!(
                    decode_body::<GossipPush>(&body[..cut]).is_err(),
                    "cut {cut}"
                );
            }
        }
        assert!(decode_body::<JoinRequest>(&[0]).is_err());
        assert_eq!(decode_body::<StatusRequest>(&[]).unwrap(), StatusRequest);
    }

    #[test]
    fn hostile_counts_do_not_allocate() {
        // Claims 4096 records with no bytes behind the count.
        let mut w = Writer::new();
        w.varint(MAX_RECORDS_PER_MESSAGE as u64);
        assert!(matches!(
            decode_body::<GossipPush>(w.as_slice()),
            Err(WireError::TooLong { .. })
        ));
        let mut w = Writer::new();
        w.varint(u64::MAX);
        assert!(matches!(
            decode_body::<GossipPush>(w.as_slice()),
            Err(WireError::TooLong { .. })
        ));
    }

    #[test]
    fn bad_state_and_address_tags_are_refused() {
        let r = record(1, 1, T0);
        let mut w = Writer::new();
        r.encode(&mut w);
        let mut bytes = w.into_vec();
        let state_at = 32 + 32 + 16 + 8 * 3;
        bytes[state_at] = 3;
        assert!(matches!(
            PeerRecord::decode(&mut Reader::new(&bytes)),
            Err(WireError::BadTag {
                what: "peer state",
                ..
            })
        ));
        bytes[state_at] = 1;
        let family_at = state_at + 1 + 8 + 1;
        bytes[family_at] = 5;
        assert!(matches!(
            PeerRecord::decode(&mut Reader::new(&bytes)),
            Err(WireError::BadTag {
                what: "address family",
                ..
            })
        ));
    }

    #[test]
    fn accepts_new_and_newer_and_refuses_stale_expired_future_and_foreign() {
        let mut m = member(0, MembershipConfig::default(), T0);
        let out = m.handle_records(T0, [record(1, 5, T0), record(2, 5, T0)]);
        assert_eq!(out.accepted.len(), 2);
        assert!(out.refused.is_empty());

        // Same and older sequence numbers: stale (replays change nothing).
        let out = m.handle_records(T0 + 1, [record(1, 5, T0), record(1, 4, T0 + 1)]);
        assert_eq!(out.refused, vec![(ident(1).peer_id(), Refusal::Stale); 2]);
        assert_eq!(m.get(&ident(1).peer_id()).unwrap().last_seen, T0);

        // Newer: replaces.
        let out = m.handle_records(T0 + 2, [record(1, 6, T0 + 2)]);
        assert_eq!(out.accepted, vec![ident(1).peer_id()]);
        assert_eq!(m.get(&ident(1).peer_id()).unwrap().record.seq, 6);
        assert_eq!(m.get(&ident(1).peer_id()).unwrap().last_seen, T0 + 2);

        let id3 = ident(3).peer_id();
        // Expired.
        let r = PeerRecord::sign(&ident(3), RUN, 1, T0 - 10_000, 5_000, info(3));
        assert_eq!(
            m.handle_records(T0, [r]).refused,
            vec![(id3, Refusal::Expired)]
        );
        // Issued beyond the tolerated skew.
        let r = PeerRecord::sign(&ident(3), RUN, 1, T0 + 31_000, 5_000, info(3));
        assert_eq!(
            m.handle_records(T0, [r]).refused,
            vec![(id3, Refusal::TooFarFuture)]
        );
        // A lifetime longer than anyone honest signs.
        let r = PeerRecord::sign(&ident(3), RUN, 1, T0, 11 * 60_000, info(3));
        assert_eq!(
            m.handle_records(T0, [r]).refused,
            vec![(id3, Refusal::TooFarFuture)]
        );
        // Another run.
        let r = PeerRecord::sign(&ident(3), RunId([1; 16]), 1, T0, 5_000, info(3));
        assert_eq!(
            m.handle_records(T0, [r]).refused,
            vec![(id3, Refusal::WrongRun)]
        );
        // Forged: bad signature.
        let mut r = record(3, 1, T0);
        r.info.stages = vec![0, 1, 2];
        let out = m.handle_records(T0, [r]);
        assert_eq!(out.refused, vec![(id3, Refusal::BadSignature)]);
        assert_eq!(out.suspicious(), 1);
        assert!(m.get(&id3).is_none());
        assert_eq!(m.view().len(), 2);
    }

    #[test]
    fn split_handling_rechecks_after_verification() {
        let mut m = member(0, MembershipConfig::default(), T0);
        m.handle_records(T0, [record(1, 5, T0)]);
        let mut forged = record(2, 1, T0);
        forged.info.throughput = 7.0;
        let (pass, refused) = m.triage(T0, [record(1, 5, T0), record(1, 6, T0), forged]);
        assert_eq!(refused, vec![(ident(1).peer_id(), Refusal::Stale)]);
        assert_eq!(
            pass.len(),
            2,
            "newer and unknown records go on to verification"
        );
        let mut refused = Vec::new();
        let verified = verify_all(pass, &mut refused);
        assert_eq!(refused, vec![(ident(2).peer_id(), Refusal::BadSignature)]);
        // Meanwhile (the lock was released) an even newer record of peer 1 arrived.
        m.handle_records(T0, [record(1, 7, T0)]);
        let out = m.handle_verified(T0, verified);
        assert_eq!(out.refused, vec![(ident(1).peer_id(), Refusal::Stale)]);
        assert_eq!(m.get(&ident(1).peer_id()).unwrap().record.seq, 7);
    }

    #[test]
    fn forged_newer_record_cannot_override_a_peer() {
        let mut m = member(0, MembershipConfig::default(), T0);
        m.handle_records(T0, [record(1, 5, T0)]);
        // An attacker re-signs peer 1's record with its own key but keeps 1's id.
        let mut forged = record(1, 99, T0);
        forged.info.addrs = vec![addr(66)];
        forged.public_key = ident(66).public_key().to_bytes();
        forged.signature = ident(66).sign(&forged.signing_bytes());
        let out = m.handle_records(T0, [forged]);
        assert_eq!(out.refused[0].1, Refusal::IdKeyMismatch);
        assert_eq!(
            m.get(&ident(1).peer_id()).unwrap().record.info.addrs,
            vec![addr(1)]
        );
    }

    #[test]
    fn records_expire_and_leaving_peers_stop_being_live() {
        let config = MembershipConfig::default();
        let mut m = member(0, config.clone(), T0);
        m.handle_records(T0, [record(1, 1, T0), record(2, 1, T0 + 30_000)]);
        assert_eq!(m.expire(T0 + 59_999), Vec::<PeerId>::new());
        assert_eq!(m.poll_timeout().min(T0 + 60_000), m.poll_timeout());
        assert_eq!(m.expire(T0 + 60_000), vec![ident(1).peer_id()]);
        assert_eq!(m.view().len(), 1);

        // Peer 2 leaves: its LEAVING record replaces the ONLINE one, it is no longer live, and the
        // old ONLINE record still circulating is refused as stale.
        let mut p2 = member(2, config, T0 + 30_000);
        let leaving = p2.leave(T0 + 61_000);
        assert_eq!(leaving.info.state, PeerState::Leaving);
        let out = m.handle_records(T0 + 61_000, [leaving]);
        assert_eq!(out.accepted.len(), 1);
        assert_eq!(m.live().count(), 0);
        assert_eq!(m.view().len(), 1);
        assert_eq!(
            m.handle_records(T0 + 61_001, [record(2, 1, T0 + 30_000)])
                .refused[0]
                .1,
            Refusal::Stale
        );
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        assert!(m.poll_gossip_targets(T0 + 62_000, &mut rng).is_empty());
        assert_eq!(m.expire(T0 + 61_000 + 60_000), vec![ident(2).peer_id()]);
    }

    #[test]
    fn own_record_refreshes_with_growing_sequence() {
        let config = MembershipConfig::default();
        let mut m = member(0, config.clone(), T0);
        let first = m.local_record().clone();
        assert_eq!(first.seq, T0);
        assert!(!m.refresh_local(T0 + config.refresh_interval_ms - 1));
        assert!(m.refresh_local(T0 + config.refresh_interval_ms));
        let second = m.local_record().clone();
        assert!(second.seq > first.seq);
        assert_eq!(
            second.expires_at,
            T0 + config.refresh_interval_ms + config.record_ttl_ms
        );
        assert_eq!(second.verify(), Ok(()));
        m.update_local(T0 + config.refresh_interval_ms, |i| {
            i.stages = vec![4, 5];
            i.throughput = 1234.5;
        });
        assert!(m.local_record().seq > second.seq);
        assert_eq!(m.local_record().info.stages, vec![4, 5]);
        // A record of ours from an earlier life with a higher seq: ours jumps past it.
        let ghost = PeerRecord::sign(&ident(0), RUN, T0 * 2, T0, 60_000, info(0));
        let out = m.handle_records(T0 + 20_000, [ghost]);
        assert_eq!(out.refused[0].1, Refusal::SelfRecord);
        assert!(m.local_record().seq > T0 * 2);
    }

    #[test]
    fn gossip_targets_are_random_live_peers_or_seeds() {
        let config = MembershipConfig {
            fanout: 2,
            ..MembershipConfig::default()
        };
        let seed_addr = addr(200);
        let mut m = Membership::new(ident(0), RUN, config.clone(), info(0), vec![seed_addr], T0);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        // Nobody known: the seed, with no expected id.
        assert_eq!(
            m.poll_gossip_targets(T0, &mut rng),
            vec![GossipTarget {
                peer: None,
                addr: seed_addr
            }]
        );
        // Not due again before the interval.
        assert!(m.poll_gossip_targets(T0 + 1, &mut rng).is_empty());
        m.handle_records(T0, (1..=5).map(|n| record(n, 1, T0)));
        let mut counts = HashMap::new();
        let mut now = T0;
        // No `expire` calls here: the loop measures the choice, not expiry.
        for _ in 0..100 {
            now = m.next_gossip.max(now);
            let t = m.poll_gossip_targets(now, &mut rng);
            if t.is_empty() {
                continue;
            }
            assert_eq!(t.len(), 2);
            assert_ne!(t[0], t[1]);
            for g in t {
                let id = g.peer.unwrap();
                assert_eq!(m.get(&id).unwrap().record.info.addrs[0], g.addr);
                *counts.entry(id).or_insert(0u32) += 1;
            }
        }
        assert_eq!(counts.len(), 5, "every live peer gets picked: {counts:?}");
    }

    #[test]
    fn gossip_choice_is_reproducible_from_the_seed() {
        let pick = |seed| {
            let mut m = member(0, MembershipConfig::default(), T0);
            m.handle_records(T0, (1..=20).map(|n| record(n, 1, T0)));
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            m.poll_gossip_targets(T0, &mut rng)
        };
        assert_eq!(pick(9), pick(9));
        assert_ne!(pick(9), pick(10));
    }

    #[test]
    fn view_is_bounded() {
        let config = MembershipConfig {
            max_peers: 3,
            ..MembershipConfig::default()
        };
        let mut m = member(0, config, T0);
        let out = m.handle_records(T0, (1..=5).map(|n| record(n, 1, T0)));
        assert_eq!(out.accepted.len(), 3);
        assert_eq!(out.refused.len(), 2);
        assert!(out.refused.iter().all(|(_, r)| *r == Refusal::ViewFull));
        // A known peer can still update.
        let known = out.accepted[0];
        let n = (1..=5).find(|n| ident(*n).peer_id() == known).unwrap();
        assert_eq!(
            m.handle_records(T0, [record(n, 2, T0)]).accepted,
            vec![known]
        );
    }

    fn pair(v: &mut [Membership], i: usize, j: usize) -> (&mut Membership, &mut Membership) {
        assert_ne!(i, j);
        if i < j {
            let (lo, hi) = v.split_at_mut(j);
            (&mut lo[i], &mut hi[0])
        } else {
            let (lo, hi) = v.split_at_mut(i);
            (&mut hi[0], &mut lo[j])
        }
    }

    /// Sends `m` through its wire encoding, as the network would.
    fn wire<M: WireMessage>(m: &M) -> M {
        decode_body(&encode_body(m).unwrap()).unwrap()
    }

    /// One digest exchange initiated by `a` (what `peer.rs` does over RPC); returns the records
    /// carried, to measure the protocol's cost.
    fn exchange(a: &mut Membership, b: &mut Membership, now: UnixMillis) -> usize {
        let push = wire(&GossipPush {
            records: vec![a.local_record().clone()],
            digest: Some(a.digest()),
        });
        b.handle_records(now, push.records.clone());
        let (records, want) = b.diff(now, push.digest.as_deref().unwrap());
        let reply = wire(&GossipReply { records, want });
        a.handle_records(now, reply.records.clone());
        a.handle_contact(now, b.peer_id());
        let wanted = a.records_of(&reply.want);
        let carried = push.records.len() + reply.records.len() + wanted.len();
        if !wanted.is_empty() {
            b.handle_records(
                now,
                wire(&GossipPush {
                    records: wanted,
                    digest: None,
                })
                .records,
            );
        }
        carried
    }

    #[test]
    fn digest_exchange_carries_only_what_differs() {
        let config = MembershipConfig::default();
        let mut a = member(0, config.clone(), T0);
        let mut b = member(1, config, T0);
        a.handle_records(T0, (2..=6).map(|n| record(n, 1, T0)));
        b.handle_records(T0, (5..=9).map(|n| record(n, 1, T0)));
        b.handle_records(T0, [record(5, 2, T0)]);
        // A lacks 1 (B itself), 7, 8, 9 and holds 5 older; B lacks 0 (A itself), 2, 3, 4.
        let (newer, want) = b.diff(T0, &a.digest());
        let mut newer_ids: Vec<PeerId> = newer.iter().map(|r| r.peer_id).collect();
        newer_ids.sort();
        let mut expect: Vec<PeerId> = [1, 5, 7, 8, 9]
            .iter()
            .map(|n| ident(*n).peer_id())
            .collect();
        expect.sort();
        assert_eq!(newer_ids, expect);
        let mut want = want;
        want.sort();
        let mut expect: Vec<PeerId> = [0, 2, 3, 4].iter().map(|n| ident(*n).peer_id()).collect();
        expect.sort();
        assert_eq!(want, expect);

        let carried = exchange(&mut a, &mut b, T0 + 1);
        assert_eq!(carried, 1 + 5 + 3, "own record, B's five, A's three others");
        assert_eq!(a.view().len(), 9);
        assert_eq!(b.view().len(), 9);
        assert_eq!(a.get(&ident(5).peer_id()).unwrap().record.seq, 2);
        // In sync: the next exchange carries only A's own record.
        assert_eq!(exchange(&mut a, &mut b, T0 + 2), 1);
        // Expired records are not offered.
        assert!(b.refresh_local(T0 + 60_001));
        let (newer, _) = b.diff(T0 + 60_001, &[]);
        assert_eq!(newer.len(), 1, "only B's own (fresh) record: {newer:?}");
    }

    /// Drives a small swarm of state machines with a virtual clock and perfect delivery: everyone
    /// learns everyone through one bootstrap, a silent peer expires, a leaving one drops at once.
    #[test]
    fn simulated_swarm_converges_and_forgets() {
        let config = MembershipConfig::with_ttl(10_000);
        let n = 12u8;
        let mut rng = ChaCha8Rng::seed_from_u64(42);
        let mut peers: Vec<Membership> = (0..n)
            .map(|i| {
                let seeds = if i == 0 { vec![] } else { vec![addr(0)] };
                Membership::new(ident(i), RUN, config.clone(), info(i), seeds, T0)
            })
            .collect();
        let index_of = |a: SocketAddr| (a.port() - 9000) as usize;
        let mut alive = vec![true; n as usize];
        let mut now = T0;
        let step = |peers: &mut Vec<Membership>, alive: &[bool], now, rng: &mut ChaCha8Rng| {
            for i in 0..peers.len() {
                if !alive[i] {
                    continue;
                }
                peers[i].expire(now);
                peers[i].refresh_local(now);
                for t in peers[i].poll_gossip_targets(now, rng) {
                    let j = index_of(t.addr);
                    if !alive[j] {
                        continue;
                    }
                    let (a, b) = pair(peers, i, j);
                    exchange(a, b, now);
                }
            }
        };
        let converged = |peers: &Vec<Membership>, alive: &[bool]| {
            let live = alive.iter().filter(|a| **a).count();
            peers
                .iter()
                .zip(alive)
                .filter(|(_, a)| **a)
                .all(|(p, _)| p.live().count() == live - 1)
        };
        let mut rounds = 0;
        while !converged(&peers, &alive) {
            now += 100;
            rounds += 1;
            assert!(rounds < 1000, "no convergence");
            step(&mut peers, &alive, now, &mut rng);
        }
        assert!(now - T0 < 10_000, "converged after {} ms", now - T0);

        // Peer 5 dies silently; everyone else keeps it until its record expires, then drops it.
        alive[5] = false;
        let died = now;
        let gone = ident(5).peer_id();
        let mut rounds = 0;
        while peers
            .iter()
            .zip(&alive)
            .any(|(p, a)| *a && p.get(&gone).is_some())
        {
            now += 100;
            rounds += 1;
            assert!(rounds < 1000, "dead peer never expired");
            step(&mut peers, &alive, now, &mut rng);
        }
        assert!(now - died <= config.record_ttl_ms + 100);
        assert!(converged(&peers, &alive));

        // Peer 7 leaves: it pushes LEAVING to a few peers and gossip spreads it quickly.
        let leaving = peers[7].leave(now);
        alive[7] = false;
        for j in [1usize, 2, 3] {
            peers[j].handle_records(now, [leaving.clone()]);
        }
        let left = now;
        let id7 = ident(7).peer_id();
        let mut rounds = 0;
        while peers
            .iter()
            .zip(&alive)
            .any(|(p, a)| *a && p.live().any(|e| e.record.peer_id == id7))
        {
            now += 100;
            rounds += 1;
            assert!(rounds < 1000, "leave never spread");
            step(&mut peers, &alive, now, &mut rng);
        }
        assert!(
            now - left < config.record_ttl_ms / 2,
            "leave took {} ms",
            now - left
        );
    }

    #[test]
    fn status_lists_self_first_with_ages() {
        let mut m = member(0, MembershipConfig::default(), T0);
        m.handle_records(T0, [record(1, 1, T0)]);
        let s = m.status(T0 + 2_500);
        assert_eq!(s.run_id, RUN);
        assert_eq!(s.entries.len(), 2);
        assert_eq!(s.entries[0].record.peer_id, ident(0).peer_id());
        assert_eq!(s.entries[0].last_seen_ago_ms, 0);
        assert_eq!(s.entries[1].last_seen_ago_ms, 2_500);
    }

    proptest::proptest! {
        #[test]
        fn decoding_random_bytes_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..800)) {
            let _ = decode_body::<GossipPush>(&bytes);
            let _ = decode_body::<JoinReply>(&bytes);
            let _ = decode_body::<StatusReply>(&bytes);
        }

        #[test]
        fn flipping_any_byte_of_a_record_is_caught(pos in 0usize..400, bit in 0u8..8) {
            let r = record(1, 5, T0);
            let mut w = Writer::new();
            r.encode(&mut w);
            let mut bytes = w.into_vec();
            let pos = pos % bytes.len();
            bytes[pos] ^= 1 << bit;
            if let Ok(back) = PeerRecord::decode(&mut Reader::new(&bytes)) {
                proptest::prop_assert!(back.verify().is_err());
            }
        }
    }
}
