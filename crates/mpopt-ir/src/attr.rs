//! Node attributes.

use bytes::Bytes;

use crate::{DType, Graph, SparseTensor, Tensor, TypeInfo};

/// An attribute value. Subgraph values own their [`Graph`].
// Tensor-valued attributes make the enum large; nodes hold few attributes, and boxing would only add an
// indirection to every access.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum AttrValue {
    /// `f`
    Float(f32),
    /// `i`
    Int(i64),
    /// `s` (bytes, usually UTF-8)
    String(Bytes),
    /// `t` (boxed, as are sparse tensors: inline, they made every attribute of a model 512 bytes, most of
    /// them one int; boxed, an [`Attribute`] is 144)
    Tensor(Box<Tensor>),
    /// `g`
    Graph(Box<Graph>),
    /// `sparse_tensor`
    SparseTensor(Box<SparseTensor>),
    /// `tp`
    Type(TypeInfo),
    /// `floats`
    Floats(Vec<f32>),
    /// `ints`
    Ints(Vec<i64>),
    /// `strings`
    Strings(Vec<Bytes>),
    /// `tensors`
    Tensors(Vec<Tensor>),
    /// `graphs`
    Graphs(Vec<Graph>),
    /// `sparse_tensors`
    SparseTensors(Vec<SparseTensor>),
    /// `type_protos`
    Types(Vec<TypeInfo>),
}

// Keeps a large variant from coming back inline: a model holds an attribute per node or more, and their
// size is fresh memory on every load (TypeInfo, the largest variant kept inline, is 72 bytes on 64-bit).
const _: () = assert!(std::mem::size_of::<AttrValue>() <= 72);

impl AttrValue {
    /// The subgraphs this value holds.
    pub fn graphs(&self) -> &[Graph] {
        match self {
            AttrValue::Graph(g) => std::slice::from_ref(g.as_ref()),
            AttrValue::Graphs(gs) => gs,
            _ => &[],
        }
    }

    /// The subgraphs this value holds, mutably.
    pub fn graphs_mut(&mut self) -> &mut [Graph] {
        match self {
            AttrValue::Graph(g) => std::slice::from_mut(g.as_mut()),
            AttrValue::Graphs(gs) => gs,
            _ => &mut [],
        }
    }

    /// A placeholder of the named kind (see [`AttrValue::kind_name`]), for reference attributes
    /// (`ref_attr_name` inside function bodies), which carry a kind but no value.
    pub fn placeholder(kind: &str) -> Option<AttrValue> {
        let t = || Tensor::from_raw(DType::F32, vec![0], Bytes::new());
        Some(match kind {
            "float" => AttrValue::Float(0.0),
            "int" => AttrValue::Int(0),
            "string" => AttrValue::String(Bytes::new()),
            "tensor" => AttrValue::Tensor(Box::new(t())),
            "graph" => AttrValue::Graph(Box::new(Graph::new(""))),
            "sparse_tensor" => AttrValue::SparseTensor(Box::new(SparseTensor {
                values: t(),
                indices: Tensor::from_raw(DType::I64, vec![0], Bytes::new()),
                dims: Vec::new(),
            })),
            "type" => AttrValue::Type(TypeInfo {
                ty: crate::Type::Unset,
                denotation: None,
            }),
            "floats" => AttrValue::Floats(Vec::new()),
            "ints" => AttrValue::Ints(Vec::new()),
            "strings" => AttrValue::Strings(Vec::new()),
            "tensors" => AttrValue::Tensors(Vec::new()),
            "graphs" => AttrValue::Graphs(Vec::new()),
            "sparse_tensors" => AttrValue::SparseTensors(Vec::new()),
            "types" => AttrValue::Types(Vec::new()),
            _ => return None,
        })
    }

    /// The kind's name as the text format and error messages spell it.
    pub fn kind_name(&self) -> &'static str {
        match self {
            AttrValue::Float(_) => "float",
            AttrValue::Int(_) => "int",
            AttrValue::String(_) => "string",
            AttrValue::Tensor(_) => "tensor",
            AttrValue::Graph(_) => "graph",
            AttrValue::SparseTensor(_) => "sparse_tensor",
            AttrValue::Type(_) => "type",
            AttrValue::Floats(_) => "floats",
            AttrValue::Ints(_) => "ints",
            AttrValue::Strings(_) => "strings",
            AttrValue::Tensors(_) => "tensors",
            AttrValue::Graphs(_) => "graphs",
            AttrValue::SparseTensors(_) => "sparse_tensors",
            AttrValue::Types(_) => "types",
        }
    }
}

/// A named attribute.
#[derive(Clone, Debug)]
pub struct Attribute {
    /// Attribute name.
    pub name: String,
    /// Its value. For a reference (`ref_attr_name`, inside functions) only the kind matters.
    pub value: AttrValue,
    /// Inside a function body: the function attribute this one refers to.
    pub ref_attr_name: Option<String>,
    /// ONNX doc string.
    pub doc_string: String,
}

impl Attribute {
    /// A plain attribute.
    pub fn new(name: impl Into<String>, value: AttrValue) -> Attribute {
        Attribute {
            name: name.into(),
            value,
            ref_attr_name: None,
            doc_string: String::new(),
        }
    }
}
