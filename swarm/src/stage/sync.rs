//! The step-end replica sync of a stage worker: SyncStart, the all-gather of GradShares, SyncDone,
//! and Apply (the optimizer step).

use super::*;

mod share;
use share::{ShareFate, share_fate, takes_early};

impl StageWorker {
    pub(super) async fn on_sync_start(
        &self,
        ctx: RequestCtx,
        body: Vec<u8>,
    ) -> Result<rpc::Reply, RpcError> {
        let s: SyncStart = wire::decode_body(&body)?;
        self.check_run(&s.run, s.epoch)?;
        self.check_stage(s.stage)?;
        if s.mb_counts.len() != s.participants.len() || s.addrs.len() != s.participants.len() {
            return Err(refuse(
                code::BAD_REQUEST,
                "participants, counts and addresses differ",
            ));
        }
        if self.step() != Some(s.step) {
            return Err(refuse(code::BAD_REQUEST, "this stage is not at that step"));
        }
        if (s.phase == SyncPhase::Gradient) == self.inner.drift.is_some() {
            return Err(refuse(
                code::BAD_REQUEST,
                format!("sync phase {:?} is not this run's sync mode", s.phase),
            ));
        }
        if s.phase == SyncPhase::Outer {
            return self.start_outer(ctx, s);
        }
        let me = s.participants.iter().position(|p| *p == self.inner.me);
        let mut st = lock(&self.inner.state);
        // The step is over: its contexts can never be used.
        st.contexts.retain(|k, _| k.step > s.step);
        let Some(me) = me else {
            // Excluded: drop the accumulator; the trainer re-syncs our weights afterwards.
            st.counted.clear();
            st.end_round();
            drop(st);
            if let Some(sh) = lock(&self.inner.shard).as_mut() {
                sh.zero_grads();
            }
            return rpc::reply(&Ack);
        };
        let mine = if st.acc_step == s.step {
            st.counted.len() as u32
        } else {
            0
        };
        if mine != s.mb_counts[me] {
            return Err(refuse(
                code::BAD_REQUEST,
                format!(
                    "this replica counted {mine} micro-batches, the trainer says {}",
                    s.mb_counts[me]
                ),
            ));
        }
        if st.round.as_ref().is_some_and(|r| r.step == s.step) {
            return Err(refuse(code::BAD_REQUEST, "sync already started"));
        }
        let n = s.participants.len();
        let mut shares = vec![None; n];
        for (i, p) in s.participants.iter().enumerate() {
            match st.early.remove(&(s.step, *p)) {
                Some((round, f)) if takes_early(round, s.round) => shares[i] = Some(f),
                Some((round, _)) => {
                    tracing::debug!(peer = %p.short(), step = s.step, round, "share of a dropped sync round ignored")
                }
                None => {}
            }
        }
        self.begin_round(st, ctx, s, me, shares)
    }

    /// An outer round of a multi-step sync (state step `s.step`): no micro-batches and no
    /// contexts are involved; a redo (higher round) replaces the current round of the step.
    fn start_outer(&self, ctx: RequestCtx, s: SyncStart) -> Result<rpc::Reply, RpcError> {
        let Some(me) = s.participants.iter().position(|p| *p == self.inner.me) else {
            return Err(refuse(code::BAD_REQUEST, "not a participant of this sync"));
        };
        let mut st = lock(&self.inner.state);
        if let Some(r) = st.round.as_ref().filter(|r| r.step == s.step)
            && (r.phase != SyncPhase::Outer || r.round >= s.round)
        {
            return Err(refuse(code::BAD_REQUEST, "sync already started"));
        }
        let n = s.participants.len();
        let mut shares = vec![None; n];
        for (i, p) in s.participants.iter().enumerate() {
            if let Some((round, f)) = st.early.remove(&(s.step, *p))
                && round == s.round
            {
                shares[i] = Some(f);
            }
        }
        self.begin_round(st, ctx, s, me, shares)
    }

