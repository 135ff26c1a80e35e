//! MatMul, Gemm, Conv, ConvTranspose and Einsum. Products go through the `gemm` crate (f32 and f64); half
//! inputs arrive widened to f32, so every product accumulates in f32 as cuBLAS does with `CUBLAS_COMPUTE_32F`.

use rayon::prelude::*;

use super::elementwise::{bcast_offsets, broadcast_shape};
use super::{Ctx, R, one};
use crate::geometry::per_axis;
use crate::{Data, Tensor, Value, numel};

/// `dst (m x n) = lhs (m x k) * rhs (k x n)` (+ dst when `acc`), with element strides (row, column).
#[allow(clippy::too_many_arguments)]
pub(crate) fn mm<T: 'static + Copy + Default>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    lhs: &[T],
    (lrs, lcs): (usize, usize),
    rhs: &[T],
    (rrs, rcs): (usize, usize),
    acc: bool,
    one: T,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            dst[..m * n].fill(T::default());
        }
        return;
    }
    assert!(dst.len() >= m * n);
    assert!(lhs.len() > (m - 1) * lrs + (k - 1) * lcs);
    assert!(rhs.len() > (k - 1) * rrs + (n - 1) * rcs);
    // SAFETY: the asserts above bound every index the kernel touches: dst is m x n row-major, lhs and rhs are
    // read at (i * rs + j * cs) for i < rows, j < cols.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            acc,
            lhs.as_ptr(),
            lcs as isize,
            lrs as isize,
            rhs.as_ptr(),
            rcs as isize,
            rrs as isize,
            one,
            one,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        );
    }
}

/// The tensor's values as f32: borrowed when it already is f32, widened otherwise.
pub(crate) fn f32s(t: &Tensor) -> R<std::borrow::Cow<'_, [f32]>> {
    match &t.data {
        Data::F32(v) => Ok(std::borrow::Cow::Borrowed(v)),
        _ => Ok(std::borrow::Cow::Owned(t.to_f32s()?)),
    }
}

pub(crate) fn matmul(ctx: &mut Ctx) -> R<Vec<Value>> {
    let (a, b) = (ctx.t(0)?, ctx.t(1)?);
    match (&a.data, &b.data) {
        (Data::F64(x), Data::F64(y)) => {
            let (o, s) = matmul_t(x, &a.shape, y, &b.shape, 1.0f64)?;
            one(Tensor::new(s, Data::F64(o)))
        }
        (Data::F32(_), Data::F32(_)) | (Data::F32(_), _) | (_, Data::F32(_))
            if a.data.is_float() =>
        {
            let (x, y) = (f32s(a)?, f32s(b)?);
            let (o, s) = matmul_t(&x, &a.shape, &y, &b.shape, 1.0f32)?;
            one(Tensor::f32(s, o))
        }
        _ => {
            // Integer MatMul: exact in i64.
            let (x, y) = (a.to_i64s()?, b.to_i64s()?);
            let (x, y): (Vec<f64>, Vec<f64>) = (
                x.iter().map(|&v| v as f64).collect(),
                y.iter().map(|&v| v as f64).collect(),
            );
            let (o, s) = matmul_t(&x, &a.shape, &y, &b.shape, 1.0f64)?;
            one(super::elementwise::cast_tensor(
                &Tensor::new(s, Data::F64(o)),
                a.dtype(),
            )?)
        }
    }
}

/// numpy matmul semantics: 1-D operands are promoted and the added dim removed; batch dims broadcast.
pub(crate) fn matmul_t<T: 'static + Copy + Default + Send + Sync>(
    a: &[T],
    ash: &[usize],
    b: &[T],
    bsh: &[usize],
    one: T,
) -> R<(Vec<T>, Vec<usize>)> {
    let (mut ash2, mut bsh2) = (ash.to_vec(), bsh.to_vec());
    if ash2.len() == 1 {
        ash2.insert(0, 1);
    }
    if bsh2.len() == 1 {
        bsh2.push(1);
    }
    if ash2.is_empty() || bsh2.is_empty() {
        return Err("MatMul operands must have rank >= 1".into());
    }
    let (m, k) = (ash2[ash2.len() - 2], ash2[ash2.len() - 1]);
    let (k2, n) = (bsh2[bsh2.len() - 2], bsh2[bsh2.len() - 1]);
    if k != k2 {
        return Err(format!("MatMul shapes {ash:?} and {bsh:?} do not match"));
    }
    let abatch = &ash2[..ash2.len() - 2];
    let bbatch = &bsh2[..bsh2.len() - 2];
    let batch = broadcast_shape(abatch, bbatch)?;
    let nb = numel(&batch);
    let mut out = vec![T::default(); nb * m * n];
    if numel(bbatch) == 1 && abatch.len() >= bbatch.len() {
        // B shared by every batch: one product with the batches stacked into rows.
        mm(nb * m, n, k, &mut out, a, (k, 1), b, (n, 1), false, one);
    } else {
        let ao = bcast_offsets(abatch, &batch);
        let bo = bcast_offsets(bbatch, &batch);
        for (i, c) in out.chunks_mut((m * n).max(1)).enumerate().take(nb) {
            let (pa, pb) = (ao[i] * m * k, bo[i] * k * n);
            mm(m, n, k, c, &a[pa..], (k, 1), &b[pb..], (n, 1), false, one);
        }
    }
    let mut shape = batch;
    if ash.len() > 1 {
        shape.push(m);
    }
    if bsh.len() > 1 {
        shape.push(n);
    }
    Ok((out, shape))
}

