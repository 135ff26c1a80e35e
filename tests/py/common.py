"""Helpers shared by the Python reference checks: finding models, reading their inputs, running the
reference checkers (onnx.checker, onnxruntime) and comparing outputs."""
from __future__ import annotations

import argparse
import glob
import os
import sys

import numpy as np
import onnx
from onnx import numpy_helper

os.environ.setdefault("OMP_NUM_THREADS", "1")
import onnxruntime as ort  # noqa: E402

ort.set_default_logger_severity(4)


def find_models(roots):
    out = []
    for root in roots:
        for path in sorted(glob.glob(os.path.join(root, "**", "model.onnx"), recursive=True)):
            out.append(path)
    return out


def read_pb(path, type_proto):
    data = open(path, "rb").read()
    kind = type_proto.WhichOneof("value")
    if kind == "sequence_type":
        p = onnx.SequenceProto()
        p.ParseFromString(data)
        return numpy_helper.to_list(p)
    if kind == "optional_type":
        p = onnx.OptionalProto()
        p.ParseFromString(data)
        return numpy_helper.to_optional(p)
    if kind == "map_type":
        p = onnx.MapProto()
        p.ParseFromString(data)
        return numpy_helper.to_dict(p)
    t = onnx.TensorProto()
    t.ParseFromString(data)
    return numpy_helper.to_array(t)


def load_inputs(model_path, model):
    folder = os.path.dirname(model_path)
    npz = os.path.join(folder, "inputs.npz")
    graph_inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if os.path.exists(npz):
        z = np.load(npz)
        return {k: z[k] for k in z.files if "__set" not in k}
    sets = sorted(glob.glob(os.path.join(folder, "test_data_set_*")))
    if not sets:
        return None
    feeds = {}
    for j, vi in enumerate(graph_inputs):
        p = os.path.join(sets[0], f"input_{j}.pb")
        if os.path.exists(p):
            feeds[vi.name] = read_pb(p, vi.type)
    return feeds


def checker_ok(path):
    try:
        onnx.checker.check_model(path, full_check=True)
        return None
    except Exception as e:  # noqa: BLE001 - any checker failure is a verdict, not a crash
        return str(e).splitlines()[0][:200]


def run_ort(path, feeds):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 4
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def flatten(x):
    if isinstance(x, np.ndarray):
        return [x]
    if isinstance(x, (list, tuple)):
        return [a for v in x for a in flatten(v)]
    if isinstance(x, dict):
        return [a for k in sorted(x) for a in flatten(x[k])]
    if x is None:
        return []
    return [np.asarray(x)]


def identical(a, b):
    fa, fb = flatten(a), flatten(b)
    if len(fa) != len(fb):
        return False
    for x, y in zip(fa, fb):
        x, y = np.asarray(x), np.asarray(y)
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        if x.dtype == object:
            if not all(p == q for p, q in zip(x.ravel(), y.ravel())):
                return False
        elif x.tobytes() != y.tobytes():
            return False
    return True




def all_graphs(g):
    """The graph and every subgraph below it (attributes of type GRAPH and GRAPHS), depth first."""
    yield g
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from all_graphs(a.g)
            for sg in a.graphs:
                yield from all_graphs(sg)


def suite_parser(doc, json_help):
    """The arguments every suite check takes: --mpopt, --jobs, --json and the model folders."""
    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--mpopt", required=True)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", help=json_help)
    ap.add_argument("roots", nargs="+")
    return ap


def report_copies(what, made, skipped, why):
    """Prints what a copy generator wrote and skipped (with `why` the skipped could not be made); exits
    non-zero when it wrote nothing, so that CI does not check an empty folder."""
    for s in skipped:
        print(f"skipped {s}")
    print(f"{what}: {made} written, {len(skipped)} {why}")
    if made == 0:
        sys.exit(f"{what}: none written")
