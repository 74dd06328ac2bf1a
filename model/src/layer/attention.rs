//! Causal attention for one (sequence, KV head) block, forward and backward, over flat buffers
//! (see the parent module for the layout and the determinism rules).

use gemm::Parallelism;

use super::{Float, Slots, matmul_into, max, sum, view, written};

/// Causal softmax of `scale * s` in place; row `r` is position `r % t` and sees keys `0..=r % t`.
#[inline(always)]
fn causal_softmax_rows<T: Float>(s: &mut [T], t: usize, scale: T) {
    for (r, row) in s.chunks_exact_mut(t).enumerate() {
        let n = r % t + 1;
        // scale > 0, so the largest scaled score is the scaled largest score.
        let m = max(&row[..n]) * scale;
        // The exponentials and the scaling run over whole vectors (`0..w`), the masked lanes
        // set to 0, so no element takes a scalar remainder loop; the sum stays over `0..n` in
        // its fixed order.
        let w = n.next_multiple_of(VW).min(t);
        for (j, v) in row[..w].iter_mut().enumerate() {
            let e = (*v * scale - m).exp_();
            *v = if j < n { e } else { T::f(0.0) };
        }
        let inv = T::f(1.0) / sum(&row[..n]);
        for v in &mut row[..w] {
            *v *= inv;
        }
        for v in &mut row[w..] {
            *v = T::f(0.0);
        }
    }
}

/// Lanes of the widest vectors of f32 (AVX-512).
const VW: usize = 16;

/// Query positions per block of the causal attention GEMMs. Positions `a..b` see keys `0..b`
/// only, so the products skip the blocks above the diagonal (about 40% of the square at
/// t = 128), the way flash attention's causal kernels do.
const QB: usize = 64;

/// The causal blocks of one `t`-position head: `(a, b)` for positions `a..b`.
fn causal_blocks(t: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t).step_by(QB).map(move |a| (a, (a + QB).min(t)))
}

/// `dst (rows x t, row stride t) = a b^T` for `a` (`rows x hd`, the rows of `rep` heads of `t`
/// positions) and `b` (`t x hd`), computed only left of each block's diagonal end; the rest of
/// each row is written 0. Entries left of the end but above the diagonal are computed (the caller
/// masks them).
#[inline(always)]
fn causal_scores<T: Float>(a: &[T], b: &[T], dst: &mut Slots<T>, t: usize) {
    let hd = b.len() / t;
    for r0 in (0..a.len() / (t * hd)).map(|j| j * t) {
        for (lo, hi) in causal_blocks(t) {
            let (r, m) = (r0 + lo, hi - lo);
            let d = &mut dst[r * t..];
            matmul_into(
                m,
                hi,
                hd,
                d,
                t,
                view(&a[r * hd..], hd, 1),
                view(b, 1, hd),
                Parallelism::None,
            );
            for row in d.chunks_mut(t).take(m) {
                for z in &mut row[hi..] {
                    z.write(T::f(0.0));
                }
            }
        }
    }
}

/// `dst (rows x hd) = s x` for causal `s` (`rows x t`, the rows of `rep` heads of `t` positions,
/// 0 right of each block's end) and `x` (`t x hd`): each block of rows over the keys it sees.
#[inline(always)]
fn causal_rows<T: Float>(s: &[T], x: &[T], dst: &mut Slots<T>, t: usize) {
    let hd = x.len() / t;
    for r0 in (0..s.len() / (t * t)).map(|j| j * t) {
        for (lo, hi) in causal_blocks(t) {
            let r = r0 + lo;
            matmul_into(
                hi - lo,
                hd,
                hi,
                &mut dst[r * hd..],
                hd,
                view(&s[r * t..], t, 1),
                view(x, hd, 1),
                Parallelism::None,
            );
        }
    }
}

/// Attention for one (sequence, KV head): `q` is `rep * t x hd`, `k`, `v` are `t x hd`.
/// Writes probabilities into `p` (`rep * t x t`) and the output into `y` (`rep * t x hd`).
#[inline(always)]
#[allow(unsafe_code)]
pub(super) fn attention_block<T: Float>(
    q: &[T],
    k: &[T],
    v: &[T],
    p: &mut Slots<T>,
    y: &mut Slots<T>,
    t: usize,
) {
    let hd = k.len() / t;
    let scale = T::f(1.0 / (hd as f64).sqrt());
    causal_scores(q, k, p, t);
    // SAFETY: `causal_scores` wrote all `rows x t` scores (the masked tail as 0).
    let p = unsafe { written(p) };
    causal_softmax_rows(p, t, scale);
    causal_rows(p, v, y, t);
}

/// Backward of [`attention_block`] given `dy`; `ds` is scratch of `p`'s size. Writes every
/// slot of `ds`, `dq`, `dk` and `dv`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
#[allow(unsafe_code)]
pub(super) fn attention_block_backward<T: Float>(
    q: &[T],
    k: &[T],
    v: &[T],
    p: &[T],
    dy: &[T],
    ds: &mut Slots<T>,
    dq: &mut Slots<T>,
    dk: &mut Slots<T>,
    dv: &mut Slots<T>,
    t: usize,
) {
    let hd = k.len() / t;
    let rows = q.len() / hd;
    let scale = T::f(1.0 / (hd as f64).sqrt());
    let none = Parallelism::None;
    // dP = dY V^T, left of each block's diagonal end (0 beyond, where P is 0 too).
    causal_scores(dy, v, ds, t);
    // SAFETY: `causal_scores` wrote all `rows x t` elements of dP.
    let ds = unsafe { written(ds) };
    // dV = P^T dY: keys `lo..hi` are seen by the rows from position `lo` on, which lie in rows
    // `lo..` (rows of later heads before their position `lo` hold P = 0 there).
    let key_grads = |src: &[T], x: &[T], dst: &mut Slots<T>| {
        for (lo, hi) in causal_blocks(t) {
            matmul_into(
                hi - lo,
                hd,
                rows - lo,
                &mut dst[lo * hd..],
                hd,
                view(&src[lo * t + lo..], 1, t),
                view(&x[lo * hd..], hd, 1),
                none,
            );
        }
    };
    key_grads(p, dy, dv);
    // dS = scale * P * (dP - rowsum(P * dP)); masked entries have P = 0.
    // Over whole vectors up to each row's diagonal (`0..w`); beyond it P and dS are 0.
    let mut prod = vec![T::f(0.0); t];
    for (r, (pr, dr)) in p.chunks_exact(t).zip(ds.chunks_exact_mut(t)).enumerate() {
        let w = (r % t + 1).next_multiple_of(VW).min(t);
        for ((o, &a), &b) in prod.iter_mut().zip(&pr[..w]).zip(dr.iter()) {
            *o = a * b;
        }
        let dot = sum(&prod[..w]);
        for (d, &a) in dr[..w].iter_mut().zip(pr) {
            *d = scale * a * (*d - dot);
        }
        for d in &mut dr[w..] {
            *d = T::f(0.0);
        }
    }
    // dQ = dS K; dK = dS^T Q.
    causal_rows(ds, k, dq, t);
    key_grads(ds, q, dk);
}
