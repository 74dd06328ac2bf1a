//! Request/response over QUIC: one bidirectional stream per request, one envelope each way.
//!
//! The client writes a request envelope and finishes its side; the server reads exactly one
//! envelope (header checked before the body is read, see [`crate::wire`]), requires the stream to
//! end there, hands `(from, kind, body)` to the [`Service`], and writes the reply envelope. A
//! refusal travels back as a [`RemoteError`] (kind `ERROR`) and the connection stays up; bytes the
//! wire protocol refuses close the whole connection with [`CLOSE_PROTOCOL`], because a peer that
//! sends them is broken or hostile. Other connections are unaffected.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use quinn::{RecvStream, SendStream};

use crate::error::{Error, Result};
use crate::identity::PeerId;
use crate::transport::{CLOSE_PROTOCOL, Node, PeerConn};
use crate::wire::{
    self, HEADER_LEN, Header, KindInfo, NET_KINDS, Reader, WireError, WireMessage, Writer,
    decode_body, encode_body, kind,
};

/// Default time a request may take, end to end.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Application error codes carried by [`RemoteError`].
pub mod code {
    /// The request decoded but makes no sense here (wrong stage, stale step...).
    pub const BAD_REQUEST: u16 = 1;
    /// This peer does not serve that kind of request.
    pub const UNSUPPORTED: u16 = 2;
    /// The peer failed while handling the request.
    pub const INTERNAL: u16 = 3;
    /// The peer is overloaded; retry elsewhere or later.
    pub const BUSY: u16 = 4;
    /// The caller is not allowed to make this request.
    pub const FORBIDDEN: u16 = 5;
    /// The pipeline message came without a valid receipt from its sender (not signed by it,
    /// or not committing to the frame it carries); the receiver reported the sender.
    pub const BAD_RECEIPT: u16 = 6;
}

/// A refusal sent back to the caller instead of a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteError {
    /// What kind of refusal (`code::*`).
    pub code: u16,
    /// Why, for people.
    pub message: String,
}

impl fmt::Display for RemoteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "code {}: {}", self.code, self.message)
    }
}

/// Longest refusal message carried.
const MAX_ERROR_MESSAGE: usize = 1024;

impl WireMessage for RemoteError {
    const INFO: &'static KindInfo = NET_KINDS.row(kind::ERROR);
    fn encode(&self, w: &mut Writer) {
        let mut msg = self.message.as_str();
        if msg.len() > MAX_ERROR_MESSAGE {
            let mut end = MAX_ERROR_MESSAGE;
            while !msg.is_char_boundary(end) {
                end -= 1;
            }
            msg = &msg[..end];
        }
        w.u16(self.code).str(msg);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(RemoteError {
            code: r.u16()?,
            message: r.str("error message", MAX_ERROR_MESSAGE)?.to_owned(),
        })
    }
}

/// Liveness and RTT probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ping {
    /// Echoed in the answer.
    pub nonce: u64,
}

impl WireMessage for Ping {
    const INFO: &'static KindInfo = NET_KINDS.row(kind::PING);
    fn encode(&self, w: &mut Writer) {
        w.u64(self.nonce);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(Ping { nonce: r.u64()? })
    }
}

/// Answer to [`Ping`], echoing its nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pong {
    /// The nonce of the ping answered.
    pub nonce: u64,
}

impl WireMessage for Pong {
    const INFO: &'static KindInfo = NET_KINDS.row(kind::PONG);
    fn encode(&self, w: &mut Writer) {
        w.u64(self.nonce);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(Pong { nonce: r.u64()? })
    }
}

/// Opaque bytes (benchmarks, tests): the whole body is the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bulk {
    /// The bytes.
    pub payload: Vec<u8>,
}

impl WireMessage for Bulk {
    const INFO: &'static KindInfo = NET_KINDS.row(kind::BULK);
    fn encode(&self, w: &mut Writer) {
        w.raw(&self.payload);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        // The envelope already capped the body at MAX_LEN.
        let n = r.remaining();
        Ok(Bulk {
            payload: r.take(n)?.to_vec(),
        })
    }
}

/// Acknowledges a [`Bulk`] with the number of bytes received and their BLAKE3 hash prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BulkAck {
    /// Bytes received.
    pub bytes: u64,
    /// The first 8 bytes of their BLAKE3 hash.
    pub hash: [u8; 8],
}

