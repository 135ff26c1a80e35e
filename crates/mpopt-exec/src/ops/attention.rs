//! Attention (opsets 23-24): scaled dot-product attention with grouped KV heads, boolean or additive masks,
//! causal and sliding-window masking, a KV cache (past/present), per-batch non-padded lengths, softcap and the
//! `qk_matmul_output` modes. Computed in f64 and rounded once to the inputs' type; a fully masked row gives 0.

use mpopt_ir::DType;

use super::elementwise::cast_tensor;
use super::shape::{concat_t, transpose_t};
use super::{Ctx, R};
use crate::{Data, Tensor, Value};

/// [B, S, heads * H] -> [B, heads, S, H]
fn heads4(t: &Tensor, heads: usize) -> R<Tensor> {
    let [b, s, hid] = t.shape[..] else {
        return Err(format!("expected a 3-D input, got {:?}", t.shape));
    };
    if heads == 0 || hid % heads != 0 {
        return Err(format!(
            "hidden size {hid} does not split into {heads} heads"
        ));
    }
    Ok(transpose_t(
        &t.clone().reshaped(vec![b, s, heads, hid / heads]),
        &[0, 2, 1, 3],
    ))
}

pub(crate) fn attention(ctx: &mut Ctx) -> R<Vec<Value>> {
    let (q0, k0, v0) = (ctx.t(0)?, ctx.t(1)?, ctx.t(2)?);
    let three_d = q0.rank() == 3;
    let (q, k, v) = if three_d {
        let qh = ctx.ai("q_num_heads", 0) as usize;
        let kh = ctx.ai("kv_num_heads", 0) as usize;
        (heads4(q0, qh)?, heads4(k0, kh)?, heads4(v0, kh)?)
    } else {
        (q0.clone(), k0.clone(), v0.clone())
    };
    if q.rank() != 4 || k.rank() != 4 || v.rank() != 4 {
        return Err("Q, K and V must be 3-D or 4-D".into());
    }
    let past_k = ctx.opt(4).filter(|t| !t.is_empty() || t.rank() == 4);
    let past_v = ctx.opt(5).filter(|t| !t.is_empty() || t.rank() == 4);
    let present_k = match past_k {
        Some(p) => concat_t(&[p, &k], 2)?,
        None => k.clone(),
    };
    let present_v = match past_v {
        Some(p) => concat_t(&[p, &v], 2)?,
        None => v.clone(),
    };
    let past_len = past_k.map_or(0, |p| p.shape[2]);
    let (b, hq, s, dh) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3]);
    let (hk, l) = (present_k.shape[1], present_k.shape[2]);
    let dv = present_v.shape[3];
    let (ks, vs) = (&present_k.shape, &present_v.shape);
    if ks[0] != b || vs[0] != b || ks[3] != dh || vs[1] != hk || vs[2] != l {
        return Err(format!(
            "Q {:?}, K {ks:?} and V {vs:?} (with the past) do not agree on batch, heads, length and head size",
            q.shape
        ));
    }
    if hk == 0 || hq % hk != 0 {
        return Err(format!(
            "{hq} query heads do not group over {hk} key/value heads"
        ));
    }
    let scale = if ctx.has("scale") {
        ctx.af("scale", 1.0) as f64
    } else {
        1.0 / (dh as f64).sqrt()
    };
    let sq = scale.sqrt();
    let qv = q.to_f64s()?;
    let kv = present_k.to_f64s()?;
    let vv = present_v.to_f64s()?;

    // Bias [B, Hq, S, L].
    let ninf = f64::NEG_INFINITY;
    let mut bias = vec![0f64; b * hq * s * l];
    let is_causal = ctx.ai("is_causal", 0) != 0;
    if let Some(m) = ctx.opt(3).filter(|t| !t.is_empty()) {
        let mv: Vec<f64> = match &m.data {
            Data::Bool(x) => x.iter().map(|&a| if a { 0.0 } else { ninf }).collect(),
            _ => m.to_f64s()?,
        };
        let ml = *m.shape.last().unwrap_or(&1);
        // Right-align the mask's dims to [B, Hq, S, L]; its last dim may be shorter than L (padded).
        let r = m.rank();
        let dims: Vec<usize> = (0..4)
            .map(|d| if d + r >= 4 { m.shape[d + r - 4] } else { 1 })
            .collect();
        let st = crate::strides(&m.shape);
        let mst: Vec<usize> = (0..4)
            .map(|d| {
                if d + r >= 4 && dims[d] != 1 {
                    st[d + r - 4]
                } else {
                    0
                }
            })
            .collect();
        for bi in 0..b {
            for h in 0..hq {
                for i in 0..s {
                    for j in 0..l {
                        let val = if j >= ml {
                            ninf
                        } else {
                            let off = bi.min(dims[0] - 1) * mst[0]
                                + h.min(dims[1] - 1) * mst[1]
                                + i.min(dims[2] - 1) * mst[2]
                                + j * if dims[3] == 1 { 0 } else { mst[3] };
                            mv[off]
                        };
                        bias[((bi * hq + h) * s + i) * l + j] = val;
                    }
                }
            }
        }
    }
    let nonpad = ctx.opt(6).map(|t| t.to_i64s()).transpose()?;
    let offset = |bi: usize| -> i64 {
        match (&nonpad, past_k) {
            (Some(n), None) => n[bi] - s as i64,
            _ => past_len as i64,
        }
    };
    let (lw, rw) = (
        ctx.ai("left_window_size", -1),
        ctx.ai("right_window_size", -1),
    );
    for bi in 0..b {
        let off = offset(bi);
        for h in 0..hq {
            for i in 0..s {
                for j in 0..l {
                    let idx = ((bi * hq + h) * s + i) * l + j;
                    let diff = i as i64 + off - j as i64;
                    if is_causal && diff < 0 {
                        bias[idx] = ninf;
                    }
                    if (lw >= 0 && diff > lw) || (rw >= 0 && -diff > rw) {
                        bias[idx] = ninf;
                    }
                    if let Some(n) = &nonpad
                        && j as i64 >= n[bi]
                    {
                        bias[idx] = ninf;
                    }
                }
            }
        }
    }
    let softcap = ctx.af("softcap", 0.0) as f64;
    let mode = ctx.ai("qk_matmul_output_mode", 0);
    let group = hq / hk;
    let mut y = vec![0f64; b * hq * s * dv];
    let mut qk_out = vec![0f64; b * hq * s * l];
    let mut row = vec![0f64; l];
    for bi in 0..b {
        for h in 0..hq {
            let kh = h / group;
            for i in 0..s {
                let qrow = &qv[((bi * hq + h) * s + i) * dh..][..dh];
                let brow = &bias[((bi * hq + h) * s + i) * l..][..l];
                for (j, r) in row.iter_mut().enumerate() {
                    let krow = &kv[((bi * hk + kh) * l + j) * dh..][..dh];
                    let mut dot = scaled_dot(qrow, krow, sq);
                    if softcap > 0.0 {
                        dot = softcap * (dot / softcap).tanh();
                    }
                    *r = dot;
                }
                let out_qk = &mut qk_out[((bi * hq + h) * s + i) * l..][..l];
                if mode <= 1 {
                    out_qk.copy_from_slice(&row);
                }
                for (r, &bb) in row.iter_mut().zip(brow) {
                    *r += bb;
                }
                if mode == 2 {
                    out_qk.copy_from_slice(&row);
                }
                let all_masked = brow.iter().all(|&x| x == ninf);
                let mx = row.iter().copied().fold(ninf, f64::max);
                let safe = if mx == ninf { 0.0 } else { mx };
                let mut sum = 0.0;
                for r in row.iter_mut() {
                    *r = (*r - safe).exp();
                    sum += *r;
                }
                let sum = if sum == 0.0 { 1.0 } else { sum };
                for r in row.iter_mut() {
                    *r = if all_masked { 0.0 } else { *r / sum };
                }
                if mode == 3 {
                    out_qk.copy_from_slice(&row);
                }
                let yrow = &mut y[((bi * hq + h) * s + i) * dv..][..dv];
                for (j, &p) in row.iter().enumerate() {
                    if p == 0.0 {
                        continue;
                    }
                    let vrow = &vv[((bi * hk + kh) * l + j) * dv..][..dv];
                    for (o, &x) in yrow.iter_mut().zip(vrow) {
                        *o += p * x;
                    }
                }
            }
        }
    }
    let dt = q0.dtype();
    let cast = |shape: Vec<usize>, v: Vec<f64>| {
        super::elementwise::cast_tensor(&Tensor::new(shape, Data::F64(v)), dt)
    };
    let mut yt = cast(vec![b, hq, s, dv], y)?;
    if three_d {
        yt = transpose_t(&yt, &[0, 2, 1, 3]);
        yt = yt.reshaped(vec![b, s, hq * dv]);
    }
    Ok(vec![
        Value::Tensor(yt),
        Value::Tensor(present_k),
        Value::Tensor(present_v),
        Value::Tensor(cast(vec![b, hq, s, l], qk_out)?),
    ])
}

