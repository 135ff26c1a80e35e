//! Integer and quantized ops, and old-opset control flow, on cases the node suite does not cover: values
//! worked out by hand from the operator definitions.

mod common;

use common::run_text as run;
use mpopt_exec::{Data, Tensor};

fn ints(t: &Tensor) -> Vec<i64> {
    t.to_i64s().expect("integer output")
}

#[test]
fn right_shifts_past_the_width_keep_the_sign_and_left_shifts_clear() {
    // opset 28: a shift that is negative or of the width or more moves every bit out
    let src = r#"
ir_version 10
opset ai.onnx 28

graph @g() -> (%r: i8[4], %l: i8[4], %u: u8[2]) {
  %x = const i8[4] [-8, 4, -1, 5]
  %s = const i8[4] [-1, 8, 127, 1]
  %ux = const u8[2] [200, 7]
  %us = const u8[2] [8, 9]
  %r = BitShift(%x, %s) {direction = "RIGHT"}
  %l = BitShift(%x, %s) {direction = "LEFT"}
  %u = BitShift(%ux, %us) {direction = "RIGHT"}
}
"#;
    let out = run(src, vec![]);
    assert_eq!(ints(&out[0]), [-1, 0, -1, 2]);
    assert_eq!(ints(&out[1]), [0, 0, 0, 10]);
    assert_eq!(ints(&out[2]), [0, 0]);
}

