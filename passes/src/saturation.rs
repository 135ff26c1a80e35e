//! Overflow that a saturating activation absorbs: `assign-precision`'s exemption from the range gate for the
//! cube of the tanh-approximated GELU and its kind.
//!
//! `0.5 * x * (1 + tanh(0.798 * (x + 0.0447 * x^3)))`: for |x| past about 113 the cube leaves fp16's range
//! (magika's second GELU reaches 1.0e5), and the range gate would keep the whole activation fp32. In fp16
//! the cube becomes ±inf; `x + inf` is inf, `0.798 * inf` is inf, and `tanh(±inf)` is ±1: exactly what
//! tanh of the true argument (beyond ±9) rounds to. The overflow changes no value that leaves the chain.
//!
//! A chain qualifies when, walking back from the saturating op's input, every value has one reader (the next
//! op of the chain) and is no graph output, and each op is:
//! - `Mul` by a constant whose elements are all finite and non-zero in the target type (magnitude scaled by
//!   at least its smallest element; a zero would turn inf into NaN), or `Div` by such a constant (scaled by
//!   at least one over its largest);
//! - `Add` or `Sub` of a value bounded within the target's range (the magnitude drops by at most its bound;
//!   inf minus a finite value is still inf, never NaN), or `Neg`;
//! - the start, whose output may overflow: `Mul`, `Add`, `Sub` or `Pow` (by a constant exponent of at least
//!   1) of values bounded within the target's range, which overflow to ±inf and never give NaN.
//!
//! If the chain first overflows at any of its ops, the true argument of the saturating op is still at least
//! the worst case of the rest of the chain applied to the target's largest finite value; that must pass the
//! op's saturation point (the argument beyond which its low-precision result is exactly its limit: 9 for
//! Tanh, 4 for Erf, 18 for Sigmoid, whose low side must round to 0). The sign of an overflowed value is
//! the true value's, so the limit is the right one.
//!
//! Invariants: only default-domain ops; bounded work (at most 32 ops per chain); the bounds are the ones the
//! range gate uses (proven, or observed times the margin), so the other operands stay judged by the gate.

use std::collections::{HashMap, HashSet};

use mpopt_ir::{DType, Graph, NodeId, ValueId};

use crate::assign_precision::{magnitude, max_finite, min_positive};
use crate::range_rules::constant_of;

/// Values whose magnitudes are saturated rather than computed, and the nodes whose range gate leaves them
/// out: the chains of [`saturated_overflow`], and the paths of `assign-precision`'s additive attention
/// masks. The gate still judges those nodes' other values.
#[derive(Default)]
pub(crate) struct Saturated {
    /// The nodes concerned, with the evidence for the report.
    pub nodes: HashMap<NodeId, String>,
    /// The saturated values.
    pub values: HashSet<ValueId>,
}

impl Saturated {
    /// The values of `node` left for the range gate, and the evidence to add, when `node` is concerned.
    pub fn exempt<'s>(
        &'s self,
        node: NodeId,
        values: &mut Vec<(ValueId, bool)>,
    ) -> Option<&'s str> {
        let ev = self.nodes.get(&node)?;
        values.retain(|(v, _)| !self.values.contains(v));
        Some(ev)
    }
}

/// The argument magnitude beyond which a saturating op's fp16 result is exactly its limit.
fn saturation_point(op: &str) -> Option<f64> {
    match op {
        // 1 - tanh(x) < 2^-12 (half an ulp below 1) from x = 4.5
        "Tanh" => Some(9.0),
        // 1 - erf(x) < 2^-12 from x = 2.6
        "Erf" => Some(4.0),
        // sigmoid(-x) < 2^-25 (half the smallest subnormal) from x = 17.4
        "Sigmoid" => Some(18.0),
        _ => None,
    }
}

/// How one op of a chain moves a magnitude, at worst.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// Multiplied by at least this.
    Scale(f64),
    /// Lowered by at most this.
    Shift(f64),
}

/// The smallest and largest magnitudes of a float constant, when every element is finite, non-zero and
/// representable (neither overflowing nor flushing) in the target.
fn constant_scale(g: &Graph, v: ValueId, target: DType) -> Option<(f64, f64)> {
    let vals = constant_of(g, v)?.values_f64(4096)?;
    if vals.is_empty() || vals.len() >= 4096 {
        return None;
    }
    let (mut lo, mut hi) = (f64::INFINITY, 0f64);
    for x in vals {
        let a = x.abs();
        if !a.is_finite() || a < min_positive(target) || a > max_finite(target) {
            return None;
        }
        lo = lo.min(a);
        hi = hi.max(a);
    }
    Some((lo, hi))
}

