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
    /// Bytes from a peer were refused by the wire protocol decoder.
    #[error("wire protocol: {0}")]
    Wire(#[from] swarm_net::wire::WireError),
    /// A request got no answer in time.
    #[error("{what} timed out after {after:?}")]
    Timeout {
        what: &'static str,
        after: std::time::Duration,
    },
    /// The remote peer refused a request with an application error.
    #[error("peer refused the request: {0}")]
    Remote(swarm_net::rpc::RemoteError),
    /// The network layer failed otherwise (connection, stream, TLS, socket, membership).
    #[error(transparent)]
    Net(swarm_net::Error),
    /// The model crate refused an operation (tensor shapes, state bytes, checkpoints).
    #[error("model: {0}")]
    Model(#[from] swarm_model::Error),
    /// A tensor frame could not be encoded or decoded.
    #[error("codec: {0}")]
    Codec(#[from] swarm_compression::Error),
    /// The router could not plan or place (e.g. a stage has no replica).
    #[error("router: {0}")]
    Router(#[from] swarm_router::Error),
    /// A contribution ledger was refused (see [`crate::ledger::LedgerError`]).
    #[error("ledger: {0}")]
    Ledger(#[from] crate::ledger::LedgerError),
    /// The training run cannot go on (the message says why).
    #[error("run: {0}")]
    Run(String),
}

/// Keeps the kinds callers act on (a refusal, a timeout, a malformed message, a file) as this
/// crate's own variants, so `Error::Remote(r)` matches whichever layer the call went through.
impl From<swarm_net::Error> for Error {
    fn from(e: swarm_net::Error) -> Error {
        match e {
            swarm_net::Error::Remote(r) => Error::Remote(r),
            swarm_net::Error::Timeout { what, after } => Error::Timeout { what, after },
            swarm_net::Error::Wire(w) => Error::Wire(w),
            swarm_net::Error::Io { path, source } => Error::Io { path, source },
            other => Error::Net(other),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
