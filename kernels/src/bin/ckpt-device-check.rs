//! ckpt-device-check: the GPU kernels' bandwidth against the ceilings that bound them, as one
//! table (BENCHMARKS.md, issue 14).
//!
//! Design note. Each kernel is compared with the copy that bounds it on the same machine, not
//! with a datasheet: fingerprints (reads only) with a device-to-device copy (read + write),
//! snapshots with one plain device-to-host copy into pinned memory, casts with the copy. The
//! variants run interleaved, one of each per repetition after a discarded warm-up, so drift in
//! clocks or host memory affects all alike; each row is the median with the min-max spread.
//! Data is a pseudo-random pattern made on the device (zeros can hide bugs and run faster),
//! and each result is checked against its CPU twin or the plain copy before anything is timed.
//!
//! Usage: ckpt-device-check [--gib N] [--snapshot-gib N] [--reps N]
//!        ckpt-device-check --cubin PATH [--arch 90]
//!
//! The second form needs NVRTC but no GPU: it writes the kernels' machine code for `sm_<arch>`
//! to PATH, for reading with `cuobjdump -sass` (how many instructions a loop costs per word).

use std::process::ExitCode;
use std::time::Instant;

use ckpt_kernels::cuda::{CopyPool, CudaError, Device, SnapshotConfig, Snapshotter};
use ckpt_kernels::incremental::chunk_fingerprints;
use ckpt_kernels::pattern::pattern;
use cudarc::driver::sys::CUevent_flags;

