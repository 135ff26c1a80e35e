//! `infer-types` on a generated transformer-like graph of about 100,000 nodes (target: under 200 ms).
//! Each layer is self-attention with the shape arithmetic PyTorch exports (Shape -> Gather -> Unsqueeze ->
//! Concat -> Reshape), Transposes, Softmax, residual Add and LayerNormalization; weights are shared and elided.

use std::sync::OnceLock;

use mpopt_ir::{DType, Dim, Graph, Model, Node, Tensor, TensorData, TypeInfo, ValueId};
use mpopt_passes::Pass;
use mpopt_passes::infer_types::InferTypes;

/// The allocator the `mpopt` binary uses, so that the timing is the product's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    divan::main();
}

struct B {
    g: Graph,
    n: usize,
}

impl B {
    fn node(&mut self, op: &str, ins: &[ValueId], attrs: Vec<mpopt_ir::Attribute>) -> ValueId {
        self.n += 1;
        let out = self.g.add_value(format!("v{}", self.n), None).unwrap();
        let mut node = Node::new(op);
        node.attributes = attrs;
        let ins: Vec<Option<ValueId>> = ins.iter().map(|&v| Some(v)).collect();
        self.g.add_node(node, &ins, &[Some(out)]).unwrap();
        out
    }
    fn init(
        &mut self,
        name: &str,
        dtype: DType,
        dims: Vec<i64>,
        data: Option<Vec<i64>>,
    ) -> ValueId {
        let t = match data {
            Some(v) => Tensor::from_i64(dims, &v),
            None => Tensor {
                data: TensorData::Elided,
                ..Tensor::from_raw(dtype, dims, bytes::Bytes::new())
            },
        };
        self.g.add_initializer(name, t).unwrap()
    }
}

fn ints(name: &str, v: Vec<i64>) -> mpopt_ir::Attribute {
    mpopt_ir::Attribute::new(name, mpopt_ir::AttrValue::Ints(v))
}
fn int(name: &str, v: i64) -> mpopt_ir::Attribute {
    mpopt_ir::Attribute::new(name, mpopt_ir::AttrValue::Int(v))
}

fn transformer(target_nodes: usize) -> Model {
    let mut b = B {
        g: Graph::new("transformer"),
        n: 0,
    };
    let x0 =
        b.g.add_input(
            "x",
            Some(TypeInfo::tensor(
                DType::F32,
                Some(vec![Dim::symbol("N"), Dim::symbol("S"), Dim::known(384)]),
            )),
        )
        .unwrap();
    let w = b.init("w", DType::F32, vec![384, 384], None);
    let bias = b.init("bias", DType::F32, vec![384], None);
    let gamma = b.init("gamma", DType::F32, vec![384], None);
    let zero = b.init("zero", DType::I64, vec![], Some(vec![0]));
    let one = b.init("one", DType::I64, vec![], Some(vec![1]));
    let axes0 = b.init("axes0", DType::I64, vec![1], Some(vec![0]));
    let heads = b.init("heads", DType::I64, vec![1], Some(vec![6]));
    let hdim = b.init("hdim", DType::I64, vec![1], Some(vec![64]));
    let hidden = b.init("hidden", DType::I64, vec![1], Some(vec![384]));
    let scale = b.init("scale", DType::F32, vec![], None);
    let mut x = x0;
    while b.n < target_nodes {
        let s = b.node("Shape", &[x], vec![]);
        let n = b.node("Gather", &[s, zero], vec![]);
        let l = b.node("Gather", &[s, one], vec![]);
        let n1 = b.node("Unsqueeze", &[n, axes0], vec![]);
        let l1 = b.node("Unsqueeze", &[l, axes0], vec![]);
        let shape4 = b.node("Concat", &[n1, l1, heads, hdim], vec![int("axis", 0)]);
        let proj = |b: &mut B, perm: Vec<i64>| {
            let m = b.node("MatMul", &[x, w], vec![]);
            let a = b.node("Add", &[m, bias], vec![]);
            let r = b.node("Reshape", &[a, shape4], vec![]);
            b.node("Transpose", &[r], vec![ints("perm", perm)])
        };
        let q = proj(&mut b, vec![0, 2, 1, 3]);
        let k = proj(&mut b, vec![0, 2, 3, 1]);
        let v = proj(&mut b, vec![0, 2, 1, 3]);
        let sc = b.node("MatMul", &[q, k], vec![]);
        let sc = b.node("Div", &[sc, scale], vec![]);
        let p = b.node("Softmax", &[sc], vec![int("axis", -1)]);
        let c = b.node("MatMul", &[p, v], vec![]);
        let c = b.node("Transpose", &[c], vec![ints("perm", vec![0, 2, 1, 3])]);
        let shape3 = b.node("Concat", &[n1, l1, hidden], vec![int("axis", 0)]);
        let c = b.node("Reshape", &[c, shape3], vec![]);
        let o = b.node("MatMul", &[c, w], vec![]);
        let o = b.node("Add", &[o, bias], vec![]);
        let r = b.node("Add", &[o, x], vec![]);
        x = b.node(
            "LayerNormalization",
            &[r, gamma, bias],
            vec![int("axis", -1)],
        );
    }
    b.g.add_output(x);
    Model::new(b.g, 17)
}

fn model() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| transformer(100_000))
}

#[divan::bench(sample_count = 10, sample_size = 1)]
fn infer_types_100k_transformer(bencher: divan::Bencher) {
    bencher
        .with_inputs(|| model().clone())
        .bench_local_values(|mut m| {
            let mut pass = InferTypes::default();
            pass.run(&mut m).unwrap();
            assert_eq!(pass.report.untyped.len(), 0);
            assert_eq!(pass.report.shaped, pass.report.values, "every value shaped");
            m
        });
}
