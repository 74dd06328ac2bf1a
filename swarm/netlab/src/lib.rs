//! A network lab for tests: Linux network namespaces joined by veth links, a "public" segment and
//! home routers that do real NAT with nftables.
//!
//! ```text
//!   [public host]--+                      +--[home host] 192.0.2.2
//!   [public host]--+-- br0 (ns "inet") --+-- wan [router] lan --+--[home host] 192.0.2.3
//!                  |   198.51.100.0/24      198.51.100.x  192.0.2.1/26
//! ```
//!
//! - Every namespace of a [`Lab`] is named `swl<pid>-<seq>-<role>`, so parallel tests never
//!   collide, and a lab left behind by a killed test process (its pid is gone) is deleted by the
//!   next [`Lab::new`].
//! - Dropping a [`Lab`] (also while a test panics) kills every process inside its namespaces and
//!   deletes them; their veth links go with them. Nothing is made in the caller's namespace.
//! - Addresses come from the documentation ranges (RFC 5737): the public segment is
//!   198.51.100.0/24, home LANs are /26 slices of 192.0.2.0/24 and 203.0.113.0/24.
//! - Code runs inside a namespace either as a real process ([`Host::command`], `ip netns exec`) or
//!   on a thread that entered it ([`Host::enter`]): a socket made there stays in that namespace,
//!   so an in-process quinn endpoint can live behind a NAT.
//!
//! The router kinds ([`Nat`]) follow RFC 4787 and n0-computer/patchbay's study of nftables:
//! `snat`/`masquerade` alone do not keep a port across conntrack entries, so endpoint-independent
//! mapping needs an explicit dynamic map from the mapped port to the inside address. That map is
//! keyed by the inside port: two hosts of one LAN must use different ports (a second host on the
//! same port gets a remapped, per-destination port, as behind a symmetric NAT).

#![warn(missing_docs)]

