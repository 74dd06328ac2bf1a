//! The lab's routers behave like the NATs they model, checked with raw UDP between namespaces:
//! endpoint-independent vs symmetric mapping, unsolicited inbound dropped unless punched, UDP
//! blocked but to one address, and teardown even when a test panics.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use swarm_netlab::{Lab, Nat, lab_namespaces, lab_or_skip};

const PORT: u16 = 3478;
/// Long enough for a packet between namespaces on a loaded machine; a packet that must not come
/// is waited for this long.
const WAIT: Duration = Duration::from_millis(700);

fn recv(sock: &UdpSocket) -> Option<(Vec<u8>, SocketAddr)> {
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 1500];
    match sock.recv_from(&mut buf) {
        Ok((n, from)) => Some((buf[..n].to_vec(), from)),
        Err(_) => None,
    }
}

/// Sends `msg` to `to` and returns the source address the receiver saw (the mapping).
fn observed(from: &UdpSocket, server: &UdpSocket, to: SocketAddr, msg: &[u8]) -> SocketAddr {
    from.send_to(msg, to).unwrap();
    let (got, src) = recv(server).expect("the server got the probe");
    assert_eq!(got, msg);
    src
}

#[test]
fn home_router_maps_endpoint_independently_and_drops_unsolicited_inbound() {
    let mut lab = lab_or_skip!("home");
    let s1 = lab.public_host("s1").unwrap();
    let s2 = lab.public_host("s2").unwrap();
    let mut home = lab.router("r1", Nat::Home).unwrap();
    let a = lab.home_host(&mut home, "a").unwrap();

    let srv1 = s1.udp_bind(PORT).unwrap();
    let srv2 = s2.udp_bind(PORT).unwrap();
    let sock = a.udp_bind(40000).unwrap();
    let m1 = observed(&sock, &srv1, (s1.ip(), PORT).into(), b"to s1");
    let m2 = observed(&sock, &srv2, (s2.ip(), PORT).into(), b"to s2");
    assert_eq!(m1.ip(), home.wan_ip(), "the router translates the source");
    assert_ne!(m1.ip(), a.ip());
    assert_eq!(
        m1, m2,
        "endpoint-independent: one mapping for both destinations"
    );

    // Replies from where A sent to pass.
    srv1.send_to(b"reply", m1).unwrap();
    assert_eq!(recv(&sock).unwrap().0, b"reply");
    // The same server from another port is unsolicited: dropped (port-dependent filtering).
    let other = s1.udp_bind(0).unwrap();
    other.send_to(b"unsolicited", m1).unwrap();
    assert!(recv(&sock).is_none(), "inbound from a new port was let in");
    // A third host that A never contacted: dropped, until A sends to it (a punched hole).
    let s3 = lab.public_host("s3").unwrap();
    let srv3 = s3.udp_bind(PORT).unwrap();
    srv3.send_to(b"early", m1).unwrap();
    assert!(recv(&sock).is_none(), "unsolicited inbound was let in");
    sock.send_to(b"punch", (s3.ip(), PORT)).unwrap();
    let (_, m3) = recv(&srv3).expect("s3 got the punch");
    assert_eq!(m3, m1, "the punch leaves from the same mapping");
    srv3.send_to(b"through", m1).unwrap();
    assert_eq!(recv(&sock).unwrap().0, b"through");
}

#[test]
fn symmetric_router_maps_each_destination_to_its_own_port() {
    let mut lab = lab_or_skip!("sym");
    let s1 = lab.public_host("s1").unwrap();
    let s2 = lab.public_host("s2").unwrap();
    let mut sym = lab.router("r1", Nat::Symmetric).unwrap();
    let a = lab.home_host(&mut sym, "a").unwrap();
    let srv1 = s1.udp_bind(PORT).unwrap();
    let srv2 = s2.udp_bind(PORT).unwrap();
    let sock = a.udp_bind(40000).unwrap();
    let m1 = observed(&sock, &srv1, (s1.ip(), PORT).into(), b"to s1");
    let m2 = observed(&sock, &srv2, (s2.ip(), PORT).into(), b"to s2");
    assert_eq!(m1.ip(), sym.wan_ip());
    assert_eq!(m2.ip(), sym.wan_ip());
    assert_ne!(
        m1.port(),
        m2.port(),
        "endpoint-dependent: a port per destination"
    );
    // S2 aiming at the mapping S1 saw reaches nobody.
    srv2.send_to(b"guess", m1).unwrap();
    assert!(recv(&sock).is_none());
    // Replies on each flow's own mapping pass.
    srv2.send_to(b"reply", m2).unwrap();
    assert_eq!(recv(&sock).unwrap().0, b"reply");
}

/// Two hosts behind two routers learn their mappings from a rendezvous server, then send to each
/// other: the first packet opens the sender's router, the answer comes through it.
fn punch(lab: &mut Lab, nat_a: Nat, nat_b: Nat) -> bool {
    let s = lab.public_host("rdv").unwrap();
    let mut ra = lab.router("ra", nat_a).unwrap();
    let mut rb = lab.router("rb", nat_b).unwrap();
    let a = lab.home_host(&mut ra, "a").unwrap();
    let b = lab.home_host(&mut rb, "b").unwrap();
    let srv = s.udp_bind(PORT).unwrap();
    let sa = a.udp_bind(40000).unwrap();
    let sb = b.udp_bind(40000).unwrap();
    let ma = observed(&sa, &srv, (s.ip(), PORT).into(), b"a");
    let mb = observed(&sb, &srv, (s.ip(), PORT).into(), b"b");
    // A's first packet is dropped by B's router but opens A's; B's answer passes A's router and
    // opens B's; A's next packet passes.
    sa.send_to(b"a1", mb).unwrap();
    assert!(
        recv(&sb).is_none(),
        "B's router let an unsolicited packet in"
    );
    sb.send_to(b"b1", ma).unwrap();
    let b_to_a = recv(&sa).is_some_and(|(m, _)| m == b"b1");
    sa.send_to(b"a2", mb).unwrap();
    let a_to_b = recv(&sb).is_some_and(|(m, _)| m == b"a2");
    b_to_a && a_to_b
}

