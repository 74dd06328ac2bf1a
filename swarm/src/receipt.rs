//! Signed receipts and the audit messages (issue #7).
//!
//! For every forward and backward it serves, a stage peer signs a [`Receipt`]: run, epoch,
//! micro-batch attempt, stage, pass, the weights digest it computed with, and the BLAKE3 hashes of
//! the exact frame bytes it received and sent. The peer keeps its receipts and frames for the
//! current step (`audit_worker`); after the micro-batch phase the trainer draws which (micro-batch,
//! stage) to audit, fetches the audited peer's record ([`AuditFetch`] -> [`AuditRecord`]), checks
//! it against the receipts of the neighbouring hops and its own hashes of what it sent and got,
//! and has another replica recompute the same inputs ([`AuditRecompute`] -> [`AuditResult`]).
//!
//! Kinds 80-83 ([`kind`], [`KINDS`]). The audit requests are answered on the same stream: they are off
//! the micro-batch path (run between the micro-batch phase and the sync), and a recomputation is
//! one stage forward and backward.

pub use crate::ids::Pass;

use crate::identity::{Identity, PeerId};
use crate::ids::{MAX_FRAME_BYTES, MAX_STAGES, MbKey, get_frame};
use crate::membership::RunId;
use crate::wire::{KindInfo, KindSet, Reader, WireError, WireMessage, Writer};

const DOMAIN: &[u8] = b"swarm-receipt-v1";

/// BLAKE3 of frame bytes, as receipts carry them.
pub fn frame_hash(frame: &[u8]) -> [u8; 32] {
    *blake3::hash(frame).as_bytes()
}

/// A peer's signed statement about one pass it served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The run.
    pub run: RunId,
    /// The run's epoch.
    pub epoch: u32,
    /// The micro-batch attempt.
    pub key: MbKey,
    /// The stage served.
    pub stage: u32,
    /// Forward or backward.
    pub pass: Pass,
    /// The signer's ed25519 public key; its peer id is BLAKE3 of it.
    pub public_key: [u8; 32],
    /// The stage's weights digest at the start of the step.
    pub weights_digest: [u8; 32],
    /// BLAKE3 of the frame received (activations for a forward, output gradient for a backward).
    pub input_hash: [u8; 32],
    /// BLAKE3 of the frame sent on.
    pub output_hash: [u8; 32],
    /// The signer's ed25519 signature over everything above.
    pub signature: [u8; 64],
}

/// Encoded size of a receipt.
pub const RECEIPT_BYTES: usize = 16 + 4 + 8 + 4 + 4 + 4 + 1 + 32 * 4 + 64;

impl Receipt {
    /// Signs a receipt with `identity`.
    #[allow(clippy::too_many_arguments)]
    pub fn sign(
        identity: &Identity,
        run: RunId,
        epoch: u32,
        key: MbKey,
        stage: u32,
        pass: Pass,
        weights_digest: [u8; 32],
        input: &[u8],
        output: &[u8],
    ) -> Receipt {
        let mut r = Receipt {
            run,
            epoch,
            key,
            stage,
            pass,
            public_key: *identity.public_key().as_bytes(),
            weights_digest,
            input_hash: frame_hash(input),
            output_hash: frame_hash(output),
            signature: [0; 64],
        };
        r.signature = identity.sign(&r.message());
        r
    }

    /// The signer's peer id.
    pub fn peer(&self) -> PeerId {
        PeerId(*blake3::hash(&self.public_key).as_bytes())
    }

    fn body(&self, w: &mut Writer) {
        w.array(&self.run.0)
            .u32(self.epoch)
            .u64(self.key.step)
            .u32(self.key.mb)
            .u32(self.key.attempt)
            .u32(self.stage)
            .u8(match self.pass {
                Pass::Forward => 0,
                Pass::Backward => 1,
            })
            .array(&self.public_key)
            .array(&self.weights_digest)
            .array(&self.input_hash)
            .array(&self.output_hash);
    }

    fn message(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(RECEIPT_BYTES + DOMAIN.len());
        w.raw(DOMAIN);
        self.body(&mut w);
        w.into_vec()
    }

