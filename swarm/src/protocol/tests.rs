use super::*;
use crate::wire::{decode_body, decode_envelope, encode_body, encode_envelope};
use proptest::prelude::*;

fn pid(b: u8) -> PeerId {
    PeerId([b; 32])
}
fn addr(p: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], p))
}
fn addr6(p: u16) -> SocketAddr {
    "[::1]:9"
        .parse::<SocketAddr>()
        .map(|mut a| {
            a.set_port(p);
            a
        })
        .unwrap()
}
const RUN: RunId = RunId([7; 16]);
const KEY: MbKey = MbKey {
    step: 300,
    mb: 5,
    attempt: 2,
};

fn forward() -> Forward {
    Forward {
        run: RUN,
        epoch: 3,
        key: KEY,
        route: vec![
            Hop {
                stage: 0,
                peer: pid(1),
                addr: addr(1000),
            },
            Hop {
                stage: 1,
                peer: pid(2),
                addr: addr6(2000),
            },
        ],
        hop: 1,
        trainer: Endpoint {
            peer: pid(9),
            addr: addr(9000),
        },
        accumulate: 0b10,
        time: PassTime {
            compute_us: 5,
            codec_us: 6,
            queued_us: 70_000,
        },
        upstream: Traffic {
            wire: 10,
            dense: 40,
        },
        activations: vec![1, 2, 3, 4, 5],
        receipt: Some(receipt(0, crate::receipt::Pass::Forward, &[1, 2, 3, 4, 5])),
    }
}

fn receipt(stage: u32, pass: crate::receipt::Pass, out: &[u8]) -> Receipt {
    let id = crate::identity::Identity::from_secret([5; 32]);
    Receipt::sign(&id, RUN, 3, KEY, stage, pass, [6; 32], b"in", out)
}

