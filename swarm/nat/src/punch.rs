//! One side of a coordinated hole punch (after libp2p DCUtR and its QUIC transport).
//!
//! A coordinator both peers are connected to (the trainer) sends each a start message with the
//! other's candidate addresses and a delay, chosen by [`start_delays`] so both begin at the same
//! moment. Then:
//!
//! - the **prober** sends a few raw UDP packets from its endpoint's socket to the dialer's
//!   candidates: its NAT now expects packets from them;
//! - the **dialer** dials the prober's candidates with QUIC; its first Initial packet opens its own
//!   NAT, and a retransmission passes the prober's NAT once the probes opened it.
//!
//! A connection proven by TLS to be from the expected peer ends the punch. Attempts are bounded in
//! count and time; the caller falls back to a relay on [`PunchOutcome::Failed`].
//!
//! Sans-IO: the caller passes `now` to every method and performs the returned [`PunchAction`]s.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Which half of the punch this side plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PunchRole {
    /// Dials the other side's candidates with QUIC.
    Dialer,
    /// Sends raw UDP probes to the other side's candidates, then accepts its connection.
    Prober,
}

/// Bounds of a punch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PunchConfig {
    /// Attempts before giving up (each re-dials / re-probes every candidate).
    pub attempts: u32,
    /// How long one attempt waits for a connection.
    pub attempt_timeout: Duration,
    /// Gap between probe rounds of the prober.
    pub probe_interval: Duration,
    /// Probe rounds per attempt.
    pub probes_per_attempt: u32,
}

impl Default for PunchConfig {
    fn default() -> Self {
        PunchConfig {
            attempts: 3,
            attempt_timeout: Duration::from_secs(3),
            probe_interval: Duration::from_millis(100),
            probes_per_attempt: 10,
        }
    }
}

/// What the caller must do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PunchAction {
    /// Send one small UDP datagram from the endpoint's socket to this address.
    Probe(SocketAddr),
    /// Dial this address with QUIC (expecting the other peer's identity).
    Dial(SocketAddr),
}

/// How a punch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PunchOutcome {
    /// A connection authenticated as the other peer, on this remote address.
    Connected {
        /// The remote address that answered.
        addr: SocketAddr,
        /// The attempt that got through (from 1).
        attempt: u32,
        /// Time from the start of the punch.
        elapsed: Duration,
    },
    /// Every attempt timed out or failed: use a relay.
    Failed {
        /// Attempts made.
        attempts: u32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting,
    Running {
        attempt: u32,
        started: Instant,
        rounds: u32,
        next_round: Instant,
    },
    Done(PunchOutcome),
}

/// One side's punch state machine.
#[derive(Debug, Clone)]
pub struct Punch {
    role: PunchRole,
    cfg: PunchConfig,
    targets: Vec<SocketAddr>,
    start_at: Instant,
    state: State,
    /// Targets whose dial failed in the current attempt.
    failed: Vec<SocketAddr>,
    queue: VecDeque<PunchAction>,
}

impl Punch {
    /// A punch toward `targets` (the other side's candidate addresses) that starts at
    /// `start_at`. No targets, or zero attempts, fails at once.
    pub fn new(
        role: PunchRole,
        cfg: PunchConfig,
        mut targets: Vec<SocketAddr>,
        start_at: Instant,
    ) -> Punch {
        targets.sort();
        targets.dedup();
        let state = if targets.is_empty() || cfg.attempts == 0 {
            State::Done(PunchOutcome::Failed { attempts: 0 })
        } else {
            State::Waiting
        };
        Punch {
            role,
            cfg,
            targets,
            start_at,
            state,
            failed: Vec::new(),
            queue: VecDeque::new(),
        }
    }

    /// Which side of the punch this is.
    pub fn role(&self) -> PunchRole {
        self.role
    }

    /// The outcome once finished.
    pub fn outcome(&self) -> Option<PunchOutcome> {
        match self.state {
            State::Done(o) => Some(o),
            _ => None,
        }
    }

