//! The swarm's monitor (issue #15): an HTTP server, on the caller's tokio runtime or a thread of
//! its own, serving
//!
//! - `/`: one self-contained page (HTML, CSS and JS embedded in the binary, no CDN) that polls
//!   the state twice a second and draws its plots itself;
//! - `/api/v1/state`: the state as versioned JSON (the trainer's
//!   [`swarm_core::trainer::observe::Snapshot`], or a volunteer's [`VolunteerState`]);
//! - `/metrics`: Prometheus text exposition (format 0.0.4) from `prometheus-client`, one
//!   `Registry` per server, whose collector reads the same state at each scrape.
//!
//! It is read-only: only GET and HEAD, nothing reaches back into the run. It listens on loopback
//! unless told otherwise; a non-loopback address needs `allow_public` and then a bearer token on
//! every request. Requests are bounded (header bytes, header count, time to send the headers,
//! concurrent connections) and each excess gets a clear HTTP refusal.

#![warn(missing_docs)]

pub mod client;
mod http;
mod prom;
mod volunteer;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use swarm_core::trainer::observe::Snapshot;
use tokio::sync::watch;

pub use prom::{trainer_registry, volunteer_registry};
pub use volunteer::{VOLUNTEER_SCHEMA_VERSION, VolunteerState};

/// Errors of the monitor.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A non-loopback address without `allow_public`.
    #[error(
        "refusing to serve the monitor on {0}: not a loopback address (pass the public flag and a bearer token to allow it)"
    )]
    PublicWithoutFlag(SocketAddr),
    /// A public bind without a usable token.
    #[error(
        "a monitor on a public address needs a bearer token of at least {MIN_TOKEN_LEN} characters"
    )]
    MissingToken,
    /// The socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why binding failed.
        source: std::io::Error,
    },
}

/// Shortest accepted bearer token.
pub const MIN_TOKEN_LEN: usize = 16;

/// How the server listens and what it tolerates.
#[derive(Clone, Debug)]
pub struct HttpConfig {
    /// Where to listen (loopback unless `allow_public`).
    pub addr: SocketAddr,
    /// Required for a non-loopback `addr`.
    pub allow_public: bool,
    /// Bearer token every request must carry (`Authorization: Bearer T`, or `?token=T` for a
    /// browser opening the page). Required on a public address; optional on loopback.
    pub token: Option<String>,
    /// Connections served at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// Bytes of request line + headers; more are answered 431.
    pub max_header_bytes: usize,
    /// Headers per request; more are answered 431.
    pub max_headers: usize,
    /// A client must send its headers within this time.
    pub header_timeout: Duration,
    /// A connection is closed after this long (a polling browser reconnects).
    pub max_connection_age: Duration,
}

impl HttpConfig {
    /// Loopback-only defaults for `addr`.
    pub fn new(addr: SocketAddr) -> HttpConfig {
        HttpConfig {
            addr,
            allow_public: false,
            token: None,
            max_connections: 64,
            max_header_bytes: 16 * 1024,
            max_headers: 64,
            header_timeout: Duration::from_secs(5),
            max_connection_age: Duration::from_secs(300),
        }
    }

    /// Checks the security rules: loopback, or public with the flag and a token.
    pub fn check(&self) -> Result<(), Error> {
        if !self.addr.ip().is_loopback() && !self.allow_public {
            return Err(Error::PublicWithoutFlag(self.addr));
        }
        let token_ok = self
            .token
            .as_ref()
            .is_some_and(|t| t.len() >= MIN_TOKEN_LEN && t.bytes().all(|b| b.is_ascii_graphic()));
        if self.token.is_some() && !token_ok {
            return Err(Error::MissingToken);
        }
        if !self.addr.ip().is_loopback() && !token_ok {
            return Err(Error::MissingToken);
        }
        Ok(())
    }
}

/// What a server shows.
#[derive(Clone, Debug)]
pub enum Source {
    /// The trainer's snapshot (published by the driver).
    Trainer(watch::Receiver<Arc<Snapshot>>),
    /// A volunteer's own state (`swarm join --metrics`).
    Volunteer(watch::Receiver<Arc<VolunteerState>>),
}

/// A running monitor; stops when dropped.
#[derive(Debug)]
pub struct Monitor {
    addr: SocketAddr,
    runner: Runner,
}

#[derive(Debug)]
enum Runner {
    /// A task on the caller's runtime.
    Task(tokio::task::JoinHandle<()>),
    /// Its own thread and single-threaded runtime.
    Thread {
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        thread: Option<std::thread::JoinHandle<()>>,
        /// The thread's id in `/proc/self/task`, where the kernel counts its CPU time.
        tid: Option<u32>,
    },
}

impl Monitor {
    /// Binds `cfg.addr` (after [`HttpConfig::check`]) and serves `source` on the current tokio
    /// runtime.
    pub async fn start(cfg: HttpConfig, source: Source) -> Result<Monitor, Error> {
        cfg.check()?;
        let listener = bind(cfg.addr).await?;
        let addr = local_addr(&listener, cfg.addr)?;
        let task = tokio::spawn(http::serve(listener, cfg, source));
        tracing::info!(%addr, "monitor listening");
        Ok(Monitor {
            addr,
            runner: Runner::Task(task),
        })
    }

