//! Model presets (`swarm train --model PRESET`) and the memory a pipeline stage needs.
//!
//! Each preset is a Llama shape with a stage split and a micro-batch geometry sized for it. The
//! vocabulary comes from the run's data (its tokenizer), so one preset serves any tokenizer.
//!
//! [`stage_memory`] predicts the peak resident bytes of a peer serving one stage, term by term:
//! fp32 weights, their gradient accumulators and AdamW's two moments (16 bytes per parameter),
//! plus what the forward pass of each micro-batch in flight keeps for its backward pass (the
//! tensors of the autograd graph, counted from `Shard::layer`), plus the transient workspace of
//! one layer's backward. `swarm join` compares it with the memory available; `swarm bench memory`
//! measures the peak (VmHWM) of a real stage and records both.

use serde::Serialize;

use crate::{Error, ModelConfig, RunConfig};

/// A named model shape with its stage split and micro-batch geometry.
#[derive(Debug, Clone, PartialEq)]
pub struct Preset {
    pub name: &'static str,
    pub about: &'static str,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub max_positions: usize,
    /// Stage boundaries in layers.
    pub stages: &'static [usize],
    pub micro_batches: usize,
    pub micro_batch_size: usize,
    pub seq_len: usize,
    pub lr: f64,
    pub min_lr: f64,
}

/// The presets, smallest first.
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "2m",
        about: "the default: width 256, 2 layers (1.7M parameters with the byte vocabulary)",
        hidden_size: 256,
        intermediate_size: 768,
        layers: 2,
        heads: 8,
        kv_heads: 4,
        max_positions: 256,
        stages: &[0, 1, 2],
        micro_batches: 2,
        micro_batch_size: 16,
        seq_len: 128,
        lr: 3e-3,
        min_lr: 3e-4,
    },
    Preset {
        name: "20m",
        about: "width 384, 8 layers, 6 heads (14M without embeddings; ~20M with an 8k vocabulary)",
        hidden_size: 384,
        intermediate_size: 1024,
        layers: 8,
        heads: 6,
        kv_heads: 6,
        max_positions: 512,
        stages: &[0, 4, 8],
        micro_batches: 4,
        micro_batch_size: 8,
        seq_len: 256,
        lr: 1e-3,
        min_lr: 1e-4,
    },
    Preset {
        name: "100m",
        about: "width 768, 12 layers, 12 heads / 4 KV heads (75M without embeddings; ~100M with a 16k vocabulary)",
        hidden_size: 768,
        intermediate_size: 2048,
        layers: 12,
        heads: 12,
        kv_heads: 4,
        max_positions: 1024,
        stages: &[0, 3, 6, 9, 12],
        micro_batches: 8,
        micro_batch_size: 4,
        seq_len: 512,
        lr: 6e-4,
        min_lr: 6e-5,
    },
    Preset {
        name: "1b",
        about: "TinyLlama's shape: width 2048, 22 layers, 32 heads / 4 KV heads (1.1B with a 32k vocabulary)",
        hidden_size: 2048,
        intermediate_size: 5632,
        layers: 22,
        heads: 32,
        kv_heads: 4,
        max_positions: 2048,
        stages: &[0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22],
        micro_batches: 4,
        micro_batch_size: 1,
        seq_len: 1024,
        lr: 3e-4,
        min_lr: 3e-5,
    },
];

/// The preset called `name`.
pub fn preset(name: &str) -> Result<&'static Preset, Error> {
    PRESETS
        .iter()
        .find(|p| p.name.eq_ignore_ascii_case(name))
        .ok_or_else(|| {
            let names: Vec<&str> = PRESETS.iter().map(|p| p.name).collect();
            Error::Config(format!(
                "unknown model preset {name:?} (one of {})",
                names.join(", ")
            ))
        })
}

impl Preset {
    /// The model config with `vocab_size` ids.
    pub fn model(&self, vocab_size: usize) -> ModelConfig {
        ModelConfig {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.layers,
            num_attention_heads: self.heads,
            num_key_value_heads: Some(self.kv_heads),
            vocab_size,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            max_position_embeddings: self.max_positions,
            tie_word_embeddings: false,
        }
    }

    /// Sets `cfg`'s model, stages and micro-batch geometry to this preset's (the learning-rate
    /// schedule's peak and floor too); the rest of the run config is kept.
    pub fn apply(&self, cfg: &mut RunConfig, vocab_size: usize) -> Result<(), Error> {
        cfg.model = self.model(vocab_size);
        cfg.stages = self.stages.to_vec();
        cfg.train.micro_batches = self.micro_batches;
        cfg.train.micro_batch_size = self.micro_batch_size;
        cfg.train.seq_len = self.seq_len;
        cfg.train.lr = self.lr;
        cfg.train.min_lr = self.min_lr;
        cfg.validate()
    }
}

/// What one stage of a run needs in memory, by term (bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct StageMemory {
    pub parameters: u64,
    /// fp32 weights.
    pub weights: u64,
    /// Gradient accumulators.
    pub grads: u64,
    /// AdamW's first and second moments.
    pub optimizer: u64,
    /// Forward tensors kept for backward, per micro-batch in flight.
    pub activations_per_micro_batch: u64,
    pub micro_batches_in_flight: u64,
    /// One layer's backward workspace and the frames a micro-batch arrives and leaves in.
    pub workspace: u64,
    pub total: u64,
}

