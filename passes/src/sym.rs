//! Shape arithmetic folded at compile time: small integer tensors (at most [`MAX_ELEMS`] elements, any rank)
//! whose elements may be symbolic (`N`) or unknown. `Shape(x)` of an `f32[N,16]` value is `[N, 16]`;
//! `Gather(.., 0)` of that is `N`; `Concat([N], [-1])` is `[N, -1]`, which a `Reshape` then turns into an output
//! shape. PyTorch's pad export (`Reshape` to `[4,2]`, reversed `Slice`, `Transpose`, `Reshape` to `[8]`) folds
//! the same way. This is how exported graphs come out fully shaped without running them.

use mpopt_ir::{DType, DimValue, Tensor};

/// Folding is limited to tensors of at most this many elements (shape vectors are short).
pub(crate) const MAX_ELEMS: usize = 64;

/// A folded integer tensor, row-major.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct SymTensor {
    /// Its shape.
    pub(crate) dims: Vec<usize>,
    /// Elements.
    pub(crate) vals: Vec<DimValue>,
}

impl SymTensor {
    pub(crate) fn vector(vals: Vec<DimValue>) -> SymTensor {
        SymTensor {
            dims: vec![vals.len()],
            vals,
        }
    }

    pub(crate) fn scalar(v: DimValue) -> SymTensor {
        SymTensor {
            dims: Vec::new(),
            vals: vec![v],
        }
    }

    /// From an integer initializer or Constant.
    pub(crate) fn from_tensor(t: &Tensor) -> Option<SymTensor> {
        if !matches!(
            t.dtype,
            DType::I64 | DType::I32 | DType::I16 | DType::I8 | DType::U8 | DType::U16 | DType::U32
        ) {
            return None;
        }
        let n = t.numel()?;
        if n > MAX_ELEMS {
            return None;
        }
        let vals = t.values_i128(n)?;
        if vals.len() != n {
            return None;
        }
        Some(SymTensor {
            dims: t.dims.iter().map(|&d| d as usize).collect(),
            vals: vals
                .into_iter()
                .map(|v| DimValue::Known(v as i64))
                .collect(),
        })
    }

    /// All elements, when all are known.
    pub(crate) fn known(&self) -> Option<Vec<i64>> {
        self.vals.iter().map(DimValue::as_known).collect()
    }

    fn strides(dims: &[usize]) -> Vec<usize> {
        let mut s = vec![1; dims.len()];
        for i in (0..dims.len().saturating_sub(1)).rev() {
            s[i] = s[i + 1] * dims[i + 1];
        }
        s
    }

    /// The elements in a new shape with the same count.
    pub(crate) fn reshaped(&self, dims: Vec<usize>) -> Option<SymTensor> {
        (dims.iter().product::<usize>() == self.vals.len()).then(|| SymTensor {
            dims,
            vals: self.vals.clone(),
        })
    }

    /// Axes permuted.
    pub(crate) fn transposed(&self, perm: &[usize]) -> Option<SymTensor> {
        if perm.len() != self.dims.len() {
            return None;
        }
        let dims: Vec<usize> = perm
            .iter()
            .map(|&p| self.dims.get(p).copied())
            .collect::<Option<_>>()?;
        let src = Self::strides(&self.dims);
        let dst = Self::strides(&dims);
        let mut vals = Vec::with_capacity(self.vals.len());
        for flat in 0..self.vals.len() {
            let mut off = 0;
            for (k, &p) in perm.iter().enumerate() {
                off += (flat / dst[k]) % dims[k] * src[p];
            }
            vals.push(self.vals[off].clone());
        }
        Some(SymTensor { dims, vals })
    }

    /// The sub-tensor of the indices `idx[axis]` along `axis` (others whole).
    pub(crate) fn select(&self, axis: usize, idx: &[usize]) -> Option<SymTensor> {
        let n = *self.dims.get(axis)?;
        if idx.iter().any(|&i| i >= n) {
            return None;
        }
        let outer: usize = self.dims[..axis].iter().product();
        let inner: usize = self.dims[axis + 1..].iter().product();
        let mut vals = Vec::with_capacity(outer * idx.len() * inner);
        for o in 0..outer {
            for &i in idx {
                let base = (o * n + i) * inner;
                vals.extend_from_slice(&self.vals[base..base + inner]);
            }
        }
        let mut dims = self.dims.clone();
        dims[axis] = idx.len();
        Some(SymTensor { dims, vals })
    }
}

