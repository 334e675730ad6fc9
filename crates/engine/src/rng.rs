//! rng (placeholder; being written).
