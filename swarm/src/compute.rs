//! Stage compute on frames: the one implementation of turning a received compression frame into a
//! tensor, a tensor into the frame sent on, and a stage's forward and input gradient as an audit
//! recomputes them. The stage worker, the auditors (a replica's `AuditRecompute`, the trainer's
//! referee) and the audit bench all call these, because audits compare a peer's frames with a
//! recomputation bitwise: any second copy of this code could drift from the first.

use std::sync::Mutex;

use candle_core::{Device, Tensor};
use swarm_compression::{Codec, Decoder, Encoder, Limits};
use swarm_model::Shard;
use swarm_model::subspace::Subspace;

use crate::error::{Error, Result};

/// What a decoded frame's shape must be.
#[derive(Debug, Clone, Copy)]
pub enum Expect<'a> {
    /// Activations at a stage boundary: `[batch, seq, hidden]`.
    Hidden(usize),
    /// Exactly these dimensions.
    Dims(&'a [usize]),
    /// Whatever the frame says (already bounded by the decoder's limits).
    Any,
}

/// Decodes `frame` (at most `limits`) into an f32 tensor of the expected shape; returns it and the
/// frame's element count.
pub fn decode(
    dec: &mut Decoder,
    frame: &[u8],
    limits: &Limits,
    expect: Expect<'_>,
) -> Result<(Tensor, usize)> {
    let mut values = Vec::new();
    let info = dec.decode(frame, limits, &mut values)?;
    let shape = info.shape().to_vec();
    let ok = match expect {
        Expect::Hidden(hidden) => shape.len() == 3 && shape[2] == hidden,
        Expect::Dims(dims) => shape == dims,
        Expect::Any => true,
    };
    if !ok {
        return Err(Error::FrameShape {
            got: shape,
            expected: format!("{expect:?}"),
        });
    }
    let t = cand(Tensor::from_vec(values, shape.as_slice(), &Device::Cpu))?;
    Ok((t, info.elements))
}

/// Encoders and decoders kept across frames. A fresh encoder allocates its scratch and a zstd
/// context (whose tables are zeroed, about a megabyte at level 3) for every frame, and a fresh
/// decoder its zstd context and buffers; kept, they allocate nothing once warm. A frame is a pure
/// function of (codec, seed, data), and every encoder here has the default seed, so which one
/// encodes changes no byte. Callers on several threads each take their own (a few are kept).
#[derive(Debug, Default)]
pub struct Codecs {
    encoders: Mutex<Vec<Encoder>>,
    decoders: Mutex<Vec<Decoder>>,
}

/// Kept per kind beyond which returned encoders and decoders are dropped (passes in flight at
/// once on one process are few).
const KEPT: usize = 4;

impl Codecs {
    /// Runs `f` with an encoder of `codec` (the default rotation seed), kept for the next frame.
    fn with_encoder<R>(
        &self,
        codec: Codec,
        f: impl FnOnce(&mut Encoder) -> Result<R>,
    ) -> Result<R> {
        let kept = {
            let mut v = lock(&self.encoders);
            let at = v.iter().rposition(|e| *e.codec() == codec);
            at.map(|i| v.swap_remove(i))
        };
        let mut enc = match kept {
            Some(e) => e,
            None => Encoder::new(codec)?,
        };
        let r = f(&mut enc);
        let mut v = lock(&self.encoders);
        if v.len() < KEPT {
            v.push(enc);
        }
        r
    }