    /// Starts round `s` with the shares that came early (`shares`, in participant order; `me`
    /// is our index) in place of any round before it, and runs it in the background.
    fn begin_round(
        &self,
        mut st: std::sync::MutexGuard<'_, State>,
        ctx: RequestCtx,
        s: SyncStart,
        me: usize,
        shares: Vec<Option<Vec<u8>>>,
    ) -> Result<rpc::Reply, RpcError> {
        st.early.clear();
        st.end_round();
        st.generation += 1;
        let generation = st.generation;
        st.round = Some(Round {
            step: s.step,
            round: s.round,
            generation,
            participants: s.participants.clone(),
            me,
            shares,
            own_decoded: None,
            trainer: ctx.remote_addr,
            trainer_id: ctx.from,
            phase: s.phase,
            summing: false,
            summed: false,
            share_bytes: 0,
            share_dense: 0,
            delivered: Traffic::default(),
        });
        drop(st);
        let w = self.clone();
        tokio::spawn(async move { w.run_sync(s, generation).await });
        rpc::reply(&Ack)
    }

    /// Encodes this replica's pseudo-gradient (`anchor - weights`) with its error feedback; the
    /// residual is snapshotted first so a redone or reset round can undo the encode.
    fn encode_pseudo_gradient(&self, step: u64) -> Result<Vec<u8>> {
        let drift = self
            .inner
            .drift
            .as_ref()
            .ok_or_else(|| Error::NoOuterSync("no multi-step sync in this run"))?;
        let w = lock(&self.inner.shard)
            .as_ref()
            .ok_or_else(|| Error::NoState)?
            .weights_flat()?;
        let mut d = lock(drift);
        let d = &mut *d;
        match &d.backup {
            Some((s, snap)) if *s == step => d.feedback.restore(snap)?,
            _ => d.backup = Some((step, d.feedback.snapshot())),
        }
        d.pending = None;
        let mut delta = Vec::new();
        swarm_compression::outer::pseudo_gradient(&d.anchor, &w, &mut delta)?;
        let mut out = Vec::new();
        let encoder = if swarm_model::SyncConfig::in_warmup(step, d.warmup_steps) {
            &mut d.warmup_encoder
        } else {
            &mut d.encoder
        };
        d.feedback.encode(encoder, &delta, &mut out)?;
        Ok(out)
    }

