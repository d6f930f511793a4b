//! Durability against a power cut, not only a SIGKILL (which keeps the page cache): ckptd runs
//! under strace, saves go through every path that makes bytes durable (HTTP uploads staged in
//! memory and on the spill disk, node-local adopt by rename, node-local adopt by copy across
//! filesystems, an `AsyncSaver`'s shared-memory segment written with direct I/O), ckptd is SIGKILLed right after the last ack, and `fsync_audit` replays the
//! trace: at every root creation, every spilled chunk's upload and at the end, nothing promised
//! may be volatile. Then each fsync site is switched off in turn (a test-only fail point) and
//! the audit must name what it left volatile: the test can fail.
//!
//! The audit's model also gives what a power cut would take back; a second test kills ckptd in
//! the middle of a save, applies that to its directories (`fsync_audit::power_cut`: unsynced
//! bytes emptied, zeroed or cut, unsynced names removed, unsynced renames undone; in half the
//! runs sled's files too), starts a plain ckptd on what is left and checks that every acked
//! checkpoint restores bit for bit and the interrupted save commits when the trainer retries it.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use ckpt_client::daemon::{DaemonOptions, LocalDaemon};
use ckpt_client::Tensor;
use ckpt_tests::fsync_audit::{audit, losses_at_end, power_cut, Layout};
use ckpt_tests::*;
use rand::{Rng, SeedableRng};

const TRACED: &str = "openat,open,creat,syncfs,mkdir,mkdirat,rename,renameat,renameat2,link,linkat,unlink,unlinkat,\
write,pwrite64,writev,pwritev,pwritev2,ftruncate,fallocate,copy_file_range,fsync,fdatasync";

/// The pid of ckptd under strace: `d` runs strace, whose one child is ckptd.
fn traced_ckptd_pid(d: &LocalDaemon) -> i32 {
    let strace_pid = d.pid().expect("ckptd under strace is running");
    let children = std::fs::read_to_string(format!("/proc/{strace_pid}/task/{strace_pid}/children")).unwrap();
    children.split_whitespace().next().and_then(|p| p.parse().ok()).expect("ckptd's pid")
}

fn strace() -> std::path::PathBuf {
    let found = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join("strace")).find(|p| p.is_file()));
    found.unwrap_or_else(|| {
        panic!("this test needs strace (apt-get install strace; .ci/run installs it): it audits ckptd's fsyncs")
    })
}

/// Which paths a run takes: over HTTP (memory and spill) and node-local, node-local with the
/// handoff directory on another filesystem (adopt copies), or `AsyncSaver`s whose staging
/// buffers are shared-memory segments.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Paths {
    HttpAndAdopt,
    AdoptAcrossFilesystems,
    Segments,
}

