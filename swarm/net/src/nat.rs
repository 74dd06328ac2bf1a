//! NAT traversal on the wire (issue #14): the reachability check a joiner runs against its
//! bootstrap, coordinated hole punching through a peer both sides are connected to, and the path
//! kind of every connection. The decisions are `swarm_nat`'s sans-IO functions; this module moves
//! the bytes and keeps the time.
//!
//! - **Check.** The bootstrap runs a second endpoint, the *checker*, with the same identity on
//!   another port (or address). The joiner asks the bootstrap to dial it back from the checker
//!   (a source it never sent to), then asks the checker what address it sees: two observations
//!   plus the dial-back give the [`Verdict`].
//! - **Punch.** A peer that cannot dial another asks the coordinator (its bootstrap, the trainer
//!   by default), which tells both sides to dial each other at the same moment
//!   ([`swarm_nat::punch::start_delays`]); each side's first packet opens its own NAT for the
//!   other's. Every connection is served in both directions, so whichever handshake completes
//!   first carries the traffic.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use swarm_nat::punch::start_delays;
use swarm_nat::{
    Observations, PathKind, Plan, Punch, PunchAction, PunchOutcome, PunchRole, Reachability,
    Verdict, classify, plan,
};

use crate::error::{Error, Result};
use crate::identity::{Identity, PeerId};
use crate::peer::{HandlerResult, PeerShared, RequestCtx, register};
use crate::rpc::{self, RpcError, Service, code};
use crate::transport::{Node, PeerConn, TransportConfig};
use crate::wire::{self, KindInfo, NET_KINDS, Reader, WireError, WireMessage, Writer, kind};

/// Candidate addresses carried per peer.
pub const MAX_CANDIDATES: usize = 8;
/// How long the checker tries to reach a joiner.
pub const DIAL_BACK_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a joiner waits for the checker's observation.
pub const OBSERVE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a first direct dial may take before a punch is tried (when a coordinator exists).
pub const DIRECT_TIMEOUT: Duration = Duration::from_millis(1500);
/// The same when both sides are behind NATs: a direct dial then only works between peers on one
/// LAN, which answer in a round trip of their LAN, so the punch starts sooner.
pub const LAN_DIAL_TIMEOUT: Duration = Duration::from_millis(300);
/// Upper bound of what a punch adds to a dial: the request, the start delay, the attempts
/// (default `PunchConfig`: 3 x 3 s).
pub const PUNCH_BUDGET: Duration = Duration::from_secs(20);
/// Slack the coordinator adds so both sides start after both heard.
const PUNCH_MARGIN: Duration = Duration::from_millis(30);

fn encode_addrs(w: &mut Writer, addrs: &[SocketAddr]) {
    w.len_prefix(addrs.len().min(MAX_CANDIDATES));
    for a in addrs.iter().take(MAX_CANDIDATES) {
        w.socket_addr(a);
    }
}

fn decode_addrs(r: &mut Reader<'_>) -> std::result::Result<Vec<SocketAddr>, WireError> {
    let n = r.len("addresses", MAX_CANDIDATES, 7)?;
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(r.socket_addr()?);
    }
    Ok(v)
}

/// Joiner -> bootstrap: dial me back at these addresses from your checker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DialBackRequest {
    /// Where the checker should dial the joiner.
    pub addrs: Vec<SocketAddr>,
}

/// Whether the checker reached the joiner, and where the checker listens (an unspecified IP
/// means the address the joiner reached the bootstrap at).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DialBackReply {
    /// The checker reached the joiner.
    pub reached: bool,
    /// Where the checker listens.
    pub observer: SocketAddr,
}

/// Joiner -> checker: what source address do you see?
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObserveRequest;

/// Checker -> joiner: the source address the checker saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObserveReply {
    /// The joiner's address as the checker sees it.
    pub observed: SocketAddr,
}

/// Peer -> coordinator: I cannot dial `target`; start a punch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PunchRequest {
    /// The peer it cannot dial.
    pub target: PeerId,
}

