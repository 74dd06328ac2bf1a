//! A swarm on one machine, for `swarm demo` and `swarm replay`: the trainer runs in the caller's
//! process, every stage peer is a child process running the real user command
//!
//! ```text
//! swarm join TRAINER --stage K --shape SPEC --listen 127.0.0.1:0 --data-dir DIR --control-stdin
//! ```
//!
//! behind its own emulated home link. Peers can be SIGKILLed, started mid-run, and have their
//! link changed while they run (`shape SPEC` on the child's stdin). [`run_with_events`] drives a
//! trainer while firing such actions at steps or times. Children are killed and reaped on drop
//! (every exit path, errors and Ctrl-C included); closing their stdin also makes them leave, so
//! they never outlive this process for long.

use std::fs::File;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;
use swarm_core::shaping::LinkShape;
use swarm_core::trainer::{Metrics, Trainer, TrainerEvent};

/// One peer process.
struct PeerProc {
    index: usize,
    stage: u32,
    child: Child,
    stdin: Option<ChildStdin>,
    killed: bool,
}

/// The peer processes of one run and their temporary folder (identities and logs).
pub(crate) struct Cluster {
    exe: PathBuf,
    dir: PathBuf,
    peers: Vec<PeerProc>,
}

impl Cluster {
    /// A cluster whose peers run this same binary; files go to a fresh temp folder (kept when
    /// `SWARM_DEMO_KEEP` is set, for debugging).
    pub(crate) fn new(label: &str) -> anyhow::Result<Cluster> {
        let exe = std::env::current_exe().context("locating the swarm binary")?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir =
            std::env::temp_dir().join(format!("swarm-{label}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Cluster {
            exe,
            dir,
            peers: Vec::new(),
        })
    }

    /// Starts a peer serving `stage` of the run whose trainer listens at `trainer`; returns its
    /// index (0, 1, ... in start order).
    pub(crate) fn spawn(
        &mut self,
        stage: u32,
        trainer: SocketAddr,
        shape: &LinkShape,
    ) -> anyhow::Result<usize> {
        self.spawn_with(stage, trainer, shape, &[])
    }

