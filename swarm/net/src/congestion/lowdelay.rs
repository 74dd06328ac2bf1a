//! The low-delay congestion controller's decisions, sans IO: ACKs, losses and the time come in,
//! a congestion window comes out. The quinn glue is in the parent module.
//!
//! Model (BBR's, with the gain that matters made small): the window is the bandwidth estimate
//! times the minimum RTT plus a small *queue target* Q,
//!
//! ```text
//! window = max_bw x (min_rtt + Q),   Q = clamp(min_rtt / 2, 4 ms, 20 ms)
//! ```
//!
//! - On a saturated link at rate C the flight settles at C x (min_rtt + Q): a standing queue of
//!   Q, not the router's whole buffer. (quinn's BBR keeps 2 x BDP because its pacing-gain cycle
//!   never drains: quinn's pacer paces at 1.25 x window / srtt and ignores the controller's rate.)
//! - When the bandwidth is underestimated the window-limited send rate is
//!   max_bw x (1 + Q / min_rtt) above it, so the next rounds measure more: the window probes up by
//!   that factor per round until the link is full.
//! - Isolated losses do not shrink the window (1% random loss costs only the retransmissions); a
//!   round losing more than 10% of its packets (a shallow buffer overflowing) caps the window at
//!   0.7 x the flight that overflowed it (the most in flight over that round and the one before,
//!   or the window if smaller); each clean round whose flight reached the cap lifts it a quarter
//!   of the way back, then 1/16 beyond. The flight, not the window: a buffer the delay signal
//!   never sees, such as a busy receiver's socket buffer (it fills in microseconds while the
//!   process is not scheduled), overflows with a message smaller than the window, and a cap
//!   above the message would let every message overflow it again. Tested rounds only: the clean
//!   rounds of small messages between large ones say nothing about what the path holds. (In
//!   `swarm demo` on 2 busy cores, 374 KB activation frames into 208 KB socket buffers: about a
//!   third of the packets were dropped before, each tail drop waiting for a ~30 ms probe
//!   timeout.)
//! - Every 10 s without a new min RTT sample the window halves for 200 ms plus a round (probe
//!   RTT), so the queue drains and a path that got longer is learned.
//! - Startup doubles the window per round until the bandwidth stops growing by 25% for three
//!   rounds, the round's RTT exceeds min_rtt + Q (the queue has started to build), or loss is
//!   heavy.
//!
//! A round ends when a packet sent after the previous round ended is acknowledged, or when
//! nothing is left in flight; after such an idle point the next send starts the next round (so
//! a burst's rate is not taken over the idle gap before it). The delivery rate of a round is the
//! bytes acknowledged in it over the longer of its ACK span and the send span of those packets
//! (so a compressed burst of ACKs does not inflate it). The estimate is the largest of the last
//! 10 rounds' rates, app-limited rounds counting only when they beat it: an idle or app-limited
//! spell keeps the estimate, and one slow sample after it does not replace it.
//!
//! On a loaded host ACKs also wait for the receiving process to be scheduled. That delay does
//! not grow with the flight: the rounds that find the receiver awake measure the path, the max
//! filter keeps them through the rounds that wait, and the window stays above a message (the
//! `a_scheduling_delay_does_not_starve_the_window` test).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Startup watches the minimum of the RTT samples of the last half min RTT (at least this many
/// of them): a host stalled for a few ms delays a burst of ACKs, not half a round of them.
const STARTUP_SAMPLES: usize = 8;
/// Bound on the samples kept for that (a very fast link).
const STARTUP_SAMPLES_MAX: usize = 1024;
/// Window gains of the rounds of a probe cycle in steady state: one round 25% above the model
/// (more bandwidth shows as a faster round), one below it to drain what that queued, six at it.
/// Without this, scheduling noise of about the queue target hides the headroom the model's own
/// window gives and the estimate can stall low.
const CYCLE_GAINS: [f64; 8] = [1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0];

/// Tunables of [`LowDelay`]; the defaults are what the analysis above assumes.
#[derive(Debug, Clone, PartialEq)]
pub struct LowDelayConfig {
    /// Window before the first ACK, bytes.
    pub initial_window: u64,
    /// The queue target as a fraction of the min RTT ...
    pub queue_fraction: f64,
    /// ... clamped to this range.
    pub min_queue: Duration,
    /// Upper bound of the queue target.
    pub max_queue: Duration,
    /// A round losing more than this fraction of its bytes is congestion, not noise.
    pub loss_threshold: f64,
    /// Bandwidth samples (rounds that measured the link) the max filter holds.
    pub bw_window_samples: u64,
    /// A min RTT older than this is re-measured (probe RTT).
    pub min_rtt_window: Duration,
    /// How long probe RTT holds the window down (plus one round).
    pub probe_rtt_time: Duration,
}

impl Default for LowDelayConfig {
    fn default() -> LowDelayConfig {
        LowDelayConfig {
            // RFC 9002's recommendation for 1200-byte datagrams.
            initial_window: 14_720,
            queue_fraction: 0.5,
            min_queue: Duration::from_millis(4),
            max_queue: Duration::from_millis(20),
            loss_threshold: 0.1,
            bw_window_samples: 10,
            min_rtt_window: Duration::from_secs(10),
            probe_rtt_time: Duration::from_millis(200),
        }
    }
}

