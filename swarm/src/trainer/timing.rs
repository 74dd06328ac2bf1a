//! Where the trainer's wall-clock time went (issue #18's `time_breakdown`), from timestamps.
//!
//! The trainer's time is a sequence of exclusive parts: a [`Clock`] is always in one [`Part`]
//! and charges the time since its last switch to it, so the parts add up to the time since the
//! clock started. During the micro-batch phase the trainer mostly waits for the pipeline; that
//! wait is split afterwards in the ratio of what the completed passes report: the stage peers'
//! compute, their codec work and their queueing behind other micro-batches (each hop measures
//! its own, carried in [`PassTime`]), and the rest of each pass's round trip, which is the links
//! (transfer, RPC, scheduling). Sans-IO: the caller passes every `Instant`.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::protocol::PassTime;

/// One exclusive part of the trainer's time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Part {
    /// The ends' passes and optimizer on the trainer (embedding, head, their backward).
    Compute,
    /// The trainer's own encode/decode of boundary frames.
    Codec,
    /// Waiting for pipeline messages in the micro-batch phase (split when read out).
    Pipeline,
    /// Step boundary: the replica probe, the stages' Apply round, releases and resets.
    Barrier,
    /// The replica sync rounds (gradient or outer).
    Sync,
    /// Audits.
    Audits,
    /// Between steps: joiners, waiting for replicas, restores, checkpoints and evaluations.
    Idle,
}

const PARTS: usize = 7;

fn index(p: Part) -> usize {
    match p {
        Part::Compute => 0,
        Part::Codec => 1,
        Part::Pipeline => 2,
        Part::Barrier => 3,
        Part::Sync => 4,
        Part::Audits => 5,
        Part::Idle => 6,
    }
}

/// The trainer's wall time of a run by part, in seconds. The parts add up to `wall_s` (the
/// time since training started, waiting for the first replicas excluded).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct TimeBreakdown {
    /// Training wall time.
    pub wall_s: f64,
    /// Model compute on the critical path: the trainer's ends plus the stages' share of the
    /// pipeline wait.
    pub compute_s: f64,
    /// Boundary encode/decode: the trainer's own plus the stages' share of the pipeline wait.
    pub encode_decode_s: f64,
    /// The pipeline wait's share spent by micro-batches queued at a stage behind others.
    pub stage_queue_s: f64,
    /// The rest of the pipeline wait: links, RPC round trips, scheduling.
    pub links_s: f64,
    /// The step boundary: replica probe, the Apply round, releases, resets.
    pub barrier_s: f64,
    /// Replica sync rounds.
    pub sync_s: f64,
    /// Audits.
    pub audits_s: f64,
    /// Between steps: joins, waits for replicas, restores, checkpoints, evaluations.
    pub idle_s: f64,
}

impl TimeBreakdown {
    /// Sum of the parts (equals `wall_s` up to rounding).
    pub fn parts_s(&self) -> f64 {
        self.compute_s
            + self.encode_decode_s
            + self.stage_queue_s
            + self.links_s
            + self.barrier_s
            + self.sync_s
            + self.audits_s
            + self.idle_s
    }
}

/// The trainer's part clock.
#[derive(Clone, Debug)]
pub(crate) struct Clock {
    start: Instant,
    part: Part,
    since: Instant,
    acc: [Duration; PARTS],
    /// Completed passes: round trips and what their stages reported.
    passes: Duration,
    stage: PassTime,
}

impl Clock {
    /// A clock that starts at `now` in [`Part::Idle`].
    pub(crate) fn new(now: Instant) -> Clock {
        Clock {
            start: now,
            part: Part::Idle,
            since: now,
            acc: [Duration::ZERO; PARTS],
            passes: Duration::ZERO,
            stage: PassTime::default(),
        }
    }

    /// Charges the time since the last switch to the current part and enters `part`; returns
    /// the part left.
    pub(crate) fn switch(&mut self, part: Part, now: Instant) -> Part {
        let now = now.max(self.since);
        self.acc[index(self.part)] += now - self.since;
        self.since = now;
        std::mem::replace(&mut self.part, part)
    }

    /// Moves `d` already charged to `from` over to `to` (e.g. the codec share of an ends pass
    /// measured inside it), at most what `from` holds.
    pub(crate) fn reassign(&mut self, from: Part, to: Part, d: Duration) {
        let d = d.min(self.acc[index(from)]);
        self.acc[index(from)] -= d;
        self.acc[index(to)] += d;
    }

