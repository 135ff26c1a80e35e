#!/usr/bin/env python3
"""Everything a model carries survives `mpopt copy`: the copy must be protobuf-equal to the original.

The model built here holds every kind of data mpopt keeps but does not interpret: metadata and doc strings on
the model, graph, nodes and values; value_info; sparse initializers; training info; quantization annotations;
a local function with a reference attribute; an unknown domain; typed tensor storage (float_data, int32_data,
int64_data, string_data); type and dimension denotations; subgraphs reading outer values.

    python3 tests/py/lossless.py --mpopt target/release/mpopt
Prints `lossless: N passed, N failed` and exits 1 on a difference.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build():
    fn = helper.make_function(
        "com.example",
        "Scale",
        ["X"],
        ["Y"],
        [
            helper.make_node("Constant", [], ["k"], value_float=1.0),
            helper.make_node("Mul", ["X", "k"], ["xk"]),
            helper.make_node("LeakyRelu", ["xk"], ["Y"]),
        ],
        opset_imports=[helper.make_opsetid("", 17)],
        attributes=["alpha"],
    )
    ref = helper.make_attribute_ref("alpha", onnx.AttributeProto.FLOAT)
    fn.node[2].attribute.append(ref)
    fn.doc_string = "a function"
    helper.set_metadata_props(fn, {"fn_key": "fn_value"})

    typed = TensorProto()
    typed.name = "typed_f16"
    typed.data_type = TensorProto.FLOAT16
    typed.dims.extend([3])
    typed.int32_data.extend([0x3C00, 0x4000, 0xBC00])  # 1.0, 2.0, -1.0 as f16 bits
    typed.doc_string = "f16 in int32_data"
    f32_typed = helper.make_tensor("typed_f32", TensorProto.FLOAT, [2], [0.5, -0.25])
    i64_typed = helper.make_tensor("typed_i64", TensorProto.INT64, [2], [7, -9])
    strings = helper.make_tensor("labels", TensorProto.STRING, [2], [b"cat", b"\xffraw"])
    sparse = helper.make_sparse_tensor(
        helper.make_tensor("sparse_w", TensorProto.FLOAT, [2], [1.5, -2.0]),
        helper.make_tensor("sparse_idx", TensorProto.INT64, [2], [0, 5]),
        [2, 3],
    )

    then_g = helper.make_graph(
        [helper.make_node("Add", ["x", "typed_f32"], ["t"], name="then_add", doc_string="then")],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])],
    )
    else_g = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e"])], "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])]
    )
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch"])
    x_info.type.denotation = "TENSOR"
    x_info.type.tensor_type.shape.dim[0].denotation = "DATA_BATCH"
    x_info.doc_string = "the input"
    nodes = [
        helper.make_node("Scale", ["x"], ["s"], domain="com.example", name="call", alpha=0.1),
        helper.make_node("ReduceSum", ["s"], ["sum"], name="sum", keepdims=0, doc_string="sums"),
        helper.make_node("Greater", ["sum", "zero"], ["c"], name="cmp"),
        helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then_g, else_branch=else_g),
        helper.make_node("Custom", ["y", ""], ["z", ""], domain="org.unknown", name="custom", blob=b"\x00\x01"),
    ]
    helper.set_metadata_props(nodes[1], {"node_key": "v"})
    g = helper.make_graph(
        nodes,
        "everything",
        [x_info],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        [typed, f32_typed, i64_typed, strings, numpy_helper.from_array(np.array(0.0, np.float32), "zero")],
        doc_string="graph doc",
        value_info=[helper.make_tensor_value_info("s", TensorProto.FLOAT, ["batch"]), helper.make_tensor_value_info("unused_info", TensorProto.INT64, [1])],
        sparse_initializer=[sparse],
    )
    ann = g.quantization_annotation.add()
    ann.tensor_name = "s"
    e = ann.quant_parameter_tensor_names.add()
    e.key, e.value = "SCALE_TENSOR", "zero"
    helper.set_metadata_props(g, {"graph_key": "g"})
    m = helper.make_model(
        g,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1), helper.make_opsetid("org.unknown", 3)],
        functions=[fn],
        producer_name="lossless.py",
        producer_version="1.0",
        doc_string="model doc",
        domain="org.mpopt.test",
        model_version=42,
    )
    m.ir_version = 10
    helper.set_model_props(m, {"author": "mpopt", "license": "Apache-2.0"})
    ti = m.training_info.add()
    ti.algorithm.CopyFrom(helper.make_graph([helper.make_node("Identity", ["zero"], ["zero_out"])], "algo", [], []))
    b = ti.update_binding.add()
    b.key, b.value = "zero", "zero_out"
    return m


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mpopt", required=True)
    a = ap.parse_args()
    m = build()
    failures = []
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "in.onnx"), os.path.join(d, "out.onnx")
        with open(src, "wb") as f:
            f.write(m.SerializeToString())
        r = subprocess.run([a.mpopt, "copy", src, "-o", dst], capture_output=True, text=True)
        if r.returncode != 0:
            failures.append(f"copy failed: {r.stderr.strip()}")
        else:
            a_, b_ = onnx.load(src), onnx.load(dst)
            if a_ != b_:
                import difflib

                diff = difflib.unified_diff(str(a_).splitlines(), str(b_).splitlines(), "original", "copy", lineterm="", n=2)
                failures.append("the copy differs:\n" + "\n".join(list(diff)[:60]))
            if a_.SerializeToString() != b_.SerializeToString():
                failures.append("the copy is protobuf-equal but not byte-identical")
    for f in failures:
        print("FAIL", f)
    print(f"lossless: {1 - min(len(failures), 1)} passed, {min(len(failures), 1)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
