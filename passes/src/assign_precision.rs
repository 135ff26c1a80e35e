//! `assign-precision`: decides, for every node with float32 data, whether it runs in the target low precision
//! (fp16 or bf16) or stays fp32, and records the rule and evidence on the node.
//!
//! **Why.** Lowering everything breaks models (overflow in exp/pow/reductions, shape arithmetic past 2048,
//! constants beyond the fp16 range); lowering too little leaves casts around every op. The TensorFlow
//! auto-mixed-precision colouring gets the balance on real graphs; this pass applies it to ONNX with the
//! schema and data checks ONNX needs.
//!
//! **Algorithm**, per graph (subgraphs are decided on their own; control-flow nodes keep their interface):
//! 1. Classify each node by the policy table (`policy.rs`), with user class overrides; a ScatterElements or
//!    ScatterND with a `reduction` is deny (it accumulates, and onnxruntime has no f16 kernel for it).
//! 2. Gates that keep a node fp32 whatever its class:
//!    - its schema allows no target-precision type for its data at the model's opset;
//!    - it reads or writes a sequence or optional (no Cast converts a container, and onnx ties its element
//!      type to the node's tensors);
//!    - a float initializer or Constant feeding its data holds values beyond the target's finite range, or
//!      small non-zero values that would flush to zero where that matters: any in a constant of at most 16
//!      elements (epsilons, masks, scales); in a larger one, more than 1% of its values, except for the
//!      operands of Add/Sub/Sum (a flushed addend moves a sum by less than the smallest subnormal) and for
//!      clear ops (they only move values; the cast to their low consumers flushes them anyway); an
//!      additive attention mask (all very negative, reaching only Softmax through additions: `additive_masks`)
//!      is not gated, and its path's values are left out of the range gate; a body reads the enclosing
//!      graphs' constants through its captures, and they gate it the same way;
//!    - range facts (`analyze-ranges`, `calibrate`): a value it reads or writes is proven beyond the
//!      target's range, or observed beyond it after the safety margin with no proof that it stays within
//!      (this spreads like deny); or more than
//!      `max_underflow` of its observed significant outputs underflow (this does not spread);
//!    - a user `--keep-fp32` selector matches it.
//! 3. A guarded deny op (`RANGE_GUARDED`: exp/log/pow, softmax, summing reductions, cumsum, recurrent layers)
//!    whose inputs and outputs are all proven (or observed, with the margin) within the target's range, and
//!    whose exponential input is small enough to round, is treated as infer, with that evidence. Softmax is
//!    treated as infer anyway: it is then low only between low nodes, where its logits are already rounded.
//! 4. Colouring over float edges:
//!    - allow nodes are low;
//!    - deny spreads forward through infer/clear nodes, from the nodes whose outputs can be dangerous in low
//!      precision: deny-class ops, nodes reading constants beyond the target's range, and user `--keep-fp32`.
//!      A node kept fp32 only because its schema lacks the type or tiny values would flush does not spread;
//!    - infer/clear nodes on a path between low nodes become low;
//!    - low floods through clear nodes in both directions;
//!    - an infer/clear node whose float producers and consumers are all low (at least one of each) becomes
//!      low, and the flood goes on, to a fixed point;
//!    - once, regions of undecided infer/clear nodes fed only by constants and low nodes become low when
//!      that removes casts (read only by low nodes: embedding tables) or moves them to as many or fewer,
//!      smaller tensors (a pooled activation): `low_fed_regions`; and the flood goes on.
//! 5. `--force-low` selectors make a node low unless its schema forbids it.
//!
//! **Invariants.**
//! - It only annotates nodes (`Node::precision`); inserting the casts is `insert-casts`' job.
//! - It is deterministic, runs in O(N) over nodes and edges, and decides again from scratch when re-run.
//!
//! ```text
//! %h = MatMul(%x, %w) : f32[N,4]        ; prec f16 (allow: matrix product ...)
//! %y = Softmax(%h) {axis = -1} : f32[N,4] ; prec f32 (infer: not between low nodes)
//! ```

use std::collections::VecDeque;

use rustc_hash::{FxHashMap as HashMap, FxHashSet};

use mpopt_ir::schema::{OpSchema, registry};
use mpopt_ir::{DType, Graph, Model, NodeId, Opsets, PrecisionDecision, Tensor, ValueId};
use regex::Regex;

use crate::policy::{OpClass, class_of};
use crate::range_rules::constant_of;
use crate::saturation::Saturated;
use crate::{Pass, PassError, PassOutcome};

/// Selects nodes for `--keep-fp32` and `--force-low`.
#[derive(Clone, Debug)]
pub enum Selector {
    /// An op type in the default domain (or `domain::Op`).
    Op {
        /// Domain (`""` for ai.onnx).
        domain: String,
        /// Op type.
        op: String,
    },
    /// Every node of a domain.
    Domain(String),
    /// Node names matching a regular expression.
    NodeName(Regex),
}

impl Selector {
    /// Parses `Op`, `domain::Op`, `node:REGEX` or `domain:NAME`. Unknown op types are an error that lists the
    /// valid ones.
    pub fn parse(s: &str) -> Result<Selector, String> {
        if let Some(re) = s.strip_prefix("node:") {
            return Regex::new(re)
                .map(Selector::NodeName)
                .map_err(|e| format!("selector '{s}': bad regular expression: {e}"));
        }
        if let Some(d) = s.strip_prefix("domain:") {
            return Ok(Selector::Domain(if d == "ai.onnx" {
                String::new()
            } else {
                d.to_string()
            }));
        }
        let (domain, op) = match s.split_once("::") {
            Some((d, o)) => (
                if d == "ai.onnx" {
                    String::new()
                } else {
                    d.to_string()
                },
                o.to_string(),
            ),
            None => (String::new(), s.to_string()),
        };
        let reg = registry();
        if !reg.knows(&domain, &op) {
            let mut valid: Vec<&str> = reg
                .ops()
                .filter(|(d, _)| *d == domain)
                .map(|(_, n)| n)
                .collect();
            valid.sort_unstable();
            let close: Vec<&str> = valid
                .iter()
                .copied()
                .filter(|v| v.eq_ignore_ascii_case(&op))
                .collect();
            let hint = if close.is_empty() {
                String::new()
            } else {
                format!(" (did you mean {}?)", close.join(", "))
            };
            return Err(format!(
                "selector '{s}': unknown op type{hint}; use an op type, domain::Op, node:REGEX or domain:NAME. \
                 Op types of domain '{}': {}",
                if domain.is_empty() {
                    "ai.onnx"
                } else {
                    &domain
                },
                valid.join(", ")
            ));
        }
        Ok(Selector::Op { domain, op })
    }

    fn matches(&self, n: &mpopt_ir::Node) -> bool {
        let dom = if n.domain == "ai.onnx" {
            ""
        } else {
            n.domain.as_str()
        };
        match self {
            Selector::Op { domain, op } => dom == domain && n.op_type == *op,
            Selector::Domain(d) => dom == d,
            Selector::NodeName(re) => re.is_match(&n.name),
        }
    }

    fn text(&self) -> String {
        match self {
            Selector::Op { domain, op } if domain.is_empty() => op.clone(),
            Selector::Op { domain, op } => format!("{domain}::{op}"),
            Selector::Domain(d) if d.is_empty() => "domain:ai.onnx".into(),
            Selector::Domain(d) => format!("domain:{d}"),
            Selector::NodeName(re) => format!("node:{}", re.as_str()),
        }
    }
}

/// What the user asked for.
#[derive(Clone, Debug)]
pub struct PrecisionOptions {
    /// The low precision: `F16` or `BF16`.
    pub target: DType,
    /// Nodes kept in fp32.
    pub keep_fp32: Vec<Selector>,
    /// Nodes lowered whatever their class.
    pub force_low: Vec<Selector>,
    /// Class overrides: (domain, op, class).
    pub classes: Vec<(String, String, OpClass)>,
    /// Observed magnitudes are multiplied by this before they are compared with the target's range (inputs
    /// unlike the calibration set can scale activations). Proven bounds need no margin.
    pub range_margin: f64,
    /// A node stays fp32 when more than this share of its observed non-zero output values would become zero
    /// or subnormal in the target type.
    pub max_underflow: f64,
    /// `--to auto`: with an f16 target, nodes kept fp32 only because their values leave fp16's range (range
    /// and initializer overflow, and the nodes that overflow spreads to) run in bf16 instead, when their
    /// schema allows it.
    pub auto_bf16: bool,
    /// Set by `search-precision` while it tries decisions; `None` otherwise.
    pub search: Option<std::sync::Arc<SearchOverrides>>,
}

/// A node anywhere in a model: the scope of its graph as the executor names it
/// ([`mpopt_exec::subgraph_scope`]; `""` for the main graph) and its id in that graph.
pub type ScopedNode = (String, NodeId);

