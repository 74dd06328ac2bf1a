//! `swarm sim` (issue #5): a deterministic simulation of a large swarm driven by the router.
//! The simulation's results are a function of (arguments, seed); only the planner timings, which
//! this command measures around each library call, vary between runs.

use std::time::Instant;

use serde::Serialize;
use swarm_router::sim::{self, Observer, SimConfig};

use crate::ui;

#[derive(clap::Args)]
pub(crate) struct SimArgs {
    /// Peers at the start (churn keeps the swarm at this size).
    #[arg(long, default_value_t = 1000)]
    pub peers: usize,
    /// Pipeline stages.
    #[arg(long, default_value_t = 8)]
    pub stages: u16,
    /// Crashes per peer per hour, in percent (replaced by joiners at the same rate).
    #[arg(long, default_value_t = 10.0)]
    pub churn: f64,
    /// Seed of every random choice in the simulation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Simulated seconds.
    #[arg(long, default_value_t = 600.0)]
    pub duration: f64,
    /// Simulated seconds before throughput is measured.
    #[arg(long, default_value_t = 300.0)]
    pub warmup: f64,
    /// Micro-batches kept in flight per initial peer (the trainers' demand).
    #[arg(long, default_value_t = 4.0)]
    pub in_flight_per_peer: f64,
    /// Print the result as one JSON object on the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Output {
    peers: usize,
    stages: u16,
    microbatches: u64,
    throughput: f64,
    optimal_throughput: f64,
    efficiency: f64,
    plan_us_p50: f64,
    plan_us_p99: f64,
    seed: u64,
    churn: f64,
    plans: u64,
    crashes: u64,
    joins: u64,
    moves: u64,
    failovers: u64,
    mean_latency_s: f64,
    window_s: f64,
    stage_balance: f64,
    wall_s: f64,
}

/// Times each planner call and drives the progress bar.
struct Timer {
    plan_ns: Vec<u64>,
    bar: indicatif::ProgressBar,
}

impl Observer for Timer {
    fn time_plan(&mut self, f: &mut dyn FnMut()) {
        let t = Instant::now();
        f();
        self.plan_ns.push(t.elapsed().as_nanos() as u64);
    }

    fn progress(&mut self, sim_s: f64, _end_s: f64) {
        self.bar.set_position(sim_s as u64);
    }
}

fn percentile_us(sorted_ns: &[u64], q: f64) -> f64 {
    if sorted_ns.is_empty() {
        return 0.0;
    }
    let i = ((sorted_ns.len() - 1) as f64 * q).round() as usize;
    sorted_ns[i] as f64 / 1e3
}

pub(crate) fn run(args: SimArgs) -> anyhow::Result<()> {
    let mut cfg = SimConfig::new(args.peers, args.stages, args.churn, args.seed);
    cfg.duration_s = args.duration;
    cfg.warmup_s = args.warmup;
    cfg.in_flight_per_peer = args.in_flight_per_peer;
    let bar = ui::progress(args.duration.max(0.0) as u64, args.json);
    bar.set_message("simulated seconds");
    let mut timer = Timer {
        plan_ns: Vec::new(),
        bar,
    };
    let wall = Instant::now();
    let report = sim::run(&cfg, &mut timer)?;
    let wall_s = wall.elapsed().as_secs_f64();
    timer.bar.finish_and_clear();
    timer.plan_ns.sort_unstable();
    let out = Output {
        peers: report.peers,
        stages: report.stages,
        microbatches: report.microbatches,
        throughput: report.throughput,
        optimal_throughput: report.optimal_throughput,
        efficiency: report.efficiency,
        plan_us_p50: percentile_us(&timer.plan_ns, 0.50),
        plan_us_p99: percentile_us(&timer.plan_ns, 0.99),
        seed: args.seed,
        churn: args.churn,
        plans: report.plans,
        crashes: report.crashes,
        joins: report.joins,
        moves: report.moves,
        failovers: report.failovers,
        mean_latency_s: report.mean_latency_s,
        window_s: report.window_s,
        stage_balance: report.stage_balance,
        wall_s,
    };
    println!(
        "simulated {} peers x {} stages, churn {}%/h, seed {}: {:.0} s measured after {:.0} s warmup",
        out.peers, out.stages, out.churn, out.seed, out.window_s, args.warmup
    );
    println!(
        "throughput {:.2} micro-batches/s of optimal {:.2}: efficiency {:.3} ({} micro-batches, mean latency {:.1} s)",
        out.throughput,
        out.optimal_throughput,
        out.efficiency,
        out.microbatches,
        out.mean_latency_s
    );
    println!(
        "churn: {} crashes, {} joins, {} rebalancing moves, {} hops re-run after failures",
        out.crashes, out.joins, out.moves, out.failovers
    );
    println!(
        "planner: {} plans, p50 {:.1} us, p99 {:.1} us (wall clock, shared machine); run took {:.1} s",
        out.plans, out.plan_us_p50, out.plan_us_p99, out.wall_s
    );
    if args.json {
        ui::print_json(&out)?;
    }
    Ok(())
}
