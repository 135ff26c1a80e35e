//! The state-carrying blocks of linear-attention and state-space language models (opset 27), as the ONNX
//! reference defines them:
//! - CausalConvWithState: a depthwise causal convolution along the sequence over the previous state (or
//!   zeros) followed by the input, with an optional bias and SiLU; the new state is the last `k - 1` columns.
//! - LinearAttention: per time step, the `[d_k, d_v]` state of each key/value head decays (`gated`), is
//!   corrected towards the value (`delta`, scaled by beta), adds `k v^T`, and is read by the query, scaled.
//!
//! Both compute in f32 (half inputs widened) and round each output once to its type: the output to the
//! input's, the state to the past state's (or the input's when there is none).

use super::elementwise::cast_tensor;
use super::{Ctx, R};
use crate::{Tensor, Value};

pub(crate) fn causal_conv_with_state(ctx: &mut Ctx) -> R<Vec<Value>> {
    let (x, w) = (ctx.t(0)?, ctx.t(1)?);
    let [b, c, len] = x.shape[..] else {
        return Err(format!(
            "input must be [batch, channels, length], got {:?}",
            x.shape
        ));
    };
    let [wc, 1, k] = w.shape[..] else {
        return Err(format!(
            "weight must be [channels, 1, k], got {:?}",
            w.shape
        ));
    };
    if wc != c || k == 0 {
        return Err(format!("weight {:?} does not fit {c} channels", w.shape));
    }
    let silu = match ctx.as_str("activation").as_deref() {
        None | Some("none") => false,
        Some("silu" | "swish") => true,
        Some(a) => return Err(format!("unknown activation '{a}'")),
    };
    let (xv, wv) = (x.to_f32s()?, w.to_f32s()?);
    let bias = ctx.opt(2).map(|t| t.to_f32s()).transpose()?;
    let past = ctx.opt(3).map(|t| t.to_f32s()).transpose()?;
    if past.as_ref().is_some_and(|p| p.len() != b * c * (k - 1)) {
        return Err(format!("past_state must be [{b}, {c}, {}]", k - 1));
    }
    let total = k - 1 + len;
    let mut y = vec![0f32; b * c * len];
    let mut state = vec![0f32; b * c * (k - 1)];
    for bc in 0..b * c {
        // the padded row: past state (or zeros), then the input
        let row: Vec<f32> = (0..total)
            .map(|t| {
                if t < k - 1 {
                    past.as_ref().map_or(0.0, |p| p[bc * (k - 1) + t])
                } else {
                    xv[bc * len + t - (k - 1)]
                }
            })
            .collect();
        let ch = bc % c;
        let taps = &wv[ch * k..][..k];
        for t in 0..len {
            let mut s: f32 = (0..k).map(|j| taps[j] * row[t + j]).sum();
            if let Some(bv) = &bias {
                s += bv[ch];
            }
            y[bc * len + t] = if silu { s / (1.0 + (-s).exp()) } else { s };
        }
        state[bc * (k - 1)..][..k - 1].copy_from_slice(&row[total - (k - 1)..]);
    }
    let dt = x.dtype();
    Ok(vec![
        Value::Tensor(cast_tensor(&Tensor::f32(vec![b, c, len], y), dt)?),
        Value::Tensor(cast_tensor(&Tensor::f32(vec![b, c, k - 1], state), dt)?),
    ])
}

