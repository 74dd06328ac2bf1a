//! The flags and start-up of the HTTP monitor (`swarm train --http`, `swarm demo`, `swarm join
//! --metrics`): the server itself is `swarm_monitor`'s.

use std::net::SocketAddr;

use swarm_monitor::{HttpConfig, Monitor, Source};

/// How a command serves its monitor.
#[derive(clap::Args, Clone, Debug, Default)]
pub(crate) struct HttpFlags {
    /// Allow a non-loopback address for the monitor; every request must then carry the bearer
    /// token (`--http-token`).
    #[arg(long)]
    pub http_public: bool,
    /// Bearer token the monitor requires (at least 16 characters): `Authorization: Bearer T`, or
    /// `?token=T` in the page's URL. Required with `--http-public`.
    #[arg(long, env = "SWARM_HTTP_TOKEN", hide_env_values = true)]
    pub http_token: Option<String>,
}

impl HttpFlags {
    pub(crate) fn config(&self, addr: SocketAddr) -> HttpConfig {
        let mut c = HttpConfig::new(addr);
        c.allow_public = self.http_public;
        c.token = self.http_token.clone();
        c
    }
}

/// Starts a monitor for `source` on `addr`, or explains why not. It serves from a thread of its
/// own, so that readers never take a worker from the training's runtime.
pub(crate) fn start(
    addr: SocketAddr,
    flags: &HttpFlags,
    source: Source,
) -> anyhow::Result<Monitor> {
    Ok(Monitor::start_on_own_thread(flags.config(addr), source)?)
}

/// The line that tells the user where the page is (stdout for people, stderr under `--json` so
/// that stdout's last line stays the JSON object).
pub(crate) fn announce(what: &str, m: &Monitor, json: bool) {
    announce_url(what, &m.url(), json);
}

/// [`announce`] for a monitor served at `url` (one forwarded from elsewhere).
pub(crate) fn announce_url(what: &str, url: &str, json: bool) {
    let line = format!("{what}: {url} (JSON: {url}api/v1/state, Prometheus: {url}metrics)");
    if json {
        eprintln!("{line}");
    } else {
        println!("{line}");
    }
}

/// The verdict of the reachability check the swarm ran on this peer at join ("unknown" for a
/// swarm's first peer, which nobody checks).
fn reachability(peer: &swarm_core::peer::Peer) -> String {
    peer.verdict()
        .map_or_else(|| "unknown".to_owned(), |v| v.reachability.to_string())
}

/// A volunteer's state for its own monitor (`swarm join --metrics`), refreshed by the join loop.
pub(crate) struct VolunteerFeed {
    tx: tokio::sync::watch::Sender<std::sync::Arc<swarm_monitor::VolunteerState>>,
    state: swarm_monitor::VolunteerState,
}

impl VolunteerFeed {
    pub(crate) fn new(peer: &swarm_core::peer::Peer) -> VolunteerFeed {
        let record = peer.local_record();
        let state = swarm_monitor::VolunteerState {
            version: swarm_monitor::VOLUNTEER_SCHEMA_VERSION,
            peer_id: peer.peer_id().to_string(),
            listen_addr: peer.local_addr().to_string(),
            software: record.info.version.clone(),
            state: "membership".into(),
            reachability: reachability(peer),
            ..Default::default()
        };
        let (tx, _) = tokio::sync::watch::channel(std::sync::Arc::new(state.clone()));
        VolunteerFeed { tx, state }
    }

    pub(crate) fn source(&self) -> Source {
        Source::Volunteer(self.tx.subscribe())
    }

    /// Refreshes from the peer and (when serving a stage) its worker.
    pub(crate) fn update(
        &mut self,
        peer: &swarm_core::peer::Peer,
        worker: Option<&swarm_core::stage::StageWorker>,
        trainer: Option<SocketAddr>,
        state: &str,
    ) {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &mut self.state;
        s.seq += 1;
        s.updated_unix_ms = swarm_core::peer::unix_now();
        s.state = state.into();
        s.run_id = Some(peer.run_id().to_string());
        s.reachability = reachability(peer);
        s.trainer_addr = trainer.map(|t| t.to_string());
        let conns = peer.shared().connection_stats();
        s.connection_bytes_out = conns.iter().map(|c| c.2).sum();
        s.connection_bytes_in = conns.iter().map(|c| c.3).sum();
        if let Some(w) = worker {
            let st = w.stats();
            let ch = |name: &str,
                      wire: &std::sync::atomic::AtomicU64,
                      dense: &std::sync::atomic::AtomicU64| {
                swarm_core::trainer::observe::ChannelBytes {
                    channel: name.into(),
                    wire_bytes: wire.load(Relaxed),
                    dense_bytes: dense.load(Relaxed),
                    frames: 0,
                }
            };
            s.stage = Some(w.stage());
            s.forwards = st.forwards.load(Relaxed);
            s.backwards = st.backwards.load(Relaxed);
            s.channels = vec![
                ch("activations", &st.activations_wire, &st.activations_dense),
                ch("gradients", &st.gradients_wire, &st.gradients_dense),
                ch("sync", &st.sync_wire, &st.sync_dense),
            ];
            s.state_served_bytes = st.state_served.load(Relaxed);
            s.busy = st.busy.load(Relaxed);
            s.bad_receipts = st.bad_receipts.load(Relaxed);
            if let Some(c) = st.credit() {
                s.audits_passed = Some(c.audits_passed);
                s.audits_failed = Some(c.audits_failed);
                s.credited_micro_batches = Some(c.credited_micro_batches);
            }
        }
        self.tx.send_replace(std::sync::Arc::new(s.clone()));
    }
}
