//! The fused ops onnxruntime's graph optimizer writes (`com.microsoft`, and the two normalizations it registers
//! in the default domain), so that models saved by onnxruntime can be calibrated, searched and compared: each
//! is the composition of the standard ops it replaces, computed as onnxruntime's CPU kernels define it.
//!
//! - `FusedConv`: `activation(Conv(X, W, B) + Z)`, activation one of Relu, Tanh, Sigmoid, LeakyRelu, Clip,
//!   HardSigmoid (parameters in `activation_params`).
//! - `FusedMatMul`: `alpha * op(A) @ op(B)`, `op` transposing the last two dims when `transA`/`transB` is set.
//! - `QuickGelu`: `x * sigmoid(alpha * x)`; `BiasGelu`: `Gelu(A + B)`; `Gelu`: erf Gelu; `FastGelu`: tanh Gelu
//!   of `X + bias`.
//! - `SkipLayerNormalization` / `SkipSimplifiedLayerNormalization`: LayerNorm / RMSNorm over the last axis of
//!   `input + skip (+ bias)`, which is also the last output.
//! - `SimplifiedLayerNormalization` (default domain): RMSNorm from `axis`.
//!
//! The normalizations are the executor's own LayerNormalization and RMSNormalization (`nn::layer_norm_of`,
//! `nn::rms_norm_of`) applied to the sum.

use std::sync::Arc;

use super::{Ctx, R, linalg, nn, one};
use crate::{Data, Tensor, Value};

/// `ctx`'s node (its attributes) with other inputs: to run a standard kernel on part of a fused op.
fn with_inputs<'a>(ctx: &Ctx<'a>, inputs: Vec<Option<Arc<Value>>>) -> Ctx<'a> {
    Ctx {
        node: ctx.node,
        inputs,
        opset: ctx.opset,
        sub: ctx.sub,
    }
}

fn input(ctx: &Ctx, i: usize) -> Option<Arc<Value>> {
    ctx.inputs.get(i).cloned().flatten()
}

fn tensor_of(v: Vec<Value>) -> R<Tensor> {
    match v.into_iter().next() {
        Some(Value::Tensor(t)) => Ok(t),
        _ => Err("the fused op's inner kernel gave no tensor".into()),
    }
}

/// `a + b` with broadcasting.
fn add(ctx: &Ctx, a: Tensor, b: Arc<Value>) -> R<Tensor> {
    let mut c = with_inputs(ctx, vec![Some(Arc::new(Value::Tensor(a))), Some(b)]);
    tensor_of(super::elementwise::add(&mut c)?)
}

/// Applies `f` to every element of a float tensor (f32 or f64), in place, in parallel chunks as the
/// elementwise kernels do.
fn map_float(t: &mut Tensor, f: impl Fn(f64) -> f64 + Sync) -> R<()> {
    use rayon::prelude::*;
    const MIN: usize = super::elementwise::PAR_MIN;
    match &mut t.data {
        Data::F32(v) => v
            .par_iter_mut()
            .with_min_len(MIN)
            .for_each(|x| *x = f(*x as f64) as f32),
        Data::F64(v) => v.par_iter_mut().with_min_len(MIN).for_each(|x| *x = f(*x)),
        d => return Err(format!("expected a float tensor, got {}", d.dtype())),
    }
    Ok(())
}

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

fn gelu_erf(x: f64) -> f64 {
    0.5 * x * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2))
}

fn gelu_tanh(x: f64) -> f64 {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
}

pub(crate) fn fused_conv(ctx: &mut Ctx) -> R<Vec<Value>> {
    let act = ctx.as_str("activation").unwrap_or_default();
    let p = ctx.afs("activation_params").unwrap_or_default();
    let param = |i: usize, what: &str| {
        p.get(i)
            .map(|&x| x as f64)
            .ok_or_else(|| format!("FusedConv activation {act} needs activation_params ({what})"))
    };
    let f: Box<dyn Fn(f64) -> f64 + Sync> = match act.as_str() {
        "" | "Identity" => Box::new(|x| x),
        "Relu" => Box::new(|x: f64| x.max(0.0)),
        "Tanh" => Box::new(f64::tanh),
        "Sigmoid" => Box::new(sigmoid),
        "LeakyRelu" => {
            let a = param(0, "alpha")?;
            Box::new(move |x| if x >= 0.0 { x } else { a * x })
        }
        "Clip" => {
            let (lo, hi) = (param(0, "min")?, param(1, "max")?);
            Box::new(move |x: f64| x.clamp(lo, hi))
        }
        "HardSigmoid" => {
            let (a, b) = (param(0, "alpha")?, param(1, "beta")?);
            Box::new(move |x| (a * x + b).clamp(0.0, 1.0))
        }
        other => return Err(format!("FusedConv: unknown activation '{other}'")),
    };
    let conv_in = (0..3).map(|i| input(ctx, i)).collect();
    let mut y = tensor_of(linalg::conv(&mut with_inputs(ctx, conv_in))?)?;
    if let Some(z) = input(ctx, 3) {
        y = add(ctx, y, z)?;
    }
    map_float(&mut y, f)?;
    one(y)
}

