//! Who serves the run: replicas waited for, admitted, made ready, reloaded, lost and released
//! (graceful leaves), as the driver sees them between and during steps.

use super::*;
use crate::trainer::machine::join::{BoundaryWait, boundary_wait};
use crate::trainer::machine::replicas::{
    LeaveAction, Leaver, Leavers, ReadyVerdict, ready_verdict,
};
use crate::trainer::machine::wait::{ReplicaWait, WaitAction, WaitEvent};

impl Trainer {
    /// Waits until every stage has `need` serving replicas, handling messages meanwhile. What to
    /// do and when to give up is the [`ReplicaWait`]'s decision; this performs it.
    pub(super) async fn wait_for_replicas(
        &mut self,
        need: usize,
        on_event: &mut dyn FnMut(&TrainerEvent),
    ) -> Result<()> {
        let mut wait = ReplicaWait::new(need, Instant::now() + self.opts.wait_for_peers);
        // Bounded: the machine gives up at its deadline.
        loop {
            let now = Instant::now();
            if self.restore_pending {
                wait.handle(WaitEvent::StateLost, now);
            }
            let serving: Vec<usize> = (0..self.num_stages())
                .map(|k| self.serving(k).len())
                .collect();
            let steps_done = self.step();
            wait.handle(
                WaitEvent::Counts {
                    serving,
                    steps_done,
                },
                now,
            );
            let mut restored = false;
            while let Some(action) = wait.poll_action(now) {
                match action {
                    WaitAction::Restore => {
                        Box::pin(self.restore(on_event)).await?;
                        restored = true;
                        break;
                    }
                    WaitAction::Ready => return Ok(()),
                    WaitAction::Waiting { serving, need } => {
                        self.emit(TrainerEvent::Waiting { serving, need }, on_event)
                    }
                    WaitAction::Paused { stage } => {
                        self.shared.reg(|r| r.phase = RunPhase::Paused);
                        self.emit(TrainerEvent::Paused { stage }, on_event);
                    }
                    WaitAction::GiveUp { serving, need } => {
                        return Err(Error::NotEnoughReplicas {
                            need,
                            serving,
                            waited: self.opts.wait_for_peers,
                        });
                    }
                }
            }
            if restored {
                continue;
            }
            let idle = wait
                .poll_timeout()
                .saturating_duration_since(Instant::now());
            if let Ok(Some(msg)) = tokio::time::timeout(idle, self.inbox.recv()).await {
                self.handle_idle(msg, on_event).await;
            }
        }
    }

    /// Between steps: Ready, Leave and Down are acted on; pipeline traffic is stale and dropped.
    pub(super) async fn handle_idle(
        &mut self,
        msg: Inbound,
        on_event: &mut dyn FnMut(&TrainerEvent),
    ) {
        match msg {
            Inbound::Ready(from, ready) => self.on_ready(from, ready, on_event),
            Inbound::Leave(_) => self.release_leavers(on_event).await,
            Inbound::Down(from) => {
                self.lose_peer(from, on_event);
            }
            Inbound::SyncDone(_, d) => self.count_sync_report(&d),
            other => tracing::debug!(?other, "message between steps ignored"),
        }
    }

