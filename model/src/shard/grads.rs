//! A shard's parameter gradients, summed in micro-batch order whatever order the backwards come in.
//!
//! Floating-point addition is not associative, so a sum in arrival order has bits that depend on
//! which micro-batch's backward came back first; AdamW, scale-free per coordinate, turns a
//! last-bit difference in a near-zero coordinate into a full-size step. A backward tagged with its
//! micro-batch ([`ForwardCtx::micro_batch`](super::ForwardCtx::micro_batch)) is therefore added in
//! micro-batch order: the gradients of micro-batch `next` are folded into the sum as soon as every
//! piece of the shard has added its part, then `next + 1`'s if it is there, and so on. Micro-batches
//! that come early (or that this shard never folds, because another replica has the ones between)
//! wait as one gradient copy each and are added, in order, when the sum is read. So the sum is always
//! the one over the micro-batches received, in ascending order, with each micro-batch's parts in
//! call order (the head's before the embedding's, as the single-process run adds a tied weight's):
//! bitwise the single-process run's sum when one shard sees every micro-batch.
//!
//! An untagged backward counts as micro-batch `next`, so a caller that runs micro-batches one after
//! another gets the plain running sum in call order.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};

use super::Shard;
use crate::{Error, Result};

/// Accumulated gradients of a shard's parameters.
pub(super) struct Grads {
    /// Per parameter: the sum of the micro-batches folded so far (`None`: zero).
    sum: Vec<Option<Tensor>>,
    /// The micro-batch folded next.
    next: u64,
    /// Micro-batches not folded yet, by number.
    pending: BTreeMap<u64, Pending>,
}

/// One micro-batch's gradients waiting for their turn.
#[derive(Default)]
struct Pending {
    /// (parameter index, gradient), in the order they were added.
    adds: Vec<(usize, Tensor)>,
    /// The pieces (indices in the shard) that have added theirs.
    pieces: Vec<usize>,
}

fn add_into(acc: &mut Option<Tensor>, g: Tensor) -> Result<()> {
    *acc = Some(match acc.take() {
        Some(a) => (a + g)?,
        None => g,
    });
    Ok(())
}

impl Grads {
    pub(super) fn new(params: usize) -> Grads {
        Grads {
            sum: vec![None; params],
            next: 0,
            pending: BTreeMap::new(),
        }
    }

    /// Adds piece `piece`'s parameter gradients `adds` for micro-batch `mb` (`None`: the next one
    /// to fold); `pieces` is how many pieces the shard holds.
    fn add(
        &mut self,
        mb: Option<u64>,
        piece: usize,
        pieces: usize,
        adds: Vec<(usize, Tensor)>,
    ) -> Result<()> {
        let e = self.pending.entry(mb.unwrap_or(self.next)).or_default();
        e.adds.extend(adds);
        if !e.pieces.contains(&piece) {
            e.pieces.push(piece);
        }
        while self
            .pending
            .get(&self.next)
            .is_some_and(|e| e.pieces.len() == pieces)
        {
            let e = self.pending.remove(&self.next).expect("checked");
            for (i, g) in e.adds {
                add_into(&mut self.sum[i], g)?;
            }
            self.next += 1;
        }
        Ok(())
    }

    /// Parameter `i`'s gradient: the folded sum, then the waiting micro-batches in order.
    pub(super) fn get(&self, i: usize) -> Result<Option<Tensor>> {
        let mut acc = self.sum[i].clone();
        for e in self.pending.values() {
            for (j, g) in &e.adds {
                if *j == i {
                    add_into(&mut acc, g.clone())?;
                }
            }
        }
        Ok(acc)
    }

    fn clear(&mut self) {
        self.sum.iter_mut().for_each(|g| *g = None);
        self.pending.clear();
        self.next = 0;
    }
}

impl Shard {
    /// Adds a backward's parameter gradients (see the module docs for the order).
    pub(super) fn add_grads(
        &mut self,
        mb: Option<u64>,
        piece: usize,
        adds: Vec<(usize, Tensor)>,
    ) -> Result<()> {
        let pieces = self.pieces.len();
        self.grads.add(mb, piece, pieces, adds)
    }

    /// Parameter `i`'s accumulated gradient (`None`: zero).
    pub(super) fn grad(&self, i: usize) -> Result<Option<Tensor>> {
        self.grads.get(i)
    }

    /// Micro-batches whose gradients wait to be added in order (memory: one gradient copy each).
    pub fn pending_micro_batches(&self) -> usize {
        self.grads.pending.len()
    }

    /// Forgets all accumulated gradients; the next micro-batch folded is 0 again.
    pub fn zero_grads(&mut self) {
        self.grads.clear();
    }

    /// The accumulated gradients, flattened in parameter order, as f32 (zeros where none).
    pub fn grads_flat(&self) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(self.num_parameters());
        for (i, p) in self.params.iter().enumerate() {
            match self.grad(i)? {
                Some(g) => super::with_f32(&g, |g| out.extend_from_slice(g))?,
                None => out.resize(out.len() + p.var.elem_count(), 0.0),
            }
        }
        Ok(out)
    }

    /// Overwrites the accumulated gradients from a flat f32 vector in parameter order (e.g. the
    /// average over replicas); micro-batches still waiting are dropped with the old sum.
    pub fn set_grads_flat(&mut self, flat: &[f32]) -> Result<()> {
        if flat.len() != self.num_parameters() {
            return Err(Error::Input(format!(
                "{} gradient values for {} parameters",
                flat.len(),
                self.num_parameters()
            )));
        }
        let mut off = 0;
        let mut sum = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let n = p.var.elem_count();
            let g = Tensor::from_slice(&flat[off..off + n], p.shape.as_slice(), &self.device)?
                .to_dtype(self.dtype)?;
            sum.push(Some(g));
            off += n;
        }
        self.grads.sum = sum;
        self.grads.pending.clear();
        Ok(())
    }

    /// Sum of squared accumulated gradients, in f64, in parameter order (so every replica of
    /// the same shard gets the same bits). The caller sums over shards for global clipping.
    pub fn grad_sq_norm(&self) -> Result<f64> {
        let mut total = 0f64;
        for i in 0..self.params.len() {
            if let Some(g) = self.grad(i)? {
                // Summed where the values lie (no f64 copy of every gradient), in the same order
                // and precision as before: the norm and the clip factor keep their bits.
                total += match g.dtype() {
                    DType::F64 => g
                        .flatten_all()?
                        .to_vec1::<f64>()?
                        .iter()
                        .map(|x| x * x)
                        .sum(),
                    _ => super::with_f32(&g, super::sq_sum_f64)?,
                };
            }
        }
        Ok(total)
    }
}
