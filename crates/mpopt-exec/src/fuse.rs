//! Plan-time fusions: short runs of nodes that the interpreter executes as one step when nothing observes the
//! intermediate values (no trace, no calibration callback). Each fusion computes what its nodes compute, with
//! the same per-element f32 operations; a fused step whose run-time inputs do not fit its fast kernel (another
//! dtype, a broadcast it does not cover) runs its nodes one by one instead.
//!
//! * **Channels-last convolution.** `Transpose(perm=[0,3,1,2]) -> Conv -> Transpose(perm=[0,2,3,1])`, the shape
//!   TensorFlow exports leave around every convolution of an NHWC model, runs as one convolution that reads
//!   and writes NHWC: a 1x1 convolution is then a single product `[N*H*W, C] x [C, M]`, and the two transposes
//!   (about 15% of open_nsfw_resnet50's time) disappear. The products are the same; only the order in which
//!   each dot product sums its terms differs (channel-innermost instead of tap-innermost), as it does between
//!   any two GEMM kernels. A half (f16/bf16) weight is widened once at plan time; the input is widened and
//!   the result rounded once, as the unfused Conv does (open_nsfw converted to fp16: 252 -> 160 ms a run,
//!   with the half chains below; each output within one half ulp of the unfused run's).
//! * **Elementwise chains.** A path `Add/Sub/Mul/Div/Relu/Identity/Cast(to=FLOAT)` whose intermediate values
//!   have one reader each runs as one pass over L1-sized blocks instead of one pass over memory per node. Each
//!   node's other operand must broadcast as a scalar, a per-channel block or a same-shape tensor; every element
//!   sees the same f32 operations in the same order as the unfused nodes, so the results are bit-identical.
//!   Chains of f16 or bf16 values (the GPU-faithful mode) are fused too: each block is widened once, and
//!   after each op that computes a new value it is rounded to the half type and widened back, which is what
//!   the next unfused node would read. On ppocrv4_rec converted to fp16, its 66 chains took 245 ms node by
//!   node (a tensor-sized f32 copy of each input and each output) and 59 ms fused.
//!
//! Example (an NHWC model):
//!
//! ```text
//! before:  %t = Transpose[perm=[0,3,1,2]](%x)   %y = Conv(%t, %w)   %z = Transpose[perm=[0,2,3,1]](%y)
//!          %a = Add(%z, %bias)   %r = Relu(%a)
//! after:   %z = <conv channels-last>(%x, %w)    %r = <chain Add, Relu>(%z, %bias)
//! ```

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use half::{bf16, f16};
use mpopt_ir::{AttrValue, DType, Graph, Node, NodeId, ValueId};
use rayon::prelude::*;

use crate::geometry::Window;
use crate::ops::elementwise::par_fill;
use crate::ops::linalg::conv_nhwc;
use crate::{Data, Tensor, Value};

/// One step of a graph's fused schedule.
pub(crate) enum Step {
    /// A node run by its kernel.
    Node(NodeId),
    /// Several nodes run as one.
    Fused(Box<Fused>),
}

/// Nodes run as one step.
pub(crate) struct Fused {
    /// The nodes replaced, in schedule order: run one by one when the fast kernel does not apply.
    pub nodes: Vec<NodeId>,
    /// Every read of a value produced outside the step, one entry per input slot (a value read twice is
    /// listed twice), in node order: what the step consumes.
    pub inputs: Vec<ValueId>,
    /// The one value the step produces (the last node's output).
    pub output: ValueId,
    /// The fast kernel.
    pub kind: Kind,
}

/// What a fused step computes.
pub(crate) enum Kind {
    /// Channels-last convolution; `inputs` are `[x, w]` or `[x, w, bias]`.
    ConvNhwc {
        /// The Conv node (for its attributes).
        conv: NodeId,
        /// The weight reordered to `[M, KH, KW, C]` (widened when it is half).
        w: Arc<Vec<f32>>,
        /// The weight's type: a half weight runs on an input of its type, widened, and the result is rounded
        /// back to it, as the unfused Conv does.
        wtype: Elem,
        /// The weight's shape `[M, C, KH, KW]`.
        wshape: [usize; 4],
    },
    /// An elementwise chain; `inputs` are the head's operands followed by each later op's other operand.
    Chain(Vec<ChainOp>),
}

