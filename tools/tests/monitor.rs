//! The monitor of a real `swarm demo` (a trainer and real peer processes on loopback), read by a
//! real headless Chromium from the page's DOM: every stage and peer listed, the step counter and
//! the loss advancing, a SIGKILLed peer shown lost. Also: `/metrics` parsed by a Prometheus text
//! parser and checked against `/api/v1/state`, the Grafana dashboard's metric names against a
//! live scrape, abusive HTTP refused while training goes on, `swarm top`. A screenshot of the
//! page is kept under `target/monitor-browser/`. Only the browser part is skipped (with the
//! reason printed) where Chromium cannot be found. Every wait is bounded.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use swarm_core::trainer::observe::Snapshot;
use swarm_monitor::client::get;
use swarm_testkit::tiny_config;

mod browser;
use browser::{browse, chromium, dump_dom};

const T: Duration = Duration::from_secs(10);

/// Kills the demo (its peers leave when their stdin closes) on every exit path.
struct Demo(Child);

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The text of the element with this id (`<b id="step">12</b>` -> "12").
fn by_id(dom: &str, id: &str) -> String {
    let pat = format!("id=\"{id}\">");
    let i = dom
        .find(&pat)
        .unwrap_or_else(|| panic!("no #{id} in the DOM"))
        + pat.len();
    dom[i..].split('<').next().unwrap().to_string()
}

fn state(a: SocketAddr) -> Snapshot {
    let r = get(a, "/api/v1/state", None, T).unwrap();
    assert_eq!(r.status, 200);
    serde_json::from_slice(&r.body).unwrap()
}

