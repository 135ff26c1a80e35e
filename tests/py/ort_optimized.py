#!/usr/bin/env python3
"""Writes onnxruntime-optimized copies of the corpus models, to convert them as users do.

Many deployed ONNX models are not what an exporter wrote but what onnxruntime's graph optimizer saved: fused
`com.microsoft` ops (FusedMatMul, BiasGelu, SkipLayerNormalization, FusedConv, ...) in place of the standard
ones. For every corpus folder (model.onnx with inputs.npz), this saves the model as onnxruntime 1.32 optimizes
it at `ORT_ENABLE_EXTENDED` on the CPU provider (the level that fuses without changing the data layout) into
OUT/NAME/model.onnx, beside links to the folder's inputs.npz and meta.json, so that `convert_check.py OUT`
checks their conversion with the same task metrics.

    .venv/bin/python tests/py/ort_optimized.py ../shared/corpus OUT
Prints each model's com.microsoft ops.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
from collections import Counter

import onnx
import onnxruntime as ort


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus")
    ap.add_argument("out")
    a = ap.parse_args()
    folders = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(a.corpus, "*", "model.onnx")))
    if not folders:
        print(f"no corpus models under {a.corpus}", file=sys.stderr)
        return 2
    fused = 0
    for folder in folders:
        name = os.path.basename(folder)
        if not os.path.exists(os.path.join(folder, "inputs.npz")):
            continue
        dst = os.path.join(a.out, name)
        os.makedirs(dst, exist_ok=True)
        for f in ("inputs.npz", "meta.json"):
            src, link = os.path.abspath(os.path.join(folder, f)), os.path.join(dst, f)
            if os.path.exists(src) and not os.path.lexists(link):
                os.symlink(src, link)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = os.path.join(dst, "model.onnx")
        ort.InferenceSession(os.path.join(folder, "model.onnx"), so, providers=["CPUExecutionProvider"])
        m = onnx.load(so.optimized_model_filepath, load_external_data=False)
        ms = Counter(n.op_type for n in m.graph.node if n.domain == "com.microsoft")
        fused += sum(ms.values())
        print(f"{name:30} {dict(sorted(ms.items())) or 'no com.microsoft ops'}")
    print(f"ort-optimized: {len(folders)} models, {fused} com.microsoft nodes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
