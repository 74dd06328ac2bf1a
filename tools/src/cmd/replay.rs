//! `swarm replay SCENARIO.toml [--out DIR] [--json]`: runs every variant of a scenario (see
//! `crate::scenario`) as a real swarm on loopback, the trainer in this process and each peer a
//! `swarm join` child behind its emulated link, with the scenario's events (kills, joins, links
//! degrading); runs the local baseline (`LocalTrainer`, same config and seed) in the same
//! invocation; writes per-step CSV and JSON, plots (SVG and PNG) and a markdown summary with
//! each variant's ratios to the baseline.
//!
//! Output folder layout: `summary.md`, `summary.json`, `{loss_vs_step, loss_vs_time,
//! tokens_per_s, wire_bytes}.{svg,png}`, and `<variant>/steps.{csv,json}` (`local/` too).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use swarm_core::trainer::{StepReport, Trainer, TrainerEvent, TrainerOptions};
use swarm_model::{LocalTrainer, RunConfig};

use crate::cluster::{Cluster, Fired, When, lock, run_with_events};
use crate::plot::{Chart, Marker, Series};
use crate::scenario::{Scenario, Variant};
use crate::ui;

#[derive(clap::Args)]
pub(crate) struct ReplayArgs {
    /// Scenario file, e.g. experiments/home-80-20.toml.
    pub scenario: PathBuf,

    /// Output folder (default: `results/<scenario name>` next to the scenario file).
    #[arg(long)]
    pub out: Option<PathBuf>,

    /// Run only these variants (comma-separated names); the local baseline always runs.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,

    /// Train this many steps instead of the scenario's (a quick check); later events are dropped.
    #[arg(long)]
    pub steps: Option<u64>,

    /// Print the summary as one JSON object on the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

/// One step of a run, as written to `steps.csv` / `steps.json`.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct StepRow {
    pub step: u64,
    /// Seconds since the first step started, at the end of this step.
    pub wall_s: f64,
    /// Seconds this step took.
    pub step_s: f64,
    pub loss: f64,
    pub lr: f64,
    pub tokens: u64,
    /// This step's tokens over its duration.
    pub tokens_per_s: f64,
    /// Cumulative tensor bytes on the wire (activations + gradients + sync) and as fp32.
    pub wire_bytes: u64,
    pub dense_bytes: u64,
    /// Cumulative wire bytes per channel.
    pub activations_bytes: u64,
    pub gradients_bytes: u64,
    pub sync_bytes: u64,
    pub state_bytes: u64,
    /// Micro-batch retries in this step.
    pub retries: u64,
    /// Replicas per stage in this step's sync.
    pub participants: Vec<usize>,
    /// Events that fired during this step.
    pub events: Vec<String>,
}

impl StepRow {
    fn from_report(r: &StepReport, wall_s: f64, events: Vec<String>) -> StepRow {
        StepRow {
            step: r.step,
            wall_s,
            step_s: r.seconds,
            loss: r.loss,
            lr: r.lr,
            tokens: r.tokens,
            tokens_per_s: rate(r.tokens as f64, r.seconds),
            wire_bytes: r.wire_bytes,
            dense_bytes: r.dense_bytes,
            activations_bytes: r.wire.activations.wire_bytes,
            gradients_bytes: r.wire.gradients.wire_bytes,
            sync_bytes: r.wire.sync.wire_bytes,
            state_bytes: r.wire.state.wire_bytes,
            retries: r.retries,
            participants: r.participants.clone(),
            events,
        }
    }
}

fn rate(x: f64, secs: f64) -> f64 {
    if secs > 0.0 { x / secs } else { 0.0 }
}

/// A finished run (a variant or the local baseline).
#[derive(Clone, Debug, Serialize)]
struct RunResult {
    name: String,
    codecs: String,
    steps: Vec<StepRow>,
    events: Vec<Fired>,
    tokens_per_s: f64,
    wall_s: f64,
    peers_lost: u64,
    retries: u64,
    hash_mismatches: u64,
    error: Option<String>,
}

impl RunResult {
    fn final_loss(&self) -> f64 {
        self.steps.last().map_or(f64::NAN, |s| s.loss)
    }

    fn wire_bytes(&self) -> u64 {
        self.steps.last().map_or(0, |s| s.wire_bytes)
    }

