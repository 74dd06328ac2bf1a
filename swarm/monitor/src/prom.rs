//! `/metrics`: one `prometheus-client` `Registry` per server (never a global one: tests run
//! several nodes in one process), whose collector encodes the current state at each scrape, so
//! every value equals the `/api/v1/state` of the same publication and peers that disappear take
//! their series with them. Counters carry the `_total` suffix the encoder adds.

use std::fmt;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, EncodeMetric,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use swarm_core::trainer::observe::Snapshot;
use tokio::sync::watch;

use crate::VolunteerState;

type Labels = Vec<(&'static str, String)>;

fn gauge<V: EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, V)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn counter<V: EncodeCounterValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, V)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in rows {
        ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn one<V>(v: V) -> Vec<(Labels, V)> {
    vec![(Vec::new(), v)]
}

fn opt<V>(v: Option<V>) -> Vec<(Labels, V)> {
    v.into_iter().map(|v| (Vec::new(), v)).collect()
}

#[derive(Debug)]
struct TrainerCollector(watch::Receiver<Arc<Snapshot>>);

impl Collector for TrainerCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let s = self.0.borrow().clone();
        let p = &s.progress;
        gauge(
            &mut e,
            "swarm_snapshot_seq",
            "Publication number of the state",
            one(s.seq),
        )?;
        gauge(&mut e, "swarm_step", "Steps done", one(p.step))?;
        gauge(
            &mut e,
            "swarm_total_steps",
            "Steps of the run",
            one(p.total_steps),
        )?;
        gauge(
            &mut e,
            "swarm_epoch",
            "Epoch (bumped at every restore)",
            one(s.run.epoch),
        )?;
        let phase = vec![(vec![("phase", s.run.phase.clone())], 1u32)];
        gauge(
            &mut e,
            "swarm_phase",
            "Phase of the run (1 for the current one)",
            phase,
        )?;
        gauge(
            &mut e,
            "swarm_loss",
            "Loss of the last step (nats/token)",
            opt(p.loss),
        )?;
        gauge(
            &mut e,
            "swarm_learning_rate",
            "Learning rate of the last step",
            opt(p.lr),
        )?;
        gauge(
            &mut e,
            "swarm_tokens_per_second",
            "Training throughput so far",
            one(p.tokens_per_s),
        )?;
        gauge(
            &mut e,
            "swarm_train_seconds",
            "Seconds spent training",
            one(p.train_s),
        )?;
        gauge(
            &mut e,
            "swarm_eta_seconds",
            "Estimated seconds to the last step",
            opt(p.eta_s),
        )?;
        counter(&mut e, "swarm_tokens", "Tokens trained on", one(p.tokens))?;
        counter(
            &mut e,
            "swarm_retries",
            "Micro-batch attempts retried",
            one(p.retries),
        )?;
        counter(
            &mut e,
            "swarm_peers_lost",
            "Replicas lost (dead, timed out, banned)",
            one(p.peers_lost),
        )?;
        counter(
            &mut e,
            "swarm_peers_left",
            "Replicas that left gracefully",
            one(p.peers_left),
        )?;
        counter(
            &mut e,
            "swarm_restores",
            "Restores from a checkpoint or the seed",
            one(p.restores),
        )?;
        counter(
            &mut e,
            "swarm_replica_hash_mismatches",
            "Replicas whose weights differed from their stage's majority",
            one(p.replica_hash_mismatches),
        )?;
        let ch = |f: fn(&swarm_core::trainer::observe::ChannelBytes) -> u64| {
            s.channels
                .iter()
                .map(move |c| (vec![("channel", c.channel.clone())], f(c)))
                .collect::<Vec<_>>()
        };
        counter(
            &mut e,
            "swarm_channel_wire_bytes",
            "Bytes on the wire per channel",
            ch(|c| c.wire_bytes),
        )?;
        counter(
            &mut e,
            "swarm_channel_fp32_bytes",
            "Bytes the same tensors take as fp32, per channel",
            ch(|c| c.dense_bytes),
        )?;
        counter(
            &mut e,
            "swarm_channel_frames",
            "Frames sent per channel",
            ch(|c| c.frames),
        )?;

        let stage = |k: u32| vec![("stage", k.to_string())];
        gauge(
            &mut e,
            "swarm_stage_serving_replicas",
            "Routable replicas per stage",
            s.stages.iter().map(|c| (stage(c.stage), c.serving as u64)),
        )?;
        gauge(
            &mut e,
            "swarm_stage_broken",
            "1 when a stage has no routable replica",
            s.stages
                .iter()
                .map(|c| (stage(c.stage), u32::from(c.serving == 0))),
        )?;
        let mut per_state = Vec::new();
        for c in &s.stages {
            for st in ["joining", "serving", "leaving"] {
                let n = c.replicas.iter().filter(|r| r.state == st).count() as u64;
                let mut l = stage(c.stage);
                l.push(("state", st.to_string()));
                per_state.push((l, n));
            }
        }
        gauge(
            &mut e,
            "swarm_stage_replicas",
            "Replicas per stage and state",
            per_state,
        )?;

        let peer = |q: &swarm_core::trainer::observe::PeerRow| -> Labels {
            vec![
                ("peer", q.id.clone()),
                (
                    "stage",
                    q.stage.map_or_else(|| "none".into(), |k| k.to_string()),
                ),
            ]
        };
        let state = s.peers.iter().map(|q| {
            let mut l = peer(q);
            l.push(("state", q.state.clone()));
            l.push(("path", q.path.clone()));
            (l, 1u32)
        });
        gauge(
            &mut e,
            "swarm_peer_state",
            "A peer's state (1 for its current one)",
            state,
        )?;
        let f = |g: fn(&swarm_core::trainer::observe::PeerRow) -> Option<f64>| {
            s.peers
                .iter()
                .filter_map(|q| g(q).map(|v| (peer(q), v)))
                .collect::<Vec<_>>()
        };
        gauge(
            &mut e,
            "swarm_peer_load",
            "Micro-batches in flight through a peer",
            f(|q| q.load.map(f64::from)),
        )?;
        gauge(
            &mut e,
            "swarm_peer_throughput_tokens_per_second",
            "Throughput the router uses for a peer",
            f(|q| q.throughput_tokens_per_s),
        )?;
        gauge(
            &mut e,
            "swarm_peer_rtt_seconds",
            "Smoothed RTT of the trainer's connection to a peer",
            f(|q| q.rtt_ms.map(|v| v / 1e3)),
        )?;
        gauge(
            &mut e,
            "swarm_peer_last_seen_seconds",
            "Seconds since the trainer last heard from or about a peer",
            f(|q| q.last_seen_s),
        )?;
        let c = |g: fn(&swarm_core::trainer::observe::PeerRow) -> Option<u64>| {
            s.peers
                .iter()
                .filter_map(|q| g(q).map(|v| (peer(q), v)))
                .collect::<Vec<_>>()
        };
        counter(
            &mut e,
            "swarm_peer_sent_bytes",
            "UDP bytes the trainer sent to a peer on its connection",
            c(|q| q.tx_bytes),
        )?;
        counter(
            &mut e,
            "swarm_peer_received_bytes",
            "UDP bytes the trainer received from a peer on its connection",
            c(|q| q.rx_bytes),
        )?;
        let per_channel = |wire: bool| {
            s.peers
                .iter()
                .flat_map(|q| {
                    q.channels.iter().map(move |c| {
                        let mut l = peer(q);
                        l.push(("channel", c.channel.clone()));
                        (l, if wire { c.wire_bytes } else { c.dense_bytes })
                    })
                })
                .collect::<Vec<_>>()
        };
        counter(
            &mut e,
            "swarm_peer_channel_wire_bytes",
            "Tensor bytes a peer reports having sent on a channel (self-reported)",
            per_channel(true),
        )?;
        counter(
            &mut e,
            "swarm_peer_channel_fp32_bytes",
            "The fp32 size of the tensors a peer reports having sent on a channel",
            per_channel(false),
        )?;
        counter(
            &mut e,
            "swarm_peer_relay_bytes",
            "Bytes the trainer's relay forwarded from and to a peer",
            c(|q| q.relay_bytes),
        )?;
        counter(
            &mut e,
            "swarm_peer_audits_passed",
            "Audits a peer passed",
            c(|q| Some(q.audits_passed)),
        )?;
        counter(
            &mut e,
            "swarm_peer_audits_failed",
            "Audits a peer failed",
            c(|q| Some(q.audits_failed)),
        )?;
        counter(
            &mut e,
            "swarm_peer_credited_micro_batches",
            "Micro-batches of a peer's work verified by a later passed audit",
            c(|q| Some(q.credited_micro_batches)),
        )?;
        counter(&mut e, "swarm_audits", "Audits run", one(s.audits.audits))?;
        counter(
            &mut e,
            "swarm_audit_failures",
            "Audits failed",
            one(s.audits.failures),
        )?;
        counter(
            &mut e,
            "swarm_audit_bytes",
            "Bytes moved by audits",
            one(s.audits.bytes),
        )?;
        gauge(
            &mut e,
            "swarm_banned_peers",
            "Peers banned by audits",
            one(s.audits.banned.len() as u64),
        )?;
        Ok(())
    }
}

