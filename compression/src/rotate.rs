//! Randomized Hadamard rotation: `y = H·D·x / sqrt(n)` per block of `n` (a power of two).
//!
//! An orthogonal rotation spreads an outlier's energy over the whole block, so an absmax scale is
//! no longer set by one huge value and low-bit quantization keeps the rest. The signs `D` come from
//! a counter-based hash of (seed, position): the same seed gives the same rotation on every
//! machine, with no RNG state to carry.

/// SplitMix64 finalizer: a well-mixed 64-bit word per counter.
#[inline(always)]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The f32 sign-bit masks of a sign word's 64 elements, as one array so that the XOR with them
/// runs on whole vectors (per-byte table rows made it a scalar loop).
#[inline(always)]
fn sign_masks(word: u64) -> [u32; 64] {
    std::array::from_fn(|j| ((word >> j) as u32) << 31)
}

/// Flips the sign of element `i` of `v` (at absolute position `at + i`, `at` a multiple of 64)
/// when bit `i % 64` of the seeded word `i / 64` is set.
#[inline(always)]
fn apply_signs(v: &mut [f32], at: usize, seed: u64) {
    debug_assert!(at.is_multiple_of(64));
    for (w, chunk) in v.chunks_mut(64).enumerate() {
        let word = sign_word(seed, at / 64 + w);
        let m = sign_masks(word);
        for (x, &m) in chunk.iter_mut().zip(&m) {
            *x = f32::from_bits(x.to_bits() ^ m);
        }
    }
}