    fn dense_bytes(&self) -> u64 {
        self.steps.last().map_or(0, |s| s.dense_bytes)
    }
}

/// The `--json` line, per variant.
#[derive(Serialize)]
struct VariantJson {
    name: String,
    final_loss: f64,
    tokens_per_s: f64,
    /// Throughput over the local baseline's (same invocation).
    vs_local: f64,
    wire_bytes: u64,
    dense_bytes: u64,
    /// Final loss minus the local run's loss at the same step.
    loss_penalty: f64,
    steps: usize,
    retries: u64,
    peers_lost: u64,
    error: Option<String>,
}

#[derive(Serialize)]
struct ReplayJson {
    scenario: String,
    out: String,
    local_tokens_per_s: f64,
    local_final_loss: f64,
    variants: Vec<VariantJson>,
}

pub(crate) fn run(args: ReplayArgs) -> anyhow::Result<()> {
    let mut scenario = Scenario::from_file(&args.scenario)?;
    if !args.only.is_empty() {
        for n in &args.only {
            anyhow::ensure!(
                scenario.variants.iter().any(|v| &v.name == n),
                "--only {n}: no such variant (have: {})",
                names(&scenario)
            );
        }
        scenario.variants.retain(|v| args.only.contains(&v.name));
    }
    if let Some(n) = args.steps {
        anyhow::ensure!(n >= 1, "--steps must be at least 1");
        for v in &mut scenario.variants {
            v.config.train.steps = n;
            v.events
                .retain(|e| !matches!(e.when, When::Step(k) if k >= n));
        }
    }
    let out = match &args.out {
        Some(o) => o.clone(),
        None => args
            .scenario
            .parent()
            .unwrap_or(Path::new("."))
            .join("results")
            .join(&scenario.name),
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let load_start = load_avg();

    // One local baseline per distinct non-codec config (codecs do not matter locally).
    let mut keys: Vec<RunConfig> = Vec::new();
    for v in &scenario.variants {
        let key = local_key(&v.config);
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    let total: u64 = keys.iter().map(|k| k.train.steps).sum::<u64>()
        + scenario
            .variants
            .iter()
            .map(|v| v.config.train.steps)
            .sum::<u64>();
    let bar = ui::progress(total, args.json);
    let mut locals: Vec<(RunConfig, RunResult)> = Vec::new();
    for key in keys {
        bar.set_message(format!("{}: local baseline", scenario.name));
        let r = run_local(&key, &bar)?;
        locals.push((key, r));
    }
    let mut results = Vec::new();
    for v in &scenario.variants {
        bar.set_message(format!("{}: {}", scenario.name, v.name));
        let r = run_variant(v, scenario.attempt_timeout, &bar);
        if let Some(e) = &r.error {
            bar.println(format!("variant {} failed: {e}", v.name));
        }
        results.push(r);
    }
    bar.finish_and_clear();
    let load_end = load_avg();

    let local_of = |v: &Variant| -> &RunResult {
        let key = local_key(&v.config);
        &locals
            .iter()
            .find(|(c, _)| *c == key)
            .expect("a baseline per config")
            .1
    };
    for (_, l) in &locals {
        write_run(&out, l, locals.len() > 1)?;
    }
    let mut json = Vec::new();
    for (v, r) in scenario.variants.iter().zip(&results) {
        write_run(&out, r, false)?;
        let l = local_of(v);
        json.push(VariantJson {
            name: r.name.clone(),
            final_loss: r.final_loss(),
            tokens_per_s: r.tokens_per_s,
            vs_local: rate(r.tokens_per_s, l.tokens_per_s),
            wire_bytes: r.wire_bytes(),
            dense_bytes: r.dense_bytes(),
            loss_penalty: penalty(r, l),
            steps: r.steps.len(),
            retries: r.retries,
            peers_lost: r.peers_lost,
            error: r.error.clone(),
        });
    }
    let all: Vec<&RunResult> = locals
        .iter()
        .map(|(_, l)| l)
        .chain(results.iter())
        .collect();
    write_plots(&out, &scenario, &all)?;
    let md = summary_md(
        &scenario, &args, &locals, &results, &json, load_start, load_end,
    );
    std::fs::write(out.join("summary.md"), &md)?;
    let first_local = &locals[0].1;
    let report = ReplayJson {
        scenario: scenario.name.clone(),
        out: out.display().to_string(),
        local_tokens_per_s: first_local.tokens_per_s,
        local_final_loss: first_local.final_loss(),
        variants: json,
    };
    std::fs::write(
        out.join("summary.json"),
        serde_json::to_string_pretty(&report)? + "\n",
    )?;
    if args.json {
        ui::print_json(&report)?;
    } else {
        print!("{}", table(&report));
        println!("results in {}", out.display());
    }
    if results.iter().all(|r| r.error.is_some()) {
        anyhow::bail!("every variant failed");
    }
    Ok(())
}

fn names(s: &Scenario) -> String {
    s.variants
        .iter()
        .map(|v| v.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The config with codecs at their defaults: what the local run depends on.
fn local_key(cfg: &RunConfig) -> RunConfig {
    let mut c = cfg.clone();
    c.codec = Default::default();
    c
}

fn codecs(cfg: &RunConfig) -> String {
    let c = &cfg.codec;
    let s = &cfg.sync;
    let sync = if s.drifts() {
        format!("sparseloco every {} {} per {}", s.every, s.codec, s.chunk)
    } else {
        c.sync.clone()
    };
    format!("act {} / grad {} / sync {sync}", c.activations, c.gradients)
}

/// Final loss minus the local loss at the same step (NaN if either is missing).
fn penalty(r: &RunResult, local: &RunResult) -> f64 {
    let Some(last) = r.steps.last() else {
        return f64::NAN;
    };
    local
        .steps
        .iter()
        .find(|s| s.step == last.step)
        .map_or(f64::NAN, |l| last.loss - l.loss)
}

fn run_local(cfg: &RunConfig, bar: &indicatif::ProgressBar) -> anyhow::Result<RunResult> {
    let corpus = swarm_model::train::load_corpus(&cfg.data)?;
    let mut trainer = LocalTrainer::new(cfg)?;
    let started = Instant::now();
    let mut steps = Vec::new();
    let mut tokens = 0u64;
    for _ in 0..cfg.train.steps {
        let t = Instant::now();
        let s = trainer.train_step(&corpus)?;
        let step_s = t.elapsed().as_secs_f64();
        tokens += s.tokens as u64;
        steps.push(StepRow {
            step: s.step,
            wall_s: started.elapsed().as_secs_f64(),
            step_s,
            loss: s.loss,
            lr: s.lr,
            tokens: s.tokens as u64,
            tokens_per_s: rate(s.tokens as f64, step_s),
            wire_bytes: 0,
            dense_bytes: 0,
            activations_bytes: 0,
            gradients_bytes: 0,
            sync_bytes: 0,
            state_bytes: 0,
            retries: 0,
            participants: Vec::new(),
            events: Vec::new(),
        });
        bar.inc(1);
    }
    let wall_s = started.elapsed().as_secs_f64();
    Ok(RunResult {
        name: "local".into(),
        codecs: "(one process, no codecs)".into(),
        steps,
        events: Vec::new(),
        tokens_per_s: rate(tokens as f64, wall_s),
        wall_s,
        peers_lost: 0,
        retries: 0,
        hash_mismatches: 0,
        error: None,
    })
}

fn run_variant(v: &Variant, attempt_timeout: Duration, bar: &indicatif::ProgressBar) -> RunResult {
    let mut result = RunResult {
        name: v.name.clone(),
        codecs: codecs(&v.config),
        steps: Vec::new(),
        events: Vec::new(),
        tokens_per_s: 0.0,
        wall_s: 0.0,
        peers_lost: 0,
        retries: 0,
        hash_mismatches: 0,
        error: None,
    };
    let position = bar.position();
    let cluster = match Cluster::new("replay") {
        Ok(c) => Arc::new(Mutex::new(c)),
        Err(e) => {
            result.error = Some(format!("{e:#}"));
            return result;
        }
    };
    let outcome = tokio::runtime::Runtime::new()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(swarm_run(v, attempt_timeout, &cluster, bar, &mut result)));
    if let Err(e) = outcome {
        let tail = lock(&cluster).log_tail();
        result.error = Some(format!("{e:#}"));
        if !tail.is_empty() {
            bar.println(tail);
        }
    }
    // Keep the bar's total consistent when a run ends early.
    bar.set_position(position + v.config.train.steps);
    result
}

async fn swarm_run(
    v: &Variant,
    attempt_timeout: Duration,
    cluster: &Arc<Mutex<Cluster>>,
    bar: &indicatif::ProgressBar,
    result: &mut RunResult,
) -> anyhow::Result<()> {
    let stages = v.config.stages.len() - 1;
    let mut opts = TrainerOptions::new(v.config.clone());
    opts.shape = v.trainer_shape.clone();
    // Start once every stage has all of its initial replicas.
    opts.min_replicas = (0..stages as u32)
        .map(|s| v.peers.iter().filter(|p| p.0 == s).count())
        .min()
        .unwrap_or(1)
        .max(1);
    opts.attempt_timeout = attempt_timeout;
    opts.wait_for_peers = Duration::from_secs(300);
    let mut trainer = Trainer::start(opts).await?;
    let addr = trainer.addr();
    for (stage, shape) in &v.peers {
        lock(cluster).spawn(*stage, addr, shape)?;
    }
    let base = bar.position();
    let mut t0: Option<Instant> = None;
    let mut seen_events = 0usize;
    let rows = &mut result.steps;
    let (metrics, fired) = run_with_events(&mut trainer, cluster, &v.events, |e, fired| {
        if let TrainerEvent::Step(r) = e {
            let now = Instant::now();
            let t0 = *t0.get_or_insert(now - Duration::from_secs_f64(r.seconds.max(0.0)));
            let events = fired[seen_events.min(fired.len())..]
                .iter()
                .map(|f| f.label.clone())
                .collect();
            seen_events = fired.len();
            rows.push(StepRow::from_report(
                r,
                now.duration_since(t0).as_secs_f64(),
                events,
            ));
            bar.set_position(base + r.step + 1);
        } else if let TrainerEvent::Lost { peer, stage } = e {
            tracing::info!(peer = %peer.short(), stage, "replica lost");
        }
    })
    .await;
    result.events = fired;
    let metrics = metrics?;
    trainer.shutdown().await;
    let s = metrics.summary();
    result.tokens_per_s = s.tokens_per_s;
    result.wall_s = result.steps.last().map_or(0.0, |r| r.wall_s);
    result.peers_lost = s.peers_lost;
    result.retries = s.retries;
    result.hash_mismatches = s.replica_hash_mismatches;
    Ok(())
}

fn write_run(out: &Path, r: &RunResult, suffix_local: bool) -> anyhow::Result<()> {
    let name = if suffix_local && r.name == "local" {
        // Several baselines (variants changed the model or batch): number them.
        let mut n = 0;
        while out.join(format!("local-{n}")).exists() {
            n += 1;
        }
        format!("local-{n}")
    } else {
        r.name.clone()
    };
    let dir = out.join(name);
    std::fs::create_dir_all(&dir)?;
    let mut csv = String::from(
        "step,wall_s,step_s,loss,lr,tokens,tokens_per_s,wire_bytes,dense_bytes,activations_bytes,gradients_bytes,sync_bytes,state_bytes,retries,participants,events\n",
    );
    for s in &r.steps {
        let parts: Vec<String> = s.participants.iter().map(|p| p.to_string()).collect();
        let _ = writeln!(
            csv,
            "{},{:.3},{:.3},{:.6},{:.3e},{},{:.1},{},{},{},{},{},{},{},{},\"{}\"",
            s.step,
            s.wall_s,
            s.step_s,
            s.loss,
            s.lr,
            s.tokens,
            s.tokens_per_s,
            s.wire_bytes,
            s.dense_bytes,
            s.activations_bytes,
            s.gradients_bytes,
            s.sync_bytes,
            s.state_bytes,
            s.retries,
            parts.join("/"),
            s.events.join("; ").replace('"', "'"),
        );
    }
    std::fs::write(dir.join("steps.csv"), csv)?;
    std::fs::write(
        dir.join("steps.json"),
        serde_json::to_string_pretty(r)? + "\n",
    )?;
    Ok(())
}

fn write_plots(out: &Path, scenario: &Scenario, runs: &[&RunResult]) -> anyhow::Result<()> {
    // Events of every variant, once per label (variants usually share them). On step axes
    // (steps completed) "during step K" lies between K and K + 1.
    let mut step_marks: Vec<Marker> = Vec::new();
    let mut time_marks: Vec<Marker> = Vec::new();
    for r in runs {
        for f in &r.events {
            if !step_marks.iter().any(|m| m.label == f.label) {
                step_marks.push(Marker {
                    x: f.step as f64,
                    label: f.label.clone(),
                });
                time_marks.push(Marker {
                    x: f.wall_s,
                    label: f.label.clone(),
                });
            }
        }
    }
    let series = |f: &dyn Fn(&StepRow) -> (f64, f64), include_local: bool| -> Vec<Series> {
        runs.iter()
            .filter(|r| include_local || !r.name.starts_with("local"))
            .map(|r| Series {
                name: r.name.clone(),
                points: r.steps.iter().map(f).collect(),
                dashed: r.name.starts_with("local"),
            })
            .collect()
    };
    let name = &scenario.name;
    let mut charts = vec![
        (
            "loss_vs_step",
            Chart {
                title: format!("{name}: loss vs step"),
                x_label: "step".into(),
                y_label: "loss (nats/token)".into(),
                series: series(&|s| ((s.step + 1) as f64, s.loss), true),
                markers: step_marks
                    .iter()
                    .map(|m| Marker {
                        x: m.x + 0.5,
                        label: m.label.clone(),
                    })
                    .collect(),
            },
        ),
        (
            "loss_vs_time",
            Chart {
                title: format!("{name}: loss vs wall-clock time"),
                x_label: "seconds since the first step started".into(),
                y_label: "loss (nats/token)".into(),
                series: series(&|s| (s.wall_s, s.loss), true),
                markers: time_marks,
            },
        ),
        (
            "tokens_per_s",
            Chart {
                title: format!("{name}: throughput per step"),
                x_label: "step".into(),
                y_label: "tokens/s".into(),
                series: series(&|s| ((s.step + 1) as f64, s.tokens_per_s), true),
                markers: step_marks
                    .iter()
                    .map(|m| Marker {
                        x: m.x + 0.5,
                        label: m.label.clone(),
                    })
                    .collect(),
            },
        ),
        (
            "wire_bytes",
            Chart {
                title: format!("{name}: tensor bytes on the wire (cumulative)"),
                x_label: "step".into(),
                y_label: "MB (activations + gradients + sync)".into(),
                series: series(&|s| ((s.step + 1) as f64, s.wire_bytes as f64 / 1e6), false),
                markers: step_marks
                    .iter()
                    .map(|m| Marker {
                        x: m.x + 0.5,
                        label: m.label.clone(),
                    })
                    .collect(),
            },
        ),
    ];
    // The frontier: one point per variant, loss penalty at equal steps vs fp32/wire ratio.
    let local = runs.iter().find(|r| r.name.starts_with("local"));
    let frontier: Vec<Series> = runs
        .iter()
        .filter(|r| !r.name.starts_with("local") && r.wire_bytes() > 0)
        .filter_map(|r| {
            let p = penalty(r, local?);
            let ratio = r.dense_bytes() as f64 / r.wire_bytes() as f64;
            Some(Series {
                name: r.name.clone(),
                points: vec![(ratio, p)],
                dashed: false,
            })
        })
        .collect();
    if frontier.len() >= 2 {
        charts.push((
            "frontier",
            Chart {
                title: format!("{name}: loss penalty vs compression"),
                x_label: "fp32 bytes / wire bytes".into(),
                y_label: "final loss - local loss (same step)".into(),
                series: frontier,
                markers: Vec::new(),
            },
        ));
    }
    for (file, chart) in charts {
        std::fs::write(out.join(format!("{file}.svg")), chart.svg())?;
        std::fs::write(out.join(format!("{file}.png")), chart.png()?)?;
    }
    Ok(())
}

fn load_avg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

fn git_commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map_or_else(|| "unknown".into(), |s| s.trim().to_owned())
}

/// A link without its seed and default queue, for people.
fn link(s: &swarm_core::shaping::LinkShape) -> String {
    s.to_string()
        .split(',')
        .filter(|p| !p.starts_with("seed=") && *p != "queue=100000us")
        .collect::<Vec<_>>()
        .join(",")
}

fn mb(b: u64) -> String {
    format!("{:.1} MB", b as f64 / 1e6)
}

fn table(r: &ReplayJson) -> String {
    let mut s = format!(
        "{:<16} {:>10} {:>10} {:>9} {:>12} {:>9}\n",
        "variant", "final loss", "tokens/s", "vs local", "wire", "penalty"
    );
    let _ = writeln!(
        s,
        "{:<16} {:>10.4} {:>10.0} {:>9} {:>12} {:>9}",
        "local", r.local_final_loss, r.local_tokens_per_s, "1.00x", "-", "-"
    );
    for v in &r.variants {
        let _ = writeln!(
            s,
            "{:<16} {:>10.4} {:>10.0} {:>8.2}x {:>12} {:>+9.4}{}",
            v.name,
            v.final_loss,
            v.tokens_per_s,
            v.vs_local,
            mb(v.wire_bytes),
            v.loss_penalty,
            v.error
                .as_ref()
                .map_or(String::new(), |e| format!("  FAILED: {e}"))
        );
    }
    s
}

#[allow(clippy::too_many_arguments)]
fn summary_md(
    scenario: &Scenario,
    args: &ReplayArgs,
    locals: &[(RunConfig, RunResult)],
    results: &[RunResult],
    json: &[VariantJson],
    load_start: String,
    load_end: String,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Scenario `{}`\n", scenario.name);
    if !scenario.description.is_empty() {
        let _ = writeln!(s, "{}\n", scenario.description.trim());
    }
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut cmd = format!("swarm replay {}", args.scenario.display());
    if let Some(n) = args.steps {
        let _ = write!(cmd, " --steps {n}");
    }
    if !args.only.is_empty() {
        let _ = write!(cmd, " --only {}", args.only.join(","));
    }
    let _ = writeln!(
        s,
        "Command: `{cmd}` at commit {} on a {cores}-core machine (load average {load_start} at the start, {load_end} at the end; every process of the swarm shares these cores, so throughput is what this machine gives, and ratios are what carries over).\n",
        git_commit()
    );
    let l = &locals[0].1;
    let _ = writeln!(
        s,
        "Local baseline (one process, same config and seed, measured in this invocation): {} steps, final loss {:.4}, {:.0} tokens/s.\n",
        l.steps.len(),
        l.final_loss(),
        l.tokens_per_s
    );
    s.push_str("| variant | codecs | final loss | loss − local (same step) | tokens/s | vs local | wire bytes | fp32 / wire | retries | peers lost |\n|---|---|---|---|---|---|---|---|---|---|\n");
    for (r, j) in results.iter().zip(json) {
        let ratio = if j.wire_bytes > 0 {
            format!("{:.1}x", j.dense_bytes as f64 / j.wire_bytes as f64)
        } else {
            "-".into()
        };
        let fail = r.error.as_ref().map_or(String::new(), |e| {
            format!(" (failed: {})", e.replace('|', "/"))
        });
        let _ = writeln!(
            s,
            "| {}{fail} | {} | {:.4} | {:+.4} | {:.0} | {:.2}x | {} | {ratio} | {} | {} |",
            r.name,
            r.codecs,
            j.final_loss,
            j.loss_penalty,
            j.tokens_per_s,
            j.vs_local,
            mb(j.wire_bytes),
            j.retries,
            j.peers_lost
        );
    }
    for (v, r) in scenario.variants.iter().zip(results) {
        let peers: Vec<String> = v
            .peers
            .iter()
            .enumerate()
            .map(|(i, (st, sh))| format!("peer {i}: stage {st}, {}", link(sh)))
            .collect();
        let _ = writeln!(s, "\n**{}**: {}.", r.name, peers.join("; "));
        for f in &r.events {
            let _ = writeln!(
                s,
                "- {}: {} (during step {}, {:.1} s)",
                f.label, f.outcome, f.step, f.wall_s
            );
        }
    }
    s.push_str("\n![loss vs step](loss_vs_step.png) ![loss vs time](loss_vs_time.png)\n![tokens per second](tokens_per_s.png) ![wire bytes](wire_bytes.png)\n");
    if results.len() >= 2 {
        s.push_str("![loss penalty vs compression](frontier.png)\n");
    }
    s
}
