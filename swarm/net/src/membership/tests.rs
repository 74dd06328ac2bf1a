use super::*;
use crate::wire::{Reader, WireError, WireMessage, Writer, decode_body, encode_body};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use swarm_nat::PathKind;

const RUN: RunId = RunId([7; 16]);
const T0: UnixMillis = 1_700_000_000_000;

fn ident(n: u8) -> Identity {
    Identity::from_secret([n; 32])
}

fn addr(n: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9000 + n as u16))
}

fn info(n: u8) -> RecordInfo {
    RecordInfo {
        addrs: vec![addr(n)],
        stages: vec![n as u32 % 3],
        throughput: 100.0 * n as f64,
        state: PeerState::Online,
        version: "0.1.0".into(),
        reach: swarm_nat::Reachability::Punchable,
    }
}

fn record(n: u8, seq: u64, now: UnixMillis) -> PeerRecord {
    PeerRecord::sign(&ident(n), RUN, seq, now, 60_000, info(n))
}

fn member(n: u8, config: MembershipConfig, now: UnixMillis) -> Membership {
    Membership::new(ident(n), RUN, config, info(n), vec![], now)
}

fn round_trip(r: &PeerRecord) -> PeerRecord {
    let mut w = Writer::new();
    r.encode(&mut w);
    let bytes = w.into_vec();
    assert!(bytes.len() <= MAX_RECORD_LEN);
    let mut rd = Reader::new(&bytes);
    let back = PeerRecord::decode(&mut rd).unwrap();
    rd.finish().unwrap();
    back
}

#[test]
fn record_round_trips_and_verifies() {
    let mut r = record(1, 5, T0);
    r.info.addrs.push("[::1]:7000".parse().unwrap());
    r = PeerRecord::sign(&ident(1), RUN, 5, T0, 60_000, r.info.clone());
    let back = round_trip(&r);
    assert_eq!(back, r);
    assert_eq!(back.verify(), Ok(()));
}

#[test]
fn every_field_is_covered_by_the_signature() {
    let good = record(1, 5, T0);
    let other = ident(2);
    let tampered: Vec<PeerRecord> = vec![
        PeerRecord {
            run_id: RunId([8; 16]),
            ..good.clone()
        },
        PeerRecord {
            seq: 6,
            ..good.clone()
        },
        PeerRecord {
            issued_at: T0 + 1,
            ..good.clone()
        },
        PeerRecord {
            expires_at: T0 + 70_000,
            ..good.clone()
        },
        {
            let mut r = good.clone();
            r.info.addrs[0] = addr(9);
            r
        },
        {
            let mut r = good.clone();
            r.info.stages.push(2);
            r
        },
        {
            let mut r = good.clone();
            r.info.throughput += 1.0;
            r
        },
        {
            let mut r = good.clone();
            r.info.state = PeerState::Leaving;
            r
        },
        {
            let mut r = good.clone();
            r.info.version.push('x');
            r
        },
        {
            let mut r = good.clone();
            r.signature[10] ^= 1;
            r
        },
    ];
    for (i, r) in tampered.iter().enumerate() {
        assert_eq!(r.verify(), Err(Refusal::BadSignature), "case {i}");
    }
    // Claiming another peer's id with our own key: the id no longer hashes from the key.
    let forged = PeerRecord {
        peer_id: other.peer_id(),
        ..good.clone()
    };
    assert_eq!(forged.verify(), Err(Refusal::IdKeyMismatch));
    // Another peer's key and id, signed by us: the signature fails.
    let mut forged = good.clone();
    forged.public_key = other.public_key().to_bytes();
    forged.peer_id = other.peer_id();
    assert_eq!(forged.verify(), Err(Refusal::BadSignature));
}

#[test]
fn signature_is_domain_separated() {
    let r = record(1, 5, T0);
    let mut w = Writer::new();
    r.encode_fields(&mut w);
    // A signature over the same fields without the domain tag does not verify.
    let mut undomained = r.clone();
    undomained.signature = ident(1).sign(w.as_slice());
    assert_eq!(undomained.verify(), Err(Refusal::BadSignature));
    assert!(r.signing_bytes().starts_with(RECORD_DOMAIN));
}

