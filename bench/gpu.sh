#!/usr/bin/env bash
# GPU verification and benchmark of the CUDA executor, in one run (target: under 10 minutes on one GPU).
#
#   bench/gpu.sh                 # builds target/release/mpopt, then everything below
#   MPOPT=path/to/mpopt bench/gpu.sh   # uses a binary built elsewhere (no cargo needed)
#
# 1. GPU tests: mpopt-cuda's unit tests (when cargo is there) and, for every corpus model,
#    - the fp32 model on CUDA against the CPU reference executor (rtol 1e-3, atol 1e-4), and
#    - the mixed-precision model (`mpopt MODEL -o`) on CUDA against the CPU executor's GPU-faithful run of the
#      same model: every output's cosine >= 0.9999, top-1 agreement >= 99%, no new NaN/Inf. (f32 summation
#      order differs between cuBLAS and the CPU, which moves an f16 result by an ulp now and then, and deep
#      fp16 networks amplify that: docs/cuda.md has the emulator's figures.)
# 2. Benchmark: each corpus model, fp32 and mixed, on the GPU at a batch that fills it (inputs tiled along
#    their first axis where the model allows), the median of 20 runs after a warm-up; a Markdown table.
# 3. The GEMM path: the mixed paraphrase, open_nsfw and vit models' GEMMs timed shape by shape
#    (`mpopt run --gemm-profile`) against torch.matmul (cuBLAS's own heuristics) on the same shapes, where
#    python3 has a CUDA PyTorch (bench/gpu_gemm_peak.py; target: at least 60% of cuBLAS's best).
#
# Without a GPU every `--device cuda` step fails with "CUDA driver library (libcuda.so) not found".
set -uo pipefail
cd "$(dirname "$0")/.."
CORPUS=${CORPUS:-../shared/corpus}
OUT=${OUT:-${TMPDIR:-/tmp}/mpopt-gpu}
REPEAT=${REPEAT:-20}
# DEVICE=emu runs the same script on the kernel emulator (slow; to check the script itself without a GPU)
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
if [ -z "${MPOPT:-}" ]; then
  cargo build -q --release -p mpopt-cli || exit 1
  MPOPT=target/release/mpopt
fi

# batch multiplier per model (inputs are tiled this many times along axis 0; 1 where the batch is fixed)
batch_of() {
  case "$1" in
    paraphrase_minilm_l3_v2) echo 32 ;;
    open_nsfw_resnet50) echo 16 ;;
    vit_tiny_patch16_224_random) echo 32 ;;
    ppocr_mobile_v2_cls) echo 64 ;;
    magika_standard_v3_3) echo 64 ;;
    *) echo 1 ;;
  esac
}

fail=0
# the batch each model's benchmark ran at (its batch_of, or 1 where that did not run)
declare -A batch_used
echo "== GPU tests"
if [ "$DEVICE" = cuda ] && command -v cargo > /dev/null && [ -f Cargo.toml ]; then
  cargo test -q --release -p mpopt-cuda -- --nocapture 2>&1 | grep -E "GPU present|SKIP|test result|FAILED|panicked" || fail=1
