//! The hand-written decoder layers (forward and backward, `model/src/layer.rs`) against the same
//! layers composed from candle-nn's reference ops (`rms_norm_slow`, `rope_slow`, masked
//! `softmax`, `silu`, candle-transformers' `repeat_kv`) and differentiated by candle's autograd,
//! in f64. Independent of the finite-difference checks in `gradcheck.rs`.

use std::collections::HashMap;

use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::ops::{rms_norm_slow, silu, softmax};
use candle_nn::rotary_emb::rope_slow;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use swarm_model::{ModelConfig, Piece, Shard};

fn cfg(kv_heads: usize) -> ModelConfig {
    ModelConfig {
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: Some(kv_heads),
        vocab_size: 11,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        max_position_embeddings: 80,
        tie_word_embeddings: false,
        subspace_rank: 0,
        subspace_seed: 0,
    }
}

const B: usize = 2;
/// Three of the attention's causal blocks of 32 positions, the last one partial.
const T: usize = 70;

fn random(rng: &mut ChaCha8Rng, shape: &[usize], base: f64) -> Tensor {
    let n = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| base + rng.random_range(-0.6..0.6)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// HF Llama's decoder layer from candle-nn's composed ops, `x` of shape `(b, t, h)`.
fn reference_layer(c: &ModelConfig, w: &HashMap<String, Var>, l: usize, x: &Tensor) -> Tensor {
    let (b, t, h) = x.dims3().unwrap();
    let (nh, nkv, hd) = (c.num_attention_heads, c.num_kv_heads(), c.head_dim());
    let p = |s: &str| {
        w[&format!("model.layers.{l}.{s}.weight")]
            .as_tensor()
            .clone()
    };
    let lin = |x: &Tensor, s: &str| x.broadcast_matmul(&p(s).t().unwrap()).unwrap();
    let eps = c.rms_norm_eps as f32;
    let half = hd / 2;
    let (mut cos, mut sin) = (vec![], vec![]);
    for pos in 0..t {
        for i in 0..half {
            let a = pos as f64 / c.rope_theta.powf((2 * i) as f64 / hd as f64);
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    let cos = Tensor::from_vec(cos, (t, half), &Device::Cpu).unwrap();
    let sin = Tensor::from_vec(sin, (t, half), &Device::Cpu).unwrap();
    let heads = |y: Tensor, n: usize| {
        y.reshape((b, t, n, hd))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
    };

    let xn = rms_norm_slow(x, &p("input_layernorm"), eps).unwrap();
    let q = rope_slow(&heads(lin(&xn, "self_attn.q_proj"), nh), &cos, &sin).unwrap();
    let k = rope_slow(&heads(lin(&xn, "self_attn.k_proj"), nkv), &cos, &sin).unwrap();
    let v = heads(lin(&xn, "self_attn.v_proj"), nkv);
    let k = candle_transformers::utils::repeat_kv(k, nh / nkv).unwrap();
    let v = candle_transformers::utils::repeat_kv(v, nh / nkv).unwrap();
    let mask: Vec<f64> = (0..t * t)
        .map(|i| {
            if i % t > i / t {
                f64::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu).unwrap();
    let scores = (q.matmul(&k.t().unwrap()).unwrap() / (hd as f64).sqrt()).unwrap();
    let probs = softmax(&scores.broadcast_add(&mask).unwrap(), D::Minus1).unwrap();
    let y = probs
        .matmul(&v)
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((b, t, h))
        .unwrap();
    let x = (x + lin(&y, "self_attn.o_proj")).unwrap();
    let xn = rms_norm_slow(&x, &p("post_attention_layernorm"), eps).unwrap();
    let act = (silu(&lin(&xn, "mlp.gate_proj")).unwrap() * lin(&xn, "mlp.up_proj")).unwrap();
    (x + lin(&act, "mlp.down_proj")).unwrap()
}

fn max_rel_diff(a: &[f64], b: &[f64]) -> f64 {
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-12);
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn check(kv_heads: usize, seed: u64) {
    let c = cfg(kv_heads);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let piece = Piece::Stage {
        index: 0,
        layers: 0..2,
    };
    let names = piece.parameters(&c);
    let mut tensors = HashMap::new();
    for (name, shape) in &names {
        let base = if name.ends_with("norm.weight") {
            1.0
        } else {
            0.0
        };
        tensors.insert(name.clone(), random(&mut rng, shape, base));
    }
    let h = c.hidden_size;
    let x = random(&mut rng, &[B, T, h], 0.0);
    let r = random(&mut rng, &[B, T, h], 0.0);

    // Reference: composed ops, candle autograd.
    let vars: HashMap<String, Var> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), Var::from_tensor(t).unwrap()))
        .collect();
    let xv = Var::from_tensor(&x).unwrap();
    let mut y = xv.as_tensor().clone();
    for l in 0..2 {
        y = reference_layer(&c, &vars, l, &y);
    }
    let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();

    // Ours.
    let mut shard = Shard::from_tensors(
        &c,
        std::slice::from_ref(&piece),
        &tensors,
        DType::F64,
        &Device::Cpu,
    )
    .unwrap();
    let (ours, ctx) = shard.stage_forward(0, &x).unwrap();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let d = max_rel_diff(&flat(&ours), &flat(&y));
    assert!(d < 1e-6, "forward differs from candle-nn by {d:e}");
    let dx = shard.backward(ctx, &r).unwrap().unwrap();
    let want = flat(grads.get(xv.as_tensor()).unwrap());
    let d = max_rel_diff(&flat(&dx), &want);
    assert!(d < 1e-6, "input gradient differs by {d:e}");
    // Parameter gradients come back as f32 (`grads_flat`): compare at f32 precision.
    let got = shard.grads_flat().unwrap();
    let mut off = 0;
    for (name, shape) in &names {
        let n: usize = shape.iter().product();
        let ours: Vec<f64> = got[off..off + n].iter().map(|&v| v as f64).collect();
        let want = flat(grads.get(vars[name].as_tensor()).unwrap());
        let d = max_rel_diff(&ours, &want);
        assert!(d < 1e-5, "{name}: gradient differs by {d:e}");
        off += n;
    }
}

#[test]
fn layers_match_candle_nn_multi_head() {
    check(4, 1);
}

#[test]
fn layers_match_candle_nn_grouped_query() {
    check(2, 2);
    check(1, 3);
}
