//! The trainer's checkpoints: the whole model in HF format (model crate's `checkpoint`), with
//! AdamW moments, the step, the run id and the epoch, assembled from the stage states fetched from
//! replicas and the trainer's own ends shard; and the way back (resume, restore).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use swarm_model::checkpoint::{self as ckpt, TrainState};
use swarm_model::shard::STATE_FORMAT;
use swarm_model::{Piece, RunConfig, Shard};

use crate::error::{Error, Result};
use crate::ledger::Head;
use crate::membership::RunId;

const META_RUN: &str = "swarm.run_id";
const META_EPOCH: &str = "swarm.epoch";
const META_CONFIG: &str = "swarm.run_config";
/// The contribution ledger's head (`SEQ:HEX`) when the checkpoint was written: a ledger file cut
/// after it fails `swarm ledger verify --checkpoint`.
const META_LEDGER_HEAD: &str = "swarm.ledger_head";

fn bad(m: impl Into<String>) -> Error {
    Error::Checkpoint(m.into())
}

/// Whether `dir` holds a checkpoint.
pub fn exists(dir: &Path) -> bool {
    dir.join(ckpt::CONFIG_FILE).exists()
}

/// One stage's state as replicas exchange it (`Shard::export_state` bytes) and its digest.
pub struct StageState {
    /// `Shard::export_state` bytes.
    pub bytes: Vec<u8>,
    /// Its weights digest.
    pub digest: [u8; 32],
}

/// What a checkpoint restores.
pub struct Restored {
    /// The run it belongs to.
    pub run: RunId,
    /// The epoch it was written in (a resume runs the next).
    pub epoch: u32,
    /// Steps done.
    pub step: u64,
    /// Export of the ends shard (embedding + head).
    pub ends_state: Vec<u8>,
    /// Export of each stage, in stage order.
    pub stages: Vec<StageState>,
}

/// Splits `Shard::export_state` bytes into weights and HF-named moments (`<name>.exp_avg`).
fn split_state(
    bytes: &[u8],
    weights: &mut HashMap<String, Tensor>,
    moments: &mut HashMap<String, Tensor>,
) -> Result<()> {
    let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)
        .map_err(swarm_model::Error::from)?;
    for (name, t) in tensors {
        if let Some(n) = name.strip_prefix("optimizer.exp_avg_sq.") {
            moments.insert(format!("{n}.exp_avg_sq"), t);
        } else if let Some(n) = name.strip_prefix("optimizer.exp_avg.") {
            moments.insert(format!("{n}.exp_avg"), t);
        } else {
            weights.insert(name, t);
        }
    }
    Ok(())
}

/// Mean loss of the whole model (the ends' and every stage's exported state) over the first
/// `cfg.train.eval_batches` validation batches: the same batches and the same mean as the local
/// trainer's `eval`, so a swarm run's validation curve compares with the local run's.
pub fn val_loss(
    cfg: &RunConfig,
    corpus: &swarm_model::Corpus,
    ends_state: &[u8],
    stage_states: &[Vec<u8>],
) -> Result<f64> {
    let mut weights = HashMap::new();
    let mut moments = HashMap::new();
    split_state(ends_state, &mut weights, &mut moments)?;
    for s in stage_states {
        split_state(s, &mut weights, &mut moments)?;
    }
    let model = swarm_model::checkpoint_eval::Evaluator::new(&cfg.model, &weights)?;
    let t = &cfg.train;
    let mut total = 0.0;
    for i in 0..t.eval_batches {
        let b = corpus.val_batch(i as u64, t.micro_batch_size, t.seq_len)?;
        total += model.loss(&b.inputs, &b.targets, b.batch_size, b.seq_len)?;
    }
    Ok(total / t.eval_batches.max(1) as f64)
}

/// Writes the model at `step` (steps done) to `dir` atomically.
pub fn save(
    dir: &Path,
    cfg: &RunConfig,
    run: RunId,
    epoch: u32,
    step: u64,
    ends_state: &[u8],
    stage_states: &[Vec<u8>],
) -> Result<()> {
    save_with_ledger(dir, cfg, run, epoch, step, ends_state, stage_states, None)
}

