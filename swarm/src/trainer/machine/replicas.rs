//! Which state each replica must hold, with no I/O: where a replica loads its stage's state
//! from, what a reset returns it to, who is reloaded or released after an apply (the odd ones
//! out, and the replicas excluded from the step), and which leaver hands its state to the
//! trainer at a boundary. The driver (`driver/sync.rs`, `driver/peers.rs`) reads the registry,
//! asks these, and sends the `Reload`s and fetches they name.

use std::collections::{BTreeSet, VecDeque};

use super::sync::digest_majority;
use crate::identity::PeerId;
use crate::protocol::{Endpoint, StateSource, SyncPhase};

/// What the registry says about a stage, for [`state_source`].
#[derive(Clone, Debug)]
pub struct StageHolders {
    /// The digest of the stage state the trainer serves itself at the current step (resumed
    /// from a checkpoint, or handed off by its last replica), if any.
    pub served: Option<[u8; 32]>,
    /// Serving replicas of the stage other than the one loading.
    pub replicas: Vec<Endpoint>,
    /// The stage's agreed digest at the current step.
    pub agreed: Option<[u8; 32]>,
}

/// Where a replica loads its stage's state from: the trainer when it serves that state; the
/// seed while the run is fresh and between steps; else the serving replicas, verified against
/// the agreed digest (the seed again if the run is fresh and nobody holds it yet). Without
/// either, a source that fails the load (no holder, no digest), so the replica is dropped rather
/// than loading something unverified.
pub fn state_source(
    trainer: Endpoint,
    holders: StageHolders,
    fresh: bool,
    in_step: bool,
) -> StateSource {
    if let Some(digest) = holders.served {
        return StateSource::Fetch {
            from: vec![trainer],
            digest,
        };
    }
    if fresh && !in_step {
        return StateSource::Init;
    }
    match holders.agreed {
        Some(digest) if !holders.replicas.is_empty() => StateSource::Fetch {
            from: holders.replicas,
            digest,
        },
        _ if fresh => StateSource::Init,
        _ => StateSource::Fetch {
            from: holders.replicas,
            digest: [0; 32],
        },
    }
}

/// The digest of the state a reset returns a replica to (its own state at the step's start), or
/// `None` for the seed's (a fresh run). Between the sync boundaries of a multi-step sync
/// (`drifts`) a replica's state is its own, the one it last reported (`own`); otherwise the
/// stage's agreed one.
pub fn reset_digest(
    fresh: bool,
    drifts: bool,
    own: Option<[u8; 32]>,
    agreed: Option<[u8; 32]>,
) -> Option<[u8; 32]> {
    if fresh {
        return None;
    }
    match own {
        Some(d) if drifts => Some(d),
        _ => agreed,
    }
}

/// Where a replica of the run stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicaState {
    /// Admitted, loading its state.
    Joining,
    /// Routable.
    Serving,
    /// Announced it is leaving: no new work.
    Leaving,
}

impl ReplicaState {
    /// Its name in the monitor's snapshot.
    pub fn name(self) -> &'static str {
        match self {
            ReplicaState::Joining => "joining",
            ReplicaState::Serving => "serving",
            ReplicaState::Leaving => "leaving",
        }
    }
}

/// What a replica's `Ready` (its report of the state it loaded) does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadyVerdict {
    /// It serves from now on; `adopt`: the stage had no agreed digest yet, and the reported one
    /// becomes it (the first load of a fresh stage).
    Serve {
        /// The reported digest becomes the stage's agreed one.
        adopt: bool,
    },
    /// It reloads: it holds another step or another state than its stage's current one.
    Reload,
    /// Nothing: not a replica of the stage, asked to leave while loading (it is released at the
    /// boundary, never routed), or a second report of the load it serves already.
    Ignore,
}

/// The verdict on a `Ready` of the replica in `state` (`None`: not a replica of that stage)
/// reporting `step` and `digest`, when the replicas hold `current` steps and the stage's agreed
/// digest is `agreed`.
pub fn ready_verdict(
    state: Option<ReplicaState>,
    step: u64,
    digest: [u8; 32],
    current: u64,
    agreed: Option<[u8; 32]>,
) -> ReadyVerdict {
    let Some(state) = state else {
        return ReadyVerdict::Ignore;
    };
    let right = step == current && agreed.is_none_or(|d| d == digest);
    match state {
        ReplicaState::Leaving => ReadyVerdict::Ignore,
        // A second report of the same load (a joiner the trainer also told to reload after a
        // restore answers both): one join, one entry.
        ReplicaState::Serving if right => ReadyVerdict::Ignore,
        _ if !right => ReadyVerdict::Reload,
        _ => ReadyVerdict::Serve {
            adopt: agreed.is_none(),
        },
    }
}

/// Whether a stage's state is gone, so the run must restore every stage from the latest
/// checkpoint (or the seed): no replica holds it (`holders`: replicas serving or leaving;
/// joiners do not count, they load from a holder) and the trainer does not serve it at the
/// current step (`served_now`: resumed from a checkpoint, or handed off by its last leaver).
pub fn state_lost(holders: usize, served_now: bool) -> bool {
    holders == 0 && !served_now
}

