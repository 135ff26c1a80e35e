//! QuantizeLinear and DequantizeLinear (opsets 10-25): per-tensor, per-axis and blocked scales and zero
//! points, integer targets of 2 to 16 bits and the float8/float4 types.
//!
//! Quantize: `round_half_even(x / scale) + zero_point`, clipped to the integer type's range; float8 targets are
//! a (saturating, by default) cast of `x / scale`, float4 a cast of `x / scale + zero_point`. Dequantize:
//! `(x - zero_point) * scale` in f32, cast once to the output type (the scale's, or `output_dtype`). Both
//! compute in f32, whatever the float type of x or scale: a half input is widened exactly and the result
//! rounded once.

use mpopt_ir::DType;

use super::elementwise::{cast_tensor, cast_tensor_sat};
use super::{Ctx, R, axis};
use crate::{Tensor, Value, small};

/// For each element of a tensor of `shape`, the index of its scale (or zero point) among `n`: one for the
/// whole tensor, one per index along `axis`, or one per block of `block` indices along it.
fn param_index(shape: &[usize], n: usize, ax: usize, block: usize) -> R<impl Fn(usize) -> usize> {
    let dim = shape.get(ax).copied().unwrap_or(1);
    let inner: usize = shape.iter().skip(ax + 1).product();
    let per = if n == 1 {
        0
    } else if block == 0 {
        if n != dim {
            return Err(format!(
                "{n} scales for axis {ax} of {shape:?} (per-axis needs {dim})"
            ));
        }
        1
    } else {
        let blocks = dim.div_ceil(block);
        let outer: usize = shape.iter().take(ax).product();
        if n != outer * blocks * inner {
            return Err(format!(
                "{n} scales do not block {shape:?} by {block} along axis {ax}"
            ));
        }
        2
    };
    let blocks = if block > 0 { dim.div_ceil(block) } else { 0 };
    Ok(move |f: usize| match per {
        0 => 0,
        1 => (f / inner.max(1)) % dim.max(1),
        _ => {
            let (outer_i, rest) = (f / (dim * inner).max(1), f % (dim * inner).max(1));
            let (a, i) = (rest / inner.max(1), rest % inner.max(1));
            (outer_i * blocks + a / block) * inner + i
        }
    })
}

/// A tensor's values as f32 (integers and small types decoded).
fn wide(t: &Tensor) -> R<Vec<f32>> {
    if t.data.is_float() {
        return t.to_f32s();
    }
    match cast_tensor_sat(t, DType::F32, false)?.data {
        crate::Data::F32(v) => Ok(v),
        _ => Err(format!("cannot read {} as numbers", t.dtype())),
    }
}

/// What both directions read: x, and its scale and zero point given per element of x (expanded from
/// per-tensor, per-axis or blocked values); `zp_dtype` is the zero point's type (none when absent or empty).
/// The axis matters only for per-axis and blocked scales.
struct Operands<'a> {
    x: &'a Tensor,
    scale_dtype: DType,
    scales: Vec<f32>,
    zp_dtype: Option<DType>,
    zeros: Option<Vec<f32>>,
}

impl Operands<'_> {
    fn zero(&self, f: usize) -> f32 {
        self.zeros.as_ref().map_or(0.0, |z| z[f])
    }
}

fn operands<'a>(ctx: &'a Ctx) -> R<Operands<'a>> {
    let (x, scale) = (ctx.t(0)?, ctx.t(1)?);
    let zp = ctx.opt(2).filter(|t| !t.is_empty());
    let ax = if scale.len() == 1 {
        0
    } else {
        axis(ctx.ai("axis", 1), x.rank().max(1))?
    };
    let block = ctx.ai("block_size", 0).max(0) as usize;
    let per_element = |v: Vec<f32>| -> R<Vec<f32>> {
        let at = param_index(&x.shape, v.len(), ax, block)?;
        Ok((0..x.len()).map(|f| v[at(f)]).collect())
    };
    Ok(Operands {
        x,
        scale_dtype: scale.dtype(),
        scales: per_element(scale.to_f32s()?)?,
        zp_dtype: zp.map(|z| z.dtype()),
        zeros: zp.map(|z| per_element(wide(z)?)).transpose()?,
    })
}

