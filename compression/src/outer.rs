//! Multi-step replica sync on flat `f32` vectors (DiLoCo, arXiv 2311.08105; SparseLoCo, arXiv
//! 2508.15706), sans-IO: replicas take `H` inner optimizer steps on their own micro-batches,
//! then exchange the compressed **pseudo-gradient** `anchor - weights` and all apply the same
//! outer step to the shared anchor, so they are bitwise identical again at every sync boundary.
//!
//! - [`pseudo_gradient`]: `anchor - weights`, the drift of `H` inner steps.
//! - [`SparseFeedback`]: SparseLoCo's error feedback with decay `beta`: `e = beta * e + delta`,
//!   send `C(e)`, keep `e - decode(C(e))`. Pads the vector to whole chunks so a per-row top-k
//!   codec (`topk-row:F`) selects within each chunk of `chunk` values, as SparseLoCo does per
//!   4096-chunk.
//! - [`OuterOptimizer`]: the outer step on the averaged decoded pseudo-gradient: SGD with
//!   (Nesterov) momentum, `lr = 0.7, momentum = 0.9` in DiLoCo; plain SGD with `lr = 1` in
//!   SparseLoCo (its error feedback already acts as momentum).
//!
//! Every replica must decode every share and sum them in one fixed order (the participant
//! order), then run the same [`OuterOptimizer::step`]: the result is then a pure function of the
//! frames, and replicas agree to the bit.

use crate::decoder::Decoder;
use crate::encoder::Encoder;
use crate::error::{Error, Result};
use crate::frame::Limits;

/// `out = anchor - weights`: the pseudo-gradient of the inner steps since the anchor.
pub fn pseudo_gradient(anchor: &[f32], weights: &[f32], out: &mut Vec<f32>) -> Result<()> {
    if anchor.len() != weights.len() {
        return Err(Error::FeedbackLength {
            residual: anchor.len(),
            got: weights.len(),
        });
    }
    out.clear();
    out.extend(anchor.iter().zip(weights).map(|(a, w)| a - w));
    Ok(())
}

/// The error-feedback state of one replica's pseudo-gradient stream, with chunk padding.
#[derive(Debug)]
pub struct SparseFeedback {
    /// Length of the real vector (the residual is padded to whole chunks).
    len: usize,
    chunk: usize,
    beta: f32,
    residual: Vec<f32>,
    decoded: Vec<f32>,
}

impl SparseFeedback {
    /// A stream of `len`-element pseudo-gradients compressed in chunks of `chunk` values
    /// (>= 1), with residual decay `beta` in [0, 1] (1: plain error feedback).
    pub fn new(len: usize, chunk: usize, beta: f32) -> SparseFeedback {
        let chunk = chunk.max(1);
        SparseFeedback {
            len,
            chunk,
            beta: beta.clamp(0.0, 1.0),
            residual: vec![0.0; len.div_ceil(chunk) * chunk],
            decoded: Vec::new(),
        }
    }

    /// The frame shape: `[chunks, chunk]`.
    pub fn shape(&self) -> [usize; 2] {
        [self.residual.len() / self.chunk, self.chunk]
    }

    /// What has not been sent yet (padded; the tail past the real length stays zero).
    pub fn residual(&self) -> &[f32] {
        &self.residual[..self.len]
    }

    /// Forgets the residual (a resync).
    pub fn reset(&mut self) {
        self.residual.fill(0.0);
    }

    /// A copy of the whole (padded) residual, to undo an [`SparseFeedback::encode`] whose share
    /// was never applied (a sync round redone).
    pub fn snapshot(&self) -> Vec<f32> {
        self.residual.clone()
    }

    /// Puts back a [`SparseFeedback::snapshot`] of this stream; one of another length is refused.
    pub fn restore(&mut self, snapshot: &[f32]) -> Result<()> {
        if snapshot.len() != self.residual.len() {
            return Err(Error::FeedbackLength {
                residual: self.residual.len(),
                got: snapshot.len(),
            });
        }
        self.residual.copy_from_slice(snapshot);
        Ok(())
    }

    /// Elements of a frame of this stream (the length padded to whole chunks).
    pub fn padded_len(len: usize, chunk: usize) -> usize {
        len.div_ceil(chunk.max(1)) * chunk.max(1)
    }

