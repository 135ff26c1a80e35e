//! Reductions and ArgMax/ArgMin. Sums accumulate in the compute type (f32 for f32 and half data, f64 for f64).

use super::elementwise::{bcast_offsets, cast_tensor};
use super::{Ctx, R, axis, one};
use crate::{Data, Tensor, Value, numel};

/// Reduces `v` (of `shape`) over `axes` with `f` from `init`; returns the values and the kept-dims shape.
pub(crate) fn reduce_with<T: Copy + Send + Sync>(
    v: &[T],
    shape: &[usize],
    axes: &[usize],
    init: T,
    f: impl Fn(T, T) -> T + Sync,
) -> R<(Vec<T>, Vec<usize>)> {
    let keep: Vec<usize> = shape
        .iter()
        .enumerate()
        .map(|(i, &d)| if axes.contains(&i) { 1 } else { d })
        .collect();
    let n_out = numel(&keep);
    let mut out = vec![init; n_out];
    let mut sorted = axes.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let contiguous = sorted.windows(2).all(|w| w[1] == w[0] + 1);
    if let (true, Some(&first), Some(&last)) = (contiguous, sorted.first(), sorted.last()) {
        let outer = numel(&shape[..first]);
        let red = numel(&shape[first..=last]);
        let inner = numel(&shape[last + 1..]);
        if inner == 1 {
            use rayon::prelude::*;
            if red > 0 {
                out.par_iter_mut()
                    .zip(v.par_chunks(red))
                    .for_each(|(o, c)| {
                        *o = c.iter().fold(init, |a, &b| f(a, b));
                    });
            }
        } else {
            for o in 0..outer {
                for r in 0..red {
                    let src = &v[(o * red + r) * inner..(o * red + r + 1) * inner];
                    let dst = &mut out[o * inner..(o + 1) * inner];
                    for (d, &s) in dst.iter_mut().zip(src) {
                        *d = f(*d, s);
                    }
                }
            }
        }
    } else if !sorted.is_empty() {
        let offs = bcast_offsets(&keep, shape);
        for (i, &o) in offs.iter().enumerate() {
            out[o] = f(out[o], v[i]);
        }
    } else {
        out.copy_from_slice(v);
    }
    Ok((out, keep))
}

/// Axes from the attribute (old opsets) or the second input; `None` means all axes (or none with
/// `noop_with_empty_axes`).
fn reduce_axes(ctx: &Ctx, input_from: i64) -> R<Vec<usize>> {
    let x = ctx.t(0)?;
    let given = if ctx.opset >= input_from {
        ctx.opt(1).map(|t| t.to_i64s()).transpose()?
    } else {
        ctx.ais("axes")
    };
    match given {
        Some(a) if !a.is_empty() => a.iter().map(|&v| axis(v, x.rank())).collect(),
        _ if ctx.ai("noop_with_empty_axes", 0) != 0 => Ok(vec![]),
        _ => Ok((0..x.rank()).collect()),
    }
}

fn finish(ctx: &Ctx, keep: Vec<usize>, axes: &[usize], data: Data) -> R<Vec<Value>> {
    let shape = if ctx.ai("keepdims", 1) != 0 {
        keep
    } else {
        keep.iter()
            .enumerate()
            .filter(|(i, _)| !axes.contains(i))
            .map(|(_, &d)| d)
            .collect()
    };
    one(Tensor::new(shape, data))
}

/// A reduction: `pre` maps each element, `f` folds from `init`, `post` maps the result given the count.
#[allow(clippy::too_many_arguments)]
fn reduce(
    ctx: &Ctx,
    input_from: i64,
    init: f64,
    pre: fn(f64) -> f64,
    f: fn(f64, f64) -> f64,
    post: fn(f64, usize) -> f64,
) -> R<Vec<Value>> {
    let x = ctx.t(0)?;
    let axes = reduce_axes(ctx, input_from)?;
    let cnt: usize = axes.iter().map(|&a| x.shape[a]).product();
    // Every float type accumulates in f64 and rounds once: f32 sums of many terms then match a pairwise or
    // vectorized reduction (onnxruntime's) instead of drifting with the term count.
    let v: Vec<f64> = x.to_f64s()?.into_iter().map(pre).collect();
    let (o, keep) = reduce_with(&v, &x.shape, &axes, init, f)?;
    let o: Vec<f64> = o.iter().map(|&e| post(e, cnt)).collect();
    let t = cast_tensor(&Tensor::new(vec![o.len()], Data::F64(o)), x.dtype())?;
    finish(ctx, keep, &axes, t.data)
}

fn id(x: f64) -> f64 {
    x
}
fn keep(x: f64, _n: usize) -> f64 {
    x
}

