//! # mpopt
//!
//! Load ONNX models, rewrite them with types kept right, convert them to mixed fp16/bf16 precision, and write
//! them back. This is the crate to depend on; the others (`mpopt-ir`, `mpopt-onnx`, `mpopt-passes`) are its
//! parts.
//!
//! - [`ir`]: the graph IR (models, graphs, nodes, values, types, tensors), the verifier, the text format,
//!   operator schemas, and [`ir::pattern`] to find and build nodes.
//! - [`onnx`]: zero-copy loading and atomic saving of ONNX files, external data included.
//! - [`passes`]: the [`Pass`] trait, the [`PassManager`], the built-in passes and their registry.
//! - [`convert`] / [`convert_file`]: the default conversion pipeline in one call.
//!
//! ```no_run
//! use mpopt::{ConvertOptions, convert_file};
//! use std::path::Path;
//!
//! let summary = convert_file(Path::new("model.onnx"), Path::new("model_fp16.onnx"), &ConvertOptions::default())?;
//! println!("{} nodes low, {} fp32", summary.low, summary.fp32);
//! # Ok::<(), mpopt::Error>(())
//! ```
//!
//! A rewrite pass is a type implementing [`Pass`]; register it in a [`passes::pipeline::Registry`] to put it in
//! a pipeline by name. See `examples/` for a MatMul + Add -> Gemm fusion, a custom conversion policy, and
//! reading the decisions.
#![deny(missing_docs)]

use std::path::Path;

pub use mpopt_ir as ir;
pub use mpopt_ir::{DType, Graph, Model, Node, NodeId, Value, ValueId, verify_model};
pub use mpopt_passes::pipeline::ConvertOptions;
pub use mpopt_passes::{Pass, PassError, PassManager, PassOutcome, PassRun};

/// ONNX I/O.
pub mod onnx {
    pub use mpopt_onnx::{ExternalData, OnnxError, SaveSummary, decode, encode, load, save};
}

/// Passes: the trait, the manager, the built-in passes, the policy and the pipeline registry.
pub mod passes {
    pub use mpopt_passes::{
        Pass, PassError, PassManager, PassOutcome, PassRun, Record, assign_precision, fuse_casts,
        infer_types, insert_casts, pipeline, policy,
    };
}

/// Errors of the facade's one-call helpers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing the model failed.
    #[error(transparent)]
    Onnx(#[from] mpopt_onnx::OnnxError),
    /// A pass failed or left the model invalid.
    #[error(transparent)]
    Pass(#[from] mpopt_passes::PassError),
}

/// What a conversion did: nodes by precision decision and the Casts, subgraphs included.
pub type ConvertSummary = mpopt_passes::pipeline::PrecisionCensus;

/// Runs the default conversion pipeline on a model (verifying after every pass) and records the inferred types
/// in `value_info`. The decisions stay on the nodes (`Node::precision`).
pub fn convert(model: &mut Model, opts: &ConvertOptions) -> Result<ConvertSummary, Error> {
    PassManager::new(mpopt_passes::pipeline::default_pipeline(opts))
        .verify_each(true)
        .run(model)?;
    mpopt_passes::infer_types::record_value_info(model);
    Ok(mpopt_passes::pipeline::census(&model.graph))
}

/// Loads `input`, converts it, and saves it to `output` (atomically; never over the input's data).
pub fn convert_file(
    input: &Path,
    output: &Path,
    opts: &ConvertOptions,
) -> Result<ConvertSummary, Error> {
    let mut m = mpopt_onnx::load(input)?;
    let s = convert(&mut m, opts)?;
    mpopt_onnx::save(&m, output, mpopt_onnx::ExternalData::Auto)?;
    Ok(s)
}