pub(crate) fn gemm(ctx: &mut Ctx) -> R<Vec<Value>> {
    let (a, b) = (ctx.t(0)?, ctx.t(1)?);
    let (alpha, beta) = (ctx.af("alpha", 1.0), ctx.af("beta", 1.0));
    let (ta, tb) = (ctx.ai("transA", 0) != 0, ctx.ai("transB", 0) != 0);
    if a.rank() != 2 || b.rank() != 2 {
        return Err("Gemm takes 2-D A and B".into());
    }
    let (m, k) = if ta {
        (a.shape[1], a.shape[0])
    } else {
        (a.shape[0], a.shape[1])
    };
    let (k2, n) = if tb {
        (b.shape[1], b.shape[0])
    } else {
        (b.shape[0], b.shape[1])
    };
    if k != k2 {
        return Err(format!(
            "Gemm shapes {:?} and {:?} do not match",
            a.shape, b.shape
        ));
    }
    let c = ctx.opt(2);
    macro_rules! go {
        ($x:expr, $y:expr, $c:expr, $ty:ty, $var:ident) => {{
            let (x, y) = ($x, $y);
            let mut out: Vec<$ty> = vec![0.0; m * n];
            let ls = if ta { (1, m) } else { (k, 1) };
            let rs = if tb { (1, k) } else { (n, 1) };
            mm(m, n, k, &mut out, &x, ls, &y, rs, false, 1.0);
            let alpha = alpha as $ty;
            if alpha != 1.0 {
                out.iter_mut().for_each(|v| *v *= alpha);
            }
            if let Some(c) = $c {
                let cv: Vec<$ty> = c;
                let csh = ctx.opt(2).map(|t| t.shape.clone()).unwrap_or_default();
                let offs = bcast_offsets(&csh, &[m, n]);
                let beta = beta as $ty;
                for (o, &p) in out.iter_mut().zip(&offs) {
                    *o += beta * cv[p];
                }
            }
            one(Tensor::new(vec![m, n], Data::$var(out)))
        }};
    }
    match &a.data {
        Data::F64(_) => go!(
            a.to_f64s()?,
            b.to_f64s()?,
            c.map(|c| c.to_f64s()).transpose()?,
            f64,
            F64
        ),
        _ => go!(
            f32s(a)?,
            f32s(b)?,
            c.map(|c| c.to_f32s()).transpose()?,
            f32,
            F32
        ),
    }
}

pub(crate) use crate::geometry::Window;

/// [`crate::geometry::window`] for the node of `ctx`.
pub(crate) fn window(ctx: &Ctx, input: &[usize], kernel: Vec<usize>, ceil: bool) -> R<Window> {
    crate::geometry::window(ctx.node, input, kernel, ceil)
}

/// im2col for 2-D windows: rows (c, kh, kw), columns (oh, ow).
fn im2col2d(x: &[f32], c: usize, (h, w): (usize, usize), win: &Window, col: &mut [f32]) {
    let (kh, kw) = (win.kernel[0], win.kernel[1]);
    let (oh, ow) = (win.out[0], win.out[1]);
    let (sh, sw) = (win.strides[0], win.strides[1]);
    let (dh, dw) = (win.dilations[0], win.dilations[1]);
    let (ph, pw) = (win.pad_begin[0] as isize, win.pad_begin[1] as isize);
    let plane = oh * ow;
    // Small channels are grouped so a thread gets at least ~32K elements: tiny frames would otherwise pay a
    // rayon hand-off per channel.
    let per = (plane * kh * kw).max(1);
    col.par_chunks_mut(per)
        .take(c)
        .with_min_len((1 << 15) / per + 1)
        .enumerate()
        .for_each(|(ci, rows)| {
            let xc = &x[ci * h * w..(ci + 1) * h * w];
            for i in 0..kh {
                for j in 0..kw {
                    let row = &mut rows[(i * kw + j) * plane..(i * kw + j + 1) * plane];
                    // Output columns whose input column is inside the image: xo in [lo, hi).
                    let off = (j * dw) as isize - pw;
                    let (lo, hi) = inside(off, sw, ow, w);
                    for y in 0..oh {
                        let iy = (y * sh + i * dh) as isize - ph;
                        let dst = &mut row[y * ow..(y + 1) * ow];
                        if iy < 0 || iy >= h as isize {
                            dst.fill(0.0);
                            continue;
                        }
                        let src = &xc[iy as usize * w..(iy as usize + 1) * w];
                        dst[..lo].fill(0.0);
                        dst[hi..].fill(0.0);
                        if hi == lo {
                            continue;
                        }
                        let start = (lo as isize * sw as isize + off) as usize;
                        if sw == 1 {
                            dst[lo..hi].copy_from_slice(&src[start..start + (hi - lo)]);
                        } else {
                            for (k, d) in dst[lo..hi].iter_mut().enumerate() {
                                *d = src[start + k * sw];
                            }
                        }
                    }
                }
            }
        });
}

