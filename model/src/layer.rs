//! The decoder layers of a stage, forward and backward written by hand over flat buffers.
//!
//! Why not candle's autograd: for the default model it spent more than half of a training step
//! outside the matrix products (a zero-filled gradient and an add per graph node, strided copies
//! for every transposed weight, single-threaded elementwise ops). Here one layer is:
//!
//! - RMSNorm with its weight in one pass (the inverse RMS per row is kept for backward);
//! - one GEMM for q, k and v (their weights stacked), then RoPE fused with the split into heads;
//! - attention per (sequence, KV head) on the thread pool: the query heads sharing a KV head are
//!   stacked as row blocks, so grouped-query attention needs no KV copies;
//! - the output and down projections add into the residual inside the GEMM;
//! - SwiGLU in one pass each way.
//!
//! Backward mirrors it from the activations the forward kept ([`LayerActs`]). The GEMMs are the
//! `gemm` crate (candle's own CPU matmul) called with explicit strides, so no transpose is ever
//! materialised.
//!
//! Determinism: every output element is computed by one thread in a fixed order. GEMMs split
//! only over output blocks, the per-row passes are independent rows, and the sums over rows (norm
//! weight gradients) add fixed blocks of rows in a fixed order. So the bits depend neither on the
//! thread count nor on how layers are split into stages, and the swarm equals the local run.

use std::mem::MaybeUninit;
use std::sync::Arc;

use gemm::Parallelism;
use rayon::prelude::*;

mod attention;

use crate::ops::{Real, RopeTables, simd};
use crate::profile::timed;
use attention::{attention_block, attention_block_backward};

/// The float types the layers run on (f64 for gradient checks).
pub(crate) trait Float: Real + Send + Sync {}
impl Float for f32 {}
impl Float for f64 {}

/// Shape of one layer's pass.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geom {
    pub batch: usize,
    pub seq: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub inter: usize,
    pub eps: f64,
}

impl Geom {
    fn rows(&self) -> usize {
        self.batch * self.seq
    }
    fn kv(&self) -> usize {
        self.kv_heads * self.head_dim
    }
    fn rep(&self) -> usize {
        self.heads / self.kv_heads
    }
    /// Width of the stacked q|k|v projection.
    fn qkv(&self) -> usize {
        self.hidden + 2 * self.kv()
    }
}

/// One layer's weights, row-major `(out, in)` as HF stores them, with the projections that read
/// the same input stacked so that each is one GEMM.
pub(crate) struct LayerWeights<T> {
    pub norm1: Vec<T>,
    /// `q_proj`, `k_proj`, `v_proj` rows: `(hidden + 2 kv) x hidden`.
    pub qkv: Vec<T>,
    pub o: Vec<T>,
    pub norm2: Vec<T>,
    /// `gate_proj`, `up_proj` rows: `2 inter x hidden`.
    pub gate_up: Vec<T>,
    pub down: Vec<T>,
}

/// What backward needs from one layer's forward.
pub(crate) struct LayerActs<T> {
    /// The layer's input (residual stream), `rows x hidden`.
    x: Vec<T>,
    /// Inverse RMS of each row of `x`, and the normalised, weighted rows.
    r1: Vec<T>,
    xn1: Vec<T>,
    /// Rotated queries `(batch, kv_heads, rep * seq, head_dim)`, rotated keys and values
    /// `(batch, kv_heads, seq, head_dim)`.
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    /// Attention probabilities `(batch, kv_heads, rep * seq, seq)`, 0 above the diagonal.
    p: Vec<T>,
    /// Attention output in `rows x hidden` (heads side by side).
    y: Vec<T>,
    /// Residual after attention, its inverse RMS and normalised rows.
    xm: Vec<T>,
    r2: Vec<T>,
    xn2: Vec<T>,
    /// `gate | up` projections side by side, `rows x 2 inter`, and `silu(gate) * up`.
    gu: Vec<T>,
    act: Vec<T>,
}

/// Gradients of one layer's parameters, in [`crate::Piece::parameters`] order: input norm, q, k,
/// v, o, post-attention norm, gate, up, down.
pub(crate) type LayerGrads<T> = [Vec<T>; 9];

pub(crate) fn threads() -> Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// A strided matrix view: element `(r, c)` is `data[r * rs + c * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a, T> {
    data: &'a [T],
    rs: usize,
    cs: usize,
}

pub(crate) fn view<T>(data: &[T], rs: usize, cs: usize) -> View<'_, T> {
    View { data, rs, cs }
}

