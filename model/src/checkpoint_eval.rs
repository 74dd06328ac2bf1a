//! Inference on a loaded checkpoint: loss over token streams, last-position logits, and sampling,
//! on top of [`Model`] (whose forward is the training shard's, so evaluation runs exactly the code
//! that trains).

use std::collections::HashMap;

use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::checkpoint::Checkpoint;
use crate::{Corpus, Error, Model, ModelConfig};

/// A whole model held for inference.
pub struct Evaluator {
    model: Model,
}

/// Mean loss over some tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossSummary {
    /// Mean next-token cross-entropy in nats.
    pub loss: f64,
    /// Number of predicted tokens it averages over.
    pub tokens: usize,
}

impl Evaluator {
    /// Builds the model from named HF tensors (f32 on the CPU).
    pub fn new(cfg: &ModelConfig, tensors: &HashMap<String, Tensor>) -> Result<Self, Error> {
        Ok(Evaluator {
            model: Model::from_tensors(cfg, tensors)?,
        })
    }

    /// From a loaded checkpoint.
    pub fn from_checkpoint(ck: &Checkpoint) -> Result<Self, Error> {
        Self::new(&ck.config, &ck.tensors)
    }

    /// The model's shape.
    pub fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    /// Logits at the last position of `tokens` (the distribution of the next token).
    pub fn last_logits(&self, tokens: &[u32]) -> Result<Vec<f32>, Error> {
        if tokens.is_empty() {
            return Err(Error::Input("no tokens".into()));
        }
        let logits = self.model.logits(tokens, 1, tokens.len())?;
        Ok(logits.get(0)?.get(tokens.len() - 1)?.to_vec1::<f32>()?)
    }

    /// Mean next-token loss of `inputs -> targets`, `batch` rows of `seq` tokens.
    pub fn loss(
        &self,
        inputs: &[u32],
        targets: &[u32],
        batch: usize,
        seq: usize,
    ) -> Result<f64, Error> {
        if targets.len() != inputs.len() {
            return Err(Error::Input(format!(
                "{} targets for {} inputs",
                targets.len(),
                inputs.len()
            )));
        }
        self.model.loss(inputs, targets, batch, seq)
    }

    /// Mean loss of predicting `tokens[1..]` from their prefixes (None with fewer than 2 tokens).
    pub fn sequence_loss(&self, tokens: &[u32]) -> Result<Option<f64>, Error> {
        if tokens.len() < 2 {
            return Ok(None);
        }
        let n = tokens.len() - 1;
        self.loss(&tokens[..n], &tokens[1..], 1, n).map(Some)
    }

