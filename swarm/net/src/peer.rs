//! The long-running peer service behind `swarm join`: one [`Node`], the [`Membership`] state
//! machine, and a dispatcher of message kinds to handlers.
//!
//! [`Peer::start`] binds the node, bootstraps (JOIN to the bootstrap address, then a gossip push
//! of its own record), and spawns the RPC server and the gossip loop. The loop drives the state
//! machine with the wall clock: it expires records, refreshes the local one, and exchanges records
//! push-pull with the targets `poll_gossip_targets` picks. [`Peer::leave`] announces LEAVING to a
//! few peers and closes. Later code registers more message kinds with [`Peer::register`] and
//! updates what this peer announces with [`Peer::update_local`].

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use swarm_nat::{PathKind, PunchConfig, Reachability, RelayConfig, UpgradeConfig, Verdict};

use crate::error::{Error, Result};
use crate::identity::{Identity, PeerId};
use crate::membership::{
    GossipPush, GossipReply, GossipTarget, HandleOutcome, JoinReply, JoinRequest, Membership,
    MembershipConfig, PeerRecord, PeerState, RecordInfo, RunId, StatusReply, StatusRequest,
    UnixMillis, verify_all,
};
use crate::nat::{self, Checker};
use crate::relay::{self, Relay};
use crate::rpc::{self, Reply, RpcError, Service, code};
use crate::shaping::LinkShape;
use crate::tls::AllowList;
use crate::transport::{Node, PeerConn, TransportConfig};
use crate::wire::{self, KindError, KindInfo, KindSet, Registry, WireMessage, kind};

/// Everything `Peer::start` needs. `Default` gives a new swarm on an ephemeral loopback port.
#[derive(Clone, Debug)]
pub struct PeerConfig {
    /// Address to listen on (port 0 picks one).
    pub listen: SocketAddr,
    /// A peer of the swarm to join; `None` starts a new swarm.
    pub bootstrap: Option<SocketAddr>,
    /// The run of a new swarm (random if `None`). When joining, the bootstrap's run is used and a
    /// different one given here is an error.
    pub run_id: Option<RunId>,
    /// Addresses to announce. Empty: the listen address, or (when listening on 0.0.0.0 / ::) the
    /// address the bootstrap saw us connect from.
    pub announce: Vec<SocketAddr>,
    /// Stages served, throughput and state announced at start.
    pub stages: Vec<u32>,
    /// Throughput announced at start (tokens per second; 0 when unknown).
    pub throughput: f64,
    /// State announced at start.
    pub state: PeerState,
    /// Software version announced (defaults to this crate's version).
    pub version: String,
    /// Gossip settings.
    pub membership: MembershipConfig,
    /// QUIC settings.
    pub transport: TransportConfig,
    /// Link shaping of this peer's socket (tests, experiments).
    pub shape: Option<LinkShape>,
    /// Peers allowed to connect (`None`: anyone of the run).
    pub allow: Option<AllowList>,
    /// Longest wait for one request (connect + answer).
    pub rpc_timeout: Duration,
    /// Seed of the gossip target choice (random if `None`).
    pub seed: Option<u64>,
    /// Run a reachability checker (a second endpoint, same identity) at this address (port 0
    /// picks one): joiners learn their NAT verdict from it. The trainer and a swarm's first peer
    /// run one.
    pub checker: Option<SocketAddr>,
    /// Bounds of the hole punches this peer takes part in.
    pub punch: PunchConfig,
    /// Relay datagrams between peers that cannot reach each other, within these quotas (the
    /// trainer does by default; `swarm join --relay`).
    pub relay: Option<RelayConfig>,
    /// Re-check our reachability with the bootstrap this often (`None`: only at join). A verdict
    /// that changed (a NAT replaced, a port forwarded) is announced in our record.
    pub recheck: Option<Duration>,
    /// When to retry a direct or punched path for a relayed connection.
    pub upgrade: UpgradeConfig,
}

impl Default for PeerConfig {
    fn default() -> Self {
        PeerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            bootstrap: None,
            run_id: None,
            announce: Vec::new(),
            stages: Vec::new(),
            throughput: 0.0,
            state: PeerState::Online,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            membership: MembershipConfig::default(),
            transport: TransportConfig::default(),
            shape: None,
            allow: None,
            rpc_timeout: Duration::from_secs(10),
            seed: None,
            checker: None,
            punch: PunchConfig::default(),
            relay: None,
            recheck: Some(Duration::from_secs(600)),
            upgrade: UpgradeConfig::default(),
        }
    }
}

