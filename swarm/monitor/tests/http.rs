//! The monitor's HTTP server in-process, over real loopback sockets: routes, the bearer token on
//! a public bind, refusals of malformed and abusive requests, and `/metrics` parsed by a real
//! Prometheus text parser against the JSON state.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use swarm_core::trainer::observe::{
    ChannelBytes, PeerRow, Progress, ReplicaRow, SCHEMA_VERSION, Snapshot, StageCoverage,
};
use swarm_monitor::client::get;
use swarm_monitor::{HttpConfig, Monitor, Source, VolunteerState};
use tokio::sync::watch;

const T: Duration = Duration::from_secs(10);

fn snapshot() -> Snapshot {
    let mut s = Snapshot {
        version: SCHEMA_VERSION,
        seq: 7,
        ..Snapshot::default()
    };
    s.run.phase = "running".into();
    s.progress = Progress {
        step: 5,
        total_steps: 30,
        loss: Some(2.5),
        lr: Some(1e-3),
        tokens_per_s: 1234.5,
        tokens: 20480,
        ..Progress::default()
    };
    s.stages = vec![
        StageCoverage {
            stage: 0,
            layers: [0, 2],
            replicas: vec![ReplicaRow {
                peer: "aa".repeat(32),
                state: "serving".into(),
                load: 2,
            }],
            serving: 1,
            health: "thin".into(),
        },
        StageCoverage {
            stage: 1,
            layers: [2, 4],
            replicas: Vec::new(),
            serving: 0,
            health: "broken".into(),
        },
    ];
    s.peers = vec![
        PeerRow {
            id: "aa".repeat(32),
            addr: "127.0.0.1:9".into(),
            stage: Some(0),
            state: "serving".into(),
            path: "direct".into(),
            rtt_ms: Some(12.5),
            tx_bytes: Some(1000),
            rx_bytes: Some(2000),
            audits_passed: 3,
            audits_failed: 0,
            // A hostile version string: label values must be escaped in the exposition.
            version: Some("v1\"}\n<script>alert(1)</script>".into()),
            ..PeerRow::default()
        },
        PeerRow {
            id: "bb".repeat(32),
            state: "lost".into(),
            path: "direct".into(),
            stage: Some(1),
            ..PeerRow::default()
        },
    ];
    s.channels = ["activations", "gradients", "sync", "state"]
        .iter()
        .enumerate()
        .map(|(i, c)| ChannelBytes {
            channel: (*c).into(),
            wire_bytes: 100 * (i as u64 + 1),
            dense_bytes: 1000 * (i as u64 + 1),
            frames: i as u64,
        })
        .collect();
    s
}

async fn serve(cfg: HttpConfig) -> (Monitor, watch::Sender<Arc<Snapshot>>) {
    let (tx, rx) = watch::channel(Arc::new(snapshot()));
    let m = Monitor::start(cfg, Source::Trainer(rx)).await.unwrap();
    (m, tx)
}

fn lo(m: &Monitor) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], m.local_addr().port()))
}

