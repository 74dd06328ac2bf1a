//! One step's micro-batch phase: dispatch along routes, returned outputs, failures and retries,
//! exactly-once counting, then the audits.

use super::*;
use crate::compute::{self, Expect};

impl Trainer {
    /// One optimizer step: every micro-batch counted exactly once, then the replica sync.
    /// `None`: the step was abandoned because a stage lost its last replica (see `restore`).
    pub(super) async fn run_step(
        &mut self,
        on_event: &mut dyn FnMut(&TrainerEvent),
    ) -> Result<Option<StepReport>> {
        let started = Instant::now();
        let (step, epoch) = self.shared.reg(|r| {
            r.in_step = true;
            r.phase = RunPhase::Running;
            (r.step, r.epoch)
        });
        let stages = self.num_stages();
        let m = self.cfg().train.micro_batches;
        let mut book = StepBook::new(stages as u16, m);
        let mut queue: VecDeque<usize> = (0..m).collect();
        let mut inflight: HashMap<usize, InFlight> = HashMap::new();
        let max_in_flight = if self.opts.max_in_flight == 0 {
            2 * stages
        } else {
            self.opts.max_in_flight
        };
        let mut pending_sync: Vec<usize> = (0..stages).collect();
        let mut norms: HashMap<usize, f64> = HashMap::new();
        let mut mismatches = 0u64;
        let mut participants_per_stage = vec![0usize; stages];
        // Sync rounds per stage in this step: bumped when a stage's sync is redone.
        let mut sync_rounds = vec![0u32; stages];

        loop {
            // Micro-batch phase.
            while !book.all_complete() {
                while inflight.len() < max_in_flight
                    && let Some(mb) = queue.pop_front()
                {
                    if book.is_complete(mb) || inflight.contains_key(&mb) {
                        continue;
                    }
                    match self.dispatch(step, epoch, mb, &mut book).await {
                        Ok(f) => {
                            inflight.insert(mb, f);
                        }
                        Err(Error::Router(e)) => {
                            if self.restore_pending {
                                return Ok(self.abandon_step(&mut inflight));
                            }
                            // No routable replica for some stage: wait for one (pauses the run).
                            tracing::warn!(error = %e, "cannot route; waiting for replicas");
                            queue.push_front(mb);
                            self.wait_for_replicas(1, on_event).await?;
                            break;
                        }
                        Err(e) => return Err(e),
                    }
                }
                let next_deadline = inflight.values().map(|f| f.deadline).min();
                let wait = next_deadline
                    .map(|d| d.saturating_duration_since(Instant::now()))
                    .unwrap_or(Duration::from_millis(200))
                    .max(Duration::from_millis(1));
                let msg = match tokio::time::timeout(wait, self.inbox.recv()).await {
                    Ok(Some(msg)) => Some(msg),
                    Ok(None) => return Err(run_err("trainer inbox closed")),
                    Err(_) => None,
                };
                let mut failed: Vec<(usize, Option<PeerId>, bool)> = Vec::new();
                let mut lost_mbs: Vec<usize> = Vec::new();
                match msg {
                    None => {}
                    Some(Inbound::ForwardOut(from, out)) => {
                        let mb = out.key.mb as usize;
                        // Only the route's last replica may deliver the output.
                        if out.key.step == step
                            && let Some(f) = inflight.get_mut(&mb)
                            && f.key == out.key
                            && f.route.last().map(|h| h.peer) == Some(from)
                            && f.sent_grad.is_none()
                        {
                            let stage = f.route.last().map_or(0, |h| h.stage);
                            if let Err(why) = Receipt::check_received(
                                out.receipt.as_ref(),
                                &from,
                                &out.run,
                                out.epoch,
                                out.key,
                                stage,
                                Pass::Forward,
                                &out.activations,
                            ) {
                                tracing::warn!(peer = %from.short(), why, mb, "bad receipt with the forward output");
                                failed.push((mb, Some(from), false));
                            } else if let Err(e) = self.on_forward_out(&mut book, f, &out).await {
                                tracing::warn!(error = %e, mb, "bad forward output");
                                let last = f.route.last().map(|h| h.peer);
                                failed.push((mb, last, false));
                            }
                        }
                    }
                    Some(Inbound::BackwardOut(from, out)) => {
                        let mb = out.key.mb as usize;
                        if out.key.step == step
                            && let Some(f) = inflight.get_mut(&mb)
                            && f.key == out.key
                            && f.route.first().map(|h| h.peer) == Some(from)
                            && !f.returned
                        {
                            if let Err(why) = Receipt::check_received(
                                out.receipt.as_ref(),
                                &from,
                                &out.run,
                                out.epoch,
                                out.key,
                                0,
                                Pass::Backward,
                                &out.grad,
                            ) {
                                tracing::warn!(peer = %from.short(), why, mb, "bad receipt with the input gradient");
                                failed.push((mb, Some(from), false));
                            } else {
                                self.audit.got_backward(out.key, &out.grad);
                                let res = on_backward_out(
                                    &self.ends,
                                    &self.limits,
                                    f,
                                    &out,
                                    &mut self.metrics,
                                )
                                .await;
                                match res {
                                    Ok(()) => {
                                        f.returned = true;
                                        if f.embedding {
                                            book.count(
                                                mb,
                                                f.key.attempt,
                                                Column::Embedding,
                                                Holder::Trainer,
                                            );
                                        }
                                    }
                                    Err(e) => {
                                        tracing::warn!(error = %e, mb, "bad input gradient");
                                        failed.push((mb, f.route.first().map(|h| h.peer), false));
                                    }
                                }
                            }
                        }
                    }
                    Some(Inbound::Counted(from, c)) if c.key.step == step => {
                        let out = book.count(
                            c.key.mb as usize,
                            c.key.attempt,
                            Column::Stage(c.stage as u16),
                            Holder::Peer(from),
                        );
                        if out == CountOutcome::Tainted {
                            tracing::warn!(peer = %from.short(), mb = c.key.mb, attempt = c.key.attempt, "unexpected count: replica excluded from this step");
                            lost_mbs.extend(book.exclude(from));
                        }
                    }
                    Some(Inbound::Counted(..)) => {}
                    Some(Inbound::HopFailed(from, h)) => {
                        let mb = h.key.mb as usize;
                        let on_route = inflight
                            .get(&mb)
                            .is_some_and(|f| f.route.iter().any(|x| x.peer == from));
                        if h.key.step == step && book.is_current(mb, h.key.attempt) && on_route {
                            // What the failed pass had sent, less our own frame (counted when
                            // sent): the backward pass if it had begun, else the forward one.
                            if let Some(f) = inflight.get_mut(&mb) {
                                f.reported = true;
                                let (channel, ours) = match f.sent_grad {
                                    Some(g) => (Channel::Gradients, g),
                                    None => (Channel::Activations, f.sent_act),
                                };
                                self.metrics.wire.channel_mut(channel).add(
                                    h.traffic.wire.saturating_sub(ours.wire),
                                    h.traffic.dense.saturating_sub(ours.dense),
                                );
                            }
                            failed.push((mb, Some(h.failed), h.busy));
                        }
                    }
                    Some(Inbound::SendFailed { key, peer, busy }) => {
                        let mb = key.mb as usize;
                        if key.step == step && book.is_current(mb, key.attempt) {
                            failed.push((mb, Some(peer), busy));
                        }
                    }
                    Some(Inbound::Leave(p)) => {
                        // No new work; what it holds finishes, it syncs, and it is released at
                        // the boundary.
                        self.retire_from_view(p);
                    }
                    Some(Inbound::Down(p)) => {
                        lost_mbs.extend(self.lose_peer(p, Some(&mut book), on_event));
                        for (mb, f) in &inflight {
                            if f.route.iter().any(|h| h.peer == p) {
                                failed.push((*mb, Some(p), false));
                            }
                        }
                    }
                    Some(Inbound::Ready(from, r)) => self.on_ready(from, r, on_event),
                    Some(Inbound::SyncDone(from, d)) => {
                        self.count_sync_report(&d);
                        tracing::debug!(peer = %from.short(), step = d.step, "sync report outside a sync ignored");
                    }
                }
                if self.restore_pending {
                    return Ok(self.abandon_step(&mut inflight));
                }
                // Deadlines.
                let now = Instant::now();
                for (mb, f) in &inflight {
                    if f.deadline <= now {
                        failed.push((*mb, None, false));
                    }
                }
                for (mb, who, busy) in failed {
                    if let Some(f) = inflight.remove(&mb) {
                        self.fail_attempt(f, who, busy);
                        queue.push_front(mb);
                    }
                }
                for mb in lost_mbs {
                    if !inflight.contains_key(&mb) && !queue.contains(&mb) {
                        queue.push_back(mb);
                    }
                }
                // Finished attempts.
                let done: Vec<usize> = inflight
                    .iter()
                    .filter(|(mb, f)| f.returned && book.is_complete(**mb))
                    .map(|(mb, _)| *mb)
                    .collect();
                for mb in done {
                    if let Some(f) = inflight.remove(&mb) {
                        for hop in &f.plan.hops {
                            self.view.add_load(&hop.peer, -1);
                            let _ = self.view.report(
                                &hop.peer,
                                router::Outcome::Success,
                                now_ms(),
                                &router::HealthConfig::default(),
                            );
                        }
                    }
                }
                // An attempt that came back but whose counts were lost (a replica died after
                // counting) must run again for the missing columns.
                let stale: Vec<usize> = inflight
                    .iter()
                    .filter(|(mb, f)| f.returned && !book.is_complete(**mb))
                    .filter(|(_, f)| f.deadline <= Instant::now() + self.opts.attempt_timeout / 2)
                    .map(|(mb, _)| *mb)
                    .collect();
                for mb in stale {
                    if let Some(f) = inflight.remove(&mb) {
                        self.release(&f);
                        queue.push_back(mb);
                    }
                }
            }
            // Attempts still in flight are complete (their late messages are ignored).
            for (_, f) in inflight.drain() {
                self.release(&f);
            }

            // A replica that died after counting must not be asked to sync: probe them all
            // first (a crash during the sync itself is handled below, at a higher cost).
            let dead = self.probe_replicas(&pending_sync).await;
            if !dead.is_empty() {
                for p in dead {
                    for mb in self.lose_peer(p, Some(&mut book), on_event) {
                        if !queue.contains(&mb) {
                            queue.push_back(mb);
                        }
                    }
                }
                if !book.all_complete() {
                    continue;
                }
            }

            // Audits (issue #7), before any stage syncs: replicas still hold the step's weights,
            // receipts and frames. A ban discards the step's gradients everywhere (they may hold
            // the cheater's outputs) and re-runs the step on honest replicas.
            if pending_sync.len() == stages {
                let bans = self.audit_step(step, epoch, &book).await;
                if !bans.is_empty() {
                    for b in &bans {
                        self.observer.ban(&b.peer, b.stage, &b.reason, step);
                        self.shared.reg(|r| r.banned.insert(b.peer));
                        self.lose_peer(b.peer, Some(&mut book), on_event);
                    }
                    for k in 0..stages {
                        self.reset_stage(k, step).await;
                    }
                    let ends = self.ends.clone();
                    tokio::task::spawn_blocking(move || {
                        ends.lock().unwrap_or_else(|e| e.into_inner()).zero_grads()
                    })
                    .await
                    .map_err(|e| run_err(e.to_string()))?;
                    self.metrics.retries += book.retries();
                    book = StepBook::new(stages as u16, m);
                    queue = (0..m).collect();
                    continue;
                }
            }

            if self.restore_pending {
                return Ok(self.abandon_step(&mut inflight));
            }
            // Sync phase, for the stages not yet synced.
            let outcome = self
                .sync_stages(step, epoch, &book, &pending_sync, &sync_rounds, on_event)
                .await?;
            for (k, n, parts) in outcome.done {
                norms.insert(k, n);
                participants_per_stage[k] = parts;
                // Its replicas hold the summed gradient: losing one now costs no count.
                book.freeze_stage(k as u16);
            }
            mismatches += outcome.norm_mismatches;
            let mut lost_mbs = Vec::new();
            for p in &outcome.failed_peers {
                lost_mbs.extend(self.lose_peer(*p, Some(&mut book), on_event));
            }
            pending_sync = (0..stages).filter(|k| !norms.contains_key(k)).collect();
            if pending_sync.is_empty() {
                break;
            }
            // A replica died during the sync of these stages: the survivors are stuck in that
            // sync with their accumulators. Reset them to the step's starting state (which they
            // still hold: nobody applied) and run every micro-batch again for those stages.
            for &k in &pending_sync {
                sync_rounds[k] += 1;
                self.reset_stage(k, step).await;
                lost_mbs.extend(book.clear_stage(k as u16));
            }
            for mb in lost_mbs {
                if !queue.contains(&mb) {
                    queue.push_back(mb);
                }
            }
            tracing::warn!(stages = ?pending_sync, "sync failed; re-running lost micro-batches");
        }

        // Global norm, clip, learning rate, optimizer everywhere.
        let ends_norm = {
            let ends = self.ends.clone();
            tokio::task::spawn_blocking(move || {
                ends.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .grad_sq_norm()
            })
            .await
            .map_err(|e| run_err(e.to_string()))??
        };
        let total: f64 = (0..stages).map(|k| norms[&k]).sum::<f64>() + ends_norm;
        let cfg = self.cfg().clone();
        let scale = clip_scale(total, cfg.train.grad_clip);
        let lr = cfg.schedule().at(step);
        let hp = cfg.adamw();
        {
            let ends = self.ends.clone();
            tokio::task::spawn_blocking(move || -> Result<()> {
                let mut e = ends.lock().unwrap_or_else(|e| e.into_inner());
                e.optimizer_step(&hp, lr, scale)?;
                e.zero_grads();
                Ok(())
            })
            .await
            .map_err(|e| run_err(e.to_string()))??;
        }
        mismatches += self
            .apply_all(step, epoch, &book, lr, scale, on_event)
            .await?;
        let attempts: Vec<Option<u32>> = (0..m).map(|mb| book.current_attempt(mb)).collect();
        self.audit.end_step(step, &attempts, &cfg);
        self.metrics.audit = self.audit.stats.clone();
        self.metrics.replica_hash_mismatches += mismatches;
        self.metrics.retries += book.retries();
        let tokens = cfg.tokens_per_step() as u64;
        self.metrics.tokens += tokens;
        self.shared.reg(|r| {
            r.step = step + 1;
            r.in_step = false;
            r.fresh = false;
            r.served.retain(|_, s| s.step == step + 1);
        });
        self.shared.boundary.send_replace(step + 1);
        self.release_leavers(on_event).await;
        let loss = book
            .mean_loss()
            .ok_or_else(|| run_err("step finished without every loss"))?;
        Ok(Some(StepReport {
            step,
            loss,
            lr,
            grad_norm: total.sqrt(),
            tokens,
            seconds: started.elapsed().as_secs_f64(),
            retries: book.retries(),
            hash_mismatches: mismatches,
            participants: participants_per_stage,
            wire_bytes: self.metrics.wire.tensor_wire_bytes(),
            dense_bytes: self.metrics.wire.tensor_dense_bytes(),
            wire: self.metrics.wire,
        }))
    }

