//! Checkpoints: every stage's verified state saved, and the whole run restored from the latest
//! checkpoint in a new epoch.

use super::*;
use crate::trainer::machine::restore::{
    Found, Queued, Restore, RestoreAction, RestoreEvent, Stale, stale,
};

impl Trainer {
    /// Restores EVERY stage and the ends from the latest checkpoint in `out` (or, without one,
    /// from the seed at step 0) in a new epoch: the trainer serves the checkpoint's stage states,
    /// every remaining replica reloads, and the steps since the checkpoint run again. Data
    /// batches are a function of (seed, step, micro-batch), so the run continues on the same
    /// trajectory; lost are the compute since the checkpoint and, with lossy sync codecs, the
    /// error-feedback residuals (they restart at zero).
    ///
    /// The order is the [`Restore`] machine's; this performs its actions.
    pub(super) async fn restore(&mut self, on_event: &mut dyn FnMut(&TrainerEvent)) -> Result<()> {
        self.restore_pending = false;
        let cfg = self.cfg().clone();
        let mut machine = Restore::new(self.shared.run);
        let mut ckpt = None;
        let mut addrs: HashMap<PeerId, SocketAddr> = HashMap::new();
        // Bounded: a restore is a finite sequence (one action per replica at most).
        while let Some(action) = machine.poll_action() {
            match action {
                RestoreAction::Load => {
                    ckpt = match &self.opts.out {
                        Some(dir) if checkpoint::exists(dir) => {
                            let dir = dir.clone();
                            let cfg = cfg.clone();
                            Some(
                                tokio::task::spawn_blocking(move || {
                                    checkpoint::restore(&dir, &cfg, &Device::Cpu)
                                })
                                .await??,
                            )
                        }
                        _ => None,
                    };
                    let found = ckpt.as_ref().map(|c| Found {
                        run: c.run,
                        step: c.step,
                    });
                    machine.handle(RestoreEvent::Loaded(found));
                }
                RestoreAction::Foreign { found } => {
                    return Err(Error::ForeignCheckpoint {
                        dir: self.opts.out.clone().unwrap_or_default(),
                        found,
                        expected: self.shared.run,
                    });
                }
                RestoreAction::Install {
                    step,
                    from_checkpoint,
                } => {
                    let (epoch, replicas) =
                        self.install(&cfg, ckpt.take(), step, from_checkpoint)?;
                    addrs = replicas.iter().map(|(_, p, a)| (*p, *a)).collect();
                    let replicas = replicas.into_iter().map(|(k, p, _)| (k, p)).collect();
                    machine.handle(RestoreEvent::Installed { epoch, replicas });
                }
                RestoreAction::Drain => {
                    while let Ok(msg) = self.inbox.try_recv() {
                        let queued = match &msg {
                            Inbound::Down(_) => Queued::Down,
                            Inbound::Leave(_) => Queued::Leave,
                            Inbound::SyncDone(..) => Queued::SyncReport,
                            _ => Queued::Other,
                        };
                        match (stale(queued), msg) {
                            (Stale::Lose, Inbound::Down(p)) => self.lose_peer(p, on_event),
                            (Stale::Release, Inbound::Leave(p)) => {
                                self.shared.reg(|r| {
                                    r.stages.iter_mut().for_each(|s| {
                                        s.remove(&p);
                                    })
                                });
                                self.metrics.peers_left += 1;
                            }
                            (Stale::CountTraffic, Inbound::SyncDone(_, d)) => {
                                self.count_sync_report(&d)
                            }
                            _ => {}
                        }
                    }
                    // Every stage was just installed: a loss seen meanwhile is of the old epoch.
                    self.restore_pending = false;
                    machine.handle(RestoreEvent::Drained);
                }
                RestoreAction::Reload { stage, peer, step } => {
                    let _ = self.view.remove(&key_of(&peer));
                    if let Some(addr) = addrs.get(&peer) {
                        self.send_reload(peer, *addr, stage as u32, step);
                    }
                }
                RestoreAction::Trim { step } => {
                    self.metrics.steps.retain(|s| s.step < step);
                    self.metrics.val_losses.retain(|v| v.0 <= step);
                }
                RestoreAction::Announce {
                    step,
                    epoch,
                    from_checkpoint,
                } => {
                    self.metrics.restores += 1;
                    tracing::warn!(step, epoch, from_checkpoint, "run restored");
                    self.emit(
                        TrainerEvent::Restored {
                            step,
                            epoch,
                            from_checkpoint,
                        },
                        on_event,
                    );
                }
            }
        }
        Ok(())
    }

