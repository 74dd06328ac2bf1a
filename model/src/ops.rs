//! The float trait the hand-written passes are generic over, and the RoPE tables.
//! The passes themselves are in `layer.rs` (decoder layers) and `ends.rs` (embedding, head).

use std::sync::Arc;

/// The float types the passes run on; f64 exists for tight gradient checks.
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
}

impl Real for f32 {
    fn f(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn exp_(self) -> Self {
        expf(self)
    }
    fn ln_(self) -> Self {
        self.ln()
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
}

/// Runs `f` compiled for the widest instruction set this CPU has (AVX-512, else AVX2 + FMA, else
/// the x86-64 baseline), picked at run time. The release build targets plain x86-64, whose
/// 4-lane SSE2 made the elementwise passes (SiLU, softmax, norms, AdamW) compute-bound; inside
/// `f` the compiler vectorizes the same loops 16 lanes wide. Only code inlined into the dispatched
/// function gets the features: mark the closure `#[inline(always)]` (it is called from one arm
/// per instruction set, so it is not inlined on its own) and the functions it calls too.
///
/// The bits do not change: Rust never contracts `a * b + c` into an FMA, so each lane does the same
/// correctly rounded IEEE operations in the same order whatever the instruction set.
#[inline(always)]
pub(crate) fn simd<R>(f: impl FnOnce() -> R) -> R {
    pulp::Arch::new().dispatch(f)
}

/// `e^x` for f32 without a libm call, so that loops over it vectorize (softmax, SiLU and
/// cross-entropy spent most of their time in scalar `expf`). Cephes' `expf` scheme:
/// `e^x = 2^n e^r` with `n = round(x / ln 2)`, `|r| <= ln 2 / 2`, and a degree-6 polynomial for
/// `e^r`; within 2 ulp of `f32::exp` over the whole range (tested below). Branch-free: below
/// the smallest normal result it returns 0, above 88.37 (just under `ln(f32::MAX)`) infinity,
/// NaN stays NaN.
#[inline(always)]
pub(crate) fn expf(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer (ties to even).
    const ROUND: f32 = 12_582_912.0;
    const LO: f32 = -87.336_55;
    // n = round(HI / ln 2) = 127, so 2^n is a normal float and e^HI < f32::MAX.
    const HI: f32 = 88.37;
    let xc = x.clamp(LO, HI);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let z = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let er = p * z + r + 1.0;
    // n is in -126..=127 after the clamp: 2^n is a normal float, built from its exponent bits.
    let y = er * f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < LO {
        0.0
    } else if x > HI {
        f32::INFINITY
    } else {
        y
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

#[cfg(test)]
mod tests {
    use super::{expf, simd};

    /// The elementwise math of the passes (SiLU and its derivative, AdamW's root and division)
    /// gives the same bits compiled wide inside [`simd`] as one element at a time in the
    /// baseline instruction set: no contraction into FMAs, no reordering.
    #[test]
    fn simd_dispatch_keeps_the_bits() {
        fn f(g: f32, u: f32) -> [f32; 3] {
            let s = 1.0 / (1.0 + expf(-g));
            let v = g * g * 0.05 + u * u;
            [
                g * s * u,
                u * s * (1.0 + g * (1.0 - s)),
                0.9 * g - 1e-3 * u / (v.sqrt() + 1e-8),
            ]
        }
        let n = 10_007;
        let g: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 2003) as f32 / 97.0 - 10.0)
            .collect();
        let u: Vec<f32> = (0..n)
            .map(|i| ((i * 104_729) % 1009) as f32 / 53.0 - 9.0)
            .collect();
        let mut wide = vec![[0f32; 3]; n];
        simd(
            #[inline(always)]
            || {
                for ((o, &g), &u) in wide.iter_mut().zip(&g).zip(&u) {
                    *o = f(g, u);
                }
            },
        );
        for i in 0..n {
            // black_box: one element per call, so nothing here is vectorized.
            let want = f(std::hint::black_box(g[i]), std::hint::black_box(u[i]));
            assert_eq!(
                wide[i].map(f32::to_bits),
                want.map(f32::to_bits),
                "element {i}"
            );
        }
    }

    /// Distance in units in the last place between two finite positive floats.
    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn expf_is_within_two_ulp_of_std() {
        let mut worst = 0;
        let mut x = -87.0f32;
        while x < 88.3 {
            let (got, want) = (expf(x), x.exp());
            worst = worst.max(ulps(got, want));
            x += 0.000_37;
        }
        assert!(worst <= 2, "worst error {worst} ulp");
        assert_eq!(expf(0.0), 1.0);
        assert_eq!(expf(-100.0), 0.0);
        assert_eq!(expf(f32::NEG_INFINITY), 0.0);
        assert_eq!(expf(100.0), f32::INFINITY);
        assert!(expf(f32::NAN).is_nan());
    }
}
