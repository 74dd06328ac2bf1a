//! Audits while replicas drift between sync boundaries (`[sync] mode = "sparseloco"`): no
//! other replica holds the audited peer's weights, so the trainer recomputes from the peer's own
//! state, fetched from it and pinned by the digest its receipts sign, as both auditor and
//! referee; and it audits replicas' own optimizer steps (the inner steps), which no pass audit
//! sees: a replica that skips, fakes or scales them drifts where the others do not.

use std::net::SocketAddr;
use std::sync::Arc;

use swarm_model::{RunConfig, Shard};

use super::{
    Auditor, Ban, INNER_STEP_MB, StepView, Tally, frame_distance, frames_evidence, hidden_distance,
    recompute,
};
use crate::error::{Error, Result};
use crate::identity::PeerId;
use crate::protocol::{Endpoint, Hop, MbKey};
use crate::receipt::{AuditFetch, AuditRecord, Receipt, frame_hash};
use crate::stage::StageOptions;
use crate::state_transfer::{StateRequest, fetch_verified};

/// Why the audited peer's own state could not be had.
pub(super) enum OwnState {
    /// It served a state other than the one its receipts sign: a proven lie, with evidence.
    Lied(String, [u8; 32]),
    /// Unreachable or failing: no proof either way.
    Unavailable(Error),
}

/// One replica's inner optimizer step under audit: its state at `step` and, once the step's
/// `Apply` is known, the weights the trainer's own optimizer step from it gives; compared at the
/// next audit phase with the state the replica then holds.
pub(super) struct InnerCheck {
    peer: PeerId,
    stage: u32,
    step: u64,
    /// The replica's weights at `step`, flat.
    before: Vec<f32>,
    /// The state with the recomputed gradient set, until the step's optimizer step is taken.
    shard: Option<Shard>,
    /// The weights after the trainer's optimizer step, flat, and their digest.
    expected: Option<(Vec<f32>, [u8; 32])>,
}

/// `|after - expected| / |expected - before|`: how far a replica's update is from the one
/// recomputed (0 when both are nothing).
fn update_distance(before: &[f32], expected: &[f32], after: &[f32]) -> f32 {
    if before.len() != expected.len() || after.len() != expected.len() {
        return f32::INFINITY;
    }
    let (mut num, mut den) = (0f64, 0f64);
    for ((b, e), a) in before.iter().zip(expected).zip(after) {
        num += f64::from(a - e).powi(2);
        den += f64::from(e - b).powi(2);
    }
    if num == 0.0 {
        0.0
    } else if den == 0.0 {
        f32::INFINITY
    } else {
        (num / den).sqrt() as f32
    }
}

/// Whether the run's replicas drift between sync boundaries (then each is audited against its
/// own state).
pub(super) fn drifts(v: &StepView<'_>) -> bool {
    v.config.sync.drifts()
}

