//! Value codings: fp32, fp16, bf16 casts and blockwise absmax 8/4/2-bit quantization.
//!
//! Loops are written so that LLVM vectorizes them on baseline x86-64 (SSE2): magnitudes are
//! compared as integers and rounding uses the 1.5·2^23 trick instead of `f32::round` (a libm call
//! without SSE4.1).

use crate::codec::Values;
use crate::error::{Error, Result};

/// Adding this to `|v| < 2^22` rounds `v` to the nearest integer (ties to even) in the mantissa.
const MAGIC: f32 = 12_582_912.0;
const MAGIC_BITS: i32 = 0x4B40_0000;

#[inline(always)]
fn round_i32(v: f32) -> i32 {
    (v + MAGIC).to_bits() as i32 - MAGIC_BITS
}

/// Largest magnitude of `v` as bits (non-finite values give `>= 0x7f80_0000`).
#[inline(always)]
fn absmax_bits(v: &[f32]) -> u32 {
    let mut m = 0u32;
    for &x in v {
        m = m.max(x.to_bits() & 0x7fff_ffff);
    }
    m
}

fn first_non_finite(v: &[f32]) -> usize {
    v.iter().position(|x| !x.is_finite()).unwrap_or(0)
}

/// Levels either side of zero: `2^(bits-1) - 1` (8-bit ±127, 4-bit ±7); 2-bit uses the four
/// levels ±1/3, ±1 of the absmax (scale absmax/3).
fn qmax(bits: u8) -> f32 {
    match bits {
        2 => 3.0,
        b => ((1u32 << (b - 1)) - 1) as f32,
    }
}

/// A quantizer met NaN or infinity (the encoder turns this into [`Error::NonFinite`]).
#[derive(Debug)]
pub(crate) struct NonFiniteInput;

