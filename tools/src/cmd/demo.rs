//! `swarm demo`: a whole swarm on loopback. The trainer runs in this process; N stage peers are
//! child processes of this same binary (`swarm join ADDR --stage K --shape SPEC`), each behind a
//! link shaped like a home connection. Trains the default model (or `--config`) on the built-in
//! corpus with a progress bar and ends with a summary. Children are killed on every exit path
//! (their guard's `Drop`), including errors and Ctrl-C.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use swarm_core::shaping::LinkShape;
use swarm_core::trainer::{Trainer, TrainerEvent, TrainerOptions};

use super::train_swarm::{Progress, load_config, print_summary, report};
use crate::ui;

// Codecs of the demo unless `--config` sets them: see `swarm_core::trainer::HOME_ACTIVATIONS`.
use swarm_core::trainer::{
    HOME_ACTIVATIONS as DEMO_ACTIVATIONS, HOME_GRADIENTS as DEMO_GRADIENTS, HOME_SYNC as DEMO_SYNC,
};

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Stage peers to start (spread over the stages round-robin).
    #[arg(long, default_value_t = 4)]
    pub peers: usize,

    /// Steps to train.
    #[arg(long, default_value_t = 30)]
    pub steps: u64,

    /// Link shape of every peer (and the trainer).
    #[arg(long, default_value = "up=20mbit,down=80mbit,delay=15ms")]
    pub shape: LinkShape,

    /// SIGKILL one replica (of the last stage) during step K (0-based).
    #[arg(long)]
    pub kill_peer_at_step: Option<u64>,

    /// Start one more peer (for the killed peer's stage, else stage 0) after step K.
    #[arg(long)]
    pub join_peer_at_step: Option<u64>,

    /// Run config (default: the built-in model with the demo's codecs).
    #[arg(long)]
    pub config: Option<PathBuf>,

    /// Write checkpoints here (every `train.checkpoint_every` steps and at the end).
    #[arg(long)]
    pub out: Option<PathBuf>,

    /// Seconds one micro-batch attempt may take before it is retried.
    #[arg(long, default_value_t = 30)]
    pub attempt_timeout_s: u64,

    /// Print the summary as one JSON object on the last line of stdout.
    #[arg(long)]
    pub json: bool,

    /// Internal: run as one of the demo's stage peers for the trainer at this address.
    #[arg(long, hide = true, requires = "serve_stage")]
    pub peer_of: Option<SocketAddr>,

    /// Internal: the stage the peer serves.
    #[arg(long, hide = true)]
    pub serve_stage: Option<u32>,
}

/// The peer processes; killed and reaped on drop, with their temp folder removed.
struct Children {
    procs: Vec<(usize, u32, Child)>,
    dir: PathBuf,
}

