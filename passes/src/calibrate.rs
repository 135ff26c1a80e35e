//! `calibrate`: runs the model in fp32 on the CPU reference executor over calibration inputs and records, per
//! value of the main graph, what it held: min, max, largest magnitude, and how many non-zero values would
//! become zero or subnormal in the target type.
//!
//! **Why.** Static intervals are sound but loose through deep stacks of layers; what a model really computes
//! on representative inputs is the other half of the evidence (magika's `ReduceSum` reaches 3.07e5 on real
//! files, beyond fp16). `assign-precision` keeps a node fp32 when an observed value, times a safety margin,
//! leaves the target's range, or when too many of its values would underflow.
//!
//! **Invariants.** Annotates only ([`mpopt_ir::Value::range`], the `observed` part; the `proven` part is
//! kept). Runs on the model as it is: put it before `assign-precision`, on the fp32 graph. Values are
//! streamed to the statistics as the executor produces them, so memory stays that of one run. Values inside
//! subgraphs are not observed (their bodies run many times with changing shapes).
//!
//! ```text
//! %s = ReduceSum(%x, %axes) : f32[1,1]   ; range [-inf, inf] obs [1.2e3, 3.07e5]
//! ```

use std::collections::HashMap;

use mpopt_exec::{Data, Executor, RunOptions, Value};
use mpopt_ir::{DType, Model, Observed, ValueRange};

use crate::assign_precision::{min_normal, min_positive, unit_roundoff};
use crate::{Pass, PassError, PassOutcome};

/// One calibration input set: (graph input name, value).
pub type InputSet = Vec<(String, Value)>;

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

/// Adds one tensor's elements to a value's statistics.
fn observe(o: &mut Observed, xs: &[f32], target: DType) {
    let tiny = (min_positive(target) / 2.0) as f32;
    let normal = min_normal(target) as f32;
    if o.count == 0 {
        o.min = f64::INFINITY;
        o.max = f64::NEG_INFINITY;
    }
    let (mut lo, mut hi, mut am) = (f32::INFINITY, f32::NEG_INFINITY, 0f32);
    for &x in xs {
        if x.is_finite() {
            lo = lo.min(x);
            hi = hi.max(x);
            am = am.max(x.abs());
        } else {
            o.non_finite += 1;
        }
    }
    // values below this vanish next to the tensor's largest ones in any precision
    let significant = am * unit_roundoff(target) as f32;
    for &x in xs {
        let a = x.abs();
        if a != 0.0 && a.is_finite() {
            o.nonzero += 1;
            if a < normal {
                if a < tiny {
                    o.to_zero += 1;
                } else {
                    o.to_subnormal += 1;
                }
                o.lost += u64::from(a > significant);
            }
        }
    }
    o.count += xs.len() as u64;
    o.min = o.min.min(lo as f64);
    o.max = o.max.max(hi as f64);
    o.abs_max = o.abs_max.max(am as f64);
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
        let mut stats: HashMap<String, Observed> = HashMap::new();
        {
            let exec =
                Executor::new(model).map_err(|e| fail(format!("cannot run the model: {e}")))?;
            let target = self.target;
            for (k, set) in self.sets.iter().enumerate() {
                let mut see = |name: &str, v: &Value| {
                    let Value::Tensor(t) = v else { return };
                    if !t.data.is_float() {
                        return;
                    }
                    let o = match stats.get_mut(name) {
                        Some(o) => o,
                        None => stats.entry(name.to_string()).or_default(),
                    };
                    match &t.data {
                        Data::F32(x) => observe(o, x, target),
                        Data::F16(x) => {
                            observe(o, &x.iter().map(|v| v.to_f32()).collect::<Vec<_>>(), target)
                        }
                        Data::BF16(x) => {
                            observe(o, &x.iter().map(|v| v.to_f32()).collect::<Vec<_>>(), target)
                        }
                        Data::F64(x) => {
                            observe(o, &x.iter().map(|&v| v as f32).collect::<Vec<_>>(), target)
                        }
                        _ => {}
                    }
                };
                exec.run_observed(set.clone(), &RunOptions::default(), &mut see)
                    .map_err(|e| fail(format!("input set {k}: {e}")))?;
            }
        }
        let g = &mut model.graph;
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
        Ok(PassOutcome {
            changed: recorded > 0,
            counters: vec![
                ("input sets", self.sets.len() as u64),
                ("values observed", recorded),
            ],
            notes: Vec::new(),
            records: Vec::new(),
        })
    }
}
