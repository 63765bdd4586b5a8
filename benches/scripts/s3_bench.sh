#!/usr/bin/env bash
# Benchmark: `dsort reshard` s3 -> s3 against local -> local on the same data, on one machine: the S3 side
# is moto (`python3 -m moto.server`, from `pip install 'moto[server]'`) on loopback, the local side the
# same shards in a folder. Rounds alternate the two (the machine is shared and noisy: only the ratio
# means anything). Every s3 output is checked byte for byte against the local output of the same round,
# outside the timing. See benches/README.md.
#
# Usage: benches/scripts/s3_bench.sh [--quick] [--rounds N]
#   --quick    ~60 MB of shards (smoke test)
#   --rounds   alternated rounds (default 3; 1 with --quick); the table shows medians and bests
# Env: DSORT=path/to/dsort, WORK=folder for data and outputs (default /tmp/dsort-bench-s3),
#      PYTHON=interpreter with moto[server] installed (default python3).
set -euo pipefail
source "$(dirname "$0")/common.sh"
bench_args 13 "$@"
work=${WORK:-${TMPDIR:-/tmp}/dsort-bench-s3}
python=${PYTHON:-python3}
ctl=("$python" "$root/tests/s3ctl.py")
need_dsort
"$python" -c 'import moto.server, boto3' 2>/dev/null || { echo "needs: pip install 'moto[server]'" >&2; exit 1; }

if [[ $quick == 1 ]]; then
  size=quick; shards=4; records=600; rounds=${rounds:-1}
else
  size=full; shards=12; records=1000; rounds=${rounds:-3}
fi
data=$work/data-$size
last=$(printf %03d $((shards - 1)))
tpl="shard-{000..$last}.tar"
mkdir -p "$work"
if [[ $(cat "$data/.complete" 2>/dev/null) != "gen-v1 $shards $records" ]]; then
  rm -rf "$data"; mkdir -p "$data"
  echo "generating $data ..." >&2
  "$dsort" gen --output "$data/$tpl" --records-per-shard "$records" --record-size 10KiB..40KiB --seed 17 >/dev/null
  echo "gen-v1 $shards $records" >"$data/.complete"
fi
in_bytes=$(du -cb "$data"/*.tar | tail -1 | cut -f1)

port=$("$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$python" -m moto.server -H 127.0.0.1 -p "$port" >"$work/moto.log" 2>&1 &
moto_pid=$!
trap 'kill $moto_pid 2>/dev/null; wait $moto_pid 2>/dev/null || true' EXIT
endpoint=http://127.0.0.1:$port
until "$python" -c "import socket,sys; socket.create_connection(('127.0.0.1',$port),1)" 2>/dev/null; do
  kill -0 $moto_pid 2>/dev/null || { cat "$work/moto.log" >&2; exit 1; }
  sleep 0.1
done
"${ctl[@]}" "$endpoint" mb src dst
"${ctl[@]}" "$endpoint" put "$data" src in/
export DSORT_S3_ENDPOINT=$endpoint DSORT_S3_ALLOW_HTTP=true AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench

job=(--shard-size 64MiB --algorithm shuffle --seed 7 --json)
declare -a t_local t_s3
for ((r = 1; r <= rounds; r++)); do
  out=$work/out-local
  rm -rf "$out"; sync
  cat "$data"/*.tar >/dev/null # inputs warm in the page cache, like the server's in-memory copies
  t0=$(now)
  "$dsort" reshard --input "$data/$tpl" --output "$out/o-{0000..9999}.tar" "${job[@]}" >"$work/local.json"
  sync
  t1=$(now)
  "$dsort" reshard --input "s3://src/in/$tpl" --output "s3://dst/r$r/o-{0000..9999}.tar" "${job[@]}" >"$work/s3.json"
  t2=$(now)
  t_local+=("$(echo "$t1 - $t0" | bc -l)")
  t_s3+=("$(echo "$t2 - $t1" | bc -l)")
  # Same bytes whatever the buckets (outside the timing).
  got=$work/got; rm -rf "$got"; mkdir -p "$got"
  "${ctl[@]}" "$endpoint" get dst "r$r/" "$got"
  diff -r -q "$out" "$got" >/dev/null || { echo "round $r: s3 outputs differ from local ones" >&2; exit 1; }
  echo "round $r: local $(printf %.2f "${t_local[-1]}") s, s3 $(printf %.2f "${t_s3[-1]}") s ($(ls "$out" | wc -l) identical shards)" >&2
done

lm=$(printf %.2f "$(median "${t_local[@]}")"); lb=$(printf %.2f "$(best "${t_local[@]}")")
sm=$(printf %.2f "$(median "${t_s3[@]}")"); sb=$(printf %.2f "$(best "${t_s3[@]}")")
mb() { echo "$in_bytes / 1000000 / $1" | bc -l | xargs printf %.1f; }
echo "dsort s3 benchmark, $(date -u '+%Y-%m-%d %H:%M') UTC; $(nproc) cores; load average $(cut -d' ' -f1 /proc/loadavg)"
echo "data: $shards tar shards, $in_bytes bytes, records .jpg+.cls of 10..40 KiB; shuffle, output shards 64MiB"
echo "s3: moto $("$python" -c 'import moto; print(moto.__version__)') on loopback (in-memory, path style); local: page-cached folder, timings include sync"
printf '%-22s %8s %8s %8s\n' run median best MB/s
printf '%-22s %8s %8s %8s\n' "local -> local" "$lm" "$lb" "$(mb "$lm")"
printf '%-22s %8s %8s %8s\n' "s3 -> s3" "$sm" "$sb" "$(mb "$sm")"
echo "ratio s3->s3 / local->local (median): $(echo "$sm / $lm" | bc -l | xargs printf %.2f)x the time"
