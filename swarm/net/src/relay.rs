//! Relay fallback (issue #14): two peers that cannot reach each other (a symmetric NAT, UDP
//! filtered) talk through a third peer both are connected to, the trainer by default.
//!
//! Design (after libp2p circuit relay v2 and iroh's relay, which tunnel over a reliable stream
//! rather than datagrams):
//!
//! - The requester opens a stream on its connection to the relay (`RELAY_CONNECT {target}`); the
//!   relay checks its quotas ([`swarm_nat::RelayQuota`]), opens a stream on its connection to the
//!   target (`RELAY_INCOMING {from}`), and once the target accepts, both streams carry frames
//!   (`u16` length + one QUIC packet) which the relay copies across.
//! - Each endpoint's quinn socket is a [`RelaySocket`]: packets to a *virtual address* (one per
//!   tunnel, in a range that is never routed: 240.0.0.0/4, or fdff:7377:726d::/48 on a v6
//!   socket) go into the tunnel, frames from the tunnel come out of `poll_recv` as if from that
//!   address. A relayed connection is therefore an ordinary quinn connection: TLS runs end to end
//!   and the handshake proves the remote `PeerId`; the relay sees only ciphertext.
//! - Over budget, frames are dropped, never queued without bound: the inner QUIC connection sees
//!   loss and backs off. Streams (not QUIC datagrams) carry the frames because an inner Initial
//!   packet is 1,200 bytes and would not fit an outer datagram on a 1,280-byte path.
//!
//! Bytes are counted per peer at the relay (its quota) and per tunnel at each endpoint.

use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, RecvStream, SendStream, UdpPoller};
use swarm_nat::{Admit, PathKind, RelayConfig, RelayQuota, RelayUsage};
use tokio::sync::mpsc;

use crate::error::{Error, Result};
use crate::identity::PeerId;
use crate::peer::{PeerShared, RequestCtx};
use crate::rpc::{self, RemoteError, code};
use crate::transport::PeerConn;
use crate::wire::{
    self, KindInfo, NET_KINDS, Reader, WireError, WireMessage, Writer, encode_body, kind,
};

/// Largest packet a frame carries (quinn sends at most 1,452-byte UDP payloads by default).
pub const MAX_PACKET: usize = 2048;
/// Packets buffered per tunnel direction before new ones are dropped.
const QUEUE: usize = 256;
/// How long the relay waits for the target to take a tunnel.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a relayed handshake may take.
pub const RELAY_DIAL_TIMEOUT: Duration = Duration::from_secs(8);

/// Opens a tunnel (the stream then carries frames). Requester -> relay: `incoming` false, `peer`
/// the target. Relay -> target: `incoming` true, `peer` the requester.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayOpen {
    /// The other end of the tunnel.
    pub peer: PeerId,
    /// Relay -> target (true), or requester -> relay (false).
    pub incoming: bool,
}

/// The tunnel is open: frames follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayAccepted;

impl WireMessage for RelayOpen {
    const INFO: &'static KindInfo = NET_KINDS.row(kind::RELAY);
    fn encode(&self, w: &mut Writer) {
        w.array(&self.peer.0);
        w.bool(self.incoming);
    }
    fn decode(r: &mut Reader<'_>) -> std::result::Result<Self, WireError> {
        Ok(RelayOpen {
            peer: PeerId(r.array()?),
            incoming: r.bool()?,
        })
    }
}

impl WireMessage for RelayAccepted {
    const INFO: &'static KindInfo = NET_KINDS.row(kind::RELAY_ACCEPTED);
    fn encode(&self, _w: &mut Writer) {}
    fn decode(_r: &mut Reader<'_>) -> std::result::Result<Self, WireError> {
        Ok(RelayAccepted)
    }
}

/// The packet length a frame's 2-byte header announces, refused when empty or over
/// [`MAX_PACKET`] (the peer is untrusted: nothing is allocated before this check).
fn frame_len(header: [u8; 2]) -> std::result::Result<usize, WireError> {
    let n = u16::from_le_bytes(header) as usize;
    if n == 0 || n > MAX_PACKET {
        return Err(WireError::TooLong {
            what: "relay frame",
            len: n as u64,
            max: MAX_PACKET as u64,
        });
    }
    Ok(n)
}