    /// When [`Punch::poll`] must next be called, once it returned `None` (`None` when finished).
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Waiting => Some(self.start_at),
            State::Running {
                started,
                rounds,
                next_round,
                ..
            } => {
                let end = started + self.cfg.attempt_timeout;
                if self.role == PunchRole::Prober && rounds < self.cfg.probes_per_attempt {
                    Some(next_round.min(end))
                } else {
                    Some(end)
                }
            }
            State::Done(_) => None,
        }
    }

    /// The next action due at `now`, if any. Call until `None`, then wait for
    /// [`Punch::poll_timeout`] or an event.
    pub fn poll(&mut self, now: Instant) -> Option<PunchAction> {
        self.advance(now);
        self.queue.pop_front()
    }

    fn advance(&mut self, now: Instant) {
        match self.state {
            State::Done(_) => self.queue.clear(),
            State::Waiting => {
                if now >= self.start_at {
                    self.begin_attempt(1, now);
                }
            }
            State::Running {
                attempt,
                started,
                rounds,
                next_round,
            } => {
                if now >= started + self.cfg.attempt_timeout {
                    self.next_attempt(attempt, now);
                } else if self.role == PunchRole::Prober
                    && rounds < self.cfg.probes_per_attempt
                    && now >= next_round
                {
                    self.queue
                        .extend(self.targets.iter().map(|&t| PunchAction::Probe(t)));
                    self.state = State::Running {
                        attempt,
                        started,
                        rounds: rounds + 1,
                        next_round: now + self.cfg.probe_interval,
                    };
                }
            }
        }
    }

    fn next_attempt(&mut self, attempt: u32, now: Instant) {
        self.queue.clear();
        if attempt >= self.cfg.attempts {
            self.state = State::Done(PunchOutcome::Failed { attempts: attempt });
        } else {
            self.begin_attempt(attempt + 1, now);
        }
    }

    fn begin_attempt(&mut self, attempt: u32, now: Instant) {
        self.failed.clear();
        match self.role {
            PunchRole::Dialer => {
                self.queue
                    .extend(self.targets.iter().map(|&t| PunchAction::Dial(t)));
                self.state = State::Running {
                    attempt,
                    started: now,
                    rounds: 0,
                    next_round: now,
                };
            }
            PunchRole::Prober => {
                self.queue
                    .extend(self.targets.iter().map(|&t| PunchAction::Probe(t)));
                self.state = State::Running {
                    attempt,
                    started: now,
                    rounds: 1,
                    next_round: now + self.cfg.probe_interval,
                };
            }
        }
    }

    /// A connection authenticated as the other peer exists on `addr` (dialed by us, or accepted
    /// from it). Ends the punch.
    pub fn handle_connected(&mut self, addr: SocketAddr, now: Instant) {
        let attempt = match self.state {
            State::Running { attempt, .. } => attempt,
            State::Waiting => 1,
            State::Done(_) => return,
        };
        self.queue.clear();
        self.state = State::Done(PunchOutcome::Connected {
            addr,
            attempt,
            elapsed: now.saturating_duration_since(self.start_at),
        });
    }

    /// A dial to `addr` failed (timed out, refused, wrong identity). When every target of this
    /// attempt failed, the next attempt starts at once.
    pub fn handle_dial_failed(&mut self, addr: SocketAddr, now: Instant) {
        let State::Running { attempt, .. } = self.state else {
            return;
        };
        if self.role != PunchRole::Dialer || !self.targets.contains(&addr) {
            return;
        }
        if !self.failed.contains(&addr) {
            self.failed.push(addr);
        }
        if self.failed.len() == self.targets.len() {
            self.next_attempt(attempt, now);
        }
    }

    /// The upper bound on how long this punch can take from its start.
    pub fn max_duration(&self) -> Duration {
        self.cfg.attempt_timeout * self.cfg.attempts
    }
}

