//! In-process link shaping: a UDP socket wrapper that emulates a peer's home connection.
//!
//! A [`LinkShape`] describes one peer's access link: upload and download rate, one-way delay,
//! jitter and random loss, seeded so experiments replay. [`ShapedSocket`] applies it beneath quinn
//! (as a [`quinn::AsyncUdpSocket`]), so the transport, congestion control and everything above see
//! a real slow link.
//!
//! Model, per packet:
//! - egress: upload token bucket (small burst, tail drop beyond a router-sized queue), then random
//!   loss, then one-way delay plus jitter; packets leave in order (jitter never reorders them,
//!   like a single path through the internet);
//! - ingress: download token bucket with the same queue discipline.
//!
//! So the RTT between peers A and B is at least `delay_A + delay_B`, and a transfer from A to B
//! runs at most at `min(up_A, down_B)`. The rate logic ([`Bucket`]) is a pure function of the
//! times passed in, so it is tested without a clock.
//!
//! A link can change while it runs (a link degrading in an experiment): [`ShapedSocket::set_shape`],
//! or [`reshape_process`] for every shaped socket of this process (what `swarm join
//! --control-stdin` does, since its socket lives inside the peer). Packets already queued keep
//! the times they were given; later ones see the new rates, delay and loss.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::error::{Error, Result};

/// Largest UDP datagram we read.
const MAX_DATAGRAM: usize = 65_536;
/// Typical packet size, for sizing bursts.
const MTU: u64 = 1_500;

/// One peer's emulated access link. `None` rates are unlimited.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkShape {
    /// Upload (egress) rate in bits per second.
    pub up_bps: Option<u64>,
    /// Download (ingress) rate in bits per second.
    pub down_bps: Option<u64>,
    /// One-way delay added to every packet this peer sends.
    pub delay: Duration,
    /// Each packet's delay varies uniformly within `delay ± jitter` (never below zero).
    pub jitter: Duration,
    /// Probability that a sent packet is lost, in [0, 1).
    pub loss: f64,
    /// Seed of the loss and jitter draws.
    pub seed: u64,
    /// Queue limit of each bucket as time at the bucket's rate (a router buffer); default 100 ms.
    pub queue: Duration,
}

impl Default for LinkShape {
    fn default() -> LinkShape {
        LinkShape {
            up_bps: None,
            down_bps: None,
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            seed: 0,
            queue: Duration::from_millis(100),
        }
    }
}

impl LinkShape {
    /// A symmetric link: `bps` both ways, `delay` one way.
    pub fn symmetric(bps: u64, delay: Duration) -> LinkShape {
        LinkShape {
            up_bps: Some(bps),
            down_bps: Some(bps),
            delay,
            ..LinkShape::default()
        }
    }

    fn validate(self) -> Result<LinkShape> {
        let bad = |m: String| Err(Error::BadShape(m));
        if !(0.0..1.0).contains(&self.loss) {
            return bad(format!("loss must be in [0, 100%), got {}", self.loss));
        }
        if self.up_bps == Some(0) || self.down_bps == Some(0) {
            return bad("rates must be positive".into());
        }
        if self.jitter > self.delay && !self.delay.is_zero() {
            // Allowed, but clamping at zero skews the mean: say so rather than silently.
            tracing::debug!(?self.jitter, ?self.delay, "jitter exceeds delay; delays clamp at zero");
        }
        if self.queue.is_zero() {
            return bad("queue must be positive".into());
        }
        Ok(self)
    }
}

impl fmt::Display for LinkShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(b) = self.up_bps {
            parts.push(format!("up={}", fmt_rate(b)));
        }
        if let Some(b) = self.down_bps {
            parts.push(format!("down={}", fmt_rate(b)));
        }
        parts.push(format!("delay={}us", self.delay.as_micros()));
        if !self.jitter.is_zero() {
            parts.push(format!("jitter={}us", self.jitter.as_micros()));
        }
        if self.loss > 0.0 {
            parts.push(format!("loss={}%", self.loss * 100.0));
        }
        parts.push(format!("seed={}", self.seed));
        parts.push(format!("queue={}us", self.queue.as_micros()));
        f.write_str(&parts.join(","))
    }
}

