//! Model pieces and the shard that holds, runs and trains some of them.
//!
//! A run splits the decoder into [`Piece`]s: the token embedding, stages (contiguous layer ranges)
//! and the head (final norm, LM head, loss). A [`Shard`] holds one or more pieces with their
//! parameters (HF tensor names), gradients and AdamW state, so that a peer can serve a stage and
//! the trainer can hold the "ends" (embedding + head, which share one weight when embeddings are
//! tied).
//!
//! Protocol for one micro-batch (what the local trainer and the swarm both do):
//! 1. `embed_forward` -> `stage_forward` for each stage in order -> `head_forward` (loss).
//! 2. `head_backward(ctx, 1/micro_batches)` -> `stage_backward` in reverse -> `embed_backward`.
//!    Each backward consumes its context, returns the input gradient and adds the parameter
//!    gradients into the shard's accumulators. Dropping a context instead frees its graph.
//!    Tagging contexts with their micro-batch ([`ForwardCtx::micro_batch`]) makes the sum the
//!    same whatever order the backwards run in (`shard/grads.rs`).
//!
//! At the step boundary: `grad_sq_norm` on every shard, sum them, [`crate::clip_scale`], then
//! `optimizer_step(lr, scale)` and `zero_grads` on every shard.
//!
//! Weights are initialised from `(seed, tensor name)` alone, so a shard holding layers 4..8 has
//! exactly the weights the single-process model has for them.

mod head;

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor, TensorId, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, Normal};

use crate::ends::HeadPass;
use crate::layer::{self, Float, Geom, IntoPass, LayerWeights, StagePass, StageWeights};
use crate::ops::RopeTables;
use crate::optim::{AdamW, AdamWStep};
use crate::profile::timed;
use crate::subspace::Subspace;
use crate::{Error, ModelConfig, Result};

mod grads;
use grads::Grads;

/// A part of the model that can be built and run alone.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Piece {
    /// `model.embed_tokens.weight`: tokens -> hidden states `(batch, seq, hidden)`.
    Embedding,
    /// Transformer layers `layers` (the run's stage number `index`): hidden -> hidden.
    Stage {
        /// The run's stage number (what the swarm routes by).
        index: usize,
        /// The model's layers it holds.
        layers: Range<usize>,
    },
    /// Final RMSNorm and LM head (`model.norm.weight`, `lm_head.weight`, or the embedding when
    /// tied): hidden -> logits, and the mean cross-entropy loss.
    Head,
}

impl Piece {
    /// Sort key: embedding, stages by first layer, head. Shards keep pieces in this order.
    fn order(&self) -> (usize, usize) {
        match self {
            Piece::Embedding => (0, 0),
            Piece::Stage { layers, .. } => (1, layers.start),
            Piece::Head => (2, 0),
        }
    }

    /// The pieces of a run with stage boundaries `bounds` (e.g. `[0, 2, 4]` -> layers 0..2, 2..4).
    pub fn all(bounds: &[usize]) -> Vec<Piece> {
        let mut v = vec![Piece::Embedding];
        v.extend(Self::stages(bounds));
        v.push(Piece::Head);
        v
    }

    /// The stages for boundaries `bounds`.
    pub fn stages(bounds: &[usize]) -> Vec<Piece> {
        bounds
            .windows(2)
            .enumerate()
            .map(|(index, w)| Piece::Stage {
                index,
                layers: w[0]..w[1],
            })
            .collect()
    }

    /// Names and shapes of this piece's own parameters, in the stable order the shard uses for
    /// flat gradients, digests and state. With tied embeddings the head owns no LM head (it uses
    /// `model.embed_tokens.weight`, which belongs to the embedding).
    /// A subspace model (`subspace_rank` k > 0) has `*.subspace` parameters in place of
    /// `o_proj` (k x hidden), `down_proj` (k x intermediate) and the embedding (vocab x k), in
    /// the same places (see [`crate::subspace`]).
    pub fn parameters(&self, cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
        crate::subspace::reparametrize(cfg, self.hf_parameters(cfg))
    }

    /// [`Piece::parameters`] of the standard (HF) model.
    fn hf_parameters(&self, cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
        let h = cfg.hidden_size;
        let kv = cfg.num_kv_heads() * cfg.head_dim();
        let i = cfg.intermediate_size;
        match self {
            Piece::Embedding => vec![("model.embed_tokens.weight".into(), vec![cfg.vocab_size, h])],
            Piece::Stage { layers, .. } => {
                let mut v = Vec::with_capacity(layers.len() * 9);
                for l in layers.clone() {
                    let p = format!("model.layers.{l}");
                    v.push((format!("{p}.input_layernorm.weight"), vec![h]));
                    v.push((format!("{p}.self_attn.q_proj.weight"), vec![h, h]));
                    v.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
                    v.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
                    v.push((format!("{p}.self_attn.o_proj.weight"), vec![h, h]));
                    v.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
                    v.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
                    v.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
                    v.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
                }
                v
            }
            Piece::Head => {
                let mut v = vec![("model.norm.weight".to_string(), vec![h])];
                if !cfg.tie_word_embeddings {
                    v.push(("lm_head.weight".into(), vec![cfg.vocab_size, h]));
                }
                v
            }
        }
    }
}

