//! Shape rules for `infer-types`: output shapes of one node from its input shapes, folded input values
//! (shape arithmetic) and attributes; plus the folding of shape arithmetic itself. A rule that cannot decide
//! returns `None` (unknown), never an error.

use mpopt_ir::{AttrValue, DType, Dim, DimValue, Node};

use crate::sym::{MAX_ELEMS, SymTensor, arith, broadcast_elementwise};

/// What a rule may look at.
pub(crate) struct NodeView<'a> {
    pub(crate) node: &'a Node,
    pub(crate) opset: i64,
    /// Input shapes (`None`: no input, or rank unknown).
    pub(crate) shapes: Vec<Option<&'a [Dim]>>,
    /// Folded input values.
    pub(crate) consts: Vec<Option<&'a SymTensor>>,
    /// Values of small float constant inputs (Resize scales).
    pub(crate) floats: Vec<Option<&'a [f64]>>,
    /// Number of outputs.
    pub(crate) n_out: usize,
}

type Shape = Option<Vec<Dim>>;

impl NodeView<'_> {
    fn op(&self) -> &str {
        &self.node.op_type
    }
    fn shape(&self, i: usize) -> Option<&[Dim]> {
        self.shapes.get(i).copied().flatten()
    }
    fn rank(&self, i: usize) -> Option<usize> {
        self.shape(i).map(<[Dim]>::len)
    }
    fn cst(&self, i: usize) -> Option<&SymTensor> {
        self.consts.get(i).copied().flatten()
    }
    fn has_input(&self, i: usize) -> bool {
        self.node.inputs().get(i).is_some_and(Option::is_some)
    }
    fn int(&self, name: &str) -> Option<i64> {
        match self.node.attr(name).map(|a| &a.value) {
            Some(AttrValue::Int(i)) => Some(*i),
            _ => None,
        }
    }
    fn ints(&self, name: &str) -> Option<Vec<i64>> {
        match self.node.attr(name).map(|a| &a.value) {
            Some(AttrValue::Ints(v)) => Some(v.clone()),
            _ => None,
        }
    }
    fn string(&self, name: &str) -> Option<String> {
        match self.node.attr(name).map(|a| &a.value) {
            Some(AttrValue::String(s)) => Some(String::from_utf8_lossy(s).into_owned()),
            _ => None,
        }
    }
}

fn known(n: i64) -> Dim {
    Dim::known(n)
}

fn unknown() -> Dim {
    Dim::unknown()
}

/// Normalizes a possibly negative axis against a rank.
fn axis(a: i64, rank: usize) -> Option<usize> {
    let r = rank as i64;
    let a = if a < 0 { a + r } else { a };
    (0..r).contains(&a).then_some(a as usize)
}

/// Numpy broadcasting of two dims.
fn bcast_dim(a: &Dim, b: &Dim) -> Dim {
    use DimValue::*;
    match (&a.value, &b.value) {
        (Known(1), _) => b.clone(),
        (_, Known(1)) => a.clone(),
        (Known(x), Known(y)) if x == y => a.clone(),
        (Known(_), _) => a.clone(),
        (_, Known(_)) => b.clone(),
        (Symbol(x), Symbol(y)) if x == y => a.clone(),
        _ => unknown(),
    }
}

pub(crate) fn broadcast(shapes: &[Option<&[Dim]>]) -> Shape {
    let mut out: Vec<Dim> = Vec::new();
    for s in shapes {
        let s = (*s)?;
        if s.len() > out.len() {
            let mut grown = s[..s.len() - out.len()].to_vec();
            grown.append(&mut out);
            out = grown;
        }
        let off = out.len() - s.len();
        for (i, d) in s.iter().enumerate() {
            out[off + i] = bcast_dim(&out[off + i], d);
        }
    }
    Some(out)
}

/// Ops whose first output has the shape of their first input.
const SAME_AS_INPUT0: &[&str] = &[
    "Abs",
    "Acos",
    "Acosh",
    "Asin",
    "Asinh",
    "Atan",
    "Atanh",
    "BatchNormalization",
    "Bernoulli",
    "BitwiseNot",
    "Cast",
    "CastLike",
    "Ceil",
    "Celu",
    "Clip",
    "Cos",
    "Cosh",
    "CumSum",
    "DequantizeLinear",
    "Dropout",
    "Elu",
    "Erf",
    "Exp",
    "EyeLike",
    "Floor",
    "Gelu",
    "GroupNormalization",
    "HardSigmoid",
    "HardSwish",
    "Hardmax",
    "Identity",
    "InstanceNormalization",
    "IsInf",
    "IsNaN",
    "LRN",
    "LayerNormalization",
    "LeakyRelu",
    "Log",
    "LogSoftmax",
    "LpNormalization",
    "MeanVarianceNormalization",
    "Mish",
    "Neg",
    "Not",
    "QuantizeLinear",
    "RandomNormalLike",
    "RandomUniformLike",
    "Reciprocal",
    "Relu",
    "ReverseSequence",
    "RMSNormalization",
    "Round",
    "Selu",
    "Shrink",
    "Sigmoid",
    "Sign",
    "Sin",
    "Sinh",
    "Softmax",
    "Softplus",
    "Softsign",
    "Sqrt",
    "Tan",
    "Tanh",
    "ThresholdedRelu",
    "Trilu",
    "Swish",
    "ScatterElements",
    "ScatterND",
    "Scatter",
    // com.microsoft
    "FastGelu",
    "BiasGelu",
    "QuickGelu",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "SimplifiedLayerNormalization",
    "BiasAdd",
    "BiasSplitGelu",
];

/// Ops whose output broadcasts all inputs.
const BROADCAST: &[&str] = &[
    "Add",
    "And",
    "BitShift",
    "BitwiseAnd",
    "BitwiseOr",
    "BitwiseXor",
    "Div",
    "Equal",
    "Greater",
    "GreaterOrEqual",
    "Less",
    "LessOrEqual",
    "Max",
    "Mean",
    "Min",
    "Mod",
    "Mul",
    "Or",
    "Pow",
    "PRelu",
    "Sub",
    "Sum",
    "Where",
    "Xor",
];

const REDUCE: &[&str] = &[
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceProd",
    "ReduceSum",
    "ReduceSumSquare",
];

