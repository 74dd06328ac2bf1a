//! Helpers for the NAT scenario tests (real `swarm` processes inside `swarm-netlab` namespaces).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use swarm_model::RunConfig;
use swarm_netlab::Host;

use super::BIN;

/// The testkit's tiny run (2 layers, 2 stages) with a checkpoint every 100 steps.
/// `swarm ARGS` (a command that prints one JSON object last, e.g. `status --json` or `top
/// --json`) run inside `host`; that object. Panics with its stderr if it fails.
pub(crate) fn swarm_json(host: &Host, args: &[&str]) -> serde_json::Value {
    let o = host.command(BIN).args(args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(text.lines().last().unwrap()).unwrap()
}

pub(crate) fn config(steps: u64) -> RunConfig {
    let mut cfg = swarm_testkit::tiny_config(steps);
    cfg.train.checkpoint_every = 100;
    cfg
}

/// Waits (at most `limit`) for the trainer to finish and checks that its run completed `steps`
/// steps with the loss falling and replicas agreeing; returns its summary JSON.
pub(crate) fn run_completes(trainer: &Proc, steps: u64, limit: Duration) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    let mut last = String::new();
    loop {
        match trainer.lines.recv_timeout(Duration::from_millis(200)) {
            Ok(l) => last = l,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        assert!(
            Instant::now() < deadline,
            "the run did not finish in {limit:?}"
        );
    }
    let json: serde_json::Value =
        serde_json::from_str(&last).unwrap_or_else(|e| panic!("bad JSON {last}: {e}"));
    assert_eq!(json["steps"].as_u64(), Some(steps), "{json}");
    let (first, last) = (
        json["initial_loss"].as_f64().unwrap(),
        json["final_loss"].as_f64().unwrap(),
    );
    assert!(last < first, "loss did not fall: {first} -> {last}");
    assert_eq!(json["replica_hash_mismatches"], 0, "{json}");
    json
}

/// A child killed on drop, its stdout lines on a channel.
pub(crate) struct Proc {
    pub child: Child,
    pub lines: mpsc::Receiver<String>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn spawn(host: &Host, args: &[&str], env: &[(&str, &str)]) -> Proc {
    let mut cmd = host.command(BIN);
    cmd.args(args)
        .env(
            "SWARM_LOG",
            std::env::var("NAT_TEST_LOG").unwrap_or("warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn swarm");
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Proc { child, lines }
}

pub(crate) fn first_json(p: &Proc, limit: Duration) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = p.lines.recv_timeout(left).expect("a JSON line in time");
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
            && v.is_object()
        {
            return v;
        }
    }
}

/// `swarm train --json` inside `host`, listening on port 7000 of its address, on the tiny
/// config of `steps` steps, with its config, identity and checkpoint (`ckpt`, ledger
/// `ckpt.ledger`) under `dir` and `extra` flags; returns it after its startup line, and its
/// address.
pub(crate) fn start_trainer(host: &Host, dir: &Path, steps: u64, extra: &[&str]) -> (Proc, String) {
    let cfg_path = dir.join("run.toml");
    std::fs::write(&cfg_path, config(steps).to_toml().unwrap()).unwrap();
    let addr = format!("{}:7000", host.ip());
    let (cfg_s, out, id) = (
        cfg_path.display().to_string(),
        dir.join("ckpt").display().to_string(),
        dir.join("trainer-id").display().to_string(),
    );
    let mut args = vec![
        "train",
        "--config",
        &cfg_s,
        "--out",
        &out,
        "--listen",
        &addr,
        "--data-dir",
        &id,
    ];
    args.extend_from_slice(extra);
    args.push("--json");
    let trainer = spawn(host, &args, &[]);
    trainer
        .lines
        .recv_timeout(Duration::from_secs(60))
        .expect("trainer startup line");
    (trainer, addr)
}

/// `swarm join TRAINER --json` inside `host` for `stage`, listening on `port` (one port per
/// volunteer: the lab's endpoint-independent map is keyed by the inside port), its identity in
/// `data`; returns it with its first JSON line (id, verdict, advice).
pub(crate) fn start_volunteer(
    host: &Host,
    trainer: &str,
    stage: u32,
    port: u16,
    data: &Path,
) -> (Proc, serde_json::Value) {
    let p = spawn(
        host,
        &[
            "join",
            trainer,
            "--stage",
            &stage.to_string(),
            "--listen",
            &format!("[::]:{port}"),
            "--data-dir",
            data.to_str().unwrap(),
            "--json",
        ],
        super::FAST,
    );
    let started = first_json(&p, Duration::from_secs(60));
    (p, started)
}
