//! config (placeholder; being written).
