//! One module per subcommand; each has an `Args` struct (clap) and `run(args) -> anyhow::Result<()>`.

#[cfg(feature = "fault")]
pub(crate) mod bench_audit;
pub(crate) mod bench_codec;
pub(crate) mod bench_compress;
pub(crate) mod bench_link;
pub(crate) mod bench_memory;
pub(crate) mod bench_model;
pub(crate) mod bench_monitor;
pub(crate) mod bench_nat;
pub(crate) mod data;
pub(crate) mod demo;
pub(crate) mod demo_nat;
pub(crate) mod eval;
pub(crate) mod generate;
pub(crate) mod join;
pub(crate) mod ledger;
pub(crate) mod ns_forward;
pub(crate) mod replay;
pub(crate) mod sim;
pub(crate) mod status;
pub(crate) mod top;
pub(crate) mod train;
pub(crate) mod train_swarm;
