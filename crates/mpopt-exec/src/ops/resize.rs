//! Resize and Upsample: separable interpolation, one axis at a time (nearest, linear, cubic), with every
//! coordinate transformation mode of opset 19, and antialiased downsampling (opset 18's `antialias`).

use super::{Ctx, R, axis, one};
use crate::tensor::MAX_DIM;
use crate::{Data, Tensor, Value, map_data, numel};

struct Spec {
    mode: String,
    coord: String,
    nearest: String,
    cubic_a: f64,
    exclude_outside: bool,
    extrapolation: f64,
    antialias: bool,
}

/// The taps of one output index: (input index, weight); empty means the extrapolation value.
type Taps = Vec<(usize, f64)>;

fn taps(spec: &Spec, out_len: usize, in_len: usize, scale: f64, roi: (f64, f64)) -> Vec<Taps> {
    (0..out_len)
        .map(|x| {
            let xf = x as f64;
            // The resized length is in_len * scale before rounding (what the spec's formulas use).
            let (il, ol) = (in_len as f64, in_len as f64 * scale);
            let orig = match spec.coord.as_str() {
                "asymmetric" => xf / scale,
                "align_corners" => {
                    if ol <= 1.0 {
                        0.0
                    } else {
                        xf * (il - 1.0) / (ol - 1.0)
                    }
                }
                "pytorch_half_pixel" => {
                    if out_len > 1 {
                        (xf + 0.5) / scale - 0.5
                    } else {
                        0.0
                    }
                }
                "tf_crop_and_resize" => {
                    if out_len > 1 {
                        roi.0 * (il - 1.0) + xf * (roi.1 - roi.0) * (il - 1.0) / (ol - 1.0)
                    } else {
                        0.5 * (roi.0 + roi.1) * (il - 1.0)
                    }
                }
                "half_pixel_symmetric" => {
                    let adj = out_len as f64 / ol;
                    let center = il / 2.0;
                    let offset = center * (1.0 - adj);
                    offset + (xf + 0.5) / scale - 0.5
                }
                _ => (xf + 0.5) / scale - 0.5,
            };
            if spec.coord == "tf_crop_and_resize" && (orig < 0.0 || orig > il - 1.0) {
                return Vec::new();
            }
            let clampi = |i: i64| i.clamp(0, in_len as i64 - 1) as usize;
            if spec.antialias && spec.mode != "nearest" {
                return antialias_taps(spec, orig, scale, in_len);
            }
            match spec.mode.as_str() {
                "nearest" => {
                    let i = match spec.nearest.as_str() {
                        "floor" => orig.floor(),
                        "ceil" => orig.ceil(),
                        "round_prefer_ceil" => {
                            if orig.fract() == 0.5 {
                                orig.ceil()
                            } else {
                                orig.round()
                            }
                        }
                        _ => {
                            if (orig - orig.floor()) == 0.5 {
                                orig.floor()
                            } else {
                                orig.round()
                            }
                        }
                    };
                    vec![(clampi(i as i64), 1.0)]
                }
                "linear" => {
                    let o = orig.clamp(0.0, il - 1.0);
                    let x0 = o.floor();
                    let w = o - x0;
                    vec![(clampi(x0 as i64), 1.0 - w), (clampi(x0 as i64 + 1), w)]
                }
                _ => {
                    let x0 = orig.floor();
                    let t = orig - x0;
                    let mut v: Vec<(i64, f64)> = (-1..=2)
                        .map(|k| (x0 as i64 + k, cubic_kernel(spec.cubic_a, t - k as f64)))
                        .collect();
                    if spec.exclude_outside {
                        v.retain(|&(i, _)| i >= 0 && i < in_len as i64);
                        let s: f64 = v.iter().map(|p| p.1).sum();
                        v.iter_mut().for_each(|p| p.1 /= s);
                    }
                    v.into_iter().map(|(i, w)| (clampi(i), w)).collect()
                }
            }
        })
        .collect()
}

