//! `swarm join [BOOTSTRAP]`: start a peer, join a swarm (or start a new one), serve until Ctrl-C,
//! then leave gracefully (announce LEAVING to a few peers).

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;
use swarm_core::Identity;
use swarm_core::membership::{MembershipConfig, RunId};
use swarm_core::peer::{Peer, PeerConfig};
use swarm_core::shaping::LinkShape;

use crate::shutdown::{Reason, ShutdownSignal};
use crate::ui;

#[derive(clap::Args)]
pub(crate) struct JoinArgs {
    /// Address (host:port) of any peer of the swarm; without it, start a new swarm.
    pub bootstrap: Option<String>,

    /// UDP address to listen on (port 0 picks a free one).
    #[arg(long, default_value = "[::]:7070")]
    pub listen: SocketAddr,

    /// Folder holding this peer's identity key (created on first start).
    #[arg(long, env = "SWARM_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// Emulate a home link, e.g. `up=20mbit,down=80mbit,delay=30ms,jitter=5ms,loss=0.1%`.
    #[arg(long)]
    pub shape: Option<LinkShape>,

    /// Run id (32 hex digits) of a new swarm; when joining, must match the bootstrap's run.
    #[arg(long)]
    pub run_id: Option<String>,

    /// Address others should use to reach this peer (repeatable), e.g. your router's public IP
    /// with a forwarded UDP port. Announced first, before the address the bootstrap saw and this
    /// machine's own.
    #[arg(long, alias = "public-addr")]
    pub announce: Vec<SocketAddr>,

    /// Stages this peer announces it serves (comma-separated indices).
    #[arg(long, value_delimiter = ',')]
    pub stages: Vec<u32>,

    /// Serve this pipeline stage of the run (default: the router's choice of the weakest stage).
    /// Without it, a swarm with no training run is joined for membership only.
    #[arg(long)]
    pub stage: Option<u32>,

    /// Memory this peer may use for its stage, e.g. `6GiB`, `800MiB` (default: MemAvailable of
    /// /proc/meminfo). The stage is chosen among those that fit; if none does, joining fails
    /// with what a stage needs.
    #[arg(long, value_parser = parse_size)]
    pub memory: Option<u64>,

    /// Misbehave on purpose on a seeded fraction of micro-batches (demos and tests of the audits):
    /// `KIND:RATE[:SEED]`, KIND one of noise, zero, stale, skip, scale-grad, skip-step,
    /// scale-step (rate per micro-batch; for the last two, per optimizer step).
    #[arg(long)]
    pub fault: Option<crate::fault::FaultSpec>,

    /// Milliseconds between gossip rounds.
    #[arg(long, env = "SWARM_GOSSIP_INTERVAL_MS", default_value_t = 2_000)]
    pub gossip_interval_ms: u64,

    /// Lifetime of this peer's record in milliseconds: a peer that vanishes leaves every view
    /// within about this long.
    #[arg(long, env = "SWARM_RECORD_TTL_MS", default_value_t = 60_000)]
    pub record_ttl_ms: u64,

    /// Milliseconds between re-signings of this peer's record (default: a quarter of the ttl).
    #[arg(long, env = "SWARM_REFRESH_INTERVAL_MS")]
    pub refresh_interval_ms: Option<u64>,

    /// Peers contacted per gossip round.
    #[arg(long, env = "SWARM_FANOUT", default_value_t = 3)]
    pub fanout: usize,

    /// Serve this peer's own monitor on this TCP address: a small page at `/`, its state as
    /// JSON at `/api/v1/state`, Prometheus metrics at `/metrics` (loopback unless
    /// `--http-public`).
    #[arg(long)]
    pub metrics: Option<SocketAddr>,

    /// Relay for peers that joined through this one and cannot reach each other (symmetric NATs,
    /// filtered UDP), within `--relay-mbit`. The trainer relays by default.
    #[arg(long)]
    pub relay: bool,

