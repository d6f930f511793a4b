//! GPU twins of the CPU tests: each runs a kernel and compares its result with the CPU
//! reference exactly. Built with the `cuda` feature; on a machine without a CUDA device each
//! test prints "skipped: no CUDA device" and returns, so the same binary runs everywhere and a
//! GPU machine runs it unchanged (kernels/device-check.sh).
#![cfg(feature = "cuda")]

use std::sync::OnceLock;

use ckpt_kernels::cuda::{compile_kernels, nvrtc_present, CudaError, Device, SnapshotConfig, Snapshotter};
use ckpt_kernels::incremental::{changed_chunks, chunk_fingerprints};
use ckpt_kernels::nccl::{owned_range, NcclRank};
use ckpt_kernels::pattern::pattern;
use ckpt_kernels::{bf16_to_f32_slice, f32_to_bf16_slice, fingerprint_words, Fingerprint};

/// One device for the whole binary: opening compiles the kernels, which takes a moment.
fn device() -> Option<&'static Device> {
    static DEVICE: OnceLock<Option<Device>> = OnceLock::new();
    DEVICE
        .get_or_init(|| match Device::open(0) {
            Ok(d) => Some(d),
            Err(CudaError::NoDevice) => None,
            Err(e) => panic!("a CUDA driver is present but the device could not be opened: {e}"),
        })
        .as_ref()
}

macro_rules! device_or_skip {
    () => {
        match device() {
            Some(d) => d,
            None => {
                println!("skipped: no CUDA device");
                return;
            }
        }
    };
}

/// Needs NVRTC only: a machine without a GPU but with NVRTC on its library path still checks
/// that the kernel source compiles, for the H100/H200 architecture and an older one.
#[test]
fn kernels_compile_with_nvrtc() {
    if !nvrtc_present() {
        // CI installs NVRTC for this check; there a missing library is a failure, not a skip.
        assert!(
            std::env::var_os("CKPT_REQUIRE_NVRTC").is_none(),
            "CKPT_REQUIRE_NVRTC is set but NVRTC cannot be loaded"
        );
        println!("skipped: no NVRTC");
        return;
    }
    for (major, minor) in [(9, 0), (8, 0)] {
        let image = compile_kernels(major, minor).unwrap_or_else(|e| panic!("sm_{major}{minor}: {e}"));
        assert!(image.len() > 1000);
    }
}

/// Twin of fingerprint.rs's `the_reference_value_is_stable`.
#[test]
fn fingerprint_reference_value_on_device() {
    let dev = device_or_skip!();
    let w: Vec<u32> = (0..1024u32).map(|i| i.wrapping_mul(2_654_435_761)).collect();
    let buf = dev.upload(&w).unwrap();
    let fps = dev.fingerprint_chunks(&buf, 1024).unwrap();
    assert_eq!(fps.len(), 1);
    assert_eq!(fps[0].to_string(), "fb0eb9b02159e6203c0d599b6c883c8f");
    assert_eq!(fps[0], fingerprint_words(&w, 0));
}

/// Twin of incremental.rs's `chunks_combine_to_the_whole`, over sizes that exercise short last
/// chunks, chunks smaller and larger than a block's tile, sizes that are not a multiple of the
/// 16-byte loads, and a view that starts off a 16-byte boundary. (The empty buffer is the CPU
/// tests' business: CUDA refuses zero-byte allocations.)
#[test]
fn chunk_fingerprints_match_the_cpu() {
    let dev = device_or_skip!();
    let cases: &[(usize, usize)] = &[
        (1, 1),
        (5, 3),
        (1000, 1),
        (1000, 64),
        (4099, 4096),
        (100_003, 17),
        (1_000_003, 65_539),
        (3 << 20, 1 << 20),
        (2_000_000, 40_000),
    ];
    for (seed, &(n, chunk)) in cases.iter().enumerate() {
        let w = pattern(seed as u64, n);
        let buf = dev.upload(&w).unwrap();
        let gpu = dev.fingerprint_chunks(&buf, chunk).unwrap();
        assert_eq!(gpu, chunk_fingerprints(&w, chunk), "n={n} chunk={chunk}");
        if n > 1 {
            let gpu = dev.fingerprint_chunks(&buf.slice(1..), chunk).unwrap();
            assert_eq!(gpu, chunk_fingerprints(&w[1..], chunk), "view at 1, n={n} chunk={chunk}");
        }
    }
}