/// The smallest slice length that holds a `rows x cols` matrix with these strides.
fn span(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

/// Slots a pass writes before anything reads them.
///
/// Why: every activation and gradient buffer of a pass is written in full by the GEMM or the
/// loop that produces it, so zero-filling it first (`vec![0.0; n]`) was a wasted pass over
/// memory: about 7% of a training step. Buffers are allocated with capacity only, filled through
/// these slots, and given their length once written (`Vec::set_len`, under a SAFETY comment
/// that names the writer).
pub(crate) type Slots<T> = [MaybeUninit<T>];

/// The first `len` slots of `v`'s spare capacity (`v` empty, with capacity `len` or more).
pub(crate) fn slots<T>(v: &mut Vec<T>, len: usize) -> &mut Slots<T> {
    &mut v.spare_capacity_mut()[..len]
}

/// A vector of `len` values that `fill` writes into its slots.
///
/// # Safety
/// `fill` must write every one of the `len` slots it is given.
#[allow(unsafe_code)]
pub(crate) unsafe fn filled<T>(len: usize, fill: impl FnOnce(&mut Slots<T>)) -> Vec<T> {
    let mut v = Vec::with_capacity(len);
    fill(slots(&mut v, len));
    // SAFETY: the caller's contract, `fill` initialised slots 0..len.
    unsafe { v.set_len(len) };
    v
}

/// The slots as values once all of them are written.
///
/// # Safety
/// Every slot of `s` must be initialised.
#[allow(unsafe_code)]
unsafe fn written<T>(s: &mut Slots<T>) -> &mut [T] {
    // SAFETY: same layout; the caller's contract makes every element a valid `T`.
    unsafe { &mut *(s as *mut Slots<T> as *mut [T]) }
}

/// Writes `src` into `dst` element by element (`MaybeUninit::copy_from_slice` needs Rust 1.93).
#[inline(always)]
fn put<T: Copy>(dst: &mut Slots<T>, src: &[T]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        d.write(s);
    }
}

/// `dst (m x n, row stride drs) = a (m x k) b (k x n)` into slots: gemm writes every element of
/// the `m x n` block (with `read_dst` false it reads none), so the block is initialised afterwards.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_into<T: Float>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut Slots<T>,
    drs: usize,
    a: View<'_, T>,
    b: View<'_, T>,
    par: Parallelism,
) {
    gemm_into(m, n, k, dst, drs, false, a, b, par);
}

/// `dst = [dst +] a b`, with `acc` choosing whether the old contents of `dst` are added (then
/// they must be initialised).
#[allow(clippy::too_many_arguments)]
#[allow(unsafe_code)] // the gemm call on checked strides: see the SAFETY comment inside
fn gemm_into<T: Float>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut Slots<T>,
    drs: usize,
    acc: bool,
    a: View<'_, T>,
    b: View<'_, T>,
    par: Parallelism,
) {
    assert!(dst.len() >= span(m, n, drs, 1), "matmul: dst too short");
    assert!(
        a.data.len() >= span(m, k, a.rs, a.cs),
        "matmul: lhs too short"
    );
    assert!(
        b.data.len() >= span(k, n, b.rs, b.cs),
        "matmul: rhs too short"
    );
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the three slices hold every element the strides address (checked above), and
    // `dst` is a unique borrow that neither input aliases. With `acc` false gemm does not read
    // `dst` (`read_dst`), so its slots may be uninitialised.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr().cast::<T>(),
            1,
            drs as isize,
            acc,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            if acc { T::f(1.0) } else { T::f(0.0) },
            T::f(1.0),
            false,
            false,
            false,
            par,
        )
    }
}

/// `dst += x @ w^T` for `x` (`rows x k`, contiguous) and `w` (`n x k`, row-major), `dst`
/// (`rows x n`): a projection added into the residual stream inside the GEMM.
pub(crate) fn linear_add<T: Float>(x: &[T], w: &[T], k: usize, n: usize, dst: &mut [T]) {
    let rows = x.len() / k;
    // SAFETY of the cast: `[T]` and `[MaybeUninit<T>]` have one layout, and gemm only writes
    // initialised values through it.
    #[allow(unsafe_code)]
    let dst = unsafe { &mut *(dst as *mut [T] as *mut Slots<T>) };
    let (a, b) = (view(x, k, 1), view(w, 1, k));
    gemm_into(rows, n, k, dst, n, true, a, b, threads());
}

/// `x @ w^T` (as [`linear_add`]) into a new `rows x n` buffer.
#[allow(unsafe_code)]
pub(crate) fn linear_new<T: Float>(x: &[T], w: &[T], k: usize, n: usize) -> Vec<T> {
    let rows = x.len() / k;
    let (a, b) = (view(x, k, 1), view(w, 1, k));
    // SAFETY: the GEMM writes all `rows x n` elements (row stride n).
    unsafe { filled(rows * n, |d| matmul_into(rows, n, k, d, n, a, b, threads())) }
}

/// Rows per parallel task for per-row passes (keeps task overhead small against the work).
pub(crate) const ROW_BLOCK: usize = 64;

/// Partial sums kept side by side in the reductions below: a fixed summation order (the same
/// bits on every machine and thread count) that the compiler can vectorize, which a single
/// running sum (a chain of dependent adds) prevents.
const LANES: usize = 8;

/// `sum_i x[i]^2` in f64 over [`LANES`] interleaved partial sums.
#[inline(always)]
fn sq_sum_f64<T: Float>(x: &[T]) -> f64 {
    let mut acc = [0f64; LANES];
    let c = x.chunks_exact(LANES);
    let mut s = 0f64;
    for v in c.remainder() {
        s += v.to_f64() * v.to_f64();
    }
    for v in c {
        for j in 0..LANES {
            acc[j] += v[j].to_f64() * v[j].to_f64();
        }
    }
    acc.iter().sum::<f64>() + s
}

