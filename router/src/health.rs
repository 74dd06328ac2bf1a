//! Health: a failed or timed-out peer is banned with exponential backoff; a success clears it.
//! Whether a ban is honoured is the planner's call: it ignores bans that would leave a stage empty.

use serde::{Deserialize, Serialize};

/// How a hop on a peer ended, as seen by the trainer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The peer returned a valid result.
    Success,
    /// The peer returned an error or an invalid result, or the connection failed.
    Failure,
    /// The peer did not answer within the deadline.
    Timeout,
}

/// Backoff tunables.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HealthConfig {
    /// Ban after the first failure, ms.
    pub base_ban_ms: u64,
    /// Longest ban, ms.
    pub max_ban_ms: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        // Petals bans for 15 s doubling up to ~20 min; a training hop is shorter-lived, so 5 s..5 min.
        Self {
            base_ban_ms: 5_000,
            max_ban_ms: 300_000,
        }
    }
}

/// One peer's failure history.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HealthRecord {
    /// Failures and timeouts since the last success.
    pub consecutive_failures: u32,
    /// The peer is banned while `now_ms < banned_until_ms`.
    pub banned_until_ms: u64,
}

impl HealthRecord {
    /// Applies one outcome observed at `now_ms`.
    pub fn record(&mut self, outcome: Outcome, now_ms: u64, cfg: &HealthConfig) {
        match outcome {
            Outcome::Success => *self = Self::default(),
            Outcome::Failure | Outcome::Timeout => {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                let doublings = (self.consecutive_failures - 1).min(32);
                let ban = cfg
                    .base_ban_ms
                    .saturating_mul(1u64 << doublings)
                    .min(cfg.max_ban_ms);
                self.banned_until_ms = now_ms.saturating_add(ban);
            }
        }
    }

    /// True while the ban lasts.
    pub fn is_banned(&self, now_ms: u64) -> bool {
        now_ms < self.banned_until_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_caps_and_success_clears() {
        let cfg = HealthConfig {
            base_ban_ms: 1_000,
            max_ban_ms: 5_000,
        };
        let mut h = HealthRecord::default();
        assert!(!h.is_banned(0));
        h.record(Outcome::Failure, 10_000, &cfg);
        assert_eq!(h.banned_until_ms, 11_000);
        assert!(h.is_banned(10_999));
        assert!(!h.is_banned(11_000));
        h.record(Outcome::Timeout, 20_000, &cfg);
        assert_eq!(h.banned_until_ms, 22_000);
        h.record(Outcome::Failure, 30_000, &cfg);
        assert_eq!(h.banned_until_ms, 34_000);
        h.record(Outcome::Failure, 40_000, &cfg);
        assert_eq!(h.banned_until_ms, 45_000, "capped at max_ban_ms");
        for _ in 0..100 {
            h.record(Outcome::Failure, 50_000, &cfg);
        }
        assert_eq!(h.banned_until_ms, 55_000, "no overflow after many failures");
        h.record(Outcome::Success, 50_001, &cfg);
        assert_eq!(h, HealthRecord::default());
        assert!(!h.is_banned(50_001));
    }
}