    pub(super) async fn run_sync(&self, s: SyncStart, generation: u64) {
        let n = s.participants.len();
        if s.phase == SyncPhase::Local {
            // No exchange: each replica steps on its own gradient. The fp32 baseline still counts
            // what a per-step sync would have sent (4 bytes per parameter to each other replica).
            if let Some(r) = lock(&self.inner.state)
                .round
                .as_mut()
                .filter(|r| r.generation == generation)
            {
                r.share_dense = (4 * self.inner.num_params * (n - 1)) as u64;
            }
            for _ in 1..n {
                StageStats::add(
                    &self.inner.stats.sync_wire,
                    &self.inner.stats.sync_dense,
                    0,
                    self.inner.num_params,
                );
            }
        } else if n > 1 || s.phase == SyncPhase::Outer {
            // Encode our accumulated gradient (or pseudo-gradient) with error feedback.
            let shard = self.inner.shard.clone();
            let fb = self.inner.feedback.clone();
            let encoder = self.inner.sync_encoder.clone();
            let bufs = self.inner.sync_bufs.clone();
            let (outer, w) = (s.phase == SyncPhase::Outer, self.clone());
            let step = s.step;
            let enc =
                tokio::task::spawn_blocking(move || -> Result<(Vec<u8>, Option<Vec<f32>>)> {
                    if outer {
                        return Ok((w.encode_pseudo_gradient(step)?, None));
                    }
                    let g = lock(&shard)
                        .as_ref()
                        .ok_or_else(|| Error::NoState)?
                        .grads_flat()?;
                    let mut out = Vec::new();
                    let mut enc = lock(&encoder);
                    let mut fb = lock(&fb);
                    fb.encode(&mut enc, &g, &[g.len()], &mut out)?;
                    let mut own = take_buf(&bufs);
                    own.extend_from_slice(fb.decoded());
                    Ok((out, Some(own)))
                })
                .await
                .map_err(Error::from)
                .and_then(|r| r);
            let (frame, own_decoded) = match enc {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!(error = %e, "encoding the grad share failed");
                    return;
                }
            };
            let me = {
                let mut st = lock(&self.inner.state);
                let Some(r) = st
                    .round
                    .as_mut()
                    .filter(|r| r.step == s.step && r.generation == generation)
                else {
                    return;
                };
                r.shares[r.me] = Some(frame.clone());
                r.own_decoded = own_decoded;
                r.share_bytes = (frame.len() * (n - 1)) as u64;
                // A pseudo-gradient's fp32 baseline was counted at every inner step.
                if !outer {
                    r.share_dense = (4 * self.inner.num_params * (n - 1)) as u64;
                }
                r.me
            };
            let dense_elems = if outer { 0 } else { self.inner.num_params };
            let msg = GradShare {
                run: s.run,
                epoch: s.epoch,
                step: s.step,
                stage: s.stage,
                round: s.round,
                from: self.inner.me,
                frame,
            };
            let share = Traffic::default().plus_frame(msg.frame.len(), dense_elems);
            let sends = (0..n).filter(|i| *i != me).map(|i| {
                let (addr, peer) = (s.addrs[i], s.participants[i]);
                let msg = &msg;
                async move {
                    let r = self.send(addr, peer, msg).await;
                    // Noted as each send ends: a dropped round reports what arrived (a refusal
                    // is an answer, so the share arrived too).
                    if matches!(r, Ok(()) | Err(Error::Remote(_))) {
                        lock(&self.inner.state).share_delivered(generation, share);
                    }
                    (peer, r)
                }
            });
            for (peer, r) in futures::future::join_all(sends).await {
                match r {
                    Ok(()) => StageStats::add(
                        &self.inner.stats.sync_wire,
                        &self.inner.stats.sync_dense,
                        msg.frame.len(),
                        dense_elems,
                    ),
                    Err(e) => {
                        tracing::warn!(peer = %peer.short(), error = %e, "grad share not delivered")
                    }
                }
            }
        }
        self.try_finish_sync(s.step).await;
    }

    pub(super) async fn on_grad_share(
        &self,
        ctx: RequestCtx,
        body: Vec<u8>,
    ) -> Result<rpc::Reply, RpcError> {
        let g: GradShare = wire::decode_body(&body)?;
        self.check_run(&g.run, g.epoch)?;
        self.check_stage(g.stage)?;
        if g.from != ctx.from {
            return Err(refuse(code::FORBIDDEN, "a share must come from its author"));
        }
        // Cheap header check before holding the bytes.
        swarm_compression::FrameInfo::read(&g.frame, &Limits::new(self.share_elements()))
            .map_err(|e| refuse(code::BAD_REQUEST, format!("grad share: {e}")))?;
        let step = g.step;
        {
            let mut st = lock(&self.inner.state);
            // A share of a round the trainer dropped (a participant died) must not be summed
            // into a later one: it holds an outdated gradient.
            let fate = share_fate(
                st.round.as_ref().map(|r| (r.step, r.round)),
                st.early.get(&(step, g.from)).map(|(round, _)| *round),
                step,
                g.round,
            );
            if fate == ShareFate::Stale {
                tracing::debug!(peer = %g.from.short(), step, round = g.round, "share of a dropped sync round ignored");
                return rpc::reply(&Ack);
            }
            match st.round.as_mut() {
                Some(r) if fate == ShareFate::Take => {
                    let Some(i) = r.participants.iter().position(|p| *p == g.from) else {
                        return Err(refuse(code::FORBIDDEN, "not a participant of this sync"));
                    };
                    if r.shares[i].is_some() {
                        return Err(refuse(code::BAD_REQUEST, "share already received"));
                    }
                    r.shares[i] = Some(g.frame);
                }
                _ => {
                    // Before our SyncStart: keep it, bounded, for the current step only (a newer
                    // round's share replaces an older one's).
                    let key = (step, g.from);
                    if self.step() != Some(step)
                        || (!st.early.contains_key(&key)
                            && st.early.len() >= crate::protocol::MAX_REPLICAS)
                    {
                        return Err(refuse(code::BAD_REQUEST, "no sync of that step here"));
                    }
                    st.early.insert(key, (g.round, g.frame));
                    return rpc::reply(&Ack);
                }
            }
        }
        let w = self.clone();
        tokio::spawn(async move { w.try_finish_sync(step).await });
        rpc::reply(&Ack)
    }

    /// When every share of the round is in: decode all in participant order, sum, set the shard's
    /// gradients and report SyncDone.
    pub(super) async fn try_finish_sync(&self, step: u64) {
        let (
            (frames, own),
            trainer,
            trainer_id,
            share_bytes,
            share_dense,
            generation,
            phase,
            round,
        ) = {
            let mut st = lock(&self.inner.state);
            let Some(r) = st.round.as_mut().filter(|r| r.step == step) else {
                return;
            };
            let n = r.participants.len();
            let exchange = match r.phase {
                SyncPhase::Local => false,
                SyncPhase::Outer => true,
                SyncPhase::Gradient => n > 1,
            };
            if r.summing || r.summed || (exchange && r.shares.iter().any(Option::is_none)) {
                return;
            }
            r.summing = true;
            let frames: Vec<Vec<u8>> = r.shares.iter().flatten().cloned().collect();
            let own = r
                .own_decoded
                .take()
                .filter(|_| r.phase == SyncPhase::Gradient)
                .map(|d| (r.me, d));
            (
                (frames, own),
                r.trainer,
                r.trainer_id,
                r.share_bytes,
                r.share_dense,
                r.generation,
                r.phase,
                r.round,
            )
        };
        let shard = self.inner.shard.clone();
        let feedback = self.inner.feedback.clone();
        let n_params = self.inner.num_params;
        let (codecs, bufs) = (self.inner.codecs.clone(), self.inner.sync_bufs.clone());
        let w = self.clone();
        let done = tokio::task::spawn_blocking(move || -> Result<(f64, [u8; 32])> {
            match phase {
                SyncPhase::Outer => return w.average_pseudo_gradients(step, round, &frames),
                SyncPhase::Local => return w.own_mean_gradient(),
                SyncPhase::Gradient => {}
            }
            let mut g = lock(&shard);
            let s = g.as_mut().ok_or_else(|| Error::NoState)?;
            if frames.len() > 1 {
                let limits = Limits::new(n_params);
                let (mut sum, mut buf) = (take_buf(&bufs), take_buf(&bufs));
                let summed = codecs.with_decoder(|dec| -> Result<()> {
                    for (i, f) in frames.iter().enumerate() {
                        let vals: &[f32] = match &own {
                            Some((me, d)) if *me == i && d.len() == n_params => d,
                            _ => {
                                let info = dec.decode(f, &limits, &mut buf)?;
                                if info.elements != n_params {
                                    return Err(Error::ShareSize {
                                        got: info.elements,
                                        expected: n_params,
                                    });
                                }
                                &buf
                            }
                        };
                        if i == 0 {
                            sum.clear();
                            sum.extend_from_slice(vals);
                        } else {
                            sum.iter_mut().zip(vals).for_each(|(a, b)| *a += *b);
                        }
                    }
                    Ok(())
                });
                let done = summed.and_then(|()| {
                    s.set_grads_flat(&sum)?;
                    let norm = flat_sq_norm(s, &sum)?;
                    Ok((norm, f32_digest(&sum)))
                });
                give_buf(&bufs, sum);
                give_buf(&bufs, buf);
                if let Some((_, d)) = own {
                    give_buf(&bufs, d);
                }
                done
            } else {
                // Alone, nothing is compressed: what earlier shares left in the error-feedback
                // residual is delivered now, in full, rather than steps later when a second
                // replica arrives (a stale residual then lands as one large, outdated update).
                let mut flat = s.grads_flat()?;
                let mut fb = lock(&feedback);
                if fb.residual().iter().any(|r| *r != 0.0) {
                    flat = fb.compensate(&flat)?.to_vec();
                    s.set_grads_flat(&flat)?;
                }
                fb.reset();
                Ok((flat_sq_norm(s, &flat)?, f32_digest(&flat)))
            }
        })
        .await
        .map_err(Error::from)
        .and_then(|r| r);
        let (norm, digest) = match done {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(step, error = %e, "summing the grad shares failed");
                if let Some(r) = lock(&self.inner.state)
                    .round
                    .as_mut()
                    .filter(|r| r.generation == generation)
                {
                    r.summing = false;
                }
                return;
            }
        };
        let dropped = {
            let mut st = lock(&self.inner.state);
            let Some(r) = st.round.as_mut().filter(|r| r.generation == generation) else {
                // Reset while summing: this round is void (the reset zeroed the gradients).
                return;
            };
            r.summing = false;
            r.summed = true;
            let round = r.round;
            if st.reported.len() >= 8 {
                st.reported.remove(0);
            }
            st.reported.push(generation);
            (
                round,
                std::mem::take(&mut st.dropped_shares),
                std::mem::take(&mut st.abandoned),
            )
        };
        let (round, dropped, (abandoned_activations, abandoned_gradients)) = dropped;
        let msg = SyncDone {
            run: self.inner.opts.run,
            epoch: self.epoch(),
            step,
            stage: self.inner.opts.stage,
            round,
            grad_sq_norm: norm,
            grad_digest: digest,
            share_bytes: share_bytes.saturating_add(dropped.wire),
            share_dense_bytes: share_dense.saturating_add(dropped.dense),
            abandoned_activations,
            abandoned_gradients,
        };
        if let Err(e) = self.send(trainer, trainer_id, &msg).await {
            tracing::warn!(step, error = %e, "could not report SyncDone");
        }
    }

    pub(super) async fn on_apply(
        &self,
        _ctx: RequestCtx,
        body: Vec<u8>,
    ) -> Result<rpc::Reply, RpcError> {
        let a: Apply = wire::decode_body(&body)?;
        self.check_run(&a.run, a.epoch)?;
        self.check_stage(a.stage)?;
        if let Some(c) = &a.credit {
            self.inner.stats.set_credit(c);
        }
        {
            let st = lock(&self.inner.state);
            match &st.round {
                Some(r) if r.step == a.step && r.summed && r.phase == a.phase => {}
                _ => return Err(refuse(code::BAD_REQUEST, "no finished sync of that step")),
            }
        }
        if a.phase == SyncPhase::Outer {
            return self.apply_outer(a).await;
        }
        let shard = self.inner.shard.clone();
        let hp = self.inner.adamw;
        let fault = self.inner.fault.clone();
        let (at, digest) = tokio::task::spawn_blocking(move || -> Result<(u64, [u8; 32])> {
            let mut g = lock(&shard);
            let s = g.as_mut().ok_or_else(|| Error::NoState)?;
            fault.before_apply(a.step, s)?;
            s.optimizer_step(&hp, fault.step_lr(a.step, a.lr), a.clip_scale)?;
            s.zero_grads();
            Ok((s.step(), s.weights_digest()?))
        })
        .await
        .map_err(|e| refuse(code::INTERNAL, e.to_string()))?
        .map_err(|e| refuse(code::INTERNAL, e.to_string()))?;
        // The next step's receipts sign this digest: not computed a second time.
        self.remember_step_digest(at, digest);
        {
            let mut st = lock(&self.inner.state);
            st.round = None;
            st.counted.clear();
            st.acc_step = a.step + 1;
            st.contexts.retain(|k, _| k.step > a.step);
            st.sent.retain(|k, _| k.step > a.step);
            st.exports = Default::default();
        }
        rpc::reply(&Applied {
            run: a.run,
            epoch: a.epoch,
            step: a.step,
            stage: a.stage,
            digest,
            sent: self.inner.stats.sent(),
        })
    }
}

