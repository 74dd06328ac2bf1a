//! One module per subcommand; each has an `Args` struct (clap) and `run(args) -> anyhow::Result<()>`.

#[cfg(feature = "fault")]
pub mod bench_audit;
pub mod bench_codec;
pub mod bench_compress;
pub mod bench_link;
pub mod bench_memory;
pub mod bench_model;
pub mod bench_monitor;
pub mod bench_nat;
pub mod data;
pub mod demo;
pub mod demo_nat;
pub mod eval;
pub mod generate;
pub mod join;
pub mod ledger;
pub mod replay;
pub mod sim;
pub mod status;
pub mod top;
pub mod train;
pub mod train_swarm;