/// Writes the scales and values sections for `vals`. `scales` and `out` have exactly the lengths
/// of [`crate::frame`]'s formulas; `codes` is scratch for 4- and 2-bit packing. Runs on the
/// widest vectors the CPU has ([`crate::simd::widest`]).
pub(crate) fn encode(
    vals: &[f32],
    coding: Values,
    scales: &mut [u8],
    out: &mut [u8],
    codes: &mut Vec<u8>,
) -> std::result::Result<(), NonFiniteInput> {
    crate::simd::widest(
        #[inline(always)]
        || {
            match coding {
                Values::F32 => {
                    for (d, &v) in out.chunks_exact_mut(4).zip(vals) {
                        d.copy_from_slice(&v.to_le_bytes());
                    }
                }
                Values::Bf16 => {
                    for (d, &v) in out.chunks_exact_mut(2).zip(vals) {
                        d.copy_from_slice(&f32_to_bf16(v).to_le_bytes());
                    }
                }
                Values::F16 => {
                    // Through a stack buffer so that `half` can use F16C when the CPU has it.
                    let mut buf = [half::f16::ZERO; 256];
                    for (dst, src) in out.chunks_mut(512).zip(vals.chunks(256)) {
                        let b = &mut buf[..src.len()];
                        half::slice::HalfFloatSliceExt::convert_from_f32_slice(b, src);
                        for (d, h) in dst.chunks_exact_mut(2).zip(b.iter()) {
                            d.copy_from_slice(&h.to_bits().to_le_bytes());
                        }
                    }
                }
                Values::Quant { bits, block } => {
                    let block = block as usize;
                    let qm = qmax(bits);
                    if !matches!(bits, 2 | 4) {
                        // One code per byte (q3, q5..q8): |x·inv| <= qm by the absmax scale.
                        for ((chunk, s), dst) in vals
                            .chunks(block)
                            .zip(scales.chunks_exact_mut(4))
                            .zip(out.chunks_mut(block))
                        {
                            let inv = block_scale(chunk, qm, s)?;
                            for (d, &x) in dst.iter_mut().zip(chunk) {
                                *d = round_i32(x * inv) as i8 as u8;
                            }
                        }
                    } else if bits == 4 && block.is_multiple_of(2) {
                        // Two codes per byte straight from the values: every block starts on a byte.
                        for ((chunk, s), dst) in vals
                            .chunks(block)
                            .zip(scales.chunks_exact_mut(4))
                            .zip(out.chunks_mut(block / 2))
                        {
                            let inv = block_scale(chunk, qm, s)?;
                            let code = |x: f32| (round_i32(x * inv) + 8) as u8;
                            let pairs = chunk.chunks_exact(2);
                            let tail = pairs.remainder();
                            for (d, p) in dst.iter_mut().zip(pairs) {
                                *d = code(p[0]) | (code(p[1]) << 4);
                            }
                            if let (Some(&x), Some(d)) =
                                (tail.first(), dst.get_mut(chunk.len() / 2))
                            {
                                *d = code(x);
                            }
                        }
                    } else {
                        codes.clear();
                        codes.resize(vals.len(), 0);
                        // 2-bit: the sums of squares of the next eight blocks.
                        let mut sq = [0f32; 8];
                        for (bi, ((chunk, s), dst)) in vals
                            .chunks(block)
                            .zip(scales.chunks_exact_mut(4))
                            .zip(codes.chunks_mut(block))
                            .enumerate()
                        {
                            let inv = if bits == 4 {
                                block_scale(chunk, qm, s)?
                            } else {
                                if bi % 8 == 0 {
                                    running_sq_sums(&vals[bi * block..], block, &mut sq);
                                }
                                q2_block_scale(chunk, sq[bi % 8], s)?
                            };
                            if bits == 4 {
                                for (d, &x) in dst.iter_mut().zip(chunk) {
                                    *d = (round_i32(x * inv) + 8) as u8;
                                }
                            } else {
                                for (d, &x) in dst.iter_mut().zip(chunk) {
                                    // x·inv in [-3, 3] -> code in {0, 1, 2, 3} for levels -3, -1, 1, 3.
                                    *d = round_i32((x * inv + 3.0) * 0.5).clamp(0, 3) as u8;
                                }
                            }
                        }
                        if bits == 4 {
                            for (d, c) in out.iter_mut().zip(codes.chunks(2)) {
                                *d = c[0] | (c.get(1).copied().unwrap_or(0) << 4);
                            }
                        } else {
                            let quads = codes.chunks_exact(4);
                            let tail = quads.remainder();
                            for (d, c) in out.iter_mut().zip(quads) {
                                *d = c[0] | (c[1] << 2) | (c[2] << 4) | (c[3] << 6);
                            }
                            if let Some(d) = out.get_mut(codes.len() / 4) {
                                *d = tail.iter().rev().fold(0, |b, &x| (b << 2) | x);
                            }
                        }
                    }
                }
            }
            Ok(())
        },
    )
}

/// Writes the block's scale to `s` and returns the multiplier to quantization levels.
#[inline(always)]
fn block_scale(chunk: &[f32], qm: f32, s: &mut [u8]) -> std::result::Result<f32, NonFiniteInput> {
    let m = absmax_bits(chunk);
    if m >= 0x7f80_0000 {
        return Err(NonFiniteInput);
    }
    let absmax = f32::from_bits(m);
    let scale = absmax / qm;
    s.copy_from_slice(&scale.to_le_bytes());
    Ok(if absmax > 0.0 { qm / absmax } else { 0.0 })
}

/// The 2-bit levels are `±u, ±3u` (no zero level), so the unit `u` decides the error: with
/// `u = absmax/3` a block of Gaussian values (what the rotation makes of a gradient) sends
/// every value below `2u ≈ 2.2σ` as `±1.1σ`, a relative error of about 0.7, and error feedback
/// then holds a residual several times the gradient (it grew to 3x within 5 steps of the default
/// run and was released into AdamW: the step-7 spike of issue #13). `u ≈ 0.498·rms` is the
/// MSE-optimal uniform 4-level quantizer of a Gaussian (relative error 0.34); blocks that are not
/// Gaussian (e.g. a few equal magnitudes) can prefer `absmax/3`, so the encoder keeps whichever of
/// the two has the smaller squared error. The decoder is unchanged: the unit is the block scale.
const Q2_GAUSS_UNIT: f32 = 0.4979;

