#!/usr/bin/env bash
# Peak memory and wall time of `ckpt export` against the plainest copy of the same bytes.
#
#   client/scripts/bench-export.sh SERVER JOB STEP STORE_DIR ROUNDS CKPT [OLD_CKPT]
#
# Per round, interleaved: the limit (every chunk file of the checkpoint, in the export's order,
# concatenated into one file with cat: the same bytes read and written, no hashing, no HTTP),
# then `ckpt export` with --buffer-mib 256 and 64 (and OLD_CKPT's export, a build from before
# streaming, when given). Prints one row per variant: median wall seconds (min-max) and median
# peak RSS. Chunks must be stored raw (random data is), and the page cache is left warm for all.
set -euo pipefail
server=$1 job=$2 step=$3 store=$4 rounds=$5 ckpt=$6 old=${7:-}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Data order of the export: tensors by falling alignment then name; each tensor's rows are the
# rank slices in row order, which for a row-split checkpoint is the ranks' chunk lists in order.
"$ckpt" --server "$server" --json show "$job" "$step" > "$work/show.json"
python3 - "$work/show.json" "$store" "$job" > "$work/chunks.txt" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
store, job = sys.argv[2], sys.argv[3]
names = sorted({t["name"] for r in m["ranks"] for t in r["tensors"]})
for name in names:
    slices = sorted(((t["offsets"] or [0])[0], t["chunks"]) for r in m["ranks"] for t in r["tensors"] if t["name"] == name)
    seen = set()
    for first, chunks in slices:
        if first in seen:
            continue
        seen.add(first)
        for c in chunks:
            print(f"{store}/jobs/{job}/chunks/{c['hash'][:2]}/{c['hash']}")
PY
measure() { # label, command...: appends "label wall rss_kib" to results
  local label=$1; shift
  /usr/bin/time -f "$label %e %M" -a -o "$work/results" "$@" > /dev/null 2>&1
}
for _ in $(seq "$rounds"); do
  measure "limit:cat" sh -c "xargs cat < '$work/chunks.txt' > '$work/plain.bin'"
  measure "export:256MiB" "$ckpt" --server "$server" export "$job" "$step" --force --buffer-mib 256 --out "$work/e.safetensors"
  measure "export:64MiB" "$ckpt" --server "$server" export "$job" "$step" --force --buffer-mib 64 --out "$work/e.safetensors"
  if [ -n "$old" ]; then
    measure "export:before-streaming" "$old" --server "$server" export "$job" "$step" --force --out "$work/e.safetensors"
  fi
done
bytes=$(stat -c %s "$work/plain.bin")
printf '%-26s %18s %16s   (%d rounds, %.2f GiB of tensor data)\n' variant "wall s, median (min-max)" "peak RSS MiB" "$rounds" "$(echo "$bytes / 1073741824" | bc -l)"
python3 - "$work/results" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    label, wall, rss = line.split()
    rows.setdefault(label, []).append((float(wall), int(rss)))
for label, v in rows.items():
    w = [x[0] for x in v]; r = [x[1] for x in v]
    print(f"{label:<26} {statistics.median(w):8.2f} ({min(w):.2f}-{max(w):.2f}) {statistics.median(r) / 1024:16.0f}")
PY