    /// `e = beta * e + delta`; encodes `e` into `out`; keeps `e - decode(out)`. The receivers
    /// use [`SparseFeedback::decode_into`] (or any decoder, truncated to the real length).
    pub fn encode(
        &mut self,
        encoder: &mut Encoder,
        delta: &[f32],
        out: &mut Vec<u8>,
    ) -> Result<()> {
        if delta.len() != self.len {
            return Err(Error::FeedbackLength {
                residual: self.len,
                got: delta.len(),
            });
        }
        let beta = self.beta;
        for (e, d) in self.residual.iter_mut().zip(delta) {
            *e = beta * *e + d;
        }
        encoder.encode_decoded(&self.residual, &self.shape(), out, &mut self.decoded)?;
        if self.decoded.len() != self.residual.len() {
            return Err(Error::FeedbackLength {
                residual: self.residual.len(),
                got: self.decoded.len(),
            });
        }
        for (e, d) in self.residual.iter_mut().zip(&self.decoded) {
            *e -= d;
        }
        Ok(())
    }

    /// Decodes a share of a stream of `sum.len()` elements in chunks of `chunk` and adds it,
    /// times `weight`, into `sum`: the receiver's half. A frame of any other geometry is
    /// refused.
    pub fn add_share(
        decoder: &mut Decoder,
        frame: &[u8],
        chunk: usize,
        weight: f32,
        sum: &mut [f32],
        scratch: &mut Vec<f32>,
    ) -> Result<()> {
        let chunk = chunk.max(1);
        let padded = sum.len().div_ceil(chunk) * chunk;
        let info = decoder.decode(frame, &Limits::new(padded), scratch)?;
        if info.elements != padded || scratch.len() != padded {
            return Err(Error::FeedbackLength {
                residual: padded,
                got: info.elements,
            });
        }
        for (s, v) in sum.iter_mut().zip(scratch.iter()) {
            *s += weight * v;
        }
        Ok(())
    }
}

/// The outer optimizer: SGD with optional (Nesterov) momentum on the averaged pseudo-gradient.
#[derive(Debug, Clone)]
pub struct OuterOptimizer {
    lr: f32,
    momentum: f32,
    nesterov: bool,
    buf: Vec<f32>,
}

impl OuterOptimizer {
    /// `lr` and `momentum` (0: none) for vectors of `len` elements.
    pub fn new(len: usize, lr: f32, momentum: f32, nesterov: bool) -> OuterOptimizer {
        OuterOptimizer {
            lr,
            momentum,
            nesterov,
            buf: if momentum != 0.0 {
                vec![0.0; len]
            } else {
                Vec::new()
            },
        }
    }

    /// `anchor -= lr * u`, where `u = delta` without momentum, else `m = momentum * m + delta`
    /// and `u = m` (heavy ball) or `u = delta + momentum * m` (Nesterov).
    pub fn step(&mut self, anchor: &mut [f32], delta: &[f32]) -> Result<()> {
        if anchor.len() != delta.len() || (self.momentum != 0.0 && self.buf.len() != delta.len()) {
            return Err(Error::FeedbackLength {
                residual: anchor.len(),
                got: delta.len(),
            });
        }
        let (lr, mu) = (self.lr, self.momentum);
        if mu == 0.0 {
            for (a, d) in anchor.iter_mut().zip(delta) {
                *a -= lr * d;
            }
            return Ok(());
        }
        for ((a, d), m) in anchor.iter_mut().zip(delta).zip(self.buf.iter_mut()) {
            *m = mu * *m + d;
            let u = if self.nesterov { d + mu * *m } else { *m };
            *a -= lr * u;
        }
        Ok(())
    }

