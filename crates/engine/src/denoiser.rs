//! denoiser (placeholder; being written).
