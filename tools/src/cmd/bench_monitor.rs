//! `swarm bench monitor`: what serving the monitor costs the training. One demo-like run (the
//! trainer in this process, real peer processes on loopback) alternates blocks of steps with and
//! without a reader: a browser-like poller of `/api/v1/state` (twice a second, as the page does,
//! plus the page itself every 10 s) and a Prometheus scrape of `/metrics` every second. Blocks
//! interleave (off, on, off, on, ...) so that drift in the machine's load hits both alike.
//!
//! Two results. The ratio of mean step times, on / off, is what a user sees, but step times vary
//! by about 10% from step to step, so it cannot show a cost of a few percent. The tight one is
//! the CPU the serving takes: the monitor serves from a thread of its own (as in `swarm train
//! --http` and `swarm demo`), the kernel counts that thread's CPU time, and the bench divides it
//! by the CPU the run (trainer and peer processes, less the readers and the server) used in the
//! same blocks. On a machine whose cores the run keeps busy, taking that share of the CPU slows
//! the run by at most that share; where the run waits on links, by less.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use swarm_core::shaping::LinkShape;
use swarm_core::trainer::{Trainer, TrainerEvent, TrainerOptions};

use crate::cluster::{Cluster, lock, run_with_events};
use crate::{procfs, ui};

#[derive(clap::Args)]
pub(crate) struct BenchMonitorArgs {
    /// Run config (default: the built-in model with the demo's codecs).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Stage peers.
    #[arg(long, default_value_t = 4)]
    pub peers: usize,
    /// Steps in each block of the same mode.
    #[arg(long, default_value_t = 4)]
    pub block: u64,
    /// Blocks per mode (the run has 2 x blocks x block steps, after 2 warm-up steps).
    #[arg(long, default_value_t = 4)]
    pub blocks: u64,
    /// Link shape of every peer and the trainer.
    #[arg(long, default_value = "up=20mbit,down=80mbit,delay=15ms")]
    pub shape: LinkShape,
    /// Print the result as one JSON object on the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct BenchResult {
    steps_per_mode: u64,
    mean_step_s_off: f64,
    mean_step_s_on: f64,
    /// mean step time with readers / without: 1.02 would be a 2% cost.
    ratio: f64,
    /// CPU seconds of the monitor's serving thread over the whole run (almost all of it in the
    /// "on" blocks: nothing reads it in the others).
    serving_cpu_s: f64,
    /// CPU seconds the run used in the "on" blocks: the trainer process and the peer processes,
    /// less the serving thread and the readers.
    run_cpu_s_on: f64,
    /// serving_cpu_s / run_cpu_s_on: the serving's share of the CPU, the bound on its cost.
    serving_cpu_share: f64,
    /// CPU seconds of the readers themselves (the emulated browser and scraper; not the
    /// server's cost, reported so that nothing is hidden).
    readers_cpu_s: f64,
    /// Requests the readers made while on, and the bytes they read.
    state_polls: u64,
    scrapes: u64,
    page_loads: u64,
    bytes_read: u64,
    load_average: String,
}

/// The readers: run while `on`, count what they did.
fn readers(
    addr: SocketAddr,
    on: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    counts: Arc<[AtomicU64; 4]>,
    tid: Arc<AtomicU64>,
) {
    if let Some(t) = swarm_monitor::cpu::current_tid() {
        tid.store(u64::from(t), Ordering::Relaxed);
    }
    let t = Duration::from_secs(5);
    let mut tick = 0u64;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(500));
        if !on.load(Ordering::Relaxed) {
            continue;
        }
        tick += 1;
        let read = |path: &str, i: usize| {
            if let Ok(r) = swarm_monitor::client::get(addr, path, None, t) {
                counts[i].fetch_add(1, Ordering::Relaxed);
                counts[3].fetch_add(r.body.len() as u64, Ordering::Relaxed);
            }
        };
        read("/api/v1/state", 0);
        if tick.is_multiple_of(2) {
            read("/metrics", 1);
        }
        if tick % 20 == 1 {
            read("/", 2);
        }
    }
}

