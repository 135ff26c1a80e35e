//! `measure-gates`: with calibration data, replaces the flush and underflow gates' guesses by a measurement.
//! Each node that `assign-precision` kept fp32 only because tiny constants would flush to zero or its
//! observed values would underflow runs alone in low precision on the fp32 values of a calibration run; when
//! its outputs are as close to fp32 as rounding alone would leave them, it is decided again without the gate.
//!
//! **Why.** Counting flushed weights cannot tell harmless from harmful: open_nsfw's first convolutions have
//! dead channels (80% of their weight mass below fp16's smallest subnormal) and lose nothing in fp16, while two
//! of ppocrv4_rec's convolutions lose 2-3 times the rounding error. The per-node measurement of
//! `search-precision` tells them apart without an error budget.
//!
//! **Rule.** A gated node is lifted when its relative RMS output error alone in the target type is at most
//! [`LIFT_LIMIT`] times the target's unit roundoff (what storing the output in the target costs, with room for
//! the rounding of its inputs and accumulation). Overflow, schema, user and deny rules are untouched; subgraph
//! nodes keep the static rules.
//!
//! **Check.** Lifting is then verified on the whole model, on every calibration set: the model with the
//! lifted nodes must be no worse than the gated one on any output (top-1 agreement of classifier-shaped
//! outputs not lower, largest absolute error at most 1.25 times and cosine deficit at most 1.25^2 times the
//! gated model's, or within a few roundings of the outputs to the target; no new NaN/Inf). Otherwise nothing
//! is lifted: single nodes that each look harmless can add up (ppocrv4_rec's six convolutions at 0.4-0.75
//! unit roundoffs cost it a text line together). The lifted model runs first: when it is within those
//! roundings by itself, it is no worse than any model, and the gated one is not run.
//!
//! **Invariants.** Annotates only: runs `assign-precision` again with the lifted nodes. Does nothing (and
//! runs nothing) when no node is gated. Deterministic.
//!
//! ```text
//! %c = Conv(%x, %w) : f32[1,32,56,56] ; prec f32: initializer range       (before)
//! %c = Conv(%x, %w) : f32[1,32,56,56] ; prec f16: allow                   (after: sensitivity 2.6e-4)
//! ```

use std::collections::HashMap;

use mpopt_ir::{DType, Model, NodeId};

use crate::assign_precision::{PrecisionOptions, SearchOverrides, unit_roundoff};
use crate::calibrate::InputSet;
use crate::insert_casts::IoTypes;
use crate::search_precision::{
    SearchOptions, by_name, check, convert, decide, decided, node_sensitivity, traced,
};
use crate::{Pass, PassError, PassOutcome, Record};

/// A gated node is lifted when its sensitivity is at most this many unit roundoffs of the target (1.5:
/// open_nsfw's gated convolutions measure 0.5-0.75, ppocrv4_rec's two harmful ones 1.7 and 2.7).
pub const LIFT_LIMIT: f64 = 1.5;

/// The pass.
#[derive(Default)]
pub struct MeasureGates {
    sets: Vec<InputSet>,
    precision: PrecisionOptions,
    io: IoTypes,
    unsafe_fuse: bool,
}

impl MeasureGates {
    /// Measures nodes on the first input set and checks the whole model on all of them, deciding again with
    /// these options (and building trial models with this I/O policy and cast fusion, as the pipeline will).
    pub fn new(
        sets: Vec<InputSet>,
        precision: PrecisionOptions,
        io: IoTypes,
        unsafe_fuse: bool,
    ) -> MeasureGates {
        MeasureGates {
            sets,
            precision,
            io,
            unsafe_fuse,
        }
    }
}

/// Is `b` (lifted) no worse than `a` (gated) on every output? Errors within a few roundings of the outputs to
/// the target (4 `u`, its unit roundoff, relative to the output's peak) count as none.
fn no_worse(
    a: &[mpopt_exec::metrics::OutputMetrics],
    b: &[mpopt_exec::metrics::OutputMetrics],
    u: f64,
) -> bool {
    a.iter().zip(b).all(|(a, b)| {
        let (abs_floor, cos_floor) = rounding_floors(b, u);
        !b.new_non_finite()
            && b.top1.map(|t| t.0) >= a.top1.map(|t| t.0)
            && b.max_abs <= (1.25 * a.max_abs).max(abs_floor)
            && (1.0 - b.cosine) <= (1.5625 * (1.0 - a.cosine)).max(cos_floor)
    })
}

