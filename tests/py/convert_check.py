#!/usr/bin/env python3
"""Validity and accuracy of `mpopt MODEL -o OUT` against the reference tools.

For every model (corpus folders with inputs.npz, node-suite folders with test_data_set_0) whose fp32 model runs
in onnxruntime, the converted model must:
  * pass onnx.checker.check_model(OUT, full_check=True),
  * load and run in onnxruntime 1.32.0 (CPU),
  * keep every output's name, dtype and shape,
  * produce no NaN/Inf where the fp32 model does not (corpus models).
On corpus models the task metric of ../shared/corpus/README.md is computed on every input set. Node-suite
outputs are also compared numerically (1e-2 relative + 1e-3 absolute, the measure the peers were scored with);
that share is reported, not required.

    python3 tests/py/convert_check.py --mpopt target/release/mpopt ROOT [ROOT ...]
    ... --arg=--to --arg=bf16 --no-kernel-ok ROOT ...   (other targets: onnxruntime's CPU provider lacks most
                                                        bf16 kernels, so a checked model it cannot run passes)
    ... --io-low ROOT ...                               (--io-types low: float16 graph inputs and outputs)
Prints one line per model for the corpus, the failures, and `convert-check: N passed, N failed`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import all_graphs, checker_ok, find_models, flatten, load_inputs, run_ort, suite_parser  # noqa: E402

import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402


def input_sets(model_path, model):
    """The base input set plus the `__setN` extra sets of a corpus model."""
    npz = os.path.join(os.path.dirname(model_path), "inputs.npz")
    base = load_inputs(model_path, model)
    sets = [base] if base is not None else []
    if os.path.exists(npz):
        z = np.load(npz)
        extra = sorted({k.split("__set")[1] for k in z.files if "__set" in k})
        for s in extra:
            sets.append({k.split("__set")[0]: z[k] for k in z.files if k.endswith(f"__set{s}")})
    return sets


def ctc_decode(logits):
    ids = logits.argmax(-1)
    out = []
    for row in ids:
        seq, prev = [], -1
        for t in row:
            if t != prev and t != 0:
                seq.append(int(t))
            prev = t
        out.append(seq)
    return out


def metric(kind, ref, got):
    """(name -> value) of the task metric for one input set, from the first output."""
    r, g = np.asarray(ref[0], dtype=np.float64), np.asarray(got[0], dtype=np.float64)
    if kind == "classifier":
        a, b = r.reshape(-1, r.shape[-1]).argmax(-1), g.reshape(-1, g.shape[-1]).argmax(-1)
        return {"top1_agree": int((a == b).sum()), "top1_total": int(a.size)}
    if kind == "embedding":
        a, b = r.reshape(r.shape[0], -1), g.reshape(g.shape[0], -1)
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)
        return {"cosine_min": float(cos.min())}
    if kind == "prob_map":
        a, b = r > 0.3, g > 0.3
        union = np.logical_or(a, b).sum()
        return {"iou": float(np.logical_and(a, b).sum() / union) if union else 1.0}
    if kind == "ctc":
        a, b = ctc_decode(r), ctc_decode(g)
        return {"seq_agree": sum(x == y for x, y in zip(a, b)), "seq_total": len(a)}
    if kind == "prob":
        return {"max_abs_err": float(np.abs(r - g).max()), "decisions_agree": int(((r > 0.5) == (g > 0.5)).sum()), "decisions_total": int(r.size)}
    if kind == "yolo":
        a, b = r.reshape(-1, r.shape[-1]), g.reshape(-1, g.shape[-1])
        ca, cb = a[:, 4] * a[:, 5:].max(1), b[:, 4] * b[:, 5:].max(1)
        sa, sb = set(np.nonzero(ca > 0.25)[0]), set(np.nonzero(cb > 0.25)[0])
        jac = len(sa & sb) / len(sa | sb) if (sa | sb) else 1.0
        return {"anchors_jaccard": jac, "top_anchor_agree": int(ca.argmax() == cb.argmax())}
    return {}


def combine(ms):
    out = {}
    for m in ms:
        for k, v in m.items():
            if k.endswith("_min") or k == "iou" or k == "anchors_jaccard":
                out[k] = min(out.get(k, v), v)
            elif k == "max_abs_err":
                out[k] = max(out.get(k, v), v)
            else:
                out[k] = out.get(k, 0) + v
    return out


# The best peer's task metric on each corpus model (../shared/corpus/README.md): a converted model must do at
# least as well. Agreement counts are compared as fractions.
PEER_BEST = {
    "ppocrv4_det": {"iou": 0.99},
    "ppocrv4_rec": {"seq_agree": 1.0},
    "ppocr_mobile_v2_cls": {"top1_agree": 1.0},
    "silero_vad_v6": {"decisions_agree": 1.0},
    "silero_vad_16k_sequence_lstm": {"decisions_agree": 485 / 486},
    "magika_standard_v3_3": {"top1_agree": 1.0},
    "ddddocr_det_yolox": {"anchors_jaccard": 1.0, "top_anchor_agree": 1.0},
    "open_nsfw_resnet50": {"top1_agree": 1.0},
    "paraphrase_minilm_l3_v2": {"cosine_min": 0.999},
    "vit_tiny_patch16_224_random": {"top1_agree": 1.0},
}


def below_peer(name, m):
    """The metrics of model `name` that fall below the best peer's, as text (empty when none)."""
    # (a quantized QDQ copy, tests/py/quantized.py, is held to its original's floors)
    floors = PEER_BEST.get(os.path.basename(name).removesuffix("_qdq"), {})
    bad = []
    for k, floor in floors.items():
        if k not in m:
            continue
        v = m[k]
        total = m.get(k.replace("_agree", "_total"))
        if k.endswith("_agree") and k != "top_anchor_agree" and total:
            v = v / total
        if v < floor - 1e-12:
            bad.append(f"{k}={m[k]} below the best peer's {floor:.4g}")
    return "; ".join(bad)


