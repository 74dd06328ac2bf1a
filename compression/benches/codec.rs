//! `cargo bench -p swarm-compression [-- FILTER]`: one-thread encode and decode speed of the codecs
//! on 1M-element tensors, best of many runs (no criterion: keeps CI builds small; the figures are
//! minima over repetitions, which is what a busy shared machine can still measure reliably).
//! `swarm bench codec` reports the same with ratios and errors.

use std::hint::black_box;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, StudentT};
use swarm_compression::{Decoder, Encoder, ErrorFeedback, Limits};

fn best(reps: usize, mut f: impl FnMut()) -> Duration {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .unwrap_or_default()
}

fn main() {
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let n = 1 << 20;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let t = StudentT::new(4.0f32).unwrap();
    let mut act: Vec<f32> = (0..n).map(|_| t.sample(&mut rng) * 0.5).collect();
    for row in act.chunks_exact_mut(512) {
        for c in [17, 101, 202, 333, 400, 511] {
            row[c] *= 30.0;
        }
    }
    let g = Normal::new(0.0f32, 1e-3).unwrap();
    let grad: Vec<f32> = (0..n).map(|_| g.sample(&mut rng)).collect();
    let mb = n as f64 * 4.0 / 1e6;
    for codec in [
        "none",
        "fp16",
        "bf16",
        "q8:4096",
        "q8",
        "q4",
        "rht+q4",
        "q2",
        "rht+q2",
        "topk:0.1+q8+zstd:3",
        "topk-row:0.1+q8+zstd:3",
        "topk:0.01+q8+zstd:3",
        // The home and subspace frontier paths (issue #13's codec-speed target).
        "dedup+rht+q6:256+zstd:3",
        "dedup+rht+q4:256+zstd:3",
        "rht+q4:1024+zstd:3",
        "topk:0.9+rht+q2:1024+zstd:3",
        "topk-row:0.02+q2",
    ] {
        if filter.as_ref().is_some_and(|f| !codec.contains(f.as_str())) {
            continue;
        }
        for (name, data, shape) in [
            ("activations", &act, [n / 512, 512]),
            ("gradients", &grad, [n / 1024, 1024]),
        ] {
            let mut enc = Encoder::new(codec.parse().unwrap()).unwrap();
            let mut dec = Decoder::new();
            let (mut frame, mut out) = (Vec::new(), Vec::new());
            let te = best(15, || {
                enc.encode(black_box(data), &shape, &mut frame).unwrap()
            });
            let td = best(15, || {
                dec.decode(black_box(&frame), &Limits::new(n), &mut out)
                    .unwrap();
            });
            println!(
                "{codec:<24} {name:<12} ratio {:>6.1}x  encode {:>6.0} MB/s  decode {:>6.0} MB/s",
                n as f64 * 4.0 / frame.len() as f64,
                mb / te.as_secs_f64(),
                mb / td.as_secs_f64()
            );
        }
    }
    // The replica sync's send: error feedback around its codec (compensate, encode, keep what
    // the frame dropped).
    let sync = "topk:0.9+rht+q2:1024+zstd:3";
    if filter.as_ref().is_none_or(|f| sync.contains(f.as_str())) {
        let mut enc = Encoder::new(sync.parse().unwrap()).unwrap();
        let mut fb = ErrorFeedback::new(n);
        let mut frame = Vec::new();
        let t = best(15, || {
            fb.encode(&mut enc, black_box(&grad), &[n], &mut frame)
                .unwrap()
        });
        println!(
            "{:<24} {:<12} feedback encode {:>6.0} MB/s",
            sync,
            "gradients",
            mb / t.as_secs_f64()
        );
    }
}
