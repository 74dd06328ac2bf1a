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
use std::time::Instant;

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics};
use quinn_proto::RttEstimator;

pub use lowdelay::{LowDelay, LowDelayConfig, Phase};

/// Builds a [`LowDelay`] controller per connection.
#[derive(Debug, Clone, Default)]
pub struct LowDelayFactory {
    /// The controller's settings.
    pub config: LowDelayConfig,
}

impl ControllerFactory for LowDelayFactory {
    fn build(self: Arc<Self>, _now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(QuinnLowDelay(LowDelay::new(
            self.config.clone(),
            current_mtu,
        )))
    }
}

/// [`LowDelay`] behind quinn's trait.
#[derive(Debug, Clone)]
struct QuinnLowDelay(LowDelay);

impl Controller for QuinnLowDelay {
    fn on_sent(&mut self, now: Instant, _bytes: u64, last_packet_number: u64) {
        self.0.on_sent(now, last_packet_number);
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        _rtt: &RttEstimator,
    ) {
        self.0.on_ack(now, sent, bytes, app_limited);
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        _in_flight: u64,
        _app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        self.0.on_end_acks(now, largest_packet_num_acked);
    }

    fn on_congestion_event(
        &mut self,
        _now: Instant,
        _sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        self.0
            .on_congestion_event(lost_bytes, is_persistent_congestion);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.0.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        self.0.window()
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut m = ControllerMetrics::default();
        m.congestion_window = self.0.window();
        m.pacing_rate = Some((self.0.bandwidth() * 8.0) as u64);
        m
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(self.clone())
    }

    fn initial_window(&self) -> u64 {
        self.0.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}