/// How `search-precision` (and `measure-gates`) change the decisions, in every graph of the model.
#[derive(Clone, Debug, Default)]
pub struct SearchOverrides {
    /// Drop the precision heuristics that a measurement replaces: the flush gate for initializers (overflow
    /// still gates), the underflow gate (overflow still gates), and, for guarded deny ops, the input-rounding
    /// checks of exponentials and `Pow` (their values must still be shown in range); and a recurrent layer
    /// whose deny is lifted by range becomes allow instead of infer (fixture `search-precision/lstm_lifted`).
    pub relax: bool,
    /// With `relax`: the graphs it applies in, by scope (those the reference run reached, where the
    /// whole-model checks run too); the others keep every heuristic. `None`: every graph.
    pub reached: Option<std::collections::HashSet<String>>,
    /// Nodes kept fp32, with the evidence (they do not spread). A control-flow node kept fp32 keeps its
    /// bodies fp32, whole.
    pub keep: std::collections::HashMap<ScopedNode, String>,
    /// Nodes exempt from the flush and underflow gates, with the measurement that showed them harmless
    /// (`measure-gates`).
    pub lift: std::collections::HashMap<ScopedNode, String>,
}

/// The default [`PrecisionOptions::range_margin`]: three binades above the largest observed value.
pub const DEFAULT_RANGE_MARGIN: f64 = 8.0;
/// The default [`PrecisionOptions::max_underflow`].
pub const DEFAULT_MAX_UNDERFLOW: f64 = 0.5;

impl Default for PrecisionOptions {
    fn default() -> Self {
        PrecisionOptions {
            target: DType::F16,
            keep_fp32: Vec::new(),
            force_low: Vec::new(),
            classes: Vec::new(),
            range_margin: DEFAULT_RANGE_MARGIN,
            max_underflow: DEFAULT_MAX_UNDERFLOW,
            auto_bf16: false,
            search: None,
        }
    }
}

/// The largest finite magnitude of a low-precision type.
pub fn max_finite(d: DType) -> f64 {
    match d {
        DType::F16 => 65504.0,
        DType::BF16 => 3.3895313892515355e38,
        _ => f64::MAX,
    }
}

/// The smallest positive magnitude a low-precision type can hold (its smallest subnormal).
pub fn min_positive(d: DType) -> f64 {
    match d {
        DType::F16 => 5.960464477539063e-8,
        DType::BF16 => 9.183549615799121e-41,
        _ => 0.0,
    }
}

/// The smallest positive normal magnitude of a low-precision type (below it values are subnormal).
pub fn min_normal(d: DType) -> f64 {
    match d {
        DType::F16 => 6.103515625e-5,
        DType::BF16 => 1.1754943508222875e-38,
        _ => f64::MIN_POSITIVE,
    }
}

/// Statistics of a float tensor against a low-precision type's range.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RangeCheck {
    /// Elements.
    pub count: usize,
    /// Largest magnitude.
    pub max_abs: f64,
    /// Elements beyond the finite range.
    pub overflow: usize,
    /// Non-zero elements that flush to zero.
    pub flush: usize,
}

/// Checks a float tensor's values against `target`'s range (None for tensors without readable data).
pub fn range_check(t: &Tensor, target: DType) -> Option<RangeCheck> {
    let (max, tiny) = (max_finite(target), min_positive(target) / 2.0);
    let n = t.numel()?;
    let mut r = RangeCheck {
        count: n,
        ..RangeCheck::default()
    };
    let visit = |v: f64| {
        let a = v.abs();
        if a.is_finite() {
            r.max_abs = r.max_abs.max(a);
            if a > max {
                r.overflow += 1;
            }
        }
        if a != 0.0 && a < tiny {
            r.flush += 1;
        }
    };
    match crate::range_rules::F32Data::of(t) {
        // f32 data, the common case, is read in place
        Some(d) if d.len() == n => {
            // compare in f32 and only widen the rare values the report needs
            let (max32, tiny32) = (max as f32, tiny as f32);
            let init = ([0f32; 8], [0u32; 8], [0u32; 8]);
            let (max_abs, over, flush) = d.lanes(init, |(max_abs, over, flush), j, x| {
                let a = x.abs();
                let finite = a < f32::INFINITY;
                max_abs[j] = if finite & (a > max_abs[j]) {
                    a
                } else {
                    max_abs[j]
                };
                over[j] += (finite & (a > max32)) as u32;
                flush[j] += ((a != 0.0) & (a < tiny32)) as u32;
            });
            r.max_abs = max_abs.iter().fold(0f32, |a, &b| a.max(b)) as f64;
            r.overflow = over.iter().map(|&x| x as usize).sum();
            r.flush = flush.iter().map(|&x| x as usize).sum();
            return Some(r);
        }
        _ => t.values_f64(n)?.into_iter().for_each(visit),
    }
    Some(r)
}

/// The pass.
pub struct AssignPrecision {
    opts: PrecisionOptions,
}

impl AssignPrecision {
    /// A pass with these options.
    pub fn new(opts: PrecisionOptions) -> AssignPrecision {
        AssignPrecision { opts }
    }
}

impl Default for AssignPrecision {
    fn default() -> Self {
        AssignPrecision::new(PrecisionOptions::default())
    }
}

/// Per-node state during colouring.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Color {
    /// Not float data: no decision.
    None,
    /// Not yet decided.
    Open,
    Low,
    Fp32,
}

/// Is this value float32 data?
fn is_f32(g: &Graph, v: ValueId) -> bool {
    g.value(v).elem() == Some(DType::F32)
}

/// The schema's "data" type parameters of a node: parameters of its outputs and of its inputs that are not
/// shape-like, bound to float32 here. These are the parameters a low decision changes.
pub(crate) fn data_params(g: &Graph, n: NodeId, schema: &OpSchema) -> Vec<String> {
    let node = g.node(n);
    let mut ps: Vec<String> = Vec::new();
    let mut add = |p: Option<&str>| {
        if let Some(p) = p
            && !ps.iter().any(|x| x == p)
        {
            ps.push(p.to_string());
        }
    };
    for (i, v) in node.outputs().iter().enumerate() {
        if v.is_some_and(|v| is_f32(g, v)) {
            add(schema.output_type_param(i));
        }
    }
    for (i, v) in node.inputs().iter().enumerate() {
        if v.is_some_and(|v| is_f32(g, v))
            && !schema.input_is_shape_like(i)
            && !schema.input_fixed_f32(i)
        {
            add(schema.input_type_param(i));
        }
    }
    // The statistics outputs of a normalization with `stash_type` (LayerNormalization's Mean and InvStdDev,
    // U) have the type that attribute names, whatever the data's: lowered to bf16 (which U allows),
    // onnx.checker refused them. A parameter that only outputs name is not data there.
    if schema.attribute("stash_type").is_some() {
        ps.retain(|p| {
            (0..node.inputs().len().max(schema.inputs.len()))
                .any(|i| schema.input_type_param(i) == Some(p.as_str()))
        });
    }
    // A parameter that also types a shape-like input (Resize roi, BatchNormalization-15 statistics) is not data.
    ps.retain(|p| {
        !(0..node.inputs().len()).any(|i| {
            schema.input_is_shape_like(i) && schema.input_type_param(i) == Some(p.as_str())
        }) || (0..node.outputs().len()).any(|o| schema.output_type_param(o) == Some(p.as_str()))
    });
    ps
}

impl Pass for AssignPrecision {
    fn name(&self) -> &'static str {
        "assign-precision"
    }

    fn run(&mut self, model: &mut Model) -> Result<PassOutcome, PassError> {
        if !matches!(self.opts.target, DType::F16 | DType::BF16) {
            return Err(PassError::Failed {
                pass: self.name().into(),
                message: format!(
                    "target precision must be f16 or bf16, not {}",
                    self.opts.target
                ),
            });
        }
        let opsets = model.opsets();
        let mut stats = Stats::default();
        decide_graph(
            &mut model.graph,
            &self.opts,
            &opsets,
            &mut stats,
            "",
            &HashMap::default(),
        );
        Ok(PassOutcome {
            changed: stats.decided > 0,
            counters: vec![
                ("nodes decided", stats.decided),
                ("low", stats.low),
                ("fp32", stats.fp32),
            ],
            notes: Vec::new(),
            records: Vec::new(),
        })
    }
}

#[derive(Default)]
struct Stats {
    decided: u64,
    low: u64,
    fp32: u64,
}