/// The initial value of parameter `name`: RMSNorm weights are 1; matrices are N(0, 0.02), with
/// the residual projections (`o_proj`, `down_proj`) scaled by 1/sqrt(2 * layers) as in GPT-2.
/// Drawn from ChaCha20 keyed by BLAKE3(seed, name), so it depends on nothing else.
pub fn init_values(cfg: &ModelConfig, seed: u64, name: &str, len: usize) -> Vec<f64> {
    if name.ends_with("norm.weight") {
        return vec![1.0; len];
    }
    let mut std = 0.02;
    if name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight") {
        std /= (2.0 * cfg.num_hidden_layers as f64).sqrt();
    }
    if name.ends_with("o_proj.subspace") || name.ends_with("down_proj.subspace") {
        std = crate::subspace::init_std(cfg);
    }
    let mut h = blake3::Hasher::new();
    h.update(b"swarm-model init v1\0");
    h.update(&seed.to_le_bytes());
    h.update(name.as_bytes());
    let mut rng = ChaCha20Rng::from_seed(*h.finalize().as_bytes());
    let normal = Normal::new(0.0, std).expect("std is positive and finite");
    (0..len).map(|_| normal.sample(&mut rng)).collect()
}

struct Param {
    name: String,
    shape: Vec<usize>,
    var: Var,
    /// AdamW first and second moments, f32, allocated on the first step.
    m: Vec<f32>,
    v: Vec<f32>,
}

/// What a backward pass needs from its forward pass: the saved pass and the weights it used.
/// Dropping it frees the saved activations.
pub struct ForwardCtx {
    piece: usize,
    /// The forward output's shape, which the output gradient must have.
    out_dims: Vec<usize>,
    /// The parameter variables the forward used, to detect stale contexts.
    vars: Vec<Var>,
    pass: Pass,
    /// The micro-batch whose gradients a backward adds ([`ForwardCtx::micro_batch`]).
    mb: Option<u64>,
}

enum Pass {
    /// The embedding's input tokens.
    Embed(Vec<u32>),
    /// The head, run by hand ([`crate::ends`]).
    Head(HeadPass),
    /// Decoder layers run by hand ([`crate::layer`]).
    Layers(StagePass),
}

impl ForwardCtx {
    /// Bytes of the buffers a stage pass keeps for its backward (the weights copy it ran with
    /// and each layer's activations); `None` for the embedding and head (`presets::stage_memory`
    /// predicts a stage's).
    pub fn saved_bytes(&self) -> Option<u64> {
        match &self.pass {
            Pass::Layers(StagePass::F32(s)) => Some(s.bytes()),
            Pass::Layers(StagePass::F64(s)) => Some(s.bytes()),
            Pass::Embed(_) | Pass::Head(_) => None,
        }
    }

    /// Tags the context with its micro-batch's number in the step: its backward's parameter
    /// gradients are then added in micro-batch order, whatever order the backwards run in (see
    /// `shard/grads.rs`). Untagged, a backward counts as the next micro-batch in order.
    pub fn micro_batch(mut self, mb: u64) -> ForwardCtx {
        self.mb = Some(mb);
        self
    }
}

impl std::fmt::Debug for ForwardCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForwardCtx")
            .field("piece", &self.piece)
            .finish_non_exhaustive()
    }
}

/// Some pieces of the model with their parameters, gradients and optimizer state.
pub struct Shard {
    cfg: ModelConfig,
    pieces: Vec<Piece>,
    params: Vec<Param>,
    by_name: HashMap<String, usize>,
    rope: RopeTables,
    dtype: DType,
    device: Device,
    step: u64,
    /// Per stage piece: the flat layer weights the hand-written pass runs on, made once per
    /// version of the weights (keyed by the variables' ids, which change whenever a weight is
    /// replaced) and shared by every context in flight, instead of a copy per micro-batch.
    stage_weights: Mutex<HashMap<usize, (Vec<TensorId>, StageWeights)>>,
    /// `U` and the fixed token table of a subspace model.
    subspace: Option<Arc<Subspace>>,
    /// Accumulated gradients, in micro-batch order.
    grads: Grads,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("pieces", &self.pieces)
            .field("dtype", &self.dtype)
            .field("step", &self.step)
            .finish_non_exhaustive()
    }
}

fn check_pieces(cfg: &ModelConfig, pieces: &[Piece]) -> Result<Vec<Piece>> {
    cfg.validate()?;
    if pieces.is_empty() {
        return Err(Error::Piece("a shard needs at least one piece".into()));
    }
    let mut sorted = pieces.to_vec();
    sorted.sort_by_key(Piece::order);
    for w in sorted.windows(2) {
        if w[0] == w[1] {
            return Err(Error::Piece(format!("{:?} given twice", w[0])));
        }
    }
    let mut last_end = 0;
    for p in &sorted {
        if let Piece::Stage { layers, index } = p {
            if layers.is_empty() || layers.end > cfg.num_hidden_layers {
                return Err(Error::Piece(format!(
                    "stage {index} layers {layers:?} not a non-empty part of 0..{}",
                    cfg.num_hidden_layers
                )));
            }
            if layers.start < last_end {
                return Err(Error::Piece(format!(
                    "stage {index} layers {layers:?} overlap"
                )));
            }
            last_end = layers.end;
        }
    }
    let has = |q: &Piece| sorted.contains(q);
    if cfg.tie_word_embeddings && has(&Piece::Head) != has(&Piece::Embedding) {
        return Err(Error::Piece(
            "with tied embeddings the embedding and head must be in the same shard".into(),
        ));
    }
    Ok(sorted)
}

