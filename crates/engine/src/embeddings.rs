//! embeddings (placeholder; being written).
