//! What `swarm bench` (in `tools`) runs that is not the product, kept out of the library crates:
//!
//! - [`model`]: one micro-batch of a run's model timed by phase and op, against this machine's
//!   matmul peak (`swarm bench model`), and a stage's training steps for the memory
//!   measurements (`swarm bench memory`, `tests/stage_memory.rs`);
//! - [`link`]: bulk transfer between two nodes on loopback over shaped links (`swarm bench link`,
//!   and `swarm/tests/transport_shaping.rs`);
//! - [`codec_sim`]: a swarm run's compression simulated in one process (`swarm bench compress`,
//!   and the reference of `swarm/tests/trainer_sparse.rs`).
//!
//! It depends on the network layer, the model and the codecs, never on `swarm-core`: the
//! simulation is an independent implementation of the swarm's order of operations, which is what
//! makes it a reference for the real trainer.

#![warn(missing_docs)]

pub mod codec_sim;
pub mod link;
pub mod model;

/// Why a simulation cannot run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model crate refused an operation (config, tensors, data).
    #[error("model: {0}")]
    Model(#[from] swarm_model::Error),
    /// A frame could not be encoded or decoded, or a codec string parsed.
    #[error("codec: {0}")]
    Codec(#[from] swarm_compression::Error),
    /// The simulation options make no run (no replica, a sync every 0 steps).
    #[error("simulation options: {0}")]
    Options(&'static str),
}

/// This crate's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;
