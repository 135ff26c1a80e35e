#!/usr/bin/env python3
"""Writes copies of the ONNX node-suite models in which every op reads low-precision values.

In the node suite each op reads the graph's float32 inputs, which stay float32, so the conversion never
shows what happens when a *low* node feeds it: which inputs read the f16 value as it is, which get a Cast
back, whether the op's schema and onnx's type inference still agree. In real models most ops are fed that
way. This puts an `Identity` (named `lowfeed_<input>`) between each float32 graph input and its readers;
converted with `--force-low Identity`, the Identity runs f16 and every reader of the input reads a low
value. The values are the same as the original's, so `convert_check.py` holds the conversion to the same
checks (onnx.checker, onnxruntime, outputs). It found: Attention's V cast back to f32 beside an f16 Q
(onnxruntime refused it), RMSNormalization and sequence ops lowered against onnx's type inference, and
scatters with a reduction that onnxruntime has no f16 kernel for.

    .venv/bin/python tests/py/low_fed.py SUITE_DIR OUT
    .venv/bin/python tests/py/convert_check.py --mpopt BIN --arg=--force-low --arg=Identity OUT
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys

import onnx
from onnx import TensorProto, helper


def low_fed(model: onnx.ModelProto) -> bool:
    """Reroutes every float32 graph input through an Identity; False when there is none."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    floats = [i.name for i in g.input
              if i.type.HasField("tensor_type") and i.type.tensor_type.elem_type == TensorProto.FLOAT
              and i.name not in inits]
    if not floats:
        return False
    taken = {o for n in g.node for o in n.output} | {i.name for i in g.input}
    renamed = {}
    for x in floats:
        name = f"{x}__lowfed"
        while name in taken:
            name += "_"
        renamed[x] = name
    for node in g.node:
        for k, x in enumerate(node.input):
            if x in renamed:
                node.input[k] = renamed[x]
    # a graph output that is an input stays the input; subgraphs capturing it by name read it as before
    nodes = [helper.make_node("Identity", [x], [renamed[x]], name=f"lowfeed_{x}") for x in floats]
    nodes += list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suite", help="a folder of node-suite tests (model.onnx and test_data_set_*), or of corpus-style "
                                  "model folders (model.onnx and inputs.npz)")
    ap.add_argument("out")
    a = ap.parse_args()
    made = 0
    for path in sorted(glob.glob(os.path.join(a.suite, "*", "model.onnx"))):
        src = os.path.dirname(path)
        model = onnx.load(path)
        if not low_fed(model):
            continue
        dst = os.path.join(a.out, os.path.basename(src))
        os.makedirs(dst, exist_ok=True)
        onnx.save(model, os.path.join(dst, "model.onnx"))
        for data in glob.glob(os.path.join(src, "test_data_set_*")):
            shutil.copytree(data, os.path.join(dst, os.path.basename(data)), dirs_exist_ok=True)
        # corpus-style folders: their inputs (the metric floors are for the original's numerics: not copied)
        if os.path.exists(os.path.join(src, "inputs.npz")):
            shutil.copy(os.path.join(src, "inputs.npz"), dst)
        made += 1
    print(f"low-fed copies: {made}")
    if made == 0:
        sys.exit("no model with a float32 input")


if __name__ == "__main__":
    main()