use std::ffi::OsStr;
use std::fs::File;
use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Everything that can go wrong while building or using a lab.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// This machine cannot make network namespaces (not root, no `ip netns`): tests skip.
    #[error("network namespaces cannot be created here: {0}")]
    Unavailable(String),
    /// A tool the lab needs is not installed (`.ci/run` installs them).
    #[error("`{0}` is not installed (apt-get install -y nftables iproute2 conntrack)")]
    Missing(&'static str),
    /// A command exited non-zero.
    #[error("`{cmd}` failed: {stderr}")]
    Command {
        /// The command line.
        cmd: String,
        /// Its standard error.
        stderr: String,
    },
    /// The address plan has no room left.
    #[error("the lab has no room for another {0}")]
    Full(&'static str),
    /// Reading or spawning failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The lab's results.
pub type Result<T> = std::result::Result<T, Error>;

/// Builds a [`Lab`], or prints why namespaces are unavailable and returns from the test.
#[macro_export]
macro_rules! lab_or_skip {
    ($tag:expr) => {
        match $crate::Lab::new($tag) {
            Ok(lab) => lab,
            Err($crate::Error::Unavailable(why)) => {
                eprintln!("skipped: {why}");
                return;
            }
            Err(e) => panic!("cannot build the network lab: {e}"),
        }
    };
}

/// How a home router translates and filters (RFC 4787 terms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// Typical home router: endpoint-independent mapping (one outside port per inside socket,
    /// whatever the destination) and address-and-port-dependent filtering (inbound only from
    /// where the inside sent to). Punchable.
    Home,
    /// Endpoint-dependent mapping: a fresh random outside port per destination
    /// (`masquerade random`), same filtering. Not punchable: needs a relay.
    Symmetric,
    /// [`Nat::Home`], and outbound UDP is dropped except to `allow` (a firewall that lets one
    /// service through).
    UdpBlocked {
        /// The one IPv4 address outbound UDP may reach.
        allow: Ipv4Addr,
    },
}

/// The public segment's prefix.
pub const PUBLIC_NET: [u8; 3] = [198, 51, 100];
/// Home LAN slices: eight /26 (four in each range).
const LAN_BASES: [[u8; 3]; 2] = [[192, 0, 2], [203, 0, 113]];
const MAX_ROUTERS: u32 = 8;
const NS_PREFIX: &str = "swl";

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A set of namespaces with a public segment; deleted on drop.
pub struct Lab {
    prefix: String,
    inet: String,
    /// Every namespace made, the public segment first.
    namespaces: Vec<String>,
    next_public: u32,
    next_port: u32,
    routers: u32,
}

/// A machine: one namespace with one address.
#[derive(Debug, Clone)]
pub struct Host {
    ns: String,
    ip: Ipv4Addr,
}

/// A home router; hosts behind it reach the public segment through its NAT.
#[derive(Debug, Clone)]
pub struct Router {
    host: Host,
    nat: Nat,
    lan_base: [u8; 4],
    next_host: u32,
}

impl Lab {
    /// A new empty lab with its public segment. `tag` (a few letters) names its namespaces so a
    /// leftover is recognisable. Deletes labs of dead processes first.
    #[allow(unsafe_code)] // libc::geteuid: see the SAFETY comment inside
    pub fn new(tag: &str) -> Result<Lab> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(Error::Unavailable("not root".into()));
        }
        match Command::new("ip").arg("-V").output() {
            Ok(_) => {}
            Err(_) => return Err(Error::Missing("ip")),
        }
        if Command::new("nft").arg("--version").output().is_err() {
            return Err(Error::Missing("nft"));
        }
        remove_stale();
        let tag: String = tag
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .take(8)
            .collect();
        let prefix = format!(
            "{NS_PREFIX}{}-{}-{tag}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let inet = format!("{prefix}-inet");
        let out = Command::new("ip").args(["netns", "add", &inet]).output()?;
        if !out.status.success() {
            return Err(Error::Unavailable(format!(
                "`ip netns add` failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let lab = Lab {
            prefix,
            inet: inet.clone(),
            namespaces: vec![inet.clone()],
            next_public: 1,
            next_port: 0,
            routers: 0,
        };
        ip(&["-n", &inet, "link", "set", "lo", "up"])?;
        ip(&["-n", &inet, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &inet, "link", "set", "br0", "up"])?;
        // Nothing routes between namespaces but the bridge; keep it a plain switch.
        lab.sysctl(&inet, "net.ipv6.conf.all.disable_ipv6", "1")?;
        Ok(lab)
    }

    /// The namespaces made so far (the public segment first).
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    fn add_ns(&mut self, role: &str) -> Result<String> {
        let ns = format!("{}-{role}", self.prefix);
        ip(&["netns", "add", &ns])?;
        self.namespaces.push(ns.clone());
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn sysctl(&self, ns: &str, key: &str, value: &str) -> Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        run(Command::new("ip").args([
            "netns",
            "exec",
            ns,
            "sh",
            "-c",
            &format!("echo {value} > {path}"),
        ]))
    }

    /// The next free address of the public segment.
    fn next_public_ip(&mut self) -> Result<Ipv4Addr> {
        if self.next_public > 250 {
            return Err(Error::Full("public address"));
        }
        let addr = Ipv4Addr::new(
            PUBLIC_NET[0],
            PUBLIC_NET[1],
            PUBLIC_NET[2],
            self.next_public as u8,
        );
        self.next_public += 1;
        Ok(addr)
    }

    /// Plugs interface `ifname` of `ns` into the public switch and gives it the next public
    /// address.
    fn plug_public(&mut self, ns: &str, ifname: &str) -> Result<Ipv4Addr> {
        let addr = self.next_public_ip()?;
        let port = format!("p{}", self.next_port);
        self.next_port += 1;
        let inet = self.inet.clone();
        ip(&[
            "link", "add", ifname, "netns", ns, "type", "veth", "peer", "name", &port, "netns",
            &inet,
        ])?;
        ip(&["-n", &inet, "link", "set", &port, "master", "br0", "up"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            ifname,
        ])?;
        ip(&["-n", ns, "link", "set", ifname, "up"])?;
        Ok(addr)
    }

    /// A host with a public address (a trainer, a rendezvous server, a volunteer with a port
    /// forward).
    pub fn public_host(&mut self, role: &str) -> Result<Host> {
        let ns = self.add_ns(role)?;
        let ip = self.plug_public(&ns, "eth0")?;
        Ok(Host { ns, ip })
    }

    /// Makes `host` (made by [`Lab::public_host`]) dual-stack: an IPv6 address on the public
    /// segment (`2001:db8:100::N`, N its IPv4 host number, as a home line with native IPv6 gets
    /// one) and default routes of both families onto the segment, so a program asking which
    /// interface reaches the internet gets an answer. Returns the IPv6 address.
    pub fn dual_stack(&mut self, host: &Host) -> Result<Ipv6Addr> {
        let n = host.ip.octets()[3] as u16;
        let addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, n);
        self.sysctl(&host.ns, "net.ipv6.conf.all.disable_ipv6", "0")?;
        ip(&[
            "-n",
            &host.ns,
            "addr",
            "add",
            &format!("{addr}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        ip(&["-n", &host.ns, "route", "add", "default", "dev", "eth0"])?;
        ip(&[
            "-n", &host.ns, "-6", "route", "add", "default", "dev", "eth0",
        ])?;
        Ok(addr)
    }

    /// Gives `host` (made by [`Lab::public_host`]) a second public address, as a server with two
    /// IPs: a reachability checker there tells a firewall that lets UDP reach only the first
    /// address from a NAT that can be punched (the RFC 5780 behaviour tests need two IPs).
    pub fn add_public_ip(&mut self, host: &Host) -> Result<Ipv4Addr> {
        let addr = self.next_public_ip()?;
        ip(&[
            "-n",
            &host.ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ])?;
        Ok(addr)
    }

    /// A home router doing `nat` between its LAN and the public segment.
    pub fn router(&mut self, role: &str, nat: Nat) -> Result<Router> {
        if self.routers >= MAX_ROUTERS {
            return Err(Error::Full("router"));
        }
        let k = self.routers;
        self.routers += 1;
        let b = LAN_BASES[(k / 4) as usize];
        let lan_base = [b[0], b[1], b[2], (64 * (k % 4)) as u8];
        let ns = self.add_ns(role)?;
        let wan = self.plug_public(&ns, "wan")?;
        let lan_ip = Ipv4Addr::new(lan_base[0], lan_base[1], lan_base[2], lan_base[3] + 1);
        ip(&["-n", &ns, "link", "add", "lan", "type", "bridge"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{lan_ip}/26"),
            "dev",
            "lan",
        ])?;
        ip(&["-n", &ns, "link", "set", "lan", "up"])?;
        self.sysctl(&ns, "net.ipv4.ip_forward", "1")?;
        nft(&ns, &nat_rules(nat, wan))?;
        Ok(Router {
            host: Host { ns, ip: wan },
            nat,
            lan_base,
            next_host: 2,
        })
    }

    /// A host on `router`'s LAN, its default route through the router.
    pub fn home_host(&mut self, router: &mut Router, role: &str) -> Result<Host> {
        if router.next_host > 62 {
            return Err(Error::Full("home host"));
        }
        let b = router.lan_base;
        let addr = Ipv4Addr::new(b[0], b[1], b[2], b[3] + router.next_host as u8);
        router.next_host += 1;
        let ns = self.add_ns(role)?;
        let port = format!("h{}", self.next_port);
        self.next_port += 1;
        ip(&[
            "link",
            "add",
            "eth0",
            "netns",
            &ns,
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "netns",
            &router.host.ns,
        ])?;
        ip(&[
            "-n",
            &router.host.ns,
            "link",
            "set",
            &port,
            "master",
            "lan",
            "up",
        ])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/26"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&[
            "-n",
            &ns,
            "route",
            "add",
            "default",
            "via",
            &router.lan_ip().to_string(),
        ])?;
        Ok(Host { ns, ip: addr })
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            delete_ns(ns);
        }
    }
}

impl Host {
    /// The host's address (for a router: its public WAN address).
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The namespace's name (for `ip netns exec`).
    pub fn netns(&self) -> &str {
        &self.ns
    }

    /// A command that runs `program` inside this host's namespace. The lab kills it on drop if
    /// it still runs; tests should still own and reap their children.
    ///
    /// The child enters the namespace between fork and exec, so once `spawn` returns the process
    /// is inside it and the lab's teardown finds it. (`ip netns exec` entered only after its own
    /// start, and a teardown right after `spawn` could miss it: the process then outlived the lab.)
    #[allow(unsafe_code)] // CommandExt::pre_exec: see the SAFETY comment inside
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        use std::os::unix::process::CommandExt;
        let Ok(file) = File::open(Path::new("/var/run/netns").join(&self.ns)) else {
            // The namespace is gone: let `ip` say so when the command runs.
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", &self.ns]).arg(program);
            return cmd;
        };
        let mut cmd = Command::new(program);
        // SAFETY: the closure runs in the forked child before exec and only calls setns(2), which
        // is async-signal-safe, on a descriptor opened before the fork (std opens it close-on-exec,
        // so the program does not inherit it).
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// Runs `f` on a thread that entered this host's network namespace. Sockets `f` makes belong
    /// to the namespace for their whole life, whichever thread uses them later.
    #[allow(unsafe_code)] // libc::setns: see the SAFETY comment inside
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let file = File::open(Path::new("/var/run/netns").join(&self.ns))?;
        let joined = std::thread::scope(|s| {
            s.spawn(move || {
                // SAFETY: setns on a valid namespace fd only changes this (fresh) thread's
                // network namespace.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    return Err(Error::Io(std::io::Error::last_os_error()));
                }
                Ok(f())
            })
            .join()
        });
        match joined {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// A UDP socket bound inside this namespace (port 0 = any).
    pub fn udp_bind(&self, port: u16) -> Result<UdpSocket> {
        let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
        Ok(self.enter(|| UdpSocket::bind(addr))??)
    }
}

impl Router {
    /// The router as a host (its namespace; [`Host::ip`] is the WAN address).
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// The public (WAN) address every inside host appears from.
    pub fn wan_ip(&self) -> Ipv4Addr {
        self.host.ip
    }

    /// The router's address on its LAN (the hosts' gateway).
    pub fn lan_ip(&self) -> Ipv4Addr {
        let b = self.lan_base;
        Ipv4Addr::new(b[0], b[1], b[2], b[3] + 1)
    }

    /// The NAT this router does.
    pub fn nat(&self) -> Nat {
        self.nat
    }

    /// Rebinds: from now on every new mapping leaves from a port in `ports` instead of the
    /// inside port, and only replies to what the inside sent come back in (the endpoint-
    /// independent port map is gone), then forgets every mapping. Every flow through the router
    /// thus continues from a new public port that no peer outside knows, as behind a
    /// carrier-grade NAT that reassigns ports. Not for a symmetric router.
    pub fn rebind(&self, ports: (u16, u16)) -> Result<()> {
        let wan = self.host.ip;
        let script = format!(
            "delete table ip nat
table ip nat {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname \"wan\" meta l4proto udp snat ip to {wan}:{}-{}
    oifname \"wan\" snat ip to {wan}
  }}
}}
",
            ports.0, ports.1
        );
        nft(&self.host.ns, &script)?;
        self.flush_conntrack()
    }

    /// Replaces the router's NAT behaviour with `nat`, as when its owner swaps or reconfigures
    /// it mid-run, and forgets every mapping.
    pub fn set_nat(&mut self, nat: Nat) -> Result<()> {
        let script = format!(
            "delete table ip nat\ndelete table ip filter\n{}",
            nat_rules(nat, self.host.ip)
        );
        nft(&self.host.ns, &script)?;
        self.nat = nat;
        self.flush_conntrack()
    }

    /// Forgets every mapping, as a router that reboots or times its table out: conntrack
    /// entries and the endpoint-independent port map. Inbound traffic is dropped until an inside
    /// host sends again, and may then appear from another port.
    pub fn flush_mappings(&self) -> Result<()> {
        if !matches!(self.nat, Nat::Symmetric) {
            nft(&self.host.ns, "flush map ip nat fullcone\n")?;
        }
        self.flush_conntrack()
    }

    fn flush_conntrack(&self) -> Result<()> {
        match self.host.command("conntrack").args(["-F"]).output() {
            Err(_) => Err(Error::Missing("conntrack")),
            Ok(o) if o.status.success() => Ok(()),
            // `conntrack -F` on an empty table says so on stderr and still succeeds; anything
            // else is a failure.
            Ok(o) => Err(Error::Command {
                cmd: "conntrack -F".into(),
                stderr: String::from_utf8_lossy(&o.stderr).trim().to_string(),
            }),
        }
    }
}

