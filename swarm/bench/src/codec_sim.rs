//! A swarm run's compression, simulated in one process: the same model, batches, codecs and
//! order of operations as a swarm of `replicas` peers per stage, without processes or sockets.
//!
//! What it reproduces (and `tests` check against [`swarm_model::LocalTrainer`] with codec
//! `none`): micro-batch `m` of a step runs on replica `m % replicas` of every stage; every
//! boundary (trainer -> stage 0 -> ... -> trainer) encodes the activations with the activation
//! codec and the gradients coming back with the gradient codec, and the receiver continues with
//! the decoded tensor; at the step end each replica encodes the gradient it accumulated with the
//! sync codec and its own error-feedback residual, every replica sets the sum of the decoded
//! shares, and one clipped AdamW step follows (the global norm summed as the trainer sums it).
//! Replicas of a stage hold identical weights, so one shard per stage stands for all of them.
//!
//! What it is for: seconds-long bisection of a loss effect by channel (`swarm bench compress`),
//! where a real swarm (`swarm demo`, `swarm replay`) takes minutes of shaped links. Byte counts
//! are those of the frames this run produces, counted as the swarm counts them (a sync share
//! crosses to each of the other `replicas - 1` replicas).

use candle_core::{DType, Device, Tensor};
use swarm_compression::outer::{OuterOptimizer, SparseFeedback, pseudo_gradient};
use swarm_compression::{Codec, Decoder, Encoder, ErrorFeedback, Limits};
use swarm_model::data::Corpus;
use swarm_model::shard::{Piece, Shard};
use swarm_model::train::{StepStats, backward_micro_batch_with, forward_micro_batch_with};
use swarm_model::{RunConfig, clip_scale};

use crate::{Error, Result};

/// Bytes of one channel: what crossed the links, and what fp32 would have sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct ChannelBytes {
    /// Bytes that crossed the links (compressed frames).
    pub wire: u64,
    /// What the same tensors weigh as fp32.
    pub dense: u64,
}

impl ChannelBytes {
    fn add(&mut self, wire: usize, elements: usize) {
        self.wire += wire as u64;
        self.dense += 4 * elements as u64;
    }

    /// fp32 bytes / wire bytes (1 when nothing was sent).
    pub fn ratio(&self) -> f64 {
        if self.wire == 0 {
            1.0
        } else {
            self.dense as f64 / self.wire as f64
        }
    }
}

/// Bytes per channel so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct SimBytes {
    /// Forward activations between stages.
    pub activations: ChannelBytes,
    /// Backward gradients between stages.
    pub gradients: ChannelBytes,
    /// The replicas' sync shares.
    pub sync: ChannelBytes,
}

impl SimBytes {
    /// All channels together.
    pub fn total(&self) -> ChannelBytes {
        ChannelBytes {
            wire: self.activations.wire + self.gradients.wire + self.sync.wire,
            dense: self.activations.dense + self.gradients.dense + self.sync.dense,
        }
    }
}

/// The three channel codecs and the swarm geometry of a simulated run.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// Codec of the activations a stage sends forward.
    pub activations: Codec,
    /// Codec of the gradients a stage sends back.
    pub gradients: Codec,
    /// Codec of the replicas' sync shares.
    pub sync: Codec,
    /// The multi-step sync's codec at the boundaries within the LR warmup (`[sync]
    /// warmup_codec`; unused by the per-step sync).
    pub warmup_sync: Codec,
    /// Replicas per stage (>= 1).
    pub replicas: usize,
    /// Keep an error-feedback residual per (stage, replica) for the sync, as the swarm does.
    /// Off only to measure what the residual does.
    pub sync_feedback: bool,
    /// Multi-step sync (DiLoCo / SparseLoCo) instead of the per-step gradient sync.
    pub outer: Option<OuterSync>,
    /// The head and loss run on the last stage's peers (issue #13's "every boundary counts"):
    /// the last stage's output and the head's gradient never cross a link, so neither is coded
    /// nor counted. Off: the trainer holds the head, as the swarm does today.
    pub head_on_last_stage: bool,
}