/// A stage-sized f32 buffer from `bufs` (empty, its capacity kept), or a new one.
fn take_buf(bufs: &Mutex<Vec<Vec<f32>>>) -> Vec<f32> {
    let mut b = lock(bufs).pop().unwrap_or_default();
    b.clear();
    b
}

/// Returns a buffer taken with [`take_buf`] (a few are kept).
fn give_buf(bufs: &Mutex<Vec<Vec<f32>>>, b: Vec<f32>) {
    let mut v = lock(bufs);
    if v.len() < 4 {
        v.push(b);
    }
}

/// What [`Shard::grad_sq_norm`] reports once `flat` is the shard's gradient: each parameter's
/// f64 sum of squares, added in parameter order, so the same bits; without the f64 copy of
/// every gradient it makes.
fn flat_sq_norm(s: &Shard, flat: &[f32]) -> Result<f64> {
    let mut total = 0f64;
    let mut off = 0;
    for (_, shape) in s.parameter_names() {
        let n: usize = shape.iter().product();
        let Some(g) = flat.get(off..off + n) else {
            return Err(Error::ShareSize {
                got: flat.len(),
                expected: s.num_parameters(),
            });
        };
        total += swarm_model::shard::sq_sum_f64(g);
        off += n;
    }
    Ok(total)
}

