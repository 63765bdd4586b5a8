#!/usr/bin/env bash
# Benchmark: `dsort reshard` (tar -> tar; alphanumeric, shuffle, content) against the copy floor (`cat` of
# every input shard into one file on the same disk, then one `sync`) and against the WebDataset Python
# library resharding the same data the way its users do (read every sample, sort or shuffle, ShardWriter),
# plus the peak RSS of `--max-mem 256MiB` on 2M small records. Everything is measured in one run (the
# machines are shared and noisy: only the ratios mean anything). See benches/README.md.
#
# Usage: benches/scripts/reshard_bench.sh [--quick] [--rounds N] [--no-wds]
#   --quick    ~350 MB of shards and 200k small records (smoke test, about a minute)
#   --rounds   timed rounds of floor + the three dsort orders, alternated (default 5; 1 with --quick);
#              the table shows medians and bests
#   --no-wds   skip the WebDataset runs (about 40 s each on the full data)
# Env: DSORT=path/to/dsort, WORK=folder for data and outputs (default /tmp/dsort-bench-reshard),
#      PYTHON=interpreter with `webdataset` installed (default python3).
set -euo pipefail
source "$(dirname "$0")/common.sh"
wds=1
bench_flag() { [[ $1 == --no-wds ]] && wds=0; }
bench_args 14 "$@"
work=${WORK:-${TMPDIR:-/tmp}/dsort-bench-reshard}
python=${PYTHON:-python3}
need_dsort
[[ -x /usr/bin/time ]] || { echo "GNU time is needed for peak RSS (apt-get install time)" >&2; exit 1; }
if [[ $wds == 1 ]] && ! "$python" -c 'import webdataset' 2>/dev/null; then
  echo "the WebDataset peer needs 'pip install webdataset' (or pass --no-wds)" >&2
  exit 1
fi

if [[ $quick == 1 ]]; then
  size=quick; per_band=2; big_records=1500; small_shards=4; small_records=50000; rounds=${rounds:-1}
else
  size=full; per_band=8; big_records=5000; small_shards=20; small_records=100000; rounds=${rounds:-5}
fi
big=$work/big-$size
small=$work/small-$size
big_n=$((5 * per_band))
big_tpl="$big/shard-{000..$(printf %03d $((big_n - 1)))}.tar"
small_tpl="$small/small-{00..$(printf %02d $((small_shards - 1)))}.tar"
mkdir -p "$work"

# Payloads of 1 KiB..100 KiB spread evenly on a log scale (like real image datasets, and like the peer
# study's generator): five bands of x2.5 in size, `per_band` shards each, records of `.jpg` + `.cls`.
# Most bytes are in large records, most records are small.
gen_big() {
  local bands=(1024..2570 2571..6460 6461..16230 16231..40760 40761..102400) b lo hi
  for b in 0 1 2 3 4; do
    lo=$(printf %03d $((b * per_band))); hi=$(printf %03d $((b * per_band + per_band - 1)))
    "$dsort" gen --output "$big/shard-{$lo..$hi}.tar" --records-per-shard "$big_records" \
      --record-size "${bands[$b]}" --seed $((101 + b)) >/dev/null
  done
}
# 2M (quick: 200k) records of 100..500 bytes (.jpg + .cls): ~2 KiB of tar each, mostly headers.
gen_small() {
  "$dsort" gen --output "$small_tpl" --records-per-shard "$small_records" --record-size 100..500 --seed 11 >/dev/null
}
ensure "$big" "gen-v1 $per_band $big_records" gen_big
ensure "$small" "gen-v1 $small_shards $small_records" gen_small

exec "$python" - "$dsort" "$work" "$big" "$big_tpl" "$small" "$small_tpl" "$rounds" "$wds" "$root/benches/scripts/reshard_wds.py" <<'PY'
import datetime, glob, json, os, shutil, statistics, subprocess, sys, time

