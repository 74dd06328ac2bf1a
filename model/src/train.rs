//! The local trainer: the reference run that a swarm run is compared with.
//!
//! It holds the model as a swarm does: one "ends" shard (embedding + head, the trainer's part)
//! and one shard per stage (a peer's part), and runs them in the swarm's order of operations:
//!
//! - per micro-batch ([`micro_batch`]): embedding -> stage 0 -> ... -> head (loss), then head
//!   backward with loss scale `1/micro_batches` -> stages in reverse -> embedding, gradients
//!   accumulated in each shard;
//! - per step ([`apply_step`]): sum of every shard's `grad_sq_norm` (in stage order) -> global
//!   clip factor -> `optimizer_step(lr, clip)` and `zero_grads` on every shard.
//!
//! The swarm's trainer reuses these two functions' contract: the same batches
//! (`Corpus::train_batch(seed, step, micro, ..)`), the same loss scale, the same norm sum order.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor};

use crate::checkpoint::TrainState;
use crate::data::{Batch, Corpus};
use crate::optim::{AdamW, clip_scale};
use crate::profile::timed;
use crate::run::{DataConfig, RunConfig};
use crate::shard::{ForwardCtx, Piece, Shard};
use crate::{Error, Result};

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// The step just taken (0-based).
    pub step: u64,
    /// Mean training loss over the step's micro-batches, nats per token.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens processed.
    pub tokens: usize,
}

/// The forward contexts of one micro-batch in flight (embedding, stages, head).
pub struct MicroBatchCtx {
    embed: ForwardCtx,
    stages: Vec<ForwardCtx>,
    head: ForwardCtx,
}

impl MicroBatchCtx {
    /// Tags every context with the micro-batch's number in the step, so that its backward adds
    /// the parameter gradients in micro-batch order ([`ForwardCtx::micro_batch`]).
    pub fn micro_batch(self, mb: u64) -> MicroBatchCtx {
        MicroBatchCtx {
            embed: self.embed.micro_batch(mb),
            stages: self.stages.into_iter().map(|c| c.micro_batch(mb)).collect(),
            head: self.head.micro_batch(mb),
        }
    }
}

/// Forward of one micro-batch through `ends` (embedding + head) and `stages` (in order):
/// returns its mean loss and the contexts for [`backward_micro_batch`].
pub fn forward_micro_batch(
    ends: &Shard,
    stages: &[Shard],
    batch: &Batch,
) -> Result<(f64, MicroBatchCtx)> {
    forward_micro_batch_with(ends, stages, batch, &mut |x| Ok(x.clone()))
}

/// [`forward_micro_batch`] where every hidden state crossing a boundary (embedding -> stage 0
/// -> ... -> head) goes through `link` first, as a swarm's activation codec does: the receiver
/// continues with what `link` returns. In a subspace model what crosses is the projection
/// `c = Uᵀ(h - E_fix[tok])`, lifted back after `link`, as a swarm's boundary does (so a swarm
/// with codec `none` computes bitwise what this does).
pub fn forward_micro_batch_with(
    ends: &Shard,
    stages: &[Shard],
    batch: &Batch,
    link: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
) -> Result<(f64, MicroBatchCtx)> {
    let sub = ends.subspace();
    let tokens = &batch.inputs;
    let mut link = |x: &Tensor| -> Result<Tensor> {
        match &sub {
            None => link(x),
            Some(s) => s.lift(&link(&s.project(x, tokens)?)?, tokens),
        }
    };
    let (x, embed) = timed("embed.fwd", || {
        ends.embed_forward(&batch.inputs, batch.batch_size, batch.seq_len)
    })?;
    let mut x = link(&x)?;
    let mut ctxs = Vec::with_capacity(stages.len());
    for (k, s) in stages.iter().enumerate() {
        let (y, c) = s.stage_forward(k, &x)?;
        ctxs.push(c);
        x = link(&y)?;
    }
    let (loss, head) = timed("head.fwd", || ends.head_forward(&x, &batch.targets))?;
    Ok((
        loss,
        MicroBatchCtx {
            embed,
            stages: ctxs,
            head,
        },
    ))
}