    /// Runs the step's audits (see `audit.rs`); returns the bans.
    pub(super) async fn audit_step(
        &mut self,
        step: u64,
        epoch: u32,
        book: &StepBook,
    ) -> Vec<crate::trainer::audit::Ban> {
        let stages = self.num_stages();
        let replicas = (0..stages)
            .map(|k| {
                let mut v = self.serving(k);
                v.retain(|(p, _)| !book.is_excluded(p));
                v
            })
            .collect();
        let ps = self.peer.shared().clone();
        let config = self.opts.config.clone();
        let view = crate::trainer::audit::StepView {
            run: self.shared.run,
            epoch,
            step,
            config: &config,
            attempts: (0..book.micro_batches())
                .map(|mb| book.current_attempt(mb))
                .collect(),
            replicas,
            digests: self.shared.reg(|r| r.digests.clone()),
            peer: &ps,
        };
        self.audit.audit_step(&view).await
    }

    /// Audit counters so far.
    pub fn audit_stats(&self) -> &crate::trainer::audit::AuditStats {
        &self.audit.stats
    }

    /// Starts an attempt of micro-batch `mb`: plan, embedding forward, Forward to stage 0.
    pub(super) async fn dispatch(
        &mut self,
        step: u64,
        epoch: u32,
        mb: usize,
        book: &mut StepBook,
    ) -> Result<InFlight> {
        let cfg = self.cfg().clone();
        let stages = self.num_stages();
        let req = router::PlanRequest {
            workload: *self.view.workload(),
            client: default_link(),
        };
        let plan = router::plan(
            &self.view,
            &req,
            now_ms(),
            &router::PlanConfig::default(),
            &mut self.rng,
        )?;
        let mut route = Vec::with_capacity(stages);
        for hop in &plan.hops {
            let peer = PeerId(hop.peer.0);
            let addr = self
                .shared
                .reg(|r| r.stages[hop.stage as usize].get(&peer).map(|x| x.addr))
                .ok_or_else(|| {
                    run_err(format!("planned peer {} is not a replica", peer.short()))
                })?;
            route.push(Hop {
                stage: hop.stage as u32,
                peer,
                addr,
            });
        }
        if route.len() != stages {
            return Err(run_err("plan does not cover every stage"));
        }
        self.view.note_dispatched(&plan);
        for h in &route {
            self.metrics
                .peers
                .entry(h.peer.to_string())
                .or_insert_with(|| crate::trainer::metrics::PeerWork {
                    peer: h.peer.to_string(),
                    stage: h.stage,
                    ..Default::default()
                })
                .micro_batches += 1;
        }
        let peers: Vec<PeerId> = route.iter().map(|h| h.peer).collect();
        let att = book.start_attempt(mb, &peers);
        let key = MbKey {
            step,
            mb: mb as u32,
            attempt: att.attempt,
        };
        let batch = self.corpus.train_batch(
            cfg.seed,
            step,
            mb as u64,
            cfg.train.micro_batch_size,
            cfg.train.seq_len,
        )?;
        let ends = self.ends.clone();
        let codec = self.act_codec;
        let inputs = batch.inputs.clone();
        let (bsz, seq) = (batch.batch_size, batch.seq_len);
        let (ctx, frame, dense) = tokio::task::spawn_blocking(move || -> Result<_> {
            let e = ends.lock().unwrap_or_else(|e| e.into_inner());
            let (x, ctx) = e.embed_forward(&inputs, bsz, seq)?;
            drop(e);
            let (frame, n) = compute::encode(codec, &x)?;
            let dense = 4 * n as u64;
            Ok((ctx, frame, dense))
        })
        .await
        .map_err(|e| run_err(e.to_string()))??;
        // Our frame crosses the network whatever happens to the attempt: count it now.
        let sent_act = Traffic {
            wire: frame.len() as u64,
            dense,
        };
        self.metrics
            .wire
            .channel_mut(Channel::Activations)
            .add(sent_act.wire, sent_act.dense);
        self.audit.sent_forward(key, &route, &frame);
        let msg = Forward {
            run: self.shared.run,
            epoch,
            key,
            route: route.clone(),
            hop: 0,
            trainer: self.shared.endpoint,
            accumulate: att.stage_mask,
            upstream: Traffic::default(),
            activations: frame,
            receipt: None,
        };
        self.send::<Forward>(route[0].addr, route[0].peer, key, msg);
        let timeout = self.opts.attempt_timeout.max(Duration::from_secs_f64(
            (4.0 * plan.expected_s).min(3600.0_f64),
        ));
        Ok(InFlight {
            key,
            route,
            plan,
            embed_ctx: att.embedding.then_some(ctx),
            targets: batch.targets,
            embedding: att.embedding,
            head: att.head,
            deadline: Instant::now() + timeout,
            returned: false,
            sent_act,
            sent_grad: None,
            reported: false,
        })
    }