/// What a traced run left: the audit's findings, and all a power cut and restart need.
struct Traced {
    found: Vec<String>,
    trace: String,
    /// Stopped; its options name the strace wrapper.
    daemon: LocalDaemon,
    top: std::path::PathBuf,
    shm_top: std::path::PathBuf,
    /// Steps whose save was acked (committed), with each rank's tensors.
    acked: Vec<(u64, Vec<Vec<Tensor>>)>,
    /// A step whose save the kill interrupted.
    interrupted: Option<(u64, Vec<Vec<Tensor>>)>,
    /// Steps whose delete was acked.
    deleted: Vec<u64>,
    /// The bytes of the roots those deletes removed.
    removed: std::collections::HashMap<std::path::PathBuf, Vec<u8>>,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

/// A third save (over HTTP, many chunks) that ckptd is killed during: when `progress` chunks
/// of it have been staged or uploaded, or right after its ack if that comes first.
#[derive(Clone, Copy)]
struct Cut {
    seed: u64,
    progress: u64,
}

/// Runs the saves under strace with `failpoint` armed and audits the trace.
async fn traced_saves(paths: Paths, failpoint: Option<&str>, cut: Option<Cut>) -> Traced {
    let strace = strace();
    let dir = tempfile::tempdir().unwrap();
    let top = dir.path().canonicalize().unwrap();
    let trace = top.join("trace");
    let wrapper = top.join("ckptd-traced");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec {} -f -qq -y -s 0 -e trace={TRACED} -o {} -- {} \"$@\"\n",
            strace.display(),
            trace.display(),
            ckptd_exe().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut o = DaemonOptions::in_dir(wrapper, &top);
    if let Some(fp) = failpoint {
        o.envs.push(("FAILPOINTS".into(), format!("{fp}=return")));
    }
    // A small memory budget sends some chunks of the HTTP save to the spill disk.
    let mut cfg = "staging_memory_bytes_max = 1048576\nupload_concurrency = 2\n".to_string();
    let shm = tempfile::tempdir_in("/dev/shm").expect("a writable /dev/shm (tmpfs) as a second filesystem");
    let shm_top = shm.path().canonicalize().unwrap();
    let mut handoff = top.join("state/handoff");
    let mut spill = top.join("state/spill");
    if paths == Paths::HttpAndAdopt {
        // The spill disk apart from the store, as in production (local NVMe, remote store): on
        // one filesystem the store's group syncfs would also cover an unsynced spill file,
        // depending on timing, and switching off the spill's own fsync could go unseen.
        spill = shm_top.join("spill");
        cfg += &format!("spill_dir = {:?}\n", spill.to_str().unwrap());
    }
    if paths == Paths::AdoptAcrossFilesystems {
        handoff = shm_top.join("handoff");
        let (a, b) = (std::fs::metadata(&top).unwrap().dev(), std::fs::metadata(shm.path()).unwrap().dev());
        assert_ne!(a, b, "/dev/shm and the test directory are one filesystem here; the copy path cannot be reached");
        cfg += &format!("handoff_dir = {:?}\n", handoff.to_str().unwrap());
    }
    // The index apart from the store too: each journal flush ends with a syncfs of the index's
    // filesystem, which on the store's would make every store write durable by chance and hide
    // a skipped store fsync from the checks below.
    let index = shm_top.join("index");
    std::fs::create_dir_all(&index).unwrap();
    std::fs::create_dir_all(top.join("state")).unwrap();
    std::os::unix::fs::symlink(&index, top.join("state/index")).unwrap();
    std::fs::write(top.join("ckptd.toml"), cfg).unwrap();
    o.extra_args = vec!["--config".into(), top.join("ckptd.toml").into_os_string()];
    let mut d = start_daemon_with(o).await;
    let seed = seed(0x5eed_0808);
    let states = |s: u64| (0..2).map(|r| rank_tensors(s, r, 2, 3 << 20)).collect::<Vec<_>>();
    let mut acked = Vec::new();
    if paths == Paths::HttpAndAdopt {
        save_step(&client(&d), "job", 1, &states(seed)).await.unwrap();
        acked.push((1, states(seed)));
        let s = stats(&d).await;
        assert!(s["staging"]["chunks_staged_spill"].as_u64() > Some(0), "no chunk went to the spill disk: {s}");
        assert!(s["staging"]["chunks_staged_memory"].as_u64() > Some(0), "no chunk was staged in memory: {s}");
    }
    if paths == Paths::Segments {
        let lc = local_client(&d);
        let st = states(seed + 2);
        let savers: Vec<_> = (0..2).map(|_| ckpt_client::AsyncSaver::new(lc.clone(), 4 << 20)).collect();
        let mut tickets = Vec::new();
        for (r, s) in savers.iter().enumerate() {
            let views: Vec<_> = st[r].iter().map(|t| t.view()).collect();
            tickets.push(s.save(spec("job", 3, r as u32, 2), &views, ckpt_client::Wait::Committed).await.unwrap());
        }
        for t in tickets {
            t.finish().await.unwrap();
        }
        acked.push((3, st));
        let s = stats(&d).await;
        assert!(s["segments"]["chunks_stored"].as_u64() > Some(0), "no chunk came through a segment: {s}");
    } else {
        save_step(&local_client(&d), "job", 2, &states(seed + 1)).await.unwrap();
        acked.push((2, states(seed + 1)));
    }
    // Chunks acked on their own, no index naming them yet: from the ack the store's copy is the
    // only one (the handoff file is gone) and ckptd's journal counts it durable, so the end
    // check requires it durable. Nothing syncs the whole store after them (the delete and the
    // pins below sync their own directories), whereas within a save the group syncs of other
    // chunks' writes can cover a skipped adopt sync by chance before its root.
    let mut lone = Vec::new();
    if paths != Paths::Segments {
        let lc = local_client(&d);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x10e);
        for _ in 0..4 {
            let mut b = vec![0u8; 64 << 10];
            rng.fill(&mut b[..]);
            let b = bytes::Bytes::from(b);
            let hash = ckpt_core::ChunkHash::of(&b);
            lc.put_chunk("job", hash, b).await.unwrap();
            lone.push(hash);
        }
    }
    let mut deleted = Vec::new();
    let mut removed = std::collections::HashMap::new();
    if paths == Paths::HttpAndAdopt {
        // The root's bytes, so that a cut that undid its removal can be replayed.
        let root = top.join("store").join(ckpt_core::keys::manifest_key("job", 1));
        removed.insert(root.clone(), std::fs::read(&root).expect("step 1's root"));
        client(&d).delete("job", 1, false).await.unwrap();
        acked.retain(|(step, _)| *step != 1);
        deleted.push(1);
        // A pin taken back: its removal is acked, so the end check covers it.
        client(&d).pin("job", 2, true).await.unwrap();
        client(&d).pin("job", 2, false).await.unwrap();
    }
    let mut interrupted = None;
    let mut cut_off = None;
    if let Some(Cut { seed: cut, progress: kill_at }) = cut {
        // 2 ranks x 2 tensors x 4 chunks of 1 MiB (the scalars are known from the earlier
        // steps): 16 chunks staged, then 16 uploaded, then the indexes and the commit.
        let big: Vec<Vec<Tensor>> = (0..2).map(|r| rank_tensors(cut, r, 2, 8 << 20)).collect();
        let progress = |s: &serde_json::Value| {
            ["chunks_staged_spill", "chunks_staged_memory", "chunks_uploaded"]
                .iter()
                .map(|k| s["staging"][k].as_u64().unwrap_or(0))
                .sum::<u64>()
        };
        let before = progress(&stats(&d).await);
        let at = before.saturating_add(kill_at);
        let (c, b) = (client(&d), big.clone());
        let save = tokio::spawn(async move { save_step(&c, "job", 4, &b).await });
        let acked_before_the_kill = loop {
            if save.is_finished() {
                break true;
            }
            if progress(&stats(&d).await) >= at {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        if acked_before_the_kill {
            save.await.unwrap().expect("the third save, uninterrupted");
            acked.push((4, big));
        } else {
            // Cut off when ckptd is, not before: ckptd must not see the client go first.
            cut_off = Some((save, big));
        }
        eprintln!("cut seed {cut}: kill at {kill_at} chunks staged or uploaded");
    }
    // SIGKILL ckptd (strace's child) at once: nothing after the last ack may fix a missing sync.
    let ckptd_pid = traced_ckptd_pid(&d);
    // SAFETY: kill(2) on a child process we started; no memory is involved.
    unsafe {
        libc::kill(ckptd_pid, libc::SIGKILL);
    }
    d.wait_exit(Duration::from_secs(30)).await.expect("strace ends with its tracee");
    if let Some((mut save, big)) = cut_off {
        // Acked between the last look and the kill, or not: the client's answer decides.
        match tokio::time::timeout(Duration::from_secs(2), &mut save).await {
            Ok(Ok(Ok(_))) => acked.push((4, big)),
            _ => interrupted = Some((4, big)),
        }
        save.abort();
        eprintln!("the third save was acked before the kill: {}", interrupted.is_none());
    }
    let text = std::fs::read_to_string(&trace).unwrap();
    assert!(text.contains("fsync("), "the trace holds no fsync at all; is strace working?");
    for hash in &lone {
        assert!(
            text.contains(&format!("{}/{hash}.", handoff.display())),
            "chunk {hash} did not come as a handoff file"
        );
    }
    let store = top.join("store");
    let other_filesystems = [shm_top.as_path()];
    let found = audit(
        &text,
        &Layout { top: &top, store: &store, spill: &spill, foreign: &handoff, other_filesystems: &other_filesystems },
    );
    // The store is whole after the kill too (as a SIGKILL-only test would see it).
    assert_manifests_complete(Path::new(&store));
    Traced { found, trace: text, daemon: d, top, shm_top, acked, interrupted, deleted, removed, _dirs: (dir, shm) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_acked_save_is_fsynced_and_each_fsync_site_is_needed() {
    bounded(Duration::from_secs(900), async {
        for paths in [Paths::HttpAndAdopt, Paths::AdoptAcrossFilesystems, Paths::Segments] {
            let found = traced_saves(paths, None, None).await.found;
            assert!(found.is_empty(), "{paths:?}: volatile at a durability promise:\n{}", found.join("\n"));
        }
        // Each site switched off alone must be caught, on the path that uses it.
        let sites = [
            // Roots, index objects and pins go through object_store's local backend. The Segments run ends
            // with its root; the others adopt chunks after theirs, whose group syncs cover it.
            (Paths::Segments, "store::skip_fsync"),
            // A checkpoint's delete (its root's removal).
            (Paths::HttpAndAdopt, "store::skip_delete_sync"),
            (Paths::HttpAndAdopt, "staging::skip_spill_fsync"),
            (Paths::HttpAndAdopt, "durable::skip_rename_dir_fsync"),
            // The chunk directories are new to the adopt across filesystems (on the HTTP path
            // they are created by direct writes, covered by the group syncs).
            (Paths::AdoptAcrossFilesystems, "durable::skip_new_dir_fsync"),
            (Paths::HttpAndAdopt, "adopt::skip_fsync"),
            // HTTP uploads to a local-directory store are written like segment chunks.
            (Paths::HttpAndAdopt, "durable::skip_file_fsync"),
            (Paths::AdoptAcrossFilesystems, "durable::skip_file_fsync"),
            (Paths::Segments, "durable::skip_file_fsync"),
        ];
        // A site is needed when some run leaves a promise volatile without it. One run may not
        // show it: a group syncfs another upload started at the right moment covers the skipped
        // fsync by chance (then nothing was lost in that run). A few runs each, stop at the first
        // finding; a site no run needs fails the test.
        const RUNS: usize = 5;
        for (paths, site) in sites {
            let mut runs = 0;
            let found = loop {
                runs += 1;
                let found = traced_saves(paths, Some(site), None).await.found;
                if !found.is_empty() || runs == RUNS {
                    break found;
                }
            };
            assert!(
                !found.is_empty(),
                "with {site} switched off the audit found nothing in {RUNS} runs ({paths:?}): it cannot see that fsync"
            );
            eprintln!("{site} ({paths:?}): {} findings in run {runs}, first: {}", found.len(), found[0]);
        }
    })
    .await
}

/// Restores every rank of `job`@`step` and compares it with what was saved.
async fn assert_restores(c: &ckpt_client::Client, step: u64, states: &[Vec<Tensor>]) {
    for (r, want) in states.iter().enumerate() {
        let got = c.load_rank("job", step, r as u32).await.unwrap_or_else(|e| panic!("step {step} rank {r}: {e}"));
        assert_eq!(got.len(), want.len(), "step {step} rank {r}");
        for (g, w) in got.iter().zip(want) {
            assert!(g.name == w.name && g.data == w.data, "step {step} rank {r} tensor {} differs", w.name);
        }
    }
    let report = c.verify("job", step, |_| {}).await.unwrap();
    assert!(report.corrupt.is_empty(), "step {step}: {:?}", report.corrupt);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_a_power_cut_mid_save_every_acked_checkpoint_restores_and_the_save_commits_on_retry() {
    bounded(Duration::from_secs(900), async {
        let seed = seed(0xc07_0001);
        const RUNS: u64 = 8;
        let mut cut_anything = false;
        let (mut index_cut, mut set_aside) = (0, 0);
        let (mut interrupted, mut after_ack) = (0, 0);
        for run in 0..RUNS {
            let cut = seed.wrapping_add(run);
            // Mid-save at a seeded point (16 chunks staged, 16 uploaded, then the indexes and
            // the commit); the last run right after the ack.
            let progress =
                if run + 1 == RUNS { u64::MAX } else { rand::rngs::StdRng::seed_from_u64(cut).random_range(1..=34) };
            let mut t = traced_saves(Paths::HttpAndAdopt, None, Some(Cut { seed: cut, progress })).await;
            if t.interrupted.is_some() {
                interrupted += 1;
            } else {
                after_ack += 1;
            }
            // The end check assumes the kill came right after the last ack. With a save under
            // way, what it has in flight carries no promise yet; the acked steps' objects were
            // checked at their roots' creation, and spilled chunks at their uploads. The delete
            // was acked before that save began: its root's removal is checked in every run.
            let found: Vec<_> = t
                .found
                .iter()
                .filter(|f| t.interrupted.is_none() || !f.starts_with("at the end") || f.contains("removal of"))
                .collect();
            assert!(found.is_empty(), "cut seed {cut}: volatile at a durability promise:\n{found:?}");
            let others = [t.shm_top.as_path()];
            let lost = losses_at_end(&t.trace, &others);
            // sled's files: in even runs kept as written, one outcome a cut allows (its log is
            // appended and its recovery keeps what was flushed); in odd runs cut like any other
            // file with unsynced bytes, whole (harsher than a disk, which loses the unsynced
            // tail), so sled may refuse the index, which ckptd then sets aside and rebuilds
            // from the store. The log is the test's, not ckptd's. The index is reached through
            // a link under the state directory as well.
            let (index, link, log) = (t.shm_top.join("index"), t.top.join("state/index"), t.top.join("ckptd.log"));
            let damage_index = run % 2 == 1;
            let mut keep = vec![log.as_path()];
            if !damage_index {
                keep.extend([index.as_path(), link.as_path()]);
            }
            let done = power_cut(&lost, &keep, &t.removed, cut);
            index_cut += usize::from(done.iter().any(|l| l.contains("/index/")));
            eprintln!("cut seed {cut}: the cut took back {} things:\n  {}", done.len(), done.join("\n  "));
            cut_anything |= done.iter().any(|l| !l.starts_with("not applied"));

            // A plain ckptd on what the disk holds now.
            t.daemon.options_mut().exe = ckptd_exe();
            let logged = daemon_log(&t.daemon).len();
            t.daemon
                .restart()
                .await
                .unwrap_or_else(|e| panic!("cut seed {cut}: ckptd did not start after the cut: {e}"));
            if daemon_log(&t.daemon)[logged..].contains("index_set_aside: true") {
                eprintln!("cut seed {cut}: sled could not read the index; ckptd set it aside and rebuilt it");
                set_aside += 1;
            }
            let c = client(&t.daemon);
            let listed: Vec<u64> = c.list("job").await.unwrap().committed.iter().map(|m| m.step).collect();
            for (step, states) in &t.acked {
                assert!(
                    listed.contains(step),
                    "cut seed {cut}: acked step {step} not listed after the cut: {listed:?}"
                );
                assert_restores(&c, *step, states).await;
            }
            for step in &t.deleted {
                assert!(
                    !listed.contains(step),
                    "cut seed {cut}: deleted step {step} is back after the cut: {listed:?}"
                );
            }
            if let Some((step, states)) = &t.interrupted {
                save_step(&c, "job", *step, states)
                    .await
                    .unwrap_or_else(|e| panic!("cut seed {cut}: the interrupted save, retried: {e}"));
                assert_restores(&c, *step, states).await;
            }
            assert_manifests_complete(&t.top.join("store"));
        }
        assert!(cut_anything, "in {RUNS} runs the cut took nothing back: the image is the killed process's");
        // Whether sled has unsynced bytes at the kill is timing (its own flusher runs every
        // 500 ms), so these are reported, not required; `conformance/rebuild.rs` damages the
        // index deterministically.
        eprintln!("the cut reached sled's files in {index_cut} of {RUNS} runs; {set_aside} started on an index sled could not read");
        assert!(
            interrupted > 0 && after_ack > 0,
            "{interrupted} runs cut mid-save, {after_ack} after the ack: want both"
        );
    })
    .await
}

/// A state disk that fails its writes makes ckptd not ready: strace fails (EIO, as a dying disk
/// does) every fsync of the file `/readyz` writes into the state directory. ckptd stays alive
/// (`/healthz`). (That a disk taking writes again is ready again: ready.rs's unit tests.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_disk_that_fails_its_fsyncs_makes_ckptd_not_ready() {
    bounded(Duration::from_secs(60), async {
        let strace = strace();
        let dir = tempfile::tempdir().unwrap();
        let top = dir.path().canonicalize().unwrap();
        let probe = top.join("state").join("readyz-probe");
        let wrapper = top.join("ckptd-failing-disk");
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nexec {} -f -qq -o /dev/null -P {} -e trace=fsync,fdatasync \
                 -e inject=fsync,fdatasync:error=EIO -- {} \"$@\"\n",
                strace.display(),
                probe.display(),
                ckptd_exe().display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
        let d = LocalDaemon::start(DaemonOptions::in_dir(wrapper, &top)).await.unwrap();
        // Dropping `d` kills strace, which (6.1 has no --kill-on-exit) leaves ckptd running:
        // ckptd, strace's child, is killed when this test ends, however it ends.
        struct KillOnDrop(i32);
        impl Drop for KillOnDrop {
            fn drop(&mut self) {
                // SAFETY: kill(2) on a process this test started; no memory is involved.
                unsafe {
                    libc::kill(self.0, libc::SIGKILL);
                }
            }
        }
        let _ckptd = KillOnDrop(traced_ckptd_pid(&d));
        let http = reqwest::Client::new();
        let get = |path: &str| http.get(format!("{}{path}", d.url())).send();

        for probe_no in 1..=3 {
            let r = get("/readyz").await.unwrap();
            assert_eq!(r.status(), 503, "probe {probe_no} of a failing disk\n{}", daemon_log(&d));
            let body: serde_json::Value = r.json().await.unwrap();
            assert_eq!(body["error"]["code"], "not_ready", "{body}");
            let message = body["error"]["message"].as_str().unwrap();
            assert!(message.contains("state disk") && message.contains("readyz-probe"), "{message}");
            assert!(message.contains("Input/output error") || message.contains("os error 5"), "{message}");
            assert_eq!(get("/healthz").await.unwrap().status(), 200, "alive, if not ready");
        }
    })
    .await
}
