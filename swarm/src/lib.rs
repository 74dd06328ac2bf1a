//! The swarm: peers over QUIC (identity, mutual TLS, wire protocol, link shaping, membership), and
//! on top of it the trainer, the peer server, replica sync, audits and the contribution ledger.

pub mod bench_link;
pub mod codec_sim;
pub mod error;
pub mod fault;
pub mod identity;
pub mod ledger;
pub mod membership;
pub mod nat;
pub mod peer;
pub mod protocol;
pub mod receipt;
pub mod rpc;
pub mod shaping;
pub mod stage;
pub mod stage_fit;
pub mod state_transfer;
pub mod tls;
pub mod trainer;
pub mod transport;
pub mod wire;

pub use error::{Error, Result};
pub use identity::{Identity, PeerId};
