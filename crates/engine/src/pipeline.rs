//! pipeline (placeholder; being written).