    /// Whether the signature is by the key in the receipt, and that key is `peer`'s.
    pub fn verify(&self, peer: &PeerId) -> bool {
        self.peer() == *peer
            && crate::identity::verify(&self.public_key, &self.message(), &self.signature)
    }

    /// Checks a receipt that came with a pipeline message from `from` (the TLS-proven sender):
    /// signed by `from`, for this run, epoch, attempt, stage and pass, and committing to exactly
    /// the `frame` bytes received. Returns why not.
    #[allow(clippy::too_many_arguments)]
    pub fn check_received(
        receipt: Option<&Receipt>,
        from: &PeerId,
        run: &RunId,
        epoch: u32,
        key: MbKey,
        stage: u32,
        pass: Pass,
        frame: &[u8],
    ) -> Result<(), &'static str> {
        let r = receipt.ok_or("no receipt with the frame")?;
        if r.run != *run || r.epoch != epoch || r.key != key {
            return Err("receipt of another run, epoch or attempt");
        }
        if r.stage != stage || r.pass != pass {
            return Err("receipt of another stage or pass");
        }
        if r.output_hash != frame_hash(frame) {
            return Err("receipt does not match the frame");
        }
        if !r.verify(from) {
            return Err("receipt not signed by the sender");
        }
        Ok(())
    }

    /// Appends the receipt to a wire body.
    pub fn encode(&self, w: &mut Writer) {
        self.body(w);
        w.array(&self.signature);
    }

    /// Reads a receipt from a wire body (its signature is not checked here).
    pub fn decode(r: &mut Reader<'_>) -> Result<Receipt, WireError> {
        let run = RunId(r.array()?);
        let epoch = r.u32()?;
        let key = MbKey {
            step: r.u64()?,
            mb: r.u32()?,
            attempt: r.u32()?,
        };
        let stage = r.u32()?;
        if stage as usize >= MAX_STAGES {
            return Err(WireError::Invalid("stage index beyond MAX_STAGES"));
        }
        let pass = match r.u8()? {
            0 => Pass::Forward,
            1 => Pass::Backward,
            t => {
                return Err(WireError::BadTag {
                    what: "pass",
                    tag: t as u64,
                });
            }
        };
        Ok(Receipt {
            run,
            epoch,
            key,
            stage,
            pass,
            public_key: r.array()?,
            weights_digest: r.array()?,
            input_hash: r.array()?,
            output_hash: r.array()?,
            signature: r.array()?,
        })
    }
}

pub(crate) fn put_opt_receipt(w: &mut Writer, r: &Option<Receipt>) {
    match r {
        Some(r) => {
            w.u8(1);
            r.encode(w);
        }
        None => {
            w.u8(0);
        }
    }
}

pub(crate) fn get_opt_receipt(r: &mut Reader<'_>) -> Result<Option<Receipt>, WireError> {
    match r.u8()? {
        0 => Ok(None),
        1 => Ok(Some(Receipt::decode(r)?)),
        t => Err(WireError::BadTag {
            what: "receipt option",
            tag: t as u64,
        }),
    }
}

/// Caps of the audit kinds.
pub mod caps {
    use super::*;
    /// Body cap of [`AuditFetch`].
    pub const FETCH: usize = 256;
    /// Body cap of [`AuditRecord`]: four frames and their receipts.
    pub const RECORD: usize = 4 * MAX_FRAME_BYTES + 4 * RECEIPT_BYTES + 256;
    /// Body cap of [`AuditRecompute`]: two input frames.
    pub const RECOMPUTE: usize = 2 * MAX_FRAME_BYTES + 256;
    /// Body cap of [`AuditResult`]: two output frames.
    pub const RESULT: usize = 2 * MAX_FRAME_BYTES + 256;
}

/// Proof of training's message kinds (80-99).
pub mod kind {
    /// Ask a peer for its receipts and frames of one micro-batch ([`AuditFetch`](super::AuditFetch)).
    pub const AUDIT_FETCH: u16 = 80;
    /// Receipts and frames kept for one micro-batch ([`AuditRecord`](super::AuditRecord)).
    pub const AUDIT_RECORD: u16 = 81;
    /// Recompute a micro-batch's stage pass ([`AuditRecompute`](super::AuditRecompute)).
    pub const AUDIT_RECOMPUTE: u16 = 82;
    /// The recomputed frames ([`AuditResult`](super::AuditResult)).
    pub const AUDIT_RESULT: u16 = 83;
}

