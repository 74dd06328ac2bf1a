//! Our checkpoints load in candle-transformers' `llama::Llama` with the same logits as our model,
//! training resumes exactly from them, and HF checkpoints written by another program (bf16,
//! different tensor order, extra config fields) load in our model with candle's logits.

#[path = "reference_common/mod.rs"]
mod common;

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor};
use swarm_model::checkpoint::{self, TrainState};
use swarm_model::{AdamW, Corpus, ModelConfig, Piece, Shard, Tokenizer};

fn cfg(heads: usize, kv: usize, tied: bool) -> ModelConfig {
    ModelConfig {
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: 2,
        num_attention_heads: heads,
        num_key_value_heads: Some(kv),
        vocab_size: 256,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        max_position_embeddings: 64,
        tie_word_embeddings: tied,
        subspace_rank: 0,
        subspace_seed: 0,
    }
}

/// `steps` AdamW steps on the built-in corpus through the shard API (what the trainer does).
fn train(shard: &mut Shard, corpus: &Corpus, from: u64, steps: u64) {
    for step in from..from + steps {
        let b = corpus.train_batch(7, step, 0, 4, 32).unwrap();
        let (x0, c0) = shard
            .embed_forward(&b.inputs, b.batch_size, b.seq_len)
            .unwrap();
        let (x1, c1) = shard.stage_forward(0, &x0).unwrap();
        let (_loss, c2) = shard.head_forward(&x1, &b.targets).unwrap();
        let g = shard.head_backward(c2, 1.0).unwrap();
        let g = shard.backward(c1, &g).unwrap().unwrap();
        shard.backward(c0, &g).unwrap();
        shard.optimizer_step(&AdamW::default(), 3e-3, 1.0).unwrap();
        shard.zero_grads();
    }
}

fn prompt() -> Vec<u32> {
    swarm_model::ByteTokenizer.encode("Once upon a time, there was a little cat named")
}

#[test]
fn trained_checkpoints_load_in_candle_llama_with_our_logits_and_resume_exactly() {
    let corpus = Corpus::builtin();
    // Grouped-query attention with an untied head, and tied embeddings.
    for c in [cfg(4, 2, false), cfg(4, 4, true)] {
        let pieces = Piece::all(&[0, c.num_hidden_layers]);
        let mut shard = Shard::new(&c, &pieces, 11, DType::F32, &Device::Cpu).unwrap();
        train(&mut shard, &corpus, 0, 3);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ckpt");
        let state = TrainState {
            step: shard.step(),
            optimizer: shard.optimizer_tensors().unwrap(),
            metadata: BTreeMap::new(),
        };
        checkpoint::save(&path, &c, &shard.tensors(), Some(&state)).unwrap();

        let tokens = prompt();
        let candle = common::candle_llama_last_logits(&path, &tokens);
        let loaded = checkpoint::load(&path).unwrap();
        let ours = common::our_last_logits(&loaded.config, &loaded.tensors, &tokens);
        let d = common::rel_diff(&ours, &candle);
        assert!(
            d < 1e-4,
            "tied={}: ours vs candle llama {d}",
            c.tie_word_embeddings
        );
        // The logits are not trivially equal (e.g. all zero): they vary across the vocabulary.
        let spread = candle.iter().cloned().fold(f32::MIN, f32::max)
            - candle.iter().cloned().fold(f32::MAX, f32::min);
        assert!(spread > 1e-3, "{spread}");

        // Resume: the reloaded shard takes the next steps exactly like the original.
        let st = loaded.state.unwrap();
        let mut resumed =
            Shard::from_tensors(&c, &pieces, &loaded.tensors, DType::F32, &Device::Cpu).unwrap();
        resumed.set_optimizer_state(st.step, &st.optimizer).unwrap();
        train(&mut shard, &corpus, 3, 2);
        train(&mut resumed, &corpus, 3, 2);
        assert_eq!(
            shard.weights_digest().unwrap(),
            resumed.weights_digest().unwrap()
        );
    }
}

#[test]
fn foreign_hf_checkpoint_in_bf16_matches_candle_llama() {
    // Written as another program would: safetensors crate directly, bf16, reverse-sorted tensor
    // order, a config with fields we do not use, and the RoPE buffers old HF exports include.
    let c = cfg(4, 2, false);
    let shard = Shard::new(&c, &Piece::all(&[0, 2]), 5, DType::F32, &Device::Cpu).unwrap();
    let mut tensors: Vec<(String, Tensor)> = shard
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, (t * 20.0).unwrap().to_dtype(DType::BF16).unwrap()))
        .collect();
    tensors.sort_by(|a, b| b.0.cmp(&a.0));
    let inv_freq = Tensor::ones(4, DType::BF16, &Device::Cpu).unwrap();
    tensors.push((
        "model.layers.0.self_attn.rotary_emb.inv_freq".into(),
        inv_freq,
    ));
    let dir = tempfile::tempdir().unwrap();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes =
        safetensors::serialize(tensors.iter().map(|(n, t)| (n.clone(), t)), Some(meta)).unwrap();
    std::fs::write(dir.path().join("model.safetensors"), bytes).unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
        "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.02,
        "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": false, "use_cache": true, "transformers_version": "4.44.0"
    });
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();

    let tokens = prompt();
    let loaded = checkpoint::load(dir.path()).unwrap();
    assert_eq!(loaded.config, c);
    let ours = common::our_last_logits(&loaded.config, &loaded.tensors, &tokens);
    let candle = common::candle_llama_last_logits(dir.path(), &tokens);
    let d = common::rel_diff(&ours, &candle);
    assert!(
        d < 1e-4,
        "ours vs candle llama on a bf16 foreign checkpoint: {d}"
    );
}
