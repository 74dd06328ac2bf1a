//! Peers behind real NAT routers (network namespaces + nftables, `swarm-netlab`): the
//! reachability verdict each gets at join, connections between home networks made by a hole
//! punch the bootstrap coordinates, and a symmetric NAT reached through the bootstrap's relay.
//! Every wait is bounded.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use swarm_core::Identity;
use swarm_core::membership::{MembershipConfig, StatusReply, StatusRequest};
use swarm_core::peer::{Peer, PeerConfig};
use swarm_core::rpc::{Bulk, BulkAck};
use swarm_nat::{PathKind, Reachability, RelayConfig, UpgradeConfig};
use swarm_netlab::{Host, Nat, lab_or_skip};

const PORT: u16 = 7000;

fn start(host: &Host, rt: &tokio::runtime::Runtime, cfg: PeerConfig) -> Peer {
    host.enter(|| rt.block_on(Peer::start(Identity::generate(), cfg)))
        .expect("entering the namespace")
        .expect("peer start")
}

/// The runtime the lab's in-process peers run on.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Every peer leaves (bounded), so none outlives its test's lab.
fn leave_all<const N: usize>(rt: &tokio::runtime::Runtime, peers: [Peer; N]) {
    for p in peers {
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), p.leave())
                .await
                .ok()
        });
    }
}

fn config(listen: SocketAddr, bootstrap: Option<SocketAddr>) -> PeerConfig {
    PeerConfig {
        listen,
        bootstrap,
        membership: MembershipConfig {
            gossip_interval_ms: 300,
            ..MembershipConfig::default()
        },
        rpc_timeout: Duration::from_secs(10),
        ..PeerConfig::default()
    }
}