#[test]
fn caps_are_enforced_when_signing_and_decoding() {
    let mut i = info(1);
    i.version = "v".repeat(MAX_VERSION_LEN + 1);
    let r = PeerRecord::sign(&ident(1), RUN, 1, T0, 1000, i);
    assert_eq!(r.verify(), Err(Refusal::Malformed));
    let mut w = Writer::new();
    r.encode(&mut w);
    assert!(matches!(
        PeerRecord::decode(&mut Reader::new(w.as_slice())),
        Err(WireError::TooLong {
            what: "version",
            ..
        })
    ));

    let mut i = info(1);
    i.addrs = vec![addr(1); MAX_ADDRS + 1];
    let r = PeerRecord::sign(&ident(1), RUN, 1, T0, 1000, i);
    assert_eq!(r.verify(), Err(Refusal::Malformed));
    let mut w = Writer::new();
    r.encode(&mut w);
    assert!(matches!(
        PeerRecord::decode(&mut Reader::new(w.as_slice())),
        Err(WireError::TooLong {
            what: "addresses",
            ..
        })
    ));

    for bad in [f64::NAN, f64::INFINITY, -1.0] {
        let mut i = info(1);
        i.throughput = bad;
        let r = PeerRecord::sign(&ident(1), RUN, 1, T0, 1000, i);
        assert_eq!(r.verify(), Err(Refusal::Malformed));
    }
}

#[test]
fn largest_messages_fit_their_kind_limits() {
    let mut i = info(1);
    i.addrs = vec!["[::1]:1".parse().unwrap(); MAX_ADDRS];
    i.stages = vec![u32::MAX; MAX_STAGES];
    i.version = "v".repeat(MAX_VERSION_LEN);
    let r = PeerRecord::sign(&ident(1), RUN, u64::MAX, T0, 1000, i);
    let mut w = Writer::new();
    r.encode(&mut w);
    assert!(w.len() <= MAX_RECORD_LEN, "{} > {MAX_RECORD_LEN}", w.len());
    let push = GossipPush {
        records: vec![r.clone(); MAX_RECORDS_PER_MESSAGE],
        digest: Some(vec![
            Digest {
                peer: r.peer_id,
                seq: u64::MAX
            };
            MAX_RECORDS_PER_MESSAGE
        ]),
    };
    let body = encode_body(&push).unwrap();
    assert_eq!(decode_body::<GossipPush>(&body).unwrap(), push);
    let reply = GossipReply {
        records: vec![r.clone(); MAX_RECORDS_PER_MESSAGE],
        want: vec![r.peer_id; MAX_RECORDS_PER_MESSAGE],
    };
    let body = encode_body(&reply).unwrap();
    assert_eq!(decode_body::<GossipReply>(&body).unwrap(), reply);
    let status = StatusReply {
        run_id: RUN,
        entries: vec![
            StatusEntry {
                record: r,
                last_seen_ago_ms: u64::MAX,
                path: Some(PathKind::Relayed),
                relay_bytes: u64::MAX,
            };
            MAX_RECORDS_PER_MESSAGE
        ],
    };
    let body = encode_body(&status).unwrap();
    assert_eq!(decode_body::<StatusReply>(&body).unwrap(), status);
}

