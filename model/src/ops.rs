//! Fused CPU ops with their own backward pass, for the pieces that still run under candle's
//! autograd (the head: RMS normalisation and cross-entropy), the VJP seed, and the RoPE tables.
//! The decoder layers themselves are written by hand in `layer.rs`.
//!
//! candle's fused `rms_norm` has no backward (the gradient silently stops), and the composed
//! version builds a long graph. Every op is checked against candle-nn and finite differences
//! below, in f64.
//!
//! All ops take contiguous f32 or f64 tensors (callers make them contiguous) and run on the CPU.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// The float types the ops run on; f64 exists for tight gradient checks.
pub(crate) trait Real:
    Copy
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::AddAssign
    + std::ops::MulAssign
    + std::ops::SubAssign
    + candle_core::WithDType
{
    fn f(x: f64) -> Self;
    fn exp_(self) -> Self;
    fn ln_(self) -> Self;
    fn storage(v: Vec<Self>) -> CpuStorage;
}

impl Real for f32 {
    fn f(x: f64) -> Self {
        x as f32
    }
    fn exp_(self) -> Self {
        self.exp()
    }
    fn ln_(self) -> Self {
        self.ln()
    }
    fn storage(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F32(v)
    }
}

impl Real for f64 {
    fn f(x: f64) -> Self {
        x
    }
    fn exp_(self) -> Self {
        self.exp()
    }
    fn ln_(self) -> Self {
        self.ln()
    }
    fn storage(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F64(v)
    }
}

/// The contiguous data of an op argument.
fn slice<'a, T: Real>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [T]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: input must be contiguous")))?;
    Ok(&s.as_slice::<T>()?[a..b])
}

/// Runs `$body` with `T` bound to the storage's float type.
macro_rules! dispatch {
    ($s:expr, $op:expr, |$t:ident| $body:expr) => {
        match $s.dtype() {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::F64 => {
                type $t = f64;
                $body
            }
            d => Err(candle_core::Error::Msg(format!(
                "{}: unsupported dtype {d:?}",
                $op
            ))),
        }
    };
}

fn last_dim(l: &Layout, op: &str) -> Result<usize> {
    match l.dims().last() {
        Some(&d) if d > 0 => Ok(d),
        _ => Err(candle_core::Error::Msg(format!(
            "{op}: needs a non-empty last dim"
        ))),
    }
}

// ---------------------------------------------------------------------------------------------
// RMS normalisation (without the weight, which the caller multiplies in so candle tracks it).

/// `x / sqrt(mean(x^2) + eps)` over the last dim.
pub fn rms_normalize(x: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op1(RmsNormalize { eps })
}

struct RmsNormalize {
    eps: f64,
}

fn rms_fwd<T: Real>(x: &[T], d: usize, eps: f64) -> Vec<T> {
    let mut y = Vec::with_capacity(x.len());
    for row in x.chunks_exact(d) {
        let mut ss = 0f64;
        for &v in row {
            let v = v.to_f64();
            ss += v * v;
        }
        let r = T::f(1.0 / (ss / d as f64 + eps).sqrt());
        y.extend(row.iter().map(|&v| v * r));
    }
    y
}

impl CustomOp1 for RmsNormalize {
    fn name(&self) -> &'static str {
        "rms-normalize"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = last_dim(l, self.name())?;
        let out = dispatch!(s, self.name(), |T| Ok(T::storage(rms_fwd::<T>(
            slice(s, l, self.name())?,
            d,
            self.eps
        ))))?;
        Ok((out, l.shape().clone()))
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = grad.contiguous()?;
        Ok(Some(arg.apply_op2_no_bwd(
            &g,
            &RmsNormalizeBwd { eps: self.eps },
        )?))
    }
}

/// dx = r * (g - xhat * mean(g * xhat)), with r = 1/rms(x) and xhat = x * r.
struct RmsNormalizeBwd {
    eps: f64,
}

fn rms_bwd<T: Real>(x: &[T], g: &[T], d: usize, eps: f64) -> Vec<T> {
    let mut dx = Vec::with_capacity(x.len());
    for (xr, gr) in x.chunks_exact(d).zip(g.chunks_exact(d)) {
        let mut ss = 0f64;
        let mut gx = 0f64;
        for (&xv, &gv) in xr.iter().zip(gr) {
            ss += xv.to_f64() * xv.to_f64();
            gx += xv.to_f64() * gv.to_f64();
        }
        let r = 1.0 / (ss / d as f64 + eps).sqrt();
        // mean(g * xhat) * r = r^2 * mean(g * x)
        let c = T::f(r * r * gx / d as f64);
        let r = T::f(r);
        dx.extend(xr.iter().zip(gr).map(|(&xv, &gv)| r * (gv - xv * c)));
    }
    dx
}

