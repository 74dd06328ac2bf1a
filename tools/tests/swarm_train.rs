//! Process-level test of the distributed `swarm train` with stage peers started as `swarm join
//! ADDR --stage K` processes: the trainer is SIGKILLed after a checkpoint, restarted with the same
//! `--out`, the peers join it again on their own, and the resumed run has the losses of an
//! uninterrupted run (codec none, 1e-4 relative); its `--json` line has the fields.
//! Every wait is bounded; every child is killed on drop.

mod net_common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use net_common::{BIN, FAST, PeerProc};
use swarm_model::{LocalTrainer, RunConfig};

/// The shared tiny run (2 stages, 4 micro-batches of 2 x 16 tokens, codec none) with a
/// checkpoint every 2 steps.
fn config(steps: u64) -> RunConfig {
    let mut cfg = swarm_testkit::tiny_config(steps);
    cfg.train.checkpoint_every = 2;
    cfg.validate().unwrap();
    cfg
}

/// A `swarm train` process, SIGKILLed on drop; stdout lines come through a channel.
struct TrainerProc {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Drop for TrainerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_trainer(config: &Path, out: &Path, addr: SocketAddr) -> TrainerProc {
    let mut child = Command::new(BIN)
        .arg("train")
        .arg("--config")
        .arg(config)
        .arg("--out")
        .arg(out)
        .args(["--listen", &addr.to_string(), "--json"])
        // The same identity across the restart: the run's ledger is signed by the trainer's key.
        .arg("--data-dir")
        .arg(out.with_file_name("trainer-id"))
        .env("SWARM_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn swarm train");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    TrainerProc { child, lines: rx }
}

/// A free loopback UDP port (bound and released: the trainer must keep its address across a
/// restart so the peers find it again).
fn free_addr() -> SocketAddr {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.local_addr().unwrap()
}

#[test]
fn trainer_sigkilled_after_a_checkpoint_resumes_with_the_same_losses() {
    let steps = 40;
    let cfg = config(steps);
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("run.toml");
    std::fs::write(&config_path, cfg.to_toml().unwrap()).unwrap();
    let out = dir.path().join("ckpt");
    let addr = free_addr();

    let first = start_trainer(&config_path, &out, addr);
    // The trainer prints its address line once it listens.
    first
        .lines
        .recv_timeout(Duration::from_secs(30))
        .expect("trainer startup line");
    let _p0 = PeerProc::start(Some(addr), FAST, &["--stage", "0"]);
    let _p1 = PeerProc::start(Some(addr), FAST, &["--stage", "1"]);

    // SIGKILL as soon as a checkpoint exists.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !out.join("config.json").exists() {
        assert!(Instant::now() < deadline, "no checkpoint within 120 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(first);
    let ck = swarm_model::checkpoint::load(&out).expect("a whole checkpoint");
    let resumed_at = ck.state.expect("train state").step;
    // Killed mid-run: the checkpoint is not the last step's.
    assert!(
        resumed_at >= 2 && resumed_at.is_multiple_of(2) && resumed_at < steps,
        "checkpoint after {resumed_at} of {steps} steps"
    );
    eprintln!("trainer killed; resuming from the checkpoint after {resumed_at} steps");

    // Restart with the same --out: it resumes; the peers notice and join it again.
    let second = start_trainer(&config_path, &out, addr);
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut last = String::new();
    loop {
        match second.lines.recv_timeout(Duration::from_millis(200)) {
            Ok(l) => last = l,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        assert!(
            Instant::now() < deadline,
            "resumed run did not finish in 180 s"
        );
    }
    let mut second = second;
    let status = second.child.wait().unwrap();
    assert!(status.success(), "resumed trainer failed");
    let json: serde_json::Value =
        serde_json::from_str(&last).unwrap_or_else(|e| panic!("bad JSON {last}: {e}"));
    for field in [
        "steps",
        "initial_loss",
        "final_loss",
        "tokens_per_s",
        "wire_bytes",
        "dense_bytes",
        "retries",
        "peers_lost",
        "replica_hash_mismatches",
    ] {
        assert!(json.get(field).is_some(), "{field} missing in {json}");
    }
    assert_eq!(json["steps"].as_u64(), Some(steps - resumed_at), "{json}");
    assert_eq!(json["replica_hash_mismatches"], 0, "{json}");
    let wire = json["wire_bytes"].as_u64().unwrap();
    let dense = json["dense_bytes"].as_u64().unwrap();
    assert!(wire >= dense && dense > 0, "codec none: {json}");

    // The resumed steps are the uninterrupted run's.
    let corpus = swarm_model::train::load_corpus(&cfg.data).unwrap();
    let mut local = LocalTrainer::new(&cfg).unwrap();
    let want: Vec<f64> = (0..steps)
        .map(|_| local.train_step(&corpus).unwrap().loss)
        .collect();
    let got: Vec<f64> = json["losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let want = &want[resumed_at as usize..];
    assert_eq!(got.len(), want.len());
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        let rel = (g - w).abs() / w.abs();
        assert!(
            rel < 1e-4,
            "step {}: resumed {g} vs uninterrupted {w} (rel {rel})",
            k as u64 + resumed_at
        );
    }
}

/// Waits (bounded) for the trainer to exit and returns its JSON line.
fn finish(mut t: TrainerProc, limit: Duration) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    let mut last = String::new();
    loop {
        match t.lines.recv_timeout(Duration::from_millis(200)) {
            Ok(l) => last = l,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        assert!(
            Instant::now() < deadline,
            "trainer did not finish in {limit:?}"
        );
    }
    assert!(t.child.wait().unwrap().success(), "trainer failed");
    serde_json::from_str(&last).unwrap_or_else(|e| panic!("bad JSON {last}: {e}"))
}

/// Ctrl-C on a `swarm join` serving a stage mid-run: it leaves gracefully (finishes its work and
/// the step's sync, released at the boundary), is not counted as lost, and no step is disturbed.
#[test]
fn ctrl_c_on_a_stage_peer_leaves_gracefully() {
    let steps = 60;
    let cfg = config(steps);
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("run.toml");
    std::fs::write(&config_path, cfg.to_toml().unwrap()).unwrap();
    let out = dir.path().join("ckpt");
    let addr = free_addr();
    let trainer = start_trainer(&config_path, &out, addr);
    trainer
        .lines
        .recv_timeout(Duration::from_secs(30))
        .expect("trainer startup line");
    let _p0 = PeerProc::start(Some(addr), FAST, &["--stage", "0"]);
    let _p1 = PeerProc::start(Some(addr), FAST, &["--stage", "1"]);
    let mut leaver = PeerProc::start(Some(addr), FAST, &["--stage", "1"]);
    // Serving (its join line), and the run is under way (first checkpoint): Ctrl-C.
    let serving = leaver
        .lines
        .recv_timeout(Duration::from_secs(60))
        .expect("the leaver serves its stage");
    assert!(serving.contains("\"stage\":1"), "{serving}");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !out.join("config.json").exists() {
        assert!(Instant::now() < deadline, "no checkpoint within 120 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    leaver.interrupt();
    let status = leaver.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "the leaver exits cleanly");
    let json = finish(trainer, Duration::from_secs(180));
    assert_eq!(json["steps"].as_u64(), Some(steps), "{json}");
    assert_eq!(json["peers_lost"], 0, "{json}");
    assert_eq!(json["peers_left"], 1, "{json}");
    assert_eq!(json["replica_hash_mismatches"], 0, "{json}");
    let corpus = swarm_model::train::load_corpus(&cfg.data).unwrap();
    let mut local = LocalTrainer::new(&cfg).unwrap();
    for (k, v) in json["losses"].as_array().unwrap().iter().enumerate() {
        let (g, w) = (v.as_f64().unwrap(), local.train_step(&corpus).unwrap().loss);
        assert!((g - w).abs() / w.abs() < 1e-4, "step {k}: {g} vs {w}");
    }
}
