//! Round trips, error bounds, top-k exactness, determinism and limits, through the public API.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, StudentT};
use swarm_compression::{Codec, Decoder, Encoder, Error, IndexCoding, Limits, Values};

fn gaussian(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let d = Normal::new(0.0f32, 1.0).unwrap();
    (0..n).map(|_| d.sample(&mut rng)).collect()
}

/// Heavy-tailed activations with a few outlier channels, like a transformer's residual stream.
fn activations(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let t = StudentT::new(3.0f32).unwrap();
    let mut v: Vec<f32> = (0..rows * cols).map(|_| t.sample(&mut rng)).collect();
    for r in 0..rows {
        for c in [7, cols / 2 + 3] {
            if c < cols {
                v[r * cols + c] *= 40.0;
            }
        }
    }
    v
}

fn roundtrip(codec: &str, data: &[f32], shape: &[usize]) -> (Vec<u8>, Vec<f32>) {
    let mut enc = Encoder::new(codec.parse().unwrap()).unwrap();
    let mut frame = Vec::new();
    enc.encode(data, shape, &mut frame).unwrap();
    let mut out = Vec::new();
    let info = Decoder::new()
        .decode(&frame, &Limits::new(data.len()), &mut out)
        .unwrap();
    assert_eq!(info.shape(), shape);
    assert_eq!(info.elements, data.len());
    assert_eq!(info.codec.to_string(), enc.codec().to_string());
    assert_eq!(info.frame_len, frame.len());
    (frame, out)
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum();
    (num / den).sqrt()
}

#[test]
fn none_is_bit_exact_including_specials() {
    let mut data = gaussian(1000, 1);
    data[3] = f32::NAN;
    data[4] = f32::INFINITY;
    data[5] = -0.0;
    data[6] = f32::MIN_POSITIVE / 4.0; // subnormal
    for codec in ["none", "zstd:1", "topk:1+zstd"] {
        let (_, out) = roundtrip(codec, &data, &[10, 100]);
        for (a, b) in data.iter().zip(&out) {
            assert_eq!(a.to_bits(), b.to_bits(), "{codec}");
        }
    }
}

#[test]
fn empty_and_scalar_tensors() {
    for codec in [
        "none",
        "q8",
        "topk:0.5+q4+zstd",
        "rht+q2",
        "topk-row:0.5+bf16",
    ] {
        let (_, out) = roundtrip(codec, &[], &[0, 5]);
        assert!(out.is_empty());
        let (_, out) = roundtrip(codec, &[2.5], &[]);
        assert!((out[0] - 2.5).abs() < 0.05, "{codec}: {out:?}");
    }
}

#[test]
fn quantizers_meet_their_per_element_bounds() {
    let data = activations(64, 100, 2);
    for (bits, levels) in [
        (8u8, 127.0f32),
        (7, 63.0),
        (6, 31.0),
        (5, 15.0),
        (4, 7.0),
        (3, 3.0),
        (2, 3.0),
    ] {
        for block in [1u32, 7, 64, 4096] {
            let codec = Codec {
                values: Values::Quant { bits, block },
                ..Codec::NONE
            };
            let (frame, out) = roundtrip(&codec.to_string(), &data, &[64, 100]);
            for (b, (chunk, back)) in data
                .chunks(block as usize)
                .zip(out.chunks(block as usize))
                .enumerate()
            {
                let absmax = chunk.iter().fold(0f32, |m, x| m.max(x.abs()));
                // Half a step for 8/4-bit; the 2-bit grid {-3,-1,1,3}/3 is off by at most one step.
                let bound = if bits == 2 {
                    absmax / 3.0
                } else {
                    absmax / (2.0 * levels)
                };
                if bits == 2 {
                    // q2 picks the block scale of smaller squared error (absmax/3 or one from
                    // the rms): an outlier may be clipped, but the block's squared error is at
                    // most what absmax/3 steps give.
                    let sq: f64 = chunk
                        .iter()
                        .zip(back)
                        .map(|(x, y)| ((x - y) as f64).powi(2))
                        .sum();
                    let limit = chunk.len() as f64 * (bound as f64 * 1.0001).powi(2) + 1e-30;
                    assert!(
                        sq <= limit,
                        "q2:{block} block {b}: squared error {sq} > {limit}"
                    );
                    continue;
                }
                for (x, y) in chunk.iter().zip(back) {
                    assert!(
                        (x - y).abs() <= bound * 1.0001 + 1e-30,
                        "q{bits}:{block} block {b}: {x} vs {y}"
                    );
                }
            }
            let stored = if matches!(bits, 2 | 4) { bits } else { 8 };
            let expected_bits = stored as f64 + 32.0 / block as f64;
            let ratio = data.len() as f64 * 4.0 / frame.len() as f64;
            assert!(
                ratio > 32.0 / expected_bits * 0.9 || data.len() < block as usize,
                "q{bits}:{block} ratio {ratio}"
            );
        }
    }
}

