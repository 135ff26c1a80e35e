//! `ModelProto` → [`Model`].
//!
//! Names are resolved per scope: a name used in a graph but not defined there becomes a capture of that graph,
//! and the node owning the subgraph lists it as an implicit input, resolved one scope up in turn. A name still
//! unresolved in the main graph (or a function body) is a dangling reference and an error.

use bytes::Bytes;
use mpopt_ir::{
    AttrValue, Attribute, DType, Dim, DimValue, Function, Graph, Model, Node, Opaque, OpsetImport,
    SparseTensor, TensorAnnotation, TensorData, Type, TypeInfo, ValueId,
};
use prost::Message;

use crate::external::Reader;
use crate::pb;

type R<T> = Result<T, String>;

fn s(o: Option<String>) -> String {
    o.unwrap_or_default()
}

fn props(v: Vec<pb::StringStringEntryProto>) -> Vec<(String, String)> {
    v.into_iter().map(|e| (s(e.key), s(e.value))).collect()
}

fn opsets(v: Vec<pb::OperatorSetIdProto>) -> Vec<OpsetImport> {
    v.into_iter()
        .map(|o| OpsetImport {
            domain: s(o.domain),
            version: o.version.unwrap_or(0),
        })
        .collect()
}

pub(crate) fn model(m: pb::ModelProto, ext: &mut Reader) -> R<Model> {
    let gp = m.graph.ok_or("the model has no graph")?;
    let mut graph = graph(gp, ext, true)?;
    capture_types(&mut graph);
    let mut functions = Vec::with_capacity(m.functions.len());
    for f in m.functions {
        functions.push(function(f, ext)?);
    }
    Ok(Model {
        ir_version: m.ir_version.unwrap_or(0),
        opset_imports: opsets(m.opset_import),
        producer_name: s(m.producer_name),
        producer_version: s(m.producer_version),
        domain: s(m.domain),
        model_version: m.model_version.unwrap_or(0),
        doc_string: s(m.doc_string),
        metadata_props: props(m.metadata_props),
        graph,
        functions,
        training_info: m
            .training_info
            .into_iter()
            .map(|t| Opaque(Bytes::from(t.encode_to_vec())))
            .collect(),
        configuration: m
            .configuration
            .into_iter()
            .map(|t| Opaque(Bytes::from(t.encode_to_vec())))
            .collect(),
    })
}

fn function(f: pb::FunctionProto, ext: &mut Reader) -> R<Function> {
    let name = s(f.name);
    let ctx = |e: String| format!("function '{name}': {e}");
    let mut body = Graph::new(name.clone());
    for i in &f.input {
        body.add_input(i.clone(), None)
            .map_err(|e| ctx(e.to_string()))?;
    }
    let mut attribute_defaults = Vec::new();
    for a in f.attribute_proto {
        attribute_defaults.push(attribute(a, ext).map_err(ctx)?);
    }
    nodes(&mut body, f.node, ext, true).map_err(ctx)?;
    for o in &f.output {
        let v = resolve(&mut body, o, true).map_err(|e| ctx(format!("function output: {e}")))?;
        body.add_output(v);
    }
    value_infos(&mut body, f.value_info)?;
    Ok(Function {
        name,
        domain: s(f.domain),
        overload: s(f.overload),
        attributes: f.attribute,
        attribute_defaults,
        body,
        opset_imports: opsets(f.opset_import),
        doc_string: s(f.doc_string),
        metadata_props: props(f.metadata_props),
    })
}

/// Gives every capture without a declared type the type of the value it reads, scope by scope from the top.
fn capture_types(g: &mut Graph) {
    let ids: Vec<mpopt_ir::NodeId> = g
        .nodes()
        .filter(|(_, n)| n.has_subgraphs())
        .map(|(id, _)| id)
        .collect();
    for id in ids {
        let outer: Vec<(String, Option<TypeInfo>)> = g
            .node(id)
            .implicit_inputs()
            .iter()
            .map(|&v| (g.value(v).name().to_string(), g.value(v).ty.clone()))
            .collect();
        for a in &mut g.node_mut(id).attributes {
            for sg in a.value.graphs_mut() {
                for (name, ty) in &outer {
                    if let Some(c) = sg.value_by_name(name)
                        && sg.value(c).ty.is_none()
                    {
                        sg.value_mut(c).ty = ty.clone();
                    }
                }
                capture_types(sg);
            }
        }
    }
}