/// Coordinator -> requester: dial these after `delay_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PunchPlan {
    /// The target's addresses.
    pub addrs: Vec<SocketAddr>,
    /// Wait this long before dialling, so both sides dial at once.
    pub delay_ms: u32,
}

/// Coordinator -> target: `peer` wants you; dial it at `addrs` after `delay_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PunchStart {
    /// The requester.
    pub peer: PeerId,
    /// The requester's addresses.
    pub addrs: Vec<SocketAddr>,
    /// Wait this long before dialling, so both sides dial at once.
    pub delay_ms: u32,
}

/// The target took the punch start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PunchStarted;

impl WireMessage for DialBackRequest {
    const INFO: &'static KindInfo = NET_KINDS.row(kind::DIAL_BACK);
    fn encode(&self, w: &mut Writer) {
        encode_addrs(w, &self.addrs);
    }
    fn decode(r: &mut Reader<'_>) -> std::result::Result<Self, WireError> {
        Ok(DialBackRequest {
            addrs: decode_addrs(r)?,
        })
    }
}

impl WireMessage for DialBackReply {
    const INFO: &'static KindInfo = NET_KINDS.row(kind::DIAL_BACK_REPLY);
    fn encode(&self, w: &mut Writer) {
        w.bool(self.reached);
        w.socket_addr(&self.observer);
    }
    fn decode(r: &mut Reader<'_>) -> std::result::Result<Self, WireError> {
        Ok(DialBackReply {
            reached: r.bool()?,
            observer: r.socket_addr()?,
        })
    }
}

impl WireMessage for ObserveRequest {
    const INFO: &'static KindInfo = NET_KINDS.row(kind::OBSERVE);
    fn encode(&self, _w: &mut Writer) {}
    fn decode(_r: &mut Reader<'_>) -> std::result::Result<Self, WireError> {
        Ok(ObserveRequest)
    }
}

impl WireMessage for ObserveReply {
    const INFO: &'static KindInfo = NET_KINDS.row(kind::OBSERVE_REPLY);
    fn encode(&self, w: &mut Writer) {
        w.socket_addr(&self.observed);
    }
    fn decode(r: &mut Reader<'_>) -> std::result::Result<Self, WireError> {
        Ok(ObserveReply {
            observed: r.socket_addr()?,
        })
    }
}

impl WireMessage for PunchRequest {
    const INFO: &'static KindInfo = NET_KINDS.row(kind::PUNCH_REQUEST);
    fn encode(&self, w: &mut Writer) {
        w.array(&self.target.0);
    }
    fn decode(r: &mut Reader<'_>) -> std::result::Result<Self, WireError> {
        Ok(PunchRequest {
            target: PeerId(r.array()?),
        })
    }
}

impl WireMessage for PunchPlan {
    const INFO: &'static KindInfo = NET_KINDS.row(kind::PUNCH_PLAN);
    fn encode(&self, w: &mut Writer) {
        encode_addrs(w, &self.addrs);
        w.u32(self.delay_ms);
    }
    fn decode(r: &mut Reader<'_>) -> std::result::Result<Self, WireError> {
        Ok(PunchPlan {
            addrs: decode_addrs(r)?,
            delay_ms: r.u32()?,
        })
    }
}

impl WireMessage for PunchStart {
    const INFO: &'static KindInfo = NET_KINDS.row(kind::PUNCH_START);
    fn encode(&self, w: &mut Writer) {
        w.array(&self.peer.0);
        encode_addrs(w, &self.addrs);
        w.u32(self.delay_ms);
    }
    fn decode(r: &mut Reader<'_>) -> std::result::Result<Self, WireError> {
        Ok(PunchStart {
            peer: PeerId(r.array()?),
            addrs: decode_addrs(r)?,
            delay_ms: r.u32()?,
        })
    }
}

impl WireMessage for PunchStarted {
    const INFO: &'static KindInfo = NET_KINDS.row(kind::PUNCH_STARTED);
    fn encode(&self, _w: &mut Writer) {}
    fn decode(_r: &mut Reader<'_>) -> std::result::Result<Self, WireError> {
        Ok(PunchStarted)
    }
}

