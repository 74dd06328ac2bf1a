//! `swarm train` without `--local`: the distributed trainer of issue #6. It creates the run (or
//! resumes it from `--out`), is the bootstrap peer for it, and drives steps through the stage
//! replicas that `swarm join ADDR` brings; progress on stderr, summary (and `--json`) on stdout.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use indicatif::ProgressBar;
use serde::Serialize;
use swarm_core::Identity;
use swarm_core::shaping::LinkShape;
use swarm_core::trainer::{Metrics, Summary, Trainer, TrainerEvent, TrainerOptions};
use swarm_model::RunConfig;

use crate::ui;

/// What the distributed path of `swarm train` takes (the clap arguments live in `train.rs`).
#[derive(Clone, Debug)]
pub(crate) struct SwarmTrainArgs {
    pub config: Option<PathBuf>,
    /// Training text or token shards (overrides `[data] path`).
    pub data: Option<PathBuf>,
    /// tokenizer.json (overrides `[data] tokenizer`).
    pub tokenizer: Option<PathBuf>,
    /// Model preset (overrides `[model]`, `stages` and the micro-batch geometry).
    pub model: Option<String>,
    pub listen: SocketAddr,
    pub out: Option<PathBuf>,
    pub shape: Option<LinkShape>,
    /// Replicas per stage to wait for before the first step.
    pub min_replicas: usize,
    /// The relay's quotas (`None`: no relay).
    pub relay: Option<swarm_nat::RelayConfig>,
    /// Where the reachability checker listens (`None`: the listen IP, any port).
    pub checker: Option<SocketAddr>,
    /// Stop after this many steps (the config's `train.steps` otherwise).
    pub steps: Option<u64>,
    pub data_dir: Option<PathBuf>,
    /// Serve the monitor (page, JSON, Prometheus) here.
    pub http: Option<SocketAddr>,
    pub http_flags: crate::monitor::HttpFlags,
    pub json: bool,
}

/// The JSON of `swarm train` (and `swarm demo`): the summary fields of the issue, plus the loss of
/// every step and the bytes per channel.
#[derive(Serialize)]
pub(crate) struct Report {
    #[serde(flatten)]
    pub summary: Summary,
    pub losses: Vec<f64>,
    /// `[steps done, validation loss]` of every evaluation of the whole model.
    pub val_losses: Vec<(u64, f64)>,
    pub channels: swarm_core::trainer::WireStats,
    pub state_sync_seconds: Vec<f64>,
    pub wall_s: f64,
}