pub(crate) fn run(args: BenchMonitorArgs) -> anyhow::Result<()> {
    let warmup = 2u64;
    let steps = warmup + 2 * args.blocks * args.block;
    let cfg = super::demo::demo_config(args.config.as_deref(), steps)?;
    let stages = cfg.stages.len() - 1;
    anyhow::ensure!(
        args.peers >= stages,
        "--peers must cover the {stages} stages"
    );
    anyhow::ensure!(
        args.block >= 1 && args.blocks >= 1,
        "--block and --blocks must be >= 1"
    );
    let cluster = Arc::new(Mutex::new(Cluster::new("bench-monitor")?));
    let rt = tokio::runtime::Runtime::new()?;
    let out = rt.block_on(async {
        let mut opts = TrainerOptions::new(cfg);
        opts.shape = Some(args.shape.clone());
        opts.min_replicas = args.peers / stages;
        let mut trainer = Trainer::start(opts).await?;
        let monitor = crate::monitor::start(
            "127.0.0.1:0".parse()?,
            &Default::default(),
            swarm_monitor::Source::Trainer(trainer.observe()),
        )?;
        anyhow::ensure!(
            monitor.cpu_seconds().is_some(),
            "this system does not report a thread's CPU time (/proc/self/task/TID/schedstat)"
        );
        for i in 0..args.peers {
            lock(&cluster).spawn((i % stages) as u32, trainer.addr(), &args.shape)?;
        }
        let on = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let counts: Arc<[AtomicU64; 4]> = Arc::new(Default::default());
        let reader_tid = Arc::new(AtomicU64::new(0));
        let reader = {
            let (addr, on, stop, counts, tid) = (
                monitor.local_addr(),
                on.clone(),
                stop.clone(),
                counts.clone(),
                reader_tid.clone(),
            );
            std::thread::spawn(move || readers(addr, on, stop, counts, tid))
        };
        // CPU seconds so far, read at every step's end: the readers', and the run's.
        let readers_cpu = || {
            u32::try_from(reader_tid.load(Ordering::Relaxed))
                .ok()
                .filter(|&t| t != 0)
                .and_then(swarm_monitor::cpu::thread_seconds)
                .unwrap_or(0.0)
        };
        // The run's own CPU so far: this process and the peers, less the readers and the server.
        let run_cpu = |cluster: &Mutex<Cluster>| {
            let peers: f64 = lock(cluster)
                .pids()
                .into_iter()
                .filter_map(procfs::process_cpu_seconds)
                .sum();
            procfs::process_cpu_seconds(std::process::id()).unwrap_or(0.0) + peers
                - readers_cpu()
                - monitor.cpu_seconds().unwrap_or(0.0)
        };
        let mut cpu_on = 0.0;
        let mut last = run_cpu(&cluster);
        // Step k (0-based) of the timed part is "on" in odd blocks.
        let mode = |step: u64| step >= warmup && ((step - warmup) / args.block) % 2 == 1;
        let mut times: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        let bar = ui::progress(steps, args.json);
        let (result, _) = run_with_events(&mut trainer, &cluster, &[], |e, _| {
            if let TrainerEvent::Step(r) = e {
                bar.inc(1);
                let now = run_cpu(&cluster);
                if r.step >= warmup {
                    times[usize::from(mode(r.step))].push(r.seconds);
                    if mode(r.step) {
                        cpu_on += now - last;
                    }
                }
                last = now;
                on.store(mode(r.step + 1), Ordering::Relaxed);
            }
        })
        .await;
        bar.finish_and_clear();
        stop.store(true, Ordering::Relaxed);
        let readers_cpu_s = readers_cpu();
        let _ = reader.join();
        let serving_cpu_s = monitor.cpu_seconds().unwrap_or(0.0);
        result?;
        trainer.shutdown().await;
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let (off, on_s) = (mean(&times[0]), mean(&times[1]));
        anyhow::Ok(BenchResult {
            steps_per_mode: times[0].len().min(times[1].len()) as u64,
            mean_step_s_off: off,
            mean_step_s_on: on_s,
            ratio: on_s / off,
            serving_cpu_s,
            run_cpu_s_on: cpu_on,
            serving_cpu_share: serving_cpu_s / cpu_on.max(1e-9),
            readers_cpu_s,
            state_polls: counts[0].load(Ordering::Relaxed),
            scrapes: counts[1].load(Ordering::Relaxed),
            page_loads: counts[2].load(Ordering::Relaxed),
            bytes_read: counts[3].load(Ordering::Relaxed),
            load_average: procfs::load_average(),
        })
    });
    drop(rt);
    drop(cluster);
    let r = out?;
    if args.json {
        ui::print_json(&r)?;
    } else {
        println!(
            "monitor cost: mean step {:.3} s with readers vs {:.3} s without ({} steps each): ratio {:.4} ({:+.2}%)",
            r.mean_step_s_on,
            r.mean_step_s_off,
            r.steps_per_mode,
            r.ratio,
            (r.ratio - 1.0) * 100.0
        );
        println!(
            "serving CPU: {:.3} s of the monitor's thread against {:.1} s of the run's CPU in the same blocks: {:.3}% (readers' own CPU {:.3} s)",
            r.serving_cpu_s,
            r.run_cpu_s_on,
            r.serving_cpu_share * 100.0,
            r.readers_cpu_s
        );
        println!(
            "readers: {} state polls, {} scrapes, {} page loads, {:.1} MB read; load average {}",
            r.state_polls,
            r.scrapes,
            r.page_loads,
            r.bytes_read as f64 / 1e6,
            r.load_average
        );
    }
    Ok(())
}