/// One op of an elementwise chain.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Op {
    Add,
    Sub,
    Mul,
    Div,
    Relu,
    /// `Identity`: the running value as it is.
    Copy,
    /// `Cast(to=FLOAT)`: a half running value widens (exactly) and the rest of the chain runs in f32.
    Widen,
    /// `Clip` with its min and max inputs present or not.
    Clip {
        lo: bool,
        hi: bool,
    },
    /// Inference `BatchNormalization` with its epsilon: reads scale, bias, mean and var.
    BatchNorm {
        eps: f32,
    },
}

impl Op {
    fn binary(self) -> bool {
        matches!(self, Op::Add | Op::Sub | Op::Mul | Op::Div)
    }
    /// Inputs besides the running value.
    fn operands(self) -> usize {
        match self {
            Op::Add | Op::Sub | Op::Mul | Op::Div => 1,
            Op::Relu | Op::Copy | Op::Widen => 0,
            Op::Clip { lo, hi } => lo as usize + hi as usize,
            Op::BatchNorm { .. } => 4,
        }
    }
}

/// An op of a chain with where its running value sits.
pub(crate) struct ChainOp {
    op: Op,
    /// For binary ops after the head: the running value is the left operand.
    left: bool,
}

/// Builds the fused schedule of a graph from its plain schedule `order` and the use count of each value.
/// `consts` are the graph's constants (the Conv weights are read from them).
pub(crate) fn schedule(
    g: &Graph,
    order: &[NodeId],
    uses: &[u32],
    consts: &[(ValueId, Arc<Value>)],
) -> Vec<Step> {
    // The one reader of each value read once (by an input slot).
    let mut reader: HashMap<ValueId, NodeId> = HashMap::new();
    for &n in order {
        for v in g.node(n).inputs().iter().flatten() {
            if uses[v.index()] == 1 {
                reader.insert(*v, n);
            }
        }
    }
    // Graph inputs with a default may be overridden at run time: their defaults are not constants.
    let consts: HashMap<ValueId, &Arc<Value>> = consts
        .iter()
        .filter(|(v, _)| !g.inputs().contains(v))
        .map(|(v, x)| (*v, x))
        .collect();
    let single = |v: ValueId| {
        (uses[v.index()] == 1)
            .then(|| reader.get(&v).copied())
            .flatten()
    };
    let mut taken: std::collections::HashSet<NodeId> = Default::default();
    let mut at: HashMap<NodeId, Fused> = HashMap::new();
    for &n in order {
        if taken.contains(&n) {
            continue;
        }
        if let Some(f) = conv_nhwc_at(g, n, &single, &consts) {
            taken.extend(f.nodes.iter().copied());
            // Placed where the Conv was: its inputs are ready there and the consumers of the output follow.
            at.insert(f.nodes[1], f);
        }
    }
    for &n in order {
        if taken.contains(&n) {
            continue;
        }
        if let Some(f) = chain_at(g, n, &single, &taken) {
            taken.extend(f.nodes.iter().copied());
            // Placed at the last node: every other operand is ready there.
            at.insert(*f.nodes.last().unwrap(), f);
        }
    }
    order
        .iter()
        .filter_map(|n| match at.remove(n) {
            Some(f) => Some(Step::Fused(Box::new(f))),
            None => (!taken.contains(n)).then_some(Step::Node(*n)),
        })
        .collect()
}

fn is(node: &Node, op: &str) -> bool {
    node.op_type == op && (node.domain.is_empty() || node.domain == "ai.onnx")
}

fn perm_is(node: &Node, p: &[i64]) -> bool {
    matches!(node.attr("perm").map(|a| &a.value), Some(AttrValue::Ints(v)) if v == p)
}

fn only_output(node: &Node) -> Option<ValueId> {
    match node.outputs() {
        [Some(o)] => Some(*o),
        _ => None,
    }
}

