#!/usr/bin/env python3
"""Round-trip check of `mpopt copy` against the reference tools (onnx 1.23.2, onnxruntime 1.32.0).

For every model found under the given roots (a folder holding model.onnx, plus test_data_set_*/input_*.pb or
inputs.npz): run `mpopt copy`, then require
  * onnx.checker.check_model(copy, full_check=True) passes wherever it passes on the original, and
  * onnxruntime gives bit-identical outputs on the original and the copy, wherever the original runs.
Prints one line per failure and a summary line `roundtrip: N passed, N failed`; exits 1 on any failure.

    python3 tests/py/roundtrip.py --mpopt target/release/mpopt ROOT [ROOT ...]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

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


def check_one(args):
    mpopt, path, tmp, extra = args
    name = os.path.relpath(os.path.dirname(path))
    folder = os.path.join(tmp, name.replace(os.sep, "__"))
    os.makedirs(folder, exist_ok=True)
    out = os.path.join(folder, "model.onnx")
    r = subprocess.run([mpopt, "copy", path, "-o", out, *extra], capture_output=True, text=True)
    if r.returncode != 0:
        return name, "copy", r.stderr.strip()[:300]
    orig_chk = checker_ok(path)
    copy_chk = checker_ok(out)
    if orig_chk is None and copy_chk is not None:
        return name, "checker", copy_chk
    if orig_chk is not None:
        # The input itself fails the checker: the copy need not pass, but say so in the verdicts.
        name = name + " [input fails onnx.checker" + ("" if copy_chk else "; copy passes") + "]"
    model = onnx.load(path)
    feeds = load_inputs(path, model)
    if feeds is None:
        return name, "ok-no-inputs", ""
    try:
        ref = run_ort(path, feeds)
    except Exception:  # noqa: BLE001 - the original does not run: nothing to compare
        return name, "ok-orig-does-not-run", ""
    try:
        got = run_ort(out, feeds)
    except Exception as e:  # noqa: BLE001
        return name, "ort-load", str(e).splitlines()[0][:300]
    if not identical(ref, got):
        return name, "outputs-differ", ""
    return name, "ok", ""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mpopt", required=True)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", help="write per-model verdicts here")
    ap.add_argument("--copy-arg", action="append", default=[], help="extra argument for `mpopt copy` (repeatable)")
    ap.add_argument("roots", nargs="+")
    a = ap.parse_args()
    models = find_models(a.roots)
    if not models:
        print("roundtrip: no models found", file=sys.stderr)
        return 1
    counts = {}
    failures = []
    verdicts = {}
    with tempfile.TemporaryDirectory() as tmp:
        with ProcessPoolExecutor(a.jobs) as ex:
            for name, verdict, msg in ex.map(check_one, [(a.mpopt, m, tmp, a.copy_arg) for m in models], chunksize=8):
                counts[verdict] = counts.get(verdict, 0) + 1
                if "[input fails onnx.checker" in name:
                    counts["input-fails-checker"] = counts.get("input-fails-checker", 0) + 1
                verdicts[name] = [verdict, msg]
                if not verdict.startswith("ok"):
                    failures.append(f"FAIL {name}: {verdict}: {msg}")
    for f in failures:
        print(f)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(verdicts, f, indent=1, sort_keys=True)
    print("verdicts: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    passed = sum(v for k, v in counts.items() if k.startswith("ok"))
    print(f"roundtrip: {passed} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
