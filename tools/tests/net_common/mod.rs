//! Helpers for the process-level network tests: real `swarm join` processes on loopback.
//!
//! Every child is owned by a [`PeerProc`] guard that kills it on drop, every wait polls against a
//! deadline, addresses come from the peer's printed startup line (port 0), data dirs are tempdirs.

#![allow(dead_code)] // Each test file uses a different subset.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

pub(crate) mod nat;

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_swarm");

/// Fast membership timing for tests (real defaults are seconds to a minute).
pub(crate) const FAST: &[(&str, &str)] = &[
    ("SWARM_GOSSIP_INTERVAL_MS", "200"),
    ("SWARM_RECORD_TTL_MS", "4000"),
    ("SWARM_REFRESH_INTERVAL_MS", "1000"),
];

/// A running `swarm join`, killed on drop.
pub(crate) struct PeerProc {
    pub child: Child,
    pub id: String,
    pub addr: SocketAddr,
    pub run_id: String,
    /// Lines printed on stdout after the startup line.
    pub lines: mpsc::Receiver<String>,
    pub _dir: tempfile::TempDir,
}

impl Drop for PeerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl PeerProc {
    /// Starts a peer (joining `bootstrap` if given) with `env` timing and extra flags, and waits
    /// (bounded) for its JSON startup line.
    pub(crate) fn start(
        bootstrap: Option<SocketAddr>,
        env: &[(&str, &str)],
        extra: &[&str],
    ) -> PeerProc {
        PeerProc::start_in(tempfile::tempdir().unwrap(), bootstrap, env, extra)
    }

    /// [`PeerProc::start`] with a given data dir (to restart a peer with the same identity).
    pub(crate) fn start_in(
        dir: tempfile::TempDir,
        bootstrap: Option<SocketAddr>,
        env: &[(&str, &str)],
        extra: &[&str],
    ) -> PeerProc {
        let mut cmd = Command::new(BIN);
        cmd.arg("join");
        if let Some(b) = bootstrap {
            cmd.arg(b.to_string());
        }
        cmd.args(["--listen", "127.0.0.1:0", "--json", "--data-dir"])
            .arg(dir.path())
            .args(extra)
            .envs(env.iter().copied())
            .env("SWARM_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("spawn swarm join");
        let lines = line_reader(child.stdout.take().unwrap());
        let first = match lines.recv_timeout(Duration::from_secs(30)) {
            Ok(l) => l,
            Err(e) => {
                let _ = child.kill();
                panic!("no startup line from swarm join within 30 s: {e}");
            }
        };
        let v: Value = serde_json::from_str(&first)
            .unwrap_or_else(|e| panic!("startup line is not JSON ({e}): {first}"));
        PeerProc {
            id: v["id"].as_str().unwrap().to_owned(),
            addr: v["addr"].as_str().unwrap().parse().unwrap(),
            run_id: v["run_id"].as_str().unwrap().to_owned(),
            child,
            lines,
            _dir: dir,
        }
    }

    /// SIGKILLs the peer and hands back its data dir.
    pub(crate) fn kill_keep_dir(mut self) -> tempfile::TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let dir = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self._dir, dir)
    }

    /// Sends SIGINT (Ctrl-C) so the peer leaves gracefully.
    pub(crate) fn interrupt(&self) {
        let ok = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -INT failed");
    }

    /// Waits (bounded) for the process to exit.
    pub(crate) fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "peer did not exit within {timeout:?}"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

fn line_reader(stdout: ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Output of one bounded command run.
pub(crate) struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `swarm ARGS`, killing it if it takes longer than `timeout`.
pub(crate) fn run_swarm(args: &[&str], timeout: Duration) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .env("SWARM_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("swarm {args:?} did not finish within {timeout:?}");
        }
        thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

/// One row of `swarm status --json`.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub id: String,
    pub addr: String,
    pub state: String,
    pub stages: Vec<u64>,
    pub throughput: f64,
    pub last_seen_s: f64,
}

/// `swarm status ADDR --json`, parsed; `None` if the command failed.
pub(crate) fn status(addr: SocketAddr) -> Option<Vec<Row>> {
    let out = run_swarm(
        &["status", &addr.to_string(), "--json"],
        Duration::from_secs(20),
    );
    if !out.status.success() {
        return None;
    }
    let last = out.stdout.lines().last()?;
    let v: Value = serde_json::from_str(last).expect("status --json last line is JSON");
    let rows = v["peers"]
        .as_array()
        .expect("peers array")
        .iter()
        .map(|p| Row {
            id: p["id"].as_str().unwrap().to_owned(),
            addr: p["addr"].as_str().unwrap().to_owned(),
            state: p["state"].as_str().unwrap().to_owned(),
            stages: p["stages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_u64().unwrap())
                .collect(),
            throughput: p["throughput"].as_f64().unwrap(),
            last_seen_s: p["last_seen_s"].as_f64().unwrap(),
        })
        .collect();
    Some(rows)
}

/// Polls `check` every 200 ms until it returns `Some`, or panics with `what` after `timeout`.
pub(crate) fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// The ids a peer lists with state `state` (sorted).
pub(crate) fn ids_in_state(rows: &[Row], state: &str) -> Vec<String> {
    let mut ids: Vec<String> = rows
        .iter()
        .filter(|r| r.state == state)
        .map(|r| r.id.clone())
        .collect();
    ids.sort();
    ids
}