impl CustomOp2 for RmsNormalizeBwd {
    fn name(&self) -> &'static str {
        "rms-normalize-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = last_dim(l1, self.name())?;
        let out = dispatch!(s1, self.name(), |T| Ok(T::storage(rms_bwd::<T>(
            slice(s1, l1, self.name())?,
            slice(s2, l2, self.name())?,
            d,
            self.eps
        ))))?;
        Ok((out, l1.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// Rotary position embedding, HF "rotate halves" convention.

/// cos/sin tables for positions `0..seq_len`, each `seq_len x head_dim/2`, built in f64.
#[derive(Debug, Clone)]
pub struct RopeTables {
    head_dim: usize,
    max_len: usize,
    cos: Arc<Vec<f64>>,
    sin: Arc<Vec<f64>>,
}

impl RopeTables {
    /// Frequencies `theta^(-2i/head_dim)` as in HF Llama (`rope_theta`).
    pub fn new(head_dim: usize, max_len: usize, theta: f64) -> Self {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(max_len * half);
        let mut sin = Vec::with_capacity(max_len * half);
        for p in 0..max_len {
            for i in 0..half {
                let inv_freq = 1.0 / theta.powf((2 * i) as f64 / head_dim as f64);
                let a = p as f64 * inv_freq;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Self {
            head_dim,
            max_len,
            cos: Arc::new(cos),
            sin: Arc::new(sin),
        }
    }

    /// The cos and sin rows of positions `0..seq_len` (`seq_len x head_dim/2` each).
    pub(crate) fn rows(&self, seq_len: usize) -> (&[f64], &[f64]) {
        let n = seq_len.min(self.max_len) * (self.head_dim / 2);
        (&self.cos[..n], &self.sin[..n])
    }
}

// ---------------------------------------------------------------------------------------------
// Mean cross-entropy of logits against targets.

/// Mean over rows of `logsumexp(logits[r]) - logits[r][targets[r]]`; `logits` is `(n, vocab)`.
/// Targets must be `< vocab` (checked; an error, not a panic).
pub fn cross_entropy(logits: &Tensor, targets: Arc<Vec<u32>>) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    if targets.len() != n {
        candle_core::bail!("cross-entropy: {} targets for {n} rows", targets.len());
    }
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= v) {
        candle_core::bail!("cross-entropy: target {t} >= vocab {v}");
    }
    logits.contiguous()?.apply_op1(CrossEntropy { targets })
}

struct CrossEntropy {
    targets: Arc<Vec<u32>>,
}

fn ce_fwd<T: Real>(x: &[T], v: usize, targets: &[u32]) -> T {
    let mut total = 0f64;
    for (row, &t) in x.chunks_exact(v).zip(targets) {
        let mut max = row[0];
        for &a in row {
            if a > max {
                max = a;
            }
        }
        let mut sum = T::f(0.0);
        for &a in row {
            sum += (a - max).exp_();
        }
        total += (sum.ln_() + max - row[t as usize]).to_f64();
    }
    T::f(total / targets.len() as f64)
}

/// (softmax(logits) - onehot(target)) / n.
fn ce_bwd<T: Real>(x: &[T], v: usize, targets: &[u32]) -> Vec<T> {
    let inv_n = T::f(1.0 / targets.len() as f64);
    let mut dx = vec![T::f(0.0); x.len()];
    for ((row, out), &t) in x.chunks_exact(v).zip(dx.chunks_exact_mut(v)).zip(targets) {
        let mut max = row[0];
        for &a in row {
            if a > max {
                max = a;
            }
        }
        let mut sum = T::f(0.0);
        for (o, &a) in out.iter_mut().zip(row) {
            *o = (a - max).exp_();
            sum += *o;
        }
        let k = inv_n / sum;
        for o in out.iter_mut() {
            *o *= k;
        }
        out[t as usize] -= inv_n;
    }
    dx
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let v = last_dim(l, self.name())?;
        let out = dispatch!(s, self.name(), |T| Ok(T::storage(vec![ce_fwd::<T>(
            slice(s, l, self.name())?,
            v,
            &self.targets
        )])))?;
        Ok((out, Shape::from(())))
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let d = arg.apply_op1_no_bwd(&CrossEntropyBwd {
            targets: self.targets.clone(),
        })?;
        Ok(Some(d.broadcast_mul(grad)?))
    }
}

struct CrossEntropyBwd {
    targets: Arc<Vec<u32>>,
}

impl CustomOp1 for CrossEntropyBwd {
    fn name(&self) -> &'static str {
        "cross-entropy-bwd"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let v = last_dim(l, self.name())?;
        let out = dispatch!(s, self.name(), |T| Ok(T::storage(ce_bwd::<T>(
            slice(s, l, self.name())?,
            v,
            &self.targets
        ))))?;
        Ok((out, l.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// Seeding a backward pass with a given output gradient.

/// A scalar whose backward hands `grad` to `output`: `vjp_root(y, g).backward()` computes the
/// vector-Jacobian product `g^T dy/d(inputs, params)` without the `sum(y * g)` graph.
pub fn vjp_root(output: &Tensor, grad: &Tensor) -> Result<Tensor> {
    if output.shape() != grad.shape() {
        candle_core::bail!(
            "vjp: grad shape {:?} != output shape {:?}",
            grad.shape(),
            output.shape()
        );
    }
    if output.dtype() != grad.dtype() {
        candle_core::bail!(
            "vjp: grad dtype {:?} != output dtype {:?}",
            grad.dtype(),
            output.dtype()
        );
    }
    output.apply_op1(VjpSeed {
        grad: grad.detach(),
    })
}

struct VjpSeed {
    grad: Tensor,
}

impl CustomOp1 for VjpSeed {
    fn name(&self) -> &'static str {
        "vjp-seed"
    }
    fn cpu_fwd(&self, s: &CpuStorage, _l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = dispatch!(s, self.name(), |T| Ok(T::storage(vec![T::f(0.0)])))?;
        Ok((out, Shape::from(())))
    }
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // `grad` is the scalar seed of `backward()` (1); scale for generality.
        Ok(Some(self.grad.broadcast_mul(grad)?))
    }
}

#[cfg(test)]
mod tests {
    //! Forward results against candle-nn's composed (independent) implementations; the backward
    //! passes are checked by finite differences in `tests/gradcheck.rs` and below.
    use super::*;
    use candle_core::Device;

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rng.random_range(-2.0..2.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn rms_normalize_matches_candle_nn() {
        let x = rand(&[6, 10], 1);
        let ones = Tensor::ones(10, DType::F64, &Device::Cpu).unwrap();
        let want = candle_nn::ops::rms_norm_slow(&x, &ones, 1e-5).unwrap();
        assert!(max_diff(&rms_normalize(&x, 1e-5).unwrap(), &want) < 1e-12);
    }

    #[test]
    fn cross_entropy_matches_candle_nn() {
        let x = rand(&[9, 13], 4);
        let targets: Vec<u32> = (0..9).map(|i| (i * 5 % 13) as u32).collect();
        let got: f64 = cross_entropy(&x, Arc::new(targets.clone()))
            .unwrap()
            .to_scalar()
            .unwrap();
        let t = Tensor::new(targets.as_slice(), &Device::Cpu).unwrap();
        let want: f64 = candle_nn::loss::cross_entropy(&x, &t)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!((got - want).abs() < 1e-12);
        assert!(cross_entropy(&x, Arc::new(vec![13; 9])).is_err());
        assert!(cross_entropy(&x, Arc::new(vec![0; 8])).is_err());
    }

    /// Central differences of sum(op(x) * r) against each op's backward.
    #[test]
    fn backward_passes_match_finite_differences() {
        let t = 4;
        let x = rand(&[2, t, t], 5);
        let r = rand(&[2, t, t], 6);
        let targets = Arc::new(vec![1u32, 0, 3, 2, 2, 1, 0, 3]);
        type Op<'a> = Box<dyn Fn(&Tensor) -> Tensor + 'a>;
        let ops: Vec<(&str, Op)> = vec![
            (
                "rms",
                Box::new(|x: &Tensor| rms_normalize(x, 1e-5).unwrap()),
            ),
            (
                "ce",
                Box::new(move |x: &Tensor| {
                    let l = cross_entropy(&x.reshape((8, t)).unwrap(), targets.clone()).unwrap();
                    l.broadcast_as((2, t, t)).unwrap().contiguous().unwrap()
                }),
            ),
        ];
        for (name, op) in &ops {
            let var = candle_core::Var::from_tensor(&x).unwrap();
            let y = op(var.as_tensor());
            let grads = vjp_root(&y, &r).unwrap().backward().unwrap();
            let g = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap();
            let g = g.to_vec1::<f64>().unwrap();
            let xv = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let f = |v: Vec<f64>| -> f64 {
                let y = op(&Tensor::from_vec(v, x.shape(), &Device::Cpu).unwrap());
                (y * &r).unwrap().sum_all().unwrap().to_scalar().unwrap()
            };
            for i in 0..xv.len() {
                let eps = 1e-6;
                let (mut p, mut m) = (xv.clone(), xv.clone());
                p[i] += eps;
                m[i] -= eps;
                let num = (f(p) - f(m)) / (2.0 * eps);
                assert!(
                    (num - g[i]).abs() < 1e-6 * (1.0 + num.abs()),
                    "{name}[{i}]: {} vs {num}",
                    g[i]
                );
            }
        }
    }
}