impl Shard {
    /// Builds `pieces` with weights initialised from `seed` (see [`init_values`]).
    /// `dtype` is F32 for training; F64 exists for gradient checks.
    pub fn new(
        cfg: &ModelConfig,
        pieces: &[Piece],
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let pieces = check_pieces(cfg, pieces)?;
        let mut tensors = HashMap::new();
        for p in &pieces {
            for (name, shape) in p.parameters(cfg) {
                let n = shape.iter().product();
                let vals = init_values(cfg, seed, &name, n);
                let t = Tensor::from_vec(vals, shape, device)?.to_dtype(dtype)?;
                tensors.insert(name, t);
            }
        }
        Self::from_tensors(cfg, &pieces, &tensors, dtype, device)
    }

    /// Builds `pieces` from named tensors (HF names; e.g. a checkpoint or another shard's
    /// [`Shard::tensors`]). Every parameter must be present with its exact shape and a float
    /// dtype (converted to `dtype`); extra names are ignored so a whole checkpoint can feed one
    /// stage. The tensors are copied, never aliased.
    pub fn from_tensors(
        cfg: &ModelConfig,
        pieces: &[Piece],
        tensors: &HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let pieces = check_pieces(cfg, pieces)?;
        let subspace = Subspace::new(cfg)?.map(Arc::new);
        // A materialized checkpoint of a subspace model goes back to its parameters.
        let tensors = &crate::subspace::from_materialized(cfg, tensors)?;
        if !matches!(dtype, DType::F32 | DType::F64) {
            return Err(Error::Input(format!(
                "shard dtype {dtype:?} (f32 or f64 only)"
            )));
        }
        let mut params = Vec::new();
        let mut by_name = HashMap::new();
        for p in &pieces {
            for (name, shape) in p.parameters(cfg) {
                let t = tensors
                    .get(&name)
                    .ok_or_else(|| Error::State(format!("missing tensor {name}")))?;
                if t.dims() != shape.as_slice() {
                    return Err(Error::State(format!(
                        "{name}: shape {:?}, expected {shape:?}",
                        t.dims()
                    )));
                }
                if !t.dtype().is_float() {
                    return Err(Error::State(format!(
                        "{name}: dtype {:?} is not float",
                        t.dtype()
                    )));
                }
                let var = Var::from_tensor(&t.to_device(device)?.to_dtype(dtype)?.copy()?)?;
                by_name.insert(name.clone(), params.len());
                params.push(Param {
                    name,
                    shape,
                    var,
                    m: vec![],
                    v: vec![],
                });
            }
        }
        let max_len = cfg.max_position_embeddings;
        let grads = Grads::new(params.len());
        Ok(Self {
            rope: RopeTables::new(cfg.head_dim(), max_len, cfg.rope_theta),
            cfg: cfg.clone(),
            pieces,
            params,
            by_name,
            dtype,
            device: device.clone(),
            step: 0,
            stage_weights: Mutex::new(HashMap::new()),
            subspace,
            grads,
        })
    }

    /// `U` and the fixed token table when the model is a subspace model: what a stage boundary
    /// projects onto and lifts from.
    pub fn subspace(&self) -> Option<Arc<Subspace>> {
        self.subspace.clone()
    }

    /// The whole model's configuration (the shard holds only its pieces of it).
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The pieces held, in canonical order (embedding, stages by layer, head).
    pub fn pieces(&self) -> &[Piece] {
        &self.pieces
    }

    /// The dtype its weights are stored and computed in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device its tensors live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Optimizer steps taken (AdamW's bias correction counter).
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Parameter names and shapes in the stable order: pieces in canonical order, each piece's
    /// [`Piece::parameters`] order.
    pub fn parameter_names(&self) -> Vec<(String, Vec<usize>)> {
        self.params
            .iter()
            .map(|p| (p.name.clone(), p.shape.clone()))
            .collect()
    }

    /// Total number of scalar parameters held.
    pub fn num_parameters(&self) -> usize {
        self.params.iter().map(|p| p.var.elem_count()).sum()
    }

