//! `swarm bench model`: forward, backward and optimizer time per micro-batch of the default model
//! (or a run config's), tokens/s, achieved GFLOP/s and this machine's matmul peak.

use std::path::PathBuf;

use swarm_model::RunConfig;
use swarm_model::bench::bench_model;

use crate::cmd::train::short_candle_spin;
use crate::ui;

#[derive(clap::Args)]
pub struct BenchModelArgs {
    /// Run config whose model and micro-batch geometry to time; default: the built-in run.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Timed micro-batches (the median is reported).
    #[arg(long, default_value_t = 10)]
    pub iterations: usize,
    /// Untimed micro-batches first (allocator and cache warmup).
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Print the result as one JSON object on the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: BenchModelArgs) -> anyhow::Result<()> {
    short_candle_spin();
    let cfg = match &args.config {
        Some(p) => RunConfig::from_file(p)?,
        None => RunConfig::default(),
    };
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
    Ok(())
}
