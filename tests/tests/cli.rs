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
        // A ckptd that takes connections and never answers (stopped with SIGSTOP, wedged): the
        // kernel completes the handshakes of a listener that accepts nothing. Reported after
        // --answer-timeout, not after retries for minutes.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let silent_url = format!("http://{}", silent.local_addr().unwrap());
        let quiet: Vec<Vec<&str>> = vec![
            vec!["ls"],
            vec!["show", "job"],
            vec!["verify", "--all"],
            vec!["rm", "job", "1"],
            vec!["gc", "job", "--dry-run"],
            vec!["gc", "--all", "--dry-run"],
        ];
        for args in &quiet {
            let started = std::time::Instant::now();
            let mut with_timeout = vec!["--answer-timeout", "1"];
            with_timeout.extend_from_slice(args);
            assert_fails(&silent_url, &with_timeout, 4, "no_answer");
            assert!(
                started.elapsed() < Duration::from_secs(12),
                "{args:?}: a silent ckptd took {:?}",
                started.elapsed()
            );
        }
        drop(silent);
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

/// A `--force` restore over an earlier one that fails part way (a corrupt chunk) leaves no
/// `tensors.json` claiming the earlier step beside files of the new one: the old labels go
/// first, and each rank's is written after its tensors.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_forced_restore_leaves_no_file_under_another_steps_label() {
    bounded(Duration::from_secs(120), async {
        let dir = tempfile::tempdir().unwrap();
        let d = start_daemon(&dir.path().join("ckptd")).await;
        let c = client(&d);
        let seed = seed(0x5eed_0502);
        for step in [1u64, 2] {
            let states: Vec<_> = (0..2).map(|r| rank_tensors(seed + step, r, 2, 1 << 20)).collect();
            save_step(&c, "job", step, &states).await.unwrap();
        }
        let out = dir.path().join("out");
        let server = d.url();
        let r = ckpt(&server, &["restore", "job", "1", "--all", "--out", out.to_str().unwrap()]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        // A chunk only rank 1 of step 2 names, flipped in the store.
        let (one, two) = (c.manifest("job", 1).await.unwrap(), c.manifest("job", 2).await.unwrap());
        let elsewhere: std::collections::BTreeSet<_> = one
            .chunk_set()
            .into_iter()
            .chain(two.ranks[0].tensors.iter().flat_map(|t| t.chunks.iter().map(|c| c.hash)))
            .collect();
        let victim = two.ranks[1]
            .tensors
            .iter()
            .flat_map(|t| t.chunks.iter().map(|c| c.hash))
            .find(|h| !elsewhere.contains(h))
            .expect("rank 1 of step 2 has a chunk of its own");
        let p = chunk_path(&dir.path().join("ckptd").join("store"), "job", &victim);
        let mut bytes = std::fs::read(&p).unwrap();
        let at = bytes.len() - 10;
        bytes[at] ^= 0x20;
        std::fs::write(&p, bytes).unwrap();
        let r = ckpt(&server, &["restore", "job", "2", "--all", "--force", "--out", out.to_str().unwrap()]);
        assert_eq!(r.code, 1, "a corrupt chunk fails the restore\n{}{}", r.stdout, r.stderr);
        for rank in 0..2 {
            let label = out.join(format!("rank-{rank:05}")).join("tensors.json");
            let Ok(text) = std::fs::read_to_string(&label) else { continue };
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(
                v["step"],
                2,
                "{} still says step {} after a failed restore of step 2",
                label.display(),
                v["step"]
            );
        }
        assert!(
            !out.join("rank-00001").join("tensors.json").exists(),
            "rank 1 failed, yet a tensors.json describes its files"
        );
        assert!(out.join("rank-00000").join("tensors.json").exists(), "rank 0 was restored whole and is labelled");

        // A corrupt chunk in a rank's last tensor: its first tensor streamed and verified
        // whole, yet no tensor file of the rank appears, and no partial file is left.
        let last = one.ranks[1].tensors.len() - 2;
        let victim = one.ranks[1].tensors[last].chunks[0].hash;
        assert!(
            !two.chunk_set().contains(&victim)
                && !one.ranks[0].tensors.iter().any(|t| t.chunks.iter().any(|c| c.hash == victim))
        );
        let p = chunk_path(&dir.path().join("ckptd").join("store"), "job", &victim);
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[0] ^= 0x01;
        std::fs::write(&p, bytes).unwrap();
        let fresh = dir.path().join("fresh");
        let r = ckpt(&server, &["restore", "job", "1", "--rank", "1", "--out", fresh.to_str().unwrap()]);
        assert_eq!(r.code, 1, "a corrupt chunk fails the restore\n{}{}", r.stdout, r.stderr);
        let left: Vec<_> =
            std::fs::read_dir(&fresh).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
        assert!(left.is_empty(), "a failed restore left {left:?}");
    })
    .await
}

