//! vae (placeholder; being written).