/// Polls the state until `ok` (bounded).
fn wait_state(
    a: SocketAddr,
    what: &str,
    limit: Duration,
    ok: impl Fn(&Snapshot) -> bool,
) -> Snapshot {
    let start = Instant::now();
    loop {
        let s = state(a);
        if ok(&s) {
            return s;
        }
        assert!(
            start.elapsed() < limit,
            "{what}: not within {limit:?}; state at step {}",
            s.progress.step
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn metric(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

fn scrape(a: SocketAddr) -> prometheus_parse::Scrape {
    let r = get(a, "/metrics", None, T).unwrap();
    assert_eq!(r.status, 200);
    prometheus_parse::Scrape::parse(r.text().lines().map(|l| Ok(l.to_string()))).unwrap()
}

/// A scrape and a state of the same publication (retried while the run moves on).
fn consistent(a: SocketAddr) -> (prometheus_parse::Scrape, Snapshot) {
    for _ in 0..50 {
        let m = scrape(a);
        let s = state(a);
        if metric(&m, "swarm_snapshot_seq", &[]) == Some(s.seq as f64) {
            return (m, s);
        }
    }
    panic!("no scrape matched a state in 50 tries");
}

fn raw(a: SocketAddr, req: &[u8]) -> String {
    let mut s = TcpStream::connect_timeout(&a, T).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let _ = s.write_all(req);
    let mut out = Vec::new();
    let _ = s.take(1 << 16).read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn swarm(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_swarm"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_browser_watches_a_demo_through_its_monitor() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(400);
    let path = dir.path().join("run.toml");
    std::fs::write(&path, cfg.to_toml().unwrap()).unwrap();
    let kill_at = 12u64;
    let mut child = Command::new(env!("CARGO_BIN_EXE_swarm"))
        .arg("demo")
        .arg("--config")
        .arg(&path)
        .args(["--steps", "400", "--peers", "4"])
        .args(["--shape", "up=100mbit,down=100mbit,delay=20ms"])
        .args(["--attempt-timeout-s", "10"])
        .args(["--kill-peer-at-step", &kill_at.to_string()])
        .arg("--json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let demo = Demo(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let url = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("the demo prints its monitor URL");
        if let Some(rest) = line.strip_prefix("monitor: ") {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    let a: SocketAddr = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .unwrap();
    assert!(
        a.ip().is_loopback(),
        "the demo's monitor listens on loopback: {a}"
    );

    let first = wait_state(a, "3 steps", Duration::from_secs(300), |s| {
        s.progress.step >= 3
    });
    assert_eq!(first.version, swarm_core::trainer::observe::SCHEMA_VERSION);
    assert_eq!(first.stages.len(), 2);
    assert_eq!(first.peers.len(), 4);
    assert!(first.stages.iter().all(|c| c.health == "healthy"));

    // /metrics agrees with /api/v1/state.
    let (m, s) = consistent(a);
    assert_eq!(metric(&m, "swarm_step", &[]), Some(s.progress.step as f64));
    assert_eq!(metric(&m, "swarm_loss", &[]), s.progress.loss);
    assert_eq!(
        metric(&m, "swarm_tokens_total", &[]),
        Some(s.progress.tokens as f64)
    );
    for c in &s.channels {
        let l = [("channel", c.channel.as_str())];
        assert_eq!(
            metric(&m, "swarm_channel_wire_bytes_total", &l),
            Some(c.wire_bytes as f64)
        );
        assert_eq!(
            metric(&m, "swarm_channel_fp32_bytes_total", &l),
            Some(c.dense_bytes as f64)
        );
    }
    for st in &s.stages {
        let k = st.stage.to_string();
        let l = [("stage", k.as_str())];
        assert_eq!(
            metric(&m, "swarm_stage_serving_replicas", &l),
            Some(st.serving as f64)
        );
    }
    for q in &s.peers {
        let l = [("peer", q.id.as_str()), ("state", q.state.as_str())];
        assert_eq!(metric(&m, "swarm_peer_state", &l), Some(1.0), "{}", q.id);
        if let Some(rtt) = q.rtt_ms {
            let got = metric(&m, "swarm_peer_rtt_seconds", &[("peer", q.id.as_str())]).unwrap();
            assert!((got - rtt / 1e3).abs() < 1e-9);
        }
    }
    // The Grafana dashboard only uses metric names this scrape serves.
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/grafana/swarm.json"))
            .unwrap(),
    )
    .unwrap();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            for name in expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .filter(|w| w.starts_with("swarm_"))
            {
                // Series that only exist once something happened (a ban, an ETA) are allowed
                // to be absent early, but their family must be declared.
                let declared = m.docs.contains_key(name)
                    || m.docs.contains_key(name.trim_end_matches("_total"));
                assert!(declared, "dashboard metric {name} is not served");
            }
        }
    }

    // Abusive HTTP is refused, and training goes on.
    let big = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "b".repeat(64 << 10)
    );
    assert!(raw(a, big.as_bytes()).starts_with("HTTP/1.1 431"));
    assert_eq!(get(a, "/admin", None, T).unwrap().status, 404);
    let post = raw(
        a,
        b"DELETE /api/v1/state HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    let held: Vec<TcpStream> = (0..80).filter_map(|_| TcpStream::connect(a).ok()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let busy = raw(
        a,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(busy.starts_with("HTTP/1.1 503"), "{busy:.120}");
    drop(held);
    // The server frees a slot when it sees the held connection close: wait for that (bounded),
    // as a client honouring the 503's Retry-After would.
    let start = Instant::now();
    while get(a, "/api/v1/state", None, T).unwrap().status == 503 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "slots not freed after the clients left"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = state(a).progress.step;
    wait_state(
        a,
        "training after the abuse",
        Duration::from_secs(120),
        |s| s.progress.step >= before + 2,
    );

    // swarm top: the same state in the terminal, and as JSON.
    let (ok, out, err) = swarm(&["top", &url, "--once"]);
    assert!(ok, "{err}");
    assert!(out.contains("COVERAGE") && out.contains("stage 1"), "{out}");
    for q in &first.peers {
        assert!(
            out.contains(&q.id[..12]),
            "swarm top lacks peer {}",
            &q.id[..12]
        );
    }
    let (ok, out, err) = swarm(&["top", &a.to_string(), "--json"]);
    assert!(ok, "{err}");
    let j: Snapshot = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(j.run.run_id, first.run.run_id);

    let Some(chrome) = chromium() else {
        eprintln!(
            "SKIPPED the browser part: no chromium on PATH (apt-get install chromium, or set SWARM_CHROMIUM)"
        );
        return;
    };
    let profile = tempfile::tempdir().unwrap();
    let dom1 = dump_dom(&chrome, profile.path(), &url);
    let step1: u64 = by_id(&dom1, "step").parse().expect("a step number");
    let loss1: f64 = by_id(&dom1, "loss").parse().expect("a loss");
    let now = state(a);
    for st in &now.stages {
        assert!(
            dom1.contains(&format!("data-stage=\"{}\"", st.stage)),
            "stage {} not on the page",
            st.stage
        );
    }
    for q in &now.peers {
        assert!(
            dom1.contains(&format!("data-peer=\"{}\"", q.id)),
            "peer {} not on the page",
            q.id
        );
    }
    assert!(
        dom1.contains("<svg id=\"loss-plot\"") && dom1.contains("<path"),
        "no loss curve drawn"
    );
    wait_state(a, "2 more steps", Duration::from_secs(120), |s| {
        s.progress.step >= step1 + 2
    });
    let dom2 = dump_dom(&chrome, profile.path(), &url);
    let step2: u64 = by_id(&dom2, "step").parse().unwrap();
    let loss2: f64 = by_id(&dom2, "loss").parse().unwrap();
    assert!(
        step2 > step1,
        "the step counter did not advance: {step1} -> {step2}"
    );
    assert_ne!(
        loss1, loss2,
        "the loss did not change between steps {step1} and {step2}"
    );

    // The peer killed during step `kill_at` turns to lost on the page.
    wait_state(a, "the kill step", Duration::from_secs(300), |s| {
        s.progress.step >= kill_at
    });
    let killed_at = Instant::now();
    let lost_dom = loop {
        let dom = dump_dom(&chrome, profile.path(), &url);
        if dom.contains("data-state=\"lost\"") {
            break dom;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(90),
            "no peer shown lost 90 s after step {kill_at} began"
        );
    };
    let latency = killed_at.elapsed();
    eprintln!(
        "killed peer shown lost {:.1} s after its step began",
        latency.as_secs_f64()
    );
    assert_eq!(lost_dom.matches("data-state=\"lost\"").count(), 1);
    assert!(
        lost_dom.contains("class=\"event ev-lost\""),
        "no lost event listed"
    );

    // Keep a screenshot as the test's artifact.
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("monitor-browser");
    std::fs::create_dir_all(&shots).unwrap();
    let png = shots.join("page.png");
    let _ = std::fs::remove_file(&png);
    browse(
        &chrome,
        profile.path(),
        &[
            format!("--screenshot={}", png.display()),
            "--window-size=1400,1800".into(),
        ],
        &url,
    );
    let bytes = std::fs::read(&png).expect("chromium wrote the screenshot");
    assert!(bytes.starts_with(b"\x89PNG"), "not a PNG");
    eprintln!("screenshot: {}", png.display());
    drop(demo);
}

#[test]
fn a_public_monitor_needs_the_flag_and_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(1);
    let path = dir.path().join("run.toml");
    std::fs::write(&path, cfg.to_toml().unwrap()).unwrap();
    let p = path.to_str().unwrap();
    let base = ["train", "--config", p, "--listen", "127.0.0.1:0"];
    let (ok, _, err) = swarm(&[&base[..], &["--http", "0.0.0.0:0"]].concat());
    assert!(!ok && err.contains("not a loopback address"), "{err}");
    let (ok, _, err) = swarm(&[&base[..], &["--http", "0.0.0.0:0", "--http-public"]].concat());
    assert!(!ok && err.contains("bearer token"), "{err}");
}

/// A `swarm join` process, killed and reaped on drop, with its output lines on channels.
struct Joined {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
}

impl Drop for Joined {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lines(r: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn join(data: &Path, extra: &[&str]) -> Joined {
    let mut child = Command::new(env!("CARGO_BIN_EXE_swarm"))
        .arg("join")
        .args(extra)
        .args(["--listen", "127.0.0.1:0", "--json", "--data-dir"])
        .arg(data)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = lines(child.stdout.take().unwrap());
    let stderr = lines(child.stderr.take().unwrap());
    Joined {
        child,
        stdout,
        stderr,
    }
}

/// The first line of `rx` that parses as a JSON object (the start-up line under `--json`).
fn first_json(rx: &mpsc::Receiver<String>) -> serde_json::Value {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let left = end.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("a JSON start-up line within 60 s");
        if let Ok(v @ serde_json::Value::Object(_)) = serde_json::from_str(&line) {
            return v;
        }
    }
}

#[test]
fn a_volunteers_page_shows_the_verdict_of_its_reachability_check() {
    let dir = tempfile::tempdir().unwrap();
    let first = join(&dir.path().join("a"), &[]);
    let started = first_json(&first.stdout);
    let addr = started["addr"].as_str().unwrap().to_string();
    let second = join(
        &dir.path().join("b"),
        &[addr.as_str(), "--metrics", "127.0.0.1:0"],
    );
    let started = first_json(&second.stdout);
    let reach = started["reach"]
        .as_str()
        .expect("a joiner is checked by the swarm's first peer")
        .to_string();
    // On loopback the check's dial-back from another socket succeeds.
    assert_eq!(reach, "public", "{started}");
    let url = loop {
        let line = second
            .stderr
            .recv_timeout(Duration::from_secs(60))
            .expect("join prints its metrics URL");
        if let Some(rest) = line.strip_prefix("metrics: ") {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    let a: SocketAddr = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .unwrap();
    let r = get(a, "/api/v1/state", None, T).unwrap();
    assert_eq!(r.status, 200);
    let v: swarm_monitor::VolunteerState = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v.reachability, reach);
    let m = get(a, "/metrics", None, T).unwrap();
    assert!(
        String::from_utf8_lossy(&m.body).contains("reachability=\"public\""),
        "the volunteer's metrics carry the verdict"
    );
}