def close(ref, got):
    for x, y in zip(flatten(ref), flatten(got)):
        x, y = np.asarray(x), np.asarray(y)
        if x.dtype.kind in "fc":
            if not np.allclose(x.astype(np.float64), y.astype(np.float64), rtol=1e-2, atol=1e-3, equal_nan=True):
                return False
        elif x.dtype == object:
            if not all(p == q for p, q in zip(x.ravel(), y.ravel())):
                return False
        elif not np.array_equal(x, y):
            return False
    return True


def signature(model):
    out = []
    for o in model.graph.output:
        t = o.type.tensor_type if o.type.HasField("tensor_type") else None
        out.append((o.name, t.elem_type if t else o.type.WhichOneof("value")))
    return out


def count_casts(g):
    return sum(n.op_type == "Cast" for sub in all_graphs(g) for n in sub.node)


T = onnx.TensorProto
FLOATS = {T.FLOAT16, T.BFLOAT16, T.FLOAT, T.DOUBLE}
# every value of the first type is a value of the second (fuse_casts.rs `exact_into`)
EXACT = {(T.FLOAT16, T.FLOAT), (T.FLOAT16, T.DOUBLE), (T.BFLOAT16, T.FLOAT), (T.BFLOAT16, T.DOUBLE),
         (T.FLOAT, T.DOUBLE)}


def exact_into(a, b):
    return a == b or (a, b) in EXACT or a == T.BOOL


def holds_exactly(to, values):
    """True when dtype `to` holds every integer in `values` exactly (fuse_casts.rs `holds_exactly`)."""
    v = np.asarray(values).astype(np.int64).ravel()
    if to == T.BFLOAT16:  # 8 significant bits
        def odd_part(x):
            x = abs(int(x))
            while x and x % 2 == 0:
                x //= 2
            return x
        return all(odd_part(x) < 256 for x in v)
    if to in FLOATS:
        np_t = {T.FLOAT16: np.float16, T.FLOAT: np.float32, T.DOUBLE: np.float64}[to]
        with np.errstate(over="ignore"):
            back = v.astype(np_t).astype(np.float64)
        return bool(np.all(np.abs(v) <= 2 ** 53) and np.all(back == v.astype(np.float64)))
    info = {T.INT8: np.int8, T.UINT8: np.uint8, T.INT16: np.int16, T.UINT16: np.uint16, T.INT32: np.int32,
            T.UINT32: np.uint32, T.INT64: np.int64}.get(to)
    if info is None:
        return False
    i = np.iinfo(info)
    return bool(np.all((v >= i.min) & (v <= i.max)))


