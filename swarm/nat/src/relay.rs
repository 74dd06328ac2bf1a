//! A relay's admission control and byte accounting.
//!
//! A relay forwards opaque QUIC datagrams between two peers that cannot reach each other (TLS
//! stays end to end, the relay sees ciphertext). It spends its own bandwidth, so it bounds that:
//!
//! - a **circuit** (an ordered pair of peers) must be opened first; at most `max_circuits` in all
//!   and `max_circuits_per_peer` touching one peer;
//! - every forwarded byte is taken from a **total** token bucket (the relay's byte budget per
//!   second, with a burst) and from the **sender's** bucket (the per-peer cap), so one peer
//!   cannot starve the others;
//! - a datagram over either budget is dropped, not queued: QUIC's congestion control sees loss
//!   and slows down, which is the back-pressure a relay wants;
//! - each peer's relayed bytes (sent and received) and drops are counted for reports and for the
//!   router, which charges relayed hops their real cost.
//!
//! Sans-IO: time is passed in.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Limits of a relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RelayConfig {
    /// Bytes per second the relay forwards in all.
    pub bytes_per_s: u64,
    /// Bytes the relay may forward at once above its rate (the bucket's size).
    pub burst_bytes: u64,
    /// Bytes per second one peer may send through the relay.
    pub peer_bytes_per_s: u64,
    /// The per-peer bucket's size.
    pub peer_burst_bytes: u64,
    /// Circuits open at once.
    pub max_circuits: usize,
    /// Circuits touching one peer.
    pub max_circuits_per_peer: usize,
}

impl Default for RelayConfig {
    /// A trainer relaying within a home uplink: 4 MB/s in all, 1 MB/s per peer.
    fn default() -> Self {
        RelayConfig::with_budget(4_000_000)
    }
}

impl RelayConfig {
    /// A relay forwarding `bytes_per_s` in all, of which one peer may send a quarter; bursts of
    /// a quarter second (an eighth per peer); 64 circuits, 8 per peer.
    pub fn with_budget(bytes_per_s: u64) -> RelayConfig {
        let bytes_per_s = bytes_per_s.max(1);
        RelayConfig {
            bytes_per_s,
            burst_bytes: (bytes_per_s / 4).max(64 * 1024),
            peer_bytes_per_s: (bytes_per_s / 4).max(1),
            peer_burst_bytes: (bytes_per_s / 8).max(32 * 1024),
            max_circuits: 64,
            max_circuits_per_peer: 8,
        }
    }

    /// [`RelayConfig::with_budget`] in Mbit/s; `None` for 0 (no relay).
    pub fn from_mbit(mbit: f64) -> Option<RelayConfig> {
        (mbit > 0.0 && mbit.is_finite())
            .then(|| RelayConfig::with_budget((mbit * 125_000.0) as u64))
    }
}

/// Why a circuit was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RelayRefusal {
    /// Both ends of the circuit are the same peer.
    #[error("a peer cannot relay to itself")]
    SamePeer,
    /// The relay's circuit limit is reached.
    #[error("the relay has its maximum number of circuits open")]
    TooManyCircuits,
    /// One end already has its per-peer circuit limit.
    #[error("the peer has its maximum number of relay circuits open")]
    PeerCircuitCap,
}

/// What to do with one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Forward it now.
    Forward,
    /// No circuit between the two peers.
    NoCircuit,
    /// Over the sender's per-peer cap.
    PeerCap,
    /// Over the relay's total budget.
    Budget,
}

/// Bytes a peer moved through the relay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RelayUsage {
    /// Bytes it sent that were forwarded.
    pub sent: u64,
    /// Bytes forwarded to it.
    pub received: u64,
    /// Bytes it sent that were dropped (over a budget).
    pub dropped: u64,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: u64,
    cap: u64,
    rate: u64,
    last: Instant,
}

impl Bucket {
    fn new(rate: u64, cap: u64, now: Instant) -> Bucket {
        Bucket {
            tokens: cap,
            cap,
            rate,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last);
        // Whole tokens only; keep the remainder's time so slow refills are not lost.
        let add = (self.rate as u128 * dt.as_nanos() / 1_000_000_000) as u64;
        if add > 0 {
            self.tokens = self.tokens.saturating_add(add).min(self.cap);
            let used =
                Duration::from_nanos((add as u128 * 1_000_000_000 / self.rate as u128) as u64);
            self.last += used.min(dt);
        }
        if self.tokens == self.cap {
            self.last = now.max(self.last);
        }
    }
}

#[derive(Debug, Clone)]
struct PeerState {
    bucket: Bucket,
    usage: RelayUsage,
    circuits: usize,
}

/// A relay's quotas and counters, keyed by peer id `K`.
#[derive(Debug, Clone)]
pub struct RelayQuota<K: Ord + Clone> {
    cfg: RelayConfig,
    total: Bucket,
    peers: BTreeMap<K, PeerState>,
    /// Unordered pairs (smaller key first) -> tunnels open between them (a reconnect may open a
    /// second before the first is closed).
    circuits: BTreeMap<(K, K), usize>,
}