    /// A pass (forward or backward) of an attempt came back after `round_trip` with its
    /// stages' reported time.
    pub(crate) fn pass(&mut self, round_trip: Duration, stage: PassTime) {
        self.passes += round_trip;
        self.stage = self.stage.plus(stage);
    }

    /// The breakdown at `now` (the current part charged up to `now`, the clock not moved).
    pub(crate) fn breakdown(&self, now: Instant) -> TimeBreakdown {
        let mut acc = self.acc;
        let now = now.max(self.since);
        acc[index(self.part)] += now - self.since;
        let s = |p: Part| acc[index(p)].as_secs_f64();
        // The pipeline wait, split in the ratio of the passes' parts.
        let us = |v: u64| v as f64 * 1e-6;
        let (c, d, q) = (
            us(self.stage.compute_us),
            us(self.stage.codec_us),
            us(self.stage.queued_us),
        );
        let links = (self.passes.as_secs_f64() - c - d - q).max(0.0);
        let total = c + d + q + links;
        let wait = s(Part::Pipeline);
        let share = |x: f64| if total > 0.0 { wait * x / total } else { 0.0 };
        TimeBreakdown {
            wall_s: (now - self.start).as_secs_f64(),
            compute_s: s(Part::Compute) + share(c),
            encode_decode_s: s(Part::Codec) + share(d),
            stage_queue_s: share(q),
            links_s: if total > 0.0 { share(links) } else { wait },
            barrier_s: s(Part::Barrier),
            sync_s: s(Part::Sync),
            audits_s: s(Part::Audits),
            idle_s: s(Part::Idle),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn parts_add_up_to_the_wall_and_the_pipeline_wait_splits_by_the_passes() {
        let t0 = Instant::now();
        let mut c = Clock::new(t0);
        // 100 ms idle, 50 ms of an ends pass of which 10 ms codec, 400 ms pipeline wait,
        // 30 ms audits, 70 ms sync, 20 ms barrier, then idle to 700 ms.
        assert_eq!(c.switch(Part::Compute, t0 + ms(100)), Part::Idle);
        c.switch(Part::Pipeline, t0 + ms(150));
        c.reassign(Part::Compute, Part::Codec, ms(10));
        c.switch(Part::Audits, t0 + ms(550));
        c.switch(Part::Sync, t0 + ms(580));
        c.switch(Part::Barrier, t0 + ms(650));
        c.switch(Part::Idle, t0 + ms(670));
        // Two passes of 300 ms and 200 ms round trip: stages computed 250 ms, coded 50 ms,
        // queued 100 ms; the links had the other 100 ms.
        c.pass(
            ms(300),
            PassTime {
                compute_us: 150_000,
                codec_us: 30_000,
                queued_us: 100_000,
            },
        );
        c.pass(
            ms(200),
            PassTime {
                compute_us: 100_000,
                codec_us: 20_000,
                queued_us: 0,
            },
        );
        let b = c.breakdown(t0 + ms(700));
        let near = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(near(b.wall_s, 0.7), "{b:?}");
        assert!(near(b.parts_s(), b.wall_s), "{b:?}");
        // 400 ms of wait over 500 ms of passes: 4/5 of each pass part.
        assert!(near(b.compute_s, 0.040 + 0.200), "{b:?}");
        assert!(near(b.encode_decode_s, 0.010 + 0.040), "{b:?}");
        assert!(near(b.stage_queue_s, 0.080), "{b:?}");
        assert!(near(b.links_s, 0.080), "{b:?}");
        assert!(near(b.audits_s, 0.030) && near(b.sync_s, 0.070), "{b:?}");
        assert!(near(b.barrier_s, 0.020) && near(b.idle_s, 0.130), "{b:?}");
    }

    #[test]
    fn a_wait_without_reported_passes_is_links_and_reassign_never_goes_negative() {
        let t0 = Instant::now();
        let mut c = Clock::new(t0);
        c.switch(Part::Pipeline, t0);
        c.switch(Part::Compute, t0 + ms(40));
        c.switch(Part::Barrier, t0 + ms(50));
        c.reassign(Part::Compute, Part::Codec, ms(500));
        let b = c.breakdown(t0 + ms(60));
        assert_eq!(b.links_s, 0.040);
        assert_eq!((b.compute_s, b.encode_decode_s), (0.0, 0.010));
        assert!((b.parts_s() - b.wall_s).abs() < 1e-9, "{b:?}");
        // A timestamp before the last switch charges nothing (monotonic clocks only move on).
        assert_eq!(c.switch(Part::Idle, t0), Part::Barrier);
        assert!((c.breakdown(t0 + ms(60)).wall_s - 0.060).abs() < 1e-9);
    }
}
