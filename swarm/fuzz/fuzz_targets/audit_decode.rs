//! Fuzzes the audit message decoders (`swarm_core::receipt`): for each audit kind, the bytes are
//! decoded as that kind's body; nothing may panic, and whatever decodes must re-encode to exactly
//! the same bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use swarm_core::receipt::{KINDS, roundtrip_any};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let kind = KINDS.kinds[selector as usize % KINDS.kinds.len()].kind;
    if let Some(Ok(again)) = roundtrip_any(kind, body) {
        assert_eq!(again, body, "non-canonical body accepted for kind {kind}");
    }
});
