#!/usr/bin/env bash
# Runs on the lent GPU machine, from what bench/gpu-pack.sh packed into .gpu/ (no Rust toolchain there):
#
#   bash bench/gpu-device.sh a   # unpacks the binaries, makes the CUDA libraries loadable, runs the GPU tests
#                                # (mpopt-cuda's, and the node suite on CUDA), then bench/gpu.sh on part a's models
#   bash bench/gpu-device.sh b   # bench/gpu.sh on part b's models
#   bash bench/gpu-device.sh c   # joins paraphrase_minilm from parts c1 and c2, then bench/gpu.sh on it
#
# Part a must have run on the same (warm) machine before b and c: they use its binaries. The log goes to
# $OUT/gpu-PART.log (the device tool brings $OUT back). SKIP_TESTS=1 skips part a's tests.
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:?usage: bench/gpu-device.sh a|b|c}
R=$PWD/.gpu/run
OUT=${OUT:-$R/out}
mkdir -p "$R" "$OUT"
exec > >(tee "$OUT/gpu-$part.log") 2>&1

# the binaries, once per machine
if [ ! -x "$R/mpopt" ]; then
  [ -d .gpu/a ] || { echo "gpu-device: .gpu/a is not here: run part a first (carry .gpu/a)"; exit 2; }
  # Python's lzma, not xz(1): the machine's image may lack xz-utils
  for f in .gpu/a/*.xz; do
    case "$f" in *.tar.xz) continue ;; esac
    b=$R/$(basename "$f" .xz)
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
      "$f" "$b" && chmod +x "$b"
  done
fi
eval "$(python3 bench/gpu_libs.py "$R/lib")"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
"$R/mpopt" --version
echo "binaries packed from $(cat .gpu/a/REVISION 2> /dev/null || echo '?'); this tree: $(git rev-parse --short HEAD 2> /dev/null || echo '?')"

fail=0
case "$part" in
  a)
    src=.gpu/a/corpus
    if [ -z "${SKIP_TESTS:-}" ]; then
      echo "== mpopt-cuda's tests (NVRTC and the kernels' launches on this GPU)"
      "$R/mpopt_cuda_tests" --nocapture 2>&1 | grep -E "GPU present|SKIP|test result|FAILED|panicked" || fail=1
      echo "== the node suite on CUDA (every test of a device op that the CPU executor passes)"
      [ -d "$R/nodesuite" ] ||
        python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' .gpu/a/nodesuite.tar.xz "$R"
      MPOPT_SUITE_DIRS="$R/nodesuite" MPOPT_GPU_ONLY=1 "$R/exec_suite" node_suite_on_gpu_devices --nocapture \
        2>&1 | grep -E "node tests|SKIP|test result|FAILED|panicked|/ test_" | head -80 || fail=1
    fi
    ;;
  b) src=.gpu/b/corpus ;;
  c)
    src=$R/corpus-c
    m=paraphrase_minilm_l3_v2
    if [ ! -f "$src/$m/model.onnx" ]; then
      [ -f .gpu/c1/corpus/$m/model.onnx.part1 ] && [ -f .gpu/c2/corpus/$m/model.onnx.part2 ] ||
        { echo "gpu-device: parts c1 and c2 are not both here"; exit 2; }
      mkdir -p "$src/$m"
      cat .gpu/c1/corpus/$m/model.onnx.part1 .gpu/c2/corpus/$m/model.onnx.part2 > "$src/$m/model.onnx"
      if ! python3 -c 'import hashlib, sys; h = hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest()
sys.exit(h != open(sys.argv[2]).read().strip())' "$src/$m/model.onnx" .gpu/c2/corpus/$m/model.onnx.sha256; then
        echo "gpu-device: the joined $m differs from the packed one (pack c1 and c2 from the same corpus)"
        rm -f "$src/$m/model.onnx"
        exit 2
      fi
      cp .gpu/c2/corpus/$m/inputs.npz .gpu/c2/corpus/$m/meta.json "$src/$m/"
    fi
    ;;
  *) echo "gpu-device: unknown part '$part' (a, b or c)"; exit 2 ;;
esac

echo "== bench/gpu.sh on $(ls "$src" | tr '\n' ' ')"
MPOPT="$R/mpopt" CORPUS="$src" OUT="$R/gpu-$part" bash bench/gpu.sh || fail=1
exit "$fail"