/// What an apply leaves to do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyVerdict {
    /// Each stage's agreed digest after the apply (the majority of its replicas' reports);
    /// `None` for a stage nobody reported or a drifting round (nothing to agree on).
    pub agreed: Vec<Option<[u8; 32]>>,
    /// (stage, replica, state step): replicas to reload with their stage's agreed state.
    pub reload: Vec<(usize, PeerId, u64)>,
    /// (stage, replica): replicas to release (lost to the run until they join again).
    pub release: Vec<(usize, PeerId)>,
    /// Replicas whose digest differed from their stage's majority.
    pub mismatches: u64,
}

/// After the apply of `step` (for [`SyncPhase::Outer`], `step` is the state step the outer round
/// synced): `applied[k]` holds the digests stage `k`'s replicas reported, `excluded` the
/// replicas excluded from the step (alive, but they skipped its sync).
///
/// - A replica whose digest is not its stage's majority (ties to the smallest) reloads the
///   agreed state; in a [`SyncPhase::Local`] round replicas drift, so nothing is compared.
/// - An excluded replica loads the state the others reached; in a multi-step sync (`drifts`)
///   there is no agreed state to load between boundaries, so it is released and joins again at
///   the next one (its drift is lost, as a crash's).
pub fn apply_verdict(
    phase: SyncPhase,
    drifts: bool,
    step: u64,
    applied: &[Vec<(PeerId, [u8; 32])>],
    excluded: &[(usize, PeerId)],
) -> ApplyVerdict {
    let after = if phase == SyncPhase::Outer {
        step
    } else {
        step + 1
    };
    let mut v = ApplyVerdict {
        agreed: vec![None; applied.len()],
        ..Default::default()
    };
    if phase != SyncPhase::Local {
        for (k, ds) in applied.iter().enumerate() {
            let Some(best) = digest_majority(ds.iter().map(|(_, d)| *d)) else {
                continue;
            };
            v.agreed[k] = Some(best);
            for (p, d) in ds {
                if *d != best {
                    v.mismatches += 1;
                    v.reload.push((k, *p, after));
                }
            }
        }
    }
    for &(k, p) in excluded {
        if drifts {
            v.release.push((k, p));
        } else {
            v.reload.push((k, p, step + 1));
        }
    }
    v
}

/// A replica that asked to leave, at a boundary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leaver {
    /// Its stage.
    pub stage: usize,
    /// The replica.
    pub peer: PeerId,
    /// No other replica serves its stage.
    pub last: bool,
}

/// What releasing the leavers asks for, from [`Leavers::poll_action`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaveAction {
    /// Fetch `peer`'s state of `stage` (verified against the stage's agreed digest) and serve it
    /// from the trainer; answer [`Leavers::handed_off`].
    HandOff {
        /// The stage.
        stage: usize,
        /// Its last replica, leaving.
        peer: PeerId,
    },
    /// Take `peer` out of the run (`handed_off`: its state is the trainer's now).
    Release {
        /// Its stage.
        stage: usize,
        /// The leaver.
        peer: PeerId,
        /// Its state is the trainer's now.
        handed_off: bool,
    },
}

/// The leavers' release at a step boundary. The last replica of a stage hands its state to the
/// trainer first, so the next peer to take the stage loads it and nothing is lost; one hand-off
/// per stage (a failed one is tried from the stage's next last leaver). Between the boundaries
/// of a multi-step sync a replica holds its own drifted state: nobody is released until the next
/// sync boundary.
#[derive(Debug)]
pub struct Leavers {
    queue: VecDeque<Leaver>,
    /// Stages whose state the trainer holds (already, or handed off now).
    held: BTreeSet<usize>,
    /// A hand-off asked for and not answered yet.
    handing: Option<Leaver>,
    /// A leaver whose hand-off was answered: released next (with whether it handed off).
    answered: Option<(Leaver, bool)>,
}

impl Leavers {
    /// `leavers` in the order they are released; `held`: stages whose state the trainer already
    /// serves.
    pub fn new(at_sync_boundary: bool, leavers: Vec<Leaver>, held: BTreeSet<usize>) -> Leavers {
        Leavers {
            queue: if at_sync_boundary {
                leavers.into()
            } else {
                VecDeque::new()
            },
            held,
            handing: None,
            answered: None,
        }
    }

    /// The next thing to do (`None` while a hand-off is unanswered, and at the end).
    pub fn poll_action(&mut self) -> Option<LeaveAction> {
        if self.handing.is_some() {
            return None;
        }
        if let Some((l, handed_off)) = self.answered.take() {
            return Some(LeaveAction::Release {
                stage: l.stage,
                peer: l.peer,
                handed_off,
            });
        }
        let l = self.queue.pop_front()?;
        if l.last && !self.held.contains(&l.stage) {
            self.handing = Some(l);
            return Some(LeaveAction::HandOff {
                stage: l.stage,
                peer: l.peer,
            });
        }
        Some(LeaveAction::Release {
            stage: l.stage,
            peer: l.peer,
            handed_off: false,
        })
    }

    /// The answer to [`LeaveAction::HandOff`]: whether the trainer holds the state now. The
    /// leaver is released next either way.
    pub fn handed_off(&mut self, ok: bool) {
        let Some(l) = self.handing.take() else {
            return;
        };
        if ok {
            self.held.insert(l.stage);
        }
        self.answered = Some((l, ok));
    }
}

#[cfg(test)]
mod tests;
