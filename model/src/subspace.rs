//! Subspace networks (issue #13; Pluralis' protocol models, arXiv 2506.01260, after
//! `train_gpt_ssn.py` of PluralisResearch/ProtocolNanoGPT): every write into the residual stream
//! goes through one seed-derived orthonormal `U` (hidden x k), so that at every stage boundary
//! the hidden state is `E_fix[tok] + U·c` and a stage can send `c` (k values per token) and the
//! token ids instead of `hidden` values, exactly.
//!
//! Reparametrized, so the constraint holds under AdamW without re-projecting: the trainable
//! parameters are `A_o` (k x hidden), `A_down` (k x intermediate) and `A_emb` (vocab x k); the
//! layers run on `o_proj = U·A_o`, `down_proj = U·A_down`, and the embedding is
//! `E_fix + A_emb·Uᵀ` with `E_fix` a fixed seed-derived token table. Their gradients are
//! `Uᵀ·grad(W)` (and `grad(E)·U`).
//!
//! The gradient sent back over a boundary is exactly `Uᵀ·g`: every parameter upstream of the
//! boundary reaches it only through `c` (the hidden state is `E_fix[tok] + U·c(θ)`), so its
//! gradient is `(∂c/∂θ)ᵀ·Uᵀ·g`, and the receiver may continue with `U·Uᵀ·g` in place of `g`
//! (the part of `g` orthogonal to `U` changes no parameter gradient and no `Uᵀ·g` further up;
//! `model/tests/subspace.rs` checks both).
//!
//! Checkpoints stay plain HF Llama: [`materialize`] turns the parameters into ordinary
//! `o_proj`, `down_proj` and `embed_tokens` matrices; [`from_materialized`] goes back (exact up to
//! rounding) to resume.

use std::borrow::Cow;
use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, Normal};

use crate::{Error, ModelConfig, Result};

/// Standard deviation of the fixed token table: the standard model's embedding init, so that a
/// subspace model starts from the same scale of inputs.
pub const E_FIX_STD: f64 = 0.02;

/// The fixed part of a subspace model: `U` and the token table, both functions of
/// (`subspace_seed`, shape) alone, so every peer derives the same ones.
#[derive(Debug)]
pub struct Subspace {
    rank: usize,
    hidden: usize,
    vocab: usize,
    seed: u64,
    /// `U`, hidden x rank, row-major, orthonormal columns (f64 and the f32 cast).
    u64: Tensor,
    u32: Tensor,
}

/// The parameter name that replaces HF name `hf` in a subspace model, if it is replaced.
pub fn param_name(hf: &str) -> Option<String> {
    let stem = hf.strip_suffix(".weight")?;
    (stem.ends_with("self_attn.o_proj")
        || stem.ends_with("mlp.down_proj")
        || stem == "model.embed_tokens")
        .then(|| format!("{stem}.subspace"))
}

/// The HF name a subspace parameter materializes into.
pub fn hf_name(param: &str) -> Option<String> {
    param
        .strip_suffix(".subspace")
        .map(|stem| format!("{stem}.weight"))
}

/// Init std of `A_o` and `A_down`: the standard residual projection's (0.02 / sqrt(2·layers))
/// times sqrt(hidden / k), so that U·A writes as much into the residual as the standard matrix
/// would (|U·A·x| = |A·x|).
pub(crate) fn init_std(cfg: &ModelConfig) -> f64 {
    0.02 * (cfg.hidden_size as f64 / cfg.subspace_rank as f64).sqrt()
        / (2.0 * cfg.num_hidden_layers as f64).sqrt()
}

/// A piece's parameter list with the subspace parameters in place of the HF matrices they
/// replace (unchanged when `subspace_rank` is 0).
pub(crate) fn reparametrize(
    cfg: &ModelConfig,
    mut v: Vec<(String, Vec<usize>)>,
) -> Vec<(String, Vec<usize>)> {
    let k = cfg.subspace_rank;
    if k == 0 {
        return v;
    }
    for (name, shape) in &mut v {
        if let Some(p) = param_name(name) {
            if p == "model.embed_tokens.subspace" {
                shape[1] = k; // vocab x k
            } else {
                shape[0] = k; // U·A: A is k x the matrix's input width
            }
            *name = p;
        }
    }
    v
}

