//! The integer-arithmetic ops of quantized models: MatMulInteger and ConvInteger (int32 results), and
//! QLinearMatMul and QLinearConv (requantized to 8 bits).
//!
//! Zero points are subtracted with numpy broadcasting (ConvInteger and QLinearConv: a 1-D weight zero point
//! is per output channel), and the products sum exactly in i64, as the int32 accumulators of the reference
//! and of onnxruntime do short of overflow. Requantization follows the reference: the combined scale
//! `a_scale * b_scale / y_scale` is computed in the scales' own type (an fp16 scale rounds after each
//! operation), the accumulator times that scale plus the output zero point in f64, then rounded half to
//! even and clipped to the output type. The kernels are native: an fp16 scale arrives as fp16.

use mpopt_ir::DType;

use super::elementwise::{cast_tensor, zip_bcast};
use super::linalg::{conv_direct, matmul_t};
use super::{Ctx, R, one};
use crate::{Data, Tensor, Value};

/// `x - zero_point` in i64, numpy-broadcast (or x itself without a zero point).
fn centred(x: &Tensor, zp: Option<&Tensor>) -> R<(Vec<i64>, Vec<usize>)> {
    let v = x.to_i64s()?;
    match zp.filter(|z| !z.is_empty()) {
        None => Ok((v, x.shape.clone())),
        Some(z) => {
            let (o, shape) = zip_bcast(&v, &x.shape, &z.to_i64s()?, &z.shape, |a, b| a - b)?;
            if shape != x.shape {
                return Err(format!(
                    "zero point of shape {:?} does not fit an operand of shape {:?}",
                    z.shape, x.shape
                ));
            }
            Ok((o, shape))
        }
    }
}

/// A weight's zero point for a convolution: per output channel when 1-D with one value per channel.
fn weight_centred(w: &Tensor, zp: Option<&Tensor>) -> R<(Vec<i64>, Vec<usize>)> {
    match zp.filter(|z| z.rank() == 1 && z.len() > 1 && w.shape.first() == Some(&z.len())) {
        Some(z) => {
            let mut per_channel = z.clone();
            per_channel.shape = std::iter::once(z.len())
                .chain(std::iter::repeat_n(1, w.rank() - 1))
                .collect();
            centred(w, Some(&per_channel))
        }
        None => centred(w, zp),
    }
}

/// An i64 product as int32 (the ops' accumulator type; wraps as int32 arithmetic would).
fn int32(shape: Vec<usize>, v: Vec<i64>) -> Tensor {
    Tensor::new(shape, Data::I32(v.into_iter().map(|x| x as i32).collect()))
}

/// The integer product of two centred operands.
fn int_matmul(
    ctx: &Ctx,
    a: usize,
    b: usize,
    azp: Option<usize>,
    bzp: Option<usize>,
) -> R<(Vec<i64>, Vec<usize>)> {
    let (av, ash) = centred(ctx.t(a)?, azp.and_then(|i| ctx.opt(i)))?;
    let (bv, bsh) = centred(ctx.t(b)?, bzp.and_then(|i| ctx.opt(i)))?;
    // exact in f64 for sums below 2^53; back to integers
    let wide = |v: &[i64]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    let (o, shape) = matmul_t(&wide(&av), &ash, &wide(&bv), &bsh, 1.0f64)?;
    Ok((o.into_iter().map(|x| x as i64).collect(), shape))
}

pub(crate) fn matmul_integer(ctx: &mut Ctx) -> R<Vec<Value>> {
    let (o, shape) = int_matmul(ctx, 0, 1, Some(2), Some(3))?;
    one(int32(shape, o))
}

pub(crate) fn conv_integer(ctx: &mut Ctx) -> R<Vec<Value>> {
    let (x, w) = (ctx.t(0)?, ctx.t(1)?);
    let (xv, xs) = centred(x, ctx.opt(2))?;
    let (wv, ws) = weight_centred(w, ctx.opt(3))?;
    let (o, shape) = conv_direct(ctx, &xv, &xs, &wv, &ws)?;
    one(int32(shape, o))
}