/// The cubic convolution kernel with coefficient `a` (Keys), at distance `d`.
fn cubic_kernel(a: f64, d: f64) -> f64 {
    let d = d.abs();
    if d <= 1.0 {
        ((a + 2.0) * d - (a + 3.0)) * d * d + 1.0
    } else if d < 2.0 {
        ((a * d - 5.0 * a) * d + 8.0 * a) * d - 4.0 * a
    } else {
        0.0
    }
}

/// Antialiased taps (opset 18): when downsampling, the linear (triangle) or cubic kernel is stretched by
/// `1 / scale`, so each output averages over every input sample its footprint covers; the weights are
/// normalised to sum to 1. Upsampling (`scale >= 1`) gives the plain kernel. As in the ONNX reference, the
/// taps are the `n` input positions nearest to `orig` (the lower one first on ties), out-of-range positions
/// read the edge sample, or are dropped with `exclude_outside`.
fn antialias_taps(spec: &Spec, orig: f64, scale: f64, in_len: usize) -> Taps {
    let s = scale.min(1.0);
    let support = if spec.mode == "linear" { 1.0 } else { 2.0 };
    // First tap offset relative to the left neighbour; the footprint is symmetric: `n = 2 - 2 * start`.
    let start = (-support / s).floor() as i64 + 1;
    let n = 2 - 2 * start;
    // `ratio` lies in (0, 1]: an integer position counts as the right end of the interval to its left.
    let left = if orig.fract() == 0.0 {
        orig - 1.0
    } else {
        orig.floor()
    };
    let ratio = orig - left;
    let mut v: Vec<(i64, f64)> = (start..start + n)
        .map(|i| {
            let d = s * (i as f64 - ratio);
            let w = if spec.mode == "linear" {
                (1.0 - d.abs()).max(0.0)
            } else {
                cubic_kernel(spec.cubic_a, d)
            };
            (left as i64 + i, w)
        })
        .collect();
    if spec.exclude_outside {
        v.retain(|&(i, _)| i >= 0 && i < in_len as i64);
    }
    let sum: f64 = v.iter().map(|p| p.1).sum();
    v.into_iter()
        .map(|(i, w)| (i.clamp(0, in_len as i64 - 1) as usize, w / sum))
        .collect()
}

/// Interpolates `v` (of `shape`) along `ax` to `out_len`.
fn along(v: &[f64], shape: &[usize], ax: usize, taps: &[Taps], extrap: f64) -> Vec<f64> {
    let outer = numel(&shape[..ax]);
    let dim = shape[ax];
    let inner = numel(&shape[ax + 1..]);
    let out_len = taps.len();
    let mut out = vec![0f64; outer * out_len * inner];
    for o in 0..outer {
        for (x, tp) in taps.iter().enumerate() {
            let dst = &mut out[(o * out_len + x) * inner..(o * out_len + x + 1) * inner];
            if tp.is_empty() {
                dst.fill(extrap);
                continue;
            }
            for &(i, w) in tp {
                let src = &v[(o * dim + i) * inner..(o * dim + i + 1) * inner];
                for (d, &s) in dst.iter_mut().zip(src) {
                    *d += w * s;
                }
            }
        }
    }
    out
}

fn run(
    x: &Tensor,
    spec: &Spec,
    out_shape: &[usize],
    scales: &[f64],
    roi: &[(f64, f64)],
) -> R<Tensor> {
    if spec.mode == "nearest" {
        // Nearest: a gather of stored elements along each resized axis (any dtype, bits untouched).
        let mut t = x.clone();
        for ax in 0..x.rank() {
            if out_shape[ax] == t.shape[ax]
                && scales[ax] == 1.0
                && spec.coord != "tf_crop_and_resize"
            {
                continue;
            }
            let tp = taps(spec, out_shape[ax], t.shape[ax], scales[ax], roi[ax]);
            if tp.iter().any(Vec::is_empty) {
                // tf_crop_and_resize outside the image: the extrapolation value, through the general path.
                return interpolate(x, spec, out_shape, scales, roi);
            }
            let idx: Vec<usize> = tp.iter().map(|p| p[0].0).collect();
            let data = map_data!(&t.data, v => gather_axis(v, &t.shape, ax, &idx));
            let mut shape = t.shape.clone();
            shape[ax] = out_shape[ax];
            t = Tensor::new(shape, data);
        }
        return Ok(t);
    }
    interpolate(x, spec, out_shape, scales, roi)
}