/// Backward of a micro-batch for its loss times `loss_scale`: head, stages in reverse,
/// embedding; parameter gradients accumulate in each shard.
pub fn backward_micro_batch(
    ends: &mut Shard,
    stages: &mut [Shard],
    ctx: MicroBatchCtx,
    loss_scale: f64,
) -> Result<()> {
    backward_micro_batch_with(ends, stages, ctx, loss_scale, &mut |g| Ok(g.clone()))
}

/// [`backward_micro_batch`] where every gradient crossing a boundary (head -> last stage -> ...
/// -> embedding) goes through `link` first, as a swarm's gradient codec does. In a subspace
/// model what crosses is `Uᵀ·g`, continued with as `U·Uᵀ·g`.
pub fn backward_micro_batch_with(
    ends: &mut Shard,
    stages: &mut [Shard],
    ctx: MicroBatchCtx,
    loss_scale: f64,
    link: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
) -> Result<()> {
    let sub = ends.subspace();
    let mut link = |g: &Tensor| -> Result<Tensor> {
        match &sub {
            None => link(g),
            Some(s) => s.lift_grad(&link(&s.project_grad(g)?)?),
        }
    };
    let mut g = link(&timed("head.bwd", || {
        ends.head_backward(ctx.head, loss_scale)
    })?)?;
    for (s, c) in stages.iter_mut().zip(ctx.stages).rev() {
        g = s
            .backward(c, &g)?
            .ok_or_else(|| Error::Piece("stage gave no input grad".into()))?;
        g = link(&g)?;
    }
    timed("embed.bwd", || ends.backward(ctx.embed, &g))?;
    Ok(())
}

/// One micro-batch forward and backward ([`forward_micro_batch`], [`backward_micro_batch`]),
/// accumulating parameter gradients for the loss times `loss_scale`. Returns the (unscaled)
/// mean loss of the micro-batch.
pub fn micro_batch(
    ends: &mut Shard,
    stages: &mut [Shard],
    batch: &Batch,
    loss_scale: f64,
) -> Result<f64> {
    let (loss, ctx) = forward_micro_batch(ends, stages, batch)?;
    backward_micro_batch(ends, stages, ctx, loss_scale)?;
    Ok(loss)
}

/// The step boundary: global gradient norm over `shards` (summed in the order given), clipping
/// to `max_norm` (0: off), one AdamW step with `lr` on every shard, gradients zeroed. Returns
/// the norm before clipping.
pub fn apply_step(shards: &mut [&mut Shard], hp: &AdamW, lr: f64, max_norm: f64) -> Result<f64> {
    let mut sq = 0.0;
    for s in shards.iter() {
        sq += s.grad_sq_norm()?;
    }
    let scale = clip_scale(sq, max_norm);
    for s in shards.iter_mut() {
        s.optimizer_step(hp, lr, scale)?;
        s.zero_grads();
    }
    Ok(sq.sqrt())
}

/// The corpus a run's `[data]` section names: a dataset of token shards (memory-mapped), or a text
/// file or folder tokenized with `data.tokenizer` (bytes without one), or the built-in corpus.
/// A dataset made with another tokenizer than `data.tokenizer` is refused.
pub fn load_corpus(data: &DataConfig) -> Result<Corpus> {
    let tok: Box<dyn crate::Tokenizer> = match &data.tokenizer {
        Some(p) => crate::tokenizer::load_tokenizer(p)?,
        None => Box::new(crate::tokenizer::ByteTokenizer),
    };
    let corpus = match &data.path {
        Some(p) => Corpus::from_path(p, tok.as_ref(), data.val_fraction)?,
        None if data.tokenizer.is_some() => {
            return Err(Error::Config(
                "data.tokenizer needs data.path: the built-in corpus is byte-level".into(),
            ));
        }
        None => Corpus::builtin(),
    };
    if let (Some(p), Some(want)) = (&data.tokenizer, corpus.tokenizer_hash()) {
        let file = crate::tokenizer::tokenizer_file(p);
        let bytes = std::fs::read(&file).map_err(|source| Error::Io { path: file, source })?;
        let have = crate::shards::hex(crate::shards::tokenizer_hash(&bytes));
        if have != want {
            return Err(Error::Data(format!(
                "{} was tokenized by another tokenizer than {} (hash {want}, not {have})",
                corpus.source(),
                p.display()
            )));
        }
    }
    Ok(corpus)
}

