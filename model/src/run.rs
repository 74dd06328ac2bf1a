//! The run config: everything that fixes a training run, read from TOML (see
//! `experiments/run.toml`, the commented default). A run is a function of this config: the same
//! config gives bitwise the same weights, locally or on a swarm with compression off.
//!
//! Unknown fields are errors everywhere (`deny_unknown_fields`), so a typo never silently falls
//! back to a default. Missing fields and sections take the defaults of [`RunConfig::default`].

use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize};

use crate::data::VAL_FRACTION;
use crate::optim::{AdamW, LrSchedule};
use crate::{Error, ModelConfig, Result};

/// A whole run: seed, model, stage split, training schedule, data and codecs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Seeds the weights (per tensor name) and the data order (per step and micro-batch).
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Stage boundaries in layers: `[0, 2, 4]` means stage 0 = layers 0..2, stage 1 = 2..4.
    /// Must start at 0, increase strictly and end at `model.num_hidden_layers`. Empty (or
    /// absent) means two stages of equal size (one if the model has a single layer).
    #[serde(default)]
    pub stages: Vec<usize>,
    /// The model shape, the fields of HF `config.json`.
    #[serde(default = "default_model", deserialize_with = "strict_model")]
    pub model: ModelConfig,
    /// `[train]`: steps, batch geometry, optimizer.
    #[serde(default)]
    pub train: TrainConfig,
    /// `[data]`: the corpus.
    #[serde(default)]
    pub data: DataConfig,
    /// `[codec]`: the codec of each channel.
    #[serde(default)]
    pub codec: CodecConfig,
    /// How the replicas of a stage stay identical (absent: every step, `[codec] sync`).
    #[serde(default, skip_serializing_if = "SyncConfig::is_per_step_default")]
    pub sync: SyncConfig,
}

/// The replica sync of a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// Every step: the replicas exchange their accumulated gradients (`[codec] sync`), sum them
    /// and take one AdamW step; identical at every step.
    #[default]
    Step,
    /// SparseLoCo (arXiv 2508.15706): every replica takes its own inner AdamW step every step,
    /// on its own micro-batches, and every `every` steps the replicas exchange the top-k
    /// pseudo-gradient (`anchor - weights`, `[sync] codec` per chunk, error feedback decayed by
    /// `beta`), average it and take one outer SGD step (`outer_lr`): identical at every sync
    /// boundary.
    Sparseloco,
}

/// `[sync]`: the sync mode and the multi-step sync's parameters (unused in mode `step`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncConfig {
    /// Every step or multi-step (SparseLoCo).
    pub mode: SyncMode,
    /// Steps between sync boundaries (H); the run's last step is a boundary too.
    pub every: u64,
    /// Codec of the pseudo-gradient, applied per chunk of `chunk` values (`topk-row:F` keeps a
    /// fraction F of each chunk).
    pub codec: String,
    /// Codec of the sync boundaries within the LR warmup (state step <= `train.warmup_steps`).
    /// Early pseudo-gradients are large and dense while the error feedback is still empty: at 2%
    /// the first boundary throws most of the inner steps' progress back into the residual and
    /// the loss jumps (+11% over the local run on the step after it, +20% in a subspace model;
    /// experiments/results/2026-12-07-warm-sync.md); a wider top-k for these few boundaries
    /// removes the jump at a small cost in bytes.
    pub warmup_codec: String,
    /// Values per top-k chunk (SparseLoCo: 4096).
    pub chunk: usize,
    /// Decay of the pseudo-gradient's error-feedback residual, in [0, 1] (SparseLoCo: 0.95).
    pub beta: f32,
    /// Outer SGD learning rate on the averaged pseudo-gradient (SparseLoCo: 1, no momentum).
    pub outer_lr: f32,
}

impl Default for SyncConfig {
    fn default() -> Self {
        Self {
            mode: SyncMode::Step,
            every: 5,
            codec: "topk-row:0.02+q2".into(),
            warmup_codec: "topk-row:0.1+q2".into(),
            chunk: 4096,
            beta: 0.95,
            outer_lr: 1.0,
        }
    }
}

impl SyncConfig {
    /// Whether this is the default (per-step) section: left out of the canonical TOML so run ids
    /// of configs without `[sync]` do not change.
    pub fn is_per_step_default(&self) -> bool {
        *self == SyncConfig::default()
    }