pub(crate) fn reduce_sum(ctx: &mut Ctx) -> R<Vec<Value>> {
    reduce(ctx, 13, 0.0, id, |a, b| a + b, keep)
}
pub(crate) fn reduce_mean(ctx: &mut Ctx) -> R<Vec<Value>> {
    reduce(ctx, 18, 0.0, id, |a, b| a + b, |s, n| s / n as f64)
}
pub(crate) fn reduce_max(ctx: &mut Ctx) -> R<Vec<Value>> {
    if matches!(ctx.t(0)?.data, Data::Bool(_)) {
        return bool_reduce(ctx, true);
    }
    reduce(
        ctx,
        18,
        f64::NEG_INFINITY,
        id,
        |a, b| if b > a || b.is_nan() { b } else { a },
        keep,
    )
}
pub(crate) fn reduce_min(ctx: &mut Ctx) -> R<Vec<Value>> {
    if matches!(ctx.t(0)?.data, Data::Bool(_)) {
        return bool_reduce(ctx, false);
    }
    reduce(
        ctx,
        18,
        f64::INFINITY,
        id,
        |a, b| if b < a || b.is_nan() { b } else { a },
        keep,
    )
}
pub(crate) fn reduce_prod(ctx: &mut Ctx) -> R<Vec<Value>> {
    reduce(ctx, 18, 1.0, id, |a, b| a * b, keep)
}
pub(crate) fn reduce_l1(ctx: &mut Ctx) -> R<Vec<Value>> {
    reduce(ctx, 18, 0.0, f64::abs, |a, b| a + b, keep)
}
pub(crate) fn reduce_l2(ctx: &mut Ctx) -> R<Vec<Value>> {
    reduce(ctx, 18, 0.0, |x| x * x, |a, b| a + b, |s, _| s.sqrt())
}
pub(crate) fn reduce_log_sum(ctx: &mut Ctx) -> R<Vec<Value>> {
    reduce(ctx, 18, 0.0, id, |a, b| a + b, |s, _| s.ln())
}
pub(crate) fn reduce_sum_square(ctx: &mut Ctx) -> R<Vec<Value>> {
    reduce(ctx, 18, 0.0, |x| x * x, |a, b| a + b, keep)
}
pub(crate) fn reduce_log_sum_exp(ctx: &mut Ctx) -> R<Vec<Value>> {
    // Shifted by the maximum for stability.
    let x = ctx.t(0)?;
    let axes = reduce_axes(ctx, 18)?;
    let v = x.to_f64s()?;
    let (mx, keepd) = reduce_with(&v, &x.shape, &axes, f64::NEG_INFINITY, f64::max)?;
    let offs = bcast_offsets(&keepd, &x.shape);
    let e: Vec<f64> = v
        .iter()
        .zip(&offs)
        .map(|(&a, &o)| {
            if mx[o].is_finite() {
                (a - mx[o]).exp()
            } else {
                0.0
            }
        })
        .collect();
    let (s, _) = reduce_with(&e, &x.shape, &axes, 0.0, |a, b| a + b)?;
    let o: Vec<f64> = s
        .iter()
        .zip(&mx)
        .map(|(&s, &m)| if m.is_finite() { s.ln() + m } else { m })
        .collect();
    let t = cast_tensor(&Tensor::new(vec![o.len()], Data::F64(o)), x.dtype())?;
    finish(ctx, keepd, &axes, t.data)
}

fn bool_reduce(ctx: &Ctx, any: bool) -> R<Vec<Value>> {
    let x = ctx.t(0)?;
    let Data::Bool(v) = &x.data else {
        unreachable!()
    };
    let axes = reduce_axes(ctx, 18)?;
    let (o, keepd) = reduce_with(
        v,
        &x.shape,
        &axes,
        !any,
        |a, b| if any { a | b } else { a & b },
    )?;
    finish(ctx, keepd, &axes, Data::Bool(o))
}

fn arg(ctx: &Ctx, max: bool) -> R<Vec<Value>> {
    let x = ctx.t(0)?;
    let ax = super::dim_axis(ctx.ai("axis", 0), x.rank())?;
    let last = ctx.ai("select_last_index", 0) != 0;
    let v = x.to_f64s()?;
    let (outer, dim, inner) = (
        numel(&x.shape[..ax]),
        x.shape[ax],
        numel(&x.shape[ax + 1..]),
    );
    let mut out = vec![0i64; outer * inner];
    for o in 0..outer {
        for i in 0..inner {
            let mut best = 0usize;
            for k in 1..dim {
                let (a, b) = (
                    v[(o * dim + k) * inner + i],
                    v[(o * dim + best) * inner + i],
                );
                let better = if max {
                    a > b || (last && a == b)
                } else {
                    a < b || (last && a == b)
                };
                if better {
                    best = k;
                }
            }
            out[o * inner + i] = best as i64;
        }
    }
    let mut shape = x.shape.clone();
    if ctx.ai("keepdims", 1) != 0 {
        shape[ax] = 1;
    } else {
        shape.remove(ax);
    }
    one(Tensor::i64(shape, out))
}

pub(crate) fn arg_max(ctx: &mut Ctx) -> R<Vec<Value>> {
    arg(ctx, true)
}
pub(crate) fn arg_min(ctx: &mut Ctx) -> R<Vec<Value>> {
    arg(ctx, false)
}