#[derive(Debug)]
struct VolunteerCollector(watch::Receiver<Arc<VolunteerState>>);

impl Collector for VolunteerCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let s = self.0.borrow().clone();
        let info = vec![(
            vec![
                ("peer", s.peer_id.clone()),
                (
                    "stage",
                    s.stage.map_or_else(|| "none".into(), |k| k.to_string()),
                ),
                ("state", s.state.clone()),
                ("reachability", s.reachability.clone()),
                ("software", s.software.clone()),
            ],
            1u32,
        )];
        gauge(
            &mut e,
            "swarm_volunteer_info",
            "This peer's stage, state and reachability",
            info,
        )?;
        let passes = vec![
            (vec![("pass", "forward".to_string())], s.forwards),
            (vec![("pass", "backward".to_string())], s.backwards),
        ];
        counter(&mut e, "swarm_volunteer_passes", "Passes served", passes)?;
        let ch = |f: fn(&swarm_core::trainer::observe::ChannelBytes) -> u64| {
            s.channels
                .iter()
                .map(move |c| (vec![("channel", c.channel.clone())], f(c)))
                .collect::<Vec<_>>()
        };
        counter(
            &mut e,
            "swarm_volunteer_sent_wire_bytes",
            "Tensor bytes sent per channel",
            ch(|c| c.wire_bytes),
        )?;
        counter(
            &mut e,
            "swarm_volunteer_sent_fp32_bytes",
            "What the sent tensors take as fp32, per channel",
            ch(|c| c.dense_bytes),
        )?;
        counter(
            &mut e,
            "swarm_volunteer_state_served_bytes",
            "Stage-state bytes served",
            one(s.state_served_bytes),
        )?;
        gauge(
            &mut e,
            "swarm_volunteer_connection_bytes_out",
            "UDP bytes sent over the open connections",
            one(s.connection_bytes_out),
        )?;
        gauge(
            &mut e,
            "swarm_volunteer_connection_bytes_in",
            "UDP bytes received over the open connections",
            one(s.connection_bytes_in),
        )?;
        counter(
            &mut e,
            "swarm_volunteer_busy",
            "Requests refused with BUSY",
            one(s.busy),
        )?;
        counter(
            &mut e,
            "swarm_volunteer_bad_receipts",
            "Messages refused for a bad receipt",
            one(s.bad_receipts),
        )?;
        counter(
            &mut e,
            "swarm_volunteer_audits_passed",
            "Audits passed (trainer's ledger)",
            opt(s.audits_passed),
        )?;
        counter(
            &mut e,
            "swarm_volunteer_audits_failed",
            "Audits failed (trainer's ledger)",
            opt(s.audits_failed),
        )?;
        counter(
            &mut e,
            "swarm_volunteer_credited_micro_batches",
            "Credited micro-batches (trainer's ledger)",
            opt(s.credited_micro_batches),
        )?;
        Ok(())
    }
}

/// A registry whose `/metrics` shows the trainer's snapshot.
pub fn trainer_registry(rx: watch::Receiver<Arc<Snapshot>>) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(TrainerCollector(rx)));
    r
}

/// A registry whose `/metrics` shows a volunteer's state.
pub fn volunteer_registry(rx: watch::Receiver<Arc<VolunteerState>>) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(VolunteerCollector(rx)));
    r
}
