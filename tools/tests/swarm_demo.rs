//! Process-level tests of the distributed run: `swarm demo` starts the trainer and real peer
//! processes of this binary on loopback with shaped links. With codec `none` the losses of every
//! step match the single-process run (the model crate's `LocalTrainer`, the same code as
//! `swarm train --local`) within 1e-4 relative, also when a replica is SIGKILLed mid-step or a
//! peer joins mid-run, and the final checkpoint the demo writes holds the local model's weights.
//! Every wait is bounded.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use swarm_model::RunConfig;
use swarm_testkit::{assert_checkpoint_is_local, local_losses, local_run, tiny_config};

/// Runs `swarm demo` with `args` (bounded by `limit`), returns its JSON line.
fn demo(dir: &Path, cfg: &RunConfig, args: &[&str], limit: Duration) -> serde_json::Value {
    let path = dir.join("run.toml");
    std::fs::write(&path, cfg.to_toml().unwrap()).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_swarm"))
        .arg("demo")
        .arg("--config")
        .arg(&path)
        .args(["--steps", &cfg.train.steps.to_string()])
        .args(["--shape", "up=100mbit,down=100mbit,delay=2ms"])
        .args(["--attempt-timeout-s", "10"])
        .arg("--json")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("swarm demo {args:?} did not finish in {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut out = String::new();
    let mut err = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "swarm demo {args:?} failed:\n{err}");
    let last = out.lines().last().expect("a JSON line");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("bad JSON {last}: {e}"))
}

fn check_losses(json: &serde_json::Value, cfg: &RunConfig) {
    let got: Vec<f64> = json["losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let want = local_losses(cfg);
    assert_eq!(got.len(), want.len(), "{json}");
    for (k, (g, w)) in got.iter().zip(&want).enumerate() {
        let rel = (g - w).abs() / w.abs();
        assert!(rel < 1e-4, "step {k}: swarm {g} vs local {w} (rel {rel})");
    }
    assert_eq!(json["replica_hash_mismatches"], 0, "{json}");
}

#[test]
fn demo_with_codec_none_matches_the_local_run() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(3);
    let ckpt = dir.path().join("ckpt");
    let json = demo(
        dir.path(),
        &cfg,
        &["--peers", "4", "--out", ckpt.to_str().unwrap()],
        Duration::from_secs(120),
    );
    check_losses(&json, &cfg);
    assert_eq!(json["steps"], 3);
    // The final checkpoint (HF format) holds the local model's weights.
    let (_, local) = local_run(&cfg, cfg.train.steps as usize);
    let ck = swarm_model::checkpoint::load(&ckpt).unwrap();
    assert_eq!(ck.tensors.len(), local.tensors().len());
    // Two replicas per stage: the replicas' sums associate differently (see the helper).
    assert_checkpoint_is_local(&ckpt, 3, &local);
    assert_eq!(json["retries"], 0);
    assert_eq!(json["peers_lost"], 0);
    // Codec none: frames carry fp32 plus small headers.
    let (wire, dense) = (
        json["wire_bytes"].as_u64().unwrap(),
        json["dense_bytes"].as_u64().unwrap(),
    );
    assert!(wire >= dense && dense > 0, "{json}");
    // The trainer's time by part adds up to its training time, within the demo's wall time.
    let t = &json["time_breakdown"];
    let part = |k: &str| t[k].as_f64().unwrap_or_else(|| panic!("{k} in {t}"));
    let wall = part("wall_s");
    let parts = [
        "compute_s",
        "encode_decode_s",
        "stage_queue_s",
        "links_s",
        "barrier_s",
        "sync_s",
        "audits_s",
        "idle_s",
    ];
    let sum: f64 = parts.iter().map(|k| part(k)).sum();
    assert!((sum - wall).abs() < 1e-3 * wall, "{t}");
    assert!(
        wall > 0.0 && wall <= json["wall_s"].as_f64().unwrap(),
        "{json}"
    );
    assert!(part("compute_s") > 0.0 && part("sync_s") > 0.0, "{t}");
    // CPU while training (10 ms ticks): some in all, and no more than the machine's cores could
    // give in the demo's wall time.
    let cpu = &json["cpu"];
    let (trainer, peers, total) = (
        cpu["trainer_s"].as_f64().unwrap(),
        cpu["peers_s"].as_f64().unwrap(),
        cpu["total_s"].as_f64().unwrap(),
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    assert!(trainer >= 0.0 && peers >= 0.0 && total > 0.0, "{cpu}");
    assert!((trainer + peers - total).abs() < 1e-9, "{cpu}");
    assert!(
        total <= cores * json["wall_s"].as_f64().unwrap() + 0.1,
        "{cpu} {json}"
    );
}

#[test]
fn sigkill_of_a_replica_mid_step_keeps_every_step_exact() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(4);
    let json = demo(
        dir.path(),
        &cfg,
        &["--peers", "4", "--kill-peer-at-step", "1"],
        Duration::from_secs(120),
    );
    assert_eq!(json["steps"], 4);
    assert_eq!(json["peers_lost"], 1, "{json}");
    check_losses(&json, &cfg);
}

#[test]
fn a_peer_joining_mid_run_loads_its_stage_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(5);
    let json = demo(
        dir.path(),
        &cfg,
        &["--peers", "2", "--join-peer-at-step", "1"],
        Duration::from_secs(120),
    );
    assert_eq!(json["steps"], 5);
    // Two peers built their stage from the seed; the third fetched it from a replica.
    assert_eq!(
        json["state_sync_seconds"].as_array().unwrap().len(),
        3,
        "{json}"
    );
    check_losses(&json, &cfg);
}