/// Proof of training's kind numbers, names and caps.
pub const KINDS: KindSet = KindSet {
    layer: "proof of training",
    first: 80,
    last: 99,
    kinds: &[
        KindInfo::new(kind::AUDIT_FETCH, "audit_fetch", caps::FETCH),
        KindInfo::new(kind::AUDIT_RECORD, "audit_record", caps::RECORD),
        KindInfo::new(kind::AUDIT_RECOMPUTE, "audit_recompute", caps::RECOMPUTE),
        KindInfo::new(kind::AUDIT_RESULT, "audit_result", caps::RESULT),
    ],
};

/// Trainer -> the peer that served (`key`, `stage`): send what you kept of it.
/// Reply: [`AuditRecord`] with the receipts, the input frames if `frames`, the output frames if
/// `outputs` (asked only when a recomputation disagrees: receipts already commit to them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditFetch {
    /// The run.
    pub run: RunId,
    /// The run's epoch.
    pub epoch: u32,
    /// The micro-batch attempt audited.
    pub key: MbKey,
    /// The stage audited.
    pub stage: u32,
    /// Send the input frames.
    pub frames: bool,
    /// Send the output frames.
    pub outputs: bool,
}

impl WireMessage for AuditFetch {
    const INFO: &'static KindInfo = KINDS.row(kind::AUDIT_FETCH);
    fn encode(&self, w: &mut Writer) {
        w.array(&self.run.0).u32(self.epoch).u64(self.key.step);
        w.u32(self.key.mb).u32(self.key.attempt).u32(self.stage);
        w.u8(self.frames as u8 | (self.outputs as u8) << 1);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let run = RunId(r.array()?);
        let epoch = r.u32()?;
        let key = MbKey {
            step: r.u64()?,
            mb: r.u32()?,
            attempt: r.u32()?,
        };
        let stage = r.u32()?;
        if stage as usize >= MAX_STAGES {
            return Err(WireError::Invalid("stage index beyond MAX_STAGES"));
        }
        let flags = r.u8()?;
        if flags > 3 {
            return Err(WireError::BadTag {
                what: "audit fetch flags",
                tag: flags as u64,
            });
        }
        Ok(AuditFetch {
            run,
            epoch,
            key,
            stage,
            frames: flags & 1 != 0,
            outputs: flags & 2 != 0,
        })
    }
}

/// A peer's record of one micro-batch attempt at one stage: its receipts (absent for a pass it
/// did not serve) and, when asked, the four frames (empty when absent).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuditRecord {
    /// Its signed forward receipt.
    pub forward: Option<Receipt>,
    /// Its signed backward receipt.
    pub backward: Option<Receipt>,
    /// The activations it received.
    pub fwd_in: Vec<u8>,
    /// The activations it sent on.
    pub fwd_out: Vec<u8>,
    /// The output gradient it received.
    pub bwd_in: Vec<u8>,
    /// The input gradient it sent back.
    pub bwd_out: Vec<u8>,
    /// The previous hop's forward receipt that came with `fwd_in` (`None` from the trainer).
    pub fwd_in_receipt: Option<Receipt>,
    /// The next hop's backward receipt that came with `bwd_in` (`None` from the trainer).
    pub bwd_in_receipt: Option<Receipt>,
}

impl WireMessage for AuditRecord {
    const INFO: &'static KindInfo = KINDS.row(kind::AUDIT_RECORD);
    fn encode(&self, w: &mut Writer) {
        put_opt_receipt(w, &self.forward);
        put_opt_receipt(w, &self.backward);
        w.bytes(&self.fwd_in)
            .bytes(&self.fwd_out)
            .bytes(&self.bwd_in)
            .bytes(&self.bwd_out);
        put_opt_receipt(w, &self.fwd_in_receipt);
        put_opt_receipt(w, &self.bwd_in_receipt);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(AuditRecord {
            forward: get_opt_receipt(r)?,
            backward: get_opt_receipt(r)?,
            fwd_in: get_frame(r, "fwd_in")?,
            fwd_out: get_frame(r, "fwd_out")?,
            bwd_in: get_frame(r, "bwd_in")?,
            bwd_out: get_frame(r, "bwd_out")?,
            fwd_in_receipt: get_opt_receipt(r)?,
            bwd_in_receipt: get_opt_receipt(r)?,
        })
    }
}