/// Who sent a request.
#[derive(Clone, Copy, Debug)]
pub struct RequestCtx {
    /// The id the sender proved in the TLS handshake.
    pub from: PeerId,
    /// The address its packets come from.
    pub remote_addr: SocketAddr,
}

/// The answer of a handler: (kind, body); a refusal (sent back to the caller); or a malformed
/// request (the connection is closed).
pub type HandlerResult = std::result::Result<Reply, RpcError>;
/// A boxed handler future.
pub type HandlerFuture = Pin<Box<dyn Future<Output = HandlerResult> + Send>>;

/// Serves one message kind. Implemented for closures `Fn(Arc<PeerShared>, RequestCtx, Vec<u8>)`.
pub trait Handler: Send + Sync + 'static {
    /// Serves one request of the kind.
    fn handle(&self, peer: Arc<PeerShared>, ctx: RequestCtx, body: Vec<u8>) -> HandlerFuture;
}

impl<F, Fut> Handler for F
where
    F: Fn(Arc<PeerShared>, RequestCtx, Vec<u8>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    fn handle(&self, peer: Arc<PeerShared>, ctx: RequestCtx, body: Vec<u8>) -> HandlerFuture {
        Box::pin(self(peer, ctx, body))
    }
}

/// The state shared by the server, the gossip loop and handlers.
pub struct PeerShared {
    node: Node,
    membership: Mutex<Membership>,
    handlers: RwLock<HashMap<u16, Arc<dyn Handler>>>,
    /// The kinds this peer accepts: the network layer's and those registered by upper layers.
    kinds: RwLock<Registry>,
    conns: tokio::sync::Mutex<HashMap<PeerId, PeerConn>>,
    rpc_timeout: Duration,
    /// How each cached connection was made (issue #14).
    paths: Mutex<HashMap<PeerId, (PathKind, SocketAddr)>>,
    /// Peers a hole punch is under way with: a connection with them is a punched one.
    punching: Mutex<std::collections::HashSet<PeerId>>,
    checker: Option<Checker>,
    /// The peer that coordinates hole punches for us (our bootstrap).
    coordinator: Option<PeerId>,
    /// Where we joined (the coordinator's address): reachability re-checks go there.
    bootstrap: Option<SocketAddr>,
    /// Our reachability verdict: from the check at join, then from each re-check.
    verdict: Mutex<Option<Verdict>>,
    punch: PunchConfig,
    /// Our relay's quotas and counters, when we relay for others.
    relay: Option<Arc<Relay>>,
    /// Ourselves, so connections we dial can be served (requests come both ways).
    me: Weak<PeerShared>,
}

