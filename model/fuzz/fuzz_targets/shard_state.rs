//! `Shard::import_state` on arbitrary bytes: a joining peer receives these from a replica, so they
//! are untrusted. Must return an error or import consistently, never panic or over-allocate.
#![no_main]

use std::sync::OnceLock;

use candle_core::{DType, Device};
use libfuzzer_sys::fuzz_target;
use swarm_model::{ModelConfig, Piece, Shard};

fn cfg() -> ModelConfig {
    ModelConfig {
        hidden_size: 8,
        intermediate_size: 12,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        num_key_value_heads: Some(1),
        vocab_size: 16,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        max_position_embeddings: 16,
        tie_word_embeddings: true,
        subspace_rank: 0,
        subspace_seed: 0,
    }
}

static SEED_STATE: OnceLock<Vec<u8>> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let pieces = [Piece::Embedding, Piece::Stage { index: 0, layers: 0..2 }, Piece::Head];
    let dev = Device::Cpu;
    let mut shard = Shard::new(&cfg(), &pieces, 1, DType::F32, &dev).unwrap();
    // Half the inputs are mutations of a valid state so the fuzzer gets past the header.
    let valid = SEED_STATE.get_or_init(|| shard.export_state().unwrap());
    let bytes: Vec<u8> = if data.first().is_some_and(|b| b % 2 == 0) {
        let mut v = valid.clone();
        for (i, &b) in data.iter().enumerate().skip(1) {
            let at = (i * 131 + b as usize) % v.len();
            v[at] ^= b;
        }
        v
    } else {
        data.to_vec()
    };
    if shard.import_state(&bytes).is_ok() {
        // An accepted state must round-trip.
        let again = shard.export_state().unwrap();
        let mut other = Shard::new(&cfg(), &pieces, 2, DType::F32, &dev).unwrap();
        other.import_state(&again).unwrap();
        assert_eq!(other.weights_digest().unwrap(), shard.weights_digest().unwrap());
    }
    // The weights-only reader (audits) on the same bytes: an error or a shard that round-trips.
    if shard.import_weights(&bytes).is_ok() {
        let again = shard.export_weights().unwrap();
        let mut other = Shard::new(&cfg(), &pieces, 2, DType::F32, &dev).unwrap();
        other.import_weights(&again).unwrap();
        assert_eq!(other.weights_digest().unwrap(), shard.weights_digest().unwrap());
    }
});
