//! Control flow (If, Loop, Scan), sequences and optionals. Subgraphs run through the interpreter with the
//! node's implicit inputs as their outer scope.

use std::sync::Arc;

use mpopt_ir::DType;

use super::shape::{concat_t, narrow, transpose_t};
use super::{Ctx, R, axis, one};
use crate::{Tensor, Value, numel};

fn unwrap_all(v: Vec<Arc<Value>>) -> Vec<Value> {
    v.into_iter()
        .map(|a| Arc::try_unwrap(a).unwrap_or_else(|a| (*a).clone()))
        .collect()
}

fn truthy(t: &Tensor) -> R<bool> {
    match t.to_i64s()?.as_slice() {
        [x] => Ok(*x != 0),
        v => Err(format!("a condition must hold one value, got {}", v.len())),
    }
}

pub(crate) fn if_(ctx: &mut Ctx) -> R<Vec<Value>> {
    let c = truthy(ctx.t(0)?)?;
    let branch = if c { "then_branch" } else { "else_branch" };
    Ok(unwrap_all(ctx.sub.run(branch, Vec::new())?))
}

/// Stacks per-iteration tensors along a new axis `ax` (scan outputs).
fn stack(items: &[Tensor], ax: usize, dtype: DType) -> R<Tensor> {
    if items.is_empty() {
        return Ok(Tensor::new(vec![0], crate::Data::empty(dtype)?));
    }
    let expanded: Vec<Tensor> = items
        .iter()
        .map(|t| {
            let mut s = t.shape.clone();
            s.insert(ax.min(s.len()), 1);
            t.clone().reshaped(s)
        })
        .collect();
    let refs: Vec<&Tensor> = expanded.iter().collect();
    concat_t(&refs, ax.min(items[0].rank()))
}

pub(crate) fn loop_(ctx: &mut Ctx) -> R<Vec<Value>> {
    let max_trip = ctx
        .opt(0)
        .filter(|t| !t.is_empty())
        .map(|t| t.scalar_i64())
        .transpose()?;
    let mut cond = ctx
        .opt(1)
        .filter(|t| !t.is_empty())
        .map(truthy)
        .transpose()?
        .unwrap_or(true);
    let mut carried: Vec<Arc<Value>> = (2..ctx.n_in())
        .map(|i| {
            ctx.inputs[i]
                .clone()
                .ok_or_else(|| format!("loop-carried input {i} is missing"))
        })
        .collect::<R<_>>()?;
    let body = ctx.sub.graph("body").ok_or("Loop has no body")?;
    let n_carried = carried.len();
    let n_scan = body.outputs().len().saturating_sub(1 + n_carried);
    let mut scans: Vec<Vec<Value>> = vec![Vec::new(); n_scan];
    let mut i = 0i64;
    while max_trip.is_none_or(|m| i < m) && cond {
        let mut ins = vec![
            Arc::new(Value::Tensor(Tensor::i64(vec![], vec![i]))),
            Arc::new(Value::Tensor(Tensor::bool(vec![], vec![cond]))),
        ];
        ins.extend(carried.iter().cloned());
        let outs = ctx.sub.run("body", ins)?;
        cond = truthy(outs[0].tensor()?)?;
        carried = outs[1..1 + n_carried].to_vec();
        for (k, s) in outs[1 + n_carried..].iter().enumerate() {
            scans[k].push((**s).clone());
        }
        i += 1;
        if i > 10_000_000 {
            return Err("Loop ran 10,000,000 iterations; stopping".into());
        }
    }
    let mut res = unwrap_all(carried);
    for (k, s) in scans.into_iter().enumerate() {
        let tensors: Vec<Tensor> = s.into_iter().map(|v| v.into_tensor()).collect::<R<_>>()?;
        let dtype = body
            .outputs()
            .get(1 + n_carried + k)
            .and_then(|&o| body.value(o).elem())
            .or_else(|| tensors.first().map(|t| t.dtype()))
            .unwrap_or(DType::F32);
        // Sequence-typed scan outputs are not stacked.
        res.push(Value::Tensor(stack(&tensors, 0, dtype)?));
    }
    Ok(res)
}

/// The final states of a Scan, and each scan output's items.
type ScanResult = (Vec<Arc<Value>>, Vec<Vec<Tensor>>);

