//! The swarm as the router sees it: peers, the stages they serve, their measured speed, load and
//! health, kept in per-stage pools that support O(log n) capacity-weighted sampling so that planning
//! never scans all peers.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::health::{HealthConfig, HealthRecord, Outcome};
use crate::plan::Plan;

/// A peer's identity: maps one-to-one onto the swarm crate's 32-byte `PeerId` (a BLAKE3 hash).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PeerKey(pub [u8; 32]);

impl std::hash::Hash for PeerKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // The key is already a cryptographic hash: 8 of its bytes are as good as all 32 for a
        // hash table, and a peer cannot grind a public key to collide them at scale.
        let mut head = [0u8; 8];
        head.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(head));
    }
}

/// A hasher for `PeerKey` maps: passes its 8 already-random bytes through.
#[derive(Default, Clone, Copy)]
pub struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only reached for non-`PeerKey` keys: FNV-1a keeps it correct if misused.
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u64(&mut self, x: u64) {
        self.0 ^= x;
    }
}

/// A `HashMap` keyed by `PeerKey` without re-hashing the key.
pub type KeyMap<V> = HashMap<PeerKey, V, std::hash::BuildHasherDefault<KeyHasher>>;

impl fmt::Display for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..6] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerKey({self})")
    }
}

/// A network coordinate (Vivaldi style, in milliseconds): the RTT between two peers is estimated as
/// the Euclidean distance plus both heights (the access-link delay), so 10,000 peers need 10,000
/// coordinates instead of 10^8 measured pairs. Measured pairs override it (`SwarmView::set_rtt`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Coord {
    /// First axis, ms.
    pub x_ms: f32,
    /// Second axis, ms.
    pub y_ms: f32,
    /// Access-link delay added to every RTT touching this peer, ms (>= 0).
    pub height_ms: f32,
}

impl Coord {
    /// Estimated round-trip time to `other`, in milliseconds.
    pub fn rtt_ms(&self, other: &Coord) -> f64 {
        let dx = f64::from(self.x_ms - other.x_ms);
        let dy = f64::from(self.y_ms - other.y_ms);
        (dx * dx + dy * dy).sqrt() + f64::from(self.height_ms) + f64::from(other.height_ms)
    }
}

/// One endpoint's network: measured bandwidth each way and its coordinate. The trainer (which holds
/// the embeddings and the head) is an endpoint too.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Link {
    /// Upload bandwidth, bytes per second.
    pub up_bytes_per_s: f64,
    /// Download bandwidth, bytes per second.
    pub down_bytes_per_s: f64,
    /// Network coordinate for RTT estimates.
    pub coord: Coord,
}

impl Link {
    /// The link of a peer whose traffic to other peers goes through a relay (issue #14): each way
    /// no faster than the relay lets one peer send (`relay_bytes_per_s`), and every RTT longer by
    /// the detour (`detour_ms`, added to the coordinate's height). Planning and capacity then charge
    /// its hops their real cost, so a relayed peer gets less work than an equal direct one.
    pub fn relayed(self, relay_bytes_per_s: f64, detour_ms: f32) -> Link {
        Link {
            up_bytes_per_s: self.up_bytes_per_s.min(relay_bytes_per_s),
            down_bytes_per_s: self.down_bytes_per_s.min(relay_bytes_per_s),
            coord: Coord {
                height_ms: self.coord.height_ms + detour_ms.max(0.0),
                ..self.coord
            },
        }
    }
}

/// The size of one micro-batch as it crosses a stage boundary.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Workload {
    /// Tokens in the micro-batch (batch x sequence).
    pub tokens: u32,
    /// Hidden size of the activations.
    pub hidden: u32,
    /// Expected compression ratio of the activation codec versus f32 (1.0 = raw f32).
    pub codec_ratio: f32,
}

impl Workload {
    /// Bytes of one activation (or activation-gradient) tensor on the wire.
    pub fn activation_bytes(&self) -> f64 {
        f64::from(self.tokens) * f64::from(self.hidden) * 4.0 / f64::from(self.codec_ratio)
    }

