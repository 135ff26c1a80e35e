//! `infer-types`: the dtype and shape of every value, in every graph, subgraph and local-function call.
//!
//! **Why.** Every precision decision needs to know which values are float, how large a tensor or reduction is,
//! and which inputs are shape arithmetic. Models declare few of these (often only graph inputs and outputs).
//!
//! **What.** In schedule order, for each node:
//! 1. Output dtypes come from the operator schema at the model's opset (`mpopt_ir::schema`). A type parameter
//!    is bound by the inputs that share it; a dtype-defining attribute decides where no input does (Cast `to`,
//!    ConstantOfShape `value`, RandomNormal `dtype`, ...). If/Loop/Scan outputs come from their bodies, which are
//!    inferred first with their inputs and captures typed. A call to a model-local function is typed by
//!    inferring a copy of its body with the call's input types.
//! 2. Output shapes come from `shape_rules` (broadcasting, MatMul/Gemm, Conv and pooling, Reshape/Expand/Tile,
//!    Concat/Split/Slice/Gather, Squeeze/Unsqueeze, reductions, Resize, Pad, RNNs, ...).
//! 3. Shape arithmetic is folded (`sym`): `Shape -> Gather -> Concat -> Reshape` gives a shaped Reshape output
//!    even with symbolic batch dims.
//!
//! **Invariants.**
//! - Declared types win over inferred ones. A clash (another dtype, another rank, two known dims that differ)
//!   is reported in the outcome's notes, never silently resolved.
//! - An inferred known dim refines a declared unknown or symbolic one.
//! - Unknown stays unknown: a value the pass cannot type is listed (`untyped`), never guessed. An op without
//!   a schema (a custom domain) keeps whatever its outputs declare.
//! - The pass only adds type information: it never adds, removes or rewires nodes. Running it twice changes
//!   nothing the second time.
//!
//! ```text
//! before:  %s = Shape(%x)                    after:  %s = Shape(%x) : i64[2]
//!          %n = Gather(%s, %zero)                    %n = Gather(%s, %zero) : i64[]
//!          %t = Concat(%n1, %m1) {axis = 0}          %t = Concat(%n1, %m1) {axis = 0} : i64[2]
//!          %y = Reshape(%x, %t)                      %y = Reshape(%x, %t) : f32[N,16]
//! ```

use std::collections::BTreeMap;

use rustc_hash::FxHashMap as HashMap;

use mpopt_ir::schema::{OpSchema, TypeSpec, registry};
use mpopt_ir::{
    AttrValue, DType, Dim, DimValue, Function, Graph, Model, Node, NodeId, Tensor, Type, TypeInfo,
    ValueId,
};

use crate::shape_rules::{self, NodeView};
use crate::sym::SymTensor;
use crate::{Pass, PassError, PassOutcome};

/// The pass. After a run, [`InferTypes::report`] holds what it found.
#[derive(Default)]
pub struct InferTypes {
    /// Findings of the last run.
    pub report: InferReport,
}

/// What `infer-types` found.
#[derive(Clone, Debug, Default)]
pub struct InferReport {
    /// Float-or-not, shape-or-not counts over node outputs of all graphs.
    pub values: usize,
    /// Values with a known element type.
    pub typed: usize,
    /// Values with a known rank.
    pub shaped: usize,
    /// Values with every dim known.
    pub fully_shaped: usize,
    /// Values the pass could not type: `graph 'g': 'name' (output of node 'n' (Op))`.
    pub untyped: Vec<String>,
    /// Declared types that contradict inference.
    pub conflicts: Vec<String>,
    /// Ops with no schema and no declared output types.
    pub unknown_ops: BTreeMap<String, usize>,
}

impl Pass for InferTypes {
    fn name(&self) -> &'static str {
        "infer-types"
    }

    fn run(&mut self, model: &mut Model) -> Result<PassOutcome, PassError> {
        let opsets = model.opsets();
        let functions: HashMap<(String, String), Function> = model
            .functions
            .iter()
            .map(|f| ((f.domain.clone(), f.name.clone()), f.clone()))
            .collect();
        let cx = Cx { opsets, functions };
        let mut report = InferReport::default();
        let before = type_fingerprint(&model.graph);
        let name = model.graph.name.clone();
        infer_graph(
            &mut model.graph,
            &cx,
            &HashMap::default(),
            &mut report,
            &format!("graph '{name}'"),
            0,
        );
        let changed = type_fingerprint(&model.graph) != before;
        let mut notes: Vec<String> = report
            .conflicts
            .iter()
            .map(|c| format!("conflict: {c}"))
            .collect();
        notes.extend(report.unknown_ops.iter().map(|(op, n)| {
            format!("no schema for {op} ({n} node(s)); outputs keep their declared types")
        }));
        let outcome = PassOutcome {
            changed,
            counters: vec![
                ("values", report.values as u64),
                ("typed", report.typed as u64),
                ("shaped", report.shaped as u64),
                ("fully shaped", report.fully_shaped as u64),
                ("untyped", report.untyped.len() as u64),
                ("conflicts", report.conflicts.len() as u64),
            ],
            notes,
            records: Vec::new(),
        };
        self.report = report;
        Ok(outcome)
    }
}