/// The tensor with its last two dims swapped (a vector is left as it is).
fn swap_last2(t: &Tensor) -> Tensor {
    let r = t.rank();
    if r < 2 {
        return t.clone();
    }
    let mut perm: Vec<usize> = (0..r).collect();
    perm.swap(r - 2, r - 1);
    super::shape::transpose_t(t, &perm)
}

pub(crate) fn fused_matmul(ctx: &mut Ctx) -> R<Vec<Value>> {
    for a in ["transBatchA", "transBatchB"] {
        if ctx.ai(a, 0) != 0 {
            return Err(format!("FusedMatMul: {a} = 1 is not supported"));
        }
    }
    let mut ab = Vec::new();
    for (i, flag) in [(0, "transA"), (1, "transB")] {
        let t = ctx.t(i)?;
        ab.push(Some(Arc::new(Value::Tensor(if ctx.ai(flag, 0) != 0 {
            swap_last2(t)
        } else {
            t.clone()
        }))));
    }
    let mut y = tensor_of(linalg::matmul(&mut with_inputs(ctx, ab))?)?;
    let alpha = ctx.af("alpha", 1.0) as f64;
    if alpha != 1.0 {
        map_float(&mut y, |x| alpha * x)?;
    }
    one(y)
}

pub(crate) fn quick_gelu(ctx: &mut Ctx) -> R<Vec<Value>> {
    let a = ctx.af("alpha", 1.702) as f64;
    let mut y = ctx.t(0)?.clone();
    map_float(&mut y, |x| x * sigmoid(a * x))?;
    one(y)
}

pub(crate) fn bias_gelu(ctx: &mut Ctx) -> R<Vec<Value>> {
    let b = input(ctx, 1).ok_or("BiasGelu: input 1 (bias) is required")?;
    let mut y = add(ctx, ctx.t(0)?.clone(), b)?;
    map_float(&mut y, gelu_erf)?;
    one(y)
}

pub(crate) fn gelu(ctx: &mut Ctx) -> R<Vec<Value>> {
    let mut y = ctx.t(0)?.clone();
    map_float(&mut y, gelu_erf)?;
    one(y)
}

pub(crate) fn fast_gelu(ctx: &mut Ctx) -> R<Vec<Value>> {
    let mut y = ctx.t(0)?.clone();
    if let Some(b) = input(ctx, 1) {
        y = add(ctx, y, b)?;
    }
    map_float(&mut y, gelu_tanh)?;
    one(y)
}

/// `SkipLayerNormalization` (`rms` false) and `SkipSimplifiedLayerNormalization` (`rms` true): the
/// LayerNormalization (RMSNormalization) of `input + skip (+ bias)` over its last axis, its mean (zeros for
/// RMS) and inverse standard deviation (f32, one per row), and the sum itself.
fn skip_norm(ctx: &mut Ctx, rms: bool) -> R<Vec<Value>> {
    let x = ctx.t(0)?.clone();
    let skip = input(ctx, 1).ok_or("input 1 (skip) is required")?;
    let mut sum = add(ctx, x, skip)?;
    // inputs: input, skip, gamma, beta, bias (SkipSimplified: input, skip, gamma, bias)
    let bias_slot = if rms { 3 } else { 4 };
    if let Some(bias) = input(ctx, bias_slot) {
        sum = add(ctx, sum, bias)?;
    }
    if sum.rank() == 0 {
        return Err("the input needs at least one dim".into());
    }
    let ax = sum.rank() - 1;
    let eps = ctx.af("epsilon", 1e-12);
    let gamma = ctx.t(2)?;
    let mut outs = if rms {
        let (y, invs) = nn::rms_norm_of(&sum, gamma, ax, eps as f64)?;
        let sshape = nn::stats_shape(&sum.shape, ax);
        vec![
            Value::Tensor(y),
            Value::Tensor(Tensor::f32(sshape.clone(), vec![0.0; invs.len()])),
            Value::Tensor(Tensor::f32(
                sshape,
                invs.iter().map(|&v| v as f32).collect(),
            )),
        ]
    } else {
        nn::layer_norm_of(&sum, gamma, ctx.opt(3), ax, eps)?
    };
    outs.push(Value::Tensor(sum));
    Ok(outs)
}

pub(crate) fn skip_layer_norm(ctx: &mut Ctx) -> R<Vec<Value>> {
    skip_norm(ctx, false)
}

pub(crate) fn skip_simplified_layer_norm(ctx: &mut Ctx) -> R<Vec<Value>> {
    skip_norm(ctx, true)
}

/// onnxruntime's `SimplifiedLayerNormalization` (default domain): RMSNorm from `axis`; the second output is
/// the inverse RMS (f32).
pub(crate) fn simplified_layer_norm(ctx: &mut Ctx) -> R<Vec<Value>> {
    let x = ctx.t(0)?;
    let ax = super::dim_axis(ctx.ai("axis", -1), x.rank())?;
    let (y, invs) = nn::rms_norm_of(x, ctx.t(1)?, ax, ctx.af("epsilon", 1e-5) as f64)?;
    Ok(vec![
        Value::Tensor(y),
        Value::Tensor(Tensor::f32(
            nn::stats_shape(&x.shape, ax),
            invs.iter().map(|&v| v as f32).collect(),
        )),
    ])
}