impl Auditor {
    /// Recomputation while replicas drift between sync boundaries: no other replica holds the
    /// audited peer's weights, so the trainer recomputes the passes itself from the peer's own
    /// state, fetched from the peer and pinned by the digest its receipts sign (a state that does
    /// not hash to it is a lie; one shared by several audited passes of the step is fetched
    /// once). The trainer is trusted, so its recomputation is the referee.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn audit_own_state(
        &self,
        t: &mut Tally,
        v: &StepView<'_>,
        key: MbKey,
        k: u32,
        hop: Hop,
        fr: &Receipt,
        br: &Receipt,
        mut rec: AuditRecord,
    ) -> Result<Option<Ban>> {
        let p = hop.peer;
        let me = PeerId([0; 32]);
        let shard = match self.prefetched(k, p, fr.weights_digest) {
            Ok(s) => s,
            Err(OwnState::Lied(reason, evidence)) => {
                return Ok(Some(self.lied_to(t, p, key, k, me, reason, evidence)));
            }
            Err(OwnState::Unavailable(e)) => {
                tracing::warn!(peer = %p.short(), error = %e, "audited peer's state unavailable; audit skipped");
                t.stats.audits -= 1;
                t.stats.per_peer.entry(p).or_default().0 -= 1;
                return Ok(None);
            }
        };
        let (fi, bi) = (rec.fwd_in.clone(), rec.bwd_in.clone());
        let (limits, act, grad) = (self.limits, self.act, self.grad);
        let (fo, bo) = tokio::task::spawn_blocking(move || {
            recompute(&shard, k as usize, &fi, &bi, &limits, act, grad)
        })
        .await??;
        if frame_hash(&fo) == fr.output_hash && frame_hash(&bo) == br.output_hash {
            t.stats.identical += 1;
            self.log_audit_to(t, p, key, k, me, None, true, 0.0);
            return Ok(None);
        }
        if let Err(ban) = self
            .fetch_outputs(t, v, key, k, hop, (fr, br), me, &mut rec)
            .await
        {
            return Ok(Some(ban));
        }
        let d = hidden_distance(&rec.fwd_out, &fo, &self.limits, self.subspace)
            .max(frame_distance(&rec.bwd_out, &bo, &self.limits));
        if d <= self.cfg.tolerance {
            t.stats.max_passed_distance = t.stats.max_passed_distance.max(d);
            self.log_audit_to(t, p, key, k, me, None, true, d);
            return Ok(None);
        }
        t.stats.audit_failures += 1;
        t.stats.per_peer.entry(p).or_default().1 += 1;
        self.log_audit_to(t, p, key, k, me, Some(me), false, d);
        let reason = format!(
            "stage {k} step {} mb {}: output off by {d:.3e} (relative L2) from a recomputation with its own state",
            key.step, key.mb
        );
        Ok(Some(self.ban_to(
            t,
            p,
            key.step,
            k,
            reason,
            frames_evidence(&rec),
        )))
    }

    /// Draws replicas whose inner optimizer step of this step is audited, and prepares each:
    /// its own state (pinned by its digest), the records of the micro-batches it counted (their
    /// receipts and inputs checked as in a pass audit), and the gradient recomputed from them in
    /// micro-batch order. Steps followed by an outer sync are not drawn: the next state is then
    /// the outer step's, not this one's. Returns bans for proven lies.
    pub(super) async fn draw_inner(&mut self, v: &StepView<'_>, bans: &[Ban]) -> Vec<Ban> {
        self.inner.retain(|c| c.step < v.step);
        let mut out = Vec::new();
        let total = v.config.train.micro_batches;
        for (k, reps) in v.replicas.iter().enumerate() {
            for &(p, addr) in reps {
                if self.banned.contains(&p) || bans.iter().chain(&out).any(|b| b.peer == p) {
                    continue;
                }
                let mbs: Vec<u32> = v.holders[k]
                    .iter()
                    .enumerate()
                    .filter(|(_, h)| **h == Some(p))
                    .map(|(mb, _)| mb as u32)
                    .collect();
                if mbs.is_empty() || !self.inner_due(v, k as u32, &p) {
                    continue;
                }
                if mbs
                    .iter()
                    .any(|&mb| v.attempts.get(mb as usize).copied().flatten() != Some(0))
                {
                    self.stats.inner_skipped += 1;
                    continue;
                }
                match self.prepare_inner(v, k as u32, p, addr, &mbs, total).await {
                    Ok(Ok(c)) => self.inner.push(c),
                    Ok(Err(ban)) => out.push(ban),
                    Err(e) => {
                        self.stats.inner_skipped += 1;
                        tracing::warn!(peer = %p.short(), stage = k, error = %e, "inner-step audit could not be prepared");
                    }
                }
            }
        }
        out
    }

    /// Whether `peer`'s inner step of this step is drawn for an audit. Steps followed by an
    /// outer sync are not: the next state is then the outer step's, not this one's.
    fn inner_due(&self, v: &StepView<'_>, stage: u32, peer: &PeerId) -> bool {
        let every = v.config.sync.every.max(1);
        if (v.step + 1).is_multiple_of(every) || v.step + 1 >= v.config.train.steps {
            return false;
        }
        let parts: [&[u8]; 4] = [
            b"inner-step",
            &v.step.to_le_bytes(),
            &stage.to_le_bytes(),
            &peer.0,
        ];
        self.draw(&parts) < self.rate_for(peer)
    }

    async fn prepare_inner(
        &mut self,
        v: &StepView<'_>,
        k: u32,
        p: PeerId,
        addr: SocketAddr,
        mbs: &[u32],
        total: usize,
    ) -> Result<std::result::Result<InnerCheck, Ban>> {
        let Some(&digest) = v.own.get(&p) else {
            return Err(Error::NoState);
        };
        let state = match self.own_state(v, k, p, addr, digest, true).await {
            Ok(s) => s,
            Err(OwnState::Lied(reason, evidence)) => {
                return Ok(Err(self.inner_failed(p, v.step, k, reason, evidence)));
            }
            Err(OwnState::Unavailable(e)) => return Err(e),
        };
        let mut passes = Vec::with_capacity(mbs.len());
        for &mb in mbs {
            let key = MbKey {
                step: v.step,
                mb,
                attempt: 0,
            };
            let Some(route) = self.seen.get(&key).map(|s| s.route.clone()) else {
                return Err(Error::NoState);
            };
            let fetch = AuditFetch {
                run: v.run,
                epoch: v.epoch,
                key,
                stage: k,
                frames: true,
                outputs: false,
            };
            let rec: AuditRecord = self.call(v.peer, addr, p, &fetch).await?;
            self.stats.bytes += (rec.fwd_in.len() + rec.bwd_in.len()) as u64;
            if let Err(reason) = self.check_record(v, key, k, p, &route, &rec) {
                let ev = frame_hash(&crate::wire::encode_body(&rec).unwrap_or_default());
                return Ok(Err(self.inner_failed(p, v.step, k, reason, ev)));
            }
            passes.push((rec.fwd_in, rec.bwd_in));
        }
        let (config, limits, mine) = (v.config.clone(), self.limits, mbs.len());
        let (before, shard) = tokio::task::spawn_blocking(move || -> Result<_> {
            // A copy to accumulate into: the cached state stays as fetched.
            let mut s = crate::stage::init_shard(&config, k)?;
            s.import_state(&state.export_state()?)?;
            let before = s.weights_flat()?;
            for (fwd_in, bwd_in) in &passes {
                crate::compute::accumulate(&mut s, k as usize, fwd_in, bwd_in, &limits)?;
            }
            crate::compute::own_mean_gradient(&mut s, mine, total)?;
            Ok((before, s))
        })
        .await??;
        Ok(Ok(InnerCheck {
            peer: p,
            stage: k,
            step: v.step,
            before,
            shard: Some(shard),
            expected: None,
        }))
    }

    /// Compares the inner steps drawn at the previous step with the states their replicas now
    /// hold (pinned by their `Applied` digests). Returns the bans.
    pub(super) async fn resolve_inner(&mut self, v: &StepView<'_>) -> Vec<Ban> {
        let mut bans = Vec::new();
        let pending: Vec<InnerCheck> = std::mem::take(&mut self.inner);
        for c in pending {
            // A check of this very step was drawn before a re-run of it: drawn again later.
            if c.step + 1 != v.step {
                continue;
            }
            let Some((expected, expected_digest)) = c.expected else {
                continue;
            };
            let addr = v.replicas[c.stage as usize]
                .iter()
                .find(|(q, _)| *q == c.peer)
                .map(|(_, a)| *a);
            let (Some(addr), Some(&digest)) = (addr, v.own.get(&c.peer)) else {
                // Gone, excluded or reloaded meanwhile: nothing to compare.
                self.stats.inner_skipped += 1;
                continue;
            };
            if self.banned.contains(&c.peer) {
                continue;
            }
            // Hash first: the recomputed step is bitwise the honest replica's (same code, same
            // order), so a replica whose signed digest is the recomputed weights' passed without
            // its state crossing its uplink; only a mismatch fetches the state, for the distance.
            if digest == expected_digest {
                self.stats.inner_identical += 1;
                self.inner_passed(c.peer, c.step, c.stage, 0.0);
                continue;
            }
            let after = match self
                .own_state(v, c.stage, c.peer, addr, digest, false)
                .await
            {
                Ok(s) => s,
                Err(OwnState::Lied(reason, evidence)) => {
                    bans.push(self.inner_failed(c.peer, c.step, c.stage, reason, evidence));
                    continue;
                }
                Err(OwnState::Unavailable(e)) => {
                    self.stats.inner_skipped += 1;
                    tracing::warn!(peer = %c.peer.short(), error = %e, "state after an audited inner step unavailable");
                    continue;
                }
            };
            let after = match after.weights_flat() {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(error = %e, "inner-step audit failed");
                    continue;
                }
            };
            let d = update_distance(&c.before, &expected, &after);
            if d <= self.cfg.tolerance {
                self.inner_passed(c.peer, c.step, c.stage, d);
                continue;
            }
            let reason = format!(
                "stage {} step {}: its optimizer step is off by {d:.3e} (relative L2 of the update) from the one recomputed from its own state and micro-batches",
                c.stage, c.step
            );
            let ev = crate::stage::f32_digest(&after);
            bans.push(self.inner_failed(c.peer, c.step, c.stage, reason, ev));
        }
        bans
    }

    fn inner_passed(&mut self, p: PeerId, step: u64, k: u32, distance: f32) {
        self.stats.audits += 1;
        self.stats.inner_audits += 1;
        self.stats.per_peer.entry(p).or_default().0 += 1;
        self.stats.max_inner_distance = self.stats.max_inner_distance.max(distance);
        self.log_inner(p, step, k, true, distance);
    }

    fn inner_failed(
        &mut self,
        p: PeerId,
        step: u64,
        k: u32,
        reason: String,
        evidence: [u8; 32],
    ) -> Ban {
        self.stats.audits += 1;
        self.stats.inner_audits += 1;
        self.stats.audit_failures += 1;
        let e = self.stats.per_peer.entry(p).or_default();
        e.0 += 1;
        e.1 += 1;
        self.log_inner(p, step, k, false, 1.0);
        self.ban(p, step, k, reason, evidence)
    }

    /// A ledger entry for an inner-step audit: micro-batch [`INNER_STEP_MB`] names the step's
    /// optimizer update rather than a pass.
    fn log_inner(&mut self, peer: PeerId, step: u64, stage: u32, passed: bool, distance: f32) {
        let key = MbKey {
            step,
            mb: INNER_STEP_MB,
            attempt: 0,
        };
        self.log_audit(peer, key, stage, PeerId([0; 32]), None, passed, distance);
    }

    /// Fetches, before the step's audit jobs run, the own state of every peer they audit
    /// (pinned by the digest the trainer recorded for it; a receipt signing another is refused
    /// by the record check anyway).
    pub(super) async fn prefetch_own_states(
        &mut self,
        v: &StepView<'_>,
        jobs: &[(MbKey, u32, bool)],
    ) {
        for &(key, k, _) in jobs {
            let hop = self.seen[&key].route[k as usize];
            let Some(&digest) = v.own.get(&hop.peer) else {
                continue;
            };
            if self.state_lies.contains_key(&(k, hop.peer)) {
                continue;
            }
            // Whole when its inner step is audited too (one fetch serves both), else the weights.
            let full = self.inner_due(v, k, &hop.peer);
            match self.own_state(v, k, hop.peer, hop.addr, digest, full).await {
                Ok(_) => {}
                Err(OwnState::Lied(reason, evidence)) => {
                    self.state_lies.insert((k, hop.peer), (reason, evidence));
                }
                Err(OwnState::Unavailable(e)) => {
                    tracing::warn!(peer = %hop.peer.short(), error = %e, "audited peer's state unavailable");
                }
            }
        }
    }

    /// A state [`Self::prefetch_own_states`] fetched.
    fn prefetched(
        &self,
        k: u32,
        p: PeerId,
        digest: [u8; 32],
    ) -> std::result::Result<Arc<Shard>, OwnState> {
        if let Some(s) = self
            .states
            .get(&(k, p, digest))
            .filter(|_| self.states_step == self.step)
        {
            return Ok(s.0.clone());
        }
        match self.state_lies.get(&(k, p)) {
            Some((reason, evidence)) => Err(OwnState::Lied(reason.clone(), *evidence)),
            None => Err(OwnState::Unavailable(Error::NoState)),
        }
    }

    /// The audited peer's own state at this step, pinned by `digest` (cached per step): `full`
    /// with its moments (an inner step's recomputation needs them), else its weights only (a
    /// pass's recomputation; a third of the bytes over the replica's uplink).
    async fn own_state(
        &mut self,
        v: &StepView<'_>,
        k: u32,
        p: PeerId,
        addr: SocketAddr,
        digest: [u8; 32],
        full: bool,
    ) -> std::result::Result<Arc<Shard>, OwnState> {
        if self.states_step != v.step {
            self.states.clear();
            self.state_lies.clear();
            self.states_step = v.step;
        }
        if let Some((s, has_moments)) = self.states.get(&(k, p, digest))
            && (*has_moments || !full)
        {
            return Ok(s.clone());
        }
        let shard = if v.step == 0 {
            let cfg = v.config.clone();
            let s = tokio::task::spawn_blocking(move || crate::stage::init_shard(&cfg, k))
                .await
                .map_err(|e| OwnState::Unavailable(e.into()))?
                .map_err(OwnState::Unavailable)?;
            if s.weights_digest()
                .map_err(|e| OwnState::Unavailable(e.into()))?
                != digest
            {
                return Err(OwnState::Lied(
                    "receipt signs weights other than the seed's at step 0".into(),
                    digest,
                ));
            }
            s
        } else {
            let opts = StageOptions::new(v.run, v.config.clone(), k);
            let req = StateRequest {
                run: v.run,
                epoch: v.epoch,
                stage: k,
                step: v.step,
                chunk_bytes: opts.chunk_bytes,
                weights_only: !full,
            };
            let from = [Endpoint { peer: p, addr }];
            match fetch_verified(v.peer, v.config, &req, &from, digest).await {
                Ok(f) => {
                    self.stats.bytes += f.bytes.len() as u64;
                    self.stats.state_bytes += f.bytes.len() as u64;
                    f.shard
                }
                Err(f) => {
                    return Err(match f.bad.into_iter().find(|b| b.peer == p) {
                        Some(b) => OwnState::Lied(
                            format!("served a state other than the one it signed: {}", b.reason),
                            b.evidence,
                        ),
                        None => OwnState::Unavailable(f.error),
                    });
                }
            }
        };
        let shard = Arc::new(shard);
        // At step 0 the seed's state is whole (its moments are zero).
        let whole = full || v.step == 0;
        self.states.insert((k, p, digest), (shard.clone(), whole));
        Ok(shard)
    }

    /// After the step's `Apply`: the audited inner steps of `step` take the optimizer step the
    /// replicas were told to take (`lr`, `clip`).
    pub(super) fn step_inner(&mut self, step: u64, config: &RunConfig, lr: f64, clip: f64) {
        let hp = config.adamw();
        for c in self.inner.iter_mut().filter(|c| c.step == step) {
            if let Some(mut s) = c.shard.take() {
                match s
                    .optimizer_step(&hp, lr, clip)
                    .and_then(|()| Ok((s.weights_flat()?, s.weights_digest()?)))
                {
                    Ok(w) => c.expected = Some(w),
                    Err(e) => tracing::warn!(error = %e, "inner-step audit: optimizer step failed"),
                }
            }
        }
    }
}