struct Cx {
    opsets: mpopt_ir::Opsets,
    functions: HashMap<(String, String), Function>,
}

impl Cx {
    fn opset(&self, domain: &str) -> i64 {
        self.opsets.version(domain).unwrap_or(1)
    }
}

/// What a capture knows about the outer value it reads.
type Outer = HashMap<String, (Option<TypeInfo>, Option<SymTensor>)>;

fn type_fingerprint(g: &Graph) -> usize {
    g.value_ids().filter(|&v| g.value(v).ty.is_some()).count()
}

fn tensor_type(elem: DType, shape: Option<Vec<Dim>>) -> TypeInfo {
    TypeInfo {
        ty: Type::Tensor {
            elem: Some(elem),
            shape,
        },
        denotation: None,
    }
}

/// The same type with its shape (and nested shapes) forgotten: what a type parameter binds to.
fn strip_shape(t: &TypeInfo) -> TypeInfo {
    let ty = match &t.ty {
        Type::Tensor { elem, .. } => Type::Tensor {
            elem: *elem,
            shape: None,
        },
        Type::SparseTensor { elem, .. } => Type::SparseTensor {
            elem: *elem,
            shape: None,
        },
        other => other.clone(),
    };
    TypeInfo {
        ty,
        denotation: None,
    }
}

fn int_attr(n: &Node, name: &str) -> Option<i64> {
    match n.attr(name).map(|a| &a.value) {
        Some(AttrValue::Int(i)) => Some(*i),
        _ => None,
    }
}

fn dtype_attr(n: &Node, name: &str) -> Option<DType> {
    int_attr(n, name).and_then(|c| DType::from_code(c as i32))
}

/// The type and shape of a Constant node's output.
fn constant_output(n: &Node) -> Option<(TypeInfo, Option<SymTensor>, Option<Vec<f64>>)> {
    let a = n.attributes.iter().find(|a| a.ref_attr_name.is_none())?;
    Some(match (&*a.name, &a.value) {
        ("value", AttrValue::Tensor(t)) => (
            tensor_type(
                t.dtype,
                Some(t.dims.iter().map(|&d| Dim::known(d)).collect()),
            ),
            SymTensor::from_tensor(t),
            small_floats(t),
        ),
        ("sparse_value", AttrValue::SparseTensor(s)) => (
            tensor_type(
                s.values.dtype,
                Some(s.dims.iter().map(|&d| Dim::known(d)).collect()),
            ),
            None,
            None,
        ),
        ("value_float", AttrValue::Float(f)) => (
            tensor_type(DType::F32, Some(vec![])),
            None,
            Some(vec![*f as f64]),
        ),
        ("value_floats", AttrValue::Floats(f)) => (
            tensor_type(DType::F32, Some(vec![Dim::known(f.len() as i64)])),
            None,
            Some(f.iter().map(|&x| x as f64).collect()),
        ),
        ("value_int", AttrValue::Int(i)) => (
            tensor_type(DType::I64, Some(vec![])),
            Some(SymTensor::scalar(DimValue::Known(*i))),
            None,
        ),
        ("value_ints", AttrValue::Ints(v)) => (
            tensor_type(DType::I64, Some(vec![Dim::known(v.len() as i64)])),
            Some(SymTensor::vector(
                v.iter().map(|&x| DimValue::Known(x)).collect(),
            )),
            None,
        ),
        ("value_string", AttrValue::String(_)) => {
            (tensor_type(DType::Str, Some(vec![])), None, None)
        }
        ("value_strings", AttrValue::Strings(v)) => (
            tensor_type(DType::Str, Some(vec![Dim::known(v.len() as i64)])),
            None,
            None,
        ),
        _ => return None,
    })
}

fn small_floats(t: &Tensor) -> Option<Vec<f64>> {
    if !t.dtype.is_float() || t.dims.len() > 1 {
        return None;
    }
    let n = t.numel()?;
    (n <= crate::sym::MAX_ELEMS)
        .then(|| t.values_f64(n))
        .flatten()
}

