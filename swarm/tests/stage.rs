//! The stage worker over real QUIC on loopback, driven by a test "trainer" peer that speaks the
//! training protocol: forward/backward reproduce the shard's own results bitwise with codec
//! `none`; two replicas sync and end bitwise identical (and equal to one shard that saw both
//! micro-batches); state fetch reproduces the digest; bad requests are refused. Every wait is
//! bounded.

use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use swarm_compression::{Codec, Encoder, Limits, decode_frame};
use swarm_core::Identity;
use swarm_core::membership::RunId;
use swarm_core::peer::{Peer, PeerConfig, PeerShared, RequestCtx};
use swarm_core::protocol::{
    Abandon, Ack, Applied, Apply, Backward, BackwardOut, Counted, Endpoint, FetchState, Forward,
    ForwardOut, GradShare, Hop, HopFailed, MbKey, StateChunk, SyncDone, SyncPhase, SyncStart,
    Traffic,
};
use swarm_core::receipt::{Pass, Receipt};
use swarm_core::rpc::{self, code};
use swarm_core::stage::{StageOptions, StageWorker, f32_digest, fetch_state, init_shard};
use swarm_core::wire::{self, WireMessage, kind};
use swarm_model::{RunConfig, Shard};
use swarm_testkit::bounded;
use tokio::sync::mpsc;

fn config(stages: &[usize], sync: &str) -> RunConfig {
    // Exact activations and gradients (the defaults are lossy); the sync codec as asked.
    let mut c = swarm_testkit::micro_config(42);
    c.stages = stages.to_vec();
    c.codec.sync = sync.into();
    c.validate().unwrap();
    c
}

/// Everything the driver receives.
#[derive(Debug)]
enum Event {
    Out(ForwardOut),
    Back(BackwardOut),
    Counted(Counted, swarm_core::PeerId),
    #[allow(dead_code)] // printed by the panics of unexpected events
    Failed(HopFailed),
    Done(SyncDone, swarm_core::PeerId),
}

struct Driver {
    peer: Peer,
    rx: mpsc::UnboundedReceiver<Event>,
}

fn on<M: WireMessage + Send + 'static>(
    peer: &Peer,
    tx: &mpsc::UnboundedSender<Event>,
    wrap: fn(M, swarm_core::PeerId) -> Event,
) {
    let tx = tx.clone();
    // A bare peer playing the trainer: it accepts the training kinds like the real one.
    peer.register_kinds(&swarm_core::protocol::KINDS).unwrap();
    peer.register(
        M::KIND,
        move |_p: Arc<PeerShared>, ctx: RequestCtx, body: Vec<u8>| {
            let tx = tx.clone();
            async move {
                let m: M = wire::decode_body(&body)?;
                let _ = tx.send(wrap(m, ctx.from));
                rpc::reply(&Ack)
            }
        },
    );
}

async fn driver(run: RunId) -> Driver {
    let cfg = PeerConfig {
        run_id: Some(run),
        ..PeerConfig::default()
    };
    let peer = Peer::start(Identity::from_secret([200; 32]), cfg)
        .await
        .unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    on::<ForwardOut>(&peer, &tx, |m, _| Event::Out(m));
    on::<BackwardOut>(&peer, &tx, |m, _| Event::Back(m));
    on::<Counted>(&peer, &tx, Event::Counted);
    on::<HopFailed>(&peer, &tx, |m, _| Event::Failed(m));
    on::<SyncDone>(&peer, &tx, Event::Done);
    Driver { peer, rx }
}

async fn stage_peer(
    n: u8,
    run: RunId,
    bootstrap: std::net::SocketAddr,
    cfg: &RunConfig,
    stage: u32,
) -> (Peer, StageWorker) {
    let pc = PeerConfig {
        run_id: Some(run),
        bootstrap: Some(bootstrap),
        ..PeerConfig::default()
    };
    let peer = Peer::start(Identity::from_secret([n; 32]), pc)
        .await
        .unwrap();
    let shard = init_shard(cfg, stage).unwrap();
    let w = StageWorker::start(
        &peer,
        StageOptions::new(run, cfg.clone(), stage),
        Some(shard),
    )
    .unwrap();
    (peer, w)
}

fn hop(stage: u32, p: &Peer) -> Hop {
    Hop {
        stage,
        peer: p.peer_id(),
        addr: p.local_addr(),
    }
}

fn endpoint(p: &Peer) -> Endpoint {
    Endpoint {
        peer: p.peer_id(),
        addr: p.local_addr(),
    }
}

fn random(seed: u64, shape: (usize, usize, usize)) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..shape.0 * shape.1 * shape.2)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect()
}