/// The bootstrap's second endpoint: same identity, another source address. It answers
/// [`ObserveRequest`]s with the address it sees. The dial-backs leave from a third endpoint
/// that never receives anything: a peer that observed through the second one (at join, or at a
/// re-check) has opened its NAT to it, so a dial-back from there would pass a filtering NAT and
/// make the peer look public.
#[derive(Clone, Debug)]
pub struct Checker {
    node: Node,
    dialer: Node,
}

struct ObserveService {
    remote: SocketAddr,
}

impl Service for ObserveService {
    fn handle(
        &self,
        _from: PeerId,
        kind: u16,
        body: Vec<u8>,
    ) -> BoxFuture<'_, std::result::Result<rpc::Reply, RpcError>> {
        let remote = self.remote;
        Box::pin(async move {
            if kind == kind::OBSERVE {
                wire::decode_body::<ObserveRequest>(&body).map_err(RpcError::from)?;
                return rpc::reply(&ObserveReply { observed: remote });
            }
            rpc::builtin(kind, &body).unwrap_or_else(|| {
                Err(RpcError::refused(
                    code::UNSUPPORTED,
                    "the checker only observes",
                ))
            })
        })
    }
}

impl Checker {
    /// Binds the checker at `listen` (port 0 picks one) and serves observations until the node
    /// closes. Must run inside a tokio runtime.
    pub fn start(
        identity: Identity,
        listen: SocketAddr,
        transport: TransportConfig,
    ) -> Result<Checker> {
        let node = Node::bind(identity.clone(), listen, transport.clone(), None, None)?;
        // Bound now, on the same IP: sockets made later could land elsewhere (another network
        // namespace, when the peer was started inside one).
        let dialer = Node::bind(
            identity,
            SocketAddr::new(node.local_addr()?.ip(), 0),
            transport,
            None,
            None,
        )?;
        let accept = node.clone();
        tokio::spawn(async move {
            while let Some(incoming) = accept.accept().await {
                tokio::spawn(async move {
                    if let Ok(conn) = incoming.handshake().await {
                        let service = Arc::new(ObserveService {
                            remote: conn.remote_addr(),
                        });
                        rpc::serve_connection(conn, service).await;
                    }
                });
            }
        });
        Ok(Checker { node, dialer })
    }

    /// The checker's local address.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.node.local_addr()
    }

    /// Dials `peer` at each of `addrs` (bounded by [`DIAL_BACK_TIMEOUT`]) from the dial-back
    /// endpoint; true if any handshake completed. The connections are closed at once.
    pub async fn dial_back(&self, peer: PeerId, addrs: &[SocketAddr]) -> bool {
        let tries = addrs.iter().take(MAX_CANDIDATES).map(|&a| {
            let node = self.dialer.clone();
            async move {
                match tokio::time::timeout(DIAL_BACK_TIMEOUT, node.connect(a, Some(peer))).await {
                    Ok(Ok(c)) => {
                        c.close(0u32.into(), b"dial-back done");
                        true
                    }
                    _ => false,
                }
            }
        });
        futures::future::join_all(tries)
            .await
            .into_iter()
            .any(|ok| ok)
    }

    /// Stops the checker's endpoint.
    pub fn close(&self) {
        self.node.close();
        self.dialer.close();
    }
}

/// Serves DIAL_BACK on a peer with a checker.
pub async fn handle_dial_back(
    peer: Arc<PeerShared>,
    ctx: RequestCtx,
    body: Vec<u8>,
) -> HandlerResult {
    let req: DialBackRequest = wire::decode_body(&body).map_err(RpcError::from)?;
    let Some(checker) = peer.checker() else {
        return Err(RpcError::refused(
            code::UNSUPPORTED,
            "this peer runs no reachability checker",
        ));
    };
    // Only the caller's own addresses: never a tool to make us dial third parties.
    let addrs: Vec<SocketAddr> = req
        .addrs
        .into_iter()
        .filter(|a| a.ip() == ctx.remote_addr.ip())
        .collect();
    let reached = checker.dial_back(ctx.from, &addrs).await;
    let observer = checker
        .local_addr()
        .map_err(|e| RpcError::refused(code::INTERNAL, e.to_string()))?;
    tracing::info!(peer = %ctx.from.short(), reached, "reachability dial-back");
    rpc::reply(&DialBackReply { reached, observer })
}