    /// [`Cluster::spawn`] with extra `swarm join` arguments (e.g. `--fault noise:0.1`).
    pub(crate) fn spawn_with(
        &mut self,
        stage: u32,
        trainer: SocketAddr,
        shape: &LinkShape,
        extra: &[String],
    ) -> anyhow::Result<usize> {
        let index = self.peers.len();
        let data = self.dir.join(format!("peer{index}"));
        std::fs::create_dir_all(&data)?;
        let log = File::create(self.dir.join(format!("peer{index}.log")))?;
        let mut child = Command::new(&self.exe)
            .arg("join")
            .arg(trainer.to_string())
            .args(["--stage", &stage.to_string()])
            .args(["--shape", &shape.to_string()])
            .args(["--listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(&data)
            .arg("--control-stdin")
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .context("starting a peer process")?;
        let stdin = child.stdin.take();
        self.peers.push(PeerProc {
            index,
            stage,
            child,
            stdin,
            killed: false,
        });
        Ok(index)
    }

    /// The data folder (identity key) of peer `index`.
    pub(crate) fn data_dir(&self, index: usize) -> PathBuf {
        self.dir.join(format!("peer{index}"))
    }

    /// The process ids of the peers still running.
    pub(crate) fn pids(&self) -> Vec<u32> {
        self.peers
            .iter()
            .filter(|p| !p.killed)
            .map(|p| p.child.id())
            .collect()
    }

    /// SIGKILLs peer `index` (no goodbye: a crash). False if it was not running.
    pub(crate) fn kill(&mut self, index: usize) -> bool {
        let Some(p) = self.peers.get_mut(index) else {
            return false;
        };
        if p.killed || p.child.try_wait().ok().flatten().is_some() {
            return false;
        }
        let _ = p.child.kill();
        let _ = p.child.wait();
        p.killed = true;
        true
    }

    /// SIGKILLs the first live peer serving `stage`; returns its index.
    pub(crate) fn kill_one(&mut self, stage: u32) -> Option<usize> {
        let i = self.peers.iter_mut().find_map(|p| {
            let live = !p.killed && p.child.try_wait().ok().flatten().is_none();
            (p.stage == stage && live).then_some(p.index)
        })?;
        self.kill(i).then_some(i)
    }

    /// Changes the link of live peer `index` (through its control stdin).
    pub(crate) fn reshape(&mut self, index: usize, shape: &LinkShape) -> anyhow::Result<()> {
        let p = self
            .peers
            .get_mut(index)
            .with_context(|| format!("no peer {index}"))?;
        let stdin = p
            .stdin
            .as_mut()
            .with_context(|| format!("peer {index} has no control channel"))?;
        writeln!(stdin, "shape {shape}")
            .and_then(|_| stdin.flush())
            .with_context(|| format!("peer {index} is not running"))
    }

    /// The last lines of every peer's log (shown when a run fails).
    pub(crate) fn log_tail(&self) -> String {
        let mut out = String::new();
        for p in &self.peers {
            let path = self.dir.join(format!("peer{}.log", p.index));
            if let Ok(text) = std::fs::read_to_string(&path) {
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(5)..].join("\n");
                if !tail.is_empty() {
                    out.push_str(&format!(
                        "--- peer {} ({}):\n{tail}\n",
                        p.index,
                        path.display()
                    ));
                }
            }
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for p in self.peers.iter_mut() {
            p.stdin = None;
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        if std::env::var_os("SWARM_DEMO_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// When an action fires.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum When {
    /// During step K (0-based): joins and link changes as step K starts, kills a fifth of the
    /// previous step's duration into it (so mid-step, during the micro-batches).
    Step(u64),
    /// Seconds after the first step started (known when it ends: earlier times fire then).
    Seconds(f64),
}

/// What happens to the cluster.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Action {
    /// SIGKILL peer `index`.
    Kill(usize),
    /// SIGKILL the first live replica of a stage.
    KillStage(u32),
    /// Start a new peer for `stage` behind `shape`.
    Join { stage: u32, shape: LinkShape },
    /// Change live peer `index`'s link.
    Reshape { peer: usize, shape: LinkShape },
}

/// A scheduled action with the label shown on plots.
#[derive(Clone, Debug)]
pub(crate) struct Timed {
    pub when: When,
    pub action: Action,
    pub label: String,
}

/// An action that happened: in which step and how long after the first step started.
#[derive(Clone, Debug, serde::Serialize)]
pub(crate) struct Fired {
    pub label: String,
    /// The step in progress when it fired (0-based).
    pub step: u64,
    /// Seconds since the first step started.
    pub wall_s: f64,
    /// What it did, e.g. `killed peer 3` or the error that prevented it.
    pub outcome: String,
}

/// What the event thread and the trainer callback share.
struct Clock {
    /// When the first step started (known once it ends).
    t0: Option<Instant>,
    /// The step in progress.
    step: u64,
    /// Actions due at an instant, not yet fired.
    due: Vec<(Instant, Timed)>,
    fired: Vec<Fired>,
}

/// Runs `trainer` to the end while firing `events` on `cluster`; `on_event` sees every trainer
/// event (progress bars, per-step records). Returns the metrics and what fired.
pub(crate) async fn run_with_events(
    trainer: &mut Trainer,
    cluster: &Arc<Mutex<Cluster>>,
    events: &[Timed],
    mut on_event: impl FnMut(&TrainerEvent, &[Fired]),
) -> (anyhow::Result<Metrics>, Vec<Fired>) {
    let addr = trainer.addr();
    // Ctrl-C or SIGTERM ends the run with an error; the caller's `Cluster` then kills and reaps
    // every peer process on drop.
    let mut shutdown = crate::shutdown::ShutdownSignal::new();
    let clock = Arc::new(Mutex::new(Clock {
        t0: None,
        step: 0,
        due: Vec::new(),
        fired: Vec::new(),
    }));
    let fire = {
        let cluster = cluster.clone();
        let clock = clock.clone();
        move |t: &Timed| {
            let outcome = apply(&mut lock(&cluster), &t.action, addr);
            let mut c = lock(&clock);
            let wall_s = c.t0.map_or(0.0, |t0| t0.elapsed().as_secs_f64());
            let step = c.step;
            c.fired.push(Fired {
                label: t.label.clone(),
                step,
                wall_s,
                outcome,
            });
        }
    };
    // Step 0 actions happen before the run starts (a kill then finds no step to interrupt).
    for t in events.iter().filter(|t| t.when == When::Step(0)) {
        fire(t);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let ticker = {
        let (clock, stop, fire) = (clock.clone(), stop.clone(), fire.clone());
        let mut timed: Vec<Timed> = events
            .iter()
            .filter(|t| matches!(t.when, When::Seconds(_)))
            .cloned()
            .collect();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let now = Instant::now();
                let ready: Vec<Timed> = {
                    let mut c = lock(&clock);
                    let mut ready = Vec::new();
                    c.due.retain(|(at, t)| {
                        let go = *at <= now;
                        if go {
                            ready.push(t.clone());
                        }
                        !go
                    });
                    if let Some(t0) = c.t0 {
                        let elapsed = now.duration_since(t0).as_secs_f64();
                        timed.retain(|t| match t.when {
                            When::Seconds(s) if s <= elapsed => {
                                ready.push(t.clone());
                                false
                            }
                            _ => true,
                        });
                    }
                    ready
                };
                for t in &ready {
                    fire(t);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let mut last_step_s = 1.0f64;
    let result = {
        let clock = clock.clone();
        let mut callback = |e: &TrainerEvent| {
            if let TrainerEvent::Step(r) = e {
                let now = Instant::now();
                let next = r.step + 1;
                last_step_s = r.seconds;
                let mut c = lock(&clock);
                if c.t0.is_none() {
                    c.t0 = Some(now - Duration::from_secs_f64(r.seconds.max(0.0)));
                }
                c.step = next;
                for t in events.iter().filter(|t| t.when == When::Step(next)) {
                    let delay = match t.action {
                        Action::Kill(_) | Action::KillStage(_) => {
                            Duration::from_secs_f64((last_step_s / 5.0).clamp(0.02, 10.0))
                        }
                        _ => Duration::ZERO,
                    };
                    c.due.push((now + delay, t.clone()));
                }
            }
            let fired = lock(&clock).fired.clone();
            on_event(e, &fired);
        };
        tokio::select! {
            r = trainer.run(&mut callback) => r.map_err(anyhow::Error::from),
            _ = shutdown.wait() => Err(anyhow::anyhow!("interrupted")),
        }
    };
    stop.store(true, Ordering::Relaxed);
    let _ = ticker.join();
    let fired = std::mem::take(&mut lock(&clock).fired);
    (result, fired)
}

fn apply(cluster: &mut Cluster, action: &Action, trainer: SocketAddr) -> String {
    match action {
        Action::Kill(i) => {
            if cluster.kill(*i) {
                format!("killed peer {i}")
            } else {
                format!("peer {i} was not running")
            }
        }
        Action::KillStage(s) => match cluster.kill_one(*s) {
            Some(i) => format!("killed peer {i} (stage {s})"),
            None => format!("no live replica of stage {s} to kill"),
        },
        Action::Join { stage, shape } => match cluster.spawn(*stage, trainer, shape) {
            Ok(i) => format!("started peer {i} for stage {stage}"),
            Err(e) => format!("could not start a peer: {e:#}"),
        },
        Action::Reshape { peer, shape } => match cluster.reshape(*peer, shape) {
            Ok(()) => format!("peer {peer} link now {shape}"),
            Err(e) => format!("could not reshape: {e:#}"),
        },
    }
}
