#!/usr/bin/env bash
# The GPU check of issue 14: runs the CUDA twins (kernels/tests/cuda_twins.rs), the trainer's
# NCCL backend against the CPU hub (trainer/tests/nccl_twins.rs), a training run on NCCL against
# the same run on the hub, and the device benchmark (ckpt-device-check) on a machine with an
# NVIDIA GPU: about 80 s on an H200 (each step has its own timeout; all of them add up to 9 minutes).
#
#   kernels/device-check.sh stage [DIR]   on a build machine: build the five binaries (release,
#                                         features cuda/nccl) and copy them into DIR (default .device)
#   kernels/device-check.sh [run] [DIR]   on the GPU machine: run them from DIR, or build them
#                                         with cargo when DIR has none; logs go to $OUT (or
#                                         ./device-check-out)
#
# Why two modes: a GPU machine may have neither a Rust toolchain nor a network, and the
# binaries need no CUDA to build (libcuda, NVRTC and NCCL are opened at run time), so they are
# built elsewhere and carried. At run time the libraries must be findable by dlopen: the script
# adds their usual homes to LD_LIBRARY_PATH, including the pip wheels a PyTorch image carries,
# and links libnccl.so.2 under the unversioned name that cudarc asks for.
#
# Extra arguments for the benchmark go in CKPT_DEVICE_CHECK_ARGS (e.g. "--gib 4 --reps 5");
# CKPT_DEVICE_CHECK_NCU=1 adds a Nsight Compute profile of one fingerprint launch (not counted
# in the 5 minutes).
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
mode=${1:-run}
dir=${2:-$root/.device}

# The path of test binary $3 of package $1 built with feature $2.
test_binary() {
    (cd "$root" && cargo test --release -p "$1" --features "$2" --test "$3" --no-run \
        --message-format=json 2>/dev/null | sed -n "s/.*\"executable\":\"\([^\"]*$3[^\"]*\)\".*/\1/p" | tail -1)
}

