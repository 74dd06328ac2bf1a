//! The link benchmark: bulk transfer between two nodes on loopback over shaped links.
//!
//! Both nodes get the same [`LinkShape`] with half the round trip as one-way delay each, so the
//! path has the configured rate, RTT and loss in both directions (data one way, ACKs the other).
//! One stream carries a `BULK` envelope for a fixed time; goodput is payload bytes received by
//! the deadline divided by the time since the stream opened (slow start included, as a real
//! transfer pays it).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use swarm_net::identity::Identity;
use swarm_net::shaping::{LinkShape, ShapeCounters};
use swarm_net::transport::{Congestion, Node, TransportConfig};
use swarm_net::wire::{HEADER_LEN, Header, NET_KINDS, kind};
use swarm_net::{Error, Result};

/// One benchmark case.
#[derive(Debug, Clone)]
pub struct LinkCase {
    /// Names the case in the report.
    pub name: String,
    /// Rate of the path, bits/s (both directions).
    pub rate_bps: u64,
    /// Round-trip propagation delay of the path.
    pub rtt: Duration,
    /// Random loss per direction, in [0, 1).
    pub loss: f64,
    /// QUIC settings of both nodes (congestion controller, windows).
    pub transport: TransportConfig,
    /// How long the sender sends.
    pub duration: Duration,
    /// Seeds the shapers' loss draws (per node).
    pub seed: u64,
}

impl LinkCase {
    /// The shape each node gets: full rate, half the RTT, the loss; seeds differ per node.
    pub fn shape(&self, node: u64) -> LinkShape {
        LinkShape {
            up_bps: Some(self.rate_bps),
            down_bps: Some(self.rate_bps),
            delay: self.rtt / 2,
            loss: self.loss,
            seed: self.seed.wrapping_mul(31).wrapping_add(node),
            ..LinkShape::default()
        }
    }
}

/// What one case measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LinkResult {
    /// The case's name.
    pub name: String,
    /// The configured rate, Mbit/s.
    pub rate_mbit: f64,
    /// The configured round trip, ms.
    pub rtt_ms: f64,
    /// The configured loss per direction, percent.
    pub loss_pct: f64,
    /// The congestion controller used.
    pub congestion: Congestion,
    /// The QUIC stream window, bytes.
    pub stream_window: u64,
    /// Payload bytes received by the deadline.
    pub bytes: u64,
    /// How long the transfer ran.
    pub seconds: f64,
    /// Payload goodput, Mbit/s.
    pub goodput_mbit: f64,
    /// Goodput as a fraction of the configured rate.
    pub utilisation: f64,
    /// quinn's smoothed RTT at the end, as the sender saw it.
    pub measured_rtt_ms: f64,
    /// Packets the sender's QUIC stack declared lost, and sent.
    pub lost_packets: u64,
    /// Packets the sender's QUIC stack sent.
    pub sent_packets: u64,
    /// The sender's shaper counters (upload side) over the whole case.
    pub sender_shaper: ShapeCounters,
    /// Packets the sender's emulated router dropped because its queue was full, as a
    /// fraction of the packets offered to it.
    pub queue_drop_fraction: f64,
}

/// The cases of `swarm bench link`: an 80 Mbit/s, 30 ms path at 0% and 1% loss, quinn's stock
/// settings (1.25 MB stream window, Cubic) against ours with Cubic, BBR and our low-delay
/// controller.
pub fn standard_cases(duration: Duration, seed: u64) -> Vec<LinkCase> {
    let rate = 80_000_000;
    let rtt = Duration::from_millis(30);
    let mut cases = Vec::new();
    for loss in [0.0, 0.01] {
        for (label, transport) in [
            ("stock-cubic", TransportConfig::stock()),
            (
                "tuned-cubic",
                TransportConfig::default().with_congestion(Congestion::Cubic),
            ),
            (
                "tuned-bbr",
                TransportConfig::default().with_congestion(Congestion::Bbr),
            ),
            (
                "tuned-lowdelay",
                TransportConfig::default().with_congestion(Congestion::LowDelay),
            ),
        ] {
            cases.push(LinkCase {
                name: format!("{label} loss={}%", loss * 100.0),
                rate_bps: rate,
                rtt,
                loss,
                transport,
                duration,
                seed,
            });
        }
    }
    cases
}

