//! Faults and churn with real stage workers over QUIC on loopback: a replica crashing mid-step
//! (its endpoint closes without a word, as with SIGKILL) and a peer joining mid-run. Counting
//! stays exact, so the losses still match the single-process run step by step.

mod trainer_common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use swarm_core::trainer::{Trainer, TrainerEvent};
use trainer_common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_crash_mid_step_loses_no_micro_batch() {
    let steps = 4;
    let cfg = tiny_config(steps);
    let mut opts = fault_options(&cfg, 2);
    opts.attempt_timeout = Duration::from_secs(10);
    let mut trainer = Trainer::start(opts).await.unwrap();
    let replicas = Arc::new(start_replicas(trainer.addr(), &[0, 0, 1, 1]).await);

    // Crash one replica of stage 1 shortly after step 1 starts.
    let victim = replicas.clone();
    let crashed = Arc::new(Mutex::new(false));
    let flag = crashed.clone();
    let mut on_event = move |e: &TrainerEvent| {
        if let TrainerEvent::Step(r) = e
            && r.step == 0
        {
            let victim = victim.clone();
            let flag = flag.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                victim[3].crash();
                *flag.lock().unwrap() = true;
            });
        }
    };
    let metrics = tokio::time::timeout(Duration::from_secs(120), trainer.run(&mut on_event))
        .await
        .expect("run finishes in time")
        .expect("run succeeds");
    assert!(*crashed.lock().unwrap());
    let losses: Vec<f64> = metrics.steps.iter().map(|s| s.loss).collect();
    let (want, _) = local_run(&cfg, steps as usize);
    // Every micro-batch counted exactly once: the same trajectory as the local run.
    assert_losses_match(&losses, &want, 1e-4);
    assert_eq!(metrics.peers_lost, 1, "{:?}", metrics.summary());
    assert_eq!(metrics.replica_hash_mismatches, 0);
    // After the crash, stage 1 syncs with its one surviving replica.
    assert_eq!(metrics.steps.last().unwrap().participants, vec![2, 1]);
    let d0 = replicas[0].joined.worker.digest().await.unwrap();
    let d1 = replicas[1].joined.worker.digest().await.unwrap();
    assert_eq!(d0, d1);
    trainer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_joining_mid_run_syncs_its_stage_and_serves() {
    let steps = 5;
    let cfg = tiny_config(steps);
    let opts = fault_options(&cfg, 1);
    let mut trainer = Trainer::start(opts).await.unwrap();
    let addr = trainer.addr();
    let replicas = start_replicas(addr, &[0, 1]).await;

    let late: Arc<tokio::sync::Mutex<Option<Replica>>> = Arc::new(tokio::sync::Mutex::new(None));
    let slot = late.clone();
    let mut on_event = move |e: &TrainerEvent| {
        if let TrainerEvent::Step(r) = e
            && r.step == 1
        {
            let slot = slot.clone();
            tokio::spawn(async move {
                let r = start_replica(addr, 1).await;
                *slot.lock().await = Some(r);
            });
        }
    };
    let metrics = tokio::time::timeout(Duration::from_secs(120), trainer.run(&mut on_event))
        .await
        .expect("run finishes in time")
        .expect("run succeeds");
    let losses: Vec<f64> = metrics.steps.iter().map(|s| s.loss).collect();
    let (want, _) = local_run(&cfg, steps as usize);
    assert_losses_match(&losses, &want, 1e-4);
    // The joiner took part in the last syncs of stage 1 and holds the same weights.
    assert_eq!(metrics.steps.last().unwrap().participants, vec![1, 2]);
    assert_eq!(
        metrics.state_sync_seconds.len(),
        3,
        "two initial builds and one fetch"
    );
    let late = late.lock().await;
    let late = late.as_ref().expect("the joiner joined");
    assert!(late.joined.step >= 2, "joined at step {}", late.joined.step);
    let a = replicas[1].joined.worker.digest().await.unwrap();
    let b = late.joined.worker.digest().await.unwrap();
    assert_eq!(a, b);
    assert_eq!(metrics.replica_hash_mismatches, 0);
    trainer.shutdown().await;
}

