//! Normalizations, softmax, pooling, TopK, Dropout. Statistics and sums accumulate in f32 (f64 for f64 data)
//! over the whole reduced extent, as the CUDA kernels do.

use rayon::prelude::*;

use super::linalg::{f32s, unravel, window};
use super::{Ctx, R, axis, one};
use crate::{Data, Tensor, Value, numel};

/// Reads a float input as f64 (kernels here are not the hot path for f64) or f32.
enum Fl {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

fn fl(t: &Tensor) -> R<Fl> {
    Ok(match &t.data {
        Data::F64(v) => Fl::F64(v.clone()),
        _ => Fl::F32(t.to_f32s()?),
    })
}

/// Builds the output in the input's float type from f64 values or f32 values.
fn out_like(t: &Tensor, shape: Vec<usize>, v: Vec<f32>) -> Tensor {
    match t.data {
        Data::F64(_) => Tensor::new(shape, Data::F64(v.iter().map(|&x| x as f64).collect())),
        Data::F32(_) => Tensor::f32(shape, v),
        // Integer data (MaxPool on u8 images): computed in f32, exact for these values.
        _ => {
            let f = Tensor::f32(shape, v);
            super::elementwise::cast_tensor(&f, t.dtype()).unwrap_or(f)
        }
    }
}

/// (outer, dim, inner) around an axis.
fn split3(shape: &[usize], ax: usize) -> (usize, usize, usize) {
    (numel(&shape[..ax]), shape[ax], numel(&shape[ax + 1..]))
}

/// Inference BatchNormalization folded per channel in f32, `y = x * a + b` with
/// `a = 1 / sqrt(var + eps) * scale` and `b = bias - mean * a`: the kernel's folding, shared with the fused
/// elementwise chains so both give the same bits.
pub(crate) fn fold_batch_norm(
    scale: &[f32],
    bias: &[f32],
    mean: &[f32],
    var: &[f32],
    eps: f32,
) -> (Vec<f32>, Vec<f32>) {
    let a: Vec<f32> = var
        .iter()
        .zip(scale)
        .map(|(&v, &s)| 1.0f32 / (v + eps).sqrt() * s)
        .collect();
    let b = bias
        .iter()
        .zip(mean)
        .zip(&a)
        .map(|((&b, &m), &a)| b - m * a)
        .collect();
    (a, b)
}

pub(crate) fn batch_norm(ctx: &mut Ctx) -> R<Vec<Value>> {
    let x = ctx.t(0)?;
    let (scale, bias, mean, var) = (
        ctx.t(1)?.to_f64s()?,
        ctx.t(2)?.to_f64s()?,
        ctx.t(3)?.to_f64s()?,
        ctx.t(4)?.to_f64s()?,
    );
    let eps = ctx.af("epsilon", 1e-5) as f64;
    if x.rank() < 2 {
        return Err("BatchNormalization takes rank >= 2".into());
    }
    let c = x.shape[1];
    let plane = numel(&x.shape[2..]);
    if ctx.ai("training_mode", 0) != 0 {
        return batch_norm_training(ctx, x, &scale, &bias, &mean, &var, eps);
    }
    // Folded per channel, y = x * a + b with a = scale / sqrt(var + eps) and b = bias - mean * a, computed in
    // the compute type (f32 for f32 and half data) as onnxruntime and cuDNN's inference kernel do.
    let is64 = matches!(x.data, Data::F64(_));
    let (a, b): (Vec<f64>, Vec<f64>) = if is64 {
        let a: Vec<f64> = (0..c).map(|i| scale[i] / (var[i] + eps).sqrt()).collect();
        let b = (0..c).map(|i| bias[i] - mean[i] * a[i]).collect();
        (a, b)
    } else {
        let f = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        let (a, b) = fold_batch_norm(&f(&scale), &f(&bias), &f(&mean), &f(&var), eps as f32);
        let w = |v: Vec<f32>| v.into_iter().map(f64::from).collect();
        (w(a), w(b))
    };
    match fl(x)? {
        Fl::F32(mut v) => {
            v.par_chunks_mut(plane.max(1))
                .with_min_len(super::min_len(plane))
                .enumerate()
                .for_each(|(i, p)| {
                    let (ai, bi) = (a[i % c] as f32, b[i % c] as f32);
                    p.iter_mut().for_each(|e| *e = *e * ai + bi);
                });
            one(Tensor::f32(x.shape.clone(), v))
        }
        Fl::F64(mut v) => {
            v.chunks_mut(plane.max(1)).enumerate().for_each(|(i, p)| {
                let (ai, bi) = (a[i % c], b[i % c]);
                p.iter_mut().for_each(|e| *e = *e * ai + bi);
            });
            one(Tensor::new(x.shape.clone(), Data::F64(v)))
        }
    }
}

/// Training mode: normalize with the batch statistics and return the updated running statistics.
fn batch_norm_training(
    ctx: &Ctx,
    x: &Tensor,
    scale: &[f64],
    bias: &[f64],
    mean: &[f64],
    var: &[f64],
    eps: f64,
) -> R<Vec<Value>> {
    let m = ctx.af("momentum", 0.9) as f64;
    let (n, c) = (x.shape[0], x.shape[1]);
    let plane = numel(&x.shape[2..]);
    let v = x.to_f64s()?;
    let cnt = (n * plane) as f64;
    let mut bm = vec![0f64; c];
    let mut bv = vec![0f64; c];
    for b in 0..n {
        for ch in 0..c {
            let p = &v[(b * c + ch) * plane..(b * c + ch + 1) * plane];
            bm[ch] += p.iter().sum::<f64>() / cnt;
        }
    }
    for b in 0..n {
        for ch in 0..c {
            let p = &v[(b * c + ch) * plane..(b * c + ch + 1) * plane];
            bv[ch] += p.iter().map(|e| (e - bm[ch]) * (e - bm[ch])).sum::<f64>() / cnt;
        }
    }
    let y: Vec<f64> = v
        .iter()
        .enumerate()
        .map(|(i, &e)| {
            let ch = (i / plane.max(1)) % c;
            (e - bm[ch]) / (bv[ch] + eps).sqrt() * scale[ch] + bias[ch]
        })
        .collect();
    let rm: Vec<f64> = (0..c).map(|i| mean[i] * m + bm[i] * (1.0 - m)).collect();
    let rv: Vec<f64> = (0..c).map(|i| var[i] * m + bv[i] * (1.0 - m)).collect();
    let dt = x.dtype();
    let mk = |shape: Vec<usize>, v: Vec<f64>| {
        super::elementwise::cast_tensor(&Tensor::new(shape, Data::F64(v)), dt)
    };
    Ok(vec![
        Value::Tensor(mk(x.shape.clone(), y)?),
        Value::Tensor(mk(vec![c], rm)?),
        Value::Tensor(mk(vec![c], rv)?),
    ])
}

/// Normalizes each of `groups` contiguous chunks of `v` to zero mean and unit variance.
fn normalize_chunks(v: &mut [f32], chunk: usize, eps: f32, stats: Option<&mut Vec<(f32, f32)>>) {
    let res: Vec<(f32, f32)> = v
        .par_chunks_mut(chunk.max(1))
        .map(|p| {
            // Statistics in f64, applied in f32.
            let n = p.len() as f64;
            let mean = p.iter().map(|&e| e as f64).sum::<f64>() / n;
            let var = p
                .iter()
                .map(|&e| (e as f64 - mean) * (e as f64 - mean))
                .sum::<f64>()
                / n;
            let inv = 1.0 / (var + eps as f64).sqrt();
            p.iter_mut()
                .for_each(|e| *e = ((*e as f64 - mean) * inv) as f32);
            (mean as f32, inv as f32)
        })
        .collect();
    if let Some(s) = stats {
        *s = res;
    }
}

pub(crate) fn instance_norm(ctx: &mut Ctx) -> R<Vec<Value>> {
    let x = ctx.t(0)?;
    let (scale, bias) = (ctx.t(1)?.to_f32s()?, ctx.t(2)?.to_f32s()?);
    let eps = ctx.af("epsilon", 1e-5);
    let c = x.shape[1];
    let plane = numel(&x.shape[2..]);
    let mut v = x.to_f32s()?;
    normalize_chunks(&mut v, plane, eps, None);
    v.chunks_mut(plane.max(1)).enumerate().for_each(|(i, p)| {
        p.iter_mut()
            .for_each(|e| *e = *e * scale[i % c] + bias[i % c]);
    });
    one(out_like(x, x.shape.clone(), v))
}

/// A normalization's `scale` or `bias` must broadcast to the normalized dims without growing them.
pub(crate) fn fits_normalized(name: &str, shape: &[usize], dims: &[usize]) -> R<()> {
    if super::elementwise::broadcast_shape(shape, dims)
        .ok()
        .as_deref()
        == Some(dims)
    {
        Ok(())
    } else {
        Err(format!(
            "{name} {shape:?} does not broadcast to the normalized dims {dims:?}"
        ))
    }
}

pub(crate) fn layer_norm(ctx: &mut Ctx) -> R<Vec<Value>> {
    let x = ctx.t(0)?;
    let ax = axis(ctx.ai("axis", -1), x.rank())?;
    layer_norm_of(x, ctx.t(1)?, ctx.opt(2), ax, ctx.af("epsilon", 1e-5))
}

/// The shape of a normalization's per-row statistics: `shape` with the normalized dims (from `ax`) set to 1.
pub(crate) fn stats_shape(shape: &[usize], ax: usize) -> Vec<usize> {
    let mut s = shape.to_vec();
    for d in s.iter_mut().skip(ax) {
        *d = 1;
    }
    s
}

/// LayerNormalization of `x` over the dims from `ax`: `[normalized * scale + bias, mean, inverse standard
/// deviation]`, the statistics f32 with one per row (also onnxruntime's SkipLayerNormalization's core).
pub(crate) fn layer_norm_of(
    x: &Tensor,
    scale: &Tensor,
    bias: Option<&Tensor>,
    ax: usize,
    eps: f32,
) -> R<Vec<Value>> {
    let inner = numel(&x.shape[ax..]);
    // scale and bias broadcast to the normalized dims, never past them
    for (name, t) in [("scale", Some(scale)), ("bias", bias)] {
        if let Some(t) = t {
            fits_normalized(name, &t.shape, &x.shape[ax..])?;
        }
    }
    let sv = scale.to_f32s()?;
    let bv = bias.map(|b| b.to_f32s()).transpose()?;
    let soffs = super::elementwise::bcast_offsets(&scale.shape, &x.shape[ax..]);
    let boffs = bias.map(|b| super::elementwise::bcast_offsets(&b.shape, &x.shape[ax..]));
    let mut v = x.to_f32s()?;
    let mut stats = Vec::new();
    normalize_chunks(&mut v, inner, eps, Some(&mut stats));
    v.par_chunks_mut(inner.max(1)).for_each(|p| {
        for (k, e) in p.iter_mut().enumerate() {
            *e *= sv[soffs[k]];
            if let (Some(b), Some(bo)) = (&bv, &boffs) {
                *e += b[bo[k]];
            }
        }
    });
    let sshape = stats_shape(&x.shape, ax);
    let mean: Vec<f32> = stats.iter().map(|s| s.0).collect();
    let inv: Vec<f32> = stats.iter().map(|s| s.1).collect();
    Ok(vec![
        Value::Tensor(out_like(x, x.shape.clone(), v)),
        Value::Tensor(Tensor::f32(sshape.clone(), mean)),
        Value::Tensor(Tensor::f32(sshape, inv)),
    ])
}

pub(crate) fn group_norm(ctx: &mut Ctx) -> R<Vec<Value>> {
    let x = ctx.t(0)?;
    let g = ctx.ai("num_groups", 1);
    let eps = ctx.af("epsilon", 1e-5);
    let (scale, bias) = (ctx.t(1)?.to_f32s()?, ctx.t(2)?.to_f32s()?);
    let c = *x
        .shape
        .get(1)
        .ok_or("GroupNormalization takes N x C x ...")?;
    if g < 1 || c % g as usize != 0 {
        return Err(format!("num_groups {g} does not divide {c} channels"));
    }
    let g = g as usize;
    if scale.len() != bias.len() || (scale.len() != c && scale.len() != g) {
        return Err(format!(
            "scale ({}) and bias ({}) must hold one value per channel ({c}) or per group ({g})",
            scale.len(),
            bias.len()
        ));
    }
    let plane = numel(&x.shape[2..]);
    let mut v = x.to_f32s()?;
    normalize_chunks(&mut v, c / g * plane, eps, None);
    v.chunks_mut(plane.max(1)).enumerate().for_each(|(i, p)| {
        let ch = i % c;
        let k = if scale.len() == c { ch } else { ch / (c / g) };
        p.iter_mut().for_each(|e| *e = *e * scale[k] + bias[k]);
    });
    one(out_like(x, x.shape.clone(), v))
}

pub(crate) fn lp_norm(ctx: &mut Ctx) -> R<Vec<Value>> {
    let x = ctx.t(0)?;
    let ax = axis(ctx.ai("axis", -1), x.rank())?;
    let p = ctx.ai("p", 2);
    let (outer, dim, inner) = split3(&x.shape, ax);
    let mut v = x.to_f32s()?;
    for o in 0..outer {
        for i in 0..inner {
            let idx = |k: usize| (o * dim + k) * inner + i;
            let norm: f32 = if p == 1 {
                (0..dim).map(|k| v[idx(k)].abs()).sum()
            } else {
                (0..dim).map(|k| v[idx(k)] * v[idx(k)]).sum::<f32>().sqrt()
            };
            for k in 0..dim {
                if norm != 0.0 {
                    v[idx(k)] /= norm;
                }
            }
        }
    }
    one(out_like(x, x.shape.clone(), v))
}

pub(crate) fn mvn(ctx: &mut Ctx) -> R<Vec<Value>> {
    let x = ctx.t(0)?;
    let axes: Vec<usize> = ctx
        .ais("axes")
        .unwrap_or_else(|| vec![0, 2, 3])
        .iter()
        .map(|&a| axis(a, x.rank()))
        .collect::<R<_>>()?;
    let v = x.to_f32s()?;
    let (mean, _) = super::reduce::reduce_with(&v, &x.shape, &axes, 0.0, |a, b| a + b)?;
    let cnt: usize = axes.iter().map(|&a| x.shape[a]).product();
    let keep: Vec<usize> = x
        .shape
        .iter()
        .enumerate()
        .map(|(i, &d)| if axes.contains(&i) { 1 } else { d })
        .collect();
    let offs = super::elementwise::bcast_offsets(&keep, &x.shape);
    let m: Vec<f32> = mean.iter().map(|s| s / cnt as f32).collect();
    let sq: Vec<f32> = v
        .iter()
        .zip(&offs)
        .map(|(&e, &o)| (e - m[o]) * (e - m[o]))
        .collect();
    let (var, _) = super::reduce::reduce_with(&sq, &x.shape, &axes, 0.0, |a, b| a + b)?;
    let out: Vec<f32> = v
        .iter()
        .zip(&offs)
        .map(|(&e, &o)| (e - m[o]) / ((var[o] / cnt as f32).sqrt() + 1e-9))
        .collect();
    one(out_like(x, x.shape.clone(), out))
}

/// Softmax-family layout: opset < 13 flattens to 2-D at `axis`; later opsets work along `axis`.
fn softmax_layout(ctx: &Ctx, x: &Tensor) -> R<(usize, usize, usize)> {
    let default = if ctx.opset < 13 { 1 } else { -1 };
    let ax = axis(ctx.ai("axis", default), x.rank())?;
    if ctx.opset < 13 {
        Ok((numel(&x.shape[..ax]), numel(&x.shape[ax..]), 1))
    } else {
        Ok(split3(&x.shape, ax))
    }
}

fn softmax_impl(ctx: &Ctx, log: bool) -> R<Vec<Value>> {
    let x = ctx.t(0)?;
    let (outer, dim, inner) = softmax_layout(ctx, x)?;
    let mut v = x.to_f32s()?;
    let f = |p: &mut [f32]| {
        for i in 0..inner {
            let mx = (0..dim)
                .map(|k| p[k * inner + i])
                .fold(f32::NEG_INFINITY, f32::max);
            let mut s = 0f64;
            for k in 0..dim {
                let e = (p[k * inner + i] - mx).exp();
                s += e as f64;
                if !log {
                    p[k * inner + i] = e;
                }
            }
            for k in 0..dim {
                let e = &mut p[k * inner + i];
                *e = if log {
                    *e - mx - s.ln() as f32
                } else {
                    (*e as f64 / s) as f32
                };
            }
        }
    };
    if outer > 1 {
        v.par_chunks_mut((dim * inner).max(1))
            .take(outer)
            .for_each(f);
    } else if !v.is_empty() {
        f(&mut v);
    }
    one(out_like(x, x.shape.clone(), v))
}

pub(crate) fn softmax(ctx: &mut Ctx) -> R<Vec<Value>> {
    softmax_impl(ctx, false)
}
pub(crate) fn log_softmax(ctx: &mut Ctx) -> R<Vec<Value>> {
    softmax_impl(ctx, true)
}
pub(crate) fn hardmax(ctx: &mut Ctx) -> R<Vec<Value>> {
    let x = ctx.t(0)?;
    let (outer, dim, inner) = softmax_layout(ctx, x)?;
    let v = x.to_f32s()?;
    let mut out = vec![0f32; v.len()];
    for o in 0..outer {
        for i in 0..inner {
            let idx = |k: usize| (o * dim + k) * inner + i;
            let mut best = 0;
            for k in 1..dim {
                if v[idx(k)] > v[idx(best)] {
                    best = k;
                }
            }
            if dim > 0 {
                out[idx(best)] = 1.0;
            }
        }
    }
    one(out_like(x, x.shape.clone(), out))
}

#[derive(Clone, Copy, PartialEq)]
enum PoolKind {
    Max,
    Avg { include_pad: bool },
    Lp(i64),
}

fn pool(ctx: &Ctx, kind: PoolKind) -> R<Vec<Value>> {
    let x = ctx.t(0)?;
    if x.rank() < 3 {
        return Err(format!("pooling takes N x C x spatial, got {:?}", x.shape));
    }
    let sp = x.shape[2..].to_vec();
    let kernel = crate::geometry::per_axis(
        "kernel_shape",
        Some(ctx.ais("kernel_shape").ok_or("kernel_shape is required")?),
        sp.len(),
    )?;
    let win = window(ctx, &sp, kernel, ctx.ai("ceil_mode", 0) != 0)?;
    let v = f32s(x)?;
    let r = sp.len();
    let in_plane = numel(&sp);
    let out_plane = numel(&win.out);
    let nc = x.shape[0] * x.shape[1];
    let kk = numel(&win.kernel);
    let mut out = vec![0f32; nc * out_plane];
    let want_idx = ctx.node.outputs().len() > 1 && ctx.node.outputs()[1].is_some();
    let row_major = ctx.ai("storage_order", 0) == 0;
    if r == 2 && !want_idx && matches!(kind, PoolKind::Max | PoolKind::Avg { .. }) {
        // 2-D without indices: per output row, the in-image kernel rows are found once; per output, the
        // taps are visited in kernel order, so sums round as in the general loop.
        let win2 = Win2::new(&win, (sp[0], sp[1]));
        let counts = match kind {
            PoolKind::Avg { include_pad } => win2.counts(include_pad),
            _ => Vec::new(),
        };
        out.par_chunks_mut(out_plane.max(1))
            .with_min_len(super::min_len(out_plane * kk))
            .enumerate()
            .for_each(|(p, o)| {
                let xp = &v[p * in_plane..(p + 1) * in_plane];
                match kind {
                    // `if a > e { a } else { e }` is one max instruction. It does not keep a NaN once
                    // seen, so a plane holding NaN is redone with a sticky-NaN select.
                    PoolKind::Max => {
                        win2.fold(xp, o, f32::NEG_INFINITY, |a, e| if a > e { a } else { e });
                        if xp.iter().fold(false, |n, v| n | v.is_nan()) {
                            win2.fold(xp, o, f32::NEG_INFINITY, |a, e| {
                                if (e > a) | e.is_nan() { e } else { a }
                            });
                        }
                    }
                    _ => {
                        win2.fold(xp, o, 0.0, |a, e| a + e);
                        for (d, &c) in o.iter_mut().zip(&counts) {
                            *d = if c == 0 { 0.0 } else { *d / c as f32 };
                        }
                    }
                }
            });
        let mut shape = x.shape[..2].to_vec();
        shape.extend(&win.out);
        return Ok(vec![Value::Tensor(out_like(x, shape, out))]);
    }
    let mut arg = vec![0i64; if want_idx { nc * out_plane } else { 0 }];
    let body = |plane: usize, o: &mut [f32], a: &mut [i64]| {
        let xp = &v[plane * in_plane..(plane + 1) * in_plane];
        let mut oc = vec![0; r];
        let mut kc = vec![0; r];
        for (op, dst) in o.iter_mut().enumerate() {
            unravel(op, &win.out, &mut oc);
            let mut best = f32::NEG_INFINITY;
            let mut best_i = 0usize;
            let mut sum = 0f32;
            let mut cnt = 0usize;
            let mut cnt_pad = 0usize;
            'k: for kp in 0..kk {
                unravel(kp, &win.kernel, &mut kc);
                let mut off = 0;
                let mut inside_padded = true;
                for d in 0..r {
                    let i = (oc[d] * win.strides[d] + kc[d] * win.dilations[d]) as isize
                        - win.pad_begin[d] as isize;
                    if i < -(win.pad_begin[d] as isize) || i >= (sp[d] + win.pad_end[d]) as isize {
                        inside_padded = false;
                    }
                    if i < 0 || i >= sp[d] as isize {
                        if inside_padded {
                            cnt_pad += 1;
                        }
                        continue 'k;
                    }
                    off = off * sp[d] + i as usize;
                }
                cnt += 1;
                cnt_pad += 1;
                let e = xp[off];
                match kind {
                    PoolKind::Max => {
                        if e > best || (e.is_nan() && !best.is_nan()) {
                            best = e;
                            best_i = off;
                        }
                    }
                    PoolKind::Avg { .. } => sum += e,
                    PoolKind::Lp(p) => sum += e.abs().powi(p as i32),
                }
            }
            *dst = match kind {
                PoolKind::Max => best,
                PoolKind::Avg { include_pad } => {
                    let d = if include_pad { cnt_pad } else { cnt };
                    if d == 0 { 0.0 } else { sum / d as f32 }
                }
                PoolKind::Lp(p) => sum.powf(1.0 / p as f32),
            };
            if !a.is_empty() {
                let idx = if row_major {
                    best_i
                } else {
                    // Column-major index within the plane.
                    let mut c = vec![0; r];
                    unravel(best_i, &sp, &mut c);
                    let mut f = 0;
                    for d in (0..r).rev() {
                        f = f * sp[d] + c[d];
                    }
                    f
                };
                a[op] = (plane * in_plane + idx) as i64;
            }
        }
    };
    if want_idx {
        out.par_chunks_mut(out_plane.max(1))
            .zip(arg.par_chunks_mut(out_plane.max(1)))
            .enumerate()
            .for_each(|(p, (o, a))| body(p, o, a));
    } else {
        out.par_chunks_mut(out_plane.max(1))
            .with_min_len(super::min_len(out_plane * kk))
            .enumerate()
            .for_each(|(p, o)| body(p, o, &mut []));
    }
    let mut shape = x.shape[..2].to_vec();
    shape.extend(&win.out);
    let mut res = vec![Value::Tensor(out_like(x, shape.clone(), out))];
    if want_idx {
        res.push(Value::Tensor(Tensor::i64(shape, arg)));
    }
    Ok(res)
}

