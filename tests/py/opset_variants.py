#!/usr/bin/env python3
"""Writes copies of the corpus models at other opsets, to convert them as users do.

Users often upgrade a model's opset (`onnx.version_converter`) before converting it, or convert one exported
at another opset. The op versions change (ReduceMean's axes become an input at 18, Split's at 13, Resize,
Pad, the normalizations, ...), and each version is a different schema for mpopt's rules. This writes every
corpus model at opsets 13, 17 and 21 (where the converter can; it has no adapter for some ops in some
directions, which is listed and skipped), each checked by onnx.checker (full) and loaded by onnxruntime,
with the model's inputs.npz and meta.json, so that `convert_check.py` holds the conversion to the same task
metric floors as the original:

    .venv/bin/python tests/py/opset_variants.py ../shared/corpus OUT
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys

import onnx
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import report_copies  # noqa: E402
from onnx import version_converter

TARGETS = (13, 17, 21)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus")
    ap.add_argument("out")
    a = ap.parse_args()
    made, skipped = 0, []
    for path in sorted(glob.glob(os.path.join(a.corpus, "*", "model.onnx"))):
        src = os.path.dirname(path)
        name = os.path.basename(src)
        model = onnx.load(path)
        current = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        for target in TARGETS:
            if target == current:
                continue
            tag = f"{name}_opset{target}"
            try:
                converted = version_converter.convert_version(model, target)
                onnx.checker.check_model(converted, full_check=True)
            except Exception as e:  # noqa: BLE001 - the converter's own limits: listed, not ours to fix
                skipped.append(f"{tag}: {str(e).splitlines()[0][:120]}")
                continue
            dst = os.path.join(a.out, tag)
            os.makedirs(dst, exist_ok=True)
            out = os.path.join(dst, "model.onnx")
            onnx.save(converted, out)
            # the copy must run where the original does, or it is no test of ours
            ort.InferenceSession(out, providers=["CPUExecutionProvider"])
            for f in ("inputs.npz", "meta.json"):
                if os.path.exists(os.path.join(src, f)):
                    shutil.copy(os.path.join(src, f), dst)
            made += 1
            print(f"{tag}: from opset {current}")
    report_copies("opset variants", made, skipped, "the converter cannot make")


if __name__ == "__main__":
    main()
