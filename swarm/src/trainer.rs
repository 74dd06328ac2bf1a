//! The trainer of a distributed run (issue #6): creates the run, holds the data and the ends shard
//! (embedding + head), routes micro-batches through stage replicas, counts each exactly once,
//! coordinates the replica sync at every step boundary, checkpoints and resumes.

pub mod audit;
pub mod book;
pub mod checkpoint;
mod driver;
pub mod machine;
pub mod metrics;
pub mod observe;
mod timing;

pub use book::{Attempt, Column, CountOutcome, Holder, StepBook};
pub use driver::{Trainer, TrainerEvent, TrainerOptions, run_id_of};
pub use metrics::{Channel, ChannelBytes, Metrics, StepReport, Summary, WireStats};
pub use timing::TimeBreakdown;

/// Codecs for runs over home links: the defaults of `RunConfig` (`[codec]` in
/// experiments/run.toml) and of `swarm demo`. Together about 11x fewer tensor bytes than fp32
/// on the default run (activations, activation gradients and the sync each carry a third of the
/// fp32 bytes there). Measured in experiments/results/2026-11-25-demo-codecs.md and
/// experiments/results/2026-11-26-activation-codecs.md:
///
/// - Activations are the most sensitive channel: with only they compressed, 100 steps cost +35%
///   loss at 4-bit (rotated, blocks of 64, 7.9x), +20% at 5-bit, +6% at 6-bit and +1% at 8-bit
///   (4.2x); error feedback cannot apply since every micro-batch differs. So they get 6-bit
///   codes, rotated per 256-value block (one token of the default model) and entropy-coded by
///   zstd (~5.7x), and `dedup` sends each distinct row once: the embedding outputs the trainer
///   sends repeat one row per token id, so that boundary shrinks ~100x and the channel is ~8.4x.
/// - Activation gradients tolerate coarser steps: rotation + 4-bit in blocks of 1024 (a larger
///   absmax, so a coarser step that zstd turns into fewer bits: ~10x). Top-k on them (50% per
///   row) ruined training (1.25 vs 0.33 at 100 steps).
/// - Replica sync, with error feedback: rotation + 2-bit in blocks of 1024 + zstd is nearly
///   free (dense, 23.6x: 0.347 vs 0.331 at 100 steps), because every coordinate still gets a
///   value every step. Top-k is what hurts under AdamW (its update is scale-free, so the small
///   coordinates that top-k defers matter as much as the large ones): top-50% cost +29% at 100
///   steps, top-10% +12% already at 30 steps, top-2% stalled at the unigram plateau. Top-90%
///   (the product's top-k sparsification, 18.9x) measured the same as dense (0.346).
///
/// On the default run (1000 steps) the previous 4-bit activations already ended within 1% of
/// the uncompressed run; these cut the lag in mid-training (100 steps: +4% instead of +28%).
pub const HOME_ACTIVATIONS: &str = "dedup+rht+q6:256+zstd:3";
/// See [`HOME_ACTIVATIONS`].
pub const HOME_GRADIENTS: &str = "rht+q4:1024+zstd:3";
/// See [`HOME_ACTIVATIONS`].
pub const HOME_SYNC: &str = "topk:0.9+rht+q2:1024+zstd:3";

/// Activations of the home frontier point ([`home_frontier`]): 4-bit, because a subspace
/// boundary carries only k coordinates per token (93x on that channel at k = hidden / 8).
pub const HOME_SUBSPACE_ACTIVATIONS: &str = "dedup+rht+q4:256+zstd:3";

/// The point of issue #13's frontier that `swarm demo` runs (experiments/results/
/// 2026-12-07-subspace.md and 2026-12-07-warm-sync.md): the subspace model at rank
/// hidden / 8 (k = 32 on the default model), 4-bit activations, [`HOME_GRADIENTS`], and the
/// SparseLoCo sync (`[sync] mode = "sparseloco"` with its default codecs: top 2% per 4096-chunk
/// in 2 bits every 5 steps, top 10% at the boundaries within the LR warmup). On the default run
/// that is ~110x fewer bytes than the standard model in fp32, within 2% of its local val loss
/// at 50 steps, no step after warmup more than 6% above it; `swarm demo --frontier --audit-rate 0`
/// measured 109x with 0 replica hash mismatches. Not yet the default of `swarm demo` or
/// `RunConfig`: the inner-step audits of drifting replicas ban honest replicas of this model
/// (all three audited at step 0, "optimizer step off by 1.4").
pub fn home_frontier(cfg: &mut swarm_model::RunConfig) {
    cfg.model.subspace_rank = cfg.model.hidden_size / 8;
    cfg.model.subspace_seed = cfg.seed;
    cfg.codec.activations = HOME_SUBSPACE_ACTIVATIONS.into();
    cfg.codec.gradients = HOME_GRADIENTS.into();
    cfg.sync.mode = swarm_model::SyncMode::Sparseloco;
}