fn conv_nhwc_at(
    g: &Graph,
    n: NodeId,
    single: &impl Fn(ValueId) -> Option<NodeId>,
    consts: &HashMap<ValueId, &Arc<Value>>,
) -> Option<Fused> {
    let pre = g.node(n);
    if !is(pre, "Transpose") || !perm_is(pre, &[0, 3, 1, 2]) {
        return None;
    }
    let x = (*pre.inputs().first()?)?;
    let t = only_output(pre)?;
    let c = single(t)?;
    let conv = g.node(c);
    if !is(conv, "Conv") || conv.inputs().first() != Some(&Some(t)) || conv.inputs().len() > 3 {
        return None;
    }
    if matches!(conv.attr("group").map(|a| &a.value), Some(AttrValue::Int(k)) if *k != 1) {
        return None;
    }
    let wv = conv.inputs().get(1).copied().flatten()?;
    let Value::Tensor(wt) = consts.get(&wv)?.as_ref() else {
        return None;
    };
    let &[m, ci, kh, kw] = wt.shape.as_slice() else {
        return None;
    };
    let wtype = elem(&wt.data)?;
    let w: Cow<[f32]> = match &wt.data {
        Data::F32(w) => Cow::Borrowed(w),
        _ => Cow::Owned(wt.to_f32s().ok()?),
    };
    let bias = conv.inputs().get(2).copied().flatten();
    if bias == Some(t) || wv == t {
        return None;
    }
    let y = only_output(conv)?;
    let p = single(y)?;
    let post = g.node(p);
    if !is(post, "Transpose") || !perm_is(post, &[0, 2, 3, 1]) {
        return None;
    }
    let z = only_output(post)?;
    let mut r = vec![0f32; w.len()];
    for o in 0..m {
        for c in 0..ci {
            for i in 0..kh {
                for j in 0..kw {
                    r[((o * kh + i) * kw + j) * ci + c] = w[((o * ci + c) * kh + i) * kw + j];
                }
            }
        }
    }
    let mut inputs = vec![x, wv];
    inputs.extend(bias);
    Some(Fused {
        nodes: vec![n, c, p],
        inputs,
        output: z,
        kind: Kind::ConvNhwc {
            conv: c,
            w: Arc::new(r),
            wtype,
            wshape: [m, ci, kh, kw],
        },
    })
}

fn chain_op(node: &Node) -> Option<Op> {
    if !(node.domain.is_empty() || node.domain == "ai.onnx") || only_output(node).is_none() {
        return None;
    }
    let ins = node.inputs();
    let binary = ins.len() == 2 && ins.iter().all(|v| v.is_some());
    let unary = ins.len() == 1 && ins[0].is_some();
    let int_attr = |name: &str| match node.attr(name).map(|a| &a.value) {
        Some(AttrValue::Int(i)) => Some(*i),
        _ => None,
    };
    Some(match node.op_type.as_str() {
        "Add" if binary => Op::Add,
        "Sub" if binary => Op::Sub,
        "Mul" if binary => Op::Mul,
        "Div" if binary => Op::Div,
        "Relu" if unary => Op::Relu,
        "Identity" if unary => Op::Copy,
        "Cast" if unary && int_attr("to") == Some(DType::F32 as i64) => Op::Widen,
        // Bounds as inputs (opset 11 on); the attribute form of older opsets is left to the kernel.
        "Clip"
            if (1..=3).contains(&ins.len())
                && ins[0].is_some()
                && node.attr("min").is_none()
                && node.attr("max").is_none() =>
        {
            Op::Clip {
                lo: ins.get(1).is_some_and(|v| v.is_some()),
                hi: ins.get(2).is_some_and(|v| v.is_some()),
            }
        }
        "BatchNormalization"
            if ins.len() == 5
                && ins.iter().all(|v| v.is_some())
                && int_attr("training_mode").unwrap_or(0) == 0 =>
        {
            let eps = match node.attr("epsilon").map(|a| &a.value) {
                Some(AttrValue::Float(f)) => *f,
                Some(AttrValue::Int(i)) => *i as f32,
                _ => 1e-5,
            };
            Op::BatchNorm { eps }
        }
        _ => return None,
    })
}

