//! Finite-difference checks of every piece's VJP backward (in f64), with and without grouped-query
//! attention and tied embeddings, and the piece-vs-whole equivalence.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use swarm_model::{ModelConfig, Piece, Shard};

fn cfg(kv_heads: usize, tied: bool) -> ModelConfig {
    ModelConfig {
        hidden_size: 8,
        intermediate_size: 12,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: Some(kv_heads),
        vocab_size: 11,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        max_position_embeddings: 16,
        tie_word_embeddings: tied,
        subspace_rank: 0,
        subspace_seed: 0,
    }
}

/// Weights far from the tiny default init so that every nonlinearity is exercised.
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

fn random_vec(rng: &mut ChaCha8Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

fn tokens(rng: &mut ChaCha8Rng, n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|_| rng.random_range(0..vocab as u32)).collect()
}

const B: usize = 2;
const T: usize = 5;

/// Scalar objective of one piece: loss for the head, <output, r> for the others.
fn objective(
    cfg: &ModelConfig,
    piece: &Piece,
    tensors: &HashMap<String, Tensor>,
    x: &Tensor,
    toks: &[u32],
    r: &Tensor,
) -> f64 {
    let pieces = match (piece, cfg.tie_word_embeddings) {
        (Piece::Head, true) | (Piece::Embedding, true) => vec![Piece::Embedding, Piece::Head],
        _ => vec![piece.clone()],
    };
    let shard = Shard::from_tensors(cfg, &pieces, tensors, DType::F64, &Device::Cpu).unwrap();
    match piece {
        Piece::Embedding => {
            let (y, _) = shard.embed_forward(toks, B, T).unwrap();
            (y * r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        }
        Piece::Stage { index, .. } => {
            let (y, _) = shard.stage_forward(*index, x).unwrap();
            (y * r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        }
        Piece::Head => shard.head_forward(x, toks).unwrap().0,
    }
}

fn close(analytic: f64, numeric: f64, what: &str) {
    let err = (analytic - numeric).abs();
    assert!(
        err <= 1e-7 + 1e-5 * numeric.abs(),
        "{what}: analytic {analytic:e} vs finite difference {numeric:e}"
    );
}

/// Checks input and parameter gradients of `piece` against central differences.
fn check_piece(cfg: &ModelConfig, piece: Piece, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let tensors = random_tensors(cfg, seed);
    let h = cfg.hidden_size;
    let dev = Device::Cpu;
    let x = Tensor::from_vec(random_vec(&mut rng, B * T * h), (B, T, h), &dev).unwrap();
    let r = Tensor::from_vec(random_vec(&mut rng, B * T * h), (B, T, h), &dev).unwrap();
    let toks = tokens(&mut rng, B * T, cfg.vocab_size);

    // Analytic gradients.
    let pieces = match (&piece, cfg.tie_word_embeddings) {
        (Piece::Head, true) | (Piece::Embedding, true) => vec![Piece::Embedding, Piece::Head],
        _ => vec![piece.clone()],
    };
    let mut shard = Shard::from_tensors(cfg, &pieces, &tensors, DType::F64, &dev).unwrap();
    let scale = 0.7; // a loss scale other than 1 must scale every gradient
    let input_grad = match &piece {
        Piece::Embedding => {
            let (_, ctx) = shard.embed_forward(&toks, B, T).unwrap();
            assert!(shard.backward(ctx, &r).unwrap().is_none());
            None
        }
        Piece::Stage { index, .. } => {
            let (_, ctx) = shard.stage_forward(*index, &x).unwrap();
            Some(shard.backward(ctx, &r).unwrap().unwrap())
        }
        Piece::Head => {
            let (_, ctx) = shard.head_forward(&x, &toks).unwrap();
            Some((shard.head_backward(ctx, scale).unwrap() / scale).unwrap())
        }
    };
    let flat = shard.grads_flat().unwrap();
    let loss_scale = if piece == Piece::Head { scale } else { 1.0 };

    let eps = 1e-5;
    let f = |t: &HashMap<String, Tensor>, x: &Tensor| objective(cfg, &piece, t, x, &toks, &r);

    if let Some(g) = input_grad {
        let g = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let xv = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for i in (0..xv.len()).step_by(3) {
            let mut plus = xv.clone();
            plus[i] += eps;
            let mut minus = xv.clone();
            minus[i] -= eps;
            let fp = f(&tensors, &Tensor::from_vec(plus, (B, T, h), &dev).unwrap());
            let fm = f(&tensors, &Tensor::from_vec(minus, (B, T, h), &dev).unwrap());
            close(
                g[i],
                (fp - fm) / (2.0 * eps),
                &format!("{piece:?} input[{i}]"),
            );
        }
    }

    let mut off = 0;
    for (name, shape) in shard.parameter_names() {
        let n: usize = shape.iter().product();
        let base = tensors[&name]
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        // A handful of entries per tensor, spread over it.
        for i in (0..n).step_by((n / 7).max(1)) {
            let mut t = tensors.clone();
            let mut plus = base.clone();
            plus[i] += eps;
            t.insert(
                name.clone(),
                Tensor::from_vec(plus, shape.clone(), &dev).unwrap(),
            );
            let fp = f(&t, &x);
            let mut minus = base.clone();
            minus[i] -= eps;
            t.insert(
                name.clone(),
                Tensor::from_vec(minus, shape.clone(), &dev).unwrap(),
            );
            let fm = f(&t, &x);
            let analytic = flat[off + i] as f64 / loss_scale;
            // flat grads are f32: compare at f32 precision.
            let numeric = (fp - fm) / (2.0 * eps);
            let err = (analytic - numeric).abs();
            assert!(
                err <= 1e-6 + 1e-5 * numeric.abs(),
                "{piece:?} {name}[{i}]: analytic {analytic:e} vs finite difference {numeric:e}"
            );
        }
        off += n;
    }
    assert_eq!(off, flat.len());
}

fn all_kinds(kv_heads: usize, tied: bool) {
    let c = cfg(kv_heads, tied);
    if !tied {
        check_piece(&c, Piece::Embedding, 1);
    }
    check_piece(
        &c,
        Piece::Stage {
            index: 0,
            layers: 0..2,
        },
        2,
    );
    check_piece(
        &c,
        Piece::Stage {
            index: 1,
            layers: 1..2,
        },
        3,
    );
    check_piece(&c, Piece::Head, 4);
}

#[test]
fn gradcheck_multi_head_untied() {
    all_kinds(4, false);
}

#[test]
fn gradcheck_grouped_query_untied() {
    all_kinds(2, false);
}

#[test]
fn gradcheck_grouped_query_tied() {
    all_kinds(1, true);
}

/// With tied embeddings the shared weight's gradient is the sum of the embedding's and the head's
/// contributions: check it against finite differences of the whole model's loss.
#[test]
fn gradcheck_tied_whole_model() {
    let c = cfg(2, true);
    let tensors = random_tensors(&c, 9);
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let inputs = tokens(&mut rng, B * T, c.vocab_size);
    let targets = tokens(&mut rng, B * T, c.vocab_size);
    let pieces = Piece::all(&[0, 2]);
    let loss = |t: &HashMap<String, Tensor>| {
        let s = Shard::from_tensors(&c, &pieces, t, DType::F64, &Device::Cpu).unwrap();
        let (x, _) = s.embed_forward(&inputs, B, T).unwrap();
        let (x, _) = s.stage_forward(0, &x).unwrap();
        s.head_forward(&x, &targets).unwrap().0
    };
    let mut s = Shard::from_tensors(&c, &pieces, &tensors, DType::F64, &Device::Cpu).unwrap();
    let (x, e) = s.embed_forward(&inputs, B, T).unwrap();
    let (x, st) = s.stage_forward(0, &x).unwrap();
    let (_, hc) = s.head_forward(&x, &targets).unwrap();
    let g = s.head_backward(hc, 1.0).unwrap();
    let g = s.backward(st, &g).unwrap().unwrap();
    assert!(s.backward(e, &g).unwrap().is_none());
    let flat = s.grads_flat().unwrap();
    let name = "model.embed_tokens.weight";
    assert_eq!(s.parameter_names()[0].0, name);
    let base = tensors[name]
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let eps = 1e-5;
    for i in (0..base.len()).step_by(5) {
        let mut t = tensors.clone();
        let mut v = base.clone();
        v[i] += eps;
        t.insert(
            name.into(),
            Tensor::from_vec(v.clone(), (c.vocab_size, 8), &Device::Cpu).unwrap(),
        );
        let fp = loss(&t);
        v[i] -= 2.0 * eps;
        t.insert(
            name.into(),
            Tensor::from_vec(v, (c.vocab_size, 8), &Device::Cpu).unwrap(),
        );
        let fm = loss(&t);
        let numeric = (fp - fm) / (2.0 * eps);
        let err = (flat[i] as f64 - numeric).abs();
        assert!(
            err <= 1e-6 + 1e-5 * numeric.abs(),
            "{name}[{i}]: {} vs {numeric}",
            flat[i]
        );
    }
}

/// Runs one micro-batch through `shards` (the first holds embedding + head; stage `k` is in shard
/// `stage_shard[k]`) and returns the loss and every parameter's gradient by name.
fn run_split(
    shards: &mut [Shard],
    stage_shard: &[usize],
    inputs: &[u32],
    targets: &[u32],
) -> (f64, HashMap<String, Vec<f32>>) {
    let (mut x, ectx) = shards[0].embed_forward(inputs, B, T).unwrap();
    let mut ctxs = vec![];
    for (stage, &si) in stage_shard.iter().enumerate() {
        let (y, c) = shards[si].stage_forward(stage, &x).unwrap();
        ctxs.push(c);
        x = y;
    }
    let (loss, hctx) = shards[0].head_forward(&x, targets).unwrap();
    let mut g = shards[0].head_backward(hctx, 0.5).unwrap();
    for (stage, c) in ctxs.into_iter().enumerate().rev() {
        g = shards[stage_shard[stage]].backward(c, &g).unwrap().unwrap();
    }
    shards[0].backward(ectx, &g).unwrap();
    let mut grads = HashMap::new();
    for s in shards.iter() {
        let flat = s.grads_flat().unwrap();
        let mut off = 0;
        for (name, shape) in s.parameter_names() {
            let n: usize = shape.iter().product();
            grads.insert(name, flat[off..off + n].to_vec());
            off += n;
        }
    }
    (loss, grads)
}

#[test]
fn pieces_match_whole_model() {
    for (kv, tied) in [(4, false), (2, true)] {
        let mut c = cfg(kv, tied);
        c.num_hidden_layers = 3;
        let dev = Device::Cpu;
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let inputs = tokens(&mut rng, B * T, c.vocab_size);
        let targets = tokens(&mut rng, B * T, c.vocab_size);
        let seed = 42;
        // The whole model in one shard, one stage.
        let mut whole = vec![Shard::new(&c, &Piece::all(&[0, 3]), seed, DType::F32, &dev).unwrap()];
        let (lw, gw) = run_split(&mut whole, &[0], &inputs, &targets);
        // Ends + two stage shards, built independently from the same seed.
        let mut split = vec![
            Shard::new(&c, &[Piece::Embedding, Piece::Head], seed, DType::F32, &dev).unwrap(),
            Shard::new(
                &c,
                &[Piece::Stage {
                    index: 0,
                    layers: 0..1,
                }],
                seed,
                DType::F32,
                &dev,
            )
            .unwrap(),
            Shard::new(
                &c,
                &[Piece::Stage {
                    index: 1,
                    layers: 1..3,
                }],
                seed,
                DType::F32,
                &dev,
            )
            .unwrap(),
        ];
        let (ls, gs) = run_split(&mut split, &[1, 2], &inputs, &targets);
        assert_eq!(lw, ls, "loss");
        assert_eq!(gw.len(), gs.len());
        for (name, g) in &gw {
            assert_eq!(g, &gs[name], "{name}");
            assert!(g.iter().any(|&v| v != 0.0), "{name} has a zero gradient");
        }
        // Same weights for the same names.
        let tw = whole[0].tensors();
        for s in &split {
            for (name, t) in s.tensors() {
                let a = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let b = tw[&name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(a, b, "{name}");
            }
        }
    }
}

#[test]
fn stale_context_is_rejected() {
    let c = cfg(2, false);
    let dev = Device::Cpu;
    let mut s = Shard::new(
        &c,
        &[Piece::Stage {
            index: 0,
            layers: 0..2,
        }],
        1,
        DType::F32,
        &dev,
    )
    .unwrap();
    let x = Tensor::zeros((1, 3, 8), DType::F32, &dev).unwrap();
    let (y, ctx) = s.stage_forward(0, &x).unwrap();
    s.optimizer_step(&Default::default(), 1e-3, 1.0).unwrap();
    assert!(matches!(
        s.backward(ctx, &y.ones_like().unwrap()),
        Err(swarm_model::Error::StaleContext)
    ));
}

#[test]
fn rejects_bad_inputs_and_pieces() {
    let c = cfg(2, true);
    let dev = Device::Cpu;
    // Tied head without its embedding.
    assert!(Shard::new(&c, &[Piece::Head], 1, DType::F32, &dev).is_err());
    // Overlapping stages, out-of-range stage.
    let st = |i, a, b| Piece::Stage {
        index: i,
        layers: a..b,
    };
    assert!(Shard::new(&c, &[st(0, 0, 2), st(1, 1, 2)], 1, DType::F32, &dev).is_err());
    assert!(Shard::new(&c, &[st(0, 0, 3)], 1, DType::F32, &dev).is_err());
    let s = Shard::new(&c, &Piece::all(&[0, 2]), 1, DType::F32, &dev).unwrap();
    // Token out of vocabulary, wrong count, too long.
    assert!(s.embed_forward(&[11, 0], 1, 2).is_err());
    assert!(s.embed_forward(&[1, 0, 3], 1, 2).is_err());
    assert!(s.embed_forward(&[0; 17], 1, 17).is_err());
    // Wrong hidden size, wrong dtype, missing stage.
    let x = Tensor::zeros((1, 2, 7), DType::F32, &dev).unwrap();
    assert!(s.stage_forward(0, &x).is_err());
    let x = Tensor::zeros((1, 2, 8), DType::F64, &dev).unwrap();
    assert!(s.stage_forward(0, &x).is_err());
    let x = Tensor::zeros((1, 2, 8), DType::F32, &dev).unwrap();
    assert!(s.stage_forward(1, &x).is_err());
    assert!(s.head_forward(&x, &[0, 11]).is_err());
}
