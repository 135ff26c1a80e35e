//! `analyze-ranges`: proves an interval for every float value by propagating intervals through the graph,
//! subgraphs included.
//!
//! **Why.** Op lists cannot know whether a model's `Pow`, `Exp`, `ReduceSum` or `Softmax` stays within fp16's
//! range; intervals can. A value proven within the target's range needs no fp32 protection, which lets
//! `assign-precision` lower guarded ops (and spares their casts); the proof is the evidence in the report.
//!
//! **How.** Intervals start from constants (exact min/max of every initializer and `Constant`), from declared
//! input ranges (`--input-range NAME=LO:HI`; undeclared float inputs are unbounded, integer ones span their
//! dtype), and outer-scope values for subgraphs. Transfer functions (`range_rules.rs`) cover arithmetic,
//! MatMul/Gemm/Conv with constant weights (per output column, signed sums of weight times input bound),
//! bounded activations, normalizations (bounded by scale, bias and the normalized size), Exp/Pow/Log/Sqrt,
//! reductions with their reduced size, Where/Max/Min and the ops that move data. `If` takes the hull of its
//! branches; `Loop` and `Scan` iterate their bodies to a fixed point, widening an end that still moves after
//! three rounds to infinity, so the analysis terminates. Anything not covered is unbounded: the analysis is
//! sound, never optimistic.
//!
//! **Invariants.** Annotates only ([`mpopt_ir::Value::range`], the `proven` part; calibration's `observed`
//! part is kept). One visit per node per fixed-point round: O(N) plus one pass over the weights.
//!
//! ```text
//! %h = LayerNormalization(%x, %g, %b) : f32[1,4] ; range [-3.5, 3.5]
//! %e = Exp(%h) : f32[1,4]                           ; range [0.0302, 33.12]
//! ```

use rustc_hash::FxHashMap as HashMap;

use mpopt_ir::{
    AttrValue, ConstantFacts, DType, Graph, Interval, Model, NodeId, Use, ValueId, ValueRange,
};

use crate::range_rules::{
    Columns, In, const_scan, constant_of, dtype_interval, transfer, uses_columns, weight_columns,
};
use crate::{Pass, PassError, PassOutcome};

/// Declared ranges of graph inputs.
#[derive(Clone, Debug, Default)]
pub struct RangeOptions {
    /// (input name, interval): every element of that input lies within.
    pub inputs: Vec<(String, Interval)>,
}

impl RangeOptions {
    /// Parses `NAME=LO:HI` (`inf`/`-inf` allowed).
    pub fn parse_input(s: &str) -> Result<(String, Interval), String> {
        let err =
            || format!("input range '{s}': expected NAME=LO:HI, for example pixel_values=-1:1");
        let (name, r) = s.rsplit_once('=').ok_or_else(err)?;
        let (lo, hi) = r.split_once(':').ok_or_else(err)?;
        let num = |t: &str| t.trim().parse::<f64>().map_err(|_| err());
        let (lo, hi) = (num(lo)?, num(hi)?);
        if name.is_empty() || lo.is_nan() || hi.is_nan() || lo > hi {
            return Err(err());
        }
        Ok((name.to_string(), Interval::new(lo, hi)))
    }
}

/// The pass.
#[derive(Default)]
pub struct AnalyzeRanges {
    opts: RangeOptions,
}

impl AnalyzeRanges {
    /// A pass with these declared input ranges.
    pub fn new(opts: RangeOptions) -> AnalyzeRanges {
        AnalyzeRanges { opts }
    }
}

#[derive(Default)]
struct Stats {
    float_values: u64,
    bounded: u64,
}

impl Pass for AnalyzeRanges {
    fn name(&self) -> &'static str {
        "analyze-ranges"
    }

    fn run(&mut self, model: &mut Model) -> Result<PassOutcome, PassError> {
        let g = &model.graph;
        let mut inputs = Vec::new();
        for &i in g.inputs() {
            let v = g.value(i);
            let declared = self
                .opts
                .inputs
                .iter()
                .find(|(n, _)| n == v.name())
                .map(|(_, r)| *r);
            inputs.push(declared.unwrap_or_else(|| default_input(v.elem())));
        }
        for (name, _) in &self.opts.inputs {
            if !g.inputs().iter().any(|&i| g.value(i).name() == name) {
                let valid: Vec<&str> = g.inputs().iter().map(|&i| g.value(i).name()).collect();
                return Err(PassError::Failed {
                    pass: self.name().into(),
                    message: format!(
                        "--input-range names '{name}', which is not a graph input; the inputs are: {}",
                        valid.join(", ")
                    ),
                });
            }
        }
        let opset = model.opsets().version("").unwrap_or(1);
        let mut stats = Stats::default();
        analyze(
            &mut model.graph,
            &inputs,
            &HashMap::default(),
            opset,
            &mut stats,
        );
        Ok(PassOutcome {
            changed: stats.float_values > 0,
            counters: vec![
                ("float values", stats.float_values),
                ("bounded", stats.bounded),
            ],
            notes: Vec::new(),
            records: Vec::new(),
        })
    }
}

