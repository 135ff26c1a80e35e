//! Value types: tensors with (possibly symbolic or unknown) shapes, sequences, maps, optionals, sparse tensors.

use crate::DType;

/// One dimension of a shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum DimValue {
    /// A known size.
    Known(i64),
    /// A named symbolic size (`N`, `batch`).
    Symbol(String),
    /// Present but unknown.
    Unknown,
}

impl DimValue {
    /// The size, when it is known.
    pub fn as_known(&self) -> Option<i64> {
        match self {
            DimValue::Known(n) => Some(*n),
            _ => None,
        }
    }
}

/// A dimension and its optional denotation (kept for a lossless round trip).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Dim {
    /// The size.
    pub value: DimValue,
    /// ONNX dimension denotation, rarely used.
    pub denotation: Option<String>,
}

impl Dim {
    /// A known dimension.
    pub fn known(n: i64) -> Dim {
        Dim {
            value: DimValue::Known(n),
            denotation: None,
        }
    }
    /// A symbolic dimension.
    pub fn symbol(s: impl Into<String>) -> Dim {
        Dim {
            value: DimValue::Symbol(s.into()),
            denotation: None,
        }
    }
    /// An unknown dimension.
    pub fn unknown() -> Dim {
        Dim {
            value: DimValue::Unknown,
            denotation: None,
        }
    }
}

/// A tensor shape: `None` rank means the rank itself is unknown.
pub type Shape = Option<Vec<Dim>>;

/// The type of a value.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Type {
    /// A dense tensor.
    Tensor {
        /// Element type; `None` when the model leaves it undefined.
        elem: Option<DType>,
        /// Shape; `None` when the rank is unknown.
        shape: Shape,
    },
    /// A sparse tensor.
    SparseTensor {
        /// Element type of the values.
        elem: Option<DType>,
        /// Dense shape.
        shape: Shape,
    },
    /// A sequence; the element type may be missing.
    Sequence(Option<Box<TypeInfo>>),
    /// A map from a key element type to values.
    Map {
        /// Key element type.
        key: Option<DType>,
        /// Value type.
        value: Option<Box<TypeInfo>>,
    },
    /// An optional value.
    Optional(Option<Box<TypeInfo>>),
    /// An opaque type.
    Opaque {
        /// Domain of the opaque type.
        domain: String,
        /// Its name.
        name: String,
    },
    /// A TypeProto with no variant set.
    Unset,
}

/// A type with its optional ONNX denotation.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TypeInfo {
    /// The type.
    pub ty: Type,
    /// ONNX type denotation (`IMAGE`, `TEXT`, ...).
    pub denotation: Option<String>,
}

impl TypeInfo {
    /// A tensor type with no denotation.
    pub fn tensor(elem: DType, shape: Shape) -> TypeInfo {
        TypeInfo {
            ty: Type::Tensor {
                elem: Some(elem),
                shape,
            },
            denotation: None,
        }
    }

    /// The element type when this is a dense tensor.
    pub fn tensor_elem(&self) -> Option<DType> {
        match &self.ty {
            Type::Tensor { elem, .. } => *elem,
            _ => None,
        }
    }

    /// The shape when this is a dense tensor.
    pub fn tensor_shape(&self) -> Option<&[Dim]> {
        match &self.ty {
            Type::Tensor { shape: Some(s), .. } => Some(s),
            _ => None,
        }
    }
}
