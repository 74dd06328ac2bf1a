//! Pipeline planning: one replica per stage for a micro-batch, minimising expected time while
//! spreading concurrent micro-batches over replicas in proportion to capacity.
//!
//! The search borrows from both Petals and SWARM. Per stage it draws up to
//! `PlanConfig::candidates_per_stage` replicas at random with probability proportional to capacity
//! (SWARM's stochastic wiring: every replica gets traffic in proportion to its speed, and the draw
//! is O(k log n) from the view's per-stage Fenwick trees, never a scan of the swarm). Over the drawn
//! candidates it runs an exact shortest-path search through the layered (stage, replica) graph
//! (Petals' Dijkstra over (server, block)), where a node costs its queue-aware compute time
//! `(load + 1) x service time` (SWARM's queue-length balancing) and an edge costs the activation
//! transfer forward, the gradient transfer back (bytes over the slower side's bandwidth) and one
//! RTT. Stages with few replicas consider all of them, in random order so equal replicas split ties.

use rand::Rng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::view::{Link, PeerKey, SwarmView, Workload, service_time_s};

/// Planner tunables.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanConfig {
    /// Replicas drawn per stage (capacity-weighted); stages with at most this many consider all.
    /// Cost per plan is O(stages x candidates^2).
    pub candidates_per_stage: usize,
    /// Extra relative cost per recent failure of a peer that is no longer banned, so a healthy
    /// replica is preferred over an equally fast flaky one.
    pub failure_penalty: f64,
}

impl Default for PlanConfig {
    fn default() -> Self {
        Self {
            candidates_per_stage: 8,
            failure_penalty: 0.5,
        }
    }
}

/// What is being routed and from where.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanRequest {
    /// The micro-batch's size.
    pub workload: Workload,
    /// The trainer's link: it sends activations into stage 0 and receives the last stage's output.
    pub client: Link,
}

/// One stage of a plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hop {
    /// The stage.
    pub stage: u16,
    /// The chosen replica. Consecutive hops on the same peer cost no transfer.
    pub peer: PeerKey,
    /// The next-best replica given the chosen neighbours: fail over to it without replanning.
    pub fallback: Option<PeerKey>,
    /// Expected seconds for this hop: incoming transfers plus queue-aware compute.
    pub expected_s: f64,
}

/// A route for one micro-batch through every stage in order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// One hop per stage, stage 0 first.
    pub hops: Vec<Hop>,
    /// Expected seconds end to end, including the return to the trainer.
    pub expected_s: f64,
}

#[derive(Clone, Copy)]
struct End {
    id: Option<u32>,
    up: f64,
    down: f64,
    coord: crate::view::Coord,
}

#[derive(Clone, Copy, PartialEq)]
enum Ep {
    Client,
    Peer(u32),
}

struct Ctx<'a> {
    view: &'a SwarmView,
    req: &'a PlanRequest,
    cfg: &'a PlanConfig,
    bytes: f64,
}

impl Ctx<'_> {
    fn link(&self, ep: Ep) -> &Link {
        match ep {
            Ep::Client => &self.req.client,
            Ep::Peer(id) => &self.view.slot(id).info.link,
        }
    }

    /// An endpoint's link data, copied out once per plan so the search stays in cache.
    fn end(&self, ep: Ep) -> End {
        let l = self.link(ep);
        End {
            id: match ep {
                Ep::Client => None,
                Ep::Peer(id) => Some(id),
            },
            up: l.up_bytes_per_s,
            down: l.down_bytes_per_s,
            coord: l.coord,
        }
    }

    /// Activation forward, gradient back, and one RTT between two endpoints.
    fn xfer(&self, a: &End, b: &End) -> f64 {
        let rtt_ms = match (a.id, b.id) {
            (Some(x), Some(y)) if x == y => return 0.0,
            (Some(x), Some(y)) if self.view.has_measured_rtt() => self.view.rtt_ms(x, y),
            _ => a.coord.rtt_ms(&b.coord),
        };
        self.bytes / a.up.min(b.down) + self.bytes / b.up.min(a.down) + rtt_ms / 1000.0
    }

    fn xfer_s(&self, from: Ep, to: Ep) -> f64 {
        self.xfer(&self.end(from), &self.end(to))
    }

    /// Queue-aware compute time on a peer, penalised by its recent failures.
    fn node_s(&self, id: u32) -> f64 {
        let slot = self.view.slot(id);
        let service = service_time_s(
            slot.info.compute_tokens_per_s,
            &slot.info.link,
            &self.req.workload,
        );
        let penalty =
            1.0 + self.cfg.failure_penalty * f64::from(slot.health.consecutive_failures.min(16));
        (f64::from(slot.load) + 1.0) * service * slot.correction * penalty
    }
}

