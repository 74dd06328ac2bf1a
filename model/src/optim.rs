//! Optimizer pieces shared by every shard: AdamW hyper-parameters, global-norm clipping and the
//! learning-rate schedule. The update itself is `Shard::optimizer_step`.

use std::f64::consts::PI;

use rayon::prelude::*;

use crate::layer::{Slots, filled};

/// AdamW hyper-parameters (the learning rate is passed per step, from [`LrSchedule`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW {
    /// Decay of the first moment.
    pub beta1: f64,
    /// Decay of the second moment.
    pub beta2: f64,
    /// Added to the second moment's root (no division by zero).
    pub eps: f64,
    /// Decoupled weight decay (`w *= 1 - lr * weight_decay`), applied to matrices only, not to
    /// RMSNorm weights.
    pub weight_decay: f64,
}

impl Default for AdamW {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

/// One AdamW step's per-element constants, for one parameter (`Shard::optimizer_step` derives
/// them from [`AdamW`], the learning rate, the step count and the clip factor).
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdamWStep {
    pub b1: f32,
    pub b2: f32,
    /// `lr / (1 - beta1^t)`.
    pub step_size: f32,
    /// `sqrt(1 - beta2^t)`.
    pub bc2_sqrt: f32,
    pub eps: f32,
    /// The gradient clip factor.
    pub scale: f32,
    /// `1 - lr * weight_decay` for matrices, 1 for norm weights.
    pub decay: f32,
}

impl AdamWStep {
    /// The weights after the step from `w` and gradient `g` (`None`: zero), the moments `m` and
    /// `v` updated in place. Reads the old weights where they lie and writes the new ones once
    /// (no copies of weights or gradients). Fixed-size chunks on the thread pool, element by
    /// element the same operations in f32: the bits depend neither on the thread count nor on
    /// the vector width.
    #[allow(unsafe_code)]
    pub(crate) fn apply(
        &self,
        w: &[f32],
        g: Option<&[f32]>,
        m: &mut [f32],
        v: &mut [f32],
    ) -> Vec<f32> {
        const CHUNK: usize = 1 << 14;
        let n = w.len();
        assert!(m.len() == n && v.len() == n && g.is_none_or(|g| g.len() == n));
        let zeros;
        let g = match g {
            Some(g) => g,
            None => {
                zeros = vec![0.0; n];
                &zeros
            }
        };
        let s = *self;
        let fill = |out: &mut Slots<f32>| {
            out.par_chunks_mut(CHUNK)
                .zip(w.par_chunks(CHUNK))
                .zip(m.par_chunks_mut(CHUNK))
                .zip(v.par_chunks_mut(CHUNK))
                .zip(g.par_chunks(CHUNK))
                .for_each(|((((out, w), m), v), g)| {
                    crate::ops::simd(
                        #[inline(always)]
                        || {
                            for ((((o, &w), m), v), &g) in
                                out.iter_mut().zip(w).zip(m).zip(v).zip(g)
                            {
                                let gi = g * s.scale;
                                *m = s.b1 * *m + (1.0 - s.b1) * gi;
                                *v = s.b2 * *v + (1.0 - s.b2) * gi * gi;
                                let denom = v.sqrt() / s.bc2_sqrt + s.eps;
                                o.write(w * s.decay - s.step_size * *m / denom);
                            }
                        },
                    )
                })
        };
        // SAFETY: the chunks of `out` pair up one to one with those of `w` (same length and
        // chunk size), and every element of each is written.
        unsafe { filled(n, fill) }
    }
}

/// The clip factor for gradients whose global squared norm (summed over all shards of the
/// model, see `Shard::grad_sq_norm`) is `total_sq_norm`: `max_norm / norm` when the norm
/// exceeds `max_norm`, else 1. `max_norm <= 0` disables clipping.
pub fn clip_scale(total_sq_norm: f64, max_norm: f64) -> f64 {
    let norm = total_sq_norm.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        max_norm / norm
    } else {
        1.0
    }
}

/// Linear warmup to `lr`, then cosine decay to `min_lr` at `total_steps`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    /// Peak learning rate.
    pub lr: f64,
    /// Learning rate at the end of the decay.
    pub min_lr: f64,
    /// Steps of the linear warmup.
    pub warmup_steps: u64,
    /// Steps of the run (where the decay ends).
    pub total_steps: u64,
}

impl LrSchedule {
    /// The learning rate of step `step` (0-based): `lr * (step + 1) / warmup_steps` during
    /// warmup, then `min_lr + (lr - min_lr) * (1 + cos(pi * progress)) / 2`, `min_lr` after the end.
    pub fn at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + (PI * progress).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_min() {
        let s = LrSchedule {
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 10,
            total_steps: 110,
        };
        assert_eq!(s.at(0), 1e-4);
        assert_eq!(s.at(9), 1e-3);
        assert!((s.at(10) - 1e-3).abs() < 1e-15);
        assert!((s.at(60) - 5.5e-4).abs() < 1e-12); // halfway: the mean of lr and min_lr
        assert!((s.at(110) - 1e-4).abs() < 1e-15);
        assert!((s.at(1000) - 1e-4).abs() < 1e-15);
        for k in 10..110 {
            assert!(s.at(k + 1) <= s.at(k));
        }
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        assert_eq!(clip_scale(16.0, 1.0), 0.25);
        assert_eq!(clip_scale(0.25, 1.0), 1.0);
        assert_eq!(clip_scale(16.0, 0.0), 1.0);
    }
}
