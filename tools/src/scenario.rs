//! Scenario files of `swarm replay` (`experiments/*.toml`): a run config, the peers and their
//! links, events in time, and variants to compare, each against a local baseline.
//!
//! ```toml
//! description = "4 peers on 80/20 Mbit/s home links"
//! run = "run.toml"                  # optional, relative to this file; default: built-in
//! trainer_shape = "up=20mbit,down=80mbit,delay=30ms"
//! [config.train]                    # overrides merged into the run config (run.toml keys)
//! steps = 40
//! [[peers]]                         # groups of peers; stages round-robin unless `stage`
//! count = 4
//! shape = "up=20mbit,down=80mbit,delay=30ms"
//! [[events]]                        # at_step (during step K) or at_seconds; kill/join/degrade
//! at_step = 10
//! kind = "kill"
//! peer = 3                          # or `stage = 1`: its first live replica
//! [[variants]]                      # compared in one invocation; default: one variant "swarm"
//! name = "none"
//! config.codec = { activations = "none", gradients = "none", sync = "none" }
//! shape = "up=10mbit,down=80mbit,delay=30ms"   # optional: every peer's link
//! ```
//!
//! A scenario file is untrusted input: unknown keys, bad shapes, out-of-range peers, steps and
//! counts, and variant names that are not plain file names are refused with a message that says
//! where. Nothing is sized from the file beyond the caps below.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;
use swarm_core::shaping::LinkShape;
use swarm_model::RunConfig;

use crate::cluster::{Action, Timed, When};

