//! `swarm eval` and `swarm generate` run as the real binary, checked against candle-transformers'
//! `llama::Llama` loading the same checkpoint: checkpoints written by `swarm train --local`
//! (grouped-query attention; tied embeddings), and an HF checkpoint written by another program
//! in bf16.

#![allow(unsafe_code)] // memory-mapped test files (candle's VarBuilder)

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use swarm_model::checkpoint;
use swarm_model::{ByteTokenizer, ModelConfig, Piece, Shard, Tokenizer};
use swarm_testkit::rel_diff;

fn swarm(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_swarm"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `swarm` with `--json` and parses the last line of stdout.
fn swarm_json(args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.push("--json");
    let (ok, stdout, stderr) = swarm(&all);
    assert!(ok, "swarm {args:?} failed: {stderr}");
    let last = stdout.lines().last().expect("some output");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {last}"))
}

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

/// A checkpoint written by `swarm train --local` after a few steps of a small run.
fn trained_checkpoint(c: &ModelConfig, dir: &Path) {
    let run = format!(
        "seed = 3\nstages = [0, 1, 2]\n\n[model]\nhidden_size = {}\nintermediate_size = {}\n\
         num_hidden_layers = {}\nnum_attention_heads = {}\nnum_key_value_heads = {}\n\
         vocab_size = {}\nmax_position_embeddings = {}\ntie_word_embeddings = {}\n\n\
         [train]\nsteps = 4\nmicro_batches = 1\nmicro_batch_size = 4\nseq_len = 32\nlr = 1e-2\n\
         warmup_steps = 1\neval_batches = 1\n",
        c.hidden_size,
        c.intermediate_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_kv_heads(),
        c.vocab_size,
        c.max_position_embeddings,
        c.tie_word_embeddings
    );
    let toml = dir.with_extension("toml");
    std::fs::write(&toml, run).unwrap();
    let out = swarm_json(&[
        "train",
        "--local",
        "--config",
        toml.to_str().unwrap(),
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(out["steps"], 4, "{out}");
    // The training loop's CPU time (10 ms ticks; a tiny run may round to 0): no more than every
    // core for the loop's wall time, so start-up and the final evaluation are not in it.
    let (cpu, wall) = (
        out["cpu_s"].as_f64().unwrap(),
        out["wall_s"].as_f64().unwrap(),
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    assert!((0.0..=cores * wall + 0.02).contains(&cpu), "{out}");
    assert_eq!(checkpoint::load(dir).unwrap().config, *c);
}

/// candle-transformers' `llama::Llama` on a HF directory: last-position logits of `tokens`.
fn candle_last_logits(dir: &Path, tokens: &[u32]) -> Vec<f32> {
    use candle_transformers::models::llama;
    let dev = Device::Cpu;
    let cfg: llama::LlamaConfig =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let cfg = cfg.into_config(false);
    let files: Vec<PathBuf> = vec![dir.join("model.safetensors")];
    // SAFETY: test-owned files, not modified while mapped.
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(&files, DType::F32, &dev).unwrap()
    };
    let model = llama::Llama::load(vb, &cfg).unwrap();
    let mut cache = llama::Cache::new(false, DType::F32, &cfg, &dev).unwrap();
    let input = Tensor::new(tokens, &dev).unwrap().unsqueeze(0).unwrap();
    model
        .forward(&input, 0, &mut cache)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// Mean next-token loss by candle: one forward per prefix, log-softmax of the true next token.
fn candle_loss(dir: &Path, tokens: &[u32]) -> f64 {
    let mut sum = 0.0;
    for i in 1..tokens.len() {
        let l = candle_last_logits(dir, &tokens[..i]);
        let max = l.iter().cloned().fold(f32::MIN, f32::max) as f64;
        let lse = max + l.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
        sum += lse - l[tokens[i] as usize] as f64;
    }
    sum / (tokens.len() - 1) as f64
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn tokens_arg(tokens: &[u32]) -> String {
    tokens
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn eval_of_trained_checkpoints_matches_candle_llama() {
    let tokens = ByteTokenizer.encode("One day, Lily found a red ball near the park.");
    for c in [cfg(4, 2, false), cfg(4, 4, true)] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ckpt");
        trained_checkpoint(&c, &dir);
        let out = swarm_json(&[
            "eval",
            "--checkpoint",
            dir.to_str().unwrap(),
            "--tokens",
            &tokens_arg(&tokens),
        ]);
        let ours = floats(&out["last_logits"]);
        let reference = candle_last_logits(&dir, &tokens);
        let d = rel_diff(&ours, &reference);
        assert!(
            d < 1e-4,
            "tied={}: swarm eval vs candle llama: {d}",
            c.tie_word_embeddings
        );
        let loss = out["loss"].as_f64().unwrap();
        let want = candle_loss(&dir, &tokens);
        assert!(
            ((loss - want) / want).abs() < 1e-4,
            "loss {loss} vs candle {want}"
        );
        assert_eq!(out["tokens"], tokens.len() - 1);
    }
}

#[test]
fn eval_of_a_foreign_bf16_checkpoint_matches_candle_llama() {
    let c = cfg(4, 2, false);
    let shard = Shard::new(&c, &Piece::all(&[0, 2]), 8, DType::F32, &Device::Cpu).unwrap();
    let mut tensors: Vec<(String, Tensor)> = shard
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, (t * 25.0).unwrap().to_dtype(DType::BF16).unwrap()))
        .collect();
    tensors.sort_by(|a, b| b.0.cmp(&a.0));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes =
        safetensors::serialize(tensors.iter().map(|(n, t)| (n.clone(), t)), Some(meta)).unwrap();
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
        "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2, "use_cache": true
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let tokens = [5u32, 200, 17, 33, 99, 1, 250];
    let out = swarm_json(&[
        "eval",
        "--checkpoint",
        dir.to_str().unwrap(),
        "--tokens",
        &tokens_arg(&tokens),
    ]);
    let d = rel_diff(
        &floats(&out["last_logits"]),
        &candle_last_logits(dir, &tokens),
    );
    assert!(d < 1e-4, "swarm eval vs candle llama on bf16: {d}");
}

#[test]
fn eval_on_text_and_generate_from_a_byte_level_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    trained_checkpoint(&cfg(4, 2, false), &dir);
    let d = dir.to_str().unwrap();

    let text = tmp.path().join("t.txt");
    std::fs::write(
        &text,
        "Once upon a time, there was a happy dog named Max. ".repeat(4),
    )
    .unwrap();
    let out = swarm_json(&[
        "eval",
        "--checkpoint",
        d,
        "--data",
        text.to_str().unwrap(),
        "--seq-len",
        "40",
    ]);
    let loss = out["loss"].as_f64().unwrap();
    assert!(loss.is_finite() && loss > 0.0, "{loss}");
    assert_eq!(out["tokens"], 51 * 4 - 1);
    assert!(out.get("last_logits").is_none());

    let args = [
        "generate",
        "--checkpoint",
        d,
        "--prompt",
        "Once upon",
        "--max-tokens",
        "20",
        "--seed",
        "4",
    ];
    let a = swarm_json(&args);
    assert_eq!(a["tokens"].as_array().unwrap().len(), 20);
    assert_eq!(a["prompt_tokens"].as_array().unwrap().len(), 9);
    assert!(a["text"].is_string());
    assert_eq!(a, swarm_json(&args), "same seed, same text");
    let greedy = swarm_json(&[
        "generate",
        "--checkpoint",
        d,
        "--prompt",
        "Once upon",
        "--max-tokens",
        "5",
        "--temperature",
        "0",
    ]);
    // Greedy's first token is the argmax of eval's last logits on the prompt.
    let prompt = tokens_arg(&ByteTokenizer.encode("Once upon"));
    let logits =
        floats(&swarm_json(&["eval", "--checkpoint", d, "--tokens", &prompt])["last_logits"]);
    let argmax = logits
        .iter()
        .enumerate()
        .fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b })
        .0;
    assert_eq!(greedy["tokens"][0], argmax);
    // Human output: the prompt then the sampled text.
    let (ok, stdout, _) = swarm(&[
        "generate",
        "--checkpoint",
        d,
        "--prompt",
        "Once upon",
        "--max-tokens",
        "3",
    ]);
    assert!(ok && stdout.starts_with("Once upon"), "{stdout}");
}

