//! The swarm's monitor (issue #15): an HTTP server on the caller's tokio runtime serving
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
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Shortest accepted bearer token.
pub const MIN_TOKEN_LEN: usize = 16;

/// How the server listens and what it tolerates.
#[derive(Clone, Debug)]
pub struct HttpConfig {
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
    task: tokio::task::JoinHandle<()>,
}

impl Monitor {
    /// Binds `cfg.addr` (after [`HttpConfig::check`]) and serves `source` on the current tokio
    /// runtime.
    pub async fn start(cfg: HttpConfig, source: Source) -> Result<Monitor, Error> {
        cfg.check()?;
        let listener = tokio::net::TcpListener::bind(cfg.addr)
            .await
            .map_err(|source| Error::Bind {
                addr: cfg.addr,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| Error::Bind {
            addr: cfg.addr,
            source,
        })?;
        let task = tokio::spawn(http::serve(listener, cfg, source));
        tracing::info!(%addr, "monitor listening");
        Ok(Monitor { addr, task })
    }

    /// The bound address (the port chosen when `addr` had port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The page's URL.
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.task.abort();
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
}
