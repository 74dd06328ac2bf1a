//! Fault injection (issue #7): a stage peer that misbehaves on a seeded fraction of micro-batches,
//! for tests and demos of the audits (`swarm join --fault KIND:RATE`, `swarm demo --faulty-peer`).
//!
//! Whether micro-batch `mb` of step `step` is corrupted is a pure function of (seed, step, mb), so
//! a run replays exactly and the forward and backward of one micro-batch agree; every retry of a
//! corrupted micro-batch is corrupted again (a cheater does not get honest by being asked twice).
//!
//! Kinds: `noise` adds Gaussian noise of 1% of the output's rms to forward outputs; `zero` sends
//! zeros (forward outputs and input gradients); `stale` answers forwards with weights from 1-4
//! steps ago (a snapshot refreshed every [`STALE_EVERY`] steps; at step 0 there is nothing older,
//! so it is honest then); `skip` returns its input unchanged (forward: the activations it got;
//! backward: the gradient it got); `scale-grad` multiplies only the input gradients it sends back
//! by [`SCALE_GRAD`]. Two kinds cheat on the replica's own optimizer step instead of its passes
//! (caught by the inner-step audit while replicas drift between sync boundaries; with a per-step
//! sync the replicas' digests disagree and the odd one is reloaded): `skip-step` keeps its
//! weights (a zero learning rate), `scale-step` scales the learning rate by [`SCALE_STEP`]. They
//! fire per step (for all of a step's micro-batches at once).

use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;

use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use swarm_model::Shard;

use crate::error::{Error, Result};

/// Relative size of `noise` (a fraction of the output's rms).
pub const NOISE_RELATIVE: f64 = 0.01;
/// Factor `scale-grad` applies to the input gradients it sends back.
pub const SCALE_GRAD: f64 = -1.0;
/// A `stale` peer refreshes its old weights every this many steps (so they lag 1 to 4 steps).
pub const STALE_EVERY: u64 = 4;
/// Factor `scale-step` applies to its learning rate.
pub const SCALE_STEP: f64 = 4.0;

/// How a faulty peer misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// Gaussian noise on forward outputs.
    Noise,
    /// Zeros instead of outputs and input gradients.
    Zero,
    /// Forwards computed with old weights.
    Stale,
    /// The input returned unchanged.
    Skip,
    /// Input gradients scaled by [`SCALE_GRAD`].
    ScaleGrad,
    /// The optimizer step skipped.
    SkipStep,
    /// The learning rate scaled by [`SCALE_STEP`].
    ScaleStep,
}

impl FaultKind {
    /// Every kind, in the order `--fault` help lists them.
    pub const ALL: [FaultKind; 7] = [
        FaultKind::Noise,
        FaultKind::Zero,
        FaultKind::Stale,
        FaultKind::Skip,
        FaultKind::ScaleGrad,
        FaultKind::SkipStep,
        FaultKind::ScaleStep,
    ];
    /// The kinds that corrupt the frames a peer sends (the rest cheat on its optimizer step).
    pub const PASSES: [FaultKind; 5] = [
        FaultKind::Noise,
        FaultKind::Zero,
        FaultKind::Stale,
        FaultKind::Skip,
        FaultKind::ScaleGrad,
    ];

    /// Its name in `KIND:RATE` specs.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Noise => "noise",
            FaultKind::Zero => "zero",
            FaultKind::Stale => "stale",
            FaultKind::Skip => "skip",
            FaultKind::ScaleGrad => "scale-grad",
            FaultKind::SkipStep => "skip-step",
            FaultKind::ScaleStep => "scale-step",
        }
    }
}

/// `KIND:RATE[:SEED]`, e.g. `noise:0.1`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaultSpec {
    /// How it misbehaves.
    pub kind: FaultKind,
    /// Fraction of micro-batches corrupted, in [0, 1].
    pub rate: f64,
    /// Mixed with the peer id into the per-peer seed.
    pub seed: u64,
}

impl fmt::Display for FaultSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind.name(), self.rate)?;
        if self.seed != 0 {
            write!(f, ":{}", self.seed)?;
        }
        Ok(())
    }
}

impl FromStr for FaultSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<FaultSpec> {
        let bad = || Error::BadFault(s.to_string());
        let mut parts = s.trim().split(':');
        let kind = match parts.next().ok_or_else(bad)? {
            "noise" => FaultKind::Noise,
            "zero" => FaultKind::Zero,
            "stale" => FaultKind::Stale,
            "skip" => FaultKind::Skip,
            "scale-grad" => FaultKind::ScaleGrad,
            "skip-step" => FaultKind::SkipStep,
            "scale-step" => FaultKind::ScaleStep,
            _ => return Err(bad()),
        };
        let rate: f64 = parts.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
        if !(0.0..=1.0).contains(&rate) {
            return Err(bad());
        }
        let seed = match parts.next() {
            Some(x) => x.parse().map_err(|_| bad())?,
            None => 0,
        };
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(FaultSpec { kind, rate, seed })
    }
}

