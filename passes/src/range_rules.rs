//! Interval transfer functions for `analyze-ranges`, one per op family.
//!
//! Each function maps the intervals of a node's inputs (and, for weights, their constant contents and static
//! shapes) to a sound interval per output: every value the op can produce, for inputs within the given
//! intervals, lies inside. Results are computed in f64 and padded outward by the worst fp32 rounding error of
//! the op, so they also hold for the fp32 graph. When no bound can be claimed the answer is [`Interval::TOP`].
//! Unit tests check each family against brute-force sampling.

use mpopt_ir::{AttrValue, DType, Graph, Interval, Node, Tensor, ValueId};

/// fp32's unit roundoff.
const U32: f64 = 1.0 / 16777216.0;

/// What a transfer function sees of one input.
#[derive(Clone, Default)]
pub(crate) struct In<'a> {
    /// The input's interval (TOP when unknown; absent optional inputs are None).
    pub iv: Option<Interval>,
    /// Its constant contents, when it is an initializer or a Constant output.
    pub konst: Option<&'a Tensor>,
    /// Its static shape when the rank is known; unknown dims are -1.
    pub shape: Option<Vec<i64>>,
    /// The column sums of `konst` read row by row ([`weight_columns`]), when the caller computed them.
    pub columns: Option<&'a Columns>,
}

impl In<'_> {
    fn iv(&self) -> Interval {
        self.iv.unwrap_or(Interval::TOP)
    }
}

/// Pads an interval outward by `rel` of its magnitude (rounding error of the fp32 computation).
fn pad(i: Interval, rel: f64) -> Interval {
    Interval::new(i.lo - i.lo.abs() * rel, i.hi + i.hi.abs() * rel)
}

/// `a * b` where `0 * inf = 0` (a zero factor is exact).
fn m(a: f64, b: f64) -> f64 {
    if a == 0.0 || b == 0.0 { 0.0 } else { a * b }
}

pub(crate) fn add(a: Interval, b: Interval) -> Interval {
    pad(Interval::new(a.lo + b.lo, a.hi + b.hi), U32)
}

pub(crate) fn neg(a: Interval) -> Interval {
    Interval::new(-a.hi, -a.lo)
}

pub(crate) fn sub(a: Interval, b: Interval) -> Interval {
    add(a, neg(b))
}

pub(crate) fn mul(a: Interval, b: Interval) -> Interval {
    let c = [m(a.lo, b.lo), m(a.lo, b.hi), m(a.hi, b.lo), m(a.hi, b.hi)];
    let lo = c.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = c.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    pad(Interval::new(lo, hi), U32)
}

/// `1 / b`; TOP when `b` may be zero.
pub(crate) fn recip(b: Interval) -> Interval {
    if b.contains(0.0) {
        return Interval::TOP;
    }
    pad(Interval::new(1.0 / b.hi, 1.0 / b.lo), U32)
}

pub(crate) fn div(a: Interval, b: Interval) -> Interval {
    if b.contains(0.0) {
        return Interval::TOP;
    }
    mul(a, recip(b))
}

/// `f(a)` for a non-decreasing `f`.
fn mono(a: Interval, f: impl Fn(f64) -> f64) -> Interval {
    pad(Interval::new(f(a.lo), f(a.hi)), 4.0 * U32)
}

pub(crate) fn abs(a: Interval) -> Interval {
    if a.lo >= 0.0 {
        a
    } else if a.hi <= 0.0 {
        neg(a)
    } else {
        Interval::new(0.0, a.abs_max())
    }
}

/// `x^2`.
pub(crate) fn square(a: Interval) -> Interval {
    let b = abs(a);
    pad(Interval::new(b.lo * b.lo, b.hi * b.hi), U32)
}

/// `x^e` for an interval exponent.
pub(crate) fn pow(x: Interval, e: Interval) -> Interval {
    if e.lo == e.hi {
        let n = e.lo;
        if n == 0.0 {
            return Interval::point(1.0);
        }
        if n == 1.0 {
            return x;
        }
        if n.fract() == 0.0 && n.abs() <= 64.0 {
            let even = (n as i64) % 2 == 0;
            if n < 0.0 {
                // x^-k = 1 / x^k
                return recip(pow(x, Interval::point(-n)));
            }
            let r = if even {
                let b = abs(x);
                Interval::new(b.lo.powf(n), b.hi.powf(n))
            } else {
                Interval::new(x.lo.powf(n), x.hi.powf(n))
            };
            return pad(r, n * 2.0 * U32);
        }
    }
    // a real exponent needs a non-negative base (a negative one gives NaN)
    if x.lo < 0.0 || (x.lo == 0.0 && e.lo < 0.0) {
        return Interval::TOP;
    }
    // x^e = exp(e ln x): bilinear in (e, ln x), so extremes lie at the corners
    let c = [
        x.lo.powf(e.lo),
        x.lo.powf(e.hi),
        x.hi.powf(e.lo),
        x.hi.powf(e.hi),
    ];
    if c.iter().any(|v| v.is_nan()) {
        return Interval::TOP;
    }
    let lo = c.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = c.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    pad(Interval::new(lo, hi), 8.0 * U32)
}

pub(crate) fn max(a: Interval, b: Interval) -> Interval {
    Interval::new(a.lo.max(b.lo), a.hi.max(b.hi))
}

pub(crate) fn min(a: Interval, b: Interval) -> Interval {
    Interval::new(a.lo.min(b.lo), a.hi.min(b.hi))
}

/// `f` that falls to a single minimum `(x_min, f_min)` and rises after it, and has its maxima at the ends.
fn valley(a: Interval, x_min: f64, f_min: f64, f: impl Fn(f64) -> f64) -> Interval {
    let (fl, fh) = (f(a.lo), f(a.hi));
    let lo = if a.contains(x_min) { f_min } else { fl.min(fh) };
    pad(Interval::new(lo, fl.max(fh)), 8.0 * U32)
}

/// The standard normal CDF.
fn phi(x: f64) -> f64 {
    0.5 * (1.0 + erf(x / std::f64::consts::SQRT_2))
}

/// erf, Abramowitz-Stegun 7.1.26 refined: |error| < 1.2e-7, covered by the padding of its users.
fn erf(x: f64) -> f64 {
    let t = 1.0 / (1.0 + 0.5 * x.abs());
    let y = 1.0
        - t * (-x * x - 1.26551223
            + t * (1.00002368
                + t * (0.37409196
                    + t * (0.09678418
                        + t * (-0.18628806
                            + t * (0.27886807
                                + t * (-1.13520398
                                    + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))))))))
            .exp();
    if x >= 0.0 { y } else { -y }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn float_attr(n: &Node, name: &str) -> Option<f64> {
    match n.attr(name).map(|a| &a.value) {
        Some(AttrValue::Float(f)) => Some(*f as f64),
        _ => None,
    }
}

fn int_attr(n: &Node, name: &str) -> Option<i64> {
    match n.attr(name).map(|a| &a.value) {
        Some(AttrValue::Int(i)) => Some(*i),
        _ => None,
    }
}

fn ints_attr(n: &Node, name: &str) -> Option<Vec<i64>> {
    match n.attr(name).map(|a| &a.value) {
        Some(AttrValue::Ints(v)) => Some(v.clone()),
        _ => None,
    }
}

fn str_attr<'a>(n: &'a Node, name: &str) -> Option<&'a str> {
    match n.attr(name).map(|a| &a.value) {
        Some(AttrValue::String(s)) => std::str::from_utf8(s).ok(),
        _ => None,
    }
}

/// A constant tensor's values as f64 (None for strings and unreadable data).
pub(crate) fn values(t: &Tensor) -> Option<Vec<f64>> {
    let n = t.numel()?;
    let v = t.values_f64(n)?;
    (v.len() == n).then_some(v)
}

