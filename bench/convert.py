#!/usr/bin/env python3
"""mpopt against the peers on every corpus model, in one run: whole-process time, peak RSS, casts, validity and
task metric, and the share of FLOPs running in fp16 (from each output model). Peers: onnxconverter-common 1.16 `float16.convert_float_to_float16(keep_io_types=True)` (occ) and
onnxruntime 1.32 `transformers.float16` (same call, ort). Also times mpopt on a generated 100,000-node model.

    bench/convert.sh            (builds mpopt, installs the pinned peer, runs this)
    .venv/bin/python bench/convert.py --mpopt target/release/mpopt ../shared/corpus

Times are the median of 7 whole-process runs after one untimed run, the tools' runs interleaved (one of each per
round; wall clock around the process; the peak RSS comes from one more run under `/usr/bin/time`), python
start-up and imports included for the peers as for mpopt's process start: what a user waits for.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "py"))
from common import all_graphs, checker_ok, run_ort  # noqa: E402
from convert_check import combine, count_casts, input_sets, metric  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402

# mpopt+cal: mpopt with --calib on the model's inputs.npz (calibration, as ModelOpt's figures were measured)
TOOLS = ("mpopt", "mpopt+cal", "occ", "ort")

PEER = {
    "occ": "from onnxconverter_common import float16 as f",
    "ort": "from onnxruntime.transformers import float16 as f",
}


def timed_all(cmds, tmp, reps=7):
    """{tool: (median wall time, peak RSS, error)} for one model's commands.

    The tools' runs are interleaved, one of each per round, so that every tool meets the same machine: timed
    one tool after another, a burst of load from elsewhere on this shared VM fell on a few milliseconds of
    mpopt's runs and made its median 2-4x too slow in one run of the script and not the next (silero_16k: 3.8
    against 15 ms). The wall clock is read around each process (microseconds: `/usr/bin/time`'s %e steps by
    10 ms). The peak RSS comes from one more run under `/usr/bin/time` (the child's own rusage would include
    this Python process, copied at fork; timing the runs under it added its own start, 1-3 ms, to every
    tool's time)."""
    times = {tool: [] for tool in cmds}
    errors = {}
    # one untimed run first: the binaries and the model in the page cache, for every tool alike
    for tool, cmd in cmds.items():
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            errors[tool] = r.stderr.strip().splitlines()[-1][:200] if r.stderr.strip() else "failed"
    for _ in range(reps):
        for tool, cmd in cmds.items():
            if tool in errors:
                continue
            t0 = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True)
            dt = time.perf_counter() - t0
            if r.returncode != 0:
                errors[tool] = r.stderr.strip().splitlines()[-1][:200] if r.stderr.strip() else "failed"
                continue
            times[tool].append(dt)
    out = {}
    for tool, cmd in cmds.items():
        if tool in errors:
            out[tool] = (None, None, errors[tool])
            continue
        tf = os.path.join(tmp, "time.txt")
        r = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", tf, *cmd], capture_output=True, text=True)
        rss = int(open(tf).read().split()[-1]) / 1024 if r.returncode == 0 else None
        out[tool] = (statistics.median(times[tool]), rss, None)
    return out


# data movement computes nothing
MOVES = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Transpose", "Slice", "Gather", "GatherElements",
         "GatherND", "Concat", "Split", "Expand", "Tile", "Pad", "Constant", "Shape", "Size", "DepthToSpace",
         "SpaceToDepth", "CastLike"}


def low_flops_share(path):
    """Share of the estimated FLOPs (matrix products, convolutions and recurrent layers 2 per multiply-add, data
    movement none, other ops one per output element; unknown dims count as 1) in nodes whose float output is fp16 or bf16, for any tool's output.
    Casts are not counted."""
    m = onnx.shape_inference.infer_shapes(onnx.load(path))
    graphs = list(all_graphs(m.graph))
    info = {}
    for g in graphs:
        for vi in list(g.value_info) + list(g.input) + list(g.output):
            t = vi.type.tensor_type
            dims = [d.dim_value if d.dim_value > 0 else 1 for d in t.shape.dim]
            info[vi.name] = (t.elem_type, dims)
        for init in g.initializer:
            info[init.name] = (init.data_type, list(init.dims) or [])
    prod = lambda d: int(np.prod(d)) if d else 1  # noqa: E731
    low = total = 0
    F32, F16, BF16 = 1, 10, 16
    for n in (n for g in graphs for n in g.node):
        if n.op_type in ("Cast", "If", "Loop", "Scan") or not n.output or n.output[0] not in info:
            continue
        et, out = info[n.output[0]]
        if et not in (F32, F16, BF16):
            continue
        ins = [info.get(i, (0, []))[1] for i in n.input]
        if n.op_type == "MatMul" and ins:
            f = 2 * (ins[0][-1] if ins[0] else 1) * prod(out)
        elif n.op_type == "Gemm" and ins:
            ta = any(a.name == "transA" and a.i == 1 for a in n.attribute)
            k = (ins[0][0] if ta else ins[0][-1]) if ins[0] else 1
            f = 2 * k * prod(out)
        elif n.op_type == "Conv" and len(ins) > 1:
            f = 2 * prod(ins[1][1:]) * prod(out)
        elif n.op_type == "ConvTranspose" and len(ins) > 1:
            f = 2 * prod(ins[0]) * prod(ins[1][1:])
        elif n.op_type in ("LSTM", "GRU", "RNN") and len(ins) > 2:
            f = 2 * prod(ins[0][:2]) * (prod(ins[1]) + prod(ins[2]))
        elif n.op_type in MOVES:
            f = 0
        else:
            f = prod(out)
        total += f
        low += f if et in (F16, BF16) else 0
    return low / total if total else 0.0


