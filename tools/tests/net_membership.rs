//! Membership with real `swarm join` processes on loopback: discovery through any peer, expiry of a
//! killed peer, graceful leave, refusal of wrong keys and forged records, and survival of malformed
//! and oversized messages.

mod net_common;

use std::net::SocketAddr;
use std::time::Duration;

use net_common::{FAST, PeerProc, ids_in_state, run_swarm, status, wait_for};
use swarm_core::membership::{
    GossipPush, GossipReply, PeerRecord, PeerState, RecordInfo, RunId, StatusReply, StatusRequest,
};
use swarm_core::transport::{Node, PeerConn, TransportConfig};
use swarm_core::wire::{self, kind};
use swarm_core::{Identity, PeerId, rpc};

const LONG: Duration = Duration::from_secs(40);

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// Waits until every peer in `peers` lists exactly `expect` as ONLINE.
fn wait_converged(peers: &[&PeerProc], expect: &[&PeerProc]) {
    let want = sorted(expect.iter().map(|p| p.id.clone()).collect());
    for p in peers {
        wait_for(&format!("{} to see all peers", &p.id[..12]), LONG, || {
            let rows = status(p.addr)?;
            (ids_in_state(&rows, "ONLINE") == want).then_some(())
        });
    }
}

#[test]
fn every_peer_sees_every_other_through_any_one_of_them() {
    let a = PeerProc::start(None, FAST, &[]);
    // Each newcomer bootstraps through the previous one, not through A; one has a shaped link.
    let b = PeerProc::start(Some(a.addr), FAST, &["--stages", "0,1"]);
    let c = PeerProc::start(
        Some(b.addr),
        FAST,
        &[
            "--shape",
            "up=20mbit,down=80mbit,delay=20ms,jitter=5ms,loss=0.1%",
        ],
    );
    let d = PeerProc::start(Some(c.addr), FAST, &[]);
    for p in [&b, &c, &d] {
        assert_eq!(
            p.run_id, a.run_id,
            "joiners learn the run from the bootstrap"
        );
    }
    let all = [&a, &b, &c, &d];
    wait_converged(&all, &all);

    let rows = status(a.addr).unwrap();
    for p in all {
        let row = rows.iter().find(|r| r.id == p.id).unwrap();
        assert_eq!(
            row.addr,
            p.addr.to_string(),
            "announced address is the printed one"
        );
        assert!(row.last_seen_s >= 0.0 && row.last_seen_s < 60.0);
        assert!(row.throughput >= 0.0);
    }
    assert_eq!(
        rows.iter().find(|r| r.id == b.id).unwrap().stages,
        vec![0, 1]
    );

    // The human table names every peer by its short id.
    let out = run_swarm(&["status", &d.addr.to_string()], Duration::from_secs(20));
    assert!(out.status.success(), "{}", out.stderr);
    for p in all {
        assert!(out.stdout.contains(&p.id[..12]), "{}", out.stdout);
    }
}

#[test]
fn killed_peer_leaves_the_views_once_its_record_expires() {
    let a = PeerProc::start(None, FAST, &[]);
    let b = PeerProc::start(Some(a.addr), FAST, &[]);
    let mut c = PeerProc::start(Some(a.addr), FAST, &[]);
    wait_converged(&[&a, &b, &c], &[&a, &b, &c]);

    // SIGKILL: no goodbye, so only expiry can remove it (ttl 4 s in FAST).
    c.child.kill().unwrap();
    c.child.wait().unwrap();
    for p in [&a, &b] {
        wait_for("the killed peer to expire", LONG, || {
            let rows = status(p.addr)?;
            (!rows.iter().any(|r| r.id == c.id) && rows.len() == 2).then_some(())
        });
    }
}

#[test]
fn restarted_peer_keeps_its_id_and_its_new_address_wins() {
    // A long ttl: the old record is still valid everywhere when the peer comes back.
    let long_ttl: &[(&str, &str)] = &[
        ("SWARM_GOSSIP_INTERVAL_MS", "200"),
        ("SWARM_RECORD_TTL_MS", "300000"),
        ("SWARM_REFRESH_INTERVAL_MS", "60000"),
    ];
    let a = PeerProc::start(None, long_ttl, &[]);
    let b = PeerProc::start(Some(a.addr), long_ttl, &[]);
    let c = PeerProc::start(Some(a.addr), long_ttl, &[]);
    wait_converged(&[&a, &b, &c], &[&a, &b, &c]);
    let (id, old_addr) = (c.id.clone(), c.addr);
    let dir = c.kill_keep_dir();
    // Back on a new port, bootstrapping through B this time.
    let c2 = PeerProc::start_in(dir, Some(b.addr), long_ttl, &[]);
    assert_eq!(c2.id, id, "the identity persists in the data dir");
    assert_ne!(c2.addr, old_addr);
    for p in [&a, &b] {
        wait_for("the restarted peer's new address", LONG, || {
            let rows = status(p.addr)?;
            let row = rows.iter().find(|r| r.id == id)?;
            (row.addr == c2.addr.to_string() && row.state == "ONLINE").then_some(())
        });
    }
}

