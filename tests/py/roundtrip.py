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

import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import checker_ok, find_models, identical, load_inputs, run_ort, suite_parser  # noqa: E402

import onnx  # noqa: E402


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
    ap = suite_parser(__doc__, "write per-model verdicts here")
    ap.add_argument("--copy-arg", action="append", default=[], help="extra argument for `mpopt copy` (repeatable)")
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
