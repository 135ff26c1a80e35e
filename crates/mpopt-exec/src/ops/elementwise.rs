//! Elementwise kernels: unary math, broadcasting binary arithmetic and comparisons, logic, Where, Cast.
//!
//! Float kernels see f32 or f64 (half inputs arrive widened, see `ops/mod.rs`); integer kernels wrap on
//! overflow as two's-complement hardware does.

use half::{bf16, f16};
use rayon::prelude::*;

/// Elementwise loops split across threads in chunks of at least this many elements.
pub(crate) const PAR_MIN: usize = 1 << 15;

/// Builds a vector of `n` elements chunk by chunk: `fill(start, chunk)` must write every element of the
/// `chunk` that begins at index `start`. Chunks of `chunk_len` run in parallel; a single chunk runs on the
/// calling thread (no hand-off to the pool for small tensors). The output is never zero-filled first, and
/// the loops write plain slices, so they vectorize.
///
/// # Safety
/// `fill` must initialize every element of the slice it is given.
pub(crate) unsafe fn par_fill<O: Send>(
    n: usize,
    chunk_len: usize,
    fill: impl Fn(usize, &mut [std::mem::MaybeUninit<O>]) + Sync + Send,
) -> Vec<O> {
    let mut out: Vec<O> = Vec::with_capacity(n);
    let spare = &mut out.spare_capacity_mut()[..n];
    let chunk_len = chunk_len.max(1);
    if n <= chunk_len {
        fill(0, spare);
    } else {
        spare
            .par_chunks_mut(chunk_len)
            .enumerate()
            .for_each(|(i, c)| fill(i * chunk_len, c));
    }
    // SAFETY: the chunks cover `0..n`, and the caller guarantees that `fill` initialized each of them.
    unsafe { out.set_len(n) };
    out
}

/// `f` over a slice, in parallel chunks (see [`par_fill`]).
pub(crate) fn par_map<A: Sync, O: Send>(a: &[A], f: impl Fn(&A) -> O + Sync + Send) -> Vec<O> {
    // SAFETY: each chunk zips with the equally long slice of `a` at the same start: every element is written.
    unsafe {
        par_fill(a.len(), PAR_MIN, |s, o| {
            let a = &a[s..s + o.len()];
            for (d, x) in o.iter_mut().zip(a) {
                d.write(f(x));
            }
        })
    }
}
use mpopt_ir::DType;

use super::{Ctx, R, one};
use crate::tensor::{round_bf16, round_f16};
use crate::{Data, Tensor, Value, numel, strides};

/// Float functions that `f32` and `f64` spell differently.
pub(crate) trait Real: Copy {
    fn erf_(self) -> Self;
}
impl Real for f32 {
    fn erf_(self) -> f32 {
        libm::erff(self)
    }
}
impl Real for f64 {
    fn erf_(self) -> f64 {
        libm::erf(self)
    }
}

/// Maps a float tensor elementwise; `[name = value, ...]` binds attribute values in the element type.
macro_rules! float_map {
    ($t:expr, [$($n:ident = $v:expr),*], |$x:ident| $e:expr) => {{
        let t: &Tensor = $t;
        let data = match &t.data {
            Data::F32(v) => {
                $(let $n = ($v) as f32;)*
                Data::F32($crate::ops::elementwise::par_map(v, |&$x| $e))
            }
            Data::F64(v) => {
                $(let $n = ($v) as f64;)*
                Data::F64($crate::ops::elementwise::par_map(v, |&$x| $e))
            }
            d => return Err(format!("expected a float tensor, got {}", d.dtype())),
        };
        one(Tensor::new(t.shape.clone(), data))
    }};
    ($t:expr, |$x:ident| $e:expr) => { float_map!($t, [], |$x| $e) };
}

/// Maps a numeric tensor elementwise: `$f` for floats, `$i` for integers.
macro_rules! num_map {
    ($t:expr, |$x:ident| $f:expr, |$y:ident| $i:expr) => {{
        let t: &Tensor = $t;
        let data = match &t.data {
            Data::F32(v) => Data::F32(v.iter().map(|&$x| $f).collect()),
            Data::F64(v) => Data::F64(v.iter().map(|&$x| $f).collect()),
            Data::I8(v) => Data::I8(v.iter().map(|&$y| $i).collect()),
            Data::I16(v) => Data::I16(v.iter().map(|&$y| $i).collect()),
            Data::I32(v) => Data::I32(v.iter().map(|&$y| $i).collect()),
            Data::I64(v) => Data::I64(v.iter().map(|&$y| $i).collect()),
            d => return Err(format!("unsupported dtype {}", d.dtype())),
        };
        one(Tensor::new(t.shape.clone(), data))
    }};
}

macro_rules! unary_float {
    ($($name:ident => |$x:ident| $e:expr;)*) => {
        $(pub(crate) fn $name(ctx: &mut Ctx) -> R<Vec<Value>> {
            float_map!(ctx.t(0)?, |$x| $e)
        })*
    };
}

unary_float! {
    sigmoid => |x| if x >= 0.0 { 1.0 / (1.0 + (-x).exp()) } else { let e = x.exp(); e / (1.0 + e) };
    tanh => |x| x.tanh();
    exp => |x| x.exp();
    log => |x| x.ln();
    sqrt => |x| x.sqrt();
    reciprocal => |x| 1.0 / x;
    erf => |x| x.erf_();
    floor => |x| x.floor();
    ceil => |x| x.ceil();
    round => |x| x.round_ties_even();
    sin => |x| x.sin();
    cos => |x| x.cos();
    tan => |x| x.tan();
    asin => |x| x.asin();
    acos => |x| x.acos();
    atan => |x| x.atan();
    sinh => |x| x.sinh();
    cosh => |x| x.cosh();
    asinh => |x| x.asinh();
    acosh => |x| x.acosh();
    atanh => |x| x.atanh();
    softplus => |x| if x > 0.0 { x + (-x).exp().ln_1p() } else { x.exp().ln_1p() };
    softsign => |x| x / (1.0 + x.abs());
    mish => |x| x * (if x > 0.0 { x + (-x).exp().ln_1p() } else { x.exp().ln_1p() }).tanh();
}