/// What one round measured (returned when it ends, for tracing).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundReport {
    /// Rounds ended so far, this one included.
    pub round: u64,
    /// Bytes acknowledged in the round.
    pub acked: u64,
    /// Bytes declared lost in the round.
    pub lost: u64,
    /// The span its delivery rate was taken over.
    pub span: Duration,
    /// Its delivery rate, bytes/s.
    pub rate: f64,
    /// The smallest RTT sample of the round.
    pub min_rtt: Option<Duration>,
    /// Some of its ACKs found nothing more to send.
    pub app_limited: bool,
}

/// Where the controller is in its cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Doubling per round until the link is found.
    Startup,
    /// Window from the model.
    Steady,
    /// Window halved to drain the queue and re-measure the min RTT.
    ProbeRtt,
}

/// Accumulators of the current round.
#[derive(Debug, Clone, Default)]
struct Round {
    /// The round ends when this packet number (or a later one) is acknowledged.
    end_pn: Option<u64>,
    start: Option<Instant>,
    acked: u64,
    lost: u64,
    /// An ECN mark or a loss the caller could not size.
    marked: bool,
    app_limited: bool,
    min_rtt: Option<Duration>,
    /// RTT samples in `min_rtt`.
    samples: u32,
    first_sent: Option<Instant>,
    last_sent: Option<Instant>,
    /// The most bytes in flight while the round ran.
    max_flight: u64,
}

/// The controller's state (see the module docs).
#[derive(Debug, Clone)]
pub struct LowDelay {
    cfg: LowDelayConfig,
    mtu: u64,
    phase: Phase,
    /// The window in startup (grown by ACKs); in the other phases it comes from the model.
    startup_window: u64,
    round: Round,
    rounds: u64,
    last_sent_pn: u64,
    /// The last bandwidth samples, bytes/s; the estimate is their maximum.
    bw: VecDeque<f64>,
    min_rtt: Option<Duration>,
    min_rtt_at: Option<Instant>,
    startup_best_bw: f64,
    startup_flat_rounds: u32,
    /// The last RTT samples in startup (their minimum is robust to one delayed ACK).
    startup_samples: VecDeque<(Instant, Duration)>,
    /// Rounds since steady state began (indexes [`CYCLE_GAINS`]).
    cycle_round: usize,
    /// Window cap after a lossy round, and the window at that loss; the cap returns quickly
    /// towards that window, then probes beyond it by 1/16 per round.
    loss_cap: Option<u64>,
    loss_at: u64,
    /// Bytes in flight: counted from sends, ACKs and losses, set exactly at each ACK batch.
    in_flight: u64,
    /// The previous round's `max_flight` (a burst's losses may be declared a round later).
    prev_max_flight: u64,
    probe_started: Option<Instant>,
    probe_min_rtt: Option<Duration>,
    /// Nothing was in flight at the last ACK batch: the next send starts a round.
    idle: bool,
}

impl LowDelay {
    /// A controller for a path of `mtu` bytes, starting in slow start.
    pub fn new(cfg: LowDelayConfig, mtu: u16) -> LowDelay {
        let mtu = u64::from(mtu).max(1200);
        LowDelay {
            startup_window: cfg.initial_window.max(4 * mtu),
            cfg,
            mtu,
            phase: Phase::Startup,
            round: Round::default(),
            rounds: 0,
            last_sent_pn: 0,
            bw: VecDeque::new(),
            min_rtt: None,
            min_rtt_at: None,
            startup_best_bw: 0.0,
            startup_flat_rounds: 0,
            startup_samples: VecDeque::new(),
            cycle_round: 0,
            loss_cap: None,
            loss_at: 0,
            in_flight: 0,
            prev_max_flight: 0,
            probe_started: None,
            probe_min_rtt: None,
            idle: false,
        }
    }

    /// The phase the controller is in.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The bandwidth estimate, bytes/s (0 before the first round ends).
    pub fn bandwidth(&self) -> f64 {
        self.bw.iter().copied().fold(0.0, f64::max)
    }

    /// The smallest RTT seen in the current window, if any.
    pub fn min_rtt(&self) -> Option<Duration> {
        self.min_rtt
    }

    /// The standing queue the window allows, as delay at the bottleneck.
    pub fn queue_target(&self) -> Duration {
        let rtt = self.min_rtt.unwrap_or(Duration::ZERO);
        rtt.mul_f64(self.cfg.queue_fraction)
            .clamp(self.cfg.min_queue, self.cfg.max_queue)
    }

    fn min_window(&self) -> u64 {
        4 * self.mtu
    }

    /// bandwidth x (min RTT + queue target), or `None` before both are known.
    fn model_window(&self) -> Option<u64> {
        let rtt = self.min_rtt?;
        let bw = self.bandwidth();
        (bw > 0.0).then(|| (bw * (rtt + self.queue_target()).as_secs_f64()) as u64)
    }

