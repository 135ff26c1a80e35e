#!/usr/bin/env bash
# Packs what bench/gpu.sh needs on the lent GPU machine into .gpu/ (git-ignored), in parts that each fit one
# call of the device tool. That machine has no Rust toolchain, does not get ../shared, and takes at most
# 64 MiB per call (the working tree, about 3 MB, included); files from an earlier call stay there while it
# is warm. So the binaries travel built and compressed, and the corpus in parts:
#
#   a   mpopt, the mpopt-cuda and exec_suite test binaries (release, debug info stripped, xz: ~8 MB), the
#       ONNX node suite (tar.xz, 2.5 MB), and magika, ppocr_mobile_v2_cls, ppocrv4_det, ppocrv4_rec, both
#       silero models and vit_tiny (~57 MB in all)
#   b   open_nsfw_resnet50 and ddddocr_det_yolox (45 MB)
#   c1  paraphrase_minilm_l3_v2's model, first 40 MB      (the file alone is over the limit: it travels in
#   c2  the rest of it, and its inputs                      two pieces and is joined there)
#
#   bench/gpu-pack.sh            # packs every part (needs ../shared/corpus and, for the node suite, the venv)
#   bench/gpu-pack.sh a b        # only these
#
# Then, one device call per part, with the machine kept warm between them (docs/cuda.md, "On a GPU"):
#   carry [".gpu/a"]   command: bash bench/gpu-device.sh a
#   carry [".gpu/b"]   command: bash bench/gpu-device.sh b
#   carry [".gpu/c1"]  command: true
#   carry [".gpu/c2"]  command: bash bench/gpu-device.sh c
set -euo pipefail
cd "$(dirname "$0")/.."
CORPUS=${CORPUS:-../shared/corpus}
PY=${PY:-.venv/bin/python}
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(a b c1 c2)
LIMIT=$((64 * 1024 * 1024))
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)

models_of() {
  case "$1" in
    a) echo magika_standard_v3_3 ppocr_mobile_v2_cls ppocrv4_det ppocrv4_rec silero_vad_16k_sequence_lstm \
         silero_vad_v6 vit_tiny_patch16_224_random ;;
    b) echo open_nsfw_resnet50 ddddocr_det_yolox ;;
    *) ;;
  esac
}

# a test binary of the release profile: the path cargo reports for it
test_binary() {
  cargo test -q --release "$@" --no-run --message-format=json 2> /dev/null | "$PY" -c '
import json, sys
for line in sys.stdin:
    try:
        j = json.loads(line)
    except ValueError:
        continue
    if j.get("reason") == "compiler-artifact" and j.get("executable") and j["profile"].get("test"):
        print(j["executable"])' | tail -1
}

pack_binary() { # SRC NAME DIR
  objcopy --strip-debug "$1" "$3/$2"
  xz -T0 -6 -f "$3/$2"
}

for part in "${parts[@]}"; do
  dir=.gpu/$part
  rm -rf "$dir"
  mkdir -p "$dir/corpus"
  case "$part" in
    a)
      cargo build -q --release -p mpopt-cli
      # what the binaries were built from, printed there
      echo "$(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo '+uncommitted changes')" > "$dir/REVISION"
      pack_binary target/release/mpopt mpopt "$dir"
      pack_binary "$(test_binary -p mpopt-cuda --lib)" mpopt_cuda_tests "$dir"
      pack_binary "$(test_binary -p mpopt-e2e --test exec_suite)" exec_suite "$dir"
      suite=$(mktemp -d)
      "$PY" ../shared/tools/gen_node_suite.py -o "$suite/nodesuite" > "$suite/gen.log" 2>&1 || { cat "$suite/gen.log"; exit 1; }
      tar -C "$suite" -cf - nodesuite | xz -T0 -6 > "$dir/nodesuite.tar.xz"
      rm -rf "$suite"
      ;;
    c1 | c2)
      m=paraphrase_minilm_l3_v2
      mkdir -p "$dir/corpus/$m"
      if [ "$part" = c1 ]; then
        head -c $((40 * 1024 * 1024)) "$CORPUS/$m/model.onnx" > "$dir/corpus/$m/model.onnx.part1"
      else
        tail -c +$((40 * 1024 * 1024 + 1)) "$CORPUS/$m/model.onnx" > "$dir/corpus/$m/model.onnx.part2"
        # the joined file is checked against this there
        sha256sum "$CORPUS/$m/model.onnx" | cut -d' ' -f1 > "$dir/corpus/$m/model.onnx.sha256"
        cp "$CORPUS/$m/inputs.npz" "$CORPUS/$m/meta.json" "$dir/corpus/$m/"
      fi
      ;;
    b) ;;
    *) echo "unknown part '$part' (a, b, c1 or c2)" >&2; exit 2 ;;
  esac
  for m in $(models_of "$part"); do
    mkdir -p "$dir/corpus/$m"
    cp "$CORPUS/$m/model.onnx" "$CORPUS/$m/inputs.npz" "$CORPUS/$m/meta.json" "$dir/corpus/$m/"
  done
  size=$(du -sb "$dir" | cut -f1)
  echo "$dir: $((size / 1024 / 1024)) MiB (+ the working tree's $((tree / 1024 / 1024)) MiB; a call takes 64 MiB)"
  if [ $((size + tree)) -gt "$LIMIT" ]; then
    echo "$dir is too big for one device call" >&2
    exit 1
  fi
done
