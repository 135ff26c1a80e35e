//! mpopt's intermediate representation.
//!
//! A [`Model`] owns a main [`Graph`] and local [`Function`]s. Graphs hold nodes and values in arenas with stable
//! `u32` ids, keep producer/consumer indexes current on every edit, and make outer-scope reads of subgraphs
//! explicit (captures and implicit inputs). [`verify_model`] checks the invariants; [`text`] prints and parses
//! the IR text format used by pass fixtures. This crate knows nothing of protobuf: `mpopt-onnx` converts.

#![deny(missing_docs)]

mod attr;
mod dtype;
mod graph;
pub mod halfconv;
mod model;
pub mod pattern;
mod range;
pub mod schema;
mod tensor;
pub mod text;
mod types;
mod verify;

pub use attr::{AttrValue, Attribute};
pub use dtype::DType;
pub use graph::{
    Def, EditError, Graph, Node, NodeId, NodeIter, PrecisionDecision, TensorAnnotation, Use, Value,
    ValueId,
};
pub use model::{Function, Model, Opaque, OpsetImport, Opsets, canonical_domain};
pub use range::{ConstantFacts, Interval, Observed, ValueRange, short as range_short};
pub use tensor::{
    ExternalOrigin, Narrowed, SparseTensor, Tensor, TensorData, narrow_f32_bytes,
    narrow_f32_bytes_uninit,
};
pub use types::{Dim, DimValue, Shape, Type, TypeInfo};
pub use verify::{MAX_PROBLEMS, Problem, VerifyError, node_label, verify_graph, verify_model};
