//! The network layer of the swarm: who a peer is ([`identity`]), how peers reach each other
//! ([`tls`], [`transport`], [`shaping`]), how they talk ([`wire`], [`rpc`]), and how a swarm knows
//! its members ([`membership`], [`peer`]).
//!
//! It knows nothing of training, codecs or audits. Upper layers define their own messages, register
//! their kind numbers and size caps as a [`wire::KindSet`] with [`peer::Peer::register_kinds`], and
//! add handlers with [`peer::Peer::register`].

#![warn(missing_docs)]

pub mod congestion;
pub mod error;
pub mod identity;
pub mod membership;
pub mod nat;
mod paths;
pub mod peer;
pub mod relay;
pub mod rpc;
pub mod shaping;
pub mod tls;
pub mod transport;
pub mod wire;

pub use error::{Error, Result};
pub use identity::{Identity, PeerId};