fn chain_at(
    g: &Graph,
    n: NodeId,
    single: &impl Fn(ValueId) -> Option<NodeId>,
    taken: &std::collections::HashSet<NodeId>,
) -> Option<Fused> {
    let head = g.node(n);
    let op = chain_op(head)?;
    let mut nodes = vec![n];
    let mut ops = vec![ChainOp { op, left: true }];
    let mut inputs: Vec<ValueId> = head.inputs().iter().flatten().copied().collect();
    let mut cur = only_output(head)?;
    while let Some(next) = single(cur) {
        let node = g.node(next);
        if taken.contains(&next) {
            break;
        }
        let Some(op) = chain_op(node) else { break };
        let ins: Vec<ValueId> = node.inputs().iter().flatten().copied().collect();
        // The running value is read once: by the first input, or by either side of a binary op.
        let left = ins[0] == cur;
        if !left && !op.binary() {
            break;
        }
        let others: Vec<ValueId> = ins.iter().copied().filter(|&v| v != cur).collect();
        if others.len() != op.operands() {
            break;
        }
        inputs.extend(others);
        nodes.push(next);
        ops.push(ChainOp { op, left });
        cur = only_output(node)?;
    }
    (nodes.len() >= 2).then_some(Fused {
        nodes,
        inputs,
        output: cur,
        kind: Kind::Chain(ops),
    })
}

/// The name a fused step has in profiles.
pub(crate) fn label(f: &Fused) -> String {
    match f.kind {
        Kind::ConvNhwc { .. } => "Conv (channels-last, transposes fused)".into(),
        Kind::Chain(_) => "elementwise chain (fused)".into(),
    }
}

/// Runs a fused step's fast kernel on its inputs (in [`Fused::inputs`] order). `None`: the inputs do not fit
/// it; run the nodes one by one.
pub(crate) fn run(
    g: &Graph,
    f: &Fused,
    ins: &mut [Option<Arc<Value>>],
) -> Option<Result<Value, String>> {
    match &f.kind {
        Kind::ConvNhwc {
            conv,
            w,
            wtype,
            wshape,
        } => conv_step(g.node(*conv), ins, w, *wtype, *wshape),
        Kind::Chain(ops) => chain_step(ops, ins),
    }
}

fn conv_step(
    conv: &Node,
    ins: &[Option<Arc<Value>>],
    w: &[f32],
    wtype: Elem,
    [m, c, kh, kw]: [usize; 4],
) -> Option<Result<Value, String>> {
    // The input and bias as the unfused Conv reads them: of the weight's type, widened when half.
    let (xe, xs) = float_tensor(&ins[0])?;
    if xe != wtype {
        return None;
    }
    let x = operand(&ins[0], xe, false)?;
    let bias = match ins.get(2) {
        Some(b) => {
            if float_tensor(b)?.1 != [m] {
                return None;
            }
            Some(operand(b, xe, false)?)
        }
        None => None,
    };
    let &[n, h, wd, xc] = xs else { return None };
    if xc != c {
        return None;
    }
    let kernel = match conv.attr("kernel_shape").map(|a| &a.value) {
        Some(AttrValue::Ints(k)) if k.len() == 2 => vec![k[0] as usize, k[1] as usize],
        Some(_) => return None,
        None => vec![kh, kw],
    };
    if kernel != [kh, kw] {
        return None;
    }
    let win: Window = match crate::geometry::window(conv, &[h, wd], kernel, false) {
        Ok(w) => w,
        Err(e) => return Some(Err(e)),
    };
    let out = conv_nhwc(&x, [n, h, wd, c], w, m, &win, bias.as_deref());
    let shape = vec![n, win.out[0], win.out[1], m];
    let data = match xe {
        Elem::F32 => Data::F32(out),
        half => crate::tensor::round_to(&out, half.dtype()),
    };
    Some(Ok(Value::Tensor(Tensor::new(shape, data))))
}