/// Output shapes, one per output.
pub(crate) fn shapes(v: &NodeView) -> Vec<Shape> {
    let mut out = vec![None; v.n_out];
    if v.n_out == 0 {
        return out;
    }
    let op = v.op();
    let first = |s: Shape| {
        let mut o = vec![None; v.n_out];
        o[0] = s;
        o
    };
    if SAME_AS_INPUT0.contains(&op) {
        out[0] = v.shape(0).map(<[Dim]>::to_vec);
        match op {
            // training mode: running mean and variance, one per channel
            "BatchNormalization" if v.n_out > 1 => {
                let c = v.shape(0).and_then(|s| s.get(1).cloned());
                for o in out.iter_mut().skip(1) {
                    *o = c.clone().map(|c| vec![c]);
                }
            }
            "Dropout" if v.n_out > 1 => out[1] = out[0].clone(),
            "LayerNormalization" | "SimplifiedLayerNormalization" if v.n_out > 1 => {
                if let Some(s) = v.shape(0)
                    && let Some(ax) = axis(v.int("axis").unwrap_or(-1), s.len())
                {
                    let stat: Vec<Dim> = s
                        .iter()
                        .enumerate()
                        .map(|(i, d)| if i < ax { d.clone() } else { known(1) })
                        .collect();
                    for o in out.iter_mut().skip(1) {
                        *o = Some(stat.clone());
                    }
                }
            }
            _ => {}
        }
        return out;
    }
    if BROADCAST.contains(&op) {
        let ins: Vec<Option<&[Dim]>> = (0..v.node.inputs().len())
            .filter(|&i| v.has_input(i))
            .map(|i| v.shape(i))
            .collect();
        return first(broadcast(&ins));
    }
    if REDUCE.contains(&op) || op == "ArgMax" || op == "ArgMin" {
        return first(reduce(v));
    }
    match op {
        "MatMul" | "MatMulInteger" | "QLinearMatMul" | "FusedMatMul" => {
            let (a, b) = if op == "QLinearMatMul" {
                (v.shape(0), v.shape(3))
            } else {
                (v.shape(0), v.shape(1))
            };
            first(matmul(a, b))
        }
        "Gemm" => first(gemm(v)),
        "Conv" | "ConvInteger" | "QLinearConv" | "MaxPool" | "AveragePool" | "LpPool" => {
            let s = conv_pool(v);
            let mut o = first(s.clone());
            if op == "MaxPool" && v.n_out > 1 {
                o[1] = s;
            }
            o
        }
        "ConvTranspose" => first(conv_transpose(v)),
        "GlobalAveragePool" | "GlobalMaxPool" | "GlobalLpPool" => first(v.shape(0).map(|s| {
            s.iter()
                .enumerate()
                .map(|(i, d)| if i < 2 { d.clone() } else { known(1) })
                .collect()
        })),
        "Reshape" => first(reshape(v)),
        "Flatten" => first(v.shape(0).and_then(|s| {
            let ax = v.int("axis").unwrap_or(1);
            let ax = if ax < 0 { ax + s.len() as i64 } else { ax } as usize;
            (ax <= s.len()).then(|| vec![product(&s[..ax]), product(&s[ax..])])
        })),
        "Expand" if v.cst(1).is_none() => first(
            v.rank(0)
                .zip(vector_len(v, 1))
                .map(|(r, k)| vec![unknown(); r.max(k)]),
        ),
        "Expand" => first(
            v.cst(1)
                .map(|c| {
                    c.vals
                        .iter()
                        .map(|x| Dim {
                            value: x.clone(),
                            denotation: None,
                        })
                        .collect::<Vec<_>>()
                })
                .and_then(|target| {
                    let ins = [v.shape(0), Some(target.as_slice())];
                    broadcast(&ins)
                }),
        ),
        "Tile" if v.cst(1).and_then(SymTensor::known).is_none() => {
            first(v.rank(0).map(|r| vec![unknown(); r]))
        }
        "Tile" => first(
            v.shape(0)
                .zip(v.cst(1).and_then(SymTensor::known))
                .and_then(|(s, reps)| {
                    (s.len() == reps.len()).then(|| {
                        s.iter()
                            .zip(&reps)
                            .map(|(d, &r)| match &d.value {
                                DimValue::Known(n) => known(n * r),
                                _ if r == 1 => d.clone(),
                                _ => unknown(),
                            })
                            .collect()
                    })
                }),
        ),
        "Transpose" => first(v.shape(0).and_then(|s| {
            let perm = v
                .ints("perm")
                .unwrap_or_else(|| (0..s.len() as i64).rev().collect());
            perm.iter()
                .map(|&p| axis(p, s.len()).map(|a| s[a].clone()))
                .collect()
        })),
        "Concat" => first(concat(v)),
        "Split" => split(v),
        "Slice" => first(slice(v)),
        "Gather" => first(v.shape(0).zip(v.shape(1)).and_then(|(d, i)| {
            let ax = axis(v.int("axis").unwrap_or(0), d.len())?;
            let mut s = d[..ax].to_vec();
            s.extend_from_slice(i);
            s.extend_from_slice(&d[ax + 1..]);
            Some(s)
        })),
        "GatherElements" => first(v.shape(1).map(<[Dim]>::to_vec)),
        "Squeeze" => first(squeeze(v)),
        "Unsqueeze" => first(unsqueeze(v)),
        // always 1-D; its length is known when the input's rank is
        "Shape" => first(Some(vec![v.rank(0).map_or_else(unknown, |r| {
            let (s, e) = shape_range(v, r);
            known(e.saturating_sub(s) as i64)
        })])),
        "Size" => first(Some(Vec::new())),
        "ConstantOfShape" if v.cst(0).is_none() => {
            first(vector_len(v, 0).map(|k| vec![unknown(); k]))
        }
        "ConstantOfShape" => first(v.cst(0).map(|c| {
            c.vals
                .iter()
                .map(|x| Dim {
                    value: x.clone(),
                    denotation: None,
                })
                .collect()
        })),
        "Range" => {
            let num = |i: usize| -> Option<f64> {
                v.cst(i)
                    .and_then(SymTensor::known)
                    .and_then(|k| k.first().map(|&x| x as f64))
                    .or_else(|| v.floats.get(i)?.as_ref()?.first().copied())
            };
            first(Some(vec![match (num(0), num(1), num(2)) {
                (Some(a), Some(b), Some(c)) if c != 0.0 => {
                    known(((b - a) / c).ceil().max(0.0) as i64)
                }
                _ => unknown(),
            }]))
        }
        "Resize" | "Upsample" => first(resize(v)),
        "Pad" => first(pad(v)),
        "TopK" => {
            let s = v.shape(0).and_then(|s| {
                let ax = axis(v.int("axis").unwrap_or(-1), s.len())?;
                let k = v
                    .cst(1)
                    .and_then(SymTensor::known)
                    .and_then(|k| k.first().map(|&k| known(k)))
                    .or_else(|| v.int("k").map(known));
                let mut o = s.to_vec();
                o[ax] = k.unwrap_or_else(unknown);
                Some(o)
            });
            vec![s; v.n_out]
        }
        "NonZero" => first(v.rank(0).map(|r| vec![known(r as i64), unknown()])),
        "OneHot" => first(v.shape(0).map(|s| {
            let depth = v
                .cst(1)
                .and_then(SymTensor::known)
                .and_then(|d| d.first().map(|&d| known(d)))
                .unwrap_or_else(unknown);
            let r = s.len() + 1;
            let ax = axis(v.int("axis").unwrap_or(-1), r).unwrap_or(r - 1);
            let mut o = s.to_vec();
            o.insert(ax, depth);
            o
        })),
        "DepthToSpace" | "SpaceToDepth" => first(v.shape(0).and_then(|s| {
            let b = v.int("blocksize").filter(|&b| b > 0)?;
            let bb = b.checked_mul(b)?;
            if s.len() != 4 {
                return None;
            }
            let (c, h, w) = (&s[1].value, &s[2].value, &s[3].value);
            let scale = |d: &DimValue, up: bool| match d {
                DimValue::Known(n) => {
                    (if up { n.checked_mul(b) } else { Some(n / b) }).map_or_else(unknown, known)
                }
                _ => unknown(),
            };
            let d2s = op == "DepthToSpace";
            Some(vec![
                s[0].clone(),
                match c {
                    DimValue::Known(n) => (if d2s { Some(n / bb) } else { n.checked_mul(bb) })
                        .map_or_else(unknown, known),
                    _ => unknown(),
                },
                scale(h, d2s),
                scale(w, d2s),
            ])
        })),
        "LSTM" | "GRU" | "RNN" => rnn(v),
        "NonMaxSuppression" => first(Some(vec![unknown(), known(3)])),
        "RandomNormal" | "RandomUniform" => {
            first(v.ints("shape").map(|s| s.into_iter().map(known).collect()))
        }
        "NegativeLogLikelihoodLoss" | "SoftmaxCrossEntropyLoss" => {
            let none = v.string("reduction").as_deref() == Some("none");
            let mut o = vec![None; v.n_out];
            o[0] = if none {
                v.shape(1).map(<[Dim]>::to_vec)
            } else {
                Some(Vec::new())
            };
            if v.n_out > 1 {
                o[1] = v.shape(0).map(<[Dim]>::to_vec);
            }
            o
        }
        "Attention" if v.node.domain.is_empty() => attention(v),
        "EyeLike" => first(v.shape(0).map(<[Dim]>::to_vec)),
        "DynamicQuantizeLinear" => {
            let mut o = vec![
                v.shape(0).map(<[Dim]>::to_vec),
                Some(Vec::new()),
                Some(Vec::new()),
            ];
            o.truncate(v.n_out);
            o
        }
        "Einsum" | "Compress" | "Unique" | "Loop" | "If" | "Scan" => out,
        _ => out,
    }
}