impl WireMessage for BulkAck {
    const INFO: &'static KindInfo = NET_KINDS.row(kind::BULK_ACK);
    fn encode(&self, w: &mut Writer) {
        w.u64(self.bytes).array(&self.hash);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(BulkAck {
            bytes: r.u64()?,
            hash: r.array()?,
        })
    }
}

/// Why a service did not produce a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RpcError {
    /// The request body is malformed: the connection is closed as a protocol violation.
    Malformed(WireError),
    /// The request is refused: the caller gets a [`RemoteError`], the connection stays up.
    Refused {
        /// What kind of refusal (`code::*`).
        code: u16,
        /// Why, for people.
        message: String,
    },
}

impl From<WireError> for RpcError {
    fn from(e: WireError) -> RpcError {
        RpcError::Malformed(e)
    }
}

impl RpcError {
    /// A refusal with `code` and a message.
    pub fn refused(code: u16, message: impl Into<String>) -> RpcError {
        RpcError::Refused {
            code,
            message: message.into(),
        }
    }
}

/// A reply: kind and encoded body.
pub type Reply = (u16, Vec<u8>);

/// Encodes `msg` as a reply.
pub fn reply<M: WireMessage>(msg: &M) -> Result<Reply, RpcError> {
    Ok((M::KIND, encode_body(msg)?))
}

/// Handles requests. `kind` is one the service accepts ([`Service::kind_info`]) and `body.len()`
/// is within its limit; decoding is the handler's (use [`decode_body`]; its errors convert into
/// [`RpcError::Malformed`]).
pub trait Service: Send + Sync + 'static {
    /// The row (name, size cap) of a request kind this service accepts; a kind without one closes
    /// the connection as a protocol violation before its body is read. Defaults to the network
    /// layer's kinds.
    fn kind_info(&self, kind: u16) -> Option<&'static KindInfo> {
        NET_KINDS.get(kind)
    }

    /// Answers one request; `Err` refuses it.
    fn handle(
        &self,
        from: PeerId,
        kind: u16,
        body: Vec<u8>,
    ) -> BoxFuture<'_, Result<Reply, RpcError>>;

    /// Whether a request of `kind` opens a long-lived stream (a relay tunnel) instead of getting
    /// one reply: its stream is then handed to [`Service::handle_stream`] after the request.
    fn is_stream_kind(&self, _kind: u16) -> bool {
        false
    }

    /// Serves a stream-opening request (see [`Service::is_stream_kind`]).
    fn handle_stream(
        &self,
        _from: PeerId,
        _kind: u16,
        _body: Vec<u8>,
        _send: SendStream,
        _recv: RecvStream,
    ) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// Answers the transport's own requests (ping, bulk) and refuses everything else. Services can
/// delegate to [`builtin`] for these kinds.
#[derive(Debug, Default, Clone, Copy)]
pub struct BasicService;

impl Service for BasicService {
    fn handle(
        &self,
        _from: PeerId,
        kind: u16,
        body: Vec<u8>,
    ) -> BoxFuture<'_, Result<Reply, RpcError>> {
        Box::pin(async move {
            builtin(kind, &body).unwrap_or_else(|| {
                Err(RpcError::refused(
                    code::UNSUPPORTED,
                    format!("kind {} not served", wire::kind_name(kind)),
                ))
            })
        })
    }
}

/// The reply to a transport-level request (`PING`, `BULK`), or `None` for other kinds.
pub fn builtin(kind: u16, body: &[u8]) -> Option<Result<Reply, RpcError>> {
    match kind {
        kind::PING => Some(
            decode_body::<Ping>(body)
                .map_err(RpcError::from)
                .and_then(|p| reply(&Pong { nonce: p.nonce })),
        ),
        kind::BULK => {
            let hash = blake3::hash(body);
            let mut prefix = [0u8; 8];
            prefix.copy_from_slice(&hash.as_bytes()[..8]);
            Some(reply(&BulkAck {
                bytes: body.len() as u64,
                hash: prefix,
            }))
        }
        _ => None,
    }
}

/// Server-side limits.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Time allowed to receive one request (header, body and end of stream): slow senders are cut
    /// off so they cannot pin buffers.
    pub read_timeout: Duration,
    /// Time allowed to write one reply.
    pub write_timeout: Duration,
}