/// Deny ops that are dangerous only through the magnitudes of their values: proven or observed ranges can
/// show them safe. (Recurrent, loss, index, quantization, spectral and sampling ops stay denied.)
pub const RANGE_GUARDED: &[&str] = &[
    "Exp",
    "Pow",
    "Log",
    "Reciprocal",
    "Softmax",
    "LogSoftmax",
    "Softplus",
    "Sinh",
    "Cosh",
    "ReduceSum",
    "ReduceMean",
    "ReduceSumSquare",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "CumSum",
    // recurrent layers: kernels keep the state in f32 between steps (cuDNN's f32 math precision, our
    // executor), so what must fit is the sequence in and the states out
    "LSTM",
    "GRU",
    "RNN",
];

/// Ops whose output error is the input's absolute error times the output (`e^x`): their input magnitude
/// must be small enough that rounding it to the target keeps the output's relative error below
/// [`EXP_INPUT_ERROR`].
const EXPONENTIAL: &[&str] = &[
    "Exp",
    "Softmax",
    "LogSoftmax",
    "Softplus",
    "Sinh",
    "Cosh",
    "ReduceLogSumExp",
];

/// The largest relative output error allowed from rounding an exponential's input: 2^-7 (0.8%), so fp16
/// inputs up to 16 and bf16 inputs up to 2 in magnitude.
const EXP_INPUT_ERROR: f64 = 1.0 / 128.0;

/// The target's unit roundoff (half an ulp at 1).
pub fn unit_roundoff(d: DType) -> f64 {
    match d {
        DType::F16 => 1.0 / 2048.0,
        DType::BF16 => 1.0 / 256.0,
        _ => 1.0 / 16777216.0,
    }
}

/// The float data values a decision changes: data inputs that are not constants, and float outputs.
fn data_values(g: &Graph, n: NodeId, schema: &OpSchema, params: &[String]) -> Vec<(ValueId, bool)> {
    let node = g.node(n);
    let mut out = Vec::new();
    for (i, v) in node.inputs().iter().enumerate() {
        let Some(v) = *v else { continue };
        if is_f32(g, v)
            && constant_of(g, v).is_none()
            && schema
                .input_type_param(i)
                .is_some_and(|p| params.iter().any(|x| x == p))
        {
            out.push((v, false));
        }
    }
    for v in node.outputs().iter().flatten() {
        if is_f32(g, *v) {
            out.push((*v, true));
        }
    }
    out
}

/// The values a node binds to its data parameters `params`, whatever their type: (value, is an output), inputs
/// first. (`data_values` is the float32 part of these, constants left out.)
fn bound_to(node: &mpopt_ir::Node, schema: &OpSchema, params: &[String]) -> Vec<(ValueId, bool)> {
    let ins = node
        .inputs()
        .iter()
        .enumerate()
        .map(|(i, v)| (*v, schema.input_type_param(i), false));
    let outs = node
        .outputs()
        .iter()
        .enumerate()
        .map(|(i, v)| (*v, schema.output_type_param(i), true));
    ins.chain(outs)
        .filter_map(|(v, p, out)| {
            (params.iter().any(|x| Some(x.as_str()) == p)).then_some((v?, out))
        })
        .collect()
}

/// A magnitude bound for a value: proven (finite) or observed times the margin, with how it was found.
pub(crate) fn magnitude(g: &Graph, v: ValueId, margin: f64) -> Option<(f64, String)> {
    let r = g.value(v).range.as_deref()?;
    let name = g.value(v).name();
    if let Some(p) = r.proven.filter(|p| p.is_bounded()) {
        let b = p.abs_max();
        let observed_more = r.observed.is_some_and(|o| o.abs_max * margin < b);
        if !observed_more {
            return Some((b, format!("'{name}' in {p} (proven)")));
        }
    }
    let o = r.observed?;
    Some((
        o.abs_max * margin,
        format!(
            "'{name}' |x| <= {} observed, x{} margin",
            mpopt_ir::range_short(o.abs_max),
            margin
        ),
    ))
}

/// Overflow and underflow evidence that keeps a node fp32: (rule, evidence, spreads).
fn range_gate(
    g: &Graph,
    values: &[(ValueId, bool)],
    opts: &PrecisionOptions,
    underflow: bool,
) -> Option<(&'static str, String, bool)> {
    let max = max_finite(opts.target);
    for &(v, is_out) in values {
        let Some(r) = g.value(v).range.as_deref() else {
            continue;
        };
        let name = g.value(v).name();
        if let Some(p) = r.proven
            && (p.lo > max || p.hi < -max)
        {
            return Some((
                "range: overflow",
                format!(
                    "'{name}' in {p}: proven beyond the {} range (|x| <= {max})",
                    opts.target
                ),
                true,
            ));
        }
        // a proof within the range outranks the margin, which guards against inputs unlike the calibration set
        let proven_in_range = r
            .proven
            .is_some_and(|p| p.is_bounded() && p.abs_max() <= max);
        if let Some(o) = r.observed {
            if o.abs_max * opts.range_margin > max && !proven_in_range {
                return Some((
                    "range: overflow",
                    format!(
                        "'{name}' observed |x| up to {}; with the x{} margin beyond the {} range ({max})",
                        mpopt_ir::range_short(o.abs_max),
                        opts.range_margin,
                        opts.target
                    ),
                    true,
                ));
            }
            if underflow && is_out && o.lost_share() > opts.max_underflow {
                return Some((
                    "range: underflow",
                    format!(
                        "'{name}': {:.2}% of the observed non-zero values, significant next to the tensor's largest, become zero or subnormal in {} (limit {:.2}%)",
                        o.lost_share() * 100.0,
                        opts.target,
                        opts.max_underflow * 100.0
                    ),
                    false,
                ));
            }
        }
    }
    None
}

/// The evidence that a guarded op is safe in the target type, or None: every value it reads and writes has
/// a magnitude bound within the target's range, and an exponential's input is small enough to round.
/// Kernels accumulate in f32 (cuBLAS and cuDNN compute types, onnxruntime's CUDA reductions, our executor),
/// so what must fit is what is stored: the inputs and outputs.
fn range_lift(
    g: &Graph,
    n: NodeId,
    values: &[(ValueId, bool)],
    opts: &PrecisionOptions,
    relax: bool,
) -> Option<String> {
    let max = max_finite(opts.target);
    let node = g.node(n);
    let mut ev = Vec::new();
    for &(v, _) in values {
        let (b, how) = magnitude(g, v, opts.range_margin)?;
        if b > max {
            return None;
        }
        ev.push(how);
    }
    if ev.is_empty() {
        return None;
    }
    if relax {
        return Some(ev.join("; ") + "; input rounding left to the search's measurement");
    }
    if EXPONENTIAL.contains(&node.op_type.as_str()) {
        let x = node.inputs().first().copied().flatten()?;
        let r = g.value(x).range.as_deref()?;
        // rounding error is about the values that occur: observed ones when there are, else the proven bound
        let p = match (r.observed, r.proven.filter(|p| p.is_bounded())) {
            (Some(o), _) => o.abs_max,
            (None, Some(p)) => p.abs_max(),
            (None, None) => return None,
        };
        if p * unit_roundoff(opts.target) > EXP_INPUT_ERROR {
            return None;
        }
        ev.push(format!(
            "input magnitude {} rounds to {} within {:.2}%",
            mpopt_ir::range_short(p),
            opts.target,
            p * unit_roundoff(opts.target) * 100.0
        ));
    }
    if node.op_type == "Pow" {
        // the exponent scales the relative error: a constant of moderate size
        let e = node.inputs().get(1).copied().flatten()?;
        let t = constant_of(g, e)?;
        let vals = t.values_f64(16)?;
        let k = vals.iter().fold(0f64, |a, v| a.max(v.abs()));
        if k * unit_roundoff(opts.target) > EXP_INPUT_ERROR {
            return None;
        }
    }
    Some(ev.join("; "))
}

/// Additive attention masks found by [`additive_masks`].
#[derive(Default)]
struct Masks {
    /// (node, constant input) pairs whose out-of-range values are saturated.
    constants: FxHashSet<(NodeId, ValueId)>,
    /// The nodes from each mask to its Softmax nodes, with the evidence for the report, and the mask
    /// constants and the values on those paths (their magnitudes are the mask's).
    paths: Saturated,
}

/// Ops a mask may flow through on its way to Softmax, by input slot: additions keep a very negative value
/// very negative (Sub only as the minuend), data movement copies it.
fn mask_passes(op: &str, slot: u32) -> bool {
    match op {
        "Add" | "Reshape" | "Unsqueeze" | "Squeeze" | "Expand" | "Identity" | "Transpose"
        | "Cast" | "Concat" | "Tile" => true,
        "Sub" | "Slice" | "Gather" => slot == 0,
        "Where" => slot >= 1,
        _ => false,
    }
}

