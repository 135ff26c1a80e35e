//! `calibrate`: runs the model in fp32 on the CPU reference executor over calibration inputs and records, per
//! value, subgraphs included, what it held: min, max, largest magnitude, and how many non-zero values would
//! become zero or subnormal in the target type.
//!
//! **Why.** Static intervals are sound but loose through deep stacks of layers; what a model really computes
//! on representative inputs is the other half of the evidence (magika's `ReduceSum` reaches 3.07e5 on real
//! files, beyond fp16). `assign-precision` keeps a node fp32 when an observed value, times a safety margin,
//! leaves the target's range, or when too many of its values would underflow.
//!
//! **Invariants.** Annotates only ([`mpopt_ir::Value::range`], the `observed` part; the `proven` part is
//! kept). Runs on the model as it is: put it before `assign-precision`, on the fp32 graph. Values are
//! streamed to the statistics as the executor produces them, so memory stays that of one run. A subgraph's
//! values are observed over every run of the body (each `Loop` iteration, the `If` branch taken); a branch
//! that never runs on the calibration data gets no observations, and its decisions rest on the static facts.
//!
//! ```text
//! %s = ReduceSum(%x, %axes) : f32[1,1]   ; range [-inf, inf] obs [1.2e3, 3.07e5]
//! ```

use std::collections::HashMap;

use mpopt_exec::{Data, Executor, RunOptions, Value};
use mpopt_ir::{DType, Graph, Model, Observed, ValueRange};

use crate::assign_precision::{min_normal, min_positive, unit_roundoff};
use crate::{Pass, PassError, PassOutcome};

/// One calibration input set: (graph input name, value).
pub type InputSet = Vec<(String, Value)>;

/// A note for each float input of a set that holds NaN: NaN has no range, so calibration learns nothing from
/// those elements, and a search judges nothing where the reference is NaN. Calibration data with NaN is
/// usually a mistake (an unfilled buffer, a failed preprocessing step), worth saying.
pub(crate) fn nan_inputs(sets: &[InputSet]) -> Vec<String> {
    let mut notes = Vec::new();
    for (k, set) in sets.iter().enumerate() {
        for (name, v) in set {
            let Ok(t) = v.tensor() else { continue };
            let nan = crate::search_precision::nan_count(t);
            if nan > 0 {
                notes.push(format!(
                    "input set {k}: input '{name}' holds {nan} NaN of {} values",
                    t.len()
                ));
            }
        }
    }
    notes
}

/// The pass.
pub struct Calibrate {
    sets: Vec<InputSet>,
    target: DType,
}

impl Calibrate {
    /// Calibrates on these input sets, counting underflow against `target` (f16 or bf16).
    pub fn new(sets: Vec<InputSet>, target: DType) -> Calibrate {
        Calibrate { sets, target }
    }
}

impl Default for Calibrate {
    fn default() -> Self {
        Calibrate::new(Vec::new(), DType::F16)
    }
}

/// Partial statistics of a block of values.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Part {
    lo: f32,
    hi: f32,
    am: f32,
    non_finite: u64,
    nonzero: u64,
    /// Non-zero values below the target's smallest normal.
    small: u64,
    /// Of those, the values below `tiny`, which flush to zero.
    tiny: u64,
}

impl Part {
    const EMPTY: Part = Part {
        lo: f32::INFINITY,
        hi: f32::NEG_INFINITY,
        am: 0.0,
        non_finite: 0,
        nonzero: 0,
        small: 0,
        tiny: 0,
    };

