//! What an audited peer shows: its record (receipts and the frames they commit to, with its
//! neighbours' receipts for its inputs) and, when a recomputation disagrees, its output frames.

use super::{Auditor, Ban, StepView, Tally, drifts};
use crate::identity::PeerId;
use crate::protocol::{Hop, MbKey};
use crate::receipt::{AuditFetch, AuditRecord, Pass, Receipt, frame_hash};

impl Auditor {
    /// Checks P's record; `Err(reason)` when P provably lied or cannot show its work.
    pub(super) fn check_record(
        &self,
        v: &StepView<'_>,
        key: MbKey,
        k: u32,
        peer: PeerId,
        route: &[Hop],
        rec: &AuditRecord,
    ) -> std::result::Result<(Receipt, Receipt), String> {
        let (Some(f), Some(b)) = (&rec.forward, &rec.backward) else {
            return Err("no receipt for a pass it was credited".into());
        };
        for (r, pass) in [(f, Pass::Forward), (b, Pass::Backward)] {
            if !r.verify(&peer) {
                return Err("receipt not signed by the peer".into());
            }
            if r.run != v.run
                || r.epoch != v.epoch
                || r.key != key
                || r.stage != k
                || r.pass != pass
            {
                return Err("receipt for another pass".into());
            }
        }
        // Outputs travel only when a recomputation disagrees; the receipts commit to them.
        if frame_hash(&rec.fwd_in) != f.input_hash
            || frame_hash(&rec.bwd_in) != b.input_hash
            || (!rec.fwd_out.is_empty() && frame_hash(&rec.fwd_out) != f.output_hash)
            || (!rec.bwd_out.is_empty() && frame_hash(&rec.bwd_out) != b.output_hash)
        {
            return Err("frames shown do not match its own receipts".into());
        }
        if f.weights_digest != b.weights_digest {
            return Err("two weights digests in one step".into());
        }
        if drifts(v) {
            // Replicas drift between sync boundaries: the receipts must sign the replica's own
            // state, the one the trainer recorded from its last Applied (or its load).
            if let Some(d) = v.own.get(&peer)
                && *d != f.weights_digest
            {
                return Err("receipt claims weights other than its own last applied state".into());
            }
        } else if let Some(d) = v.digests.get(k as usize).copied().flatten()
            && d != f.weights_digest
        {
            return Err("receipt claims weights other than the stage's agreed state".into());
        }
        // The inputs P shows must come with their senders' receipts for exactly those bytes
        // (checked by P when they arrived): P cannot claim to have received anything else.
        let stages = route.len() as u32;
        if k > 0 {
            let prev = route[k as usize - 1];
            if Receipt::check_received(
                rec.fwd_in_receipt.as_ref(),
                &prev.peer,
                &v.run,
                v.epoch,
                key,
                k - 1,
                Pass::Forward,
                &rec.fwd_in,
            )
            .is_err()
            {
                return Err("cannot show the previous hop's receipt for its input".into());
            }
        }
        if k + 1 < stages {
            let next = route[k as usize + 1];
            if Receipt::check_received(
                rec.bwd_in_receipt.as_ref(),
                &next.peer,
                &v.run,
                v.epoch,
                key,
                k + 1,
                Pass::Backward,
                &rec.bwd_in,
            )
            .is_err()
            {
                return Err("cannot show the next hop's receipt for its output gradient".into());
            }
        }
        Ok((f.clone(), b.clone()))
    }

    /// The audited peer's output frames, which travel only when a recomputation disagrees,
    /// into `rec`; they must be the ones its receipts `(forward, backward)` commit to, else it
    /// is banned (`Err`, logged as failed against `auditor`).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn fetch_outputs(
        &self,
        t: &mut Tally,
        v: &StepView<'_>,
        key: MbKey,
        k: u32,
        hop: Hop,
        (fr, br): (&Receipt, &Receipt),
        auditor: PeerId,
        rec: &mut AuditRecord,
    ) -> std::result::Result<(), Ban> {
        let p = hop.peer;
        let fetch = AuditFetch {
            run: v.run,
            epoch: v.epoch,
            key,
            stage: k,
            frames: false,
            outputs: true,
        };
        let outs: AuditRecord = match self.call(v.peer, hop.addr, p, &fetch).await {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(peer = %p.short(), error = %e, "audited peer did not show its outputs");
                AuditRecord::default()
            }
        };
        t.stats.bytes += (outs.fwd_out.len() + outs.bwd_out.len()) as u64;
        if frame_hash(&outs.fwd_out) != fr.output_hash
            || frame_hash(&outs.bwd_out) != br.output_hash
        {
            let reason = "outputs shown do not match its own receipts".to_string();
            return Err(self.lied_to(t, p, key, k, auditor, reason, fr.output_hash));
        }
        rec.fwd_out = outs.fwd_out;
        rec.bwd_out = outs.bwd_out;
        Ok(())
    }
}