    /// Replicas drift between sync boundaries (a multi-step mode).
    pub fn drifts(&self) -> bool {
        self.mode != SyncMode::Step
    }

    /// Whether the sync boundary at state step `steps_done` takes `warmup_codec`.
    pub fn in_warmup(steps_done: u64, warmup_steps: u64) -> bool {
        steps_done <= warmup_steps
    }

    /// The pseudo-gradient codec of the sync boundary at state step `steps_done` (steps done)
    /// of a run that warms up for `warmup_steps`: `warmup_codec` within the warmup, else `codec`.
    pub fn codec_at(&self, steps_done: u64, warmup_steps: u64) -> &str {
        if Self::in_warmup(steps_done, warmup_steps) {
            &self.warmup_codec
        } else {
            &self.codec
        }
    }
}

/// Optimisation and batch geometry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Optimizer steps in the run.
    pub steps: u64,
    /// Micro-batches per step; gradients are averaged over them (the pipeline's unit of work).
    pub micro_batches: usize,
    /// Sequences per micro-batch.
    pub micro_batch_size: usize,
    /// Tokens per sequence (at most `model.max_position_embeddings`).
    pub seq_len: usize,
    /// Peak learning rate, reached after `warmup_steps`.
    pub lr: f64,
    /// Learning rate at the end of the cosine decay.
    pub min_lr: f64,
    /// Steps of the linear warmup.
    pub warmup_steps: u64,
    /// AdamW decoupled weight decay (matrices only).
    pub weight_decay: f64,
    /// AdamW (beta1, beta2).
    pub betas: [f64; 2],
    /// AdamW epsilon.
    pub eps: f64,
    /// Clip the global gradient norm (over the whole model) to this; 0 disables.
    pub grad_clip: f64,
    /// Validation loss every this many steps (and at the end); 0 only at the end.
    pub eval_every: u64,
    /// Validation batches (of `micro_batch_size` x `seq_len`) per evaluation.
    pub eval_batches: usize,
    /// Write a checkpoint every this many steps (and at the end); 0 only at the end.
    pub checkpoint_every: u64,
}

/// Where the tokens come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// A UTF-8 text file or a folder of them; absent: the built-in corpus.
    pub path: Option<PathBuf>,
    /// A HF `tokenizer.json`; absent: bytes (vocab 256).
    pub tokenizer: Option<PathBuf>,
    /// Fraction of the corpus held out for validation (its tail).
    pub val_fraction: f64,
}

/// Codec per channel, as strings such as `"none"` or `"topk:0.1+q8+zstd:3"`. Opaque to the
/// model crate; the swarm crate parses them. The local trainer ignores them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CodecConfig {
    /// Activations sent forward between stages.
    pub activations: String,
    /// Activation gradients sent backward between stages.
    pub gradients: String,
    /// Weight gradients exchanged between the replicas of a stage at the step boundary.
    pub sync: String,
}

fn default_seed() -> u64 {
    1234
}

/// The default model: byte-level vocabulary, two layers of width 256 (about 1.7M parameters),
/// sized so that 1,000 local steps on tinyshakespeare take minutes on a 2-core machine.
pub fn default_model() -> ModelConfig {
    ModelConfig {
        hidden_size: 256,
        intermediate_size: 768,
        num_hidden_layers: 2,
        num_attention_heads: 8,
        num_key_value_heads: Some(4),
        vocab_size: 256,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        max_position_embeddings: 256,
        tie_word_embeddings: false,
        subspace_rank: 0,
        subspace_seed: 0,
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 1000,
            micro_batches: 2,
            micro_batch_size: 16,
            seq_len: 128,
            lr: 3e-3,
            min_lr: 3e-4,
            warmup_steps: 50,
            weight_decay: 0.1,
            betas: [0.9, 0.95],
            eps: 1e-8,
            grad_clip: 1.0,
            eval_every: 100,
            eval_batches: 8,
            checkpoint_every: 0,
        }
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            path: None,
            tokenizer: None,
            val_fraction: VAL_FRACTION,
        }
    }
}

