//! clip (placeholder; being written).