    /// Installs the checkpoint `ckpt` (or the seed's state) at `step`: the ends, the stage
    /// states the trainer serves, and the registry in a new epoch with every replica joining.
    /// Returns the epoch and the replicas (stage, replica, address) in stage order.
    fn install(
        &mut self,
        cfg: &RunConfig,
        ckpt: Option<checkpoint::Restored>,
        step: u64,
        from_checkpoint: bool,
    ) -> Result<(u32, Vec<Registered>)> {
        let device = Device::Cpu;
        let mut ends = Shard::new(&cfg.model, &ends_pieces(), cfg.seed, DType::F32, &device)?;
        let (served, digests) = match ckpt.filter(|_| from_checkpoint) {
            Some(c) => {
                ends.import_state(&c.ends_state)?;
                served_states(c.stages, step, self.num_stages())
            }
            None => (HashMap::new(), vec![None; self.num_stages()]),
        };
        *self.ends.lock().unwrap_or_else(|e| e.into_inner()) = ends;
        // A checkpoint with no stage is the seed's state as far as loads go.
        let fresh = served.is_empty();
        let installed = self.shared.reg(|r| {
            r.epoch += 1;
            r.step = step;
            r.phase = RunPhase::Paused;
            r.fresh = fresh;
            r.served = served;
            r.digests = digests;
            let mut reps = Vec::new();
            for (k, st) in r.stages.iter_mut().enumerate() {
                for (p, rep) in st.iter_mut() {
                    rep.state = ReplicaState::Joining;
                    reps.push((k, *p, rep.addr));
                }
            }
            (r.epoch, reps)
        });
        let at_sync_boundary = cfg.is_sync_boundary(step);
        self.shared.admissions(
            Some(AdmitEvent::Boundary { at_sync_boundary }),
            Instant::now(),
        );
        Ok(installed)
    }

    /// Fetches every stage's state from a replica, with the ends' own: the whole model as of
    /// now. Each state is verified against its stage's agreed digest; a replica serving another
    /// state is banned and the state is taken from the next replica.
    pub(super) async fn fetch_model(
        &mut self,
        on_event: &mut dyn FnMut(&TrainerEvent),
    ) -> Result<ModelState> {
        let (epoch, step) = self.shared.reg(|r| (r.epoch, r.step));
        let mut stage_states = Vec::new();
        for k in 0..self.num_stages() {
            let digest = self
                .shared
                .reg(|r| r.digests[k])
                .ok_or(Error::NoAgreedDigest(k as u32))?;
            let sources = self.serving(k);
            if sources.is_empty() {
                return Err(Error::NoReplica(k as u32));
            }
            let got = self
                .fetch_stage_state(epoch, k, step, &sources, digest)
                .await;
            let bad = match &got {
                Ok(f) => &f.bad,
                Err(f) => &f.bad,
            };
            self.blame_bad_states(&bad.clone(), step, on_event);
            stage_states.push(got?.bytes);
        }
        let ends = {
            let e = self.ends.lock().unwrap_or_else(|e| e.into_inner());
            e.export_state()?
        };
        Ok(ModelState {
            epoch,
            step,
            ends,
            stages: stage_states,
        })
    }

    /// Writes the whole model to `dir` as a checkpoint.
    pub(super) async fn save_checkpoint(
        &mut self,
        dir: &std::path::Path,
        m: Arc<ModelState>,
    ) -> Result<()> {
        let cfg = self.cfg().clone();
        let dir = dir.to_path_buf();
        let run = self.shared.run;
        let head = self.audit.ledger_head();
        tokio::task::spawn_blocking(move || {
            checkpoint::save_with_ledger(&dir, &cfg, run, m.epoch, m.step, &m.ends, &m.stages, head)
        })
        .await??;
        Ok(())
    }

    /// The whole model's validation loss (see [`checkpoint::val_loss`]), computed off the
    /// async workers.
    pub(super) async fn evaluate(&self, m: Arc<ModelState>) -> Result<f64> {
        let cfg = self.cfg().clone();
        let corpus = self.corpus.clone();
        tokio::task::spawn_blocking(move || checkpoint::val_loss(&cfg, &corpus, &m.ends, &m.stages))
            .await?
    }
}

/// A replica of the run: (stage, replica, address).
type Registered = (usize, PeerId, SocketAddr);

/// The whole model at a step boundary: exported states of the ends and of every stage.
pub(super) struct ModelState {
    epoch: u32,
    step: u64,
    ends: Vec<u8>,
    stages: Vec<Vec<u8>>,
}
