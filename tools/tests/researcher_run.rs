//! A researcher's path through the CLI, with real processes (issue #17): `swarm data prepare` a
//! text corpus with a BPE tokenizer into token shards, `swarm train --local` from those shards,
//! then `swarm eval` and `swarm generate` on the checkpoint through the tokenizer it carries. A
//! dataset made with another tokenizer is refused with a clear error. Uses ../shared/data (the
//! product never needs it); skipped with the reason printed where it is absent.

use std::path::{Path, PathBuf};
use std::process::Command;

use swarm_model::RunConfig;

fn shared() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data");
    p.join("tokenizers/bytelevel-bpe-8k.json")
        .is_file()
        .then_some(p)
}

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

/// The last line of stdout as JSON (`--json`), or a panic with what the command printed.
fn json(args: &[&str]) -> serde_json::Value {
    let (ok, out, err) = swarm(args);
    assert!(ok, "swarm {args:?} failed:\n{out}\n{err}");
    serde_json::from_str(out.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("swarm {args:?}: last line is not JSON ({e}):\n{out}"))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The testkit's tiny model over the 8k vocabulary, with longer windows, trained from `data`.
fn config(data: &Path, tokenizer: &Path, steps: u64) -> RunConfig {
    let mut cfg = swarm_testkit::tiny_config(steps);
    cfg.model.vocab_size = 8192;
    cfg.model.max_position_embeddings = 64;
    cfg.train.micro_batches = 2;
    cfg.train.micro_batch_size = 4;
    cfg.train.seq_len = 32;
    cfg.data.path = Some(data.to_path_buf());
    cfg.data.tokenizer = Some(tokenizer.to_path_buf());
    cfg.validate().unwrap();
    cfg
}

#[test]
fn prepare_train_eval_and_generate_through_a_bpe_tokenizer() {
    let Some(shared) = shared() else {
        eprintln!("skipped: ../shared/data with its tokenizers is not beside the repository");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let bpe = shared.join("tokenizers/bytelevel-bpe-8k.json");
    let corpus = shared.join("tinyshakespeare.txt");
    let data = dir.path().join("data");

    // 1. Shards: about 300k tokens, 5% held out.
    let p = json(&[
        "data",
        "prepare",
        s(&corpus),
        "--tokenizer",
        s(&bpe),
        "--out",
        s(&data),
        "--shard-tokens",
        "100000",
        "--val-fraction",
        "0.05",
        "--json",
    ]);
    let tokens = p["tokens"].as_u64().unwrap();
    let (train, val) = (
        p["train_tokens"].as_u64().unwrap(),
        p["val_tokens"].as_u64().unwrap(),
    );
    assert_eq!(train + val, tokens, "{p}");
    // A byte-level BPE of 8k merges English to well under one token per byte.
    assert!(
        tokens > 150_000 && tokens < 1_115_394 / 2,
        "{tokens} tokens for 1.1 MB: {p}"
    );
    assert!((val as f64 / tokens as f64 - 0.05).abs() < 0.01, "{p}");
    // Shards are cut at input-chunk boundaries (the unit of resuming): one training shard and
    // one validation shard for a 1.1 MB input.
    assert!(p["shards"].as_u64().unwrap() >= 2, "{p}");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("manifest.json")).unwrap()).unwrap();
    assert!(manifest.to_string().contains("tokenizer"), "{manifest}");

    // Preparing the finished dataset again says so, and leaves it as it was.
    let before = std::fs::read(data.join("manifest.json")).unwrap();
    let (ok, _, err) = swarm(&[
        "data",
        "prepare",
        s(&corpus),
        "--tokenizer",
        s(&bpe),
        "--out",
        s(&data),
        "--shard-tokens",
        "100000",
        "--val-fraction",
        "0.05",
    ]);
    assert!(!ok && err.contains("already holds"), "{err}");
    assert_eq!(std::fs::read(data.join("manifest.json")).unwrap(), before);

    // 2. Train from the shards.
    let run = dir.path().join("run.toml");
    std::fs::write(&run, config(&data, &bpe, 8).to_toml().unwrap()).unwrap();
    let ck = dir.path().join("ck");
    let t = json(&[
        "train",
        "--local",
        "--config",
        s(&run),
        "--out",
        s(&ck),
        "--json",
    ]);
    let first = t["initial_loss"].as_f64().unwrap_or_else(|| panic!("{t}"));
    let last = t["final_loss"].as_f64().unwrap_or_else(|| panic!("{t}"));
    assert_eq!(t["steps"].as_u64(), Some(8), "{t}");
    // The first step's loss is that of a near-uniform guess over the 8k vocabulary, so the
    // model really reads 8k-vocabulary tokens; training lowers it.
    let uniform = 8192f64.ln();
    assert!((first - uniform).abs() < 0.5, "{t}");
    assert!(last < first - 0.5, "{t}");
    assert!(
        ck.join("tokenizer.json").is_file(),
        "the checkpoint carries its tokenizer"
    );

    // 3. Evaluate held-out text through the checkpoint's tokenizer, and sample from it.
    let held = dir.path().join("held.txt");
    std::fs::write(
        &held,
        "ROMEO:\nWhat light through yonder window breaks? It is the east.\n".repeat(4),
    )
    .unwrap();
    let e = json(&["eval", "--checkpoint", s(&ck), "--data", s(&held), "--json"]);
    let loss = e["loss"]
        .as_f64()
        .unwrap_or_else(|| panic!("no loss in {e}"));
    assert!(loss.is_finite() && loss < uniform, "{e}");
    let g = json(&[
        "generate",
        "--checkpoint",
        s(&ck),
        "--prompt",
        "ROMEO:",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
        "--json",
    ]);
    let prompt = g["prompt_tokens"].as_array().unwrap();
    assert!(
        !prompt.is_empty() && prompt.len() < 6,
        "BPE merges the prompt: {g}"
    );
    assert_eq!(g["tokens"].as_array().unwrap().len(), 8, "{g}");
    assert!(g["text"].as_str().is_some_and(|t| !t.is_empty()), "{g}");

    // 4. The same shards under another tokenizer are refused, saying why.
    let spm = shared.join("tokenizers/spm-bpe-4k.json");
    let mut other = config(&data, &spm, 2);
    other.model.vocab_size = 8192;
    let run2 = dir.path().join("other.toml");
    std::fs::write(&run2, other.to_toml().unwrap()).unwrap();
    let (ok, out, err) = swarm(&["train", "--local", "--config", s(&run2), "--json"]);
    assert!(
        !ok,
        "a dataset of another tokenizer must be refused:\n{out}"
    );
    assert!(err.contains("tokenizer"), "{err}");
}