/// The geometry of a 2-D pooling window over an `h x w` plane.
struct Win2 {
    h: usize,
    w: usize,
    out: (usize, usize),
    kernel: (usize, usize),
    strides: (usize, usize),
    dilations: (usize, usize),
    pad_begin: (usize, usize),
    pad_end: (usize, usize),
}

impl Win2 {
    fn new(win: &crate::geometry::Window, (h, w): (usize, usize)) -> Win2 {
        Win2 {
            h,
            w,
            out: (win.out[0], win.out[1]),
            kernel: (win.kernel[0], win.kernel[1]),
            strides: (win.strides[0], win.strides[1]),
            dilations: (win.dilations[0], win.dilations[1]),
            pad_begin: (win.pad_begin[0], win.pad_begin[1]),
            pad_end: (win.pad_end[0], win.pad_end[1]),
        }
    }

    /// Folds `f` over each output's in-image taps, in kernel order, starting from `init`: one output at a
    /// time with the accumulator in a register (taps at the image border are skipped by a predictable test).
    fn fold(&self, xp: &[f32], o: &mut [f32], init: f32, f: impl Fn(f32, f32) -> f32) {
        let (oh, ow) = self.out;
        let (sh, sw) = self.strides;
        let (kh, kw) = self.kernel;
        let (dh, dw) = self.dilations;
        let (ph, pw) = (self.pad_begin.0 as isize, self.pad_begin.1 as isize);
        let mut rows: Vec<&[f32]> = Vec::with_capacity(kh);
        for y in 0..oh {
            rows.clear();
            for i in 0..kh {
                let iy = (y * sh + i * dh) as isize - ph;
                if iy >= 0 && iy < self.h as isize {
                    let iy = iy as usize;
                    rows.push(&xp[iy * self.w..(iy + 1) * self.w]);
                }
            }
            let orow = &mut o[y * ow..(y + 1) * ow];
            // Interior outputs, whose taps are all inside the row, go in blocks of LANES with independent
            // accumulators: one accumulator per output would chain every tap's latency.
            const LANES: usize = 8;
            let (xa, xb) = self.interior(ow, sw, kw, dw, pw);
            let mut x = xa;
            while x + LANES <= xb {
                let x0 = x * sw - pw as usize;
                let mut acc = [init; LANES];
                for r in &rows {
                    for j in 0..kw {
                        let base = x0 + j * dw;
                        for (k, a) in acc.iter_mut().enumerate() {
                            *a = f(*a, r[base + k * sw]);
                        }
                    }
                }
                orow[x..x + LANES].copy_from_slice(&acc);
                x += LANES;
            }
            for (x, dst) in orow.iter_mut().enumerate() {
                if (xa..xa + (xb - xa) / LANES * LANES).contains(&x) {
                    continue;
                }
                let x0 = (x * sw) as isize - pw;
                let mut acc = init;
                for r in &rows {
                    for j in 0..kw {
                        let ix = x0 + (j * dw) as isize;
                        if ix >= 0 && ix < self.w as isize {
                            acc = f(acc, r[ix as usize]);
                        }
                    }
                }
                *dst = acc;
            }
        }
    }

