#!/usr/bin/env python3
"""Invalid models must be errors, never panics: mutates ONNX node-suite models and runs mpopt on each.

Each iteration takes one test of the node suite, breaks one to three things in it, and runs `mpopt MODEL -o OUT`
(fp16, and bf16 with `--io-types low`), `mpopt run` on the test's inputs and `mpopt compare` of the model
against its conversion. Mutations:
- attributes: an int set to 0, a negative, or 2^33; a list lengthened, shortened, emptied or given such a value;
  a float set to 0, -1, NaN or 1e38; a string set to '' or a wrong mode; an odd attribute added;
- structure: the op type swapped, an input dropped or added, an output renamed or duplicated, the opset moved,
  an attribute dropped, an input's dim, rank or element type changed, an initializer's dims lengthened.

A panic (exit 101 or "panicked" on stderr) or a death by signal fails the check and keeps the model under
`--keep DIR`. Exit codes 1 and 2 with a message are the expected outcome for a broken model, and 0 is fine
where the mutation left it valid. A command past `--timeout` seconds is reported, and fails the check only
with `--strict-timeouts` (a mutation may legitimately ask for a large computation). Seeded: the same seed
gives the same models.

    .venv/bin/python tests/py/fuzz_check.py --mpopt target/release/mpopt --suite DIR [--iterations 200] [--seed 1]
"""
from __future__ import annotations

import argparse
import glob
import os
import random
import shutil
import subprocess
import sys
import tempfile

import onnx
from onnx import AttributeProto, helper

OPS = ["Add", "Mul", "Conv", "MatMul", "Gemm", "Relu", "Reshape", "Transpose", "Concat", "Slice", "Gather",
       "Cast", "Softmax", "LayerNormalization", "If", "Loop", "Resize", "Pad", "Einsum", "ReduceSum", "Split",
       "Where", "Expand", "Range", "CumSum", "TopK", "Shape", "ConstantOfShape", "Constant", "LSTM",
       "BatchNormalization", "Unsqueeze", "Squeeze", "Attention", "RoiAlign", "Col2Im", "ConvTranspose"]
INTS = [0, -1, -3, 2, 3, 1 << 33]
ODD_ATTRS = ["axis", "axes", "perm", "strides", "pads", "dilations", "kernel_shape", "group", "blocksize",
             "num_outputs", "split", "to", "keepdims", "k", "q_num_heads", "kv_num_heads", "sampling_ratio"]


def walk(g):
    for n in g.node:
        yield n
        for a in n.attribute:
            if a.type == AttributeProto.GRAPH:
                yield from walk(a.g)


def mutate_attribute(rng, a):
    if a.type == AttributeProto.INT:
        a.i = rng.choice(INTS)
    elif a.type == AttributeProto.INTS:
        how = rng.choice(["grow", "shrink", "value", "empty"])
        if how == "grow" or (how == "shrink" and not a.ints):
            a.ints.append(rng.choice(INTS))
        elif how == "shrink":
            a.ints.pop()
        elif how == "value" and a.ints:
            a.ints[rng.randrange(len(a.ints))] = rng.choice(INTS)
        else:
            del a.ints[:]
    elif a.type == AttributeProto.FLOAT:
        a.f = rng.choice([0.0, -1.0, float("nan"), 1e38])
    elif a.type == AttributeProto.FLOATS:
        if a.floats:
            a.floats[rng.randrange(len(a.floats))] = rng.choice([0.0, -1.0, float("nan")])
        else:
            a.floats.append(0.0)
    elif a.type == AttributeProto.STRING:
        a.s = rng.choice([b"", b"bogus", b"SAME_UPPER", b"VALID"])