fn fmt_rate(bps: u64) -> String {
    if bps.is_multiple_of(1_000_000) {
        format!("{}mbit", bps / 1_000_000)
    } else if bps.is_multiple_of(1_000) {
        format!("{}kbit", bps / 1_000)
    } else {
        format!("{bps}bit")
    }
}

impl FromStr for LinkShape {
    type Err = Error;

    /// `up=20mbit,down=80mbit,delay=30ms,jitter=5ms,loss=0.1%,seed=7,queue=100ms`; every key is
    /// optional. Rates take `bit`, `kbit`, `mbit`, `gbit` (or `bps`, `kbps`, `mbps`, `gbps`),
    /// durations `us`, `ms`, `s`; loss is a percentage (`1%`) or a fraction (`0.01`).
    fn from_str(s: &str) -> Result<LinkShape> {
        let mut shape = LinkShape::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| Error::BadShape(format!("`{part}` is not key=value")))?;
            let value = value.trim();
            match key.trim() {
                "up" => shape.up_bps = Some(parse_rate(value)?),
                "down" => shape.down_bps = Some(parse_rate(value)?),
                "rate" => {
                    let r = parse_rate(value)?;
                    shape.up_bps = Some(r);
                    shape.down_bps = Some(r);
                }
                "delay" => shape.delay = parse_duration(value)?,
                "jitter" => shape.jitter = parse_duration(value)?,
                "queue" => shape.queue = parse_duration(value)?,
                "loss" => shape.loss = parse_loss(value)?,
                "seed" => {
                    shape.seed = value
                        .parse()
                        .map_err(|_| Error::BadShape(format!("seed `{value}` is not a u64")))?
                }
                other => {
                    return Err(Error::BadShape(format!(
                        "unknown key `{other}` (expected up, down, rate, delay, jitter, loss, seed, queue)"
                    )));
                }
            }
        }
        shape.validate()
    }
}

fn split_unit(value: &str) -> (&str, &str) {
    let end = value
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(value.len());
    (&value[..end], value[end..].trim())
}

fn parse_rate(value: &str) -> Result<u64> {
    let (num, unit) = split_unit(value);
    let n: f64 = num
        .parse()
        .map_err(|_| Error::BadShape(format!("rate `{value}` has no number")))?;
    let scale = match unit.to_ascii_lowercase().as_str() {
        "bit" | "bps" | "" => 1.0,
        "kbit" | "kbps" => 1e3,
        "mbit" | "mbps" => 1e6,
        "gbit" | "gbps" => 1e9,
        u => {
            return Err(Error::BadShape(format!(
                "rate unit `{u}` (use bit, kbit, mbit, gbit)"
            )));
        }
    };
    let bps = n * scale;
    if !(1.0..=1e12).contains(&bps) {
        return Err(Error::BadShape(format!("rate `{value}` out of range")));
    }
    Ok(bps.round() as u64)
}