/// `sum f(x)` over `chunk` in 16 interleaved partial sums: a fixed order (the same bits on every
/// CPU) that vectorizes, where one running sum is a chain of dependent adds.
#[inline(always)]
fn lane_sum(chunk: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 16];
    let groups = chunk.chunks_exact(16);
    let tail = groups.remainder();
    for q in groups {
        for (a, &x) in acc.iter_mut().zip(q) {
            *a += f(x);
        }
    }
    let mut t = 0f32;
    for &x in tail {
        t += f(x);
    }
    acc.iter().fold(t, |s, &a| s + a)
}

/// Squared error of 2-bit quantization of `chunk` with the multiplier `inv = 1/u`.
#[inline(always)]
fn q2_sse(chunk: &[f32], inv: f32) -> f32 {
    let u = 1.0 / inv;
    lane_sum(chunk, |x| {
        let c = round_i32((x * inv + 3.0) * 0.5).clamp(0, 3);
        let d = x - (2 * c - 3) as f32 * u;
        d * d
    })
}

/// Each block's `sum x²` as one running sum in element order, for the next eight blocks of `v`
/// (fewer at its end): the sum sets the 2-bit unit, which is the scale sent, so it keeps the
/// bits of earlier versions (see [`q2_block_scale`]). Eight full blocks advance as eight
/// independent chains, where one chain waited on each add's latency.
#[inline(always)]
fn running_sq_sums(v: &[f32], block: usize, sq: &mut [f32; 8]) {
    let running = |chunk: &[f32]| chunk.iter().fold(0f32, |a, x| a + x * x);
    if v.len() >= 8 * block {
        let lanes: [&[f32]; 8] = std::array::from_fn(|l| &v[l * block..(l + 1) * block]);
        let mut acc = [0f32; 8];
        for i in 0..block {
            for (a, lane) in acc.iter_mut().zip(&lanes) {
                *a += lane[i] * lane[i];
            }
        }
        *sq = acc;
    } else {
        for (s, chunk) in sq.iter_mut().zip(v.chunks(block)) {
            *s = running(chunk);
        }
    }
}

/// [`block_scale`] for 2-bit blocks: the unit of smaller squared error of `absmax/3` and
/// `0.498·rms` (see [`Q2_GAUSS_UNIT`]); `sq` is the block's running sum of squares from
/// [`running_sq_sums`].
#[inline(always)]
fn q2_block_scale(
    chunk: &[f32],
    sq: f32,
    s: &mut [u8],
) -> std::result::Result<f32, NonFiniteInput> {
    let inv_absmax = block_scale(chunk, 3.0, s)?;
    if inv_absmax == 0.0 || chunk.is_empty() {
        return Ok(inv_absmax);
    }
    // One running sum, as before the SSEs were vectorized: the unit's bits are the scale sent,
    // and the sync's 2-bit frames (so a run's trajectory) stay those of earlier versions. Only
    // the comparison of the two SSEs below takes the vectorized sums, which moves a choice
    // only at an exact near-tie (none in 20,000 Gaussian blocks).
    let unit = Q2_GAUSS_UNIT * (sq / chunk.len() as f32).sqrt();
    if !(unit.is_finite() && unit > 0.0) {
        return Ok(inv_absmax);
    }
    let inv_rms = 1.0 / unit;
    if q2_sse(chunk, inv_rms) < q2_sse(chunk, inv_absmax) {
        s.copy_from_slice(&unit.to_le_bytes());
        Ok(inv_rms)
    } else {
        Ok(inv_absmax)
    }
}

/// The error for a quantizer input holding NaN or infinity, naming the first one.
pub(crate) fn non_finite_error(vals: &[f32], codec: &crate::Codec) -> Error {
    Error::NonFinite {
        index: first_non_finite(vals),
        codec: codec.to_string(),
    }
}