/// Sends raw bytes and reads the answer (bounded).
fn raw(addr: SocketAddr, req: &[u8]) -> String {
    let mut s = TcpStream::connect_timeout(&addr, T).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let _ = s.write_all(req);
    let mut out = Vec::new();
    let _ = s.take(1 << 20).read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn blocking<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    std::thread::spawn(f).join().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_serve_the_page_the_state_and_metrics() {
    let (m, tx) = serve(HttpConfig::new("127.0.0.1:0".parse().unwrap())).await;
    let a = lo(&m);
    let (page, state, metrics, missing, post) = blocking(move || {
        (
            get(a, "/", None, T).unwrap(),
            get(a, "/api/v1/state", None, T).unwrap(),
            get(a, "/metrics", None, T).unwrap(),
            get(a, "/nope/../etc", None, T).unwrap(),
            raw(a, b"POST /api/v1/state HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
        )
    });
    assert_eq!(page.status, 200);
    assert!(
        page.header("content-type")
            .unwrap()
            .starts_with("text/html")
    );
    let html = page.text();
    // Self-contained: the script is inline and nothing is fetched from elsewhere.
    assert!(html.contains("api/v1/state") && !html.contains("/*__APP_JS__*/"));
    assert!(!html.contains("https://") && !html.contains("<script src") && !html.contains("<link"));
    // The only absolute URL is the SVG namespace, an identifier that is never fetched.
    assert_eq!(
        html.matches("http://").count(),
        html.matches("http://www.w3.org/2000/svg").count()
    );
    assert_eq!(state.status, 200);
    let back: Snapshot = serde_json::from_slice(&state.body).unwrap();
    assert_eq!(back, snapshot());
    assert_eq!(metrics.status, 200);
    assert!(
        metrics
            .header("content-type")
            .unwrap()
            .contains("version=0.0.4")
    );
    assert_eq!(missing.status, 404);
    assert!(missing.text().contains("/api/v1/state"));
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");

    // A new publication is what the next request serves.
    let mut next = snapshot();
    next.seq = 8;
    next.progress.step = 6;
    tx.send_replace(Arc::new(next.clone()));
    let state = blocking(move || get(a, "/api/v1/state", None, T).unwrap());
    let back: Snapshot = serde_json::from_slice(&state.body).unwrap();
    assert_eq!(back.progress.step, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_match_the_state() {
    let (m, _tx) = serve(HttpConfig::new("127.0.0.1:0".parse().unwrap())).await;
    let a = lo(&m);
    let text = blocking(move || get(a, "/metrics", None, T).unwrap().text());
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    let value = |name: &str, labels: &[(&str, &str)]| -> f64 {
        let s = scrape
            .samples
            .iter()
            .find(|s| {
                s.metric == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(k).is_some_and(|x| x == *v))
            })
            .unwrap_or_else(|| panic!("{name} {labels:?} missing in:\n{text}"));
        match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => panic!("{name}: unexpected type"),
        }
    };
    let s = snapshot();
    assert_eq!(value("swarm_step", &[]), s.progress.step as f64);
    assert_eq!(value("swarm_loss", &[]), 2.5);
    assert_eq!(value("swarm_tokens_total", &[]), 20480.0);
    assert_eq!(value("swarm_tokens_per_second", &[]), 1234.5);
    for c in &s.channels {
        let l = [("channel", c.channel.as_str())];
        assert_eq!(
            value("swarm_channel_wire_bytes_total", &l),
            c.wire_bytes as f64
        );
        assert_eq!(
            value("swarm_channel_fp32_bytes_total", &l),
            c.dense_bytes as f64
        );
    }
    assert_eq!(value("swarm_stage_broken", &[("stage", "1")]), 1.0);
    assert_eq!(
        value("swarm_stage_serving_replicas", &[("stage", "0")]),
        1.0
    );
    let aa = "aa".repeat(32);
    assert_eq!(
        value("swarm_peer_state", &[("peer", &aa), ("state", "serving")]),
        1.0
    );
    assert_eq!(value("swarm_peer_rtt_seconds", &[("peer", &aa)]), 0.0125);
    assert_eq!(
        value("swarm_peer_audits_passed_total", &[("peer", &aa)]),
        3.0
    );
    assert_eq!(
        value(
            "swarm_peer_state",
            &[("peer", &"bb".repeat(32)), ("state", "lost")]
        ),
        1.0
    );
    // No series without a value (the lost peer has no RTT).
    assert!(
        !scrape
            .samples
            .iter()
            .any(|x| x.metric == "swarm_peer_rtt_seconds"
                && x.labels.get("peer") == Some(&"bb".repeat(32)))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_bind_needs_the_token() {
    let mut cfg = HttpConfig::new("0.0.0.0:0".parse().unwrap());
    assert!(
        Monitor::start(
            cfg.clone(),
            Source::Trainer(watch::channel(Arc::new(snapshot())).1)
        )
        .await
        .is_err()
    );
    cfg.allow_public = true;
    assert!(
        Monitor::start(
            cfg.clone(),
            Source::Trainer(watch::channel(Arc::new(snapshot())).1)
        )
        .await
        .is_err()
    );
    let token = "s3cret-token-0123456789";
    cfg.token = Some(token.into());
    let (m, _tx) = serve(cfg).await;
    let a = lo(&m);
    let (none, wrong, good, page, query, missing) = blocking(move || {
        (
            get(a, "/api/v1/state", None, T).unwrap(),
            get(a, "/metrics", Some("s3cret-token-0123456780"), T).unwrap(),
            get(a, "/metrics", Some(token), T).unwrap(),
            get(a, "/", None, T).unwrap(),
            get(a, &format!("/api/v1/state?token={token}"), None, T).unwrap(),
            get(a, "/unknown", None, T).unwrap(),
        )
    });
    assert_eq!(none.status, 401);
    assert_eq!(none.header("www-authenticate"), Some("Bearer"));
    assert!(none.text().contains("bearer token"));
    assert_eq!(wrong.status, 401);
    assert_eq!(good.status, 200);
    assert_eq!(page.status, 401);
    assert_eq!(query.status, 200);
    assert_eq!(missing.status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abusive_requests_are_refused_and_the_server_keeps_answering() {
    let mut cfg = HttpConfig::new("127.0.0.1:0".parse().unwrap());
    cfg.max_connections = 8;
    cfg.header_timeout = Duration::from_secs(1);
    let (m, _tx) = serve(cfg).await;
    let a = lo(&m);
    blocking(move || {
        // Oversized headers: 431.
        let big = format!(
            "GET /api/v1/state HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "a".repeat(64 * 1024)
        );
        let r = raw(a, big.as_bytes());
        assert!(r.starts_with("HTTP/1.1 431"), "{r:.200}");
        // Too many headers: 431.
        let mut many = String::from("GET / HTTP/1.1\r\nHost: x\r\n");
        for i in 0..200 {
            many.push_str(&format!("X-{i}: y\r\n"));
        }
        many.push_str("\r\n");
        let r = raw(a, many.as_bytes());
        assert!(r.starts_with("HTTP/1.1 431"), "{r:.200}");
        // Garbage: 400.
        let r = raw(a, b"\x00\x01\x02 not http\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 400") || r.is_empty(), "{r:.200}");
        // Many connections held open: beyond the cap each is answered 503.
        let held: Vec<TcpStream> = (0..8).map(|_| TcpStream::connect(a).unwrap()).collect();
        std::thread::sleep(Duration::from_millis(200));
        let r = raw(a, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 503"), "{r:.200}");
        assert!(r.contains("too many connections"));
        // Slow clients are dropped after the header timeout, which frees their slots.
        std::thread::sleep(Duration::from_millis(1600));
        drop(held);
        let ok = get(a, "/api/v1/state", None, T).unwrap();
        assert_eq!(ok.status, 200);
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volunteer_serves_its_own_page_and_metrics() {
    let state = VolunteerState {
        version: swarm_monitor::VOLUNTEER_SCHEMA_VERSION,
        seq: 3,
        peer_id: "cc".repeat(32),
        stage: Some(1),
        state: "serving".into(),
        forwards: 40,
        backwards: 38,
        reachability: "unknown".into(),
        ..VolunteerState::default()
    };
    let (_tx, rx) = watch::channel(Arc::new(state.clone()));
    let m = Monitor::start(
        HttpConfig::new("127.0.0.1:0".parse().unwrap()),
        Source::Volunteer(rx),
    )
    .await
    .unwrap();
    let a = lo(&m);
    let (page, json, metrics) = blocking(move || {
        (
            get(a, "/", None, T).unwrap(),
            get(a, "/api/v1/state", None, T).unwrap(),
            get(a, "/metrics", None, T).unwrap().text(),
        )
    });
    assert!(page.text().contains("swarm volunteer"));
    let back: VolunteerState = serde_json::from_slice(&json.body).unwrap();
    assert_eq!(back, state);
    let scrape =
        prometheus_parse::Scrape::parse(metrics.lines().map(|l| Ok(l.to_string()))).unwrap();
    let fwd = scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == "swarm_volunteer_passes_total" && s.labels.get("pass") == Some("forward")
        })
        .unwrap();
    assert!(matches!(fwd.value, prometheus_parse::Value::Counter(v) if v == 40.0));
    // Audits and credit are not reported back yet: no series rather than a made-up zero.
    assert!(
        !scrape.samples.iter().any(
            |s| s.metric.starts_with("swarm_volunteer_audits") || s.metric.contains("credited")
        )
    );
    assert!(metrics.contains("reachability=\"unknown\""));
}

/// Metric names in the PromQL expressions of a Grafana dashboard (identifiers starting with
/// `swarm_`; label names, functions and legends are not).
pub fn dashboard_metrics(dashboard: &serde_json::Value) -> Vec<String> {
    let mut names = Vec::new();
    for p in dashboard["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().expect("targets") {
            let expr = t["expr"].as_str().expect("expr");
            let mut cur = String::new();
            for ch in expr.chars().chain(std::iter::once(' ')) {
                if ch.is_ascii_alphanumeric() || ch == '_' || ch == ':' {
                    cur.push(ch);
                } else {
                    if cur.starts_with("swarm_") && !names.contains(&cur) {
                        names.push(cur.clone());
                    }
                    cur.clear();
                }
            }
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grafana_dashboard_uses_only_served_metrics() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tools/grafana/swarm.json"
    );
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert!(dash["title"].is_string() && dash["schemaVersion"].is_u64());
    let panels = dash["panels"].as_array().unwrap();
    let mut ids: Vec<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), panels.len(), "panel ids must be unique");
    for p in panels {
        assert!(p["type"].is_string() && p["gridPos"]["w"].is_u64());
        for t in p["targets"].as_array().unwrap() {
            // Balanced brackets: a cheap syntax check of the PromQL.
            let e = t["expr"].as_str().unwrap();
            for (o, c) in [('(', ')'), ('[', ']'), ('{', '}')] {
                assert_eq!(e.matches(o).count(), e.matches(c).count(), "{e}");
            }
        }
    }
    let names = dashboard_metrics(&dash);
    assert!(names.len() >= 15, "{names:?}");

    // Every metric exists in a scrape of a state with every field set.
    let (m, _tx) = serve(HttpConfig::new("127.0.0.1:0".parse().unwrap())).await;
    let a = lo(&m);
    let mut full = snapshot();
    full.progress.eta_s = Some(10.0);
    full.peers[0].load = Some(1);
    full.peers[0].throughput_tokens_per_s = Some(100.0);
    full.peers[0].last_seen_s = Some(0.5);
    full.audits.banned = vec!["bb".repeat(32)];
    _tx.send_replace(Arc::new(full));
    let text = blocking(move || get(a, "/metrics", None, T).unwrap().text());
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    for n in &names {
        assert!(
            scrape.samples.iter().any(|s| &s.metric == n),
            "the dashboard uses {n}, which /metrics does not serve"
        );
    }
}

/// The monitor on a thread of its own (as `swarm train --http` and `swarm demo` run it): it
/// serves without any runtime of the caller's, the kernel's count of its CPU time grows with
/// the requests it answers, and dropping it stops it and frees its port.
#[test]
fn a_monitor_on_its_own_thread_serves_counts_its_cpu_and_stops_when_dropped() {
    let (_tx, rx) = watch::channel(Arc::new(snapshot()));
    let m = Monitor::start_on_own_thread(
        HttpConfig::new("127.0.0.1:0".parse().unwrap()),
        Source::Trainer(rx),
    )
    .unwrap();
    let a = lo(&m);
    let before = m.cpu_seconds().expect("a thread's CPU time on Linux");
    for _ in 0..50 {
        let r = get(a, "/metrics", None, T).unwrap();
        assert_eq!(r.status, 200);
        let r = get(a, "/api/v1/state", None, T).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(serde_json::from_slice::<Snapshot>(&r.body).unwrap().seq, 7);
    }
    let after = m.cpu_seconds().unwrap();
    assert!(
        after > before,
        "serving 100 requests took no CPU: {before} -> {after}"
    );
    drop(m);
    // The port is free again: binding it succeeds (the listener is gone with the thread).
    std::net::TcpListener::bind(a).expect("the monitor's port is free after drop");
    // And a monitor on the caller's runtime does not claim a thread's count.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (m, _tx) = rt.block_on(serve(HttpConfig::new("127.0.0.1:0".parse().unwrap())));
    assert!(m.cpu_seconds().is_none());
}