/// The errors that count as none on an output: its largest absolute error within 4 `u` of its peak, and
/// the cosine deficit such errors give (16 `u`^2).
fn rounding_floors(b: &mpopt_exec::metrics::OutputMetrics, u: f64) -> (f64, f64) {
    (4.0 * u * b.peak, 16.0 * u * u)
}

/// Is `b` within a few roundings of the reference on every output: no new NaN/Inf, every classifier row's
/// arg-max kept, and errors inside the floors of [`no_worse`]? Such a model is no worse than any other, so
/// the gated model need not be run to compare with it.
fn within_rounding(b: &[mpopt_exec::metrics::OutputMetrics], u: f64) -> bool {
    b.iter().all(|b| {
        let (abs_floor, cos_floor) = rounding_floors(b, u);
        !b.new_non_finite()
            && b.top1.is_none_or(|(agree, rows)| agree == rows)
            && b.max_abs <= abs_floor
            && (1.0 - b.cosine) <= cos_floor
    })
}

/// Is this decision one of the gates a measurement replaces?
fn gated(p: &mpopt_ir::PrecisionDecision) -> bool {
    p.dtype == DType::F32
        && (p.rule == "range: underflow"
            || p.rule == "initializer range" && p.evidence.contains("would flush"))
}

impl Pass for MeasureGates {
    fn name(&self) -> &'static str {
        "measure-gates"
    }

    fn run(&mut self, model: &mut Model) -> Result<PassOutcome, PassError> {
        let fail = |message: String| PassError::Failed {
            pass: "measure-gates".into(),
            message,
        };
        if self.sets.is_empty() {
            return Err(fail(
                "no calibration data (mpopt: --calib FILE.npz or a folder)".into(),
            ));
        }
        let gates: Vec<NodeId> = model
            .graph
            .nodes()
            .filter(|(_, n)| n.precision.as_deref().is_some_and(gated))
            .map(|(id, _)| id)
            .collect();
        if gates.is_empty() {
            return Ok(PassOutcome::default());
        }
        let target = self.precision.target;
        // the nodes as they would run without the gates
        let relaxed = decided(
            model,
            &self.precision,
            SearchOverrides {
                relax: true,
                ..SearchOverrides::default()
            },
        )?;
        // only the gated nodes' inputs and outputs are needed to measure them: the rest is freed as in a
        // plain run
        let g = &model.graph;
        let keep = gates
            .iter()
            .map(|&id| g.node(id))
            .flat_map(|node| {
                node.inputs()
                    .iter()
                    .chain(node.outputs())
                    .flatten()
                    .chain(node.implicit_inputs())
            })
            .map(|&v| g.value(v).name().to_string())
            .collect();
        let (refs, trace) = traced(model, &self.sets, "measure-gates", keep)?;
        let values = by_name(&trace);
        let limit = LIFT_LIMIT * unit_roundoff(target);
        let measured: Vec<(NodeId, Option<f64>)> = {
            use rayon::prelude::*;
            gates
                .par_iter()
                .map(|&id| {
                    let low = relaxed
                        .graph
                        .node(id)
                        .precision
                        .as_ref()
                        .is_some_and(|p| p.dtype != DType::F32);
                    // a node that stays fp32 without the gate has nothing to measure
                    let s = low
                        .then(|| node_sensitivity(&relaxed, &relaxed.graph, id, &values, target))
                        .flatten();
                    (id, s)
                })
                .collect()
        };
        let mut lift = HashMap::new();
        let mut records = Vec::new();
        for &(id, s) in &measured {
            let Some(s) = s else { continue };
            let ok = s <= limit;
            records.push(Record {
                kind: "gate-measured",
                fields: vec![
                    ("node", mpopt_ir::node_label(&model.graph, id)),
                    ("sensitivity", format!("{s:.4e}")),
                    ("limit", format!("{limit:.4e}")),
                    ("lifted", ok.to_string()),
                ],
            });
            if ok {
                lift.insert(
                    (String::new(), id),
                    format!(
                        "gate lifted by measurement: alone in {target} its outputs' relative RMS error is {s:.2e} <= {LIFT_LIMIT} x unit roundoff"
                    ),
                );
            }
        }
        let mut notes = Vec::new();
        let mut lifted = lift.len() as u64;
        if lifted > 0 {
            // check the whole model: lifted against gated, on every set
            let opts = SearchOptions {
                precision: self.precision.clone(),
                io: self.io.clone(),
                unsafe_fuse: self.unsafe_fuse,
                ..SearchOptions::default()
            };
            let with = SearchOverrides {
                lift,
                ..SearchOverrides::default()
            };
            let (lifted_model, _) = convert(model, &opts, with.clone())?;
            let b = check(&lifted_model, &self.sets, &refs)?;
            let u = unit_roundoff(target);
            // the gated model is run only when the lifted one is not plainly within rounding
            let a = if within_rounding(&b, u) {
                None
            } else {
                let (gated_model, _) = convert(model, &opts, SearchOverrides::default())?;
                Some(check(&gated_model, &self.sets, &refs)?)
            };
            if let Some(a) = a.filter(|a| !no_worse(a, &b, u)) {
                notes.push(format!(
                    "{lifted} nodes measured harmless alone, but lifting them all made the outputs worse (top-1 agreement {} -> {}, max abs error {:.3e} -> {:.3e}, cosine {:.6} -> {:.6}): none lifted",
                    a.iter().filter_map(|x| x.top1).map(|t| t.0).sum::<usize>(),
                    b.iter().filter_map(|x| x.top1).map(|t| t.0).sum::<usize>(),
                    a.iter().fold(0f64, |m, x| m.max(x.max_abs)),
                    b.iter().fold(0f64, |m, x| m.max(x.max_abs)),
                    a.iter().fold(1f64, |m, x| m.min(x.cosine)),
                    b.iter().fold(1f64, |m, x| m.min(x.cosine)),
                ));
                lifted = 0;
            } else {
                decide(model, &self.precision, with)?;
            }
        }
        Ok(PassOutcome {
            changed: lifted > 0,
            counters: vec![
                ("gated nodes", gates.len() as u64),
                ("measured", records.len() as u64),
                ("lifted", lifted),
            ],
            notes: {
                notes.push(format!(
                    "{lifted} of {} gated nodes measured harmless in {target} and lifted",
                    gates.len()
                ));
                notes
            },
            records,
        })
    }
}

