//! The `ckpt` CLI as a user meets it: every command fails loudly (non-zero exit, one line, no
//! backtrace even with RUST_BACKTRACE=1; a JSON error object with a stable code under --json)
//! on a job or step that does not exist, an unreachable server, a server that is not ckptd and
//! a malformed URL; `restore --all` (and resharded with `--world-size`) and `export` round-trip
//! a trainer's checkpoint byte for byte.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ckpt_tests::*;
use serde_json::Value;

struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

fn ckpt(server: &str, args: &[&str]) -> Ran {
    let out = Command::new(ckpt_exe())
        .args(["--server", server])
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .env_remove("CKPT_SERVER")
        .output()
        .expect("running ckpt");
    Ran {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A real HTTP server that is not ckptd (Python's), on a free loopback port.
struct NotCkptd(std::process::Child, String);

impl NotCkptd {
    fn start(dir: &Path) -> NotCkptd {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("python3")
            .args(["-m", "http.server", &port.to_string(), "--bind", "127.0.0.1", "--directory"])
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python3 -m http.server (python3 is needed for this test)");
        let server = NotCkptd(child, format!("http://127.0.0.1:{port}"));
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return server;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("python's http.server did not start");
    }
}

impl Drop for NotCkptd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Checks one failing command in text and in JSON: exit status, one line, the code.
fn assert_fails(server: &str, args: &[&str], exit: i32, code: &str) {
    let what = format!("ckpt --server {server} {}", args.join(" "));
    let r = ckpt(server, args);
    assert_eq!(r.code, exit, "{what}: exit status\nstdout: {}\nstderr: {}", r.stdout, r.stderr);
    let lines: Vec<&str> = r.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{what}: one line on stderr, got:\n{}", r.stderr);
    assert!(lines[0].starts_with("error: ") && !r.stderr.contains("backtrace"), "{what}: {}", r.stderr);
    let mut json_args = vec!["--json"];
    json_args.extend_from_slice(args);
    let r = ckpt(server, &json_args);
    assert_eq!(r.code, exit, "{what} --json: exit status");
    let v: Value =
        serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{what} --json: not JSON ({e}): {}", r.stdout));
    assert_eq!(v["error"]["code"], code, "{what} --json: {v}");
    assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{what} --json: {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_command_fails_loudly_on_what_does_not_exist_or_does_not_answer() {
    bounded(Duration::from_secs(240), async {
        let dir = tempfile::tempdir().unwrap();
        let d = start_daemon(&dir.path().join("ckptd")).await;
        let states: Vec<_> = (0..2).map(|r| rank_tensors(seed(0x5eed_0501), r, 2, 1 << 20)).collect();
        save_step(&client(&d), "job", 1, &states).await.unwrap();
        let out = dir.path().join("out");
        let file = dir.path().join("x.safetensors");
        let (out, file) = (out.to_str().unwrap(), file.to_str().unwrap());
        // (arguments, whether they name a missing job (else a missing step of "job")).
        let commands: Vec<Vec<&str>> = vec![
            vec!["ls", "nosuch"],
            vec!["show", "nosuch"],
            vec!["show", "job", "999"],
            vec!["verify", "nosuch"],
            vec!["verify", "nosuch", "--all"],
            vec!["verify", "job", "999"],
            vec!["restore", "nosuch", "latest", "--rank", "0", "--out", out],
            vec!["restore", "job", "999", "--all", "--out", out],
            vec!["export", "nosuch", "--out", file],
            vec!["export", "job", "999", "--out", file],
            vec!["rm", "nosuch", "latest"],
            vec!["rm", "job", "999"],
            vec!["pin", "job", "999"],
            vec!["unpin", "job", "999"],
            vec!["average", "job", "--steps", "1,999"],
            vec!["gc", "nosuch", "--dry-run"],
        ];
        let ckptd = d.url();
        for args in &commands {
            assert_fails(&ckptd, args, 3, "not_found");
        }
        assert!(!Path::new(out).exists() && !Path::new(file).exists(), "nothing written for a failed command");
        let unreachable = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", l.local_addr().unwrap())
        };
        let other = NotCkptd::start(dir.path());
        let all_jobs: Vec<Vec<&str>> = vec![vec!["ls"], vec!["verify", "--all"], vec!["gc", "--all", "--dry-run"]];
        for args in commands.iter().chain(&all_jobs) {
            let started = std::time::Instant::now();
            assert_fails(&unreachable, args, 4, "unreachable");
            assert!(started.elapsed() < Duration::from_secs(10), "an unreachable server is reported at once");
            assert_fails(&other.1, args, 4, "not_ckptd");
            assert_fails("localhost:7070", args, 4, "invalid_url");
        }
        // A wrong command line is a usage error, as JSON too under --json.
        let r = ckpt(&ckptd, &["restore", "job", "1"]);
        assert_eq!(r.code, 2, "{}", r.stderr);
        let r = ckpt(&ckptd, &["--json", "restore", "job", "1"]);
        let v: Value = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", r.stdout));
        assert_eq!((r.code, v["error"]["code"].as_str()), (2, Some("usage")), "{v}");
        assert_fails(&ckptd, &["verify", "bad/job"], 2, "usage");
        // The newest checkpoint is deleted only with --force, and the refusal says how.
        let r = ckpt(&ckptd, &["rm", "job", "latest"]);
        assert_eq!(r.code, 5, "{}", r.stderr);
        assert!(r.stderr.contains("--force"), "{}", r.stderr);
        // Human output: a time with its age, a size with its unit, plurals.
        let r = ckpt(&ckptd, &["ls", "job"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert!(
            r.stdout.contains("ago)") && r.stdout.contains("MiB") && r.stdout.contains("committed"),
            "{}",
            r.stdout
        );
        let r = ckpt(&ckptd, &["show", "job"]);
        assert!(
            r.stdout.contains("created") && r.stdout.contains("ago)") && !r.stdout.contains("(1 chunks)"),
            "{}",
            r.stdout
        );
        // Completions and the man page come from the same definition.
        assert!(ckpt(&ckptd, &["completions", "bash"]).stdout.contains("ckpt"));
        assert!(ckpt(&ckptd, &["man"]).stdout.contains(".TH"));
    })
    .await
}

/// Runs the trainer for a few steps against `d` and returns the job's newest step.
fn train(d: &ckpt_client::daemon::LocalDaemon, dir: &Path, job: &str) {
    let out = Command::new(ckpt_train_exe())
        .args(["launch", "--server", &d.url(), "--job", job, "--run-dir"])
        .arg(dir.join("run"))
        .args(["--nproc", "2", "--steps", "4", "--ckpt-every", "4"])
        .args(["--global-batch", "12", "--seq-len", "32", "--warmup", "2", "--anneal", "2", "--log-every", "0"])
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("ckpt-train");
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

/// A restored rank directory: its header and (name, bytes, offsets) per tensor.
type RankDir = (Value, Vec<(String, Vec<u8>, Vec<u64>)>);

fn read_rank_dir(dir: &Path) -> RankDir {
    let header: Value = serde_json::from_slice(&std::fs::read(dir.join("tensors.json")).unwrap()).unwrap();
    let tensors = header["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let offsets = t["offsets"].as_array().unwrap().iter().map(|o| o.as_u64().unwrap()).collect();
            (
                t["name"].as_str().unwrap().to_string(),
                std::fs::read(dir.join(t["file"].as_str().unwrap())).unwrap(),
                offsets,
            )
        })
        .collect();
    (header, tensors)
}

/// Every rank's slice of `name`, concatenated in row order: the whole tensor when the slices
/// are row splits.
fn assembled(ranks: &[RankDir], name: &str) -> Vec<u8> {
    let mut pieces: Vec<(u64, &Vec<u8>)> = ranks
        .iter()
        .flat_map(|(_, ts)| ts.iter().filter(|(n, ..)| n == name).map(|(_, b, o)| (o.first().copied().unwrap_or(0), b)))
        .collect();
    pieces.sort_by_key(|p| p.0);
    pieces.dedup_by_key(|p| p.0);
    pieces.into_iter().flat_map(|(_, b)| b.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restore_all_reshard_and_export_round_trip_a_trainer_checkpoint() {
    bounded(Duration::from_secs(300), async {
        let dir = tempfile::tempdir().unwrap();
        let d = start_daemon(&dir.path().join("ckptd")).await;
        train(&d, dir.path(), "tiny");
        let c = client(&d);
        let step = c.latest("tiny").await.unwrap().expect("the trainer committed a checkpoint");
        let cp = c.checkpoint("tiny", step).await.unwrap();
        let server = d.url();
        let step_s = step.to_string();

        let all = dir.path().join("all");
        let r = ckpt(&server, &["restore", "tiny", &step_s, "--all", "--out", all.to_str().unwrap()]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let saved: Vec<_> = (0..cp.world_size()).map(|r| read_rank_dir(&all.join(format!("rank-{r:05}")))).collect();
        for (rank, (header, tensors)) in saved.iter().enumerate() {
            assert_eq!((header["job"].as_str(), header["step"].as_u64()), (Some("tiny"), Some(step)));
            assert_eq!(header["root_hash"].as_str(), Some(cp.root.hash.as_str()));
            assert_eq!(header["byte_order"], "little-endian");
            let back = c.load_rank("tiny", step, rank as u32).await.unwrap();
            assert_eq!(back.len(), tensors.len());
            for (t, (name, bytes, _)) in back.iter().zip(tensors) {
                assert!(t.name == *name && t.data[..] == bytes[..], "rank {rank} tensor {name}");
            }
        }
        // Written again only with --force.
        let again = ckpt(&server, &["restore", "tiny", &step_s, "--all", "--out", all.to_str().unwrap()]);
        assert_eq!(again.code, 5, "{}", again.stderr);
        let again = ckpt(&server, &["restore", "tiny", &step_s, "--all", "--force", "--out", all.to_str().unwrap()]);
        assert_eq!(again.code, 0, "{}", again.stderr);

        // Resharded to three ranks: the same whole tensors, cut another way.
        let three = dir.path().join("three");
        let r = ckpt(
            &server,
            &["restore", "tiny", &step_s, "--all", "--world-size", "3", "--out", three.to_str().unwrap()],
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
        let resharded: Vec<_> = (0..3).map(|r| read_rank_dir(&three.join(format!("rank-{r:05}")))).collect();
        assert!(resharded.iter().all(|(h, _)| h["world_size"] == 3));

        // Exported: safetensors holds every tensor whole, byte for byte.
        let file = dir.path().join("tiny.safetensors");
        let r = ckpt(&server, &["--json", "export", "tiny", &step_s, "--out", file.to_str().unwrap()]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let bytes = std::fs::read(&file).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let meta = meta.metadata().clone().unwrap_or_default();
        assert_eq!(meta.get("root_hash"), Some(&cp.root.hash));
        assert_eq!(st.len(), cp.root.tensors.len());
        for layout in &cp.root.tensors {
            let view = st.tensor(&layout.name).unwrap();
            let shape: Vec<u64> = view.shape().iter().map(|&d| d as u64).collect();
            assert_eq!(shape, layout.global_shape, "{}", layout.name);
            let rows = layout.global_shape.first().copied().unwrap_or(1);
            let (whole, _) = c.load_rows(&cp, &layout.name, 0, rows).await.unwrap();
            assert!(view.data() == &whole[..], "{} exported", layout.name);
            assert!(assembled(&saved, &layout.name) == whole, "{} from restore --all", layout.name);
            assert!(assembled(&resharded, &layout.name) == whole, "{} from restore --world-size 3", layout.name);
        }
    })
    .await
}
