//! Runtime choice of vector width for the hot loops: the crate is built for baseline x86-64
//! (SSE2), so [`widest`] runs a loop nest compiled again for the best instruction set the CPU has
//! (AVX-512 or AVX2 and FMA), through pulp's dispatch as the model crate's passes do. The loops
//! use no reassociated arithmetic and Rust never contracts into FMAs, so each element gets the
//! same operations in the same order on every path: frames are bitwise the same on every CPU.

/// Runs `f` compiled for the widest instruction set this CPU has. `f` should be an
/// `#[inline(always)]` closure calling `#[inline(always)]` code, so that the whole loop nest is
/// compiled for the chosen features.
#[inline(always)]
pub(crate) fn widest<R>(f: impl FnOnce() -> R) -> R {
    pulp::Arch::new().dispatch(f)
}
