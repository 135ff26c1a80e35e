//! How far a candidate model's outputs are from a reference's: the metrics `mpopt compare` prints and the
//! precision search (`--tolerance`) budgets.
//!
//! One [`OutputMetrics`] per graph output gathers every input set: the largest absolute and relative errors,
//! the smallest cosine similarity, NaN/Inf counts, top-1 agreement over the last axis for classifier-shaped
//! outputs, and for each such row how close it came to flipping its arg-max.

use mpopt_ir::{DType, Model};

use crate::{Tensor, Value};

/// Metrics of one output over every input set seen.
#[derive(serde::Serialize, Default, Clone, Debug)]
pub struct OutputMetrics {
    /// Output name.
    pub name: String,
    /// Reference dtype.
    pub ref_dtype: String,
    /// Candidate dtype.
    pub cand_dtype: String,
    /// Shape (of the first input set).
    pub shape: Vec<usize>,
    /// Largest |cand - ref| over finite pairs.
    pub max_abs: f64,
    /// Largest |cand - ref| / |ref| (|ref| floored at 1e-12): element-wise, so values near zero dominate.
    pub max_rel: f64,
    /// Largest |cand - ref| / max(|ref|, 1e-3 * peak), the peak being the tensor's largest |ref|: a relative
    /// error that elements near zero cannot blow up (what `--tolerance max-rel` budgets).
    pub max_rel_peak: f64,
    /// Largest finite |ref| over every input set.
    pub peak: f64,
    /// Smallest cosine similarity of an input set's flattened tensors.
    pub cosine: f64,
    /// NaNs in the reference.
    pub nan_ref: usize,
    /// NaNs in the candidate.
    pub nan_cand: usize,
    /// Infinities in the reference.
    pub inf_ref: usize,
    /// Infinities in the candidate.
    pub inf_cand: usize,
    /// (agreeing rows, rows) of the arg-max over the last axis, for classifier-shaped outputs.
    pub top1: Option<(usize, usize)>,
    /// For every classifier row: 2 * max |cand - ref| over the row, divided by the reference's margin between
    /// its two largest entries. A row's arg-max can change only when this reaches 1.
    #[serde(skip)]
    pub flip_risk: Vec<f64>,
    /// Elements past the element tolerances given to [`OutputMetrics::add`].
    pub bad: usize,
    /// No element past the tolerances, shapes equal, data readable.
    pub ok: bool,
    /// Input sets seen.
    pub sets: usize,
}

fn floats(v: &Value) -> Option<(Vec<f64>, Vec<usize>, DType)> {
    let t = v.tensor().ok()?;
    Some((t.to_f64s().ok()?, t.shape.clone(), t.dtype()))
}

impl OutputMetrics {
    /// Empty metrics for an output.
    pub fn new(name: impl Into<String>) -> OutputMetrics {
        OutputMetrics {
            name: name.into(),
            cosine: 1.0,
            ok: true,
            ..OutputMetrics::default()
        }
    }

    /// Did the candidate produce NaN or Inf where the reference did not?
    pub fn new_non_finite(&self) -> bool {
        self.nan_cand > self.nan_ref || self.inf_cand > self.inf_ref
    }

    /// Adds one input set's reference and candidate values; an element is bad when
    /// |cand - ref| > atol + rtol * |ref| (or NaN/Inf differ).
    pub fn add(&mut self, r: &Value, c: &Value, rtol: f64, atol: f64) {
        let (Some((a, ash, ad)), Some((b, bsh, bd))) = (floats(r), floats(c)) else {
            self.ok = false;
            return;
        };
        if self.sets == 0 {
            self.ref_dtype = ad.to_string();
            self.cand_dtype = bd.to_string();
            self.shape = ash.clone();
        }
        self.sets += 1;
        if ash != bsh {
            self.ok = false;
            self.bad += a.len().max(b.len());
            return;
        }
        let peak = a
            .iter()
            .filter(|x| x.is_finite())
            .fold(0f64, |m, x| m.max(x.abs()));
        self.peak = self.peak.max(peak);
        let floor = (peak * 1e-3).max(1e-30);
        let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
        for (&x, &y) in a.iter().zip(&b) {
            self.nan_ref += x.is_nan() as usize;
            self.nan_cand += y.is_nan() as usize;
            self.inf_ref += x.is_infinite() as usize;
            self.inf_cand += y.is_infinite() as usize;
            let bad = if x.is_nan() || y.is_nan() {
                x.is_nan() != y.is_nan()
            } else if x.is_infinite() || y.is_infinite() {
                x != y
            } else {
                let d = (x - y).abs();
                self.max_abs = self.max_abs.max(d);
                self.max_rel = self.max_rel.max(d / x.abs().max(1e-12));
                self.max_rel_peak = self.max_rel_peak.max(d / x.abs().max(floor));
                dot += x * y;
                na += x * x;
                nb += y * y;
                d > atol + rtol * x.abs()
            };
            self.bad += bad as usize;
        }
        let cos = if na == 0.0 && nb == 0.0 {
            1.0
        } else {
            dot / (na.sqrt() * nb.sqrt()).max(1e-300)
        };
        self.cosine = self.cosine.min(cos);
        if let Some((rows, last)) = classifier_rows(&ash, ad) {
            let argmax = |v: &[f64]| {
                v.iter()
                    .enumerate()
                    .fold(
                        (0, f64::NEG_INFINITY),
                        |acc, (i, &x)| if x > acc.1 { (i, x) } else { acc },
                    )
                    .0
            };
            let mut agree = 0;
            for r in 0..rows {
                let (ra, rb) = (&a[r * last..(r + 1) * last], &b[r * last..(r + 1) * last]);
                let top = argmax(ra);
                agree += usize::from(top == argmax(rb));
                let second = ra
                    .iter()
                    .enumerate()
                    .filter(|&(i, _)| i != top)
                    .fold(f64::NEG_INFINITY, |m, (_, &x)| m.max(x));
                let margin = ra[top] - second;
                let err = ra.iter().zip(rb).fold(0f64, |m, (x, y)| {
                    if (x - y).is_nan() {
                        f64::INFINITY
                    } else {
                        m.max((x - y).abs())
                    }
                });
                self.flip_risk.push(if margin > 0.0 {
                    2.0 * err / margin
                } else if err > 0.0 {
                    f64::INFINITY
                } else {
                    0.0
                });
            }
            let (x, y) = self.top1.unwrap_or((0, 0));
            self.top1 = Some((x + agree, y + rows));
        }
        self.ok &= self.bad == 0;
    }
}

