//! Value-range facts: what the `analyze-ranges` pass proves about a value and what calibration observed.
//!
//! They are annotations like [`crate::PrecisionDecision`]: passes read and write them, the printer shows them
//! as trailing comments, and ONNX export ignores them.

/// A closed interval of real numbers, `lo <= x <= hi` for every element; the ends may be infinite.
///
/// A value that may be NaN has the interval `[-inf, inf]` ([`Interval::TOP`]): no bound is claimed for it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Interval {
    /// Lower bound.
    pub lo: f64,
    /// Upper bound.
    pub hi: f64,
}

impl Interval {
    /// No bound at all.
    pub const TOP: Interval = Interval {
        lo: f64::NEG_INFINITY,
        hi: f64::INFINITY,
    };

    /// `[lo, hi]`; NaN ends or `lo > hi` give [`Interval::TOP`].
    pub fn new(lo: f64, hi: f64) -> Interval {
        if lo.is_nan() || hi.is_nan() || lo > hi {
            Interval::TOP
        } else {
            Interval { lo, hi }
        }
    }

    /// The single point `x`.
    pub fn point(x: f64) -> Interval {
        Interval::new(x, x)
    }

    /// The largest magnitude, `max(|lo|, |hi|)`.
    pub fn abs_max(&self) -> f64 {
        self.lo.abs().max(self.hi.abs())
    }

    /// Both ends finite.
    pub fn is_bounded(&self) -> bool {
        self.lo.is_finite() && self.hi.is_finite()
    }

    /// The smallest interval holding both.
    pub fn hull(self, o: Interval) -> Interval {
        Interval::new(self.lo.min(o.lo), self.hi.max(o.hi))
    }

    /// Does it contain `x`?
    pub fn contains(&self, x: f64) -> bool {
        self.lo <= x && x <= self.hi
    }
}

impl std::fmt::Display for Interval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}, {}]", short(self.lo), short(self.hi))
    }
}

/// A number in few characters (`3.07e5`, `-inf`, `0.5`).
pub fn short(x: f64) -> String {
    if x.is_infinite() {
        return if x > 0.0 { "inf".into() } else { "-inf".into() };
    }
    if x == 0.0 || x.fract() == 0.0 && x.abs() < 1e6 {
        return format!("{x}");
    }
    let a = x.abs();
    if (1e-3..1e6).contains(&a) {
        let s = format!("{x:.4}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        return s.to_string();
    }
    format!("{x:.3e}")
}

/// What calibration runs observed of a float value (fp32 execution).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Observed {
    /// Smallest element seen.
    pub min: f64,
    /// Largest element seen.
    pub max: f64,
    /// Largest magnitude seen.
    pub abs_max: f64,
    /// Elements seen (over all runs).
    pub count: u64,
    /// Non-zero finite elements seen.
    pub nonzero: u64,
    /// Non-zero elements that become zero in the target type.
    pub to_zero: u64,
    /// Non-zero elements that become subnormal in the target type.
    pub to_subnormal: u64,
    /// Elements that are NaN or infinite already in fp32.
    pub non_finite: u64,
    /// Non-zero elements that become zero or subnormal in the target type although they are significant: larger
    /// than their tensor's largest magnitude times the target's unit roundoff (smaller ones vanish next to
    /// the large values anyway, in any precision).
    pub lost: u64,
}

impl Observed {
    /// The share of non-zero values that become zero or subnormal in the target.
    pub fn underflow_share(&self) -> f64 {
        if self.nonzero == 0 {
            0.0
        } else {
            (self.to_zero + self.to_subnormal) as f64 / self.nonzero as f64
        }
    }

    /// The share of non-zero values lost to underflow that are significant next to their tensor's largest
    /// values (see [`Observed::lost`]).
    pub fn lost_share(&self) -> f64 {
        if self.nonzero == 0 {
            0.0
        } else {
            self.lost as f64 / self.nonzero as f64
        }
    }
}

/// The range facts of one value.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ValueRange {
    /// Proven by static analysis (sound for every input within the declared input ranges).
    pub proven: Option<Interval>,
    /// Observed by calibration.
    pub observed: Option<Observed>,
    /// Of an initializer or a Constant node's output: what the analysis's scan of its data found (not
    /// printed).
    pub constant: Option<ConstantFacts>,
}

/// What one scan of a float32 initializer's data found, for later passes to reuse instead of reading the
/// data again, while the tensor still holds exactly the scanned bytes ([`ConstantFacts::describes`]).
///
/// The facts hold the scanned buffer: as long as they live, no other data can take its address, and `Bytes`
/// cannot be written through, so the same address and length mean the same contents.
#[derive(Clone, Debug, PartialEq)]
pub struct ConstantFacts {
    /// Smallest element (the facts are only made for data without NaN).
    pub min: f32,
    /// Largest element.
    pub max: f32,
    /// Against f16, then bf16: (finite elements beyond the type's finite range, non-zero elements that
    /// round to zero in it).
    pub beyond: [(u64, u64); 2],
    data: bytes::Bytes,
}

impl ConstantFacts {
    /// Facts about `t`, which must hold float32 `raw_data` (None otherwise, or when `min`/`max` is NaN).
    pub fn new(
        t: &crate::Tensor,
        min: f32,
        max: f32,
        beyond: [(u64, u64); 2],
    ) -> Option<ConstantFacts> {
        match (&t.data, t.dtype) {
            (crate::TensorData::Raw(b), crate::DType::F32) if !min.is_nan() && !max.is_nan() => {
                Some(ConstantFacts {
                    min,
                    max,
                    beyond,
                    data: b.clone(),
                })
            }
            _ => None,
        }
    }

    /// True when `t` holds the very bytes these facts were found in, as float32.
    pub fn describes(&self, t: &crate::Tensor) -> bool {
        match (&t.data, t.dtype) {
            (crate::TensorData::Raw(b), crate::DType::F32) => {
                b.as_ptr() == self.data.as_ptr() && b.len() == self.data.len()
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for ValueRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut sep = "";
        if let Some(p) = &self.proven {
            write!(f, "{p}")?;
            sep = " ";
        }
        if let Some(o) = &self.observed {
            write!(f, "{sep}obs [{}, {}]", short(o.min), short(o.max))?;
            let u = o.underflow_share();
            if u > 0.0 {
                write!(f, " uf {:.2}%", u * 100.0)?;
            }
            if o.lost > 0 {
                write!(f, " lost {:.2}%", o.lost_share() * 100.0)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals() {
        assert_eq!(Interval::new(2.0, 1.0), Interval::TOP);
        assert_eq!(Interval::new(f64::NAN, 1.0), Interval::TOP);
        let a = Interval::new(-3.0, 1.0).hull(Interval::point(5.0));
        assert_eq!((a.lo, a.hi, a.abs_max()), (-3.0, 5.0, 5.0));
        assert!(!Interval::TOP.is_bounded());
        assert_eq!(a.to_string(), "[-3, 5]");
        assert_eq!(Interval::new(-0.5, 3.07e5).to_string(), "[-0.5, 307000]");
        assert_eq!(
            Interval::new(1.5e-7, 3.4e38).to_string(),
            "[1.500e-7, 3.400e38]"
        );
        assert_eq!(Interval::TOP.to_string(), "[-inf, inf]");
    }
}