pub(crate) fn abs(ctx: &mut Ctx) -> R<Vec<Value>> {
    let t = ctx.t(0)?;
    match &t.data {
        Data::U8(_) | Data::U16(_) | Data::U32(_) | Data::U64(_) => one(t.clone()),
        _ => num_map!(t, |x| x.abs(), |y| y.wrapping_abs()),
    }
}
pub(crate) fn neg(ctx: &mut Ctx) -> R<Vec<Value>> {
    num_map!(ctx.t(0)?, |x| -x, |y| y.wrapping_neg())
}
pub(crate) fn relu(ctx: &mut Ctx) -> R<Vec<Value>> {
    num_map!(ctx.t(0)?, |x| if x > 0.0 { x } else { 0.0 }, |y| y.max(0))
}
pub(crate) fn sign(ctx: &mut Ctx) -> R<Vec<Value>> {
    let t = ctx.t(0)?;
    match &t.data {
        Data::U8(_) | Data::U16(_) | Data::U32(_) | Data::U64(_) => {
            let v = t.to_i64s()?;
            let s: Vec<f64> = v.iter().map(|&x| (x != 0) as i64 as f64).collect();
            one(cast_tensor(
                &Tensor::new(t.shape.clone(), Data::F64(s)),
                t.dtype(),
            )?)
        }
        _ => num_map!(
            t,
            |x| if x > 0.0 {
                1.0
            } else if x < 0.0 {
                -1.0
            } else {
                x
            },
            |y| y.signum()
        ),
    }
}
pub(crate) fn swish(ctx: &mut Ctx) -> R<Vec<Value>> {
    let a = ctx.af("alpha", 1.0);
    float_map!(ctx.t(0)?, [a = a], |x| x / (1.0 + (-a * x).exp()))
}
pub(crate) fn hard_sigmoid(ctx: &mut Ctx) -> R<Vec<Value>> {
    let (a, b) = (ctx.af("alpha", 0.2), ctx.af("beta", 0.5));
    float_map!(ctx.t(0)?, [a = a, b = b], |x| (a * x + b).clamp(0.0, 1.0))
}
pub(crate) fn hard_swish(ctx: &mut Ctx) -> R<Vec<Value>> {
    float_map!(ctx.t(0)?, [a = 1.0 / 6.0, b = 0.5], |x| x
        * (a * x + b).clamp(0.0, 1.0))
}
pub(crate) fn leaky_relu(ctx: &mut Ctx) -> R<Vec<Value>> {
    let a = ctx.af("alpha", 0.01);
    float_map!(ctx.t(0)?, [a = a], |x| if x >= 0.0 { x } else { a * x })
}
pub(crate) fn elu(ctx: &mut Ctx) -> R<Vec<Value>> {
    let a = ctx.af("alpha", 1.0);
    float_map!(ctx.t(0)?, [a = a], |x| if x >= 0.0 {
        x
    } else {
        a * x.exp_m1()
    })
}
pub(crate) fn selu(ctx: &mut Ctx) -> R<Vec<Value>> {
    let (a, g) = (ctx.af("alpha", 1.673_263_2), ctx.af("gamma", 1.050_701));
    float_map!(ctx.t(0)?, [a = a, g = g], |x| if x > 0.0 {
        g * x
    } else {
        g * a * x.exp_m1()
    })
}
pub(crate) fn celu(ctx: &mut Ctx) -> R<Vec<Value>> {
    let a = ctx.af("alpha", 1.0);
    float_map!(ctx.t(0)?, [a = a], |x| x.max(0.0)
        + (a * (x / a).exp_m1()).min(0.0))
}
pub(crate) fn thresholded_relu(ctx: &mut Ctx) -> R<Vec<Value>> {
    let a = ctx.af("alpha", 1.0);
    float_map!(ctx.t(0)?, [a = a], |x| if x > a { x } else { 0.0 })
}
pub(crate) fn gelu(ctx: &mut Ctx) -> R<Vec<Value>> {
    let tanh = ctx.as_str("approximate").as_deref() == Some("tanh");
    if tanh {
        float_map!(
            ctx.t(0)?,
            [c = (2.0f64 / std::f64::consts::PI).sqrt()],
            |x| 0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
        )
    } else {
        float_map!(ctx.t(0)?, [r = std::f64::consts::FRAC_1_SQRT_2], |x| 0.5
            * x
            * (1.0 + (x * r).erf_()))
    }
}
pub(crate) fn shrink(ctx: &mut Ctx) -> R<Vec<Value>> {
    let (l, b) = (ctx.af("lambd", 0.5) as f64, ctx.af("bias", 0.0) as f64);
    let t = ctx.t(0)?;
    if t.data.is_float() {
        return float_map!(t, [l = l, b = b], |x| if x < -l {
            x + b
        } else if x > l {
            x - b
        } else {
            0.0
        });
    }
    let v = t.to_f64s()?;
    let r: Vec<f64> = v
        .iter()
        .map(|&x| {
            if x < -l {
                x + b
            } else if x > l {
                x - b
            } else {
                0.0
            }
        })
        .collect();
    one(cast_tensor(
        &Tensor::new(t.shape.clone(), Data::F64(r)),
        t.dtype(),
    )?)
}
pub(crate) fn is_nan(ctx: &mut Ctx) -> R<Vec<Value>> {
    let t = ctx.t(0)?;
    let v = t.to_f64s()?;
    one(Tensor::bool(
        t.shape.clone(),
        v.iter().map(|x| x.is_nan()).collect(),
    ))
}
pub(crate) fn is_inf(ctx: &mut Ctx) -> R<Vec<Value>> {
    let (pos, neg) = (
        ctx.ai("detect_positive", 1) != 0,
        ctx.ai("detect_negative", 1) != 0,
    );
    let t = ctx.t(0)?;
    let v = t.to_f64s()?;
    one(Tensor::bool(
        t.shape.clone(),
        v.iter()
            .map(|&x| (x == f64::INFINITY && pos) || (x == f64::NEG_INFINITY && neg))
            .collect(),
    ))
}
pub(crate) fn not(ctx: &mut Ctx) -> R<Vec<Value>> {
    let t = ctx.t(0)?;
    match &t.data {
        Data::Bool(v) => one(Tensor::bool(
            t.shape.clone(),
            v.iter().map(|x| !x).collect(),
        )),
        d => Err(format!("Not takes bool, got {}", d.dtype())),
    }
}
pub(crate) fn bitwise_not(ctx: &mut Ctx) -> R<Vec<Value>> {
    let t = ctx.t(0)?;
    let data = match &t.data {
        Data::I8(v) => Data::I8(v.iter().map(|x| !x).collect()),
        Data::I16(v) => Data::I16(v.iter().map(|x| !x).collect()),
        Data::I32(v) => Data::I32(v.iter().map(|x| !x).collect()),
        Data::I64(v) => Data::I64(v.iter().map(|x| !x).collect()),
        Data::U8(v) => Data::U8(v.iter().map(|x| !x).collect()),
        Data::U16(v) => Data::U16(v.iter().map(|x| !x).collect()),
        Data::U32(v) => Data::U32(v.iter().map(|x| !x).collect()),
        Data::U64(v) => Data::U64(v.iter().map(|x| !x).collect()),
        d => return Err(format!("BitwiseNot takes integers, got {}", d.dtype())),
    };
    one(Tensor::new(t.shape.clone(), data))
}