    /// The relay's budget in Mbit/s in all (one peer may send a quarter of it).
    #[arg(long, default_value_t = 32.0)]
    pub relay_mbit: f64,

    #[command(flatten)]
    pub http_flags: crate::monitor::HttpFlags,

    /// Print the startup line and the final summary as JSON.
    #[arg(long)]
    pub json: bool,

    /// Take commands on stdin, one per line (for experiment runners such as `swarm replay`):
    /// `shape SPEC` changes this peer's emulated link (needs `--shape`); end of input means the
    /// runner is gone: the peer leaves at once, so it never outlives the runner by more than
    /// a few seconds.
    #[arg(long)]
    pub control_stdin: bool,

    /// Leave when the run's trainer has not answered for this many seconds (a restarting
    /// trainer is back within seconds; one gone for good must not keep volunteers serving).
    #[arg(long = "trainer-timeout", default_value_t = 15)]
    pub trainer_timeout_s: u64,
}

#[derive(Serialize)]
struct Started {
    id: String,
    addr: String,
    run_id: String,
    peers: usize,
    /// The reachability verdict (public, punchable, symmetric, blocked, unknown); absent for a
    /// swarm's first peer.
    reach: Option<String>,
    /// What the operator can do about it.
    advice: Option<String>,
}

#[derive(Serialize)]
struct Left {
    id: String,
    left: bool,
    told: usize,
}

/// The data folder: `--data-dir`, else `$XDG_DATA_HOME/swarm`, else `~/.local/share/swarm`.
pub(crate) fn default_data_dir() -> anyhow::Result<PathBuf> {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME") {
        return Ok(PathBuf::from(d).join("swarm"));
    }
    let home = std::env::var_os("HOME").context("no --data-dir given and $HOME is not set")?;
    Ok(PathBuf::from(home).join(".local/share/swarm"))
}

/// Resolves `host:port` to one socket address.
pub(crate) fn resolve(addr: &str) -> anyhow::Result<SocketAddr> {
    addr.to_socket_addrs()
        .with_context(|| format!("cannot resolve `{addr}` (expected host:port)"))?
        .next()
        .with_context(|| format!("`{addr}` resolves to no address"))
}

fn membership_config(args: &JoinArgs) -> anyhow::Result<MembershipConfig> {
    let ttl = args.record_ttl_ms;
    let refresh = args.refresh_interval_ms.unwrap_or(ttl / 4);
    if ttl < 100 {
        bail!("--record-ttl-ms must be at least 100");
    }
    if refresh == 0 || refresh >= ttl {
        bail!("--refresh-interval-ms must be positive and below the record ttl ({ttl} ms)");
    }
    if args.gossip_interval_ms == 0 || args.gossip_interval_ms >= ttl {
        bail!("--gossip-interval-ms must be positive and below the record ttl ({ttl} ms)");
    }
    if args.fanout == 0 {
        bail!("--fanout must be at least 1");
    }
    let defaults = MembershipConfig::default();
    Ok(MembershipConfig {
        record_ttl_ms: ttl,
        refresh_interval_ms: refresh,
        gossip_interval_ms: args.gossip_interval_ms,
        fanout: args.fanout,
        leave_ttl_ms: ttl,
        // Accept others' lifetimes up to 10x ours: peers may be configured differently.
        max_ttl_ms: defaults.max_ttl_ms.max(ttl * 10),
        ..defaults
    })
}