    /// The momentum buffer (empty without momentum): part of the run state a joining replica
    /// must receive.
    pub fn momentum_buffer(&self) -> &[f32] {
        &self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Codec;

    fn vec(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let x = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed);
                (x >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    }

    #[test]
    fn sparse_feedback_keeps_what_it_did_not_send() {
        // Accounting: sum(decoded) + residual == sum(decayed deltas) (beta = 1 here).
        let n = 10_000;
        let codec: Codec = "topk-row:0.02+q2".parse().unwrap();
        let mut enc = Encoder::new(codec).unwrap();
        let mut fb = SparseFeedback::new(n, 4096, 1.0);
        assert_eq!(fb.shape(), [3, 4096]);
        let (mut frame, mut scratch, mut dec) = (Vec::new(), Vec::new(), Decoder::new());
        let mut sent = vec![0f32; n];
        let mut total = vec![0f32; n];
        for k in 0..5 {
            let d = vec(n, k);
            total.iter_mut().zip(&d).for_each(|(t, x)| *t += x);
            fb.encode(&mut enc, &d, &mut frame).unwrap();
            SparseFeedback::add_share(&mut dec, &frame, 4096, 1.0, &mut sent, &mut scratch)
                .unwrap();
            // 2% of each 4096-chunk: 82 per chunk.
            assert_eq!(scratch.iter().filter(|v| **v != 0.0).count(), 3 * 82);
        }
        for i in 0..n {
            let err = (sent[i] + fb.residual()[i] - total[i]).abs();
            assert!(
                err < 1e-4,
                "{i}: {} + {} vs {}",
                sent[i],
                fb.residual()[i],
                total[i]
            );
        }
        // Undo: a restored snapshot gives back the residual before an encode.
        let snap = fb.snapshot();
        fb.encode(&mut enc, &vec(n, 9), &mut frame).unwrap();
        assert_ne!(fb.snapshot(), snap);
        fb.restore(&snap).unwrap();
        assert_eq!(fb.snapshot(), snap);
        assert!(fb.restore(&snap[1..]).is_err());
        assert_eq!(SparseFeedback::padded_len(n, 4096), 3 * 4096);
        // A frame of another geometry is refused.
        let mut small = vec![0f32; 100];
        assert!(
            SparseFeedback::add_share(&mut dec, &frame, 4096, 1.0, &mut small, &mut scratch)
                .is_err()
        );
    }

    #[test]
    fn decay_shrinks_the_residual() {
        let n = 4096;
        let codec: Codec = "topk-row:0.01+q2".parse().unwrap();
        let mut enc = Encoder::new(codec).unwrap();
        let (mut a, mut b) = (
            SparseFeedback::new(n, 4096, 1.0),
            SparseFeedback::new(n, 4096, 0.5),
        );
        let mut frame = Vec::new();
        let d = vec(n, 7);
        for _ in 0..4 {
            a.encode(&mut enc, &d, &mut frame).unwrap();
            b.encode(&mut enc, &d, &mut frame).unwrap();
        }
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>();
        assert!(norm(b.residual()) < 0.5 * norm(a.residual()));
    }

    #[test]
    fn outer_step_matches_hand_computed_nesterov() {
        let mut anchor = vec![1.0f32, -2.0];
        let mut opt = OuterOptimizer::new(2, 0.7, 0.9, true);
        opt.step(&mut anchor, &[0.5, 1.0]).unwrap();
        // m = d; u = d + 0.9 d = 1.9 d; a -= 0.7 * 1.9 * d.
        assert!((anchor[0] - (1.0 - 0.7 * 1.9 * 0.5)).abs() < 1e-6);
        assert!((anchor[1] - (-2.0 - 0.7 * 1.9 * 1.0)).abs() < 1e-6);
        opt.step(&mut anchor, &[0.0, 0.0]).unwrap();
        // m = 0.9 d; u = 0.81 d.
        assert!((anchor[0] - (1.0 - 0.7 * 1.9 * 0.5 - 0.7 * 0.81 * 0.5)).abs() < 1e-6);
        // Plain SGD with lr 1 and the pseudo-gradient lands exactly on the replica's weights.
        let anchor0 = vec(64, 1);
        let weights = vec(64, 2);
        let mut d = Vec::new();
        pseudo_gradient(&anchor0, &weights, &mut d).unwrap();
        let mut a = anchor0.clone();
        OuterOptimizer::new(64, 1.0, 0.0, false)
            .step(&mut a, &d)
            .unwrap();
        for (x, w) in a.iter().zip(&weights) {
            assert!((x - w).abs() < 1e-6);
        }
        assert!(opt.step(&mut [0.0; 3], &[0.0; 3]).is_err());
    }
}