/// A multi-step sync: replicas take `every` inner AdamW steps on their own micro-batches, then
/// send their pseudo-gradient (`anchor - weights`) with the sync codec in chunks of `chunk`
/// (so `topk-row:F` keeps a fraction F of each chunk) and error feedback decayed by `beta`;
/// the averaged decoded pseudo-gradient drives an outer SGD step with `lr` and (Nesterov)
/// `momentum` (see [`swarm_compression::outer`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OuterSync {
    /// Inner steps between outer syncs.
    pub every: u64,
    /// Values per chunk the sync codec compresses on its own.
    pub chunk: usize,
    /// Decay of the error-feedback residual.
    pub beta: f32,
    /// Outer SGD learning rate.
    pub lr: f32,
    /// Outer SGD momentum.
    pub momentum: f32,
    /// Nesterov momentum rather than plain.
    pub nesterov: bool,
}

impl SimOptions {
    /// The codecs of `cfg`'s `[codec]` section, `replicas` per stage, with sync error feedback;
    /// with `[sync] mode = "sparseloco"`, its multi-step sync (codec `[sync] codec`, no outer
    /// momentum), as the swarm runs it.
    pub fn from_config(cfg: &RunConfig, replicas: usize) -> Result<SimOptions> {
        let parse = |s: &str| s.parse::<Codec>().map_err(Error::from);
        let s = &cfg.sync;
        let outer = s.drifts().then_some(OuterSync {
            every: s.every,
            chunk: s.chunk,
            beta: s.beta,
            lr: s.outer_lr,
            momentum: 0.0,
            nesterov: false,
        });
        Ok(SimOptions {
            activations: parse(&cfg.codec.activations)?,
            gradients: parse(&cfg.codec.gradients)?,
            sync: parse(if s.drifts() {
                &s.codec
            } else {
                &cfg.codec.sync
            })?,
            warmup_sync: parse(&s.warmup_codec)?,
            replicas,
            sync_feedback: true,
            outer,
            head_on_last_stage: false,
        })
    }
}

/// One boundary crossing: encode with `enc`, count, decode; the receiver's tensor.
/// In a subspace model `x` is the boundary's coordinates (`[batch, seq, k]`): fp32 counts the
/// standard model's `hidden` values per token, and `tokens` (the forward's ids) cross too.
#[allow(clippy::too_many_arguments)]
fn cross(
    enc: &mut Encoder,
    dec: &mut Decoder,
    x: &Tensor,
    hidden: usize,
    tokens: Option<&[u32]>,
    bytes: &mut ChannelBytes,
    frame: &mut Vec<u8>,
    buf: &mut Vec<f32>,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let v = x
        .flatten_all()
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(swarm_model::Error::from)?;
    enc.encode(&v, &dims, frame)?;
    let dense = match dims.as_slice() {
        [b, t, _] => b * t * hidden,
        _ => v.len(),
    };
    let mut ids = 0;
    if let Some(tokens) = tokens {
        let mut section = Vec::new();
        swarm_compression::encode_tokens(tokens, &mut section)?;
        ids = section.len();
    }
    bytes.add(frame.len() + ids, dense);
    dec.decode(frame, &Limits::new(v.len()), buf)?;
    Ok(
        Tensor::from_slice(buf.as_slice(), dims.as_slice(), &Device::Cpu)
            .map_err(swarm_model::Error::from)?,
    )
}

/// The state of a multi-step sync, per stage.
struct Outer {
    cfg: OuterSync,
    /// The weights every replica held at the last sync, per stage.
    anchors: Vec<Vec<f32>>,
    /// `[stage][replica]`.
    feedback: Vec<Vec<SparseFeedback>>,
    optimizers: Vec<OuterOptimizer>,
}

/// A simulated swarm run (see the module docs).
pub struct SimTrainer {
    cfg: RunConfig,
    opts: SimOptions,
    ends: Shard,
    /// `[replica][stage]`; one pipeline when replicas stay identical (per-step sync).
    pipes: Vec<Vec<Shard>>,
    /// `[stage][replica]`, the per-step sync's residuals.
    feedback: Vec<Vec<ErrorFeedback>>,
    outer: Option<Outer>,
    act_enc: Encoder,
    grad_enc: Encoder,
    sync_enc: Encoder,
    warmup_sync_enc: Encoder,
    dec: Decoder,
    bytes: SimBytes,
}

impl std::fmt::Debug for SimTrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimTrainer")
            .field("step", &self.ends.step())
            .finish_non_exhaustive()
    }
}

fn model_err(e: Error) -> swarm_model::Error {
    swarm_model::Error::Input(e.to_string())
}