pub(crate) fn run(args: JoinArgs) -> anyhow::Result<()> {
    let membership = membership_config(&args)?;
    if let Some(a) = args.metrics {
        args.http_flags.config(a).check()?;
    }
    let data_dir = match &args.data_dir {
        Some(d) => d.clone(),
        None => default_data_dir()?,
    };
    let identity = Identity::load_or_create(&data_dir)?;
    let bootstrap = args.bootstrap.as_deref().map(resolve).transpose()?;
    let run_id = match &args.run_id {
        Some(s) => Some(RunId::parse(s).context("--run-id must be 32 hex digits")?),
        None => None,
    };
    let config = PeerConfig {
        listen: args.listen,
        bootstrap,
        run_id,
        announce: args.announce.clone(),
        stages: args.stages.clone(),
        membership,
        shape: args.shape.clone(),
        // A swarm's first peer checks the reachability of those who join through it.
        checker: bootstrap
            .is_none()
            .then(|| SocketAddr::new(args.listen.ip(), 0)),
        relay: if args.relay {
            swarm_nat::RelayConfig::from_mbit(args.relay_mbit)
        } else {
            None
        },
        ..PeerConfig::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        // Listen for signals before anything slow: a Ctrl-C during startup still leaves cleanly.
        let mut shutdown = ShutdownSignal::new();
        if args.control_stdin {
            shutdown = shutdown.with_stdin_closed(control_stdin(args.shape.is_some()));
        }
        let peer = Peer::start(identity, config)
            .await
            .with_context(|| match bootstrap {
                Some(b) => format!("joining the swarm through {b}"),
                None => "starting a new swarm".to_owned(),
            })?;
        let record = peer.local_record();
        let addr = record
            .info
            .addrs
            .first()
            .copied()
            .unwrap_or(peer.local_addr());
        let peers = peer.status().entries.len();
        let verdict = peer.verdict();
        let advice = verdict.map(|v| swarm_nat::reachability::advice(&v, peer.local_addr().port()));
        if args.json {
            ui::print_json(&Started {
                id: peer.peer_id().to_string(),
                addr: addr.to_string(),
                run_id: peer.run_id().to_string(),
                peers,
                reach: verdict.map(|v| v.reachability.to_string()),
                advice,
            })?;
        } else {
            println!("peer   {}", peer.peer_id());
            println!("addr   {addr}");
            println!("run    {}", peer.run_id());
            if let (Some(v), Some(advice)) = (verdict, advice) {
                println!("reach  {}: {advice}", v.reachability);
            }
            match bootstrap {
                Some(b) => println!("joined through {b}; {peers} peer(s) known. Ctrl-C to leave."),
                None => println!(
                    "started a new swarm; others join with `swarm join {addr}`. Ctrl-C to leave."
                ),
            }
        }
        let mut feed = None;
        let _monitor = match args.metrics {
            Some(a) => {
                let mut f = crate::monitor::VolunteerFeed::new(&peer);
                f.update(&peer, None, None, "joining");
                let m = crate::monitor::start(a, &args.http_flags, f.source())?;
                crate::monitor::announce("metrics", &m, args.json);
                feed = Some(f);
                Some(m)
            }
            None => None,
        };
        let memory = args.memory.or_else(swarm_model::presets::available_memory);
        let joining = join_training(&peer, bootstrap, args.stage, memory, args.fault, args.json);
        let joined = tokio::select! {
            j = joining => Some(j?),
            r = shutdown.wait() => { stopped(r); None }
        };
        let trainer_timeout = Duration::from_secs(args.trainer_timeout_s.max(1));
        let (serving, stop) = match joined {
            Some(Some((worker, trainer))) => {
                let shown = worker.clone();
                let serve = serve_until_shutdown(
                    &peer,
                    worker,
                    trainer,
                    args.fault,
                    args.json,
                    trainer_timeout,
                    &mut shutdown,
                );
                tokio::pin!(serve);
                // The volunteer's own monitor is refreshed every second meanwhile.
                let (worker, stop) = loop {
                    tokio::select! {
                        r = &mut serve => break r,
                        _ = tokio::time::sleep(Duration::from_secs(1)), if feed.is_some() => {
                            if let Some(f) = &mut feed {
                                f.update(&peer, Some(&shown), Some(trainer), "serving");
                            }
                        }
                    }
                };
                if let Some(f) = &mut feed {
                    f.update(&peer, Some(&worker), Some(trainer), "leaving");
                }
                (Some((worker, trainer)), stop)
            }
            Some(None) => (None, Stop::Asked(shutdown.wait().await)),
            None => (None, Stop::Asked(Reason::StdinClosed)),
        };
        // Asked to stop by a signal, the trainer still runs: finish in-flight work and this
        // step's sync before leaving (bounded; a second Ctrl-C exits at once). When whoever
        // started us or the trainer is gone, there is nobody to finish for: leave at once.
        let graceful = stop == Stop::Asked(Reason::Signal);
        if let Some((worker, trainer)) = &serving
            && graceful
        {
            match worker.leave(*trainer, Duration::from_secs(120)).await {
                Ok(true) => {}
                Ok(false) => eprintln!("left before the trainer released this replica"),
                Err(e) => eprintln!("could not tell the trainer we leave: {e:#}"),
            }
        }
        if stop == Stop::TrainerGone {
            eprintln!(
                "the trainer has not answered for {} s: leaving",
                trainer_timeout.as_secs()
            );
        }
        let goodbye = if graceful {
            Duration::from_secs(30)
        } else {
            Duration::from_secs(2)
        };
        let id = peer.peer_id();
        let told = tokio::time::timeout(goodbye, peer.leave())
            .await
            .unwrap_or(0);
        if args.json {
            ui::print_json(&Left {
                id: id.to_string(),
                left: true,
                told,
            })?;
        } else {
            println!("left the swarm (told {told} peer(s))");
        }
        Ok(())
    })
}

