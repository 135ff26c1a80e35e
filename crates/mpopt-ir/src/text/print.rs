//! The printer. See the module documentation of [`crate::text`] for the format.

use std::fmt::Write;

use bytes::Bytes;

use crate::{
    AttrValue, Attribute, DType, DimValue, Function, Graph, Model, SparseTensor, Tensor, Type,
    TypeInfo, ValueId,
};

/// Tensors with at most this many elements print their values; larger ones print `<N bytes>`.
pub const INLINE_ELEMENTS: usize = 16;

/// Extra facts to print as trailing `; ...` comments (precision decisions, ranges, ...).
pub trait Annotate {
    /// A note for a node line of graph `g`.
    fn node(&self, _g: &Graph, _n: crate::NodeId) -> Option<String> {
        None
    }
}

struct NoNotes;
impl Annotate for NoNotes {}

/// Prints a whole model.
pub fn print_model(m: &Model) -> String {
    print_model_with(m, &NoNotes)
}

/// Prints a whole model with notes.
pub fn print_model_with(m: &Model, notes: &dyn Annotate) -> String {
    let mut p = Printer {
        out: String::new(),
        notes,
    };
    let _ = writeln!(p.out, "ir_version {}", m.ir_version);
    let ops: Vec<String> = m
        .opset_imports
        .iter()
        .map(|o| format!("{} {}", domain_name(&o.domain), o.version))
        .collect();
    let _ = writeln!(p.out, "opset {}", ops.join(", "));
    p.out.push('\n');
    p.graph(&m.graph, 0);
    p.out.push('\n');
    for f in &m.functions {
        p.out.push('\n');
        p.function(f);
        p.out.push('\n');
    }
    p.out
}

/// Prints one graph (as the top-level scope).
pub fn print_graph(g: &Graph) -> String {
    let mut p = Printer {
        out: String::new(),
        notes: &NoNotes,
    };
    p.graph(g, 0);
    p.out.push('\n');
    p.out
}

fn domain_name(d: &str) -> &str {
    if d.is_empty() { "ai.onnx" } else { d }
}

/// True when `s` prints without quotes after `%` or `@`.
fn is_bare(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '/' | '-'))
        && !s.starts_with('-')
}

/// A quoted string with `\"`, `\\`, `\n`, `\t` and `\xNN` escapes for other control and non-UTF-8 bytes.
pub fn quote(bytes: &[u8]) -> String {
    let mut o = String::from("\"");
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '"' => o.push_str("\\\""),
                '\\' => o.push_str("\\\\"),
                '\n' => o.push_str("\\n"),
                '\t' => o.push_str("\\t"),
                c if (c as u32) < 0x20 || c == '\u{7f}' => {
                    let _ = write!(o, "\\x{:02x}", c as u32);
                }
                c => o.push(c),
            }
        }
        for b in chunk.invalid() {
            let _ = write!(o, "\\x{b:02x}");
        }
    }
    o.push('"');
    o
}

/// `%name` or `%"quoted name"`.
pub fn value_ref(name: &str) -> String {
    if is_bare(name) {
        format!("%{name}")
    } else {
        format!("%{}", quote(name.as_bytes()))
    }
}

fn at_name(name: &str) -> String {
    if is_bare(name) {
        format!("@{name}")
    } else {
        format!("@{}", quote(name.as_bytes()))
    }
}

fn domain_str(d: &str) -> String {
    let ident = d
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && d.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.'));
    if ident {
        d.to_string()
    } else {
        quote(d.as_bytes())
    }
}

fn dim_name(s: &str) -> String {
    let ident = s
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ident {
        s.to_string()
    } else {
        quote(s.as_bytes())
    }
}

fn elem_name(e: Option<DType>) -> &'static str {
    e.map_or("undef", DType::short_name)
}

fn shape_str(shape: &Option<Vec<crate::Dim>>) -> String {
    match shape {
        None => "[...]".to_string(),
        Some(dims) => {
            let ds: Vec<String> = dims
                .iter()
                .map(|d| match &d.value {
                    DimValue::Known(n) => n.to_string(),
                    DimValue::Symbol(s) => dim_name(s),
                    DimValue::Unknown => "?".to_string(),
                })
                .collect();
            format!("[{}]", ds.join(","))
        }
    }
}

