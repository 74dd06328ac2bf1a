//! stories260K.bin (a real pretrained llama2.c checkpoint with grouped-query attention) imported by
//! us gives the logits that candle-transformers gives: its own `llama2_c` model on the original
//! weights (interleaved RoPE), `llama::Llama` on our converted HF checkpoint, and our own model.

#[path = "reference_common/mod.rs"]
mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_transformers::models::llama2_c;
use swarm_model::{checkpoint, llama2c};

const TOKENS: &[u32] = &[
    1, 403, 407, 261, 378, 259, 411, 407, 270, 300, 302, 344, 287, 11, 65, 480,
];

/// candle's `llama2_c` on the file's original weights. Its own `.bin` reader assumes wk/wv are
/// (dim, dim), which is wrong under grouped-query attention, so we feed it the tensors we parsed,
/// under the names its `var_builder` uses.
fn candle_llama2c_logits(f: &llama2c::Llama2c) -> Vec<f32> {
    let c = &f.config;
    let cfg = llama2_c::Config {
        dim: c.hidden_size,
        hidden_dim: c.intermediate_size,
        n_layers: c.num_hidden_layers,
        n_heads: c.num_attention_heads,
        n_kv_heads: c.num_kv_heads(),
        vocab_size: c.vocab_size,
        seq_len: c.max_position_embeddings,
        norm_eps: 1e-5,
    };
    let mut ws: HashMap<String, Tensor> = f.tensors.clone();
    let head = ws
        .get("lm_head.weight")
        .cloned()
        .unwrap_or_else(|| ws["model.embed_tokens.weight"].clone());
    ws.insert("lm_head.weight".into(), head);
    ws.insert("rot.freq_cis_real".into(), f.freq_cis_real.clone());
    ws.insert("rot.freq_cis_imag".into(), f.freq_cis_imag.clone());
    let vb = candle_nn::VarBuilder::from_tensors(ws, DType::F32, &Device::Cpu);
    let mut cache = llama2_c::Cache::new(false, &cfg, vb.pp("rot")).unwrap();
    let model = llama2_c::Llama::load(vb, cfg).unwrap();
    let input = Tensor::new(TOKENS, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = model.forward(&input, 0, &mut cache).unwrap();
    logits
        .i((0, TOKENS.len() - 1))
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

#[test]
fn stories260k_matches_candle_llama2c_candle_llama_and_our_model() {
    let Some(path) = common::shared_data("stories260K.bin") else {
        return;
    };
    let bytes = std::fs::read(&path).unwrap();
    let parsed = llama2c::parse(&bytes).unwrap();
    let c = &parsed.config;
    assert_eq!(
        (
            c.hidden_size,
            c.intermediate_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.num_kv_heads(),
            c.vocab_size
        ),
        (64, 172, 5, 8, 4, 512)
    );
    let reference = candle_llama2c_logits(&parsed);

    // Our import (rows of wq/wk permuted to HF's rotate-halves convention), saved as a checkpoint.
    let (cfg, tensors) = llama2c::import(&path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("stories260K");
    checkpoint::save(&ck, &cfg, &tensors, None).unwrap();
    let hf = common::candle_llama_last_logits(&ck, TOKENS);
    let d_hf = common::rel_diff(&hf, &reference);
    assert!(
        d_hf < 1e-4,
        "candle llama on our HF conversion vs candle llama2_c: {d_hf}"
    );

    // Without the permutation the HF model computes something else: the check can fail.
    let ours_wrong = common::our_last_logits(&cfg, &parsed.tensors, TOKENS);
    assert!(common::rel_diff(&ours_wrong, &reference) > 1e-2);

    let ours = common::our_last_logits(&cfg, &checkpoint::load(&ck).unwrap().tensors, TOKENS);
    let d_ours = common::rel_diff(&ours, &reference);
    assert!(d_ours < 1e-4, "our model vs candle llama2_c: {d_ours}");
    eprintln!("stories260K: rel diff candle-llama {d_hf:.2e}, ours {d_ours:.2e}");
}
