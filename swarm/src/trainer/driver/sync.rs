//! The step boundary: each stage's replica sync and optimizer step, replica probes, digest
//! checks, and resets of a stage whose replicas disagree.

use super::*;
use crate::trainer::machine::replicas::{apply_verdict, reset_digest, state_lost};
use crate::trainer::machine::sync::{SyncOutcome, SyncRound};

impl Trainer {
    /// Starts the sync of `stages` and waits for every participant's report. `step` is the
    /// step whose gradients are synced, or for [`SyncPhase::Outer`] the state step (steps done)
    /// whose weights are. The decisions (participants, which reports count, who is stuck, the
    /// deadline, the agreed norm) are the [`SyncRound`]'s; this sends its `SyncStart`s and feeds
    /// it what arrives.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn sync_stages(
        &mut self,
        step: u64,
        epoch: u32,
        book: &StepBook,
        stages: &[usize],
        rounds: &[u32],
        phase: SyncPhase,
        on_event: &mut dyn FnMut(&TrainerEvent),
    ) -> Result<SyncOutcome> {
        let (replicas, addrs) = self.shared.reg(|r| {
            let mut addrs: HashMap<PeerId, SocketAddr> = HashMap::new();
            let replicas: Vec<Vec<PeerId>> = r
                .stages
                .iter()
                .map(|s| {
                    s.iter()
                        .filter(|(_, rep)| rep.state != ReplicaState::Joining)
                        .map(|(p, rep)| {
                            addrs.insert(*p, rep.addr);
                            *p
                        })
                        .collect()
                })
                .collect();
            (replicas, addrs)
        });
        let deadline = Instant::now() + self.opts.sync_timeout;
        let mut round = SyncRound::plan(step, phase, book, stages, &replicas, rounds, deadline)?;
        for s in round.starts() {
            let msg = SyncStart {
                run: self.shared.run,
                epoch,
                step,
                stage: s.stage as u32,
                round: s.round,
                phase,
                participants: s.participants.clone(),
                mb_counts: s.mb_counts.clone(),
                addrs: s.participants.iter().map(|p| addrs[p]).collect(),
            };
            for p in &s.to {
                let ps = self.peer.shared().clone();
                let tx = self.shared.inbox.clone();
                let (p, addr, msg) = (*p, addrs[p], msg.clone());
                tokio::spawn(async move {
                    if let Err(e) = ps.call::<SyncStart, Ack>(addr, Some(p), &msg).await {
                        tracing::warn!(peer = %p.short(), error = %e, "SyncStart failed");
                        let _ = tx.send(Inbound::Down(p));
                    }
                });
            }
        }
        while let Some(deadline) = round.poll_timeout() {
            let now = Instant::now();
            if let Ok(msg) =
                tokio::time::timeout(deadline.saturating_duration_since(now), self.inbox.recv())
                    .await
            {
                match msg {
                    Some(Inbound::SyncDone(from, d)) => {
                        self.count_sync_report(&d);
                        round.handle_report(
                            from,
                            d.step,
                            d.stage as usize,
                            d.round,
                            d.grad_sq_norm,
                            d.grad_digest,
                        );
                    }
                    Some(Inbound::Down(p)) => {
                        if !round.handle_down(p) {
                            self.lose_peer(p, on_event);
                        }
                    }
                    Some(Inbound::Leave(p)) => {
                        // Asked to leave during the sync: it still takes part; it is released
                        // at the step boundary.
                        self.retire_from_view(p);
                    }
                    Some(Inbound::Ready(from, r)) => self.on_ready(from, r, on_event),
                    Some(other) => tracing::debug!(?other, "pipeline message during sync ignored"),
                    None => return Err(Error::InboxClosed),
                }
            }
            round.handle_timeout(Instant::now());
        }
        Ok(round.finish())
    }

    /// Sends Apply to every participant, compares digests, reloads the odd ones out. Returns the
    /// number of replicas whose digest disagreed.
    /// With [`SyncPhase::Local`] the replicas drift: their digests are recorded, not compared.
    /// With [`SyncPhase::Outer`], `step` is the state step the outer round synced.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn apply_all(
        &mut self,
        step: u64,
        epoch: u32,
        book: &StepBook,
        lr: f64,
        clip: f64,
        phase: SyncPhase,
        on_event: &mut dyn FnMut(&TrainerEvent),
    ) -> Result<u64> {
        let mut calls = Vec::new();
        let mut idle = Vec::new();
        for k in 0..self.num_stages() {
            let replicas: Vec<(PeerId, SocketAddr)> = self.shared.reg(|r| {
                r.stages[k]
                    .iter()
                    .filter(|(_, rep)| rep.state != ReplicaState::Joining)
                    .map(|(p, rep)| (*p, rep.addr))
                    .collect()
            });
            for (p, addr) in replicas {
                if book.is_excluded(&p) {
                    idle.push((k, p, addr));
                    continue;
                }
                let ps = self.peer.shared().clone();
                let msg = Apply {
                    run: self.shared.run,
                    epoch,
                    step,
                    stage: k as u32,
                    lr,
                    clip_scale: clip,
                    phase,
                    credit: self.observer.credit(&p),
                };
                let timeout = self.opts.sync_timeout;
                calls.push(async move {
                    let r = tokio::time::timeout(
                        timeout,
                        ps.call::<Apply, Applied>(addr, Some(p), &msg),
                    )
                    .await;
                    (k, p, addr, r)
                });
            }
        }
        let results = futures::future::join_all(calls).await;
        let mut digests: Vec<Vec<(PeerId, SocketAddr, [u8; 32])>> =
            vec![Vec::new(); self.num_stages()];
        for (k, p, addr, r) in results {
            if let Ok(Ok((_, a))) = &r {
                self.metrics.peer_sent.insert(p, a.sent);
                self.own_digests.insert(p, a.digest);
            }
            match r {
                Ok(Ok((_, a))) if a.step == step + 1 || a.step == step => {
                    digests[k].push((p, addr, a.digest))
                }
                Ok(Ok((_, a))) => {
                    tracing::warn!(peer = %p.short(), got = a.step, "Applied reports another step");
                    digests[k].push((p, addr, a.digest));
                }
                Ok(Err(e)) => {
                    tracing::warn!(peer = %p.short(), error = %e, "Apply failed");
                    self.lose_peer(p, on_event);
                }
                Err(_) => {
                    tracing::warn!(peer = %p.short(), "Apply timed out");
                    self.lose_peer(p, on_event);
                }
            }
        }
        let applied: Vec<Vec<(PeerId, [u8; 32])>> = digests
            .iter()
            .map(|ds| ds.iter().map(|(p, _, d)| (*p, *d)).collect())
            .collect();
        let excluded: Vec<(usize, PeerId)> = idle.iter().map(|(k, p, _)| (*k, *p)).collect();
        let verdict = apply_verdict(phase, self.cfg().sync.drifts(), step, &applied, &excluded);
        for (k, agreed) in verdict.agreed.iter().enumerate() {
            if let Some(d) = agreed {
                self.shared.reg(|r| r.digests[k] = Some(*d));
            }
        }
        let addrs: HashMap<PeerId, SocketAddr> = digests
            .iter()
            .flatten()
            .map(|(p, a, _)| (*p, *a))
            .chain(idle.iter().map(|(_, p, a)| (*p, *a)))
            .collect();
        for (k, p, at) in verdict.reload {
            tracing::warn!(peer = %p.short(), stage = k, excluded = excluded.contains(&(k, p)), "replica not at its stage's agreed state; reloading it");
            self.mark_joining(p, k);
            if let Some(&addr) = addrs.get(&p) {
                self.send_reload(p, addr, k as u32, at);
            }
        }
        for (k, p) in verdict.release {
            // Between boundaries there is no agreed state to reload it with: it joins again at
            // the next sync boundary (its drift is lost, as a crash's).
            tracing::warn!(peer = %p.short(), stage = k, "excluded replica released until the next sync boundary");
            self.lose_peer(p, on_event);
        }
        Ok(verdict.mismatches)
    }

    /// Reloads every live replica of stage `k` with its own state at `step` (drops contexts,
    /// accumulators and any sync in progress); replicas that fail are lost.
    pub(super) async fn reset_stage(&mut self, k: usize, step: u64) {
        let (epoch, reps, digest) = self.shared.reg(|r| {
            let reps: Vec<(PeerId, SocketAddr)> = r.stages[k]
                .iter()
                .filter(|(_, rep)| rep.state != ReplicaState::Joining)
                .map(|(p, rep)| (*p, rep.addr))
                .collect();
            (r.epoch, reps, r.digests[k])
        });
        let fresh = self.shared.reg(|r| r.fresh);
        let drifts = self.cfg().sync.drifts();
        let calls = reps.iter().map(|&(p, addr)| {
            let ps = self.peer.shared().clone();
            let source =
                match reset_digest(fresh, drifts, self.own_digests.get(&p).copied(), digest) {
                    Some(d) => StateSource::Fetch {
                        from: vec![Endpoint { peer: p, addr }],
                        digest: d,
                    },
                    None => StateSource::Init,
                };
            let msg = Reload {
                run: self.shared.run,
                epoch,
                stage: k as u32,
                step,
                source,
            };
            let timeout = self.opts.sync_timeout;
            async move {
                let r =
                    tokio::time::timeout(timeout, ps.call::<Reload, Applied>(addr, Some(p), &msg))
                        .await;
                (p, matches!(r, Ok(Ok(_))))
            }
        });
        for (p, ok) in futures::future::join_all(calls).await {
            if !ok {
                tracing::warn!(peer = %p.short(), stage = k, "reset after a failed sync did not work");
                self.lose_peer(p, &mut |_| {});
            }
        }
    }

    /// Pings every replica of `stages` (bounded wait); returns the ones that did not answer.
    pub(super) async fn probe_replicas(&self, stages: &[usize]) -> Vec<PeerId> {
        let peers: Vec<(PeerId, SocketAddr)> = self.shared.reg(|r| {
            stages
                .iter()
                .flat_map(|&k| r.stages[k].iter())
                .filter(|(_, rep)| rep.state != ReplicaState::Joining)
                .map(|(p, rep)| (*p, rep.addr))
                .collect()
        });
        let ps = self.peer.shared().clone();
        let probes = peers.into_iter().map(|(p, addr)| {
            let ps = ps.clone();
            async move {
                let ok = tokio::time::timeout(
                    PROBE_TIMEOUT,
                    ps.call::<Ping, Pong>(addr, Some(p), &Ping { nonce: 0 }),
                )
                .await
                .is_ok_and(|r| r.is_ok());
                (p, ok)
            }
        });
        futures::future::join_all(probes)
            .await
            .into_iter()
            .filter(|(_, ok)| !ok)
            .map(|(p, _)| p)
            .collect()
    }

    /// Fetches stage `k`'s state at `step` from `sources` (in order), verified against `digest`
    /// (the one state-transfer implementation the replicas use too). Counts the bytes taken.
    pub(super) async fn fetch_stage_state(
        &mut self,
        epoch: u32,
        k: usize,
        step: u64,
        sources: &[(PeerId, SocketAddr)],
        digest: [u8; 32],
    ) -> std::result::Result<Fetched, FetchFailed> {
        let req = StateRequest {
            run: self.shared.run,
            epoch,
            stage: k as u32,
            step,
            chunk_bytes: 4 << 20,
            weights_only: false,
        };
        let cfg = self.cfg().clone();
        let got = fetch_verified(self.peer.shared(), &cfg, &req, &endpoints(sources), digest).await;
        if let Ok(f) = &got {
            let n = f.bytes.len() as u64;
            self.metrics.wire.channel_mut(Channel::State).add(n, n);
        }
        got
    }

    /// Bans every replica that served a state failing verification: its bytes (over its own
    /// authenticated connection) are not the state its stage agreed on at this boundary.
    pub(super) fn blame_bad_states(
        &mut self,
        bad: &[BadState],
        step: u64,
        on_event: &mut dyn FnMut(&TrainerEvent),
    ) {
        for b in bad {
            let stage = self.stage_of(&b.peer).unwrap_or(u32::MAX);
            let ban = self.audit.ban_proven(
                b.peer,
                step,
                stage,
                format!(
                    "served a state that is not its stage's agreed one: {}",
                    b.reason
                ),
                b.evidence,
            );
            self.shared.reg(|r| r.banned.insert(ban.peer));
            self.metrics.bad_states += 1;
            self.lose_peer(ban.peer, on_event);
        }
    }

    /// Flags a restore when stage `k` has no replica left and nobody holds its current state
    /// ([`state_lost`]).
    pub(super) fn check_stage_state(&mut self, k: usize) {
        let orphaned = self.shared.reg(|r| {
            let holders = r.stages[k]
                .values()
                .filter(|rep| rep.state != ReplicaState::Joining)
                .count();
            let served_now = r.served.get(&(k as u32)).is_some_and(|s| s.step == r.step);
            state_lost(holders, served_now)
        });
        if orphaned && !self.restore_pending {
            tracing::warn!(stage = k, "the stage lost its last replica and its state");
            self.restore_pending = true;
        }
    }
}