/// Finds additive attention masks: a default-domain Add, Sub (constant as minuend), Mul or Where (constant as
/// a branch) whose constant input holds values beyond the target's range that are all very negative (the
/// `-FLT_MAX` or `-1e38` idiom for minus infinity), and whose result reaches only Softmax nodes, through
/// additions and data movement. Saturating the constant to the target's lowest finite value changes no
/// Softmax output: exp() of a masked logit is 0 either way, as long as a row keeps one unmasked logit (what a
/// mask is for). A Mul whose other operand is proven or observed negative somewhere is not a mask (it would
/// turn the constant positive). Bounded work: at most 256 nodes are followed from each candidate.
fn additive_masks(g: &Graph, target: DType) -> Masks {
    let max = max_finite(target);
    let mut masks = Masks::default();
    for (id, node) in g.nodes() {
        if !node.in_default_domain()
            || !matches!(node.op_type.as_str(), "Add" | "Sub" | "Mul" | "Where")
        {
            continue;
        }
        // the inputs that could hold a mask: float constants in an additive position
        let slots: Vec<(usize, ValueId, &Tensor)> = node
            .inputs()
            .iter()
            .enumerate()
            .filter_map(|(i, v)| Some((i, (*v)?)))
            .filter(|&(i, v)| {
                is_f32(g, v)
                    && !(node.op_type == "Sub" && i != 0)
                    && !(node.op_type == "Where" && i == 0)
            })
            .filter_map(|(i, v)| Some((i, v, constant_of(g, v)?)))
            .collect();
        if slots.is_empty() {
            continue;
        }
        // the structural test first (cheap), the scans of the constant only then
        let Some((path, mut values, softmaxes)) = path_to_softmax(g, id) else {
            continue;
        };
        for (i, v, t) in slots {
            let (Some(r), Some(iv)) = (
                constant_range_check(g, v, t, target),
                crate::range_rules::const_interval(t),
            ) else {
                continue;
            };
            if r.overflow == 0 || iv.hi > max || !iv.lo.is_finite() {
                continue;
            }
            let sign = if node.op_type == "Mul" {
                match multiplier_sign(g, node, i) {
                    Some(s) => format!("; {s}"),
                    None => continue,
                }
            } else {
                String::new()
            };
            let name = g.value(v).name();
            let origin = format!(
                "attention mask: '{name}' holds {} values below the {target} range (min {:e}) and reaches only \
                 Softmax ({softmaxes}) through additions and data movement{sign}: in {target} they become \
                 -{max} (the constant converted, reported as clamping) or -inf (the value cast); exp() of a \
                 masked logit is 0 either way",
                r.overflow, iv.lo,
            );
            masks.constants.insert((id, v));
            values.push(v);
            masks.paths.values.extend(values.iter().copied());
            masks.paths.nodes.entry(id).or_insert(origin);
            for &n in &path {
                masks.paths.nodes.entry(n).or_insert_with(|| {
                    format!(
                        "on the path of attention mask '{name}' to Softmax: the mask's magnitudes are saturated, not computed"
                    )
                });
            }
        }
    }
    masks
}

/// What a Mul's other operand is known to be (the mask's multiplier): proven non-negative, observed
/// non-negative, or assumed so; None when it was observed negative (it would turn the mask positive). A
/// bound is no evidence of negative values; an observed one is.
fn multiplier_sign(g: &Graph, node: &mpopt_ir::Node, mask_slot: usize) -> Option<String> {
    let other = node
        .inputs()
        .iter()
        .enumerate()
        .find(|&(k, _)| k != mask_slot)
        .and_then(|(_, o)| *o);
    let facts = other.and_then(|o| g.value(o).range.as_deref());
    let proven = facts.and_then(|f| f.proven).filter(|p| p.lo >= 0.0);
    let observed = facts.and_then(|f| f.observed);
    match (proven, observed) {
        (Some(p), _) => Some(format!("its multiplier proven in {p}")),
        (None, Some(o)) if o.min < 0.0 => None,
        (None, Some(o)) => Some(format!(
            "its multiplier observed in [{}, {}]",
            mpopt_ir::range_short(o.min),
            mpopt_ir::range_short(o.max)
        )),
        (None, None) => {
            Some("its multiplier assumed non-negative (a 0/1 mask; not proven)".to_string())
        }
    }
}

/// Follows the float results of node `start` to their readers: when every path goes through
/// [`mask_passes`] ops and ends at Softmax (no graph output, no other reader, at most 256 nodes), returns the
/// nodes after `start` (Softmax included), the values on the way, and how many Softmax reads there are.
fn path_to_softmax(g: &Graph, start: NodeId) -> Option<(Vec<NodeId>, Vec<ValueId>, usize)> {
    let mut path: Vec<NodeId> = Vec::new();
    let mut values = Vec::new();
    let mut stack: Vec<ValueId> = g.node(start).outputs().iter().flatten().copied().collect();
    let mut softmaxes = 0usize;
    while let Some(x) = stack.pop() {
        values.push(x);
        if g.outputs().contains(&x) || path.len() > 256 {
            return None;
        }
        for u in g.uses(x) {
            let mpopt_ir::Use::Input(n, slot) = *u else {
                return None;
            };
            let un = g.node(n);
            if !un.in_default_domain() {
                return None;
            }
            if un.op_type == "Softmax" {
                softmaxes += 1;
                path.push(n);
            } else if !mask_passes(&un.op_type, slot) {
                return None;
            } else if !path.contains(&n) {
                path.push(n);
                stack.extend(un.outputs().iter().flatten().copied());
            }
        }
    }
    (softmaxes > 0).then_some((path, values, softmaxes))
}

/// Why [`low_fed_regions`] lowers a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RegionRule {
    /// Every reader is low: lowering removes the casts at its border and adds none.
    ReadByLow,
    /// Some readers stay fp32, but lowering moves the casts at its inputs to fewer or as many smaller
    /// tensors at its outputs (a pooling or reduction inside it shrinks the data).
    SmallerCasts,
}

/// A value's element count as (product of the known dims, the symbolic and unknown (`?`) dims sorted);
/// None with an unknown rank.
fn elements(g: &Graph, v: ValueId) -> Option<(u128, Vec<String>)> {
    let dims = g.value(v).ty.as_ref()?.tensor_shape()?;
    let (mut known, mut syms) = (1u128, Vec::new());
    for d in dims {
        match &d.value {
            mpopt_ir::DimValue::Known(n) => known = known.saturating_mul((*n).max(0) as u128),
            mpopt_ir::DimValue::Symbol(s) => syms.push(s.clone()),
            mpopt_ir::DimValue::Unknown => syms.push("?".into()),
        }
    }
    syms.sort();
    Some((known, syms))
}

/// Do casts of `outs` move fewer elements than casts of `ins`, with no more casts? Comparable only when
/// every value has the same symbolic dims (a batch `N`); then the known parts decide.
fn smaller_casts(g: &Graph, ins: &[ValueId], outs: &[ValueId]) -> bool {
    if outs.len() > ins.len() || ins.is_empty() {
        return false;
    }
    let total = |vs: &[ValueId], syms: &mut Option<Vec<String>>| -> Option<u128> {
        let mut sum = 0u128;
        for &v in vs {
            let (k, s) = elements(g, v)?;
            if syms.get_or_insert_with(|| s.clone()) != &s {
                return None;
            }
            sum = sum.saturating_add(k);
        }
        Some(sum)
    };
    let mut syms = None;
    match (total(ins, &mut syms), total(outs, &mut syms)) {
        (Some(i), Some(o)) => o < i,
        _ => false,
    }
}