/// What an undeclared graph input is assumed to hold: anything its dtype can (floats: unbounded).
fn default_input(d: Option<DType>) -> Interval {
    d.map_or(Interval::TOP, dtype_interval)
}

/// The static shape of a value when its rank is known; unknown dims are -1.
pub(crate) fn static_shape(g: &Graph, v: ValueId) -> Option<Vec<i64>> {
    Some(
        g.value(v)
            .ty
            .as_ref()?
            .tensor_shape()?
            .iter()
            .map(|d| d.value.as_known().unwrap_or(-1))
            .collect(),
    )
}

/// The [`Columns`] of initializer `v` when a node's rule uses them (see `range_rules::uses_columns`):
/// computed by the task that scans `v`, while its data is in cache.
fn columns_to_keep(g: &Graph, v: ValueId) -> Option<Columns> {
    let read_by_rows = g.uses(v).iter().any(|u| match *u {
        Use::Input(n, slot) => uses_columns(g.node(n), slot),
        Use::Implicit(..) => false,
    });
    read_by_rows
        .then(|| weight_columns(g.value(v).initializer.as_deref()?))
        .flatten()
}

/// The interval of a Constant node's output, and for a float32 tensor the facts of its scan (see
/// [`const_scan`]), which assign-precision's range checks reuse instead of reading the data again.
fn constant_node(n: &mpopt_ir::Node) -> (Option<Interval>, Option<ConstantFacts>) {
    let Some(a) = n.attributes.iter().find(|a| a.ref_attr_name.is_none()) else {
        return (None, None);
    };
    let hull = |it: &mut dyn Iterator<Item = f64>| it.map(Interval::point).reduce(Interval::hull);
    let iv = match &a.value {
        AttrValue::Tensor(t) => return const_scan(t),
        AttrValue::Float(f) => Some(Interval::point(*f as f64)),
        AttrValue::Int(i) => Some(Interval::point(*i as f64)),
        AttrValue::Floats(v) => hull(&mut v.iter().map(|&f| f as f64)),
        AttrValue::Ints(v) => hull(&mut v.iter().map(|&i| i as f64)),
        _ => None,
    };
    (iv, None)
}

