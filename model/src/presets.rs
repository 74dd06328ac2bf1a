//! Model presets (`swarm train --model PRESET`) and the memory a pipeline stage needs.
//!
//! Each preset is a Llama shape with a stage split and a micro-batch geometry sized for it. The
//! vocabulary comes from the run's data (its tokenizer), so one preset serves any tokenizer.
//!
//! [`stage_memory`] predicts the peak resident bytes of a peer serving one stage, term by term,
//! from what the code holds at the peak (the first backward of a step, with every micro-batch in
//! flight still holding its forward context): fp32 weights, the flat copy of them the
//! hand-written layers run on, AdamW's two moments, what each micro-batch's forward keeps for
//! its backward (`layer::LayerActs`), and the backward's own buffers (the micro-batch's parameter
//! gradients, one layer's largest transient). `swarm join` compares it with the memory
//! available; `swarm bench memory` measures the peak (VmHWM) of a real stage and records both;
//! `model/tests/stage_memory.rs` checks it against the heap's peak.

use serde::{Deserialize, Serialize};

use crate::{Error, ModelConfig, RunConfig};

/// A named model shape with its stage split and micro-batch geometry.
#[derive(Debug, Clone, PartialEq)]
pub struct Preset {
    /// The name `--preset` takes.
    pub name: &'static str,
    /// One line on what it is for.
    pub about: &'static str,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Query heads per layer.
    pub heads: usize,
    /// Key/value heads per layer.
    pub kv_heads: usize,
    /// Longest sequence.
    pub max_positions: usize,
    /// Stage boundaries in layers.
    pub stages: &'static [usize],
    /// Micro-batches per step.
    pub micro_batches: usize,
    /// Sequences per micro-batch.
    pub micro_batch_size: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate.
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
            subspace_rank: 0,
            subspace_seed: 0,
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageMemory {
    /// Parameters of the stage.
    pub parameters: u64,
    /// fp32 weights.
    pub weights: u64,
    /// Gradient accumulators (the sum over the micro-batches of a step).
    pub grads: u64,
    /// AdamW's first and second moments.
    pub optimizer: u64,
    /// The flat copy of the weights the hand-written layers run on (`Shard::stage_forward`
    /// makes it once per optimizer step; every pass in flight shares it).
    pub weights_copy: u64,
    /// What one micro-batch's forward keeps until its backward (`Shard::stage_forward`'s
    /// context): each layer's saved activations ([`layer_activation_bytes_per_token`]).
    pub activations_per_micro_batch: u64,
    /// Micro-batches whose forward context the stage holds at once.
    pub micro_batches_in_flight: u64,
    /// A backward pass on top of the contexts: the micro-batch's own parameter gradients (held
    /// until added into the accumulators), the output-gradient frame, and the largest transient
    /// of one layer's backward ([`layer_backward_transient`]).
    pub workspace: u64,
    /// Threads the attention backward's per-block scratch was counted for.
    pub threads: u64,
    /// The peak: weights, their flat copy and the moments, plus the larger of the step's first
    /// backward (every context alive, no accumulated gradients yet) and its second (one context
    /// fewer, the accumulators, and the sum of the largest parameter being formed).
    pub total: u64,
}

/// Micro-batches a stage holds forward contexts for at once: the trainer keeps at most
/// `2 x stages` micro-batches in flight, and never more than a step has.
pub fn in_flight(cfg: &RunConfig) -> usize {
    let stages = cfg.stages.len().saturating_sub(1).max(1);
    cfg.train.micro_batches.min(2 * stages)
}

/// Widths of one decoder layer (elements).
struct Dims {
    d: u64,
    kv: u64,
    i: u64,
    heads: u64,
    rep: u64,
}

fn dims(m: &ModelConfig) -> Dims {
    let kv_heads = m.num_kv_heads().max(1);
    Dims {
        d: m.hidden_size as u64,
        kv: (kv_heads * m.head_dim()) as u64,
        i: m.intermediate_size as u64,
        heads: m.num_attention_heads as u64,
        rep: (m.num_attention_heads / kv_heads) as u64,
    }
}

/// Bytes of fp32 activations one decoder layer keeps per token for its backward pass, the
/// fields of `layer::LayerActs`: the input, normalized input, queries, attention output,
/// mid-layer residual and its normalized copy (d each), rotated keys and values (kv each), the
/// attention probabilities (heads x seq_len, stored full including the masked upper triangle),
/// `gate | up` and SwiGLU (3 intermediate) and the two inverse RMS values.
pub fn layer_activation_bytes_per_token(m: &ModelConfig, seq_len: usize) -> u64 {
    let Dims {
        d, kv, i, heads, ..
    } = dims(m);
    4 * (6 * d + 2 * kv + 3 * i + heads * seq_len as u64 + 2)
}

/// The largest set of buffers one layer's backward (`layer::backward`) holds at once besides
/// the saved activations and its parameter gradients, for `tokens` rows of `seq_len`: the
/// maximum over its phases (MLP, attention, input projections, splitting the stacked gradients).
/// The attention phase allocates one score-gradient block per (sequence, KV head) a thread
/// works on, so it depends on the `threads` running it.
pub fn layer_backward_transient(m: &ModelConfig, tokens: u64, seq_len: u64, threads: u64) -> u64 {
    let Dims { d, kv, i, rep, .. } = dims(m);
    let r = tokens;
    let blocks = (tokens / seq_len.max(1)) * (m.num_kv_heads() as u64);
    let ds = blocks.min(threads.max(1)) * rep * seq_len * seq_len;
    let phases = [
        // dxm, dact, dgu
        r * d + r * i + 2 * r * i,
        // dxm, dgu, dxn2 (the stacked gate|up gradient is a parameter gradient here)
        2 * r * d + 2 * r * i,
        // dxm, dy and dyh, then dq, dk, dv and the score gradients
        3 * r * d,
        r * d + r * d + r * d + 2 * r * kv + ds,
        // dxm, dq, dk, dv, the merged dqkv
        r * d + (r * d + 2 * r * kv) + r * (d + 2 * kv),
        // dx, dqkv, dxn1
        r * d + r * (d + 2 * kv) + r * d,
        // dx, dxn1, and the stacked qkv and gate|up gradients while they are split in copies
        2 * r * d + (d + 2 * kv) * d + 2 * i * d,
    ];
    4 * phases.into_iter().max().unwrap_or(0)
}

/// Parameters of one decoder layer.
fn layer_parameters(m: &ModelConfig) -> u64 {
    let Dims { d, kv, i, .. } = dims(m);
    2 * d * d + 2 * d * kv + 3 * d * i + 2 * d
}

/// The memory stage `stage` of `cfg` needs (beyond the process's own baseline), with the
/// attention backward on this process's rayon threads.
pub fn stage_memory(cfg: &RunConfig, stage: usize) -> Result<StageMemory, Error> {
    stage_memory_on(cfg, stage, rayon::current_num_threads())
}

/// [`stage_memory`] for a backward on `threads` threads.
pub fn stage_memory_on(
    cfg: &RunConfig,
    stage: usize,
    threads: usize,
) -> Result<StageMemory, Error> {
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
    let weights = 4 * parameters;
    let activations_per_micro_batch =
        layers * tokens * layer_activation_bytes_per_token(m, t.seq_len);
    let micro_batches_in_flight = in_flight(cfg) as u64;
    let frame = 4 * tokens * m.hidden_size as u64;
    let workspace =
        weights + frame + layer_backward_transient(m, tokens, t.seq_len as u64, threads as u64);
    let Dims { d, i, .. } = dims(m);
    let largest = 4 * (d * i).max(d * d);
    let k = micro_batches_in_flight;
    let first = k * activations_per_micro_batch + workspace;
    let second = k.saturating_sub(1) * activations_per_micro_batch + weights + workspace + largest;
    Ok(StageMemory {
        parameters,
        weights,
        grads: weights,
        optimizer: 2 * weights,
        weights_copy: weights,
        activations_per_micro_batch,
        micro_batches_in_flight,
        workspace,
        threads: threads as u64,
        total: 4 * weights + first.max(second),
    })
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

    /// A run with `layers` layers split in two stages, `heads` / `kv_heads`, micro-batches of
    /// `batch x seq`.
    fn small_run(
        layers: usize,
        heads: usize,
        kv_heads: usize,
        batch: usize,
        seq: usize,
    ) -> RunConfig {
        let mut cfg = RunConfig::default();
        cfg.model.hidden_size = 64;
        cfg.model.intermediate_size = 160;
        cfg.model.num_hidden_layers = layers;
        cfg.model.num_attention_heads = heads;
        cfg.model.num_key_value_heads = Some(kv_heads);
        cfg.model.max_position_embeddings = seq;
        cfg.stages = vec![0, layers / 2, layers];
        cfg.train.micro_batch_size = batch;
        cfg.train.seq_len = seq;
        cfg.validate().unwrap();
        cfg
    }

    #[test]
    fn activation_term_is_what_a_stage_forward_keeps() {
        use candle_core::{DType, Device, Tensor};
        let dev = Device::Cpu;
        // Multi-head and grouped-query attention, one and several layers per stage.
        for cfg in [small_run(2, 4, 4, 3, 16), small_run(6, 8, 2, 2, 32)] {
            for stage in 0..2 {
                let pieces = crate::Piece::stages(&cfg.stages);
                let shard =
                    crate::Shard::new(&cfg.model, &pieces[stage..stage + 1], 1, DType::F32, &dev)
                        .unwrap();
                let t = &cfg.train;
                let x =
                    Tensor::randn(0f32, 1f32, (t.micro_batch_size, t.seq_len, 64), &dev).unwrap();
                let (_, ctx) = shard.stage_forward(stage, &x).unwrap();
                let need = stage_memory(&cfg, stage).unwrap();
                assert_eq!(
                    ctx.saved_bytes(),
                    Some(need.activations_per_micro_batch),
                    "stage {stage} of {:?}",
                    cfg.model
                );
                assert_eq!(need.weights, 4 * shard.num_parameters() as u64);
            }
        }
    }

    #[test]
    fn peak_is_the_first_backward_with_every_context_alive() {
        // Long sequences: the attention phase is the backward's largest.
        let cfg = small_run(2, 8, 2, 2, 128);
        let s = stage_memory_on(&cfg, 0, 2).unwrap();
        let k = s.micro_batches_in_flight;
        assert_eq!(k, 2);
        assert_eq!(
            s.total,
            s.weights
                + s.weights_copy
                + s.optimizer
                + k * s.activations_per_micro_batch
                + s.workspace
        );
        // More threads hold more attention scratch, up to one block per (sequence, KV head):
        // 2 sequences x 2 KV heads here.
        let wide = stage_memory_on(&cfg, 0, 64).unwrap();
        assert!(wide.total > s.total);
        assert_eq!(wide.total, stage_memory_on(&cfg, 0, 4).unwrap().total);
    }

    #[test]
    fn meminfo_is_parsed_in_bytes() {
        let text = "MemTotal:       24000000 kB\nMemAvailable:   1000 kB\n";
        assert_eq!(meminfo_field(text, "MemAvailable:"), Some(1_024_000));
        assert_eq!(meminfo_field(text, "Nope:"), None);
    }
}
