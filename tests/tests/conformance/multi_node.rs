//! Several ckptd nodes, one job: each node serves its host's ranks, and the nodes commit each
//! step exactly once between them with the store as the only coordination (ckpt-core
//! `part.rs`). Three nodes on one store; a node killed (SIGKILL, from a fail point) at each
//! point of the commit module; a node that never comes back.

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use ckpt_client::daemon::LocalDaemon;
use ckpt_client::{Client, ClientOptions, SavePhase, Tensor, Wait};
use ckpt_tests::backend::{Backend, TestStore};
use ckpt_tests::*;

ckpt_tests::conformance!(420;
    three_nodes_commit_each_step_once_and_any_node_restores,
    a_node_that_aborts_its_share_stops_the_commit_and_the_epoch,
    a_node_killed_at_each_commit_fail_point_then_the_save_completes,
    a_node_that_never_returns_fails_the_save_visibly,
);

const NODES: usize = 3;
const PER_NODE: u32 = 2;
const WORLD: u32 = NODES as u32 * PER_NODE;
const EPOCH: u64 = 1;

fn node_of(rank: u32) -> usize {
    (rank / PER_NODE) as usize
}

fn node_ranks(node: usize) -> (u32, u32) {
    (node as u32 * PER_NODE, (node as u32 + 1) * PER_NODE)
}

/// A rank's client of its own node: HTTP, the job's epoch, patient or not.
fn rank_client(d: &LocalDaemon, patient: bool) -> Client {
    let mut opts = ClientOptions { chunk_bytes: 1 << 20, node_local: false, epoch: Some(EPOCH), ..Default::default() };
    if !patient {
        opts.attempts_max = 2;
        opts.retry_base = Duration::from_millis(10);
        opts.busy_retry_for = Duration::ZERO;
        opts.commit_timeout = Duration::from_secs(60);
    }
    Client::new(&d.url(), opts).expect("client")
}

fn rank_spec(job: &str, step: u64, rank: u32) -> ckpt_client::SaveSpec {
    let mut s = spec(job, step, rank, WORLD);
    s.node_ranks = Some(node_ranks(node_of(rank)));
    s
}

/// Three nodes on one store; `failpoint` armed in node `victim`'s environment.
async fn start_nodes(store: &TestStore, dir: &std::path::Path, victim: Option<(usize, &str)>) -> Vec<LocalDaemon> {
    let cfg = dir.join("ckptd.toml");
    // Short waits so takeovers and idle aborts happen within a test.
    std::fs::write(&cfg, "commit_retry_ms = 200\npart_takeover_ms = 1500\nsave_idle_abort_ms = 10000\n").unwrap();
    let mut nodes = Vec::new();
    for i in 0..NODES {
        let mut o = store.daemon_options(&dir.join(format!("node{i}")));
        o.extra_args.extend(["--config".into(), cfg.clone().into_os_string()]);
        if let Some((_, fp)) = victim.filter(|(v, _)| *v == i) {
            o.envs.push(("FAILPOINTS".into(), fp.into()));
        }
        nodes.push(start_daemon_with(o).await);
    }
    nodes
}

fn states(seed: u64) -> Vec<Vec<Tensor>> {
    (0..WORLD).map(|r| rank_tensors(seed, r, WORLD, 2 << 20)).collect()
}

/// Every node reports the step committed with one hash, the store holds exactly one root for
/// it, and every rank restores from every node.
async fn assert_committed_everywhere(store: &TestStore, nodes: &[LocalDaemon], step: u64, states: &[Vec<Tensor>]) {
    let mut hashes = Vec::new();
    for (i, d) in nodes.iter().enumerate() {
        let s = rank_client(d, true)
            .wait_committed("job", step)
            .await
            .unwrap_or_else(|e| panic!("node {i}, step {step}: {e}\n{}", daemon_log(d)));
        hashes.push(s.manifest_hash.expect("a committed save names its root"));
    }
    assert!(hashes.windows(2).all(|w| w[0] == w[1]), "nodes disagree on the root of step {step}: {hashes:?}");
    let roots: Vec<_> = store.manifests().await.into_iter().filter(|m| m.step == step).collect();
    assert_eq!(roots.len(), 1, "one root for step {step}");
    assert_eq!(roots[0].hash, hashes[0]);
    assert_eq!(roots[0].world_size, WORLD);
    for d in nodes {
        let c = rank_client(d, true);
        for r in 0..WORLD {
            assert!(c.load_rank("job", step, r).await.unwrap() == states[r as usize], "step {step} rank {r}");
        }
    }
    assert!(rank_client(&nodes[2], true).verify("job", step, |_| {}).await.unwrap().ok());
    store.assert_complete().await;
}

