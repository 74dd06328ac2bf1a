//! The shard's ends: embedding and head forward/backward, glue between candle tensors and the
//! hand-written passes of [`crate::ends`].

use candle_core::{DType, Storage, Tensor};

use super::{ForwardCtx, Pass, Piece, Shard};
use crate::ends::{self, HeadPass, IntoHead};
use crate::layer::Float;
use crate::profile::timed;
use crate::{Error, Result};

const EMBED: &str = "model.embed_tokens.weight";

/// Runs `f` on the contiguous data of CPU tensor `t` (of float type `T`) without copying it.
fn with_slice<T: Float, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*s else {
        return Err(Error::Input("tensor not on the CPU".into()));
    };
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| Error::Input("tensor not contiguous".into()))?;
    Ok(f(&cpu.as_slice::<T>()?[a..b]))
}

impl Shard {
    /// The LM head's weight name: the embedding's when tied.
    fn lm_name(&self) -> &'static str {
        if self.cfg.tie_word_embeddings {
            EMBED
        } else {
            "lm_head.weight"
        }
    }

    /// Embedding forward: `tokens` (row-major `batch x seq`) -> hidden `(batch, seq, hidden)`.
    pub fn embed_forward(
        &self,
        tokens: &[u32],
        batch: usize,
        seq: usize,
    ) -> Result<(Tensor, ForwardCtx)> {
        let piece = self.piece_index(|p| *p == Piece::Embedding, "the embedding")?;
        self.check_tokens(tokens, batch, seq)?;
        let h = self.cfg.hidden_size;
        let table = self.w(EMBED)?.as_tensor();
        let x = match self.dtype {
            DType::F32 => {
                let x = with_slice::<f32, _>(table, |t| ends::embed_forward(t, h, tokens))?;
                Tensor::from_vec(x, (batch, seq, h), &self.device)?
            }
            _ => {
                let x = with_slice::<f64, _>(table, |t| ends::embed_forward(t, h, tokens))?;
                Tensor::from_vec(x, (batch, seq, h), &self.device)?
            }
        };
        let ctx = ForwardCtx {
            piece,
            out_dims: x.dims().to_vec(),
            vars: self.piece_vars(piece),
            pass: Pass::Embed(tokens.to_vec()),
        };
        Ok((x, ctx))
    }

    /// Adds the embedding table's gradient for output gradient `grad_out` of a forward on
    /// `tokens`.
    pub(super) fn embed_backward(&mut self, tokens: &[u32], grad_out: &Tensor) -> Result<()> {
        let (h, vocab) = (self.cfg.hidden_size, self.cfg.vocab_size);
        let g = grad_out.contiguous()?;
        let d = match self.dtype {
            DType::F32 => {
                let d = with_slice::<f32, _>(&g, |g| ends::embed_backward(g, h, vocab, tokens))?;
                Tensor::from_vec(d, (vocab, h), &self.device)?
            }
            _ => {
                let d = with_slice::<f64, _>(&g, |g| ends::embed_backward(g, h, vocab, tokens))?;
                Tensor::from_vec(d, (vocab, h), &self.device)?
            }
        };
        self.accumulate(self.by_name[EMBED], d)
    }

    /// Head forward: hidden `(batch, seq, hidden)` and next-token `targets` (row-major) -> mean
    /// cross-entropy in nats per token, and the context for [`Shard::head_backward`].
    pub fn head_forward(&self, x: &Tensor, targets: &[u32]) -> Result<(f64, ForwardCtx)> {
        let piece = self.piece_index(|p| *p == Piece::Head, "the head")?;
        let (b, t) = self.check_hidden(x)?;
        self.check_tokens(targets, b, t)?;
        let (loss, pass) = match self.dtype {
            DType::F32 => self.typed_head::<f32>(x, targets)?,
            _ => self.typed_head::<f64>(x, targets)?,
        };
        let ctx = ForwardCtx {
            piece,
            out_dims: vec![],
            vars: self.piece_vars(piece),
            pass: Pass::Head(pass),
        };
        Ok((loss, ctx))
    }

    fn typed_head<T: IntoHead>(&self, x: &Tensor, targets: &[u32]) -> Result<(f64, HeadPass)> {
        let seq = x.dims()[1];
        let x = x.flatten_all()?.to_vec1::<T>()?;
        let (vocab, eps) = (self.cfg.vocab_size, self.cfg.rms_norm_eps);
        let norm = self.w("model.norm.weight")?.as_tensor();
        let lm = self.w(self.lm_name())?.as_tensor();
        let (loss, saved) = with_slice::<T, _>(norm, |norm| {
            with_slice::<T, _>(lm, |lm| {
                ends::head_forward(x, seq, norm, lm, vocab, targets, eps)
            })
        })??;
        Ok((loss, T::into_head(saved)))
    }

    /// Head logits without a loss or a context (inference): `(batch, seq, vocab)`.
    pub fn head_logits_only(&self, x: &Tensor) -> Result<Tensor> {
        self.piece_index(|p| *p == Piece::Head, "the head")?;
        let (b, t) = self.check_hidden(x)?;
        let (vocab, eps) = (self.cfg.vocab_size, self.cfg.rms_norm_eps);
        let norm = self.w("model.norm.weight")?.as_tensor();
        let lm = self.w(self.lm_name())?.as_tensor();
        let x = x.contiguous()?;
        let shape = (b, t, vocab);
        Ok(match self.dtype {
            DType::F32 => {
                let l = with_slice::<f32, _>(&x, |x| {
                    with_slice::<f32, _>(norm, |n| {
                        with_slice::<f32, _>(lm, |lm| ends::logits(x, n, lm, vocab, eps))
                    })
                })???;
                Tensor::from_vec(l, shape, &self.device)?
            }
            _ => {
                let l = with_slice::<f64, _>(&x, |x| {
                    with_slice::<f64, _>(norm, |n| {
                        with_slice::<f64, _>(lm, |lm| ends::logits(x, n, lm, vocab, eps))
                    })
                })???;
                Tensor::from_vec(l, shape, &self.device)?
            }
        })
    }

    /// Backward of a head forward, for the loss multiplied by `loss_scale` (e.g. 1/micro_batches,
    /// so that accumulated gradients are those of the mean loss over the step). Returns the
    /// gradient of the head's input.
    pub fn head_backward(&mut self, ctx: ForwardCtx, loss_scale: f64) -> Result<Tensor> {
        if self.pieces.get(ctx.piece) != Some(&Piece::Head) {
            return Err(Error::Piece("head_backward needs a head context".into()));
        }
        self.check_fresh(&ctx)?;
        let Pass::Head(pass) = ctx.pass else {
            return Err(Error::Piece("head_backward needs a head context".into()));
        };
        let (dx, d_norm, d_lm) = match pass {
            HeadPass::F32(s) => self.typed_head_backward(s, loss_scale)?,
            HeadPass::F64(s) => self.typed_head_backward(s, loss_scale)?,
        };
        timed("grad.accumulate", || -> Result<()> {
            self.accumulate(self.by_name["model.norm.weight"], d_norm)?;
            self.accumulate(self.by_name[self.lm_name()], d_lm)
        })?;
        Ok(dx)
    }

    fn typed_head_backward<T: Float>(
        &self,
        s: ends::HeadSaved<T>,
        loss_scale: f64,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (h, vocab) = (self.cfg.hidden_size, self.cfg.vocab_size);
        let (b, t) = s.dims();
        let norm = self.w("model.norm.weight")?.as_tensor();
        let lm = self.w(self.lm_name())?.as_tensor();
        let [dx, d_norm, d_lm] = with_slice::<T, _>(norm, |norm| {
            with_slice::<T, _>(lm, |lm| ends::head_backward(s, norm, lm, loss_scale))
        })??;
        Ok((
            Tensor::from_vec(dx, (b, t, h), &self.device)?,
            Tensor::from_vec(d_norm, h, &self.device)?,
            Tensor::from_vec(d_lm, (vocab, h), &self.device)?,
        ))
    }
}
