//! Fuzz the token-id section decoder (a subspace boundary's ids): the raw input as a section, and
//! a valid section of ids drawn from the input with input-chosen bytes flipped. It must return
//! `Ok` with at most the cap of ids, each within the vocabulary, or a typed error; never panic or
//! allocate beyond the cap.
#![no_main]

use libfuzzer_sys::fuzz_target;
use swarm_compression::{decode_tokens, encode_tokens};

fuzz_target!(|data: &[u8]| {
    let check = |bytes: &[u8]| {
        if let Ok((ids, used)) = decode_tokens(bytes, 4096, 50_000) {
            assert!(ids.len() <= 4096 && ids.iter().all(|&t| t < 50_000));
            assert!(used <= bytes.len());
        }
    };
    check(data);
    let ids: Vec<u32> = data
        .chunks(2)
        .map(|c| u32::from(c[0]) * 190 + u32::from(*c.get(1).unwrap_or(&0)))
        .collect();
    let mut section = Vec::new();
    encode_tokens(&ids, &mut section).unwrap();
    for (i, &b) in data.iter().enumerate().take(8) {
        let at = (b as usize * 31 + i) % section.len();
        section[at] ^= b | 1;
    }
    check(&section);
});