fn parse_duration(value: &str) -> Result<Duration> {
    let (num, unit) = split_unit(value);
    let n: f64 = num
        .parse()
        .map_err(|_| Error::BadShape(format!("duration `{value}` has no number")))?;
    let secs = match unit {
        "us" => n * 1e-6,
        "ms" => n * 1e-3,
        "s" => n,
        u => {
            return Err(Error::BadShape(format!(
                "duration unit `{u}` (use us, ms, s)"
            )));
        }
    };
    if !(0.0..=3600.0).contains(&secs) {
        return Err(Error::BadShape(format!("duration `{value}` out of range")));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn parse_loss(value: &str) -> Result<f64> {
    let (num, unit) = split_unit(value);
    let n: f64 = num
        .parse()
        .map_err(|_| Error::BadShape(format!("loss `{value}` has no number")))?;
    match unit {
        "%" => Ok(n / 100.0),
        "" => Ok(n),
        u => Err(Error::BadShape(format!(
            "loss unit `{u}` (use % or a fraction)"
        ))),
    }
}

/// A token bucket over virtual time (nanoseconds from any origin): the rate logic of one
/// direction of a link, pure so it can be tested exactly.
///
/// The bucket holds up to `burst` bytes of credit; beyond that, packets wait for the link. A packet
/// that would find more than `queue_limit` bytes already waiting is dropped (tail drop).
#[derive(Debug, Clone)]
pub struct Bucket {
    rate_bps: u64,
    burst_ns: u64,
    queue_limit_bytes: u64,
    /// When the link finishes sending everything admitted so far.
    free_at: u64,
}

impl Bucket {
    /// A bucket of `rate_bps` with `burst_bytes` of burst and a queue of `queue_limit_bytes`.
    pub fn new(rate_bps: u64, burst_bytes: u64, queue_limit_bytes: u64) -> Bucket {
        let rate_bps = rate_bps.max(1);
        Bucket {
            rate_bps,
            burst_ns: tx_ns(burst_bytes, rate_bps),
            queue_limit_bytes,
            free_at: 0,
        }
    }

    /// The bucket for `rate_bps` with our defaults: a burst of a few packets (2 ms at the rate,
    /// at least 2 MTUs) and a queue of `queue` at the rate (at least 8 MTUs).
    pub fn for_rate(rate_bps: u64, queue: Duration) -> Bucket {
        let per_sec = rate_bps as f64 / 8.0;
        let burst = ((per_sec * 0.002) as u64).max(2 * MTU);
        let limit = ((per_sec * queue.as_secs_f64()) as u64).max(8 * MTU);
        Bucket::new(rate_bps, burst, limit)
    }

    /// Bytes waiting for the link at `now`.
    pub fn backlog_bytes(&self, now: u64) -> u64 {
        let wait_ns = self.free_at.saturating_sub(now) as u128;
        (wait_ns * self.rate_bps as u128 / 8_000_000_000) as u64
    }

    /// Admits a packet of `len` bytes arriving at `now`: returns when its last bit has left the
    /// link, or `None` if the queue is full and it is dropped.
    pub fn admit(&mut self, now: u64, len: usize) -> Option<u64> {
        if self.backlog_bytes(now) + len as u64 > self.queue_limit_bytes {
            return None;
        }
        // Idle credit is capped at `burst`: the link cannot "save up" more than that.
        let start = self.free_at.max(now.saturating_sub(self.burst_ns));
        let finish = start + tx_ns(len as u64, self.rate_bps);
        self.free_at = finish;
        Some(finish.max(now))
    }
}

fn tx_ns(bytes: u64, rate_bps: u64) -> u64 {
    ((bytes as u128 * 8 * 1_000_000_000) / rate_bps as u128) as u64
}

/// Counters of one shaped socket, for tests, benchmarks and experiment logs.
#[derive(Debug, Default)]
pub struct ShapeStats {
    /// Datagrams and bytes admitted by the upload bucket (sent onto the emulated link).
    pub up_packets: AtomicU64,
    /// Bytes admitted by the upload bucket.
    pub up_bytes: AtomicU64,
    /// Datagrams dropped because the upload queue was full.
    pub up_queue_drops: AtomicU64,
    /// Datagrams lost at random after leaving the upload bucket.
    pub up_lost: AtomicU64,
    /// Virtual time (ns since the socket was made) of the first upload start and last finish:
    /// `up_bytes * 8 / (last - first)` is the rate the shaper delivered.
    pub up_first_ns: AtomicU64,
    /// Virtual time of the last upload finish (ns).
    pub up_last_ns: AtomicU64,
    /// Datagrams and bytes delivered by the download bucket.
    pub down_packets: AtomicU64,
    /// Bytes delivered by the download bucket.
    pub down_bytes: AtomicU64,
    /// Datagrams dropped because the download queue was full.
    pub down_queue_drops: AtomicU64,
}

/// A plain copy of [`ShapeStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ShapeCounters {
    /// See [`ShapeStats::up_packets`].
    pub up_packets: u64,
    /// See [`ShapeStats::up_bytes`].
    pub up_bytes: u64,
    /// See [`ShapeStats::up_queue_drops`].
    pub up_queue_drops: u64,
    /// See [`ShapeStats::up_lost`].
    pub up_lost: u64,
    /// See [`ShapeStats::up_first_ns`].
    pub up_first_ns: u64,
    /// See [`ShapeStats::up_last_ns`].
    pub up_last_ns: u64,
    /// See [`ShapeStats::down_packets`].
    pub down_packets: u64,
    /// See [`ShapeStats::down_bytes`].
    pub down_bytes: u64,
    /// See [`ShapeStats::down_queue_drops`].
    pub down_queue_drops: u64,
}

impl ShapeCounters {
    /// The upload rate the shaper delivered between its first and last packet, in bits/s.
    pub fn up_rate_bps(&self) -> Option<f64> {
        let span = self.up_last_ns.checked_sub(self.up_first_ns)?;
        (span > 0).then(|| self.up_bytes as f64 * 8.0 / (span as f64 * 1e-9))
    }
}

impl ShapeStats {
    /// The counters now.
    pub fn snapshot(&self) -> ShapeCounters {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ShapeCounters {
            up_packets: l(&self.up_packets),
            up_bytes: l(&self.up_bytes),
            up_queue_drops: l(&self.up_queue_drops),
            up_lost: l(&self.up_lost),
            up_first_ns: l(&self.up_first_ns),
            up_last_ns: l(&self.up_last_ns),
            down_packets: l(&self.down_packets),
            down_bytes: l(&self.down_bytes),
            down_queue_drops: l(&self.down_queue_drops),
        }
    }
}

struct Datagram {
    at: Instant,
    addr: SocketAddr,
    data: Vec<u8>,
}

/// Upload side state, touched by quinn's `try_send` and the egress task.
struct Egress {
    bucket: Option<Bucket>,
    rng: ChaCha8Rng,
    /// Release time of the last queued packet: later packets never leave before it.
    last_release: Instant,
    /// Bytes currently in the delay line (bounded: rate x (delay + jitter) + queue).
    queue: VecDeque<Datagram>,
}

struct Shared {
    /// The current shape (changed by [`ShapedSocket::set_shape`]).
    shape: Mutex<LinkShape>,
    /// Bumped on every change, so the ingress task rebuilds its bucket.
    generation: AtomicU64,
    origin: Instant,
    egress: Mutex<Egress>,
    egress_ready: Notify,
    /// Datagrams whose download time has come, waiting for quinn's `poll_recv`.
    ready: Mutex<(VecDeque<Datagram>, Option<Waker>)>,
    stats: Arc<ShapeStats>,
}

/// A UDP socket that shapes its traffic as a [`LinkShape`]. Must be created inside a tokio runtime
/// (it runs two tasks, stopped when the socket is dropped).
pub struct ShapedSocket {
    io: Arc<tokio::net::UdpSocket>,
    shared: Arc<Shared>,
    tasks: [JoinHandle<()>; 2],
}

impl fmt::Debug for ShapedSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ShapedSocket({})", self.shared.current_shape())
    }
}

