//! The "NAT rebinding" scenario of issue #14 with real processes and real NATs: `swarm train` on
//! a public segment, four volunteers behind two home routers. Mid-run, one router forgets every
//! mapping (its endpoint-independent map and conntrack flushed, as a router that reboots), and
//! later the other rebinds: every flow through it continues from a new public port no peer
//! knows. The connections recover (QUIC migrates them to the new address; conntrack shows the
//! flows to the trainer and across routers running both ways on the new ports), and the run
//! completes with every micro-batch of every step in the ledger exactly once per stage and its
//! losses following the single-process run's. Skipped (with the reason) only where namespaces
//! cannot be made; every wait is bounded.

mod net_common;

use std::time::{Duration, Instant};

use net_common::BIN;
use net_common::nat::{config, run_completes, start_trainer, start_volunteer, swarm_json};
use swarm_netlab::{Host, Nat, lab_or_skip};
use swarm_testkit::local_losses;

/// The trainer's monitor inside its namespace.
const MONITOR: &str = "127.0.0.1:7080";

/// The trainer's `/api/v1/state`, read by `swarm top --json` inside its namespace.
fn state(host: &Host) -> serde_json::Value {
    swarm_json(host, &["top", MONITOR, "--json"])
}

/// Waits (bounded) until the trainer has finished `step` steps.
fn wait_step(host: &Host, step: u64, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let s = state(host);
        if s["progress"]["step"].as_u64().unwrap_or(0) >= step {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "step {step} not reached in {limit:?}: {}",
            s["progress"]
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The two-way UDP flows through `router` whose public port is one of the rebound ones: (their
/// destination, that port), from `conntrack -L` in the router's namespace.
fn rebound_flows(router: &swarm_netlab::Router) -> Vec<(String, u16)> {
    let o = router
        .host()
        .command("conntrack")
        .args(["-L", "-p", "udp"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    text.lines()
        .filter(|l| l.contains("[ASSURED]"))
        .filter_map(|l| {
            let field = |key: &str, nth: usize| {
                l.split_whitespace()
                    .filter_map(|f| f.strip_prefix(key))
                    .nth(nth)
                    .map(str::to_owned)
            };
            // The original direction's destination, and the reply's destination port (the
            // public port the router gave the flow).
            let dst = field("dst=", 0)?;
            let port: u16 = field("dport=", 1)?.parse().ok()?;
            (20000..=29999).contains(&port).then_some((dst, port))
        })
        .collect()
}

#[test]
fn a_run_survives_home_routers_that_forget_their_mappings() {
    let mut lab = lab_or_skip!("rebind");
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
    // Long enough for both events and 100 steps after the first; short enough that the
    // rounding drift of two replicas per stage stays far below the loss bound below.
    let steps = 200;
    let cfg = config(steps);
    // Every volunteer serves from the first step, so each flush cuts live connections.
    let (trainer, trainer_addr) = start_trainer(
        &t_host,
        dir.path(),
        steps,
        &["--min-replicas", "2", "--http", MONITOR],
    );
    let mut peers = Vec::new();
    for (i, (host, stage)) in vols.iter().enumerate() {
        let data = dir.path().join(format!("v{i}"));
        let (p, started) = start_volunteer(host, &trainer_addr, *stage, 7100 + i as u16, &data);
        assert_eq!(started["reach"], "punchable", "{started}");
        peers.push(p);
    }

    // While the run goes on, one router forgets its mappings (they come back on the same
    // ports), then the other rebinds (every flow through it continues from a new public port);
    // the run keeps going each time.
    wait_step(&t_host, 40, Duration::from_secs(180));
    r1.flush_mappings().expect("flush r1's mappings");
    eprintln!("r1 forgot its mappings after step 40");
    wait_step(&t_host, 100, Duration::from_secs(180));
    r2.rebind((20000, 29999)).expect("rebind r2");
    eprintln!("r2 rebound its flows to new ports after step 100");
    wait_step(&t_host, 160, Duration::from_secs(180));
    // The rebinding took: r2's volunteers now talk both ways (conntrack ASSURED) from new
    // public ports, to the trainer and to the volunteers behind r1 (their QUIC connections
    // migrated to the new address).
    let moved = rebound_flows(&r2);
    eprintln!("flows through r2 on new ports: {moved:?}");
    assert!(
        moved.iter().any(|(dst, _)| *dst == t_host.ip().to_string()),
        "no flow to the trainer moved to a new port: {moved:?}"
    );
    assert!(
        moved.iter().any(|(dst, _)| *dst == r1.wan_ip().to_string()),
        "no flow to a volunteer behind r1 moved to a new port: {moved:?}"
    );

    // The run completes, and its losses are the single-process run's: every micro-batch of
    // every step counted exactly once across the rebindings.
    let json = run_completes(&trainer, steps, Duration::from_secs(300));
    let got: Vec<f64> = json["losses"]
        .as_array()
        .expect("losses in the summary")
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    // The ledger holds every step's counted work: each micro-batch once per stage, no more
    // and no less, across the rebindings.
    let ledger = dir.path().join("ckpt.ledger");
    let o = std::process::Command::new(BIN)
        .args(["ledger", "show", ledger.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    let l: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    let counted: u64 = l["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            ["credited", "pending", "voided"]
                .iter()
                .map(|k| p[format!("{k}_micro_batches")].as_u64().unwrap())
                .sum::<u64>()
        })
        .sum();
    let stages = (cfg.stages.len() - 1) as u64;
    assert_eq!(
        counted,
        steps * cfg.train.micro_batches as u64 * stages,
        "micro-batches in the ledger: {l}"
    );
    // And the losses follow the single-process run's. Two replicas per stage sum their
    // gradients in another order than one process does, so the runs part by rounding from
    // the first steps and drift, rebinding or not: about 2e-4 by step 200, and 1e-3 by step
    // 420 in one run (chaotic growth), hence the short run. A micro-batch counted twice or
    // lost would move the loss by far more at once.
    let want = local_losses(&cfg);
    let worst = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (g - w).abs() / w.abs())
        .fold(0.0, f64::max);
    eprintln!("largest relative loss difference to the local run: {worst:.2e}");
    swarm_testkit::assert_losses_match(&got, &want, 1e-3);
    eprintln!(
        "retries {}, peers lost {}, losses {:.4} -> {:.4}",
        json["retries"],
        json["peers_lost"],
        got[0],
        got[got.len() - 1]
    );
    drop(peers);
}
