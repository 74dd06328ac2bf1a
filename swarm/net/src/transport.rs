//! QUIC transport: one quinn endpoint per peer, mutual TLS 1.3, settings for long fat links.
//!
//! A [`Node`] is both client and server on one UDP socket (optionally shaped, see
//! [`crate::shaping`]). Every connection, in either direction, is authenticated: the remote proved
//! the [`PeerId`] that [`PeerConn::remote_id`] reports.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use quinn::{Runtime, TokioRuntime, VarInt};

use crate::error::{Error, Result};
use crate::identity::{Identity, PeerId};
use crate::relay::{RelayRoutes, RelaySocket};
use crate::shaping::{LinkShape, ShapeCounters, ShapeStats, ShapedSocket};
use crate::tls::{self, AllowList};

/// Congestion controller of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Congestion {
    /// Loss-based (RFC 9438); quinn's default. Backs off hard under random loss.
    Cubic,
    /// Loss-based (RFC 9002).
    NewReno,
    /// Model-based (bandwidth and min RTT); holds its rate under random loss. quinn marks it
    /// experimental; it keeps about 2 x BDP in flight and so fills a home router's queue.
    Bbr,
    /// Ours ([`crate::congestion::lowdelay`]): bandwidth x (min RTT + a small queue target),
    /// holds its rate under random loss and keeps the bottleneck queue short. The default.
    LowDelay,
}

impl FromStr for Congestion {
    type Err = Error;
    fn from_str(s: &str) -> Result<Congestion> {
        match s.to_ascii_lowercase().as_str() {
            "cubic" => Ok(Congestion::Cubic),
            "newreno" | "new_reno" | "reno" => Ok(Congestion::NewReno),
            "bbr" => Ok(Congestion::Bbr),
            "lowdelay" | "low_delay" => Ok(Congestion::LowDelay),
            other => Err(Error::BadShape(format!(
                "congestion controller `{other}` (use lowdelay, cubic, newreno, bbr)"
            ))),
        }
    }
}

impl fmt::Display for Congestion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Congestion::Cubic => "cubic",
            Congestion::NewReno => "newreno",
            Congestion::Bbr => "bbr",
            Congestion::LowDelay => "lowdelay",
        })
    }
}

/// Transport settings of a node's connections.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TransportConfig {
    /// Bytes a peer may send on one stream before we read them: must be >= bandwidth x RTT or
    /// one stream cannot fill the link.
    pub stream_window: u64,
    /// Bytes a peer may send on all streams of a connection before we read them.
    pub conn_window: u64,
    /// Bytes we buffer unacknowledged for sending, per connection.
    pub send_window: u64,
    /// The congestion controller.
    pub congestion: Congestion,
    /// Keep-alive pings on idle connections, so NATs keep the mapping and the idle timer sees life.
    pub keep_alive: Duration,
    /// A connection silent for this long is dead (the smaller of both sides' values applies).
    pub idle_timeout: Duration,
    /// Concurrent bidirectional streams (requests) a peer may open to us.
    pub max_streams: u32,
    /// RTT assumed before the first measurement.
    pub initial_rtt: Duration,
}

impl Default for TransportConfig {
    /// Sized for home links up to 250 Mbit/s at 200 ms RTT, low-delay congestion control.
    fn default() -> TransportConfig {
        TransportConfig::for_link(250_000_000, Duration::from_millis(200))
    }
}

impl TransportConfig {
    /// Windows of twice the bandwidth-delay product (at least 2 MiB per stream), the low-delay
    /// controller, dead peers noticed within about 5 s.
    pub fn for_link(bandwidth_bps: u64, rtt: Duration) -> TransportConfig {
        let bdp = (bandwidth_bps as f64 / 8.0 * rtt.as_secs_f64()) as u64;
        let stream_window = (2 * bdp).max(2 << 20);
        TransportConfig {
            stream_window,
            conn_window: 2 * stream_window,
            send_window: 2 * stream_window,
            congestion: Congestion::LowDelay,
            keep_alive: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(5),
            max_streams: 256,
            initial_rtt: Duration::from_millis(100),
        }
    }

