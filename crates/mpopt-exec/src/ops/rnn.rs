//! LSTM, GRU and RNN (opset 14 semantics: directions, layouts, sequence lengths, clip, activations). The input
//! projection of all time steps is one product; each step adds the recurrent product.

use super::linalg::mm;
use super::shape::transpose_t;
use super::{Ctx, R};
use crate::{Data, Tensor, Value};

#[derive(Clone, Copy)]
enum Act {
    Sigmoid,
    Tanh,
    Relu,
    HardSigmoid(f32, f32),
    LeakyRelu(f32),
    Affine(f32, f32),
    ScaledTanh(f32, f32),
    Elu(f32),
    Softsign,
    Softplus,
    ThresholdedRelu(f32),
}

impl Act {
    fn apply(self, x: f32) -> f32 {
        match self {
            Act::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            Act::Tanh => x.tanh(),
            Act::Relu => x.max(0.0),
            Act::HardSigmoid(a, b) => (a * x + b).clamp(0.0, 1.0),
            Act::LeakyRelu(a) => {
                if x >= 0.0 {
                    x
                } else {
                    a * x
                }
            }
            Act::Affine(a, b) => a * x + b,
            Act::ScaledTanh(a, b) => a * (b * x).tanh(),
            Act::Elu(a) => {
                if x >= 0.0 {
                    x
                } else {
                    a * x.exp_m1()
                }
            }
            Act::Softsign => x / (1.0 + x.abs()),
            Act::Softplus => x.exp().ln_1p(),
            Act::ThresholdedRelu(a) => {
                if x > a {
                    x
                } else {
                    0.0
                }
            }
        }
    }
}

/// The activations for each direction (`per_dir` per direction), from the attributes or the defaults.
fn activations(ctx: &Ctx, defaults: &[Act], dirs: usize) -> R<Vec<Act>> {
    let Some(names) = ctx.astrs("activations") else {
        return Ok((0..dirs).flat_map(|_| defaults.iter().copied()).collect());
    };
    let alphas = ctx.afs("activation_alpha").unwrap_or_default();
    let betas = ctx.afs("activation_beta").unwrap_or_default();
    let (mut ai, mut bi) = (0, 0);
    let mut next_a = |d: f32| {
        let v = alphas.get(ai).copied().unwrap_or(d);
        ai += 1;
        v
    };
    let mut next_b = |d: f32| {
        let v = betas.get(bi).copied().unwrap_or(d);
        bi += 1;
        v
    };
    let mut out = Vec::new();
    for n in &names {
        out.push(match n.to_ascii_lowercase().as_str() {
            "sigmoid" => Act::Sigmoid,
            "tanh" => Act::Tanh,
            "relu" => Act::Relu,
            "hardsigmoid" => Act::HardSigmoid(next_a(0.2), next_b(0.5)),
            "leakyrelu" => Act::LeakyRelu(next_a(0.01)),
            "affine" => Act::Affine(next_a(1.0), next_b(0.0)),
            "scaledtanh" => Act::ScaledTanh(next_a(1.0), next_b(1.0)),
            "elu" => Act::Elu(next_a(1.0)),
            "softsign" => Act::Softsign,
            "softplus" => Act::Softplus,
            "thresholdedrelu" => Act::ThresholdedRelu(next_a(1.0)),
            other => return Err(format!("unknown activation '{other}'")),
        });
    }
    if out.len() == defaults.len() && dirs == 2 {
        let copy = out.clone();
        out.extend(copy);
    }
    Ok(out)
}

struct Common {
    seq: usize,
    batch: usize,
    input: usize,
    hidden: usize,
    dirs: usize,
    reverse_only: bool,
    /// X as [seq, batch, input].
    x: Vec<f32>,
    w: Vec<f32>,
    r: Vec<f32>,
    b: Option<Vec<f32>>,
    lens: Vec<usize>,
    h0: Option<Vec<f32>>,
    layout: i64,
    clip: Option<f32>,
}

