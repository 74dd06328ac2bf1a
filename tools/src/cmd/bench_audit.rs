//! `swarm bench audit` and `swarm bench audit-ban` (issue #7): the measurements behind the audit
//! tolerance and the ban rate.
//!
//! `audit`: how far honest recomputations of a stage pass differ, on this machine, across thread
//! counts (candle's matmul splits its work by `RAYON_NUM_THREADS`, read at every call), for every
//! stage of the run config, with its codecs: each micro-batch's forward output and input gradient
//! frames are computed once per thread count and every pair is compared as an audit would (bitwise,
//! else relative L2 of the decoded values). The same micro-batches corrupted by each fault kind
//! give the smallest distance a fault produces. Also the audit's cost: recompute time against the
//! stage's own forward + backward, and bytes moved per audit.
//!
//! `audit-ban`: seeded in-process runs (trainer and 4 replicas over QUIC on loopback, tiny model)
//! with one replica faulty at rate f and audits at rate p: micro-batches the faulty peer served
//! until its ban, against the theory P(ban within N) = 1-(1-p f)^N (mean 1/(p f)); and the number
//! of honest audits and false bans over the same runs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;
use swarm_core::fault::{FaultKind, FaultSpec};
use swarm_core::peer::{Peer, PeerConfig};
use swarm_core::stage::join_run;
use swarm_core::trainer::{Trainer, TrainerOptions};
use swarm_core::{Identity, PeerId};
use swarm_model::RunConfig;

use crate::ui;

mod recompute;

use recompute::measure_recompute;

