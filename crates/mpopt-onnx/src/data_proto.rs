//! The two messages of onnx 1.23.2's `onnx-data.proto` that the backend test files use, written as prost
//! derives (the committed generated code covers `onnx.proto` only). Fields mpopt does not read (sparse
//! tensors, maps, nested optionals) are skipped by the decoder as unknown fields.

use crate::pb::TensorProto;

/// `onnx.SequenceProto` (fields 1, 2, 3, 5).
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct SequenceProto {
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    #[prost(int32, optional, tag = "2")]
    pub elem_type: Option<i32>,
    #[prost(message, repeated, tag = "3")]
    pub tensor_values: Vec<TensorProto>,
    #[prost(message, repeated, tag = "5")]
    pub sequence_values: Vec<SequenceProto>,
}

/// `onnx.OptionalProto` (fields 1, 2, 3, 5).
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct OptionalProto {
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    #[prost(int32, optional, tag = "2")]
    pub elem_type: Option<i32>,
    #[prost(message, optional, tag = "3")]
    pub tensor_value: Option<TensorProto>,
    #[prost(message, optional, tag = "5")]
    pub sequence_value: Option<SequenceProto>,
}
