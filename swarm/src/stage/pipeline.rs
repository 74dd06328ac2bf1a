//! The pipeline side of a stage worker: Forward and Backward requests checked, queued, computed on
//! the blocking pool and passed on (or reported as failed), and Abandon.

use super::*;
use crate::compute;
use crate::protocol::PassTime;

impl StageWorker {
    pub(super) async fn on_forward(
        &self,
        ctx: RequestCtx,
        body: Vec<u8>,
    ) -> Result<rpc::Reply, RpcError> {
        let f: Forward = wire::decode_body(&body)?;
        self.check_run(&f.run, f.epoch)?;
        let hop = f.route[f.hop as usize];
        if hop.peer != self.inner.me {
            return Err(refuse(code::BAD_REQUEST, "this hop is another peer"));
        }
        self.check_stage(hop.stage)?;
        let num_stages = self.inner.opts.config.stages.len().saturating_sub(1);
        if f.route.len() != num_stages {
            return Err(refuse(
                code::BAD_REQUEST,
                "route length is not the stage count",
            ));
        }
        match self.step() {
            Some(s) if s == f.key.step => {}
            Some(s) => {
                return Err(refuse(
                    code::BAD_REQUEST,
                    format!("step {}, this stage is at step {s}", f.key.step),
                ));
            }
            None => return Err(refuse(code::BUSY, "state not loaded yet")),
        }
        // A peer's frame must come with its signed receipt for exactly those bytes; the
        // trainer (trusted) sends none.
        if ctx.from != f.trainer.peer {
            let Some(prev) = (f.hop as usize).checked_sub(1).map(|i| f.route[i]) else {
                return Err(refuse(code::FORBIDDEN, "hop 0 comes from the trainer"));
            };
            if prev.peer != ctx.from {
                return Err(refuse(code::FORBIDDEN, "not sent by the previous hop"));
            }
            if let Err(why) = Receipt::check_received(
                f.receipt.as_ref(),
                &ctx.from,
                &f.run,
                f.epoch,
                f.key,
                prev.stage,
                Pass::Forward,
                &f.activations,
            ) {
                let traffic = f
                    .upstream
                    .plus_frame(f.activations.len(), self.inner.boundary_elems);
                return Err(self.refuse_receipt(f.trainer, f.key, ctx.from, why, traffic));
            }
        }
        {
            let mut st = lock(&self.inner.state);
            if st.contexts.contains_key(&f.key) {
                return Err(refuse(code::BAD_REQUEST, "attempt already held"));
            }
            if st.contexts.len() >= self.inner.opts.max_contexts {
                self.inner.stats.busy.fetch_add(1, Ordering::Relaxed);
                return Err(refuse(code::BUSY, "context table full"));
            }
            st.trainer = Some(f.trainer);
            st.contexts.insert(
                f.key,
                CtxEntry {
                    ctx: None,
                    route: f.route.clone(),
                    trainer: f.trainer,
                    accumulate: f.accumulates(hop.stage),
                },
            );
        }
        let w = self.clone();
        tokio::spawn(async move { w.run_forward(f).await });
        rpc::reply(&Ack)
    }

