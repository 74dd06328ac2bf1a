//! Subspace networks (issue #13): the reparametrized pieces against finite differences, the
//! residual structure `E_fix[tok] + U·c` at every boundary, the exactness of sending `Uᵀ·g`
//! back, and the materialized checkpoint in candle-transformers' Llama.

#[path = "reference_common/mod.rs"]
mod common;

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use swarm_model::checkpoint::{self, TrainState};
use swarm_model::train::{backward_micro_batch, forward_micro_batch};
use swarm_model::{Batch, ModelConfig, Piece, RunConfig, Shard, Tokenizer};

fn cfg(rank: usize) -> ModelConfig {
    ModelConfig {
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        vocab_size: 13,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        max_position_embeddings: 16,
        tie_word_embeddings: false,
        subspace_rank: rank,
        subspace_seed: 99,
    }
}

const B: usize = 2;
const T: usize = 5;

fn random_tensors(cfg: &ModelConfig, seed: u64) -> HashMap<String, Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = HashMap::new();
    for p in Piece::all(&[0, cfg.num_hidden_layers]) {
        for (name, shape) in p.parameters(cfg) {
            let n: usize = shape.iter().product();
            let base = if name.ends_with("norm.weight") {
                1.0
            } else {
                0.0
            };
            let v: Vec<f64> = (0..n).map(|_| base + rng.random_range(-0.6..0.6)).collect();
            out.insert(name, Tensor::from_vec(v, shape, &Device::Cpu).unwrap());
        }
    }
    out
}

