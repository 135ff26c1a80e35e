//! `search-precision` as a library user drives it: progress reports and determinism, on the flushed-weights
//! fixture.

use std::sync::{Arc, Mutex};

use mpopt_passes::calibrate::InputSet;
use mpopt_passes::search_precision::{Progress, SearchOptions, SearchPrecision, Tolerance};
use mpopt_passes::{Pass, pipeline};

/// A model in the IR text format, with its types inferred.
fn typed(src: &str) -> mpopt_ir::Model {
    let mut m = mpopt_ir::text::parse_model(src).unwrap();
    pipeline::by_name("infer-types")
        .unwrap()
        .run(&mut m)
        .unwrap();
    m
}

/// A search-precision fixture, typed.
fn fixture(name: &str) -> mpopt_ir::Model {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata/passes/search-precision")
        .join(name);
    typed(&std::fs::read_to_string(path).unwrap())
}

/// Runs the search on `m` with budget `tolerance` on [`inputs`], observing them; `opts` sets the rest.
fn search(
    m: &mut mpopt_ir::Model,
    tolerance: &str,
    opts: SearchOptions,
) -> mpopt_passes::PassOutcome {
    search_with(
        m,
        tolerance,
        SearchOptions {
            sets: vec![inputs()],
            observe: true,
            ..opts
        },
    )
}

/// Runs the search on `m` with budget `tolerance`; `opts` gives the input sets and the rest.
fn search_with(
    m: &mut mpopt_ir::Model,
    tolerance: &str,
    opts: SearchOptions,
) -> mpopt_passes::PassOutcome {
    SearchPrecision::new(SearchOptions {
        tolerances: vec![Tolerance::parse(tolerance).unwrap()],
        ..opts
    })
    .run(m)
    .unwrap()
}

fn inputs() -> InputSet {
    let x: Vec<f32> = (0..8).map(|i| (i as f32 - 3.5) * 250.0).collect();
    vec![(
        "x".into(),
        mpopt_exec::Value::Tensor(mpopt_exec::Tensor::f32(vec![2, 4], x)),
    )]
}