impl std::fmt::Debug for PeerShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PeerShared({:?})", self.node)
    }
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn unix_now() -> UnixMillis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl PeerShared {
    /// The QUIC node underneath.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// Runs `f` on the membership state (short critical sections only: no awaits inside).
    pub fn with_membership<T>(&self, f: impl FnOnce(&mut Membership) -> T) -> T {
        let mut m = self.membership.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut m)
    }

    /// A cached connection to `peer` at `addr`, or a new one. A cached connection that has closed
    /// is replaced.
    ///
    /// A known peer is dialed at every address it announces at once; when none answers and we
    /// have a coordinator, a coordinated hole punch follows ([`nat::dial`]). Either way the
    /// connection is cached and served in both directions.
    pub async fn connect(&self, addr: SocketAddr, peer: Option<PeerId>) -> Result<PeerConn> {
        if let Some(id) = peer {
            if let Some(c) = self.live_conn(id).await {
                return Ok(c);
            }
            // Bounded inside (direct dial, punch request, punch attempts); this is a backstop.
            let limit = self.rpc_timeout + nat::PUNCH_BUDGET;
            return tokio::time::timeout(limit, nat::dial(self, addr, id))
                .await
                .map_err(|_| Error::Timeout {
                    what: "connect",
                    after: limit,
                })?;
        }
        let conn = tokio::time::timeout(self.rpc_timeout, self.node.connect(addr, None))
            .await
            .map_err(|_| Error::Timeout {
                what: "connect",
                after: self.rpc_timeout,
            })??;
        Ok(self.adopt(conn, PathKind::Direct, true).await)
    }

    /// The cached connection to `peer` if it is still open.
    pub async fn live_conn(&self, peer: PeerId) -> Option<PeerConn> {
        let conns = self.conns.lock().await;
        conns
            .get(&peer)
            .filter(|c| c.close_reason().is_none())
            .cloned()
    }

    /// Caches `conn` (unless an open one to the same peer exists, which is returned instead) with
    /// its path kind. A connection we dialed (`serve`) also gets a server task, so the remote can
    /// send requests over it: that is how a peer behind a NAT is reached by the peers it dialed.
    pub async fn adopt(&self, conn: PeerConn, path: PathKind, serve: bool) -> PeerConn {
        let id = conn.remote_id();
        let path = if self.node.relay_routes().is_virtual(conn.remote_addr()) {
            // The tunnel lives as long as the connection through it.
            self.node
                .relay_routes()
                .detach_on_close(conn.remote_addr(), &conn);
            PathKind::Relayed
        } else if self.is_punching(id) {
            PathKind::Punched
        } else {
            path
        };
        let routes = self.node.relay_routes();
        let (kept, replaced) = {
            let mut conns = self.conns.lock().await;
            let open = conns.get(&id).filter(|c| c.close_reason().is_none());
            // A direct (or punched) connection supersedes a relayed one: that is how a relayed
            // peer moves to a direct path when one appears.
            let upgrade = open.is_some_and(|c| {
                routes.is_virtual(c.remote_addr()) && !routes.is_virtual(conn.remote_addr())
            });
            match open {
                Some(c) if !upgrade => (c.clone(), None),
                _ => {
                    let replaced = conns.insert(id, conn.clone()).filter(|_| upgrade);
                    self.paths
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(id, (path, conn.remote_addr()));
                    (conn.clone(), replaced)
                }
            }
        };
        if let Some(old) = replaced {
            tracing::info!(peer = %id.short(), %path, "relayed connection superseded by a direct path");
            // Requests already under way on the relayed connection may finish; new ones take the
            // direct path. Closing it also ends its tunnel.
            let grace = self.rpc_timeout;
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                old.close(0u32.into(), b"superseded by a direct path");
            });
        }
        if serve && let Some(me) = self.me.upgrade() {
            let service = Arc::new(ConnService {
                remote_addr: conn.remote_addr(),
                shared: me,
            });
            tokio::spawn(rpc::serve_connection(conn, service));
        }
        kept
    }

    /// The view as a status answer, with the path of each connection we hold.
    pub fn status(&self) -> StatusReply {
        let mut status = self.with_membership(|m| m.status(unix_now()));
        let tunnels = self.node.relay_routes().usage();
        for e in status.entries.iter_mut().skip(1) {
            let id = e.record.peer_id;
            e.path = self.path(id);
            e.relay_bytes = self.relay_bytes(id, &tunnels);
        }
        status
    }

    /// How our connection to `peer` runs, if we have one: punched when a punch made it, or when
    /// both sides are behind NATs and it runs over the remote's outside address (an earlier dial
    /// from either side opened the NATs: a punch all the same); direct otherwise (one side is
    /// public, or both sit on one LAN).
    pub fn path(&self, peer: PeerId) -> Option<PathKind> {
        let (kind, remote) = *self
            .paths
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&peer)?;
        if kind != PathKind::Direct {
            return Some(kind);
        }
        let ours = self.with_membership(|m| m.local_record().info.reach);
        let theirs = self.with_membership(|m| {
            m.get(&peer)
                .map(|e| (e.record.info.reach, e.record.info.addrs.first().copied()))
        });
        let natted = |r: Reachability| r != Reachability::Public;
        Some(match theirs {
            Some((reach, Some(outside)))
                if natted(ours) && natted(reach) && outside.ip() == remote.ip() =>
            {
                PathKind::Punched
            }
            _ => PathKind::Direct,
        })
    }

    /// Bytes relayed for `peer` (as its relay: sent + received) or moved to it through our
    /// tunnels (`tunnels` = [`crate::relay::RelayRoutes::usage`]).
    fn relay_bytes(&self, peer: PeerId, tunnels: &[(PeerId, u64, u64)]) -> u64 {
        let through_us = self.relay.as_ref().map_or(0, |r| {
            let u = r.usage(&peer);
            u.sent + u.received
        });
        let ours: u64 = tunnels
            .iter()
            .filter(|(p, _, _)| *p == peer)
            .map(|(_, s, r)| s + r)
            .sum();
        through_us + ours
    }

    /// Our relay, when we relay for others.
    pub fn relay(&self) -> Option<Arc<Relay>> {
        self.relay.clone()
    }

    /// Marks (or unmarks) a hole punch with `peer` as under way.
    pub fn set_punching(&self, peer: PeerId, on: bool) {
        let mut set = self.punching.lock().unwrap_or_else(|e| e.into_inner());
        if on {
            set.insert(peer);
        } else {
            set.remove(&peer);
        }
    }

    /// Whether a hole punch towards `peer` is in progress.
    pub fn is_punching(&self, peer: PeerId) -> bool {
        self.punching
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&peer)
    }

    /// Marks how the connection to `peer` (at `remote`) was made.
    pub fn set_path(&self, peer: PeerId, path: PathKind, remote: SocketAddr) {
        self.paths
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(peer, (path, remote));
    }

    /// Addresses to try for `peer`: `addr` first, then those its record announces.
    pub fn candidates(&self, peer: PeerId, addr: SocketAddr) -> Vec<SocketAddr> {
        let mut v = vec![addr];
        self.with_membership(|m| {
            if let Some(e) = m.get(&peer) {
                v.extend(e.record.info.addrs.iter().copied());
            }
        });
        let mut seen = Vec::with_capacity(v.len());
        v.retain(|a| {
            let new = !seen.contains(a) && !a.ip().is_unspecified();
            seen.push(*a);
            new
        });
        v.truncate(nat::MAX_CANDIDATES);
        v
    }

    /// This peer's reachability checker, if it runs one.
    pub fn checker(&self) -> Option<&Checker> {
        self.checker.as_ref()
    }

    /// The peer coordinating hole punches for us (the bootstrap), if any.
    pub fn coordinator(&self) -> Option<PeerId> {
        self.coordinator
    }

    /// The hole-punch settings.
    pub fn punch_config(&self) -> PunchConfig {
        self.punch
    }

    /// The longest wait for one request.
    pub fn rpc_timeout(&self) -> Duration {
        self.rpc_timeout
    }

    /// (peer, smoothed RTT, UDP bytes sent, received) of every cached connection, for monitors.
    /// Empty when the cache is busy at that instant (never waits).
    pub fn connection_stats(&self) -> Vec<(PeerId, Duration, u64, u64)> {
        let Ok(conns) = self.conns.try_lock() else {
            return Vec::new();
        };
        conns
            .iter()
            .map(|(id, c)| {
                let s = c.connection().stats();
                (*id, c.rtt(), s.udp_tx.bytes, s.udp_rx.bytes)
            })
            .collect()
    }

    /// Forgets the cached connection to `peer` (its record expired).
    pub async fn drop_conn(&self, peer: PeerId) {
        if let Some(c) = self.conns.lock().await.remove(&peer) {
            c.close(0u32.into(), b"dropped");
        }
        self.paths
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&peer);
    }

    /// Forgets `conn` after an error on it, unless another connection to the same peer has
    /// replaced it in the cache meanwhile (a direct path superseding a relayed one).
    async fn drop_failed(&self, conn: &PeerConn) {
        let id = conn.remote_id();
        let stable = conn.connection().stable_id();
        let mut conns = self.conns.lock().await;
        if conns
            .get(&id)
            .is_some_and(|c| c.connection().stable_id() == stable)
        {
            conns.remove(&id);
            self.paths
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        }
        drop(conns);
        conn.close(0u32.into(), b"dropped");
    }

    /// Our reachability verdict (see [`Peer::verdict`]).
    pub fn verdict(&self) -> Option<Verdict> {
        *self.verdict.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a new verdict; returns the previous one.
    pub(crate) fn set_verdict(&self, v: Verdict) -> Option<Verdict> {
        self.verdict
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(v)
    }

    /// The bootstrap we joined through, as (address, id), when we joined one.
    pub fn bootstrap(&self) -> Option<(SocketAddr, PeerId)> {
        Some((self.bootstrap?, self.coordinator?))
    }

    /// The ids of the cached connections that run through a relay.
    pub(crate) async fn relayed_peers(&self) -> Vec<PeerId> {
        let routes = self.node.relay_routes();
        self.conns
            .lock()
            .await
            .iter()
            .filter(|(_, c)| c.close_reason().is_none() && routes.is_virtual(c.remote_addr()))
            .map(|(id, _)| *id)
            .collect()
    }

    /// One request to `addr` (expecting `peer` if known), on a cached connection.
    pub async fn call<Req: WireMessage, Resp: WireMessage>(
        &self,
        addr: SocketAddr,
        peer: Option<PeerId>,
        req: &Req,
    ) -> Result<(PeerId, Resp)> {
        let conn = self.connect(addr, peer).await?;
        let id = conn.remote_id();
        match rpc::call_timeout::<Req, Resp>(&conn, req, self.rpc_timeout).await {
            Ok(resp) => Ok((id, resp)),
            // A refusal is an answer: the connection is fine and stays cached.
            Err(e @ Error::Remote(_)) => Err(e),
            Err(e) => {
                self.drop_failed(&conn).await;
                Err(e)
            }
        }
    }

    /// The row (name, size cap) of `kind` if this peer accepts it.
    pub fn kind_info(&self, kind: u16) -> Option<&'static KindInfo> {
        self.kinds
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .info(kind)
    }

    async fn dispatch(self: Arc<Self>, ctx: RequestCtx, kind: u16, body: Vec<u8>) -> HandlerResult {
        let handler = self
            .handlers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&kind)
            .cloned();
        match handler {
            Some(h) => h.handle(self.clone(), ctx, body).await,
            None => rpc::builtin(kind, &body).unwrap_or_else(|| {
                Err(RpcError::refused(
                    code::UNSUPPORTED,
                    format!(
                        "kind {} not served",
                        self.kind_info(kind).map_or("unknown", |k| k.name)
                    ),
                ))
            }),
        }
    }

    /// Takes gossiped records: cheap checks under the lock, signatures outside it (on the
    /// blocking pool when there are many: a big first exchange costs ~50 us per record), then
    /// stores what still passes.
    pub async fn take_records(&self, records: Vec<PeerRecord>) -> HandleOutcome {
        let (pass, mut refused) = self.with_membership(|m| m.triage(unix_now(), records));
        let verified = if pass.len() > 32 {
            tokio::task::spawn_blocking(move || {
                let mut refused = Vec::new();
                let ok = verify_all(pass, &mut refused);
                (ok, refused)
            })
            .await
            .map(|(ok, mut bad)| {
                refused.append(&mut bad);
                ok
            })
            .unwrap_or_default()
        } else {
            verify_all(pass, &mut refused)
        };
        let mut out = self.with_membership(|m| m.handle_verified(unix_now(), verified));
        refused.append(&mut out.refused);
        out.refused = refused;
        out
    }

    /// One digest exchange with `target` (see `membership`'s message docs); returns how many
    /// records were accepted.
    async fn exchange(&self, target: GossipTarget) -> Result<usize> {
        let push = self.with_membership(|m| GossipPush {
            records: vec![m.local_record().clone()],
            digest: Some(m.digest()),
        });
        let (id, reply): (PeerId, GossipReply) = self.call(target.addr, target.peer, &push).await?;
        let out = self.take_records(reply.records).await;
        let wanted = self.with_membership(|m| {
            m.handle_contact(unix_now(), id);
            m.records_of(&reply.want)
        });
        if out.suspicious() > 0 {
            tracing::warn!(peer = %id.short(), refused = out.suspicious(), "gossip reply carried invalid records");
        }
        if !wanted.is_empty() {
            let push = GossipPush {
                records: wanted,
                digest: None,
            };
            let _: (PeerId, GossipReply) = self.call(target.addr, Some(id), &push).await?;
        }
        Ok(out.accepted.len())
    }
}

