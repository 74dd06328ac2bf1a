//! The wire protocol: safe binary primitives, the message kind table and the envelope.
//!
//! Every message on a QUIC stream travels in an envelope:
//!
//! ```text
//! magic "SWRM" (4) | protocol version u16 | kind u16 | body length u32 | body
//! ```
//!
//! all little-endian. The receiver checks the magic, the version, that the kind is in its
//! [`Registry`], and that the body length is within that kind's limit *before* reading or
//! allocating the body. Bodies are decoded with [`Reader`], which checks every length against both
//! the remaining input and a caller-given cap, so a hostile length field can never make us allocate.
//! Tensor payloads are compression frames carried as length-prefixed bytes inside bodies.
//!
//! A layer that defines messages owns a range of kind numbers: it lists each kind's number, name
//! and size limit in a [`KindSet`], implements [`WireMessage`] for its messages (their
//! `INFO` is their row), and registers the set into the [`Registry`] of each peer that serves them
//! (`peer::Peer::register_kinds`). The registry refuses overlapping ranges, so numbers never
//! collide.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The 4 bytes that open every envelope.
pub const MAGIC: [u8; 4] = *b"SWRM";
/// The protocol version this build speaks. A peer sending another version is refused.
pub const PROTOCOL_VERSION: u16 = 5;
/// Size of the envelope header: magic, version, kind, body length.
pub const HEADER_LEN: usize = 12;
/// Longest LEB128 encoding of a u64.
const MAX_VARINT_LEN: usize = 10;