    /// Output columns `[lo, hi)` whose every tap lies inside the row.
    fn interior(&self, ow: usize, sw: usize, kw: usize, dw: usize, pw: isize) -> (usize, usize) {
        let lo = (pw.max(0) as usize).div_ceil(sw).min(ow);
        let span = (kw - 1) * dw;
        // x * sw - pw + span < w  <=>  x * sw < w + pw - span
        let lim = self.w as isize + pw - span as isize;
        let hi = if lim <= 0 {
            0
        } else {
            (lim as usize).div_ceil(sw).min(ow)
        };
        (lo, hi.max(lo))
    }

    /// The divisor of each output of an average pool: the taps inside the image, or with `include_pad`
    /// those inside the padded image. Both are products of per-axis counts.
    fn counts(&self, include_pad: bool) -> Vec<usize> {
        let axis = |out: usize, k: usize, s: usize, d: usize, pb: usize, pe: usize, len: usize| {
            (0..out)
                .map(|o| {
                    (0..k)
                        .filter(|&t| {
                            let i = (o * s + t * d) as isize - pb as isize;
                            if include_pad {
                                i < (len + pe) as isize
                            } else {
                                i >= 0 && i < len as isize
                            }
                        })
                        .count()
                })
                .collect::<Vec<_>>()
        };
        let ys = axis(
            self.out.0,
            self.kernel.0,
            self.strides.0,
            self.dilations.0,
            self.pad_begin.0,
            self.pad_end.0,
            self.h,
        );
        let xs = axis(
            self.out.1,
            self.kernel.1,
            self.strides.1,
            self.dilations.1,
            self.pad_begin.1,
            self.pad_end.1,
            self.w,
        );
        ys.iter()
            .flat_map(|&cy| xs.iter().map(move |&cx| cy * cx))
            .collect()
    }
}

