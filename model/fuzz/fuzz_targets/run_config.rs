//! `RunConfig::from_toml` on arbitrary text: configs come from users and from other peers, so a
//! malformed one must be a typed error, never a panic; an accepted one must validate and
//! round-trip through `to_toml`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use swarm_model::RunConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(cfg) = RunConfig::from_toml(text) {
        cfg.validate().unwrap();
        let again = RunConfig::from_toml(&cfg.to_toml().unwrap()).unwrap();
        assert_eq!(again, cfg);
    }
});
