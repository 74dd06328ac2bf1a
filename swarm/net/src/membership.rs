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
use std::net::SocketAddr;

use rand::Rng;
use rand::seq::IndexedRandom;

use crate::identity::{Identity, PeerId};

mod messages;
mod record;

pub use messages::{
    Digest, GossipPush, GossipReply, JoinReply, JoinRequest, StatusEntry, StatusReply,
    StatusRequest,
};
pub use record::{
    MAX_ADDRS, MAX_RECORD_LEN, MAX_RECORDS_PER_MESSAGE, MAX_STAGES, MAX_VERSION_LEN, PeerRecord,
    PeerState, RECORD_DOMAIN, RecordInfo, Refusal, RunId, UnixMillis, Verified, verify_all,
};

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
    /// Its latest signed record.
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
    /// Where to reach it.
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

    /// The run this view belongs to.
    pub fn run_id(&self) -> RunId {
        self.run_id
    }

    /// This peer's own id.
    pub fn peer_id(&self) -> PeerId {
        self.identity.peer_id()
    }

    /// The membership's settings.
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

#[cfg(test)]
mod tests;