/// Looks a name up in the graph; an unknown name becomes a capture unless `top`.
fn resolve(g: &mut Graph, name: &str, top: bool) -> R<ValueId> {
    if let Some(v) = g.value_by_name(name) {
        return Ok(v);
    }
    if top {
        return Err(format!("'{name}', which is never defined"));
    }
    g.add_capture(name).map_err(|e| e.to_string())
}

fn graph(gp: pb::GraphProto, ext: &mut Reader, top: bool) -> R<Graph> {
    let mut g = Graph::new(s(gp.name));
    let outputs: usize = gp.node.iter().map(|n| n.output.len()).sum();
    // with room for what a conversion adds (casts and their values): growing the node and value arrays
    // later moved each whole into fresh memory, two more 2 MiB pages for the kernel to zero on vit_tiny
    let room = |n: usize| n + n / 8 + 64;
    g.reserve(
        room(gp.node.len()),
        room(gp.input.len() + gp.initializer.len() + outputs),
    );
    let gname = g.name.clone();
    let ctx = |e: String| format!("graph '{gname}': {e}");
    g.doc_string = s(gp.doc_string);
    g.metadata_props = props(gp.metadata_props);
    g.quantization_annotation = gp
        .quantization_annotation
        .into_iter()
        .map(|a| TensorAnnotation {
            tensor_name: s(a.tensor_name),
            quant_parameter_tensor_names: props(a.quant_parameter_tensor_names),
        })
        .collect();
    for vi in &gp.input {
        let name = vi.name.clone().unwrap_or_default();
        let ty = vi
            .r#type
            .clone()
            .map(type_info)
            .transpose()
            .map_err(|e| ctx(format!("input '{name}': {e}")))?;
        let v = g
            .add_input(name.clone(), ty)
            .map_err(|_| ctx(format!("input '{name}' is declared twice")))?;
        value_meta(&mut g, v, vi);
    }
    for tp in gp.initializer {
        let name = s(tp.name.clone());
        let t = tensor(tp, ext).map_err(|e| ctx(format!("initializer '{name}': {e}")))?;
        let v = match g.value_by_name(&name) {
            Some(v) if g.value(v).initializer.is_none() => v,
            Some(_) => return Err(ctx(format!("initializer '{name}' is defined twice"))),
            None => g
                .add_value(name.clone(), None)
                .map_err(|e| ctx(e.to_string()))?,
        };
        if g.value(v).ty.is_none() {
            g.value_mut(v).ty = Some(TypeInfo::tensor(
                t.dtype,
                Some(t.dims.iter().map(|&d| Dim::known(d)).collect()),
            ));
        }
        g.set_initializer(v, t).map_err(|e| ctx(e.to_string()))?;
    }
    for sp in gp.sparse_initializer {
        let st = sparse(sp, ext).map_err(ctx)?;
        let name = st.values.name.clone();
        let v = match g.value_by_name(&name) {
            Some(v) => v,
            None => g
                .add_value(name.clone(), None)
                .map_err(|e| ctx(e.to_string()))?,
        };
        g.set_sparse_initializer(v, st)
            .map_err(|_| ctx(format!("sparse initializer '{name}' is defined twice")))?;
    }
    nodes(&mut g, gp.node, ext, top).map_err(ctx)?;
    for vi in &gp.output {
        let name = vi.name.clone().unwrap_or_default();
        let v = resolve(&mut g, &name, top).map_err(|e| ctx(format!("graph output {e}")))?;
        if g.value(v).ty.is_none() {
            g.value_mut(v).ty = vi
                .r#type
                .clone()
                .map(type_info)
                .transpose()
                .map_err(|e| ctx(format!("output '{name}': {e}")))?;
        }
        value_meta(&mut g, v, vi);
        g.add_output(v);
    }
    value_infos(&mut g, gp.value_info)?;
    Ok(g)
}

