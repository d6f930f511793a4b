//! The ckptd binary's configuration surface: defaults, file, environment, flags, bad input.

use std::process::Command;

fn ckptd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ckptd"))
}

#[test]
fn print_config_shows_defaults_and_precedence() {
    let out = ckptd().arg("--print-config").env_remove("CKPTD_LISTEN").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("listen = \"127.0.0.1:7070\""), "{text}");
    assert!(text.contains("chunk_requests_max = 64"), "{text}");
    assert!(text.contains("body_progress_timeout_ms = 10000"), "{text}");
    assert!(text.contains("header_read_timeout_ms = 10000"), "{text}");
    let out = ckptd()
        .args(["--body-progress-timeout-ms", "1500", "--print-config"])
        .env("CKPTD_HEADER_READ_TIMEOUT_MS", "2500")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("body_progress_timeout_ms = 1500"), "{text}");
    assert!(text.contains("header_read_timeout_ms = 2500"), "{text}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ckptd.toml");
    std::fs::write(&file, "listen = \"127.0.0.1:1111\"\nsaves_in_flight_max = 7\n").unwrap();
    let out = ckptd()
        .arg("--config")
        .arg(&file)
        .arg("--print-config")
        .env("CKPTD_LISTEN", "127.0.0.1:2222")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("listen = \"127.0.0.1:2222\""), "env beats file: {text}");
    assert!(text.contains("saves_in_flight_max = 7"), "file beats default: {text}");
    let out = ckptd()
        .arg("--config")
        .arg(&file)
        .args(["--listen", "127.0.0.1:3333", "--print-config"])
        .env("CKPTD_LISTEN", "127.0.0.1:2222")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("listen = \"127.0.0.1:3333\""), "flag beats env");
}

#[test]
fn bad_config_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ckptd.toml");
    std::fs::write(&file, "chunk_requests_maxx = 3\n").unwrap();
    let out = ckptd().arg("--config").arg(&file).arg("--print-config").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("chunk_requests_maxx"));
    let out = ckptd().args(["--chunk-requests-max", "0", "--print-config"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("chunk_requests_max must be positive"));
    let out = ckptd()
        .args(["--store", "ftp://host/x", "--data-dir"])
        .arg(dir.path())
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid store location"));
}

#[test]
fn check_config_validates_bounds_store_url_and_options_without_touching_anything() {
    let dir = tempfile::tempdir().unwrap();
    let check = |text: &str| {
        let p = dir.path().join("c.toml");
        std::fs::write(&p, text).unwrap();
        let out = ckptd().arg("--check-config").arg(&p).output().unwrap();
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    };
    let store = dir.path().join("never-created");
    let (ok, out) = check(&format!("store = {:?}\nchunk_requests_max = 8\n", store.to_str().unwrap()));
    assert!(ok && out.contains(": ok"), "{out}");
    assert!(!store.exists(), "--check-config created the store directory");
    let (ok, out) = check(
        "store = \"s3://bucket/prefix\"\n[store_options]\nendpoint = \"http://127.0.0.1:9\"\nallow_http = \"true\"\nregion = \"us-east-1\"\n",
    );
    assert!(ok, "{out}");
    for (bad, says) in [
        ("chunk_requests_max = 0\n", "chunk_requests_max must be positive"),
        ("store = \"s3://bucket\"\n[store_options]\nendpiont = \"x\"\n", "endpiont"),
        ("store = \"ftp://host/x\"\n", "not supported"),
        ("store = \"s3://key:secret@bucket\"\n", "credentials do not belong"),
        ("store = \"/tmp\"\n[store_options]\nregion = \"x\"\n", "cloud stores only"),
        ("lisen = \"x\"\n", "lisen"),
    ] {
        let (ok, out) = check(bad);
        assert!(!ok, "accepted {bad:?}: {out}");
        assert!(out.contains(says), "{bad:?}: expected {says:?} in {out}");
    }
}

/// A taken port or a malformed address is reported, naming it, before any directory is made;
/// a second ckptd on a data directory in use is told which process holds it; no backtrace
/// even with RUST_BACKTRACE=1.
#[test]
fn start_up_errors_name_the_address_or_the_data_directory_and_touch_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let data = dir.path().join("state");
    for listen in [addr.as_str(), "bad"] {
        let out = ckptd()
            .args(["--listen", listen, "--store"])
            .arg(dir.path().join("store"))
            .arg("--data-dir")
            .arg(&data)
            .env("RUST_BACKTRACE", "1")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains(&format!("cannot listen on {listen}")), "{err}");
        assert!(!err.contains("backtrace"), "{err}");
        assert!(!data.exists() && !dir.path().join("store").exists(), "nothing is created before the port is bound");
    }
    drop(taken);

    // One ckptd holds the data directory; a second is told by whom.
    let mut first = ckptd()
        .args(["--listen", "127.0.0.1:0", "--store"])
        .arg(dir.path().join("store"))
        .arg("--data-dir")
        .arg(&data)
        .arg("--addr-file")
        .arg(dir.path().join("addr"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !dir.path().join("addr").exists() {
        assert!(std::time::Instant::now() < deadline, "the first ckptd did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = ckptd()
        .args(["--listen", "127.0.0.1:0", "--store"])
        .arg(dir.path().join("store"))
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    let _ = first.kill();
    let _ = first.wait();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(&format!("pid {}", first.id())) && err.contains(&data.display().to_string()), "{err}");
}
