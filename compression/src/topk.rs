//! Exact top-k by magnitude, ties broken by lower index, in about one pass over the data.
//!
//! A threshold just below the k-th largest magnitude is estimated from a fixed pseudo-random sample,
//! one branch-free pass collects the candidates above it, and an exact selection among the
//! candidates (about 1.2 k of them) finds the true k-th magnitude. Ties at that magnitude go to the
//! lowest indices, so the result is a pure function of the data: every replica selects the same set.

/// Magnitude as an orderable integer: for non-NaN floats, `|a| < |b|` iff `key(a) < key(b)`.
/// NaN sorts above infinity, so it is always kept (and then rejected by quantizers).
#[inline(always)]
fn key(x: f32) -> u32 {
    x.to_bits() & 0x7fff_ffff
}

/// Below this many elements the sampling is not worth it: select among all.
const SAMPLE_FROM: usize = 1 << 15;
const SAMPLES: usize = 4096;

/// Reusable buffers for selection; grow to the largest tensor seen, never shrink.
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    cand: Vec<u32>,
    keys: Vec<u32>,
}

/// Appends to `out`, in increasing order, `offset +` the positions of the `k` elements of `data`
/// with the largest magnitudes (ties: lower index first), and their values to `vals` (gathered
/// where the positions are found, which saves a pass).
///
/// `hint` is a magnitude key that probably at least `k` elements reach (0 for none), e.g. from the
/// previous row of the same tensor; it only affects speed. Returns the key of the k-th largest
/// magnitude (0 when nothing or everything is kept).
pub(crate) fn select(
    data: &[f32],
    k: usize,
    offset: u32,
    hint: u32,
    s: &mut Scratch,
    out: &mut Vec<u32>,
    vals: &mut Vec<f32>,
) -> u32 {
    let n = data.len();
    if k == 0 {
        return 0;
    }
    if k >= n {
        out.extend((0..n as u32).map(|i| offset + i));
        vals.extend_from_slice(data);
        return 0;
    }
    if n >= SAMPLE_FROM && 2 * k > n {
        return select_by_dropping(data, k, offset, s, out, vals);
    }
    let lo = if n >= SAMPLE_FROM {
        sampled_threshold(data, k, &mut s.keys)
    } else {
        hint
    };
    if s.cand.len() < n {
        s.cand.resize(n, 0);
    }
    let mut c = collect(data, |x| x >= lo, |i, _| i, &mut s.cand[..n]);
    if c < k {
        // The sample overestimated the threshold (rare, or adversarial data): take everything.
        c = collect(data, |_| true, |i, _| i, &mut s.cand[..n]);
    }
    let cand = &s.cand[..c];
    s.keys.clear();
    s.keys.extend(cand.iter().map(|&p| key(data[p as usize])));
    // The k-th largest key among candidates is the k-th largest overall, since every element
    // that is not a candidate is below `lo` <= every candidate.
    let (_, &mut t, _) = s.keys.select_nth_unstable(c - k);
    let greater = s.keys.iter().filter(|&&x| x > t).count();
    let mut ties_left = k - greater;
    out.reserve(k);
    vals.reserve(k);
    for &p in cand {
        let x = data[p as usize];
        let kk = key(x);
        if kk > t || (kk == t && ties_left > 0) {
            ties_left -= (kk == t) as usize;
            out.push(offset + p);
            vals.push(x);
        }
    }
    t
}

/// [`select`] when most elements are kept (the sync's `topk:0.9`): selects the `n - k` elements
/// to drop instead, the smallest magnitudes with ties going to the highest indices, so that the
/// kept set is exactly [`select`]'s. Selecting among ~1.2 (n - k) candidates rather than ~n made
/// the sync's encode about twice as fast.
fn select_by_dropping(
    data: &[f32],
    k: usize,
    offset: u32,
    s: &mut Scratch,
    out: &mut Vec<u32>,
    vals: &mut Vec<f32>,
) -> u32 {
    let n = data.len();
    let m = n - k;
    let hi = sampled_floor(data, m, &mut s.keys);
    if s.cand.len() < n {
        s.cand.resize(n, 0);
    }
    // The candidates' keys, not their positions: the pass below finds the positions again.
    let mut c = collect(data, |x| x <= hi, |_, x| x, &mut s.cand[..n]);
    if c < m {
        // The sample underestimated the threshold: every element is a candidate.
        c = collect(data, |_| true, |_, x| x, &mut s.cand[..n]);
    }
    let keys = &mut s.cand[..c];
    // The m-th smallest key among candidates is the m-th smallest overall: every element that is
    // not a candidate is above `hi` >= every candidate.
    let (_, &mut t, _) = keys.select_nth_unstable(m - 1);
    let less = keys.iter().filter(|&&x| x < t).count();
    let equal = keys.iter().filter(|&&x| x == t).count();
    // Of the elements at `t`, the lowest indices are kept (as `select` keeps them).
    let mut ties = equal - (m - less);
    let keep_ties = ties;
    // The k-th largest magnitude is the smallest kept one: `t` if a tie at `t` is kept, else the
    // smallest candidate above `t`, which is below every element that is not a candidate.
    let kth = if keep_ties > 0 {
        t
    } else {
        match keys.iter().filter(|&&x| x > t).min() {
            Some(&x) => x,
            None => data
                .iter()
                .map(|&x| key(x))
                .filter(|&x| x > t)
                .min()
                .unwrap_or(t),
        }
    };
    // One branch-free pass over the data writes the kept positions and values: every slot is
    // written and the cursor moves only past a kept one (emitting the ranges between dropped
    // candidates cost a call per range, and gathering the values another pass). The cursor
    // never passes `k`, so one slot of slack takes the writes after the last kept element.
    let (start, vstart) = (out.len(), vals.len());
    out.resize(start + k + 1, 0);
    vals.resize(vstart + k + 1, 0.0);
    let (dst, vdst) = (&mut out[start..], &mut vals[vstart..]);
    let mut c = 0usize;
    for (i, &x) in data.iter().enumerate() {
        let kk = key(x);
        let tie = (kk == t && ties > 0) as usize;
        ties -= tie;
        dst[c] = offset + i as u32;
        vdst[c] = x;
        c += ((kk > t) as usize) | tie;
    }
    debug_assert_eq!(c, k);
    out.truncate(start + k);
    vals.truncate(vstart + k);
    kth
}

