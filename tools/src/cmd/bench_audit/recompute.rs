//! Measurement of audits (`swarm bench audit`): honest recomputation distances across thread
//! counts, the distance each fault kind produces, and an audit's cost.

use std::time::Instant;

use anyhow::{Result, anyhow, bail};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use swarm_compression::{Codec, Decoder, Limits};
use swarm_core::compute::{self, recompute};
use swarm_core::fault::{Fault, FaultKind, FaultSpec};
use swarm_core::stage::init_shard;
use swarm_core::trainer::audit::{DEFAULT_TOLERANCE, frame_distance, hidden_distance};
use swarm_model::RunConfig;

fn cand<T>(r: candle_core::Result<T>) -> Result<T> {
    Ok(r?)
}

/// What [`measure_recompute`] found (`swarm bench audit`).
#[derive(Debug, Clone, Serialize, Default)]
pub(super) struct RecomputeBench {
    pub codec_activations: String,
    pub codec_gradients: String,
    pub threads: Vec<usize>,
    /// Honest comparisons (each a forward + input-gradient frame pair).
    pub comparisons: u64,
    pub identical: u64,
    pub max_honest_distance: f32,
    /// Smallest distance each fault kind produced over the micro-batches.
    pub min_fault_distance: Vec<(String, f32)>,
    pub tolerance: f32,
    /// Mean recompute time of one audit (forward + input-gradient backward, with codecs).
    pub recompute_ms: f64,
    /// Mean time of the stage's own forward + backward (with parameter gradients) per micro-batch.
    pub stage_fwd_bwd_ms: f64,
    /// Bytes per passing audit: the 2 input frames fetched, then sent to the auditor (outputs
    /// are compared by hash; frames move only on a mismatch).
    pub bytes_per_audit: u64,
    /// Bytes the micro-batch's own passes put on the stage's links (its 4 frames).
    pub bytes_per_micro_batch: u64,
}

/// A compute pool of `n` threads: the stage kernels split their work over the pool they run in
/// (`rayon::current_num_threads`), so a pass run inside `install` uses exactly `n`.
fn pool(n: usize) -> Result<rayon::ThreadPool> {
    Ok(rayon::ThreadPoolBuilder::new().num_threads(n).build()?)
}

fn random_tensor(rng: &mut ChaCha8Rng, dims: &[usize], scale: f32) -> Vec<f32> {
    let n: usize = dims.iter().product();
    (0..n)
        .map(|_| {
            let u1: f32 = rng.random::<f32>().max(1e-7);
            let u2: f32 = rng.random();
            scale * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
        })
        .collect()
}

/// A `dims` tensor of normal values times `scale` (activations at 1, their gradients at 1e-3).
fn random_hidden(rng: &mut ChaCha8Rng, dims: &[usize], scale: f32) -> Result<Tensor> {
    cand(Tensor::from_vec(
        random_tensor(rng, dims, scale),
        dims,
        &Device::Cpu,
    ))
}

