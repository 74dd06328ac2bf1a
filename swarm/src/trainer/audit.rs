//! The trainer's side of proof of training (issue #7): which micro-batches to audit, checking the
//! audited peer's receipts and frames, recomputation by another replica, a referee on mismatch,
//! bans, and the contribution ledger.
//!
//! When: after a step's micro-batch phase, before the replicas sync and apply (they still hold
//! the step's weights, and every peer still keeps the step's receipts and frames). Which: each
//! (micro-batch, stage) of the attempt that completed, with probability `rate` (a higher
//! `new_peer_rate` for a peer's first `new_peer_micro_batches`), drawn from ChaCha20 keyed by a
//! secret seed and (step, micro-batch, stage): unpredictable to peers, and drawn only once every
//! receipt of the step is committed (signed and held by the peers).
//!
//! An audit of peer P at stage k for micro-batch m:
//! 1. Fetch P's record (receipts + the frames it received and sent). Its receipts must be signed
//!    by P for this run, epoch, attempt and stage, and hash to the frames it shows.
//! 2. Chain: the frames P shows must be the ones its neighbours signed for (their receipts'
//!    output/input hashes), or, at the ends of the pipeline, the ones the trainer itself sent and
//!    received (hashed here as they pass). A mismatch against the trainer's own hashes proves P
//!    lied. Receipts travel with the frames and each receiver checks and keeps the sender's, so
//!    P must show its neighbours' receipts for the frames it got, and a mismatch with a
//!    neighbour is decided: the signer bound to two frames for one link, or the receiver that
//!    cannot show the sender's receipt for what it claims it received, is banned.
//! 3. Another replica A recomputes P's forward and input gradient from the same inputs (its
//!    weights digest must equal the one P signed). Identical frames pass at once; otherwise both
//!    are decoded and compared by relative L2 distance against `tolerance`.
//! 4. Mismatch: a referee recomputes: a third replica if the stage has one, else the trainer
//!    itself from the stage state fetched from A and verified against the digest. The side the
//!    referee disagrees with is banned.
//!
//! While replicas drift between sync boundaries (`[sync] mode = "sparseloco"`), no other replica
//! holds the audited peer's weights: its receipts must sign its own state (its last `Applied`
//! digest), and the trainer recomputes from that state, fetched from the peer and verified
//! against the digest, as both auditor and referee.
//!
//! A ban removes the peer from the run for good and voids its work in the ledger. The step's
//! gradients may already hold the banned peer's corrupted outputs (other stages computed on them),
//! so the driver discards the whole step's accumulated gradients and re-runs it on honest
//! replicas. Steps already applied are not rolled back (see the code map in ARCHITECTURE.md).

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::Serialize;
use swarm_compression::{Codec, Decoder, Limits};
use swarm_model::{RunConfig, Shard};

use crate::compute::recompute;
use crate::error::{Error, Result};
use crate::identity::{Identity, PeerId};
use crate::ledger::{Body, Head, LedgerWriter};
use crate::membership::RunId;
use crate::peer::PeerShared;
use crate::protocol::{Endpoint, Hop, MbKey};
use crate::receipt::{
    AuditFetch, AuditRecompute, AuditRecord, AuditResult, Pass, Receipt, frame_hash,
};
use crate::stage::{StageOptions, fetch_state};

mod drift;
mod judge;
mod record;

use drift::{InnerCheck, drifts};
use judge::link_liar;
pub use judge::{frame_distance, hidden_distance};

/// The micro-batch index a ledger `Audit` entry carries for an audit of a replica's optimizer
/// step (not of a pass).
pub const INNER_STEP_MB: u32 = u32::MAX;

/// Default fraction of micro-batches audited per stage.
pub const DEFAULT_RATE: f64 = 0.05;
/// Default audit rate for a peer's first [`DEFAULT_NEW_PEER_MICRO_BATCHES`] micro-batches.
pub const DEFAULT_NEW_PEER_RATE: f64 = 0.2;
/// Micro-batches a new peer serves at [`DEFAULT_NEW_PEER_RATE`].
pub const DEFAULT_NEW_PEER_MICRO_BATCHES: u64 = 20;
/// Relative L2 distance above which two recomputations disagree. Honest recomputations measured
/// on this machine are bitwise identical at any thread count (see the note in ARCHITECTURE.md);
/// the bound leaves room for a quantization level flipped by a last-bit difference (about 1e-4
/// relative with 4-bit codecs), and is far below the smallest fault (1% noise gives ~1e-2).
pub const DEFAULT_TOLERANCE: f32 = 2e-3;

/// How the trainer audits.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// Fraction of (micro-batch, stage) pairs audited; 0 disables audits (new peers' too).
    pub rate: f64,
    /// Audit rate of a peer's first `new_peer_micro_batches` micro-batches (trust is earned).
    pub new_peer_rate: f64,
    /// How long a peer counts as new, in micro-batches served.
    pub new_peer_micro_batches: u64,
    /// Relative L2 distance above which a recomputation disagrees.
    pub tolerance: f32,
    /// Secret seed of the draws (random unless given; give it only for reproducible tests).
    pub seed: Option<u64>,
    /// Where the contribution ledger is written (none: no ledger).
    pub ledger: Option<PathBuf>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            rate: DEFAULT_RATE,
            new_peer_rate: DEFAULT_NEW_PEER_RATE,
            new_peer_micro_batches: DEFAULT_NEW_PEER_MICRO_BATCHES,
            tolerance: DEFAULT_TOLERANCE,
            seed: None,
            ledger: None,
        }
    }
}

