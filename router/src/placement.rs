//! Which stages a peer serves: the choice for a joining peer, and a debounced rebalancing rule.
//!
//! Like Petals' block selection, a joiner takes the window of stages whose capacity relative to
//! demand is lowest (compared as sorted vectors, so the weakest stage dominates). Capacity counts
//! serving and joining peers, so a burst of joiners does not all pick the same stage. Rebalancing
//! (Petals' `should_choose_other_blocks`) moves a peer only when the swarm's bottleneck capacity
//! rises by more than `min_relative_gain`, the gain over `horizon_s` outweighs the throughput lost
//! while it downloads the new stage's state, and it has stayed put for `min_dwell_ms`: Petals'
//! users saw servers flap between blocks without such damping.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::view::{PeerKey, PeerState, SwarmView, stage_capacity};

/// Per-stage capacity (serving + joining) divided by the stage's demand (`None` = equal demand).
pub fn stage_pressure(view: &SwarmView, demand: Option<&[f64]>) -> Result<Vec<f64>, Error> {
    let n = usize::from(view.num_stages());
    if let Some(d) = demand
        && (d.len() != n || d.iter().any(|&x| !x.is_finite() || x <= 0.0))
    {
        return Err(Error::InvalidConfig(format!(
            "demand must be {n} finite positive numbers"
        )));
    }
    Ok((0..view.num_stages())
        .map(|s| view.planned_capacity(s) / demand.map_or(1.0, |d| d[usize::from(s)]))
        .collect())
}

/// The window of `span` consecutive stages a joining peer should serve: the one whose sorted
/// capacity-to-demand values are lexicographically smallest (ties: the lowest stage).
pub fn choose_stages(
    view: &SwarmView,
    span: u16,
    demand: Option<&[f64]>,
) -> Result<Range<u16>, Error> {
    let pressure = stage_pressure(view, demand)?;
    best_window(&pressure, span, view.num_stages())
}

fn best_window(pressure: &[f64], span: u16, num_stages: u16) -> Result<Range<u16>, Error> {
    if span == 0 || span > num_stages {
        return Err(Error::InvalidStage {
            start: 0,
            end: span,
            num_stages,
        });
    }
    let w = usize::from(span);
    let mut best: Option<(Vec<f64>, usize)> = None;
    for start in 0..=pressure.len() - w {
        let mut v = pressure[start..start + w].to_vec();
        v.sort_by(f64::total_cmp);
        let better = match &best {
            None => true,
            Some((b, _)) => {
                v.iter()
                    .zip(b)
                    .map(|(x, y)| x.total_cmp(y))
                    .find(|o| o.is_ne())
                    == Some(std::cmp::Ordering::Less)
            }
        };
        if better {
            best = Some((v, start));
        }
    }
    let start = best.map_or(0, |b| b.1) as u16;
    Ok(start..start + span)
}

/// Rebalancing tunables.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RebalanceConfig {
    /// Move only if the bottleneck capacity rises by at least this fraction.
    pub min_relative_gain: f64,
    /// Seconds over which the gain is credited (how long the peer is expected to stay); the
    /// download time is deducted from it.
    pub horizon_s: f64,
    /// A peer stays on its stages at least this long after joining or moving, ms.
    pub min_dwell_ms: u64,
    /// Bytes of one stage's state a mover downloads (weights and optimizer state).
    pub stage_state_bytes: f64,
}

impl Default for RebalanceConfig {
    fn default() -> Self {
        Self {
            min_relative_gain: 0.01,
            horizon_s: 3_600.0,
            min_dwell_ms: 600_000,
            stage_state_bytes: 1.6e9,
        }
    }
}

/// A recommended move.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Move {
    /// Stages to serve instead.
    pub to: Range<u16>,
    /// Bottleneck capacity (micro-batches/s) now and after the move.
    pub before: f64,
    /// Bottleneck capacity after the move.
    pub after: f64,
    /// Seconds the peer needs to download the new stages' state.
    pub download_s: f64,
}

/// Whether `key` should move to other stages now. Only `Serving` peers move. Equal demand per
/// stage is assumed (the run's stages are equal slices of layers).
pub fn should_move(
    view: &SwarmView,
    key: &PeerKey,
    now_ms: u64,
    cfg: &RebalanceConfig,
) -> Result<Option<Move>, Error> {
    let peer = view.peer(key).ok_or(Error::UnknownPeer(*key))?;
    if peer.info.state != PeerState::Serving
        || now_ms < peer.since_ms.saturating_add(cfg.min_dwell_ms)
    {
        return Ok(None);
    }
    let mut caps = stage_pressure(view, None)?;
    let before = caps.iter().copied().fold(f64::INFINITY, f64::min);
    let mine = stage_capacity(peer.info, view.workload());
    let span = peer.info.stages.end - peer.info.stages.start;
    for s in peer.info.stages.clone() {
        caps[usize::from(s)] = (caps[usize::from(s)] - mine).max(0.0);
    }
    let during = caps.iter().copied().fold(f64::INFINITY, f64::min);
    let to = best_window(&caps, span, view.num_stages())?;
    if to == peer.info.stages {
        return Ok(None);
    }
    for s in to.clone() {
        caps[usize::from(s)] += mine;
    }
    let after = caps.iter().copied().fold(f64::INFINITY, f64::min);
    let gain = after - before;
    if gain <= before * cfg.min_relative_gain || gain <= 0.0 {
        return Ok(None);
    }
    let download_s = cfg.stage_state_bytes * f64::from(span) / peer.info.link.down_bytes_per_s;
    // The gain only starts once the state is downloaded; while it downloads, the old stages may
    // also lose throughput (zero when the mover was surplus there, the usual case).
    let loss = (before - during).max(0.0) * download_s;
    if gain * (cfg.horizon_s - download_s) <= loss {
        return Ok(None);
    }
    Ok(Some(Move {
        to,
        before,
        after,
        download_s,
    }))
}
