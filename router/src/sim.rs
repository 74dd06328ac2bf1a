//! A deterministic discrete-event simulation of a training swarm, driven by this crate's planner,
//! health tracker, stage choice and rebalancing. Its results are a pure function of [`SimConfig`]
//! (including the seed); only the [`Observer`] may read a clock, to time the planner.
//!
//! # Model
//!
//! - **Peers** have a compute speed (FLOP/s, log-normal around a consumer GPU), an upload and a
//!   download bandwidth (log-normal home links, download a few times upload) and a network
//!   coordinate (RTT = distance + access delays). The view the router plans with holds *measured*
//!   values: the truth times log-normal noise (`measurement_noise`).
//! - **Compute and transfer cost.** A micro-batch visiting a stage occupies the peer for
//!   `max(tokens x flops_per_token_per_stage / flops, 2 x act_bytes / up, 2 x act_bytes / down)`:
//!   forward and backward compute, and the activation out plus gradient back on each NIC direction,
//!   overlapped. Each peer is a FIFO server. Between hops the activation travels
//!   `act_bytes / min(up_sender, down_receiver) + RTT`; when the forward pass ends, the gradient
//!   travels back through every hop the same way (latency only: the NIC occupancy is already in the
//!   service time). Forward and backward of a stage are charged as one visit.
//! - **Demand.** Trainers keep `in_flight_per_peer x peers` micro-batches in flight (enough to
//!   saturate the swarm), planning each with [`plan()`] when it starts and reporting load, success
//!   and failures to the view as the real trainer does. Trainer links are not a bottleneck.
//! - **Churn.** Every peer crashes at `churn_per_hour_percent`% per hour (exponential lifetimes);
//!   new peers join at the same total rate, so the swarm keeps its size. A joiner picks its stage
//!   with [`choose_stages`] and downloads `stage_state_bytes` before it serves. Every peer checks
//!   [`should_move`] at random times (mean `rebalance_period_s`); a mover also downloads its new
//!   stage's state, idle for that stage meanwhile.
//! - **Crashes and failover.** A crash is silent: membership removes the peer from the view only
//!   `membership_timeout_s` later, so plans can still pick it. A micro-batch queued on, or sent to,
//!   a dead peer is detected `detect_timeout_s` after the crash (or after being sent), reported as a
//!   timeout (which bans the peer), and re-run on the hop's fallback, or a fresh
//!   [`replacement`] if the fallback is gone. A peer that dies after a micro-batch passed it holds
//!   activations the backward pass needs: when the micro-batch would finish, every such hop costs a
//!   detection timeout plus a re-run on a replacement. Work on a crashed peer is lost.
//! - **Metric.** Throughput = micro-batches finished per second after `warmup_s`. The optimum is
//!   the best static assignment of the peers alive at each moment, time-averaged over the same
//!   window; we use its upper bound `sum of capacities / stages` (joiners still downloading are
//!   counted as capacity), so the reported efficiency is conservative.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::health::{HealthConfig, Outcome};
use crate::placement::{RebalanceConfig, choose_stages, should_move};
use crate::plan::{PlanConfig, PlanRequest, plan, replacement};
use crate::view::{Coord, KeyMap, Link, PeerInfo, PeerKey, PeerState, SwarmView, Workload};

/// Everything a simulation depends on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SimConfig {
    /// Peers at the start (and the size churn keeps the swarm at).
    pub peers: usize,
    /// Pipeline stages.
    pub stages: u16,
    /// Crashes per peer per hour, percent; joins replace them at the same rate.
    pub churn_per_hour_percent: f64,
    /// Seed of every random choice.
    pub seed: u64,
    /// Simulated seconds.
    pub duration_s: f64,
    /// Seconds before throughput is measured (pipeline fill).
    pub warmup_s: f64,
    /// Micro-batch geometry.
    pub workload: Workload,
    /// Forward + backward FLOPs per token through one stage.
    pub flops_per_token_per_stage: f64,
    /// Median peer compute, FLOP/s (log-normal, sigma 0.5).
    pub median_flops: f64,
    /// Median upload, bytes/s (log-normal, sigma 0.7, clamped to 5 Mbit/s..1 Gbit/s).
    pub median_up_bytes_per_s: f64,
    /// Bytes of one stage's state a joiner or mover downloads.
    pub stage_state_bytes: f64,
    /// Micro-batches in flight per initial peer.
    pub in_flight_per_peer: f64,
    /// Seconds to detect a dead peer on a micro-batch's path.
    pub detect_timeout_s: f64,
    /// Seconds until membership removes a crashed peer from the view.
    pub membership_timeout_s: f64,
    /// Mean seconds between one peer's rebalancing checks.
    pub rebalance_period_s: f64,
    /// Relative (log-normal sigma) error of the measurements the router sees.
    pub measurement_noise: f64,
    /// Planner tunables.
    pub plan: PlanConfig,
    /// Ban tunables.
    pub health: HealthConfig,
    /// Rebalancing tunables (its `stage_state_bytes` is set from this config's).
    pub rebalance: RebalanceConfig,
}