/// The undecided infer/clear nodes that form regions (connected by float edges) whose float inputs are all
/// constants (converted in place, no cast) or outputs of low nodes, and that lowering makes cheaper:
/// - [`RegionRule::ReadByLow`]: its readers are all low nodes (at least one; no graph output). BERT's
///   embeddings are one (three table Gathers, two Adds and a LayerNorm feeding the low Q/K/V MatMuls): no
///   producing node is low, so the between-low-nodes rules do not reach them;
/// - [`RegionRule::SmallerCasts`]: some readers stay fp32 (or are graph outputs), but the outputs they read
///   are no more values than the low-produced inputs whose casts go away, and fewer elements. Magika's
///   second GELU and its global max pool: the cast moves from the 512x508 convolution output to the 512
///   pooled values.
///
/// A region that qualifies for neither loses its sinks (members that no member reads), at most 8 times, and
/// is judged again: the LayerNorm square after that max pool feeds an fp32 reduction, and keeping it fp32
/// leaves one cast. Element counts compare known dims when every border value has the same symbolic and
/// unknown dims (taken to be the same: a batch). The region's ops are infer and clear ops, safe in low
/// precision when their inputs are low, which they are. O(nodes + edges).
fn low_fed_regions(
    g: &Graph,
    order: &[NodeId],
    color: &[Color],
    class: &[OpClass],
) -> Vec<(NodeId, RegionRule)> {
    const TRIMMED: usize = usize::MAX - 1;
    let open = |n: NodeId| {
        color[n.index()] == Color::Open
            && matches!(class[n.index()], OpClass::Infer | OpClass::Clear)
    };
    // a node's float inputs or outputs
    let f32_of = |n: NodeId, outputs: bool| {
        let node = g.node(n);
        let vs = if outputs {
            node.outputs()
        } else {
            node.inputs()
        };
        vs.iter()
            .flatten()
            .copied()
            .filter(|&v| is_f32(g, v))
            .collect::<Vec<_>>()
    };
    let graph_outputs: FxHashSet<ValueId> = g.outputs().iter().copied().collect();
    let mut region_of = vec![usize::MAX; color.len()];
    let mut out = Vec::new();
    for &start in order {
        if !open(start) || region_of[start.index()] != usize::MAX {
            continue;
        }
        let r = start.index();
        region_of[r] = r;
        let (mut members, mut stack) = (vec![start], vec![start]);
        let mut fed = true;
        while let Some(n) = stack.pop() {
            let mut join = |m: NodeId, members: &mut Vec<NodeId>, stack: &mut Vec<NodeId>| {
                if region_of[m.index()] == usize::MAX {
                    region_of[m.index()] = r;
                    members.push(m);
                    stack.push(m);
                }
            };
            for v in f32_of(n, false) {
                match g.producer(v) {
                    Some((p, _)) if open(p) => join(p, &mut members, &mut stack),
                    Some((p, _)) => fed &= color[p.index()] == Color::Low,
                    None => fed &= constant_of(g, v).is_some(),
                }
            }
            for v in f32_of(n, true) {
                for u in g.uses(v) {
                    if open(u.node()) {
                        join(u.node(), &mut members, &mut stack);
                    }
                }
            }
        }
        if !fed {
            continue;
        }
        for _ in 0..8 {
            let inside = |m: NodeId| region_of[m.index()] == r;
            let low = |m: NodeId| color[m.index()] == Color::Low;
            let (mut ins, mut outs) = (Vec::new(), Vec::new());
            let mut seen = FxHashSet::default();
            let (mut readers, mut plain) = (0usize, true);
            let mut sinks = Vec::new();
            for &n in &members {
                for v in f32_of(n, false) {
                    if g.producer(v).is_some_and(|(p, _)| low(p))
                        && seen.insert(v)
                        // its cast goes away only if no fp32 node outside reads it
                        && g.uses(v).iter().all(|u| inside(u.node()) || low(u.node()))
                    {
                        ins.push(v);
                    }
                }
                let mut sink = true;
                for v in f32_of(n, true) {
                    let mut cast = graph_outputs.contains(&v);
                    for u in g.uses(v) {
                        let m = u.node();
                        if inside(m) {
                            sink = false;
                        } else {
                            readers += 1;
                            if !low(m) {
                                cast = true;
                                plain &= matches!(u, mpopt_ir::Use::Input(..));
                            }
                        }
                    }
                    if cast {
                        outs.push(v);
                    }
                }
                if sink {
                    sinks.push(n);
                }
            }
            if outs.is_empty() && readers > 0 {
                out.extend(members.iter().map(|&m| (m, RegionRule::ReadByLow)));
                break;
            }
            if plain && smaller_casts(g, &ins, &outs) {
                out.extend(members.iter().map(|&m| (m, RegionRule::SmallerCasts)));
                break;
            }
            for &n in &sinks {
                region_of[n.index()] = TRIMMED;
            }
            members.retain(|&m| region_of[m.index()] == r);
            if members.is_empty() {
                break;
            }
        }
    }
    out
}

/// Does a node read or write float32 data?
fn touches_f32(g: &Graph, id: NodeId) -> bool {
    let node = g.node(id);
    node.inputs()
        .iter()
        .flatten()
        .chain(node.outputs().iter().flatten())
        .any(|&v| is_f32(g, v))
}

/// Every node with float32 data of a graph (and of its subgraphs) fp32: the body of a control-flow node that
/// the search keeps fp32.
fn keep_all_fp32(g: &mut Graph, evidence: &str, stats: &mut Stats) {
    g.for_each_subgraph_mut(|_, _, sg| keep_all_fp32(sg, evidence, stats));
    let ids: Vec<NodeId> = g.nodes().map(|(id, _)| id).collect();
    for id in ids {
        if !touches_f32(g, id) {
            continue;
        }
        stats.decided += 1;
        stats.fp32 += 1;
        g.node_mut(id).precision = Some(Box::new(PrecisionDecision {
            dtype: DType::F32,
            rule: "search: kept fp32 (body of a kept node)".into(),
            evidence: evidence.to_string(),
        }));
    }
}

/// The constants that the subgraphs of `g` read from their enclosing scopes, by name, checked against
/// `target`'s range: those of `g` itself, and those `g` reads from above (`outer`, by the same rule). The
/// initializer gate sees a body's captured weights as it sees its own.
fn captured_constants(
    g: &Graph,
    target: DType,
    outer: &HashMap<String, RangeCheck>,
) -> HashMap<String, RangeCheck> {
    let mut out = HashMap::default();
    for (_, n) in g.nodes() {
        for (_, sg) in n.subgraphs() {
            for &c in sg.captures() {
                let name = sg.value(c).name();
                if out.contains_key(name) {
                    continue;
                }
                let r = match g.value_by_name(name) {
                    Some(v) if !g.captures().contains(&v) => {
                        constant_of(g, v).and_then(|t| constant_range_check(g, v, t, target))
                    }
                    _ => outer.get(name).cloned(),
                };
                if let Some(r) = r {
                    out.insert(name.to_string(), r);
                }
            }
        }
    }
    out
}

/// The range check of every float32 constant of `g` (initializers and Constant outputs), scanned in parallel
/// before the decisions read them one node at a time: on the 20-70 MB corpus models these scans were most
/// of the pass, on one core.
fn constant_checks(g: &Graph, target: DType) -> HashMap<ValueId, RangeCheck> {
    use rayon::prelude::*;
    let consts: Vec<(ValueId, &Tensor)> = g
        .value_ids()
        .filter(|&v| is_f32(g, v))
        .filter_map(|v| Some((v, constant_of(g, v)?)))
        .collect();
    consts
        .par_iter()
        .filter_map(|&(v, t)| Some((v, constant_range_check(g, v, t, target)?)))
        .collect()
}

/// The range check of `t`, the constant data of `v`: from the facts analyze-ranges left on `v` when they
/// describe `t`, else by reading it.
fn constant_range_check(g: &Graph, v: ValueId, t: &Tensor, target: DType) -> Option<RangeCheck> {
    g.value(v)
        .range
        .as_deref()
        .and_then(|r| r.constant.as_ref())
        .and_then(|f| range_check_from(f, t, target))
        .or_else(|| range_check(t, target))
}

/// [`range_check`] without reading the data, from the facts analyze-ranges found in it, when they describe
/// `t` and `target` is f16 or bf16.
fn range_check_from(f: &mpopt_ir::ConstantFacts, t: &Tensor, target: DType) -> Option<RangeCheck> {
    let (overflow, flush) = match target {
        DType::F16 => f.beyond[0],
        DType::BF16 => f.beyond[1],
        _ => return None,
    };
    // the largest finite magnitude is an end of the interval unless an end is infinite (then: a scan)
    let finite = f.min.is_finite() && f.max.is_finite();
    (finite && f.describes(t)).then(|| RangeCheck {
        count: t.numel().unwrap_or(0),
        max_abs: f.min.abs().max(f.max.abs()) as f64,
        overflow: overflow as usize,
        flush: flush as usize,
    })
}

