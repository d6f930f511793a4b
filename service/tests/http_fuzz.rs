//! proptest twin of the fuzz target `fuzz/fuzz_targets/http.rs`: requests built from the API's
//! routes with their parameters, credentials, queries and bodies mangled, plus raw noise, through
//! the handlers in process (`ckpt_service::fuzzing`). No request may panic ckptd or get a 5xx
//! other than 503, and every 4xx carries the JSON error body.

use ckpt_service::fuzzing::Harness;
use proptest::prelude::*;

const ROUTES: &[&str] = &[
    "/v1/jobs",
    "/v1/stats",
    "/metrics",
    "/v1/faults",
    "/v1/local",
    "/v1/gc",
    "/openapi.json",
    "/v1/jobs/{job}/checkpoints",
    "/v1/jobs/{job}/checkpoints/{step}",
    "/v1/jobs/{job}/checkpoints/{step}/pin",
    "/v1/jobs/{job}/indexes/{hash}",
    "/v1/jobs/{job}/gc",
    "/v1/jobs/{job}/chunks/missing",
    "/v1/jobs/{job}/chunks/{hash}",
    "/v1/jobs/{job}/chunks/{hash}/adopt",
    "/v1/jobs/{job}/chunks/adopt",
    "/v1/jobs/{job}/saves/{step}",
    "/v1/jobs/{job}/fence",
    "/v1/jobs/{job}/saves/{step}/ranks/{rank}",
];

fn param() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("t-job".to_string()),
        Just("other".to_string()),
        Just("latest".to_string()),
        Just("0".to_string()),
        Just("18446744073709551615".to_string()),
        Just("%2e%2e".to_string()),
        Just("..".to_string()),
        Just("t%2F..%2Fx".to_string()),
        Just("t%00".to_string()),
        "[0-9a-f]{64}",
        "[a-z0-9.%_-]{0,12}",
        "\\PC{0,20}",
    ]
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(Vec::new()),
        Just(br#"{"world_size":2}"#.to_vec()),
        Just(br#"{"world_size":1,"epoch":3,"node_ranks":[0,1]}"#.to_vec()),
        Just(br#"{"hashes":["00"]}"#.to_vec()),
        Just(br#"{"epoch":18446744073709551615}"#.to_vec()),
        Just(br#"{"file":"../x"}"#.to_vec()),
        Just(br#"{"rank":0,"tensors":[],"metadata":null}"#.to_vec()),
        proptest::collection::vec(any::<u8>(), 0..300),
    ]
}

fn harness() -> &'static Harness {
    static H: std::sync::OnceLock<(Harness, tempfile::TempDir)> = std::sync::OnceLock::new();
    &H.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        (Harness::new(dir.path()), dir)
    })
    .0
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(600))]

    #[test]
    fn any_request_gets_a_clean_answer(
        route in 0..ROUTES.len(),
        params in proptest::collection::vec(param(), 3),
        query in prop_oneof![Just(String::new()), Just("?force=true".to_string()), Just("?wait_ms=5".to_string()), Just("?dry_run=true&epoch=1".to_string()), "\\?[a-z_=&0-9%]{0,20}"],
        method in any::<u8>(),
        auth in any::<u8>(),
        body in body(),
    ) {
        let mut path = ROUTES[route].to_string();
        for (name, value) in ["{job}", "{step}", "{hash}"].iter().zip(&params) {
            path = path.replace(name, value);
        }
        path = path.replace("{rank}", &params[0].len().to_string());
        harness().check(method, &format!("{path}{query}"), auth, &body);
    }

    #[test]
    fn raw_paths_get_a_clean_answer(path in "/[\\PC/%]{0,60}", method in any::<u8>(), auth in any::<u8>(), body in body()) {
        harness().check(method, &path, auth, &body);
    }
}
