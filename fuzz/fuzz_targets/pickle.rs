//! Fuzz target: the torch zip container + pickle opcode reader, and the bare opcode parser.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ld_engine::pickle::tensor_bytes_total(data);
    let _ = ld_engine::pickle::parse(data);
});
