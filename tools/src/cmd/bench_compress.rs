//! `swarm bench compress`: the loss and bytes of a run's codecs, simulated in this process
//! (`swarm_bench::codec_sim`), against the local run of the same config in the same invocation.
//! Seconds per step instead of a swarm's minutes: for bisecting a loss effect by channel and for
//! sweeping codecs before confirming a point with `swarm replay`.

use std::path::PathBuf;

use anyhow::Context;
use serde::Serialize;
use swarm_bench::codec_sim::{OuterSync, SimBytes, SimOptions, SimTrainer};
use swarm_model::train::load_corpus;
use swarm_model::{LocalTrainer, RunConfig};

use crate::ui;

#[derive(clap::Args)]
pub(crate) struct BenchCompressArgs {
    /// Run config (TOML, see experiments/run.toml); default: the built-in default run.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Optimizer steps (overrides `[train] steps`; also the length of the LR schedule).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Warmup steps (overrides `[train] warmup_steps`).
    #[arg(long)]
    pub warmup: Option<u64>,
    /// Run seed (overrides `seed`).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Replicas per stage.
    #[arg(long, default_value_t = 2)]
    pub replicas: usize,
    /// Activation codec (overrides `[codec] activations`).
    #[arg(long)]
    pub activations: Option<String>,
    /// Activation-gradient codec (overrides `[codec] gradients`).
    #[arg(long)]
    pub gradients: Option<String>,
    /// Sync codec (overrides `[codec] sync`).
    #[arg(long)]
    pub sync: Option<String>,
    /// Multi-step sync codec at the boundaries within the LR warmup (overrides `[sync]
    /// warmup_codec`; give the `--sync` codec to measure without a warmup codec).
    #[arg(long)]
    pub warmup_sync: Option<String>,
    /// Encode the sync shares without error feedback (to measure what the residual does).
    #[arg(long)]
    pub no_sync_feedback: bool,
    /// Multi-step sync (DiLoCo / SparseLoCo): replicas sync their pseudo-gradient every H
    /// steps with the sync codec (in 4096-chunks: `topk-row:F` keeps F of each chunk).
    #[arg(long)]
    pub outer_every: Option<u64>,
    /// Outer learning rate (DiLoCo 0.7, SparseLoCo 1).
    #[arg(long, default_value_t = 1.0)]
    pub outer_lr: f32,
    /// Outer Nesterov momentum (DiLoCo 0.9; 0: plain SGD, SparseLoCo).
    #[arg(long, default_value_t = 0.0)]
    pub outer_momentum: f32,
    /// Decay of the pseudo-gradient's error feedback (SparseLoCo 0.95; 1: plain).
    #[arg(long, default_value_t = 0.95)]
    pub outer_beta: f32,
    /// Chunk of the pseudo-gradient's top-k.
    #[arg(long, default_value_t = 4096)]
    pub outer_chunk: usize,
    /// Subspace network rank k (overrides `[model] subspace_rank`; 0 = the standard model).
    #[arg(long)]
    pub subspace_rank: Option<usize>,
    /// Skip the local baseline (the standard model, `subspace_rank` 0, of the same config).
    #[arg(long)]
    pub no_baseline: bool,
    /// Run the head and loss on the last stage's peers: the last stage's output and the head's
    /// gradient stay on that peer (not coded, not counted). Default: the trainer holds the
    /// head, as the swarm does.
    #[arg(long)]
    pub head_on_last_stage: bool,
    /// Print the result as one JSON object on the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Summary {
    steps: u64,
    codecs: [String; 3],
    replicas: usize,
    outer_every: Option<u64>,
    /// The head and loss ran on the last stage (its boundary neither coded nor counted).
    head_on_last_stage: bool,
    /// The multi-step sync's codec within the LR warmup.
    warmup_sync: String,
    loss: Vec<f64>,
    local_loss: Vec<f64>,
    val_loss: f64,
    local_val_loss: Option<f64>,
    /// val_loss / local_val_loss - 1.
    val_penalty: Option<f64>,
    /// Largest loss / local loss - 1 over the steps after warmup.
    max_spike: Option<f64>,
    bytes: SimBytes,
    ratio: [f64; 4],
}

