//! See `ckpt_core::fuzzing::shard_index` for the property; its proptest twin is in core/tests/fuzz_twins.rs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ckpt_core::fuzzing::shard_index(data));