/// Draws the candidates of one stage into `out`: unbanned replicas when any exist, otherwise the
/// banned ones (a ban never leaves a stage without a replica).
fn sample_stage<R: Rng + ?Sized>(
    view: &SwarmView,
    stage: u16,
    now_ms: u64,
    k: usize,
    exclude: &[u32],
    rng: &mut R,
    out: &mut Vec<u32>,
) -> Result<(), Error> {
    let pool = view.pool(stage);
    let n = pool.members.len();
    let start = out.len();
    let banned = |id: u32| view.slot(id).health.is_banned(now_ms);
    if n <= k {
        out.extend(
            pool.members
                .iter()
                .copied()
                .filter(|&id| !banned(id) && !exclude.contains(&id)),
        );
        if out.len() == start {
            out.extend(
                pool.members
                    .iter()
                    .copied()
                    .filter(|id| !exclude.contains(id)),
            );
        }
        out[start..].shuffle(rng);
    } else {
        let total = pool.weights.total();
        let mut attempts = 0;
        while out.len() - start < k && attempts < 4 * k && total > 0.0 {
            attempts += 1;
            let id = pool.members[pool.weights.find(rng.random::<f64>() * total)];
            if banned(id) || exclude.contains(&id) || out[start..].contains(&id) {
                continue;
            }
            out.push(id);
        }
        if out.len() == start {
            // Most of the stage is banned or excluded: find the healthy rest, else ignore bans.
            let off = rng.random_range(0..n);
            let ring = (0..n).map(|t| pool.members[(off + t) % n]);
            out.extend(
                ring.clone()
                    .filter(|&id| !banned(id) && !exclude.contains(&id))
                    .take(k),
            );
            if out.len() == start {
                out.extend(ring.filter(|id| !exclude.contains(id)).take(k));
            }
        }
    }
    if out.len() == start {
        return Err(Error::NoReplica { stage });
    }
    Ok(())
}