    /// Sends a pipeline message in the background; a failure comes back as `SendFailed`.
    pub(super) fn send<M: wire::WireMessage + Send + Sync + 'static>(
        &self,
        addr: SocketAddr,
        peer: PeerId,
        key: MbKey,
        msg: M,
    ) {
        let ps = self.peer.shared().clone();
        let tx = self.shared.inbox.clone();
        tokio::spawn(async move {
            if let Err(e) = ps
                .call::<M, Ack>(addr, Some(peer), &msg)
                .await
                .map_err(Error::from)
            {
                let busy = matches!(&e, Error::Remote(r) if r.code == code::BUSY);
                tracing::debug!(peer = %peer.short(), error = %e, busy, "pipeline send failed");
                let _ = tx.send(Inbound::SendFailed { key, peer, busy });
            }
        });
    }

    /// The last stage's output: loss, head backward, gradient to the last stage.
    pub(super) async fn on_forward_out(
        &mut self,
        book: &mut StepBook,
        f: &mut InFlight,
        out: &ForwardOut,
    ) -> Result<()> {
        let ends = self.ends.clone();
        let limits = self.limits;
        let frame = out.activations.clone();
        let targets = f.targets.clone();
        let accumulate = f.head;
        let scale = 1.0 / self.cfg().train.micro_batches as f64;
        let codec = self.grad_codec;
        let (bsz, seq, hidden) = (
            self.cfg().train.micro_batch_size,
            self.cfg().train.seq_len,
            self.cfg().model.hidden_size,
        );
        let (loss, grad, dense) = tokio::task::spawn_blocking(move || -> Result<_> {
            let dims = [bsz, seq, hidden];
            let (x, _) =
                compute::decode(&mut Decoder::new(), &frame, &limits, Expect::Dims(&dims))?;
            let mut e = ends.lock().unwrap_or_else(|e| e.into_inner());
            let (loss, ctx) = e.head_forward(&x, &targets)?;
            let grad = if accumulate {
                e.head_backward(ctx, scale)?
            } else {
                // The head already counted this micro-batch: compute the input gradient only.
                let saved = e.grads_flat()?;
                let g = e.head_backward(ctx, scale)?;
                e.set_grads_flat(&saved)?;
                g
            };
            drop(e);
            let (frame, n) = compute::encode(codec, &grad)?;
            let dense = 4 * n as u64;
            Ok((loss, frame, dense))
        })
        .await
        .map_err(|e| run_err(e.to_string()))??;
        // The rest of the forward pass (every hop's frame but our first, counted when sent) and
        // the gradient we send now; the rest of the backward pass comes with BackwardOut.
        self.metrics.wire.channel_mut(Channel::Activations).add(
            (out.upstream.wire + out.activations.len() as u64).saturating_sub(f.sent_act.wire),
            (out.upstream.dense + dense).saturating_sub(f.sent_act.dense),
        );
        let sent_grad = Traffic {
            wire: grad.len() as u64,
            dense,
        };
        self.metrics
            .wire
            .channel_mut(Channel::Gradients)
            .add(sent_grad.wire, sent_grad.dense);
        f.sent_grad = Some(sent_grad);
        if accumulate {
            book.count(
                f.key.mb as usize,
                f.key.attempt,
                Column::Head,
                Holder::Trainer,
            );
            book.set_loss(f.key.mb as usize, loss);
        }
        self.audit.got_forward(f.key, &out.activations);
        self.audit.sent_backward(f.key, &grad);
        let last = *f.route.last().expect("non-empty route");
        let msg = Backward {
            run: self.shared.run,
            epoch: out.epoch,
            key: f.key,
            stage: last.stage,
            upstream: Traffic::default(),
            grad,
            receipt: None,
        };
        self.send::<Backward>(last.addr, last.peer, f.key, msg);
        Ok(())
    }

    /// Gives up on an attempt: health report, Abandon to its route, load released.
    pub(super) fn fail_attempt(&mut self, f: InFlight, who: Option<PeerId>, busy: bool) {
        let now = now_ms();
        let health = router::HealthConfig::default();
        match who {
            Some(p) if !busy => {
                let _ = self
                    .view
                    .report(&key_of(&p), router::Outcome::Failure, now, &health);
            }
            Some(_) => {}
            None => {
                // A deadline: we do not know which hop stalled; suspect them all mildly.
                for h in &f.route {
                    let _ =
                        self.view
                            .report(&key_of(&h.peer), router::Outcome::Timeout, now, &health);
                }
            }
        }
        tracing::info!(mb = f.key.mb, attempt = f.key.attempt, who = ?who.map(|p| p.short()), busy, "micro-batch attempt failed; retrying");
        self.release(&f);
    }

    /// Releases an attempt's router load and asks its route to drop the contexts.
    pub(super) fn release(&mut self, f: &InFlight) {
        for hop in &f.plan.hops {
            self.view.add_load(&hop.peer, -1);
        }
        if f.returned {
            return;
        }
        let epoch = self.shared.reg(|r| r.epoch);
        // The pass no message told us about (a deadline, a dead hop): its hops report the frames
        // they sent in it with their next SyncDone.
        let uncounted = match (f.reported, f.sent_grad) {
            (true, _) => 0,
            (false, None) => Abandon::FORWARD,
            (false, Some(_)) => Abandon::BACKWARD,
        };
        for h in &f.route {
            let ps = self.peer.shared().clone();
            let msg = Abandon {
                run: self.shared.run,
                epoch,
                key: f.key,
                uncounted,
            };
            let (addr, peer) = (h.addr, h.peer);
            tokio::spawn(async move {
                let _ = ps.call::<Abandon, Ack>(addr, Some(peer), &msg).await;
            });
        }
    }
}