/// A running peer. Dropping it aborts its tasks without a goodbye; call [`Peer::leave`] to leave
/// gracefully.
pub struct Peer {
    shared: Arc<PeerShared>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    addr: SocketAddr,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Peer({:?})", self.shared.node)
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Peer {
    /// Binds, bootstraps and starts serving. Must be called inside a tokio runtime.
    pub async fn start(identity: Identity, config: PeerConfig) -> Result<Peer> {
        let node = Node::bind(
            identity.clone(),
            config.listen,
            config.transport.clone(),
            config.shape.clone(),
            config.allow.clone(),
        )?;
        let local = node.local_addr()?;
        let mut rng = match config.seed {
            Some(s) => ChaCha8Rng::seed_from_u64(s),
            None => ChaCha8Rng::from_os_rng(),
        };

        // Bootstrap: learn the run, our outside address and the view.
        let mut joined: Option<(PeerId, JoinReply)> = None;
        let mut boot_conn = None;
        if let Some(addr) = config.bootstrap {
            let conn = tokio::time::timeout(config.rpc_timeout, node.connect(addr, None))
                .await
                .map_err(|_| Error::Timeout {
                    what: "connect to bootstrap",
                    after: config.rpc_timeout,
                })??;
            let reply: JoinReply =
                rpc::call_timeout(&conn, &JoinRequest, config.rpc_timeout).await?;
            if let Some(want) = config.run_id
                && want != reply.run_id
            {
                return Err(Error::WrongRun {
                    expected: want,
                    got: reply.run_id,
                });
            }
            joined = Some((conn.remote_id(), reply));
            boot_conn = Some(conn);
        }
        // The reachability check (issue #14): the bootstrap dials us back from its checker and
        // its checker reports the address it sees. Bounded (a few seconds).
        let verdict = match (&boot_conn, &joined) {
            (Some(conn), Some((_, reply))) => {
                let v = nat::check(&node, conn, reply.observed_addr, false).await;
                tracing::info!(reach = %v.reachability, addr = ?v.public_addr, "reachability verdict");
                Some(v)
            }
            _ => None,
        };
        let run_id = match (&joined, config.run_id) {
            (Some((_, r)), _) => r.run_id,
            (None, Some(r)) => r,
            (None, None) => RunId::random(&mut rng),
        };
        // Candidates, most useful first: what the operator says (`--public-addr`), the mapping the
        // bootstrap saw (a NAT's outside address and port), the same IP with our port (a port
        // forward), then our own interface address (peers on the same LAN).
        let mut addrs = config.announce.clone();
        if let Some((_, r)) = &joined {
            addrs.push(r.observed_addr);
            addrs.push(SocketAddr::new(r.observed_addr.ip(), local.port()));
        }
        if !local.ip().is_unspecified() {
            addrs.push(local);
        } else {
            // A socket on `[::]` is dual-stack (Linux's default): our addresses of both families
            // are candidates, so IPv4-only and IPv6-only peers both find one they can dial.
            let families: &[bool] = if local.is_ipv6() {
                &[true, false]
            } else {
                &[false]
            };
            for &v6 in families {
                if let Some(ip) = primary_ip(v6) {
                    addrs.push(SocketAddr::new(ip, local.port()));
                }
            }
        }
        let mut seen = Vec::new();
        addrs.retain(|a| {
            let new = !seen.contains(a);
            seen.push(*a);
            new
        });
        addrs.truncate(crate::membership::MAX_ADDRS);
        if addrs.is_empty() {
            return Err(Error::NoAnnounceAddress { listen: local });
        }
        // Without a check: a peer others join through (it runs a checker) or whose operator gave
        // its public address is taken as public.
        let reach = match &verdict {
            Some(v) => v.reachability,
            None if !config.announce.is_empty() || config.checker.is_some() => Reachability::Public,
            None => Reachability::Unknown,
        };
        let info = RecordInfo {
            addrs,
            stages: config.stages.clone(),
            throughput: config.throughput,
            state: config.state,
            version: config.version.clone(),
            reach,
        };
        let now = unix_now();
        let seeds = config.bootstrap.into_iter().collect();
        let checker = match config.checker {
            Some(at) => Some(Checker::start(
                identity.clone(),
                at,
                config.transport.clone(),
            )?),
            None => None,
        };
        let mut membership = Membership::new(
            identity,
            run_id,
            config.membership.clone(),
            info,
            seeds,
            now,
        );
        if let Some((_, reply)) = &joined {
            let out = membership.handle_records(now, reply.records.clone());
            tracing::debug!(
                accepted = out.accepted.len(),
                refused = out.refused.len(),
                "bootstrap view"
            );
        }

        let shared = Arc::new_cyclic(|me| PeerShared {
            node: node.clone(),
            membership: Mutex::new(membership),
            handlers: RwLock::new(HashMap::new()),
            kinds: RwLock::new(Registry::new()),
            conns: tokio::sync::Mutex::new(HashMap::new()),
            rpc_timeout: config.rpc_timeout,
            paths: Mutex::new(HashMap::new()),
            punching: Mutex::new(Default::default()),
            checker,
            coordinator: joined.as_ref().map(|(id, _)| *id),
            bootstrap: config.bootstrap,
            verdict: Mutex::new(verdict),
            punch: config.punch,
            relay: config.relay.map(|c| Arc::new(Relay::new(c))),
            me: me.clone(),
        });
        register_membership_handlers(&shared);
        nat::register_handlers(&shared);
        if let Some(c) = boot_conn {
            shared.adopt(c, PathKind::Direct, true).await;
        }

        let (stop, stop_rx) = watch::channel(false);
        let server = tokio::spawn(serve(shared.clone()));
        // Announce ourselves to the bootstrap before returning, so that `join` printing its line
        // means the swarm can already reach us.
        if let (Some(addr), Some((id, _))) = (config.bootstrap, &joined) {
            shared
                .exchange(GossipTarget {
                    peer: Some(*id),
                    addr,
                })
                .await?;
        }
        let gossip = tokio::spawn(gossip_loop(shared.clone(), rng, stop_rx.clone()));
        let paths = tokio::spawn(crate::paths::maintain(
            shared.clone(),
            config.recheck,
            config.upgrade,
            stop_rx,
        ));
        tracing::info!(peer = %shared.node.peer_id().short(), addr = %local, run = %run_id, "peer started");
        Ok(Peer {
            shared,
            stop,
            tasks: vec![server, gossip, paths],
            addr: local,
        })
    }

    /// This peer's id.
    pub fn peer_id(&self) -> PeerId {
        self.shared.node.peer_id()
    }

    /// The bound socket address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The run this peer belongs to.
    pub fn run_id(&self) -> RunId {
        self.shared.with_membership(|m| m.run_id())
    }

    /// The state shared with handlers (node, membership, connection cache).
    pub fn shared(&self) -> &Arc<PeerShared> {
        &self.shared
    }

    /// This peer's reachability verdict: from its check at join, or its latest re-check (`None`
    /// without a bootstrap).
    pub fn verdict(&self) -> Option<Verdict> {
        self.shared.verdict()
    }

    /// How our connection to `peer` was made, if we have one.
    pub fn path(&self, peer: PeerId) -> Option<PathKind> {
        self.shared.path(peer)
    }

    /// This peer's current signed record.
    pub fn local_record(&self) -> PeerRecord {
        self.shared.with_membership(|m| m.local_record().clone())
    }

    /// The view as a status answer (own record first).
    pub fn status(&self) -> StatusReply {
        self.shared.status()
    }

    /// Changes what this peer announces (stages, throughput, state) and re-signs its record; the
    /// next gossip rounds spread it.
    pub fn update_local(&self, f: impl FnOnce(&mut RecordInfo)) {
        let now = unix_now();
        self.shared.with_membership(|m| m.update_local(now, f));
    }

    /// Accepts an upper layer's message kinds (their numbers and size caps) on this peer. Again
    /// with the same set is a no-op; a set overlapping another layer's range is refused.
    pub fn register_kinds(&self, set: &'static KindSet) -> Result<(), KindError> {
        self.shared
            .kinds
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .register(set)
    }

    /// Serves `kind` with `handler` (replacing any previous one). Membership kinds are registered
    /// at start; upper layers register their [`KindSet`] first ([`Peer::register_kinds`]).
    ///
    /// # Panics
    /// If `kind` is in no registered set: a programming error that would otherwise make every
    /// such request close its connection.
    pub fn register(&self, kind: u16, handler: impl Handler) {
        assert!(
            self.shared.kind_info(kind).is_some(),
            "message kind {kind} served before its KindSet was registered"
        );
        register(&self.shared, kind, handler);
    }

    /// Leaves gracefully: stops gossiping, pushes the LEAVING record to up to `2 * fanout` live
    /// peers (bounded by the RPC timeout), then closes the node. Returns how many peers took it.
    pub async fn leave(mut self) -> usize {
        let _ = self.stop.send(true);
        let now = unix_now();
        let (leaving, targets) = self.shared.with_membership(|m| {
            let leaving = m.leave(now);
            let fanout = m.config().fanout * 2;
            let mut rng = ChaCha8Rng::seed_from_u64(now);
            let live: Vec<GossipTarget> = m
                .live()
                .filter_map(|e| {
                    e.record.info.addrs.first().map(|a| GossipTarget {
                        peer: Some(e.record.peer_id),
                        addr: *a,
                    })
                })
                .collect();
            use rand::seq::IndexedRandom;
            let targets: Vec<GossipTarget> =
                live.choose_multiple(&mut rng, fanout).cloned().collect();
            (leaving, targets)
        });
        let pushes = targets.into_iter().map(|t| {
            let shared = self.shared.clone();
            let push = GossipPush {
                records: vec![leaving.clone()],
                digest: None,
            };
            async move {
                shared
                    .call::<GossipPush, GossipReply>(t.addr, t.peer, &push)
                    .await
                    .is_ok()
            }
        });
        let told = futures::future::join_all(pushes)
            .await
            .into_iter()
            .filter(|ok| *ok)
            .count();
        tracing::info!(peer = %self.peer_id().short(), told, "left");
        for t in self.tasks.drain(..) {
            t.abort();
        }
        self.shared.node.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.shared.node.wait_idle()).await;
        told
    }
}

