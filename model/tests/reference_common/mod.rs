//! Helpers shared by the reference tests (a folder, so it is not a test target of its own).

#![allow(unsafe_code)] // memory-mapped test files (candle's VarBuilder)
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use swarm_model::{Model, ModelConfig};

/// `../shared/data/<name>` if present; tests needing it skip with a printed reason otherwise.
pub(crate) fn shared_data(name: &str) -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/data")
        .join(name);
    if p.exists() {
        Some(p)
    } else {
        eprintln!(
            "SKIPPED: {} not found (the shared test data is absent)",
            p.display()
        );
        None
    }
}

/// Last-position logits of our own [`Model`] on `tokens`.
pub(crate) fn our_last_logits(
    cfg: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
    tokens: &[u32],
) -> Vec<f32> {
    let model = Model::from_tensors(cfg, tensors).unwrap();
    let logits = model.logits(tokens, 1, tokens.len()).unwrap();
    logits
        .get(0)
        .unwrap()
        .get(tokens.len() - 1)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// Last-position logits of candle-transformers' `llama::Llama` loading the HF checkpoint in `dir`
/// (config.json + model.safetensors) exactly as a user of candle would.
pub(crate) fn candle_llama_last_logits(dir: &Path, tokens: &[u32]) -> Vec<f32> {
    use candle_transformers::models::llama;
    let dev = Device::Cpu;
    let cfg: llama::LlamaConfig =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let cfg = cfg.into_config(false);
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy().to_string();
            n.starts_with("model") && n.ends_with(".safetensors")
        })
        .collect();
    files.sort();
    // SAFETY: the files are not modified while mapped (test-owned temporary directory).
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(&files, DType::F32, &dev).unwrap()
    };
    let model = llama::Llama::load(vb, &cfg).unwrap();
    let mut cache = llama::Cache::new(false, DType::F32, &cfg, &dev).unwrap();
    let input = Tensor::new(tokens, &dev).unwrap().unsqueeze(0).unwrap();
    let logits = model.forward(&input, 0, &mut cache).unwrap();
    logits.squeeze(0).unwrap().to_vec1::<f32>().unwrap()
}

/// max |a - b| / max |b|: the relative difference of two logit vectors.
pub(crate) fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
    let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    diff / scale
}
