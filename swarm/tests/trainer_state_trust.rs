//! A replica that serves the trainer an altered state (issue #16): every state the trainer takes,
//! for a checkpoint or a leaver's hand-off, must carry its stage's agreed weights digest. The liar
//! is refused and banned, and the state comes from another replica, so the checkpoint holds the
//! single-process model's weights.

mod trainer_common;

use std::sync::Arc;
use std::time::Duration;

use swarm_core::peer::{PeerShared, RequestCtx};
use swarm_core::protocol::{FetchState, StateChunk};
use swarm_core::rpc;
use swarm_core::state_transfer::serve_chunk;
use swarm_core::trainer::Trainer;
use swarm_core::wire::{decode_body, encode_body, kind};
use trainer_common::*;

/// `bytes` (a stage export, safetensors) with one weight changed and the moments kept.
fn alter_a_weight(bytes: &[u8]) -> Vec<u8> {
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.shape().to_vec(), v.data().to_vec()))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let w = tensors
        .iter_mut()
        .find(|(n, _, _)| !n.starts_with("optimizer."))
        .expect("a weight");
    let x = f32::from_le_bytes(w.2[..4].try_into().unwrap()) + 0.25;
    w.2[..4].copy_from_slice(&x.to_le_bytes());
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, s, d)| {
            let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)
                .unwrap();
            (n.clone(), v)
        })
        .collect();
    safetensors::serialize(views, meta.metadata().clone()).unwrap()
}

impl Replica {
    /// From now on this replica serves its state with one weight altered (consistently hashed,
    /// and claiming its honest digest), as a cheater poisoning checkpoints would.
    fn serve_altered_state(&self) {
        let worker = self.joined.worker.clone();
        self.peer.register(
            kind::FETCH_STATE,
            move |_p: Arc<PeerShared>, ctx: RequestCtx, body: Vec<u8>| {
                let worker = worker.clone();
                async move {
                    let f: FetchState = decode_body(&body)?;
                    // The honest export, whole (a tiny stage fits one chunk).
                    let whole = FetchState {
                        offset: 0,
                        max_len: u32::MAX,
                        ..f
                    };
                    let (_, honest) = worker
                        .handle(kind::FETCH_STATE, ctx, encode_body(&whole)?)
                        .await?;
                    let honest: StateChunk = decode_body(&honest)?;
                    assert_eq!(honest.data.len() as u64, honest.total_len);
                    let altered = alter_a_weight(&honest.data);
                    let hash = *blake3::hash(&altered).as_bytes();
                    rpc::reply(&serve_chunk(&f, &altered, hash, honest.digest)?)
                }
            },
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_serving_altered_state_is_refused_and_the_checkpoint_comes_from_another() {
    let steps = 3;
    let mut cfg = tiny_config(steps);
    cfg.train.checkpoint_every = 1;
    let out = tempfile::tempdir().unwrap();
    let mut opts = fault_options(&cfg, 2);
    opts.out = Some(out.path().join("ckpt"));
    let mut trainer = Trainer::start(opts).await.unwrap();
    let replicas = start_replicas(trainer.addr(), &[0, 0, 1, 1]).await;
    // The trainer asks a stage's serving replicas in peer-id order: make the first one of
    // stage 1 the liar, so that it is asked first.
    let liar = if replicas[2].peer.peer_id() < replicas[3].peer.peer_id() {
        2
    } else {
        3
    };
    replicas[liar].serve_altered_state();
    let metrics = tokio::time::timeout(Duration::from_secs(120), trainer.run(&mut |_| {}))
        .await
        .expect("run finishes in time")
        .expect("run succeeds");

    let (want, local) = local_run(&cfg, steps as usize);
    let got: Vec<f64> = metrics.steps.iter().map(|r| r.loss).collect();
    assert_losses_match(&got, &want, 1e-4);
    // Refused at the first checkpoint, banned (and so out of the later ones).
    let s = metrics.summary();
    assert_eq!(s.bad_states, 1, "{s:?}");
    assert_eq!(s.banned, vec![replicas[liar].peer.peer_id().to_string()]);
    assert_eq!(s.peers_lost, 1, "{s:?}");
    // The checkpoint holds the honest weights: the local model's.
    assert_checkpoint_is_local(&out.path().join("ckpt"), steps, &local);
    drop(replicas);
    trainer.shutdown().await;
}