/// The magnitude bound of a value if it lies within the target's range (constants included).
fn bounded(g: &Graph, v: ValueId, target: DType, margin: f64) -> Option<f64> {
    let b = match constant_of(g, v).and_then(crate::range_rules::const_interval) {
        Some(iv) if iv.is_bounded() => iv.abs_max(),
        _ => magnitude(g, v, margin)?.0,
    };
    (b <= max_finite(target)).then_some(b)
}

/// One op walking back from a chain value: Some((step, the chain operand)) for a passing op, Some((None,
/// _)) for a start, None when the chain breaks.
fn classify(
    g: &Graph,
    p: NodeId,
    target: DType,
    margin: f64,
) -> Option<(Option<Step>, Option<ValueId>)> {
    let node = g.node(p);
    if !node.in_default_domain() || node.outputs().len() != 1 {
        return None;
    }
    let ins: Vec<ValueId> = node.inputs().iter().flatten().copied().collect();
    let inb: Vec<Option<f64>> = ins.iter().map(|&v| bounded(g, v, target, margin)).collect();
    let all_bounded = inb.iter().all(Option::is_some);
    match (node.op_type.as_str(), ins.len()) {
        ("Neg", 1) if !all_bounded => Some((Some(Step::Scale(1.0)), Some(ins[0]))),
        ("Mul", 2) => {
            for (c, o) in [(1, 0), (0, 1)] {
                if inb[o].is_none()
                    && let Some((lo, _)) = constant_scale(g, ins[c], target)
                {
                    return Some((Some(Step::Scale(lo)), Some(ins[o])));
                }
            }
            all_bounded.then_some((None, None))
        }
        ("Div", 2) => {
            if inb[0].is_none() {
                let (_, hi) = constant_scale(g, ins[1], target)?;
                return Some((Some(Step::Scale(1.0 / hi)), Some(ins[0])));
            }
            None
        }
        ("Add" | "Sub", 2) => match (inb[0], inb[1]) {
            (Some(_), Some(_)) => Some((None, None)),
            (None, Some(b)) => Some((Some(Step::Shift(b)), Some(ins[0]))),
            (Some(b), None) => Some((Some(Step::Shift(b)), Some(ins[1]))),
            (None, None) => None,
        },
        ("Pow", 2) if inb[0].is_some() => {
            let e = constant_of(g, ins[1])?.values_f64(16)?;
            (!e.is_empty() && e.len() < 16 && e.iter().all(|&k| k.is_finite() && k >= 1.0))
                .then_some((None, None))
        }
        _ => None,
    }
}