impl StageWorker {
    /// Local phase: the mean gradient of this replica's own micro-batches (the shard holds their
    /// sum, each scaled by 1/micro_batches), set as its gradient; its norm and digest.
    fn own_mean_gradient(&self) -> Result<(f64, [u8; 32])> {
        let mine = lock(&self.inner.state).counted.len();
        let total = self.inner.opts.config.train.micro_batches;
        let mut g = lock(&self.inner.shard);
        let s = g.as_mut().ok_or_else(|| Error::NoState)?;
        let flat = crate::compute::own_mean_gradient(s, mine, total)?;
        Ok((s.grad_sq_norm()?, f32_digest(&flat)))
    }

    /// Outer phase: decodes every share in participant order into their mean (the same values
    /// on every replica), takes the outer step from the anchor into `pending` (committed by
    /// `Apply`); the mean's squared norm and digest, which the replicas must agree on.
    fn average_pseudo_gradients(
        &self,
        step: u64,
        round: u32,
        frames: &[Vec<u8>],
    ) -> Result<(f64, [u8; 32])> {
        let drift = self
            .inner
            .drift
            .as_ref()
            .ok_or_else(|| Error::NoOuterSync("no multi-step sync in this run"))?;
        let cfg = &self.inner.opts.config.sync;
        let n = self.inner.num_params;
        let weight = 1.0 / frames.len().max(1) as f32;
        let (mut mean, mut scratch, mut dec) = (vec![0f32; n], Vec::new(), Decoder::new());
        for f in frames {
            swarm_compression::outer::SparseFeedback::add_share(
                &mut dec,
                f,
                cfg.chunk,
                weight,
                &mut mean,
                &mut scratch,
            )?;
        }
        let mut d = lock(drift);
        let mut anchor = d.anchor.clone();
        swarm_compression::outer::OuterOptimizer::new(n, cfg.outer_lr, 0.0, false)
            .step(&mut anchor, &mean)?;
        d.pending = Some((step, round, anchor));
        let sq: f64 = mean.iter().map(|x| f64::from(*x) * f64::from(*x)).sum();
        Ok((sq, f32_digest(&mean)))
    }

