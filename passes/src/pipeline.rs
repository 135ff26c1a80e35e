//! Every pass, declared once: the registry that resolves names given on the command line, and the default
//! pipeline with the reason each entry is there.

use crate::analyze_ranges::{AnalyzeRanges, RangeOptions};
use crate::assign_precision::{AssignPrecision, PrecisionOptions};
use crate::calibrate::{Calibrate, InputSet};
use crate::fuse_casts::FuseCasts;
use crate::infer_types::InferTypes;
use crate::insert_casts::{InsertCasts, IoTypes};
use crate::measure_gates::MeasureGates;
use crate::search_precision::{
    DEFAULT_MAX_CHECKS, Progress, SearchOptions, SearchPrecision, Tolerance,
};
use crate::{Pass, PassError};

/// Makes a fresh pass.
type Constructor = fn() -> Box<dyn Pass>;

/// Every pass by name, with a constructor.
const REGISTRY: &[(&str, Constructor)] = &[
    ("infer-types", || Box::new(InferTypes::default())),
    ("analyze-ranges", || Box::new(AnalyzeRanges::default())),
    ("calibrate", || Box::new(Calibrate::default())),
    ("assign-precision", || Box::new(AssignPrecision::default())),
    ("measure-gates", || Box::new(MeasureGates::default())),
    ("search-precision", || Box::new(SearchPrecision::default())),
    ("insert-casts", || Box::new(InsertCasts::default())),
    ("fuse-casts", || Box::new(FuseCasts::default())),
];

/// Every built-in pass name.
pub fn names() -> Vec<&'static str> {
    REGISTRY.iter().map(|(n, _)| *n).collect()
}

/// The built-in pass with this name.
pub fn by_name(name: &str) -> Result<Box<dyn Pass>, PassError> {
    match REGISTRY.iter().find(|(n, _)| *n == name) {
        Some((_, make)) => Ok(make()),
        None => Err(PassError::UnknownPass {
            name: name.to_string(),
            valid: names(),
        }),
    }
}

pub(crate) fn check_name(name: &str) -> Result<(), PassError> {
    by_name(name).map(|_| ())
}

/// The built-in passes plus passes a library user registers, so that a user pass is put into a pipeline by
/// name like the built-in ones.
pub struct Registry {
    user: Vec<(&'static str, UserConstructor)>,
}

/// Makes a fresh user pass.
type UserConstructor = Box<dyn Fn() -> Box<dyn Pass>>;

impl Default for Registry {
    fn default() -> Self {
        Registry::builtin()
    }
}

impl Registry {
    /// The built-in passes.
    pub fn builtin() -> Registry {
        Registry { user: Vec::new() }
    }

    /// Registers a pass under a name (which replaces a built-in of the same name).
    pub fn register(&mut self, name: &'static str, make: impl Fn() -> Box<dyn Pass> + 'static) {
        self.user.push((name, Box::new(make)));
    }

    /// Every name, user passes last.
    pub fn names(&self) -> Vec<&'static str> {
        let mut n = names();
        n.extend(self.user.iter().map(|(n, _)| *n));
        n
    }

    /// The pass with this name.
    pub fn get(&self, name: &str) -> Result<Box<dyn Pass>, PassError> {
        if let Some((_, make)) = self.user.iter().rev().find(|(n, _)| *n == name) {
            return Ok(make());
        }
        by_name(name).map_err(|_| PassError::UnknownPass {
            name: name.to_string(),
            valid: self.names(),
        })
    }

    /// The passes with these names, in order.
    pub fn pipeline(&self, names: &[&str]) -> Result<Vec<Box<dyn Pass>>, PassError> {
        names.iter().map(|n| self.get(n)).collect()
    }
}

/// What the conversion pipeline needs from the user.
#[derive(Clone, Debug, Default)]
pub struct ConvertOptions {
    /// Declared input ranges for `analyze-ranges`.
    pub ranges: RangeOptions,
    /// Calibration input sets; `calibrate` runs when there are any.
    pub calib: Vec<InputSet>,
    /// Precision choices (target, selectors, class overrides).
    pub precision: PrecisionOptions,
    /// Which graph inputs and outputs may change dtype.
    pub io: IoTypes,
    /// Also drop f32 -> f16 -> f32 cast pairs (changes values).
    pub unsafe_fuse: bool,
    /// Error budgets: `search-precision` runs (on the calibration sets) when there are any.
    pub tolerances: Vec<Tolerance>,
    /// Progress reports of the search.
    pub search_progress: Option<Progress>,
}

