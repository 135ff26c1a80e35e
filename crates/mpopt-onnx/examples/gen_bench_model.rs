//! Writes the generated benchmark models.
//!
//!     cargo run --release -p mpopt-onnx --example gen_bench_model -- OUT.onnx BLOCKS DIM
//!
//! A chain of BLOCKS x (MatMul with a DIMxDIM f32 weight, then Add with a DIM bias): 2 x BLOCKS nodes and
//! initializers. `10000 88` gives the 20,000-node, 314 MB model; `500000 1` a 1,000,000-node graph.
//! Weights are a fixed pseudo-random sequence, so every run writes the same file.

use std::path::Path;

use bytes::Bytes;
use mpopt_ir::{DType, Dim, Graph, Model, Node, Tensor, TypeInfo};

/// The chain model described above.
pub fn chain_model(blocks: usize, dim: usize) -> Model {
    let mut g = Graph::new("chain");
    let f32_ty = |dims: &[i64]| {
        Some(TypeInfo::tensor(
            DType::F32,
            Some(dims.iter().map(|&d| Dim::known(d)).collect()),
        ))
    };
    let d = dim as i64;
    let mut x = g.add_input("x", f32_ty(&[1, d])).unwrap();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut values = |n: usize| {
        let mut raw = Vec::with_capacity(n * 4);
        for _ in 0..n {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let v = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2;
            raw.extend_from_slice(&v.to_le_bytes());
        }
        Bytes::from(raw)
    };
    for i in 0..blocks {
        let w = g
            .add_initializer(
                format!("w{i}"),
                Tensor::from_raw(DType::F32, vec![d, d], values(dim * dim)),
            )
            .unwrap();
        let b = g
            .add_initializer(
                format!("b{i}"),
                Tensor::from_raw(DType::F32, vec![d], values(dim)),
            )
            .unwrap();
        let h = g.add_value(format!("h{i}"), None).unwrap();
        let y = g.add_value(format!("y{i}"), None).unwrap();
        let mut mm = Node::new("MatMul");
        mm.name = format!("mm{i}");
        g.add_node(mm, &[Some(x), Some(w)], &[Some(h)]).unwrap();
        let mut add = Node::new("Add");
        add.name = format!("add{i}");
        g.add_node(add, &[Some(h), Some(b)], &[Some(y)]).unwrap();
        x = y;
    }
    g.value_mut(x).ty = f32_ty(&[1, d]);
    g.add_output(x);
    let mut m = Model::new(g, 17);
    m.ir_version = 10;
    m
}

#[allow(dead_code)]
fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: gen_bench_model OUT.onnx BLOCKS DIM");
        std::process::exit(2);
    }
    let (blocks, dim) = (
        args[2].parse().expect("BLOCKS"),
        args[3].parse().expect("DIM"),
    );
    let m = chain_model(blocks, dim);
    let s =
        mpopt_onnx::save(&m, Path::new(&args[1]), mpopt_onnx::ExternalData::Auto).expect("save");
    eprintln!(
        "wrote {} ({} nodes, {} bytes)",
        args[1],
        2 * blocks,
        s.model_bytes
    );
}