/// Output types from the schema: bound type parameters, concrete types, and dtype-defining attributes.
fn schema_types(
    schema: &OpSchema,
    n: &Node,
    ins: &[Option<&TypeInfo>],
    opset: i64,
) -> Vec<Option<TypeInfo>> {
    let mut bound: HashMap<&str, TypeInfo> = HashMap::default();
    for (i, t) in ins.iter().enumerate() {
        let (Some(t), Some(p)) = (*t, schema.input_param(i)) else {
            continue;
        };
        if let TypeSpec::Param(name) = &p.ty
            && (p.homogeneous || i < schema.inputs.len())
        {
            bound.entry(name.as_str()).or_insert_with(|| strip_shape(t));
        }
    }
    let elem_of = |i: usize| {
        ins.get(i)
            .copied()
            .flatten()
            .and_then(TypeInfo::tensor_elem)
    };
    let n_out = n.outputs().len();
    let default_domain = n.in_default_domain();
    (0..n_out)
        .map(|o| {
            if let Some(t) = attribute_type(n, o, opset, &elem_of) {
                return Some(t);
            }
            if let Some(t) = default_domain.then(|| structural_type(n, o, ins)).flatten() {
                return Some(t);
            }
            match schema.output_param(o).map(|p| &p.ty) {
                Some(TypeSpec::Concrete(t)) => Some(t.clone()),
                Some(TypeSpec::Param(p)) => bound.get(p.as_str()).cloned().or_else(|| {
                    // an unbound parameter with a single allowed type
                    let c = schema.constraint(p)?;
                    (c.allowed.len() == 1).then(|| c.allowed[0].clone())
                }),
                None => None,
            }
        })
        .collect()
}

/// Ops whose output dtype an attribute (or a particular input) defines, at the schema's binding gaps.
fn attribute_type(
    n: &Node,
    o: usize,
    opset: i64,
    elem_of: &dyn Fn(usize) -> Option<DType>,
) -> Option<TypeInfo> {
    let t = |d: DType| Some(tensor_type(d, None));
    if !n.in_default_domain() {
        return match (n.domain.as_str(), n.op_type.as_str()) {
            ("ai.onnx.ml", "CastMap") => match n.attr("cast_to").map(|a| &a.value) {
                Some(AttrValue::String(s)) if s.as_ref() == b"TO_STRING" => t(DType::Str),
                Some(AttrValue::String(s)) if s.as_ref() == b"TO_INT64" => t(DType::I64),
                _ => t(DType::F32),
            },
            ("ai.onnx.ml", "CategoryMapper") => match elem_of(0) {
                Some(DType::Str) => t(DType::I64),
                Some(_) => t(DType::Str),
                None => None,
            },
            ("ai.onnx.ml", "LabelEncoder") => {
                let has = |k: &str| n.attr(k).is_some();
                if has("values_strings")
                    || has("default_string") && !has("values_int64s") && !has("values_floats")
                {
                    t(DType::Str)
                } else if has("values_int64s") {
                    t(DType::I64)
                } else if has("values_floats") {
                    t(DType::F32)
                } else if has("values_tensor") {
                    match n.attr("values_tensor").map(|a| &a.value) {
                        Some(AttrValue::Tensor(x)) => t(x.dtype),
                        _ => None,
                    }
                } else {
                    None
                }
            }
            ("ai.onnx.ml", "LinearClassifier" | "SVMClassifier" | "TreeEnsembleClassifier")
                if o == 0 =>
            {
                if n.attr("classlabels_strings").is_some() {
                    t(DType::Str)
                } else {
                    t(DType::I64)
                }
            }
            ("ai.onnx.ml", "ZipMap") => {
                let key = if n.attr("classlabels_strings").is_some() {
                    DType::Str
                } else {
                    DType::I64
                };
                let map = TypeInfo {
                    ty: Type::Map {
                        key: Some(key),
                        value: Some(Box::new(tensor_type(DType::F32, None))),
                    },
                    denotation: None,
                };
                Some(TypeInfo {
                    ty: Type::Sequence(Some(Box::new(map))),
                    denotation: None,
                })
            }
            ("ai.onnx.ml", "DictVectorizer") => None,
            _ => None,
        };
    }
    match n.op_type.as_str() {
        "Cast" | "BitCast" => dtype_attr(n, "to").and_then(t),
        "CastLike" => elem_of(1).and_then(t),
        "ConstantOfShape" => match n.attr("value").map(|a| &a.value) {
            Some(AttrValue::Tensor(x)) => t(x.dtype),
            _ => t(DType::F32),
        },
        "RandomNormal" | "RandomUniform" => t(dtype_attr(n, "dtype").unwrap_or(DType::F32)),
        "RandomNormalLike" | "RandomUniformLike" | "EyeLike" | "Bernoulli" => {
            dtype_attr(n, "dtype").or_else(|| elem_of(0)).and_then(t)
        }
        "Multinomial" => t(dtype_attr(n, "dtype").unwrap_or(DType::I32)),
        "BlackmanWindow" | "HammingWindow" | "HannWindow" | "MelWeightMatrix" => {
            t(dtype_attr(n, "output_datatype").unwrap_or(DType::F32))
        }
        "LayerNormalization" if o > 0 => t(dtype_attr(n, "stash_type").unwrap_or(DType::F32)),
        "QuantizeLinear" if o == 0 => elem_of(2)
            .or_else(|| dtype_attr(n, "output_dtype").filter(|_| opset >= 21))
            .or(Some(DType::U8))
            .and_then(t),
        "DequantizeLinear" if opset >= 19 => dtype_attr(n, "output_dtype")
            .or_else(|| elem_of(1))
            .and_then(t),
        "DequantizeLinear" => t(DType::F32),
        "SequenceEmpty" => Some(TypeInfo {
            ty: Type::Sequence(Some(Box::new(tensor_type(
                dtype_attr(n, "dtype").unwrap_or(DType::F32),
                None,
            )))),
            denotation: None,
        }),
        _ => None,
    }
}