/// One message of every kind, encoded as (kind, body).
fn samples() -> Vec<(u16, Vec<u8>)> {
    fn e<M: WireMessage>(m: &M) -> (u16, Vec<u8>) {
        (M::KIND, encode_body(m).unwrap())
    }
    let fetch = StateSource::Fetch {
        from: vec![Endpoint {
            peer: pid(3),
            addr: addr(3),
        }],
        digest: [4; 32],
    };
    vec![
        e(&Ack),
        e(&forward()),
        e(&ForwardOut {
            run: RUN,
            epoch: 1,
            key: KEY,
            stage: 1,
            time: PassTime {
                compute_us: 5,
                codec_us: 6,
                queued_us: 70_000,
            },
            upstream: Traffic::default(),
            activations: vec![9; 40],
            receipt: Some(receipt(1, crate::receipt::Pass::Forward, &[9; 40])),
        }),
        e(&Backward {
            run: RUN,
            epoch: 1,
            key: KEY,
            stage: 1,
            time: PassTime {
                compute_us: 5,
                codec_us: 6,
                queued_us: 70_000,
            },
            upstream: Traffic { wire: 1, dense: 2 },
            grad: vec![8; 33],
            receipt: None,
        }),
        e(&BackwardOut {
            run: RUN,
            epoch: 1,
            key: KEY,
            time: PassTime {
                compute_us: 5,
                codec_us: 6,
                queued_us: 70_000,
            },
            upstream: Traffic {
                wire: 300,
                dense: 1 << 40,
            },
            grad: vec![],
            receipt: Some(receipt(0, crate::receipt::Pass::Backward, &[])),
        }),
        e(&Counted {
            run: RUN,
            epoch: 0,
            key: KEY,
            stage: 3,
        }),
        e(&HopFailed {
            run: RUN,
            epoch: 0,
            key: KEY,
            failed: pid(5),
            busy: true,
            reason: "timed out ü".into(),
            traffic: Traffic {
                wire: 300,
                dense: 1 << 40,
            },
        }),
        e(&Abandon {
            run: RUN,
            epoch: 0,
            key: KEY,
            uncounted: Abandon::FORWARD,
        }),
        e(&RunInfoRequest),
        e(&RunInfo {
            run: RUN,
            epoch: 2,
            step: 17,
            phase: RunPhase::Paused,
            config_toml: "[model]\nhidden_size = 64\n".into(),
            trainer: Endpoint {
                peer: pid(9),
                addr: addr(9),
            },
            replicas: vec![vec![pid(1), pid(2)], vec![]],
        }),
        e(&Admit {
            run: RUN,
            epoch: 2,
            stage: 1,
            addr: addr(77),
            throughput: 3.5,
        }),
        e(&AdmitReply {
            run: RUN,
            epoch: 2,
            stage: 1,
            step: 17,
            source: fetch.clone(),
        }),
        e(&AdmitReply {
            run: RUN,
            epoch: 0,
            stage: 0,
            step: 0,
            source: StateSource::Init,
        }),
        e(&Ready {
            run: RUN,
            epoch: 2,
            stage: 1,
            step: 17,
            digest: [1; 32],
            sync_ms: 1234,
        }),
        e(&Leave { run: RUN, epoch: 2 }),
        e(&LeaveReply {
            stay_for_step: Some(18),
        }),
        e(&LeaveReply {
            stay_for_step: None,
        }),
        e(&SyncStart {
            run: RUN,
            epoch: 2,
            step: 17,
            stage: 1,
            round: 2,
            phase: SyncPhase::Outer,
            participants: vec![pid(1), pid(2)],
            mb_counts: vec![3, 5],
            addrs: vec![addr(1), addr6(2)],
        }),
        e(&GradShare {
            run: RUN,
            epoch: 2,
            step: 17,
            stage: 1,
            round: 2,
            from: pid(1),
            frame: vec![0; 100],
        }),
        e(&SyncDone {
            run: RUN,
            epoch: 2,
            step: 17,
            stage: 1,
            round: 3,
            grad_sq_norm: 0.25,
            grad_digest: [6; 32],
            share_bytes: 100,
            share_dense_bytes: 4000,
            abandoned_activations: Traffic {
                wire: 300,
                dense: 1200,
            },
            abandoned_gradients: Traffic::default(),
        }),
        e(&Apply {
            run: RUN,
            epoch: 2,
            step: 17,
            stage: 1,
            lr: 3e-4,
            clip_scale: 0.5,
            phase: SyncPhase::Local,
            credit: Some(CreditReport {
                audits_passed: 3,
                audits_failed: 0,
                credited_micro_batches: 1 << 33,
                pending_micro_batches: 7,
            }),
        }),
        e(&Applied {
            run: RUN,
            epoch: 2,
            step: 17,
            stage: 1,
            digest: [2; 32],
            sent: [
                Traffic {
                    wire: 10,
                    dense: 40,
                },
                Traffic { wire: 0, dense: 0 },
                Traffic {
                    wire: u64::MAX,
                    dense: 1 << 40,
                },
            ],
        }),
        e(&FetchState {
            run: RUN,
            epoch: 2,
            stage: 1,
            step: 17,
            offset: 1 << 20,
            max_len: 1 << 20,
            weights_only: true,
        }),
        e(&StateChunk {
            run: RUN,
            epoch: 2,
            stage: 1,
            step: 17,
            total_len: 10,
            offset: 4,
            state_hash: [3; 32],
            digest: [4; 32],
            data: vec![1; 6],
        }),
        e(&Reload {
            run: RUN,
            epoch: 3,
            stage: 1,
            step: 17,
            source: fetch,
        }),
    ]
}

#[test]
fn every_kind_is_registered_in_its_range_with_its_cap() {
    KINDS.check().unwrap();
    assert_eq!((KINDS.first, KINDS.last), (30, 79));
    assert_eq!(KINDS.row(kind::FORWARD).max_len, caps::FORWARD);
    assert_eq!(KINDS.row(kind::STATE_CHUNK).max_len, caps::STATE_CHUNK);
    // Every sample round-trips and fits its cap.
    let s = samples();
    let kinds: std::collections::HashSet<u16> = s.iter().map(|(k, _)| *k).collect();
    assert_eq!(kinds.len(), KINDS.kinds.len(), "a sample per kind");
    for (k, body) in &s {
        assert!(body.len() <= KINDS.row(*k).max_len);
        let again = roundtrip_any(*k, body).unwrap().unwrap();
        assert_eq!(&again, body, "kind {}", KINDS.row(*k).name);
    }
}

#[test]
fn forward_round_trips_through_an_envelope() {
    let f = forward();
    let bytes = encode_envelope(&f).unwrap();
    assert_eq!(decode_envelope::<Forward>(&bytes).unwrap(), f);
    assert!(f.accumulates(1) && !f.accumulates(0) && !f.accumulates(200));
}

#[test]
fn every_truncation_and_extension_is_refused() {
    for (k, body) in samples() {
        for cut in 0..body.len() {
            assert!(
                roundtrip_any(k, &body[..cut]).unwrap().is_err(),
                "{} cut at {cut}",
                KINDS.row(k).name
            );
        }
        let mut longer = body.clone();
        longer.push(0);
        assert!(roundtrip_any(k, &longer).unwrap().is_err());
    }
}

