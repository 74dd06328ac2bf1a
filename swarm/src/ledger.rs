//! The contribution ledger (issue #7): an append-only, hash-chained log of verified work per peer,
//! signed by the trainer.
//!
//! File layout (all little-endian):
//!
//! ```text
//! "SWLEDGER" (8) | version u16 | entries...
//! entry  = length u32 | seq u64 | prev [32] | time_ms u64 | body | signature [64]
//! body   = tag u8 | fields (see `Body`)
//! ```
//!
//! `prev` is the BLAKE3 hash of the previous entry's bytes (everything between its length prefix
//! and the end of its signature); entry 0 is the genesis, with `prev` all zero, and pins the run id
//! and the trainer's public key. Every entry is signed by that key over
//! `"swarm-ledger-v1" || seq..body`. So any edit breaks a signature, any deletion or reordering
//! breaks `seq` and `prev`, and a forged signature fails to verify. What the file alone cannot show
//! is a truncated tail (dropping the last entries leaves a valid shorter chain): the trainer stores
//! the head (seq, hash) in its checkpoint metadata, and `verify` compares against a known head.
//!
//! The reader is a decoder of untrusted bytes: every length is capped and checked against the
//! input before use, nothing panics, and errors are typed ([`LedgerError`]).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::identity::{Identity, PeerId};
use crate::membership::RunId;
use crate::wire::{Reader, WireError, Writer};

/// Magic at the start of a ledger file.
pub const MAGIC: [u8; 8] = *b"SWLEDGER";
/// Format version written and accepted.
pub const VERSION: u16 = 1;
/// Largest entry accepted (a ban's evidence text is the largest field).
pub const MAX_ENTRY_BYTES: usize = 16 * 1024;
/// Longest reason text of a ban.
pub const MAX_REASON_BYTES: usize = 1024;
/// Most entries read from one file (far beyond a long run: ~ steps x peers x 4).
pub const MAX_ENTRIES: usize = 50_000_000;
const DOMAIN: &[u8] = b"swarm-ledger-v1";
const HEADER_LEN: usize = 10;

/// Why a ledger was refused. `seq` is the index of the entry at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LedgerError {
    /// The file does not start with the ledger magic and a known version.
    #[error("not a ledger file (bad magic or version)")]
    BadHeader,
    /// An entry could not be decoded (truncated, oversized, bad tag, trailing bytes).
    #[error("entry {index}: malformed: {source}")]
    Malformed {
        /// The entry's position in the file.
        index: u64,
        /// What the decoder refused.
        source: WireError,
    },
    /// The ledger is empty or its first entry is not a genesis.
    #[error("the first entry is not a genesis")]
    NoGenesis,
    /// A genesis entry after the first.
    #[error("entry {index}: a second genesis")]
    ExtraGenesis {
        /// The entry's position in the file.
        index: u64,
    },
    /// Entry `index` carries another sequence number: an entry was deleted, inserted or moved.
    #[error("entry {index} has seq {seq}: an entry was deleted, inserted or reordered")]
    BadSeq {
        /// The entry's position in the file.
        index: u64,
        /// The seq it carries.
        seq: u64,
    },
    /// Entry `index` does not chain to the previous entry's hash: an earlier entry was edited,
    /// deleted or reordered.
    #[error("entry {index}: prev hash does not match the previous entry")]
    BrokenChain {
        /// The entry's position in the file.
        index: u64,
    },
    /// The signature of entry `index` is not the trainer's: the entry was edited or forged.
    #[error("entry {index}: bad signature (edited or forged)")]
    BadSignature {
        /// The entry's position in the file.
        index: u64,
    },
    /// The genesis pins another key than the one the verifier expected.
    #[error("the ledger is signed by {got}, expected {expected}")]
    WrongKey {
        /// The trainer expected.
        expected: PeerId,
        /// The key the genesis pins.
        got: PeerId,
    },
    /// The ledger's run is not the expected one.
    #[error("the ledger is of run {got}, expected {expected}")]
    WrongRun {
        /// The run expected.
        expected: RunId,
        /// The ledger's run.
        got: RunId,
    },
    /// The file ends before a known head (seq, hash): entries were cut from the end.
    #[error("the ledger ends at seq {last}, before the known head {head}")]
    Truncated {
        /// The last seq in the file.
        last: u64,
        /// The known head's seq.
        head: u64,
    },
    /// The entry at the known head's seq has another hash than the head.
    #[error("entry {seq} does not match the known head hash")]
    HeadMismatch {
        /// The known head's seq.
        seq: u64,
    },
    /// More entries than [`MAX_ENTRIES`].
    #[error("more than {MAX_ENTRIES} entries")]
    TooManyEntries,
}

