//! Speed of one training micro-batch of a run's model, split into forward, backward and
//! optimizer, plus this machine's f32 matmul peak for comparison (`swarm bench model`).
//! Measurements only; nothing here affects training results.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use swarm_model::train::apply_step;
use swarm_model::{Batch, Error, LocalTrainer, Piece, Result, RunConfig, Shard};

/// Median timings of one micro-batch (`micro_batch_size x seq_len` tokens) of the run's model.
#[derive(Debug, Clone, Serialize)]
pub struct ModelBench {
    /// Parameters of the whole model.
    pub parameters: usize,
    /// Parameters that take part in matmuls (all but an untied embedding table).
    pub matmul_parameters: usize,
    /// Tokens of one micro-batch.
    pub tokens_per_micro_batch: usize,
    /// Median forward of one micro-batch through every piece, ms.
    pub forward_ms: f64,
    /// Median backward of one micro-batch, ms.
    pub backward_ms: f64,
    /// One optimizer step (clip + AdamW over all shards); a training step has one per
    /// `micro_batches` micro-batches.
    pub optimizer_ms: f64,
    /// Backward time over forward time.
    pub backward_forward_ratio: f64,
    /// Training throughput: tokens / (forward + backward + optimizer / micro_batches).
    pub tokens_per_s: f64,
    /// 6 x matmul parameters x tokens per second of forward + backward.
    pub achieved_gflops: f64,
    /// A large f32 candle matmul on this machine, for comparison.
    pub matmul_peak_gflops: f64,
    /// Timed repetitions behind each median.
    pub iterations: usize,
    /// Where a micro-batch's time goes: mean milliseconds per timed micro-batch for each op
    /// (`fwd.*` / `bwd.*`: the decoder layers, all stages summed; `head.*`, `embed.*`: the ends;
    /// `stage.convert`: tensors in and out of the layers; `optimizer`: the step), largest first.
    pub ops: Vec<OpTime>,
}

/// One line of [`ModelBench::ops`].
#[derive(Debug, Clone, Serialize)]
pub struct OpTime {
    /// The operation's name (`fwd.attn`, `head.loss`, ...).
    pub op: String,
    /// Its mean time per timed micro-batch, ms.
    pub ms: f64,
    /// Share of forward + backward + optimizer time.
    pub share: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Times `iterations` micro-batches (after `warmup` untimed ones) of random tokens through
/// `cfg`'s model split as the local trainer splits it.
pub fn bench_model(cfg: &RunConfig, warmup: usize, iterations: usize) -> Result<ModelBench> {
    let mut tr = LocalTrainer::new(cfg)?;
    let t = &cfg.train;
    let (bs, seq) = (t.micro_batch_size, t.seq_len);
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let vocab = cfg.model.vocab_size as u32;
    let mut fwd = Vec::new();
    let mut bwd = Vec::new();
    let mut opt = Vec::new();
    for i in 0..warmup + iterations.max(1) {
        if i == warmup {
            swarm_model::profile::enable(true);
        }
        let toks: Vec<u32> = (0..bs * (seq + 1))
            .map(|_| rng.random_range(0..vocab))
            .collect();
        let batch = Batch {
            inputs: toks[..bs * seq].to_vec(),
            targets: toks[bs..].to_vec(),
            batch_size: bs,
            seq_len: seq,
        };
        let (f, b, o) = tr.timed_micro_batch(&batch, |shards| {
            apply_step(shards, &cfg.adamw(), 1e-4, t.grad_clip).map(|_| ())
        })?;
        if i >= warmup {
            fwd.push(f);
            bwd.push(b);
            opt.push(o);
        }
    }
    let total: f64 = fwd.iter().chain(&bwd).chain(&opt).sum();
    let n = fwd.len() as f64;
    let opt_s: f64 = opt.iter().sum();
    let mut ops: Vec<OpTime> = swarm_model::profile::totals()
        .into_iter()
        .map(|(op, s, _)| (op, s))
        .chain([("optimizer", opt_s)])
        .map(|(op, s)| OpTime {
            op: op.to_string(),
            ms: s / n * 1e3,
            share: s / total,
        })
        .collect();
    swarm_model::profile::enable(false);
    ops.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    let (f, b, o) = (median(fwd), median(bwd), median(opt));
    let tokens = bs * seq;
    let params = cfg.model.num_parameters();
    let embed = cfg.model.vocab_size * cfg.model.hidden_size;
    let matmul_params = if cfg.model.tie_word_embeddings {
        params
    } else {
        params - embed
    };
    let step_s = f + b + o / t.micro_batches as f64;
    Ok(ModelBench {
        parameters: params,
        matmul_parameters: matmul_params,
        tokens_per_micro_batch: tokens,
        forward_ms: f * 1e3,
        backward_ms: b * 1e3,
        optimizer_ms: o * 1e3,
        backward_forward_ratio: b / f,
        tokens_per_s: tokens as f64 / step_s,
        achieved_gflops: 6.0 * matmul_params as f64 * tokens as f64 / (f + b) / 1e9,
        matmul_peak_gflops: matmul_peak(1024, 5)?,
        iterations: iterations.max(1),
        ops,
    })
}

/// GFLOP/s of the best of `reps` `n x n` f32 matmuls (2 n^3 flops each).
pub fn matmul_peak(n: usize, reps: usize) -> Result<f64> {
    let dev = Device::Cpu;
    let a = Tensor::ones((n, n), DType::F32, &dev)?;
    let b = Tensor::ones((n, n), DType::F32, &dev)?;
    let _ = a.matmul(&b)?;
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let s = Instant::now();
        let c = a.matmul(&b)?;
        drop(c);
        best = best.min(s.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n as f64).powi(3) / best / 1e9)
}

/// Runs what a peer serving stage `stage` of `cfg` does in `steps` training steps: the forward
/// passes of the micro-batches in flight at once ([`swarm_model::presets::in_flight`]), their backward
/// passes, then an AdamW step; inputs and output gradients are random. For measuring the stage's
/// peak memory (`swarm bench memory`).
pub fn run_stage(cfg: &RunConfig, stage: usize, steps: usize) -> Result<()> {
    let pieces = Piece::stages(&cfg.stages);
    let piece = pieces
        .get(stage)
        .cloned()
        .ok_or_else(|| Error::Config(format!("no stage {stage}")))?;
    let dev = Device::Cpu;
    let mut shard = Shard::new(&cfg.model, &[piece], cfg.seed, DType::F32, &dev)?;
    let t = &cfg.train;
    let shape = (t.micro_batch_size, t.seq_len, cfg.model.hidden_size);
    let hp = cfg.adamw();
    for _ in 0..steps {
        let mut ctxs = Vec::new();
        for _ in 0..swarm_model::presets::in_flight(cfg) {
            let x = Tensor::randn(0f32, 1f32, shape, &dev)?;
            ctxs.push(shard.stage_forward(stage, &x)?.1);
        }
        for ctx in ctxs {
            let g = Tensor::randn(0f32, 1e-3f32, shape, &dev)?;
            shard.backward(ctx, &g)?;
        }
        shard.optimizer_step(&hp, t.lr, 1.0)?;
        shard.zero_grads();
    }
    Ok(())
}
