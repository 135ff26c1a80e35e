#!/usr/bin/env python3
"""Writes quantized copies of corpus models, to convert them as users do.

Users also run mixed-precision conversion on models that onnxruntime's quantization tools wrote:
  * static QDQ (`quantize_static`, QuantFormat.QDQ, calibrated on the model's inputs.npz): every quantized op
    sits between DequantizeLinear and QuantizeLinear, which runtimes fuse into int8 kernels. mpopt must leave
    those groups alone (rule `qdq`); the copy gets the model's meta.json, so `convert_check.py` holds the
    converted model to the task metric against the quantized one.
  * dynamic (`quantize_dynamic`, int8 weights: DynamicQuantizeLinear + MatMulInteger): the float parts around
    the integer products are lowered. DynamicQuantizeLinear recomputes its scale from its input at run time,
    so an f16-rounded input moves values across quantization steps (paraphrase: cosine 0.998 against the
    quantized model, whose own cosine against fp32 is 0.97). These copies get no meta.json: validity only.

    .venv/bin/python tests/py/quantized.py ../shared/corpus OUT
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

STATIC = ["ppocr_mobile_v2_cls", "open_nsfw_resnet50"]
DYNAMIC = ["paraphrase_minilm_l3_v2", "vit_tiny_patch16_224_random"]


class Feeds(CalibrationDataReader):
    def __init__(self, feeds):
        self.left = [feeds]

    def get_next(self):
        return self.left.pop() if self.left else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus")
    ap.add_argument("out")
    a = ap.parse_args()
    made = 0
    for name, how in [(n, "qdq") for n in STATIC] + [(n, "dynamic") for n in DYNAMIC]:
        src = os.path.join(a.corpus, name)
        if not os.path.exists(os.path.join(src, "model.onnx")):
            continue
        dst = os.path.join(a.out, f"{name}_{how}")
        os.makedirs(dst, exist_ok=True)
        shutil.copy(os.path.join(src, "inputs.npz"), dst)
        model = os.path.join(src, "model.onnx")
        out = os.path.join(dst, "model.onnx")
        if how == "qdq":
            inputs = dict(np.load(os.path.join(src, "inputs.npz")))
            names = [i.name for i in onnx.load(model, load_external_data=False).graph.input]
            quantize_static(model, out, Feeds({k: v for k, v in inputs.items() if k in names}),
                            quant_format=QuantFormat.QDQ)
            shutil.copy(os.path.join(src, "meta.json"), dst)
        else:
            quantize_dynamic(model, out, weight_type=QuantType.QInt8)
        made += 1
        print(f"{name:30} {how}")
    print(f"quantized: {made} models")
    return 0 if made else 2


if __name__ == "__main__":
    sys.exit(main())
