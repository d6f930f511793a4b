//! See `ckpt_core::fuzzing::stored_chunk` for the property; its proptest twin is in core/tests/fuzz_twins.rs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ckpt_core::fuzzing::stored_chunk(data));