    fn validate(&self) -> Result<(), Error> {
        if self.tokens == 0 || self.hidden == 0 {
            return Err(Error::InvalidConfig(
                "workload tokens and hidden must be > 0".into(),
            ));
        }
        positive("codec_ratio", f64::from(self.codec_ratio))
    }
}

/// Where a peer is in its life cycle. Only `Serving` peers are routed to; `Joining` peers (loading
/// a stage's state) count towards that stage's planned capacity so joiners do not all pick it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerState {
    /// Downloading the state of its stages; not routable yet.
    Joining,
    /// Routable.
    Serving,
    /// Finishing its queue before leaving; not routable, not counted.
    Leaving,
}

/// What the swarm knows about one peer (from its membership record and measurements).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// The consecutive stages it serves (one hop may cover several).
    pub stages: Range<u16>,
    /// Measured forward+backward throughput through one stage, tokens per second.
    pub compute_tokens_per_s: f64,
    /// Its network.
    pub link: Link,
    /// Life-cycle state.
    pub state: PeerState,
}

/// Seconds one micro-batch occupies a peer for one stage: compute and the NIC overlap, so the
/// slowest of compute, upload (activation out + gradient back = 2 tensors) and download bounds it.
pub fn service_time_s(compute_tokens_per_s: f64, link: &Link, workload: &Workload) -> f64 {
    let bytes = 2.0 * workload.activation_bytes();
    let compute = f64::from(workload.tokens) / compute_tokens_per_s;
    compute
        .max(bytes / link.up_bytes_per_s)
        .max(bytes / link.down_bytes_per_s)
}

/// Micro-batches per second a peer adds to each stage it serves: a peer holding `k` stages splits
/// its time between them.
pub fn stage_capacity(info: &PeerInfo, workload: &Workload) -> f64 {
    let span = f64::from(info.stages.end.saturating_sub(info.stages.start).max(1));
    1.0 / (span * service_time_s(info.compute_tokens_per_s, &info.link, workload))
}

/// Weight of a new observation in the service-time correction.
const SERVICE_EWMA: f64 = 0.3;

/// A read-only look at one peer.
#[derive(Clone, Copy, Debug)]
pub struct PeerRef<'a> {
    /// Its key.
    pub key: &'a PeerKey,
    /// Its record.
    pub info: &'a PeerInfo,
    /// Stage visits assigned to it and not finished yet.
    pub load: u32,
    /// Its failure history.
    pub health: &'a HealthRecord,
    /// When it last changed state or stages (ms, caller's clock).
    pub since_ms: u64,
}

#[derive(Clone, Debug)]
pub(crate) struct Slot {
    pub key: PeerKey,
    pub info: PeerInfo,
    pub load: u32,
    pub health: HealthRecord,
    pub since_ms: u64,
    /// Cached `stage_capacity` for the view's workload.
    pub capacity: f64,
    /// Cached `service_time_s` for the view's workload.
    pub service_s: f64,
    /// Observed over predicted service time (EWMA), applied to capacity and cost.
    pub correction: f64,
    /// Position in each stage pool of `info.stages` (empty when not serving).
    pub pool_pos: Vec<u32>,
}

/// A Fenwick tree of weights: O(log n) update and weighted sampling.
#[derive(Clone, Debug, Default)]
pub(crate) struct Fenwick {
    tree: Vec<f64>,
    raw: Vec<f64>,
}

impl Fenwick {
    fn push(&mut self, w: f64) {
        self.raw.push(0.0);
        self.tree.push(0.0);
        let n = self.tree.len();
        // The new node covers (n - lowbit(n), n]: rebuild its partial sum from children.
        let low = n & n.wrapping_neg();
        let mut sum = 0.0;
        let mut j = 1;
        while j < low {
            sum += self.tree[n - j - 1];
            j <<= 1;
        }
        self.tree[n - 1] = sum;
        self.set(n - 1, w);
    }

    fn set(&mut self, i: usize, w: f64) {
        let delta = w - self.raw[i];
        self.raw[i] = w;
        let mut k = i + 1;
        while k <= self.tree.len() {
            self.tree[k - 1] += delta;
            k += k & k.wrapping_neg();
        }
    }

