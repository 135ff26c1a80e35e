//! Errors of ONNX I/O. Each names the file, and the node, value or tensor at fault.

use std::path::{Path, PathBuf};

/// An ONNX I/O error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OnnxError {
    /// The file could not be opened, mapped, read or written.
    #[error("{}: {error}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error (part of the message, not a separate cause, so it is reported once).
        error: std::io::Error,
    },
    /// The bytes are not a well-formed ONNX model (corrupt protobuf, unknown dtype, missing external data, ...).
    #[error("{}: {msg}", path.display())]
    Malformed {
        /// The model file.
        path: PathBuf,
        /// What is wrong and where.
        msg: String,
    },
    /// The model decoded but breaks an IR invariant (cycle, dangling reference, type clash, ...).
    #[error("{}: {problems}", path.display())]
    Invalid {
        /// The model file.
        path: PathBuf,
        /// The verifier's findings.
        problems: mpopt_ir::VerifyError,
    },
    /// The model cannot be written as asked.
    #[error("{}: {msg}", path.display())]
    Unwritable {
        /// The target file.
        path: PathBuf,
        /// Why.
        msg: String,
    },
}

impl OnnxError {
    pub(crate) fn io(path: &Path, error: std::io::Error) -> OnnxError {
        OnnxError::Io {
            path: path.to_path_buf(),
            error,
        }
    }
}
