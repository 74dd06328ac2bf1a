//! Frames are a wire format and the replica sync's trajectory depends on their bits: these are the
//! CRC-32s of frames made by earlier versions, which every speed-up of the encoder must reproduce
//! byte for byte. Also checks that the reconstruction the error feedback takes from the encoder
//! equals decoding the frame, bit for bit. `GOLDEN_PRINT=1` prints the table.

use swarm_compression::{Codec, Decoder, Encoder, ErrorFeedback, Limits};

/// Gaussian-like values from a fixed LCG (sum of four uniforms), with a few outliers, ties and
/// zeros, as gradients and activations have.
fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut uni = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 40) as f32) / (1u64 << 24) as f32 - 0.5
    };
    (0..n)
        .map(|i| {
            let g = (uni() + uni() + uni() + uni()) * 1e-3;
            match i % 997 {
                0 => g * 300.0,
                1 => 0.0,
                2 | 3 => 1e-3,
                _ => g,
            }
        })
        .collect()
}

const CASES: &[(&str, usize, usize, u32, usize)] = &[
    // (codec, elements, row length, crc32 of the frame, frame length)
    (
        "topk:0.9+rht+q2:1024+zstd:3",
        100000,
        100000,
        0xf54389ff,
        22785,
    ),
    (
        "topk:0.9+rht+q2:1024+zstd:3",
        300007,
        300007,
        0xc703c2cd,
        69698,
    ),
    ("topk:0.9+rht+q2:1024", 5000, 5000, 0xadfbcfa1, 1874),
    ("rht+q4:1024+zstd:3", 131072, 512, 0x03aa554d, 54245),
    ("dedup+rht+q6:256+zstd:3", 131072, 512, 0x18a1f32f, 67493),
    ("dedup+rht+q4:256+zstd:3", 131072, 512, 0x51872e82, 39610),
    ("topk:0.1+q8+zstd:3", 200000, 1000, 0x8170ca4d, 26308),
    ("topk-row:0.1+rht+q4", 65536, 512, 0xa187d171, 10304),
    ("topk:0.6+bf16", 70001, 70001, 0xfcc580c2, 92857),
    ("topk:0.3+rht+q2:64", 70000, 70000, 0x2edef9bc, 15420),
    ("rht+q2", 10001, 10001, 0xe08a6741, 3233),
    ("q2:1024", 4099, 4099, 0x857f12d6, 1149),
    ("rht+q2:16", 1000, 1000, 0xbddd0b58, 606),
    ("q4:33", 1001, 1001, 0xad5de118, 729),
];

#[test]
fn frames_keep_their_bytes() {
    let print = std::env::var_os("GOLDEN_PRINT").is_some();
    let mut bad = Vec::new();
    for (i, &(name, n, row, crc, len)) in CASES.iter().enumerate() {
        let codec: Codec = name.parse().unwrap();
        let mut x = data(n, i as u64);
        if name.starts_with("dedup") {
            // Rows repeat, as embedding outputs do: every third row is row 0.
            for r in (3..n / row).step_by(3) {
                x.copy_within(0..row, r * row);
            }
        }
        let mut enc = Encoder::new(codec).unwrap().with_seed(7 + i as u64);
        let mut frame = Vec::new();
        enc.encode(&x, &[n / row, row], &mut frame).unwrap();
        let got = (crc32fast::hash(&frame), frame.len());
        if print {
            println!("    (\"{name}\", {n}, {row}, {:#010x}, {}),", got.0, got.1);
        }
        if got != (crc, len) {
            bad.push(format!("{name} n={n}: {got:x?} != {:x?}", (crc, len)));
        }
    }
    assert!(bad.is_empty(), "{bad:#?}");
}

#[test]
fn encode_decoded_is_decode_of_the_frame_bit_for_bit() {
    let extra = [
        ("none", 1000, 10),
        ("fp16", 1000, 10),
        ("bf16+zstd:1", 1000, 10),
        ("q8", 4096, 64),
        ("dedup+bf16", 4096, 64),
        ("topk-row:0.05+rht+q4+zstd:3", 8192, 256),
        ("topk:0.01+q8", 50_000, 50_000),
    ];
    let cases = CASES
        .iter()
        .map(|&(name, n, row, _, _)| (name, n, row))
        .chain(extra);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let mut dec = Decoder::new();
    for (i, (name, n, row)) in cases.enumerate() {
        let codec: Codec = name.parse().unwrap();
        let mut x = data(n, 100 + i as u64);
        for r in (2..n / row).step_by(2) {
            x.copy_within(0..row, r * row); // rows repeat for dedup
        }
        let mut enc = Encoder::new(codec).unwrap().with_seed(i as u64);
        let (mut frame, mut alone, mut decoded, mut back) = (vec![], vec![], vec![9.0; 3], vec![]);
        // Twice, so that stale scratch from the first call would show.
        for _ in 0..2 {
            enc.encode_decoded(&x, &[n / row, row], &mut frame, &mut decoded)
                .unwrap();
            enc.encode(&x, &[n / row, row], &mut alone).unwrap();
            assert_eq!(frame, alone, "{name}: the same frame either way");
            dec.decode(&frame, &Limits::new(n), &mut back).unwrap();
            assert_eq!(bits(&decoded), bits(&back), "{name}");
        }
    }
}

#[test]
fn feedback_residual_is_the_same_as_decoding_the_frame() {
    let codec: Codec = "topk:0.9+rht+q2:1024+zstd:3".parse().unwrap();
    let n = 70_000;
    let mut enc = Encoder::new(codec).unwrap();
    let (mut fast, mut slow) = (ErrorFeedback::new(n), ErrorFeedback::new(n));
    let (mut f1, mut f2) = (Vec::new(), Vec::new());
    for step in 0..3 {
        let g = data(n, 50 + step);
        fast.encode(&mut enc, &g, &[n], &mut f1).unwrap();
        let c = slow.compensate(&g).unwrap().to_vec();
        enc.encode(&c, &[n], &mut f2).unwrap();
        slow.accumulate(&f2).unwrap();
        assert_eq!(f1, f2);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(fast.residual()), bits(slow.residual()), "step {step}");
        assert_eq!(bits(fast.decoded()), bits(slow.decoded()), "step {step}");
    }
}