pub(crate) fn dequantize_linear(ctx: &mut Ctx) -> R<Vec<Value>> {
    let mut op = operands(ctx)?;
    let out_dtype = match ctx.ai("output_dtype", 0) {
        0 => op.scale_dtype,
        c => DType::from_code(c as i32).ok_or_else(|| format!("unknown output_dtype {c}"))?,
    };
    // float8 zero points must be zero (checked by the reference); they shift nothing
    if op
        .zp_dtype
        .is_some_and(|d| small::is_small(d) && !small::is_small_int(d))
    {
        op.zeros = None;
    }
    let y: Vec<f32> = wide(op.x)?
        .iter()
        .enumerate()
        .map(|(f, &q)| (q - op.zero(f)) * op.scales[f])
        .collect();
    Ok(vec![Value::Tensor(cast_tensor(
        &Tensor::f32(op.x.shape.clone(), y),
        out_dtype,
    )?)])
}

pub(crate) fn quantize_linear(ctx: &mut Ctx) -> R<Vec<Value>> {
    let op = operands(ctx)?;
    let saturate = ctx.ai("saturate", 1) != 0;
    let to = match (op.zp_dtype, ctx.ai("output_dtype", 0)) {
        (Some(z), _) => z,
        (None, 0) => DType::U8,
        (None, c) => {
            DType::from_code(c as i32).ok_or_else(|| format!("unknown output_dtype {c}"))?
        }
    };
    let shape = op.x.shape.clone();
    let scaled: Vec<f32> =
        op.x.to_f32s()?
            .iter()
            .zip(&op.scales)
            .map(|(&v, &s)| v / s)
            .collect();
    let range = match to {
        DType::U8 => Some((0, 255)),
        DType::I8 => Some((-128, 127)),
        DType::U16 => Some((0, 65535)),
        DType::I16 => Some((-32768, 32767)),
        DType::U4 => Some((0, 15)),
        DType::I4 => Some((-8, 7)),
        DType::U2 => Some((0, 3)),
        DType::I2 => Some((-2, 1)),
        _ => None,
    };
    let out = if let Some((lo, hi)) = range {
        let q: Vec<i64> = scaled
            .iter()
            .enumerate()
            .map(|(f, &v)| {
                let r = if v.is_nan() {
                    0
                } else {
                    v.round_ties_even() as i64
                };
                (r + op.zero(f) as i64).clamp(lo, hi)
            })
            .collect();
        cast_tensor_sat(&Tensor::i64(shape, q), to, true)?
    } else if matches!(
        to,
        DType::F8E4M3FN | DType::F8E4M3FNUZ | DType::F8E5M2 | DType::F8E5M2FNUZ
    ) {
        cast_tensor_sat(&Tensor::f32(shape, scaled), to, saturate)?
    } else if matches!(to, DType::F4E2M1 | DType::F6E2M3 | DType::F6E3M2) {
        let v = scaled
            .iter()
            .enumerate()
            .map(|(f, &v)| v + op.zero(f))
            .collect();
        cast_tensor_sat(&Tensor::f32(shape, v), to, true)?
    } else {
        return Err(format!("{to} is not a quantized type"));
    };
    Ok(vec![Value::Tensor(out)])
}

/// DynamicQuantizeLinear (opset 11): uint8 quantization whose scale and zero point come from the data's range
/// widened to include 0: `scale = (max - min) / 255`, `zero_point = clip(round(-min / scale))`.
pub(crate) fn dynamic_quantize_linear(ctx: &mut Ctx) -> R<Vec<Value>> {
    let x = ctx.t(0)?;
    let v = x.to_f32s()?;
    let (lo, hi) = v
        .iter()
        .fold((0f32, 0f32), |(lo, hi), &e| (lo.min(e), hi.max(e)));
    let scale = (hi - lo) / 255.0;
    let zp = if scale == 0.0 {
        0.0
    } else {
        (-lo / scale).round_ties_even().clamp(0.0, 255.0)
    };
    let q: Vec<u8> = v
        .iter()
        .map(|&e| {
            let r = if scale == 0.0 {
                0.0
            } else {
                (e / scale).round_ties_even()
            };
            (r + zp).clamp(0.0, 255.0) as u8
        })
        .collect();
    Ok(vec![
        Value::Tensor(Tensor::new(x.shape.clone(), crate::Data::U8(q))),
        Value::Tensor(Tensor::f32(vec![], vec![scale])),
        Value::Tensor(Tensor::new(vec![], crate::Data::U8(vec![zp as u8]))),
    ])
}