pub(crate) fn max_pool(ctx: &mut Ctx) -> R<Vec<Value>> {
    pool(ctx, PoolKind::Max)
}
pub(crate) fn average_pool(ctx: &mut Ctx) -> R<Vec<Value>> {
    pool(
        ctx,
        PoolKind::Avg {
            include_pad: ctx.ai("count_include_pad", 0) != 0,
        },
    )
}
pub(crate) fn lp_pool(ctx: &mut Ctx) -> R<Vec<Value>> {
    pool(ctx, PoolKind::Lp(ctx.ai("p", 2)))
}

fn global(ctx: &Ctx, f: impl Fn(&[f32]) -> f32 + Sync) -> R<Vec<Value>> {
    let x = ctx.t(0)?;
    if x.rank() < 2 {
        return Err("global pooling takes N x C x spatial".into());
    }
    let plane = numel(&x.shape[2..]);
    let v = x.to_f32s()?;
    let out: Vec<f32> = v
        .par_chunks(plane.max(1))
        .with_min_len(super::min_len(plane))
        .map(&f)
        .collect();
    let mut shape = x.shape[..2].to_vec();
    shape.extend(std::iter::repeat_n(1, x.rank() - 2));
    let out = if plane == 0 {
        vec![0.0; numel(&shape)]
    } else {
        out
    };
    one(out_like(x, shape, out))
}

