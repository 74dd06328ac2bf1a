//! The crate's error type.

/// Everything that can go wrong when naming a codec, encoding a tensor or decoding a frame.
///
/// Decoding errors are split by cause so that a peer can tell a truncated transfer from a
/// corrupted or hostile frame.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum Error {
    /// A codec name did not parse; the message says what was wrong and what is valid.
    #[error("invalid codec `{name}`: {reason}. {}", crate::codec::GRAMMAR)]
    InvalidCodec {
        /// The name as given.
        name: String,
        /// What was wrong with it.
        reason: String,
    },
    /// The shape given to `encode` does not describe the data (product differs, too many dims).
    #[error("shape {shape:?} does not describe {len} elements (at most {max_dims} dims)")]
    Shape {
        /// The shape as given.
        shape: Vec<usize>,
        /// The number of elements given.
        len: usize,
        /// The maximum number of dimensions a frame carries.
        max_dims: usize,
    },
    /// The input holds NaN or infinity where the codec quantizes (the scale would be meaningless).
    #[error("input holds a non-finite value at element {index}; codec `{codec}` cannot encode it")]
    NonFinite {
        /// Index of the offending element in the quantized values.
        index: usize,
        /// The codec in use.
        codec: String,
    },
    /// The frame ends before its header or payload does.
    #[error("truncated frame: need {needed} bytes, have {have}")]
    Truncated {
        /// Bytes the header says are needed.
        needed: usize,
        /// Bytes present.
        have: usize,
    },
    /// The frame does not start with the magic bytes.
    #[error("not a codec frame (bad magic)")]
    BadMagic,
    /// The frame has a version this build cannot read.
    #[error("unsupported frame version {0}")]
    UnsupportedVersion(u8),
    /// The frame declares more elements than the caller's [`crate::Limits`] allow.
    #[error("frame declares {declared} elements, more than the limit of {limit}")]
    TooLarge {
        /// Elements declared by the frame.
        declared: u64,
        /// The caller's cap.
        limit: usize,
    },
    /// The header's fields contradict each other or hold values no encoder writes.
    #[error("inconsistent frame: {0}")]
    Inconsistent(&'static str),
    /// The checksum does not match: the bytes were damaged (or forged).
    #[error("frame checksum mismatch: header says {expected:#010x}, bytes give {actual:#010x}")]
    Checksum {
        /// Checksum in the header.
        expected: u32,
        /// Checksum of the bytes received.
        actual: u32,
    },
    /// The payload passed the checksum but does not decode (bad zstd stream, bad index coding).
    #[error("corrupt payload: {0}")]
    Corrupt(&'static str),
    /// The caller's output slice has the wrong length for the frame.
    #[error("output buffer holds {have} elements, the frame has {needed}")]
    OutputLength {
        /// Elements in the frame.
        needed: usize,
        /// Elements in the caller's buffer.
        have: usize,
    },
    /// An error-feedback stream was fed a tensor of a different length than its residual.
    #[error(
        "error-feedback stream holds {residual} elements, got {got}; reset it on a shape change"
    )]
    FeedbackLength {
        /// Length of the residual.
        residual: usize,
        /// Length of the tensor given.
        got: usize,
    },
    /// [`crate::ErrorFeedback::accumulate`] was called without a preceding `compensate`.
    #[error("error feedback: accumulate must follow compensate with the frame made from it")]
    FeedbackOrder,
    /// zstd itself failed (out of memory in its context, or an internal error) while encoding.
    #[error("zstd: {0}")]
    Zstd(String),
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
