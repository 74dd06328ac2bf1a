//! NAT traversal decisions as pure state machines: no sockets, no clock, no tasks. The network
//! layer feeds them what it observed and the current time, and performs what they return (the
//! quinn-proto pattern), so every rule here is tested without a network.
//!
//! - [`reachability`]: classify a peer (public / punchable / symmetric / blocked) from what public
//!   peers observed of it and whether a dial-back reached it; plan the path between two peers;
//!   the advice `swarm join` prints.
//! - [`punch`]: one side of a coordinated hole punch: when to probe or dial, bounded retries.
//! - [`relay`]: a relay's admission and byte quotas (total budget, per-peer cap, circuit limits).
//! - [`upgrade`]: when to try replacing a relayed connection with a direct or punched one.

#![warn(missing_docs)]

pub mod punch;
pub mod reachability;
pub mod relay;
pub mod upgrade;

pub use punch::{Punch, PunchAction, PunchConfig, PunchOutcome, PunchRole};
pub use reachability::{Observations, PathKind, Plan, Reachability, Verdict, classify, plan};
pub use relay::{Admit, RelayConfig, RelayQuota, RelayRefusal, RelayUsage};
pub use upgrade::{Relayed, UpgradeConfig, Upgrades};