/// A key that at least `m` elements very likely stay at or below: [`sampled_threshold`] from the
/// bottom of the sample.
fn sampled_floor(data: &[f32], m: usize, keys: &mut Vec<u32>) -> u32 {
    let Some(rank) = sample_rank(data, m, keys) else {
        return u32::MAX;
    };
    // rank-th smallest of the sample.
    let (_, &mut t, _) = keys.select_nth_unstable(rank);
    t
}

/// Samples `data`'s keys into `keys` and returns the sample rank that at least `m` of the `n`
/// elements very likely reach: the rank `m/n` of the sample moved by three standard deviations of
/// the sample count. `None` when that is past the sample (then every element is a candidate).
fn sample_rank(data: &[f32], m: usize, keys: &mut Vec<u32>) -> Option<usize> {
    sample_keys(data, keys);
    let q = m as f64 / data.len() as f64;
    let expected = q * SAMPLES as f64;
    let margin = 3.0 * (expected * (1.0 - q)).sqrt() + 8.0;
    let rank = (expected + margin).ceil() as usize;
    (rank < SAMPLES).then_some(rank)
}

/// The keys of [`SAMPLES`] fixed pseudo-random positions of `data`, into `keys`.
fn sample_keys(data: &[f32], keys: &mut Vec<u32>) {
    let n = data.len();
    keys.clear();
    // Fixed-seed pseudo-random positions: deterministic, and blind to periodic structure such as
    // outlier channels repeating every row.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..SAMPLES {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let i = ((z >> 32) * n as u64) >> 32;
        keys.push(key(data[i as usize]));
    }
}

/// A hint for the next row from this row's k-th magnitude key: 20% lower in magnitude, so that a
/// similar row has about 1.2-1.5 k candidates instead of all its elements.
pub(crate) fn next_hint(t: u32) -> u32 {
    key(f32::from_bits(t) * 0.8)
}

/// Writes `emit(position, key)` of the elements whose key passes `take` to the front of `dst`;
/// returns how many.
#[inline(always)]
fn collect(
    data: &[f32],
    take: impl Fn(u32) -> bool,
    emit: impl Fn(u32, u32) -> u32,
    dst: &mut [u32],
) -> usize {
    let mut c = 0usize;
    let last = dst.len() - 1;
    for (i, &x) in data.iter().enumerate() {
        // Branch-free: always write, advance only when kept (at ~10% density a branch mispredicts).
        let k = key(x);
        dst[c.min(last)] = emit(i as u32, k);
        c += take(k) as usize;
    }
    c
}

