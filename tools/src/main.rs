//! `swarm`: train transformer language models across a swarm of volunteer machines.
//!
//! Every command prints human output, and with `--json` its last line of stdout is one JSON object.
//! Business logic lives in the library crates; this binary parses arguments, shows progress and
//! prints results.

mod alloc;
mod cluster;
mod cmd;
mod fault;
mod monitor;
mod plot;
mod procfs;
mod scenario;
mod shutdown;
mod ui;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "swarm", version, about, long_about = None)]
struct Cli {
    /// Log filter (tracing-subscriber EnvFilter syntax), e.g. `info` or `swarm_core=debug`.
    #[arg(long, global = true, env = "SWARM_LOG", default_value = "warn")]
    log: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model: `--local` in this process (the reference run).
    Train(cmd::train::TrainArgs),
    /// Mean next-token loss (and last-position logits) of a checkpoint.
    Eval(cmd::eval::EvalArgs),
    /// Sample text from a checkpoint.
    Generate(cmd::generate::GenerateArgs),
    /// A whole swarm on loopback: a trainer and N shaped peer processes train the default model.
    Demo(cmd::demo::DemoArgs),
    /// Replay an experiment scenario (experiments/*.toml): every variant as a shaped swarm on
    /// loopback plus the local baseline; CSV/JSON per step, plots and a markdown summary.
    Replay(cmd::replay::ReplayArgs),
    /// Start a peer and join a swarm (or start a new one).
    Join(cmd::join::JoinArgs),
    /// Show the swarm as one peer sees it.
    Status(cmd::status::StatusArgs),
    /// A terminal view of a running trainer's monitor (`swarm train --http`, `swarm demo`).
    Top(cmd::top::TopArgs),
    /// Verify a run's contribution ledger, or show per-peer credit.
    #[command(subcommand)]
    Ledger(cmd::ledger::LedgerCommand),
    /// Simulate a large swarm with the router's logic.
    Sim(cmd::sim::SimArgs),
    /// Datasets: tokenize text into token shards once (`data prepare`).
    #[command(subcommand)]
    Data(cmd::data::DataCommand),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Forward, backward and optimizer time of the default model.
    Model(cmd::bench_model::BenchModelArgs),
    /// Ratio, error and speed of the codecs on realistic tensors.
    Codec(cmd::bench_codec::BenchCodecArgs),
    /// Loss and bytes of a run's codecs simulated in this process, against the local run.
    Compress(cmd::bench_compress::BenchCompressArgs),
    /// Transfer throughput over a shaped QUIC link.
    Link(cmd::bench_link::BenchLinkArgs),
    /// Hole-punch time between two home routers (network namespaces and nftables; needs root).
    Nat(cmd::bench_nat::BenchNatArgs),
    /// How far honest audit recomputations differ across thread counts, fault distances, cost.
    #[cfg(feature = "fault")]
    Audit(cmd::bench_audit::BenchAuditArgs),
    /// Micro-batches until a faulty peer is banned, over seeded runs, against the theory.
    #[cfg(feature = "fault")]
    AuditBan(cmd::bench_audit::BenchAuditBanArgs),
    /// What serving the monitor (a polling page and a Prometheus scrape) costs the training.
    Monitor(cmd::bench_monitor::BenchMonitorArgs),
    /// Peak resident memory of one pipeline stage of each model preset, against the prediction
    /// `swarm join` uses.
    Memory(cmd::bench_memory::BenchMemoryArgs),
}

fn main() {
    alloc::tune();
    let cli = Cli::parse();
    ui::init_tracing(&cli.log);
    // Before anything starts: SIGTERM then stops a command the way Ctrl-C does (issue #16).
    if let Err(e) = shutdown::install() {
        eprintln!("error: cannot handle signals: {e:#}");
        std::process::exit(1);
    }
    let result = match cli.command {
        Command::Train(a) => cmd::train::run(a),
        Command::Eval(a) => cmd::eval::run(a),
        Command::Generate(a) => cmd::generate::run(a),
        Command::Demo(a) => cmd::demo::run(a),
        Command::Replay(a) => cmd::replay::run(a),
        Command::Join(a) => cmd::join::run(a),
        Command::Status(a) => cmd::status::run(a),
        Command::Top(a) => cmd::top::run(a),
        Command::Ledger(c) => cmd::ledger::run(c),
        Command::Sim(a) => cmd::sim::run(a),
        Command::Data(c) => cmd::data::run(c),
        Command::Bench(BenchCommand::Model(a)) => cmd::bench_model::run(a),
        Command::Bench(BenchCommand::Compress(a)) => cmd::bench_compress::run(a),
        Command::Bench(BenchCommand::Memory(a)) => cmd::bench_memory::run(a),
        Command::Bench(BenchCommand::Codec(a)) => cmd::bench_codec::run(a),
        Command::Bench(BenchCommand::Link(a)) => cmd::bench_link::run(a),
        Command::Bench(BenchCommand::Nat(a)) => cmd::bench_nat::run(a),
        #[cfg(feature = "fault")]
        Command::Bench(BenchCommand::Audit(a)) => cmd::bench_audit::run(a),
        #[cfg(feature = "fault")]
        Command::Bench(BenchCommand::AuditBan(a)) => cmd::bench_audit::run_ban(a),
        Command::Bench(BenchCommand::Monitor(a)) => cmd::bench_monitor::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