pub(crate) fn run(args: BenchCompressArgs) -> anyhow::Result<()> {
    super::train::short_candle_spin();
    let mut cfg = match &args.config {
        Some(p) => RunConfig::from_file(p)?,
        None => RunConfig::default(),
    };
    if let Some(s) = args.steps {
        cfg.train.steps = s;
    }
    if let Some(w) = args.warmup {
        cfg.train.warmup_steps = w;
    }
    if let Some(s) = args.seed {
        cfg.seed = s;
        cfg.model.subspace_seed = 0;
    }
    if let Some(k) = args.subspace_rank {
        cfg.model.subspace_rank = k;
    }
    if cfg.model.subspace_rank > 0 && cfg.model.subspace_seed == 0 {
        cfg.model.subspace_seed = cfg.seed;
    }
    for (o, c) in [
        (&args.activations, &mut cfg.codec.activations),
        (&args.gradients, &mut cfg.codec.gradients),
        (&args.sync, &mut cfg.codec.sync),
    ] {
        if let Some(o) = o {
            c.clone_from(o);
        }
    }
    cfg.validate()?;
    let corpus = load_corpus(&cfg.data).context("loading training data")?;
    let mut opts = SimOptions::from_config(&cfg, args.replicas)?;
    opts.sync_feedback = !args.no_sync_feedback;
    opts.head_on_last_stage = args.head_on_last_stage;
    // A config in a multi-step sync mode brings its own (`[sync]`); the flags override it.
    let mut sync_label = cfg.codec.sync.clone();
    if cfg.sync.drifts() {
        sync_label = args.sync.clone().unwrap_or_else(|| cfg.sync.codec.clone());
        opts.sync = sync_label.parse()?;
    }
    if let Some(every) = args.outer_every {
        opts.outer = Some(OuterSync {
            every,
            chunk: args.outer_chunk,
            beta: args.outer_beta,
            lr: args.outer_lr,
            momentum: args.outer_momentum,
            nesterov: true,
        });
    }
    let warmup_sync = args
        .warmup_sync
        .clone()
        .unwrap_or_else(|| cfg.sync.warmup_codec.clone());
    opts.warmup_sync = warmup_sync.parse()?;
    let outer_every = opts.outer.map(|o| o.every);
    let mut sim = SimTrainer::new(&cfg, opts)?;
    // The baseline is the standard model trained locally (issue #13: a structural method is
    // compared with the unconstrained model at equal steps).
    let mut standard = cfg.clone();
    standard.model.subspace_rank = 0;
    standard.model.subspace_seed = 0;
    let mut local = (!args.no_baseline)
        .then(|| LocalTrainer::new(&standard))
        .transpose()?;
    let bar = ui::progress(cfg.train.steps, args.json);
    let (mut loss, mut local_loss) = (Vec::new(), Vec::new());
    let mut max_spike: Option<f64> = None;
    while sim.step() < cfg.train.steps {
        let s = sim.train_step(&corpus)?;
        loss.push(s.loss);
        let mut msg = format!("loss {:.4}", s.loss);
        if let Some(l) = local.as_mut() {
            let b = l.train_step(&corpus)?;
            local_loss.push(b.loss);
            msg += &format!(" local {:.4}", b.loss);
            if s.step >= cfg.train.warmup_steps {
                let spike = s.loss / b.loss - 1.0;
                max_spike = Some(max_spike.map_or(spike, |m| m.max(spike)));
            }
        }
        tracing::debug!(
            step = s.step,
            loss = s.loss,
            grad_norm = s.grad_norm,
            "step"
        );
        bar.set_position(s.step + 1);
        bar.set_message(msg);
    }
    bar.finish_and_clear();
    let t = &cfg.train;
    let val_loss = sim.eval(&corpus, t.eval_batches)?;
    let local_val_loss = local
        .as_ref()
        .map(|l| l.eval(&corpus, t.eval_batches))
        .transpose()?;
    let bytes = sim.bytes();
    let summary = Summary {
        steps: sim.step(),
        codecs: [
            cfg.codec.activations.clone(),
            cfg.codec.gradients.clone(),
            sync_label,
        ],
        replicas: args.replicas,
        outer_every,
        head_on_last_stage: args.head_on_last_stage,
        warmup_sync,
        val_penalty: local_val_loss.map(|l| val_loss / l - 1.0),
        loss,
        local_loss,
        val_loss,
        local_val_loss,
        max_spike,
        ratio: [
            bytes.total().ratio(),
            bytes.activations.ratio(),
            bytes.gradients.ratio(),
            bytes.sync.ratio(),
        ],
        bytes,
    };
    if args.json {
        ui::print_json(&summary)?;
    } else {
        for (i, l) in summary.loss.iter().enumerate() {
            match summary.local_loss.get(i) {
                Some(b) => println!("step {i:>5}: loss {l:.4} local {b:.4} ({:+.4})", l - b),
                None => println!("step {i:>5}: loss {l:.4}"),
            }
        }
        println!(
            "val loss {:.4} (local {}); fp32/wire {:.1}x (activations {:.1}x, gradients {:.1}x, \
             sync {:.1}x); max spike after warmup {}",
            summary.val_loss,
            summary
                .local_val_loss
                .map_or("-".into(), |v| format!("{v:.4}")),
            summary.ratio[0],
            summary.ratio[1],
            summary.ratio[2],
            summary.ratio[3],
            summary
                .max_spike
                .map_or("-".into(), |s| format!("{:+.1}%", 100.0 * s)),
        );
    }
    Ok(())
}
