//! Window attributes no valid model has (found by fuzzing the node suite; each used to panic with a division
//! by zero or an index out of bounds): every one must be an error that names the attribute.

mod common;

use common::run_text_err;
use mpopt_exec::Tensor;

/// Each case's model (run by `run`) must fail with an error that contains the case's text.
fn expect_errors(cases: &[(&str, &str)], run: fn(&str) -> String) {
    for &(model, want) in cases {
        let e = run(model);
        assert!(
            e.contains(want),
            "{model}: the error {e:?} does not say {want:?}"
        );
    }
}

/// Runs `body` (lines that define `%y` from the graph input `%x`, given as `x`) and returns the error.
fn error_with(x: Tensor, body: &str) -> String {
    let dims: Vec<String> = x.shape.iter().map(|d| d.to_string()).collect();
    let src = format!(
        r#"
ir_version 10
opset ai.onnx 18

graph @g(%x: f32[{}]) -> (%y: ?) {{
  {body}
}}
"#,
        dims.join(",")
    );
    run_text_err(&src, vec![("x", x)])
}

/// Runs `node` (a line defining `%y` from `%x: f32[1,2,8,8]` and `%w: f32[2,2,3,3]`) and returns the error.
fn error_of(node: &str) -> String {
    let w = vec!["0.5"; 36].join(", ");
    let x = Tensor::f32(vec![1, 2, 8, 8], vec![1.0; 128]);
    error_with(x, &format!("%w = const f32[2,2,3,3] [{w}]\n  {node}"))
}

#[test]
fn window_attributes_out_of_range_are_errors_that_name_them() {
    let cases = [
        ("%y = Conv(%x, %w) {strides = [0, 0]}", "strides [0, 0]"),
        ("%y = Conv(%x, %w) {strides = [1]}", "strides [1]"),
        ("%y = Conv(%x, %w) {dilations = [0, 1]}", "dilations [0, 1]"),
        ("%y = Conv(%x, %w) {pads = [-5, -5, -5, -5]}", "negative"),
        ("%y = Conv(%x, %w) {group = 0}", "group 0"),
        (
            "%y = Conv(%x, %w) {kernel_shape = [3, -3]}",
            "kernel_shape [3, -3]",
        ),
        (
            "%y = MaxPool(%x) {kernel_shape = [2, 2], strides = [2]}",
            "strides [2]",
        ),
        (
            "%y = MaxPool(%x) {kernel_shape = [0, 2]}",
            "kernel_shape [0, 2]",
        ),
        (
            "%y = AveragePool(%x) {kernel_shape = [2, 2], strides = [0, 1]}",
            "strides [0, 1]",
        ),
        (
            "%y = ConvTranspose(%x, %w) {kernel_shape = [3]}",
            "kernel_shape [3]",
        ),
        (
            "%y = ConvTranspose(%x, %w) {strides = [0, 0]}",
            "strides [0, 0]",
        ),
        (
            "%y = ConvTranspose(%x, %w) {output_padding = [1]}",
            "output_padding [1]",
        ),
        (
            "%y = ConvTranspose(%x, %w) {pads = [9, 9, 9, 9]}",
            "trim more",
        ),
        (
            "%y = ConvTranspose(%x, %w) {output_shape = [4]}",
            "output_shape [4]",
        ),
        (
            "%y = ConvTranspose(%x, %w) {strides = [8589934592, 1]}",
            "past 2^31",
        ),
        // weights whose channels are not the input's
        (
            "%w2 = const f32[3,2,1,1] [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]\n  %y = ConvTranspose(%x, %w2)",
            "do not fit input",
        ),
        (
            "%s = const f32[2] [3.0, 2.0]\n  %y = Resize(%x, _, %s) {mode = \"nearest\"}",
            "Resize scales [3.0, 2.0]",
        ),
        (
            "%s = const i64[4] [1, 2, -8, 8]\n  %y = Resize(%x, _, _, %s)",
            "Resize sizes [1, 2, -8, 8]",
        ),
    ];
    expect_errors(&cases, error_of);
}

#[test]
fn padding_past_two_to_the_31_is_an_error_not_an_allocation() {
    let e = error_of("%y = MaxPool(%x) {kernel_shape = [2, 2], pads = [2, 2, 8589934592, 2]}");
    assert!(e.contains("more than 2^31"), "{e}");
    // pads whose sum overflows
    let e = error_of(
        "%y = MaxPool(%x) {kernel_shape = [2, 2], pads = [9223372036854775807, 0, 9223372036854775807, 0]}",
    );
    assert!(e.contains("more than 2^31"), "{e}");
}