    /// quinn's stock settings (1.25 MB stream window, Cubic), for comparison in benchmarks;
    /// keep-alive and idle timeout stay ours so dead peers are still noticed.
    pub fn stock() -> TransportConfig {
        TransportConfig {
            stream_window: 1_250_000,
            conn_window: VarInt::MAX.into_inner(),
            send_window: 10_000_000,
            congestion: Congestion::Cubic,
            max_streams: 100,
            initial_rtt: Duration::from_millis(333),
            ..TransportConfig::for_link(0, Duration::ZERO)
        }
    }

    /// The same settings with another congestion controller.
    pub fn with_congestion(mut self, congestion: Congestion) -> TransportConfig {
        self.congestion = congestion;
        self
    }

    /// The quinn settings.
    pub fn to_quinn(&self) -> Result<quinn::TransportConfig> {
        let varint =
            |v: u64, what: &'static str| VarInt::from_u64(v).map_err(|_| Error::OutOfRange(what));
        let mut t = quinn::TransportConfig::default();
        t.stream_receive_window(varint(self.stream_window, "stream window")?)
            .receive_window(varint(self.conn_window, "connection window")?)
            .send_window(self.send_window)
            .max_concurrent_bidi_streams(self.max_streams.into())
            .max_concurrent_uni_streams(0u32.into())
            .keep_alive_interval(Some(self.keep_alive))
            .initial_rtt(self.initial_rtt)
            .max_idle_timeout(Some(
                self.idle_timeout
                    .try_into()
                    .map_err(|_| Error::OutOfRange("idle timeout"))?,
            ));
        match self.congestion {
            Congestion::Cubic => {
                t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()))
            }
            Congestion::NewReno => t.congestion_controller_factory(Arc::new(
                quinn::congestion::NewRenoConfig::default(),
            )),
            Congestion::Bbr => {
                t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()))
            }
            Congestion::LowDelay => t.congestion_controller_factory(Arc::new(
                crate::congestion::LowDelayFactory::default(),
            )),
        };
        Ok(t)
    }
}

/// Receive buffer asked of the kernel for a node's UDP socket (which carries all its
/// connections): a peer busy computing is not reading when a 374 KB activation frame arrives, and
/// at Linux's default of 208 KB (less than 100 full-size datagrams) the rest of the burst is
/// dropped. quic-go asks for 7 MB for the same reason. The kernel caps the request at
/// `net.core.rmem_max` (often 208 KB itself: then the congestion controller's loss cap does the
/// work).
const RECV_BUFFER: usize = 4 << 20;

/// Asks for [`RECV_BUFFER`]; a refusal only costs drops, so it is logged, not an error.
fn set_recv_buffer(socket: &std::net::UdpSocket) {
    let sock = socket2::SockRef::from(socket);
    if let Err(e) = sock.set_recv_buffer_size(RECV_BUFFER) {
        tracing::debug!(error = %e, "could not enlarge the UDP receive buffer");
    }
    tracing::debug!(
        asked = RECV_BUFFER,
        got = sock.recv_buffer_size().ok(),
        "UDP receive buffer"
    );
}

/// One peer's QUIC endpoint: listens, dials, and authenticates every connection.
#[derive(Clone)]
pub struct Node {
    endpoint: quinn::Endpoint,
    identity: Identity,
    cert: CertificateDer<'static>,
    key: Arc<PrivateKeyDer<'static>>,
    transport: Arc<quinn::TransportConfig>,
    allow: Option<Arc<AllowList>>,
    shape: Option<Arc<ShapeStats>>,
    /// Relay tunnels reachable through this node's socket (issue #14).
    relay: Arc<RelayRoutes>,
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Node({}", self.identity.peer_id().short())?;
        if let Ok(addr) = self.endpoint.local_addr() {
            write!(f, " @ {addr}")?;
        }
        f.write_str(")")
    }
}

