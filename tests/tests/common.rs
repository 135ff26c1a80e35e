//! Helpers shared by the end-to-end tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `../shared/corpus` beside the repository, when present.
pub fn corpus_dir() -> Option<PathBuf> {
    let d = root().join("../shared/corpus");
    d.is_dir().then_some(d)
}

/// Every `model.onnx` below `dir`, sorted.
pub fn models_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n == "model.onnx") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Models for suite-wide tests: the corpus, plus every folder in `MPOPT_SUITE_DIRS` (colon-separated; CI sets it
/// to the generated ONNX node suite and the onnx wheel's model folders).
pub fn suite_models() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = corpus_dir().into_iter().collect();
    if let Ok(extra) = std::env::var("MPOPT_SUITE_DIRS") {
        dirs.extend(
            extra
                .split(':')
                .filter(|s| !s.is_empty())
                .map(PathBuf::from),
        );
    }
    dirs.iter().flat_map(|d| models_under(d)).collect()
}
