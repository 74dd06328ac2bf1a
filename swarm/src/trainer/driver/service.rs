//! The trainer's message handlers: validated, answered, and forwarded to the driver's inbox;
//! and the liveness pinger.

use super::*;
use crate::trainer::machine::join::AdmitAction;

impl Shared {
    /// Feeds the admissions machine `event` (if any) and the time, and sends every answer it
    /// decides on to its waiting handler.
    pub(super) fn admissions(&self, event: Option<AdmitEvent>, now: Instant) {
        let answers = self.reg(|r| {
            if let Some(e) = event {
                r.admissions.handle(e, now);
            }
            r.admissions.handle_timeout(now);
            let mut answers = Vec::new();
            while let Some(action) = r.admissions.poll_action() {
                let (ticket, answer) = match action {
                    AdmitAction::Admit {
                        ticket,
                        peer,
                        stage,
                    } => {
                        let source = state_source(r, self.endpoint, stage, Some(peer));
                        tracing::info!(peer = %peer.short(), stage, step = r.step, "admitted");
                        let reply = AdmitReply {
                            run: self.run,
                            epoch: r.epoch,
                            stage,
                            step: r.step,
                            source,
                        };
                        (ticket, Ok(reply))
                    }
                    AdmitAction::Refuse {
                        ticket,
                        peer,
                        stage,
                    } => {
                        if let Some(st) = r.stages.get_mut(stage as usize) {
                            st.remove(&peer);
                        }
                        let busy = RpcError::refused(
                            code::BUSY,
                            "the current step did not end in time; ask again",
                        );
                        (ticket, Err(busy))
                    }
                };
                if let Some(tx) = r.admit_waiters.remove(&ticket) {
                    answers.push((tx, answer));
                }
            }
            answers
        });
        for (tx, answer) in answers {
            // A handler gone (its connection closed) needs no answer.
            let _ = tx.send(answer);
        }
    }
}

/// Pings every replica each second; two misses in a row report it down.
pub(super) async fn ping_loop(shared: Arc<Shared>, ps: Arc<PeerShared>) {
    let mut misses: HashMap<PeerId, u32> = HashMap::new();
    let mut reported: HashSet<PeerId> = HashSet::new();
    let mut nonce = 0u64;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let peers: Vec<(PeerId, SocketAddr)> = shared.reg(|r| {
            r.stages
                .iter()
                .flat_map(|s| s.iter().map(|(p, rep)| (*p, rep.addr)))
                .collect()
        });
        reported.retain(|p| peers.iter().any(|(q, _)| q == p));
        let pings = peers.iter().map(|(p, addr)| {
            nonce += 1;
            let ps = ps.clone();
            let (p, addr, n) = (*p, *addr, nonce);
            async move {
                let ok = tokio::time::timeout(
                    Duration::from_secs(3),
                    ps.call::<Ping, Pong>(addr, Some(p), &Ping { nonce: n }),
                )
                .await
                .is_ok_and(|r| r.is_ok());
                (p, ok)
            }
        });
        for (p, ok) in futures::future::join_all(pings).await {
            if ok {
                misses.remove(&p);
            } else {
                let m = misses.entry(p).or_default();
                *m += 1;
                if *m >= 2 && reported.insert(p) {
                    let _ = shared.inbox.send(Inbound::Down(p));
                }
            }
        }
    }
}

/// A message to the trainer that names its run and epoch: checked before it is handled.
trait RunScoped: wire::WireMessage + Send + 'static {
    fn run_epoch(&self) -> (RunId, u32);
}

macro_rules! run_scoped {
    ($($ty:ty),*) => {
        $(impl RunScoped for $ty {
            fn run_epoch(&self) -> (RunId, u32) {
                (self.run, self.epoch)
            }
        })*
    };
}
run_scoped!(
    ForwardOut,
    BackwardOut,
    Counted,
    HopFailed,
    SyncDone,
    Ready,
    Admit,
    Leave,
    FetchState
);

/// Registers the trainer's handler of `M`: `handle` gets the message decoded (malformed bytes
/// close the connection) and of this run and epoch (else refused), with the shared state.
fn serve<M, F, Fut>(peer: &Peer, shared: &Arc<Shared>, handle: F)
where
    M: RunScoped,
    F: Fn(Arc<Shared>, RequestCtx, M) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = crate::peer::HandlerResult> + Send + 'static,
{
    let shared = shared.clone();
    peer.register(
        M::KIND,
        move |_p: Arc<PeerShared>, ctx: RequestCtx, body: Vec<u8>| {
            // The handler's future is made here so that it owns what it needs (not `handle`).
            let checked = wire::decode_body::<M>(&body)
                .map_err(RpcError::from)
                .and_then(|msg| {
                    let (run, epoch) = msg.run_epoch();
                    shared.check_run(run, epoch)?;
                    Ok(msg)
                })
                .map(|msg| handle(shared.clone(), ctx, msg));
            async move { checked?.await }
        },
    );
}

/// Registers a handler that only forwards `M` to the driver (as `wrap(sender, message)`).
fn forward_to_driver<M: RunScoped>(
    peer: &Peer,
    shared: &Arc<Shared>,
    wrap: fn(PeerId, M) -> Inbound,
) {
    serve(
        peer,
        shared,
        move |s: Arc<Shared>, ctx: RequestCtx, msg: M| {
            let _ = s.inbox.send(wrap(ctx.from, msg));
            async { rpc::reply(&Ack) }
        },
    );
}