/// What an entry records.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Body {
    /// Entry 0: the run and the key that signs every entry.
    Genesis {
        /// The run.
        #[serde(serialize_with = "ser_run")]
        run: RunId,
        /// The trainer's ed25519 public key.
        #[serde(serialize_with = "ser_hex32")]
        trainer_key: [u8; 32],
    },
    /// Work a peer did in one step for one stage: micro-batches (forward and backward) and
    /// tokens x layers (tokens of those micro-batches times the stage's layer count).
    Work {
        /// The peer credited.
        #[serde(serialize_with = "ser_peer")]
        peer: PeerId,
        /// The step.
        step: u64,
        /// The stage it served.
        stage: u32,
        /// Micro-batches it served (forward and backward).
        micro_batches: u32,
        /// Tokens of those micro-batches times the stage's layers.
        tokens_layers: u64,
    },
    /// An audit of `peer`'s forward and backward of micro-batch `mb` of `step`, recomputed by
    /// `auditor` (and `referee` when the first comparison failed). `distance` is the largest
    /// relative difference found (0 when bitwise identical), `tolerance` the bound applied.
    Audit {
        /// The peer audited.
        #[serde(serialize_with = "ser_peer")]
        peer: PeerId,
        /// The step.
        step: u64,
        /// The micro-batch.
        mb: u32,
        /// The stage.
        stage: u32,
        /// The replica that recomputed.
        #[serde(serialize_with = "ser_peer")]
        auditor: PeerId,
        /// The tie-breaker, when the first comparison failed.
        #[serde(serialize_with = "ser_opt_peer")]
        referee: Option<PeerId>,
        /// Whether the peer's frames held.
        passed: bool,
        /// The largest relative difference found.
        distance: f32,
        /// The bound applied.
        tolerance: f32,
    },
    /// `peer` was banned from the run; `evidence` is the BLAKE3 of the frames that convicted it.
    Ban {
        /// The peer banned.
        #[serde(serialize_with = "ser_peer")]
        peer: PeerId,
        /// The step.
        step: u64,
        /// Why.
        reason: String,
        /// BLAKE3 of the frames that convicted it.
        #[serde(serialize_with = "ser_hex32")]
        evidence: [u8; 32],
    },
}

fn ser_hex32<S: serde::Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(v))
}
fn ser_peer<S: serde::Serializer>(v: &PeerId, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&v.to_string())
}
fn ser_opt_peer<S: serde::Serializer>(v: &Option<PeerId>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(p) => s.serialize_some(&p.to_string()),
        None => s.serialize_none(),
    }
}
fn ser_run<S: serde::Serializer>(v: &RunId, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(v.0))
}

