use super::*;
use crate::identity::Identity;
use crate::membership::RunId;

const KEY: MbKey = MbKey {
    step: 4,
    mb: 1,
    attempt: 0,
};

fn sign(id: &Identity, stage: u32, pass: Pass, input: &[u8], output: &[u8]) -> Receipt {
    Receipt::sign(
        id,
        RunId([3; 16]),
        1,
        KEY,
        stage,
        pass,
        [0; 32],
        input,
        output,
    )
}

fn rec(fwd_in: Option<Receipt>, bwd_in: Option<Receipt>) -> AuditRecord {
    AuditRecord {
        fwd_in_receipt: fwd_in,
        bwd_in_receipt: bwd_in,
        ..AuditRecord::default()
    }
}

/// P at stage 1 between U (stage 0) and D (stage 2): consistent links pass; each way of
/// lying about a link is pinned on the peer whose own signature or missing receipt shows it.
#[test]
fn link_mismatches_are_pinned_on_the_liar() {
    let (pi, ui, di) = (
        Identity::from_secret([1; 32]),
        Identity::from_secret([2; 32]),
        Identity::from_secret([3; 32]),
    );
    let (p, u, d) = (pi.peer_id(), ui.peer_id(), di.peer_id());
    let fr = sign(&pi, 1, Pass::Forward, b"a0", b"a1");
    let br = sign(&pi, 1, Pass::Backward, b"g2", b"g1");
    // Up link (U -> P forward, P -> U backward).
    let uf = sign(&ui, 0, Pass::Forward, b"x", b"a0");
    let ub = sign(&ui, 0, Pass::Backward, b"g1", b"g0");
    let up = |uf: &Receipt, ub: &Receipt, held: Option<Receipt>| {
        link_liar(true, p, 1, u, 0, &fr, &br, uf, ub, &rec(None, held)).map(|l| l.0)
    };
    assert_eq!(up(&uf, &ub, Some(br.clone())), None);
    // U signed a forward output other than what P got (and holds U's receipt for).
    let uf2 = sign(&ui, 0, Pass::Forward, b"x", b"a0'");
    assert_eq!(up(&uf2, &ub, Some(br.clone())), Some(u));
    // U claims P sent it another gradient but holds no receipt of P for it.
    let ub2 = sign(&ui, 0, Pass::Backward, b"g1'", b"g0");
    assert_eq!(up(&uf, &ub2, Some(br.clone())), Some(u));
    assert_eq!(up(&uf, &ub2, None), Some(u));
    // ... but it does hold P's signature over that other gradient: P signed two.
    let br2 = sign(&pi, 1, Pass::Backward, b"g2", b"g1'");
    assert_eq!(up(&uf, &ub2, Some(br2)), Some(p));
    // A receipt of P forged by U does not count.
    let forged = sign(&ui, 1, Pass::Backward, b"g2", b"g1'");
    assert_eq!(up(&uf, &ub2, Some(forged)), Some(u));

    // Down link (P -> D forward, D -> P backward).
    let df = sign(&di, 2, Pass::Forward, b"a1", b"y");
    let db = sign(&di, 2, Pass::Backward, b"gy", b"g2");
    let down = |df: &Receipt, db: &Receipt, held: Option<Receipt>| {
        link_liar(false, p, 1, d, 2, &fr, &br, df, db, &rec(held, None)).map(|l| l.0)
    };
    assert_eq!(down(&df, &db, Some(fr.clone())), None);
    let db2 = sign(&di, 2, Pass::Backward, b"gy", b"g2'");
    assert_eq!(down(&df, &db2, Some(fr.clone())), Some(d));
    let df2 = sign(&di, 2, Pass::Forward, b"a1'", b"y");
    assert_eq!(down(&df2, &db, Some(fr.clone())), Some(d));
    let fr2 = sign(&pi, 1, Pass::Forward, b"a0", b"a1'");
    assert_eq!(down(&df2, &db, Some(fr2)), Some(p));
}

/// While the auditor is lent to the step's audits, a proven ban the driver finds meanwhile (a
/// bad state served during the sync) goes to the stand-in, which keeps it for the auditor: it
/// reaches the ledger and the stats once the auditor is back, and is not lost.
#[test]
fn a_stand_in_keeps_proven_bans_for_the_auditor() {
    let dir = tempfile::tempdir().unwrap();
    let id = Identity::from_secret([9; 32]);
    let cfg = AuditConfig {
        ledger: Some(dir.path().join("ledger")),
        ..AuditConfig::default()
    };
    let config = RunConfig::default();
    let mut auditor =
        Auditor::new(cfg, &id, RunId([3; 16]), &config, Duration::from_secs(1)).unwrap();
    let mut stand_in = auditor.stand_in();
    let cheat = PeerId([7; 32]);
    let ban = stand_in.ban_proven(cheat, 5, 1, "bad state".into(), [1; 32]);
    assert_eq!(ban.peer, cheat);
    assert!(auditor.stats.banned.is_empty(), "nothing recorded yet");
    for (peer, step, stage, reason, evidence) in stand_in.take_deferred() {
        auditor.ban_proven(peer, step, stage, reason, evidence);
    }
    assert_eq!(auditor.stats.banned, vec![cheat]);
    assert!(auditor.is_banned(&cheat));
    let bytes = std::fs::read(dir.path().join("ledger")).unwrap();
    let v = crate::ledger::verify(&bytes, &crate::ledger::Expect::default()).unwrap();
    assert!(
        crate::ledger::credits(&v.entries)
            .iter()
            .any(|c| c.peer == cheat && c.banned)
    );
    // The auditor itself never defers.
    assert!(auditor.take_deferred().is_empty());
}

/// A subspace model's forward output starts with the token ids: the distance reads past them
/// (a plain decode would call any difference 1, banning an honest peer whose frame differs in a
/// quantization level), and different ids are as far apart as frames get.
#[test]
fn hidden_distance_reads_past_the_token_ids() {
    let limits = Limits::new(64);
    let frame = |tokens: &[u32], v: &[f32]| {
        let (mut out, mut f) = (Vec::new(), Vec::new());
        swarm_compression::encode_tokens(tokens, &mut out).unwrap();
        swarm_compression::Encoder::new("none".parse().unwrap())
            .unwrap()
            .encode(v, &[1, 4, 2], &mut f)
            .unwrap();
        out.extend_from_slice(&f);
        out
    };
    let v: Vec<f32> = (1..=8).map(|x| x as f32).collect();
    let mut w = v.clone();
    w[0] += 0.01;
    let (a, b) = (frame(&[1, 2, 3, 4], &v), frame(&[1, 2, 3, 4], &w));
    let d = hidden_distance(&a, &b, &limits, true);
    assert!(d > 0.0 && d < 1e-2, "{d}");
    assert_eq!(frame_distance(&a, &b, &limits), 1.0);
    assert_eq!(
        hidden_distance(&a, &frame(&[1, 2, 3, 5], &v), &limits, true),
        1.0
    );
}