#[test]
fn messages_round_trip_and_refuse_truncation() {
    let records = vec![record(1, 1, T0), record(2, 9, T0)];
    let join = JoinReply {
        run_id: RUN,
        observed_addr: "[2001:db8::1]:443".parse().unwrap(),
        records: records.clone(),
    };
    let body = encode_body(&join).unwrap();
    assert_eq!(decode_body::<JoinReply>(&body).unwrap(), join);
    for cut in 0..body.len() {
        assert!(decode_body::<JoinReply>(&body[..cut]).is_err(), "cut {cut}");
    }
    let reply = GossipReply {
        records: records.clone(),
        want: vec![ident(5).peer_id()],
    };
    let body = encode_body(&reply).unwrap();
    assert_eq!(decode_body::<GossipReply>(&body).unwrap(), reply);
    for push in [
        GossipPush {
            records: records.clone(),
            digest: None,
        },
        GossipPush {
            records,
            digest: Some(vec![Digest {
                peer: ident(3).peer_id(),
                seq: 4,
            }]),
        },
    ] {
        let body = encode_body(&push).unwrap();
        assert_eq!(decode_body::<GossipPush>(&body).unwrap(), push);
        for cut in 0..body.len() {
            assert!(
                decode_body::<GossipPush>(&body[..cut]).is_err(),
                "cut {cut}"
            );
        }
    }
    assert!(decode_body::<JoinRequest>(&[0]).is_err());
    assert_eq!(decode_body::<StatusRequest>(&[]).unwrap(), StatusRequest);
}

#[test]
fn hostile_counts_do_not_allocate() {
    // Claims 4096 records with no bytes behind the count.
    let mut w = Writer::new();
    w.varint(MAX_RECORDS_PER_MESSAGE as u64);
    assert!(matches!(
        decode_body::<GossipPush>(w.as_slice()),
        Err(WireError::TooLong { .. })
    ));
    let mut w = Writer::new();
    w.varint(u64::MAX);
    assert!(matches!(
        decode_body::<GossipPush>(w.as_slice()),
        Err(WireError::TooLong { .. })
    ));
}

#[test]
fn bad_state_and_address_tags_are_refused() {
    let r = record(1, 1, T0);
    let mut w = Writer::new();
    r.encode(&mut w);
    let mut bytes = w.into_vec();
    let state_at = 32 + 32 + 16 + 8 * 3;
    bytes[state_at] = 3;
    assert!(matches!(
        PeerRecord::decode(&mut Reader::new(&bytes)),
        Err(WireError::BadTag {
            what: "peer state",
            ..
        })
    ));
    bytes[state_at] = 1;
    let family_at = state_at + 1 + 8 + 1;
    bytes[family_at] = 5;
    assert!(matches!(
        PeerRecord::decode(&mut Reader::new(&bytes)),
        Err(WireError::BadTag {
            what: "address family",
            ..
        })
    ));
}

#[test]
fn accepts_new_and_newer_and_refuses_stale_expired_future_and_foreign() {
    let mut m = member(0, MembershipConfig::default(), T0);
    let out = m.handle_records(T0, [record(1, 5, T0), record(2, 5, T0)]);
    assert_eq!(out.accepted.len(), 2);
    assert!(out.refused.is_empty());

    // Same and older sequence numbers: stale (replays change nothing).
    let out = m.handle_records(T0 + 1, [record(1, 5, T0), record(1, 4, T0 + 1)]);
    assert_eq!(out.refused, vec![(ident(1).peer_id(), Refusal::Stale); 2]);
    assert_eq!(m.get(&ident(1).peer_id()).unwrap().last_seen, T0);

    // Newer: replaces.
    let out = m.handle_records(T0 + 2, [record(1, 6, T0 + 2)]);
    assert_eq!(out.accepted, vec![ident(1).peer_id()]);
    assert_eq!(m.get(&ident(1).peer_id()).unwrap().record.seq, 6);
    assert_eq!(m.get(&ident(1).peer_id()).unwrap().last_seen, T0 + 2);

    let id3 = ident(3).peer_id();
    // Expired.
    let r = PeerRecord::sign(&ident(3), RUN, 1, T0 - 10_000, 5_000, info(3));
    assert_eq!(
        m.handle_records(T0, [r]).refused,
        vec![(id3, Refusal::Expired)]
    );
    // Issued beyond the tolerated skew.
    let r = PeerRecord::sign(&ident(3), RUN, 1, T0 + 31_000, 5_000, info(3));
    assert_eq!(
        m.handle_records(T0, [r]).refused,
        vec![(id3, Refusal::TooFarFuture)]
    );
    // A lifetime longer than anyone honest signs.
    let r = PeerRecord::sign(&ident(3), RUN, 1, T0, 11 * 60_000, info(3));
    assert_eq!(
        m.handle_records(T0, [r]).refused,
        vec![(id3, Refusal::TooFarFuture)]
    );
    // Another run.
    let r = PeerRecord::sign(&ident(3), RunId([1; 16]), 1, T0, 5_000, info(3));
    assert_eq!(
        m.handle_records(T0, [r]).refused,
        vec![(id3, Refusal::WrongRun)]
    );
    // Forged: bad signature.
    let mut r = record(3, 1, T0);
    r.info.stages = vec![0, 1, 2];
    let out = m.handle_records(T0, [r]);
    assert_eq!(out.refused, vec![(id3, Refusal::BadSignature)]);
    assert_eq!(out.suspicious(), 1);
    assert!(m.get(&id3).is_none());
    assert_eq!(m.view().len(), 2);
}

