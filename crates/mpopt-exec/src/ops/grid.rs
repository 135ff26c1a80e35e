//! AffineGrid (opset 20) and GridSample (opsets 16-22), in N spatial dimensions, computed in f32.
//!
//! AffineGrid maps the normalized coordinates of every output point (x fastest; -1..1 at the pixel centres,
//! or at the corners with `align_corners`) through each batch's affine matrix. GridSample reads X at the
//! points the grid gives (last axis x, y[, z], normalized the same way) with `nearest` (rounding half to
//! even, as the reference does), `linear`/`bilinear` or `cubic`/`bicubic` (Keys, a = -0.75) interpolation,
//! and `zeros`, `border` or `reflection` padding, as the ONNX reference implementation defines them.

use super::{Ctx, R};
use crate::{Tensor, Value, numel, strides};

/// The normalized coordinate of index `i` of `n` points.
fn normalized(i: usize, n: usize, align_corners: bool) -> f32 {
    if align_corners {
        if n <= 1 {
            -1.0
        } else {
            -1.0 + 2.0 * i as f32 / (n - 1) as f32
        }
    } else {
        -1.0 + (2 * i + 1) as f32 / n as f32
    }
}

pub(crate) fn affine_grid(ctx: &mut Ctx) -> R<Vec<Value>> {
    let theta = ctx.t(0)?;
    let size = ctx.t(1)?.to_i64s()?;
    let align = ctx.ai("align_corners", 0) != 0;
    let spatial: Vec<usize> = size
        .iter()
        .skip(2)
        .map(|&d| usize::try_from(d).map_err(|_| format!("negative size {d}")))
        .collect::<R<_>>()?;
    let r = spatial.len();
    if !(r == 2 || r == 3) {
        return Err(format!(
            "size must be N, C, H, W or N, C, D, H, W; got {size:?}"
        ));
    }
    let n = size[0].max(0) as usize;
    if theta.shape != [n, r, r + 1] {
        return Err(format!(
            "theta must be [{n}, {r}, {}] for size {size:?}, got {:?}",
            r + 1,
            theta.shape
        ));
    }
    let t = theta.to_f32s()?;
    let points = numel(&spatial);
    let mut out = vec![0f32; n * points * r];
    let mut idx = vec![0usize; r];
    for p in 0..points {
        // the point's index in each spatial dimension (the last fastest)
        let mut q = p;
        for d in (0..r).rev() {
            idx[d] = q % spatial[d];
            q /= spatial[d];
        }
        // homogeneous coordinates in x, y[, z] order: the last spatial dimension first
        let mut h = [0f32; 4];
        for (k, hk) in h.iter_mut().take(r).enumerate() {
            let d = r - 1 - k;
            *hk = normalized(idx[d], spatial[d], align);
        }
        h[r] = 1.0;
        for b in 0..n {
            let m = &t[b * r * (r + 1)..][..r * (r + 1)];
            let o = &mut out[(b * points + p) * r..][..r];
            for (row, slot) in o.iter_mut().enumerate() {
                *slot = (0..=r).map(|j| m[row * (r + 1) + j] * h[j]).sum();
            }
        }
    }
    let mut shape = vec![n];
    shape.extend(&spatial);
    shape.push(r);
    Ok(vec![Value::Tensor(Tensor::f32(shape, out))])
}

#[derive(Clone, Copy, PartialEq)]
enum Padding {
    Zeros,
    Border,
    Reflection,
}

/// Reflects `x` into [lo, hi] by the nearer border, repeatedly.
fn reflect(x: f32, lo: f32, hi: f32) -> f32 {
    let range = hi - lo;
    if range <= 0.0 {
        return lo;
    }
    if x < lo {
        let dx = lo - x;
        let k = (dx / range) as i64;
        let r = dx - k as f32 * range;
        if k % 2 == 0 { lo + r } else { hi - r }
    } else if x > hi {
        let dx = x - hi;
        let k = (dx / range) as i64;
        let r = dx - k as f32 * range;
        if k % 2 == 0 { hi - r } else { lo + r }
    } else {
        x
    }
}

/// The index that integer position `i` of a dimension of `d` reads, or None for a zero.
fn fetch(i: i64, d: usize, lo: f32, hi: f32, pad: Padding) -> Option<usize> {
    match pad {
        Padding::Zeros => (0..d as i64).contains(&i).then_some(i as usize),
        Padding::Border => Some(i.clamp(0, d as i64 - 1) as usize),
        Padding::Reflection => {
            Some((reflect(i as f32, lo, hi) as i64).clamp(0, d as i64 - 1) as usize)
        }
    }
}

fn cubic_coeffs(t: f32) -> [f32; 4] {
    const A: f32 = -0.75;
    let x = t.abs();
    [
        ((A * (x + 1.0) - 5.0 * A) * (x + 1.0) + 8.0 * A) * (x + 1.0) - 4.0 * A,
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0,
        ((A + 2.0) * (1.0 - x) - (A + 3.0)) * (1.0 - x) * (1.0 - x) + 1.0,
        ((A * (2.0 - x) - 5.0 * A) * (2.0 - x) + 8.0 * A) * (2.0 - x) - 4.0 * A,
    ]
}