/// A type as the text format writes it: `f32[N,16]`, `f32[...]`, `seq(i64[])`, `?`.
pub fn type_string(t: &TypeInfo) -> String {
    let inner = |t: &Option<Box<TypeInfo>>| t.as_ref().map_or("?".to_string(), |t| type_string(t));
    match &t.ty {
        Type::Tensor { elem, shape } => format!("{}{}", elem_name(*elem), shape_str(shape)),
        Type::SparseTensor { elem, shape } => {
            format!("sparse {}{}", elem_name(*elem), shape_str(shape))
        }
        Type::Sequence(e) => format!("seq({})", inner(e)),
        Type::Map { key, value } => format!("map({}, {})", elem_name(*key), inner(value)),
        Type::Optional(e) => format!("opt({})", inner(e)),
        Type::Opaque { domain, name } => format!(
            "opaque({}, {})",
            quote(domain.as_bytes()),
            quote(name.as_bytes())
        ),
        Type::Unset => "?".to_string(),
    }
}

fn opt_type(t: &Option<TypeInfo>) -> String {
    t.as_ref().map_or("?".to_string(), type_string)
}

/// Shortest text that parses back to the same f32 (`1.0`, `1e-5`, `inf`, `nan`).
pub fn float_str(f: f32) -> String {
    if f.is_nan() {
        "nan".into()
    } else {
        format!("{f:?}")
    }
}

fn float64_str(f: f64) -> String {
    if f.is_nan() {
        "nan".into()
    } else {
        format!("{f:?}")
    }
}

fn dims_str(d: &[i64]) -> String {
    let ds: Vec<String> = d.iter().map(i64::to_string).collect();
    format!("[{}]", ds.join(","))
}

/// Element values for inline printing, or `None` when the tensor is printed as `<N bytes>`.
fn tensor_values(t: &Tensor) -> Option<Vec<String>> {
    let n = t.numel()?;
    if n > INLINE_ELEMENTS {
        return None;
    }
    if t.dtype == DType::Str {
        return match &t.data {
            crate::TensorData::Strings(v) => Some(v.iter().map(|s| quote(s)).collect()),
            _ => None,
        };
    }
    let out: Vec<String> = match t.dtype {
        DType::F32 | DType::F16 | DType::BF16 => t
            .values_f64(n)?
            .into_iter()
            .map(|v| float_str(v as f32))
            .collect(),
        DType::F64 => t.values_f64(n)?.into_iter().map(float64_str).collect(),
        DType::Bool => t
            .values_i128(n)?
            .into_iter()
            .map(|v| (if v != 0 { "true" } else { "false" }).into())
            .collect(),
        _ => t
            .values_i128(n)?
            .into_iter()
            .map(|v| v.to_string())
            .collect(),
    };
    (out.len() == n).then_some(out)
}

/// `f32[2,2] [1.0, 2.0, 3.0, 4.0]`, or `f32[256,256] <262144 bytes>` past [`INLINE_ELEMENTS`] or when elided.
pub fn tensor_string(t: &Tensor) -> String {
    let head = format!("{}{}", t.dtype, dims_str(&t.dims));
    let values = if matches!(t.data, crate::TensorData::Elided) {
        None
    } else {
        tensor_values(t)
    };
    match values {
        Some(v) => format!("{head} [{}]", v.join(", ")),
        None => {
            // The packed size, whatever the storage form, so that elided data prints as it was parsed.
            let n = t
                .numel()
                .and_then(|n| t.dtype.byte_len(n))
                .unwrap_or_else(|| t.byte_size());
            format!("{head} <{n} bytes>")
        }
    }
}

fn sparse_string(s: &SparseTensor) -> String {
    format!(
        "sparse({}, values = {}, indices = {})",
        dims_str(&s.dims),
        tensor_string(&s.values),
        tensor_string(&s.indices)
    )
}