#[test]
fn llama2c_bin_evaluates_and_generates_from_token_ids() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/stories260K.bin");
    if !path.exists() {
        eprintln!(
            "SKIPPED: {} not found (the shared test data is absent)",
            path.display()
        );
        return;
    }
    let p = path.to_str().unwrap();
    let out = swarm_json(&["eval", "--checkpoint", p, "--tokens", "1,403,407,261,378"]);
    assert_eq!(out["last_logits"].as_array().unwrap().len(), 512);
    // A pretrained model predicts its own tokens far better than uniform (ln 512 = 6.24).
    let g = swarm_json(&[
        "generate",
        "--checkpoint",
        p,
        "--prompt-tokens",
        "1",
        "--max-tokens",
        "30",
        "--temperature",
        "0",
    ]);
    let ids: Vec<u32> = g["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    assert!(g["text"].is_null());
    let mut seq = vec![1];
    seq.extend(&ids);
    let l = swarm_json(&["eval", "--checkpoint", p, "--tokens", &tokens_arg(&seq)])["loss"]
        .as_f64()
        .unwrap();
    assert!(l < 3.0, "loss of its own greedy text {l}");
    // Text prompts need a tokenizer the .bin lacks: a clear error, not garbage.
    let (ok, _, stderr) = swarm(&["generate", "--checkpoint", p, "--prompt", "Once"]);
    assert!(!ok && stderr.contains("--prompt-tokens"), "{stderr}");
}

#[test]
fn malformed_checkpoints_fail_with_an_error_message() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = tmp.path().join("bad.bin");
    std::fs::write(&bin, [7u8; 40]).unwrap();
    let (ok, _, stderr) = swarm(&[
        "eval",
        "--checkpoint",
        bin.to_str().unwrap(),
        "--tokens",
        "1,2",
    ]);
    assert!(!ok && stderr.contains("error:"), "{stderr}");
    let dir = tmp.path().join("ck");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("config.json"), "{}").unwrap();
    let (ok, _, stderr) = swarm(&[
        "eval",
        "--checkpoint",
        dir.to_str().unwrap(),
        "--tokens",
        "1,2",
    ]);
    assert!(!ok && stderr.contains("config"), "{stderr}");
}