/// Runs one case on loopback. `progress` (if given) is kept at the payload bytes received so far.
pub async fn run_case(case: &LinkCase, progress: Option<Arc<AtomicU64>>) -> Result<LinkResult> {
    let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let sender_id = Identity::from_secret(seed_bytes(case.seed, 1));
    let receiver_id = Identity::from_secret(seed_bytes(case.seed, 2));
    let expected = receiver_id.peer_id();
    let sender = Node::bind(
        sender_id,
        loopback,
        case.transport.clone(),
        Some(case.shape(1)),
        None,
    )?;
    let receiver = Node::bind(
        receiver_id,
        loopback,
        case.transport.clone(),
        Some(case.shape(2)),
        None,
    )?;
    let received = progress.unwrap_or_default();
    received.store(0, Ordering::Relaxed);
    // Declared length: more than the link can carry in the time, within BULK's limit.
    let declared = ((case.rate_bps as f64 / 8.0 * case.duration.as_secs_f64() * 1.5) as u64)
        .clamp(1 << 20, NET_KINDS.row(kind::BULK).max_len as u64);

    let recv_task = {
        let receiver = receiver.clone();
        let received = received.clone();
        tokio::spawn(async move { receive(receiver, received).await })
    };

    let conn = sender
        .connect(receiver.local_addr()?, Some(expected))
        .await?;
    let (mut send, _recv) = conn.connection().open_bi().await?;
    let start = Instant::now();
    let deadline = start + case.duration;
    let stream_err = |e: quinn::WriteError| Error::Stream(e.to_string());
    send.write_all(&Header::encode(kind::BULK, declared as u32))
        .await
        .map_err(stream_err)?;
    let chunk = vec![0x5au8; 64 * 1024];
    let mut written = 0u64;
    let write_loop = async {
        while written < declared {
            let n = chunk.len().min((declared - written) as usize);
            send.write_all(&chunk[..n]).await.map_err(stream_err)?;
            written += n as u64;
        }
        Ok::<_, Error>(())
    };
    tokio::select! {
        r = write_loop => r?,
        _ = tokio::time::sleep_until(deadline) => {}
    }
    // Count exactly what arrived by the deadline.
    let now = Instant::now();
    if now < deadline {
        tokio::time::sleep_until(deadline).await;
    }
    let bytes = received.load(Ordering::Relaxed);
    let seconds = (deadline - start).as_secs_f64();
    let stats = conn.connection().stats();
    let measured_rtt = conn.rtt();
    let sender_shaper = sender.shape_counters().unwrap_or_default();
    conn.close(swarm_net::transport::CLOSE_SHUTDOWN, b"done");
    sender.close();
    receiver.close();
    recv_task.abort();
    let goodput = bytes as f64 * 8.0 / seconds;
    let offered = sender_shaper.up_packets + sender_shaper.up_queue_drops;
    let queue_drop_fraction = sender_shaper.up_queue_drops as f64 / offered.max(1) as f64;
    Ok(LinkResult {
        name: case.name.clone(),
        rate_mbit: case.rate_bps as f64 / 1e6,
        rtt_ms: case.rtt.as_secs_f64() * 1e3,
        loss_pct: case.loss * 100.0,
        congestion: case.transport.congestion,
        stream_window: case.transport.stream_window,
        bytes,
        seconds,
        goodput_mbit: goodput / 1e6,
        utilisation: goodput / case.rate_bps as f64,
        measured_rtt_ms: measured_rtt.as_secs_f64() * 1e3,
        lost_packets: stats.path.lost_packets,
        sent_packets: stats.path.sent_packets,
        sender_shaper,
        queue_drop_fraction,
    })
}

/// Accepts one connection and counts the payload of its first stream.
async fn receive(node: Node, received: Arc<AtomicU64>) -> Result<()> {
    let incoming = node
        .accept()
        .await
        .ok_or_else(|| Error::Stream("endpoint closed".into()))?;
    let conn = incoming.handshake().await?;
    let (_send, mut recv) = conn.connection().accept_bi().await?;
    let mut head = [0u8; HEADER_LEN];
    recv.read_exact(&mut head)
        .await
        .map_err(|e| Error::Stream(e.to_string()))?;
    Header::parse(&head, |k| NET_KINDS.get(k))?;
    loop {
        match recv.read_chunk(1 << 20, true).await {
            Ok(Some(chunk)) => {
                received.fetch_add(chunk.bytes.len() as u64, Ordering::Relaxed);
            }
            Ok(None) => return Ok(()),
            Err(e) => return Err(Error::Stream(e.to_string())),
        }
    }
}

fn seed_bytes(seed: u64, node: u8) -> [u8; 32] {
    let mut out = [node; 32];
    out[..8].copy_from_slice(&seed.to_le_bytes());
    out
}
