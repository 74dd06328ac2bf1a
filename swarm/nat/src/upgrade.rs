//! When to try replacing a relayed connection with a direct (or punched) one.
//!
//! A connection goes through a relay because no direct path could be made when it was opened.
//! That can change: the peer's NAT is re-checked and found punchable, a punch that failed for a
//! transient reason would now succeed, an operator forwards a port. The network layer lists its
//! relayed connections at every tick, each with a fingerprint of what it knows about the path
//! (both sides' reachability and the remote's announced addresses) and whether a direct path is
//! possible by those verdicts; this schedule says which to try now.
//!
//! - A connection whose verdicts allow a direct path is tried `first` after it is seen, then
//!   again with the wait doubling up to `max` (a failing attempt costs a few packets and, for a
//!   punch, the coordinator's help: it must stay rare).
//! - One whose verdicts rule a direct path out (a symmetric or blocked side) is not tried until
//!   its fingerprint changes.
//! - A changed fingerprint (a new verdict, new addresses) makes it due at once, backoff reset.
//! - At most one attempt per peer is in flight.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Bounds of the retry schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpgradeConfig {
    /// Wait before the first attempt on a newly relayed connection.
    pub first: Duration,
    /// Longest wait between attempts.
    pub max: Duration,
}

impl Default for UpgradeConfig {
    fn default() -> Self {
        UpgradeConfig {
            first: Duration::from_secs(30),
            max: Duration::from_secs(600),
        }
    }
}

/// One relayed connection as the network layer sees it at a tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Relayed<K> {
    /// The peer at the other end.
    pub peer: K,
    /// Changes whenever anything the path depends on changes (verdicts, addresses).
    pub fingerprint: u64,
    /// Whether the verdicts allow a direct or punched path at all.
    pub direct_possible: bool,
}

#[derive(Debug, Clone)]
struct Entry {
    fingerprint: u64,
    direct_possible: bool,
    next: Option<Instant>,
    wait: Duration,
    in_flight: bool,
}

/// The schedule (see the module doc).
#[derive(Debug, Clone)]
pub struct Upgrades<K> {
    cfg: UpgradeConfig,
    peers: HashMap<K, Entry>,
}

impl<K: Copy + Eq + Hash + Ord> Upgrades<K> {
    /// No relayed connection tracked yet.
    pub fn new(cfg: UpgradeConfig) -> Upgrades<K> {
        Upgrades {
            cfg,
            peers: HashMap::new(),
        }
    }

    /// The relayed connections now. Peers no longer listed (upgraded, closed) are forgotten.
    pub fn sync(&mut self, relayed: &[Relayed<K>], now: Instant) {
        self.peers
            .retain(|k, _| relayed.iter().any(|r| r.peer == *k));
        for r in relayed {
            let cfg = self.cfg;
            let e = self.peers.entry(r.peer).or_insert_with(|| Entry {
                fingerprint: r.fingerprint,
                direct_possible: r.direct_possible,
                next: r.direct_possible.then(|| now + cfg.first),
                wait: cfg.first,
                in_flight: false,
            });
            if e.fingerprint != r.fingerprint {
                e.fingerprint = r.fingerprint;
                e.direct_possible = r.direct_possible;
                e.wait = cfg.first;
                e.next = r.direct_possible.then_some(now);
            }
        }
    }

    /// The next peer to try now, if any (marked in flight until [`Upgrades::handle_result`]).
    /// Ties go to the smallest key, so the order is deterministic.
    pub fn poll(&mut self, now: Instant) -> Option<K> {
        let k = self
            .peers
            .iter()
            .filter(|(_, e)| !e.in_flight && e.direct_possible && e.next.is_some_and(|t| t <= now))
            .map(|(k, _)| *k)
            .min()?;
        if let Some(e) = self.peers.get_mut(&k) {
            e.in_flight = true;
        }
        Some(k)
    }

