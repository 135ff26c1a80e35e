#!/usr/bin/env python3
"""Accuracy-guided precision search (`--tolerance`) on every corpus model, checked on held-out inputs.

Each model's corpus inputs are split in two: the search measures on the first part (`--calib`), and the
result is judged on the second (rows of the batch; single-image models are judged on the mirrored image). Per
model it prints the budget, the held-out value of the budgeted metric and of the task metric (our
GPU-faithful executor, reference: the fp32 model on the same executor), the share of FLOPs in low precision
against the static pipeline's (with and without the same calibration data), the search's whole-model checks,
and its wall time and peak RSS against onnxconverter-common's `auto_convert_mixed_precision` with the same budget as its
`validate_fn` (`--occ-timeout` seconds at most; 0 skips it).

    .venv/bin/python bench/search.py --mpopt target/release/mpopt ../shared/corpus [--json OUT.json]
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
sys.path.insert(0, os.path.join(HERE, "..", "tests", "py"))
from common import checker_ok, run_ort  # noqa: E402
from convert_check import combine, metric  # noqa: E402

import onnx  # noqa: E402

# Budget per model (on its first output) and how its inputs split: "rows" halves every input along the
# batch axis given (default 0; inputs without it are shared), "mirror" judges on the horizontally mirrored image.
MODELS = {
    "ddddocr_det_yolox": ("cosine", 0.9999, "mirror", {}),
    "magika_standard_v3_3": ("top1", 1.0, "rows", {}),
    "open_nsfw_resnet50": ("top1", 1.0, "rows", {}),
    "paraphrase_minilm_l3_v2": ("cosine", 0.9999, "rows", {}),
    "ppocr_mobile_v2_cls": ("top1", 1.0, "rows", {}),
    "ppocrv4_det": ("cosine", 0.9999, "mirror", {}),
    "ppocrv4_rec": ("top1", 1.0, "rows", {}),
    "silero_vad_16k_sequence_lstm": ("max-abs", 0.01, "rows", {"h": None, "c": None}),
    "silero_vad_v6": ("max-abs", 0.01, "rows", {"state": 1, "sr": None}),
    "vit_tiny_patch16_224_random": ("top1", 1.0, "rows", {}),
}

# Tighter budgets, where the search has to keep nodes fp32 (`--budgets strict`).
STRICT = {
    "ddddocr_det_yolox": ("cosine", 0.999999),
    "magika_standard_v3_3": ("max-abs", 1e-3),
    "open_nsfw_resnet50": ("max-abs", 1e-3),
    "paraphrase_minilm_l3_v2": ("cosine", 0.999999),
    "ppocr_mobile_v2_cls": ("max-abs", 1e-3),
    "ppocrv4_det": ("cosine", 0.999999),
    "ppocrv4_rec": ("max-abs", 1e-2),
    "silero_vad_16k_sequence_lstm": ("max-abs", 1e-3),
    "silero_vad_v6": ("max-abs", 1e-3),
    "vit_tiny_patch16_224_random": ("cosine", 0.99999),
}


def split(inputs, how, axes):
    """(search set, held-out set) of one model's inputs."""
    base = {k: v for k, v in inputs.items() if "__set" not in k}
    if how == "mirror":
        return base, {k: np.ascontiguousarray(v[..., ::-1]) if v.ndim == 4 else v for k, v in base.items()}
    a, b = {}, {}
    for k, v in base.items():
        axis = axes.get(k, 0)
        if axis is None or v.ndim == 0:
            a[k] = b[k] = v
            continue
        n = v.shape[axis]
        h = (n + 1) // 2
        a[k] = np.take(v, range(h), axis=axis)
        b[k] = np.take(v, range(h, n), axis=axis)
    return a, b


def sh(cmd, timeout=None):
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return time.perf_counter() - t, r


def sh_rss(cmd, tmp, timeout=None):
    """`sh`, and the process's peak RSS in MB (`/usr/bin/time`'s, as bench/convert.py reads it)."""
    tf = os.path.join(tmp, "rss.txt")
    secs, r = sh(["/usr/bin/time", "-f", "%M", "-o", tf, *cmd], timeout)
    try:
        rss = int(open(tf).read().split()[-1]) / 1024
    except (OSError, ValueError, IndexError):
        rss = None
    return secs, r, rss


