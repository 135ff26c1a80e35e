#!/usr/bin/env bash
# mpopt vs onnxconverter-common and onnxruntime's converter on every corpus model (see bench/convert.py).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -r tests/py/requirements.txt onnxconverter-common==1.16.0
cargo build -q --release -p mpopt-cli --bins
cargo build -q --release -p mpopt-onnx --example gen_bench_model
.venv/bin/python bench/convert.py --mpopt target/release/mpopt "${1:-../shared/corpus}"
