//! attention (placeholder; being written).
