//! Device implementations of ops: shapes and parameters are worked out on the host, data stays on the
//! device. Each op returns `Ok(None)` for a configuration it does not handle (a dtype, an attribute, more
//! than `MAXR` non-mergeable dimensions), and the node then runs on the CPU executor instead.

use mpopt_exec::{Data, Tensor, Value, cast_tensor, data_to_raw};
use mpopt_ir::{DType, Node, ValueId};
use mpopt_kernels as k;
use mpopt_kernels::{Binary, Compare, Kernel, Reduce, Unary};

use crate::backend::{Arg, Backend, GemmCall, GemmType, Grid, Strides3};
use crate::exec::{DevTensor, GpuExecutor, RunStats, Slot, elem_size};

type R<T> = Result<T, String>;
type Outs<B> = Option<Vec<Slot<B>>>;

/// Ops with a device implementation (for some dtypes and attributes).
pub(crate) const GPU_OPS: &[&str] = &[
    "Relu",
    "Sigmoid",
    "Tanh",
    "Exp",
    "Log",
    "Sqrt",
    "Neg",
    "Abs",
    "Erf",
    "Reciprocal",
    "Clip",
    "HardSigmoid",
    "LeakyRelu",
    "Gelu",
    "HardSwish",
    "Floor",
    "Ceil",
    "Sin",
    "Cos",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Pow",
    "Max",
    "Min",
    "Equal",
    "Less",
    "Greater",
    "LessOrEqual",
    "GreaterOrEqual",
    "Where",
    "Not",
    "Cast",
    "Identity",
    "Reshape",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Transpose",
    "Slice",
    "Concat",
    "Gather",
    "Expand",
    "MatMul",
    "Gemm",
    "Conv",
    "BatchNormalization",
    "LayerNormalization",
    "Softmax",
    "LogSoftmax",
    "ReduceMean",
    "ReduceSum",
    "ReduceMax",
    "ReduceMin",
    "ReduceSumSquare",
    "ReduceL1",
    "ReduceL2",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "MaxPool",
    "AveragePool",
    "Resize",
    "Pad",
    "Shape",
    "Size",
];

/// A node's view of the run.
pub(crate) struct Cx<'a, 'm, B: Backend> {
    pub ex: &'a GpuExecutor<'m, B>,
    pub node: &'a Node,
    pub env: &'a mut [Slot<B>],
    pub stats: &'a mut RunStats,
}

fn fcode(d: DType) -> Option<i32> {
    match d {
        DType::F32 => Some(k::Elem::F32 as i32),
        DType::F16 => Some(k::Elem::F16 as i32),
        DType::BF16 => Some(k::Elem::BF16 as i32),
        _ => None,
    }
}

fn contig(shape: &[usize]) -> Vec<i64> {
    let mut s = vec![1i64; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1] * shape[d + 1] as i64;
    }
    s
}

/// Numpy broadcasting of two shapes.
fn broadcast(a: &[usize], b: &[usize]) -> R<Vec<usize>> {
    let r = a.len().max(b.len());
    let mut out = vec![0; r];
    for i in 0..r {
        let x = if i + a.len() >= r {
            a[i + a.len() - r]
        } else {
            1
        };
        let y = if i + b.len() >= r {
            b[i + b.len() - r]
        } else {
            1
        };
        out[i] = if x == y || y == 1 {
            x
        } else if x == 1 {
            y
        } else {
            return Err(format!("shapes {a:?} and {b:?} do not broadcast"));
        };
    }
    Ok(out)
}

/// Element strides of `shape` (contiguous) read as broadcast to `out` (0 where broadcast).
fn bstrides(shape: &[usize], out: &[usize]) -> Vec<i64> {
    let c = contig(shape);
    let off = out.len() - shape.len();
    (0..out.len())
        .map(|d| {
            if d < off || shape[d - off] == 1 {
                0
            } else {
                c[d - off]
            }
        })
        .collect()
}

fn norm_axis(a: i64, rank: usize) -> R<usize> {
    let r = rank as i64;
    let x = if a < 0 { a + r } else { a };
    if x < 0 || x >= r.max(1) {
        return Err(format!("axis {a} is out of range for rank {rank}"));
    }
    Ok(x as usize)
}

fn ptr<B: Backend>(t: &DevTensor<B>) -> Arg<'_, B::Buf> {
    Arg::Ptr(&t.buf, t.offset)
}

fn dev_out<B: Backend>(t: DevTensor<B>) -> Slot<B> {
    Slot {
        host: None,
        dev: Some(t),
    }
}

fn host_out<B: Backend>(t: Tensor) -> Slot<B> {
    Slot {
        host: Some(std::sync::Arc::new(Value::Tensor(t))),
        dev: None,
    }
}

