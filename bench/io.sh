#!/usr/bin/env bash
# I/O benchmark for issue 2: load + verify + save through the IR, against python onnx.load + onnx.save.
#
#   bench/io.sh [PYTHON]      (PYTHON: a python with onnx==1.23.2; default .venv/bin/python)
#
# Generates the chain models (examples/gen_bench_model.rs) into a scratch folder (tmpfs when there is room, so
# disk writeback does not blur the timings), then prints, per model, the median of 3 whole-process runs of
# `mpopt copy` (wall seconds and peak RSS) and of python's load + save of the same file.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
cargo build -q --release -p mpopt-cli --bins
cargo build -q --release -p mpopt-onnx --example gen_bench_model
BIN=target/release/mpopt
GEN=target/release/examples/gen_bench_model
if [ -d /dev/shm ] && [ "$(df -Pk /dev/shm | awk 'NR==2{print $4}')" -gt 2000000 ]; then
  SCRATCH=$(mktemp -d /dev/shm/mpopt-bench.XXXXXX)
else
  SCRATCH=$(mktemp -d)
fi
trap 'rm -rf "$SCRATCH"' EXIT

median() { sort -g | awk '{a[NR]=$0} END{print a[int((NR+1)/2)]}'; }

# runs "$@" 3 times; prints "median_seconds median_maxrss_kb"
measure() {
  local t=() r=()
  for _ in 1 2 3; do
    local out
    /usr/bin/time -f "%e %M" -o "$SCRATCH/time" "$@" >/dev/null 2>&1
    out=$(tail -1 "$SCRATCH/time")
    t+=("${out% *}"); r+=("${out#* }")
  done
  echo "$(printf '%s\n' "${t[@]}" | median) $(printf '%s\n' "${r[@]}" | median)"
}

printf '%-24s %9s %12s %10s | %10s %12s\n' model MB "mpopt s" "RSS MB" "python s" "RSS MB"
for spec in "10000 88" "5000 1" "50000 1" "500000 1"; do
  set -- $spec
  f="$SCRATCH/chain_$1_$2.onnx"
  "$GEN" "$f" "$1" "$2" 2>/dev/null
  mb=$(( $(stat -c %s "$f") / 1000000 ))
  read -r ms mr <<<"$(measure "$BIN" copy "$f" -o "$SCRATCH/out.onnx")"
  if [ "$1" -le 50000 ] && [ -x "$PY" ]; then
    read -r ps pr <<<"$(measure "$PY" -c "import onnx,sys; onnx.save(onnx.load(sys.argv[1]), sys.argv[2])" "$f" "$SCRATCH/py.onnx")"
  else
    ps=-; pr=-
  fi
  printf '%-24s %9s %12s %10s | %10s %12s\n' "$(( $1 * 2 )) nodes, dim $2" "$mb" "$ms" "$(( mr / 1024 ))" "$ps" "$( [ "$pr" = - ] && echo - || echo $(( pr / 1024 )) )"
  rm -f "$f" "$SCRATCH/out.onnx" "$SCRATCH/py.onnx"
done
