//! The stage side of audits (issue #7): a child module of `stage` (it reads the worker's shard,
//! codecs and run).
//!
//! - Every forward and backward the worker serves is recorded: a signed [`Receipt`] and the exact
//!   frames received and sent, kept for the current step only (bounded: at most
//!   [`records_cap`] attempts; a newer step drops the older ones), so the trainer can audit any
//!   micro-batch of the step before the replicas apply it.
//! - `AuditFetch`: the record of one (attempt, stage), with or without the frames.
//! - `AuditRecompute`: recompute a stage pass from given input frames with this replica's weights
//!   (which must still be at that step): forward, then the input gradient only (nothing is
//!   accumulated), both encoded with the run's codecs, as the audited peer should have sent them.

use std::collections::HashMap;
use std::sync::Arc;

use super::{StageWorker, lock, refuse};
use crate::compute::recompute;
use crate::error::{Error, Result};
use crate::peer::{Peer, PeerShared, RequestCtx};
use crate::protocol::MbKey;
use crate::receipt::{
    AuditFetch, AuditRecompute, AuditRecord, AuditResult, Pass, Receipt, frame_hash,
};
use crate::rpc::{self, RpcError, code};
use crate::wire::{self, kind};

/// Most attempts recorded per step: every micro-batch, retried a few times.
pub(super) fn records_cap(micro_batches: usize) -> usize {
    4 * micro_batches + 16
}

/// Our receipt, the frame received, the frame sent, and the sender's receipt that came with the
/// frame received (`None` when the trainer sent it).
type Slot = (Receipt, Vec<u8>, Vec<u8>, Option<Receipt>);

#[derive(Default)]
struct Rec {
    forward: Option<Slot>,
    backward: Option<Slot>,
}

/// Receipts and frames of the current step, and the weights digest the step started from.
#[derive(Default)]
pub(super) struct AuditStore {
    step: u64,
    digest: Option<(u64, [u8; 32])>,
    records: HashMap<MbKey, Rec>,
}

impl StageWorker {
    /// Serves the audit kinds (called from `register`).
    pub(super) fn register_audit(&self, peer: &Peer) {
        peer.register_kinds(&crate::receipt::KINDS)
            .expect("layer kind ranges are disjoint (tested)");
        let w = self.clone();
        peer.register(
            kind::AUDIT_FETCH,
            move |_p: Arc<PeerShared>, ctx: RequestCtx, body: Vec<u8>| {
                let w = w.clone();
                async move { w.on_audit_fetch(ctx, body).await }
            },
        );
        let w = self.clone();
        peer.register(
            kind::AUDIT_RECOMPUTE,
            move |_p: Arc<PeerShared>, ctx: RequestCtx, body: Vec<u8>| {
                let w = w.clone();
                async move { w.on_audit_recompute(ctx, body).await }
            },
        );
    }

    /// The weights digest of `step`, computed once per step.
    fn step_digest(&self, step: u64) -> Result<[u8; 32]> {
        if let Some((s, d)) = lock(&self.inner.audit).digest
            && s == step
        {
            return Ok(d);
        }
        let g = lock(&self.inner.shard);
        let s = g.as_ref().ok_or_else(|| Error::NoState)?;
        if s.step() != step {
            return Err(Error::StepMismatch {
                asked: step,
                at: s.step(),
            });
        }
        let d = s.weights_digest()?;
        drop(g);
        lock(&self.inner.audit).digest = Some((step, d));
        Ok(d)
    }

    /// The weights digest of `step`, known already (the `Apply` that made the weights computed
    /// it); [`StageWorker::install`] forgets it.
    pub(super) fn remember_step_digest(&self, step: u64, digest: [u8; 32]) {
        lock(&self.inner.audit).digest = Some((step, digest));
    }

    /// Forgets the cached weights digest (the weights were replaced).
    pub(super) fn forget_step_digest(&self) {
        lock(&self.inner.audit).digest = None;
    }

