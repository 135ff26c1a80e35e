//! mpopt's CUDA executor.
//!
//! [`GpuExecutor`] runs a model on a [`Backend`]: [`Cuda`] (a real GPU through cudarc, loaded at run time, so
//! this crate builds and its tests pass on machines without CUDA) or [`Emu`] (a CPU transcription of the same
//! kernels, for tests). It walks the CPU executor's schedule (after constant folding) and runs each node on
//! the device when it has a GPU implementation for the node's types and attributes; other nodes (control
//! flow, recurrent layers, exotic attributes) run on the CPU reference executor with their inputs copied
//! down, and every such fallback is counted in [`RunStats`]. Small host-only computations (shape
//! arithmetic) stay on the host.
//!
//! Numerics follow the CPU executor's GPU-faithful contract: f16/bf16 loads widen exactly, arithmetic is f32
//! (GEMMs use cuBLAS with `CUBLAS_COMPUTE_32F`), and every stored element is rounded once to nearest-even.
//!
//! Memory: each value is freed after its last consumer (the CPU executor's use counts), and freed buffers
//! are reused through a size-class pool ([`pool`]); constants are uploaded once per executor; host/device
//! copies otherwise happen at graph inputs and outputs (and around CPU fallbacks, which are reported).
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let model = mpopt_onnx::load(std::path::Path::new("model.onnx"))?;
//! let gpu = mpopt_cuda::Cuda::open(0)?; // Err(CudaError::NoDriver) on a machine without a GPU
//! let exec = mpopt_cuda::GpuExecutor::new(&model, gpu)?;
//! let run = exec.run(vec![])?;
//! println!("{} nodes on the GPU, {} fell back to the CPU", run.stats.gpu_nodes, run.stats.fallback_nodes());
//! # Ok(()) }
//! ```

#![deny(missing_docs)]

pub mod backend;
pub mod cuda;
pub mod emu;
mod exec;
pub mod gemm_profile;
mod ops;
pub mod pool;

pub use backend::Backend;
pub use cuda::Cuda;
pub use emu::Emu;
pub use exec::{DevTensor, GpuExecutor, GpuRun, HOST_LIMIT, RunStats, gpu_ops};
pub use gemm_profile::{GemmLog, GemmShape, Profiled};

/// What can go wrong on a GPU.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// No usable CUDA installation (driver, NVRTC or cuBLAS missing, or no GPU).
    #[error("{0}")]
    NoDriver(String),
    /// The driver, NVRTC or cuBLAS failed.
    #[error("{0}")]
    Driver(String),
    /// The model or its inputs are wrong (the CPU executor's checks), or a CPU fallback failed.
    #[error(transparent)]
    Exec(#[from] mpopt_exec::ExecError),
    /// A node failed on the device.
    #[error("node {node} ({op}) on {device}: {msg}")]
    Node {
        /// The node's name, or `#index`.
        node: String,
        /// Its op type.
        op: String,
        /// The backend.
        device: String,
        /// What went wrong.
        msg: String,
    },
}
