#!/usr/bin/env bash
# Benchmark: `dsort reshard` s3 -> s3 against local -> local on the same data, on one machine: the S3 side
# is an S3 server on loopback, the local side the same shards in a folder. Rounds alternate the two (the
# machine is shared and noisy: only the ratio means anything). Every s3 output is checked byte for byte
# against the local output of the same round, outside the timing. Prints the S3 requests of the last s3
# round (the `s3` counts of `dsort reshard --json`). See benches/README.md.
#
# Usage: benches/scripts/s3_bench.sh [--quick] [--rounds N] [--server moto|s3s]
#   --quick    ~60 MB of shards (smoke test)
#   --rounds   alternated rounds (default 3; 1 with --quick); the table shows medians and bests
#   --server   moto (default): `python3 -m moto.server`, in-memory Python (`pip install 'moto[server]'`);
#              s3s: s3s-fs, an S3 server in Rust over a folder (crates.io `s3s-fs`, installed on first use
#              by `cargo install` under $WORK/s3s-fs): many requests per second, but it streams a GET's
#              file in 4 KiB reads, so it is slower than moto for large ranged GETs (benches/README.md)
# Env: DSORT_S3_READ=once|ranges (how dsort reads the input objects, default once),
#      DSORT=path/to/dsort, WORK=folder for data and outputs (default /tmp/dsort-bench-s3),
#      PYTHON=interpreter with boto3 (and moto[server] for --server moto; default python3),
#      S3S_FS_VERSION=version of s3s-fs to install (default 0.14.1, the newest that builds with Rust 1.95).
set -euo pipefail
source "$(dirname "$0")/common.sh"
server=moto
server_next=0
bench_flag() {
  if [[ $server_next == 1 ]]; then
    server=$1; server_next=0
  elif [[ $1 == --server ]]; then
    server_next=1
  elif [[ $1 == --server=* ]]; then
    server=${1#--server=}
  else
    return 1
  fi
}
bench_args 17 "$@"
[[ $server_next == 0 ]] || { echo "--server needs a value: moto or s3s" >&2; exit 2; }
[[ $server == moto || $server == s3s ]] || { echo "--server: moto or s3s, not ${server:-nothing}" >&2; exit 2; }
work=${WORK:-${TMPDIR:-/tmp}/dsort-bench-s3}
python=${PYTHON:-python3}
ctl=("$python" "$root/tests/s3ctl.py")
need_dsort
"$python" -c 'import boto3' 2>/dev/null || { echo "needs: pip install boto3" >&2; exit 1; }
if [[ $server == moto ]]; then
  "$python" -c 'import moto.server' 2>/dev/null || { echo "needs: pip install 'moto[server]'" >&2; exit 1; }
fi
s3s_version=${S3S_FS_VERSION:-0.14.1}
s3s_fs=$work/s3s-fs/bin/s3s-fs
if [[ $server == s3s ]] && ! "$s3s_fs" --version 2>/dev/null | grep -qF "$s3s_version"; then
  echo "installing s3s-fs $s3s_version into $work/s3s-fs (a few minutes, once) ..." >&2
  cargo install --locked --quiet s3s-fs --version "$s3s_version" --features binary --root "$work/s3s-fs" --force
fi

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
# Credentials: s3ctl.py signs as test/test; s3s-fs checks every signature against them, moto none.
if [[ $server == s3s ]]; then
  s3s_root=$work/s3s-root # the server's buckets: folders, emptied each run
  rm -rf "$s3s_root"; mkdir -p "$s3s_root"
  "$s3s_fs" --host 127.0.0.1 --port "$port" --access-key test --secret-key test "$s3s_root" >"$work/server.log" 2>&1 &
  server_desc="s3s-fs $("$s3s_fs" --version | awk '{print $2}') on loopback (objects in files of a folder, path style, signatures checked)"
else
  "$python" -m moto.server -H 127.0.0.1 -p "$port" >"$work/server.log" 2>&1 &
  server_desc="moto $("$python" -c 'import moto; print(moto.__version__)') on loopback (in-memory, path style)"
fi
server_pid=$!
trap 'kill $server_pid 2>/dev/null; wait $server_pid 2>/dev/null || true' EXIT
endpoint=http://127.0.0.1:$port
until "$python" -c "import socket,sys; socket.create_connection(('127.0.0.1',$port),1)" 2>/dev/null; do
  kill -0 $server_pid 2>/dev/null || { cat "$work/server.log" >&2; exit 1; }
  sleep 0.1
done
"${ctl[@]}" "$endpoint" mb src dst
"${ctl[@]}" "$endpoint" put "$data" src in/
export DSORT_S3_ENDPOINT=$endpoint DSORT_S3_ALLOW_HTTP=true AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test

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
echo "s3: $server_desc; input reads: DSORT_S3_READ=${DSORT_S3_READ:-once}; local: page-cached folder, timings include sync"
printf '%-22s %8s %8s %8s\n' run median best MB/s
printf '%-22s %8s %8s %8s\n' "local -> local" "$lm" "$lb" "$(mb "$lm")"
printf '%-22s %8s %8s %8s\n' "s3 -> s3" "$sm" "$sb" "$(mb "$sm")"
echo "ratio s3->s3 / local->local (median): $(echo "$sm / $lm" | bc -l | xargs printf %.2f)x the time"
# The requests of the last s3 round, as its --json summary counted them (retries included).
"$python" - "$work/s3.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
for bucket, r in sorted(s.get("s3", {}).items()):
    print(f"requests s3://{bucket}: {r['get_requests']} GET ({r['get_bytes'] / 1e6:.1f} MB), "
          f"{r['put_requests']} PUT ({r['put_bytes'] / 1e6:.1f} MB), {r['list_requests']} LIST, {r['other_requests']} other")
print(f"content bytes moved: {s['bytes'] / 1e6:.1f} MB; phases: extract {s['extract_seconds']:.2f} s, create {s['create_seconds']:.2f} s")
PY
