//! `swarm bench codec` (issue #3): ratio, error and one-thread speed of codecs on realistic tensors.

use std::time::{Duration, Instant};

use anyhow::Context;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, StudentT};
use serde::Serialize;
use swarm_compression::{Codec, Decoder, Encoder, Limits};

use crate::ui;

/// What the swarm peers in the literature send today, measured beside ours.
const BASELINES: [(&str, &str); 2] = [
    ("fp16", "Petals: 16-bit activations"),
    (
        "q8:4096",
        "SWARM: blockwise 8-bit, blocks of 4096, fp32 absmax",
    ),
];

const DEFAULT_CODECS: &str = "none,fp16,bf16,q8:4096,q8,q4,rht+q4,q2,rht+q2,q8+zstd:1,\
topk:0.1+q8+zstd:3,topk:0.1+q8+zstd:1,topk-row:0.1+q8+zstd:3,topk:0.01+q8+zstd:3,topk:0.1+rht+q4+zstd:3,\
dedup+rht+q6:256+zstd:3,rht+q4:1024+zstd:3,topk:0.9+rht+q2:1024+zstd:3,dedup+rht+q4:256+zstd:3,topk-row:0.02+q2";

#[derive(clap::Args)]
pub(crate) struct BenchCodecArgs {
    /// Print the result as one JSON object on the last line of stdout.
    #[arg(long)]
    pub json: bool,
    /// Comma-separated codec names to measure (the Petals and SWARM baselines are always added).
    #[arg(long, default_value = DEFAULT_CODECS)]
    pub codecs: String,
    /// Elements per tensor (rounded down to a multiple of 1024).
    #[arg(long, default_value_t = 1 << 20)]
    pub elements: usize,
    /// Timed repetitions per codec and direction; the best is reported (the machine may be busy).
    #[arg(long, default_value_t = 7)]
    pub repeats: usize,
    /// Seed of the synthetic tensors.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Serialize)]
struct Row {
    codec: String,
    tensor: &'static str,
    ratio: f64,
    rel_err: f64,
    encode_mb_s: f64,
    decode_mb_s: f64,
    bytes: usize,
    baseline: Option<&'static str>,
}

#[derive(Serialize)]
struct Report {
    elements: usize,
    repeats: usize,
    threads: usize,
    results: Vec<Row>,
}

/// Heavy-tailed activations (Student-t, 4 degrees of freedom) of `[tokens, 512]` with six outlier
/// channels 30x larger, as seen in transformer residual streams.
fn activations(n: usize, rng: &mut ChaCha8Rng) -> (Vec<f32>, Vec<usize>) {
    let cols = 512;
    let rows = n / cols;
    let t = StudentT::new(4.0f32).expect("valid dof");
    let mut v: Vec<f32> = (0..rows * cols).map(|_| t.sample(rng) * 0.5).collect();
    for row in v.chunks_exact_mut(cols) {
        for c in [17, 101, 202, 333, 400, 511] {
            row[c] *= 30.0;
        }
    }
    (v, vec![rows, cols])
}

/// Weight gradients: Gaussian, sigma 1e-3, `[n / 1024, 1024]`.
fn gradients(n: usize, rng: &mut ChaCha8Rng) -> (Vec<f32>, Vec<usize>) {
    let d = Normal::new(0.0f32, 1e-3).expect("valid sigma");
    let rows = n / 1024;
    (
        (0..rows * 1024).map(|_| d.sample(rng)).collect(),
        vec![rows, 1024],
    )
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn best_of(repeats: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<Duration> {
    f()?; // warm-up: scratch buffers grow here, later calls allocate nothing
    let mut best = Duration::MAX;
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed());
    }
    Ok(best)
}

pub(crate) fn run(args: BenchCodecArgs) -> anyhow::Result<()> {
    let n = (args.elements / 1024).max(1) * 1024;
    let mut names: Vec<String> = args
        .codecs
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    for (b, _) in BASELINES {
        if !names.iter().any(|c| c == b) {
            names.push(b.to_string());
        }
    }
    let codecs: Vec<Codec> = names
        .iter()
        .map(|s| s.parse::<Codec>())
        .collect::<Result<_, _>>()
        .context("--codecs")?;

    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let tensors = [
        ("activations", activations(n, &mut rng)),
        ("gradients", gradients(n, &mut rng)),
    ];
    let bar = ui::progress((codecs.len() * tensors.len()) as u64, args.json);
    let limits = Limits::new(n);
    let mb = n as f64 * 4.0 / 1e6;
    let mut results = Vec::new();
    for (tensor, (data, shape)) in &tensors {
        for codec in &codecs {
            bar.set_message(format!("{codec} on {tensor}"));
            let mut enc = Encoder::new(*codec)?;
            let mut dec = Decoder::new();
            let mut frame = Vec::new();
            let mut out = Vec::new();
            let t_enc = best_of(args.repeats, || Ok(enc.encode(data, shape, &mut frame)?))?;
            let t_dec = best_of(args.repeats, || {
                dec.decode(&frame, &limits, &mut out)?;
                Ok(())
            })?;
            let name = codec.to_string();
            results.push(Row {
                baseline: BASELINES
                    .iter()
                    .find(|(b, _)| codec == &b.parse::<Codec>().expect("valid"))
                    .map(|(_, d)| *d),
                codec: name,
                tensor,
                ratio: data.len() as f64 * 4.0 / frame.len() as f64,
                rel_err: rel_l2(data, &out),
                encode_mb_s: mb / t_enc.as_secs_f64(),
                decode_mb_s: mb / t_dec.as_secs_f64(),
                bytes: frame.len(),
            });
            bar.inc(1);
        }
    }
    bar.finish_and_clear();

    println!(
        "{n} elements per tensor, best of {} runs, one thread; MB/s of fp32 input (1 MB = 10^6 bytes)",
        args.repeats
    );
    println!(
        "{:<12} {:<26} {:>8} {:>10} {:>10} {:>10}  note",
        "tensor", "codec", "ratio", "rel_err", "enc MB/s", "dec MB/s"
    );
    for r in &results {
        println!(
            "{:<12} {:<26} {:>7.1}x {:>10.2e} {:>10.0} {:>10.0}  {}",
            r.tensor,
            r.codec,
            r.ratio,
            r.rel_err,
            r.encode_mb_s,
            r.decode_mb_s,
            r.baseline.unwrap_or("")
        );
    }
    if args.json {
        ui::print_json(&Report {
            elements: n,
            repeats: args.repeats,
            threads: 1,
            results,
        })?;
    }
    Ok(())
}
