//! One step: the micro-batch phase driven by the [`StepMachine`], the probe, the audits, the
//! sync rounds and the optimizer step.

use super::pipeline::Work;
use super::*;
use crate::trainer::book::{Column, Holder};
use crate::trainer::machine::flow::{FlowAction, FlowConfig, FlowEvent, StepFlow};
use crate::trainer::machine::{Event, MachineConfig, StepMachine};
use crate::trainer::timing::Part;

impl Trainer {
    /// One optimizer step: every micro-batch counted exactly once, then the replica sync.
    /// `None`: the step was abandoned because a stage lost its last replica (see `restore`).
    /// The decisions are the [`StepFlow`]'s (the order of the phases) and its [`StepMachine`]'s
    /// (the micro-batches): this performs what they ask for and feeds them back what happened.
    pub(super) async fn run_step(
        &mut self,
        on_event: &mut dyn FnMut(&TrainerEvent),
    ) -> Result<Option<StepReport>> {
        let started = Instant::now();
        let (step, epoch) = self.shared.reg(|r| {
            r.phase = RunPhase::Running;
            (r.step, r.epoch)
        });
        self.shared
            .admissions(Some(AdmitEvent::StepStarted), Instant::now());
        let stages = self.num_stages();
        let m = self.cfg().train.micro_batches;
        let max_in_flight = if self.opts.max_in_flight == 0 {
            2 * stages
        } else {
            self.opts.max_in_flight
        };
        let sm = StepMachine::new(
            MachineConfig {
                stages,
                micro_batches: m,
                max_in_flight,
                attempt_timeout: self.opts.attempt_timeout,
            },
            step,
        );
        let cfg = self.cfg().clone();
        let mut flow = StepFlow::new(
            FlowConfig {
                stages,
                drifts: cfg.sync.drifts(),
                outer_boundary: cfg.is_sync_boundary(step + 1),
            },
            sm,
        );
        let mut work: HashMap<usize, Work> = HashMap::new();
        let mut grad_norm = 0.0;
        let mut lr = 0.0;
        let mut clip = 1.0;
        // Every flow action is answered before the next (bounded: a step is finite).
        loop {
            if self.restore_pending {
                flow.state_lost();
            }
            let Some(action) = flow.poll_action(Instant::now()) else {
                return Err(run_err("the step's flow stopped without finishing"));
            };
            let event = match action {
                FlowAction::MicroBatches => {
                    self.metrics.enter(Part::Pipeline);
                    let mut heard = HashSet::new();
                    self.micro_batches(flow.machine_mut(), &mut work, epoch, &mut heard, on_event)
                        .await?;
                    if self.restore_pending {
                        continue;
                    }
                    FlowEvent::MicroBatchesDone {
                        all_heard: self.all_heard(&heard),
                    }
                }
                FlowAction::Probe { stages } => {
                    let dead = self.probe_replicas(&stages).await;
                    for p in &dead {
                        self.lose_peer(*p, on_event);
                    }
                    FlowEvent::Probed { dead }
                }
                FlowAction::AuditAndSync {
                    stages,
                    rounds,
                    phase,
                } => {
                    // The audits run while the round syncs: nothing is applied before both are
                    // done, and their round trips hide behind the sync's. Time past the sync's
                    // end is the audits'.
                    self.metrics.enter(Part::Sync);
                    let book = flow.machine().book();
                    let (config, ps) = (self.opts.config.clone(), self.peer.shared().clone());
                    let view = self.audit_view(step, epoch, book, &config, &ps);
                    let stand_in = self.audit.stand_in();
                    let mut auditor = std::mem::replace(&mut self.audit, stand_in);
                    let audit = async {
                        let bans = auditor.audit_step(&view).await;
                        (bans, Instant::now())
                    };
                    let sync = async {
                        let r = self
                            .sync_stages(step, epoch, book, &stages, &rounds, phase, on_event)
                            .await;
                        (r, Instant::now())
                    };
                    let ((bans, audited_at), (outcome, synced_at)) = tokio::join!(audit, sync);
                    let mut stand_in = std::mem::replace(&mut self.audit, auditor);
                    for (peer, at, k, reason, evidence) in stand_in.take_deferred() {
                        self.audit.ban_proven(peer, at, k, reason, evidence);
                    }
                    if audited_at > synced_at {
                        self.metrics
                            .reassign(Part::Sync, Part::Audits, audited_at - synced_at);
                    }
                    self.metrics.enter(Part::Barrier);
                    let outcome = outcome?;
                    for b in &bans {
                        self.observer.ban(&b.peer, b.stage, &b.reason, step);
                        self.shared.reg(|r| r.banned.insert(b.peer));
                        self.lose_peer(b.peer, on_event);
                    }
                    for p in &outcome.failed_peers {
                        self.lose_peer(*p, on_event);
                    }
                    FlowEvent::AuditedAndSynced {
                        banned: bans.iter().map(|b| b.peer).collect(),
                        outcome,
                    }
                }
                FlowAction::Discard { stages } => {
                    for k in stages {
                        self.reset_stage(k, step).await;
                    }
                    let ends = self.ends.clone();
                    tokio::task::spawn_blocking(move || {
                        ends.lock().unwrap_or_else(|e| e.into_inner()).zero_grads()
                    })
                    .await?;
                    self.metrics.retries += flow.machine().book().retries();
                    FlowEvent::Discarded
                }
                FlowAction::Sync {
                    stages,
                    rounds,
                    phase,
                } => {
                    self.metrics.enter(Part::Sync);
                    let outcome = self
                        .sync_stages(
                            step,
                            epoch,
                            flow.machine().book(),
                            &stages,
                            &rounds,
                            phase,
                            on_event,
                        )
                        .await?;
                    self.metrics.enter(Part::Barrier);
                    for p in &outcome.failed_peers {
                        self.lose_peer(*p, on_event);
                    }
                    FlowEvent::Synced(outcome)
                }
                FlowAction::Reset { stages } => {
                    tracing::warn!(?stages, "sync failed; re-running lost micro-batches");
                    for k in stages {
                        self.reset_stage(k, step).await;
                    }
                    FlowEvent::Reset
                }
                FlowAction::Optimize { stage_sq_norms } => {
                    // Global norm, clip, learning rate, the ends' optimizer step.
                    self.metrics.enter(Part::Compute);
                    let ends_norm = {
                        let ends = self.ends.clone();
                        tokio::task::spawn_blocking(move || {
                            ends.lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .grad_sq_norm()
                        })
                        .await??
                    };
                    // Ends first, then stages in order: the local trainer's sum, bit for bit.
                    let total: f64 = stage_sq_norms.iter().fold(ends_norm, |a, s| a + s);
                    grad_norm = total;
                    lr = cfg.schedule().at(step);
                    let hp = cfg.adamw();
                    clip = clip_scale(total, cfg.train.grad_clip);
                    let (ends, lr, scale) = (self.ends.clone(), lr, clip);
                    tokio::task::spawn_blocking(move || -> Result<()> {
                        let mut e = ends.lock().unwrap_or_else(|e| e.into_inner());
                        e.optimizer_step(&hp, lr, scale)?;
                        e.zero_grads();
                        Ok(())
                    })
                    .await??;
                    self.metrics.enter(Part::Barrier);
                    FlowEvent::Optimized
                }
                FlowAction::Apply { phase } => {
                    let mismatches = self
                        .apply_all(
                            step,
                            epoch,
                            flow.machine().book(),
                            lr,
                            clip,
                            phase,
                            on_event,
                        )
                        .await?;
                    FlowEvent::Applied { mismatches }
                }
                FlowAction::OuterSync {
                    stages: pending,
                    rounds,
                } => {
                    // An outer round syncs weights, not micro-batches: its book counts nothing.
                    self.metrics.enter(Part::Sync);
                    let outcome = self
                        .sync_stages(
                            step + 1,
                            epoch,
                            &StepBook::new(stages as u16, m),
                            &pending,
                            &rounds,
                            SyncPhase::Outer,
                            on_event,
                        )
                        .await?;
                    for p in &outcome.failed_peers {
                        self.lose_peer(*p, on_event);
                    }
                    self.metrics.enter(Part::Barrier);
                    if outcome.done.len() < pending.len() {
                        tracing::warn!(stages = ?pending, state_step = step + 1, "outer sync lost a participant; redoing it");
                    }
                    FlowEvent::OuterSynced(outcome)
                }
                FlowAction::OuterApply => {
                    let book = StepBook::new(stages as u16, m);
                    self.metrics.enter(Part::Sync);
                    let mismatches = self
                        .apply_all(step + 1, epoch, &book, 0.0, 1.0, SyncPhase::Outer, on_event)
                        .await?;
                    self.metrics.enter(Part::Barrier);
                    FlowEvent::OuterApplied { mismatches }
                }
                FlowAction::GiveUp { rounds } => {
                    return Err(Error::OuterSyncFailed {
                        state_step: step + 1,
                        rounds,
                    });
                }
                FlowAction::Abandon => return Ok(self.abandon_step(flow.machine_mut(), &mut work)),
                FlowAction::Finish => break,
            };
            let closes = matches!(event, FlowEvent::MicroBatchesDone { .. });
            flow.handle(event, Instant::now());
            if closes {
                // The attempts still in flight, released (a closed machine asks for no route;
                // the next phase that makes a micro-batch incomplete reopens it, and the
                // micro-batch phase then performs its routes).
                self.settle(flow.machine_mut(), &mut work);
                self.metrics.enter(Part::Barrier);
            }
        }

        let mismatches = flow.mismatches();
        let book = flow.machine().book();
        let attempts: Vec<Option<u32>> = (0..m).map(|mb| book.current_attempt(mb)).collect();
        self.audit.end_step(step, &attempts, &cfg, lr, clip);
        self.metrics.audit = self.audit.stats.clone();
        self.metrics.replica_hash_mismatches += mismatches;
        self.metrics.retries += book.retries();
        let tokens = cfg.tokens_per_step() as u64;
        self.metrics.tokens += tokens;
        self.shared.reg(|r| {
            r.step = step + 1;
            r.fresh = false;
            r.served.retain(|_, s| s.step == step + 1);
        });
        let at_sync_boundary = cfg.is_sync_boundary(step + 1);
        self.shared.admissions(
            Some(AdmitEvent::Boundary { at_sync_boundary }),
            Instant::now(),
        );
        self.release_leavers(on_event).await;
        let report = StepReport {
            step,
            loss: book
                .mean_loss()
                .ok_or_else(|| run_err("step finished without every loss"))?,
            lr,
            grad_norm: grad_norm.sqrt(),
            tokens,
            seconds: started.elapsed().as_secs_f64(),
            retries: book.retries(),
            hash_mismatches: mismatches,
            participants: flow.participants().to_vec(),
            wire_bytes: self.metrics.wire.tensor_wire_bytes(),
            dense_bytes: self.metrics.wire.tensor_dense_bytes(),
            wire: self.metrics.wire,
        };
        Ok(Some(report))
    }