fn value_meta(g: &mut Graph, v: ValueId, vi: &pb::ValueInfoProto) {
    let val = g.value_mut(v);
    if let Some(d) = &vi.doc_string {
        val.doc_string = d.clone();
    }
    if !vi.metadata_props.is_empty() {
        val.metadata_props = props(vi.metadata_props.clone());
    }
}

fn value_infos(g: &mut Graph, vis: Vec<pb::ValueInfoProto>) -> R<()> {
    for vi in vis {
        let name = vi.name.clone().unwrap_or_default();
        let ty = vi
            .r#type
            .clone()
            .map(type_info)
            .transpose()
            .map_err(|e| format!("value_info '{name}': {e}"))?;
        // A value_info entry for a name the graph does not define is kept as a detached value.
        let v = match g.value_by_name(&name) {
            Some(v) => v,
            None => g
                .add_value(name.clone(), None)
                .map_err(|e| format!("value_info: {e}"))?,
        };
        if ty.is_some() {
            g.value_mut(v).ty = ty;
        }
        value_meta(g, v, &vi);
        g.add_value_info(v);
    }
    Ok(())
}

fn nodes(g: &mut Graph, nps: Vec<pb::NodeProto>, ext: &mut Reader, top: bool) -> R<()> {
    // All outputs first, so that a use before the definition resolves locally and the verifier can name it.
    let mut outs: Vec<Vec<Option<ValueId>>> = Vec::with_capacity(nps.len());
    for np in &nps {
        let mut o = Vec::with_capacity(np.output.len());
        for name in &np.output {
            if name.is_empty() {
                o.push(None);
                continue;
            }
            let v = g.add_value(name.clone(), None).map_err(|_| {
                format!(
                    "value '{name}' is defined twice (again by node '{}')",
                    np.name.as_deref().unwrap_or("")
                )
            })?;
            o.push(Some(v));
        }
        outs.push(o);
    }
    for (np, outputs) in nps.into_iter().zip(outs) {
        let mut node = Node::new(s(np.op_type));
        node.name = s(np.name);
        node.domain = s(np.domain);
        node.overload = s(np.overload);
        node.doc_string = s(np.doc_string);
        node.metadata_props = props(np.metadata_props);
        node.device_configurations = np
            .device_configurations
            .into_iter()
            .map(|d| Opaque(Bytes::from(d.encode_to_vec())))
            .collect();
        for a in np.attribute {
            node.attributes
                .push(attribute(a, ext).map_err(|e| format!("{}: {e}", label(&node)))?);
        }
        let mut inputs = Vec::with_capacity(np.input.len());
        for name in &np.input {
            inputs.push(if name.is_empty() {
                None
            } else {
                Some(resolve(g, name, top).map_err(|e| format!("{} reads {e}", label(&node)))?)
            });
        }
        // Implicit inputs: every distinct name the subgraphs capture, resolved here.
        let mut implicit = Vec::new();
        for name in node.captured_names() {
            implicit.push(
                resolve(g, &name, top)
                    .map_err(|e| format!("{}: a subgraph reads {e}", label(&node)))?,
            );
        }
        let n = g
            .add_node(node, &inputs, &outputs)
            .map_err(|e| e.to_string())?;
        if !implicit.is_empty() {
            g.set_implicit_inputs(n, implicit);
        }
    }
    Ok(())
}

/// A node as error messages name it (built only when an error is reported).
fn label(n: &Node) -> String {
    if n.name.is_empty() {
        format!("a {} node", n.op_type)
    } else {
        format!("node '{}' ({})", n.name, n.op_type)
    }
}

