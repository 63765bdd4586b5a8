# Sourced by the benchmark scripts: their shared options, the dsort binary, timing and statistics.
# A script with flags of its own defines `bench_flag` before calling `bench_args` (it gets each argument the
# shared parser does not know and returns 1 to refuse it).

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
dsort=${DSORT:-$root/target/release/dsort}
quick=0
rounds=

# bench_args LAST ARGS...: --quick, --rounds N, -h/--help (prints lines 2..LAST of the script: its header
# comment) and the script's own flags through bench_flag; anything else exits 2.
bench_args() {
  local help_last=$1
  shift
  while [[ $# -gt 0 ]]; do
    case $1 in
      --quick) quick=1 ;;
      --rounds) rounds=$2; shift ;;
      -h | --help) sed -n "2,${help_last}p" "$0"; exit 0 ;;
      *)
        if ! declare -F bench_flag >/dev/null || ! bench_flag "$1"; then
          echo "unknown argument: $1" >&2
          exit 2
        fi
        ;;
    esac
    shift
  done
}

# Build the release binary unless DSORT (or a previous build) provides one.
need_dsort() {
  [[ -x $dsort ]] || (cd "$root" && cargo build --release -q -p dsort-coordinator)
}

now() { date +%s.%N; }
median() { printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
best() { printf '%s\n' "$@" | sort -g | head -1; }

# Generated data is reused by later runs:
ensure() { # ensure DIR PARAMS FUNCTION: (re)generate DIR unless it was made with the same PARAMS
  local dir=$1 params=$2 fn=$3
  if [[ $(cat "$dir/.complete" 2>/dev/null) != "$params" ]]; then
    rm -rf "$dir"; mkdir -p "$dir"
    echo "generating $dir ..." >&2
    "$fn"
    sync
    echo "$params" >"$dir/.complete"
  fi
}
