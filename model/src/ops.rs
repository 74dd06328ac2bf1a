//! Fused CPU ops with their own backward pass.
//!
//! candle's fused `rms_norm`, `softmax_last_dim` and `rope` have no backward (the gradient silently
//! stops), and the composed versions build long graphs whose backward allocates a zero tensor and an
//! add per node. These ops do the same math in one pass each way. Every op is checked against finite
//! differences in `tests/gradcheck.rs`, in f64.
//!
//! All ops take contiguous f32 or f64 tensors (callers make them contiguous) and run on the CPU.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// The float types the ops run on; f64 exists for tight gradient checks.
trait Real:
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
// Causal, scaled softmax over attention scores.

/// Softmax over the last dim of `scale * scores` where row `r` (counting all rows of the tensor)
/// is query position `r % seq_len` and sees keys `0..=r % seq_len`; masked entries are exactly 0.
/// The last dim must be `seq_len`. Grouped-query attention stacks the query heads sharing a KV
/// head as consecutive blocks of `seq_len` rows, which this row rule handles without copies.
pub fn causal_softmax(scores: &Tensor, scale: f64, seq_len: usize) -> Result<Tensor> {
    scores
        .contiguous()?
        .apply_op1(CausalSoftmax { scale, seq_len })
}

struct CausalSoftmax {
    scale: f64,
    seq_len: usize,
}

fn softmax_fwd<T: Real>(x: &[T], t: usize, scale: f64) -> Vec<T> {
    let mut y = vec![T::f(0.0); x.len()];
    let scale = T::f(scale);
    for (r, (xr, yr)) in x.chunks_exact(t).zip(y.chunks_exact_mut(t)).enumerate() {
        let n = r % t + 1;
        let mut max = xr[0] * scale;
        for &v in &xr[1..n] {
            let v = v * scale;
            if v > max {
                max = v;
            }
        }
        let mut sum = T::f(0.0);
        for (o, &v) in yr[..n].iter_mut().zip(&xr[..n]) {
            *o = (v * scale - max).exp_();
            sum += *o;
        }
        let inv = T::f(1.0) / sum;
        for o in &mut yr[..n] {
            *o *= inv;
        }
    }
    y
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let t = last_dim(l, self.name())?;
        if t != self.seq_len {
            candle_core::bail!("causal-softmax: last dim {t} != seq_len {}", self.seq_len);
        }
        let out = dispatch!(s, self.name(), |T| Ok(T::storage(softmax_fwd::<T>(
            slice(s, l, self.name())?,
            t,
            self.scale
        ))))?;
        Ok((out, l.shape().clone()))
    }
    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = grad.contiguous()?;
        Ok(Some(
            res.apply_op2_no_bwd(&g, &SoftmaxBwd { scale: self.scale })?,
        ))
    }
}

/// dx = scale * y * (g - sum(g * y)); masked entries have y = 0 and get 0.
struct SoftmaxBwd {
    scale: f64,
}

fn softmax_bwd<T: Real>(y: &[T], g: &[T], t: usize, scale: f64) -> Vec<T> {
    let mut dx = Vec::with_capacity(y.len());
    let scale = T::f(scale);
    for (yr, gr) in y.chunks_exact(t).zip(g.chunks_exact(t)) {
        let mut dot = T::f(0.0);
        for (&a, &b) in yr.iter().zip(gr) {
            dot += a * b;
        }
        dx.extend(yr.iter().zip(gr).map(|(&a, &b)| scale * a * (b - dot)));
    }
    dx
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "causal-softmax-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let t = last_dim(l1, self.name())?;
        let out = dispatch!(s1, self.name(), |T| Ok(T::storage(softmax_bwd::<T>(
            slice(s1, l1, self.name())?,
            slice(s2, l2, self.name())?,
            t,
            self.scale
        ))))?;
        Ok((out, l1.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// Causal attention core: softmax(scale * q k^T, causal) v as one graph node.

/// `causal_softmax(q k^T, scale, seq_len) v` for `q` of shape `(b, kv_heads, rep * seq_len, hd)`
/// (the query heads sharing a KV head stacked as row blocks) and `k`, `v` of shape
/// `(b, kv_heads, seq_len, hd)`. One node in the autograd graph instead of five: the attention
/// probabilities are kept for backward and the score and probability tensors never get
/// candle's per-node zero-fill and accumulate in backward.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    seq_len: usize,
) -> Result<Tensor> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let (b, h, r, d) = q.dims4()?;
    if k.dims() != [b, h, seq_len, d] || v.dims() != [b, h, seq_len, d] || r % seq_len != 0 {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?}, seq_len {seq_len}",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    q.apply_op3(
        &k,
        &v,
        CausalAttention {
            scale,
            seq_len,
            probs: std::sync::Mutex::new(None),
        },
    )
}