fn spatial2(shape: &[usize]) -> Option<(usize, usize)> {
    match shape {
        [w] => Some((1, *w)),
        [h, w] => Some((*h, *w)),
        _ => None,
    }
}

fn as2d(win: &Window) -> Window {
    if win.kernel.len() == 2 {
        return win.clone();
    }
    let p = |v: &Vec<usize>, d: usize| {
        let mut x = vec![d];
        x.extend(v);
        x
    };
    Window {
        kernel: p(&win.kernel, 1),
        strides: p(&win.strides, 1),
        dilations: p(&win.dilations, 1),
        pad_begin: p(&win.pad_begin, 0),
        pad_end: p(&win.pad_end, 0),
        out: p(&win.out, 1),
    }
}

pub(crate) fn conv(ctx: &mut Ctx) -> R<Vec<Value>> {
    let (x, w) = (ctx.t(0)?, ctx.t(1)?);
    if x.data.dtype() == mpopt_ir::DType::F64 {
        let t = conv_f64(ctx)?;
        return one(t);
    }
    let (xv, wv) = (f32s(x)?, f32s(w)?);
    let bias = ctx.opt(2).map(|b| b.to_f32s()).transpose()?;
    let (out, shape) = conv_f32(ctx, &xv, &x.shape, &wv, &w.shape, bias.as_deref())?;
    one(Tensor::f32(shape, out))
}

fn conv_f64(ctx: &Ctx) -> R<Tensor> {
    // f64 convolutions occur only in node tests: they run through the f32 kernel (documented in
    // docs/executor.md) and are widened back.
    let (x, w) = (ctx.t(0)?, ctx.t(1)?);
    let bias = ctx.opt(2).map(|b| b.to_f32s()).transpose()?;
    let (out, shape) = conv_f32(
        ctx,
        &x.to_f32s()?,
        &x.shape,
        &w.to_f32s()?,
        &w.shape,
        bias.as_deref(),
    )?;
    Ok(Tensor::new(
        shape,
        Data::F64(out.iter().map(|&v| v as f64).collect()),
    ))
}

/// A convolution's window and group, from the node's attributes (the kernel from the weights' shape unless
/// `kernel_shape` is given), checked against the input and weight shapes (N x C x spatial).
fn conv_window(ctx: &Ctx, xs: &[usize], ws: &[usize]) -> R<(Window, usize)> {
    if xs.len() < 3 || ws.len() != xs.len() {
        return Err(format!(
            "Conv shapes {xs:?} and {ws:?} are not N x C x spatial"
        ));
    }
    let g = crate::geometry::group("group", ctx.ai("group", 1))?;
    let kernel: Vec<usize> = match ctx.ais("kernel_shape") {
        Some(k) => per_axis("kernel_shape", Some(k), xs.len() - 2)?,
        None => ws[2..].to_vec(),
    };
    let win = window(ctx, &xs[2..], kernel, false)?;
    if xs[1] != ws[1] * g || !ws[0].is_multiple_of(g) {
        return Err(format!(
            "Conv input {xs:?} and weights {ws:?} do not match group {g}"
        ));
    }
    Ok((win, g))
}

/// A direct convolution in any number type, with the node's attributes: the integer convolutions
/// (ConvInteger, QLinearConv) sum in i64, exactly.
pub(crate) fn conv_direct<T>(
    ctx: &Ctx,
    x: &[T],
    xs: &[usize],
    w: &[T],
    ws: &[usize],
) -> R<(Vec<T>, Vec<usize>)>
where
    T: Copy + Default + std::ops::Mul<Output = T> + std::ops::AddAssign,
{
    let (win, g) = conv_window(ctx, xs, ws)?;
    let mut shape = vec![xs[0], ws[0]];
    shape.extend(&win.out);
    let mut out = vec![T::default(); numel(&shape)];
    conv_naive(x, xs, w, ws, g, &win, &mut out);
    Ok((out, shape))
}