pub(crate) fn global_average_pool(ctx: &mut Ctx) -> R<Vec<Value>> {
    global(ctx, |p| {
        (p.iter().map(|&e| e as f64).sum::<f64>() / p.len() as f64) as f32
    })
}
pub(crate) fn global_max_pool(ctx: &mut Ctx) -> R<Vec<Value>> {
    global(ctx, |p| p.iter().copied().fold(f32::NEG_INFINITY, f32::max))
}
pub(crate) fn global_lp_pool(ctx: &mut Ctx) -> R<Vec<Value>> {
    let p = ctx.ai("p", 2) as f32;
    global(ctx, move |v| {
        v.iter().map(|e| e.abs().powf(p)).sum::<f32>().powf(1.0 / p)
    })
}

pub(crate) fn dropout(ctx: &mut Ctx) -> R<Vec<Value>> {
    let x = ctx.t(0)?;
    let training = ctx
        .opt(2)
        .map(|t| t.to_i64s().map(|v| v.first() == Some(&1)))
        .transpose()?
        .unwrap_or(false);
    let ratio = ctx
        .opt(1)
        .map(|t| t.scalar_f64())
        .transpose()?
        .unwrap_or(0.5);
    if training && ratio > 0.0 {
        return Err("Dropout in training mode is random; the executor runs inference only".into());
    }
    Ok(vec![
        Value::Tensor(x.clone()),
        Value::Tensor(Tensor::bool(x.shape.clone(), vec![true; x.len()])),
    ])
}

