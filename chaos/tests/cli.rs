//! The `ckpt-chaos` CLI: the taxonomy it prints, and bad input refused with a clear message
//! before anything starts. (Building this test also builds the binary the workspace's chaos
//! tests run.)

use std::process::Command;

fn chaos(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ckpt-chaos")).args(args).output().expect("running ckpt-chaos")
}

#[test]
fn the_taxonomy_lists_the_18_rows_of_table_5() {
    let out = chaos(&["taxonomy"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), 19, "a header and 18 rows:\n{text}");
    assert!(text.contains("Faulty GPU") && text.contains("148") && text.contains("kill_rank"), "{text}");
}

#[test]
fn bad_input_is_refused_before_anything_runs() {
    for (args, says) in [
        (vec!["schedule", "--mean-steps-between", "0"], "--mean-steps-between"),
        (vec!["schedule", "--mean-steps-between", "NaN"], "--mean-steps-between"),
        (vec!["schedule", "--nproc", "0"], "--nproc"),
        (vec!["schedule", "--ckpt-every", "0"], "--ckpt-every"),
        (vec!["run", "--steps", "3", "--out", "/nonexistent-never-created"], "--steps"),
        (vec!["simulate", "--runs", "0", "--html", "/dev/null"], "--runs"),
        (vec!["simulate", "--restart-s=-5", "--html", "/dev/null"], "--restart-s"),
    ] {
        let out = chaos(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    assert!(!std::path::Path::new("/nonexistent-never-created").exists());
}
