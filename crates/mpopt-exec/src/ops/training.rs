//! The optimizers of ai.onnx.preview.training as the ONNX reference defines them: Adagrad, Adam and
//! Momentum (standard and Nesterov). Inputs are the learning rate R and step count T, then n tensors to
//! optimize, their n gradients and their n accumulators of each kind; the outputs are the updated tensors,
//! then the updated accumulators, kind by kind. Computed in f64, each output in its input's type.

use super::elementwise::cast_tensor;
use super::{Ctx, R};
use crate::{Data, Tensor, Value};

/// Per optimized tensor, its operands: X, G, then the accumulators.
type Groups<'c> = Vec<Vec<&'c Tensor>>;

/// R, T and the groups of `kinds` operands of an optimizer node.
fn operands<'c>(ctx: &'c Ctx, kinds: usize) -> R<(f64, f64, Groups<'c>)> {
    let (r, t) = (ctx.t(0)?.scalar_f64()?, ctx.t(1)?.scalar_f64()?);
    let rest = ctx.n_in().saturating_sub(2);
    if rest == 0 || !rest.is_multiple_of(kinds) {
        return Err(format!(
            "{} inputs after R and T are not {kinds} groups of equal size",
            rest
        ));
    }
    let n = rest / kinds;
    let groups = (0..n)
        .map(|i| {
            (0..kinds)
                .map(|k| ctx.t(2 + k * n + i))
                .collect::<R<Vec<_>>>()
        })
        .collect::<R<_>>()?;
    Ok((r, t, groups))
}

/// The float attributes `(name, default)` of an optimizer node, as f64.
fn floats<const N: usize>(ctx: &Ctx, attrs: [(&str, f32); N]) -> [f64; N] {
    attrs.map(|(name, default)| ctx.af(name, default) as f64)
}

/// Applies `update` element by element to every group (all of its X's shape): the outputs, each in its X's
/// type, every group's first output, then every group's second, ...
fn update_all<const K: usize, const O: usize>(
    groups: &Groups,
    update: impl Fn([f64; K]) -> [f64; O],
) -> R<Vec<Value>> {
    let mut by_kind: [Vec<Value>; O] = std::array::from_fn(|_| Vec::with_capacity(groups.len()));
    for group in groups {
        let x = group[0];
        let vals: Vec<Vec<f64>> = group.iter().map(|t| t.to_f64s()).collect::<R<_>>()?;
        if vals.len() != K || vals.iter().any(|v| v.len() != x.len()) {
            return Err("an optimizer's operands differ in size".into());
        }
        let mut outs: [Vec<f64>; O] = std::array::from_fn(|_| Vec::with_capacity(x.len()));
        (0..x.len()).for_each(|e| {
            let r = update(std::array::from_fn(|k| vals[k][e]));
            for (o, v) in outs.iter_mut().zip(r) {
                o.push(v);
            }
        });
        for (kind, o) in by_kind.iter_mut().zip(outs) {
            let t = cast_tensor(&Tensor::new(x.shape.clone(), Data::F64(o)), x.dtype())?;
            kind.push(Value::Tensor(t));
        }
    }
    Ok(by_kind.into_iter().flatten().collect())
}

pub(crate) fn adagrad(ctx: &mut Ctx) -> R<Vec<Value>> {
    let (r, t, groups) = operands(ctx, 3)?;
    let [decay, eps, norm] = floats(
        ctx,
        [
            ("decay_factor", 0.0),
            ("epsilon", 0.0),
            ("norm_coefficient", 0.0),
        ],
    );
    let rate = r / (1.0 + t * decay);
    update_all(&groups, |[x, g, h]| {
        let g = norm * x + g;
        let h = h + g * g;
        [x - rate * g / (h.sqrt() + eps), h]
    })
}

pub(crate) fn adam(ctx: &mut Ctx) -> R<Vec<Value>> {
    let (r, t, groups) = operands(ctx, 4)?;
    let [alpha, beta, eps, norm, post] = floats(
        ctx,
        [
            ("alpha", 0.9),
            ("beta", 0.999),
            ("epsilon", 0.0),
            ("norm_coefficient", 0.0),
            ("norm_coefficient_post", 0.0),
        ],
    );
    // bias correction from the second step on
    let rate = if t > 0.0 {
        r * (1.0 - beta.powf(t)).sqrt() / (1.0 - alpha.powf(t))
    } else {
        r
    };
    update_all(&groups, |[x, g, v, h]| {
        let g = norm * x + g;
        let v = alpha * v + (1.0 - alpha) * g;
        let h = beta * h + (1.0 - beta) * g * g;
        let x = x - rate * (v / (h.sqrt() + eps));
        [(1.0 - post) * x, v, h]
    })
}

pub(crate) fn momentum(ctx: &mut Ctx) -> R<Vec<Value>> {
    let (r, t, groups) = operands(ctx, 3)?;
    let [alpha, beta, norm] = floats(
        ctx,
        [("alpha", 0.0), ("beta", 0.0), ("norm_coefficient", 0.0)],
    );
    let nesterov = match ctx.as_str("mode").as_deref() {
        Some("nesterov") => true,
        Some("standard") | None => false,
        Some(m) => return Err(format!("unknown Momentum mode {m:?}")),
    };
    // the gradient's coefficient is 1 on the first step
    let b = if t > 0.0 { beta } else { 1.0 };
    update_all(&groups, |[x, g, v]| {
        let g = norm * x + g;
        let v = alpha * v + b * g;
        let step = if nesterov { g + alpha * v } else { v };
        [x - r * step, v]
    })
}
