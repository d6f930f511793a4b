//! The NCCL backend against the CPU hub: the same collective calls on both, results compared
//! exactly (feature `nccl`). One rank per GPU: with one GPU the group is a single rank, whose
//! every operation is a copy; with more, the inputs are small integers, whose sums are exact in
//! any order, so NCCL's reduction order cannot make a difference either. Where there is no GPU
//! each test says "skipped: no CUDA device".
#![cfg(feature = "nccl")]

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use ckpt_kernels::cuda::CudaError;
use ckpt_trainer::collective::{spawn_hub, Collective, HubClient, HubConfig, HubEvent, TAG_LOSS, TAG_READY};
use ckpt_trainer::flight;
use ckpt_trainer::nccl::{gpu_count, JoinError, NcclCollective};
use ckpt_trainer::optim::owned_range;

const GENERATION: u64 = 3;

fn hub(world: usize) -> (String, mpsc::Receiver<HubEvent>, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let cfg = HubConfig {
        world,
        generation: GENERATION,
        collective_timeout: Duration::from_secs(20),
        idle_timeout: Duration::from_secs(60),
        startup_timeout: Duration::from_secs(30),
        frame_elems_max: 1 << 20,
    };
    let hub = spawn_hub(Arc::new(listener), cfg).unwrap();
    (addr, hub.events, hub.stop)
}

/// Every collective the trainer calls, on shapes that pad (lengths not a multiple of the world)
/// and that do not; returns each call's result in order.
fn scenario(c: &mut dyn Collective) -> Vec<Vec<f32>> {
    let (rank, world) = (c.rank(), c.world());
    let mut out = Vec::new();
    for len in [1usize, 10, 1001, 65_537] {
        let mut v: Vec<f32> = (0..len).map(|i| ((i % 97) * (rank + 1)) as f32).collect();
        c.all_reduce_sum(&mut v, 0, 5).unwrap();
        out.push(v);

        let full: Vec<f32> = (0..len).map(|i| ((i % 89) + rank) as f32).collect();
        let mine = owned_range(len, rank, world);
        let mut part = vec![0f32; mine.len()];
        c.reduce_scatter_sum(&full, &mut part).unwrap();
        out.push(part.clone());

        let mut gathered = vec![0f32; len];
        c.all_gather(&part, &mut gathered).unwrap();
        out.push(gathered);

        let mut b: Vec<f32> = (0..len).map(|i| (i + 1000 * rank) as f32).collect();
        c.broadcast(&mut b, world - 1).unwrap();
        out.push(b);
    }
    // A tagged all-reduce goes through the hub (the launcher's step record), as on the hub.
    let mut loss = vec![1.5 * (rank + 1) as f32];
    c.all_reduce_sum(&mut loss, TAG_LOSS, 9).unwrap();
    out.push(loss);
    c.barrier(TAG_READY, 9).unwrap();
    out
}

/// Runs `scenario` on `world` ranks (threads), each wrapped by `wrap`; returns the results by
/// rank and the hub's events.
fn run_group(world: usize, wrap: fn(HubClient) -> Box<dyn Collective>) -> (Vec<Vec<Vec<f32>>>, Vec<HubEvent>) {
    let (addr, rx, stop) = hub(world);
    let ranks: Vec<_> = (0..world)
        .map(|rank| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let hub = HubClient::connect(&addr, rank, world, GENERATION, Duration::from_secs(60)).unwrap();
                let mut c = wrap(hub);
                scenario(c.as_mut())
            })
        })
        .collect();
    let results = ranks.into_iter().map(|h| h.join().unwrap()).collect();
    let mut events = Vec::new();
    while let Ok(e) = rx.recv_timeout(Duration::from_millis(500)) {
        events.push(e);
    }
    stop.store(true, Ordering::Relaxed);
    (results, events)
}

fn on_hub(hub: HubClient) -> Box<dyn Collective> {
    Box::new(hub)
}

/// Where rank `rank`'s flight recorder goes in the NCCL run.
fn ring_path(rank: usize) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("ckpt-nccl-twins-{}-{rank}.bin", std::process::id()))
}

fn on_nccl(mut hub: HubClient) -> Box<dyn Collective> {
    hub.record_to(flight::Recorder::create(&ring_path(hub.rank()), GENERATION).unwrap());
    Box::new(NcclCollective::join(hub).unwrap_or_else(|e| panic!("joining NCCL: {e}")))
}