pub(crate) fn topk(ctx: &mut Ctx) -> R<Vec<Value>> {
    let x = ctx.t(0)?;
    let k = if ctx.opset < 10 {
        ctx.ai("k", 1)
    } else {
        ctx.t(1)?.scalar_i64()?
    } as usize;
    let ax = axis(ctx.ai("axis", -1), x.rank())?;
    let largest = ctx.ai("largest", 1) != 0;
    let (outer, dim, inner) = split3(&x.shape, ax);
    if k > dim {
        return Err(format!("k {k} exceeds dim {dim}"));
    }
    let v = x.to_f64s()?;
    let mut vals = Vec::with_capacity(outer * k * inner);
    let mut idxs = vec![0i64; outer * k * inner];
    let mut tmp = vec![0f64; outer * k * inner];
    for o in 0..outer {
        for i in 0..inner {
            let mut order: Vec<usize> = (0..dim).collect();
            let at = |j: usize| v[(o * dim + j) * inner + i];
            order.sort_by(|&a, &b| {
                let c = at(a)
                    .partial_cmp(&at(b))
                    .unwrap_or(std::cmp::Ordering::Equal);
                let c = if largest { c.reverse() } else { c };
                c.then(a.cmp(&b))
            });
            for (j, &src) in order.iter().take(k).enumerate() {
                tmp[(o * k + j) * inner + i] = at(src);
                idxs[(o * k + j) * inner + i] = src as i64;
            }
        }
    }
    vals.extend(tmp);
    let mut shape = x.shape.clone();
    shape[ax] = k;
    let vt =
        super::elementwise::cast_tensor(&Tensor::new(shape.clone(), Data::F64(vals)), x.dtype())?;
    Ok(vec![
        Value::Tensor(vt),
        Value::Tensor(Tensor::i64(shape, idxs)),
    ])
}