/// A peer's fault injector: the spec, its per-peer seed and (for `stale`) old weights.
pub struct Fault {
    /// What it injects and how often.
    pub spec: FaultSpec,
    seed: u64,
    stale: Mutex<Option<Shard>>,
}

impl fmt::Debug for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fault({})", self.spec)
    }
}

fn cand<T>(r: candle_core::Result<T>) -> Result<T> {
    r.map_err(|e| Error::Model(e.into()))
}

impl Fault {
    /// The injector of `spec` on the peer `peer` (its id bytes seed the decisions).
    pub fn new(spec: FaultSpec, peer: &[u8; 32]) -> Fault {
        let mut h = blake3::Hasher::new();
        h.update(b"swarm-fault")
            .update(peer)
            .update(&spec.seed.to_le_bytes());
        let seed = u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"));
        Fault {
            spec,
            seed,
            stale: Mutex::new(None),
        }
    }

    fn rng(&self, step: u64, mb: u32, salt: u64) -> ChaCha8Rng {
        let mut h = blake3::Hasher::new();
        h.update(&self.seed.to_le_bytes())
            .update(&step.to_le_bytes())
            .update(&mb.to_le_bytes())
            .update(&salt.to_le_bytes());
        ChaCha8Rng::from_seed(*h.finalize().as_bytes())
    }

    /// Whether micro-batch `mb` of `step` is corrupted by this peer.
    pub fn fires(&self, step: u64, mb: u32) -> bool {
        self.spec.rate > 0.0 && self.rng(step, mb, 0).random::<f64>() < self.spec.rate
    }

    /// Called before the optimizer step of `step` with the weights it starts from: a `stale`
    /// peer keeps a copy every [`STALE_EVERY`] steps.
    pub fn before_apply(&self, step: u64, shard: &Shard) -> Result<()> {
        if self.spec.kind != FaultKind::Stale || !step.is_multiple_of(STALE_EVERY) {
            return Ok(());
        }
        let copy = Shard::from_tensors(
            shard.config(),
            shard.pieces(),
            &shard.tensors(),
            shard.dtype(),
            shard.device(),
        )?;
        *self.stale.lock().unwrap_or_else(|e| e.into_inner()) = Some(copy);
        Ok(())
    }

    /// The forward output to send for (`step`, `mb`): `y` as computed from input `x` by stage
    /// `index` of the peer's shard, or its corruption.
    pub fn forward(
        &self,
        step: u64,
        mb: u32,
        index: usize,
        x: &Tensor,
        y: Tensor,
    ) -> Result<Tensor> {
        if !self.fires(step, mb) {
            return Ok(y);
        }
        tracing::debug!(step, microbatch = mb, fault = %self.spec, "corrupting a forward");
        match self.spec.kind {
            FaultKind::Noise => {
                let rms = cand(
                    y.sqr()
                        .and_then(|t| t.mean_all())
                        .and_then(|t| t.to_scalar::<f32>()),
                )?
                .sqrt() as f64;
                let sigma = (NOISE_RELATIVE * rms) as f32;
                let mut rng = self.rng(step, mb, 1);
                let n = y.elem_count();
                let noise: Vec<f32> = (0..n).map(|_| sigma * gaussian(&mut rng)).collect();
                let noise = cand(Tensor::from_vec(noise, y.dims(), y.device()))?;
                cand(y.add(&noise))
            }
            FaultKind::Zero => cand(y.zeros_like()),
            FaultKind::Skip => Ok(x.clone()),
            FaultKind::Stale => {
                let g = self.stale.lock().unwrap_or_else(|e| e.into_inner());
                match g.as_ref() {
                    Some(old) => Ok(old.stage_forward(index, x)?.0),
                    None => Ok(y),
                }
            }
            FaultKind::ScaleGrad | FaultKind::SkipStep | FaultKind::ScaleStep => Ok(y),
        }
    }

    /// The input gradient to send back for (`step`, `mb`): `dx` as computed from the incoming
    /// gradient `g`, or its corruption.
    pub fn backward(&self, step: u64, mb: u32, g: &Tensor, dx: Tensor) -> Result<Tensor> {
        if !self.fires(step, mb) {
            return Ok(dx);
        }
        match self.spec.kind {
            FaultKind::Zero => cand(dx.zeros_like()),
            FaultKind::Skip => Ok(g.clone()),
            FaultKind::ScaleGrad => {
                tracing::debug!(step, microbatch = mb, fault = %self.spec, "corrupting a backward");
                cand(dx.affine(SCALE_GRAD, 0.0))
            }
            FaultKind::Noise | FaultKind::Stale | FaultKind::SkipStep | FaultKind::ScaleStep => {
                Ok(dx)
            }
        }
    }

