//! See `ckpt_core::fuzzing::store_key` for the property; its proptest twin is in core/tests/fuzz_twins.rs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ckpt_core::fuzzing::store_key_bytes(data));
