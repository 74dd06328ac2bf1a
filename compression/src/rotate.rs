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

/// Flips the sign of element `i` of `v` when bit `i % 64` of the seeded word `i / 64` is set.
fn apply_signs(v: &mut [f32], seed: u64) {
    for (w, chunk) in v.chunks_mut(64).enumerate() {
        let word = mix(seed ^ (w as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        for (j, x) in chunk.iter_mut().enumerate() {
            let bit = ((word >> j) & 1) as u32;
            *x = f32::from_bits(x.to_bits() ^ (bit << 31));
        }
    }
}

/// In-place unnormalized fast Walsh-Hadamard transform; `a.len()` is a power of two.
fn fwht(a: &mut [f32]) {
    let n = a.len();
    let mut h = 1;
    if n >= 4 {
        // The first two stages together on groups of four: the generic loop below is slow for
        // spans of 1 and 2.
        for q in a.chunks_exact_mut(4) {
            let (a0, a1, a2, a3) = (q[0] + q[1], q[0] - q[1], q[2] + q[3], q[2] - q[3]);
            q[0] = a0 + a2;
            q[1] = a1 + a3;
            q[2] = a0 - a2;
            q[3] = a1 - a3;
        }
        h = 4;
    }
    while h < n {
        for pair in a.chunks_exact_mut(2 * h) {
            let (lo, hi) = pair.split_at_mut(h);
            for (x, y) in lo.iter_mut().zip(hi.iter_mut()) {
                let (a, b) = (*x, *y);
                *x = a + b;
                *y = a - b;
            }
        }
        h *= 2;
    }
}

fn scale(a: &mut [f32]) {
    let s = 1.0 / (a.len() as f32).sqrt();
    for x in a {
        *x *= s;
    }
}

/// Rotates every full block of `v` in place; a short last block is left as is.
pub(crate) fn forward(v: &mut [f32], block: usize, seed: u64) {
    let full = v.len() / block * block;
    apply_signs(&mut v[..full], seed);
    for chunk in v[..full].chunks_exact_mut(block) {
        fwht(chunk);
        scale(chunk);
    }
}

/// Undoes [`forward`] (H is symmetric and H·H = n·I).
pub(crate) fn inverse(v: &mut [f32], block: usize, seed: u64) {
    let full = v.len() / block * block;
    for chunk in v[..full].chunks_exact_mut(block) {
        fwht(chunk);
        scale(chunk);
    }
    apply_signs(&mut v[..full], seed);
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

    #[test]
    fn seed_changes_signs() {
        let mut a = vec![1.0f32; 64];
        let mut b = a.clone();
        forward(&mut a, 64, 1);
        forward(&mut b, 64, 2);
        assert_ne!(a, b);
    }
}
