//! `swarm ledger verify|show` on real files: a clean ledger passes; an edited entry, a deleted
//! one, a reordering, a forged signature, a key swap (with `--trainer`) and a truncation (with
//! `--head`, or `--checkpoint` with a trainer checkpoint recording the head) each make `verify`
//! exit non-zero with `"ok":false`.

use std::path::Path;
use std::process::Command;

use swarm_core::Identity;
use swarm_core::ledger::{self, Body, Entry, Head, LedgerWriter, record_ranges};
use swarm_core::membership::RunId;

fn swarm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_swarm"))
}

fn peer(i: u8) -> swarm_core::PeerId {
    Identity::from_secret([i; 32]).peer_id()
}

fn write_sample(path: &Path, id: &Identity) {
    let mut w = LedgerWriter::open(path, id.clone(), RunId([5; 16]), 1).unwrap();
    for step in 0..4u64 {
        for p in 1..=2u8 {
            w.append(
                Body::Work {
                    peer: peer(p),
                    step,
                    stage: p as u32 - 1,
                    micro_batches: 8,
                    tokens_layers: 8 * 64,
                },
                step,
            )
            .unwrap();
        }
        w.append(
            Body::Audit {
                peer: peer(1),
                step,
                mb: 3,
                stage: 0,
                auditor: peer(3),
                referee: None,
                passed: true,
                distance: 0.0,
                tolerance: 0.0,
            },
            step,
        )
        .unwrap();
    }
    w.append(
        Body::Ban {
            peer: peer(2),
            step: 3,
            reason: "test".into(),
            evidence: [0; 32],
        },
        9,
    )
    .unwrap();
    w.sync().unwrap();
}

/// Runs `swarm ledger verify FILE --json [extra]`: (exit success, the JSON line).
fn verify(file: &Path, extra: &[&str]) -> (bool, serde_json::Value) {
    let out = swarm()
        .args(["ledger", "verify"])
        .arg(file)
        .arg("--json")
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or("{}").to_string();
    (out.status.success(), serde_json::from_str(&last).unwrap())
}

fn rebuild(bytes: &[u8], order: &[usize]) -> Vec<u8> {
    let r = record_ranges(bytes).unwrap();
    let mut out = bytes[..r[0].0].to_vec();
    for &i in order {
        out.extend_from_slice(&bytes[r[i].0..r[i].1]);
    }
    out
}

fn resign(bytes: &[u8], key: &Identity, from: usize, f: impl Fn(&mut Entry)) -> Vec<u8> {
    let mut entries = ledger::parse(bytes).unwrap();
    f(&mut entries[from]);
    let mut prev = if from == 0 {
        [0; 32]
    } else {
        entries[from - 1].hash()
    };
    for e in entries.iter_mut().skip(from) {
        e.prev = prev;
        let b = e.to_bytes();
        let mut m = b"swarm-ledger-v1".to_vec();
        m.extend_from_slice(&b[..b.len() - 64]);
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
fn ledger_verify_catches_every_tampering() {
    let dir = tempfile::tempdir().unwrap();
    let id = Identity::from_secret([11; 32]);
    let good = dir.path().join("ledger");
    write_sample(&good, &id);
    let bytes = std::fs::read(&good).unwrap();
    let n = record_ranges(&bytes).unwrap().len();
    let trainer = id.peer_id().to_string();

    let (ok, j) = verify(&good, &["--trainer", &trainer]);
    assert!(ok, "{j}");
    assert_eq!(j["ok"], true);
    assert_eq!(j["entries"], n);
    let head = j["head"].as_str().unwrap().to_string();
    let (ok, _) = verify(&good, &["--head", &head]);
    assert!(ok);

    let case = |name: &str, b: Vec<u8>, extra: &[&str], want: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, b).unwrap();
        let (ok, j) = verify(&p, extra);
        assert!(!ok, "{name}: accepted: {j}");
        assert_eq!(j["ok"], false, "{name}");
        let err = j["error"].as_str().unwrap();
        assert!(err.contains(want), "{name}: {err}");
    };

    // An edit: one byte of a Work entry's micro-batch count.
    let r = record_ranges(&bytes).unwrap();
    let mut edited = bytes.clone();
    edited[r[3].1 - 64 - 12] ^= 1;
    case("edited", edited, &[], "bad signature");
    // A deletion and a reordering.
    let del: Vec<usize> = (0..n).filter(|&i| i != 4).collect();
    case(
        "deleted",
        rebuild(&bytes, &del),
        &[],
        "deleted, inserted or reordered",
    );
    let mut order: Vec<usize> = (0..n).collect();
    order.swap(5, 6);
    case(
        "reordered",
        rebuild(&bytes, &order),
        &[],
        "deleted, inserted or reordered",
    );
    // A forged signature on a rewritten entry (the ban removed -> turned into an audit pass).
    let mallory = Identity::from_secret([66; 32]);
    let forged = resign(&bytes, &mallory, n - 1, |e| {
        e.body = Body::Audit {
            peer: peer(2),
            step: 3,
            mb: 0,
            stage: 1,
            auditor: peer(1),
            referee: None,
            passed: true,
            distance: 0.0,
            tolerance: 0.0,
        }
    });
    case("forged", forged, &[], "bad signature");
    // The whole ledger re-signed under another key: only the pinned trainer id shows it.
    let mkey = *mallory.public_key().as_bytes();
    let swapped = resign(&bytes, &mallory, 0, |e| {
        if let Body::Genesis { trainer_key, .. } = &mut e.body {
            *trainer_key = mkey;
        }
    });
    let p = dir.path().join("swapped-nopin");
    std::fs::write(&p, &swapped).unwrap();
    assert!(verify(&p, &[]).0, "self-consistent without a pinned key");
    case("swapped", swapped, &["--trainer", &trainer], "signed by");
    // Truncation: only a known head shows it.
    let cut = rebuild(&bytes, &(0..n - 1).collect::<Vec<_>>());
    let p = dir.path().join("cut-nohead");
    std::fs::write(&p, &cut).unwrap();
    assert!(verify(&p, &[]).0);
    case(
        "cut",
        cut.clone(),
        &["--head", &head],
        "before the known head",
    );
    // The same head as a trainer checkpoint records it (`--checkpoint DIR`).
    let ckpt = dir.path().join("ckpt");
    write_checkpoint(&ckpt, Head::parse(&head).unwrap());
    let ck = ckpt.to_str().unwrap();
    let (ok, j) = verify(&good, &["--checkpoint", ck]);
    assert!(ok, "{j}");
    assert_eq!(j["head"].as_str(), Some(head.as_str()));
    case(
        "cut-ckpt",
        cut,
        &["--checkpoint", ck],
        "before the known head",
    );
}