    /// `Apply` of an outer round: the replica takes the new anchor as its weights (its inner
    /// AdamW moments stay its own) and reports the weights digest, which the trainer compares.
    async fn apply_outer(&self, a: Apply) -> Result<rpc::Reply, RpcError> {
        let round = lock(&self.inner.state).round.as_ref().map(|r| r.round);
        let drift = self
            .inner
            .drift
            .clone()
            .ok_or_else(|| refuse(code::BAD_REQUEST, "no multi-step sync in this run"))?;
        let shard = self.inner.shard.clone();
        let step = a.step;
        let (at, digest) = tokio::task::spawn_blocking(move || -> Result<(u64, [u8; 32])> {
            let mut d = lock(&drift);
            let anchor = match d.pending.take() {
                Some((s, r, anchor)) if s == step && Some(r) == round => anchor,
                _ => return Err(Error::NoOuterSync("no outer step computed for this round")),
            };
            let mut g = lock(&shard);
            let s = g.as_mut().ok_or_else(|| Error::NoState)?;
            s.set_weights_flat(&anchor)?;
            d.anchor = anchor;
            d.backup = None;
            Ok((s.step(), s.weights_digest()?))
        })
        .await
        .map_err(|e| refuse(code::INTERNAL, e.to_string()))?
        .map_err(|e| refuse(code::INTERNAL, e.to_string()))?;
        // The weights changed at the same step: the step's receipts sign the new digest.
        self.remember_step_digest(at, digest);
        {
            let mut st = lock(&self.inner.state);
            st.round = None;
            st.exports = Default::default();
        }
        rpc::reply(&Applied {
            run: a.run,
            epoch: a.epoch,
            step: a.step,
            stage: a.stage,
            digest,
            sent: self.inner.stats.sent(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sync's squared norm from the flat sum is the shard's own, bit for bit (the global
    /// clip, and so every weight, depends on it), for a stage and for the ends.
    #[test]
    fn flat_sq_norm_is_the_shards() {
        let cfg = swarm_testkit::micro_config(5);
        let mut pieces: Vec<Vec<Piece>> = Piece::stages(&cfg.stages)
            .into_iter()
            .map(|p| vec![p])
            .collect();
        pieces.push(vec![Piece::Embedding, Piece::Head]);
        for p in &pieces {
            let mut s = Shard::new(&cfg.model, p, 3, DType::F32, &Device::Cpu).unwrap();
            let n = s.num_parameters();
            // Values of very different magnitudes, so the summation order shows in the bits.
            let g: Vec<f32> = (0..n)
                .map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 10f32.powi((i % 9) as i32 - 6))
                .collect();
            s.set_grads_flat(&g).unwrap();
            let want = s.grad_sq_norm().unwrap();
            assert_eq!(flat_sq_norm(&s, &g).unwrap().to_bits(), want.to_bits());
            assert!(flat_sq_norm(&s, &g[1..]).is_err());
        }
    }
}
