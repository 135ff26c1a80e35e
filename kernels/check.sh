#!/usr/bin/env bash
# Compiles every kernel module (prelude + file, exactly what NVRTC gets) to PTX with clang, on a machine with
# no CUDA toolkit: syntax, types and the inline PTX asm are checked; nothing runs. Needs clang
# (Debian: apt-get install clang). Usage: kernels/check.sh [ARCH]   (default sm_80)
set -euo pipefail
cd "$(dirname "$0")"
arch=${1:-sm_80}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for f in cu/*.cu; do
  name=$(basename "$f" .cu)
  cat cu/prelude.cuh "$f" > "$out/$name.cu"
  clang -x cuda --cuda-device-only -nocudainc -nocudalib --cuda-gpu-arch="$arch" -std=c++17 \
    -Wall -Werror -include check/nvrtc_shim.h -S -o "$out/$name.ptx" "$out/$name.cu"
  n=$(grep -c '^.visible .entry' "$out/$name.ptx" || true)
  echo "kernels/$f: PTX for $arch, $n entry points"
done
