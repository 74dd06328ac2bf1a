//! Reachability of a peer, from what others observed of it.
//!
//! At join, the joiner's one UDP socket talks to two observer endpoints of public peers (two
//! ports of the trainer, or the trainer and a volunteer); each reports the source address it saw
//! (the NAT mapping). Then an observer the joiner never sent to dials it back. From that:
//!
//! - the dial-back arrived: **public** (no NAT, a port forward, or a NAT that filters nothing);
//! - every observer saw the same mapping: **punchable** (endpoint-independent mapping, RFC 4787);
//! - observers saw different mappings: **symmetric** (a port per destination): needs a relay;
//! - some observers never answered while others did: **blocked** (UDP filtered except to a few
//!   addresses): needs a relay;
//! - a single observation: **unknown**; hole punching is tried and the relay is the fallback.
//!
//! Only observations of the same address family are compared: a v4 and a v6 mapping differ by
//! nature.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

/// The verdict's class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reachability {
    /// Reachable by anyone at its announced address.
    Public,
    /// Behind a NAT with endpoint-independent mapping: reachable by coordinated hole punching.
    Punchable,
    /// Behind a NAT that maps each destination to its own port: only a relay reaches it.
    Symmetric,
    /// UDP is filtered except to some addresses: only a relay reaches it.
    Blocked,
    /// Not enough observations to tell: punching is tried, the relay is the fallback.
    Unknown,
}

impl Reachability {
    /// Its name in JSON, logs and `swarm join`'s advice.
    pub fn as_str(self) -> &'static str {
        match self {
            Reachability::Public => "public",
            Reachability::Punchable => "punchable",
            Reachability::Symmetric => "symmetric",
            Reachability::Blocked => "blocked",
            Reachability::Unknown => "unknown",
        }
    }

    /// Whether other peers can reach it without a relay (directly or by punching).
    pub fn direct_possible(self) -> bool {
        matches!(
            self,
            Reachability::Public | Reachability::Punchable | Reachability::Unknown
        )
    }

    /// A compact code for the wire.
    pub fn code(self) -> u8 {
        match self {
            Reachability::Unknown => 0,
            Reachability::Public => 1,
            Reachability::Punchable => 2,
            Reachability::Symmetric => 3,
            Reachability::Blocked => 4,
        }
    }

    /// The inverse of [`Reachability::code`]; `None` for an unknown code.
    pub fn from_code(c: u8) -> Option<Reachability> {
        Some(match c {
            0 => Reachability::Unknown,
            1 => Reachability::Public,
            2 => Reachability::Punchable,
            3 => Reachability::Symmetric,
            4 => Reachability::Blocked,
            _ => return None,
        })
    }
}

impl fmt::Display for Reachability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a connection between two peers runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PathKind {
    /// One side dialed the other's announced address.
    Direct,
    /// Both sides' NATs were opened by a coordinated hole punch.
    Punched,
    /// Datagrams pass through a relay peer (TLS stays end to end).
    Relayed,
}

impl PathKind {
    /// Its name in JSON and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::Punched => "punched",
            PathKind::Relayed => "relayed",
        }
    }
}

impl fmt::Display for PathKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PathKind {
    type Err = String;
    fn from_str(s: &str) -> Result<PathKind, String> {
        match s {
            "direct" => Ok(PathKind::Direct),
            "punched" => Ok(PathKind::Punched),
            "relayed" => Ok(PathKind::Relayed),
            other => Err(format!("path `{other}` (use direct, punched, relayed)")),
        }
    }
}

/// What a reachability check saw of one peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observations {
    /// The peer's own socket addresses (what it would announce without a NAT).
    pub local: Vec<SocketAddr>,
    /// For each observer that answered: (the observer's endpoint, the source address it saw).
    pub mapped: Vec<(SocketAddr, SocketAddr)>,
    /// Observer endpoints probed that never answered.
    pub unanswered: Vec<SocketAddr>,
    /// Whether a dial-back from a source the peer never sent to arrived (`None`: not tried).
    pub dial_back: Option<bool>,
}

/// A classified peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Verdict {
    /// How others can reach the peer.
    pub reachability: Reachability,
    /// The address others should use for it: the mapping observers agree on (or the first one).
    pub public_addr: Option<SocketAddr>,
    /// Whether the observed address differs from every local one (there is a NAT).
    pub behind_nat: bool,
}