pub(crate) fn conv_f32(
    ctx: &Ctx,
    x: &[f32],
    xs: &[usize],
    w: &[f32],
    ws: &[usize],
    bias: Option<&[f32]>,
) -> R<(Vec<f32>, Vec<usize>)> {
    let (win, g) = conv_window(ctx, xs, ws)?;
    let (n, c) = (xs[0], xs[1]);
    let m = ws[0];
    let (cg, mg) = (c / g, m / g);
    let in_plane = numel(&xs[2..]);
    let out_plane = numel(&win.out);
    let kk = numel(&win.kernel);
    let mut out = vec![0f32; n * m * out_plane];
    let mut shape = vec![n, m];
    shape.extend(&win.out);
    if let Some((h, wd)) = spatial2(&xs[2..]) {
        let win2 = as2d(&win);
        let pointwise = kk == 1
            && win.strides.iter().all(|&s| s == 1)
            && win.pad_begin.iter().chain(&win.pad_end).all(|&p| p == 0);
        let depthwise = g == c && mg == 1;
        if depthwise && !pointwise {
            depthwise2d(x, w, &mut out, n, c, (h, wd), &win2);
        } else if g == 1 && n > 1 && xs.len() == 3 && out_plane < 1024 {
            // 1-D convolutions over a batch of short frames: one product over the whole batch, columns
            // (b, ow), instead of one small product per image. (Kept to 1-D: a wider product may block the
            // sum differently, and ppocrv4_rec's 2-D late layers then moved past onnxruntime's spread.)
            let rows = c * kk;
            let wide = n * out_plane;
            let mut col = vec![0f32; rows * wide];
            let mut one_col = vec![0f32; if pointwise { 0 } else { rows * out_plane }];
            for b in 0..n {
                let xb = &x[b * c * in_plane..(b + 1) * c * in_plane];
                let src: &[f32] = if pointwise {
                    xb
                } else {
                    im2col2d(xb, c, (h, wd), &win2, &mut one_col);
                    &one_col
                };
                for (r, row) in src.chunks(out_plane).enumerate() {
                    col[r * wide + b * out_plane..r * wide + (b + 1) * out_plane]
                        .copy_from_slice(row);
                }
            }
            let mut prod = vec![0f32; m * wide];
            mm(
                m,
                wide,
                rows,
                &mut prod,
                w,
                (rows, 1),
                &col,
                (wide, 1),
                false,
                1.0,
            );
            for (o, row) in prod.chunks(wide).enumerate() {
                for b in 0..n {
                    out[(b * m + o) * out_plane..(b * m + o + 1) * out_plane]
                        .copy_from_slice(&row[b * out_plane..(b + 1) * out_plane]);
                }
            }
        } else {
            let mut col = if pointwise {
                Vec::new()
            } else {
                vec![0f32; cg * kk * out_plane]
            };
            for b in 0..n {
                for gi in 0..g {
                    let xg = &x[(b * c + gi * cg) * in_plane..(b * c + (gi + 1) * cg) * in_plane];
                    let rhs: &[f32] = if pointwise {
                        xg
                    } else {
                        im2col2d(xg, cg, (h, wd), &win2, &mut col);
                        &col
                    };
                    let wg = &w[gi * mg * cg * kk..(gi + 1) * mg * cg * kk];
                    let o = &mut out
                        [(b * m + gi * mg) * out_plane..(b * m + (gi + 1) * mg) * out_plane];
                    mm(
                        mg,
                        out_plane,
                        cg * kk,
                        o,
                        wg,
                        (cg * kk, 1),
                        rhs,
                        (out_plane, 1),
                        false,
                        1.0,
                    );
                }
            }
        }
    } else {
        conv_naive(x, xs, w, ws, g, &win, &mut out);
    }
    if let Some(bias) = bias {
        out.par_chunks_mut(out_plane.max(1))
            .with_min_len(super::min_len(out_plane))
            .enumerate()
            .for_each(|(i, p)| {
                let bv = bias[i % m];
                p.iter_mut().for_each(|v| *v += bv);
            });
    }
    Ok((out, shape))
}

/// Channels-last 2-D convolution with one group: `x` is `[N, H, W, C]`, `w` the weight reordered to
/// `[M, KH, KW, C]`, the result `[N, OH, OW, M]`. Each output pixel is one row of a product
/// `col [P, KH*KW*C] x w^T`, accumulated in f32; im2col runs over blocks of pixels so the column buffer stays
/// small, and a 1x1 stride-1 convolution without padding multiplies `x` itself.
pub(crate) fn conv_nhwc(
    x: &[f32],
    [n, h, wd, c]: [usize; 4],
    w: &[f32],
    m: usize,
    win: &Window,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let (kh, kw) = (win.kernel[0], win.kernel[1]);
    let (oh, ow) = (win.out[0], win.out[1]);
    let (sh, sw) = (win.strides[0], win.strides[1]);
    let (dh, dw) = (win.dilations[0], win.dilations[1]);
    let (ph, pw) = (win.pad_begin[0] as isize, win.pad_begin[1] as isize);
    let pixels = n * oh * ow;
    let k = kh * kw * c;
    let mut out = vec![0f32; pixels * m];
    let direct = kh == 1
        && kw == 1
        && sh == 1
        && sw == 1
        && win.pad_begin.iter().chain(&win.pad_end).all(|&p| p == 0);
    if direct {
        mm(pixels, m, k, &mut out, x, (k, 1), w, (1, k), false, 1.0);
    } else if pixels > 0 && k > 0 {
        // About 8 MB of columns per block, and at least a few rows.
        let block = ((1 << 21) / k).max(16).min(pixels);
        let mut col = vec![0f32; block * k];
        for start in (0..pixels).step_by(block) {
            let rows = block.min(pixels - start);
            let col = &mut col[..rows * k];
            col.par_chunks_mut(k)
                .with_min_len(super::min_len(k))
                .enumerate()
                .for_each(|(r, row)| {
                    let p = start + r;
                    let (b, yx) = (p / (oh * ow), p % (oh * ow));
                    let (oy, ox) = (yx / ow, yx % ow);
                    for i in 0..kh {
                        let iy = (oy * sh + i * dh) as isize - ph;
                        for j in 0..kw {
                            let dst = &mut row[(i * kw + j) * c..(i * kw + j + 1) * c];
                            let ix = (ox * sw + j * dw) as isize - pw;
                            if iy < 0 || iy >= h as isize || ix < 0 || ix >= wd as isize {
                                dst.fill(0.0);
                            } else {
                                let at = ((b * h + iy as usize) * wd + ix as usize) * c;
                                dst.copy_from_slice(&x[at..at + c]);
                            }
                        }
                    }
                });
            let o = &mut out[start * m..(start + rows) * m];
            mm(rows, m, k, o, col, (k, 1), w, (1, k), false, 1.0);
        }
    }
    if let Some(bias) = bias {
        out.par_chunks_mut(m.max(1))
            .with_min_len(super::min_len(m))
            .for_each(|row| {
                row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
            });
    }
    out
}

