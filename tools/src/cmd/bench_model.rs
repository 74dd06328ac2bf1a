//! `swarm bench model`: forward, backward and optimizer time per micro-batch of the default model
//! (or a run config's), tokens/s, achieved GFLOP/s and this machine's matmul peak. With
//! `--vs-torch`, the same run in PyTorch + HF transformers (LlamaForCausalLM, SDPA, AdamW,
//! gradient clipping, same geometry and thread count) in alternating rounds, and the ratio.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};
use serde::Serialize;
use swarm_bench::model::{ModelBench, bench_model};
use swarm_model::RunConfig;

use crate::cmd::train::short_candle_spin;
use crate::ui;

#[derive(clap::Args)]
pub(crate) struct BenchModelArgs {
    /// Run config whose model and micro-batch geometry to time; default: the built-in run.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Timed micro-batches (the median is reported).
    #[arg(long, default_value_t = 10)]
    pub iterations: usize,
    /// Untimed micro-batches first (allocator and cache warmup).
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Also time the same run in PyTorch + HF transformers (needs `torch` and `transformers`
    /// importable by `--python`; never needed otherwise) and print the ratio.
    #[arg(long)]
    pub vs_torch: bool,
    /// Python interpreter for `--vs-torch`, e.g. a venv's `bin/python`.
    #[arg(long, env = "SWARM_TORCH_PYTHON", default_value = "python3")]
    pub python: PathBuf,
    /// Alternating swarm/PyTorch rounds for `--vs-torch` (the median ratio is reported).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Print the result as one JSON object on the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

/// The PyTorch side, run by `--python -c`.
const TORCH_BENCH: &str = include_str!("torch_bench.py");

/// What `torch_bench.py` prints.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
struct TorchBench {
    torch: String,
    transformers: String,
    threads: usize,
    parameters: usize,
    forward_ms: f64,
    backward_ms: f64,
    optimizer_ms: f64,
    step_ms: f64,
    tokens_per_s: f64,
    steps: usize,
}

#[derive(Debug, Serialize)]
struct Round {
    swarm_tokens_per_s: f64,
    torch_tokens_per_s: f64,
    ratio: f64,
}

#[derive(Debug, Serialize)]
struct VsTorch {
    /// Median over rounds of swarm tokens/s divided by PyTorch tokens/s.
    ratio: f64,
    rounds: Vec<Round>,
    /// The last round's measurements.
    swarm: ModelBench,
    torch: TorchBench,
    threads: usize,
    /// `/proc/loadavg` before and after (1, 5, 15 minutes): the machine may be shared.
    load_before: Vec<f64>,
    load_after: Vec<f64>,
}

fn load_average() -> Vec<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| {
            s.split_whitespace()
                .take(3)
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The thread count our side uses (rayon's pool, which candle and the layer kernels share).
fn threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn torch_bench(
    args: &BenchModelArgs,
    cfg: &RunConfig,
    threads: usize,
) -> anyhow::Result<TorchBench> {
    let t = &cfg.train;
    // Steps of `micro_batches` micro-batches, about as many micro-batches as our side times.
    let steps = args.iterations.div_ceil(t.micro_batches).max(1);
    let warmup = args.warmup.div_ceil(t.micro_batches).max(1);
    let input = serde_json::json!({
        "model": cfg.model,
        "train": t,
        "seed": cfg.seed,
        "threads": threads,
        "warmup": warmup,
        "steps": steps,
    });
    let out = Command::new(&args.python)
        .arg("-c")
        .arg(TORCH_BENCH)
        .arg(input.to_string())
        .output()
        .with_context(|| format!("running {}", args.python.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    if out.status.code() == Some(3) {
        bail!(
            "--vs-torch needs PyTorch and HF transformers importable by {} ({}); install them \
             in a venv (python3 -m venv DIR && DIR/bin/pip install torch transformers) and pass \
             --python DIR/bin/python",
            args.python.display(),
            last
        );
    }
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}",
            args.python.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_str(last).with_context(|| format!("parsing the PyTorch bench output {last:?}"))
}

/// The median (the mean of the middle two for an even count).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n.is_multiple_of(2) {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    } else {
        v[n / 2]
    }
}

fn run_vs_torch(args: &BenchModelArgs, cfg: &RunConfig) -> anyhow::Result<()> {
    let threads = threads();
    let load_before = load_average();
    let rounds_n = args.rounds.max(1);
    let bar = ui::progress(2 * rounds_n as u64, args.json);
    let mut rounds = Vec::new();
    let mut last = None;
    for r in 0..rounds_n {
        bar.set_message(format!("round {}/{rounds_n}: swarm", r + 1));
        let ours = bench_model(cfg, args.warmup, args.iterations)?;
        bar.inc(1);
        bar.set_message(format!("round {}/{rounds_n}: PyTorch", r + 1));
        let theirs = torch_bench(args, cfg, threads)?;
        bar.inc(1);
        rounds.push(Round {
            swarm_tokens_per_s: ours.tokens_per_s,
            torch_tokens_per_s: theirs.tokens_per_s,
            ratio: ours.tokens_per_s / theirs.tokens_per_s,
        });
        last = Some((ours, theirs));
    }
    bar.finish_and_clear();
    let (swarm, torch) = last.expect("at least one round");
    let r = VsTorch {
        ratio: median(rounds.iter().map(|r| r.ratio).collect()),
        rounds,
        swarm,
        torch,
        threads,
        load_before,
        load_after: load_average(),
    };
    if args.json {
        return ui::print_json(&r);
    }
    println!(
        "model: {} parameters, {} layers, hidden {}; {} micro-batches of {}x{} tokens per step; {} threads",
        r.swarm.parameters,
        cfg.model.num_hidden_layers,
        cfg.model.hidden_size,
        cfg.train.micro_batches,
        cfg.train.micro_batch_size,
        cfg.train.seq_len,
        r.threads
    );
    println!(
        "{:>6} {:>14} {:>14} {:>7}",
        "round", "swarm tok/s", "PyTorch tok/s", "ratio"
    );
    for (i, x) in r.rounds.iter().enumerate() {
        println!(
            "{:>6} {:>14.0} {:>14.0} {:>7.2}",
            i + 1,
            x.swarm_tokens_per_s,
            x.torch_tokens_per_s,
            x.ratio
        );
    }
    println!(
        "last round, per micro-batch (optimizer: per step): swarm forward {:.1} ms, backward \
         {:.1} ms, optimizer {:.1} ms; PyTorch {} (transformers {}) forward {:.1} ms, backward \
         {:.1} ms, optimizer {:.1} ms",
        r.swarm.forward_ms,
        r.swarm.backward_ms,
        r.swarm.optimizer_ms,
        r.torch.torch,
        r.torch.transformers,
        r.torch.forward_ms,
        r.torch.backward_ms,
        r.torch.optimizer_ms
    );
    print_ops(&r.swarm);
    println!(
        "median ratio swarm/PyTorch: {:.2}x; load average {:?} before, {:?} after",
        r.ratio, r.load_before, r.load_after
    );
    Ok(())
}

pub(crate) fn run(args: BenchModelArgs) -> anyhow::Result<()> {
    short_candle_spin();
    let mut cfg = match &args.config {
        Some(p) => RunConfig::from_file(p)?,
        None => RunConfig::default(),
    };
    // The standard Llama, whatever the config's subspace rank: this measures our step against
    // PyTorch + HF transformers' LlamaForCausalLM on the same shape, which has no subspace form.
    cfg.model.subspace_rank = 0;
    cfg.model.subspace_seed = 0;
    if args.vs_torch {
        return run_vs_torch(&args, &cfg);
    }
    let bar = ui::progress(1, args.json);
    bar.set_message(format!(
        "timing {} micro-batches of {}x{} tokens",
        args.warmup + args.iterations,
        cfg.train.micro_batch_size,
        cfg.train.seq_len
    ));
    bar.tick();
    let r = bench_model(&cfg, args.warmup, args.iterations)?;
    bar.finish_and_clear();
    if args.json {
        return ui::print_json(&r);
    }
    println!(
        "model: {} parameters ({} in matmuls), {} layers, hidden {}; micro-batch {} tokens",
        r.parameters,
        r.matmul_parameters,
        cfg.model.num_hidden_layers,
        cfg.model.hidden_size,
        r.tokens_per_micro_batch
    );
    println!(
        "forward {:.1} ms, backward {:.1} ms (backward/forward {:.2}), optimizer step {:.1} ms",
        r.forward_ms, r.backward_ms, r.backward_forward_ratio, r.optimizer_ms
    );
    println!(
        "training throughput {:.0} tokens/s; achieved {:.1} GFLOP/s (6 x params x tokens) vs \
         matmul peak {:.1} GFLOP/s here; median of {} iterations",
        r.tokens_per_s, r.achieved_gflops, r.matmul_peak_gflops, r.iterations
    );
    print_ops(&r);
    Ok(())
}

/// The per-op breakdown, largest first.
fn print_ops(r: &ModelBench) {
    println!("per micro-batch, by op (mean of the timed iterations):");
    for o in &r.ops {
        println!("  {:<20} {:>8.2} ms {:>6.1}%", o.op, o.ms, 100.0 * o.share);
    }
}
