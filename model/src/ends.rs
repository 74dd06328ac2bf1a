//! The ends of the model written by hand over flat buffers, like the decoder layers
//! ([`crate::layer`]): the token embedding, and the head (final RMSNorm, LM head, mean
//! cross-entropy), forward and backward.
//!
//! Why not candle's autograd: each graph node costs a zero-filled gradient and an add, the LM
//! head's transposed weight was copied both ways, and cross-entropy ran on one thread. Here the
//! head is one RMSNorm pass, one GEMM, and one pass that computes the loss and its gradient with
//! respect to the logits together (kept for backward instead of the logits).
//!
//! Determinism as in the layers: rows are independent, per-block loss partials are added in block
//! order, the embedding gradient adds rows in token order; no result depends on the thread count.

use rayon::prelude::*;

use crate::layer::{self, Float, ROW_BLOCK};

/// What the head's backward needs from its forward.
pub(crate) struct HeadSaved<T> {
    /// The head's input rows, their inverse RMS and normalised, weighted rows.
    x: Vec<T>,
    r: Vec<T>,
    xn: Vec<T>,
    /// d(mean loss)/d(logits): `(softmax(logits) - onehot(target)) / rows`, `rows x vocab`.
    dlogits: Vec<T>,
    seq: usize,
}

impl<T> HeadSaved<T> {
    /// `(batch, seq)` of the pass.
    pub(crate) fn dims(&self) -> (usize, usize) {
        let rows = self.r.len();
        (rows / self.seq, self.seq)
    }
}

/// A head forward kept for backward, in the shard's float type.
pub(crate) enum HeadPass {
    F32(HeadSaved<f32>),
    F64(HeadSaved<f64>),
}

/// Wraps a typed head pass into [`HeadPass`].
pub(crate) trait IntoHead: Float {
    fn into_head(s: HeadSaved<Self>) -> HeadPass;
}
impl IntoHead for f32 {
    fn into_head(s: HeadSaved<Self>) -> HeadPass {
        HeadPass::F32(s)
    }
}
impl IntoHead for f64 {
    fn into_head(s: HeadSaved<Self>) -> HeadPass {
        HeadPass::F64(s)
    }
}

/// Normalised rows and logits of `x` (`rows x hidden`): `(logits, xn, r)`.
fn logits_of<T: Float>(x: &[T], norm: &[T], lm: &[T], vocab: usize, eps: f64) -> [Vec<T>; 3] {
    let h = norm.len();
    let (xn, r) = layer::rms_forward(x, norm, eps);
    let logits = layer::linear_new(&xn, lm, h, vocab);
    [logits, xn, r]
}

/// Logits of `x` (`rows x hidden`) for inference: `rows x vocab`.
pub(crate) fn logits<T: Float>(x: &[T], norm: &[T], lm: &[T], vocab: usize, eps: f64) -> Vec<T> {
    let [logits, ..] = logits_of(x, norm, lm, vocab, eps);
    logits
}

/// Head forward on `x` (`rows x hidden`, rows of `seq` positions): the mean cross-entropy of the
/// logits against `targets` (each `< vocab`, checked by the caller) and what backward needs.
pub(crate) fn head_forward<T: Float>(
    x: Vec<T>,
    seq: usize,
    norm: &[T],
    lm: &[T],
    vocab: usize,
    targets: &[u32],
    eps: f64,
) -> (f64, HeadSaved<T>) {
    let [mut d, xn, r] = logits_of(&x, norm, lm, vocab, eps);
    let inv_n = T::f(1.0 / targets.len() as f64);
    // The logits turn into their gradient in place, block by block, each block also giving its
    // summed loss.
    let partials: Vec<f64> = d
        .par_chunks_mut(vocab * ROW_BLOCK)
        .zip(targets.par_chunks(ROW_BLOCK))
        .map(|(d, targets)| {
            crate::ops::simd(
                #[inline(always)]
                || {
                    let mut total = 0f64;
                    for (row, &t) in d.chunks_exact_mut(vocab).zip(targets) {
                        let t = t as usize;
                        let max = layer::max(row);
                        let target = row[t];
                        for a in row.iter_mut() {
                            *a = (*a - max).exp_();
                        }
                        let sum = layer::sum(row);
                        total += (sum.ln_() + max - target).to_f64();
                        let k = inv_n / sum;
                        for a in row.iter_mut() {
                            *a *= k;
                        }
                        row[t] -= inv_n;
                    }
                    total
                },
            )
        })
        .collect();
    let loss = partials.iter().sum::<f64>() / targets.len() as f64;
    let saved = HeadSaved {
        x,
        r,
        xn,
        dlogits: d,
        seq,
    };
    (loss, saved)
}

