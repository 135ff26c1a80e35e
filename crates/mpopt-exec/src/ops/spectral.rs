//! DFT (opsets 17, 20) and STFT (opset 17), as the ONNX reference defines them (numpy's fft, ifft and irfft).
//!
//! The last axis holds one (real) or two (real, imaginary) components. A transform of length `n` is computed
//! directly, `O(n)` per output bin, in f64 with the twiddles `exp(-2 pi i k t / n)` taken from one table of
//! `n` entries (`k t mod n`), and rounded once to the input's type. That is exact to f32's precision for the
//! lengths of audio front ends (400-512), and simple; it is not an FFT.

use super::{Ctx, R, axis};
use crate::{Tensor, Value, numel};

type C = (f64, f64);

/// `sum_t x[t] exp(sign 2 pi i k t / n)` for `k < bins`; `x` zero-padded or truncated to `n`.
fn transform(x: &[C], n: usize, bins: usize, inverse: bool, table: &[C]) -> Vec<C> {
    let m = x.len().min(n);
    (0..bins)
        .map(|k| {
            let (mut re, mut im) = (0f64, 0f64);
            for (t, &(a, b)) in x[..m].iter().enumerate() {
                let (c, s) = table[(k * t) % n];
                // exp(-i theta) forward, exp(+i theta) inverse
                let s = if inverse { s } else { -s };
                re += a * c - b * s;
                im += a * s + b * c;
            }
            (re, im)
        })
        .collect()
}

fn twiddles(n: usize) -> Vec<C> {
    (0..n)
        .map(|j| {
            let th = 2.0 * std::f64::consts::PI * j as f64 / n as f64;
            (th.cos(), th.sin())
        })
        .collect()
}

/// The complex samples of a tensor whose last axis is 1 (real) or 2 (real, imaginary).
fn complex(t: &Tensor) -> R<Vec<C>> {
    let v = t.to_f64s()?;
    match t.shape.last() {
        Some(1) => Ok(v.iter().map(|&a| (a, 0.0)).collect()),
        Some(2) => Ok(v.chunks_exact(2).map(|c| (c[0], c[1])).collect()),
        _ => Err(format!(
            "the last axis must hold 1 or 2 components, got {:?}",
            t.shape
        )),
    }
}

fn out(like: &Tensor, shape: Vec<usize>, v: Vec<f64>) -> R<Tensor> {
    super::elementwise::cast_tensor(&Tensor::new(shape, crate::Data::F64(v)), like.dtype())
}