impl CodecConfig {
    /// Exact fp32 on every channel: the swarm run is then numerically the local run.
    pub fn none() -> Self {
        Self {
            activations: "none".into(),
            gradients: "none".into(),
            sync: "none".into(),
        }
    }
}

/// The swarm's home-link codecs (`swarm_core::trainer::HOME_*`, which a swarm test checks are
/// these; the reasons and measurements are documented there).
impl Default for CodecConfig {
    fn default() -> Self {
        Self {
            activations: "dedup+rht+q6:256+zstd:3".into(),
            gradients: "rht+q4:1024+zstd:3".into(),
            sync: "topk:0.9+rht+q2:1024+zstd:3".into(),
        }
    }
}

impl Default for RunConfig {
    fn default() -> Self {
        let model = default_model();
        Self {
            seed: default_seed(),
            stages: default_stages(model.num_hidden_layers),
            model,
            train: TrainConfig::default(),
            data: DataConfig::default(),
            codec: CodecConfig::default(),
            sync: SyncConfig::default(),
        }
    }
}

/// Two stages of (nearly) equal size; one if there is a single layer.
pub fn default_stages(layers: usize) -> Vec<usize> {
    if layers < 2 {
        vec![0, layers]
    } else {
        vec![0, layers / 2, layers]
    }
}

/// `[model]` strictly: the same fields as [`ModelConfig`] but unknown keys are errors (HF
/// `config.json` files carry extra keys, so `ModelConfig` itself accepts them).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StrictModel {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    vocab_size: usize,
    #[serde(default = "eps_default")]
    rms_norm_eps: f64,
    #[serde(default = "theta_default")]
    rope_theta: f64,
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    subspace_rank: usize,
    /// 0 (or absent): the run's seed.
    #[serde(default)]
    subspace_seed: u64,
}

fn eps_default() -> f64 {
    1e-5
}

fn theta_default() -> f64 {
    10_000.0
}

fn strict_model<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<ModelConfig, D::Error> {
    let m = StrictModel::deserialize(d)?;
    Ok(ModelConfig {
        hidden_size: m.hidden_size,
        intermediate_size: m.intermediate_size,
        num_hidden_layers: m.num_hidden_layers,
        num_attention_heads: m.num_attention_heads,
        num_key_value_heads: m.num_key_value_heads,
        vocab_size: m.vocab_size,
        rms_norm_eps: m.rms_norm_eps,
        rope_theta: m.rope_theta,
        max_position_embeddings: m.max_position_embeddings,
        tie_word_embeddings: m.tie_word_embeddings,
        subspace_rank: m.subspace_rank,
        subspace_seed: m.subspace_seed,
    })
}

/// Largest run config file we parse.
pub const MAX_CONFIG_BYTES: usize = 1 << 20;

impl RunConfig {
    /// Parses and validates a TOML run config; absent `stages` get [`default_stages`].
    pub fn from_toml(text: &str) -> Result<Self> {
        if text.len() > MAX_CONFIG_BYTES {
            return Err(Error::Config(format!(
                "run config larger than {MAX_CONFIG_BYTES} bytes"
            )));
        }
        let mut cfg: RunConfig =
            toml::from_str(text).map_err(|e| Error::Config(format!("run config: {e}")))?;
        if cfg.stages.is_empty() {
            cfg.stages = default_stages(cfg.model.num_hidden_layers);
        }
        if cfg.model.subspace_rank > 0 && cfg.model.subspace_seed == 0 {
            // U and the fixed token table derive from the run seed unless given.
            cfg.model.subspace_seed = cfg.seed;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads [`RunConfig::from_toml`] from a file.
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text)
    }