/// The sign word of the 64 elements at absolute position `64 * w`.
#[inline(always)]
fn sign_word(seed: u64, w: usize) -> u64 {
    mix(seed ^ (w as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// Spans 1, 2 and 4 of the transform on eight values in registers (the strided loop of
/// [`fwht_from`] is slow for spans shorter than a vector).
#[inline(always)]
fn first_three(x: [f32; 8]) -> [f32; 8] {
    let y = [
        x[0] + x[1],
        x[0] - x[1],
        x[2] + x[3],
        x[2] - x[3],
        x[4] + x[5],
        x[4] - x[5],
        x[6] + x[7],
        x[6] - x[7],
    ];
    let z = [
        y[0] + y[2],
        y[1] + y[3],
        y[0] - y[2],
        y[1] - y[3],
        y[4] + y[6],
        y[5] + y[7],
        y[4] - y[6],
        y[5] - y[7],
    ];
    [
        z[0] + z[4],
        z[1] + z[5],
        z[2] + z[6],
        z[3] + z[7],
        z[0] - z[4],
        z[1] - z[5],
        z[2] - z[6],
        z[3] - z[7],
    ]
}

/// The spans from `h` up of the unnormalized transform of `a` (a power of two long). Two spans
/// per pass over the block while two remain (each element gets the same operations in the same
/// order as span by span, so the same bits), which loads and stores the block half as often.
#[inline(always)]
fn fwht_from(a: &mut [f32], mut h: usize) {
    let n = a.len();
    while 4 * h <= n {
        for quad in a.chunks_exact_mut(4 * h) {
            let (q01, q23) = quad.split_at_mut(2 * h);
            let (q0, q1) = q01.split_at_mut(h);
            let (q2, q3) = q23.split_at_mut(h);
            for (((x0, x1), x2), x3) in q0.iter_mut().zip(q1).zip(q2).zip(q3) {
                // Span h, then span 2h.
                let (a0, a1) = (*x0 + *x1, *x0 - *x1);
                let (a2, a3) = (*x2 + *x3, *x2 - *x3);
                *x0 = a0 + a2;
                *x1 = a1 + a3;
                *x2 = a0 - a2;
                *x3 = a1 - a3;
            }
        }
        h *= 4;
    }
    if h < n {
        for pair in a.chunks_exact_mut(2 * h) {
            let (lo, hi) = pair.split_at_mut(h);
            for (x, y) in lo.iter_mut().zip(hi.iter_mut()) {
                let (a, b) = (*x, *y);
                *x = a + b;
                *y = a - b;
            }
        }
    }
}

/// In-place unnormalized fast Walsh-Hadamard transform; `a.len()` is a power of two. Stages run
/// in the order of span 1, 2, 4, ..., each element's sums in the same order whatever the vector
/// width, so the bits are the same on every CPU (the audits compare frames by hash).
#[inline(always)]
fn fwht(a: &mut [f32]) {
    let n = a.len();
    if n >= 8 {
        for q in a.chunks_exact_mut(8) {
            let x: [f32; 8] = q.try_into().expect("8");
            q.copy_from_slice(&first_three(x));
        }
        fwht_from(a, 8);
    } else if n >= 4 {
        for q in a.chunks_exact_mut(4) {
            let (a0, a1, a2, a3) = (q[0] + q[1], q[0] - q[1], q[2] + q[3], q[2] - q[3]);
            q[0] = a0 + a2;
            q[1] = a1 + a3;
            q[2] = a0 - a2;
            q[3] = a1 - a3;
        }
        fwht_from(a, 4);
    } else {
        fwht_from(a, 1);
    }
}

#[inline(always)]
fn scale(a: &mut [f32]) {
    let s = 1.0 / (a.len() as f32).sqrt();
    for x in a {
        *x *= s;
    }
}

/// One block of 64 or more values (a multiple of 64) at absolute position `at` (a multiple of
/// 64), forward or back, while it is in cache: the inverse's signs ride on the scaling.
#[inline(always)]
fn block_pass(chunk: &mut [f32], at: usize, seed: u64, inverse: bool) {
    let flip = |x: f32, m: u32| f32::from_bits(x.to_bits() ^ m);
    let s = 1.0 / (chunk.len() as f32).sqrt();
    if !inverse {
        apply_signs(chunk, at, seed);
    }
    fwht(chunk);
    for (w, c64) in chunk.chunks_exact_mut(64).enumerate() {
        let word = if inverse {
            sign_word(seed, at / 64 + w)
        } else {
            0
        };
        let m = sign_masks(word);
        for (x, &m) in c64.iter_mut().zip(&m) {
            *x = flip(*x * s, m);
        }
    }
}

/// Every full block of `v` in place, forward or back.
#[inline(always)]
fn blocks(v: &mut [f32], block: usize, seed: u64, inverse: bool) {
    let full = v.len() / block * block;
    if block >= 64 {
        for (b, chunk) in v[..full].chunks_exact_mut(block).enumerate() {
            block_pass(chunk, b * block, seed, inverse);
        }
        return;
    }
    // Blocks smaller than a sign word: the signs in a pass of their own.
    if !inverse {
        apply_signs(&mut v[..full], 0, seed);
    }
    for chunk in v[..full].chunks_exact_mut(block) {
        fwht(chunk);
        scale(chunk);
    }
    if inverse {
        apply_signs(&mut v[..full], 0, seed);
    }
}

/// [`blocks`] on the widest vectors this CPU has.
fn dispatch(v: &mut [f32], block: usize, seed: u64, inverse: bool) {
    crate::simd::widest(
        #[inline(always)]
        || blocks(v, block, seed, inverse),
    )
}

/// Rotates every full block of `v` in place; a short last block is left as is.
pub(crate) fn forward(v: &mut [f32], block: usize, seed: u64) {
    dispatch(v, block, seed, false)
}

/// Undoes [`forward`] (H is symmetric and H·H = n·I).
pub(crate) fn inverse(v: &mut [f32], block: usize, seed: u64) {
    dispatch(v, block, seed, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inverse_undoes_forward_and_preserves_norm() {
        let orig: Vec<f32> = (0..1000)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        for block in [1usize, 2, 64, 256] {
            let mut v = orig.clone();
            forward(&mut v, block, 42);
            let n0: f64 = orig.iter().map(|&x| (x as f64).powi(2)).sum();
            let n1: f64 = v.iter().map(|&x| (x as f64).powi(2)).sum();
            assert!(
                (n0 - n1).abs() / n0 < 1e-5,
                "block {block}: rotation is orthogonal"
            );
            if block > 1 {
                assert_ne!(v, orig);
            }
            // The tail past the last full block is untouched.
            let tail = orig.len() / block * block;
            assert_eq!(v[tail..], orig[tail..]);
            inverse(&mut v, block, 42);
            for (a, b) in v.iter().zip(&orig) {
                assert!((a - b).abs() < 1e-4, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn fwht_matches_the_definition() {
        // H[i][j] = (-1)^popcount(i & j).
        for n in [1usize, 2, 4, 8, 32] {
            let x: Vec<f32> = (0..n).map(|i| (i as f32 * 1.7).sin()).collect();
            let mut y = x.clone();
            fwht(&mut y);
            for (i, yi) in y.iter().enumerate() {
                let want: f32 = (0..n)
                    .map(|j| {
                        if (i & j).count_ones() % 2 == 0 {
                            x[j]
                        } else {
                            -x[j]
                        }
                    })
                    .sum();
                assert!((yi - want).abs() < 1e-4, "n={n} i={i}");
            }
        }
    }

    #[test]
    fn outlier_is_spread() {
        let mut v = vec![0.01f32; 64];
        v[5] = 100.0;
        forward(&mut v, 64, 7);
        let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(max < 100.0 / 8.0 + 1.0, "max {max}");
    }

    /// The original per-bit signs and span-by-span transform: the faster paths must give the
    /// same bits (frames from peers on different CPUs and versions hash alike).
    fn reference(v: &mut [f32], block: usize, seed: u64, inverse: bool) {
        let full = v.len() / block * block;
        let signs = |v: &mut [f32]| {
            for (w, chunk) in v.chunks_mut(64).enumerate() {
                let word = mix(seed ^ (w as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                for (j, x) in chunk.iter_mut().enumerate() {
                    let bit = ((word >> j) & 1) as u32;
                    *x = f32::from_bits(x.to_bits() ^ (bit << 31));
                }
            }
        };
        if !inverse {
            signs(&mut v[..full]);
        }
        for chunk in v[..full].chunks_exact_mut(block) {
            let n = chunk.len();
            let mut h = 1;
            while h < n {
                for pair in chunk.chunks_exact_mut(2 * h) {
                    let (lo, hi) = pair.split_at_mut(h);
                    for (x, y) in lo.iter_mut().zip(hi.iter_mut()) {
                        let (a, b) = (*x, *y);
                        *x = a + b;
                        *y = a - b;
                    }
                }
                h *= 2;
            }
            let s = 1.0 / (n as f32).sqrt();
            for x in chunk {
                *x *= s;
            }
        }
        if inverse {
            signs(&mut v[..full]);
        }
    }

    #[test]
    fn every_path_gives_the_reference_bits() {
        let orig: Vec<f32> = (0..5000)
            .map(|i| ((i * 7919 % 2003) as f32 - 1000.0) * 1.37e-3)
            .collect();
        for block in [1usize, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096] {
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            for inv in [false, true] {
                let mut want = orig.clone();
                reference(&mut want, block, 99, inv);
                let mut fast = orig.clone();
                dispatch(&mut fast, block, 99, inv);
                let mut portable = orig.clone();
                blocks(&mut portable, block, 99, inv);
                assert_eq!(bits(&fast), bits(&want), "block {block}, inverse {inv}");
                assert_eq!(
                    bits(&portable),
                    bits(&want),
                    "block {block}, inverse {inv}, portable"
                );
            }
        }
    }

    #[test]
    fn seed_changes_signs() {
        let mut a = vec![1.0f32; 64];
        let mut b = a.clone();
        forward(&mut a, 64, 1);
        forward(&mut b, 64, 2);
        assert_ne!(a, b);
    }
}
