//! [`Model`] → `ModelProto`. Tensor bytes are shared (`Bytes` clones), not copied.

use bytes::Bytes;
use mpopt_ir::{
    AttrValue, Attribute, DimValue, Graph, Model, Opaque, SparseTensor, TensorData, Type, TypeInfo,
};
use prost::Message;

use crate::external::Writer;
use crate::pb;
use crate::stream::Deferred;

/// Where export puts tensor data that does not go inline as it is.
#[derive(Default)]
pub(crate) struct Sink<'a> {
    /// Large tensors' data, to the external data file.
    pub(crate) external: Option<&'a mut Writer>,
    /// Narrowed tensors as placeholders that the streaming save converts into the file; `None`: they are
    /// converted here ([`mpopt_ir::Narrowed::materialized`]).
    pub(crate) deferred: Option<&'a mut Deferred>,
}

type R<T> = Result<T, String>;

fn opt(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

fn props(v: &[(String, String)]) -> Vec<pb::StringStringEntryProto> {
    v.iter()
        .map(|(k, val)| pb::StringStringEntryProto {
            key: Some(k.clone()),
            value: Some(val.clone()),
        })
        .collect()
}

fn opsets(v: &[mpopt_ir::OpsetImport]) -> Vec<pb::OperatorSetIdProto> {
    v.iter()
        .map(|o| pb::OperatorSetIdProto {
            domain: Some(o.domain.clone()),
            version: Some(o.version),
        })
        .collect()
}

fn opaque<M: Message + Default>(o: &Opaque, what: &str) -> R<M> {
    M::decode(o.0.clone()).map_err(|e| format!("kept {what} no longer decodes: {e}"))
}

pub(crate) fn model(m: &Model, mut sink: Sink<'_>) -> R<pb::ModelProto> {
    let graph = graph(&m.graph, &mut sink)?;
    let mut functions = Vec::with_capacity(m.functions.len());
    for f in &m.functions {
        functions.push(pb::FunctionProto {
            name: Some(f.name.clone()),
            input: f
                .body
                .inputs()
                .iter()
                .map(|&v| f.body.value(v).name().to_string())
                .collect(),
            output: f
                .body
                .outputs()
                .iter()
                .map(|&v| f.body.value(v).name().to_string())
                .collect(),
            attribute: f.attributes.clone(),
            attribute_proto: f
                .attribute_defaults
                .iter()
                .map(|a| attribute(a, &mut sink))
                .collect::<R<_>>()?,
            node: nodes(&f.body, &mut sink).map_err(|e| format!("function '{}': {e}", f.name))?,
            doc_string: opt(&f.doc_string),
            opset_import: opsets(&f.opset_imports),
            domain: opt(&f.domain),
            overload: opt(&f.overload),
            value_info: f
                .body
                .value_info()
                .iter()
                .map(|&v| value_info(&f.body, v))
                .collect(),
            metadata_props: props(&f.metadata_props),
        });
    }
    Ok(pb::ModelProto {
        ir_version: Some(m.ir_version),
        opset_import: opsets(&m.opset_imports),
        producer_name: opt(&m.producer_name),
        producer_version: opt(&m.producer_version),
        domain: opt(&m.domain),
        model_version: (m.model_version != 0).then_some(m.model_version),
        doc_string: opt(&m.doc_string),
        graph: Some(graph),
        metadata_props: props(&m.metadata_props),
        training_info: m
            .training_info
            .iter()
            .map(|t| opaque(t, "training info"))
            .collect::<R<_>>()?,
        functions,
        configuration: m
            .configuration
            .iter()
            .map(|t| opaque(t, "device configuration"))
            .collect::<R<_>>()?,
    })
}

fn value_info(g: &Graph, v: mpopt_ir::ValueId) -> pb::ValueInfoProto {
    let val = g.value(v);
    pb::ValueInfoProto {
        name: Some(val.name().to_string()),
        r#type: val.ty.as_ref().map(type_proto),
        doc_string: opt(&val.doc_string),
        metadata_props: props(&val.metadata_props),
    }
}

fn graph(g: &Graph, sink: &mut Sink<'_>) -> R<pb::GraphProto> {
    let ctx = |e: String| format!("graph '{}': {e}", g.name);
    let mut initializer = Vec::with_capacity(g.initializers().len());
    for &v in g.initializers() {
        let val = g.value(v);
        let t = val.initializer.as_ref().expect("listed initializer");
        let mut tp =
            tensor(t, sink).map_err(|e| ctx(format!("initializer '{}': {e}", val.name())))?;
        tp.name = Some(val.name().to_string());
        initializer.push(tp);
    }
    let mut sparse_initializer = Vec::new();
    for &v in g.sparse_initializers() {
        let val = g.value(v);
        let mut sp = sparse(
            val.sparse_initializer
                .as_ref()
                .expect("listed sparse initializer"),
            sink,
        )
        .map_err(ctx)?;
        if let Some(values) = &mut sp.values {
            values.name = Some(val.name().to_string());
        }
        sparse_initializer.push(sp);
    }
    Ok(pb::GraphProto {
        node: nodes(g, sink).map_err(ctx)?,
        name: opt(&g.name),
        initializer,
        sparse_initializer,
        doc_string: opt(&g.doc_string),
        input: g.inputs().iter().map(|&v| value_info(g, v)).collect(),
        output: g.outputs().iter().map(|&v| value_info(g, v)).collect(),
        value_info: g.value_info().iter().map(|&v| value_info(g, v)).collect(),
        quantization_annotation: g
            .quantization_annotation
            .iter()
            .map(|a| pb::TensorAnnotation {
                tensor_name: Some(a.tensor_name.clone()),
                quant_parameter_tensor_names: props(&a.quant_parameter_tensor_names),
            })
            .collect(),
        metadata_props: props(&g.metadata_props),
    })
}

fn nodes(g: &Graph, sink: &mut Sink<'_>) -> R<Vec<pb::NodeProto>> {
    let name = |v: &Option<mpopt_ir::ValueId>| {
        v.map(|v| g.value(v).name().to_string()).unwrap_or_default()
    };
    let mut out = Vec::with_capacity(g.node_count());
    for (_, n) in g.nodes() {
        let mut attribute = Vec::with_capacity(n.attributes.len());
        for a in &n.attributes {
            attribute.push(attribute_proto(a, sink, n)?);
        }
        out.push(pb::NodeProto {
            input: n.inputs().iter().map(name).collect(),
            output: n.outputs().iter().map(name).collect(),
            name: opt(&n.name),
            op_type: Some(n.op_type.clone()),
            domain: opt(&n.domain),
            overload: opt(&n.overload),
            attribute,
            doc_string: opt(&n.doc_string),
            metadata_props: props(&n.metadata_props),
            device_configurations: n
                .device_configurations
                .iter()
                .map(|d| opaque(d, "node device configuration"))
                .collect::<R<_>>()?,
        });
    }
    Ok(out)
}

fn attribute_proto(
    a: &Attribute,
    sink: &mut Sink<'_>,
    n: &mpopt_ir::Node,
) -> R<pb::AttributeProto> {
    attribute(a, sink).map_err(|e| {
        format!(
            "node '{}' ({}) attribute '{}': {e}",
            n.name, n.op_type, a.name
        )
    })
}

fn attribute(a: &Attribute, sink: &mut Sink<'_>) -> R<pb::AttributeProto> {
    use pb::attribute_proto::AttributeType as T;
    let mut p = pb::AttributeProto {
        name: Some(a.name.clone()),
        ref_attr_name: a.ref_attr_name.clone(),
        doc_string: opt(&a.doc_string),
        ..Default::default()
    };
    let kind = match &a.value {
        AttrValue::Float(_) => T::Float,
        AttrValue::Int(_) => T::Int,
        AttrValue::String(_) => T::String,
        AttrValue::Tensor(_) => T::Tensor,
        AttrValue::Graph(_) => T::Graph,
        AttrValue::SparseTensor(_) => T::SparseTensor,
        AttrValue::Type(_) => T::TypeProto,
        AttrValue::Floats(_) => T::Floats,
        AttrValue::Ints(_) => T::Ints,
        AttrValue::Strings(_) => T::Strings,
        AttrValue::Tensors(_) => T::Tensors,
        AttrValue::Graphs(_) => T::Graphs,
        AttrValue::SparseTensors(_) => T::SparseTensors,
        AttrValue::Types(_) => T::TypeProtos,
    };
    p.r#type = Some(kind as i32);
    if a.ref_attr_name.is_some() {
        return Ok(p);
    }
    match &a.value {
        AttrValue::Float(f) => p.f = Some(*f),
        AttrValue::Int(i) => p.i = Some(*i),
        AttrValue::String(s) => p.s = Some(s.clone()),
        AttrValue::Tensor(t) => p.t = Some(Box::new(tensor(t, sink)?)),
        AttrValue::Graph(g) => p.g = Some(Box::new(graph(g, sink)?)),
        AttrValue::SparseTensor(sp) => p.sparse_tensor = Some(Box::new(sparse(sp, sink)?)),
        AttrValue::Type(t) => p.tp = Some(Box::new(type_proto(t))),
        AttrValue::Floats(v) => p.floats = v.clone(),
        AttrValue::Ints(v) => p.ints = v.clone(),
        AttrValue::Strings(v) => p.strings = v.clone(),
        AttrValue::Tensors(v) => p.tensors = v.iter().map(|t| tensor(t, sink)).collect::<R<_>>()?,
        AttrValue::Graphs(v) => p.graphs = v.iter().map(|g| graph(g, sink)).collect::<R<_>>()?,
        AttrValue::SparseTensors(v) => {
            p.sparse_tensors = v.iter().map(|s| sparse(s, sink)).collect::<R<_>>()?
        }
        AttrValue::Types(v) => p.type_protos = v.iter().map(type_proto).collect(),
    }
    Ok(p)
}

fn sparse(sp: &SparseTensor, sink: &mut Sink<'_>) -> R<pb::SparseTensorProto> {
    // Sparse parts stay inline and converted: they are small by nature, and external sparse data is rare in
    // the wild.
    let _ = sink;
    Ok(pb::SparseTensorProto {
        values: Some(tensor(&sp.values, &mut Sink::default())?),
        indices: Some(tensor(&sp.indices, &mut Sink::default())?),
        dims: sp.dims.clone(),
    })
}

pub(crate) fn tensor(t: &mpopt_ir::Tensor, sink: &mut Sink<'_>) -> R<pb::TensorProto> {
    let mut p = pb::TensorProto {
        dims: t.dims.clone(),
        data_type: Some(t.dtype.code()),
        name: opt(&t.name),
        doc_string: opt(&t.doc_string),
        metadata_props: props(&t.metadata_props),
        ..Default::default()
    };
    if let Some(w) = sink.external.as_deref_mut()
        && t.byte_size() >= w.threshold
        && let Some(raw) = raw_bytes(&t.data, &mut sink.deferred)
    {
        p.external_data = props(&w.place(raw));
        p.data_location = Some(pb::tensor_proto::DataLocation::External as i32);
        return Ok(p);
    }
    match &t.data {
        TensorData::Narrowed(n) => p.raw_data = Some(narrowed(n, &mut sink.deferred)),
        TensorData::Raw(b) => p.raw_data = Some(b.clone()),
        TensorData::Floats(v) => p.float_data = v.clone(),
        TensorData::Doubles(v) => p.double_data = v.clone(),
        TensorData::Int32s(v) => p.int32_data = v.clone(),
        TensorData::Int64s(v) => p.int64_data = v.clone(),
        TensorData::Uint64s(v) => p.uint64_data = v.clone(),
        TensorData::Strings(v) => p.string_data = v.clone(),
        TensorData::Elided => {
            return Err(
                "tensor data was elided (IR text without data) and cannot be written".into(),
            );
        }
    }
    Ok(p)
}

/// A narrowed tensor's bytes: a placeholder for the save to convert, else converted here.
fn narrowed(n: &mpopt_ir::Narrowed, deferred: &mut Option<&mut Deferred>) -> Bytes {
    match deferred {
        Some(d) => d.placeholder(n),
        None => n.bytes().clone(),
    }
}

/// The little-endian bytes of fixed-width data, for external storage (typed fields of 32/64-bit types only;
/// `int32_data` of narrower types stays inline).
fn raw_bytes(d: &TensorData, deferred: &mut Option<&mut Deferred>) -> Option<Bytes> {
    fn le<T: Copy, const N: usize>(v: &[T], f: fn(T) -> [u8; N]) -> Bytes {
        Bytes::from(v.iter().flat_map(|&x| f(x)).collect::<Vec<u8>>())
    }
    match d {
        TensorData::Narrowed(n) => Some(narrowed(n, deferred)),
        TensorData::Raw(b) => Some(b.clone()),
        TensorData::Floats(v) => Some(le(v, f32::to_le_bytes)),
        TensorData::Doubles(v) => Some(le(v, f64::to_le_bytes)),
        TensorData::Int64s(v) => Some(le(v, i64::to_le_bytes)),
        _ => None,
    }
}

pub(crate) fn type_proto(t: &TypeInfo) -> pb::TypeProto {
    use pb::type_proto as tp;
    let shape = |s: &Option<Vec<mpopt_ir::Dim>>| {
        s.as_ref().map(|dims| pb::TensorShapeProto {
            dim: dims
                .iter()
                .map(|d| pb::tensor_shape_proto::Dimension {
                    denotation: d.denotation.clone(),
                    value: match &d.value {
                        DimValue::Known(n) => {
                            Some(pb::tensor_shape_proto::dimension::Value::DimValue(*n))
                        }
                        DimValue::Symbol(s) => Some(
                            pb::tensor_shape_proto::dimension::Value::DimParam(s.clone()),
                        ),
                        DimValue::Unknown => None,
                    },
                })
                .collect(),
        })
    };
    let code = |d: &Option<mpopt_ir::DType>| Some(d.map_or(0, |d| d.code()));
    let boxed = |t: &Option<Box<TypeInfo>>| t.as_ref().map(|t| Box::new(type_proto(t)));
    let value = match &t.ty {
        Type::Tensor { elem, shape: s } => Some(tp::Value::TensorType(tp::Tensor {
            elem_type: code(elem),
            shape: shape(s),
        })),
        Type::SparseTensor { elem, shape: s } => {
            Some(tp::Value::SparseTensorType(tp::SparseTensor {
                elem_type: code(elem),
                shape: shape(s),
            }))
        }
        Type::Sequence(e) => Some(tp::Value::SequenceType(Box::new(tp::Sequence {
            elem_type: boxed(e),
        }))),
        Type::Map { key, value } => Some(tp::Value::MapType(Box::new(tp::Map {
            key_type: code(key),
            value_type: boxed(value),
        }))),
        Type::Optional(e) => Some(tp::Value::OptionalType(Box::new(tp::Optional {
            elem_type: boxed(e),
        }))),
        Type::Opaque { domain, name } => Some(tp::Value::OpaqueType(tp::Opaque {
            domain: opt(domain),
            name: opt(name),
        })),
        Type::Unset => None,
    };
    pb::TypeProto {
        denotation: t.denotation.clone(),
        value,
    }
}
