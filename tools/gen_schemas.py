#!/usr/bin/env python3
"""Writes crates/mpopt-ir/src/schema/ops.txt: every operator schema, every version.

Sources (pinned; the script refuses other versions):
  onnx 1.23.2        onnx.defs.get_all_schemas_with_history()  (ai.onnx, ai.onnx.ml, ai.onnx.preview*)
  onnxruntime 1.32.0 get_all_operator_schema(), domain com.microsoft (the contrib ops), and the two contrib ops
                     onnxruntime registers in the default domain and its optimizers write there at any opset:
                     LayerNormalization 1 (ONNX's own is 17) and SimplifiedLayerNormalization 1

    .venv/bin/python tools/gen_schemas.py

Format, one record per line, fields separated by single spaces, a schema opening with `op`:
  op DOMAIN NAME SINCE MIN_IN MAX_IN MIN_OUT MAX_OUT      (DOMAIN `-` for the default domain; MAX 2147483647 = unbounded)
  i NAME TYPE OPTION HOMOGENEOUS DIFF                     (an input: OPTION s|o|v, HOMOGENEOUS 1|0, DIFF d|n|u)
  o NAME TYPE OPTION HOMOGENEOUS DIFF                     (an output)
  t PARAM TYPE,TYPE,...                                   (a type constraint and its allowed types)
  a NAME KIND REQUIRED [DEFAULT]                          (an attribute: KIND as the IR text format names it,
                                                           defaults of com.microsoft ops are not exposed by
                                                           onnxruntime's Python bindings and stay absent;
                                                           REQUIRED 1|0, DEFAULT in IR text syntax)
TYPE is ONNX's type string with spaces removed: tensor(float), seq(tensor(int64)), map(int64,tensor(float)).
"""
from __future__ import annotations

import os
import sys

import onnx
import onnx.defs
from onnx import AttributeProto, helper

EXPECT = {"onnx": "1.23.2", "onnxruntime": "1.32.0"}
ORT_DEFAULT_DOMAIN = {"LayerNormalization", "SimplifiedLayerNormalization"}
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "crates", "mpopt-ir", "src", "schema", "ops.txt")

KIND = {
    AttributeProto.FLOAT: "float", AttributeProto.INT: "int", AttributeProto.STRING: "string",
    AttributeProto.TENSOR: "tensor", AttributeProto.GRAPH: "graph", AttributeProto.SPARSE_TENSOR: "sparse_tensor",
    AttributeProto.TYPE_PROTO: "type", AttributeProto.FLOATS: "floats", AttributeProto.INTS: "ints",
    AttributeProto.STRINGS: "strings", AttributeProto.TENSORS: "tensors", AttributeProto.GRAPHS: "graphs",
    AttributeProto.SPARSE_TENSORS: "sparse_tensors", AttributeProto.TYPE_PROTOS: "types",
}


def quote(b):
    if isinstance(b, str):
        b = b.encode()
    out = '"'
    for c in b:
        ch = chr(c)
        if ch in '"\\':
            out += "\\" + ch
        elif 32 <= c < 127:
            out += ch
        else:
            out += f"\\x{c:02x}"
    return out + '"'


def fmt_float(f):
    r = repr(float(f))
    if r in ("inf", "-inf", "nan"):
        return r
    # shortest text that round-trips as f32
    import numpy as np
    v = np.float32(f)
    for p in range(1, 12):
        s = f"{v:.{p}g}"
        if np.float32(s) == v:
            break
    if "e" not in s and "." not in s:
        s += ".0"
    return s


def default_text(a):
    dv = a.default_value
    if dv is None or not dv.name and dv.type == 0:
        return None
    try:
        v = helper.get_attribute_value(dv)
    except Exception:  # noqa: BLE001
        return None
    t = dv.type
    if t == AttributeProto.FLOAT:
        return fmt_float(v)
    if t == AttributeProto.INT:
        return str(v)
    if t == AttributeProto.STRING:
        return quote(v)
    if t == AttributeProto.FLOATS:
        return "[" + ", ".join(fmt_float(x) for x in v) + "]" if v else "floats []"
    if t == AttributeProto.INTS:
        return "[" + ", ".join(str(x) for x in v) + "]" if v else "ints []"
    if t == AttributeProto.STRINGS:
        return "[" + ", ".join(quote(x) for x in v) + "]" if v else "strings []"
    return None


