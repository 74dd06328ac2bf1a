//! Where fault injection ([`crate::fault`], cargo feature `fault`) hooks into a stage worker's
//! passes. Without the feature the hook holds nothing and passes every honest result through.

use candle_core::Tensor;
use swarm_model::Shard;

use super::StageOptions;
use crate::error::Result;
use crate::identity::PeerId;
use crate::ids::MbKey;

/// The fault this worker injects, if any.
#[derive(Clone, Default)]
pub(super) struct Hook {
    #[cfg(feature = "fault")]
    fault: Option<std::sync::Arc<crate::fault::Fault>>,
}

impl Hook {
    pub(super) fn new(opts: &StageOptions, me: &PeerId) -> Hook {
        #[cfg(feature = "fault")]
        {
            Hook {
                fault: opts
                    .fault
                    .map(|f| std::sync::Arc::new(crate::fault::Fault::new(f, &me.0))),
            }
        }
        #[cfg(not(feature = "fault"))]
        {
            let _ = (opts, me);
            Hook {}
        }
    }

    /// The forward output `y` of `x` this worker sends on.
    pub(super) fn forward(&self, key: MbKey, stage: u32, x: &Tensor, y: Tensor) -> Result<Tensor> {
        #[cfg(feature = "fault")]
        if let Some(f) = &self.fault {
            return f.forward(key.step, key.mb, stage as usize, x, y);
        }
        let _ = (key, stage, x);
        Ok(y)
    }

    /// The input gradient `dx` (for output gradient `g`) this worker sends back.
    pub(super) fn backward(&self, key: MbKey, g: &Tensor, dx: Tensor) -> Result<Tensor> {
        #[cfg(feature = "fault")]
        if let Some(f) = &self.fault {
            return f.backward(key.step, key.mb, g, dx);
        }
        let _ = (key, g);
        Ok(dx)
    }

    /// The learning rate of this worker's optimizer step of `step` (a `skip-step` or
    /// `scale-step` fault changes it).
    pub(super) fn step_lr(&self, step: u64, lr: f64) -> f64 {
        #[cfg(feature = "fault")]
        if let Some(f) = &self.fault {
            return f.step_lr(step, lr);
        }
        let _ = step;
        lr
    }

    /// Called before the optimizer step of `step` (a stale fault snapshots the weights).
    pub(super) fn before_apply(&self, step: u64, shard: &Shard) -> Result<()> {
        #[cfg(feature = "fault")]
        if let Some(f) = &self.fault {
            return f.before_apply(step, shard);
        }
        let _ = (step, shard);
        Ok(())
    }
}
