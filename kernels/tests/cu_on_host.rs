//! kernels.cu compiled as host C++ (tests/host/shim.h: one thread per block) and run against
//! the CPU twins on the same bytes. It checks the device code's arithmetic, position keys, tiling
//! and its vector and scalar paths on every machine with a C++ compiler, GPU or not, so the
//! CUDA source cannot drift from the Rust reference between GPU runs. Concurrency (warps,
//! shuffles, atomics across blocks) is left to the device twins in cuda_twins.rs.
//!
//! The compiler is `$CXX`, else `c++`; without one each test prints "skipped: no C++ compiler",
//! unless `CKPT_REQUIRE_CXX` is set (CI sets it), which makes that a failure.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use ckpt_kernels::incremental::chunk_fingerprints;
use ckpt_kernels::pattern::pattern;
use ckpt_kernels::{bf16_to_f32_slice, f32_to_bf16_slice, Fingerprint};

struct Driver {
    exe: PathBuf,
    dir: tempfile::TempDir,
}

fn driver() -> Option<&'static Driver> {
    static DRIVER: OnceLock<Option<Driver>> = OnceLock::new();
    DRIVER
        .get_or_init(|| {
            let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
            if Command::new(&cxx).arg("--version").output().is_err() {
                assert!(
                    std::env::var_os("CKPT_REQUIRE_CXX").is_none(),
                    "CKPT_REQUIRE_CXX is set but {cxx} does not run"
                );
                return None;
            }
            let dir = tempfile::tempdir().unwrap();
            let exe = dir.path().join("driver");
            let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/host/driver.cpp");
            let out =
                Command::new(&cxx).args(["-std=c++17", "-O1", "-Wall", "-o"]).arg(&exe).arg(&src).output().unwrap();
            assert!(
                out.status.success(),
                "kernels.cu does not compile as host C++ with {cxx}:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            Some(Driver { exe, dir })
        })
        .as_ref()
}

macro_rules! driver_or_skip {
    () => {
        match driver() {
            Some(d) => d,
            None => {
                println!("skipped: no C++ compiler");
                return;
            }
        }
    };
}

impl Driver {
    /// Runs one kernel; `input` is written to a file first, the output file is returned.
    fn run(&self, name: &str, input: Option<&[u8]>, args: &[String]) -> Vec<u8> {
        let inp = self.dir.path().join(format!("{name}.in"));
        let out = self.dir.path().join(format!("{name}.out"));
        let mut cmd = Command::new(&self.exe);
        cmd.arg(name);
        if let Some(bytes) = input {
            std::fs::write(&inp, bytes).unwrap();
            cmd.arg(&inp);
        }
        cmd.args(args).arg(&out);
        let status = cmd.status().unwrap();
        assert!(status.success(), "driver {name} {args:?}: {status}");
        std::fs::read(&out).unwrap()
    }

    fn chunk_lanes(&self, kernel: &str, words: &[u32], offset: usize, chunk: usize, tile: usize) -> Vec<[u64; 2]> {
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let n = words.len() - offset;
        let args = [offset, n, chunk, tile].map(|v| v.to_string());
        let out = self.run(kernel, Some(&bytes), &args);
        out.chunks_exact(16)
            .map(|c| [u64::from_le_bytes(c[..8].try_into().unwrap()), u64::from_le_bytes(c[8..].try_into().unwrap())])
            .collect()
    }
}

fn u32s(bytes: &[u8]) -> Vec<u32> {
    bytes.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect()
}

/// Every shape the launch can take: chunks shorter, equal to and longer than a tile, short last
/// chunks and tiles, views off the 16-byte boundary (the scalar path) and on it (the vector path).
#[test]
fn fingerprint_kernel_matches_the_cpu() {
    let d = driver_or_skip!();
    let seed = 0xf1a9;
    for (n, chunk, tile) in [(1, 1, 16), (7, 3, 16), (64, 64, 16), (1000, 256, 64), (4099, 1024, 64), (5000, 333, 100)]
    {
        let words = pattern(seed, n + 3);
        for offset in [0usize, 1, 2, 3] {
            let view = &words[offset..offset + n];
            let gpu: Vec<Fingerprint> = d
                .chunk_lanes("fingerprint", &words[..offset + n], offset, chunk, tile)
                .into_iter()
                .map(Fingerprint)
                .collect();
            assert_eq!(
                gpu,
                chunk_fingerprints(view, chunk),
                "seed {seed} n={n} chunk={chunk} tile={tile} offset={offset}"
            );
        }
    }
}

#[test]
fn sum_kernel_matches_a_plain_sum() {
    let d = driver_or_skip!();
    let words = pattern(5, 3001);
    let got = d.chunk_lanes("sum", &words, 1, 700, 96);
    let want: Vec<[u64; 2]> =
        words[1..].chunks(700).map(|c| [c.iter().fold(0u64, |a, &w| a.wrapping_add(w as u64)), 0]).collect();
    assert_eq!(got, want);
}

/// Rounding edges of every exponent, NaNs and infinities, and random words; aligned and not.
#[test]
fn cast_kernels_match_the_cpu() {
    let d = driver_or_skip!();
    let mut bits: Vec<u32> = pattern(9, 4096);
    for e in 0..256u32 {
        for m in [0u32, 1, 0x7fff, 0x8000, 0x8001, 0x1_7fff, 0x1_8000, 0x7f_ffff] {
            bits.push(e << 23 | m);
            bits.push(0x8000_0000 | e << 23 | m);
        }
    }
    for offset in [0usize, 1] {
        let src = &bits[offset..];
        let bytes: Vec<u8> = bits.iter().flat_map(|w| w.to_le_bytes()).collect();
        let out = d.run("f32_to_bf16", Some(&bytes), &[offset.to_string(), src.len().to_string()]);
        let got: Vec<u16> = out.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
        let floats: Vec<f32> = src.iter().map(|b| f32::from_bits(*b)).collect();
        let mut want = vec![0u16; src.len()];
        f32_to_bf16_slice(&floats, &mut want);
        assert_eq!(got, want, "offset {offset}");
    }
    let halves: Vec<u16> = (0..=u16::MAX).collect();
    let bytes: Vec<u8> = halves.iter().flat_map(|h| h.to_le_bytes()).collect();
    for offset in [0usize, 1] {
        let src = &halves[offset..];
        let got = u32s(&d.run("bf16_to_f32", Some(&bytes), &[offset.to_string(), src.len().to_string()]));
        let mut want = vec![0f32; src.len()];
        bf16_to_f32_slice(src, &mut want);
        assert_eq!(got, want.iter().map(|f| f.to_bits()).collect::<Vec<_>>(), "offset {offset}");
    }
}

#[test]
fn pattern_kernel_matches_the_cpu() {
    let d = driver_or_skip!();
    for seed in [0u64, 7, u64::MAX] {
        let got = u32s(&d.run("pattern", None, &[seed.to_string(), "2000".into()]));
        assert_eq!(got, pattern(seed, 2000), "seed {seed}");
    }
}
