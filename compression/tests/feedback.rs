//! Error feedback: residual accounting, convergence of the running sum, reset and misuse.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use swarm_compression::{Decoder, Encoder, Error, ErrorFeedback, Limits};

fn gaussian(n: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let d = Normal::new(0.0f32, 1.0).unwrap();
    (0..n).map(|_| d.sample(rng)).collect()
}

fn decode(frame: &[u8]) -> Vec<f32> {
    let mut out = Vec::new();
    Decoder::new()
        .decode(frame, &Limits::default(), &mut out)
        .unwrap();
    out
}

#[test]
fn decoded_sum_plus_residual_equals_gradient_sum() {
    let n = 5000;
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for codec in ["topk:0.05+q8+zstd", "q2", "topk-row:0.1+rht+q4"] {
        let mut enc = Encoder::new(codec.parse().unwrap()).unwrap();
        let mut ef = ErrorFeedback::new(n);
        let mut sent = vec![0f64; n];
        let mut total = vec![0f64; n];
        let mut frame = Vec::new();
        for _ in 0..30 {
            let g = gaussian(n, &mut rng);
            ef.encode(&mut enc, &g, &[50, 100], &mut frame).unwrap();
            for ((s, t), (d, x)) in sent
                .iter_mut()
                .zip(&mut total)
                .zip(decode(&frame).iter().zip(&g))
            {
                *s += *d as f64;
                *t += *x as f64;
            }
        }
        for i in 0..n {
            let lhs = sent[i] + ef.residual()[i] as f64;
            assert!(
                (lhs - total[i]).abs() < 1e-3,
                "{codec} [{i}]: {lhs} vs {}",
                total[i]
            );
        }
    }
}

#[test]
fn feedback_makes_the_running_sum_converge() {
    // A constant gradient sent 200 times through top-10%: without feedback the small 90% of its
    // entries are never sent; with feedback each is sent once its residual grows large enough.
    let n = 2000;
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let g = gaussian(n, &mut rng);
    let codec = "topk:0.1+q8".parse().unwrap();
    let mut enc = Encoder::new(codec).unwrap();
    let mut ef = ErrorFeedback::new(n);
    let (mut with, mut without) = (vec![0f64; n], vec![0f64; n]);
    let mut frame = Vec::new();
    let steps = 200;
    for _ in 0..steps {
        ef.encode(&mut enc, &g, &[n], &mut frame).unwrap();
        for (w, d) in with.iter_mut().zip(decode(&frame)) {
            *w += d as f64;
        }
        enc.encode(&g, &[n], &mut frame).unwrap();
        for (w, d) in without.iter_mut().zip(decode(&frame)) {
            *w += d as f64;
        }
    }
    let err = |s: &[f64]| {
        let num: f64 = s
            .iter()
            .zip(&g)
            .map(|(a, b)| (a - steps as f64 * *b as f64).powi(2))
            .sum();
        let den: f64 = g.iter().map(|b| (steps as f64 * *b as f64).powi(2)).sum();
        (num / den).sqrt()
    };
    assert!(err(&with) < 0.15, "with feedback {}", err(&with));
    assert!(err(&without) > 0.5, "without feedback {}", err(&without));
}

#[test]
fn reset_and_low_level_api() {
    let n = 1000;
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let g = gaussian(n, &mut rng);
    let mut enc = Encoder::new("topk:0.1+q4".parse().unwrap()).unwrap();
    let mut a = ErrorFeedback::new(n);
    let mut b = ErrorFeedback::new(n);
    let (mut fa, mut fb) = (Vec::new(), Vec::new());
    a.encode(&mut enc, &g, &[n], &mut fa).unwrap();
    // The same through compensate / encode / accumulate.
    let c = b.compensate(&g).unwrap().to_vec();
    enc.encode(&c, &[n], &mut fb).unwrap();
    b.accumulate(&fb).unwrap();
    assert_eq!(fa, fb);
    assert_eq!(a.residual(), b.residual());
    assert!(a.residual().iter().any(|r| *r != 0.0));
    a.reset();
    assert!(a.residual().iter().all(|r| *r == 0.0));
    assert_eq!(a.len(), n);
    a.reset_to(10);
    assert_eq!(a.len(), 10);
}

#[test]
fn misuse_is_an_error_and_leaves_the_residual() {
    let mut enc = Encoder::new("q8".parse().unwrap()).unwrap();
    let mut ef = ErrorFeedback::new(4);
    let mut out = Vec::new();
    assert!(matches!(
        ef.encode(&mut enc, &[1.0; 5], &[5], &mut out),
        Err(Error::FeedbackLength {
            residual: 4,
            got: 5
        })
    ));
    assert!(matches!(ef.accumulate(&out), Err(Error::FeedbackOrder)));
    ef.encode(&mut enc, &[1.0, 2.0, 3.0, 4.5], &[4], &mut out)
        .unwrap();
    let before = ef.residual().to_vec();
    assert!(matches!(
        ef.encode(&mut enc, &[f32::NAN, 0.0, 0.0, 0.0], &[4], &mut out),
        Err(Error::NonFinite { .. })
    ));
    assert_eq!(ef.residual(), &before[..]);
    // A frame of another length is refused.
    let mut other = Vec::new();
    enc.encode(&[1.0; 8], &[8], &mut other).unwrap();
    ef.compensate(&[0.0; 4]).unwrap();
    assert!(ef.accumulate(&other).is_err());
}