    fn pop(&mut self) {
        let n = self.raw.len();
        self.set(n - 1, 0.0);
        self.raw.pop();
        self.tree.pop();
    }

    pub(crate) fn total(&self) -> f64 {
        let mut k = self.tree.len();
        let mut s = 0.0;
        while k > 0 {
            s += self.tree[k - 1];
            k &= k - 1;
        }
        s.max(0.0)
    }

    /// The index whose cumulative weight interval contains `target` in `[0, total)`.
    pub(crate) fn find(&self, mut target: f64) -> usize {
        let n = self.tree.len();
        let mut pos = 0;
        let mut step = n.next_power_of_two();
        while step > 0 {
            let next = pos + step;
            if next <= n && self.tree[next - 1] <= target {
                target -= self.tree[next - 1];
                pos = next;
            }
            step >>= 1;
        }
        // Rounding can push past the end or onto a zero-weight tail: clamp to a real member.
        pos.min(n.saturating_sub(1))
    }
}

/// The serving replicas of one stage.
#[derive(Clone, Debug, Default)]
pub(crate) struct Pool {
    pub members: Vec<u32>,
    pub weights: Fenwick,
    /// Capacity of serving plus joining peers: what a newcomer's stage choice sees.
    pub planned: f64,
}

/// The router's picture of the swarm. The trainer keeps it current from membership records and
/// measurements, and reports each micro-batch's dispatch, completion and failures to it.
#[derive(Clone, Debug)]
pub struct SwarmView {
    num_stages: u16,
    workload: Workload,
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    index: KeyMap<u32>,
    pools: Vec<Pool>,
    rtt: HashMap<(u32, u32), f32>,
}

fn positive(what: &'static str, value: f64) -> Result<(), Error> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(Error::InvalidMeasurement { what, value })
    }
}

fn validate_link(link: &Link) -> Result<(), Error> {
    positive("up_bytes_per_s", link.up_bytes_per_s)?;
    positive("down_bytes_per_s", link.down_bytes_per_s)?;
    let c = &link.coord;
    for (what, v) in [
        ("coord.x_ms", c.x_ms),
        ("coord.y_ms", c.y_ms),
        ("coord.height_ms", c.height_ms),
    ] {
        if !v.is_finite() || (what == "coord.height_ms" && v < 0.0) {
            return Err(Error::InvalidMeasurement {
                what,
                value: f64::from(v),
            });
        }
    }
    Ok(())
}

impl SwarmView {
    /// An empty view of a run with `num_stages` stages and micro-batches shaped like `workload`
    /// (used to turn measurements into per-stage capacity).
    pub fn new(num_stages: u16, workload: Workload) -> Result<Self, Error> {
        if num_stages == 0 {
            return Err(Error::InvalidConfig(
                "a run needs at least one stage".into(),
            ));
        }
        workload.validate()?;
        Ok(Self {
            num_stages,
            workload,
            slots: Vec::new(),
            free: Vec::new(),
            index: KeyMap::default(),
            pools: vec![Pool::default(); usize::from(num_stages)],
            rtt: HashMap::new(),
        })
    }

    /// Stages in the run.
    pub fn num_stages(&self) -> u16 {
        self.num_stages
    }

    /// The micro-batch shape capacities are computed for.
    pub fn workload(&self) -> &Workload {
        &self.workload
    }

    /// Peers in the view, in any state.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// True when no peer is known.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Serving replicas of `stage` (0 when out of range).
    pub fn replicas(&self, stage: u16) -> usize {
        self.pools
            .get(usize::from(stage))
            .map_or(0, |p| p.members.len())
    }

    /// Summed capacity (micro-batches/s) of the serving replicas of `stage`.
    pub fn serving_capacity(&self, stage: u16) -> f64 {
        self.pools
            .get(usize::from(stage))
            .map_or(0.0, |p| p.weights.total())
    }