impl Node {
    /// Binds a UDP socket at `listen` (port 0 picks one) and starts the endpoint. Must be called
    /// inside a tokio runtime. `shape` emulates this peer's link; `allow` admits only those ids,
    /// in both directions.
    pub fn bind(
        identity: Identity,
        listen: SocketAddr,
        config: TransportConfig,
        shape: Option<LinkShape>,
        allow: Option<AllowList>,
    ) -> Result<Node> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::Socket(std::io::Error::other(
                "Node::bind must be called inside a tokio runtime",
            )));
        }
        let allow = allow.map(Arc::new);
        let (cert, key) = tls::certificate(&identity)?;
        let transport = Arc::new(config.to_quinn()?);
        let server_tls = tls::server_config(&identity, allow.clone())?;
        let quic_server =
            QuicServerConfig::try_from(server_tls).map_err(|e| Error::Tls(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic_server));
        server.transport_config(transport.clone());

        let socket = match std::net::UdpSocket::bind(listen) {
            Ok(s) => s,
            // `[::]` (dual-stack, the default) on a host without IPv6: IPv4 alone.
            Err(e) if listen.ip() == std::net::Ipv6Addr::UNSPECIFIED => {
                let v4 = SocketAddr::from(([0, 0, 0, 0], listen.port()));
                tracing::info!(error = %e, %v4, "no IPv6 here: listening on IPv4 only");
                std::net::UdpSocket::bind(v4).map_err(Error::Socket)?
            }
            Err(e) => return Err(Error::Socket(e)),
        };
        set_recv_buffer(&socket);
        let runtime: Arc<dyn Runtime> = Arc::new(TokioRuntime);
        let (socket, stats): (Arc<dyn quinn::AsyncUdpSocket>, _) = match shape {
            Some(shape) => {
                let shaped = ShapedSocket::new(socket, shape)?;
                let stats = shaped.stats();
                (Arc::new(shaped), Some(stats))
            }
            None => (
                runtime.wrap_udp_socket(socket).map_err(Error::Socket)?,
                None,
            ),
        };
        // Every socket can carry relay tunnels: packets to a tunnel's virtual address go through it.
        let socket = RelaySocket::new(socket).map_err(Error::Socket)?;
        let relay = socket.routes();
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            quinn::EndpointConfig::default(),
            Some(server),
            Arc::new(socket),
            runtime,
        )
        .map_err(Error::Socket)?;
        tracing::debug!(peer = %identity.peer_id().short(), addr = ?endpoint.local_addr().ok(), "node bound");
        Ok(Node {
            endpoint,
            identity,
            cert,
            key: Arc::new(key),
            transport,
            allow,
            shape: stats,
            relay,
        })
    }

    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.identity.peer_id()
    }

    /// This node's identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The socket's local address.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.endpoint.local_addr().map_err(Error::Socket)
    }

    /// Counters of the link shaper, if this node is shaped.
    pub fn shape_counters(&self) -> Option<ShapeCounters> {
        self.shape.as_ref().map(|s| s.snapshot())
    }

    /// The relay tunnels of this node's socket.
    pub fn relay_routes(&self) -> &Arc<RelayRoutes> {
        &self.relay
    }

    /// The underlying quinn endpoint (for stats and advanced use).
    pub fn endpoint(&self) -> &quinn::Endpoint {
        &self.endpoint
    }

    /// Dials `addr`. With `expected`, the handshake fails unless the server proves that id.
    ///
    /// If the *server* refuses us (allow-list), QUIC may still complete on our side: the refusal
    /// then shows as a connection error on first use of the returned connection.
    pub async fn connect(&self, addr: SocketAddr, expected: Option<PeerId>) -> Result<PeerConn> {
        let tls = tls::client_config_with(
            self.cert.clone(),
            self.key.clone_key(),
            expected,
            self.allow.clone(),
        )?;
        let quic = QuicClientConfig::try_from(tls).map_err(|e| Error::Tls(e.to_string()))?;
        let mut client = quinn::ClientConfig::new(Arc::new(quic));
        client.transport_config(self.transport.clone());
        let connecting = self
            .endpoint
            .connect_with(client, addr, tls::SERVER_NAME)
            .map_err(|e| Error::Connect {
                addr,
                reason: e.to_string(),
            })?;
        let conn = connecting.await?;
        let remote = remote_peer_id(&conn)?;
        if let Some(expected) = expected
            && expected != remote
        {
            // The verifier already refuses this; kept as a second line of defence.
            conn.close(CLOSE_WRONG_PEER, b"wrong peer id");
            return Err(Error::WrongPeer {
                addr,
                expected,
                got: remote,
            });
        }
        tracing::debug!(peer = %remote.short(), %addr, "connected");
        Ok(PeerConn { conn, remote })
    }

    /// The next incoming connection attempt, or `None` once the endpoint is closed. Finish the
    /// handshake with [`Incoming::handshake`] (in its own task, so one slow peer does not stall
    /// the others).
    pub async fn accept(&self) -> Option<Incoming> {
        self.endpoint.accept().await.map(Incoming)
    }

    /// Closes every connection and stops accepting.
    pub fn close(&self) {
        self.endpoint.close(CLOSE_SHUTDOWN, b"shutdown");
    }

    /// Waits until every connection's close has been sent (or timed out).
    pub async fn wait_idle(&self) {
        self.endpoint.wait_idle().await
    }
}