    /// Whether every replica serving a stage (joiners aside) is in `heard`.
    fn all_heard(&self, heard: &HashSet<PeerId>) -> bool {
        self.shared.reg(|r| {
            r.stages
                .iter()
                .flat_map(|s| s.iter())
                .filter(|(_, rep)| rep.state != ReplicaState::Joining)
                .all(|(p, _)| heard.contains(p))
        })
    }

    /// The micro-batch phase: performs the machine's actions and feeds it what arrives, until
    /// every micro-batch is counted or a stage's state is lost. The peers a pipeline message
    /// came from are added to `heard`.
    async fn micro_batches(
        &mut self,
        sm: &mut StepMachine,
        work: &mut HashMap<usize, Work>,
        epoch: u32,
        heard: &mut HashSet<PeerId>,
        on_event: &mut dyn FnMut(&TrainerEvent),
    ) -> Result<()> {
        while !sm.micro_batches_done() {
            if let Some(e) = self.perform(sm, work, epoch).await? {
                if self.restore_pending {
                    return Ok(());
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
                Ok(None) => return Err(Error::InboxClosed),
                Err(_) => None,
            };
            let now = Instant::now();
            if let Some(
                Inbound::ForwardOut(from, _)
                | Inbound::BackwardOut(from, _)
                | Inbound::Counted(from, _)
                | Inbound::HopFailed(from, _),
            ) = &msg
            {
                heard.insert(*from);
            }
            match msg {
                None => {}
                Some(Inbound::ForwardOut(from, out)) => {
                    self.on_forward_out(sm, work, from, out).await
                }
                Some(Inbound::BackwardOut(from, out)) => {
                    self.on_backward_out(sm, work, from, out).await
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
                return Ok(());
            }
            sm.handle_timeout(Instant::now());
        }
        Ok(())
    }

    /// What the step's audits (see `audit.rs`) need to know of it.
    fn audit_view<'a>(
        &self,
        step: u64,
        epoch: u32,
        book: &StepBook,
        config: &'a RunConfig,
        ps: &'a Arc<PeerShared>,
    ) -> crate::trainer::audit::StepView<'a> {
        let stages = self.num_stages();
        let replicas = (0..stages)
            .map(|k| {
                let mut v = self.serving(k);
                v.retain(|(p, _)| !book.is_excluded(p));
                v
            })
            .collect();
        crate::trainer::audit::StepView {
            run: self.shared.run,
            epoch,
            step,
            config,
            attempts: (0..book.micro_batches())
                .map(|mb| book.current_attempt(mb))
                .collect(),
            // Only the inner-step audits of a drifting sync read who counted what.
            holders: if config.sync.drifts() {
                (0..stages)
                    .map(|k| {
                        (0..book.micro_batches())
                            .map(|mb| match book.holder(mb, Column::Stage(k as u16)) {
                                Some(Holder::Peer(p)) => Some(p),
                                _ => None,
                            })
                            .collect()
                    })
                    .collect()
            } else {
                Vec::new()
            },
            replicas,
            digests: self.shared.reg(|r| r.digests.clone()),
            own: if config.sync.drifts() {
                self.own_digests.clone()
            } else {
                Default::default()
            },
            peer: ps,
        }
    }

    /// Audit counters so far.
    pub fn audit_stats(&self) -> &crate::trainer::audit::AuditStats {
        &self.audit.stats
    }
}