/// `sum_i (a[i] b[i]) c[i]` in f64 (`a b` rounded in `T`) over [`LANES`] interleaved partial sums.
#[inline(always)]
fn dot3_f64<T: Float>(a: &[T], b: &[T], c: &[T]) -> f64 {
    let mut acc = [0f64; LANES];
    let (ca, cb, cc) = (
        a.chunks_exact(LANES),
        b.chunks_exact(LANES),
        c.chunks_exact(LANES),
    );
    let mut s = 0f64;
    for ((x, y), z) in ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .zip(cc.remainder())
    {
        s += (*x * *y).to_f64() * z.to_f64();
    }
    for ((x, y), z) in ca.zip(cb).zip(cc) {
        for j in 0..LANES {
            acc[j] += (x[j] * y[j]).to_f64() * z[j].to_f64();
        }
    }
    acc.iter().sum::<f64>() + s
}

/// `sum_i a[i]` over [`LANES`] interleaved partial sums.
#[inline(always)]
pub(crate) fn sum<T: Float>(a: &[T]) -> T {
    let mut acc = [T::f(0.0); LANES];
    let c = a.chunks_exact(LANES);
    let mut s = T::f(0.0);
    for v in c.remainder() {
        s += *v;
    }
    for x in c {
        for j in 0..LANES {
            acc[j] += x[j];
        }
    }
    for v in acc {
        s += v;
    }
    s
}

/// The largest element of a non-empty slice (NaNs ignored unless all are NaN).
#[inline(always)]
pub(crate) fn max<T: Float>(a: &[T]) -> T {
    let mut acc = [a[0]; LANES];
    let c = a.chunks_exact(LANES);
    let mut m = a[0];
    for &v in c.remainder() {
        m = if v > m { v } else { m };
    }
    for x in c {
        for j in 0..LANES {
            acc[j] = if x[j] > acc[j] { x[j] } else { acc[j] };
        }
    }
    for v in acc {
        m = if v > m { v } else { m };
    }
    m
}

/// RMSNorm with weight: returns `(x * r) * w` per row and `r = 1 / rms(row)`.
#[allow(unsafe_code)]
pub(crate) fn rms_forward<T: Float>(x: &[T], w: &[T], eps: f64) -> (Vec<T>, Vec<T>) {
    let h = w.len();
    let rows = x.len() / h;
    let mut r = vec![T::f(0.0); rows];
    let fill = |xn: &mut Slots<T>| {
        xn.par_chunks_mut(h * ROW_BLOCK)
            .zip(r.par_chunks_mut(ROW_BLOCK))
            .zip(x.par_chunks(h * ROW_BLOCK))
            .for_each(|((xn, r), x)| {
                simd(
                    #[inline(always)]
                    || {
                        for ((xn, r), x) in xn.chunks_exact_mut(h).zip(r).zip(x.chunks_exact(h)) {
                            let ss = sq_sum_f64(x);
                            *r = T::f(1.0 / (ss / h as f64 + eps).sqrt());
                            for ((o, &v), &wi) in xn.iter_mut().zip(x).zip(w) {
                                o.write(v * *r * wi);
                            }
                        }
                    },
                )
            })
    };
    // SAFETY: every row of `x` writes its whole row of slots.
    let xn = unsafe { filled(x.len(), fill) };
    (xn, r)
}

/// Backward of [`rms_forward`]: adds the input gradient into `dx` and returns the weight's.
/// `dxhat = dxn * w`; `dx += r * (dxhat - x * r^2 mean(dxhat * x))`; `dw = sum_rows dxn * x * r`.
pub(crate) fn rms_backward<T: Float>(x: &[T], r: &[T], w: &[T], dxn: &[T], dx: &mut [T]) -> Vec<T> {
    let h = w.len();
    let blocks: Vec<Vec<T>> = dx
        .par_chunks_mut(h * ROW_BLOCK)
        .zip(x.par_chunks(h * ROW_BLOCK))
        .zip(dxn.par_chunks(h * ROW_BLOCK))
        .zip(r.par_chunks(ROW_BLOCK))
        .map(|(((dx, x), dxn), r)| {
            simd(
                #[inline(always)]
                || {
                    let mut dw = vec![T::f(0.0); h];
                    for (((dx, x), g), &r) in dx
                        .chunks_exact_mut(h)
                        .zip(x.chunks_exact(h))
                        .zip(dxn.chunks_exact(h))
                        .zip(r)
                    {
                        for ((dw, &g), &x) in dw.iter_mut().zip(g).zip(x) {
                            *dw += g * (x * r);
                        }
                        let gx = dot3_f64(g, w, x);
                        let rf = r.to_f64();
                        let c = T::f(rf * rf * gx / h as f64);
                        for (((dx, &g), &w), &x) in dx.iter_mut().zip(g).zip(w).zip(x) {
                            *dx += r * (g * w - x * c);
                        }
                    }
                    dw
                },
            )
        })
        .collect();
    // Blocks of rows are fixed by ROW_BLOCK, not by the thread count: a fixed summation order.
    let mut dw = vec![T::f(0.0); h];
    for b in blocks {
        for (a, v) in dw.iter_mut().zip(b) {
            *a += v;
        }
    }
    dw
}

/// RoPE tables in the pass's float type for positions `0..seq`: `(cos, sin)`, `seq x head_dim/2`.
pub(crate) struct Rope<T> {
    cos: Vec<T>,
    sin: Vec<T>,
}