impl SimTrainer {
    /// Fresh weights from the run's seed, as [`swarm_model::LocalTrainer::new`].
    pub fn new(cfg: &RunConfig, opts: SimOptions) -> Result<SimTrainer> {
        cfg.validate()?;
        if opts.replicas == 0 {
            return Err(Error::Options("a simulated run needs at least one replica"));
        }
        if opts.outer.is_some_and(|o| o.every == 0) {
            return Err(Error::Options("a multi-step sync needs every >= 1"));
        }
        let dev = Device::Cpu;
        let ends = Shard::new(
            &cfg.model,
            &[Piece::Embedding, Piece::Head],
            cfg.seed,
            DType::F32,
            &dev,
        )?;
        let pipe = || {
            Piece::stages(&cfg.stages)
                .into_iter()
                .map(|p| Shard::new(&cfg.model, &[p], cfg.seed, DType::F32, &dev))
                .collect::<std::result::Result<Vec<_>, _>>()
        };
        let copies = if opts.outer.is_some() {
            opts.replicas
        } else {
            1
        };
        let pipes = (0..copies)
            .map(|_| pipe())
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let lens: Vec<usize> = pipes[0].iter().map(Shard::num_parameters).collect();
        let feedback = lens
            .iter()
            .map(|&n| (0..opts.replicas).map(|_| ErrorFeedback::new(n)).collect())
            .collect();
        let outer = match opts.outer {
            Some(o) => Some(Outer {
                cfg: o,
                anchors: pipes[0]
                    .iter()
                    .map(Shard::weights_flat)
                    .collect::<std::result::Result<_, _>>()?,
                feedback: lens
                    .iter()
                    .map(|&n| {
                        (0..opts.replicas)
                            .map(|_| SparseFeedback::new(n, o.chunk, o.beta))
                            .collect()
                    })
                    .collect(),
                optimizers: lens
                    .iter()
                    .map(|&n| OuterOptimizer::new(n, o.lr, o.momentum, o.nesterov))
                    .collect(),
            }),
            None => None,
        };
        Ok(SimTrainer {
            act_enc: Encoder::new(opts.activations)?,
            grad_enc: Encoder::new(opts.gradients)?,
            // As the stages do: the sync rotation seeded by the run seed.
            sync_enc: Encoder::new(opts.sync)?.with_seed(cfg.seed),
            warmup_sync_enc: Encoder::new(opts.warmup_sync)?.with_seed(cfg.seed),
            dec: Decoder::new(),
            cfg: cfg.clone(),
            opts,
            ends,
            pipes,
            feedback,
            outer,
            bytes: SimBytes::default(),
        })
    }

    /// Steps taken so far.
    pub fn step(&self) -> u64 {
        self.ends.step()
    }

    /// Bytes per channel so far.
    pub fn bytes(&self) -> SimBytes {
        self.bytes
    }

    /// The ends shard and replica 0's stage shards (for evaluation and checkpoints; after a
    /// sync every replica holds the same weights).
    pub fn shards(&self) -> (&Shard, &[Shard]) {
        (&self.ends, &self.pipes[0])
    }

    /// Mean validation loss over the first `batches` batches (forward only, no codecs: the
    /// model the run produced, as `swarm eval` sees its checkpoint).
    pub fn eval(&self, corpus: &Corpus, batches: usize) -> Result<f64> {
        let t = &self.cfg.train;
        let mut total = 0.0;
        for i in 0..batches {
            let b = corpus.val_batch(i as u64, t.micro_batch_size, t.seq_len)?;
            let (mut x, _) = self
                .ends
                .embed_forward(&b.inputs, b.batch_size, b.seq_len)?;
            for (k, s) in self.pipes[0].iter().enumerate() {
                x = s.stage_forward(k, &x)?.0;
            }
            total += self.ends.head_forward(&x, &b.targets)?.0;
        }
        Ok(total / batches.max(1) as f64)
    }

