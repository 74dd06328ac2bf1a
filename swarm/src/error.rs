//! The swarm crate's error type.

/// Everything that can go wrong in the swarm crate. Variants are added as modules need them.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a local file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// Bytes from a peer were refused by the wire protocol decoder.
    #[error("wire protocol: {0}")]
    Wire(#[from] swarm_net::wire::WireError),
    /// A request got no answer in time.
    #[error("{what} timed out after {after:?}")]
    Timeout {
        /// The request.
        what: &'static str,
        /// How long it waited.
        after: std::time::Duration,
    },
    /// The remote peer refused a request with an application error.
    #[error("peer refused the request: {0}")]
    Remote(swarm_net::rpc::RemoteError),
    /// The network layer failed otherwise (connection, stream, TLS, socket, membership).
    #[error(transparent)]
    Net(swarm_net::Error),
    /// The model crate refused an operation (tensor shapes, state bytes, checkpoints).
    #[error("model: {0}")]
    Model(#[from] swarm_model::Error),
    /// A tensor frame could not be encoded or decoded.
    #[error("codec: {0}")]
    Codec(#[from] swarm_compression::Error),
    /// The router could not plan or place (e.g. a stage has no replica).
    #[error("router: {0}")]
    Router(#[from] swarm_router::Error),
    /// A contribution ledger was refused (see [`crate::ledger::LedgerError`]).
    #[error("ledger: {0}")]
    Ledger(#[from] crate::ledger::LedgerError),
    /// The trainer's inbox closed: every handler and helper task is gone (the peer shut down).
    #[error("the trainer's inbox closed")]
    InboxClosed,
    /// A background task (compute on the blocking pool) panicked or was cancelled.
    #[error("background task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// A multi-step sync's boundary lost a participant in every one of its outer rounds.
    #[error("the outer sync at step {state_step} failed {rounds} times")]
    OuterSyncFailed {
        /// Steps done in the state the outer sync was for.
        state_step: u64,
        /// Outer rounds tried.
        rounds: u32,
    },
    /// A stage peer holds no state yet (before its first load, or after a failed one): what
    /// needs the weights is refused until it loads.
    #[error("no stage state loaded")]
    NoState,
    /// A request named a stage the run does not have.
    #[error("the run has no stage {0}")]
    NoSuchStage(u32),
    /// A shard built for other pieces than the stage's (a state of another stage).
    #[error("the shard holds other pieces than the stage")]
    WrongPieces,
    /// A request about step `asked` reached a stage at step `at` (it moved on, or is behind).
    #[error("a request about step {asked} reached the stage at step {at}")]
    StepMismatch {
        /// The step the request is about.
        asked: u64,
        /// The stage's step.
        at: u64,
    },
    /// Only step 0 is built from the seed; later states are fetched.
    #[error("cannot build step {0} from the seed")]
    NotFromSeed(u64),
    /// A tensor frame decoded fine but has another shape than its message needs.
    #[error("frame of shape {got:?}, expected {expected}")]
    FrameShape {
        /// The frame's shape.
        got: Vec<usize>,
        /// The shape the message needs.
        expected: String,
    },
    /// A replica's sync share holds another number of values than the stage has parameters.
    #[error("share of {got} elements for {expected} parameters")]
    ShareSize {
        /// Values in the share.
        got: usize,
        /// The stage's parameters.
        expected: usize,
    },
    /// A stage pass produced no input gradient (its input was not tracked).
    #[error("the stage's input has no gradient")]
    NoInputGradient,
    /// A multi-step sync message reached a run without one, or an outer step not computed for
    /// the round it names.
    #[error("{0}")]
    NoOuterSync(&'static str),
    /// The trainer's `RunInfo` does not hash to the run id asked for (another run, or forged).
    #[error("the run info does not match the run id")]
    RunMismatch,
    /// A checkpoint folder holds another run's checkpoint.
    #[error("{dir}: a checkpoint of run {found}, not of this config's run {expected}")]
    ForeignCheckpoint {
        /// The folder.
        dir: std::path::PathBuf,
        /// The run whose checkpoint it holds.
        found: swarm_net::membership::RunId,
        /// The run of this config.
        expected: swarm_net::membership::RunId,
    },
    /// A checkpoint folder is malformed (a tensor or metadata missing or unreadable).
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// The corpus's tokens do not fit the model's vocabulary.
    #[error("corpus vocab {corpus} > model vocab {model}")]
    VocabMismatch {
        /// The corpus's vocabulary size.
        corpus: usize,
        /// The model's.
        model: usize,
    },
    /// No stage of the run fits this peer's memory (the message gives the sizes).
    #[error("{0}")]
    DoesNotFit(String),
    /// Not every stage got the replicas it needs in time.
    #[error("waited {waited:?} for {need} replica(s) per stage; serving: {serving:?}")]
    NotEnoughReplicas {
        /// Replicas each stage needs.
        need: usize,
        /// Serving replicas per stage when the wait ended.
        serving: Vec<usize>,
        /// How long it waited.
        waited: std::time::Duration,
    },
    /// A stage has no agreed weights digest yet: its state cannot be verified, so it is not
    /// taken.
    #[error("stage {0} has no agreed digest")]
    NoAgreedDigest(u32),
    /// A stage has no replica to take its state from.
    #[error("stage {0} has no replica to fetch from")]
    NoReplica(u32),
    /// No source could serve a stage's state.
    #[error("stage {0}: no state source")]
    NoStateSource(u32),
    /// A stage state from `peer` was refused: its bytes are not the stage's agreed state.
    #[error("state from {peer}: {reason}")]
    BadState {
        /// The replica that sent it (banned by the trainer).
        peer: swarm_net::identity::PeerId,
        /// What was wrong with it.
        reason: String,
    },
    /// A state's weights digest is not the one agreed for its stage.
    #[error("stage {0}'s state does not have its agreed digest")]
    DigestMismatch(u32),
    /// A fault-injection spec (`swarm join --fault`) is malformed.
    #[error(
        "bad fault `{0}`: expected KIND:RATE[:SEED] with KIND one of noise, zero, stale, skip, scale-grad and RATE in [0, 1]"
    )]
    BadFault(String),
    /// A sync round could not start (a stage has no replica left to sync, or miscounted).
    #[error("sync: {0}")]
    SyncPlan(#[from] crate::trainer::machine::sync::SyncPlanError),
    /// The trainer's own bookkeeping broke an invariant (a bug, never the peers' input): the
    /// message says which. Free-form on purpose: no caller can act on it but by reporting it.
    #[error("run: {0}")]
    Run(String),
}

/// Keeps the kinds callers act on (a refusal, a timeout, a malformed message, a file) as this
/// crate's own variants, so `Error::Remote(r)` matches whichever layer the call went through.
impl From<swarm_net::Error> for Error {
    fn from(e: swarm_net::Error) -> Error {
        match e {
            swarm_net::Error::Remote(r) => Error::Remote(r),
            swarm_net::Error::Timeout { what, after } => Error::Timeout { what, after },
            swarm_net::Error::Wire(w) => Error::Wire(w),
            swarm_net::Error::Io { path, source } => Error::Io { path, source },
            other => Error::Net(other),
        }
    }
}

/// The crate's results.
pub type Result<T, E = Error> = std::result::Result<T, E>;
