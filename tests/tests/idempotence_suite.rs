//! Converting a converted model changes nothing (issue #4: "re-running on its own output changes nothing"),
//! in every variant CI checks: the default, `--to bf16`, `--to auto` and `--io-types low`.
//!
//! Runs on the corpus and the folders in `MPOPT_SUITE_DIRS` (CI sets them to the ONNX node suite and the onnx
//! wheel's models). Each model is converted, written and read back, converted again with the same options,
//! and the two printed models must be equal: the same nodes, names, dtypes, constants and casts.
//!
//! Two cases it found: `--to auto` lowered a clear node to bf16 between fp32 nodes, so the second run
//! lowered the Cast added for its readers and renamed it (73 attention tests); `--io-types low` gave an
//! attention mask (an input-only type parameter) the float32 copy of a lowered input, which the second run
//! read directly (37 tests).

mod common;

use mpopt_ir::{DType, Model};
use mpopt_passes::PassManager;
use mpopt_passes::assign_precision::PrecisionOptions;
use mpopt_passes::insert_casts::IoTypes;
use mpopt_passes::pipeline::{ConvertOptions, default_pipeline};

fn variants() -> Vec<(&'static str, ConvertOptions)> {
    let with = |target: DType, auto_bf16: bool, io: IoTypes| ConvertOptions {
        precision: PrecisionOptions {
            target,
            auto_bf16,
            ..PrecisionOptions::default()
        },
        io,
        ..ConvertOptions::default()
    };
    vec![
        ("default", with(DType::F16, false, IoTypes::Keep)),
        ("--to bf16", with(DType::BF16, false, IoTypes::Keep)),
        ("--to auto", with(DType::F16, true, IoTypes::Keep)),
        ("--io-types low", with(DType::F16, false, IoTypes::Low)),
    ]
}

/// The model after one conversion, as the file it would be written to reads back.
fn convert(m: &Model, opts: &ConvertOptions) -> Result<Model, String> {
    let mut m = m.clone();
    PassManager::new(default_pipeline(opts))
        .verify_each(true)
        .run(&mut m)
        .map_err(|e| e.to_string())?;
    mpopt_passes::infer_types::record_value_info(&mut m);
    let bytes = mpopt_onnx::encode(&m).map_err(|e| e.to_string())?;
    mpopt_onnx::decode(bytes.into()).map_err(|e| e.to_string())
}

#[test]
fn a_second_conversion_changes_nothing() {
    let models = common::suite_models();
    if models.is_empty() {
        eprintln!("SKIP: no corpus and no MPOPT_SUITE_DIRS");
        return;
    }
    let variants = variants();
    let (mut checked, mut failures) = (0usize, Vec::new());
    for path in &models {
        // models with external data files are read through their folder
        let Ok(original) = mpopt_onnx::load(path) else {
            continue;
        };
        for (label, opts) in &variants {
            // a model the pipeline refuses is another test's business (convert_check.py)
            let Ok(once) = convert(&original, opts) else {
                continue;
            };
            checked += 1;
            match convert(&once, opts) {
                Err(e) => failures.push(format!(
                    "{} ({label}): second conversion failed: {e}",
                    path.display()
                )),
                Ok(twice) => {
                    let (a, b) = (
                        mpopt_ir::text::print_model(&once),
                        mpopt_ir::text::print_model(&twice),
                    );
                    // the printed models, and the files' bytes (the data of big constants, which the
                    // printer elides)
                    let same_bytes =
                        mpopt_onnx::encode(&once).ok() == mpopt_onnx::encode(&twice).ok();
                    if a != b || !same_bytes {
                        let first = a
                            .lines()
                            .zip(b.lines())
                            .find(|(x, y)| x != y)
                            .map(|(x, y)| format!("\n  - {x}\n  + {y}"))
                            .unwrap_or_else(|| " (lengths differ)".into());
                        failures.push(format!("{} ({label}): changed{first}", path.display()));
                    }
                }
            }
        }
    }
    eprintln!(
        "idempotence: {} of {checked} conversions unchanged by a second one ({} models x {} variants)",
        checked - failures.len(),
        models.len(),
        variants.len()
    );
    assert!(
        failures.is_empty(),
        "{} conversions changed when converted again:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
