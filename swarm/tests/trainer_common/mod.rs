//! Helpers of the trainer integration tests: a tiny run config, stage replicas joined over QUIC on
//! loopback, and the single-process reference losses.

#![allow(dead_code)]

use std::net::SocketAddr;

use swarm_core::Identity;
use swarm_core::peer::{Peer, PeerConfig};
use swarm_core::stage::{Joined, join_run};
use swarm_model::{LocalTrainer, RunConfig};

/// A 2-layer, width-32 model in 2 stages; 4 micro-batches of 2 x 16 tokens per step; codec none.
/// Trainer options of the fault tests: start once `min_replicas` per stage have joined, waiting
/// up to a minute for them.
pub fn fault_options(cfg: &RunConfig, min_replicas: usize) -> swarm_core::trainer::TrainerOptions {
    let mut opts = swarm_core::trainer::TrainerOptions::new(cfg.clone());
    opts.min_replicas = min_replicas;
    opts.wait_for_peers = std::time::Duration::from_secs(60);
    opts
}

pub fn tiny_config(steps: u64) -> RunConfig {
    let mut cfg = RunConfig {
        // Exact fp32: these tests compare with the local run (the default codecs are lossy).
        codec: swarm_model::CodecConfig::none(),
        ..RunConfig::default()
    };
    cfg.model.hidden_size = 32;
    cfg.model.intermediate_size = 64;
    cfg.model.num_hidden_layers = 2;
    cfg.model.num_attention_heads = 4;
    cfg.model.num_key_value_heads = Some(2);
    cfg.model.max_position_embeddings = 32;
    cfg.stages = vec![0, 1, 2];
    cfg.train.steps = steps;
    cfg.train.micro_batches = 4;
    cfg.train.micro_batch_size = 2;
    cfg.train.seq_len = 16;
    cfg.train.warmup_steps = 1;
    cfg.train.lr = 1e-2;
    cfg.validate().unwrap();
    cfg
}

/// A stage replica: its peer and its worker.
pub struct Replica {
    pub peer: Peer,
    pub joined: Joined,
}

impl Replica {
    /// Crashes it: the endpoint closes at once (connections die, nothing is said).
    pub fn crash(&self) {
        self.peer.shared().node().close();
    }
}

pub async fn start_replica(trainer: SocketAddr, stage: u32) -> Replica {
    start_replica_with(trainer, stage, |_| {}).await
}

/// A replica whose stage options `configure` adjusts (e.g. a fault to inject).
pub async fn start_replica_with(
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

pub async fn start_replicas(trainer: SocketAddr, stages: &[u32]) -> Vec<Replica> {
    let mut out = Vec::new();
    for &s in stages {
        out.push(start_replica(trainer, s).await);
    }
    out
}

/// Losses of the single-process reference run, step by step.
pub fn local_losses(cfg: &RunConfig, steps: usize) -> (Vec<f64>, LocalTrainer) {
    let corpus = swarm_model::train::load_corpus(&cfg.data).unwrap();
    let mut local = LocalTrainer::new(cfg).unwrap();
    let losses = (0..steps)
        .map(|_| local.train_step(&corpus).unwrap().loss)
        .collect();
    (losses, local)
}

/// Asserts every step's loss is within `tol` relative of the reference.
pub fn assert_losses_match(got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len());
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        let rel = (g - w).abs() / w.abs();
        assert!(
            rel < tol,
            "step {k}: swarm loss {g} vs local {w} (rel {rel})"
        );
    }
}

impl Replica {
    /// Arms a crash: the next request of `kind` this replica receives closes its endpoint instead
    /// of being served (as a SIGKILL at that moment would).
    pub fn crash_on(&self, kind: u16) {
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

/// Asserts the checkpoint in `dir` is at `step` and holds `local`'s weights (within 1e-4 of each
/// tensor's scale).
pub fn assert_checkpoint_is_local(dir: &std::path::Path, step: u64, local: &LocalTrainer) {
    let ck = swarm_model::checkpoint::load(dir).unwrap();
    assert_eq!(ck.state.as_ref().map(|s| s.step), Some(step));
    for (name, t) in &local.tensors() {
        let got = &ck.tensors[name];
        let a: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
        let scale = a.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
        let diff = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            diff / scale < 1e-4,
            "{name}: max diff {diff} (scale {scale})"
        );
    }
}
