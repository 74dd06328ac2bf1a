//! `swarm status ADDR`: ask one peer for its view of the swarm and show it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;
use swarm_core::membership::{StatusReply, StatusRequest};
use swarm_core::transport::{Node, TransportConfig};
use swarm_core::{Identity, PeerId, rpc};

use crate::cmd::join::resolve;
use crate::ui;

#[derive(clap::Args)]
pub(crate) struct StatusArgs {
    /// Address (host:port) of the peer to ask.
    pub addr: String,

    /// Connect with the identity in this folder (default: a throwaway identity).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,

    /// Refuse the answer unless the peer proves this id (64 hex digits).
    #[arg(long)]
    pub peer_id: Option<String>,

    /// Give up after this many milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,

    /// Print the result as one JSON object on the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Row {
    id: String,
    addr: String,
    state: &'static str,
    stages: Vec<u32>,
    throughput: f64,
    last_seen_s: f64,
    version: String,
    /// Its reachability verdict (public, punchable, symmetric, blocked, unknown), from its record.
    reach: String,
    /// How the answering peer's connection to it runs: direct, punched, relayed; null without one.
    path: Option<String>,
    /// Bytes the answering peer relayed for it (when it is a relay) or moved to it through a
    /// relay.
    relay_bytes: u64,
    /// The answering peer itself.
    #[serde(rename = "self")]
    is_self: bool,
}

#[derive(Serialize)]
struct Status {
    peer: String,
    run_id: String,
    peers: Vec<Row>,
    /// Entries dropped because their signature or id did not verify.
    invalid: usize,
}

pub(crate) fn run(args: StatusArgs) -> anyhow::Result<()> {
    let addr = resolve(&args.addr)?;
    let expected = match &args.peer_id {
        Some(s) => Some(PeerId::parse(s).context("--peer-id must be 64 hex digits")?),
        None => None,
    };
    let identity = match &args.data_dir {
        Some(d) => Identity::load_or_create(d)?,
        None => Identity::generate(),
    };
    let timeout = Duration::from_millis(args.timeout_ms);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (remote, reply) = rt.block_on(async {
        tokio::time::timeout(timeout, ask(identity, addr, expected, timeout))
            .await
            .with_context(|| format!("no answer from {addr} within {timeout:?}"))?
    })?;
    show(remote, reply, args.json)
}

async fn ask(
    identity: Identity,
    addr: SocketAddr,
    expected: Option<PeerId>,
    timeout: Duration,
) -> anyhow::Result<(PeerId, StatusReply)> {
    // Bind on the same kind of address as the target so loopback stays on loopback.
    let listen: SocketAddr = match (addr.ip().is_loopback(), addr.is_ipv6()) {
        (true, false) => "127.0.0.1:0",
        (true, true) => "[::1]:0",
        (false, false) => "0.0.0.0:0",
        (false, true) => "[::]:0",
    }
    .parse()?;
    let node = Node::bind(identity, listen, TransportConfig::default(), None, None)?;
    let conn = node
        .connect(addr, expected)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let reply: StatusReply = rpc::call_timeout(&conn, &StatusRequest, timeout)
        .await
        .with_context(|| format!("asking {addr} for its status"))?;
    let remote = conn.remote_id();
    node.close();
    Ok((remote, reply))
}

fn show(remote: PeerId, reply: StatusReply, json: bool) -> anyhow::Result<()> {
    let mut invalid = 0;
    let mut rows = Vec::new();
    for e in &reply.entries {
        // The peer could lie about others; show only what their own signatures back.
        if e.record.verify().is_err() || e.record.run_id != reply.run_id {
            invalid += 1;
            continue;
        }
        let r = &e.record;
        rows.push(Row {
            id: r.peer_id.to_string(),
            addr: r.info.addrs.first().map_or("-".into(), |a| a.to_string()),
            state: r.info.state.as_str(),
            stages: r.info.stages.clone(),
            throughput: r.info.throughput,
            last_seen_s: e.last_seen_ago_ms as f64 / 1000.0,
            version: r.info.version.clone(),
            reach: r.info.reach.to_string(),
            path: e.path.map(|p| p.to_string()),
            relay_bytes: e.relay_bytes,
            is_self: r.peer_id == remote,
        });
    }
    if !rows.iter().any(|r| r.is_self) {
        bail!("the peer at {remote} did not include its own valid record");
    }
    if invalid > 0 {
        tracing::warn!(invalid, "dropped entries whose signatures do not verify");
    }
    if json {
        return ui::print_json(&Status {
            peer: remote.to_string(),
            run_id: reply.run_id.to_string(),
            peers: rows,
            invalid,
        });
    }
    println!("run {}  ({} peers)", reply.run_id, rows.len());
    println!(
        "{:<13} {:<22} {:<8} {:<12} {:>12} {:>10}  {:<10} {:<8} {:>10}",
        "id", "addr", "state", "stages", "throughput", "last seen", "reach", "path", "relayed"
    );
    for r in &rows {
        let stages = if r.stages.is_empty() {
            "-".to_owned()
        } else {
            r.stages
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        let id = PeerId::parse(&r.id).map_or(r.id.clone(), |p| p.short());
        println!(
            "{:<13} {:<22} {:<8} {:<12} {:>12.1} {:>9.1}s  {:<10} {:<8} {:>10}{}",
            id,
            r.addr,
            r.state,
            stages,
            r.throughput,
            r.last_seen_s,
            r.reach,
            r.path.as_deref().unwrap_or("-"),
            if r.relay_bytes > 0 {
                format!("{:.1} MB", r.relay_bytes as f64 / 1e6)
            } else {
                "-".to_owned()
            },
            if r.is_self { "  (self)" } else { "" }
        );
    }
    Ok(())
}