/// Backward of [`head_forward`] for the loss times `loss_scale`: the input gradient, the final
/// norm weight's gradient and the LM head's (`vocab x hidden`).
pub(crate) fn head_backward<T: Float>(
    s: HeadSaved<T>,
    norm: &[T],
    lm: &[T],
    loss_scale: f64,
) -> [Vec<T>; 3] {
    let h = norm.len();
    let rows = s.x.len() / h;
    let vocab = s.dlogits.len() / rows;
    let mut dl = s.dlogits;
    if loss_scale != 1.0 {
        let k = T::f(loss_scale);
        dl.par_chunks_mut(1 << 14).for_each(|c| {
            for v in c {
                *v *= k;
            }
        });
    }
    let d_lm = layer::weight_grad(&dl, vocab, &s.xn, h);
    let dxn = layer::input_grad(&dl, vocab, lm, h);
    drop(dl);
    let mut dx = vec![T::f(0.0); rows * h];
    let d_norm = layer::rms_backward(&s.x, &s.r, norm, &dxn, &mut dx);
    [dx, d_norm, d_lm]
}

/// Embedding forward: the rows of `table` (`vocab x hidden`) for `tokens` (each `< vocab`).
pub(crate) fn embed_forward<T: Float>(table: &[T], h: usize, tokens: &[u32]) -> Vec<T> {
    let mut out = Vec::with_capacity(tokens.len() * h);
    for &t in tokens {
        let t = t as usize;
        out.extend_from_slice(&table[t * h..(t + 1) * h]);
    }
    out
}

/// Embedding backward: the table's gradient (`vocab x hidden`), rows of `dx` added at their
/// tokens in token order.
pub(crate) fn embed_backward<T: Float>(dx: &[T], h: usize, vocab: usize, tokens: &[u32]) -> Vec<T> {
    let mut d = vec![T::f(0.0); vocab * h];
    for (row, &t) in dx.chunks_exact(h).zip(tokens) {
        let t = t as usize;
        for (a, &v) in d[t * h..(t + 1) * h].iter_mut().zip(row) {
            *a += v;
        }
    }
    d
}

#[cfg(test)]
mod tests {
    //! Forward results against candle-nn's composed (independent) implementations; backward is
    //! checked by finite differences through the shard in `tests/gradcheck.rs`.
    use super::*;
    use candle_core::{Device, Tensor};
    use rand::{Rng, SeedableRng};

    fn rand(n: usize, seed: u64) -> Vec<f64> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-2.0..2.0)).collect()
    }

    #[test]
    fn head_matches_candle_nn() {
        let (rows, h, vocab, eps) = (9, 6, 13, 1e-5);
        let (x, norm, lm) = (rand(rows * h, 1), rand(h, 2), rand(vocab * h, 3));
        let targets: Vec<u32> = (0..rows).map(|i| (i * 5 % vocab) as u32).collect();
        let dev = Device::Cpu;
        let xt = Tensor::from_vec(x.clone(), (rows, h), &dev).unwrap();
        let nt = Tensor::from_vec(norm.clone(), h, &dev).unwrap();
        let lt = Tensor::from_vec(lm.clone(), (vocab, h), &dev).unwrap();
        let xn = candle_nn::ops::rms_norm_slow(&xt, &nt, eps as f32).unwrap();
        let want_logits = xn.matmul(&lt.t().unwrap()).unwrap();
        let tt = Tensor::new(targets.as_slice(), &dev).unwrap();
        let want: f64 = candle_nn::loss::cross_entropy(&want_logits, &tt)
            .unwrap()
            .to_scalar()
            .unwrap();
        let (loss, saved) = head_forward(x.clone(), 3, &norm, &lm, vocab, &targets, eps);
        assert!((loss - want).abs() < 1e-12, "{loss} vs {want}");
        assert_eq!(saved.dims(), (3, 3));
        let got = logits(&x, &norm, &lm, vocab, eps);
        let want = want_logits.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
    }

    #[test]
    fn embedding_gathers_and_scatters_rows() {
        let (h, vocab) = (4, 5);
        let table = rand(vocab * h, 4);
        let tokens = [3u32, 0, 3, 4];
        let x = embed_forward(&table, h, &tokens);
        let dev = Device::Cpu;
        let tt = Tensor::from_vec(table.clone(), (vocab, h), &dev).unwrap();
        let ids = Tensor::new(&tokens[..], &dev).unwrap();
        let want = tt.index_select(&ids, 0).unwrap().flatten_all().unwrap();
        assert_eq!(x, want.to_vec1::<f64>().unwrap());
        let dx = rand(tokens.len() * h, 5);
        let d = embed_backward(&dx, h, vocab, &tokens);
        for c in 0..h {
            assert_eq!(d[3 * h + c], dx[c] + dx[2 * h + c]);
            assert_eq!(d[c], dx[h + c]);
            assert_eq!(d[h + c], 0.0);
        }
    }
}