/// Every dim as a number, when all are known.
fn known_dims(ds: &[Dim]) -> Option<Vec<i64>> {
    ds.iter().map(|d| d.value.as_known()).collect()
}

fn product(ds: &[Dim]) -> Dim {
    let mut p = 1i64;
    for d in ds {
        match d.value {
            DimValue::Known(n) => p *= n,
            _ => {
                return if ds.len() == 1 {
                    ds[0].clone()
                } else {
                    unknown()
                };
            }
        }
    }
    known(p)
}

fn matmul(a: Option<&[Dim]>, b: Option<&[Dim]>) -> Shape {
    let (a, b) = (a?, b?);
    if a.is_empty() || b.is_empty() {
        return None;
    }
    let a2: Vec<Dim> = if a.len() == 1 {
        vec![known(1), a[0].clone()]
    } else {
        a.to_vec()
    };
    let b2: Vec<Dim> = if b.len() == 1 {
        vec![b[0].clone(), known(1)]
    } else {
        b.to_vec()
    };
    let batch = broadcast(&[Some(&a2[..a2.len() - 2]), Some(&b2[..b2.len() - 2])])?;
    let mut out = batch;
    if a.len() > 1 {
        out.push(a2[a2.len() - 2].clone());
    }
    if b.len() > 1 {
        out.push(b2[b2.len() - 1].clone());
    }
    Some(out)
}

fn gemm(v: &NodeView) -> Shape {
    let (a, b) = (v.shape(0)?, v.shape(1)?);
    if a.len() != 2 || b.len() != 2 {
        return None;
    }
    let m = if v.int("transA").unwrap_or(0) != 0 {
        &a[1]
    } else {
        &a[0]
    };
    let n = if v.int("transB").unwrap_or(0) != 0 {
        &b[0]
    } else {
        &b[1]
    };
    Some(vec![m.clone(), n.clone()])
}

/// Whether a window op's `strides`, `dilations` (one positive entry per spatial axis) and `pads` (two per
/// axis) can be used: an invalid model's attributes give no shape rather than an index or a division by 0.
fn window_attrs_valid(sp: usize, strides: &[i64], dil: &[i64], pads: &[i64]) -> bool {
    strides.len() == sp
        && dil.len() == sp
        && pads.len() == 2 * sp
        && strides.iter().chain(dil).all(|&x| x > 0)
}

/// Spatial output size of a convolution or pooling window.
fn window_out(input: &Dim, k: i64, stride: i64, dil: i64, pad_total: i64, ceil: bool) -> Dim {
    match input.value {
        DimValue::Known(n) => {
            let eff = dil * (k - 1) + 1;
            let num = n + pad_total - eff;
            if num < 0 {
                return unknown();
            }
            let o = if ceil {
                (num + stride - 1) / stride + 1
            } else {
                num / stride + 1
            };
            known(o)
        }
        _ => unknown(),
    }
}