/// Delays the coordinator gives the two sides so both start together: a message to side `x`
/// arrives after about `rtt_x / 2`, so each waits for the slower one's message plus `margin`.
pub fn start_delays(rtt_a: Duration, rtt_b: Duration, margin: Duration) -> (Duration, Duration) {
    let start = rtt_a.max(rtt_b) / 2 + margin;
    (start - rtt_a / 2, start - rtt_b / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn drain(p: &mut Punch, now: Instant) -> Vec<PunchAction> {
        let mut v = Vec::new();
        for _ in 0..1000 {
            match p.poll(now) {
                Some(x) => v.push(x),
                None => return v,
            }
        }
        panic!("poll never ran dry");
    }

    /// Drives a punch with no events to its end; returns every action with its time offset.
    fn run_silent(p: &mut Punch, t0: Instant) -> Vec<(Duration, PunchAction)> {
        let mut log = Vec::new();
        let mut now = t0;
        for _ in 0..10_000 {
            for x in drain(p, now) {
                log.push((now - t0, x));
            }
            match p.poll_timeout() {
                Some(t) => now = t.max(now),
                None => return log,
            }
        }
        panic!("the punch never ended");
    }

    #[test]
    fn nothing_happens_before_the_start() {
        let t0 = Instant::now();
        let start = t0 + Duration::from_millis(500);
        let mut p = Punch::new(
            PunchRole::Dialer,
            PunchConfig::default(),
            vec![a("198.51.100.9:1")],
            start,
        );
        assert_eq!(p.poll(t0), None);
        assert_eq!(p.poll_timeout(), Some(start));
        assert_eq!(p.poll(start), Some(PunchAction::Dial(a("198.51.100.9:1"))));
        assert_eq!(p.poll(start), None);
    }

    #[test]
    fn a_silent_dialer_retries_a_bounded_number_of_times_then_fails() {
        let t0 = Instant::now();
        let cfg = PunchConfig::default();
        let targets = vec![a("198.51.100.9:1"), a("[2001:db8::9]:1")];
        let mut p = Punch::new(PunchRole::Dialer, cfg, targets, t0);
        let log = run_silent(&mut p, t0);
        let dials = log
            .iter()
            .filter(|(_, x)| matches!(x, PunchAction::Dial(_)))
            .count();
        assert_eq!(dials, 2 * cfg.attempts as usize);
        assert_eq!(
            p.outcome(),
            Some(PunchOutcome::Failed {
                attempts: cfg.attempts
            })
        );
        // Each attempt starts one timeout after the previous one.
        let starts: Vec<Duration> = log.iter().map(|(t, _)| *t).collect();
        assert_eq!(starts[2], cfg.attempt_timeout);
        assert_eq!(starts[4], cfg.attempt_timeout * 2);
        assert!(log.last().unwrap().0 < p.max_duration());
    }

    #[test]
    fn a_silent_prober_probes_in_rounds_then_fails() {
        let t0 = Instant::now();
        let cfg = PunchConfig {
            attempts: 2,
            attempt_timeout: Duration::from_secs(2),
            probe_interval: Duration::from_millis(100),
            probes_per_attempt: 5,
        };
        let mut p = Punch::new(PunchRole::Prober, cfg, vec![a("198.51.100.9:1")], t0);
        let log = run_silent(&mut p, t0);
        assert_eq!(log.len(), 10, "{log:?}");
        assert!(log.iter().all(|(_, x)| matches!(x, PunchAction::Probe(_))));
        assert_eq!(log[1].0, Duration::from_millis(100));
        assert_eq!(log[5].0, Duration::from_secs(2));
        assert_eq!(p.outcome(), Some(PunchOutcome::Failed { attempts: 2 }));
    }

    #[test]
    fn a_connection_ends_the_punch_and_records_when() {
        let t0 = Instant::now();
        let mut p = Punch::new(
            PunchRole::Prober,
            PunchConfig::default(),
            vec![a("198.51.100.9:1")],
            t0,
        );
        assert!(p.poll(t0).is_some());
        let t1 = t0 + Duration::from_millis(250);
        p.handle_connected(a("198.51.100.9:1"), t1);
        assert_eq!(p.poll(t1), None);
        assert_eq!(p.poll_timeout(), None);
        assert_eq!(
            p.outcome(),
            Some(PunchOutcome::Connected {
                addr: a("198.51.100.9:1"),
                attempt: 1,
                elapsed: Duration::from_millis(250)
            })
        );
        // Late events change nothing.
        p.handle_dial_failed(a("198.51.100.9:1"), t1);
        p.handle_connected(a("198.51.100.9:2"), t1);
        assert!(matches!(
            p.outcome(),
            Some(PunchOutcome::Connected { attempt: 1, .. })
        ));
    }

    #[test]
    fn failed_dials_start_the_next_attempt_early() {
        let t0 = Instant::now();
        let targets = vec![a("198.51.100.9:1"), a("198.51.100.9:2")];
        let mut p = Punch::new(
            PunchRole::Dialer,
            PunchConfig::default(),
            targets.clone(),
            t0,
        );
        assert_eq!(drain(&mut p, t0).len(), 2);
        let t1 = t0 + Duration::from_millis(10);
        p.handle_dial_failed(targets[0], t1);
        p.handle_dial_failed(targets[0], t1);
        assert_eq!(p.poll(t1), None, "one target still pending");
        p.handle_dial_failed(a("203.0.113.1:1"), t1); // not a target
        p.handle_dial_failed(targets[1], t1);
        assert_eq!(drain(&mut p, t1).len(), 2, "attempt 2 dials again");
        p.handle_connected(targets[1], t1);
        assert!(matches!(
            p.outcome(),
            Some(PunchOutcome::Connected { attempt: 2, .. })
        ));
    }

    #[test]
    fn no_targets_fails_at_once() {
        let p = Punch::new(
            PunchRole::Dialer,
            PunchConfig::default(),
            vec![],
            Instant::now(),
        );
        assert_eq!(p.outcome(), Some(PunchOutcome::Failed { attempts: 0 }));
    }

    #[test]
    fn start_delays_line_both_sides_up() {
        let ms = Duration::from_millis;
        let (da, db) = start_delays(ms(20), ms(100), ms(50));
        // A hears at 10 ms, B at 50 ms: both start at 100 ms.
        assert_eq!(ms(10) + da, ms(50) + db);
        assert_eq!(ms(50) + db, ms(100));
        assert_eq!(start_delays(ms(0), ms(0), ms(5)), (ms(5), ms(5)));
    }
}