fn common(ctx: &Ctx, gates: usize) -> R<Common> {
    let layout = ctx.ai("layout", 0);
    let mut xt = ctx.t(0)?.clone();
    if layout == 1 {
        xt = transpose_t(&xt, &[1, 0, 2]);
    }
    let (seq, batch, input) = match xt.shape[..] {
        [s, b, i] => (s, b, i),
        _ => return Err(format!("X must be 3-D, got {:?}", xt.shape)),
    };
    let w = ctx.t(1)?;
    if w.rank() != 3 {
        return Err(format!("W must be 3-D, got {:?}", w.shape));
    }
    let hidden = ctx.ai("hidden_size", (w.shape[1] / gates) as i64);
    let direction = ctx.as_str("direction").unwrap_or_else(|| "forward".into());
    let dirs = if direction == "bidirectional" { 2 } else { 1 };
    // every weight's shape follows from hidden_size, the direction count and the input size; a model whose
    // shapes disagree with its attributes is an error here, not an index past a buffer later
    if hidden < 1 || w.shape != [dirs, gates * hidden as usize, input] {
        return Err(format!(
            "W {:?} does not match hidden_size {hidden}, {dirs} direction(s), {gates} gates and input size {input}",
            w.shape
        ));
    }
    let hidden = hidden as usize;
    let r = ctx.t(2)?;
    if r.shape != [dirs, gates * hidden, hidden] {
        return Err(format!(
            "R {:?} does not match hidden_size {hidden} and {dirs} direction(s)",
            r.shape
        ));
    }
    if let Some(b) = ctx.opt(3).filter(|t| !t.is_empty())
        && b.shape != [dirs, 2 * gates * hidden]
    {
        return Err(format!(
            "B {:?} does not match hidden_size {hidden} and {dirs} direction(s)",
            b.shape
        ));
    }
    let lens: Vec<usize> = match ctx.opt(4) {
        Some(t) if !t.is_empty() => {
            let l = t.to_i64s()?;
            if l.len() != batch || l.iter().any(|&x| x < 0 || x as usize > seq) {
                return Err(format!(
                    "sequence_lens {l:?} must give one length in [0, {seq}] per batch entry ({batch})"
                ));
            }
            l.iter().map(|&x| x as usize).collect()
        }
        _ => vec![seq; batch],
    };
    let state = if layout == 1 {
        [batch, dirs, hidden]
    } else {
        [dirs, batch, hidden]
    };
    for (i, name) in [(5, "initial_h"), (6, "initial_c")] {
        if let Some(t) = ctx.opt(i).filter(|t| !t.is_empty())
            && t.shape != state
        {
            return Err(format!("{name} {:?} is not {state:?}", t.shape));
        }
    }
    if let Some(p) = ctx.opt(7).filter(|t| !t.is_empty())
        && gates == 4
        && p.len() != dirs * 3 * hidden
    {
        return Err(format!(
            "P {:?} does not hold {dirs} x {} values",
            p.shape,
            3 * hidden
        ));
    }
    let h0 = match ctx.opt(5) {
        Some(t) if !t.is_empty() => {
            let t = if layout == 1 {
                transpose_t(t, &[1, 0, 2])
            } else {
                t.clone()
            };
            Some(t.to_f32s()?)
        }
        _ => None,
    };
    Ok(Common {
        seq,
        batch,
        input,
        hidden,
        dirs,
        reverse_only: direction == "reverse",
        x: xt.to_f32s()?,
        w: w.to_f32s()?,
        r: ctx.t(2)?.to_f32s()?,
        b: ctx
            .opt(3)
            .filter(|t| !t.is_empty())
            .map(|t| t.to_f32s())
            .transpose()?,
        lens,
        h0,
        layout,
        clip: ctx.has("clip").then(|| ctx.af("clip", 0.0)),
    })
}