/// Measures honest recomputation differences across `threads` (every pair of runs, two runs per
/// thread count) for `micro_batches` random micro-batches per stage of `cfg` with its codecs, the
/// smallest distance each fault kind gives on the same micro-batches, and the audit's cost.
///
/// Each thread count runs in its own rayon pool of that size.
pub(super) fn measure_recompute(
    cfg: &RunConfig,
    micro_batches: usize,
    threads: &[usize],
    seed: u64,
    on_progress: &mut dyn FnMut(),
) -> Result<RecomputeBench> {
    if threads.is_empty() {
        bail!("no thread counts");
    }
    let act: Codec = cfg.codec.activations.parse()?;
    let grad: Codec = cfg.codec.gradients.parse()?;
    let dims = [
        cfg.train.micro_batch_size,
        cfg.train.seq_len,
        cfg.model.hidden_size,
    ];
    let limits = Limits::new(dims.iter().product());
    let stages = cfg.stages.len() - 1;
    let mut out = RecomputeBench {
        codec_activations: cfg.codec.activations.clone(),
        codec_gradients: cfg.codec.gradients.clone(),
        threads: threads.to_vec(),
        tolerance: DEFAULT_TOLERANCE,
        ..RecomputeBench::default()
    };
    let mut min_fault: Vec<(FaultKind, f32)> = FaultKind::PASSES
        .iter()
        .map(|k| (*k, f32::INFINITY))
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut recompute_s, mut recomputes) = (0f64, 0u64);
    let (mut own_s, mut owns) = (0f64, 0u64);
    for k in 0..stages {
        // The stage one optimizer step in (its stale copy: the seed's weights).
        let stale = init_shard(cfg, k as u32)?;
        let mut shard = init_shard(cfg, k as u32)?;
        {
            let x = random_hidden(&mut rng, &dims, 1.0)?;
            let g = random_hidden(&mut rng, &dims, 1e-3)?;
            let (_, ctx) = shard.stage_forward(k, &x)?;
            shard.backward(ctx, &g)?;
            shard.optimizer_step(&cfg.adamw(), cfg.train.lr, 1.0)?;
            shard.zero_grads();
        }
        // The boundary as the run sends it: in a subspace model (`[model] subspace_rank`), the
        // token ids and k coordinates forward and `Uᵀ·g` back.
        let sub = shard.subspace();
        let sub = sub.as_deref();
        let (hidden, vocab) = (cfg.model.hidden_size, cfg.model.vocab_size);
        let codecs = compute::Codecs::default();
        for mb in 0..micro_batches {
            let x = random_hidden(&mut rng, &dims, 1.0)?;
            let g = random_hidden(&mut rng, &dims, 1e-3)?;
            let tokens: Vec<u32> = (0..dims[0] * dims[1])
                .map(|_| rng.random_range(0..vocab as u32))
                .collect();
            let (fwd_in, _) = compute::encode_hidden(&codecs, act, sub, &x, &tokens)?;
            let (bwd_in, _) = compute::encode_grad(&codecs, grad, sub, &g)?;
            // The faulty and the own passes see what a stage sees: the decoded frames.
            let mut dec = Decoder::new();
            let (xt, _, _) =
                compute::decode_hidden(&mut dec, &fwd_in, &limits, hidden, vocab, sub)?;
            let (gt, _) = compute::decode_grad(&mut dec, &bwd_in, &limits, Some(&dims), sub)?;
            out.bytes_per_micro_batch = 2 * (fwd_in.len() + bwd_in.len()) as u64;
            let mut results = Vec::new();
            for &t in threads {
                let pool = pool(t)?;
                for _ in 0..2 {
                    let t0 = Instant::now();
                    let r = pool
                        .install(|| recompute(&shard, k, &fwd_in, &bwd_in, &limits, act, grad))?;
                    recompute_s += t0.elapsed().as_secs_f64();
                    recomputes += 1;
                    results.push(r);
                }
            }
            // Inputs fetched from the audited peer and sent to the auditor; outputs only as hashes.
            out.bytes_per_audit = 2 * (fwd_in.len() + bwd_in.len()) as u64;
            for i in 0..results.len() {
                for j in i + 1..results.len() {
                    let d = hidden_distance(&results[i].0, &results[j].0, &limits, sub.is_some())
                        .max(frame_distance(&results[i].1, &results[j].1, &limits));
                    out.comparisons += 1;
                    if d == 0.0 {
                        out.identical += 1;
                    }
                    out.max_honest_distance = out.max_honest_distance.max(d);
                }
            }
            // The stage's own pass, for the cost comparison.
            let t0 = Instant::now();
            pool(threads[0])?.install(|| -> Result<()> {
                let (_, ctx) = shard.stage_forward(k, &xt)?;
                shard.backward(ctx, &gt)?;
                Ok(())
            })?;
            own_s += t0.elapsed().as_secs_f64();
            owns += 1;
            shard.zero_grads();
            // Each fault on the same micro-batch.
            let (honest_f, honest_b) = &results[0];
            for (kind, min) in min_fault.iter_mut() {
                let spec = FaultSpec {
                    kind: *kind,
                    rate: 1.0,
                    seed: 0,
                };
                let fault = Fault::new(spec, &[7; 32]);
                fault.before_apply(0, &stale)?;
                let (y, ctx) = shard.stage_forward(k, &xt)?;
                let y = fault.forward(1, mb as u32, k, &xt, y)?;
                let dx = shard
                    .backward_input_only(ctx, &gt)?
                    .ok_or_else(|| anyhow!("stage input gradient"))?;
                let dx = fault.backward(1, mb as u32, &gt, dx)?;
                let (fo, _) = compute::encode_hidden(&codecs, act, sub, &y, &tokens)?;
                let (bo, _) = compute::encode_grad(&codecs, grad, sub, &dx)?;
                let d = hidden_distance(&fo, honest_f, &limits, sub.is_some())
                    .max(frame_distance(&bo, honest_b, &limits));
                *min = min.min(d);
            }
            on_progress();
        }
    }
    out.recompute_ms = 1e3 * recompute_s / recomputes.max(1) as f64;
    out.stage_fwd_bwd_ms = 1e3 * own_s / owns.max(1) as f64;
    out.min_fault_distance = min_fault
        .iter()
        .map(|(k, d)| (k.name().to_string(), *d))
        .collect();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Honest recomputations are bitwise identical and every fault kind lands above the
    /// tolerance, for a plain and for a subspace model (whose boundary carries token ids and k
    /// coordinates, not the hidden state).
    #[test]
    fn honest_recomputations_agree_and_faults_stand_out() {
        for rank in [0, 8] {
            let mut cfg = swarm_testkit::tiny_config(1);
            cfg.model.subspace_rank = rank;
            cfg.validate().unwrap();
            let b = measure_recompute(&cfg, 2, &[1, 2], 3, &mut || {}).unwrap();
            assert!(b.comparisons > 0);
            assert_eq!(b.identical, b.comparisons, "rank {rank}: {b:?}");
            for (kind, d) in &b.min_fault_distance {
                assert!(*d > b.tolerance, "rank {rank}: {kind} at {d}");
            }
        }
    }
}
