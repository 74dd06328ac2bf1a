//! Real QUIC on loopback: mutual authentication, allow-lists, malformed and oversized requests,
//! refusals, dead-peer detection. Every wait is bounded by a timeout.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use swarm_net::rpc::{self, BasicService, Bulk, BulkAck, Ping, Pong, code};
use swarm_net::tls::AllowList;
use swarm_net::transport::{Node, PeerConn, TransportConfig};
use swarm_net::wire::{self, Header, kind};
use swarm_net::{Error, Identity};

const LIMIT: Duration = Duration::from_secs(20);
const LOOPBACK: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 0);

fn ident(n: u8) -> Identity {
    Identity::from_secret([n; 32])
}

fn node(n: u8, allow: Option<AllowList>) -> Node {
    Node::bind(ident(n), LOOPBACK, TransportConfig::default(), None, allow).unwrap()
}

fn server(n: u8, allow: Option<AllowList>) -> Node {
    let node = node(n, allow);
    tokio::spawn(rpc::serve(node.clone(), Arc::new(BasicService)));
    node
}

async fn bounded<T>(f: impl std::future::Future<Output = T>) -> T {
    swarm_testkit::within(LIMIT, f).await
}

async fn ping(conn: &PeerConn, nonce: u64) -> swarm_net::Result<u64> {
    let pong: Pong = rpc::call_timeout(conn, &Ping { nonce }, Duration::from_secs(10)).await?;
    Ok(pong.nonce)
}

#[tokio::test]
async fn both_sides_learn_the_proven_peer_id() {
    let b = node(2, None);
    let a = node(1, None);
    let addr = b.local_addr().unwrap();
    let accept = tokio::spawn({
        let b = b.clone();
        async move { b.accept().await.unwrap().handshake().await.unwrap() }
    });
    let conn = bounded(a.connect(addr, Some(ident(2).peer_id())))
        .await
        .unwrap();
    let server_side = bounded(accept).await.unwrap();
    assert_eq!(conn.remote_id(), ident(2).peer_id());
    assert_eq!(server_side.remote_id(), ident(1).peer_id());
}

#[tokio::test]
async fn ping_round_trips_and_bulk_arrives_intact() {
    let b = server(2, None);
    let a = node(1, None);
    let conn = bounded(a.connect(b.local_addr().unwrap(), None))
        .await
        .unwrap();
    assert_eq!(bounded(ping(&conn, 77)).await.unwrap(), 77);
    let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + 3) as u8).collect();
    let ack: BulkAck = bounded(rpc::call(
        &conn,
        &Bulk {
            payload: payload.clone(),
        },
    ))
    .await
    .unwrap();
    assert_eq!(ack.bytes, payload.len() as u64);
    assert_eq!(ack.hash, blake3::hash(&payload).as_bytes()[..8]);
}

#[tokio::test]
async fn a_peer_presenting_the_wrong_key_is_refused() {
    // We dial expecting peer 3, but the listener holds key 2.
    let b = server(2, None);
    let a = node(1, None);
    let err = bounded(a.connect(b.local_addr().unwrap(), Some(ident(3).peer_id())))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Connection(_) | Error::WrongPeer { .. }),
        "{err}"
    );
    // The listener is unharmed: the right expectation connects.
    let conn = bounded(a.connect(b.local_addr().unwrap(), Some(ident(2).peer_id())))
        .await
        .unwrap();
    assert_eq!(bounded(ping(&conn, 1)).await.unwrap(), 1);
}

#[tokio::test]
async fn allow_list_refuses_other_clients() {
    let b = server(2, Some(AllowList::new([ident(1).peer_id()])));
    let allowed = node(1, None);
    let stranger = node(9, None);
    let addr = b.local_addr().unwrap();
    // The stranger's handshake may complete on its side; the refusal shows on first use.
    let outcome = bounded(async {
        let conn = stranger.connect(addr, None).await?;
        ping(&conn, 5).await
    })
    .await;
    assert!(outcome.is_err(), "stranger was served: {outcome:?}");
    let conn = bounded(allowed.connect(addr, None)).await.unwrap();
    assert_eq!(bounded(ping(&conn, 6)).await.unwrap(), 6);
}

#[tokio::test]
async fn client_allow_list_refuses_servers_not_on_it() {
    let b = server(2, None);
    let a = node(1, Some(AllowList::new([ident(4).peer_id()])));
    let err = bounded(a.connect(b.local_addr().unwrap(), None))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Connection(_)), "{err}");
}

