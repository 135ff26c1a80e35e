//! Pass fixtures: every `testdata/passes/<pass>/*.mpir` file names the passes to run on its first line
//! (`; RUN: infer-types`), is parsed, run through those passes with the verifier after each, and snapshotted as
//! the full-context diff between the IR before and after, followed by the passes' notes. `; INPUT-RANGE:
//! NAME=LO:HI` lines declare input ranges for `analyze-ranges`; `; TO: bf16` converts to bf16; `; TO: auto` runs `assign-precision` with bf16
//! where fp16's range is the only problem; `; IO: low` runs `insert-casts` with `--io-types low`; `; FORCE-LOW:
//! SELECTOR` lines are `--force-low` selectors. `; CALIB: NAME=LO:HI` lines make one calibration input set (the
//! input's elements spread over [LO, HI] by the golden ratio) for `calibrate` and `search-precision`, and
//! `; TOLERANCE: METRIC=VALUE` lines give the search its budget. A fixture whose name
//! starts with `no_` is negative: it must come out unchanged, and the passes must say they changed nothing.

use std::path::Path;

use mpopt_passes::analyze_ranges::{AnalyzeRanges, RangeOptions};
use mpopt_passes::assign_precision::{AssignPrecision, PrecisionOptions, Selector};
use mpopt_passes::calibrate::{Calibrate, InputSet};
use mpopt_passes::insert_casts::InsertCasts;
use mpopt_passes::measure_gates::MeasureGates;
use mpopt_passes::search_precision::{SearchOptions, SearchPrecision, Tolerance};
use mpopt_passes::{Pass, PassManager, pipeline};