fn conv_pool(v: &NodeView) -> Shape {
    let x = v.shape(0)?;
    if x.len() < 3 {
        return None;
    }
    let sp = x.len() - 2;
    let is_conv = matches!(v.op(), "Conv" | "ConvInteger" | "QLinearConv");
    let w_idx = if v.op() == "QLinearConv" { 3 } else { 1 };
    let kernel: Vec<i64> = match v.ints("kernel_shape") {
        Some(k) => k,
        None if is_conv => known_dims(v.shape(w_idx)?.get(2..)?)?,
        None => return None,
    };
    if kernel.len() != sp {
        return None;
    }
    let strides = v.ints("strides").unwrap_or_else(|| vec![1; sp]);
    let dil = v.ints("dilations").unwrap_or_else(|| vec![1; sp]);
    let ceil = v.int("ceil_mode").unwrap_or(0) != 0;
    let auto = v.string("auto_pad").unwrap_or_else(|| "NOTSET".into());
    let pads = v.ints("pads").unwrap_or_else(|| vec![0; 2 * sp]);
    if !window_attrs_valid(sp, &strides, &dil, &pads) {
        return None;
    }
    let channels = if is_conv {
        v.shape(w_idx)
            .and_then(|w| w.first().cloned())
            .unwrap_or_else(unknown)
    } else {
        x[1].clone()
    };
    let mut out = vec![x[0].clone(), channels];
    for i in 0..sp {
        let d = &x[2 + i];
        out.push(match auto.as_str() {
            "SAME_UPPER" | "SAME_LOWER" => match d.value {
                DimValue::Known(n) => known((n + strides[i] - 1) / strides[i]),
                _ => unknown(),
            },
            "VALID" => window_out(d, kernel[i], strides[i], dil[i], 0, ceil),
            _ => window_out(
                d,
                kernel[i],
                strides[i],
                dil[i],
                pads[i] + pads[i + sp],
                ceil,
            ),
        });
    }
    Some(out)
}

fn conv_transpose(v: &NodeView) -> Shape {
    let (x, w) = (v.shape(0)?, v.shape(1)?);
    if x.len() < 3 || w.len() != x.len() {
        return None;
    }
    let sp = x.len() - 2;
    let group = v.int("group").unwrap_or(1);
    let out_c = match w[1].value {
        DimValue::Known(n) => known(n * group),
        _ => unknown(),
    };
    let mut out = vec![x[0].clone(), out_c];
    if let Some(os) = v.ints("output_shape") {
        out.extend(os.iter().rev().take(sp).rev().map(|&n| known(n)));
        return Some(out);
    }
    let kernel: Vec<i64> = match v.ints("kernel_shape") {
        Some(k) => k,
        None => known_dims(&w[2..])?,
    };
    let strides = v.ints("strides").unwrap_or_else(|| vec![1; sp]);
    let dil = v.ints("dilations").unwrap_or_else(|| vec![1; sp]);
    let pads = v.ints("pads").unwrap_or_else(|| vec![0; 2 * sp]);
    let opad = v.ints("output_padding").unwrap_or_else(|| vec![0; sp]);
    let auto = v.string("auto_pad").unwrap_or_else(|| "NOTSET".into());
    if kernel.len() != sp || opad.len() != sp || !window_attrs_valid(sp, &strides, &dil, &pads) {
        return None;
    }
    for i in 0..sp {
        out.push(match x[2 + i].value {
            DimValue::Known(n) if auto == "SAME_UPPER" || auto == "SAME_LOWER" => {
                known(n * strides[i])
            }
            DimValue::Known(n) => known(
                strides[i] * (n - 1) + opad[i] + ((kernel[i] - 1) * dil[i] + 1)
                    - pads[i]
                    - pads[i + sp],
            ),
            _ => unknown(),
        });
    }
    Some(out)
}

fn reduce(v: &NodeView) -> Shape {
    let s = v.shape(0)?;
    let keep = v.int("keepdims").unwrap_or(1) != 0;
    if matches!(v.op(), "ArgMax" | "ArgMin") {
        let ax = axis(v.int("axis").unwrap_or(0), s.len())?;
        let mut o = s.to_vec();
        if keep {
            o[ax] = known(1);
        } else {
            o.remove(ax);
        }
        return Some(o);
    }
    // ReduceSum from opset 13, the others from 18, take axes as an input.
    let axes_input = (v.op() == "ReduceSum" && v.opset >= 13) || v.opset >= 18;
    let axes = if axes_input {
        if v.has_input(1) {
            match v.cst(1).and_then(SymTensor::known) {
                Some(a) => a,
                // axes unknown: with keepdims the rank stays; without, it drops by the number of axes
                None if keep => {
                    return Some(
                        s.iter()
                            .map(|d| {
                                if d.value == DimValue::Known(1) {
                                    d.clone()
                                } else {
                                    unknown()
                                }
                            })
                            .collect(),
                    );
                }
                None => {
                    return vector_len(v, 1)
                        .and_then(|k| s.len().checked_sub(k))
                        .map(|r| vec![unknown(); r]);
                }
            }
        } else {
            Vec::new()
        }
    } else {
        v.ints("axes").unwrap_or_default()
    };
    let noop = v.int("noop_with_empty_axes").unwrap_or(0) != 0;
    if axes.is_empty() && noop {
        return Some(s.to_vec());
    }
    let set: Vec<usize> = if axes.is_empty() {
        (0..s.len()).collect()
    } else {
        axes.iter()
            .map(|&a| axis(a, s.len()))
            .collect::<Option<_>>()?
    };
    Some(
        s.iter()
            .enumerate()
            .filter_map(|(i, d)| match (set.contains(&i), keep) {
                (true, true) => Some(known(1)),
                (true, false) => None,
                (false, _) => Some(d.clone()),
            })
            .collect(),
    )
}

/// The length of a 1-D shape-like input, from its type, when its values are not folded.
fn vector_len(v: &NodeView, i: usize) -> Option<usize> {
    match v.shape(i)? {
        [d] => d.value.as_known().map(|n| n as usize),
        _ => None,
    }
}

