//! unet (placeholder; being written).