/// Audit counters for metrics and the demo's JSON.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AuditStats {
    /// Audits run.
    pub audits: u64,
    /// Audits that found a cheater.
    pub audit_failures: u64,
    /// Banned peers, in ban order.
    #[serde(serialize_with = "ser_peers")]
    pub banned: Vec<PeerId>,
    /// Chain mismatches left undecided. Receipts now travel with the frames, so every mismatch
    /// between neighbours is attributed and banned; kept (always 0) for the JSON's shape.
    pub disputes: u64,
    /// (micro-batch, stage) pairs that completed, i.e. that could have been audited.
    pub candidates: u64,
    /// Micro-batch-stage pairs served by each peer before its ban (for the theory comparison).
    #[serde(skip)]
    pub served_before_ban: Vec<(PeerId, u64)>,
    /// Largest distance seen in a passed audit that was not bitwise identical.
    pub max_passed_distance: f32,
    /// Audits whose frames were bitwise identical.
    pub identical: u64,
    /// Bytes moved by audits (records, recompute requests and results).
    pub bytes: u64,
    /// Of those, audited peers' own states fetched for the trainer's recomputation (drifting
    /// replicas).
    pub state_bytes: u64,
    /// Audits drawn only because the audited peer is new (`new_peer_rate` above `rate`), and
    /// the bytes they moved (included in `audits` and `bytes`).
    pub new_peer_audits: u64,
    /// Bytes of the audits drawn because their peer is new.
    pub new_peer_bytes: u64,
    /// Inner optimizer steps audited (drifting replicas; included in `audits`).
    pub inner_audits: u64,
    /// Inner steps drawn but not audited: the replica's micro-batches were retried (the audit
    /// replays only first attempts) or its next state was unavailable.
    pub inner_skipped: u64,
    /// Of those, the ones whose recomputed weights hash to the digest the replica signed, so its
    /// state after the step was not fetched.
    pub inner_identical: u64,
    /// Largest distance seen in a passed inner-step audit.
    pub max_inner_distance: f32,
    /// Wall time spent in the audit phase.
    pub seconds: f64,
    /// Audits (run, failed) per audited peer.
    #[serde(skip)]
    pub per_peer: HashMap<PeerId, (u64, u64)>,
}

impl AuditStats {
    /// Adds the counters of `t` (one audit job's) to these.
    fn absorb(&mut self, t: &AuditStats) {
        self.audits += t.audits;
        self.audit_failures += t.audit_failures;
        self.disputes += t.disputes;
        self.candidates += t.candidates;
        self.max_passed_distance = self.max_passed_distance.max(t.max_passed_distance);
        self.identical += t.identical;
        self.bytes += t.bytes;
        self.state_bytes += t.state_bytes;
        self.new_peer_audits += t.new_peer_audits;
        self.new_peer_bytes += t.new_peer_bytes;
        self.inner_audits += t.inner_audits;
        self.inner_skipped += t.inner_skipped;
        self.inner_identical += t.inner_identical;
        self.max_inner_distance = self.max_inner_distance.max(t.max_inner_distance);
        self.seconds += t.seconds;
        for (p, (a, f)) in &t.per_peer {
            let e = self.per_peer.entry(*p).or_default();
            e.0 += a;
            e.1 += f;
        }
    }
}

fn ser_peers<S: serde::Serializer>(v: &[PeerId], s: S) -> std::result::Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq;
    let mut seq = s.serialize_seq(Some(v.len()))?;
    for p in v {
        seq.serialize_element(&p.to_string())?;
    }
    seq.end()
}

/// An audited peer's own state: (stage, peer, weights digest).
type StateKey = (u32, PeerId, [u8; 32]);

/// The hashes the trainer saw for one attempt, and its route.
#[derive(Default, Clone)]
struct Seen {
    route: Vec<Hop>,
    sent_fwd: Option<[u8; 32]>,
    got_fwd: Option<[u8; 32]>,
    sent_bwd: Option<[u8; 32]>,
    got_bwd: Option<[u8; 32]>,
}

/// What one audit job did: its counters and ledger entries, merged into the auditor's in draw
/// order once every job of the step is done.
#[derive(Default)]
struct Tally {
    stats: AuditStats,
    log: Vec<Body>,
}

/// Evidence of a disputed pass: the hashes of the four frames it involved.
fn frames_evidence(rec: &AuditRecord) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    for f in [&rec.fwd_in, &rec.fwd_out, &rec.bwd_in, &rec.bwd_out] {
        h.update(&frame_hash(f));
    }
    *h.finalize().as_bytes()
}

/// Audit jobs of one step in flight at once.
const MAX_CONCURRENT_AUDITS: usize = 8;

