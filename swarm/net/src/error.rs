//! The network crate's error type.

/// Everything that can go wrong in the network layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a local file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A key file exists but is not a valid ed25519 key.
    #[error("invalid identity key in {path}: {reason}")]
    BadKey {
        /// The key file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Bytes from a peer were refused by the wire protocol decoder.
    #[error("wire protocol: {0}")]
    Wire(#[from] crate::wire::WireError),
    /// Building a TLS configuration or certificate failed.
    #[error("TLS setup: {0}")]
    Tls(String),
    /// A peer id in text form is not 64 hex digits.
    #[error("not a peer id: `{0}`")]
    BadPeerId(String),
    /// A link shape specification is invalid (the message says which part).
    #[error("bad link shape: {0}")]
    BadShape(String),
    /// A transport setting is beyond what QUIC can carry (a window or timeout too large).
    #[error("{0} too large for QUIC")]
    OutOfRange(&'static str),
    /// Binding or configuring the UDP socket failed.
    #[error("socket: {0}")]
    Socket(#[source] std::io::Error),
    /// A connection could not be started (bad address, endpoint closed, config refused).
    #[error("connect to {addr}: {reason}")]
    Connect {
        /// The address dialled.
        addr: std::net::SocketAddr,
        /// Why it could not start.
        reason: String,
    },
    /// An established connection failed or was closed (handshake refusal, timeout, peer gone).
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// The peer proved a different id than the one we dialled.
    #[error("peer at {addr} is {got}, expected {expected}")]
    WrongPeer {
        /// The address dialled.
        addr: std::net::SocketAddr,
        /// The id we dialled.
        expected: crate::identity::PeerId,
        /// The id the peer proved.
        got: crate::identity::PeerId,
    },
    /// Reading or writing a stream failed.
    #[error("stream: {0}")]
    Stream(String),
    /// A request got no answer in time.
    #[error("{what} timed out after {after:?}")]
    Timeout {
        /// What was waited for.
        what: &'static str,
        /// How long.
        after: std::time::Duration,
    },
    /// The remote peer refused a request with an application error.
    #[error("peer refused the request: {0}")]
    Remote(crate::rpc::RemoteError),
    /// The bootstrap peer belongs to another run than the one asked for.
    #[error("the bootstrap peer serves run {got}, not {expected}")]
    WrongRun {
        /// The run asked for.
        expected: crate::membership::RunId,
        /// The bootstrap's run.
        got: crate::membership::RunId,
    },
    /// Listening on an unspecified address (0.0.0.0 or ::) with nobody to tell us our address.
    #[error("listening on {listen} with no bootstrap: give an address to announce")]
    NoAnnounceAddress {
        /// The unspecified address listened on.
        listen: std::net::SocketAddr,
    },
}

/// This crate's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;
