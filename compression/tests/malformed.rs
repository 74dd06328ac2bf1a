//! Hostile and damaged frames: every one gives a typed error, none panics or over-allocates.
//! Includes the in-suite fuzz regression: thousands of random and mutated frames.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use swarm_compression::{Decoder, Encoder, Error, FrameInfo, Limits};

const CODECS: [&str; 11] = [
    "none",
    "dedup+rht+q4:8+zstd:1",
    "rht+q6:256+zstd:3",
    "q3:16",
    "bf16",
    "fp16+zstd:1",
    "q8",
    "rht+q4+zstd",
    "q2:7",
    "topk:0.1+q8+zstd:3",
    "topk-row:0.3+rht+q4",
];

fn frame(codec: &str, n: usize, seed: u64) -> Vec<u8> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut data: Vec<f32> = (0..n).map(|_| rng.random_range(-3.0f32..3.0)).collect();
    if codec.starts_with("dedup") {
        // Rows of 10 repeat with period 3, so that the row map is exercised.
        for i in 30..n {
            data[i] = data[i - 30];
        }
    }
    let mut out = Vec::new();
    Encoder::new(codec.parse().unwrap())
        .unwrap()
        .encode(&data, &[n / 10, 10], &mut out)
        .unwrap();
    out
}

/// Recomputes the checksum so that a mutation reaches the checks behind it.
fn reseal(f: &mut [u8]) {
    if f.len() < 88 {
        return;
    }
    let hl = (88 + 8 * f[5] as usize).min(f.len());
    let mut h = crc32fast::Hasher::new();
    h.update(&f[..20]);
    h.update(&f[24..hl]);
    h.update(&f[hl..]);
    let sum = h.finalize();
    f[20..24].copy_from_slice(&sum.to_le_bytes());
}

fn decode(f: &[u8]) -> Result<Vec<f32>, Error> {
    let mut out = Vec::new();
    Decoder::new().decode(f, &Limits::new(10_000), &mut out)?;
    Ok(out)
}

#[test]
fn every_truncation_is_an_error() {
    for codec in CODECS {
        let f = frame(codec, 200, 1);
        assert!(decode(&f).is_ok());
        for len in 0..f.len() {
            let e = decode(&f[..len]).unwrap_err();
            assert!(
                matches!(e, Error::Truncated { .. } | Error::Inconsistent(_)),
                "{codec} cut at {len}: {e}"
            );
        }
        let mut longer = f.clone();
        longer.push(0);
        assert!(decode(&longer).is_err(), "{codec}: trailing byte");
    }
}

#[test]
fn every_byte_flip_is_an_error() {
    // CRC-32 detects every error confined to one byte; header checks may fire first.
    for codec in CODECS {
        let f = frame(codec, 100, 2);
        for at in 0..f.len() {
            for mask in [0x01u8, 0x80, 0xff] {
                let mut g = f.clone();
                g[at] ^= mask;
                assert!(
                    decode(&g).is_err(),
                    "{codec}: flip {mask:#x} at {at} decoded"
                );
            }
        }
    }
}

