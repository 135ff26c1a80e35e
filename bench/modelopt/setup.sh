#!/usr/bin/env bash
# Builds the venv for bench/modelopt/compare.py: NVIDIA ModelOpt 0.47 (ONNX AutoCast) without torch (see
# torch_standin.py), with the same onnx/onnxruntime pins as the rest of the project.
set -euo pipefail
VENV=${1:-target/modelopt-venv}
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q nvidia-modelopt==0.47.0 --no-deps
"$VENV/bin/pip" install -q onnx==1.23.2 onnxruntime==1.32.0 onnx-graphsurgeon==0.6.1 onnxconverter-common==1.16.0 \
  ml_dtypes onnxscript onnx_ir onnxslim polygraphy protobuf numpy pyyaml pydantic packaging tqdm rich regex scipy \
  omegaconf pulp safetensors nvidia-ml-py flatbuffers lief cppimport "setuptools>=80"
SP=$("$VENV/bin/python" -c "import site; print(site.getsitepackages()[0])")
mkdir -p "$SP/torch"
cp "$(dirname "$0")/torch_standin.py" "$SP/torch/__init__.py"
"$VENV/bin/python" -c "import modelopt.onnx.autocast" && echo "ModelOpt AutoCast ready in $VENV"
