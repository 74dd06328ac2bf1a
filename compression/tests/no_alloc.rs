//! The hot path allocates nothing once warm: encode into a reused `Vec<u8>`, decode into a reused
//! `Vec<f32>`, for every kind of codec. Counted with a global allocator, on this thread only.

#![allow(unsafe_code)] // a counting global allocator

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use swarm_compression::{Decoder, Encoder, ErrorFeedback, Limits};

struct Counting;

thread_local! {
    static COUNT: Cell<Option<usize>> = const { Cell::new(None) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = COUNT.try_with(|c| c.set(c.get().map(|n| n + 1)));
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = COUNT.try_with(|c| c.set(c.get().map(|n| n + 1)));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn allocations(f: impl FnOnce()) -> usize {
    COUNT.with(|c| c.set(Some(0)));
    f();
    COUNT.with(|c| c.replace(None)).unwrap()
}

#[test]
fn warm_encode_and_decode_do_not_allocate() {
    let n = 1 << 16;
    let batches: Vec<Vec<f32>> = (0..3)
        .map(|b| {
            (0..n)
                .map(|i| ((i * 7919 + b * 13) % 2001) as f32 / 100.0 - 10.0)
                .collect()
        })
        .collect();
    for codec in [
        "none",
        "fp16",
        "bf16",
        "q8",
        "q4:4096",
        "rht+q2",
        "q8+zstd:1",
        "topk:0.1+q8+zstd:3",
        "topk-row:0.05+rht+q4",
        "topk:0.6+bf16",
    ] {
        let mut enc = Encoder::new(codec.parse().unwrap()).unwrap();
        let mut dec = Decoder::new();
        let (mut frame, mut out) = (Vec::new(), Vec::new());
        let limits = Limits::new(n);
        enc.encode(&batches[0], &[n / 256, 256], &mut frame)
            .unwrap();
        dec.decode(&frame, &limits, &mut out).unwrap();
        // Slack for the largest frame of the batches (frame sizes vary a little with zstd).
        frame.reserve(frame.len());
        let count = allocations(|| {
            for data in &batches {
                enc.encode(data, &[n / 256, 256], &mut frame).unwrap();
                dec.decode(&frame, &limits, &mut out).unwrap();
            }
        });
        assert_eq!(count, 0, "{codec}: {count} allocations once warm");
    }

    // Error feedback too, with the sync's codec (the encoder hands back the decoded tensor).
    for codec in ["topk:0.1+q8+zstd", "topk:0.9+rht+q2:1024+zstd:3"] {
        let mut enc = Encoder::new(codec.parse().unwrap()).unwrap();
        let mut ef = ErrorFeedback::new(n);
        let mut frame = Vec::new();
        ef.encode(&mut enc, &batches[0], &[n], &mut frame).unwrap();
        frame.reserve(frame.len());
        let count = allocations(|| {
            for data in &batches {
                ef.encode(&mut enc, data, &[n], &mut frame).unwrap();
            }
        });
        assert_eq!(
            count, 0,
            "error feedback, {codec}: {count} allocations once warm"
        );
    }

    // The counter works: a positive control.
    assert!(allocations(|| drop(std::hint::black_box(vec![1u8; 10]))) > 0);
}
