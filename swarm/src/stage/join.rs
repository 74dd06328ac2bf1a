//! Joining a run (choose a stage, be admitted, load the state, say ready) and leaving it.

use super::*;

/// Admission attempts of [`join_run`] (each waits up to the trainer's step-boundary wait), with
/// [`ADMIT_RETRY`] between them: about a minute in all, so that a joiner outlasts a restore of
/// every stage from a checkpoint on a loaded machine (30 x 250 ms once ran out in a test under
/// load average 11, leaving the restored stage without a replica).
const ADMIT_TRIES: u32 = 120;
/// Pause between admission attempts.
const ADMIT_RETRY: Duration = Duration::from_millis(500);

/// What [`join_run`] did.
#[derive(Debug)]
pub struct Joined {
    /// The stage worker, serving.
    pub worker: StageWorker,
    /// The run as the trainer described it.
    pub info: RunInfo,
    /// Time to fetch (or build) the stage's state.
    pub sync_time: Duration,
    /// The step of the state it loaded.
    pub step: u64,
}

/// The stage a joining peer should serve given the run's occupancy: the router's stage choice
/// over a view where every current replica counts with equal capacity.
pub fn choose_stage(info: &RunInfo, config: &RunConfig) -> Result<u32> {
    use swarm_router::{Coord, Link, PeerInfo, PeerKey, PeerState as RState, SwarmView, Workload};
    let num_stages = config.stages.len().saturating_sub(1) as u16;
    let workload = Workload {
        tokens: (config.train.micro_batch_size * config.train.seq_len) as u32,
        hidden: config.model.hidden_size as u32,
        codec_ratio: 1.0,
    };
    let mut view = SwarmView::new(num_stages, workload)?;
    for (s, reps) in info.replicas.iter().enumerate() {
        for p in reps {
            let pi = PeerInfo {
                stages: s as u16..s as u16 + 1,
                compute_tokens_per_s: 10_000.0,
                link: Link {
                    up_bytes_per_s: 1e7,
                    down_bytes_per_s: 1e7,
                    coord: Coord::default(),
                },
                state: RState::Serving,
            };
            // A peer listed twice (serving two stages) keeps its first entry.
            let _ = view.insert(PeerKey(p.0), pi, 0);
        }
    }
    Ok(swarm_router::choose_stages(&view, 1, None)?.start as u32)
}

/// Joins the run served by the trainer at `trainer`: RunInfo (checked against the run id),
/// stage choice (`stage` or [`choose_stage`]), admission, state (built or fetched and verified),
/// then the worker serves and the trainer is told `Ready`.
pub async fn join_run(
    peer: &Peer,
    trainer: SocketAddr,
    stage: Option<u32>,
    tweak: impl FnOnce(&mut StageOptions),
) -> Result<Joined> {
    join_run_within(peer, trainer, stage, None, tweak).await
}