pub(crate) fn register(shared: &Arc<PeerShared>, kind: u16, handler: impl Handler) {
    shared
        .handlers
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .insert(kind, Arc::new(handler));
}

fn register_membership_handlers(shared: &Arc<PeerShared>) {
    register(
        shared,
        kind::GOSSIP,
        |peer: Arc<PeerShared>, ctx: RequestCtx, body: Vec<u8>| async move {
            let push: GossipPush = wire::decode_body(&body).map_err(RpcError::from)?;
            let out = peer.take_records(push.records).await;
            let reply = peer.with_membership(|m| {
                let now = unix_now();
                m.handle_contact(now, ctx.from);
                let (records, want) = match &push.digest {
                    Some(d) => m.diff(now, d),
                    None => (Vec::new(), Vec::new()),
                };
                GossipReply { records, want }
            });
            if out.suspicious() > 0 {
                tracing::warn!(peer = %ctx.from.short(), refused = out.suspicious(), "gossip push carried invalid records");
            }
            rpc::reply(&reply)
        },
    );
    register(
        shared,
        kind::JOIN,
        |peer: Arc<PeerShared>, ctx: RequestCtx, body: Vec<u8>| async move {
            wire::decode_body::<JoinRequest>(&body).map_err(RpcError::from)?;
            let (run_id, records) =
                peer.with_membership(|m| (m.run_id(), m.records_for_exchange()));
            tracing::debug!(peer = %ctx.from.short(), addr = %ctx.remote_addr, "join request");
            rpc::reply(&JoinReply {
                run_id,
                observed_addr: ctx.remote_addr,
                records,
            })
        },
    );
    register(
        shared,
        kind::STATUS,
        |peer: Arc<PeerShared>, _ctx: RequestCtx, body: Vec<u8>| async move {
            wire::decode_body::<StatusRequest>(&body).map_err(RpcError::from)?;
            rpc::reply(&peer.status())
        },
    );
}

