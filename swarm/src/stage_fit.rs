//! Which stage a joining peer can hold in memory (issue #17; Petals sizes a server's block count
//! from free memory the same way). The need of each stage comes from
//! `swarm_model::presets::stage_memory` (weights, gradients, AdamW moments, activations of the
//! micro-batches in flight); the budget is what the peer says it has (`/proc/meminfo`
//! MemAvailable by default, or a flag).

use swarm_model::RunConfig;
use swarm_model::presets::stage_memory;

use crate::error::{Error, Result};

fn mib(b: u64) -> String {
    format!("{:.0} MiB", b as f64 / (1 << 20) as f64)
}

/// The stage to serve: `asked` if given and it fits; else `preferred` (the router's choice for
/// the swarm) if it fits; else the fitting stage with the fewest `replicas`. With no budget
/// (`None`), no check. When nothing fits, an error says what each stage needs.
pub fn fitting_stage(
    cfg: &RunConfig,
    replicas: &[usize],
    asked: Option<u32>,
    preferred: impl FnOnce() -> Result<u32>,
    budget: Option<u64>,
) -> Result<u32> {
    let Some(budget) = budget else {
        return match asked {
            Some(s) => Ok(s),
            None => preferred(),
        };
    };
    let stages = cfg.stages.len().saturating_sub(1);
    let need = |s: usize| stage_memory(cfg, s).map(|m| m.total).map_err(Error::from);
    if let Some(s) = asked {
        let n = need(s as usize)?;
        if n > budget {
            return Err(Error::DoesNotFit(format!(
                "stage {s} needs about {} (weights, gradients, AdamW state, activations of {} \
                 micro-batches in flight) but {} is available: choose a smaller model or free memory",
                mib(n),
                swarm_model::presets::in_flight(cfg),
                mib(budget)
            )));
        }
        return Ok(s);
    }
    let p = preferred()?;
    if need(p as usize)? <= budget {
        return Ok(p);
    }
    let mut fits = Vec::new();
    for s in 0..stages {
        if need(s)? <= budget {
            fits.push(s);
        }
    }
    match fits
        .into_iter()
        .min_by_key(|&s| (replicas.get(s).copied().unwrap_or(0), s))
    {
        Some(s) => Ok(s as u32),
        None => {
            let smallest = (0..stages).map(need).collect::<Result<Vec<_>>>()?;
            let min = smallest.iter().copied().min().unwrap_or(0);
            Err(Error::DoesNotFit(format!(
                "no stage of this run fits in {} of memory: the smallest needs about {} (weights, \
                 gradients, AdamW state, activations of {} micro-batches in flight)",
                mib(budget),
                mib(min),
                swarm_model::presets::in_flight(cfg)
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> RunConfig {
        let mut c = RunConfig::default();
        swarm_model::presets::preset("100m")
            .unwrap()
            .apply(&mut c, 16384)
            .unwrap();
        // Stage 0 bigger than the others.
        c.stages = vec![0, 6, 8, 10, 12];
        c
    }

    #[test]
    fn a_peer_takes_a_stage_it_can_hold_or_refuses_clearly() {
        let c = cfg();
        let need = |s| stage_memory(&c, s).unwrap().total;
        assert!(need(0) > need(1));
        let pref = || Ok(0);
        // Plenty: the router's choice; no budget: no check.
        assert_eq!(
            fitting_stage(&c, &[0; 4], None, pref, Some(need(0))).unwrap(),
            0
        );
        assert_eq!(fitting_stage(&c, &[0; 4], None, pref, None).unwrap(), 0);
        // Too little for stage 0: the least served of the stages that fit.
        let s = fitting_stage(&c, &[0, 2, 1, 3], None, pref, Some(need(1))).unwrap();
        assert_eq!(s, 2);
        // Asked for a stage that does not fit: refused, saying what it needs.
        let e = fitting_stage(&c, &[0; 4], Some(0), pref, Some(need(1))).unwrap_err();
        assert!(e.to_string().contains("stage 0 needs about"), "{e}");
        // Nothing fits.
        let e = fitting_stage(&c, &[0; 4], None, pref, Some(1 << 20)).unwrap_err();
        assert!(e.to_string().contains("no stage of this run fits"), "{e}");
    }
}