#[cfg(test)]
mod tests {
    use mpopt_exec::Value;
    use mpopt_exec::metrics::OutputMetrics;

    use super::{no_worse, within_rounding};
    use crate::assign_precision::unit_roundoff;

    /// Metrics of a `[2, 4]` classifier-shaped output: reference values, candidate values.
    fn metrics(r: &[f32], c: &[f32]) -> OutputMetrics {
        let t = |x: &[f32]| Value::Tensor(mpopt_exec::Tensor::f32(vec![2, 4], x.to_vec()));
        let mut m = OutputMetrics::new("y");
        m.add(&t(r), &t(c), 0.0, 0.0);
        m
    }

    #[test]
    fn a_model_within_rounding_is_no_worse_than_any_other() {
        let u = unit_roundoff(mpopt_ir::DType::F16);
        let r = [4.0, 1.0, -2.0, 0.5, 0.25, 3.0, 1.5, -1.0];
        // errors of one f16 rounding of the peak (4): within rounding
        let near: Vec<f32> = r.iter().map(|&x| x + (u * 4.0) as f32).collect();
        let b = [metrics(&r, &near)];
        assert!(within_rounding(&b, u));
        // against a perfect gated model, one with small errors and one with a flipped row: never worse
        let flipped = [4.0, 1.0, -2.0, 0.5, 3.5, 3.0, 1.5, -1.0];
        let small: Vec<f32> = r.iter().map(|&x| x * (1.0 + 0.5 * u as f32)).collect();
        for a in [&r[..], &small, &flipped] {
            assert!(no_worse(&[metrics(&r, a)], &b, u));
        }
        // past rounding: an error of 0.1 on the peak, a flipped row, a new infinity
        let mut far = r;
        far[0] += 0.1;
        let mut inf = near.clone();
        inf[3] = f32::INFINITY;
        for c in [&far[..], &flipped, &inf] {
            assert!(!within_rounding(&[metrics(&r, c)], u), "{c:?}");
        }
        // and a perfect gated model is then the one to compare with
        assert!(!no_worse(&[metrics(&r, &r)], &[metrics(&r, &far)], u));
    }
}