    /// The config as TOML (round-trips through [`RunConfig::from_toml`]).
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| Error::Config(format!("run config: {e}")))
    }

    /// Checks the model, stage boundaries and sizes.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        self.model.validate()?;
        let layers = self.model.num_hidden_layers;
        let s = &self.stages;
        if s.len() < 2 || s[0] != 0 || s[s.len() - 1] != layers {
            return bad(format!(
                "stages {s:?} must start at 0 and end at {layers} (the layer count)"
            ));
        }
        if s.windows(2).any(|w| w[0] >= w[1]) {
            return bad(format!("stages {s:?} must increase strictly"));
        }
        let t = &self.train;
        if t.steps == 0 || t.micro_batches == 0 || t.micro_batch_size == 0 || t.seq_len == 0 {
            return bad(
                "train: steps, micro_batches, micro_batch_size, seq_len must be > 0".into(),
            );
        }
        if t.seq_len > self.model.max_position_embeddings {
            return bad(format!(
                "train.seq_len {} > model.max_position_embeddings {}",
                t.seq_len, self.model.max_position_embeddings
            ));
        }
        // Caps so that a config cannot ask for absurd allocations per micro-batch.
        if t.micro_batch_size.saturating_mul(t.seq_len) > 1 << 22 || t.micro_batches > 1 << 20 {
            return bad("train: micro-batch geometry too large".into());
        }
        let finite_pos = |x: f64| x.is_finite() && x > 0.0;
        if !(finite_pos(t.lr) && t.min_lr.is_finite() && t.min_lr >= 0.0 && t.min_lr <= t.lr) {
            return bad(format!(
                "train: need 0 <= min_lr <= lr, lr > 0 (lr {}, min_lr {})",
                t.lr, t.min_lr
            ));
        }
        if !t.betas.iter().all(|b| (0.0..1.0).contains(b)) || !finite_pos(t.eps) {
            return bad("train: betas must be in [0, 1) and eps > 0".into());
        }
        let non_neg = |x: f64| x.is_finite() && x >= 0.0;
        if !(non_neg(t.weight_decay) && non_neg(t.grad_clip)) {
            return bad("train: weight_decay and grad_clip must be >= 0".into());
        }
        if t.eval_batches == 0 {
            return bad("train: eval_batches must be > 0".into());
        }
        let v = self.data.val_fraction;
        if !(v > 0.0 && v < 1.0) {
            return bad(format!("data.val_fraction {v} must be in (0, 1)"));
        }
        self.validate_sync()
    }

    fn validate_sync(&self) -> Result<()> {
        let s = &self.sync;
        if !s.drifts() {
            return Ok(());
        }
        let bad = |m: String| Err(Error::Config(m));
        if s.every == 0 || s.chunk == 0 || s.chunk > 1 << 20 {
            return bad("sync: every and chunk must be > 0 (chunk <= 2^20)".into());
        }
        if !((0.0..=1.0).contains(&s.beta) && s.outer_lr.is_finite() && s.outer_lr > 0.0) {
            return bad("sync: beta must be in [0, 1] and outer_lr > 0".into());
        }
        // Checkpoints and evaluations fetch the stage's agreed state: only a sync boundary has
        // one (between boundaries every replica holds its own weights).
        let t = &self.train;
        for (name, n) in [
            ("checkpoint_every", t.checkpoint_every),
            ("eval_every", t.eval_every),
        ] {
            if n % s.every != 0 {
                return bad(format!(
                    "train.{name} {n} must be a multiple of sync.every {} (only sync boundaries \
                     have one agreed state)",
                    s.every
                ));
            }
        }
        Ok(())
    }

    /// Whether the state after `steps_done` steps is a sync boundary (always in mode `step`).
    pub fn is_sync_boundary(&self, steps_done: u64) -> bool {
        !self.sync.drifts()
            || steps_done.is_multiple_of(self.sync.every)
            || steps_done == self.train.steps
    }

    /// AdamW hyper-parameters of this run.
    pub fn adamw(&self) -> AdamW {
        let t = &self.train;
        AdamW {
            beta1: t.betas[0],
            beta2: t.betas[1],
            eps: t.eps,
            weight_decay: t.weight_decay,
        }
    }

    /// Learning-rate schedule of this run.
    pub fn schedule(&self) -> LrSchedule {
        let t = &self.train;
        LrSchedule {
            lr: t.lr,
            min_lr: t.min_lr,
            warmup_steps: t.warmup_steps,
            total_steps: t.steps,
        }
    }

    /// Tokens per optimizer step.
    pub fn tokens_per_step(&self) -> usize {
        self.train.micro_batches * self.train.micro_batch_size * self.train.seq_len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_file_is_the_default() {
        let text = include_str!("../../experiments/run.toml");
        assert_eq!(RunConfig::from_toml(text).unwrap(), RunConfig::default());
        RunConfig::default().validate().unwrap();
    }

    #[test]
    fn recorded_experiment_configs_parse() {
        let c = RunConfig::from_toml(include_str!("../../experiments/local_tinyshakespeare.toml"))
            .unwrap();
        assert_eq!(c.model, RunConfig::default().model);
        assert!(c.data.path.is_some());
    }

    #[test]
    fn sync_section_parses_validates_and_stays_out_of_default_toml() {
        let c = RunConfig::default();
        assert!(!c.to_toml().unwrap().contains("[sync]"));
        let text = "[train]\neval_every = 10\n[sync]\nmode = \"sparseloco\"\nevery = 5\n";
        let s = RunConfig::from_toml(text).unwrap();
        assert_eq!(s.sync.mode, SyncMode::Sparseloco);
        assert_eq!(s.sync.codec, "topk-row:0.02+q2");
        assert!(s.to_toml().unwrap().contains("[sync]"));
        assert_eq!(RunConfig::from_toml(&s.to_toml().unwrap()).unwrap(), s);
        assert!(s.is_sync_boundary(5) && !s.is_sync_boundary(6) && s.is_sync_boundary(1000));
        assert!(c.is_sync_boundary(7));
        // Boundaries within the warmup use the wider warmup codec.
        assert_eq!(s.sync.codec_at(5, 5), "topk-row:0.1+q2");
        assert_eq!(s.sync.codec_at(10, 5), "topk-row:0.02+q2");
        // eval_every 100 is fine with every 5, 7 is not; unknown modes and keys are refused.
        assert!(RunConfig::from_toml("[sync]\nmode = \"sparseloco\"\nevery = 7\n").is_err());
        assert!(RunConfig::from_toml("[sync]\nmode = \"sparseloco\"\nevery = 0\n").is_err());
        assert!(RunConfig::from_toml("[sync]\nmode = \"diloco\"\n").is_err());
        assert!(RunConfig::from_toml("[sync]\nevry = 5\n").is_err());
        assert!(RunConfig::from_toml("[sync]\nmode = \"sparseloco\"\nbeta = 1.5\n").is_err());
    }

    #[test]
    fn empty_file_gives_defaults_and_round_trips() {
        let c = RunConfig::from_toml("").unwrap();
        assert_eq!(c, RunConfig::default());
        assert_eq!(RunConfig::from_toml(&c.to_toml().unwrap()).unwrap(), c);
    }

    #[test]
    fn partial_sections_keep_other_defaults() {
        let c =
            RunConfig::from_toml("seed = 7\n[train]\nsteps = 5\n[codec]\nsync = \"topk:0.1\"\n")
                .unwrap();
        assert_eq!((c.seed, c.train.steps, c.train.seq_len), (7, 5, 128));
        assert_eq!(c.codec.sync, "topk:0.1");
        assert_eq!(c.codec.activations, CodecConfig::default().activations);
    }

    #[test]
    fn model_section_sets_default_stages() {
        let c = RunConfig::from_toml(
            "[model]\nhidden_size = 64\nintermediate_size = 128\nnum_hidden_layers = 5\n\
             num_attention_heads = 4\nvocab_size = 256\nmax_position_embeddings = 64\n\
             [train]\nseq_len = 64\n",
        )
        .unwrap();
        assert_eq!(c.stages, vec![0, 2, 5]);
    }

    #[test]
    fn rejects_typos_and_bad_values() {
        for bad in [
            "sed = 1",
            "[train]\nstep = 3",
            "[model]\nhidden_size = 64\nintermediate_size = 64\nnum_hidden_layers = 2\n\
             num_attention_heads = 4\nvocab_size = 256\nmax_position_embeddings = 256\nhiden = 3",
            "[data]\npth = \"x\"",
            "[codec]\nactivation = \"none\"",
            "stages = [0, 1]",
            "stages = [0, 2, 2]",
            "stages = [1, 2]",
            "stages = [0, 3]",
            "[train]\nseq_len = 257",
            "[train]\nmicro_batches = 0",
            "[train]\nlr = -1.0",
            "[train]\nmin_lr = 1.0",
            "[train]\nbetas = [0.9, 1.0]",
            "[data]\nval_fraction = 0.0",
            "seed = -1",
        ] {
            assert!(RunConfig::from_toml(bad).is_err(), "accepted: {bad}");
        }
    }
}