    pub(super) async fn run_forward(&self, f: Forward) {
        let key = f.key;
        let stage = self.inner.opts.stage;
        let hidden = self.inner.opts.config.model.hidden_size;
        let vocab = self.inner.opts.config.model.vocab_size;
        let limits = self.limits();
        let shard = self.inner.shard.clone();
        let act_codec = self.inner.act_codec;
        let codecs = self.inner.codecs.clone();
        let frame = f.activations;
        let in_len = frame.len();
        let (kept_in, fault) = (frame.clone(), self.inner.fault.clone());
        let received = f.receipt;
        let mut clock = HopClock::start();
        let computed = tokio::task::spawn_blocking(
            move || -> Result<(ForwardCtx, Vec<u8>, usize, usize, HopClock)> {
                clock.queued();
                let sub = lock(&shard).as_ref().and_then(|s| s.subspace());
                let (x, tokens, in_elems) = codecs.with_decoder(|dec| {
                    compute::decode_hidden(dec, &frame, &limits, hidden, vocab, sub.as_deref())
                })?;
                clock.codec();
                let g = lock(&shard);
                clock.queued();
                let s = g.as_ref().ok_or_else(|| Error::NoState)?;
                let (y, c) = s.stage_forward(stage as usize, &x)?;
                let y = fault.forward(key, stage, &x, y)?;
                drop(g);
                clock.compute();
                let (out, elems) =
                    compute::encode_hidden(&codecs, act_codec, sub.as_deref(), &y, &tokens)?;
                clock.codec();
                Ok((c, out, elems, in_elems, clock))
            },
        )
        .await
        .map_err(Error::from)
        .and_then(|r| r);
        let (c, out, elems, in_elems, clock) = match computed {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(stage, step = key.step, microbatch = key.mb, error = %e, "forward failed");
                let entry = lock(&self.inner.state).contexts.remove(&key);
                if let Some(entry) = entry {
                    let traffic = f.upstream.plus_frame(in_len, self.inner.boundary_elems);
                    self.report_failure(
                        &entry.trainer,
                        key,
                        self.inner.me,
                        false,
                        e.to_string(),
                        traffic,
                    )
                    .await;
                }
                return;
            }
        };
        self.inner.stats.forwards.fetch_add(1, Ordering::Relaxed);
        let receipt = self.record_pass(
            Pass::Forward,
            f.run,
            f.epoch,
            key,
            kept_in,
            out.clone(),
            received,
        );
        // Keep the context unless the attempt was abandoned meanwhile.
        let (route, trainer) = {
            let mut st = lock(&self.inner.state);
            match st.contexts.get_mut(&key) {
                Some(e) => {
                    e.ctx = Some(c);
                    (e.route.clone(), e.trainer)
                }
                None => return,
            }
        };
        StageStats::add(
            &self.inner.stats.activations_wire,
            &self.inner.stats.activations_dense,
            out.len(),
            elems,
        );
        // What the previous hop sent us is upstream of the next message.
        let upstream = f.upstream.plus_frame(in_len, in_elems);
        let time = f.time.plus(clock.time);
        let with_ours = upstream.plus_frame(out.len(), elems);
        let ours = Traffic::default().plus_frame(out.len(), elems);
        let next = f.hop as usize + 1;
        let (target, result) = if next < route.len() {
            let msg = Forward {
                run: f.run,
                epoch: f.epoch,
                key,
                route: route.clone(),
                hop: next as u32,
                trainer,
                accumulate: f.accumulate,
                upstream,
                time,
                activations: out,
                receipt,
            };
            let h = route[next];
            (h.peer, self.send(h.addr, h.peer, &msg).await)
        } else {
            let msg = ForwardOut {
                run: f.run,
                epoch: f.epoch,
                key,
                stage,
                upstream,
                time,
                activations: out,
                receipt,
            };
            (
                trainer.peer,
                self.send(trainer.addr, trainer.peer, &msg).await,
            )
        };
        // Our frame arrived (a refusal is an answer too): if the trainer abandons the attempt
        // without a report of this pass, it learns of the frame from us.
        if matches!(&result, Ok(()) | Err(Error::Remote(_))) {
            lock(&self.inner.state).frame_delivered(key, false, ours);
        }
        if let Err(e) = result {
            let busy = matches!(&e, Error::Remote(r) if r.code == code::BUSY);
            tracing::info!(stage, step = key.step, microbatch = key.mb, error = %e, "forward send failed");
            if matches!(&e, Error::Remote(r) if r.code == code::BAD_RECEIPT) {
                // The receiver reported us; blaming it back would only muddy the record.
                lock(&self.inner.state).contexts.remove(&key);
                return;
            }
            lock(&self.inner.state).contexts.remove(&key);
            // A refusal means our frame arrived: it crossed the network too.
            let traffic = if matches!(&e, Error::Remote(_)) {
                with_ours
            } else {
                upstream
            };
            self.report_failure(&trainer, key, target, busy, e.to_string(), traffic)
                .await;
        }
    }

    pub(super) async fn send<M: WireMessage>(
        &self,
        addr: SocketAddr,
        peer: PeerId,
        msg: &M,
    ) -> Result<()> {
        let tries = self.inner.opts.send_tries.max(1);
        let mut attempt = 0;
        loop {
            match self
                .inner
                .peer
                .call::<M, Ack>(addr, Some(peer), msg)
                .await
                .map_err(Error::from)
            {
                Ok(_) => return Ok(()),
                // A refusal is an answer: retrying would get the same one.
                Err(e @ Error::Remote(_)) => return Err(e),
                Err(e) if attempt + 1 >= tries => return Err(e),
                Err(e) => {
                    tracing::debug!(attempt, error = %e, "send failed");
                    tokio::time::sleep(Duration::from_millis(50 << attempt.min(4))).await;
                    attempt += 1;
                }
            }
        }
    }

    pub(super) async fn report_failure(
        &self,
        trainer: &Endpoint,
        key: MbKey,
        failed: PeerId,
        busy: bool,
        reason: String,
        traffic: Traffic,
    ) {
        let msg = HopFailed {
            run: self.inner.opts.run,
            epoch: self.epoch(),
            key,
            failed,
            busy,
            reason,
            traffic,
        };
        if let Err(e) = self.send(trainer.addr, trainer.peer, &msg).await {
            tracing::warn!(error = %e, "could not report a failed hop to the trainer");
        }
    }

    /// Refuses a pipeline message whose receipt does not hold, reporting its sender to the
    /// trainer as the failed hop (the receipt check binds the fault to the TLS-proven sender).
    pub(super) fn refuse_receipt(
        &self,
        trainer: Endpoint,
        key: MbKey,
        sender: PeerId,
        why: &'static str,
        traffic: Traffic,
    ) -> RpcError {
        tracing::warn!(peer = %sender.short(), step = key.step, microbatch = key.mb, why, "bad receipt");
        self.inner
            .stats
            .bad_receipts
            .fetch_add(1, Ordering::Relaxed);
        let w = self.clone();
        tokio::spawn(async move {
            let reason = format!("bad receipt from {}: {why}", sender.short());
            w.report_failure(&trainer, key, sender, false, reason, traffic)
                .await;
        });
        refuse(code::BAD_RECEIPT, why)
    }

    // ---- backward -----------------------------------------------------------------------

    pub(super) async fn on_backward(
        &self,
        ctx: RequestCtx,
        body: Vec<u8>,
    ) -> Result<rpc::Reply, RpcError> {
        let b: Backward = wire::decode_body(&body)?;
        self.check_run(&b.run, b.epoch)?;
        self.check_stage(b.stage)?;
        let entry = {
            let mut st = lock(&self.inner.state);
            let (trainer, next) = match st.contexts.get(&b.key) {
                Some(e) if e.ctx.is_some() => {
                    (e.trainer, e.route.get(b.stage as usize + 1).copied())
                }
                Some(_) => return Err(refuse(code::BAD_REQUEST, "forward still running")),
                None => return Err(refuse(code::BAD_REQUEST, "no context for this attempt")),
            };
            // The gradient comes from the trainer (last stage) or the next hop, with its receipt.
            if ctx.from != trainer.peer {
                let Some(next) = next.filter(|h| h.peer == ctx.from) else {
                    return Err(refuse(code::FORBIDDEN, "not sent by the next hop"));
                };
                if let Err(why) = Receipt::check_received(
                    b.receipt.as_ref(),
                    &ctx.from,
                    &b.run,
                    b.epoch,
                    b.key,
                    next.stage,
                    Pass::Backward,
                    &b.grad,
                ) {
                    drop(st);
                    let traffic = b
                        .upstream
                        .plus_frame(b.grad.len(), self.inner.boundary_elems);
                    return Err(self.refuse_receipt(trainer, b.key, ctx.from, why, traffic));
                }
            }
            let mut e = st.contexts.remove(&b.key).expect("checked above");
            // Exactly once per step: never accumulate a micro-batch twice.
            if e.accumulate {
                if st.acc_step != b.key.step && st.counted.is_empty() {
                    st.acc_step = b.key.step;
                }
                if st.acc_step != b.key.step || st.counted.contains(&b.key.mb) {
                    e.accumulate = false;
                } else {
                    st.counted.insert(b.key.mb);
                }
            }
            e
        };
        let w = self.clone();
        tokio::spawn(async move { w.run_backward(b, entry).await });
        rpc::reply(&Ack)
    }

    pub(super) async fn run_backward(&self, b: Backward, mut entry: CtxEntry) {
        let key = b.key;
        let stage = self.inner.opts.stage;
        let limits = self.limits();
        let shard = self.inner.shard.clone();
        let grad_codec = self.inner.grad_codec;
        let codecs = self.inner.codecs.clone();
        let accumulate = entry.accumulate;
        let ctx = entry.ctx.take().expect("held context");
        let frame = b.grad;
        let in_len = frame.len();
        let (kept_in, fault) = (frame.clone(), self.inner.fault.clone());
        let received = b.receipt;
        let mut clock = HopClock::start();
        let computed =
            tokio::task::spawn_blocking(move || -> Result<(Vec<u8>, usize, usize, HopClock)> {
                clock.queued();
                let sub = lock(&shard).as_ref().and_then(|s| s.subspace());
                let (g, in_elems) = codecs.with_decoder(|dec| {
                    compute::decode_grad(dec, &frame, &limits, None, sub.as_deref())
                })?;
                clock.codec();
                let mut guard = lock(&shard);
                clock.queued();
                let s = guard.as_mut().ok_or_else(|| Error::NoState)?;
                let dx = if accumulate {
                    // Added in micro-batch order, whatever order the backwards arrive in.
                    s.backward(ctx.micro_batch(u64::from(key.mb)), &g)?
                } else {
                    s.backward_input_only(ctx, &g)?
                };
                drop(guard);
                let dx = dx.ok_or_else(|| Error::NoInputGradient)?;
                let dx = fault.backward(key, &g, dx)?;
                clock.compute();
                let (out, elems) = compute::encode_grad(&codecs, grad_codec, sub.as_deref(), &dx)?;
                clock.codec();
                Ok((out, elems, in_elems, clock))
            })
            .await
            .map_err(Error::from)
            .and_then(|r| r);
        let trainer = entry.trainer;
        let (out, elems, in_elems, clock) = match computed {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(stage, step = key.step, microbatch = key.mb, error = %e, "backward failed");
                if accumulate {
                    // The gradient may be half-added: this replica's accumulator is unreliable
                    // for the step; the trainer excludes it when told (it never got Counted).
                    lock(&self.inner.state).counted.remove(&key.mb);
                }
                let traffic = b.upstream.plus_frame(in_len, self.inner.boundary_elems);
                self.report_failure(&trainer, key, self.inner.me, false, e.to_string(), traffic)
                    .await;
                return;
            }
        };
        self.inner.stats.backwards.fetch_add(1, Ordering::Relaxed);
        let receipt = self.record_pass(
            Pass::Backward,
            b.run,
            b.epoch,
            key,
            kept_in,
            out.clone(),
            received,
        );
        let epoch = b.epoch;
        let upstream = b.upstream.plus_frame(in_len, in_elems);
        let time = b.time.plus(clock.time);
        if accumulate {
            let msg = Counted {
                run: b.run,
                epoch,
                key,
                stage,
            };
            // Beside the backward pass, not ahead of it: awaited here it put a round trip to the
            // trainer before every backward hop. The trainer needs the count only to release the
            // attempt, and waits for a count that comes after the attempt's input gradient.
            let w = self.clone();
            tokio::spawn(async move {
                if let Err(e) = w.send(trainer.addr, trainer.peer, &msg).await {
                    tracing::warn!(error = %e, "could not report Counted");
                }
            });
        }
        StageStats::add(
            &self.inner.stats.gradients_wire,
            &self.inner.stats.gradients_dense,
            out.len(),
            elems,
        );
        let with_ours = upstream.plus_frame(out.len(), elems);
        let ours = Traffic::default().plus_frame(out.len(), elems);
        let (target, result) = if stage > 0 {
            let h = entry.route[stage as usize - 1];
            let msg = Backward {
                run: b.run,
                epoch,
                key,
                stage: stage - 1,
                upstream,
                time,
                grad: out,
                receipt,
            };
            (h.peer, self.send(h.addr, h.peer, &msg).await)
        } else {
            let msg = BackwardOut {
                run: b.run,
                epoch,
                key,
                upstream,
                time,
                grad: out,
                receipt,
            };
            (
                trainer.peer,
                self.send(trainer.addr, trainer.peer, &msg).await,
            )
        };
        // Our frame arrived (a refusal is an answer too): if the trainer abandons the attempt
        // without a report of this pass, it learns of the frame from us.
        if matches!(&result, Ok(()) | Err(Error::Remote(_))) {
            lock(&self.inner.state).frame_delivered(key, true, ours);
        }
        if let Err(e) = result {
            let busy = matches!(&e, Error::Remote(r) if r.code == code::BUSY);
            if matches!(&e, Error::Remote(r) if r.code == code::BAD_RECEIPT) {
                tracing::info!(stage, step = key.step, microbatch = key.mb, error = %e, "backward refused for its receipt");
                return;
            }
            let traffic = if matches!(&e, Error::Remote(_)) {
                with_ours
            } else {
                upstream
            };
            self.report_failure(&trainer, key, target, busy, e.to_string(), traffic)
                .await;
        }
    }

    pub(super) async fn on_abandon(
        &self,
        _ctx: RequestCtx,
        body: Vec<u8>,
    ) -> Result<rpc::Reply, RpcError> {
        let a: Abandon = wire::decode_body(&body)?;
        self.check_run(&a.run, a.epoch)?;
        let mut st = lock(&self.inner.state);
        st.contexts.remove(&a.key);
        st.attempt_abandoned(a.key, a.uncounted);
        drop(st);
        rpc::reply(&Ack)
    }
}

/// One hop's [`PassTime`], measured by laps: each lap since the previous one is charged to what
/// the hop did in it.
#[derive(Clone, Copy)]
pub(super) struct HopClock {
    last: Instant,
    time: PassTime,
}

impl HopClock {
    fn start() -> HopClock {
        HopClock {
            last: Instant::now(),
            time: PassTime::default(),
        }
    }

    fn lap(&mut self) -> u64 {
        let now = Instant::now();
        let us = now.duration_since(self.last).as_micros() as u64;
        self.last = now;
        us
    }

    fn queued(&mut self) {
        self.time.queued_us += self.lap();
    }

    fn codec(&mut self) {
        self.time.codec_us += self.lap();
    }

    fn compute(&mut self) {
        self.time.compute_us += self.lap();
    }
}
