//! `mpopt MODEL -o OUT` as a user runs it: the conversion, its report, idempotence, and its option errors.

use std::path::Path;

mod common;

use common::mpopt;

const MLP: &str = "testdata/models/tiny_mlp.onnx";

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn converts_with_a_report_that_explains_every_decision() {
    let dir = tempfile::tempdir().unwrap();
    let (out, report) = (dir.path().join("m16.onnx"), dir.path().join("r.json"));
    let (code, _, err) = mpopt(&[MLP, "-o", s(&out), "--report", s(&report)]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("casts 0 -> 2"), "{err}");
    let text = std::fs::read_to_string(&report).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let nodes = v["nodes"].as_array().unwrap();
    // every node of the MLP has float data, so every one is decided, with a rule and evidence
    assert_eq!(nodes.len(), 5);
    for n in nodes {
        assert!(
            !n["rule"].as_str().unwrap().is_empty() && !n["evidence"].as_str().unwrap().is_empty(),
            "{n}"
        );
    }
    let softmax = nodes.iter().find(|n| n["op"] == "Softmax").unwrap();
    assert_eq!(softmax["precision"], "f32");
    // deny, relaxed to infer: its only consumer is the graph output, so it is not between low nodes
    assert_eq!(softmax["rule"], "infer: not between low nodes");
    assert!(
        softmax["evidence"]
            .as_str()
            .unwrap()
            .starts_with("deny relaxed to infer"),
        "{softmax}"
    );
    assert_eq!(v["summary"]["casts_after"], 2);
    let conv = v["conversions"].as_array().unwrap();
    assert_eq!(
        conv.iter()
            .filter(|c| c["kind"] == "initializer converted")
            .count(),
        3
    );
    // the inputs and outputs keep their dtypes
    let (_, inspect, _) = mpopt(&["inspect", s(&out)]);
    assert!(
        inspect.contains("inputs:\n  x: f32[N,16]\noutputs:\n  y: f32[N,4]\n"),
        "{inspect}"
    );
}

#[test]
fn the_report_gives_the_scan_of_each_big_initializer_kept_fp32() {
    // two 64x64 projections (4,096 weights each: big enough for the analysis to keep its scan); the second
    // is kept fp32 by the user, and its weight holds one value beyond f16's range and one that flushes
    let dir = tempfile::tempdir().unwrap();
    let weights = |big: bool| {
        let w: Vec<String> = (0..4096)
            .map(|i| match (big, i) {
                (true, 5) => "70000.0".to_string(),
                (true, 9) => "1e-9".to_string(),
                _ => format!("{}", ((i % 17) as f32 - 8.0) * 0.01),
            })
            .collect();
        w.join(", ")
    };
    let text = format!(
        "ir_version 8\nopset ai.onnx 17\n\ngraph @g(%x: f32[1,64]) -> (%y: f32[1,64]) {{\n  \
         %w1 = const f32[64,64] [{}]\n  %w2 = const f32[64,64] [{}]\n  \
         %h = MatMul(%x, %w1) @fc1\n  %y = MatMul(%h, %w2) @fc2\n}}\n",
        weights(false),
        weights(true)
    );
    let model = mpopt_ir::text::parse_model(&text).unwrap();
    let src = dir.path().join("two.onnx");
    mpopt_onnx::save(&model, &src, mpopt_onnx::ExternalData::Auto).unwrap();
    let (out, report) = (dir.path().join("m16.onnx"), dir.path().join("r.json"));
    let (code, _, err) = mpopt(&[
        s(&src),
        "-o",
        s(&out),
        "--report",
        s(&report),
        "--keep-fp32",
        "node:fc2",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let node = |name: &str| {
        v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node"] == name)
            .unwrap()
            .clone()
    };
    // fc2 stays fp32, and so does its weight: its min/max and counts against both types are given
    let w2 = &node("fc2")["ranges"]["w2"]["constant"];
    assert_eq!(
        (w2["min"].as_f64(), w2["max"].as_f64()),
        (Some(-0.08f32 as f64), Some(70000.0)),
        "{w2}"
    );
    assert_eq!(w2["f16"], serde_json::json!({"overflow": 1, "flush": 1}));
    assert_eq!(w2["bf16"], serde_json::json!({"overflow": 0, "flush": 0}));
    // w1 was converted to f16: the scan was of data it no longer holds
    assert!(node("fc1")["ranges"].get("w1").is_none(), "{}", node("fc1"));
}

#[test]
fn converting_a_converted_model_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    for model in [
        MLP,
        "testdata/models/if_outer.onnx",
        "testdata/models/loop_carried.onnx",
    ] {
        let (a, b) = (dir.path().join("a.onnx"), dir.path().join("b.onnx"));
        let (code, _, err) = mpopt(&[model, "-o", s(&a)]);
        assert_eq!(code, 0, "{err}");
        let (code, _, err) = mpopt(&[s(&a), "-o", s(&b)]);
        assert_eq!(code, 0, "{err}");
        let (_, pa, _) = mpopt(&["print", s(&a)]);
        let (_, pb, _) = mpopt(&["print", s(&b)]);
        assert_eq!(pa, pb, "{model}: a second conversion changed the model");
    }
}

#[test]
fn a_model_out_of_topological_order_is_sorted_with_a_note() {
    // tiny_mlp with its nodes listed last to first (onnxruntime's float16 converter appends input casts so)
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.onnx"), dir.path().join("b.onnx"));
    let (code, _, err) = mpopt(&["testdata/models/out_of_order.onnx", "-o", s(&a)]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("not in topological order (4 node(s) read a value produced later); sorted"),
        "{err}"
    );
    // the result is the conversion of the model in order
    let (code, _, err) = mpopt(&[MLP, "-o", s(&b)]);
    assert_eq!(code, 0, "{err}");
    let (_, pa, _) = mpopt(&["print", s(&a)]);
    let (_, pb, _) = mpopt(&["print", s(&b)]);
    assert_eq!(pa, pb);
    // a model in order gets no note
    assert!(!err.contains("topological"), "{err}");
}

#[test]
fn io_types_low_and_bf16() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("low.onnx");
    let (code, _, err) = mpopt(&[MLP, "-o", s(&out), "--io-types", "low"]);
    assert_eq!(code, 0, "{err}");
    let (_, inspect, _) = mpopt(&["inspect", s(&out)]);
    assert!(inspect.contains("  x: f16[N,16]\n"), "{inspect}");
    let bf = dir.path().join("bf.onnx");
    let (code, _, err) = mpopt(&[MLP, "-o", s(&bf), "--to", "bf16"]);
    assert_eq!(code, 0, "{err}");
    let (_, text, _) = mpopt(&["print", s(&bf)]);
    assert!(text.contains("%w1 = const bf16[16,32]"), "{text}");
}