impl Body {
    fn encode(&self, w: &mut Writer) {
        match self {
            Body::Genesis { run, trainer_key } => {
                w.u8(0).array(&run.0).array(trainer_key);
            }
            Body::Work {
                peer,
                step,
                stage,
                micro_batches,
                tokens_layers,
            } => {
                w.u8(1)
                    .array(&peer.0)
                    .u64(*step)
                    .u32(*stage)
                    .u32(*micro_batches)
                    .u64(*tokens_layers);
            }
            Body::Audit {
                peer,
                step,
                mb,
                stage,
                auditor,
                referee,
                passed,
                distance,
                tolerance,
            } => {
                w.u8(2)
                    .array(&peer.0)
                    .u64(*step)
                    .u32(*mb)
                    .u32(*stage)
                    .array(&auditor.0);
                match referee {
                    Some(r) => w.u8(1).array(&r.0),
                    None => w.u8(0),
                };
                w.bool(*passed).f32(*distance).f32(*tolerance);
            }
            Body::Ban {
                peer,
                step,
                reason,
                evidence,
            } => {
                w.u8(3)
                    .array(&peer.0)
                    .u64(*step)
                    .str(reason)
                    .array(evidence);
            }
        }
    }

    fn decode(r: &mut Reader<'_>) -> Result<Body, WireError> {
        Ok(match r.u8()? {
            0 => Body::Genesis {
                run: RunId(r.array()?),
                trainer_key: r.array()?,
            },
            1 => Body::Work {
                peer: PeerId(r.array()?),
                step: r.u64()?,
                stage: r.u32()?,
                micro_batches: r.u32()?,
                tokens_layers: r.u64()?,
            },
            2 => {
                let peer = PeerId(r.array()?);
                let step = r.u64()?;
                let mb = r.u32()?;
                let stage = r.u32()?;
                let auditor = PeerId(r.array()?);
                let referee = match r.u8()? {
                    0 => None,
                    1 => Some(PeerId(r.array()?)),
                    t => {
                        return Err(WireError::BadTag {
                            what: "referee",
                            tag: t as u64,
                        });
                    }
                };
                let passed = r.bool()?;
                let distance = r.f32()?;
                let tolerance = r.f32()?;
                // NaN has many encodings; refusing it keeps every accepted entry canonical.
                if !distance.is_finite() || !tolerance.is_finite() {
                    return Err(WireError::Invalid("non-finite audit distance"));
                }
                Body::Audit {
                    peer,
                    step,
                    mb,
                    stage,
                    auditor,
                    referee,
                    passed,
                    distance,
                    tolerance,
                }
            }
            3 => Body::Ban {
                peer: PeerId(r.array()?),
                step: r.u64()?,
                reason: r.str("ban reason", MAX_REASON_BYTES)?.to_string(),
                evidence: r.array()?,
            },
            t => {
                return Err(WireError::BadTag {
                    what: "ledger entry",
                    tag: t as u64,
                });
            }
        })
    }
}

/// One entry of the ledger.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entry {
    /// Its position (0: the genesis).
    pub seq: u64,
    /// BLAKE3 of the previous entry's bytes (zeros for the genesis).
    #[serde(serialize_with = "ser_hex32")]
    pub prev: [u8; 32],
    /// When it was written (Unix ms, the trainer's clock).
    pub time_ms: u64,
    /// What it records.
    pub body: Body,
    /// The trainer's signature over the entry.
    #[serde(skip)]
    pub signature: [u8; 64],
}

impl Entry {
    /// The signed bytes (everything but the signature).
    fn signed_bytes(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(128);
        w.u64(self.seq).array(&self.prev).u64(self.time_ms);
        self.body.encode(&mut w);
        w.into_vec()
    }

    /// The entry's bytes as stored (without the length prefix).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = self.signed_bytes();
        b.extend_from_slice(&self.signature);
        b
    }

    /// BLAKE3 of [`Entry::to_bytes`]: what the next entry's `prev` holds.
    pub fn hash(&self) -> [u8; 32] {
        *blake3::hash(&self.to_bytes()).as_bytes()
    }

    fn message(&self) -> Vec<u8> {
        let mut m = DOMAIN.to_vec();
        m.extend_from_slice(&self.signed_bytes());
        m
    }

    fn decode(bytes: &[u8]) -> Result<Entry, WireError> {
        let mut r = Reader::new(bytes);
        let seq = r.u64()?;
        let prev = r.array()?;
        let time_ms = r.u64()?;
        let body = Body::decode(&mut r)?;
        let signature = r.array()?;
        r.finish()?;
        Ok(Entry {
            seq,
            prev,
            time_ms,
            body,
            signature,
        })
    }
}