pub(super) fn register_handlers(peer: &Peer, shared: &Arc<Shared>) {
    peer.register_kinds(&crate::protocol::KINDS)
        .expect("layer kind ranges are disjoint (tested)");
    forward_to_driver(peer, shared, Inbound::ForwardOut);
    forward_to_driver(peer, shared, Inbound::BackwardOut);
    forward_to_driver(peer, shared, Inbound::Counted);
    forward_to_driver(peer, shared, Inbound::HopFailed);
    forward_to_driver(peer, shared, Inbound::SyncDone);
    forward_to_driver(peer, shared, Inbound::Ready);

    let s = shared.clone();
    peer.register(
        kind::RUN_INFO,
        move |_p: Arc<PeerShared>, _ctx: RequestCtx, body: Vec<u8>| {
            let s = s.clone();
            async move {
                wire::decode_body::<RunInfoRequest>(&body).map_err(RpcError::from)?;
                let info = s.reg(|r| RunInfo {
                    run: s.run,
                    epoch: r.epoch,
                    step: r.step,
                    phase: r.phase,
                    config_toml: s.config_toml.clone(),
                    trainer: s.endpoint,
                    replicas: r
                        .stages
                        .iter()
                        .map(|st| st.keys().copied().collect())
                        .collect(),
                });
                rpc::reply(&info)
            }
        },
    );

    serve(
        peer,
        shared,
        |s: Arc<Shared>, ctx: RequestCtx, a: Admit| async move {
            let stages = s.reg(|r| r.stages.len());
            if s.reg(|r| r.banned.contains(&ctx.from)) {
                return Err(RpcError::refused(
                    code::FORBIDDEN,
                    "banned from this run by an audit",
                ));
            }
            if a.stage as usize >= stages {
                return Err(RpcError::refused(
                    code::BAD_REQUEST,
                    format!("stage {} of a {stages}-stage run", a.stage),
                ));
            }
            // Registered as joining at once, so the driver holds the next step boundary until it
            // is ready; answered when the admissions machine says (at a boundary, when replicas
            // hold the state it must load, or refused at its deadline).
            let (tx, mut rx) = tokio::sync::oneshot::channel();
            let ticket = s.reg(|r| {
                for st in r.stages.iter_mut() {
                    st.remove(&ctx.from);
                }
                r.stages[a.stage as usize].insert(
                    ctx.from,
                    Replica {
                        addr: a.addr,
                        state: ReplicaState::Joining,
                    },
                );
                let ticket = r.next_ticket;
                r.next_ticket += 1;
                r.admit_waiters.insert(ticket, tx);
                ticket
            });
            s.admissions(
                Some(AdmitEvent::Asked {
                    ticket,
                    peer: ctx.from,
                    stage: a.stage,
                }),
                Instant::now(),
            );
            // This task only wakes the machine at its deadlines; each wake answers at least the
            // earliest pending Admit, ours by its own deadline at the latest (bounded).
            loop {
                let wake = s.reg(|r| r.admissions.poll_timeout());
                let answer = match wake {
                    Some(at) => {
                        tokio::time::timeout_at(tokio::time::Instant::from_std(at), &mut rx).await
                    }
                    None => Ok((&mut rx).await),
                };
                match answer {
                    Ok(Ok(reply)) => return rpc::reply(&reply?),
                    Ok(Err(_)) => {
                        return Err(RpcError::refused(code::BUSY, "the trainer stopped"));
                    }
                    Err(_) => s.admissions(None, Instant::now()),
                }
            }
        },
    );

    serve(
        peer,
        shared,
        |s: Arc<Shared>, ctx: RequestCtx, _: Leave| async move {
            let (known, step) = s.reg(|r| {
                let mut known = false;
                for st in r.stages.iter_mut() {
                    if let Some(rep) = st.get_mut(&ctx.from) {
                        rep.state = ReplicaState::Leaving;
                        known = true;
                    }
                }
                (known, r.step)
            });
            if known {
                let _ = s.inbox.send(Inbound::Leave(ctx.from));
            }
            // It stays until released (no longer listed in RunInfo): mid-step it finishes
            // its work and takes part in this step's sync; the driver releases it at the
            // boundary, after taking its state if it was its stage's last replica.
            rpc::reply(&LeaveReply {
                stay_for_step: known.then_some(step),
            })
        },
    );

    serve(
        peer,
        shared,
        |s: Arc<Shared>, _ctx: RequestCtx, f: FetchState| async move {
            if f.weights_only {
                return Err(RpcError::refused(
                    code::BAD_REQUEST,
                    "the trainer serves full states only",
                ));
            }
            s.reg(|r| {
                let Some(st) = r.served.get(&f.stage) else {
                    return Err(RpcError::refused(
                        code::BAD_REQUEST,
                        "the trainer serves no state for this stage",
                    ));
                };
                if st.step != f.step {
                    return Err(RpcError::refused(
                        code::BAD_REQUEST,
                        format!("state at step {}, asked for {}", st.step, f.step),
                    ));
                }
                rpc::reply(&serve_chunk(&f, &st.bytes, st.hash, st.digest)?)
            })
        },
    );
}
