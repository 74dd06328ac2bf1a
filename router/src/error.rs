//! The crate's error type.

use crate::view::PeerKey;

/// Everything the router can refuse. Routing never panics on bad input: the caller gets one of these.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum Error {
    /// The peer is not in the view (never inserted, or already removed).
    #[error("unknown peer {0}")]
    UnknownPeer(PeerKey),
    /// `insert` was called for a peer that is already in the view.
    #[error("peer {0} is already in the view")]
    DuplicatePeer(PeerKey),
    /// A stage index or span outside `0..num_stages`, or an empty span.
    #[error("invalid stage span {start}..{end} for a run of {num_stages} stages")]
    InvalidStage {
        /// First stage of the span.
        start: u16,
        /// One past the last stage of the span.
        end: u16,
        /// Stages in the run.
        num_stages: u16,
    },
    /// A measurement that is not a finite positive number (throughput, bandwidth) or a bad coordinate.
    #[error("invalid measurement for {what}: {value}")]
    InvalidMeasurement {
        /// Which field.
        what: &'static str,
        /// The rejected value.
        value: f64,
    },
    /// No serving peer holds this stage, so no pipeline can be built.
    #[error("no serving replica for stage {stage}")]
    NoReplica {
        /// The uncovered stage.
        stage: u16,
    },
    /// A configuration value is out of its documented range.
    #[error("invalid config: {0}")]
    InvalidConfig(String),
}