pub(crate) fn grid_sample(ctx: &mut Ctx) -> R<Vec<Value>> {
    let (x, grid) = (ctx.t(0)?, ctx.t(1)?);
    if x.rank() < 3 {
        return Err(format!("X must be N x C x spatial, got {:?}", x.shape));
    }
    let (n, c) = (x.shape[0], x.shape[1]);
    let dims = x.shape[2..].to_vec();
    let r = dims.len();
    if r > 3 {
        return Err(format!("{r} spatial dimensions: at most 3 are supported"));
    }
    if grid.rank() != r + 2 || grid.shape[0] != n || grid.shape[r + 1] != r {
        return Err(format!(
            "grid must be [{n}, out..., {r}] for X {:?}, got {:?}",
            x.shape, grid.shape
        ));
    }
    let mode = ctx.as_str("mode").unwrap_or_else(|| "linear".into());
    let (taps, nearest) = match mode.as_str() {
        "linear" | "bilinear" => (2usize, false),
        "cubic" | "bicubic" => (4, false),
        "nearest" => (1, true),
        other => return Err(format!("unknown mode '{other}'")),
    };
    let pad = match ctx.as_str("padding_mode").as_deref() {
        None | Some("zeros") => Padding::Zeros,
        Some("border") => Padding::Border,
        Some("reflection") => Padding::Reflection,
        Some(other) => return Err(format!("unknown padding_mode '{other}'")),
    };
    let align = ctx.ai("align_corners", 0) != 0;
    let (lo, hi): (Vec<f32>, Vec<f32>) = dims
        .iter()
        .map(|&d| {
            if align {
                (0.0, d as f32 - 1.0)
            } else {
                (-0.5, d as f32 - 0.5)
            }
        })
        .unzip();
    let out_sp = grid.shape[1..=r].to_vec();
    let points = numel(&out_sp);
    let plane = numel(&dims);
    let stride = strides(&dims);
    let (xv, gv) = (x.to_f32s()?, grid.to_f32s()?);
    let mut out = vec![0f32; n * c * points];
    // per point: the taps (flat offset in a plane, or None for a zero) and their weights
    let terms = taps.pow(r as u32);
    let mut offs: Vec<Option<usize>> = vec![None; terms];
    let mut ws = vec![0f32; terms];
    for b in 0..n {
        for p in 0..points {
            let g = &gv[(b * points + p) * r..][..r];
            // per dimension (X's order): the first tap and the weights of the taps
            let mut first = [0i64; 3];
            let mut wd = [[0f32; 4]; 3];
            for d in 0..r {
                let v = g[r - 1 - d];
                let len = dims[d] as f32;
                let mut xd = if align {
                    (v + 1.0) / 2.0 * (len - 1.0)
                } else {
                    ((v + 1.0) * len - 1.0) / 2.0
                };
                if nearest {
                    xd = xd.round_ties_even();
                }
                if xd < lo[d] || xd > hi[d] {
                    match pad {
                        Padding::Border => xd = xd.clamp(0.0, len - 1.0),
                        Padding::Reflection => xd = reflect(xd, lo[d], hi[d]),
                        Padding::Zeros => {}
                    }
                }
                if nearest {
                    first[d] = xd as i64;
                    wd[d][0] = 1.0;
                } else {
                    let f = xd.floor();
                    let t = xd - f;
                    if taps == 2 {
                        first[d] = f as i64;
                        wd[d][0] = 1.0 - t;
                        wd[d][1] = t;
                    } else {
                        first[d] = f as i64 - 1;
                        wd[d] = cubic_coeffs(t);
                    }
                }
            }
            for (k, (off, w)) in offs.iter_mut().zip(ws.iter_mut()).enumerate() {
                let (mut q, mut flat, mut weight) = (k, Some(0usize), 1f32);
                for d in (0..r).rev() {
                    let tap = q % taps;
                    q /= taps;
                    weight *= wd[d][tap];
                    let idx = fetch(first[d] + tap as i64, dims[d], lo[d], hi[d], pad);
                    flat = match (flat, idx) {
                        (Some(f), Some(i)) => Some(f + i * stride[d]),
                        _ => None,
                    };
                }
                *off = flat;
                *w = weight;
            }
            for ch in 0..c {
                let src = &xv[(b * c + ch) * plane..][..plane];
                out[(b * c + ch) * points + p] = offs
                    .iter()
                    .zip(&ws)
                    .map(|(o, w)| o.map_or(0.0, |o| w * src[o]))
                    .sum();
            }
        }
    }
    let mut shape = vec![n, c];
    shape.extend(out_sp);
    Ok(vec![Value::Tensor(Tensor::f32(shape, out))])
}