pub(crate) fn dft(ctx: &mut Ctx) -> R<Vec<Value>> {
    let x = ctx.t(0)?;
    if x.rank() < 2 {
        return Err(format!(
            "the input must have rank 2 or more, got {:?}",
            x.shape
        ));
    }
    let default_axis = if ctx.opset >= 20 { -2 } else { 1 };
    // opset 20 takes the axis as an input, before it an attribute
    let ax = match ctx.opt(2).filter(|t| !t.is_empty()) {
        Some(t) => t.to_i64s()?[0],
        None => ctx.ai("axis", default_axis),
    };
    let ax = axis(ax, x.rank())?;
    if ax == x.rank() - 1 {
        return Err("the transform axis cannot be the components axis".into());
    }
    let inverse = ctx.ai("inverse", 0) != 0;
    let onesided = ctx.ai("onesided", 0) != 0;
    let len = x.shape[ax];
    let n = match ctx.opt(1).filter(|t| !t.is_empty()) {
        Some(t) => {
            usize::try_from(t.to_i64s()?[0]).map_err(|_| "negative dft_length".to_string())?
        }
        None if inverse && onesided => 2 * len.saturating_sub(1),
        None => len,
    };
    if n == 0 {
        return Err("dft_length must be positive".into());
    }
    let xs = complex(x)?;
    let (outer, inner) = (numel(&x.shape[..ax]), numel(&x.shape[ax + 1..x.rank() - 1]));
    let table = twiddles(n);
    // output length along the axis and components per element
    let (bins, comps) = match (inverse, onesided) {
        (false, true) => (n / 2 + 1, 2),
        (true, true) => (n, 1),
        _ => (n, 2),
    };
    let mut y = vec![0f64; outer * bins * inner * comps];
    for o in 0..outer {
        for i in 0..inner {
            let line: Vec<C> = (0..len).map(|t| xs[(o * len + t) * inner + i]).collect();
            let res = if inverse && onesided {
                // irfft: the Hermitian half (bins 0..=n/2) completed by symmetry, real part of the inverse
                let half: Vec<C> = (0..=n / 2)
                    .map(|k| line.get(k).copied().unwrap_or((0.0, 0.0)))
                    .collect();
                let full: Vec<C> = (0..n)
                    .map(|k| {
                        if k <= n / 2 {
                            half[k]
                        } else {
                            let (a, b) = half[n - k];
                            (a, -b)
                        }
                    })
                    .collect();
                transform(&full, n, n, true, &table)
            } else {
                transform(&line, n, bins, inverse, &table)
            };
            let scale = if inverse { 1.0 / n as f64 } else { 1.0 };
            for (k, &(re, im)) in res.iter().enumerate() {
                let at = ((o * bins + k) * inner + i) * comps;
                y[at] = re * scale;
                if comps == 2 {
                    y[at + 1] = im * scale;
                }
            }
        }
    }
    let mut shape = x.shape.clone();
    shape[ax] = bins;
    *shape.last_mut().expect("rank >= 2") = comps;
    Ok(vec![Value::Tensor(out(x, shape, y)?)])
}

pub(crate) fn stft(ctx: &mut Ctx) -> R<Vec<Value>> {
    let x = ctx.t(0)?;
    let [batch, len, _] = x.shape[..] else {
        return Err(format!(
            "the signal must be [batch, length, 1 or 2], got {:?}",
            x.shape
        ));
    };
    let step = ctx.t(1)?.to_i64s()?[0];
    let step = usize::try_from(step)
        .ok()
        .filter(|&s| s > 0)
        .ok_or_else(|| format!("frame_step must be positive, got {step}"))?;
    let window = ctx
        .opt(2)
        .filter(|t| !t.is_empty())
        .map(|w| w.to_f64s())
        .transpose()?;
    let frame = match ctx.opt(3).filter(|t| !t.is_empty()) {
        Some(t) => {
            usize::try_from(t.to_i64s()?[0]).map_err(|_| "negative frame_length".to_string())?
        }
        None => window.as_ref().map_or(len, |w| w.len()),
    };
    let window = window.unwrap_or_else(|| vec![1.0; frame]);
    if frame == 0 || frame > len || window.len() > len {
        return Err(format!(
            "frame_length {frame} (window {}) does not fit the signal's {len} samples",
            window.len()
        ));
    }
    let onesided = ctx.ai("onesided", 1) != 0;
    let frames = 1 + (len - frame) / step;
    let bins = if onesided { frame / 2 + 1 } else { frame };
    let xs = complex(x)?;
    let table = twiddles(frame);
    let mut y = vec![0f64; batch * frames * bins * 2];
    for b in 0..batch {
        for f in 0..frames {
            let seg: Vec<C> = window
                .iter()
                .enumerate()
                .map(|(t, &w)| {
                    // a window past the signal's end reads zeros, as the reference pads
                    let at = f * step + t;
                    let (a, c) = if at < len {
                        xs[b * len + at]
                    } else {
                        (0.0, 0.0)
                    };
                    (a * w, c * w)
                })
                .collect();
            for (k, (re, im)) in transform(&seg, frame, bins, false, &table)
                .into_iter()
                .enumerate()
            {
                let at = ((b * frames + f) * bins + k) * 2;
                y[at] = re;
                y[at + 1] = im;
            }
        }
    }
    Ok(vec![Value::Tensor(out(
        x,
        vec![batch, frames, bins, 2],
        y,
    )?)])
}