def mutate_structure(rng, m):
    g = m.graph
    nodes = list(g.node)
    n = rng.choice(nodes) if nodes else None
    kind = rng.choice(["op", "dropin", "addin", "dupout", "outname", "dropattr", "opset", "dim", "rank",
                       "etype", "initdims"])
    if n is None and kind in ("op", "dropin", "addin", "dupout", "outname", "dropattr"):
        kind = "opset"
    if kind == "op":
        n.op_type = rng.choice(OPS)
    elif kind == "dropin" and n.input:
        del n.input[rng.randrange(len(n.input))]
    elif kind == "addin":
        n.input.append(rng.choice(["", "nonexistent"] + [i.name for i in g.input]))
    elif kind == "dupout" and n.output and len(nodes) > 1:
        rng.choice(nodes).output.append(n.output[0])
    elif kind == "outname" and n.output:
        n.output[0] = rng.choice(["", n.input[0] if n.input else "q", "zz"])
    elif kind == "dropattr" and n.attribute:
        del n.attribute[rng.randrange(len(n.attribute))]
    elif kind == "opset":
        m.opset_import[0].version = rng.choice([1, 6, 9, 13, 18, 21, 23, 30])
    elif kind in ("dim", "rank", "etype"):
        vs = list(g.input) + list(g.output)
        if vs:
            tt = rng.choice(vs).type.tensor_type
            if kind == "dim" and tt.shape.dim:
                rng.choice(tt.shape.dim).dim_value = rng.choice([0, 1, 3, 100000])
            elif kind == "rank":
                tt.shape.dim.add().dim_value = 2
            else:
                tt.elem_type = rng.choice([1, 2, 3, 6, 7, 9, 10, 11, 16, 8, 0, 99])
    elif kind == "initdims" and g.initializer:
        rng.choice(g.initializer).dims.append(rng.choice([0, 2, 7]))


def mutate(rng, m):
    """Breaks one to three things: attribute values half of the time, the structure the other half."""
    for _ in range(rng.randint(1, 3)):
        nodes = [n for n in walk(m.graph) if n.attribute]
        if nodes and rng.random() < 0.5:
            mutate_attribute(rng, rng.choice(rng.choice(nodes).attribute))
            if rng.random() < 0.3:
                n = rng.choice(nodes)
                name = rng.choice(ODD_ATTRS)
                if not any(a.name == name for a in n.attribute):
                    n.attribute.append(helper.make_attribute(name, rng.choice([0, -2, [0], [1, 2, 3, 4, 5], [-9]])))
        else:
            mutate_structure(rng, m)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mpopt", required=True)
    ap.add_argument("--suite", required=True, help="a node-suite folder (gen_node_suite.py's output)")
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--strict-timeouts", action="store_true")
    ap.add_argument("--keep", help="folder for the models that made mpopt panic")
    a = ap.parse_args()
    tests = sorted(glob.glob(os.path.join(a.suite, "*", "model.onnx")))
    if not tests:
        print(f"no node-suite tests under {a.suite}", file=sys.stderr)
        return 2
    rng = random.Random(a.seed)
    panics, timeouts, outcomes = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        model, out, out2 = (os.path.join(tmp, f) for f in ("m.onnx", "o.onnx", "o2.onnx"))
        for it in range(a.iterations):
            path = rng.choice(tests)
            m = onnx.load(path)
            mutate(rng, m)
            onnx.save(m, model)
            inputs = os.path.join(os.path.dirname(path), "test_data_set_0")
            name = os.path.basename(os.path.dirname(path))
            for cmd in ([a.mpopt, model, "-o", out],
                        [a.mpopt, model, "-o", out2, "--to", "bf16", "--io-types", "low"],
                        [a.mpopt, "run", model, "--inputs", inputs, "-o", os.path.join(tmp, "r.npz")],
                        [a.mpopt, "compare", model, out, "--inputs", inputs]):
                what = f"{it} {name}: mpopt {' '.join(cmd[1:3])}"
                try:
                    r = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
                except subprocess.TimeoutExpired:
                    timeouts.append(what)
                    print(f"TIMEOUT {what}", flush=True)
                    continue
                outcomes[r.returncode] = outcomes.get(r.returncode, 0) + 1
                if r.returncode == 101 or r.returncode < 0 or "panicked" in r.stderr:
                    line = next((x for x in r.stderr.splitlines() if "panicked" in x), f"exit {r.returncode}")
                    panics.append(f"{what}: {line}")
                    print(f"PANIC {what}: {line}", flush=True)
                    if a.keep:
                        os.makedirs(a.keep, exist_ok=True)
                        shutil.copy(model, os.path.join(a.keep, f"{it}_{name}.onnx"))
                    break
    print(f"{a.iterations} mutated models (seed {a.seed}): exit codes {dict(sorted(outcomes.items()))}, "
          f"{len(panics)} panic(s), {len(timeouts)} timeout(s)")
    return 1 if panics or (a.strict_timeouts and timeouts) else 0


if __name__ == "__main__":
    sys.exit(main())