/// The nftables ruleset of a router whose WAN interface is `wan` with address `wan_ip`.
pub fn nat_rules(nat: Nat, wan_ip: Ipv4Addr) -> String {
    // Inbound: only replies to what the inside sent (APDF). A prerouting nat chain must exist
    // even when empty, or the kernel skips reverse NAT on inbound packets.
    let mut filter = String::from(
        "table ip filter {\n  chain forward {\n    type filter hook forward priority 0; policy accept;\n    iifname \"wan\" ct state established,related accept\n    iifname \"wan\" drop\n",
    );
    if let Nat::UdpBlocked { allow } = nat {
        filter.push_str(&format!(
            "    iifname \"lan\" meta l4proto udp ip daddr != {allow} drop\n"
        ));
    }
    filter.push_str("  }\n}\n");
    let nat_table = match nat {
        Nat::Home | Nat::UdpBlocked { .. } => format!(
            "table ip nat {{
  map fullcone {{
    type inet_service : ipv4_addr . inet_service
    flags dynamic,timeout
    timeout 300s
    size 65536
  }}
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname \"wan\" meta l4proto udp dnat ip to udp dport map @fullcone
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname \"wan\" meta l4proto udp update @fullcone {{ udp sport timeout 300s : ip saddr . udp sport }}
    oifname \"wan\" snat ip to {wan_ip}
  }}
}}
"
        ),
        Nat::Symmetric => "table ip nat {
  chain prerouting {
    type nat hook prerouting priority dstnat; policy accept;
  }
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    oifname \"wan\" masquerade random
  }
}
"
        .to_string(),
    };
    format!("{nat_table}{filter}")
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Command {
            cmd: format!("{cmd:?}"),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args))
}