/// The iterations of a Scan body: `state` carried from one to the next, `scan_ins` (scan axis first) read
/// forward, or backward where `dirs` says 1, for `steps` iterations. The final states, and each scan
/// output's items in iteration order.
fn scan_steps(
    ctx: &Ctx,
    mut state: Vec<Arc<Value>>,
    scan_ins: &[Tensor],
    dirs: &[i64],
    steps: usize,
    n_out_scan: usize,
) -> R<ScanResult> {
    let n_state = state.len();
    let mut outs: Vec<Vec<Tensor>> = vec![Vec::new(); n_out_scan];
    for s in 0..steps {
        let mut ins = state.clone();
        for (k, t) in scan_ins.iter().enumerate() {
            let idx = if dirs.get(k) == Some(&1) {
                steps - 1 - s
            } else {
                s
            };
            let sl = narrow(t, 0, idx, 1);
            let shape = sl.shape[1..].to_vec();
            ins.push(Arc::new(Value::Tensor(sl.reshaped(shape))));
        }
        let res = ctx.sub.run("body", ins)?;
        state = res[..n_state].to_vec();
        for (k, v) in res[n_state..].iter().enumerate() {
            outs[k].push(v.tensor()?.clone());
        }
    }
    Ok((state, outs))
}

/// The dtype of the body's output `i`.
fn body_dtype(ctx: &Ctx, i: usize, fallback: Option<&Tensor>) -> R<DType> {
    let body = ctx.sub.graph("body").ok_or("Scan has no body")?;
    Ok(body
        .outputs()
        .get(i)
        .and_then(|&o| body.value(o).elem())
        .or_else(|| fallback.map(|t| t.dtype()))
        .unwrap_or(DType::F32))
}

/// (state variables, scan outputs) of a Scan node with `m` scan inputs after `first` leading inputs.
fn scan_counts(ctx: &Ctx, first: usize, m: usize) -> R<(usize, usize)> {
    let body = ctx.sub.graph("body").ok_or("Scan has no body")?;
    let n_in = ctx.n_in();
    let n_state = n_in
        .checked_sub(first + m)
        .ok_or_else(|| format!("num_scan_inputs {m} exceeds the {n_in} inputs"))?;
    let n_out_scan = body
        .outputs()
        .len()
        .checked_sub(n_state)
        .ok_or("the body has fewer outputs than state variables")?;
    Ok((n_state, n_out_scan))
}

pub(crate) fn scan(ctx: &mut Ctx) -> R<Vec<Value>> {
    if ctx.opset < 9 {
        return scan8(ctx);
    }
    let (m, n_in) = (ctx.ai("num_scan_inputs", 0) as usize, ctx.n_in());
    let (n_state, n_out_scan) = scan_counts(ctx, 0, m)?;
    let in_axes = ctx.ais("scan_input_axes").unwrap_or_else(|| vec![0; m]);
    let in_dirs = ctx
        .ais("scan_input_directions")
        .unwrap_or_else(|| vec![0; m]);
    let out_axes = ctx
        .ais("scan_output_axes")
        .unwrap_or_else(|| vec![0; n_out_scan]);
    let out_dirs = ctx
        .ais("scan_output_directions")
        .unwrap_or_else(|| vec![0; n_out_scan]);
    let state: Vec<Arc<Value>> = (0..n_state)
        .map(|i| {
            ctx.inputs[i]
                .clone()
                .ok_or("missing state input".to_string())
        })
        .collect::<R<_>>()?;
    let scan_ins: Vec<Tensor> = (n_state..n_in)
        .enumerate()
        .map(|(k, i)| {
            let t = ctx.t(i)?;
            if t.rank() == 0 {
                return Err(format!(
                    "scan input {k} is a scalar: it has no axis to scan"
                ));
            }
            let ax = axis(in_axes.get(k).copied().unwrap_or(0), t.rank())?;
            // Move the scan axis to the front.
            let mut perm: Vec<usize> = (0..t.rank()).collect();
            perm.remove(ax);
            perm.insert(0, ax);
            Ok(transpose_t(t, &perm))
        })
        .collect::<R<_>>()?;
    let steps = scan_ins.first().map_or(0, |t| t.shape[0]);
    if let Some(t) = scan_ins.iter().find(|t| t.shape[0] != steps) {
        return Err(format!(
            "scan inputs differ in length along their scan axes ({steps} and {})",
            t.shape[0]
        ));
    }
    let (state, outs) = scan_steps(ctx, state, &scan_ins, &in_dirs, steps, n_out_scan)?;
    let mut result = unwrap_all(state);
    for (k, mut items) in outs.into_iter().enumerate() {
        if out_dirs.get(k) == Some(&1) {
            items.reverse();
        }
        let st = stack(&items, 0, body_dtype(ctx, n_state + k, None)?)?;
        let r = st.rank();
        let ax = axis(out_axes.get(k).copied().unwrap_or(0), r)?;
        let t = if ax == 0 {
            st
        } else {
            let mut perm: Vec<usize> = (1..r).collect();
            perm.insert(ax, 0);
            transpose_t(&st, &perm)
        };
        result.push(Value::Tensor(t));
    }
    Ok(result)
}