def removable_casts(model):
    """Casts that fuse-casts' rules remove and that are still there (docs/passes.md, fuse-casts): no-op casts,
    chains whose first step is exact, duplicates, and casts of constants computed exactly here. A cast that
    produces a graph output is kept by design. Returns one line per cast found."""
    found = []

    def walk(g, outer_types):
        types = dict(outer_types)
        for vi in [*g.input, *g.value_info, *g.output]:
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                types[vi.name] = vi.type.tensor_type.elem_type
        # an initializer that is also a graph input is only a default: a feed may replace it
        inputs = {i.name for i in g.input}
        consts = {i.name: numpy_helper.to_array(i) for i in g.initializer
                  if not i.external_data and i.name not in inputs}
        for i in g.initializer:
            types[i.name] = i.data_type
        prod = {}
        for n in g.node:
            for o in n.output:
                prod[o] = n
            if n.op_type == "Constant" and len(n.attribute) == 1:
                a = n.attribute[0]
                val = {"value": lambda: numpy_helper.to_array(a.t), "value_int": lambda: np.array(a.i),
                       "value_ints": lambda: np.array(list(a.ints)), "value_float": lambda: np.array(a.f, np.float32),
                       "value_floats": lambda: np.array(list(a.floats), np.float32)}.get(a.name)
                if val is not None:
                    consts[n.output[0]] = val()
        outputs = {o.name for o in g.output}
        seen = set()
        for n in g.node:
            for a in n.attribute:
                for sg in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    walk(sg, types)
            if n.op_type != "Cast" or n.domain not in ("", "ai.onnx") or n.output[0] in outputs:
                continue
            to = next(a.i for a in n.attribute if a.name == "to")
            x = n.input[0]
            what = None
            if types.get(x) == to:
                what = "no-op"
            elif (x, to) in seen:
                what = "duplicate"
            elif x in prod and prod[x].op_type == "Cast" and prod[x].domain in ("", "ai.onnx"):
                mid = next(a.i for a in prod[x].attribute if a.name == "to")
                a0 = types.get(prod[x].input[0])
                if a0 is not None and exact_into(a0, mid) and (exact_into(a0, to) or exact_into(to, a0)):
                    what = "chain"
            elif x in consts:
                c = consts[x]
                if (c.dtype.kind == "f" and to in FLOATS) or (c.dtype.kind in "iub" and holds_exactly(to, c)):
                    what = "cast of a constant"
            seen.add((x, to))
            if what:
                found.append(f"{what}: Cast({x}) to {to}")

    walk(model.graph, {})
    return found


