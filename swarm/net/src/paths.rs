//! Keeping a peer's paths good during a run (issue #14): its reachability is re-checked now and
//! then, and a relayed connection is replaced by a direct or punched one when one becomes
//! possible. The decisions are [`swarm_nat::Upgrades`]'s; this task feeds it and acts.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use swarm_nat::{Plan, Reachability, Relayed, UpgradeConfig, Upgrades, Verdict, plan};
use tokio::sync::{mpsc, watch};

use crate::identity::PeerId;
use crate::nat::{self, ObserveReply, ObserveRequest};
use crate::peer::{PeerShared, unix_now};
use crate::rpc;

/// How often the relayed connections are looked at (new ones, changed verdicts).
const TICK: Duration = Duration::from_secs(1);

/// Runs until `stop`: re-checks every `recheck` (when we joined through a bootstrap) and tries
/// upgrades when the schedule says so, one task per attempt.
pub(crate) async fn maintain(
    shared: Arc<PeerShared>,
    recheck: Option<Duration>,
    cfg: UpgradeConfig,
    mut stop: watch::Receiver<bool>,
) {
    let mut upgrades = Upgrades::new(cfg);
    let mut next_check = recheck
        .filter(|_| shared.bootstrap().is_some())
        .map(|d| Instant::now() + d);
    let (tx, mut rx) = mpsc::channel::<(PeerId, bool)>(16);
    loop {
        if next_check.is_some_and(|t| t <= Instant::now()) {
            // Bounded by the check's own timeouts (a few seconds).
            recheck_once(&shared).await;
            next_check = recheck.map(|d| Instant::now() + d);
        }
        let relayed = relayed(&shared).await;
        upgrades.sync(&relayed, Instant::now());
        while let Some(peer) = upgrades.poll(Instant::now()) {
            let (shared, tx) = (shared.clone(), tx.clone());
            tokio::spawn(async move {
                let ok = nat::upgrade(&shared, peer).await;
                tracing::info!(peer = %peer.short(), upgraded = ok, "direct path attempt for a relayed connection");
                let _ = tx.send((peer, ok)).await;
            });
        }
        let now = Instant::now();
        let wake = [upgrades.poll_timeout(), next_check, Some(now + TICK)]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(now + TICK)
            .max(now + Duration::from_millis(10));
        tokio::select! {
            Some((peer, ok)) = rx.recv() => upgrades.handle_result(peer, ok, Instant::now()),
            _ = tokio::time::sleep_until(wake.into()) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Our relayed connections with what their paths depend on.
async fn relayed(shared: &PeerShared) -> Vec<Relayed<PeerId>> {
    let peers = shared.relayed_peers().await;
    if peers.is_empty() {
        return Vec::new();
    }
    shared.with_membership(|m| {
        let ours = m.local_record().info.reach;
        peers
            .into_iter()
            .map(|peer| {
                let (theirs, addrs) = m
                    .get(&peer)
                    .map(|e| (e.record.info.reach, e.record.info.addrs.clone()))
                    .unwrap_or((Reachability::Unknown, Vec::new()));
                let mut h = DefaultHasher::new();
                (ours.code(), theirs.code(), &addrs).hash(&mut h);
                Relayed {
                    peer,
                    fingerprint: h.finish(),
                    direct_possible: !addrs.is_empty() && plan(ours, theirs) != Plan::Relay,
                }
            })
            .collect()
    })
}

/// One re-check with the bootstrap: observe our mapping over the connection we hold, then the
/// same check as at join. A changed verdict goes into our record (and a changed mapping replaces
/// the old one among our addresses), so the swarm plans its paths to us anew.
pub(crate) async fn recheck_once(shared: &PeerShared) -> Option<Verdict> {
    let (addr, id) = shared.bootstrap()?;
    // A connection of its own, as at join: the mapping a new flow gets now (an old connection
    // keeps the mapping, and the address, it started with).
    let timeout = shared.rpc_timeout();
    let observed = async {
        let conn = tokio::time::timeout(timeout, shared.node().connect(addr, Some(id)))
            .await
            .map_err(|_| crate::Error::Timeout {
                what: "re-check connect",
                after: timeout,
            })??;
        let r = rpc::call_timeout::<_, ObserveReply>(&conn, &ObserveRequest, timeout).await;
        Ok::<_, crate::Error>((conn, r))
    };
    let (conn, observed) = match observed.await {
        Ok((conn, Ok(r))) => (conn, r.observed),
        Ok((conn, Err(e))) => {
            conn.close(0u32.into(), b"re-check failed");
            tracing::info!(error = %e, "reachability re-check: the bootstrap did not answer");
            return None;
        }
        Err(e) => {
            tracing::info!(error = %e, "reachability re-check: the bootstrap did not answer");
            return None;
        }
    };
    let v = nat::check(shared.node(), &conn, observed, true).await;
    conn.close(0u32.into(), b"re-checked");
    let before = shared.set_verdict(v);
    let old_addr = before.and_then(|b| b.public_addr);
    let moved = v
        .public_addr
        .filter(|new| old_addr.is_some_and(|old| old != *new));
    if before.map(|b| b.reachability) != Some(v.reachability) || moved.is_some() {
        tracing::info!(
            before = %before.map_or("none", |b| b.reachability.as_str()),
            after = %v.reachability,
            addr = ?v.public_addr,
            "reachability re-checked: changed"
        );
        shared.with_membership(|m| {
            m.update_local(unix_now(), |info| {
                info.reach = v.reachability;
                if let (Some(old), Some(new)) = (old_addr, moved) {
                    for a in info.addrs.iter_mut().filter(|a| **a == old) {
                        *a = new;
                    }
                }
            })
        });
    }
    Some(v)
}