/// Assembles outputs Y [seq, dirs, batch, H] (or the batch-major layout) and the final states.
fn outputs(c: &Common, y: Vec<f32>, finals: Vec<Vec<f32>>, like: &Tensor) -> Vec<Value> {
    let (s, d, b, h) = (c.seq, c.dirs, c.batch, c.hidden);
    let mk = |shape: Vec<usize>, v: Vec<f32>| {
        let t = Tensor::f32(shape, v);
        match like.data {
            Data::F64(_) => {
                Tensor::new(t.shape.clone(), Data::F64(t.to_f64s().unwrap_or_default()))
            }
            _ => t,
        }
    };
    let mut yt = Tensor::f32(vec![s, d, b, h], y);
    if c.layout == 1 {
        yt = transpose_t(&yt, &[2, 0, 1, 3]);
    }
    let mut out = vec![Value::Tensor(mk(
        yt.shape.clone(),
        yt.to_f32s().unwrap_or_default(),
    ))];
    for f in finals {
        let mut t = Tensor::f32(vec![d, b, h], f);
        if c.layout == 1 {
            t = transpose_t(&t, &[1, 0, 2]);
        }
        out.push(Value::Tensor(mk(
            t.shape.clone(),
            t.to_f32s().unwrap_or_default(),
        )));
    }
    out
}

/// Input projections for direction `dir`: [seq*batch, gates*H] = X * W^T (+ Wb).
fn project(c: &Common, gates: usize, dir: usize) -> Vec<f32> {
    let gh = gates * c.hidden;
    let mut xw = vec![0f32; c.seq * c.batch * gh];
    let w = &c.w[dir * gh * c.input..(dir + 1) * gh * c.input];
    mm(
        c.seq * c.batch,
        gh,
        c.input,
        &mut xw,
        &c.x,
        (c.input, 1),
        w,
        (1, c.input),
        false,
        1.0,
    );
    if let Some(b) = &c.b {
        let wb = &b[dir * 2 * gh..dir * 2 * gh + gh];
        for row in xw.chunks_mut(gh) {
            row.iter_mut().zip(wb).for_each(|(v, &bb)| *v += bb);
        }
    }
    xw
}

/// Time steps of direction `dir` in processing order, for batch entry `bi`.
fn steps(c: &Common, dir: usize) -> Vec<usize> {
    let backward = dir == 1 || c.reverse_only;
    if backward {
        (0..c.seq).rev().collect()
    } else {
        (0..c.seq).collect()
    }
}

fn clip(c: &Common, v: f32) -> f32 {
    match c.clip {
        Some(k) => v.clamp(-k, k),
        None => v,
    }
}