/// Decodes the values section (and scales) into `out`, whose length is the kept count, on the
/// widest vectors the CPU has.
pub(crate) fn decode(coding: Values, scales: &[u8], values: &[u8], out: &mut [f32]) -> Result<()> {
    crate::simd::widest(
        #[inline(always)]
        || {
            match coding {
                Values::F32 => {
                    for (o, s) in out.iter_mut().zip(values.chunks_exact(4)) {
                        *o = f32::from_le_bytes(s.try_into().expect("4 bytes"));
                    }
                }
                Values::Bf16 => {
                    for (o, s) in out.iter_mut().zip(values.chunks_exact(2)) {
                        *o = f32::from_bits((u16::from_le_bytes([s[0], s[1]]) as u32) << 16);
                    }
                }
                Values::F16 => {
                    let mut buf = [half::f16::ZERO; 256];
                    for (dst, src) in out.chunks_mut(256).zip(values.chunks(512)) {
                        let b = &mut buf[..dst.len()];
                        for (h, s) in b.iter_mut().zip(src.chunks_exact(2)) {
                            *h = half::f16::from_bits(u16::from_le_bytes([s[0], s[1]]));
                        }
                        half::slice::HalfFloatSliceExt::convert_to_f32_slice(b, dst);
                    }
                }
                Values::Quant { bits, block } => {
                    let block = block as usize;
                    let stored = crate::codec::stored_bits(bits) as usize;
                    let per_byte = 8 / stored;
                    let n = out.len();
                    // Padding bits of the last byte must be zero: one canonical frame per tensor.
                    if !n.is_multiple_of(per_byte) {
                        let used = (n % per_byte) * stored;
                        if values.last().copied().unwrap_or(0) >> used != 0 {
                            return Err(Error::Corrupt(
                                "padding bits of the last value byte are set",
                            ));
                        }
                    }
                    for (bi, (chunk, s)) in out
                        .chunks_mut(block)
                        .zip(scales.chunks_exact(4))
                        .enumerate()
                    {
                        let scale = f32::from_le_bytes(s.try_into().expect("4 bytes"));
                        if !(scale.is_finite() && scale >= 0.0) {
                            return Err(Error::Corrupt("a block scale is negative or not finite"));
                        }
                        let start = bi * block;
                        match bits {
                            4 if block.is_multiple_of(2) => {
                                // Two values per byte; every block starts on a byte.
                                let bytes = &values[start / 2..];
                                let v = |q: u8| (q as i32 - 8) as f32 * scale;
                                let half = chunk.len() / 2;
                                let mut pairs = chunk.chunks_exact_mut(2);
                                for (o, &b) in (&mut pairs).zip(bytes) {
                                    o[0] = v(b & 0xf);
                                    o[1] = v(b >> 4);
                                }
                                if let Some(o) = pairs.into_remainder().first_mut() {
                                    *o = v(bytes[half] & 0xf);
                                }
                            }
                            4 => {
                                for (j, o) in chunk.iter_mut().enumerate() {
                                    let i = start + j;
                                    let q = (values[i / 2] >> ((i & 1) * 4)) & 0xf;
                                    *o = (q as i32 - 8) as f32 * scale;
                                }
                            }
                            2 if block.is_multiple_of(4) => {
                                // Four values per byte; every block starts on a byte. Constant
                                // shifts per lane vectorize, where a shift by `i & 3` did not.
                                let bytes = &values[start / 4..];
                                let whole = chunk.len() / 4;
                                let v =
                                    |b: u8, j: u32| (2 * ((b >> (2 * j)) & 3) as i32 - 3) as f32;
                                let mut quads = chunk.chunks_exact_mut(4);
                                for (o, &b) in (&mut quads).zip(bytes) {
                                    for (j, o) in o.iter_mut().enumerate() {
                                        *o = v(b, j as u32) * scale;
                                    }
                                }
                                let tail = quads.into_remainder();
                                if let Some(&b) = bytes.get(whole) {
                                    for (j, o) in tail.iter_mut().enumerate() {
                                        *o = v(b, j as u32) * scale;
                                    }
                                }
                            }
                            2 => {
                                for (j, o) in chunk.iter_mut().enumerate() {
                                    let i = start + j;
                                    let c = (values[i / 4] >> ((i & 3) * 2)) & 3;
                                    *o = (2 * c as i32 - 3) as f32 * scale;
                                }
                            }
                            _ => {
                                let qm = qmax(bits) as i32;
                                let mut bad = false;
                                for (o, &q) in chunk.iter_mut().zip(&values[start..]) {
                                    let q = q as i8 as i32;
                                    bad |= q.abs() > qm;
                                    *o = q as f32 * scale;
                                }
                                if bad {
                                    return Err(Error::Corrupt("a quantized code is out of range"));
                                }
                            }
                        }
                    }
                }
            }
            Ok(())
        },
    )
}