impl SimConfig {
    /// A Llama-7B-like run (hidden 4096, 2 layers per stage, 1024-token micro-batches, 8-bit
    /// activations) on home links, with the given size, churn and seed.
    pub fn new(peers: usize, stages: u16, churn_per_hour_percent: f64, seed: u64) -> Self {
        let hidden = 4096.0f64;
        let params_per_stage = 2.0 * 12.0 * hidden * hidden;
        Self {
            peers,
            stages,
            churn_per_hour_percent,
            seed,
            duration_s: 600.0,
            warmup_s: 300.0,
            workload: Workload {
                tokens: 1024,
                hidden: 4096,
                codec_ratio: 4.0,
            },
            flops_per_token_per_stage: 6.0 * params_per_stage,
            median_flops: 25e12,
            median_up_bytes_per_s: 40e6 / 8.0,
            stage_state_bytes: 4.0 * params_per_stage,
            in_flight_per_peer: 4.0,
            detect_timeout_s: 10.0,
            membership_timeout_s: 30.0,
            rebalance_period_s: 120.0,
            measurement_noise: 0.1,
            plan: PlanConfig::default(),
            health: HealthConfig::default(),
            rebalance: RebalanceConfig::default(),
        }
    }

    fn validate(&self) -> Result<(), Error> {
        let pos = |what: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(Error::InvalidConfig(format!(
                    "{what} must be finite and > 0, got {v}"
                )))
            }
        };
        if self.peers == 0 || self.stages == 0 || self.peers > 10_000_000 {
            return Err(Error::InvalidConfig(
                "peers must be 1..=10^7 and stages > 0".into(),
            ));
        }
        if !(self.churn_per_hour_percent.is_finite() && self.churn_per_hour_percent >= 0.0) {
            return Err(Error::InvalidConfig(
                "churn must be a finite percentage >= 0".into(),
            ));
        }
        if !(self.warmup_s >= 0.0 && self.warmup_s < self.duration_s) {
            return Err(Error::InvalidConfig(
                "need 0 <= warmup_s < duration_s".into(),
            ));
        }
        pos("duration_s", self.duration_s)?;
        pos("flops_per_token_per_stage", self.flops_per_token_per_stage)?;
        pos("median_flops", self.median_flops)?;
        pos("median_up_bytes_per_s", self.median_up_bytes_per_s)?;
        pos("stage_state_bytes", self.stage_state_bytes)?;
        pos("in_flight_per_peer", self.in_flight_per_peer)?;
        pos("detect_timeout_s", self.detect_timeout_s)?;
        pos("membership_timeout_s", self.membership_timeout_s)?;
        pos("rebalance_period_s", self.rebalance_period_s)?;
        if !(self.measurement_noise.is_finite() && self.measurement_noise >= 0.0) {
            return Err(Error::InvalidConfig(
                "measurement_noise must be >= 0".into(),
            ));
        }
        Ok(())
    }
}

/// What a simulation measured. Everything here is a pure function of the config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SimReport {
    /// Initial peers.
    pub peers: usize,
    /// Stages.
    pub stages: u16,
    /// Micro-batches finished in the measured window.
    pub microbatches: u64,
    /// Finished micro-batches per second in the measured window.
    pub throughput: f64,
    /// Time-averaged optimum (sum of alive capacity / stages) over the same window.
    pub optimal_throughput: f64,
    /// `throughput / optimal_throughput`.
    pub efficiency: f64,
    /// Calls to the planner.
    pub plans: u64,
    /// Peers that crashed.
    pub crashes: u64,
    /// Peers that joined.
    pub joins: u64,
    /// Rebalancing moves.
    pub moves: u64,
    /// Hops re-run after a failure (failovers and backward-pass repairs).
    pub failovers: u64,
    /// Mean seconds from plan to finish of micro-batches finished in the window.
    pub mean_latency_s: f64,
    /// Seconds measured (duration minus warmup).
    pub window_s: f64,
    /// At the end: the weakest stage's serving capacity over the mean stage's, as the router
    /// measures it (1.0 = perfectly balanced stages).
    pub stage_balance: f64,
}

