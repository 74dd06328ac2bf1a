//! One step: the micro-batch phase driven by the [`StepMachine`], the probe, the audits, the
//! sync rounds and the optimizer step.

use super::pipeline::Work;
use super::*;
use crate::trainer::machine::{Event, MachineConfig, StepMachine};
use crate::trainer::timing::Part;

impl Trainer {
    /// One optimizer step: every micro-batch counted exactly once, then the replica sync.
    /// `None`: the step was abandoned because a stage lost its last replica (see `restore`).
    /// The decisions are the [`StepMachine`]'s: this loop feeds it what arrives and performs
    /// what it asks for (`pipeline.rs`).
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
        let max_in_flight = if self.opts.max_in_flight == 0 {
            2 * stages
        } else {
            self.opts.max_in_flight
        };
        let mut sm = StepMachine::new(
            MachineConfig {
                stages,
                micro_batches: m,
                max_in_flight,
                attempt_timeout: self.opts.attempt_timeout,
            },
            step,
        );
        let mut work: HashMap<usize, Work> = HashMap::new();
        let mut pending_sync: Vec<usize> = (0..stages).collect();
        let mut norms: HashMap<usize, f64> = HashMap::new();
        let mut mismatches = 0u64;
        let mut participants_per_stage = vec![0usize; stages];
        // Sync rounds per stage in this step: bumped when a stage's sync is redone.
        let mut sync_rounds = vec![0u32; stages];

        loop {
            // Micro-batch phase.
            self.metrics.enter(Part::Pipeline);
            while !sm.micro_batches_done() {
                if let Some(e) = self.perform(&mut sm, &mut work, epoch).await? {
                    if self.restore_pending {
                        return Ok(self.abandon_step(&mut sm, &mut work));
                    }
                    // No routable replica for some stage: wait for one (pauses the run).
                    tracing::warn!(error = %e, "cannot route; waiting for replicas");
                    self.wait_for_replicas(1, on_event).await?;
                }
                let wait = sm
                    .poll_timeout()
                    .map(|d| d.saturating_duration_since(Instant::now()))
                    .unwrap_or(Duration::from_millis(200))
                    .max(Duration::from_millis(1));
                let msg = match tokio::time::timeout(wait, self.inbox.recv()).await {
                    Ok(Some(msg)) => Some(msg),
                    Ok(None) => return Err(run_err("trainer inbox closed")),
                    Err(_) => None,
                };
                let now = Instant::now();
                match msg {
                    None => {}
                    Some(Inbound::ForwardOut(from, out)) => {
                        self.on_forward_out(&mut sm, &mut work, from, out).await
                    }
                    Some(Inbound::BackwardOut(from, out)) => {
                        self.on_backward_out(&mut sm, &mut work, from, out).await
                    }
                    Some(Inbound::Counted(from, c)) => sm.handle(
                        Event::Counted {
                            from,
                            key: c.key,
                            stage: c.stage,
                        },
                        now,
                    ),
                    Some(Inbound::HopFailed(from, h)) => sm.handle(
                        Event::HopFailed {
                            from,
                            key: h.key,
                            failed: h.failed,
                            busy: h.busy,
                            traffic: h.traffic,
                        },
                        now,
                    ),
                    Some(Inbound::SendFailed { key, peer, busy }) => {
                        sm.handle(Event::Failed { key, peer, busy }, now)
                    }
                    Some(Inbound::Leave(p)) => {
                        // No new work; what it holds finishes, it syncs, and it is released at
                        // the boundary.
                        self.retire_from_view(p);
                    }
                    Some(Inbound::Down(p)) => {
                        self.lose_peer(p, on_event);
                        sm.handle(Event::PeerLost(p), now);
                    }
                    Some(Inbound::Ready(from, r)) => self.on_ready(from, r, on_event),
                    Some(Inbound::SyncDone(from, d)) => {
                        self.count_sync_report(&d);
                        tracing::debug!(peer = %from.short(), step = d.step, "sync report outside a sync ignored");
                    }
                }
                if self.restore_pending {
                    return Ok(self.abandon_step(&mut sm, &mut work));
                }
                sm.handle_timeout(Instant::now());
            }
            // Attempts still in flight are complete (their late messages are ignored).
            sm.close_micro_batches();
            self.settle(&mut sm, &mut work);
            self.metrics.enter(Part::Barrier);

            // A replica that died after counting must not be asked to sync: probe them all
            // first (a crash during the sync itself is handled below, at a higher cost).
            let dead = self.probe_replicas(&pending_sync).await;
            if !dead.is_empty() {
                for p in dead {
                    self.lose_peer(p, on_event);
                    sm.handle(Event::PeerLost(p), Instant::now());
                }
                if !sm.micro_batches_done() {
                    continue;
                }
            }

            // Audits (issue #7), before any stage syncs: replicas still hold the step's weights,
            // receipts and frames. A ban discards the step's gradients everywhere (they may hold
            // the cheater's outputs) and re-runs the step on honest replicas.
            if pending_sync.len() == stages {
                self.metrics.enter(Part::Audits);
                let bans = self.audit_step(step, epoch, sm.book()).await;
                self.metrics.enter(Part::Barrier);
                if !bans.is_empty() {
                    for b in &bans {
                        self.observer.ban(&b.peer, b.stage, &b.reason, step);
                        self.shared.reg(|r| r.banned.insert(b.peer));
                        self.lose_peer(b.peer, on_event);
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
                    self.metrics.retries += sm.book().retries();
                    sm.handle(Event::Discarded, Instant::now());
                    continue;
                }
            }

            if self.restore_pending {
                return Ok(self.abandon_step(&mut sm, &mut work));
            }
            // Sync phase, for the stages not yet synced.
            let phase = if self.cfg().sync.drifts() {
                SyncPhase::Local
            } else {
                SyncPhase::Gradient
            };
            self.metrics.enter(Part::Sync);
            let outcome = self
                .sync_stages(
                    step,
                    epoch,
                    sm.book(),
                    &pending_sync,
                    &sync_rounds,
                    phase,
                    on_event,
                )
                .await?;
            for (k, n, parts) in outcome.done {
                norms.insert(k, n);
                participants_per_stage[k] = parts;
                // Its replicas hold the summed gradient: losing one now costs no count.
                sm.handle(Event::StageSynced(k as u16), Instant::now());
            }
            self.metrics.enter(Part::Barrier);
            mismatches += outcome.norm_mismatches;
            for p in &outcome.failed_peers {
                self.lose_peer(*p, on_event);
                sm.handle(Event::PeerLost(*p), Instant::now());
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
                sm.handle(Event::StageReset(k as u16), Instant::now());
            }
            tracing::warn!(stages = ?pending_sync, "sync failed; re-running lost micro-batches");
        }

        // Global norm, clip, learning rate, optimizer everywhere.
        self.metrics.enter(Part::Compute);
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
        self.metrics.enter(Part::Barrier);
        let drifts = cfg.sync.drifts();
        let phase = if drifts {
            SyncPhase::Local
        } else {
            SyncPhase::Gradient
        };
        mismatches += self
            .apply_all(step, epoch, sm.book(), lr, scale, phase, on_event)
            .await?;
        if drifts && cfg.is_sync_boundary(step + 1) && !self.restore_pending {
            self.metrics.enter(Part::Sync);
            mismatches += self.outer_sync(step + 1, epoch, on_event).await?;
            self.metrics.enter(Part::Barrier);
        }
        let book = sm.book();
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
}
