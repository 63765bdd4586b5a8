#!/usr/bin/env bash
# Benchmark: the same distributed job on clusters of 1, 2, 4, 8 and 16 loopback targets (issue #12): per size,
# wall time, record metadata bytes on the wire per record, record bytes on the network against the ideal
# (records whose input holder is not their output creator, computed independently from where the shards lie
# on disk: must be 1.00), peak threads, peak anonymous memory (sampled RssAnon: heap and stacks) and peak
# RSS (the kernel's VmHWM, which also counts pages of the input files a target maps to serve them) of a
# target, the coordinator's CPU time, and each phase's time (slowest target).
#
# Usage: benches/scripts/cluster_scale.sh [--quick] [--sizes "1 2 4 8 16"]
#   --quick    40 shards x 500 records (20k records, ~25 MB) instead of 200 x 2000 (400k records, ~500 MB)
#   --sizes    the cluster sizes to run (default "1 2 4 8 16")
# Env: DSORT=path/to/dsort, WORK=folder (default /tmp/dsort-bench-scale), PORT=coordinator port (18580).
set -euo pipefail
sizes="1 2 4 8 16"
want_sizes=0
bench_flag() {
  if [[ $want_sizes == 1 ]]; then sizes=$1; want_sizes=0; return 0; fi
  [[ $1 == --sizes ]] && { want_sizes=1; return 0; }
  return 1
}
source "$(dirname "$0")/common.sh"
bench_args 10 "$@"
work=${WORK:-${TMPDIR:-/tmp}/dsort-bench-scale}
port=${PORT:-18580}
url=http://127.0.0.1:$port
need_dsort
if [[ $quick == 1 ]]; then shards=40; records=500; else shards=200; records=2000; fi
last=$((shards - 1))
data=$work/data-$shards-$records
mkdir -p "$work"
if [[ $(cat "$data/.complete" 2>/dev/null) != "v1" ]]; then
  rm -rf "$data"; mkdir -p "$data"
  echo "generating $data ..." >&2
  "$dsort" gen --output "$data/shard-{000..$last}.tar" --records-per-shard "$records" --record-size 256B..2KiB \
    --seed 12 >/dev/null
  echo v1 >"$data/.complete"
fi
bytes=$(du -cb "$data"/shard-*.tar | tail -1 | cut -f1)
total_records=$((shards * records))
spec=$work/spec.json
cat >"$spec" <<EOF
{"input_bck": {"name": "src"}, "input_format": {"template": "shard-{000..$last}.tar"},
 "output_bck": {"name": "dst"}, "output_format": "out-{00000..99999}.tar", "output_shard_size": "1MiB",
 "algorithm": {"kind": "shuffle", "seed": "7"}, "description": "scale bench"}
EOF
clk=$(getconf CLK_TCK)
cpu_of() { awk -v t="$clk" '{ printf "%.2f\n", ($14 + $15) / t }' "/proc/$1/stat"; }

pids=()
phase_lines=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; pids=(); }
trap cleanup EXIT

printf '%-8s %10s %14s %16s %13s %13s %14s %14s\n' targets "wall s" "meta B/record" "net bytes/ideal" "peak threads" "peak anon MB" "peak RSS MB" "coord CPU s"
for n in $sizes; do
  cluster=$work/cluster-$n
  rm -rf "$cluster"; mkdir -p "$cluster"
  "$dsort" serve coordinator --listen "127.0.0.1:$port" >"$cluster/coordinator.out" 2>"$cluster/coordinator.log" &
  coord=$!
  pids+=("$coord")
  tpids=()
  for i in $(seq 0 $((n - 1))); do
    "$dsort" serve target --listen 127.0.0.1:0 --coordinator "$url" --mountpath "$cluster/t$i" \
      >"$cluster/t$i.out" 2>"$cluster/t$i.log" &
    pids+=($!); tpids+=($!)
  done
  export DSORT_URL=$url
  for _ in $(seq 300); do
    [[ $(curl -s "$url/v1/health" | python3 -c 'import json,sys; print(json.load(sys.stdin)["healthy_targets"])' 2>/dev/null) == "$n" ]] && break
    sleep 0.1
  done
  "$dsort" put "$data"/shard-*.tar ais://src/ >/dev/null
  sync
  # Peak threads and VmHWM of every target, sampled until the job ends (VmHWM is the kernel's own peak).
  python3 - "$cluster/sampled" "${tpids[@]}" <<'EOF' &
import os, sys, time
out, pids = sys.argv[1], sys.argv[2:]
peak = anon = 0
while not os.path.exists(out + ".stop"):
    for p in pids:
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("Threads:"):
                    peak = max(peak, int(line.split()[1]))
                elif line.startswith("RssAnon:"):
                    anon = max(anon, int(line.split()[1]))
        except OSError:
            pass
    time.sleep(0.01)
hwm = 0
for p in pids:
    for line in open(f"/proc/{p}/status"):
        if line.startswith("VmHWM:"):
            hwm = max(hwm, int(line.split()[1]))
open(out, "w").write(f"{peak} {anon // 1024} {hwm // 1024}\n")
EOF
  sampler=$!
  c0=$(cpu_of "$coord")
  t0=$(now)
  id=$("$dsort" start "$spec")
  "$dsort" wait "$id" --timeout 60m >/dev/null
  wall=$(echo "$(now) - $t0" | bc)
  c1=$(cpu_of "$coord")
  touch "$cluster/sampled.stop"; wait "$sampler"
  read -r threads anon rss <"$cluster/sampled"
  meta=0; net=0
  for i in $(seq 0 $((n - 1))); do
    u=$(head -1 "$cluster/t$i.out" | sed 's/^listening on //')
    m=$(curl -s "$u/metrics")
    meta=$((meta + $(awk '/^dsort_metadata_bytes_sent_total/ { printf "%.0f", $NF }' <<<"$m")))
    net=$((net + $(awk '/^dsort_network_bytes_sent_total/ { printf "%.0f", $NF }' <<<"$m")))
  done
  ideal=$(python3 "$(dirname "$0")/network_ideal.py" "$cluster" "$n")
  # Where the time went: each phase as long as its slowest target (the coordinator's phase counters).
  phases=$(curl -s "$url/metrics" | awk '/^dsort_phase_seconds_total/ {
    match($0, /phase="[a-z]+"/); printf "%s %.2f s, ", substr($0, RSTART + 7, RLENGTH - 8), $NF }')
  phase_lines+=("$n targets: ${phases%, }")
  ratio=$(if [[ $ideal == 0 ]]; then [[ $net == 0 ]] && echo "1.000 (0 B)" || echo "inf"; else printf '%.3f' "$(echo "$net / $ideal" | bc -l)"; fi)
  printf '%-8s %10.2f %14.1f %16s %13s %13s %14s %14.2f\n' "$n" "$wall" "$(echo "$meta / $total_records" | bc -l)" \
    "$ratio" "$threads" "$anon" "$rss" "$(echo "$c1 - $c0" | bc)"
  cleanup
done
echo "data: $bytes bytes in $shards shards, $total_records records of 256 B..2 KiB; shuffle, 1 MiB outputs;" \
  "$(nproc) cores; load: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "phases (slowest target):"
printf '  %s\n' "${phase_lines[@]}"