/// Twin of incremental.rs's `only_touched_chunks_change`, on device data.
#[test]
fn changed_chunks_match_the_cpu() {
    let dev = device_or_skip!();
    let chunk = 10_000;
    let mut w = pattern(42, 1_234_567);
    let before = chunk_fingerprints(&w, chunk);
    for at in [0, 9_999, 10_000, 555_555, 1_234_566] {
        w[at] ^= 1 << (at % 32);
    }
    w.extend(pattern(43, 20_000));
    let buf = dev.upload(&w).unwrap();
    let gpu = dev.changed_chunks(&buf, chunk, &before).unwrap();
    let cpu = changed_chunks(&w, chunk, &before);
    assert_eq!(gpu, cpu);
    assert_eq!(cpu.changed, vec![0, 1, 55, 123, 124, 125]);
}

/// Twin of pattern.rs: the device fill and the CPU pattern agree word for word, so the
/// benchmark's device-made data can be checked on the CPU.
#[test]
fn device_pattern_matches_the_cpu() {
    let dev = device_or_skip!();
    let n = 1_000_001;
    let mut buf = dev.alloc_zeros::<u32>(n).unwrap();
    dev.fill_pattern(&mut buf, 7).unwrap();
    assert_eq!(dev.download(&buf).unwrap(), pattern(7, n));
}

fn special_floats() -> Vec<u32> {
    let mut v: Vec<u32> = vec![
        0,
        0x8000_0000,
        1,
        0x0001_8000,
        0x007f_ffff,
        0x0080_0000,
        0x3f80_0000,
        0x3f80_8000,
        0x3f81_8000,
        0x3f80_7fff,
        0x3f80_8001,
        0x7f7f_ffff,
        0x7f7f_7fff,
        0x7f7f_8000,
        0xff7f_ffff,
        0x7f80_0000,
        0xff80_0000,
        0x7fc0_0000,
        0x7f80_0001,
        0xff80_0001,
        0x7fbf_ffff,
        0xffff_ffff,
        0x7f80_ffff,
    ];
    // Every exponent with the mantissa ends that decide rounding.
    for e in 0..256u32 {
        for m in [0u32, 0x7fff, 0x8000, 0x8001, 0x1_8000, 0x7f_ffff] {
            v.push(e << 23 | m);
            v.push(0x8000_0000 | e << 23 | m);
        }
    }
    v
}

/// Twin of cast.rs's rounding tests: specials, every exponent's rounding edges and a million
/// pseudo-random words, down and back up, bit for bit.
#[test]
fn casts_match_the_cpu() {
    let dev = device_or_skip!();
    let mut words = special_floats();
    words.extend(pattern(9, 1_000_000));
    words.push(0x4049_0fdb); // odd length: the tail path
    let floats: Vec<f32> = words.iter().map(|w| f32::from_bits(*w)).collect();
    let mut cpu_half = vec![0u16; floats.len()];
    f32_to_bf16_slice(&floats, &mut cpu_half);

    let src = dev.upload(&words).unwrap();
    let mut half = dev.alloc_zeros::<u16>(words.len()).unwrap();
    dev.f32_to_bf16(&src, &mut half).unwrap();
    assert_eq!(dev.download(&half).unwrap(), cpu_half);

    // All 65536 bf16 patterns up.
    let all: Vec<u16> = (0..=u16::MAX).collect();
    let mut cpu_up = vec![0f32; all.len()];
    bf16_to_f32_slice(&all, &mut cpu_up);
    let up_src = dev.upload(&all).unwrap();
    let mut up = dev.alloc_zeros::<u32>(all.len()).unwrap();
    dev.bf16_to_f32(&up_src, &mut up).unwrap();
    let cpu_up_bits: Vec<u32> = cpu_up.iter().map(|f| f.to_bits()).collect();
    assert_eq!(dev.download(&up).unwrap(), cpu_up_bits);

    // Views off the 16-byte boundary take the scalar path.
    let mut half_view = dev.alloc_zeros::<u16>(words.len() - 3).unwrap();
    dev.f32_to_bf16(&src.slice(3..), &mut half_view).unwrap();
    assert_eq!(dev.download(&half_view).unwrap(), cpu_half[3..]);
    let mut up_view = dev.alloc_zeros::<u32>(all.len() - 1).unwrap();
    dev.bf16_to_f32(&up_src.slice(1..), &mut up_view).unwrap();
    assert_eq!(dev.download(&up_view).unwrap(), cpu_up_bits[1..]);

    let mut wrong = dev.alloc_zeros::<u16>(3).unwrap();
    assert!(matches!(dev.f32_to_bf16(&src, &mut wrong), Err(CudaError::Invalid(_))));
}

fn small_config() -> SnapshotConfig {
    // Three slots of 1000 words: many chunks, a short last one, and slot reuse.
    SnapshotConfig { pinned_bytes: 12_000, slots: 3, host_threads: 2, streaming_stores: true }
}