/// 2 stages x 2 replicas; one replica of stage 1 crashes at step 1 when it receives `kind` (a
/// sync-phase message). The run must finish on the local run's trajectory without waiting out
/// the sync timeout (left at its 120 s default: the test's own bound is below it).
/// `rerun`: whether the lost participant's stage must re-run its micro-batches (Some(true): the
/// survivor could not finish the round; Some(false): it already had every share; None: either).
async fn crash_during_sync(kind: u16, rerun: Option<bool>) {
    let steps = 3;
    let cfg = tiny_config(steps);
    let mut opts = fault_options(&cfg, 2);
    opts.attempt_timeout = Duration::from_secs(10);
    let mut trainer = Trainer::start(opts).await.unwrap();
    let replicas = Arc::new(start_replicas(trainer.addr(), &[0, 0, 1, 1]).await);
    let victim = replicas.clone();
    let mut on_event = move |e: &TrainerEvent| {
        if let TrainerEvent::Step(r) = e
            && r.step == 0
        {
            victim[3].crash_on(kind);
        }
    };
    let metrics = tokio::time::timeout(Duration::from_secs(90), trainer.run(&mut on_event))
        .await
        .expect("run finishes before the sync timeout could have fired")
        .expect("run succeeds");
    let losses: Vec<f64> = metrics.steps.iter().map(|s| s.loss).collect();
    let (want, _) = local_run(&cfg, steps as usize);
    assert_losses_match(&losses, &want, 1e-4);
    assert_eq!(metrics.peers_lost, 1, "{:?}", metrics.summary());
    assert_eq!(metrics.replica_hash_mismatches, 0);
    assert_eq!(metrics.steps.last().unwrap().participants, vec![2, 1]);
    if let Some(rerun) = rerun {
        assert_eq!(metrics.retries > 0, rerun, "{:?}", metrics.summary());
    }
    let d0 = replicas[0].joined.worker.digest().await.unwrap();
    let d1 = replicas[1].joined.worker.digest().await.unwrap();
    assert_eq!(d0, d1);
    trainer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_crash_at_sync_start_resets_the_stage_and_reruns() {
    crash_during_sync(swarm_core::wire::kind::SYNC_START, Some(true)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_crash_during_grad_share_exchange() {
    crash_during_sync(swarm_core::wire::kind::GRAD_SHARE, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_crash_before_apply() {
    crash_during_sync(swarm_core::wire::kind::APPLY, Some(false)).await;
}

/// A replica asked to leave mid-run (as Ctrl-C on `swarm join` does): it is taken out of
/// routing, finishes its work, takes part in that step's sync, and is released at the boundary.
/// Nothing is retried or lost, and it is not counted as a crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_leave_finishes_the_step_and_is_not_a_crash() {
    let steps = 4;
    let cfg = tiny_config(steps);
    let opts = fault_options(&cfg, 2);
    let mut trainer = Trainer::start(opts).await.unwrap();
    let addr = trainer.addr();
    let replicas = Arc::new(start_replicas(addr, &[0, 0, 1, 1]).await);
    let left: Arc<Mutex<Option<bool>>> = Arc::new(Mutex::new(None));
    let (r, slot) = (replicas.clone(), left.clone());
    let mut on_event = move |e: &TrainerEvent| {
        if let TrainerEvent::Step(s) = e
            && s.step == 0
        {
            let (r, slot) = (r.clone(), slot.clone());
            tokio::spawn(async move {
                let released = r[3]
                    .joined
                    .worker
                    .leave(addr, Duration::from_secs(60))
                    .await
                    .expect("the trainer answers Leave");
                // Released: now it may go (its endpoint closes).
                r[3].crash();
                *slot.lock().unwrap() = Some(released);
            });
        }
    };
    let metrics = tokio::time::timeout(Duration::from_secs(120), trainer.run(&mut on_event))
        .await
        .expect("run finishes in time")
        .expect("run succeeds");
    // Give the leaver's task a moment to record its answer (bounded).
    for _ in 0..50 {
        if left.lock().unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(*left.lock().unwrap(), Some(true), "released by the trainer");
    let losses: Vec<f64> = metrics.steps.iter().map(|s| s.loss).collect();
    let (want, _) = local_run(&cfg, steps as usize);
    assert_losses_match(&losses, &want, 1e-4);
    let s = metrics.summary();
    assert_eq!((s.peers_lost, s.peers_left, s.retries), (0, 1, 0), "{s:?}");
    assert_eq!(metrics.steps.last().unwrap().participants, vec![2, 1]);
    // The leaver synced the step it left in: it holds the same weights as its stage's survivor
    // had after that step (both applied it), and the survivor went on alone.
    assert_eq!(metrics.replica_hash_mismatches, 0);
    trainer.shutdown().await;
}

/// The only replica of stage 1 leaves: it hands its state to the trainer at the boundary, the run
/// pauses until a new peer takes the stage (loading that state from the trainer), and continues
/// on the uninterrupted trajectory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_replica_leaving_hands_its_state_to_the_next_peer() {
    let steps = 4;
    let cfg = tiny_config(steps);
    let opts = fault_options(&cfg, 1);
    let mut trainer = Trainer::start(opts).await.unwrap();
    let addr = trainer.addr();
    let replicas = Arc::new(start_replicas(addr, &[0, 1]).await);
    let late: Arc<tokio::sync::Mutex<Option<Replica>>> = Arc::new(tokio::sync::Mutex::new(None));
    let (r, slot) = (replicas.clone(), late.clone());
    let mut on_event = move |e: &TrainerEvent| {
        if let TrainerEvent::Step(s) = e
            && s.step == 1
        {
            let (r, slot) = (r.clone(), slot.clone());
            tokio::spawn(async move {
                let released = r[1]
                    .joined
                    .worker
                    .leave(addr, Duration::from_secs(60))
                    .await
                    .expect("the trainer answers Leave");
                assert!(released);
                r[1].crash();
                *slot.lock().await = Some(start_replica(addr, 1).await);
            });
        }
    };
    let metrics = tokio::time::timeout(Duration::from_secs(120), trainer.run(&mut on_event))
        .await
        .expect("run finishes in time")
        .expect("run succeeds");
    let losses: Vec<f64> = metrics.steps.iter().map(|s| s.loss).collect();
    let (want, _) = local_run(&cfg, steps as usize);
    assert_losses_match(&losses, &want, 1e-4);
    let s = metrics.summary();
    assert_eq!((s.peers_lost, s.peers_left), (0, 1), "{s:?}");
    let late = late.lock().await;
    let late = late.as_ref().expect("a new peer took the stage");
    assert!(late.joined.step >= 2, "it loaded step {}", late.joined.step);
    assert_eq!(
        late.joined.worker.step(),
        Some(steps),
        "the new replica trained the remaining steps"
    );
    trainer.shutdown().await;
}

/// The only replica of stage 1 crashes after a checkpoint: the run pauses, a new peer takes the
/// stage, every stage and the ends are restored from the checkpoint (new epoch), and the steps
/// since it run again: the run ends with the losses of an uninterrupted run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_replica_crash_restores_every_stage_from_the_checkpoint() {
    let steps = 5;
    let mut cfg = tiny_config(steps);
    cfg.train.checkpoint_every = 2;
    let out = tempfile::tempdir().unwrap();
    let mut opts = fault_options(&cfg, 1);
    opts.out = Some(out.path().join("ckpt"));
    opts.attempt_timeout = Duration::from_secs(10);
    let mut trainer = Trainer::start(opts).await.unwrap();
    let addr = trainer.addr();
    let replicas = Arc::new(start_replicas(addr, &[0, 1]).await);
    let late: Arc<tokio::sync::Mutex<Option<Replica>>> = Arc::new(tokio::sync::Mutex::new(None));
    let restored = Arc::new(Mutex::new(Vec::new()));
    let joined = Arc::new(Mutex::new(Vec::new()));
    let (r, slot, seen, joins) = (
        replicas.clone(),
        late.clone(),
        restored.clone(),
        joined.clone(),
    );
    let mut on_event = move |e: &TrainerEvent| match e {
        // Three steps done, the checkpoint holds two: stage 1 dies before step 3.
        TrainerEvent::Step(s) if s.step == 2 && slot.try_lock().is_ok_and(|g| g.is_none()) => {
            r[1].crash();
            let slot = slot.clone();
            tokio::spawn(async move {
                let mut g = slot.lock().await;
                tokio::time::sleep(Duration::from_millis(500)).await;
                *g = Some(start_replica(addr, 1).await);
            });
        }
        TrainerEvent::Restored {
            step,
            from_checkpoint,
            ..
        } => seen.lock().unwrap().push((*step, *from_checkpoint)),
        TrainerEvent::Joined { peer, .. } => joins.lock().unwrap().push(*peer),
        _ => {}
    };
    let metrics = tokio::time::timeout(Duration::from_secs(120), trainer.run(&mut on_event))
        .await
        .expect("run finishes in time")
        .expect("run succeeds");
    assert_eq!(*restored.lock().unwrap(), vec![(2, true)]);
    assert_eq!(metrics.restores, 1);
    let losses: Vec<f64> = metrics.steps.iter().map(|s| s.loss).collect();
    let (want, _) = local_run(&cfg, steps as usize);
    assert_losses_match(&losses, &want, 1e-4);
    assert_eq!(trainer.epoch(), 1);
    let late = late.lock().await;
    let late = late.as_ref().expect("a new peer took the stage");
    assert_eq!(late.joined.step, 2, "it loaded the checkpoint's state");
    assert_eq!(late.joined.worker.step(), Some(steps));
    // One entry per state load: the two first replicas' builds, the survivor's reload of the
    // checkpoint and the new peer's load (which it reports once, though the trainer also told
    // it to reload).
    let joins = joined.lock().unwrap().clone();
    let late_id = late.peer.peer_id();
    assert_eq!(
        joins.iter().filter(|p| **p == late_id).count(),
        1,
        "{joins:?}"
    );
    assert_eq!(
        metrics.state_sync_seconds.len(),
        4,
        "{:?}",
        metrics.state_sync_seconds
    );
    assert_eq!(replicas[0].joined.worker.step(), Some(steps));
    trainer.shutdown().await;
}

/// Stage 1 has 3 replicas; from step 1 on, the third one takes `SyncStart` without syncing
/// (it never sends its share) and crashes when the first share reaches it. The other two
/// exchange their shares, are stuck waiting for the third one's, and are reset when the trainer
/// notices the death: that round is redone with two participants.
/// `late_share`: the second replica holds the first one's share of step 1 until the reset is
/// done, so it arrives after its round was dropped (and before the new round's).
async fn stage_sync_redone_with_three_replicas(late_share: bool) -> swarm_core::trainer::Metrics {
    use swarm_core::peer::{PeerShared, RequestCtx};
    use swarm_core::protocol::{Ack, GradShare, SyncStart};
    use swarm_core::rpc::{self, RpcError, code};
    use swarm_core::wire::{self, kind};

    let steps = 3;
    let cfg = tiny_config(steps);
    let mut opts = fault_options(&cfg, 2);
    opts.attempt_timeout = Duration::from_secs(10);
    let mut trainer = Trainer::start(opts).await.unwrap();
    let replicas = Arc::new(start_replicas(trainer.addr(), &[0, 0, 1, 1, 1]).await);
    let victim = replicas.clone();
    let mut on_event = move |e: &TrainerEvent| {
        if let TrainerEvent::Step(r) = e
            && r.step == 0
        {
            let worker = victim[4].joined.worker.clone();
            victim[4].peer.register(
                kind::SYNC_START,
                move |_p: Arc<PeerShared>, ctx: RequestCtx, body: Vec<u8>| {
                    let worker = worker.clone();
                    async move {
                        let s: SyncStart = wire::decode_body(&body)?;
                        if s.step >= 1 {
                            return rpc::reply(&Ack);
                        }
                        worker.handle(kind::SYNC_START, ctx, body).await
                    }
                },
            );
            victim[4].peer.register(
                kind::GRAD_SHARE,
                |peer: Arc<PeerShared>, _ctx: RequestCtx, _body: Vec<u8>| async move {
                    peer.node().close();
                    Err(RpcError::refused(code::INTERNAL, "crashed"))
                },
            );
            if late_share {
                let first = victim[2].peer.peer_id();
                let worker = victim[3].joined.worker.clone();
                let reset = Arc::new(tokio::sync::Notify::new());
                let held = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let (w, r) = (worker.clone(), reset.clone());
                victim[3].peer.register(
                    kind::GRAD_SHARE,
                    move |_p: Arc<PeerShared>, ctx: RequestCtx, body: Vec<u8>| {
                        let (w, r, held) = (w.clone(), r.clone(), held.clone());
                        async move {
                            let g: GradShare = wire::decode_body(&body)?;
                            if g.step >= 1
                                && g.from == first
                                && !held.swap(true, std::sync::atomic::Ordering::SeqCst)
                            {
                                // Bounded: the reset follows the crash within seconds.
                                let _ = tokio::time::timeout(Duration::from_secs(60), r.notified())
                                    .await;
                            }
                            w.handle(kind::GRAD_SHARE, ctx, body).await
                        }
                    },
                );
                victim[3].peer.register(
                    kind::RELOAD,
                    move |_p: Arc<PeerShared>, ctx: RequestCtx, body: Vec<u8>| {
                        let (w, r) = (worker.clone(), reset.clone());
                        async move {
                            let out = w.handle(kind::RELOAD, ctx, body).await;
                            r.notify_one();
                            out
                        }
                    },
                );
            }
        }
    };
    let metrics = tokio::time::timeout(Duration::from_secs(90), trainer.run(&mut on_event))
        .await
        .expect("run finishes before the sync timeout could have fired")
        .expect("run succeeds");
    let losses: Vec<f64> = metrics.steps.iter().map(|s| s.loss).collect();
    let (want, _) = local_run(&cfg, steps as usize);
    assert_losses_match(&losses, &want, 1e-4);
    assert_eq!(metrics.peers_lost, 1, "{:?}", metrics.summary());
    assert_eq!(metrics.replica_hash_mismatches, 0);
    assert!(metrics.retries > 0, "stage 1 re-ran its micro-batches");
    assert_eq!(metrics.steps[0].participants, vec![2, 3]);
    assert_eq!(metrics.steps[1].participants, vec![2, 2]);
    let d2 = replicas[2].joined.worker.digest().await.unwrap();
    let d3 = replicas[3].joined.worker.digest().await.unwrap();
    assert_eq!(d2, d3);
    trainer.shutdown().await;
    metrics
}

/// The size of one share of stage `k` with codec none, and its fp32 size.
fn share_bytes(cfg: &swarm_model::RunConfig, k: u32) -> (u64, u64) {
    use swarm_compression::{Codec, Encoder};
    let n = swarm_core::stage::init_shard(cfg, k)
        .unwrap()
        .num_parameters();
    let mut frame = Vec::new();
    Encoder::new(Codec::NONE)
        .unwrap()
        .encode(&vec![0.0; n], &[n], &mut frame)
        .unwrap();
    (frame.len() as u64, 4 * n as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shares_of_a_redone_sync_round_count_as_wire_bytes() {
    let metrics = stage_sync_redone_with_three_replicas(false).await;
    assert_sync_bytes_count_the_dropped_round(&metrics);
}

/// A share of the dropped round reaching a replica after its reset is not taken into the new
/// round (it would sum an outdated gradient and disagree with the other replica).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_share_of_a_dropped_round_is_not_taken_into_the_new_one() {
    // The run matches the local run, with no mismatch (asserted in the helper).
    let metrics = stage_sync_redone_with_three_replicas(true).await;
    // The late share arrived, so it is counted, once.
    assert_sync_bytes_count_the_dropped_round(&metrics);
}

fn assert_sync_bytes_count_the_dropped_round(metrics: &swarm_core::trainer::Metrics) {
    let cfg = tiny_config(3);
    let share: Vec<(u64, u64)> = (0..2).map(|k| share_bytes(&cfg, k)).collect();
    // Every completed round: each participant's share to each other participant.
    let (mut wire, mut dense) = (0, 0);
    for r in &metrics.steps {
        for (k, &n) in r.participants.iter().enumerate() {
            let pairs = (n * n.saturating_sub(1)) as u64;
            wire += pairs * share[k].0;
            dense += pairs * share[k].1;
        }
    }
    // The dropped round of step 1 crossed too: the two survivors' shares to each other (those to
    // the dead replica never arrived).
    let sync = metrics.wire.sync;
    assert_eq!(
        (sync.wire_bytes, sync.dense_bytes),
        (wire + 2 * share[1].0, dense + 2 * share[1].1),
        "{sync:?}"
    );
}

/// A replica of stage 1 swallows the first Forward it gets (acknowledges it and does nothing):
/// the attempt fails by its deadline with no report. Two activation frames of it crossed the
/// network (the trainer's and stage 0's): both count, once, the second one reported by stage 0
/// after the trainer abandoned the attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_of_an_attempt_failed_by_deadline_count_as_wire_bytes() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use swarm_compression::{Codec, Encoder};
    use swarm_core::peer::{PeerShared, RequestCtx};
    use swarm_core::protocol::Ack;
    use swarm_core::rpc;
    use swarm_core::wire::kind;

    let steps = 2;
    let cfg = tiny_config(steps);
    let mut opts = fault_options(&cfg, 2);
    // The swallowed attempt waits this out (the run's only wait on a deadline).
    opts.attempt_timeout = Duration::from_secs(3);
    let mut trainer = Trainer::start(opts).await.unwrap();
    let replicas = start_replicas(trainer.addr(), &[0, 0, 1, 1]).await;
    let worker = replicas[2].joined.worker.clone();
    let swallowed = Arc::new(AtomicBool::new(false));
    replicas[2].peer.register(
        kind::FORWARD,
        move |_p: Arc<PeerShared>, ctx: RequestCtx, body: Vec<u8>| {
            let (worker, swallowed) = (worker.clone(), swallowed.clone());
            async move {
                if !swallowed.swap(true, Ordering::SeqCst) {
                    return rpc::reply(&Ack);
                }
                worker.handle(kind::FORWARD, ctx, body).await
            }
        },
    );
    let metrics = tokio::time::timeout(Duration::from_secs(120), trainer.run(&mut |_| {}))
        .await
        .expect("run finishes in time")
        .expect("run succeeds");
    let losses: Vec<f64> = metrics.steps.iter().map(|s| s.loss).collect();
    let (want, _) = local_run(&cfg, steps as usize);
    assert_losses_match(&losses, &want, 1e-4);
    assert_eq!(metrics.retries, 1, "{:?}", metrics.summary());
    // Codec none: every boundary frame (activations or their gradients) has one size.
    let shape = [
        cfg.train.micro_batch_size,
        cfg.train.seq_len,
        cfg.model.hidden_size,
    ];
    let n: usize = shape.iter().product();
    let mut frame = Vec::new();
    Encoder::new(Codec::NONE)
        .unwrap()
        .encode(&vec![0.0; n], &shape, &mut frame)
        .unwrap();
    let (f, d) = (frame.len() as u64, 4 * n as u64);
    // A completed attempt: trainer -> stage 0 -> stage 1 -> trainer, both ways.
    let frames = 3 * steps * cfg.train.micro_batches as u64;
    let w = metrics.wire;
    assert_eq!(
        (w.activations.wire_bytes, w.activations.dense_bytes),
        ((frames + 2) * f, (frames + 2) * d),
        "{w:?}"
    );
    assert_eq!(
        (w.gradients.wire_bytes, w.gradients.dense_bytes),
        (frames * f, frames * d),
        "{w:?}"
    );
    drop(replicas);
    trainer.shutdown().await;
}