    /// Like [`Monitor::start`], but serves from a thread of its own with a single-threaded
    /// runtime: readers then never take a worker of the training's runtime, and the kernel
    /// counts the serving's CPU time on that thread alone ([`Monitor::cpu_seconds`]).
    pub fn start_on_own_thread(cfg: HttpConfig, source: Source) -> Result<Monitor, Error> {
        cfg.check()?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let bind_addr = cfg.addr;
        let thread = std::thread::Builder::new()
            .name("swarm-monitor".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(source) => {
                        let _ = ready_tx.send(Err(Error::Bind {
                            addr: bind_addr,
                            source,
                        }));
                        return;
                    }
                };
                rt.block_on(async move {
                    let bound = match bind(cfg.addr).await {
                        Ok(l) => local_addr(&l, cfg.addr).map(|a| (l, a)),
                        Err(e) => Err(e),
                    };
                    let listener = match bound {
                        Ok((l, addr)) => {
                            let _ = ready_tx.send(Ok((addr, cpu::current_tid())));
                            l
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    tokio::select! {
                        () = http::serve(listener, cfg, source) => {}
                        _ = stopped => {}
                    }
                });
            })
            .map_err(|source| Error::Bind {
                addr: bind_addr,
                source,
            })?;
        let (addr, tid) = ready_rx.recv().map_err(|_| Error::Bind {
            addr: bind_addr,
            source: std::io::Error::other("the monitor thread ended before binding"),
        })??;
        tracing::info!(%addr, "monitor listening on its own thread");
        Ok(Monitor {
            addr,
            runner: Runner::Thread {
                stop: Some(stop),
                thread: Some(thread),
                tid,
            },
        })
    }

    /// The bound address (the port chosen when `addr` had port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The page's URL.
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// CPU seconds the serving thread has used so far (user + system, from the kernel's
    /// scheduler statistics, in nanoseconds): `None` for a monitor on the caller's runtime, or
    /// where `/proc` does not say.
    pub fn cpu_seconds(&self) -> Option<f64> {
        let Runner::Thread { tid: Some(tid), .. } = &self.runner else {
            return None;
        };
        cpu::thread_seconds(*tid)
    }
}

async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, Error> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })
}

fn local_addr(l: &tokio::net::TcpListener, asked: SocketAddr) -> Result<SocketAddr, Error> {
    l.local_addr().map_err(|source| Error::Bind {
        addr: asked,
        source,
    })
}

/// How the monitor's serving cost is measured: the CPU time the kernel counts on one thread of
/// this process (Linux `/proc`; `None` elsewhere).
pub mod cpu {
    /// The calling thread's kernel id (`/proc/thread-self` links to `PID/task/TID`).
    pub fn current_tid() -> Option<u32> {
        let link = std::fs::read_link("/proc/thread-self").ok()?;
        link.file_name()?.to_str()?.parse().ok()
    }

    /// CPU seconds thread `tid` of this process has run so far (the scheduler's own count, in
    /// nanoseconds: `/proc/self/task/TID/schedstat`).
    pub fn thread_seconds(tid: u32) -> Option<f64> {
        let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
        let ns: u64 = s.split_whitespace().next()?.parse().ok()?;
        Some(ns as f64 / 1e9)
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        match &mut self.runner {
            Runner::Task(task) => task.abort(),
            Runner::Thread { stop, thread, .. } => {
                if let Some(stop) = stop.take() {
                    let _ = stop.send(());
                }
                // The thread ends at its next poll; joining keeps its port from outliving us.
                if let Some(t) = thread.take() {
                    let _ = t.join();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_binds_need_the_flag_and_a_token() {
        let lo: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let public: SocketAddr = "0.0.0.0:0".parse().unwrap();
        assert!(HttpConfig::new(lo).check().is_ok());
        assert!(matches!(
            HttpConfig::new(public).check(),
            Err(Error::PublicWithoutFlag(_))
        ));
        let mut c = HttpConfig::new(public);
        c.allow_public = true;
        assert!(matches!(c.check(), Err(Error::MissingToken)));
        c.token = Some("short".into());
        assert!(matches!(c.check(), Err(Error::MissingToken)));
        c.token = Some("0123456789abcdef0123".into());
        assert!(c.check().is_ok());
    }

    #[test]
    fn a_thread_s_cpu_time_grows_while_it_works() {
        let tid = cpu::current_tid().expect("/proc/thread-self");
        let before = cpu::thread_seconds(tid).unwrap();
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
        }
        let after = cpu::thread_seconds(tid).unwrap();
        assert!(after > before, "{before} -> {after}");
        // A thread that does not exist in this process has no count.
        assert!(cpu::thread_seconds(u32::MAX).is_none());
    }
}