/// A key that at least `k` elements are very likely to reach: the sample's quantile at rank
/// `k/n`, moved down by three standard deviations of the sample count.
fn sampled_threshold(data: &[f32], k: usize, keys: &mut Vec<u32>) -> u32 {
    let Some(rank) = sample_rank(data, k, keys) else {
        return 0;
    };
    // rank-th largest of the sample.
    let (_, &mut t, _) = keys.select_nth_unstable(SAMPLES - 1 - rank);
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`select`], checking that the values it gathers are those at its positions.
    fn select_checked(
        data: &[f32],
        k: usize,
        offset: u32,
        hint: u32,
        s: &mut Scratch,
        out: &mut Vec<u32>,
    ) -> u32 {
        let (start, mut vals) = (out.len(), vec![7.0]);
        let t = select(data, k, offset, hint, s, out, &mut vals);
        let want: Vec<u32> = out[start..]
            .iter()
            .map(|&p| data[(p - offset) as usize].to_bits())
            .collect();
        let got: Vec<u32> = vals[1..].iter().map(|x| x.to_bits()).collect();
        assert_eq!(got, want, "values of the kept positions");
        assert_eq!(vals[0], 7.0);
        t
    }

    /// The definition: sort by (magnitude desc, index asc), take k, sort positions.
    fn reference(data: &[f32], k: usize) -> Vec<u32> {
        let mut idx: Vec<u32> = (0..data.len() as u32).collect();
        idx.sort_by(|&a, &b| {
            key(data[b as usize])
                .cmp(&key(data[a as usize]))
                .then(a.cmp(&b))
        });
        idx.truncate(k);
        idx.sort();
        idx
    }

    fn lcg_data(n: usize, seed: u64, levels: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let v = ((s >> 33) as u32 % levels) as f32 - (levels / 2) as f32;
                v * 0.25
            })
            .collect()
    }

    #[test]
    fn matches_reference_small_and_large_with_ties() {
        let mut s = Scratch::default();
        for (n, levels) in [
            (1usize, 3u32),
            (7, 3),
            (100, 5),
            (5000, 7),
            (70_000, 9),
            (200_000, 1000),
        ] {
            let data = lcg_data(n, n as u64, levels);
            for frac in [0.001, 0.01, 0.1, 0.5, 0.99] {
                let k = ((n as f64 * frac).round() as usize).max(1);
                let mut out = Vec::new();
                select_checked(&data, k, 0, 0, &mut s, &mut out);
                assert_eq!(out, reference(&data, k), "n={n} k={k}");
            }
        }
    }

    #[test]
    fn offset_and_edge_cases() {
        let mut s = Scratch::default();
        let mut out = vec![99];
        select_checked(&[1.0, -3.0, 2.0], 0, 10, 0, &mut s, &mut out);
        assert_eq!(out, vec![99]);
        select_checked(&[1.0, -3.0, 2.0], 2, 10, 0, &mut s, &mut out);
        assert_eq!(out, vec![99, 11, 12]);
        out.clear();
        select_checked(&[1.0, -3.0], 5, 0, 0, &mut s, &mut out);
        assert_eq!(out, vec![0, 1]);
    }

    #[test]
    fn any_hint_gives_the_exact_answer() {
        let data = lcg_data(3000, 11, 50);
        let mut s = Scratch::default();
        for hint in [0u32, 1, key(1.0), key(5.0), key(1e9), u32::MAX] {
            let mut out = Vec::new();
            let t = select_checked(&data, 300, 0, hint, &mut s, &mut out);
            assert_eq!(out, reference(&data, 300), "hint {hint}");
            assert_eq!(
                t,
                key(data[out
                    .iter()
                    .map(|&p| p as usize)
                    .min_by_key(|&p| key(data[p]))
                    .unwrap()])
            );
        }
    }

    #[test]
    fn keeping_most_elements_matches_reference_with_ties_and_returns_the_kth() {
        // Above SAMPLE_FROM with k > n/2: the path that selects what to drop.
        let mut s = Scratch::default();
        for (n, levels) in [
            (40_000usize, 5u32),
            (70_000, 9),
            (200_000, 1000),
            (100_000, 2),
        ] {
            let data = lcg_data(n, 7 + n as u64, levels);
            for frac in [0.5001, 0.6, 0.9, 0.999] {
                let k = (n as f64 * frac).round() as usize;
                let mut out = vec![42];
                let t = select_checked(&data, k, 5, 0, &mut s, &mut out);
                assert_eq!(out[0], 42);
                let want: Vec<u32> = reference(&data, k).iter().map(|p| p + 5).collect();
                assert_eq!(out[1..], want[..], "n={n} k={k}");
                let kth = want.iter().map(|&p| key(data[(p - 5) as usize])).min();
                assert_eq!(Some(t), kth, "n={n} k={k}");
            }
        }
        // Periodic tiny values (a strided sample would miss them) and all-equal data.
        let mut data = lcg_data(1 << 16, 5, 1000);
        for i in (0..data.len()).step_by(64) {
            data[i] = 0.0;
        }
        let k = data.len() - 2000;
        let mut out = Vec::new();
        select_checked(&data, k, 0, 0, &mut s, &mut out);
        assert_eq!(out, reference(&data, k));
        let flat = vec![1.5f32; 50_000];
        out.clear();
        select_checked(&flat, 45_000, 0, 0, &mut s, &mut out);
        assert_eq!(out, (0..45_000).collect::<Vec<u32>>());
    }

    #[test]
    fn periodic_outliers_do_not_fool_the_sample() {
        // Every 512th element huge: a strided sample would see all or none of them.
        let mut data = lcg_data(1 << 20, 3, 1000);
        for i in (0..data.len()).step_by(512) {
            data[i] = 1e6 + i as f32;
        }
        let mut s = Scratch::default();
        for k in [100, 2048, 2049, 100_000] {
            let mut out = Vec::new();
            select_checked(&data, k, 0, 0, &mut s, &mut out);
            assert_eq!(out, reference(&data, k), "k={k}");
        }
    }
}
