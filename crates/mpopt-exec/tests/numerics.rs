//! GPU-faithful low-precision numerics and input checking, on small graphs in the IR text format.

use half::f16;
use mpopt_exec::{Data, ExecError, Executor, RunOptions, Tensor, Value};
use mpopt_ir::text::parse_model;

fn run(src: &str, inputs: Vec<(&str, Tensor)>) -> Result<Vec<(String, Value)>, ExecError> {
    let m = parse_model(src).expect("fixture parses");
    let exec = Executor::new(&m)?;
    let ins = inputs
        .into_iter()
        .map(|(n, t)| (n.to_string(), Value::Tensor(t)))
        .collect();
    Ok(exec
        .run(
            ins,
            &RunOptions {
                keep_all: true,
                ..Default::default()
            },
        )?
        .outputs)
}

fn f16s(v: &[f32]) -> Tensor {
    Tensor::new(
        vec![v.len()],
        Data::F16(v.iter().map(|&x| f16::from_f32(x)).collect()),
    )
}

fn out_f32(v: &Value) -> Vec<f32> {
    v.tensor().unwrap().to_f32s().unwrap()
}

/// A LayerNorm decomposed as exporters write it: the variance's `Pow` overflows fp16 for inputs around 300
/// (300^2 = 90000 > 65504), so on a GPU the statistics become inf and the output collapses. The same graph in
/// f32 is fine. onnxruntime's CPU provider computes this in f32 and hides it; the executor must not.
const DECOMPOSED_LN: &str = r#"
ir_version 8
opset ai.onnx 17

graph @ln(%x: T[1,4]) -> (%y: T[1,4], %sq: T[1,4]) {
  %two = const T[] [2]
  %eps = const T[] [0.00001]
  %mean = ReduceMean(%x) {axes = [-1], keepdims = 1}
  %d = Sub(%x, %mean)
  %sq = Pow(%d, %two)
  %var = ReduceMean(%sq) {axes = [-1], keepdims = 1}
  %ve = Add(%var, %eps)
  %sd = Sqrt(%ve)
  %y = Div(%d, %sd)
}
"#;

#[test]
fn decomposed_layernorm_pow_overflows_in_fp16_as_on_a_gpu() {
    let xs = [-300.0f32, 310.0, -290.0, 305.0];
    let f16_src = DECOMPOSED_LN.replace("T[", "f16[");
    let out = run(
        &f16_src,
        vec![("x", Tensor::new(vec![1, 4], f16s(&xs).data))],
    )
    .unwrap();
    let sq = out_f32(&out[1].1);
    assert!(
        sq.iter().all(|v| v.is_infinite()),
        "Pow must overflow to inf in f16: {sq:?}"
    );
    let y = out_f32(&out[0].1);
    assert!(
        y.iter().all(|v| *v == 0.0),
        "d / inf collapses to 0 in f16: {y:?}"
    );

    let f32_src = DECOMPOSED_LN.replace("T[", "f32[");
    let out = run(&f32_src, vec![("x", Tensor::f32(vec![1, 4], xs.to_vec()))]).unwrap();
    let y = out_f32(&out[0].1);
    assert!(
        y.iter()
            .all(|v| v.is_finite() && v.abs() > 0.9 && v.abs() < 1.1),
        "{y:?}"
    );
}

#[test]
fn elementwise_rounds_once_to_nearest_even_and_underflows_like_ieee_half() {
    let src = r#"
ir_version 8
opset ai.onnx 17

graph @g(%a: f16[3], %b: f16[3]) -> (%s: f16[3], %p: f16[3]) {
  %s = Add(%a, %b)
  %p = Mul(%a, %b)
}
"#;
    // 2048 + 1 = 2049 is a tie between 2048 and 2050: round to even gives 2048. 1e-4 * 1e-4 = 1e-8 is under
    // half the smallest subnormal (2.98e-8): zero. 2^-12 * 2^-12 = 2^-24 is exactly the smallest subnormal.
    let a = f16s(&[2048.0, 1e-4, 2f32.powi(-12)]);
    let b = f16s(&[1.0, 1e-4, 2f32.powi(-12)]);
    let out = run(src, vec![("a", a), ("b", b)]).unwrap();
    let s = out_f32(&out[0].1);
    let p = out_f32(&out[1].1);
    assert_eq!(s[0], 2048.0);
    assert_eq!(p[1], 0.0);
    assert_eq!(p[2], 2f32.powi(-24));
    assert_eq!(out[0].1.tensor().unwrap().dtype(), mpopt_ir::DType::F16);
}