/// Finds the chains whose overflow a saturating op absorbs (see the module doc). O(nodes), at most 32 ops
/// walked per saturating op.
pub(crate) fn saturated_overflow(g: &Graph, target: DType, margin: f64) -> Saturated {
    let max = max_finite(target);
    let mut out = Saturated::default();
    for (s, node) in g.nodes() {
        let Some(point) = saturation_point(&node.op_type) else {
            continue;
        };
        if !node.in_default_domain() {
            continue;
        }
        let Some(&Some(x)) = node.inputs().first() else {
            continue;
        };
        if bounded(g, x, target, margin).is_some() {
            continue; // nothing to absorb
        }
        // walk back: the chain's nodes (saturating op first) and the steps after the start
        let (mut chain, mut values, mut steps) = (vec![s], Vec::new(), Vec::new());
        let mut cur = x;
        let found = loop {
            if chain.len() > 32 || g.uses(cur).len() != 1 || g.outputs().contains(&cur) {
                break false;
            }
            let Some((p, _)) = g.producer(cur) else {
                break false;
            };
            values.push(cur);
            chain.push(p);
            match classify(g, p, target, margin) {
                Some((None, _)) => break true,
                Some((Some(step), Some(next))) => {
                    steps.push(step);
                    cur = next;
                }
                _ => break false,
            }
        };
        if !found {
            continue;
        }
        // worst case over where the overflow first happens: from the start forward
        let mut low = max;
        for step in steps.iter().rev() {
            low = match *step {
                Step::Scale(c) => low * c,
                Step::Shift(b) => low - b,
            }
            .min(max);
        }
        if low < point {
            continue;
        }
        let xname = g.value(x).name();
        let sname = mpopt_ir::node_label(g, s);
        let ev = format!(
            "saturated overflow: '{xname}' may leave the {target} range, but reaches only {sname} through \
             {} ops that keep ±inf signed (no NaN); an overflowed argument is still >= {} in magnitude, past \
             {point}, where {} in {target} is exactly its limit",
            chain.len() - 1,
            mpopt_ir::range_short(low),
            node.op_type
        );
        for &n in &chain {
            out.nodes.entry(n).or_insert_with(|| ev.clone());
        }
        out.values.extend(values);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use mpopt_ir::{Interval, ValueRange};

    /// The tanh-GELU tail `tanh(s * (h + cube))` with `cube` unbounded and `h` within +-200, `s` and the
    /// saturating op given; returns the names of the nodes found on chains.
    fn found(s: &str, op: &str, extra: &str) -> Vec<String> {
        let src = format!(
            "graph @t(%h: f32[4], %sq: f32[4], %big: f32[4]) -> (%y: f32[4]{extra_out}) {{
  %s = const f32[2] [{s}]
  %cube = Mul(%h, %sq)
  %inner = Add(%h, %cube)
  %arg = Mul(%s, %inner)
  %y = {op}(%arg)
{extra}}}",
            extra_out = if extra.is_empty() { "" } else { ", %e: f32[4]" },
        );
        let mut g = mpopt_ir::text::parse_graph(&src).unwrap();
        for (name, lo, hi) in [
            ("h", -200.0, 200.0),
            ("sq", 0.0, 2000.0),
            ("big", -1e9, 1e9),
            ("cube", -4e5, 4e5),
            ("inner", -4e5, 4e5),
            ("arg", -3e5, 3e5),
        ] {
            let v = g.value_by_name(name).unwrap();
            g.value_mut(v).range = Some(Box::new(ValueRange {
                proven: Some(Interval::new(lo, hi)),
                observed: None,
                ..Default::default()
            }));
        }
        let sat = saturated_overflow(&g, DType::F16, 8.0);
        let mut names: Vec<String> = sat
            .nodes
            .keys()
            .map(|&n| g.value(g.node(n).outputs()[0].unwrap()).name().to_string())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn the_gelu_cube_is_absorbed_by_tanh() {
        assert_eq!(
            found("0.7978846, 0.5", "Tanh", ""),
            ["arg", "cube", "inner", "y"]
        );
    }

    #[test]
    fn a_zero_multiplier_breaks_the_chain() {
        // 0 * inf is NaN
        assert!(found("0.7978846, 0.0", "Tanh", "").is_empty());
    }

    #[test]
    fn a_multiplier_that_shrinks_an_overflow_below_the_saturation_point_breaks_the_chain() {
        // 65504 * 1e-4 = 6.5 < 9: tanh of the true argument need not round to 1
        assert!(found("1e-4, 1e-4", "Tanh", "").is_empty());
        // Sigmoid needs 18, Erf only 4
        assert!(found("2e-4, 2e-4", "Sigmoid", "").is_empty());
        assert_eq!(found("2e-4, 2e-4", "Erf", "").len(), 4);
        // the start's output is on the chain; its inputs are not
        assert!(!found("0.7978846, 0.5", "Tanh", "").contains(&"h".to_string()));
    }

    #[test]
    fn a_second_reader_or_an_unbounded_addend_breaks_the_chain() {
        assert!(found("0.7978846, 0.5", "Tanh", "  %e = Relu(%inner)\n").is_empty());
        let src = "graph @t(%h: f32[4], %sq: f32[4], %big: f32[4]) -> (%y: f32[4]) {
  %cube = Mul(%h, %sq)
  %inner = Add(%big, %cube)
  %y = Tanh(%inner)
}";
        let mut g = mpopt_ir::text::parse_graph(src).unwrap();
        for (name, b) in [("h", 200.0), ("sq", 2000.0), ("big", 1e9), ("inner", 1e9)] {
            let v = g.value_by_name(name).unwrap();
            g.value_mut(v).range = Some(Box::new(ValueRange {
                proven: Some(Interval::new(-b, b)),
                observed: None,
                ..Default::default()
            }));
        }
        // inf + -inf is NaN: an addend that may overflow too is no chain
        assert!(saturated_overflow(&g, DType::F16, 8.0).nodes.is_empty());
    }

    #[test]
    fn a_bounded_argument_needs_no_exemption() {
        let src = "graph @t(%h: f32[4]) -> (%y: f32[4]) {
  %y = Tanh(%h)
}";
        let mut g = mpopt_ir::text::parse_graph(src).unwrap();
        let v = g.value_by_name("h").unwrap();
        g.value_mut(v).range = Some(Box::new(ValueRange {
            proven: Some(Interval::new(-5.0, 5.0)),
            observed: None,
            ..Default::default()
        }));
        assert!(saturated_overflow(&g, DType::F16, 8.0).nodes.is_empty());
    }
}