/// Why bytes from the wire were refused. Every decoder returns one of these; none panics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The input ended before a value of `need` bytes could be read.
    #[error("truncated input: needed {need} more bytes, {have} left")]
    Truncated {
        /// Bytes needed.
        need: usize,
        /// Bytes left.
        have: usize,
    },
    /// A length or count exceeds its cap (or the bytes actually present).
    #[error("{what} too long: {len} > {max}")]
    TooLong {
        /// The field.
        what: &'static str,
        /// The length it claims.
        len: u64,
        /// The largest allowed.
        max: u64,
    },
    /// An enum tag or flag byte has no meaning.
    #[error("bad tag {tag} for {what}")]
    BadTag {
        /// The field.
        what: &'static str,
        /// The tag found.
        tag: u64,
    },
    /// The envelope does not start with [`MAGIC`]: not our protocol.
    #[error("bad magic {0:02x?}")]
    BadMagic([u8; 4]),
    /// The peer speaks a protocol version we do not.
    #[error("unsupported protocol version {got} (we speak {PROTOCOL_VERSION})")]
    BadVersion {
        /// The version found.
        got: u16,
    },
    /// The message kind is not registered in [`kind::TABLE`].
    #[error("unknown message kind {0}")]
    UnknownKind(u16),
    /// A message of one kind arrived where another was expected.
    #[error("expected message kind {expected}, got {got}")]
    UnexpectedKind {
        /// The kind the caller decodes.
        expected: u16,
        /// The kind in the header.
        got: u16,
    },
    /// A decoder finished with bytes left over.
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
    /// A varint is longer than 10 bytes or overflows its type.
    #[error("malformed varint")]
    BadVarint,
    /// A string is not UTF-8.
    #[error("{0} is not valid UTF-8")]
    Utf8(&'static str),
    /// A value is structurally readable but violates an invariant (message says which).
    #[error("invalid message: {0}")]
    Invalid(&'static str),
}

/// The network layer's message kinds (numbers 1-29). Upper layers define theirs in their own
/// `kind` modules and [`KindSet`]s, inside ranges that [`Registry::register`] checks are disjoint.
pub mod kind {
    /// Liveness and RTT probe; echoed back by [`PONG`].
    pub const PING: u16 = 1;
    /// Answer to [`PING`].
    pub const PONG: u16 = 2;
    /// An application-level refusal of a request (code + reason); see `rpc::RemoteError`.
    pub const ERROR: u16 = 3;
    /// Opaque bulk bytes (link benchmark and tests): the body is echoed or discarded.
    pub const BULK: u16 = 4;
    /// Acknowledgement of [`BULK`] with the byte count received.
    pub const BULK_ACK: u16 = 5;
    /// Membership: a gossip push of signed peer records (`membership::GossipPush`).
    pub const GOSSIP: u16 = 10;
    /// Membership: the receiver's records sent back (`membership::GossipReply`).
    pub const GOSSIP_REPLY: u16 = 11;
    /// Membership: a newcomer asks its bootstrap for the run and view (`membership::JoinRequest`).
    pub const JOIN: u16 = 12;
    /// Membership: run id, observed address and records (`membership::JoinReply`).
    pub const JOIN_REPLY: u16 = 13;
    /// Membership: ask a peer for its view (`membership::StatusRequest`).
    pub const STATUS: u16 = 14;
    /// Membership: the view with last-seen ages (`membership::StatusReply`).
    pub const STATUS_REPLY: u16 = 15;
    /// NAT traversal (issue #14, `nat`): a joiner asks its bootstrap to dial it back from the
    /// checker endpoint (`nat::DialBackRequest`).
    pub const DIAL_BACK: u16 = 20;
    /// Whether the dial-back arrived, and the checker's address (`nat::DialBackReply`).
    pub const DIAL_BACK_REPLY: u16 = 21;
    /// What source address does the checker see (`nat::ObserveRequest`).
    pub const OBSERVE: u16 = 22;
    /// The address the checker saw (`nat::ObserveReply`).
    pub const OBSERVE_REPLY: u16 = 23;
    /// Ask the coordinator for a hole punch to a peer (`nat::PunchRequest`).
    pub const PUNCH_REQUEST: u16 = 24;
    /// Where and when to dial (`nat::PunchPlan`).
    pub const PUNCH_PLAN: u16 = 25;
    /// Coordinator to target: dial this peer now (`nat::PunchStart`).
    pub const PUNCH_START: u16 = 26;
    /// The target took the start (`nat::PunchStarted`).
    pub const PUNCH_STARTED: u16 = 27;
    /// Open a relay tunnel (`relay::RelayOpen`); the stream then carries frames, not one reply.
    pub const RELAY: u16 = 28;
    /// The tunnel is open (`relay::RelayAccepted`); frames follow on the stream.
    pub const RELAY_ACCEPTED: u16 = 29;
}

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

/// The network layer's kinds: transport and RPC (1-9), membership (10-19), NAT traversal (20-29).
pub const NET_KINDS: KindSet = KindSet {
    layer: "net",
    first: 1,
    last: 29,
    kinds: &[
        KindInfo::new(kind::PING, "ping", 64),
        KindInfo::new(kind::PONG, "pong", 64),
        KindInfo::new(kind::ERROR, "error", 4 * KIB),
        KindInfo::new(kind::BULK, "bulk", 256 * MIB),
        KindInfo::new(kind::BULK_ACK, "bulk_ack", 64),
        // 4096 records of at most ~640 bytes each (membership::MAX_RECORDS_PER_MESSAGE).
        KindInfo::new(kind::GOSSIP, "gossip", 4 * MIB),
        KindInfo::new(kind::GOSSIP_REPLY, "gossip_reply", 4 * MIB),
        KindInfo::new(kind::JOIN, "join", 0),
        KindInfo::new(kind::JOIN_REPLY, "join_reply", 4 * MIB),
        KindInfo::new(kind::STATUS, "status", 0),
        KindInfo::new(kind::STATUS_REPLY, "status_reply", 4 * MIB),
        KindInfo::new(kind::DIAL_BACK, "dial_back", 256),
        KindInfo::new(kind::DIAL_BACK_REPLY, "dial_back_reply", 64),
        KindInfo::new(kind::OBSERVE, "observe", 0),
        KindInfo::new(kind::OBSERVE_REPLY, "observe_reply", 64),
        KindInfo::new(kind::PUNCH_REQUEST, "punch_request", 64),
        KindInfo::new(kind::PUNCH_PLAN, "punch_plan", 256),
        KindInfo::new(kind::PUNCH_START, "punch_start", 256),
        KindInfo::new(kind::PUNCH_STARTED, "punch_started", 0),
        KindInfo::new(kind::RELAY, "relay", 64),
        KindInfo::new(kind::RELAY_ACCEPTED, "relay_accepted", 0),
    ],
};

/// One row of a kind table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KindInfo {
    /// The kind number.
    pub kind: u16,
    /// Short name for logs and errors.
    pub name: &'static str,
    /// Largest body accepted for this kind, in bytes.
    pub max_len: usize,
}