    /// One block's statistics (at most `u32::MAX` elements). Written in eight lanes with selects instead
    /// of branches, so that it vectorizes: calibration and the search's reference run pass every element
    /// of every value through here.
    fn of(xs: &[f32], normal: f32, tiny: f32) -> Part {
        const L: usize = 8;
        let floats = ([f32::INFINITY; L], [f32::NEG_INFINITY; L], [0f32; L]);
        let counts = ([0u32; L], [0u32; L], [0u32; L], [0u32; L]);
        type State = (
            ([f32; L], [f32; L], [f32; L]),
            ([u32; L], [u32; L], [u32; L], [u32; L]),
        );
        let lane = |st: &mut State, j: usize, x: f32| {
            let ((lo, hi, am), (non_finite, nonzero, small, flushed)) = st;
            let a = x.abs();
            // false for inf and NaN
            let finite = a <= f32::MAX;
            let (xl, xh, xa) = if finite {
                (x, x, a)
            } else {
                (f32::INFINITY, f32::NEG_INFINITY, 0.0)
            };
            lo[j] = if xl < lo[j] { xl } else { lo[j] };
            hi[j] = if xh > hi[j] { xh } else { hi[j] };
            am[j] = if xa > am[j] { xa } else { am[j] };
            non_finite[j] += u32::from(!finite);
            nonzero[j] += u32::from(finite & (a != 0.0));
            small[j] += u32::from((a != 0.0) & (a < normal));
            flushed[j] += u32::from((a != 0.0) & (a < tiny));
        };
        let ((lo, hi, am), (non_finite, nonzero, small, flushed)) =
            crate::range_rules::lanes(xs, (floats, counts), lane);
        let mut p = Part::EMPTY;
        for j in 0..L {
            p.lo = p.lo.min(lo[j]);
            p.hi = p.hi.max(hi[j]);
            p.am = p.am.max(am[j]);
            p.non_finite += u64::from(non_finite[j]);
            p.nonzero += u64::from(nonzero[j]);
            p.small += u64::from(small[j]);
            p.tiny += u64::from(flushed[j]);
        }
        p
    }

    fn join(a: Part, b: Part) -> Part {
        Part {
            lo: a.lo.min(b.lo),
            hi: a.hi.max(b.hi),
            am: a.am.max(b.am),
            non_finite: a.non_finite + b.non_finite,
            nonzero: a.nonzero + b.nonzero,
            small: a.small + b.small,
            tiny: a.tiny + b.tiny,
        }
    }
}

/// A block's non-zero values below `normal` and above `significant` (at most `u32::MAX` of them): the
/// underflowing values that are not negligible next to the tensor's largest. In eight lanes without
/// branches, so that it vectorizes.
fn lost(xs: &[f32], normal: f32, significant: f32) -> u64 {
    const L: usize = 8;
    let lane = |l: &mut [u32; L], j: usize, x: f32| {
        let a = x.abs();
        l[j] += u32::from((a != 0.0) & (a < normal) & (a > significant));
    };
    let l = crate::range_rules::lanes(xs, [0u32; L], lane);
    l.iter().map(|&k| u64::from(k)).sum()
}

/// Adds one tensor's elements to a value's statistics (in parallel blocks: calibration sees every value of
/// every run).
fn observe(o: &mut Observed, xs: &[f32], target: DType) {
    use rayon::prelude::*;
    const BLOCK: usize = 1 << 16;
    let tiny = (min_positive(target) / 2.0) as f32;
    let normal = min_normal(target) as f32;
    if o.count == 0 {
        o.min = f64::INFINITY;
        o.max = f64::NEG_INFINITY;
    }
    let p = xs
        .par_chunks(BLOCK)
        .map(|c| Part::of(c, normal, tiny))
        .reduce(|| Part::EMPTY, Part::join);
    o.non_finite += p.non_finite;
    o.nonzero += p.nonzero;
    o.to_zero += p.tiny;
    o.to_subnormal += p.small - p.tiny;
    // Values below this vanish next to the tensor's largest ones in any precision: the lost values are the
    // underflowing ones above it. A second pass, only when some value underflows and the bound is below the
    // smallest normal (a largest value under 1/8 in f16): otherwise no underflowing value is above it. On
    // ppocrv4_rec's calibration that pass had run on most values (a few small ones among many).
    let significant = p.am * unit_roundoff(target) as f32;
    if p.small > 0 && significant < normal {
        o.lost += xs
            .par_chunks(BLOCK)
            .map(|c| lost(c, normal, significant))
            .sum::<u64>();
    }
    o.count += xs.len() as u64;
    o.min = o.min.min(p.lo as f64);
    o.max = o.max.max(p.hi as f64);
    o.abs_max = o.abs_max.max(p.am as f64);
}