fn reshape(v: &NodeView) -> Shape {
    let Some(target) = v.cst(1) else {
        return vector_len(v, 1).map(|k| vec![unknown(); k]);
    };
    let allowzero = v.int("allowzero").unwrap_or(0) != 0;
    let input = v.shape(0);
    let mut out: Vec<Dim> = Vec::new();
    let mut infer_at = None;
    for (i, t) in target.vals.iter().enumerate() {
        out.push(match t {
            DimValue::Known(0) if !allowzero => input
                .and_then(|s| s.get(i).cloned())
                .unwrap_or_else(unknown),
            DimValue::Known(-1) => {
                infer_at = Some(i);
                unknown()
            }
            x => Dim {
                value: x.clone(),
                denotation: None,
            },
        });
    }
    if let (Some(at), Some(input)) = (infer_at, input) {
        // -1: the input's element count divided by the others', when both are known; or, when the known parts
        // cancel, the one symbolic input dim left over.
        let mut num = 1i64;
        let mut num_syms: Vec<&DimValue> = Vec::new();
        for d in input {
            match &d.value {
                DimValue::Known(n) => num *= n,
                x => num_syms.push(x),
            }
        }
        let mut den = 1i64;
        let mut den_syms: Vec<&DimValue> = Vec::new();
        for (i, d) in out.iter().enumerate() {
            if i == at {
                continue;
            }
            match &d.value {
                DimValue::Known(n) => den *= n,
                x => den_syms.push(x),
            }
        }
        let mut rest: Vec<&DimValue> = num_syms.clone();
        let mut cancelled = true;
        for s in &den_syms {
            match rest
                .iter()
                .position(|r| r == s && matches!(r, DimValue::Symbol(_)))
            {
                Some(p) => {
                    rest.remove(p);
                }
                None => cancelled = false,
            }
        }
        if cancelled && den != 0 && num % den == 0 {
            match rest.as_slice() {
                [] => out[at] = known(num / den),
                [s @ DimValue::Symbol(_)] if num == den => {
                    out[at] = Dim {
                        value: (*s).clone(),
                        denotation: None,
                    }
                }
                _ => {}
            }
        }
    }
    Some(out)
}

fn concat(v: &NodeView) -> Shape {
    let n = v.node.inputs().len();
    let shapes: Vec<&[Dim]> = (0..n).map(|i| v.shape(i)).collect::<Option<_>>()?;
    let r = shapes.first()?.len();
    let ax = axis(v.int("axis")?, r)?;
    let mut out = shapes[0].to_vec();
    let mut total = DimValue::Known(0);
    for s in &shapes {
        if s.len() != r {
            return None;
        }
        total = arith("Add", &total, &s[ax].value);
        for (i, d) in s.iter().enumerate() {
            if i != ax
                && !matches!(out[i].value, DimValue::Known(_))
                && matches!(d.value, DimValue::Known(_))
            {
                out[i] = d.clone();
            }
        }
    }
    out[ax] = Dim {
        value: total,
        denotation: None,
    };
    Some(out)
}

fn split(v: &NodeView) -> Vec<Shape> {
    let n = v.n_out;
    let Some(s) = v.shape(0) else {
        return vec![None; n];
    };
    let Some(ax) = axis(v.int("axis").unwrap_or(0), s.len()) else {
        return vec![None; n];
    };
    let sizes: Option<Vec<i64>> = v
        .ints("split")
        .or_else(|| v.cst(1).and_then(SymTensor::known));
    let sizes = sizes.or_else(|| match s[ax].value {
        // `num_outputs` (opset 18): chunks of ceil(len / n), the last one smaller; without it the split must be
        // even, and an uneven one (dead code in a branch) stays unknown.
        DimValue::Known(len) => match v.int("num_outputs") {
            Some(parts) => {
                let parts = parts.max(1);
                let chunk = (len + parts - 1) / parts;
                // the last chunk must not be empty: otherwise the split is invalid (dead code), unknown
                (chunk * (parts - 1) < len).then(|| {
                    (0..n as i64)
                        .map(|i| chunk.min(len - chunk * i).max(0))
                        .collect()
                })
            }
            None if n > 0 && len % n as i64 == 0 => Some(vec![len / n as i64; n]),
            None => None,
        },
        _ => None,
    });
    (0..n)
        .map(|i| {
            let mut o = s.to_vec();
            o[ax] = sizes
                .as_ref()
                .and_then(|z| z.get(i))
                .map_or_else(unknown, |&k| known(k));
            Some(o)
        })
        .collect()
}

/// The first index a Slice reads: `start` made non-negative and clamped as ONNX specifies.
fn slice_start(dim: i64, start: i64, step: i64) -> i64 {
    let s = if start < 0 { start + dim } else { start };
    if step > 0 {
        s.clamp(0, dim)
    } else {
        s.clamp(-1, dim - 1)
    }
}

/// Elements a Slice takes along one axis (start and end clamp alike).
fn slice_len(dim: i64, start: i64, end: i64, step: i64) -> i64 {
    let (s, e) = (slice_start(dim, start, step), slice_start(dim, end, step));
    if step > 0 {
        ((e - s + step - 1) / step).max(0)
    } else {
        ((s - e - step - 1) / -step).max(0)
    }
}

fn slice(v: &NodeView) -> Shape {
    let s = v.shape(0)?;
    // The rank never changes; a dim whose start, end or step is not folded becomes unknown.
    let all_unknown = || Some(vec![unknown(); s.len()]);
    type Params = (
        Vec<DimValue>,
        Vec<DimValue>,
        Option<Vec<i64>>,
        Option<Vec<i64>>,
    );
    let (starts, ends, axes, steps): Params = if v.opset >= 10 {
        let (Some(st), Some(en)) = (v.cst(1), v.cst(2)) else {
            return all_unknown();
        };
        let ax = if v.has_input(3) {
            v.cst(3).and_then(SymTensor::known)
        } else {
            Some((0..st.vals.len() as i64).collect())
        };
        let sp = if v.has_input(4) {
            v.cst(4).and_then(SymTensor::known)
        } else {
            Some(vec![1; st.vals.len()])
        };
        (st.vals.clone(), en.vals.clone(), ax, sp)
    } else {
        let (Some(st), Some(en)) = (v.ints("starts"), v.ints("ends")) else {
            return all_unknown();
        };
        let ax = v
            .ints("axes")
            .unwrap_or_else(|| (0..st.len() as i64).collect());
        let n = st.len();
        (
            st.into_iter().map(DimValue::Known).collect(),
            en.into_iter().map(DimValue::Known).collect(),
            Some(ax),
            Some(vec![1; n]),
        )
    };
    let Some(axes) = axes else {
        return all_unknown();
    };
    let mut out = s.to_vec();
    for (i, &a) in axes.iter().enumerate() {
        let a = axis(a, s.len())?;
        let step = steps.as_ref().and_then(|st| st.get(i).copied());
        out[a] = match (&s[a].value, starts.get(i), ends.get(i), step) {
            (
                DimValue::Known(d),
                Some(DimValue::Known(st)),
                Some(DimValue::Known(en)),
                Some(step),
            ) if step != 0 => known(slice_len(*d, *st, *en, step)),
            // everything of a symbolic dim keeps it
            (_, Some(DimValue::Known(0)), Some(DimValue::Known(en)), Some(1))
                if *en >= i32::MAX as i64 =>
            {
                s[a].clone()
            }
            _ => unknown(),
        };
    }
    Some(out)
}