/// One ban decided by an audit.
#[derive(Debug, Clone)]
pub struct Ban {
    /// The banned peer.
    pub peer: PeerId,
    /// The stage it served.
    pub stage: u32,
    /// Why (for the ledger and the logs).
    pub reason: String,
}

/// What the audit phase needs from the driver.
pub struct StepView<'a> {
    /// The run.
    pub run: RunId,
    /// Its epoch.
    pub epoch: u32,
    /// The step audited.
    pub step: u64,
    /// The run's config.
    pub config: &'a RunConfig,
    /// The final attempt of every micro-batch.
    pub attempts: Vec<Option<u32>>,
    /// Live replicas per stage (peer, address), excluding any already excluded this step.
    pub replicas: Vec<Vec<(PeerId, SocketAddr)>>,
    /// In a sync mode whose replicas drift: per stage, per micro-batch, the replica that counted
    /// its gradient this step, if any. Empty otherwise.
    pub holders: Vec<Vec<Option<PeerId>>>,
    /// The agreed weights digest per stage at this step, when known.
    pub digests: Vec<Option<[u8; 32]>>,
    /// In a sync mode whose replicas drift between sync boundaries: each replica's own weights
    /// digest at this step (its last `Applied` or loaded state), which its receipts must sign in
    /// place of a stage-wide agreed one. Empty otherwise.
    pub own: HashMap<PeerId, [u8; 32]>,
    /// The trainer's peer, to call the replicas.
    pub peer: &'a Arc<PeerShared>,
}

/// The trainer's auditor: draws, checks, bans, and writes the ledger.
pub struct Auditor {
    cfg: AuditConfig,
    secret: [u8; 32],
    ledger: Option<LedgerWriter>,
    step: u64,
    seen: HashMap<MbKey, Seen>,
    served: HashMap<PeerId, u64>,
    banned: BTreeSet<PeerId>,
    /// Inner optimizer steps under audit (drifting replicas), drawn at the last audit phase.
    inner: Vec<InnerCheck>,
    /// Audited peers' own states fetched this step (drifting replicas), by (stage, peer,
    /// digest): per peer, because replicas that share weights (just after an outer sync) still
    /// keep their own AdamW moments, which the inner-step audit uses.
    /// With whether the shard holds the moments too (the full state) or the weights only.
    states: HashMap<StateKey, (Arc<Shard>, bool)>,
    /// Audited peers that served a state other than the one they signed this step (reason,
    /// evidence), by (stage, peer).
    state_lies: HashMap<(u32, PeerId), (String, [u8; 32])>,
    states_step: u64,
    /// Counters so far.
    pub stats: AuditStats,
    act: Codec,
    grad: Codec,
    limits: Limits,
    timeout: Duration,
    /// The model sends token ids with its boundary frames (a subspace model).
    subspace: bool,
    /// Proven bans (peer, step, stage, reason, evidence) given to a [`Auditor::stand_in`], for
    /// the auditor to record when it is back.
    deferred: Option<Vec<DeferredBan>>,
}

/// A proven ban a stand-in took: (peer, step, stage, reason, evidence).
pub(crate) type DeferredBan = (PeerId, u64, u32, String, [u8; 32]);

