//! The examples run and say what they did.

use std::path::Path;

fn run_example(name: &str, args: &[&str]) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = std::process::Command::new(env!("CARGO"))
        .args(["run", "-q", "-p", "mpopt", "--example", name, "--"])
        .args(args)
        .current_dir(&root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn examples_run_on_testdata() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.onnx");
    let o = out.to_str().unwrap();
    let text = run_example(
        "convert_custom_policy",
        &["testdata/models/tiny_mlp.onnx", o],
    );
    // Softmax is `infer` under this policy and sits after the last MatMul: it stays fp32 (not between low nodes)
    assert_eq!(text, "converted to bf16: 4 nodes low, 1 fp32, 2 casts\n");
    let m = mpopt::onnx::load(&out).unwrap();
    assert!(
        m.graph.initializers().iter().all(|&v| m
            .graph
            .value(v)
            .initializer
            .as_ref()
            .unwrap()
            .dtype
            == mpopt::DType::BF16)
    );

    let text = run_example("fuse_matmul_add", &["testdata/models/tiny_mlp.onnx", o]);
    assert_eq!(text, "fused 1 MatMul+Add pairs into Gemm\n");
    let m = mpopt::onnx::load(&out).unwrap();
    let ops: Vec<&str> = m.graph.nodes().map(|(_, n)| n.op_type.as_str()).collect();
    assert_eq!(ops, ["Gemm", "Relu", "MatMul", "Softmax"]);

    let text = run_example("inspect_decisions", &["testdata/models/tiny_mlp.onnx"]);
    assert!(
        text.contains("fp32: softmax (Softmax): deny relaxed to infer"),
        "{text}"
    );
    assert!(text.ends_with("total: 4 low, 1 fp32, 2 casts\n"), "{text}");
}