/// `(rows, classes)` of a classifier-shaped output, the ones whose top-1 agreement [`OutputMetrics`]
/// counts: rank 2 or more, a last axis of 2 or more classes, at most 4096 rows, not int64 (indices).
pub fn classifier_rows(shape: &[usize], dtype: DType) -> Option<(usize, usize)> {
    let last = shape.last().copied().unwrap_or(1);
    if dtype == DType::I64 || shape.len() < 2 || last < 2 {
        return None;
    }
    let rows = crate::tensor::numel(shape) / last;
    (rows <= 4096).then_some((rows, last))
}

/// Casts float inputs to the float dtype each input is declared with (a converted model may take f16).
pub fn adapt_inputs(model: &Model, values: &[(String, Value)]) -> Vec<(String, Value)> {
    let g = &model.graph;
    values
        .iter()
        .map(|(n, v)| {
            let want = g.value_by_name(n).and_then(|id| g.value(id).elem());
            match (v, want) {
                (Value::Tensor(t), Some(d))
                    if t.data.is_float()
                        && t.dtype() != d
                        && matches!(d, DType::F16 | DType::BF16 | DType::F32 | DType::F64) =>
                {
                    let c: Tensor = crate::cast_tensor(t, d).unwrap_or_else(|_| t.clone());
                    (n.clone(), Value::Tensor(c))
                }
                _ => (n.clone(), v.clone()),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(shape: Vec<usize>, x: Vec<f32>) -> Value {
        Value::Tensor(Tensor::f32(shape, x))
    }

    #[test]
    fn errors_cosine_and_top1() {
        let mut m = OutputMetrics::new("y");
        m.add(
            &v(vec![2, 3], vec![1.0, 3.0, 2.0, 0.0, 0.001, -1.0]),
            &v(vec![2, 3], vec![1.0, 2.4, 2.5, 0.0, 0.002, -1.0]),
            0.0,
            0.0,
        );
        assert_eq!(m.top1, Some((1, 2)));
        assert!((m.max_abs - 0.6).abs() < 1e-6);
        // element-wise, the 0.001 -> 0.002 element is a 100% error; against the floor (1e-3 of the peak 3) a
        // third, and the largest relative error of the other elements is 0.5 / 2
        assert!((m.max_rel - 1.0).abs() < 1e-3);
        assert!(
            (m.max_rel_peak - 0.001 / 0.003).abs() < 1e-6,
            "{}",
            m.max_rel_peak
        );
        // row 0: margin 1, error 0.6 -> risk 1.2 (it flipped); row 1 is a near-tie (0.001 over 0.0) moved by
        // 0.001: risk 2 although it kept its arg-max (the risk is a bound, not a prediction)
        assert!((m.flip_risk[0] - 1.2).abs() < 1e-6);
        assert!((m.flip_risk[1] - 2.0).abs() < 1e-6, "{:?}", m.flip_risk);
        assert!(m.cosine < 1.0 && m.cosine > 0.9);
        assert!(!m.ok && m.bad == 3, "{}", m.bad);
    }

    #[test]
    fn new_non_finite_is_seen() {
        let mut m = OutputMetrics::new("y");
        m.add(
            &v(vec![2], vec![1.0, f32::INFINITY]),
            &v(vec![2], vec![f32::INFINITY, f32::INFINITY]),
            1.0,
            1.0,
        );
        assert!(m.new_non_finite());
        assert!(!m.ok);
    }
}