struct CausalAttention {
    scale: f64,
    seq_len: usize,
    /// The softmax probabilities of the forward pass, for backward.
    probs: std::sync::Mutex<Option<Tensor>>,
}

fn tensor_of<T: Real>(s: &CpuStorage, l: &Layout, op: &str) -> Result<Tensor> {
    Tensor::from_slice(slice::<T>(s, l, op)?, l.dims(), &candle_core::Device::Cpu)
}

impl candle_core::CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let out = dispatch!(s1, name, |T| {
            let (q, k, v) = (
                tensor_of::<T>(s1, l1, name)?,
                tensor_of::<T>(s2, l2, name)?,
                tensor_of::<T>(s3, l3, name)?,
            );
            let scores = q.matmul(&k.t()?)?;
            let probs = scores.apply_op1_no_bwd(&CausalSoftmax {
                scale: self.scale,
                seq_len: self.seq_len,
            })?;
            let y = probs.matmul(&v)?;
            *self
                .probs
                .lock()
                .map_err(|_| candle_core::Error::Msg("attention: poisoned".into()))? = Some(probs);
            Ok(T::storage(y.flatten_all()?.to_vec1::<T>()?))
        })?;
        Ok((out, l1.shape().clone()))
    }
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let probs = self
            .probs
            .lock()
            .map_err(|_| candle_core::Error::Msg("attention: poisoned".into()))?
            .clone()
            .ok_or_else(|| candle_core::Error::Msg("attention: backward before forward".into()))?;
        let (q, k, v) = (q.detach(), k.detach(), v.detach());
        let dy = grad.detach().contiguous()?;
        let dv = probs.t()?.matmul(&dy)?;
        let dp = dy.matmul(&v.t()?)?;
        let ds = probs.apply_op2_no_bwd(&dp, &SoftmaxBwd { scale: self.scale })?;
        let dq = ds.matmul(&k)?;
        let dk = ds.t()?.matmul(&q)?;
        Ok((Some(dq), Some(dk), Some(dv)))
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

    /// Rotates `x` of shape `(..., seq_len, head_dim)`: row `r` is position `r % seq_len`.
    pub fn apply(&self, x: &Tensor, seq_len: usize) -> Result<Tensor> {
        if seq_len > self.max_len {
            candle_core::bail!("rope: seq_len {seq_len} > table length {}", self.max_len);
        }
        x.contiguous()?.apply_op1(Rope {
            tables: self.clone(),
            seq_len,
            inverse: false,
        })
    }
}

struct Rope {
    tables: RopeTables,
    seq_len: usize,
    /// Rotate by the negative angle: the VJP of a rotation is its inverse.
    inverse: bool,
}

fn rope_fwd<T: Real>(x: &[T], tb: &RopeTables, t: usize, inverse: bool) -> Vec<T> {
    let hd = tb.head_dim;
    let half = hd / 2;
    let sign = if inverse { -1.0 } else { 1.0 };
    let mut y = vec![T::f(0.0); x.len()];
    for (r, (xr, yr)) in x.chunks_exact(hd).zip(y.chunks_exact_mut(hd)).enumerate() {
        let p = r % t;
        let cos = &tb.cos[p * half..(p + 1) * half];
        let sin = &tb.sin[p * half..(p + 1) * half];
        for i in 0..half {
            let (c, s) = (T::f(cos[i]), T::f(sign * sin[i]));
            let (x1, x2) = (xr[i], xr[i + half]);
            yr[i] = x1 * c - x2 * s;
            yr[i + half] = x2 * c + x1 * s;
        }
    }
    y
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let hd = last_dim(l, self.name())?;
        let dims = l.dims();
        if hd != self.tables.head_dim || dims.len() < 2 || dims[dims.len() - 2] != self.seq_len {
            candle_core::bail!("rope: shape {dims:?} does not end in (seq_len, head_dim)");
        }
        let out = dispatch!(s, self.name(), |T| Ok(T::storage(rope_fwd::<T>(
            slice(s, l, self.name())?,
            &self.tables,
            self.seq_len,
            self.inverse
        ))))?;
        Ok((out, l.shape().clone()))
    }
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let inv = Rope {
            tables: self.tables.clone(),
            seq_len: self.seq_len,
            inverse: !self.inverse,
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&inv)?))
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
// SwiGLU: silu(gate) * up in one pass each way (candle's silu + mul keep two activation-sized
// nodes and a multi-op silu backward).