/// Loads an nftables script into namespace `ns`.
fn nft(ns: &str, script: &str) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Command {
            cmd: format!("nft -f - (in {ns})"),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Kills what runs inside `ns` (processes the lab's tests started there), then deletes it.
/// Bounded: gives the kernel up to 2 s to reap them.
#[allow(unsafe_code)] // libc::kill: see the SAFETY comment inside
fn delete_ns(ns: &str) {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let pids = ns_pids(ns);
        if pids.is_empty() || Instant::now() > deadline {
            break;
        }
        for pid in pids {
            // SAFETY: kill with a pid read from `ip netns pids` of our own namespace.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = Command::new("ip")
        .args(["netns", "del", ns])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn ns_pids(ns: &str) -> Vec<i32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The lab namespaces present on this machine, with the pid of the process that made them.
pub fn lab_namespaces() -> Vec<(String, u32)> {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let name = l.split_whitespace().next()?;
            let rest = name.strip_prefix(NS_PREFIX)?;
            let pid = rest.split('-').next()?.parse().ok()?;
            Some((name.to_string(), pid))
        })
        .collect()
}

/// Deletes namespaces of labs whose process is gone (a test killed before its drop ran).
fn remove_stale() {
    for (ns, pid) in lab_namespaces() {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            delete_ns(&ns);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn home_rules_map_endpoint_independently_and_filter_inbound() {
        let r = nat_rules(Nat::Home, Ipv4Addr::new(198, 51, 100, 7));
        assert!(r.contains("update @fullcone"));
        assert!(r.contains("snat ip to 198.51.100.7"));
        assert!(r.contains("ct state established,related accept"));
        assert!(!r.contains("random"));
    }

    #[test]
    fn symmetric_rules_randomise_ports() {
        let r = nat_rules(Nat::Symmetric, Ipv4Addr::new(198, 51, 100, 7));
        assert!(r.contains("masquerade random"));
        assert!(!r.contains("fullcone"));
    }

    #[test]
    fn blocked_rules_drop_outbound_udp_but_to_one_address() {
        let r = nat_rules(
            Nat::UdpBlocked {
                allow: Ipv4Addr::new(198, 51, 100, 1),
            },
            Ipv4Addr::new(198, 51, 100, 7),
        );
        assert!(r.contains("ip daddr != 198.51.100.1 drop"));
    }
}