fn frame(v: &[f32], shape: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    Encoder::new(Codec::NONE)
        .unwrap()
        .encode(v, shape, &mut out)
        .unwrap();
    out
}

fn unframe(f: &[u8]) -> Vec<f32> {
    decode_frame(f, &Limits::new(1 << 20)).unwrap().1
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

const SHAPE: (usize, usize, usize) = (2, 8, 16);

async fn next(d: &mut Driver) -> Event {
    bounded(d.rx.recv()).await.expect("driver channel open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stage_pipeline_reproduces_the_shards_bitwise() {
    let run = RunId([1; 16]);
    let cfg = config(&[0, 1, 2], "none");
    let mut d = driver(run).await;
    let (p0, w0) = stage_peer(1, run, d.peer.local_addr(), &cfg, 0).await;
    let (p1, w1) = stage_peer(2, run, d.peer.local_addr(), &cfg, 1).await;

    // Reference: the same shards in-process.
    let mut r0 = init_shard(&cfg, 0).unwrap();
    let mut r1 = init_shard(&cfg, 1).unwrap();
    let x = random(1, SHAPE);
    let g = random(2, SHAPE);
    let xt = Tensor::from_vec(x.clone(), SHAPE, &Device::Cpu).unwrap();
    let gt = Tensor::from_vec(g.clone(), SHAPE, &Device::Cpu).unwrap();
    let (h, c0) = r0.stage_forward(0, &xt).unwrap();
    let (y, c1) = r1.stage_forward(1, &h).unwrap();
    let dh = r1.backward(c1, &gt).unwrap().unwrap();
    let dx = r0.backward(c0, &dh).unwrap().unwrap();

    let key = MbKey {
        step: 0,
        mb: 0,
        attempt: 0,
    };
    let fwd = Forward {
        run,
        epoch: 0,
        key,
        route: vec![hop(0, &p0), hop(1, &p1)],
        hop: 0,
        trainer: endpoint(&d.peer),
        accumulate: 0b11,
        time: Default::default(),
        upstream: Traffic::default(),
        activations: frame(&x, &[2, 8, 16]),
        receipt: None,
    };
    let sent = fwd.activations.len() as u64;
    let _: (_, Ack) = bounded(d.peer.shared().call(p0.local_addr(), None, &fwd))
        .await
        .unwrap();
    let out = match next(&mut d).await {
        Event::Out(o) => o,
        e => panic!("expected ForwardOut, got {e:?}"),
    };
    assert_eq!(out.key, key);
    assert_eq!(bits(&unframe(&out.activations)), bits(&to_vec(&y)));
    // The trainer learns what crossed every link: its own frame to stage 0 and the stage 0 ->
    // stage 1 frame it never saw (same size with codec none); ForwardOut's frame comes on top.
    assert_eq!(out.upstream.wire, 2 * sent);
    assert_eq!(out.upstream.dense, 2 * 4 * x.len() as u64);
    assert_eq!((w0.contexts(), w1.contexts()), (1, 1));

    let bwd = Backward {
        run,
        epoch: 0,
        key,
        stage: 1,
        time: Default::default(),
        upstream: Traffic::default(),
        grad: frame(&g, &[2, 8, 16]),
        receipt: None,
    };
    let _: (_, Ack) = bounded(d.peer.shared().call(p1.local_addr(), None, &bwd))
        .await
        .unwrap();
    let mut counted = Vec::new();
    let mut back = None;
    while back.is_none() || counted.len() < 2 {
        match next(&mut d).await {
            Event::Back(b) => back = Some(b),
            Event::Counted(c, from) => counted.push((c.stage, from)),
            e => panic!("unexpected {e:?}"),
        }
    }
    counted.sort();
    assert_eq!(counted, vec![(0, p0.peer_id()), (1, p1.peer_id())]);
    let back = back.unwrap();
    assert_eq!(bits(&unframe(&back.grad)), bits(&to_vec(&dx)));
    assert_eq!((w0.contexts(), w1.contexts()), (0, 0));
    assert_eq!(w0.counted(), vec![0]);
    // Parameter gradients accumulated exactly as the reference's.
    let g0 = w0.with_shard(|s| s.grads_flat().unwrap()).await.unwrap();
    assert_eq!(bits(&g0), bits(&r0.grads_flat().unwrap()));

    // Retry of the same micro-batch with stage 1 already counted: stage 1 must not accumulate.
    let key2 = MbKey { attempt: 1, ..key };
    let fwd2 = Forward {
        key: key2,
        accumulate: 0b01,
        ..fwd.clone()
    };
    let _: (_, Ack) = bounded(d.peer.shared().call(p0.local_addr(), None, &fwd2))
        .await
        .unwrap();
    assert!(matches!(next(&mut d).await, Event::Out(_)));
    // Abandon it instead of running its backward: contexts are freed on both stages.
    for p in [&p0, &p1] {
        let a = Abandon {
            run,
            epoch: 0,
            key: key2,
            uncounted: Abandon::FORWARD,
        };
        let _: (_, Ack) = bounded(d.peer.shared().call(p.local_addr(), None, &a))
            .await
            .unwrap();
    }
    assert_eq!((w0.contexts(), w1.contexts()), (0, 0));
    let g1 = w1.with_shard(|s| s.grads_flat().unwrap()).await.unwrap();
    assert_eq!(bits(&g1), bits(&r1.grads_flat().unwrap()));

    // Refusals: wrong epoch, wrong stage, unknown attempt.
    let stale = Forward {
        epoch: 5,
        ..fwd.clone()
    };
    let err = bounded(
        d.peer
            .shared()
            .call::<Forward, Ack>(p0.local_addr(), None, &stale),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, swarm_net::Error::Remote(ref r) if r.code == code::BAD_REQUEST),
        "{err}"
    );
    let wrong_hop = Forward {
        hop: 1,
        ..fwd.clone()
    };
    assert!(
        bounded(
            d.peer
                .shared()
                .call::<Forward, Ack>(p0.local_addr(), None, &wrong_hop)
        )
        .await
        .is_err()
    );
    let orphan = Backward {
        key: MbKey { mb: 9, ..key },
        ..bwd.clone()
    };
    assert!(
        bounded(
            d.peer
                .shared()
                .call::<Backward, Ack>(p1.local_addr(), None, &orphan)
        )
        .await
        .is_err()
    );
}

/// A frame from a peer must carry that peer's receipt for exactly those bytes: a missing receipt,
/// a frame changed after signing, and a receipt signed by someone else are each refused with
/// BAD_RECEIPT and reported to the trainer as the sender's fault; a good one is accepted, kept,
/// and the receiver sends its own receipt on with its output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_receipts_in_transit_are_refused_and_blamed_on_the_sender() {
    let run = RunId([4; 16]);
    let cfg = config(&[0, 1, 2], "none");
    let mut d = driver(run).await;
    let (p1, w1) = stage_peer(6, run, d.peer.local_addr(), &cfg, 1).await;
    // The stage-0 hop, played by a bare peer that signs (or forges) its own receipts.
    let sender_id = Identity::from_secret([7; 32]);
    let sender = Peer::start(
        sender_id.clone(),
        PeerConfig {
            run_id: Some(run),
            bootstrap: Some(d.peer.local_addr()),
            ..PeerConfig::default()
        },
    )
    .await
    .unwrap();
    let other = Identity::from_secret([8; 32]);
    let key = MbKey {
        step: 0,
        mb: 1,
        attempt: 0,
    };
    let good = frame(&random(30, SHAPE), &[2, 8, 16]);
    let tampered = frame(&random(31, SHAPE), &[2, 8, 16]);
    let sign = |id: &Identity, bytes: &[u8]| {
        Receipt::sign(id, run, 0, key, 0, Pass::Forward, [0; 32], b"in", bytes)
    };
    let trainer = endpoint(&d.peer);
    let fwd = |activations: Vec<u8>, receipt: Option<Receipt>| Forward {
        run,
        epoch: 0,
        key,
        route: vec![hop(0, &sender), hop(1, &p1)],
        hop: 1,
        trainer,
        accumulate: 0b10,
        time: Default::default(),
        upstream: Traffic::default(),
        activations,
        receipt,
    };
    let cases = [
        (fwd(good.clone(), None), "no receipt"),
        (
            fwd(tampered.clone(), Some(sign(&sender_id, &good))),
            "frame",
        ),
        (fwd(good.clone(), Some(sign(&other, &good))), "signed"),
    ];
    for (msg, why) in cases {
        let err = bounded(
            sender
                .shared()
                .call::<Forward, Ack>(p1.local_addr(), None, &msg),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(err, swarm_net::Error::Remote(ref r) if r.code == code::BAD_RECEIPT && r.message.contains(why)),
            "{err}"
        );
        match next(&mut d).await {
            Event::Failed(h) => {
                assert_eq!(h.key, key);
                assert_eq!(h.failed, sender.peer_id(), "blame on the sender");
                assert!(h.reason.contains("bad receipt"), "{}", h.reason);
            }
            e => panic!("expected HopFailed, got {e:?}"),
        }
        assert_eq!(w1.contexts(), 0, "a refused frame holds no context");
    }
    assert_eq!(
        w1.stats()
            .bad_receipts
            .load(std::sync::atomic::Ordering::Relaxed),
        3
    );

    // The honest frame: accepted; the output carries stage 1's receipt over its frame.
    let _: (_, Ack) = bounded(sender.shared().call(
        p1.local_addr(),
        None,
        &fwd(good.clone(), Some(sign(&sender_id, &good))),
    ))
    .await
    .unwrap();
    let out = match next(&mut d).await {
        Event::Out(o) => o,
        e => panic!("expected ForwardOut, got {e:?}"),
    };
    let r = out.receipt.as_ref().expect("a receipt with the output");
    assert_eq!(
        Receipt::check_received(
            Some(r),
            &p1.peer_id(),
            &run,
            0,
            key,
            1,
            Pass::Forward,
            &out.activations
        ),
        Ok(())
    );
    assert_eq!(r.input_hash, swarm_core::receipt::frame_hash(&good));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_forward_closes_the_connection() {
    let run = RunId([2; 16]);
    let cfg = config(&[0, 2], "none");
    let d = driver(run).await;
    let (p0, _w0) = stage_peer(3, run, d.peer.local_addr(), &cfg, 0).await;
    let conn = bounded(d.peer.shared().connect(p0.local_addr(), None))
        .await
        .unwrap();
    let bad = wire::envelope_raw(kind::FORWARD, &[0xff; 40]);
    let r = bounded(rpc::call_raw(&conn, &bad, Duration::from_secs(10))).await;
    assert!(r.is_err(), "a malformed Forward got an answer");
}

async fn one_micro_batch(d: &mut Driver, run: RunId, p: &Peer, mb: u32) {
    let key = MbKey {
        step: 0,
        mb,
        attempt: 0,
    };
    let fwd = Forward {
        run,
        epoch: 0,
        key,
        route: vec![hop(0, p)],
        hop: 0,
        trainer: endpoint(&d.peer),
        accumulate: 1,
        time: Default::default(),
        upstream: Traffic::default(),
        activations: frame(&random(10 + mb as u64, SHAPE), &[2, 8, 16]),
        receipt: None,
    };
    let _: (_, Ack) = bounded(d.peer.shared().call(p.local_addr(), None, &fwd))
        .await
        .unwrap();
    assert!(matches!(next(d).await, Event::Out(_)));
    let bwd = Backward {
        run,
        epoch: 0,
        key,
        stage: 0,
        time: Default::default(),
        upstream: Traffic::default(),
        grad: frame(&random(20 + mb as u64, SHAPE), &[2, 8, 16]),
        receipt: None,
    };
    let _: (_, Ack) = bounded(d.peer.shared().call(p.local_addr(), None, &bwd))
        .await
        .unwrap();
    let mut got = (false, false);
    while got != (true, true) {
        match next(d).await {
            Event::Back(_) => got.0 = true,
            Event::Counted(..) => got.1 = true,
            e => panic!("unexpected {e:?}"),
        }
    }
}

/// Two replicas of a one-stage run each count one micro-batch, sync and apply.
async fn sync_two_replicas(sync: &str) -> ([u8; 32], [u8; 32], f64, [u8; 32], Vec<[u8; 32]>) {
    let run = RunId([3; 16]);
    let cfg = config(&[0, 2], sync);
    let mut d = driver(run).await;
    let (a, wa) = stage_peer(4, run, d.peer.local_addr(), &cfg, 0).await;
    let (b, wb) = stage_peer(5, run, d.peer.local_addr(), &cfg, 0).await;
    one_micro_batch(&mut d, run, &a, 0).await;
    one_micro_batch(&mut d, run, &b, 1).await;

    let start = SyncStart {
        run,
        epoch: 0,
        step: 0,
        stage: 0,
        round: 0,
        phase: SyncPhase::Gradient,
        participants: vec![a.peer_id(), b.peer_id()],
        mb_counts: vec![1, 1],
        addrs: vec![a.local_addr(), b.local_addr()],
    };
    for p in [&a, &b] {
        let _: (_, Ack) = bounded(d.peer.shared().call(p.local_addr(), None, &start))
            .await
            .unwrap();
    }
    let mut done = Vec::new();
    while done.len() < 2 {
        match next(&mut d).await {
            Event::Done(s, from) => done.push((s, from)),
            e => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!(
        done[0].0.grad_sq_norm.to_bits(),
        done[1].0.grad_sq_norm.to_bits()
    );
    assert_eq!(done[0].0.grad_digest, done[1].0.grad_digest);
    // A share replayed after the sync is refused.
    let replay = GradShare {
        run,
        epoch: 0,
        step: 0,
        stage: 0,
        round: 0,
        from: d.peer.peer_id(),
        frame: vec![0; 8],
    };
    assert!(
        bounded(
            d.peer
                .shared()
                .call::<GradShare, Ack>(a.local_addr(), None, &replay)
        )
        .await
        .is_err()
    );

    let apply = Apply {
        run,
        epoch: 0,
        step: 0,
        stage: 0,
        lr: 1e-2,
        clip_scale: 1.0,
        phase: SyncPhase::Gradient,
        credit: None,
    };
    let mut digests = Vec::new();
    for p in [&a, &b] {
        let (_, applied): (_, Applied) =
            bounded(d.peer.shared().call(p.local_addr(), None, &apply))
                .await
                .unwrap();
        digests.push(applied.digest);
    }
    assert_eq!(wa.step(), Some(1));
    assert_eq!(wb.step(), Some(1));

    // A newcomer fetches the state from a replica and gets the same weights.
    let c = Peer::start(
        Identity::from_secret([6; 32]),
        PeerConfig {
            run_id: Some(run),
            bootstrap: Some(d.peer.local_addr()),
            ..PeerConfig::default()
        },
    )
    .await
    .unwrap();
    let mut opts = StageOptions::new(run, cfg.clone(), 0);
    opts.chunk_bytes = 4096; // several chunks
    let fetched = bounded(fetch_state(
        c.shared(),
        &opts,
        0,
        1,
        &[endpoint(&b)],
        digests[1],
    ))
    .await
    .unwrap();
    assert_eq!(fetched.weights_digest().unwrap(), digests[1]);
    // A wrong expected digest is refused.
    assert!(
        bounded(fetch_state(
            c.shared(),
            &opts,
            0,
            1,
            &[endpoint(&b)],
            [0; 32]
        ))
        .await
        .is_err()
    );
    // Asking for a step the replica is not at is refused.
    let req = FetchState {
        run,
        epoch: 0,
        stage: 0,
        step: 0,
        offset: 0,
        max_len: 1024,
        weights_only: false,
    };
    assert!(
        bounded(
            c.shared()
                .call::<FetchState, StateChunk>(a.local_addr(), None, &req)
        )
        .await
        .is_err()
    );
    (
        done[0].0.grad_digest,
        digests[0],
        done[0].0.grad_sq_norm,
        digests[1],
        vec![fetched.weights_digest().unwrap()],
    )
}

/// The reference: one shard that saw both micro-batches, then the same optimizer step.
fn reference(cfg: &RunConfig) -> ([u8; 32], f64, [u8; 32]) {
    let mut s: Shard = init_shard(cfg, 0).unwrap();
    for mb in 0..2u64 {
        let x = Tensor::from_vec(random(10 + mb, SHAPE), SHAPE, &Device::Cpu).unwrap();
        let g = Tensor::from_vec(random(20 + mb, SHAPE), SHAPE, &Device::Cpu).unwrap();
        let (_, c) = s.stage_forward(0, &x).unwrap();
        s.backward(c, &g).unwrap();
    }
    let grads = s.grads_flat().unwrap();
    let norm = s.grad_sq_norm().unwrap();
    s.optimizer_step(&cfg.adamw(), 1e-2, 1.0).unwrap();
    let _ = DType::F32;
    (f32_digest(&grads), norm, s.weights_digest().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_sync_to_identical_weights_equal_to_one_shard() {
    let (grad_digest, wa, norm, wb, fetched) = sync_two_replicas("none").await;
    assert_eq!(wa, wb, "replica weights differ");
    assert_eq!(fetched[0], wa);
    let (ref_grad, ref_norm, ref_weights) = reference(&config(&[0, 2], "none"));
    // codec none: the sum over replicas is the sum one shard accumulates (two terms: exact).
    assert_eq!(grad_digest, ref_grad);
    assert_eq!(norm.to_bits(), ref_norm.to_bits());
    assert_eq!(wa, ref_weights);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_with_a_lossy_sync_codec_stay_identical() {
    let (_, wa, norm, wb, fetched) = sync_two_replicas("topk:0.1+q8+zstd:3").await;
    assert_eq!(wa, wb, "replica weights differ");
    assert_eq!(fetched[0], wa);
    let (_, ref_norm, ref_weights) = reference(&config(&[0, 2], "none"));
    // Top-k keeps 10% of each share: the norm is smaller, the weights differ from dense.
    assert!(norm < ref_norm && norm > 0.0, "{norm} vs {ref_norm}");
    assert_ne!(wa, ref_weights);
}