/// Reads one frame into `buf` (cleared first). `Ok(false)` at a clean end of stream; a length
/// over [`MAX_PACKET`] is an error (no allocation from it).
pub async fn read_frame(recv: &mut RecvStream, buf: &mut Vec<u8>) -> Result<bool> {
    let mut len = [0u8; 2];
    match recv.read_exact(&mut len).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(false),
        Err(e) => return Err(Error::Stream(e.to_string())),
    }
    let n = frame_len(len)?;
    buf.clear();
    buf.resize(n, 0);
    recv.read_exact(buf)
        .await
        .map_err(|e| Error::Stream(e.to_string()))?;
    Ok(true)
}

async fn write_frame(send: &mut SendStream, packet: &[u8]) -> Result<()> {
    let mut head = [0u8; 2];
    head.copy_from_slice(&(packet.len() as u16).to_le_bytes());
    send.write_all(&head)
        .await
        .map_err(|e| Error::Stream(e.to_string()))?;
    send.write_all(packet)
        .await
        .map_err(|e| Error::Stream(e.to_string()))
}

/// One tunnel seen from an endpoint.
struct Route {
    peer: PeerId,
    tx: mpsc::Sender<Vec<u8>>,
    sent: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
}

/// The tunnels of one endpoint: virtual address -> tunnel, and the packets that came out of them.
pub struct RelayRoutes {
    routes: Mutex<HashMap<SocketAddr, Route>>,
    next: AtomicU32,
    v6: bool,
    in_tx: mpsc::Sender<(SocketAddr, Vec<u8>)>,
    in_rx: Mutex<mpsc::Receiver<(SocketAddr, Vec<u8>)>>,
}

impl std::fmt::Debug for RelayRoutes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RelayRoutes({})", self.lock().len())
    }
}

/// `a` with a v4-mapped v6 address written as v4 (quinn maps v4 destinations on v6 sockets).
fn canonical(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    }
}

impl RelayRoutes {
    fn new(v6: bool) -> RelayRoutes {
        let (in_tx, in_rx) = mpsc::channel(4 * QUEUE);
        RelayRoutes {
            routes: Mutex::new(HashMap::new()),
            next: AtomicU32::new(1),
            v6,
            in_tx,
            in_rx: Mutex::new(in_rx),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Route>> {
        self.routes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `addr` is one of our tunnels' virtual addresses.
    pub fn is_virtual(&self, addr: SocketAddr) -> bool {
        self.lock().contains_key(&canonical(addr))
    }

    /// (peer, bytes sent, bytes received) of every open tunnel.
    pub fn usage(&self) -> Vec<(PeerId, u64, u64)> {
        self.lock()
            .values()
            .map(|r| {
                (
                    r.peer,
                    r.sent.load(Ordering::Relaxed),
                    r.received.load(Ordering::Relaxed),
                )
            })
            .collect()
    }

    fn next_addr(&self) -> SocketAddr {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let [_, b, c, d] = n.to_be_bytes();
        if self.v6 {
            let ip = Ipv6Addr::new(
                0xfdff,
                0x7377,
                0x726d,
                0,
                0,
                0,
                u16::from(b),
                (u16::from(c) << 8) | u16::from(d),
            );
            SocketAddr::new(IpAddr::V6(ip), 1)
        } else {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::new(240, b, c, d)), 1)
        }
    }

    /// Makes the open tunnel (`send`, `recv`) to `peer` a route: returns the virtual address quinn
    /// reaches `peer` at. The route goes when the tunnel ends.
    pub fn attach(
        self: &Arc<Self>,
        peer: PeerId,
        mut send: SendStream,
        mut recv: RecvStream,
    ) -> SocketAddr {
        let addr = self.next_addr();
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(QUEUE);
        let sent = Arc::new(AtomicU64::new(0));
        let received = Arc::new(AtomicU64::new(0));
        self.lock().insert(
            addr,
            Route {
                peer,
                tx,
                sent: sent.clone(),
                received: received.clone(),
            },
        );
        tokio::spawn(async move {
            while let Some(p) = rx.recv().await {
                if write_frame(&mut send, &p).await.is_err() {
                    break;
                }
                sent.fetch_add(p.len() as u64, Ordering::Relaxed);
            }
            let _ = send.finish();
        });
        let routes = self.clone();
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(MAX_PACKET);
            loop {
                match read_frame(&mut recv, &mut buf).await {
                    Ok(true) => {
                        received.fetch_add(buf.len() as u64, Ordering::Relaxed);
                        // Full: dropped, as a congested link would.
                        let _ = routes.in_tx.try_send((addr, buf.clone()));
                    }
                    Ok(false) => break,
                    Err(e) => {
                        tracing::debug!(peer = %peer.short(), error = %e, "relay tunnel ended");
                        break;
                    }
                }
            }
            routes.lock().remove(&addr);
        });
        tracing::debug!(peer = %peer.short(), %addr, "relay tunnel attached");
        addr
    }

    /// Ends the tunnel at `addr` (its relayed connection closed): the stream is finished, so the
    /// relay closes the circuit and the other side drops its route.
    pub fn detach(&self, addr: SocketAddr) {
        self.lock().remove(&canonical(addr));
    }

    /// Ends the tunnel at `addr` when `conn` closes.
    pub fn detach_on_close(self: &Arc<Self>, addr: SocketAddr, conn: &PeerConn) {
        let routes = self.clone();
        let conn = conn.clone();
        tokio::spawn(async move {
            conn.closed().await;
            routes.detach(addr);
        });
    }

    /// Queues `packet` for the tunnel at `dest`; `false` if `dest` is no tunnel.
    fn send(&self, dest: SocketAddr, packet: &[u8]) -> bool {
        let routes = self.lock();
        let Some(r) = routes.get(&canonical(dest)) else {
            return false;
        };
        // Full: dropped (QUIC recovers), never blocking the endpoint.
        let _ = r.tx.try_send(packet.to_vec());
        true
    }
}