/// Classifies a peer from its observations (see the module doc for the rules).
pub fn classify(obs: &Observations) -> Verdict {
    let first = obs.mapped.first().map(|&(_, m)| m);
    let behind_nat = first.is_some_and(|m| !obs.local.contains(&m));
    let verdict = |reachability| Verdict {
        reachability,
        public_addr: first,
        behind_nat,
    };
    let Some(first) = first else {
        // Nobody answered at all.
        return verdict(Reachability::Blocked);
    };
    if obs.dial_back == Some(true) {
        return verdict(Reachability::Public);
    }
    if !obs.unanswered.is_empty() {
        return verdict(Reachability::Blocked);
    }
    let same_family: Vec<&(SocketAddr, SocketAddr)> = obs
        .mapped
        .iter()
        .filter(|(_, m)| m.is_ipv4() == first.is_ipv4())
        .collect();
    if same_family.iter().any(|&&(_, m)| m != first) {
        return verdict(Reachability::Symmetric);
    }
    let mut observers: Vec<SocketAddr> = same_family.iter().map(|&&(o, _)| o).collect();
    observers.sort();
    observers.dedup();
    if observers.len() >= 2 {
        verdict(Reachability::Punchable)
    } else {
        verdict(Reachability::Unknown)
    }
}

/// How peer `from` gets a connection to peer `to`, given their verdicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// `from` dials `to` at its announced address.
    Direct,
    /// `to` cannot be dialed but `from` can: the coordinator asks `to` to dial `from`.
    Reverse,
    /// Both behind punchable NATs: the coordinator starts a hole punch on both.
    Punch,
    /// No direct path can be made: a relay carries the connection.
    Relay,
}

/// The plan for a connection from a peer classified `from` to one classified `to`.
pub fn plan(from: Reachability, to: Reachability) -> Plan {
    use Reachability::*;
    match (from, to) {
        (_, Public) => Plan::Direct,
        (Public, Punchable | Unknown | Symmetric) => Plan::Reverse,
        (Punchable | Unknown, Punchable | Unknown) => Plan::Punch,
        _ => Plan::Relay,
    }
}