/// `x_scale * w_scale / y_scale` (inputs `xs`, `ws`, `ys`) in the scales' type, numpy-broadcast.
fn combined_scale(ctx: &Ctx, xs: usize, ws: usize, ys: usize) -> R<(Vec<f64>, Vec<usize>)> {
    let (a, b, c) = (ctx.t(xs)?, ctx.t(ws)?, ctx.t(ys)?);
    let dtype = a.dtype();
    let round = move |v: f64| match dtype {
        DType::F16 => half::f16::from_f64(v).to_f64(),
        DType::BF16 => half::bf16::from_f64(v).to_f64(),
        DType::F64 => v,
        _ => v as f32 as f64,
    };
    let (ab, sh) = zip_bcast(&a.to_f64s()?, &a.shape, &b.to_f64s()?, &b.shape, |x, y| {
        round(x * y)
    })?;
    zip_bcast(&ab, &sh, &c.to_f64s()?, &c.shape, |x, y| round(x / y))
}

/// Requantizes an accumulator: `round_half_even(acc * scale + y_zero_point)` clipped to `dtype`.
fn requantize(
    acc: &[i64],
    shape: &[usize],
    scale: (&[f64], &[usize]),
    yzp: Option<&Tensor>,
    dtype: DType,
) -> R<Tensor> {
    let (lo, hi) = match dtype {
        DType::I8 => (-128.0, 127.0),
        DType::U8 => (0.0, 255.0),
        d => return Err(format!("quantized output type {d} is not int8 or uint8")),
    };
    let accf: Vec<f64> = acc.iter().map(|&x| x as f64).collect();
    let (mut y, ysh) = zip_bcast(&accf, shape, scale.0, scale.1, |x, s| x * s)?;
    if let Some(z) = yzp.filter(|z| !z.is_empty()) {
        (y, _) = zip_bcast(&y, &ysh, &z.to_f64s()?, &z.shape, |x, z| x + z)?;
    }
    let q: Vec<f64> = y
        .iter()
        .map(|&v| v.round_ties_even().clamp(lo, hi))
        .collect();
    cast_tensor(&Tensor::new(ysh, Data::F64(q)), dtype)
}

/// The output type of a QLinear op: the output zero point's, else the first operand's.
fn out_dtype(ctx: &Ctx, yzp: usize) -> R<DType> {
    Ok(match ctx.opt(yzp) {
        Some(z) => z.dtype(),
        None => ctx.t(0)?.dtype(),
    })
}

pub(crate) fn qlinear_matmul(ctx: &mut Ctx) -> R<Vec<Value>> {
    // a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point
    let (acc, shape) = int_matmul(ctx, 0, 3, Some(2), Some(5))?;
    let (s, ssh) = combined_scale(ctx, 1, 4, 6)?;
    let dtype = out_dtype(ctx, 7)?;
    one(requantize(&acc, &shape, (&s, &ssh), ctx.opt(7), dtype)?)
}

pub(crate) fn qlinear_conv(ctx: &mut Ctx) -> R<Vec<Value>> {
    // x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point, B
    let (x, w) = (ctx.t(0)?, ctx.t(3)?);
    let (xv, xs) = centred(x, ctx.opt(2))?;
    let (wv, ws) = weight_centred(w, ctx.opt(5))?;
    let (mut acc, shape) = conv_direct(ctx, &xv, &xs, &wv, &ws)?;
    if let Some(b) = ctx.opt(8).filter(|b| !b.is_empty()) {
        let bias = b.to_i64s()?;
        let plane: usize = shape[2..].iter().product();
        if bias.len() != shape[1] {
            return Err(format!(
                "bias holds {} values for {} output channels",
                bias.len(),
                shape[1]
            ));
        }
        for (f, v) in acc.iter_mut().enumerate() {
            *v += bias[(f / plane.max(1)) % shape[1]];
        }
    }
    let (s, mut ssh) = combined_scale(ctx, 1, 4, 6)?;
    // a per-channel scale runs along the output's channel axis
    if ssh.len() == 1 && s.len() > 1 {
        ssh = std::iter::once(1)
            .chain(std::iter::once(s.len()))
            .chain(std::iter::repeat_n(1, shape.len() - 2))
            .collect();
    }
    let dtype = out_dtype(ctx, 7)?;
    one(requantize(&acc, &shape, (&s, &ssh), ctx.opt(7), dtype)?)
}