async fn three_nodes_commit_each_step_once_and_any_node_restores(backend: Backend) {
    let seed = seed(0x5eed_0301);
    let dir = tempfile::tempdir().unwrap();
    let store = TestStore::new(backend, dir.path()).await;
    let nodes = start_nodes(&store, dir.path(), None).await;
    for step in 1..=3u64 {
        let states = states(seed + step);
        let saves = (0..WORLD).map(|r| {
            let (c, s, t) = (rank_client(&nodes[node_of(r)], true), rank_spec("job", step, r), &states[r as usize]);
            async move { c.save(&s, t, Wait::Committed).await }
        });
        let reports = futures::future::try_join_all(saves).await.unwrap_or_else(|e| {
            panic!("step {step}: {e}\n{}", nodes.iter().map(daemon_log).collect::<Vec<_>>().join("\n----\n"))
        });
        assert!(reports.iter().all(|r| r.status.phase == SavePhase::Committed));
        assert_committed_everywhere(&store, &nodes, step, &states).await;
    }
    // The parts did their work and were removed by the node that wrote the root.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        // The decisions stay (a slow node must not decide otherwise) until GC.
        let left: Vec<String> = store
            .keys()
            .await
            .into_iter()
            .filter(|k| k.contains("/parts/") && !k.ends_with("/decision.json"))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "parts left after the commits: {left:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A node that serves a range must be told the epoch (it names the parts).
    let mut no_epoch = rank_spec("job", 9, 0);
    no_epoch.world_size = WORLD;
    let err = client(&nodes[0]).open_save(&no_epoch).await.unwrap_err();
    assert_eq!(err.api_code(), Some("bad_request"), "{err}");
}

/// Saves a step on three nodes with `failpoint` armed on node `victim`. A kill leaves the store
/// without a partial checkpoint; after the victim restarts (or, for the leader, once another
/// node takes over) the step is committed once and restores from every node.
async fn kill_case(backend: Backend, failpoint: &str, victim: usize, kills: bool, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let store = TestStore::new(backend, dir.path()).await;
    let mut nodes = start_nodes(&store, dir.path(), Some((victim, failpoint))).await;
    let states = states(seed);
    let saves = (0..WORLD).map(|r| {
        let node = node_of(r);
        let (c, s, t) = (rank_client(&nodes[node], node != victim), rank_spec("job", 1, r), &states[r as usize]);
        async move { (node, c.save(&s, t, Wait::Staged).await) }
    });
    for (node, outcome) in futures::future::join_all(saves).await {
        // The victim's own ranks may lose their answer with their node.
        if node != victim {
            outcome.unwrap_or_else(|e| panic!("{failpoint}: a rank of node {node}: {e}"));
        }
    }
    if kills {
        let status = nodes[victim].wait_exit(Duration::from_secs(60)).await.expect("the victim should die");
        assert_eq!(status.signal(), Some(libc::SIGKILL), "node {victim} died by SIGKILL at {failpoint}");
        // While it is down: a complete checkpoint or none, never a root before the fail point.
        store.assert_complete().await;
        let roots = store.manifests().await.len();
        // After its part, a node that does not lead is not needed for the commit: the leader
        // may already have written the root.
        // A node whose part is written takes over from a dead leader after part_takeover_ms,
        // which may already have passed when the leader dies at after_part or before_manifest.
        let expected: &[usize] = match failpoint {
            f if f.contains("after_manifest") => &[1],
            f if f.contains("after_part") || f.contains("before_manifest") => &[0, 1],
            _ => &[0],
        };
        assert!(expected.contains(&roots), "{roots} roots right after the kill at {failpoint} on node {victim}");
        if victim == 0 && (failpoint.contains("after_part") || failpoint.contains("before_manifest")) {
            // The leader died with its part written: the other nodes take over and commit
            // without it.
            for (i, d) in nodes.iter().enumerate().skip(1) {
                let s = rank_client(d, true).wait_committed("job", 1).await;
                s.unwrap_or_else(|e| panic!("{failpoint}: node {i} should take over: {e}\n{}", daemon_log(d)));
            }
        }
        nodes[victim].options_mut().envs.retain(|(k, _)| k != "FAILPOINTS");
        nodes[victim].restart().await.unwrap();
    }
    assert_committed_everywhere(&store, &nodes, 1, &states).await;
    // A leader killed right after the root left the parts behind; GC removes parts of
    // committed steps (and nothing else of the checkpoint).
    let parts = || async { store.keys().await.into_iter().filter(|k| k.contains("/parts/")).count() };
    if failpoint.contains("after_manifest") {
        assert_eq!(parts().await, NODES + 1, "the parts (and decision) the killed leader did not remove");
    }
    let gc = rank_client(&nodes[1], true).gc(Some("job"), false).await.unwrap();
    assert_eq!(parts().await, 0, "{failpoint}: GC report {gc}");
    assert_committed_everywhere(&store, &nodes, 1, &states).await;
}

