//! schedule (placeholder; being written).