impl Subspace {
    /// The subspace of `cfg` (`None` when `subspace_rank` is 0).
    pub fn new(cfg: &ModelConfig) -> Result<Option<Self>> {
        let (k, d) = (cfg.subspace_rank, cfg.hidden_size);
        if k == 0 {
            return Ok(None);
        }
        if k >= d {
            return Err(Error::Config(format!(
                "subspace_rank {k} must be below hidden_size {d}"
            )));
        }
        let u = orthonormal(d, k, cfg.subspace_seed);
        let u64 = Tensor::from_vec(u, (d, k), &Device::Cpu)?;
        let u32 = u64.to_dtype(DType::F32)?;
        Ok(Some(Self {
            rank: k,
            hidden: d,
            vocab: cfg.vocab_size,
            seed: cfg.subspace_seed,
            u64,
            u32,
        }))
    }

    /// The rank k.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// `U` (hidden x rank) in `dtype` (F32 or F64).
    pub fn u(&self, dtype: DType) -> &Tensor {
        if dtype == DType::F64 {
            &self.u64
        } else {
            &self.u32
        }
    }

    /// `E_fix[tok]` for each token: `(tokens.len(), hidden)` in `dtype`. Each row is drawn from
    /// ChaCha20 keyed by (seed, token), so no vocab-sized table is held.
    pub fn fixed_rows(&self, tokens: &[u32], dtype: DType) -> Result<Tensor> {
        let d = self.hidden;
        let mut rows: HashMap<u32, Vec<f64>> = HashMap::new();
        let mut out = Vec::with_capacity(tokens.len() * d);
        for &t in tokens {
            if t as usize >= self.vocab {
                return Err(Error::Input(format!(
                    "token {t} >= vocab_size {}",
                    self.vocab
                )));
            }
            let row = rows.entry(t).or_insert_with(|| fixed_row(self.seed, t, d));
            out.extend_from_slice(row);
        }
        Ok(Tensor::from_vec(out, (tokens.len(), d), &Device::Cpu)?.to_dtype(dtype)?)
    }

    /// The whole fixed table, vocab x hidden.
    pub fn fixed_table(&self, dtype: DType) -> Result<Tensor> {
        let all: Vec<u32> = (0..self.vocab as u32).collect();
        self.fixed_rows(&all, dtype)
    }

    /// `U·a` for a parameter `a` (rank x n): the materialized weight (hidden x n).
    pub fn expand(&self, a: &Tensor) -> Result<Tensor> {
        Ok(self.u(a.dtype()).matmul(a)?)
    }

    /// `Uᵀ·g` for a weight gradient `g` (hidden x n): the parameter's gradient (rank x n).
    pub fn reduce(&self, g: &Tensor) -> Result<Tensor> {
        Ok(self.u(g.dtype()).t()?.matmul(g)?)
    }

    /// The coordinates `c = Uᵀ(h - E_fix[tok])` of hidden states `h` `(batch, seq, hidden)`:
    /// `(batch, seq, rank)`, what a stage boundary sends.
    pub fn project(&self, h: &Tensor, tokens: &[u32]) -> Result<Tensor> {
        let (b, t, d) = h.dims3()?;
        self.check(b * t, d, tokens)?;
        let x = (h.reshape((b * t, d))? - self.fixed_rows(tokens, h.dtype())?)?;
        Ok(x.matmul(self.u(h.dtype()))?.reshape((b, t, self.rank))?)
    }