#[test]
fn space_to_depth_orders_channels_by_mode() {
    let src = r#"
ir_version 10
opset ai.onnx 28

graph @g(%x: f32[1,2,2,2]) -> (%dcr: f32[1,8,1,1], %crd: f32[1,8,1,1]) {
  %dcr = SpaceToDepth(%x) {blocksize = 2}
  %crd = SpaceToDepth(%x) {blocksize = 2, mode = "CRD"}
}
"#;
    let x = Tensor::f32(vec![1, 2, 2, 2], (0..8).map(|v| v as f32).collect());
    let out = run(src, vec![("x", x)]);
    // channel c, block offset (i, j) at x[c, i, j] = 4c + 2i + j
    // DCR: output channel (i, j, c); CRD: (c, i, j), the input order
    assert_eq!(
        out[0].to_f32s().unwrap(),
        [0.0, 4.0, 1.0, 5.0, 2.0, 6.0, 3.0, 7.0]
    );
    assert_eq!(
        out[1].to_f32s().unwrap(),
        [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    );
}

#[test]
fn scan8_runs_each_batch_entry_for_its_length_and_pads_with_zeros() {
    // a running sum over [batch 2, sequence 3, 1], the second entry 1 step long
    let src = r#"
ir_version 3
opset ai.onnx 8

graph @g(%lens: i64[2], %init: f32[2,1], %x: f32[2,3,1]) -> (%last: f32[2,1], %sums: f32[2,3,1]) {
  %last, %sums = Scan(%lens, %init, %x) {body = graph @body(%acc: f32[1], %v: f32[1]) -> (%acc_out: f32[1], %seen: f32[1]) {
    %acc_out = Add(%acc, %v)
    %seen = Identity(%acc_out)
  }, num_scan_inputs = 1}
}
"#;
    let lens = Tensor::i64(vec![2], vec![3, 1]);
    let init = Tensor::f32(vec![2, 1], vec![0.0, 100.0]);
    let x = Tensor::f32(vec![2, 3, 1], vec![1.0, 2.0, 3.0, 10.0, 20.0, 30.0]);
    let out = run(src, vec![("lens", lens), ("init", init), ("x", x)]);
    assert_eq!(out[0].shape, [2, 1]);
    assert_eq!(out[0].to_f32s().unwrap(), [6.0, 110.0]);
    assert_eq!(out[1].shape, [2, 3, 1]);
    assert_eq!(out[1].to_f32s().unwrap(), [1.0, 3.0, 6.0, 110.0, 0.0, 0.0]);
}

#[test]
fn qlinear_conv_with_per_channel_weights_rounds_half_to_even_and_saturates() {
    // x - 10 = [0, 10, 20, 30]; channel 0: (w 3 - zp 1) * that + bias 2 = [2, 22, 42, 62], times
    // 0.5 * 0.25 / 0.5 = 0.25: [0.5, 5.5, 10.5, 15.5] -> half to even [0, 6, 10, 16], + 128.
    // channel 1: -2 * that - 10 = [-10, -30, -50, -70], times 0.5 * 4 / 0.5 = 4: + 128 = [88, 8, -72, -152],
    // clipped to uint8.
    let src = r#"
ir_version 8
opset ai.onnx 13

graph @g(%x: u8[1,1,2,2]) -> (%y: u8[1,2,2,2], %acc: i32[1,2,2,2]) {
  %xs = const f32[] [0.5]
  %xz = const u8[] [10]
  %w = const i8[2,1,1,1] [3, -2]
  %ws = const f32[2] [0.25, 4.0]
  %wz = const i8[2] [1, 0]
  %ys = const f32[] [0.5]
  %yz = const u8[] [128]
  %b = const i32[2] [2, -10]
  %y = QLinearConv(%x, %xs, %xz, %w, %ws, %wz, %ys, %yz, %b)
  %acc = ConvInteger(%x, %w, %xz, %wz)
}
"#;
    let x = Tensor::new(vec![1, 1, 2, 2], Data::U8(vec![10, 20, 30, 40]));
    let out = run(src, vec![("x", x)]);
    assert_eq!(out[0].dtype(), mpopt_ir::DType::U8);
    assert_eq!(ints(&out[0]), [128, 134, 138, 144, 88, 8, 0, 0]);
    // without the bias
    assert_eq!(out[1].dtype(), mpopt_ir::DType::I32);
    assert_eq!(ints(&out[1]), [0, 20, 40, 60, 0, -20, -40, -60]);
}

#[test]
fn matmul_integer_subtracts_zero_points_and_sums_exactly() {
    // 255 * 255 * 300 = 19,507,500: past f32's exact integers (2^24), exact here
    let src = r#"
ir_version 8
opset ai.onnx 13

graph @g(%a: u8[1,300], %b: u8[300,1]) -> (%y: i32[1,1], %z: i32[1,1]) {
  %az = const u8[] [0]
  %bz = const u8[] [1]
  %y = MatMulInteger(%a, %b, %az, %az)
  %z = MatMulInteger(%a, %b, %az, %bz)
}
"#;
    let a = Tensor::new(vec![1, 300], Data::U8(vec![255; 300]));
    let mut bv = vec![255u8; 300];
    bv[0] = 254;
    let b = Tensor::new(vec![300, 1], Data::U8(bv));
    let out = run(src, vec![("a", a), ("b", b)]);
    assert_eq!(ints(&out[0]), [255 * 255 * 299 + 255 * 254]);
    assert_eq!(ints(&out[1]), [255 * 254 * 299 + 255 * 253]);
}

#[test]
fn malformed_attributes_are_errors_naming_the_problem() {
    // each would index or divide out of bounds without its check
    let cases: [(&str, [usize; 4], &str); 3] = [
        (
            "SpaceToDepth(%x) {blocksize = 0}",
            [1, 1, 2, 2],
            "blocksize 0",
        ),
        (
            "DepthToSpace(%x) {blocksize = 2}",
            [1, 3, 2, 2],
            "does not divide the 3 channels",
        ),
        (
            "MaxUnpool(%x, %i) {kernel_shape = [2, 2], pads = [0, 0]}",
            [1, 1, 2, 2],
            "do not fit a 2-D kernel",
        ),
    ];
    for (node, shape, expected) in cases {
        let dims = shape.map(|d| d.to_string()).join(",");
        let src = format!(
            "ir_version 8\nopset ai.onnx 17\n\ngraph @g(%x: f32[{dims}]) -> (%y: f32[...]) {{\n  %i = const i64[1,1,2,2] [0, 1, 2, 3]\n  %y = {node}\n}}\n"
        );
        let x = Tensor::f32(shape.to_vec(), vec![1.0; shape.iter().product()]);
        let e = common::run_text_err(&src, vec![("x", x)]);
        assert!(e.contains(expected), "{node}: {e}");
    }
}