/// Statistics of the values of runs, by (scope, name) (see [`mpopt_exec::subgraph_scope`]), until they are
/// stored on the model.
pub(crate) struct Observations {
    stats: HashMap<(String, String), Observed>,
    target: DType,
}

impl Observations {
    /// No observations yet; underflow is counted against `target`.
    pub(crate) fn new(target: DType) -> Observations {
        Observations {
            stats: HashMap::new(),
            target,
        }
    }

    /// Adds a value (float tensors only) of the graph with scope key `scope` to the statistics of its name.
    pub(crate) fn see(&mut self, scope: &str, name: &str, v: &Value) {
        let Value::Tensor(t) = v else { return };
        if !t.data.is_float() {
            return;
        }
        let key = (scope.to_string(), name.to_string());
        let o = self.stats.entry(key).or_default();
        let target = self.target;
        match &t.data {
            Data::F32(x) => observe(o, x, target),
            Data::F16(x) => observe(o, &x.iter().map(|v| v.to_f32()).collect::<Vec<_>>(), target),
            Data::BF16(x) => observe(o, &x.iter().map(|v| v.to_f32()).collect::<Vec<_>>(), target),
            Data::F64(x) => observe(o, &x.iter().map(|&v| v as f32).collect::<Vec<_>>(), target),
            _ => {}
        }
    }

    /// Stores the statistics on the values they were taken from (initializers excepted), subgraphs
    /// included; returns how many values got them.
    pub(crate) fn store(mut self, model: &mut Model) -> u64 {
        let mut by_scope: HashMap<String, Vec<(String, Observed)>> = HashMap::new();
        for ((scope, name), o) in self.stats.drain() {
            by_scope.entry(scope).or_default().push((name, o));
        }
        store_graph(&mut model.graph, "", &mut by_scope, &HashMap::new())
    }
}

/// Stores the statistics of scope `scope` on `g`'s values, then those of its subgraphs. `outer` holds the
/// statistics of the enclosing graphs' values by name: `g`'s captures of them get them too.
fn store_graph(
    g: &mut Graph,
    scope: &str,
    by_scope: &mut HashMap<String, Vec<(String, Observed)>>,
    outer: &HashMap<String, Observed>,
) -> u64 {
    let mut recorded = 0u64;
    for c in g.captures().to_vec() {
        if let Some(o) = outer.get(g.value(c).name()) {
            let r = g
                .value_mut(c)
                .range
                .get_or_insert_with(Box::<ValueRange>::default);
            r.observed = Some(*o);
        }
    }
    let own = by_scope.remove(scope).unwrap_or_default();
    if by_scope.is_empty() {
        return recorded + store_values(g, own);
    }
    let mut visible = outer.clone();
    visible.extend(own.iter().cloned());
    recorded += store_values(g, own);
    g.for_each_subgraph_mut(|n, attr, sg| {
        let key = mpopt_exec::subgraph_scope(scope, n, attr);
        recorded += store_graph(sg, &key, by_scope, &visible);
    });
    recorded
}

/// Stores statistics on `g`'s values by name (initializers excepted); returns how many got them.
fn store_values(g: &mut Graph, stats: Vec<(String, Observed)>) -> u64 {
    let mut recorded = 0u64;
    for (name, o) in stats {
        let Some(v) = g.value_by_name(&name) else {
            continue;
        };
        let val = g.value_mut(v);
        if val.initializer.is_some() {
            continue;
        }
        let r = val.range.get_or_insert_with(Box::<ValueRange>::default);
        r.observed = Some(o);
        recorded += 1;
    }
    recorded
}

