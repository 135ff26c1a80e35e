#!/usr/bin/env bash
# fp32 inference: mpopt's CPU executor against onnxruntime on every corpus model (see bench/exec.py).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -r tests/py/requirements.txt
cargo build -q --release -p mpopt-cli
.venv/bin/python bench/exec.py --mpopt target/release/mpopt --threads "${THREADS:-2}" "${1:-../shared/corpus}"