/// How an operand of shape `o` broadcasts to `s`: element `i` of the result reads operand element
/// `(i / inner) % period`. `None` when the operand's non-1 dims are not one run of `s`'s dims.
fn pattern(o: &[usize], s: &[usize]) -> Option<(usize, usize)> {
    if o.len() > s.len() {
        return None;
    }
    let off = s.len() - o.len();
    let non1: Vec<usize> = (0..o.len()).filter(|&i| o[i] != 1).collect();
    let (Some(&a), Some(&b)) = (non1.first(), non1.last()) else {
        return Some((1, 1));
    };
    if (a..=b).any(|i| o[i] != s[off + i]) {
        return None;
    }
    let inner: usize = s[off + b + 1..].iter().product();
    let period: usize = o[a..=b].iter().product();
    Some((inner, period))
}

/// The element type of a chain's running value. A half value is widened (exactly) block by block, each op
/// computes in f32 and its result is rounded back to the half type, as the unfused nodes do (`ops::run`:
/// load half, compute in float, store half), so the results are bit-identical without a tensor-sized f32
/// copy per node. A `Cast(to=FLOAT)` in the chain makes the rest of it f32.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Elem {
    F32,
    F16,
    BF16,
}

impl Elem {
    fn dtype(self) -> DType {
        match self {
            Elem::F32 => DType::F32,
            Elem::F16 => DType::F16,
            Elem::BF16 => DType::BF16,
        }
    }

    /// Whether `op`'s f32 result needs rounding to this type: ops that only select or clamp values of it
    /// (`Relu`, `Clip` with bounds of it, `Identity`) give values it already holds.
    fn rounds_after(self, op: Op) -> bool {
        self != Elem::F32
            && matches!(
                op,
                Op::Add | Op::Sub | Op::Mul | Op::Div | Op::BatchNorm { .. }
            )
    }
}

/// The chain element type of float data (`None` for other types).
fn elem(d: &Data) -> Option<Elem> {
    Some(match d {
        Data::F32(_) => Elem::F32,
        Data::F16(_) => Elem::F16,
        Data::BF16(_) => Elem::BF16,
        _ => return None,
    })
}

fn float_tensor(v: &Option<Arc<Value>>) -> Option<(Elem, &[usize])> {
    let Some(Value::Tensor(t)) = v.as_deref() else {
        return None;
    };
    Some((elem(&t.data)?, t.shape.as_slice()))
}

/// An operand as its node's kernel reads it when the running value has type `running`: f32 as it is, a
/// tensor of the running half type widened. `f32_too`: an f32 operand is also read beside a half running
/// value (BatchNormalization's statistics may keep their own type; the kernel widens only the input's).
/// `None` for any other pairing: the nodes then run one by one and report it.
fn operand(v: &Option<Arc<Value>>, running: Elem, f32_too: bool) -> Option<Cow<'_, [f32]>> {
    let Some(Value::Tensor(t)) = v.as_deref() else {
        return None;
    };
    match (&t.data, running) {
        (Data::F32(d), Elem::F32) => Some(Cow::Borrowed(d)),
        (Data::F32(d), _) if f32_too => Some(Cow::Borrowed(d)),
        (Data::F16(_), Elem::F16) | (Data::BF16(_), Elem::BF16) => t.to_f32s().ok().map(Cow::Owned),
        _ => None,
    }
}

/// Elements per block: a block and an operand slice stay in L1.
const BLOCK: usize = 2048;

/// The other operands of a chain op, checked against the running shape, before any buffer is taken.
enum Prep {
    None,
    /// Input slot, inner, period, and the operand widened when the running value is half.
    Bin(usize, usize, usize, Option<Vec<f32>>),
    Clip(f32, f32),
    /// Per-channel `x * a + b`: a, b, inner, period.
    Affine(Vec<f32>, Vec<f32>, usize, usize),
}

/// What one op applies, borrowed for the run.
#[derive(Clone, Copy)]
enum Operand<'a> {
    None,
    Bin(&'a [f32], usize, usize),
    Clip(f32, f32),
    Affine(&'a [f32], &'a [f32], usize, usize),
}

