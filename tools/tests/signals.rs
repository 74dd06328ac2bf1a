//! Process-level tests of stopping (issue #16): SIGTERM stops `swarm demo` the way Ctrl-C does
//! (its peer processes are killed and reaped before it exits), and a demo that dies without a
//! word (SIGKILL) leaves no peer running for more than a few seconds: each peer sees its control
//! stdin end and leaves at once. Every wait is bounded; every process is killed at the end.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Pids of the live (non-zombie) children of `parent`, from /proc.
fn children_of(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Some((ppid, state)) = stat(pid)
            && ppid == parent
            && state != 'Z'
        {
            out.push(pid);
        }
    }
    out
}

/// (parent pid, state) of `pid`, or None once it is gone.
fn stat(pid: u32) -> Option<(u32, char)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields follow the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let mut f = rest.split(' ');
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    Some((ppid, state))
}

fn alive(pid: u32) -> bool {
    stat(pid).is_some_and(|(_, s)| s != 'Z')
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

/// Kills every pid still alive (cleanup when an assertion failed).
struct Reaper(Vec<u32>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for &p in &self.0 {
            if alive(p) {
                let _ = Command::new("kill")
                    .args(["-KILL", &p.to_string()])
                    .status();
            }
        }
    }
}

/// A demo process, killed and reaped on drop.
struct Demo {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a long `swarm demo` (tiny model, many steps) and waits, bounded, until its 4 peer
/// processes run and it has trained a step (its first progress line).
fn start_demo() -> (Demo, Vec<u32>) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = swarm_model::RunConfig::default();
    cfg.model.hidden_size = 32;
    cfg.model.intermediate_size = 64;
    cfg.model.num_attention_heads = 4;
    cfg.model.num_key_value_heads = Some(2);
    cfg.model.max_position_embeddings = 32;
    cfg.stages = vec![0, 1, 2];
    cfg.train.steps = 100_000;
    cfg.train.micro_batches = 2;
    cfg.train.micro_batch_size = 2;
    cfg.train.seq_len = 16;
    cfg.validate().unwrap();
    let path = dir.path().join("run.toml");
    std::fs::write(&path, cfg.to_toml().unwrap()).unwrap();
    let demo = Command::new(env!("CARGO_BIN_EXE_swarm"))
        .arg("demo")
        .arg("--config")
        .arg(&path)
        .args(["--steps", "100000", "--peers", "4"])
        .args(["--shape", "up=1gbit,down=1gbit,delay=1ms"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let demo = Demo {
        child: demo,
        _dir: dir,
    };
    let pid = demo.child.id();
    let start = Instant::now();
    loop {
        let peers = children_of(pid);
        if peers.len() == 4 {
            // Give them time to join and train: the signal must find a running swarm.
            std::thread::sleep(Duration::from_secs(3));
            return (demo, children_of(pid));
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the demo started {} of 4 peers in 120 s",
            peers.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_gone(pids: &[u32], limit: Duration) -> Result<Duration, Vec<u32>> {
    let start = Instant::now();
    loop {
        let live: Vec<u32> = pids.iter().copied().filter(|&p| alive(p)).collect();
        if live.is_empty() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            return Err(live);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sigterm_stops_the_demo_and_its_peers_like_ctrl_c() {
    let (mut demo, peers) = start_demo();
    let _reaper = Reaper(peers.clone());
    assert_eq!(peers.len(), 4, "{peers:?}");
    signal(demo.child.id(), "-TERM");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = demo.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the demo still runs 20 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // It stopped the way Ctrl-C stops it: an "interrupted" error, not death by the signal.
    assert_eq!(status.code(), Some(1), "{status:?}");
    // Its peers were killed and reaped before it exited.
    let left: Vec<u32> = peers.iter().copied().filter(|&p| alive(p)).collect();
    assert!(left.is_empty(), "peers outlived the demo: {left:?}");
}

#[test]
fn peers_leave_within_seconds_when_the_demo_is_killed() {
    let (mut demo, peers) = start_demo();
    let _reaper = Reaper(peers.clone());
    signal(demo.child.id(), "-KILL");
    let _ = demo.child.wait();
    // Nobody killed the peers: each saw its control stdin end (and its trainer vanish).
    match wait_gone(&peers, Duration::from_secs(10)) {
        Ok(took) => eprintln!("peers gone {took:?} after the demo died"),
        Err(live) => panic!("peers still running 10 s after the demo died: {live:?}"),
    }
}