def run_executor(mpopt, model_path, feeds, folder, k):
    """Runs a model on mpopt's GPU-faithful CPU executor; returns its outputs in graph order."""
    inp, outp = os.path.join(folder, f"in{k}.npz"), os.path.join(folder, f"out{k}.npz")
    # strings as unicode arrays: an object array would be a pickle, which mpopt does not read
    np.savez(inp, **{n: v.astype(str) if isinstance(v, np.ndarray) and v.dtype == object else v
                     for n, v in feeds.items()})
    r = subprocess.run([mpopt, "run", model_path, "--inputs", inp, "-o", outp, "--threads", "1"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stderr.strip()[:400])
    got = np.load(outp)
    names = [o.name for o in onnx.load(model_path, load_external_data=False).graph.output]
    return [got[n] for n in names]


def lowered(sig, io_low):
    """The output signature `--io-types low` should give: float32 tensor outputs become float16."""
    if not io_low:
        return sig
    return [(n, onnx.TensorProto.FLOAT16 if t == onnx.TensorProto.FLOAT else t) for n, t in sig]


def feeds_for(model, feeds):
    """The feeds cast to the dtypes the model declares for its float tensor inputs (float16 after
    `--io-types low`)."""
    want = {i.name: i.type.tensor_type.elem_type for i in model.graph.input if i.type.HasField("tensor_type")}
    out = {}
    for k, v in feeds.items():
        if want.get(k) == onnx.TensorProto.FLOAT16 and isinstance(v, np.ndarray) and v.dtype == np.float32:
            v = v.astype(np.float16)
        out[k] = v
    return out


# With --io-low (and --low-fed, whose readers get the same float16-rounded inputs), results that float16
# inputs change by design, with the reason.
IO_LOW_EXPECTED = {
    "test_nonmaxsuppression_iou_threshold_boundary":
        "its boxes, rounded to float16, move an IoU that sits exactly on the threshold: one box fewer",
}


def check_one(args):
    mpopt, path, tmp, extra, calibrate, executor, io_low, low_fed, no_kernel_ok = args
    if io_low:
        extra = [*extra, "--io-types", "low"]
    if low_fed:
        extra = [*extra, "--force-low", "Identity"]
    if calibrate and os.path.exists(os.path.join(os.path.dirname(path), "inputs.npz")):
        extra = [*extra, "--calib", os.path.join(os.path.dirname(path), "inputs.npz")]
    name = os.path.relpath(os.path.dirname(path))
    folder = os.path.join(tmp, name.replace(os.sep, "__"))
    os.makedirs(folder, exist_ok=True)
    out = os.path.join(folder, "model.onnx")
    model = onnx.load(path)
    sets = input_sets(path, model)
    if not sets:
        return name, "skip-no-inputs", "", {}
    try:
        refs = [run_ort(path, s) for s in sets]
    except Exception:  # noqa: BLE001 - the original does not run: nothing to check
        return name, "skip-orig-does-not-run", "", {}
    r = subprocess.run([mpopt, path, "-o", out, *extra], capture_output=True, text=True)
    if r.returncode != 0:
        return name, "convert-failed", r.stderr.strip()[:400], {}
    chk = checker_ok(out)
    if chk is not None and checker_ok(path) is None:
        return name, "checker", chk, {}
    conv = onnx.load(out)
    if signature(conv) != lowered(signature(model), io_low):
        return name, "io-changed", f"{signature(model)} -> {signature(conv)}", {}
    left = removable_casts(conv)
    if left:
        return name, "cast-left", f"{len(left)} cast(s) fuse-casts removes: {'; '.join(left[:3])}", {}
    if io_low:
        sets = [feeds_for(conv, s) for s in sets]
    try:
        gots = [run_ort(out, s) for s in sets]
    except Exception as e:  # noqa: BLE001
        msg = str(e).splitlines()[0][:400]
        if no_kernel_ok and "NOT_IMPLEMENTED" in msg and "Could not find an implementation" in msg:
            # valid (the checker passed), but onnxruntime's CPU provider has no kernel for a type (bf16)
            return name, "skip-ort-no-kernel", msg, {}
        if no_kernel_ok and "INVALID_GRAPH" in msg and "Type 'tensor(bfloat16)' of input parameter" in msg:
            # the same, for an op whose schema has a function body (Clip-13): with no bf16 kernel,
            # onnxruntime inlines the body, whose ops (Where-9) take no bf16 at that opset
            return name, "skip-ort-no-kernel", msg, {}
        return name, "ort", msg, {}
    if executor:
        # the converted model on the GPU-faithful executor: fp16 rounding after every op, as a GPU does
        try:
            gots = [run_executor(mpopt, out, s, folder, k) for k, s in enumerate(sets)]
        except Exception as e:  # noqa: BLE001
            return name, "executor", str(e).splitlines()[0][:400], {}
    if io_low:
        # float16 outputs where the original gives float32: compared as float32
        gots = [[g.astype(np.float32) if isinstance(g, np.ndarray) and g.dtype == np.float16
                 and isinstance(r, np.ndarray) and r.dtype == np.float32 else g for r, g in zip(ref, got)]
                for ref, got in zip(refs, gots)]
    info = {"casts_before": count_casts(model.graph), "casts_after": count_casts(conv.graph)}
    # strings come back from mpopt's .npz as unicode arrays, from onnxruntime as object arrays
    text = lambda d: d == object or d.kind == "U"  # noqa: E731
    for ref, got in zip(refs, gots):
        for x, y in zip(flatten(ref), flatten(got)):
            x, y = np.asarray(x), np.asarray(y)
            if x.shape != y.shape or (x.dtype != y.dtype and not (text(x.dtype) and text(y.dtype))):
                if (io_low or low_fed) and os.path.basename(name) in IO_LOW_EXPECTED:
                    return name, "skip-io-low-expected", IO_LOW_EXPECTED[os.path.basename(name)], {}
                return name, "io-changed", f"output {x.dtype}{x.shape} -> {y.dtype}{y.shape}", {}
            if x.dtype.kind == "f" and np.isfinite(x).all() and not np.isfinite(y).all():
                info["nonfinite"] = True
    meta = os.path.join(os.path.dirname(path), "meta.json")
    if os.path.exists(meta):
        kind = json.load(open(meta)).get("metric")
        info["metric"] = combine([metric(kind, a, b) for a, b in zip(refs, gots)])
        if info.get("nonfinite"):
            return name, "nan-inf", "the converted model produces NaN/Inf", info
        worse = below_peer(name, info["metric"])
        if worse:
            return name, "metric", worse, info
    info["close"] = all(close(a, b) for a, b in zip(refs, gots))
    return name, "ok", "", info


def main():
    ap = suite_parser(__doc__, "write per-model results here")
    ap.add_argument("--arg", action="append", default=[], help="extra argument for mpopt (repeatable)")
    ap.add_argument("--calibrate", action="store_true", help="convert with --calib on each model's inputs.npz")
    ap.add_argument("--no-kernel-ok", action="store_true",
                    help="a converted model that passes the checker but that onnxruntime's CPU provider cannot run "
                         "for a missing kernel (bf16 MatMul, Add, ...) is not a failure (for --to bf16/auto)")
    ap.add_argument("--io-low", action="store_true",
                    help="convert with --io-types low: float32 graph inputs and outputs must become float16 (the "
                         "feeds are cast to float16, the outputs compared as float32)")
    ap.add_argument("--low-fed", action="store_true",
                    help="convert with --force-low Identity: for the copies tests/py/low_fed.py writes, where an "
                         "Identity feeds each float32 input to its readers, which then read float16 values")
    ap.add_argument("--executor", action="store_true",
                    help="measure the converted model on mpopt's GPU-faithful executor instead of onnxruntime")
    a = ap.parse_args()
    models = find_models(a.roots)
    counts, failures, results = {}, [], {}
    with tempfile.TemporaryDirectory() as tmp:
        with ProcessPoolExecutor(a.jobs) as ex:
            for name, verdict, msg, info in ex.map(check_one, [(a.mpopt, m, tmp, a.arg, a.calibrate, a.executor, a.io_low, a.low_fed,
                                                           a.no_kernel_ok)
                                                          for m in models], chunksize=4):
                counts[verdict] = counts.get(verdict, 0) + 1
                results[name] = {"verdict": verdict, "message": msg, **info}
                if not (verdict == "ok" or verdict.startswith("skip")):
                    failures.append(f"FAIL {name}: {verdict}: {msg}")
                if "metric" in info:
                    print(f"{os.path.basename(name):30} casts {info['casts_before']:4} -> {info['casts_after']:4}  {info['metric']}")
    for f in failures:
        print(f)
    checked = [r for r in results.values() if r["verdict"] == "ok"]
    if checked:
        close_n = sum(1 for r in checked if r.get("close"))
        print(f"numerically close (1e-2 rel + 1e-3 abs): {close_n}/{len(checked)} ({100.0 * close_n / len(checked):.1f}%)")
    print("verdicts: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1, sort_keys=True)
    passed = sum(v for k, v in counts.items() if k == "ok" or k.startswith("skip"))
    print(f"convert-check: {passed} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