    /// The hidden states `E_fix[tok] + U·c` of coordinates `c` `(batch, seq, rank)`.
    pub fn lift(&self, c: &Tensor, tokens: &[u32]) -> Result<Tensor> {
        let (b, t, k) = c.dims3()?;
        if k != self.rank {
            return Err(Error::Input(format!(
                "coordinates width {k}, expected {}",
                self.rank
            )));
        }
        self.check(b * t, self.hidden, tokens)?;
        let x = c
            .reshape((b * t, k))?
            .matmul(&self.u(c.dtype()).t()?)?
            .add(&self.fixed_rows(tokens, c.dtype())?)?;
        Ok(x.reshape((b, t, self.hidden))?)
    }

    /// `Uᵀ·g` per token of a hidden-state gradient `(batch, seq, hidden)` -> `(batch, seq, rank)`.
    pub fn project_grad(&self, g: &Tensor) -> Result<Tensor> {
        let (b, t, d) = g.dims3()?;
        if d != self.hidden {
            return Err(Error::Input(format!(
                "gradient width {d}, expected {}",
                self.hidden
            )));
        }
        Ok(g.reshape((b * t, d))?
            .matmul(self.u(g.dtype()))?
            .reshape((b, t, self.rank))?)
    }

    /// `U·gc` per token: the hidden-state gradient a receiver continues with.
    pub fn lift_grad(&self, gc: &Tensor) -> Result<Tensor> {
        let (b, t, k) = gc.dims3()?;
        if k != self.rank {
            return Err(Error::Input(format!(
                "coordinates width {k}, expected {}",
                self.rank
            )));
        }
        Ok(gc
            .reshape((b * t, k))?
            .matmul(&self.u(gc.dtype()).t()?)?
            .reshape((b, t, self.hidden))?)
    }

    fn check(&self, n: usize, width: usize, tokens: &[u32]) -> Result<()> {
        if tokens.len() != n || width != self.hidden {
            return Err(Error::Input(format!(
                "{} tokens for {n} positions of width {width} (hidden {}, rank {})",
                tokens.len(),
                self.hidden,
                self.rank
            )));
        }
        Ok(())
    }
}

/// Plain HF Llama tensors from a subspace model's parameters: each `*.subspace` parameter
/// becomes its ordinary matrix (`U·A`, or `E_fix + A_emb·Uᵀ` for the embedding); the others are
/// kept. Without a subspace the tensors are returned unchanged.
pub fn materialize(
    cfg: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>> {
    let Some(sub) = Subspace::new(cfg)? else {
        return Ok(tensors.clone());
    };
    let mut out = HashMap::with_capacity(tensors.len());
    for (name, t) in tensors {
        match hf_name(name) {
            Some(hf) if hf == "model.embed_tokens.weight" => {
                let t64 = t.to_dtype(DType::F64)?;
                let e = (sub.fixed_table(DType::F64)? + t64.matmul(&sub.u64.t()?)?)?;
                out.insert(hf, e.to_dtype(t.dtype())?);
            }
            Some(hf) => {
                let w = sub.expand(&t.to_dtype(DType::F64)?)?;
                out.insert(hf, w.to_dtype(t.dtype())?);
            }
            None => {
                out.insert(name.clone(), t.clone());
            }
        }
    }
    Ok(out)
}

/// The inverse of [`materialize`] for tensors that lack the subspace parameters (a checkpoint):
/// `A = Uᵀ·W`, `A_emb = (E - E_fix)·U`, exact up to rounding when `W` came from `materialize`.
/// Names already present are kept as they are (borrowed when nothing needs deriving).
pub fn from_materialized<'a>(
    cfg: &ModelConfig,
    tensors: &'a HashMap<String, Tensor>,
) -> Result<Cow<'a, HashMap<String, Tensor>>> {
    let Some(sub) = Subspace::new(cfg)? else {
        return Ok(Cow::Borrowed(tensors));
    };
    let missing = tensors
        .keys()
        .any(|n| param_name(n).is_some_and(|p| !tensors.contains_key(&p)));
    if !missing {
        return Ok(Cow::Borrowed(tensors));
    }
    let mut out = tensors.clone();
    for (name, t) in tensors {
        let Some(p) = param_name(name) else { continue };
        if out.contains_key(&p) {
            continue;
        }
        let t64 = t.to_dtype(DType::F64)?;
        let a = if name == "model.embed_tokens.weight" {
            (t64 - sub.fixed_table(DType::F64)?)?.matmul(&sub.u64)?
        } else {
            sub.reduce(&t64)?
        };
        out.insert(p, a.to_dtype(t.dtype())?);
    }
    Ok(Cow::Owned(out))
}