    /// One optimizer step (see the module docs).
    pub fn train_step(&mut self, corpus: &Corpus) -> Result<StepStats> {
        let t = self.cfg.train.clone();
        let step = self.step();
        let n = t.micro_batches;
        let r = self.opts.replicas;
        let ns = self.pipes[0].len();
        let multi = self.outer.is_some();
        // Per-step sync: acc[stage][replica], the gradient each replica accumulated.
        let mut acc: Vec<Vec<Option<Vec<f32>>>> = vec![vec![None; r]; ns];
        let mut loss = 0.0;
        for micro in 0..n {
            let rep = micro % r;
            let pipe = if multi { rep } else { 0 };
            let batch = corpus.train_batch(
                self.cfg.seed,
                step,
                micro as u64,
                t.micro_batch_size,
                t.seq_len,
            )?;
            let (l, ctx) = {
                let (enc, dec, bytes) = (
                    &mut self.act_enc,
                    &mut self.dec,
                    &mut self.bytes.activations,
                );
                let (mut frame, mut buf) = (Vec::new(), Vec::new());
                let hidden = self.cfg.model.hidden_size;
                let ids = self.ends.subspace().map(|_| batch.inputs.clone());
                // Boundaries in order: embedding, then after each stage; the last feeds the head.
                let (mut at, head_local) = (0, self.opts.head_on_last_stage);
                let mut link = |x: &Tensor| {
                    at += 1;
                    if head_local && at == ns + 1 {
                        return Ok(x.clone());
                    }
                    cross(
                        enc,
                        dec,
                        x,
                        hidden,
                        ids.as_deref(),
                        bytes,
                        &mut frame,
                        &mut buf,
                    )
                    .map_err(model_err)
                };
                forward_micro_batch_with(&self.ends, &self.pipes[pipe], &batch, &mut link)?
            };
            loss += l;
            {
                let (enc, dec, bytes) =
                    (&mut self.grad_enc, &mut self.dec, &mut self.bytes.gradients);
                let (mut frame, mut buf) = (Vec::new(), Vec::new());
                let hidden = self.cfg.model.hidden_size;
                // The first gradient boundary is the head's.
                let mut head_grad = self.opts.head_on_last_stage;
                let mut link = |g: &Tensor| {
                    if std::mem::take(&mut head_grad) {
                        return Ok(g.clone());
                    }
                    cross(enc, dec, g, hidden, None, bytes, &mut frame, &mut buf).map_err(model_err)
                };
                backward_micro_batch_with(
                    &mut self.ends,
                    &mut self.pipes[pipe],
                    ctx,
                    1.0 / n as f64,
                    &mut link,
                )?;
            }
            if !multi {
                // This micro-batch's stage gradients belong to replica `rep`.
                for (s, shard) in self.pipes[0].iter_mut().enumerate() {
                    let g = shard.grads_flat()?;
                    shard.zero_grads();
                    match &mut acc[s][rep] {
                        Some(a) => a.iter_mut().zip(&g).for_each(|(a, b)| *a += *b),
                        slot => *slot = Some(g),
                    }
                }
            }
        }
        let lr = self.cfg.schedule().at(step);
        let hp = self.cfg.adamw();
        let ends_sq = self.ends.grad_sq_norm()?;
        let grad_norm;
        if multi {
            // Inner steps, as the swarm's local phase takes them: each replica on the mean
            // gradient of its own micro-batches; one clip scale for all, from the ends' norm plus
            // each stage's mean over its replicas.
            let mut stage_sq = vec![0.0; ns];
            for (rep, pipe) in self.pipes.iter_mut().enumerate() {
                let mine = (0..n).filter(|m| m % r == rep).count();
                for (k, s) in pipe.iter_mut().enumerate() {
                    if mine > 0 && mine != n {
                        let mut g = s.grads_flat()?;
                        let scale = n as f32 / mine as f32;
                        g.iter_mut().for_each(|x| *x *= scale);
                        s.set_grads_flat(&g)?;
                    }
                    stage_sq[k] += s.grad_sq_norm()?;
                }
            }
            let mean_sq = stage_sq.iter().map(|x| x / r as f64).sum::<f64>() + ends_sq;
            let scale = clip_scale(mean_sq, t.grad_clip);
            for s in self.pipes.iter_mut().flatten() {
                s.optimizer_step(&hp, lr, scale)?;
                s.zero_grads();
            }
            self.ends.optimizer_step(&hp, lr, scale)?;
            self.ends.zero_grads();
            grad_norm = mean_sq.sqrt();
            let every = self.outer.as_ref().map_or(1, |o| o.cfg.every);
            // fp32 baseline: every replica's full gradient to every other, every step.
            for s in &self.pipes[0] {
                self.bytes.sync.dense += (4 * s.num_parameters() * r * (r - 1)) as u64;
            }
            if (step + 1).is_multiple_of(every) || step + 1 == t.steps {
                self.outer_sync(step + 1)?;
            }
        } else {
            let (mut frame, mut buf) = (Vec::new(), Vec::new());
            // The sync: replicas that accumulated nothing still send (a zero gradient), as a
            // participant of the round does.
            for (s, shard) in self.pipes[0].iter_mut().enumerate() {
                let len = shard.num_parameters();
                let grads: Vec<Vec<f32>> = acc[s]
                    .iter_mut()
                    .map(|a| a.take().unwrap_or_else(|| vec![0.0; len]))
                    .collect();
                let sum = if r == 1 {
                    grads[0].clone()
                } else {
                    let mut sum = vec![0f32; len];
                    for (rep, g) in grads.iter().enumerate() {
                        if self.opts.sync_feedback {
                            self.feedback[s][rep].encode(
                                &mut self.sync_enc,
                                g,
                                &[len],
                                &mut frame,
                            )?;
                        } else {
                            self.sync_enc.encode(g, &[len], &mut frame)?;
                        }
                        self.bytes.sync.wire += (frame.len() * (r - 1)) as u64;
                        self.bytes.sync.dense += (4 * len * (r - 1)) as u64;
                        self.dec.decode(&frame, &Limits::new(len), &mut buf)?;
                        if rep == 0 {
                            sum.copy_from_slice(&buf);
                        } else {
                            sum.iter_mut().zip(&buf).for_each(|(a, b)| *a += *b);
                        }
                    }
                    sum
                };
                if tracing::enabled!(tracing::Level::DEBUG) {
                    // How the delivered sum compares with the exact one (bisection aid).
                    let mut exact = vec![0f32; len];
                    for g in &grads {
                        exact.iter_mut().zip(g).for_each(|(a, b)| *a += *b);
                    }
                    let dot = |a: &[f32], b: &[f32]| -> f64 {
                        a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
                    };
                    let (ee, ss, es) = (dot(&exact, &exact), dot(&sum, &sum), dot(&exact, &sum));
                    let rr: f64 = self.feedback[s]
                        .iter()
                        .map(|f| dot(f.residual(), f.residual()))
                        .sum();
                    tracing::debug!(
                        step,
                        stage = s,
                        cos = es / (ee * ss).sqrt().max(1e-30),
                        norm_ratio = (ss / ee.max(1e-30)).sqrt(),
                        residual_ratio = (rr / ee.max(1e-30)).sqrt(),
                        "sync fidelity"
                    );
                }
                shard.set_grads_flat(&sum)?;
            }
            let mut sq = ends_sq;
            for s in &self.pipes[0] {
                sq += s.grad_sq_norm()?;
            }
            let scale = clip_scale(sq, t.grad_clip);
            for s in std::iter::once(&mut self.ends).chain(self.pipes[0].iter_mut()) {
                s.optimizer_step(&hp, lr, scale)?;
                s.zero_grads();
            }
            grad_norm = sq.sqrt();
        }
        Ok(StepStats {
            step,
            loss: loss / n as f64,
            lr,
            grad_norm,
            tokens: self.cfg.tokens_per_step(),
        })
    }