#[test]
fn joiners_get_verdicts_and_home_peers_punch_through_their_routers() {
    let mut lab = lab_or_skip!("peers");
    let boot_host = lab.public_host("boot").unwrap();
    let open_host = lab.public_host("open").unwrap();
    let mut r1 = lab.router("r1", Nat::Home).unwrap();
    let mut r2 = lab.router("r2", Nat::Home).unwrap();
    let mut r3 = lab.router("r3", Nat::Symmetric).unwrap();
    let a = lab.home_host(&mut r1, "a").unwrap();
    let b = lab.home_host(&mut r2, "b").unwrap();
    let c = lab.home_host(&mut r3, "c").unwrap();
    let rt = runtime();

    let boot_addr = SocketAddr::from((boot_host.ip(), PORT));
    let mut boot_cfg = config(boot_addr, None);
    boot_cfg.checker = Some(SocketAddr::from((boot_host.ip(), 0)));
    let boot = start(&boot_host, &rt, boot_cfg);
    let any: SocketAddr = "0.0.0.0:7100".parse().unwrap();
    let t0 = Instant::now();
    let pa = start(&a, &rt, config(any, Some(boot_addr)));
    let join_time = t0.elapsed();
    let pb = start(&b, &rt, config(any, Some(boot_addr)));
    let pc = start(&c, &rt, config(any, Some(boot_addr)));
    let po = start(&open_host, &rt, config(any, Some(boot_addr)));
    assert!(
        join_time < Duration::from_secs(10),
        "join took {join_time:?}"
    );

    let verdict = |p: &Peer| p.verdict().map(|v| v.reachability);
    assert_eq!(verdict(&pa), Some(Reachability::Punchable));
    assert_eq!(verdict(&pb), Some(Reachability::Punchable));
    assert_eq!(verdict(&pc), Some(Reachability::Symmetric));
    assert_eq!(verdict(&po), Some(Reachability::Public));
    // The verdict travels in the signed record.
    assert_eq!(
        pa.local_record().info.reach,
        Reachability::Punchable,
        "record carries the verdict"
    );
    // Home peers announce the mapping the bootstrap saw first.
    let a_addr = pa.local_record().info.addrs[0];
    assert_eq!(a_addr.ip(), r1.wan_ip());
    let b_addr = pb.local_record().info.addrs[0];
    assert_eq!(b_addr.ip(), r2.wan_ip());

    rt.block_on(async {
        // A cannot dial B (B's router drops it), so the bootstrap coordinates a punch.
        let (id, reply): (_, StatusReply) = tokio::time::timeout(
            Duration::from_secs(30),
            pa.shared().call(b_addr, Some(pb.peer_id()), &StatusRequest),
        )
        .await
        .expect("bounded")
        .expect("A reached B");
        assert_eq!(id, pb.peer_id());
        assert!(!reply.entries.is_empty());
        assert_eq!(pa.path(pb.peer_id()), Some(PathKind::Punched));
        // B answers over the same connection: it sees A as punched too.
        assert_eq!(pb.path(pa.peer_id()), Some(PathKind::Punched));

        // A public peer is dialed directly.
        let o_addr = po.local_record().info.addrs[0];
        let _: (_, StatusReply) = pa
            .shared()
            .call(o_addr, Some(po.peer_id()), &StatusRequest)
            .await
            .expect("A reached the open peer");
        assert_eq!(pa.path(po.peer_id()), Some(PathKind::Direct));

        // The symmetric peer cannot be punched and this bootstrap relays nothing: a clear error
        // in bounded time. A must know C's
        // record (its verdict says it is behind a NAT) before it dials: gossip brings it within
        // seconds, and without it C is dialed as a public peer would be.
        let known = Instant::now();
        while !pa
            .status()
            .entries
            .iter()
            .any(|e| e.record.peer_id == pc.peer_id())
        {
            assert!(
                known.elapsed() < Duration::from_secs(20),
                "A never heard of C"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let c_addr = pc.local_record().info.addrs[0];
        let t = Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(30),
            pa.shared().call::<StatusRequest, StatusReply>(
                c_addr,
                Some(pc.peer_id()),
                &StatusRequest,
            ),
        )
        .await
        .expect("bounded");
        let err = r.expect_err("a symmetric NAT was punched");
        assert!(err.to_string().contains("punch"), "{err}");
        assert!(err.to_string().contains("no relay"), "{err}");
        assert!(t.elapsed() < Duration::from_secs(25));
    });
    leave_all(&rt, [pa, pb, pc, po, boot]);
}

/// Waits (bounded) until `p` holds the record of `id`.
async fn wait_known(p: &Peer, id: swarm_core::PeerId) {
    let t = Instant::now();
    while !p.status().entries.iter().any(|e| e.record.peer_id == id) {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the record never came"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn a_symmetric_peer_is_reached_through_the_relay_and_its_bytes_are_counted() {
    let mut lab = lab_or_skip!("relay");
    let boot_host = lab.public_host("boot").unwrap();
    let mut r1 = lab.router("r1", Nat::Home).unwrap();
    let mut r2 = lab.router("r2", Nat::Home).unwrap();
    let mut r3 = lab.router("r3", Nat::Symmetric).unwrap();
    let a = lab.home_host(&mut r1, "a").unwrap();
    let b = lab.home_host(&mut r2, "b").unwrap();
    let c = lab.home_host(&mut r3, "c").unwrap();
    // UDP only to the bootstrap's address: the "blocked" scenario.
    let mut r4 = lab
        .router(
            "r4",
            Nat::UdpBlocked {
                allow: boot_host.ip(),
            },
        )
        .unwrap();
    let d = lab.home_host(&mut r4, "d").unwrap();
    let rt = runtime();
    let boot_addr = SocketAddr::from((boot_host.ip(), PORT));
    let mut boot_cfg = config(boot_addr, None);
    // The checker on a second IP (as a STUN server has): D's firewall passes UDP only to the
    // first, so D's check finds it blocked.
    let checker_ip = lab.add_public_ip(&boot_host).unwrap();
    boot_cfg.checker = Some(SocketAddr::from((checker_ip, 0)));
    boot_cfg.relay = Some(RelayConfig::default());
    let boot = start(&boot_host, &rt, boot_cfg);
    let any: SocketAddr = "0.0.0.0:7100".parse().unwrap();
    let pa = start(&a, &rt, config(any, Some(boot_addr)));
    let pb = start(&b, &rt, config(any, Some(boot_addr)));
    let pc = start(&c, &rt, config(any, Some(boot_addr)));
    let pd = start(&d, &rt, config(any, Some(boot_addr)));
    assert_eq!(
        pc.verdict().map(|v| v.reachability),
        Some(Reachability::Symmetric)
    );

    rt.block_on(async {
        wait_known(&pa, pc.peer_id()).await;
        wait_known(&pc, pb.peer_id()).await;
        // A -> C: C's NAT cannot be punched, so the bootstrap relays; TLS runs end to end (the
        // call expects C's id and gets it).
        let c_addr = pc.local_record().info.addrs[0];
        let (id, _): (_, StatusReply) = tokio::time::timeout(
            Duration::from_secs(30),
            pa.shared().call(c_addr, Some(pc.peer_id()), &StatusRequest),
        )
        .await
        .expect("bounded")
        .expect("A reached C through the relay");
        assert_eq!(id, pc.peer_id());
        assert_eq!(pa.path(pc.peer_id()), Some(PathKind::Relayed));
        assert_eq!(pc.path(pa.peer_id()), Some(PathKind::Relayed));

        // Bulk data both ways over the relayed connection arrives intact.
        let payload: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (_, ack): (_, BulkAck) = pa
            .shared()
            .call(
                c_addr,
                Some(pc.peer_id()),
                &Bulk {
                    payload: payload.clone(),
                },
            )
            .await
            .expect("bulk A -> C");
        assert_eq!(ack.bytes, payload.len() as u64);
        assert_eq!(ack.hash, blake3::hash(&payload).as_bytes()[..8]);

        // C -> B: C asks (it is the symmetric side), the relay carries it too.
        let b_addr = pb.local_record().info.addrs[0];
        let (id, _): (_, StatusReply) = tokio::time::timeout(
            Duration::from_secs(30),
            pc.shared().call(b_addr, Some(pb.peer_id()), &StatusRequest),
        )
        .await
        .expect("bounded")
        .expect("C reached B through the relay");
        assert_eq!(id, pb.peer_id());
        assert_eq!(pc.path(pb.peer_id()), Some(PathKind::Relayed));

        // The relay counted the bytes per peer, and its status reports them.
        let relay = boot.shared().relay().expect("the bootstrap relays");
        let (ua, uc) = (relay.usage(&pa.peer_id()), relay.usage(&pc.peer_id()));
        assert!(ua.sent >= payload.len() as u64, "{ua:?}");
        assert!(uc.received >= payload.len() as u64, "{uc:?}");
        let status = boot.status();
        let bytes_of = |id| {
            status
                .entries
                .iter()
                .find(|e| e.record.peer_id == id)
                .map(|e| e.relay_bytes)
        };
        assert!(bytes_of(pc.peer_id()).unwrap() >= 2 * payload.len() as u64 / 2);
        // The endpoints count their tunnels too.
        let a_view = pa.status();
        let c_entry = a_view
            .entries
            .iter()
            .find(|e| e.record.peer_id == pc.peer_id())
            .unwrap();
        assert_eq!(c_entry.path, Some(PathKind::Relayed));
        assert!(c_entry.relay_bytes >= payload.len() as u64);

        // Blocked: D's UDP reaches only the bootstrap's first address, so the checker on the
        // second never hears from it: blocked. A goes to the relay at once (no punch to fail
        // first): reachable, never a hang.
        assert_eq!(
            pd.verdict().map(|v| v.reachability),
            Some(Reachability::Blocked)
        );
        wait_known(&pa, pd.peer_id()).await;
        let d_addr = pd.local_record().info.addrs[0];
        let t = Instant::now();
        let (id, _): (_, StatusReply) = tokio::time::timeout(
            Duration::from_secs(40),
            pa.shared().call(d_addr, Some(pd.peer_id()), &StatusRequest),
        )
        .await
        .expect("bounded")
        .expect("A reached the blocked peer through the relay");
        eprintln!(
            "blocked peer: verdict {:?}, reached in {:?}",
            pd.verdict().map(|v| v.reachability),
            t.elapsed()
        );
        assert_eq!(id, pd.peer_id());
        assert_eq!(pa.path(pd.peer_id()), Some(PathKind::Relayed));
    });
    leave_all(&rt, [pa, pb, pc, pd, boot]);
}

#[test]
fn a_relayed_path_moves_to_a_punched_one_when_the_nat_becomes_punchable() {
    let mut lab = lab_or_skip!("upgrade");
    let boot_host = lab.public_host("boot").unwrap();
    let mut r1 = lab.router("r1", Nat::Home).unwrap();
    let mut r3 = lab.router("r3", Nat::Symmetric).unwrap();
    let a = lab.home_host(&mut r1, "a").unwrap();
    let c = lab.home_host(&mut r3, "c").unwrap();
    let rt = runtime();
    let boot_addr = SocketAddr::from((boot_host.ip(), PORT));
    let mut boot_cfg = config(boot_addr, None);
    boot_cfg.checker = Some(SocketAddr::from((boot_host.ip(), 0)));
    boot_cfg.relay = Some(RelayConfig::default());
    let boot = start(&boot_host, &rt, boot_cfg);
    // Short re-check and retry periods, so the test sees in seconds what takes minutes in a run.
    let fast = |cfg: PeerConfig| PeerConfig {
        recheck: Some(Duration::from_secs(2)),
        upgrade: UpgradeConfig {
            first: Duration::from_secs(1),
            max: Duration::from_secs(4),
        },
        ..cfg
    };
    let any: SocketAddr = "0.0.0.0:7100".parse().unwrap();
    let pa = start(&a, &rt, fast(config(any, Some(boot_addr))));
    let pc = start(&c, &rt, fast(config(any, Some(boot_addr))));
    assert_eq!(
        pc.verdict().map(|v| v.reachability),
        Some(Reachability::Symmetric)
    );
    let relay = boot.shared().relay().expect("the bootstrap relays");
    rt.block_on(async {
        wait_known(&pa, pc.peer_id()).await;
        let c_addr = pc.local_record().info.addrs[0];
        let call = |what: &'static str| {
            let pa = &pa;
            let id = pc.peer_id();
            async move {
                tokio::time::timeout(
                    Duration::from_secs(40),
                    pa.shared().call(c_addr, Some(id), &StatusRequest),
                )
                .await
                .expect("bounded")
                .map(|(_, r): (_, StatusReply)| r)
                .map_err(|e| format!("{what}: {e}"))
            }
        };
        call("A -> C relayed").await.unwrap();
        assert_eq!(pa.path(pc.peer_id()), Some(PathKind::Relayed));
        // Its retries find nothing to do while C's NAT is symmetric: still relayed.
        tokio::time::sleep(Duration::from_secs(3)).await;
        call("still relayed").await.unwrap();
        assert_eq!(pa.path(pc.peer_id()), Some(PathKind::Relayed));

        // C's owner replaces the symmetric NAT with a home router. C's next re-check finds it
        // punchable; its record says so; A tries a punch and the direct path takes over, while
        // A keeps calling C as a run would.
        r3.set_nat(Nat::Home).unwrap();
        let t = Instant::now();
        let mut last = None;
        for _ in 0..120 {
            // A call may fail while the NAT changes under the relayed connection; it redials.
            let _ = call("during the change").await;
            last = Some((
                pc.verdict().map(|v| v.reachability),
                pa.path(pc.peer_id()),
                pc.path(pa.peer_id()),
            ));
            if last
                == Some((
                    Some(Reachability::Punchable),
                    Some(PathKind::Punched),
                    Some(PathKind::Punched),
                ))
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        eprintln!("relayed -> punched after {:?}: {last:?}", t.elapsed());
        assert_eq!(
            last,
            Some((
                Some(Reachability::Punchable),
                Some(PathKind::Punched),
                Some(PathKind::Punched),
            )),
            "(C's verdict, A's path to C, C's path to A)"
        );
        // From now on C's bytes no longer pass through the relay.
        let before = relay.usage(&pc.peer_id());
        let payload: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (_, ack): (_, BulkAck) = pa
            .shared()
            .call(c_addr, Some(pc.peer_id()), &Bulk { payload })
            .await
            .expect("bulk A -> C");
        assert_eq!(ack.bytes, 200_000);
        let after = relay.usage(&pc.peer_id());
        assert!(
            after.received - before.received < 10_000,
            "the relay still carried C's traffic: {before:?} -> {after:?}"
        );
        assert_eq!(pa.path(pc.peer_id()), Some(PathKind::Punched));
    });
    leave_all(&rt, [pa, pc, boot]);
}

#[test]
fn dual_stack_peers_are_reached_over_either_family() {
    let mut lab = lab_or_skip!("dual");
    let boot_host = lab.public_host("boot").unwrap();
    let four = lab.public_host("four").unwrap();
    let six = lab.public_host("six").unwrap();
    let both = lab.public_host("both").unwrap();
    let boot6 = lab.dual_stack(&boot_host).unwrap();
    let six6 = lab.dual_stack(&six).unwrap();
    lab.dual_stack(&both).unwrap();
    let rt = runtime();
    // The bootstrap listens dual-stack: IPv4 joiners reach it at its IPv4 address, IPv6 ones at
    // its IPv6 address, and each is observed in its own family.
    let any6: SocketAddr = "[::]:7000".parse().unwrap();
    let mut boot_cfg = config(any6, None);
    boot_cfg.checker = Some("[::]:0".parse().unwrap());
    boot_cfg.relay = Some(RelayConfig::default());
    let boot = start(&boot_host, &rt, boot_cfg);
    let boot_v4 = SocketAddr::from((boot_host.ip(), 7000));
    let boot_v6 = SocketAddr::from((boot6, 7000));
    // An IPv4-only peer, an IPv6-only peer, and a dual-stack one that joins over IPv4.
    let p4 = start(
        &four,
        &rt,
        config("0.0.0.0:7100".parse().unwrap(), Some(boot_v4)),
    );
    let p6 = start(
        &six,
        &rt,
        config(SocketAddr::from((six6, 7100)), Some(boot_v6)),
    );
    let pd = start(
        &both,
        &rt,
        config("[::]:7100".parse().unwrap(), Some(boot_v4)),
    );
    for p in [&p4, &p6, &pd] {
        assert_eq!(
            p.verdict().map(|v| v.reachability),
            Some(Reachability::Public)
        );
    }
    // The IPv4 joiner was observed as plain IPv4 (not `::ffff:a.b.c.d`) by the dual-stack
    // bootstrap, and the dual-stack peer announces candidates of both families.
    assert_eq!(
        p4.local_record().info.addrs[0],
        SocketAddr::from((four.ip(), 7100))
    );
    let d_addrs = pd.local_record().info.addrs;
    assert!(d_addrs.iter().any(|a| a.is_ipv4()), "{d_addrs:?}");
    assert!(
        d_addrs.iter().any(|a| a.is_ipv6() && !a.ip().is_loopback()),
        "{d_addrs:?}"
    );
    rt.block_on(async {
        wait_known(&p4, pd.peer_id()).await;
        wait_known(&p6, pd.peer_id()).await;
        // Each single-stack peer reaches the dual-stack one at the candidate of its own family,
        // though both are given the record's first address (IPv4).
        for (p, family) in [(&p4, "IPv4"), (&p6, "IPv6")] {
            let (id, _): (_, StatusReply) = tokio::time::timeout(
                Duration::from_secs(30),
                p.shared()
                    .call(d_addrs[0], Some(pd.peer_id()), &StatusRequest),
            )
            .await
            .expect("bounded")
            .unwrap_or_else(|e| panic!("the {family} peer did not reach the dual-stack one: {e}"));
            assert_eq!(id, pd.peer_id());
            assert_eq!(p.path(pd.peer_id()), Some(PathKind::Direct));
        }
        // The IPv6 peer's view holds the IPv4 peer too: records travel across families. The two
        // share no family, so the dual-stack bootstrap relays between them.
        wait_known(&p6, p4.peer_id()).await;
        let a4 = p4.local_record().info.addrs[0];
        let (id, _): (_, StatusReply) = tokio::time::timeout(
            Duration::from_secs(30),
            p6.shared().call(a4, Some(p4.peer_id()), &StatusRequest),
        )
        .await
        .expect("bounded")
        .expect("the IPv6 peer reached the IPv4 one through the relay");
        assert_eq!(id, p4.peer_id());
        assert_eq!(p6.path(p4.peer_id()), Some(PathKind::Relayed));
        assert_eq!(p4.path(p6.peer_id()), Some(PathKind::Relayed));
    });
    leave_all(&rt, [p4, p6, pd, boot]);
}
