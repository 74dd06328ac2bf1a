//! `swarm demo --nat home|symmetric` as a user runs it (issue #14): the demo builds its own NAT
//! lab (namespaces, nftables routers), runs `swarm train` and `swarm join` processes inside it,
//! and reports each volunteer's router, verdict, work and relay bytes. Home: every volunteer
//! punchable and no relay byte. Symmetric: the volunteer behind the symmetric NAT is found
//! symmetric and the relay carries bytes. Both: the run completes with its loss falling and the
//! replicas agreeing, and the lab is gone afterwards. Skipped (with the reason) only where
//! namespaces cannot be made; every wait is bounded.

mod net_common;

use std::time::Duration;

use net_common::nat::config;
use swarm_netlab::lab_namespaces;

/// Runs `swarm demo --nat SCENARIO --json` on the tiny config (bounded) and returns its JSON.
fn demo(scenario: &str, steps: u64) -> Option<serde_json::Value> {
    // The demo builds its own lab: skip where this test could not build one either.
    match swarm_netlab::Lab::new("probe") {
        Ok(lab) => drop(lab),
        Err(swarm_netlab::Error::Unavailable(why)) => {
            eprintln!("skipped: {why}");
            return None;
        }
        Err(e) => panic!("cannot build the network lab: {e}"),
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("run.toml");
    std::fs::write(&cfg, config(steps).to_toml().unwrap()).unwrap();
    let out = net_common::run_swarm(
        &[
            "demo",
            "--nat",
            scenario,
            "--config",
            cfg.to_str().unwrap(),
            "--steps",
            &steps.to_string(),
            "--json",
        ],
        Duration::from_secs(600),
    );
    let text = &out.stdout;
    assert!(
        out.status.success(),
        "demo --nat {scenario} failed: {}\n{text}",
        out.stderr
    );
    let v: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(v["nat"], scenario);
    assert_eq!(v["steps"].as_u64(), Some(steps), "{v}");
    assert!(
        v["final_loss"].as_f64().unwrap() < v["initial_loss"].as_f64().unwrap(),
        "loss did not fall: {v}"
    );
    assert_eq!(v["replica_hash_mismatches"], 0, "{v}");
    // Nothing of the demo's lab is left: no lab namespace outlives the process that made it.
    let orphans: Vec<_> = lab_namespaces()
        .into_iter()
        .filter(|(_, pid)| !std::path::Path::new(&format!("/proc/{pid}")).exists())
        .collect();
    assert!(orphans.is_empty(), "namespaces left behind: {orphans:?}");
    Some(v)
}

fn volunteers(v: &serde_json::Value) -> Vec<serde_json::Value> {
    let vols = v["volunteers"].as_array().unwrap().clone();
    assert_eq!(vols.len(), 4, "{v}");
    vols
}

#[test]
fn demo_nat_home_punches_every_hop() {
    let Some(v) = demo("home", 100) else { return };
    for p in volunteers(&v) {
        assert_eq!(p["router"], "home", "{p}");
        assert_eq!(p["reach"], "punchable", "{p}");
        assert!(p["micro_batches"].as_u64().unwrap() > 0, "{p}");
    }
    assert_eq!(v["relay_bytes"], 0, "{v}");
}

#[test]
fn demo_nat_symmetric_relays_the_symmetric_volunteer() {
    let Some(v) = demo("symmetric", 100) else {
        return;
    };
    let vols = volunteers(&v);
    let sym: Vec<_> = vols.iter().filter(|p| p["router"] == "symmetric").collect();
    assert_eq!(sym.len(), 1, "{v}");
    assert_eq!(sym[0]["reach"], "symmetric", "{v}");
    assert_eq!(sym[0]["stage"], 1, "{v}");
    for p in vols.iter().filter(|p| p["router"] == "home") {
        assert_eq!(p["reach"], "punchable", "{p}");
    }
    // The symmetric replica exchanges its stage's sync through the trainer's relay, and its own
    // row shows those bytes even when the router gave it no micro-batch.
    assert!(v["relay_bytes"].as_u64().unwrap() > 0, "{v}");
    assert!(sym[0]["relay_bytes"].as_u64().unwrap() > 0, "{v}");
}
