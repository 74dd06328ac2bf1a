//! Gradients are added in micro-batch order whatever order the backwards run in: micro-batches
//! tagged with their number and run backward shuffled leave every shard (ends and stages, tied and
//! untied embeddings) with bitwise the gradients of the plain in-order run, while the same
//! shuffled order untagged (arrival order) does not. A shard that sees only some micro-batches
//! sums them in ascending order too.

use candle_core::{DType, Device};
use swarm_model::train::{backward_micro_batch, forward_micro_batch};
use swarm_model::{Corpus, Piece, RunConfig, Shard};

const MBS: usize = 4;

fn config(tie: bool) -> RunConfig {
    let mut cfg = RunConfig::default();
    cfg.model.hidden_size = 32;
    cfg.model.intermediate_size = 64;
    cfg.model.num_hidden_layers = 2;
    cfg.model.num_attention_heads = 4;
    cfg.model.num_key_value_heads = Some(2);
    cfg.model.max_position_embeddings = 32;
    cfg.model.tie_word_embeddings = tie;
    cfg.stages = vec![0, 1, 2];
    cfg.train.micro_batches = MBS;
    cfg.train.micro_batch_size = 2;
    cfg.train.seq_len = 16;
    cfg.validate().unwrap();
    cfg
}

/// Every shard's gradients, as bits, after the forwards of micro-batches `0..MBS` (in order) and
/// the backwards of `order` (tagged with their number when `tagged`); also how many micro-batches
/// each shard still held unfolded.
fn grads_after(cfg: &RunConfig, order: &[usize], tagged: bool) -> (Vec<Vec<u32>>, Vec<usize>) {
    let dev = Device::Cpu;
    let mut ends = Shard::new(
        &cfg.model,
        &[Piece::Embedding, Piece::Head],
        cfg.seed,
        DType::F32,
        &dev,
    )
    .unwrap();
    let mut stages: Vec<Shard> = Piece::stages(&cfg.stages)
        .into_iter()
        .map(|p| Shard::new(&cfg.model, &[p], cfg.seed, DType::F32, &dev).unwrap())
        .collect();
    let corpus = Corpus::builtin();
    let t = &cfg.train;
    let mut ctxs: Vec<_> = (0..MBS)
        .map(|mb| {
            let b = corpus
                .train_batch(cfg.seed, 0, mb as u64, t.micro_batch_size, t.seq_len)
                .unwrap();
            Some(forward_micro_batch(&ends, &stages, &b).unwrap().1)
        })
        .collect();
    for &mb in order {
        let mut c = ctxs[mb].take().unwrap();
        if tagged {
            c = c.micro_batch(mb as u64);
        }
        backward_micro_batch(&mut ends, &mut stages, c, 1.0 / MBS as f64).unwrap();
    }
    let shards: Vec<&Shard> = std::iter::once(&ends).chain(&stages).collect();
    let bits = shards
        .iter()
        .map(|s| {
            let g = s.grads_flat().unwrap();
            assert!(g.iter().any(|v| *v != 0.0));
            g.iter().map(|v| v.to_bits()).collect()
        })
        .collect();
    let pending = shards.iter().map(|s| s.pending_micro_batches()).collect();
    (bits, pending)
}

#[test]
fn shuffled_backwards_add_gradients_in_micro_batch_order() {
    for tie in [false, true] {
        let cfg = config(tie);
        let (want, pending) = grads_after(&cfg, &[0, 1, 2, 3], false);
        assert_eq!(pending, vec![0; 3], "the in-order run folds as it goes");
        for order in [[2, 0, 3, 1], [3, 2, 1, 0], [1, 2, 3, 0]] {
            let (got, _) = grads_after(&cfg, &order, true);
            assert!(
                got == want,
                "tie {tie}, order {order:?}: not the in-order bits"
            );
            // Added in arrival order instead, the sums differ: the check above can fail.
            let (arrival, _) = grads_after(&cfg, &order, false);
            assert!(arrival != want, "tie {tie}, order {order:?}");
        }
        // Tagged and in order: folded as they come, nothing waits.
        let (got, pending) = grads_after(&cfg, &[0, 1, 2, 3], true);
        assert!(got == want);
        assert_eq!(pending, vec![0; 3]);
    }
}

#[test]
fn a_shard_that_sees_some_micro_batches_sums_them_in_ascending_order() {
    let cfg = config(false);
    // As a replica that got micro-batches 1 and 3 would: 3 comes back first.
    let (got, pending) = grads_after(&cfg, &[3, 1], true);
    // Neither follows micro-batch 0 here, so both wait until the sum is read.
    assert_eq!(pending, vec![2; 3]);
    let (want, _) = grads_after(&cfg, &[1, 3], false);
    assert!(got == want);
    let (arrival, _) = grads_after(&cfg, &[3, 1], false);
    // Two terms: addition is commutative, so even arrival order agrees here; with a third
    // (0 arriving last) it would not.
    assert!(arrival == want);
    let (got, _) = grads_after(&cfg, &[3, 1, 0], true);
    let (want, _) = grads_after(&cfg, &[0, 1, 3], false);
    assert!(got == want);
}
