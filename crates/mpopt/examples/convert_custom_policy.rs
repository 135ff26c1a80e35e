//! Convert a model to bf16 with a custom policy: keep LayerNormalization in fp32, treat Softmax as `infer`.
//!
//!     cargo run -p mpopt --example convert_custom_policy -- MODEL.onnx OUT.onnx
use mpopt::passes::assign_precision::{PrecisionOptions, Selector};
use mpopt::passes::policy::OpClass;
use mpopt::{ConvertOptions, DType, convert_file};
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<PathBuf> = std::env::args().skip(1).map(PathBuf::from).collect();
    let [input, output] = args.as_slice() else {
        return Err("usage: convert_custom_policy MODEL OUT".into());
    };
    let opts = ConvertOptions {
        precision: PrecisionOptions {
            target: DType::BF16,
            keep_fp32: vec![Selector::parse("LayerNormalization")?],
            classes: vec![(String::new(), "Softmax".into(), OpClass::Infer)],
            ..PrecisionOptions::default()
        },
        ..ConvertOptions::default()
    };
    let s = convert_file(input, output, &opts)?;
    println!(
        "converted to bf16: {} nodes low, {} fp32, {} casts",
        s.low, s.fp32, s.casts
    );
    Ok(())
}
