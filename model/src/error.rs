//! The model crate's error type.

/// Everything that can go wrong in the model crate. Variants are added as modules need them.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A model or run config is inconsistent or out of range.
    #[error("invalid config: {0}")]
    Config(String),
    /// A tensor operation failed (shape mismatch, dtype, device).
    #[error("tensor op failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// Training data cannot be read or batched as asked (empty corpus, id outside the vocabulary,
    /// sequence longer than the split).
    #[error("data: {0}")]
    Data(String),
    /// A tokenizer file is malformed or of an unsupported kind.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A checkpoint file is malformed: truncated, hostile or unparsable header, unknown format.
    #[error("malformed checkpoint: {0}")]
    Checkpoint(String),
    /// A checkpoint lacks a tensor its config requires.
    #[error("checkpoint is missing tensor {name}")]
    MissingTensor {
        /// Its HF name.
        name: String,
    },
    /// A checkpoint has a tensor its config does not explain (a typo or another architecture).
    #[error("checkpoint has unexpected tensor {name}")]
    UnexpectedTensor {
        /// Its name in the file.
        name: String,
    },
    /// A checkpoint tensor's shape disagrees with the config.
    #[error("tensor {name} has shape {found:?}, config implies {expected:?}")]
    TensorShape {
        /// The tensor's name.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A checkpoint tensor has a dtype we do not load (only f32, f16 and bf16 are weights).
    #[error("tensor {name} has dtype {dtype}, expected F32, F16 or BF16")]
    TensorDtype {
        /// The tensor's name.
        name: String,
        /// Its dtype in the file.
        dtype: String,
    },
    /// A shard was asked for a piece it does not hold, or pieces were combined wrongly (e.g. a
    /// tied head without its embedding, overlapping stages).
    #[error("piece: {0}")]
    Piece(String),
    /// Forward input does not fit the model: token out of vocab, wrong shape or dtype, too long.
    #[error("bad input: {0}")]
    Input(String),
    /// A forward context was used after the weights it was computed with were replaced by an
    /// optimizer step or a state import; its gradients would be wrong.
    #[error("forward context is stale: the weights changed since its forward pass")]
    StaleContext,
    /// Serialized shard state (weights + optimizer moments) does not match the shard's names,
    /// shapes or dtypes, or is malformed.
    #[error("bad shard state: {0}")]
    State(String),
}

/// The model crate's results.
pub type Result<T, E = Error> = std::result::Result<T, E>;
