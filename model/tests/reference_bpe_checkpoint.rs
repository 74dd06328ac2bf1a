//! A BPE run end to end, checked against candle-transformers: tinyshakespeare prepared into token
//! shards with the Llama-2-style tokenizer of `../shared/data/tokenizers`, a few local training
//! steps from those shards, a checkpoint that carries its tokenizer.json, and candle's
//! `llama::Llama` on that checkpoint giving our logits for a prompt encoded by the checkpoint's
//! own tokenizer. With `SWARM_REFERENCE_CHECKPOINT=DIR` the same comparison also runs on a
//! checkpoint made elsewhere (e.g. the 20m preset run of experiments/results).

#[path = "reference_common/mod.rs"]
mod common;

use std::path::Path;

use swarm_model::checkpoint;
use swarm_model::prepare::{PrepareOptions, prepare};
use swarm_model::run::RunConfig;
use swarm_model::tokenizer::load_tokenizer;
use swarm_model::train::{LocalTrainer, load_corpus};

const PROMPT: &str = "ROMEO:\nBut soft, what light through yonder window breaks?";

/// Our logits vs candle's on the checkpoint in `dir`, the prompt encoded by its tokenizer.json.
fn compare(dir: &Path) -> f32 {
    let tok = load_tokenizer(dir).unwrap();
    let ids = tok.encode(PROMPT);
    assert!(ids.len() > 5 && ids.len() < PROMPT.len(), "BPE ids {ids:?}");
    assert_eq!(tok.decode(&ids), PROMPT);
    let ck = checkpoint::load(dir).unwrap();
    let ours = common::our_last_logits(&ck.config, &ck.tensors, &ids);
    let theirs = common::candle_llama_last_logits(dir, &ids);
    assert_eq!(ours.len(), ck.config.vocab_size);
    let d = common::rel_diff(&ours, &theirs);
    let scale = theirs.iter().fold(0f32, |m, x| m.max(x.abs()));
    eprintln!(
        "{}: {} prompt ids, {} logits: max |ours - candle llama| {:.2e} = {d:.2e} of max |logit| \
         {scale:.3}",
        dir.display(),
        ids.len(),
        ours.len(),
        d * scale
    );
    d
}

#[test]
fn a_bpe_run_on_prepared_shards_loads_in_candle_llama_with_its_tokenizer() {
    let (Some(text), Some(tokenizer)) = (
        common::shared_data("tinyshakespeare.txt"),
        common::shared_data("tokenizers/spm-bpe-4k.json"),
    ) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let s = prepare(
        &PrepareOptions {
            inputs: vec![text],
            tokenizer: tokenizer.clone(),
            out: data.clone(),
            threads: 2,
            shard_tokens: 100_000,
            val_fraction: 0.05,
            end_of_document: None,
            chunk_bytes: 64 << 10,
        },
        |_, _| {},
    )
    .unwrap();
    assert!(s.shards >= 3 && s.val_tokens > 0, "{s:?}");

    let mut cfg = RunConfig::from_toml(
        "[model]\nhidden_size = 64\nintermediate_size = 128\nnum_hidden_layers = 2\n\
         num_attention_heads = 4\nnum_key_value_heads = 2\nvocab_size = 4096\n\
         max_position_embeddings = 128\n\
         [train]\nsteps = 30\nmicro_batches = 1\nmicro_batch_size = 8\nseq_len = 64\nwarmup_steps = 3\n",
    )
    .unwrap();
    cfg.data.path = Some(data);
    cfg.data.tokenizer = Some(tokenizer.clone());
    let corpus = load_corpus(&cfg.data).unwrap();
    assert_eq!(corpus.vocab_size(), 4096);
    assert_eq!(corpus.end_of_document(), Some(2));
    let mut t = LocalTrainer::new(&cfg).unwrap();
    let first = t.eval(&corpus, 4).unwrap();
    for _ in 0..30 {
        t.train_step(&corpus).unwrap();
    }
    let last = t.eval(&corpus, 4).unwrap();
    assert!(last < first - 0.5, "validation loss {first} -> {last}");

    let dir = tmp.path().join("ckpt");
    checkpoint::save_with_tokenizer(
        &dir,
        &cfg.model,
        &t.tensors(),
        None,
        cfg.data.tokenizer.as_deref(),
    )
    .unwrap();
    assert_eq!(
        std::fs::read(dir.join(checkpoint::TOKENIZER_FILE)).unwrap(),
        std::fs::read(&tokenizer).unwrap()
    );
    assert!(compare(&dir) < 1e-4);

    // A dataset made with another tokenizer is refused.
    let mut other = cfg.data.clone();
    other.tokenizer = common::shared_data("tokenizers/bytelevel-bpe-8k.json");
    let err = load_corpus(&other).unwrap_err().to_string();
    assert!(err.contains("another tokenizer"), "{err}");

    if let Some(d) = std::env::var_os("SWARM_REFERENCE_CHECKPOINT") {
        assert!(compare(Path::new(&d)) < 1e-4);
    }
}
