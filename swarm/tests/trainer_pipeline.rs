//! The distributed trainer against real stage workers over QUIC on loopback (in one process):
//! with codec `none`, 2 stages x 2 replicas and several micro-batches per step, every step's loss
//! matches the single-process `LocalTrainer` (same config and seed) within 1e-4 relative, and the
//! final checkpoint's weights match the local model's.

use std::time::Duration;

use swarm_core::trainer::{Trainer, TrainerEvent, TrainerOptions};

mod trainer_common;
use trainer_common::{
    assert_checkpoint_is_local, assert_losses_match, local_run, start_replicas, tiny_config,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swarm_run_matches_local_run_with_codec_none() {
    let steps = 3;
    let cfg = tiny_config(steps);
    let out = tempfile::tempdir().unwrap();
    let mut opts = TrainerOptions::new(cfg.clone());
    opts.min_replicas = 2;
    opts.out = Some(out.path().join("ckpt"));
    opts.wait_for_peers = Duration::from_secs(60);
    opts.attempt_timeout = Duration::from_secs(30);
    let mut trainer = Trainer::start(opts).await.unwrap();
    let replicas = start_replicas(trainer.addr(), &[0, 0, 1, 1]).await;

    let mut events = Vec::new();
    let metrics = tokio::time::timeout(
        Duration::from_secs(120),
        trainer.run(&mut |e: &TrainerEvent| events.push(format!("{e:?}"))),
    )
    .await
    .expect("run finishes in time")
    .expect("run succeeds");
    assert_eq!(metrics.steps.len() as u64, steps);

    // The reference: the single-process trainer on the same config.
    let (want, local) = local_run(&cfg, steps as usize);
    let got: Vec<f64> = metrics.steps.iter().map(|r| r.loss).collect();
    assert_losses_match(&got, &want, 1e-4);
    for (k, r) in metrics.steps.iter().enumerate() {
        // Both replicas of each stage took part in every sync.
        assert_eq!(r.participants, vec![2, 2], "step {k}");
    }
    let s = metrics.summary();
    assert_eq!(
        (s.retries, s.peers_lost, s.replica_hash_mismatches),
        (0, 0, 0)
    );
    // Codec none: the wire carries fp32 frames plus headers.
    assert!(s.wire_bytes >= s.dense_bytes && s.dense_bytes > 0, "{s:?}");
    // The trainer's time by part (issue #18) adds up to its training time, and every part the
    // run went through got some of it.
    let t = s.time_breakdown;
    assert!((t.wall_s - metrics.train_seconds).abs() < 1e-6, "{t:?}");
    assert!((t.parts_s() - t.wall_s).abs() < 1e-3 * t.wall_s, "{t:?}");
    for (part, v) in [
        ("compute", t.compute_s),
        ("encode/decode", t.encode_decode_s),
        ("links", t.links_s),
        ("barrier", t.barrier_s),
        ("sync", t.sync_s),
    ] {
        assert!(v > 0.0 && v < t.wall_s, "{part}: {t:?}");
    }
    assert!(t.stage_queue_s >= 0.0 && t.idle_s >= 0.0, "{t:?}");

    // The final checkpoint holds the local model's weights.
    assert_checkpoint_is_local(&out.path().join("ckpt"), steps, &local);
    // The swarm evaluates the whole model at the last step on the local trainer's batches.
    let corpus = swarm_model::train::load_corpus(&cfg.data).unwrap();
    let want_val = local.eval(&corpus, cfg.train.eval_batches).unwrap();
    let (at, got_val) = *metrics
        .val_losses
        .last()
        .expect("a validation at the last step");
    assert_eq!(at, steps);
    assert!(
        (got_val - want_val).abs() < 1e-4 * want_val,
        "swarm validation loss {got_val} vs local {want_val}"
    );
    assert_eq!(s.val_loss, Some(got_val));
    // Each replica reports what it sent per channel. Sync shares are all sent by replicas, so
    // their reports add up to the trainer's count; activations and gradients also include the
    // trainer's own frames.
    assert_eq!(metrics.peer_sent.len(), 4, "{:?}", metrics.peer_sent);
    let sum = |c: usize| metrics.peer_sent.values().map(|t| t[c].wire).sum::<u64>();
    assert_eq!(sum(2), metrics.wire.sync.wire_bytes);
    assert!(sum(0) > 0 && sum(0) < metrics.wire.activations.wire_bytes);
    assert!(sum(1) > 0 && sum(1) < metrics.wire.gradients.wire_bytes);
    for t in metrics.peer_sent.values() {
        assert!(t.iter().all(|c| c.wire > 0 && c.dense > 0), "{t:?}");
    }
    // The trainer reports each replica's standing in its ledger back with every Apply: never
    // ahead of the ledger file, which only grows.
    let ledger = std::fs::read(out.path().join("ckpt.ledger")).expect("the run's ledger");
    let credits = swarm_core::ledger::credits(&swarm_core::ledger::parse(&ledger).unwrap());
    for r in &replicas {
        let got = r
            .joined
            .worker
            .stats()
            .credit()
            .expect("the trainer reports the ledger back");
        let want = credits.iter().find(|c| c.peer == r.peer.peer_id());
        let (passed, credited) =
            want.map_or((0, 0), |c| (c.audits_passed, c.credited_micro_batches));
        assert!(
            got.audits_passed <= passed && got.credited_micro_batches <= credited,
            "{got:?} vs {want:?}"
        );
        assert_eq!(got.audits_failed, 0);
    }
    // Replicas of a stage hold bitwise-identical weights.
    let mut d = Vec::new();
    for r in &replicas {
        d.push(r.joined.worker.digest().await.unwrap().unwrap());
    }
    assert_eq!(d[0], d[1]);
    assert_eq!(d[2], d[3]);
    drop(replicas);
    trainer.shutdown().await;
}

/// One replica per stage, four micro-batches in flight, and micro-batch 0's forward held back at
/// stage 1 so that it comes back last: the trainer's head and embedding and both stages see the
/// backwards out of order. Gradients are added in micro-batch order, so the run is bitwise the
/// single-process run: every loss, and every weight of the final checkpoint. (Added in arrival
/// order, micro-batch 0's gradients would come last and the bits would differ.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swarm_run_is_the_local_run_bitwise_when_backwards_come_out_of_order() {
    use std::sync::Arc;
    let steps = 3;
    let cfg = tiny_config(steps);
    let out = tempfile::tempdir().unwrap();
    let mut opts = TrainerOptions::new(cfg.clone());
    opts.min_replicas = 1;
    opts.max_in_flight = cfg.train.micro_batches;
    opts.out = Some(out.path().join("ckpt"));
    opts.wait_for_peers = Duration::from_secs(60);
    opts.attempt_timeout = Duration::from_secs(30);
    let mut trainer = Trainer::start(opts).await.unwrap();
    let replicas = start_replicas(trainer.addr(), &[0, 1]).await;
    let worker = replicas[1].joined.worker.clone();
    replicas[1].peer.register(
        swarm_core::wire::kind::FORWARD,
        move |_p: Arc<swarm_core::peer::PeerShared>,
              ctx: swarm_core::peer::RequestCtx,
              body: Vec<u8>| {
            let worker = worker.clone();
            async move {
                let f: swarm_core::protocol::Forward =
                    swarm_core::wire::decode_body(&body).expect("a forward");
                if f.key.mb == 0 {
                    tokio::time::sleep(Duration::from_millis(400)).await;
                }
                worker
                    .handle(swarm_core::wire::kind::FORWARD, ctx, body)
                    .await
            }
        },
    );
    let metrics = tokio::time::timeout(Duration::from_secs(120), trainer.run(&mut |_| {}))
        .await
        .expect("run finishes in time")
        .expect("run succeeds");
    assert_eq!(metrics.summary().retries, 0);
    let (want, local) = local_run(&cfg, steps as usize);
    let got: Vec<u64> = metrics.steps.iter().map(|r| r.loss.to_bits()).collect();
    let want: Vec<u64> = want.iter().map(|l| l.to_bits()).collect();
    assert_eq!(got, want);
    let ck = swarm_model::checkpoint::load(&out.path().join("ckpt")).unwrap();
    for (name, t) in &local.tensors() {
        let bits = |t: &candle_core::Tensor| -> Vec<u32> {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            v.iter().map(|x| x.to_bits()).collect()
        };
        assert!(bits(t) == bits(&ck.tensors[name]), "{name} differs");
    }
    drop(replicas);
    trainer.shutdown().await;
}