/// fp32 to bfloat16 bits, rounding to nearest even; NaN stays NaN (quiet).
#[inline(always)]
pub(crate) fn f32_to_bf16(v: f32) -> u16 {
    let b = v.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    let nan = ((b >> 16) as u16) | 0x0040;
    if b & 0x7fff_ffff > 0x7f80_0000 {
        nan
    } else {
        rounded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_rounding_is_round_half_even() {
        for (v, r) in [
            (0.4f32, 0),
            (0.5, 0),
            (1.5, 2),
            (2.5, 2),
            (-0.6, -1),
            (-127.0, -127),
            (126.7, 127),
        ] {
            assert_eq!(round_i32(v), r, "{v}");
        }
    }

    fn q2_roundtrip(v: &[f32]) -> Vec<f32> {
        let block = v.len() as u32;
        let coding = Values::Quant { bits: 2, block };
        let mut scales = vec![0u8; 4];
        let mut out = vec![0u8; v.len().div_ceil(4)];
        let mut codes = Vec::new();
        encode(v, coding, &mut scales, &mut out, &mut codes).unwrap();
        let mut back = vec![0f32; v.len()];
        decode(coding, &scales, &out, &mut back).unwrap();
        back
    }

    fn rel_err(v: &[f32], q: &[f32]) -> f32 {
        let e: f32 = v.iter().zip(q).map(|(a, b)| (a - b) * (a - b)).sum();
        let n: f32 = v.iter().map(|a| a * a).sum();
        (e / n).sqrt()
    }

    #[test]
    fn q2_error_is_contractive_on_gaussian_blocks() {
        // Gaussian values by Box-Muller from a fixed LCG (what the rotation makes of gradients).
        let mut state = 12345u64;
        let mut uni = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        let v: Vec<f32> = (0..1024)
            .map(|_| {
                let (a, b) = (uni(), uni());
                ((-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos()) as f32
            })
            .collect();
        // Error feedback stays bounded only if each send's error is well below the input:
        // the absmax unit gave about 0.7 here, the Gaussian unit about 0.34.
        let e = rel_err(&v, &q2_roundtrip(&v));
        assert!(e < 0.4, "relative error {e}");
        // Blocks of equal magnitudes keep the exact absmax unit.
        let w: Vec<f32> = (0..64)
            .map(|i| if i % 3 == 0 { -0.5 } else { 0.5 })
            .collect();
        assert_eq!(q2_roundtrip(&w), w);
        // A zero block stays zero.
        assert_eq!(q2_roundtrip(&[0.0; 8]), vec![0.0; 8]);
    }

    #[test]
    fn running_sq_sums_are_the_plain_running_sums() {
        let v: Vec<f32> = (0..10 * 64 + 5)
            .map(|i| ((i * 7919 % 2003) as f32 - 1000.0) * 1.37e-3)
            .collect();
        for block in [1usize, 3, 64, 100] {
            let blocks: Vec<&[f32]> = v.chunks(block).collect();
            for (g, group) in blocks.chunks(8).enumerate() {
                let mut sq = [f32::NAN; 8];
                running_sq_sums(&v[g * 8 * block..], block, &mut sq);
                for (s, chunk) in sq.iter().zip(group) {
                    let want: f32 = chunk.iter().map(|x| x * x).sum();
                    assert_eq!(s.to_bits(), want.to_bits(), "block {block} group {g}");
                }
            }
        }
    }

    #[test]
    fn q2_decode_matches_per_value_codes() {
        // Every byte value and odd lengths: the four-per-byte path against code `i` read alone.
        let values: Vec<u8> = (0..=255u8)
            .chain((0..200).map(|i| (i * 37 + 11) as u8))
            .collect();
        for n in [1usize, 4, 7, 64, 1001, 4 * values.len() - 3] {
            let vals = &values[..n.div_ceil(4)];
            let mut vals = vals.to_vec();
            if !n.is_multiple_of(4) {
                *vals.last_mut().unwrap() &= (1u8 << (2 * (n % 4))) - 1;
            }
            for block in [1usize, 3, 4, 64, 1024] {
                let blocks = n.div_ceil(block);
                let scales: Vec<u8> = (0..blocks)
                    .flat_map(|b| (0.37f32 * (b + 1) as f32).to_le_bytes())
                    .collect();
                let coding = Values::Quant {
                    bits: 2,
                    block: block as u32,
                };
                let mut out = vec![0f32; n];
                decode(coding, &scales, &vals, &mut out).unwrap();
                for (i, o) in out.iter().enumerate() {
                    let c = (vals[i / 4] >> ((i & 3) * 2)) & 3;
                    let scale = 0.37f32 * (i / block + 1) as f32;
                    let want = (2 * c as i32 - 3) as f32 * scale;
                    assert_eq!(o.to_bits(), want.to_bits(), "n {n} block {block} i {i}");
                }
            }
        }
    }

    #[test]
    fn q4_byte_pairs_match_per_value_codes() {
        // The byte-pair paths (even blocks) against codes computed and packed one value at a time.
        for n in [1usize, 2, 3, 63, 64, 65, 255, 256, 257, 1001] {
            let v: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
                .collect();
            for block in [2usize, 4, 64, 256] {
                let coding = Values::Quant {
                    bits: 4,
                    block: block as u32,
                };
                let blocks = n.div_ceil(block);
                let (mut scales, mut out) = (vec![0u8; 4 * blocks], vec![0u8; n.div_ceil(2)]);
                encode(&v, coding, &mut scales, &mut out, &mut Vec::new()).unwrap();
                let mut want = vec![0u8; n.div_ceil(2)];
                let mut back_want = vec![0f32; n];
                for (b, chunk) in v.chunks(block).enumerate() {
                    let absmax = chunk.iter().fold(0f32, |m, x| m.max(x.abs()));
                    let scale = absmax / 7.0;
                    assert_eq!(
                        scales[4 * b..4 * b + 4],
                        scale.to_le_bytes(),
                        "n {n} block {block}"
                    );
                    let inv = if absmax > 0.0 { 7.0 / absmax } else { 0.0 };
                    for (j, &x) in chunk.iter().enumerate() {
                        let i = b * block + j;
                        let c = (round_i32(x * inv) + 8) as u8;
                        want[i / 2] |= c << ((i & 1) * 4);
                        back_want[i] = (c as i32 - 8) as f32 * scale;
                    }
                }
                assert_eq!(out, want, "n {n} block {block}");
                let mut back = vec![0f32; n];
                decode(coding, &scales, &out, &mut back).unwrap();
                assert_eq!(back, back_want, "n {n} block {block}");
            }
        }
    }

    #[test]
    fn bf16_matches_half() {
        for v in [
            0.0f32,
            -0.0,
            1.0,
            1.0 + 1.0 / 256.0,
            1.0039063,
            2.71,
            -2.5e-30,
            1e38,
            f32::INFINITY,
            f32::MAX,
        ] {
            assert_eq!(f32_to_bf16(v), half::bf16::from_f32(v).to_bits(), "{v}");
        }
        assert!(f32::from_bits((f32_to_bf16(f32::NAN) as u32) << 16).is_nan());
    }
}