build() {
    (cd "$root" && cargo build --release -p ckpt-kernels --features cuda --bins) || return 1
    local twins nccl
    twins=$(test_binary ckpt-kernels cuda cuda_twins)
    [ -n "$twins" ] || { echo "could not find the cuda_twins test binary" >&2; return 1; }
    nccl=$(test_binary ckpt-trainer nccl nccl_twins)
    [ -n "$nccl" ] || { echo "could not find the nccl_twins test binary" >&2; return 1; }
    local target
    target=$(cd "$root" && cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
    mkdir -p "$dir"
    cp "$twins" "$dir/cuda_twins"
    cp "$nccl" "$dir/nccl_twins"
    # The trainer (built with `nccl` for nccl_twins above) and a ckptd beside it, for a whole
    # training run on NCCL.
    (cd "$root" && cargo build --release -p ckpt-service --bin ckptd) || return 1
    cp "$target/release/ckpt-device-check" "$target/release/ckpt-train" "$target/release/ckptd" "$dir/"
    # The device tool carries at most 64 MiB with the working tree: debug info stays here.
    command -v strip >/dev/null && (cd "$dir" && strip --strip-debug cuda_twins nccl_twins ckpt-device-check ckpt-train ckptd)
    echo "staged into $dir:"; ls -l "$dir"
}

if [ "$mode" = stage ]; then
    build
    exit $?
fi
[ "$mode" = run ] || { echo "usage: $0 [stage|run] [DIR]" >&2; exit 2; }

out=${OUT:-$root/device-check-out}
mkdir -p "$out"

if [ ! -x "$dir/cuda_twins" ] || [ ! -x "$dir/nccl_twins" ] || [ ! -x "$dir/ckpt-device-check" ] \
    || [ ! -x "$dir/ckpt-train" ] || [ ! -x "$dir/ckptd" ]; then
    if command -v cargo >/dev/null; then
        echo "no prebuilt binaries in $dir: building with cargo"
        build || exit 1
    else
        echo "no prebuilt binaries in $dir and no cargo: run '$0 stage' on a build machine and carry $dir" >&2
        exit 1
    fi
fi

# Library homes: the driver's, a CUDA toolkit's, the system's, and the NVIDIA wheels of the
# image's Python; a bounded search of /usr and /opt if a library is in none of them.
libs=$(mktemp -d)
dirs="/usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu"
if command -v python3 >/dev/null; then
    nv=$(python3 -c 'import nvidia, os; print(os.pathsep.join(nvidia.__path__))' 2>/dev/null || true)
    for d in ${nv//:/ }; do
        dirs="$dirs $(find "$d" \( -name 'libnvrtc.so*' -o -name 'libnccl.so*' \) -printf '%h\n' 2>/dev/null | sort -u | tr '\n' ' ')"
    done
fi
find_lib() { # $1: file name prefix, e.g. libnccl.so
    local f
    f=$(for d in $dirs; do ls "$d/$1"* 2>/dev/null; done | grep -v builtins | head -1)
    [ -n "$f" ] || f=$(timeout 30 find /usr /opt -name "$1*" -not -name '*builtins*' 2>/dev/null | head -1)
    echo "$f"
}
paths=$libs
nvrtc=$(find_lib libnvrtc.so)
nccl=$(find_lib libnccl.so)
# cudarc asks for the unversioned names (and a few versioned ones, not libnccl.so.2); the
# library's own folder goes on the path too, for NVRTC's builtins.
[ -n "$nvrtc" ] && ln -sf "$nvrtc" "$libs/libnvrtc.so" && paths="$paths:$(dirname "$nvrtc")"
[ -n "$nccl" ] && ln -sf "$nccl" "$libs/libnccl.so" && paths="$paths:$(dirname "$nccl")"
for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib; do [ -d "$d" ] && paths="$paths:$d"; done
export LD_LIBRARY_PATH="$paths${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

{
    date -u +"date: %Y-%m-%dT%H:%M:%SZ"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu --format=csv
    echo "nccl: ${nccl:-not found}"
    echo "nvrtc: ${nvrtc:-not found}"
    echo "cpus: $(nproc)"
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
} 2>&1 | tee "$out/env.log"

echo "== CUDA twins"
timeout 90 "$dir/cuda_twins" --test-threads=1 --nocapture 2>&1 | tee "$out/tests.log"
tests_rc=${PIPESTATUS[0]}
echo "== NCCL backend against the CPU hub"
CKPT_TRAIN_BIN="$dir/ckpt-train" timeout 60 "$dir/nccl_twins" --test-threads=1 --nocapture 2>&1 | tee "$out/nccl.log"
nccl_rc=${PIPESTATUS[0]}
# A whole run on each backend, the same seed and the same rank killed mid-run (so the NCCL group
# is formed twice), with a ckptd the launcher starts: one rank per GPU, so with one GPU the
# all-reduce is a copy and the two runs must end on the same weights.
work=$(mktemp -d)
train() { # $1: hub or nccl
    timeout 120 "$dir/ckpt-train" launch --collective "$1" --nproc 1 --steps 60 \
        --ckpt-every 10 --log-every 5 --inject kill@0:37 --data-dir "$work/$1-data" --run-dir "$work/$1-run" \
        2>&1 | tee "$out/train-$1.log"
    return "${PIPESTATUS[0]}"
}
# The printed losses in order (a resume from another step shows as lines repeated differently)
# and the final weights' blake3: with one rank the two runs must be identical.
losses() { grep -E '^step +[0-9]+ +loss|final weights blake3' "$out/train-$1.log"; }
echo "== the trainer on NCCL, against the same run on the hub"
train hub; hub_rc=$?
train nccl; train_rc=$?
if [ "$hub_rc" = 0 ] && [ "$train_rc" = 0 ]; then
    if [ -z "$(losses nccl)" ]; then
        echo "no loss lines in the NCCL run's log"; train_rc=1
    elif diff <(losses hub) <(losses nccl); then
        echo "the runs agree: $(losses nccl | grep -c '^step') loss lines and the final weights"
    else
        echo "loss traces differ (above)"; train_rc=1
    fi
else
    echo "a training run failed: hub exit $hub_rc, nccl exit $train_rc"; train_rc=1
fi
# The rank and ckptd logs come back when something failed (one file: $OUT takes eight).
[ "$train_rc" = 0 ] || tar -czf "$out/train-runs.tar.gz" -C "$work" . 2>/dev/null
rm -rf "$work"
echo "== device benchmark"
# shellcheck disable=SC2086
timeout 150 "$dir/ckpt-device-check" ${CKPT_DEVICE_CHECK_ARGS:-} 2>&1 | tee "$out/bench.log"
bench_rc=${PIPESTATUS[0]}
if [ -n "${CKPT_DEVICE_CHECK_NCU:-}" ]; then
    # Optional: hardware counters for one timed fingerprint launch (the third; the first two
    # are the correctness checks), to see which pipe bounds it. Clocks left as they are.
    ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
    if [ -n "$ncu" ]; then
        echo "== ncu: fingerprint_chunks"
        timeout 120 "$ncu" --clock-control none --kernel-name fingerprint_chunks --launch-skip 2 --launch-count 1 \
            --section SpeedOfLight --section ComputeWorkloadAnalysis --section Occupancy --section LaunchStats \
            --section InstructionStats "$dir/ckpt-device-check" --gib 1 --snapshot-gib 0.25 --reps 1 2>&1 \
            | tee "$out/ncu.log" | grep -v '^| ' | tail -120
    else
        echo "== ncu: not found"
    fi
fi
rm -rf "$libs"
echo "== twins exit $tests_rc, NCCL twins exit $nccl_rc, trainer on NCCL $train_rc, benchmark exit $bench_rc"
[ "$tests_rc" = 0 ] && [ "$nccl_rc" = 0 ] && [ "$train_rc" = 0 ] && [ "$bench_rc" = 0 ]