/// Runs the reachability check of a peer that joined through `boot` (which saw it at
/// `observed`). Bounded: about [`DIAL_BACK_TIMEOUT`] + [`OBSERVE_TIMEOUT`] plus two round trips.
///
/// `serving`: the peer's server already accepts connections (a re-check during the run), so a
/// dial-back that reaches us is completed by it; at join nothing serves yet and this check
/// completes what arrives itself.
pub async fn check(node: &Node, boot: &PeerConn, observed: SocketAddr, serving: bool) -> Verdict {
    let local = node.local_addr().ok();
    let mut obs = Observations {
        local: local.into_iter().collect(),
        mapped: vec![(boot.remote_addr(), observed)],
        unanswered: Vec::new(),
        dial_back: None,
    };
    let req = DialBackRequest {
        addrs: vec![observed],
    };
    let timeout = DIAL_BACK_TIMEOUT + Duration::from_secs(2);
    // The peer's server is not running yet: complete (then drop) whatever arrives meanwhile, so
    // a dial-back that reaches us finishes its handshake.
    let acceptor = node.clone();
    let accepting = (!serving).then(|| {
        tokio::spawn(async move {
            while let Some(incoming) = acceptor.accept().await {
                tokio::spawn(async move {
                    if let Ok(c) = incoming.handshake().await {
                        c.close(0u32.into(), b"dial-back seen");
                    }
                });
            }
        })
    });
    let reply = rpc::call_timeout::<_, DialBackReply>(boot, &req, timeout).await;
    if let Some(a) = accepting {
        a.abort();
    }
    let reply = match reply {
        Ok(r) => r,
        Err(e) => {
            tracing::info!(error = %e, "no reachability checker at the bootstrap");
            return classify(&obs);
        }
    };
    obs.dial_back = Some(reply.reached);
    let mut observer = reply.observer;
    if observer.ip().is_unspecified() {
        observer.set_ip(boot.remote_addr().ip());
    }
    let second = async {
        let conn = node.connect(observer, Some(boot.remote_id())).await?;
        let r = rpc::call::<_, ObserveReply>(&conn, &ObserveRequest).await;
        conn.close(0u32.into(), b"observed");
        r
    };
    match tokio::time::timeout(OBSERVE_TIMEOUT, second).await {
        Ok(Ok(r)) => obs.mapped.push((observer, r.observed)),
        Ok(Err(e)) => {
            tracing::info!(%observer, error = %e, "checker did not answer");
            obs.unanswered.push(observer);
        }
        Err(_) => obs.unanswered.push(observer),
    }
    classify(&obs)
}

/// Serves PUNCH_REQUEST on the coordinator: tells the target to dial the requester and the
/// requester when and where to dial the target.
pub async fn handle_punch_request(
    peer: Arc<PeerShared>,
    ctx: RequestCtx,
    body: Vec<u8>,
) -> HandlerResult {
    let req: PunchRequest = wire::decode_body(&body).map_err(RpcError::from)?;
    let (Some(target), Some(requester)) = (
        peer.live_conn(req.target).await,
        peer.live_conn(ctx.from).await,
    ) else {
        return Err(RpcError::refused(
            code::BAD_REQUEST,
            "the coordinator has no connection to both peers",
        ));
    };
    let target_addrs = peer.candidates(req.target, target.remote_addr());
    let requester_addrs = peer.candidates(ctx.from, ctx.remote_addr);
    let (d_req, d_target) = start_delays(requester.rtt(), target.rtt(), PUNCH_MARGIN);
    let start = PunchStart {
        peer: ctx.from,
        addrs: requester_addrs,
        delay_ms: d_target.as_millis() as u32,
    };
    rpc::call_timeout::<_, PunchStarted>(&target, &start, Duration::from_secs(5))
        .await
        .map_err(|e| RpcError::refused(code::BUSY, format!("target unreachable: {e}")))?;
    tracing::info!(from = %ctx.from.short(), to = %req.target.short(), "punch coordinated");
    rpc::reply(&PunchPlan {
        addrs: target_addrs,
        delay_ms: d_req.as_millis() as u32,
    })
}