fn depthwise2d(
    x: &[f32],
    w: &[f32],
    out: &mut [f32],
    n: usize,
    c: usize,
    (h, wd): (usize, usize),
    win: &Window,
) {
    let (kh, kw) = (win.kernel[0], win.kernel[1]);
    let (oh, ow) = (win.out[0], win.out[1]);
    let (sh, sw) = (win.strides[0], win.strides[1]);
    let (dh, dw) = (win.dilations[0], win.dilations[1]);
    let (ph, pw) = (win.pad_begin[0] as isize, win.pad_begin[1] as isize);
    out.par_chunks_mut(oh * ow)
        .take(n * c)
        .with_min_len(super::min_len(oh * ow * kh * kw))
        .enumerate()
        .for_each(|(bc, o)| {
            let ci = bc % c;
            let xc = &x[bc * h * wd..(bc + 1) * h * wd];
            let wc = &w[ci * kh * kw..(ci + 1) * kh * kw];
            o.fill(0.0);
            // Tap-major: each tap adds into whole output rows, in kernel order; the columns whose input lies
            // inside the image are found once per tap, so the inner loop is a plain (vectorizable) axpy.
            for i in 0..kh {
                for j in 0..kw {
                    let wv = wc[i * kw + j];
                    let off = (j * dw) as isize - pw;
                    let (lo, hi) = inside(off, sw, ow, wd);
                    if lo == hi {
                        continue;
                    }
                    let start = (lo as isize * sw as isize + off) as usize;
                    for y in 0..oh {
                        let iy = (y * sh + i * dh) as isize - ph;
                        if iy < 0 || iy >= h as isize {
                            continue;
                        }
                        let src = &xc[iy as usize * wd + start..(iy as usize + 1) * wd];
                        let dst = &mut o[y * ow + lo..y * ow + hi];
                        if sw == 1 {
                            for (d, &s) in dst.iter_mut().zip(src) {
                                *d += wv * s;
                            }
                        } else {
                            for (d, &s) in dst.iter_mut().zip(src.iter().step_by(sw)) {
                                *d += wv * s;
                            }
                        }
                    }
                }
            }
        });
}

/// Output indices `[lo, hi)` along one axis whose tap at offset `off` (tap position minus the begin padding)
/// reads inside `[0, len)`, for `out` outputs at stride `stride`.
fn inside(off: isize, stride: usize, out: usize, len: usize) -> (usize, usize) {
    let lo = if off >= 0 {
        0
    } else {
        ((-off) as usize).div_ceil(stride)
    }
    .min(out);
    let hi = if (len as isize) <= off {
        0
    } else {
        ((len as isize - off) as usize).div_ceil(stride).min(out)
    }
    .max(lo);
    (lo, hi)
}

/// Direct N-d convolution (3-D and higher; node tests; the integer convolutions).
fn conv_naive<T>(
    x: &[T],
    xs: &[usize],
    w: &[T],
    ws: &[usize],
    g: usize,
    win: &Window,
    out: &mut [T],
) where
    T: Copy + Default + std::ops::Mul<Output = T> + std::ops::AddAssign,
{
    let (n, c, m) = (xs[0], xs[1], ws[0]);
    let (cg, mg) = (c / g, m / g);
    let sp = &xs[2..];
    let r = sp.len();
    let in_plane = numel(sp);
    let out_plane = numel(&win.out);
    let kk = numel(&win.kernel);
    let mut oc = vec![0; r];
    let mut kc = vec![0; r];
    for b in 0..n {
        for mi in 0..m {
            let gi = mi / mg;
            for op in 0..out_plane {
                unravel(op, &win.out, &mut oc);
                let mut acc = T::default();
                for ci in 0..cg {
                    let xc = &x[(b * c + gi * cg + ci) * in_plane..];
                    let wc = &w[(mi * cg + ci) * kk..];
                    'k: for (kp, &wk) in wc.iter().enumerate().take(kk) {
                        unravel(kp, &win.kernel, &mut kc);
                        let mut off = 0;
                        for d in 0..r {
                            let i = (oc[d] * win.strides[d] + kc[d] * win.dilations[d]) as isize
                                - win.pad_begin[d] as isize;
                            if i < 0 || i >= sp[d] as isize {
                                continue 'k;
                            }
                            off = off * sp[d] + i as usize;
                        }
                        acc += xc[off] * wk;
                    }
                }
                out[(b * m + mi) * out_plane + op] = acc;
            }
        }
    }
}

pub(crate) fn unravel(mut f: usize, shape: &[usize], out: &mut [usize]) {
    for d in (0..shape.len()).rev() {
        out[d] = f % shape[d].max(1);
        f /= shape[d].max(1);
    }
}

