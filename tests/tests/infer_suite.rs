//! `infer-types` against the ONNX node suite: with every declared type stripped except the graph inputs',
//! the inferred dtype of each graph output must equal the expected output's dtype (the suite declares outputs
//! with the dtype and shape of the expected arrays), and the inferred shape is compared where the inputs are
//! static. Runs on the node-suite folders in `MPOPT_SUITE_DIRS` (CI sets it); prints the percentages.

mod common;

use std::collections::BTreeMap;

use mpopt_ir::{Graph, TypeInfo};
use mpopt_passes::Pass;
use mpopt_passes::infer_types::InferTypes;

/// Tests whose expected output dtype cannot be inferred from types alone, with the reason.
const EXCEPTIONS: &[(&str, &str)] = &[];

fn strip(g: &mut Graph) {
    let inputs: Vec<_> = g.inputs().to_vec();
    for v in g.value_ids().collect::<Vec<_>>() {
        if !inputs.contains(&v) && g.value(v).initializer.is_none() {
            g.value_mut(v).ty = None;
        }
    }
}

fn elem(t: &Option<TypeInfo>) -> String {
    t.as_ref()
        .map_or("none".into(), mpopt_ir::text::type_string)
        .split('[')
        .next()
        .unwrap_or("")
        .to_string()
}

#[test]
fn node_suite_output_types() {
    let models: Vec<_> = common::suite_models()
        .into_iter()
        .filter(|p| {
            p.parent()
                .is_some_and(|d| d.join("test_data_set_0").is_dir())
        })
        .collect();
    if models.is_empty() {
        eprintln!("SKIP: no node-suite folders in MPOPT_SUITE_DIRS");
        return;
    }
    let (mut outputs, mut dtype_ok, mut shape_total, mut shape_ok) = (0, 0, 0, 0);
    let mut failures = Vec::new();
    let mut shape_misses: BTreeMap<String, usize> = BTreeMap::new();
    for path in &models {
        let test = path
            .parent()
            .unwrap()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .to_string();
        let mut m = mpopt_onnx::load(path).unwrap();
        let expected: Vec<Option<TypeInfo>> = m
            .graph
            .outputs()
            .iter()
            .map(|&v| m.graph.value(v).ty.clone())
            .collect();
        let static_inputs = m.graph.inputs().iter().all(|&v| {
            m.graph
                .value(v)
                .ty
                .as_ref()
                .and_then(TypeInfo::tensor_shape)
                .is_some_and(|s| {
                    s.iter()
                        .all(|d| matches!(d.value, mpopt_ir::DimValue::Known(_)))
                })
        });
        strip(&mut m.graph);
        let mut pass = InferTypes::default();
        pass.run(&mut m).unwrap();
        for (i, &v) in m.graph.outputs().iter().enumerate() {
            let got = &m.graph.value(v).ty;
            outputs += 1;
            if elem(got) == elem(&expected[i]) {
                dtype_ok += 1;
            } else if !EXCEPTIONS.iter().any(|(t, _)| *t == test) {
                failures.push(format!(
                    "{test} output {i}: inferred {}, expected {}",
                    elem(got),
                    elem(&expected[i])
                ));
            }
            if static_inputs
                && let Some(exp) = expected[i].as_ref().and_then(TypeInfo::tensor_shape)
            {
                shape_total += 1;
                if got.as_ref().and_then(TypeInfo::tensor_shape) == Some(exp) {
                    shape_ok += 1;
                } else {
                    let op = m.graph.producer(v).map_or("input".to_string(), |(n, _)| {
                        m.graph.node(n).op_type.clone()
                    });
                    if std::env::var_os("MPOPT_INFER_DEBUG").is_some() {
                        eprintln!(
                            "shape miss {test} output {i} ({op}): inferred {}, expected {}",
                            got.as_ref()
                                .map_or("none".into(), mpopt_ir::text::type_string),
                            mpopt_ir::text::type_string(expected[i].as_ref().unwrap())
                        );
                    }
                    *shape_misses.entry(op).or_default() += 1;
                }
            }
        }
    }
    eprintln!(
        "node suite: {} models, {outputs} outputs; dtype {dtype_ok}/{outputs} ({:.1}%); shape {shape_ok}/{shape_total} ({:.1}%) of outputs with static inputs",
        models.len(),
        100.0 * dtype_ok as f64 / outputs as f64,
        100.0 * shape_ok as f64 / shape_total.max(1) as f64
    );
    eprintln!("shape misses by op: {shape_misses:?}");
    assert!(
        failures.is_empty(),
        "{} dtype mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
