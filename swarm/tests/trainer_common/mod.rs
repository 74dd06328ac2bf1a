//! Helpers of the trainer integration tests: a tiny run config, stage replicas joined over QUIC on
//! loopback, and the single-process reference losses.

#![allow(dead_code)]

use std::net::SocketAddr;

use swarm_core::Identity;
use swarm_core::peer::{Peer, PeerConfig};
use swarm_core::stage::{Joined, join_run};
use swarm_model::{LocalTrainer, RunConfig};
#[allow(unused_imports)] // each test crate uses some of them
pub(crate) use swarm_testkit::{assert_losses_match, local_run, sparse_config, tiny_config};

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

/// Asserts the checkpoint in `dir` is at `step` and holds `local`'s weights: every value within
/// 1e-3 of its tensor's scale (max |w|), and fewer than 1% of them beyond 1e-4.
///
/// Not bitwise: replicas of a stage each sum their share of the micro-batches, so the step's sum
/// associates differently from the local run's, and AdamW's normalised update turns a last-bit
/// difference in a near-zero gradient coordinate into a visible one in that weight (measured: one
/// value of 2,048 at 1.5e-4, the rest below 6e-5 after 3 steps). A wrong gradient moves most
/// values by about the learning rate. One replica per stage is checked bitwise
/// (`trainer_pipeline.rs`).
pub(crate) fn assert_checkpoint_is_local(dir: &std::path::Path, step: u64, local: &LocalTrainer) {
    let ck = swarm_model::checkpoint::load(dir).unwrap();
    assert_eq!(ck.state.as_ref().map(|s| s.step), Some(step));
    for (name, t) in &local.tensors() {
        let got = &ck.tensors[name];
        let a: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
        let scale = a.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
        let rel: Vec<f32> = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs() / scale)
            .collect();
        let max = rel.iter().fold(0f32, |m, r| m.max(*r));
        let beyond = rel.iter().filter(|r| **r > 1e-4).count();
        assert!(
            max < 1e-3 && beyond * 100 < rel.len(),
            "{name}: max relative diff {max}, {beyond} of {} values beyond 1e-4",
            rel.len()
        );
    }
}
