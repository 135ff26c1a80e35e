//! Regenerates `crates/mpopt-onnx/src/generated/onnx.rs` from the committed `onnx.proto` (onnx 1.23.2) into a
//! temporary folder and fails when the committed file differs. `REGEN=1 cargo test -p onnx-regen` rewrites it.

use std::path::PathBuf;

#[test]
fn generated_code_is_current() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../mpopt-onnx");
    let proto_dir = root.join("proto");
    let committed = root.join("src/generated/onnx.rs");
    let out = std::env::temp_dir().join(format!("onnx-regen-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    let mut cfg = prost_build::Config::new();
    // A message field held inline makes its parent as large as itself: AttributeProto carried a TensorProto,
    // a GraphProto, a SparseTensorProto (two TensorProtos) and a TypeProto, about 1.7 KB per attribute of a
    // model, most of them one int. Boxed, the rare ones cost a pointer.
    cfg.bytes(["."])
        .boxed(".onnx.AttributeProto.t")
        .boxed(".onnx.AttributeProto.g")
        .boxed(".onnx.AttributeProto.sparse_tensor")
        .boxed(".onnx.AttributeProto.tp")
        .out_dir(&out)
        .protoc_executable(protoc_bin_vendored::protoc_bin_path().unwrap());
    cfg.compile_protos(&[proto_dir.join("onnx.proto")], &[proto_dir])
        .unwrap();
    let fresh = std::fs::read_to_string(out.join("onnx.rs")).unwrap();
    std::fs::remove_dir_all(&out).ok();
    if std::env::var_os("REGEN").is_some() {
        std::fs::write(&committed, &fresh).unwrap();
        return;
    }
    let old = std::fs::read_to_string(&committed).unwrap_or_default();
    assert!(
        old == fresh,
        "generated onnx.rs is stale: run REGEN=1 cargo test -p onnx-regen"
    );
}