    /// When [`Upgrades::poll`] next has something (`None`: nothing scheduled).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.peers
            .values()
            .filter(|e| !e.in_flight && e.direct_possible)
            .filter_map(|e| e.next)
            .min()
    }

    /// The attempt on `peer` ended. A success is forgotten (the next [`Upgrades::sync`] no longer
    /// lists it); a failure waits twice as long as before, up to `max`.
    pub fn handle_result(&mut self, peer: K, upgraded: bool, now: Instant) {
        let cfg = self.cfg;
        if upgraded {
            self.peers.remove(&peer);
            return;
        }
        if let Some(e) = self.peers.get_mut(&peer) {
            e.in_flight = false;
            e.wait = (e.wait * 2).min(cfg.max);
            e.next = Some(now + e.wait);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> UpgradeConfig {
        UpgradeConfig {
            first: Duration::from_secs(10),
            max: Duration::from_secs(60),
        }
    }

    fn relayed(peer: u32, fingerprint: u64, direct_possible: bool) -> Relayed<u32> {
        Relayed {
            peer,
            fingerprint,
            direct_possible,
        }
    }

    #[test]
    fn a_possible_upgrade_is_tried_after_the_first_wait_then_backs_off_to_the_cap() {
        let t0 = Instant::now();
        let mut u = Upgrades::new(cfg());
        u.sync(&[relayed(1, 7, true)], t0);
        assert_eq!(u.poll(t0), None);
        assert_eq!(u.poll_timeout(), Some(t0 + Duration::from_secs(10)));
        let mut now = t0 + Duration::from_secs(10);
        let mut waits = Vec::new();
        for _ in 0..5 {
            assert_eq!(u.poll(now), Some(1));
            // In flight: not offered again, and no timer for it.
            assert_eq!(u.poll(now), None);
            assert_eq!(u.poll_timeout(), None);
            u.handle_result(1, false, now);
            let next = u.poll_timeout().unwrap();
            waits.push((next - now).as_secs());
            now = next;
        }
        assert_eq!(waits, vec![20, 40, 60, 60, 60]);
    }

    #[test]
    fn a_ruled_out_path_waits_for_a_new_fingerprint_which_makes_it_due_at_once() {
        let t0 = Instant::now();
        let mut u = Upgrades::new(cfg());
        u.sync(&[relayed(1, 7, false)], t0);
        let late = t0 + Duration::from_secs(3600);
        assert_eq!(u.poll(late), None);
        assert_eq!(u.poll_timeout(), None);
        // Same fingerprint: still nothing.
        u.sync(&[relayed(1, 7, false)], late);
        assert_eq!(u.poll(late), None);
        // The peer was re-checked and is punchable now.
        u.sync(&[relayed(1, 8, true)], late);
        assert_eq!(u.poll(late), Some(1));
    }

    #[test]
    fn a_new_fingerprint_resets_the_backoff() {
        let t0 = Instant::now();
        let mut u = Upgrades::new(cfg());
        u.sync(&[relayed(1, 7, true)], t0);
        let mut now = t0 + Duration::from_secs(10);
        for _ in 0..3 {
            assert_eq!(u.poll(now), Some(1));
            u.handle_result(1, false, now);
            now = u.poll_timeout().unwrap();
        }
        u.sync(&[relayed(1, 9, true)], now);
        assert_eq!(u.poll(now), Some(1));
        u.handle_result(1, false, now);
        assert_eq!(u.poll_timeout(), Some(now + Duration::from_secs(20)));
    }

    #[test]
    fn success_and_disappearance_forget_the_peer_and_ties_go_to_the_smallest() {
        let t0 = Instant::now();
        let mut u = Upgrades::new(cfg());
        u.sync(&[relayed(3, 1, true), relayed(2, 1, true)], t0);
        let now = t0 + Duration::from_secs(10);
        assert_eq!(u.poll(now), Some(2));
        assert_eq!(u.poll(now), Some(3));
        u.handle_result(2, true, now);
        u.handle_result(3, false, now);
        // 2 upgraded (no longer relayed); 3 closed meanwhile.
        u.sync(&[], now);
        assert_eq!(u.poll_timeout(), None);
        assert_eq!(u.poll(now + Duration::from_secs(3600)), None);
        // 3 relayed again later: a fresh entry, first wait again.
        u.sync(&[relayed(3, 1, true)], now);
        assert_eq!(u.poll_timeout(), Some(now + Duration::from_secs(10)));
    }
}