impl<T: Float> Rope<T> {
    pub(crate) fn new(tables: &RopeTables, seq: usize) -> Self {
        let (cos, sin) = tables.rows(seq);
        Self {
            cos: cos.iter().map(|&c| T::f(c)).collect(),
            sin: sin.iter().map(|&s| T::f(s)).collect(),
        }
    }
}

/// Rotates one head row (HF "rotate halves"); `sign` -1 rotates back (the VJP).
#[inline(always)]
fn rotate<T: Float>(src: &[T], dst: &mut Slots<T>, cos: &[T], sin: &[T], inverse: bool) {
    let half = cos.len();
    for i in 0..half {
        let (c, s) = (cos[i], if inverse { T::f(0.0) - sin[i] } else { sin[i] });
        let (x1, x2) = (src[i], src[i + half]);
        dst[i].write(x1 * c - x2 * s);
        dst[i + half].write(x2 * c + x1 * s);
    }
}

/// Splits the stacked `q|k|v` rows into head-major buffers, rotating q and k.
#[allow(unsafe_code)]
fn split_heads<T: Float>(g: &Geom, qkv: &[T], rope: &Rope<T>) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (t, h, hd, kv, w) = (g.seq, g.hidden, g.head_dim, g.kv(), g.qkv());
    let half = hd / 2;
    let (nq, nkv) = (g.rows() * h, g.rows() * kv);
    let (mut q, mut k, mut v) = (
        Vec::with_capacity(nq),
        Vec::with_capacity(nkv),
        Vec::with_capacity(nkv),
    );
    slots(&mut q, nq)
        .par_chunks_mut(t * h)
        .zip(slots(&mut k, nkv).par_chunks_mut(t * kv))
        .zip(slots(&mut v, nkv).par_chunks_mut(t * kv))
        .zip(qkv.par_chunks(t * w))
        .for_each(|(((q, k), v), src)| {
            simd(
                #[inline(always)]
                || {
                    for (ti, row) in src.chunks_exact(w).enumerate() {
                        let (cos, sin) = (
                            &rope.cos[ti * half..(ti + 1) * half],
                            &rope.sin[ti * half..(ti + 1) * half],
                        );
                        for hh in 0..g.heads {
                            // Query head hh = kv head gi, block j: rows ((gi * rep + j) * t + ti).
                            let o = (hh * t + ti) * hd;
                            rotate(&row[hh * hd..], &mut q[o..o + hd], cos, sin, false);
                        }
                        for gi in 0..g.kv_heads {
                            let o = (gi * t + ti) * hd;
                            rotate(&row[h + gi * hd..], &mut k[o..o + hd], cos, sin, false);
                            let src = &row[h + kv + gi * hd..h + kv + (gi + 1) * hd];
                            put(&mut v[o..o + hd], src);
                        }
                    }
                },
            )
        });
    // SAFETY: each sequence's rows write every (head, position) row of q, k and v once: query
    // heads cover `heads * hd = hidden` columns, KV heads `kv` columns.
    unsafe {
        q.set_len(nq);
        k.set_len(nkv);
        v.set_len(nkv);
    }
    (q, k, v)
}

/// The inverse of [`split_heads`] for gradients: rotates back and interleaves into `q|k|v` rows.
#[allow(unsafe_code)]
fn merge_heads<T: Float>(g: &Geom, dq: &[T], dk: &[T], dv: &[T], rope: &Rope<T>) -> Vec<T> {
    let (t, h, hd, kv, w) = (g.seq, g.hidden, g.head_dim, g.kv(), g.qkv());
    let half = hd / 2;
    let fill = |out: &mut Slots<T>| {
        out.par_chunks_mut(t * w)
            .zip(dq.par_chunks(t * h))
            .zip(dk.par_chunks(t * kv))
            .zip(dv.par_chunks(t * kv))
            .for_each(|(((out, dq), dk), dv)| {
                simd(
                    #[inline(always)]
                    || {
                        for (ti, row) in out.chunks_exact_mut(w).enumerate() {
                            let (cos, sin) = (
                                &rope.cos[ti * half..(ti + 1) * half],
                                &rope.sin[ti * half..(ti + 1) * half],
                            );
                            for hh in 0..g.heads {
                                let o = (hh * t + ti) * hd;
                                rotate(&dq[o..o + hd], &mut row[hh * hd..], cos, sin, true);
                            }
                            for gi in 0..g.kv_heads {
                                let o = (gi * t + ti) * hd;
                                rotate(&dk[o..o + hd], &mut row[h + gi * hd..], cos, sin, true);
                                put(
                                    &mut row[h + kv + gi * hd..h + kv + (gi + 1) * hd],
                                    &dv[o..o + hd],
                                );
                            }
                        }
                    },
                )
            })
    };
    // SAFETY: every row of `w = hidden + 2 kv` columns is written: the query heads' `hidden`
    // columns, then each KV head's key and value columns.
    unsafe { filled(g.rows() * w, fill) }
}