fn squeeze(v: &NodeView) -> Shape {
    let s = v.shape(0)?;
    let axes = if v.opset >= 13 {
        if v.has_input(1) {
            Some(v.cst(1)?.known()?)
        } else {
            None
        }
    } else {
        v.ints("axes")
    };
    match axes {
        Some(ax) => {
            let set: Vec<usize> = ax
                .iter()
                .map(|&a| axis(a, s.len()))
                .collect::<Option<_>>()?;
            Some(
                s.iter()
                    .enumerate()
                    .filter(|(i, _)| !set.contains(i))
                    .map(|(_, d)| d.clone())
                    .collect(),
            )
        }
        None => {
            if s.iter().any(|d| !matches!(d.value, DimValue::Known(_))) {
                return None;
            }
            Some(
                s.iter()
                    .filter(|d| d.value != DimValue::Known(1))
                    .cloned()
                    .collect(),
            )
        }
    }
}

fn unsqueeze(v: &NodeView) -> Shape {
    let s = v.shape(0)?;
    let axes = if v.opset >= 13 {
        v.cst(1).and_then(SymTensor::known)
    } else {
        v.ints("axes")
    };
    let Some(axes) = axes else {
        return vector_len(v, 1).map(|k| vec![unknown(); s.len() + k]);
    };
    let r = s.len() + axes.len();
    let mut set: Vec<usize> = axes.iter().map(|&a| axis(a, r)).collect::<Option<_>>()?;
    set.sort_unstable();
    let mut out = Vec::with_capacity(r);
    let mut it = s.iter();
    for i in 0..r {
        if set.contains(&i) {
            out.push(known(1));
        } else {
            out.push(it.next()?.clone());
        }
    }
    Some(out)
}

fn shape_range(v: &NodeView, r: usize) -> (usize, usize) {
    let clamp = |x: i64| {
        let x = if x < 0 { x + r as i64 } else { x };
        x.clamp(0, r as i64) as usize
    };
    let s = clamp(v.int("start").unwrap_or(0));
    let e = v.int("end").map_or(r, clamp);
    (s, e.max(s))
}

fn resize(v: &NodeView) -> Shape {
    let x = v.shape(0)?;
    let r = x.len();
    // sizes (input 3) win; else scales (input 2, or input 1 for Upsample and Resize-10)
    let scales_idx = if v.op() == "Upsample" || v.opset < 11 {
        1
    } else {
        2
    };
    if v.op() == "Resize" && v.opset >= 11 && v.has_input(3) {
        let Some(sizes) = v.cst(3) else {
            return Some(vec![unknown(); r]);
        };
        let axes = v.ints("axes");
        return match axes {
            None if sizes.vals.len() == r => Some(
                sizes
                    .vals
                    .iter()
                    .map(|d| Dim {
                        value: d.clone(),
                        denotation: None,
                    })
                    .collect(),
            ),
            Some(ax) => {
                let mut out = x.to_vec();
                for (k, &a) in ax.iter().enumerate() {
                    out[axis(a, r)?] = Dim {
                        value: sizes.vals.get(k)?.clone(),
                        denotation: None,
                    };
                }
                Some(out)
            }
            _ => None,
        };
    }
    let scales: Option<Vec<f64>> = match v.node.attr("scales").map(|a| &a.value) {
        Some(AttrValue::Floats(f)) => Some(f.iter().map(|&x| x as f64).collect()),
        _ => v
            .floats
            .get(scales_idx)
            .copied()
            .flatten()
            .map(<[f64]>::to_vec),
    };
    let Some(scales) = scales else {
        return Some(vec![unknown(); r]);
    };
    if scales.len() != r {
        return Some(vec![unknown(); r]);
    }
    Some(
        x.iter()
            .zip(&scales)
            .map(|(d, &s)| match d.value {
                DimValue::Known(n) => known((n as f64 * s).floor() as i64),
                _ if s == 1.0 => d.clone(),
                _ => unknown(),
            })
            .collect(),
    )
}

fn pad(v: &NodeView) -> Shape {
    let s = v.shape(0)?;
    let r = s.len();
    let pads = if v.opset >= 11 {
        v.cst(1).and_then(SymTensor::known)
    } else {
        v.ints("pads").or_else(|| v.ints("paddings"))
    };
    // pads or axes not folded: the rank stays, the dims are unknown
    let Some(pads) = pads else {
        return Some(vec![unknown(); r]);
    };
    let axes: Vec<usize> = if v.has_input(3) {
        let Some(ax) = v.cst(3).and_then(SymTensor::known) else {
            return Some(vec![unknown(); r]);
        };
        ax.iter().map(|&a| axis(a, r)).collect::<Option<_>>()?
    } else {
        (0..r).collect()
    };
    let n = axes.len();
    if pads.len() != 2 * n {
        return None;
    }
    let mut out = s.to_vec();
    for (k, &a) in axes.iter().enumerate() {
        out[a] = match s[a].value {
            DimValue::Known(d) => known(d + pads[k] + pads[k + n]),
            _ if pads[k] == 0 && pads[k + n] == 0 => s[a].clone(),
            _ => unknown(),
        };
    }
    Some(out)
}

