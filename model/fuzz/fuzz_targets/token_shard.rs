//! Token shard headers (ours and llm.c's) and manifest.json on hostile bytes: whatever is
//! accepted must read back within its bounds, with ids checked, and never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use swarm_model::shards::{Manifest, TokenShard};

fuzz_target!(|data: &[u8]| {
    let _ = Manifest::parse(data);
    if let Ok(s) = TokenShard::from_bytes(data.to_vec(), "fuzz") {
        let n = s.len();
        let mut out = Vec::new();
        let _ = s.read(0, n.min(1 << 16) as usize, &mut out);
        let _ = s.read(n / 2, 3, &mut out);
        let _ = s.read(n, 1, &mut out);
        let _ = s.read(u64::MAX - 1, 2, &mut out);
    }
});