/// Analyzes a graph given its inputs' intervals and the outer values it may capture; writes every float
/// value's interval and returns the graph outputs' intervals.
fn analyze(
    g: &mut Graph,
    inputs: &[Interval],
    outer: &HashMap<String, Interval>,
    opset: i64,
    stats: &mut Stats,
) -> Vec<Interval> {
    let mut env: Vec<Option<Interval>> = vec![None; g.value_bound()];
    // every initializer is scanned once; the scans are independent, and on the big models they are a third of
    // the pass (vit_tiny's 22 MB of weights)
    // (and the facts of each scan go on the initializer, for assign-precision's range checks to reuse)
    // (and a weight that a MatMul or Gemm reads row by row gets its column sums in the same task, while its
    // data is in cache: see `range_rules::weight_columns`)
    type Scanned = (
        ValueId,
        Option<Interval>,
        Option<ConstantFacts>,
        Option<Columns>,
    );
    let scanned: Vec<Scanned> = {
        use rayon::prelude::*;
        let gr: &Graph = g;
        gr.initializers()
            .par_iter()
            .map(|&v| match gr.value(v).initializer.as_deref() {
                Some(t) => {
                    let (iv, facts) = const_scan(t);
                    (v, iv, facts, columns_to_keep(gr, v))
                }
                None => (v, None, None, None),
            })
            .collect()
    };
    let mut columns: HashMap<ValueId, Columns> = HashMap::default();
    for (v, iv, facts, cols) in scanned {
        env[v.index()] = iv;
        g.value_mut(v).set_constant_facts(facts);
        if let Some(c) = cols {
            columns.insert(v, c);
        }
    }
    for (&i, iv) in g.inputs().iter().zip(inputs) {
        env[i.index()] = Some(*iv);
    }
    for &c in g.captures() {
        env[c.index()] = Some(
            outer
                .get(g.value(c).name())
                .copied()
                .unwrap_or(Interval::TOP),
        );
    }
    // the Constant nodes' values too, in parallel: Paddle's exporter keeps every weight in one. Their column
    // sums are left to the rule, which skips them when the product is unbounded anyway: computed here with
    // the scan, as for initializers, they made analyze-ranges on ppocrv4_rec slower (1.97 -> 2.74 ms, median
    // of 21), most of its MatMuls reading unbounded inputs
    let mut constants: HashMap<NodeId, (Option<Interval>, Option<ConstantFacts>)> = {
        use rayon::prelude::*;
        let nodes: Vec<(NodeId, &mpopt_ir::Node)> = g
            .nodes()
            .filter(|(_, n)| n.op_type == "Constant" && n.in_default_domain())
            .collect();
        nodes
            .par_iter()
            .map(|&(id, n)| (id, constant_node(n)))
            .collect()
    };
    let order: Vec<NodeId> = g.nodes().map(|(id, _)| id).collect();
    for id in order {
        let node = g.node(id);
        let outs: Vec<Interval> = if let Some((iv, facts)) = constants.remove(&id) {
            // the facts go on the output (and stale ones from an earlier run go)
            if let Some(o) = node.outputs().first().copied().flatten() {
                g.value_mut(o).set_constant_facts(facts);
            }
            vec![iv.unwrap_or(Interval::TOP)]
        } else if node.has_subgraphs() {
            control(g, id, &env, opset, stats)
        } else {
            let ins: Vec<In> = node
                .inputs()
                .iter()
                .map(|slot| match slot {
                    Some(v) => In {
                        iv: Some(env[v.index()].unwrap_or(Interval::TOP)),
                        konst: constant_of(g, *v),
                        shape: static_shape(g, *v),
                        columns: columns.get(v),
                    },
                    None => In::default(),
                })
                .collect();
            transfer(g, node, &ins, opset)
        };
        let node = g.node(id);
        for (o, iv) in node.outputs().iter().zip(outs) {
            if let Some(o) = o {
                env[o.index()] = Some(iv);
            }
        }
    }
    // write the facts of float values
    for (v, iv) in env.iter().enumerate() {
        let Some(iv) = *iv else { continue };
        let id = ValueId(v as u32);
        let val = g.value_mut(id);
        if !val.elem().is_some_and(DType::is_float) || val.initializer.is_some() {
            continue;
        }
        stats.float_values += 1;
        stats.bounded += u64::from(iv.is_bounded());
        let r = val.range.get_or_insert_with(Box::<ValueRange>::default);
        r.proven = Some(iv);
    }
    g.outputs()
        .iter()
        .map(|o| env[o.index()].unwrap_or(Interval::TOP))
        .collect()
}

/// Rounds before widening a loop-carried interval that still moves.
const WIDEN_AFTER: usize = 3;

