#!/usr/bin/env bash
# The engine under a budget far below its data (issue #13), in one run, alternated rounds:
#  (a) many small records: 20M one-entry records (.cls of 1..100 B, 20.5 GB of tar in 200 shards) resharded
#      alphanumeric with `--max-mem 256MiB` against the same job with the default budget (everything fits):
#      wall time ratio, peak RSS (goal <= 256 + 64 MiB), temp bytes written per record, sorted runs;
#  (b) compressed input over the budget: .tar.zst shards whose decoded bytes are ~6x the budget, resharded
#      shuffle into .tar with `--max-mem 256MiB`, against the floor of that work: `zstd -dc` of every input
#      into one file, then sync (every byte decoded once and written once). Goal >= 0.6 of the floor.
# Inputs are in the page cache before each run; outputs go through it; every timing includes the final sync.
#
# Usage: benches/scripts/budget_bench.sh [--quick] [--rounds N] [--only a|b]
#   --quick    2M records in (a) and ~430 MB decoded in (b) with a 64 MiB budget (about two minutes)
#   --rounds   alternated rounds (default 2; 1 with --quick)
#   --only     run one part
# Env: DSORT=path/to/dsort, WORK=folder for data and outputs (default /tmp/dsort-bench-budget).
set -euo pipefail
source "$(dirname "$0")/common.sh"
only=ab
want_only=0
bench_flag() {
  if [[ $want_only == 1 ]]; then
    [[ $1 == a || $1 == b ]] || return 1
    only=$1; want_only=0; return 0
  fi
  [[ $1 == --only ]] && want_only=1
}
bench_args 15 "$@"
work=${WORK:-${TMPDIR:-/tmp}/dsort-bench-budget}
need_dsort
[[ -x /usr/bin/time ]] || { echo "GNU time is needed for peak RSS (apt-get install time)" >&2; exit 1; }
command -v zstd >/dev/null || { echo "zstd is needed for the floor of (b)" >&2; exit 1; }

if [[ $quick == 1 ]]; then
  size=quick; shards=20; budget=64MiB; zst_shards=6; rounds=${rounds:-1}
else
  size=full; shards=200; budget=256MiB; zst_shards=24; rounds=${rounds:-2}
fi
many=$work/many-$size
zst=$work/zst-$size
many_tpl="$many/m-{000..$(printf %03d $((shards - 1)))}.tar"
zst_tpl="$zst/z-{00..$(printf %02d $((zst_shards - 1)))}.tar.zst"
mkdir -p "$work"

# 100,000 records per shard of one .cls entry of 1..100 bytes: a 512-byte header and one data block each.
gen_many() {
  "$dsort" gen --output "$many_tpl" --records-per-shard 100000 --record-size 1..100 --exts .cls --seed 5 >/dev/null
}
# 1,000 records of 40..100 KiB (.jpg + .cls) per shard: ~70 MB decoded each.
gen_zst() {
  "$dsort" gen --output "$zst_tpl" --records-per-shard 1000 --record-size 40KiB..100KiB --seed 9 >/dev/null
}
[[ $only == *a* ]] && ensure "$many" "gen-v1 $shards" gen_many
[[ $only == *b* ]] && ensure "$zst" "gen-v1 $zst_shards" gen_zst

exec python3 - "$dsort" "$work" "$many" "$many_tpl" "$zst" "$zst_tpl" "$rounds" "$budget" "$only" <<'PY'
import datetime, glob, json, os, shutil, statistics, subprocess, sys, time

dsort, work, many, many_tpl, zst, zst_tpl, rounds, budget, only = sys.argv[1:]
rounds = int(rounds)
many_files = sorted(glob.glob(os.path.join(many, "m-*.tar")))
zst_files = sorted(glob.glob(os.path.join(zst, "z-*.tar.zst")))
out = os.path.join(work, "out")
tmp = os.path.join(work, "tmp")
floor_file = os.path.join(work, "floor.bin")
rss_file = os.path.join(work, ".rss")
units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
budget_bytes = int(budget[:-3]) * units[budget[-3:]]

def clean():
    for p in (out, tmp):
        shutil.rmtree(p, ignore_errors=True)
    if os.path.exists(floor_file):
        os.remove(floor_file)
    subprocess.run(["sync"], check=True)

def warm(files):
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(8 << 20):
                pass

def timed(cmd, files):
    """Wall seconds of `cmd && sync` from warm inputs and empty output/temp folders; (seconds, RSS, stdout)."""
    clean()
    os.makedirs(out)
    os.makedirs(tmp)
    warm(files)
    t = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss_file, *cmd], stdout=subprocess.PIPE, text=True)
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}")
    subprocess.run(["sync"], check=True)
    dt = time.perf_counter() - t
    with open(rss_file) as f:
        rss = int(f.read().split()[-1]) * 1024
    leftover = sum(len(fs) for _, _, fs in os.walk(tmp))
    if leftover:
        sys.exit(f"{leftover} temp files left in {tmp} after: {' '.join(cmd)}")
    return dt, rss, r.stdout

