//! Helpers shared by the workspace's test trees, so that each exists once: the tiny run the swarm
//! tests compare with the single-process run, that run's losses, loss and logit comparisons, and
//! a time bound on every await of an async test.
//!
//! A dev-dependency only (`publish = false`); no library crate depends on it.

#![warn(missing_docs)]

use std::future::Future;
use std::time::Duration;

#[cfg(feature = "model")]
use swarm_model::{LocalTrainer, RunConfig};

/// How long one awaited test step may take (generous: the machine running the tests is shared).
pub const LIMIT: Duration = Duration::from_secs(60);

/// Awaits `f` for at most [`LIMIT`]; panics when it takes longer, so no test hangs.
pub async fn bounded<T>(f: impl Future<Output = T>) -> T {
    within(LIMIT, f).await
}

/// Awaits `f` for at most `limit`; panics when it takes longer.
pub async fn within<T>(limit: Duration, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, f)
        .await
        .expect("test step timed out")
}

/// max |a - b| / max |b|: the relative difference of two vectors (e.g. logits).
pub fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
    let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    diff / scale
}

/// Asserts every step's loss is within `tol` relative of the reference.
pub fn assert_losses_match(got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len());
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        let rel = (g - w).abs() / w.abs();
        assert!(
            rel < tol,
            "step {k}: swarm loss {g} vs local {w} (rel {rel})"
        );
    }
}

/// A 2-layer, width-32 model in 2 stages; 4 micro-batches of 2 x 16 tokens per step; codec
/// `none` (exact fp32: the tests compare with the single-process run, and the default codecs are
/// lossy).
#[cfg(feature = "model")]
pub fn tiny_config(steps: u64) -> RunConfig {
    let mut cfg = RunConfig {
        codec: swarm_model::CodecConfig::none(),
        ..RunConfig::default()
    };
    cfg.model.hidden_size = 32;
    cfg.model.intermediate_size = 64;
    cfg.model.num_hidden_layers = 2;
    cfg.model.num_attention_heads = 4;
    cfg.model.num_key_value_heads = Some(2);
    cfg.model.max_position_embeddings = 32;
    cfg.stages = vec![0, 1, 2];
    cfg.train.steps = steps;
    cfg.train.micro_batches = 4;
    cfg.train.micro_batch_size = 2;
    cfg.train.seq_len = 16;
    cfg.train.warmup_steps = 1;
    cfg.train.lr = 1e-2;
    cfg.validate().unwrap();
    cfg
}

/// [`tiny_config`] with the multi-step replica sync (`[sync] mode = "sparseloco"`) every 3 steps:
/// the top 3% of each 1024-value chunk, 2-bit values; no evaluation (it runs only at sync
/// boundaries in this mode).
#[cfg(feature = "model")]
pub fn sparse_config(steps: u64) -> RunConfig {
    let mut cfg = tiny_config(steps);
    cfg.sync.mode = swarm_model::SyncMode::Sparseloco;
    cfg.sync.every = 3;
    cfg.sync.chunk = 1024;
    cfg.sync.codec = "topk-row:0.03+q2".into();
    cfg.train.eval_every = 0;
    cfg.validate().unwrap();
    cfg
}

/// The smallest run the stage tests use: a 2-layer, width-16 model in 2 stages; 2
/// micro-batches of 2 x 8 tokens; codec `none`; seeded with `seed`.
#[cfg(feature = "model")]
pub fn micro_config(seed: u64) -> RunConfig {
    let mut c = RunConfig {
        seed,
        codec: swarm_model::CodecConfig::none(),
        ..RunConfig::default()
    };
    c.model.hidden_size = 16;
    c.model.intermediate_size = 32;
    c.model.num_hidden_layers = 2;
    c.model.num_attention_heads = 4;
    c.model.num_key_value_heads = Some(2);
    c.model.max_position_embeddings = 16;
    c.stages = vec![0, 1, 2];
    c.train.micro_batches = 2;
    c.train.micro_batch_size = 2;
    c.train.seq_len = 8;
    c.validate().unwrap();
    c
}

/// The single-process reference run of `cfg` for `steps` steps: its losses, step by step, and
/// the trainer (for its weights).
#[cfg(feature = "model")]
pub fn local_run(cfg: &RunConfig, steps: usize) -> (Vec<f64>, LocalTrainer) {
    let corpus = swarm_model::train::load_corpus(&cfg.data).unwrap();
    let mut local = LocalTrainer::new(cfg).unwrap();
    let losses = (0..steps)
        .map(|_| local.train_step(&corpus).unwrap().loss)
        .collect();
    (losses, local)
}

/// The losses of the single-process reference run over all of `cfg`'s steps.
#[cfg(feature = "model")]
pub fn local_losses(cfg: &RunConfig) -> Vec<f64> {
    local_run(cfg, cfg.train.steps as usize).0
}
