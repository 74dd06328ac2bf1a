//! Explore simulator settings: `cargo run --release -p swarm-router --example tune -- KEY=VALUE...`
//! (keys: peers stages churn seed duration warmup noise cands inflight detect).

use swarm_router::sim::{self, NoObserver, SimConfig};

fn main() {
    let mut kv = std::collections::HashMap::new();
    for a in std::env::args().skip(1) {
        if let Some((k, v)) = a.split_once('=') {
            kv.insert(k.to_string(), v.parse::<f64>().expect("numeric value"));
        }
    }
    let get = |k: &str, d: f64| kv.get(k).copied().unwrap_or(d);
    let mut cfg = SimConfig::new(
        get("peers", 1000.0) as usize,
        get("stages", 8.0) as u16,
        get("churn", 10.0),
        get("seed", 0.0) as u64,
    );
    cfg.duration_s = get("duration", cfg.duration_s);
    cfg.warmup_s = get("warmup", cfg.warmup_s);
    cfg.measurement_noise = get("noise", cfg.measurement_noise);
    cfg.plan.candidates_per_stage = get("cands", cfg.plan.candidates_per_stage as f64) as usize;
    cfg.in_flight_per_peer = get("inflight", cfg.in_flight_per_peer);
    cfg.detect_timeout_s = get("detect", cfg.detect_timeout_s);
    let r = sim::run(&cfg, &mut NoObserver).expect("simulation runs");
    println!("{r:?}");
}
