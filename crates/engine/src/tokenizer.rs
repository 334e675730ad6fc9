//! tokenizer (placeholder; being written).