impl KindInfo {
    /// A row: `kind` named `name`, bodies up to `max_len` bytes.
    pub const fn new(kind: u16, name: &'static str, max_len: usize) -> KindInfo {
        KindInfo {
            kind,
            name,
            max_len,
        }
    }
}

/// The message kinds one layer defines: a range of numbers it owns and a row (name, size cap) for
/// every kind it uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KindSet {
    /// The layer's name, for errors.
    pub layer: &'static str,
    /// First kind number of the layer's range.
    pub first: u16,
    /// Last kind number of the layer's range (inclusive).
    pub last: u16,
    /// A row for every kind the layer uses.
    pub kinds: &'static [KindInfo],
}

impl KindSet {
    /// The row of `kind`, if this set has it.
    pub const fn get(&self, kind: u16) -> Option<&'static KindInfo> {
        let kinds: &'static [KindInfo] = self.kinds;
        let mut i = 0;
        while i < kinds.len() {
            if kinds[i].kind == kind {
                return Some(&kinds[i]);
            }
            i += 1;
        }
        None
    }

    /// The row of `kind`; a compile-time error when used in a const on a kind without a row.
    pub const fn row(&self, kind: u16) -> &'static KindInfo {
        match self.get(kind) {
            Some(k) => k,
            None => panic!("message kind has no row in its layer's KindSet"),
        }
    }

    /// Checks the set on its own: kinds unique, named, inside the range.
    pub fn check(&self) -> Result<(), KindError> {
        for (i, a) in self.kinds.iter().enumerate() {
            if a.kind < self.first || a.kind > self.last || a.name.is_empty() {
                return Err(KindError::OutOfRange {
                    layer: self.layer,
                    kind: a.kind,
                });
            }
            if self.kinds[i + 1..]
                .iter()
                .any(|b| b.kind == a.kind || b.name == a.name)
            {
                return Err(KindError::Duplicate {
                    layer: self.layer,
                    kind: a.kind,
                });
            }
        }
        Ok(())
    }
}

/// Why a [`KindSet`] cannot join a [`Registry`]. These are programming errors in a layer's table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KindError {
    /// A kind lies outside its layer's range, or has no name.
    #[error("kind {kind} of layer {layer} is outside its range or unnamed")]
    OutOfRange {
        /// The layer.
        layer: &'static str,
        /// The kind outside its range.
        kind: u16,
    },
    /// Two rows of one layer share a number or a name.
    #[error("kind {kind} of layer {layer} is listed twice")]
    Duplicate {
        /// The layer.
        layer: &'static str,
        /// The kind listed twice.
        kind: u16,
    },
    /// Two layers' ranges overlap.
    #[error("the kind ranges of layers {a} and {b} overlap")]
    Overlap {
        /// One layer.
        a: &'static str,
        /// The other.
        b: &'static str,
    },
}

/// The kinds a peer accepts: the network layer's own and those of every layer registered on top.
/// The envelope reader looks the cap up here before it reads a body.
#[derive(Debug, Clone)]
pub struct Registry {
    sets: Vec<&'static KindSet>,
}

impl Default for Registry {
    fn default() -> Registry {
        Registry::new()
    }
}

impl Registry {
    /// The network layer's kinds only.
    pub fn new() -> Registry {
        Registry {
            sets: vec![&NET_KINDS],
        }
    }

    /// Adds a layer's kinds. Registering the same set again is a no-op; a set whose range
    /// overlaps another layer's, or that is malformed, is refused.
    pub fn register(&mut self, set: &'static KindSet) -> Result<(), KindError> {
        if self.sets.iter().any(|s| **s == *set) {
            return Ok(());
        }
        set.check()?;
        if let Some(s) = self
            .sets
            .iter()
            .find(|s| set.first <= s.last && s.first <= set.last)
        {
            return Err(KindError::Overlap {
                a: s.layer,
                b: set.layer,
            });
        }
        self.sets.push(set);
        Ok(())
    }

