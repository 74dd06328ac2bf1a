//! `tokenizer.json` parsing on hostile bytes, then encode/decode with whatever was accepted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use swarm_model::Tokenizer;
use swarm_model::tokenizer_bpe::BpeTokenizer;

fuzz_target!(|data: &[u8]| {
    if let Ok(t) = BpeTokenizer::from_json(data) {
        let ids = t.encode("Once upon a time, ünï 42 'll\n\n  x");
        let _ = t.decode(&ids);
        let _ = t.decode(&[0, 1, u32::MAX]);
    }
});