/// `out[.., i, ..] = v[.., idx[i], ..]` along `ax` of `shape`, in parallel over the outer index.
fn gather_axis<T: Clone + Send + Sync>(
    v: &[T],
    shape: &[usize],
    ax: usize,
    idx: &[usize],
) -> Vec<T> {
    use rayon::prelude::*;
    let dim = shape[ax];
    let inner = numel(&shape[ax + 1..]);
    let block = idx.len() * inner;
    let total = numel(&shape[..ax]) * block;
    let mut out: Vec<T> = Vec::with_capacity(total);
    if block > 0 {
        out.spare_capacity_mut()[..total]
            .par_chunks_mut(block)
            .enumerate()
            .for_each(|(o, dst)| {
                let src = &v[o * dim * inner..(o + 1) * dim * inner];
                for (d, &i) in dst.chunks_mut(inner).zip(idx) {
                    for (e, s) in d.iter_mut().zip(&src[i * inner..(i + 1) * inner]) {
                        e.write(s.clone());
                    }
                }
            });
    }
    // SAFETY: each of the `total / block` chunks writes `idx.len()` runs of `inner` elements: all of it.
    unsafe { out.set_len(total) };
    out
}

/// Linear and cubic interpolation (and nearest with extrapolated points), in f64, one axis at a time.
fn interpolate(
    x: &Tensor,
    spec: &Spec,
    out_shape: &[usize],
    scales: &[f64],
    roi: &[(f64, f64)],
) -> R<Tensor> {
    let mut v = x.to_f64s()?;
    let mut shape = x.shape.clone();
    for ax in 0..x.rank() {
        if out_shape[ax] == shape[ax] && scales[ax] == 1.0 && spec.coord != "tf_crop_and_resize" {
            continue;
        }
        let tp = taps(spec, out_shape[ax], shape[ax], scales[ax], roi[ax]);
        v = along(&v, &shape, ax, &tp, spec.extrapolation);
        shape[ax] = out_shape[ax];
    }
    let t = Tensor::new(shape, Data::F64(v));
    let t = if spec.mode == "nearest" || x.data.is_float() {
        t
    } else {
        // Integer images round to nearest.
        let r: Vec<f64> = t.to_f64s()?.iter().map(|e| e.round()).collect();
        Tensor::new(t.shape, Data::F64(r))
    };
    match &x.data {
        Data::F32(_) => Ok(Tensor::f32(t.shape.clone(), t.to_f32s()?)),
        _ => super::elementwise::cast_tensor(&t, x.dtype()),
    }
}

fn spec(ctx: &Ctx) -> Spec {
    let mode = ctx.as_str("mode").unwrap_or_else(|| "nearest".into());
    Spec {
        mode: if mode == "bilinear" || mode == "trilinear" {
            "linear".into()
        } else {
            mode
        },
        coord: ctx
            .as_str("coordinate_transformation_mode")
            .unwrap_or_else(|| {
                if ctx.opset < 11 {
                    "asymmetric".into()
                } else {
                    "half_pixel".into()
                }
            }),
        nearest: ctx
            .as_str("nearest_mode")
            .unwrap_or_else(|| "round_prefer_floor".into()),
        cubic_a: ctx.af("cubic_coeff_a", -0.75) as f64,
        exclude_outside: ctx.ai("exclude_outside", 0) != 0,
        extrapolation: ctx.af("extrapolation_value", 0.0) as f64,
        antialias: ctx.ai("antialias", 0) != 0,
    }
}

