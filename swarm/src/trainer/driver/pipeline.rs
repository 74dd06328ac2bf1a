//! What the [`StepMachine`] asks for in the micro-batch phase, performed: routes from the router,
//! the ends' passes (embedding forward, head, embedding backward) on the blocking pool, the
//! pipeline messages, the router's load and health, wire-byte accounting. No decision is taken
//! here: the machine says which attempt starts, which output is accepted, who is blamed and what
//! is abandoned.

use super::*;
use crate::compute;
use crate::protocol::PassTime;
use crate::trainer::machine::{Accepted, Action, Event, Outcome, StepMachine};
use crate::trainer::timing::Part;

/// The driver's side of an attempt in flight: what performing the machine's actions needs.
pub(super) struct Work {
    key: MbKey,
    route: Vec<Hop>,
    plan: router::Plan,
    embed_ctx: Option<ForwardCtx>,
    targets: Vec<u32>,
    /// Our own frames of this attempt, counted when sent: the first activations and (once the
    /// forward pass is back) the loss gradient. The passes' `upstream` includes them again.
    sent_act: Traffic,
    sent_grad: Option<Traffic>,
    /// When the current pass (forward, then backward) left the trainer.
    sent_at: Instant,
}

impl Trainer {
    /// Performs the machine's actions until it has none. Returns the router's error when it
    /// could not route a micro-batch (the machine was told; the caller waits for replicas).
    pub(super) async fn perform(
        &mut self,
        sm: &mut StepMachine,
        work: &mut HashMap<usize, Work>,
        epoch: u32,
    ) -> Result<Option<router::Error>> {
        let mut planned: Option<(usize, router::Plan, Vec<Hop>)> = None;
        while let Some(action) = sm.poll_action() {
            match action {
                Action::Route { mb } => match self.route_micro_batch() {
                    Ok((plan, route)) => {
                        let peers = route.iter().map(|h| h.peer).collect();
                        let expected_s = plan.expected_s;
                        planned = Some((mb, plan, route));
                        sm.handle(
                            Event::Routed {
                                mb,
                                route: peers,
                                expected_s,
                            },
                            Instant::now(),
                        );
                    }
                    Err(Error::Router(e)) => {
                        sm.handle(Event::Unroutable { mb }, Instant::now());
                        return Ok(Some(e));
                    }
                    Err(e) => return Err(e),
                },
                Action::Forward {
                    key,
                    accumulate,
                    embedding,
                    ..
                } => {
                    let mb = key.mb as usize;
                    let Some((_, plan, route)) = planned.take().filter(|p| p.0 == mb) else {
                        return Err(run_err(format!(
                            "attempt of micro-batch {mb} without a route"
                        )));
                    };
                    let w = self
                        .send_forward(epoch, key, route, plan, accumulate, embedding)
                        .await?;
                    work.insert(mb, w);
                }
                other => self.perform_now(work, other),
            }
        }
        Ok(None)
    }

    /// Performs the actions of a machine whose micro-batch phase is closed (releases only: a
    /// closed machine asks for no route).
    pub(super) fn settle(&mut self, sm: &mut StepMachine, work: &mut HashMap<usize, Work>) {
        while let Some(action) = sm.poll_action() {
            self.perform_now(work, action);
        }
    }

    /// Gives up the current step (a stage's state is gone): attempts released, nothing applied.
    pub(super) fn abandon_step(
        &mut self,
        sm: &mut StepMachine,
        work: &mut HashMap<usize, Work>,
    ) -> Option<StepReport> {
        sm.close_micro_batches();
        self.settle(sm, work);
        self.shared
            .admissions(Some(AdmitEvent::StepAbandoned), Instant::now());
        None
    }

    fn perform_now(&mut self, work: &mut HashMap<usize, Work>, action: Action) {
        match action {
            Action::ChargeFailedPass {
                key,
                backward,
                traffic,
            } => {
                // What the failed pass had sent, less our own frame (counted when sent).
                let Some(w) = work.get(&(key.mb as usize)).filter(|w| w.key == key) else {
                    return;
                };
                let (channel, ours) = if backward {
                    (Channel::Gradients, w.sent_grad.unwrap_or_default())
                } else {
                    (Channel::Activations, w.sent_act)
                };
                self.metrics.wire.channel_mut(channel).add(
                    traffic.wire.saturating_sub(ours.wire),
                    traffic.dense.saturating_sub(ours.dense),
                );
            }
            Action::Release {
                key,
                outcome,
                abandon,
            } => {
                let mb = key.mb as usize;
                if work.get(&mb).is_none_or(|w| w.key != key) {
                    return;
                }
                if let Some(w) = work.remove(&mb) {
                    self.release(&w, outcome, abandon);
                }
            }
            other => {
                tracing::debug!(?other, "action outside the micro-batch phase ignored");
            }
        }
    }

