//! sampler (placeholder; being written).