/// Embedding backward for a returned attempt (accumulating if the embedding has not counted).
pub(super) async fn on_backward_out(
    ends: &Arc<Mutex<Shard>>,
    limits: &Limits,
    f: &mut InFlight,
    out: &BackwardOut,
    metrics: &mut Metrics,
) -> Result<()> {
    let info = swarm_compression::frame::FrameInfo::read(&out.grad, limits)?;
    // The backward pass: every earlier hop and this frame, but our own Backward's frame (in
    // `upstream` too), counted when sent.
    let ours = f.sent_grad.unwrap_or_default();
    metrics.wire.channel_mut(Channel::Gradients).add(
        (out.upstream.wire + out.grad.len() as u64).saturating_sub(ours.wire),
        (out.upstream.dense + info.elements as u64 * 4).saturating_sub(ours.dense),
    );
    if !f.embedding {
        return Ok(());
    }
    let Some(ctx) = f.embed_ctx.take() else {
        return Err(run_err("embedding context already used"));
    };
    let ends = ends.clone();
    let frame = out.grad.clone();
    let limits = *limits;
    let shape = info.shape().to_vec();
    tokio::task::spawn_blocking(move || -> Result<()> {
        let (g, _) = compute::decode(&mut Decoder::new(), &frame, &limits, Expect::Dims(&shape))?;
        let mut e = ends.lock().unwrap_or_else(|e| e.into_inner());
        e.backward(ctx, &g)?;
        Ok(())
    })
    .await
    .map_err(|e| run_err(e.to_string()))?
}
