//! Stage compute on frames: the one implementation of turning a received compression frame into a
//! tensor, a tensor into the frame sent on, and a stage's forward and input gradient as an audit
//! recomputes them. The stage worker, the auditors (a replica's `AuditRecompute`, the trainer's
//! referee) and the audit bench all call these, because audits compare a peer's frames with a
//! recomputation bitwise: any second copy of this code could drift from the first.

use candle_core::{DType, Device, Tensor};
use swarm_compression::{Codec, Decoder, Encoder, Limits};
use swarm_model::Shard;

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

/// The values of `t` as flat f32, in row-major order.
pub fn tensor_f32(t: &Tensor) -> Result<Vec<f32>> {
    cand(
        t.flatten_all()
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.to_vec1::<f32>()),
    )
}

/// Encodes `t` with `codec` as one frame of its shape; returns the frame and its element count.
pub fn encode(codec: Codec, t: &Tensor) -> Result<(Vec<u8>, usize)> {
    let dims = t.dims().to_vec();
    let values = tensor_f32(t)?;
    let mut frame = Vec::new();
    Encoder::new(codec)?.encode(&values, &dims, &mut frame)?;
    Ok((frame, values.len()))
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
    let hidden = shard.config().hidden_size;
    let mut dec = Decoder::new();
    let (x, _) = decode(&mut dec, fwd_in, limits, Expect::Hidden(hidden))?;
    let (y, ctx) = shard.stage_forward(index, &x)?;
    let (fwd_out, _) = encode(act, &y)?;
    let (g, _) = decode(&mut dec, bwd_in, limits, Expect::Dims(y.dims()))?;
    let dx = shard
        .backward_input_only(ctx, &g)?
        .ok_or_else(|| Error::NoInputGradient)?;
    let (bwd_out, _) = encode(grad, &dx)?;
    Ok((fwd_out, bwd_out))
}

fn cand<T>(r: candle_core::Result<T>) -> Result<T> {
    r.map_err(|e| Error::Model(e.into()))
}
