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
            &mut |scope, id, ins, outs| {
                assert_eq!(scope, "");
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

/// Subgraph nodes are shown too, under their graph's scope, once per Loop iteration, with the values they
/// read from the enclosing scope.
#[test]
fn each_node_sees_subgraph_nodes_once_per_iteration() {
    let src = "ir_version 8
opset ai.onnx 17

graph @loop(%a0: f32[1,2], %w: f32[2,2]) -> (%a: f32[1,2]) {
  %n = const i64[] [3]
  %c = const bool[] [true]
  %a = Loop(%n, %c, %a0) {body = graph @body(%i: i64[], %cond: bool[], %acc: f32[1,2]) -> (%cond_out: bool[], %acc_out: f32[1,2]) captures (%w: f32[2,2]) {
    %cond_out = Identity(%cond)
    %acc_out = MatMul(%acc, %w)
  }}
}
";
    let m = parse_model(src).unwrap();
    let exec = Executor::new(&m).unwrap();
    let feed = vec![
        (
            "a0".to_string(),
            Value::Tensor(Tensor::f32(vec![1, 2], vec![1.0, 2.0])),
        ),
        (
            "w".to_string(),
            Value::Tensor(Tensor::f32(vec![2, 2], vec![0.0, 1.0, 1.0, 0.0])),
        ),
    ];
    let (loop_id, _) = m.graph.nodes().find(|(_, n)| n.op_type == "Loop").unwrap();
    let body = mpopt_exec::subgraph_scope("", loop_id, "body");
    let mut seen = Vec::new();
    let out = exec
        .run_each_node(
            feed,
            &RunOptions::default(),
            &mut |_, _, _| {},
            &mut |scope, id, ins, outs| {
                let g = if scope.is_empty() {
                    &m.graph
                } else {
                    assert_eq!(scope, body);
                    m.graph.node(loop_id).subgraphs().next().unwrap().1
                };
                let node = g.node(id);
                if node.op_type == "MatMul" {
                    let f32s = |x: &Option<std::sync::Arc<Value>>| {
                        x.as_ref().unwrap().tensor().unwrap().to_f32s().unwrap()
                    };
                    // the captured %w arrives as an input
                    assert_eq!(f32s(&ins[1]), [0.0, 1.0, 1.0, 0.0]);
                    let (a, y) = (f32s(&ins[0]), f32s(&outs[0]));
                    assert_eq!(y, [a[1], a[0]]);
                }
                seen.push(format!("{scope}:{}", node.op_type));
            },
        )
        .unwrap();
    let trip = [format!("{body}:Identity"), format!("{body}:MatMul")];
    let mut want: Vec<String> = (0..3).flat_map(|_| trip.clone()).collect();
    want.push(":Loop".into());
    assert_eq!(seen, want);
    // three swaps of [1, 2]
    assert_eq!(
        out.outputs[0].1.tensor().unwrap().to_f32s().unwrap(),
        [2.0, 1.0]
    );
}