/// Checkpoints of tensor-parallel layouts export and reshard whole: a scalar every rank holds
/// (an optimizer's step count), a weight split by columns (a row-parallel linear layer), a 2x2
/// grid of blocks, and tensors with a zero-size dimension.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn column_split_scalar_and_empty_tensors_export_and_reshard_whole() {
    bounded(Duration::from_secs(120), async {
        use ckpt_client::{DType, Tensor};
        let dir = tempfile::tempdir().unwrap();
        let d = start_daemon(&dir.path().join("ckptd")).await;
        // Element (r, c) of an R x C f32 tensor is r * 1000 + c.
        let value = |r: u64, c: u64| ((r * 1000 + c) as f32).to_le_bytes();
        let block = |name: &str, global: [u64; 2], off: [u64; 2], shape: [u64; 2]| Tensor {
            name: name.into(),
            dtype: DType::F32,
            shape: shape.to_vec(),
            global_shape: global.to_vec(),
            offsets: off.to_vec(),
            data: (0..shape[0])
                .flat_map(|r| (0..shape[1]).flat_map(move |c| value(off[0] + r, off[1] + c)))
                .collect::<Vec<u8>>()
                .into(),
        };
        let empty = |name: &str, global: Vec<u64>| Tensor::whole(name, DType::F32, global, bytes::Bytes::new());
        let ranks: Vec<Vec<Tensor>> = (0..4u64)
            .map(|r| {
                vec![
                    Tensor::whole("step", DType::I64, vec![], bytes::Bytes::copy_from_slice(&41i64.to_le_bytes())),
                    // Ranks 0-1 and 2-3 hold the same column halves (data-parallel replicas).
                    block("cols", [8, 4], [0, (r % 2) * 2], [8, 2]),
                    block("grid", [6, 10], [(r / 2) * 3, (r % 2) * 5], [3, 5]),
                    // 1.2 MB boxes of a 4.9 MB tensor: streamed with --buffer-mib 1, a block
                    // of rows ends inside a box and a rank's box takes two blocks.
                    block("wide", [2048, 600], [(r / 2) * 1024, (r % 2) * 300], [1024, 300]),
                    empty("no_rows", vec![0, 4]),
                    empty("no_cols", vec![4, 0]),
                ]
            })
            .collect();
        // A tensor only rank 0 saved (every tensor is in the checkpoint's layout; not every rank
        // holds every one).
        let mut ranks = ranks;
        ranks[0].push(Tensor::whole("only0", DType::U8, vec![3], bytes::Bytes::from_static(&[1, 2, 3])));
        save_step(&client(&d), "tp", 1, &ranks).await.unwrap();
        let server = d.url();
        let file = dir.path().join("tp.safetensors");
        let r = ckpt(&server, &["--json", "export", "tp", "1", "--buffer-mib", "1", "--out", file.to_str().unwrap()]);
        assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
        assert!(!dir.path().join("tp.safetensors.partial").exists(), "the temporary file was renamed");
        // Every tensor is read across the ranks: each rank's index object is fetched once for
        // the whole export, not once per tensor; with no index cache, once per tensor, and the
        // export says so before it starts.
        let fetched = |r: &Ran| serde_json::from_str::<Value>(&r.stdout).unwrap()["index_objects_fetched"].as_u64();
        assert!(fetched(&r).is_some_and(|n| n <= 4), "{}", r.stdout);
        assert!(!r.stderr.contains("note:"), "{}", r.stderr);
        let uncached = dir.path().join("uncached.safetensors");
        let args = ["--json", "export", "tp", "1", "--index-cache-mib", "0", "--out", uncached.to_str().unwrap()];
        let r = ckpt(&server, &args);
        assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
        assert!(fetched(&r).is_some_and(|n| n > 4), "{}", r.stdout);
        assert!(r.stderr.contains("more than --index-cache-mib 0"), "{}", r.stderr);
        let (a, b) = (std::fs::read(&uncached).unwrap(), std::fs::read(&file).unwrap());
        // Byte for byte: the header's metadata is written in a fixed order.
        assert!(a == b, "two exports of one checkpoint differ");
        let (a, b) =
            (safetensors::SafeTensors::deserialize(&a).unwrap(), safetensors::SafeTensors::deserialize(&b).unwrap());
        for name in b.names() {
            assert!(a.tensor(name).unwrap().data() == b.tensor(name).unwrap().data(), "{name} differs uncached");
        }
        let bytes = std::fs::read(&file).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let whole = |rows: u64, cols: u64| -> Vec<u8> {
            (0..rows).flat_map(|r| (0..cols).flat_map(move |c| value(r, c))).collect()
        };
        let t = st.tensor("wide").unwrap();
        assert_eq!(t.shape(), [2048, 600]);
        assert!(t.data() == whole(2048, 600).as_slice(), "the wide tensor's blocks were not put in place");
        // Only the tensors asked for; a glob that matches nothing is refused (exit 3), not
        // silently an empty file.
        let some = dir.path().join("some.safetensors");
        let r = ckpt(
            &server,
            &["export", "tp", "1", "--tensor", "w*", "--tensor", "st?p", "--out", some.to_str().unwrap()],
        );
        assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
        let some = std::fs::read(&some).unwrap();
        let mut names: Vec<String> =
            safetensors::SafeTensors::deserialize(&some).unwrap().names().into_iter().map(str::to_string).collect();
        names.sort_unstable();
        assert_eq!(names, ["step", "wide"]);
        let none = dir.path().join("none.safetensors");
        let r = ckpt(&server, &["export", "tp", "1", "--tensor", "model.*", "--out", none.to_str().unwrap()]);
        assert_eq!(r.code, 3, "{}{}", r.stdout, r.stderr);
        assert!(r.stderr.contains("model.*") && !none.exists(), "{}", r.stderr);
        // One rank's slices as it saved them, streamed in blocks of a box.
        let rank3 = dir.path().join("tp-rank3.safetensors");
        let r =
            ckpt(&server, &["export", "tp", "1", "--rank", "3", "--buffer-mib", "1", "--out", rank3.to_str().unwrap()]);
        assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
        let rank3 = std::fs::read(&rank3).unwrap();
        let st3 = safetensors::SafeTensors::deserialize(&rank3).unwrap();
        assert!(st3.tensor("wide").unwrap().data() == ranks[3][3].data, "rank 3's box of the wide tensor");
        // Its small slices, read in one batch.
        assert!(st3.tensor("cols").unwrap().data() == ranks[3][1].data, "rank 3's column half");
        assert!(st3.tensor("grid").unwrap().data() == ranks[3][2].data, "rank 3's grid block");
        let t = st.tensor("step").unwrap();
        assert!(t.shape().is_empty() && t.data() == 41i64.to_le_bytes(), "step: {:?}", t.shape());
        let t = st.tensor("cols").unwrap();
        assert_eq!(t.shape(), [8, 4]);
        assert!(t.data() == whole(8, 4).as_slice(), "the column halves were not put side by side");
        let t = st.tensor("grid").unwrap();
        assert_eq!(t.shape(), [6, 10]);
        assert!(t.data() == whole(6, 10).as_slice(), "the grid's blocks were not put in place");
        assert_eq!(st.tensor("no_rows").unwrap().shape(), [0, 4]);
        assert_eq!(st.tensor("no_cols").unwrap().shape(), [4, 0]);

        // Resharded to 3 ranks: the grid cut by rows (2 each), the others whole on each rank.
        let out = dir.path().join("three");
        let r = ckpt(
            &server,
            &["restore", "tp", "1", "--all", "--world-size", "3", "--buffer-mib", "1", "--out", out.to_str().unwrap()],
        );
        assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
        let mut wide_rows = 0;
        for rank in 0..3u64 {
            let (header, tensors) = read_rank_dir(&out.join(format!("rank-{rank:05}")));
            let mut names: Vec<&str> = tensors.iter().map(|(n, _, _)| n.as_str()).collect();
            names.sort_unstable();
            assert_eq!(names, ["cols", "grid", "no_cols", "no_rows", "only0", "step", "wide"], "{header}");
            let (_, grid, _) = tensors.iter().find(|(n, _, _)| n == "grid").unwrap();
            let expected: Vec<u8> =
                (rank * 2..rank * 2 + 2).flat_map(|r| (0..10).flat_map(move |c| value(r, c))).collect();
            assert!(grid[..] == expected[..], "rank {rank}'s rows of the grid");
            // 2048 rows over 3 ranks: 683, 683, 682.
            let (_, wide, off) = tensors.iter().find(|(n, _, _)| n == "wide").unwrap();
            let n = 682 + u64::from(rank < 2);
            assert_eq!(off[0], wide_rows, "rank {rank}'s first row of the wide tensor");
            let expected: Vec<u8> =
                (wide_rows..wide_rows + n).flat_map(|r| (0..600).flat_map(move |c| value(r, c))).collect();
            assert!(wide[..] == expected[..], "rank {rank}'s rows of the wide tensor");
            wide_rows += n;
        }
        // A rank as saved, its 1.2 MB box streamed in two blocks.
        let one = dir.path().join("one");
        let r =
            ckpt(&server, &["restore", "tp", "1", "--rank", "2", "--buffer-mib", "1", "--out", one.to_str().unwrap()]);
        assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
        let (_, tensors) = read_rank_dir(&one);
        let (_, wide, _) = tensors.iter().find(|(n, _, _)| n == "wide").unwrap();
        assert!(wide[..] == ranks[2][3].data[..], "rank 2's box of the wide tensor");
        let only = dir.path().join("only");
        let r =
            ckpt(&server, &["restore", "tp", "1", "--rank", "2", "--tensor", "grid", "--out", only.to_str().unwrap()]);
        assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
        let (_, tensors) = read_rank_dir(&only);
        assert_eq!(tensors.len(), 1);
        assert!(tensors[0].0 == "grid" && tensors[0].1[..] == ranks[2][2].data[..], "rank 2's grid block alone");
        // Forced over earlier restores, a restore leaves only the files its label lists: fewer
        // tensors over a whole rank, `--all` over one rank, one rank over `--all`.
        let files = |dir: &Path| -> Vec<String> {
            let mut names: Vec<String> = std::fs::read_dir(dir)
                .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
                .unwrap_or_default();
            names.sort();
            names
        };
        assert!(files(&one).len() > 2, "{:?}", files(&one));
        std::fs::write(one.join(".t00007.bin.partial"), b"left by a killed restore").unwrap();
        let r = ckpt(
            &server,
            &["restore", "tp", "1", "--rank", "2", "--tensor", "grid", "--force", "--out", one.to_str().unwrap()],
        );
        assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
        assert_eq!(files(&one), ["t00000.bin", "tensors.json"]);
        let r = ckpt(
            &server,
            &["restore", "tp", "1", "--all", "--world-size", "2", "--force", "--out", one.to_str().unwrap()],
        );
        assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
        assert_eq!(files(&one), ["rank-00000", "rank-00001"]);
        let r = ckpt(&server, &["restore", "tp", "1", "--rank", "2", "--force", "--out", one.to_str().unwrap()]);
        assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
        assert!(files(&one).iter().all(|f| !f.starts_with("rank-")), "{:?}", files(&one));
        // A rank holding none of the tensors asked for is refused, not written empty.
        let none = dir.path().join("none");
        let r =
            ckpt(&server, &["restore", "tp", "1", "--rank", "2", "--tensor", "only*", "--out", none.to_str().unwrap()]);
        assert_eq!(r.code, 3, "{}{}", r.stdout, r.stderr);
        assert!(r.stderr.contains("rank 2 holds no tensor"), "{}", r.stderr);
        // A corrupt chunk in the second block of a streamed tensor, after the rank's small
        // tensors were read in one batch and written: no file of the rank is left.
        let m = client(&d).manifest("tp", 1).await.unwrap();
        let wide = m.ranks[2].tensors.iter().find(|t| t.name == "wide").unwrap();
        assert_eq!(wide.chunks.len(), 2, "a 1.2 MB box in 1 MiB chunks");
        let p = chunk_path(&dir.path().join("ckptd").join("store"), "tp", &wide.chunks[1].hash);
        let mut bytes = std::fs::read(&p).unwrap();
        let at = bytes.len() - 10;
        bytes[at] ^= 0x20;
        std::fs::write(&p, bytes).unwrap();
        let broken = dir.path().join("broken");
        let r = ckpt(
            &server,
            &["restore", "tp", "1", "--rank", "2", "--buffer-mib", "1", "--out", broken.to_str().unwrap()],
        );
        assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
        let left: Vec<_> =
            std::fs::read_dir(&broken).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
        assert!(left.is_empty(), "a failed restore left {left:?}");
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