/// Intervals of a control-flow node's outputs; analyzes (and annotates) its subgraphs.
fn control(
    g: &mut Graph,
    id: NodeId,
    env: &[Option<Interval>],
    opset: i64,
    stats: &mut Stats,
) -> Vec<Interval> {
    let node = g.node(id);
    let n_out = node.outputs().len();
    let input = |i: usize| {
        node.inputs()
            .get(i)
            .copied()
            .flatten()
            .map_or(Interval::TOP, |v| env[v.index()].unwrap_or(Interval::TOP))
    };
    let ins: Vec<Interval> = (0..node.inputs().len()).map(input).collect();
    let op = node.op_type.clone();
    let default = node.in_default_domain();
    let num_scan = match node.attr("num_scan_inputs").map(|a| &a.value) {
        Some(AttrValue::Int(k)) => *k as usize,
        _ => 0,
    };
    // outer values by name, for the captures of every subgraph
    let mut outer = HashMap::default();
    for name in node.captured_names() {
        if let Some(v) = g.value_by_name(&name) {
            outer.insert(name, env[v.index()].unwrap_or(Interval::TOP));
        }
    }
    let mut attrs = std::mem::take(&mut g.node_mut(id).attributes);
    fn body<'a>(attrs: &'a mut [mpopt_ir::Attribute], name: &str) -> Option<&'a mut Graph> {
        attrs
            .iter_mut()
            .find(|a| a.name == name)
            .and_then(|a| a.value.graphs_mut().first_mut())
    }
    let result = match (default, op.as_str()) {
        (true, "If") => {
            let t =
                body(&mut attrs, "then_branch").map(|sg| analyze(sg, &[], &outer, opset, stats));
            let e =
                body(&mut attrs, "else_branch").map(|sg| analyze(sg, &[], &outer, opset, stats));
            match (t, e) {
                (Some(t), Some(e)) if t.len() == n_out && e.len() == n_out => {
                    t.into_iter().zip(e).map(|(a, b)| a.hull(b)).collect()
                }
                _ => vec![Interval::TOP; n_out],
            }
        }
        (true, "Loop") => match body(&mut attrs, "body") {
            // node: (M, cond, v...), body: (iter, cond, v...) -> (cond, v..., scan...)
            Some(sg) => {
                let carried: Vec<Interval> = ins.iter().skip(2).copied().collect();
                let iter = Interval::new(0.0, i64::MAX as f64);
                let fixed = fixed_point(carried, |c| {
                    let mut bin = vec![iter, Interval::new(0.0, 1.0)];
                    bin.extend_from_slice(c);
                    let out = analyze(sg, &bin, &outer, opset, stats);
                    let k = c.len();
                    (out.iter().skip(1).take(k).copied().collect(), out)
                });
                let (carried, out) = fixed;
                let k = carried.len();
                let mut r = carried;
                r.extend(out.iter().skip(1 + k).copied());
                r.resize(n_out, Interval::TOP);
                r
            }
            None => vec![Interval::TOP; n_out],
        },
        (true, "Scan") => match body(&mut attrs, "body") {
            // node: (state..., scan inputs...), body: (state..., slices...) -> (state..., scan outputs...)
            Some(sg) if ins.len() >= num_scan => {
                let n_state = ins.len() - num_scan;
                let state: Vec<Interval> = ins[..n_state].to_vec();
                let slices: Vec<Interval> = ins[n_state..].to_vec();
                let (state, out) = fixed_point(state, |s| {
                    let mut bin = s.to_vec();
                    bin.extend_from_slice(&slices);
                    let out = analyze(sg, &bin, &outer, opset, stats);
                    (out.iter().take(s.len()).copied().collect(), out)
                });
                let mut r = state;
                r.extend(out.iter().skip(n_state).copied());
                r.resize(n_out, Interval::TOP);
                r
            }
            _ => vec![Interval::TOP; n_out],
        },
        _ => {
            // other bodies (SequenceMap, functions of other domains): inputs unknown
            for a in &mut attrs {
                for sg in a.value.graphs_mut() {
                    let k = sg.inputs().len();
                    analyze(sg, &vec![Interval::TOP; k], &outer, opset, stats);
                }
            }
            vec![Interval::TOP; n_out]
        }
    };
    g.node_mut(id).attributes = attrs;
    result
}