/// Plans a route for one micro-batch: one serving replica per stage, in stage order, each with a
/// fallback. Pure: the result is a function of (view, request, now, config, rng state).
///
/// The caller should then `view.note_dispatched(&plan)`, and report each hop's outcome
/// (`SwarmView::report`) and completion (`SwarmView::add_load(peer, -1)`), so later plans spread.
pub fn plan<R: Rng + ?Sized>(
    view: &SwarmView,
    req: &PlanRequest,
    now_ms: u64,
    cfg: &PlanConfig,
    rng: &mut R,
) -> Result<Plan, Error> {
    if cfg.candidates_per_stage == 0 {
        return Err(Error::InvalidConfig(
            "candidates_per_stage must be > 0".into(),
        ));
    }
    let stages = view.num_stages();
    let ctx = Ctx {
        view,
        req,
        cfg,
        bytes: req.workload.activation_bytes(),
    };
    let mut cands = Vec::with_capacity(usize::from(stages) * cfg.candidates_per_stage);
    let mut offs = Vec::with_capacity(usize::from(stages) + 1);
    offs.push(0);
    for s in 0..stages {
        sample_stage(
            view,
            s,
            now_ms,
            cfg.candidates_per_stage,
            &[],
            rng,
            &mut cands,
        )?;
        offs.push(cands.len());
    }
    // Shortest path through the layered graph of candidates.
    let client = ctx.end(Ep::Client);
    let ends: Vec<End> = cands.iter().map(|&id| ctx.end(Ep::Peer(id))).collect();
    let mut cost = vec![0.0f64; cands.len()];
    let mut node = vec![0.0f64; cands.len()];
    let mut parent = vec![usize::MAX; cands.len()];
    for s in 0..usize::from(stages) {
        for j in offs[s]..offs[s + 1] {
            node[j] = ctx.node_s(cands[j]);
            let (best, arg) = if s == 0 {
                (ctx.xfer(&client, &ends[j]), usize::MAX)
            } else {
                let mut best = (f64::INFINITY, offs[s - 1]);
                for i in offs[s - 1]..offs[s] {
                    let c = cost[i] + ctx.xfer(&ends[i], &ends[j]);
                    if c < best.0 {
                        best = (c, i);
                    }
                }
                best
            };
            cost[j] = best + node[j];
            parent[j] = arg;
        }
    }
    let last = usize::from(stages) - 1;
    let mut end = (f64::INFINITY, offs[last]);
    for j in offs[last]..offs[last + 1] {
        let c = cost[j] + ctx.xfer(&ends[j], &client);
        if c < end.0 {
            end = (c, j);
        }
    }
    let mut chosen = vec![0usize; usize::from(stages)];
    let mut j = end.1;
    for s in (0..usize::from(stages)).rev() {
        chosen[s] = j;
        j = parent[j];
    }
    let mut hops = Vec::with_capacity(usize::from(stages));
    for s in 0..usize::from(stages) {
        let prev = if s == 0 {
            &client
        } else {
            &ends[chosen[s - 1]]
        };
        let next = if s == last {
            &client
        } else {
            &ends[chosen[s + 1]]
        };
        let me = cands[chosen[s]];
        let fallback = (offs[s]..offs[s + 1])
            .filter(|&c| cands[c] != me)
            .map(|c| {
                (
                    ctx.xfer(prev, &ends[c]) + node[c] + ctx.xfer(&ends[c], next),
                    c,
                )
            })
            .min_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, c)| view.slot(cands[c]).key);
        hops.push(Hop {
            stage: s as u16,
            peer: view.slot(me).key,
            fallback,
            expected_s: ctx.xfer(prev, &ends[chosen[s]]) + node[chosen[s]],
        });
    }
    Ok(Plan {
        hops,
        expected_s: end.0,
    })
}

/// Picks a replacement for one stage when a hop and its fallback both failed: the best of a fresh
/// draw that skips `exclude`, given the neighbours (`None` or an unknown key means the trainer).
#[allow(clippy::too_many_arguments)]
pub fn replacement<R: Rng + ?Sized>(
    view: &SwarmView,
    req: &PlanRequest,
    stage: u16,
    prev: Option<&PeerKey>,
    next: Option<&PeerKey>,
    exclude: &[PeerKey],
    now_ms: u64,
    cfg: &PlanConfig,
    rng: &mut R,
) -> Result<PeerKey, Error> {
    if stage >= view.num_stages() {
        return Err(Error::InvalidStage {
            start: stage,
            end: stage + 1,
            num_stages: view.num_stages(),
        });
    }
    let ctx = Ctx {
        view,
        req,
        cfg,
        bytes: req.workload.activation_bytes(),
    };
    let ep = |k: Option<&PeerKey>| k.and_then(|k| view.id(k).ok()).map_or(Ep::Client, Ep::Peer);
    let (prev, next) = (ep(prev), ep(next));
    let exclude: Vec<u32> = exclude.iter().filter_map(|k| view.id(k).ok()).collect();
    let mut cands = Vec::new();
    sample_stage(
        view,
        stage,
        now_ms,
        cfg.candidates_per_stage.max(1),
        &exclude,
        rng,
        &mut cands,
    )?;
    let best = cands
        .iter()
        .map(|&id| {
            (
                ctx.xfer_s(prev, Ep::Peer(id)) + ctx.node_s(id) + ctx.xfer_s(Ep::Peer(id), next),
                id,
            )
        })
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, id)| view.slot(id).key);
    best.ok_or(Error::NoReplica { stage })
}
