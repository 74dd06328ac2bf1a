//! The contribution ledger: a written ledger verifies, and `verify` catches an edited entry, a
//! deleted one, a reordering, a forged signature, a swapped key, and (with a known head) a
//! truncated tail. Malformed files are refused with typed errors, never a panic.

use swarm_core::Identity;
use swarm_core::ledger::{
    self, Body, Entry, Expect, Head, LedgerError, LedgerWriter, credits, record_ranges,
};
use swarm_core::membership::RunId;

fn peer(i: u8) -> swarm_core::PeerId {
    Identity::from_secret([i; 32]).peer_id()
}

/// A ledger with work, audits and a ban: returns (bytes, trainer identity, run).
fn sample() -> (Vec<u8>, Identity, RunId, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger");
    let id = Identity::from_secret([9; 32]);
    let run = RunId([3; 16]);
    let mut w = LedgerWriter::open(&path, id.clone(), run, 1).unwrap();
    for step in 0..3u64 {
        for p in 1..=3u8 {
            w.append(
                Body::Work {
                    peer: peer(p),
                    step,
                    stage: (p % 2) as u32,
                    micro_batches: 4,
                    tokens_layers: 4 * 64 * 2,
                },
                10 + step,
            )
            .unwrap();
        }
        w.append(
            Body::Audit {
                peer: peer(1),
                step,
                mb: 2,
                stage: 1,
                auditor: peer(3),
                referee: None,
                passed: true,
                distance: 0.0,
                tolerance: 1e-3,
            },
            11 + step,
        )
        .unwrap();
    }
    w.append(
        Body::Audit {
            peer: peer(2),
            step: 2,
            mb: 1,
            stage: 0,
            auditor: peer(4),
            referee: Some(peer(5)),
            passed: false,
            distance: 0.4,
            tolerance: 1e-3,
        },
        20,
    )
    .unwrap();
    w.append(
        Body::Ban {
            peer: peer(2),
            step: 2,
            reason: "forward output differs from two replicas".into(),
            evidence: [7; 32],
        },
        21,
    )
    .unwrap();
    w.sync().unwrap();
    drop(w);
    let bytes = std::fs::read(&path).unwrap();
    (bytes, id, run, dir)
}

#[test]
fn a_written_ledger_verifies_and_reopens() {
    let (bytes, id, run, dir) = sample();
    let v = ledger::verify(&bytes, &Expect::default()).unwrap();
    assert_eq!(v.trainer, id.peer_id());
    assert_eq!(v.run, run);
    assert_eq!(v.entries.len(), 1 + 3 * 4 + 2);
    assert_eq!(v.head.seq, 14);
    // Reopening continues the chain.
    let path = dir.path().join("ledger");
    let mut w = LedgerWriter::open(&path, id.clone(), run, 30).unwrap();
    assert_eq!(w.head(), v.head);
    let h = w
        .append(
            Body::Work {
                peer: peer(1),
                step: 3,
                stage: 1,
                micro_batches: 1,
                tokens_layers: 1,
            },
            31,
        )
        .unwrap();
    drop(w);
    let v2 = ledger::verify(&std::fs::read(&path).unwrap(), &Expect::default()).unwrap();
    assert_eq!(v2.head, h);
    assert_eq!(h.seq, 15);
    // Another key or run cannot append to it.
    assert!(LedgerWriter::open(&path, Identity::from_secret([8; 32]), run, 0).is_err());
    assert!(LedgerWriter::open(&path, id, RunId([4; 16]), 0).is_err());
}

