//! `swarm demo --nat home|symmetric|mixed` (issue #14): the demo's swarm behind real NAT routers,
//! for a user to watch what the NAT tests check. Network namespaces and nftables routers
//! (`swarm-netlab`, so it needs root): the trainer on a public segment, the volunteers behind
//! home routers (endpoint-independent mapping, punchable), symmetric NATs (relayed) or a firewall
//! that lets UDP out only to the trainer (relayed). Every process is this binary (`swarm train`,
//! `swarm join`) started inside its namespace; each volunteer's join verdict is printed as it
//! comes, and the end shows each volunteer's path, its work and its relay bytes. Everything the
//! demo makes is deleted when it ends, on every exit path.

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use swarm_netlab::{Host, Lab, Nat};

use super::demo::DemoArgs;
use crate::ui;

/// Which routers the volunteers sit behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum NatScenario {
    /// Every volunteer behind one of two home routers: all hops punched, no relay bytes.
    Home,
    /// As home, but the first replica of the last stage sits behind a symmetric NAT: its hops
    /// run through the trainer's relay, and the router gives it less work.
    Symmetric,
    /// Volunteers in turn behind a home router, a symmetric NAT and a firewall that lets UDP
    /// out only to the trainer.
    Mixed,
}

impl NatScenario {
    fn name(self) -> &'static str {
        match self {
            NatScenario::Home => "home",
            NatScenario::Symmetric => "symmetric",
            NatScenario::Mixed => "mixed",
        }
    }
}

/// The kind of router in front of volunteer `i` of `peers` (stage `i % stages`).
fn router_kind(s: NatScenario, i: usize, peers: usize, stages: usize, trainer: Ipv4Addr) -> Nat {
    match s {
        NatScenario::Home => Nat::Home,
        // The first replica of the last stage: its stage keeps a direct replica when peers
        // cover every stage twice.
        NatScenario::Symmetric if i == stages - 1 && peers > stages => Nat::Symmetric,
        NatScenario::Symmetric => Nat::Home,
        NatScenario::Mixed => match i % 3 {
            0 => Nat::Home,
            1 => Nat::Symmetric,
            _ => Nat::UdpBlocked { allow: trainer },
        },
    }
}

fn kind_name(n: Nat) -> &'static str {
    match n {
        Nat::Home => "home",
        Nat::Symmetric => "symmetric",
        Nat::UdpBlocked { .. } => "udp-blocked",
    }
}

/// A child process inside the lab, killed on drop; its stdout lines on a channel.
struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(host: &Host, args: &[String]) -> anyhow::Result<Proc> {
    let exe = std::env::current_exe().context("locating the swarm binary")?;
    let mut child = host
        .command(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting swarm {}", args.join(" ")))?;
    let stdout = child.stdout.take().context("child stdout")?;
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Ok(Proc { child, lines })
}

/// The first JSON object `p` prints within `limit`.
fn first_json(p: &Proc, limit: Duration, what: &str) -> anyhow::Result<serde_json::Value> {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = p
            .lines
            .recv_timeout(left)
            .map_err(|_| anyhow::anyhow!("{what} printed nothing in {limit:?}"))?;
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
            && v.is_object()
        {
            return Ok(v);
        }
    }
}

/// The demo's folder (config, identities), deleted on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new() -> anyhow::Result<TempDir> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let p = std::env::temp_dir().join(format!("swarm-demo-nat-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }

    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[derive(Serialize)]
struct Volunteer {
    peer: String,
    stage: u32,
    /// The router in front of it: home, symmetric or udp-blocked.
    router: &'static str,
    /// Its join verdict.
    reach: String,
    micro_batches: u64,
    relay_bytes: u64,
}

#[derive(Serialize)]
struct Report {
    nat: &'static str,
    steps: u64,
    initial_loss: f64,
    final_loss: f64,
    replica_hash_mismatches: u64,
    /// Bytes the trainer's relay carried, over all volunteers.
    relay_bytes: u64,
    volunteers: Vec<Volunteer>,
    /// The trainer's whole summary (as `swarm train --json` prints it).
    summary: serde_json::Value,
}

/// Where the trainer's monitor listens inside its namespace.
const MONITOR_INSIDE: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 7080);