/// The snapshot's CPU twin is the identity: the host buffer must equal the device data.
#[test]
fn blocking_snapshot_copies_exactly() {
    let dev = device_or_skip!();
    // (Empty buffers are the CPU tests' business: CUDA refuses zero-byte allocations.)
    for (cfg, n) in [(small_config(), 123_457), (SnapshotConfig::default(), 3_000_001), (small_config(), 1)] {
        let w = pattern(n as u64, n);
        let buf = dev.upload(&w).unwrap();
        let mut snap = Snapshotter::new(dev, cfg).unwrap();
        let mut host = vec![0xdead_beef_u32; n];
        snap.snapshot_blocking(&buf.as_view(), &mut host).unwrap();
        assert!(host == w, "n={n} {cfg:?}");
    }
}

/// Design (b): once the device-side copy is taken the source may change, and the host still
/// receives the state as it was at the snapshot.
#[test]
fn staged_snapshot_copies_the_state_at_capture() {
    let dev = device_or_skip!();
    let n = 2_000_003;
    let w = pattern(11, n);
    let mut buf = dev.upload(&w).unwrap();
    let mut snap = Snapshotter::new(dev, small_config()).unwrap();
    let staged = snap.snapshot_staged(&buf.as_view(), vec![0u32; n]).unwrap();
    dev.fill_pattern(&mut buf, 12).unwrap();
    dev.synchronize().unwrap();
    assert!(staged.wait().unwrap() == w);

    // A second snapshot waits for the first drain's slots and sees the new state.
    let first = snap.snapshot_staged(&buf.as_view(), vec![0u32; n]).unwrap();
    let second = snap.snapshot_staged(&buf.slice(5..), vec![0u32; n - 5]).unwrap();
    let now = pattern(12, n);
    assert!(first.wait().unwrap() == now);
    assert!(second.wait().unwrap() == now[5..]);
    let mut host = vec![0u32; n];
    snap.snapshot_blocking(&buf.as_view(), &mut host).unwrap();
    assert!(host == now);
}

/// The CPU hub's collectives with one rank: all-reduce, reduce-scatter and all-gather are the
/// identity and a broadcast from rank 0 changes nothing; the result must match that exactly.
#[test]
fn nccl_single_rank_matches_the_cpu_result() {
    let dev = device_or_skip!();
    let mut comm = NcclRank::single(dev.context()).expect("a CUDA device is present, so NCCL must load");
    assert_eq!((comm.rank(), comm.world()), (0, 1));
    let x: Vec<f32> = pattern(5, 1001).iter().map(|w| (*w as f32) * 1e-9 - 2.0).collect();

    let mut data = x.clone();
    comm.all_reduce_sum(&mut data).unwrap();
    assert_eq!(bits(&data), bits(&x));

    let mut out = vec![0f32; owned_range(x.len(), 0, 1).len()];
    comm.reduce_scatter_sum(&x, &mut out).unwrap();
    assert_eq!(bits(&out), bits(&x));

    let mut full = vec![0f32; x.len()];
    comm.all_gather(&x, &mut full).unwrap();
    assert_eq!(bits(&full), bits(&x));

    let mut data = x.clone();
    comm.broadcast(&mut data, 0).unwrap();
    assert_eq!(bits(&data), bits(&x));
    assert!(matches!(comm.broadcast(&mut data, 1), Err(CudaError::Invalid(_))));
    comm.barrier().unwrap();
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// Keeps `Fingerprint` in the twin's vocabulary: combining device chunk fingerprints gives the
/// CPU whole-buffer fingerprint, as on the CPU.
#[test]
fn device_chunks_combine_to_the_cpu_whole() {
    let dev = device_or_skip!();
    let w = pattern(77, 777_777);
    let buf = dev.upload(&w).unwrap();
    let whole =
        dev.fingerprint_chunks(&buf, 50_000).unwrap().into_iter().fold(Fingerprint::default(), Fingerprint::combine);
    assert_eq!(whole, fingerprint_words(&w, 0));
}

/// The read probe's CPU twin is a wrapping sum per chunk.
#[test]
fn sum_chunks_match_the_cpu() {
    let dev = device_or_skip!();
    let (n, chunk) = (1_000_003, 65_539);
    let w = pattern(3, n);
    let buf = dev.upload(&w).unwrap();
    let cpu: Vec<u64> = w.chunks(chunk).map(|c| c.iter().fold(0u64, |a, x| a.wrapping_add(*x as u64))).collect();
    assert_eq!(dev.sum_chunks(&buf, chunk).unwrap(), cpu);
    let cpu: Vec<u64> = w[1..].chunks(chunk).map(|c| c.iter().fold(0u64, |a, x| a.wrapping_add(*x as u64))).collect();
    assert_eq!(dev.sum_chunks(&buf.slice(1..), chunk).unwrap(), cpu);
}
