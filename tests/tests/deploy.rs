//! The files in `deploy/` are working starts, not sketches: every example config loads with
//! `ckptd --check-config`, the ConfigMap embeds the Kubernetes config byte for byte, every YAML
//! file parses, and every command the Dockerfile, compose file, manifests and systemd unit run
//! is a binary this workspace builds, with arguments its parser takes.

use std::path::{Path, PathBuf};

use ckpt_tests::*;
use yaml_rust2::{Yaml, YamlLoader};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn files(dir: &Path, ext: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().and_then(|x| x.to_str()).is_some_and(|x| ext.contains(&x)) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn check_config(path: &Path) {
    let out = std::process::Command::new(ckptd_exe()).arg("--check-config").arg(path).output().unwrap();
    assert!(
        out.status.success(),
        "ckptd --check-config {}: {}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn yaml(path: &Path) -> Vec<Yaml> {
    let text = std::fs::read_to_string(path).unwrap();
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A workspace binary named by the last part of `path` (e.g. `/usr/local/bin/ckptd`).
fn workspace_binary(path: &str) -> PathBuf {
    let name = path.rsplit('/').next().unwrap();
    let p = ckptd_exe().with_file_name(name);
    assert!(p.is_file(), "deploy/ runs {path}, which is not a binary this workspace builds");
    p
}

fn strings(v: &Yaml) -> Vec<String> {
    v.as_vec().map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect()).unwrap_or_default()
}

/// Runs a workspace binary with the arguments a deploy file gives it, plus `--help` (parsed
/// up to there, nothing run): a renamed flag or subcommand fails here.
fn parses(command: &[String], args: &[String]) {
    let exe = workspace_binary(&command[0]);
    let out = std::process::Command::new(&exe).args(&command[1..]).args(args).arg("--help").output().unwrap();
    assert!(
        out.status.success(),
        "{} {:?} {:?} does not parse: {}",
        exe.display(),
        &command[1..],
        args,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_example_config_loads() {
    let configs = files(&deploy_dir().join("config"), &["toml"]);
    assert!(configs.len() >= 3, "expected the example configs in deploy/config, found {configs:?}");
    for c in &configs {
        check_config(c);
    }
}

#[test]
fn every_yaml_file_parses_and_the_configmap_embeds_the_k8s_config() {
    let all = files(&deploy_dir(), &["yaml", "yml"]);
    assert!(all.len() >= 8, "expected the compose file and the manifests, found {all:?}");
    for f in &all {
        assert!(!yaml(f).is_empty(), "{} holds no document", f.display());
    }
    let cm = &yaml(&deploy_dir().join("k8s/configmap.yaml"))[0];
    let embedded = cm["data"]["ckptd.toml"].as_str().expect("the ConfigMap's data.ckptd.toml");
    let file = std::fs::read_to_string(deploy_dir().join("config/ckptd-k8s.toml")).unwrap();
    assert_eq!(embedded, file, "k8s/configmap.yaml must embed config/ckptd-k8s.toml byte for byte");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ckptd.toml");
    std::fs::write(&p, embedded).unwrap();
    check_config(&p);
}

#[test]
fn deploy_files_run_workspace_binaries_with_arguments_they_take() {
    // Kubernetes: the DaemonSet's ckptd and the retention CronJob's ckpt.
    let ds = &yaml(&deploy_dir().join("k8s/daemonset.yaml"))[0];
    let containers = ds["spec"]["template"]["spec"]["containers"].as_vec().expect("containers");
    let ckptd = containers.iter().find(|c| c["name"].as_str() == Some("ckptd")).expect("a ckptd container");
    parses(&strings(&ckptd["command"]), &strings(&ckptd["args"]));
    let cron = &yaml(&deploy_dir().join("k8s/cronjob-retention.yaml"))[0];
    let job = &cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0];
    let (command, args) = (strings(&job["command"]), strings(&job["args"]));
    assert!(args.iter().any(|a| a == "gc"), "the retention CronJob runs `ckpt gc`: {args:?}");
    parses(&command, &args);

    // Compose: ckptd's entrypoint and command.
    let compose = &yaml(&deploy_dir().join("compose.yaml"))[0];
    let svc = &compose["services"]["ckptd"];
    parses(&strings(&svc["entrypoint"]), &strings(&svc["command"]));

    // The Dockerfile builds and copies only workspace binaries, and the ones the rest run.
    let dockerfile = std::fs::read_to_string(deploy_dir().join("Dockerfile")).unwrap();
    let built: Vec<&str> = dockerfile
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] == "--bin")
        .map(|w| w[1])
        .collect();
    assert!(built.contains(&"ckptd") && built.contains(&"ckpt"), "the image builds ckptd and ckpt: {built:?}");
    for b in built {
        workspace_binary(b);
    }

    // systemd: ExecStartPre and ExecStart.
    let unit = std::fs::read_to_string(deploy_dir().join("systemd/ckptd.service")).unwrap();
    let mut seen = 0;
    for line in unit.lines() {
        if let Some(cmd) = line.strip_prefix("ExecStartPre=").or_else(|| line.strip_prefix("ExecStart=")) {
            let words: Vec<String> = cmd.split_whitespace().map(str::to_string).collect();
            let exe = workspace_binary(&words[0]);
            // --check-config takes the file and runs; check it parses with the example config.
            let args: Vec<String> = words[1..]
                .iter()
                .map(|a| {
                    if a.ends_with(".toml") {
                        deploy_dir().join("config/ckptd-local.toml").to_string_lossy().into_owned()
                    } else {
                        a.clone()
                    }
                })
                .collect();
            if args.first().map(String::as_str) == Some("--check-config") {
                let out = std::process::Command::new(&exe).args(&args).output().unwrap();
                assert!(out.status.success(), "{line}: {}", String::from_utf8_lossy(&out.stderr));
            } else {
                parses(&[words[0].clone()], &args);
            }
            seen += 1;
        }
    }
    assert!(seen >= 1, "the unit starts ckptd");
}