/// Runs `body` (lines that define `%y` from `%x: f32[2,3,4]`) and returns the error.
fn error_of_3d(body: &str) -> String {
    error_with(
        Tensor::f32(vec![2, 3, 4], (0..24).map(|v| v as f32).collect()),
        body,
    )
}

#[test]
fn axis_and_count_attributes_out_of_range_are_errors_that_name_them() {
    let cases = [
        // a perm that repeats an axis
        ("%y = Transpose(%x) {perm = [0, 0, 1]}", "not a permutation"),
        // more outputs asked for than the node has
        (
            "%y, %z = Split(%x) {axis = 2, num_outputs = -3}",
            "num_outputs -3",
        ),
        (
            "%s = const i64[2] [-1, 5]\n  %y, %z = Split(%x, %s) {axis = 2}",
            "negative",
        ),
        // the time axis must be 0 or 1, and the lengths fit it
        (
            "%l = const i64[3] [1, 2, 3]\n  %y = ReverseSequence(%x, %l) {batch_axis = 1, time_axis = 2}",
            "time_axis 2",
        ),
        (
            "%l = const i64[3] [1, 2, 9]\n  %y = ReverseSequence(%x, %l) {batch_axis = 1, time_axis = 0}",
            "sequence_lens [1, 2, 9]",
        ),
        // batch_dims past the indices' rank
        (
            "%i = const i64[2,1] [0, 1]\n  %y = GatherND(%x, %i) {batch_dims = 5}",
            "batch_dims 5",
        ),
        // a stride of 0 when folding columns back into an image
        (
            "%img = const i64[2] [2, 2]\n  %blk = const i64[2] [1, 1]\n  %y = Col2Im(%x, %img, %blk) {strides = [1, 0]}",
            "strides [1, 0]",
        ),
        // 2^33 samples per bin: an error, not hours of sampling
        (
            "%z = const i64[1] [0]\n  %x4 = Unsqueeze(%x, %z)\n  %rois = const f32[1,4] [0.0, 0.0, 2.0, 2.0]\n  %bi = const i64[1] [0]\n  %y = RoiAlign(%x4, %rois, %bi) {sampling_ratio = 8589934592}",
            "more than 2^26 samples",
        ),
        // head counts that split Q and K into different head sizes
        (
            "%y = Attention(%x, %x, %x) {q_num_heads = 2, kv_num_heads = 4}",
            "do not agree",
        ),
        // data that asks for more than 2^32 elements: an error, not an abort
        (
            "%s = const i64[3] [4294967295, 4294967295, 2]\n  %y = ConstantOfShape(%s)",
            "more than 2^32 elements",
        ),
        (
            "%a = const f32[] [0.0]\n  %b = const f32[] [1.0]\n  %d = const f32[] [1e-12]\n  %y = Range(%a, %b, %d)",
            "more than 2^32",
        ),
        // a block size whose square overflows, a group count of 0, a scale that does not broadcast
        (
            "%z = const i64[1] [0]\n  %x4 = Unsqueeze(%x, %z)\n  %y = DepthToSpace(%x4) {blocksize = 8589934592}",
            "blocksize",
        ),
        (
            "%s = const f32[3] [1.0, 1.0, 1.0]\n  %y = GroupNormalization(%x, %s, %s) {num_groups = 0}",
            "num_groups 0",
        ),
        (
            "%s = const f32[3] [1.0, 1.0, 1.0]\n  %y = LayerNormalization(%x, %s) {axis = -1}",
            "does not broadcast",
        ),
        // a scalar has no axis to split along; a crop needs one size per axis
        (
            "%c = const f32[] [1.0]\n  %y = Split(%c) {num_outputs = 1}",
            "Split of a scalar",
        ),
        (
            "%s = const i64[1] [2]\n  %y = CenterCropPad(%x, %s)",
            "CenterCropPad shape [2]",
        ),
        ("%c = const f32[] [1.0]\n  %y = ArgMax(%c)", "of a scalar"),
        // a scalar has no axis to gather along
        (
            "%c = const f32[] [1.0]\n  %i = const i64[] [0]\n  %y = Gather(%c, %i)",
            "Gather of a scalar",
        ),
        // a hidden size the weights do not have
        (
            "%w = const f32[1,8,4] [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]\n  %r = const f32[1,8,2] [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]\n  %y = LSTM(%x, %w, %r) {hidden_size = 8589934592}",
            "hidden_size 8589934592",
        ),
    ];
    expect_errors(&cases, error_of_3d);
}