/// A small trainer checkpoint recording `head`.
fn write_checkpoint(dir: &Path, head: Head) {
    use swarm_model::{Piece, RunConfig, Shard};
    let mut cfg = RunConfig::default();
    cfg.model.hidden_size = 32;
    cfg.model.intermediate_size = 64;
    cfg.model.num_attention_heads = 4;
    cfg.model.num_key_value_heads = Some(2);
    cfg.stages = vec![0, 1, 2];
    let dev = candle_core::Device::Cpu;
    let state = |p: Vec<Piece>| {
        Shard::new(&cfg.model, &p, 7, candle_core::DType::F32, &dev)
            .unwrap()
            .export_state()
            .unwrap()
    };
    let ends = state(vec![Piece::Embedding, Piece::Head]);
    let stages: Vec<Vec<u8>> = Piece::stages(&cfg.stages)
        .into_iter()
        .map(|p| state(vec![p]))
        .collect();
    swarm_core::trainer::checkpoint::save_with_ledger(
        dir,
        &cfg,
        RunId([5; 16]),
        1,
        0,
        &ends,
        &stages,
        Some(head),
    )
    .unwrap();
}

#[test]
fn ledger_show_prints_credit_per_peer() {
    let dir = tempfile::tempdir().unwrap();
    let id = Identity::from_secret([12; 32]);
    let file = dir.path().join("ledger");
    write_sample(&file, &id);
    let out = swarm()
        .args(["ledger", "show"])
        .arg(&file)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let j: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(j["audits"], 4);
    assert_eq!(j["audit_failures"], 0);
    assert_eq!(j["banned"][0], peer(2).to_string());
    let peers = j["peers"].as_array().unwrap();
    let p1 = peers
        .iter()
        .find(|p| p["peer"] == peer(1).to_string())
        .unwrap();
    assert_eq!(p1["credited_micro_batches"], 32);
    assert_eq!(p1["pending_micro_batches"], 0);
    let p2 = peers
        .iter()
        .find(|p| p["peer"] == peer(2).to_string())
        .unwrap();
    assert_eq!(p2["credited_micro_batches"], 0);
    assert_eq!(p2["voided_micro_batches"], 32);
    // Human output too, and a tampered file is refused by show as well.
    let human = swarm()
        .args(["ledger", "show"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&human.stdout).contains("yes"));
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 70;
    bytes[last] ^= 1;
    std::fs::write(&file, bytes).unwrap();
    let bad = swarm()
        .args(["ledger", "show"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!bad.status.success());
}