def evaluate(model_path, out, refs, sets, kind):
    chk = checker_ok(out)
    try:
        gots = [run_ort(out, s) for s in sets]
    except Exception as e:  # noqa: BLE001
        return "no (ort: " + str(e).splitlines()[0][:60] + ")", None
    valid = "yes" if chk is None else "ort only (checker fails)"
    return valid, combine([metric(kind, a, b) for a, b in zip(refs, gots)])


def fmt_metric(m):
    if m is None:
        return "-"
    parts = []
    for k, v in m.items():
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mpopt", required=True)
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--json")
    ap.add_argument("corpus")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in sorted(glob.glob(os.path.join(a.corpus, "*", "model.onnx"))):
            name = os.path.basename(os.path.dirname(path))
            model = onnx.load(path)
            sets = input_sets(path, model)
            refs = [run_ort(path, s) for s in sets]
            kind = json.load(open(os.path.join(os.path.dirname(path), "meta.json"))).get("metric")
            casts0 = count_casts(model.graph)
            res, outs, cmds = {}, {}, {}
            # every tool is timed before any output is evaluated: onnxruntime's evaluation runs here, in this
            # process, and would share the two cores with the next timed process
            for tool in TOOLS:
                out = os.path.join(tmp, f"{name}.{tool}.onnx")
                if tool == "mpopt":
                    cmd = [a.mpopt, path, "-o", out]
                elif tool == "mpopt+cal":
                    cmd = [a.mpopt, path, "-o", out, "--calib", os.path.join(os.path.dirname(path), "inputs.npz")]
                else:
                    code = (
                        f"import onnx; {PEER[tool]}; "
                        f"m = f.convert_float_to_float16(onnx.load({path!r}), keep_io_types=True); onnx.save(m, {out!r})"
                    )
                    cmd = [a.python, "-c", code]
                cmds[tool] = cmd
                outs[tool] = out
            timings = timed_all(cmds, tmp)
            outs = {tool: (outs[tool], *timings[tool]) for tool in TOOLS}
            for tool, (out, t, rss, err) in outs.items():
                if err:
                    res[tool] = {"s": None, "rss": None, "casts": None, "valid": "conversion failed", "metric": None,
                                 "low": None}
                    continue
                valid, m = evaluate(path, out, refs, sets, kind)
                res[tool] = {"s": t, "rss": rss, "casts": count_casts(onnx.load(out).graph) - casts0, "valid": valid,
                             "metric": m, "low": low_flops_share(out)}
            rows.append((name, res))
        # the 100,000-node model
        gen = os.path.join(os.path.dirname(a.mpopt), "examples", "gen_bench_model")
        big = os.path.join(tmp, "chain100k.onnx")
        big_t = None
        if os.path.exists(gen):
            subprocess.run([gen, big, "50000", "8"], check=True, capture_output=True)
            big_t, big_rss, _ = timed_all({"mpopt": [a.mpopt, big, "-o", os.path.join(tmp, "big16.onnx")]}, tmp)["mpopt"]
    print(f"{'model':30} {'tool':9} {'s':>7} {'speedup':>8} {'RSS MB':>7} {'casts':>6} {'low FLOPs':>9}  {'valid':10} metric")
    for name, res in rows:
        base = res["occ"]["s"]
        for tool in TOOLS:
            r = res[tool]
            s = f"{r['s']:.3f}" if r["s"] is not None else "-"
            sp = f"{base / r['s']:.1f}x" if (r["s"] and base and tool.startswith("mpopt")) else ""
            rss = f"{r['rss']:.0f}" if r["rss"] is not None else "-"
            casts = f"{r['casts']:+d}" if r["casts"] is not None else "-"
            low = f"{100 * r['low']:.1f}%" if r["low"] is not None else "-"
            print(f"{name:30} {tool:9} {s:>7} {sp:>8} {rss:>7} {casts:>6} {low:>9}  {r['valid'][:10]:10} "
                  f"{fmt_metric(r['metric'])}")
    if big_t is not None:
        print(f"generated 100,000-node model: mpopt {big_t:.2f} s, {big_rss:.0f} MB peak RSS")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "big_s": big_t}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