fi
for m in "$CORPUS"/*/; do
  n=$(basename "$m")
  [ -f "$m/model.onnx" ] || continue
  "$MPOPT" "$m/model.onnx" -o "$OUT/$n.mixed.onnx" > /dev/null 2>&1 || { echo "FAIL $n: conversion"; fail=1; continue; }
  if "$MPOPT" compare "$m/model.onnx" "$m/model.onnx" --inputs "$m/inputs.npz" --device "$DEVICE" \
      --rtol 1e-3 --atol 1e-4 > "$OUT/$n.fp32.txt" 2>&1; then
    echo "ok   $n fp32 on $DEVICE matches the CPU executor"
  else
    echo "FAIL $n fp32 on $DEVICE:"; tail -5 "$OUT/$n.fp32.txt"; fail=1
  fi
  "$MPOPT" compare "$OUT/$n.mixed.onnx" "$OUT/$n.mixed.onnx" --inputs "$m/inputs.npz" --device "$DEVICE" \
      --json "$OUT/$n.mixed.json" > "$OUT/$n.mixed.txt" 2>&1
  if python3 - "$OUT/$n.mixed.json" <<'PY'
import json, sys
bad = []
for m in json.load(open(sys.argv[1])):
    t = m.get("top1")
    if m["cosine"] < 0.9999 or m["nan_cand"] > m["nan_ref"] or m["inf_cand"] > m["inf_ref"] \
            or (t and t[0] < 0.99 * t[1]):
        bad.append(f'{m["name"]}: cosine {m["cosine"]:.6f} top1 {t} max_abs {m["max_abs"]:.3e}')
if bad:
    print("\n".join(bad))
sys.exit(1 if bad else 0)
PY
  then
    echo "ok   $n mixed on $DEVICE matches the GPU-faithful CPU executor"
  else
    echo "FAIL $n mixed on $DEVICE:"; tail -5 "$OUT/$n.mixed.txt"; fail=1
  fi
  grep -h "candidate on" "$OUT/$n.fp32.txt" "$OUT/$n.mixed.txt" 2>/dev/null | cut -c1-220
done

echo
echo "== Benchmark (median of $REPEAT runs after a warm-up, end to end: inputs up, outputs down)"
echo
echo "| model | batch | fp32 ms | mixed ms | speedup | mixed: nodes on GPU / CPU fallback |"
echo "|---|---|---|---|---|---|"
median_ms() { sed -n 's/.* in \([0-9.]*\) ms (median.*/\1/p' "$1" | tail -1; }
for m in "$CORPUS"/*/; do
  n=$(basename "$m")
  [ -f "$OUT/$n.mixed.onnx" ] || continue
  b=$(batch_of "$n")
  run() { "$MPOPT" run "$1" --inputs "$m/inputs.npz" --device "$DEVICE" --repeat "$REPEAT" --batch "$2" > "$3" 2>&1; }
  if ! run "$m/model.onnx" "$b" "$OUT/$n.b.fp32.txt"; then
    b=1
    run "$m/model.onnx" 1 "$OUT/$n.b.fp32.txt"
  fi
  run "$OUT/$n.mixed.onnx" "$b" "$OUT/$n.b.mixed.txt"
  batch_used[$n]=$b
  f=$(median_ms "$OUT/$n.b.fp32.txt")
  h=$(median_ms "$OUT/$n.b.mixed.txt")
  sp=$(awk -v f="${f:-0}" -v h="${h:-0}" 'BEGIN { if (h > 0) printf "%.2fx", f / h; else print "-" }')
  place=$(grep -h "nodes on the device" "$OUT/$n.b.mixed.txt" | sed 's/.*: \([0-9]* nodes on the device\).*\(no CPU fallback\|CPU fallback: [^;]*\).*/\1, \2/' | tail -1)
  echo "| $n | x$b | ${f:-failed} | ${h:-failed} | $sp | ${place:-?} |"
done
echo
echo "== The GEMM path against cuBLAS's best for the same shapes (mixed models, the benchmark's batch)"
profiles=()
for n in paraphrase_minilm_l3_v2 open_nsfw_resnet50 vit_tiny_patch16_224_random; do
  m=$CORPUS/$n
  [ -f "$OUT/$n.mixed.onnx" ] || continue
  if "$MPOPT" run "$OUT/$n.mixed.onnx" --inputs "$m/inputs.npz" --device "$DEVICE" --batch "${batch_used[$n]:-1}" \
      --gemm-profile "$OUT/$n.gemm.json" > "$OUT/$n.gemm.txt" 2>&1; then
    grep -h "^GEMMs:" "$OUT/$n.gemm.txt"
    profiles+=("$OUT/$n.gemm.json")
  else
    echo "FAIL $n: GEMM timing run"; tail -3 "$OUT/$n.gemm.txt"; fail=1
  fi
done
if [ ${#profiles[@]} -gt 0 ]; then
  if [ "$DEVICE" = cuda ] && python3 -c "import torch; assert torch.cuda.is_available()" 2> /dev/null; then
    python3 bench/gpu_gemm_peak.py "${profiles[@]}" || echo "(the GEMM path is under 60% of cuBLAS's best on some model)"
  else
    echo "(no CUDA PyTorch here: cuBLAS's own times not measured)"
  fi
fi

echo
[ "$fail" = 0 ] && echo "gpu.sh: all GPU checks passed" || echo "gpu.sh: some GPU checks FAILED"
exit "$fail"
