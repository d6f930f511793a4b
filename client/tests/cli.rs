//! The ckpt binary fails clearly when ckptd is unreachable or the arguments are wrong.

use std::process::Command;

#[test]
fn unreachable_server_and_bad_arguments_fail_clearly() {
    // Bind then drop a listener: the port is free and nothing answers on it.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out = Command::new(env!("CARGO_BIN_EXE_ckpt"))
        .args(["--server", &format!("http://127.0.0.1:{port}"), "ls"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "unreachable exits 4 (README, exit codes)");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot reach ckptd"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = Command::new(env!("CARGO_BIN_EXE_ckpt"))
        .args(["--server", &format!("http://127.0.0.1:{port}"), "verify", "bad/job", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "a bad argument exits 2, before any request");
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid job name"));

    let out = Command::new(env!("CARGO_BIN_EXE_ckpt")).args(["rm"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");
}