dsort, work, big, big_tpl, small, small_tpl, rounds, wds, wds_py = sys.argv[1:]
rounds, wds = int(rounds), wds == "1"
big_files = sorted(glob.glob(os.path.join(big, "shard-*.tar")))
small_files = sorted(glob.glob(os.path.join(small, "small-*.tar")))
in_bytes = sum(os.path.getsize(f) for f in big_files)
out = os.path.join(work, "out")
floor_file = os.path.join(work, "floor.bin")
rss_file = os.path.join(work, ".rss")
SHARD = "256MiB"
RSS_BUDGET, RSS_GOAL = 256 << 20, (256 + 64) << 20
ORDERS = {  # dsort algorithm -> (extra reshard/verify flags, matching webdataset order)
    "alphanumeric": ([], "name"),
    "shuffle": (["--seed", "7"], "shuffle"),
    "content": (["--key-ext", ".cls", "--key-type", "int"], "content"),
}

def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)

def clean():
    shutil.rmtree(out, ignore_errors=True)
    if os.path.exists(floor_file):
        os.remove(floor_file)
    sh(["sync"])

def cached(files):  # fraction of the files' pages in the page cache
    r = subprocess.run(["fincore", "-b", "-n", "-o", "RES,SIZE", *files], capture_output=True, text=True)
    res = size = 0
    for line in r.stdout.split("\n"):
        if line.strip():
            a, b = line.split()
            res, size = res + int(a), size + int(b)
    return res / size if size else 0.0

warm_seen = []
def warm(files):  # the same start for every run: inputs in the page cache, no dirty pages
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(8 << 20):
                pass
    warm_seen.append(cached(files))

def timed(cmd, files, stdout=None):
    """Wall seconds of `cmd && sync`, from warm inputs and a clean output folder; (seconds, peak RSS, stdout)."""
    clean()
    os.makedirs(out)
    warm(files)
    t = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss_file, *cmd], stdout=subprocess.PIPE, text=True)
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}")
    sh(["sync"])
    dt = time.perf_counter() - t
    with open(rss_file) as f:
        rss = int(f.read().split()[-1]) * 1024
    return dt, rss, r.stdout

def verify(inputs_tpl, algorithm, flags):
    r = subprocess.run([dsort, "verify", "--input", inputs_tpl, "--output", f"{out}/out-{{0000..9999}}.tar",
                        "--algorithm", algorithm, *flags, "--shard-size", SHARD], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"dsort verify FAILED for {algorithm}:\n{r.stdout}{r.stderr}")
    return "verified"

def reshard_cmd(inputs_tpl, algorithm, flags, extra=()):
    return [dsort, "reshard", "--input", inputs_tpl, "--output", f"{out}/out-{{0000..9999}}.tar",
            "--shard-size", SHARD, "--algorithm", algorithm, *flags, *extra, "--json"]

load_before = os.getloadavg()
started = time.time()
times = {k: [] for k in ["floor", *ORDERS]}
notes = {}
for r in range(rounds):  # alternate, so every contender sees the same machine
    dt, _, _ = timed(["sh", "-c", 'cat "$@" > "$0"', floor_file, *big_files], big_files)
    times["floor"].append(dt)
    for alg, (flags, _) in ORDERS.items():
        dt, rss, so = timed(reshard_cmd(big_tpl, alg, flags), big_files)
        times[alg].append(dt)
        s = json.loads(so)
        if r == 0:
            notes[alg] = (f"{verify(big_tpl, alg, flags)}; {s['output_shards']} shards; "
                          f"in-process {s['seconds']:.2f} s; RSS {rss / 2**20:.0f} MiB; sorted runs {s['sort_runs']}")
    print(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), file=sys.stderr)

wds_times, wds_notes = {}, {}
if wds:
    n_records = None
    for alg, (_, order) in ORDERS.items():
        dt, rss, so = timed([sys.executable, wds_py, "--output-dir", out, "--order", order, *big_files], big_files)
        s = json.loads(so.strip().splitlines()[-1])
        wds_times[order] = dt
        wds_notes[order] = f"{s['records']} records, {s['output_shards']} shards; RSS {rss / 1e9:.2f} GB"
        print(f"webdataset {order}: {dt:.2f} s", file=sys.stderr)

rss_runs = []
for r in range(rounds):
    dt, rss, so = timed(reshard_cmd(small_tpl, "alphanumeric", [], ["--max-mem", "256MiB"]), small_files)
    s = json.loads(so)
    if r == 0:
        verify(small_tpl, "alphanumeric", [])
    rss_runs.append((rss, s, dt))
    print(f"small records, --max-mem 256MiB: RSS {rss / 2**20:.0f} MiB, {dt:.2f} s", file=sys.stderr)