/// Trainer -> an auditor (another replica of `stage`, still at step `key.step`): recompute the
/// forward of `fwd_in` and the backward of `bwd_in` (input gradient only, nothing accumulated).
/// Reply: [`AuditResult`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecompute {
    /// The run.
    pub run: RunId,
    /// The run's epoch.
    pub epoch: u32,
    /// The micro-batch attempt audited.
    pub key: MbKey,
    /// The stage audited.
    pub stage: u32,
    /// The activations to run forward.
    pub fwd_in: Vec<u8>,
    /// The output gradient to run backward.
    pub bwd_in: Vec<u8>,
    /// Send the recomputed frames back (else only their hashes).
    pub frames: bool,
}

impl WireMessage for AuditRecompute {
    const INFO: &'static KindInfo = KINDS.row(kind::AUDIT_RECOMPUTE);
    fn encode(&self, w: &mut Writer) {
        w.array(&self.run.0).u32(self.epoch).u64(self.key.step);
        w.u32(self.key.mb).u32(self.key.attempt).u32(self.stage);
        w.bytes(&self.fwd_in).bytes(&self.bwd_in).bool(self.frames);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let run = RunId(r.array()?);
        let epoch = r.u32()?;
        let key = MbKey {
            step: r.u64()?,
            mb: r.u32()?,
            attempt: r.u32()?,
        };
        let stage = r.u32()?;
        if stage as usize >= MAX_STAGES {
            return Err(WireError::Invalid("stage index beyond MAX_STAGES"));
        }
        Ok(AuditRecompute {
            run,
            epoch,
            key,
            stage,
            fwd_in: get_frame(r, "fwd_in")?,
            bwd_in: get_frame(r, "bwd_in")?,
            frames: r.bool()?,
        })
    }
}

/// An auditor's recomputation: the weights digest it used and the frames it would have sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditResult {
    /// The weights digest of the state it recomputed with.
    pub weights_digest: [u8; 32],
    /// BLAKE3 of the recomputed frames (always); the frames themselves only when asked.
    pub fwd_hash: [u8; 32],
    /// BLAKE3 of the recomputed input gradient.
    pub bwd_hash: [u8; 32],
    /// The recomputed activations, when asked.
    pub fwd_out: Vec<u8>,
    /// The recomputed input gradient, when asked.
    pub bwd_out: Vec<u8>,
}

impl WireMessage for AuditResult {
    const INFO: &'static KindInfo = KINDS.row(kind::AUDIT_RESULT);
    fn encode(&self, w: &mut Writer) {
        w.array(&self.weights_digest)
            .array(&self.fwd_hash)
            .array(&self.bwd_hash)
            .bytes(&self.fwd_out)
            .bytes(&self.bwd_out);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(AuditResult {
            weights_digest: r.array()?,
            fwd_hash: r.array()?,
            bwd_hash: r.array()?,
            fwd_out: get_frame(r, "fwd_out")?,
            bwd_out: get_frame(r, "bwd_out")?,
        })
    }
}

