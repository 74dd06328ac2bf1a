use super::*;
use crate::rpc::{Ping, Pong};
use std::time::Instant;

fn fast(bootstrap: Option<SocketAddr>, seed: u64) -> PeerConfig {
    PeerConfig {
        bootstrap,
        membership: MembershipConfig::with_ttl(3_000),
        rpc_timeout: Duration::from_secs(5),
        seed: Some(seed),
        ..PeerConfig::default()
    }
}

async fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn live_ids(p: &Peer) -> Vec<PeerId> {
    let mut v: Vec<PeerId> = p
        .shared()
        .with_membership(|m| m.live().map(|e| e.record.peer_id).collect());
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_converge_leave_and_serve_extra_kinds() {
    let a = Peer::start(Identity::from_secret([1; 32]), fast(None, 1))
        .await
        .unwrap();
    let b = Peer::start(
        Identity::from_secret([2; 32]),
        fast(Some(a.local_addr()), 2),
    )
    .await
    .unwrap();
    // C joins through B, not A.
    let c = Peer::start(
        Identity::from_secret([3; 32]),
        fast(Some(b.local_addr()), 3),
    )
    .await
    .unwrap();
    assert_eq!(a.run_id(), b.run_id());
    assert_eq!(a.run_id(), c.run_id());
    let peers = [&a, &b, &c];
    wait_until("everyone sees everyone", Duration::from_secs(20), || {
        peers.iter().all(|p| live_ids(p).len() == 2)
    })
    .await;

    // A later module's handler, reached through the same dispatcher; PING stays built in.
    a.register(
        kind::PING,
        |_p: Arc<PeerShared>, _ctx: RequestCtx, body: Vec<u8>| async move {
            let ping: Ping = wire::decode_body(&body)?;
            rpc::reply(&Pong {
                nonce: ping.nonce + 1,
            })
        },
    );
    let (_, pong): (PeerId, Pong) = b
        .shared()
        .call(a.local_addr(), Some(a.peer_id()), &Ping { nonce: 41 })
        .await
        .unwrap();
    assert_eq!(pong.nonce, 42);
    let (_, pong): (PeerId, Pong) = a
        .shared()
        .call(b.local_addr(), Some(b.peer_id()), &Ping { nonce: 7 })
        .await
        .unwrap();
    assert_eq!(pong.nonce, 7);

    // An update of the local record spreads.
    c.update_local(|i| {
        i.stages = vec![3];
        i.throughput = 99.0;
    });
    let c_id = c.peer_id();
    wait_until("C's new stages reach A", Duration::from_secs(20), || {
        a.shared().with_membership(|m| {
            m.get(&c_id)
                .is_some_and(|e| e.record.info.stages == vec![3])
        })
    })
    .await;

    // C leaves: A and B drop it from the live set long before its record would expire.
    let told = c.leave().await;
    assert!(told >= 1);
    wait_until("C's departure spreads", Duration::from_secs(20), || {
        [&a, &b].iter().all(|p| !live_ids(p).contains(&c_id))
    })
    .await;
    // The LEAVING record is held as a tombstone (refusing older ONLINE records of C).
    assert!([&a, &b].iter().any(|p| p.shared().with_membership(|m| {
        m.get(&c_id)
            .is_some_and(|e| e.record.info.state == PeerState::Leaving)
    })));
    a.leave().await;
    b.leave().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_with_the_wrong_run_is_refused() {
    let a = Peer::start(Identity::from_secret([4; 32]), fast(None, 4))
        .await
        .unwrap();
    let mut cfg = fast(Some(a.local_addr()), 5);
    cfg.run_id = Some(RunId([9; 16]));
    let err = Peer::start(Identity::from_secret([5; 32]), cfg)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::WrongRun { .. }), "{err}");
    a.leave().await;
}
