//! Model shape, mirroring Hugging Face `config.json` for Llama so that checkpoints load in other
//! programs unchanged.

use serde::{Deserialize, Serialize};

use crate::Error;

/// A Llama-style decoder's shape. Field names are those of HF `config.json` (`LlamaConfig`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads per layer.
    pub num_attention_heads: usize,
    /// Grouped-query attention when smaller than `num_attention_heads`.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Tokens the embedding and head know.
    pub vocab_size: usize,
    /// Epsilon of every RMSNorm.
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// Base of the rotary position embedding.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// Longest sequence the model takes.
    pub max_position_embeddings: usize,
    /// The head reuses the embedding table.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Subspace network rank k (issue #13, [`crate::subspace`]): every residual write goes
    /// through a seed-derived `U` (hidden x k), so stage boundaries carry k values per token.
    /// 0 = off. Not an HF field: left out of `config.json` when 0, and checkpoints are
    /// materialized to a plain model (rank 0).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub subspace_rank: usize,
    /// Seed of `U` and the fixed token table (a run config fills in its run seed).
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub subspace_seed: u64,
}

fn is_zero(x: &usize) -> bool {
    *x == 0
}

fn is_zero_u64(x: &u64) -> bool {
    *x == 0
}

fn default_rms_norm_eps() -> f64 {
    1e-5
}

fn default_rope_theta() -> f64 {
    10_000.0
}

/// Hard caps on untrusted configs, so that a hostile `config.json` cannot make us allocate
/// terabytes before any tensor is read.
pub const MAX_HIDDEN: usize = 1 << 16;
/// Most layers a config may ask for (bounds what an untrusted config allocates).
pub const MAX_LAYERS: usize = 1 << 10;
/// Largest vocabulary a config may ask for.
pub const MAX_VOCAB: usize = 1 << 21;
/// Longest sequence a config may ask for.
pub const MAX_POSITIONS: usize = 1 << 20;

impl ModelConfig {
    /// Key/value heads (the query heads unless grouped-query attention).
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Checks the shape is consistent and within the caps; call on every config read from outside.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |msg: String| Err(Error::Config(msg));
        if self.hidden_size == 0 || self.hidden_size > MAX_HIDDEN {
            return bad(format!(
                "hidden_size {} not in 1..={MAX_HIDDEN}",
                self.hidden_size
            ));
        }
        if self.intermediate_size == 0 || self.intermediate_size > 4 * MAX_HIDDEN {
            return bad(format!(
                "intermediate_size {} out of range",
                self.intermediate_size
            ));
        }
        if self.num_hidden_layers == 0 || self.num_hidden_layers > MAX_LAYERS {
            return bad(format!(
                "num_hidden_layers {} not in 1..={MAX_LAYERS}",
                self.num_hidden_layers
            ));
        }
        if self.vocab_size == 0 || self.vocab_size > MAX_VOCAB {
            return bad(format!(
                "vocab_size {} not in 1..={MAX_VOCAB}",
                self.vocab_size
            ));
        }
        if self.max_position_embeddings == 0 || self.max_position_embeddings > MAX_POSITIONS {
            return bad(format!(
                "max_position_embeddings {} not in 1..={MAX_POSITIONS}",
                self.max_position_embeddings
            ));
        }
        let heads = self.num_attention_heads;
        if heads == 0 || !self.hidden_size.is_multiple_of(heads) {
            return bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {heads}",
                self.hidden_size
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "head dim {} must be even for RoPE",
                self.head_dim()
            ));
        }
        let kv = self.num_kv_heads();
        if kv == 0 || !heads.is_multiple_of(kv) {
            return bad(format!(
                "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}"
            ));
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps.is_finite()) {
            return bad(format!(
                "rms_norm_eps {} must be positive",
                self.rms_norm_eps
            ));
        }
        if !(self.rope_theta > 0.0 && self.rope_theta.is_finite()) {
            return bad(format!("rope_theta {} must be positive", self.rope_theta));
        }
        if self.subspace_rank >= self.hidden_size {
            return bad(format!(
                "subspace_rank {} must be below hidden_size {} (0 = off)",
                self.subspace_rank, self.hidden_size
            ));
        }
        if self.subspace_rank > 0 && self.tie_word_embeddings {
            return bad(
                "subspace_rank needs untied embeddings (tie_word_embeddings = false)".into(),
            );
        }
        Ok(())
    }

    /// Parameter count of the whole model (embedding, layers, final norm, and the head if untied).
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let kv = self.num_kv_heads() * self.head_dim();
        let attn = h * h * 2 + h * kv * 2;
        let mlp = 3 * h * self.intermediate_size;
        let layer = attn + mlp + 2 * h;
        let embed = self.vocab_size * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed + self.num_hidden_layers * layer + h + head
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelConfig {
        ModelConfig {
            hidden_size: 64,
            intermediate_size: 172,
            num_hidden_layers: 5,
            num_attention_heads: 8,
            num_key_value_heads: Some(4),
            vocab_size: 512,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            max_position_embeddings: 512,
            tie_word_embeddings: true,
            subspace_rank: 0,
            subspace_seed: 0,
        }
    }

    #[test]
    fn parses_hf_config_json() {
        let json = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":172,
            "num_hidden_layers":5,"num_attention_heads":8,"num_key_value_heads":4,"vocab_size":512,
            "rms_norm_eps":1e-5,"rope_theta":10000.0,"max_position_embeddings":512,
            "tie_word_embeddings":true,"torch_dtype":"float32"}"#;
        let cfg: ModelConfig = serde_json::from_str(json).unwrap();
        assert_eq!(cfg, tiny());
        cfg.validate().unwrap();
    }

    #[test]
    fn parameter_count_of_stories260k() {
        // stories260K: 260K parameters as its name says (tied classifier).
        let n = tiny().num_parameters();
        assert!((250_000..270_000).contains(&n), "{n}");
    }

    #[test]
    fn rejects_inconsistent_shapes() {
        let mut c = tiny();
        c.num_key_value_heads = Some(3);
        assert!(c.validate().is_err());
        let mut c = tiny();
        c.hidden_size = 60;
        assert!(c.validate().is_err());
        let mut c = tiny();
        c.vocab_size = usize::MAX;
        assert!(c.validate().is_err());
    }
}