fn decide_graph(
    g: &mut Graph,
    opts: &PrecisionOptions,
    opsets: &Opsets,
    stats: &mut Stats,
    scope: &str,
    outer: &HashMap<String, RangeCheck>,
) {
    // Subgraphs first, each on its own; the bodies of a node the search keeps fp32 are all fp32.
    let search = opts.search.as_deref();
    let key = |id: NodeId| (scope.to_string(), id);
    let visible = captured_constants(g, opts.target, outer);
    g.for_each_subgraph_mut(|id, attr, sg| {
        if let Some(ev) = search.and_then(|s| s.keep.get(&key(id))) {
            keep_all_fp32(sg, ev, stats);
        } else {
            let inner = mpopt_exec::subgraph_scope(scope, id, attr);
            decide_graph(sg, opts, opsets, stats, &inner, &visible)
        }
    });
    let relax =
        search.is_some_and(|s| s.relax && s.reached.as_ref().is_none_or(|r| r.contains(scope)));

    let bound = g.node_bound();
    let mut spreads = vec![false; bound];
    let mut color = vec![Color::None; bound];
    let mut class = vec![OpClass::Deny; bound];
    let mut why: Vec<Option<(String, String)>> = vec![None; bound];
    let order: Vec<NodeId> = g.nodes().map(|(id, _)| id).collect();
    let target = opts.target;
    // --to auto: nodes whose only problem is fp16's range (they may run bf16), and nodes whose schema allows bf16
    let mut range_only = vec![false; bound];
    let mut bf16_ok = vec![false; bound];
    let masks = additive_masks(g, target);
    let saturated = crate::saturation::saturated_overflow(g, target, opts.range_margin);
    let checks = constant_checks(g, target);
    // whether the model's default-domain Cast can make the target and bf16 (a model without that import gets
    // a new one, at an opset that can: insert-casts)
    let cast_allows = |d: DType| {
        opsets.version("").is_none_or(|v| {
            registry()
                .get("", "Cast", v)
                .is_some_and(|s| s.input_allows(0, d))
        })
    };
    let (cast_target, cast_bf16) = (cast_allows(target), cast_allows(DType::BF16));

    for &id in &order {
        if !touches_f32(g, id) {
            continue;
        }
        let node = g.node(id);
        color[id.index()] = Color::Open;
        let dom = mpopt_ir::canonical_domain(&node.domain);
        let (mut c, reason) = class_of(dom, &node.op_type);
        let mut evidence = format!("{}: {reason}", c.name());
        // A scatter with a reduction combines what it writes (add and mul accumulate the updates of repeated
        // indices, which fp16 rounds at each step), and onnxruntime's CPU provider has no f16 kernel for
        // any reduction: it refused the lowered node at run time.
        if dom.is_empty()
            && matches!(node.op_type.as_str(), "ScatterElements" | "ScatterND")
            && let Some(r) = node.attr_string("reduction").filter(|r| r != "none")
        {
            c = OpClass::Deny;
            evidence = format!(
                "deny: scatter with reduction '{r}': it accumulates repeated indices, and onnxruntime's \
                 CPU provider has no f16 kernel for it"
            );
        }
        if let Some((_, _, oc)) = opts
            .classes
            .iter()
            .find(|(d, o, _)| d == dom && *o == node.op_type)
        {
            c = *oc;
            evidence = format!("{}: policy file class for {}", c.name(), node.op_type);
        }
        class[id.index()] = c;
        let fp32 = |why: &mut Vec<Option<(String, String)>>, rule: String, ev: String| {
            why[id.index()] = Some((rule, ev));
        };
        // Gate: user keep-fp32.
        if let Some(sel) = opts.keep_fp32.iter().find(|s| s.matches(node)) {
            fp32(
                &mut why,
                format!("user: --keep-fp32 {}", sel.text()),
                evidence.clone(),
            );
            color[id.index()] = Color::Fp32;
            spreads[id.index()] = true;
            continue;
        }
        let lifted = search.and_then(|s| s.lift.get(&key(id)));
        if let Some(ev) = lifted {
            evidence = format!("{evidence}; {ev}");
        }
        if let Some(ev) = search.and_then(|s| s.keep.get(&key(id))) {
            fp32(&mut why, "search: kept fp32".into(), ev.clone());
            color[id.index()] = Color::Fp32;
            continue;
        }
        // Gate: schema allows the target for the data parameters.
        let schema = registry().get(dom, &node.op_type, opsets.version(dom).unwrap_or(1));
        let Some(schema) = schema else {
            fp32(
                &mut why,
                "schema: none".into(),
                format!("no schema for {} at this opset", node.qualified_op()),
            );
            color[id.index()] = Color::Fp32;
            continue;
        };
        let params = data_params(g, id, schema);
        let allows = |d: DType| {
            params.iter().all(|p| {
                schema
                    .constraint(p)
                    .is_some_and(|c| c.allowed.iter().any(|t| t.tensor_elem() == Some(d)))
            })
        };
        bf16_ok[id.index()] =
            opts.auto_bf16 && !params.is_empty() && allows(DType::BF16) && cast_bf16;
        let blocked: Vec<&String> = params
            .iter()
            .filter(|p| {
                !schema
                    .constraint(p)
                    .is_some_and(|c| c.allowed.iter().any(|t| t.tensor_elem() == Some(target)))
            })
            .collect();
        if !blocked.is_empty() && c != OpClass::Keep {
            fp32(
                &mut why,
                "schema".into(),
                format!(
                    "{} v{}: type parameter {} does not allow {target}",
                    node.qualified_op(),
                    schema.since_version,
                    blocked
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
            color[id.index()] = Color::Fp32;
            continue;
        }
        // Gate: the casts to and from the target must exist at the model's opset (Cast has bf16 from opset
        // 13). Only onnxruntime's default-domain LayerNormalization allows bf16 earlier: lowered at opset
        // 12, it got casts onnxruntime refuses.
        if !params.is_empty() && !cast_target {
            fp32(
                &mut why,
                "schema".into(),
                format!(
                    "Cast at opset {} cannot make {target}: no cast to it could be placed",
                    opsets.version("").unwrap_or_default()
                ),
            );
            color[id.index()] = Color::Fp32;
            continue;
        }
        // Gate: a node that reads or writes a sequence or an optional. No Cast converts a container, and
        // onnx ties its element type to the tensors the node reads or writes (SplitToSequence's input,
        // SequenceAt's output): lowered, such a node gave models onnx.checker refused once a low node fed
        // it. Its tensors get Casts instead; the container keeps its element type.
        if let Some(v) = node
            .inputs()
            .iter()
            .chain(node.outputs())
            .flatten()
            .find(|&&v| {
                g.value(v)
                    .ty
                    .as_ref()
                    .is_some_and(|t| !matches!(t.ty, mpopt_ir::Type::Tensor { .. }))
            })
        {
            fp32(
                &mut why,
                "container".into(),
                format!(
                    "'{}' is a sequence or optional: no Cast converts it, and its element type is tied to \
                     the node's tensors",
                    g.value(*v).name()
                ),
            );
            color[id.index()] = Color::Fp32;
            continue;
        }
        // the values bound to its data parameters, inputs first
        let bound = bound_to(node, schema, &params);
        // Gate: a node reading a DequantizeLinear output belongs to a QDQ group (DQ -> op -> Q): the runtime
        // fuses the group into an int8 kernel (QLinearConv, QLinearMatMul, ...), and a cast between DQ and the
        // op prevents it. Kept fp32, the node runs in int8 where it is fused, as the quantized model meant.
        if let Some(dq) = bound.iter().filter(|b| !b.1).find_map(|&(v, _)| {
            let (prod, _) = g.producer(v)?;
            let pn = g.node(prod);
            (pn.op_type == "DequantizeLinear" && pn.in_default_domain()).then_some(prod)
        }) {
            fp32(
                &mut why,
                "qdq".into(),
                format!(
                    "reads {}: part of a quantized (QDQ) group that runtimes fuse into an int8 kernel, which a cast would prevent",
                    mpopt_ir::node_label(g, dq)
                ),
            );
            color[id.index()] = Color::Fp32;
            continue;
        }
        // Gate: a value bound to a data parameter whose element type is unknown (its producer has no type
        // rule: an op without a schema at this opset, another domain's op). Lowered, the node would read it
        // uncast beside its low operands: onnxruntime's optimizer writes LayerNormalization in the default
        // domain at opsets before 17, and a MatMul reading it was lowered to an invalid model.
        if let Some(&(v, _)) = bound.iter().find(|b| g.value(b.0).elem().is_none()) {
            let from = g
                .producer(v)
                .map_or("a graph input".into(), |(p, _)| mpopt_ir::node_label(g, p));
            fp32(
                &mut why,
                "type: unknown".into(),
                format!(
                    "value '{}' (from {from}) has no known element type: a cast to {target} could not be placed",
                    g.value(v).name()
                ),
            );
            color[id.index()] = Color::Fp32;
            continue;
        }
        // Gate: constant data beyond the target's range, or flushing to zero where it matters.
        let mut data_gate = None;
        let mut overflow = false;
        for (i, v) in node.inputs().iter().enumerate() {
            let Some(v) = *v else { continue };
            if !is_f32(g, v)
                || !schema
                    .input_type_param(i)
                    .is_some_and(|p| params.iter().any(|x| x == p))
            {
                continue;
            }
            // a constant of this graph, or one of an enclosing graph read through a capture
            let r = match constant_of(g, v) {
                Some(_) => checks.get(&v).cloned(),
                None => outer.get(g.value(v).name()).cloned(),
            };
            let Some(r) = r else {
                continue;
            };
            let name = g.value(v).name();
            if r.overflow > 0 && masks.constants.contains(&(id, v)) {
                continue;
            }
            if r.overflow > 0 {
                overflow = true;
                data_gate = Some(format!(
                    "initializer '{name}': {} of {} values beyond the {target} range (max |x| = {:e})",
                    r.overflow, r.count, r.max_abs
                ));
                break;
            }
            // Flushing matters in short constants (epsilons, masks, scales), and in factors (weights, scales)
            // where more than 1% of the values would vanish: heavily subnormal weights mark layers that are
            // sensitive to fp16 rounding (ppocrv4_rec's convolutions with 46% of their weights below 6e-8 cost
            // it one of six text lines on the GPU-faithful executor). A flushed operand of Add/Sub/Sum moves
            // the sum by less than the smallest subnormal: harmless (open_nsfw's 52 batch-norm bias Adds).
            // A clear op only moves the values: keeping it fp32 protects nothing (the cast to its low
            // consumers flushes them just the same) and costs casts (vit's cls_token Expand).
            let short = r.count <= 16;
            let addend = dom.is_empty() && matches!(node.op_type.as_str(), "Add" | "Sub" | "Sum");
            if r.flush > 0
                && c != OpClass::Clear
                && !relax
                && lifted.is_none()
                && (short || !addend && r.flush * 100 > r.count)
            {
                data_gate = Some(format!(
                    "initializer '{name}': {} of {} non-zero values would flush to zero in {target}",
                    r.flush, r.count
                ));
                break;
            }
        }
        if let Some(ev) = data_gate {
            fp32(&mut why, "initializer range".into(), ev);
            color[id.index()] = Color::Fp32;
            spreads[id.index()] = overflow;
            range_only[id.index()] = overflow;
            continue;
        }
        // Gate: range facts (calibration and static analysis) of the values it reads and writes.
        let mut data_values = data_values(g, id, schema, &params);
        // a mask's magnitudes, and the overflow a saturating op absorbs, are saturated, not computed: the
        // range gate judges the rest
        for sat in [&masks.paths, &saturated] {
            if let Some(ev) = sat.exempt(id, &mut data_values) {
                evidence = format!("{evidence}; {ev}");
            }
        }
        let is_constant = node.op_type == "Constant" && dom.is_empty();
        // (the underflow gate, like the flush gate, spares clear ops: the cast to their low consumers
        // would underflow the values just the same)
        let underflow = !relax && c != OpClass::Clear;
        if !is_constant
            && let Some((rule, ev, spread)) = range_gate(g, &data_values, opts, underflow)
        {
            fp32(&mut why, rule.into(), ev);
            color[id.index()] = Color::Fp32;
            spreads[id.index()] = spread;
            // overflow and underflow alike: bf16 has fp32's exponent range
            range_only[id.index()] = true;
            continue;
        }
        // A guarded deny op whose values are shown to stay in range (and, for exponentials, precise enough)
        // is no longer dangerous: it joins the colouring as an infer node.
        if c == OpClass::Deny
            && dom.is_empty()
            && RANGE_GUARDED.contains(&node.op_type.as_str())
            && let Some(ev) = range_lift(g, id, &data_values, opts, relax)
        {
            // For the search (relaxed), a recurrent layer shown in range is a matrix product over time
            // steps: it is a candidate like one (allow), measured and checked, instead of running low only
            // between low nodes.
            let recurrent = matches!(node.op_type.as_str(), "LSTM" | "GRU" | "RNN");
            c = if relax && recurrent {
                OpClass::Allow
            } else {
                OpClass::Infer
            };
            class[id.index()] = c;
            evidence = format!("deny lifted by range: {ev} ({evidence})");
        } else if c == OpClass::Deny && dom.is_empty() && node.op_type == "Softmax" {
            // Softmax's danger is the rounding of its logits. As an infer node it runs low only between
            // low nodes, where its logits arrive already rounded to the target by their producers; it
            // subtracts the max and sums in f32 (GPU kernels and the executor), so running it low adds
            // only the rounding of its outputs, and saves the two casts around it.
            c = OpClass::Infer;
            class[id.index()] = c;
            evidence = format!(
                "deny relaxed to infer: low only between low nodes, whose outputs already round its \
                 logits to {}; max-subtracted, summed in f32 ({evidence})",
                opts.target
            );
        }
        // (not a control-flow node: its interface stays as it is, and the selector reaches its bodies' nodes;
        // not BitCast, whose input's bit width is its meaning: lowered, it made a model the verifier refused)
        if c != OpClass::Keep
            && !(dom.is_empty() && node.op_type == "BitCast")
            && let Some(sel) = opts.force_low.iter().find(|s| s.matches(node))
        {
            why[id.index()] = Some((format!("user: --force-low {}", sel.text()), evidence));
            color[id.index()] = Color::Low;
            continue;
        }
        match c {
            OpClass::Deny | OpClass::Keep => {
                why[id.index()] = Some((c.name().into(), evidence));
                color[id.index()] = Color::Fp32;
                spreads[id.index()] = c == OpClass::Deny;
            }
            OpClass::Allow => {
                why[id.index()] = Some(("allow".into(), evidence));
                color[id.index()] = Color::Low;
            }
            _ => why[id.index()] = Some((String::new(), evidence)),
        }
    }

    // Float edges: consumers and producers within this graph.
    let succ = |g: &Graph, n: NodeId| -> Vec<NodeId> {
        g.node(n)
            .outputs()
            .iter()
            .flatten()
            .filter(|&&v| is_f32(g, v))
            .flat_map(|&v| g.uses(v).iter().map(|u| u.node()))
            .collect()
    };
    let pred = |g: &Graph, n: NodeId| -> Vec<NodeId> {
        g.node(n)
            .inputs()
            .iter()
            .flatten()
            .filter(|&&v| is_f32(g, v))
            .filter_map(|&v| g.producer(v).map(|(p, _)| p))
            .collect()
    };
    let passable = |id: NodeId, color: &[Color], class: &[OpClass]| {
        color[id.index()] == Color::Open
            && matches!(class[id.index()], OpClass::Infer | OpClass::Clear)
    };

    // Deny spreads forward through infer/clear nodes: first from the nodes that are dangerous for precision,
    // then from those that are dangerous only through fp16's range (what a node reached only by the second
    // wave records, for --to auto).
    let mut painted = vec![false; bound];
    for wave in [false, true] {
        let mut q: VecDeque<NodeId> = order
            .iter()
            .copied()
            .filter(|&n| spreads[n.index()] && range_only[n.index()] == wave)
            .collect();
        while let Some(n) = q.pop_front() {
            for s in succ(g, n) {
                if passable(s, &color, &class) && !painted[s.index()] {
                    painted[s.index()] = true;
                    range_only[s.index()] = wave;
                    why[s.index()] = Some((
                        "deny spreads".into(),
                        format!("downstream of fp32 node {}", mpopt_ir::node_label(g, n)),
                    ));
                    q.push_back(s);
                }
            }
        }
    }
    for (i, p) in painted.iter().enumerate() {
        if *p {
            color[i] = Color::Fp32;
        }
    }

    // Infer/clear nodes between low nodes become low.
    let reach = |forward: bool, color: &[Color]| -> Vec<bool> {
        let mut seen = vec![false; bound];
        let mut q: VecDeque<NodeId> = order
            .iter()
            .copied()
            .filter(|&n| color[n.index()] == Color::Low)
            .collect();
        while let Some(n) = q.pop_front() {
            for m in if forward { succ(g, n) } else { pred(g, n) } {
                if passable(m, color, &class) && !seen[m.index()] {
                    seen[m.index()] = true;
                    q.push_back(m);
                }
            }
        }
        seen
    };
    let (fwd, bwd) = (reach(true, &color), reach(false, &color));
    for &id in &order {
        if fwd[id.index()] && bwd[id.index()] {
            color[id.index()] = Color::Low;
            if let Some((rule, _)) = &mut why[id.index()] {
                *rule = format!("{}: between low nodes", class[id.index()].name());
            }
        }
    }

    // Low floods through clear nodes, both ways; then an infer/clear node whose float producers and consumers
    // are all low (at least one of each) becomes low too, and the flood continues, until nothing changes. Such a node is
    // between low nodes once the clear nodes next to it have become low, and lowering it removes its casts.
    let mut q: VecDeque<NodeId> = order
        .iter()
        .copied()
        .filter(|&n| color[n.index()] == Color::Low)
        .collect();
    let mut regions_done = false;
    loop {
        while let Some(n) = q.pop_front() {
            for m in succ(g, n).into_iter().chain(pred(g, n)) {
                if color[m.index()] == Color::Open && class[m.index()] == OpClass::Clear {
                    color[m.index()] = Color::Low;
                    if let Some((rule, _)) = &mut why[m.index()] {
                        *rule = "clear: next to low nodes".into();
                    }
                    q.push_back(m);
                }
            }
        }
        for &id in &order {
            if !passable(id, &color, &class) {
                continue;
            }
            let (ps, cs) = (pred(g, id), succ(g, id));
            let all_low = |ns: &[NodeId]| ns.iter().all(|n| color[n.index()] == Color::Low);
            // low neighbours on both sides: a node that only feeds graph outputs would just move their cast
            if !ps.is_empty() && !cs.is_empty() && all_low(&ps) && all_low(&cs) {
                color[id.index()] = Color::Low;
                if let Some((rule, _)) = &mut why[id.index()] {
                    *rule = format!("{}: all float neighbours low", class[id.index()].name());
                }
                q.push_back(id);
            }
        }
        if q.is_empty() && !regions_done {
            // once: whole regions that only constants and low nodes feed
            regions_done = true;
            for (id, how) in low_fed_regions(g, &order, &color, &class) {
                color[id.index()] = Color::Low;
                if let Some((rule, _)) = &mut why[id.index()] {
                    let c = class[id.index()].name();
                    *rule = match how {
                        RegionRule::ReadByLow => {
                            format!("{c}: fed by constants and low nodes, read by low nodes")
                        }
                        RegionRule::SmallerCasts => format!(
                            "{c}: fed by constants and low nodes; its casts move to fewer elements"
                        ),
                    };
                }
                q.push_back(id);
            }
        }
        if q.is_empty() {
            break;
        }
    }

    // --to auto: which fp32 nodes run bf16 instead, fp16's range being their only problem. A clear node
    // computes nothing, so bf16 only helps it beside other low nodes: between fp32 nodes it would only add
    // casts (and re-converting the result would lower the Cast added for its fp32 readers, renaming it
    // each time). Such clear nodes follow the low nodes next to them, as clear nodes do.
    let auto_bf16 = {
        let eligible = |id: NodeId| {
            color[id.index()] == Color::Fp32 && range_only[id.index()] && bf16_ok[id.index()]
        };
        let mut bf16 = vec![false; bound];
        let mut q: VecDeque<NodeId> = VecDeque::new();
        for &id in &order {
            if eligible(id) && class[id.index()] != OpClass::Clear {
                bf16[id.index()] = true;
                q.push_back(id);
            } else if color[id.index()] == Color::Low {
                q.push_back(id);
            }
        }
        while let Some(n) = q.pop_front() {
            for m in succ(g, n).into_iter().chain(pred(g, n)) {
                if !bf16[m.index()] && eligible(m) && class[m.index()] == OpClass::Clear {
                    bf16[m.index()] = true;
                    q.push_back(m);
                }
            }
        }
        bf16
    };
    for &id in &order {
        let c = color[id.index()];
        if c == Color::None {
            continue;
        }
        let (rule, evidence) = why[id.index()].take().unwrap_or_default();
        let (dtype, rule) = match c {
            Color::Low => (target, rule),
            Color::Fp32 if auto_bf16[id.index()] => (
                DType::BF16,
                format!("auto: bf16, fp16's range is the only problem ({rule})"),
            ),
            _ => (
                DType::F32,
                if rule.is_empty() {
                    format!("{}: not between low nodes", class[id.index()].name())
                } else {
                    rule
                },
            ),
        };
        stats.decided += 1;
        if dtype == DType::F32 {
            stats.fp32 += 1;
        } else {
            stats.low += 1;
        }
        g.node_mut(id).precision = Some(Box::new(PrecisionDecision {
            dtype,
            rule,
            evidence,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_check_in_place_matches_the_general_path() {
        for n in [1usize, 9, 33, 1000] {
            let xs: Vec<f32> = (0..n)
                .map(|i| match i % 11 {
                    0 => 7e4,
                    1 => -1e-9,
                    2 => 0.0,
                    3 => f32::INFINITY,
                    4 => f32::NAN,
                    _ => (i as f32).cos() * 100.0,
                })
                .collect();
            let raw = Tensor::from_f32(vec![n as i64], &xs);
            let mut listed = raw.clone();
            listed.data = mpopt_ir::TensorData::Floats(xs.clone());
            // the same values as f64 take the general path
            let mut wide = raw.clone();
            wide.dtype = DType::F64;
            wide.data = mpopt_ir::TensorData::Doubles(xs.iter().map(|&x| x as f64).collect());
            for target in [DType::F16, DType::BF16] {
                let (a, b, c) = (
                    range_check(&raw, target).unwrap(),
                    range_check(&listed, target).unwrap(),
                    range_check(&wide, target).unwrap(),
                );
                let key = |r: &RangeCheck| (r.count, r.overflow, r.flush, r.max_abs);
                assert_eq!(key(&a), key(&b), "{target:?} n={n}");
                assert_eq!(key(&a), key(&c), "{target:?} n={n}");
            }
            let f16 = range_check(&raw, DType::F16).unwrap();
            let count = |m: usize| (0..n).filter(|i| i % 11 == m).count();
            assert_eq!((f16.overflow, f16.flush), (count(0), count(1)), "n={n}");
        }
    }

    #[test]
    fn range_checks_from_the_analysis_facts_match_a_scan() {
        // the facts give each check without a scan, except with an infinity (the largest finite magnitude
        // is then not an end of the interval) or when they no longer describe the data
        let cases: [(&str, Vec<f32>, bool); 6] = [
            ("clean", vec![0.5, -3.0, 0.0, 1e-3], true),
            ("overflow", vec![1.0, -7e4, 3.4e38], true),
            ("flush", vec![1.0, 1e-9, 0.0, -1e-41], true),
            ("zeros", vec![0.0; 9], true),
            (
                "long",
                (0..1000).map(|i| (i as f32 - 500.0) * 1e-7).collect(),
                true,
            ),
            ("infinity", vec![1.0, f32::INFINITY, -7e4], false),
        ];
        for (name, xs, fast) in cases {
            // repeated up to the size that gets facts (each count grows with it)
            let n = crate::range_rules::FACTS_MIN_ELEMENTS + 3;
            let xs: Vec<f32> = xs.iter().copied().cycle().take(n).collect();
            let t = Tensor::from_f32(vec![n as i64], &xs);
            let (_, facts) = crate::range_rules::const_scan(&t);
            let facts = facts.expect("f32 raw data without NaN has facts");
            for target in [DType::F16, DType::BF16] {
                let from = range_check_from(&facts, &t, target);
                assert_eq!(from.is_some(), fast, "{name} {target:?}");
                if let Some(r) = from {
                    assert_eq!(r, range_check(&t, target).unwrap(), "{name} {target:?}");
                }
            }
            assert!(range_check_from(&facts, &t, DType::F32).is_none());
            // equal contents in another buffer: not the scanned data, so not described
            let copy = Tensor::from_f32(vec![xs.len() as i64], &xs);
            assert!(!facts.describes(&copy), "{name}");
            assert!(
                range_check_from(&facts, &copy, DType::F16).is_none(),
                "{name}"
            );
        }
        // NaN: no facts, nor for small tensors (scanned again instead)
        let mut xs = vec![1.0; crate::range_rules::FACTS_MIN_ELEMENTS];
        let scan = |xs: &[f32]| {
            crate::range_rules::const_scan(&Tensor::from_f32(vec![xs.len() as i64], xs))
        };
        assert!(scan(&xs).1.is_some());
        xs[7] = f32::NAN;
        assert!(scan(&xs).1.is_none());
        let small = Tensor::from_f32(vec![3], &[1.0, 2.0, 3.0]);
        assert!(crate::range_rules::const_scan(&small).1.is_none());
    }

    #[test]
    fn a_proof_within_the_range_outranks_the_observed_margin() {
        let mut g = mpopt_ir::text::parse_graph(
            "graph @t(%x: f32[4]) -> (%y: f32[4]) {\n  %y = Relu(%x)\n}",
        )
        .unwrap();
        let y = g.value_by_name("y").unwrap();
        let observed = mpopt_ir::Observed {
            min: 0.0,
            max: 10_000.0,
            abs_max: 10_000.0,
            count: 4,
            nonzero: 4,
            ..Default::default()
        };
        let opts = PrecisionOptions::default();
        // 10,000 x 8 is beyond 65504: the margin gates ...
        g.value_mut(y).range = Some(Box::new(mpopt_ir::ValueRange {
            proven: None,
            observed: Some(observed),
            ..Default::default()
        }));
        assert!(range_gate(&g, &[(y, true)], &opts, true).is_some());
        // ... unless a proof bounds the value within the range
        g.value_mut(y).range = Some(Box::new(mpopt_ir::ValueRange {
            proven: Some(mpopt_ir::Interval::new(0.0, 20_000.0)),
            observed: Some(observed),
            ..Default::default()
        }));
        assert!(range_gate(&g, &[(y, true)], &opts, true).is_none());
        // a bound beyond the range is no proof of anything: the margin gates again
        g.value_mut(y).range = Some(Box::new(mpopt_ir::ValueRange {
            proven: Some(mpopt_ir::Interval::new(0.0, 1e6)),
            observed: Some(observed),
            ..Default::default()
        }));
        assert!(range_gate(&g, &[(y, true)], &opts, true).is_some());
    }
}