impl std::fmt::Debug for Auditor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Auditor(rate {})", self.cfg.rate)
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Auditor {
    /// An auditor for `run`; opens (or continues) the ledger if configured.
    pub fn new(
        cfg: AuditConfig,
        identity: &Identity,
        run: RunId,
        config: &RunConfig,
        timeout: Duration,
    ) -> Result<Auditor> {
        let secret = match cfg.seed {
            Some(s) => *blake3::hash(&s.to_le_bytes()).as_bytes(),
            None => rand::random(),
        };
        let ledger = match &cfg.ledger {
            Some(p) => Some(LedgerWriter::open(p, identity.clone(), run, now_ms())?),
            None => None,
        };
        let elems = config.train.micro_batch_size * config.train.seq_len * config.model.hidden_size;
        Ok(Auditor {
            secret,
            ledger,
            step: 0,
            seen: HashMap::new(),
            served: HashMap::new(),
            banned: BTreeSet::new(),
            inner: Vec::new(),
            states: HashMap::new(),
            state_lies: HashMap::new(),
            states_step: 0,
            stats: AuditStats::default(),
            act: config.codec.activations.parse()?,
            grad: config.codec.gradients.parse()?,
            limits: Limits::new(elems),
            timeout,
            subspace: config.model.subspace_rank > 0,
            deferred: None,
            cfg,
        })
    }

    /// What holds the auditor's place in the driver while the auditor itself is lent to the
    /// step's audits, which run concurrently with the sync round: it audits nothing and keeps
    /// any proven ban ([`Auditor::ban_proven`]) for [`Auditor::take_deferred`].
    pub(crate) fn stand_in(&self) -> Auditor {
        Auditor {
            cfg: AuditConfig {
                rate: 0.0,
                ledger: None,
                ..self.cfg.clone()
            },
            secret: [0; 32],
            ledger: None,
            step: self.step,
            seen: HashMap::new(),
            served: HashMap::new(),
            banned: self.banned.clone(),
            inner: Vec::new(),
            states: HashMap::new(),
            state_lies: HashMap::new(),
            states_step: 0,
            stats: AuditStats::default(),
            act: self.act,
            grad: self.grad,
            limits: self.limits,
            timeout: self.timeout,
            subspace: self.subspace,
            deferred: Some(Vec::new()),
        }
    }

    /// The proven bans a stand-in took, to record with the auditor.
    pub(crate) fn take_deferred(&mut self) -> Vec<DeferredBan> {
        self.deferred.take().unwrap_or_default()
    }

    /// How it audits.
    pub fn config(&self) -> &AuditConfig {
        &self.cfg
    }

    /// The ledger's head (for checkpoints), if a ledger is written.
    pub fn ledger_head(&self) -> Option<Head> {
        self.ledger.as_ref().map(LedgerWriter::head)
    }

    /// Whether an audit banned `p`.
    pub fn is_banned(&self, p: &PeerId) -> bool {
        self.banned.contains(p)
    }

    fn entry(&mut self, key: MbKey) -> &mut Seen {
        if key.step != self.step {
            self.seen.clear();
            self.step = key.step;
        }
        self.seen.entry(key).or_default()
    }

    /// The trainer sent the embedding output `frame` for attempt `key` along `route`.
    pub fn sent_forward(&mut self, key: MbKey, route: &[Hop], frame: &[u8]) {
        let s = self.entry(key);
        s.route = route.to_vec();
        s.sent_fwd = Some(frame_hash(frame));
    }

    /// The trainer received the last stage's output for `key`.
    pub fn got_forward(&mut self, key: MbKey, frame: &[u8]) {
        self.entry(key).got_fwd = Some(frame_hash(frame));
    }

    /// The trainer sent the head's input gradient for `key`.
    pub fn sent_backward(&mut self, key: MbKey, frame: &[u8]) {
        self.entry(key).sent_bwd = Some(frame_hash(frame));
    }

    /// The trainer received stage 0's input gradient for `key`.
    pub fn got_backward(&mut self, key: MbKey, frame: &[u8]) {
        self.entry(key).got_bwd = Some(frame_hash(frame));
    }

    /// A uniform draw in [0, 1) keyed by the secret and `parts` (what is drawn for): audited
    /// when below the rate.
    fn draw(&self, parts: &[&[u8]]) -> f64 {
        let mut h = blake3::Hasher::new();
        h.update(&self.secret);
        for part in parts {
            h.update(part);
        }
        let mut rng = ChaCha20Rng::from_seed(*h.finalize().as_bytes());
        rng.random::<f64>()
    }

    /// The audit rate of `peer`'s work: the new-peer rate for its first micro-batches.
    fn rate_for(&self, peer: &PeerId) -> f64 {
        let served = self.served.get(peer).copied().unwrap_or(0);
        if served < self.cfg.new_peer_micro_batches {
            self.cfg.new_peer_rate.max(self.cfg.rate)
        } else {
            self.cfg.rate
        }
    }

    async fn call<Q: crate::wire::WireMessage, R: crate::wire::WireMessage>(
        &self,
        ps: &PeerShared,
        addr: SocketAddr,
        peer: PeerId,
        msg: &Q,
    ) -> Result<R> {
        match tokio::time::timeout(self.timeout, ps.call::<Q, R>(addr, Some(peer), msg)).await {
            Ok(r) => Ok(r?.1),
            Err(_) => Err(Error::Timeout {
                what: "audit request",
                after: self.timeout,
            }),
        }
    }

    /// Audits the step's micro-batches (see the module doc); returns the peers to ban. Audit
    /// and ban entries go to the ledger at once.
    pub async fn audit_step(&mut self, v: &StepView<'_>) -> Vec<Ban> {
        let started = Instant::now();
        let mut bans: Vec<Ban> = Vec::new();
        // Rate 0 turns audits off, the new-peer rate included.
        if self.cfg.rate <= 0.0 {
            return bans;
        }
        if drifts(v) {
            bans.extend(self.resolve_inner(v).await);
        }
        let stages = v.replicas.len();
        let mut jobs = Vec::new();
        for (mb, att) in v.attempts.iter().enumerate() {
            let Some(attempt) = *att else { continue };
            let key = MbKey {
                step: v.step,
                mb: mb as u32,
                attempt,
            };
            let Some(seen) = self.seen.get(&key).filter(|_| self.step == v.step) else {
                continue;
            };
            // Only passes that ran to the end are audited: once every column of a micro-batch is
            // counted, the driver abandons an attempt still on its way back (a re-run for one
            // stage after a replica died), so the stages below never ran its backward and hold
            // no receipt for it (they had counted the micro-batch in an earlier attempt).
            if seen.route.len() != stages || seen.got_bwd.is_none() {
                continue;
            }
            for k in 0..stages as u32 {
                let p = seen.route[k as usize].peer;
                self.stats.candidates += 1;
                let u = self.draw(&[
                    &v.step.to_le_bytes(),
                    &(mb as u32).to_le_bytes(),
                    &k.to_le_bytes(),
                ]);
                if u < self.rate_for(&p) {
                    // Drawn only because the peer is new: its cost is reported apart.
                    jobs.push((key, k, u >= self.cfg.rate));
                }
            }
        }
        jobs.retain(|(key, k, _)| {
            let p = self.seen[key].route[*k as usize].peer;
            !self.banned.contains(&p) && !bans.iter().any(|b| b.peer == p)
        });
        if drifts(v) {
            self.prefetch_own_states(v, &jobs).await;
        }
        // The jobs wait on the network (records, neighbours, recomputations) far more than they
        // compute: they run at once, and their outcomes are merged in draw order, so the ledger
        // does not depend on which answer came first.
        let this = &*self;
        let outcomes = futures::stream::iter(jobs.iter().map(|&(key, k, new_peer)| async move {
            let seen = this.seen[&key].clone();
            let mut t = Tally::default();
            let r = this.audit_one(&mut t, v, key, k, &seen).await;
            (key, k, new_peer, t, r)
        }))
        .buffered(MAX_CONCURRENT_AUDITS)
        .collect::<Vec<_>>()
        .await;
        for (key, k, new_peer, mut t, r) in outcomes {
            if new_peer {
                self.stats.new_peer_audits += t.stats.audits;
                self.stats.new_peer_bytes += t.stats.bytes;
            }
            let ban = match r {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(step = v.step, microbatch = key.mb, stage = k, error = %e, "audit could not run");
                    None
                }
            };
            // Two audits of one cheater both ban it: the ledger records one ban.
            let mut banned_now: Vec<PeerId> = bans.iter().map(|b| b.peer).collect();
            t.log.retain(|b| match b {
                Body::Ban { peer, .. } if banned_now.contains(peer) => false,
                Body::Ban { peer, .. } => {
                    banned_now.push(*peer);
                    true
                }
                _ => true,
            });
            self.commit(t);
            if let Some(ban) = ban
                && !bans.iter().any(|b| b.peer == ban.peer)
            {
                bans.push(ban);
            }
        }
        if drifts(v) {
            let more = self.draw_inner(v, &bans).await;
            bans.extend(more);
        }
        // Count this step's work per peer for the new-peer rate (bans are handled by the driver).
        for (key, seen) in &self.seen {
            if v.attempts.get(key.mb as usize).copied().flatten() == Some(key.attempt) {
                for h in &seen.route {
                    *self.served.entry(h.peer).or_default() += 1;
                }
            }
        }
        for b in &bans {
            self.banned.insert(b.peer);
            self.stats.banned.push(b.peer);
            let n = self.served.get(&b.peer).copied().unwrap_or(0);
            self.stats.served_before_ban.push((b.peer, n));
        }
        if let Some(l) = self.ledger.as_mut()
            && let Err(e) = l.sync()
        {
            tracing::warn!(error = %e, "ledger sync failed");
        }
        self.stats.seconds += started.elapsed().as_secs_f64();
        bans
    }

    fn log(&mut self, body: Body) {
        if let Some(l) = self.ledger.as_mut()
            && let Err(e) = l.append(body, now_ms())
        {
            tracing::warn!(error = %e, "ledger append failed");
        }
    }

    /// An audit that proved `peer` lied (at `stage`, judged by `auditor`): a failed audit in the
    /// tally and the ledger, and its ban.
    #[allow(clippy::too_many_arguments)]
    fn lied_to(
        &self,
        t: &mut Tally,
        peer: PeerId,
        key: MbKey,
        stage: u32,
        auditor: PeerId,
        reason: String,
        evidence: [u8; 32],
    ) -> Ban {
        t.stats.audit_failures += 1;
        t.stats.per_peer.entry(peer).or_default().1 += 1;
        self.log_audit_to(t, peer, key, stage, auditor, None, false, 1.0);
        self.ban_to(t, peer, key.step, stage, reason, evidence)
    }

    fn ban_to(
        &self,
        t: &mut Tally,
        peer: PeerId,
        step: u64,
        stage: u32,
        reason: String,
        evidence: [u8; 32],
    ) -> Ban {
        tracing::warn!(peer = %peer.short(), step, stage, %reason, "peer banned");
        t.log.push(Body::Ban {
            peer,
            step,
            reason: reason.clone(),
            evidence,
        });
        Ban {
            peer,
            stage,
            reason,
        }
    }

    fn ban(
        &mut self,
        peer: PeerId,
        step: u64,
        stage: u32,
        reason: String,
        evidence: [u8; 32],
    ) -> Ban {
        let mut t = Tally::default();
        let ban = self.ban_to(&mut t, peer, step, stage, reason, evidence);
        self.commit(t);
        ban
    }

    /// Bans `peer` for misbehaviour the trainer saw itself outside an audit (a replica serving a
    /// state that is not its stage's agreed one): logged in the ledger like an audit's ban.
    pub fn ban_proven(
        &mut self,
        peer: PeerId,
        step: u64,
        stage: u32,
        reason: String,
        evidence: [u8; 32],
    ) -> Ban {
        if let Some(d) = self.deferred.as_mut() {
            d.push((peer, step, stage, reason.clone(), evidence));
            self.banned.insert(peer);
            return Ban {
                peer,
                stage,
                reason,
            };
        }
        let ban = self.ban(peer, step, stage, reason, evidence);
        if self.banned.insert(peer) {
            self.stats.banned.push(peer);
            let n = self.served.get(&peer).copied().unwrap_or(0);
            self.stats.served_before_ban.push((peer, n));
        }
        if let Some(l) = self.ledger.as_mut()
            && let Err(e) = l.sync()
        {
            tracing::warn!(error = %e, "ledger sync failed");
        }
        ban
    }

    async fn audit_one(
        &self,
        t: &mut Tally,
        v: &StepView<'_>,
        key: MbKey,
        k: u32,
        seen: &Seen,
    ) -> Result<Option<Ban>> {
        let stages = seen.route.len() as u32;
        let hop = seen.route[k as usize];
        let p = hop.peer;
        let fetch = |frames, outputs| AuditFetch {
            run: v.run,
            epoch: v.epoch,
            key,
            stage: k,
            frames,
            outputs,
        };
        let mut rec: AuditRecord = match self.call(v.peer, hop.addr, p, &fetch(true, false)).await {
            Ok(r) => r,
            Err(e) => {
                // An alive peer that cannot show the work it was credited for has no proof of it.
                // A dead one is the driver's business (it was probed just before).
                tracing::warn!(peer = %p.short(), error = %e, "audited peer did not show its record");
                return Ok(None);
            }
        };
        t.stats.bytes +=
            (rec.fwd_in.len() + rec.fwd_out.len() + rec.bwd_in.len() + rec.bwd_out.len()) as u64;
        t.stats.audits += 1;
        t.stats.per_peer.entry(p).or_default().0 += 1;
        let (fr, br) = match self.check_record(v, key, k, p, &seen.route, &rec) {
            Ok(r) => r,
            Err(reason) => {
                let ev = frame_hash(&crate::wire::encode_body(&rec).unwrap_or_default());
                return Ok(Some(self.lied_to(t, p, key, k, p, reason, ev)));
            }
        };
        // The ends of the pipeline: the trainer's own hashes.
        let mut lied = None;
        if k == 0 && seen.sent_fwd.is_some_and(|h| h != fr.input_hash) {
            lied = Some("forward input differs from what the trainer sent");
        }
        if k == 0 && seen.got_bwd.is_some_and(|h| h != br.output_hash) {
            lied = Some("input gradient differs from what the trainer received");
        }
        if k + 1 == stages && seen.got_fwd.is_some_and(|h| h != fr.output_hash) {
            lied = Some("forward output differs from what the trainer received");
        }
        if k + 1 == stages && seen.sent_bwd.is_some_and(|h| h != br.input_hash) {
            lied = Some("output gradient differs from what the trainer sent");
        }
        if let Some(reason) = lied {
            return Ok(Some(self.lied_to(
                t,
                p,
                key,
                k,
                p,
                reason.into(),
                fr.output_hash,
            )));
        }
        // Interior links: the neighbours' receipts.
        for (nk, up) in [(k.wrapping_sub(1), true), (k + 1, false)] {
            if nk >= stages {
                continue;
            }
            let n = seen.route[nk as usize];
            let Ok(nrec) = self
                .call::<AuditFetch, AuditRecord>(
                    v.peer,
                    n.addr,
                    n.peer,
                    &AuditFetch {
                        stage: nk,
                        ..fetch(false, false)
                    },
                )
                .await
            else {
                continue;
            };
            let (Some(nf), Some(nb)) = (&nrec.forward, &nrec.backward) else {
                continue;
            };
            if !nf.verify(&n.peer) || !nb.verify(&n.peer) {
                continue;
            }
            let liar = link_liar(up, p, k, n.peer, nk, &fr, &br, nf, nb, &nrec);
            if let Some((liar, at, reason)) = liar {
                tracing::warn!(peer = %liar.short(), audited = %p.short(), step = key.step, microbatch = key.mb, reason, "receipt chain broken");
                let ev = frame_hash(&crate::wire::encode_body(&nrec).unwrap_or_default());
                return Ok(Some(self.lied_to(
                    t,
                    liar,
                    key,
                    at,
                    liar,
                    reason.into(),
                    ev,
                )));
            }
        }
        if drifts(v) {
            return self.audit_own_state(t, v, key, k, hop, &fr, &br, rec).await;
        }
        // Recompute on another replica (or on the trainer when the stage has no other).
        let others: Vec<(PeerId, SocketAddr)> = v.replicas[k as usize]
            .iter()
            .copied()
            .filter(|(q, _)| *q != p && !self.banned.contains(q))
            .collect();
        let req = AuditRecompute {
            run: v.run,
            epoch: v.epoch,
            key,
            stage: k,
            fwd_in: rec.fwd_in.clone(),
            bwd_in: rec.bwd_in.clone(),
            frames: false,
        };
        // The trainer's own recomputation may load the state from any replica, the audited one
        // included: the state is verified against the digest the audited peer signed, which
        // must be the stage's agreed one.
        let mut sources = others.clone();
        sources.push((p, hop.addr));
        let mut auditor = None;
        for (q, addr) in &others {
            match self
                .call::<AuditRecompute, AuditResult>(v.peer, *addr, *q, &req)
                .await
            {
                Ok(r) => {
                    auditor = Some((*q, *addr, r));
                    break;
                }
                Err(e) => tracing::warn!(auditor = %q.short(), error = %e, "auditor failed"),
            }
        }
        t.stats.bytes += (req.fwd_in.len() + req.bwd_in.len()) as u64;
        let (a_id, a_res) = match auditor {
            Some((q, _, r)) => (q, r),
            None => {
                let me = PeerId([0; 32]);
                match self
                    .trainer_recompute(v, k, fr.weights_digest, &sources, &rec)
                    .await
                {
                    Ok(r) => (me, r),
                    Err(e) => {
                        tracing::warn!(error = %e, "no replica could recompute; audit skipped");
                        t.stats.audits -= 1;
                        t.stats.per_peer.entry(p).or_default().0 -= 1;
                        return Ok(None);
                    }
                }
            }
        };
        // Honest recomputations are bitwise identical here (measured): hashes settle most audits.
        if a_res.weights_digest == fr.weights_digest
            && a_res.fwd_hash == fr.output_hash
            && a_res.bwd_hash == br.output_hash
        {
            t.stats.identical += 1;
            self.log_audit_to(t, p, key, k, a_id, None, true, 0.0);
            return Ok(None);
        }
        // They differ: the frames themselves, the audited peer's (bound by its receipts) and the
        // auditor's, to measure by how much.
        if let Err(ban) = self
            .fetch_outputs(t, v, key, k, hop, (&fr, &br), a_id, &mut rec)
            .await
        {
            return Ok(Some(ban));
        }
        let req = AuditRecompute {
            frames: true,
            ..req
        };
        let a_res = if a_res.fwd_out.is_empty() && a_id != PeerId([0; 32]) {
            let addr = others.iter().find(|(q, _)| *q == a_id).map(|(_, a)| *a);
            match addr {
                Some(addr) => match self
                    .call::<AuditRecompute, AuditResult>(v.peer, addr, a_id, &req)
                    .await
                {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(auditor = %a_id.short(), error = %e, "auditor failed");
                        return Ok(None);
                    }
                },
                None => return Ok(None),
            }
        } else {
            a_res
        };
        t.stats.bytes += (a_res.fwd_out.len() + a_res.bwd_out.len()) as u64;
        let dist = |x: &AuditResult, fo: &[u8], bo: &[u8], lim: &Limits| {
            hidden_distance(fo, &x.fwd_out, lim, self.subspace)
                .max(frame_distance(bo, &x.bwd_out, lim))
        };
        let d_pa = if a_res.weights_digest != fr.weights_digest {
            1.0
        } else {
            dist(&a_res, &rec.fwd_out, &rec.bwd_out, &self.limits)
        };
        if d_pa <= self.cfg.tolerance {
            if d_pa == 0.0 {
                t.stats.identical += 1;
            }
            t.stats.max_passed_distance = t.stats.max_passed_distance.max(d_pa);
            self.log_audit_to(t, p, key, k, a_id, None, true, d_pa);
            return Ok(None);
        }
        // Mismatch: a referee decides.
        t.stats.audit_failures += 1;
        t.stats.per_peer.entry(p).or_default().1 += 1;
        let third: Vec<(PeerId, SocketAddr)> =
            others.iter().copied().filter(|(q, _)| *q != a_id).collect();
        let mut referee = None;
        for (q, addr) in &third {
            if let Ok(r) = self
                .call::<AuditRecompute, AuditResult>(v.peer, *addr, *q, &req)
                .await
            {
                referee = Some((*q, r));
                break;
            }
        }
        let (r_id, r_res) = match referee {
            Some(r) => r,
            None => match self
                .trainer_recompute(v, k, fr.weights_digest, &sources, &rec)
                .await
            {
                Ok(r) => (PeerId([0; 32]), r),
                Err(e) => {
                    tracing::warn!(error = %e, "no referee; nobody banned");
                    self.log_audit_to(t, p, key, k, a_id, None, false, d_pa);
                    return Ok(None);
                }
            },
        };
        t.stats.bytes += (r_res.fwd_out.len() + r_res.bwd_out.len()) as u64;
        let d_pr = dist(&r_res, &rec.fwd_out, &rec.bwd_out, &self.limits);
        let d_ar = dist(&r_res, &a_res.fwd_out, &a_res.bwd_out, &self.limits);
        let tol = self.cfg.tolerance;
        let evidence = frames_evidence(&rec);
        let referee_id = Some(r_id);
        if d_pr > tol && d_ar <= tol {
            self.log_audit_to(t, p, key, k, a_id, referee_id, false, d_pr);
            let reason = format!(
                "stage {k} step {} mb {}: output off by {d_pr:.3e} (relative L2) from two recomputations",
                key.step, key.mb
            );
            return Ok(Some(self.ban_to(t, p, key.step, k, reason, evidence)));
        }
        if d_ar > tol && d_pr <= tol && a_id != PeerId([0; 32]) {
            // The auditor lied about an honest peer's work.
            self.log_audit_to(t, p, key, k, a_id, referee_id, true, d_pr);
            self.log_audit_to(t, a_id, key, k, r_id, None, false, d_ar);
            let reason = format!(
                "audit of stage {k} step {} mb {}: recomputation off by {d_ar:.3e}",
                key.step, key.mb
            );
            return Ok(Some(self.ban_to(t, a_id, key.step, k, reason, evidence)));
        }
        tracing::warn!(peer = %p.short(), d_pa, d_pr, d_ar, "audit inconclusive; nobody banned");
        self.log_audit_to(t, p, key, k, a_id, referee_id, false, d_pr);
        Ok(None)
    }

    #[allow(clippy::too_many_arguments)]
    fn log_audit_to(
        &self,
        t: &mut Tally,
        peer: PeerId,
        key: MbKey,
        stage: u32,
        auditor: PeerId,
        referee: Option<PeerId>,
        passed: bool,
        distance: f32,
    ) {
        let tolerance = self.cfg.tolerance;
        t.log.push(Body::Audit {
            peer,
            step: key.step,
            mb: key.mb,
            stage,
            auditor,
            referee,
            passed,
            distance: if distance.is_finite() { distance } else { 1.0 },
            tolerance,
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn log_audit(
        &mut self,
        peer: PeerId,
        key: MbKey,
        stage: u32,
        auditor: PeerId,
        referee: Option<PeerId>,
        passed: bool,
        distance: f32,
    ) {
        let mut t = Tally::default();
        self.log_audit_to(&mut t, peer, key, stage, auditor, referee, passed, distance);
        self.commit(t);
    }

    /// Merges a job's counters into the stats and appends its ledger entries.
    fn commit(&mut self, t: Tally) {
        self.stats.absorb(&t.stats);
        for b in t.log {
            self.log(b);
        }
    }

    /// The trainer recomputes itself from the stage state fetched from a replica and verified
    /// against `digest` (at step 0 of a fresh run it can build it from the seed).
    async fn trainer_recompute(
        &self,
        v: &StepView<'_>,
        k: u32,
        digest: [u8; 32],
        sources: &[(PeerId, SocketAddr)],
        rec: &AuditRecord,
    ) -> Result<AuditResult> {
        let opts = StageOptions::new(v.run, v.config.clone(), k);
        let from: Vec<Endpoint> = sources
            .iter()
            .map(|(p, a)| Endpoint { peer: *p, addr: *a })
            .collect();
        let shard = if v.step == 0 {
            let cfg = v.config.clone();
            let s =
                tokio::task::spawn_blocking(move || crate::stage::init_shard(&cfg, k)).await??;
            if s.weights_digest()? != digest {
                return Err(Error::DigestMismatch(k));
            }
            s
        } else {
            fetch_state(v.peer, &opts, v.epoch, v.step, &from, digest).await?
        };
        let (fi, bi) = (rec.fwd_in.clone(), rec.bwd_in.clone());
        let (limits, act, grad) = (self.limits, self.act, self.grad);
        let (fo, bo) = tokio::task::spawn_blocking(move || {
            recompute(&shard, k as usize, &fi, &bi, &limits, act, grad)
        })
        .await??;
        Ok(AuditResult {
            weights_digest: digest,
            fwd_hash: frame_hash(&fo),
            bwd_hash: frame_hash(&bo),
            fwd_out: fo,
            bwd_out: bo,
        })
    }

    /// After the step's Apply: Work entries per (peer, stage) for the micro-batches of the
    /// completed attempts, then fsync.
    pub fn end_step(
        &mut self,
        step: u64,
        attempts: &[Option<u32>],
        config: &RunConfig,
        lr: f64,
        clip: f64,
    ) {
        self.step_inner(step, config, lr, clip);
        let tokens = (config.train.micro_batch_size * config.train.seq_len) as u64;
        let layers: Vec<u64> = config
            .stages
            .windows(2)
            .map(|w| (w[1] - w[0]) as u64)
            .collect();
        let mut work: std::collections::BTreeMap<(PeerId, u32), u32> = Default::default();
        for (key, seen) in &self.seen {
            if key.step != step
                || attempts.get(key.mb as usize).copied().flatten() != Some(key.attempt)
            {
                continue;
            }
            for h in &seen.route {
                *work.entry((h.peer, h.stage)).or_default() += 1;
            }
        }
        for ((peer, stage), mbs) in work {
            if self.banned.contains(&peer) {
                continue;
            }
            let l = layers.get(stage as usize).copied().unwrap_or(0);
            self.log(Body::Work {
                peer,
                step,
                stage,
                micro_batches: mbs,
                tokens_layers: mbs as u64 * tokens * l,
            });
        }
        if let Some(l) = self.ledger.as_mut()
            && let Err(e) = l.sync()
        {
            tracing::warn!(error = %e, "ledger sync failed");
        }
    }
}

#[cfg(test)]
mod tests;
