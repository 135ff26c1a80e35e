//! ai.onnx.ml ops on cases the node suite does not cover, worked out by hand.

mod common;

use common::run_text as run;
use mpopt_exec::{Data, Tensor};

/// Two trees over two features: tree 0 tests `x0 <= 0.5` (NaN goes true) and gives 1 or 3 to target 0;
/// tree 1 tests `x1 in {2, 5}` and gives 10 to target 1, or 20 to target 0.
fn trees(aggregate: i64) -> String {
    format!(
        r#"
ir_version 10
opset ai.onnx 21, ai.onnx.ml 5

graph @g(%x: f32[3,2]) -> (%y: f32[3,2]) {{
  %y = ai.onnx.ml::TreeEnsemble(%x) {{aggregate_function = {aggregate}, leaf_targetids = [0, 0, 1, 0], leaf_weights = tensor f32[4] [1.0, 3.0, 10.0, 20.0], membership_values = tensor f32[3] [2.0, 5.0, nan], n_targets = 2, nodes_falseleafs = [1, 1], nodes_falsenodeids = [1, 3], nodes_featureids = [0, 1], nodes_missing_value_tracks_true = [1, 0], nodes_modes = tensor u8[2] [0, 6], nodes_splits = tensor f32[2] [0.5, 0.0], nodes_trueleafs = [1, 1], nodes_truenodeids = [0, 2], post_transform = 0, tree_roots = [0, 1]}}
}}
"#
    )
}

#[test]
fn tree_ensemble_routes_missing_values_and_set_members_and_aggregates() {
    let x = Tensor::f32(vec![3, 2], vec![0.0, 2.0, f32::NAN, 3.0, 1.0, 5.0]);
    let y = |agg: i64| {
        run(&trees(agg), vec![("x", x.clone())])[0]
            .to_f32s()
            .unwrap()
    };
    // row 0: leaf 0 (t0 1), leaf 2 (t1 10); row 1: NaN goes true, leaf 0 (t0 1), 3 is no member, leaf 3
    // (t0 20); row 2: leaf 1 (t0 3), leaf 2 (t1 10)
    assert_eq!(y(1), [1.0, 10.0, 21.0, 0.0, 3.0, 10.0]);
    assert_eq!(y(0), [0.5, 5.0, 10.5, 0.0, 1.5, 5.0]);
    // a target no tree reaches keeps the starting value, f32's lowest for MAX
    assert_eq!(y(3), [1.0, 10.0, 20.0, f32::MIN, 3.0, 10.0]);
    assert_eq!(y(2), [1.0, 10.0, 1.0, f32::MAX, 3.0, 10.0]);
}

#[test]
fn label_encoder_maps_floats_with_nan_and_signed_zero_keys() {
    let src = r#"
ir_version 10
opset ai.onnx 21, ai.onnx.ml 4

graph @g(%x: f32[5]) -> (%y: i64[5]) {
  %y = ai.onnx.ml::LabelEncoder(%x) {default_int64 = -7, keys_floats = [0.0, nan, 2.5], values_int64s = [10, 11, 12]}
}
"#;
    let x = Tensor::f32(vec![5], vec![-0.0, f32::NAN, 2.5, 3.0, 0.0]);
    let y = run(src, vec![("x", x)]);
    assert_eq!(y[0].to_i64s().unwrap(), [10, 11, 12, -7, 10]);
}

#[test]
fn array_feature_extractor_picks_from_the_last_axis() {
    let src = r#"
ir_version 10
opset ai.onnx 21, ai.onnx.ml 1

graph @g(%x: i64[2,3]) -> (%y: i64[2,2], %b: f32[2,3]) {
  %i = const i64[2] [2, 0]
  %y = ai.onnx.ml::ArrayFeatureExtractor(%x, %i)
  %f = Cast(%x) {to = 1}
  %b = ai.onnx.ml::Binarizer(%f) {threshold = 2.5}
}
"#;
    let x = Tensor::new(vec![2, 3], Data::I64(vec![1, 2, 3, 4, 5, 6]));
    let out = run(src, vec![("x", x)]);
    assert_eq!(out[0].shape, [2, 2]);
    assert_eq!(out[0].to_i64s().unwrap(), [3, 1, 6, 4]);
    assert_eq!(out[1].to_f32s().unwrap(), [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]);
}