fn attribute(a: pb::AttributeProto, ext: &mut Reader) -> R<Attribute> {
    use pb::attribute_proto::AttributeType as T;
    let name = s(a.name);
    let ctx = |e: String| format!("attribute '{name}': {e}");
    let mut kind = a
        .r#type
        .and_then(|t| T::try_from(t).ok())
        .unwrap_or(T::Undefined);
    if kind == T::Undefined {
        // Files older than IR 0.0.2 carry no discriminator: take the field that is set.
        kind = if a.f.is_some() {
            T::Float
        } else if a.i.is_some() {
            T::Int
        } else if a.s.is_some() {
            T::String
        } else if a.t.is_some() {
            T::Tensor
        } else if a.g.is_some() {
            T::Graph
        } else if a.sparse_tensor.is_some() {
            T::SparseTensor
        } else if a.tp.is_some() {
            T::TypeProto
        } else if !a.floats.is_empty() {
            T::Floats
        } else if !a.ints.is_empty() {
            T::Ints
        } else if !a.strings.is_empty() {
            T::Strings
        } else if !a.tensors.is_empty() {
            T::Tensors
        } else if !a.graphs.is_empty() {
            T::Graphs
        } else if !a.sparse_tensors.is_empty() {
            T::SparseTensors
        } else if !a.type_protos.is_empty() {
            T::TypeProtos
        } else {
            return Err(ctx("has no type and no value".into()));
        };
    }
    if a.ref_attr_name.is_some() {
        // A reference (inside a function body) carries its kind but no value.
        let kind_name = match kind {
            T::Float => "float",
            T::Int => "int",
            T::String => "string",
            T::Tensor => "tensor",
            T::Graph => "graph",
            T::SparseTensor => "sparse_tensor",
            T::TypeProto => "type",
            T::Floats => "floats",
            T::Ints => "ints",
            T::Strings => "strings",
            T::Tensors => "tensors",
            T::Graphs => "graphs",
            T::SparseTensors => "sparse_tensors",
            T::TypeProtos => "types",
            T::Undefined => unreachable!("resolved above"),
        };
        let value = AttrValue::placeholder(kind_name).expect("every kind has a placeholder");
        return Ok(Attribute {
            name,
            value,
            ref_attr_name: a.ref_attr_name,
            doc_string: s(a.doc_string),
        });
    }
    let missing = || ctx(format!("declared {kind:?} but holds no such value"));
    let value = match kind {
        T::Float => AttrValue::Float(a.f.unwrap_or_default()),
        T::Int => AttrValue::Int(a.i.unwrap_or_default()),
        T::String => AttrValue::String(a.s.unwrap_or_default()),
        T::Tensor => match a.t {
            Some(t) => AttrValue::Tensor(Box::new(tensor(*t, ext).map_err(ctx)?)),
            None => return Err(missing()),
        },
        T::Graph => match a.g {
            Some(gp) => AttrValue::Graph(Box::new(graph(*gp, ext, false).map_err(ctx)?)),
            None => return Err(missing()),
        },
        T::SparseTensor => match a.sparse_tensor {
            Some(sp) => AttrValue::SparseTensor(Box::new(sparse(*sp, ext).map_err(ctx)?)),
            None => return Err(missing()),
        },
        T::TypeProto => match a.tp {
            Some(tp) => AttrValue::Type(type_info(*tp).map_err(ctx)?),
            None => return Err(missing()),
        },
        T::Floats => AttrValue::Floats(a.floats),
        T::Ints => AttrValue::Ints(a.ints),
        T::Strings => AttrValue::Strings(a.strings),
        T::Tensors => AttrValue::Tensors(
            a.tensors
                .into_iter()
                .map(|t| tensor(t, ext))
                .collect::<R<_>>()
                .map_err(ctx)?,
        ),
        T::Graphs => AttrValue::Graphs(
            a.graphs
                .into_iter()
                .map(|gp| graph(gp, ext, false))
                .collect::<R<_>>()
                .map_err(ctx)?,
        ),
        T::SparseTensors => AttrValue::SparseTensors(
            a.sparse_tensors
                .into_iter()
                .map(|sp| sparse(sp, ext))
                .collect::<R<_>>()
                .map_err(ctx)?,
        ),
        T::TypeProtos => AttrValue::Types(
            a.type_protos
                .into_iter()
                .map(type_info)
                .collect::<R<_>>()
                .map_err(ctx)?,
        ),
        T::Undefined => unreachable!("resolved above"),
    };
    Ok(Attribute {
        name,
        value,
        ref_attr_name: a.ref_attr_name,
        doc_string: s(a.doc_string),
    })
}

