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

/// `run_each_node` shows every scheduled node once, in order, with the inputs and outputs the full trace
/// holds, while the run itself keeps nothing.
#[test]
fn each_node_sees_its_inputs_and_outputs() {
    let m = parse_model(SRC).unwrap();
    let exec = Executor::new(&m).unwrap();
    let x = Tensor::f32(vec![2, 3], vec![-1.5, 0.0, 2.0, 3.5, -0.25, 1.0]);
    let feed = || vec![("x".to_string(), Value::Tensor(x.clone()))];
    let all = exec
        .run(
            feed(),
            &RunOptions {
                keep_all: true,
                ..Default::default()
            },
        )
        .unwrap();
    let traced = |n: &str| {
        let (_, v) = all.trace.iter().find(|(k, _)| k == n).unwrap();
        v.tensor().unwrap().to_f32s().unwrap()
    };
    let mut seen = Vec::new();
    let out = exec
        .run_each_node(
            feed(),
            &RunOptions::default(),
            &mut |_, _, _| {},
            &mut |id, ins, outs| {
                let g = &m.graph;
                let node = g.node(id);
                for (v, x) in node
                    .inputs()
                    .iter()
                    .chain(node.outputs())
                    .zip(ins.iter().chain(outs))
                {
                    let (v, x) = (v.unwrap(), x.as_ref().unwrap());
                    assert_eq!(
                        x.tensor().unwrap().to_f32s().unwrap(),
                        traced(g.value(v).name())
                    );
                }
                seen.push(node.op_type.clone());
            },
        )
        .unwrap();
    assert_eq!(seen, ["Relu", "Neg", "Abs", "Add"]);
    assert_eq!(exec.schedule().len(), 4);
    assert!(out.trace.is_empty());
    let y = |o: &[(String, Value)]| o[0].1.tensor().unwrap().to_f32s().unwrap();
    assert_eq!(y(&out.outputs), y(&all.outputs));
}
