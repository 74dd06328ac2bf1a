//! Runtime choice of vector width for the hot loops: the crate is built for baseline x86-64
//! (SSE2), so the same source is also compiled with AVX2 and AVX-512 enabled and the widest the
//! CPU has is called. The loops use no fused or reassociated arithmetic, so each element gets the
//! same operations in the same order on every path: frames are bitwise the same on every CPU.

/// Defines `fn name(args) -> ret { body }` that runs `body` compiled for AVX-512F or AVX2 when
/// the CPU has them (portable otherwise). `body` should call `#[inline(always)]` code so that the
/// whole loop nest is compiled for the chosen features.
macro_rules! multiversion {
    (
        $(#[$meta:meta])*
        $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block
    ) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn avx512($($arg: $ty),*) $(-> $ret)? $body
                #[target_feature(enable = "avx2")]
                fn avx2($($arg: $ty),*) $(-> $ret)? $body
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F (checked just above).
                    #[allow(unsafe_code)]
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2 (checked just above).
                    #[allow(unsafe_code)]
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body
        }
    };
}
pub(crate) use multiversion;