/// NegativeLogLikelihoodLoss on `[N, C, d...]` log-probabilities (f64 values), with the reduction applied.
fn nll(
    ctx: &Ctx,
    lp: &[f64],
    shape: &[usize],
    target: &Tensor,
    weight: Option<&Tensor>,
) -> R<(Vec<f64>, Vec<usize>)> {
    let (n, c) = (shape[0], shape[1]);
    let inner = numel(&shape[2..]);
    let t = target.to_i64s()?;
    let w = weight.map(|w| w.to_f64s()).transpose()?;
    let ignore = ctx
        .has("ignore_index")
        .then(|| ctx.ai("ignore_index", -100));
    let mut loss = vec![0f64; n * inner];
    let mut wsum = 0f64;
    for b in 0..n {
        for i in 0..inner {
            let k = t[b * inner + i];
            if Some(k) == ignore {
                continue;
            }
            if k < 0 || k as usize >= c {
                return Err(format!("target {k} is out of range for {c} classes"));
            }
            let wk = w.as_ref().map_or(1.0, |w| w[k as usize]);
            loss[b * inner + i] = -lp[(b * c + k as usize) * inner + i] * wk;
            wsum += wk;
        }
    }
    let red = ctx.as_str("reduction").unwrap_or_else(|| "mean".into());
    Ok(match red.as_str() {
        "none" => {
            let mut s = vec![n];
            s.extend(&shape[2..]);
            (loss, s)
        }
        "sum" => (vec![loss.iter().sum()], vec![]),
        _ => (
            vec![if wsum == 0.0 {
                0.0
            } else {
                loss.iter().sum::<f64>() / wsum
            }],
            vec![],
        ),
    })
}

