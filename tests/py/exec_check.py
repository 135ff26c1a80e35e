"""The CPU executor against onnxruntime on the corpus: every input set of every corpus model runs through
`mpopt run` (fp32) and through onnxruntime's CPU provider (graph optimizations off, so it computes the graph as
written); every output must match within 1e-4 relative and 1e-6 absolute.

Deep convolutional models amplify last-bit differences of summation order (onnxruntime's MLAS kernels against
ours): onnxruntime disagrees with itself between its optimization levels on ppocrv4_det (1,082 elements past
1e-4/1e-6, max abs 2.0e-4) and ddddocr_det_yolox (8 elements). So an output also passes when at most 1 in
10,000 elements (or no more than onnxruntime's own count) is past the tolerance and its max abs error is
within 4x onnxruntime's own spread between optimization levels (the largest of basic, extended and all
against none; measured here, printed beside it). On the opset-21 copy of ppocrv4_rec, one softmax element
differs by 4.8e-5 from the unoptimized run; onnxruntime's basic level differs by 3.8e-5 there, and its
"all" level by only 1.1e-5, so a spread taken from "all" alone failed a result as close as onnxruntime's own. Exits 1 on
any other miss. The count matters for onnxruntime-optimized models (tests/py/ort_optimized.py), whose fused
ops onnxruntime computes with approximations (QuickGelu's vectorized sigmoid) that its unfused graph does not."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np

import onnxruntime as ort

from common import find_models

RTOL_NOTE = None


def run_ort(path, feeds, level):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = level
    so.log_severity_level = 4
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]).run(None, feeds)

RTOL, ATOL = 1e-4, 1e-6


def input_sets(npz_path):
    z = np.load(npz_path)
    sets = {}
    for k in z.files:
        name, _, idx = k.partition("__set")
        sets.setdefault(int(idx) if idx else 0, {})[name] = z[k]
    return sets


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mpopt", required=True)
    ap.add_argument("roots", nargs="+")
    args = ap.parse_args()
    failures = 0
    for path in find_models(args.roots):
        folder = os.path.dirname(path)
        npz = os.path.join(folder, "inputs.npz")
        if not os.path.exists(npz):
            continue
        name = os.path.basename(folder)
        worst_abs = worst_rel = 0.0
        bad = []
        spread_notes = []
        sets = input_sets(npz)
        for k, feeds in sorted(sets.items()):
            ref = run_ort(path, feeds, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
            # onnxruntime's other optimization levels, run only when an output misses the tolerance
            levels = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                      ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
            others = []
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "out.npz")
                r = subprocess.run([args.mpopt, "run", path, "--inputs", npz, "--set", str(k), "-o", out],
                                   capture_output=True, text=True)
                if r.returncode != 0:
                    bad.append(f"set {k}: mpopt run failed: {r.stderr.strip()[-300:]}")
                    continue
                got = np.load(out)
                names = list(got.files)
                for j, want in enumerate(ref):
                    have = got[names[j]]
                    if have.shape != want.shape or have.dtype != want.dtype:
                        bad.append(f"set {k} output {names[j]}: {have.dtype}{have.shape} vs {want.dtype}{want.shape}")
                        continue
                    if want.dtype.kind == "f":
                        w = want.astype(np.float64)
                        h = have.astype(np.float64)
                        d = np.abs(h - w)
                        worst_abs = max(worst_abs, float(d.max(initial=0)))
                        worst_rel = max(worst_rel, float((d / np.maximum(np.abs(w), 1e-12)).max(initial=0)))
                        if not np.allclose(h, w, rtol=RTOL, atol=ATOL, equal_nan=True):
                            n = int((~np.isclose(h, w, rtol=RTOL, atol=ATOL, equal_nan=True)).sum())
                            if not others:
                                others = [run_ort(path, feeds, level) for level in levels]
                            spread = max(float(np.abs(o[j].astype(np.float64) - w).max(initial=0)) for o in others)
                            n_self = max(int((~np.isclose(o[j], w, rtol=RTOL, atol=ATOL, equal_nan=True)).sum())
                                         for o in others)
                            note = (f"set {k} output {names[j]}: {n} of {w.size} elements past rtol {RTOL}/atol "
                                    f"{ATOL} (max abs {float(d.max()):.3e}); onnxruntime's own spread: {n_self} "
                                    f"elements, max abs {spread:.3e}")
                            if n <= max(w.size / 10000, n_self) and float(d.max()) <= 4 * spread:
                                spread_notes.append(note)
                            else:
                                bad.append(note)
                    elif not np.array_equal(have, want):
                        bad.append(f"set {k} output {names[j]}: values differ")
        status = "ok  " if not bad else "FAIL"
        print(f"{status} {name}: {len(sets)} input sets, max abs err {worst_abs:.2e}, max rel err {worst_rel:.2e}")
        for b in bad:
            print(f"     {b}")
        for b in spread_notes:
            print(f"     within onnxruntime's spread: {b}")
        failures += bool(bad)
    if failures:
        print(f"{failures} model(s) differ from onnxruntime")
        sys.exit(1)


if __name__ == "__main__":
    main()
