//! ckptd's HTTP handlers in process (`ckpt_service::fuzzing::Harness`): the input is a method,
//! credentials, a request target and a body. Its proptest twin is service/tests/http_fuzz.rs.
#![no_main]

use std::sync::OnceLock;

use ckpt_service::fuzzing::Harness;

fn harness() -> &'static Harness {
    static H: OnceLock<(Harness, tempfile::TempDir)> = OnceLock::new();
    &H.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        (Harness::new(dir.path()), dir)
    })
    .0
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness().check_bytes(data));