pub(crate) fn clip(ctx: &mut Ctx) -> R<Vec<Value>> {
    let t = ctx.t(0)?;
    let (lo, hi) = if ctx.opset < 11 {
        (
            Some(ctx.af("min", f32::NEG_INFINITY) as f64),
            Some(ctx.af("max", f32::INFINITY) as f64),
        )
    } else {
        let lo = ctx
            .opt(1)
            .filter(|t| !t.is_empty())
            .map(|t| t.scalar_f64())
            .transpose()?;
        let hi = ctx
            .opt(2)
            .filter(|t| !t.is_empty())
            .map(|t| t.scalar_f64())
            .transpose()?;
        (lo, hi)
    };
    if t.data.is_float() {
        let lo = lo.unwrap_or(f64::NEG_INFINITY);
        let hi = hi.unwrap_or(f64::INFINITY);
        // Two selects: a NaN fails both comparisons and passes through, as in the reference; the loop
        // vectorizes (f32::max/min would not).
        return float_map!(t, [lo = lo, hi = hi], |x| {
            let c = if x < lo { lo } else { x };
            if c > hi { hi } else { c }
        });
    }
    let lo = lo.map(|x| x as i64).unwrap_or(i64::MIN);
    let hi = hi.map(|x| x as i64).unwrap_or(i64::MAX);
    let v = t.to_i64s()?;
    let r: Vec<f64> = v.iter().map(|&x| x.max(lo).min(hi) as f64).collect();
    one(cast_tensor(
        &Tensor::new(t.shape.clone(), Data::F64(r)),
        t.dtype(),
    )?)
}

