//! `swarm demo --faulty-peer KIND:RATE --audit-rate P` with real peer processes (`swarm join
//! --fault`) on loopback: the faulty peer is banned, nobody else is, the ban re-runs its step on
//! honest replicas so the losses are still the single-process run's, and the ledger written to
//! `--out` (as `<out>.ledger`) verifies and shows the ban. Every wait is bounded.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use swarm_model::RunConfig;
use swarm_testkit::{local_losses, tiny_config};

/// Runs `swarm ARGS` (bounded by `limit`); returns (success, stdout, stderr).
fn swarm(args: &[&str], limit: Duration) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_swarm"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Drain stderr on a thread so a chatty child never blocks on a full pipe.
    let mut err_pipe = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err_pipe.read_to_string(&mut s);
        s
    });
    let mut out_pipe = child.stdout.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out_pipe.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("swarm {args:?} did not finish in {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    (
        status.success(),
        out_reader.join().unwrap(),
        err_reader.join().unwrap(),
    )
}

fn last_json(out: &str) -> serde_json::Value {
    let last = out.lines().last().expect("a JSON line");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("bad JSON {last}: {e}"))
}

fn demo(dir: &Path, cfg: &RunConfig, extra: &[&str]) -> serde_json::Value {
    let path = dir.join("run.toml");
    std::fs::write(&path, cfg.to_toml().unwrap()).unwrap();
    let steps = cfg.train.steps.to_string();
    let mut args = vec![
        "demo",
        "--config",
        path.to_str().unwrap(),
        "--steps",
        &steps,
        "--shape",
        "up=100mbit,down=100mbit,delay=2ms",
        "--attempt-timeout-s",
        "10",
        "--json",
    ];
    args.extend_from_slice(extra);
    let (ok, out, err) = swarm(&args, Duration::from_secs(120));
    assert!(ok, "swarm demo {extra:?} failed:\n{err}");
    last_json(&out)
}

#[test]
fn demo_bans_the_faulty_peer_and_keeps_the_local_run() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(3);
    let out_dir = dir.path().join("out");
    let j = demo(
        dir.path(),
        &cfg,
        &[
            "--faulty-peer",
            "scale-grad:1",
            "--audit-rate",
            "1",
            "--out",
            out_dir.to_str().unwrap(),
        ],
    );
    let faulty = j["faulty_peer"].as_str().unwrap().to_string();
    assert_eq!(j["banned"], serde_json::json!([faulty]), "{j}");
    assert_eq!(j["false_bans"], 0);
    assert!(j["audits"].as_u64().unwrap() >= 3 * 4 * 2, "{j}");
    assert!(j["audit_failures"].as_u64().unwrap() >= 1);
    // Every corrupted step was audited (rate 1) and re-run before it was applied.
    let got: Vec<f64> = j["losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let want = local_losses(&cfg);
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() / w.abs() < 1e-4, "{got:?} vs {want:?}");
    }
    // The ledger verifies and records the ban; the banned peer earns nothing.
    let ledger = dir.path().join("out.ledger");
    let (ok, out, err) = swarm(
        &["ledger", "show", ledger.to_str().unwrap(), "--json"],
        Duration::from_secs(30),
    );
    assert!(ok, "{err}");
    let l = last_json(&out);
    assert_eq!(l["banned"], serde_json::json!([faulty]));
    let peers = l["peers"].as_array().unwrap();
    let bad = peers.iter().find(|p| p["peer"] == faulty.as_str()).unwrap();
    assert_eq!(bad["credited_micro_batches"], 0);
    assert!(
        peers
            .iter()
            .filter(|p| p["peer"] != faulty.as_str())
            .all(|p| p["banned"] == false)
    );
}
