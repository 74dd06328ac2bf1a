//! Property tests: any finite tensor, any codec, round-trips within its bound, deterministically.

use proptest::prelude::*;
use swarm_compression::{Codec, Decoder, Encoder, Limits, Values};

fn codec_strategy() -> impl Strategy<Value = Codec> {
    let topk = prop_oneof![
        Just(None),
        (0.001f32..=1.0, any::<bool>()).prop_map(|(f, r)| Some(swarm_compression::TopK {
            fraction: f,
            per_row: r
        })),
    ];
    let values = prop_oneof![
        Just(Values::F32),
        Just(Values::F16),
        Just(Values::Bf16),
        (2u8..=8, 0u32..8).prop_map(|(bits, p)| Values::Quant {
            bits,
            block: 1 << p
        }),
    ];
    let zstd = prop_oneof![Just(None), Just(Some(1)), Just(Some(-1))];
    (topk, values, any::<bool>(), zstd, any::<bool>()).prop_map(
        |(topk, values, rot, zstd, dedup)| Codec {
            dedup: dedup && topk.is_none(),
            topk,
            rotate: rot && matches!(values, Values::Quant { .. }),
            values,
            zstd,
        },
    )
}

fn data_strategy() -> impl Strategy<Value = (Vec<f32>, usize)> {
    (1usize..40, 0usize..40).prop_flat_map(|(cols, rows)| {
        (
            prop::collection::vec(
                prop_oneof![-1e4f32..1e4, -1.0f32..1.0, Just(0.0f32)],
                rows * cols,
            ),
            Just(cols),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn round_trip_within_bounds((data, cols) in data_strategy(), codec in codec_strategy(), seed in any::<u64>()) {
        let shape = [data.len() / cols, cols];
        let mut enc = Encoder::new(codec).unwrap().with_seed(seed);
        let mut frame = Vec::new();
        enc.encode(&data, &shape, &mut frame).unwrap();
        let mut again = Vec::new();
        enc.encode(&data, &shape, &mut again).unwrap();
        prop_assert_eq!(&frame, &again);

        let name = codec.to_string();
        prop_assert_eq!(name.parse::<Codec>().unwrap(), codec);

        let mut out = Vec::new();
        let info = Decoder::new().decode(&frame, &Limits::new(data.len()), &mut out).unwrap();
        prop_assert_eq!(info.shape(), &shape[..]);
        prop_assert_eq!(out.len(), data.len());

        let max = data.iter().fold(0f32, |m, x| m.max(x.abs()));
        let kept: Vec<usize> = (0..data.len()).filter(|&i| out[i] != 0.0).collect();
        if codec.topk.is_none() {
            // Dense: every element within its coding's bound; rotation spreads error over a block
            // whose norm is at most sqrt(block) * max.
            let bound = match codec.values {
                Values::F32 => 0.0,
                Values::F16 => max * 1e-3 + 1e-4,
                Values::Bf16 => max * 4e-3,
                Values::Quant { bits, block } => {
                    let step = max / if bits == 2 { 3.0 } else { ((1u32 << (bits - 1)) - 1) as f32 };
                    let rot = if codec.rotate { (block as f32).sqrt() } else { 1.0 };
                    step * rot * 1.01 + 1e-6
                }
            };
            if matches!(codec.values, Values::Quant { bits: 2, .. }) {
                // q2 picks, per block, the scale of smaller squared error between absmax/3 and
                // one from the block's rms: an outlier may be clipped, but the total squared
                // error is at most what absmax/3 steps would give.
                let sq: f64 = data.iter().zip(&out).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
                let limit = data.len() as f64 * (bound as f64).powi(2);
                prop_assert!(sq <= limit, "{name}: squared error {sq} above {limit}");
            } else {
                for (x, y) in data.iter().zip(&out) {
                    prop_assert!((x - y).abs() <= bound, "{name}: {x} vs {y} (bound {bound})");
                }
            }
        } else if !codec.rotate && codec.values == Values::F32 {
            // Exact values at kept positions, and no kept position is smaller than a dropped one.
            let min_kept = kept.iter().map(|&i| data[i].abs()).fold(f32::INFINITY, f32::min);
            for (i, (x, y)) in data.iter().zip(&out).enumerate() {
                if *y != 0.0 {
                    prop_assert_eq!(x, y);
                } else if !codec.topk.unwrap().per_row {
                    prop_assert!(x.abs() <= min_kept || *x == 0.0, "{name}: dropped {x} at {i}, kept min {min_kept}");
                }
            }
        }
        // A dedup frame keeps each distinct row once and the decoder copies it to every row that
        // repeats it, so only non-dedup frames bound the non-zeros by the kept count (a 2-bit code
        // has no zero level: a repeated zero row decodes to non-zeros in every copy).
        if !codec.dedup {
            prop_assert!(kept.len() <= info.kept);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let mut out = Vec::new();
        let _ = Decoder::new().decode(&bytes, &Limits::new(1 << 16), &mut out);
    }
}