impl Children {
    fn spawn(
        &mut self,
        i: usize,
        stage: u32,
        trainer: SocketAddr,
        shape: &LinkShape,
    ) -> anyhow::Result<()> {
        let exe = std::env::current_exe().context("locating the swarm binary")?;
        let data = self.dir.join(format!("peer{i}"));
        std::fs::create_dir_all(&data)?;
        let log = File::create(self.dir.join(format!("peer{i}.log")))?;
        // A stage peer: Peer::start + stage::join_run, what `swarm join --stage` does, run
        // through the demo's own internal mode so it depends on nothing but this command.
        let _ = &data;
        let child = Command::new(exe)
            .arg("demo")
            .args(["--peer-of", &trainer.to_string()])
            .args(["--serve-stage", &stage.to_string()])
            .args(["--shape", &shape.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .context("starting a peer process")?;
        self.procs.push((i, stage, child));
        Ok(())
    }

    /// SIGKILLs the first live child serving `stage`; returns its index.
    fn kill_one(&mut self, stage: u32) -> Option<usize> {
        for (i, s, c) in self.procs.iter_mut() {
            if *s == stage && c.try_wait().ok().flatten().is_none() {
                let _ = c.kill();
                let _ = c.wait();
                return Some(*i);
            }
        }
        None
    }

    fn log_tail(&self) -> String {
        let mut out = String::new();
        for (i, _, _) in &self.procs {
            let path = self.dir.join(format!("peer{i}.log"));
            if let Ok(text) = std::fs::read_to_string(&path) {
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(5)..].join("\n");
                if !tail.is_empty() {
                    out.push_str(&format!("--- peer {i} ({}):\n{tail}\n", path.display()));
                }
            }
        }
        out
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for (_, _, c) in self.procs.iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::env::var_os("SWARM_DEMO_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn temp_dir() -> anyhow::Result<PathBuf> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!("swarm-demo-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn demo_config(path: Option<&Path>, steps: u64) -> anyhow::Result<swarm_model::RunConfig> {
    let mut cfg = load_config(path, Some(steps))?;
    if path.is_none() {
        cfg.codec.activations = DEMO_ACTIVATIONS.into();
        cfg.codec.gradients = DEMO_GRADIENTS.into();
        cfg.codec.sync = DEMO_SYNC.into();
        // A short run: warm up quickly so the loss visibly falls.
        cfg.train.warmup_steps = cfg.train.warmup_steps.min(steps / 5 + 1);
    }
    Ok(cfg)
}

/// The internal peer mode: join the trainer's run for one stage and serve until killed.
fn serve_peer(trainer: SocketAddr, stage: u32, shape: LinkShape) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let peer = swarm_core::peer::Peer::start(
            swarm_core::Identity::generate(),
            swarm_core::peer::PeerConfig {
                bootstrap: Some(trainer),
                shape: Some(shape),
                ..swarm_core::peer::PeerConfig::default()
            },
        )
        .await?;
        let joined = swarm_core::stage::join_run(&peer, trainer, Some(stage), |_| {}).await?;
        eprintln!(
            "peer {} serves stage {stage} from step {} (state loaded in {:?})",
            peer.peer_id().short(),
            joined.step,
            joined.sync_time
        );
        tokio::signal::ctrl_c().await?;
        drop(joined);
        peer.leave().await;
        Ok(())
    })
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    if let (Some(trainer), Some(stage)) = (args.peer_of, args.serve_stage) {
        return serve_peer(trainer, stage, args.shape);
    }
    anyhow::ensure!(args.peers >= 1, "--peers must be at least 1");
    let cfg = demo_config(args.config.as_deref(), args.steps)?;
    let stages = cfg.stages.len() - 1;
    anyhow::ensure!(
        args.peers >= stages,
        "--peers {} cannot cover {stages} stages",
        args.peers
    );
    let children = Arc::new(Mutex::new(Children {
        procs: Vec::new(),
        dir: temp_dir()?,
    }));
    let rt = tokio::runtime::Runtime::new()?;
    let result = rt.block_on(demo(&args, cfg, children.clone()));
    if result.is_err() {
        eprint!("{}", lock(&children).log_tail());
    }
    drop(rt);
    drop(children);
    result
}

async fn demo(
    args: &DemoArgs,
    cfg: swarm_model::RunConfig,
    children_cell: Arc<Mutex<Children>>,
) -> anyhow::Result<()> {
    let stages = cfg.stages.len() - 1;
    let steps = cfg.train.steps;
    let mut opts = TrainerOptions::new(cfg);
    opts.shape = Some(args.shape.clone());
    opts.out = args.out.clone();
    // Every peer should serve before step 0 so that the run starts with all its replicas.
    opts.min_replicas = args.peers / stages;
    opts.attempt_timeout = Duration::from_secs(args.attempt_timeout_s.max(1));
    opts.wait_for_peers = Duration::from_secs(300);
    let mut trainer = Trainer::start(opts).await?;
    let addr = trainer.addr();
    if !args.json {
        println!(
            "demo: trainer {} on {addr}, {} peers over {stages} stages, links {}",
            trainer.peer_id().short(),
            args.peers,
            args.shape
        );
    }
    for i in 0..args.peers {
        lock(&children_cell).spawn(i, (i % stages) as u32, addr, &args.shape)?;
    }
    let mut progress = Progress::new(steps, args.json);
    let kill_stage = (stages - 1) as u32;
    let killed: Arc<Mutex<Option<usize>>> = Arc::new(Mutex::new(None));
    let started = Instant::now();
    let mut kill_thread: Option<std::thread::JoinHandle<()>> = None;
    let mut last_step_s = 1.0f64;
    let result = {
        let cc = children_cell.clone();
        let killed = killed.clone();
        let mut on_event = |e: &TrainerEvent| {
            progress.on_event(e);
            if let TrainerEvent::Step(r) = e {
                last_step_s = r.seconds;
                let next = r.step + 1;
                // Kill mid-step, during the micro-batches: a fifth of a step's time into step K.
                if args.kill_peer_at_step == Some(next) && kill_thread.is_none() {
                    let cc = cc.clone();
                    let killed = killed.clone();
                    let delay = Duration::from_secs_f64((last_step_s / 5.0).clamp(0.02, 10.0));
                    kill_thread = Some(std::thread::spawn(move || {
                        std::thread::sleep(delay);
                        let i = lock(&cc).kill_one(kill_stage);
                        *killed.lock().unwrap_or_else(|e| e.into_inner()) = i;
                    }));
                }
                if args.join_peer_at_step == Some(next) {
                    let stage = if args.kill_peer_at_step.is_some() {
                        kill_stage
                    } else {
                        0
                    };
                    let mut c = lock(&cc);
                    let i = args.peers + c.procs.len();
                    if let Err(e) = c.spawn(i, stage, addr, &args.shape) {
                        progress
                            .bar
                            .println(format!("could not start the joining peer: {e:#}"));
                    }
                }
            }
        };
        if args.kill_peer_at_step == Some(0) {
            let i = lock(&children_cell).kill_one(kill_stage);
            *killed.lock().unwrap_or_else(|e| e.into_inner()) = i;
        }
        tokio::select! {
            r = trainer.run(&mut on_event) => r.map_err(anyhow::Error::from),
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        }
    };
    if let Some(t) = kill_thread {
        let _ = t.join();
    }
    progress.bar.finish_and_clear();
    let metrics = result?;
    let wall = started.elapsed().as_secs_f64();
    trainer.shutdown().await;
    if !args.json {
        print_summary(&metrics, wall);
        if let Some(i) = *killed.lock().unwrap_or_else(|e| e.into_inner()) {
            println!(
                "peer {i} was SIGKILLed during step {}",
                args.kill_peer_at_step.unwrap_or(0)
            );
        }
    } else {
        ui::print_json(&report(&metrics, wall))?;
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
