//! Judging a link: which side of a disputed stage-to-stage link lied, from the receipts each side
//! holds; and the distance of two frames' values.

use super::*;

/// [`frame_distance`] of two forward outputs as a stage boundary carries them: in a subspace
/// model (`tokens`) each begins with the micro-batch's token ids, which must be equal (else 1),
/// then the frame of the coordinates, which is what is compared.
pub fn hidden_distance(a: &[u8], b: &[u8], limits: &Limits, tokens: bool) -> f32 {
    if !tokens || a == b {
        return frame_distance(a, b, limits);
    }
    let max = limits.max_elements;
    let (Ok((ta, ua)), Ok((tb, ub))) = (
        swarm_compression::decode_tokens(a, max, u32::MAX),
        swarm_compression::decode_tokens(b, max, u32::MAX),
    ) else {
        return 1.0;
    };
    if ta != tb {
        return 1.0;
    }
    frame_distance(&a[ua..], &b[ub..], limits)
}

/// Relative L2 distance of two frames' decoded values (0 when bitwise identical; 1 when one does
/// not decode or the shapes differ).
pub fn frame_distance(a: &[u8], b: &[u8], limits: &Limits) -> f32 {
    if a == b {
        return 0.0;
    }
    let mut dec = Decoder::new();
    let (mut x, mut y) = (Vec::new(), Vec::new());
    let (Ok(ia), Ok(ib)) = (dec.decode(a, limits, &mut x), dec.decode(b, limits, &mut y)) else {
        return 1.0;
    };
    if ia.shape() != ib.shape() || x.len() != y.len() {
        return 1.0;
    }
    let (mut num, mut den) = (0f64, 0f64);
    for (p, q) in x.iter().zip(&y) {
        let d = (*p as f64) - (*q as f64);
        num += d * d;
        den += (*q as f64) * (*q as f64);
    }
    if !num.is_finite() || !den.is_finite() {
        return 1.0;
    }
    (num.sqrt() / den.sqrt().max(1e-30)) as f32
}
/// Who lied about the link between the audited peer `p` (stage `k`, receipts `fr`, `br`, already
/// checked) and its neighbour `n` at stage `nk` (`k - 1` when `up`, else `k + 1`; its receipts
/// `nf`, `nb` verified, its record `nrec`): `None` when the link's hashes agree.
#[allow(clippy::too_many_arguments)]
pub(super) fn link_liar(
    up: bool,
    p: PeerId,
    k: u32,
    n: PeerId,
    nk: u32,
    fr: &Receipt,
    br: &Receipt,
    nf: &Receipt,
    nb: &Receipt,
    nrec: &AuditRecord,
) -> Option<(PeerId, u32, &'static str)> {
    // Receipts travel with the frames, so each link has a counter-signed receipt: P
    // holds N's receipt for what N sent P (checked in `check_record`), N holds P's for
    // what P sent N. A signer bound to two different frames for one link lied; so did a
    // receiver that cannot show the sender's receipt for what it claims it received.
    let (n_sent, p_got, p_sent, n_got, n_holds, what) = if up {
        (
            nf.output_hash,
            fr.input_hash,
            br.output_hash,
            nb.input_hash,
            &nrec.bwd_in_receipt,
            Pass::Backward,
        )
    } else {
        (
            nb.output_hash,
            br.input_hash,
            fr.output_hash,
            nf.input_hash,
            &nrec.fwd_in_receipt,
            Pass::Forward,
        )
    };
    if n_sent != p_got {
        // P showed N's own signature over the frame P got.
        Some((n, nk, "signed two different frames sent on one link"))
    } else if p_sent != n_got {
        match n_holds {
            Some(r)
                if r.verify(&p)
                    && r.run == fr.run
                    && r.epoch == fr.epoch
                    && r.key == fr.key
                    && r.stage == k
                    && r.pass == what
                    && r.output_hash == n_got =>
            {
                Some((p, k, "signed two different frames sent on one link"))
            }
            _ => Some((
                n,
                nk,
                "cannot show the sender's receipt for the frame it claims it received",
            )),
        }
    } else {
        None
    }
}
