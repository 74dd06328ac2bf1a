//! `swarm bench memory`: the peak resident memory (VmHWM) of a process serving one pipeline stage
//! of a model preset through training steps, against what `swarm join` predicts for it
//! (`swarm_model::presets::stage_memory` plus the process's resident memory before the stage).
//! Each preset runs in a child process of its own, since a process's peak never goes down.

use std::process::Command;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use swarm_model::RunConfig;
use swarm_model::presets::{PRESETS, StageMemory, meminfo_field, preset, stage_memory};

use crate::cmd::train::short_candle_spin;
use crate::ui;

#[derive(clap::Args)]
pub(crate) struct BenchMemoryArgs {
    /// Preset to measure (2m, 20m, 100m, 1b), or `all` (one child process each).
    #[arg(long, default_value = "all")]
    pub model: String,
    /// Vocabulary size of the run (the stage does not hold the embedding, so it matters little).
    #[arg(long, default_value_t = 32000)]
    pub vocab: usize,
    /// Stage to serve.
    #[arg(long, default_value_t = 0)]
    pub stage: usize,
    /// Training steps to run (the optimizer moments exist from the second).
    #[arg(long, default_value_t = 2)]
    pub steps: usize,
    /// Print the result as one JSON object on the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct Measured {
    model: String,
    stage: usize,
    parameters: u64,
    micro_batch: String,
    in_flight: u64,
    /// Resident bytes before the stage was built (binary, libraries).
    baseline_bytes: u64,
    /// `stage_memory(..).total`: weights and their flat copy, AdamW moments, activations in
    /// flight, the backward's gradients and workspace.
    stage_bytes: u64,
    predicted_peak_bytes: u64,
    measured_peak_bytes: u64,
    /// measured / predicted - 1.
    error: f64,
    /// The prediction term by term.
    terms: StageMemory,
}

fn status_field(key: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    meminfo_field(&text, key).with_context(|| format!("no {key} in /proc/self/status"))
}

pub(crate) fn run(args: BenchMemoryArgs) -> anyhow::Result<()> {
    if args.model != "all" {
        let m = measure(&args)?;
        if args.json {
            return ui::print_json(&m);
        }
        print_row(&m);
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    let mut rows = Vec::new();
    for p in PRESETS {
        if !args.json {
            eprintln!("measuring {} ...", p.name);
        }
        let out = Command::new(&exe)
            .args(["bench", "memory", "--json", "--model", p.name])
            .args(["--vocab", &args.vocab.to_string()])
            .args(["--stage", &args.stage.to_string()])
            .args(["--steps", &args.steps.to_string()])
            .output()
            .context("starting a child measurement")?;
        if !out.status.success() {
            bail!("{}: {}", p.name, String::from_utf8_lossy(&out.stderr));
        }
        let text = String::from_utf8(out.stdout)?;
        let last = text.lines().last().unwrap_or_default();
        let m: Measured = serde_json::from_str(last).context("child output")?;
        if !args.json {
            print_row(&m);
        }
        rows.push(m);
    }
    if args.json {
        return ui::print_json(&rows);
    }
    Ok(())
}

fn print_row(m: &Measured) {
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "{:>5} stage {}: {} parameters, micro-batch {} x{} in flight: predicted {:.0} MiB \
         ({:.0} baseline + {:.0} stage), measured peak {:.0} MiB ({:+.1}%)",
        m.model,
        m.stage,
        m.parameters,
        m.micro_batch,
        m.in_flight,
        mib(m.predicted_peak_bytes),
        mib(m.baseline_bytes),
        mib(m.stage_bytes),
        mib(m.measured_peak_bytes),
        100.0 * m.error
    );
}

fn measure(args: &BenchMemoryArgs) -> anyhow::Result<Measured> {
    short_candle_spin();
    let baseline = status_field("VmRSS:")?;
    let mut cfg = RunConfig::default();
    preset(&args.model)?.apply(&mut cfg, args.vocab)?;
    let need = stage_memory(&cfg, args.stage)?;
    swarm_bench::model::run_stage(&cfg, args.stage, args.steps)?;
    let peak = status_field("VmHWM:")?;
    let predicted = baseline + need.total;
    Ok(Measured {
        model: args.model.clone(),
        stage: args.stage,
        parameters: need.parameters,
        micro_batch: format!("{}x{}", cfg.train.micro_batch_size, cfg.train.seq_len),
        in_flight: need.micro_batches_in_flight,
        baseline_bytes: baseline,
        stage_bytes: need.total,
        predicted_peak_bytes: predicted,
        measured_peak_bytes: peak,
        error: peak as f64 / predicted as f64 - 1.0,
        terms: need,
    })
}