#[test]
fn split_handling_rechecks_after_verification() {
    let mut m = member(0, MembershipConfig::default(), T0);
    m.handle_records(T0, [record(1, 5, T0)]);
    let mut forged = record(2, 1, T0);
    forged.info.throughput = 7.0;
    let (pass, refused) = m.triage(T0, [record(1, 5, T0), record(1, 6, T0), forged]);
    assert_eq!(refused, vec![(ident(1).peer_id(), Refusal::Stale)]);
    assert_eq!(
        pass.len(),
        2,
        "newer and unknown records go on to verification"
    );
    let mut refused = Vec::new();
    let verified = verify_all(pass, &mut refused);
    assert_eq!(refused, vec![(ident(2).peer_id(), Refusal::BadSignature)]);
    // Meanwhile (the lock was released) an even newer record of peer 1 arrived.
    m.handle_records(T0, [record(1, 7, T0)]);
    let out = m.handle_verified(T0, verified);
    assert_eq!(out.refused, vec![(ident(1).peer_id(), Refusal::Stale)]);
    assert_eq!(m.get(&ident(1).peer_id()).unwrap().record.seq, 7);
}

#[test]
fn forged_newer_record_cannot_override_a_peer() {
    let mut m = member(0, MembershipConfig::default(), T0);
    m.handle_records(T0, [record(1, 5, T0)]);
    // An attacker re-signs peer 1's record with its own key but keeps 1's id.
    let mut forged = record(1, 99, T0);
    forged.info.addrs = vec![addr(66)];
    forged.public_key = ident(66).public_key().to_bytes();
    forged.signature = ident(66).sign(&forged.signing_bytes());
    let out = m.handle_records(T0, [forged]);
    assert_eq!(out.refused[0].1, Refusal::IdKeyMismatch);
    assert_eq!(
        m.get(&ident(1).peer_id()).unwrap().record.info.addrs,
        vec![addr(1)]
    );
}

#[test]
fn records_expire_and_leaving_peers_stop_being_live() {
    let config = MembershipConfig::default();
    let mut m = member(0, config.clone(), T0);
    m.handle_records(T0, [record(1, 1, T0), record(2, 1, T0 + 30_000)]);
    assert_eq!(m.expire(T0 + 59_999), Vec::<PeerId>::new());
    assert_eq!(m.poll_timeout().min(T0 + 60_000), m.poll_timeout());
    assert_eq!(m.expire(T0 + 60_000), vec![ident(1).peer_id()]);
    assert_eq!(m.view().len(), 1);

    // Peer 2 leaves: its LEAVING record replaces the ONLINE one, it is no longer live, and the
    // old ONLINE record still circulating is refused as stale.
    let mut p2 = member(2, config, T0 + 30_000);
    let leaving = p2.leave(T0 + 61_000);
    assert_eq!(leaving.info.state, PeerState::Leaving);
    let out = m.handle_records(T0 + 61_000, [leaving]);
    assert_eq!(out.accepted.len(), 1);
    assert_eq!(m.live().count(), 0);
    assert_eq!(m.view().len(), 1);
    assert_eq!(
        m.handle_records(T0 + 61_001, [record(2, 1, T0 + 30_000)])
            .refused[0]
            .1,
        Refusal::Stale
    );
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    assert!(m.poll_gossip_targets(T0 + 62_000, &mut rng).is_empty());
    assert_eq!(m.expire(T0 + 61_000 + 60_000), vec![ident(2).peer_id()]);
}

