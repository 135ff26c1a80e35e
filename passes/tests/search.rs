//! `search-precision` as a library user drives it: progress reports and determinism, on the flushed-weights
//! fixture.

use std::sync::{Arc, Mutex};

use mpopt_passes::calibrate::InputSet;
use mpopt_passes::search_precision::{Progress, SearchOptions, SearchPrecision, Tolerance};
use mpopt_passes::{Pass, pipeline};

fn fixture() -> mpopt_ir::Model {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata/passes/search-precision/flushed_weights.mpir");
    mpopt_ir::text::parse_model(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn inputs() -> InputSet {
    let x: Vec<f32> = (0..8).map(|i| (i as f32 - 3.5) * 250.0).collect();
    vec![(
        "x".into(),
        mpopt_exec::Value::Tensor(mpopt_exec::Tensor::f32(vec![2, 4], x)),
    )]
}

fn decide(progress: Option<Progress>) -> Vec<String> {
    let mut m = fixture();
    pipeline::by_name("infer-types")
        .unwrap()
        .run(&mut m)
        .unwrap();
    SearchPrecision::new(SearchOptions {
        tolerances: vec![Tolerance::parse("max-rel=0.01").unwrap()],
        sets: vec![inputs()],
        observe: true,
        progress,
        ..SearchOptions::default()
    })
    .run(&mut m)
    .unwrap();
    m.graph
        .nodes()
        .filter_map(|(_, n)| {
            n.precision
                .as_ref()
                .map(|p| format!("{}: {} ({})", n.op_type, p.dtype, p.rule))
        })
        .collect()
}

#[test]
fn progress_covers_every_stage_and_decisions_repeat() {
    let seen: Arc<Mutex<Vec<(String, usize, usize)>>> = Arc::default();
    let log = seen.clone();
    let first = decide(Some(Progress(Arc::new(move |s: &str, d, t| {
        log.lock().unwrap().push((s.to_string(), d, t))
    }))));
    let seen = seen.lock().unwrap();
    for stage in ["reference", "per-node", "check", "done"] {
        assert!(seen.iter().any(|(s, ..)| s == stage), "{stage}: {seen:?}");
    }
    // every candidate is counted once: the per-node stage reaches its total
    assert!(
        seen.iter()
            .any(|(s, d, t)| s == "per-node" && d == t && *t > 0),
        "{seen:?}"
    );
    assert_eq!(seen.last().unwrap().0, "done");
    // the flushed %wb keeps its MatMul fp32 and the other MatMul runs low, the same on every run
    assert!(
        first.contains(&"MatMul: f16 (allow)".to_string()),
        "{first:?}"
    );
    assert!(
        first.contains(&"MatMul: f32 (search: kept fp32)".to_string()),
        "{first:?}"
    );
    assert_eq!(first, decide(None));
}