    /// Bytes that may be in flight.
    pub fn window(&self) -> u64 {
        let w = match self.phase {
            Phase::Startup => self.startup_window,
            Phase::Steady => {
                let gain = CYCLE_GAINS[self.cycle_round % CYCLE_GAINS.len()];
                let model = self.model_window().unwrap_or(self.startup_window);
                let model = (model as f64 * gain) as u64;
                self.loss_cap.map_or(model, |cap| model.min(cap))
            }
            Phase::ProbeRtt => {
                let bdp = match (self.min_rtt, self.bandwidth()) {
                    (Some(rtt), bw) if bw > 0.0 => (bw * rtt.as_secs_f64()) as u64,
                    _ => self.startup_window,
                };
                bdp / 2
            }
        };
        w.max(self.min_window())
    }

    /// The window a new connection starts with.
    pub fn initial_window(&self) -> u64 {
        self.cfg.initial_window
    }

    /// Adapts the window's floor to a new path MTU.
    pub fn on_mtu_update(&mut self, mtu: u16) {
        self.mtu = u64::from(mtu).max(1200);
    }

    /// Packets up to number `pn`, `bytes` in all, were sent at `now`.
    pub fn on_sent(&mut self, now: Instant, bytes: u64, pn: u64) {
        self.last_sent_pn = pn;
        self.in_flight += bytes;
        self.round.max_flight = self.round.max_flight.max(self.in_flight);
        if std::mem::take(&mut self.idle) {
            // The round starts with this burst, not at the last ACK before the idle gap (whose
            // length would read as a slow path).
            self.round.end_pn = Some(pn);
            self.round.start = Some(now);
        }
        if self.round.end_pn.is_none() {
            self.round.end_pn = Some(pn);
            self.round.start = Some(now);
        }
    }

    /// A packet of `bytes` sent at `sent` was acknowledged at `now`.
    pub fn on_ack(&mut self, now: Instant, sent: Instant, bytes: u64, app_limited: bool) {
        let rtt = now.saturating_duration_since(sent);
        self.in_flight = self.in_flight.saturating_sub(bytes);
        let r = &mut self.round;
        r.acked += bytes;
        r.app_limited |= app_limited;
        r.min_rtt = Some(r.min_rtt.map_or(rtt, |m| m.min(rtt)));
        r.samples += 1;
        r.first_sent = Some(r.first_sent.map_or(sent, |s| s.min(sent)));
        r.last_sent = Some(r.last_sent.map_or(sent, |s| s.max(sent)));
        if self.min_rtt.is_none_or(|m| rtt <= m) {
            self.min_rtt = Some(rtt);
            self.min_rtt_at = Some(now);
        }
        if self.phase == Phase::ProbeRtt {
            self.probe_min_rtt = Some(self.probe_min_rtt.map_or(rtt, |m| m.min(rtt)));
        }
        if self.phase == Phase::Startup {
            let horizon = self.min_rtt.unwrap_or(rtt) / 2;
            while self.startup_samples.len() >= STARTUP_SAMPLES_MAX
                || (self.startup_samples.len() >= STARTUP_SAMPLES
                    && self
                        .startup_samples
                        .front()
                        .is_some_and(|&(at, _)| now.saturating_duration_since(at) > horizon))
            {
                self.startup_samples.pop_front();
            }
            self.startup_samples.push_back((now, rtt));
            // The queue as the fastest of the last few ACKs saw it. Growth slows as it nears
            // the target (the link is nearly full) and startup ends when it passes: waiting
            // for a round's end would double the window once more and, a round of feedback
            // later, overflow a 100 ms buffer on a slow long line.
            let recent = self.startup_samples.iter().map(|&(_, r)| r).min();
            let queue = match (recent, self.min_rtt) {
                (Some(recent), Some(min)) if self.startup_samples.len() >= STARTUP_SAMPLES => {
                    recent.saturating_sub(min)
                }
                _ => Duration::ZERO,
            };
            let target = self.queue_target();
            if !app_limited {
                let room = 1.0 - queue.as_secs_f64() / target.as_secs_f64();
                self.startup_window += (bytes as f64 * room.clamp(0.0, 1.0)) as u64;
            }
            if queue > target {
                self.phase = Phase::Steady;
            }
        }
    }

