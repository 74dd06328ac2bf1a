//! The home-link codecs (`HOME_*`: rotated 4-bit activations and gradients, top-2% 8-bit sync
//! with error feedback, zstd) against codec `none` on the same run: at least 10x fewer tensor
//! bytes on the wire than fp32, and the loss after N steps within a few percent.

mod trainer_common;

use std::time::Duration;

use swarm_core::trainer::{
    HOME_ACTIVATIONS, HOME_GRADIENTS, HOME_SYNC, Metrics, Trainer, TrainerOptions,
};
use swarm_model::RunConfig;
use trainer_common::*;

async fn run(cfg: RunConfig) -> Metrics {
    let mut opts = TrainerOptions::new(cfg);
    opts.min_replicas = 2;
    opts.wait_for_peers = Duration::from_secs(60);
    let mut trainer = Trainer::start(opts).await.unwrap();
    let replicas = start_replicas(trainer.addr(), &[0, 0, 1, 1]).await;
    let m = tokio::time::timeout(Duration::from_secs(150), trainer.run(&mut |_| {}))
        .await
        .expect("run finishes in time")
        .expect("run succeeds");
    let a = replicas[0].joined.worker.digest().await.unwrap();
    let b = replicas[1].joined.worker.digest().await.unwrap();
    assert_eq!(a, b, "replicas of stage 0 diverged");
    trainer.shutdown().await;
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn home_codecs_cut_bytes_tenfold_and_keep_the_loss() {
    let steps = 12;
    let mut cfg = tiny_config(steps);
    cfg.model.hidden_size = 64;
    cfg.model.intermediate_size = 128;
    cfg.model.max_position_embeddings = 64;
    cfg.train.seq_len = 32;
    cfg.validate().unwrap();
    let plain = run(cfg.clone()).await;
    let mut packed_cfg = cfg.clone();
    packed_cfg.codec.activations = HOME_ACTIVATIONS.into();
    packed_cfg.codec.gradients = HOME_GRADIENTS.into();
    packed_cfg.codec.sync = HOME_SYNC.into();
    let packed = run(packed_cfg).await;

    let (p, q) = (plain.summary(), packed.summary());
    let ratio = q.dense_bytes as f64 / q.wire_bytes as f64;
    let rel = (q.final_loss - p.final_loss).abs() / p.final_loss;
    eprintln!(
        "codec none: loss {:.4} -> {:.4}, wire {} B; home codecs: loss {:.4} -> {:.4}, wire {} B \
         ({ratio:.1}x less than fp32: activations {:.1}x, gradients {:.1}x, sync {:.1}x); final loss rel diff {rel:.4}",
        p.initial_loss,
        p.final_loss,
        p.wire_bytes,
        q.initial_loss,
        q.final_loss,
        q.wire_bytes,
        packed.wire.activations.ratio(),
        packed.wire.gradients.ratio(),
        packed.wire.sync.ratio(),
    );
    assert!(p.final_loss < p.initial_loss, "the run learns: {p:?}");
    assert!(ratio >= 10.0, "only {ratio:.1}x fewer bytes than fp32");
    assert!(
        rel < 0.05,
        "final loss {} vs {} uncompressed",
        q.final_loss,
        p.final_loss
    );
    assert_eq!(q.replica_hash_mismatches, 0);
}