/// `d x k` with orthonormal columns: a Gaussian matrix from ChaCha20 keyed by the seed and the
/// shape, orthonormalized by modified Gram-Schmidt run twice (f64).
fn orthonormal(d: usize, k: usize, seed: u64) -> Vec<f64> {
    let mut h = blake3::Hasher::new();
    h.update(b"swarm-model subspace U v1\0");
    h.update(&seed.to_le_bytes());
    h.update(&(d as u64).to_le_bytes());
    h.update(&(k as u64).to_le_bytes());
    let mut rng = ChaCha20Rng::from_seed(*h.finalize().as_bytes());
    let normal = Normal::new(0.0, 1.0).expect("unit normal");
    // Columns stored contiguously while orthonormalizing.
    let mut cols: Vec<Vec<f64>> = (0..k)
        .map(|_| (0..d).map(|_| normal.sample(&mut rng)).collect())
        .collect();
    for j in 0..k {
        for _pass in 0..2 {
            for i in 0..j {
                let dot: f64 = cols[j].iter().zip(&cols[i]).map(|(a, b)| a * b).sum();
                let (head, tail) = cols.split_at_mut(j);
                for (x, y) in tail[0].iter_mut().zip(&head[i]) {
                    *x -= dot * y;
                }
            }
        }
        let norm = cols[j].iter().map(|x| x * x).sum::<f64>().sqrt();
        for x in &mut cols[j] {
            *x /= norm;
        }
    }
    let mut u = vec![0.0; d * k];
    for (j, c) in cols.iter().enumerate() {
        for (i, &x) in c.iter().enumerate() {
            u[i * k + j] = x;
        }
    }
    u
}

/// Row `tok` of the fixed token table: N(0, [`E_FIX_STD`]) from ChaCha20 keyed by (seed, tok).
fn fixed_row(seed: u64, tok: u32, d: usize) -> Vec<f64> {
    let mut h = blake3::Hasher::new();
    h.update(b"swarm-model subspace E_fix v1\0");
    h.update(&seed.to_le_bytes());
    h.update(&tok.to_le_bytes());
    let mut rng = ChaCha20Rng::from_seed(*h.finalize().as_bytes());
    let normal = Normal::new(0.0, E_FIX_STD).expect("std is positive");
    (0..d).map(|_| normal.sample(&mut rng)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn u_is_orthonormal_and_a_function_of_seed_and_shape() {
        let u = orthonormal(64, 12, 7);
        for a in 0..12 {
            for b in 0..12 {
                let dot: f64 = (0..64).map(|i| u[i * 12 + a] * u[i * 12 + b]).sum();
                let want = if a == b { 1.0 } else { 0.0 };
                assert!((dot - want).abs() < 1e-12, "{a},{b}: {dot}");
            }
        }
        assert_eq!(u, orthonormal(64, 12, 7));
        assert_ne!(u, orthonormal(64, 12, 8));
        assert_eq!(fixed_row(3, 5, 16), fixed_row(3, 5, 16));
        assert_ne!(fixed_row(3, 5, 16), fixed_row(3, 6, 16));
    }

    #[test]
    fn names_map_both_ways() {
        for hf in [
            "model.layers.3.self_attn.o_proj.weight",
            "model.layers.0.mlp.down_proj.weight",
            "model.embed_tokens.weight",
        ] {
            let p = param_name(hf).unwrap();
            assert!(p.ends_with(".subspace"));
            assert_eq!(hf_name(&p).unwrap(), hf);
        }
        assert_eq!(param_name("model.layers.0.mlp.up_proj.weight"), None);
        assert_eq!(param_name("lm_head.weight"), None);
    }
}
