//! The "symmetric" scenario of issue #14 with real processes and real NATs: `swarm train` on a
//! public segment (it relays by default), two stage-0 volunteers behind a home router, and two
//! stage-1 replicas, one behind another home router and one behind a symmetric NAT (nftables
//! `masquerade random`); training starts once every stage has two replicas, so both stage-1
//! replicas serve from the first step. The symmetric volunteer's join prints `symmetric` and its advice; its
//! hops with the other volunteers run through the trainer's relay (`swarm status --json` says
//! `relayed`); the run completes with its loss falling; the trainer reports relay bytes for that
//! peer and routed it less work than the direct replica of its stage. The trainer's monitor shows
//! that peer's path as relayed, in its JSON API and on its page in a real headless Chromium (run
//! inside the trainer's namespace). Skipped (with the reason) only where namespaces cannot be
//! made, the browser part only where Chromium cannot be found; every wait is bounded.

mod browser;
mod net_common;

use std::time::Duration;

use net_common::nat::{run_completes, start_trainer, start_volunteer, swarm_json};
use swarm_netlab::{Host, Nat, lab_or_skip};

/// The trainer's monitor inside its namespace.
const MONITOR: &str = "127.0.0.1:7080";

/// The `peers` rows of the monitor's `/api/v1/state`, read by `swarm top --json` inside `host`.
fn monitor_peers(host: &Host) -> Vec<serde_json::Value> {
    swarm_json(host, &["top", MONITOR, "--json"])["peers"]
        .as_array()
        .unwrap()
        .clone()
}

/// The `peers` rows of `swarm status ADDR --json` run inside `host`.
fn status(host: &Host, addr: &str) -> Vec<serde_json::Value> {
    swarm_json(host, &["status", addr, "--json"])["peers"]
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn a_symmetric_volunteer_is_relayed_gets_less_work_and_the_run_completes() {
    let mut lab = lab_or_skip!("symmetric");
    let t_host = lab.public_host("trainer").unwrap();
    let mut r1 = lab.router("r1", Nat::Home).unwrap();
    let mut r2 = lab.router("r2", Nat::Home).unwrap();
    let mut r3 = lab.router("r3", Nat::Symmetric).unwrap();
    let v1 = lab.home_host(&mut r1, "v1").unwrap();
    let v2 = lab.home_host(&mut r2, "v2").unwrap();
    let v3 = lab.home_host(&mut r3, "v3").unwrap();
    let v4 = lab.home_host(&mut r1, "v4").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let steps = 400;
    // Every replica serves from the first step: the work split is the router's alone.
    let (trainer, trainer_addr) = start_trainer(
        &t_host,
        dir.path(),
        steps,
        &["--min-replicas", "2", "--http", MONITOR],
    );

    let vols = [
        (&v1, 0u32, 7100u16),
        (&v3, 1, 7102),
        (&v2, 1, 7101),
        (&v4, 0, 7103),
    ];
    let mut peers = Vec::new();
    let mut ids = Vec::new();
    for (i, (host, stage, port)) in vols.iter().enumerate() {
        let data = dir.path().join(format!("v{i}"));
        let (p, started) = start_volunteer(host, &trainer_addr, *stage, *port, &data);
        let want = if *port == 7102 {
            "symmetric"
        } else {
            "punchable"
        };
        assert_eq!(started["reach"], want, "{started}");
        if *port == 7102 {
            assert!(
                started["advice"].as_str().unwrap().contains("relay"),
                "{started}"
            );
        }
        ids.push(started["id"].as_str().unwrap().to_owned());
        peers.push(p);
    }
    let sym_id = ids[1].clone();
    let direct_id = ids[2].clone();

    // While the run goes on, the stage-0 volunteer reports its hop to the symmetric replica as
    // relayed (asked a bounded number of times: the first hop to it may take a moment).
    let mut relayed = None;
    for _ in 0..60 {
        let rows = status(&v1, "127.0.0.1:7100");
        if let Some(r) = rows
            .iter()
            .find(|r| r["id"] == sym_id.as_str() && r["path"] == "relayed")
        {
            relayed = Some(r.clone());
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let row =
        relayed.expect("the stage-0 volunteer never reported a relayed path to the symmetric one");
    assert_eq!(row["reach"], "symmetric", "{row}");
    assert!(row["relay_bytes"].as_u64().unwrap() > 0, "{row}");
    // The trainer (the relay) counts that peer's bytes in its status too.
    let rows = status(&t_host, &trainer_addr);
    let at_relay = rows.iter().find(|r| r["id"] == sym_id.as_str()).unwrap();
    assert!(at_relay["relay_bytes"].as_u64().unwrap() > 0, "{at_relay}");

    // The trainer's monitor shows the symmetric replica relayed and the one behind a home router
    // punched: in its JSON API, and on its page in a real browser.
    let rows = monitor_peers(&t_host);
    let path_of = |rows: &[serde_json::Value], id: &str| {
        rows.iter()
            .find(|r| r["id"] == id)
            .unwrap_or_else(|| panic!("{id} not in the monitor's peers: {rows:?}"))["path"]
            .clone()
    };
    assert_eq!(path_of(&rows, &sym_id), "relayed");
    assert_eq!(path_of(&rows, &direct_id), "punched");
    match browser::chromium() {
        Some(chrome) => {
            let profile = tempfile::tempdir().unwrap();
            let dom = browser::browse_with(
                t_host.command(&chrome),
                profile.path(),
                &["--dump-dom".into()],
                &format!("http://{MONITOR}/"),
            );
            let row = browser::peer_row(&dom, &sym_id)
                .unwrap_or_else(|| panic!("no page row for the symmetric peer {sym_id}"));
            assert!(row.contains("data-path=\"relayed\""), "{row}");
            let row = browser::peer_row(&dom, &direct_id)
                .unwrap_or_else(|| panic!("no page row for the direct peer {direct_id}"));
            assert!(row.contains("data-path=\"punched\""), "{row}");
        }
        None => eprintln!(
            "SKIPPED the browser part: no chromium on PATH (apt-get install chromium, or set SWARM_CHROMIUM)"
        ),
    }

    let json = run_completes(&trainer, steps, Duration::from_secs(300));
    let work = |id: &str| {
        json["peers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["peer"] == id)
            .unwrap_or_else(|| panic!("no work row for {id}: {json}"))
            .clone()
    };
    let (sym, direct) = (work(&sym_id), work(&direct_id));
    eprintln!("symmetric replica: {sym}\ndirect replica: {direct}");
    assert_eq!(sym["reach"], "symmetric", "{sym}");
    assert!(sym["relay_bytes"].as_u64().unwrap() > 0, "{sym}");
    let (ns, nd) = (
        sym["micro_batches"].as_u64().unwrap(),
        direct["micro_batches"].as_u64().unwrap(),
    );
    assert!(ns > 0, "the relayed replica got no work");
    assert!(ns < nd, "relayed {ns} micro-batches vs direct {nd}");
    drop(peers);
}