    /// An attempt is over: router load released, health reported, `Abandon` to its route.
    fn release(&mut self, w: &Work, outcome: Outcome, abandon: Option<u8>) {
        let now = now_ms();
        let health = router::HealthConfig::default();
        for hop in &w.plan.hops {
            self.view.add_load(&hop.peer, -1);
        }
        match outcome {
            Outcome::Completed => {
                for hop in &w.plan.hops {
                    let _ = self
                        .view
                        .report(&hop.peer, router::Outcome::Success, now, &health);
                }
            }
            Outcome::Failed(p) => {
                let _ = self
                    .view
                    .report(&key_of(&p), router::Outcome::Failure, now, &health);
            }
            Outcome::TimedOut => {
                // We do not know which hop stalled; suspect them all mildly.
                for h in &w.route {
                    let _ =
                        self.view
                            .report(&key_of(&h.peer), router::Outcome::Timeout, now, &health);
                }
            }
            Outcome::Busy(_) | Outcome::Requeued | Outcome::Dropped => {}
        }
        if let Outcome::Failed(p) | Outcome::Busy(p) = outcome {
            tracing::info!(mb = w.key.mb, attempt = w.key.attempt, who = %p.short(), busy = matches!(outcome, Outcome::Busy(_)), "micro-batch attempt failed; retrying");
        } else if outcome == Outcome::TimedOut {
            tracing::info!(
                mb = w.key.mb,
                attempt = w.key.attempt,
                "micro-batch attempt timed out; retrying"
            );
        }
        let Some(uncounted) = abandon else {
            return;
        };
        let epoch = self.shared.reg(|r| r.epoch);
        for h in &w.route {
            let ps = self.peer.shared().clone();
            let msg = Abandon {
                run: self.shared.run,
                epoch,
                key: w.key,
                uncounted,
            };
            let (addr, peer) = (h.addr, h.peer);
            tokio::spawn(async move {
                let _ = ps.call::<Abandon, Ack>(addr, Some(peer), &msg).await;
            });
        }
    }

    /// A route for a micro-batch from the router (load noted, hops counted per peer).
    fn route_micro_batch(&mut self) -> Result<(router::Plan, Vec<Hop>)> {
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
        Ok((plan, route))
    }