/// Runs the demo of `cfg` (the demo's config, whose stages `args.peers` covers) behind the
/// routers of `scenario`.
pub(crate) fn run(
    args: &DemoArgs,
    scenario: NatScenario,
    cfg: swarm_model::RunConfig,
) -> anyhow::Result<()> {
    let stages = cfg.stages.len() - 1;
    anyhow::ensure!(
        args.faulty_peer.is_none()
            && args.kill_peer_at_step.is_none()
            && args.join_peer_at_step.is_none()
            && args.audit_rate == swarm_core::trainer::audit::DEFAULT_RATE,
        "--nat runs the plain demo with the trainer's defaults: no --faulty-peer, --kill-peer-at-step, --join-peer-at-step or --audit-rate"
    );
    if !args.no_http {
        args.http_flags.config(args.http).check()?;
    }
    let mut lab = Lab::new("demo")
        .context("building the NAT lab (needs root, iproute2, nftables and conntrack)")?;
    let dir = TempDir::new()?;
    let cfg_path = dir.path().join("run.toml");
    std::fs::write(&cfg_path, cfg.to_toml()?)?;
    let t_host = lab.public_host("trainer")?;
    let trainer_addr = format!("{}:7000", t_host.ip());
    // The checker on a second IP of the trainer's host, so a firewall that lets UDP reach only
    // the trainer's address is told apart from a NAT that can be punched.
    let checker_addr = format!("{}:0", lab.add_public_ip(&t_host)?);
    let mut targs: Vec<String> = [
        "train",
        "--config",
        cfg_path.to_str().context("temp path")?,
        "--listen",
        &trainer_addr,
        "--data-dir",
        dir.path().join("trainer").to_str().context("temp path")?,
        "--min-replicas",
        &(args.peers / stages).to_string(),
        "--shape",
        &args.shape.to_string(),
        "--checker-addr",
        &checker_addr,
        "--http",
        &MONITOR_INSIDE.to_string(),
        "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(out) = &args.out {
        targs.extend(["--out".into(), out.display().to_string()]);
    }
    let trainer = spawn(&t_host, &targs)?;
    // The trainer's monitor listens on its namespace's loopback; the demo carries it out to
    // `--http` here, where the user's browser is.
    let _monitor = if args.no_http {
        None
    } else {
        let f = super::ns_forward::Forward::start(args.http, &t_host, MONITOR_INSIDE)?;
        crate::monitor::announce_url("monitor", &format!("http://{}/", f.addr()), args.json);
        Some(f)
    };
    if !args.json {
        println!(
            "demo --nat {}: trainer on the public segment at {trainer_addr}, {} volunteers over {stages} stages behind NAT routers, links {}",
            scenario.name(),
            args.peers,
            args.shape
        );
    }
    // Routers: two home routers shared round-robin, and one router of its own for each other
    // kind of volunteer (a symmetric NAT or a firewall per volunteer).
    let mut homes = [
        lab.router("home1", Nat::Home)?,
        lab.router("home2", Nat::Home)?,
    ];
    let mut own = Vec::new();
    let mut vols = Vec::new();
    for i in 0..args.peers {
        let stage = (i % stages) as u32;
        let kind = router_kind(scenario, i, args.peers, stages, t_host.ip());
        let host = match kind {
            Nat::Home => {
                let r = &mut homes[i % 2];
                lab.home_host(r, &format!("v{i}"))?
            }
            other => {
                let mut r = lab.router(&format!("r{i}"), other)?;
                let h = lab.home_host(&mut r, &format!("v{i}"))?;
                own.push(r);
                h
            }
        };
        let p = spawn(
            &host,
            &[
                "join".into(),
                trainer_addr.clone(),
                "--stage".into(),
                stage.to_string(),
                // One port per volunteer: a home router's endpoint-independent map is keyed
                // by the inside port.
                "--listen".into(),
                format!("[::]:{}", 7100 + i),
                "--data-dir".into(),
                dir.path().join(format!("v{i}")).display().to_string(),
                "--shape".into(),
                args.shape.to_string(),
                "--json".into(),
            ],
        )?;
        let started = first_json(&p, Duration::from_secs(60), &format!("volunteer {i}"))?;
        let id = started["id"].as_str().unwrap_or_default().to_owned();
        let reach = started["reach"].as_str().unwrap_or("unknown").to_owned();
        if !args.json {
            println!(
                "  volunteer {i} ({}), stage {stage}, behind a {} router: {reach}. {}",
                &id[..id.len().min(12)],
                kind_name(kind),
                started["advice"].as_str().unwrap_or_default()
            );
        }
        vols.push((id, stage, kind, reach, p));
    }
    // The trainer's last line is its summary; its progress goes to stderr.
    let limit = Duration::from_secs(120 + 30 * args.steps);
    let deadline = Instant::now() + limit;
    let mut last = String::new();
    loop {
        match trainer.lines.recv_timeout(Duration::from_millis(200)) {
            Ok(l) => last = l,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if Instant::now() > deadline {
            bail!("the run did not finish in {limit:?}");
        }
    }
    let summary: serde_json::Value = serde_json::from_str(&last)
        .with_context(|| format!("the trainer ended without its summary (last line: {last})"))?;
    let work = summary["peers"].as_array().cloned().unwrap_or_default();
    let volunteers: Vec<Volunteer> = vols
        .iter()
        .map(|(id, stage, kind, reach, _)| {
            let w = work.iter().find(|p| p["peer"] == id.as_str());
            let num = |k: &str| w.and_then(|w| w[k].as_u64()).unwrap_or(0);
            Volunteer {
                peer: id.clone(),
                stage: *stage,
                router: kind_name(*kind),
                reach: reach.clone(),
                micro_batches: num("micro_batches"),
                relay_bytes: num("relay_bytes"),
            }
        })
        .collect();
    let report = Report {
        nat: scenario.name(),
        steps: summary["steps"].as_u64().unwrap_or(0),
        initial_loss: summary["initial_loss"].as_f64().unwrap_or(f64::NAN),
        final_loss: summary["final_loss"].as_f64().unwrap_or(f64::NAN),
        replica_hash_mismatches: summary["replica_hash_mismatches"].as_u64().unwrap_or(0),
        relay_bytes: volunteers.iter().map(|v| v.relay_bytes).sum(),
        volunteers,
        summary,
    };
    drop(vols);
    drop(trainer);
    drop(lab);
    if args.json {
        ui::print_json(&report)
    } else {
        println!(
            "{} steps, loss {:.4} -> {:.4}, replica hash mismatches {}, relay bytes {}",
            report.steps,
            report.initial_loss,
            report.final_loss,
            report.replica_hash_mismatches,
            report.relay_bytes
        );
        println!(
            "  {:<14} {:>5} {:<12} {:<10} {:>13} {:>12}",
            "volunteer", "stage", "router", "verdict", "micro-batches", "relay bytes"
        );
        for v in &report.volunteers {
            println!(
                "  {:<14} {:>5} {:<12} {:<10} {:>13} {:>12}",
                &v.peer[..v.peer.len().min(12)],
                v.stage,
                v.router,
                v.reach,
                v.micro_batches,
                v.relay_bytes
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenarios_place_volunteers_as_documented() {
        let t = Ipv4Addr::new(198, 51, 100, 1);
        let kinds = |s| {
            (0..4)
                .map(|i| router_kind(s, i, 4, 2, t))
                .collect::<Vec<_>>()
        };
        assert_eq!(kinds(NatScenario::Home), vec![Nat::Home; 4]);
        // The first replica of the last stage (peer 1 of 4 over 2 stages) is the symmetric one.
        assert_eq!(
            kinds(NatScenario::Symmetric),
            vec![Nat::Home, Nat::Symmetric, Nat::Home, Nat::Home]
        );
        // With one replica per stage nobody is put behind a symmetric NAT: the stage would have
        // no direct replica.
        assert_eq!(
            (0..2)
                .map(|i| router_kind(NatScenario::Symmetric, i, 2, 2, t))
                .collect::<Vec<_>>(),
            vec![Nat::Home; 2]
        );
        assert_eq!(
            kinds(NatScenario::Mixed),
            vec![
                Nat::Home,
                Nat::Symmetric,
                Nat::UdpBlocked { allow: t },
                Nat::Home
            ]
        );
    }
}
