//! The checkpoint loader on hostile bytes: `config.json`, safetensors weights and a subspace
//! model's `subspace.safetensors` must give typed errors, never panic or allocate from unchecked
//! lengths.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use swarm_model::ModelConfig;
use swarm_model::checkpoint::{parse_config, read_safetensors, read_subspace};

fuzz_target!(|data: &[u8]| {
    // First byte picks the decoder; the rest is its input.
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    if which % 3 == 0 {
        let _ = parse_config(rest);
        return;
    }
    // A small fixed config with grouped-query attention and an untied head, so valid-looking
    // tensors exist in the search space.
    let cfg = ModelConfig {
        hidden_size: 8,
        intermediate_size: 12,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        num_key_value_heads: Some(1),
        vocab_size: 16,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        max_position_embeddings: 16,
        tie_word_embeddings: false,
        subspace_rank: 0,
        subspace_seed: 0,
    };
    let mut out = HashMap::new();
    if which % 3 == 1 {
        let _ = read_safetensors(rest, &cfg, &mut out);
    } else {
        // The rank and seed come from the file's own metadata.
        let _ = read_subspace(rest, &cfg, &out);
    }
});
