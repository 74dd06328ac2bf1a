//! The step-end replica sync of a stage worker: SyncStart, the all-gather of GradShares, SyncDone,
//! and Apply (the optimizer step).

use super::*;

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
                Some((round, f)) if round == s.round => shares[i] = Some(f),
                Some((round, _)) => {
                    tracing::debug!(peer = %p.short(), step = s.step, round, "share of a dropped sync round ignored")
                }
                None => {}
            }
        }
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
            trainer: ctx.remote_addr,
            trainer_id: ctx.from,
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

    pub(super) async fn run_sync(&self, s: SyncStart, generation: u64) {
        let n = s.participants.len();
        if n > 1 {
            // Encode our accumulated gradient with error feedback.
            let shard = self.inner.shard.clone();
            let fb = self.inner.feedback.clone();
            let sync_codec = self.inner.sync_codec;
            let seed = self.inner.opts.config.seed;
            let enc = tokio::task::spawn_blocking(move || -> Result<Vec<u8>> {
                let g = lock(&shard)
                    .as_ref()
                    .ok_or_else(|| Error::Run("no state".into()))?
                    .grads_flat()?;
                let mut out = Vec::new();
                let mut enc = Encoder::new(sync_codec)?.with_seed(seed);
                lock(&fb).encode(&mut enc, &g, &[g.len()], &mut out)?;
                Ok(out)
            })
            .await
            .map_err(|e| Error::Run(e.to_string()))
            .and_then(|r| r);
            let frame = match enc {
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
                r.share_bytes = (frame.len() * (n - 1)) as u64;
                r.share_dense = (4 * self.inner.num_params * (n - 1)) as u64;
                r.me
            };
            let msg = GradShare {
                run: s.run,
                epoch: s.epoch,
                step: s.step,
                stage: s.stage,
                round: s.round,
                from: self.inner.me,
                frame,
            };
            let share = Traffic::default().plus_frame(msg.frame.len(), self.inner.num_params);
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
                        self.inner.num_params,
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
        swarm_compression::FrameInfo::read(&g.frame, &Limits::new(self.inner.num_params))
            .map_err(|e| refuse(code::BAD_REQUEST, format!("grad share: {e}")))?;
        let step = g.step;
        {
            let mut st = lock(&self.inner.state);
            // A share of a round the trainer dropped (a participant died) must not be summed
            // into a later one: it holds an outdated gradient.
            let stale = st
                .round
                .as_ref()
                .is_some_and(|r| r.step == step && g.round < r.round)
                || st
                    .early
                    .get(&(step, g.from))
                    .is_some_and(|(round, _)| g.round < *round);
            if stale {
                tracing::debug!(peer = %g.from.short(), step, round = g.round, "share of a dropped sync round ignored");
                return rpc::reply(&Ack);
            }
            match st.round.as_mut() {
                Some(r) if r.step == step && r.round == g.round => {
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
        let (frames, trainer, trainer_id, share_bytes, share_dense, generation) = {
            let mut st = lock(&self.inner.state);
            let Some(r) = st.round.as_mut().filter(|r| r.step == step) else {
                return;
            };
            let n = r.participants.len();
            if r.summing || r.summed || (n > 1 && r.shares.iter().any(Option::is_none)) {
                return;
            }
            r.summing = true;
            let frames: Vec<Vec<u8>> = r.shares.iter().flatten().cloned().collect();
            (
                frames,
                r.trainer,
                r.trainer_id,
                r.share_bytes,
                r.share_dense,
                r.generation,
            )
        };
        let shard = self.inner.shard.clone();
        let feedback = self.inner.feedback.clone();
        let n_params = self.inner.num_params;
        let done = tokio::task::spawn_blocking(move || -> Result<(f64, [u8; 32])> {
            let mut g = lock(&shard);
            let s = g.as_mut().ok_or_else(|| Error::Run("no state".into()))?;
            if frames.len() > 1 {
                let limits = Limits::new(n_params);
                let mut dec = Decoder::new();
                let mut sum: Vec<f32> = Vec::new();
                let mut buf = Vec::new();
                for (i, f) in frames.iter().enumerate() {
                    let info = dec.decode(f, &limits, &mut buf)?;
                    if info.elements != n_params {
                        return Err(Error::Run(format!(
                            "share of {} elements for {n_params} parameters",
                            info.elements
                        )));
                    }
                    if i == 0 {
                        sum.clone_from(&buf);
                    } else {
                        sum.iter_mut().zip(&buf).for_each(|(a, b)| *a += *b);
                    }
                }
                s.set_grads_flat(&sum)?;
                Ok((s.grad_sq_norm()?, f32_digest(&sum)))
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
                Ok((s.grad_sq_norm()?, f32_digest(&flat)))
            }
        })
        .await
        .map_err(|e| Error::Run(e.to_string()))
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
            if st.reported.len() >= 8 {
                st.reported.remove(0);
            }
            st.reported.push(generation);
            (
                std::mem::take(&mut st.dropped_shares),
                std::mem::take(&mut st.abandoned),
            )
        };
        let (dropped, (abandoned_activations, abandoned_gradients)) = dropped;
        let msg = SyncDone {
            run: self.inner.opts.run,
            epoch: self.epoch(),
            step,
            stage: self.inner.opts.stage,
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
                Some(r) if r.step == a.step && r.summed => {}
                _ => return Err(refuse(code::BAD_REQUEST, "no finished sync of that step")),
            }
        }
        let shard = self.inner.shard.clone();
        let hp = self.inner.adamw;
        let fault = self.inner.fault.clone();
        let digest = tokio::task::spawn_blocking(move || -> Result<[u8; 32]> {
            let mut g = lock(&shard);
            let s = g.as_mut().ok_or_else(|| Error::Run("no state".into()))?;
            fault.before_apply(a.step, s)?;
            s.optimizer_step(&hp, a.lr, a.clip_scale)?;
            s.zero_grads();
            Ok(s.weights_digest()?)
        })
        .await
        .map_err(|e| refuse(code::INTERNAL, e.to_string()))?
        .map_err(|e| refuse(code::INTERNAL, e.to_string()))?;
        {
            let mut st = lock(&self.inner.state);
            st.round = None;
            st.counted.clear();
            st.acc_step = a.step + 1;
            st.contexts.retain(|k, _| k.step > a.step);
            st.sent.retain(|k, _| k.step > a.step);
            st.export = None;
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