/// A constant's f32 elements where they lie: `raw_data` bytes, or `float_data` (how Paddle's exporter writes
/// its Constant weights). The weight scans read them in place either way.
#[derive(Clone, Copy)]
pub(crate) enum F32Data<'a> {
    Bytes(&'a [u8]),
    Floats(&'a [f32]),
}

impl<'a> F32Data<'a> {
    /// The tensor's elements, when it is f32 data held whole (None for other dtypes and external data).
    pub(crate) fn of(t: &'a Tensor) -> Option<F32Data<'a>> {
        match (t.dtype, &t.data) {
            (DType::F32, mpopt_ir::TensorData::Raw(b)) if b.len() % 4 == 0 => {
                Some(F32Data::Bytes(b))
            }
            (DType::F32, mpopt_ir::TensorData::Floats(v)) => Some(F32Data::Floats(v)),
            _ => None,
        }
    }

    /// Number of elements.
    pub(crate) fn len(self) -> usize {
        match self {
            F32Data::Bytes(b) => b.len() / 4,
            F32Data::Floats(v) => v.len(),
        }
    }

    /// The elements `start..start + len`.
    pub(crate) fn range(self, start: usize, len: usize) -> F32Data<'a> {
        match self {
            F32Data::Bytes(b) => F32Data::Bytes(&b[start * 4..(start + len) * 4]),
            F32Data::Floats(v) => F32Data::Floats(&v[start..start + len]),
        }
    }

    /// The elements `at..at + len` as a slice where they can be read in place: `float_data`, or `raw_data`
    /// aligned for f32 on a little-endian machine. None otherwise ([`F32Data::fill`] copies them).
    pub(crate) fn slice(self, at: usize, len: usize) -> Option<&'a [f32]> {
        match self {
            F32Data::Bytes(b) if cfg!(target_endian = "little") => {
                bytemuck::try_cast_slice(&b[at * 4..(at + len) * 4]).ok()
            }
            F32Data::Bytes(_) => None,
            F32Data::Floats(v) => Some(&v[at..at + len]),
        }
    }

    /// Copies the elements `at..at + xs.len()` into `xs` and returns them. `xs` need not be initialized:
    /// a block buffer zeroed first cost a memset as big as the copy, per block.
    pub(crate) fn fill(self, at: usize, xs: &mut [std::mem::MaybeUninit<f32>]) -> &[f32] {
        let n = xs.len();
        match self {
            F32Data::Bytes(b) => {
                let bytes = &b[at * 4..(at + n) * 4];
                for (x, c) in xs.iter_mut().zip(bytes.chunks_exact(4)) {
                    x.write(f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
                }
            }
            F32Data::Floats(v) => {
                for (x, &y) in xs.iter_mut().zip(&v[at..at + n]) {
                    x.write(y);
                }
            }
        }
        // SAFETY: every element of `xs` was written just above (the byte range holds `4 * xs.len()` bytes
        // and `v`'s range `xs.len()` values, or the slicing panicked), and `MaybeUninit<f32>` has `f32`'s
        // layout
        unsafe { std::slice::from_raw_parts(xs.as_ptr().cast::<f32>(), xs.len()) }
    }

    /// Calls `f(j, x)` for the elements `start + j`, `j < len`, in order.
    #[inline(always)]
    fn each(self, start: usize, len: usize, mut f: impl FnMut(usize, f32)) {
        match self {
            F32Data::Bytes(b) => {
                for (j, c) in b[start * 4..(start + len) * 4].chunks_exact(4).enumerate() {
                    f(j, f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
                }
            }
            F32Data::Floats(v) => {
                for (j, &x) in v[start..start + len].iter().enumerate() {
                    f(j, x);
                }
            }
        }
    }

    /// Folds every element `x` into `state` with `lane(state, j, x)`, `j` its index modulo 8 (see
    /// [`lanes`]).
    #[inline(always)]
    pub(crate) fn lanes<S>(self, state: S, lane: impl FnMut(&mut S, usize, f32)) -> S {
        match self {
            F32Data::Bytes(b) => f32_lanes(b, state, lane),
            F32Data::Floats(v) => lanes(v, state, lane),
        }
    }
}

/// Folds the elements of `xs` in order into `state` with `lane(state, j, x)`, `j` the index modulo 8: a
/// reduction kept in eight lanes (one accumulator each) with selects instead of branches vectorizes.
///
/// The loop runs with the best vector instructions the CPU has (AVX2 and FMA where present, chosen at run
/// time by `pulp`; the build targets baseline x86-64 and its SSE2). The state is owned by the loop, not
/// borrowed from the caller, so that it stays in registers across that call.
#[inline(always)]
pub(crate) fn lanes<S>(xs: &[f32], state: S, mut lane: impl FnMut(&mut S, usize, f32)) -> S {
    pulp::Arch::new().dispatch(
        #[inline(always)]
        move || {
            let mut st = state;
            let mut blocks = xs.chunks_exact(8);
            for blk in &mut blocks {
                for (j, &x) in blk.iter().enumerate() {
                    lane(&mut st, j, x);
                }
            }
            for (j, &x) in blocks.remainder().iter().enumerate() {
                lane(&mut st, j, x);
            }
            st
        },
    )
}

/// [`lanes`] over two slices of the same length, element by element: `lane(state, j, a[i], b[i])`.
#[inline(always)]
pub(crate) fn lanes2<S>(
    a: &[f32],
    b: &[f32],
    state: S,
    mut lane: impl FnMut(&mut S, usize, f32, f32),
) -> S {
    pulp::Arch::new().dispatch(
        #[inline(always)]
        move || {
            let mut st = state;
            let (mut ca, mut cb) = (a.chunks_exact(8), b.chunks_exact(8));
            for (xa, yb) in (&mut ca).zip(&mut cb) {
                for j in 0..8 {
                    lane(&mut st, j, xa[j], yb[j]);
                }
            }
            for (j, (&x, &y)) in ca.remainder().iter().zip(cb.remainder()).enumerate() {
                lane(&mut st, j, x, y);
            }
            st
        },
    )
}

/// Folds every f32 `x` of little-endian bytes `b` into `state` with `lane(state, j, x)`, `j` the element
/// index modulo 8 (see [`lanes`]).
#[inline(always)]
fn f32_lanes<S>(b: &[u8], state: S, mut lane: impl FnMut(&mut S, usize, f32)) -> S {
    pulp::Arch::new().dispatch(
        #[inline(always)]
        move || {
            let mut st = state;
            let blocks = b.chunks_exact(32);
            let rest = blocks.remainder();
            for blk in blocks {
                let mut xs = [0f32; 8];
                for (x, c) in xs.iter_mut().zip(blk.chunks_exact(4)) {
                    *x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
                for (j, &x) in xs.iter().enumerate() {
                    lane(&mut st, j, x);
                }
            }
            for (j, c) in rest.chunks_exact(4).enumerate() {
                lane(&mut st, j, f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
            }
            st
        },
    )
}

/// The exact interval of a constant tensor (TOP when it holds NaN; None when unreadable or empty).
pub(crate) fn const_interval(t: &Tensor) -> Option<Interval> {
    const_scan(t).0
}

/// The smallest tensor that gets [`mpopt_ir::ConstantFacts`]: reading a smaller one again costs less than
/// keeping its facts (a generated model with 100,000 initializers of 50 floats: 15 MB more peak memory).
pub(crate) const FACTS_MIN_ELEMENTS: usize = 4096;

/// [`const_interval`], and for float32 `raw_data` without NaN of at least [`FACTS_MIN_ELEMENTS`] elements the
/// [`mpopt_ir::ConstantFacts`] that later passes reuse
/// instead of reading the data again: its counts against f16's and bf16's ranges come from the same read.
pub(crate) fn const_scan(t: &Tensor) -> (Option<Interval>, Option<mpopt_ir::ConstantFacts>) {
    use crate::assign_precision::{max_finite, min_positive};
    if let Some(d) = F32Data::of(t) {
        let limit = |d: DType| (max_finite(d) as f32, (min_positive(d) / 2.0) as f32);
        let ((max16, tiny16), (maxb, tinyb)) = (limit(DType::F16), limit(DType::BF16));
        // the common case, read in place, in eight lanes of selects so that the loop vectorizes (a NaN
        // compares false and is only counted)
        type Scan = ([f32; 8], [f32; 8], [u32; 8], [[u64; 8]; 4]);
        let scan = |d: F32Data| -> Scan {
            let init = (
                [f32::INFINITY; 8],
                [f32::NEG_INFINITY; 8],
                [0u32; 8],
                [[0u32; 8]; 4],
            );
            let (los, his, nans, c) = d.lanes(init, |(los, his, nans, c), j, x| {
                nans[j] += x.is_nan() as u32;
                los[j] = if x < los[j] { x } else { los[j] };
                his[j] = if x > his[j] { x } else { his[j] };
                let a = x.abs();
                let (finite, nonzero) = (a < f32::INFINITY, a != 0.0);
                c[0][j] += (finite & (a > max16)) as u32;
                c[1][j] += (nonzero & (a < tiny16)) as u32;
                c[2][j] += (finite & (a > maxb)) as u32;
                c[3][j] += (nonzero & (a < tinyb)) as u32;
            });
            (los, his, nans, c.map(|k| k.map(u64::from)))
        };
        let merge = |(mut l, mut h, mut n, mut c): Scan, (l2, h2, n2, c2): Scan| -> Scan {
            for j in 0..8 {
                l[j] = l[j].min(l2[j]);
                h[j] = h[j].max(h2[j]);
                n[j] = n[j].saturating_add(n2[j]);
                for k in 0..4 {
                    c[k][j] += c2[k][j];
                }
            }
            (l, h, n, c)
        };
        // a big constant (an embedding table: 47 MB in paraphrase_minilm) in parallel pieces, so that one
        // tensor does not keep the other cores waiting; the lanes' u32 counts stay within a piece
        const PIECE: usize = 1 << 20;
        let (los, his, nans, counts) = if d.len() > 2 * PIECE {
            use rayon::prelude::*;
            (0..d.len().div_ceil(PIECE))
                .into_par_iter()
                .map(|i| scan(d.range(i * PIECE, PIECE.min(d.len() - i * PIECE))))
                .reduce_with(merge)
                .expect("at least one piece")
        } else {
            scan(d)
        };
        let lo = los.iter().fold(f32::INFINITY, |a, &b| a.min(b));
        let hi = his.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let nan = nans.iter().any(|&n| n > 0);
        return match (d.len() > 0, nan) {
            (false, _) => (None, None),
            (true, true) => (Some(Interval::TOP), None),
            (true, false) => {
                let total = |k: usize| counts[k].iter().sum::<u64>();
                let beyond = [(total(0), total(1)), (total(2), total(3))];
                let facts = (t.numel() == Some(d.len()) && d.len() >= FACTS_MIN_ELEMENTS)
                    .then(|| mpopt_ir::ConstantFacts::new(t, lo, hi, beyond))
                    .flatten();
                (Some(Interval::new(lo as f64, hi as f64)), facts)
            }
        };
    }
    (const_interval_general(t), None)
}

fn const_interval_general(t: &Tensor) -> Option<Interval> {
    let v = values(t)?;
    if v.is_empty() {
        return None;
    }
    if v.iter().any(|x| x.is_nan()) {
        return Some(Interval::TOP);
    }
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some(Interval::new(lo, hi))
}

/// The range a dtype can hold (integers and bool), or TOP for floats.
pub(crate) fn dtype_interval(d: DType) -> Interval {
    match d {
        DType::Bool => Interval::new(0.0, 1.0),
        DType::U8 => Interval::new(0.0, 255.0),
        DType::I8 => Interval::new(-128.0, 127.0),
        DType::U16 => Interval::new(0.0, 65535.0),
        DType::I16 => Interval::new(-32768.0, 32767.0),
        DType::U32 => Interval::new(0.0, u32::MAX as f64),
        DType::I32 => Interval::new(i32::MIN as f64, i32::MAX as f64),
        DType::U64 => Interval::new(0.0, u64::MAX as f64),
        DType::I64 => Interval::new(i64::MIN as f64, i64::MAX as f64),
        _ => Interval::TOP,
    }
}

/// The product of dims, when all are known.
fn product(dims: &[i64]) -> Option<f64> {
    dims.iter()
        .try_fold(1.0, |acc, &d| (d >= 0).then_some(acc * d as f64))
}

/// Normalized axis.
fn axis(a: i64, rank: usize) -> Option<usize> {
    let r = rank as i64;
    let a = if a < 0 { a + r } else { a };
    (0..r).contains(&a).then_some(a as usize)
}

/// Elements reduced by a Reduce* node: the product of the reduced dims (None when unknown).
fn reduced_count(n: &Node, ins: &[In], opset: i64) -> Option<f64> {
    let shape = ins.first()?.shape.as_ref()?;
    let axes: Option<Vec<i64>> = if opset >= 18 || (n.op_type == "ReduceSum" && opset >= 13) {
        match ins.get(1) {
            Some(In { konst: Some(t), .. }) => Some(values(t)?.iter().map(|&x| x as i64).collect()),
            Some(In { iv: Some(_), .. }) => return None,
            _ => None,
        }
    } else {
        ints_attr(n, "axes")
    };
    let axes = match axes {
        Some(a) if !a.is_empty() => a,
        _ if int_attr(n, "noop_with_empty_axes") == Some(1) => return Some(1.0),
        _ => (0..shape.len() as i64).collect(),
    };
    let mut count = 1.0;
    for a in axes {
        let d = shape[axis(a, shape.len())?];
        if d < 0 {
            return None;
        }
        count *= d as f64;
    }
    Some(count)
}

/// The interval of each output of a node that has no subgraph. `opset` is the default domain's version.
pub(crate) fn transfer(g: &Graph, n: &Node, ins: &[In], opset: i64) -> Vec<Interval> {
    let outs = n.outputs().len();
    let x = || ins.first().map_or(Interval::TOP, In::iv);
    let arg = |i: usize| ins.get(i).map_or(Interval::TOP, In::iv);
    let same = |iv: Interval| vec![iv; outs];
    let domain = if n.domain == "ai.onnx" {
        ""
    } else {
        n.domain.as_str()
    };
    if !domain.is_empty() && domain != "com.microsoft" {
        return same(Interval::TOP);
    }
    match (domain, n.op_type.as_str()) {
        // values move, never change
        (
            "",
            "Identity" | "Reshape" | "Flatten" | "Squeeze" | "Unsqueeze" | "Transpose" | "Slice"
            | "Gather" | "GatherElements" | "GatherND" | "Expand" | "Tile" | "DepthToSpace"
            | "SpaceToDepth" | "Compress" | "ReverseSequence" | "GlobalMaxPool" | "ReduceMax"
            | "ReduceMin" | "Split" | "Dropout" | "Col2Im" | "CenterCropPad" | "Optional"
            | "OptionalGetElement" | "Upsample",
        ) if !(n.op_type == "Upsample" && str_attr(n, "mode").is_some_and(|m| m != "nearest")) => {
            let mut v = same(x());
            if n.op_type == "Dropout" {
                // in training mode the kept values are scaled by 1 / (1 - ratio): no bound is claimed unless
                // training_mode is absent or a constant false
                let training = match ins.get(2) {
                    Some(In { konst: Some(t), .. }) => {
                        values(t).is_none_or(|v| v.iter().any(|&b| b != 0.0))
                    }
                    Some(In { iv: Some(_), .. }) => true,
                    _ => false,
                };
                if training {
                    v[0] = Interval::TOP;
                }
                if outs > 1 {
                    v[1] = Interval::new(0.0, 1.0);
                }
            }
            if n.op_type == "CenterCropPad" {
                v[0] = x().hull(Interval::point(0.0));
            }
            v
        }
        ("", "MaxPool") => {
            let mut v = same(x());
            if outs > 1 {
                v[1] = Interval::new(0.0, i64::MAX as f64);
            }
            v
        }
        ("", "TopK") => vec![x(), Interval::new(0.0, i64::MAX as f64)],
        ("", "Concat") => {
            let h = ins
                .iter()
                .map(In::iv)
                .reduce(Interval::hull)
                .unwrap_or(Interval::TOP);
            same(h)
        }
        ("", "Pad") => {
            let mode = str_attr(n, "mode").unwrap_or("constant");
            if mode == "constant" {
                let value = if opset >= 11 {
                    ins.get(2)
                        .and_then(|i| i.iv)
                        .unwrap_or(Interval::point(0.0))
                } else {
                    Interval::point(float_attr(n, "value").unwrap_or(0.0))
                };
                same(x().hull(value))
            } else {
                same(x())
            }
        }
        ("", "Where") => same(arg(1).hull(arg(2))),
        ("", "ScatterND" | "ScatterElements" | "Scatter") => {
            let red = str_attr(n, "reduction").unwrap_or("none");
            match red {
                "none" | "max" | "min" => same(x().hull(arg(2))),
                _ => same(Interval::TOP),
            }
        }
        ("", "Resize") => {
            let mode = str_attr(n, "mode").unwrap_or("nearest");
            let extrap = ins
                .first()
                .map(|_| {
                    str_attr(n, "coordinate_transformation_mode") == Some("tf_crop_and_resize")
                })
                .unwrap_or(false);
            let mut r = match mode {
                "nearest" | "linear" => x(),
                _ => {
                    // Axes that keep their size interpolate at whole pixels: weights (0, 1, 0, 0).
                    // Count the resized ones where scales or sizes are constant, else every axis.
                    let shape = ins.first().and_then(|i| i.shape.as_ref());
                    let konst = |i: usize| ins.get(i).and_then(|i| i.konst).and_then(values);
                    let rank = match (konst(2).filter(|s| !s.is_empty()), konst(3)) {
                        (Some(scales), _) => Some(scales.iter().filter(|&&s| s != 1.0).count()),
                        (None, Some(sizes)) => shape.filter(|s| s.len() == sizes.len()).map(|s| {
                            s.iter()
                                .zip(&sizes)
                                .filter(|&(&d, &z)| d < 0 || d as f64 != z)
                                .count()
                        }),
                        _ => None,
                    }
                    .or(shape.map(|s| s.len()));
                    let a = float_attr(n, "cubic_coeff_a").unwrap_or(-0.75);
                    let exclude = int_attr(n, "exclude_outside").unwrap_or(0) != 0;
                    match (rank, cubic_gain(a, exclude)) {
                        (Some(r), Some(k)) => {
                            // The weights of an axis sum to 1, so the output is the input's midpoint
                            // plus a weighted sum of deviations of at most the half-width each.
                            let (c, h) = ((x().lo + x().hi) / 2.0, (x().hi - x().lo) / 2.0);
                            let k = k.powi(r as i32);
                            Interval::new(c - h * k, c + h * k).hull(x())
                        }
                        _ => Interval::TOP,
                    }
                }
            };
            if extrap {
                r = r.hull(Interval::point(
                    float_attr(n, "extrapolation_value").unwrap_or(0.0),
                ));
            }
            same(pad(r, 8.0 * U32))
        }
        ("", "AveragePool" | "GlobalAveragePool" | "ReduceMean") => {
            // a mean stays within its terms; padded zeros count when count_include_pad is set
            if int_attr(n, "count_include_pad") == Some(1) {
                same(pad(x().hull(Interval::point(0.0)), 64.0 * U32))
            } else {
                same(pad(x(), 64.0 * U32))
            }
        }
        ("", "Cast" | "CastLike") => {
            let to = if n.op_type == "Cast" {
                int_attr(n, "to").and_then(|c| DType::from_code(c as i32))
            } else {
                n.outputs()
                    .first()
                    .copied()
                    .flatten()
                    .and_then(|v| g.value(v).elem())
            };
            match to {
                Some(d) if d.is_float() => same(x()),
                Some(DType::Bool) => same(Interval::new(0.0, 1.0)),
                Some(d) => {
                    let t = Interval::new(x().lo.trunc(), x().hi.trunc());
                    let full = dtype_interval(d);
                    // out-of-range conversions wrap or saturate: claim only what surely fits
                    if full.contains(t.lo) && full.contains(t.hi) {
                        same(t)
                    } else {
                        same(full)
                    }
                }
                None => same(Interval::TOP),
            }
        }
        // elementwise arithmetic
        ("", "Add") => same(add(arg(0), arg(1))),
        ("", "Sub") => same(sub(arg(0), arg(1))),
        ("", "Mul") => same(mul(arg(0), arg(1))),
        ("", "Div") => {
            let is_int = n
                .outputs()
                .first()
                .copied()
                .flatten()
                .and_then(|v| g.value(v).elem())
                .is_some_and(|d| !d.is_float());
            let q = div(arg(0), arg(1));
            if is_int {
                // integer division truncates toward zero
                same(Interval::new(q.lo.floor().min(0.0), q.hi.ceil().max(0.0)))
            } else {
                same(q)
            }
        }
        ("", "Neg") => same(neg(x())),
        ("", "Abs") => same(abs(x())),
        ("", "Reciprocal") => same(recip(x())),
        ("", "Pow") => same(pow(arg(0), arg(1))),
        ("", "Sqrt") => {
            if x().lo < 0.0 {
                same(Interval::TOP)
            } else {
                same(mono(x(), f64::sqrt))
            }
        }
        ("", "Exp") => same(mono(x(), f64::exp)),
        ("", "Log") => {
            if x().lo < 0.0 {
                same(Interval::TOP)
            } else {
                same(mono(x(), f64::ln))
            }
        }
        ("", "Sum") => same(ins.iter().map(In::iv).reduce(add).unwrap_or(Interval::TOP)),
        ("", "Mean") => same(
            ins.iter()
                .map(In::iv)
                .reduce(Interval::hull)
                .map(|h| pad(h, ins.len() as f64 * U32))
                .unwrap_or(Interval::TOP),
        ),
        ("", "Max") => same(ins.iter().map(In::iv).reduce(max).unwrap_or(Interval::TOP)),
        ("", "Min") => same(ins.iter().map(In::iv).reduce(min).unwrap_or(Interval::TOP)),
        ("", "Mod") => {
            let b = arg(1).abs_max();
            if int_attr(n, "fmod") == Some(1) {
                same(Interval::new(-b, b).hull(Interval::point(0.0)))
            } else {
                // the result takes the divisor's sign
                same(Interval::new(arg(1).lo.min(0.0), arg(1).hi.max(0.0)))
            }
        }
        ("", "Clip") => {
            let (lo, hi) = if opset >= 11 {
                (
                    ins.get(1).and_then(|i| i.iv).unwrap_or(Interval::TOP),
                    ins.get(2).and_then(|i| i.iv).unwrap_or(Interval::TOP),
                )
            } else {
                (
                    Interval::point(float_attr(n, "min").unwrap_or(f64::NEG_INFINITY)),
                    Interval::point(float_attr(n, "max").unwrap_or(f64::INFINITY)),
                )
            };
            let lo = if lo == Interval::TOP {
                Interval::point(f64::NEG_INFINITY)
            } else {
                lo
            };
            let hi = if hi == Interval::TOP {
                Interval::point(f64::INFINITY)
            } else {
                hi
            };
            same(min(max(x(), lo), hi))
        }
        ("", "Relu") => same(max(x(), Interval::point(0.0))),
        ("", "LeakyRelu") => {
            let a = float_attr(n, "alpha").unwrap_or(0.01);
            let neg_part = mul(min(x(), Interval::point(0.0)), Interval::point(a));
            same(max(x(), Interval::point(0.0)).hull(neg_part))
        }
        ("", "PRelu") => {
            let neg_part = mul(min(x(), Interval::point(0.0)), arg(1));
            same(max(x(), Interval::point(0.0)).hull(neg_part))
        }
        ("", "Elu" | "Celu") => {
            // both rise monotonically for alpha > 0: x above 0, alpha (e^(x / a') - 1) below
            let a = float_attr(n, "alpha").unwrap_or(1.0);
            if a <= 0.0 {
                return same(Interval::TOP);
            }
            let celu = n.op_type == "Celu";
            same(mono(x(), |v| {
                if v >= 0.0 {
                    v
                } else if celu {
                    a * ((v / a).exp() - 1.0)
                } else {
                    a * (v.exp() - 1.0)
                }
            }))
        }
        ("", "Selu") => {
            let a = float_attr(n, "alpha").unwrap_or(1.673_263_2);
            let s = float_attr(n, "gamma").unwrap_or(1.050_701);
            same(mono(x(), |v| {
                if v > 0.0 {
                    s * v
                } else {
                    s * a * (v.exp() - 1.0)
                }
            }))
        }
        ("", "Sigmoid") => same(mono(x(), sigmoid)),
        ("", "HardSigmoid") => {
            let a = float_attr(n, "alpha").unwrap_or(0.2);
            let b = float_attr(n, "beta").unwrap_or(0.5);
            let y = add(mul(x(), Interval::point(a)), Interval::point(b));
            same(min(max(y, Interval::point(0.0)), Interval::point(1.0)))
        }
        ("", "HardSwish") => same(valley(x(), -1.5, -0.375, |v| {
            v * (v + 3.0).clamp(0.0, 6.0) / 6.0
        })),
        ("", "Tanh") => same(mono(x(), f64::tanh)),
        ("", "Erf") => same(mono(x(), erf)),
        ("", "Gelu") | ("com.microsoft", "Gelu" | "FastGelu" | "BiasGelu") => {
            // BiasGelu and FastGelu (with its optional bias) act on x + bias
            let x = match ins.get(1) {
                Some(b) if n.op_type != "Gelu" && b.iv.is_some() => add(arg(0), arg(1)),
                _ => x(),
            };
            // x * Phi(x) has one minimum, about -0.16997 at -0.7518; the tanh form lies within 1e-3 of it
            let v = valley(x, -0.7518, -0.1712, |v| v * phi(v));
            same(Interval::new(v.lo, v.hi + v.hi.abs() * 1e-3 + 1e-3))
        }
        ("com.microsoft", "QuickGelu") => {
            let a = float_attr(n, "alpha").unwrap_or(1.702);
            // x * sigmoid(a x) has its minimum -0.2785 / a at -1.2785 / a
            same(valley(x(), -1.2785 / a, -0.2785 / a - 1e-4, |v| {
                v * sigmoid(a * v)
            }))
        }
        ("", "Softplus") => same(mono(x(), |v| if v > 30.0 { v } else { v.exp().ln_1p() })),
        ("", "Softsign") => same(mono(x(), |v| v / (1.0 + v.abs()))),
        ("", "Mish") => same(valley(x(), -1.1924, -0.3089, |v| {
            v * (if v > 30.0 { v } else { v.exp().ln_1p() }).tanh()
        })),
        ("", "Sin" | "Cos") => same(Interval::new(-1.0, 1.0)),
        ("", "Atan") => same(mono(x(), f64::atan)),
        ("", "Asin" | "Acos") => same(Interval::new(-std::f64::consts::PI, std::f64::consts::PI)),
        ("", "Sinh") => same(mono(x(), f64::sinh)),
        ("", "Cosh") => same(valley(x(), 0.0, 1.0, f64::cosh)),
        ("", "Floor") => same(mono(x(), f64::floor)),
        ("", "Ceil") => same(mono(x(), f64::ceil)),
        ("", "Round") => same(mono(x(), f64::round)),
        ("", "Sign") => same(mono(x(), f64::signum).hull(Interval::point(0.0))),
        ("", "Softmax" | "Hardmax") => same(Interval::new(0.0, 1.0)),
        ("", "LogSoftmax") => {
            // x_i - max - ln(sum e^(x_j - max)): at least (lo - hi) - ln N, at most 0
            let ax = int_attr(n, "axis").unwrap_or(if opset >= 13 { -1 } else { 1 });
            let count = ins.first().and_then(|i| i.shape.as_ref()).and_then(|s| {
                let a = axis(ax, s.len())?;
                if opset >= 13 {
                    product(&s[a..=a])
                } else {
                    product(&s[a..])
                }
            });
            match count {
                Some(c) if x().is_bounded() => {
                    same(pad(Interval::new(x().lo - x().hi - c.ln(), 0.0), 8.0 * U32))
                }
                _ => same(Interval::new(f64::NEG_INFINITY, 0.0)),
            }
        }
        // reductions
        ("", "ReduceSum" | "ReduceL1" | "ReduceSumSquare" | "ReduceL2" | "ReduceLogSumExp") => {
            let Some(c) = reduced_count(n, ins, opset) else {
                return same(match n.op_type.as_str() {
                    "ReduceSumSquare" | "ReduceL2" | "ReduceL1" => {
                        Interval::new(0.0, f64::INFINITY)
                    }
                    _ => Interval::TOP,
                });
            };
            let term = match n.op_type.as_str() {
                "ReduceL1" => abs(x()),
                "ReduceSumSquare" | "ReduceL2" => square(x()),
                _ => x(),
            };
            let r = match n.op_type.as_str() {
                "ReduceLogSumExp" => Interval::new(x().lo + c.ln(), x().hi + c.ln()),
                "ReduceL2" => Interval::new((term.lo * c).sqrt(), (term.hi * c).sqrt()),
                _ => Interval::new(m(term.lo, c), m(term.hi, c)),
            };
            same(pad(r, (c + 2.0) * U32))
        }
        ("", "ReduceProd") => {
            let b = x().abs_max();
            match reduced_count(n, ins, opset) {
                Some(_) if b <= 1.0 => same(Interval::new(-b, b)),
                Some(c) => same(Interval::new(-(b.powf(c)), b.powf(c))),
                None if b <= 1.0 => same(Interval::new(-b, b)),
                None => same(Interval::TOP),
            }
        }
        ("", "CumSum") => {
            let ax = ins.get(1).and_then(|i| i.konst).and_then(values);
            let len = match (ax, ins.first().and_then(|i| i.shape.as_ref())) {
                (Some(a), Some(s)) if a.len() == 1 => {
                    axis(a[0] as i64, s.len()).map(|a| s[a]).filter(|&d| d >= 0)
                }
                _ => None,
            };
            match len {
                Some(l) => {
                    let l = l as f64;
                    same(pad(
                        Interval::new(m(x().lo.min(0.0), l), m(x().hi.max(0.0), l)),
                        (l + 2.0) * U32,
                    ))
                }
                None => same(Interval::TOP),
            }
        }
        // linear algebra with constant weights
        ("", "MatMul") => vec![matmul(ins)],
        ("", "Gemm") => vec![gemm(n, ins)],
        ("", "Conv") => vec![conv(ins)],
        ("", "ConvTranspose") => vec![conv_transpose(n, ins)],
        ("", "BatchNormalization") => {
            let mut v = vec![batch_norm(n, ins); outs];
            for (i, o) in v.iter_mut().enumerate().skip(1) {
                // training-mode statistics outputs: running mean / var
                *o = if i == 1 {
                    ins.get(3).map_or(Interval::TOP, In::iv)
                } else {
                    Interval::TOP
                };
            }
            v
        }
        ("", "LayerNormalization")
        | ("com.microsoft", "SimplifiedLayerNormalization")
        | ("", "RMSNormalization") => {
            let ax = int_attr(n, "axis").unwrap_or(-1);
            let eps = float_attr(n, "epsilon").unwrap_or(1e-5);
            let rms = n.op_type != "LayerNormalization";
            let count = ins
                .first()
                .and_then(|i| i.shape.as_ref())
                .and_then(|s| axis(ax, s.len()).and_then(|a| product(&s[a..])));
            let z = norm_bound(x(), count, eps, rms);
            let mut v = vec![Interval::TOP; outs];
            if !v.is_empty() {
                v[0] = affine_bound(z, ins.get(1), if rms { None } else { ins.get(2) });
            }
            if outs > 1 && !rms {
                v[1] = x();
            }
            if outs > 1 + usize::from(!rms) {
                v[1 + usize::from(!rms)] = Interval::new(0.0, 1.0 / eps.sqrt());
            }
            v
        }
        ("", "InstanceNormalization") => {
            let eps = float_attr(n, "epsilon").unwrap_or(1e-5);
            let count = ins
                .first()
                .and_then(|i| i.shape.as_ref())
                .filter(|s| s.len() > 2)
                .and_then(|s| product(&s[2..]));
            same(affine_bound(
                norm_bound(x(), count, eps, false),
                ins.get(1),
                ins.get(2),
            ))
        }
        ("", "GroupNormalization") => {
            let eps = float_attr(n, "epsilon").unwrap_or(1e-5);
            let groups = int_attr(n, "num_groups").unwrap_or(1).max(1);
            let count = ins
                .first()
                .and_then(|i| i.shape.as_ref())
                .filter(|s| s.len() >= 2 && s[1] >= 0 && s[1] % groups == 0)
                .and_then(|s| Some((s[1] / groups) as f64 * product(&s[2..])?));
            same(affine_bound(
                norm_bound(x(), count, eps, false),
                ins.get(1),
                ins.get(2),
            ))
        }
        ("", "LSTM" | "GRU" | "RNN") => recurrent(n, ins, outs),
        // generators and integer results
        ("", "Shape" | "Size" | "NonZero" | "ArgMax" | "ArgMin") => {
            same(Interval::new(0.0, i64::MAX as f64))
        }
        ("", "ConstantOfShape") => {
            let v = match n.attr("value").map(|a| &a.value) {
                Some(AttrValue::Tensor(t)) => const_interval(t).unwrap_or(Interval::TOP),
                _ => Interval::point(0.0),
            };
            same(v)
        }
        ("", "EyeLike") => same(Interval::new(0.0, 1.0)),
        ("", "OneHot") => same(ins.get(2).map_or(Interval::TOP, In::iv)),
        ("", "Range") => {
            // start + k * delta for k < ceil((limit - start) / delta): between start and limit
            same(arg(0).hull(arg(1)))
        }
        ("", "RandomUniform" | "RandomUniformLike") => same(Interval::new(
            float_attr(n, "low").unwrap_or(0.0),
            float_attr(n, "high").unwrap_or(1.0),
        )),
        (
            "",
            "Equal" | "Less" | "Greater" | "LessOrEqual" | "GreaterOrEqual" | "Not" | "And" | "Or"
            | "Xor" | "IsNaN" | "IsInf",
        ) => same(Interval::new(0.0, 1.0)),
        ("", "Trilu") => same(x().hull(Interval::point(0.0))),
        _ => same(Interval::TOP),
    }
}

/// Bound of a normalized value `(x - mean) / sqrt(var + eps)` (or `x / sqrt(mean(x^2) + eps)`) over `count`
/// elements: `sqrt(count - 1)` (`sqrt(count)` for RMS) since the squares sum to at most `count`, and
/// `width / sqrt(eps)` when the input is bounded.
fn norm_bound(x: Interval, count: Option<f64>, eps: f64, rms: bool) -> f64 {
    let by_count = count.map_or(f64::INFINITY, |c| {
        if rms {
            c.sqrt()
        } else {
            (c - 1.0).max(0.0).sqrt()
        }
    });
    let width = if rms { x.abs_max() } else { x.hi - x.lo };
    let by_eps = if eps > 0.0 && width.is_finite() {
        width / eps.sqrt()
    } else {
        f64::INFINITY
    };
    by_count.min(by_eps) * (1.0 + 64.0 * U32)
}

/// `z * scale + bias` for `|z| <= zb`, elementwise with constant scale and bias: the hull over elements.
fn affine_bound(zb: f64, scale: Option<&In>, bias: Option<&In>) -> Interval {
    if !zb.is_finite() {
        return Interval::TOP;
    }
    let z = Interval::new(-zb, zb);
    let sv = scale.and_then(|s| s.konst).and_then(values);
    let bv = bias.and_then(|b| b.konst).and_then(values);
    match (sv, bv) {
        (Some(s), Some(b)) if s.len() == b.len() => {
            let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
            for (s, b) in s.iter().zip(&b) {
                lo = lo.min(b - s.abs() * zb);
                hi = hi.max(b + s.abs() * zb);
            }
            pad(Interval::new(lo, hi), 4.0 * U32)
        }
        _ => {
            let s = scale.map_or(Interval::point(1.0), In::iv);
            let b = bias.map_or(Interval::point(0.0), In::iv);
            add(mul(z, s), b)
        }
    }
}

/// A constant's float elements, read in place when they are f32 (raw bytes or a float list; the weights of
/// a big model are never copied), else widened once.
enum Elems<'a> {
    F32(F32Data<'a>),
    Wide(Vec<f64>),
}

impl<'a> Elems<'a> {
    fn of(t: &'a Tensor) -> Option<Elems<'a>> {
        let n = t.numel()?;
        match F32Data::of(t) {
            Some(d) if d.len() == n => Some(Elems::F32(d)),
            _ => values(t).map(Elems::Wide),
        }
    }

    fn len(&self) -> usize {
        match self {
            Elems::F32(d) => d.len(),
            Elems::Wide(v) => v.len(),
        }
    }

    /// Calls `f(j, x)` for the elements `start + j`, `j < len`, in order.
    #[inline(always)]
    fn each(&self, start: usize, len: usize, mut f: impl FnMut(usize, f64)) {
        match self {
            Elems::F32(d) => d.each(start, len, |j, x| f(j, x as f64)),
            Elems::Wide(v) => {
                for (j, &x) in v[start..start + len].iter().enumerate() {
                    f(j, x);
                }
            }
        }
    }
}

/// The sums of the positive and of the negative weights of one output column: `sum_k x_k w_k` for `x` in
/// `[lo, hi]` lies in `[P lo + N hi, P hi + N lo]`.
#[derive(Clone, Copy, Debug, Default)]
struct SignSums {
    pos: f64,
    neg: f64,
}

impl SignSums {
    /// Selects, no branches, so that a row loop vectorizes; a NaN or infinite weight makes `neg` NaN
    /// through `w * 0` (which is +-0 for every finite weight).
    #[inline]
    fn add(&mut self, w: f64) {
        self.pos += if w > 0.0 { w } else { 0.0 };
        self.neg += (if w < 0.0 { w } else { 0.0 }) + w * 0.0;
    }

    fn bound(self, x: Interval) -> Interval {
        if self.pos.is_nan() || self.neg.is_nan() {
            return Interval::TOP;
        }
        Interval::new(
            m(self.pos, x.lo) + m(self.neg, x.hi),
            m(self.pos, x.hi) + m(self.neg, x.lo),
        )
    }
}

/// Sign sums of `cols` columns stored one after the other, `k` weights each, from element `start`. f32
/// weights are summed in eight lanes (a sum in one accumulator cannot vectorize); the order changes the f64
/// sums by about `k` units of 2^-53, far inside the f32 rounding that [`columns_bound`] pads for.
///
/// The columns are summed in parallel (rayon tasks of at least 64K weights): a convolution's or projection's
/// weights are the biggest reads of the range analysis.
fn contiguous_columns(w: &Elems, start: usize, cols: usize, k: usize) -> Vec<SignSums> {
    use rayon::prelude::*;
    (0..cols)
        .into_par_iter()
        .with_min_len((1 << 16) / k.max(1))
        .map(|c| match w {
            Elems::F32(d) => {
                // positive and negative sums in separate arrays (not eight `SignSums`), so that each is
                // one run of f64 lanes: interleaved, the loop stayed scalar
                let (pos, neg) =
                    d.range(start + c * k, k)
                        .lanes(([0f64; 8], [0f64; 8]), |(pos, neg), j, x| {
                            let mut s = SignSums {
                                pos: pos[j],
                                neg: neg[j],
                            };
                            s.add(x as f64);
                            (pos[j], neg[j]) = (s.pos, s.neg);
                        });
                SignSums {
                    pos: pos.iter().sum(),
                    neg: neg.iter().sum(),
                }
            }
            Elems::Wide(_) => {
                let mut s = SignSums::default();
                w.each(start + c * k, k, |_, x| s.add(x));
                s
            }
        })
        .collect()
}

/// The column sums of a rank-2 weight read row by row: what `MatMul` with a constant B and `Gemm` with a
/// constant B and `transB = 0` bound their outputs with.
pub(crate) struct Columns(Vec<SignSums>);

/// True when node `n`'s rule bounds it with the [`Columns`] of its input `slot` (when constant and rank 2):
/// input B of a `MatMul`, or of a `Gemm` without `transB`.
pub(crate) fn uses_columns(n: &Node, slot: u32) -> bool {
    slot == 1
        && n.in_default_domain()
        && (n.op_type == "MatMul"
            || (n.op_type == "Gemm" && int_attr(n, "transB").unwrap_or(0) != 1))
}

/// [`Columns`] of a rank-2 constant (None for other ranks, empty ones and unreadable data). analyze-ranges
/// computes them in the task that has just scanned the weight for its interval, while its data is still in
/// cache: computed later, when the rule runs, they read the weight from memory a second time (vit_tiny's
/// 22 MB of MatMul weights are bigger than the L3 cache, and the sums' loop waited on those reads).
pub(crate) fn weight_columns(t: &Tensor) -> Option<Columns> {
    let [k, nn] = t.dims[..] else { return None };
    let (k, nn) = (usize::try_from(k).ok()?, usize::try_from(nn).ok()?);
    let w = Elems::of(t)?;
    (k * nn > 0 && w.len() == k * nn).then(|| Columns(row_major_columns(&w, 0, k, nn)))
}

/// Sign sums of the `cols` columns of a row-major `[k, cols]` block from element `start`.
///
/// The rows are split into at most [`ROW_PIECES`] pieces of at least 64K weights, summed in parallel, each a
/// contiguous read into its own per-column sums, which are then added in piece order. Bands of columns, each
/// over every row, had each task read a few cache lines per row and jump to the next row: on vit_tiny that
/// ran at a third of the speed of a straight read. The pieces depend on the shape only, never on the number
/// of threads, so the sums are the same on every machine.
fn row_major_columns(w: &Elems, start: usize, k: usize, cols: usize) -> Vec<SignSums> {
    use rayon::prelude::*;
    let rows = row_pieces(k, cols);
    let pieces: Vec<(Vec<f64>, Vec<f64>)> = (0..k.div_ceil(rows.max(1)))
        .into_par_iter()
        .map(|p| {
            let (mut pos, mut neg) = (vec![0f64; cols], vec![0f64; cols]);
            let (first, end) = (p * rows, ((p + 1) * rows).min(k));
            match w {
                Elems::F32(d) => sign_sums_rows(
                    &mut pos,
                    &mut neg,
                    d.range(start + first * cols, (end - first) * cols),
                ),
                Elems::Wide(_) => {
                    for i in first..end {
                        w.each(start + i * cols, cols, |c, x| {
                            let mut s = SignSums {
                                pos: pos[c],
                                neg: neg[c],
                            };
                            s.add(x);
                            (pos[c], neg[c]) = (s.pos, s.neg);
                        })
                    }
                }
            }
            (pos, neg)
        })
        .collect();
    let mut sums = vec![SignSums::default(); cols];
    for (pos, neg) in pieces {
        for ((s, p), q) in sums.iter_mut().zip(pos).zip(neg) {
            s.pos += p;
            s.neg += q;
        }
    }
    sums
}

/// The most pieces [`row_major_columns`] splits a block's rows into: each holds two f64 sums per column, so
/// that a wide block (a classifier's `[384, 30522]` head) needs at most 16 x 30522 x 16 bytes at once.
const ROW_PIECES: usize = 16;

/// Rows per piece of [`row_major_columns`]: at least 64K weights a piece, at most [`ROW_PIECES`] pieces.
fn row_pieces(k: usize, cols: usize) -> usize {
    let by_size = ((1usize << 16) / cols.max(1)).max(1);
    by_size.max(k.div_ceil(ROW_PIECES)).max(1)
}

/// Adds rows of f32 weights (row-major, `pos.len()` columns each) to the columns' positive and negative sums
/// ([`SignSums::add`] for each), four rows per sweep over the columns: a column's sums stay in registers
/// across the four, added to in row order as one row at a time would (the same bits). One row a sweep, the
/// loop spent its time loading and storing the sums (perf: the f64 adds from memory and the stores were
/// three quarters of its samples on vit_tiny). With AVX2 where the CPU has it: the binary targets baseline
/// x86-64, and closures given to `pulp`'s dispatch here were compiled without it.
fn sign_sums_rows(pos: &mut [f64], neg: &mut [f64], rows: F32Data) {
    assert_eq!(
        rows.len() % pos.len().max(1),
        0,
        "sign_sums_rows: a partial row"
    );
    match rows {
        F32Data::Bytes(b) => sign_sums_dispatch(pos, neg, b.as_chunks::<4>().0),
        F32Data::Floats(v) => sign_sums_dispatch(pos, neg, v),
    }
}

/// One f32 weight as a tensor holds it: in `float_data`, or as four little-endian bytes of `raw_data`.
trait WeightElem {
    fn value(&self) -> f32;
}
impl WeightElem for f32 {
    #[inline(always)]
    fn value(&self) -> f32 {
        *self
    }
}
impl WeightElem for [u8; 4] {
    #[inline(always)]
    fn value(&self) -> f32 {
        f32::from_le_bytes(*self)
    }
}

/// [`sign_sums_rows`]' loop, with AVX2 where the CPU has it.
fn sign_sums_dispatch<E: WeightElem>(pos: &mut [f64], neg: &mut [f64], rows: &[E]) {
    #[inline(always)]
    fn add(p: &mut f64, q: &mut f64, x: f32) {
        let x = x as f64;
        *p += if x > 0.0 { x } else { 0.0 };
        *q += (if x < 0.0 { x } else { 0.0 }) + x * 0.0;
    }
    /// `rows` of `pos.len()` elements each: four a sweep, then the rest one at a time.
    #[inline(always)]
    fn sweeps<E: WeightElem>(pos: &mut [f64], neg: &mut [f64], rows: &[E]) {
        let w = pos.len();
        if w == 0 {
            return;
        }
        let mut fours = rows.chunks_exact(4 * w);
        for four in &mut fours {
            let (r0, rest) = four.split_at(w);
            let (r1, rest) = rest.split_at(w);
            let (r2, r3) = rest.split_at(w);
            let ws = r0.iter().zip(r1).zip(r2.iter().zip(r3));
            for ((p, q), ((a, b), (c, d))) in pos.iter_mut().zip(neg.iter_mut()).zip(ws) {
                let (mut sp, mut sq) = (*p, *q);
                for v in [a, b, c, d] {
                    add(&mut sp, &mut sq, v.value());
                }
                (*p, *q) = (sp, sq);
            }
        }
        for row in fours.remainder().chunks_exact(w) {
            for ((p, q), v) in pos.iter_mut().zip(neg.iter_mut()).zip(row) {
                add(p, q, v.value());
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        unsafe fn avx2<E: WeightElem>(pos: &mut [f64], neg: &mut [f64], rows: &[E]) {
            sweeps(pos, neg, rows)
        }
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above)
            return unsafe { avx2(pos, neg, rows) };
        }
    }
    sweeps(pos, neg, rows)
}

/// True when `sum_k x_k w_k`, for every `x_k` within `x` and constant weights whose exact min and max are
/// `w`, is unbounded both ways in some columns: an infinite end of `x` meets a weight of the sign that carries
/// the sum there (a column with a negative weight goes to -inf as `x` goes to +inf, ...). The column sums,
/// a read of every weight, cannot bound it then: the result is TOP. On image models without declared input
/// ranges most convolutions read such inputs.
fn products_unbounded(x: Interval, w: Option<Interval>) -> bool {
    let Some(w) = w else { return false };
    let (to_lo, to_hi) = (x.lo == f64::NEG_INFINITY, x.hi == f64::INFINITY);
    let down = (to_hi && w.lo < 0.0) || (to_lo && w.hi > 0.0);
    let up = (to_hi && w.hi > 0.0) || (to_lo && w.lo < 0.0);
    down && up
}

/// The hull over columns of `sum_k x_k w_k` for `x` in an interval, with the rounding of `k`-term f32 sums.
fn columns_bound(x: Interval, sums: &[SignSums], k: usize) -> Interval {
    let r = sums
        .iter()
        .map(|s| s.bound(x))
        .reduce(Interval::hull)
        .unwrap_or(Interval::point(0.0));
    pad(r, (k as f64 + 2.0) * U32)
}

/// The hull of `f(batch)` over the batches of a constant of `len` values, `per` values a batch (TOP when
/// there is none).
fn per_batch(len: usize, per: usize, f: impl Fn(usize) -> Interval) -> Interval {
    (0..len / per.max(1))
        .map(f)
        .reduce(Interval::hull)
        .unwrap_or(Interval::TOP)
}

fn matmul(ins: &[In]) -> Interval {
    let (a, b) = match (ins.first(), ins.get(1)) {
        (Some(a), Some(b)) => (a, b),
        _ => return Interval::TOP,
    };
    // constant B [..., K, N]: per column of each batch
    if let Some(t) = b.konst
        && let s = &t.dims
        && s.len() >= 2
        && let Some(w) = Elems::of(t)
    {
        if products_unbounded(a.iv(), b.iv) {
            return Interval::TOP;
        }
        let (k, nn) = (s[s.len() - 2] as usize, s[s.len() - 1] as usize);
        if let Some(Columns(sums)) = b.columns {
            return columns_bound(a.iv(), sums, k);
        }
        return per_batch(w.len(), k * nn, |bt| {
            columns_bound(a.iv(), &row_major_columns(&w, bt * k * nn, k, nn), k)
        });
    }
    // constant A [..., M, K]: per row
    if let Some(t) = a.konst
        && let s = &t.dims
        && s.len() >= 2
        && let Some(w) = Elems::of(t)
    {
        if products_unbounded(b.iv(), a.iv) {
            return Interval::TOP;
        }
        let (mm, k) = (s[s.len() - 2] as usize, s[s.len() - 1] as usize);
        return per_batch(w.len(), mm * k, |bt| {
            columns_bound(b.iv(), &contiguous_columns(&w, bt * mm * k, mm, k), k)
        });
    }
    // both variable: K products
    let k = a
        .shape
        .as_ref()
        .and_then(|s| s.last().copied())
        .or_else(|| {
            b.shape.as_ref().and_then(|s| {
                if s.len() >= 2 {
                    Some(s[s.len() - 2])
                } else {
                    s.first().copied()
                }
            })
        });
    match k {
        Some(k) if k >= 0 => {
            let p = mul(a.iv(), b.iv());
            let k = k as f64;
            pad(
                Interval::new(m(p.lo, k).min(0.0).min(p.lo), m(p.hi, k).max(0.0).max(p.hi)),
                (k + 2.0) * U32,
            )
        }
        _ => Interval::TOP,
    }
}

fn gemm(n: &Node, ins: &[In]) -> Interval {
    let alpha = float_attr(n, "alpha").unwrap_or(1.0);
    let beta = float_attr(n, "beta").unwrap_or(1.0);
    let ta = int_attr(n, "transA").unwrap_or(0) == 1;
    let tb = int_attr(n, "transB").unwrap_or(0) == 1;
    let (Some(a), Some(b)) = (ins.first(), ins.get(1)) else {
        return Interval::TOP;
    };
    let prod = match (b.konst, b.konst.map(|t| &t.dims)) {
        (Some(_), Some(s)) if s.len() == 2 && products_unbounded(a.iv(), b.iv) => Interval::TOP,
        (Some(t), Some(s)) if s.len() == 2 => match Elems::of(t) {
            Some(w) => {
                let (k, nn) = if tb {
                    (s[1] as usize, s[0] as usize)
                } else {
                    (s[0] as usize, s[1] as usize)
                };
                let bound = |sums: &[SignSums]| columns_bound(a.iv(), sums, k);
                // precomputed sums are by rows: a transposed B is read by columns
                match (tb, b.columns) {
                    (true, _) => bound(&contiguous_columns(&w, 0, nn, k)),
                    (false, Some(Columns(sums))) => bound(sums),
                    (false, None) => bound(&row_major_columns(&w, 0, k, nn)),
                }
            }
            None => Interval::TOP,
        },
        _ => {
            let k = a
                .shape
                .as_ref()
                .filter(|s| s.len() == 2)
                .map(|s| if ta { s[0] } else { s[1] })
                .filter(|&k| k >= 0);
            match k {
                Some(k) => {
                    let p = mul(a.iv(), b.iv());
                    let k = k as f64;
                    Interval::new(m(p.lo, k).min(0.0), m(p.hi, k).max(0.0))
                }
                None => Interval::TOP,
            }
        }
    };
    let r = mul(prod, Interval::point(alpha));
    match ins.get(2).and_then(|c| c.iv) {
        Some(c) => add(r, mul(c, Interval::point(beta))),
        None => r,
    }
}

/// Per output channel of a convolution with constant weights `W [M, C/group, k...]`; padding reads zeros, so
/// the input interval is widened to hold 0.
fn conv(ins: &[In]) -> Interval {
    let (Some(x), Some(w)) = (ins.first(), ins.get(1)) else {
        return Interval::TOP;
    };
    let (Some(t), Some(s)) = (w.konst, w.konst.map(|t| &t.dims)) else {
        return conv_variable(x, w);
    };
    if products_unbounded(x.iv().hull(Interval::point(0.0)), w.iv) {
        return Interval::TOP;
    }
    let Some(wv) = Elems::of(t) else {
        return Interval::TOP;
    };
    let mch = s[0].max(1) as usize;
    let per = wv.len() / mch;
    let xi = x.iv().hull(Interval::point(0.0));
    let sums = contiguous_columns(&wv, 0, mch, per);
    let r = columns_bound(xi, &sums, per);
    let r = per_channel_bias(r, &sums, per, xi, ins.get(2));
    pad(r, (per as f64 + 2.0) * U32)
}

/// Adds a bias per output channel when it is constant (tighter than adding the intervals).
fn per_channel_bias(
    r: Interval,
    sums: &[SignSums],
    k: usize,
    xi: Interval,
    bias: Option<&In>,
) -> Interval {
    let Some(b) = bias else { return r };
    match b.konst.and_then(values) {
        Some(bv) if bv.len() == sums.len() => {
            let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
            for (s, bc) in sums.iter().zip(&bv) {
                let ch = columns_bound(xi, std::slice::from_ref(s), k);
                lo = lo.min(ch.lo + bc);
                hi = hi.max(ch.hi + bc);
            }
            Interval::new(lo, hi)
        }
        _ => add(r, b.iv()),
    }
}

fn conv_variable(x: &In, w: &In) -> Interval {
    match w.shape.as_ref() {
        Some(s) if !s.is_empty() && product(&s[1..]).is_some() => {
            let k = product(&s[1..]).unwrap_or(0.0);
            let p = mul(x.iv().hull(Interval::point(0.0)), w.iv());
            Interval::new(m(p.lo, k).min(0.0), m(p.hi, k).max(0.0))
        }
        _ => Interval::TOP,
    }
}

/// Transposed convolution `W [C, M/group, k...]`: an output gets at most every tap of every input channel of
/// its group; each term lies between 0 (tap absent) and `w * x`.
fn conv_transpose(n: &Node, ins: &[In]) -> Interval {
    let group = int_attr(n, "group").unwrap_or(1).max(1) as usize;
    let (Some(x), Some(w)) = (ins.first(), ins.get(1)) else {
        return Interval::TOP;
    };
    let (Some(t), Some(s)) = (w.konst, w.konst.map(|t| &t.dims)) else {
        return Interval::TOP;
    };
    let Some(wv) = values(t) else {
        return Interval::TOP;
    };
    if s.len() < 2 {
        return Interval::TOP;
    }
    let (c, mg) = (s[0] as usize, s[1] as usize);
    let taps: usize = s[2..].iter().map(|&d| d as usize).product();
    let cg = c / group;
    let xi = x.iv().hull(Interval::point(0.0));
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for gi in 0..group {
        for mo in 0..mg {
            let (mut l, mut h) = (0.0, 0.0);
            for ci in gi * cg..(gi + 1) * cg {
                for k in 0..taps {
                    let wv = wv[(ci * mg + mo) * taps + k];
                    let (a, b) = (m(wv, xi.lo), m(wv, xi.hi));
                    l += a.min(b).min(0.0);
                    h += a.max(b).max(0.0);
                }
            }
            lo = lo.min(l);
            hi = hi.max(h);
        }
    }
    let r = Interval::new(lo, hi);
    let r = match ins.get(2) {
        Some(b) => add(r, b.iv()),
        None => r,
    };
    pad(r, ((cg * taps) as f64 + 2.0) * U32)
}

/// Inference BatchNormalization: per channel `scale / sqrt(var + eps) * (x - mean) + bias`.
fn batch_norm(n: &Node, ins: &[In]) -> Interval {
    let eps = float_attr(n, "epsilon").unwrap_or(1e-5);
    let x = ins.first().map_or(Interval::TOP, In::iv);
    let consts: Option<Vec<Vec<f64>>> = (1..5)
        .map(|i| ins.get(i).and_then(|a| a.konst).and_then(values))
        .collect();
    if let Some(c) = consts
        && c.iter().all(|v| v.len() == c[0].len())
    {
        let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
        for (((s, bias), mean), var) in c[0].iter().zip(&c[1]).zip(&c[2]).zip(&c[3]) {
            let a = s / (var + eps).sqrt();
            let b = bias - mean * a;
            let (p, q) = (m(a, x.lo) + b, m(a, x.hi) + b);
            lo = lo.min(p.min(q));
            hi = hi.max(p.max(q));
        }
        return pad(Interval::new(lo, hi), 8.0 * U32);
    }
    let iv = |i: usize| ins.get(i).map_or(Interval::TOP, In::iv);
    let inv = recip(mono(add(iv(4), Interval::point(eps)), |v| {
        v.max(0.0).sqrt()
    }));
    add(mul(mul(sub(x, iv(3)), inv), iv(1)), iv(2))
}

/// The largest sum of |weights| of one axis of cubic interpolation with coefficient `a`, for `a <= 0`
/// (ONNX's default is -0.75, TensorFlow's -0.5): the two inner taps `(1-t)(1 + t - (a+2)t^2)` are then
/// non-negative, each outer tap is `a * t(1-t)^2` (at most `|a| * 4/27` in magnitude), and the four sum to 1,
/// so the sum of magnitudes is `1 + 2 * (negative part) <= 1 + 16|a|/27`. Taps outside the input read the
/// edge pixel, which keeps the weights. Not bounded here (None): `a > 0`, where the inner taps can go
/// negative, and `exclude_outside = 1`, which renormalizes by the kept weights (less than 1 when an inner
/// tap falls outside).
fn cubic_gain(a: f64, exclude_outside: bool) -> Option<f64> {
    (a <= 0.0 && !exclude_outside).then(|| 1.0 + 16.0 * a.abs() / 27.0)
}

/// Recurrent layers with their default activations: hidden states are tanh-bounded (LSTM: `o * tanh(c)`,
/// GRU: a convex mix of tanh and the previous state); the LSTM cell grows by at most 1 per step.
fn recurrent(n: &Node, ins: &[In], outs: usize) -> Vec<Interval> {
    let mut v = vec![Interval::TOP; outs];
    if n.attr("activations").is_some() || n.attr("clip").is_some() {
        return v;
    }
    let unit = Interval::new(-1.0, 1.0);
    let init_h = ins
        .get(5)
        .and_then(|i| i.iv)
        .unwrap_or(Interval::point(0.0));
    let h = match n.op_type.as_str() {
        "LSTM" => unit,
        _ => unit.hull(init_h),
    };
    for o in v.iter_mut().take(2) {
        *o = pad(h, 8.0 * U32);
    }
    if n.op_type == "LSTM" && outs > 2 {
        let layout = int_attr(n, "layout").unwrap_or(0);
        let steps = ins
            .first()
            .and_then(|i| i.shape.as_ref())
            .and_then(|s| s.get(if layout == 0 { 0 } else { 1 }).copied())
            .filter(|&d| d >= 0)
            .map(|d| d as f64);
        let c0 = ins
            .get(6)
            .and_then(|i| i.iv)
            .unwrap_or(Interval::point(0.0));
        if let Some(t) = steps {
            let b = c0.abs_max() + t;
            v[2] = pad(Interval::new(-b, b), (t + 2.0) * 8.0 * U32);
        }
    }
    v
}

/// The constant tensor behind a value: an initializer, or a Constant node's `value`.
pub(crate) fn constant_of(g: &Graph, v: ValueId) -> Option<&Tensor> {
    if let Some(t) = g.value(v).initializer.as_deref() {
        return Some(t);
    }
    let (p, _) = g.producer(v)?;
    let node = g.node(p);
    if node.op_type != "Constant" || !node.in_default_domain() {
        return None;
    }
    match node.attr("value").map(|a| &a.value) {
        Some(AttrValue::Tensor(t)) => Some(t),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
        fn within(&mut self, i: Interval) -> f64 {
            // ends sampled often: extremes of interval functions sit there
            match (self.next() * 8.0) as u32 {
                0 => i.lo,
                1 => i.hi,
                _ => i.lo + (i.hi - i.lo) * self.next(),
            }
        }
    }

    const CASES: &[(f64, f64)] = &[
        (-3.0, 5.0),
        (0.5, 2.0),
        (-4.0, -0.25),
        (-0.1, 0.1),
        (0.0, 10.0),
        (-20.0, 3.0),
    ];

    /// Checks `f`'s samples lie within `bound` for unary ops.
    fn check_unary(name: &str, bound: impl Fn(Interval) -> Interval, f: impl Fn(f64) -> f64) {
        let mut r = Rng(0x9e3779b97f4a7c15);
        for &(lo, hi) in CASES {
            let i = Interval::new(lo, hi);
            let b = bound(i);
            for _ in 0..2000 {
                let x = r.within(i);
                let y = f(x);
                if y.is_nan() {
                    assert_eq!(b, Interval::TOP, "{name}({x}) is NaN but {b} claimed");
                    continue;
                }
                assert!(b.contains(y), "{name}({x}) = {y} outside {b} for input {i}");
            }
        }
    }

    fn check_binary(
        name: &str,
        bound: impl Fn(Interval, Interval) -> Interval,
        f: impl Fn(f64, f64) -> f64,
    ) {
        let mut r = Rng(0x2545f4914f6cdd1d);
        for &(al, ah) in CASES {
            for &(bl, bh) in CASES {
                let (a, b) = (Interval::new(al, ah), Interval::new(bl, bh));
                let out = bound(a, b);
                for _ in 0..500 {
                    let (x, y) = (r.within(a), r.within(b));
                    let z = f(x, y);
                    if z.is_nan() || z.is_infinite() {
                        assert!(
                            !out.is_bounded(),
                            "{name}({x}, {y}) = {z} but {out} claimed"
                        );
                        continue;
                    }
                    assert!(
                        out.contains(z),
                        "{name}({x}, {y}) = {z} outside {out} for {a}, {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn arithmetic_against_sampling() {
        check_binary("add", add, |a, b| a + b);
        check_binary("sub", sub, |a, b| a - b);
        check_binary("mul", mul, |a, b| a * b);
        check_binary("div", div, |a, b| a / b);
        check_binary("max", max, f64::max);
        check_binary("min", min, f64::min);
        check_binary("pow", pow, f64::powf);
        for e in [2.0, 3.0, -1.0, -2.0, 0.5, 1.5] {
            check_unary(
                &format!("pow {e}"),
                |x| pow(x, Interval::point(e)),
                |x| x.powf(e),
            );
        }
        check_unary("abs", abs, f64::abs);
        check_unary("square", square, |x| x * x);
        check_unary("recip", recip, |x| 1.0 / x);
        check_unary("neg", neg, |x| -x);
    }

    /// Runs one node's transfer on scalar-interval inputs.
    fn node_bound(op: &str, attrs: &[(&str, AttrValue)], ins: Vec<In>) -> Interval {
        let mut n = Node::new(op);
        for (k, v) in attrs {
            n.attributes.push(mpopt_ir::Attribute::new(*k, v.clone()));
        }
        let mut g = Graph::new("t");
        let y = g.add_value("y", None).unwrap();
        let id = g.add_node(n, &[], &[Some(y)]).unwrap();
        transfer(&g, g.node(id), &ins, 18)[0]
    }

    fn scalar(i: Interval) -> In<'static> {
        In {
            iv: Some(i),
            konst: None,
            shape: None,
            columns: None,
        }
    }

    #[test]
    fn activations_against_sampling() {
        type Case<'a> = (&'a str, &'a [(&'a str, AttrValue)], fn(f64) -> f64);
        let unary: &[Case] = &[
            ("Relu", &[], |x| x.max(0.0)),
            ("Sigmoid", &[], sigmoid),
            ("Tanh", &[], f64::tanh),
            ("Exp", &[], f64::exp),
            ("Log", &[], f64::ln),
            ("Sqrt", &[], f64::sqrt),
            ("Erf", &[], erf),
            ("Gelu", &[], |x| x * phi(x)),
            ("HardSwish", &[], |x| x * (x + 3.0).clamp(0.0, 6.0) / 6.0),
            ("HardSigmoid", &[], |x| (0.2 * x + 0.5).clamp(0.0, 1.0)),
            ("LeakyRelu", &[], |x| if x < 0.0 { 0.01 * x } else { x }),
            ("Elu", &[], |x| if x < 0.0 { x.exp() - 1.0 } else { x }),
            ("Softplus", &[], |x| x.exp().ln_1p()),
            ("Softsign", &[], |x| x / (1.0 + x.abs())),
            ("Cosh", &[], f64::cosh),
            ("Sinh", &[], f64::sinh),
            ("Floor", &[], f64::floor),
            ("Sign", &[], |x| if x == 0.0 { 0.0 } else { x.signum() }),
            ("Mish", &[], |x| x * x.exp().ln_1p().tanh()),
        ];
        for (op, attrs, f) in unary {
            check_unary(op, |i| node_bound(op, attrs, vec![scalar(i)]), f);
        }
    }

    fn konst(t: &Tensor) -> In<'_> {
        In {
            iv: const_interval(t),
            konst: Some(t),
            shape: Some(t.dims.clone()),
            columns: None,
        }
    }

    #[test]
    fn matmul_conv_against_sampling() {
        let mut r = Rng(7);
        let w: Vec<f32> = (0..12).map(|_| (r.next() * 2.0 - 1.0) as f32).collect();
        let wt = Tensor::from_f32(vec![4, 3], &w);
        for &(lo, hi) in CASES {
            let xi = Interval::new(lo, hi);
            let b = node_bound(
                "MatMul",
                &[],
                vec![
                    In {
                        iv: Some(xi),
                        konst: None,
                        shape: Some(vec![2, 4]),
                        columns: None,
                    },
                    konst(&wt),
                ],
            );
            for _ in 0..2000 {
                let x: Vec<f64> = (0..4).map(|_| r.within(xi)).collect();
                for c in 0..3 {
                    let y: f64 = (0..4).map(|k| x[k] * w[k * 3 + c] as f64).sum();
                    assert!(b.contains(y), "matmul {y} outside {b}");
                }
            }
            // Conv: weights [M=3, C=2, 2] read as 3 channels of 4 taps; padding reads zeros
            let cw = Tensor::from_f32(vec![3, 2, 2], &w);
            let cb = node_bound(
                "Conv",
                &[],
                vec![
                    In {
                        iv: Some(xi),
                        konst: None,
                        shape: Some(vec![1, 2, 5]),
                        columns: None,
                    },
                    konst(&cw),
                ],
            );
            for _ in 0..2000 {
                let x: Vec<f64> = (0..4)
                    .map(|_| if r.next() < 0.2 { 0.0 } else { r.within(xi) })
                    .collect();
                for c in 0..3 {
                    let y: f64 = (0..4).map(|k| x[k] * w[c * 4 + k] as f64).sum();
                    assert!(cb.contains(y), "conv {y} outside {cb}");
                }
            }
        }
    }

    #[test]
    fn normalizations_against_sampling() {
        let mut r = Rng(11);
        let scale = Tensor::from_f32(vec![6], &[1.0, -2.0, 0.5, 1.5, 0.1, 3.0]);
        let bias = Tensor::from_f32(vec![6], &[0.0, 1.0, -1.0, 0.5, 2.0, -3.0]);
        for &(lo, hi) in CASES {
            let xi = Interval::new(lo, hi);
            let b = node_bound(
                "LayerNormalization",
                &[("epsilon", AttrValue::Float(1e-5))],
                vec![
                    In {
                        iv: Some(xi),
                        konst: None,
                        shape: Some(vec![2, 6]),
                        columns: None,
                    },
                    konst(&scale),
                    konst(&bias),
                ],
            );
            assert!(b.is_bounded());
            for _ in 0..3000 {
                // extreme rows: one outlier among equal values reaches the bound sqrt(N - 1)
                let x: Vec<f64> = (0..6)
                    .map(|i| {
                        if r.next() < 0.5 && i > 0 {
                            xi.lo
                        } else {
                            r.within(xi)
                        }
                    })
                    .collect();
                let mean = x.iter().sum::<f64>() / 6.0;
                let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / 6.0;
                for j in 0..6 {
                    let s = [1.0, -2.0, 0.5, 1.5, 0.1, 3.0][j];
                    let bb = [0.0, 1.0, -1.0, 0.5, 2.0, -3.0][j];
                    let y = (x[j] - mean) / (var + 1e-5).sqrt() * s + bb;
                    assert!(b.contains(y), "layernorm {y} outside {b}");
                }
            }
        }
        // sum and mean reductions over 4 elements
        for &(lo, hi) in CASES {
            let xi = Interval::new(lo, hi);
            let shape = Some(vec![3, 4]);
            let axes = Tensor::from_i64(vec![1], &[1]);
            let sb = node_bound(
                "ReduceSum",
                &[],
                vec![
                    In {
                        iv: Some(xi),
                        konst: None,
                        shape: shape.clone(),
                        columns: None,
                    },
                    konst(&axes),
                ],
            );
            for _ in 0..1000 {
                let y: f64 = (0..4).map(|_| r.within(xi)).sum();
                assert!(sb.contains(y), "reduce sum {y} outside {sb}");
            }
        }
    }

    fn var(i: Interval, shape: Vec<i64>) -> In<'static> {
        In {
            iv: Some(i),
            konst: None,
            shape: Some(shape),
            columns: None,
        }
    }

    #[test]
    fn clip_where_reductions_against_sampling() {
        let mut r = Rng(23);
        for &(lo, hi) in CASES {
            let xi = Interval::new(lo, hi);
            let (a, b) = (
                Tensor::from_f32(vec![], &[-0.5]),
                Tensor::from_f32(vec![], &[2.0]),
            );
            let cb = node_bound("Clip", &[], vec![scalar(xi), konst(&a), konst(&b)]);
            let wb = node_bound(
                "Where",
                &[],
                vec![scalar(Interval::new(0.0, 1.0)), scalar(xi), konst(&b)],
            );
            let axes = Tensor::from_i64(vec![1], &[1]);
            let shape = vec![2, 5];
            let red = |op: &str| node_bound(op, &[], vec![var(xi, shape.clone()), konst(&axes)]);
            let (ssq, l2, lse, l1) = (
                red("ReduceSumSquare"),
                red("ReduceL2"),
                red("ReduceLogSumExp"),
                red("ReduceL1"),
            );
            let ls = node_bound("LogSoftmax", &[], vec![var(xi, shape.clone())]);
            let cs = node_bound("CumSum", &[], vec![var(xi, shape.clone()), konst(&axes)]);
            for _ in 0..2000 {
                let x = r.within(xi);
                assert!(cb.contains(x.clamp(-0.5, 2.0)), "clip");
                assert!(wb.contains(x) && wb.contains(2.0), "where");
                let v: Vec<f64> = (0..5).map(|_| r.within(xi)).collect();
                let sq: f64 = v.iter().map(|x| x * x).sum();
                assert!(ssq.contains(sq), "sum square {sq} outside {ssq}");
                assert!(l2.contains(sq.sqrt()), "l2");
                assert!(l1.contains(v.iter().map(|x| x.abs()).sum()), "l1");
                let m = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let s: f64 = v.iter().map(|x| (x - m).exp()).sum();
                assert!(lse.contains(m + s.ln()), "logsumexp");
                for x in &v {
                    assert!(
                        ls.contains(x - m - s.ln()),
                        "logsoftmax {} outside {ls}",
                        x - m - s.ln()
                    );
                }
                let mut acc = 0.0;
                for x in &v {
                    acc += x;
                    assert!(cs.contains(acc), "cumsum {acc} outside {cs}");
                }
            }
        }
    }

    #[test]
    fn batchnorm_gemm_conv_transpose_against_sampling() {
        let mut r = Rng(31);
        let scale = Tensor::from_f32(vec![2], &[1.5, -0.5]);
        let bias = Tensor::from_f32(vec![2], &[0.25, 1.0]);
        let mean = Tensor::from_f32(vec![2], &[0.1, -2.0]);
        let varc = Tensor::from_f32(vec![2], &[4.0, 0.01]);
        let w: Vec<f32> = (0..6).map(|_| (r.next() * 2.0 - 1.0) as f32).collect();
        let wt = Tensor::from_f32(vec![2, 3], &w);
        let c = Tensor::from_f32(vec![2], &[0.5, -0.5]);
        // ConvTranspose weights [C=2, M=1, k=3]
        let ctw = Tensor::from_f32(vec![2, 1, 3], &w);
        for &(lo, hi) in CASES {
            let xi = Interval::new(lo, hi);
            let bn = node_bound(
                "BatchNormalization",
                &[],
                vec![
                    var(xi, vec![1, 2, 3]),
                    konst(&scale),
                    konst(&bias),
                    konst(&mean),
                    konst(&varc),
                ],
            );
            // Gemm(A [1, 3], B^T with B [2, 3], C), alpha 2
            let gb = node_bound(
                "Gemm",
                &[
                    ("transB", AttrValue::Int(1)),
                    ("alpha", AttrValue::Float(2.0)),
                ],
                vec![var(xi, vec![1, 3]), konst(&wt), konst(&c)],
            );
            let ct = node_bound(
                "ConvTranspose",
                &[("strides", AttrValue::Ints(vec![2]))],
                vec![var(xi, vec![1, 2, 4]), konst(&ctw)],
            );
            for _ in 0..2000 {
                let x = r.within(xi);
                for ch in 0..2 {
                    let sc = [1.5, -0.5][ch];
                    let y = (x - [0.1, -2.0][ch]) / ([4.0, 0.01][ch] + 1e-5f64).sqrt() * sc
                        + [0.25, 1.0][ch];
                    assert!(bn.contains(y), "batchnorm {y} outside {bn}");
                }
                let a: Vec<f64> = (0..3).map(|_| r.within(xi)).collect();
                for n in 0..2 {
                    let y = 2.0 * (0..3).map(|k| a[k] * w[n * 3 + k] as f64).sum::<f64>()
                        + [0.5, -0.5][n];
                    assert!(gb.contains(y), "gemm {y} outside {gb}");
                }
                // an output of a stride-2 transposed convolution sums a subset of taps over both channels
                let xs: Vec<f64> = (0..2).map(|_| r.within(xi)).collect();
                let y: f64 = (0..2)
                    .map(|ch| xs[ch] * w[ch * 3 + (r.next() * 3.0) as usize] as f64)
                    .sum();
                assert!(ct.contains(y), "conv transpose {y} outside {ct}");
            }
        }
    }

    #[test]
    fn precomputed_columns_give_the_rules_own_bound() {
        // analyze-ranges hands MatMul and Gemm (no transB) the sums it computed after the weight's scan: the
        // bound must be the one the rule computes from the weight itself, to the bit
        let mut r = Rng(11);
        let w: Vec<f32> = (0..64 * 37)
            .map(|_| ((r.next() * 2.0 - 1.0) * 10f64.powi((r.next() * 6.0) as i32 - 3)) as f32)
            .collect();
        let wt = Tensor::from_f32(vec![64, 37], &w);
        let cols = weight_columns(&wt).expect("a rank-2 f32 weight has columns");
        let with = In {
            columns: Some(&cols),
            ..konst(&wt)
        };
        for &(lo, hi) in CASES {
            let xi = Interval::new(lo, hi);
            for (op, attrs, a) in [
                ("MatMul", vec![], var(xi, vec![5, 64])),
                (
                    "Gemm",
                    vec![("alpha", AttrValue::Float(0.5))],
                    var(xi, vec![5, 64]),
                ),
                (
                    "Gemm",
                    vec![("transB", AttrValue::Int(0))],
                    var(xi, vec![5, 64]),
                ),
                // transposed B is read by columns: sums by rows would be wrong, and are not used
                (
                    "Gemm",
                    vec![("transB", AttrValue::Int(1))],
                    var(xi, vec![5, 37]),
                ),
            ] {
                let own = node_bound(op, &attrs, vec![a.clone(), konst(&wt)]);
                let given = node_bound(op, &attrs, vec![a, with.clone()]);
                assert_eq!(
                    (own.lo.to_bits(), own.hi.to_bits()),
                    (given.lo.to_bits(), given.hi.to_bits()),
                    "{op} {attrs:?} with x in {xi}: {own} against {given}"
                );
            }
        }
        // which inputs get them; not a Gemm's transposed B (read by columns), not other ranks
        let node = |op: &str, tb: Option<i64>| {
            let mut n = Node::new(op);
            if let Some(t) = tb {
                n.attributes
                    .push(mpopt_ir::Attribute::new("transB", AttrValue::Int(t)));
            }
            n
        };
        assert!(uses_columns(&node("MatMul", None), 1));
        assert!(!uses_columns(&node("MatMul", None), 0));
        assert!(uses_columns(&node("Gemm", None), 1));
        assert!(uses_columns(&node("Gemm", Some(0)), 1));
        assert!(!uses_columns(&node("Gemm", Some(1)), 1));
        assert!(!uses_columns(&node("Conv", None), 1));
        assert!(weight_columns(&Tensor::from_f32(vec![2, 3, 4], &[0.5; 24])).is_none());
        assert!(weight_columns(&Tensor::from_f32(vec![0, 3], &[])).is_none());
    }

    #[test]
    fn instance_group_norm_and_recurrent_against_sampling() {
        let mut r = Rng(41);
        let scale = Tensor::from_f32(vec![2], &[2.0, -0.5]);
        let bias = Tensor::from_f32(vec![2], &[0.5, 1.0]);
        for &(lo, hi) in CASES {
            let xi = Interval::new(lo, hi);
            // x [1, 2, 3]: 2 channels of 3 values
            let inb = node_bound(
                "InstanceNormalization",
                &[],
                vec![var(xi, vec![1, 2, 3]), konst(&scale), konst(&bias)],
            );
            let gnb = node_bound(
                "GroupNormalization",
                &[("num_groups", AttrValue::Int(1))],
                vec![var(xi, vec![1, 2, 3]), konst(&scale), konst(&bias)],
            );
            let lstm = {
                let mut n = Node::new("LSTM");
                n.attributes
                    .push(mpopt_ir::Attribute::new("hidden_size", AttrValue::Int(1)));
                let mut g = Graph::new("t");
                let outs: Vec<_> = ["y", "yh", "yc"]
                    .iter()
                    .map(|n| Some(g.add_value(*n, None).unwrap()))
                    .collect();
                let id = g.add_node(n, &[], &outs).unwrap();
                transfer(&g, g.node(id), &[var(xi, vec![5, 1, 1])], 18)
            };
            for _ in 0..2000 {
                let x: Vec<f64> = (0..6)
                    .map(|_| if r.next() < 0.4 { xi.hi } else { r.within(xi) })
                    .collect();
                for ch in 0..2 {
                    let v = &x[ch * 3..ch * 3 + 3];
                    let mean = v.iter().sum::<f64>() / 3.0;
                    let var = v.iter().map(|a| (a - mean) * (a - mean)).sum::<f64>() / 3.0;
                    for a in v {
                        let y = (a - mean) / (var + 1e-5).sqrt() * [2.0, -0.5][ch] + [0.5, 1.0][ch];
                        assert!(inb.contains(y), "instance norm {y} outside {inb}");
                    }
                }
                let mean = x.iter().sum::<f64>() / 6.0;
                let var = x.iter().map(|a| (a - mean) * (a - mean)).sum::<f64>() / 6.0;
                for (j, a) in x.iter().enumerate() {
                    let ch = j / 3;
                    let y = (a - mean) / (var + 1e-5).sqrt() * [2.0, -0.5][ch] + [0.5, 1.0][ch];
                    assert!(gnb.contains(y), "group norm {y} outside {gnb}");
                }
            }
            // a one-unit LSTM over 5 steps with random gates: |h| <= 1, |c| <= steps
            assert_eq!(lstm[0], lstm[1], "Y and Y_h share the hidden-state bound");
            let mut c = 0.0f64;
            for _ in 0..5 {
                let gate = |r: &mut Rng| sigmoid(r.next() * 20.0 - 10.0);
                let (i, f, o) = (gate(&mut r), gate(&mut r), gate(&mut r));
                c = f * c + i * (r.next() * 2.0 - 1.0).tanh();
                let h = o * c.tanh();
                assert!(
                    lstm[0].contains(h) && lstm[2].contains(c),
                    "lstm h {h} c {c}"
                );
            }
        }
    }

    #[test]
    fn dropout_in_training_and_fast_gelu_bias_are_not_under_bounded() {
        let xi = Interval::new(-1.0, 1.0);
        let on = Tensor::from_raw(DType::Bool, vec![], bytes::Bytes::from_static(&[1]));
        let off = Tensor::from_raw(DType::Bool, vec![], bytes::Bytes::from_static(&[0]));
        let ratio = Tensor::from_f32(vec![], &[0.5]);
        let d = |mode: &Tensor| {
            node_bound("Dropout", &[], vec![scalar(xi), konst(&ratio), konst(mode)])
        };
        // training scales the kept values by 2 here: [-1, 1] would be wrong
        assert_eq!(d(&on), Interval::TOP);
        assert_eq!(d(&off), xi);
        let bias = Tensor::from_f32(vec![1], &[3.0]);
        let mut n = Node::new("FastGelu");
        n.domain = "com.microsoft".into();
        let mut g = Graph::new("t");
        let y = g.add_value("y", None).unwrap();
        let id = g.add_node(n, &[], &[Some(y)]).unwrap();
        let b = transfer(&g, g.node(id), &[scalar(xi), konst(&bias)], 18)[0];
        // gelu(1 + 3) = 3.9999
        assert!(b.contains(3.9999), "{b}");
    }

    /// Runs the single node of a model written in the IR text format on the CPU reference executor; returns
    /// its outputs' elements.
    fn run_one(src: &str, inputs: Vec<(&str, Vec<usize>, Vec<f32>)>) -> Vec<Vec<f64>> {
        let m = mpopt_ir::text::parse_model(src).unwrap();
        let exec = mpopt_exec::Executor::new(&m).unwrap();
        let feeds = inputs
            .into_iter()
            .map(|(n, shape, v)| {
                let t = mpopt_exec::Tensor::f32(shape, v);
                (n.to_string(), mpopt_exec::Value::Tensor(t))
            })
            .collect();
        let out = exec.run(feeds, &mpopt_exec::RunOptions::default()).unwrap();
        out.outputs
            .into_iter()
            .map(|(_, v)| v.tensor().unwrap().to_f64s().unwrap())
            .collect()
    }

    /// The transfer of a model's single node, given the intervals of its graph inputs by name (constants
    /// are read from the graph).
    fn model_bound(src: &str, ivs: &[(&str, Interval)]) -> Vec<Interval> {
        let m = mpopt_ir::text::parse_model(src).unwrap();
        let g = &m.graph;
        let (_, node) = g.nodes().next().unwrap();
        let ins: Vec<In> = node
            .inputs()
            .iter()
            .map(|slot| match slot {
                Some(v) => In {
                    iv: ivs
                        .iter()
                        .find(|(n, _)| *n == g.value(*v).name())
                        .map(|(_, i)| *i)
                        .or_else(|| constant_of(g, *v).and_then(const_interval)),
                    konst: constant_of(g, *v),
                    shape: crate::analyze_ranges::static_shape(g, *v),
                    columns: None,
                },
                None => In {
                    iv: None,
                    konst: None,
                    shape: None,
                    columns: None,
                },
            })
            .collect();
        transfer(g, node, &ins, m.opset("").unwrap_or(18))
    }

    #[test]
    fn cubic_resize_against_sampling() {
        let mut r = Rng(57);
        let mut overshoot = false;
        for a in [-0.5f32, -0.75, -1.0] {
            for (ctm, shape, scales) in [
                ("half_pixel", vec![1usize, 1, 6], "[1.0, 1.0, 2.6]"),
                ("align_corners", vec![1, 1, 4, 5], "[1.0, 1.0, 2.5, 1.7]"),
                (
                    "pytorch_half_pixel",
                    vec![1, 1, 5, 4],
                    "[1.0, 1.0, 0.6, 3.0]",
                ),
            ] {
                let dims = shape.iter().map(|d| d.to_string()).collect::<Vec<_>>();
                let src = format!(
                    "ir_version 8\nopset ai.onnx 19\n\ngraph @r(%x: f32[{}]) -> (%y: ?) {{\n  \
                     %roi = const f32[0] []\n  %s = const f32[{}] {scales}\n  \
                     %y = Resize(%x, %roi, %s) {{mode = \"cubic\", cubic_coeff_a = {a:?}, \
                     coordinate_transformation_mode = \"{ctm}\"}}\n}}\n",
                    dims.join(","),
                    shape.len()
                );
                for &(lo, hi) in CASES {
                    let xi = Interval::new(lo, hi);
                    let b = model_bound(&src, &[("x", xi)])[0];
                    assert!(b.is_bounded(), "cubic a={a} {ctm}: no bound");
                    let n: usize = shape.iter().product();
                    for _ in 0..300 {
                        // steps between the ends make the kernel overshoot the most
                        let x: Vec<f32> = (0..n)
                            .map(|_| match r.next() {
                                p if p < 0.4 => xi.lo as f32,
                                p if p < 0.8 => xi.hi as f32,
                                _ => r.within(xi) as f32,
                            })
                            .collect();
                        for y in &run_one(&src, vec![("x", shape.clone(), x)])[0] {
                            assert!(
                                b.contains(*y),
                                "cubic a={a} {ctm}: {y} outside {b} for {xi}"
                            );
                            overshoot |= !xi.contains(*y);
                        }
                    }
                }
            }
        }
        // the overshoot is real: the input's own interval would not be a sound bound
        assert!(overshoot, "no sample left the input interval");
        let unbounded = |attrs: &str| {
            let src = format!(
                "ir_version 8\nopset ai.onnx 19\n\ngraph @r(%x: f32[1,1,4]) -> (%y: ?) {{\n  \
                 %roi = const f32[0] []\n  %s = const f32[3] [1.0, 1.0, 2.0]\n  \
                 %y = Resize(%x, %roi, %s) {{mode = \"cubic\", {attrs}}}\n}}\n"
            );
            !model_bound(&src, &[("x", Interval::new(-1.0, 1.0))])[0].is_bounded()
        };
        assert!(unbounded("cubic_coeff_a = 0.5"), "a > 0 bounded");
        assert!(unbounded("exclude_outside = 1"), "exclude_outside bounded");
    }

    #[test]
    fn gru_and_rnn_against_sampling() {
        let mut r = Rng(91);
        // weights large enough to saturate the gates both ways; an initial state beyond [-1, 1]
        let (seq, batch, inp, hid) = (4usize, 2usize, 3usize, 2usize);
        let mut weights = |n: usize| {
            (0..n)
                .map(|_| format!("{:?}", (r.next() * 6.0 - 3.0) as f32))
                .collect::<Vec<_>>()
                .join(", ")
        };
        for (op, gates) in [("GRU", 3usize), ("RNN", 1)] {
            let (w, rw, bw) = (
                weights(gates * hid * inp),
                weights(gates * hid * hid),
                weights(2 * gates * hid),
            );
            let src = format!(
                "ir_version 8\nopset ai.onnx 17\n\ngraph @g(%x: f32[{seq},{batch},{inp}], \
                 %h0: f32[1,{batch},{hid}]) -> (%y: ?, %yh: ?) {{\n  \
                 %w = const f32[1,{gh},{inp}] [{w}]\n  %r = const f32[1,{gh},{hid}] [{rw}]\n  \
                 %b = const f32[1,{gb}] [{bw}]\n  %lens = const i32[{batch}] [{seq}, {short}]\n  \
                 %y, %yh = {op}(%x, %w, %r, %b, %lens, %h0) {{hidden_size = {hid}}}\n}}\n",
                gh = gates * hid,
                gb = 2 * gates * hid,
                short = seq - 1,
            );
            let mut r = Rng(3);
            for &(lo, hi) in CASES {
                let (xi, hi0) = (Interval::new(lo, hi), Interval::new(-2.5, 2.5));
                let b = model_bound(&src, &[("x", xi), ("h0", hi0)]);
                assert!(b[0].is_bounded() && b[1].is_bounded(), "{op}: no bound");
                for _ in 0..200 {
                    let x: Vec<f32> = (0..seq * batch * inp)
                        .map(|_| r.within(xi) as f32)
                        .collect();
                    let h0: Vec<f32> = (0..batch * hid).map(|_| r.within(hi0) as f32).collect();
                    let outs = run_one(
                        &src,
                        vec![
                            ("x", vec![seq, batch, inp], x),
                            ("h0", vec![1, batch, hid], h0),
                        ],
                    );
                    for (k, o) in outs.iter().enumerate() {
                        for y in o {
                            assert!(b[k].contains(*y), "{op} output {k}: {y} outside {}", b[k]);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn row_pieces_sum_every_row_once_in_any_shape() {
        // eighths of small integers: every partial sum is exact, so the pieces' sums must equal a plain
        // column-by-column loop bit for bit; shapes with one piece, several, and a last short piece
        for (k, cols) in [
            (3usize, 5usize),
            (5000, 40),
            (4099, 17),
            (20, 30522),
            (70_000, 1),
        ] {
            assert!(k.div_ceil(row_pieces(k, cols)) <= ROW_PIECES);
            let w: Vec<f32> = (0..k * cols)
                .map(|i| ((i * 7919 % 41) as f32 - 20.0) / 8.0)
                .collect();
            let t = Tensor::from_f32(vec![k as i64, cols as i64], &w);
            let sums = row_major_columns(&Elems::of(&t).unwrap(), 0, k, cols);
            for (c, s) in sums.iter().enumerate() {
                let col = (0..k).map(|i| w[i * cols + c] as f64);
                let pos: f64 = col.clone().filter(|&x| x > 0.0).sum();
                let neg: f64 = col.filter(|&x| x < 0.0).sum();
                assert_eq!((s.pos, s.neg), (pos, neg), "k {k} cols {cols} column {c}");
            }
        }
    }

    #[test]
    fn column_sums_add_each_pieces_rows_in_order() {
        // inexact values (so the order of the additions shows in the bits), with a NaN and an infinity in
        // some shapes, as float_data, aligned raw_data and unaligned raw_data: each piece adds its rows in
        // order, one row at a time, and the pieces are added in order
        let same = |a: f64, b: f64| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
        for (k, cols, special) in [
            (7usize, 5usize, false),
            (3, 9, true),
            (4099, 17, false),
            (1031, 64, true),
        ] {
            let mut w: Vec<f32> = (0..k * cols)
                .map(|i| (i as f32 * 0.6173).sin() * 10f32.powi((i % 9) as i32 - 4))
                .collect();
            if special {
                w[cols + 1] = f32::NAN;
                w[2 * cols - 1] = f32::NEG_INFINITY;
            }
            let rows = row_pieces(k, cols);
            let mut want = vec![SignSums::default(); cols];
            for first in (0..k).step_by(rows) {
                let mut piece = vec![SignSums::default(); cols];
                for i in first..(first + rows).min(k) {
                    for (c, s) in piece.iter_mut().enumerate() {
                        s.add(w[i * cols + c] as f64);
                    }
                }
                for (t, p) in want.iter_mut().zip(piece) {
                    t.pos += p.pos;
                    t.neg += p.neg;
                }
            }
            let aligned = Tensor::from_f32(vec![k as i64, cols as i64], &w);
            let mut listed = aligned.clone();
            listed.data = mpopt_ir::TensorData::Floats(w.clone());
            let mut unaligned = aligned.clone();
            let mut buf = vec![0u8];
            buf.extend(w.iter().flat_map(|x| x.to_le_bytes()));
            unaligned.data = mpopt_ir::TensorData::Raw(bytes::Bytes::from(buf).slice(1..));
            for (how, t) in [
                ("raw", &aligned),
                ("float_data", &listed),
                ("unaligned", &unaligned),
            ] {
                let got = row_major_columns(&Elems::of(t).unwrap(), 0, k, cols);
                for (c, (g, e)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        same(g.pos, e.pos) && same(g.neg, e.neg),
                        "{how} k {k} cols {cols} column {c}: {g:?} against {e:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_unbounded_shortcut_only_skips_sums_that_give_top() {
        // every input interval against every weight set: where the shortcut says TOP, the column sums
        // say TOP too (and the shortcut fires where an infinite input end meets weights of both signs)
        let inf = f64::INFINITY;
        let xs = [
            Interval::TOP,
            Interval::new(0.0, inf),
            Interval::new(-inf, 0.0),
            Interval::new(-0.3, inf),
            Interval::new(-1.0, 2.0),
        ];
        let weights: [&[f32]; 6] = [
            &[0.5, -0.25, 1.0, -2.0, 0.0, 0.125],
            &[0.5, 0.25, 1.0, 2.0, 0.0, 0.125],
            &[-0.5, -0.25, -1.0, -2.0, 0.0, -0.125],
            &[0.0; 6],
            &[0.5, f32::NAN, 1.0, 2.0, 0.0, 0.125],
            &[0.5, f32::INFINITY, 1.0, 2.0, 0.0, 0.125],
        ];
        let mut fired = 0;
        for w in weights {
            let t = Tensor::from_f32(vec![2, 3], w);
            let elems = Elems::of(&t).unwrap();
            let sums = contiguous_columns(&elems, 0, 2, 3);
            for x in xs {
                let full = columns_bound(x, &sums, 3);
                if products_unbounded(x, const_interval(&t)) {
                    fired += 1;
                    assert_eq!(full, Interval::TOP, "{x:?} {w:?}");
                }
            }
        }
        // mixed signs and NaN: every x with an infinite end (4 each); one sign, or +inf weights: only TOP
        assert_eq!(fired, 11);
        assert!(!products_unbounded(Interval::TOP, None));
    }

    #[test]
    fn const_interval_in_place_matches_the_general_path() {
        for (n, nan) in [(1usize, false), (9, false), (1000, false), (1000, true)] {
            let xs: Vec<f32> = (0..n)
                .map(|i| match i {
                    5 if nan => f32::NAN,
                    _ => (i as f32 * 1.7).sin() * (i as f32 + 1.0),
                })
                .collect();
            let raw = Tensor::from_f32(vec![n as i64], &xs);
            let mut listed = raw.clone();
            listed.data = mpopt_ir::TensorData::Floats(xs.clone());
            // the same values as f64 take the general path
            let mut wide = raw.clone();
            wide.dtype = DType::F64;
            wide.data = mpopt_ir::TensorData::Doubles(xs.iter().map(|&x| x as f64).collect());
            let (a, b) = (const_interval(&raw), const_interval(&listed));
            assert_eq!(a, b, "n={n} nan={nan}");
            assert_eq!(a, const_interval(&wide), "n={n} nan={nan}");
            if nan {
                assert_eq!(a, Some(Interval::TOP));
            } else {
                let lo = xs.iter().copied().fold(f32::INFINITY, f32::min) as f64;
                let hi = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                assert_eq!(a, Some(Interval::new(lo, hi)), "n={n}");
            }
        }
    }

    /// A constant scanned in parallel pieces gives what one sequential pass over it gives: extremes and the
    /// counts beyond f16's and bf16's ranges placed in different pieces, and in the last, partial one.
    #[test]
    fn a_big_constant_scans_in_pieces_as_in_one_pass() {
        let n = (5 << 20) + 12_345;
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut v: Vec<f32> = (0..n).map(|_| (rng.next() * 2.0 - 1.0) as f32).collect();
        v[3] = -7.0e4; // beyond f16, first piece
        v[(1 << 20) + 5] = 9.0e4; // beyond f16, second piece
        v[n - 1] = 1.0e-9; // flushes in f16, the partial last piece
        v[n / 2] = 0.0;
        v[(3 << 20) + 7] = 1.0e39_f64 as f32; // inf: not finite, not counted beyond
        let t = Tensor::from_f32(vec![n as i64], &v);
        let (iv, facts) = const_scan(&t);
        let finite = v.iter().filter(|x| x.is_finite());
        let lo = finite.clone().fold(f32::INFINITY, |a, &b| a.min(b));
        assert_eq!(iv, Some(Interval::new(lo as f64, f64::INFINITY)));
        let facts = facts.expect("facts for f32 raw data");
        assert_eq!((facts.min, facts.max), (lo, f32::INFINITY));
        let count = |f: &dyn Fn(f32) -> bool| v.iter().filter(|&&x| f(x)).count() as u64;
        let beyond16 = count(&|x| x.is_finite() && x.abs() > 65504.0);
        let tiny16 = count(&|x| x != 0.0 && x.abs() < 2.0f32.powi(-25));
        assert_eq!(facts.beyond[0], (beyond16, tiny16));
        assert!(beyond16 >= 2 && tiny16 >= 1, "{beyond16} {tiny16}");
        assert_eq!(facts.beyond[1].0, 0);
    }
}