pub(crate) fn linear_attention(ctx: &mut Ctx) -> R<Vec<Value>> {
    let (q, kt, v) = (ctx.t(0)?, ctx.t(1)?, ctx.t(2)?);
    let past = ctx.opt(3);
    let (decay, beta) = (ctx.opt(4), ctx.opt(5));
    let rule = ctx
        .as_str("update_rule")
        .unwrap_or_else(|| "gated_delta".into());
    let (gating, delta) = match rule.as_str() {
        "linear" => (false, false),
        "gated" => (true, false),
        "delta" => (false, true),
        "gated_delta" => (true, true),
        other => return Err(format!("unknown update_rule '{other}'")),
    };
    if gating != decay.is_some() || delta != beta.is_some() {
        return Err(format!(
            "update_rule '{rule}' needs decay {} and beta {}",
            if gating { "given" } else { "absent" },
            if delta { "given" } else { "absent" }
        ));
    }
    let (hq, hk) = (ctx.ai("q_num_heads", 0), ctx.ai("kv_num_heads", 0));
    if hq <= 0 || hk <= 0 || hq % hk != 0 {
        return Err(format!(
            "q_num_heads ({hq}) must be a positive multiple of kv_num_heads ({hk})"
        ));
    }
    let (hq, hk) = (hq as usize, hk as usize);
    let ([b, t, qd], [_, _, kd], [_, _, vd]) = (
        <[usize; 3]>::try_from(q.shape.as_slice()).map_err(|_| "query must be rank 3")?,
        <[usize; 3]>::try_from(kt.shape.as_slice()).map_err(|_| "key must be rank 3")?,
        <[usize; 3]>::try_from(v.shape.as_slice()).map_err(|_| "value must be rank 3")?,
    );
    let (dk, dv) = (qd / hq, vd / hk);
    if qd % hq != 0 || kd != hk * dk || vd % hk != 0 {
        return Err(format!(
            "query {:?}, key {:?} and value {:?} do not split into {hq} and {hk} heads",
            q.shape, kt.shape, v.shape
        ));
    }
    let group = hq / hk;
    let (qv, kv, vv) = (q.to_f32s()?, kt.to_f32s()?, v.to_f32s()?);
    let dv_decay = decay.map(|d| d.to_f32s()).transpose()?;
    let per_key = match decay {
        Some(d) if d.shape.last() == Some(&(hk * dk)) => true,
        Some(d) if d.shape.last() == Some(&hk) => false,
        Some(d) => {
            return Err(format!(
                "decay's last axis must be kv_num_heads or kv_num_heads x d_k, got {:?}",
                d.shape
            ));
        }
        None => false,
    };
    let bv = beta.map(|x| x.to_f32s()).transpose()?;
    let beta_per_head = beta.is_some_and(|x| x.shape.last() == Some(&hk));
    let mut state = match past {
        Some(p) if p.shape != [b, hk, dk, dv] => {
            return Err(format!(
                "past_state {:?} must be [{b}, {hk}, {dk}, {dv}]",
                p.shape
            ));
        }
        Some(p) => p.to_f32s()?,
        None => vec![0f32; b * hk * dk * dv],
    };
    let scale = match ctx.af("scale", 0.0) {
        s if s != 0.0 => s,
        _ => 1.0 / (dk as f32).sqrt(),
    };
    let mut out = vec![0f32; b * t * hq * dv];
    let mut vt = vec![0f32; dv];
    for bi in 0..b {
        for i in 0..t {
            for h in 0..hk {
                let s = &mut state[(bi * hk + h) * dk * dv..][..dk * dv];
                let krow = &kv[(bi * t + i) * kd + h * dk..][..dk];
                vt.copy_from_slice(&vv[(bi * t + i) * vd + h * dv..][..dv]);
                if let Some(g) = &dv_decay {
                    for d in 0..dk {
                        let gi = if per_key {
                            g[(bi * t + i) * hk * dk + h * dk + d]
                        } else {
                            g[(bi * t + i) * hk + h]
                        };
                        let f = gi.exp();
                        s[d * dv..][..dv].iter_mut().for_each(|e| *e *= f);
                    }
                }
                if let Some(bt) = &bv {
                    let be = if beta_per_head {
                        bt[(bi * t + i) * hk + h]
                    } else {
                        bt[bi * t + i]
                    };
                    for (m, vm) in vt.iter_mut().enumerate() {
                        let retrieved: f32 = (0..dk).map(|d| s[d * dv + m] * krow[d]).sum();
                        *vm = be * (*vm - retrieved);
                    }
                }
                for d in 0..dk {
                    for m in 0..dv {
                        s[d * dv + m] += krow[d] * vt[m];
                    }
                }
                for g in 0..group {
                    let hqi = h * group + g;
                    let qrow = &qv[(bi * t + i) * qd + hqi * dk..][..dk];
                    let o = &mut out[(bi * t + i) * hq * dv + hqi * dv..][..dv];
                    for (m, om) in o.iter_mut().enumerate() {
                        *om = scale * (0..dk).map(|d| qrow[d] * s[d * dv + m]).sum::<f32>();
                    }
                }
            }
        }
    }
    let state_dt = past.map_or(q.dtype(), |p| p.dtype());
    Ok(vec![
        Value::Tensor(cast_tensor(
            &Tensor::f32(vec![b, t, hq * dv], out),
            q.dtype(),
        )?),
        Value::Tensor(cast_tensor(
            &Tensor::f32(vec![b, hk, dk, dv], state),
            state_dt,
        )?),
    ])
}