    /// The row of `kind`, if a registered layer has it.
    pub fn info(&self, kind: u16) -> Option<&'static KindInfo> {
        self.sets.iter().find_map(|s| s.get(kind))
    }

    /// The registered sets, network layer first.
    pub fn sets(&self) -> &[&'static KindSet] {
        &self.sets
    }
}

/// A message with a registered kind, encoded into and decoded from an envelope body.
///
/// `decode` must consume exactly the body's bytes for the bytes to be accepted (see [`decode_body`]);
/// it must check every length with the [`Reader`] methods that take a cap.
pub trait WireMessage: Sized {
    /// The kind's row in its layer's [`KindSet`] (`SET.row(kind::X)`).
    const INFO: &'static KindInfo;
    /// The kind number.
    const KIND: u16 = Self::INFO.kind;
    /// Largest encoded body; defaults to the kind's cap.
    const MAX_LEN: usize = Self::INFO.max_len;
    /// Appends the body.
    fn encode(&self, w: &mut Writer);
    /// Reads a body (untrusted: every length checked before use).
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError>;
}

/// Appends little-endian values to a growable buffer.
#[derive(Default, Clone)]
pub struct Writer {
    buf: Vec<u8>,
}

impl fmt::Debug for Writer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Writer({} bytes)", self.buf.len())
    }
}

impl Writer {
    /// An empty writer.
    pub fn new() -> Writer {
        Writer::default()
    }

    /// An empty writer with room for `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> Writer {
        Writer {
            buf: Vec::with_capacity(capacity),
        }
    }

    /// Bytes written.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The bytes written.
    pub fn as_slice(&self) -> &[u8] {
        &self.buf
    }

    /// The bytes written, owned.
    pub fn into_vec(self) -> Vec<u8> {
        self.buf
    }

    /// Appends a byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    /// One byte, 0 or 1.
    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u8(v as u8)
    }

    /// Appends a little-endian u16.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.raw(&v.to_le_bytes())
    }

    /// Appends a little-endian u32.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.raw(&v.to_le_bytes())
    }

    /// Appends a little-endian u64.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.raw(&v.to_le_bytes())
    }

    /// Appends a little-endian i64.
    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.raw(&v.to_le_bytes())
    }

    /// Appends an f32 (its little-endian bits).
    pub fn f32(&mut self, v: f32) -> &mut Self {
        self.raw(&v.to_le_bytes())
    }

    /// Appends an f64 (its little-endian bits).
    pub fn f64(&mut self, v: f64) -> &mut Self {
        self.raw(&v.to_le_bytes())
    }

    /// Unsigned LEB128 (1 byte below 128, at most 10).
    pub fn varint(&mut self, mut v: u64) -> &mut Self {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                self.buf.push(byte);
                return self;
            }
            self.buf.push(byte | 0x80);
        }
    }

    /// A count or length as a varint (pairs with [`Reader::len`]).
    pub fn len_prefix(&mut self, n: usize) -> &mut Self {
        self.varint(n as u64)
    }

    /// Bytes with a varint length prefix (pairs with [`Reader::bytes`]).
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.len_prefix(v.len());
        self.raw(v)
    }

    /// A UTF-8 string with a varint length prefix (pairs with [`Reader::str`]).
    pub fn str(&mut self, v: &str) -> &mut Self {
        self.bytes(v.as_bytes())
    }

    /// A fixed-size array, no prefix (pairs with [`Reader::array`]).
    pub fn array<const N: usize>(&mut self, v: &[u8; N]) -> &mut Self {
        self.raw(v)
    }

    /// f32 values with a varint count prefix (pairs with [`Reader::f32s`]).
    /// A socket address: family tag (4 or 6), octets, port.
    pub fn socket_addr(&mut self, a: &SocketAddr) -> &mut Self {
        match a.ip() {
            IpAddr::V4(ip) => self.u8(4).array(&ip.octets()),
            IpAddr::V6(ip) => self.u8(6).array(&ip.octets()),
        };
        self.u16(a.port())
    }

    /// Appends a length-prefixed f32 slice.
    pub fn f32s(&mut self, v: &[f32]) -> &mut Self {
        self.len_prefix(v.len());
        self.buf.reserve(v.len() * 4);
        for x in v {
            self.buf.extend_from_slice(&x.to_le_bytes());
        }
        self
    }

    /// Bytes appended as they are, no prefix.
    pub fn raw(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self
    }
}

