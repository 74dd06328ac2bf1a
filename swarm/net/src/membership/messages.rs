//! The membership messages and their codecs.
//!
//! The newcomer sends `JoinRequest` to its bootstrap and learns the run, its own address
//! as seen from outside, and the bootstrap's full view. After that, an exchange is anti-entropy by
//! digest (as in Scuttlebutt / Cassandra): A sends `GossipPush { records: [A's own], digest: A's
//! (id, seq) list }`; B takes the records and answers `GossipReply { records: those A lacks or holds
//! older, want: ids A holds newer }`; if `want` is not empty A sends those records in a
//! `GossipPush` without digest (push only; B answers an empty reply). A LEAVING announcement is
//! such a push-only message. `StatusRequest` asks a peer for its view with last-seen ages.

use std::net::SocketAddr;

use swarm_nat::PathKind;

use super::{MAX_RECORDS_PER_MESSAGE, Membership, PeerRecord, RunId, UnixMillis};
use crate::identity::PeerId;
use crate::wire::{KindInfo, NET_KINDS, Reader, WireError, WireMessage, Writer, kind};

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
    /// The peer.
    pub peer: PeerId,
    /// The sequence number of the record held for it.
    pub seq: u64,
}

/// Opening of a gossip exchange: records pushed (the sender's own, or wanted ones), and with
/// `digest` what the sender holds, asking for what it lacks. Without a digest: push only.
#[derive(Clone, Debug, PartialEq)]
pub struct GossipPush {
    /// Records pushed.
    pub records: Vec<PeerRecord>,
    /// What the sender holds (`None`: push only).
    pub digest: Option<Vec<Digest>>,
}

/// Answer to a [`GossipPush`]: records the sender lacks or holds older, and the ids of which the
/// sender holds newer records (it pushes them next). Both empty for a push-only message.
#[derive(Clone, Debug, PartialEq)]
pub struct GossipReply {
    /// Records the sender lacks or holds older.
    pub records: Vec<PeerRecord>,
    /// Peers of which the sender holds newer records (it pushes them next).
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
    /// The run to join.
    pub run_id: RunId,
    /// The newcomer's address as the bootstrap sees it.
    pub observed_addr: SocketAddr,
    /// The bootstrap's records.
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
    /// Its latest record.
    pub record: PeerRecord,
    /// Milliseconds since the answering peer last heard from or about it.
    pub last_seen_ago_ms: u64,
    /// How the answering peer's connection to it runs, if it has one.
    pub path: Option<PathKind>,
    /// Bytes the answering peer relayed for it (when it is a relay), or moved to it through a
    /// relay (issue #14).
    pub relay_bytes: u64,
}

/// A peer's view: its own record first (seen 0 ms ago), then every record it holds.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusReply {
    /// The answering peer's run.
    pub run_id: RunId,
    /// Its own entry first, then every peer it knows.
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
            w.varint(e.relay_bytes);
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
            let relay_bytes = r.varint()?;
            entries.push(StatusEntry {
                record,
                last_seen_ago_ms,
                path,
                relay_bytes,
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
            relay_bytes: 0,
        }];
        entries.extend(
            self.view()
                .into_iter()
                .take(MAX_RECORDS_PER_MESSAGE - 1)
                .map(|e| StatusEntry {
                    record: e.record.clone(),
                    last_seen_ago_ms: now.saturating_sub(e.last_seen),
                    path: None,
                    relay_bytes: 0,
                }),
        );
        StatusReply {
            run_id: self.run_id,
            entries,
        }
    }
}