#[test]
fn own_record_refreshes_with_growing_sequence() {
    let config = MembershipConfig::default();
    let mut m = member(0, config.clone(), T0);
    let first = m.local_record().clone();
    assert_eq!(first.seq, T0);
    assert!(!m.refresh_local(T0 + config.refresh_interval_ms - 1));
    assert!(m.refresh_local(T0 + config.refresh_interval_ms));
    let second = m.local_record().clone();
    assert!(second.seq > first.seq);
    assert_eq!(
        second.expires_at,
        T0 + config.refresh_interval_ms + config.record_ttl_ms
    );
    assert_eq!(second.verify(), Ok(()));
    m.update_local(T0 + config.refresh_interval_ms, |i| {
        i.stages = vec![4, 5];
        i.throughput = 1234.5;
    });
    assert!(m.local_record().seq > second.seq);
    assert_eq!(m.local_record().info.stages, vec![4, 5]);
    // A record of ours from an earlier life with a higher seq: ours jumps past it.
    let ghost = PeerRecord::sign(&ident(0), RUN, T0 * 2, T0, 60_000, info(0));
    let out = m.handle_records(T0 + 20_000, [ghost]);
    assert_eq!(out.refused[0].1, Refusal::SelfRecord);
    assert!(m.local_record().seq > T0 * 2);
}

#[test]
fn gossip_targets_are_random_live_peers_or_seeds() {
    let config = MembershipConfig {
        fanout: 2,
        ..MembershipConfig::default()
    };
    let seed_addr = addr(200);
    let mut m = Membership::new(ident(0), RUN, config.clone(), info(0), vec![seed_addr], T0);
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    // Nobody known: the seed, with no expected id.
    assert_eq!(
        m.poll_gossip_targets(T0, &mut rng),
        vec![GossipTarget {
            peer: None,
            addr: seed_addr
        }]
    );
    // Not due again before the interval.
    assert!(m.poll_gossip_targets(T0 + 1, &mut rng).is_empty());
    m.handle_records(T0, (1..=5).map(|n| record(n, 1, T0)));
    let mut counts = HashMap::new();
    let mut now = T0;
    // No `expire` calls here: the loop measures the choice, not expiry.
    for _ in 0..100 {
        now = m.next_gossip.max(now);
        let t = m.poll_gossip_targets(now, &mut rng);
        if t.is_empty() {
            continue;
        }
        assert_eq!(t.len(), 2);
        assert_ne!(t[0], t[1]);
        for g in t {
            let id = g.peer.unwrap();
            assert_eq!(m.get(&id).unwrap().record.info.addrs[0], g.addr);
            *counts.entry(id).or_insert(0u32) += 1;
        }
    }
    assert_eq!(counts.len(), 5, "every live peer gets picked: {counts:?}");
}

#[test]
fn gossip_choice_is_reproducible_from_the_seed() {
    let pick = |seed| {
        let mut m = member(0, MembershipConfig::default(), T0);
        m.handle_records(T0, (1..=20).map(|n| record(n, 1, T0)));
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        m.poll_gossip_targets(T0, &mut rng)
    };
    assert_eq!(pick(9), pick(9));
    assert_ne!(pick(9), pick(10));
}

#[test]
fn view_is_bounded() {
    let config = MembershipConfig {
        max_peers: 3,
        ..MembershipConfig::default()
    };
    let mut m = member(0, config, T0);
    let out = m.handle_records(T0, (1..=5).map(|n| record(n, 1, T0)));
    assert_eq!(out.accepted.len(), 3);
    assert_eq!(out.refused.len(), 2);
    assert!(out.refused.iter().all(|(_, r)| *r == Refusal::ViewFull));
    // A known peer can still update.
    let known = out.accepted[0];
    let n = (1..=5).find(|n| ident(*n).peer_id() == known).unwrap();
    assert_eq!(
        m.handle_records(T0, [record(n, 2, T0)]).accepted,
        vec![known]
    );
}