fn decide(progress: Option<Progress>) -> Vec<String> {
    let mut m = fixture("flushed_weights.mpir");
    search(
        &mut m,
        "max-rel=0.01",
        SearchOptions {
            progress,
            ..SearchOptions::default()
        },
    );
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

/// The search's fields of kind `kind` in a pass outcome.
fn record(out: &mpopt_passes::PassOutcome, kind: &str) -> Vec<(&'static str, String)> {
    out.records
        .iter()
        .find(|r| r.kind == kind)
        .unwrap_or_else(|| panic!("no {kind} record"))
        .fields
        .clone()
}

/// The per-node pass runs inside the reference run, on the decisions the observations can at best allow.
/// With `--to auto` an observed magnitude beyond fp16's range turns a node bf16 instead of the f16 it was
/// measured in: it is measured again, after one more run that keeps its values, and nothing is left
/// unmeasured.
#[test]
fn candidates_the_observations_change_are_measured_after_one_more_run() {
    let src = "ir_version 8
opset ai.onnx 17

graph @scaled(%x: f32[2,4]) -> (%y: f32[2,4]) {
  %s = const f32[] [100.0]
  %h = Mul(%x, %s)
  %y = Add(%h, %x)
}
";
    let run = |auto_bf16: bool| {
        let mut m = typed(src);
        // |x| up to 875: |h| up to 87500, past fp16's 65504 and well within bf16's range
        let out = search(
            &mut m,
            "max-rel=0.02",
            SearchOptions {
                precision: mpopt_passes::assign_precision::PrecisionOptions {
                    auto_bf16,
                    ..Default::default()
                },
                ..SearchOptions::default()
            },
        );
        let mul = m
            .graph
            .nodes()
            .find(|(_, n)| n.op_type == "Mul")
            .and_then(|(_, n)| n.precision.clone())
            .unwrap();
        (record(&out, "search-cost"), mul.dtype)
    };
    let (cost, dtype) = run(true);
    assert_eq!(dtype, mpopt_ir::DType::BF16);
    assert_eq!(field(&cost, "reference_runs"), "2", "{cost:?}");
    assert_eq!(field(&cost, "nodes_measured"), "2", "{cost:?}");
    // fp16 only: the Mul stays fp32 (overflow), the Add is measured during the one reference run
    let (cost, dtype) = run(false);
    assert_eq!(dtype, mpopt_ir::DType::F32);
    assert_eq!(field(&cost, "reference_runs"), "1", "{cost:?}");
}

/// Progress on a model with a node folded before the run (a MatMul of two constants, so measured after
/// it): every stage of the per-node pass reaches its total.
#[test]
fn per_node_progress_reaches_its_total_with_folded_candidates() {
    let src = "ir_version 8
opset ai.onnx 17

graph @folded(%x: f32[2,4]) -> (%y: f32[2,4]) {
  %a = const f32[4,4] [0.5, 0.0, 0.25, 0.0, 0.0, 0.5, 0.0, 0.25, 0.25, 0.0, 0.5, 0.0, 0.0, 0.25, 0.0, 0.5]
  %b = const f32[4,4] [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
  %w = MatMul(%a, %b)
  %y = MatMul(%x, %w)
}
";
    let mut m = typed(src);
    let seen: Arc<Mutex<Vec<(String, usize, usize)>>> = Arc::default();
    let log = seen.clone();
    search(
        &mut m,
        "max-rel=0.01",
        SearchOptions {
            progress: Some(Progress(Arc::new(move |s: &str, d, t| {
                log.lock().unwrap().push((s.to_string(), d, t))
            }))),
            ..SearchOptions::default()
        },
    );
    let per_node: Vec<(usize, usize)> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(s, ..)| s == "per-node")
        .map(|(_, d, t)| (*d, *t))
        .collect();
    // the MatMul of %x during the run, the folded one after it
    assert_eq!(
        per_node.iter().filter(|p| **p == (1, 1)).count(),
        2,
        "{per_node:?}"
    );
    assert!(per_node.iter().all(|(d, t)| d <= t), "{per_node:?}");
}

/// A node kept in an If branch is named in the report by its path, and only that branch is searched.
#[test]
fn a_kept_body_node_is_reported_by_its_path() {
    let mut m = fixture("if_branch.mpir");
    let out = search(&mut m, "max-rel=0.01", SearchOptions::default());
    let kept: Vec<String> = out
        .records
        .iter()
        .filter(|r| r.kind == "search-kept")
        .map(|r| r.fields.iter().find(|f| f.0 == "node").unwrap().1.clone())
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(
        kept[0].starts_with("#")
            && kept[0].contains(" (If) > then_branch > ")
            && kept[0].ends_with("(MatMul)"),
        "{kept:?}"
    );
    // the then branch's three low nodes are measured; the else branch keeps the static rules (its captured
    // weights flush), so it has no candidate to leave unmeasured
    let cost = record(&out, "search-cost");
    assert_eq!(
        cost.iter().find(|f| f.0 == "nodes_measured").unwrap().1,
        "3"
    );
    assert!(out.notes[0].contains("(0 not:"), "{:?}", out.notes);
}

/// Every record of kind `kind` in a pass outcome.
fn records(out: &mpopt_passes::PassOutcome, kind: &str) -> Vec<Vec<(&'static str, String)>> {
    out.records
        .iter()
        .filter(|r| r.kind == kind)
        .map(|r| r.fields.clone())
        .collect()
}

fn field(fs: &[(&str, String)], k: &str) -> String {
    fs.iter()
        .find(|f| f.0 == k)
        .unwrap_or_else(|| panic!("no {k} in {fs:?}"))
        .1
        .clone()
}

/// A two-class "classifier" `y = x W` over a batch of two, whose second item is a near-tie (1.0001
/// against 1.0002: one value in fp16, so the all-low model flips it) and whose first is not.
fn near_tie(x_type: &str, y: &str) -> (mpopt_ir::Model, InputSet) {
    near_tie_at("ir_version 8\nopset ai.onnx 17", x_type, y)
}

/// [`near_tie`] with this header (IR version and opsets).
fn near_tie_at(header: &str, x_type: &str, y: &str) -> (mpopt_ir::Model, InputSet) {
    let src = format!(
        "{header}

graph @cls(%x: {x_type}) -> (%y: f32[N,2]) {{
  %w = const f32[2,2] [1.0, 0.0, 0.0, 1.0]
  {y}
}}
"
    );
    let x = vec![1.0, 0.0, 1.0001, 1.0002];
    let set = vec![(
        "x".into(),
        mpopt_exec::Value::Tensor(mpopt_exec::Tensor::f32(vec![2, 2], x)),
    )];
    (typed(&src), set)
}

/// [`search_with`] on one input set, with the default options.
fn search_on(m: &mut mpopt_ir::Model, set: InputSet, tolerance: &str) -> mpopt_passes::PassOutcome {
    search_with(
        m,
        tolerance,
        SearchOptions {
            sets: vec![set],
            ..SearchOptions::default()
        },
    )
}

/// With a top-1 budget of 100%, the first proposal runs first on the batch item closest to flipping: the
/// near-tie flips there, the check fails for half a whole check's cost, and the repaired model is
/// verified on the whole set.
#[test]
fn the_first_check_is_screened_on_the_item_closest_to_flipping() {
    let (mut m, set) = near_tie("f32[N,2]", "%y = MatMul(%x, %w)");
    let out = search_on(&mut m, set, "top1=1");
    let screens = records(&out, "search-screen");
    assert_eq!(screens.len(), 1, "{:?}", out.records);
    let s = &screens[0];
    assert!(field(s, "item").contains("batch item 1 of 2"), "{s:?}");
    assert_eq!(field(s, "decisions"), "every candidate low");
    assert_eq!(field(s, "pass"), "false", "{s:?}");
    // the verdict comes from whole checks: the last one holds, and the MatMul stays fp32
    let checks = records(&out, "search-check");
    assert_eq!(field(checks.last().unwrap(), "pass"), "true", "{checks:?}");
    assert!(
        checks
            .iter()
            .all(|c| field(c, "decisions") != "every candidate low"),
        "the failed screen stands for the all-low check: {checks:?}"
    );
    let mm = m
        .graph
        .nodes()
        .find(|(_, n)| n.op_type == "MatMul")
        .unwrap()
        .1;
    assert_eq!(mm.precision.as_ref().unwrap().dtype, mpopt_ir::DType::F32);
    let cost = record(&out, "search-cost");
    assert_eq!(field(&cost, "screened"), "0.500");
    let runs: f64 = field(&cost, "model_runs").parse().unwrap();
    let whole: f64 = field(&cost, "whole_model_checks").parse().unwrap();
    assert_eq!(runs, 1.0 + whole + 0.5, "{cost:?}");
}

/// No screen where a miss on one item need not be a miss on the set (a cosine budget) or where the batch
/// is a fixed size; a screen that finds the item alone is not a slice of the batch is dropped, and the
/// whole check runs as before.
#[test]
fn no_screen_where_an_item_cannot_stand_for_its_set() {
    let (mut m, set) = near_tie("f32[N,2]", "%y = MatMul(%x, %w)");
    let out = search_on(&mut m, set, "cosine=0.99");
    assert!(records(&out, "search-screen").is_empty());

    let (mut m, set) = near_tie("f32[2,2]", "%y = MatMul(%x, %w)");
    let out = search_on(&mut m, set, "top1=1");
    assert!(records(&out, "search-screen").is_empty());

    // nothing to lower: MatMul takes no bf16 before opset 13, so the first proposal is the fp32 model
    let (mut m, set) = near_tie_at(
        "ir_version 7\nopset ai.onnx 11",
        "f32[N,2]",
        "%y = MatMul(%x, %w)",
    );
    let out = search_with(
        &mut m,
        "top1=1",
        SearchOptions {
            sets: vec![set],
            precision: mpopt_passes::assign_precision::PrecisionOptions {
                target: mpopt_ir::DType::BF16,
                ..Default::default()
            },
            ..SearchOptions::default()
        },
    );
    assert!(
        records(&out, "search-screen").is_empty(),
        "{:?}",
        out.records
    );
    assert_eq!(
        field(&record(&out, "search-cost"), "whole_model_checks"),
        "1"
    );

    // a reshape to a shape given as an input batched like `x`: one item alone reshapes to a rank-1
    // tensor, not a slice of the batch's output
    let src = "ir_version 8
opset ai.onnx 17

graph @cls(%x: f32[N,2], %s: i64[N]) -> (%y: f32[N,2]) {
  %w = const f32[2,2] [1.0, 0.0, 0.0, 1.0]
  %r = Reshape(%x, %s)
  %y = MatMul(%r, %w)
}
";
    let (_, mut set) = near_tie("f32[N,2]", "%y = MatMul(%x, %w)");
    set.push((
        "s".into(),
        mpopt_exec::Value::Tensor(mpopt_exec::Tensor::i64(vec![2], vec![2, 2])),
    ));
    let mut m = typed(src);
    let out = search_on(&mut m, set, "top1=1");
    let screens = records(&out, "search-screen");
    assert_eq!(screens.len(), 1, "{:?}", out.records);
    assert!(
        field(&screens[0], "pass").starts_with("dropped"),
        "{screens:?}"
    );
    let checks = records(&out, "search-check");
    assert_eq!(
        field(&checks[0], "decisions"),
        "every candidate low",
        "{checks:?}"
    );
    assert_eq!(field(checks.last().unwrap(), "pass"), "true", "{checks:?}");
}

/// With several input sets, the screen runs the item closest to flipping in any of them, and costs its
/// share of every set's inputs.
#[test]
fn a_screen_over_several_sets_costs_its_share_of_all_of_them() {
    let (mut m, near) = near_tie("f32[N,2]", "%y = MatMul(%x, %w)");
    let far = vec![(
        "x".to_string(),
        mpopt_exec::Value::Tensor(mpopt_exec::Tensor::f32(
            vec![2, 2],
            vec![0.0, 1.0, 2.0, 0.5],
        )),
    )];
    let out = search_with(
        &mut m,
        "top1=1",
        SearchOptions {
            sets: vec![far, near],
            ..SearchOptions::default()
        },
    );
    let screens = records(&out, "search-screen");
    assert_eq!(screens.len(), 1, "{:?}", out.records);
    assert!(
        field(&screens[0], "item").contains("input set 1, batch item 1 of 2"),
        "{screens:?}"
    );
    assert_eq!(field(&record(&out, "search-cost"), "screened"), "0.250");
}

/// A leading size declared -1 (Paddle's exporter writes a free batch so) is not a fixed one: the first
/// check is screened.
#[test]
fn a_batch_declared_minus_one_is_screened() {
    let (mut m, set) = near_tie("f32[N,2]", "%y = MatMul(%x, %w)");
    for v in m
        .graph
        .inputs()
        .to_vec()
        .into_iter()
        .chain(m.graph.outputs().to_vec())
    {
        if let Some(mpopt_ir::TypeInfo {
            ty: mpopt_ir::Type::Tensor {
                shape: Some(dims), ..
            },
            ..
        }) = m.graph.value_mut(v).ty.as_mut()
        {
            dims[0] = mpopt_ir::Dim::known(-1);
        }
    }
    let out = search_on(&mut m, set, "top1=1");
    assert_eq!(records(&out, "search-screen").len(), 1, "{:?}", out.records);
}
