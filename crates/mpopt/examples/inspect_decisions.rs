//! Convert a model in memory and read the decisions: how many nodes each rule decided, and why nodes stayed fp32.
//!
//!     cargo run -p mpopt --example inspect_decisions -- MODEL.onnx
use std::collections::BTreeMap;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: inspect_decisions MODEL")?;
    let mut model = mpopt::onnx::load(path.as_ref())?;
    let summary = mpopt::convert(&mut model, &mpopt::ConvertOptions::default())?;
    let mut by_rule: BTreeMap<String, usize> = BTreeMap::new();
    for (_, node) in model.graph.nodes() {
        if let Some(p) = &node.precision {
            *by_rule
                .entry(format!("{} {}", p.dtype, p.rule))
                .or_default() += 1;
            if p.dtype == mpopt::DType::F32 {
                println!("fp32: {} ({}): {}", node.name, node.op_type, p.evidence);
            }
        }
    }
    for (rule, n) in &by_rule {
        println!("{n:5}  {rule}");
    }
    println!(
        "total: {} low, {} fp32, {} casts",
        summary.low, summary.fp32, summary.casts
    );
    Ok(())
}