pub(crate) fn conv_transpose(ctx: &mut Ctx) -> R<Vec<Value>> {
    let (x, w) = (ctx.t(0)?, ctx.t(1)?);
    let is64 = x.dtype() == mpopt_ir::DType::F64;
    let (xv, wv) = (x.to_f32s()?, w.to_f32s()?);
    let (xs, ws) = (&x.shape, &w.shape);
    if xs.len() < 3 || ws.len() != xs.len() {
        return Err(format!(
            "ConvTranspose shapes {xs:?} and {ws:?} are not N x C x spatial"
        ));
    }
    let g = crate::geometry::group("group", ctx.ai("group", 1))?;
    let (n, c) = (xs[0], xs[1]);
    let mg = ws[1];
    let m = mg * g;
    let cg = c / g;
    let sp = &xs[2..];
    let r = sp.len();
    let kernel: Vec<usize> = match ctx.ais("kernel_shape") {
        Some(k) => per_axis("kernel_shape", Some(k), r)?,
        None => ws[2..].to_vec(),
    };
    let strides = per_axis("strides", ctx.ais("strides"), r)?;
    let dil = per_axis("dilations", ctx.ais("dilations"), r)?;
    let opad: Vec<usize> = match ctx.ais("output_padding") {
        None => vec![0; r],
        Some(v) if v.len() == r && v.iter().all(|&x| x >= 0) => {
            v.into_iter().map(|x| x as usize).collect()
        }
        Some(v) => {
            return Err(format!(
                "output_padding {v:?} does not fit {r} spatial dims"
            ));
        }
    };
    let mut pb = vec![0usize; r];
    let mut pe = vec![0usize; r];
    let mut out_sp = vec![0usize; r];
    let auto = ctx.as_str("auto_pad").unwrap_or_else(|| "NOTSET".into());
    let explicit = ctx.ais("pads");
    if let Some(p) = &explicit
        && (p.len() != 2 * r || p.iter().any(|&x| x < 0))
    {
        return Err(format!("pads {p:?} do not fit {r} spatial dims"));
    }
    let out_shape_attr = ctx.ais("output_shape");
    if let Some(os) = &out_shape_attr
        && (os.len() < r || os.iter().any(|&x| x < 0))
    {
        return Err(format!("output_shape {os:?} does not fit {r} spatial dims"));
    }
    if sp.contains(&0) || kernel.contains(&0) {
        return Err(format!(
            "ConvTranspose of an empty input {xs:?} or kernel {kernel:?}"
        ));
    }
    for i in 0..r {
        let full = (kernel[i] - 1)
            .checked_mul(dil[i])
            .zip(strides[i].checked_mul(sp[i] - 1))
            .and_then(|(a, b)| a.checked_add(b)?.checked_add(opad[i] + 1))
            .ok_or_else(|| {
                format!("ConvTranspose strides {strides:?} and dilations {dil:?} overflow dim {i}")
            })?;
        let target = match &out_shape_attr {
            Some(os) => Some(os[os.len() - r + i] as usize),
            None if auto == "SAME_UPPER" || auto == "SAME_LOWER" => {
                Some(sp[i].saturating_mul(strides[i]))
            }
            None => None,
        };
        if let Some(want) = target {
            // The padding that trims the full output to the wanted size; SAME_UPPER puts the odd one at the end.
            let total = full.saturating_sub(want);
            let (small, big) = (total / 2, total - total / 2);
            (pb[i], pe[i]) = if auto == "SAME_UPPER" {
                (small, big)
            } else {
                (big, small)
            };
            out_sp[i] = want;
        } else {
            if let Some(p) = &explicit {
                pb[i] = p[i] as usize;
                pe[i] = p[i + r] as usize;
            }
            out_sp[i] = full.checked_sub(pb[i] + pe[i]).ok_or_else(|| {
                format!(
                    "pads {:?} trim more than the output's {full} along axis {i}",
                    explicit
                )
            })?;
        }
    }
    if out_sp.iter().any(|&d| d > crate::tensor::MAX_DIM) {
        return Err(format!(
            "ConvTranspose output dims {out_sp:?}: past 2^31 (strides {strides:?}, output_shape {out_shape_attr:?})"
        ));
    }
    if ws[0] != c || c % g != 0 || kernel.as_slice() != &ws[2..] {
        return Err(format!(
            "ConvTranspose weights {ws:?} do not fit input {xs:?} with group {g} and kernel {kernel:?}"
        ));
    }
    let in_plane = numel(sp);
    let out_plane = numel(&out_sp);
    let kk = numel(&kernel);
    let mut out = vec![0f32; n * m * out_plane];
    let mut col = vec![0f32; mg * kk * in_plane];
    let mut ic = vec![0; r];
    let mut kc = vec![0; r];
    for b in 0..n {
        for gi in 0..g {
            // col (mg*kk x in_plane) = W_g^T (mg*kk x cg) * X_g (cg x in_plane)
            let xg = &xv[(b * c + gi * cg) * in_plane..(b * c + (gi + 1) * cg) * in_plane];
            let wg = &wv[gi * cg * mg * kk..(gi + 1) * cg * mg * kk];
            mm(
                mg * kk,
                in_plane,
                cg,
                &mut col,
                wg,
                (1, mg * kk),
                xg,
                (in_plane, 1),
                false,
                1.0,
            );
            let og = &mut out[(b * m + gi * mg) * out_plane..(b * m + (gi + 1) * mg) * out_plane];
            if r == 2 {
                // col2im for 2-D, one output channel per task: each tap scatters whole input rows over the
                // range whose outputs are inside the image; per output, the taps add in kernel order.
                let (kh, kw) = (kernel[0], kernel[1]);
                og.par_chunks_mut(out_plane.max(1))
                    .enumerate()
                    .for_each(|(mi, o)| {
                        for ki in 0..kh {
                            let offy = (ki * dil[0]) as isize - pb[0] as isize;
                            let (ylo, yhi) = inside(offy, strides[0], sp[0], out_sp[0]);
                            for kj in 0..kw {
                                let offx = (kj * dil[1]) as isize - pb[1] as isize;
                                let (xlo, xhi) = inside(offx, strides[1], sp[1], out_sp[1]);
                                let kp = ki * kw + kj;
                                let rowk =
                                    &col[(mi * kk + kp) * in_plane..(mi * kk + kp + 1) * in_plane];
                                for iy in ylo..yhi {
                                    let oy = ((iy * strides[0]) as isize + offy) as usize;
                                    let dst = &mut o[oy * out_sp[1]..(oy + 1) * out_sp[1]];
                                    let src = &rowk[iy * sp[1]..(iy + 1) * sp[1]];
                                    for ix in xlo..xhi {
                                        dst[((ix * strides[1]) as isize + offx) as usize] +=
                                            src[ix];
                                    }
                                }
                            }
                        }
                    });
                continue;
            }
            for mi in 0..mg {
                let o = &mut og[mi * out_plane..(mi + 1) * out_plane];
                for kp in 0..kk {
                    unravel(kp, &kernel, &mut kc);
                    let row = &col[(mi * kk + kp) * in_plane..(mi * kk + kp + 1) * in_plane];
                    'p: for (ip, &v) in row.iter().enumerate() {
                        unravel(ip, sp, &mut ic);
                        let mut off = 0;
                        for d in 0..r {
                            let pos =
                                (ic[d] * strides[d] + kc[d] * dil[d]) as isize - pb[d] as isize;
                            if pos < 0 || pos >= out_sp[d] as isize {
                                continue 'p;
                            }
                            off = off * out_sp[d] + pos as usize;
                        }
                        o[off] += v;
                    }
                }
            }
        }
    }
    if let Some(bias) = ctx.opt(2) {
        let bv = bias.to_f32s()?;
        for (i, p) in out.chunks_mut(out_plane.max(1)).enumerate() {
            p.iter_mut().for_each(|v| *v += bv[i % m]);
        }
    }
    let mut shape = vec![n, m];
    shape.extend(out_sp);
    if is64 {
        return one(Tensor::new(
            shape,
            Data::F64(out.iter().map(|&v| v as f64).collect()),
        ));
    }
    one(Tensor::f32(shape, out))
}

