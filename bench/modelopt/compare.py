#!/usr/bin/env python3
"""mpopt against NVIDIA ModelOpt AutoCast on every corpus model: share of FLOPs in fp16, casts added, validity,
task metric (onnxruntime CPU) and whole-process time. Both get the corpus inputs as calibration data (input set
0, as ModelOpt's figures in the corpus README); mpopt is also run without calibration (static analysis only).

    bench/modelopt/setup.sh target/modelopt-venv
    .venv/bin/python bench/modelopt/compare.py --mpopt target/release/mpopt \
        --modelopt-python target/modelopt-venv/bin/python ../shared/corpus
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests", "py"))
from convert import evaluate, fmt_metric, low_flops_share  # noqa: E402
from convert_check import count_casts, input_sets  # noqa: E402
from common import run_ort  # noqa: E402

import onnx  # noqa: E402


def run(cmd):
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    return time.perf_counter() - t, r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mpopt", required=True)
    ap.add_argument("--modelopt-python", required=True)
    ap.add_argument("--json")
    ap.add_argument("corpus")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in sorted(glob.glob(os.path.join(a.corpus, "*", "model.onnx"))):
            name = os.path.basename(os.path.dirname(path))
            folder = os.path.dirname(path)
            model = onnx.load(path)
            sets = input_sets(path, model)
            refs = [run_ort(path, s) for s in sets]
            kind = json.load(open(os.path.join(folder, "meta.json"))).get("metric")
            casts0 = count_casts(model.graph)
            calib = os.path.join(tmp, f"{name}.calib.npz")
            d = np.load(os.path.join(folder, "inputs.npz"))
            np.savez(calib, **{k: v for k, v in d.items() if "__set" not in k})
            tools = {
                "mpopt": lambda out: [a.mpopt, path, "-o", out],
                "mpopt+cal": lambda out: [a.mpopt, path, "-o", out, "--calib", calib],
                "modelopt": lambda out: [a.modelopt_python, "-m", "modelopt.onnx.autocast", "--onnx_path", path,
                                         "--output_path", out, "--calibration_data", calib, "--keep_io_types",
                                         "--log_level", "ERROR"],
            }
            res = {}
            for tool, cmd in tools.items():
                out = os.path.join(tmp, f"{name}.{tool}.onnx")
                t, r = run(cmd(out))
                if r.returncode != 0 or not os.path.exists(out):
                    msg = (r.stderr.strip().splitlines() or ["failed"])[-1][:80]
                    res[tool] = {"s": t, "valid": f"conversion failed: {msg}", "casts": None, "low": None, "metric": None}
                    continue
                valid, m = evaluate(path, out, refs, sets, kind)
                res[tool] = {"s": t, "valid": valid, "casts": count_casts(onnx.load(out).graph) - casts0,
                             "low": low_flops_share(out), "metric": m}
            rows.append((name, res))
            print(f"done {name}", file=sys.stderr)
    print(f"{'model':30} {'tool':9} {'s':>7} {'casts':>6} {'low FLOPs':>9}  {'valid':10} metric")
    for name, res in rows:
        for tool, r in res.items():
            casts = f"{r['casts']:+d}" if r["casts"] is not None else "-"
            low = f"{100 * r['low']:.1f}%" if r["low"] is not None else "-"
            print(f"{name:30} {tool:9} {r['s']:7.2f} {casts:>6} {low:>9}  {r['valid'][:10]:10} {fmt_metric(r['metric'])}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
