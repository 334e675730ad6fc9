//! weights (placeholder; being written).