#[test]
fn q8_is_under_one_percent_on_gaussians_and_casts_are_tight() {
    let data = gaussian(100_000, 3);
    let (_, q8) = roundtrip("q8", &data, &[100_000]);
    let e = rel_l2(&data, &q8);
    assert!(e < 0.01, "q8 rel err {e}");
    let (_, q8s) = roundtrip("q8:4096", &data, &[100_000]);
    assert!(rel_l2(&data, &q8s) < 0.02);
    let (_, bf) = roundtrip("bf16", &data, &[100_000]);
    let (_, hf) = roundtrip("fp16", &data, &[100_000]);
    for ((x, b), h) in data.iter().zip(&bf).zip(&hf) {
        assert!((x - b).abs() <= x.abs() * 2f32.powi(-8), "bf16 {x} {b}");
        // fp16 normal range: relative 2^-11; below 2^-14 an absolute 2^-25.
        assert!(
            (x - h).abs() <= x.abs() * 2f32.powi(-11) + 2f32.powi(-25),
            "fp16 {x} {h}"
        );
    }
    assert_eq!(bf[0], half::bf16::from_f32(data[0]).to_f32());
}

#[test]
fn rotation_tames_outliers_for_low_bits() {
    let data = activations(256, 256, 4);
    for bits in [4, 2] {
        let (_, plain) = roundtrip(&format!("q{bits}:256"), &data, &[256, 256]);
        let (_, rot) = roundtrip(&format!("rht+q{bits}:256"), &data, &[256, 256]);
        let (ep, er) = (rel_l2(&data, &plain), rel_l2(&data, &rot));
        assert!(er < ep * 0.8, "q{bits}: rotated {er} vs plain {ep}");
    }
    // A short last block is not rotated but still decodes.
    let odd = gaussian(1000, 5);
    let (_, out) = roundtrip("rht+q8", &odd, &[1000]);
    assert!(rel_l2(&odd, &out) < 0.01);
}

fn reference_topk(data: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..data.len()).collect();
    idx.sort_by(|&a, &b| data[b].abs().total_cmp(&data[a].abs()).then(a.cmp(&b)));
    idx.truncate(k);
    idx.sort();
    idx
}

#[test]
fn topk_keeps_exactly_the_largest_magnitudes() {
    // Values from a small set so that ties are frequent; no zeros so kept = nonzero.
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let data: Vec<f32> = (0..300_000)
        .map(|_| (rng.random_range(1..200) as f32) * if rng.random::<bool>() { 1.0 } else { -1.0 })
        .collect();
    for frac in [0.001f32, 0.01, 0.1, 0.3] {
        let codec = format!("topk:{frac}");
        let (_, out) = roundtrip(&codec, &data, &[300, 1000]);
        let k = (frac as f64 * data.len() as f64).round() as usize;
        let kept: Vec<usize> = (0..data.len()).filter(|&i| out[i] != 0.0).collect();
        assert_eq!(kept, reference_topk(&data, k), "{codec}");
        for &i in &kept {
            assert_eq!(out[i], data[i]);
        }
    }
    // Per row: each row keeps its own k.
    let (_, out) = roundtrip("topk-row:0.05", &data, &[300, 1000]);
    for (r, (row, back)) in data.chunks(1000).zip(out.chunks(1000)).enumerate() {
        let kept: Vec<usize> = (0..1000).filter(|&i| back[i] != 0.0).collect();
        assert_eq!(kept, reference_topk(row, 50), "row {r}");
    }
}