fn dtype(code: Option<i32>, what: &str) -> R<DType> {
    let c = code.unwrap_or(0);
    DType::from_code(c).ok_or_else(|| {
        if c == 0 {
            format!("{what} has no data type (UNDEFINED)")
        } else {
            format!("{what} has unknown data type {c}")
        }
    })
}

pub(crate) fn tensor(t: pb::TensorProto, ext: &mut Reader) -> R<mpopt_ir::Tensor> {
    let name = s(t.name);
    let dt = dtype(t.data_type, "tensor")?;
    if t.segment.is_some() {
        return Err("segmented tensors (TensorProto.segment) are not supported".into());
    }
    let mut external = None;
    let data = if t.data_location == Some(pb::tensor_proto::DataLocation::External as i32) {
        let (bytes, origin) = ext.read(&props(t.external_data))?;
        external = Some(origin);
        TensorData::Raw(bytes)
    } else if let Some(raw) = t.raw_data {
        TensorData::Raw(raw)
    } else if !t.float_data.is_empty() {
        TensorData::Floats(t.float_data)
    } else if !t.int32_data.is_empty() {
        TensorData::Int32s(t.int32_data)
    } else if !t.int64_data.is_empty() {
        TensorData::Int64s(t.int64_data)
    } else if !t.double_data.is_empty() {
        TensorData::Doubles(t.double_data)
    } else if !t.uint64_data.is_empty() {
        TensorData::Uint64s(t.uint64_data)
    } else if !t.string_data.is_empty() || dt == DType::Str {
        TensorData::Strings(t.string_data)
    } else {
        TensorData::Raw(Bytes::new())
    };
    Ok(mpopt_ir::Tensor {
        dtype: dt,
        dims: t.dims,
        data,
        name,
        doc_string: s(t.doc_string),
        metadata_props: props(t.metadata_props),
        external,
    })
}

fn sparse(sp: pb::SparseTensorProto, ext: &mut Reader) -> R<SparseTensor> {
    let values = tensor(sp.values.ok_or("sparse tensor without values")?, ext)?;
    let indices = tensor(sp.indices.ok_or("sparse tensor without indices")?, ext)?;
    Ok(SparseTensor {
        values,
        indices,
        dims: sp.dims,
    })
}

fn shape(sp: pb::TensorShapeProto) -> Vec<Dim> {
    use pb::tensor_shape_proto::dimension::Value as V;
    sp.dim
        .into_iter()
        .map(|d| Dim {
            value: match d.value {
                Some(V::DimValue(n)) => DimValue::Known(n),
                Some(V::DimParam(p)) => DimValue::Symbol(p),
                None => DimValue::Unknown,
            },
            denotation: d.denotation,
        })
        .collect()
}

fn elem(code: Option<i32>) -> R<Option<DType>> {
    match code.unwrap_or(0) {
        0 => Ok(None),
        c => DType::from_code(c)
            .map(Some)
            .ok_or_else(|| format!("unknown data type {c}")),
    }
}

pub(crate) fn type_info(tp: pb::TypeProto) -> R<TypeInfo> {
    use pb::type_proto::Value as V;
    let boxed = |t: Option<Box<pb::TypeProto>>| -> R<Option<Box<TypeInfo>>> {
        t.map(|t| type_info(*t).map(Box::new)).transpose()
    };
    let ty = match tp.value {
        Some(V::TensorType(t)) => Type::Tensor {
            elem: elem(t.elem_type)?,
            shape: t.shape.map(shape),
        },
        Some(V::SparseTensorType(t)) => Type::SparseTensor {
            elem: elem(t.elem_type)?,
            shape: t.shape.map(shape),
        },
        Some(V::SequenceType(t)) => Type::Sequence(boxed(t.elem_type)?),
        Some(V::MapType(t)) => Type::Map {
            key: elem(t.key_type)?,
            value: boxed(t.value_type)?,
        },
        Some(V::OptionalType(t)) => Type::Optional(boxed(t.elem_type)?),
        Some(V::OpaqueType(t)) => Type::Opaque {
            domain: s(t.domain),
            name: s(t.name),
        },
        None => Type::Unset,
    };
    Ok(TypeInfo {
        ty,
        denotation: tp.denotation,
    })
}