pub(crate) fn resize(ctx: &mut Ctx) -> R<Vec<Value>> {
    let x = ctx.t(0)?;
    let r = x.rank();
    let sp = spec(ctx);
    let (roi_t, scales_t, sizes_t) = if ctx.opset < 11 {
        (None, ctx.opt(1), None)
    } else {
        (ctx.opt(1), ctx.opt(2), ctx.opt(3))
    };
    let axes: Vec<usize> = match ctx.ais("axes") {
        Some(a) => a.iter().map(|&v| axis(v, r)).collect::<R<_>>()?,
        None => (0..r).collect(),
    };
    let mut roi = vec![(0.0, 1.0); r];
    if let Some(t) = roi_t.filter(|t| !t.is_empty()) {
        let v = t.to_f64s()?;
        let k = v.len() / 2;
        for (j, &a) in axes.iter().enumerate().take(k) {
            roi[a] = (v[j], v[j + k]);
        }
    }
    let mut scales = vec![1.0; r];
    let mut out = x.shape.clone();
    if let Some(s) = sizes_t.filter(|t| !t.is_empty()) {
        let s = s.to_i64s()?;
        if s.len() != axes.len() || s.iter().any(|&d| !(0..=MAX_DIM as i64).contains(&d)) {
            return Err(format!(
                "Resize sizes {s:?} must give one size in [0, 2^31] for each of the {} axes {axes:?}",
                axes.len()
            ));
        }
        let policy = ctx
            .as_str("keep_aspect_ratio_policy")
            .unwrap_or_else(|| "stretch".into());
        if policy == "stretch" {
            for (j, &a) in axes.iter().enumerate() {
                out[a] = s[j] as usize;
                scales[a] = s[j] as f64 / x.shape[a] as f64;
            }
        } else {
            let ratios = axes
                .iter()
                .enumerate()
                .map(|(j, &a)| s[j] as f64 / x.shape[a] as f64);
            let sc = if policy == "not_larger" {
                ratios.fold(f64::INFINITY, f64::min)
            } else {
                ratios.fold(0.0, f64::max)
            };
            for &a in &axes {
                scales[a] = sc;
                out[a] = (x.shape[a] as f64 * sc + 0.5).floor() as usize;
            }
        }
    } else if let Some(s) = scales_t.filter(|t| !t.is_empty()) {
        let s = s.to_f64s()?;
        if s.len() != axes.len()
            || s.iter()
                .zip(&axes)
                .any(|(&k, &a)| !(k > 0.0 && k * x.shape[a] as f64 <= MAX_DIM as f64))
        {
            return Err(format!(
                "Resize scales {s:?} must give one positive scale for each of the {} axes {axes:?} \
                 (and no output dim past 2^31)",
                axes.len()
            ));
        }
        for (j, &a) in axes.iter().enumerate() {
            scales[a] = s[j];
            let span = if sp.coord == "tf_crop_and_resize" {
                roi[a].1 - roi[a].0
            } else {
                1.0
            };
            out[a] = (x.shape[a] as f64 * span * s[j]).floor() as usize;
        }
    } else {
        return Err("Resize needs scales or sizes".into());
    }
    one(run(x, &sp, &out, &scales, &roi)?)
}

pub(crate) fn upsample(ctx: &mut Ctx) -> R<Vec<Value>> {
    let x = ctx.t(0)?;
    let mut sp = spec(ctx);
    sp.coord = "asymmetric".into();
    sp.nearest = "floor".into();
    let scales: Vec<f64> = match ctx.afs("scales") {
        Some(s) => s.iter().map(|&v| v as f64).collect(),
        None => ctx.t(1)?.to_f64s()?,
    };
    let out: Vec<usize> = x
        .shape
        .iter()
        .zip(&scales)
        .map(|(&d, &s)| (d as f64 * s).floor() as usize)
        .collect();
    let roi = vec![(0.0, 1.0); x.rank()];
    one(run(x, &sp, &out, &scales, &roi)?)
}
