//! glibc malloc tuning for a training process.
//!
//! A training step allocates and frees the same activation buffers (up to tens of MB) every
//! micro-batch. With glibc's defaults the large ones are fresh `mmap`s whose pages fault in
//! (and are zeroed by the kernel) on first touch, and freed heap tops are trimmed back to the
//! kernel: tens of thousands of page faults per second of training, a few percent of the step.
//! Keeping freed memory in the process makes the next micro-batch reuse the same pages.

/// Large allocations come from the heap up to glibc's own cap on the threshold (32 MiB on 64-bit),
/// and freed memory stays in the process. Call once at startup, before other threads exist.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)] // mallopt: see the SAFETY comment
pub(crate) fn tune() {
    const MMAP_THRESHOLD: libc::c_int = 32 << 20;
    const TRIM_THRESHOLD: libc::c_int = 1 << 30;
    const TOP_PAD: libc::c_int = 64 << 20;
    // SAFETY: mallopt only sets allocator parameters; it is called from `main` before any other
    // thread is spawned, and the values are within the ranges glibc documents (a rejected value
    // returns 0 and leaves the default, which is harmless).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        libc::mallopt(libc::M_TOP_PAD, TOP_PAD);
    }
}

/// Other allocators need no tuning here.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(crate) fn tune() {}
