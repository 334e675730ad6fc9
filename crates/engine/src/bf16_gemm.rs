//! The switch for the CPU's bf16 matrix products (x86 CPUs with AVX-512 BF16: AMD Zen 4 and
//! later, Intel Cooper Lake / Sapphire Rapids and later; the kernels are in
//! [`crate::avx512_gemm`]). Opt-in ([`set_enabled`], or `LD_CPU_BF16=1` in the environment for
//! benchmarks): bf16 keeps 8 bits of mantissa, so pictures differ from f32 ones by about what
//! fp16 on a GPU changes.

use std::sync::atomic::{AtomicBool, Ordering};

static ENABLED: AtomicBool = AtomicBool::new(false);

/// What to tell someone who asks for bf16 on a CPU without it.
pub const UNSUPPORTED: &str =
    "bf16 needs a CPU with AVX-512 BF16 (AMD Zen 4, Intel Sapphire Rapids or newer)";

/// Turns the bf16 products on or off for this process (where the CPU has AVX-512 BF16).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Turns the bf16 products on; an error saying why ([`UNSUPPORTED`]) on a CPU without them.
pub fn enable() -> Result<(), &'static str> {
    if !supported() {
        return Err(UNSUPPORTED);
    }
    set_enabled(true);
    Ok(())
}

/// `LD_CPU_BF16=1`: on whatever the settings say (read once; warned about once where the CPU
/// cannot).
fn forced_by_env() -> bool {
    static FORCED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FORCED.get_or_init(|| {
        let asked = std::env::var("LD_CPU_BF16").is_ok_and(|v| v == "1");
        if asked && !supported() {
            tracing::warn!("LD_CPU_BF16=1 is ignored: {UNSUPPORTED}");
        }
        asked
    })
}

/// Whether this CPU can run the bf16 products.
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // Enabling avx512bf16 also lets the compiler use avx512bw in those functions.
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether products should take the bf16 path: asked for, and the CPU has it.
pub fn active() -> bool {
    (ENABLED.load(Ordering::Relaxed) || forced_by_env()) && supported()
}