/// The default conversion pipeline, in order.
pub fn default_pipeline(opts: &ConvertOptions) -> Vec<Box<dyn Pass>> {
    let mut passes: Vec<Box<dyn Pass>> = vec![
        // Every later decision needs each value's dtype and shape: which tensors are float, how large a
        // reduction is, which inputs are shape arithmetic.
        Box::new(InferTypes::default()),
        // Prove an interval for every float value (from constants and declared input ranges): the evidence
        // that lets guarded ops run low, and that the report shows.
        Box::new(AnalyzeRanges::new(opts.ranges.clone())),
    ];
    if !opts.tolerances.is_empty() {
        // With an error budget: one fp32 run per calibration set is both the calibration and the search's
        // reference; each node is measured in low precision, and the most low precision that the budget
        // allows, checked on the whole model, is decided (the search runs assign-precision itself).
        passes.push(Box::new(SearchPrecision::new(SearchOptions {
            tolerances: opts.tolerances.clone(),
            sets: opts.calib.clone(),
            precision: opts.precision.clone(),
            io: opts.io.clone(),
            unsafe_fuse: opts.unsafe_fuse,
            max_checks: DEFAULT_MAX_CHECKS,
            observe: true,
            progress: opts.search_progress.clone(),
        })));
    } else {
        if !opts.calib.is_empty() {
            // Observe what the fp32 model computes on representative inputs: overflow and underflow evidence.
            passes.push(Box::new(Calibrate::new(
                opts.calib.clone(),
                opts.precision.target,
            )));
        }
        // Decide fp16/bf16/fp32 per node: policy classes, schema and initializer gates, user selectors,
        // TF-style colouring. Annotates only.
        passes.push(Box::new(AssignPrecision::new(opts.precision.clone())));
        if !opts.calib.is_empty() {
            // Measure the nodes kept fp32 only by the flush and underflow gates, and lower the harmless ones
            // when the whole model is no worse for it.
            passes.push(Box::new(MeasureGates::new(
                opts.calib.clone(),
                opts.precision.clone(),
                opts.io.clone(),
                opts.unsafe_fuse,
            )));
        }
    }
    passes.extend([
        // Make the graph agree with the decisions: retype outputs, convert constants once, one Cast per
        // (value, dtype), graph outputs keep their dtype and name.
        Box::new(InsertCasts::new(opts.precision.target, opts.io.clone())),
        // Remove the casts that change nothing (pairs that cancel exactly, no-ops, duplicates, casts of
        // constants), including the model's own.
        Box::new(FuseCasts {
            unsafe_narrow_widen: opts.unsafe_fuse,
        }) as Box<dyn Pass>,
    ]);
    passes
}

/// A count of a model's nodes by precision decision, and of its Casts (subgraphs included).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrecisionCensus {
    /// Nodes.
    pub nodes: usize,
    /// Nodes decided low (f16/bf16).
    pub low: usize,
    /// Nodes decided fp32.
    pub fp32: usize,
    /// Cast nodes.
    pub casts: usize,
    /// Estimated floating-point operations of the decided nodes (unknown dims count as 1): matrix products,
    /// convolutions and recurrent layers 2 per multiply-add, data movement none, other ops one per output
    /// element.
    pub flops: u64,
    /// The part of [`PrecisionCensus::flops`] in nodes decided low.
    pub flops_low: u64,
}

/// Estimated floating-point operations of one node (see [`PrecisionCensus::flops`]).
pub fn node_flops(g: &mpopt_ir::Graph, n: &mpopt_ir::Node) -> u64 {
    let dims = |v: Option<mpopt_ir::ValueId>| -> Vec<u64> {
        v.and_then(|v| {
            g.value(v)
                .ty
                .as_ref()
                .and_then(|t| t.tensor_shape().map(|s| s.to_vec()))
        })
        .unwrap_or_default()
        .iter()
        .map(|d| d.value.as_known().filter(|&x| x > 0).unwrap_or(1) as u64)
        .collect()
    };
    let numel = |d: &[u64]| d.iter().product::<u64>();
    let out = dims(n.outputs().first().copied().flatten());
    let input = |i: usize| dims(n.inputs().get(i).copied().flatten());
    let macs = match n.op_type.as_str() {
        "MatMul" | "FusedMatMul" => input(0).last().copied().unwrap_or(1) * numel(&out),
        "Gemm" => {
            let a = input(0);
            let trans_a = matches!(
                n.attr("transA").map(|a| &a.value),
                Some(mpopt_ir::AttrValue::Int(1))
            );
            let k = if trans_a { a.first() } else { a.last() };
            k.copied().unwrap_or(1) * numel(&out)
        }
        "Conv" | "FusedConv" => numel(input(1).get(1..).unwrap_or(&[])) * numel(&out),
        "ConvTranspose" => numel(&input(0)) * numel(input(1).get(1..).unwrap_or(&[])),
        // recurrent layers: the input and recurrent products of every step
        "LSTM" | "GRU" | "RNN" => {
            let x = input(0);
            let steps = x.iter().take(2).product::<u64>().max(1);
            steps * (numel(&input(1)) + numel(&input(2)))
        }
        // data movement computes nothing
        "Reshape" | "Squeeze" | "Unsqueeze" | "Flatten" | "Identity" | "Transpose" | "Slice"
        | "Gather" | "GatherElements" | "GatherND" | "Concat" | "Split" | "Expand" | "Tile"
        | "Pad" | "Constant" | "Shape" | "Size" | "DepthToSpace" | "SpaceToDepth" | "Cast"
        | "CastLike" => return 0,
        _ => return numel(&out),
    };
    2 * macs
}

/// Counts a graph's nodes by decision, and its Casts, subgraphs included.
pub fn census(g: &mpopt_ir::Graph) -> PrecisionCensus {
    fn walk(g: &mpopt_ir::Graph, c: &mut PrecisionCensus) {
        for (_, n) in g.nodes() {
            c.nodes += 1;
            c.casts += usize::from(n.op_type == "Cast" && n.in_default_domain());
            match n.precision.as_ref().map(|p| p.dtype) {
                Some(mpopt_ir::DType::F32) => {
                    c.fp32 += 1;
                    c.flops += node_flops(g, n);
                }
                Some(_) => {
                    c.low += 1;
                    let f = node_flops(g, n);
                    c.flops += f;
                    c.flops_low += f;
                }
                None => {}
            }
            for (_, sg) in n.subgraphs() {
                walk(sg, c);
            }
        }
    }
    let mut c = PrecisionCensus::default();
    walk(g, &mut c);
    c
}