/// [`join_run`] for a peer with `memory` bytes to spare: the stage must fit
/// ([`crate::stage_fit::fitting_stage`]), or joining fails with what each stage needs.
pub async fn join_run_within(
    peer: &Peer,
    trainer: SocketAddr,
    stage: Option<u32>,
    memory: Option<u64>,
    tweak: impl FnOnce(&mut StageOptions),
) -> Result<Joined> {
    let shared = peer.shared();
    let (tid, info): (PeerId, RunInfo) = shared.call(trainer, None, &RunInfoRequest).await?;
    let h = blake3::hash(info.config_toml.as_bytes());
    if h.as_bytes()[..16] != info.run.0 || info.run != peer.run_id() {
        return Err(Error::RunMismatch);
    }
    let config = RunConfig::from_toml(&info.config_toml)?;
    let replicas: Vec<usize> = info.replicas.iter().map(Vec::len).collect();
    let stage = crate::stage_fit::fitting_stage(
        &config,
        &replicas,
        stage,
        || choose_stage(&info, &config),
        memory,
    )?;
    let mut opts = StageOptions::new(info.run, config, stage);
    tweak(&mut opts);
    let worker = StageWorker::start(peer, opts.clone(), None)?;
    let addr = peer
        .local_record()
        .info
        .addrs
        .first()
        .copied()
        .unwrap_or(peer.local_addr());
    // Admission waits for a step boundary; a long step (or a restore in a new epoch) makes the
    // trainer answer BUSY or refuse the old epoch: ask again, boundedly.
    let mut epoch = info.epoch;
    let mut tries = 0;
    let (reply, shard, sync_time) = loop {
        let admit = Admit {
            run: info.run,
            epoch,
            stage,
            addr,
            throughput: 0.0,
        };
        match shared
            .call::<Admit, AdmitReply>(trainer, Some(tid), &admit)
            .await
            .map_err(Error::from)
        {
            Ok((_, reply)) => {
                let t0 = Instant::now();
                match load_state(shared, &opts, reply.epoch, reply.step, &reply.source).await {
                    Ok(shard) => break (reply, shard, t0.elapsed()),
                    // The stage may have no holder left (its last replica died): the trainer
                    // restores the run and serves the state itself; ask again.
                    Err(e) if tries < ADMIT_TRIES => {
                        tracing::info!(error = %e, "state not loaded; asking again");
                        tries += 1;
                        tokio::time::sleep(ADMIT_RETRY).await;
                        let (_, now): (PeerId, RunInfo) =
                            shared.call(trainer, Some(tid), &RunInfoRequest).await?;
                        epoch = now.epoch;
                    }
                    Err(e) => return Err(e),
                }
            }
            // FORBIDDEN is final (a peer banned by an audit); the rest may pass later.
            Err(Error::Remote(r)) if tries < ADMIT_TRIES && r.code != code::FORBIDDEN => {
                tracing::info!(code = r.code, message = %r.message, "admission refused; asking again");
                tries += 1;
                tokio::time::sleep(ADMIT_RETRY).await;
                let (_, now): (PeerId, RunInfo) =
                    shared.call(trainer, Some(tid), &RunInfoRequest).await?;
                epoch = now.epoch;
            }
            Err(e) => return Err(e),
        }
    };
    let digest = shard.weights_digest()?;
    worker.install(shard, reply.epoch)?;
    peer.update_local(|r| r.stages = vec![stage]);
    let ready = Ready {
        run: info.run,
        epoch: reply.epoch,
        stage,
        step: reply.step,
        digest,
        sync_ms: sync_time.as_millis() as u64,
    };
    shared
        .call::<Ready, Ack>(trainer, Some(tid), &ready)
        .await?;
    tracing::info!(
        stage,
        step = reply.step,
        sync_ms = sync_time.as_millis() as u64,
        "joined the run"
    );
    Ok(Joined {
        worker,
        info,
        sync_time,
        step: reply.step,
    })
}

/// Finds the trainer of the run: the first of `candidates` (the bootstrap first, then peers from
/// the view) that answers [`RunInfoRequest`]. `None` when nobody does (a swarm without a run).
pub async fn find_trainer(peer: &Peer, bootstrap: Option<SocketAddr>) -> Option<SocketAddr> {
    let mut candidates: Vec<SocketAddr> = bootstrap.into_iter().collect();
    for e in peer.status().entries.iter().skip(1) {
        for a in &e.record.info.addrs {
            if !candidates.contains(a) {
                candidates.push(*a);
            }
        }
    }
    // Bounded: a handful of candidates, each within the peer's RPC timeout.
    for addr in candidates.into_iter().take(16) {
        match peer
            .shared()
            .call::<RunInfoRequest, RunInfo>(addr, None, &RunInfoRequest)
            .await
        {
            Ok(_) => return Some(addr),
            Err(e) => tracing::debug!(%addr, error = %e, "no run info there"),
        }
    }
    None
}

impl StageWorker {
    /// Graceful leave: tells the trainer, which stops routing new work here, then keeps serving
    /// (in-flight micro-batches, this step's sync and `Apply`, a state hand-off if this is the
    /// stage's last replica) until the trainer releases it at a step boundary (it no longer lists
    /// this peer in `RunInfo`) or `max_wait` passes. Returns whether it was released.
    pub async fn leave(&self, trainer: SocketAddr, max_wait: Duration) -> Result<bool> {
        let msg = crate::protocol::Leave {
            run: self.inner.opts.run,
            epoch: self.epoch(),
        };
        let (tid, reply): (PeerId, crate::protocol::LeaveReply) =
            self.inner.peer.call(trainer, None, &msg).await?;
        if reply.stay_for_step.is_none() {
            return Ok(true);
        }
        let deadline = Instant::now() + max_wait;
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            match self
                .inner
                .peer
                .call::<RunInfoRequest, RunInfo>(trainer, Some(tid), &RunInfoRequest)
                .await
            {
                Ok((_, info)) if !info.replicas.iter().flatten().any(|p| *p == self.inner.me) => {
                    return Ok(true);
                }
                Ok(_) => {}
                // The trainer is gone: nothing is left to hand over.
                Err(e) => {
                    tracing::warn!(error = %e, "trainer unreachable while leaving");
                    return Ok(false);
                }
            }
        }
        Ok(false)
    }
}