/// Embedding outputs: one row per token, so rows repeat (here 40 distinct rows in 512).
fn embedding_rows(rows: usize, width: usize, vocab: usize, seed: u64) -> Vec<f32> {
    let table = gaussian(vocab * width, seed);
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 1);
    let mut v = Vec::with_capacity(rows * width);
    for _ in 0..rows {
        let t = rng.random_range(0..vocab);
        v.extend_from_slice(&table[t * width..(t + 1) * width]);
    }
    v
}

#[test]
fn dedup_sends_repeated_rows_once() {
    let (rows, width) = (512, 64);
    let data = embedding_rows(rows, width, 40, 11);
    // Exact: bit for bit, and about rows/distinct times smaller (plus a u16 per row).
    let (frame, out) = roundtrip("dedup", &data, &[rows, width]);
    assert!(
        data.iter()
            .zip(&out)
            .all(|(a, b)| a.to_bits() == b.to_bits())
    );
    let (plain, _) = roundtrip("none", &data, &[rows, width]);
    assert!(
        frame.len() * 8 < plain.len(),
        "{} vs {}",
        frame.len(),
        plain.len()
    );
    // With a quantizer: equal rows decode equal, each within the quantizer's bound of the input.
    let (qframe, qout) = roundtrip("dedup+rht+q6:64+zstd:3", &data, &[rows, width]);
    let (_, ref_out) = roundtrip("rht+q6:64+zstd:3", &data, &[rows, width]);
    for r in 0..rows {
        for s in 0..rows {
            if data[r * width..(r + 1) * width] == data[s * width..(s + 1) * width] {
                assert_eq!(
                    qout[r * width..(r + 1) * width],
                    qout[s * width..(s + 1) * width]
                );
            }
        }
    }
    let (e_dedup, e_ref) = (rel_l2(&data, &qout), rel_l2(&data, &ref_out));
    assert!(e_dedup < 0.03 && e_ref < 0.03, "{e_dedup} {e_ref}");
    let info = Decoder::new()
        .decode(&qframe, &Limits::new(data.len()), &mut Vec::new())
        .unwrap();
    assert_eq!(info.index, IndexCoding::RowMap);
    assert!(info.codec.dedup);
    assert!(info.kept < data.len() / 10);
    // Rows that never repeat: a dense frame, as long as without dedup.
    let acts = gaussian(rows * width, 12);
    let (dframe, dout) = roundtrip("dedup+q8", &acts, &[rows, width]);
    let (pframe, pout) = roundtrip("q8", &acts, &[rows, width]);
    assert_eq!(dframe.len(), pframe.len());
    assert_eq!(dout, pout);
}

#[test]
fn index_coding_is_the_smaller_one() {
    let data = gaussian(10_000, 7);
    let mut enc = Encoder::new("topk:0.5".parse().unwrap()).unwrap();
    let mut frame = Vec::new();
    enc.encode(&data, &[10_000], &mut frame).unwrap();
    let info = swarm_compression::FrameInfo::read(&frame, &Limits::default()).unwrap();
    assert_eq!(info.index, IndexCoding::Bitmap);
    let mut enc = Encoder::new("topk:0.02".parse().unwrap()).unwrap();
    enc.encode(&data, &[10_000], &mut frame).unwrap();
    let info = swarm_compression::FrameInfo::read(&frame, &Limits::default()).unwrap();
    assert_eq!(info.index, IndexCoding::DeltaVarint);
    assert_eq!(info.kept, 200);
}

#[test]
fn the_headline_codec_compresses_gradients_25x() {
    let data = gaussian(1 << 20, 8);
    let (frame, out) = roundtrip("topk:0.1+q8+zstd:3", &data, &[1024, 1024]);
    let ratio = data.len() as f64 * 4.0 / frame.len() as f64;
    assert!(ratio >= 25.0, "ratio {ratio}");
    // What is kept is within q8 of the input; the rest is zero.
    assert_eq!(out.iter().filter(|v| **v != 0.0).count(), 104_858);
    let e = rel_l2(&data, &out);
    assert!(
        e < 0.8,
        "top-10% of a Gaussian keeps most of its energy: rel err {e}"
    );
}

