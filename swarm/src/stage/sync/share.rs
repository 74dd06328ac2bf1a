//! Where a replica puts a `GradShare` (pure: the decision of `on_grad_share` and of the early
//! shares `on_sync_start` takes). Sync rounds are numbered: when a participant dies the trainer
//! resets the survivors and starts the stage's sync again in the next round, and a share of the
//! dropped round, arriving late, holds an outdated gradient that must never be summed.

/// What becomes of a share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ShareFate {
    /// Of an older round than the one this replica is in, or than a share of the same sender it
    /// holds for that step: ignored (acknowledged, never summed).
    Stale,
    /// For the round in progress.
    Take,
    /// Before this replica's `SyncStart` of that step (or of that round): held until then, if
    /// there is room.
    Early,
}

/// The fate of a share of `(step, round)` for a replica in `current` (step, round) that holds an
/// early share of round `held` from the same sender for that step.
pub(super) fn share_fate(
    current: Option<(u64, u32)>,
    held: Option<u32>,
    step: u64,
    round: u32,
) -> ShareFate {
    let stale =
        current.is_some_and(|(s, r)| s == step && round < r) || held.is_some_and(|h| round < h);
    if stale {
        ShareFate::Stale
    } else if current == Some((step, round)) {
        ShareFate::Take
    } else {
        ShareFate::Early
    }
}

/// At `SyncStart` of `round`: whether an early share of round `held` is summed in it (a share of
/// another round is dropped).
pub(super) fn takes_early(held: u32, round: u32) -> bool {
    held == round
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `a_late_share_of_a_dropped_round_is_not_taken_into_the_new_one`, every ordering of the
    /// late share of round 0 against the reset, the new round's share and the new SyncStart.
    #[test]
    fn a_late_share_of_a_dropped_round_is_never_summed() {
        // The replica is stuck in round 0 of step 3: the share is taken.
        assert_eq!(share_fate(Some((3, 0)), None, 3, 0), ShareFate::Take);
        // Late, after the reset into round 1's SyncStart: ignored.
        assert_eq!(share_fate(Some((3, 1)), None, 3, 0), ShareFate::Stale);
        // Late, after the reset but before round 1's SyncStart, when the sender's round-1 share
        // is already held: ignored.
        assert_eq!(share_fate(None, Some(1), 3, 0), ShareFate::Stale);
        // Late, after the reset and before anything of round 1: held, then dropped at round 1's
        // SyncStart.
        assert_eq!(share_fate(None, None, 3, 0), ShareFate::Early);
        assert!(!takes_early(0, 1));
        // The sender's round-1 share after its late round-0 one replaces it and is taken.
        assert_eq!(share_fate(None, Some(0), 3, 1), ShareFate::Early);
        assert!(takes_early(1, 1));
    }

    #[test]
    fn shares_of_other_steps_and_rounds_ahead_wait_for_their_sync_start() {
        // A round ahead of ours (we have not been reset yet): held for its SyncStart.
        assert_eq!(share_fate(Some((3, 0)), None, 3, 1), ShareFate::Early);
        // The round of another step never makes a share stale.
        assert_eq!(share_fate(Some((2, 5)), None, 3, 0), ShareFate::Early);
        assert_eq!(share_fate(Some((3, 2)), None, 4, 0), ShareFate::Early);
    }
}