/// Iterates `step(carried) -> (carried', all outputs)` from the initial intervals, joining each round into
/// the carried intervals, until they stop changing; ends still moving after [`WIDEN_AFTER`] rounds are
/// widened to infinity. Returns the fixed point and the outputs of the last round (run on it).
fn fixed_point(
    init: Vec<Interval>,
    mut step: impl FnMut(&[Interval]) -> (Vec<Interval>, Vec<Interval>),
) -> (Vec<Interval>, Vec<Interval>) {
    let mut cur = init;
    for round in 0.. {
        let (next, out) = step(&cur);
        let joined: Vec<Interval> = cur
            .iter()
            .enumerate()
            .map(|(i, c)| next.get(i).map_or(Interval::TOP, |n| c.hull(*n)))
            .collect();
        if joined == cur {
            return (cur, out);
        }
        cur = if round + 1 >= WIDEN_AFTER {
            cur.iter()
                .zip(&joined)
                .map(|(c, j)| {
                    Interval::new(
                        if j.lo < c.lo { f64::NEG_INFINITY } else { j.lo },
                        if j.hi > c.hi { f64::INFINITY } else { j.hi },
                    )
                })
                .collect()
        } else {
            joined
        };
        if round > WIDEN_AFTER + 2 {
            // widened ends cannot move again; a step whose result still differs is not monotone
            let top = vec![Interval::TOP; cur.len()];
            let (_, out) = step(&top);
            return (top, out);
        }
    }
    unreachable!()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::assign_precision::{AssignPrecision, PrecisionOptions};
    use crate::insert_casts::{InsertCasts, IoTypes};

    /// A Constant node's weights get the same facts as an initializer's, in a subgraph too (silero_vad_v6
    /// keeps every weight in Constants inside an If): assign-precision's range checks then read them
    /// instead of scanning the data again, and insert-casts drops them with the f32 data they describe.
    #[test]
    fn a_constant_nodes_scan_leaves_its_facts_on_its_output() {
        let src = "ir_version 8
opset ai.onnx 17

graph @t(%x: f32[1,4096], %b: bool[]) -> (%y: f32[1,1]) {
  %y = If(%b) {else_branch = graph @else() -> (%e: f32[1,1]) captures (%x: f32[1,4096]) {
    %e = ReduceMax(%x) {keepdims = 1, axes = [1]}
  }, then_branch = graph @then() -> (%t: f32[1,1]) captures (%x: f32[1,4096]) {
    %w = Constant() {value = tensor f32[1] [1]}
    %t = MatMul(%x, %w)
  }}
}
";
        let n = crate::range_rules::FACTS_MIN_ELEMENTS;
        // weights big enough for facts, one beyond f16's range
        let mut xs: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        xs[9] = 7.0e4;
        fn body(m: &mut Model) -> &mut Graph {
            let (id, _) = m.graph.nodes().next().unwrap();
            let node = m.graph.node_mut(id);
            let a = node.attributes.iter_mut().find(|a| a.name == "then_branch");
            &mut a.unwrap().value.graphs_mut()[0]
        }
        let facts = |m: &mut Model| {
            let g = body(m);
            let w = g.value_by_name("w").unwrap();
            g.value(w).range.as_ref().and_then(|r| r.constant.clone())
        };
        // the model with `xs` as the Constant's weights, typed and analyzed
        let analyzed = |xs: &[f32]| {
            let mut m = mpopt_ir::text::parse_model(src).unwrap();
            let g = body(&mut m);
            let (id, _) = g.nodes().next().unwrap();
            g.node_mut(id).attributes[0].value =
                AttrValue::Tensor(Box::new(mpopt_ir::Tensor::from_f32(vec![n as i64, 1], xs)));
            crate::infer_types::InferTypes::default()
                .run(&mut m)
                .unwrap();
            AnalyzeRanges::default().run(&mut m).unwrap();
            m
        };
        let mut m = analyzed(&xs);
        let f = facts(&mut m).expect("the Constant's output has the scan's facts");
        let lo = xs.iter().copied().fold(f32::INFINITY, f32::min);
        assert_eq!((f.min, f.max), (lo, 7.0e4));
        assert_eq!(f.beyond[0].0, 1, "one value beyond f16");
        {
            let g = body(&mut m);
            let (_, node) = g.nodes().next().unwrap();
            let AttrValue::Tensor(t) = &node.attr("value").unwrap().value else {
                panic!("a tensor")
            };
            assert!(f.describes(t), "the facts describe the node's own data");
        }
        // assign-precision keeps the MatMul fp32 for that value (from the facts; a scan would agree)
        AssignPrecision::new(PrecisionOptions::default())
            .run(&mut m)
            .unwrap();
        let mul = |m: &mut Model| {
            let g = body(m);
            let (_, n) = g.nodes().find(|(_, n)| n.op_type == "MatMul").unwrap();
            let p = n.precision.as_ref().unwrap();
            (p.dtype, p.rule.clone())
        };
        assert_eq!(mul(&mut m), (DType::F32, "initializer range".into()));
        // without the overflowing value the Constant goes low, and the conversion drops the facts
        xs[9] = 0.5;
        let mut m = analyzed(&xs);
        assert!(facts(&mut m).is_some());
        AssignPrecision::new(PrecisionOptions::default())
            .run(&mut m)
            .unwrap();
        assert_eq!(mul(&mut m).0, DType::F16);
        InsertCasts::new(DType::F16, IoTypes::Keep)
            .run(&mut m)
            .unwrap();
        let g = body(&mut m);
        let w = g.value_by_name("w").unwrap();
        assert_eq!(g.value(w).elem(), Some(DType::F16));
        assert!(
            facts(&mut m).is_none(),
            "no facts about data the node no longer holds"
        );
    }
}