/// A Clip bound as the kernel reads it: absent or empty means none; otherwise one value.
fn bound(v: &Option<Arc<Value>>, running: Elem) -> Option<Option<f32>> {
    match operand(v, running, false)?.as_ref() {
        [] => Some(None),
        [x] => Some(Some(*x)),
        _ => None,
    }
}

fn chain_step(ops: &[ChainOp], ins: &mut [Option<Arc<Value>>]) -> Option<Result<Value, String>> {
    // The head: for a binary op the running value is the operand whose shape is the result's.
    let head = &ops[0];
    let s0 = float_tensor(&ins[0])?.1.to_vec();
    let (main, head_left) = if !head.op.binary() {
        (0, true)
    } else {
        let s1 = float_tensor(&ins[1])?.1;
        if pattern(s1, &s0).is_some() {
            (0, true)
        } else if pattern(&s0, s1).is_some() {
            (1, false)
        } else {
            return None;
        }
    };
    let (first_elem, shape) = float_tensor(&ins[main]).map(|(e, s)| (e, s.to_vec()))?;
    // The running type each op sees; a Cast(to=FLOAT) makes the rest f32.
    let mut elems = Vec::with_capacity(ops.len());
    let mut running = first_elem;
    for op in ops {
        elems.push(running);
        if op.op == Op::Widen {
            running = Elem::F32;
        }
    }
    let last_elem = running;
    let mut preps = Vec::with_capacity(ops.len());
    let mut next = if head.op.binary() { 2 } else { 1 };
    for (k, op) in ops.iter().enumerate() {
        let e = elems[k];
        let first = if k == 0 && op.op.binary() {
            1 - main
        } else {
            next += op.op.operands();
            next - op.op.operands()
        };
        preps.push(match op.op {
            Op::Relu | Op::Copy | Op::Widen => Prep::None,
            Op::Add | Op::Sub | Op::Mul | Op::Div => {
                let (inner, period) = pattern(float_tensor(&ins[first])?.1, &shape)?;
                let widened = match operand(&ins[first], e, false)? {
                    Cow::Borrowed(_) => None,
                    Cow::Owned(v) => Some(v),
                };
                Prep::Bin(first, inner, period, widened)
            }
            Op::Clip { lo, hi } => {
                let mut slot = first;
                let mut take = |present: bool| -> Option<Option<f32>> {
                    if !present {
                        return Some(None);
                    }
                    slot += 1;
                    bound(&ins[slot - 1], e)
                };
                let l = take(lo)?.unwrap_or(f32::NEG_INFINITY);
                let h = take(hi)?.unwrap_or(f32::INFINITY);
                Prep::Clip(l, h)
            }
            Op::BatchNorm { eps } => {
                // Folded exactly as the BatchNormalization kernel folds it.
                if shape.len() < 2 {
                    return None;
                }
                let c = shape[1];
                let p: Vec<Cow<[f32]>> = (0..4)
                    .map(|i| operand(&ins[first + i], e, true))
                    .collect::<Option<_>>()?;
                if p.iter().any(|v| v.len() != c) {
                    return None;
                }
                let (a, b) = crate::ops::nn::fold_batch_norm(&p[0], &p[1], &p[2], &p[3], eps);
                Prep::Affine(a, b, shape[2..].iter().product(), c)
            }
        });
    }
    // The running value: an f32 buffer is computed in place (reused when nothing else holds it); a half one
    // is read block by block into the output.
    let owned = ins[main].take()?;
    let (mut out, half_src): (Vec<f32>, Option<Arc<Value>>) = if first_elem != Elem::F32 {
        (Vec::new(), Some(owned))
    } else {
        match Arc::try_unwrap(owned) {
            Ok(Value::Tensor(Tensor {
                data: Data::F32(v), ..
            })) => (v, None),
            Ok(_) => unreachable!("the running value was checked to be an f32 tensor"),
            Err(shared) => {
                let v = match shared.as_ref() {
                    Value::Tensor(Tensor {
                        data: Data::F32(d), ..
                    }) => d.clone(),
                    _ => unreachable!("the running value was checked to be an f32 tensor"),
                };
                ins[main] = Some(shared);
                (v, None)
            }
        }
    };
    let ins: &[Option<Arc<Value>>] = ins;
    let operands: Vec<Operand> = preps
        .iter()
        .map(|p| match p {
            Prep::None => Operand::None,
            Prep::Bin(_, inner, period, Some(w)) => Operand::Bin(w, *inner, *period),
            Prep::Bin(slot, inner, period, None) => {
                let d = match ins[*slot].as_deref() {
                    Some(Value::Tensor(Tensor {
                        data: Data::F32(d), ..
                    })) => d.as_slice(),
                    _ => &[],
                };
                Operand::Bin(d, *inner, *period)
            }
            Prep::Clip(l, h) => Operand::Clip(*l, *h),
            Prep::Affine(a, b, inner, period) => Operand::Affine(a, b, *inner, *period),
        })
        .collect();
    let lefts: Vec<bool> = ops
        .iter()
        .enumerate()
        .map(|(k, o)| if k == 0 { head_left } else { o.left })
        .collect();
    let run_ops = |start: usize, blk: &mut [f32]| {
        for (k, op) in ops.iter().enumerate() {
            apply(op.op, lefts[k], operands[k], start, blk);
            if elems[k].rounds_after(op.op) {
                round_trip(elems[k], blk);
            }
        }
    };
    let Some(src) = half_src else {
        out.par_chunks_mut(BLOCK)
            .enumerate()
            .for_each(|(b, blk)| run_ops(b * BLOCK, blk));
        return Some(Ok(Value::Tensor(Tensor::f32(shape, out))));
    };
    let Value::Tensor(Tensor { data: src, .. }) = src.as_ref() else {
        unreachable!("the running value was checked to be a tensor")
    };
    let n = crate::numel(&shape);
    // Each block: widen, run the ops, store in the chain's last type.
    let block = |start: usize, len: usize| -> [f32; BLOCK] {
        let mut buf = [0f32; BLOCK];
        let b = &mut buf[..len];
        match src {
            Data::F16(v) => mpopt_ir::halfconv::f16_to_f32(&v[start..start + len], b),
            Data::BF16(v) => b
                .iter_mut()
                .zip(&v[start..start + len])
                .for_each(|(d, x)| *d = x.to_f32()),
            _ => unreachable!("the running value was checked to be half"),
        }
        run_ops(start, b);
        buf
    };
    // SAFETY (each arm): every chunk's elements are written, from the block of the same start and length.
    let data = unsafe {
        match last_elem {
            Elem::F32 => Data::F32(par_fill(n, BLOCK, |start, o| {
                let buf = block(start, o.len());
                for (d, x) in o.iter_mut().zip(&buf) {
                    d.write(*x);
                }
            })),
            Elem::F16 => Data::F16(par_fill(n, BLOCK, |start, o| {
                let buf = block(start, o.len());
                mpopt_ir::halfconv::f32_to_f16_uninit(&buf[..o.len()], o);
            })),
            // (`half`'s bf16 slice conversion, which `round_bf16` uses, is this per-element loop)
            Elem::BF16 => Data::BF16(par_fill(n, BLOCK, |start, o| {
                let buf = block(start, o.len());
                for (d, &x) in o.iter_mut().zip(&buf) {
                    d.write(bf16::from_f32(x));
                }
            })),
        }
    };
    Some(Ok(Value::Tensor(Tensor::new(shape, data))))
}