impl Drop for ShapedSocket {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl ShapedSocket {
    /// Wraps a bound socket. Requires a tokio runtime context.
    pub fn new(socket: std::net::UdpSocket, shape: LinkShape) -> Result<ShapedSocket> {
        let shape = shape.validate()?;
        socket.set_nonblocking(true).map_err(Error::Socket)?;
        let io = Arc::new(tokio::net::UdpSocket::from_std(socket).map_err(Error::Socket)?);
        let now = Instant::now();
        let shared = Arc::new(Shared {
            egress: Mutex::new(Egress {
                bucket: shape.up_bps.map(|r| Bucket::for_rate(r, shape.queue)),
                rng: ChaCha8Rng::seed_from_u64(shape.seed),
                last_release: now,
                queue: VecDeque::new(),
            }),
            origin: now,
            egress_ready: Notify::new(),
            ready: Mutex::new((VecDeque::new(), None)),
            stats: Arc::new(ShapeStats::default()),
            shape: Mutex::new(shape),
            generation: AtomicU64::new(0),
        });
        register(&shared);
        let egress = tokio::spawn(egress_task(io.clone(), shared.clone()));
        let ingress = tokio::spawn(ingress_task(io.clone(), shared.clone()));
        Ok(ShapedSocket {
            io,
            shared,
            tasks: [egress, ingress],
        })
    }