struct Args {
    gib: f64,
    snapshot_gib: f64,
    reps: usize,
    cubin: Option<std::path::PathBuf>,
    arch: u32,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args { gib: 8.0, snapshot_gib: 4.0, reps: 7, cubin: None, arch: 90 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let bad = || format!("bad value for {flag}: {value}");
        match flag.as_str() {
            "--gib" => args.gib = value.parse().map_err(|_| bad())?,
            "--snapshot-gib" => args.snapshot_gib = value.parse().map_err(|_| bad())?,
            "--reps" => args.reps = value.parse().map_err(|_| bad())?,
            "--cubin" => args.cubin = Some(value.into()),
            "--arch" => args.arch = value.parse().ok().filter(|a| (50..200).contains(a)).ok_or_else(bad)?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if args.reps == 0 || args.gib <= 0.0 || args.snapshot_gib <= 0.0 || args.snapshot_gib > args.gib {
        return Err("need reps > 0 and 0 < snapshot-gib <= gib".into());
    }
    Ok(args)
}

/// One row: what it is, how many bytes one run moves, and each repetition's seconds.
struct Row {
    name: String,
    bytes: f64,
    secs: Vec<f64>,
}

impl Row {
    fn new(name: impl Into<String>, bytes: f64) -> Row {
        Row { name: name.into(), bytes, secs: Vec::new() }
    }

    /// GB/s (10^9 bytes) of each repetition, sorted.
    fn rates(&self) -> Vec<f64> {
        let mut r: Vec<f64> = self.secs.iter().map(|s| self.bytes / s / 1e9).collect();
        r.sort_by(|a, b| a.total_cmp(b));
        r
    }

    fn median(&self) -> f64 {
        let r = self.rates();
        if r.is_empty() {
            return f64::NAN;
        }
        let m = r.len() / 2;
        if r.len() % 2 == 1 {
            r[m]
        } else {
            (r[m - 1] + r[m]) / 2.0
        }
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("ckpt-device-check: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(path) = &args.cubin {
        let (major, minor) = (args.arch / 10, args.arch % 10);
        return match ckpt_kernels::cuda::compile_kernels(major as i32, minor as i32)
            .map_err(|e| e.to_string())
            .and_then(|image| std::fs::write(path, &image).map(|_| image.len()).map_err(|e| e.to_string()))
        {
            Ok(n) => {
                println!("sm_{}: {n} bytes of machine code written to {}", args.arch, path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ckpt-device-check: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let device = match Device::open(0) {
        Ok(d) => d,
        Err(CudaError::NoDevice) => {
            println!("skipped: no CUDA device");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("ckpt-device-check: {e}");
            return ExitCode::FAILURE;
        }
    };
    match run(&device, &args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            println!("ckpt-device-check: a correctness check failed");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("ckpt-device-check: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Seconds of device time for the work `f` enqueues on the device's stream.
fn device_secs(device: &Device, f: impl FnOnce() -> Result<(), CudaError>) -> Result<f64, CudaError> {
    let ctx = device.context();
    let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    let end = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    start.record(device.stream())?;
    f()?;
    end.record(device.stream())?;
    Ok(end.synchronize().and_then(|_| start.elapsed_ms(&end)).map(|ms| ms as f64 / 1e3)?)
}

fn run(device: &Device, args: &Args) -> Result<bool, CudaError> {
    let stream = device.stream().clone();
    let n = ((args.gib * (1u64 << 30) as f64) as usize / 4) & !1023;
    let ns = ((args.snapshot_gib * (1u64 << 30) as f64) as usize / 4) & !1023;
    let bytes = 4.0 * n as f64;
    let sbytes = 4.0 * ns as f64;
    let (major, minor) = device.compute_capability()?;
    let driver = ckpt_kernels::cuda::driver_version()?;
    let nvrtc = ckpt_kernels::cuda::nvrtc_version()?;
    println!(
        "device: {} (sm_{major}{minor}, {:.0} GiB), driver CUDA {}.{}, NVRTC {}.{}",
        device.name()?,
        device.total_memory()? as f64 / (1u64 << 30) as f64,
        driver / 1000,
        driver % 1000 / 10,
        nvrtc.0,
        nvrtc.1
    );
    println!(
        "data: {:.2} GiB on the device ({n} words), snapshots of {:.2} GiB; {} repetitions after one warm-up",
        bytes / (1u64 << 30) as f64,
        sbytes / (1u64 << 30) as f64,
        args.reps
    );

    let t = Instant::now();
    let mut src = device.alloc_zeros::<u32>(n)?;
    device.fill_pattern(&mut src, 0x5eed)?;
    let mut copy = device.alloc_zeros::<u32>(n)?;
    let mut half = device.alloc_zeros::<u16>(n)?;
    let mut back = device.alloc_zeros::<u32>(n)?;
    device.synchronize()?;
    let mut ok = true;

    // Correctness first, on a prefix the CPU recomputes quickly.
    let fp_chunk = 4 << 20; // 16 MiB chunks
    let small_chunk = 64 << 10; // 256 KiB chunks
    let prefix = (2 * fp_chunk).min(n);
    let cpu_words = pattern(0x5eed, prefix);
    let dev_words = device.download(&src.slice(..prefix))?;
    if cpu_words != dev_words {
        println!("check: device pattern differs from the CPU's");
        ok = false;
    }
    for chunk in [fp_chunk, small_chunk] {
        let gpu = device.fingerprint_chunks(&src, chunk)?;
        let cpu = chunk_fingerprints(&cpu_words, chunk);
        let full = prefix / chunk;
        if gpu.len() != n.div_ceil(chunk) || gpu[..full] != cpu[..full] {
            println!("check: fingerprints with {chunk}-word chunks differ from the CPU twin");
            ok = false;
        }
    }
    device.f32_to_bf16(&src, &mut half)?;
    device.bf16_to_f32(&half, &mut back)?;
    let gpu_half = device.download(&half.slice(..prefix))?;
    let gpu_back = device.download(&back.slice(..prefix))?;
    let mut cpu_half = vec![0u16; prefix];
    let cpu_floats: Vec<f32> = cpu_words.iter().map(|w| f32::from_bits(*w)).collect();
    ckpt_kernels::f32_to_bf16_slice(&cpu_floats, &mut cpu_half);
    let cpu_back: Vec<u32> = cpu_half.iter().map(|h| ckpt_kernels::bf16_to_f32(*h).to_bits()).collect();
    if gpu_half != cpu_half || gpu_back != cpu_back {
        println!("check: casts differ from the CPU twin");
        ok = false;
    }
    println!("setup and checks: {:.1} s", t.elapsed().as_secs_f64());

    let t = Instant::now();
    let view = src.slice(..ns);
    // SAFETY: u32 has no invalid bit patterns; the copy writes every word before it is read.
    let mut pinned = unsafe { device.context().alloc_pinned_with_flags::<u32>(ns, 0) }?;
    let mut host_a = vec![1u32; ns];
    let mut host_b = Some(vec![2u32; ns]);
    let mut pageable = vec![3u32; ns];
    let cfg_default = SnapshotConfig::default();
    // Design (a) under several bounds, to choose the default: chunk size (pinned / slots) and
    // host threads decide whether the host side keeps up with the link.
    let threads = cfg_default.host_threads;
    let half_threads = (threads / 2).max(1);
    let with = |mib: usize, slots: usize, host_threads: usize, streaming_stores: bool| SnapshotConfig {
        pinned_bytes: mib << 20,
        slots,
        host_threads,
        streaming_stores,
    };
    let configs = [
        cfg_default,
        with(64, 4, threads, false),
        with(64, 4, half_threads, true),
        with(32, 4, threads, true),
        with(96, 6, threads, true),
        with(64, 2, threads, true),
        with(256, 4, threads, true),
    ];
    let mut snaps = Vec::new();
    let mut snap_rows = Vec::new();
    for cfg in configs {
        snaps.push(Snapshotter::new(device, cfg)?);
        let default = if cfg == cfg_default { ", default" } else { "" };
        snap_rows.push(Row::new(
            format!(
                "snapshot (a) blocking, {} MiB pinned in {} slots, {} threads, {} stores{default}",
                cfg.pinned_bytes >> 20,
                cfg.slots,
                cfg.host_threads,
                if cfg.streaming_stores { "streaming" } else { "plain" }
            ),
            sbytes,
        ));
    }
    let mut snap = Snapshotter::new(device, cfg_default)?;
    let pool_kinds = [(half_threads, false), (half_threads, true), (threads, false), (threads, true)];
    let pools: Vec<CopyPool> = pool_kinds.iter().map(|(t, st)| CopyPool::new(*t, *st)).collect();
    let mut pool_rows: Vec<Row> = pool_kinds
        .iter()
        .map(|(t, st)| {
            let stores = if *st { "streaming" } else { "plain" };
            Row::new(format!("host copy pinned -> pageable, {t} threads, {stores} stores (read)"), sbytes)
        })
        .collect();
    println!("host buffers: {:.1} s; default snapshot config {cfg_default:?}", t.elapsed().as_secs_f64());

    let mut d2d = Row::new("device-to-device copy (read+write)", 2.0 * bytes);
    let mut fp = Row::new("fingerprint, 16 MiB chunks (read)", bytes);
    let mut fp_small = Row::new("fingerprint, 256 KiB chunks (read)", bytes);
    let mut probe = Row::new("read probe: same loop, sum only (read)", bytes);
    let mut down = Row::new("cast f32->bf16 (read+write)", 6.0 * n as f64);
    let mut up = Row::new("cast bf16->f32 (read+write)", 6.0 * n as f64);
    let mut d2h_pinned = Row::new("plain D2H into pinned memory", sbytes);
    let mut d2h_pageable = Row::new("plain D2H into pageable memory", sbytes);
    let mut snap_b_stall = Row::new("snapshot (b) staged: trainer stall", sbytes);
    let mut snap_b_done = Row::new("snapshot (b) staged: host copy done", sbytes);

    for rep in 0..=args.reps {
        let keep = rep > 0;
        let note = |row: &mut Row, s: f64| {
            if keep {
                row.secs.push(s)
            }
        };
        let s = device_secs(device, || Ok(stream.memcpy_dtod(&src, &mut copy)?))?;
        note(&mut d2d, s);
        let s = device_secs(device, || device.fingerprint_chunks(&src, fp_chunk).map(|_| ()))?;
        note(&mut fp, s);
        let s = device_secs(device, || device.fingerprint_chunks(&src, small_chunk).map(|_| ()))?;
        note(&mut fp_small, s);
        let s = device_secs(device, || device.sum_chunks(&src, fp_chunk).map(|_| ()))?;
        note(&mut probe, s);
        let s = device_secs(device, || device.f32_to_bf16(&src, &mut half))?;
        note(&mut down, s);
        let s = device_secs(device, || device.bf16_to_f32(&half, &mut back))?;
        note(&mut up, s);

        let t = Instant::now();
        stream.memcpy_dtoh(&view, &mut pinned)?;
        stream.synchronize()?;
        note(&mut d2h_pinned, t.elapsed().as_secs_f64());

        let t = Instant::now();
        stream.memcpy_dtoh(&view, &mut pageable)?;
        stream.synchronize()?;
        note(&mut d2h_pageable, t.elapsed().as_secs_f64());

        for (sn, row) in snaps.iter_mut().zip(snap_rows.iter_mut()) {
            let t = Instant::now();
            sn.snapshot_blocking(&view, &mut host_a)?;
            note(row, t.elapsed().as_secs_f64());
        }

        for (pool, row) in pools.iter().zip(pool_rows.iter_mut()) {
            let src = pinned.as_slice()?;
            let t = Instant::now();
            pool.copy(src, &mut pageable);
            note(row, t.elapsed().as_secs_f64());
        }

        let t = Instant::now();
        let staged = snap.snapshot_staged(&view, host_b.take().expect("returned by the last wait"))?;
        let stall = staged.captured_after.as_secs_f64();
        host_b = Some(staged.wait()?);
        note(&mut snap_b_done, t.elapsed().as_secs_f64());
        note(&mut snap_b_stall, stall);
    }

    let reference = pinned.as_slice()?;
    let same = |h: &[u32]| h == reference;
    if !(same(&host_a) && same(host_b.as_deref().unwrap_or(&[])) && same(&pageable)) {
        println!("check: a snapshot differs from the plain pinned copy");
        ok = false;
    }
    if reference[..prefix.min(ns)] != cpu_words[..prefix.min(ns)] {
        println!("check: the pinned copy differs from the CPU pattern");
        ok = false;
    }

    let snap_a = snap_rows.iter().find(|r| r.name.ends_with(", default")).expect("the default is measured");
    let best_a = snap_rows.iter().max_by(|a, b| a.median().total_cmp(&b.median())).expect("rows");
    println!("best design (a) configuration: {}", best_a.name);
    let mut rows = vec![&d2d, &fp, &fp_small, &probe, &down, &up, &d2h_pinned, &d2h_pageable];
    rows.extend(pool_rows.iter());
    rows.extend(snap_rows.iter());
    rows.extend([&snap_b_stall, &snap_b_done]);
    println!();
    println!("| what | GB/s (median) | min-max | median time |");
    println!("| --- | ---: | ---: | ---: |");
    for r in rows {
        let rates = r.rates();
        let mut secs = r.secs.clone();
        secs.sort_by(|a, b| a.total_cmp(b));
        println!(
            "| {} | {:.1} | {:.1}-{:.1} | {:.2} ms |",
            r.name,
            r.median(),
            rates.first().copied().unwrap_or(f64::NAN),
            rates.last().copied().unwrap_or(f64::NAN),
            1e3 * secs.get(secs.len() / 2).copied().unwrap_or(f64::NAN)
        );
    }
    println!();
    let verdict = |ratio: f64| if ratio >= 0.8 { "met" } else { "NOT met" };
    let r_fp = fp.median() / d2d.median();
    let r_a = snap_a.median() / d2h_pinned.median();
    let r_b = snap_b_done.median() / d2h_pinned.median();
    println!("target fingerprint >= 0.8x D2D copy: {r_fp:.2}x ({})", verdict(r_fp));
    println!("target snapshot (a), default configuration, >= 0.8x pinned D2H: {r_a:.2}x ({})", verdict(r_a));
    let r_best = best_a.median() / d2h_pinned.median();
    println!("target snapshot (a), best configuration, >= 0.8x pinned D2H: {r_best:.2}x ({})", verdict(r_best));
    println!("target snapshot (b), host copy done, >= 0.8x pinned D2H: {r_b:.2}x ({})", verdict(r_b));
    // Same bytes in both, so the ratio of times is the inverse ratio of rates.
    println!("snapshot (b) stalls the trainer {:.1}% as long as (a)", 100.0 * snap_a.median() / snap_b_stall.median());
    println!("correctness checks: {}", if ok { "all passed" } else { "FAILED" });
    Ok(ok)
}