pub(crate) fn nll_loss(ctx: &mut Ctx) -> R<Vec<Value>> {
    let x = ctx.t(0)?;
    let (loss, shape) = nll(ctx, &x.to_f64s()?, &x.shape, ctx.t(1)?, ctx.opt(2))?;
    one(super::elementwise::cast_tensor(
        &Tensor::new(shape, Data::F64(loss)),
        x.dtype(),
    )?)
}

pub(crate) fn softmax_cross_entropy_loss(ctx: &mut Ctx) -> R<Vec<Value>> {
    let x = ctx.t(0)?;
    if x.rank() < 2 {
        return Err("scores must be [N, C, ...]".into());
    }
    let (n, c) = (x.shape[0], x.shape[1]);
    let inner = numel(&x.shape[2..]);
    let v = x.to_f64s()?;
    let mut lp = vec![0f64; v.len()];
    for b in 0..n {
        for i in 0..inner {
            let at = |k: usize| (b * c + k) * inner + i;
            let mx = (0..c).map(|k| v[at(k)]).fold(f64::NEG_INFINITY, f64::max);
            let s: f64 = (0..c).map(|k| (v[at(k)] - mx).exp()).sum();
            for k in 0..c {
                lp[at(k)] = v[at(k)] - mx - s.ln();
            }
        }
    }
    let (loss, shape) = nll(ctx, &lp, &x.shape, ctx.t(1)?, ctx.opt(2))?;
    let dt = x.dtype();
    let cast = |s: Vec<usize>, v: Vec<f64>| {
        super::elementwise::cast_tensor(&Tensor::new(s, Data::F64(v)), dt)
    };
    Ok(vec![
        Value::Tensor(cast(shape, loss)?),
        Value::Tensor(cast(x.shape.clone(), lp)?),
    ])
}

pub(crate) fn rms_norm(ctx: &mut Ctx) -> R<Vec<Value>> {
    let x = ctx.t(0)?;
    let ax = axis(ctx.ai("axis", -1), x.rank())?;
    let (y, _) = rms_norm_of(x, ctx.t(1)?, ax, ctx.af("epsilon", 1e-5) as f64)?;
    one(y)
}

/// RMS normalization of `x` over the dims from `ax`, times `scale`, computed in f64: the result in `x`'s dtype,
/// and each row's inverse RMS (also onnxruntime's SimplifiedLayerNormalization's and
/// SkipSimplifiedLayerNormalization's core).
pub(crate) fn rms_norm_of(
    x: &Tensor,
    scale: &Tensor,
    ax: usize,
    eps: f64,
) -> R<(Tensor, Vec<f64>)> {
    let inner = numel(&x.shape[ax..]);
    fits_normalized("scale", &scale.shape, &x.shape[ax..])?;
    let sv = scale.to_f64s()?;
    let soffs = super::elementwise::bcast_offsets(&scale.shape, &x.shape[ax..]);
    let mut v = x.to_f64s()?;
    let mut invs = Vec::new();
    for p in v.chunks_mut(inner.max(1)) {
        let ms = p.iter().map(|e| e * e).sum::<f64>() / inner as f64;
        let inv = 1.0 / (ms + eps).sqrt();
        for (k, e) in p.iter_mut().enumerate() {
            *e = *e * inv * sv[soffs[k]];
        }
        invs.push(inv);
    }
    let y =
        super::elementwise::cast_tensor(&Tensor::new(x.shape.clone(), Data::F64(v)), x.dtype())?;
    Ok((y, invs))
}

pub(crate) fn lrn(ctx: &mut Ctx) -> R<Vec<Value>> {
    let x = ctx.t(0)?;
    let (alpha, beta, bias) = (
        ctx.af("alpha", 1e-4) as f64,
        ctx.af("beta", 0.75) as f64,
        ctx.af("bias", 1.0) as f64,
    );
    let size = ctx.ai("size", 1) as usize;
    let (n, c) = (x.shape[0], x.shape[1]);
    let plane = numel(&x.shape[2..]);
    let v = x.to_f64s()?;
    let mut out = vec![0f64; v.len()];
    let lo = (size - 1) / 2;
    let hi = size - 1 - lo;
    for b in 0..n {
        for ch in 0..c {
            for p in 0..plane {
                let from = ch.saturating_sub(lo);
                let to = (ch + hi).min(c - 1);
                let sq: f64 = (from..=to)
                    .map(|k| v[(b * c + k) * plane + p].powi(2))
                    .sum();
                let i = (b * c + ch) * plane + p;
                out[i] = v[i] / (bias + alpha / size as f64 * sq).powf(beta);
            }
        }
    }
    one(super::elementwise::cast_tensor(
        &Tensor::new(x.shape.clone(), Data::F64(out)),
        x.dtype(),
    )?)
}
