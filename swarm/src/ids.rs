//! Ids and limits shared by training ([`crate::protocol`], the stage worker, the trainer) and proof
//! of training ([`crate::receipt`], audits, the ledger). Both import this module; it imports
//! neither, so the two trees import each other in one direction only (training -> proof of
//! training -> here).

use crate::wire::{Reader, WireError};

/// Largest compression frame carried by one message (activations, gradients, grad shares).
pub const MAX_FRAME_BYTES: usize = 256 * 1024 * 1024;
/// Largest route: one hop per stage (stage numbers fit the 64-bit accumulate mask).
pub const MAX_STAGES: usize = 64;

/// Identifies one attempt of one micro-batch: contexts on stage peers are keyed by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MbKey {
    /// The step (optimizer steps done before it).
    pub step: u64,
    /// Micro-batch index within the step.
    pub mb: u32,
    /// Retry number of this micro-batch (0 first).
    pub attempt: u32,
}

/// Which pass of a micro-batch through a stage: receipts and audits name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pass {
    /// Activations forward through the stage.
    Forward,
    /// Gradients back through the stage.
    Backward,
}

/// Reads a length-prefixed compression frame of at most [`MAX_FRAME_BYTES`].
pub(crate) fn get_frame(r: &mut Reader<'_>, what: &'static str) -> Result<Vec<u8>, WireError> {
    Ok(r.bytes(what, MAX_FRAME_BYTES)?.to_vec())
}