pub(crate) fn einsum(ctx: &mut Ctx) -> R<Vec<Value>> {
    let eq = ctx
        .as_str("equation")
        .ok_or("Einsum needs an equation")?
        .replace(' ', "");
    let ins: Vec<&Tensor> = (0..ctx.n_in()).map(|i| ctx.t(i)).collect::<R<_>>()?;
    let (lhs, rhs) = match eq.split_once("->") {
        Some((l, r)) => (l.to_string(), Some(r.to_string())),
        None => (eq.clone(), None),
    };
    let terms: Vec<&str> = lhs.split(',').collect();
    if terms.len() != ins.len() {
        return Err(format!(
            "equation '{eq}' has {} operands, given {}",
            terms.len(),
            ins.len()
        ));
    }
    // Expand '...' into upper-case letters (never used by the equation's own labels in practice).
    let mut ell_rank = 0;
    for (t, x) in terms.iter().zip(&ins) {
        if t.contains("...") {
            ell_rank = ell_rank.max(x.rank() + 3 - t.len());
        }
    }
    let ell: String = (0..ell_rank).map(|i| (b'A' + i as u8) as char).collect();
    let expand = |t: &str, rank: usize| -> String {
        if let Some(p) = t.find("...") {
            let k = rank + 3 - t.len();
            format!("{}{}{}", &t[..p], &ell[ell_rank - k..], &t[p + 3..])
        } else {
            t.to_string()
        }
    };
    let terms: Vec<Vec<char>> = terms
        .iter()
        .zip(&ins)
        .map(|(t, x)| expand(t, x.rank()).chars().collect())
        .collect();
    let mut sizes: std::collections::BTreeMap<char, usize> = Default::default();
    for (t, x) in terms.iter().zip(&ins) {
        if t.len() != x.rank() {
            return Err(format!(
                "term '{}' does not match rank {}",
                t.iter().collect::<String>(),
                x.rank()
            ));
        }
        for (ch, &d) in t.iter().zip(&x.shape) {
            let e = sizes.entry(*ch).or_insert(d);
            if *e == 1 {
                *e = d;
            }
        }
    }
    let out: Vec<char> = match rhs {
        Some(r) => r.replace("...", &ell).chars().collect(),
        None => {
            let mut counts: std::collections::BTreeMap<char, usize> = Default::default();
            for t in &terms {
                for &ch in t {
                    *counts.entry(ch).or_default() += 1;
                }
            }
            let mut o: Vec<char> = ell.chars().collect();
            o.extend(
                counts
                    .iter()
                    .filter(|(c, n)| **n == 1 && c.is_ascii_lowercase())
                    .map(|(c, _)| *c),
            );
            o
        }
    };
    let labels: Vec<char> = sizes.keys().copied().collect();
    let lsize: Vec<usize> = labels.iter().map(|c| sizes[c]).collect();
    let data: Vec<Vec<f64>> = ins.iter().map(|t| t.to_f64s()).collect::<R<_>>()?;
    let pos = |c: char| labels.iter().position(|&l| l == c).expect("label");
    let term_pos: Vec<Vec<usize>> = terms
        .iter()
        .map(|t| t.iter().map(|&c| pos(c)).collect())
        .collect();
    let out_pos: Vec<usize> = out.iter().map(|&c| pos(c)).collect();
    let out_shape: Vec<usize> = out_pos.iter().map(|&p| lsize[p]).collect();
    let mut res = vec![0f64; numel(&out_shape)];
    let total = numel(&lsize);
    let mut idx = vec![0usize; labels.len()];
    for f in 0..total {
        unravel(f, &lsize, &mut idx);
        let mut prod = 1.0;
        for (k, tp) in term_pos.iter().enumerate() {
            let shp = &ins[k].shape;
            let mut off = 0;
            for (d, &p) in tp.iter().enumerate() {
                off = off * shp[d] + if shp[d] == 1 { 0 } else { idx[p] };
            }
            prod *= data[k][off];
        }
        let mut o = 0;
        for (d, &p) in out_pos.iter().enumerate() {
            o = o * out_shape[d] + idx[p];
        }
        res[o] += prod;
    }
    one(super::elementwise::cast_tensor(
        &Tensor::new(out_shape, Data::F64(res)),
        ins[0].dtype(),
    )?)
}

