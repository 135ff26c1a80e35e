#!/usr/bin/env python3
"""Writes the corpus models as the peer converters leave them, to convert those again as users do.

Users bring models that another tool already converted to float16, often to fix what that tool got wrong:
  * onnxruntime's `transformers.float16.convert_float_to_float16` (keep_io_types): its casts of the graph
    inputs come after their readers in the node list, so onnx.checker refuses 9 of the 10; onnxruntime
    sorts them and runs them. mpopt puts such a graph in order when it loads it (with a note);
  * onnxconverter-common's `convert_float_to_float16` (keep_io_types), where onnxruntime can load the result
    (it cannot on 4 of the 10: listed and skipped).
The copies get the model's inputs.npz but no meta.json: both tools clamp or flush some models' values
(ppocrv4_det's text map), so they are checked for validity (onnx.checker, onnxruntime, outputs kept), not
held to the task metric floors.

    .venv/bin/python tests/py/peer_fp16.py ../shared/corpus OUT
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
import warnings

import onnx
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import report_copies  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus")
    ap.add_argument("out")
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    from onnxconverter_common import float16 as occ
    from onnxruntime.transformers.float16 import convert_float_to_float16 as ort_fp16

    tools = [("ortfp16", ort_fp16), ("occfp16", occ.convert_float_to_float16)]
    made, skipped = 0, []
    for path in sorted(glob.glob(os.path.join(a.corpus, "*", "model.onnx"))):
        src = os.path.dirname(path)
        name = os.path.basename(src)
        for tag, convert in tools:
            dst = os.path.join(a.out, f"{name}_{tag}")
            os.makedirs(dst, exist_ok=True)
            out = os.path.join(dst, "model.onnx")
            try:
                onnx.save(convert(onnx.load(path), keep_io_types=True), out)
                # a copy onnxruntime cannot load is no model a user has
                ort.InferenceSession(out, providers=["CPUExecutionProvider"])
            except Exception as e:  # noqa: BLE001 - the peer's own failure: listed, not ours to test
                skipped.append(f"{name}_{tag}: {str(e).splitlines()[0][:120]}")
                shutil.rmtree(dst)
                continue
            shutil.copy(os.path.join(src, "inputs.npz"), dst)
            made += 1
    report_copies("peer float16 copies", made, skipped, "that onnxruntime cannot load")


if __name__ == "__main__":
    main()