/// The last entry of a ledger: its seq and hash. Stored in checkpoints so truncation shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Head {
    /// The last entry's seq.
    pub seq: u64,
    /// BLAKE3 of the last entry's bytes.
    #[serde(serialize_with = "ser_hex32")]
    pub hash: [u8; 32],
}

impl Head {
    /// `SEQ:HEX` (the form `swarm ledger verify --head` takes).
    pub fn parse(s: &str) -> Option<Head> {
        let (seq, hash) = s.split_once(':')?;
        let hash: [u8; 32] = hex::decode(hash.trim()).ok()?.try_into().ok()?;
        Some(Head {
            seq: seq.trim().parse().ok()?,
            hash,
        })
    }
}

impl std::fmt::Display for Head {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.seq, hex::encode(self.hash))
    }
}

/// Splits a ledger file into entries, without checking signatures or the chain.
pub fn parse(bytes: &[u8]) -> Result<Vec<Entry>, LedgerError> {
    if bytes.len() < HEADER_LEN
        || bytes[..8] != MAGIC
        || u16::from_le_bytes([bytes[8], bytes[9]]) != VERSION
    {
        return Err(LedgerError::BadHeader);
    }
    let mut r = Reader::new(&bytes[HEADER_LEN..]);
    let mut out = Vec::new();
    while r.remaining() > 0 {
        let index = out.len() as u64;
        if out.len() >= MAX_ENTRIES {
            return Err(LedgerError::TooManyEntries);
        }
        let malformed = |source| LedgerError::Malformed { index, source };
        let len = r.u32().map_err(malformed)? as usize;
        if len > MAX_ENTRY_BYTES {
            return Err(malformed(WireError::TooLong {
                what: "ledger entry",
                len: len as u64,
                max: MAX_ENTRY_BYTES as u64,
            }));
        }
        let raw = r.take(len).map_err(malformed)?;
        out.push(Entry::decode(raw).map_err(malformed)?);
    }
    Ok(out)
}

/// What a verifier knows from elsewhere: the trainer's id, the run, the last head it saw.
#[derive(Debug, Clone, Default)]
pub struct Expect {
    /// The trainer's peer id, if known.
    pub trainer: Option<PeerId>,
    /// The run, if known.
    pub run: Option<RunId>,
    /// A head seen earlier (a checkpoint's): entries up to it must be there unchanged.
    pub head: Option<Head>,
}

/// A verified ledger.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The run.
    pub run: RunId,
    /// The key that signed every entry.
    pub trainer_key: [u8; 32],
    /// The peer id of the signing key (BLAKE3 of it).
    pub trainer: PeerId,
    /// Every entry, in order.
    pub entries: Vec<Entry>,
    /// The last entry.
    pub head: Head,
}

/// Checks magic, every entry's seq, chain and signature against the genesis key, and whatever
/// `expect` pins (key, run, a known head). The first problem found is the error.
pub fn verify(bytes: &[u8], expect: &Expect) -> Result<Verified, LedgerError> {
    let entries = parse(bytes)?;
    let Some(first) = entries.first() else {
        return Err(LedgerError::NoGenesis);
    };
    let Body::Genesis { run, trainer_key } = first.body.clone() else {
        return Err(LedgerError::NoGenesis);
    };
    let trainer = PeerId(*blake3::hash(&trainer_key).as_bytes());
    if let Some(expected) = expect.trainer
        && expected != trainer
    {
        return Err(LedgerError::WrongKey {
            expected,
            got: trainer,
        });
    }
    if let Some(expected) = expect.run
        && expected != run
    {
        return Err(LedgerError::WrongRun { expected, got: run });
    }
    let mut prev = [0u8; 32];
    let mut head = Head {
        seq: 0,
        hash: [0; 32],
    };
    for (i, e) in entries.iter().enumerate() {
        let index = i as u64;
        if e.seq != index {
            return Err(LedgerError::BadSeq { index, seq: e.seq });
        }
        if i > 0 && matches!(e.body, Body::Genesis { .. }) {
            return Err(LedgerError::ExtraGenesis { index });
        }
        if e.prev != prev {
            return Err(LedgerError::BrokenChain { index });
        }
        if !crate::identity::verify(&trainer_key, &e.message(), &e.signature) {
            return Err(LedgerError::BadSignature { index });
        }
        prev = e.hash();
        head = Head {
            seq: index,
            hash: prev,
        };
        if let Some(h) = expect.head
            && h.seq == index
            && h.hash != prev
        {
            return Err(LedgerError::HeadMismatch { seq: index });
        }
    }
    if let Some(h) = expect.head
        && h.seq > head.seq
    {
        return Err(LedgerError::Truncated {
            last: head.seq,
            head: h.seq,
        });
    }
    Ok(Verified {
        run,
        trainer_key,
        trainer,
        entries,
        head,
    })
}