impl<K: Ord + Clone> RelayQuota<K> {
    /// A relay with full buckets at `now`.
    pub fn new(cfg: RelayConfig, now: Instant) -> RelayQuota<K> {
        RelayQuota {
            cfg,
            total: Bucket::new(cfg.bytes_per_s, cfg.burst_bytes, now),
            peers: BTreeMap::new(),
            circuits: BTreeMap::new(),
        }
    }

    /// Its quotas.
    pub fn config(&self) -> &RelayConfig {
        &self.cfg
    }

    fn pair(a: &K, b: &K) -> (K, K) {
        if a <= b {
            (a.clone(), b.clone())
        } else {
            (b.clone(), a.clone())
        }
    }

    fn peer(&mut self, k: &K, now: Instant) -> &mut PeerState {
        let cfg = self.cfg;
        self.peers.entry(k.clone()).or_insert_with(|| PeerState {
            bucket: Bucket::new(cfg.peer_bytes_per_s, cfg.peer_burst_bytes, now),
            usage: RelayUsage::default(),
            circuits: 0,
        })
    }

    /// Opens a circuit between `a` and `b`. Opening an open pair again counts one more tunnel
    /// between them (at most `max_circuits_per_peer`); each `open` needs its `close`.
    pub fn open(&mut self, a: &K, b: &K, now: Instant) -> Result<(), RelayRefusal> {
        if a == b {
            return Err(RelayRefusal::SamePeer);
        }
        let key = Self::pair(a, b);
        if let Some(n) = self.circuits.get_mut(&key) {
            if *n >= self.cfg.max_circuits_per_peer {
                return Err(RelayRefusal::PeerCircuitCap);
            }
            *n += 1;
            return Ok(());
        }
        if self.circuits.len() >= self.cfg.max_circuits {
            return Err(RelayRefusal::TooManyCircuits);
        }
        let cap = self.cfg.max_circuits_per_peer;
        if self.peer(a, now).circuits >= cap || self.peer(b, now).circuits >= cap {
            return Err(RelayRefusal::PeerCircuitCap);
        }
        self.peer(a, now).circuits += 1;
        self.peer(b, now).circuits += 1;
        self.circuits.insert(key, 1);
        Ok(())
    }

    /// Closes one tunnel between `a` and `b`; the circuit goes with the last. Counters stay.
    pub fn close(&mut self, a: &K, b: &K) {
        let key = Self::pair(a, b);
        if let Some(n) = self.circuits.get_mut(&key)
            && *n > 1
        {
            *n -= 1;
            return;
        }
        if self.circuits.remove(&key).is_some() {
            for k in [a, b] {
                if let Some(p) = self.peers.get_mut(k) {
                    p.circuits = p.circuits.saturating_sub(1);
                }
            }
        }
    }

    /// Closes every circuit of `k` (it left).
    pub fn close_peer(&mut self, k: &K) {
        let gone: Vec<(K, K)> = self
            .circuits
            .keys()
            .filter(|(a, b)| a == k || b == k)
            .cloned()
            .collect();
        for (a, b) in gone {
            self.circuits.insert((a.clone(), b.clone()), 1);
            self.close(&a, &b);
        }
    }

    /// Whether a circuit joins `a` and `b` (either order).
    pub fn has_circuit(&self, a: &K, b: &K) -> bool {
        self.circuits.contains_key(&Self::pair(a, b))
    }

    /// Decides on one datagram of `bytes` from `from` to `to` and counts it.
    pub fn admit(&mut self, from: &K, to: &K, bytes: u64, now: Instant) -> Admit {
        if !self.has_circuit(from, to) {
            return Admit::NoCircuit;
        }
        self.total.refill(now);
        let total_ok = self.total.tokens >= bytes;
        let sender = self.peer(from, now);
        sender.bucket.refill(now);
        if sender.bucket.tokens < bytes {
            sender.usage.dropped += bytes;
            return Admit::PeerCap;
        }
        if !total_ok {
            sender.usage.dropped += bytes;
            return Admit::Budget;
        }
        sender.bucket.tokens -= bytes;
        sender.usage.sent += bytes;
        self.total.tokens -= bytes;
        self.peer(to, now).usage.received += bytes;
        Admit::Forward
    }

    /// What `k` moved through the relay so far.
    pub fn usage(&self, k: &K) -> RelayUsage {
        self.peers.get(k).map(|p| p.usage).unwrap_or_default()
    }

    /// Every peer's usage, by key.
    pub fn usages(&self) -> impl Iterator<Item = (&K, RelayUsage)> {
        self.peers.iter().map(|(k, p)| (k, p.usage))
    }

