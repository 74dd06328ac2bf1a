//! Moving a stage's state (weights, AdamW moments and step, as [`Shard::export_state`] writes them)
//! between peers: the one implementation used by replicas that join or reload, by the trainer
//! (checkpoints, the hand-off of a stage's last leaving replica) and by audits.
//!
//! The state is served in chunks of a cached export ([`serve_chunk`]; BLAKE3 of the whole and the
//! weights digest in every chunk) and fetched by [`fetch_verified`], which trusts nothing a single
//! replica says about itself: the bytes must hash to what the chunks announced, import into a shard
//! of the stage, be at the asked step, and carry the weights digest the stage's replicas agreed on
//! (the `Applied` majority). A source failing any of these is reported in [`Fetched::bad`] /
//! [`FetchFailed::bad`] so that the caller can blame it; the next source is tried. A source that is
//! merely unreachable is skipped without blame.

use std::net::SocketAddr;

use swarm_model::{RunConfig, Shard};

use crate::error::{Error, Result};
use crate::identity::PeerId;
use crate::membership::RunId;
use crate::peer::PeerShared;
use crate::protocol::{Endpoint, FetchState, MAX_CHUNK_BYTES, MAX_STATE_BYTES, StateChunk};
use crate::rpc::{RpcError, code};

/// Which state to fetch: a stage of a run at the end of a step, in an epoch.
#[derive(Debug, Clone, Copy)]
pub struct StateRequest {
    /// The run.
    pub run: RunId,
    /// The run's epoch (a restore starts a new one).
    pub epoch: u32,
    /// The stage.
    pub stage: u32,
    /// Steps applied in the state asked for.
    pub step: u64,
    /// Bytes asked per chunk (capped by [`MAX_CHUNK_BYTES`]).
    pub chunk_bytes: u32,
    /// The weights only (`FetchState::weights_only`): the fetched shard has no moments.
    pub weights_only: bool,
}

/// A source that served a state failing verification: it answered, so this is its fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadState {
    /// The source.
    pub peer: PeerId,
    /// What was wrong (for the ban's ledger entry).
    pub reason: String,
    /// BLAKE3 of the bytes it served (all zero when the bytes never formed a whole state).
    pub evidence: [u8; 32],
}

/// A verified state: the imported shard, the exact bytes (what a checkpoint stores) and who
/// served it, with the sources refused before it.
#[derive(Debug)]
pub struct Fetched {
    /// The state imported into a shard of the stage.
    pub shard: Shard,
    /// The exact bytes served.
    pub bytes: Vec<u8>,
    /// Who served it.
    pub source: PeerId,
    /// Sources refused before it.
    pub bad: Vec<BadState>,
}

/// No source served the agreed state.
#[derive(Debug)]
pub struct FetchFailed {
    /// The last error (of a bad or an unreachable source).
    pub error: Error,
    /// Sources that served a state failing verification.
    pub bad: Vec<BadState>,
}

impl From<FetchFailed> for Error {
    fn from(f: FetchFailed) -> Error {
        f.error
    }
}

/// The chunk of `bytes` a `FetchState` asks for (replicas serve their export, the trainer a
/// restored checkpoint or a leaver's hand-off).
pub fn serve_chunk(
    f: &FetchState,
    bytes: &[u8],
    hash: [u8; 32],
    digest: [u8; 32],
) -> Result<StateChunk, RpcError> {
    let total = bytes.len() as u64;
    if f.offset > total {
        return Err(RpcError::refused(
            code::BAD_REQUEST,
            "offset beyond the state",
        ));
    }
    let len = (f.max_len as u64)
        .min(MAX_CHUNK_BYTES as u64)
        .min(total - f.offset) as usize;
    let start = f.offset as usize;
    Ok(StateChunk {
        run: f.run,
        epoch: f.epoch,
        stage: f.stage,
        step: f.step,
        total_len: total,
        offset: f.offset,
        state_hash: hash,
        digest,
        data: bytes[start..start + len].to_vec(),
    })
}

/// Largest export accepted for a stage of `num_params` parameters: weights and two moments in
/// f32 plus a generous safetensors header (names and offsets of every tensor).
fn max_export_len(num_params: usize) -> u64 {
    (12 * num_params as u64 + 16 * 1024 * 1024).min(MAX_STATE_BYTES)
}

/// How a download from one source ended.
enum Download {
    Got(Vec<u8>),
    /// The source answered with bytes that are not a consistent state: its fault.
    Bad(String),
    /// The source could not be asked (gone, refused, timed out): nobody's fault we can prove.
    Unreachable(Error),
}