/// Credit of one peer, from a verified ledger.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Credit {
    /// The peer.
    #[serde(serialize_with = "ser_peer")]
    pub peer: PeerId,
    /// Work covered by a later passed audit of this peer (zero for a banned peer).
    pub credited_micro_batches: u64,
    /// Tokens x layers of that work.
    pub credited_tokens_layers: u64,
    /// Work since this peer's last passed audit: not yet verified.
    pub pending_micro_batches: u64,
    /// Tokens x layers of that work.
    pub pending_tokens_layers: u64,
    /// All work of a banned peer.
    pub voided_micro_batches: u64,
    /// Tokens x layers of that work.
    pub voided_tokens_layers: u64,
    /// Audits of it that passed.
    pub audits_passed: u64,
    /// Audits of it that failed.
    pub audits_failed: u64,
    /// Whether an audit banned it.
    pub banned: bool,
}

/// Per-peer credit: work becomes credited when a later audit of the same peer passes; a ban voids
/// everything the peer did (its credited work too: it was never caught before, but its audits can
/// no longer vouch for it). Audits as auditor or referee earn nothing here.
pub fn credits(entries: &[Entry]) -> Vec<Credit> {
    let mut by: BTreeMap<PeerId, Credit> = BTreeMap::new();
    fn get(by: &mut BTreeMap<PeerId, Credit>, p: PeerId) -> &mut Credit {
        by.entry(p).or_insert_with(|| Credit {
            peer: p,
            credited_micro_batches: 0,
            credited_tokens_layers: 0,
            pending_micro_batches: 0,
            pending_tokens_layers: 0,
            voided_micro_batches: 0,
            voided_tokens_layers: 0,
            audits_passed: 0,
            audits_failed: 0,
            banned: false,
        })
    }
    for e in entries {
        match &e.body {
            Body::Genesis { .. } => {}
            Body::Work {
                peer,
                micro_batches,
                tokens_layers,
                ..
            } => {
                let c = get(&mut by, *peer);
                c.pending_micro_batches += *micro_batches as u64;
                c.pending_tokens_layers += tokens_layers;
            }
            Body::Audit { peer, passed, .. } => {
                let c = get(&mut by, *peer);
                if *passed {
                    c.audits_passed += 1;
                    c.credited_micro_batches += std::mem::take(&mut c.pending_micro_batches);
                    c.credited_tokens_layers += std::mem::take(&mut c.pending_tokens_layers);
                } else {
                    c.audits_failed += 1;
                }
            }
            Body::Ban { peer, .. } => {
                get(&mut by, *peer).banned = true;
            }
        }
    }
    let mut out: Vec<Credit> = by.into_values().collect();
    for c in &mut out {
        if c.banned {
            c.voided_micro_batches = std::mem::take(&mut c.credited_micro_batches)
                + std::mem::take(&mut c.pending_micro_batches);
            c.voided_tokens_layers = std::mem::take(&mut c.credited_tokens_layers)
                + std::mem::take(&mut c.pending_tokens_layers);
        }
    }
    out
}