/// Decodes `body` as `kind` and re-encodes it (`None` for a kind not in [`KINDS`]).
pub fn roundtrip_any(kind: u16, body: &[u8]) -> Option<Result<Vec<u8>, WireError>> {
    fn rt<M: WireMessage>(body: &[u8]) -> Result<Vec<u8>, WireError> {
        let mut r = Reader::new(body);
        let m = M::decode(&mut r)?;
        r.finish()?;
        let mut w = Writer::new();
        m.encode(&mut w);
        Ok(w.into_vec())
    }
    Some(match kind {
        kind::AUDIT_FETCH => rt::<AuditFetch>(body),
        kind::AUDIT_RECORD => rt::<AuditRecord>(body),
        kind::AUDIT_RECOMPUTE => rt::<AuditRecompute>(body),
        kind::AUDIT_RESULT => rt::<AuditResult>(body),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt(id: &Identity) -> Receipt {
        Receipt::sign(
            id,
            RunId([1; 16]),
            2,
            MbKey {
                step: 3,
                mb: 4,
                attempt: 1,
            },
            1,
            Pass::Backward,
            [9; 32],
            b"in",
            b"out",
        )
    }

    #[test]
    fn receipts_verify_only_for_their_signer_and_content() {
        let a = Identity::from_secret([1; 32]);
        let b = Identity::from_secret([2; 32]);
        let r = receipt(&a);
        assert!(r.verify(&a.peer_id()));
        assert!(!r.verify(&b.peer_id()));
        let mut edited = r.clone();
        edited.output_hash = frame_hash(b"other");
        assert!(!edited.verify(&a.peer_id()));
        // Another key put in the receipt: the id no longer matches the claimed peer.
        let mut swapped = receipt(&b);
        swapped.public_key = *a.public_key().as_bytes();
        assert!(!swapped.verify(&a.peer_id()));
    }

    #[test]
    fn received_receipts_are_checked_against_sender_and_frame() {
        let a = Identity::from_secret([1; 32]);
        let b = Identity::from_secret([2; 32]);
        let r = receipt(&a);
        let key = r.key;
        let check = |rc: Option<&Receipt>, from: &PeerId, stage, pass, frame: &[u8]| {
            Receipt::check_received(rc, from, &RunId([1; 16]), 2, key, stage, pass, frame)
        };
        let ok = check(Some(&r), &a.peer_id(), 1, Pass::Backward, b"out");
        assert_eq!(ok, Ok(()));
        assert!(check(None, &a.peer_id(), 1, Pass::Backward, b"out").is_err());
        // Bytes changed in transit, or a receipt replayed for other bytes.
        let bad = check(Some(&r), &a.peer_id(), 1, Pass::Backward, b"ouT");
        assert_eq!(bad, Err("receipt does not match the frame"));
        // Relayed by another peer than its signer.
        let relayed = check(Some(&r), &b.peer_id(), 1, Pass::Backward, b"out");
        assert_eq!(relayed, Err("receipt not signed by the sender"));
        assert!(check(Some(&r), &a.peer_id(), 0, Pass::Backward, b"out").is_err());
        assert!(check(Some(&r), &a.peer_id(), 1, Pass::Forward, b"out").is_err());
        // A forged hash keeps the frame check happy but breaks the signature.
        let mut forged = r.clone();
        forged.output_hash = frame_hash(b"forged");
        let f = check(Some(&forged), &a.peer_id(), 1, Pass::Backward, b"forged");
        assert_eq!(f, Err("receipt not signed by the sender"));
    }

    #[test]
    fn messages_round_trip_and_refuse_garbage() {
        let a = Identity::from_secret([1; 32]);
        let rec = AuditRecord {
            forward: None,
            backward: Some(receipt(&a)),
            fwd_in: vec![1, 2, 3],
            fwd_out: vec![],
            bwd_in: vec![4],
            bwd_out: vec![5, 6],
            fwd_in_receipt: Some(receipt(&a)),
            bwd_in_receipt: None,
        };
        let mut w = Writer::new();
        rec.encode(&mut w);
        let bytes = w.into_vec();
        assert_eq!(
            roundtrip_any(kind::AUDIT_RECORD, &bytes).unwrap().unwrap(),
            bytes
        );
        let mut r = Reader::new(&bytes);
        assert_eq!(AuditRecord::decode(&mut r).unwrap(), rec);
        for cut in 0..bytes.len() {
            assert!(
                roundtrip_any(kind::AUDIT_RECORD, &bytes[..cut])
                    .unwrap()
                    .is_err()
            );
        }
        let f = AuditFetch {
            run: RunId([7; 16]),
            epoch: 1,
            key: MbKey {
                step: 1,
                mb: 2,
                attempt: 3,
            },
            stage: 1,
            frames: true,
            outputs: false,
        };
        let mut w = Writer::new();
        f.encode(&mut w);
        let mut bytes = w.into_vec();
        assert_eq!(
            roundtrip_any(kind::AUDIT_FETCH, &bytes).unwrap().unwrap(),
            bytes
        );
        *bytes.last_mut().unwrap() = 4;
        assert!(roundtrip_any(kind::AUDIT_FETCH, &bytes).unwrap().is_err());
        assert!(roundtrip_any(crate::wire::kind::PING, &bytes).is_none());
    }
}
