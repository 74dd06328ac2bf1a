//! The whole model in one process, for inference and evaluation (`swarm eval`, `swarm generate`,
//! the candle-transformers comparison tests). Training uses [`crate::train::LocalTrainer`], which
//! splits the same weights into pieces the way a swarm run does.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use crate::shard::{Piece, Shard};
use crate::{ModelConfig, Result};

/// A Llama-style decoder with all its pieces (one shard: embedding, one stage of every layer,
/// head), f32 on the CPU.
#[derive(Debug)]
pub struct Model {
    shard: Shard,
}

impl Model {
    /// Fresh weights from `seed` (the same weights a run with this seed starts from).
    pub fn new(cfg: &ModelConfig, seed: u64) -> Result<Self> {
        let pieces = Piece::all(&[0, cfg.num_hidden_layers]);
        Ok(Self {
            shard: Shard::new(cfg, &pieces, seed, DType::F32, &Device::Cpu)?,
        })
    }

    /// From named tensors with HF names (e.g. `checkpoint::load(dir)?.tensors`). Every weight
    /// the config implies must be present with its shape; extra names are ignored.
    pub fn from_tensors(cfg: &ModelConfig, tensors: &HashMap<String, Tensor>) -> Result<Self> {
        let pieces = Piece::all(&[0, cfg.num_hidden_layers]);
        Ok(Self {
            shard: Shard::from_tensors(cfg, &pieces, tensors, DType::F32, &Device::Cpu)?,
        })
    }

    /// The model's shape.
    pub fn config(&self) -> &ModelConfig {
        self.shard.config()
    }

    /// Next-token logits `(batch, seq, vocab)`, f32, for `tokens` (row-major `batch x seq`,
    /// each `< vocab_size`, `seq <= max_position_embeddings`). Causal: position `i` sees
    /// tokens `0..=i` of its row.
    pub fn logits(&self, tokens: &[u32], batch: usize, seq: usize) -> Result<Tensor> {
        let (x, _) = self.shard.embed_forward(tokens, batch, seq)?;
        let (x, _) = self.shard.stage_forward(0, &x)?;
        self.shard.head_logits_only(&x)
    }

    /// Mean next-token cross-entropy (nats per token) of `targets` given `inputs`, both
    /// row-major `batch x seq`.
    pub fn loss(&self, inputs: &[u32], targets: &[u32], batch: usize, seq: usize) -> Result<f64> {
        let (x, _) = self.shard.embed_forward(inputs, batch, seq)?;
        let (x, _) = self.shard.stage_forward(0, &x)?;
        Ok(self.shard.head_forward(&x, targets)?.0)
    }

    /// The weights by HF name.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.shard.tensors()
    }
}