clean()
load_after = os.getloadavg()

med = {k: statistics.median(v) for k, v in times.items()}
best = {k: min(v) for k, v in times.items()}
rate = lambda s: in_bytes / 1e6 / s
print()
print(f"dsort reshard benchmark, {datetime.datetime.now():%Y-%m-%d %H:%M}; {os.cpu_count()} cores; "
      f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; {time.time() - started:.0f} s in all")
print(f"data: {len(big_files)} tar shards, {in_bytes / 1e9:.2f} GB, records .jpg+.cls of 1 KiB..100 KiB (log-spread); "
      f"output shards {SHARD}; timings include the final sync")
print(f"page cache: inputs warm before every run (at least {min(warm_seen):.0%} cached), outputs written through it")
print(f"rows: {rounds} alternated round(s): median and best wall seconds; MB/s = input tar bytes / median seconds;")
print(f"      /floor = floor seconds / run seconds (median/median and best/best); /wds = webdataset seconds / median")
print()
print(f"{'run':<34}{'median':>8}{'best':>7}{'MB/s':>7}{'/floor':>8}{'(best)':>7}{'/wds':>7}  notes")
print(f"{'floor: cat inputs > one file; sync':<34}{med['floor']:>8.2f}{best['floor']:>7.2f}{rate(med['floor']):>7.0f}"
      f"{1:>8.2f}{1:>7.2f}{'':>7}  times {' '.join(f'{t:.2f}' for t in times['floor'])}")
for alg, (_, order) in ORDERS.items():
    vs_wds = f"{wds_times[order] / med[alg]:>6.1f}x" if order in wds_times else f"{'-':>7}"
    print(f"{'dsort reshard ' + alg:<34}{med[alg]:>8.2f}{best[alg]:>7.2f}{rate(med[alg]):>7.0f}"
          f"{med['floor'] / med[alg]:>8.2f}{best['floor'] / best[alg]:>7.2f}{vs_wds}  "
          f"times {' '.join(f'{t:.2f}' for t in times[alg])}; {notes[alg]}")
for order, t in wds_times.items():
    print(f"{'webdataset ' + order + ' (all in RAM)':<34}{t:>8.2f}{t:>7.2f}{rate(t):>7.0f}{med['floor'] / t:>8.2f}"
          f"{best['floor'] / t:>7.2f}{'':>7}  {wds_notes[order]}")
print()
worst = min(min(med["floor"] / med[a], best["floor"] / best[a]) for a in ORDERS)
print(f"(a) dsort >= 0.8 x floor speed:   worst order and statistic {worst:.2f}  {'MET' if worst >= 0.8 else 'MISSED'}")
if wds_times:
    worst_wds = min(wds_times[o] / med[a] for a, (_, o) in ORDERS.items())
    print(f"(b) dsort >= 6 x webdataset:      worst order {worst_wds:.1f}x  {'MET' if worst_wds >= 6 else 'MISSED'}")
rss_max = max(r[0] for r in rss_runs)
s0 = rss_runs[0][1]
by_time = " ".join(f"{r[0] / 2**20:.0f}" for r in rss_runs)
by_summary = " ".join(f"{(r[1]['peak_rss'] or 0) / 2**20:.0f}" for r in rss_runs)
print(f"(c) peak RSS of --max-mem 256MiB on {s0['records']} records of 100..500 B: max {rss_max / 2**20:.0f} MiB of "
      f"{len(rss_runs)} run(s) (/usr/bin/time: {by_time}; summary peak_rss: {by_summary}) vs goal {RSS_GOAL >> 20} MiB  "
      f"{'MET' if rss_max <= RSS_GOAL else 'MISSED'}")
print(f"    that job: {s0['sort_runs']} sorted runs, {s0['spilled_bytes'] / 2**20:.0f} MiB spilled, peak reserved "
      f"{s0['peak_reserved'] / 2**20:.0f} MiB, {statistics.median(r[2] for r in rss_runs):.1f} s, verified")
PY