fn set_u64(f: &mut [u8], at: usize, v: u64) {
    f[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

#[test]
fn forged_headers_get_the_right_error() {
    let base = frame("topk:0.1+q8+zstd:3", 1000, 3);
    type Case = (&'static str, Box<dyn Fn(&mut Vec<u8>)>, fn(&Error) -> bool);
    let cases: Vec<Case> = vec![
        ("magic", Box::new(|f| f[0] = b'X'), |e| {
            matches!(e, Error::BadMagic)
        }),
        ("version", Box::new(|f| f[4] = 2), |e| {
            matches!(e, Error::UnsupportedVersion(2))
        }),
        ("ndim", Box::new(|f| f[5] = 9), |e| {
            matches!(e, Error::Inconsistent(_))
        }),
        ("topk mode", Box::new(|f| f[6] = 3), |e| {
            matches!(e, Error::Inconsistent(_))
        }),
        ("coding", Box::new(|f| f[7] = 10), |e| {
            matches!(e, Error::Inconsistent(_))
        }),
        ("flags", Box::new(|f| f[8] |= 0x10), |e| {
            matches!(e, Error::Inconsistent(_))
        }),
        ("reserved", Box::new(|f| f[10] = 1), |e| {
            matches!(e, Error::Inconsistent(_))
        }),
        (
            "block 0",
            Box::new(|f| f[12..16].copy_from_slice(&0u32.to_le_bytes())),
            |e| matches!(e, Error::Inconsistent(_)),
        ),
        (
            "fraction 2",
            Box::new(|f| f[16..20].copy_from_slice(&2f32.to_le_bytes())),
            |e| matches!(e, Error::Inconsistent(_)),
        ),
        ("seed without rht", Box::new(|f| set_u64(f, 24, 5)), |e| {
            matches!(e, Error::Inconsistent(_))
        }),
        ("huge count", Box::new(|f| set_u64(f, 32, u64::MAX)), |e| {
            matches!(
                e,
                Error::TooLarge {
                    declared: u64::MAX,
                    ..
                }
            )
        }),
        ("count vs shape", Box::new(|f| set_u64(f, 32, 999)), |e| {
            matches!(e, Error::Inconsistent(_))
        }),
        (
            "shape overflow",
            Box::new(|f| {
                set_u64(f, 88, 1 << 40);
                set_u64(f, 96, 1 << 40);
            }),
            |e| matches!(e, Error::Inconsistent(_)),
        ),
        ("kept", Box::new(|f| set_u64(f, 40, 99)), |e| {
            matches!(e, Error::Inconsistent(_))
        }),
        ("index len", Box::new(|f| set_u64(f, 48, 1 << 50)), |e| {
            matches!(e, Error::Inconsistent(_))
        }),
        ("scales len", Box::new(|f| set_u64(f, 56, 4)), |e| {
            matches!(e, Error::Inconsistent(_))
        }),
        ("values len", Box::new(|f| set_u64(f, 64, u64::MAX)), |e| {
            matches!(e, Error::Inconsistent(_))
        }),
        (
            "payload len",
            Box::new(|f| set_u64(f, 72, u64::MAX - 10)),
            |e| matches!(e, Error::Inconsistent(_) | Error::Truncated { .. }),
        ),
        ("zstd split", Box::new(|f| set_u64(f, 80, 3)), |e| {
            matches!(e, Error::Corrupt(_))
        }),
        (
            "zstd bytes",
            Box::new(|f| {
                let n = f.len();
                f[n - 5] ^= 0x55;
            }),
            |e| matches!(e, Error::Corrupt(_)),
        ),
    ];
    for (name, mutate, ok) in &cases {
        let mut f = base.clone();
        mutate(&mut f);
        reseal(&mut f);
        let e = decode(&f).unwrap_err();
        assert!(ok(&e), "{name}: got {e:?}");
        // Without resealing, the same damage is caught too.
        let mut g = base.clone();
        mutate(&mut g);
        assert!(decode(&g).is_err(), "{name} unsealed");
    }
    let mut f = base.clone();
    f[30] ^= 1; // inside the seed field, covered by the checksum only
    assert!(matches!(
        decode(&f),
        Err(Error::Checksum { .. }) | Err(Error::Inconsistent(_))
    ));
}

#[test]
fn forged_payloads_are_rejected() {
    // q8 with a NaN scale, q4 padding bits, bitmap with an extra bit.
    let mut f = frame("q8", 100, 4);
    let at = 88 + 16; // ndim 2: scales start right after the header
    f[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    reseal(&mut f);
    assert!(matches!(decode(&f), Err(Error::Corrupt(_))));

    // With an even count the high nibble of the last byte is a value: changing it still decodes.
    let mut f = frame("q4:1", 10, 5);
    let n = f.len();
    f[n - 1] |= 0xf0;
    reseal(&mut f);
    assert!(decode(&f).is_ok());
    let mut enc = Encoder::new("q4".parse().unwrap()).unwrap();
    let mut g = Vec::new();
    enc.encode(&[1.0, 2.0, 3.0], &[3], &mut g).unwrap();
    let n = g.len();
    g[n - 1] |= 0xf0; // the padding nibble after the third value
    reseal(&mut g);
    assert!(matches!(decode(&g), Err(Error::Corrupt(_))));

    // Byte-coded q3/q5/q6/q7: a code beyond the level range is not a frame the encoder writes.
    for (codec, bad) in [("q6", 32i8), ("q5", -16), ("q3", 4), ("q7", -64)] {
        let mut f = frame(codec, 100, 6);
        let n = f.len();
        f[n - 1] = bad as u8;
        reseal(&mut f);
        assert!(
            matches!(decode(&f), Err(Error::Corrupt(_))),
            "{codec} with code {bad}"
        );
        f[n - 1] = (bad.signum()) as u8; // an in-range code decodes
        reseal(&mut f);
        assert!(decode(&f).is_ok(), "{codec}");
    }

    // Row dedup: a row map out of first-appearance order, or one that leaves a row unused.
    let mut enc = Encoder::new("dedup".parse().unwrap()).unwrap();
    let mut d = Vec::new();
    enc.encode(&[1.0, 2.0, 1.0, 2.0, 3.0, 4.0], &[3, 2], &mut d)
        .unwrap();
    let info = FrameInfo::read(&d, &Limits::default()).unwrap();
    assert_eq!(info.index, swarm_compression::IndexCoding::RowMap);
    assert_eq!(info.kept, 4);
    let hl = 88 + 16; // ndim 2; the map is three u16: 0, 0, 1
    assert_eq!(d[hl..hl + 6], [0, 0, 0, 0, 1, 0]);
    for (map, what) in [
        ([1u8, 0, 0, 0, 1, 0], "starts at 1"),
        ([0, 0, 0, 0, 0, 0], "leaves row 1 unused"),
        ([0, 0, 2, 0, 1, 0], "skips a number"),
    ] {
        let mut g = d.clone();
        g[hl..hl + 6].copy_from_slice(&map);
        reseal(&mut g);
        assert!(matches!(decode(&g), Err(Error::Corrupt(_))), "{what}");
    }
    let mut g = d.clone();
    set_u64(&mut g, 40, 6); // as many distinct rows as rows: such a frame must be dense
    reseal(&mut g);
    assert!(matches!(decode(&g), Err(Error::Inconsistent(_))));

    let mut enc = Encoder::new("topk:0.5".parse().unwrap()).unwrap();
    let mut h = Vec::new();
    enc.encode(&[1.0, 5.0, 2.0, 6.0, 0.5, 0.1, 3.0, 0.0], &[8], &mut h)
        .unwrap();
    let info = FrameInfo::read(&h, &Limits::default()).unwrap();
    assert_eq!(info.index, swarm_compression::IndexCoding::Bitmap);
    let hl = 88 + 8;
    h[hl] |= 1; // a fifth kept bit
    reseal(&mut h);
    assert!(matches!(decode(&h), Err(Error::Corrupt(_))));
}

#[test]
fn fuzz_regression_random_and_mutated_frames() {
    // Bounded: 3 x 1500 inputs of at most a few KB; a decoder that panics fails the test.
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let seeds: Vec<Vec<u8>> = CODECS.iter().map(|c| frame(c, 300, 8)).collect();
    let mut dec = Decoder::new();
    let mut out = Vec::new();
    let limits = Limits::new(1 << 16);
    let mut decoded_ok = 0;
    for round in 0..4500 {
        let mut f: Vec<u8> = if round < 1500 {
            let len = rng.random_range(0..400);
            let mut f: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            if len >= 4 && rng.random_bool(0.7) {
                f[..4].copy_from_slice(b"SWCF");
                if len > 5 {
                    f[4] = 1;
                    f[5] = rng.random_range(0..4);
                }
            }
            f
        } else {
            seeds[rng.random_range(0..seeds.len())].clone()
        };
        if round >= 1500 {
            for _ in 0..rng.random_range(1..6) {
                let at = rng.random_range(0..f.len());
                match rng.random_range(0..4) {
                    0 => f[at] = rng.random(),
                    1 => f[at] ^= 1 << rng.random_range(0..8),
                    2 => f.truncate(at),
                    _ => f.insert(at, rng.random()),
                }
                if f.is_empty() {
                    break;
                }
            }
        }
        if round >= 3000 {
            reseal(&mut f);
        }
        if let Ok(info) = dec.decode(&f, &limits, &mut out) {
            assert_eq!(out.len(), info.elements);
            assert!(info.elements <= limits.max_elements);
            decoded_ok += 1;
        }
    }
    // Resealed mutations of value bytes legitimately decode; random bytes never do.
    assert!(decoded_ok > 0 && decoded_ok < 1500, "{decoded_ok}");
}

#[test]
fn huge_declared_sizes_fail_without_allocating_even_with_no_cap() {
    for codec in ["q8:1", "topk:0.5+q2:1+zstd", "none"] {
        let base = frame(codec, 20, 9);
        for count in [1u64 << 31, 1 << 33, 1 << 62, u64::MAX / 2] {
            let mut f = base.clone();
            set_u64(&mut f, 32, count);
            set_u64(&mut f, 88, count / 2);
            set_u64(&mut f, 96, 2);
            set_u64(&mut f, 40, count);
            set_u64(&mut f, 56, count.wrapping_mul(4));
            set_u64(&mut f, 64, count);
            reseal(&mut f);
            let mut out = Vec::new();
            let r = Decoder::new().decode(&f, &Limits::new(usize::MAX), &mut out);
            assert!(r.is_err(), "{codec} count {count}");
            assert!(
                out.capacity() < 1 << 20,
                "{codec}: allocated {}",
                out.capacity()
            );
        }
    }
}
