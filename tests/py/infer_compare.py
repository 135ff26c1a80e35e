#!/usr/bin/env python3
"""Compares `mpopt infer` with onnx.shape_inference.infer_shapes(strict_mode=True) on the corpus.

For every value (all graphs) that onnx types, mpopt must give the same element type, the same rank where onnx
knows it, and the same size for every dim onnx knows as a number. Prints, per model, how many values each tool
types and shapes, and fails on any disagreement.

    python3 tests/py/infer_compare.py --mpopt target/release/mpopt ../shared/corpus
Prints `infer-compare: N passed, N failed`.
"""
from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tempfile

import onnx
from onnx import shape_inference

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import all_graphs  # noqa: E402


def collect(g):
    """name -> (element type, dims or None) for every typed value of every graph."""
    out = {}
    for sub in all_graphs(g):
        for vi in list(sub.input) + list(sub.output) + list(sub.value_info):
            t = vi.type
            if t.HasField("tensor_type") and t.tensor_type.elem_type:
                shape = None
                if t.tensor_type.HasField("shape"):
                    shape = [d.dim_value if d.HasField("dim_value") else None for d in t.tensor_type.shape.dim]
                out[vi.name] = (t.tensor_type.elem_type, shape)
            elif t.WhichOneof("value") is not None and t.WhichOneof("value") != "tensor_type":
                out[vi.name] = (t.WhichOneof("value"), None)
    return out


def node_outputs(g):
    """Every node output name of every graph."""
    return {o for sub in all_graphs(g) for n in sub.node for o in n.output if o}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mpopt", required=True)
    ap.add_argument("corpus")
    a = ap.parse_args()
    models = sorted(glob.glob(os.path.join(a.corpus, "*", "model.onnx")))
    failed = 0
    print(f"{'model':32} {'values':>7} | {'onnx typed':>10} {'shaped':>7} | {'mpopt typed':>11} {'shaped':>7} | disagree")
    with tempfile.TemporaryDirectory() as tmp:
        for path in models:
            name = os.path.basename(os.path.dirname(path))
            out = os.path.join(tmp, name + ".onnx")
            r = subprocess.run([a.mpopt, "infer", path, "-o", out], capture_output=True, text=True)
            if r.returncode != 0:
                print(f"FAIL {name}: mpopt infer: {r.stderr.strip()}")
                failed += 1
                continue
            m = onnx.load(path)
            outs = node_outputs(m.graph)
            ref = collect(shape_inference.infer_shapes(m, strict_mode=True).graph)
            got = collect(onnx.load(out).graph)
            onnx.checker.check_model(out, full_check=True)
            disagree = []
            for k, (et, shape) in ref.items():
                if k not in outs:
                    continue
                if k not in got:
                    disagree.append(f"{k}: onnx {et} {shape}, mpopt none")
                    continue
                ge, gs = got[k]
                if ge != et:
                    disagree.append(f"{k}: dtype onnx {et}, mpopt {ge}")
                elif shape is not None and gs is not None and len(shape) != len(gs):
                    disagree.append(f"{k}: rank onnx {len(shape)}, mpopt {len(gs)}")
                elif shape is not None and gs is not None and any(x is not None and y is not None and x != y for x, y in zip(shape, gs)):
                    disagree.append(f"{k}: dims onnx {shape}, mpopt {gs}")
                elif shape is not None and gs is None:
                    disagree.append(f"{k}: onnx has rank {len(shape)}, mpopt none")
            o_typed = sum(1 for k in outs if k in ref)
            o_shaped = sum(1 for k in outs if k in ref and ref[k][1] is not None)
            m_typed = sum(1 for k in outs if k in got)
            m_shaped = sum(1 for k in outs if k in got and got[k][1] is not None)
            print(f"{name:32} {len(outs):7} | {o_typed:10} {o_shaped:7} | {m_typed:11} {m_shaped:7} | {len(disagree)}")
            if disagree or m_typed < o_typed or m_shaped < o_shaped:
                failed += 1
                for d in disagree[:10]:
                    print("   ", d)
    print(f"infer-compare: {len(models) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