/// Rounds a block of f32 results to the half type `e` and widens them back: the value the next node of
/// the unfused chain would read.
fn round_trip(e: Elem, blk: &mut [f32]) {
    match e {
        Elem::F16 => {
            let mut h = [f16::ZERO; BLOCK];
            let h = &mut h[..blk.len()];
            mpopt_ir::halfconv::f32_to_f16(blk, h);
            mpopt_ir::halfconv::f16_to_f32(h, blk);
        }
        // as `round_bf16` and the widening do it, element by element
        Elem::BF16 => blk
            .iter_mut()
            .for_each(|x| *x = bf16::from_f32(*x).to_f32()),
        Elem::F32 => {}
    }
}

/// Applies one op to the block of running values that starts at element `start`.
fn apply(op: Op, left: bool, operand: Operand, start: usize, blk: &mut [f32]) {
    let bin = match operand {
        Operand::None => {
            if op == Op::Relu {
                blk.iter_mut()
                    .for_each(|x| *x = if *x > 0.0 { *x } else { 0.0 });
            }
            return;
        }
        Operand::Clip(lo, hi) => {
            // As the Clip kernel: two selects, so NaN passes through and the loop vectorizes.
            blk.iter_mut().for_each(|x| {
                let c = if *x < lo { lo } else { *x };
                *x = if c > hi { hi } else { c };
            });
            return;
        }
        Operand::Affine(a, b, inner, period) => {
            let mut i = 0;
            while i < blk.len() {
                let g = start + i;
                let run = (inner - g % inner).min(blk.len() - i);
                let c = (g / inner) % period;
                let (a, b) = (a[c], b[c]);
                blk[i..i + run].iter_mut().for_each(|x| *x = *x * a + b);
                i += run;
            }
            return;
        }
        Operand::Bin(d, inner, period) => (d, inner, period),
    };
    match (op, left) {
        (Op::Add, true) => binary(|a, b| a + b, bin, start, blk),
        (Op::Add, false) => binary(|a, b| b + a, bin, start, blk),
        (Op::Sub, true) => binary(|a, b| a - b, bin, start, blk),
        (Op::Sub, false) => binary(|a, b| b - a, bin, start, blk),
        (Op::Mul, true) => binary(|a, b| a * b, bin, start, blk),
        (Op::Mul, false) => binary(|a, b| b * a, bin, start, blk),
        (Op::Div, true) => binary(|a, b| a / b, bin, start, blk),
        (Op::Div, false) => binary(|a, b| b / a, bin, start, blk),
        _ => unreachable!("only binary ops have a tensor operand"),
    }
}