/// Sends `bytes` as a whole request on a fresh connection; returns the call's outcome and the
/// connection.
async fn send_raw(a: &Node, addr: SocketAddr, bytes: &[u8]) -> (swarm_net::Result<()>, PeerConn) {
    let conn = bounded(a.connect(addr, None)).await.unwrap();
    let r = rpc::call_raw(&conn, bytes, Duration::from_secs(10))
        .await
        .map(|_| ());
    (r, conn)
}

#[tokio::test]
async fn malformed_and_oversized_requests_close_only_that_connection() {
    let b = server(2, None);
    let addr = b.local_addr().unwrap();
    let a = node(1, None);
    // A bystander connection that must survive everything below.
    let bystander = bounded(a.connect(addr, None)).await.unwrap();
    assert_eq!(bounded(ping(&bystander, 0)).await.unwrap(), 0);

    let good = wire::encode_envelope(&Ping { nonce: 1 }).unwrap();
    let mut bad_magic = good.clone();
    bad_magic[0] = b'X';
    let mut bad_version = good.clone();
    bad_version[4] = 9;
    let mut trailing = good.clone();
    trailing.push(0);
    let mut oversized = Header::encode(kind::PING, 1 << 30).to_vec();
    oversized.extend_from_slice(&[0; 64]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("bad magic", bad_magic),
        ("bad version", bad_version),
        ("unknown kind", wire::envelope_raw(999, &[1, 2, 3])),
        ("oversized", oversized),
        ("short body", wire::envelope_raw(kind::PING, &[1, 2, 3])),
        ("trailing bytes", trailing),
        ("truncated header", good[..7].to_vec()),
        ("truncated body", good[..good.len() - 2].to_vec()),
        ("empty", Vec::new()),
    ];
    for (name, bytes) in cases {
        let (outcome, conn) = send_raw(&a, addr, &bytes).await;
        assert!(outcome.is_err(), "{name}: accepted");
        // The server closed that connection with the protocol error code.
        let reason = bounded(conn.closed()).await;
        assert!(
            matches!(&reason, quinn::ConnectionError::ApplicationClosed(c)
                if c.error_code == swarm_net::transport::CLOSE_PROTOCOL),
            "{name}: {reason}"
        );
        // The server keeps serving: the bystander and a fresh connection both work.
        assert_eq!(bounded(ping(&bystander, 2)).await.unwrap(), 2, "{name}");
        let fresh = bounded(a.connect(addr, None)).await.unwrap();
        assert_eq!(bounded(ping(&fresh, 3)).await.unwrap(), 3, "{name}");
    }
}

#[tokio::test]
async fn refusals_keep_the_connection() {
    let b = server(2, None);
    let a = node(1, None);
    let conn = bounded(a.connect(b.local_addr().unwrap(), None))
        .await
        .unwrap();
    // BasicService does not serve BULK_ACK as a request.
    let r: swarm_net::Result<Pong> = bounded(rpc::call(
        &conn,
        &BulkAck {
            bytes: 1,
            hash: [0; 8],
        },
    ))
    .await;
    match r {
        Err(Error::Remote(e)) => assert_eq!(e.code, code::UNSUPPORTED),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(bounded(ping(&conn, 8)).await.unwrap(), 8);
}

#[test]
fn a_dead_peer_is_noticed_within_seconds() {
    let idle = Duration::from_secs(2);
    let config = TransportConfig {
        idle_timeout: idle,
        keep_alive: Duration::from_millis(500),
        ..TransportConfig::default()
    };
    // The server lives in its own runtime; shutting that runtime down kills it without a
    // CONNECTION_CLOSE, like a machine losing power.
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let addr = server_rt.block_on(async {
        let b = Node::bind(ident(2), LOOPBACK, config.clone(), None, None).unwrap();
        tokio::spawn(rpc::serve(b.clone(), Arc::new(BasicService)));
        b.local_addr().unwrap()
    });
    let client_rt = tokio::runtime::Runtime::new().unwrap();
    client_rt.block_on(async {
        let a = Node::bind(ident(1), LOOPBACK, config, None, None).unwrap();
        let conn = bounded(a.connect(addr, None)).await.unwrap();
        assert_eq!(bounded(ping(&conn, 4)).await.unwrap(), 4);
        server_rt.shutdown_background();
        let reason = tokio::time::timeout(idle * 5, conn.closed())
            .await
            .expect("dead peer not noticed");
        assert!(
            matches!(reason, quinn::ConnectionError::TimedOut),
            "{reason}"
        );
    });
}

#[test]
fn binding_outside_a_runtime_is_an_error_not_a_panic() {
    let r = Node::bind(ident(1), LOOPBACK, TransportConfig::default(), None, None);
    assert!(matches!(r, Err(Error::Socket(_))), "{r:?}");
}
