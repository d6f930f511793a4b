//! The CPU path's change detection, measured: what an incremental save's pass over the state
//! costs the trainer per byte, by fingerprint (`fingerprint_bytes` per chunk, what `AsyncSaver`
//! does with `ChangeDetection::Fingerprint`) and by byte compare with the staging buffer
//! (`ChangeDetection::Compare`), against the plain copy of the same bytes that a save without
//! change detection makes. One thread, as in the trainer's stall; the three are interleaved and
//! repeated, and each row is the median with its spread.
//!
//! `ckpt-detect-bench [MIB] [CHUNK_KIB] [REPS]` (defaults 256, 4096, 7).

use std::time::Instant;

use ckpt_kernels::fingerprint_bytes;

fn main() {
    let arg = |i: usize, d: usize| std::env::args().nth(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    let (mib, chunk_kib, reps) = (arg(1, 256), arg(2, 4096), arg(3, 7).max(1));
    let len = mib << 20;
    let chunk = chunk_kib << 10;
    // Pseudo-random state (fingerprints and compares take the same time on any bytes; random
    // bytes keep the compiler and the CPU honest).
    let src: Vec<u8> = ckpt_kernels::pattern::pattern(7, len / 4).iter().flat_map(|w| w.to_le_bytes()).collect();
    let mut dst = src.clone();
    let mut sink = 0u64;
    let mut rows: [Vec<f64>; 3] = Default::default();
    for _ in 0..reps {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        rows[0].push(t.elapsed().as_secs_f64());
        sink = sink.wrapping_add(dst[len / 2] as u64);

        let t = Instant::now();
        let same = src.chunks(chunk).zip(dst.chunks(chunk)).filter(|(a, b)| a == b).count();
        rows[1].push(t.elapsed().as_secs_f64());
        sink = sink.wrapping_add(same as u64);

        let t = Instant::now();
        for (k, c) in src.chunks(chunk).enumerate() {
            sink = sink.wrapping_add(fingerprint_bytes(c, (k * chunk / 4) as u64).0[0]);
        }
        rows[2].push(t.elapsed().as_secs_f64());
    }
    println!("change detection on the CPU, {mib} MiB of state in {chunk_kib} KiB chunks, one thread, {reps} interleaved repetitions");
    println!("| pass | GB/s of state (median) | min-max | ms per GiB | vs the plain copy |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let copy = median(&mut rows[0].clone());
    for (name, v) in ["plain copy (the floor of a save's stall)", "byte compare with the buffer", "fingerprints"]
        .iter()
        .zip(rows.iter_mut())
    {
        let m = median(v);
        let gbs = |s: f64| len as f64 / s / 1e9;
        println!(
            "| {name} | {:.2} | {:.2}-{:.2} | {:.1} | {:.2}x |",
            gbs(m),
            gbs(v[v.len() - 1]),
            gbs(v[0]),
            m / len as f64 * (1u64 << 30) as f64 * 1e3,
            m / copy
        );
    }
    eprintln!("(sink {sink})");
}
