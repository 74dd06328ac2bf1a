//! `cargo bench -p swarm-model --bench model`: the default run's micro-batch timings, the same
//! measurement as `swarm bench model` without building the CLI. Pass a run config path to time
//! another model.

#[allow(unsafe_code)] // set_var before any thread exists: see the SAFETY comment inside
fn main() {
    // Same short candle pool spin as the CLI (see tools/src/cmd/train.rs): on a shared machine
    // the default long spin slows backward by a third.
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // SAFETY: single-threaded at this point.
        unsafe { std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "50") };
    }
    let cfg = match std::env::args().skip(1).find(|a| a.ends_with(".toml")) {
        Some(p) => swarm_model::RunConfig::from_file(std::path::Path::new(&p)).expect("run config"),
        None => swarm_model::RunConfig::default(),
    };
    let r = swarm_model::bench::bench_model(&cfg, 2, 8).expect("bench");
    println!("{}", serde_json::to_string_pretty(&r).expect("json"));
}