fn list<T>(kind: &str, v: &[T], f: impl Fn(&T) -> String) -> String {
    if v.is_empty() {
        return format!("{kind} []");
    }
    let items: Vec<String> = v.iter().map(f).collect();
    format!("[{}]", items.join(", "))
}

struct Printer<'a> {
    out: String,
    notes: &'a dyn Annotate,
}

impl Printer<'_> {
    fn indent(&mut self, depth: usize) {
        for _ in 0..depth {
            self.out.push_str("  ");
        }
    }

    fn attr_value(&mut self, v: &AttrValue, depth: usize) {
        let s = match v {
            AttrValue::Float(f) => float_str(*f),
            AttrValue::Int(i) => i.to_string(),
            AttrValue::String(s) => quote(s),
            AttrValue::Tensor(t) => format!("tensor {}", tensor_string(t)),
            AttrValue::SparseTensor(s) => sparse_string(s),
            AttrValue::Type(t) => format!("type {}", type_string(t)),
            AttrValue::Floats(v) => list("floats", v, |f| float_str(*f)),
            AttrValue::Ints(v) => list("ints", v, |i| i.to_string()),
            AttrValue::Strings(v) => list("strings", v, |s: &Bytes| quote(s)),
            AttrValue::Tensors(v) => list("tensors", v, |t| format!("tensor {}", tensor_string(t))),
            AttrValue::SparseTensors(v) => list("sparse_tensors", v, sparse_string),
            AttrValue::Types(v) => list("types", v, |t| format!("type {}", type_string(t))),
            AttrValue::Graph(g) => {
                self.graph(g, depth);
                return;
            }
            AttrValue::Graphs(gs) => {
                if gs.is_empty() {
                    self.out.push_str("graphs []");
                    return;
                }
                self.out.push('[');
                for (i, g) in gs.iter().enumerate() {
                    if i > 0 {
                        self.out.push_str(", ");
                    }
                    self.graph(g, depth);
                }
                self.out.push(']');
                return;
            }
        };
        self.out.push_str(&s);
    }

    fn attrs(&mut self, attrs: &[Attribute], depth: usize) {
        if attrs.is_empty() {
            return;
        }
        let mut sorted: Vec<&Attribute> = attrs.iter().collect();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        self.out.push_str(" {");
        for (i, a) in sorted.into_iter().enumerate() {
            if i > 0 {
                self.out.push_str(", ");
            }
            let _ = write!(self.out, "{} = ", a.name);
            match &a.ref_attr_name {
                Some(r) => {
                    let _ = write!(
                        self.out,
                        "ref {} {}",
                        quote(r.as_bytes()),
                        a.value.kind_name()
                    );
                }
                None => self.attr_value(&a.value, depth),
            }
        }
        self.out.push('}');
    }

    fn params(&self, g: &Graph, vs: &[crate::ValueId], typed: bool) -> String {
        let items: Vec<String> = vs
            .iter()
            .map(|&v| {
                let val = g.value(v);
                if typed {
                    format!("{}: {}", value_ref(val.name()), opt_type(&val.ty))
                } else {
                    value_ref(val.name())
                }
            })
            .collect();
        items.join(", ")
    }

    fn graph(&mut self, g: &Graph, depth: usize) {
        let _ = write!(
            self.out,
            "graph {}({}) -> ({})",
            at_name(&g.name),
            self.params(g, g.inputs(), true),
            self.params(g, g.outputs(), true)
        );
        if !g.captures().is_empty() {
            let _ = write!(
                self.out,
                " captures ({})",
                self.params(g, g.captures(), true)
            );
        }
        self.out.push_str(" {\n");
        self.body(g, depth + 1);
        self.indent(depth);
        self.out.push('}');
    }

    fn body(&mut self, g: &Graph, depth: usize) {
        // Range facts of graph inputs and captures (node outputs carry theirs on the node line).
        for &v in g.inputs().iter().chain(g.captures()) {
            if let Some(r) = &g.value(v).range {
                self.indent(depth);
                let _ = writeln!(self.out, "; range {} {r}", value_ref(g.value(v).name()));
            }
        }
        for &v in g.initializers() {
            let val = g.value(v);
            self.indent(depth);
            let t = val.initializer.as_ref().expect("listed initializer");
            let _ = writeln!(
                self.out,
                "{} = const {}",
                value_ref(val.name()),
                tensor_string(t)
            );
        }
        for &v in g.sparse_initializers() {
            let val = g.value(v);
            self.indent(depth);
            let s = val
                .sparse_initializer
                .as_ref()
                .expect("listed sparse initializer");
            let _ = writeln!(
                self.out,
                "{} = const {}",
                value_ref(val.name()),
                sparse_string(s)
            );
        }
        for (id, n) in g.nodes() {
            self.indent(depth);
            let outs: Vec<String> = n
                .outputs()
                .iter()
                .map(|o| o.map_or("_".to_string(), |v| value_ref(g.value(v).name())))
                .collect();
            if !outs.is_empty() {
                let _ = write!(self.out, "{} = ", outs.join(", "));
            }
            let op = if n.domain.is_empty() {
                n.op_type.clone()
            } else {
                format!("{}::{}", domain_str(&n.domain), n.op_type)
            };
            let ins: Vec<String> = n
                .inputs()
                .iter()
                .map(|i| i.map_or("_".to_string(), |v| value_ref(g.value(v).name())))
                .collect();
            let _ = write!(self.out, "{op}({})", ins.join(", "));
            self.attrs(&n.attributes, depth);
            let typed: Vec<String> = n
                .outputs()
                .iter()
                .map(|o| {
                    o.and_then(|v| g.value(v).ty.as_ref())
                        .map_or("?".to_string(), type_string)
                })
                .collect();
            if typed.iter().any(|t| t != "?") {
                let _ = write!(self.out, " : {}", typed.join(", "));
            }
            if !n.name.is_empty() {
                let _ = write!(self.out, " {}", at_name(&n.name));
            }
            if let Some(p) = &n.precision {
                let _ = write!(self.out, " ; prec {}: {}", p.dtype, p.rule);
            }
            let ranges: Vec<(ValueId, &crate::ValueRange)> = n
                .outputs()
                .iter()
                .flatten()
                .filter_map(|&v| g.value(v).range.as_deref().map(|r| (v, r)))
                .collect();
            match ranges.as_slice() {
                [] => {}
                [(_, r)] if n.outputs().len() == 1 => {
                    let _ = write!(self.out, " ; range {r}");
                }
                rs => {
                    let each: Vec<String> = rs
                        .iter()
                        .map(|(v, r)| format!("{} {r}", value_ref(g.value(*v).name())))
                        .collect();
                    let _ = write!(self.out, " ; range {}", each.join(", "));
                }
            }
            if let Some(note) = self.notes.node(g, id) {
                let _ = write!(self.out, " ; {note}");
            }
            self.out.push('\n');
        }
    }

    fn function(&mut self, f: &Function) {
        let g = &f.body;
        let _ = write!(
            self.out,
            "func {}::{}({}) -> ({})",
            domain_str(&f.domain),
            f.name,
            self.params(g, g.inputs(), false),
            self.params(g, g.outputs(), false)
        );
        if !f.attributes.is_empty() || !f.attribute_defaults.is_empty() {
            self.out.push_str(" attrs (");
            let mut first = true;
            for a in &f.attributes {
                if !first {
                    self.out.push_str(", ");
                }
                first = false;
                self.out.push_str(a);
            }
            for a in &f.attribute_defaults {
                if !first {
                    self.out.push_str(", ");
                }
                first = false;
                let _ = write!(self.out, "{} = ", a.name);
                self.attr_value(&a.value, 0);
            }
            self.out.push(')');
        }
        let ops: Vec<String> = f
            .opset_imports
            .iter()
            .map(|o| format!("{} {}", domain_name(&o.domain), o.version))
            .collect();
        let _ = write!(self.out, " opset ({})", ops.join(", "));
        self.out.push_str(" {\n");
        self.body(g, 1);
        self.out.push('}');
    }
}
