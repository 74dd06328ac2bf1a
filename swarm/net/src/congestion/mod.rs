//! Congestion control of our own, plugged into quinn.
//!
//! [`lowdelay`] decides (sans IO: ACKs, losses and times in, a window out); this module only
//! adapts it to quinn's [`Controller`] trait. Why a controller of our own: quinn's BBR keeps about
//! twice the bandwidth-delay product in flight (its pacing-gain cycle cannot drain, since quinn
//! paces at 1.25 x window / RTT whatever the controller's pacing rate), so on a home line it
//! fills the router's buffer: `swarm bench link` at 20 Mbit/s, 30 ms measured half the packets
//! dropped at the queue and 135 ms RTT. Cubic fills the buffer too and collapses under random
//! loss.

pub mod lowdelay;

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics};
use quinn_proto::RttEstimator;

pub use lowdelay::{LowDelay, LowDelayConfig, Phase, RoundReport};

/// Builds a [`LowDelay`] controller per connection.
#[derive(Debug, Clone, Default)]
pub struct LowDelayFactory {
    /// The controller's settings.
    pub config: LowDelayConfig,
}

impl ControllerFactory for LowDelayFactory {
    fn build(self: Arc<Self>, _now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(QuinnLowDelay {
            cc: LowDelay::new(self.config.clone(), current_mtu),
            srtt: Duration::ZERO,
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        })
    }
}

/// [`LowDelay`] behind quinn's trait.
#[derive(Debug, Clone)]
struct QuinnLowDelay {
    cc: LowDelay,
    /// quinn's smoothed RTT at the last ACK (its pacer's rate is 1.25 x window / srtt).
    srtt: Duration,
    /// Names the connection in traces.
    id: u64,
}

static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Controller for QuinnLowDelay {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.cc.on_sent(now, bytes, last_packet_number);
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &RttEstimator,
    ) {
        self.srtt = rtt.get();
        self.cc.on_ack(now, sent, bytes, app_limited);
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        _app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        if let Some(r) = self
            .cc
            .on_end_acks(now, in_flight, largest_packet_num_acked)
        {
            let window = self.cc.window();
            tracing::trace!(
                conn = self.id,
                pid = std::process::id(),
                round = r.round,
                phase = ?self.cc.phase(),
                acked = r.acked,
                lost = r.lost,
                span_us = r.span.as_micros() as u64,
                rate_mbit = r.rate * 8e-6,
                round_min_rtt_us = r.min_rtt.map_or(0, |d| d.as_micros() as u64),
                app_limited = r.app_limited,
                bw_mbit = self.cc.bandwidth() * 8e-6,
                min_rtt_us = self.cc.min_rtt().map_or(0, |d| d.as_micros() as u64),
                srtt_us = self.srtt.as_micros() as u64,
                window,
                in_flight,
                pacing_mbit = window as f64 * 1.25 / self.srtt.as_secs_f64().max(1e-6) * 8e-6,
                "low-delay round"
            );
        }
    }

    fn on_congestion_event(
        &mut self,
        _now: Instant,
        _sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        self.cc
            .on_congestion_event(lost_bytes, is_persistent_congestion);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.cc.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        self.cc.window()
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut m = ControllerMetrics::default();
        m.congestion_window = self.cc.window();
        m.pacing_rate = Some((self.cc.bandwidth() * 8.0) as u64);
        m
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(self.clone())
    }

    fn initial_window(&self) -> u64 {
        self.cc.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}