/// Downloads the export of `req` from `src` in chunks. Bounded: every chunk must advance and the
/// total is capped by `max_total` before anything is reserved.
async fn download(
    peer: &PeerShared,
    req: &StateRequest,
    src: &Endpoint,
    max_total: u64,
) -> Download {
    let mut buf: Vec<u8> = Vec::new();
    let mut expect: Option<(u64, [u8; 32], [u8; 32])> = None;
    let chunk = req.chunk_bytes.clamp(1024, MAX_CHUNK_BYTES as u32);
    let max_chunks = max_total / 1024 + 2;
    for _ in 0..max_chunks {
        let ask = FetchState {
            run: req.run,
            epoch: req.epoch,
            stage: req.stage,
            step: req.step,
            offset: buf.len() as u64,
            max_len: chunk,
            weights_only: req.weights_only,
        };
        let c: StateChunk = match peer.call(src.addr, Some(src.peer), &ask).await {
            Ok((_, c)) => c,
            Err(e) => return Download::Unreachable(e.into()),
        };
        if c.run != req.run
            || c.epoch != req.epoch
            || c.offset != ask.offset
            || c.step != req.step
            || c.stage != req.stage
        {
            return Download::Bad("state chunk does not answer the request".into());
        }
        match expect {
            None => {
                if c.total_len > max_total {
                    return Download::Bad(format!(
                        "state of {} bytes, more than {max_total} for this stage",
                        c.total_len
                    ));
                }
                buf.reserve_exact(c.total_len as usize);
                expect = Some((c.total_len, c.state_hash, c.digest));
            }
            Some(e) if e != (c.total_len, c.state_hash, c.digest) => {
                return Download::Bad("the state changed during the fetch".into());
            }
            Some(_) => {}
        }
        if (c.data.is_empty() && (buf.len() as u64) < c.total_len)
            || buf.len() as u64 + c.data.len() as u64 > c.total_len
        {
            return Download::Bad("state chunk of the wrong length".into());
        }
        buf.extend_from_slice(&c.data);
        if buf.len() as u64 == c.total_len {
            if *blake3::hash(&buf).as_bytes() != c.state_hash {
                return Download::Bad("state bytes fail their announced hash".into());
            }
            return Download::Got(buf);
        }
    }
    Download::Bad("state fetch did not finish".into())
}

/// Fetches the state of `req` from `from` (tried in order) and verifies it against the stage's
/// agreed weights `digest` (see the module docs). `config` gives the stage's parameters.
pub async fn fetch_verified(
    peer: &PeerShared,
    config: &RunConfig,
    req: &StateRequest,
    from: &[Endpoint],
    digest: [u8; 32],
) -> Result<Fetched, FetchFailed> {
    let mut bad = Vec::new();
    let pieces = match crate::stage::stage_pieces(config, req.stage) {
        Ok(p) => p,
        Err(error) => return Err(FetchFailed { error, bad }),
    };
    let num_params: usize = pieces
        .iter()
        .flat_map(|p| p.parameters(&config.model))
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    let max_total = max_export_len(num_params);
    let mut last = Error::NoStateSource(req.stage);
    for src in from {
        let bytes = match download(peer, req, src, max_total).await {
            Download::Got(b) => b,
            Download::Bad(reason) => {
                last = Error::BadState {
                    peer: src.peer,
                    reason: reason.clone(),
                };
                blame(&mut bad, src.peer, reason, [0; 32]);
                continue;
            }
            Download::Unreachable(e) => {
                tracing::warn!(source = %src.peer.short(), stage = req.stage, error = %e, "state source unreachable");
                last = e;
                continue;
            }
        };
        let (cfg, stage, step, full) = (config.clone(), req.stage, req.step, !req.weights_only);
        let checked = tokio::task::spawn_blocking(move || {
            let verdict = check_state(&cfg, stage, step, full, &bytes, digest);
            (verdict, bytes)
        })
        .await;
        let (verdict, bytes) = match checked {
            Ok(v) => v,
            Err(e) => {
                return Err(FetchFailed {
                    error: Error::Task(e),
                    bad,
                });
            }
        };
        match verdict {
            Ok(shard) => {
                return Ok(Fetched {
                    shard,
                    bytes,
                    source: src.peer,
                    bad,
                });
            }
            Err(reason) => {
                last = Error::BadState {
                    peer: src.peer,
                    reason: reason.clone(),
                };
                blame(&mut bad, src.peer, reason, *blake3::hash(&bytes).as_bytes());
            }
        }
    }
    Err(FetchFailed { error: last, bad })
}

fn blame(bad: &mut Vec<BadState>, peer: PeerId, reason: String, evidence: [u8; 32]) {
    tracing::warn!(source = %peer.short(), %reason, "state source refused");
    bad.push(BadState {
        peer,
        reason,
        evidence,
    });
}

/// Imports `bytes` (the full state, or the weights only) into a fresh shard of `stage` and
/// checks its step and weights digest. `Err` is the reason the state is refused.
fn check_state(
    config: &RunConfig,
    stage: u32,
    step: u64,
    full: bool,
    bytes: &[u8],
    digest: [u8; 32],
) -> std::result::Result<Shard, String> {
    let mut shard = crate::stage::init_shard(config, stage).map_err(|e| e.to_string())?;
    let imported = if full {
        shard.import_state(bytes)
    } else {
        shard.import_weights(bytes)
    };
    imported.map_err(|e| format!("state does not import: {e}"))?;
    if shard.step() != step {
        return Err(format!("state at step {}, not {step}", shard.step()));
    }
    let got = shard.weights_digest().map_err(|e| e.to_string())?;
    if got != digest {
        return Err(format!(
            "weights digest {} is not the stage's agreed {}",
            hex::encode(&got[..8]),
            hex::encode(&digest[..8])
        ));
    }
    Ok(shard)
}

/// The endpoints of `(peer, addr)` pairs, in order.
pub fn endpoints(sources: &[(PeerId, SocketAddr)]) -> Vec<Endpoint> {
    sources
        .iter()
        .map(|&(peer, addr)| Endpoint { peer, addr })
        .collect()
}
