//! `Shard::backward_input_only`: the input gradient of a stage without accumulating parameter
//! gradients (a swarm stage uses it for retried micro-batches it already counted).

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use swarm_model::{ModelConfig, Piece, Shard};

fn cfg() -> ModelConfig {
    ModelConfig {
        hidden_size: 8,
        intermediate_size: 12,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        vocab_size: 11,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        max_position_embeddings: 16,
        tie_word_embeddings: false,
        subspace_rank: 0,
        subspace_seed: 0,
    }
}

fn random(rng: &mut ChaCha8Rng, shape: (usize, usize, usize), dtype: DType) -> Tensor {
    let n = shape.0 * shape.1 * shape.2;
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

#[test]
fn input_gradient_matches_backward_bitwise_and_grads_stay_untouched() {
    let cfg = cfg();
    let pieces = Piece::stages(&[0, 1, 2]);
    let mut shard = Shard::new(&cfg, &pieces[1..], 7, DType::F32, &Device::Cpu).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let x = random(&mut rng, (2, 5, 8), DType::F32);
    let g = random(&mut rng, (2, 5, 8), DType::F32);

    let (_, ctx_a) = shard.stage_forward(1, &x).unwrap();
    let (_, ctx_b) = shard.stage_forward(1, &x).unwrap();
    let only = shard.backward_input_only(ctx_a, &g).unwrap().unwrap();
    // Nothing accumulated.
    assert!(shard.grads_flat().unwrap().iter().all(|v| *v == 0.0));
    assert_eq!(shard.grad_sq_norm().unwrap(), 0.0);

    let full = shard.backward(ctx_b, &g).unwrap().unwrap();
    let a = only.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = full.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a.len(), 2 * 5 * 8);
    assert!(a.iter().any(|v| *v != 0.0));
    assert!(
        a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()),
        "input gradients differ"
    );
    assert!(shard.grad_sq_norm().unwrap() > 0.0);
}

#[test]
fn input_gradient_matches_finite_differences() {
    // Independent check in f64: d<stage(x), g>/dx_i by central differences.
    let cfg = cfg();
    let pieces = Piece::stages(&[0, 2]);
    let shard = Shard::new(&cfg, &pieces, 3, DType::F64, &Device::Cpu).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let x = random(&mut rng, (1, 4, 8), DType::F64);
    let g = random(&mut rng, (1, 4, 8), DType::F64);
    let (_, ctx) = shard.stage_forward(0, &x).unwrap();
    let dx = shard
        .backward_input_only(ctx, &g)
        .unwrap()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let xs = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let objective = |v: &[f64]| -> f64 {
        let t = Tensor::from_slice(v, (1, 4, 8), &Device::Cpu).unwrap();
        let (y, _) = shard.stage_forward(0, &t).unwrap();
        (y * &g)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let h = 1e-5;
    for i in (0..xs.len()).step_by(3) {
        let mut p = xs.clone();
        p[i] += h;
        let mut m = xs.clone();
        m[i] -= h;
        let fd = (objective(&p) - objective(&m)) / (2.0 * h);
        assert!(
            (fd - dx[i]).abs() <= 1e-6 * (1.0 + fd.abs()),
            "x[{i}]: finite difference {fd}, backward_input_only {}",
            dx[i]
        );
    }
}

#[test]
fn head_contexts_and_wrong_shapes_are_refused() {
    let cfg = cfg();
    let mut pieces = vec![Piece::Embedding, Piece::Head];
    pieces.extend(Piece::stages(&[0, 2]));
    let shard = Shard::new(&cfg, &pieces, 3, DType::F32, &Device::Cpu).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let x = random(&mut rng, (1, 4, 8), DType::F32);
    let (_, head_ctx) = shard.head_forward(&x, &[1, 2, 3, 4]).unwrap();
    assert!(shard.backward_input_only(head_ctx, &x).is_err());
    let (_, ctx) = shard.stage_forward(0, &x).unwrap();
    let wrong = random(&mut rng, (1, 3, 8), DType::F32);
    assert!(shard.backward_input_only(ctx, &wrong).is_err());
    // The embedding's input is tokens: no gradient.
    let (y, ctx) = shard.embed_forward(&[1, 2, 3, 4], 1, 4).unwrap();
    assert!(shard.backward_input_only(ctx, &y).unwrap().is_none());
}
