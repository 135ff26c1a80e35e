#!/usr/bin/env python3
"""Writes the small ONNX models under testdata/ (deterministic; run from anywhere with onnx==1.23.2 and numpy).

    python3 testdata/make_models.py

models/      valid models used by snapshot tests, the README's example and the round-trip tests (and
             out_of_order.onnx, valid but for its node order, which mpopt repairs when it loads)
bad/         deliberately broken models for the bad-input tests (each one breaks exactly one rule)
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
OPSET = [helper.make_opsetid("", 17)]


def save(model, *path, check=True):
    p = os.path.join(HERE, *path)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    if check:
        onnx.checker.check_model(model, full_check=True)
    with open(p, "wb") as f:
        f.write(model.SerializeToString())


def tiny_mlp():
    """x[N,16] -> MatMul -> Add -> Relu -> MatMul -> Softmax: the README's example."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(rng.standard_normal((32, 4)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="fc1_bias"),
        helper.make_node("Relu", ["hb"], ["r"], name="act"),
        helper.make_node("MatMul", ["r", "w2"], ["logits"], name="fc2"),
        helper.make_node("Softmax", ["logits"], ["y"], name="softmax", axis=-1),
    ]
    g = helper.make_graph(
        nodes,
        "tiny_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [w1, b1, w2],
        value_info=[helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", 32])],
    )
    m = helper.make_model(g, opset_imports=OPSET, producer_name="testdata/make_models.py")
    m.ir_version = 8
    helper.set_model_props(m, {"purpose": "mpopt testdata"})
    return m


def if_outer():
    """If whose branches read outer values (x, scale) and one branch returns an outer value as is."""
    then_g = helper.make_graph(
        [helper.make_node("Mul", ["x", "scale"], ["t_out"], name="then_mul")],
        "then_branch",
        [],
        [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [2, 3])],
    )
    else_g = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["e_out"], name="else_neg")],
        "else_branch",
        [],
        [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [2, 3])],
    )
    scale = numpy_helper.from_array(np.array([0.5, 2.0, -1.0], dtype=np.float32), "scale")
    g = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["x"], ["s"], name="sum", keepdims=0),
            helper.make_node("Greater", ["s", "zero"], ["cond"], name="positive"),
            helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g, else_branch=else_g),
        ],
        "if_outer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [scale, numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero")],
    )
    m = helper.make_model(g, opset_imports=OPSET, producer_name="testdata/make_models.py")
    m.ir_version = 8
    return m


def loop_carried():
    """Loop running `trip` times, carrying an accumulator and reading the outer `step`."""
    body = helper.make_graph(
        [
            helper.make_node("Add", ["acc_in", "step"], ["acc_out"], name="accumulate"),
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going"),
            helper.make_node("Cast", ["i"], ["i_f"], name="iter_as_float", to=TensorProto.FLOAT),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [3]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [3]),
            helper.make_tensor_value_info("i_f", TensorProto.FLOAT, []),
        ],
    )
    g = helper.make_graph(
        [helper.make_node("Loop", ["trip", "", "init"], ["final", "iters"], name="loop", body=body)],
        "loop_carried",
        [
            helper.make_tensor_value_info("trip", TensorProto.INT64, []),
            helper.make_tensor_value_info("init", TensorProto.FLOAT, [3]),
        ],
        [
            helper.make_tensor_value_info("final", TensorProto.FLOAT, [3]),
            helper.make_tensor_value_info("iters", TensorProto.FLOAT, [None]),
        ],
        [numpy_helper.from_array(np.array([1.0, 0.5, 0.25], dtype=np.float32), "step")],
    )
    m = helper.make_model(g, opset_imports=OPSET, producer_name="testdata/make_models.py")
    m.ir_version = 8
    return m


