//! `ckpt-train` refuses bad arguments before starting anything, and sizes the named models.
//! (Being an integration test of this package also makes `cargo test` build the binary that the
//! workspace's end-to-end trainer tests run.)

use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ckpt-train")).args(args).env("RUST_BACKTRACE", "0").output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn bad_arguments_fail_clearly_and_start_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let base = ["launch", "--data-dir", data, "--run-dir", dir.path().to_str().unwrap()];
    let with = |extra: &[&str]| {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        run(&a)
    };

    let o = with(&["--nproc", "5"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("not divisible by 5 ranks"), "{}", stderr(&o));

    let o = with(&["--model", "405b"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("for sizing"), "{}", stderr(&o));

    let o = with(&["--inject", "explode@0:3"]);
    assert_eq!(o.status.code(), Some(2), "usage errors exit 2: {}", stderr(&o));
    assert!(stderr(&o).contains("KIND@RANK:STEP"), "{}", stderr(&o));

    let o = with(&["--steps", "10", "--until-step", "11"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--until-step"), "{}", stderr(&o));

    // NCCL needs the `nccl` feature; the refusals of a build with it are tests/nccl_twins.rs.
    if !cfg!(feature = "nccl") {
        let o = with(&["--collective", "nccl", "--nproc", "2"]);
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        assert!(stderr(&o).contains("built without the `nccl` feature"), "{}", stderr(&o));
    }

    // Nothing was started: no store, no ckptd state.
    assert!(!std::path::Path::new(data).exists(), "a refused launch created {data}");
}

#[test]
fn sizes_lists_the_llama3_shapes() {
    let o = run(&["sizes", "--world", "8"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    let row =
        |m: &str| text.lines().find(|l| l.starts_with(m)).unwrap_or_else(|| panic!("no {m} row in {text}")).to_string();
    // 405,853,388,800 parameters × 12 bytes / 8 ranks.
    assert!(row("405b").contains("405853388800") && row("405b").contains("608780083200"), "{}", row("405b"));
    assert!(row("8b").contains("8030261248"), "{}", row("8b"));
}
