#!/usr/bin/env bash
# Record metadata at rest (issue #13): bytes per record in memory and in spill runs, before (records as
# RecordItem, the old spill format) and now (the sorter's arena and runs), on 2M two-entry records with
# 20-byte names, shuffle and alphanumeric, and a projection for 1B records at a 2 GiB budget.
# Usage: benches/scripts/metadata_bench.sh [--quick]   (--quick: 200,000 records)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
records=2000000
budget_mib=64
if [[ ${1:-} == --quick ]]; then
  records=200000
  budget_mib=4
elif [[ $# -gt 0 ]]; then
  sed -n '2,5p' "$0"
  exit 2
fi
cargo build --release -p dsort-benches --bin metadata_bench --manifest-path "$root/Cargo.toml"
"$root/target/release/metadata_bench" "$records" "$budget_mib"