/// Types of If/Loop/Scan outputs from their inferred bodies.
fn control_flow_types(n: &Node, g_in: &[Option<&TypeInfo>]) -> Option<Vec<Option<TypeInfo>>> {
    let body_outs = |name: &str| -> Option<Vec<Option<TypeInfo>>> {
        let a = n.attr(name)?;
        let AttrValue::Graph(b) = &a.value else {
            return None;
        };
        Some(b.outputs().iter().map(|&v| b.value(v).ty.clone()).collect())
    };
    match n.op_type.as_str() {
        "If" => {
            let then = body_outs("then_branch")?;
            let els = body_outs("else_branch").unwrap_or_default();
            Some(
                then.into_iter()
                    .enumerate()
                    .map(|(i, t)| match (t, els.get(i).cloned().flatten()) {
                        (Some(a), Some(b)) => Some(merge_branches(&a, &b)),
                        (a, b) => a.or(b).map(|t| strip_shape(&t)),
                    })
                    .collect(),
            )
        }
        "Loop" => {
            let outs = body_outs("body")?;
            let carried = n.inputs().len().saturating_sub(2);
            // body outputs: cond, carried..., scan outputs...
            Some(
                outs.into_iter()
                    .skip(1)
                    .enumerate()
                    .map(|(i, t)| {
                        if i < carried {
                            // a carried value keeps the dims its initial value and the body output agree on
                            match (t, g_in.get(2 + i).copied().flatten().cloned()) {
                                (Some(a), Some(b)) => Some(merge_branches(&a, &b)),
                                (a, b) => a.or(b),
                            }
                        } else {
                            t.map(|t| add_leading_dim(&t))
                        }
                    })
                    .collect(),
            )
        }
        "SequenceMap" => {
            let outs = body_outs("body")?;
            Some(
                outs.into_iter()
                    .map(|t| {
                        t.map(|t| TypeInfo {
                            ty: Type::Sequence(Some(Box::new(strip_shape(&t)))),
                            denotation: None,
                        })
                    })
                    .collect(),
            )
        }
        "Scan" => {
            let outs = body_outs("body")?;
            let n_state = n.inputs().len() - int_attr(n, "num_scan_inputs").unwrap_or(0) as usize;
            Some(
                outs.into_iter()
                    .enumerate()
                    .map(|(i, t)| {
                        if i < n_state {
                            t
                        } else {
                            t.map(|t| add_leading_dim(&t))
                        }
                    })
                    .collect(),
            )
        }
        _ => None,
    }
}

fn int_attr_of(attrs: &[(String, AttrValue)], name: &str) -> Option<i64> {
    attrs.iter().find(|(n, _)| n == name).and_then(|(_, v)| {
        if let AttrValue::Int(i) = v {
            Some(*i)
        } else {
            None
        }
    })
}

fn ints_attr_of(attrs: &[(String, AttrValue)], name: &str) -> Option<Vec<i64>> {
    attrs.iter().find(|(n, _)| n == name).and_then(|(_, v)| {
        if let AttrValue::Ints(i) = v {
            Some(i.clone())
        } else {
            None
        }
    })
}

