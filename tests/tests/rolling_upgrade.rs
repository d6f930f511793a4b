//! A rolling upgrade on two nodes sharing one store: node A still runs the previous release of
//! ckptd (built by `.ci/build-previous-ckptd` into `target/previous/ckptd`, or named by
//! `CKPTD_PREVIOUS_BIN`), node B this one. Checkpoints either writes restore from the other; a
//! save split over both fails visibly at the old node (the client refuses its answer) and
//! leaves no root; once A runs this release on its old state, the same save commits once and
//! restores from both.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use ckpt_client::daemon::{DaemonOptions, LocalDaemon};
use ckpt_client::{Client, ClientError, ClientOptions, SavePhase, Tensor, Wait};
use ckpt_tests::*;

fn previous_ckptd() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("CKPTD_PREVIOUS_BIN") {
        return Some(PathBuf::from(p));
    }
    let p = ckptd_exe().parent()?.parent()?.join("previous").join("ckptd");
    p.is_file().then_some(p)
}

fn node_client(d: &LocalDaemon) -> Client {
    let opts = ClientOptions { chunk_bytes: 1 << 20, node_local: false, epoch: Some(1), ..Default::default() };
    Client::new(&d.url(), opts).unwrap()
}

async fn save_all(c: &Client, job: &str, step: u64, states: &[Vec<Tensor>]) {
    let world = states.len() as u32;
    let saves = states.iter().enumerate().map(|(r, t)| {
        let s = spec(job, step, r as u32, world);
        async move { c.save(&s, t, Wait::Committed).await }
    });
    futures::future::try_join_all(saves).await.unwrap_or_else(|e| panic!("{job}@{step}: {e}"));
}

async fn assert_restores(nodes: &[&LocalDaemon], job: &str, step: u64, states: &[Vec<Tensor>]) {
    for d in nodes {
        let c = node_client(d);
        for (r, want) in states.iter().enumerate() {
            let got = c.load_rank(job, step, r as u32).await.unwrap_or_else(|e| panic!("{job}@{step} rank {r}: {e}"));
            assert!(got == *want, "{job}@{step} rank {r} from {}", d.url());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn old_and_new_nodes_share_a_store_and_a_split_save_commits_once_both_are_new() {
    let Some(previous) = previous_ckptd() else {
        // CI builds it whenever the checkout holds the previous release's commit; only a
        // shallow clone may skip.
        let shallow = Command::new("git")
            .args(["rev-parse", "--is-shallow-repository"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() != "false")
            .unwrap_or(true);
        assert!(
            std::env::var_os("CI").is_none() || shallow,
            "CI without target/previous/ckptd in a full clone: .ci/build-previous-ckptd did not run"
        );
        eprintln!(
            "SKIPPED rolling_upgrade: no previous ckptd (run .ci/build-previous-ckptd, or set CKPTD_PREVIOUS_BIN); \
             .ci/run builds it when the checkout has the previous release's commit"
        );
        return;
    };
    bounded(Duration::from_secs(300), async {
        let seed = seed(0x5eed_0401);
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store").to_string_lossy().into_owned();
        let node = |exe: PathBuf, name: &str| DaemonOptions {
            store: store.clone(),
            ..DaemonOptions::in_dir(exe, &dir.path().join(name))
        };
        let mut a = start_daemon_with(node(previous.clone(), "a")).await;
        let b = start_daemon_with(node(ckptd_exe(), "b")).await;

        // Whole saves on either node restore from the other: the root's format is unchanged.
        let one: Vec<_> = (0..2).map(|r| rank_tensors(seed, r, 2, 2 << 20)).collect();
        save_all(&node_client(&a), "on-old", 1, &one).await;
        save_all(&node_client(&b), "on-new", 1, &one).await;
        assert_restores(&[&a, &b], "on-old", 1, &one).await;
        assert_restores(&[&a, &b], "on-new", 1, &one).await;

        // A save split over both: ranks 0-1 on B (the leader), ranks 2-3 on the old node A.
        let world = 4u32;
        let split: Vec<_> = (0..world).map(|r| rank_tensors(seed + 1, r, world, 2 << 20)).collect();
        let split_spec = |r: u32| {
            let mut s = spec("split", 1, r, world);
            s.node_ranks = Some(if r < 2 { (0, 2) } else { (2, 4) });
            s
        };
        for r in 0..2 {
            node_client(&b).save(&split_spec(r), &split[r as usize], Wait::Staged).await.unwrap();
        }
        // B's chunks land, its part is written, and it waits for A's.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while node_client(&b).save_status("split", 1).await.unwrap().phase != SavePhase::Durable {
            assert!(std::time::Instant::now() < deadline, "B's half of the save never became durable");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for r in 2..4 {
            let err = node_client(&a).save(&split_spec(r), &split[r as usize], Wait::Staged).await.unwrap_err();
            assert!(
                matches!(&err, ClientError::Protocol(m) if m.contains("split over nodes")),
                "the old node's answer is refused: {err}"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(node_client(&b).checkpoint("split", 1).await.is_err(), "no root while a node cannot write its part");

        // A is upgraded in place: this release on the previous release's state.
        a.terminate(Duration::from_secs(10)).await;
        a.options_mut().exe = ckptd_exe();
        a.restart().await.unwrap();
        let upgraded = (2..4).map(|r| {
            let (c, s, t) = (node_client(&a), split_spec(r), &split[r as usize]);
            async move { c.save(&s, t, Wait::Committed).await }
        });
        match tokio::time::timeout(Duration::from_secs(60), futures::future::try_join_all(upgraded)).await {
            Ok(Ok(_)) => {}
            outcome => panic!(
                "ranks 2-3 through the upgraded node: {outcome:?}\n--- A ---\n{}\n--- B ---\n{}",
                daemon_log(&a),
                daemon_log(&b)
            ),
        }
        let ha = node_client(&a).wait_committed("split", 1).await.unwrap().manifest_hash;
        let hb = node_client(&b).wait_committed("split", 1).await.unwrap().manifest_hash;
        assert_eq!(ha, hb);
        assert_restores(&[&a, &b], "split", 1, &split).await;
        assert_restores(&[&a, &b], "on-old", 1, &one).await;
        let c = node_client(&a);
        assert_eq!(c.list("split").await.unwrap().committed.len(), 1);
        assert!(c.verify("split", 1, |_| {}).await.unwrap().ok());
    })
    .await
}