#[derive(Serialize)]
struct Serving {
    stage: u32,
    step: u64,
    sync_ms: u64,
}

/// Finds the run's trainer and serves a stage of it (issue #6): returns the worker and the
/// trainer's address, or `None` when the swarm has no run and no `--stage` was asked for.
async fn join_training(
    peer: &Peer,
    bootstrap: Option<SocketAddr>,
    stage: Option<u32>,
    memory: Option<u64>,
    fault: Option<crate::fault::FaultSpec>,
    json: bool,
) -> anyhow::Result<Option<(swarm_core::stage::StageWorker, SocketAddr)>> {
    let Some(trainer) = swarm_core::stage::find_trainer(peer, bootstrap).await else {
        if stage.is_some() {
            bail!("--stage given but no peer of this swarm answers as its trainer");
        }
        if !json {
            println!("no training run in this swarm: serving membership only");
        }
        return Ok(None);
    };
    let joined = swarm_core::stage::join_run_within(
        peer,
        trainer,
        stage,
        memory,
        crate::fault::configure(fault),
    )
    .await
    .context("joining the training run")?;
    let serving = Serving {
        stage: joined.worker.stage(),
        step: joined.step,
        sync_ms: joined.sync_time.as_millis() as u64,
    };
    if json {
        ui::print_json(&serving)?;
    } else {
        println!(
            "serving stage {} from step {} (state ready in {} ms)",
            serving.stage, serving.step, serving.sync_ms
        );
    }
    Ok(Some((joined.worker, trainer)))
}

/// Why a peer stops serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Asked(Reason),
    /// The trainer did not answer for `--trainer-timeout` seconds.
    TrainerGone,
}

/// Notes a stop requested while joining.
fn stopped(r: Reason) {
    tracing::info!(reason = ?r, "stopped while joining the run");
}

