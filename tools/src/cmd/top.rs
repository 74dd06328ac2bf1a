//! `swarm top ADDR`: the monitor's state in a terminal, for SSH users. Reads `/api/v1/state`
//! of a trainer started with `--http` (or a demo) and redraws the screen every interval.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use swarm_core::trainer::observe::{SCHEMA_VERSION, Snapshot};

use crate::ui;

#[derive(clap::Args)]
pub(crate) struct TopArgs {
    /// The monitor's address (`host:port`, or the URL printed by `swarm demo`).
    pub addr: String,
    /// Bearer token of a public monitor.
    #[arg(long, env = "SWARM_HTTP_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Milliseconds between redraws.
    #[arg(long, default_value_t = 1000)]
    pub interval_ms: u64,
    /// Draw once and exit.
    #[arg(long)]
    pub once: bool,
    /// Print the state once as one JSON object and exit.
    #[arg(long)]
    pub json: bool,
}

fn parse_addr(s: &str) -> anyhow::Result<SocketAddr> {
    let s = s.trim();
    let s = s.strip_prefix("http://").unwrap_or(s);
    let s = s.split('/').next().unwrap_or(s);
    super::join::resolve(s)
}

fn fetch(addr: SocketAddr, token: Option<&str>) -> anyhow::Result<Snapshot> {
    let r = swarm_monitor::client::get(addr, "/api/v1/state", token, Duration::from_secs(5))?;
    if r.status != 200 {
        bail!("{addr} answered {}: {}", r.status, r.text().trim());
    }
    let snap: Snapshot = serde_json::from_slice(&r.body)
        .with_context(|| format!("{addr}/api/v1/state is not a trainer's state"))?;
    if snap.version != SCHEMA_VERSION {
        bail!(
            "{addr} serves state version {}, this swarm top reads version {SCHEMA_VERSION}",
            snap.version
        );
    }
    Ok(snap)
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

fn mb(b: u64) -> String {
    format!("{:.1} MB", b as f64 / 1e6)
}

/// Terminal control characters from peer-supplied strings are not written to the terminal.
fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(64)
        .collect()
}

fn secs(s: Option<f64>) -> String {
    match s {
        None => "-".into(),
        Some(s) => {
            let s = s.round() as u64;
            format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
        }
    }
}

/// One screen of text.
pub(crate) fn render(s: &Snapshot) -> String {
    let mut o = String::new();
    let p = &s.progress;
    let c = &s.run.config;
    let _ = writeln!(
        o,
        "run {}  phase {}  epoch {}  step {}/{}  loss {}  lr {}",
        short(&s.run.run_id),
        s.run.phase,
        s.run.epoch,
        p.step,
        p.total_steps,
        p.loss.map_or("-".into(), |l| format!("{l:.4}")),
        p.lr.map_or("-".into(), |l| format!("{l:.2e}")),
    );
    let _ = writeln!(
        o,
        "{:.0} tokens/s  train {}  ETA {}  retries {}  lost {}  left {}  restores {}  audits {} (failed {})",
        p.tokens_per_s,
        secs(Some(p.train_s)),
        secs(p.eta_s),
        p.retries,
        p.peers_lost,
        p.peers_left,
        p.restores,
        s.audits.audits,
        s.audits.failures
    );
    let _ = writeln!(
        o,
        "model {} layers x {}, {} stages; codecs {} / {} / {}\n",
        c.layers, c.hidden_size, c.stages, c.codec_activations, c.codec_gradients, c.codec_sync
    );
    let _ = writeln!(o, "COVERAGE");
    for st in &s.stages {
        let reps: Vec<String> = st
            .replicas
            .iter()
            .map(|r| format!("{} {} load {}", short(&r.peer), r.state, r.load))
            .collect();
        let _ = writeln!(
            o,
            "  stage {} layers {}-{}  {:7}  {}",
            st.stage,
            st.layers[0],
            st.layers[1].saturating_sub(1),
            st.health.to_uppercase(),
            reps.join(" | ")
        );
    }
    let _ = writeln!(
        o,
        "\nPEERS\n  {:12} {:21} {:>5} {:8} {:>9} {:>7} {:>10} {:>10} {:>7} {:>6}  version",
        "id",
        "address",
        "stage",
        "state",
        "tokens/s",
        "rtt ms",
        "sent",
        "received",
        "audits",
        "credit"
    );
    for q in &s.peers {
        let _ = writeln!(
            o,
            "  {:12} {:21} {:>5} {:8} {:>9} {:>7} {:>10} {:>10} {:>7} {:>6}  {}",
            short(&q.id),
            clean(&q.addr),
            q.stage.map_or("-".into(), |k| k.to_string()),
            q.state,
            q.throughput_tokens_per_s
                .map_or("-".into(), |t| format!("{t:.0}")),
            q.rtt_ms.map_or("-".into(), |r| format!("{r:.1}")),
            q.tx_bytes.map_or("-".into(), mb),
            q.rx_bytes.map_or("-".into(), mb),
            format!("{}/{}", q.audits_passed, q.audits_failed),
            q.credited_micro_batches,
            q.version.as_deref().map_or("-".into(), clean),
        );
    }
    let _ = writeln!(o, "\nBYTES (wire / fp32)");
    for ch in &s.channels {
        let ratio = if ch.wire_bytes > 0 {
            format!("{:.1}x", ch.dense_bytes as f64 / ch.wire_bytes as f64)
        } else {
            "-".into()
        };
        let _ = writeln!(
            o,
            "  {:12} {:>10} / {:>10}  {ratio}",
            ch.channel,
            mb(ch.wire_bytes),
            mb(ch.dense_bytes)
        );
    }
    let _ = writeln!(
        o,
        "\nEVENTS (ledger head {})",
        s.ledger.head.as_deref().unwrap_or("-")
    );
    for e in s.events.iter().rev().take(8) {
        let _ = writeln!(
            o,
            "  step {:>5} {:10} {:12} {}",
            e.step,
            e.kind,
            e.peer.as_deref().map_or("-", short),
            clean(&e.detail)
        );
    }
    o
}

pub(crate) fn run(args: TopArgs) -> anyhow::Result<()> {
    let addr = parse_addr(&args.addr)?;
    let token = args.token.as_deref();
    if args.json {
        return ui::print_json(&fetch(addr, token)?);
    }
    loop {
        let screen = match fetch(addr, token) {
            Ok(s) => render(&s),
            Err(e) if !args.once => format!("{e:#}\n(retrying)\n"),
            Err(e) => return Err(e),
        };
        if args.once {
            print!("{screen}");
            return Ok(());
        }
        // Clear the screen and home the cursor, then draw.
        print!("\x1b[2J\x1b[H{screen}");
        use std::io::Write;
        std::io::stdout().flush()?;
        std::thread::sleep(Duration::from_millis(args.interval_ms.max(100)));
    }
}