fn pair(v: &mut [Membership], i: usize, j: usize) -> (&mut Membership, &mut Membership) {
    assert_ne!(i, j);
    if i < j {
        let (lo, hi) = v.split_at_mut(j);
        (&mut lo[i], &mut hi[0])
    } else {
        let (lo, hi) = v.split_at_mut(i);
        (&mut hi[0], &mut lo[j])
    }
}

/// Sends `m` through its wire encoding, as the network would.
fn wire<M: WireMessage>(m: &M) -> M {
    decode_body(&encode_body(m).unwrap()).unwrap()
}

/// One digest exchange initiated by `a` (what `peer.rs` does over RPC); returns the records
/// carried, to measure the protocol's cost.
fn exchange(a: &mut Membership, b: &mut Membership, now: UnixMillis) -> usize {
    let push = wire(&GossipPush {
        records: vec![a.local_record().clone()],
        digest: Some(a.digest()),
    });
    b.handle_records(now, push.records.clone());
    let (records, want) = b.diff(now, push.digest.as_deref().unwrap());
    let reply = wire(&GossipReply { records, want });
    a.handle_records(now, reply.records.clone());
    a.handle_contact(now, b.peer_id());
    let wanted = a.records_of(&reply.want);
    let carried = push.records.len() + reply.records.len() + wanted.len();
    if !wanted.is_empty() {
        b.handle_records(
            now,
            wire(&GossipPush {
                records: wanted,
                digest: None,
            })
            .records,
        );
    }
    carried
}

#[test]
fn digest_exchange_carries_only_what_differs() {
    let config = MembershipConfig::default();
    let mut a = member(0, config.clone(), T0);
    let mut b = member(1, config, T0);
    a.handle_records(T0, (2..=6).map(|n| record(n, 1, T0)));
    b.handle_records(T0, (5..=9).map(|n| record(n, 1, T0)));
    b.handle_records(T0, [record(5, 2, T0)]);
    // A lacks 1 (B itself), 7, 8, 9 and holds 5 older; B lacks 0 (A itself), 2, 3, 4.
    let (newer, want) = b.diff(T0, &a.digest());
    let mut newer_ids: Vec<PeerId> = newer.iter().map(|r| r.peer_id).collect();
    newer_ids.sort();
    let mut expect: Vec<PeerId> = [1, 5, 7, 8, 9]
        .iter()
        .map(|n| ident(*n).peer_id())
        .collect();
    expect.sort();
    assert_eq!(newer_ids, expect);
    let mut want = want;
    want.sort();
    let mut expect: Vec<PeerId> = [0, 2, 3, 4].iter().map(|n| ident(*n).peer_id()).collect();
    expect.sort();
    assert_eq!(want, expect);

    let carried = exchange(&mut a, &mut b, T0 + 1);
    assert_eq!(carried, 1 + 5 + 3, "own record, B's five, A's three others");
    assert_eq!(a.view().len(), 9);
    assert_eq!(b.view().len(), 9);
    assert_eq!(a.get(&ident(5).peer_id()).unwrap().record.seq, 2);
    // In sync: the next exchange carries only A's own record.
    assert_eq!(exchange(&mut a, &mut b, T0 + 2), 1);
    // Expired records are not offered.
    assert!(b.refresh_local(T0 + 60_001));
    let (newer, _) = b.diff(T0 + 60_001, &[]);
    assert_eq!(newer.len(), 1, "only B's own (fresh) record: {newer:?}");
}

