//! The shard's ends: embedding and head forward/backward, glue between candle tensors and the
//! hand-written passes of [`crate::ends`].

use candle_core::{DType, Storage, Tensor};

use super::{ForwardCtx, Pass, Piece, Shard};
use crate::ends::{self, HeadPass, IntoHead};
use crate::layer::Float;
use crate::profile::timed;
use crate::{Error, Result};

const EMBED: &str = "model.embed_tokens.weight";
/// A subspace model's trainable embedding (`vocab x rank`): the embedding is `E_fix[tok] + A[tok]·Uᵀ`.
const EMBED_SUB: &str = "model.embed_tokens.subspace";

/// Runs `f` on the contiguous data of CPU tensor `t` (of float type `T`) without copying it.
pub(super) fn with_slice<T: Float, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> Result<R> {
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
        let x = match &self.subspace {
            None => self.gather(EMBED, h, tokens)?,
            Some(sub) => {
                let a = self.gather(EMBED_SUB, sub.rank(), tokens)?;
                (sub.fixed_rows(tokens, self.dtype)? + a.matmul(&sub.u(self.dtype).t()?)?)?
            }
        }
        .reshape((batch, seq, h))?;
        let ctx = ForwardCtx {
            piece,
            out_dims: x.dims().to_vec(),
            vars: self.piece_vars(piece),
            pass: Pass::Embed(tokens.to_vec()),
            mb: None,
        };
        Ok((x, ctx))
    }

    /// The rows of table `name` (`vocab x width`) for `tokens`: `(tokens, width)`.
    fn gather(&self, name: &str, width: usize, tokens: &[u32]) -> Result<Tensor> {
        let table = self.w(name)?.as_tensor();
        let n = tokens.len();
        Ok(match self.dtype {
            DType::F32 => {
                let x = with_slice::<f32, _>(table, |t| ends::embed_forward(t, width, tokens))?;
                Tensor::from_vec(x, (n, width), &self.device)?
            }
            _ => {
                let x = with_slice::<f64, _>(table, |t| ends::embed_forward(t, width, tokens))?;
                Tensor::from_vec(x, (n, width), &self.device)?
            }
        })
    }

    /// Adds the embedding table's gradient for output gradient `grad_out` of `ctx`, a forward on
    /// `tokens` (a subspace model's: `A`'s, from `grad_out·U`).
    pub(super) fn embed_backward(
        &mut self,
        ctx: &ForwardCtx,
        tokens: &[u32],
        grad_out: &Tensor,
    ) -> Result<()> {
        let (name, g) = match &self.subspace {
            None => (EMBED, grad_out.contiguous()?),
            Some(sub) => {
                let g = grad_out.reshape((tokens.len(), self.cfg.hidden_size))?;
                (EMBED_SUB, g.matmul(sub.u(self.dtype))?.contiguous()?)
            }
        };
        let (h, vocab) = (g.elem_count() / tokens.len().max(1), self.cfg.vocab_size);
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
        self.add_grads(ctx.mb, ctx.piece, vec![(self.by_name[name], d)])
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
            mb: None,
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
        let (mb, piece) = (ctx.mb, ctx.piece);
        let (dx, d_norm, d_lm) = self.head_grads(ctx, loss_scale)?;
        let adds = vec![
            (self.by_name["model.norm.weight"], d_norm),
            (self.by_name[self.lm_name()], d_lm),
        ];
        timed("grad.accumulate", || self.add_grads(mb, piece, adds))?;
        Ok(dx)
    }

    /// [`Shard::head_backward`] without touching the accumulated parameter gradients: returns
    /// only the (bitwise identical) input gradient, for a micro-batch whose head already counted.
    pub fn head_backward_input_only(&self, ctx: ForwardCtx, loss_scale: f64) -> Result<Tensor> {
        Ok(self.head_grads(ctx, loss_scale)?.0)
    }

    /// The head's input gradient and its parameters' (final norm, LM head).
    fn head_grads(&self, ctx: ForwardCtx, loss_scale: f64) -> Result<(Tensor, Tensor, Tensor)> {
        if self.pieces.get(ctx.piece) != Some(&Piece::Head) {
            return Err(Error::Piece("head_backward needs a head context".into()));
        }
        self.check_fresh(&ctx)?;
        let Pass::Head(pass) = ctx.pass else {
            return Err(Error::Piece("head_backward needs a head context".into()));
        };
        match pass {
            HeadPass::F32(s) => self.typed_head_backward(s, loss_scale),
            HeadPass::F64(s) => self.typed_head_backward(s, loss_scale),
        }
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