/// Head-major `(batch, heads, seq, head_dim)` <-> rows `(batch * seq, heads * head_dim)`.
#[allow(unsafe_code)]
fn heads_to_rows<T: Float>(g: &Geom, src: &[T]) -> Vec<T> {
    let (t, h, hd) = (g.seq, g.hidden, g.head_dim);
    let fill = |out: &mut Slots<T>| {
        out.par_chunks_mut(t * h)
            .zip(src.par_chunks(t * h))
            .for_each(|(out, src)| {
                for (ti, row) in out.chunks_exact_mut(h).enumerate() {
                    for hh in 0..g.heads {
                        let o = (hh * t + ti) * hd;
                        put(&mut row[hh * hd..(hh + 1) * hd], &src[o..o + hd]);
                    }
                }
            })
    };
    // SAFETY: every (position, head) block of `hd` values is written once.
    unsafe { filled(src.len(), fill) }
}

#[allow(unsafe_code)]
fn rows_to_heads<T: Float>(g: &Geom, src: &[T]) -> Vec<T> {
    let (t, h, hd) = (g.seq, g.hidden, g.head_dim);
    let fill = |out: &mut Slots<T>| {
        out.par_chunks_mut(t * h)
            .zip(src.par_chunks(t * h))
            .for_each(|(out, src)| {
                for (ti, row) in src.chunks_exact(h).enumerate() {
                    for hh in 0..g.heads {
                        let o = (hh * t + ti) * hd;
                        put(&mut out[o..o + hd], &row[hh * hd..(hh + 1) * hd]);
                    }
                }
            })
    };
    // SAFETY: every (head, position) block of `hd` values is written once.
    unsafe { filled(src.len(), fill) }
}

#[inline(always)]
fn sigmoid<T: Float>(x: T) -> T {
    T::f(1.0) / (T::f(1.0) + (T::f(0.0) - x).exp_())
}

/// Elements per block of the SwiGLU kernels. Each block's inputs are copied into local arrays
/// and its results written back at once: the compiler then knows the stores alias none of the
/// loads and vectorizes the block as it stands; over plain slices it fell back to its scalar
/// loop (its run-time overlap checks) and SiLU's division ran one element at a time.
const VB: usize = 16;

/// `a = silu(gate) * up` elementwise.
#[inline(always)]
fn swiglu_row<T: Float>(a: &mut Slots<T>, gate: &[T], up: &[T]) {
    let one = |g: T, u: T| g * sigmoid(g) * u;
    let mut ab = a.chunks_exact_mut(VB);
    let (mut gb, mut ub) = (gate.chunks_exact(VB), up.chunks_exact(VB));
    for ((a, g), u) in (&mut ab).zip(&mut gb).zip(&mut ub) {
        let (g, u): ([T; VB], [T; VB]) = (g.try_into().unwrap(), u.try_into().unwrap());
        let mut o = [T::f(0.0); VB];
        for j in 0..VB {
            o[j] = one(g[j], u[j]);
        }
        put(a, &o);
    }
    for ((a, &g), &u) in ab
        .into_remainder()
        .iter_mut()
        .zip(gb.remainder())
        .zip(ub.remainder())
    {
        a.write(one(g, u));
    }
}

/// Backward of [`swiglu_row`] for output gradient `d`: the gate's and up's gradients.
#[inline(always)]
fn swiglu_row_backward<T: Float>(
    dg: &mut Slots<T>,
    du: &mut Slots<T>,
    gate: &[T],
    up: &[T],
    d: &[T],
) {
    let one = |dg: &mut T, du: &mut T, g: T, u: T, d: T| {
        let s = sigmoid(g);
        *dg = d * u * s * (T::f(1.0) + g * (T::f(1.0) - s));
        *du = d * g * s;
    };
    let (mut dgb, mut dub) = (dg.chunks_exact_mut(VB), du.chunks_exact_mut(VB));
    let (mut gb, mut ub, mut db) = (
        gate.chunks_exact(VB),
        up.chunks_exact(VB),
        d.chunks_exact(VB),
    );
    for ((((dgo, duo), g), u), d) in (&mut dgb)
        .zip(&mut dub)
        .zip(&mut gb)
        .zip(&mut ub)
        .zip(&mut db)
    {
        let g: [T; VB] = g.try_into().unwrap();
        let u: [T; VB] = u.try_into().unwrap();
        let d: [T; VB] = d.try_into().unwrap();
        let (mut a, mut b) = ([T::f(0.0); VB], [T::f(0.0); VB]);
        for j in 0..VB {
            one(&mut a[j], &mut b[j], g[j], u[j], d[j]);
        }
        put(dgo, &a);
        put(duo, &b);
    }
    for ((((dg, du), &g), &u), &d) in dgb
        .into_remainder()
        .iter_mut()
        .zip(dub.into_remainder())
        .zip(gb.remainder())
        .zip(ub.remainder())
        .zip(db.remainder())
    {
        let (mut a, mut b) = (T::f(0.0), T::f(0.0));
        one(&mut a, &mut b, g, u, d);
        dg.write(a);
        du.write(b);
    }
}