fn run_fixture(path: &Path) -> String {
    let src = std::fs::read_to_string(path).unwrap();
    let first = src.lines().next().unwrap_or_default();
    let names = first.strip_prefix("; RUN:").unwrap_or_else(|| {
        panic!(
            "{}: the first line must be `; RUN: pass, pass`",
            path.display()
        )
    });
    // `; INPUT-RANGE: NAME=LO:HI` lines declare input ranges for analyze-ranges.
    let ranges = RangeOptions {
        inputs: src
            .lines()
            .filter_map(|l| l.strip_prefix("; INPUT-RANGE:"))
            .map(|r| RangeOptions::parse_input(r.trim()).unwrap())
            .collect(),
    };
    // `; TO: auto` converts to fp16 with bf16 where fp16's range is the only problem.
    let auto = src.lines().any(|l| l.trim() == "; TO: auto");
    // `; TO: bf16` converts to bf16.
    let bf16 = src.lines().any(|l| l.trim() == "; TO: bf16");
    // `; IO: low` converts float32 graph inputs and outputs too (`--io-types low`).
    let io_low = src.lines().any(|l| l.trim() == "; IO: low");
    // `; FORCE-LOW: SELECTOR` lines are `--force-low` selectors.
    let force_low: Vec<Selector> = src
        .lines()
        .filter_map(|l| l.strip_prefix("; FORCE-LOW:"))
        .map(|sel| Selector::parse(sel.trim()).unwrap())
        .collect();
    let mut model =
        mpopt_ir::text::parse_model(&src).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let calib: InputSet = src
        .lines()
        .filter_map(|l| l.strip_prefix("; CALIB:"))
        .map(|c| {
            let r = RangeOptions::parse_input(c.trim()).unwrap();
            let g = &model.graph;
            let v = g
                .value_by_name(&r.0)
                .expect("a CALIB line names a graph input");
            let shape: Vec<usize> = g
                .value(v)
                .ty
                .as_ref()
                .unwrap()
                .tensor_shape()
                .unwrap()
                .iter()
                .map(|d| d.value.as_known().unwrap() as usize)
                .collect();
            let n = shape.iter().product::<usize>();
            let x = (0..n)
                .map(|i| (r.1.lo + (r.1.hi - r.1.lo) * ((i as f64 * 0.618_033_988_7) % 1.0)) as f32)
                .collect();
            (
                r.0.clone(),
                mpopt_exec::Value::Tensor(mpopt_exec::Tensor::f32(shape, x)),
            )
        })
        .collect();
    let tolerances: Vec<Tolerance> = src
        .lines()
        .filter_map(|l| l.strip_prefix("; TOLERANCE:"))
        .map(|t| Tolerance::parse(t.trim()).unwrap())
        .collect();
    let passes = names
        .split(',')
        .map(|n| match n.trim() {
            "analyze-ranges" => Box::new(AnalyzeRanges::new(ranges.clone())) as Box<dyn Pass>,
            "assign-precision" => Box::new(AssignPrecision::new(PrecisionOptions {
                target: if bf16 {
                    mpopt_ir::DType::BF16
                } else {
                    mpopt_ir::DType::F16
                },
                auto_bf16: auto,
                force_low: force_low.clone(),
                ..PrecisionOptions::default()
            })),
            "insert-casts" if bf16 => Box::new(InsertCasts::new(
                mpopt_ir::DType::BF16,
                mpopt_passes::insert_casts::IoTypes::Keep,
            )),
            "calibrate" => Box::new(Calibrate::new(vec![calib.clone()], mpopt_ir::DType::F16)),
            "insert-casts" if io_low => Box::new(InsertCasts::new(
                mpopt_ir::DType::F16,
                mpopt_passes::insert_casts::IoTypes::Low,
            )),
            "measure-gates" => Box::new(MeasureGates::new(
                vec![calib.clone()],
                PrecisionOptions::default(),
                Default::default(),
                false,
            )),
            "search-precision" => Box::new(SearchPrecision::new(SearchOptions {
                tolerances: tolerances.clone(),
                sets: vec![calib.clone()],
                ..SearchOptions::default()
            })),
            n => pipeline::by_name(n).unwrap(),
        })
        .collect();
    mpopt_ir::verify_model(&model)
        .unwrap_or_else(|e| panic!("{}: fixture is invalid: {e}", path.display()));
    let before = mpopt_ir::text::print_model(&model);
    let runs = PassManager::new(passes)
        .verify_each(true)
        .run(&mut model)
        .unwrap();
    let after = mpopt_ir::text::print_model(&model);
    let negative = path
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with("no_");
    // Analysis facts (`; ...` comments) are not changes of the graph.
    let strip = |s: &str| {
        s.lines()
            .map(|l| l.split(" ; ").next().unwrap_or(l).trim_end().to_string())
            .collect::<Vec<_>>()
    };
    if negative {
        assert_eq!(
            strip(&before),
            strip(&after),
            "{}: a negative fixture changed",
            path.display()
        );
    } else {
        assert_ne!(
            before,
            after,
            "{}: the fixture did not change; name it no_*.mpir if that is intended",
            path.display()
        );
    }
    let diff = similar::TextDiff::from_lines(&before, &after);
    let mut out = diff
        .unified_diff()
        .context_radius(1000)
        .header("before", "after")
        .to_string();
    for r in &runs {
        for n in &r.outcome.notes {
            out.push_str(&format!("; {}: {n}\n", r.name));
        }
    }
    out
}

#[test]
fn pass_fixtures() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/passes");
    let mut n = 0;
    for pass_dir in std::fs::read_dir(&root).unwrap().flatten() {
        let mut files: Vec<_> = std::fs::read_dir(pass_dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "mpir"))
            .collect();
        files.sort();
        for f in files {
            let name = format!(
                "{}__{}",
                pass_dir.file_name().to_string_lossy(),
                f.file_stem().unwrap().to_string_lossy()
            );
            let snapshot = run_fixture(&f);
            insta::with_settings!({ snapshot_path => "snapshots", prepend_module_to_snapshot => false, input_file => &f }, {
                insta::assert_snapshot!(name, snapshot);
            });
            n += 1;
        }
    }
    assert!(n >= 9, "found only {n} fixtures");
}
