//! `swarm bench nat` (issue #14): how long a connection between two volunteers behind two home
//! routers takes to come up (a short direct dial that the routers drop, then a hole punch the
//! bootstrap coordinates). Real NATs: network namespaces and nftables routers (`swarm-netlab`), so
//! it needs root; everything it makes is deleted when it ends. Each round uses two new peers on
//! new ports, so every connection needs a new punch.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use swarm_core::Identity;
use swarm_core::membership::{StatusReply, StatusRequest};
use swarm_core::peer::{Peer, PeerConfig};
use swarm_nat::PathKind;
use swarm_netlab::{Host, Lab, Nat};

use crate::ui;

#[derive(clap::Args)]
pub struct BenchNatArgs {
    /// Punches to time (each between two fresh peers).
    #[arg(long, default_value_t = 10)]
    pub rounds: u32,
    /// Print the result as one JSON object on the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(serde::Serialize)]
struct Report {
    rounds: u32,
    punched: u32,
    /// Time from the first dial to an authenticated connection, per round (ms): a 1.5 s direct
    /// dial the routers drop, the punch request, the start delay and the punch.
    connect_ms: Vec<f64>,
    connect_ms_median: f64,
    connect_ms_p95: f64,
    load_average: String,
}

fn start(host: &Host, rt: &tokio::runtime::Runtime, cfg: PeerConfig) -> anyhow::Result<Peer> {
    Ok(host.enter(|| rt.block_on(Peer::start(Identity::generate(), cfg)))??)
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn run(args: BenchNatArgs) -> anyhow::Result<()> {
    if args.rounds == 0 || args.rounds > 200 {
        bail!("--rounds must be 1..=200");
    }
    let mut lab =
        Lab::new("bench").context("building the NAT lab (needs root, iproute2, nftables)")?;
    let boot_host = lab.public_host("boot")?;
    let mut r1 = lab.router("r1", Nat::Home)?;
    let mut r2 = lab.router("r2", Nat::Home)?;
    let a = lab.home_host(&mut r1, "a")?;
    let b = lab.home_host(&mut r2, "b")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let boot_addr = SocketAddr::from((boot_host.ip(), 7000));
    let boot = start(
        &boot_host,
        &rt,
        PeerConfig {
            listen: boot_addr,
            checker: Some(SocketAddr::from((boot_host.ip(), 0))),
            ..PeerConfig::default()
        },
    )?;
    let mut times = Vec::new();
    let mut punched = 0;
    for i in 0..args.rounds {
        // Gossip slowed down so that no exchange connects the two before the timed dial; B
        // starts first, so A learns B's record (and its verdict) from the bootstrap.
        let join = |port: u16| PeerConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], port)),
            bootstrap: Some(boot_addr),
            membership: swarm_core::membership::MembershipConfig {
                gossip_interval_ms: 50_000,
                ..Default::default()
            },
            ..PeerConfig::default()
        };
        let pb = start(&b, &rt, join(30_000 + i as u16))?;
        let pa = start(&a, &rt, join(20_000 + i as u16))?;
        let b_addr = pb.local_record().info.addrs[0];
        let t = Instant::now();
        rt.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(40),
                pa.shared().call::<StatusRequest, StatusReply>(
                    b_addr,
                    Some(pb.peer_id()),
                    &StatusRequest,
                ),
            )
            .await
        })
        .context("punch timed out")?
        .context("no connection between the two homes")?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        if pa.path(pb.peer_id()) == Some(PathKind::Punched) {
            punched += 1;
        }
        if !args.json {
            eprintln!("round {i}: connected in {ms:.0} ms");
        }
        times.push(ms);
        for p in [pa, pb] {
            rt.block_on(async {
                let _ = tokio::time::timeout(Duration::from_secs(5), p.leave()).await;
            });
        }
    }
    rt.block_on(async {
        let _ = tokio::time::timeout(Duration::from_secs(5), boot.leave()).await;
    });
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let report = Report {
        rounds: args.rounds,
        punched,
        connect_ms_median: quantile(&sorted, 0.5),
        connect_ms_p95: quantile(&sorted, 0.95),
        connect_ms: times,
        load_average: std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
            .to_string(),
    };
    drop(lab);
    if args.json {
        ui::print_json(&report)
    } else {
        println!(
            "{} of {} connections punched; connect time median {:.0} ms, p95 {:.0} ms (load {})",
            report.punched,
            report.rounds,
            report.connect_ms_median,
            report.connect_ms_p95,
            report.load_average
        );
        Ok(())
    }
}