    /// Starts attempt `key` along `route`: embedding forward, Forward to stage 0.
    async fn send_forward(
        &mut self,
        epoch: u32,
        key: MbKey,
        route: Vec<Hop>,
        plan: router::Plan,
        accumulate: u64,
        embedding: bool,
    ) -> Result<Work> {
        let cfg = self.cfg().clone();
        let batch = self.corpus.train_batch(
            cfg.seed,
            key.step,
            key.mb as u64,
            cfg.train.micro_batch_size,
            cfg.train.seq_len,
        )?;
        let ends = self.ends.clone();
        let codec = self.act_codec;
        let codecs = self.codecs.clone();
        let inputs = batch.inputs.clone();
        let (bsz, seq) = (batch.batch_size, batch.seq_len);
        let prev = self.metrics.enter(Part::Compute);
        let computed = tokio::task::spawn_blocking(move || -> Result<_> {
            let e = ends.lock().unwrap_or_else(|e| e.into_inner());
            let (x, ctx) = e.embed_forward(&inputs, bsz, seq)?;
            let sub = e.subspace();
            drop(e);
            let t = Instant::now();
            let (frame, n) = compute::encode_hidden(&codecs, codec, sub.as_deref(), &x, &inputs)?;
            let dense = 4 * n as u64;
            Ok((ctx, frame, dense, t.elapsed()))
        })
        .await
        .map_err(Error::from);
        self.metrics.enter(prev);
        let (ctx, frame, dense, coding) = computed??;
        self.metrics.reassign(Part::Compute, Part::Codec, coding);
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
            accumulate,
            time: PassTime::default(),
            upstream: Traffic::default(),
            activations: frame,
            receipt: None,
        };
        self.send::<Forward>(route[0].addr, route[0].peer, key, msg);
        Ok(Work {
            key,
            route,
            plan,
            embed_ctx: embedding.then_some(ctx),
            targets: batch.targets,
            sent_act,
            sent_grad: None,
            sent_at: Instant::now(),
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

    /// The last stage's output, if the machine accepts it: receipt, loss, head backward,
    /// gradient to the last stage.
    pub(super) async fn on_forward_out(
        &mut self,
        sm: &mut StepMachine,
        work: &mut HashMap<usize, Work>,
        from: PeerId,
        out: ForwardOut,
    ) {
        let key = out.key;
        let received = Received {
            from,
            key,
            pass: Pass::Forward,
            run: out.run,
            epoch: out.epoch,
            receipt: out.receipt.as_ref(),
            frame: &out.activations,
        };
        let Some((accepted, w)) = received.accept(sm, work) else {
            return;
        };
        self.metrics.pass(w.sent_at.elapsed(), out.time);
        let res = self.run_head(w, &out, accepted.accumulate).await;
        received.conclude(sm, res.map(|loss| Event::HeadDone { key, loss }));
    }

    /// Loss, head backward (accumulating if asked), the gradient sent to the last stage.
    async fn run_head(&mut self, w: &mut Work, out: &ForwardOut, accumulate: bool) -> Result<f64> {
        let ends = self.ends.clone();
        let limits = self.limits;
        let frame = out.activations.clone();
        let targets = w.targets.clone();
        let scale = 1.0 / self.cfg().train.micro_batches as f64;
        let mb = w.key.mb;
        let codec = self.grad_codec;
        let codecs = self.codecs.clone();
        let (bsz, seq, hidden, vocab) = (
            self.cfg().train.micro_batch_size,
            self.cfg().train.seq_len,
            self.cfg().model.hidden_size,
            self.cfg().model.vocab_size,
        );
        let prev = self.metrics.enter(Part::Compute);
        let computed = tokio::task::spawn_blocking(move || -> Result<_> {
            let dims = [bsz, seq, hidden];
            let sub = ends.lock().unwrap_or_else(|e| e.into_inner()).subspace();
            let t = Instant::now();
            let (x, tokens, _) = codecs.with_decoder(|dec| {
                compute::decode_hidden(dec, &frame, &limits, hidden, vocab, sub.as_deref())
            })?;
            if x.dims() != dims {
                return Err(Error::FrameShape {
                    got: x.dims().to_vec(),
                    expected: format!("{dims:?}"),
                });
            }
            compute::check_tokens(&tokens, &targets, seq)?;
            let mut coding = t.elapsed();
            let mut e = ends.lock().unwrap_or_else(|e| e.into_inner());
            let (loss, ctx) = e.head_forward(&x, &targets)?;
            let grad = if accumulate {
                e.head_backward(ctx.micro_batch(u64::from(mb)), scale)?
            } else {
                // The head already counted this micro-batch: compute the input gradient only.
                e.head_backward_input_only(ctx, scale)?
            };
            drop(e);
            let t = Instant::now();
            let (frame, n) = compute::encode_grad(&codecs, codec, sub.as_deref(), &grad)?;
            let dense = 4 * n as u64;
            coding += t.elapsed();
            Ok((loss, frame, dense, coding))
        })
        .await
        .map_err(Error::from);
        self.metrics.enter(prev);
        let (loss, grad, dense, coding) = computed??;
        self.metrics.reassign(Part::Compute, Part::Codec, coding);
        // The rest of the forward pass (every hop's frame but our first, counted when sent) and
        // the gradient we send now; the rest of the backward pass comes with BackwardOut.
        self.metrics.wire.channel_mut(Channel::Activations).add(
            (out.upstream.wire + out.activations.len() as u64).saturating_sub(w.sent_act.wire),
            (out.upstream.dense + dense).saturating_sub(w.sent_act.dense),
        );
        let sent_grad = Traffic {
            wire: grad.len() as u64,
            dense,
        };
        self.metrics
            .wire
            .channel_mut(Channel::Gradients)
            .add(sent_grad.wire, sent_grad.dense);
        w.sent_grad = Some(sent_grad);
        self.audit.got_forward(w.key, &out.activations);
        self.audit.sent_backward(w.key, &grad);
        let last = *w.route.last().expect("non-empty route");
        let msg = Backward {
            run: self.shared.run,
            epoch: out.epoch,
            key: w.key,
            stage: last.stage,
            time: PassTime::default(),
            upstream: Traffic::default(),
            grad,
            receipt: None,
        };
        self.send::<Backward>(last.addr, last.peer, w.key, msg);
        w.sent_at = Instant::now();
        Ok(loss)
    }

    /// The input gradient from stage 0, if the machine accepts it: receipt, embedding backward.
    pub(super) async fn on_backward_out(
        &mut self,
        sm: &mut StepMachine,
        work: &mut HashMap<usize, Work>,
        from: PeerId,
        out: BackwardOut,
    ) {
        let key = out.key;
        let received = Received {
            from,
            key,
            pass: Pass::Backward,
            run: out.run,
            epoch: out.epoch,
            receipt: out.receipt.as_ref(),
            frame: &out.grad,
        };
        let Some((accepted, w)) = received.accept(sm, work) else {
            return;
        };
        self.metrics.pass(w.sent_at.elapsed(), out.time);
        self.audit.got_backward(key, &out.grad);
        let hidden = self.cfg().model.hidden_size;
        let res = embed_backward(
            &self.ends,
            &self.codecs,
            &self.limits,
            w,
            &out,
            &mut self.metrics,
            accepted.accumulate,
            hidden,
        )
        .await;
        received.conclude(sm, res.map(|()| Event::EmbedDone { key }));
    }
}

/// An output of an attempt that came back to the trainer: the forward output from the route's
/// last replica, or the input gradient from its first.
struct Received<'a> {
    from: PeerId,
    key: MbKey,
    pass: Pass,
    run: RunId,
    epoch: u32,
    receipt: Option<&'a Receipt>,
    frame: &'a [u8],
}

impl Received<'_> {
    /// The attempt's work, if the machine accepts the output and its receipt holds (the
    /// signature of the route's end that computed it, over this frame). A bad receipt is
    /// reported to the machine as a rejection.
    fn accept<'w>(
        &self,
        sm: &mut StepMachine,
        work: &'w mut HashMap<usize, Work>,
    ) -> Option<(Accepted, &'w mut Work)> {
        let accepted = sm.accept_output(self.from, self.key, self.pass)?;
        let w = work
            .get_mut(&(self.key.mb as usize))
            .filter(|w| w.key == self.key)?;
        let stage = match self.pass {
            Pass::Forward => w.route.last().map_or(0, |h| h.stage),
            Pass::Backward => 0,
        };
        if let Err(why) = Receipt::check_received(
            self.receipt,
            &self.from,
            &self.run,
            self.epoch,
            self.key,
            stage,
            self.pass,
            self.frame,
        ) {
            tracing::warn!(peer = %self.from.short(), why, mb = self.key.mb, pass = ?self.pass, "bad receipt with an output");
            self.reject(sm);
            return None;
        }
        Some((accepted, w))
    }

    /// Feeds the machine what the trainer's end made of the output: `done`, or a rejection.
    fn conclude(&self, sm: &mut StepMachine, done: Result<Event>) {
        match done {
            Ok(e) => sm.handle(e, Instant::now()),
            Err(e) => {
                tracing::warn!(error = %e, mb = self.key.mb, pass = ?self.pass, "bad output");
                self.reject(sm);
            }
        }
    }

    fn reject(&self, sm: &mut StepMachine) {
        sm.handle(
            Event::Rejected {
                key: self.key,
                pass: self.pass,
            },
            Instant::now(),
        );
    }
}