#[test]
fn credit_counts_only_audited_work_of_unbanned_peers() {
    let (bytes, _, _, _dir) = sample();
    let v = ledger::verify(&bytes, &Expect::default()).unwrap();
    let c = credits(&v.entries);
    let get = |p| c.iter().find(|c| c.peer == peer(p)).unwrap().clone();
    // Peer 1: audited after each step's work: all of it credited.
    let p1 = get(1);
    assert_eq!(
        (p1.credited_micro_batches, p1.pending_micro_batches),
        (12, 0)
    );
    assert_eq!(p1.audits_passed, 3);
    // Peer 3: never audited: all pending.
    let p3 = get(3);
    assert_eq!(
        (p3.credited_micro_batches, p3.pending_micro_batches),
        (0, 12)
    );
    // Peer 2: banned: everything voided.
    let p2 = get(2);
    assert!(p2.banned);
    assert_eq!(p2.audits_failed, 1);
    assert_eq!(
        (
            p2.credited_micro_batches,
            p2.pending_micro_batches,
            p2.voided_micro_batches
        ),
        (0, 0, 12)
    );
}

fn reassemble(bytes: &[u8], order: &[usize]) -> Vec<u8> {
    let r = record_ranges(bytes).unwrap();
    let mut out = bytes[..r[0].0].to_vec();
    for &i in order {
        out.extend_from_slice(&bytes[r[i].0..r[i].1]);
    }
    out
}

#[test]
fn verify_catches_an_edit() {
    let (bytes, _, _, _d) = sample();
    let r = record_ranges(&bytes).unwrap();
    // Change the micro-batch count of entry 2 (a Work entry): the last 64 bytes are the
    // signature, the 8 + 4 bytes before them are tokens_layers and micro_batches.
    let mut edited = bytes.clone();
    let at = r[2].1 - 64 - 8 - 4;
    edited[at] ^= 0x10;
    let e = ledger::verify(&edited, &Expect::default()).unwrap_err();
    assert_eq!(e, LedgerError::BadSignature { index: 2 });
    // Positive control: the untouched file verifies.
    ledger::verify(&bytes, &Expect::default()).unwrap();
}

#[test]
fn verify_catches_a_deletion() {
    let (bytes, _, _, _d) = sample();
    let n = record_ranges(&bytes).unwrap().len();
    let order: Vec<usize> = (0..n).filter(|&i| i != 5).collect();
    let e = ledger::verify(&reassemble(&bytes, &order), &Expect::default()).unwrap_err();
    assert_eq!(e, LedgerError::BadSeq { index: 5, seq: 6 });
}

#[test]
fn verify_catches_a_reordering() {
    let (bytes, _, _, _d) = sample();
    let n = record_ranges(&bytes).unwrap().len();
    let mut order: Vec<usize> = (0..n).collect();
    order.swap(3, 4);
    let e = ledger::verify(&reassemble(&bytes, &order), &Expect::default()).unwrap_err();
    assert_eq!(e, LedgerError::BadSeq { index: 3, seq: 4 });
}

/// Rewrites entry `i` with `f` and re-signs it with `key`, keeping the chain consistent after it
/// (every later entry re-chained and re-signed too when `resign_rest`).
fn forge(bytes: &[u8], key: &Identity, from: usize, f: impl Fn(&mut Entry)) -> Vec<u8> {
    let mut entries = ledger::parse(bytes).unwrap();
    f(&mut entries[from]);
    let mut prev = if from == 0 {
        [0; 32]
    } else {
        entries[from - 1].hash()
    };
    for e in entries.iter_mut().skip(from) {
        e.prev = prev;
        let mut m = b"swarm-ledger-v1".to_vec();
        let sig_at = e.to_bytes().len() - 64;
        m.extend_from_slice(&e.to_bytes()[..sig_at]);
        e.signature = key.sign(&m);
        prev = e.hash();
    }
    let mut out = bytes[..10].to_vec();
    for e in &entries {
        let b = e.to_bytes();
        out.extend_from_slice(&(b.len() as u32).to_le_bytes());
        out.extend_from_slice(&b);
    }
    out
}