/// ONNX Attention (opset 23): 3-D `[batch, seq, heads * head_size]` or 4-D `[batch, heads, seq, head_size]`
/// inputs; outputs Y, present_key, present_value, qk_matmul_output.
fn attention(v: &NodeView) -> Vec<Shape> {
    let n = v.n_out;
    let mut out = vec![None; n];
    let (Some(q), Some(k), Some(val)) = (v.shape(0), v.shape(1), v.shape(2)) else {
        return out;
    };
    let split = |s: &[Dim], heads: Option<i64>| -> Option<(Dim, Dim, Dim, Dim)> {
        match s.len() {
            4 => Some((s[0].clone(), s[1].clone(), s[2].clone(), s[3].clone())),
            3 => {
                // a head count of 0 or less is an invalid model, not a shape to divide by
                let h = heads.filter(|&h| h > 0)?;
                let hs = match s[2].value {
                    DimValue::Known(x) => known(x / h),
                    _ => unknown(),
                };
                Some((s[0].clone(), known(h), s[1].clone(), hs))
            }
            _ => None,
        }
    };
    let (Some((b, qh, qs, _)), Some((_, kh, ks, khs)), Some((_, _, _, vhs))) = (
        split(q, v.int("q_num_heads")),
        split(k, v.int("kv_num_heads")),
        split(val, v.int("kv_num_heads")),
    ) else {
        return out;
    };
    out[0] = Some(if q.len() == 3 {
        let hidden = match (&qh.value, &vhs.value) {
            (DimValue::Known(h), DimValue::Known(d)) => known(h * d),
            _ => unknown(),
        };
        vec![b.clone(), qs.clone(), hidden]
    } else {
        vec![b.clone(), qh.clone(), qs.clone(), vhs.clone()]
    });
    let total = match v.shape(4).and_then(|p| p.get(2)) {
        Some(p) => Dim {
            value: arith("Add", &p.value, &ks.value),
            denotation: None,
        },
        None => ks.clone(),
    };
    if n > 1 {
        out[1] = Some(vec![b.clone(), kh.clone(), total.clone(), khs.clone()]);
    }
    if n > 2 {
        out[2] = Some(vec![b.clone(), kh.clone(), total.clone(), vhs.clone()]);
    }
    if n > 3 {
        out[3] = Some(vec![b, qh, qs, total]);
    }
    out
}

fn rnn(v: &NodeView) -> Vec<Shape> {
    let n = v.n_out;
    // The output ranks are fixed; sequence length and batch come from X when its shape is known.
    let x: Vec<Dim> = match v.shape(0) {
        Some(x) if x.len() == 3 => x.to_vec(),
        _ => vec![unknown(); 3],
    };
    let batch_first = v.int("layout").unwrap_or(0) != 0;
    let (seq, batch) = if batch_first {
        (&x[1], &x[0])
    } else {
        (&x[0], &x[1])
    };
    let dirs = if v.string("direction").as_deref() == Some("bidirectional") {
        2
    } else {
        1
    };
    let hidden = v.int("hidden_size").map_or_else(unknown, known);
    let y = if batch_first {
        vec![batch.clone(), seq.clone(), known(dirs), hidden.clone()]
    } else {
        vec![seq.clone(), known(dirs), batch.clone(), hidden.clone()]
    };
    let h = if batch_first {
        vec![batch.clone(), known(dirs), hidden.clone()]
    } else {
        vec![known(dirs), batch.clone(), hidden.clone()]
    };
    let mut out = vec![Some(y), Some(h.clone()), Some(h)];
    out.truncate(n);
    out.resize(n, None);
    out
}