/// One decoder layer forward on the residual stream `x` (`rows x hidden`): returns the output
/// and what backward needs (which keeps `x`).
#[allow(unsafe_code)]
pub(crate) fn forward<T: Float>(
    g: &Geom,
    w: &LayerWeights<T>,
    rope: &Rope<T>,
    x: Vec<T>,
) -> (Vec<T>, LayerActs<T>) {
    let (rows, h, i) = (g.rows(), g.hidden, g.inter);
    let (xn1, r1) = timed("fwd.norm", || rms_forward(&x, &w.norm1, g.eps));
    let qkv = timed("fwd.gemm.qkv", || linear_new(&xn1, &w.qkv, h, g.qkv()));
    let (q, k, v) = timed("fwd.rope", || split_heads(g, &qkv, rope));
    drop(qkv);

    let (t, hd, rep) = (g.seq, g.head_dim, g.rep());
    let np = g.batch * g.heads * t * t;
    let (mut p, mut yh) = (Vec::with_capacity(np), Vec::with_capacity(rows * h));
    timed("fwd.attention", || {
        slots(&mut p, np)
            .par_chunks_mut(rep * t * t)
            .zip(slots(&mut yh, rows * h).par_chunks_mut(rep * t * hd))
            .zip(q.par_chunks(rep * t * hd))
            .zip(k.par_chunks(t * hd).zip(v.par_chunks(t * hd)))
            .for_each(|(((p, y), q), (k, v))| {
                simd(
                    #[inline(always)]
                    || attention_block(q, k, v, p, y, t),
                )
            })
    });
    // SAFETY: one attention block per (sequence, KV head) writes its `rep * t x t` scores and
    // `rep * t x hd` outputs in full, and the blocks tile both buffers.
    unsafe {
        p.set_len(np);
        yh.set_len(rows * h);
    }
    let y = timed("fwd.heads", || heads_to_rows(g, &yh));
    drop(yh);

    let mut xm = timed("fwd.copy", || x.clone());
    timed("fwd.gemm.o", || linear_add(&y, &w.o, h, h, &mut xm));
    let (xn2, r2) = timed("fwd.norm", || rms_forward(&xm, &w.norm2, g.eps));
    let gu = timed("fwd.gemm.gate_up", || {
        linear_new(&xn2, &w.gate_up, h, 2 * i)
    });
    let mut act = Vec::with_capacity(rows * i);
    timed("fwd.swiglu", || {
        slots(&mut act, rows * i)
            .par_chunks_mut(i * ROW_BLOCK)
            .zip(gu.par_chunks(2 * i * ROW_BLOCK))
            .for_each(|(act, gu)| {
                simd(
                    #[inline(always)]
                    || {
                        for (a, gu) in act.chunks_exact_mut(i).zip(gu.chunks_exact(2 * i)) {
                            let (gate, up) = gu.split_at(i);
                            swiglu_row(a, gate, up);
                        }
                    },
                )
            })
    });
    // SAFETY: every row of `act` is written by `swiglu_row` (rows of `gu` pair up one to one).
    unsafe { act.set_len(rows * i) };
    let mut out = timed("fwd.copy", || xm.clone());
    timed("fwd.gemm.down", || {
        linear_add(&act, &w.down, i, h, &mut out)
    });
    let acts = LayerActs {
        x,
        r1,
        xn1,
        q,
        k,
        v,
        p,
        y,
        xm,
        r2,
        xn2,
        gu,
        act,
    };
    (out, acts)
}

/// `src^T x` for `src` (`rows x m`) and `x` (`rows x n`): a weight gradient, `m x n`.
#[allow(unsafe_code)]
pub(crate) fn weight_grad<T: Float>(src: &[T], m: usize, x: &[T], n: usize) -> Vec<T> {
    let rows = x.len() / n;
    let (a, b) = (view(src, 1, m), view(x, n, 1));
    // SAFETY: the GEMM writes all `m x n` elements (row stride n).
    unsafe { filled(m * n, |d| matmul_into(m, n, rows, d, n, a, b, threads())) }
}

/// `src w` for `src` (`rows x n`) and a weight `w` (`n x k`): a linear layer's input gradient,
/// `rows x k`.
#[allow(unsafe_code)]
pub(crate) fn input_grad<T: Float>(src: &[T], n: usize, w: &[T], k: usize) -> Vec<T> {
    let rows = src.len() / n;
    let (a, b) = (view(src, n, 1), view(w, k, 1));
    // SAFETY: the GEMM writes all `rows x k` elements (row stride k).
    unsafe { filled(rows * k, |d| matmul_into(rows, k, n, d, k, a, b, threads())) }
}