/// `sum_d (a_d h)(b_d h)`: a query-key product with the scale split as `h = sqrt(scale)` between the two
/// operands, as the ONNX reference applies it (Attention and FlexAttention).
fn scaled_dot(a: &[f64], b: &[f64], h: f64) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x * h) * (y * h)).sum()
}

/// FlexAttention (ai.onnx.preview): `softmax(score_mod((Q √s)(K √s)ᵀ))`, then `prob_mod`, times V, with
/// grouped key/value heads (query head h reads key head `h / (Hq / Hkv)`). `score_mod` and `prob_mod` are
/// subgraphs over the whole `[B, H, L, S]` tensor, which they receive in the softmax's type (f32 for half
/// inputs, f64 for f64 ones, or `softmax_precision`). Computed in f64, rounded once to V's type.
pub(crate) fn flex_attention(ctx: &mut Ctx) -> R<Vec<Value>> {
    let (q, k, v) = (ctx.t(0)?, ctx.t(1)?, ctx.t(2)?);
    let dims = |t: &Tensor, what: &str| -> R<[usize; 4]> {
        t.shape[..]
            .try_into()
            .map_err(|_| format!("FlexAttention {what} must be 4-D, got {:?}", t.shape))
    };
    let ([b, hq, l, e], [bk, hk, s, ek], [bv, hv, sv, ev]) =
        (dims(q, "Q")?, dims(k, "K")?, dims(v, "V")?);
    if bk != b || bv != b || hv != hk || sv != s || ek != e || hk == 0 || hq % hk != 0 {
        return Err(format!(
            "FlexAttention shapes do not fit: Q {:?}, K {:?}, V {:?}",
            q.shape, k.shape, v.shape
        ));
    }
    let scale = if ctx.has("scale") {
        ctx.af("scale", 1.0) as f64
    } else {
        1.0 / (e as f64).sqrt()
    };
    let ss = scale.sqrt();
    let soft = match ctx.ai("softmax_precision", 0) {
        0 if q.dtype() == DType::F64 => DType::F64,
        0 => DType::F32,
        c => DType::from_code(c as i32).ok_or_else(|| format!("unknown softmax_precision {c}"))?,
    };
    let (qv, kv, vv) = (q.to_f64s()?, k.to_f64s()?, v.to_f64s()?);
    let group = hq / hk;
    // Row r of the scores is query row r, (batch, query head, position) flattened; the first of its S key
    // (and value) rows is that batch's key head `h / group`.
    let kv_row0 = |r: usize| {
        let (bi, h) = (r / l / hq, r / l % hq);
        (bi * hk + h / group) * s
    };
    let mut scores = vec![0f64; b * hq * l * s];
    for (r, row) in scores.chunks_mut(s.max(1)).enumerate() {
        let (qrow, k0) = (&qv[r * e..][..e], kv_row0(r));
        for (j, x) in row.iter_mut().enumerate() {
            *x = scaled_dot(qrow, &kv[(k0 + j) * e..][..e], ss);
        }
    }
    let shape = vec![b, hq, l, s];
    // a modifier subgraph over the whole tensor, in the softmax's type
    let modify = |name: &str, x: Vec<f64>| -> R<Vec<f64>> {
        if ctx.sub.graph(name).is_none() {
            return Ok(x);
        }
        let t = cast_tensor(&Tensor::new(shape.clone(), Data::F64(x)), soft)?;
        let out = ctx
            .sub
            .run(name, vec![std::sync::Arc::new(Value::Tensor(t))])?;
        let y = out
            .first()
            .ok_or_else(|| format!("{name} has no output"))?
            .tensor()?;
        if y.len() != b * hq * l * s {
            return Err(format!("{name} changed the scores' shape to {:?}", y.shape));
        }
        y.to_f64s()
    };
    // rounded to the softmax's type, as the reference computes it
    let round = |x: Vec<f64>| -> R<Vec<f64>> {
        cast_tensor(&Tensor::new(shape.clone(), Data::F64(x)), soft)?.to_f64s()
    };
    let mut p = modify("score_mod", round(scores)?)?;
    for row in p.chunks_mut(s.max(1)) {
        let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mut sum = 0.0;
        for x in row.iter_mut() {
            *x = (*x - m).exp();
            sum += *x;
        }
        for x in row.iter_mut() {
            *x /= sum;
        }
    }
    let p = modify("prob_mod", round(p)?)?;
    let mut out = vec![0f64; b * hq * l * ev];
    for (r, orow) in out.chunks_mut(ev.max(1)).enumerate() {
        let (prow, v0) = (&p[r * s..][..s], kv_row0(r));
        for (j, &pj) in prow.iter().enumerate() {
            for (o, &x) in orow.iter_mut().zip(&vv[(v0 + j) * ev..][..ev]) {
                *o += pj * x;
            }
        }
    }
    Ok(vec![Value::Tensor(cast_tensor(
        &Tensor::new(vec![b, hq, l, ev], Data::F64(out)),
        v.dtype(),
    )?)])
}