impl Default for ServeConfig {
    fn default() -> ServeConfig {
        ServeConfig {
            read_timeout: Duration::from_secs(120),
            write_timeout: Duration::from_secs(120),
        }
    }
}

/// Accepts connections on `node` and serves their requests until the endpoint closes.
pub async fn serve(node: Node, service: Arc<dyn Service>) {
    serve_with(node, service, ServeConfig::default()).await
}

/// [`serve`] with explicit limits.
pub async fn serve_with(node: Node, service: Arc<dyn Service>, config: ServeConfig) {
    let config = Arc::new(config);
    while let Some(incoming) = node.accept().await {
        let service = service.clone();
        let config = config.clone();
        tokio::spawn(async move {
            let addr = incoming.remote_addr();
            match incoming.handshake().await {
                Ok(conn) => serve_connection_with(conn, service, config).await,
                Err(e) => tracing::info!(%addr, error = %e, "handshake refused"),
            }
        });
    }
}

/// Serves the requests of one established connection until it closes.
pub async fn serve_connection(conn: PeerConn, service: Arc<dyn Service>) {
    serve_connection_with(conn, service, Arc::new(ServeConfig::default())).await
}

async fn serve_connection_with(
    conn: PeerConn,
    service: Arc<dyn Service>,
    config: Arc<ServeConfig>,
) {
    loop {
        let (send, recv) = match conn.connection().accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(peer = %conn.remote_id().short(), reason = %e, "connection ended");
                return;
            }
        };
        let conn = conn.clone();
        let service = service.clone();
        let config = config.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_stream(&conn, service.as_ref(), &config, send, recv).await {
                match e {
                    StreamFailure::Protocol(e) => {
                        tracing::warn!(peer = %conn.remote_id().short(), error = %e, "malformed request; closing connection");
                        conn.close(CLOSE_PROTOCOL, e.to_string().as_bytes());
                    }
                    StreamFailure::Io(e) => {
                        tracing::debug!(peer = %conn.remote_id().short(), error = %e, "request stream failed");
                    }
                }
            }
        });
    }
}

enum StreamFailure {
    Protocol(WireError),
    Io(Error),
}

async fn serve_stream(
    conn: &PeerConn,
    service: &dyn Service,
    config: &ServeConfig,
    mut send: SendStream,
    mut recv: RecvStream,
) -> std::result::Result<(), StreamFailure> {
    let kinds = |k| service.kind_info(k);
    let read = async {
        let (header, body) = read_envelope(&mut recv, false, kinds).await?;
        if !service.is_stream_kind(header.kind) {
            expect_end_of(&mut recv).await?;
        }
        Ok::<_, Error>((header, body))
    };
    let request = tokio::time::timeout(config.read_timeout, read)
        .await
        .map_err(|_| {
            StreamFailure::Io(Error::Timeout {
                what: "reading a request",
                after: config.read_timeout,
            })
        })?;
    let (header, body) = match request {
        Ok(r) => r,
        Err(Error::Wire(e)) => return Err(StreamFailure::Protocol(e)),
        Err(e) => return Err(StreamFailure::Io(e)),
    };
    if service.is_stream_kind(header.kind) {
        service
            .handle_stream(conn.remote_id(), header.kind, body, send, recv)
            .await;
        return Ok(());
    }
    let (kind, body) = match service.handle(conn.remote_id(), header.kind, body).await {
        Ok(r) => r,
        Err(RpcError::Malformed(e)) => return Err(StreamFailure::Protocol(e)),
        Err(RpcError::Refused { code, message }) => {
            tracing::debug!(peer = %conn.remote_id().short(), code, %message, "request refused");
            let refusal = RemoteError { code, message };
            (
                kind::ERROR,
                encode_body(&refusal).map_err(StreamFailure::Protocol)?,
            )
        }
    };
    let write = async {
        write_envelope(&mut send, kind, &body).await?;
        send.finish().map_err(|e| Error::Stream(e.to_string()))
    };
    tokio::time::timeout(config.write_timeout, write)
        .await
        .map_err(|_| {
            StreamFailure::Io(Error::Timeout {
                what: "writing a reply",
                after: config.write_timeout,
            })
        })?
        .map_err(StreamFailure::Io)
}

