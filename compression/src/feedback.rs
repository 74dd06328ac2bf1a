//! Error feedback for gradient streams: what compression drops from one send is added to the next.
//!
//! Ownership: the *sender* of a stream owns one [`ErrorFeedback`] per stream whose successive
//! tensors are summed by the receiver over time, such as the weight gradients a (stage, replica)
//! sends to its peers at each step boundary. Activations and per-micro-batch gradients do not use
//! it: each is different data, and carrying a residual across them would add one batch's error to
//! another's values.
//!
//! Lifecycle: [`ErrorFeedback::new`] starts with a zero residual; each send calls
//! [`ErrorFeedback::encode`] (or [`compensate`](ErrorFeedback::compensate), encode yourself, then
//! [`accumulate`](ErrorFeedback::accumulate)); on a resync (weights re-fetched, a replica rejoining,
//! the stream restarted or reshaped) call [`reset`](ErrorFeedback::reset), because the residual
//! refers to gradients of a state the receivers no longer share.
//!
//! Accounting invariant: after any number of sends, `sum(decoded frames) + residual ==
//! sum(gradients)` up to fp32 rounding. The residual is computed from what the frame decodes to,
//! bit for bit as receivers decode it (the encoder hands it back, see
//! [`Encoder::encode_decoded`]), so it is what the receivers actually missed.

use crate::decoder::Decoder;
use crate::encoder::Encoder;
use crate::error::{Error, Result};
use crate::frame::Limits;

/// The residual of one gradient stream, with scratch to use it without allocating.
#[derive(Debug)]
pub struct ErrorFeedback {
    residual: Vec<f32>,
    compensated: Vec<f32>,
    decoded: Vec<f32>,
    decoder: Decoder,
    pending: bool,
}

impl ErrorFeedback {
    /// A stream of tensors of `len` elements, with a zero residual.
    pub fn new(len: usize) -> ErrorFeedback {
        ErrorFeedback {
            residual: vec![0.0; len],
            compensated: Vec::with_capacity(len),
            decoded: Vec::with_capacity(len),
            decoder: Decoder::new(),
            pending: false,
        }
    }

    /// Elements per tensor of this stream.
    pub fn len(&self) -> usize {
        self.residual.len()
    }

    /// True for a stream of empty tensors.
    pub fn is_empty(&self) -> bool {
        self.residual.is_empty()
    }

    /// What the receivers have not yet been sent.
    pub fn residual(&self) -> &[f32] {
        &self.residual
    }

    /// The tensor of the last frame [`accumulate`](Self::accumulate)d (or
    /// [`encode`](Self::encode)d), decoded exactly as its receivers decode it: a sender that sums
    /// its own frame with theirs can take it from here instead of decoding the frame again.
    pub fn decoded(&self) -> &[f32] {
        &self.decoded
    }

    /// Forgets the residual (on a resync), keeping the length.
    pub fn reset(&mut self) {
        self.residual.fill(0.0);
        self.pending = false;
    }

    /// Forgets the residual and changes the tensor length (the stream now carries another shape).
    pub fn reset_to(&mut self, len: usize) {
        self.residual.clear();
        self.residual.resize(len, 0.0);
        self.pending = false;
    }

    /// Computes `grad + residual` into an internal buffer and returns it: the tensor to encode.
    /// Must be followed by [`accumulate`](Self::accumulate) with the frame made from it.
    pub fn compensate(&mut self, grad: &[f32]) -> Result<&[f32]> {
        if grad.len() != self.residual.len() {
            return Err(Error::FeedbackLength {
                residual: self.residual.len(),
                got: grad.len(),
            });
        }
        self.compensated.clear();
        self.compensated
            .extend(grad.iter().zip(&self.residual).map(|(g, r)| g + r));
        self.pending = true;
        Ok(&self.compensated)
    }

    /// Sets the residual to `compensated - decode(frame)`, where `frame` was encoded from the last
    /// [`compensate`](Self::compensate) result.
    pub fn accumulate(&mut self, frame: &[u8]) -> Result<()> {
        if !self.pending {
            // Without a compensated tensor the residual would be computed against stale data.
            return Err(Error::FeedbackOrder);
        }
        let limits = Limits::new(self.residual.len());
        self.decoder.decode(frame, &limits, &mut self.decoded)?;
        self.keep_dropped()
    }

    /// `residual = compensated - decoded`, ending the pending send.
    fn keep_dropped(&mut self) -> Result<()> {
        if self.decoded.len() != self.residual.len() {
            return Err(Error::FeedbackLength {
                residual: self.residual.len(),
                got: self.decoded.len(),
            });
        }
        for ((r, c), d) in self
            .residual
            .iter_mut()
            .zip(&self.compensated)
            .zip(&self.decoded)
        {
            *r = c - d;
        }
        self.pending = false;
        Ok(())
    }

    /// Compensates `grad`, encodes it into `out` with `encoder`, and keeps what was dropped.
    pub fn encode(
        &mut self,
        encoder: &mut Encoder,
        grad: &[f32],
        shape: &[usize],
        out: &mut Vec<u8>,
    ) -> Result<()> {
        self.compensate(grad)?;
        // The encoder hands back what the frame decodes to, so the frame is not decoded again.
        if let Err(e) = encoder.encode_decoded(&self.compensated, shape, out, &mut self.decoded) {
            // Nothing was sent, so the residual stays as it was.
            self.pending = false;
            return Err(e);
        }
        self.keep_dropped()
    }
}