def with_function():
    """A model-local function (a scaled GELU-like block) called twice, with an attribute default."""
    fn = helper.make_function(
        "local",
        "ScaledTanh",
        ["X"],
        ["Y"],
        [
            helper.make_node("Constant", [], ["a"], value_float=1.0),
            helper.make_node("Mul", ["X", "a"], ["xa"]),
            helper.make_node("Tanh", ["xa"], ["Y"]),
        ],
        opset_imports=[helper.make_opsetid("", 17)],
        attributes=[],
    )
    g = helper.make_graph(
        [
            helper.make_node("ScaledTanh", ["x"], ["t"], domain="local", name="call1"),
            helper.make_node("ScaledTanh", ["t"], ["y"], domain="local", name="call2"),
        ],
        "with_function",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    m = helper.make_model(
        g, opset_imports=OPSET + [helper.make_opsetid("local", 1)], functions=[fn], producer_name="testdata/make_models.py"
    )
    m.ir_version = 8
    return m


def external(folder, location, truncate=None):
    """tiny_mlp with its weights in an external file; `truncate` cuts the data file short."""
    m = tiny_mlp()
    data = bytearray()
    for t in m.graph.initializer:
        raw = numpy_helper.to_array(t).tobytes()
        off = len(data)
        data += raw
        t.ClearField("raw_data")
        t.ClearField("float_data")
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", location), ("offset", str(off)), ("length", str(len(raw)))):
            e = t.external_data.add()
            e.key, e.value = k, v
    d = os.path.join(HERE, folder)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "model.onnx"), "wb") as f:
        f.write(m.SerializeToString())
    if truncate is not None:
        data = data[:truncate]
    if location and not os.path.isabs(location) and ".." not in location:
        with open(os.path.join(d, location), "wb") as f:
            f.write(bytes(data))


def out_of_order():
    """tiny_mlp with its nodes listed last to first, as onnxruntime's float16 converter lists casts after their
    readers: onnx.checker refuses the order, onnxruntime sorts it, and mpopt sorts it when it loads."""
    m = tiny_mlp()
    nodes = list(m.graph.node)[::-1]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


def bad_models():
    m = tiny_mlp()
    # A cycle: fc1 reads the output of act, which depends on fc1.
    c = onnx.ModelProto()
    c.CopyFrom(m)
    c.graph.node[0].input[0] = "r"
    save(c, "bad", "cycle.onnx", check=False)
    # A dangling reference: fc2 reads a value nothing defines.
    d = onnx.ModelProto()
    d.CopyFrom(m)
    d.graph.node[3].input[0] = "missing_value"
    save(d, "bad", "dangling.onnx", check=False)
    # An unknown dtype on an initializer.
    u = onnx.ModelProto()
    u.CopyFrom(m)
    u.graph.initializer[1].data_type = 99
    save(u, "bad", "unknown_dtype.onnx", check=False)
    # A value produced twice.
    t = onnx.ModelProto()
    t.CopyFrom(m)
    t.graph.node[2].output[0] = "h"
    save(t, "bad", "defined_twice.onnx", check=False)
    external("bad/external_missing", "weights.bin")
    os.remove(os.path.join(HERE, "bad/external_missing/weights.bin"))
    external("bad/external_short", "weights.bin", truncate=100)
    external("bad/external_escape", "../../models/tiny_mlp.onnx")


def main():
    for sub in ("models", "bad"):
        shutil.rmtree(os.path.join(HERE, sub), ignore_errors=True)
    save(tiny_mlp(), "models", "tiny_mlp.onnx")
    save(if_outer(), "models", "if_outer.onnx")
    save(loop_carried(), "models", "loop_carried.onnx")
    save(with_function(), "models", "with_function.onnx")
    save(out_of_order(), "models", "out_of_order.onnx", check=False)
    external("models/external", "weights.bin")
    onnx.checker.check_model(os.path.join(HERE, "models/external/model.onnx"), full_check=True)
    bad_models()
    print("wrote testdata/models and testdata/bad")


if __name__ == "__main__":
    main()
