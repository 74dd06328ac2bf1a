//! `swarm ledger show|verify FILE`: read a run's contribution ledger (issue #7).
//!
//! `verify` checks the whole chain (sequence numbers, hash links, every signature against the key
//! pinned by the genesis) and, when given, the trainer's id and a known head (`--head`, or
//! `--checkpoint DIR` reading the `swarm.ledger_head` a trainer checkpoint records), which is the
//! only way to see entries cut from the end. `show` verifies first,
//! then prints per-peer credit: work is credited once a later audit of the same peer passed,
//! pending until then, and voided for a banned peer.

use std::path::PathBuf;

use anyhow::{Context, anyhow};
use serde::Serialize;
use swarm_core::PeerId;
use swarm_core::ledger::{self, Body, Credit, Expect, Head};

use crate::ui;

#[derive(clap::Subcommand)]
pub(crate) enum LedgerCommand {
    /// Verify the ledger, then print per-peer credit.
    Show(LedgerArgs),
    /// Check the chain, every signature and the pinned key; exit 1 on the first problem.
    Verify(LedgerArgs),
}

#[derive(clap::Args)]
pub(crate) struct LedgerArgs {
    /// The ledger file (`<out>/ledger` of a `swarm train --out` run).
    pub file: PathBuf,

    /// The trainer's peer id (64 hex digits): refuse a ledger signed by another key.
    #[arg(long)]
    pub trainer: Option<String>,

    /// A known head `SEQ:HASH` (a checkpoint's `ledger_head`): catches entries cut from the end.
    #[arg(long, conflicts_with = "checkpoint")]
    pub head: Option<String>,

    /// A trainer checkpoint directory: check the ledger against the head it recorded.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,

    /// Print the result as one JSON object on the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct VerifyOut {
    file: String,
    ok: bool,
    error: Option<String>,
    entries: Option<usize>,
    run_id: Option<String>,
    trainer: Option<String>,
    head: Option<String>,
}

#[derive(Serialize)]
struct ShowOut {
    file: String,
    run_id: String,
    trainer: String,
    head: String,
    entries: usize,
    work_entries: usize,
    audits: u64,
    audit_failures: u64,
    banned: Vec<String>,
    peers: Vec<Credit>,
}

fn expect(a: &LedgerArgs) -> anyhow::Result<Expect> {
    let trainer = a
        .trainer
        .as_deref()
        .map(|s| PeerId::parse(s).ok_or_else(|| anyhow!("--trainer: not a peer id: {s}")))
        .transpose()?;
    let head = a
        .head
        .as_deref()
        .map(|s| Head::parse(s).ok_or_else(|| anyhow!("--head: expected SEQ:HEX, got {s}")))
        .transpose()?;
    let head = match (&a.checkpoint, head) {
        (Some(dir), _) => Some(
            swarm_core::trainer::checkpoint::ledger_head(dir)
                .with_context(|| format!("reading {}", dir.display()))?
                .ok_or_else(|| {
                    anyhow!("{}: the checkpoint records no ledger head", dir.display())
                })?,
        ),
        (None, h) => h,
    };
    Ok(Expect {
        trainer,
        run: None,
        head,
    })
}

pub(crate) fn run(cmd: LedgerCommand) -> anyhow::Result<()> {
    match cmd {
        LedgerCommand::Verify(a) => verify(a),
        LedgerCommand::Show(a) => show(a),
    }
}

fn verify(a: LedgerArgs) -> anyhow::Result<()> {
    let bytes = std::fs::read(&a.file).with_context(|| format!("{}", a.file.display()))?;
    let res = ledger::verify(&bytes, &expect(&a)?);
    let out = match &res {
        Ok(v) => VerifyOut {
            file: a.file.display().to_string(),
            ok: true,
            error: None,
            entries: Some(v.entries.len()),
            run_id: Some(v.run.to_string()),
            trainer: Some(v.trainer.to_string()),
            head: Some(v.head.to_string()),
        },
        Err(e) => VerifyOut {
            file: a.file.display().to_string(),
            ok: false,
            error: Some(e.to_string()),
            entries: None,
            run_id: None,
            trainer: None,
            head: None,
        },
    };
    if a.json {
        ui::print_json(&out)?;
    } else if let Ok(v) = &res {
        println!(
            "ok: {} entries, run {}, signed by trainer {}",
            v.entries.len(),
            v.run,
            v.trainer
        );
        println!(
            "head {} (pass it as --head later to detect truncation)",
            v.head
        );
        if a.trainer.is_none() {
            println!("note: without --trainer, a ledger re-signed under another key also verifies");
        }
    }
    match res {
        Ok(_) => Ok(()),
        Err(e) => Err(anyhow!("{}: {e}", a.file.display())),
    }
}

fn show(a: LedgerArgs) -> anyhow::Result<()> {
    let bytes = std::fs::read(&a.file).with_context(|| format!("{}", a.file.display()))?;
    let v = ledger::verify(&bytes, &expect(&a)?)
        .with_context(|| format!("{} does not verify", a.file.display()))?;
    let peers = ledger::credits(&v.entries);
    let mut work_entries = 0;
    let (mut audits, mut failures) = (0u64, 0u64);
    for e in &v.entries {
        match &e.body {
            Body::Work { .. } => work_entries += 1,
            Body::Audit { passed, .. } => {
                audits += 1;
                failures += u64::from(!passed);
            }
            _ => {}
        }
    }
    let out = ShowOut {
        file: a.file.display().to_string(),
        run_id: v.run.to_string(),
        trainer: v.trainer.to_string(),
        head: v.head.to_string(),
        entries: v.entries.len(),
        work_entries,
        audits,
        audit_failures: failures,
        banned: peers
            .iter()
            .filter(|c| c.banned)
            .map(|c| c.peer.to_string())
            .collect(),
        peers,
    };
    if a.json {
        return ui::print_json(&out);
    }
    println!(
        "run {}  trainer {}  {} entries (verified), head {}",
        out.run_id,
        v.trainer.short(),
        out.entries,
        out.head
    );
    println!("audits {}  failed {}", out.audits, out.audit_failures);
    println!(
        "{:<14} {:>10} {:>14} {:>10} {:>14} {:>10} {:>7} {:>6} {:>6}",
        "peer",
        "credit_mb",
        "credit_tokxL",
        "pending_mb",
        "pending_tokxL",
        "voided_mb",
        "passed",
        "failed",
        "banned"
    );
    for c in &out.peers {
        println!(
            "{:<14} {:>10} {:>14} {:>10} {:>14} {:>10} {:>7} {:>6} {:>6}",
            c.peer.short(),
            c.credited_micro_batches,
            c.credited_tokens_layers,
            c.pending_micro_batches,
            c.pending_tokens_layers,
            c.voided_micro_batches,
            c.audits_passed,
            c.audits_failed,
            if c.banned { "yes" } else { "" }
        );
    }
    Ok(())
}