    /// Mean loss over all of `tokens` in consecutive windows of at most `seq_len` (capped by the
    /// model's context), `batch_size` windows per forward; `progress(done, total)` after each.
    pub fn stream_loss(
        &self,
        tokens: &[u32],
        seq_len: usize,
        batch_size: usize,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<LossSummary, Error> {
        let seq = seq_len.min(self.config().max_position_embeddings).max(1);
        let batch_size = batch_size.max(1);
        if tokens.len() < 2 {
            return Err(Error::Data(format!(
                "{} tokens: nothing to predict",
                tokens.len()
            )));
        }
        let windows: Vec<usize> = (0..tokens.len() - 1).step_by(seq).collect();
        let (mut sum, mut count) = (0.0, 0usize);
        let full = (tokens.len() - 1) / seq;
        // Full windows in batches, then the short tail window alone.
        for chunk in windows[..full].chunks(batch_size) {
            let mut inp = Vec::with_capacity(chunk.len() * seq);
            let mut tgt = Vec::with_capacity(chunk.len() * seq);
            for &s in chunk {
                inp.extend_from_slice(&tokens[s..s + seq]);
                tgt.extend_from_slice(&tokens[s + 1..s + seq + 1]);
            }
            sum += self.loss(&inp, &tgt, chunk.len(), seq)? * (chunk.len() * seq) as f64;
            count += chunk.len() * seq;
            progress(count, tokens.len() - 1);
        }
        if let Some(&s) = windows.get(full) {
            let n = tokens.len() - 1 - s;
            sum += self.loss(&tokens[s..s + n], &tokens[s + 1..], 1, n)? * n as f64;
            count += n;
            progress(count, tokens.len() - 1);
        }
        Ok(LossSummary {
            loss: sum / count as f64,
            tokens: count,
        })
    }

    /// Mean loss over the validation split of `corpus` (all of it once).
    pub fn val_loss(
        &self,
        corpus: &Corpus,
        seq_len: usize,
        batch_size: usize,
    ) -> Result<LossSummary, Error> {
        self.stream_loss(&corpus.val_tokens()?, seq_len, batch_size, |_, _| {})
    }

    /// Appends up to `max_new` sampled tokens to `prompt` and returns them; `on_token` sees each
    /// as it is drawn. Temperature 0 is greedy; otherwise softmax(logits / T) sampled from a
    /// ChaCha8 stream seeded by `seed`. The context is the last `max_position_embeddings` tokens.
    pub fn generate(
        &self,
        prompt: &[u32],
        max_new: usize,
        temperature: f64,
        seed: u64,
        mut on_token: impl FnMut(u32),
    ) -> Result<Vec<u32>, Error> {
        if prompt.is_empty() {
            return Err(Error::Input("empty prompt".into()));
        }
        if !(temperature >= 0.0 && temperature.is_finite()) {
            return Err(Error::Input(format!(
                "temperature {temperature} must be >= 0"
            )));
        }
        let ctx = self.config().max_position_embeddings;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut all = prompt.to_vec();
        let mut out = Vec::with_capacity(max_new);
        for _ in 0..max_new {
            let window = &all[all.len().saturating_sub(ctx)..];
            let logits = self.last_logits(window)?;
            let next = sample(&logits, temperature, &mut rng);
            on_token(next);
            out.push(next);
            all.push(next);
        }
        Ok(out)
    }
}

/// Draws a token from `logits`: argmax at temperature 0, else from softmax(logits / T).
pub fn sample(logits: &[f32], temperature: f64, rng: &mut impl Rng) -> u32 {
    let argmax = logits
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &x)| {
            if x > best.1 { (i, x) } else { best }
        })
        .0;
    if temperature == 0.0 {
        return argmax as u32;
    }
    let max = logits[argmax] as f64;
    let weights: Vec<f64> = logits
        .iter()
        .map(|&x| ((x as f64 - max) / temperature).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut u = rng.random::<f64>() * total;
    for (i, w) in weights.iter().enumerate() {
        u -= w;
        if u < 0.0 {
            return i as u32;
        }
    }
    argmax as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax_and_sampling_follows_the_distribution() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        assert_eq!(sample(&[0.1, 3.0, -1.0], 0.0, &mut rng), 1);
        // logits ln(1), ln(3): token 1 should come up about 3/4 of the time at T = 1.
        let logits = [0.0f32, 3f32.ln()];
        let n = 20_000;
        let ones = (0..n)
            .filter(|_| sample(&logits, 1.0, &mut rng) == 1)
            .count();
        let p = ones as f64 / n as f64;
        assert!((p - 0.75).abs() < 0.015, "{p}");
        // Low temperature sharpens towards the argmax.
        let ones = (0..n)
            .filter(|_| sample(&logits, 0.1, &mut rng) == 1)
            .count();
        assert!(ones as f64 / n as f64 > 0.99);
    }

    fn tiny() -> Evaluator {
        let cfg = ModelConfig {
            hidden_size: 16,
            intermediate_size: 24,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            num_key_value_heads: Some(1),
            vocab_size: 20,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            max_position_embeddings: 8,
            tie_word_embeddings: true,
            subspace_rank: 0,
            subspace_seed: 0,
        };
        Evaluator::new(&cfg, &Model::new(&cfg, 3).unwrap().tensors()).unwrap()
    }

    #[test]
    fn stream_loss_is_the_token_weighted_mean_of_window_losses() {
        let e = tiny();
        let tokens: Vec<u32> = (0..19).map(|i| (i * 7 % 20) as u32).collect();
        let s = e.stream_loss(&tokens, 8, 2, |_, _| {}).unwrap();
        assert_eq!(s.tokens, 18);
        // Windows 0..8, 8..16 and the tail 16..18, computed one by one.
        let w =
            |a: usize, b: usize| e.sequence_loss(&tokens[a..=b]).unwrap().unwrap() * (b - a) as f64;
        let want = (w(0, 8) + w(8, 16) + w(16, 18)) / 18.0;
        assert!((s.loss - want).abs() < 1e-5, "{} vs {want}", s.loss);
        // A seq_len beyond the context is capped rather than rejected.
        assert_eq!(
            e.stream_loss(&tokens, 100, 1, |_, _| {}).unwrap().tokens,
            18
        );
    }

    #[test]
    fn generation_is_seeded_and_greedy_is_deterministic() {
        let e = tiny();
        let a = e.generate(&[1, 2, 3], 12, 1.0, 5, |_| {}).unwrap();
        assert_eq!(a.len(), 12);
        assert_eq!(a, e.generate(&[1, 2, 3], 12, 1.0, 5, |_| {}).unwrap());
        let g = e.generate(&[1, 2, 3], 3, 0.0, 0, |_| {}).unwrap();
        let first = e.last_logits(&[1, 2, 3]).unwrap();
        assert_eq!(g[0], sample(&first, 0.0, &mut ChaCha8Rng::seed_from_u64(0)));
        assert_eq!(g, e.generate(&[1, 2, 3], 3, 0.0, 99, |_| {}).unwrap());
        assert!(e.generate(&[], 3, 0.0, 0, |_| {}).is_err());
        assert!(e.generate(&[1], 3, -1.0, 0, |_| {}).is_err());
        assert!(
            e.last_logits(&[25]).is_err(),
            "token outside the vocabulary"
        );
    }
}