pub(crate) fn report(m: &Metrics, wall_s: f64) -> Report {
    Report {
        summary: m.summary(),
        losses: m.steps.iter().map(|s| s.loss).collect(),
        val_losses: m.val_losses.clone(),
        channels: m.wire,
        state_sync_seconds: m.state_sync_seconds.clone(),
        wall_s,
    }
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// Progress bar updates for trainer events (shared with `swarm demo`).
pub(crate) struct Progress {
    pub bar: ProgressBar,
    wire: u64,
    dense: u64,
    tokens: u64,
    secs: f64,
}

impl Progress {
    pub(crate) fn new(steps: u64, json: bool) -> Progress {
        Progress {
            bar: ui::progress(steps, json),
            wire: 0,
            dense: 0,
            tokens: 0,
            secs: 0.0,
        }
    }

    pub(crate) fn on_event(&mut self, e: &TrainerEvent) {
        match e {
            TrainerEvent::Waiting { serving, need } => self.bar.set_message(format!(
                "waiting for replicas: {serving:?} serving, {need} needed per stage"
            )),
            TrainerEvent::Joined {
                peer,
                stage,
                sync_ms,
            } => {
                tracing::info!(peer = %peer.short(), stage, sync_ms, "replica joined");
            }
            TrainerEvent::Lost { peer, stage } => {
                self.bar
                    .println(format!("replica {} of stage {stage} lost", peer.short()));
            }
            TrainerEvent::Left {
                peer,
                stage,
                handed_off,
            } => {
                let note = if *handed_off {
                    " (its state is kept for the next peer to take the stage)"
                } else {
                    ""
                };
                self.bar.println(format!(
                    "replica {} of stage {stage} left{note}",
                    peer.short()
                ));
            }
            TrainerEvent::Restored {
                step,
                epoch,
                from_checkpoint,
            } => {
                let from = if *from_checkpoint {
                    format!("the checkpoint after step {step}")
                } else {
                    "the seed (no checkpoint yet): the run starts over".to_owned()
                };
                self.bar.println(format!(
                    "a stage lost its last replica: every stage restored from {from} (epoch {epoch})"
                ));
                self.bar.set_position(*step);
            }
            TrainerEvent::Paused { stage } => self.bar.set_message(format!(
                "paused: stage {stage} has no replica; waiting for a peer to take it"
            )),
            TrainerEvent::Eval { step, val_loss } => {
                self.bar
                    .println(format!("step {step}: validation loss {val_loss:.4}"));
            }
            TrainerEvent::Checkpoint { step, dir } => {
                tracing::info!(step, dir = %dir.display(), "checkpoint written");
            }
            TrainerEvent::Step(r) => {
                (self.wire, self.dense) = (r.wire_bytes, r.dense_bytes);
                self.tokens += r.tokens;
                self.secs += r.seconds;
                let tps = if self.secs > 0.0 {
                    self.tokens as f64 / self.secs
                } else {
                    0.0
                };
                let ratio = if self.wire > 0 {
                    self.dense as f64 / self.wire as f64
                } else {
                    0.0
                };
                self.bar.set_position(r.step + 1);
                self.bar.set_message(format!(
                    "step {} loss {:.4} | {tps:.0} tok/s | {} on the wire ({ratio:.1}x less than fp32) | retries {}",
                    r.step + 1,
                    r.loss,
                    mb(self.wire),
                    r.retries
                ));
            }
        }
    }
}

/// Human summary lines.
pub(crate) fn print_summary(m: &Metrics, wall_s: f64) {
    let s = m.summary();
    println!(
        "trained {} steps in {wall_s:.1}s: loss {:.4} -> {:.4}, {:.0} tokens/s",
        s.steps, s.initial_loss, s.final_loss, s.tokens_per_s
    );
    if let Some(v) = s.val_loss {
        println!("validation loss {v:.4}");
    }
    let ratio = if s.wire_bytes > 0 {
        s.dense_bytes as f64 / s.wire_bytes as f64
    } else {
        0.0
    };
    println!(
        "tensors on the wire: {} ({} as fp32, {ratio:.1}x less): activations {}, gradients {}, sync {}",
        mb(s.wire_bytes),
        mb(s.dense_bytes),
        mb(m.wire.activations.wire_bytes),
        mb(m.wire.gradients.wire_bytes),
        mb(m.wire.sync.wire_bytes),
    );
    println!(
        "retries {}, peers lost {}, peers left {}, replica hash mismatches {}",
        s.retries, s.peers_lost, s.peers_left, s.replica_hash_mismatches
    );
    let t = &s.time_breakdown;
    if t.wall_s > 0.0 {
        let pct = |x: f64| 100.0 * x / t.wall_s;
        println!(
            "trainer time {:.1}s: compute {:.0}%, encode/decode {:.0}%, stage queues {:.0}%, links {:.0}%, step barrier {:.0}%, sync {:.0}%, audits {:.0}%, idle {:.0}%",
            t.wall_s,
            pct(t.compute_s),
            pct(t.encode_decode_s),
            pct(t.stage_queue_s),
            pct(t.links_s),
            pct(t.barrier_s),
            pct(t.sync_s),
            pct(t.audits_s),
            pct(t.idle_s),
        );
    }
    for p in s.peers.iter().filter(|p| p.relay_bytes > 0) {
        println!(
            "peer {} (stage {}, {}): {} micro-batches, {} through the relay",
            &p.peer[..8.min(p.peer.len())],
            p.stage,
            p.reach,
            p.micro_batches,
            mb(p.relay_bytes)
        );
    }
    if !m.state_sync_seconds.is_empty() {
        let max = m.state_sync_seconds.iter().cloned().fold(0.0, f64::max);
        println!(
            "{} replica state loads, longest {max:.2}s",
            m.state_sync_seconds.len()
        );
    }
}

/// Loads the run config (the built-in default without `--config`).
pub(crate) fn load_config(
    path: Option<&std::path::Path>,
    steps: Option<u64>,
) -> anyhow::Result<RunConfig> {
    let mut cfg = match path {
        Some(p) => RunConfig::from_file(p).with_context(|| format!("reading {}", p.display()))?,
        None => RunConfig::default(),
    };
    if let Some(n) = steps {
        cfg.train.steps = n;
    }
    cfg.validate()?;
    Ok(cfg)
}

/// The flags `swarm train` takes for a distributed run (flattened into `TrainArgs`).
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct SwarmFlags {
    /// UDP address the trainer listens on; peers join with `swarm join ADDR`.
    #[arg(long, default_value = "[::]:7070")]
    pub listen: SocketAddr,
    /// Emulate a home link on the trainer's socket, e.g. `up=20mbit,down=80mbit,delay=15ms`.
    #[arg(long)]
    pub shape: Option<LinkShape>,
    /// Serving replicas each stage needs before the first step.
    #[arg(long, default_value_t = 1)]
    pub min_replicas: usize,
    /// Relay for volunteers whose NATs cannot be punched, within this budget (Mbit/s in all; one
    /// peer may send a quarter of it). 0 turns the relay off.
    #[arg(long, default_value_t = 32.0)]
    pub relay_mbit: f64,
    /// Where joiners' reachability checker listens (default: the listen IP, any port). A second
    /// IP of this host (`IP2:0`) also tells volunteers whose firewall passes UDP only to the
    /// trainer from those behind a NAT that can be punched.
    #[arg(long)]
    pub checker_addr: Option<SocketAddr>,
    /// Folder holding the trainer's identity key (a new identity each start without it).
    #[arg(long, env = "SWARM_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Serve the monitor on this TCP address: a live page at `/`, the state as JSON at
    /// `/api/v1/state`, Prometheus metrics at `/metrics` (loopback unless `--http-public`).
    #[arg(long)]
    pub http: Option<SocketAddr>,
    #[command(flatten)]
    pub http_flags: crate::monitor::HttpFlags,
}

/// `swarm train` without `--local`.
pub(crate) fn run_cli(args: &super::train::TrainArgs) -> anyhow::Result<()> {
    run(SwarmTrainArgs {
        config: args.config.clone(),
        data: args.data.clone(),
        tokenizer: args.tokenizer.clone(),
        model: args.model.clone(),
        listen: args.swarm.listen,
        out: args.out.clone(),
        shape: args.swarm.shape.clone(),
        min_replicas: args.swarm.min_replicas,
        relay: swarm_nat::RelayConfig::from_mbit(args.swarm.relay_mbit),
        checker: args.swarm.checker_addr,
        steps: args.steps,
        data_dir: args.swarm.data_dir.clone(),
        http: args.swarm.http,
        http_flags: args.swarm.http_flags.clone(),
        json: args.json,
    })
}

pub(crate) fn run(args: SwarmTrainArgs) -> anyhow::Result<()> {
    let mut cfg = load_config(args.config.as_deref(), args.steps)?;
    super::train::apply_overrides(
        &mut cfg,
        args.data.as_ref(),
        args.tokenizer.as_ref(),
        args.model.as_deref(),
    )?;
    let identity = match &args.data_dir {
        Some(d) => Identity::load_or_create(d)?,
        None => Identity::generate(),
    };
    if let Some(a) = args.http {
        args.http_flags.config(a).check()?;
    }
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let mut shutdown = crate::shutdown::ShutdownSignal::new();
        let mut opts = TrainerOptions::new(cfg);
        opts.identity = identity;
        opts.listen = args.listen;
        opts.out = args.out.clone();
        opts.shape = args.shape.clone();
        opts.min_replicas = args.min_replicas.max(1);
        opts.relay = args.relay;
        opts.checker = args.checker;
        let mut trainer = Trainer::start(opts).await?;
        println!(
            "trainer {} listening on {} (run {}, resuming at step {}); peers join with: swarm join {}",
            trainer.peer_id(),
            trainer.addr(),
            trainer.run_id(),
            trainer.step(),
            trainer.addr()
        );
        let _monitor = match args.http {
            Some(a) => {
                let source = swarm_monitor::Source::Trainer(trainer.observe());
                let m = crate::monitor::start(a, &args.http_flags, source)?;
                crate::monitor::announce("monitor", &m, false);
                Some(m)
            }
            None => None,
        };
        std::io::stdout().flush()?;
        let total = trainer_total_steps(&trainer);
        let mut progress = Progress::new(total, args.json);
        progress.bar.set_position(trainer.step());
        let started = std::time::Instant::now();
        let result = {
            let mut on_event = |e: &TrainerEvent| progress.on_event(e);
            tokio::select! {
                r = trainer.run(&mut on_event) => r.map_err(anyhow::Error::from),
                _ = shutdown.wait() => Err(anyhow::anyhow!("interrupted")),
            }
        };
        progress.bar.finish_and_clear();
        let metrics = result?;
        let wall = started.elapsed().as_secs_f64();
        trainer.shutdown().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        print_summary(&metrics, wall);
        if args.json {
            ui::print_json(&report(&metrics, wall))?;
        }
        Ok(())
    })
}

fn trainer_total_steps(t: &Trainer) -> u64 {
    swarm_model::RunConfig::from_toml(t.config_toml())
        .map(|c| c.train.steps)
        .unwrap_or(0)
}