/// Bilinear sample of a `[h, w]` plane at pixel coordinates (y, x); neighbours outside the plane read 0.
fn bilinear_zeros(plane: &[f64], (h, w): (usize, usize), y: f64, x: f64) -> f64 {
    let (y0, x0) = (y.floor(), x.floor());
    let (fy, fx) = (y - y0, x - x0);
    let at = |yy: f64, xx: f64| {
        if yy < 0.0 || xx < 0.0 || yy >= h as f64 || xx >= w as f64 {
            0.0
        } else {
            plane[yy as usize * w + xx as usize]
        }
    };
    (1.0 - fy) * ((1.0 - fx) * at(y0, x0) + fx * at(y0, x0 + 1.0))
        + fy * ((1.0 - fx) * at(y0 + 1.0, x0) + fx * at(y0 + 1.0, x0 + 1.0))
}

/// DeformConv (opset 19), 2-D as the reference defines it: each kernel tap of output (i, j) reads X
/// bilinearly (zeros outside) at its regular position plus the learned offset (dy, dx) of its offset group,
/// times the mask (1 without one); then the usual grouped sum and bias. Computed in f64, rounded once.
pub(crate) fn deform_conv(ctx: &mut Ctx) -> R<Vec<Value>> {
    let (x, w, off) = (ctx.t(0)?, ctx.t(1)?, ctx.t(2)?);
    let (bias, mask) = (ctx.opt(3), ctx.opt(4));
    let four = |t: &Tensor, what: &str| -> R<[usize; 4]> {
        t.shape[..].try_into().map_err(|_| {
            format!(
                "DeformConv {what} must be 4-D (2-D NCHW), got {:?}",
                t.shape
            )
        })
    };
    let ([n, ic, ih, iw], [oc, icg, kh, kw], [on, oo, oh, ow]) = (
        four(x, "input")?,
        four(w, "weights")?,
        four(off, "offsets")?,
    );
    let g = crate::geometry::group("group", ctx.ai("group", 1))?;
    let og = crate::geometry::group("offset_group", ctx.ai("offset_group", 1))?;
    let attr2 = |name: &str, default: i64| -> R<[usize; 2]> {
        match ctx.ais(name) {
            Some(v) if v.len() == 2 && v.iter().all(|&d| d >= 0) => {
                Ok([v[0] as usize, v[1] as usize])
            }
            Some(v) => Err(format!("{name} {v:?} is not two non-negative values")),
            None => Ok([default as usize; 2]),
        }
    };
    let (st, dl) = (attr2("strides", 1)?, attr2("dilations", 1)?);
    let pads = match ctx.ais("pads") {
        Some(p) if p.len() == 4 => [p[0] as f64, p[1] as f64],
        Some(p) => return Err(format!("pads {p:?} is not four values")),
        None => [0.0, 0.0],
    };
    if ic != icg * g || oc % g != 0 || ic % og != 0 || on != n || oo != og * kh * kw * 2 {
        return Err(format!(
            "DeformConv shapes do not fit: X {:?}, W {:?}, offset {:?}, group {g}, offset_group {og}",
            x.shape, w.shape, off.shape
        ));
    }
    let (xv, wv, ov) = (x.to_f64s()?, w.to_f64s()?, off.to_f64s()?);
    let mv = mask.map(|m| m.to_f64s()).transpose()?;
    if mv
        .as_ref()
        .is_some_and(|m| m.len() != n * og * kh * kw * oh * ow)
    {
        return Err("DeformConv mask does not match the offsets".into());
    }
    let bv = bias.map(|b| b.to_f64s()).transpose()?;
    if bv.as_ref().is_some_and(|b| b.len() != oc) {
        return Err(format!("DeformConv bias does not hold {oc} values"));
    }
    let (ocg, icog, plane, out_plane) = (oc / g, ic / og, ih * iw, oh * ow);
    let mut out = vec![0f64; n * oc * out_plane];
    for b in 0..n {
        for o in 0..oc {
            let gi = o / ocg;
            for c in gi * icg..(gi + 1) * icg {
                let (xp, ogi) = (&xv[(b * ic + c) * plane..][..plane], c / icog);
                for ki in 0..kh {
                    for kj in 0..kw {
                        let wt = wv[((o * icg + c % icg) * kh + ki) * kw + kj];
                        let tap = ((b * og + ogi) * kh + ki) * kw + kj;
                        for i in 0..oh {
                            for j in 0..ow {
                                let p = i * ow + j;
                                let dy = ov[(tap * 2) * out_plane + p];
                                let dx = ov[(tap * 2 + 1) * out_plane + p];
                                let y = (st[0] * i + dl[0] * ki) as f64 - pads[0] + dy;
                                let xx = (st[1] * j + dl[1] * kj) as f64 - pads[1] + dx;
                                let m = mv.as_ref().map_or(1.0, |m| m[tap * out_plane + p]);
                                out[(b * oc + o) * out_plane + p] +=
                                    wt * m * bilinear_zeros(xp, (ih, iw), y, xx);
                            }
                        }
                    }
                }
            }
            if let Some(bv) = &bv {
                for v in &mut out[(b * oc + o) * out_plane..][..out_plane] {
                    *v += bv[o];
                }
            }
        }
    }
    let t = Tensor::new(vec![n, oc, oh, ow], crate::Data::F64(out));
    Ok(vec![Value::Tensor(super::elementwise::cast_tensor(
        &t,
        x.dtype(),
    )?)])
}