def share(report):
    return json.load(open(report))["summary"]["flops_low_share"]


def budget_value(name, m, metric_name):
    """The budgeted metric of one output from `mpopt compare --json`."""
    if metric_name == "top1":
        agree, rows = m["top1"]
        return agree / rows
    return {"cosine": m["cosine"], "max-abs": m["max_abs"], "max-rel": m["max_rel_peak"]}[metric_name]


def holds(metric_name, value, bound):
    return value >= bound if metric_name in ("cosine", "top1") else value <= bound


OCC = r"""
import sys, time, json, numpy as np, onnx
from onnxconverter_common import auto_mixed_precision as amp
model_path, npz, metric, bound, out = sys.argv[1:6]
bound = float(bound)
feeds = dict(np.load(npz))
def ok(r, g):
    r, g = np.asarray(r[0], np.float64), np.asarray(g[0], np.float64)
    if not np.isfinite(g).all():
        return False
    if metric == "top1":
        a, b = r.reshape(-1, r.shape[-1]).argmax(-1), g.reshape(-1, g.shape[-1]).argmax(-1)
        return (a == b).mean() >= bound
    if metric == "cosine":
        c = (r * g).sum() / (np.linalg.norm(r) * np.linalg.norm(g) + 1e-30)
        return c >= bound
    return np.abs(r - g).max() <= bound
t = time.perf_counter()
m = amp.auto_convert_mixed_precision(onnx.load(model_path), feeds, validate_fn=ok, keep_io_types=True)
json.dump({"seconds": time.perf_counter() - t}, open(out, "w"))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mpopt", required=True)
    ap.add_argument("--occ-timeout", type=float, default=300.0)
    ap.add_argument("--only", help="comma-separated model names")
    ap.add_argument("--budgets", choices=["default", "strict"], default="default",
                    help="default: the task-level budgets (top-1 agreement, cosine 0.9999, ...); strict: tighter ones")
    ap.add_argument("--json")
    ap.add_argument("--check", action="store_true",
                    help="exit non-zero unless every model meets its budget on the held-out inputs with at least the "
                         "static pipeline's share of low FLOPs (same calibration data)")
    ap.add_argument("corpus")
    a = ap.parse_args()
    only = set(a.only.split(",")) if a.only else None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in sorted(glob.glob(os.path.join(a.corpus, "*", "model.onnx"))):
            name = os.path.basename(os.path.dirname(path))
            if name not in MODELS or (only and name not in only):
                continue
            metric_name, bound, how, axes = MODELS[name]
            if a.budgets == "strict":
                metric_name, bound = STRICT[name]
            folder = os.path.dirname(path)
            kind = json.load(open(os.path.join(folder, "meta.json"))).get("metric")
            first = onnx.load(path, load_external_data=False).graph.output[0].name
            s, h = split(dict(np.load(os.path.join(folder, "inputs.npz"))), how, axes)
            sp, hp = os.path.join(tmp, f"{name}.search.npz"), os.path.join(tmp, f"{name}.holdout.npz")
            np.savez(sp, **s)
            np.savez(hp, **h)
            tol = f"{metric_name}@{first}={bound}"
            out, rep = os.path.join(tmp, f"{name}.search.onnx"), os.path.join(tmp, f"{name}.search.json")
            secs, r, rss = sh_rss([a.mpopt, path, "-o", out, "--calib", sp, "--tolerance", tol, "--report", rep], tmp)
            row = {"model": name, "tolerance": tol, "budget": f"{metric_name}={bound}", "search_s": secs,
                   "search_rss_mb": rss}
            if r.returncode != 0:
                row["error"] = r.stderr.strip()[-300:]
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            report = json.load(open(rep))
            checks = [x for x in report["search"] if x["kind"] == "search-check"]
            row["checks"] = len(checks)
            cost = next(x for x in report["search"] if x["kind"] == "search-cost")
            row["runs"] = float(cost["model_runs"])
            row["kept"] = sum(x["kind"] == "search-kept" for x in report["search"])
            row["share"] = report["summary"]["flops_low_share"]
            # valid: onnx.checker (full) and onnxruntime run it on the held-out inputs
            problem = checker_ok(out)
            if problem is None:
                try:
                    run_ort(out, h)
                except Exception as e:  # noqa: BLE001 - a failure to run is the verdict
                    problem = f"onnxruntime: {str(e).splitlines()[0][:160]}"
            row["valid"] = problem or "ok"
            for label, extra in (("static", []), ("static_calib", ["--calib", sp])):
                o, rp = os.path.join(tmp, f"{name}.{label}.onnx"), os.path.join(tmp, f"{name}.{label}.json")
                _, r2 = sh([a.mpopt, path, "-o", o, "--report", rp, *extra])
                row[f"share_{label}"] = share(rp) if r2.returncode == 0 else None
            # held-out: the budgeted metric and the task metric on the GPU-faithful executor
            cj = os.path.join(tmp, f"{name}.cmp.json")
            sh([a.mpopt, "compare", path, out, "--inputs", hp, "--json", cj])
            m = next(x for x in json.load(open(cj)) if x["name"] == first)
            row["heldout"] = budget_value(name, m, metric_name)
            row["heldout_ok"] = holds(metric_name, row["heldout"], bound)
            ro, go = os.path.join(tmp, f"{name}.ref.npz"), os.path.join(tmp, f"{name}.got.npz")
            sh([a.mpopt, "run", path, "--inputs", hp, "-o", ro])
            sh([a.mpopt, "run", out, "--inputs", hp, "-o", go])
            names = [o.name for o in onnx.load(path, load_external_data=False).graph.output]
            rz, gz = np.load(ro), np.load(go)
            row["task"] = combine([metric(kind, [rz[n] for n in names], [gz[n] for n in names])])
            if a.occ_timeout > 0:
                script, oj = os.path.join(tmp, "occ.py"), os.path.join(tmp, f"{name}.occ.json")
                open(script, "w").write(OCC)
                try:
                    _, r3, occ_rss = sh_rss([sys.executable, script, path, sp, metric_name, str(bound), oj], tmp,
                                            timeout=a.occ_timeout)
                    row["occ_s"] = json.load(open(oj))["seconds"] if r3.returncode == 0 else None
                    row["occ_rss_mb"] = occ_rss if r3.returncode == 0 else None
                    if r3.returncode != 0:
                        row["occ_error"] = r3.stderr.strip()[-200:]
                except subprocess.TimeoutExpired:
                    row["occ_s"] = f">{a.occ_timeout:.0f}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print("| model | budget | held-out | task metric (held-out) | FLOPs low: search / static / static+calib | checks | model runs | kept fp32 | valid | search s | search MB | occ auto s | occ auto MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['budget']} | error: {r['error'][-120:]} |||||||||||")
            continue
        pct = lambda x: "-" if x is None else f"{100 * x:.1f}"  # noqa: E731
        task = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["task"].items())
        occ = r.get("occ_s", "-")
        occ = f"{occ:.1f}" if isinstance(occ, float) else str(occ)
        mb = lambda x: "-" if x is None else f"{x:.0f}"  # noqa: E731
        print(f"| {r['model']} | {r['budget']} | {r['heldout']:.6g} {'ok' if r['heldout_ok'] else 'MISSED'} | {task} | "
              f"{pct(r['share'])} / {pct(r['share_static'])} / {pct(r['share_static_calib'])} | {r['checks']} | "
              f"{r['runs']:.2f} | {r['kept']} | {r['valid']} | {r['search_s']:.1f} | {mb(r['search_rss_mb'])} | {occ} | "
              f"{mb(r.get('occ_rss_mb'))} |")
    if a.json:
        json.dump(rows, open(a.json, "w"), indent=1)
    if a.check:
        bad = [r["model"] for r in rows
               if "error" in r or r["valid"] != "ok" or not r["heldout_ok"]
               or r["share"] < (r["share_static_calib"] or 0) - 1e-9]
        if bad or not rows:
            sys.exit(f"search check failed: {', '.join(bad) or 'no models'}")
        print(f"search check: {len(rows)} models meet their budgets on held-out inputs")


if __name__ == "__main__":
    main()