/// A tensor type with one axis removed (a Scan input's per-iteration slice).
fn drop_axis(t: &TypeInfo, ax: i64) -> TypeInfo {
    match &t.ty {
        Type::Tensor {
            elem,
            shape: Some(s),
        } if !s.is_empty() => {
            let r = s.len() as i64;
            let a = if ax < 0 { ax + r } else { ax };
            let shape = (0..r).contains(&a).then(|| {
                s.iter()
                    .enumerate()
                    .filter(|(i, _)| *i as i64 != a)
                    .map(|(_, d)| d.clone())
                    .collect()
            });
            TypeInfo {
                ty: Type::Tensor { elem: *elem, shape },
                denotation: None,
            }
        }
        _ => strip_shape(t),
    }
}

/// Ops whose output type is built from an input's whole type (sequences, optionals), not just its dtype.
fn structural_type(n: &Node, o: usize, ins: &[Option<&TypeInfo>]) -> Option<TypeInfo> {
    let ti = |ty| TypeInfo {
        ty,
        denotation: None,
    };
    let input = |i: usize| ins.get(i).copied().flatten().cloned();
    let seq_elem = |t: TypeInfo| match t.ty {
        Type::Sequence(Some(e)) => Some(*e),
        _ => None,
    };
    match n.op_type.as_str() {
        "SequenceAt" => input(0).and_then(seq_elem),
        "ConcatFromSequence" => input(0).and_then(seq_elem).map(|t| strip_shape(&t)),
        "SequenceConstruct" => {
            input(0).map(|t| ti(Type::Sequence(Some(Box::new(strip_shape(&t))))))
        }
        "SplitToSequence" => input(0).map(|t| ti(Type::Sequence(Some(Box::new(strip_shape(&t)))))),
        "Optional" => match n.attr("type").map(|a| &a.value) {
            Some(AttrValue::Type(t)) => Some(ti(Type::Optional(Some(Box::new(t.clone()))))),
            _ => input(0).map(|t| ti(Type::Optional(Some(Box::new(t))))),
        },
        "OptionalGetElement" => input(0).map(|t| match t.ty {
            Type::Optional(Some(e)) => *e,
            _ => t,
        }),
        // present_state has its own type parameter; absent past_state, it follows the query.
        "LinearAttention" if o == 1 => input(3).or_else(|| input(0)).map(|t| strip_shape(&t)),
        _ => None,
    }
}

fn add_leading_dim(t: &TypeInfo) -> TypeInfo {
    match &t.ty {
        Type::Tensor { elem, shape } => TypeInfo {
            ty: Type::Tensor {
                elem: *elem,
                shape: shape.as_ref().map(|s| {
                    std::iter::once(Dim::unknown())
                        .chain(s.iter().cloned())
                        .collect()
                }),
            },
            denotation: None,
        },
        _ => strip_shape(t),
    }
}

/// The type both branches agree on: dtype if equal, dims where equal.
fn merge_branches(a: &TypeInfo, b: &TypeInfo) -> TypeInfo {
    match (&a.ty, &b.ty) {
        (
            Type::Tensor {
                elem: ea,
                shape: Some(sa),
            },
            Type::Tensor {
                shape: Some(sb), ..
            },
        ) if sa.len() == sb.len() => {
            let shape = sa
                .iter()
                .zip(sb)
                .map(|(x, y)| {
                    if x.value == y.value {
                        x.clone()
                    } else {
                        Dim::unknown()
                    }
                })
                .collect();
            TypeInfo {
                ty: Type::Tensor {
                    elem: *ea,
                    shape: Some(shape),
                },
                denotation: None,
            }
        }
        (Type::Tensor { elem, .. }, _) => TypeInfo {
            ty: Type::Tensor {
                elem: *elem,
                shape: None,
            },
            denotation: None,
        },
        _ => a.clone(),
    }
}

