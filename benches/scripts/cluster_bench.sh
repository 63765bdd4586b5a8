#!/usr/bin/env bash
# Benchmark: a distributed job on 3 loopback targets against `dsort reshard` on one machine, same data (about
# 2 GiB of tar shards), same spec (shuffle with a seed, 256 MiB output shards), alternated rounds, every time
# including a final `sync`. Also checks the network bytes the targets counted against the ideal: the
# content bytes of records whose input shard's holder is not their output shard's creator (computed here,
# independently, from where the shards lie on the targets' disks). See benches/README.md.
#
# Usage: benches/scripts/cluster_bench.sh [--quick] [--rounds N]
#   --quick    ~300 MB instead of ~2 GiB (smoke test)
#   --rounds   timed rounds of each (default 3; 1 with --quick)
# Env: DSORT=path/to/dsort, WORK=folder (default /tmp/dsort-bench-cluster), PORT=coordinator port (18480).
set -euo pipefail
source "$(dirname "$0")/common.sh"
bench_args 12 "$@"
work=${WORK:-${TMPDIR:-/tmp}/dsort-bench-cluster}
port=${PORT:-18480}
url=http://127.0.0.1:$port
need_dsort
if [[ $quick == 1 ]]; then
  records=150; rounds=${rounds:-1}
else
  records=1000; rounds=${rounds:-3}
fi
data=$work/data-$records
mkdir -p "$work"
if [[ $(cat "$data/.complete" 2>/dev/null) != "v1" ]]; then
  rm -rf "$data"; mkdir -p "$data"
  echo "generating $data ..." >&2
  "$dsort" gen --output "$data/shard-{00..19}.tar" --records-per-shard "$records" --record-size 10KiB..200KiB \
    --seed 5 >/dev/null
  sync
  echo v1 >"$data/.complete"
fi
bytes=$(du -cb "$data"/shard-*.tar | tail -1 | cut -f1)

# One machine: the input bucket is the data folder itself (a symlink), the output a fresh folder.
local=$work/local
rm -rf "$local"; mkdir -p "$local"
ln -s "$data" "$local/src"
spec=$work/spec.json
cat >"$spec" <<'EOF'
{"input_bck": {"name": "src"}, "input_format": {"template": "shard-{00..19}.tar"},
 "output_bck": {"name": "dst"}, "output_format": "out-{000..999}.tar", "output_shard_size": "256MiB",
 "algorithm": {"kind": "shuffle", "seed": "7"}, "description": "cluster bench"}
EOF

# The cluster: a coordinator and 3 targets (one mountpath each) on loopback.
cluster=$work/cluster
rm -rf "$cluster"; mkdir -p "$cluster"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
"$dsort" serve coordinator --listen "127.0.0.1:$port" >"$cluster/coordinator.out" 2>"$cluster/coordinator.log" &
pids+=($!)
for i in 0 1 2; do
  "$dsort" serve target --listen 127.0.0.1:0 --coordinator "$url" --mountpath "$cluster/t$i" \
    >"$cluster/t$i.out" 2>"$cluster/t$i.log" &
  pids+=($!)
done
export DSORT_URL=$url
for _ in $(seq 100); do
  [[ $(curl -s "$url/v1/health" | python3 -c 'import json,sys; print(json.load(sys.stdin)["healthy_targets"])' 2>/dev/null) == 3 ]] && break
  sleep 0.1
done
"$dsort" put "$data"/shard-*.tar ais://src/ >/dev/null
sync

target_urls() { for i in 0 1 2; do head -1 "$cluster/t$i.out" | sed 's/^listening on //'; done; }
net_sent() { # the targets' network bytes sent, summed
  for u in $(target_urls); do curl -s "$u/metrics"; done |
    awk '/^dsort_network_bytes_sent_total/ { s += $NF } END { printf "%.0f\n", s }'
}

declare -a t_local t_cluster
for r in $(seq "$rounds"); do
  rm -rf "$local/dst"; rm -rf "$cluster"/t*/dst; sync
  t0=$(now)
  "$dsort" reshard --spec "$spec" --root "$local" >/dev/null 2>&1
  sync
  t_local+=("$(echo "$(now) - $t0" | bc)")

  before=$(net_sent)
  t0=$(now)
  id=$("$dsort" start "$spec")
  "$dsort" wait "$id" --timeout 30m >/dev/null
  sync
  t_cluster+=("$(echo "$(now) - $t0" | bc)")
  sent=$(($(net_sent) - before))
  "$dsort" rm "$id" >/dev/null
  echo "round $r: reshard ${t_local[-1]} s, cluster ${t_cluster[-1]} s, network ${sent} B" >&2
done

# The ideal network bytes, from where shards lie: record -> input shard -> its target; output shard -> its
# target (the creator); a record's content bytes cross the network iff the two differ.
ideal=$(python3 "$(dirname "$0")/network_ideal.py" "$cluster" 3)

# Where the cluster's time went: each phase as long as its slowest target, averaged over the rounds.
phases=$(curl -s "$url/metrics" | awk -v n="$rounds" '/^dsort_phase_seconds_total/ {
  match($0, /phase="[a-z]+"/); printf "%s %.2f s, ", substr($0, RSTART + 7, RLENGTH - 8), $NF / n }')

ml=$(median "${t_local[@]}"); mc=$(median "${t_cluster[@]}")
bl=$(best "${t_local[@]}"); bc_=$(best "${t_cluster[@]}")
echo
echo "data: $bytes bytes in 20 shards, $((records * 20)) records; $rounds round(s); load: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-28s %10s %10s %12s\n' "" "median s" "best s" "MB/s (best)"
printf '%-28s %10.2f %10.2f %12.0f\n' "dsort reshard (1 process)" "$ml" "$bl" "$(echo "$bytes / $bl / 1000000" | bc -l)"
printf '%-28s %10.2f %10.2f %12.0f\n' "cluster, 3 targets" "$mc" "$bc_" "$(echo "$bytes / $bc_ / 1000000" | bc -l)"
printf 'throughput ratio cluster/reshard: %.2f (best vs best), %.2f (medians)\n' \
  "$(echo "$bl / $bc_" | bc -l)" "$(echo "$ml / $mc" | bc -l)"
echo "cluster phases (slowest target, per job): ${phases%, }"
printf 'network bytes: %d measured, %d ideal: ratio %.3f\n' "$sent" "$ideal" "$(echo "$sent / $ideal" | bc -l)"
