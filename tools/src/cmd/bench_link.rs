//! `swarm bench link` (issue #4): transfer throughput over a shaped QUIC link on loopback, quinn's
//! stock transport settings against ours, Cubic, BBR and our low-delay controller, with and
//! without loss.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use swarm_bench::link::{LinkCase, LinkResult, run_case, standard_cases};

use crate::ui;

#[derive(clap::Args)]
pub(crate) struct BenchLinkArgs {
    /// Seconds of transfer per case.
    #[arg(long, default_value_t = 8.0)]
    pub seconds: f64,
    /// Path rate, e.g. `80mbit`.
    #[arg(long, default_value = "80mbit")]
    pub rate: String,
    /// Round-trip propagation delay, e.g. `30ms` (half is added on each side).
    #[arg(long, default_value = "30ms")]
    pub rtt: String,
    /// Loss rates per direction to test, comma-separated, e.g. `0,1%`.
    #[arg(long, default_value = "0,1%")]
    pub loss: String,
    /// Seed of the shapers' loss draws and the peers' keys.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Only run cases whose name contains this (e.g. `bbr`).
    #[arg(long)]
    pub only: Option<String>,
    /// Print the result as one JSON object on the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(serde::Serialize)]
struct Report {
    machine: String,
    cases: Vec<LinkResult>,
}

pub(crate) fn run(args: BenchLinkArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.seconds > 0.0 && args.seconds <= 600.0,
        "--seconds must be in (0, 600]"
    );
    let duration = Duration::from_secs_f64(args.seconds);
    // Reuse the shaper's parser for units, so `--rate 80mbit --rtt 30ms --loss 1%` mean what
    // they mean in a link shape.
    let probe: swarm_core::shaping::LinkShape = format!("rate={},delay={}", args.rate, args.rtt)
        .parse()
        .context("--rate/--rtt")?;
    let rate = probe.up_bps.context("--rate")?;
    let rtt = probe.delay;
    let mut losses = Vec::new();
    for l in args.loss.split(',').filter(|s| !s.trim().is_empty()) {
        let s: swarm_core::shaping::LinkShape =
            format!("loss={}", l.trim()).parse().context("--loss")?;
        losses.push(s.loss);
    }
    let mut cases: Vec<LinkCase> = Vec::new();
    for loss in &losses {
        for mut case in standard_cases(duration, args.seed)
            .into_iter()
            .filter(|c| c.loss == 0.0)
        {
            case.rate_bps = rate;
            case.rtt = rtt;
            case.loss = *loss;
            let label = case.name.split(' ').next().unwrap_or("case").to_owned();
            case.name = format!("{label} loss={}%", loss * 100.0);
            cases.push(case);
        }
    }
    if let Some(only) = &args.only {
        cases.retain(|c| c.name.contains(only.as_str()));
    }
    anyhow::ensure!(!cases.is_empty(), "no case matches");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let steps = 100u64;
    let bar = ui::progress(cases.len() as u64 * steps, args.json);
    let mut results = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        bar.set_message(case.name.clone());
        let progress = Arc::new(AtomicU64::new(0));
        let result = runtime.block_on(async {
            let ticker = {
                let bar = bar.clone();
                let base = i as u64 * steps;
                tokio::spawn(async move {
                    let start = tokio::time::Instant::now();
                    loop {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        let done = (start.elapsed().as_secs_f64() / duration.as_secs_f64()
                            * steps as f64)
                            .min(steps as f64) as u64;
                        bar.set_position(base + done);
                    }
                })
            };
            let r = tokio::time::timeout(duration * 3 + Duration::from_secs(30), async {
                run_case(case, Some(progress.clone())).await
            })
            .await;
            ticker.abort();
            r
        });
        let result = result
            .with_context(|| format!("{} did not finish", case.name))?
            .with_context(|| case.name.clone())?;
        let _ = progress.load(Ordering::Relaxed);
        bar.set_position((i as u64 + 1) * steps);
        results.push(result);
    }
    bar.finish_and_clear();

    println!(
        "{:<26} {:>9} {:>8} {:>7} {:>11} {:>8} {:>16}",
        "case", "goodput", "of rate", "rtt", "lost/sent", "window", "router q-drops"
    );
    for r in &results {
        println!(
            "{:<26} {:>5.1} Mb/s {:>7.0}% {:>5.0}ms {:>11} {:>6.2}MB {:>16}",
            r.name,
            r.goodput_mbit,
            r.utilisation * 100.0,
            r.measured_rtt_ms,
            format!("{}/{}", r.lost_packets, r.sent_packets),
            r.stream_window as f64 / 1e6,
            format!(
                "{} ({:.1}%)",
                r.sender_shaper.up_queue_drops,
                r.queue_drop_fraction * 100.0
            ),
        );
    }
    println!(
        "path: {:.0} Mbit/s, {:.0} ms RTT, {:.0} s per case, loopback with in-process shaping",
        rate as f64 / 1e6,
        rtt.as_secs_f64() * 1e3,
        duration.as_secs_f64()
    );
    if args.json {
        ui::print_json(&Report {
            machine: machine(),
            cases: results,
        })?;
    }
    Ok(())
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "{} {} cpus={cpus}",
        std::env::consts::OS,
        std::env::consts::ARCH
    )
}
