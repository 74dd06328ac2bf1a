//! The swarm above its network layer ([`swarm_net`]): training (pipeline messages, the stage
//! worker, the trainer, replica sync) and proof of training (receipts, audits, the ledger).
//!
//! The network modules are re-exported under their old paths (`swarm_core::rpc`, ...) so callers
//! need one import root; they live in `swarm/net`.

#![warn(missing_docs)]

pub mod compute;
pub mod error;
#[cfg(feature = "fault")]
pub mod fault;
pub mod ids;
pub mod ledger;
pub mod protocol;
pub mod receipt;
pub mod stage;
pub mod stage_fit;
pub mod state_transfer;
pub mod trainer;

pub use swarm_net::{identity, membership, nat, peer, relay, rpc, shaping, tls, transport};

/// The wire envelope of [`swarm_net::wire`], with the kind numbers of every layer.
pub mod wire {
    pub use swarm_net::wire::*;

    /// Every layer's message kinds: the network layer's, training's and proof of training's.
    pub mod kind {
        pub use crate::protocol::kind::*;
        pub use crate::receipt::kind::*;
        pub use swarm_net::wire::kind::*;
    }

    /// The kind sets this crate's layers register on a peer, network layer first.
    pub const LAYERS: [&KindSet; 3] = [
        &swarm_net::wire::NET_KINDS,
        &crate::protocol::KINDS,
        &crate::receipt::KINDS,
    ];

    /// A registry with every layer's kinds (what a peer of this crate accepts).
    pub fn registry() -> Registry {
        let mut r = Registry::new();
        for set in &LAYERS[1..] {
            r.register(set)
                .expect("the layers' kind ranges are disjoint (tested)");
        }
        r
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// Each layer's range is its own, every kind has a row with a cap, and the ranges do not
        /// overlap.
        #[test]
        fn layer_kind_ranges_are_disjoint_and_every_kind_has_a_cap() {
            let r = registry();
            assert_eq!(r.sets().len(), LAYERS.len());
            for (i, a) in LAYERS.iter().enumerate() {
                a.check().unwrap();
                for b in &LAYERS[i + 1..] {
                    assert!(
                        a.last < b.first || b.last < a.first,
                        "{} and {}",
                        a.layer,
                        b.layer
                    );
                }
                for k in a.kinds {
                    assert!(k.max_len <= u32::MAX as usize, "{}", k.name);
                    assert_eq!(r.info(k.kind), Some(k));
                }
            }
        }
    }
}

pub use error::{Error, Result};
pub use identity::{Identity, PeerId};