    /// The current weights by HF name (cheap clones sharing storage; do not mutate).
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.params
            .iter()
            .map(|p| (p.name.clone(), p.var.as_tensor().clone()))
            .collect()
    }

    fn piece_index(&self, want: impl Fn(&Piece) -> bool, what: &str) -> Result<usize> {
        self.pieces
            .iter()
            .position(want)
            .ok_or_else(|| Error::Piece(format!("this shard does not hold {what}")))
    }

    fn w(&self, name: &str) -> Result<&Var> {
        self.by_name
            .get(name)
            .map(|&i| &self.params[i].var)
            .ok_or_else(|| Error::Piece(format!("no parameter {name}")))
    }

    fn piece_vars(&self, piece: usize) -> Vec<Var> {
        let mut names: Vec<String> = self.pieces[piece]
            .parameters(&self.cfg)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        if self.pieces[piece] == Piece::Head && self.cfg.tie_word_embeddings {
            names.push("model.embed_tokens.weight".into());
        }
        names
            .iter()
            .map(|n| self.params[self.by_name[n]].var.clone())
            .collect()
    }

    fn check_hidden(&self, x: &Tensor) -> Result<(usize, usize)> {
        let (b, t, h) = x.dims3().map_err(|_| {
            Error::Input(format!(
                "hidden states must be (batch, seq, hidden), got {:?}",
                x.dims()
            ))
        })?;
        if h != self.cfg.hidden_size || b == 0 || t == 0 {
            return Err(Error::Input(format!("hidden states shape {:?}", x.dims())));
        }
        if t > self.cfg.max_position_embeddings {
            return Err(Error::Input(format!(
                "sequence length {t} > max_position_embeddings {}",
                self.cfg.max_position_embeddings
            )));
        }
        if x.dtype() != self.dtype {
            return Err(Error::Input(format!(
                "dtype {:?}, shard is {:?}",
                x.dtype(),
                self.dtype
            )));
        }
        Ok((b, t))
    }

    fn check_tokens(&self, tokens: &[u32], batch: usize, seq: usize) -> Result<()> {
        if batch == 0 || seq == 0 || tokens.len() != batch * seq {
            return Err(Error::Input(format!(
                "{} tokens for batch {batch} x seq {seq}",
                tokens.len()
            )));
        }
        if seq > self.cfg.max_position_embeddings {
            return Err(Error::Input(format!(
                "sequence length {seq} > max_position_embeddings {}",
                self.cfg.max_position_embeddings
            )));
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            return Err(Error::Input(format!(
                "token {t} >= vocab_size {}",
                self.cfg.vocab_size
            )));
        }
        Ok(())
    }

    /// Stage `index` forward: hidden `(batch, seq, hidden)` -> hidden of the same shape.
    pub fn stage_forward(&self, index: usize, x: &Tensor) -> Result<(Tensor, ForwardCtx)> {
        let piece = self.piece_index(
            |p| matches!(p, Piece::Stage { index: i, .. } if *i == index),
            &format!("stage {index}"),
        )?;
        let (b, t) = self.check_hidden(x)?;
        let Piece::Stage { layers, .. } = self.pieces[piece].clone() else {
            unreachable!()
        };
        let geom = Geom {
            batch: b,
            seq: t,
            hidden: self.cfg.hidden_size,
            heads: self.cfg.num_attention_heads,
            kv_heads: self.cfg.num_kv_heads(),
            head_dim: self.cfg.head_dim(),
            inter: self.cfg.intermediate_size,
            eps: self.cfg.rms_norm_eps,
        };
        let vars = self.piece_vars(piece);
        let (y, pass) = match self.dtype {
            DType::F32 => self.stage_pass::<f32>(geom, piece, &vars, layers, x)?,
            _ => self.stage_pass::<f64>(geom, piece, &vars, layers, x)?,
        };
        let ctx = ForwardCtx {
            piece,
            out_dims: y.dims().to_vec(),
            vars,
            pass: Pass::Layers(pass),
            mb: None,
        };
        Ok((y, ctx))
    }

    fn stage_pass<T: IntoPass>(
        &self,
        geom: Geom,
        piece: usize,
        vars: &[Var],
        layers: Range<usize>,
        x: &Tensor,
    ) -> Result<(Tensor, StagePass)> {
        let (x, weights) = timed("stage.convert", || -> Result<_> {
            let x = x.flatten_all()?.to_vec1::<T>()?;
            let weights = self.stage_weights::<T>(piece, vars, layers.clone())?;
            Ok((x, weights))
        })?;
        let (y, saved) = layer::stage_forward(geom, &self.rope, layers.start, weights, x);
        let y = timed("stage.convert", || {
            Tensor::from_vec(y, (geom.batch, geom.seq, geom.hidden), &self.device)
        })?;
        Ok((y, T::into_pass(saved)))
    }

    /// The flat weights of stage piece `piece` (layers `layers`, variables `vars`): the cached
    /// copy if it was made from these very variables, else a new one (the stale copy is freed
    /// first, so a stage never holds two).
    fn stage_weights<T: IntoPass>(
        &self,
        piece: usize,
        vars: &[Var],
        layers: Range<usize>,
    ) -> Result<Arc<[LayerWeights<T>]>> {
        let ids: Vec<TensorId> = vars.iter().map(|v| v.as_tensor().id()).collect();
        let mut cache = self.stage_weights.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = cache
            .get(&piece)
            .filter(|(k, _)| *k == ids)
            .and_then(|(_, w)| T::unwrap(w))
        {
            return Ok(w);
        }
        cache.remove(&piece);
        let w: Arc<[LayerWeights<T>]> = layers
            .map(|l| self.layer_weights::<T>(l))
            .collect::<Result<Vec<_>>>()?
            .into();
        cache.insert(piece, (ids, T::wrap(w.clone())));
        Ok(w)
    }

    /// Drops the cached flat weights (they are stale once a weight is replaced; freeing them
    /// before the replacement keeps the peak down).
    fn forget_stage_weights(&mut self) {
        self.stage_weights
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Layer `l`'s weights as flat vectors, the projections reading one input stacked.
    fn layer_weights<T: Float>(&self, l: usize) -> Result<LayerWeights<T>> {
        let get = |names: &[&str]| -> Result<Vec<T>> {
            let mut v = Vec::new();
            for n in names {
                let w = self.w(&format!("model.layers.{l}.{n}.weight"))?;
                v.extend(w.flatten_all()?.to_vec1::<T>()?);
            }
            Ok(v)
        };
        // A subspace model's residual writes run on their materialized U·A.
        let write = |n: &str| match &self.subspace {
            None => get(&[n]),
            Some(sub) => Ok(sub
                .expand(self.w(&format!("model.layers.{l}.{n}.subspace"))?)?
                .flatten_all()?
                .to_vec1::<T>()?),
        };
        Ok(LayerWeights {
            norm1: get(&["input_layernorm"])?,
            qkv: get(&["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"])?,
            o: write("self_attn.o_proj")?,
            norm2: get(&["post_attention_layernorm"])?,
            gate_up: get(&["mlp.gate_proj", "mlp.up_proj"])?,
            down: write("mlp.down_proj")?,
        })
    }

    /// Backward of an embedding or stage forward: `grad_out` is the gradient of the loss with
    /// respect to that forward's output. Adds the parameter gradients into the accumulators and
    /// returns the gradient of the input (`None` for the embedding, whose input is tokens).
    pub fn backward(&mut self, ctx: ForwardCtx, grad_out: &Tensor) -> Result<Option<Tensor>> {
        if self.pieces.get(ctx.piece) == Some(&Piece::Head) {
            return Err(Error::Piece("use head_backward for the head".into()));
        }
        self.check_grad_out(&ctx, grad_out)?;
        match &ctx.pass {
            Pass::Embed(tokens) => {
                self.check_fresh(&ctx)?;
                self.embed_backward(&ctx, tokens, grad_out)?;
                Ok(None)
            }
            Pass::Head(_) => Err(Error::Piece("use head_backward for the head".into())),
            Pass::Layers(pass) => {
                let (dx, grads) = self.layers_backward(&ctx, pass, grad_out, true)?;
                let adds = grads
                    .into_iter()
                    .map(|(name, g)| (self.by_name[&name], g))
                    .collect();
                timed("grad.accumulate", || {
                    self.add_grads(ctx.mb, ctx.piece, adds)
                })?;
                Ok(Some(dx))
            }
        }
    }

    fn check_grad_out(&self, ctx: &ForwardCtx, grad_out: &Tensor) -> Result<()> {
        if grad_out.dims() != ctx.out_dims.as_slice() || grad_out.dtype() != self.dtype {
            return Err(Error::Input(format!(
                "output grad {:?} {:?}, expected {:?} {:?}",
                grad_out.dims(),
                grad_out.dtype(),
                ctx.out_dims,
                self.dtype
            )));
        }
        Ok(())
    }

    /// The input gradient of a stage pass and, with `weights`, its parameter gradients by name.
    fn layers_backward(
        &self,
        ctx: &ForwardCtx,
        pass: &StagePass,
        grad_out: &Tensor,
        weights: bool,
    ) -> Result<(Tensor, Vec<(String, Tensor)>)> {
        if ctx.piece >= self.pieces.len() {
            return Err(Error::Piece("context from another shard".into()));
        }
        self.check_fresh(ctx)?;
        let g = timed("stage.convert", || grad_out.flatten_all())?;
        match pass {
            StagePass::F32(s) => self.typed_backward(s, g.to_vec1::<f32>()?, weights),
            StagePass::F64(s) => self.typed_backward(s, g.to_vec1::<f64>()?, weights),
        }
    }

    fn typed_backward<T: Float>(
        &self,
        saved: &layer::StageSaved<T>,
        grad_out: Vec<T>,
        weights: bool,
    ) -> Result<(Tensor, Vec<(String, Tensor)>)> {
        let (b, t, h) = saved.dims();
        let (dx, grads) = layer::stage_backward(saved, grad_out, weights);
        timed("stage.convert", || {
            let mut named = Vec::with_capacity(grads.len() * 9);
            for (l, g) in grads {
                let piece = Piece::Stage {
                    index: 0,
                    layers: l..l + 1,
                };
                let names = piece.parameters(&self.cfg);
                let hf = piece.hf_parameters(&self.cfg);
                for (((name, _), (_, hf_shape)), g) in names.into_iter().zip(hf).zip(g) {
                    let g = Tensor::from_vec(g, hf_shape, &self.device)?;
                    // The gradient of A in W = U·A is Uᵀ·grad(W).
                    let g = match &self.subspace {
                        Some(sub) if name.ends_with(".subspace") => sub.reduce(&g)?,
                        _ => g,
                    };
                    named.push((name, g));
                }
            }
            Ok((Tensor::from_vec(dx, (b, t, h), &self.device)?, named))
        })
    }

    /// [`Shard::backward`] without touching the accumulated parameter gradients: returns only the
    /// gradient of the input. A swarm stage uses it for a micro-batch retried after this stage
    /// already counted it, so the retry reaches earlier stages without counting it twice here. The
    /// input gradient is bitwise the one [`Shard::backward`] returns.
    pub fn backward_input_only(
        &self,
        ctx: ForwardCtx,
        grad_out: &Tensor,
    ) -> Result<Option<Tensor>> {
        if ctx.piece >= self.pieces.len() || self.pieces[ctx.piece] == Piece::Head {
            return Err(Error::Piece(
                "backward_input_only needs a stage or embedding context".into(),
            ));
        }
        self.check_grad_out(&ctx, grad_out)?;
        match &ctx.pass {
            Pass::Embed(_) => Ok(None),
            Pass::Head(_) => Err(Error::Piece("a head context has no output gradient".into())),
            Pass::Layers(pass) => Ok(Some(self.layers_backward(&ctx, pass, grad_out, false)?.0)),
        }
    }

    /// Errors if the weights changed since `ctx`'s forward (its gradients would be wrong).
    fn check_fresh(&self, ctx: &ForwardCtx) -> Result<()> {
        let current = self.piece_vars(ctx.piece);
        let fresh = current.len() == ctx.vars.len()
            && current
                .iter()
                .zip(&ctx.vars)
                .all(|(a, b)| a.as_tensor().id() == b.as_tensor().id());
        if fresh {
            Ok(())
        } else {
            Err(Error::StaleContext)
        }
    }

    /// The weights, flattened in parameter order, as f32 (the layout of [`Shard::grads_flat`]).
    pub fn weights_flat(&self) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(self.num_parameters());
        for p in &self.params {
            with_f32(p.var.as_tensor(), |w| out.extend_from_slice(w))?;
        }
        Ok(out)
    }

    /// Overwrites the weights from a flat f32 vector in parameter order (an outer optimizer's
    /// result); the AdamW moments and the step count stay. Contexts from earlier forwards
    /// become stale, as after [`Shard::optimizer_step`].
    pub fn set_weights_flat(&mut self, flat: &[f32]) -> Result<()> {
        if flat.len() != self.num_parameters() {
            return Err(Error::Input(format!(
                "{} weight values for {} parameters",
                flat.len(),
                self.num_parameters()
            )));
        }
        let mut off = 0;
        for p in &mut self.params {
            let n = p.var.elem_count();
            p.var = new_var(
                flat[off..off + n].to_vec(),
                &p.shape,
                &self.device,
                self.dtype,
            )?;
            off += n;
        }
        Ok(())
    }

    /// One AdamW step on every parameter with gradient `clip_scale * grad` (see [`clip_scale`])
    /// and learning rate `lr`. Math in f32 element by element, so the result is bitwise
    /// reproducible. Does not zero the gradients. Contexts from earlier forwards become stale.
    pub fn optimizer_step(&mut self, hp: &AdamW, lr: f64, clip_scale: f64) -> Result<()> {
        self.forget_stage_weights();
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - hp.beta1.powi(t);
        let bc2 = 1.0 - hp.beta2.powi(t);
        let (b1, b2) = (hp.beta1 as f32, hp.beta2 as f32);
        let step_size = (lr / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let eps = hp.eps as f32;
        let scale = clip_scale as f32;
        for (i, p) in self.params.iter_mut().enumerate() {
            let n = p.var.elem_count();
            let decay = if p.shape.len() >= 2 {
                (1.0 - lr * hp.weight_decay) as f32
            } else {
                1.0
            };
            if p.m.is_empty() {
                p.m = vec![0.0; n];
                p.v = vec![0.0; n];
            }
            let step = AdamWStep {
                b1,
                b2,
                step_size,
                bc2_sqrt,
                eps,
                scale,
                decay,
            };
            let g = self.grads.get(i)?;
            let (m, v) = (&mut p.m, &mut p.v);
            let w = with_f32(p.var.as_tensor(), |w| match &g {
                Some(g) => with_f32(g, |g| step.apply(w, Some(g), m, v)),
                None => Ok(step.apply(w, None, m, v)),
            })??;
            // A new variable rather than an in-place write: outstanding contexts keep the
            // weights they were computed with and are detected as stale.
            p.var = new_var(w, &p.shape, &self.device, self.dtype)?;
        }
        Ok(())
    }

    /// BLAKE3 over the parameters in order (name, shape, little-endian f32 values), so replicas
    /// can check they hold identical weights.
    pub fn weights_digest(&self) -> Result<[u8; 32]> {
        let mut h = blake3::Hasher::new();
        for p in &self.params {
            h.update(p.name.as_bytes());
            h.update(&[0]);
            for d in &p.shape {
                h.update(&(*d as u64).to_le_bytes());
            }
            with_f32(p.var.as_tensor(), |w| hash_f32(&mut h, w))?;
        }
        Ok(*h.finalize().as_bytes())
    }

    /// The full training state (weights, AdamW moments, step) as safetensors bytes: each weight
    /// under its HF name, moments under `optimizer.exp_avg.{name}` / `optimizer.exp_avg_sq.{name}`,
    /// all f32, and metadata `format` = [`STATE_FORMAT`], `step`. A replica sends this to a peer
    /// joining mid-run; [`Shard::import_state`] restores it exactly.
    pub fn export_state(&self) -> Result<Vec<u8>> {
        self.export(true)
    }

    /// [`Shard::export_state`] without the moments (metadata `moments` = `0`): what a
    /// recomputation of the passes needs, a third of the bytes. [`Shard::import_weights`] reads it.
    pub fn export_weights(&self) -> Result<Vec<u8>> {
        self.export(false)
    }

    fn export(&self, moments: bool) -> Result<Vec<u8>> {
        let mut bufs: Vec<(String, Vec<usize>, Vec<u8>)> =
            Vec::with_capacity(3 * self.params.len());
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        for p in &self.params {
            let w = with_f32(p.var.as_tensor(), bytes)?;
            bufs.push((p.name.clone(), p.shape.clone(), w));
            if !moments {
                continue;
            }
            let zeros;
            let (m, v) = if p.m.is_empty() {
                zeros = vec![0f32; p.var.elem_count()];
                (&zeros, &zeros)
            } else {
                (&p.m, &p.v)
            };
            bufs.push((
                format!("optimizer.exp_avg.{}", p.name),
                p.shape.clone(),
                bytes(m),
            ));
            bufs.push((
                format!("optimizer.exp_avg_sq.{}", p.name),
                p.shape.clone(),
                bytes(v),
            ));
        }
        let views = bufs
            .iter()
            .map(|(n, shape, b)| {
                let view =
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                        .map_err(|e| Error::State(e.to_string()))?;
                Ok((n.clone(), view))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut meta = HashMap::from([
            ("format".to_string(), STATE_FORMAT.to_string()),
            ("step".to_string(), self.step.to_string()),
        ]);
        if !moments {
            meta.insert("moments".to_string(), "0".to_string());
        }
        safetensors::serialize(views, Some(meta)).map_err(|e| Error::State(e.to_string()))
    }

    /// Replaces weights, moments and step with `bytes` from [`Shard::export_state`] of a shard
    /// holding the same pieces. The bytes are untrusted: names must match exactly (no missing,
    /// no extra), shapes and dtype (f32) must match, values must be finite; on any error the
    /// shard is unchanged. Gradients are cleared; earlier contexts become stale.
    pub fn import_state(&mut self, bytes: &[u8]) -> Result<()> {
        self.import(bytes, true)
    }

    /// Replaces weights and step with `bytes` from [`Shard::export_weights`], checked as in
    /// [`Shard::import_state`]; the moments are cleared (such a shard recomputes passes; its
    /// optimizer state is not the exporter's). A full export is refused: the caller asked for
    /// weights, and the two must not be confused.
    pub fn import_weights(&mut self, bytes: &[u8]) -> Result<()> {
        self.import(bytes, false)
    }

    fn import(&mut self, bytes: &[u8], moments: bool) -> Result<()> {
        use safetensors::SafeTensors;
        let bad = |m: String| Error::State(m);
        let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
        let info = meta.metadata().clone().unwrap_or_default();
        if info.get("format").map(String::as_str) != Some(STATE_FORMAT) {
            return Err(bad(format!(
                "format is {:?}, expected {STATE_FORMAT}",
                info.get("format")
            )));
        }
        let step: u64 = info
            .get("step")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("missing or invalid step".into()))?;
        let weights_only = info.get("moments").map(String::as_str) == Some("0");
        if weights_only == moments {
            return Err(bad(format!(
                "a {} export where {} was expected",
                if weights_only { "weights-only" } else { "full" },
                if moments {
                    "the full state"
                } else {
                    "weights only"
                }
            )));
        }
        let per_param = if moments { 3 } else { 1 };
        let st = SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
        if st.len() != per_param * self.params.len() {
            return Err(bad(format!(
                "{} tensors, expected {}",
                st.len(),
                per_param * self.params.len()
            )));
        }
        let read = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
            let t = st
                .tensor(name)
                .map_err(|_| bad(format!("missing tensor {name}")))?;
            if t.dtype() != safetensors::Dtype::F32 || t.shape() != shape {
                return Err(bad(format!(
                    "{name}: {:?} {:?}, expected F32 {shape:?}",
                    t.dtype(),
                    t.shape()
                )));
            }
            // safetensors has checked that the data is exactly shape x 4 bytes.
            let v: Vec<f32> = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            if v.iter().any(|x| !x.is_finite()) {
                return Err(bad(format!("{name}: non-finite value")));
            }
            Ok(v)
        };
        let mut new = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let w = read(&p.name, &p.shape)?;
            let (m, v) = if moments {
                (
                    read(&format!("optimizer.exp_avg.{}", p.name), &p.shape)?,
                    read(&format!("optimizer.exp_avg_sq.{}", p.name), &p.shape)?,
                )
            } else {
                (Vec::new(), Vec::new())
            };
            if v.iter().any(|&x| x < 0.0) {
                return Err(bad(format!("{}: negative second moment", p.name)));
            }
            new.push((new_var(w, &p.shape, &self.device, self.dtype)?, m, v));
        }
        self.forget_stage_weights();
        for (p, (var, m, v)) in self.params.iter_mut().zip(new) {
            p.var = var;
            p.m = m;
            p.v = v;
        }
        self.zero_grads();
        self.step = step;
        Ok(())
    }

    /// The AdamW moments by name, `{name}.exp_avg` and `{name}.exp_avg_sq` (f32, the parameter's
    /// shape), as checkpoints store them beside the weights; empty before the first step.
    pub fn optimizer_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for p in &self.params {
            if p.m.is_empty() {
                continue;
            }
            let shape = p.shape.as_slice();
            let m = Tensor::from_slice(&p.m, shape, &self.device)?;
            let v = Tensor::from_slice(&p.v, shape, &self.device)?;
            out.insert(format!("{}.exp_avg", p.name), m);
            out.insert(format!("{}.exp_avg_sq", p.name), v);
        }
        Ok(out)
    }

    /// Restores the optimizer step counter and moments (from [`Shard::optimizer_tensors`] names;
    /// extra names are ignored so one checkpoint can feed several shards). With `step == 0` the
    /// moments may be absent; otherwise every parameter's pair must be present with its shape.
    pub fn set_optimizer_state(
        &mut self,
        step: u64,
        moments: &HashMap<String, Tensor>,
    ) -> Result<()> {
        let mut new = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let get = |suffix: &str| -> Result<Option<Vec<f32>>> {
                let name = format!("{}.{suffix}", p.name);
                match moments.get(&name) {
                    None if step == 0 => Ok(None),
                    None => Err(Error::State(format!("missing optimizer tensor {name}"))),
                    Some(t) if t.dims() != p.shape.as_slice() => Err(Error::State(format!(
                        "{name}: shape {:?}, expected {:?}",
                        t.dims(),
                        p.shape
                    ))),
                    Some(t) => {
                        let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                        if v.iter().any(|x| !x.is_finite()) {
                            return Err(Error::State(format!("{name}: non-finite value")));
                        }
                        Ok(Some(v))
                    }
                }
            };
            let (m, v) = (get("exp_avg")?, get("exp_avg_sq")?);
            if m.is_some() != v.is_some() {
                return Err(Error::State(format!("{}: only one AdamW moment", p.name)));
            }
            new.push((m.unwrap_or_default(), v.unwrap_or_default()));
        }
        for (p, (m, v)) in self.params.iter_mut().zip(new) {
            p.m = m;
            p.v = v;
        }
        self.step = step;
        Ok(())
    }
}

