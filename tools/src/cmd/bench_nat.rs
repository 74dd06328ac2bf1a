//! `swarm bench nat` (issue #14): how long a connection between two volunteers behind two home
//! routers takes to come up (a short direct dial that the routers drop, then a hole punch the
//! bootstrap coordinates). Real NATs: network namespaces and nftables routers (`swarm-netlab`), so
//! it needs root; everything it makes is deleted when it ends. Each round uses two new peers on
//! new ports, so every connection needs a new punch.
//!
//! Then the relay: a volunteer behind a symmetric NAT is reached through the bootstrap's relay;
//! bulk transfers over that relayed connection are timed against the same transfers from the
//! same volunteer straight to the bootstrap (the anchor, in the same invocation).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use swarm_core::Identity;
use swarm_core::membership::{StatusReply, StatusRequest};
use swarm_core::peer::{Peer, PeerConfig};
use swarm_core::rpc::{Bulk, BulkAck};
use swarm_nat::PathKind;
use swarm_netlab::{Host, Lab, Nat};

use crate::ui;

#[derive(clap::Args)]
pub(crate) struct BenchNatArgs {
    /// Punches to time (each between two fresh peers).
    #[arg(long, default_value_t = 10)]
    pub rounds: u32,
    /// The relay's budget (Mbit/s in all; one peer may send a quarter). The default is high so
    /// the relay mechanism itself is measured; the trainer's default is 32.
    #[arg(long, default_value_t = 400.0)]
    pub relay_mbit: f64,
    /// Megabytes moved per throughput measurement (relayed and direct).
    #[arg(long, default_value_t = 8)]
    pub transfer_mb: u32,
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
    relay: RelayReport,
    load_average: String,
}

#[derive(serde::Serialize)]
struct RelayReport {
    budget_mbit: f64,
    /// Time to a relayed connection to the symmetric volunteer (direct dial, then the tunnel).
    connect_ms: f64,
    /// Bulk transfers through the relay (volunteer -> relay -> symmetric volunteer).
    relayed_mbit_s: f64,
    /// The same transfers from the same volunteer straight to the bootstrap.
    direct_mbit_s: f64,
    ratio: f64,
    /// Bytes the relay counted for the sender.
    relay_bytes_counted: u64,
}

fn start(host: &Host, rt: &tokio::runtime::Runtime, cfg: PeerConfig) -> anyhow::Result<Peer> {
    Ok(host.enter(|| rt.block_on(Peer::start(Identity::generate(), cfg)))??)
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub(crate) fn run(args: BenchNatArgs) -> anyhow::Result<()> {
    if args.rounds == 0 || args.rounds > 200 {
        bail!("--rounds must be 1..=200");
    }
    let mut lab =
        Lab::new("bench").context("building the NAT lab (needs root, iproute2, nftables)")?;
    let boot_host = lab.public_host("boot")?;
    let mut r1 = lab.router("r1", Nat::Home)?;
    let mut r2 = lab.router("r2", Nat::Home)?;
    let mut r3 = lab.router("r3", Nat::Symmetric)?;
    let a = lab.home_host(&mut r1, "a")?;
    let b = lab.home_host(&mut r2, "b")?;
    let c = lab.home_host(&mut r3, "c")?;
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
            relay: swarm_nat::RelayConfig::from_mbit(args.relay_mbit),
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
    let relay = bench_relay(&rt, &boot, &a, &c, boot_addr, &args)?;
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
        relay,
        load_average: crate::procfs::load_average(),
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
        let r = &report.relay;
        println!(
            "relay ({} Mbit/s budget): connected in {:.0} ms; {:.1} Mbit/s relayed vs {:.1} direct ({:.2}x)",
            r.budget_mbit, r.connect_ms, r.relayed_mbit_s, r.direct_mbit_s, r.ratio
        );
        Ok(())
    }
}

/// Moves `mb` megabytes to `to` in 1 MB requests; Mbit/s.
async fn transfer(
    from: &Peer,
    to_addr: SocketAddr,
    to: swarm_core::PeerId,
    mb: u32,
) -> anyhow::Result<f64> {
    let payload = vec![0x5au8; 1_000_000];
    let t = Instant::now();
    for _ in 0..mb {
        let (_, ack): (_, BulkAck) = from
            .shared()
            .call(
                to_addr,
                Some(to),
                &Bulk {
                    payload: payload.clone(),
                },
            )
            .await
            .context("bulk transfer")?;
        if ack.bytes != payload.len() as u64 {
            bail!("the receiver got {} of {} bytes", ack.bytes, payload.len());
        }
    }
    Ok(f64::from(mb) * 8.0 / t.elapsed().as_secs_f64())
}

fn bench_relay(
    rt: &tokio::runtime::Runtime,
    boot: &Peer,
    a: &Host,
    c: &Host,
    boot_addr: SocketAddr,
    args: &BenchNatArgs,
) -> anyhow::Result<RelayReport> {
    let join = |port: u16| PeerConfig {
        listen: SocketAddr::from(([0, 0, 0, 0], port)),
        bootstrap: Some(boot_addr),
        ..PeerConfig::default()
    };
    let pc = start(c, rt, join(40_000))?;
    let pa = start(a, rt, join(40_001))?;
    let c_addr = pc.local_record().info.addrs[0];
    let report = rt.block_on(async {
        // A must hold C's record (its verdict) before dialing; gossip brings it in seconds.
        let t = Instant::now();
        while pa
            .shared()
            .with_membership(|m| m.get(&pc.peer_id()).is_none())
        {
            if t.elapsed() > Duration::from_secs(30) {
                bail!("the volunteer never learned the symmetric peer's record");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let t = Instant::now();
        tokio::time::timeout(
            Duration::from_secs(40),
            pa.shared().call::<StatusRequest, StatusReply>(
                c_addr,
                Some(pc.peer_id()),
                &StatusRequest,
            ),
        )
        .await
        .context("relayed connect timed out")?
        .context("no relayed connection")?;
        let connect_ms = t.elapsed().as_secs_f64() * 1000.0;
        if pa.path(pc.peer_id()) != Some(PathKind::Relayed) {
            bail!("the connection to the symmetric peer is not relayed");
        }
        let relayed = tokio::time::timeout(
            Duration::from_secs(300),
            transfer(&pa, c_addr, pc.peer_id(), args.transfer_mb),
        )
        .await
        .context("relayed transfer timed out")??;
        let direct = tokio::time::timeout(
            Duration::from_secs(300),
            transfer(&pa, boot_addr, boot.peer_id(), args.transfer_mb),
        )
        .await
        .context("direct transfer timed out")??;
        let counted = boot
            .shared()
            .relay()
            .map_or(0, |r| r.usage(&pa.peer_id()).sent);
        Ok(RelayReport {
            budget_mbit: args.relay_mbit,
            connect_ms,
            relayed_mbit_s: relayed,
            direct_mbit_s: direct,
            ratio: relayed / direct,
            relay_bytes_counted: counted,
        })
    });
    for p in [pa, pc] {
        rt.block_on(async {
            let _ = tokio::time::timeout(Duration::from_secs(5), p.leave()).await;
        });
    }
    report
}