#[test]
fn two_home_routers_can_be_punched_through() {
    let mut lab = lab_or_skip!("punch");
    assert!(punch(&mut lab, Nat::Home, Nat::Home));
}

#[test]
fn a_symmetric_router_defeats_punching() {
    let mut lab = lab_or_skip!("nopunch");
    assert!(!punch(&mut lab, Nat::Symmetric, Nat::Home));
}

#[test]
fn blocked_router_lets_udp_out_only_to_the_allowed_address() {
    let mut lab = lab_or_skip!("blocked");
    let t = lab.public_host("trainer").unwrap();
    let s = lab.public_host("other").unwrap();
    let mut r = lab.router("r1", Nat::UdpBlocked { allow: t.ip() }).unwrap();
    let a = lab.home_host(&mut r, "a").unwrap();
    let st = t.udp_bind(PORT).unwrap();
    let ss = s.udp_bind(PORT).unwrap();
    let sock = a.udp_bind(0).unwrap();
    let m = observed(&sock, &st, (t.ip(), PORT).into(), b"allowed");
    st.send_to(b"reply", m).unwrap();
    assert_eq!(recv(&sock).unwrap().0, b"reply");
    sock.send_to(b"blocked", (s.ip(), PORT)).unwrap();
    assert!(recv(&ss).is_none(), "UDP left the blocked network");
}

#[test]
fn flushing_a_router_forgets_its_mappings() {
    let mut lab = lab_or_skip!("flush");
    let s = lab.public_host("s").unwrap();
    let mut r = lab.router("r1", Nat::Home).unwrap();
    let a = lab.home_host(&mut r, "a").unwrap();
    let srv = s.udp_bind(PORT).unwrap();
    let sock = a.udp_bind(40000).unwrap();
    let m = observed(&sock, &srv, (s.ip(), PORT).into(), b"hello");
    srv.send_to(b"before", m).unwrap();
    assert_eq!(recv(&sock).unwrap().0, b"before");
    r.flush_mappings().unwrap();
    srv.send_to(b"after", m).unwrap();
    assert!(recv(&sock).is_none(), "the flushed router still forwarded");
    // The inside host sending again restores a mapping.
    let m2 = observed(&sock, &srv, (s.ip(), PORT).into(), b"again");
    srv.send_to(b"restored", m2).unwrap();
    assert_eq!(recv(&sock).unwrap().0, b"restored");
}

#[test]
fn processes_run_inside_the_namespace_and_die_with_the_lab() {
    let mut lab = lab_or_skip!("proc");
    let mut r = lab.router("r1", Nat::Home).unwrap();
    let a = lab.home_host(&mut r, "a").unwrap();
    let out = a
        .command("ip")
        .args(["-4", "-o", "addr", "show", "dev", "eth0"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&a.ip().to_string()), "{text}");
    // A process left running inside is killed when the lab goes.
    let mut child = a.command("sleep").arg("60").spawn().unwrap();
    let names: Vec<String> = lab.namespaces().to_vec();
    drop(lab);
    let status = child.wait().unwrap();
    assert!(!status.success(), "the sleeper outlived the lab");
    let left: Vec<String> = lab_namespaces().into_iter().map(|(n, _)| n).collect();
    for n in names {
        assert!(!left.contains(&n), "{n} survived the lab");
    }
}

#[test]
fn a_panicking_test_still_tears_its_lab_down() {
    let names = std::panic::catch_unwind(|| {
        let mut lab = match Lab::new("panic") {
            Ok(lab) => lab,
            Err(swarm_netlab::Error::Unavailable(_)) => return Vec::new(),
            Err(e) => panic!("{e}"),
        };
        lab.public_host("x").unwrap();
        let names = lab.namespaces().to_vec();
        if !names.is_empty() {
            std::panic::panic_any(names);
        }
        names
    });
    let names = match names {
        Ok(v) => v,
        Err(payload) => *payload.downcast::<Vec<String>>().unwrap(),
    };
    let left: Vec<String> = lab_namespaces().into_iter().map(|(n, _)| n).collect();
    for n in names {
        assert!(!left.contains(&n), "{n} survived the panic");
    }
}

#[test]
fn a_rebound_router_moves_flows_to_new_ports_and_filters_the_old_one() {
    let mut lab = lab_or_skip!("rebind");
    let s = lab.public_host("s").unwrap();
    let mut r = lab.router("r1", Nat::Home).unwrap();
    let a = lab.home_host(&mut r, "a").unwrap();
    let srv = s.udp_bind(PORT).unwrap();
    let sock = a.udp_bind(40000).unwrap();
    let before = observed(&sock, &srv, (s.ip(), PORT).into(), b"hello");
    assert_eq!(before.port(), 40000, "a home router keeps the port");
    r.rebind((20000, 29999)).unwrap();
    // The old mapping is gone: nothing sent to it comes in.
    srv.send_to(b"old", before).unwrap();
    assert!(recv(&sock).is_none(), "the old public port still forwards");
    // The same inside socket now appears from a port of the new range, and replies come back.
    let after = observed(&sock, &srv, (s.ip(), PORT).into(), b"again");
    assert_eq!(after.ip(), before.ip());
    assert!((20000..=29999).contains(&after.port()), "{after}");
    srv.send_to(b"reply", after).unwrap();
    assert_eq!(recv(&sock).unwrap().0, b"reply");
}