/// Backward of [`forward`] for output gradient `dout`: returns the input gradient and, when
/// `weights` is set, the parameter gradients (else the weight GEMMs are skipped).
#[allow(unsafe_code)]
pub(crate) fn backward<T: Float>(
    g: &Geom,
    w: &LayerWeights<T>,
    rope: &Rope<T>,
    a: &LayerActs<T>,
    dout: Vec<T>,
    weights: bool,
) -> (Vec<T>, Option<LayerGrads<T>>) {
    let (rows, h, i, kv) = (g.rows(), g.hidden, g.inter, g.kv());
    let (t, hd, rep) = (g.seq, g.head_dim, g.rep());
    // MLP: out = xm + act Wd^T, act = silu(gate) * up, [gate|up] = xn2 Wgu^T.
    let d_down = weights.then(|| timed("bwd.gemm.dw", || weight_grad(&dout, h, &a.act, i)));
    let dact = timed("bwd.gemm.dx", || input_grad(&dout, h, &w.down, i));
    let mut dgu = Vec::with_capacity(rows * 2 * i);
    timed("bwd.swiglu", || {
        slots(&mut dgu, rows * 2 * i)
            .par_chunks_mut(2 * i * ROW_BLOCK)
            .zip(a.gu.par_chunks(2 * i * ROW_BLOCK))
            .zip(dact.par_chunks(i * ROW_BLOCK))
            .for_each(|((dgu, gu), dact)| {
                simd(
                    #[inline(always)]
                    || {
                        for ((dgu, gu), d) in dgu
                            .chunks_exact_mut(2 * i)
                            .zip(gu.chunks_exact(2 * i))
                            .zip(dact.chunks_exact(i))
                        {
                            let (dg, du) = dgu.split_at_mut(i);
                            let (gate, up) = gu.split_at(i);
                            swiglu_row_backward(dg, du, gate, up, d);
                        }
                    },
                )
            })
    });
    // SAFETY: every row's gate and up halves are written by `swiglu_row_backward`.
    unsafe { dgu.set_len(rows * 2 * i) };
    drop(dact);
    let d_gate_up = weights.then(|| timed("bwd.gemm.dw", || weight_grad(&dgu, 2 * i, &a.xn2, h)));
    let dxn2 = timed("bwd.gemm.dx", || input_grad(&dgu, 2 * i, &w.gate_up, h));
    drop(dgu);
    let mut dxm = dout;
    let d_norm2 = timed("bwd.norm", || {
        rms_backward(&a.xm, &a.r2, &w.norm2, &dxn2, &mut dxm)
    });
    drop(dxn2);

    // Attention: xm = x + y Wo^T.
    let d_o = weights.then(|| timed("bwd.gemm.dw", || weight_grad(&dxm, h, &a.y, h)));
    let dy = timed("bwd.gemm.dx", || input_grad(&dxm, h, &w.o, h));
    let dyh = timed("bwd.heads", || rows_to_heads(g, &dy));
    drop(dy);
    let (nq, nkv) = (rows * h, rows * kv);
    let (mut dq, mut dk, mut dv) = (
        Vec::with_capacity(nq),
        Vec::with_capacity(nkv),
        Vec::with_capacity(nkv),
    );
    let blk = rep * t * hd;
    timed("bwd.attention", || {
        slots(&mut dq, nq)
            .par_chunks_mut(blk)
            .zip(
                slots(&mut dk, nkv)
                    .par_chunks_mut(t * hd)
                    .zip(slots(&mut dv, nkv).par_chunks_mut(t * hd)),
            )
            .zip(a.q.par_chunks(blk).zip(dyh.par_chunks(blk)))
            .zip(a.k.par_chunks(t * hd).zip(a.v.par_chunks(t * hd)))
            .zip(a.p.par_chunks(rep * t * t))
            .for_each(|((((dq, (dk, dv)), (q, dy)), (k, v)), p)| {
                let mut ds = Vec::with_capacity(p.len());
                let ds = slots(&mut ds, p.len());
                simd(
                    #[inline(always)]
                    || attention_block_backward(q, k, v, p, dy, ds, dq, dk, dv, t),
                );
            })
    });
    // SAFETY: one block per (sequence, KV head) writes its dq, dk and dv in full, and the blocks
    // tile the three buffers.
    unsafe {
        dq.set_len(nq);
        dk.set_len(nkv);
        dv.set_len(nkv);
    }
    drop(dyh);
    let dqkv = timed("bwd.rope", || merge_heads(g, &dq, &dk, &dv, rope));
    drop((dq, dk, dv));
    let d_qkv = weights.then(|| timed("bwd.gemm.dw", || weight_grad(&dqkv, g.qkv(), &a.xn1, h)));
    let dxn1 = timed("bwd.gemm.dx", || input_grad(&dqkv, g.qkv(), &w.qkv, h));
    drop(dqkv);
    let mut dx = dxm;
    let d_norm1 = timed("bwd.norm", || {
        rms_backward(&a.x, &a.r1, &w.norm1, &dxn1, &mut dx)
    });

    let grads = match (d_qkv, d_o, d_gate_up, d_down) {
        (Some(qkv), Some(o), Some(gu), Some(down)) => timed("bwd.copy", || {
            let (q, rest) = qkv.split_at(h * h);
            let (k, v) = rest.split_at(kv * h);
            let (gate, up) = gu.split_at(i * h);
            Some([
                d_norm1,
                q.to_vec(),
                k.to_vec(),
                v.to_vec(),
                o,
                d_norm2,
                gate.to_vec(),
                up.to_vec(),
                down,
            ])
        }),
        _ => None,
    };
    (dx, grads)
}

/// A stage's forward pass kept for backward, in the shard's float type.
pub(crate) enum StagePass {
    F32(StageSaved<f32>),
    F64(StageSaved<f64>),
}

/// The weights the layers used (shared with the shard's cache and other passes) and each
/// layer's activations, for layers `first..` in order.
pub(crate) struct StageSaved<T> {
    geom: Geom,
    rope: Rope<T>,
    first: usize,
    weights: Arc<[LayerWeights<T>]>,
    acts: Vec<LayerActs<T>>,
}

/// A shard's flat copy of a stage's layer weights, in its float type.
pub(crate) enum StageWeights {
    F32(Arc<[LayerWeights<f32>]>),
    F64(Arc<[LayerWeights<f64>]>),
}