def reshard(tpl, alg, extra):
    return [dsort, "reshard", "--input", tpl, "--output", f"{out}/out-{{00000..99999}}.tar", "--shard-size",
            "256MiB", "--algorithm", alg, "--tmp-dir", tmp, *extra, "--json"]

def verify(tpl, alg, extra):
    r = subprocess.run([dsort, "verify", "--input", tpl, "--output", f"{out}/out-{{00000..99999}}.tar",
                        "--algorithm", alg, *extra, "--shard-size", "256MiB"], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"dsort verify FAILED ({alg}):\n{r.stdout}{r.stderr}")

load_before = os.getloadavg()
started = time.time()
parts = []
if "a" in only:
    parts += [("many ample", reshard(many_tpl, "alphanumeric", []), many_files),
              (f"many {budget}", reshard(many_tpl, "alphanumeric", ["--max-mem", budget]), many_files)]
if "b" in only:
    parts += [("zst floor", ["sh", "-c", 'zstd -q -dc "$@" > "$0"', floor_file, *zst_files], zst_files),
              (f"zst {budget}", reshard(zst_tpl, "shuffle", ["--seed", "3", "--max-mem", budget]), zst_files)]
runs = {name: [] for name, _, _ in parts}
for r in range(rounds):
    for name, cmd, files in parts:
        dt, rss, so = timed(cmd, files)
        s = json.loads(so) if so.strip() else {}
        if r == 0 and name.startswith("many "):
            verify(many_tpl, "alphanumeric", [])
        if r == 0 and name == f"zst {budget}":
            verify(zst_tpl, "shuffle", ["--seed", "3"])
        runs[name].append((dt, rss, s))
        print(f"round {r + 1}/{rounds}: {name} {dt:.2f} s, RSS {rss / 2**20:.0f} MiB", file=sys.stderr)
clean()
load_after = os.getloadavg()

med = {k: statistics.median(x[0] for x in v) for k, v in runs.items()}
mb = lambda n: n / 2**20
print(f"dsort under a budget, {datetime.datetime.now():%Y-%m-%d %H:%M}; {os.cpu_count()} cores; load average "
      f"{load_before[0]:.2f} before, {load_after[0]:.2f} after; {time.time() - started:.0f} s in all; {rounds} round(s), medians")
if "a" in only:
    m_in = sum(os.path.getsize(f) for f in many_files)
    n = runs[f"many {budget}"][0][2]["records"]
    print(f"(a) {n:,} records in {len(many_files)} tar shards, {m_in / 1e9:.2f} GB, alphanumeric, 256MiB output shards (verified)")
    for k in ("many ample", f"many {budget}"):
        dt, rss, s = max(runs[k], key=lambda x: x[1])
        print(f"    {k:<16} {med[k]:>8.2f} s  peak RSS {mb(rss):>6.0f} MiB (worst)  runs {s['sort_runs']:>4}  merge levels "
              f"{s['merge_levels']}  temp written {s['spilled_bytes'] / n:.1f} B/record  extract {s['extract_seconds']:.1f} s "
              f"sort {s['sort_seconds']:.1f} s create {s['create_seconds']:.1f} s")
    worst = max(x[1] for x in runs[f"many {budget}"])
    goal = budget_bytes + (64 << 20)
    print(f"    {budget} / ample wall: {med['many ample'] / med[f'many {budget}']:.2f} (speed ratio); peak RSS "
          f"{mb(worst):.0f} MiB vs goal {mb(goal):.0f} MiB: {'MET' if worst <= goal else 'NOT MET'}")
if "b" in only:
    z_in = sum(os.path.getsize(f) for f in zst_files)
    zs = runs[f"zst {budget}"][0][2]
    print(f"(b) {len(zst_files)} .tar.zst shards, {z_in / 1e9:.2f} GB compressed, {zs['bytes'] / 1e9:.2f} GB of content "
          f"({zs['bytes'] / budget_bytes:.1f}x the budget), shuffle into .tar (verified)")
    for k in ("zst floor", f"zst {budget}"):
        dt, rss, s = max(runs[k], key=lambda x: x[1])
        extra = f"  temp written {s['spilled_bytes'] / 1e9:.2f} GB" if s else ""
        print(f"    {k:<16} {med[k]:>8.2f} s  peak RSS {mb(rss):>6.0f} MiB{extra}  times "
              + " ".join(f"{x[0]:.2f}" for x in runs[k]))
    ratio = med["zst floor"] / med[f"zst {budget}"]
    print(f"    floor / dsort: {ratio:.2f} (goal 0.6: {'MET' if ratio >= 0.6 else 'NOT MET'})")
PY