/// [`save`], also recording the ledger head (`ledger_head`) in the training state's metadata.
#[allow(clippy::too_many_arguments)]
pub fn save_with_ledger(
    dir: &Path,
    cfg: &RunConfig,
    run: RunId,
    epoch: u32,
    step: u64,
    ends_state: &[u8],
    stage_states: &[Vec<u8>],
    ledger_head: Option<Head>,
) -> Result<()> {
    let mut weights = HashMap::new();
    let mut moments = HashMap::new();
    split_state(ends_state, &mut weights, &mut moments)?;
    for s in stage_states {
        split_state(s, &mut weights, &mut moments)?;
    }
    let mut metadata = BTreeMap::from([
        (META_RUN.to_string(), run.to_string()),
        (META_EPOCH.to_string(), epoch.to_string()),
        (META_CONFIG.to_string(), cfg.to_toml()?),
    ]);
    if let Some(h) = ledger_head {
        metadata.insert(META_LEDGER_HEAD.to_string(), h.to_string());
    }
    let state = TrainState {
        step,
        optimizer: if step == 0 { HashMap::new() } else { moments },
        metadata,
    };
    ckpt::save_with_tokenizer(
        dir,
        &cfg.model,
        &weights,
        Some(&state),
        cfg.data.tokenizer.as_deref(),
    )?;
    Ok(())
}