/// Hooks for the caller: timing the planner (the one place a clock may be read) and progress.
pub trait Observer {
    /// Wraps every planner call; must call `f` exactly once.
    fn time_plan(&mut self, f: &mut dyn FnMut()) {
        f()
    }
    /// Called now and then with simulated and total seconds.
    fn progress(&mut self, _sim_s: f64, _end_s: f64) {}
}

/// An observer that does nothing.
pub struct NoObserver;
impl Observer for NoObserver {}

type Us = u64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Dispatch,
    Arrive { mb: u32, epoch: u32 },
    Done { mb: u32, epoch: u32, peer: u32 },
    Complete { mb: u32, epoch: u32 },
    Failover { mb: u32, epoch: u32 },
    Crash,
    Join,
    Ready { peer: u32 },
    Remove { peer: u32 },
    Rebalance,
}

struct Peer {
    key: PeerKey,
    link: Link,
    service: Us,
    capacity: f64,
    alive: bool,
    queue: VecDeque<u32>,
    busy_until: Us,
}

#[derive(Default)]
struct Mb {
    hops: Vec<u32>,
    fallbacks: Vec<Option<PeerKey>>,
    /// Whether a unit of load is held on `hops[h]` in the view (released when the hop ends).
    held: Vec<bool>,
    pos: usize,
    epoch: u32,
    start: Us,
    repairs: Vec<usize>,
    repairing: bool,
}

impl Mb {
    fn current(&self) -> usize {
        if self.repairing {
            *self.repairs.last().expect("repairing has a hop")
        } else {
            self.pos
        }
    }
}

fn us(s: f64) -> Us {
    (s * 1e6).round().max(0.0) as Us
}

fn normal(rng: &mut ChaCha8Rng) -> f64 {
    // Box-Muller: keeps the crate free of rand_distr.
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn exp_s(rng: &mut ChaCha8Rng, rate: f64) -> f64 {
    -(1.0 - rng.random::<f64>()).ln() / rate
}

struct Sim<'a> {
    cfg: &'a SimConfig,
    rng: ChaCha8Rng,
    view: SwarmView,
    req: PlanRequest,
    peers: Vec<Peer>,
    ids: KeyMap<u32>,
    alive: Vec<u32>,
    alive_pos: Vec<usize>,
    mbs: Vec<Mb>,
    free_mbs: Vec<u32>,
    events: BinaryHeap<Reverse<(Us, u64, Ev)>>,
    seq: u64,
    now: Us,
    lambda: f64,
    total_capacity: f64,
    opt_integral: f64,
    last_t: Us,
    window: (Us, Us),
    report: SimReport,
    latency_sum: f64,
}

/// Runs a simulation. Deterministic: the same config gives the same report.
pub fn run(cfg: &SimConfig, obs: &mut dyn Observer) -> Result<SimReport, Error> {
    cfg.validate()?;
    let mut sim = Sim::new(cfg)?;
    sim.run(obs)?;
    Ok(sim.report)
}

impl<'a> Sim<'a> {
    fn new(cfg: &'a SimConfig) -> Result<Self, Error> {
        let view = SwarmView::new(cfg.stages, cfg.workload)?;
        let client_bw = 1.25e9;
        let req = PlanRequest {
            workload: cfg.workload,
            client: Link {
                up_bytes_per_s: client_bw,
                down_bytes_per_s: client_bw,
                coord: Coord::default(),
            },
        };
        Ok(Self {
            cfg,
            rng: ChaCha8Rng::seed_from_u64(cfg.seed),
            view,
            req,
            peers: Vec::new(),
            ids: KeyMap::default(),
            alive: Vec::new(),
            alive_pos: Vec::new(),
            mbs: Vec::new(),
            free_mbs: Vec::new(),
            events: BinaryHeap::new(),
            seq: 0,
            now: 0,
            lambda: cfg.churn_per_hour_percent / 100.0 / 3600.0,
            total_capacity: 0.0,
            opt_integral: 0.0,
            last_t: 0,
            window: (us(cfg.warmup_s), us(cfg.duration_s)),
            report: SimReport {
                peers: cfg.peers,
                stages: cfg.stages,
                microbatches: 0,
                throughput: 0.0,
                optimal_throughput: 0.0,
                efficiency: 0.0,
                plans: 0,
                crashes: 0,
                joins: 0,
                moves: 0,
                failovers: 0,
                mean_latency_s: 0.0,
                window_s: cfg.duration_s - cfg.warmup_s,
                stage_balance: 0.0,
            },
            latency_sum: 0.0,
        })
    }

