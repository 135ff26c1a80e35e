//! A user-written rewrite pass: fuse `Add(MatMul(A, W), B)` into `Gemm(A, W, B)` when A is 2-D, W a 2-D
//! constant and B a 1-D constant (initializers or Constant nodes), registered by name and run in a pipeline after `infer-types`.
//!
//!     cargo run -p mpopt --example fuse_matmul_add -- MODEL.onnx OUT.onnx
use mpopt::ir::pattern::Pattern;
use mpopt::ir::{Graph, Model, TypeInfo, ValueId};
use mpopt::passes::pipeline::Registry;
use mpopt::{Pass, PassError, PassManager, PassOutcome};
use std::path::PathBuf;

/// The fusion.
struct FuseMatMulAdd;

fn rank(g: &Graph, v: ValueId) -> Option<usize> {
    g.value(v)
        .ty
        .as_ref()
        .and_then(TypeInfo::tensor_shape)
        .map(<[_]>::len)
}

/// The rank of a constant: an initializer or the output of a Constant node.
fn constant_rank(g: &Graph, v: ValueId) -> Option<usize> {
    if let Some(t) = &g.value(v).initializer {
        return Some(t.dims.len());
    }
    let (p, _) = g.producer(v)?;
    match g.node(p).attr("value").map(|a| &a.value) {
        Some(mpopt::ir::AttrValue::Tensor(t)) if g.node(p).op_type == "Constant" => {
            Some(t.dims.len())
        }
        _ => None,
    }
}

impl Pass for FuseMatMulAdd {
    fn name(&self) -> &'static str {
        "fuse-matmul-add"
    }

    fn run(&mut self, model: &mut Model) -> Result<PassOutcome, PassError> {
        let g = &mut model.graph;
        let pattern = Pattern::op("Add")
            .input(
                0,
                Pattern::op("MatMul")
                    .single_use()
                    .capture("mm")
                    .input(0, Pattern::any().capture("a"))
                    .input(1, Pattern::any().capture("w")),
            )
            .input(1, Pattern::any().capture("b"));
        let mut fused = 0;
        for m in pattern.find(g) {
            let (a, w, b) = (
                m.value("a").unwrap(),
                m.value("w").unwrap(),
                m.value("b").unwrap(),
            );
            if rank(g, a) != Some(2)
                || constant_rank(g, w) != Some(2)
                || constant_rank(g, b) != Some(1)
            {
                continue;
            }
            let (add, mm) = (m.root, m.node("mm").unwrap());
            let y = g.node(add).outputs()[0];
            let mut gemm = mpopt::Node::new("Gemm");
            gemm.name = g.node(mm).name.clone();
            g.replace_subgraph(add, &[mm], gemm, &[Some(a), Some(w), Some(b)], &[y])
                .map_err(|e| PassError::Failed {
                    pass: self.name().into(),
                    message: e.to_string(),
                })?;
            fused += 1;
        }
        Ok(PassOutcome {
            changed: fused > 0,
            counters: vec![("fused", fused)],
            ..PassOutcome::default()
        })
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<PathBuf> = std::env::args().skip(1).map(PathBuf::from).collect();
    let [input, output] = args.as_slice() else {
        return Err("usage: fuse_matmul_add MODEL OUT".into());
    };
    let mut registry = Registry::builtin();
    registry.register("fuse-matmul-add", || Box::new(FuseMatMulAdd));
    let mut model = mpopt::onnx::load(input)?;
    let runs = PassManager::new(registry.pipeline(&["infer-types", "fuse-matmul-add"])?)
        .verify_each(true)
        .run(&mut model)?;
    let fused = runs[1].outcome.counters[0].1;
    mpopt::onnx::save(&model, output, mpopt::onnx::ExternalData::Auto)?;
    println!("fused {fused} MatMul+Add pairs into Gemm");
    Ok(())
}