#[test]
fn nccl_backend_gives_the_hubs_results() {
    let gpus = gpu_count();
    if gpus == 0 {
        println!("skipped: no CUDA device");
        return;
    }
    let world = gpus.min(4);
    println!("{world} rank(s), one per GPU");
    let (want, hub_events) = run_group(world, on_hub);
    let (got, nccl_events) = run_group(world, on_nccl);
    for rank in 0..world {
        assert_eq!(got[rank].len(), want[rank].len());
        for (k, (g, w)) in got[rank].iter().zip(&want[rank]).enumerate() {
            assert!(g == w, "rank {rank}, call {k}: NCCL and the hub differ");
        }
    }
    // The launcher sees the same step record and ready barrier from both backends.
    let summary = |events: &[HubEvent]| -> Vec<String> {
        events
            .iter()
            .filter_map(|e| match e {
                HubEvent::StepDone { step, loss, .. } => Some(format!("step {step} loss {loss}")),
                HubEvent::Ready { step, .. } => Some(format!("ready {step}")),
                _ => None,
            })
            .collect()
    };
    assert_eq!(summary(&nccl_events), summary(&hub_events));
    assert!(summary(&hub_events).contains(&"ready 9".to_string()), "{:?}", summary(&hub_events));
    // Every call, NCCL's and the hub's, is in the flight recorder, finished, numbered in order
    // (the unique id's broadcast came before the recorder moved to the backend).
    let calls = want[0].len() + 1;
    for rank in 0..world {
        let ring = flight::read(&ring_path(rank), GENERATION);
        let _ = std::fs::remove_file(ring_path(rank));
        let seqs: Vec<u64> = ring.iter().map(|r| r.seq).collect();
        let hub_broadcast = ring.first().map(|r| r.seq);
        assert_eq!(hub_broadcast, Some(1), "rank {rank}: the hub's id broadcast is recorded first: {seqs:?}");
        assert_eq!(ring.len(), 1 + calls, "rank {rank}: {seqs:?}");
        assert_eq!(&seqs[1..], (1..=calls as u64).collect::<Vec<_>>(), "rank {rank}");
        assert!(ring.iter().all(|r| r.end_us != 0), "rank {rank}: an unfinished call");
        assert!(matches!(ring[1].kind, flight::Kind::AllReduce) && matches!(ring[2].kind, flight::Kind::ReduceScatter));
    }
}

/// More ranks than GPUs is refused with a clear error, not an NCCL failure (or a hang).
#[test]
fn more_ranks_than_gpus_is_refused() {
    let gpus = gpu_count();
    if gpus == 0 {
        println!("skipped: no CUDA device");
        return;
    }
    let world = gpus + 1;
    let (addr, _rx, stop) = hub(world);
    let errors: Vec<_> = (0..world)
        .map(|rank| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let hub = HubClient::connect(&addr, rank, world, GENERATION, Duration::from_secs(30)).unwrap();
                NcclCollective::join(hub).err().map(|e| e.to_string())
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    stop.store(true, Ordering::Relaxed);
    for e in errors {
        let e = e.expect("join should fail");
        assert!(e.contains("one rank on each GPU"), "{e}");
    }
}

/// Runs everywhere: without a GPU, joining says so instead of panicking inside cudarc.
#[test]
fn without_a_gpu_joining_says_no_cuda_device() {
    if gpu_count() > 0 {
        println!("skipped: this machine has a GPU");
        return;
    }
    let (addr, _rx, stop) = hub(1);
    let hub = HubClient::connect(&addr, 0, 1, GENERATION, Duration::from_secs(10)).unwrap();
    let err = NcclCollective::join(hub).err().expect("no GPU here");
    assert!(matches!(err, JoinError::Cuda(CudaError::NoDevice)), "{err}");
    stop.store(true, Ordering::Relaxed);
}

/// `ckpt-train launch --collective nccl` built with `nccl` refuses, before starting anything, a
/// group it cannot run: here no GPU, or fewer GPUs than ranks. (The build without the feature
/// says so instead: tests/cli.rs.)
#[test]
fn a_launch_it_cannot_run_is_refused_before_anything_starts() {
    // Where this test binary was carried to a GPU machine without its build folder,
    // device-check.sh names the carried ckpt-train.
    let exe = std::env::var_os("CKPT_TRAIN_BIN").map_or(env!("CARGO_BIN_EXE_ckpt-train").into(), PathBuf::from);
    assert!(exe.exists(), "no ckpt-train at {}: build it, or set CKPT_TRAIN_BIN", exe.display());
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // More ranks than any machine here has GPUs, so a GPU machine refuses too.
    let o = std::process::Command::new(&exe)
        .args(["launch", "--collective", "nccl", "--nproc", "12", "--data-dir"])
        .arg(&data)
        .arg("--run-dir")
        .arg(dir.path())
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("no CUDA device") || err.contains("one rank on each GPU"), "{err}");
    assert!(!data.exists(), "a refused launch created {}", data.display());
}