/// The `format` metadata of [`Shard::export_state`] bytes.
pub const STATE_FORMAT: &str = "swarm-shard-state/1";

/// Feeds `v` to `h` as little-endian bytes, in blocks: the same digest as one `update` per value,
/// which cost ~20 ns a value (a hasher call per 4 bytes), 16 ms a digest for a 0.8 M-parameter
/// stage, several times a step on every replica.
pub fn hash_f32(h: &mut blake3::Hasher, v: &[f32]) {
    const BLOCK: usize = 4096;
    let mut buf = [0u8; 4 * BLOCK];
    for chunk in v.chunks(BLOCK) {
        for (b, x) in buf.chunks_exact_mut(4).zip(chunk) {
            b.copy_from_slice(&x.to_le_bytes());
        }
        h.update(&buf[..4 * chunk.len()]);
    }
}

/// A variable holding `w` (f32 values of a parameter of shape `shape`) in `dtype`. In f32 the
/// vector becomes the variable's storage: `Var::from_tensor` would copy it once more (the
/// optimizer step made one such copy of every weight per step).
fn new_var(w: Vec<f32>, shape: &[usize], device: &Device, dtype: DType) -> Result<Var> {
    Ok(if dtype == DType::F32 {
        Var::from_vec(w, shape, device)?
    } else {
        Var::from_tensor(&Tensor::from_vec(w, shape, device)?.to_dtype(dtype)?)?
    })
}

