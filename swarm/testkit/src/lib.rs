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
/// the top 3% of each 1024-value chunk, 2-bit values, and the top 10% at the first boundary,
/// which the 3-step warmup covers (`[sync] warmup_codec`); no evaluation (it runs only at sync
/// boundaries in this mode).
#[cfg(feature = "model")]
pub fn sparse_config(steps: u64) -> RunConfig {
    let mut cfg = tiny_config(steps);
    cfg.sync.mode = swarm_model::SyncMode::Sparseloco;
    cfg.sync.every = 3;
    cfg.sync.chunk = 1024;
    cfg.sync.codec = "topk-row:0.03+q2".into();
    cfg.sync.warmup_codec = "topk-row:0.1+q2".into();
    cfg.train.warmup_steps = 3;
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

/// Asserts the checkpoint in `dir` is at `step` and holds `local`'s weights: every value within
/// 1e-3 of its tensor's scale (max |w|), and fewer than 1% of them beyond 1e-4.
///
/// Not bitwise: replicas of a stage each sum their share of the micro-batches, so the step's sum
/// associates differently from the local run's, and AdamW's normalised update turns a last-bit
/// difference in a near-zero gradient coordinate into a visible one in that weight (measured: one
/// value of 2,048 at 1.5e-4, the rest below 6e-5 after 3 steps). A wrong gradient moves most
/// values by about the learning rate. One replica per stage is checked bitwise
/// (`swarm/tests/trainer_pipeline.rs`). Used by the in-process trainer tests and the `swarm
/// demo` process test.
#[cfg(feature = "model")]
pub fn assert_checkpoint_is_local(dir: &std::path::Path, step: u64, local: &LocalTrainer) {
    let ck = swarm_model::checkpoint::load(dir).unwrap();
    assert_eq!(ck.state.as_ref().map(|s| s.step), Some(step));
    for (name, t) in &local.tensors() {
        let got = &ck.tensors[name];
        let a: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
        let scale = a.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
        let rel: Vec<f32> = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs() / scale)
            .collect();
        let max = rel.iter().fold(0f32, |m, r| m.max(*r));
        let beyond = rel.iter().filter(|r| **r > 1e-4).count();
        assert!(
            max < 1e-3 && beyond * 100 < rel.len(),
            "{name}: max relative diff {max}, {beyond} of {} values beyond 1e-4",
            rel.len()
        );
    }
}

/// The losses of the single-process reference run over all of `cfg`'s steps.
#[cfg(feature = "model")]
pub fn local_losses(cfg: &RunConfig) -> Vec<f64> {
    local_run(cfg, cfg.train.steps as usize).0
}