/// Runs `steps` steps of the tiny run on 2 stages x 2 replicas; with `refuse_first_forward`, the
/// first replica of stage 1 refuses the first Forward it receives (the attempt fails after two
/// activation frames crossed the network: the trainer's and stage 0's) and serves the rest.
async fn run_counting_bytes(
    steps: u64,
    refuse_first_forward: bool,
) -> swarm_core::trainer::Metrics {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let cfg = tiny_config(steps);
    let mut opts = TrainerOptions::new(cfg.clone());
    opts.min_replicas = 2;
    opts.wait_for_peers = Duration::from_secs(60);
    opts.attempt_timeout = Duration::from_secs(30);
    let mut trainer = Trainer::start(opts).await.unwrap();
    let replicas = start_replicas(trainer.addr(), &[0, 0, 1, 1]).await;
    if refuse_first_forward {
        let worker = replicas[2].joined.worker.clone();
        let refused = Arc::new(AtomicBool::new(false));
        replicas[2].peer.register(
            swarm_core::wire::kind::FORWARD,
            move |_p: Arc<swarm_core::peer::PeerShared>,
                  ctx: swarm_core::peer::RequestCtx,
                  body: Vec<u8>| {
                let (worker, refused) = (worker.clone(), refused.clone());
                async move {
                    if !refused.swap(true, Ordering::SeqCst) {
                        return Err(swarm_core::rpc::RpcError::refused(
                            swarm_core::rpc::code::BAD_REQUEST,
                            "injected refusal",
                        ));
                    }
                    worker
                        .handle(swarm_core::wire::kind::FORWARD, ctx, body)
                        .await
                }
            },
        );
    }
    let metrics = tokio::time::timeout(Duration::from_secs(120), trainer.run(&mut |_| {}))
        .await
        .expect("run finishes in time")
        .expect("run succeeds");
    let (want, _) = local_run(&cfg, steps as usize);
    let got: Vec<f64> = metrics.steps.iter().map(|r| r.loss).collect();
    assert_losses_match(&got, &want, 1e-4);
    drop(replicas);
    trainer.shutdown().await;
    metrics
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_of_failed_attempts_count_as_wire_bytes() {
    let steps = 2;
    let clean = run_counting_bytes(steps, false).await;
    let retried = run_counting_bytes(steps, true).await;
    assert_eq!((clean.retries, retried.retries), (0, 1));
    let (a, b) = (clean.wire, retried.wire);
    // Codec none: every activation frame has the same size; a clean run sends 3 per micro-batch
    // (trainer -> stage 0 -> stage 1 -> trainer).
    let cfg = tiny_config(steps);
    let frames = steps * cfg.train.micro_batches as u64 * 3;
    assert_eq!(a.activations.wire_bytes % frames, 0, "{a:?}");
    let (frame, dense) = (
        a.activations.wire_bytes / frames,
        a.activations.dense_bytes / frames,
    );
    // The failed attempt's two frames crossed the network and are counted, once each.
    assert_eq!(
        b.activations.wire_bytes,
        a.activations.wire_bytes + 2 * frame
    );
    assert_eq!(
        b.activations.dense_bytes,
        a.activations.dense_bytes + 2 * dense
    );
    assert_eq!(b.gradients, a.gradients);
    assert_eq!(
        (b.sync.wire_bytes, b.sync.dense_bytes),
        (a.sync.wire_bytes, a.sync.dense_bytes)
    );
    let (sa, sb) = (clean.summary(), retried.summary());
    assert!(sb.wire_bytes > sa.wire_bytes, "{sa:?} {sb:?}");
}

/// A subspace model (issue #13) over real stage workers with codec `none`: every boundary carries
/// the token ids and k coordinates per token forward and `Uᵀ·g` back, and the run is the local
/// run of the same (subspace) config step for step; fp32 bytes stay the standard model's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subspace_swarm_matches_local_run_and_sends_k_values_per_token() {
    let steps = 3;
    let mut cfg = tiny_config(steps);
    cfg.model.subspace_rank = 4;
    cfg.model.subspace_seed = cfg.seed;
    cfg.validate().unwrap();
    let mut opts = TrainerOptions::new(cfg.clone());
    opts.min_replicas = 2;
    opts.wait_for_peers = Duration::from_secs(60);
    opts.attempt_timeout = Duration::from_secs(30);
    let mut trainer = Trainer::start(opts).await.unwrap();
    let replicas = start_replicas(trainer.addr(), &[0, 0, 1, 1]).await;
    let metrics = tokio::time::timeout(Duration::from_secs(120), trainer.run(&mut |_| {}))
        .await
        .expect("run finishes in time")
        .expect("run succeeds");
    let (want, _) = local_run(&cfg, steps as usize);
    let got: Vec<f64> = metrics.steps.iter().map(|r| r.loss).collect();
    assert_losses_match(&got, &want, 1e-4);
    let s = metrics.summary();
    assert_eq!((s.retries, s.replica_hash_mismatches), (0, 0));
    // fp32 bytes: the standard model's 4·hidden per token, 3 boundaries (trainer -> stage 0 ->
    // stage 1 -> trainer), every micro-batch of every step, each way.
    let t = &cfg.train;
    let per_way = 4
        * cfg.model.hidden_size as u64
        * (t.micro_batch_size * t.seq_len * t.micro_batches) as u64
        * 3
        * steps;
    let (act, grad) = (&metrics.wire.activations, &metrics.wire.gradients);
    assert_eq!(act.dense_bytes, per_way);
    assert_eq!(grad.dense_bytes, per_way);
    // What crosses is k = 4 of hidden = 32 values per token (fp32 frames plus headers, and the
    // ids forward; frame headers add about 20% at this tiny size): near 8x fewer bytes.
    let k_share = per_way / 8;
    assert!(
        grad.wire_bytes >= k_share && grad.wire_bytes < k_share * 13 / 10,
        "{grad:?}"
    );
    assert!(
        act.wire_bytes > grad.wire_bytes && act.wire_bytes < k_share * 15 / 10,
        "{act:?}"
    );
    drop(replicas);
    trainer.shutdown().await;
}