/// Drives a small swarm of state machines with a virtual clock and perfect delivery: everyone
/// learns everyone through one bootstrap, a silent peer expires, a leaving one drops at once.
#[test]
fn simulated_swarm_converges_and_forgets() {
    let config = MembershipConfig::with_ttl(10_000);
    let n = 12u8;
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let mut peers: Vec<Membership> = (0..n)
        .map(|i| {
            let seeds = if i == 0 { vec![] } else { vec![addr(0)] };
            Membership::new(ident(i), RUN, config.clone(), info(i), seeds, T0)
        })
        .collect();
    let index_of = |a: SocketAddr| (a.port() - 9000) as usize;
    let mut alive = vec![true; n as usize];
    let mut now = T0;
    let step = |peers: &mut Vec<Membership>, alive: &[bool], now, rng: &mut ChaCha8Rng| {
        for i in 0..peers.len() {
            if !alive[i] {
                continue;
            }
            peers[i].expire(now);
            peers[i].refresh_local(now);
            for t in peers[i].poll_gossip_targets(now, rng) {
                let j = index_of(t.addr);
                if !alive[j] {
                    continue;
                }
                let (a, b) = pair(peers, i, j);
                exchange(a, b, now);
            }
        }
    };
    let converged = |peers: &Vec<Membership>, alive: &[bool]| {
        let live = alive.iter().filter(|a| **a).count();
        peers
            .iter()
            .zip(alive)
            .filter(|(_, a)| **a)
            .all(|(p, _)| p.live().count() == live - 1)
    };
    let mut rounds = 0;
    while !converged(&peers, &alive) {
        now += 100;
        rounds += 1;
        assert!(rounds < 1000, "no convergence");
        step(&mut peers, &alive, now, &mut rng);
    }
    assert!(now - T0 < 10_000, "converged after {} ms", now - T0);

    // Peer 5 dies silently; everyone else keeps it until its record expires, then drops it.
    alive[5] = false;
    let died = now;
    let gone = ident(5).peer_id();
    let mut rounds = 0;
    while peers
        .iter()
        .zip(&alive)
        .any(|(p, a)| *a && p.get(&gone).is_some())
    {
        now += 100;
        rounds += 1;
        assert!(rounds < 1000, "dead peer never expired");
        step(&mut peers, &alive, now, &mut rng);
    }
    assert!(now - died <= config.record_ttl_ms + 100);
    assert!(converged(&peers, &alive));

    // Peer 7 leaves: it pushes LEAVING to a few peers and gossip spreads it quickly.
    let leaving = peers[7].leave(now);
    alive[7] = false;
    for j in [1usize, 2, 3] {
        peers[j].handle_records(now, [leaving.clone()]);
    }
    let left = now;
    let id7 = ident(7).peer_id();
    let mut rounds = 0;
    while peers
        .iter()
        .zip(&alive)
        .any(|(p, a)| *a && p.live().any(|e| e.record.peer_id == id7))
    {
        now += 100;
        rounds += 1;
        assert!(rounds < 1000, "leave never spread");
        step(&mut peers, &alive, now, &mut rng);
    }
    assert!(
        now - left < config.record_ttl_ms / 2,
        "leave took {} ms",
        now - left
    );
}

#[test]
fn status_lists_self_first_with_ages() {
    let mut m = member(0, MembershipConfig::default(), T0);
    m.handle_records(T0, [record(1, 1, T0)]);
    let s = m.status(T0 + 2_500);
    assert_eq!(s.run_id, RUN);
    assert_eq!(s.entries.len(), 2);
    assert_eq!(s.entries[0].record.peer_id, ident(0).peer_id());
    assert_eq!(s.entries[0].last_seen_ago_ms, 0);
    assert_eq!(s.entries[1].last_seen_ago_ms, 2_500);
}

proptest::proptest! {
    #[test]
    fn decoding_random_bytes_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..800)) {
        let _ = decode_body::<GossipPush>(&bytes);
        let _ = decode_body::<JoinReply>(&bytes);
        let _ = decode_body::<StatusReply>(&bytes);
    }

    #[test]
    fn flipping_any_byte_of_a_record_is_caught(pos in 0usize..400, bit in 0u8..8) {
        let r = record(1, 5, T0);
        let mut w = Writer::new();
        r.encode(&mut w);
        let mut bytes = w.into_vec();
        let pos = pos % bytes.len();
        bytes[pos] ^= 1 << bit;
        if let Ok(back) = PeerRecord::decode(&mut Reader::new(&bytes)) {
            proptest::prop_assert!(back.verify().is_err());
        }
    }
}
