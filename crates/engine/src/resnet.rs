//! resnet (placeholder; being written).