    /// The multi-step sync: every replica's pseudo-gradient through the sync codec, the mean of
    /// the decoded shares in replica order, one outer step, every replica set to the result.
    /// `steps_done` picks the codec (the warmup's within the LR warmup), as the stages do.
    fn outer_sync(&mut self, steps_done: u64) -> Result<()> {
        let warm = swarm_model::SyncConfig::in_warmup(steps_done, self.cfg.train.warmup_steps);
        let Some(o) = self.outer.as_mut() else {
            return Ok(());
        };
        let r = self.pipes.len();
        let (mut delta, mut frame, mut scratch) = (Vec::new(), Vec::new(), Vec::new());
        for s in 0..o.anchors.len() {
            let len = o.anchors[s].len();
            let mut mean = vec![0f32; len];
            for rep in 0..r {
                let w = self.pipes[rep][s].weights_flat()?;
                pseudo_gradient(&o.anchors[s], &w, &mut delta)?;
                let enc = if warm {
                    &mut self.warmup_sync_enc
                } else {
                    &mut self.sync_enc
                };
                o.feedback[s][rep].encode(enc, &delta, &mut frame)?;
                self.bytes.sync.wire += (frame.len() * (r - 1)) as u64;
                SparseFeedback::add_share(
                    &mut self.dec,
                    &frame,
                    o.cfg.chunk,
                    1.0 / r as f32,
                    &mut mean,
                    &mut scratch,
                )?;
            }
            o.optimizers[s].step(&mut o.anchors[s], &mean)?;
            for pipe in &mut self.pipes {
                pipe[s].set_weights_flat(&o.anchors[s])?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use swarm_model::LocalTrainer;

    fn tiny() -> RunConfig {
        let mut cfg = RunConfig::default();
        cfg.model.hidden_size = 32;
        cfg.model.intermediate_size = 64;
        cfg.model.num_attention_heads = 4;
        cfg.model.num_key_value_heads = Some(2);
        cfg.train.micro_batch_size = 2;
        cfg.train.seq_len = 16;
        cfg.train.steps = 4;
        cfg.train.warmup_steps = 1;
        cfg
    }

    fn opts(cfg: &RunConfig, codec: &str, replicas: usize) -> SimOptions {
        let c: Codec = codec.parse().unwrap();
        SimOptions {
            activations: c,
            gradients: c,
            sync: c,
            replicas,
            ..SimOptions::from_config(cfg, replicas).unwrap()
        }
    }

    /// The whole model's weights digest, as `LocalTrainer::weights_digest` computes it.
    fn digest(sim: &SimTrainer) -> [u8; 32] {
        let (ends, stages) = sim.shards();
        let mut h = blake3::Hasher::new();
        h.update(&ends.weights_digest().unwrap());
        for s in stages {
            h.update(&s.weights_digest().unwrap());
        }
        *h.finalize().as_bytes()
    }

    #[test]
    fn codec_none_is_the_local_run() {
        let cfg = tiny();
        let corpus = Corpus::builtin();
        let mut local = LocalTrainer::new(&cfg).unwrap();
        let mut sim = SimTrainer::new(&cfg, opts(&cfg, "none", 2)).unwrap();
        for _ in 0..cfg.train.steps {
            let a = local.train_step(&corpus).unwrap();
            let b = sim.train_step(&corpus).unwrap();
            assert!(
                (a.loss - b.loss).abs() <= 1e-5 * a.loss.abs(),
                "{a:?} vs {b:?}"
            );
        }
        // Bitwise the local run: fp32 frames decode to the same bits, and the sum of two
        // replicas' gradients is the local accumulation.
        assert_eq!(digest(&sim), local.weights_digest().unwrap());
        let b = sim.bytes();
        // Codec none: every channel sends fp32 plus a frame header.
        assert!(
            b.activations.ratio() < 1.0 && b.activations.ratio() > 0.9,
            "{b:?}"
        );
        assert!(
            b.sync.dense > 0 && b.gradients.dense == b.activations.dense,
            "{b:?}"
        );
        let (a, s) = (
            local.eval(&corpus, 2).unwrap(),
            sim.eval(&corpus, 2).unwrap(),
        );
        assert!((a - s).abs() <= 1e-4 * a, "{a} vs {s}");
    }

    #[test]
    fn the_head_on_the_last_stage_skips_the_head_boundary() {
        let cfg = tiny();
        let corpus = Corpus::builtin();
        let head = |codec: &str| SimOptions {
            head_on_last_stage: true,
            ..opts(&cfg, codec, 2)
        };
        // Exact: still bitwise the local run (the skipped boundary was an fp32 round trip).
        let mut local = LocalTrainer::new(&cfg).unwrap();
        let mut exact = SimTrainer::new(&cfg, head("none")).unwrap();
        let mut trainer_head = SimTrainer::new(&cfg, opts(&cfg, "rht+q4+zstd:3", 2)).unwrap();
        let mut stage_head = SimTrainer::new(&cfg, head("rht+q4+zstd:3")).unwrap();
        let mut differ = false;
        for _ in 0..cfg.train.steps {
            local.train_step(&corpus).unwrap();
            exact.train_step(&corpus).unwrap();
            let a = trainer_head.train_step(&corpus).unwrap();
            let b = stage_head.train_step(&corpus).unwrap();
            differ |= a.loss != b.loss;
        }
        assert_eq!(digest(&exact), local.weights_digest().unwrap());
        // Lossy: the head boundary's quantization is gone, and two of the three boundaries per
        // direction cross (two stages).
        assert!(differ);
        let (a, b) = (trainer_head.bytes(), stage_head.bytes());
        assert_eq!(cfg.stages.len(), 3, "two stages");
        assert_eq!(
            3 * b.activations.dense,
            2 * a.activations.dense,
            "{a:?} {b:?}"
        );
        assert_eq!(3 * b.gradients.dense, 2 * a.gradients.dense, "{a:?} {b:?}");
        assert!(b.activations.wire < a.activations.wire && b.gradients.wire < a.gradients.wire);
        assert_eq!(a.sync.dense, b.sync.dense);
    }

    #[test]
    fn lossy_codecs_change_the_run_and_count_fewer_bytes() {
        let cfg = tiny();
        let corpus = Corpus::builtin();
        let mut exact = SimTrainer::new(&cfg, opts(&cfg, "none", 2)).unwrap();
        let mut lossy = SimTrainer::new(&cfg, opts(&cfg, "rht+q4+zstd:3", 2)).unwrap();
        let mut differ = false;
        for _ in 0..cfg.train.steps {
            let a = exact.train_step(&corpus).unwrap();
            let b = lossy.train_step(&corpus).unwrap();
            differ |= a.loss != b.loss;
        }
        assert!(differ);
        let b = lossy.bytes();
        for c in [b.activations, b.gradients, b.sync] {
            assert!(c.ratio() > 4.0, "{b:?}");
        }
    }

    #[test]
    fn multi_step_sync_leaves_replicas_identical() {
        let cfg = tiny();
        let corpus = Corpus::builtin();
        let mut o = opts(&cfg, "topk-row:0.05+q2", 2);
        o.activations = "none".parse().unwrap();
        o.gradients = "none".parse().unwrap();
        o.outer = Some(OuterSync {
            every: 2,
            chunk: 64,
            beta: 0.95,
            lr: 0.7,
            momentum: 0.9,
            nesterov: true,
        });
        let mut sim = SimTrainer::new(&cfg, o).unwrap();
        let digests = |sim: &SimTrainer| -> Vec<[u8; 32]> {
            sim.pipes
                .iter()
                .map(|p| {
                    let mut h = blake3::Hasher::new();
                    for s in p {
                        h.update(&s.weights_digest().unwrap());
                    }
                    *h.finalize().as_bytes()
                })
                .collect()
        };
        let first = sim.train_step(&corpus).unwrap();
        // Between syncs the replicas drift (each stepped on its own micro-batch).
        let d = digests(&sim);
        assert_ne!(d[0], d[1]);
        sim.train_step(&corpus).unwrap();
        let d = digests(&sim);
        assert_eq!(d[0], d[1]);
        assert!(first.loss.is_finite());
        let b = sim.bytes();
        // 5% of each chunk, 2-bit values: far fewer bytes than fp32 every step.
        assert!(b.sync.ratio() > 20.0, "{b:?}");
    }

    #[test]
    fn boundaries_within_the_warmup_take_the_warmup_codec() {
        let mut cfg = tiny();
        cfg.train.warmup_steps = 2;
        let corpus = Corpus::builtin();
        let sim = |warmup_sync: &str| {
            let mut o = opts(&cfg, "topk-row:0.02+q2", 2);
            o.activations = "none".parse().unwrap();
            o.gradients = "none".parse().unwrap();
            o.warmup_sync = warmup_sync.parse().unwrap();
            o.outer = Some(OuterSync {
                every: 2,
                chunk: 64,
                beta: 0.95,
                lr: 1.0,
                momentum: 0.0,
                nesterov: false,
            });
            let mut sim = SimTrainer::new(&cfg, o).unwrap();
            // Bytes of the boundary at state step 2 (in the warmup), then of the one at 4 (not).
            let mut sync = Vec::new();
            for _ in 0..2 {
                let before = sim.bytes().sync.wire;
                sim.train_step(&corpus).unwrap();
                sim.train_step(&corpus).unwrap();
                sync.push(sim.bytes().sync.wire - before);
            }
            sync
        };
        let (narrow, wide) = (sim("topk-row:0.02+q2"), sim("topk-row:0.25+q2"));
        // A quarter of each chunk costs several times the bytes of 2%; after the warmup both
        // send the same codec (the same kept count, values differ by their residuals).
        assert!(wide[0] > 4 * narrow[0], "{wide:?} vs {narrow:?}");
        assert!(
            wide[1].abs_diff(narrow[1]) * 10 < narrow[1],
            "{wide:?} vs {narrow:?}"
        );
    }
}