#[test]
fn invariants_are_checked() {
    let mut f = forward();
    f.hop = 2;
    let b = encode_body(&f).unwrap();
    assert_eq!(
        decode_body::<Forward>(&b),
        Err(WireError::Invalid("hop index beyond the route"))
    );
    let mut f = forward();
    f.route.swap(0, 1);
    let b = encode_body(&f).unwrap();
    assert!(matches!(
        decode_body::<Forward>(&b),
        Err(WireError::Invalid(_))
    ));
    let mut f = forward();
    f.route.clear();
    f.hop = 0;
    assert!(decode_body::<Forward>(&encode_body(&f).unwrap()).is_err());

    let a = Apply {
        run: RUN,
        epoch: 0,
        step: 1,
        stage: 0,
        lr: f64::NAN,
        clip_scale: 1.0,
        phase: SyncPhase::Gradient,
        credit: None,
    };
    assert!(decode_body::<Apply>(&encode_body(&a).unwrap()).is_err());
    let a = Apply {
        lr: 1e-3,
        clip_scale: 2.0,
        ..a
    };
    assert!(decode_body::<Apply>(&encode_body(&a).unwrap()).is_err());
    // A credit flag other than 0 or 1.
    let mut body = encode_body(&Apply {
        clip_scale: 1.0,
        ..a
    })
    .unwrap();
    *body.last_mut().unwrap() = 2;
    assert!(decode_body::<Apply>(&body).is_err());
    // A sync phase other than 0, 1 or 2 (the byte before the credit flag).
    let mut body = encode_body(&Apply {
        clip_scale: 1.0,
        ..a
    })
    .unwrap();
    let n = body.len();
    body[n - 2] = 3;
    assert_eq!(
        decode_body::<Apply>(&body),
        Err(WireError::Invalid("unknown sync phase"))
    );

    let c = StateChunk {
        run: RUN,
        epoch: 0,
        stage: 0,
        step: 0,
        total_len: 5,
        offset: 4,
        state_hash: [0; 32],
        digest: [0; 32],
        data: vec![0; 2],
    };
    assert_eq!(
        decode_body::<StateChunk>(&encode_body(&c).unwrap()),
        Err(WireError::Invalid("state chunk beyond the total length"))
    );

    let s = SyncStart {
        run: RUN,
        epoch: 0,
        step: 0,
        stage: 0,
        round: 0,
        phase: SyncPhase::Gradient,
        participants: vec![pid(1), pid(1)],
        mb_counts: vec![1, 1],
        addrs: vec![addr(1), addr(1)],
    };
    assert!(decode_body::<SyncStart>(&encode_body(&s).unwrap()).is_err());

    let c = Counted {
        run: RUN,
        epoch: 0,
        key: KEY,
        stage: 64,
    };
    assert!(decode_body::<Counted>(&encode_body(&c).unwrap()).is_err());
}

#[test]
fn hostile_counts_do_not_allocate() {
    // A SyncStart claiming 2^30 participants with a few bytes behind it.
    let mut w = Writer::new();
    w.array(&RUN.0)
        .u32(0)
        .varint(1)
        .u32(0)
        .u32(0)
        .u8(0)
        .varint(1 << 30)
        .raw(&[0; 40]);
    assert!(matches!(
        decode_body::<SyncStart>(w.as_slice()),
        Err(WireError::TooLong { .. })
    ));
    // A frame length beyond the cap.
    let mut w = Writer::new();
    w.array(&RUN.0).u32(0);
    put_key(&mut w, &KEY);
    put_traffic(&mut w, &Traffic::default());
    put_pass_time(&mut w, &PassTime::default());
    w.varint(u64::MAX >> 1);
    assert!(matches!(
        decode_body::<BackwardOut>(w.as_slice()),
        Err(WireError::TooLong { .. })
    ));
}

proptest! {
    #[test]
    fn random_bodies_never_panic(kind_ix in 0usize..KINDS.kinds.len(),
                                 bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = roundtrip_any(KINDS.kinds[kind_ix].kind, &bytes);
    }

    #[test]
    fn mutated_samples_never_panic_and_reencode_exactly(ix in 0usize..25, pos in any::<usize>(), val in any::<u8>()) {
        let s = samples();
        let (k, mut body) = s[ix % s.len()].clone();
        if !body.is_empty() {
            let p = pos % body.len();
            body[p] = val;
        }
        if let Ok(again) = roundtrip_any(k, &body).unwrap() {
            // Canonical encodings: anything accepted re-encodes to the same bytes, except
            // over-long varints, which decode but re-encode shorter.
            prop_assert!(again.len() <= body.len());
        }
    }
}