/// Reads little-endian values from untrusted bytes. Every read is bounds-checked and every length is
/// checked against the remaining input and a cap before anything is allocated.
#[derive(Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl fmt::Debug for Reader<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Reader({} bytes left)", self.buf.len())
    }
}

impl<'a> Reader<'a> {
    /// A reader at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf }
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// Errors if any bytes are left: a message must be consumed exactly.
    pub fn finish(&self) -> Result<(), WireError> {
        match self.buf.len() {
            0 => Ok(()),
            n => Err(WireError::Trailing(n)),
        }
    }

    /// The next `n` bytes, without a prefix.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if n > self.buf.len() {
            return Err(WireError::Truncated {
                need: n,
                have: self.buf.len(),
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    /// Reads `N` bytes.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let bytes = self.take(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    /// Reads a byte.
    pub fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }

    /// A byte that must be 0 or 1.
    pub fn bool(&mut self) -> Result<bool, WireError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            tag => Err(WireError::BadTag {
                what: "bool",
                tag: tag as u64,
            }),
        }
    }

    /// Reads a little-endian u16.
    pub fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    /// Reads a little-endian u32.
    pub fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    /// Reads a little-endian u64.
    pub fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// Reads a little-endian i64.
    pub fn i64(&mut self) -> Result<i64, WireError> {
        Ok(i64::from_le_bytes(self.array()?))
    }

    /// Reads an f32.
    pub fn f32(&mut self) -> Result<f32, WireError> {
        Ok(f32::from_le_bytes(self.array()?))
    }

    /// Reads an f64.
    pub fn f64(&mut self) -> Result<f64, WireError> {
        Ok(f64::from_le_bytes(self.array()?))
    }

    /// Unsigned LEB128; refuses encodings longer than 10 bytes or overflowing u64.
    pub fn varint(&mut self) -> Result<u64, WireError> {
        let mut value: u64 = 0;
        for i in 0..MAX_VARINT_LEN {
            let byte = self.u8()?;
            let bits = (byte & 0x7f) as u64;
            // The 10th byte may only carry the top bit of a u64.
            if i == MAX_VARINT_LEN - 1 && bits > 1 {
                return Err(WireError::BadVarint);
            }
            value |= bits << (7 * i);
            if byte & 0x80 == 0 {
                // A zero final byte after the first is an overlong encoding: refused, so every
                // value has exactly one encoding (signed records rely on canonical bytes).
                if i > 0 && byte == 0 {
                    return Err(WireError::BadVarint);
                }
                return Ok(value);
            }
        }
        Err(WireError::BadVarint)
    }

    /// A varint count of items each at least `min_item_bytes` long, checked against `max` and
    /// against what the remaining input could possibly hold, so `Vec::with_capacity(n)` is safe.
    pub fn len(
        &mut self,
        what: &'static str,
        max: usize,
        min_item_bytes: usize,
    ) -> Result<usize, WireError> {
        let n = self.varint()?;
        if n > max as u64 {
            return Err(WireError::TooLong {
                what,
                len: n,
                max: max as u64,
            });
        }
        let fits = (self.buf.len() / min_item_bytes.max(1)) as u64;
        if min_item_bytes > 0 && n > fits {
            return Err(WireError::TooLong {
                what,
                len: n,
                max: fits,
            });
        }
        Ok(n as usize)
    }

    /// Varint-prefixed bytes of at most `max` bytes, borrowed from the input.
    pub fn bytes(&mut self, what: &'static str, max: usize) -> Result<&'a [u8], WireError> {
        let n = self.len(what, max, 1)?;
        self.take(n)
    }

    /// A varint-prefixed UTF-8 string of at most `max` bytes, borrowed from the input.
    pub fn str(&mut self, what: &'static str, max: usize) -> Result<&'a str, WireError> {
        let bytes = self.bytes(what, max)?;
        std::str::from_utf8(bytes).map_err(|_| WireError::Utf8(what))
    }

    /// What [`Writer::socket_addr`] wrote.
    pub fn socket_addr(&mut self) -> Result<SocketAddr, WireError> {
        let ip = match self.u8()? {
            4 => IpAddr::V4(Ipv4Addr::from(self.array::<4>()?)),
            6 => IpAddr::V6(Ipv6Addr::from(self.array::<16>()?)),
            tag => {
                return Err(WireError::BadTag {
                    what: "address family",
                    tag: tag as u64,
                });
            }
        };
        Ok(SocketAddr::new(ip, self.u16()?))
    }

    /// At most `max` f32 values with a varint count prefix.
    pub fn f32s(&mut self, what: &'static str, max: usize) -> Result<Vec<f32>, WireError> {
        let n = self.len(what, max, 4)?;
        let bytes = self.take(n * 4)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
}

/// A parsed envelope header, already checked: our magic and version, a registered kind, and a body
/// length within that kind's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The message kind.
    pub kind: u16,
    /// The body's length in bytes.
    pub body_len: u32,
}

impl Header {
    /// Parses and checks the 12 header bytes; `kinds` gives the row (cap) of each accepted kind.
    pub fn parse(
        bytes: &[u8; HEADER_LEN],
        kinds: impl Fn(u16) -> Option<&'static KindInfo>,
    ) -> Result<Header, WireError> {
        let mut r = Reader::new(bytes);
        let magic: [u8; 4] = r.array()?;
        if magic != MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        let version = r.u16()?;
        if version != PROTOCOL_VERSION {
            return Err(WireError::BadVersion { got: version });
        }
        let kind = r.u16()?;
        let body_len = r.u32()?;
        let info = kinds(kind).ok_or(WireError::UnknownKind(kind))?;
        if body_len as u64 > info.max_len as u64 {
            return Err(WireError::TooLong {
                what: info.name,
                len: body_len as u64,
                max: info.max_len as u64,
            });
        }
        Ok(Header { kind, body_len })
    }

    /// The header bytes for a body of `body_len` bytes of `kind` (not checked against the table).
    pub fn encode(kind: u16, body_len: u32) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..4].copy_from_slice(&MAGIC);
        out[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        out[6..8].copy_from_slice(&kind.to_le_bytes());
        out[8..12].copy_from_slice(&body_len.to_le_bytes());
        out
    }
}