/// A quinn socket that sends to tunnels' virtual addresses through the tunnel and everything
/// else through the wrapped socket (plain or shaped).
pub struct RelaySocket {
    inner: Arc<dyn AsyncUdpSocket>,
    routes: Arc<RelayRoutes>,
    /// Tunnel packets were delivered by the last `poll_recv`: the socket goes first next time, so
    /// neither source starves the other.
    socket_first: AtomicBool,
}

impl std::fmt::Debug for RelaySocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RelaySocket({:?})", self.inner.local_addr().ok())
    }
}

impl RelaySocket {
    /// Wraps `inner`, with no relayed route yet.
    pub fn new(inner: Arc<dyn AsyncUdpSocket>) -> io::Result<RelaySocket> {
        let v6 = inner.local_addr()?.is_ipv6();
        Ok(RelaySocket {
            inner,
            routes: Arc::new(RelayRoutes::new(v6)),
            socket_first: AtomicBool::new(false),
        })
    }

    /// The routes that go through the relay.
    pub fn routes(&self) -> Arc<RelayRoutes> {
        self.routes.clone()
    }
}

impl AsyncUdpSocket for RelaySocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        if self.routes.is_virtual(transmit.destination) {
            match transmit.segment_size {
                Some(size) if size > 0 => {
                    for chunk in transmit.contents.chunks(size) {
                        self.routes.send(transmit.destination, chunk);
                    }
                }
                _ => {
                    self.routes.send(transmit.destination, transmit.contents);
                }
            }
            return Ok(());
        }
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        if self.socket_first.swap(false, Ordering::Relaxed)
            && let Poll::Ready(r) = self.inner.poll_recv(cx, bufs, meta)
        {
            return Poll::Ready(r);
        }
        {
            let mut rx = self.routes.in_rx.lock().unwrap_or_else(|e| e.into_inner());
            let mut n = 0;
            while n < bufs.len().min(meta.len()) {
                // `poll_recv` registers the waker when empty.
                let Poll::Ready(Some((addr, data))) = rx.poll_recv(cx) else {
                    break;
                };
                let len = data.len().min(bufs[n].len());
                bufs[n][..len].copy_from_slice(&data[..len]);
                let addr = if self.routes.v6 {
                    addr
                } else {
                    canonical(addr)
                };
                meta[n] = RecvMeta {
                    addr,
                    len,
                    stride: len,
                    ecn: None,
                    dst_ip: None,
                };
                n += 1;
            }
            if n > 0 {
                self.socket_first.store(true, Ordering::Relaxed);
                return Poll::Ready(Ok(n));
            }
        }
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// A relay's state: its quotas and per-peer counters (sans-IO, behind a mutex).
#[derive(Debug)]
pub struct Relay {
    quota: Mutex<RelayQuota<PeerId>>,
}