/// Reads one envelope: the header is checked (against `kinds`, the rows of the kinds accepted here)
/// before the body is allocated. With `expect_end`, the stream must end right after the body.
pub async fn read_envelope(
    recv: &mut RecvStream,
    expect_end: bool,
    kinds: impl Fn(u16) -> Option<&'static KindInfo>,
) -> Result<(Header, Vec<u8>)> {
    let mut head = [0u8; HEADER_LEN];
    recv.read_exact(&mut head).await.map_err(read_error)?;
    let header = Header::parse(&head, kinds)?;
    // Safe: `Header::parse` checked `body_len` against the kind's limit.
    let mut body = vec![0u8; header.body_len as usize];
    recv.read_exact(&mut body).await.map_err(read_error)?;
    if expect_end {
        expect_end_of(recv).await?;
    }
    Ok((header, body))
}

/// Checks that the stream ends here (nothing after a request's envelope).
async fn expect_end_of(recv: &mut RecvStream) -> Result<()> {
    let mut extra = [0u8; 1];
    match recv.read(&mut extra).await {
        Ok(None) => Ok(()),
        Ok(Some(0)) => Ok(()),
        Ok(Some(_)) => Err(WireError::Trailing(1).into()),
        Err(e) => Err(Error::Stream(e.to_string())),
    }
}

fn read_error(e: quinn::ReadExactError) -> Error {
    match e {
        // The sender ended the stream mid-envelope: malformed, not a transport failure.
        quinn::ReadExactError::FinishedEarly(n) => Error::Wire(WireError::Truncated {
            need: n + 1,
            have: n,
        }),
        quinn::ReadExactError::ReadError(e) => Error::Stream(e.to_string()),
    }
}

/// Writes one envelope (header and body).
pub async fn write_envelope(send: &mut SendStream, kind: u16, body: &[u8]) -> Result<()> {
    let len = u32::try_from(body.len()).map_err(|_| WireError::TooLong {
        what: wire::kind_name(kind),
        len: body.len() as u64,
        max: u32::MAX as u64,
    })?;
    send.write_all(&Header::encode(kind, len))
        .await
        .map_err(|e| Error::Stream(e.to_string()))?;
    send.write_all(body)
        .await
        .map_err(|e| Error::Stream(e.to_string()))
}

/// Sends `req` and waits for the reply, within [`DEFAULT_TIMEOUT`].
pub async fn call<Req: WireMessage, Resp: WireMessage>(conn: &PeerConn, req: &Req) -> Result<Resp> {
    call_timeout(conn, req, DEFAULT_TIMEOUT).await
}

/// Sends `req` and waits for the reply, within `timeout`.
pub async fn call_timeout<Req: WireMessage, Resp: WireMessage>(
    conn: &PeerConn,
    req: &Req,
    timeout: Duration,
) -> Result<Resp> {
    let body = encode_body(req)?;
    let request = wire::envelope_raw(Req::KIND, &body);
    // The reply is the expected kind or a refusal; the reply's cap is the expected kind's.
    let kinds = |k| {
        if k == Resp::KIND {
            Some(Resp::INFO)
        } else {
            NET_KINDS.get(k)
        }
    };
    let (header, body) = exchange(conn, &request, timeout, kinds).await?;
    match header.kind {
        k if k == Resp::KIND => Ok(decode_body(&body)?),
        kind::ERROR => Err(Error::Remote(decode_body::<RemoteError>(&body)?)),
        other => Err(WireError::UnexpectedKind {
            expected: Resp::KIND,
            got: other,
        }
        .into()),
    }
}

/// Sends arbitrary bytes as a request (tests of malformed input) and reads one reply envelope of
/// a network-layer kind (e.g. a refusal).
pub async fn call_raw(
    conn: &PeerConn,
    request: &[u8],
    timeout: Duration,
) -> Result<(Header, Vec<u8>)> {
    exchange(conn, request, timeout, |k| NET_KINDS.get(k)).await
}

async fn exchange(
    conn: &PeerConn,
    request: &[u8],
    timeout: Duration,
    kinds: impl Fn(u16) -> Option<&'static KindInfo>,
) -> Result<(Header, Vec<u8>)> {
    let exchange = async {
        let (mut send, mut recv) = conn.connection().open_bi().await?;
        send.write_all(request)
            .await
            .map_err(|e| Error::Stream(e.to_string()))?;
        send.finish().map_err(|e| Error::Stream(e.to_string()))?;
        read_envelope(&mut recv, true, kinds).await
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| Error::Timeout {
            what: "request",
            after: timeout,
        })?
}