    fn at(&mut self, t: Us, ev: Ev) {
        self.seq += 1;
        self.events.push(Reverse((t, self.seq, ev)));
    }

    fn now_ms(&self) -> u64 {
        self.now / 1000
    }

    /// A new peer with random hardware; returns its id. Not yet in the view.
    fn spawn(&mut self) -> (u32, PeerInfo) {
        let cfg = self.cfg;
        let rng = &mut self.rng;
        let flops = cfg.median_flops * (0.5 * normal(rng)).exp();
        let up =
            (cfg.median_up_bytes_per_s * (0.7 * normal(rng)).exp()).clamp(5e6 / 8.0, 1e9 / 8.0);
        let down = (up * 4.0 * (0.5 * normal(rng)).exp()).clamp(up, 2e9 / 8.0);
        let r = 80.0 * rng.random::<f64>().sqrt();
        let a = std::f64::consts::TAU * rng.random::<f64>();
        let coord = Coord {
            x_ms: (r * a.cos()) as f32,
            y_ms: (r * a.sin()) as f32,
            height_ms: (1.0 + 14.0 * rng.random::<f64>()) as f32,
        };
        let mut key = [0u8; 32];
        rng.fill(&mut key);
        let compute = flops / cfg.flops_per_token_per_stage;
        let link = Link {
            up_bytes_per_s: up,
            down_bytes_per_s: down,
            coord,
        };
        let service_s = crate::view::service_time_s(compute, &link, &cfg.workload);
        let noise = cfg.measurement_noise;
        let mut measured = |x: f64| x * (noise * normal(rng)).exp();
        let info = PeerInfo {
            stages: 0..1,
            compute_tokens_per_s: measured(compute),
            link: Link {
                up_bytes_per_s: measured(up),
                down_bytes_per_s: measured(down),
                coord,
            },
            state: PeerState::Joining,
        };
        let id = self.peers.len() as u32;
        self.peers.push(Peer {
            key: PeerKey(key),
            link,
            service: us(service_s).max(1),
            capacity: 1.0 / service_s,
            alive: true,
            queue: VecDeque::new(),
            busy_until: 0,
        });
        self.ids.insert(PeerKey(key), id);
        self.alive_pos.push(self.alive.len());
        self.alive.push(id);
        self.integrate();
        self.total_capacity += 1.0 / service_s;
        (id, info)
    }

    /// Accumulates the optimum's integral up to now.
    fn integrate(&mut self) {
        let (a, b) = self.window;
        let (from, to) = (self.last_t.clamp(a, b), self.now.clamp(a, b));
        if to > from {
            self.opt_integral +=
                self.total_capacity / f64::from(self.cfg.stages) * (to - from) as f64 / 1e6;
        }
        self.last_t = self.now;
    }

    fn join(&mut self, initial: bool) -> Result<(), Error> {
        let (id, mut info) = self.spawn();
        info.stages = choose_stages(&self.view, 1, None)?;
        info.state = if initial {
            PeerState::Serving
        } else {
            PeerState::Joining
        };
        let key = self.peers[id as usize].key;
        self.view.insert(key, info, self.now_ms())?;
        if !initial {
            self.report.joins += 1;
            let t = self.now + self.download(id);
            self.at(t, Ev::Ready { peer: id });
        }
        Ok(())
    }

    fn download(&self, id: u32) -> Us {
        let p = &self.peers[id as usize];
        us(self.cfg.stage_state_bytes / p.link.down_bytes_per_s + 0.2)
    }