    pub(super) fn on_ready(
        &mut self,
        from: PeerId,
        ready: Ready,
        on_event: &mut dyn FnMut(&TrainerEvent),
    ) {
        let stage = ready.stage as usize;
        let (verdict, addr, current) = self.shared.reg(|r| {
            let rep = r.stages.get_mut(stage).and_then(|s| s.get_mut(&from));
            let state = rep.as_ref().map(|rep| rep.state);
            let addr = rep.as_ref().map(|rep| rep.addr);
            let agreed = r.digests.get(stage).copied().flatten();
            let verdict = ready_verdict(state, ready.step, ready.digest, r.step, agreed);
            if let ReadyVerdict::Serve { adopt } = verdict {
                if let Some(rep) = rep {
                    rep.state = ReplicaState::Serving;
                }
                if adopt {
                    r.digests[stage] = Some(ready.digest);
                }
            }
            (verdict, addr, r.step)
        });
        match (verdict, addr) {
            (ReadyVerdict::Serve { .. }, _) => {}
            (ReadyVerdict::Reload, Some(addr)) => {
                tracing::warn!(peer = %from.short(), stage, step = ready.step, current, "replica ready with the wrong state");
                self.send_reload(from, addr, stage as u32, current);
                return;
            }
            _ => {
                tracing::debug!(peer = %from.short(), stage, "Ready ignored");
                return;
            }
        }
        self.own_digests.insert(from, ready.digest);
        let info = router::PeerInfo {
            stages: stage as u16..stage as u16 + 1,
            compute_tokens_per_s: 5_000.0,
            link: self.link_of(from),
            state: router::PeerState::Serving,
        };
        let _ = self.view.remove(&key_of(&from));
        if let Err(e) = self.view.insert(key_of(&from), info, now_ms()) {
            tracing::warn!(error = %e, "router view refused a replica");
        }
        self.metrics
            .state_sync_seconds
            .push(ready.sync_ms as f64 / 1000.0);
        self.emit(
            TrainerEvent::Joined {
                peer: from,
                stage: stage as u32,
                sync_ms: ready.sync_ms,
            },
            on_event,
        );
    }

    /// The shares a replica reports in `SyncDone` crossed the network whether or not its report
    /// still matters (a late one of a sync that was redone): they always count.
    pub(super) fn count_sync_report(&mut self, d: &SyncDone) {
        self.metrics
            .wire
            .channel_mut(Channel::Sync)
            .add(d.share_bytes, d.share_dense_bytes);
        // Likewise the frames of abandoned passes nobody had reported.
        for (channel, t) in [
            (Channel::Activations, d.abandoned_activations),
            (Channel::Gradients, d.abandoned_gradients),
        ] {
            if t.wire > 0 {
                self.metrics.wire.channel_mut(channel).add(t.wire, t.dense);
            }
        }
    }

    /// Tells a replica with the wrong state to load the stage's agreed state.
    /// `step`: the steps the state must have applied (the replicas' current state).
    /// The link the router assumes for `peer`: a peer whose NAT needs a relay (issue #14) reaches
    /// other replicas through our relay, at most at its per-peer rate and over a detour of about
    /// one RTT to us.
    fn link_of(&self, peer: PeerId) -> router::Link {
        let shared = self.peer.shared();
        let reach = shared.with_membership(|m| m.get(&peer).map(|e| e.record.info.reach));
        match (reach, shared.relay()) {
            (Some(r), Some(relay)) if !r.direct_possible() => {
                let detour_ms = shared
                    .connection_stats()
                    .iter()
                    .find(|c| c.0 == peer)
                    .map_or(50.0, |c| c.1.as_secs_f32() * 1000.0);
                default_link().relayed(relay.config().peer_bytes_per_s as f64, detour_ms)
            }
            _ => default_link(),
        }
    }

    /// Copies each replica's verdict and the relay's byte counts into the metrics. Every
    /// replica gets a row, those routed no work too (a relayed one may get none, and its relay
    /// bytes must still show).
    pub(super) fn note_relay_bytes(&mut self) {
        let shared = self.peer.shared().clone();
        let relay = shared.relay();
        let replicas: Vec<(PeerId, u32)> = self.shared.reg(|r| {
            r.stages
                .iter()
                .enumerate()
                .flat_map(|(s, m)| m.keys().map(move |p| (*p, s as u32)))
                .collect()
        });
        for (peer, stage) in replicas {
            self.metrics
                .peers
                .entry(peer.to_string())
                .or_insert_with(|| crate::trainer::metrics::PeerWork {
                    peer: peer.to_string(),
                    stage,
                    ..Default::default()
                });
        }
        for w in self.metrics.peers.values_mut() {
            let Some(id) = PeerId::parse(&w.peer) else {
                continue;
            };
            if let Some(r) = shared.with_membership(|m| m.get(&id).map(|e| e.record.info.reach)) {
                w.reach = r.to_string();
            }
            if let Some(relay) = &relay {
                let u = relay.usage(&id);
                w.relay_bytes = u.sent + u.received;
            }
        }
    }