/// `a op b` on two dims, when the result is determined.
pub(crate) fn arith(op: &str, a: &DimValue, b: &DimValue) -> DimValue {
    use DimValue::*;
    match (op, a, b) {
        ("Add", Known(x), Known(y)) => Known(x.wrapping_add(*y)),
        ("Sub", Known(x), Known(y)) => Known(x.wrapping_sub(*y)),
        ("Mul", Known(x), Known(y)) => Known(x.wrapping_mul(*y)),
        // ONNX integer Div truncates toward zero; Mod (fmod = 0) takes the divisor's sign.
        ("Div", Known(x), Known(y)) if *y != 0 => Known(x.wrapping_div(*y)),
        ("Mod", Known(x), Known(y)) if *y != 0 => Known(((x % y) + y) % y),
        ("Max", Known(x), Known(y)) => Known(*x.max(y)),
        ("Min", Known(x), Known(y)) => Known(*x.min(y)),
        // identities keep a symbol
        ("Add" | "Sub", s, Known(0)) => s.clone(),
        ("Add", Known(0), s) => s.clone(),
        ("Mul" | "Div", s, Known(1)) => s.clone(),
        ("Mul", Known(1), s) => s.clone(),
        _ => Unknown,
    }
}

/// Numpy-broadcast elementwise `op`.
pub(crate) fn broadcast_elementwise(op: &str, a: &SymTensor, b: &SymTensor) -> Option<SymTensor> {
    let r = a.dims.len().max(b.dims.len());
    let pad = |d: &[usize]| -> Vec<usize> {
        std::iter::repeat_n(1, r - d.len())
            .chain(d.iter().copied())
            .collect()
    };
    let (da, db) = (pad(&a.dims), pad(&b.dims));
    let mut dims = Vec::with_capacity(r);
    for (&x, &y) in da.iter().zip(&db) {
        dims.push(match (x, y) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return None,
        });
    }
    let n: usize = dims.iter().product();
    if n > MAX_ELEMS {
        return None;
    }
    let (sa, sb, so) = (
        SymTensor::strides(&da),
        SymTensor::strides(&db),
        SymTensor::strides(&dims),
    );
    let at = |d: &[usize], s: &[usize], flat: usize| -> usize {
        (0..r)
            .map(|k| {
                if d[k] == 1 {
                    0
                } else {
                    (flat / so[k]) % dims[k] * s[k]
                }
            })
            .sum()
    };
    let vals = (0..n)
        .map(|f| arith(op, &a.vals[at(&da, &sa, f)], &b.vals[at(&db, &sb, f)]))
        .collect();
    Some(SymTensor { dims, vals })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(v: &[i64]) -> Vec<DimValue> {
        v.iter().map(|&x| DimValue::Known(x)).collect()
    }

    #[test]
    fn arithmetic_keeps_symbols_through_identities() {
        let n = DimValue::Symbol("N".into());
        assert_eq!(arith("Mul", &n, &DimValue::Known(1)), n);
        assert_eq!(
            arith("Add", &DimValue::Known(3), &DimValue::Known(4)),
            DimValue::Known(7)
        );
        assert_eq!(
            arith("Div", &DimValue::Known(-7), &DimValue::Known(2)),
            DimValue::Known(-3)
        );
        assert_eq!(arith("Mul", &n, &DimValue::Known(2)), DimValue::Unknown);
        let a = SymTensor::vector(vec![n.clone(), DimValue::Known(16)]);
        let b = SymTensor::scalar(DimValue::Known(1));
        assert_eq!(broadcast_elementwise("Mul", &a, &b).unwrap().vals, a.vals);
    }

    #[test]
    fn torch_pad_pattern_folds() {
        // pads [0,0, 0,0, 3,3, 3,3] as torch exports them: reshape [4,2], reverse rows, transpose, flatten
        let t = SymTensor::vector(k(&[3, 3, 3, 3, 0, 0, 0, 0]))
            .reshaped(vec![4, 2])
            .unwrap();
        let rev = t.select(0, &[3, 2, 1, 0]).unwrap();
        let tr = rev.transposed(&[1, 0]).unwrap();
        assert_eq!(tr.dims, vec![2, 4]);
        assert_eq!(
            tr.reshaped(vec![8]).unwrap().vals,
            k(&[0, 0, 3, 3, 0, 0, 3, 3])
        );
    }
}