/// Largest scenario file read.
pub(crate) const MAX_SCENARIO_BYTES: u64 = 1 << 20;
/// Most peer processes a variant may start (initial peers and joiners).
pub(crate) const MAX_PEERS: usize = 32;
/// Most events per variant, and most variants per scenario.
pub(crate) const MAX_EVENTS: usize = 256;
pub(crate) const MAX_VARIANTS: usize = 32;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScenarioFile {
    #[serde(default)]
    description: String,
    run: Option<PathBuf>,
    #[serde(default)]
    config: toml::Table,
    trainer_shape: Option<String>,
    attempt_timeout_s: Option<u64>,
    #[serde(default)]
    peers: Vec<PeerGroup>,
    #[serde(default)]
    events: Vec<EventSpec>,
    #[serde(default)]
    variants: Vec<VariantSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct PeerGroup {
    #[serde(default = "one")]
    count: usize,
    stage: Option<u32>,
    shape: String,
}

fn one() -> usize {
    1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum EventKind {
    Kill,
    Join,
    Degrade,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventSpec {
    at_step: Option<u64>,
    at_seconds: Option<f64>,
    kind: EventKind,
    peer: Option<usize>,
    stage: Option<u32>,
    shape: Option<String>,
    label: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct VariantSpec {
    name: String,
    #[serde(default)]
    config: toml::Table,
    shape: Option<String>,
    trainer_shape: Option<String>,
    peers: Option<Vec<PeerGroup>>,
    events: Option<Vec<EventSpec>>,
}

/// A checked scenario, every variant resolved.
#[derive(Debug, Clone)]
pub(crate) struct Scenario {
    pub name: String,
    pub description: String,
    pub attempt_timeout: Duration,
    pub variants: Vec<Variant>,
}

/// One swarm run to compare with the local baseline.
#[derive(Debug, Clone)]
pub(crate) struct Variant {
    pub name: String,
    pub config: RunConfig,
    pub trainer_shape: Option<LinkShape>,
    /// Initial peers: (stage, link), peer index = position.
    pub peers: Vec<(u32, LinkShape)>,
    pub events: Vec<Timed>,
}

impl Scenario {
    /// Reads and checks a scenario file; its name is the file stem.
    pub(crate) fn from_file(path: &Path) -> anyhow::Result<Scenario> {
        let meta =
            std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
        if meta.len() > MAX_SCENARIO_BYTES {
            bail!("{}: larger than {MAX_SCENARIO_BYTES} bytes", path.display());
        }
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("scenario")
            .to_owned();
        let base = path.parent().unwrap_or(Path::new("."));
        Scenario::parse(&text, &name, base).with_context(|| format!("scenario {}", path.display()))
    }

    /// Parses and checks scenario text; `base` resolves a relative `run` path.
    pub(crate) fn parse(text: &str, name: &str, base: &Path) -> anyhow::Result<Scenario> {
        if text.len() as u64 > MAX_SCENARIO_BYTES {
            bail!("larger than {MAX_SCENARIO_BYTES} bytes");
        }
        let file: ScenarioFile = toml::from_str(text).context("not a valid scenario")?;
        // Overrides are partial: start from the default config (whose `[model]` must be
        // complete), without `stages` so that a changed layer count gets its default split.
        let mut base_table: toml::Table = toml::from_str(&RunConfig::default().to_toml()?)?;
        base_table.remove("stages");
        if let Some(p) = &file.run {
            let p = base.join(p);
            let t = std::fs::read_to_string(&p)
                .with_context(|| format!("reading run config {}", p.display()))?;
            let run: toml::Table =
                toml::from_str(&t).with_context(|| format!("run config {}", p.display()))?;
            merge(&mut base_table, &run);
        }
        merge(&mut base_table, &file.config);
        let specs = if file.variants.is_empty() {
            vec![VariantSpec {
                name: "swarm".into(),
                config: toml::Table::new(),
                shape: None,
                trainer_shape: None,
                peers: None,
                events: None,
            }]
        } else {
            file.variants.clone()
        };
        if specs.len() > MAX_VARIANTS {
            bail!("{} variants (at most {MAX_VARIANTS})", specs.len());
        }
        let mut names = HashSet::new();
        let mut variants = Vec::with_capacity(specs.len());
        for v in &specs {
            check_name(&v.name)?;
            if v.name == "local" {
                bail!("variant name `local` is reserved for the baseline");
            }
            if !names.insert(v.name.clone()) {
                bail!("two variants are named `{}`", v.name);
            }
            variants.push(
                resolve(&file, &base_table, v).with_context(|| format!("variant `{}`", v.name))?,
            );
        }
        Ok(Scenario {
            name: name.to_owned(),
            description: file.description.clone(),
            attempt_timeout: Duration::from_secs(
                file.attempt_timeout_s.unwrap_or(30).clamp(1, 3600),
            ),
            variants,
        })
    }
}

/// Variant names become folder names: plain, short, no path separators.
fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+'));
    if !ok {
        bail!(
            "variant name `{}` must be 1-64 characters of letters, digits, - _ . + (not starting with .)",
            name.escape_debug()
        );
    }
    Ok(())
}

/// Deep merge: tables merge key by key, anything else is replaced.
fn merge(into: &mut toml::Table, over: &toml::Table) {
    for (k, v) in over {
        match (into.get_mut(k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            _ => {
                into.insert(k.clone(), v.clone());
            }
        }
    }
}

fn shape(spec: &str, what: &str) -> anyhow::Result<LinkShape> {
    spec.parse::<LinkShape>()
        .with_context(|| format!("{what}: `{spec}`"))
}

/// Seeds links that do not set one from the run seed and the peer index, so replays draw the
/// same losses and jitter.
fn seeded(mut s: LinkShape, spec: &str, run_seed: u64, index: u64) -> LinkShape {
    if !spec.contains("seed=") {
        s.seed = run_seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(index + 1);
    }
    s
}

fn resolve(file: &ScenarioFile, base: &toml::Table, v: &VariantSpec) -> anyhow::Result<Variant> {
    let mut table = base.clone();
    merge(&mut table, &v.config);
    let text = toml::to_string(&table).context("config")?;
    let config = RunConfig::from_toml(&text).context("run config")?;
    let stages = (config.stages.len() - 1) as u32;
    let steps = config.train.steps;
    let groups = v.peers.as_ref().unwrap_or(&file.peers);
    if groups.is_empty() {
        bail!("no [[peers]]");
    }
    let mut peers = Vec::new();
    for g in groups {
        if g.count == 0 || g.count > MAX_PEERS {
            bail!("peer group count {} (1 to {MAX_PEERS})", g.count);
        }
        if let Some(s) = g.stage
            && s >= stages
        {
            bail!("peer group stage {s}: the run has {stages} stages");
        }
        let spec = v.shape.as_deref().unwrap_or(&g.shape);
        let link = shape(spec, "peer shape")?;
        for _ in 0..g.count {
            if peers.len() >= MAX_PEERS {
                bail!("more than {MAX_PEERS} peers");
            }
            let i = peers.len() as u32;
            let stage = g.stage.unwrap_or(i % stages);
            peers.push((stage, seeded(link.clone(), spec, config.seed, u64::from(i))));
        }
    }
    for s in 0..stages {
        if !peers.iter().any(|(k, _)| *k == s) {
            bail!("no peer serves stage {s}");
        }
    }
    let trainer_shape = match v.trainer_shape.as_ref().or(file.trainer_shape.as_ref()) {
        Some(spec) => Some(seeded(
            shape(spec, "trainer_shape")?,
            spec,
            config.seed,
            1_000,
        )),
        None => None,
    };
    let specs = v.events.as_ref().unwrap_or(&file.events);
    if specs.len() > MAX_EVENTS {
        bail!("{} events (at most {MAX_EVENTS})", specs.len());
    }
    let mut events = Vec::with_capacity(specs.len());
    let mut total = peers.len();
    for (n, e) in specs.iter().enumerate() {
        let when = match (e.at_step, e.at_seconds) {
            (Some(k), None) if k < steps => When::Step(k),
            (Some(k), None) => bail!("event {n}: at_step {k} is past the run's {steps} steps"),
            (None, Some(t)) if t.is_finite() && (0.0..=86_400.0).contains(&t) => When::Seconds(t),
            (None, Some(t)) => bail!("event {n}: at_seconds {t} must be in [0, 86400]"),
            _ => bail!("event {n}: give exactly one of at_step and at_seconds"),
        };
        let at = match when {
            When::Step(k) => format!("step {k}"),
            When::Seconds(t) => format!("{t}s"),
        };
        let peer_in_range = |p: usize| -> anyhow::Result<usize> {
            if p >= total {
                bail!("event {n}: peer {p} does not exist (peers 0..{total} by then)");
            }
            Ok(p)
        };
        if e.kind == EventKind::Kill && when == When::Step(0) {
            // Step 0 waits for every initial replica: a peer killed before it never arrives.
            bail!("event {n}: a kill needs at_step >= 1 (step 0 starts once every peer serves)");
        }
        let (action, label) = match e.kind {
            EventKind::Kill => match (e.peer, e.stage) {
                (Some(p), None) => (Action::Kill(peer_in_range(p)?), format!("kill peer {p}")),
                (None, Some(s)) if s < stages => {
                    (Action::KillStage(s), format!("kill a stage-{s} replica"))
                }
                (None, Some(s)) => bail!("event {n}: stage {s}: the run has {stages} stages"),
                _ => bail!("event {n}: kill needs exactly one of `peer` and `stage`"),
            },
            EventKind::Join => {
                if e.peer.is_some() {
                    bail!("event {n}: join takes `stage` (the new peer gets the next index)");
                }
                let stage = e.stage.unwrap_or(total as u32 % stages);
                if stage >= stages {
                    bail!("event {n}: stage {stage}: the run has {stages} stages");
                }
                let spec = e
                    .shape
                    .as_deref()
                    .or(v.shape.as_deref())
                    .unwrap_or(&groups[0].shape);
                let link = seeded(shape(spec, "join shape")?, spec, config.seed, total as u64);
                if total >= MAX_PEERS {
                    bail!("event {n}: more than {MAX_PEERS} peers");
                }
                total += 1;
                (
                    Action::Join { stage, shape: link },
                    format!("peer {} joins stage {stage}", total - 1),
                )
            }
            EventKind::Degrade => {
                let (Some(p), Some(spec)) = (e.peer, e.shape.as_deref()) else {
                    bail!("event {n}: degrade needs `peer` and `shape`");
                };
                let p = peer_in_range(p)?;
                let link = seeded(shape(spec, "degrade shape")?, spec, config.seed, p as u64);
                (
                    Action::Reshape {
                        peer: p,
                        shape: link,
                    },
                    format!("peer {p} link degrades"),
                )
            }
        };
        let label = match &e.label {
            Some(l) if l.len() <= 80 => l.clone(),
            Some(_) => bail!("event {n}: label longer than 80 characters"),
            None => format!("{label} ({at})"),
        };
        events.push(Timed {
            when,
            action,
            label,
        });
    }
    Ok(Variant {
        name: v.name.clone(),
        config,
        trainer_shape,
        peers,
        events,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        description = "test"
        trainer_shape = "up=20mbit,down=80mbit,delay=30ms"
        [config.train]
        steps = 10
        [[peers]]
        count = 3
        shape = "up=20mbit,down=80mbit,delay=30ms"
        [[peers]]
        stage = 1
        shape = "up=5mbit,down=20mbit,delay=40ms"
        [[events]]
        at_step = 3
        kind = "kill"
        peer = 1
        [[events]]
        at_seconds = 2.5
        kind = "join"
        [[events]]
        at_step = 5
        kind = "degrade"
        peer = 0
        shape = "up=1mbit,delay=80ms"
        [[variants]]
        name = "none"
        config.codec = { activations = "none", gradients = "none", sync = "none" }
        [[variants]]
        name = "q8"
        shape = "up=10mbit,down=80mbit,delay=30ms"
        config.codec = { activations = "q8", gradients = "q8", sync = "q8" }
    "#;

    fn parse(text: &str) -> anyhow::Result<Scenario> {
        Scenario::parse(text, "t", Path::new("."))
    }

    #[test]
    fn a_full_scenario_resolves() {
        let s = parse(GOOD).unwrap();
        assert_eq!(s.variants.len(), 2);
        let v = &s.variants[0];
        assert_eq!(v.config.train.steps, 10);
        assert_eq!(v.config.codec.sync, "none");
        // Round-robin stages for the first group, then the pinned one.
        let stages: Vec<u32> = v.peers.iter().map(|p| p.0).collect();
        assert_eq!(stages, [0, 1, 0, 1]);
        assert_eq!(v.peers[3].1.up_bps, Some(5_000_000));
        // Seeds differ per peer and repeat across parses.
        assert_ne!(v.peers[0].1.seed, v.peers[1].1.seed);
        assert_eq!(parse(GOOD).unwrap().variants[0].peers[2].1, v.peers[2].1);
        assert_eq!(v.events.len(), 3);
        assert_eq!(v.events[0].when, When::Step(3));
        assert_eq!(v.events[0].action, Action::Kill(1));
        assert_eq!(v.events[1].when, When::Seconds(2.5));
        assert!(matches!(v.events[1].action, Action::Join { stage: 0, .. }));
        assert!(
            matches!(&v.events[2].action, Action::Reshape { peer: 0, shape } if shape.up_bps == Some(1_000_000))
        );
        let q = &s.variants[1];
        assert_eq!(q.config.codec.activations, "q8");
        // The variant's shape replaces every peer's link.
        assert!(q.peers.iter().all(|p| p.1.up_bps == Some(10_000_000)));
        assert_eq!(q.trainer_shape.as_ref().unwrap().up_bps, Some(20_000_000));
    }

    #[test]
    fn without_variants_there_is_one() {
        let s = parse("[[peers]]\ncount = 2\nshape = \"delay=1ms\"").unwrap();
        assert_eq!(s.variants.len(), 1);
        assert_eq!(s.variants[0].name, "swarm");
        assert_eq!(s.variants[0].config, RunConfig::default());
    }

    #[test]
    fn malformed_scenarios_are_refused_with_a_reason() {
        let peers = "[[peers]]\ncount = 2\nshape = \"delay=1ms\"\n";
        let cases: Vec<(String, &str)> = vec![
            ("bogus = 1".into(), "unknown field"),
            (
                "[[peers]]\nshape = \"delay=1ms\"".into(),
                "no peer serves stage 1",
            ),
            ("[[peers]]\ncount = 0\nshape = \"\"".into(), "count 0"),
            ("[[peers]]\ncount = 99\nshape = \"\"".into(), "count 99"),
            (
                "[[peers]]\ncount = 2\nshape = \"up=fast\"".into(),
                "peer shape",
            ),
            (
                "[[peers]]\ncount = 2\nstage = 7\nshape = \"\"".into(),
                "stage 7",
            ),
            (
                format!("{peers}[config.train]\nsteps = \"x\""),
                "run config",
            ),
            (
                format!("{peers}[config.model]\nhidden_size = 3"),
                "run config",
            ),
            (format!("{peers}[config]\nnope = 1"), "run config"),
            (
                format!("{peers}[[events]]\nkind = \"kill\"\npeer = 0"),
                "exactly one of at_step",
            ),
            (
                format!(
                    "{peers}[[events]]\nat_step = 1\nat_seconds = 1.0\nkind = \"kill\"\npeer = 0"
                ),
                "exactly one of at_step",
            ),
            (
                format!("{peers}[[events]]\nat_step = 5000\nkind = \"kill\"\npeer = 0"),
                "past the run",
            ),
            (
                format!("{peers}[[events]]\nat_seconds = -1.0\nkind = \"kill\"\npeer = 0"),
                "at_seconds",
            ),
            (
                format!("{peers}[[events]]\nat_seconds = nan\nkind = \"kill\"\npeer = 0"),
                "at_seconds",
            ),
            (
                format!("{peers}[[events]]\nat_step = 1\nkind = \"kill\"\npeer = 2"),
                "peer 2 does not exist",
            ),
            (
                format!("{peers}[[events]]\nat_step = 0\nkind = \"kill\"\npeer = 0"),
                "at_step >= 1",
            ),
            (
                format!("{peers}[[events]]\nat_step = 1\nkind = \"kill\""),
                "exactly one of `peer`",
            ),
            (
                format!("{peers}[[events]]\nat_step = 1\nkind = \"explode\""),
                "unknown variant",
            ),
            (
                format!("{peers}[[events]]\nat_step = 1\nkind = \"degrade\"\npeer = 0"),
                "needs `peer` and `shape`",
            ),
            (
                format!("{peers}[[events]]\nat_step = 1\nkind = \"join\"\nstage = 9"),
                "stage 9",
            ),
            (
                format!("{peers}[[variants]]\nname = \"../etc\""),
                "variant name",
            ),
            (format!("{peers}[[variants]]\nname = \"\""), "variant name"),
            (format!("{peers}[[variants]]\nname = \"local\""), "reserved"),
            (
                format!("{peers}[[variants]]\nname = \"a\"\n[[variants]]\nname = \"a\""),
                "two variants",
            ),
            (
                format!("run = \"/nonexistent/run.toml\"\n{peers}"),
                "reading run config",
            ),
            ("[[peers]\n".into(), "not a valid scenario"),
        ];
        for (text, needle) in cases {
            match parse(&text) {
                Ok(_) => panic!("accepted:\n{text}"),
                Err(e) => {
                    let msg = format!("{e:#}");
                    assert!(
                        msg.contains(needle),
                        "`{needle}` not in `{msg}` for:\n{text}"
                    );
                }
            }
        }
    }

    #[test]
    fn oversized_and_random_input_never_panics() {
        let big = "#".repeat(MAX_SCENARIO_BYTES as usize + 1);
        assert!(parse(&big).is_err());
        // Mutations of a valid file: every one parses or is refused, none panics.
        let bytes = GOOD.as_bytes();
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        for _ in 0..2_000 {
            let mut b = bytes.to_vec();
            for _ in 0..3 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = (x as usize) % b.len();
                b[i] = (x >> 32) as u8;
            }
            if let Ok(text) = std::str::from_utf8(&b) {
                let _ = parse(text);
            }
        }
    }

    #[test]
    fn every_shipped_scenario_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let is_scenario = path.extension().is_some_and(|e| e == "toml")
                && std::fs::read_to_string(&path)
                    .unwrap()
                    .contains("[[peers]]");
            if is_scenario {
                Scenario::from_file(&path).unwrap_or_else(|e| panic!("{e:#}"));
                n += 1;
            }
        }
        assert!(n >= 5, "only {n} scenarios in {}", dir.display());
    }
}