    /// Signs and keeps the receipt and frames of one pass just served, with the sender's
    /// receipt for `input`; returns our receipt, to send on with `output`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn record_pass(
        &self,
        pass: Pass,
        run: crate::membership::RunId,
        epoch: u32,
        key: MbKey,
        input: Vec<u8>,
        output: Vec<u8>,
        received: Option<Receipt>,
    ) -> Option<Receipt> {
        let digest = match self.step_digest(key.step) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(step = key.step, microbatch = key.mb, error = %e, "no receipt");
                return None;
            }
        };
        let receipt = Receipt::sign(
            self.inner.peer.node().identity(),
            run,
            epoch,
            key,
            self.inner.opts.stage,
            pass,
            digest,
            &input,
            &output,
        );
        let cap = records_cap(self.inner.opts.config.train.micro_batches);
        let mut st = lock(&self.inner.audit);
        if key.step > st.step || st.records.is_empty() {
            st.records.clear();
            st.step = key.step;
        }
        if key.step != st.step {
            return Some(receipt);
        }
        if !st.records.contains_key(&key) && st.records.len() >= cap {
            tracing::warn!(
                step = key.step,
                microbatch = key.mb,
                "audit record table full"
            );
            return Some(receipt);
        }
        let rec = st.records.entry(key).or_default();
        let slot = (receipt.clone(), input, output, received);
        match pass {
            Pass::Forward => rec.forward = Some(slot),
            Pass::Backward => rec.backward = Some(slot),
        }
        Some(receipt)
    }

    async fn on_audit_fetch(
        &self,
        _ctx: RequestCtx,
        body: Vec<u8>,
    ) -> Result<rpc::Reply, RpcError> {
        let f: AuditFetch = wire::decode_body(&body)?;
        self.check_run(&f.run, f.epoch)?;
        self.check_stage(f.stage)?;
        let st = lock(&self.inner.audit);
        let Some(rec) = st.records.get(&f.key).filter(|_| st.step == f.key.step) else {
            return Err(refuse(code::BAD_REQUEST, "no record of this attempt"));
        };
        let frames = |s: &Option<Slot>| match s {
            Some((_, i, o, _)) => (
                if f.frames { i.clone() } else { Vec::new() },
                if f.outputs { o.clone() } else { Vec::new() },
            ),
            None => (Vec::new(), Vec::new()),
        };
        let (fwd_in, fwd_out) = frames(&rec.forward);
        let (bwd_in, bwd_out) = frames(&rec.backward);
        let out = AuditRecord {
            forward: rec.forward.as_ref().map(|s| s.0.clone()),
            backward: rec.backward.as_ref().map(|s| s.0.clone()),
            fwd_in,
            fwd_out,
            bwd_in,
            bwd_out,
            fwd_in_receipt: rec.forward.as_ref().and_then(|s| s.3.clone()),
            bwd_in_receipt: rec.backward.as_ref().and_then(|s| s.3.clone()),
        };
        drop(st);
        rpc::reply(&out)
    }

    async fn on_audit_recompute(
        &self,
        _ctx: RequestCtx,
        body: Vec<u8>,
    ) -> Result<rpc::Reply, RpcError> {
        let a: AuditRecompute = wire::decode_body(&body)?;
        self.check_run(&a.run, a.epoch)?;
        self.check_stage(a.stage)?;
        let digest = self
            .step_digest(a.key.step)
            .map_err(|e| refuse(code::BAD_REQUEST, e.to_string()))?;
        let shard = self.inner.shard.clone();
        let limits = self.limits();
        let (act, grad) = (self.inner.act_codec, self.inner.grad_codec);
        let stage = self.inner.opts.stage as usize;
        let step = a.key.step;
        let send_frames = a.frames;
        let done = tokio::task::spawn_blocking(move || -> Result<(Vec<u8>, Vec<u8>)> {
            let g = lock(&shard);
            let s = g.as_ref().ok_or_else(|| Error::NoState)?;
            if s.step() != step {
                return Err(Error::StepMismatch {
                    asked: step,
                    at: s.step(),
                });
            }
            recompute(s, stage, &a.fwd_in, &a.bwd_in, &limits, act, grad)
        })
        .await
        .map_err(Error::from)
        .and_then(|r| r)
        .map_err(|e| refuse(code::BAD_REQUEST, e.to_string()))?;
        let (fwd_hash, bwd_hash) = (frame_hash(&done.0), frame_hash(&done.1));
        let (fwd_out, bwd_out) = if send_frames {
            done
        } else {
            (Vec::new(), Vec::new())
        };
        rpc::reply(&AuditResult {
            weights_digest: digest,
            fwd_hash,
            bwd_hash,
            fwd_out,
            bwd_out,
        })
    }
}