    /// The learning rate this peer's optimizer step of `step` uses in place of `lr`.
    pub fn step_lr(&self, step: u64, lr: f64) -> f64 {
        // A step-level decision: one draw per step (micro-batch index out of range).
        if !self.fires(step, u32::MAX) {
            return lr;
        }
        match self.spec.kind {
            FaultKind::SkipStep => 0.0,
            FaultKind::ScaleStep => lr * SCALE_STEP,
            _ => lr,
        }
    }
}

/// A standard normal sample (Box-Muller; no extra dependency).
fn gaussian(rng: &mut ChaCha8Rng) -> f32 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print() {
        let s: FaultSpec = "noise:0.1".parse().unwrap();
        assert_eq!((s.kind, s.rate, s.seed), (FaultKind::Noise, 0.1, 0));
        assert_eq!(s.to_string(), "noise:0.1");
        let s: FaultSpec = "scale-grad:1:7".parse().unwrap();
        assert_eq!((s.kind, s.seed), (FaultKind::ScaleGrad, 7));
        for k in FaultKind::ALL {
            let s: FaultSpec = format!("{}:0.5", k.name()).parse().unwrap();
            assert_eq!(s.kind, k);
        }
        for bad in [
            "",
            "noise",
            "noise:",
            "noise:2",
            "noise:-0.1",
            "loud:0.1",
            "zero:0.1:x",
            "zero:0.1:1:2",
        ] {
            assert!(bad.parse::<FaultSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn decisions_are_seeded_and_near_the_rate() {
        let spec: FaultSpec = "zero:0.1".parse().unwrap();
        let a = Fault::new(spec, &[1; 32]);
        let b = Fault::new(spec, &[1; 32]);
        let c = Fault::new(spec, &[2; 32]);
        let n = 20_000u32;
        let fa: Vec<bool> = (0..n)
            .map(|i| a.fires(u64::from(i / 100), i % 100))
            .collect();
        let fb: Vec<bool> = (0..n)
            .map(|i| b.fires(u64::from(i / 100), i % 100))
            .collect();
        let fc: Vec<bool> = (0..n)
            .map(|i| c.fires(u64::from(i / 100), i % 100))
            .collect();
        assert_eq!(fa, fb);
        assert_ne!(fa, fc);
        let hits = fa.iter().filter(|x| **x).count() as f64 / n as f64;
        // 20,000 Bernoulli(0.1): sd 0.0021; 5 sd.
        assert!((hits - 0.1).abs() < 0.011, "{hits}");
        let never = Fault::new("zero:0".parse().unwrap(), &[1; 32]);
        assert!((0..1000).all(|i| !never.fires(i, 0)));
    }

    #[test]
    fn corruptions_change_what_they_should() {
        let dev = candle_core::Device::Cpu;
        let x = Tensor::from_vec(
            (0..24).map(|i| i as f32).collect::<Vec<_>>(),
            (1, 4, 6),
            &dev,
        )
        .unwrap();
        let y = (x.clone() * 2.0).unwrap();
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let on = |k: &str| Fault::new(format!("{k}:1").parse().unwrap(), &[3; 32]);
        assert_eq!(
            v(&on("zero").forward(0, 0, 0, &x, y.clone()).unwrap()),
            vec![0.0; 24]
        );
        assert_eq!(
            v(&on("skip").forward(0, 0, 0, &x, y.clone()).unwrap()),
            v(&x)
        );
        assert_eq!(v(&on("skip").backward(0, 0, &x, y.clone()).unwrap()), v(&x));
        assert_eq!(
            v(&on("scale-grad").forward(0, 0, 0, &x, y.clone()).unwrap()),
            v(&y)
        );
        let neg: Vec<f32> = v(&y).iter().map(|a| -a).collect();
        assert_eq!(
            v(&on("scale-grad").backward(0, 0, &x, y.clone()).unwrap()),
            neg
        );
        let noisy = v(&on("noise").forward(0, 0, 0, &x, y.clone()).unwrap());
        let yy = v(&y);
        let rms = (yy.iter().map(|a| a * a).sum::<f32>() / 24.0).sqrt();
        let diff = (noisy
            .iter()
            .zip(&yy)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f32>()
            / 24.0)
            .sqrt();
        assert!(diff > 0.0 && diff < 0.05 * rms, "{diff} vs rms {rms}");
        assert_eq!(on("skip-step").step_lr(3, 0.5), 0.0);
        assert_eq!(on("scale-step").step_lr(3, 0.5), 0.5 * SCALE_STEP);
        assert_eq!(on("noise").step_lr(3, 0.5), 0.5);
        // Stale without a snapshot (step 0) is honest.
        assert_eq!(
            v(&on("stale").forward(0, 0, 0, &x, y.clone()).unwrap()),
            v(&y)
        );
    }
}