/// The dispatcher as seen by one connection (handlers get the sender's address, which JOIN
/// reports back as the observed address).
struct ConnService {
    shared: Arc<PeerShared>,
    remote_addr: SocketAddr,
}

impl Service for ConnService {
    fn kind_info(&self, kind: u16) -> Option<&'static KindInfo> {
        self.shared.kind_info(kind)
    }

    fn handle(
        &self,
        from: PeerId,
        kind: u16,
        body: Vec<u8>,
    ) -> futures::future::BoxFuture<'_, HandlerResult> {
        let ctx = RequestCtx {
            from,
            remote_addr: self.remote_addr,
        };
        Box::pin(self.shared.clone().dispatch(ctx, kind, body))
    }

    fn is_stream_kind(&self, kind: u16) -> bool {
        relay::is_stream_kind(kind)
    }

    fn handle_stream(
        &self,
        from: PeerId,
        _kind: u16,
        body: Vec<u8>,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) -> futures::future::BoxFuture<'_, ()> {
        let ctx = RequestCtx {
            from,
            remote_addr: self.remote_addr,
        };
        Box::pin(relay::handle_stream(
            self.shared.clone(),
            ctx,
            body,
            send,
            recv,
        ))
    }
}

/// Accepts connections and serves their requests through the dispatcher until the node closes.
async fn serve(shared: Arc<PeerShared>) {
    while let Some(incoming) = shared.node.accept().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            let addr = incoming.remote_addr();
            match incoming.handshake().await {
                Ok(conn) => {
                    // Cached, so we answer a peer behind a NAT over the connection it opened.
                    shared.adopt(conn.clone(), PathKind::Direct, false).await;
                    let service = Arc::new(ConnService {
                        shared,
                        remote_addr: conn.remote_addr(),
                    });
                    rpc::serve_connection(conn, service).await
                }
                Err(e) => tracing::info!(%addr, error = %e, "handshake refused"),
            }
        });
    }
}