    /// The socket's counters.
    pub fn stats(&self) -> Arc<ShapeStats> {
        self.shared.stats.clone()
    }

    /// The shape in force now.
    pub fn shape(&self) -> LinkShape {
        self.shared.current_shape()
    }

    /// Changes the link from now on (a link degrading or recovering). Packets already admitted
    /// keep their times; the buckets restart empty at the new rates; a new seed reseeds the
    /// loss and jitter draws.
    pub fn set_shape(&self, shape: LinkShape) -> Result<()> {
        self.shared.set_shape(shape)
    }

    fn nanos(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.shared.origin).as_nanos() as u64
    }

    fn send_one(&self, addr: SocketAddr, data: &[u8]) {
        let shared = &self.shared;
        let stats = &shared.stats;
        let now = Instant::now();
        let now_ns = self.nanos(now);
        let mut eg = shared.egress.lock().unwrap_or_else(|e| e.into_inner());
        let finish_ns = match &mut eg.bucket {
            Some(bucket) => match bucket.admit(now_ns, data.len()) {
                Some(f) => f,
                None => {
                    stats.up_queue_drops.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            },
            None => now_ns,
        };
        stats.up_packets.fetch_add(1, Ordering::Relaxed);
        stats
            .up_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        if stats.up_packets.load(Ordering::Relaxed) == 1 {
            let start = finish_ns.saturating_sub(
                shared
                    .current_shape()
                    .up_bps
                    .map_or(0, |r| tx_ns(data.len() as u64, r)),
            );
            stats.up_first_ns.store(start, Ordering::Relaxed);
        }
        stats.up_last_ns.store(finish_ns, Ordering::Relaxed);
        let shape = shared.current_shape();
        if shape.loss > 0.0 && eg.rng.random::<f64>() < shape.loss {
            stats.up_lost.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut delay = shape.delay;
        if !shape.jitter.is_zero() {
            let j = shape.jitter.as_secs_f64();
            let d = shape.delay.as_secs_f64() + eg.rng.random_range(-j..=j);
            delay = Duration::from_secs_f64(d.max(0.0));
        }
        let at = (shared.origin + Duration::from_nanos(finish_ns) + delay).max(eg.last_release);
        eg.last_release = at;
        eg.queue.push_back(Datagram {
            at,
            addr,
            data: data.to_vec(),
        });
        drop(eg);
        shared.egress_ready.notify_one();
    }
}

impl Shared {
    fn current_shape(&self) -> LinkShape {
        self.shape.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_shape(&self, shape: LinkShape) -> Result<()> {
        let shape = shape.validate()?;
        {
            // Lock order: egress, then shape (as in `send_one`).
            let mut eg = self.egress.lock().unwrap_or_else(|e| e.into_inner());
            let mut cur = self.shape.lock().unwrap_or_else(|e| e.into_inner());
            eg.bucket = shape.up_bps.map(|r| Bucket::for_rate(r, shape.queue));
            if shape.seed != cur.seed {
                eg.rng = ChaCha8Rng::seed_from_u64(shape.seed);
            }
            *cur = shape;
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }
}

/// Shaped sockets alive in this process (weak: dropping a socket removes it).
static LIVE: Mutex<Vec<Weak<Shared>>> = Mutex::new(Vec::new());

fn register(shared: &Arc<Shared>) {
    let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    live.retain(|w| w.strong_count() > 0);
    live.push(Arc::downgrade(shared));
}

/// Changes the shape of every live [`ShapedSocket`] of this process; returns how many. For a
/// process with one shaped peer (a `swarm join` child of an experiment) whose socket sits
/// inside the transport. The shape is validated first: on error nothing changes.
pub fn reshape_process(shape: &LinkShape) -> Result<usize> {
    let shape = shape.clone().validate()?;
    let live: Vec<Arc<Shared>> = {
        let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
        live.retain(|w| w.strong_count() > 0);
        live.iter().filter_map(Weak::upgrade).collect()
    };
    for s in &live {
        s.set_shape(shape.clone())?;
    }
    Ok(live.len())
}

async fn egress_task(io: Arc<tokio::net::UdpSocket>, shared: Arc<Shared>) {
    loop {
        let next = {
            let eg = shared.egress.lock().unwrap_or_else(|e| e.into_inner());
            eg.queue.front().map(|d| d.at)
        };
        match next {
            None => shared.egress_ready.notified().await,
            Some(at) if at > Instant::now() => {
                // Packets are queued in release order, so only the head can be due first.
                tokio::time::sleep_until(at).await;
            }
            Some(_) => {
                let d = {
                    let mut eg = shared.egress.lock().unwrap_or_else(|e| e.into_inner());
                    eg.queue.pop_front()
                };
                if let Some(d) = d
                    && let Err(e) = io.send_to(&d.data, d.addr).await
                {
                    // Like a lossy link: the datagram is gone, quinn will notice.
                    tracing::debug!(error = %e, addr = %d.addr, "shaped send failed");
                }
            }
        }
    }
}

async fn ingress_task(io: Arc<tokio::net::UdpSocket>, shared: Arc<Shared>) {
    let down_bucket = |s: &LinkShape| s.down_bps.map(|r| Bucket::for_rate(r, s.queue));
    let mut generation = shared.generation.load(Ordering::Acquire);
    let mut bucket = down_bucket(&shared.current_shape());
    let mut pending: VecDeque<Datagram> = VecDeque::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let stats = shared.stats.clone();
    loop {
        let due = pending.front().map(|d| d.at);
        tokio::select! {
            received = io.recv_from(&mut buf) => {
                let (len, addr) = match received {
                    Ok(r) => r,
                    Err(e) => {
                        // ICMP errors (peer gone) surface here on some systems; keep serving.
                        tracing::debug!(error = %e, "shaped recv failed");
                        continue;
                    }
                };
                let now = Instant::now();
                let g = shared.generation.load(Ordering::Acquire);
                if g != generation {
                    generation = g;
                    bucket = down_bucket(&shared.current_shape());
                }
                let at = match &mut bucket {
                    Some(b) => {
                        let now_ns = now.saturating_duration_since(shared.origin).as_nanos() as u64;
                        match b.admit(now_ns, len) {
                            Some(f) => shared.origin + Duration::from_nanos(f),
                            None => {
                                stats.down_queue_drops.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                        }
                    }
                    None => now,
                };
                pending.push_back(Datagram { at, addr, data: buf[..len].to_vec() });
            }
            _ = sleep_until_opt(due) => {}
        }
        let now = Instant::now();
        let mut moved = false;
        while pending.front().is_some_and(|d| d.at <= now) {
            let d = pending.pop_front().expect("front exists");
            stats.down_packets.fetch_add(1, Ordering::Relaxed);
            stats
                .down_bytes
                .fetch_add(d.data.len() as u64, Ordering::Relaxed);
            let mut ready = shared.ready.lock().unwrap_or_else(|e| e.into_inner());
            ready.0.push_back(d);
            moved = true;
        }
        if moved {
            let waker = shared
                .ready
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .1
                .take();
            if let Some(w) = waker {
                w.wake();
            }
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[derive(Debug)]
struct AlwaysWritable;

impl UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context) -> Poll<io::Result<()>> {
        // Sends never block: the shaper queues or drops, like a router.
        Poll::Ready(Ok(()))
    }
}

impl AsyncUdpSocket for ShapedSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        match transmit.segment_size {
            Some(size) if size > 0 => {
                for chunk in transmit.contents.chunks(size) {
                    self.send_one(transmit.destination, chunk);
                }
            }
            _ => self.send_one(transmit.destination, transmit.contents),
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut ready = self.shared.ready.lock().unwrap_or_else(|e| e.into_inner());
        let mut n = 0;
        while n < bufs.len().min(meta.len()) {
            let Some(d) = ready.0.pop_front() else { break };
            let len = d.data.len().min(bufs[n].len());
            bufs[n][..len].copy_from_slice(&d.data[..len]);
            meta[n] = RecvMeta {
                addr: d.addr,
                len,
                stride: len,
                ecn: None,
                dst_ip: None,
            };
            n += 1;
        }
        if n > 0 {
            return Poll::Ready(Ok(n));
        }
        ready.1 = Some(cx.waker().clone());
        Poll::Pending
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.local_addr()
    }

    fn may_fragment(&self) -> bool {
        // Loopback and our queues carry whole datagrams; let quinn probe the path MTU.
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_form() {
        let s: LinkShape = "up=20mbit,down=80mbit,delay=30ms,jitter=5ms,loss=0.1%,seed=7"
            .parse()
            .unwrap();
        assert_eq!(s.up_bps, Some(20_000_000));
        assert_eq!(s.down_bps, Some(80_000_000));
        assert_eq!(s.delay, Duration::from_millis(30));
        assert_eq!(s.jitter, Duration::from_millis(5));
        assert!((s.loss - 0.001).abs() < 1e-12);
        assert_eq!(s.seed, 7);
        let round: LinkShape = s.to_string().parse().unwrap();
        assert_eq!(round, s);
        let r: LinkShape = "rate=1.5gbit".parse().unwrap();
        assert_eq!(r.up_bps, Some(1_500_000_000));
        assert_eq!("".parse::<LinkShape>().unwrap(), LinkShape::default());
    }

    #[test]
    fn bad_shapes_say_why() {
        for (text, needle) in [
            ("up=20", ""),
            ("up=fast", "no number"),
            ("up=20furlongs", "rate unit"),
            ("delay=3h", "duration unit"),
            ("loss=100%", "loss must be"),
            ("loss=-1%", "no number"),
            ("speed=1", "unknown key"),
            ("up", "key=value"),
            ("up=0mbit", "out of range"),
        ] {
            match text.parse::<LinkShape>() {
                Ok(s) if needle.is_empty() => assert_eq!(s.up_bps, Some(20)),
                Ok(s) => panic!("`{text}` parsed as {s}"),
                Err(e) => assert!(e.to_string().contains(needle), "`{text}`: {e}"),
            }
        }
    }

    #[test]
    fn bucket_delivers_its_rate_exactly_when_saturated() {
        // 20 Mbit/s, 1200-byte packets offered at 40 Mbit/s for 2 s of virtual time.
        let rate = 20_000_000u64;
        let mut b = Bucket::for_rate(rate, Duration::from_millis(100));
        let gap = tx_ns(1200, 40_000_000);
        let (mut admitted, mut dropped, mut last) = (0u64, 0u64, 0u64);
        let mut t = 1_000_000_000u64;
        while t < 3_000_000_000 {
            match b.admit(t, 1200) {
                Some(f) => {
                    admitted += 1200;
                    last = f;
                }
                None => dropped += 1,
            }
            t += gap;
        }
        let rate_seen = admitted as f64 * 8.0 / ((last - 1_000_000_000) as f64 * 1e-9);
        assert!((rate_seen / rate as f64 - 1.0).abs() < 0.01, "{rate_seen}");
        assert!(dropped > 0, "an overloaded bucket must drop");
        // The queue never holds more than its limit (100 ms at 20 Mbit/s = 250 kB).
        assert!(b.backlog_bytes(t) <= 250_000);
    }

    #[test]
    fn bucket_passes_a_small_burst_then_paces() {
        let mut b = Bucket::new(8_000_000, 3000, 1_000_000); // 1 byte per us
        let now = 10_000_000_000;
        assert_eq!(b.admit(now, 1500), Some(now));
        assert_eq!(b.admit(now, 1500), Some(now));
        // Credit used up: the third packet waits its full transmission time.
        assert_eq!(b.admit(now, 1500), Some(now + 1_500_000));
        // An idle link regains at most `burst` of credit.
        let later = now + 1_000_000_000;
        assert_eq!(b.admit(later, 3000), Some(later));
        assert_eq!(b.admit(later, 1000), Some(later + 1_000_000));
    }

    fn send_n(sock: &ShapedSocket, to: SocketAddr, n: usize) {
        let data = [7u8; 200];
        for _ in 0..n {
            let t = Transmit {
                destination: to,
                ecn: None,
                contents: &data,
                segment_size: None,
                src_ip: None,
            };
            sock.try_send(&t).unwrap();
        }
    }

    #[tokio::test]
    async fn a_live_link_can_be_reshaped() {
        let bind = || std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let sink = bind();
        let to = sink.local_addr().unwrap();
        let sock = ShapedSocket::new(bind(), "delay=1ms".parse().unwrap()).unwrap();
        send_n(&sock, to, 100);
        assert_eq!(sock.stats().snapshot().up_lost, 0);
        // Degrade: half the packets now vanish (seeded draws, so the count is fixed).
        sock.set_shape("delay=1ms,loss=50%,seed=3".parse().unwrap())
            .unwrap();
        assert!((sock.shape().loss - 0.5).abs() < 1e-12);
        send_n(&sock, to, 400);
        let lost = sock.stats().snapshot().up_lost;
        assert!((120..280).contains(&lost), "lost {lost} of 400");
        // A bad shape changes nothing.
        let bad = LinkShape {
            loss: 2.0,
            ..LinkShape::default()
        };
        assert!(sock.set_shape(bad.clone()).is_err());
        assert!(reshape_process(&bad).is_err());
        assert_eq!(sock.shape().seed, 3);
        // Every shaped socket of the process: this one (no other unit test of this crate shapes).
        let n = reshape_process(&"up=1gbit,seed=9".parse().unwrap()).unwrap();
        assert!(n >= 1);
        assert_eq!(sock.shape().up_bps, Some(1_000_000_000));
        assert_eq!(sock.shape().loss, 0.0);
        let before = sock.stats().snapshot();
        send_n(&sock, to, 50);
        let after = sock.stats().snapshot();
        assert_eq!(after.up_lost, before.up_lost, "loss is gone again");
    }

    #[test]
    fn bucket_tail_drops_beyond_its_queue() {
        let mut b = Bucket::new(8_000_000, 0, 10_000);
        let now = 5_000_000_000;
        let admitted = (0..20).filter(|_| b.admit(now, 1000).is_some()).count();
        assert_eq!(admitted, 10);
        // After draining for 5 ms, 5 packets fit again.
        let later = now + 5_000_000;
        let again = (0..20).filter(|_| b.admit(later, 1000).is_some()).count();
        assert_eq!(again, 5);
    }
}