fn random(rng: &mut ChaCha8Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

fn dot(a: &Tensor, b: &Tensor) -> f64 {
    (a * b)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

#[test]
fn parameters_replace_the_residual_writes() {
    let c = cfg(4);
    let names: Vec<_> = Piece::all(&[0, 2])
        .iter()
        .flat_map(|p| p.parameters(&c))
        .collect();
    let get = |n: &str| names.iter().find(|(m, _)| m == n).map(|(_, s)| s.clone());
    assert_eq!(get("model.embed_tokens.subspace"), Some(vec![13, 4]));
    assert_eq!(
        get("model.layers.1.self_attn.o_proj.subspace"),
        Some(vec![4, 16])
    );
    assert_eq!(
        get("model.layers.0.mlp.down_proj.subspace"),
        Some(vec![4, 24])
    );
    assert_eq!(get("model.layers.0.self_attn.o_proj.weight"), None);
    assert_eq!(get("model.embed_tokens.weight"), None);
    assert!(get("model.layers.0.mlp.up_proj.weight").is_some());
    let mut bad = cfg(16);
    assert!(bad.validate().is_err(), "rank must be below hidden");
    bad.subspace_rank = 4;
    bad.tie_word_embeddings = true;
    assert!(bad.validate().is_err(), "tied embeddings are refused");
}

/// Finite differences of `<piece output, r>` for the embedding and a stage, in f64: every
/// parameter's gradient (`Uᵀ·grad(W)` for the subspace ones) and the stage's input gradient.
#[test]
fn gradients_match_finite_differences() {
    let c = cfg(5);
    let dev = Device::Cpu;
    for (piece, seed) in [
        (Piece::Embedding, 1u64),
        (
            Piece::Stage {
                index: 0,
                layers: 0..2,
            },
            2,
        ),
    ] {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let tensors = random_tensors(&c, seed);
        let h = c.hidden_size;
        let x = Tensor::from_vec(random(&mut rng, B * T * h), (B, T, h), &dev).unwrap();
        let r = Tensor::from_vec(random(&mut rng, B * T * h), (B, T, h), &dev).unwrap();
        let toks: Vec<u32> = (0..B * T).map(|_| rng.random_range(0..13)).collect();
        let f = |t: &HashMap<String, Tensor>, x: &Tensor| -> f64 {
            let s =
                Shard::from_tensors(&c, std::slice::from_ref(&piece), t, DType::F64, &dev).unwrap();
            let y = match &piece {
                Piece::Embedding => s.embed_forward(&toks, B, T).unwrap().0,
                _ => s.stage_forward(0, x).unwrap().0,
            };
            dot(&y, &r)
        };
        let mut shard =
            Shard::from_tensors(&c, std::slice::from_ref(&piece), &tensors, DType::F64, &dev)
                .unwrap();
        let dx = match &piece {
            Piece::Embedding => {
                let (_, ctx) = shard.embed_forward(&toks, B, T).unwrap();
                shard.backward(ctx, &r).unwrap()
            }
            _ => {
                let (_, ctx) = shard.stage_forward(0, &x).unwrap();
                shard.backward(ctx, &r).unwrap()
            }
        };
        let eps = 1e-5;
        if let Some(dx) = dx {
            let g = dx.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let xv = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            for i in (0..xv.len()).step_by(7) {
                let mut p = xv.clone();
                p[i] += eps;
                let mut m = xv.clone();
                m[i] -= eps;
                let num = (f(&tensors, &Tensor::from_vec(p, (B, T, h), &dev).unwrap())
                    - f(&tensors, &Tensor::from_vec(m, (B, T, h), &dev).unwrap()))
                    / (2.0 * eps);
                assert!((g[i] - num).abs() <= 1e-7 + 1e-5 * num.abs(), "input[{i}]");
            }
        }
        let flat = shard.grads_flat().unwrap();
        let mut off = 0;
        let mut subspace_checked = 0;
        for (name, shape) in shard.parameter_names() {
            let n: usize = shape.iter().product();
            let base = tensors[&name]
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            for i in (0..n).step_by((n / 7).max(1)) {
                let mut t = tensors.clone();
                let mut p = base.clone();
                p[i] += eps;
                t.insert(
                    name.clone(),
                    Tensor::from_vec(p, shape.clone(), &dev).unwrap(),
                );
                let fp = f(&t, &x);
                let mut m = base.clone();
                m[i] -= eps;
                t.insert(
                    name.clone(),
                    Tensor::from_vec(m, shape.clone(), &dev).unwrap(),
                );
                let num = (fp - f(&t, &x)) / (2.0 * eps);
                let an = flat[off + i] as f64;
                assert!(
                    (an - num).abs() <= 1e-6 + 1e-5 * num.abs(),
                    "{piece:?} {name}[{i}]: analytic {an:e} vs finite difference {num:e}"
                );
            }
            subspace_checked += name.ends_with(".subspace") as usize;
            off += n;
        }
        assert_eq!(off, flat.len());
        assert!(subspace_checked > 0);
    }
}

fn batch(seed: u64, vocab: u32) -> Batch {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = B * T;
    Batch {
        inputs: (0..n).map(|_| rng.random_range(0..vocab)).collect(),
        targets: (0..n).map(|_| rng.random_range(0..vocab)).collect(),
        batch_size: B,
        seq_len: T,
    }
}

/// At every boundary the hidden state is `E_fix[tok] + U·c`: projecting and lifting gives it
/// back; and the parameter gradients with `Uᵀ·g` sent back (what `backward_micro_batch` does
/// for a subspace model) equal those of the plain chain rule through the whole model.
#[test]
fn boundaries_carry_k_values_exactly_both_ways() {
    let c = cfg(4);
    let dev = Device::Cpu;
    let tensors = random_tensors(&c, 5);
    let b = batch(6, 13);
    let build = |p: &[Piece]| Shard::from_tensors(&c, p, &tensors, DType::F64, &dev).unwrap();
    let mut ends = build(&[Piece::Embedding, Piece::Head]);
    let mut stages: Vec<Shard> = Piece::stages(&[0, 1, 2])
        .iter()
        .map(|p| build(std::slice::from_ref(p)))
        .collect();
    let sub = ends.subspace().unwrap();
    assert_eq!(sub.rank(), 4);

    // The residual structure at each boundary.
    let (mut x, _) = ends.embed_forward(&b.inputs, B, T).unwrap();
    for (k, s) in stages.iter().enumerate() {
        let c = sub.project(&x, &b.inputs).unwrap();
        assert_eq!(c.dims(), &[B, T, 4]);
        let back = sub.lift(&c, &b.inputs).unwrap();
        let err = (back - &x)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(err < 1e-12, "boundary {k}: {err}");
        x = s.stage_forward(k, &x).unwrap().0;
    }
    let c_last = sub.project(&x, &b.inputs).unwrap();
    let back = sub.lift(&c_last, &b.inputs).unwrap();
    let err = (back - &x)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(err < 1e-12, "last boundary: {err}");

    // Gradients: plain chain rule (full g at every boundary) ...
    let (_, e_ctx) = ends.embed_forward(&b.inputs, B, T).unwrap();
    let (x0, _) = ends.embed_forward(&b.inputs, B, T).unwrap();
    let (x1, c1) = stages[0].stage_forward(0, &x0).unwrap();
    let (x2, c2) = stages[1].stage_forward(1, &x1).unwrap();
    let (_, h_ctx) = ends.head_forward(&x2, &b.targets).unwrap();
    let g = ends.head_backward(h_ctx, 1.0).unwrap();
    let g = stages[1].backward(c2, &g).unwrap().unwrap();
    let g = stages[0].backward(c1, &g).unwrap().unwrap();
    ends.backward(e_ctx, &g).unwrap();
    let plain: Vec<Vec<f32>> = std::iter::once(&ends)
        .chain(&stages)
        .map(|s| s.grads_flat().unwrap())
        .collect();
    // ... equals the subspace transport (only Uᵀ·g crosses).
    for s in std::iter::once(&mut ends).chain(stages.iter_mut()) {
        s.zero_grads();
    }
    let (_, ctx) = forward_micro_batch(&ends, &stages, &b).unwrap();
    backward_micro_batch(&mut ends, &mut stages, ctx, 1.0).unwrap();
    let sent: Vec<Vec<f32>> = std::iter::once(&ends)
        .chain(&stages)
        .map(|s| s.grads_flat().unwrap())
        .collect();
    for (p, s) in plain.iter().zip(&sent) {
        let scale = p.iter().fold(0f32, |a, x| a.max(x.abs()));
        assert!(scale > 0.0);
        for (a, b) in p.iter().zip(s) {
            assert!((a - b).abs() <= 1e-6 * scale, "{a} vs {b}");
        }
    }
    // The part of g outside span(U) is not zero (so the check above is not vacuous).
    let g_full = {
        let (x0, _) = ends.embed_forward(&b.inputs, B, T).unwrap();
        let (x1, _) = stages[0].stage_forward(0, &x0).unwrap();
        let (x2, _) = stages[1].stage_forward(1, &x1).unwrap();
        let (_, h) = ends.head_forward(&x2, &b.targets).unwrap();
        ends.head_backward(h, 1.0).unwrap()
    };
    let in_span = sub.lift_grad(&sub.project_grad(&g_full).unwrap()).unwrap();
    let outside = (g_full - in_span)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(outside > 1e-6, "{outside}");
}

/// A trained subspace model saved as a checkpoint is a plain HF Llama: candle-transformers'
/// Llama gives the subspace model's logits.
#[test]
fn checkpoint_materializes_into_plain_llama_with_the_same_logits() {
    let mut run = RunConfig::default();
    run.model = ModelConfig {
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        vocab_size: 256,
        max_position_embeddings: 64,
        subspace_rank: 8,
        subspace_seed: 1234,
        ..run.model.clone()
    };
    run.stages = vec![0, 1, 2];
    run.train.micro_batch_size = 4;
    run.train.seq_len = 32;
    run.train.steps = 3;
    let corpus = swarm_model::Corpus::builtin();
    let mut t = swarm_model::LocalTrainer::new(&run).unwrap();
    for _ in 0..3 {
        t.train_step(&corpus).unwrap();
    }
    let tokens = swarm_model::ByteTokenizer.encode("Once upon a time, there was a cat");
    // The subspace model's own logits.
    let whole = Shard::from_tensors(
        &run.model,
        &Piece::all(&[0, 2]),
        &t.tensors(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let (x, _) = whole.embed_forward(&tokens, 1, tokens.len()).unwrap();
    let (x, _) = whole.stage_forward(0, &x).unwrap();
    let ours: Vec<f32> = whole
        .head_logits_only(&x)
        .unwrap()
        .get(0)
        .unwrap()
        .get(tokens.len() - 1)
        .unwrap()
        .to_vec1()
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ckpt");
    let state = TrainState {
        step: t.step(),
        optimizer: HashMap::new(),
        metadata: BTreeMap::new(),
    };
    checkpoint::save(&path, &run.model, &t.tensors(), Some(&state)).unwrap();
    let loaded = checkpoint::load(&path).unwrap();
    assert_eq!(
        loaded.config.subspace_rank, 0,
        "the saved config is a plain Llama"
    );
    assert!(
        loaded
            .tensors
            .contains_key("model.layers.0.self_attn.o_proj.weight")
    );
    let candle = common::candle_llama_last_logits(&path, &tokens);
    let d = common::rel_diff(&ours, &candle);
    assert!(
        d < 1e-4,
        "subspace model vs candle llama on its checkpoint: {d}"
    );
    let spread = candle.iter().fold(f32::MIN, |a, &x| a.max(x))
        - candle.iter().fold(f32::MAX, |a, &x| a.min(x));
    assert!(spread > 1e-3, "logits vary: {spread}");
    // And back: the checkpoint's plain tensors rebuild the subspace parameters.
    let again = Shard::from_tensors(
        &run.model,
        &Piece::all(&[0, 2]),
        &loaded.tensors,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let (x, _) = again.embed_forward(&tokens, 1, tokens.len()).unwrap();
    let (x, _) = again.stage_forward(0, &x).unwrap();
    let rebuilt: Vec<f32> = again
        .head_logits_only(&x)
        .unwrap()
        .get(0)
        .unwrap()
        .get(tokens.len() - 1)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(common::rel_diff(&ours, &rebuilt) < 1e-4);
}

/// The subspace parameters saved beside a checkpoint must be the ones its plain weights came
/// from: a checkpoint whose weights were edited afterwards is refused with a clear error, and
/// without the sidecar it is the plain model it says it is.
#[test]
fn checkpoint_sidecar_must_match_the_plain_weights() {
    let mut run = RunConfig {
        model: cfg(4),
        stages: vec![0, 1, 2],
        ..RunConfig::default()
    };
    run.train.seq_len = 8;
    let t = swarm_model::LocalTrainer::new(&run).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ckpt");
    checkpoint::save(&path, &run.model, &t.tensors(), None).unwrap();
    let loaded = checkpoint::load(&path).unwrap();
    let sub = loaded
        .subspace
        .as_ref()
        .expect("the subspace model is saved");
    assert_eq!(sub.config, run.model);
    let (model, tensors) = loaded.trained_model();
    assert_eq!(*model, run.model);
    for (name, w) in t.tensors() {
        let got = tensors.get(&name).unwrap_or_else(|| panic!("{name}"));
        let d = (got - &w).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0, "{name} bitwise");
    }

    // Edit one plain weight after saving: the factors no longer produce it.
    let mut plain = loaded.tensors.clone();
    let name = "model.layers.1.mlp.down_proj.weight";
    let w = plain[name].clone();
    plain.insert(name.into(), (w * 1.5).unwrap());
    let edited = dir.path().join("edited");
    std::fs::create_dir(&edited).unwrap();
    for f in [checkpoint::CONFIG_FILE, checkpoint::SUBSPACE_FILE] {
        std::fs::copy(path.join(f), edited.join(f)).unwrap();
    }
    let views: Vec<(String, Tensor)> = plain.into_iter().collect();
    candle_core::safetensors::save(
        &views.into_iter().collect::<HashMap<_, _>>(),
        edited.join(checkpoint::MODEL_FILE),
    )
    .unwrap();
    let err = checkpoint::load(&edited).unwrap_err().to_string();
    assert!(
        err.contains("does not materialize") && err.contains(name),
        "{err}"
    );

    // Without the sidecar: the plain model, nothing to resume a subspace run from.
    std::fs::remove_file(edited.join(checkpoint::SUBSPACE_FILE)).unwrap();
    let plain = checkpoint::load(&edited).unwrap();
    assert!(plain.subspace.is_none());
    assert_eq!(plain.trained_model().0.subspace_rank, 0);

    // A sidecar with a malformed rank is refused, not trusted.
    let bytes = std::fs::read(path.join(checkpoint::SUBSPACE_FILE)).unwrap();
    let text = String::from_utf8_lossy(&bytes);
    let at = text
        .find("\"subspace_rank\":\"4\"")
        .expect("rank in the header");
    let mut bad = bytes.clone();
    bad[at + "\"subspace_rank\":\"".len()] = b'x';
    std::fs::write(edited.join(checkpoint::SUBSPACE_FILE), &bad).unwrap();
    let err = checkpoint::load(&edited).unwrap_err().to_string();
    assert!(err.contains("subspace_rank"), "{err}");
}