/// Drives membership with the clock until `stop`.
async fn gossip_loop(
    shared: Arc<PeerShared>,
    mut rng: ChaCha8Rng,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let now = unix_now();
        let (gone, targets, next) = shared.with_membership(|m| {
            let gone = m.expire(now);
            m.refresh_local(now);
            let targets = m.poll_gossip_targets(now, &mut rng);
            (gone, targets, m.poll_timeout())
        });
        for id in gone {
            tracing::info!(peer = %id.short(), "peer record expired");
            shared.drop_conn(id).await;
        }
        for t in targets {
            let shared = shared.clone();
            // Each exchange in its own task: a dead target costs a timeout, not a stalled loop.
            tokio::spawn(async move {
                if let Err(e) = shared.exchange(t.clone()).await {
                    tracing::debug!(addr = %t.addr, error = %e, "gossip exchange failed");
                }
            });
        }
        let wait = Duration::from_millis(next.saturating_sub(unix_now()).clamp(10, 60_000));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
    }
}

/// The address of the interface that routes to the internet, found by "connecting" a UDP socket
/// (which sends nothing) and reading its local address. Used when a new swarm's first peer listens
/// on 0.0.0.0 and nobody can tell it what it looks like from outside.
fn primary_ip(v6: bool) -> Option<std::net::IpAddr> {
    let (bind, probe): (SocketAddr, SocketAddr) = if v6 {
        (
            "[::]:0".parse().ok()?,
            "[2001:4860:4860::8888]:53".parse().ok()?,
        )
    } else {
        ("0.0.0.0:0".parse().ok()?, "8.8.8.8:53".parse().ok()?)
    };
    let socket = std::net::UdpSocket::bind(bind).ok()?;
    socket.connect(probe).ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

#[cfg(test)]
mod tests;