#[test]
fn overflow_past_65504_is_infinite() {
    let src = r#"
ir_version 8
opset ai.onnx 17

graph @g(%a: f16[2]) -> (%y: f16[2]) {
  %y = Mul(%a, %a)
}
"#;
    let out = run(src, vec![("a", f16s(&[256.0, 255.0]))]).unwrap();
    let y = out_f32(&out[0].1);
    assert_eq!(
        y[0],
        f32::INFINITY,
        "256^2 = 65536 rounds past 65504 to inf"
    );
    assert_eq!(y[1], 65024.0);
}

#[test]
fn matmul_accumulates_in_f32() {
    // A 1 x 4096 by 4096 x 1 product of ones: an f16 accumulator sticks at 2048 (2048 + 1 rounds back to
    // 2048); cuBLAS's f32 accumulation gives 4096, which f16 stores exactly.
    let src = r#"
ir_version 8
opset ai.onnx 17

graph @g(%a: f16[1,4096], %b: f16[4096,1]) -> (%y: f16[1,1]) {
  %y = MatMul(%a, %b)
}
"#;
    let ones = |shape: Vec<usize>| Tensor::new(shape, Data::F16(vec![f16::ONE; 4096]));
    let out = run(
        src,
        vec![("a", ones(vec![1, 4096])), ("b", ones(vec![4096, 1]))],
    )
    .unwrap();
    assert_eq!(out_f32(&out[0].1), vec![4096.0]);
}

const ONE_INPUT: &str = r#"
ir_version 8
opset ai.onnx 17

graph @g(%x: f32[2,3]) -> (%y: f32[2,3]) {
  %y = Relu(%x)
}
"#;

#[test]
fn bad_inputs_name_what_is_wrong() {
    let ok = Tensor::f32(vec![2, 3], vec![0.0; 6]);
    let e = run(ONE_INPUT, vec![]).unwrap_err().to_string();
    assert!(
        e.contains("missing input") && e.contains("'x'") && e.contains("f32[2,3]"),
        "{e}"
    );
    let e = run(ONE_INPUT, vec![("x", ok.clone()), ("z", ok.clone())])
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown input 'z'"), "{e}");
    let e = run(ONE_INPUT, vec![("x", Tensor::i64(vec![2, 3], vec![0; 6]))])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("input 'x'") && e.contains("dtype i64") && e.contains("expects f32"),
        "{e}"
    );
    let e = run(
        ONE_INPUT,
        vec![("x", Tensor::f32(vec![3, 2], vec![0.0; 6]))],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("input 'x'") && e.contains("[3, 2]"), "{e}");
}

#[test]
fn unsupported_ops_are_listed_before_running() {
    let src = r#"
ir_version 8
opset ai.onnx 17, com.example 1

graph @g(%x: f32[2]) -> (%y: f32[2]) {
  %a = com.example::Frobnicate(%x)
  %y = com.example::Twiddle(%a)
}
"#;
    let e = run(src, vec![]).unwrap_err().to_string();
    assert!(
        e.contains("unsupported ops") && e.contains("Frobnicate") && e.contains("Twiddle"),
        "{e}"
    );
}

#[test]
fn a_failing_node_is_named() {
    let src = r#"
ir_version 8
opset ai.onnx 17

graph @g(%x: f32[2,3]) -> (%y: f32[?]) {
  %s = const i64[1] [5]
  %y = Reshape(%x, %s) @bad_reshape
}
"#;
    let e = run(src, vec![("x", Tensor::f32(vec![2, 3], vec![0.0; 6]))])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("bad_reshape") && e.contains("Reshape") && e.contains("cannot reshape"),
        "{e}"
    );
}