#[test]
fn encoding_is_deterministic_and_seeded() {
    let data = activations(128, 128, 9);
    for codec in [
        "topk:0.1+q8+zstd:3",
        "rht+q4+zstd",
        "topk-row:0.2+rht+q2",
        "bf16",
    ] {
        let c: Codec = codec.parse().unwrap();
        let mut a = Encoder::new(c).unwrap();
        let mut b = Encoder::new(c).unwrap();
        let (mut fa, mut fb) = (Vec::new(), Vec::new());
        a.encode(&data, &[128, 128], &mut fa).unwrap();
        a.encode(&data, &[128, 128], &mut fa).unwrap(); // reused scratch changes nothing
        b.encode(&data, &[128, 128], &mut fb).unwrap();
        assert_eq!(fa, fb, "{codec}");
    }
    let c: Codec = "rht+q4".parse().unwrap();
    let (mut f1, mut f2) = (Vec::new(), Vec::new());
    Encoder::new(c)
        .unwrap()
        .with_seed(1)
        .encode(&data, &[128, 128], &mut f1)
        .unwrap();
    Encoder::new(c)
        .unwrap()
        .with_seed(2)
        .encode(&data, &[128, 128], &mut f2)
        .unwrap();
    assert_ne!(f1, f2);
    let i1 = swarm_compression::FrameInfo::read(&f1, &Limits::default()).unwrap();
    assert_eq!(i1.seed, 1);
}

#[test]
fn encoder_rejects_bad_input() {
    let mut enc = Encoder::new("q8".parse().unwrap()).unwrap();
    let mut out = Vec::new();
    assert!(matches!(
        enc.encode(&[1.0; 6], &[4, 2], &mut out),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        enc.encode(&[1.0; 1], &[1; 9], &mut out),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        enc.encode(&[1.0; 6], &[usize::MAX, 2], &mut out),
        Err(Error::Shape { .. })
    ));
    let mut data = vec![1.0; 100];
    data[70] = f32::NAN;
    match enc.encode(&data, &[100], &mut out) {
        Err(Error::NonFinite { index, codec }) => {
            assert_eq!(index, 70);
            assert_eq!(codec, "q8");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn limits_and_output_length_are_enforced() {
    let data = gaussian(1000, 10);
    let mut frame = Vec::new();
    Encoder::new("q8".parse().unwrap())
        .unwrap()
        .encode(&data, &[1000], &mut frame)
        .unwrap();
    let mut dec = Decoder::new();
    let mut out = Vec::new();
    assert!(matches!(
        dec.decode(&frame, &Limits::new(999), &mut out),
        Err(Error::TooLarge {
            declared: 1000,
            limit: 999
        })
    ));
    let mut small = vec![0.0; 10];
    assert!(matches!(
        dec.decode_into(&frame, &Limits::new(1000), &mut small),
        Err(Error::OutputLength {
            needed: 1000,
            have: 10
        })
    ));
    let mut exact = vec![0.0; 1000];
    dec.decode_into(&frame, &Limits::new(1000), &mut exact)
        .unwrap();
    assert!(rel_l2(&data, &exact) < 0.01);
}

#[test]
fn scratch_is_reused_across_sizes_and_codecs() {
    // One decoder sees frames of every codec and size in turn; each decodes as if fresh.
    let mut dec = Decoder::new();
    let mut out = Vec::new();
    for (i, codec) in [
        "topk:0.1+q8+zstd",
        "none",
        "rht+q2+zstd:1",
        "fp16",
        "topk-row:0.3+q4",
    ]
    .iter()
    .enumerate()
    {
        for n in [4096usize, 17, 100_000] {
            let data = gaussian(n, (i * 10 + n) as u64);
            let (frame, fresh) = roundtrip(codec, &data, &[n]);
            dec.decode(&frame, &Limits::new(n), &mut out).unwrap();
            assert_eq!(out, fresh, "{codec} n={n}");
        }
    }
}
