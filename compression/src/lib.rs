//! Codecs for tensors on the wire: `&[f32]` in, self-describing framed bytes out, and back.
//!
//! Knows nothing of candle, tokio or sockets (see ARCHITECTURE.md).
//!
//! - [`Codec`]: a pipeline named by a string, e.g. `"topk:0.1+q8+zstd:3"` (see [`codec::GRAMMAR`]).
//! - [`Encoder`] / [`Decoder`]: hold scratch; encode into and decode from reusable buffers.
//! - [`frame`]: the frame layout; decoding validates everything against [`Limits`] first.
//! - [`ErrorFeedback`]: the residual of a gradient stream that is summed over time.
//!
//! ```
//! use swarm_compression::{Codec, Decoder, Encoder, Limits};
//! let codec: Codec = "topk:0.1+q8+zstd:3".parse()?;
//! let mut enc = Encoder::new(codec)?;
//! let mut dec = Decoder::new();
//! let (mut frame, mut back) = (Vec::new(), Vec::new());
//! let data: Vec<f32> = (0..4096).map(|i| ((i * 7919) % 1000) as f32 - 500.0).collect();
//! enc.encode(&data, &[64, 64], &mut frame)?;
//! let info = dec.decode(&frame, &Limits::new(1 << 20), &mut back)?;
//! assert_eq!(info.shape(), &[64, 64]);
//! assert_eq!(back.iter().filter(|v| **v != 0.0).count(), 410);
//! # Ok::<(), swarm_compression::Error>(())
//! ```

pub mod codec;
mod decoder;
mod encoder;
mod error;
mod feedback;
pub mod frame;
mod index;
mod quant;
mod rotate;
mod topk;

pub use codec::{Codec, TopK, Values};
pub use decoder::{Decoder, decode_frame};
pub use encoder::{DEFAULT_SEED, Encoder};
pub use error::{Error, Result};
pub use feedback::ErrorFeedback;
pub use frame::{FrameInfo, IndexCoding, Limits};
