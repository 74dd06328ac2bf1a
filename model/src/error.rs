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
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
