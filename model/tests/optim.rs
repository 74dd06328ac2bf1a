//! AdamW against candle-nn's implementation, determinism, clipping plumbing, and the shard state
//! export/import (including malformed bytes).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use swarm_model::{AdamW, ModelConfig, Piece, Shard};

fn cfg() -> ModelConfig {
    ModelConfig {
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        vocab_size: 19,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        max_position_embeddings: 32,
        tie_word_embeddings: false,
        subspace_rank: 0,
        subspace_seed: 0,
    }
}

fn random_grads(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

#[test]
fn adamw_matches_candle_nn() {
    let c = cfg();
    let dev = Device::Cpu;
    let mut shard = Shard::new(
        &c,
        &[Piece::Stage {
            index: 0,
            layers: 0..1,
        }],
        3,
        DType::F32,
        &dev,
    )
    .unwrap();
    let hp = AdamW {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let lr = 1e-2;
    let names = shard.parameter_names();
    let w0 = shard.tensors();
    // Reference: candle-nn AdamW, decay on matrices only (two optimizers).
    let vars: Vec<Var> = names
        .iter()
        .map(|(n, _)| Var::from_tensor(&w0[n].copy().unwrap()).unwrap())
        .collect();
    let params = |wd| candle_nn::ParamsAdamW {
        lr,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: wd,
    };
    let (mats, vecs): (Vec<_>, Vec<_>) = vars
        .iter()
        .cloned()
        .zip(&names)
        .partition(|(_, (_, s))| s.len() == 2);
    let mut opt_m =
        candle_nn::AdamW::new(mats.into_iter().map(|x| x.0).collect(), params(0.1)).unwrap();
    let mut opt_v =
        candle_nn::AdamW::new(vecs.into_iter().map(|x| x.0).collect(), params(0.0)).unwrap();

    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for (step, clip) in [(0, 1.0), (1, 0.5), (2, 1.0)] {
        let g = random_grads(&mut rng, shard.num_parameters());
        shard.set_grads_flat(&g).unwrap();
        shard.optimizer_step(&hp, lr, clip).unwrap();
        // The same gradients, pre-scaled, through candle-nn.
        let loss_parts = {
            let mut off = 0;
            let mut total: Option<Tensor> = None;
            for (v, (_, shape)) in vars.iter().zip(&names) {
                let n: usize = shape.iter().product();
                let gt = Tensor::from_slice(&g[off..off + n], shape.as_slice(), &dev).unwrap();
                let term = (v.as_tensor() * (gt * clip).unwrap())
                    .unwrap()
                    .sum_all()
                    .unwrap();
                total = Some(match total {
                    Some(t) => (t + term).unwrap(),
                    None => term,
                });
                off += n;
            }
            total.unwrap()
        };
        let grads = loss_parts.backward().unwrap();
        opt_m.step(&grads).unwrap();
        opt_v.step(&grads).unwrap();
        let ours = shard.tensors();
        for (v, (name, _)) in vars.iter().zip(&names) {
            let a = ours[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let b = v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (x, y) in a.iter().zip(&b) {
                assert!(
                    (x - y).abs() <= 1e-6 + 1e-5 * y.abs(),
                    "step {step} {name}: {x} vs {y}"
                );
            }
        }
        assert_eq!(shard.step(), step + 1);
    }
}

fn train_steps(shard: &mut Shard, steps: usize, data_seed: u64) {
    let c = shard.config().clone();
    let mut rng = ChaCha8Rng::seed_from_u64(data_seed);
    for _ in 0..steps {
        shard.zero_grads();
        for _ in 0..2 {
            let toks: Vec<u32> = (0..2 * 9)
                .map(|_| rng.random_range(0..c.vocab_size as u32))
                .collect();
            let (x, e) = shard.embed_forward(&toks[..16], 2, 8).unwrap();
            let (x, s0) = shard.stage_forward(0, &x).unwrap();
            let (x, s1) = shard.stage_forward(1, &x).unwrap();
            let (_, h) = shard.head_forward(&x, &toks[2..]).unwrap();
            let g = shard.head_backward(h, 0.5).unwrap();
            let g = shard.backward(s1, &g).unwrap().unwrap();
            let g = shard.backward(s0, &g).unwrap().unwrap();
            shard.backward(e, &g).unwrap();
        }
        let scale = swarm_model::clip_scale(shard.grad_sq_norm().unwrap(), 0.5);
        shard
            .optimizer_step(&AdamW::default(), 3e-3, scale)
            .unwrap();
    }
}

fn whole(seed: u64) -> Shard {
    Shard::new(
        &cfg(),
        &Piece::all(&[0, 1, 2]),
        seed,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn training_is_bitwise_deterministic() {
    let mut a = whole(7);
    let mut b = whole(7);
    let d0 = a.weights_digest().unwrap();
    assert_eq!(d0, b.weights_digest().unwrap());
    train_steps(&mut a, 3, 11);
    train_steps(&mut b, 3, 11);
    assert_eq!(a.weights_digest().unwrap(), b.weights_digest().unwrap());
    assert_ne!(a.weights_digest().unwrap(), d0);
    assert_ne!(whole(8).weights_digest().unwrap(), d0);
}

#[test]
fn flat_grads_round_trip_and_norm() {
    let mut s = whole(1);
    let n = s.num_parameters();
    assert_eq!(s.grads_flat().unwrap(), vec![0.0; n]);
    assert_eq!(s.grad_sq_norm().unwrap(), 0.0);
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let g = random_grads(&mut rng, n);
    s.set_grads_flat(&g).unwrap();
    assert_eq!(s.grads_flat().unwrap(), g);
    let want: f64 = g.iter().map(|&x| x as f64 * x as f64).sum();
    assert!((s.grad_sq_norm().unwrap() - want).abs() < 1e-9 * want);
    assert!(s.set_grads_flat(&g[1..]).is_err());
    s.zero_grads();
    assert_eq!(s.grad_sq_norm().unwrap(), 0.0);
}

#[test]
fn state_export_import_resumes_exactly() {
    let mut a = whole(7);
    train_steps(&mut a, 2, 5);
    let bytes = a.export_state().unwrap();
    let mut b = whole(99);
    b.import_state(&bytes).unwrap();
    assert_eq!(b.step(), 2);
    assert_eq!(a.weights_digest().unwrap(), b.weights_digest().unwrap());
    // Continuing both gives the same weights only if the moments and step came across too.
    train_steps(&mut a, 2, 6);
    train_steps(&mut b, 2, 6);
    assert_eq!(a.weights_digest().unwrap(), b.weights_digest().unwrap());
    // A fresh shard's state (no moments yet) also round-trips.
    let mut c = whole(3);
    c.import_state(&whole(4).export_state().unwrap()).unwrap();
    assert_eq!(
        c.weights_digest().unwrap(),
        whole(4).weights_digest().unwrap()
    );
}

/// The weights-only export (an audit's recomputation of passes) carries the same weights in a
/// third of the bytes, and the two kinds are never taken for one another.
#[test]
fn weights_export_imports_the_weights_only() {
    let mut a = whole(7);
    train_steps(&mut a, 2, 5);
    let full = a.export_state().unwrap();
    let weights = a.export_weights().unwrap();
    assert!(
        weights.len() * 5 / 2 < full.len(),
        "{} vs {}",
        weights.len(),
        full.len()
    );
    let mut b = whole(99);
    b.import_weights(&weights).unwrap();
    assert_eq!(b.step(), 2);
    assert_eq!(a.weights_digest().unwrap(), b.weights_digest().unwrap());
    // No moments came across: the next step differs from the exporter's.
    train_steps(&mut a, 1, 6);
    train_steps(&mut b, 1, 6);
    assert_ne!(a.weights_digest().unwrap(), b.weights_digest().unwrap());
    // Each import refuses the other kind, leaving the shard as it was.
    let before = b.weights_digest().unwrap();
    let err = b.import_state(&weights).unwrap_err().to_string();
    assert!(err.contains("weights-only"), "{err}");
    let err = b.import_weights(&full).unwrap_err().to_string();
    assert!(err.contains("full"), "{err}");
    assert_eq!(b.weights_digest().unwrap(), before);
}

fn state_with(tensors: Vec<(String, Vec<usize>, Vec<f32>)>, meta: &[(&str, &str)]) -> Vec<u8> {
    let bufs: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, s, v)| (n, s, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views: Vec<_> = bufs
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    let meta: HashMap<String, String> = meta
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    safetensors::serialize(views, Some(meta)).unwrap()
}

#[test]
fn state_import_rejects_malformed_bytes() {
    let c = cfg();
    let stage = [Piece::Stage {
        index: 0,
        layers: 1..2,
    }];
    let mut s = Shard::new(&c, &stage, 1, DType::F32, &Device::Cpu).unwrap();
    let digest = s.weights_digest().unwrap();
    let good = s.export_state().unwrap();
    let valid: Vec<(String, Vec<usize>, Vec<f32>)> = {
        let mut v = vec![];
        for (n, shape) in s.parameter_names() {
            let len: usize = shape.iter().product();
            v.push((n.clone(), shape.clone(), vec![0.5; len]));
            v.push((
                format!("optimizer.exp_avg.{n}"),
                shape.clone(),
                vec![0.0; len],
            ));
            v.push((
                format!("optimizer.exp_avg_sq.{n}"),
                shape.clone(),
                vec![0.0; len],
            ));
        }
        v
    };
    let meta = [("format", swarm_model::shard::STATE_FORMAT), ("step", "4")];
    // The hand-built valid state is accepted (so the rejections below are for the stated reason).
    let mut probe = Shard::new(&c, &stage, 1, DType::F32, &Device::Cpu).unwrap();
    probe
        .import_state(&state_with(valid.clone(), &meta))
        .unwrap();
    assert_eq!(probe.step(), 4);

    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("garbage", b"hello world, not safetensors".to_vec()),
        ("truncated", good[..good.len() - 3].to_vec()),
        (
            "huge header length",
            [u64::MAX.to_le_bytes().to_vec(), good[8..].to_vec()].concat(),
        ),
        ("no format", state_with(valid.clone(), &[("step", "4")])),
        (
            "bad step",
            state_with(valid.clone(), &[("format", meta[0].1), ("step", "-1")]),
        ),
    ];
    let mut missing = valid.clone();
    missing.pop();
    cases.push(("missing tensor", state_with(missing, &meta)));
    let mut extra = valid.clone();
    extra.push(("model.layers.0.extra".into(), vec![1], vec![0.0]));
    cases.push(("extra tensor", state_with(extra, &meta)));
    let mut renamed = valid.clone();
    renamed[0].0 = "model.layers.0.input_layernorm.weight".into();
    cases.push(("wrong layer", state_with(renamed, &meta)));
    let mut reshaped = valid.clone();
    let n = reshaped[3].2.len();
    reshaped[3].1 = vec![n];
    cases.push(("wrong shape", state_with(reshaped, &meta)));
    let mut nan = valid.clone();
    nan[1].2[3] = f32::NAN;
    cases.push(("nan weight", state_with(nan, &meta)));
    let mut neg = valid.clone();
    neg[2].2[0] = -1.0;
    cases.push(("negative second moment", state_with(neg, &meta)));
    for (what, bytes) in cases {
        assert!(s.import_state(&bytes).is_err(), "{what} was accepted");
        assert_eq!(
            s.weights_digest().unwrap(),
            digest,
            "{what} changed the shard"
        );
    }
    // Random corruption of a valid state: errors or a consistent import, never a panic.
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for _ in 0..300 {
        let mut b = good.clone();
        for _ in 0..rng.random_range(1..4) {
            let i = rng.random_range(0..b.len().min(400));
            b[i] = rng.random();
        }
        let _ = s.import_state(&b);
    }
}