impl Relay {
    /// A relay within the quotas of `cfg`.
    pub fn new(cfg: RelayConfig) -> Relay {
        Relay {
            quota: Mutex::new(RelayQuota::new(cfg, Instant::now())),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut RelayQuota<PeerId>) -> T) -> T {
        f(&mut self.quota.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// What `peer` moved through this relay.
    pub fn usage(&self, peer: &PeerId) -> RelayUsage {
        self.with(|q| q.usage(peer))
    }

    /// Every peer's usage.
    pub fn usages(&self) -> Vec<(PeerId, RelayUsage)> {
        self.with(|q| q.usages().map(|(k, u)| (*k, u)).collect())
    }

    /// Bytes forwarded in all.
    pub fn forwarded(&self) -> u64 {
        self.with(|q| q.forwarded())
    }

    /// Its settings.
    pub fn config(&self) -> RelayConfig {
        self.with(|q| *q.config())
    }
}

/// Copies frames from `from`'s stream to `to`'s within the quotas, dropping what is over budget
/// or what the far side cannot take at once.
async fn pump(
    state: Arc<Relay>,
    from: PeerId,
    to: PeerId,
    mut recv: RecvStream,
    mut send: SendStream,
) {
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(QUEUE);
    let writer = tokio::spawn(async move {
        while let Some(p) = rx.recv().await {
            if write_frame(&mut send, &p).await.is_err() {
                break;
            }
        }
        let _ = send.finish();
    });
    let mut buf = Vec::with_capacity(MAX_PACKET);
    loop {
        match read_frame(&mut recv, &mut buf).await {
            Ok(true) => {
                let admit = state.with(|q| q.admit(&from, &to, buf.len() as u64, Instant::now()));
                match admit {
                    Admit::Forward => {
                        let _ = tx.try_send(buf.clone());
                    }
                    Admit::NoCircuit => break,
                    Admit::PeerCap | Admit::Budget => {}
                }
            }
            Ok(false) => break,
            Err(e) => {
                tracing::debug!(from = %from.short(), to = %to.short(), error = %e, "relay leg ended");
                break;
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}

async fn refuse(mut send: SendStream, code: u16, message: String) {
    tracing::info!(code, %message, "relay refused");
    let body = encode_body(&RemoteError { code, message }).unwrap_or_default();
    let _ = rpc::write_envelope(&mut send, kind::ERROR, &body).await;
    let _ = send.finish();
}

/// Reads the answer to a tunnel request: [`RelayAccepted`] or a refusal.
async fn read_accept(recv: &mut RecvStream) -> Result<()> {
    let kinds = |k| {
        if k == kind::RELAY_ACCEPTED {
            Some(RelayAccepted::INFO)
        } else {
            NET_KINDS.get(k)
        }
    };
    let (header, body) =
        tokio::time::timeout(ACCEPT_TIMEOUT, rpc::read_envelope(recv, false, kinds))
            .await
            .map_err(|_| Error::Timeout {
                what: "relay tunnel",
                after: ACCEPT_TIMEOUT,
            })??;
    match header.kind {
        kind::RELAY_ACCEPTED => Ok(()),
        kind::ERROR => Err(Error::Remote(wire::decode_body::<RemoteError>(&body)?)),
        other => Err(WireError::UnexpectedKind {
            expected: kind::RELAY_ACCEPTED,
            got: other,
        }
        .into()),
    }
}

/// Serves a tunnel request that arrived on a stream: on the relay (`incoming` false) checks the
/// quotas, asks the target and copies frames both ways until either side ends; on the target
/// (`incoming` true, from our coordinator only) attaches the tunnel to our socket.
pub async fn handle_stream(
    shared: Arc<PeerShared>,
    ctx: RequestCtx,
    body: Vec<u8>,
    mut send: SendStream,
    recv: RecvStream,
) {
    let Ok(req) = wire::decode_body::<RelayOpen>(&body) else {
        return refuse(send, code::BAD_REQUEST, "malformed relay request".into()).await;
    };
    if req.incoming {
        if Some(ctx.from) != shared.coordinator() {
            return refuse(
                send,
                code::FORBIDDEN,
                "tunnels come from our coordinator only".into(),
            )
            .await;
        }
        let accepted = encode_body(&RelayAccepted).unwrap_or_default();
        if rpc::write_envelope(&mut send, kind::RELAY_ACCEPTED, &accepted)
            .await
            .is_ok()
        {
            let addr = shared.node().relay_routes().attach(req.peer, send, recv);
            tracing::info!(peer = %req.peer.short(), %addr, "relay tunnel taken");
        }
        return;
    }
    let target = req.peer;
    let Some(state) = shared.relay() else {
        return refuse(
            send,
            code::UNSUPPORTED,
            "this peer is no relay (start it with --relay)".into(),
        )
        .await;
    };
    if let Err(e) = state.with(|q| q.open(&ctx.from, &target, Instant::now())) {
        return refuse(send, code::BUSY, e.to_string()).await;
    }
    let close = || state.with(|q| q.close(&ctx.from, &target));
    let Some(target_conn) = shared.live_conn(target).await else {
        close();
        return refuse(
            send,
            code::BAD_REQUEST,
            format!("the relay has no connection to {}", target.short()),
        )
        .await;
    };
    let legs = async {
        let (mut tsend, mut trecv) = target_conn.connection().open_bi().await?;
        let open = encode_body(&RelayOpen {
            peer: ctx.from,
            incoming: true,
        })?;
        rpc::write_envelope(&mut tsend, kind::RELAY, &open).await?;
        read_accept(&mut trecv).await?;
        Ok::<_, Error>((tsend, trecv))
    };
    let (tsend, trecv) = match legs.await {
        Ok(l) => l,
        Err(e) => {
            close();
            return refuse(
                send,
                code::BUSY,
                format!("target did not take the tunnel: {e}"),
            )
            .await;
        }
    };
    let accepted = encode_body(&RelayAccepted).unwrap_or_default();
    if rpc::write_envelope(&mut send, kind::RELAY_ACCEPTED, &accepted)
        .await
        .is_err()
    {
        close();
        return;
    }
    tracing::info!(from = %ctx.from.short(), to = %target.short(), "relay circuit open");
    let a = tokio::spawn(pump(state.clone(), ctx.from, target, recv, tsend));
    let b = tokio::spawn(pump(state.clone(), target, ctx.from, trecv, send));
    // The circuit lasts while both directions do: when one ends the other's writer is dropped.
    let _ = futures::future::select(a, b).await;
    close();
    tracing::info!(from = %ctx.from.short(), to = %target.short(), "relay circuit closed");
}

/// Reaches `target` through the relay `relay` (a peer we are connected to): opens a tunnel and a
/// QUIC connection through it. The connection is cached with path [`PathKind::Relayed`].
pub async fn dial(shared: &PeerShared, relay: PeerId, target: PeerId) -> Result<PeerConn> {
    let relay_conn = shared
        .live_conn(relay)
        .await
        .ok_or_else(|| Error::Stream(format!("no connection to the relay {}", relay.short())))?;
    let (mut send, mut recv) = relay_conn.connection().open_bi().await?;
    let req = encode_body(&RelayOpen {
        peer: target,
        incoming: false,
    })?;
    rpc::write_envelope(&mut send, kind::RELAY, &req).await?;
    read_accept(&mut recv).await?;
    let routes = shared.node().relay_routes();
    let addr = routes.attach(target, send, recv);
    let conn = tokio::time::timeout(
        RELAY_DIAL_TIMEOUT,
        shared.node().connect(addr, Some(target)),
    )
    .await
    .map_err(|_| Error::Timeout {
        what: "relayed handshake",
        after: RELAY_DIAL_TIMEOUT,
    })
    .and_then(|r| r);
    let conn = match conn {
        Ok(c) => c,
        Err(e) => {
            routes.detach(addr);
            return Err(e);
        }
    };
    tracing::info!(peer = %target.short(), relay = %relay.short(), "connected through the relay");
    Ok(shared.adopt(conn, PathKind::Relayed, true).await)
}

/// Whether requests of `kind` open a long-lived stream (a tunnel) rather than get one reply.
pub fn is_stream_kind(kind: u16) -> bool {
    kind == kind::RELAY
}

#[cfg(test)]
mod malformed {
    use super::*;

    #[test]
    fn frame_lengths_outside_one_to_max_packet_are_refused() {
        assert_eq!(frame_len(1u16.to_le_bytes()).unwrap(), 1);
        assert_eq!(
            frame_len((MAX_PACKET as u16).to_le_bytes()).unwrap(),
            MAX_PACKET
        );
        for bad in [0u16, MAX_PACKET as u16 + 1, u16::MAX] {
            assert!(
                matches!(frame_len(bad.to_le_bytes()), Err(WireError::TooLong { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn tunnel_requests_must_be_whole_and_canonical() {
        let open = RelayOpen {
            peer: PeerId([7; 32]),
            incoming: true,
        };
        let body = encode_body(&open).unwrap();
        assert_eq!(wire::decode_body::<RelayOpen>(&body).unwrap(), open);
        // Every truncation fails, and so does a trailing byte or a bool other than 0/1.
        for n in 0..body.len() {
            assert!(wire::decode_body::<RelayOpen>(&body[..n]).is_err(), "{n}");
        }
        let mut long = body.clone();
        long.push(0);
        assert!(wire::decode_body::<RelayOpen>(&long).is_err());
        let mut flag = body.clone();
        *flag.last_mut().unwrap() = 2;
        assert!(wire::decode_body::<RelayOpen>(&flag).is_err());
        assert!(wire::decode_body::<RelayAccepted>(&[0]).is_err());
        assert!(wire::decode_body::<RelayAccepted>(&[]).is_ok());
    }
}