/// Embedding backward for a returned attempt (accumulating if the embedding has not counted).
#[allow(clippy::too_many_arguments)]
async fn embed_backward(
    ends: &Arc<Mutex<Shard>>,
    codecs: &Arc<compute::Codecs>,
    limits: &Limits,
    w: &mut Work,
    out: &BackwardOut,
    metrics: &mut Metrics,
    accumulate: bool,
    hidden: usize,
) -> Result<()> {
    let info = swarm_compression::frame::FrameInfo::read(&out.grad, limits)?;
    // The backward pass: every earlier hop and this frame, but our own Backward's frame (in
    // `upstream` too), counted when sent.
    let ours = w.sent_grad.unwrap_or_default();
    metrics.wire.channel_mut(Channel::Gradients).add(
        (out.upstream.wire + out.grad.len() as u64).saturating_sub(ours.wire),
        (out.upstream.dense + compute::dense_elements(&info, hidden) as u64 * 4)
            .saturating_sub(ours.dense),
    );
    if !accumulate {
        return Ok(());
    }
    let Some(ctx) = w.embed_ctx.take() else {
        return Err(run_err("embedding context already used"));
    };
    let (ends, codecs, mb) = (ends.clone(), codecs.clone(), w.key.mb);
    let frame = out.grad.clone();
    let limits = *limits;
    let shape = info.shape().to_vec();
    let prev = metrics.enter(Part::Compute);
    let done = tokio::task::spawn_blocking(move || -> Result<Duration> {
        let sub = ends.lock().unwrap_or_else(|e| e.into_inner()).subspace();
        // A subspace frame holds k values per token; the gradient continued with has `hidden`.
        let mut dims = shape;
        if let (Some(_), Some(last)) = (&sub, dims.last_mut()) {
            *last = hidden;
        }
        let t = Instant::now();
        let (g, _) = codecs.with_decoder(|dec| {
            compute::decode_grad(dec, &frame, &limits, Some(&dims), sub.as_deref())
        })?;
        let coding = t.elapsed();
        let mut e = ends.lock().unwrap_or_else(|e| e.into_inner());
        e.backward(ctx.micro_batch(u64::from(mb)), &g)?;
        Ok(coding)
    })
    .await
    .map_err(Error::from);
    metrics.enter(prev);
    metrics.reassign(Part::Compute, Part::Codec, done??);
    Ok(())
}