    pub(super) fn send_reload(&self, peer: PeerId, addr: SocketAddr, stage: u32, step: u64) {
        let source = self.state_source(stage, Some(peer));
        let epoch = self.shared.reg(|r| r.epoch);
        let msg = Reload {
            run: self.shared.run,
            epoch,
            stage,
            step,
            source,
        };
        let ps = self.peer.shared().clone();
        let tx = self.shared.inbox.clone();
        tokio::spawn(async move {
            match ps.call::<Reload, Applied>(addr, Some(peer), &msg).await {
                Ok((_, applied)) => {
                    let _ = tx.send(Inbound::Ready(
                        peer,
                        Ready {
                            run: applied.run,
                            epoch: applied.epoch,
                            stage: applied.stage,
                            step: applied.step,
                            digest: applied.digest,
                            sync_ms: 0,
                        },
                    ));
                }
                Err(e) => {
                    tracing::warn!(peer = %peer.short(), error = %e, "reload failed");
                    let _ = tx.send(Inbound::Down(peer));
                }
            }
        });
    }

    pub(super) fn state_source(&self, stage: u32, except: Option<PeerId>) -> StateSource {
        self.shared
            .reg(|r| state_source(r, self.shared.endpoint, stage, except))
    }

    /// Removes a replica from the registry and the router (a step in progress learns it from
    /// the `StepMachine`'s `PeerLost`).
    pub(super) fn lose_peer(&mut self, peer: PeerId, on_event: &mut dyn FnMut(&TrainerEvent)) {
        let stage = self.stage_of(&peer);
        let removed = self
            .shared
            .reg(|r| r.stages.iter_mut().any(|s| s.remove(&peer).is_some()));
        let _ = self.view.remove(&key_of(&peer));
        if let Some(k) = stage {
            self.check_stage_state(k as usize);
        }
        if removed {
            self.metrics.peers_lost += 1;
            tracing::warn!(peer = %peer.short(), ?stage, "replica lost");
            self.emit(
                TrainerEvent::Lost {
                    peer,
                    stage: stage.unwrap_or(u32::MAX),
                },
                on_event,
            );
        }
    }

    /// At a step boundary: waits (bounded) for admitted joiners to report Ready.
    pub(super) async fn admit_joiners(
        &mut self,
        on_event: &mut dyn FnMut(&TrainerEvent),
    ) -> Result<()> {
        let deadline = Instant::now() + self.opts.join_timeout;
        // Drain what already arrived.
        while let Ok(msg) = self.inbox.try_recv() {
            self.handle_idle(msg, on_event).await;
        }
        // Joiners are answered only at sync boundaries (the one state replicas agree on).
        let at_sync_boundary = self.cfg().is_sync_boundary(self.shared.reg(|r| r.step));
        loop {
            let joining: Vec<PeerId> = self.shared.reg(|r| {
                r.stages
                    .iter()
                    .flat_map(|s| s.iter())
                    .filter(|(_, rep)| rep.state == ReplicaState::Joining)
                    .map(|(p, _)| *p)
                    .collect()
            });
            let now = Instant::now();
            match boundary_wait(joining, at_sync_boundary, deadline, now) {
                BoundaryWait::Start => return Ok(()),
                BoundaryWait::Drop(late) => {
                    for p in late {
                        tracing::warn!(peer = %p.short(), "joiner did not load its state in time");
                        self.lose_peer(p, on_event);
                    }
                    return Ok(());
                }
                BoundaryWait::Hold(until) => {
                    let wait = until.saturating_duration_since(now);
                    if let Ok(Some(msg)) = tokio::time::timeout(wait, self.inbox.recv()).await {
                        self.handle_idle(msg, on_event).await;
                    }
                }
            }
        }
    }

    /// Takes a leaving replica out of routing, unless it is the last routable one of its stage
    /// (then it serves until the boundary, where its state is handed to the trainer).
    pub(super) fn retire_from_view(&mut self, p: PeerId) {
        let others = self.shared.reg(|r| {
            r.stages.iter().find(|s| s.contains_key(&p)).map(|s| {
                s.iter()
                    .filter(|(q, rep)| **q != p && rep.state == ReplicaState::Serving)
                    .count()
            })
        });
        if others.is_some_and(|n| n > 0) {
            let _ = self.view.remove(&key_of(&p));
        }
    }