/// What `swarm join` tells the operator about a verdict (Petals prints similar advice).
pub fn advice(v: &Verdict, listen_port: u16) -> String {
    let addr = v
        .public_addr
        .map(|a| a.to_string())
        .unwrap_or_else(|| "unknown".into());
    match v.reachability {
        Reachability::Public => {
            format!("reachable at {addr}: other peers connect to you directly")
        }
        Reachability::Punchable => format!(
            "behind a NAT that keeps one mapping ({addr}): peers reach you by hole punching, \
             coordinated by the trainer. For a direct path, forward UDP port {listen_port} on \
             your router to this machine and restart with --public-addr <your-ip>:{listen_port}"
        ),
        Reachability::Symmetric => format!(
            "behind a NAT that changes the port for each destination (symmetric NAT, common on \
             mobile and corporate networks): hole punching cannot work, so your traffic goes \
             through a relay and you get less work. Forward UDP port {listen_port} to this \
             machine and restart with --public-addr <your-ip>:{listen_port}, or join from \
             another network"
        ),
        Reachability::Blocked => format!(
            "UDP from this network reaches only some peers (a firewall): your traffic goes \
             through a relay and you get less work. Allow outbound UDP, or forward UDP port \
             {listen_port} and restart with --public-addr <your-ip>:{listen_port}"
        ),
        Reachability::Unknown => format!(
            "seen at {addr} by one peer only: reachability unknown; hole punching will be \
             tried, with a relay as the fallback"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    const T1: &str = "198.51.100.1:7000";
    const T2: &str = "198.51.100.1:7001";

    fn obs(mapped: &[(&str, &str)], unanswered: &[&str], dial_back: Option<bool>) -> Observations {
        Observations {
            local: vec![a("192.0.2.2:40000")],
            mapped: mapped.iter().map(|&(o, m)| (a(o), a(m))).collect(),
            unanswered: unanswered.iter().map(|&o| a(o)).collect(),
            dial_back,
        }
    }

    #[test]
    fn a_dial_back_that_arrives_means_public() {
        let v = classify(&obs(
            &[(T1, "198.51.100.9:40000"), (T2, "198.51.100.9:40000")],
            &[],
            Some(true),
        ));
        assert_eq!(v.reachability, Reachability::Public);
        assert!(v.behind_nat);
        assert_eq!(v.public_addr, Some(a("198.51.100.9:40000")));
        // No NAT at all: the observed address is a local one.
        let mut o = obs(&[(T1, "192.0.2.2:40000")], &[], Some(true));
        o.local = vec![a("192.0.2.2:40000")];
        assert!(!classify(&o).behind_nat);
    }

    #[test]
    fn one_mapping_for_two_observers_is_punchable() {
        let v = classify(&obs(
            &[(T1, "198.51.100.9:40000"), (T2, "198.51.100.9:40000")],
            &[],
            Some(false),
        ));
        assert_eq!(v.reachability, Reachability::Punchable);
    }

    #[test]
    fn a_mapping_per_observer_is_symmetric() {
        let v = classify(&obs(
            &[(T1, "198.51.100.9:31000"), (T2, "198.51.100.9:52113")],
            &[],
            Some(false),
        ));
        assert_eq!(v.reachability, Reachability::Symmetric);
        assert!(!v.reachability.direct_possible());
    }

    #[test]
    fn an_observer_that_never_answers_means_blocked() {
        let v = classify(&obs(
            &[(T1, "198.51.100.9:40000")],
            &["198.51.100.2:7000"],
            Some(false),
        ));
        assert_eq!(v.reachability, Reachability::Blocked);
        assert_eq!(
            classify(&obs(&[], &[T1], None)).reachability,
            Reachability::Blocked
        );
    }

    #[test]
    fn one_observer_alone_cannot_tell() {
        let v = classify(&obs(&[(T1, "198.51.100.9:40000")], &[], Some(false)));
        assert_eq!(v.reachability, Reachability::Unknown);
        // The same observer twice is still one observer.
        let v = classify(&obs(
            &[(T1, "198.51.100.9:40000"), (T1, "198.51.100.9:40000")],
            &[],
            None,
        ));
        assert_eq!(v.reachability, Reachability::Unknown);
    }

    #[test]
    fn v4_and_v6_mappings_are_not_compared() {
        let v = classify(&obs(
            &[
                (T1, "198.51.100.9:40000"),
                ("[2001:db8::1]:7000", "[2001:db8::9]:40000"),
                (T2, "198.51.100.9:40000"),
            ],
            &[],
            Some(false),
        ));
        assert_eq!(v.reachability, Reachability::Punchable);
    }

    #[test]
    fn plans_follow_the_verdicts() {
        use Reachability::*;
        assert_eq!(plan(Symmetric, Public), Plan::Direct);
        assert_eq!(plan(Public, Punchable), Plan::Reverse);
        assert_eq!(plan(Public, Symmetric), Plan::Reverse);
        assert_eq!(plan(Punchable, Punchable), Plan::Punch);
        assert_eq!(plan(Unknown, Punchable), Plan::Punch);
        assert_eq!(plan(Symmetric, Punchable), Plan::Relay);
        assert_eq!(plan(Punchable, Symmetric), Plan::Relay);
        assert_eq!(plan(Blocked, Punchable), Plan::Relay);
        assert_eq!(plan(Public, Blocked), Plan::Relay);
    }

    #[test]
    fn codes_and_names_round_trip() {
        for r in [
            Reachability::Public,
            Reachability::Punchable,
            Reachability::Symmetric,
            Reachability::Blocked,
            Reachability::Unknown,
        ] {
            assert_eq!(Reachability::from_code(r.code()), Some(r));
        }
        assert_eq!(Reachability::from_code(9), None);
        for p in [PathKind::Direct, PathKind::Punched, PathKind::Relayed] {
            assert_eq!(p.as_str().parse::<PathKind>().unwrap(), p);
        }
        assert!("teleported".parse::<PathKind>().is_err());
    }

    #[test]
    fn advice_names_the_port_and_the_flag() {
        let v = Verdict {
            reachability: Reachability::Symmetric,
            public_addr: Some(a("198.51.100.9:1")),
            behind_nat: true,
        };
        let text = advice(&v, 7000);
        assert!(text.contains("UDP port 7000"), "{text}");
        assert!(text.contains("--public-addr"), "{text}");
        assert!(text.contains("relay"), "{text}");
    }
}