#[test]
fn ctrl_c_announces_leaving_and_others_drop_the_peer_before_expiry() {
    // A record lifetime of 5 minutes: the peer can only disappear from the live set this fast
    // because it announced LEAVING.
    let slow_expiry: &[(&str, &str)] = &[
        ("SWARM_GOSSIP_INTERVAL_MS", "200"),
        ("SWARM_RECORD_TTL_MS", "300000"),
        ("SWARM_REFRESH_INTERVAL_MS", "60000"),
    ];
    let a = PeerProc::start(None, slow_expiry, &[]);
    let b = PeerProc::start(Some(a.addr), slow_expiry, &[]);
    let mut c = PeerProc::start(Some(b.addr), slow_expiry, &[]);
    wait_converged(&[&a, &b, &c], &[&a, &b, &c]);

    c.interrupt();
    let exit = c.wait_exit(Duration::from_secs(30));
    assert!(exit.success(), "graceful leave exits 0, got {exit}");
    let last = wait_for("the leave summary", Duration::from_secs(5), || {
        c.lines.try_iter().last()
    });
    let v: serde_json::Value = serde_json::from_str(&last).unwrap();
    assert_eq!(v["left"], true);
    assert!(v["told"].as_u64().unwrap() >= 1, "{last}");

    for p in [&a, &b] {
        wait_for("the LEAVING record to spread", LONG, || {
            let rows = status(p.addr)?;
            let row = rows.iter().find(|r| r.id == c.id)?;
            (row.state == "LEAVING").then_some(())
        });
        let rows = status(p.addr).unwrap();
        assert_eq!(ids_in_state(&rows, "ONLINE").len(), 2);
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn client(identity: Identity) -> Node {
    Node::bind(
        identity,
        "127.0.0.1:0".parse().unwrap(),
        TransportConfig::default(),
        None,
        None,
    )
    .unwrap()
}

async fn connect(node: &Node, addr: SocketAddr, id: &str) -> PeerConn {
    let expected = PeerId::parse(id).unwrap();
    tokio::time::timeout(Duration::from_secs(10), node.connect(addr, Some(expected)))
        .await
        .expect("connect in time")
        .expect("connect")
}

async fn view_of(node: &Node, addr: SocketAddr, id: &str) -> StatusReply {
    let conn = connect(node, addr, id).await;
    rpc::call_timeout(&conn, &StatusRequest, Duration::from_secs(10))
        .await
        .expect("status answer")
}

fn info(addr: SocketAddr) -> RecordInfo {
    RecordInfo {
        addrs: vec![addr],
        stages: vec![0],
        throughput: 1.0,
        state: PeerState::Online,
        version: "test".into(),
        reach: swarm_nat::Reachability::Unknown,
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn wrong_keys_and_forged_records_are_refused() {
    let a = PeerProc::start(None, FAST, &[]);
    let run = RunId::parse(&a.run_id).unwrap();
    let rt = runtime();

    // Dialling A while expecting another id fails: A cannot prove a key it does not hold.
    let impostor_id = Identity::generate().peer_id();
    let out = run_swarm(
        &[
            "status",
            &a.addr.to_string(),
            "--peer-id",
            &impostor_id.to_string(),
        ],
        Duration::from_secs(20),
    );
    assert!(
        !out.status.success(),
        "status accepted a peer with the wrong key"
    );
    rt.block_on(async {
        let node = client(Identity::generate());
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            node.connect(a.addr, Some(impostor_id)),
        )
        .await
        .expect("bounded");
        assert!(r.is_err(), "connect succeeded with the wrong expected id");
    });

    let mallory = Identity::generate();
    let victim = Identity::generate();
    let m_addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
    rt.block_on(async {
        let node = client(mallory.clone());
        let conn = connect(&node, a.addr, &a.id).await;
        let now = now_ms();
        // 1. The victim's id with Mallory's key and signature.
        let mut claim_id = PeerRecord::sign(&mallory, run, now, now, 4_000, info(m_addr));
        claim_id.peer_id = victim.peer_id();
        claim_id.signature = mallory.sign(&claim_id.signing_bytes());
        // 2. The victim's key and id, signed by Mallory.
        let mut claim_key = PeerRecord::sign(&victim, run, now, now, 4_000, info(m_addr));
        claim_key.info.addrs = vec!["127.0.0.1:10".parse().unwrap()];
        claim_key.signature = mallory.sign(&claim_key.signing_bytes());
        // 3. Mallory's own record for another run; 4. one valid for an hour.
        let wrong_run = PeerRecord::sign(&mallory, RunId([0; 16]), now, now, 4_000, info(m_addr));
        let too_long = PeerRecord::sign(&mallory, run, now, now, 3_600_000, info(m_addr));
        // 5. Already expired.
        let expired = PeerRecord::sign(&mallory, run, now, now - 10_000, 1_000, info(m_addr));
        let push = GossipPush {
            records: vec![claim_id, claim_key, wrong_run, too_long, expired],
            digest: Some(Vec::new()),
        };
        let reply: GossipReply = rpc::call_timeout(&conn, &push, Duration::from_secs(10))
            .await
            .expect("a push with bad records is answered, not a crash");
        assert!(reply.records.iter().any(|r| r.peer_id.to_string() == a.id));
        let view = view_of(&node, a.addr, &a.id).await;
        let ids: Vec<PeerId> = view.entries.iter().map(|e| e.record.peer_id).collect();
        assert!(!ids.contains(&victim.peer_id()), "forged record accepted");
        assert!(!ids.contains(&mallory.peer_id()), "invalid record accepted");

        // Positive control: the same channel accepts Mallory's honest record.
        let honest = PeerRecord::sign(&mallory, run, now_ms(), now_ms(), 4_000, info(m_addr));
        let _: GossipReply = rpc::call_timeout(
            &conn,
            &GossipPush {
                records: vec![honest],
                digest: None,
            },
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        let view = view_of(&node, a.addr, &a.id).await;
        assert!(
            view.entries
                .iter()
                .any(|e| e.record.peer_id == mallory.peer_id())
        );

        // A replay of an older record of Mallory does not roll its entry back.
        let old = PeerRecord::sign(&mallory, run, now - 1, now - 1, 4_000, info(m_addr));
        let _: GossipReply = rpc::call_timeout(
            &conn,
            &GossipPush {
                records: vec![old],
                digest: None,
            },
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        let view = view_of(&node, a.addr, &a.id).await;
        let held = view
            .entries
            .iter()
            .find(|e| e.record.peer_id == mallory.peer_id())
            .unwrap();
        assert!(held.record.seq >= now);
    });
}

#[test]
fn malformed_and_oversized_messages_are_refused_and_the_peer_keeps_serving() {
    let a = PeerProc::start(None, FAST, &[]);
    let b = PeerProc::start(Some(a.addr), FAST, &[]);
    wait_converged(&[&a, &b], &[&a, &b]);
    let rt = runtime();
    rt.block_on(async {
        let node = client(Identity::generate());
        let mut count_records = wire::Writer::new();
        count_records.varint(4096);
        let mut oversized = wire::Header::encode(kind::GOSSIP, 64 << 20).to_vec();
        oversized.extend_from_slice(&[0; 1024]);
        let real_big = wire::envelope_raw(kind::GOSSIP, &vec![0x55; (4 << 20) + 1]);
        let mut bad_version = wire::envelope_raw(kind::STATUS, &[]);
        bad_version[4] = 99;
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("garbage", b"hello, is this the swarm?".to_vec()),
            ("empty", Vec::new()),
            ("bad version", bad_version),
            ("unknown kind", wire::envelope_raw(9_999, &[])),
            ("header claims 64 MiB", oversized),
            ("4 MiB + 1 body", real_big),
            ("truncated body", {
                let mut e = wire::envelope_raw(kind::GOSSIP, &[1, 2, 3, 4]);
                e.truncate(e.len() - 2);
                e
            }),
            (
                "4096 records, no bytes",
                wire::envelope_raw(kind::GOSSIP, count_records.as_slice()),
            ),
            (
                "record of random bytes",
                wire::envelope_raw(kind::GOSSIP, &[1; 300]),
            ),
            ("join with a body", wire::envelope_raw(kind::JOIN, &[0])),
            ("status with trailing bytes", {
                let mut e = wire::envelope_raw(kind::STATUS, &[]);
                e.push(0);
                e
            }),
        ];
        for (what, bytes) in cases {
            // A fresh connection per case: a malformed request closes the one it came on.
            let conn = connect(&node, a.addr, &a.id).await;
            let r = rpc::call_raw(&conn, &bytes, Duration::from_secs(15)).await;
            assert!(
                r.is_err(),
                "{what}: answered with kind {}",
                r.unwrap().0.kind
            );
        }
        // A kind nobody serves as a request is refused with an error reply, connection intact.
        let conn = connect(&node, a.addr, &a.id).await;
        let (h, _) = rpc::call_raw(
            &conn,
            &wire::envelope_raw(kind::STATUS_REPLY, &{
                let mut w = wire::Writer::new();
                w.array(&[0u8; 16]).varint(0);
                w.into_vec()
            }),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(h.kind, kind::ERROR);
        let view = view_of(&node, a.addr, &a.id).await;
        assert_eq!(view.entries.len(), 2);
    });
    // And through the CLI: A still answers and still sees B.
    let rows = status(a.addr).expect("A still answers status");
    assert_eq!(
        ids_in_state(&rows, "ONLINE"),
        sorted(vec![a.id.clone(), b.id.clone()])
    );
}