/// Scan before opset 9: inputs `sequence_lens` (optional), the states and the scan inputs, all with a batch
/// axis 0; the scan inputs' axis 1 is the sequence. Each batch entry runs on its own for its length (the
/// maximum without `sequence_lens`); its scan outputs are padded with zeros to the maximum length.
fn scan8(ctx: &mut Ctx) -> R<Vec<Value>> {
    let (m, n_in) = (ctx.ai("num_scan_inputs", 0) as usize, ctx.n_in());
    let (n_state, n_out_scan) = scan_counts(ctx, 1, m)?;
    let dirs = ctx.ais("directions").unwrap_or_else(|| vec![0; m]);
    let states: Vec<Tensor> = (1..1 + n_state)
        .map(|i| ctx.t(i).cloned())
        .collect::<R<_>>()?;
    let scans: Vec<Tensor> = (1 + n_state..n_in)
        .map(|i| ctx.t(i).cloned())
        .collect::<R<_>>()?;
    let Some(lead) = scans.first().or(states.first()) else {
        return Ok(Vec::new());
    };
    let batch = *lead
        .shape
        .first()
        .ok_or("Scan-8 inputs need a batch axis")?;
    let max_len = match scans.first() {
        Some(t) => *t
            .shape
            .get(1)
            .ok_or("Scan-8 scan inputs need a sequence axis (axis 1)")?,
        None => 0,
    };
    if let Some(t) = states
        .iter()
        .chain(&scans)
        .find(|t| t.shape.first() != Some(&batch))
    {
        return Err(format!(
            "Scan-8 inputs must share the batch axis {batch}, one has shape {:?}",
            t.shape
        ));
    }
    if let Some(t) = scans.iter().find(|t| t.shape.get(1) != Some(&max_len)) {
        return Err(format!(
            "Scan-8 scan inputs must share the sequence axis {max_len}, one has shape {:?}",
            t.shape
        ));
    }
    let lens = match ctx.opt(0).filter(|t| !t.is_empty()) {
        Some(t) => t.to_i64s()?,
        None => vec![max_len as i64; batch],
    };
    if lens.len() != batch {
        return Err(format!(
            "sequence_lens holds {} lengths for a batch of {batch}",
            lens.len()
        ));
    }
    let row = |t: &Tensor, b: usize| {
        let sl = narrow(t, 0, b, 1);
        let shape = sl.shape[1..].to_vec();
        sl.reshaped(shape)
    };
    let mut final_states: Vec<Vec<Tensor>> = vec![Vec::new(); n_state];
    let mut outputs: Vec<Vec<Tensor>> = vec![Vec::new(); n_out_scan];
    for (b, &len) in lens.iter().enumerate() {
        if len < 0 || len as usize > max_len {
            return Err(format!(
                "sequence_lens[{b}] = {len} is outside 0..={max_len}"
            ));
        }
        let state = states
            .iter()
            .map(|t| Arc::new(Value::Tensor(row(t, b))))
            .collect();
        let ins: Vec<Tensor> = scans.iter().map(|t| row(t, b)).collect();
        let (state, outs) = scan_steps(ctx, state, &ins, &dirs, len as usize, n_out_scan)?;
        for (k, v) in state.iter().enumerate() {
            final_states[k].push(v.tensor()?.clone());
        }
        for (k, mut items) in outs.into_iter().enumerate() {
            if items.len() < max_len {
                let Some(first) = items.first() else {
                    return Err(format!(
                        "sequence_lens[{b}] is 0: the shape of scan output {k} is unknown"
                    ));
                };
                let pad = Tensor::new(
                    first.shape.clone(),
                    crate::Data::zeros(first.dtype(), first.len())?,
                );
                items.resize(max_len, pad);
            }
            outputs[k].push(stack(
                &items,
                0,
                body_dtype(ctx, n_state + k, items.first())?,
            )?);
        }
    }
    let mut result = Vec::new();
    for (k, items) in final_states.iter().enumerate() {
        result.push(Value::Tensor(stack(
            items,
            0,
            body_dtype(ctx, k, items.first())?,
        )?));
    }
    for (k, items) in outputs.iter().enumerate() {
        result.push(Value::Tensor(stack(
            items,
            0,
            body_dtype(ctx, n_state + k, items.first())?,
        )?));
    }
    Ok(result)
}