/// Builds `Shard::export_state` bytes for `pieces` from checkpoint tensors and moments.
fn export_for(
    cfg: &RunConfig,
    pieces: &[Piece],
    weights: &HashMap<String, Tensor>,
    moments: &HashMap<String, Tensor>,
    step: u64,
) -> Result<(Vec<u8>, [u8; 32])> {
    let shard = Shard::from_tensors(&cfg.model, pieces, weights, DType::F32, &Device::Cpu)?;
    let digest = shard.weights_digest()?;
    let mut bufs: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let to_bytes = |t: &Tensor| -> Result<Vec<u8>> {
        let v = t
            .flatten_all()
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(swarm_model::Error::from)?;
        Ok(v.iter().flat_map(|x| x.to_le_bytes()).collect())
    };
    for (name, shape) in shard.parameter_names() {
        let w = weights
            .get(&name)
            .ok_or_else(|| bad(format!("checkpoint lacks {name}")))?;
        bufs.push((name.clone(), shape.clone(), to_bytes(w)?));
        for (suffix, prefix) in [
            ("exp_avg", "optimizer.exp_avg."),
            ("exp_avg_sq", "optimizer.exp_avg_sq."),
        ] {
            let bytes = match moments.get(&format!("{name}.{suffix}")) {
                Some(m) => to_bytes(m)?,
                None if step == 0 || moments.is_empty() => {
                    vec![0u8; shape.iter().product::<usize>() * 4]
                }
                None => return Err(bad(format!("checkpoint lacks {name}.{suffix}"))),
            };
            bufs.push((format!("{prefix}{name}"), shape.clone(), bytes));
        }
    }
    let views = bufs
        .iter()
        .map(|(n, shape, b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| bad(e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([
        ("format".to_string(), STATE_FORMAT.to_string()),
        ("step".to_string(), step.to_string()),
    ]);
    let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| bad(e.to_string()))?;
    Ok((bytes, digest))
}

/// The ledger head recorded in the checkpoint in `dir` (`None` when it recorded none).
pub fn ledger_head(dir: &Path) -> Result<Option<Head>> {
    let c = ckpt::load(dir)?;
    let Some(s) = c
        .state
        .as_ref()
        .and_then(|s| s.metadata.get(META_LEDGER_HEAD))
    else {
        return Ok(None);
    };
    Head::parse(s)
        .map(Some)
        .ok_or_else(|| bad(format!("{}: malformed ledger head {s:?}", dir.display())))
}

/// Reads the checkpoint in `dir` back into per-shard states for a run of `cfg`.
pub fn restore(dir: &Path, cfg: &RunConfig, _device: &Device) -> Result<Restored> {
    let c = ckpt::load(dir)?;
    let (model, tensors) = c.trained_model();
    if *model != cfg.model {
        return Err(bad(format!(
            "{}: the checkpoint's model differs from the run config's",
            dir.display()
        )));
    }
    let state = c
        .state
        .ok_or_else(|| bad(format!("{}: no training state to resume", dir.display())))?;
    let run = state
        .metadata
        .get(META_RUN)
        .and_then(|s| RunId::parse(s))
        .ok_or_else(|| bad(format!("{}: not a swarm run checkpoint", dir.display())))?;
    let epoch: u32 = state
        .metadata
        .get(META_EPOCH)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("{}: no epoch", dir.display())))?;
    let (ends_state, _) = export_for(
        cfg,
        &[Piece::Embedding, Piece::Head],
        &tensors,
        &state.optimizer,
        state.step,
    )?;
    let mut stages = Vec::new();
    for piece in Piece::stages(&cfg.stages) {
        let (bytes, digest) = export_for(cfg, &[piece], &tensors, &state.optimizer, state.step)?;
        stages.push(StageState { bytes, digest });
    }
    Ok(Restored {
        run,
        epoch,
        step: state.step,
        ends_state,
        stages,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The export of the original shard holding the same pieces as `like`.
    fn shards_state(shards: &[Shard], like: &Shard) -> Vec<u8> {
        shards
            .iter()
            .find(|s| s.pieces() == like.pieces())
            .unwrap()
            .export_state()
            .unwrap()
    }

    #[test]
    fn save_then_restore_gives_back_every_shard_bitwise() {
        save_then_restore(0);
    }

    /// A subspace model's checkpoint restores its factors and their moments, not the
    /// materialized matrices (which could not continue bitwise).
    #[test]
    fn save_then_restore_of_a_subspace_model_gives_back_every_shard_bitwise() {
        save_then_restore(8);
    }

    fn save_then_restore(rank: usize) {
        let mut cfg = RunConfig::default();
        cfg.model.hidden_size = 32;
        cfg.model.intermediate_size = 64;
        cfg.model.num_attention_heads = 4;
        cfg.model.num_key_value_heads = Some(2);
        cfg.model.subspace_rank = rank;
        cfg.model.subspace_seed = 3;
        cfg.stages = vec![0, 1, 2];
        let dev = Device::Cpu;
        let mut shards: Vec<Shard> = Vec::new();
        let mut pieces = vec![vec![Piece::Embedding, Piece::Head]];
        pieces.extend(Piece::stages(&cfg.stages).into_iter().map(|p| vec![p]));
        for p in &pieces {
            let mut s = Shard::new(&cfg.model, p, 7, DType::F32, &dev).unwrap();
            // Non-zero moments and a step: one optimizer step on made-up gradients.
            let n = s.num_parameters();
            let g: Vec<f32> = (0..n).map(|i| ((i % 17) as f32 - 8.0) * 1e-3).collect();
            s.set_grads_flat(&g).unwrap();
            s.optimizer_step(&cfg.adamw(), 1e-3, 1.0).unwrap();
            shards.push(s);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ckpt");
        let run = RunId([3; 16]);
        let states: Vec<Vec<u8>> = shards[1..]
            .iter()
            .map(|s| s.export_state().unwrap())
            .collect();
        save(
            &path,
            &cfg,
            run,
            2,
            1,
            &shards[0].export_state().unwrap(),
            &states,
        )
        .unwrap();
        assert!(exists(&path));
        assert_eq!(ledger_head(&path).unwrap(), None);
        // The ledger head rides in the training state's metadata.
        let head = Head {
            seq: 41,
            hash: [0xab; 32],
        };
        let with_head = dir.path().join("ckpt-head");
        let ends = shards[0].export_state().unwrap();
        save_with_ledger(&with_head, &cfg, run, 2, 1, &ends, &states, Some(head)).unwrap();
        assert_eq!(ledger_head(&with_head).unwrap(), Some(head));
        let r = restore(&path, &cfg, &dev).unwrap();
        assert_eq!((r.run, r.epoch, r.step), (run, 2, 1));
        // Same weights, and the same moments and step: one more identical optimizer step keeps
        // the digests equal (different moments or step would make them differ).
        let same_after_a_step = |restored: &mut Shard, orig: &Shard| {
            assert_eq!(
                restored.weights_digest().unwrap(),
                orig.weights_digest().unwrap()
            );
            assert_eq!(restored.step(), orig.step());
            let mut orig =
                Shard::from_tensors(&cfg.model, orig.pieces(), &orig.tensors(), DType::F32, &dev)
                    .unwrap();
            orig.import_state(&shards_state(&shards, restored)).unwrap();
            let n = restored.num_parameters();
            let g: Vec<f32> = (0..n).map(|i| ((i % 5) as f32 - 2.0) * 1e-2).collect();
            for s in [&mut *restored, &mut orig] {
                s.set_grads_flat(&g).unwrap();
                s.optimizer_step(&cfg.adamw(), 1e-3, 1.0).unwrap();
            }
            assert_eq!(
                restored.weights_digest().unwrap(),
                orig.weights_digest().unwrap()
            );
        };
        let mut ends = Shard::new(&cfg.model, &pieces[0], 99, DType::F32, &dev).unwrap();
        ends.import_state(&r.ends_state).unwrap();
        same_after_a_step(&mut ends, &shards[0]);
        for (k, st) in r.stages.iter().enumerate() {
            let mut s = Shard::new(&cfg.model, &pieces[k + 1], 99, DType::F32, &dev).unwrap();
            s.import_state(&st.bytes).unwrap();
            assert_eq!(st.digest, shards[k + 1].weights_digest().unwrap());
            same_after_a_step(&mut s, &shards[k + 1]);
        }
        // Another run's config is refused.
        let mut other = cfg.clone();
        other.model.hidden_size = 64;
        assert!(restore(&path, &other, &dev).is_err());
    }
}