pub(crate) fn lstm(ctx: &mut Ctx) -> R<Vec<Value>> {
    let c = common(ctx, 4)?;
    let like = ctx.t(0)?.clone();
    let (h, b) = (c.hidden, c.batch);
    let acts = activations(ctx, &[Act::Sigmoid, Act::Tanh, Act::Tanh], c.dirs)?;
    let input_forget = ctx.ai("input_forget", 0) != 0;
    let c0 = match ctx.opt(6) {
        Some(t) if !t.is_empty() => {
            let t = if c.layout == 1 {
                transpose_t(t, &[1, 0, 2])
            } else {
                t.clone()
            };
            Some(t.to_f32s()?)
        }
        _ => None,
    };
    let p = ctx
        .opt(7)
        .filter(|t| !t.is_empty())
        .map(|t| t.to_f32s())
        .transpose()?;
    let mut y = vec![0f32; c.seq * c.dirs * b * h];
    let mut hf = vec![0f32; c.dirs * b * h];
    let mut cf = vec![0f32; c.dirs * b * h];
    for dir in 0..c.dirs {
        let (f, g, hact) = (acts[dir * 3], acts[dir * 3 + 1], acts[dir * 3 + 2]);
        let xw = project(&c, 4, dir);
        let r = &c.r[dir * 4 * h * h..(dir + 1) * 4 * h * h];
        let rb =
            c.b.as_ref()
                .map(|bb| &bb[dir * 8 * h + 4 * h..dir * 8 * h + 8 * h]);
        let mut ht = c.h0.as_ref().map_or(vec![0f32; b * h], |v| {
            v[dir * b * h..(dir + 1) * b * h].to_vec()
        });
        let mut ct = c0.as_ref().map_or(vec![0f32; b * h], |v| {
            v[dir * b * h..(dir + 1) * b * h].to_vec()
        });
        let pp = p.as_ref().map(|v| &v[dir * 3 * h..(dir + 1) * 3 * h]);
        let mut hr = vec![0f32; b * 4 * h];
        for t in steps(&c, dir) {
            mm(b, 4 * h, h, &mut hr, &ht, (h, 1), r, (1, h), false, 1.0);
            for bi in 0..b {
                if t >= c.lens[bi] {
                    continue;
                }
                let row = &xw[(t * b + bi) * 4 * h..(t * b + bi + 1) * 4 * h];
                let rr = &hr[bi * 4 * h..(bi + 1) * 4 * h];
                for k in 0..h {
                    let gate = |q: usize| {
                        row[q * h + k] + rr[q * h + k] + rb.map_or(0.0, |v| v[q * h + k])
                    };
                    let cprev = ct[bi * h + k];
                    let (pi, po, pf) =
                        pp.map_or((0.0, 0.0, 0.0), |v| (v[k], v[h + k], v[2 * h + k]));
                    let i = f.apply(clip(&c, gate(0) + pi * cprev));
                    let fg = if input_forget {
                        1.0 - i
                    } else {
                        f.apply(clip(&c, gate(2) + pf * cprev))
                    };
                    let cc = g.apply(clip(&c, gate(3)));
                    let cn = fg * cprev + i * cc;
                    let o = f.apply(clip(&c, gate(1) + po * cn));
                    ct[bi * h + k] = cn;
                    ht[bi * h + k] = o * hact.apply(cn);
                }
                y[((t * c.dirs + dir) * b + bi) * h..((t * c.dirs + dir) * b + bi + 1) * h]
                    .copy_from_slice(&ht[bi * h..(bi + 1) * h]);
            }
        }
        hf[dir * b * h..(dir + 1) * b * h].copy_from_slice(&ht);
        cf[dir * b * h..(dir + 1) * b * h].copy_from_slice(&ct);
    }
    Ok(outputs(&c, y, vec![hf, cf], &like))
}