/// Micro-batches a stage holds forward contexts for at once: the trainer keeps at most
/// `2 x stages` micro-batches in flight, and never more than a step has.
pub fn in_flight(cfg: &RunConfig) -> usize {
    let stages = cfg.stages.len().saturating_sub(1).max(1);
    cfg.train.micro_batches.min(2 * stages)
}

/// Bytes of fp32 activations one decoder layer keeps per token for its backward pass, counted
/// from the graph `Shard::layer` builds: two RMS norms (normalized and scaled, 2d each), q, k, v
/// projections and their RoPE'd copies (2d + 4 kv, v made contiguous), the attention
/// probabilities (heads x seq_len), the attention output and its re-laid-out copy (2d), the
/// output projection and residual (2d), gate, up and SwiGLU (3 intermediate), down projection and
/// residual (2d).
pub fn layer_activation_bytes_per_token(m: &ModelConfig, seq_len: usize) -> u64 {
    let d = m.hidden_size as u64;
    let kv = (m.num_kv_heads() * m.head_dim()) as u64;
    let i = m.intermediate_size as u64;
    let probs = (m.num_attention_heads * seq_len) as u64;
    4 * (12 * d + 4 * kv + 3 * i + probs)
}

/// Parameters of decoder layers `layers`.
fn layer_parameters(m: &ModelConfig) -> u64 {
    let d = m.hidden_size as u64;
    let kv = (m.num_kv_heads() * m.head_dim()) as u64;
    let i = m.intermediate_size as u64;
    2 * d * d + 2 * d * kv + 3 * d * i + 2 * d
}

/// The memory stage `stage` of `cfg` needs (beyond the process's own baseline).
pub fn stage_memory(cfg: &RunConfig, stage: usize) -> Result<StageMemory, Error> {
    let Some(w) = cfg.stages.get(stage..stage + 2) else {
        return Err(Error::Config(format!(
            "stage {stage} of a run with {} stages",
            cfg.stages.len().saturating_sub(1)
        )));
    };
    let layers = (w[1] - w[0]) as u64;
    let m = &cfg.model;
    let t = &cfg.train;
    let tokens = (t.micro_batch_size * t.seq_len) as u64;
    let parameters = layers * layer_parameters(m);
    let per_layer = tokens * layer_activation_bytes_per_token(m, t.seq_len);
    // The stage's input copy (a Var) on top of its layers.
    let activations_per_micro_batch = layers * per_layer + 4 * tokens * m.hidden_size as u64;
    let micro_batches_in_flight = in_flight(cfg) as u64;
    // Backward of one layer at a time: its gradients are about one layer's activations; plus the
    // received activation and gradient frames (fp32, d per token each).
    let workspace = per_layer + 8 * tokens * m.hidden_size as u64;
    let weights = 4 * parameters;
    let mut s = StageMemory {
        parameters,
        weights,
        grads: weights,
        optimizer: 2 * weights,
        activations_per_micro_batch,
        micro_batches_in_flight,
        workspace,
        total: 0,
    };
    s.total = s.weights
        + s.grads
        + s.optimizer
        + s.activations_per_micro_batch * s.micro_batches_in_flight
        + s.workspace;
    Ok(s)
}

/// Memory available to a new process: `MemAvailable` of `/proc/meminfo` (Linux), in bytes.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    meminfo_field(&text, "MemAvailable:")
}

/// A `/proc` "Key: N kB" field in bytes.
pub fn meminfo_field(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    kb.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid_runs_and_2m_is_the_default() {
        for p in PRESETS {
            let mut cfg = RunConfig::default();
            p.apply(&mut cfg, 32_000).unwrap();
            assert_eq!(cfg.model.num_hidden_layers, p.layers);
        }
        let mut cfg = RunConfig::default();
        preset("2M").unwrap().apply(&mut cfg, 256).unwrap();
        assert_eq!(cfg, RunConfig::default());
        assert!(preset("3m").unwrap_err().to_string().contains("2m, 20m"));
    }

    #[test]
    fn preset_sizes_match_their_names() {
        let total =
            |name: &str, vocab: usize| preset(name).unwrap().model(vocab).num_parameters() as f64;
        assert!(
            (15e6..25e6).contains(&total("20m", 8192)),
            "{}",
            total("20m", 8192)
        );
        assert!(
            (85e6..120e6).contains(&total("100m", 16384)),
            "{}",
            total("100m", 16384)
        );
        assert!(
            (1.0e9..1.2e9).contains(&total("1b", 32000)),
            "{}",
            total("1b", 32000)
        );
    }

    #[test]
    fn stage_memory_counts_every_parameter_once() {
        let mut cfg = RunConfig::default();
        preset("100m").unwrap().apply(&mut cfg, 16384).unwrap();
        let m = &cfg.model;
        let emb_head = 2 * m.vocab_size * m.hidden_size + m.hidden_size;
        let stages: u64 = (0..4)
            .map(|s| stage_memory(&cfg, s).unwrap().parameters)
            .sum();
        assert_eq!(stages as usize + emb_head, m.num_parameters());
        let s = stage_memory(&cfg, 0).unwrap();
        assert_eq!(s.weights, 4 * s.parameters);
        assert_eq!(s.micro_batches_in_flight, 8);
        assert!(stage_memory(&cfg, 4).is_err());
    }

    #[test]
    fn meminfo_is_parsed_in_bytes() {
        let text = "MemTotal:       24000000 kB\nMemAvailable:   1000 kB\n";
        assert_eq!(meminfo_field(text, "MemAvailable:"), Some(1_024_000));
        assert_eq!(meminfo_field(text, "Nope:"), None);
    }
}
