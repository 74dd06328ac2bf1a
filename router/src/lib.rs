//! Pure routing logic for pipeline-parallel training over volunteer peers: functions of
//! (swarm view, time, seed). No tokio, sockets, candle or clock: time is passed in as `now_ms`
//! (the caller's clock, milliseconds) and randomness as an `rand::Rng`.
//!
//! - [`view`]: [`SwarmView`], the peers, their stages, measurements, load and health, kept in
//!   per-stage pools that support capacity-weighted sampling in O(log n).
//! - [`plan`]: [`plan()`], one replica per stage for a micro-batch, with a fallback per hop.
//! - [`health`]: failures ban a peer with exponential backoff; a success clears it.
//! - [`placement`]: [`choose_stages`] for a joiner, [`should_move`] for debounced rebalancing.
//! - [`sim`]: a deterministic discrete-event simulator of thousands of peers driven by the above.
//!
//! How the trainer uses it: keep a `SwarmView` current from membership records and measurements;
//! per micro-batch call `plan(&view, &request, now_ms, &PlanConfig::default(), &mut rng)`, then
//! `view.note_dispatched(&plan)`; per hop `view.report(peer, outcome, now_ms, &health_cfg)` and
//! `view.add_load(peer, -1)` when it ends, failing over to `hop.fallback` (or [`replacement`]);
//! when a peer joins, `choose_stages(&view, span, None)`.

#![warn(missing_docs)]

pub mod error;
pub mod health;
pub mod placement;
pub mod plan;
pub mod sim;
pub mod view;

pub use error::Error;
pub use health::{HealthConfig, HealthRecord, Outcome};
pub use placement::{Move, RebalanceConfig, choose_stages, should_move, stage_pressure};
pub use plan::{Hop, Plan, PlanConfig, PlanRequest, plan, replacement};
pub use view::{
    Coord, KeyHasher, KeyMap, Link, PeerInfo, PeerKey, PeerRef, PeerState, SwarmView, Workload,
    service_time_s, stage_capacity,
};