    /// At a step boundary: releases every replica that asked to leave. Which leaver hands its
    /// state to the trainer first is [`Leavers`]'s decision; the hand-off is fetched and
    /// verified against the stage's agreed digest like any state the trainer takes, so a leaver
    /// cannot hand the next replica (or a checkpoint) altered weights.
    pub(super) async fn release_leavers(&mut self, on_event: &mut dyn FnMut(&TrainerEvent)) {
        let at_sync_boundary = self.cfg().is_sync_boundary(self.shared.reg(|r| r.step));
        let (epoch, step, leaving, held) = self.shared.reg(|r| {
            let leaving: Vec<(Leaver, SocketAddr)> = r
                .stages
                .iter()
                .enumerate()
                .flat_map(|(k, s)| {
                    let last = !s.values().any(|o| o.state == ReplicaState::Serving);
                    s.iter()
                        .filter(|(_, rep)| rep.state == ReplicaState::Leaving)
                        .map(move |(p, rep)| {
                            let l = Leaver {
                                stage: k,
                                peer: *p,
                                last,
                            };
                            (l, rep.addr)
                        })
                })
                .collect();
            let held: BTreeSet<usize> = r.served.keys().map(|k| *k as usize).collect();
            (r.epoch, r.step, leaving, held)
        });
        let addrs: HashMap<PeerId, SocketAddr> =
            leaving.iter().map(|(l, a)| (l.peer, *a)).collect();
        let mut leavers = Leavers::new(
            at_sync_boundary,
            leaving.into_iter().map(|(l, _)| l).collect(),
            held,
        );
        while let Some(action) = leavers.poll_action() {
            match action {
                LeaveAction::HandOff { stage: k, peer: p } => {
                    let ok = self.hand_off(epoch, step, k, p, addrs[&p], on_event).await;
                    leavers.handed_off(ok);
                }
                LeaveAction::Release {
                    stage: k,
                    peer: p,
                    handed_off,
                } => {
                    self.shared.reg(|r| r.stages[k].remove(&p));
                    let _ = self.view.remove(&key_of(&p));
                    self.check_stage_state(k);
                    self.metrics.peers_left += 1;
                    tracing::info!(peer = %p.short(), stage = k, handed_off, "replica left");
                    self.emit(
                        TrainerEvent::Left {
                            peer: p,
                            stage: k as u32,
                            handed_off,
                        },
                        on_event,
                    );
                }
            }
        }
    }

    /// Takes the state of stage `k` from its leaving last replica `p` (verified against the
    /// stage's agreed digest) and serves it from the trainer; whether that worked.
    async fn hand_off(
        &mut self,
        epoch: u32,
        step: u64,
        k: usize,
        p: PeerId,
        addr: SocketAddr,
        on_event: &mut dyn FnMut(&TrainerEvent),
    ) -> bool {
        let Some(digest) = self.shared.reg(|r| r.digests[k]) else {
            tracing::warn!(peer = %p.short(), stage = k, "leaving replica's stage has no agreed digest");
            return false;
        };
        let fetched = tokio::time::timeout(
            self.opts.sync_timeout,
            self.fetch_stage_state(epoch, k, step, &[(p, addr)], digest),
        )
        .await;
        match fetched {
            Ok(Ok(got)) => {
                let bytes = got.bytes;
                let hash = *blake3::hash(&bytes).as_bytes();
                self.shared.reg(|r| {
                    r.served.insert(
                        k as u32,
                        ServedState {
                            step,
                            bytes,
                            hash,
                            digest,
                        },
                    )
                });
                true
            }
            Ok(Err(f)) => {
                self.blame_bad_states(&f.bad, step, on_event);
                tracing::warn!(peer = %p.short(), stage = k, error = %f.error, "leaving replica's state could not be fetched");
                false
            }
            Err(_) => {
                tracing::warn!(peer = %p.short(), stage = k, "leaving replica's state fetch timed out");
                false
            }
        }
    }

    pub(super) fn mark_joining(&mut self, p: PeerId, k: usize) {
        self.shared.reg(|r| {
            if let Some(rep) = r.stages[k].get_mut(&p) {
                rep.state = ReplicaState::Joining;
            }
        });
        let _ = self.view.remove(&key_of(&p));
    }
}