/// `x = f(x, operand)` over a block, for each broadcast pattern (monomorphized per op).
#[inline(always)]
fn binary(
    f: impl Fn(f32, f32) -> f32,
    (d, inner, period): (&[f32], usize, usize),
    start: usize,
    blk: &mut [f32],
) {
    let len = blk.len();
    if period == 1 {
        let c = d[0];
        blk.iter_mut().for_each(|x| *x = f(*x, c));
    } else if inner == 1 {
        // Operand element i % period: walk it in runs up to the end of each period.
        let mut i = 0;
        let mut j = start % period;
        while i < len {
            let run = (period - j).min(len - i);
            for (x, &c) in blk[i..i + run].iter_mut().zip(&d[j..j + run]) {
                *x = f(*x, c);
            }
            i += run;
            j = 0;
        }
    } else {
        // Runs of `inner` elements share one operand element.
        let mut i = 0;
        while i < len {
            let g = start + i;
            let run = (inner - g % inner).min(len - i);
            let c = d[(g / inner) % period];
            blk[i..i + run].iter_mut().for_each(|x| *x = f(*x, c));
            i += run;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::pattern;

    #[test]
    fn patterns_cover_scalars_channels_and_same_shapes() {
        assert_eq!(pattern(&[], &[2, 3, 4]), Some((1, 1)));
        assert_eq!(pattern(&[1, 1], &[2, 3, 4]), Some((1, 1)));
        assert_eq!(pattern(&[4], &[2, 3, 4]), Some((1, 4)));
        assert_eq!(pattern(&[3, 1], &[2, 3, 4]), Some((4, 3)));
        assert_eq!(pattern(&[2, 3, 4], &[2, 3, 4]), Some((1, 24)));
        assert_eq!(pattern(&[2, 1, 4], &[2, 3, 4]), None);
        assert_eq!(pattern(&[5], &[2, 3, 4]), None);
        assert_eq!(pattern(&[1, 2, 3, 4], &[2, 3, 4]), None);
    }
}