#[derive(clap::Args)]
pub(crate) struct BenchAuditArgs {
    /// Run config (model, stages, micro-batch geometry, codecs); default: the built-in run.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override the activation and gradient codec (e.g. `none`).
    #[arg(long)]
    pub codec: Option<String>,
    /// Micro-batches per stage.
    #[arg(long, default_value_t = 50)]
    pub micro_batches: usize,
    /// Thread counts compared (every pair, and each with itself).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4")]
    pub threads: Vec<usize>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print the result as one JSON object on the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

pub(crate) fn run(args: BenchAuditArgs) -> anyhow::Result<()> {
    let mut cfg = match &args.config {
        Some(p) => RunConfig::from_file(p)?,
        None => RunConfig::default(),
    };
    if let Some(c) = &args.codec {
        cfg.codec.activations = c.clone();
        cfg.codec.gradients = c.clone();
    }
    let stages = cfg.stages.len() - 1;
    let bar = ui::progress((stages * args.micro_batches) as u64, args.json);
    let out = measure_recompute(
        &cfg,
        args.micro_batches,
        &args.threads,
        args.seed,
        &mut || bar.inc(1),
    )?;
    bar.finish_and_clear();
    if args.json {
        return ui::print_json(&out);
    }
    println!(
        "codecs {} / {}; threads {:?}; {} honest comparisons, {} bitwise identical, max distance {:.3e} (tolerance {:.1e})",
        out.codec_activations,
        out.codec_gradients,
        out.threads,
        out.comparisons,
        out.identical,
        out.max_honest_distance,
        out.tolerance
    );
    for (k, d) in &out.min_fault_distance {
        println!("  fault {k:<10} smallest distance {d:.3e}");
    }
    println!(
        "recompute {:.1} ms per audit vs the stage's forward+backward {:.1} ms; {} bytes per audit vs {} per micro-batch",
        out.recompute_ms, out.stage_fwd_bwd_ms, out.bytes_per_audit, out.bytes_per_micro_batch
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------

#[derive(clap::Args)]
pub(crate) struct BenchAuditBanArgs {
    /// Fault kinds to run (comma-separated); default: all five.
    #[arg(long, value_delimiter = ',')]
    pub kinds: Vec<String>,
    /// Fraction of the faulty peer's micro-batches it corrupts.
    #[arg(long, default_value_t = 0.1)]
    pub fault_rate: f64,
    /// Audit rate p (also used for new peers, so the theory applies as stated).
    #[arg(long, default_value_t = 0.05)]
    pub audit_rate: f64,
    /// Seeded runs per kind.
    #[arg(long, default_value_t = 5)]
    pub seeds: u64,
    /// Micro-batches per step.
    #[arg(long, default_value_t = 16)]
    pub micro_batches: usize,
    /// Give up on a run after this many steps.
    #[arg(long, default_value_t = 200)]
    pub max_steps: u64,
    /// Honest runs only (no faulty peer): counts audits and false bans.
    #[arg(long)]
    pub honest: bool,
    /// Print the result as one JSON object on the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct BanRun {
    kind: String,
    seed: u64,
    /// Micro-batch-stage pairs the faulty peer served up to and including its ban (None: never).
    served_until_ban: Option<u64>,
    steps: u64,
    audits: u64,
    /// Audits of peers other than the faulty one.
    honest_audits: u64,
    audit_failures: u64,
    banned: Vec<String>,
    false_bans: usize,
    final_loss: f64,
    audit_seconds: f64,
    audit_bytes: u64,
    wall_s: f64,
}

#[derive(Serialize)]
struct BanBench {
    fault_rate: f64,
    audit_rate: f64,
    /// 1/(p f): mean micro-batches served until the ban under the model.
    theory_mean: f64,
    /// ln(1/2)/ln(1-p f): median.
    theory_median: f64,
    runs: Vec<BanRun>,
    honest_audits: u64,
    false_bans: usize,
}

fn tiny(micro_batches: usize, steps: u64, seed: u64) -> RunConfig {
    let mut cfg = RunConfig::default();
    cfg.model.hidden_size = 32;
    cfg.model.intermediate_size = 64;
    cfg.model.num_hidden_layers = 2;
    cfg.model.num_attention_heads = 4;
    cfg.model.num_key_value_heads = Some(2);
    cfg.model.max_position_embeddings = 32;
    cfg.stages = vec![0, 1, 2];
    cfg.train.steps = steps;
    cfg.train.micro_batches = micro_batches;
    cfg.train.micro_batch_size = 2;
    cfg.train.seq_len = 16;
    cfg.train.warmup_steps = 1;
    cfg.train.lr = 1e-2;
    cfg.seed = seed;
    cfg
}

async fn one_run(
    cfg: RunConfig,
    audit_rate: f64,
    fault: Option<FaultSpec>,
    stop_on_ban: bool,
) -> anyhow::Result<(BanRun, Option<PeerId>)> {
    let started = Instant::now();
    let mut opts = TrainerOptions::new(cfg.clone());
    opts.min_replicas = 2;
    opts.wait_for_peers = Duration::from_secs(60);
    opts.attempt_timeout = Duration::from_secs(30);
    opts.audit.rate = audit_rate;
    opts.audit.new_peer_rate = audit_rate;
    opts.audit.seed = Some(cfg.seed.wrapping_mul(0x9e37_79b9) ^ 0x5eed);
    let mut trainer = Trainer::start(opts).await?;
    let addr: SocketAddr = trainer.addr();
    let mut peers = Vec::new();
    let mut faulty = None;
    for (i, stage) in [0u32, 0, 1, 1].into_iter().enumerate() {
        let f = if i == (cfg.seed as usize % 2) * 2 {
            fault
        } else {
            None
        };
        let peer = Peer::start(
            Identity::generate(),
            PeerConfig {
                bootstrap: Some(addr),
                ..PeerConfig::default()
            },
        )
        .await?;
        let joined = join_run(&peer, addr, Some(stage), crate::fault::configure(f)).await?;
        if f.is_some() {
            faulty = Some(peer.peer_id());
        }
        peers.push((peer, joined));
    }
    // Stop at the end of the step after the ban (or at the run's last step).
    let banned = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (mut steps, mut last_loss) = (0u64, f64::NAN);
    {
        let (b, d) = (banned.clone(), done.clone());
        let mut on_event = |e: &swarm_core::trainer::TrainerEvent| match e {
            swarm_core::trainer::TrainerEvent::Lost { .. } => {
                b.store(stop_on_ban, std::sync::atomic::Ordering::Relaxed)
            }
            swarm_core::trainer::TrainerEvent::Step(r) => {
                steps += 1;
                last_loss = r.loss;
                if b.load(std::sync::atomic::Ordering::Relaxed) {
                    d.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
            _ => {}
        };
        let run = trainer.run(&mut on_event);
        let watch = async {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::select! {
            r = run => { r?; }
            _ = watch => {}
        }
    }
    let a = trainer.audit_stats().clone();
    let served = faulty.and_then(|f| {
        a.served_before_ban
            .iter()
            .find(|(p, _)| *p == f)
            .map(|(_, n)| *n)
    });
    let false_bans = a.banned.iter().filter(|b| Some(**b) != faulty).count();
    let honest_audits = a
        .per_peer
        .iter()
        .filter(|(p, _)| Some(**p) != faulty)
        .map(|(_, (n, _))| *n)
        .sum();
    let run = BanRun {
        kind: fault.map_or("honest".into(), |f| f.kind.name().to_string()),
        seed: cfg.seed,
        served_until_ban: served,
        steps,
        audits: a.audits,
        honest_audits,
        audit_failures: a.audit_failures,
        banned: a.banned.iter().map(|p| p.short()).collect(),
        false_bans,
        final_loss: last_loss,
        audit_seconds: a.seconds,
        audit_bytes: a.bytes,
        wall_s: started.elapsed().as_secs_f64(),
    };
    drop(peers);
    trainer.shutdown().await;
    Ok((run, faulty))
}

pub(crate) fn run_ban(args: BenchAuditBanArgs) -> anyhow::Result<()> {
    let kinds: Vec<FaultKind> = if args.honest {
        vec![]
    } else if args.kinds.is_empty() {
        // The kinds that corrupt frames; the optimizer-step kinds are caught by the inner-step
        // audit of a drifting sync mode only.
        FaultKind::PASSES.to_vec()
    } else {
        args.kinds
            .iter()
            .map(|k| {
                format!("{k}:0.1")
                    .parse::<FaultSpec>()
                    .map(|s| s.kind)
                    .map_err(anyhow::Error::from)
            })
            .collect::<anyhow::Result<_>>()?
    };
    let rt = tokio::runtime::Runtime::new()?;
    let pf = args.audit_rate * args.fault_rate;
    let mut out = BanBench {
        fault_rate: args.fault_rate,
        audit_rate: args.audit_rate,
        theory_mean: 1.0 / pf,
        theory_median: (0.5f64).ln() / (1.0 - pf).ln(),
        runs: Vec::new(),
        honest_audits: 0,
        false_bans: 0,
    };
    let jobs: Vec<Option<FaultKind>> = if args.honest {
        vec![None]
    } else {
        kinds.into_iter().map(Some).collect()
    };
    let bar = ui::progress(jobs.len() as u64 * args.seeds, args.json);
    for kind in jobs {
        for seed in 1..=args.seeds {
            let cfg = tiny(args.micro_batches, args.max_steps, seed);
            let spec = kind.map(|k| FaultSpec {
                kind: k,
                rate: args.fault_rate,
                seed,
            });
            let (r, _faulty) = rt.block_on(one_run(cfg, args.audit_rate, spec, true))?;
            out.honest_audits += r.honest_audits;
            out.false_bans += r.false_bans;
            if !args.json {
                bar.println(format!(
                    "{:<10} seed {seed}: served until ban {:?}, {} steps, {} audits ({} failed), false bans {}, loss {:.4}",
                    r.kind, r.served_until_ban, r.steps, r.audits, r.audit_failures, r.false_bans, r.final_loss
                ));
            }
            out.runs.push(r);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    if args.json {
        return ui::print_json(&out);
    }
    let caught: Vec<u64> = out.runs.iter().filter_map(|r| r.served_until_ban).collect();
    if !caught.is_empty() {
        let mean = caught.iter().sum::<u64>() as f64 / caught.len() as f64;
        let mut s = caught.clone();
        s.sort_unstable();
        println!(
            "p {} f {}: {} of {} faulty runs banned; served until ban mean {mean:.0} median {} (theory mean {:.0}, median {:.0})",
            args.audit_rate,
            args.fault_rate,
            caught.len(),
            out.runs.len(),
            s[s.len() / 2],
            out.theory_mean,
            out.theory_median
        );
    }
    println!(
        "honest audits {}, false bans {}",
        out.honest_audits, out.false_bans
    );
    Ok(())
}