/// SequenceMap: the body runs once per element of the input sequence; each additional input is a
/// sequence of the same length (read element by element) or a tensor (passed whole every time). Each body
/// output becomes a sequence.
pub(crate) fn sequence_map(ctx: &mut Ctx) -> R<Vec<Value>> {
    let (items, _) = seq(ctx, 0)?;
    let n = items.len();
    let body = ctx.sub.graph("body").ok_or("SequenceMap has no body")?;
    let n_out = body.outputs().len();
    // per additional input: its elements, or the one value every iteration reads
    enum Extra<'a> {
        Each(&'a Vec<Tensor>),
        Whole(Arc<Value>),
    }
    let mut extras = Vec::new();
    for i in 1..ctx.n_in() {
        match ctx.val(i) {
            Some(Value::Seq(..)) | Some(Value::Opt(Some(_), _)) => {
                let (v, _) = seq(ctx, i)?;
                if v.len() != n {
                    return Err(format!(
                        "input {i} holds {} elements, the input sequence {n}",
                        v.len()
                    ));
                }
                extras.push(Extra::Each(v));
            }
            _ => extras.push(Extra::Whole(
                ctx.inputs[i]
                    .clone()
                    .ok_or_else(|| format!("input {i} is missing"))?,
            )),
        }
    }
    let mut outs: Vec<Vec<Tensor>> = vec![Vec::new(); n_out];
    for (k, item) in items.iter().enumerate() {
        let mut ins = vec![Arc::new(Value::Tensor(item.clone()))];
        for e in &extras {
            ins.push(match e {
                Extra::Each(v) => Arc::new(Value::Tensor(v[k].clone())),
                Extra::Whole(v) => Arc::clone(v),
            });
        }
        for (o, v) in outs.iter_mut().zip(ctx.sub.run("body", ins)?) {
            o.push(v.tensor()?.clone());
        }
    }
    outs.into_iter()
        .enumerate()
        .map(|(k, items)| {
            let dtype = body_dtype(ctx, k, items.first())?;
            Ok(Value::Seq(items, dtype))
        })
        .collect()
}

fn seq<'c>(ctx: &'c Ctx, i: usize) -> R<(&'c Vec<Tensor>, DType)> {
    match ctx.val(i) {
        Some(Value::Seq(v, d)) => Ok((v, *d)),
        Some(Value::Opt(Some(b), _)) => match b.as_ref() {
            Value::Seq(v, d) => Ok((v, *d)),
            _ => Err(format!("input {i} is not a sequence")),
        },
        _ => Err(format!("input {i} is not a sequence")),
    }
}

fn position(ctx: &Ctx, i: usize, len: usize, insert: bool) -> R<Option<usize>> {
    let Some(p) = ctx.opt(i).filter(|t| !t.is_empty()) else {
        return Ok(None);
    };
    let p = p.scalar_i64()?;
    let lim = if insert { len as i64 + 1 } else { len as i64 };
    let q = if p < 0 { p + len as i64 } else { p };
    if q < 0 || q >= lim {
        return Err(format!(
            "position {p} is out of range for a sequence of {len}"
        ));
    }
    Ok(Some(q as usize))
}

