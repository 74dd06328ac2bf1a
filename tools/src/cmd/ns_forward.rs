//! A TCP port of the demo's own network namespace forwarded into a lab namespace: under
//! `swarm demo --nat` the trainer (and its monitor) runs inside the lab, where the user's browser
//! cannot reach it; the demo listens where the browser is and carries each connection across.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use swarm_netlab::Host;

/// Connections carried at once; more wait in the listen backlog.
const MAX_CONNS: usize = 32;
/// How long a connection into the namespace may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A running forwarder; stops (and frees its port) on drop.
pub(crate) struct Forward {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Forward {
    /// Listens at `local` here and carries each connection to `target` inside `host`'s namespace.
    pub(crate) fn start(
        local: SocketAddr,
        host: &Host,
        target: SocketAddr,
    ) -> anyhow::Result<Forward> {
        let listener = TcpListener::bind(local).with_context(|| format!("binding {local}"))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let (host, flag) = (host.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let open = Arc::new(AtomicUsize::new(0));
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((down, _)) if open.load(Ordering::Relaxed) < MAX_CONNS => {
                        let up =
                            host.enter(|| TcpStream::connect_timeout(&target, CONNECT_TIMEOUT));
                        match up {
                            Ok(Ok(up)) => splice(down, up, open.clone()),
                            Ok(Err(e)) => {
                                tracing::debug!(%target, error = %e, "forward: no answer inside")
                            }
                            Err(e) => {
                                tracing::debug!(error = %e, "forward: cannot enter the namespace")
                            }
                        }
                    }
                    // Over the cap: closed at once; the browser retries.
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "forward: accept failed");
                        std::thread::sleep(Duration::from_millis(20))
                    }
                }
            }
        });
        Ok(Forward {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// Where it listens (the port chosen when `local` asked for port 0).
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Copies both ways between `a` and `b` on two threads until either side closes.
fn splice(a: TcpStream, b: TcpStream, open: Arc<AtomicUsize>) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    open.fetch_add(1, Ordering::Relaxed);
    let copy = |mut from: TcpStream, mut to: TcpStream| {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    };
    std::thread::spawn(move || copy(b2, a2));
    std::thread::spawn(move || {
        copy(a, b);
        open.fetch_sub(1, Ordering::Relaxed);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use swarm_netlab::Lab;

    #[test]
    fn a_connection_here_reaches_a_server_inside_the_namespace_and_back() {
        let mut lab = match Lab::new("fwd") {
            Ok(l) => l,
            Err(swarm_netlab::Error::Unavailable(why)) => {
                eprintln!("skipped: {why}");
                return;
            }
            Err(e) => panic!("cannot build the network lab: {e}"),
        };
        let host = lab.public_host("srv").unwrap();
        // A server on the namespace's own loopback: unreachable from here but through the
        // forwarder. It answers each line with the line reversed.
        let listener = host
            .enter(|| TcpListener::bind("127.0.0.1:0"))
            .unwrap()
            .unwrap();
        let target = listener.local_addr().unwrap();
        assert!(
            TcpStream::connect_timeout(&target, Duration::from_millis(300)).is_err(),
            "the server must not be reachable from here directly"
        );
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            got.reverse();
            s.write_all(&got).unwrap();
        });
        let fwd = Forward::start("127.0.0.1:0".parse().unwrap(), &host, target).unwrap();
        let mut c = TcpStream::connect(fwd.addr()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        c.write_all(&payload).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut back = Vec::new();
        c.read_to_end(&mut back).unwrap();
        let mut want = payload;
        want.reverse();
        assert_eq!(back, want);
        server.join().unwrap();
        let port = fwd.addr();
        drop(fwd);
        // Stopped: its port is free again.
        TcpListener::bind(port).expect("the forwarder's port is freed on drop");
    }
}
