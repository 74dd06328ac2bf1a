//! Helpers of the trainer integration tests: a tiny run config, stage replicas joined over QUIC on
//! loopback, and the single-process reference losses.

#![allow(dead_code)]

use std::net::SocketAddr;

use swarm_core::Identity;
use swarm_core::peer::{Peer, PeerConfig};
use swarm_core::stage::{Joined, join_run};
use swarm_model::RunConfig;
#[allow(unused_imports)] // each test crate uses some of them
pub(crate) use swarm_testkit::{
    assert_checkpoint_is_local, assert_losses_match, local_run, sparse_config, tiny_config,
};

/// Trainer options of the fault tests: start once `min_replicas` per stage have joined, waiting
/// up to a minute for them.
pub(crate) fn fault_options(
    cfg: &RunConfig,
    min_replicas: usize,
) -> swarm_core::trainer::TrainerOptions {
    let mut opts = swarm_core::trainer::TrainerOptions::new(cfg.clone());
    opts.min_replicas = min_replicas;
    opts.wait_for_peers = std::time::Duration::from_secs(60);
    opts
}

/// A stage replica: its peer and its worker.
pub(crate) struct Replica {
    pub peer: Peer,
    pub joined: Joined,
}

impl Replica {
    /// Crashes it: the endpoint closes at once (connections die, nothing is said).
    pub(crate) fn crash(&self) {
        self.peer.shared().node().close();
    }
}

pub(crate) async fn start_replica(trainer: SocketAddr, stage: u32) -> Replica {
    start_replica_with(trainer, stage, |_| {}).await
}

/// A replica whose stage options `configure` adjusts (e.g. a fault to inject).
pub(crate) async fn start_replica_with(
    trainer: SocketAddr,
    stage: u32,
    configure: impl FnOnce(&mut swarm_core::stage::StageOptions),
) -> Replica {
    let peer = Peer::start(
        Identity::generate(),
        PeerConfig {
            bootstrap: Some(trainer),
            ..PeerConfig::default()
        },
    )
    .await
    .expect("peer starts");
    let joined = join_run(&peer, trainer, Some(stage), configure)
        .await
        .expect("peer joins the run");
    Replica { peer, joined }
}

pub(crate) async fn start_replicas(trainer: SocketAddr, stages: &[u32]) -> Vec<Replica> {
    let mut out = Vec::new();
    for &s in stages {
        out.push(start_replica(trainer, s).await);
    }
    out
}

impl Replica {
    /// Arms a crash: the next request of `kind` this replica receives closes its endpoint instead
    /// of being served (as a SIGKILL at that moment would).
    pub(crate) fn crash_on(&self, kind: u16) {
        self.peer.register(
            kind,
            |peer: std::sync::Arc<swarm_core::peer::PeerShared>,
             _ctx: swarm_core::peer::RequestCtx,
             _body: Vec<u8>| async move {
                peer.node().close();
                Err(swarm_core::rpc::RpcError::refused(
                    swarm_core::rpc::code::INTERNAL,
                    "crashed",
                ))
            },
        );
    }
}