    /// Runs `f` with a decoder, kept for the next frame.
    pub fn with_decoder<R>(&self, f: impl FnOnce(&mut Decoder) -> R) -> R {
        let mut dec = lock(&self.decoders).pop().unwrap_or_default();
        let r = f(&mut dec);
        let mut v = lock(&self.decoders);
        if v.len() < KEPT {
            v.push(dec);
        }
        r
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Encodes `t` with `codec` as one frame of its shape; returns the frame and its element count.
/// A contiguous f32 tensor is encoded in place (no flat copy of it).
pub fn encode(codecs: &Codecs, codec: Codec, t: &Tensor) -> Result<(Vec<u8>, usize)> {
    let dims = t.dims().to_vec();
    let mut frame = Vec::new();
    let n = codecs.with_encoder(codec, |enc| {
        let n = swarm_model::shard::with_f32(t, |values| {
            enc.encode(values, &dims, &mut frame).map(|()| values.len())
        })??;
        Ok(n)
    })?;
    Ok((frame, n))
}

/// A hidden state at a stage boundary as it travels: plain, one frame of `[batch, seq, hidden]`;
/// in a subspace model (issue #13, [`swarm_model::subspace`]), the token ids
/// ([`swarm_compression::tokens`]) then one frame of the coordinates `c = Uᵀ(h - E_fix[tok])`,
/// `[batch, seq, k]`. Returns the bytes and the element count of the standard model's hidden
/// state (what `dense_bytes` counts, 4 bytes each, whatever crosses).
pub fn encode_hidden(
    codecs: &Codecs,
    codec: Codec,
    sub: Option<&Subspace>,
    h: &Tensor,
    tokens: &[u32],
) -> Result<(Vec<u8>, usize)> {
    let Some(sub) = sub else {
        return encode(codecs, codec, h);
    };
    let mut out = Vec::new();
    swarm_compression::encode_tokens(tokens, &mut out)?;
    let (frame, _) = encode(codecs, codec, &sub.project(h, tokens)?)?;
    out.extend_from_slice(&frame);
    Ok((out, h.elem_count()))
}

/// The inverse of [`encode_hidden`]: the hidden state `[batch, seq, hidden]`, the token ids (in
/// a subspace model; empty otherwise) and the standard model's element count. `vocab` bounds the
/// ids.
pub fn decode_hidden(
    dec: &mut Decoder,
    bytes: &[u8],
    limits: &Limits,
    hidden: usize,
    vocab: usize,
    sub: Option<&Subspace>,
) -> Result<(Tensor, Vec<u32>, usize)> {
    let Some(sub) = sub else {
        let (h, n) = decode(dec, bytes, limits, Expect::Hidden(hidden))?;
        return Ok((h, Vec::new(), n));
    };
    let (tokens, used) = swarm_compression::decode_tokens(
        bytes,
        limits.max_elements / hidden.max(1),
        u32::try_from(vocab).unwrap_or(u32::MAX),
    )?;
    let (c, _) = decode(dec, &bytes[used..], limits, Expect::Hidden(sub.rank()))?;
    if c.dims()[0] * c.dims()[1] != tokens.len() {
        return Err(Error::FrameShape {
            got: c.dims().to_vec(),
            expected: format!("{} positions (the token ids sent)", tokens.len()),
        });
    }
    let h = sub.lift(&c, &tokens)?;
    let n = h.elem_count();
    Ok((h, tokens, n))
}

/// A hidden-state gradient at a stage boundary as it travels: plain, one frame; in a subspace
/// model one frame of `Uᵀ·g` (`[batch, seq, k]`: exact, see [`swarm_model::subspace`]). Returns
/// the bytes and the standard model's element count.
pub fn encode_grad(
    codecs: &Codecs,
    codec: Codec,
    sub: Option<&Subspace>,
    g: &Tensor,
) -> Result<(Vec<u8>, usize)> {
    match sub {
        None => encode(codecs, codec, g),
        Some(sub) => Ok((
            encode(codecs, codec, &sub.project_grad(g)?)?.0,
            g.elem_count(),
        )),
    }
}

/// The inverse of [`encode_grad`]: the gradient `[batch, seq, hidden]` to continue with (`U·Uᵀ·g`
/// in a subspace model) and the standard model's element count. `dims`: the shape expected, or
/// any when `None`.
pub fn decode_grad(
    dec: &mut Decoder,
    bytes: &[u8],
    limits: &Limits,
    dims: Option<&[usize]>,
    sub: Option<&Subspace>,
) -> Result<(Tensor, usize)> {
    let Some(sub) = sub else {
        return decode(dec, bytes, limits, dims.map_or(Expect::Any, Expect::Dims));
    };
    let want = dims.map(|d| [d[0], d[1], sub.rank()]);
    let expect = match &want {
        Some(w) => Expect::Dims(w),
        None => Expect::Hidden(sub.rank()),
    };
    let (gc, _) = decode(dec, bytes, limits, expect)?;
    let g = sub.lift_grad(&gc)?;
    let n = g.elem_count();
    Ok((g, n))
}

/// Checks the token ids a subspace boundary brought back against the micro-batch's `targets`
/// (each row's next tokens): id `i + 1` of a row must be target `i`. Plain boundaries carry no
/// ids (`tokens` empty) and pass.
pub fn check_tokens(tokens: &[u32], targets: &[u32], seq: usize) -> Result<()> {
    if tokens.is_empty() {
        return Ok(());
    }
    let ok = tokens.len() == targets.len()
        && seq > 0
        && tokens
            .chunks(seq)
            .zip(targets.chunks(seq))
            .all(|(t, y)| t[1..] == y[..y.len() - 1]);
    if ok {
        Ok(())
    } else {
        Err(Error::FrameShape {
            got: vec![tokens.len()],
            expected: "the micro-batch's token ids (each row's targets shifted)".into(),
        })
    }
}

/// The standard model's element count of a gradient frame with header `info` (a subspace
/// frame holds `k` values per token where the standard model sends `hidden`).
pub fn dense_elements(info: &swarm_compression::FrameInfo, hidden: usize) -> usize {
    match info.shape() {
        [b, t, _] => b * t * hidden,
        _ => info.elements,
    }
}

/// Forward of `fwd_in` through stage `index`, then the input gradient for `bwd_in` (nothing is
/// accumulated), both encoded as a stage sends them: what an audit compares with the audited
/// peer's frames.
pub fn recompute(
    shard: &Shard,
    index: usize,
    fwd_in: &[u8],
    bwd_in: &[u8],
    limits: &Limits,
    act: Codec,
    grad: Codec,
) -> Result<(Vec<u8>, Vec<u8>)> {
    let (hidden, vocab) = (shard.config().hidden_size, shard.config().vocab_size);
    let sub = shard.subspace();
    let sub = sub.as_deref();
    let mut dec = Decoder::new();
    let codecs = Codecs::default();
    let (x, tokens, _) = decode_hidden(&mut dec, fwd_in, limits, hidden, vocab, sub)?;
    let (y, ctx) = shard.stage_forward(index, &x)?;
    let (fwd_out, _) = encode_hidden(&codecs, act, sub, &y, &tokens)?;
    let (g, _) = decode_grad(&mut dec, bwd_in, limits, Some(y.dims()), sub)?;
    let dx = shard
        .backward_input_only(ctx, &g)?
        .ok_or_else(|| Error::NoInputGradient)?;
    let (bwd_out, _) = encode_grad(&codecs, grad, sub, &dx)?;
    Ok((fwd_out, bwd_out))
}

/// Forward of `fwd_in` through stage `index`, then the full backward of `bwd_in`, adding the
/// parameter gradients to the shard's accumulators as the stage worker does for a micro-batch it
/// counts: the trainer's audit of a replica's inner optimizer step recomputes its gradient so.
pub fn accumulate(
    shard: &mut Shard,
    index: usize,
    fwd_in: &[u8],
    bwd_in: &[u8],
    limits: &Limits,
) -> Result<()> {
    let (hidden, vocab) = (shard.config().hidden_size, shard.config().vocab_size);
    let sub = shard.subspace();
    let sub = sub.as_deref();
    let mut dec = Decoder::new();
    let (x, _, _) = decode_hidden(&mut dec, fwd_in, limits, hidden, vocab, sub)?;
    let (y, ctx) = shard.stage_forward(index, &x)?;
    let (g, _) = decode_grad(&mut dec, bwd_in, limits, Some(y.dims()), sub)?;
    shard.backward(ctx, &g)?;
    Ok(())
}

/// A replica's gradient for its own inner optimizer step while replicas drift: the sum it
/// accumulated over the `mine` micro-batches it counted (each already scaled by
/// `1/total`), scaled to the mean of its own micro-batches, set as the shard's gradient. Returns
/// it flat. The stage worker and the trainer's inner-step audit both call this.
pub fn own_mean_gradient(shard: &mut Shard, mine: usize, total: usize) -> Result<Vec<f32>> {
    let mut flat = shard.grads_flat()?;
    if mine > 0 && mine != total {
        let k = total as f32 / mine as f32;
        flat.iter_mut().for_each(|x| *x *= k);
        shard.set_grads_flat(&flat)?;
    }
    Ok(flat)
}

fn cand<T>(r: candle_core::Result<T>) -> Result<T> {
    r.map_err(|e| Error::Model(e.into()))
}