impl Pass for Calibrate {
    fn name(&self) -> &'static str {
        "calibrate"
    }

    fn run(&mut self, model: &mut Model) -> Result<PassOutcome, PassError> {
        let fail = |message: String| PassError::Failed {
            pass: "calibrate".into(),
            message,
        };
        if self.sets.is_empty() {
            return Err(fail(
                "no calibration data: give input sets (mpopt: --calib FILE.npz or a folder of .npz files)"
                    .into(),
            ));
        }
        let mut obs = Observations::new(self.target);
        {
            let exec =
                Executor::new(model).map_err(|e| fail(format!("cannot run the model: {e}")))?;
            for (k, set) in self.sets.iter().enumerate() {
                exec.run_observed(set.clone(), &RunOptions::default(), &mut |s, n, v| {
                    obs.see(s, n, v)
                })
                .map_err(|e| fail(format!("input set {k}: {e}")))?;
            }
        }
        let recorded = obs.store(model);
        let notes = nan_inputs(&self.sets);
        Ok(PassOutcome {
            changed: recorded > 0,
            counters: vec![
                ("input sets", self.sets.len() as u64),
                ("values observed", recorded),
            ],
            notes,
            records: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{Part, lost, nan_inputs};
    use mpopt_exec::{Tensor, Value};

    #[test]
    fn nan_inputs_are_said() {
        let sets = vec![
            vec![
                (
                    "x".to_string(),
                    Value::Tensor(Tensor::f32(vec![3], vec![1.0, f32::NAN, 2.0])),
                ),
                (
                    "ids".to_string(),
                    Value::Tensor(Tensor::i64(vec![2], vec![1, 2])),
                ),
            ],
            vec![(
                "x".to_string(),
                Value::Tensor(Tensor::f32(vec![2], vec![0.5, 1.0])),
            )],
        ];
        assert_eq!(
            nan_inputs(&sets),
            ["input set 0: input 'x' holds 1 NaN of 3 values"]
        );
    }

    /// The statistics element by element, with branches: what the eight-lane version must equal.
    fn reference(xs: &[f32], normal: f32, tiny: f32) -> Part {
        let mut p = Part::EMPTY;
        for &x in xs {
            if x.is_finite() {
                p.lo = p.lo.min(x);
                p.hi = p.hi.max(x);
                p.am = p.am.max(x.abs());
                if x != 0.0 {
                    p.nonzero += 1;
                    if x.abs() < normal {
                        p.small += 1;
                    }
                    if x.abs() < tiny {
                        p.tiny += 1;
                    }
                }
            } else {
                p.non_finite += 1;
            }
        }
        p
    }

    #[test]
    fn block_statistics_match_the_element_by_element_ones() {
        let (normal, tiny) = (6.1e-5, 3.0e-8);
        let value = |i: usize| match i % 13 {
            0 => f32::NAN,
            1 => f32::NEG_INFINITY,
            2 => 0.0,
            3 => -1e-6,
            4 => 3e-5,
            5 => -1e-9,
            _ => (i as f32 * 0.37).sin() * (i as f32),
        };
        // lengths that leave every remainder of the eight lanes, and one block of only non-finite values
        for n in [0usize, 1, 2, 7, 8, 9, 15, 64, 1000, 1003] {
            let xs: Vec<f32> = (0..n).map(value).collect();
            assert_eq!(
                Part::of(&xs, normal, tiny),
                reference(&xs, normal, tiny),
                "n={n}"
            );
        }
        // the underflow counts, against the same loop with branches
        let significant = 1e-6;
        let xs: Vec<f32> = (0..1003)
            .map(|i| match i % 7 {
                0 => 1e-9,
                1 => -2e-7,
                2 => 5e-5,
                3 => 0.0,
                4 => f32::NAN,
                _ => (i as f32).sin() * 1e-4,
            })
            .collect();
        let (mut z, mut s, mut l) = (0u64, 0u64, 0u64);
        for &x in &xs {
            let a = x.abs();
            if a != 0.0 && a < normal {
                z += u64::from(a < tiny);
                s += u64::from(a >= tiny);
                l += u64::from(a > significant);
            }
        }
        assert!(
            z > 0 && s > 0 && l > 0 && l < s,
            "the sample covers every case"
        );
        let p = Part::of(&xs, normal, tiny);
        assert_eq!((p.tiny, p.small - p.tiny), (z, s));
        assert_eq!(lost(&xs, normal, significant), l);
        let bad = [f32::NAN, f32::INFINITY, f32::NAN];
        assert_eq!(Part::of(&bad, normal, tiny), reference(&bad, normal, tiny));
        assert_eq!(Part::of(&bad, normal, tiny).non_finite, 3);
    }
}
