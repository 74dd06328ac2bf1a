//! `presets::stage_memory` against the heap: a counting allocator records the peak of live heap
//! bytes while a stage runs training steps (`swarm_bench::model::run_stage`: the micro-batches in flight
//! forward, their backward, AdamW), and the prediction must be within 5% of it (issue #17's
//! target for the resident peak is 10%). The heap is
//! what the formula models; `swarm bench memory` measures the resident peak of whole processes
//! on the real presets.
//!
//! One test in this binary: the allocator's counters are global.

#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use swarm_model::RunConfig;
use swarm_model::presets::stage_memory_on;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = LIVE.fetch_add(n, Ordering::SeqCst) + n;
    PEAK.fetch_max(now, Ordering::SeqCst);
}

// SAFETY: every call forwards to the system allocator with the caller's arguments unchanged;
// the counters only observe sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
            grew(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn run(
    hidden: usize,
    inter: usize,
    (heads, kv_heads): (usize, usize),
    layers: usize,
    (micro_batches, batch, seq): (usize, usize, usize),
) -> RunConfig {
    let mut cfg = RunConfig::default();
    cfg.model.hidden_size = hidden;
    cfg.model.intermediate_size = inter;
    cfg.model.num_hidden_layers = layers;
    cfg.model.num_attention_heads = heads;
    cfg.model.num_key_value_heads = Some(kv_heads);
    cfg.model.max_position_embeddings = seq;
    cfg.stages = vec![0, layers / 2, layers];
    cfg.train.micro_batches = micro_batches;
    cfg.train.micro_batch_size = batch;
    cfg.train.seq_len = seq;
    cfg.validate().unwrap();
    cfg
}

#[test]
fn predicted_stage_memory_is_within_5_percent_of_the_heap_peak() {
    // Each shape makes a different term large: long sequences (attention probabilities and
    // score gradients), a wide MLP with few tokens (weights, moments, the gradient split), many
    // micro-batches in flight (the contexts).
    let runs = [
        ("long sequences, GQA", run(128, 256, (8, 2), 2, (2, 2, 256))),
        (
            "wide MLP, few tokens",
            run(256, 1024, (4, 4), 4, (2, 1, 16)),
        ),
        ("4 in flight", run(96, 256, (6, 3), 4, (4, 4, 64))),
    ];
    // gemm keeps a packing slab per thread (thread-local, the size of the L2 cache) from its
    // first call on: process overhead, not the stage's. A first unmeasured run makes them.
    swarm_bench::model::run_stage(&runs[0].1, 0, 1).unwrap();
    let threads = rayon::current_num_threads();
    let mut report = Vec::new();
    let mut errs = Vec::new();
    for (name, cfg) in &runs {
        let need = stage_memory_on(cfg, 0, threads).unwrap();
        let before = LIVE.load(Ordering::SeqCst);
        PEAK.store(before, Ordering::SeqCst);
        swarm_bench::model::run_stage(cfg, 0, 2).unwrap();
        let peak = (PEAK.load(Ordering::SeqCst) - before) as f64;
        let err = peak / need.total as f64 - 1.0;
        report.push(format!(
            "{name}: predicted {} measured {peak} ({:+.1}%)",
            need.total,
            100.0 * err
        ));
        errs.push(err);
    }
    eprintln!("{}", report.join("\n"));
    for err in errs {
        assert!(err.abs() < 0.05, "{}", report.join("; "));
    }
}