/// `silu(gate) * up`, elementwise; `gate` and `up` have the same shape.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.shape() != up.shape() {
        candle_core::bail!("swiglu: gate {:?} != up {:?}", gate.shape(), up.shape());
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, Swiglu)
}

struct Swiglu;

fn sigmoid<T: Real>(x: T) -> T {
    T::f(1.0) / (T::f(1.0) + (T::f(0.0) - x).exp_())
}

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "swiglu"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = dispatch!(s1, self.name(), |T| {
            let g: &[T] = slice(s1, l1, self.name())?;
            let u: &[T] = slice(s2, l2, self.name())?;
            Ok(T::storage(
                g.iter().zip(u).map(|(&g, &u)| g * sigmoid(g) * u).collect(),
            ))
        })?;
        Ok((out, l1.shape().clone()))
    }
    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let both = gate.apply_op3_no_bwd(up, &grad.contiguous()?, &SwigluBwd)?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

/// d/dgate = grad * up * s * (1 + gate * (1 - s)) with s = sigmoid(gate); d/dup = grad * silu(gate).
/// Stacked as `(2, ...)`.
struct SwigluBwd;

impl candle_core::CustomOp3 for SwigluBwd {
    fn name(&self) -> &'static str {
        "swiglu-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = dispatch!(s1, self.name(), |T| {
            let g: &[T] = slice(s1, l1, self.name())?;
            let u: &[T] = slice(s2, l2, self.name())?;
            let d: &[T] = slice(s3, l3, self.name())?;
            let n = g.len();
            let mut out = vec![T::f(0.0); 2 * n];
            let (dg, du) = out.split_at_mut(n);
            for i in 0..n {
                let s = sigmoid(g[i]);
                dg[i] = d[i] * u[i] * s * (T::f(1.0) + g[i] * (T::f(1.0) - s));
                du[i] = d[i] * g[i] * s;
            }
            Ok(T::storage(out))
        })?;
        let mut dims = vec![2];
        dims.extend_from_slice(l1.dims());
        Ok((out, Shape::from(dims)))
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
    use candle_core::{D, Device};

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
    fn rope_matches_candle_nn_rotate_halves() {
        let (t, hd) = (7, 8);
        let x = rand(&[2, 3, t, hd], 2);
        let tables = RopeTables::new(hd, 16, 10_000.0);
        let cos = Tensor::from_vec(tables.cos[..t * hd / 2].to_vec(), (t, hd / 2), &Device::Cpu);
        let sin = Tensor::from_vec(tables.sin[..t * hd / 2].to_vec(), (t, hd / 2), &Device::Cpu);
        let want = candle_nn::rotary_emb::rope_slow(&x, &cos.unwrap(), &sin.unwrap()).unwrap();
        let got = tables.apply(&x, t).unwrap();
        assert!(max_diff(&got, &want) < 1e-12);
        // The inverse rotation undoes it (it is the VJP).
        let inv = Rope {
            tables: tables.clone(),
            seq_len: t,
            inverse: true,
        };
        let back = got.apply_op1_no_bwd(&inv).unwrap();
        assert!(max_diff(&back, &x) < 1e-12);
    }

    #[test]
    fn causal_softmax_matches_masked_softmax() {
        let t = 5;
        let s = rand(&[2, 2 * t, t], 3); // two query heads per KV head stacked as rows
        let got = causal_softmax(&s, 0.5, t).unwrap();
        let mut mask = vec![0f64; 2 * t * t];
        for r in 0..2 * t {
            for c in 0..t {
                if c > r % t {
                    mask[r * t + c] = f64::NEG_INFINITY;
                }
            }
        }
        let mask = Tensor::from_vec(mask, (2 * t, t), &Device::Cpu).unwrap();
        let masked = (s * 0.5).unwrap().broadcast_add(&mask).unwrap();
        let want = candle_nn::ops::softmax(&masked, D::Minus1);
        assert!(max_diff(&got, &want.unwrap()) < 1e-12);
    }

    #[test]
    fn swiglu_matches_candle_silu() {
        let (g, u) = (rand(&[5, 7], 8), rand(&[5, 7], 9));
        let want = (candle_nn::ops::silu(&g).unwrap() * &u).unwrap();
        assert!(max_diff(&swiglu(&g, &u).unwrap(), &want) < 1e-12);
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

    /// The fused attention against the composed ops, and its gradients by finite differences.
    #[test]
    fn causal_attention_matches_composed_and_finite_differences() {
        let (t, hd) = (4, 3);
        let q = rand(&[2, 2, 2 * t, hd], 10);
        let k = rand(&[2, 2, t, hd], 11);
        let v = rand(&[2, 2, t, hd], 12);
        let r = rand(&[2, 2, 2 * t, hd], 13);
        let f = |q: &Tensor, k: &Tensor, v: &Tensor| causal_attention(q, k, v, 0.6, t).unwrap();
        let composed = causal_softmax(&q.matmul(&k.t().unwrap()).unwrap(), 0.6, t)
            .unwrap()
            .matmul(&v)
            .unwrap();
        assert!(max_diff(&f(&q, &k, &v), &composed) < 1e-12);
        let vars: Vec<_> = [&q, &k, &v]
            .iter()
            .map(|x| candle_core::Var::from_tensor(x).unwrap())
            .collect();
        let y = f(
            vars[0].as_tensor(),
            vars[1].as_tensor(),
            vars[2].as_tensor(),
        );
        let grads = vjp_root(&y, &r).unwrap().backward().unwrap();
        let obj = |q: &Tensor, k: &Tensor, v: &Tensor| -> f64 {
            (f(q, k, v) * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        for (which, var) in vars.iter().enumerate() {
            let g = grads
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let base = var.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            for i in 0..base.len() {
                let eps = 1e-6;
                let mut args = [q.clone(), k.clone(), v.clone()];
                let mut p = base.clone();
                p[i] += eps;
                args[which] = Tensor::from_vec(p, var.shape(), &Device::Cpu).unwrap();
                let fp = obj(&args[0], &args[1], &args[2]);
                let mut m = base.clone();
                m[i] -= eps;
                args[which] = Tensor::from_vec(m, var.shape(), &Device::Cpu).unwrap();
                let fm = obj(&args[0], &args[1], &args[2]);
                let num = (fp - fm) / (2.0 * eps);
                assert!(
                    (num - g[i]).abs() < 1e-6 * (1.0 + num.abs()),
                    "arg {which}[{i}]: {} vs {num}",
                    g[i]
                );
            }
        }
    }

    /// Central differences of sum(op(x) * r) against each op's backward.
    #[test]
    fn backward_passes_match_finite_differences() {
        let t = 4;
        let x = rand(&[2, t, t], 5);
        let r = rand(&[2, t, t], 6);
        let tables = RopeTables::new(t, 8, 100.0);
        let targets = Arc::new(vec![1u32, 0, 3, 2, 2, 1, 0, 3]);
        type Op<'a> = Box<dyn Fn(&Tensor) -> Tensor + 'a>;
        let ops: Vec<(&str, Op)> = vec![
            (
                "rms",
                Box::new(|x: &Tensor| rms_normalize(x, 1e-5).unwrap()),
            ),
            (
                "softmax",
                Box::new(|x: &Tensor| causal_softmax(x, 0.7, t).unwrap()),
            ),
            (
                "rope",
                Box::new(move |x: &Tensor| tables.apply(x, t).unwrap()),
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
