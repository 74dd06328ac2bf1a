//! Peers behind real NAT routers (network namespaces + nftables, `swarm-netlab`): the
//! reachability verdict each gets at join, and connections between home networks made by a hole
//! punch the bootstrap coordinates. Every wait is bounded.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use swarm_core::Identity;
use swarm_core::membership::{MembershipConfig, StatusReply, StatusRequest};
use swarm_core::peer::{Peer, PeerConfig};
use swarm_nat::{PathKind, Reachability};
use swarm_netlab::{Host, Nat, lab_or_skip};

const PORT: u16 = 7000;

fn start(host: &Host, rt: &tokio::runtime::Runtime, cfg: PeerConfig) -> Peer {
    host.enter(|| rt.block_on(Peer::start(Identity::generate(), cfg)))
        .expect("entering the namespace")
        .expect("peer start")
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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

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

        // The symmetric peer cannot be punched: a clear error in bounded time. A must know C's
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
        assert!(t.elapsed() < Duration::from_secs(25));
    });
    for p in [pa, pb, pc, po, boot] {
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), p.leave())
                .await
                .ok()
        });
    }
}
