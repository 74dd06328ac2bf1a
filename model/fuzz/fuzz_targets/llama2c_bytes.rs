//! llama2.c `.bin` parsing on hostile bytes: header caps and the exact length check come first.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(parsed) = swarm_model::llama2c::parse(data) {
        let _ = parsed.to_hf();
    }
});
