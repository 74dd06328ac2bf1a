//! Fuzz the frame decoder with (1) the raw input as a frame and (2) a valid frame built from the
//! input, then mutated at input-chosen places and resealed so the checksum does not hide the
//! deeper checks. The decoder must return `Ok` or a typed error, never panic or over-allocate.
#![no_main]

use libfuzzer_sys::fuzz_target;
use swarm_compression::{Codec, Decoder, Encoder, FrameInfo, Limits};

const CODECS: [&str; 14] = [
    "none",
    "dedup",
    "dedup+rht+q6:4+zstd:1",
    "q5:16",
    "q3+zstd:1",
    "bf16",
    "fp16+zstd:1",
    "q8",
    "q4:3",
    "rht+q2:8+zstd:1",
    "topk:0.1+q8+zstd:1",
    "topk:0.6+bf16",
    "topk-row:0.3+rht+q4:4",
    "topk:0.02",
];

fn reseal(f: &mut [u8]) {
    if f.len() < 88 {
        return;
    }
    let hl = (88 + 8 * f[5] as usize).min(f.len());
    let mut h = crc32fast::Hasher::new();
    h.update(&f[..20]);
    h.update(&f[24..hl]);
    h.update(&f[hl..]);
    f[20..24].copy_from_slice(&h.finalize().to_le_bytes());
}

fn check(dec: &mut Decoder, frame: &[u8], out: &mut Vec<f32>) {
    let limits = Limits::new(1 << 20);
    let header = FrameInfo::read(frame, &limits);
    match dec.decode(frame, &limits, out) {
        Ok(info) => {
            assert_eq!(out.len(), info.elements);
            assert_eq!(header.as_ref().ok(), Some(&info));
        }
        Err(_) => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let mut dec = Decoder::new();
    let mut out = Vec::new();
    check(&mut dec, data, &mut out);

    if data.len() < 4 {
        return;
    }
    let codec: Codec = CODECS[data[0] as usize % CODECS.len()].parse().unwrap();
    let n_mut = (data[1] % 8) as usize;
    let (muts, body) = data[2..].split_at((n_mut * 3).min(data.len() - 2));
    let vals: Vec<f32> = body
        .chunks_exact(2)
        .map(|c| i16::from_le_bytes([c[0], c[1]]) as f32 / 64.0)
        .collect();
    let cols = (data[1] as usize / 8 % 7) + 1;
    let rows = vals.len() / cols;
    let vals = &vals[..rows * cols];
    let mut frame = Vec::new();
    Encoder::new(codec)
        .unwrap()
        .encode(vals, &[rows, cols], &mut frame)
        .unwrap();
    let info = dec
        .decode(&frame, &Limits::new(vals.len()), &mut out)
        .unwrap();
    assert_eq!(info.elements, vals.len());
    for m in muts.chunks_exact(3) {
        let at = u16::from_le_bytes([m[0], m[1]]) as usize % frame.len();
        frame[at] ^= m[2];
    }
    reseal(&mut frame);
    check(&mut dec, &frame, &mut out);
});
