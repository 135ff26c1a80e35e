//! What a run keeps: `keep_all` traces every value of the main graph; with `keep_only` it traces just the
//! named ones (the others are freed as in a plain run), with the same values and outputs.

use std::collections::HashSet;

use mpopt_exec::{Executor, RunOptions, Tensor, Value};
use mpopt_ir::text::parse_model;

const SRC: &str = "ir_version 8
opset ai.onnx 17

graph @chain(%x: f32[2,3]) -> (%y: f32[2,3]) {
  %a = Relu(%x)
  %b = Neg(%a)
  %c = Abs(%b)
  %y = Add(%c, %x)
}
";

#[test]
fn keep_only_traces_just_the_named_values() {
    let m = parse_model(SRC).unwrap();
    let exec = Executor::new(&m).unwrap();
    let x = Tensor::f32(vec![2, 3], vec![-1.5, 0.0, 2.0, 3.5, -0.25, 1.0]);
    let run = |opts: RunOptions| {
        exec.run(vec![("x".to_string(), Value::Tensor(x.clone()))], &opts)
            .unwrap()
    };
    let all = run(RunOptions {
        keep_all: true,
        ..Default::default()
    });
    let names: Vec<&str> = all.trace.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["x", "a", "b", "c", "y"]);
    let some = run(RunOptions {
        keep_all: true,
        keep_only: Some(HashSet::from(["b".to_string(), "x".to_string()])),
        ..Default::default()
    });
    let names: Vec<&str> = some.trace.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["x", "b"]);
    let value = |t: &[(String, std::sync::Arc<Value>)], n: &str| {
        let (_, v) = t.iter().find(|(k, _)| k == n).unwrap();
        v.tensor().unwrap().to_f32s().unwrap()
    };
    assert_eq!(value(&some.trace, "b"), value(&all.trace, "b"));
    assert_eq!(
        value(&some.trace, "b"),
        [-0.0, -0.0, -2.0, -3.5, -0.0, -1.0]
    );
    let out = |o: &[(String, Value)]| o[0].1.tensor().unwrap().to_f32s().unwrap();
    assert_eq!(out(&some.outputs), out(&all.outputs));
}
