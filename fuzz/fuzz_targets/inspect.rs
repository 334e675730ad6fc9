//! Fuzz target: safetensors header validation and classification on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ld_engine::checkpoint::inspect_bytes(data);
});
