//! RotaryEmbedding (opset 23): rotates the first `rotary_embedding_dim` features of every head by the cosine
//! and sine its position selects in the caches, as halves (`x[j]`, `x[j + rd/2]`) or interleaved pairs
//! (`x[2j]`, `x[2j + 1]`); the other features pass through. The input is `[batch, heads, seq, head]`, or
//! `[batch, seq, hidden]` split into `num_heads` heads. Computed in f32: half inputs are widened and the
//! output rounded once, as the op's CUDA kernels compute.

use super::{Ctx, R};
use crate::{Tensor, Value};

pub(crate) fn rotary_embedding(ctx: &mut Ctx) -> R<Vec<Value>> {
    let x = ctx.t(0)?;
    let (cos, sin) = (ctx.t(1)?, ctx.t(2)?);
    let pos = ctx
        .opt(3)
        .map(|p| p.to_i64s().map(|v| (v, p.shape.clone())));
    let pos = pos.transpose()?;
    let interleaved = ctx.ai("interleaved", 0) != 0;
    let (b, s, h, d, heads_first) = match x.shape[..] {
        [b, h, s, d] => (b, s, h, d, true),
        [b, s, hidden] => {
            let nh = ctx.ai("num_heads", 0);
            if nh <= 0 || hidden % nh as usize != 0 {
                return Err(format!(
                    "a 3-D input needs num_heads dividing its hidden size {hidden} (num_heads = {nh})"
                ));
            }
            (b, s, nh as usize, hidden / nh as usize, false)
        }
        _ => {
            return Err(format!("the input must be 3-D or 4-D, got {:?}", x.shape));
        }
    };
    let rd = match ctx.ai("rotary_embedding_dim", 0) {
        0 => d,
        r if r > 0 && r as usize <= d && r % 2 == 0 => r as usize,
        r => {
            return Err(format!(
                "rotary_embedding_dim {r} must be even and at most the head size {d}"
            ));
        }
    };
    let half = rd / 2;
    for (name, c) in [("cos_cache", cos), ("sin_cache", sin)] {
        if c.shape.last() != Some(&half) {
            return Err(format!(
                "{name} {:?} must end in rotary_embedding_dim / 2 = {half}",
                c.shape
            ));
        }
    }
    let rows = cos.len() / half.max(1);
    if sin.len() != cos.len() {
        return Err(format!(
            "cos_cache {:?} and sin_cache {:?} differ",
            cos.shape, sin.shape
        ));
    }
    // the cache row of (batch bi, position si)
    let row = |bi: usize, si: usize| -> R<usize> {
        let r = match &pos {
            Some((p, shape)) => {
                // position_ids is [batch, seq] (a batch of 1 serves every batch)
                let pb = if shape.first() == Some(&1) { 0 } else { bi };
                let id = *p
                    .get(pb * s + si)
                    .ok_or_else(|| format!("position_ids {shape:?} do not cover [{b}, {s}]"))?;
                usize::try_from(id).map_err(|_| format!("negative position id {id}"))?
            }
            None => bi * s + si,
        };
        if r >= rows {
            return Err(format!("position {r} is beyond the caches' {rows} rows"));
        }
        Ok(r)
    };
    let (xv, cv, sv) = (x.to_f32s()?, cos.to_f32s()?, sin.to_f32s()?);
    let mut out = xv.clone();
    for bi in 0..b {
        for si in 0..s {
            let r = row(bi, si)?;
            let (c, sn) = (&cv[r * half..][..half], &sv[r * half..][..half]);
            for hi in 0..h {
                let off = if heads_first {
                    ((bi * h + hi) * s + si) * d
                } else {
                    ((bi * s + si) * h + hi) * d
                };
                for j in 0..half {
                    let (i1, i2) = if interleaved {
                        (2 * j, 2 * j + 1)
                    } else {
                        (j, j + half)
                    };
                    let (x1, x2) = (xv[off + i1], xv[off + i2]);
                    out[off + i1] = c[j] * x1 - sn[j] * x2;
                    out[off + i2] = sn[j] * x1 + c[j] * x2;
                }
            }
        }
    }
    Ok(vec![Value::Tensor(Tensor::f32(x.shape.clone(), out))])
}
