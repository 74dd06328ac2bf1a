//! The trainer of a distributed run (issue #6): creates the run, holds the data and the ends shard
//! (embedding + head), routes micro-batches through stage replicas, counts each exactly once,
//! coordinates the replica sync at every step boundary, checkpoints and resumes.

pub mod book;
pub mod checkpoint;
mod driver;
pub mod metrics;

pub use book::{Attempt, Column, CountOutcome, Holder, StepBook};
pub use driver::{Trainer, TrainerEvent, TrainerOptions, run_id_of};
pub use metrics::{Channel, ChannelBytes, Metrics, StepReport, Summary, WireStats};