/// Serves PUNCH_START on the target: dials the requester in the background.
pub async fn handle_punch_start(
    peer: Arc<PeerShared>,
    ctx: RequestCtx,
    body: Vec<u8>,
) -> HandlerResult {
    let start: PunchStart = wire::decode_body(&body).map_err(RpcError::from)?;
    if Some(ctx.from) != peer.coordinator() {
        return Err(RpcError::refused(
            code::FORBIDDEN,
            "punch starts come from the coordinator only",
        ));
    }
    let shared = peer.clone();
    shared.set_punching(start.peer, true);
    tokio::spawn(async move {
        let delay = Duration::from_millis(start.delay_ms.min(5_000) as u64);
        let outcome = punch(&shared, start.peer, start.addrs, delay).await;
        shared.set_punching(start.peer, false);
        tracing::info!(peer = %start.peer.short(), ?outcome, "punch (target side)");
    });
    rpc::reply(&PunchStarted)
}

/// One side of a punch toward `peer` at `addrs`, starting after `delay`: dials per the
/// [`Punch`] machine and also takes a connection the other side opens to us. Returns the outcome;
/// a connection found is cached with path [`PathKind::Punched`].
pub async fn punch(
    shared: &PeerShared,
    peer: PeerId,
    addrs: Vec<SocketAddr>,
    delay: Duration,
) -> PunchOutcome {
    let cfg = shared.punch_config();
    let t0 = Instant::now();
    let mut machine = Punch::new(PunchRole::Dialer, cfg, addrs, t0 + delay);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(SocketAddr, Option<PeerConn>)>(32);
    for _ in 0..10_000 {
        let now = Instant::now();
        while let Some(action) = machine.poll(now) {
            if let PunchAction::Dial(addr) = action {
                let node = shared.node().clone();
                let tx = tx.clone();
                let timeout = cfg.attempt_timeout;
                tokio::spawn(async move {
                    let r = tokio::time::timeout(timeout, node.connect(addr, Some(peer))).await;
                    let _ = tx.send((addr, r.ok().and_then(|r| r.ok()))).await;
                });
            }
        }
        if let Some(o) = machine.outcome() {
            return o;
        }
        // The other side's dial may have arrived first. A relayed connection does not end a
        // punch: the punch is what replaces it.
        if let Some(c) = shared.live_conn(peer).await
            && !shared.node().relay_routes().is_virtual(c.remote_addr())
        {
            shared.set_path(peer, PathKind::Punched, c.remote_addr());
            machine.handle_connected(c.remote_addr(), Instant::now());
            continue;
        }
        let wake = machine
            .poll_timeout()
            .unwrap_or(now)
            .min(now + Duration::from_millis(50));
        tokio::select! {
            got = rx.recv() => match got {
                Some((addr, Some(conn))) => {
                    shared.adopt(conn.clone(), PathKind::Punched, true).await;
                    machine.handle_connected(addr, Instant::now());
                }
                Some((addr, None)) => machine.handle_dial_failed(addr, Instant::now()),
                None => {}
            },
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
    }
    PunchOutcome::Failed { attempts: 0 }
}

/// Dials `peer`: every candidate address at once; when none answers within [`DIRECT_TIMEOUT`]
/// and a coordinator exists, a coordinated punch; when that cannot work or fails, the
/// coordinator's relay. Bounded by the caller's timeout.
pub async fn dial(shared: &PeerShared, addr: SocketAddr, peer: PeerId) -> Result<PeerConn> {
    match direct_path(shared, addr, peer).await {
        Ok(c) => Ok(c),
        Err(NoDirect { err, relay: None }) => Err(err),
        Err(NoDirect {
            relay: Some((coord, why)),
            ..
        }) => relay_fallback(shared, coord, peer, addr, &why).await,
    }
}

/// Tries once to replace the relayed connection to `peer` with a direct or punched one (see
/// [`swarm_nat::upgrade`]). True when the cache now holds a connection that is not relayed.
pub async fn upgrade(shared: &PeerShared, peer: PeerId) -> bool {
    let Some(addr) = shared.with_membership(|m| {
        m.get(&peer)
            .and_then(|e| e.record.info.addrs.first().copied())
    }) else {
        return false;
    };
    let limit = shared.rpc_timeout() + PUNCH_BUDGET;
    match tokio::time::timeout(limit, direct_path(shared, addr, peer)).await {
        Ok(Ok(c)) => !shared.node().relay_routes().is_virtual(c.remote_addr()),
        Ok(Err(NoDirect { err, .. })) => {
            tracing::debug!(peer = %peer.short(), error = %err, "no direct path yet");
            false
        }
        Err(_) => false,
    }
}

/// Why no direct path was made, and the relay to fall back on (with the reason) when one may
/// help.
struct NoDirect {
    err: Error,
    relay: Option<(PeerId, String)>,
}

/// A direct or punched connection to `peer`, never a relayed one: the dial of every candidate at
/// once, then (for a peer behind a NAT, with a coordinator) a coordinated punch.
async fn direct_path(
    shared: &PeerShared,
    addr: SocketAddr,
    peer: PeerId,
) -> std::result::Result<PeerConn, NoDirect> {
    let local = shared.node().local_addr().ok();
    let candidates: Vec<SocketAddr> = shared
        .candidates(peer, addr)
        .into_iter()
        .filter(|a| dialable(local, *a))
        .collect();
    if candidates.is_empty() {
        // An IPv4-only peer and an IPv6-only one share no family: only a relay that speaks both
        // (the dual-stack trainer) joins them.
        let err = Error::Connect {
            addr,
            reason: "no announced address of a family this socket can reach".into(),
        };
        let relay = shared
            .coordinator()
            .filter(|c| *c != peer)
            .map(|c| (c, "it announces no address of our family".to_owned()));
        return Err(NoDirect { err, relay });
    }
    // A peer whose record says it is public (or that we know nothing of) is dialed as before:
    // directly, for the whole timeout. Only a peer behind a NAT gets the short dial and a punch
    // or, when either side's NAT cannot be punched, the relay.
    let (ours, theirs) = shared.with_membership(|m| {
        (
            m.local_record().info.reach,
            m.get(&peer).map(|e| e.record.info.reach),
        )
    });
    let natted = theirs.is_some_and(|r| r != Reachability::Public);
    let coordinator = shared
        .coordinator()
        .filter(|c| *c != peer)
        .filter(|_| natted);
    let both_natted = matches!(
        plan(ours, theirs.unwrap_or(Reachability::Unknown)),
        Plan::Punch | Plan::Relay
    );
    let direct_timeout = match coordinator {
        Some(_) if both_natted => LAN_DIAL_TIMEOUT,
        Some(_) => DIRECT_TIMEOUT,
        None => shared.rpc_timeout(),
    };
    let tries = candidates.iter().map(|&a| {
        let node = shared.node().clone();
        Box::pin(async move { node.connect(a, Some(peer)).await })
    });
    let direct = tokio::time::timeout(direct_timeout, futures::future::select_ok(tries)).await;
    let err = match direct {
        Ok(Ok((conn, _))) => return Ok(shared.adopt(conn, PathKind::Direct, true).await),
        Ok(Err(e)) => e,
        Err(_) => Error::Timeout {
            what: "direct dial",
            after: direct_timeout,
        },
    };
    let is_virtual = |c: &PeerConn| shared.node().relay_routes().is_virtual(c.remote_addr());
    // The other side may have reached us meanwhile.
    if let Some(c) = shared.live_conn(peer).await
        && !is_virtual(&c)
    {
        return Ok(c);
    }
    let fail = |err| NoDirect { err, relay: None };
    let Some(coord) = coordinator else {
        return Err(fail(err));
    };
    let Some(coord_conn) = shared.live_conn(coord).await else {
        return Err(fail(err));
    };
    if plan(ours, theirs.unwrap_or(Reachability::Unknown)) == Plan::Relay {
        return Err(NoDirect {
            err,
            relay: Some((
                coord,
                "cannot be punched (symmetric or filtered NAT)".to_owned(),
            )),
        });
    }
    shared.set_punching(peer, true);
    let plan = rpc::call_timeout::<_, PunchPlan>(
        &coord_conn,
        &PunchRequest { target: peer },
        Duration::from_secs(5),
    )
    .await;
    let outcome = match plan {
        Ok(plan) => {
            let delay = Duration::from_millis(plan.delay_ms.min(5_000) as u64);
            let mut addrs = plan.addrs;
            addrs.extend(candidates);
            punch(shared, peer, addrs, delay).await
        }
        Err(e) => {
            shared.set_punching(peer, false);
            return Err(fail(e));
        }
    };
    shared.set_punching(peer, false);
    match outcome {
        PunchOutcome::Connected { elapsed, .. } => {
            tracing::info!(peer = %peer.short(), ms = elapsed.as_millis() as u64, "punched");
            match shared.live_conn(peer).await {
                Some(c) if !is_virtual(&c) => Ok(c),
                _ => Err(fail(err)),
            }
        }
        PunchOutcome::Failed { attempts } => {
            tracing::info!(peer = %peer.short(), attempts, "punch failed; trying the relay");
            Err(NoDirect {
                err,
                relay: Some((
                    coord,
                    format!("a hole punch failed after {attempts} attempt(s)"),
                )),
            })
        }
    }
}

/// Whether a socket bound at `local` can send to `to`: an IPv4 socket reaches IPv4 only, one
/// bound to a particular IPv6 address IPv6 only, a dual-stack one (`[::]`) both.
fn dialable(local: Option<SocketAddr>, to: SocketAddr) -> bool {
    match local {
        Some(SocketAddr::V4(_)) => to.is_ipv4(),
        Some(SocketAddr::V6(l)) if !l.ip().is_unspecified() => to.is_ipv6(),
        _ => true,
    }
}

/// The last resort: a tunnel through the coordinator, when it relays. A clear error otherwise.
async fn relay_fallback(
    shared: &PeerShared,
    relay: PeerId,
    peer: PeerId,
    addr: SocketAddr,
    why: &str,
) -> Result<PeerConn> {
    match crate::relay::dial(shared, relay, peer).await {
        Ok(c) => Ok(c),
        Err(e) => {
            tracing::info!(peer = %peer.short(), error = %e, "relay failed");
            Err(Error::Connect {
                addr,
                reason: format!("not reachable directly, {why}, and the relay failed: {e}"),
            })
        }
    }
}

/// Serves OBSERVE on a peer's main endpoint: the source address of the request, for a peer
/// re-checking its reachability over the connection it already holds.
async fn handle_observe(_peer: Arc<PeerShared>, ctx: RequestCtx, body: Vec<u8>) -> HandlerResult {
    wire::decode_body::<ObserveRequest>(&body).map_err(RpcError::from)?;
    rpc::reply(&ObserveReply {
        observed: ctx.remote_addr,
    })
}

/// Registers the NAT traversal handlers on a peer.
pub(crate) fn register_handlers(shared: &Arc<PeerShared>) {
    register(shared, kind::OBSERVE, handle_observe);
    register(shared, kind::DIAL_BACK, handle_dial_back);
    register(shared, kind::PUNCH_REQUEST, handle_punch_request);
    register(shared, kind::PUNCH_START, handle_punch_start);
}
