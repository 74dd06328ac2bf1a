//! Codecs for tensors on the wire: `&[f32]` in, self-describing framed bytes out, and back.
//!
//! Knows nothing of candle, tokio or sockets (see ARCHITECTURE.md).
//!
//! - [`Codec`]: a pipeline named by a string, e.g. `"topk:0.1+q8+zstd:3"` (see [`codec::GRAMMAR`]);
//!   `FromStr`/`Display` round-trip and serde reads and writes the string.
//! - [`Encoder`] / [`Decoder`]: hold scratch; encode `&[f32]` into a reused `Vec<u8>`, decode into
//!   a reused `Vec<f32>` or a caller's slice. No allocation once warm.
//! - [`frame`]: the frame layout; decoding validates everything against [`Limits`] first and
//!   returns a typed [`Error`] for truncated, oversized, inconsistent or corrupted frames.
//! - [`ErrorFeedback`]: the residual of a gradient stream that is summed over time.
//!
//! # The three streams of pipeline training
//!
//! - **Activations** (forward, stage k to k+1) and **activation gradients** (backward): each
//!   micro-batch is different data, so no error feedback. One [`Encoder`] per outgoing link (its
//!   scratch is reused across micro-batches), one [`Decoder`] per incoming link, and
//!   [`Limits`] set from the shape the receiver expects (`tokens × hidden`).
//! - **Weight gradients at the step boundary** (replica sync): summed over steps, so each
//!   (stage, replica) stream keeps one [`ErrorFeedback`], owned by the sender and
//!   [`reset`](ErrorFeedback::reset) on a resync. Receivers decode every peer's frame and apply the
//!   decoded values in a fixed peer order, so replicas stay bitwise identical: encoding is a pure
//!   function of (codec, seed, data), top-k breaks ties by index, and the rotation seed travels in
//!   the frame.
//!
//! ```
//! use swarm_compression::{Codec, Decoder, Encoder, ErrorFeedback, Limits};
//! // Activations: [tokens, hidden], one encoder per link, buffers reused per micro-batch.
//! let (tokens, hidden) = (64, 32);
//! let mut enc = Encoder::new("bf16".parse()?)?;
//! let mut dec = Decoder::new();
//! let (mut frame, mut back) = (Vec::new(), Vec::new());
//! let act: Vec<f32> = (0..tokens * hidden).map(|i| (i as f32).sin()).collect();
//! enc.encode(&act, &[tokens, hidden], &mut frame)?;
//! let info = dec.decode(&frame, &Limits::new(tokens * hidden), &mut back)?;
//! assert_eq!(info.shape(), &[tokens, hidden]);
//!
//! // Weight gradients: top-10% + 8-bit + zstd with error feedback per (stage, replica) stream.
//! let codec: Codec = "topk:0.1+q8+zstd:3".parse()?;
//! let mut grad_enc = Encoder::new(codec)?.with_seed(42); // e.g. derived from the run's seed
//! let mut feedback = ErrorFeedback::new(4096);
//! let grad: Vec<f32> = (0..4096).map(|i| ((i * 7919) % 1000) as f32 - 500.0).collect();
//! feedback.encode(&mut grad_enc, &grad, &[64, 64], &mut frame)?;
//! dec.decode(&frame, &Limits::new(4096), &mut back)?;
//! assert_eq!(back.iter().filter(|v| **v != 0.0).count(), 410);
//! feedback.reset(); // on a resync
//! # Ok::<(), swarm_compression::Error>(())
//! ```

#![warn(missing_docs)]

pub mod codec;
mod decoder;
mod encoder;
mod error;
mod feedback;
pub mod frame;
mod index;
pub mod outer;
mod quant;
mod rotate;
mod simd;
pub mod tokens;
mod topk;

pub use codec::{Codec, TopK, Values};
pub use decoder::{Decoder, decode_frame};
pub use encoder::{DEFAULT_SEED, Encoder};
pub use error::{Error, Result};
pub use feedback::ErrorFeedback;
pub use frame::{FrameInfo, IndexCoding, Limits};
pub use tokens::{decode_tokens, encode_tokens};
