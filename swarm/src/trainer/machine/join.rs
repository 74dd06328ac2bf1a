//! When joiners are let in, with no I/O. A peer asking to join (`Admit`) during a step, or
//! between the boundaries of a multi-step sync, is answered only at the next (sync) boundary,
//! when the replicas hold the state it must load; until it reports `Ready` it is neither routed
//! (the router's view holds serving replicas only) nor a sync participant. At a boundary the next
//! step waits for the joiners admitted so far, up to a deadline, after which the late ones are
//! dropped.

use std::time::Instant;

use crate::identity::PeerId;

/// Whether an `Admit` is answered now: only between steps, at a state every replica agrees on.
pub fn admit_now(in_step: bool, at_sync_boundary: bool) -> bool {
    !in_step && at_sync_boundary
}

/// What a step boundary does about the joiners still loading their state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BoundaryWait {
    /// Start the next step.
    Start,
    /// Hold it (handling messages) until this instant at the latest.
    Hold(Instant),
    /// The deadline passed: drop these joiners and start.
    Drop(Vec<PeerId>),
}

/// At a boundary (`at_sync_boundary`: joiners are answered here) with `joining` still loading,
/// given the boundary's `deadline`.
pub fn boundary_wait(
    joining: Vec<PeerId>,
    at_sync_boundary: bool,
    deadline: Instant,
    now: Instant,
) -> BoundaryWait {
    if !at_sync_boundary || joining.is_empty() {
        BoundaryWait::Start
    } else if now >= deadline {
        BoundaryWait::Drop(joining)
    } else {
        BoundaryWait::Hold(deadline)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// `peer_joining_mid_run_syncs_its_stage_and_serves`: a joiner asking during a step is
    /// answered at the boundary, and the next step waits for it (bounded).
    #[test]
    fn a_joiner_during_a_step_is_answered_at_the_boundary_and_holds_the_next_step() {
        let j = PeerId([9; 32]);
        assert!(!admit_now(true, true), "not mid-step");
        assert!(admit_now(false, true), "at the boundary");
        let now = Instant::now();
        let deadline = now + Duration::from_secs(120);
        assert_eq!(
            boundary_wait(vec![j], true, deadline, now),
            BoundaryWait::Hold(deadline)
        );
        // Ready: the next step starts.
        assert_eq!(
            boundary_wait(vec![], true, deadline, now),
            BoundaryWait::Start
        );
        // Never ready: dropped at the deadline, and the run goes on.
        assert_eq!(
            boundary_wait(vec![j], true, deadline, deadline),
            BoundaryWait::Drop(vec![j])
        );
    }

    /// A multi-step sync: between its boundaries replicas hold drifted states, so a joiner waits
    /// for the next sync boundary even between steps, and no step waits for it meanwhile.
    #[test]
    fn between_sync_boundaries_a_joiner_waits_and_holds_nothing() {
        let j = PeerId([9; 32]);
        assert!(!admit_now(false, false));
        let now = Instant::now();
        assert_eq!(boundary_wait(vec![j], false, now, now), BoundaryWait::Start);
    }
}