    /// Bytes forwarded in all.
    pub fn forwarded(&self) -> u64 {
        self.peers.values().map(|p| p.usage.sent).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg() -> RelayConfig {
        RelayConfig {
            bytes_per_s: 10_000,
            burst_bytes: 5_000,
            peer_bytes_per_s: 4_000,
            peer_burst_bytes: 2_000,
            max_circuits: 3,
            max_circuits_per_peer: 2,
        }
    }

    #[test]
    fn datagrams_need_an_open_circuit() {
        let t = Instant::now();
        let mut q = RelayQuota::new(cfg(), t);
        assert_eq!(q.admit(&1, &2, 100, t), Admit::NoCircuit);
        q.open(&1, &2, t).unwrap();
        assert_eq!(q.admit(&2, &1, 100, t), Admit::Forward, "either direction");
        q.close(&2, &1);
        assert_eq!(q.admit(&1, &2, 100, t), Admit::NoCircuit);
        assert_eq!(q.usage(&2).sent, 100);
        assert_eq!(q.usage(&1).received, 100);
    }

    #[test]
    fn circuit_limits_hold() {
        let t = Instant::now();
        let mut q = RelayQuota::new(cfg(), t);
        assert_eq!(q.open(&1, &1, t), Err(RelayRefusal::SamePeer));
        q.open(&1, &2, t).unwrap();
        q.open(&1, &2, t).unwrap(); // a second tunnel of the same pair (a reconnect)
        assert_eq!(q.open(&2, &1, t), Err(RelayRefusal::PeerCircuitCap));
        q.close(&1, &2);
        assert!(
            q.has_circuit(&1, &2),
            "one tunnel of the pair is still open"
        );
        q.open(&1, &3, t).unwrap();
        assert_eq!(q.open(&1, &4, t), Err(RelayRefusal::PeerCircuitCap));
        q.open(&4, &5, t).unwrap();
        assert_eq!(q.open(&6, &7, t), Err(RelayRefusal::TooManyCircuits));
        q.close_peer(&1);
        assert!(!q.has_circuit(&1, &2) && !q.has_circuit(&3, &1));
        q.open(&6, &7, t).unwrap();
        q.open(&1, &6, t).unwrap();
    }

    #[test]
    fn the_per_peer_cap_drops_a_greedy_sender_but_not_the_others() {
        let t = Instant::now();
        let mut q = RelayQuota::new(cfg(), t);
        q.open(&1, &2, t).unwrap();
        q.open(&3, &2, t).unwrap();
        let mut forwarded = 0;
        for _ in 0..10 {
            if q.admit(&1, &2, 500, t) == Admit::Forward {
                forwarded += 500;
            }
        }
        assert_eq!(forwarded, 2_000, "the burst, then drops");
        assert_eq!(q.admit(&1, &2, 500, t), Admit::PeerCap);
        assert_eq!(q.usage(&1).dropped, 3_500);
        assert_eq!(q.admit(&3, &2, 500, t), Admit::Forward);
        // Half a second refills 2,000 bytes of peer 1's cap.
        let t1 = t + Duration::from_millis(500);
        assert_eq!(q.admit(&1, &2, 2_000, t1), Admit::Forward);
        assert_eq!(q.admit(&1, &2, 1, t1), Admit::PeerCap);
    }

    #[test]
    fn the_total_budget_caps_everyone() {
        let t = Instant::now();
        let mut q = RelayQuota::new(cfg(), t);
        q.open(&1, &2, t).unwrap();
        q.open(&3, &4, t).unwrap();
        q.open(&5, &6, t).unwrap();
        assert_eq!(q.admit(&1, &2, 2_000, t), Admit::Forward);
        assert_eq!(q.admit(&3, &4, 2_000, t), Admit::Forward);
        assert_eq!(
            q.admit(&5, &6, 2_000, t),
            Admit::Budget,
            "5,000 burst in all"
        );
        assert_eq!(q.admit(&5, &6, 1_000, t), Admit::Forward);
        assert_eq!(q.forwarded(), 5_000);
    }

    proptest! {
        /// Whatever the traffic, forwarded bytes never exceed what the buckets allow: the burst
        /// plus the rate times the elapsed time, in all and per peer.
        #[test]
        fn forwarding_never_exceeds_the_budgets(
            sends in proptest::collection::vec((0u8..4, 0u8..4, 1u64..3_000, 0u64..50), 1..300)
        ) {
            let c = cfg();
            let t0 = Instant::now();
            let mut q = RelayQuota::new(RelayConfig { max_circuits: 16, max_circuits_per_peer: 4, ..c }, t0);
            for a in 0u8..4 { for b in (a + 1)..4 { q.open(&a, &b, t0).unwrap(); } }
            let mut now = t0;
            for (from, to, bytes, gap_ms) in sends {
                now += Duration::from_millis(gap_ms);
                let _ = q.admit(&from, &to, bytes, now);
            }
            let secs = (now - t0).as_secs_f64();
            prop_assert!(q.forwarded() as f64 <= c.burst_bytes as f64 + c.bytes_per_s as f64 * secs + 1.0);
            for (_, u) in q.usages() {
                prop_assert!(u.sent as f64 <= c.peer_burst_bytes as f64 + c.peer_bytes_per_s as f64 * secs + 1.0);
            }
            let sent: u64 = q.usages().map(|(_, u)| u.sent).sum();
            let received: u64 = q.usages().map(|(_, u)| u.received).sum();
            prop_assert_eq!(sent, received);
        }
    }
}
