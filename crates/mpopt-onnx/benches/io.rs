//! Load + verify + save through the IR, on generated chain models (see `examples/gen_bench_model.rs`).
//! Run with `cargo bench -p mpopt-onnx`; `bench/io.sh` adds whole-process time and peak RSS.

#[path = "../examples/gen_bench_model.rs"]
mod gen_model;

use std::path::PathBuf;
use std::sync::OnceLock;

fn main() {
    divan::main();
}

/// (blocks, dim): 20,000 nodes and 314 MB; then graphs of growing node count with tiny tensors, to show that
/// time grows linearly with the number of nodes.
const SIZES: &[(usize, usize)] = &[(10_000, 88), (5_000, 1), (50_000, 1), (500_000, 1)];

fn model_path(blocks: usize, dim: usize) -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = DIR.get_or_init(|| tempfile::tempdir().unwrap());
    let p = dir.path().join(format!("chain_{blocks}_{dim}.onnx"));
    if !p.exists() {
        let m = gen_model::chain_model(blocks, dim);
        mpopt_onnx::save(&m, &p, mpopt_onnx::ExternalData::Auto).unwrap();
    }
    p
}

#[divan::bench(args = SIZES, sample_count = 5, sample_size = 1)]
fn load_verify_save(bencher: divan::Bencher, &(blocks, dim): &(usize, usize)) {
    let input = model_path(blocks, dim);
    let output = input.with_extension("out.onnx");
    bencher.bench_local(|| {
        let m = mpopt_onnx::load(&input).unwrap();
        mpopt_onnx::save(&m, &output, mpopt_onnx::ExternalData::Auto).unwrap();
    });
}

#[divan::bench(args = SIZES, sample_count = 5, sample_size = 1)]
fn load_verify(bencher: divan::Bencher, &(blocks, dim): &(usize, usize)) {
    let input = model_path(blocks, dim);
    bencher.bench_local(|| mpopt_onnx::load(&input).unwrap());
}