/// Encodes `msg` as a body, checking it against the kind's limit.
pub fn encode_body<M: WireMessage>(msg: &M) -> Result<Vec<u8>, WireError> {
    let mut w = Writer::new();
    msg.encode(&mut w);
    let body = w.into_vec();
    if body.len() > M::MAX_LEN {
        return Err(WireError::TooLong {
            what: M::INFO.name,
            len: body.len() as u64,
            max: M::MAX_LEN as u64,
        });
    }
    Ok(body)
}

/// A whole envelope (header + body) for `msg`.
pub fn encode_envelope<M: WireMessage>(msg: &M) -> Result<Vec<u8>, WireError> {
    let body = encode_body(msg)?;
    Ok(envelope_raw(M::KIND, &body))
}

/// A whole envelope around arbitrary body bytes; no checks, so tests can build bad messages.
pub fn envelope_raw(kind: u16, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&Header::encode(kind, body.len() as u32));
    out.extend_from_slice(body);
    out
}

/// Decodes a body of kind `M::KIND`, requiring every byte to be consumed.
pub fn decode_body<M: WireMessage>(body: &[u8]) -> Result<M, WireError> {
    if body.len() > M::MAX_LEN {
        return Err(WireError::TooLong {
            what: M::INFO.name,
            len: body.len() as u64,
            max: M::MAX_LEN as u64,
        });
    }
    let mut r = Reader::new(body);
    let msg = M::decode(&mut r)?;
    r.finish()?;
    Ok(msg)
}

/// Splits a complete envelope held in memory into its checked header and body.
pub fn split_envelope<'a>(
    bytes: &'a [u8],
    kinds: &Registry,
) -> Result<(Header, &'a [u8]), WireError> {
    let mut r = Reader::new(bytes);
    let header = Header::parse(&r.array()?, |k| kinds.info(k))?;
    let body = r.take(header.body_len as usize)?;
    r.finish()?;
    Ok((header, body))
}