pub(crate) fn gru(ctx: &mut Ctx) -> R<Vec<Value>> {
    let c = common(ctx, 3)?;
    let like = ctx.t(0)?.clone();
    let (h, b) = (c.hidden, c.batch);
    let acts = activations(ctx, &[Act::Sigmoid, Act::Tanh], c.dirs)?;
    let lbr = ctx.ai("linear_before_reset", 0) != 0;
    let mut y = vec![0f32; c.seq * c.dirs * b * h];
    let mut hf = vec![0f32; c.dirs * b * h];
    for dir in 0..c.dirs {
        let (f, g) = (acts[dir * 2], acts[dir * 2 + 1]);
        let xw = project(&c, 3, dir);
        let r = &c.r[dir * 3 * h * h..(dir + 1) * 3 * h * h];
        let rb =
            c.b.as_ref()
                .map(|bb| &bb[dir * 6 * h + 3 * h..dir * 6 * h + 6 * h]);
        let mut ht = c.h0.as_ref().map_or(vec![0f32; b * h], |v| {
            v[dir * b * h..(dir + 1) * b * h].to_vec()
        });
        let mut hr = vec![0f32; b * 3 * h];
        for t in steps(&c, dir) {
            mm(b, 3 * h, h, &mut hr, &ht, (h, 1), r, (1, h), false, 1.0);
            let hprev = ht.clone();
            for bi in 0..b {
                if t >= c.lens[bi] {
                    continue;
                }
                let row = &xw[(t * b + bi) * 3 * h..(t * b + bi + 1) * 3 * h];
                let rr = &hr[bi * 3 * h..(bi + 1) * 3 * h];
                let hp = &hprev[bi * h..(bi + 1) * h];
                let rbv = |q: usize, k: usize| rb.map_or(0.0, |v| v[q * h + k]);
                let zr: Vec<(f32, f32)> = (0..h)
                    .map(|k| {
                        let z = f.apply(clip(&c, row[k] + rr[k] + rbv(0, k)));
                        let rg = f.apply(clip(&c, row[h + k] + rr[h + k] + rbv(1, k)));
                        (z, rg)
                    })
                    .collect();
                let hh: Vec<f32> = if lbr {
                    (0..h)
                        .map(|k| {
                            g.apply(clip(
                                &c,
                                row[2 * h + k] + zr[k].1 * (rr[2 * h + k] + rbv(2, k)),
                            ))
                        })
                        .collect()
                } else {
                    // (r . H) * Rh^T needs its own product.
                    let rh: Vec<f32> = (0..h).map(|k| zr[k].1 * hp[k]).collect();
                    let rrh = &r[2 * h * h..3 * h * h];
                    (0..h)
                        .map(|k| {
                            let dot: f32 = (0..h).map(|j| rh[j] * rrh[k * h + j]).sum();
                            g.apply(clip(&c, row[2 * h + k] + dot + rbv(2, k)))
                        })
                        .collect()
                };
                for k in 0..h {
                    ht[bi * h + k] = (1.0 - zr[k].0) * hh[k] + zr[k].0 * hp[k];
                }
                y[((t * c.dirs + dir) * b + bi) * h..((t * c.dirs + dir) * b + bi + 1) * h]
                    .copy_from_slice(&ht[bi * h..(bi + 1) * h]);
            }
        }
        hf[dir * b * h..(dir + 1) * b * h].copy_from_slice(&ht);
    }
    Ok(outputs(&c, y, vec![hf], &like))
}

pub(crate) fn rnn(ctx: &mut Ctx) -> R<Vec<Value>> {
    let c = common(ctx, 1)?;
    let like = ctx.t(0)?.clone();
    let (h, b) = (c.hidden, c.batch);
    let acts = activations(ctx, &[Act::Tanh], c.dirs)?;
    let mut y = vec![0f32; c.seq * c.dirs * b * h];
    let mut hf = vec![0f32; c.dirs * b * h];
    for dir in 0..c.dirs {
        let f = acts[dir];
        let xw = project(&c, 1, dir);
        let r = &c.r[dir * h * h..(dir + 1) * h * h];
        let rb =
            c.b.as_ref()
                .map(|bb| &bb[dir * 2 * h + h..dir * 2 * h + 2 * h]);
        let mut ht = c.h0.as_ref().map_or(vec![0f32; b * h], |v| {
            v[dir * b * h..(dir + 1) * b * h].to_vec()
        });
        let mut hr = vec![0f32; b * h];
        for t in steps(&c, dir) {
            mm(b, h, h, &mut hr, &ht, (h, 1), r, (1, h), false, 1.0);
            for bi in 0..b {
                if t >= c.lens[bi] {
                    continue;
                }
                for k in 0..h {
                    let v = xw[(t * b + bi) * h + k] + hr[bi * h + k] + rb.map_or(0.0, |v| v[k]);
                    ht[bi * h + k] = f.apply(clip(&c, v));
                }
                y[((t * c.dirs + dir) * b + bi) * h..((t * c.dirs + dir) * b + bi + 1) * h]
                    .copy_from_slice(&ht[bi * h..(bi + 1) * h]);
            }
        }
        hf[dir * b * h..(dir + 1) * b * h].copy_from_slice(&ht);
    }
    Ok(outputs(&c, y, vec![hf], &like))
}
