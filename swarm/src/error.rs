//! The swarm crate's error type.

/// Everything that can go wrong in the swarm crate. Variants are added as modules need them.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a local file failed.
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A key file exists but is not a valid ed25519 key.
    #[error("invalid identity key in {path}: {reason}")]
    BadKey {
        path: std::path::PathBuf,
        reason: String,
    },
    /// Bytes from a peer were refused by the wire protocol decoder.
    #[error("wire protocol: {0}")]
    Wire(#[from] crate::wire::WireError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