/// The vocabulary a run's data needs: its tokenizer's, else a token dataset's (its manifest or
/// shard headers), else 256 (bytes).
pub fn data_vocab_size(data: &DataConfig) -> Result<usize> {
    if let Some(t) = &data.tokenizer {
        return Ok(crate::tokenizer::load_tokenizer(t)?.vocab_size());
    }
    match &data.path {
        Some(p) if crate::data::is_token_dataset(p) => {
            Ok(crate::shards::ShardSet::open(p)?.vocab_size)
        }
        _ => Ok(256),
    }
}

/// A whole model in one process, split like a swarm run: ends + one shard per stage.
pub struct LocalTrainer {
    cfg: RunConfig,
    ends: Shard,
    stages: Vec<Shard>,
}

impl std::fmt::Debug for LocalTrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalTrainer")
            .field("step", &self.step())
            .finish_non_exhaustive()
    }
}

impl LocalTrainer {
    /// Fresh weights from the run's seed.
    pub fn new(cfg: &RunConfig) -> Result<Self> {
        cfg.validate()?;
        let dev = Device::Cpu;
        let ends = Shard::new(
            &cfg.model,
            &[Piece::Embedding, Piece::Head],
            cfg.seed,
            DType::F32,
            &dev,
        )?;
        let stages = Piece::stages(&cfg.stages)
            .into_iter()
            .map(|p| Shard::new(&cfg.model, &[p], cfg.seed, DType::F32, &dev))
            .collect::<Result<_>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            ends,
            stages,
        })
    }

    /// Weights (and, to resume, optimizer state) from a checkpoint; `tensors` by HF name.
    pub fn from_tensors(
        cfg: &RunConfig,
        tensors: &HashMap<String, Tensor>,
        state: Option<&TrainState>,
    ) -> Result<Self> {
        cfg.validate()?;
        let dev = Device::Cpu;
        let build = |p: &[Piece]| Shard::from_tensors(&cfg.model, p, tensors, DType::F32, &dev);
        let mut ends = build(&[Piece::Embedding, Piece::Head])?;
        let mut stages = Piece::stages(&cfg.stages)
            .into_iter()
            .map(|p| build(&[p]))
            .collect::<Result<Vec<_>>>()?;
        if let Some(st) = state {
            ends.set_optimizer_state(st.step, &st.optimizer)?;
            for s in &mut stages {
                s.set_optimizer_state(st.step, &st.optimizer)?;
            }
        }
        Ok(Self {
            cfg: cfg.clone(),
            ends,
            stages,
        })
    }

    /// The run's config.
    pub fn config(&self) -> &RunConfig {
        &self.cfg
    }

    /// Steps taken so far.
    pub fn step(&self) -> u64 {
        self.ends.step()
    }

    /// The ends shard (embedding + head).
    pub fn ends(&self) -> &Shard {
        &self.ends
    }

    /// The stage shards, in order.
    pub fn stages(&self) -> &[Shard] {
        &self.stages
    }

    /// One optimizer step on the micro-batches `corpus.train_batch(seed, step, 0..micro_batches)`.
    pub fn train_step(&mut self, corpus: &Corpus) -> Result<StepStats> {
        let t = &self.cfg.train;
        let step = self.step();
        let n = t.micro_batches;
        let mut loss = 0.0;
        for micro in 0..n {
            let batch = corpus.train_batch(
                self.cfg.seed,
                step,
                micro as u64,
                t.micro_batch_size,
                t.seq_len,
            )?;
            loss += micro_batch(&mut self.ends, &mut self.stages, &batch, 1.0 / n as f64)?;
        }
        let lr = self.cfg.schedule().at(step);
        let hp = self.cfg.adamw();
        let max_norm = t.grad_clip;
        let mut shards: Vec<&mut Shard> = std::iter::once(&mut self.ends)
            .chain(self.stages.iter_mut())
            .collect();
        let grad_norm = apply_step(&mut shards, &hp, lr, max_norm)?;
        Ok(StepStats {
            step,
            loss: loss / n as f64,
            lr,
            grad_norm,
            tokens: self.cfg.tokens_per_step(),
        })
    }

    /// Seconds of forward, backward and `step(shards)` for one micro-batch (benchmarks).
    pub fn timed_micro_batch(
        &mut self,
        batch: &Batch,
        step: impl FnOnce(&mut [&mut Shard]) -> Result<()>,
    ) -> Result<(f64, f64, f64)> {
        let t0 = std::time::Instant::now();
        let (_, ctx) = forward_micro_batch(&self.ends, &self.stages, batch)?;
        let t1 = std::time::Instant::now();
        backward_micro_batch(&mut self.ends, &mut self.stages, ctx, 1.0)?;
        let t2 = std::time::Instant::now();
        let mut shards: Vec<&mut Shard> = std::iter::once(&mut self.ends)
            .chain(self.stages.iter_mut())
            .collect();
        step(&mut shards)?;
        let t3 = std::time::Instant::now();
        Ok((
            (t1 - t0).as_secs_f64(),
            (t2 - t1).as_secs_f64(),
            (t3 - t2).as_secs_f64(),
        ))
    }

    /// Mean loss over the first `batches` validation batches (forward only).
    pub fn eval(&self, corpus: &Corpus, batches: usize) -> Result<f64> {
        let t = &self.cfg.train;
        let mut total = 0.0;
        for i in 0..batches {
            let b = corpus.val_batch(i as u64, t.micro_batch_size, t.seq_len)?;
            total += self.loss(&b)?;
        }
        Ok(total / batches.max(1) as f64)
    }

    /// Mean loss of one batch, forward only.
    pub fn loss(&self, b: &Batch) -> Result<f64> {
        let (mut x, _) = self
            .ends
            .embed_forward(&b.inputs, b.batch_size, b.seq_len)?;
        for (k, s) in self.stages.iter().enumerate() {
            x = s.stage_forward(k, &x)?.0;
        }
        Ok(self.ends.head_forward(&x, &b.targets)?.0)
    }

    /// All weights by HF name (for checkpoints).
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        let mut t = self.ends.tensors();
        for s in &self.stages {
            t.extend(s.tensors());
        }
        t
    }

    /// Step and AdamW moments (for checkpoints), with the run config as metadata.
    pub fn train_state(&self) -> Result<TrainState> {
        let mut optimizer = self.ends.optimizer_tensors()?;
        for s in &self.stages {
            optimizer.extend(s.optimizer_tensors()?);
        }
        let mut metadata = BTreeMap::new();
        metadata.insert("run_config".to_string(), self.cfg.to_toml()?);
        Ok(TrainState {
            step: self.step(),
            optimizer,
            metadata,
        })
    }

    /// BLAKE3 of every shard's weights digest, in order (ends, stages).
    pub fn weights_digest(&self) -> Result<[u8; 32]> {
        let mut h = blake3::Hasher::new();
        h.update(&self.ends.weights_digest()?);
        for s in &self.stages {
            h.update(&s.weights_digest()?);
        }
        Ok(*h.finalize().as_bytes())
    }
}