#[test]
fn keep_fp32_selector_keeps_everything_it_matches() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.onnx");
    let (code, _, err) = mpopt(&[
        MLP,
        "-o",
        s(&out),
        "--keep-fp32",
        "MatMul",
        "--keep-fp32",
        "node:^fc1_bias$",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("casts 0 -> 0"),
        "nothing should be lowered: {err}"
    );
}

#[test]
fn option_errors_name_the_valid_choices() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.onnx");
    let (code, _, err) = mpopt(&[MLP, "-o", s(&out), "--keep-fp32", "softmax"]);
    assert_eq!(code, 2);
    assert!(
        err.starts_with(
            "error: --keep-fp32: selector 'softmax': unknown op type (did you mean Softmax?)"
        ),
        "{err}"
    );
    assert!(err.contains("MatMul") && err.lines().count() == 1, "{err}");
    let (code, _, err) = mpopt(&[MLP, "-o", s(&out), "--passes", "infer-types,bogus"]);
    assert_eq!(code, 2);
    assert_eq!(
        err,
        "error: unknown pass 'bogus'; the passes are: infer-types, analyze-ranges, calibrate, assign-precision, measure-gates, search-precision, insert-casts, fuse-casts\n"
    );
    let (code, _, err) = mpopt(&[MLP, "-o", s(&out), "--to", "int8"]);
    assert_eq!(code, 2);
    assert_eq!(err, "error: --to 'int8': choose fp16, bf16 or auto\n");
    let (code, _, err) = mpopt(&[MLP, "-o", s(&out), "--input-range", "x=1"]);
    assert_eq!(code, 2);
    assert_eq!(
        err,
        "error: input range 'x=1': expected NAME=LO:HI, for example pixel_values=-1:1\n"
    );
    let (code, _, err) = mpopt(&[MLP, "-o", s(&out), "--input-range", "nope=-1:1"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("--input-range names 'nope', which is not a graph input; the inputs are: "),
        "{err}"
    );
    let (code, _, err) = mpopt(&[MLP, "-o", s(&out), "--calib", "/no/such.npz"]);
    assert_eq!(code, 1);
    assert_eq!(err, "error: --calib /no/such.npz: no such file or folder\n");
    assert!(!out.exists(), "no output is written after an error");
    let (code, _, err) = mpopt(&[MLP, "-o", s(&out), "--io-types", "nope"]);
    assert_eq!(code, 2);
    assert_eq!(
        err,
        "error: --io-types: 'nope' is not a graph input or output; they are: x, y\n"
    );
    let policy = dir.path().join("p.toml");
    std::fs::write(&policy, "keep_fp32 = [\"Softmax\"]\ncolour = \"blue\"\n").unwrap();
    let (code, _, err) = mpopt(&[MLP, "-o", s(&out), "--policy", s(&policy)]);
    assert_eq!(code, 1);
    assert!(
        err.contains("p.toml")
            && err.contains("unknown field `colour`")
            && err.contains("keep_fp32"),
        "{err}"
    );
    std::fs::write(&policy, "[classes]\nSoftmax = \"maybe\"\n").unwrap();
    let (code, _, err) = mpopt(&[MLP, "-o", s(&out), "--policy", s(&policy)]);
    assert_eq!(code, 2);
    assert!(
        err.contains("'maybe' is not one of allow, infer, clear, deny, keep"),
        "{err}"
    );
    assert!(!out.exists(), "no output after a failed conversion");
    let (code, _, err) = mpopt(&[MLP]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn policy_file_classes_change_decisions() {
    let dir = tempfile::tempdir().unwrap();
    let (out, report, policy) = (
        dir.path().join("m.onnx"),
        dir.path().join("r.json"),
        dir.path().join("p.toml"),
    );
    std::fs::write(&policy, "[classes]\nSoftmax = \"infer\"\n").unwrap();
    let (code, _, err) = mpopt(&[
        MLP,
        "-o",
        s(&out),
        "--policy",
        s(&policy),
        "--report",
        s(&report),
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let softmax = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["op"] == "Softmax")
        .unwrap()
        .clone();
    assert_eq!(softmax["evidence"], "infer: policy file class for Softmax");
}