    /// A batch of ACKs ended with `in_flight` bytes still in flight; `largest_acked` is the
    /// largest packet number it acknowledged. Returns what the round measured if this batch ended
    /// one.
    pub fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        largest_acked: Option<u64>,
    ) -> Option<RoundReport> {
        // The sender's count is exact (ours also counted packets that carry only ACKs).
        self.in_flight = in_flight;
        let mut report = None;
        if let (Some(end), Some(acked)) = (self.round.end_pn, largest_acked)
            && acked >= end
        {
            report = Some(self.end_round(now));
        }
        if in_flight == 0 && !self.idle {
            // Everything sent is acknowledged (or lost): a round in progress ends here.
            if self.round.acked > 0 || self.round.lost > 0 {
                report = Some(self.end_round(now));
            }
            self.idle = true;
        }
        match self.phase {
            Phase::Steady => {
                if self
                    .min_rtt_at
                    .is_some_and(|at| now.saturating_duration_since(at) > self.cfg.min_rtt_window)
                {
                    self.phase = Phase::ProbeRtt;
                    self.probe_started = Some(now);
                    self.probe_min_rtt = None;
                }
            }
            Phase::ProbeRtt => {
                let hold = self.cfg.probe_rtt_time + self.min_rtt.unwrap_or(Duration::ZERO);
                if self
                    .probe_started
                    .is_some_and(|at| now.saturating_duration_since(at) >= hold)
                {
                    // The queue has drained: what we saw is the path's RTT now, even if longer.
                    if let Some(m) = self.probe_min_rtt {
                        self.min_rtt = Some(m);
                    }
                    self.min_rtt_at = Some(now);
                    self.phase = Phase::Steady;
                }
            }
            Phase::Startup => {}
        }
        report
    }

    /// `lost_bytes` were declared lost (0 for an ECN mark); `persistent` if everything sent over
    /// the persistent-congestion period was lost.
    pub fn on_congestion_event(&mut self, lost_bytes: u64, persistent: bool) {
        if persistent {
            // The path may be gone or much slower: forget it and start over.
            let cfg = self.cfg.clone();
            let mtu = self.mtu as u16;
            *self = LowDelay::new(cfg, mtu);
            return;
        }
        self.round.lost += lost_bytes;
        self.in_flight = self.in_flight.saturating_sub(lost_bytes);
        if lost_bytes == 0 {
            self.round.marked = true;
        }
    }

    /// Caps the window at 0.7 x the flight that overflowed: `max_flight`, the most in flight
    /// over this round and the last (a burst's losses can be declared in the round after it), or
    /// the window if that is smaller. Not the window alone: a message smaller than the window
    /// that overflows a buffer (a busy receiver's socket buffer) would leave the cap above the
    /// message, and every message would overflow it again.
    fn cap_after_loss(&mut self, max_flight: u64) {
        let at = self.window().min(max_flight.max(self.prev_max_flight));
        self.loss_at = at;
        self.loss_cap = Some((at * 7 / 10).max(self.min_window()));
    }

    fn end_round(&mut self, now: Instant) -> RoundReport {
        let r = std::mem::take(&mut self.round);
        self.rounds += 1;
        let ack_span = r
            .start
            .map_or(Duration::ZERO, |s| now.saturating_duration_since(s));
        let send_span = match (r.first_sent, r.last_sent) {
            (Some(a), Some(b)) => b.saturating_duration_since(a),
            _ => Duration::ZERO,
        };
        let span = ack_span.max(send_span);
        let mut report = RoundReport {
            round: self.rounds,
            acked: r.acked,
            lost: r.lost,
            span,
            rate: 0.0,
            min_rtt: r.min_rtt,
            app_limited: r.app_limited,
        };
        if r.acked > 0 && !span.is_zero() {
            let rate = r.acked as f64 / span.as_secs_f64();
            report.rate = rate;
            // An app-limited round says little about the link unless it beat the estimate.
            // Samples age by samples, not rounds, so an idle or app-limited spell keeps the
            // estimate: aged by rounds, the first sample after a spell of small messages (one
            // that waited for a busy receiver, say) replaced the whole filter.
            if !r.app_limited || rate > self.bandwidth() {
                self.bw.push_back(rate);
                while self.bw.len() as u64 > self.cfg.bw_window_samples.max(1) {
                    self.bw.pop_front();
                }
            }
        }
        let total = r.acked + r.lost;
        // A few packets at least: one loss in a small round is noise, not a full queue.
        let heavy_loss = r.marked
            || (r.lost >= 3 * self.mtu && r.lost as f64 > self.cfg.loss_threshold * total as f64);
        match self.phase {
            Phase::Startup => {
                let bw = self.bandwidth();
                if bw >= self.startup_best_bw * 1.25 {
                    self.startup_best_bw = bw;
                    self.startup_flat_rounds = 0;
                } else if !r.app_limited {
                    self.startup_flat_rounds += 1;
                }
                if heavy_loss || self.startup_flat_rounds >= 3 {
                    self.phase = Phase::Steady;
                    if heavy_loss {
                        self.cap_after_loss(r.max_flight);
                    }
                }
            }
            Phase::Steady | Phase::ProbeRtt => {
                self.cycle_round += 1;
                if heavy_loss {
                    self.cap_after_loss(r.max_flight);
                } else if let Some(cap) = self.loss_cap
                    && r.max_flight + 2 * self.mtu >= cap
                {
                    // Only a round whose flight reached the cap tested it: the clean rounds of an
                    // app-limited spell (a pipeline waiting between messages) say nothing about
                    // what the path holds.
                    let step = if cap < self.loss_at {
                        (self.loss_at - cap) / 4
                    } else {
                        cap / 16
                    };
                    // Kept when the model falls below it (a low sample after a busy spell): the
                    // model would rise again above what overflowed.
                    self.loss_cap = Some(cap + step.max(self.mtu));
                }
            }
        }
        self.prev_max_flight = r.max_flight;
        self.round.end_pn = Some(self.last_sent_pn);
        self.round.start = Some(now);
        self.round.max_flight = self.in_flight;
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;

    const PKT: u64 = 1200;

    /// A bottleneck link in virtual time: a FIFO at `rate` with a tail-drop buffer, a fixed
    /// propagation RTT, seeded random loss after the queue. ACKs every packet.
    struct Link {
        rate_bps: f64,
        rtt: Duration,
        buffer: Duration,
        loss: f64,
        /// Each ACK arrives up to this much late (a loaded host's scheduling noise).
        ack_jitter: Duration,
        rng: u64,
    }

    #[derive(Default, Debug)]
    struct Outcome {
        delivered: u64,
        sent: u64,
        queue_drops: u64,
        /// Bytes delivered in the second half.
        late_delivered: u64,
        /// Mean RTT of packets acknowledged in the second half.
        late_rtt: Duration,
        /// Max queue delay seen in the second half.
        late_max_queue: Duration,
    }

    impl Link {
        fn coin(&mut self) -> f64 {
            // xorshift64*: seeded, so every run of a test is the same run.
            self.rng ^= self.rng >> 12;
            self.rng ^= self.rng << 25;
            self.rng ^= self.rng >> 27;
            (self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
        }

        /// Runs a bulk transfer for `secs`; `reshape` may change the link at a given time.
        fn run(
            &mut self,
            cc: &mut LowDelay,
            secs: f64,
            mut reshape: impl FnMut(f64, &mut Link),
        ) -> Outcome {
            let t0 = Instant::now();
            let at = |ns: u64| t0 + Duration::from_nanos(ns);
            let end = (secs * 1e9) as u64;
            // (time, pn, sent_ns, acked?) events: ACK arrival or loss detection.
            let mut events: BinaryHeap<Reverse<(u64, u64, u64, bool)>> = BinaryHeap::new();
            let (mut now, mut pn, mut in_flight, mut link_free) = (0u64, 0u64, 0u64, 0u64);
            let mut out = Outcome::default();
            let (mut late_rtt_sum, mut late_n) = (0f64, 0u64);
            while now < end {
                reshape(now as f64 * 1e-9, self);
                let rtt_ns = self.rtt.as_nanos() as u64;
                let tx_ns = (PKT as f64 * 8.0 / self.rate_bps * 1e9) as u64;
                let mut largest = None;
                while let Some(&Reverse((t, p, sent, ok))) = events.peek() {
                    if t > now {
                        break;
                    }
                    events.pop();
                    in_flight -= PKT;
                    if ok {
                        out.delivered += PKT;
                        cc.on_ack(at(t), at(sent), PKT, false);
                        largest = Some(largest.map_or(p, |l: u64| l.max(p)));
                        if now > end / 2 {
                            out.late_delivered += PKT;
                            late_rtt_sum += (t - sent) as f64;
                            late_n += 1;
                        }
                    } else {
                        cc.on_congestion_event(PKT, false);
                    }
                }
                if largest.is_some() {
                    cc.on_end_acks(at(now), in_flight, largest);
                }
                while in_flight + PKT <= cc.window() {
                    pn += 1;
                    out.sent += 1;
                    in_flight += PKT;
                    cc.on_sent(at(now), PKT, pn);
                    let queue = link_free.saturating_sub(now);
                    if now > end / 2 {
                        out.late_max_queue = out.late_max_queue.max(Duration::from_nanos(queue));
                    }
                    if queue > self.buffer.as_nanos() as u64 {
                        out.queue_drops += 1;
                        // Noticed about an RTT later, like a packet-threshold loss.
                        events.push(Reverse((now + rtt_ns + queue, pn, now, false)));
                        continue;
                    }
                    link_free = link_free.max(now) + tx_ns;
                    let ok = self.coin() >= self.loss;
                    let noise = (self.coin() * self.ack_jitter.as_nanos() as f64) as u64;
                    events.push(Reverse((link_free + rtt_ns + noise, pn, now, ok)));
                }
                now = match events.peek() {
                    Some(&Reverse((t, ..))) => t.max(now + 1),
                    None => now + 1_000_000,
                };
            }
            out.late_rtt = Duration::from_secs_f64(late_rtt_sum / late_n.max(1) as f64 * 1e-9);
            out
        }
    }

    fn link(mbit: f64, rtt_ms: u64, loss: f64) -> Link {
        Link {
            rate_bps: mbit * 1e6,
            rtt: Duration::from_millis(rtt_ms),
            buffer: Duration::from_millis(100),
            loss,
            ack_jitter: Duration::ZERO,
            rng: 0x9E37_79B9_7F4A_7C15,
        }
    }

    fn goodput(o: &Outcome, mbit: f64, secs: f64) -> f64 {
        o.delivered as f64 * 8.0 / secs / (mbit * 1e6)
    }

    /// A loopback path to a busy receiver: the wire is fast (10 Gbit/s, 0.1 ms RTT) and the
    /// receiving process reads its socket every 20 us, except for a spell of `busy` from each
    /// message's start (it is computing, or not scheduled), after which it takes everything
    /// waiting and acknowledges it in one batch. A datagram that finds `rx_buffer` bytes waiting
    /// is dropped (the kernel's socket buffer). The sender has a message of `message` bytes every
    /// `gap` (a pipeline's frames) and in between one packet every 10 ms (control messages,
    /// keep-alives: rounds that fit any window). Losses are declared three packets later
    /// or, for a burst's tail, at a 30 ms probe timeout (quinn's PTO includes the peer's 25 ms
    /// max ACK delay).
    struct BusyHost {
        busy: Duration,
        rx_buffer: u64,
        message: u64,
        gap: Duration,
    }

    #[derive(Debug, Default)]
    struct Messages {
        drops: u64,
        /// Drops in the second half of the messages.
        late_drops: u64,
        /// Mean and worst time from a message's start to its last byte acknowledged, second half.
        late_mean: Duration,
        late_max: Duration,
    }

    impl BusyHost {
        fn run(&self, cc: &mut LowDelay, messages: u64) -> Messages {
            use std::collections::BTreeMap;
            const ONE_WAY: u64 = 50_000;
            const TX: u64 = 960; // 1200 bytes at 10 Gbit/s
            const PTO: u64 = 30_000_000;
            // (time, kind, pn, sent): 0 = arrives at the receiver, 1 = its ACK arrives, 2 = PTO.
            let mut events: BinaryHeap<Reverse<(u64, u8, u64, u64)>> = BinaryHeap::new();
            let t0 = Instant::now();
            let at = |ns: u64| t0 + Duration::from_nanos(ns);
            let busy = self.busy.as_nanos() as u64;
            let gap = self.gap.as_nanos() as u64;
            // The receiver's first read at or after `t`.
            let read_at = |t: u64| {
                if t % gap < busy {
                    t - t % gap + busy
                } else {
                    t
                }
            };
            let (mut now, mut pn, mut in_flight, mut link_free) = (0u64, 0u64, 0u64, 0u64);
            let (mut pending, mut acked_total, mut rx_waiting) = (0u64, 0u64, 0u64);
            let mut waiting: Vec<(u64, u64)> = Vec::new();
            let mut outstanding: BTreeMap<u64, u64> = BTreeMap::new();
            let mut chatter = std::collections::HashSet::new();
            let mut next_chatter = 0u64;
            let (mut next_read, mut next_msg) = (read_at(0), 0u64);
            let mut starts = Vec::new();
            let mut done = Vec::new();
            let mut out = Messages::default();
            let mut steps = 0u32;
            while (done.len() as u64) < messages {
                steps += 1;
                assert!(steps < 10_000_000, "no progress: {out:?}");
                if starts.len() as u64 == messages {
                    next_msg = u64::MAX;
                }
                now = events
                    .peek()
                    .map_or(u64::MAX, |&Reverse((t, ..))| t)
                    .min(next_read)
                    .min(next_msg)
                    .min(next_chatter)
                    .max(now);
                if now >= next_msg {
                    pending += self.message;
                    starts.push(now);
                    next_msg += gap;
                }
                let mut largest = None;
                let mut lost = Vec::new();
                while let Some(&Reverse((t, kind, p, sent))) = events.peek() {
                    if t > now {
                        break;
                    }
                    events.pop();
                    match kind {
                        0 if rx_waiting + PKT > self.rx_buffer => {
                            out.drops += 1;
                            if done.len() as u64 >= messages / 2 {
                                out.late_drops += 1;
                            }
                        }
                        0 => {
                            rx_waiting += PKT;
                            waiting.push((p, sent));
                        }
                        1 => {
                            if outstanding.remove(&p).is_some() {
                                in_flight -= PKT;
                                if !chatter.remove(&p) {
                                    acked_total += PKT;
                                }
                                cc.on_ack(at(t), at(sent), PKT, pending == 0);
                                largest = Some(largest.map_or(p, |l: u64| l.max(p)));
                            }
                        }
                        _ => {
                            if outstanding.remove(&p).is_some() {
                                lost.push(p);
                            }
                        }
                    }
                }
                if let Some(l) = largest {
                    let below: Vec<u64> = outstanding
                        .range(..l.saturating_sub(2))
                        .map(|(&p, _)| p)
                        .collect();
                    for p in below {
                        outstanding.remove(&p);
                        lost.push(p);
                    }
                }
                for p in &lost {
                    in_flight -= PKT;
                    if !chatter.remove(p) {
                        pending += PKT;
                    }
                    cc.on_congestion_event(PKT, false);
                }
                if largest.is_some() {
                    cc.on_end_acks(at(now), in_flight, largest);
                }
                if now >= next_read {
                    for (p, sent) in waiting.drain(..) {
                        events.push(Reverse((now + ONE_WAY, 1, p, sent)));
                    }
                    rx_waiting = 0;
                    next_read = read_at(now + 20_000);
                }
                while (done.len() as u64) < starts.len() as u64
                    && acked_total >= (done.len() as u64 + 1) * self.message
                {
                    done.push(now - starts[done.len()]);
                }
                let mut chat = false;
                if now >= next_chatter {
                    next_chatter = now + 10_000_000;
                    chat = pending == 0;
                }
                while (pending > 0 || chat) && in_flight + PKT <= cc.window() {
                    pn += 1;
                    if pending == 0 {
                        chatter.insert(pn);
                        chat = false;
                    }
                    pending = pending.saturating_sub(PKT);
                    in_flight += PKT;
                    outstanding.insert(pn, now);
                    link_free = link_free.max(now) + TX;
                    events.push(Reverse((link_free + ONE_WAY, 0, pn, now)));
                    events.push(Reverse((now + PTO, 2, pn, now)));
                    cc.on_sent(at(now), PKT, pn);
                }
            }
            let late = &done[done.len() / 2..];
            out.late_mean = late
                .iter()
                .sum::<u64>()
                .div_ceil(late.len() as u64)
                .pipe_ns();
            out.late_max = late.iter().copied().max().unwrap_or(0).pipe_ns();
            out
        }
    }

    trait PipeNs {
        fn pipe_ns(self) -> Duration;
    }

    impl PipeNs for u64 {
        fn pipe_ns(self) -> Duration {
            Duration::from_nanos(self)
        }
    }

    #[test]
    fn a_busy_receivers_socket_buffer_caps_the_flight() {
        // 374 KB messages (the demo's activation frames) arrive while the receiver is busy for
        // 5 ms, with a 160 KB socket buffer. When the cap followed the window (0.7 x 1.1 MB, above
        // the message) and clean app-limited rounds lifted it, every message overflowed the
        // buffer: 179 of its 312 packets dropped and 10.4 ms per message in this model.
        let host = BusyHost {
            busy: Duration::from_millis(5),
            rx_buffer: 160_000,
            message: 312 * PKT,
            gap: Duration::from_millis(60),
        };
        let mut cc = LowDelay::new(LowDelayConfig::default(), 1200);
        let o = host.run(&mut cc, 40);
        // The flight settles at about the buffer: what fits waits for the receiver, the rest
        // follows when it reads; a drop now and then as the cap probes up again.
        assert!(o.late_mean <= Duration::from_millis(6), "{o:?}");
        assert!(o.late_drops <= 2 * 20, "{o:?}");
        assert!(cc.window() <= 200_000, "{o:?} {cc:?}");
    }

    #[test]
    fn a_scheduling_delay_does_not_starve_the_window() {
        // The same host with a socket buffer that holds a message: the ACKs wait up to 5 ms
        // for the receiver whatever the flight, which is no queue. The window grows to carry a
        // whole message per read, and nothing is dropped.
        let host = BusyHost {
            busy: Duration::from_millis(5),
            rx_buffer: 4 << 20,
            message: 312 * PKT,
            gap: Duration::from_millis(60),
        };
        let mut cc = LowDelay::new(LowDelayConfig::default(), 1200);
        let o = host.run(&mut cc, 40);
        assert_eq!(o.drops, 0);
        assert!(o.late_max <= Duration::from_millis(6), "{o:?} {cc:?}");
        assert!(cc.window() >= 312 * PKT, "{cc:?}");
    }

    #[test]
    fn fills_the_link_with_a_short_queue() {
        for (mbit, rtt_ms) in [(20.0, 30), (80.0, 30), (5.0, 80), (100.0, 5)] {
            let mut cc = LowDelay::new(LowDelayConfig::default(), 1200);
            let o = link(mbit, rtt_ms, 0.0).run(&mut cc, 8.0, |_, _| {});
            let util = goodput(&o, mbit, 8.0);
            let prop = Duration::from_millis(rtt_ms);
            let target = cc.queue_target();
            assert!(util > 0.9, "{mbit} Mbit/s {rtt_ms} ms: utilisation {util}");
            assert_eq!(o.queue_drops, 0, "{mbit} Mbit/s {rtt_ms} ms: {o:?}");
            // The standing queue stays near the target (plus a packet or two of granularity);
            // the probe round adds a quarter window for one round in eight.
            assert!(
                o.late_rtt <= prop + target + target / 4 + Duration::from_millis(3),
                "{mbit} Mbit/s {rtt_ms} ms: rtt {:?} target {target:?}",
                o.late_rtt
            );
            assert!(o.late_rtt >= prop, "{o:?}");
            assert_eq!(cc.phase(), Phase::Steady);
            let bw = cc.bandwidth() * 8.0 / 1e6;
            assert!((bw / mbit - 1.0).abs() < 0.1, "estimate {bw} of {mbit}");
        }
    }

    #[test]
    fn scheduling_noise_costs_little() {
        // ACKs up to 8 ms late at random (about the queue target): the min filters see
        // through it, and the probe rounds find the headroom the noise hides.
        for mbit in [20.0, 80.0] {
            let mut l = link(mbit, 30, 0.0);
            l.ack_jitter = Duration::from_millis(8);
            let mut cc = LowDelay::new(LowDelayConfig::default(), 1200);
            let o = l.run(&mut cc, 8.0, |_, _| {});
            let util = goodput(&o, mbit, 8.0);
            assert!(util > 0.9, "{mbit}: utilisation {util} {o:?}");
            assert_eq!(o.queue_drops, 0);
            assert!(o.late_rtt < Duration::from_millis(55), "{o:?}");
        }
    }

    #[test]
    fn random_loss_does_not_shrink_the_window() {
        let mut cc = LowDelay::new(LowDelayConfig::default(), 1200);
        let o = link(20.0, 30, 0.01).run(&mut cc, 8.0, |_, _| {});
        let util = goodput(&o, 20.0, 8.0);
        assert!(util > 0.85, "utilisation {util} at 1% loss");
        assert!(cc.loss_cap.is_none(), "1% loss is not congestion");
        // Only 1% is lost, not the window's worth of a full buffer.
        let lost = o.sent - o.delivered / PKT;
        assert!(lost < o.sent / 50, "{lost} lost of {}", o.sent);
    }

    #[test]
    fn a_shallow_buffer_caps_the_window_after_heavy_loss() {
        // 3 ms of buffer, less than the queue target: tail drops are the only signal.
        let mut l = link(20.0, 30, 0.0);
        l.buffer = Duration::from_millis(3);
        let mut cc = LowDelay::new(LowDelayConfig::default(), 1200);
        let o = l.run(&mut cc, 8.0, |_, _| {});
        // Without the cap the window would overflow it by the target's worth every round
        // (a steady ~12% loss). With it: a sawtooth, some drops, most of the link.
        let late = o.late_delivered as f64 * 8.0 / 4.0 / 20e6;
        assert!(late > 0.8, "{late} {o:?}");
        assert!(o.queue_drops < o.sent / 25, "{o:?}");
        assert!(
            o.queue_drops > 0,
            "the buffer is shallower than the target: {o:?}"
        );
    }

    #[test]
    fn a_longer_path_is_learned_by_probe_rtt() {
        // 30 ms for 3 s, then 60 ms: without re-measuring the min RTT the window would stay at
        // the old BDP and fill half the link.
        let mut cc = LowDelay::new(LowDelayConfig::default(), 1200);
        let o = link(20.0, 30, 0.0).run(&mut cc, 30.0, |t, l| {
            if t > 3.0 {
                l.rtt = Duration::from_millis(60);
            }
        });
        assert!(cc.min_rtt().unwrap() >= Duration::from_millis(60), "{cc:?}");
        let late = o.late_delivered as f64 * 8.0 / 15.0 / 20e6;
        assert!(late > 0.9, "{late} {o:?}");
        assert!(
            o.late_rtt <= Duration::from_millis(60) + cc.queue_target() + Duration::from_millis(3)
        );
    }

    #[test]
    fn probe_rtt_relearns_the_min_rtt_after_ten_seconds() {
        let mut cc = LowDelay::new(LowDelayConfig::default(), 1200);
        let t0 = Instant::now();
        // Synthetic: a steady 1 MB/s link at 40 ms RTT, one ACK per ms (1000 bytes each).
        let mut phases = Vec::new();
        for ms in 0..25_000u64 {
            let now = t0 + Duration::from_millis(ms + 40);
            cc.on_sent(now, 1000, ms + 40);
            let rtt = if ms < 100 { 40 } else { 45 }; // a standing queue after startup
            cc.on_ack(now, now - Duration::from_millis(rtt), 1000, false);
            cc.on_end_acks(now, 40_000, Some(ms));
            if phases.last() != Some(&cc.phase()) {
                phases.push(cc.phase());
            }
        }
        assert_eq!(
            phases,
            [
                Phase::Startup,
                Phase::Steady,
                Phase::ProbeRtt,
                Phase::Steady
            ]
        );
        // No lower sample came while the window was down: the path's RTT is now 45 ms.
        assert_eq!(cc.min_rtt(), Some(Duration::from_millis(45)));
    }

    #[test]
    fn persistent_congestion_starts_over() {
        let mut cc = LowDelay::new(LowDelayConfig::default(), 1200);
        let _ = link(20.0, 30, 0.0).run(&mut cc, 2.0, |_, _| {});
        assert!(cc.window() > 50_000);
        cc.on_congestion_event(10_000, true);
        assert_eq!(cc.phase(), Phase::Startup);
        assert_eq!(cc.window(), 14_720);
        assert_eq!(cc.bandwidth(), 0.0);
    }

    #[test]
    fn app_limited_rounds_keep_the_estimate() {
        let mut cc = LowDelay::new(LowDelayConfig::default(), 1200);
        let _ = link(20.0, 30, 0.0).run(&mut cc, 3.0, |_, _| {});
        let bw = cc.bandwidth();
        let t0 = Instant::now() + Duration::from_secs(10);
        // 50 app-limited rounds at a trickle.
        for i in 0..50u64 {
            let now = t0 + Duration::from_millis(30 * i);
            cc.on_sent(now, 1200, 1_000_000 + i);
            cc.on_ack(now + Duration::from_millis(30), now, 1200, true);
            cc.on_end_acks(now + Duration::from_millis(30), 0, Some(1_000_000 + i));
        }
        assert_eq!(cc.bandwidth(), bw);
    }
}