impl<B: Backend> Cx<'_, '_, B> {
    fn id(&self, i: usize) -> Option<ValueId> {
        self.node.inputs().get(i).copied().flatten()
    }
    fn present(&self, i: usize) -> bool {
        self.id(i).is_some()
    }
    fn out_present(&self, i: usize) -> bool {
        matches!(self.node.outputs().get(i), Some(Some(_)))
    }
    /// Shape of input i, without a transfer.
    fn shape(&self, i: usize) -> R<Vec<usize>> {
        let v = self.id(i).ok_or_else(|| format!("input {i} is required"))?;
        let s = &self.env[v.index()];
        if let Some(d) = &s.dev {
            return Ok(d.shape.clone());
        }
        match s.host.as_deref() {
            Some(Value::Tensor(t)) => Ok(t.shape.clone()),
            Some(_) => Err(format!("input {i} is not a tensor")),
            None => Err(format!("input {i} has no value")),
        }
    }
    fn dtype(&self, i: usize) -> R<DType> {
        let v = self.id(i).ok_or_else(|| format!("input {i} is required"))?;
        let s = &self.env[v.index()];
        if let Some(d) = &s.dev {
            return Ok(d.dtype);
        }
        match s.host.as_deref() {
            Some(Value::Tensor(t)) => Ok(t.dtype()),
            Some(_) => Err(format!("input {i} is not a tensor")),
            None => Err(format!("input {i} has no value")),
        }
    }
    fn dev(&mut self, i: usize) -> R<DevTensor<B>> {
        let v = self.id(i).ok_or_else(|| format!("input {i} is required"))?;
        self.ex
            .dev_value(self.env, v, self.stats)?
            .ok_or_else(|| format!("input {i} has no value"))
    }
    fn host(&mut self, i: usize) -> R<Option<Tensor>> {
        let Some(v) = self.id(i) else { return Ok(None) };
        match self.ex.host_value(self.env, v, self.stats)? {
            Some(x) => Ok(Some(x.tensor()?.clone())),
            None => Ok(None),
        }
    }
    fn host_i64s(&mut self, i: usize) -> R<Option<Vec<i64>>> {
        self.host(i)?.map(|t| t.to_i64s()).transpose()
    }
    fn ai(&self, name: &str, d: i64) -> i64 {
        self.node.attr_int(name).unwrap_or(d)
    }
    fn af(&self, name: &str, d: f32) -> f32 {
        self.node.attr_float(name).unwrap_or(d)
    }
    fn ais(&self, name: &str) -> Option<Vec<i64>> {
        self.node.attr_ints(name)
    }
    fn astr(&self, name: &str) -> Option<String> {
        self.node.attr_string(name)
    }
    fn alloc(&self, shape: Vec<usize>, d: DType) -> R<DevTensor<B>> {
        self.ex.alloc(shape, d)
    }
    fn launch(&self, kern: Kernel, grid: Grid, args: &[Arg<'_, B::Buf>]) -> R<()> {
        self.ex.dev.launch(kern, grid, args)
    }
    /// Launches a grid-stride kernel over `n` elements; nothing to do when `n` is 0.
    fn launch_elems(&self, kern: Kernel, n: usize, args: &[Arg<'_, B::Buf>]) -> R<()> {
        if n == 0 {
            return Ok(());
        }
        self.launch(kern, Grid::elems(n), args)
    }
    /// Copies `src` (iterated over `shape` with `src_strides` from element `src_base`) into `dst` at
    /// `dst_strides` from `dst_base`. `Ok(false)` when the layout needs more than MAXR dimensions.
    #[allow(clippy::too_many_arguments)]
    fn copy(
        &self,
        src: &DevTensor<B>,
        dst: &DevTensor<B>,
        shape: &[usize],
        src_strides: &[i64],
        dst_strides: &[i64],
        src_base: i64,
        dst_base: i64,
    ) -> R<bool> {
        let n: usize = shape.iter().product();
        if n == 0 {
            return Ok(true);
        }
        let es = elem_size(src.dtype).ok_or("no element size")? as i32;
        let Some(v) = Strides3::new(shape, &[src_strides, dst_strides], [src_base, dst_base, 0])
        else {
            return Ok(false);
        };
        self.launch(
            k::STRIDED_COPY,
            Grid::elems(n),
            &[
                ptr(src),
                ptr(dst),
                Arg::I64(n as i64),
                Arg::Strides(v),
                Arg::I32(es),
            ],
        )?;
        Ok(true)
    }
}

/// Runs `cx.node` on the device; `Ok(None)` hands it to the CPU.
pub(crate) fn run<B: Backend>(cx: &mut Cx<'_, '_, B>) -> R<Outs<B>> {
    // sequences and optionals stay on the host
    for v in cx.node.inputs().iter().flatten() {
        if let Some(h) = &cx.env[v.index()].host
            && !matches!(h.as_ref(), Value::Tensor(_))
        {
            return Ok(None);
        }
    }
    let op = cx.node.op_type.clone();
    match op.as_str() {
        "Relu" => unary(cx, Unary::Relu, 0.0, 0.0),
        "Sigmoid" => unary(cx, Unary::Sigmoid, 0.0, 0.0),
        "Tanh" => unary(cx, Unary::Tanh, 0.0, 0.0),
        "Exp" => unary(cx, Unary::Exp, 0.0, 0.0),
        "Log" => unary(cx, Unary::Log, 0.0, 0.0),
        "Sqrt" => unary(cx, Unary::Sqrt, 0.0, 0.0),
        "Neg" => unary(cx, Unary::Neg, 0.0, 0.0),
        "Abs" => unary(cx, Unary::Abs, 0.0, 0.0),
        "Erf" => unary(cx, Unary::Erf, 0.0, 0.0),
        "Reciprocal" => unary(cx, Unary::Reciprocal, 0.0, 0.0),
        "Floor" => unary(cx, Unary::Floor, 0.0, 0.0),
        "Ceil" => unary(cx, Unary::Ceil, 0.0, 0.0),
        "Sin" => unary(cx, Unary::Sin, 0.0, 0.0),
        "Cos" => unary(cx, Unary::Cos, 0.0, 0.0),
        "HardSwish" => unary(cx, Unary::HardSwish, 0.0, 0.0),
        "HardSigmoid" => {
            let (a, b) = (cx.af("alpha", 0.2), cx.af("beta", 0.5));
            unary(cx, Unary::HardSigmoid, a, b)
        }
        "LeakyRelu" => {
            let a = cx.af("alpha", 0.01);
            unary(cx, Unary::LeakyRelu, a, 0.0)
        }
        "Gelu" => {
            if cx.astr("approximate").is_some_and(|s| s != "none") {
                return Ok(None);
            }
            unary(cx, Unary::Gelu, 0.0, 0.0)
        }
        "Clip" => clip(cx),
        "Add" => binary(cx, Binary::Add),
        "Sub" => binary(cx, Binary::Sub),
        "Mul" => binary(cx, Binary::Mul),
        "Div" => binary(cx, Binary::Div),
        "Pow" => binary(cx, Binary::Pow),
        "Max" | "Min" if cx.node.inputs().len() == 2 => binary(
            cx,
            if op == "Max" {
                Binary::Max
            } else {
                Binary::Min
            },
        ),
        "Equal" => compare(cx, Compare::Equal),
        "Less" => compare(cx, Compare::Less),
        "Greater" => compare(cx, Compare::Greater),
        "LessOrEqual" => compare(cx, Compare::LessOrEqual),
        "GreaterOrEqual" => compare(cx, Compare::GreaterOrEqual),
        "Where" => where_(cx),
        "Not" => not(cx),
        "Cast" => cast(cx),
        "Identity" | "Reshape" | "Flatten" | "Squeeze" | "Unsqueeze" => view(cx),
        "Transpose" => transpose(cx),
        "Slice" => slice(cx),
        "Concat" => concat(cx),
        "Gather" => gather(cx),
        "Expand" => expand(cx),
        "MatMul" => matmul(cx),
        "Gemm" => gemm(cx),
        "Conv" => conv(cx),
        "BatchNormalization" => batch_norm(cx),
        "LayerNormalization" => layer_norm(cx),
        "Softmax" | "LogSoftmax" => softmax(cx),
        "ReduceMean" => reduce(cx, Reduce::Mean),
        "ReduceSum" => reduce(cx, Reduce::Sum),
        "ReduceMax" => reduce(cx, Reduce::Max),
        "ReduceMin" => reduce(cx, Reduce::Min),
        "ReduceSumSquare" => reduce(cx, Reduce::SumSquare),
        "ReduceL1" => reduce(cx, Reduce::L1),
        "ReduceL2" => reduce(cx, Reduce::L2),
        "GlobalAveragePool" => global_pool(cx, Reduce::Mean),
        "GlobalMaxPool" => global_pool(cx, Reduce::Max),
        "MaxPool" => pool(cx, 0),
        "AveragePool" => pool(cx, 1),
        "Resize" => resize(cx),
        "Pad" => pad(cx),
        "Shape" => shape(cx),
        "Size" => {
            let n: usize = cx.shape(0)?.iter().product();
            Ok(Some(vec![host_out(Tensor::i64(vec![], vec![n as i64]))]))
        }
        _ => Ok(None),
    }
}

fn unary<B: Backend>(cx: &mut Cx<'_, '_, B>, op: Unary, a: f32, b: f32) -> R<Outs<B>> {
    let Some(t) = fcode(cx.dtype(0)?) else {
        return Ok(None);
    };
    let x = cx.dev(0)?;
    let y = cx.alloc(x.shape.clone(), x.dtype)?;
    let n = x.numel();
    cx.launch_elems(
        k::UNARY,
        n,
        &[
            ptr(&x),
            ptr(&y),
            Arg::I64(n as i64),
            Arg::I32(t),
            Arg::I32(t),
            Arg::I32(op as i32),
            Arg::F32(a),
            Arg::F32(b),
        ],
    )?;
    Ok(Some(vec![dev_out(y)]))
}

fn clip<B: Backend>(cx: &mut Cx<'_, '_, B>) -> R<Outs<B>> {
    if fcode(cx.dtype(0)?).is_none() {
        return Ok(None);
    }
    let (lo, hi) = if cx.ex.opset < 11 {
        (cx.af("min", f32::NEG_INFINITY), cx.af("max", f32::INFINITY))
    } else {
        let mut bound = |i: usize, d: f32| -> R<f32> {
            match cx.host(i)? {
                Some(t) if !t.is_empty() => Ok(t.to_f32s()?[0]),
                _ => Ok(d),
            }
        };
        (bound(1, f32::NEG_INFINITY)?, bound(2, f32::INFINITY)?)
    };
    unary(cx, Unary::Clip, lo, hi)
}

fn binary<B: Backend>(cx: &mut Cx<'_, '_, B>, op: Binary) -> R<Outs<B>> {
    let (da, db) = (cx.dtype(0)?, cx.dtype(1)?);
    let Some(t) = fcode(da) else { return Ok(None) };
    if da != db {
        return Ok(None);
    }
    let (sa, sb) = (cx.shape(0)?, cx.shape(1)?);
    let out = broadcast(&sa, &sb)?;
    let Some(v) = Strides3::new(
        &out,
        &[&bstrides(&sa, &out), &bstrides(&sb, &out), &contig(&out)],
        [0; 3],
    ) else {
        return Ok(None);
    };
    let (a, b) = (cx.dev(0)?, cx.dev(1)?);
    let y = cx.alloc(out, da)?;
    let n = y.numel();
    cx.launch_elems(
        k::BINARY,
        n,
        &[
            ptr(&a),
            ptr(&b),
            ptr(&y),
            Arg::I64(n as i64),
            Arg::Strides(v),
            Arg::I32(t),
            Arg::I32(op as i32),
            Arg::F32(1.0),
        ],
    )?;
    Ok(Some(vec![dev_out(y)]))
}

fn compare<B: Backend>(cx: &mut Cx<'_, '_, B>, op: Compare) -> R<Outs<B>> {
    let (da, db) = (cx.dtype(0)?, cx.dtype(1)?);
    if da != db || (fcode(da).is_none() && da != DType::I64 && da != DType::I32) {
        return Ok(None);
    }
    let (sa, sb) = (cx.shape(0)?, cx.shape(1)?);
    let out = broadcast(&sa, &sb)?;
    let Some(v) = Strides3::new(
        &out,
        &[&bstrides(&sa, &out), &bstrides(&sb, &out), &contig(&out)],
        [0; 3],
    ) else {
        return Ok(None);
    };
    let (a, b) = (cx.dev(0)?, cx.dev(1)?);
    let y = cx.alloc(out, DType::Bool)?;
    let n = y.numel();
    let head = [
        ptr(&a),
        ptr(&b),
        ptr(&y),
        Arg::I64(n as i64),
        Arg::Strides(v),
    ];
    match fcode(da) {
        Some(t) => cx.launch_elems(
            k::COMPARE,
            n,
            &[&head[..], &[Arg::I32(t), Arg::I32(op as i32)]].concat(),
        )?,
        None => {
            let es = if da == DType::I32 { 4 } else { 8 };
            cx.launch_elems(
                k::COMPARE_INT,
                n,
                &[&head[..], &[Arg::I32(op as i32), Arg::I32(es)]].concat(),
            )?
        }
    }
    Ok(Some(vec![dev_out(y)]))
}

fn where_<B: Backend>(cx: &mut Cx<'_, '_, B>) -> R<Outs<B>> {
    let (dc, da, db) = (cx.dtype(0)?, cx.dtype(1)?, cx.dtype(2)?);
    let Some(es) = elem_size(da) else {
        return Ok(None);
    };
    if dc != DType::Bool || da != db {
        return Ok(None);
    }
    let (sc, sa, sb) = (cx.shape(0)?, cx.shape(1)?, cx.shape(2)?);
    let out = broadcast(&broadcast(&sc, &sa)?, &sb)?;
    let (Some(v), Some(w)) = (
        Strides3::exact(
            &out,
            &[&bstrides(&sc, &out), &bstrides(&sa, &out), &contig(&out)],
            [0; 3],
        ),
        Strides3::exact(&out, &[&bstrides(&sb, &out)], [0; 3]),
    ) else {
        return Ok(None);
    };
    let (c, a, b) = (cx.dev(0)?, cx.dev(1)?, cx.dev(2)?);
    let y = cx.alloc(out, da)?;
    let n = y.numel();
    cx.launch_elems(
        k::WHERE,
        n,
        &[
            ptr(&c),
            ptr(&a),
            ptr(&b),
            ptr(&y),
            Arg::I64(n as i64),
            Arg::Strides(v),
            Arg::Strides(w),
            Arg::I32(es as i32),
        ],
    )?;
    Ok(Some(vec![dev_out(y)]))
}

fn not<B: Backend>(cx: &mut Cx<'_, '_, B>) -> R<Outs<B>> {
    if cx.dtype(0)? != DType::Bool {
        return Ok(None);
    }
    let x = cx.dev(0)?;
    let y = cx.alloc(x.shape.clone(), DType::Bool)?;
    let n = x.numel();
    cx.launch_elems(k::NOT, n, &[ptr(&x), ptr(&y), Arg::I64(n as i64)])?;
    Ok(Some(vec![dev_out(y)]))
}

fn cast<B: Backend>(cx: &mut Cx<'_, '_, B>) -> R<Outs<B>> {
    let from = cx.dtype(0)?;
    let Some(to) = DType::from_code(cx.ai("to", 0) as i32) else {
        return Ok(None);
    };
    if from == to && elem_size(from).is_some() {
        return Ok(Some(vec![dev_out(cx.dev(0)?)]));
    }
    let int_es = match from {
        DType::Bool | DType::U8 => Some(1),
        DType::I32 => Some(4),
        DType::I64 => Some(8),
        _ => None,
    };
    // Integer/bool sources pass their element size, float sources their type code; one launch for both.
    let (kernel, src) = match (int_es, fcode(from)) {
        (Some(es), _) => (k::CAST_INT_FLOAT, es),
        (None, Some(tx)) => (k::CAST_FLOAT, tx),
        _ => return Ok(None),
    };
    let Some(ty) = fcode(to) else {
        return Ok(None);
    };
    let x = cx.dev(0)?;
    let y = cx.alloc(x.shape.clone(), to)?;
    let n = x.numel();
    cx.launch_elems(
        kernel,
        n,
        &[
            ptr(&x),
            ptr(&y),
            Arg::I64(n as i64),
            Arg::I32(src),
            Arg::I32(ty),
        ],
    )?;
    Ok(Some(vec![dev_out(y)]))
}

/// The axes of Squeeze/Unsqueeze/Reduce*: an attribute before `input_from_opset`, an input after.
fn axes_param<B: Backend>(
    cx: &mut Cx<'_, '_, B>,
    input_from_opset: i64,
    slot: usize,
) -> R<Option<Vec<i64>>> {
    if cx.ex.opset >= input_from_opset {
        cx.host_i64s(slot)
    } else {
        Ok(cx.ais("axes"))
    }
}

/// Identity, Reshape, Flatten, Squeeze, Unsqueeze: the same buffer with a new shape.
fn view<B: Backend>(cx: &mut Cx<'_, '_, B>) -> R<Outs<B>> {
    if elem_size(cx.dtype(0)?).is_none() {
        return Ok(None);
    }
    let s = cx.shape(0)?;
    let numel: usize = s.iter().product();
    let new: Vec<usize> = match cx.node.op_type.as_str() {
        "Identity" => s.clone(),
        "Reshape" => {
            let spec = cx.host_i64s(1)?.ok_or("Reshape needs a shape")?;
            let allowzero = cx.ai("allowzero", 0) != 0;
            let mut out = Vec::with_capacity(spec.len());
            let mut infer = None;
            for (i, &d) in spec.iter().enumerate() {
                match d {
                    0 if !allowzero => out.push(
                        *s.get(i)
                            .ok_or_else(|| format!("shape {spec:?}: no dimension {i} to copy"))?,
                    ),
                    -1 => {
                        if infer.is_some() {
                            return Err(format!("shape {spec:?} has two -1"));
                        }
                        infer = Some(i);
                        out.push(1);
                    }
                    d if d >= 0 => out.push(d as usize),
                    _ => return Err(format!("shape {spec:?} has a negative dimension")),
                }
            }
            if let Some(i) = infer {
                let known: usize = out.iter().product();
                if known == 0 || !numel.is_multiple_of(known) {
                    return Err(format!("cannot reshape {s:?} to {spec:?}"));
                }
                out[i] = numel / known;
            }
            out
        }
        "Flatten" => {
            let a = cx.ai("axis", 1);
            let a = if a < 0 { a + s.len() as i64 } else { a };
            if a < 0 || a as usize > s.len() {
                return Err(format!("axis {a} is out of range for {s:?}"));
            }
            let a = a as usize;
            vec![s[..a].iter().product(), s[a..].iter().product()]
        }
        "Squeeze" => match axes_param(cx, 13, 1)? {
            None => s.iter().copied().filter(|&d| d != 1).collect(),
            Some(ax) => {
                let ax: Vec<usize> = ax
                    .iter()
                    .map(|&a| norm_axis(a, s.len()))
                    .collect::<R<_>>()?;
                if let Some(&a) = ax.iter().find(|&&a| s[a] != 1) {
                    return Err(format!("cannot squeeze axis {a} of {s:?}"));
                }
                s.iter()
                    .enumerate()
                    .filter(|(i, _)| !ax.contains(i))
                    .map(|(_, &d)| d)
                    .collect()
            }
        },
        _ => {
            let ax = axes_param(cx, 13, 1)?.ok_or("Unsqueeze needs axes")?;
            let r = s.len() + ax.len();
            let mut ax: Vec<usize> = ax.iter().map(|&a| norm_axis(a, r)).collect::<R<_>>()?;
            ax.sort_unstable();
            let mut out = Vec::with_capacity(r);
            let mut it = s.iter();
            for i in 0..r {
                if ax.binary_search(&i).is_ok() {
                    out.push(1);
                } else {
                    out.push(*it.next().ok_or("too many axes")?);
                }
            }
            out
        }
    };
    if new.iter().product::<usize>() != numel {
        return Err(format!("cannot view {s:?} as {new:?}"));
    }
    let mut x = cx.dev(0)?;
    x.shape = new;
    Ok(Some(vec![dev_out(x)]))
}

fn transpose<B: Backend>(cx: &mut Cx<'_, '_, B>) -> R<Outs<B>> {
    if elem_size(cx.dtype(0)?).is_none() {
        return Ok(None);
    }
    let s = cx.shape(0)?;
    let perm: Vec<usize> = match cx.ais("perm") {
        Some(p) => p.iter().map(|&a| norm_axis(a, s.len())).collect::<R<_>>()?,
        None => (0..s.len()).rev().collect(),
    };
    if perm.len() != s.len() {
        return Err(format!("perm {perm:?} does not match {s:?}"));
    }
    let cs = contig(&s);
    let out: Vec<usize> = perm.iter().map(|&p| s[p]).collect();
    let src: Vec<i64> = perm.iter().map(|&p| cs[p]).collect();
    let x = cx.dev(0)?;
    let y = cx.alloc(out.clone(), x.dtype)?;
    if !cx.copy(&x, &y, &out, &src, &contig(&out), 0, 0)? {
        return Ok(None);
    }
    Ok(Some(vec![dev_out(y)]))
}

fn slice<B: Backend>(cx: &mut Cx<'_, '_, B>) -> R<Outs<B>> {
    if elem_size(cx.dtype(0)?).is_none() {
        return Ok(None);
    }
    let s = cx.shape(0)?;
    let r = s.len();
    let (starts, ends, axes, steps) = if cx.ex.opset < 10 {
        (
            cx.ais("starts").ok_or("starts are required")?,
            cx.ais("ends").ok_or("ends are required")?,
            cx.ais("axes"),
            None,
        )
    } else {
        (
            cx.host_i64s(1)?.ok_or("starts are required")?,
            cx.host_i64s(2)?.ok_or("ends are required")?,
            cx.host_i64s(3)?,
            cx.host_i64s(4)?,
        )
    };
    let axes: Vec<usize> = match axes {
        Some(a) => a.iter().map(|&x| norm_axis(x, r)).collect::<R<_>>()?,
        None => (0..starts.len()).collect(),
    };
    let steps = steps.unwrap_or_else(|| vec![1; starts.len()]);
    if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
        return Err("starts, ends, axes and steps differ in length".into());
    }
    let cs = contig(&s);
    let mut out = s.clone();
    let mut src = cs.clone();
    let mut base = 0i64;
    for (j, &a) in axes.iter().enumerate() {
        let dim = s[a] as i64;
        let step = steps[j];
        if step == 0 {
            return Err("a slice step is 0".into());
        }
        let clamp = |v: i64, lo: i64, hi: i64| v.max(lo).min(hi);
        let mut st = starts[j];
        let mut en = ends[j];
        if st < 0 {
            st = st.saturating_add(dim);
        }
        if en < 0 {
            en = en.saturating_add(dim);
        }
        let (st, en) = if step > 0 {
            (clamp(st, 0, dim), clamp(en, 0, dim))
        } else {
            (clamp(st, 0, dim - 1), clamp(en, -1, dim - 1))
        };
        let len = if step > 0 {
            if en > st {
                (en - st + step - 1) / step
            } else {
                0
            }
        } else if st > en {
            (st - en + (-step) - 1) / (-step)
        } else {
            0
        };
        out[a] = len as usize;
        if len > 0 {
            base += st * cs[a];
        }
        src[a] = cs[a] * step;
    }
    let x = cx.dev(0)?;
    let y = cx.alloc(out.clone(), x.dtype)?;
    if !cx.copy(&x, &y, &out, &src, &contig(&out), base, 0)? {
        return Ok(None);
    }
    Ok(Some(vec![dev_out(y)]))
}

fn concat<B: Backend>(cx: &mut Cx<'_, '_, B>) -> R<Outs<B>> {
    let n_in = cx.node.inputs().len();
    let d0 = cx.dtype(0)?;
    if elem_size(d0).is_none() {
        return Ok(None);
    }
    let shapes: Vec<Vec<usize>> = (0..n_in).map(|i| cx.shape(i)).collect::<R<_>>()?;
    for i in 0..n_in {
        if cx.dtype(i)? != d0 {
            return Ok(None);
        }
    }
    let r = shapes[0].len();
    let a = norm_axis(cx.ai("axis", 0), r)?;
    let mut out = shapes[0].clone();
    out[a] = 0;
    for s in &shapes {
        if s.len() != r || (0..r).any(|d| d != a && s[d] != shapes[0][d]) {
            return Err(format!(
                "cannot concatenate {s:?} with {:?} on axis {a}",
                shapes[0]
            ));
        }
        out[a] += s[a];
    }
    let y = cx.alloc(out.clone(), d0)?;
    let os = contig(&out);
    let mut at = 0usize;
    for (i, s) in shapes.iter().enumerate() {
        if s.iter().product::<usize>() > 0 {
            let x = cx.dev(i)?;
            if !cx.copy(&x, &y, s, &contig(s), &os, 0, at as i64 * os[a])? {
                return Ok(None);
            }
        }
        at += s[a];
    }
    Ok(Some(vec![dev_out(y)]))
}

fn gather<B: Backend>(cx: &mut Cx<'_, '_, B>) -> R<Outs<B>> {
    let d = cx.dtype(0)?;
    let Some(es) = elem_size(d) else {
        return Ok(None);
    };
    let s = cx.shape(0)?;
    let a = norm_axis(cx.ai("axis", 0), s.len())?;
    let di = cx.dtype(1)?;
    let is = cx.shape(1)?;
    let axis_len = s[a] as i64;
    // Indices the host can see are checked (as the CPU executor does); device-only ones are clamped.
    let host_idx = cx
        .id(1)
        .and_then(|v| cx.env[v.index()].host.clone())
        .map(|h| h.tensor().and_then(|t| t.to_i64s()))
        .transpose()?;
    if let Some(ix) = &host_idx
        && let Some(bad) = ix.iter().find(|&&i| i < -axis_len || i >= axis_len)
    {
        return Err(format!("index {bad} is out of range for axis {a} of {s:?}"));
    }
    let idx = match (di, host_idx) {
        (DType::I64, _) => cx.dev(1)?,
        (DType::I32, Some(ix)) => cx.ex.upload(&Tensor::i64(is.clone(), ix), cx.stats)?,
        _ => return Ok(None),
    };
    if axis_len == 0 {
        return Ok(None);
    }
    let x = cx.dev(0)?;
    let mut out: Vec<usize> = s[..a].to_vec();
    out.extend(&is);
    out.extend(&s[a + 1..]);
    let y = cx.alloc(out, d)?;
    let outer: usize = s[..a].iter().product();
    let inner: usize = s[a + 1..].iter().product();
    let nidx: usize = is.iter().product();
    let n = outer * nidx * inner;
    cx.launch_elems(
        k::GATHER,
        n,
        &[
            ptr(&x),
            ptr(&idx),
            ptr(&y),
            Arg::I64(outer as i64),
            Arg::I64(axis_len),
            Arg::I64(nidx as i64),
            Arg::I64(inner as i64),
            Arg::I32(es as i32),
        ],
    )?;
    Ok(Some(vec![dev_out(y)]))
}

fn expand<B: Backend>(cx: &mut Cx<'_, '_, B>) -> R<Outs<B>> {
    if elem_size(cx.dtype(0)?).is_none() {
        return Ok(None);
    }
    let s = cx.shape(0)?;
    let spec: Vec<usize> = cx
        .host_i64s(1)?
        .ok_or("Expand needs a shape")?
        .iter()
        .map(|&d| d.max(0) as usize)
        .collect();
    let out = broadcast(&s, &spec)?;
    let x = cx.dev(0)?;
    let y = cx.alloc(out.clone(), x.dtype)?;
    if !cx.copy(&x, &y, &out, &bstrides(&s, &out), &contig(&out), 0, 0)? {
        return Ok(None);
    }
    Ok(Some(vec![dev_out(y)]))
}

fn gemm_type(d: DType) -> Option<GemmType> {
    match d {
        DType::F32 => Some(GemmType::F32),
        DType::F16 => Some(GemmType::F16),
        DType::BF16 => Some(GemmType::BF16),
        _ => None,
    }
}

/// Row-major `C[b] = op(A[b]) · op(B[b])` (M×K times K×N) as a column-major cuBLAS call: C^T = op(B)^T ·
/// op(A)^T, so cuBLAS's A is our B and its B is our A, with m = N and n = M.
#[allow(clippy::too_many_arguments)]
fn gemm_rm<B: Backend>(
    cx: &Cx<'_, '_, B>,
    ty: GemmType,
    (a, a_off, trans_a, stride_a): (&DevTensor<B>, usize, bool, usize),
    (b, b_off, trans_b, stride_b): (&DevTensor<B>, usize, bool, usize),
    (c, c_off, stride_c): (&DevTensor<B>, usize, usize),
    (m, n, kk, batch): (usize, usize, usize, usize),
    alpha: f32,
    beta: f32,
) -> R<()> {
    if m == 0 || n == 0 || batch == 0 {
        return Ok(());
    }
    let es = if ty == GemmType::F32 { 4 } else { 2 };
    // leading dimensions of the stored row-major matrices = their column counts
    let lda = if trans_a { m } else { kk };
    let ldb = if trans_b { kk } else { n };
    let call = GemmCall {
        ty,
        trans_a: trans_b,
        trans_b: trans_a,
        m: n,
        n: m,
        k: kk,
        alpha,
        a: (&b.buf, b.offset + b_off * es, ldb.max(1), stride_b),
        b: (&a.buf, a.offset + a_off * es, lda.max(1), stride_a),
        beta,
        c: (&c.buf, c.offset + c_off * es, n.max(1), stride_c),
        batch,
    };
    cx.ex.dev.gemm(&call)
}

fn matmul<B: Backend>(cx: &mut Cx<'_, '_, B>) -> R<Outs<B>> {
    let (da, db) = (cx.dtype(0)?, cx.dtype(1)?);
    let Some(ty) = gemm_type(da) else {
        return Ok(None);
    };
    if da != db {
        return Ok(None);
    }
    let (mut sa, mut sb) = (cx.shape(0)?, cx.shape(1)?);
    let (va, vb) = (sa.len() == 1, sb.len() == 1);
    if va {
        sa.insert(0, 1);
    }
    if vb {
        sb.push(1);
    }
    if sa.len() < 2 || sb.len() < 2 {
        return Ok(None);
    }
    let (m, kk) = (sa[sa.len() - 2], sa[sa.len() - 1]);
    let (k2, n) = (sb[sb.len() - 2], sb[sb.len() - 1]);
    if kk != k2 {
        return Err(format!("cannot multiply {sa:?} by {sb:?}"));
    }
    let ba = &sa[..sa.len() - 2];
    let bb = &sb[..sb.len() - 2];
    let batch_shape = broadcast(ba, bb)?;
    let (pa, pb): (usize, usize) = (ba.iter().product(), bb.iter().product());
    let batch: usize = batch_shape.iter().product();
    let mut out = batch_shape.clone();
    out.push(m);
    out.push(n);
    let (a, b) = (cx.dev(0)?, cx.dev(1)?);
    let y = cx.alloc(out.clone(), da)?;
    if pb == 1 {
        // B is one matrix: fold every batch of A into the rows (one GEMM)
        let rows = if pa == batch {
            batch * m
        } else {
            return Ok(None);
        };
        gemm_rm(
            cx,
            ty,
            (&a, 0, false, 0),
            (&b, 0, false, 0),
            (&y, 0, 0),
            (rows, n, kk, 1),
            1.0,
            0.0,
        )?;
    } else if (pa == batch || pa == 1) && pb == batch && (pa == 1 || ba == bb) {
        let stride_a = if pa == 1 { 0 } else { m * kk };
        gemm_rm(
            cx,
            ty,
            (&a, 0, false, stride_a),
            (&b, 0, false, kk * n),
            (&y, 0, m * n),
            (m, n, kk, batch),
            1.0,
            0.0,
        )?;
    } else {
        return Ok(None);
    }
    let mut y = y;
    if va || vb {
        let mut s = batch_shape;
        if !va {
            s.push(m);
        }
        if !vb {
            s.push(n);
        }
        y.shape = s;
    }
    Ok(Some(vec![dev_out(y)]))
}

fn gemm<B: Backend>(cx: &mut Cx<'_, '_, B>) -> R<Outs<B>> {
    let (da, db) = (cx.dtype(0)?, cx.dtype(1)?);
    let Some(ty) = gemm_type(da) else {
        return Ok(None);
    };
    if da != db || (cx.present(2) && cx.dtype(2)? != da) {
        return Ok(None);
    }
    let (sa, sb) = (cx.shape(0)?, cx.shape(1)?);
    if sa.len() != 2 || sb.len() != 2 {
        return Err(format!("Gemm takes matrices, got {sa:?} and {sb:?}"));
    }
    let (ta, tb) = (cx.ai("transA", 0) != 0, cx.ai("transB", 0) != 0);
    let (alpha, beta) = (cx.af("alpha", 1.0), cx.af("beta", 1.0));
    let (m, kk) = if ta { (sa[1], sa[0]) } else { (sa[0], sa[1]) };
    let (k2, n) = if tb { (sb[1], sb[0]) } else { (sb[0], sb[1]) };
    if kk != k2 {
        return Err(format!("cannot multiply {sa:?} by {sb:?}"));
    }
    let (a, b) = (cx.dev(0)?, cx.dev(1)?);
    let y = cx.alloc(vec![m, n], da)?;
    let mut beta_used = 0.0;
    if cx.present(2) && beta != 0.0 {
        // C broadcast into Y first, then Y = alpha·A·B + beta·Y in one rounding
        let sc = cx.shape(2)?;
        let out = vec![m, n];
        broadcast(&sc, &out)?;
        let c = cx.dev(2)?;
        if !cx.copy(&c, &y, &out, &bstrides(&sc, &out), &contig(&out), 0, 0)? {
            return Ok(None);
        }
        beta_used = beta;
    }
    gemm_rm(
        cx,
        ty,
        (&a, 0, ta, 0),
        (&b, 0, tb, 0),
        (&y, 0, 0),
        (m, n, kk, 1),
        alpha,
        beta_used,
    )?;
    Ok(Some(vec![dev_out(y)]))
}

fn conv<B: Backend>(cx: &mut Cx<'_, '_, B>) -> R<Outs<B>> {
    let d = cx.dtype(0)?;
    let Some(ty) = gemm_type(d) else {
        return Ok(None);
    };
    if cx.dtype(1)? != d || (cx.present(2) && cx.dtype(2)? != d) {
        return Ok(None);
    }
    let (sx, sw) = (cx.shape(0)?, cx.shape(1)?);
    if !(sx.len() == 3 || sx.len() == 4) || sw.len() != sx.len() {
        return Ok(None);
    }
    let group = mpopt_exec::geometry::group("group", cx.ai("group", 1))?;
    let (nb, c) = (sx[0], sx[1]);
    let m = sw[0];
    let spatial = sx[2..].to_vec();
    let kernel = sw[2..].to_vec();
    if c % group != 0 || m % group != 0 || sw[1] * group != c {
        return Err(format!(
            "weights {sw:?} do not match input {sx:?} with group {group}"
        ));
    }
    let win = mpopt_exec::geometry::window(cx.node, &spatial, kernel.clone(), false)?;
    // 1-D runs as 2-D with a height of 1
    let two = |v: &[usize], one: usize| -> (i64, i64) {
        if v.len() == 1 {
            (one as i64, v[0] as i64)
        } else {
            (v[0] as i64, v[1] as i64)
        }
    };
    let (h, w) = two(&spatial, 1);
    let (kh, kw) = two(&win.kernel, 1);
    let (oh, ow) = two(&win.out, 1);
    let (sh, sw_) = two(&win.strides, 1);
    let (ph, pw) = two(&win.pad_begin, 0);
    let (dh, dw) = two(&win.dilations, 1);
    let mut out = vec![nb, m];
    out.extend(&win.out);
    let p = (oh * ow) as usize;
    let cg = c / group;
    let mg = m / group;
    let kc = cg * (kh * kw) as usize;
    let (x, wt) = (cx.dev(0)?, cx.dev(1)?);
    let y = cx.alloc(out.clone(), d)?;
    if y.numel() == 0 {
        return Ok(Some(vec![dev_out(y)]));
    }
    let mut beta = 0.0;
    if cx.present(2) {
        let b = cx.dev(2)?;
        let bshape = [1, m, 1];
        let o3 = [nb, m, p];
        if !cx.copy(&b, &y, &o3, &bstrides(&bshape, &o3), &contig(&o3), 0, 0)? {
            return Ok(None);
        }
        beta = 1.0;
    }
    let es = elem_size(d).ok_or("no element size")?;
    let direct =
        kh == 1 && kw == 1 && sh == 1 && sw_ == 1 && ph == 0 && pw == 0 && oh == h && ow == w;
    // columns: [N, C·KH·KW, P] (= [N, group, Kc, P]); a 1x1 stride-1 unpadded convolution reads x directly
    let col = if direct {
        x.clone()
    } else {
        let col = cx.alloc(vec![nb, c * (kh * kw) as usize, p], d)?;
        let per_image = c * (h * w) as usize;
        let per_col = c * (kh * kw) as usize * p;
        for i in 0..nb {
            let n = per_col;
            cx.launch(
                k::IM2COL,
                Grid::elems(n),
                &[
                    Arg::Ptr(&x.buf, x.offset + i * per_image * es),
                    Arg::Ptr(&col.buf, col.offset + i * per_col * es),
                    Arg::I64(c as i64),
                    Arg::I64(h),
                    Arg::I64(w),
                    Arg::I64(kh),
                    Arg::I64(kw),
                    Arg::I64(oh),
                    Arg::I64(ow),
                    Arg::I64(sh),
                    Arg::I64(sw_),
                    Arg::I64(ph),
                    Arg::I64(pw),
                    Arg::I64(dh),
                    Arg::I64(dw),
                    Arg::I32(es as i32),
                ],
            )?;
        }
        col
    };
    // out_g[Mg, P] = W_g[Mg, Kc] · col_g[Kc, P]
    if group == 1 {
        gemm_rm(
            cx,
            ty,
            (&wt, 0, false, 0),
            (&col, 0, false, kc * p),
            (&y, 0, m * p),
            (mg, p, kc, nb),
            1.0,
            beta,
        )?;
    } else {
        for i in 0..nb {
            gemm_rm(
                cx,
                ty,
                (&wt, 0, false, mg * kc),
                (&col, i * group * kc * p, false, kc * p),
                (&y, i * m * p, mg * p),
                (mg, p, kc, group),
                1.0,
                beta,
            )?;
        }
    }
    Ok(Some(vec![dev_out(y)]))
}

fn batch_norm<B: Backend>(cx: &mut Cx<'_, '_, B>) -> R<Outs<B>> {
    let d = cx.dtype(0)?;
    let Some(t) = fcode(d) else { return Ok(None) };
    if cx.ai("training_mode", 0) != 0 || (1..5).any(|i| cx.out_present(i)) {
        return Ok(None);
    }
    let dp = cx.dtype(1)?;
    let Some(tp) = fcode(dp) else { return Ok(None) };
    for i in 2..5 {
        if cx.dtype(i)? != dp {
            return Ok(None);
        }
    }
    let s = cx.shape(0)?;
    if s.len() < 2 {
        return Ok(None);
    }
    let (nb, c) = (s[0], s[1]);
    let hw: usize = s[2..].iter().product();
    for i in 1..5 {
        if cx.shape(i)?.iter().product::<usize>() != c {
            return Err(format!("parameter {i} does not have {c} elements"));
        }
    }
    let x = cx.dev(0)?;
    let p: Vec<DevTensor<B>> = (1..5).map(|i| cx.dev(i)).collect::<R<_>>()?;
    let y = cx.alloc(s, d)?;
    let n = y.numel();
    cx.launch_elems(
        k::BATCH_NORM,
        n,
        &[
            ptr(&x),
            ptr(&p[0]),
            ptr(&p[1]),
            ptr(&p[2]),
            ptr(&p[3]),
            ptr(&y),
            Arg::I64(nb as i64),
            Arg::I64(c as i64),
            Arg::I64(hw as i64),
            Arg::F32(cx.af("epsilon", 1e-5)),
            Arg::I32(t),
            Arg::I32(tp),
        ],
    )?;
    Ok(Some(vec![dev_out(y)]))
}

fn layer_norm<B: Backend>(cx: &mut Cx<'_, '_, B>) -> R<Outs<B>> {
    let d = cx.dtype(0)?;
    let Some(t) = fcode(d) else { return Ok(None) };
    if cx.out_present(1) || cx.out_present(2) {
        return Ok(None);
    }
    let dp = cx.dtype(1)?;
    let Some(tp) = fcode(dp) else { return Ok(None) };
    if cx.present(2) && cx.dtype(2)? != dp {
        return Ok(None);
    }
    let s = cx.shape(0)?;
    let a = norm_axis(cx.ai("axis", -1), s.len())?;
    let outer: usize = s[..a].iter().product();
    let r: usize = s[a..].iter().product();
    if cx.shape(1)?.iter().product::<usize>() != r
        || (cx.present(2) && cx.shape(2)?.iter().product::<usize>() != r)
    {
        // scale/bias broadcast over part of the normalised axes: the CPU handles it
        return Ok(None);
    }
    let x = cx.dev(0)?;
    let scale = cx.dev(1)?;
    let bias = if cx.present(2) {
        Some(cx.dev(2)?)
    } else {
        None
    };
    let y = cx.alloc(s, d)?;
    if outer > 0 && r > 0 {
        cx.launch(
            k::LAYER_NORM,
            Grid::per_output(outer),
            &[
                ptr(&x),
                ptr(&scale),
                bias.as_ref().map_or(Arg::Null, |b| ptr(b)),
                ptr(&y),
                Arg::I64(outer as i64),
                Arg::I64(r as i64),
                Arg::F32(cx.af("epsilon", 1e-5)),
                Arg::I32(t),
                Arg::I32(tp),
            ],
        )?;
    }
    Ok(Some(vec![dev_out(y)]))
}

fn softmax<B: Backend>(cx: &mut Cx<'_, '_, B>) -> R<Outs<B>> {
    let d = cx.dtype(0)?;
    let Some(t) = fcode(d) else { return Ok(None) };
    let s = cx.shape(0)?;
    if s.is_empty() {
        return Ok(None);
    }
    let legacy = cx.ex.opset < 13;
    let a = norm_axis(cx.ai("axis", if legacy { 1 } else { -1 }), s.len())?;
    let outer: usize = s[..a].iter().product();
    let (r, inner): (usize, usize) = if legacy {
        (s[a..].iter().product(), 1)
    } else {
        (s[a], s[a + 1..].iter().product())
    };
    let x = cx.dev(0)?;
    let y = cx.alloc(s, d)?;
    let n = outer * inner;
    if n > 0 && r > 0 {
        cx.launch(
            k::SOFTMAX,
            Grid::per_output(n),
            &[
                ptr(&x),
                ptr(&y),
                Arg::I64(outer as i64),
                Arg::I64(r as i64),
                Arg::I64(inner as i64),
                Arg::I32(t),
                Arg::I32((cx.node.op_type == "LogSoftmax") as i32),
            ],
        )?;
    }
    Ok(Some(vec![dev_out(y)]))
}

/// Launches REDUCE over x viewed as [outer, r, inner].
fn launch_reduce<B: Backend>(
    cx: &Cx<'_, '_, B>,
    x: &DevTensor<B>,
    y: &DevTensor<B>,
    (outer, r, inner): (usize, usize, usize),
    op: Reduce,
) -> R<()> {
    let t = fcode(x.dtype).ok_or("not a float tensor")?;
    let n = outer * inner;
    if n == 0 {
        return Ok(());
    }
    cx.launch(
        k::REDUCE,
        Grid::per_output(n),
        &[
            ptr(x),
            ptr(y),
            Arg::I64(outer as i64),
            Arg::I64(r as i64),
            Arg::I64(inner as i64),
            Arg::I32(t),
            Arg::I32(t),
            Arg::I32(op as i32),
        ],
    )
}

fn reduce<B: Backend>(cx: &mut Cx<'_, '_, B>, op: Reduce) -> R<Outs<B>> {
    let d = cx.dtype(0)?;
    if fcode(d).is_none() {
        return Ok(None);
    }
    let s = cx.shape(0)?;
    let rank = s.len();
    // axes became an input in opset 18 (ReduceSum: 13)
    let from = if cx.node.op_type == "ReduceSum" {
        13
    } else {
        18
    };
    let axes = axes_param(cx, from, 1)?;
    let keep = cx.ai("keepdims", 1) != 0;
    let noop = cx.ai("noop_with_empty_axes", 0) != 0;
    let mut axes: Vec<usize> = match axes {
        Some(a) if !a.is_empty() => a.iter().map(|&x| norm_axis(x, rank)).collect::<R<_>>()?,
        _ if noop => return Ok(Some(vec![dev_out(cx.dev(0)?)])),
        _ => (0..rank).collect(),
    };
    axes.sort_unstable();
    axes.dedup();
    if axes.iter().any(|&a| s[a] == 0) {
        return Ok(None);
    }
    let out: Vec<usize> = (0..rank)
        .filter_map(|i| {
            if axes.contains(&i) {
                keep.then_some(1)
            } else {
                Some(s[i])
            }
        })
        .collect();
    let x = cx.dev(0)?;
    let y = cx.alloc(out, d)?;
    let contiguous = axes.windows(2).all(|w| w[1] == w[0] + 1);
    if axes.is_empty() {
        return Ok(None);
    }
    if contiguous {
        let (a0, a1) = (axes[0], axes[axes.len() - 1]);
        let dims = (
            s[..a0].iter().product(),
            s[a0..=a1].iter().product(),
            s[a1 + 1..].iter().product(),
        );
        launch_reduce(cx, &x, &y, dims, op)?;
    } else {
        // move the reduced axes last, then reduce rows
        let kept: Vec<usize> = (0..rank).filter(|i| !axes.contains(i)).collect();
        let perm: Vec<usize> = kept.iter().chain(&axes).copied().collect();
        let cs = contig(&s);
        let pshape: Vec<usize> = perm.iter().map(|&p| s[p]).collect();
        let src: Vec<i64> = perm.iter().map(|&p| cs[p]).collect();
        let tmp = cx.alloc(pshape.clone(), d)?;
        if !cx.copy(&x, &tmp, &pshape, &src, &contig(&pshape), 0, 0)? {
            return Ok(None);
        }
        let outer = kept.iter().map(|&i| s[i]).product();
        let r = axes.iter().map(|&i| s[i]).product();
        launch_reduce(cx, &tmp, &y, (outer, r, 1), op)?;
    }
    Ok(Some(vec![dev_out(y)]))
}

fn global_pool<B: Backend>(cx: &mut Cx<'_, '_, B>, op: Reduce) -> R<Outs<B>> {
    let d = cx.dtype(0)?;
    if fcode(d).is_none() {
        return Ok(None);
    }
    let s = cx.shape(0)?;
    if s.len() < 3 {
        return Ok(None);
    }
    let mut out = s[..2].to_vec();
    out.extend(std::iter::repeat_n(1, s.len() - 2));
    let r: usize = s[2..].iter().product();
    if r == 0 {
        return Ok(None);
    }
    let x = cx.dev(0)?;
    let y = cx.alloc(out, d)?;
    launch_reduce(cx, &x, &y, (s[0] * s[1], r, 1), op)?;
    Ok(Some(vec![dev_out(y)]))
}

fn pool<B: Backend>(cx: &mut Cx<'_, '_, B>, mode: i32) -> R<Outs<B>> {
    let d = cx.dtype(0)?;
    let Some(t) = fcode(d) else { return Ok(None) };
    if cx.out_present(1) {
        return Ok(None);
    }
    let s = cx.shape(0)?;
    if !(s.len() == 3 || s.len() == 4) {
        return Ok(None);
    }
    let kernel: Vec<usize> = cx
        .ais("kernel_shape")
        .ok_or("kernel_shape is required")?
        .iter()
        .map(|&k| k.max(0) as usize)
        .collect();
    let spatial = s[2..].to_vec();
    let win = mpopt_exec::geometry::window(cx.node, &spatial, kernel, cx.ai("ceil_mode", 0) != 0)?;
    let two = |v: &[usize], one: usize| -> (i64, i64) {
        if v.len() == 1 {
            (one as i64, v[0] as i64)
        } else {
            (v[0] as i64, v[1] as i64)
        }
    };
    let (h, w) = two(&spatial, 1);
    let (kh, kw) = two(&win.kernel, 1);
    let (oh, ow) = two(&win.out, 1);
    let (sh, sw) = two(&win.strides, 1);
    let (ph, pw) = two(&win.pad_begin, 0);
    let (dh, dw) = two(&win.dilations, 1);
    let (eh, ew) = two(&win.pad_end, 0);
    let mut out = s[..2].to_vec();
    out.extend(&win.out);
    let x = cx.dev(0)?;
    let y = cx.alloc(out, d)?;
    let nc = s[0] * s[1];
    let n = y.numel();
    cx.launch_elems(
        k::POOL2D,
        n,
        &[
            ptr(&x),
            ptr(&y),
            Arg::I64(nc as i64),
            Arg::I64(h),
            Arg::I64(w),
            Arg::I64(oh),
            Arg::I64(ow),
            Arg::I64(kh),
            Arg::I64(kw),
            Arg::I64(sh),
            Arg::I64(sw),
            Arg::I64(ph),
            Arg::I64(pw),
            Arg::I64(dh),
            Arg::I64(dw),
            Arg::I64(h + eh),
            Arg::I64(w + ew),
            Arg::I32(mode),
            Arg::I32((cx.ai("count_include_pad", 0) != 0) as i32),
            Arg::I32(t),
        ],
    )?;
    Ok(Some(vec![dev_out(y)]))
}

fn resize<B: Backend>(cx: &mut Cx<'_, '_, B>) -> R<Outs<B>> {
    let d = cx.dtype(0)?;
    let Some(t) = fcode(d) else { return Ok(None) };
    let s = cx.shape(0)?;
    if s.len() != 4
        || cx.ai("antialias", 0) != 0
        || cx.ais("axes").is_some()
        || cx
            .astr("keep_aspect_ratio_policy")
            .is_some_and(|p| p != "stretch")
    {
        return Ok(None);
    }
    let legacy = cx.ex.opset < 11;
    let mode = match cx.astr("mode").as_deref().unwrap_or("nearest") {
        "nearest" => 0,
        "linear" | "bilinear" => 1,
        _ => return Ok(None),
    };
    let ctm = match cx
        .astr("coordinate_transformation_mode")
        .as_deref()
        .unwrap_or(if legacy { "asymmetric" } else { "half_pixel" })
    {
        "half_pixel" => 0,
        "asymmetric" => 1,
        "align_corners" => 2,
        "pytorch_half_pixel" => 3,
        _ => return Ok(None),
    };
    let nearest = match cx
        .astr("nearest_mode")
        .as_deref()
        .unwrap_or("round_prefer_floor")
    {
        "round_prefer_floor" => 0,
        "round_prefer_ceil" => 1,
        "floor" => 2,
        "ceil" => 3,
        _ => return Ok(None),
    };
    let (scales_t, sizes_t) = if legacy {
        (cx.host(1)?, None)
    } else {
        (cx.host(2)?, cx.host(3)?)
    };
    let mut scales = [1f64; 4];
    let mut out = s.clone();
    if let Some(z) = sizes_t.filter(|z| !z.is_empty()) {
        let z = z.to_i64s()?;
        if z.len() != 4 {
            return Ok(None);
        }
        for i in 0..4 {
            out[i] = z[i].max(0) as usize;
            scales[i] = out[i] as f64 / s[i] as f64;
        }
    } else if let Some(sc) = scales_t.filter(|z| !z.is_empty()) {
        let sc = sc.to_f64s()?;
        if sc.len() != 4 {
            return Ok(None);
        }
        for i in 0..4 {
            scales[i] = sc[i];
            out[i] = (s[i] as f64 * sc[i]).floor() as usize;
        }
    } else {
        return Err("Resize needs scales or sizes".into());
    }
    if out[0] != s[0] || out[1] != s[1] || scales[0] != 1.0 || scales[1] != 1.0 {
        return Ok(None);
    }
    let x = cx.dev(0)?;
    let y = cx.alloc(out.clone(), d)?;
    let n = y.numel();
    cx.launch_elems(
        k::RESIZE2D,
        n,
        &[
            ptr(&x),
            ptr(&y),
            Arg::I64((s[0] * s[1]) as i64),
            Arg::I64(s[2] as i64),
            Arg::I64(s[3] as i64),
            Arg::I64(out[2] as i64),
            Arg::I64(out[3] as i64),
            Arg::F32(scales[2] as f32),
            Arg::F32(scales[3] as f32),
            Arg::I32(mode),
            Arg::I32(ctm),
            Arg::I32(nearest),
            Arg::I32(t),
        ],
    )?;
    Ok(Some(vec![dev_out(y)]))
}

fn pad<B: Backend>(cx: &mut Cx<'_, '_, B>) -> R<Outs<B>> {
    let d = cx.dtype(0)?;
    let Some(es) = elem_size(d) else {
        return Ok(None);
    };
    let mode = match cx.astr("mode").as_deref().unwrap_or("constant") {
        "constant" => None,
        "edge" => Some(0),
        "reflect" => Some(1),
        _ => return Ok(None),
    };
    let s = cx.shape(0)?;
    let r = s.len();
    let (pads, value) = if cx.ex.opset < 11 {
        (
            cx.ais("pads").ok_or("pads are required")?,
            cx.af("value", 0.0) as f64,
        )
    } else {
        if cx.present(3) {
            return Ok(None);
        }
        let v = match cx.host(2)? {
            Some(t) if !t.is_empty() => t.to_f64s()?[0],
            _ => 0.0,
        };
        (cx.host_i64s(1)?.ok_or("pads are required")?, v)
    };
    if pads.len() != 2 * r || pads.iter().any(|&p| p < 0) {
        return Ok(None);
    }
    let out: Vec<usize> = (0..r)
        .map(|i| s[i] + pads[i] as usize + pads[i + r] as usize)
        .collect();
    if let Some(mode) = mode {
        // every output element reads one input element (edge: the nearest; reflect: mirrored)
        if s.contains(&0)
            || (mode == 1 && (0..r).any(|i| pads[i].max(pads[i + r]) as usize >= s[i]))
        {
            return Ok(None);
        }
        let dims: Vec<i64> = s.iter().map(|&d| d as i64).collect();
        let Some(v) = Strides3::exact(&out, &[&contig(&s), &dims, &pads[..r]], [0; 3]) else {
            return Ok(None);
        };
        let x = cx.dev(0)?;
        let y = cx.alloc(out, d)?;
        let n = y.numel();
        cx.launch_elems(
            k::PAD_INDEX,
            n,
            &[
                ptr(&x),
                ptr(&y),
                Arg::I64(n as i64),
                Arg::Strides(v),
                Arg::I32(mode),
                Arg::I32(es as i32),
            ],
        )?;
        return Ok(Some(vec![dev_out(y)]));
    }
    // the constant in the tensor's own type, as raw bits
    let c = cast_tensor(&Tensor::new(vec![1], Data::F64(vec![value])), d)?;
    let raw = data_to_raw(&c.data);
    let mut bits = [0u8; 8];
    bits[..raw.len().min(8)].copy_from_slice(&raw[..raw.len().min(8)]);
    let x = cx.dev(0)?;
    let y = cx.alloc(out.clone(), d)?;
    let n = y.numel();
    if n > 0 {
        cx.launch(
            k::FILL,
            Grid::elems(n),
            &[
                ptr(&y),
                Arg::I64(n as i64),
                Arg::U64(u64::from_le_bytes(bits)),
                Arg::I32(es as i32),
            ],
        )?;
        let os = contig(&out);
        let base: i64 = (0..r).map(|i| pads[i] * os[i]).sum();
        if !cx.copy(&x, &y, &s, &contig(&s), &os, 0, base)? {
            return Ok(None);
        }
    }
    Ok(Some(vec![dev_out(y)]))
}

fn shape<B: Backend>(cx: &mut Cx<'_, '_, B>) -> R<Outs<B>> {
    let s = cx.shape(0)?;
    let r = s.len() as i64;
    let clampi = |v: i64| {
        let v = if v < 0 { v + r } else { v };
        v.clamp(0, r) as usize
    };
    let start = clampi(cx.ai("start", 0));
    let end = clampi(cx.ai("end", r));
    let dims: Vec<i64> = if start < end {
        s[start..end].iter().map(|&d| d as i64).collect()
    } else {
        Vec::new()
    };
    Ok(Some(vec![host_out(Tensor::i64(vec![dims.len()], dims))]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcasting() {
        assert_eq!(broadcast(&[3, 1], &[4]).unwrap(), [3, 4]);
        assert_eq!(broadcast(&[], &[2, 2]).unwrap(), [2, 2]);
        assert!(broadcast(&[3], &[4]).is_err());
        assert_eq!(bstrides(&[3, 1], &[2, 3, 4]), [0, 1, 0]);
        assert_eq!(contig(&[2, 3, 4]), [12, 4, 1]);
    }

    #[test]
    fn every_gpu_op_has_a_cpu_kernel_too() {
        for op in GPU_OPS {
            assert!(mpopt_exec::is_supported("", op), "{op}");
        }
    }
}
