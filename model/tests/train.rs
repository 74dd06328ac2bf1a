//! The local trainer: learning, exact resume from a checkpoint, and equivalence with one shard.

use swarm_model::checkpoint;
use swarm_model::{ByteTokenizer, Corpus, LocalTrainer, Model, ModelConfig, RunConfig};

fn tiny_run(steps: u64) -> RunConfig {
    let mut c = RunConfig {
        model: ModelConfig {
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 3,
            num_attention_heads: 4,
            num_key_value_heads: Some(2),
            vocab_size: 256,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            max_position_embeddings: 64,
            tie_word_embeddings: false,
            subspace_rank: 0,
            subspace_seed: 0,
        },
        ..RunConfig::default()
    };
    c.stages = vec![0, 1, 3];
    c.train.steps = steps;
    c.train.micro_batches = 2;
    c.train.micro_batch_size = 4;
    c.train.seq_len = 32;
    c.train.warmup_steps = 2;
    c.train.lr = 1e-2;
    c.train.min_lr = 1e-3;
    c.train.eval_batches = 2;
    c
}

fn corpus() -> Corpus {
    let text = "the quick brown fox jumps over the lazy dog. ".repeat(200);
    Corpus::from_text(&text, &ByteTokenizer).unwrap()
}

#[test]
fn loss_falls_on_repetitive_text() {
    let cfg = tiny_run(30);
    let data = corpus();
    let mut tr = LocalTrainer::new(&cfg).unwrap();
    let v0 = tr.eval(&data, 2).unwrap();
    // A fresh model predicts about uniformly over 256 bytes.
    assert!((v0 - 256f64.ln()).abs() < 0.3, "{v0}");
    let mut last = 0.0;
    for _ in 0..30 {
        let s = tr.train_step(&data).unwrap();
        assert!(s.loss.is_finite() && s.grad_norm.is_finite());
        last = s.loss;
    }
    let v1 = tr.eval(&data, 2).unwrap();
    assert!(last < 3.0 && v1 < 3.0, "train {last}, val {v1} (from {v0})");
}

#[test]
fn resume_from_checkpoint_is_exact() {
    resume_is_exact(tiny_run(6));
}

/// A subspace model resumes exactly too: its checkpoint is the plain model plus the subspace
/// parameters and their moments (a materialized `U·A` alone would lose both).
#[test]
fn resume_of_a_subspace_model_is_exact() {
    let mut cfg = tiny_run(6);
    cfg.model.subspace_rank = 8;
    cfg.model.subspace_seed = 5;
    resume_is_exact(cfg);
}

fn resume_is_exact(cfg: RunConfig) {
    let data = corpus();
    let mut straight = LocalTrainer::new(&cfg).unwrap();
    for _ in 0..6 {
        straight.train_step(&data).unwrap();
    }
    let mut first = LocalTrainer::new(&cfg).unwrap();
    for _ in 0..3 {
        first.train_step(&data).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    checkpoint::save(
        &ck,
        &cfg.model,
        &first.tensors(),
        Some(&first.train_state().unwrap()),
    )
    .unwrap();
    let loaded = checkpoint::load(&ck).unwrap();
    let (model, tensors) = loaded.trained_model();
    assert_eq!(*model, cfg.model);
    let mut resumed = LocalTrainer::from_tensors(&cfg, &tensors, loaded.state.as_ref()).unwrap();
    assert_eq!(resumed.step(), 3);
    assert_eq!(
        resumed.weights_digest().unwrap(),
        first.weights_digest().unwrap()
    );
    for _ in 0..3 {
        resumed.train_step(&data).unwrap();
    }
    assert_eq!(
        resumed.weights_digest().unwrap(),
        straight.weights_digest().unwrap()
    );
    // Without the optimizer state the continuation differs (the test can tell).
    let mut no_state = LocalTrainer::from_tensors(&cfg, &tensors, None).unwrap();
    for _ in 0..3 {
        no_state.train_step(&data).unwrap();
    }
    assert_ne!(
        no_state.weights_digest().unwrap(),
        straight.weights_digest().unwrap()
    );
}

#[test]
fn split_trainer_equals_model_and_other_splits() {
    let cfg = tiny_run(3);
    let data = corpus();
    let batch = data.train_batch(cfg.seed, 0, 0, 4, 32).unwrap();
    // The split trainer's fresh weights are the Model's for the same seed.
    let tr = LocalTrainer::new(&cfg).unwrap();
    let m = Model::new(&cfg.model, cfg.seed).unwrap();
    let want = m.loss(&batch.inputs, &batch.targets, 4, 32).unwrap();
    assert_eq!(tr.loss(&batch).unwrap(), want);
    // Different stage splits train to the same weights.
    let mut a = LocalTrainer::new(&cfg).unwrap();
    let mut other = cfg.clone();
    other.stages = vec![0, 3];
    let mut b = LocalTrainer::new(&other).unwrap();
    for _ in 0..3 {
        let (sa, sb) = (a.train_step(&data).unwrap(), b.train_step(&data).unwrap());
        assert_eq!(sa.loss, sb.loss);
    }
    let (ta, tb) = (a.tensors(), b.tensors());
    for (name, t) in &ta {
        let x = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let y = tb[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(x, y, "{name}");
    }
    // And the logits of a Model built from the trained tensors give the trainer's loss.
    let m = Model::from_tensors(&cfg.model, &ta).unwrap();
    let logits = m.logits(&batch.inputs, 4, 32).unwrap();
    assert_eq!(logits.dims(), &[4, 32, 256]);
    assert_eq!(
        m.loss(&batch.inputs, &batch.targets, 4, 32).unwrap(),
        a.loss(&batch).unwrap()
    );
}