/// Serves until Ctrl-C / SIGTERM / the control stdin's end, checking every second that the
/// trainer still lists this peer as a replica: a restarted trainer (resuming from its checkpoint)
/// or one that dropped this peer does not, and the peer joins the run again for the same stage
/// (loading the state the trainer names). While the trainer is unreachable it keeps its state and
/// waits, up to `trainer_timeout` (a restart takes seconds; a trainer gone for good must not leave
/// volunteers serving nothing).
async fn serve_until_shutdown(
    peer: &Peer,
    mut worker: swarm_core::stage::StageWorker,
    trainer: SocketAddr,
    fault: Option<crate::fault::FaultSpec>,
    json: bool,
    trainer_timeout: Duration,
    shutdown: &mut ShutdownSignal,
) -> (swarm_core::stage::StageWorker, Stop) {
    use swarm_core::protocol::{RunInfo, RunInfoRequest};
    let mut answered = std::time::Instant::now();
    loop {
        tokio::select! {
            r = shutdown.wait() => return (worker, Stop::Asked(r)),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let ask = tokio::time::timeout(
            Duration::from_secs(3),
            peer.shared()
                .call::<RunInfoRequest, RunInfo>(trainer, None, &RunInfoRequest),
        );
        let reply = tokio::select! {
            r = shutdown.wait() => return (worker, Stop::Asked(r)),
            r = ask => r,
        };
        let listed = match reply {
            Ok(Ok((_, info))) => {
                answered = std::time::Instant::now();
                info.replicas.iter().flatten().any(|p| *p == peer.peer_id())
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "trainer unreachable; waiting for it");
                if answered.elapsed() >= trainer_timeout {
                    return (worker, Stop::TrainerGone);
                }
                continue;
            }
            Err(_) => {
                if answered.elapsed() >= trainer_timeout {
                    return (worker, Stop::TrainerGone);
                }
                continue;
            }
        };
        if listed {
            continue;
        }
        let stage = worker.stage();
        let joining =
            swarm_core::stage::join_run(peer, trainer, Some(stage), crate::fault::configure(fault));
        let joined = tokio::select! {
            r = shutdown.wait() => return (worker, Stop::Asked(r)),
            j = joining => j,
        };
        match joined {
            Ok(j) => {
                worker = j.worker;
                let serving = Serving {
                    stage,
                    step: j.step,
                    sync_ms: j.sync_time.as_millis() as u64,
                };
                if json {
                    let _ = ui::print_json(&serving);
                } else {
                    println!(
                        "joined the run again: serving stage {stage} from step {} (state ready in {} ms)",
                        serving.step, serving.sync_ms
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "joining the run again failed; will retry"),
        }
    }
}

/// Reads `--control-stdin` commands on a thread; the receiver fires when stdin ends.
fn control_stdin(shaped: bool) -> tokio::sync::oneshot::Receiver<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            let line = line.trim();
            match line.split_once(' ').unwrap_or((line, "")) {
                ("", _) => {}
                ("shape", spec) if shaped => {
                    match spec
                        .parse::<LinkShape>()
                        .map_err(anyhow::Error::from)
                        .and_then(|s| {
                            swarm_core::shaping::reshape_process(&s).map_err(anyhow::Error::from)
                        }) {
                        Ok(_) => eprintln!("link reshaped: {spec}"),
                        Err(e) => eprintln!("control: bad shape `{spec}`: {e:#}"),
                    }
                }
                ("shape", _) => eprintln!("control: `shape` needs the peer started with --shape"),
                _ => eprintln!("control: unknown command `{line}` (expected `shape SPEC`)"),
            }
        }
        let _ = tx.send(());
    });
    rx
}

/// A byte size: a number with an optional unit (B, KiB, MiB, GiB, TiB; KB/MB/GB/TB are powers of
/// 1000; `k`, `M`, `G` as the binary ones).
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let x: f64 = num
        .parse()
        .map_err(|_| format!("{s:?}: not a size such as 8GiB"))?;
    let mult: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "k" | "K" | "KiB" => 1024.0,
        "M" | "MiB" => 1024.0 * 1024.0,
        "G" | "GiB" => 1024.0 * 1024.0 * 1024.0,
        "T" | "TiB" => 1024f64.powi(4),
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        u => return Err(format!("{s:?}: unknown unit {u:?}")),
    };
    let v = x * mult;
    if !(v.is_finite() && (0.0..1.8e19).contains(&v)) {
        return Err(format!("{s:?}: out of range"));
    }
    Ok(v as u64)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("8GiB"), Ok(8 << 30));
        assert_eq!(parse_size("800MiB"), Ok(800 << 20));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("3XB").is_err());
    }
}