/// Combines a declared type with an inferred one. Returns the result and, on a clash, a description.
fn merge(
    declared: &Option<TypeInfo>,
    inferred: Option<TypeInfo>,
) -> (Option<TypeInfo>, Option<String>) {
    let Some(inf) = inferred else {
        return (declared.clone(), None);
    };
    let Some(dec) = declared else {
        return (Some(inf), None);
    };
    match (&dec.ty, &inf.ty) {
        (
            Type::Tensor {
                elem: de,
                shape: ds,
            },
            Type::Tensor {
                elem: ie,
                shape: is,
            },
        ) => {
            let mut conflict = None;
            let elem = match (de, ie) {
                (Some(d), Some(i)) if d != i => {
                    conflict = Some(format!("declared {d}, inferred {i}"));
                    Some(*d)
                }
                (d, i) => d.or(*i),
            };
            let shape = match (ds, is) {
                (Some(d), Some(i)) if d.len() == i.len() => Some(
                    d.iter()
                        .zip(i)
                        .map(|(dd, id)| match (&dd.value, &id.value) {
                            (DimValue::Known(x), DimValue::Known(y)) if x != y => {
                                conflict.get_or_insert_with(|| {
                                    format!("declared dim {x}, inferred {y}")
                                });
                                dd.clone()
                            }
                            (DimValue::Known(_), _) => dd.clone(),
                            (_, DimValue::Known(_)) => Dim {
                                value: id.value.clone(),
                                denotation: dd.denotation.clone(),
                            },
                            (DimValue::Unknown, DimValue::Symbol(_)) => id.clone(),
                            _ => dd.clone(),
                        })
                        .collect(),
                ),
                (Some(d), Some(i)) => {
                    conflict.get_or_insert_with(|| {
                        format!("declared rank {}, inferred rank {}", d.len(), i.len())
                    });
                    Some(d.clone())
                }
                (d, i) => d.clone().or_else(|| i.clone()),
            };
            (
                Some(TypeInfo {
                    ty: Type::Tensor { elem, shape },
                    denotation: dec.denotation.clone(),
                }),
                conflict,
            )
        }
        (Type::Unset, _) => (Some(inf), None),
        _ => (declared.clone(), None),
    }
}

/// Infers a function call by inferring a copy of the body with the call's input types.
fn call_types(
    f: &Function,
    ins: &[Option<&TypeInfo>],
    cx: &Cx,
    depth: usize,
) -> Vec<Option<TypeInfo>> {
    if depth > 8 {
        return vec![None; f.body.outputs().len()];
    }
    let mut body = f.body.clone();
    for (i, &v) in body.inputs().to_vec().iter().enumerate() {
        if body.value(v).ty.is_none() {
            body.value_mut(v).ty = ins.get(i).copied().flatten().cloned();
        }
    }
    let fcx = Cx {
        opsets: mpopt_ir::Opsets::new(&f.opset_imports).or(&cx.opsets),
        functions: cx.functions.clone(),
    };
    let mut scratch = InferReport::default();
    infer_graph(
        &mut body,
        &fcx,
        &HashMap::default(),
        &mut scratch,
        "function",
        depth + 1,
    );
    body.outputs()
        .iter()
        .map(|&v| body.value(v).ty.clone())
        .collect()
}

fn infer_graph(
    g: &mut Graph,
    cx: &Cx,
    outer: &Outer,
    report: &mut InferReport,
    scope: &str,
    depth: usize,
) {
    let bound = g.value_bound();
    let mut consts: Vec<Option<SymTensor>> = vec![None; bound];
    let mut floats: Vec<Option<Vec<f64>>> = vec![None; bound];
    for &v in g.initializers() {
        let t = g
            .value(v)
            .initializer
            .as_deref()
            .expect("listed initializer");
        consts[v.index()] = SymTensor::from_tensor(t);
        floats[v.index()] = small_floats(t);
    }
    for &c in g.captures().to_vec().iter() {
        if let Some((ty, k)) = outer.get(g.value(c).name()) {
            if g.value(c).ty.is_none() {
                g.value_mut(c).ty = ty.clone();
            }
            consts[c.index()] = k.clone();
        }
    }
    let order: Vec<NodeId> = g.nodes().map(|(id, _)| id).collect();
    for id in order {
        infer_node(g, id, cx, report, scope, &mut consts, &mut floats, depth);
    }
}

