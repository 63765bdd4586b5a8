#!/usr/bin/env bash
# Benchmark: `dsort inspect` of a 1 GiB uncompressed tar with 100k records against `cat FILE > /dev/null`
# on the same cached file, in one run (the machine is shared and noisy: only the ratio means anything).
#
# Usage: benches/scripts/inspect_vs_cat.sh [ROUNDS]   (env: DSORT=path/to/dsort, WORK=dir for the data)
set -euo pipefail
rounds=${1:-7}
root=$(cd "$(dirname "$0")/../.." && pwd)
dsort=${DSORT:-$root/target/release/dsort}
work=${WORK:-${TMPDIR:-/tmp}/dsort-bench-inspect}
if [[ ! -x $dsort ]]; then
  (cd "$root" && cargo build --release -q -p dsort-coordinator)
fi
mkdir -p "$work"
shard=$work/big-0.tar
if [[ ! -f $shard ]]; then
  # 100,000 records of ~10.5 KiB (.jpg + .cls): 1.0 GiB of content, 1.17 GiB of tar.
  "$dsort" gen --output "$work/big-{0..0}.tar" --records-per-shard 100000 --record-size 10KiB..11KiB --seed 3 >/dev/null
fi
cat "$shard" >/dev/null # warm the page cache

python3 - "$dsort" "$shard" "$rounds" <<'PY'
import os, subprocess, sys, time
dsort, shard, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
def run(cmd):
    t = time.perf_counter()
    with open(os.devnull, "wb") as null:
        subprocess.run(cmd, stdout=null, check=True)
    return time.perf_counter() - t
cat_t, ins_t = [], []
for _ in range(rounds):  # alternate, so both see the same machine load
    cat_t.append(run(["cat", shard]))
    ins_t.append(run([dsort, "inspect", shard]))
med = lambda xs: sorted(xs)[len(xs) // 2]
mc, mi = med(cat_t), med(ins_t)
size = os.path.getsize(shard)
summary = subprocess.run([dsort, "inspect", shard], capture_output=True, text=True, check=True).stdout.splitlines()[-1]
print(f"file: {shard} ({size} bytes; {summary})")
print(f"cat:     median {mc:.3f} s ({size / mc / 1e6:.0f} MB/s)")
print(f"inspect: median {mi:.3f} s ({size / mi / 1e6:.0f} MB/s)")
print(f"ratio (inspect speed / cat speed): {mc / mi:.2f}  (goal >= 0.70)")
PY