/// Wraps a typed pass into [`StagePass`], and typed weights into [`StageWeights`].
pub(crate) trait IntoPass: Float {
    fn into_pass(s: StageSaved<Self>) -> StagePass;
    fn wrap(w: Arc<[LayerWeights<Self>]>) -> StageWeights;
    fn unwrap(w: &StageWeights) -> Option<Arc<[LayerWeights<Self>]>>;
}
impl IntoPass for f32 {
    fn into_pass(s: StageSaved<Self>) -> StagePass {
        StagePass::F32(s)
    }
    fn wrap(w: Arc<[LayerWeights<Self>]>) -> StageWeights {
        StageWeights::F32(w)
    }
    fn unwrap(w: &StageWeights) -> Option<Arc<[LayerWeights<Self>]>> {
        match w {
            StageWeights::F32(w) => Some(w.clone()),
            StageWeights::F64(_) => None,
        }
    }
}
impl IntoPass for f64 {
    fn into_pass(s: StageSaved<Self>) -> StagePass {
        StagePass::F64(s)
    }
    fn wrap(w: Arc<[LayerWeights<Self>]>) -> StageWeights {
        StageWeights::F64(w)
    }
    fn unwrap(w: &StageWeights) -> Option<Arc<[LayerWeights<Self>]>> {
        match w {
            StageWeights::F64(w) => Some(w.clone()),
            StageWeights::F32(_) => None,
        }
    }
}

/// Layers `first..first + weights.len()` forward on `x` (`rows x hidden`).
pub(crate) fn stage_forward<T: Float>(
    geom: Geom,
    tables: &RopeTables,
    first: usize,
    weights: Arc<[LayerWeights<T>]>,
    x: Vec<T>,
) -> (Vec<T>, StageSaved<T>) {
    let rope = Rope::new(tables, geom.seq);
    let mut acts = Vec::with_capacity(weights.len());
    let mut cur = x;
    for w in weights.iter() {
        let (y, a) = forward(&geom, w, &rope, cur);
        acts.push(a);
        cur = y;
    }
    let saved = StageSaved {
        geom,
        rope,
        first,
        weights,
        acts,
    };
    (cur, saved)
}

/// Backward of [`stage_forward`]: the input gradient and, when `weights` is set, each layer's
/// parameter gradients as `(layer index, grads)` in layer order.
pub(crate) fn stage_backward<T: Float>(
    s: &StageSaved<T>,
    dout: Vec<T>,
    weights: bool,
) -> (Vec<T>, Vec<(usize, LayerGrads<T>)>) {
    let mut grads = Vec::new();
    let mut d = dout;
    for (l, (w, acts)) in s.weights.iter().zip(&s.acts).enumerate().rev() {
        let (dx, g) = backward(&s.geom, w, &s.rope, acts, d, weights);
        if let Some(g) = g {
            grads.push((s.first + l, g));
        }
        d = dx;
    }
    grads.reverse();
    (d, grads)
}

impl<T> StageSaved<T> {
    /// `(batch, seq, hidden)` of the pass.
    pub(crate) fn dims(&self) -> (usize, usize, usize) {
        (self.geom.batch, self.geom.seq, self.geom.hidden)
    }

    /// Bytes of the activations kept for backward (the weights are the shard's, shared).
    pub(crate) fn bytes(&self) -> u64 {
        let elems: usize = self
            .acts
            .iter()
            .map(|a| {
                [
                    &a.x, &a.r1, &a.xn1, &a.q, &a.k, &a.v, &a.p, &a.y, &a.xm, &a.r2, &a.xn2, &a.gu,
                    &a.act,
                ]
                .iter()
                .map(|v| v.len())
                .sum::<usize>()
            })
            .sum();
        (elems * std::mem::size_of::<T>()) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The blocked SwiGLU kernels give bitwise what the formula gives element by element, in
    /// the blocks and in the remainder (37 = 2 blocks + 5), inside and outside [`simd`].
    #[test]
    #[allow(unsafe_code)]
    fn swiglu_kernels_match_the_formula_bitwise() {
        let n = 37;
        let g: Vec<f32> = (0..n).map(|j| j as f32 * 0.61 - 11.0).collect();
        let u: Vec<f32> = (0..n).map(|j| 3.0 - j as f32 * 0.17).collect();
        let d: Vec<f32> = (0..n).map(|j| (j as f32 * 0.37).sin()).collect();
        let sig = |x: f32| 1.0 / (1.0 + crate::ops::expf(-x));
        for wide in [false, true] {
            let (mut a, mut dg, mut du) = (
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
            );
            let (sa, sg, su) = (slots(&mut a, n), slots(&mut dg, n), slots(&mut du, n));
            let mut run = || {
                swiglu_row(sa, &g, &u);
                swiglu_row_backward(sg, su, &g, &u, &d);
            };
            if wide {
                simd(run);
            } else {
                run();
            }
            // SAFETY: the kernels write every slot of their outputs (what the test checks).
            unsafe {
                a.set_len(n);
                dg.set_len(n);
                du.set_len(n);
            }
            for j in 0..n {
                let s = sig(g[j]);
                assert_eq!(a[j].to_bits(), (g[j] * s * u[j]).to_bits(), "{j}");
                let want = d[j] * u[j] * s * (1.0 + g[j] * (1.0 - s));
                assert_eq!(dg[j].to_bits(), want.to_bits(), "{j}");
                assert_eq!(du[j].to_bits(), (d[j] * g[j] * s).to_bits(), "{j}");
            }
        }
    }
}