async fn a_node_killed_at_each_commit_fail_point_then_the_save_completes(backend: Backend) {
    let seed = seed(0x5eed_0302);
    // (fail point, victim node, whether it kills): every fail point of the commit module, on
    // the leader (node 0) and on a node that does not lead.
    let cases = [
        ("ckptd::commit::before_part=return", 1, true),
        ("ckptd::commit::after_part=return", 1, true),
        ("ckptd::commit::before_part=return", 0, true),
        ("ckptd::commit::after_part=return", 0, true),
        ("ckptd::commit::before_manifest=return", 0, true),
        ("ckptd::commit::after_manifest=return", 0, true),
        ("ckptd::commit::manifest_put=2*return", 0, false),
        ("ckptd::commit::root_ack_lost=1*return", 0, false),
    ];
    for (i, (fp, victim, kills)) in cases.into_iter().enumerate() {
        eprintln!("case {i}: {fp} on node {victim}");
        kill_case(backend, fp, victim, kills, seed + i as u64).await;
    }
}

async fn a_node_that_never_returns_fails_the_save_visibly(backend: Backend) {
    let seed = seed(0x5eed_0303);
    let dir = tempfile::tempdir().unwrap();
    let store = TestStore::new(backend, dir.path()).await;
    let mut nodes = start_nodes(&store, dir.path(), Some((1, "ckptd::commit::before_part=return"))).await;
    let states = states(seed);
    let saves = (0..WORLD).map(|r| {
        let node = node_of(r);
        let (c, s, t) = (rank_client(&nodes[node], node != 1), rank_spec("job", 1, r), &states[r as usize]);
        async move { c.save(&s, t, Wait::Staged).await.map(|_| ()) }
    });
    let _ = futures::future::join_all(saves).await;
    nodes[1].wait_exit(Duration::from_secs(60)).await.expect("node 1 should die");
    // The others wait for its part, then give the save up after save_idle_abort_ms: the
    // trainer learns it, and no root ever appears.
    for i in [0, 2] {
        let err = rank_client(&nodes[i], true).wait_committed("job", 1).await.unwrap_err();
        assert!(matches!(err, ckpt_client::ClientError::Aborted { .. }), "node {i}: {err}");
    }
    assert!(store.manifests().await.is_empty(), "no root for a save a node never finished");
    store.assert_complete().await;
}

/// Saves `ranks` of step 1 in `epoch` through their nodes (Wait::Staged).
async fn save_ranks(nodes: &[LocalDaemon], states: &[Vec<Tensor>], ranks: std::ops::Range<u32>, epoch: u64) {
    let saves = ranks.map(|r| {
        let d = &nodes[node_of(r)];
        let opts = ClientOptions { chunk_bytes: 1 << 20, node_local: false, epoch: Some(epoch), ..Default::default() };
        let (c, s, t) = (Client::new(&d.url(), opts).unwrap(), rank_spec("job", 1, r), &states[r as usize]);
        async move { c.save(&s, t, Wait::Staged).await }
    });
    futures::future::try_join_all(saves).await.unwrap();
}

async fn a_node_that_aborts_its_share_stops_the_commit_and_the_epoch(backend: Backend) {
    let seed = seed(0x5eed_0304);
    let dir = tempfile::tempdir().unwrap();
    let store = TestStore::new(backend, dir.path()).await;
    let nodes = start_nodes(&store, dir.path(), None).await;
    let states = states(seed);
    // Nodes 1 and 2 finish their parts; node 1's share is then aborted by an operator, before
    // the leader has its ranks.
    save_ranks(&nodes, &states, 2..WORLD, EPOCH).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while store.keys().await.iter().filter(|k| k.contains("/parts/") && !k.ends_with("decision.json")).count() < 2 {
        assert!(std::time::Instant::now() < deadline, "nodes 1 and 2 never wrote their parts");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The leader's save is open (its ranks have not sent their shards) when node 1 aborts.
    for r in 0..PER_NODE {
        rank_client(&nodes[0], true).open_save(&rank_spec("job", 1, r)).await.unwrap();
    }
    rank_client(&nodes[1], true).abort("job", 1).await.unwrap();
    // The leader then has every part in the store (node 1's included) but finds the abort
    // decided: no root, and every node ends the save as aborted. The leader's last rank may
    // hear the abort in its own index put (when its chunks were durable by then).
    for r in 0..PER_NODE {
        let (spec, t) = (rank_spec("job", 1, r), &states[r as usize]);
        match rank_client(&nodes[0], true).save(&spec, t, Wait::Staged).await {
            Ok(_) => {}
            Err(e) if e.api_code() == Some("conflict") || matches!(e, ckpt_client::ClientError::Aborted { .. }) => {}
            Err(e) => panic!("rank {r} on the leader: {e}"),
        }
    }
    for (i, d) in nodes.iter().enumerate() {
        let err = rank_client(d, true).wait_committed("job", 1).await.unwrap_err();
        assert!(matches!(err, ckpt_client::ClientError::Aborted { .. }), "node {i}: {err}");
    }
    assert!(store.manifests().await.is_empty(), "no root after a node aborted its share");
    // The epoch is spent: reopening it is refused; the next epoch commits.
    let err = rank_client(&nodes[1], true).open_save(&rank_spec("job", 1, 2)).await.unwrap_err();
    assert_eq!(err.api_code(), Some("conflict"), "{err}");
    save_ranks(&nodes, &states, 0..WORLD, EPOCH + 1).await;
    assert_committed_everywhere(&store, &nodes, 1, &states).await;
}