/// Decodes a complete envelope held in memory as a message of type `M`.
pub fn decode_envelope<M: WireMessage>(bytes: &[u8]) -> Result<M, WireError> {
    let mut r = Reader::new(bytes);
    let header = Header::parse(&r.array()?, |k| {
        if k == M::KIND {
            Some(M::INFO)
        } else {
            NET_KINDS.get(k)
        }
    })?;
    let body = r.take(header.body_len as usize)?;
    r.finish()?;
    if header.kind != M::KIND {
        return Err(WireError::UnexpectedKind {
            expected: M::KIND,
            got: header.kind,
        });
    }
    decode_body(body)
}

/// The network layer's name of `kind`, or "unknown" (upper layers' names are in a [`Registry`]).
pub fn kind_name(kind: u16) -> &'static str {
    NET_KINDS.get(kind).map_or("unknown", |k| k.name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, PartialEq)]
    struct Sample {
        id: [u8; 32],
        step: u64,
        name: String,
        values: Vec<f32>,
        payload: Vec<u8>,
        flag: bool,
    }

    impl WireMessage for Sample {
        const INFO: &'static KindInfo = NET_KINDS.row(kind::BULK);
        const MAX_LEN: usize = 4096;
        fn encode(&self, w: &mut Writer) {
            w.array(&self.id)
                .varint(self.step)
                .str(&self.name)
                .f32s(&self.values)
                .bytes(&self.payload)
                .bool(self.flag);
        }
        fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
            Ok(Sample {
                id: r.array()?,
                step: r.varint()?,
                name: r.str("name", 64)?.to_owned(),
                values: r.f32s("values", 256)?,
                payload: r.bytes("payload", 1024)?.to_vec(),
                flag: r.bool()?,
            })
        }
    }

    fn sample() -> Sample {
        Sample {
            id: [9; 32],
            step: 300,
            name: "stage-1".into(),
            values: vec![1.5, -2.0, f32::MIN_POSITIVE],
            payload: vec![1, 2, 3],
            flag: true,
        }
    }

    #[test]
    fn envelope_round_trips() {
        let bytes = encode_envelope(&sample()).unwrap();
        assert_eq!(&bytes[..4], b"SWRM");
        assert_eq!(decode_envelope::<Sample>(&bytes).unwrap(), sample());
    }

    #[test]
    fn every_truncation_is_refused() {
        let bytes = encode_envelope(&sample()).unwrap();
        for cut in 0..bytes.len() {
            assert!(
                decode_envelope::<Sample>(&bytes[..cut]).is_err(),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let body = encode_body(&sample()).unwrap();
        let mut longer = body.clone();
        longer.push(0);
        assert_eq!(decode_body::<Sample>(&longer), Err(WireError::Trailing(1)));
    }

    #[test]
    fn header_checks_magic_version_kind_and_limit() {
        let net = |k| NET_KINDS.get(k);
        let good = Header::encode(kind::PING, 8);
        assert_eq!(
            Header::parse(&good, net).unwrap(),
            Header {
                kind: kind::PING,
                body_len: 8
            }
        );
        let mut bad = good;
        bad[0] = b'X';
        assert!(matches!(
            Header::parse(&bad, net),
            Err(WireError::BadMagic(_))
        ));
        let mut bad = good;
        bad[4] = 9;
        assert_eq!(
            Header::parse(&bad, net),
            Err(WireError::BadVersion { got: 9 })
        );
        assert_eq!(
            Header::parse(&Header::encode(999, 0), net),
            Err(WireError::UnknownKind(999))
        );
        assert!(matches!(
            Header::parse(&Header::encode(kind::PING, u32::MAX), net),
            Err(WireError::TooLong { what: "ping", .. })
        ));
    }

    #[test]
    fn huge_length_fields_do_not_allocate() {
        // A count claiming 2^40 floats with 3 bytes of input behind it.
        let mut w = Writer::new();
        w.varint(1 << 40).raw(&[0, 0, 0]);
        let mut r = Reader::new(w.as_slice());
        assert!(matches!(
            r.f32s("values", usize::MAX),
            Err(WireError::TooLong { .. })
        ));
        // Within the cap but beyond the input.
        let mut w = Writer::new();
        w.varint(100).raw(&[0; 12]);
        let mut r = Reader::new(w.as_slice());
        assert!(matches!(
            r.f32s("values", 1000),
            Err(WireError::TooLong { max: 3, .. })
        ));
        let mut r = Reader::new(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert!(matches!(r.bytes("b", 16), Err(WireError::TooLong { .. })));
    }

    #[test]
    fn varints_reject_overlong_and_overflow() {
        for v in [0u64, 1, 127, 128, 300, u32::MAX as u64, u64::MAX] {
            let mut w = Writer::new();
            w.varint(v);
            let mut r = Reader::new(w.as_slice());
            assert_eq!(r.varint().unwrap(), v);
            r.finish().unwrap();
        }
        assert_eq!(Reader::new(&[0xff; 11]).varint(), Err(WireError::BadVarint));
        // Overlong: 0 and 1 padded with a continuation byte.
        assert_eq!(
            Reader::new(&[0x80, 0x00]).varint(),
            Err(WireError::BadVarint)
        );
        assert_eq!(
            Reader::new(&[0x81, 0x80, 0x00]).varint(),
            Err(WireError::BadVarint)
        );
        let mut over = [0xffu8; 10];
        over[9] = 0x02;
        assert_eq!(Reader::new(&over).varint(), Err(WireError::BadVarint));
        assert!(matches!(
            Reader::new(&[0x80]).varint(),
            Err(WireError::Truncated { .. })
        ));
    }

    #[test]
    fn bad_bool_and_utf8_are_typed_errors() {
        assert!(matches!(
            Reader::new(&[2]).bool(),
            Err(WireError::BadTag { what: "bool", .. })
        ));
        assert_eq!(
            Reader::new(&[2, 0xc3, 0x28]).str("name", 8),
            Err(WireError::Utf8("name"))
        );
    }

    #[test]
    fn kinds_are_unique_and_named() {
        NET_KINDS.check().unwrap();
        for k in NET_KINDS.kinds {
            assert!(k.max_len <= u32::MAX as usize);
        }
    }

    const UPPER: KindSet = KindSet {
        layer: "upper",
        first: 30,
        last: 39,
        kinds: &[KindInfo::new(30, "a", 8), KindInfo::new(31, "b", 8)],
    };

    #[test]
    fn registry_refuses_overlaps_and_malformed_sets() {
        let mut r = Registry::new();
        r.register(&UPPER).unwrap();
        r.register(&UPPER).unwrap();
        assert_eq!(r.sets().len(), 2);
        assert_eq!(r.info(31).map(|k| k.name), Some("b"));
        assert_eq!(r.info(32), None);
        const OVERLAP: KindSet = KindSet {
            layer: "overlap",
            first: 25,
            last: 30,
            kinds: &[],
        };
        assert_eq!(
            r.register(&OVERLAP),
            Err(KindError::Overlap {
                a: "net",
                b: "overlap"
            })
        );
        const OUTSIDE: KindSet = KindSet {
            layer: "outside",
            first: 40,
            last: 49,
            kinds: &[KindInfo::new(50, "c", 8)],
        };
        assert!(matches!(
            r.register(&OUTSIDE),
            Err(KindError::OutOfRange { kind: 50, .. })
        ));
        const TWICE: KindSet = KindSet {
            layer: "twice",
            first: 40,
            last: 49,
            kinds: &[KindInfo::new(40, "c", 8), KindInfo::new(40, "d", 8)],
        };
        assert!(matches!(
            r.register(&TWICE),
            Err(KindError::Duplicate { kind: 40, .. })
        ));
        assert_eq!(r.sets().len(), 2);
    }

    #[test]
    fn oversized_message_is_refused_on_encode() {
        let mut big = sample();
        big.payload = vec![0; 5000];
        assert!(matches!(encode_body(&big), Err(WireError::TooLong { .. })));
    }

    proptest! {
        #[test]
        fn decoding_random_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_envelope::<Sample>(&bytes);
            let _ = decode_body::<Sample>(&bytes);
        }

        #[test]
        fn samples_round_trip(step in any::<u64>(), name in "[a-z]{0,20}",
                              values in proptest::collection::vec(-1e6f32..1e6, 0..50),
                              payload in proptest::collection::vec(any::<u8>(), 0..200), flag in any::<bool>()) {
            let s = Sample { id: [3; 32], step, name, values, payload, flag };
            let bytes = encode_envelope(&s).unwrap();
            prop_assert_eq!(decode_envelope::<Sample>(&bytes).unwrap(), s);
        }
    }
}
