//! Joining a run over real QUIC on loopback against a test trainer that answers RunInfo, Admit and
//! Ready: the joiner picks the weakest stage with the router's choice, fetches the state from a
//! replica (verified by digest) and serves; a full context table answers BUSY. Waits are bounded.

use std::sync::{Arc, Mutex};

use swarm_compression::{Codec, Encoder};
use swarm_core::Identity;
use swarm_core::membership::RunId;
use swarm_core::peer::{Peer, PeerConfig, PeerShared, RequestCtx};
use swarm_core::protocol::{
    Ack, Admit, AdmitReply, Endpoint, Forward, Hop, MbKey, Ready, RunInfo, RunInfoRequest,
    RunPhase, StateSource, Traffic,
};
use swarm_core::rpc::{self, code};
use swarm_core::stage::{StageOptions, StageWorker, choose_stage, init_shard, join_run};
use swarm_core::wire::{self, kind};
use swarm_model::RunConfig;
use swarm_testkit::bounded;

fn config() -> RunConfig {
    swarm_testkit::micro_config(9)
}

fn run_id(toml: &str) -> RunId {
    let h = blake3::hash(toml.as_bytes());
    RunId(h.as_bytes()[..16].try_into().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joiner_takes_the_weakest_stage_fetches_its_state_and_serves() {
    let cfg = config();
    let toml = cfg.to_toml().unwrap();
    let run = run_id(&toml);
    let trainer = Peer::start(
        Identity::from_secret([100; 32]),
        PeerConfig {
            run_id: Some(run),
            ..PeerConfig::default()
        },
    )
    .await
    .unwrap();
    // A bare peer playing the trainer: it accepts the training kinds like the real one.
    trainer
        .register_kinds(&swarm_core::protocol::KINDS)
        .unwrap();
    // A replica of stage 1 that has taken one optimizer step (so fetching is not rebuilding).
    let replica = Peer::start(
        Identity::from_secret([101; 32]),
        PeerConfig {
            run_id: Some(run),
            bootstrap: Some(trainer.local_addr()),
            ..PeerConfig::default()
        },
    )
    .await
    .unwrap();
    let mut shard = init_shard(&cfg, 1).unwrap();
    shard.optimizer_step(&cfg.adamw(), 1e-2, 1.0).unwrap();
    let digest = shard.weights_digest().unwrap();
    let worker = StageWorker::start(
        &replica,
        StageOptions::new(run, cfg.clone(), 1),
        Some(shard),
    )
    .unwrap();
    assert_eq!(worker.step(), Some(1));

    // Occupancy: stage 0 has two replicas, stage 1 has one: the joiner must pick stage 1.
    let info = RunInfo {
        run,
        epoch: 0,
        step: 1,
        phase: RunPhase::Running,
        config_toml: toml.clone(),
        trainer: Endpoint {
            peer: trainer.peer_id(),
            addr: trainer.local_addr(),
        },
        replicas: vec![
            vec![swarm_core::PeerId([1; 32]), swarm_core::PeerId([2; 32])],
            vec![replica.peer_id()],
        ],
    };
    assert_eq!(choose_stage(&info, &cfg).unwrap(), 1);

    let ready: Arc<Mutex<Option<Ready>>> = Arc::default();
    {
        let info = info.clone();
        trainer.register(
            kind::RUN_INFO,
            move |_p: Arc<PeerShared>, _c: RequestCtx, body: Vec<u8>| {
                let info = info.clone();
                async move {
                    wire::decode_body::<RunInfoRequest>(&body)?;
                    rpc::reply(&info)
                }
            },
        );
        let src = Endpoint {
            peer: replica.peer_id(),
            addr: replica.local_addr(),
        };
        trainer.register(
            kind::ADMIT,
            move |_p: Arc<PeerShared>, _c: RequestCtx, body: Vec<u8>| async move {
                let a: Admit = wire::decode_body(&body)?;
                if a.stage != 1 {
                    return Err(rpc::RpcError::refused(
                        code::BAD_REQUEST,
                        "expected stage 1",
                    ));
                }
                rpc::reply(&AdmitReply {
                    run: a.run,
                    epoch: 0,
                    stage: a.stage,
                    step: 1,
                    source: StateSource::Fetch {
                        from: vec![src],
                        digest,
                    },
                })
            },
        );
        let ready = ready.clone();
        trainer.register(
            kind::READY,
            move |_p: Arc<PeerShared>, _c: RequestCtx, body: Vec<u8>| {
                let ready = ready.clone();
                async move {
                    let r: Ready = wire::decode_body(&body)?;
                    *ready.lock().unwrap() = Some(r);
                    rpc::reply(&Ack)
                }
            },
        );
    }

    let joiner = Peer::start(
        Identity::from_secret([102; 32]),
        PeerConfig {
            run_id: Some(run),
            bootstrap: Some(trainer.local_addr()),
            ..PeerConfig::default()
        },
    )
    .await
    .unwrap();
    let found = bounded(swarm_core::stage::find_trainer(
        &joiner,
        Some(trainer.local_addr()),
    ))
    .await;
    assert_eq!(found, Some(trainer.local_addr()));
    let joined = bounded(join_run(&joiner, trainer.local_addr(), None, |o| {
        o.chunk_bytes = 2048;
        o.max_contexts = 1;
    }))
    .await
    .unwrap();
    assert_eq!(joined.worker.stage(), 1);
    assert_eq!(joined.step, 1);
    assert_eq!(joined.worker.digest().await.unwrap(), Some(digest));
    let r = ready.lock().unwrap().expect("Ready sent");
    assert_eq!((r.stage, r.step, r.digest), (1, 1, digest));
    assert_eq!(joiner.local_record().info.stages, vec![1]);

    // It serves: a Forward is accepted; a second one finds the (one-entry) table full: BUSY.
    // The trainer takes the ForwardOut, so the context stays held until a backward or abandon.
    trainer.register(
        kind::FORWARD_OUT,
        |_p: Arc<PeerShared>, _c: RequestCtx, _body: Vec<u8>| async move { rpc::reply(&Ack) },
    );
    let mut frame = Vec::new();
    Encoder::new(Codec::NONE)
        .unwrap()
        .encode(&vec![0.5; 2 * 8 * 16], &[2, 8, 16], &mut frame)
        .unwrap();
    let fwd = |mb: u32| Forward {
        run,
        epoch: 0,
        key: MbKey {
            step: 1,
            mb,
            attempt: 0,
        },
        route: vec![
            Hop {
                stage: 0,
                peer: swarm_core::PeerId([1; 32]),
                addr: trainer.local_addr(),
            },
            Hop {
                stage: 1,
                peer: joiner.peer_id(),
                addr: joiner.local_addr(),
            },
        ],
        hop: 1,
        trainer: Endpoint {
            peer: trainer.peer_id(),
            addr: trainer.local_addr(),
        },
        accumulate: 0b10,
        time: Default::default(),
        upstream: Traffic::default(),
        activations: frame.clone(),
        receipt: None,
    };
    let _: (_, Ack) = bounded(trainer.shared().call(joiner.local_addr(), None, &fwd(0)))
        .await
        .unwrap();
    let err = bounded(
        trainer
            .shared()
            .call::<Forward, Ack>(joiner.local_addr(), None, &fwd(1)),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, swarm_net::Error::Remote(ref e) if e.code == code::BUSY),
        "{err}"
    );
    assert_eq!(
        joined
            .worker
            .stats()
            .busy
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}