/// Col2Im (opset 18): sums sliding blocks back into an image, the adjoint of im2col. Input
/// `[N, C * prod(block_shape), L]` with one column per block position; output `[N, C, image_shape...]`.
pub(crate) fn col2im(ctx: &mut Ctx) -> R<Vec<Value>> {
    let x = ctx.t(0)?;
    let sizes = |i: usize, what: &str| -> R<Vec<usize>> {
        ctx.t(i)?
            .to_i64s()?
            .iter()
            .map(|&d| usize::try_from(d).map_err(|_| format!("negative {what} size {d}")))
            .collect()
    };
    let (image, block) = (sizes(1, "image")?, sizes(2, "block")?);
    let r = image.len();
    if block.len() != r || r == 0 {
        return Err(format!(
            "image_shape {image:?} and block_shape {block:?} must have one length"
        ));
    }
    let dil: Vec<i64> = per_axis("dilations", ctx.ais("dilations"), r)?
        .into_iter()
        .map(|d| d as i64)
        .collect();
    let strides: Vec<i64> = per_axis("strides", ctx.ais("strides"), r)?
        .into_iter()
        .map(|d| d as i64)
        .collect();
    let pads = ctx.ais("pads").unwrap_or_else(|| vec![0; 2 * r]);
    if pads.len() != 2 * r || pads.iter().any(|&p| p < 0) {
        return Err(format!("pads {pads:?} do not fit an image of rank {r}"));
    }
    let [n, ck, l] = x.shape[..] else {
        return Err(format!(
            "the input must be [N, C x block, L], got {:?}",
            x.shape
        ));
    };
    let kprod: usize = block.iter().product();
    if kprod == 0 || ck % kprod != 0 {
        return Err(format!("{ck} rows do not split into blocks of {kprod}"));
    }
    let c = ck / kprod;
    // blocks along each dimension
    let nb: Vec<usize> = (0..r)
        .map(|d| {
            let span = image[d] as i64 + pads[d] + pads[d + r] - dil[d] * (block[d] as i64 - 1) - 1;
            (span / strides[d] + 1).max(0) as usize
        })
        .collect();
    if nb.iter().product::<usize>() != l {
        return Err(format!(
            "{l} columns for {nb:?} block positions of image {image:?}"
        ));
    }
    let xv = x.to_f32s()?;
    let plane: usize = image.iter().product();
    let mut out = vec![0f32; n * c * plane];
    let (mut kk, mut bb) = (vec![0usize; r], vec![0usize; r]);
    for ko in 0..kprod {
        unravel(ko, &block, &mut kk);
        for b in 0..l {
            unravel(b, &nb, &mut bb);
            // the image position this (kernel offset, block) pair lands on, if inside
            let mut at = 0usize;
            let mut inside = true;
            for d in 0..r {
                let p = bb[d] as i64 * strides[d] - pads[d] + kk[d] as i64 * dil[d];
                if p < 0 || p >= image[d] as i64 {
                    inside = false;
                    break;
                }
                at = at * image[d] + p as usize;
            }
            if !inside {
                continue;
            }
            for ni in 0..n {
                for ci in 0..c {
                    out[(ni * c + ci) * plane + at] += xv[(ni * ck + ci * kprod + ko) * l + b];
                }
            }
        }
    }
    let mut shape = vec![n, c];
    shape.extend(&image);
    Ok(vec![Value::Tensor(Tensor::f32(shape, out))])
}