OPTION = {0: "s", 1: "o", 2: "v"}


def option_code(opt):
    return OPTION[int(opt.value) if hasattr(opt, "value") else int(opt)]


def diff_code(p):
    c = getattr(p, "differentiation_category", None)
    if c is None:
        return "u"
    name = str(c).rsplit(".", 1)[-1]
    return {"Differentiable": "d", "NonDifferentiable": "n"}.get(name, "u")


def params(kind, ps):
    lines = []
    for p in ps:
        ty = getattr(p, "type_str", None) or getattr(p, "typeStr")
        homog = getattr(p, "is_homogeneous", None)
        if homog is None:
            homog = getattr(p, "isHomogeneous", True)
        lines.append(f"{kind} {p.name or '_'} {ty.replace(' ', '')} {option_code(p.option)} {int(bool(homog))} {diff_code(p)}")
    return lines


def attr_lines(attrs, ort):
    lines = []
    for name in sorted(attrs):
        a = attrs[name]
        kind = KIND.get(int(a.type.value) if hasattr(a.type, "value") else int(a.type), "undefined")
        line = f"a {name} {kind} {int(bool(a.required))}"
        dv = None
        if not ort:
            dv = default_text(a)
        else:
            raw = getattr(a, "_default_value", None)
            if raw:
                p = AttributeProto()
                p.ParseFromString(raw)
                if p.type != 0:
                    class W:  # adapter with the onnx schema attribute's shape
                        default_value = p
                    dv = default_text(W)
        if dv is not None:
            line += " " + dv
        lines.append(line)
    return lines


def schema_lines(s, ort=False):
    dom = s.domain or "-"
    out = [f"op {dom} {s.name} {s.since_version} {s.min_input} {s.max_input} {s.min_output} {s.max_output}"]
    out += params("i", s.inputs)
    out += params("o", s.outputs)
    for t in s.type_constraints:
        out.append(f"t {t.type_param_str} " + ",".join(x.replace(" ", "") for x in t.allowed_type_strs))
    out += attr_lines(s.attributes, ort)
    return out


def main():
    import onnxruntime
    from onnxruntime.capi import onnxruntime_pybind11_state as C

    got = {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    if got != EXPECT:
        sys.exit(f"gen_schemas.py needs {EXPECT}, found {got}")
    lines = [f"# generated by tools/gen_schemas.py from onnx {got['onnx']} and onnxruntime {got['onnxruntime']} (com.microsoft); do not edit"]
    schemas = sorted(onnx.defs.get_all_schemas_with_history(), key=lambda s: (s.domain, s.name, s.since_version))
    for s in schemas:
        lines += schema_lines(s)
    # onnxruntime's default-domain contrib ops that its optimizers emit (an ORT-optimized model at opset 12 has
    # LayerNormalization nodes); they go with the default domain's schemas, which ONNX's own versions outrank
    known = {(s.domain, s.name, s.since_version) for s in schemas}
    ort_default = sorted((s for s in C.get_all_operator_schema() if s.domain == "" and s.name in ORT_DEFAULT_DOMAIN
                          and (s.domain, s.name, s.since_version) not in known),
                         key=lambda s: (s.name, s.since_version))
    for s in ort_default:
        lines += schema_lines(s, ort=True)
    contrib = sorted((s for s in C.get_all_operator_schema() if s.domain == "com.microsoft"), key=lambda s: (s.name, s.since_version))
    for s in contrib:
        lines += schema_lines(s, ort=True)
    with open(OUT, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {OUT}: {len(schemas)} onnx schemas, {len(ort_default)} onnxruntime default-domain schemas, "
          f"{len(contrib)} com.microsoft schemas, {os.path.getsize(OUT)} bytes")


if __name__ == "__main__":
    main()