/// `sum_i x[i]^2` in f64, one running sum in index order: a parameter's share of
/// [`Shard::grad_sq_norm`]. The sync's norm from a flat gradient uses it too, so both give the
/// same bits (the global clip, and so every weight, depends on them).
pub fn sq_sum_f64(v: &[f32]) -> f64 {
    v.iter().map(|&x| f64::from(x) * f64::from(x)).sum()
}

/// Runs `f` on the f32 values of `t`: borrowed where they lie for a contiguous f32 CPU tensor
/// (the optimizer's weights and gradients, the frames a stage encodes), else a converted copy.
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    if t.dtype() == DType::F32 && t.is_contiguous() && t.device().is_cpu() {
        head::with_slice::<f32, _>(t, f)
    } else {
        Ok(f(&t
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?))
    }
}

#[cfg(test)]
mod digest_tests {
    use super::hash_f32;

    #[test]
    fn hash_f32_is_the_per_value_digest() {
        // Lengths around the block size, with values whose bytes differ.
        for n in [0usize, 1, 7, 4095, 4096, 4097, 10_000] {
            let v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 1e3).collect();
            let mut one = blake3::Hasher::new();
            for x in &v {
                one.update(&x.to_le_bytes());
            }
            let mut blocks = blake3::Hasher::new();
            hash_f32(&mut blocks, &v);
            assert_eq!(one.finalize(), blocks.finalize(), "n = {n}");
        }
    }
}
