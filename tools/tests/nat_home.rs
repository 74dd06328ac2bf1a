//! The "home" scenario of issue #14 with real processes and real NATs: `swarm train` on a public
//! segment, four `swarm join` volunteers behind two home routers (nftables, endpoint-independent
//! mapping, inbound filtered). Each join prints the verdict `punchable`; the run completes with
//! its loss falling; the volunteers' stage-to-stage connections run punched (across routers) or
//! direct (on one LAN). Skipped (with the reason) only where namespaces cannot be made.

mod net_common;

use std::time::{Duration, Instant};

use net_common::nat::{run_completes, start_trainer, start_volunteer, swarm_json};
use swarm_netlab::{Host, Nat, lab_or_skip};

#[test]
fn home_volunteers_punch_through_two_routers_and_the_run_completes() {
    let mut lab = lab_or_skip!("home");
    let t_host = lab.public_host("trainer").unwrap();
    let mut r1 = lab.router("r1", Nat::Home).unwrap();
    let mut r2 = lab.router("r2", Nat::Home).unwrap();
    let vols: Vec<(Host, u32)> = vec![
        (lab.home_host(&mut r1, "v1").unwrap(), 0),
        (lab.home_host(&mut r1, "v2").unwrap(), 1),
        (lab.home_host(&mut r2, "v3").unwrap(), 0),
        (lab.home_host(&mut r2, "v4").unwrap(), 1),
    ];
    let dir = tempfile::tempdir().unwrap();
    // Long enough that all four have joined and served well before the end.
    let steps = 600;
    let (trainer, trainer_addr) = start_trainer(&t_host, dir.path(), steps, &[]);

    let mut peers = Vec::new();
    for (i, (host, stage)) in vols.iter().enumerate() {
        let data = dir.path().join(format!("v{i}"));
        let t0 = Instant::now();
        let (p, started) = start_volunteer(host, &trainer_addr, *stage, 7100 + i as u16, &data);
        assert_eq!(started["reach"], "punchable", "{started}");
        assert!(
            started["advice"]
                .as_str()
                .unwrap()
                .contains("hole punching"),
            "{started}"
        );
        assert!(t0.elapsed() < Duration::from_secs(30), "join too slow");
        peers.push(p);
    }

    // Mid-run (all four serve), ask each volunteer inside its namespace how its connections run.
    std::thread::sleep(Duration::from_secs(3));
    let mut punched = 0;
    for (i, (host, _)) in vols.iter().enumerate() {
        let v = swarm_json(
            host,
            &["status", &format!("127.0.0.1:{}", 7100 + i), "--json"],
        );
        for p in v["peers"].as_array().unwrap() {
            if p["self"] == true {
                assert_eq!(p["reach"], "punchable", "{p}");
                continue;
            }
            match p["path"].as_str() {
                Some("punched") => punched += 1,
                Some("direct") | None => {}
                Some(other) => panic!("a stage hop runs {other}: {p}"),
            }
        }
    }
    eprintln!("connections reported punched by the volunteers: {punched}");
    assert!(punched > 0, "no connection across the routers was punched");

    // The run completes and learns.
    let json = run_completes(&trainer, steps, Duration::from_secs(300));
    // Every hop ran punched or direct: the trainer's relay carried nothing.
    let work = json["peers"].as_array().expect("per-peer work");
    assert!(!work.is_empty(), "{json}");
    for p in work {
        assert_eq!(p["relay_bytes"], 0, "{p}");
    }
    drop(peers);
}