pub(crate) fn prelu(ctx: &mut Ctx) -> R<Vec<Value>> {
    let (x, s) = (ctx.t(0)?, ctx.t(1)?);
    let slope = s;
    match (&x.data, &slope.data) {
        (Data::F32(a), Data::F32(b)) => {
            let (o, sh) = zip_bcast(a, &x.shape, b, &slope.shape, |x, s| {
                if x < 0.0 { x * s } else { x }
            })?;
            one(Tensor::f32(sh, o))
        }
        (Data::F64(a), Data::F64(b)) => {
            let (o, sh) = zip_bcast(a, &x.shape, b, &slope.shape, |x, s| {
                if x < 0.0 { x * s } else { x }
            })?;
            one(Tensor::new(sh, Data::F64(o)))
        }
        _ => {
            let (a, b) = (x.to_f64s()?, slope.to_f64s()?);
            let (o, sh) = zip_bcast(&a, &x.shape, &b, &slope.shape, |x, s| {
                if x < 0.0 { x * s } else { x }
            })?;
            one(cast_tensor(&Tensor::new(sh, Data::F64(o)), x.dtype())?)
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Broadcasting

/// The numpy broadcast of two shapes.
pub(crate) fn broadcast_shape(a: &[usize], b: &[usize]) -> R<Vec<usize>> {
    let r = a.len().max(b.len());
    let mut out = vec![0; r];
    for i in 0..r {
        let da = if i + a.len() >= r {
            a[i + a.len() - r]
        } else {
            1
        };
        let db = if i + b.len() >= r {
            b[i + b.len() - r]
        } else {
            1
        };
        out[i] = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            return Err(format!("shapes {a:?} and {b:?} do not broadcast"));
        };
    }
    Ok(out)
}

/// Strides of `shape` aligned to `out` (0 where broadcast).
pub(crate) fn bcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let s = strides(shape);
    let off = out.len() - shape.len();
    (0..out.len())
        .map(|i| {
            if i < off || shape[i - off] == 1 {
                0
            } else {
                s[i - off]
            }
        })
        .collect()
}

/// The input offset of every output element when `shape` is broadcast to `out`.
pub(crate) fn bcast_offsets(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let st = bcast_strides(shape, out);
    let n = numel(out);
    let mut offs = Vec::with_capacity(n);
    if n == 0 {
        return offs;
    }
    let mut idx = vec![0usize; out.len()];
    let mut cur = 0usize;
    for _ in 0..n {
        offs.push(cur);
        for d in (0..out.len()).rev() {
            idx[d] += 1;
            cur += st[d];
            if idx[d] < out[d] {
                break;
            }
            cur -= st[d] * idx[d];
            idx[d] = 0;
        }
    }
    offs
}

/// Applies `f` to two broadcast inputs. Adjacent dims with the same broadcast pattern are merged so the inner
/// loop runs over the longest contiguous stretch.
pub(crate) fn zip_bcast<A: Copy + Send + Sync, B: Copy + Send + Sync, O: Send>(
    a: &[A],
    ash: &[usize],
    b: &[B],
    bsh: &[usize],
    f: impl Fn(A, B) -> O + Sync + Send,
) -> R<(Vec<O>, Vec<usize>)> {
    let out = broadcast_shape(ash, bsh)?;
    let n = numel(&out);
    if ash == bsh {
        assert_eq!(a.len(), b.len());
        // SAFETY: each chunk zips with equally long slices of `a` and `b`: every element is written.
        let v = unsafe {
            par_fill(n, PAR_MIN, |s, o| {
                let (a, b) = (&a[s..s + o.len()], &b[s..s + o.len()]);
                for ((d, &x), &y) in o.iter_mut().zip(a).zip(b) {
                    d.write(f(x, y));
                }
            })
        };
        return Ok((v, out));
    }
    if b.len() == 1 && n == a.len() {
        let y = b[0];
        return Ok((par_map(a, |&x| f(x, y)), out));
    }
    if a.len() == 1 && n == b.len() {
        let x = a[0];
        return Ok((par_map(b, |&y| f(x, y)), out));
    }
    if n == 0 {
        return Ok((Vec::new(), out));
    }
    // Collapse dims: (size, stride_a, stride_b).
    let sa = bcast_strides(ash, &out);
    let sb = bcast_strides(bsh, &out);
    let mut dims: Vec<(usize, usize, usize)> = Vec::new();
    for i in 0..out.len() {
        if out[i] == 1 {
            continue;
        }
        if let Some(last) = dims.last_mut()
            && last.1 == sa[i] * out[i]
            && last.2 == sb[i] * out[i]
        {
            *last = (last.0 * out[i], sa[i], sb[i]);
            continue;
        }
        dims.push((out[i], sa[i], sb[i]));
    }
    if dims.is_empty() {
        dims.push((1, 0, 0));
    }
    let (inner, ia, ib) = *dims.last().expect("non-empty");
    let outer = &dims[..dims.len() - 1];
    // Whole rows of `inner` outputs per task, at least PAR_MIN elements.
    let per = PAR_MIN.div_ceil(inner) * inner;
    // SAFETY: `n` is `inner` times the outer count and `per` a multiple of `inner`, so every chunk splits into
    // rows of exactly `inner` elements, and each match arm writes all `inner` elements of its row.
    let res = unsafe {
        par_fill(n, per, |start, o| {
            // The input offsets of the chunk's first row.
            let mut idx = vec![0usize; outer.len()];
            let mut row = start / inner;
            let (mut oa, mut ob) = (0usize, 0usize);
            for d in (0..outer.len()).rev() {
                idx[d] = row % outer[d].0;
                row /= outer[d].0;
                oa += idx[d] * outer[d].1;
                ob += idx[d] * outer[d].2;
            }
            for dst in o.chunks_mut(inner) {
                match (ia, ib) {
                    (1, 1) => {
                        for ((d, &x), &y) in dst
                            .iter_mut()
                            .zip(&a[oa..oa + inner])
                            .zip(&b[ob..ob + inner])
                        {
                            d.write(f(x, y));
                        }
                    }
                    (1, 0) => {
                        let y = b[ob];
                        for (d, &x) in dst.iter_mut().zip(&a[oa..oa + inner]) {
                            d.write(f(x, y));
                        }
                    }
                    (0, 1) => {
                        let x = a[oa];
                        for (d, &y) in dst.iter_mut().zip(&b[ob..ob + inner]) {
                            d.write(f(x, y));
                        }
                    }
                    _ => {
                        for (k, d) in dst.iter_mut().enumerate() {
                            d.write(f(a[oa + k * ia], b[ob + k * ib]));
                        }
                    }
                }
                for d in (0..outer.len()).rev() {
                    idx[d] += 1;
                    oa += outer[d].1;
                    ob += outer[d].2;
                    if idx[d] < outer[d].0 {
                        break;
                    }
                    oa -= outer[d].1 * idx[d];
                    ob -= outer[d].2 * idx[d];
                    idx[d] = 0;
                }
            }
        })
    };
    Ok((res, out))
}

/// Broadcast binary op over same-typed numeric inputs: `$f` for floats, `$i` for integers.
macro_rules! binary_num {
    ($a:expr, $b:expr, |$x:ident, $y:ident| $f:expr, |$p:ident, $q:ident| $i:expr) => {{
        let (a, b): (&Tensor, &Tensor) = ($a, $b);
        macro_rules! go {
            ($va:expr, $vb:expr, $var:ident, |$u:ident, $w:ident| $body:expr) => {{
                let (o, sh) = zip_bcast($va, &a.shape, $vb, &b.shape, |$u, $w| $body)?;
                Tensor::new(sh, Data::$var(o))
            }};
        }
        let t = match (&a.data, &b.data) {
            (Data::F32(u), Data::F32(w)) => go!(u, w, F32, |$x, $y| $f),
            (Data::F64(u), Data::F64(w)) => go!(u, w, F64, |$x, $y| $f),
            (Data::I8(u), Data::I8(w)) => go!(u, w, I8, |$p, $q| $i),
            (Data::I16(u), Data::I16(w)) => go!(u, w, I16, |$p, $q| $i),
            (Data::I32(u), Data::I32(w)) => go!(u, w, I32, |$p, $q| $i),
            (Data::I64(u), Data::I64(w)) => go!(u, w, I64, |$p, $q| $i),
            (Data::U8(u), Data::U8(w)) => go!(u, w, U8, |$p, $q| $i),
            (Data::U16(u), Data::U16(w)) => go!(u, w, U16, |$p, $q| $i),
            (Data::U32(u), Data::U32(w)) => go!(u, w, U32, |$p, $q| $i),
            (Data::U64(u), Data::U64(w)) => go!(u, w, U64, |$p, $q| $i),
            (x, y) => {
                return Err(format!(
                    "operand types {} and {} are not supported together",
                    x.dtype(),
                    y.dtype()
                ))
            }
        };
        t
    }};
}

pub(crate) fn add(ctx: &mut Ctx) -> R<Vec<Value>> {
    one(binary_num!(ctx.t(0)?, ctx.t(1)?, |x, y| x + y, |p, q| p.wrapping_add(q)))
}
pub(crate) fn sub(ctx: &mut Ctx) -> R<Vec<Value>> {
    one(binary_num!(ctx.t(0)?, ctx.t(1)?, |x, y| x - y, |p, q| p.wrapping_sub(q)))
}
pub(crate) fn mul(ctx: &mut Ctx) -> R<Vec<Value>> {
    one(binary_num!(ctx.t(0)?, ctx.t(1)?, |x, y| x * y, |p, q| p.wrapping_mul(q)))
}
pub(crate) fn div(ctx: &mut Ctx) -> R<Vec<Value>> {
    one(binary_num!(
        ctx.t(0)?,
        ctx.t(1)?,
        |x, y| x / y,
        |p, q| if q == 0 { 0 } else { p.wrapping_div(q) }
    ))
}
pub(crate) fn modulo(ctx: &mut Ctx) -> R<Vec<Value>> {
    let fmod = ctx.ai("fmod", 0) != 0;
    let (a, b) = (ctx.t(0)?, ctx.t(1)?);
    if a.data.is_float() {
        if fmod {
            // C fmod: the sign of the dividend.
            return one(binary_num!(a, b, |x, y| x % y, |p, _q| p));
        }
        // Python-style: the sign of the divisor.
        return one(binary_num!(
            a,
            b,
            |x, y| {
                let r = x % y;
                if r != 0.0 && ((r < 0.0) != (y < 0.0)) {
                    r + y
                } else {
                    r
                }
            },
            |p, _q| p
        ));
    }
    if fmod {
        return one(binary_num!(a, b, |x, y| x % y, |p, q| if q == 0 {
            0
        } else {
            p.wrapping_rem(q)
        }));
    }
    // Python-style: sign of the divisor.
    let (x, y) = (a.to_i64s()?, b.to_i64s()?);
    let (o, sh) = zip_bcast(&x, &a.shape, &y, &b.shape, |p, q| {
        if q == 0 {
            0
        } else {
            let r = p.wrapping_rem(q);
            if r != 0 && ((r < 0) != (q < 0)) {
                r + q
            } else {
                r
            }
        }
    })?;
    one(cast_tensor(&Tensor::i64(sh, o), a.dtype())?)
}
pub(crate) fn pow(ctx: &mut Ctx) -> R<Vec<Value>> {
    let (a, b) = (ctx.t(0)?, ctx.t(1)?);
    match (&a.data, &b.data) {
        (Data::F32(u), Data::F32(w)) => {
            let (o, sh) = zip_bcast(u, &a.shape, w, &b.shape, f32::powf)?;
            one(Tensor::f32(sh, o))
        }
        (Data::F32(u), _) => {
            let w = b.to_f32s()?;
            let (o, sh) = zip_bcast(u, &a.shape, &w, &b.shape, f32::powf)?;
            one(Tensor::f32(sh, o))
        }
        (Data::F64(u), _) => {
            let w = b.to_f64s()?;
            let (o, sh) = zip_bcast(u, &a.shape, &w, &b.shape, f64::powf)?;
            one(Tensor::new(sh, Data::F64(o)))
        }
        _ => {
            let (u, w) = (a.to_f64s()?, b.to_f64s()?);
            let (o, sh) = zip_bcast(&u, &a.shape, &w, &b.shape, |x, y| x.powf(y).trunc())?;
            one(cast_tensor(&Tensor::new(sh, Data::F64(o)), a.dtype())?)
        }
    }
}

macro_rules! compare {
    ($name:ident, |$x:ident, $y:ident| $e:expr) => {
        pub(crate) fn $name(ctx: &mut Ctx) -> R<Vec<Value>> {
            let (a, b) = (ctx.t(0)?, ctx.t(1)?);
            macro_rules! go {
                ($u:expr, $w:expr) => {{
                    let (o, sh) = zip_bcast($u, &a.shape, $w, &b.shape, |$x, $y| $e)?;
                    one(Tensor::bool(sh, o))
                }};
            }
            match (&a.data, &b.data) {
                (Data::F32(u), Data::F32(w)) => go!(u, w),
                (Data::F64(u), Data::F64(w)) => go!(u, w),
                (Data::I8(u), Data::I8(w)) => go!(u, w),
                (Data::I16(u), Data::I16(w)) => go!(u, w),
                (Data::I32(u), Data::I32(w)) => go!(u, w),
                (Data::I64(u), Data::I64(w)) => go!(u, w),
                (Data::U8(u), Data::U8(w)) => go!(u, w),
                (Data::U16(u), Data::U16(w)) => go!(u, w),
                (Data::U32(u), Data::U32(w)) => go!(u, w),
                (Data::U64(u), Data::U64(w)) => go!(u, w),
                (Data::Bool(u), Data::Bool(w)) => go!(u, w),
                (Data::Str(u), Data::Str(w)) => {
                    let u: Vec<&str> = u.iter().map(String::as_str).collect();
                    let w: Vec<&str> = w.iter().map(String::as_str).collect();
                    go!(&u, &w)
                }
                (x, y) => Err(format!("cannot compare {} with {}", x.dtype(), y.dtype())),
            }
        }
    };
}
compare!(equal, |x, y| x == y);
compare!(less, |x, y| x < y);
compare!(less_equal, |x, y| x <= y);
compare!(greater, |x, y| x > y);
compare!(greater_equal, |x, y| x >= y);

macro_rules! logic {
    ($name:ident, |$x:ident, $y:ident| $e:expr) => {
        pub(crate) fn $name(ctx: &mut Ctx) -> R<Vec<Value>> {
            let (a, b) = (ctx.t(0)?, ctx.t(1)?);
            match (&a.data, &b.data) {
                (Data::Bool(u), Data::Bool(w)) => {
                    let (o, sh) = zip_bcast(u, &a.shape, w, &b.shape, |$x, $y| $e)?;
                    one(Tensor::bool(sh, o))
                }
                (x, y) => Err(format!(
                    "expected bool operands, got {} and {}",
                    x.dtype(),
                    y.dtype()
                )),
            }
        }
    };
}
logic!(and, |x, y| x & y);
logic!(or, |x, y| x | y);
logic!(xor, |x, y| x ^ y);

macro_rules! bitwise {
    ($name:ident, |$x:ident, $y:ident| $e:expr) => {
        pub(crate) fn $name(ctx: &mut Ctx) -> R<Vec<Value>> {
            one(binary_num!(
                ctx.t(0)?,
                ctx.t(1)?,
                |x, y| x + y - y,
                |$x, $y| $e
            ))
        }
    };
}
bitwise!(bitwise_and, |p, q| p & q);
bitwise!(bitwise_or, |p, q| p | q);
bitwise!(bitwise_xor, |p, q| p ^ q);

pub(crate) fn bit_shift(ctx: &mut Ctx) -> R<Vec<Value>> {
    let left = ctx.as_str("direction").as_deref() == Some("LEFT");
    let (a, b) = (ctx.t(0)?, ctx.t(1)?);
    let bits = a.dtype().bits();
    one(binary_num!(a, b, |x, y| x + y - y, |p, q| {
        // a negative shift or one of the width or more shifts every bit out: a right shift of a negative
        // signed value leaves its sign bits (-1), anything else 0 (opset 28 defines both)
        let s = q as i128;
        if !(0..bits as i128).contains(&s) {
            if left { 0 } else { ((p as i128) >> 127) as _ }
        } else if left {
            p << s as u32
        } else {
            p >> s as u32
        }
    }))
}

/// Max/Min/Sum/Mean: variadic, broadcasting, folded left to right.
fn variadic(ctx: &mut Ctx, op: impl Fn(&Tensor, &Tensor) -> R<Tensor>) -> R<Tensor> {
    let mut acc = ctx.t(0)?.clone();
    for i in 1..ctx.n_in() {
        acc = op(&acc, ctx.t(i)?)?;
    }
    Ok(acc)
}
/// Max or Min, NaN-propagating for floats.
fn extreme(ctx: &mut Ctx, take_max: bool) -> R<Vec<Value>> {
    let pick = move |x: f64, y: f64| {
        if x.is_nan() || y.is_nan() {
            f64::NAN
        } else if (x > y) == take_max {
            x
        } else {
            y
        }
    };
    one(variadic(ctx, |a, b| {
        if a.data.is_float() {
            let dt = a.dtype();
            let (u, w) = (a.to_f64s()?, b.to_f64s()?);
            let (o, sh) = zip_bcast(&u, &a.shape, &w, &b.shape, pick)?;
            return cast_tensor(&Tensor::new(sh, Data::F64(o)), dt);
        }
        Ok(binary_num!(
            a,
            b,
            |x, y| x + y - y,
            |p, q| if (p > q) == take_max { p } else { q }
        ))
    })?)
}
pub(crate) fn max(ctx: &mut Ctx) -> R<Vec<Value>> {
    extreme(ctx, true)
}
pub(crate) fn min(ctx: &mut Ctx) -> R<Vec<Value>> {
    extreme(ctx, false)
}
pub(crate) fn sum(ctx: &mut Ctx) -> R<Vec<Value>> {
    one(variadic(ctx, |a, b| {
        Ok(binary_num!(a, b, |x, y| x + y, |p, q| p.wrapping_add(q)))
    })?)
}
pub(crate) fn mean(ctx: &mut Ctx) -> R<Vec<Value>> {
    let n = ctx.n_in() as f64;
    let s = variadic(ctx, |a, b| {
        Ok(binary_num!(a, b, |x, y| x + y, |p, q| p.wrapping_add(q)))
    })?;
    float_map!(&s, [n = n], |x| x / n)
}

pub(crate) fn where_(ctx: &mut Ctx) -> R<Vec<Value>> {
    let (c, x, y) = (ctx.t(0)?, ctx.t(1)?, ctx.t(2)?);
    let Data::Bool(cv) = &c.data else {
        return Err(format!("condition must be bool, got {}", c.dtype()));
    };
    if x.dtype() != y.dtype() {
        return Err(format!("X is {} but Y is {}", x.dtype(), y.dtype()));
    }
    let out = broadcast_shape(&broadcast_shape(&c.shape, &x.shape)?, &y.shape)?;
    let (oc, ox, oy) = (
        bcast_offsets(&c.shape, &out),
        bcast_offsets(&x.shape, &out),
        bcast_offsets(&y.shape, &out),
    );
    let data = crate::zip_same!(&x.data, &y.data, |xv, yv| (0..oc.len())
        .map(|i| if cv[oc[i]] {
            xv[ox[i]].clone()
        } else {
            yv[oy[i]].clone()
        })
        .collect())?;
    one(Tensor::new(out, data))
}

// ---------------------------------------------------------------------------------------------------------
// Cast

pub(crate) fn cast(ctx: &mut Ctx) -> R<Vec<Value>> {
    let to = ctx.ai("to", 0);
    let to = DType::from_code(to as i32).ok_or_else(|| format!("unknown target type {to}"))?;
    let saturate = ctx.ai("saturate", 1) != 0;
    if to == DType::F8E8M0 && !matches!(ctx.t(0)?.data, Data::Small(..)) {
        let mode = ctx.as_str("round_mode").unwrap_or_else(|| "up".into());
        let t = ctx.t(0)?;
        let codes = t
            .to_f32s()?
            .iter()
            .map(|&x| crate::small::encode_e8m0(x, saturate, &mode))
            .collect();
        return one(Tensor::new(t.shape.clone(), Data::Small(to, codes)));
    }
    one(cast_tensor_sat(ctx.t(0)?, to, saturate)?)
}
pub(crate) fn cast_like(ctx: &mut Ctx) -> R<Vec<Value>> {
    let to = ctx.t(1)?.dtype();
    one(cast_tensor_sat(ctx.t(0)?, to, ctx.ai("saturate", 1) != 0)?)
}

/// [`cast_tensor`] with ONNX's `saturate` for float8 targets (out-of-range values clamp to the largest
/// finite value instead of becoming inf or NaN).
pub fn cast_tensor_sat(t: &Tensor, to: DType, saturate: bool) -> R<Tensor> {
    use crate::small;
    if let Data::Small(d, codes) = &t.data {
        if *d == to {
            return Ok(t.clone());
        }
        let wide = if small::is_small_int(*d) {
            Tensor::i64(
                t.shape.clone(),
                codes.iter().map(|&c| small::decode_int(*d, c)).collect(),
            )
        } else {
            Tensor::new(t.shape.clone(), Data::F64(small::to_f64s(*d, codes)))
        };
        return cast_tensor_sat(&wide, to, saturate);
    }
    if small::is_small(to) {
        let codes: Vec<u8> = if small::is_small_int(to) {
            let v: Vec<i64> = if t.data.is_float() {
                t.to_f64s()?
                    .iter()
                    .map(|&x| if x.is_nan() { 0 } else { x as i64 })
                    .collect()
            } else {
                t.to_i64s()?
            };
            v.iter().map(|&x| small::encode_int(to, x)).collect()
        } else {
            t.to_f64s()?
                .iter()
                .map(|&x| small::encode_float(to, x, saturate))
                .collect()
        };
        return Ok(Tensor::new(t.shape.clone(), Data::Small(to, codes)));
    }
    cast_tensor(t, to)
}

/// Integer elements (an iterator of any primitive integer type) to `to`'s data: `as` semantics, so integers
/// wrap and round to nearest even into floats; f16/bf16 through f64 (exact for every integer below 2^53,
/// and any larger one overflows them).
macro_rules! int_cast {
    ($it:expr, $to:expr) => {{
        let it = $it;
        match $to {
            DType::F32 => Data::F32(it.map(|x| x as f32).collect()),
            DType::F64 => Data::F64(it.map(|x| x as f64).collect()),
            DType::F16 => Data::F16(it.map(|x| f16::from_f64(x as f64)).collect()),
            DType::BF16 => Data::BF16(it.map(|x| bf16::from_f64(x as f64)).collect()),
            DType::I8 => Data::I8(it.map(|x| x as i8).collect()),
            DType::I16 => Data::I16(it.map(|x| x as i16).collect()),
            DType::I32 => Data::I32(it.map(|x| x as i32).collect()),
            DType::I64 => Data::I64(it.map(|x| x as i64).collect()),
            DType::U8 => Data::U8(it.map(|x| x as u8).collect()),
            DType::U16 => Data::U16(it.map(|x| x as u16).collect()),
            DType::U32 => Data::U32(it.map(|x| x as u32).collect()),
            DType::U64 => Data::U64(it.map(|x| x as u64).collect()),
            DType::Bool => Data::Bool(it.map(|x| x != 0).collect()),
            d => return Err(format!("cannot cast to {d}")),
        }
    }};
}

/// Converts a tensor to `to`: floats round to nearest even (to +-inf past the range), floats to integers
/// truncate toward zero (saturating), integers wrap, anything to bool is `!= 0`, strings parse and print.
pub fn cast_tensor(t: &Tensor, to: DType) -> R<Tensor> {
    if t.dtype() == to {
        return Ok(t.clone());
    }
    let shape = t.shape.clone();
    // Fast exact paths.
    match (&t.data, to) {
        (Data::F32(v), DType::F16) => return Ok(Tensor::new(shape, Data::F16(round_f16(v)))),
        (Data::F32(v), DType::BF16) => return Ok(Tensor::new(shape, Data::BF16(round_bf16(v)))),
        (Data::F16(_) | Data::BF16(_), DType::F32) => {
            return Ok(Tensor::new(shape, Data::F32(t.to_f32s()?)));
        }
        (Data::Str(v), _) => {
            let f: Vec<f64> = v.iter().map(|s| parse_num(s)).collect::<R<_>>()?;
            return cast_tensor(&Tensor::new(shape, Data::F64(f)), to);
        }
        (_, DType::Str) => {
            let s: Vec<String> = match &t.data {
                Data::F32(v) => v.iter().map(|x| fmt_float(*x as f64)).collect(),
                Data::F64(v) => v.iter().map(|x| fmt_float(*x)).collect(),
                Data::F16(v) => v.iter().map(|x| fmt_float(x.to_f64())).collect(),
                Data::BF16(v) => v.iter().map(|x| fmt_float(x.to_f64())).collect(),
                Data::Bool(v) => v.iter().map(|x| (*x as u8).to_string()).collect(),
                _ => t.to_i64s()?.iter().map(|x| x.to_string()).collect(),
            };
            return Ok(Tensor::new(shape, Data::Str(s)));
        }
        _ => {}
    }
    let data = if t.data.is_float() {
        let v = t.to_f64s()?;
        match to {
            DType::F32 => Data::F32(v.iter().map(|&x| x as f32).collect()),
            DType::F64 => Data::F64(v),
            DType::F16 => Data::F16(v.iter().map(|&x| f16::from_f64(x)).collect()),
            DType::BF16 => Data::BF16(v.iter().map(|&x| bf16::from_f64(x)).collect()),
            DType::I8 => Data::I8(v.iter().map(|&x| x as i8).collect()),
            DType::I16 => Data::I16(v.iter().map(|&x| x as i16).collect()),
            DType::I32 => Data::I32(v.iter().map(|&x| x as i32).collect()),
            DType::I64 => Data::I64(v.iter().map(|&x| x as i64).collect()),
            DType::U8 => Data::U8(v.iter().map(|&x| x as u8).collect()),
            DType::U16 => Data::U16(v.iter().map(|&x| x as u16).collect()),
            DType::U32 => Data::U32(v.iter().map(|&x| x as u32).collect()),
            DType::U64 => Data::U64(v.iter().map(|&x| x as u64).collect()),
            DType::Bool => Data::Bool(v.iter().map(|&x| x != 0.0).collect()),
            d => return Err(format!("cannot cast to {d}")),
        }
    } else if let Data::Bool(v) = &t.data {
        // (one-hot encodings: Equal then Cast, 7.9M elements on magika)
        int_cast!(v.iter().map(|&b| u8::from(b)), to)
    } else if let Data::U64(v) = &t.data {
        // past i64: through i128, so that every u64 keeps its value before it wraps or rounds
        int_cast!(v.iter().map(|&x| x as i128), to)
    } else {
        // every other integer fits i64, where `as` is one instruction (i128 to float is a library call)
        int_cast!(t.to_i64s()?.into_iter(), to)
    };
    Ok(Tensor::new(shape, data))
}

fn parse_num(s: &str) -> R<f64> {
    let t = s.trim();
    match t.to_ascii_lowercase().as_str() {
        "inf" | "+inf" | "infinity" | "+infinity" => Ok(f64::INFINITY),
        "-inf" | "-infinity" => Ok(f64::NEG_INFINITY),
        "nan" | "+nan" | "-nan" => Ok(f64::NAN),
        _ => t
            .parse::<f64>()
            .map_err(|_| format!("cannot parse '{s}' as a number")),
    }
}

fn fmt_float(x: f64) -> String {
    if x.is_nan() {
        "NaN".into()
    } else if x.is_infinite() {
        if x > 0.0 { "INF".into() } else { "-INF".into() }
    } else {
        format!("{x}")
    }
}

/// SwiGLU (opset 26): `a * sigmoid(alpha * a) * b`, on inputs of one shape.
pub(crate) fn swiglu(ctx: &mut Ctx) -> R<Vec<Value>> {
    let (a, b) = (ctx.t(0)?, ctx.t(1)?);
    if a.shape != b.shape {
        return Err(format!(
            "A {:?} and B {:?} must have the same shape",
            a.shape, b.shape
        ));
    }
    let alpha = ctx.af("alpha", 1.0);
    let (av, bv) = (a.to_f32s()?, b.to_f32s()?);
    let y = av
        .iter()
        .zip(&bv)
        .map(|(&x, &g)| x / (1.0 + (-alpha * x).exp()) * g)
        .collect();
    Ok(vec![Value::Tensor(Tensor::f32(a.shape.clone(), y))])
}

/// BitCast (opset 26): the same bytes read as another type of the same width.
pub(crate) fn bitcast(ctx: &mut Ctx) -> R<Vec<Value>> {
    let x = ctx.t(0)?;
    let to = DType::from_code(ctx.ai("to", 0) as i32).ok_or("BitCast needs a valid `to`")?;
    let from = x.dtype();
    if matches!(from, DType::Str) || matches!(to, DType::Str) || from.bits() != to.bits() {
        return Err(format!(
            "BitCast needs two types of one width, not strings: {from} ({} bits) to {to} ({} bits)",
            from.bits(),
            to.bits()
        ));
    }
    if crate::small::is_small(from) || crate::small::is_small(to) {
        return Err(format!(
            "BitCast of sub-byte and float8 types ({from} to {to}) is not supported"
        ));
    }
    let raw = crate::tensor::data_to_raw(&x.data);
    Ok(vec![Value::Tensor(Tensor::new(
        x.shape.clone(),
        crate::tensor::raw_to_data(to, &raw)?,
    ))])
}