/// QUIC application close codes.
pub const CLOSE_SHUTDOWN: VarInt = VarInt::from_u32(0);
/// The peer sent bytes our wire protocol refuses.
pub const CLOSE_PROTOCOL: VarInt = VarInt::from_u32(1);
/// The peer is not who we dialled.
pub const CLOSE_WRONG_PEER: VarInt = VarInt::from_u32(2);

/// An incoming connection whose handshake has not finished.
pub struct Incoming(quinn::Incoming);

impl Incoming {
    /// The peer's address (an IPv4 peer of a dual-stack socket as plain IPv4).
    pub fn remote_addr(&self) -> SocketAddr {
        canonical(self.0.remote_address())
    }

    /// Completes the handshake; the remote's certificate was checked by our verifier.
    pub async fn handshake(self) -> Result<PeerConn> {
        let conn = self.0.await?;
        let remote = remote_peer_id(&conn)?;
        tracing::debug!(peer = %remote.short(), addr = %conn.remote_address(), "accepted");
        Ok(PeerConn { conn, remote })
    }
}

fn remote_peer_id(conn: &quinn::Connection) -> Result<PeerId> {
    let certs = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or_else(|| Error::Tls("peer presented no certificate".into()))?;
    let cert = certs
        .first()
        .ok_or_else(|| Error::Tls("peer presented no certificate".into()))?;
    tls::peer_id_of(cert).map_err(|e| Error::Tls(e.to_string()))
}

/// An authenticated connection to a peer.
#[derive(Clone)]
pub struct PeerConn {
    conn: quinn::Connection,
    remote: PeerId,
}

impl fmt::Debug for PeerConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PeerConn({} @ {})",
            self.remote.short(),
            self.conn.remote_address()
        )
    }
}

impl PeerConn {
    /// The id the remote proved in the handshake.
    pub fn remote_id(&self) -> PeerId {
        self.remote
    }

    /// The peer's address (an IPv4 peer of a dual-stack socket as plain IPv4).
    pub fn remote_addr(&self) -> SocketAddr {
        canonical(self.conn.remote_address())
    }

    /// The current smoothed RTT estimate.
    pub fn rtt(&self) -> Duration {
        self.conn.rtt()
    }

    /// Why the connection closed, if it has.
    pub fn close_reason(&self) -> Option<quinn::ConnectionError> {
        self.conn.close_reason()
    }

    /// Closes the connection with `code` and `reason`.
    pub fn close(&self, code: VarInt, reason: &[u8]) {
        self.conn.close(code, reason)
    }

    /// Resolves when the connection closes, with the reason.
    pub async fn closed(&self) -> quinn::ConnectionError {
        self.conn.closed().await
    }

    /// The underlying quinn connection (streams, stats).
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }
}

/// `addr` with an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, how a dual-stack socket sees an
/// IPv4 peer) written as the IPv4 address: the form records, observations and comparisons use,
/// and one an IPv4-only peer can dial. quinn maps it back when a dual-stack socket sends.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_receive_buffer_is_enlarged_as_far_as_the_kernel_allows() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        set_recv_buffer(&socket);
        let got = socket2::SockRef::from(&socket).recv_buffer_size().unwrap();
        // Linux caps the request at rmem_max and reports twice what it grants (bookkeeping).
        if let Ok(max) = std::fs::read_to_string("/proc/sys/net/core/rmem_max") {
            let max: usize = max.trim().parse().unwrap();
            assert!(got >= RECV_BUFFER.min(max), "got {got}, rmem_max {max}");
        }
    }
}
