//! Stopping on request: Ctrl-C (SIGINT), SIGTERM (`kill`, `timeout`, systemd, CI runners) and,
//! for peers started by `swarm demo` / `swarm replay`, the end of their control stdin (the parent
//! is gone).
//!
//! [`install`] (first thing in `main`) starts one thread that receives both signals for the whole
//! process. While some task is waiting on a [`ShutdownSignal`], a signal is delivered to it, so the
//! command stops the way it chose (a demo kills and reaps its peer processes, a peer leaves the
//! swarm). When nobody is waiting (a synchronous phase such as a local baseline run), or at a second
//! signal, the process exits at once with the conventional status (130 or 143): a signal is never
//! swallowed, and never leaves the process running.

use std::sync::OnceLock;

use tokio::sync::watch;

/// The delivery channel of the signal thread: `Some(signal number)` once one arrived.
static SIGNALS: OnceLock<watch::Sender<Option<i32>>> = OnceLock::new();

/// Why the command is asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    /// SIGINT or SIGTERM.
    Signal,
    /// `--control-stdin` ended: whoever started this process is gone.
    StdinClosed,
}

/// Starts the signal thread (idempotent). Until it runs, signals keep their default action.
pub(crate) fn install() -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    if SIGNALS.get().is_some() {
        return Ok(());
    }
    let (tx, _) = watch::channel(None);
    let _ = SIGNALS.set(tx);
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                let tx = SIGNALS.get().expect("set before the thread starts");
                let delivered_before = tx.borrow().is_some();
                if tx.receiver_count() == 0 || delivered_before {
                    std::process::exit(128 + sig);
                }
                tx.send_replace(Some(sig));
            }
        })?;
    Ok(())
}

/// A wait for the next shutdown request. While one exists, signals are delivered to it instead of
/// ending the process.
pub(crate) struct ShutdownSignal {
    signals: Option<watch::Receiver<Option<i32>>>,
    stdin_closed: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl ShutdownSignal {
    /// Subscribes to the signals [`install`] receives (without `install`, only `wait`ing on the
    /// stdin end, if any, returns).
    pub(crate) fn new() -> ShutdownSignal {
        ShutdownSignal {
            signals: SIGNALS.get().map(|tx| tx.subscribe()),
            stdin_closed: None,
        }
    }

    /// Also stops when `rx` fires (the control stdin ended).
    pub(crate) fn with_stdin_closed(mut self, rx: tokio::sync::oneshot::Receiver<()>) -> Self {
        self.stdin_closed = Some(rx);
        self
    }

    /// Resolves at the first request.
    pub(crate) async fn wait(&mut self) -> Reason {
        let signals = self.signals.as_mut();
        let signalled = async move {
            match signals {
                Some(rx) => {
                    if rx.wait_for(|s| s.is_some()).await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
                None => std::future::pending().await,
            }
        };
        let rx = self.stdin_closed.as_mut();
        let stdin_closed = async move {
            match rx {
                Some(rx) => {
                    let _ = rx.await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = signalled => Reason::Signal,
            _ = stdin_closed => Reason::StdinClosed,
        }
    }
}

impl Default for ShutdownSignal {
    fn default() -> Self {
        Self::new()
    }
}