#[allow(clippy::too_many_arguments)]
fn infer_node(
    g: &mut Graph,
    id: NodeId,
    cx: &Cx,
    report: &mut InferReport,
    scope: &str,
    consts: &mut [Option<SymTensor>],
    floats: &mut [Option<Vec<f64>>],
    depth: usize,
) {
    let node = g.node(id);
    let inputs: Vec<Option<ValueId>> = node.inputs().to_vec();
    let opset = cx.opset(&node.domain);

    // Subgraphs first: type their inputs and captures, infer them, then read their outputs.
    if node.has_subgraphs() {
        let in_types: Vec<Option<TypeInfo>> = inputs
            .iter()
            .map(|v| v.and_then(|v| g.value(v).ty.clone()))
            .collect();
        let outer: Outer = node
            .implicit_inputs()
            .iter()
            .map(|&v| {
                (
                    g.value(v).name().to_string(),
                    (g.value(v).ty.clone(), consts[v.index()].clone()),
                )
            })
            .collect();
        let op = node.op_type.clone();
        let n_in = inputs.len();
        let label_s = format!("node {}", mpopt_ir::node_label(g, id));
        let node_attrs_snapshot: Vec<(String, AttrValue)> = node
            .attributes
            .iter()
            .filter(|a| matches!(a.value, AttrValue::Int(_) | AttrValue::Ints(_)))
            .map(|a| (a.name.clone(), a.value.clone()))
            .collect();
        let mut attrs = std::mem::take(&mut g.node_mut(id).attributes);
        for a in &mut attrs {
            let attr_name = a.name.clone();
            for sg in a.value.graphs_mut() {
                if op == "Scan" || op == "SequenceMap" {
                    let ins = sg.inputs().to_vec();
                    let n_scan = if op == "Scan" {
                        int_attr_of(&node_attrs_snapshot, "num_scan_inputs").unwrap_or(0) as usize
                    } else {
                        0
                    };
                    let n_state = if op == "Scan" {
                        n_in.saturating_sub(n_scan)
                    } else {
                        0
                    };
                    let scan_axes = ints_attr_of(&node_attrs_snapshot, "scan_input_axes");
                    for (k, &v) in ins.iter().enumerate() {
                        if sg.value(v).ty.is_some() {
                            continue;
                        }
                        let Some(t) = in_types.get(k).cloned().flatten() else {
                            continue;
                        };
                        sg.value_mut(v).ty = if op == "SequenceMap" {
                            match t.ty {
                                Type::Sequence(Some(e)) => Some(*e),
                                _ => Some(t),
                            }
                        } else if k < n_state {
                            Some(t)
                        } else {
                            let ax = scan_axes
                                .as_ref()
                                .and_then(|a| a.get(k - n_state).copied())
                                .unwrap_or(0);
                            Some(drop_axis(&t, ax))
                        };
                    }
                }
                if op == "Loop" {
                    // A carried value may change shape from one iteration to the next. Infer a scratch copy
                    // with the initial shapes; keep only the dims the body leaves as they were.
                    let mut trial = sg.clone();
                    let trial_ins = trial.inputs().to_vec();
                    for (k, t) in in_types.iter().enumerate().skip(2) {
                        if let Some(&v) = trial_ins.get(k)
                            && trial.value(v).ty.is_none()
                        {
                            trial.value_mut(v).ty = t.clone();
                        }
                    }
                    infer_graph(
                        &mut trial,
                        cx,
                        &outer,
                        &mut InferReport::default(),
                        scope,
                        depth,
                    );
                    let mut types = vec![
                        Some(tensor_type(DType::I64, Some(vec![]))),
                        Some(tensor_type(DType::Bool, Some(vec![]))),
                    ];
                    for (k, init) in in_types.iter().enumerate().skip(2) {
                        let after = trial
                            .outputs()
                            .get(k - 1)
                            .and_then(|&v| trial.value(v).ty.clone());
                        types.push(match (init.clone(), after) {
                            (Some(a), Some(b)) => Some(merge_branches(&a, &b)),
                            (a, _) => a.map(|t| strip_shape(&t)),
                        });
                    }
                    for (k, &v) in sg.inputs().to_vec().iter().enumerate() {
                        if sg.value(v).ty.is_none() {
                            sg.value_mut(v).ty = types.get(k).cloned().flatten();
                        }
                    }
                }
                let sub_scope = format!("{scope} / {label_s} / {attr_name}");
                infer_graph(sg, cx, &outer, report, &sub_scope, depth);
            }
        }
        g.node_mut(id).attributes = attrs;
    }

    let node = g.node(id);
    let n_out = node.outputs().len();
    // Borrowed, not cloned: reading the inputs' types is the hot path on large graphs.
    let in_types: Vec<Option<&TypeInfo>> = inputs
        .iter()
        .map(|v| v.and_then(|v| g.value(v).ty.as_ref()))
        .collect();
    let schema = registry().get(&node.domain, &node.op_type, opset);
    let mut out_types: Vec<Option<TypeInfo>> = vec![None; n_out];
    let mut out_consts: Vec<Option<SymTensor>> = vec![None; n_out];
    let mut out_floats: Vec<Option<Vec<f64>>> = vec![None; n_out];
    let is_default = node.in_default_domain();

    if node.domain == "ai.onnx.preview.training" && node.op_type == "Gradient" {
        // the gradient with respect to each value named in `xs` has that value's type
        if let Some(AttrValue::Strings(xs)) = node.attr("xs").map(|a| &a.value) {
            for (o, name) in xs.iter().enumerate().take(n_out) {
                let v = g.value_by_name(&String::from_utf8_lossy(name));
                out_types[o] = v.and_then(|v| g.value(v).ty.clone());
            }
        }
    } else if is_default && node.op_type == "Constant" {
        if let Some((t, c, f)) = constant_output(node) {
            out_types[0] = Some(t);
            out_consts[0] = c;
            out_floats[0] = f;
        }
    } else if let Some(t) = is_default
        .then(|| control_flow_types(node, &in_types))
        .flatten()
    {
        for (o, ty) in t.into_iter().enumerate().take(n_out) {
            out_types[o] = ty;
        }
    } else if let Some(f) = (!cx.functions.is_empty())
        .then(|| {
            cx.functions
                .get(&(node.domain.clone(), node.op_type.clone()))
        })
        .flatten()
    {
        out_types = call_types(f, &in_types, cx, depth);
        out_types.resize(n_out, None);
    } else if let Some(s) = schema {
        let elems = schema_types(s, node, &in_types, opset);
        let view = NodeView {
            node,
            opset,
            shapes: in_types
                .iter()
                .map(|t| t.and_then(TypeInfo::tensor_shape))
                .collect(),
            consts: inputs
                .iter()
                .map(|v| v.and_then(|v| consts[v.index()].as_ref()))
                .collect(),
            floats: inputs
                .iter()
                .map(|v| v.and_then(|v| floats[v.index()].as_deref()))
                .collect(),
            n_out,
        };
        let shapes = shape_rules::shapes(&view);
        out_consts[0] = shape_rules::fold(&view);
        for (o, slot) in out_types.iter_mut().enumerate() {
            *slot = match (
                elems.get(o).cloned().flatten(),
                shapes.get(o).cloned().flatten(),
            ) {
                (
                    Some(TypeInfo {
                        ty: Type::Tensor { elem, .. },
                        denotation,
                    }),
                    shape,
                ) => Some(TypeInfo {
                    ty: Type::Tensor { elem, shape },
                    denotation,
                }),
                (Some(t), _) => Some(t),
                (None, _) => None,
            };
        }
    } else {
        let declared = node
            .outputs()
            .iter()
            .flatten()
            .all(|&v| g.value(v).ty.is_some());
        if !declared {
            *report.unknown_ops.entry(node.qualified_op()).or_default() += 1;
        }
    }

    let outputs: Vec<Option<ValueId>> = g.node(id).outputs().to_vec();
    for (o, v) in outputs.iter().enumerate() {
        let Some(v) = *v else { continue };
        let (merged, conflict) = merge(&g.value(v).ty, out_types[o].take());
        if let Some(c) = conflict {
            report.conflicts.push(format!(
                "{scope}: '{}' (output of node {}): {c}",
                g.value(v).name(),
                mpopt_ir::node_label(g, id)
            ));
        }
        g.value_mut(v).ty = merged;
        if let Some(c) = out_consts[o].take() {
            consts[v.index()] = Some(c);
        }
        if let Some(f) = out_floats[o].take() {
            floats[v.index()] = Some(f);
        }
        report.values += 1;
        let ty = g.value(v).ty.as_ref();
        let has_elem = ty.is_some_and(|t| match &t.ty {
            Type::Tensor { elem, .. } | Type::SparseTensor { elem, .. } => elem.is_some(),
            Type::Unset => false,
            _ => true,
        });
        if has_elem {
            report.typed += 1;
        } else {
            report.untyped.push(format!(
                "{scope}: '{}' (output of node {})",
                g.value(v).name(),
                mpopt_ir::node_label(g, id)
            ));
        }
        if let Some(s) = ty.and_then(TypeInfo::tensor_shape) {
            report.shaped += 1;
            if s.iter().all(|d| d.value.as_known().is_some()) {
                report.fully_shaped += 1;
            }
        }
    }
}

/// Lists every typed value that is neither a graph input nor a graph output in `value_info`, in every graph and
/// subgraph, so that the written model carries what inference found (what `onnx.shape_inference` does).
pub fn record_value_info(model: &mut Model) {
    fn rec(g: &mut Graph) {
        let ids: Vec<NodeId> = g.nodes().map(|(id, _)| id).collect();
        for id in ids {
            let outs: Vec<ValueId> = g.node(id).outputs().iter().flatten().copied().collect();
            for v in outs {
                let typed = g.value(v).ty.as_ref().is_some_and(|t| t.ty != Type::Unset);
                if typed && !g.outputs().contains(&v) {
                    g.add_value_info(v);
                }
            }
        }
        g.for_each_subgraph_mut(|_, _, sg| rec(sg));
    }
    rec(&mut model.graph);
}