    /// Summed capacity of serving and joining replicas of `stage`: what stage choice balances.
    pub fn planned_capacity(&self, stage: u16) -> f64 {
        self.pools
            .get(usize::from(stage))
            .map_or(0.0, |p| p.planned.max(0.0))
    }

    /// One peer's record, load and health.
    pub fn peer(&self, key: &PeerKey) -> Option<PeerRef<'_>> {
        let slot = self.slot(*self.index.get(key)?);
        Some(PeerRef {
            key: &slot.key,
            info: &slot.info,
            load: slot.load,
            health: &slot.health,
            since_ms: slot.since_ms,
        })
    }

    /// All peers, in slot order (deterministic for a given history of calls).
    pub fn peers(&self) -> impl Iterator<Item = PeerRef<'_>> {
        self.slots.iter().flatten().map(|s| PeerRef {
            key: &s.key,
            info: &s.info,
            load: s.load,
            health: &s.health,
            since_ms: s.since_ms,
        })
    }

    /// Adds a peer (from a membership record). `now_ms` starts its dwell time for rebalancing.
    pub fn insert(&mut self, key: PeerKey, info: PeerInfo, now_ms: u64) -> Result<(), Error> {
        if self.index.contains_key(&key) {
            return Err(Error::DuplicatePeer(key));
        }
        self.check_span(&info.stages)?;
        positive("compute_tokens_per_s", info.compute_tokens_per_s)?;
        validate_link(&info.link)?;
        let service_s = service_time_s(info.compute_tokens_per_s, &info.link, &self.workload);
        let capacity = stage_capacity(&info, &self.workload);
        let slot = Slot {
            key,
            info,
            load: 0,
            health: HealthRecord::default(),
            since_ms: now_ms,
            capacity,
            service_s,
            correction: 1.0,
            pool_pos: Vec::new(),
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.slots[id as usize] = Some(slot);
                id
            }
            None => {
                self.slots.push(Some(slot));
                u32::try_from(self.slots.len() - 1)
                    .map_err(|_| Error::InvalidConfig("more than 2^32 peers".into()))?
            }
        };
        self.index.insert(key, id);
        self.attach(id);
        Ok(())
    }

    /// Removes a peer (it left, or membership declared it dead). Returns its last record.
    pub fn remove(&mut self, key: &PeerKey) -> Result<PeerInfo, Error> {
        let id = self.index.remove(key).ok_or(Error::UnknownPeer(*key))?;
        self.detach(id);
        self.rtt.retain(|&(a, b), _| a != id && b != id);
        let slot = self.slots[id as usize]
            .take()
            .ok_or(Error::UnknownPeer(*key))?;
        self.free.push(id);
        Ok(slot.info)
    }

    /// Changes a peer's life-cycle state (e.g. `Joining` -> `Serving` once its state is loaded).
    pub fn set_state(&mut self, key: &PeerKey, state: PeerState, now_ms: u64) -> Result<(), Error> {
        let id = self.id(key)?;
        self.detach(id);
        let slot = self.slot_mut(id);
        if slot.info.state != state {
            slot.since_ms = now_ms;
        }
        slot.info.state = state;
        self.attach(id);
        Ok(())
    }

    /// Moves a peer to other stages (a rebalancing move), usually with `PeerState::Joining` until
    /// the new stages' state is downloaded.
    pub fn set_stages(
        &mut self,
        key: &PeerKey,
        stages: Range<u16>,
        state: PeerState,
        now_ms: u64,
    ) -> Result<(), Error> {
        self.check_span(&stages)?;
        let id = self.id(key)?;
        self.detach(id);
        let workload = self.workload;
        let slot = self.slot_mut(id);
        slot.info.stages = stages;
        slot.info.state = state;
        slot.since_ms = now_ms;
        slot.capacity = stage_capacity(&slot.info, &workload) / slot.correction;
        self.attach(id);
        Ok(())
    }

    /// Updates a peer's measured compute throughput and link.
    pub fn update_measurements(
        &mut self,
        key: &PeerKey,
        compute_tokens_per_s: f64,
        link: Link,
    ) -> Result<(), Error> {
        positive("compute_tokens_per_s", compute_tokens_per_s)?;
        validate_link(&link)?;
        let id = self.id(key)?;
        self.detach(id);
        let workload = self.workload;
        let slot = self.slot_mut(id);
        slot.info.compute_tokens_per_s = compute_tokens_per_s;
        slot.info.link = link;
        slot.service_s = service_time_s(compute_tokens_per_s, &link, &workload);
        slot.capacity = stage_capacity(&slot.info, &workload) / slot.correction;
        self.attach(id);
        Ok(())
    }

    /// Feeds back one hop's observed service time in seconds (the peer's own compute and I/O for
    /// one stage of the view's workload, without queueing: peers report it with their result).
    /// Announced measurements can be off; an EWMA of observed / predicted corrects the peer's
    /// capacity and planning cost.
    pub fn observe_service(&mut self, key: &PeerKey, observed_s: f64) -> Result<(), Error> {
        positive("observed_s", observed_s)?;
        let id = self.id(key)?;
        let workload = self.workload;
        let slot = self.slots[id as usize]
            .as_mut()
            .expect("index points at live slots");
        let ratio = (observed_s / slot.service_s).clamp(0.1, 10.0);
        slot.correction += SERVICE_EWMA * (ratio - slot.correction);
        let old = slot.capacity;
        let new = stage_capacity(&slot.info, &workload) / slot.correction;
        slot.capacity = new;
        if slot.info.state == PeerState::Leaving {
            return Ok(());
        }
        for (k, s) in slot.info.stages.clone().enumerate() {
            let pool = &mut self.pools[usize::from(s)];
            pool.planned = (pool.planned + new - old).max(0.0);
            if let Some(&p) = slot.pool_pos.get(k) {
                pool.weights.set(p as usize, new);
            }
        }
        Ok(())
    }

    /// Records a measured RTT between two peers; it overrides their coordinates' estimate.
    pub fn set_rtt(&mut self, a: &PeerKey, b: &PeerKey, rtt_ms: f64) -> Result<(), Error> {
        if !rtt_ms.is_finite() || rtt_ms < 0.0 {
            return Err(Error::InvalidMeasurement {
                what: "rtt_ms",
                value: rtt_ms,
            });
        }
        let (a, b) = (self.id(a)?, self.id(b)?);
        self.rtt.insert((a.min(b), a.max(b)), rtt_ms as f32);
        Ok(())
    }

    /// Records how a hop on `key` ended: failures and timeouts ban it with exponential backoff,
    /// a success clears its record.
    pub fn report(
        &mut self,
        key: &PeerKey,
        outcome: Outcome,
        now_ms: u64,
        cfg: &HealthConfig,
    ) -> Result<(), Error> {
        let id = self.id(key)?;
        self.slot_mut(id).health.record(outcome, now_ms, cfg);
        Ok(())
    }

    /// Adds one unit of load to every hop of `plan` (call when the micro-batch is dispatched), so
    /// the next plans see it and spread out. Unknown peers are skipped.
    pub fn note_dispatched(&mut self, plan: &Plan) {
        for hop in &plan.hops {
            self.add_load(&hop.peer, 1);
        }
    }

    /// Adds `delta` to a peer's load (saturating at 0): +1 when a hop is assigned to it, -1 when it
    /// finishes, fails or is reassigned. Unknown peers are ignored (they may have been removed).
    pub fn add_load(&mut self, key: &PeerKey, delta: i32) {
        if let Some(&id) = self.index.get(key) {
            let slot = self.slot_mut(id);
            slot.load = slot.load.saturating_add_signed(delta);
        }
    }

    // ---- crate-internal access for the planner and placement ----

    pub(crate) fn pool(&self, stage: u16) -> &Pool {
        &self.pools[usize::from(stage)]
    }

    pub(crate) fn slot(&self, id: u32) -> &Slot {
        self.slots[id as usize]
            .as_ref()
            .expect("pool members and index point at live slots")
    }

    fn slot_mut(&mut self, id: u32) -> &mut Slot {
        self.slots[id as usize]
            .as_mut()
            .expect("pool members and index point at live slots")
    }

    pub(crate) fn id(&self, key: &PeerKey) -> Result<u32, Error> {
        self.index.get(key).copied().ok_or(Error::UnknownPeer(*key))
    }

    pub(crate) fn has_measured_rtt(&self) -> bool {
        !self.rtt.is_empty()
    }

    /// RTT between two slots, ms: measured if known, else from coordinates.
    pub(crate) fn rtt_ms(&self, a: u32, b: u32) -> f64 {
        if !self.rtt.is_empty()
            && let Some(&r) = self.rtt.get(&(a.min(b), a.max(b)))
        {
            return f64::from(r);
        }
        self.slot(a)
            .info
            .link
            .coord
            .rtt_ms(&self.slot(b).info.link.coord)
    }

    pub(crate) fn check_span(&self, stages: &Range<u16>) -> Result<(), Error> {
        if stages.start >= stages.end || stages.end > self.num_stages {
            return Err(Error::InvalidStage {
                start: stages.start,
                end: stages.end,
                num_stages: self.num_stages,
            });
        }
        Ok(())
    }

    /// Puts a slot into the pools its state calls for.
    fn attach(&mut self, id: u32) {
        let slot = self.slots[id as usize].as_ref().expect("live slot");
        let (state, stages, capacity) = (slot.info.state, slot.info.stages.clone(), slot.capacity);
        if state == PeerState::Leaving {
            return;
        }
        let mut pos = Vec::new();
        for s in stages {
            let pool = &mut self.pools[usize::from(s)];
            pool.planned += capacity;
            if state == PeerState::Serving {
                pos.push(pool.members.len() as u32);
                pool.members.push(id);
                pool.weights.push(capacity);
            }
        }
        self.slot_mut(id).pool_pos = pos;
    }

    /// Takes a slot out of every pool (swap-remove keeps pools dense).
    fn detach(&mut self, id: u32) {
        let slot = self.slots[id as usize].as_mut().expect("live slot");
        let (state, stages, capacity) = (slot.info.state, slot.info.stages.clone(), slot.capacity);
        let pos = std::mem::take(&mut slot.pool_pos);
        if state == PeerState::Leaving {
            return;
        }
        for (k, s) in stages.enumerate() {
            let pool = &mut self.pools[usize::from(s)];
            // Clamp float drift so an emptied stage reads exactly 0.
            pool.planned = (pool.planned - capacity).max(0.0);
            if state != PeerState::Serving {
                continue;
            }
            let p = pos[k] as usize;
            let last = pool.members.len() - 1;
            if p != last {
                let moved = pool.members[last];
                let w = pool.weights.raw[last];
                pool.members[p] = moved;
                pool.weights.set(p, w);
                let moved_slot = self.slots[moved as usize].as_mut().expect("live slot");
                let k2 = usize::from(s - moved_slot.info.stages.start);
                moved_slot.pool_pos[k2] = p as u32;
            }
            let pool = &mut self.pools[usize::from(s)];
            pool.members.pop();
            pool.weights.pop();
            if pool.members.is_empty() {
                pool.weights = Fenwick::default();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fenwick_matches_prefix_sums_through_updates() {
        let mut f = Fenwick::default();
        let ws = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0];
        for w in ws {
            f.push(w);
        }
        assert!((f.total() - 25.0).abs() < 1e-9);
        // Cumulative intervals: [0,3) -> 0, [3,4) -> 1, [4,8) -> 2, ...
        assert_eq!(f.find(0.0), 0);
        assert_eq!(f.find(2.99), 0);
        assert_eq!(f.find(3.0), 1);
        assert_eq!(f.find(7.5), 2);
        assert_eq!(f.find(24.9), 6);
        f.set(5, 0.0);
        assert!((f.total() - 16.0).abs() < 1e-9);
        assert_eq!(f.find(14.5), 6);
        f.pop();
        assert!((f.total() - 14.0).abs() < 1e-9);
        f.push(6.0);
        assert_eq!(f.find(14.0), 6);
    }
}
