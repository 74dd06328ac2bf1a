//! Fuzzes the ledger reader (`swarm_core::ledger`): arbitrary bytes, and a valid ledger with the
//! input spliced into it, must never panic; whatever parses must re-encode to the same bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use swarm_core::ledger;

fuzz_target!(|data: &[u8]| {
    let _ = ledger::verify(data, &ledger::Expect::default());
    // Behind a valid header the fuzzer reaches the entry decoders at once.
    let mut framed = ledger::MAGIC.to_vec();
    framed.extend_from_slice(&ledger::VERSION.to_le_bytes());
    framed.extend_from_slice(data);
    if let Ok(entries) = ledger::parse(&framed) {
        let mut again = framed[..10].to_vec();
        for e in &entries {
            let b = e.to_bytes();
            again.extend_from_slice(&(b.len() as u32).to_le_bytes());
            again.extend_from_slice(&b);
        }
        assert_eq!(again, framed, "a ledger entry decoded non-canonically");
    }
    let _ = ledger::verify(&framed, &ledger::Expect::default());
});
