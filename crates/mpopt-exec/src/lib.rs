//! mpopt's CPU reference executor.
//!
//! An interpreter over the IR: [`Executor::new`] checks that every op (subgraphs included) has a kernel and
//! converts the constants once; [`Executor::run`] runs the graph on named inputs, freeing each value as soon as
//! its last consumer has run (unless [`RunOptions::keep_all`] asks for every intermediate value).
//!
//! # Low-precision semantics (what a CUDA kernel does)
//!
//! f16 and bf16 tensors are stored as f16/bf16. An op whose first float input is f16 or bf16 reads its inputs
//! widened to f32 (exact), computes in f32 (MatMul, Gemm and Conv accumulate in f32 as cuBLAS/cuDNN do with
//! `CUBLAS_COMPUTE_32F`; reductions, Softmax and the normalizations accumulate in f32), and rounds each output
//! once to the storage type with IEEE round-to-nearest-even: a value past 65504 becomes +-inf, and small values
//! underflow gradually to subnormals and then to zero, exactly as `__float2half_rn` does. Data-movement ops
//! (Reshape, Transpose, Gather, Concat, Slice, ...) copy the stored bits. A decomposed LayerNorm whose `Pow`
//! output exceeds 65504 therefore yields inf here, as it would on a GPU, while onnxruntime's CPU provider (which
//! computes such ops in f32) hides it. See `docs/executor.md` for the per-op notes.

#![deny(missing_docs)]
// The dtype-dispatch macros expand one body for every element type, strings included, so `.clone()` is
// needed there and is a plain copy for the numeric types.
#![allow(clippy::clone_on_copy)]

mod fuse;
pub mod geometry;
mod interp;
pub mod io;
pub mod metrics;
mod ops;
pub mod small;
#[doc(hidden)]
pub mod tensor;

pub use interp::{Executor, NodeHook, RunOptions, RunOutput, scope_steps, subgraph_scope};
pub use ops::{cast_tensor, cast_tensor_sat, is_supported, narrow, supported_ops};
pub use tensor::{
    Data, Tensor, Value, data_to_raw, numel, raw_to_data, round_bf16, round_f16, strides,
};

/// What can go wrong when running a model.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// Ops without a kernel, listed once each with a node that uses them.
    #[error("unsupported ops: {}", .0.join(", "))]
    Unsupported(Vec<String>),
    /// A required graph input was not given.
    #[error("missing input(s) {missing}; the model's inputs are: {expected}")]
    MissingInput {
        /// The names missing.
        missing: String,
        /// Every input the model takes, with its type.
        expected: String,
    },
    /// An input was given that the model does not take.
    #[error("unknown input '{name}'; the model's inputs are: {expected}")]
    UnknownInput {
        /// The name given.
        name: String,
        /// Every input the model takes.
        expected: String,
    },
    /// An input has the wrong dtype or shape.
    #[error("input '{name}': {msg}")]
    BadInput {
        /// The input.
        name: String,
        /// What is wrong.
        msg: String,
    },
    /// A node failed.
    #[error("node {node} ({op}): {msg}")]
    Node {
        /// The node's name (or `#index` when it has none), with the enclosing nodes for subgraphs.
        node: String,
        /// Its op type.
        op: String,
        /// What went wrong.
        msg: String,
    },
    /// A constant could not be converted.
    #[error("initializer '{name}': {msg}")]
    Constant {
        /// The value.
        name: String,
        /// What is wrong.
        msg: String,
    },
}