#[test]
fn verify_catches_a_forged_signature() {
    let (bytes, id, _, _d) = sample();
    // An outsider edits entry 13 (the failed audit -> passed) and signs it with its own key.
    let mallory = Identity::from_secret([66; 32]);
    let forged = forge(&bytes, &mallory, 13, |e| {
        if let Body::Audit { passed, .. } = &mut e.body {
            *passed = true;
        }
    });
    let e = ledger::verify(&forged, &Expect::default()).unwrap_err();
    assert_eq!(e, LedgerError::BadSignature { index: 13 });
    // Control: the same rewrite signed by the real key verifies (the forge helper is faithful).
    let resigned = forge(&bytes, &id, 13, |e| {
        if let Body::Audit { passed, .. } = &mut e.body {
            *passed = true;
        }
    });
    ledger::verify(&resigned, &Expect::default()).unwrap();
}

#[test]
fn verify_catches_a_key_swap_against_the_known_trainer() {
    let (bytes, id, _, _d) = sample();
    let mallory = Identity::from_secret([66; 32]);
    let mkey = *mallory.public_key().as_bytes();
    // Mallory rewrites the whole ledger under her own key: self-consistent...
    let swapped = forge(&bytes, &mallory, 0, |e| {
        if let Body::Genesis { trainer_key, .. } = &mut e.body {
            *trainer_key = mkey;
        }
    });
    ledger::verify(&swapped, &Expect::default()).unwrap();
    // ...but not the trainer's.
    let expect = Expect {
        trainer: Some(id.peer_id()),
        ..Expect::default()
    };
    let e = ledger::verify(&swapped, &expect).unwrap_err();
    assert!(matches!(e, LedgerError::WrongKey { .. }), "{e}");
    ledger::verify(&bytes, &expect).unwrap();
}

#[test]
fn a_known_head_catches_truncation() {
    let (bytes, _, _, _d) = sample();
    let full = ledger::verify(&bytes, &Expect::default()).unwrap();
    let n = record_ranges(&bytes).unwrap().len();
    let cut = reassemble(&bytes, &(0..n - 2).collect::<Vec<_>>());
    // The file alone cannot show it...
    ledger::verify(&cut, &Expect::default()).unwrap();
    // ...the head stored in the checkpoint does.
    let expect = Expect {
        head: Some(full.head),
        ..Expect::default()
    };
    let e = ledger::verify(&cut, &expect).unwrap_err();
    assert!(matches!(e, LedgerError::Truncated { .. }), "{e}");
    let wrong = Head {
        seq: 3,
        hash: [1; 32],
    };
    let e = ledger::verify(
        &bytes,
        &Expect {
            head: Some(wrong),
            ..Expect::default()
        },
    )
    .unwrap_err();
    assert_eq!(e, LedgerError::HeadMismatch { seq: 3 });
    assert_eq!(Head::parse(&full.head.to_string()), Some(full.head));
}

#[test]
fn malformed_files_are_refused_without_panic() {
    let (bytes, _, _, _d) = sample();
    assert_eq!(
        ledger::verify(b"", &Expect::default()).unwrap_err(),
        LedgerError::BadHeader
    );
    assert_eq!(
        ledger::verify(b"SWLEDGER\x02\x00", &Expect::default()).unwrap_err(),
        LedgerError::BadHeader
    );
    assert_eq!(
        ledger::verify(b"SWLEDGER\x01\x00", &Expect::default()).unwrap_err(),
        LedgerError::NoGenesis
    );
    // Every truncation and every single-byte flip is refused or, if it still parses, refused by
    // the signature check; none panics.
    for cut in 0..bytes.len() {
        assert!(ledger::verify(&bytes[..cut], &Expect::default()).is_err() || cut >= 10);
    }
    let mut rejected = 0;
    for i in 10..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= 0x01;
        if ledger::verify(&b, &Expect::default()).is_err() {
            rejected += 1;
        }
    }
    assert_eq!(rejected, bytes.len() - 10, "every flipped byte is caught");
    // A huge length prefix is refused before any allocation.
    let mut huge = bytes[..10].to_vec();
    huge.extend_from_slice(&u32::MAX.to_le_bytes());
    let e = ledger::verify(&huge, &Expect::default()).unwrap_err();
    assert!(matches!(e, LedgerError::Malformed { index: 0, .. }), "{e}");
}