    /// True one-way transfer of one activation between endpoints (`None` = trainer).
    fn xfer(&self, from: Option<u32>, to: Option<u32>) -> Us {
        if from == to {
            return 0;
        }
        let link = |e: Option<u32>| e.map_or(&self.req.client, |i| &self.peers[i as usize].link);
        let (a, b) = (link(from), link(to));
        let bytes = self.cfg.workload.activation_bytes();
        us(bytes / a.up_bytes_per_s.min(b.down_bytes_per_s) + a.coord.rtt_ms(&b.coord) / 1000.0)
    }

    fn dispatch(&mut self, obs: &mut dyn Observer) -> Result<(), Error> {
        let now_ms = self.now_ms();
        let mut out = None;
        {
            let (view, req, pc, rng) = (&self.view, &self.req, &self.cfg.plan, &mut self.rng);
            obs.time_plan(&mut || out = Some(plan(view, req, now_ms, pc, rng)));
        }
        self.report.plans += 1;
        let p = match out.expect("observer must run the planner") {
            Ok(p) => p,
            Err(Error::NoReplica { .. }) => {
                // A stage has no replica at all: try again shortly (joiners fill empty stages).
                self.at(self.now + us(1.0), Ev::Dispatch);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        self.view.note_dispatched(&p);
        let mb = Mb {
            hops: p.hops.iter().map(|h| self.ids[&h.peer]).collect(),
            fallbacks: p.hops.iter().map(|h| h.fallback).collect(),
            held: vec![true; p.hops.len()],
            pos: 0,
            epoch: 0,
            start: self.now,
            repairs: Vec::new(),
            repairing: false,
        };
        let first = mb.hops[0];
        let id = match self.free_mbs.pop() {
            Some(id) => {
                self.mbs[id as usize] = mb;
                id
            }
            None => {
                self.mbs.push(mb);
                (self.mbs.len() - 1) as u32
            }
        };
        let t = self.now + self.xfer(None, Some(first));
        self.at(t, Ev::Arrive { mb: id, epoch: 0 });
        Ok(())
    }

    fn arrive(&mut self, mb: u32, epoch: u32) {
        let m = &self.mbs[mb as usize];
        if m.epoch != epoch {
            return;
        }
        let p = m.hops[m.current()];
        let peer = &mut self.peers[p as usize];
        if !peer.alive {
            let t = self.now + us(self.cfg.detect_timeout_s);
            self.at(t, Ev::Failover { mb, epoch });
            return;
        }
        let done = self.now.max(peer.busy_until) + peer.service;
        peer.busy_until = done;
        peer.queue.push_back(mb);
        self.at(done, Ev::Done { mb, epoch, peer: p });
    }

    fn done(&mut self, mb: u32, epoch: u32, p: u32) {
        if self.mbs[mb as usize].epoch != epoch {
            return;
        }
        let front = self.peers[p as usize].queue.pop_front();
        debug_assert_eq!(front, Some(mb), "FIFO order");
        let key = self.peers[p as usize].key;
        let now_ms = self.now_ms();
        let h = self.mbs[mb as usize].current();
        self.mbs[mb as usize].held[h] = false;
        self.view.add_load(&key, -1);
        let _ = self
            .view
            .report(&key, Outcome::Success, now_ms, &self.cfg.health);
        // The peer's reply carries its own service time, which corrects its announced speed.
        let observed = self.peers[p as usize].service as f64 / 1e6;
        let _ = self.view.observe_service(&key, observed);
        let stages = usize::from(self.cfg.stages);
        let m = &mut self.mbs[mb as usize];
        if m.repairing {
            m.repairs.pop();
            if m.repairs.is_empty() {
                m.repairing = false;
                let back = self.xfer(Some(p), None);
                self.at(self.now + back, Ev::Complete { mb, epoch });
            } else {
                self.failover(mb, epoch);
            }
            return;
        }
        m.pos += 1;
        if m.pos < stages {
            let next = m.hops[m.pos];
            let t = self.now + self.xfer(Some(p), Some(next));
            self.at(t, Ev::Arrive { mb, epoch });
        } else {
            // Gradients flow back through every hop to the trainer.
            let hops = m.hops.clone();
            let mut back = self.xfer(Some(hops[stages - 1]), None);
            for s in 1..stages {
                back += self.xfer(Some(hops[s]), Some(hops[s - 1]));
            }
            back += self.xfer(Some(hops[0]), None);
            self.at(self.now + back, Ev::Complete { mb, epoch });
        }
    }

    fn complete(&mut self, mb: u32, epoch: u32, obs: &mut dyn Observer) -> Result<(), Error> {
        let m = &self.mbs[mb as usize];
        if m.epoch != epoch {
            return Ok(());
        }
        let mut dead: Vec<usize> = (0..m.hops.len())
            .filter(|&h| !self.peers[m.hops[h] as usize].alive)
            .collect();
        if !dead.is_empty() {
            // The backward pass needs activations held by dead peers: re-run those hops, the last
            // stage first (`repairs` is a stack), after one detection timeout.
            dead.sort_unstable();
            let m = &mut self.mbs[mb as usize];
            m.repairs = dead;
            m.repairing = true;
            let t = self.now + us(self.cfg.detect_timeout_s);
            self.at(t, Ev::Failover { mb, epoch });
            return Ok(());
        }
        if self.now >= self.window.0 && self.now < self.window.1 {
            self.report.microbatches += 1;
            self.latency_sum += (self.now - m.start) as f64 / 1e6;
        }
        self.free_mbs.push(mb);
        self.dispatch(obs)
    }

    /// Re-runs the micro-batch's current hop elsewhere, reporting the dead peer's timeout.
    fn failover(&mut self, mb: u32, epoch: u32) {
        let now_ms = self.now_ms();
        let m = &self.mbs[mb as usize];
        if m.epoch != epoch {
            return;
        }
        let h = m.current();
        let dead = self.peers[m.hops[h] as usize].key;
        if m.held[h] {
            self.view.add_load(&dead, -1);
        }
        let _ = self
            .view
            .report(&dead, Outcome::Timeout, now_ms, &self.cfg.health);
        let stages = m.hops.len();
        let prev = (h > 0).then(|| self.peers[m.hops[h - 1] as usize].key);
        let next = (h + 1 < stages).then(|| self.peers[m.hops[h + 1] as usize].key);
        let usable = |k: &PeerKey| {
            self.view.peer(k).is_some_and(|p| {
                p.info.state == PeerState::Serving && !p.health.is_banned(now_ms) && *k != dead
            })
        };
        let pick = match m.fallbacks[h].filter(usable) {
            Some(k) => Ok(k),
            None => replacement(
                &self.view,
                &self.req,
                h as u16,
                prev.as_ref(),
                next.as_ref(),
                &[dead],
                now_ms,
                &self.cfg.plan,
                &mut self.rng,
            ),
        };
        let Ok(new_key) = pick else {
            // Nobody serves this stage right now: wait for a joiner.
            self.at(self.now + us(1.0), Ev::Failover { mb, epoch });
            return;
        };
        self.report.failovers += 1;
        self.view.add_load(&new_key, 1);
        let new = self.ids[&new_key];
        let m = &mut self.mbs[mb as usize];
        m.hops[h] = new;
        m.fallbacks[h] = None;
        m.held[h] = true;
        m.epoch += 1;
        let epoch = m.epoch;
        let from = (h > 0).then(|| m.hops[h - 1]);
        let t = self.now + self.xfer(from, Some(new));
        self.at(t, Ev::Arrive { mb, epoch });
    }

    fn crash(&mut self) {
        if self.alive.is_empty() {
            return;
        }
        let i = self.rng.random_range(0..self.alive.len());
        let p = self.alive[i];
        self.kill(p);
    }

    fn kill(&mut self, p: u32) {
        let i = self.alive_pos[p as usize];
        self.alive.swap_remove(i);
        if let Some(&moved) = self.alive.get(i) {
            self.alive_pos[moved as usize] = i;
        }
        self.integrate();
        self.report.crashes += 1;
        let peer = &mut self.peers[p as usize];
        peer.alive = false;
        self.total_capacity -= peer.capacity;
        let queued: Vec<u32> = peer.queue.drain(..).collect();
        let detect = self.now + us(self.cfg.detect_timeout_s);
        for mb in queued {
            let m = &mut self.mbs[mb as usize];
            m.epoch += 1;
            let epoch = m.epoch;
            self.at(detect, Ev::Failover { mb, epoch });
        }
        self.at(
            self.now + us(self.cfg.membership_timeout_s),
            Ev::Remove { peer: p },
        );
    }

    fn rebalance(&mut self) -> Result<(), Error> {
        if self.alive.is_empty() {
            return Ok(());
        }
        let p = self.alive[self.rng.random_range(0..self.alive.len())];
        let key = self.peers[p as usize].key;
        let now_ms = self.now_ms();
        if let Some(mv) = should_move(&self.view, &key, now_ms, &self.cfg.rebalance)? {
            self.view
                .set_stages(&key, mv.to, PeerState::Joining, now_ms)?;
            self.report.moves += 1;
            let t = self.now + self.download(p);
            self.at(t, Ev::Ready { peer: p });
        }
        Ok(())
    }

    fn run(&mut self, obs: &mut dyn Observer) -> Result<(), Error> {
        let cfg = self.cfg;
        for _ in 0..cfg.peers {
            self.join(true)?;
        }
        let in_flight = (cfg.in_flight_per_peer * cfg.peers as f64).ceil() as usize;
        for _ in 0..in_flight {
            self.dispatch(obs)?;
        }
        let join_rate = self.lambda * cfg.peers as f64;
        if self.lambda > 0.0 {
            let t = us(exp_s(&mut self.rng, self.lambda * self.alive.len() as f64));
            self.at(t, Ev::Crash);
            let t = us(exp_s(&mut self.rng, join_rate));
            self.at(t, Ev::Join);
        }
        let t = us(exp_s(
            &mut self.rng,
            self.alive.len() as f64 / cfg.rebalance_period_s,
        ));
        self.at(t, Ev::Rebalance);
        let end = self.window.1;
        let mut count = 0u64;
        while let Some(Reverse((t, _, ev))) = self.events.pop() {
            if t >= end {
                break;
            }
            self.now = t;
            count += 1;
            if count.is_multiple_of(65_536) {
                obs.progress(t as f64 / 1e6, cfg.duration_s);
            }
            match ev {
                Ev::Dispatch => self.dispatch(obs)?,
                Ev::Arrive { mb, epoch } => self.arrive(mb, epoch),
                Ev::Done { mb, epoch, peer } => self.done(mb, epoch, peer),
                Ev::Complete { mb, epoch } => self.complete(mb, epoch, obs)?,
                Ev::Failover { mb, epoch } => self.failover(mb, epoch),
                Ev::Crash => {
                    self.crash();
                    let rate = self.lambda * self.alive.len().max(1) as f64;
                    let t = self.now + us(exp_s(&mut self.rng, rate));
                    self.at(t, Ev::Crash);
                }
                Ev::Join => {
                    self.join(false)?;
                    let t = self.now + us(exp_s(&mut self.rng, join_rate));
                    self.at(t, Ev::Join);
                }
                Ev::Ready { peer } => {
                    if self.peers[peer as usize].alive {
                        let key = self.peers[peer as usize].key;
                        let now_ms = self.now_ms();
                        self.view.set_state(&key, PeerState::Serving, now_ms)?;
                    }
                }
                Ev::Remove { peer } => {
                    let key = self.peers[peer as usize].key;
                    let _ = self.view.remove(&key);
                }
                Ev::Rebalance => {
                    self.rebalance()?;
                    let rate = self.alive.len().max(1) as f64 / cfg.rebalance_period_s;
                    let t = self.now + us(exp_s(&mut self.rng, rate));
                    self.at(t, Ev::Rebalance);
                }
            }
        }
        self.now = end;
        self.integrate();
        let window_s = (self.window.1 - self.window.0) as f64 / 1e6;
        let r = &mut self.report;
        r.throughput = r.microbatches as f64 / window_s;
        r.optimal_throughput = self.opt_integral / window_s;
        r.efficiency = if r.optimal_throughput > 0.0 {
            r.throughput / r.optimal_throughput
        } else {
            0.0
        };
        r.mean_latency_s = if r.microbatches > 0 {
            self.latency_sum / r.microbatches as f64
        } else {
            0.0
        };
        let caps: Vec<f64> = (0..cfg.stages)
            .map(|s| self.view.serving_capacity(s))
            .collect();
        let mean = caps.iter().sum::<f64>() / caps.len() as f64;
        let min = caps.iter().copied().fold(f64::INFINITY, f64::min);
        r.stage_balance = if mean > 0.0 { min / mean } else { 0.0 };
        obs.progress(cfg.duration_s, cfg.duration_s);
        Ok(())
    }
}