/// Folds shape arithmetic: the output values of a node whose inputs are folded (or, for Shape and Size,
/// whose input shape is known).
pub(crate) fn fold(v: &NodeView) -> Option<SymTensor> {
    let op = v.op();
    let out = match op {
        "Shape" => {
            let s = v.shape(0)?;
            let (a, b) = shape_range(v, s.len());
            SymTensor::vector(s[a..b].iter().map(|d| d.value.clone()).collect())
        }
        "Size" => SymTensor::scalar(product(v.shape(0)?).value),
        "Identity" => v.cst(0)?.clone(),
        "Cast"
            if v.int("to")
                .and_then(|c| DType::from_code(c as i32))
                .is_some_and(is_int) =>
        {
            v.cst(0)?.clone()
        }
        "Add" | "Sub" | "Mul" | "Div" | "Mod" | "Max" | "Min" => {
            broadcast_elementwise(op, v.cst(0)?, v.cst(1)?)?
        }
        "Neg" => {
            let c = v.cst(0)?;
            SymTensor {
                dims: c.dims.clone(),
                vals: c
                    .vals
                    .iter()
                    .map(|x| arith("Mul", x, &DimValue::Known(-1)))
                    .collect(),
            }
        }
        "Equal" => {
            let (a, b) = (v.cst(0)?, v.cst(1)?);
            let eq = broadcast_elementwise("Sub", a, b)?;
            SymTensor {
                dims: eq.dims,
                vals: eq
                    .vals
                    .iter()
                    .map(|d| match d {
                        DimValue::Known(x) => DimValue::Known((*x == 0) as i64),
                        _ => DimValue::Unknown,
                    })
                    .collect(),
            }
        }
        "Where" => {
            let (c, a, b) = (v.cst(0)?, v.cst(1)?, v.cst(2)?);
            let n = c.vals.len().max(a.vals.len()).max(b.vals.len());
            let pick = |t: &SymTensor, i: usize| {
                if t.vals.len() == 1 {
                    Some(t.vals[0].clone())
                } else {
                    t.vals.get(i).cloned()
                }
            };
            let dims = [c, a, b].iter().find(|t| t.vals.len() == n)?.dims.clone();
            if [c, a, b]
                .iter()
                .any(|t| t.vals.len() != n && t.vals.len() != 1)
            {
                return None;
            }
            let vals = (0..n)
                .map(|i| match pick(c, i)? {
                    DimValue::Known(0) => pick(b, i),
                    DimValue::Known(_) => pick(a, i),
                    _ => Some(DimValue::Unknown),
                })
                .collect::<Option<_>>()?;
            SymTensor { dims, vals }
        }
        "Concat" => {
            let parts: Vec<&SymTensor> = (0..v.node.inputs().len())
                .map(|i| v.cst(i))
                .collect::<Option<_>>()?;
            let r = parts.first()?.dims.len();
            let ax = axis(v.int("axis")?, r)?;
            if parts.iter().any(|p| {
                p.dims.len() != r
                    || p.dims[..ax] != parts[0].dims[..ax]
                    || p.dims[ax + 1..] != parts[0].dims[ax + 1..]
            }) {
                return None;
            }
            let outer: usize = parts[0].dims[..ax].iter().product();
            let inner: usize = parts[0].dims[ax + 1..].iter().product();
            let mut vals = Vec::new();
            for o in 0..outer {
                for p in &parts {
                    let chunk = p.dims[ax] * inner;
                    vals.extend_from_slice(&p.vals[o * chunk..(o + 1) * chunk]);
                }
            }
            let mut dims = parts[0].dims.clone();
            dims[ax] = parts.iter().map(|p| p.dims[ax]).sum();
            SymTensor { dims, vals }
        }
        "Gather" => {
            let (data, idx) = (v.cst(0)?, v.cst(1)?);
            let ax = axis(v.int("axis").unwrap_or(0), data.dims.len())?;
            let n = data.dims[ax] as i64;
            let ids: Vec<usize> = idx
                .known()?
                .iter()
                .map(|&i| if i < 0 { i + n } else { i } as usize)
                .collect();
            let picked = data.select(ax, &ids)?;
            let mut dims = data.dims[..ax].to_vec();
            dims.extend_from_slice(&idx.dims);
            dims.extend_from_slice(&data.dims[ax + 1..]);
            picked.reshaped(dims)?
        }
        "Unsqueeze" => {
            let c = v.cst(0)?;
            let axes = if v.opset >= 13 {
                v.cst(1)?.known()?
            } else {
                v.ints("axes")?
            };
            let r = c.dims.len() + axes.len();
            let set: Vec<usize> = axes.iter().map(|&a| axis(a, r)).collect::<Option<_>>()?;
            let mut it = c.dims.iter();
            let dims = (0..r)
                .map(|i| {
                    if set.contains(&i) {
                        Some(1)
                    } else {
                        it.next().copied()
                    }
                })
                .collect::<Option<_>>()?;
            c.reshaped(dims)?
        }
        "Squeeze" => {
            let c = v.cst(0)?;
            let axes = if v.opset >= 13 && v.has_input(1) {
                v.cst(1)?.known()
            } else {
                v.ints("axes")
            };
            let dims = match axes {
                Some(ax) => {
                    let set: Vec<usize> = ax
                        .iter()
                        .map(|&a| axis(a, c.dims.len()))
                        .collect::<Option<_>>()?;
                    c.dims
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| !set.contains(i))
                        .map(|(_, &d)| d)
                        .collect()
                }
                None => c.dims.iter().copied().filter(|&d| d != 1).collect(),
            };
            c.reshaped(dims)?
        }
        "Reshape" => {
            let c = v.cst(0)?;
            let t = v.cst(1)?.known()?;
            let mut dims: Vec<i64> = t
                .iter()
                .enumerate()
                .map(|(i, &d)| {
                    if d == 0 {
                        c.dims.get(i).map_or(0, |&x| x as i64)
                    } else {
                        d
                    }
                })
                .collect();
            if let Some(p) = dims.iter().position(|&d| d == -1) {
                let rest: i64 = dims.iter().filter(|&&d| d != -1).product();
                if rest == 0 {
                    return None;
                }
                dims[p] = c.vals.len() as i64 / rest;
            }
            c.reshaped(dims.into_iter().map(|d| d as usize).collect())?
        }
        "Transpose" => {
            let c = v.cst(0)?;
            let perm: Vec<usize> = match v.ints("perm") {
                Some(p) => p
                    .iter()
                    .map(|&x| axis(x, c.dims.len()))
                    .collect::<Option<_>>()?,
                None => (0..c.dims.len()).rev().collect(),
            };
            c.transposed(&perm)?
        }
        "Slice" if v.opset >= 10 => {
            let mut c = v.cst(0)?.clone();
            let st = v.cst(1)?.known()?;
            let en = v.cst(2)?.known()?;
            let axes = if v.has_input(3) {
                v.cst(3)?.known()?
            } else {
                (0..st.len() as i64).collect()
            };
            let steps = if v.has_input(4) {
                v.cst(4)?.known()?
            } else {
                vec![1; st.len()]
            };
            for (k, &start) in st.iter().enumerate() {
                let a = axis(*axes.get(k)?, c.dims.len())?;
                let step = *steps.get(k)?;
                if step == 0 {
                    return None;
                }
                let n = c.dims[a] as i64;
                let len = slice_len(n, start, *en.get(k)?, step);
                let start = slice_start(n, start, step);
                let idx: Vec<usize> = (0..len).map(|i| (start + i * step) as usize).collect();
                c = c.select(a, &idx)?;
            }
            c
        }
        "ConstantOfShape" => {
            let shape = v.cst(0)?.known()?;
            let n: i64 = shape.iter().product();
            if shape.iter().any(|&d| d < 0) || n as usize > MAX_ELEMS {
                return None;
            }
            let value = match v.node.attr("value").map(|a| &a.value) {
                Some(AttrValue::Tensor(t)) => SymTensor::from_tensor(t)?.vals.first()?.clone(),
                _ => return None,
            };
            SymTensor {
                dims: shape.iter().map(|&d| d as usize).collect(),
                vals: vec![value; n as usize],
            }
        }
        "Range" => {
            let (a, b, c) = (
                *v.cst(0)?.known()?.first()?,
                *v.cst(1)?.known()?.first()?,
                *v.cst(2)?.known()?.first()?,
            );
            if c == 0 {
                return None;
            }
            let n = (((b - a) as f64) / c as f64).ceil().max(0.0) as usize;
            if n > MAX_ELEMS {
                return None;
            }
            SymTensor::vector((0..n as i64).map(|k| DimValue::Known(a + k * c)).collect())
        }
        _ => return None,
    };
    (out.vals.len() <= MAX_ELEMS).then_some(out)
}

fn is_int(d: DType) -> bool {
    matches!(
        d,
        DType::I64
            | DType::I32
            | DType::I16
            | DType::I8
            | DType::U8
            | DType::U16
            | DType::U32
            | DType::U64
    )
}