/// Appends signed entries to a ledger file. Writes go to the OS at once; [`LedgerWriter::sync`]
/// (once per step) makes them durable.
pub struct LedgerWriter {
    path: PathBuf,
    file: File,
    identity: Identity,
    next_seq: u64,
    prev: [u8; 32],
    run: RunId,
}

impl std::fmt::Debug for LedgerWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "LedgerWriter({}, seq {})",
            self.path.display(),
            self.next_seq
        )
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> crate::Error + '_ {
    move |source| crate::Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl LedgerWriter {
    /// Opens `path` for appending: verifies an existing ledger (it must be of `run` and signed by
    /// `identity`) and continues its chain, or creates it with a genesis entry.
    pub fn open(path: &Path, identity: Identity, run: RunId, now_ms: u64) -> crate::Result<Self> {
        match std::fs::read(path) {
            Ok(bytes) => {
                let v = verify(
                    &bytes,
                    &Expect {
                        trainer: Some(identity.peer_id()),
                        run: Some(run),
                        head: None,
                    },
                )?;
                let file = std::fs::OpenOptions::new()
                    .append(true)
                    .open(path)
                    .map_err(io_err(path))?;
                Ok(LedgerWriter {
                    path: path.to_path_buf(),
                    file,
                    identity,
                    next_seq: v.head.seq + 1,
                    prev: v.head.hash,
                    run,
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
                }
                let mut file = std::fs::OpenOptions::new()
                    .create_new(true)
                    .append(true)
                    .open(path)
                    .map_err(io_err(path))?;
                let mut header = MAGIC.to_vec();
                header.extend_from_slice(&VERSION.to_le_bytes());
                file.write_all(&header).map_err(io_err(path))?;
                let key = *identity.public_key().as_bytes();
                let mut w = LedgerWriter {
                    path: path.to_path_buf(),
                    file,
                    identity,
                    next_seq: 0,
                    prev: [0; 32],
                    run,
                };
                w.append(
                    Body::Genesis {
                        run,
                        trainer_key: key,
                    },
                    now_ms,
                )?;
                w.sync()?;
                Ok(w)
            }
            Err(e) => Err(io_err(path)(e)),
        }
    }

    /// Signs and appends one entry; returns the new head.
    pub fn append(&mut self, body: Body, now_ms: u64) -> crate::Result<Head> {
        let mut e = Entry {
            seq: self.next_seq,
            prev: self.prev,
            time_ms: now_ms,
            body,
            signature: [0; 64],
        };
        e.signature = self.identity.sign(&e.message());
        let bytes = e.to_bytes();
        let mut rec = Vec::with_capacity(4 + bytes.len());
        rec.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        rec.extend_from_slice(&bytes);
        self.file.write_all(&rec).map_err(io_err(&self.path))?;
        self.prev = *blake3::hash(&bytes).as_bytes();
        let head = Head {
            seq: self.next_seq,
            hash: self.prev,
        };
        self.next_seq += 1;
        Ok(head)
    }

    /// Makes every appended entry durable (fsync).
    pub fn sync(&mut self) -> crate::Result<()> {
        self.file.sync_data().map_err(io_err(&self.path))
    }

    /// The last entry written.
    pub fn head(&self) -> Head {
        Head {
            seq: self.next_seq.saturating_sub(1),
            hash: self.prev,
        }
    }

    /// The run it records.
    pub fn run(&self) -> RunId {
        self.run
    }

    /// The file it appends to.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Byte ranges `(start, end)` of each entry record (length prefix included) in a ledger file, for
/// tools and tests that edit files on purpose. `None` if the file does not parse.
pub fn record_ranges(bytes: &[u8]) -> Option<Vec<(usize, usize)>> {
    parse(bytes).ok()?;
    let mut out = Vec::new();
    let mut at = HEADER_LEN;
    while at < bytes.len() {
        let len = u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?) as usize;
        out.push((at, at + 4 + len));
        at += 4 + len;
    }
    Some(out)
}