pub(crate) fn sequence_construct(ctx: &mut Ctx) -> R<Vec<Value>> {
    let ts: Vec<Tensor> = (0..ctx.n_in())
        .map(|i| ctx.t(i).cloned())
        .collect::<R<_>>()?;
    let d = ts.first().map_or(DType::F32, |t| t.dtype());
    Ok(vec![Value::Seq(ts, d)])
}
pub(crate) fn sequence_empty(ctx: &mut Ctx) -> R<Vec<Value>> {
    let d = DType::from_code(ctx.ai("dtype", 1) as i32).ok_or("unknown dtype")?;
    Ok(vec![Value::Seq(Vec::new(), d)])
}
pub(crate) fn sequence_at(ctx: &mut Ctx) -> R<Vec<Value>> {
    let (s, _) = seq(ctx, 0)?;
    let p = position(ctx, 1, s.len(), false)?.ok_or("position is required")?;
    one(s[p].clone())
}
pub(crate) fn sequence_insert(ctx: &mut Ctx) -> R<Vec<Value>> {
    let (s, d) = seq(ctx, 0)?;
    let t = ctx.t(1)?.clone();
    let mut s = s.clone();
    let p = position(ctx, 2, s.len(), true)?.unwrap_or(s.len());
    s.insert(p, t);
    Ok(vec![Value::Seq(s, d)])
}
pub(crate) fn sequence_erase(ctx: &mut Ctx) -> R<Vec<Value>> {
    let (s, d) = seq(ctx, 0)?;
    let mut s = s.clone();
    if s.is_empty() {
        return Err("cannot erase from an empty sequence".into());
    }
    let p = position(ctx, 1, s.len(), false)?.unwrap_or(s.len() - 1);
    s.remove(p);
    Ok(vec![Value::Seq(s, d)])
}
pub(crate) fn sequence_length(ctx: &mut Ctx) -> R<Vec<Value>> {
    let (s, _) = seq(ctx, 0)?;
    one(Tensor::i64(vec![], vec![s.len() as i64]))
}
pub(crate) fn concat_from_sequence(ctx: &mut Ctx) -> R<Vec<Value>> {
    let (s, d) = seq(ctx, 0)?;
    let new_axis = ctx.ai("new_axis", 0) != 0;
    let r = s.first().map_or(0, |t| t.rank());
    if new_axis {
        let ax = axis(ctx.ai("axis", 0), r + 1)?;
        return one(stack(s, ax, d)?);
    }
    let ax = axis(ctx.ai("axis", 0), r)?;
    let refs: Vec<&Tensor> = s.iter().collect();
    one(concat_t(&refs, ax)?)
}
pub(crate) fn split_to_sequence(ctx: &mut Ctx) -> R<Vec<Value>> {
    let t = ctx.t(0)?;
    let ax = super::dim_axis(ctx.ai("axis", 0), t.rank())?;
    let keep = ctx.ai("keepdims", 1) != 0;
    let dim = t.shape[ax];
    let mut parts = Vec::new();
    match ctx.opt(1) {
        None => {
            for i in 0..dim {
                let p = narrow(t, ax, i, 1);
                let p = if keep {
                    p
                } else {
                    let mut s = p.shape.clone();
                    s.remove(ax);
                    p.reshaped(s)
                };
                parts.push(p);
            }
        }
        Some(sp) => {
            let sizes: Vec<usize> = if sp.rank() == 0 {
                let each = sp.scalar_i64()? as usize;
                let n = dim.div_ceil(each.max(1));
                (0..n).map(|i| each.min(dim - i * each)).collect()
            } else {
                sp.to_i64s()?.iter().map(|&x| x as usize).collect()
            };
            let mut start = 0;
            for s in sizes {
                parts.push(narrow(t, ax, start, s));
                start += s;
            }
        }
    }
    let _ = numel(&t.shape);
    Ok(vec![Value::Seq(parts, t.dtype())])
}

pub(crate) fn optional(ctx: &mut Ctx) -> R<Vec<Value>> {
    match ctx.val(0) {
        Some(v) => {
            let d = match v {
                Value::Tensor(t) => t.dtype(),
                Value::Seq(_, d) | Value::Opt(_, d) => *d,
            };
            Ok(vec![Value::Opt(Some(Box::new(v.clone())), d)])
        }
        None => Ok(vec![Value::Opt(None, DType::F32)]),
    }
}
pub(crate) fn optional_has_element(ctx: &mut Ctx) -> R<Vec<Value>> {
    let has = match ctx.val(0) {
        None | Some(Value::Opt(None, _)) => false,
        Some(_) => true,
    };
    one(Tensor::bool(vec![], vec![has]))
}
pub(crate) fn optional_get_element(ctx: &mut Ctx) -> R<Vec<Value>> {
    match ctx.val(0) {
        Some(Value::Opt(Some(v), _)) => Ok(vec![(**v).clone()]),
        Some(Value::Opt(None, _)) | None => Err("the optional is empty".into()),
        Some(v) => Ok(vec![v.clone()]),
    }
}
