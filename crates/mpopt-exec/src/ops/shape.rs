//! Shape and data-movement kernels. They copy stored elements (any dtype, f16 bits untouched).

use mpopt_ir::DType;
use rayon::prelude::*;

use super::elementwise::{bcast_strides, broadcast_shape, cast_tensor};
use super::{Ctx, R, axis, one};
use crate::{Data, Tensor, Value, map_data, numel, strides, zip_same};

/// Copies `src` viewed with `offset` and per-dim element strides (may be 0 or negative) into a new buffer of
/// `shape`. The innermost dim copies a slice when its stride is 1.
pub(crate) fn strided_copy<T: Clone>(
    src: &[T],
    offset: usize,
    shape: &[usize],
    st: &[isize],
) -> Vec<T> {
    let n = numel(shape);
    let mut out = Vec::with_capacity(n);
    if n == 0 {
        return out;
    }
    if shape.is_empty() {
        out.push(src[offset].clone());
        return out;
    }
    let r = shape.len();
    let inner = shape[r - 1];
    let is = st[r - 1];
    let outer = n / inner;
    let mut idx = vec![0usize; r - 1];
    let mut cur = offset as isize;
    for _ in 0..outer {
        if is == 1 {
            out.extend_from_slice(&src[cur as usize..cur as usize + inner]);
        } else {
            let mut p = cur;
            for _ in 0..inner {
                out.push(src[p as usize].clone());
                p += is;
            }
        }
        for d in (0..r - 1).rev() {
            idx[d] += 1;
            cur += st[d];
            if idx[d] < shape[d] {
                break;
            }
            cur -= st[d] * idx[d] as isize;
            idx[d] = 0;
        }
    }
    out
}

fn view(t: &Tensor, offset: usize, shape: Vec<usize>, st: &[isize]) -> Tensor {
    let data = map_data!(&t.data, v => strided_copy(v, offset, &shape, st));
    Tensor::new(shape, data)
}

fn ints(ctx: &Ctx, i: usize) -> R<Vec<i64>> {
    ctx.t(i)?.to_i64s().map_err(|e| format!("input {i}: {e}"))
}

pub(crate) fn identity(ctx: &mut Ctx) -> R<Vec<Value>> {
    Ok(vec![ctx.val(0).ok_or("input 0 is required")?.clone()])
}

pub(crate) fn constant(ctx: &mut Ctx) -> R<Vec<Value>> {
    if let Some(t) = ctx.atensor("value")? {
        return one(t);
    }
    if ctx.has("value_float") {
        return one(Tensor::f32(vec![], vec![ctx.af("value_float", 0.0)]));
    }
    if let Some(v) = ctx.afs("value_floats") {
        return one(Tensor::f32(vec![v.len()], v));
    }
    if ctx.has("value_int") {
        return one(Tensor::i64(vec![], vec![ctx.ai("value_int", 0)]));
    }
    if let Some(v) = ctx.ais("value_ints") {
        return one(Tensor::i64(vec![v.len()], v));
    }
    if let Some(s) = ctx.as_str("value_string") {
        return one(Tensor::new(vec![], Data::Str(vec![s])));
    }
    if let Some(v) = ctx.astrs("value_strings") {
        return one(Tensor::new(vec![v.len()], Data::Str(v)));
    }
    Err("Constant has no supported value attribute (sparse_value is not supported)".into())
}

pub(crate) fn shape(ctx: &mut Ctx) -> R<Vec<Value>> {
    let t = ctx.t(0)?;
    let r = t.rank() as i64;
    let clampi = |x: i64| (if x < 0 { x + r } else { x }).clamp(0, r) as usize;
    let start = clampi(ctx.ai("start", 0));
    let end = if ctx.has("end") {
        clampi(ctx.ai("end", r))
    } else {
        r as usize
    };
    let dims: Vec<i64> = t.shape[start..end.max(start)]
        .iter()
        .map(|&d| d as i64)
        .collect();
    one(Tensor::i64(vec![dims.len()], dims))
}

pub(crate) fn size(ctx: &mut Ctx) -> R<Vec<Value>> {
    one(Tensor::i64(vec![], vec![ctx.t(0)?.len() as i64]))
}

/// Resolves a Reshape target (0 copies the input dim unless `allowzero`, -1 is inferred).
pub(crate) fn reshape_target(input: &[usize], target: &[i64], allowzero: bool) -> R<Vec<usize>> {
    let mut out = Vec::with_capacity(target.len());
    let mut infer = None;
    for (i, &d) in target.iter().enumerate() {
        match d {
            -1 if infer.is_none() => {
                infer = Some(i);
                out.push(1);
            }
            0 if !allowzero => {
                out.push(*input.get(i).ok_or_else(|| {
                    format!("target {target:?}: dim {i} copies a missing input dim")
                })?)
            }
            d if d >= 0 => out.push(d as usize),
            _ => return Err(format!("invalid reshape target {target:?}")),
        }
    }
    let n = numel(input);
    if let Some(i) = infer {
        let rest: usize = out.iter().product();
        if rest == 0 || !n.is_multiple_of(rest) {
            return Err(format!("cannot reshape {input:?} to {target:?}"));
        }
        out[i] = n / rest;
    }
    if numel(&out) != n {
        return Err(format!(
            "cannot reshape {input:?} ({n} elements) to {target:?}"
        ));
    }
    Ok(out)
}

pub(crate) fn reshape(ctx: &mut Ctx) -> R<Vec<Value>> {
    let t = ctx.t(0)?;
    let target = if ctx.opset < 5 {
        ctx.ais("shape").unwrap_or_default()
    } else {
        ints(ctx, 1)?
    };
    let s = reshape_target(&t.shape, &target, ctx.ai("allowzero", 0) != 0)?;
    one(t.clone().reshaped(s))
}

pub(crate) fn flatten(ctx: &mut Ctx) -> R<Vec<Value>> {
    let t = ctx.t(0)?;
    let a = ctx.ai("axis", 1);
    let a = if a < 0 { a + t.rank() as i64 } else { a };
    if a < 0 || a > t.rank() as i64 {
        return Err(format!("axis {a} out of range for rank {}", t.rank()));
    }
    let a = a as usize;
    let s = vec![numel(&t.shape[..a]), numel(&t.shape[a..])];
    one(t.clone().reshaped(s))
}

fn axes_of(ctx: &Ctx, input: usize) -> R<Option<Vec<i64>>> {
    if ctx.opset >= 13 {
        ctx.opt(input)
            .filter(|t| !t.is_empty() || t.rank() == 1)
            .map(|t| t.to_i64s())
            .transpose()
    } else {
        Ok(ctx.ais("axes"))
    }
}

pub(crate) fn squeeze(ctx: &mut Ctx) -> R<Vec<Value>> {
    let t = ctx.t(0)?;
    let axes = axes_of(ctx, 1)?;
    let shape: Vec<usize> = match axes {
        None => t.shape.iter().copied().filter(|&d| d != 1).collect(),
        Some(ax) => {
            let ax: Vec<usize> = ax.iter().map(|&a| axis(a, t.rank())).collect::<R<_>>()?;
            for &a in &ax {
                if t.shape[a] != 1 {
                    return Err(format!("cannot squeeze axis {a} of shape {:?}", t.shape));
                }
            }
            t.shape
                .iter()
                .enumerate()
                .filter(|(i, _)| !ax.contains(i))
                .map(|(_, &d)| d)
                .collect()
        }
    };
    one(t.clone().reshaped(shape))
}

pub(crate) fn unsqueeze(ctx: &mut Ctx) -> R<Vec<Value>> {
    let t = ctx.t(0)?;
    let ax = axes_of(ctx, 1)?.ok_or("Unsqueeze needs axes")?;
    let r = t.rank() + ax.len();
    let mut ax: Vec<usize> = ax.iter().map(|&a| axis(a, r)).collect::<R<_>>()?;
    ax.sort_unstable();
    let mut shape = Vec::with_capacity(r);
    let mut src = t.shape.iter();
    for i in 0..r {
        if ax.binary_search(&i).is_ok() {
            shape.push(1);
        } else {
            shape.push(*src.next().ok_or("duplicate axes")?);
        }
    }
    one(t.clone().reshaped(shape))
}

/// Transposes with a permutation. Dims that stay adjacent are merged first; a (batched) 2-D transpose is
/// copied in cache-sized tiles, in parallel over the batch, and anything else goes through `strided_copy`.
pub(crate) fn transpose_t(t: &Tensor, perm: &[usize]) -> Tensor {
    let shape: Vec<usize> = perm.iter().map(|&p| t.shape[p]).collect();
    // Input dims of size > 1, ranked in input order; runs of consecutive ranks in the output merge into one dim.
    let mut kept: Vec<usize> = perm.iter().copied().filter(|&p| t.shape[p] != 1).collect();
    let mut sorted = kept.clone();
    sorted.sort_unstable();
    for p in kept.iter_mut() {
        *p = sorted.binary_search(p).expect("present");
    }
    let mut groups: Vec<(usize, usize)> = Vec::new(); // (first rank, element count)
    let mut last_rank = usize::MAX;
    for &k in &kept {
        let size = t.shape[sorted[k]];
        match groups.last_mut() {
            Some(g) if last_rank.wrapping_add(1) == k => g.1 *= size,
            _ => groups.push((k, size)),
        }
        last_rank = k;
    }
    match groups.len() {
        0 | 1 => return t.clone().reshaped(shape),
        2 => {
            // [R, C] -> [C, R]
            let data = map_data!(&t.data, v => transpose2d(v, groups[1].1, groups[0].1));
            return Tensor::new(shape, data);
        }
        3 if groups[0].0 == 0 => {
            // [B, R, C] -> [B, C, R]
            let data = map_data!(&t.data, v => transpose2d(v, groups[2].1, groups[1].1));
            return Tensor::new(shape, data);
        }
        _ => {}
    }
    let st = strides(&t.shape);
    let pst: Vec<isize> = perm.iter().map(|&p| st[p] as isize).collect();
    view(t, 0, shape, &pst)
}

/// Batches of a rows x cols matrix (`v.len()` / (rows x cols) of them), transposed in 32 x 32 tiles. Work is
/// split by bands of 32 output rows, so one large matrix (batch 1) still uses every thread.
fn transpose2d<T: Clone + Send + Sync>(v: &[T], rows: usize, cols: usize) -> Vec<T> {
    const TILE: usize = 32;
    let plane = rows * cols;
    if plane == 0 {
        return Vec::new();
    }
    let mut out: Vec<T> = Vec::with_capacity(v.len());
    out.spare_capacity_mut()[..v.len()]
        .par_chunks_mut(plane)
        .zip(v.par_chunks(plane))
        .for_each(|(o, src)| {
            o.par_chunks_mut(TILE * rows)
                .enumerate()
                .for_each(|(band, o)| {
                    let c0 = band * TILE;
                    let c1 = (c0 + TILE).min(cols);
                    for r0 in (0..rows).step_by(TILE) {
                        let r1 = (r0 + TILE).min(rows);
                        for c in c0..c1 {
                            let dst = &mut o[(c - c0) * rows + r0..(c - c0) * rows + r1];
                            for (r, d) in (r0..r1).zip(dst) {
                                d.write(src[r * cols + c].clone());
                            }
                        }
                    }
                });
        });
    // SAFETY: the bands cover every output row of every plane, and each band writes each of its rows' `rows`
    // elements, so all `v.len()` elements are initialized.
    unsafe { out.set_len(v.len()) };
    out
}

pub(crate) fn transpose(ctx: &mut Ctx) -> R<Vec<Value>> {
    let t = ctx.t(0)?;
    let perm: Vec<usize> = match ctx.ais("perm") {
        Some(p) => p.iter().map(|&a| axis(a, t.rank())).collect::<R<_>>()?,
        None => (0..t.rank()).rev().collect(),
    };
    let mut seen = vec![false; t.rank()];
    if perm.len() != t.rank() || perm.iter().any(|&p| std::mem::replace(&mut seen[p], true)) {
        return Err(format!(
            "perm {perm:?} is not a permutation of the {} axes",
            t.rank()
        ));
    }
    one(transpose_t(t, &perm))
}

/// Concatenates along `ax`.
pub(crate) fn concat_t(ts: &[&Tensor], ax: usize) -> R<Tensor> {
    let first = ts.first().ok_or("Concat needs inputs")?;
    if ax >= first.rank() {
        return Err(format!(
            "axis {ax} is out of range for inputs of shape {:?}",
            first.shape
        ));
    }
    let mut shape = first.shape.clone();
    shape[ax] = 0;
    for t in ts {
        if t.rank() != first.rank() || t.dtype() != first.dtype() {
            return Err(format!(
                "inputs {:?} {} and {:?} {} do not concatenate",
                first.shape,
                first.dtype(),
                t.shape,
                t.dtype()
            ));
        }
        for d in 0..t.rank() {
            if d != ax && t.shape[d] != first.shape[d] {
                return Err(format!(
                    "shapes {:?} and {:?} differ off the axis",
                    first.shape, t.shape
                ));
            }
        }
        shape[ax] += t.shape[ax];
    }
    let outer = numel(&shape[..ax]);
    let chunks: Vec<usize> = ts.iter().map(|t| numel(&t.shape[ax..])).collect();
    let n = numel(&shape);
    let mut data = Data::empty(first.dtype())?;
    crate::tensor::reserve(&mut data, n);
    for o in 0..outer {
        for (t, &c) in ts.iter().zip(&chunks) {
            crate::tensor::extend_from(&mut data, &t.data, o * c, c)?;
        }
    }
    Ok(Tensor::new(shape, data))
}

pub(crate) fn concat(ctx: &mut Ctx) -> R<Vec<Value>> {
    let ts: Vec<&Tensor> = (0..ctx.n_in()).map(|i| ctx.t(i)).collect::<R<_>>()?;
    let r = ts.first().ok_or("Concat needs inputs")?.rank();
    let ax = axis(ctx.ai("axis", 0), r)?;
    // Empty inputs with a different rank are allowed by some exporters: skip those with no elements.
    let kept: Vec<&Tensor> = ts
        .iter()
        .copied()
        .filter(|t| !(t.is_empty() && t.rank() != r))
        .collect();
    one(concat_t(&kept, ax)?)
}

/// Slices `t` along `ax` from `start` with `len` elements (a copy). The caller keeps
/// `start + len <= t.shape[ax]`.
pub fn narrow(t: &Tensor, ax: usize, start: usize, len: usize) -> Tensor {
    let st = strides(&t.shape);
    let mut shape = t.shape.clone();
    shape[ax] = len;
    let ist: Vec<isize> = st.iter().map(|&s| s as isize).collect();
    view(t, start * st[ax], shape, &ist)
}

pub(crate) fn split(ctx: &mut Ctx) -> R<Vec<Value>> {
    let t = ctx.t(0)?;
    if t.rank() == 0 {
        return Err("Split of a scalar: the input needs an axis".into());
    }
    let ax = axis(ctx.ai("axis", 0), t.rank())?;
    let n_out = ctx.node.outputs().len();
    let dim = t.shape[ax];
    let given = if let Some(s) = ctx.opt(1).filter(|_| ctx.opset >= 13) {
        Some(s.to_i64s()?)
    } else {
        ctx.ais("split")
    };
    let sizes: Vec<usize> = if let Some(s) = given {
        if s.iter().any(|&x| x < 0) {
            return Err(format!("split sizes {s:?} are negative"));
        }
        s.iter().map(|&x| x as usize).collect()
    } else {
        let parts = if ctx.has("num_outputs") {
            let k = ctx.ai("num_outputs", 1);
            if k < 1 || k as usize != n_out {
                return Err(format!(
                    "num_outputs {k} does not match the node's {n_out} outputs"
                ));
            }
            k as usize
        } else {
            n_out
        };
        let each = dim.div_ceil(parts.max(1));
        (0..parts)
            .map(|i| each.min(dim.saturating_sub(i * each)))
            .collect()
    };
    if sizes.iter().sum::<usize>() != dim {
        return Err(format!("split sizes {sizes:?} do not add up to dim {dim}"));
    }
    let mut start = 0;
    let mut out = Vec::new();
    for s in sizes {
        out.push(Value::Tensor(narrow(t, ax, start, s)));
        start += s;
    }
    Ok(out)
}

pub(crate) fn slice(ctx: &mut Ctx) -> R<Vec<Value>> {
    let t = ctx.t(0)?;
    let r = t.rank();
    let (starts, ends, axes, steps) = if ctx.opset < 10 {
        (
            ctx.ais("starts").unwrap_or_default(),
            ctx.ais("ends").unwrap_or_default(),
            ctx.ais("axes"),
            None,
        )
    } else {
        (
            ints(ctx, 1)?,
            ints(ctx, 2)?,
            ctx.opt(3).map(|t| t.to_i64s()).transpose()?,
            ctx.opt(4).map(|t| t.to_i64s()).transpose()?,
        )
    };
    let axes: Vec<usize> = match axes {
        Some(a) => a.iter().map(|&x| axis(x, r)).collect::<R<_>>()?,
        None => (0..starts.len()).collect(),
    };
    let steps = steps.unwrap_or_else(|| vec![1; starts.len()]);
    let st = strides(&t.shape);
    let mut shape = t.shape.clone();
    let mut sst: Vec<isize> = st.iter().map(|&s| s as isize).collect();
    let mut offset = 0usize;
    for (k, &ax) in axes.iter().enumerate() {
        let dim = t.shape[ax] as i64;
        let step = *steps.get(k).ok_or("steps shorter than starts")?;
        if step == 0 {
            return Err("slice step 0".into());
        }
        let (mut s, mut e) = (starts[k], *ends.get(k).ok_or("ends shorter than starts")?);
        if s < 0 {
            s += dim;
        }
        if e < 0 {
            e += dim;
        }
        let (s, e) = if step > 0 {
            (s.clamp(0, dim), e.clamp(0, dim))
        } else {
            (s.clamp(0, dim - 1), e.clamp(-1, dim - 1))
        };
        let len = if step > 0 {
            if e > s { (e - s + step - 1) / step } else { 0 }
        } else if s > e {
            (s - e + (-step) - 1) / (-step)
        } else {
            0
        };
        shape[ax] = len as usize;
        if len > 0 {
            offset += s as usize * st[ax];
        }
        sst[ax] = st[ax] as isize * step as isize;
    }
    one(view(t, offset, shape, &sst))
}

pub(crate) fn gather(ctx: &mut Ctx) -> R<Vec<Value>> {
    let (t, ix) = (ctx.t(0)?, ctx.t(1)?);
    if t.rank() == 0 {
        return Err("Gather of a scalar: the data needs an axis".into());
    }
    let ax = axis(ctx.ai("axis", 0), t.rank())?;
    let dim = t.shape[ax] as i64;
    let idx: Vec<usize> = ix
        .to_i64s()?
        .iter()
        .map(|&i| {
            let j = if i < 0 { i + dim } else { i };
            if (0..dim).contains(&j) {
                Ok(j as usize)
            } else {
                Err(format!("index {i} is out of range for dim {dim}"))
            }
        })
        .collect::<R<_>>()?;
    let outer = numel(&t.shape[..ax]);
    let inner = numel(&t.shape[ax + 1..]);
    let mut shape: Vec<usize> = t.shape[..ax].to_vec();
    shape.extend_from_slice(&ix.shape);
    shape.extend_from_slice(&t.shape[ax + 1..]);
    let data = map_data!(&t.data, v => {
        let mut out = Vec::with_capacity(numel(&shape));
        for o in 0..outer {
            for &i in &idx {
                let s = (o * dim as usize + i) * inner;
                out.extend_from_slice(&v[s..s + inner]);
            }
        }
        out
    });
    one(Tensor::new(shape, data))
}

fn norm_index(i: i64, dim: usize) -> R<usize> {
    let j = if i < 0 { i + dim as i64 } else { i };
    if (0..dim as i64).contains(&j) {
        Ok(j as usize)
    } else {
        Err(format!("index {i} is out of range for dim {dim}"))
    }
}

/// Unravels a flat index into coordinates.
fn unravel(mut f: usize, shape: &[usize], out: &mut [usize]) {
    for d in (0..shape.len()).rev() {
        out[d] = f % shape[d].max(1);
        f /= shape[d].max(1);
    }
}

pub(crate) fn gather_elements(ctx: &mut Ctx) -> R<Vec<Value>> {
    let (t, ix) = (ctx.t(0)?, ctx.t(1)?);
    let ax = axis(ctx.ai("axis", 0), t.rank())?;
    let idx = ix.to_i64s()?;
    let st = strides(&t.shape);
    let mut coord = vec![0; ix.rank()];
    let offs: Vec<usize> = (0..idx.len())
        .map(|f| {
            unravel(f, &ix.shape, &mut coord);
            let mut off = 0;
            for d in 0..coord.len() {
                let c = if d == ax {
                    norm_index(idx[f], t.shape[ax])?
                } else {
                    coord[d]
                };
                off += c * st[d];
            }
            Ok(off)
        })
        .collect::<R<_>>()?;
    let data = map_data!(&t.data, v => offs.iter().map(|&o| v[o].clone()).collect());
    one(Tensor::new(ix.shape.clone(), data))
}

pub(crate) fn gather_nd(ctx: &mut Ctx) -> R<Vec<Value>> {
    let (t, ix) = (ctx.t(0)?, ctx.t(1)?);
    let idx = ix.to_i64s()?;
    let k = *ix.shape.last().ok_or("indices must have rank >= 1")?;
    let b = ctx.ai("batch_dims", 0);
    if b < 0
        || b as usize >= ix.rank()
        || b as usize + k > t.rank()
        || t.shape[..b as usize] != ix.shape[..b as usize]
    {
        return Err(format!(
            "GatherND batch_dims {b} with indices {:?} (last dim {k}) does not fit data {:?}",
            ix.shape, t.shape
        ));
    }
    let b = b as usize;
    let batch = numel(&t.shape[..b]);
    let inner = numel(&t.shape[b + k..]);
    let per_batch = numel(&t.shape[b..]);
    let n_idx = numel(&ix.shape[b..ix.rank() - 1]);
    let st = strides(&t.shape[b..]);
    let mut shape: Vec<usize> = ix.shape[..ix.rank() - 1].to_vec();
    shape.extend_from_slice(&t.shape[b + k..]);
    let mut starts = Vec::with_capacity(batch * n_idx);
    for bi in 0..batch {
        for j in 0..n_idx {
            let base = (bi * n_idx + j) * k;
            let mut off = bi * per_batch;
            for d in 0..k {
                off += norm_index(idx[base + d], t.shape[b + d])? * st[d];
            }
            starts.push(off);
        }
    }
    let data = map_data!(&t.data, v => {
        let mut out = Vec::with_capacity(starts.len() * inner);
        for &s in &starts {
            out.extend_from_slice(&v[s..s + inner]);
        }
        out
    });
    one(Tensor::new(shape, data))
}

fn reduce_into(dst: &mut Tensor, off: usize, src: &Tensor, i: usize, red: &str) -> R<()> {
    if red == "none" {
        let d = std::mem::replace(&mut dst.data, Data::Bool(vec![]));
        dst.data = zip_same!(d, &src.data, |a, b| {
            let mut a = a;
            a[off] = b[i].clone();
            a
        })?;
        return Ok(());
    }
    let a = dst.to_f64s()?[off];
    let b = src.to_f64s()?[i];
    let r = match red {
        "add" => a + b,
        "mul" => a * b,
        "max" => a.max(b),
        "min" => a.min(b),
        _ => return Err(format!("unknown reduction '{red}'")),
    };
    let one_val = cast_tensor(&Tensor::new(vec![1], Data::F64(vec![r])), dst.dtype())?;
    let d = std::mem::replace(&mut dst.data, Data::Bool(vec![]));
    dst.data = zip_same!(d, &one_val.data, |a, b| {
        let mut a = a;
        a[off] = b[0].clone();
        a
    })?;
    Ok(())
}

pub(crate) fn scatter_elements(ctx: &mut Ctx) -> R<Vec<Value>> {
    let (t, ix, up) = (ctx.t(0)?, ctx.t(1)?, ctx.t(2)?);
    let ax = axis(ctx.ai("axis", 0), t.rank())?;
    let red = ctx.as_str("reduction").unwrap_or_else(|| "none".into());
    let idx = ix.to_i64s()?;
    let st = strides(&t.shape);
    let mut out = t.clone();
    let mut coord = vec![0; ix.rank()];
    for (f, &i) in idx.iter().enumerate() {
        unravel(f, &ix.shape, &mut coord);
        let mut off = 0;
        for d in 0..coord.len() {
            let c = if d == ax {
                norm_index(i, t.shape[ax])?
            } else {
                coord[d]
            };
            off += c * st[d];
        }
        reduce_into(&mut out, off, up, f, &red)?;
    }
    one(out)
}

pub(crate) fn scatter_nd(ctx: &mut Ctx) -> R<Vec<Value>> {
    let (t, ix, up) = (ctx.t(0)?, ctx.t(1)?, ctx.t(2)?);
    let red = ctx.as_str("reduction").unwrap_or_else(|| "none".into());
    let idx = ix.to_i64s()?;
    let k = *ix.shape.last().ok_or("indices must have rank >= 1")?;
    let inner = numel(&t.shape[k..]);
    let st = strides(&t.shape);
    let n = numel(&ix.shape[..ix.rank() - 1]);
    let mut out = t.clone();
    for j in 0..n {
        let mut off = 0;
        for d in 0..k {
            off += norm_index(idx[j * k + d], t.shape[d])? * st[d];
        }
        for e in 0..inner {
            reduce_into(&mut out, off + e, up, j * inner + e, &red)?;
        }
    }
    one(out)
}

/// Broadcasts `t` to `shape`.
pub(crate) fn expand_to(t: &Tensor, shape: &[usize]) -> R<Tensor> {
    let out = broadcast_shape(&t.shape, shape)?;
    let st: Vec<isize> = bcast_strides(&t.shape, &out)
        .iter()
        .map(|&s| s as isize)
        .collect();
    Ok(view(t, 0, out, &st))
}

pub(crate) fn expand(ctx: &mut Ctx) -> R<Vec<Value>> {
    let t = ctx.t(0)?;
    let s: Vec<usize> = ints(ctx, 1)?.iter().map(|&d| d.max(0) as usize).collect();
    let out = broadcast_shape(&t.shape, &s)?;
    crate::tensor::bounded_numel(&out)?;
    one(expand_to(t, &s)?)
}

pub(crate) fn tile(ctx: &mut Ctx) -> R<Vec<Value>> {
    let t = ctx.t(0)?;
    let reps = ints(ctx, 1)?;
    if reps.len() != t.rank() {
        return Err(format!("repeats {reps:?} do not match rank {}", t.rank()));
    }
    let shape: Vec<usize> = t
        .shape
        .iter()
        .zip(&reps)
        .map(|(&d, &r)| d.saturating_mul(r.max(0) as usize))
        .collect();
    crate::tensor::bounded_numel(&shape)?;
    let st = strides(&t.shape);
    let mut coord = vec![0; shape.len()];
    let offs: Vec<usize> = (0..numel(&shape))
        .map(|f| {
            unravel(f, &shape, &mut coord);
            coord
                .iter()
                .zip(&t.shape)
                .zip(&st)
                .map(|((&c, &d), &s)| (c % d) * s)
                .sum()
        })
        .collect();
    let data = map_data!(&t.data, v => offs.iter().map(|&o| v[o].clone()).collect());
    one(Tensor::new(shape, data))
}

pub(crate) fn pad(ctx: &mut Ctx) -> R<Vec<Value>> {
    let t = ctx.t(0)?;
    let r = t.rank();
    let mode = ctx.as_str("mode").unwrap_or_else(|| "constant".into());
    let (pads, fill, axes) = if ctx.opset < 11 {
        (
            ctx.ais("pads").unwrap_or_default(),
            Some(cast_tensor(
                &Tensor::f32(vec![], vec![ctx.af("value", 0.0)]),
                t.dtype(),
            )?),
            None,
        )
    } else {
        (
            ints(ctx, 1)?,
            ctx.opt(2).filter(|v| !v.is_empty()).cloned(),
            ctx.opt(3).map(|a| a.to_i64s()).transpose()?,
        )
    };
    let axes: Vec<usize> = match axes {
        Some(a) => a.iter().map(|&x| axis(x, r)).collect::<R<_>>()?,
        None => (0..r).collect(),
    };
    if pads.len() != 2 * axes.len() {
        return Err(format!("pads {pads:?} do not match {} axes", axes.len()));
    }
    let mut before = vec![0i64; r];
    let mut after = vec![0i64; r];
    for (k, &a) in axes.iter().enumerate() {
        before[a] = pads[k];
        after[a] = pads[k + axes.len()];
    }
    let shape: Vec<usize> = (0..r)
        .map(|d| {
            let n = t.shape[d] as i64 + before[d] + after[d];
            if n < 0 {
                Err(format!("pads {pads:?} make a negative dim"))
            } else {
                Ok(n as usize)
            }
        })
        .collect::<R<_>>()?;
    let fill = match fill {
        Some(f) => f,
        None => Tensor::new(vec![1], Data::zeros(t.dtype(), 1)?),
    };
    if r == 0 {
        return one(t.clone());
    }
    // In constant mode, trailing dims without padding merge into the last padded one (a block of `inner`
    // elements moves as one), so an output row is fill, one contiguous copy, fill.
    let last_padded = (0..r).rev().find(|&d| before[d] != 0 || after[d] != 0);
    let (mut src_shape, mut out_shape) = (t.shape.clone(), shape.clone());
    if mode == "constant"
        && let Some(p) = last_padded
        && p + 1 < r
    {
        let inner = numel(&t.shape[p + 1..]);
        src_shape.truncate(p + 1);
        out_shape.truncate(p + 1);
        src_shape[p] *= inner;
        out_shape[p] *= inner;
        before[p] *= inner as i64;
        after[p] *= inner as i64;
        before.truncate(p + 1);
        after.truncate(p + 1);
    }
    let rr = src_shape.len();
    let st = strides(&src_shape);
    let last = rr - 1;
    // The source index along one dim for an output index, or None for the fill value.
    let source = |d: usize, o: usize| -> Option<usize> {
        let n = src_shape[d] as i64;
        let mut i = o as i64 - before[d];
        if i < 0 || i >= n {
            if n == 0 {
                return None;
            }
            match mode.as_str() {
                "edge" => i = i.clamp(0, n - 1),
                "wrap" => i = i.rem_euclid(n),
                "reflect" => {
                    if n == 1 {
                        i = 0;
                    } else {
                        let p = 2 * (n - 1);
                        i = i.rem_euclid(p);
                        if i >= n {
                            i = p - i;
                        }
                    }
                }
                _ => return None,
            }
        }
        Some(i as usize)
    };
    let width = out_shape[last];
    let cols: Vec<Option<usize>> = (0..width).map(|c| source(last, c)).collect();
    // The columns that copy one contiguous source run (all of them in constant mode).
    let run = {
        let lo = cols.iter().position(Option::is_some).unwrap_or(0);
        let hi = cols.iter().rposition(Option::is_some).map_or(lo, |h| h + 1);
        // The first source column (0 when every column is fill, or the row is empty).
        let first = cols.get(lo).copied().flatten().unwrap_or(0);
        let contiguous = cols[lo..hi]
            .iter()
            .enumerate()
            .all(|(k, c)| *c == Some(first + k));
        let only_fill_outside = cols[..lo].iter().chain(&cols[hi..]).all(Option::is_none);
        (contiguous && only_fill_outside).then_some((lo, hi, first))
    };
    let rows = numel(&out_shape[..last]);
    let mut coord = vec![0; last];
    let row_src: Vec<Option<usize>> = (0..rows)
        .map(|row| {
            unravel(row, &out_shape[..last], &mut coord);
            let mut off = 0;
            for d in 0..last {
                off += source(d, coord[d])? * st[d];
            }
            Some(off)
        })
        .collect();
    let data = zip_same!(&t.data, &fill.data, |v, f| {
        let mut out = vec![f[0].clone(); numel(&shape)];
        if width > 0 {
            out.par_chunks_mut(width).zip(&row_src).for_each(|(o, rs)| {
                let Some(base) = *rs else { return };
                match run {
                    Some((lo, hi, first)) => {
                        o[lo..hi].clone_from_slice(&v[base + first..base + first + (hi - lo)])
                    }
                    None => {
                        for (d, c) in o.iter_mut().zip(&cols) {
                            if let Some(i) = c {
                                *d = v[base + i].clone();
                            }
                        }
                    }
                }
            });
        }
        out
    })?;
    one(Tensor::new(shape, data))
}

pub(crate) fn constant_of_shape(ctx: &mut Ctx) -> R<Vec<Value>> {
    let s: Vec<usize> = ints(ctx, 0)?.iter().map(|&d| d.max(0) as usize).collect();
    let v = ctx
        .atensor("value")?
        .unwrap_or_else(|| Tensor::f32(vec![1], vec![0.0]));
    if v.len() != 1 {
        return Err("value must hold one element".into());
    }
    let n = crate::tensor::bounded_numel(&s)?;
    let data = map_data!(&v.data, x => vec![x[0].clone(); n]);
    one(Tensor::new(s, data))
}

pub(crate) fn range(ctx: &mut Ctx) -> R<Vec<Value>> {
    let (s, l, d) = (ctx.t(0)?, ctx.t(1)?, ctx.t(2)?);
    let dt = s.dtype();
    if s.data.is_float() {
        let (a, b, c) = (s.scalar_f64()?, l.scalar_f64()?, d.scalar_f64()?);
        let n = ((b - a) / c).ceil().max(0.0);
        // NaN (a NaN bound or delta) fails this too
        if n.is_nan() || n > crate::tensor::MAX_ELEMENTS as f64 {
            return Err(format!(
                "Range({a}, {b}, {c}) has {n} elements: more than 2^32"
            ));
        }
        let n = n as usize;
        let v: Vec<f64> = (0..n).map(|i| a + i as f64 * c).collect();
        if dt == DType::F32 {
            let (a, c) = (a as f32, c as f32);
            return one(Tensor::f32(
                vec![n],
                (0..n).map(|i| a + i as f32 * c).collect(),
            ));
        }
        return one(cast_tensor(&Tensor::new(vec![n], Data::F64(v)), dt)?);
    }
    let (a, b, c) = (s.scalar_i64()?, l.scalar_i64()?, d.scalar_i64()?);
    if c == 0 {
        return Err("Range delta is 0".into());
    }
    let (a128, b128, c128) = (a as i128, b as i128, c as i128);
    let n = if (c > 0 && b > a) || (c < 0 && b < a) {
        ((b128 - a128).abs() + c128.abs() - 1) / c128.abs()
    } else {
        0
    };
    if n > crate::tensor::MAX_ELEMENTS as i128 {
        return Err(format!(
            "Range({a}, {b}, {c}) has {n} elements: more than 2^32"
        ));
    }
    let n = n as i64;
    let v: Vec<i64> = (0..n).map(|i| a.wrapping_add(i.wrapping_mul(c))).collect();
    one(cast_tensor(&Tensor::i64(vec![n as usize], v), dt)?)
}

pub(crate) fn non_zero(ctx: &mut Ctx) -> R<Vec<Value>> {
    let t = ctx.t(0)?;
    let nz: Vec<bool> = match &t.data {
        Data::Bool(v) => v.clone(),
        Data::Str(v) => v.iter().map(|s| !s.is_empty()).collect(),
        _ => t.to_f64s()?.iter().map(|&x| x != 0.0).collect(),
    };
    let r = t.rank().max(1);
    let shape = if t.rank() == 0 {
        vec![1]
    } else {
        t.shape.clone()
    };
    let hits: Vec<usize> = nz
        .iter()
        .enumerate()
        .filter(|(_, b)| **b)
        .map(|(i, _)| i)
        .collect();
    let mut out = vec![0i64; r * hits.len()];
    let mut coord = vec![0; r];
    for (k, &f) in hits.iter().enumerate() {
        unravel(f, &shape, &mut coord);
        for d in 0..r {
            out[d * hits.len() + k] = coord[d] as i64;
        }
    }
    let rows = if t.rank() == 0 { 0 } else { r };
    let out = if rows == 0 { Vec::new() } else { out };
    one(Tensor::i64(vec![rows, hits.len()], out))
}

pub(crate) fn one_hot(ctx: &mut Ctx) -> R<Vec<Value>> {
    let (ix, depth, values) = (ctx.t(0)?, ctx.t(1)?, ctx.t(2)?);
    let depth = depth.scalar_f64()? as i64;
    let r = ix.rank() + 1;
    let ax = axis(ctx.ai("axis", -1), r)?;
    let idx = ix.to_f64s()?;
    let outer = numel(&ix.shape[..ax]);
    let inner = numel(&ix.shape[ax..]);
    let mut shape = ix.shape.clone();
    shape.insert(ax, depth as usize);
    let mut which = vec![false; numel(&shape)];
    for o in 0..outer {
        for i in 0..inner {
            let mut k = idx[o * inner + i] as i64;
            if k < 0 {
                k += depth;
            }
            if (0..depth).contains(&k) {
                which[(o * depth as usize + k as usize) * inner + i] = true;
            }
        }
    }
    let data = map_data!(&values.data, v => which.iter().map(|&b| v[b as usize].clone()).collect());
    one(Tensor::new(shape, data))
}

pub(crate) fn eye_like(ctx: &mut Ctx) -> R<Vec<Value>> {
    let t = ctx.t(0)?;
    if t.rank() != 2 {
        return Err("EyeLike takes a 2-D tensor".into());
    }
    let k = ctx.ai("k", 0);
    let dt = if ctx.has("dtype") {
        DType::from_code(ctx.ai("dtype", 1) as i32).ok_or("unknown dtype")?
    } else {
        t.dtype()
    };
    let (r, c) = (t.shape[0], t.shape[1]);
    let v: Vec<f64> = (0..r * c)
        .map(|f| ((f % c) as i64 - (f / c) as i64 == k) as i64 as f64)
        .collect();
    one(cast_tensor(&Tensor::new(vec![r, c], Data::F64(v)), dt)?)
}

pub(crate) fn trilu(ctx: &mut Ctx) -> R<Vec<Value>> {
    let t = ctx.t(0)?;
    let k = ctx.opt(1).map(|k| k.scalar_i64()).transpose()?.unwrap_or(0);
    let upper = ctx.ai("upper", 1) != 0;
    if t.rank() < 2 {
        return Err("Trilu takes rank >= 2".into());
    }
    let (r, c) = (t.shape[t.rank() - 2], t.shape[t.rank() - 1]);
    let zero = Data::zeros(t.dtype(), 1)?;
    let data = zip_same!(&t.data, &zero, |v, z| v
        .iter()
        .enumerate()
        .map(|(f, x)| {
            let (i, j) = (((f / c) % r) as i64, (f % c) as i64);
            let keep = if upper { j - i >= k } else { j - i <= k };
            if keep { x.clone() } else { z[0].clone() }
        })
        .collect())?;
    one(Tensor::new(t.shape.clone(), data))
}

pub(crate) fn depth_to_space(ctx: &mut Ctx) -> R<Vec<Value>> {
    let t = ctx.t(0)?;
    let b = ctx.ai("blocksize", 1).max(0) as usize;
    let [n, c, h, w] = t.shape[..] else {
        return Err("DepthToSpace takes NCHW".into());
    };
    if b == 0 || b.checked_mul(b).is_none_or(|bb| c % bb != 0) {
        return Err(format!(
            "DepthToSpace blocksize {b}: its square does not divide the {c} channels"
        ));
    }
    let crd = ctx.as_str("mode").as_deref() == Some("CRD");
    let c2 = c / (b * b);
    let (tmp, perm) = if crd {
        (vec![n, c2, b, b, h, w], [0, 1, 4, 2, 5, 3])
    } else {
        (vec![n, b, b, c2, h, w], [0, 3, 4, 1, 5, 2])
    };
    let x = transpose_t(&t.clone().reshaped(tmp), &perm);
    one(x.reshaped(vec![n, c2, h * b, w * b]))
}

pub(crate) fn space_to_depth(ctx: &mut Ctx) -> R<Vec<Value>> {
    let t = ctx.t(0)?;
    let b = ctx.ai("blocksize", 1).max(0) as usize;
    let [n, c, h, w] = t.shape[..] else {
        return Err("SpaceToDepth takes NCHW".into());
    };
    if b == 0 || h % b != 0 || w % b != 0 {
        return Err(format!(
            "SpaceToDepth blocksize {b} does not divide the spatial dims {h} x {w}"
        ));
    }
    // opset 28's `mode`: DCR (the default) puts the block offsets before the channels, CRD after
    let perm = match ctx.as_str("mode").as_deref() {
        None | Some("DCR") => [0, 3, 5, 1, 2, 4],
        Some("CRD") => [0, 1, 3, 5, 2, 4],
        Some(m) => return Err(format!("SpaceToDepth mode '{m}' is not DCR or CRD")),
    };
    let x = t.clone().reshaped(vec![n, c, h / b, b, w / b, b]);
    let x = transpose_t(&x, &perm);
    one(x.reshaped(vec![n, c * b * b, h / b, w / b]))
}

/// MaxUnpool: each value of X goes to the flat position its index gives in the unpooled shape
/// (`(in - 1) * stride - pads + kernel` per spatial dim); the rest is zero. With `output_shape`, that result
/// sits in the leading corner of a larger zero tensor, as in the reference.
pub(crate) fn max_unpool(ctx: &mut Ctx) -> R<Vec<Value>> {
    let (x, idx) = (ctx.t(0)?, ctx.t(1)?);
    let kernel = ctx
        .ais("kernel_shape")
        .ok_or("MaxUnpool needs kernel_shape")?;
    let r = kernel.len();
    if x.rank() != r + 2 || idx.shape != x.shape {
        return Err(format!(
            "MaxUnpool input {:?} and indices {:?} do not fit a {r}-D kernel",
            x.shape, idx.shape
        ));
    }
    let step = ctx.ais("strides").unwrap_or_else(|| vec![1; r]);
    let pads = ctx.ais("pads").unwrap_or_else(|| vec![0; 2 * r]);
    if step.len() != r || pads.len() != 2 * r {
        return Err(format!(
            "MaxUnpool strides {step:?} and pads {pads:?} do not fit a {r}-D kernel"
        ));
    }
    let mut inferred = x.shape[..2].to_vec();
    for d in 0..r {
        let v = (x.shape[d + 2] as i64 - 1) * step[d] - pads[d] - pads[r + d] + kernel[d];
        inferred.push(usize::try_from(v).map_err(|_| format!("MaxUnpool output dim {d} is {v}"))?);
    }
    let shape = match ctx.opt(2).filter(|t| !t.is_empty()) {
        Some(t) => t
            .to_i64s()?
            .iter()
            .map(|&v| usize::try_from(v).map_err(|_| format!("output_shape holds {v}")))
            .collect::<R<Vec<usize>>>()?,
        None => inferred.clone(),
    };
    if shape.len() != inferred.len() || shape.iter().zip(&inferred).any(|(a, b)| a < b) {
        return Err(format!(
            "output_shape {shape:?} is smaller than the unpooled shape {inferred:?}"
        ));
    }
    // source of each element of the unpooled tensor: a value of X, or X's length for zero
    let n = x.len();
    let mut src = vec![n; numel(&inferred)];
    for (k, &i) in idx.to_i64s()?.iter().enumerate() {
        let slot = usize::try_from(i)
            .ok()
            .and_then(|i| src.get_mut(i))
            .ok_or_else(|| format!("index {i} is outside the unpooled tensor {inferred:?}"))?;
        *slot = k;
    }
    // placed in the corner of `shape`
    let ost = strides(&shape);
    let mut offs = vec![n; numel(&shape)];
    let mut coord = vec![0; inferred.len()];
    for (f, &s) in src.iter().enumerate() {
        unravel(f, &inferred, &mut coord);
        offs[coord.iter().zip(&ost).map(|(a, b)| a * b).sum::<usize>()] = s;
    }
    let flat = x.clone().reshaped(vec![n]);
    let zero = Tensor::new(vec![1], crate::Data::zeros(x.dtype(), 1)?);
    let padded = concat_t(&[&flat, &zero], 0)?;
    let data = map_data!(&padded.data, v => offs.iter().map(|&o| v[o].clone()).collect());
    one(Tensor::new(shape, data))
}

pub(crate) fn reverse_sequence(ctx: &mut Ctx) -> R<Vec<Value>> {
    let (t, lens) = (ctx.t(0)?, ctx.t(1)?);
    let (ba, ta) = (ctx.ai("batch_axis", 1), ctx.ai("time_axis", 0));
    if t.rank() < 2 || !matches!((ba, ta), (0, 1) | (1, 0)) {
        return Err(format!(
            "ReverseSequence batch_axis {ba} and time_axis {ta} must be 0 and 1 of a tensor of rank 2 or more \
             (input {:?})",
            t.shape
        ));
    }
    let (ba, ta) = (ba as usize, ta as usize);
    let lens = lens.to_i64s()?;
    if lens.len() != t.shape[ba] || lens.iter().any(|&l| l < 0 || l as usize > t.shape[ta]) {
        return Err(format!(
            "ReverseSequence sequence_lens {lens:?} must give one length in [0, {}] per batch entry ({})",
            t.shape[ta], t.shape[ba]
        ));
    }
    let st = strides(&t.shape);
    let mut coord = vec![0; t.rank()];
    let offs: Vec<usize> = (0..t.len())
        .map(|f| {
            unravel(f, &t.shape, &mut coord);
            let l = lens[coord[ba]] as usize;
            let mut c = coord.clone();
            if c[ta] < l {
                c[ta] = l - 1 - c[ta];
            }
            c.iter().zip(&st).map(|(a, b)| a * b).sum()
        })
        .collect();
    let data = map_data!(&t.data, v => offs.iter().map(|&o| v[o].clone()).collect());
    one(Tensor::new(t.shape.clone(), data))
}

pub(crate) fn cumsum(ctx: &mut Ctx) -> R<Vec<Value>> {
    cumulative(ctx, false)
}
pub(crate) fn cumprod(ctx: &mut Ctx) -> R<Vec<Value>> {
    cumulative(ctx, true)
}

/// CumSum / CumProd along an axis (exclusive and reverse as attributes).
fn cumulative(ctx: &Ctx, prod: bool) -> R<Vec<Value>> {
    let t = ctx.t(0)?;
    let ax = axis(ctx.t(1)?.scalar_i64()?, t.rank())?;
    let excl = ctx.ai("exclusive", 0) != 0;
    let rev = ctx.ai("reverse", 0) != 0;
    let outer = numel(&t.shape[..ax]);
    let dim = t.shape[ax];
    let inner = numel(&t.shape[ax + 1..]);
    let order: Vec<usize> = if rev {
        (0..dim).rev().collect()
    } else {
        (0..dim).collect()
    };
    macro_rules! go {
        ($v:expr, $zero:expr, $one:expr) => {{
            let v = $v;
            let one = if prod { $one } else { $zero };
            let step = |a, b| if prod { a * b } else { a + b };
            let mut out = vec![$zero; v.len()];
            for o in 0..outer {
                for i in 0..inner {
                    let mut acc = one;
                    for &k in &order {
                        let p = (o * dim + k) * inner + i;
                        if excl {
                            out[p] = acc;
                            acc = step(acc, v[p]);
                        } else {
                            acc = step(acc, v[p]);
                            out[p] = acc;
                        }
                    }
                }
            }
            out
        }};
    }
    let data = match &t.data {
        Data::F32(v) => Data::F32(go!(v, 0.0f32, 1.0f32)),
        Data::F64(v) => Data::F64(go!(v, 0.0f64, 1.0f64)),
        Data::I32(v) => Data::I32(go!(v, 0i32, 1i32)),
        Data::I64(v) => Data::I64(go!(v, 0i64, 1i64)),
        Data::U32(v) => Data::U32(go!(v, 0u32, 1u32)),
        Data::U64(v) => Data::U64(go!(v, 0u64, 1u64)),
        d => return Err(format!("CumSum does not take {}", d.dtype())),
    };
    one(Tensor::new(t.shape.clone(), data))
}

pub(crate) fn compress(ctx: &mut Ctx) -> R<Vec<Value>> {
    let (t, c) = (ctx.t(0)?, ctx.t(1)?);
    let cond: Vec<bool> = c.to_i64s()?.iter().map(|&x| x != 0).collect();
    let (t, ax) = if ctx.has("axis") {
        (t.clone(), super::dim_axis(ctx.ai("axis", 0), t.rank())?)
    } else {
        let n = t.len();
        (t.clone().reshaped(vec![n]), 0)
    };
    let idx: Vec<i64> = (0..t.shape[ax].min(cond.len()))
        .filter(|&i| cond[i])
        .map(|i| i as i64)
        .collect();
    let n = idx.len();
    let outer = numel(&t.shape[..ax]);
    let inner = numel(&t.shape[ax + 1..]);
    let dim = t.shape[ax];
    let mut shape = t.shape.clone();
    shape[ax] = n;
    let data = map_data!(&t.data, v => {
        let mut out = Vec::with_capacity(outer * n * inner);
        for o in 0..outer {
            for &i in &idx {
                let s = (o * dim + i as usize) * inner;
                out.extend_from_slice(&v[s..s + inner]);
            }
        }
        out
    });
    one(Tensor::new(shape, data))
}

pub(crate) fn center_crop_pad(ctx: &mut Ctx) -> R<Vec<Value>> {
    let (t, s) = (ctx.t(0)?, ctx.t(1)?);
    let target = s.to_i64s()?;
    let axes: Vec<usize> = match ctx.ais("axes") {
        Some(a) => a.iter().map(|&x| axis(x, t.rank())).collect::<R<_>>()?,
        None => (0..t.rank()).collect(),
    };
    if target.len() != axes.len()
        || target
            .iter()
            .any(|&d| !(0..=crate::tensor::MAX_DIM as i64).contains(&d))
    {
        return Err(format!(
            "CenterCropPad shape {target:?} must give one size in [0, 2^31] for each of the axes {axes:?}"
        ));
    }
    let mut cur = t.clone();
    for (k, &a) in axes.iter().enumerate() {
        let want = target[k] as usize;
        let have = cur.shape[a];
        if want < have {
            let start = (have - want) / 2;
            cur = narrow(&cur, a, start, want);
        } else if want > have {
            let before = (want - have) / 2;
            let mut shape = cur.shape.clone();
            shape[a] = want;
            let zero = Data::zeros(cur.dtype(), 1)?;
            let outer = numel(&cur.shape[..a]);
            let inner = numel(&cur.shape[a + 1..]);
            let data = zip_same!(&cur.data, &zero, |v, z| {
                let mut out = vec![z[0].clone(); numel(&shape)];
                for o in 0..outer {
                    for i in 0..have {
                        let src = (o * have + i) * inner;
                        let dst = (o * want + i + before) * inner;
                        out[dst..dst + inner].clone_from_slice(&v[src..src + inner]);
                    }
                }
                out
            })?;
            cur = Tensor::new(shape, data);
        }
    }
    one(cur)
}

/// Hann, Hamming and Blackman windows (`periodic` divides by N instead of N - 1).
fn window_op(ctx: &Ctx, coeffs: &[f64]) -> R<Vec<Value>> {
    let n = ctx.t(0)?.scalar_i64()?.max(0) as usize;
    let periodic = ctx.ai("periodic", 1) != 0;
    let denom = if periodic {
        n as f64
    } else {
        (n as f64 - 1.0).max(1.0)
    };
    let v: Vec<f64> = (0..n)
        .map(|i| {
            coeffs
                .iter()
                .enumerate()
                .map(|(k, &a)| {
                    let sign = if k % 2 == 1 { -1.0 } else { 1.0 };
                    sign * a * (2.0 * std::f64::consts::PI * k as f64 * i as f64 / denom).cos()
                })
                .sum()
        })
        .collect();
    let dt =
        DType::from_code(ctx.ai("output_datatype", 1) as i32).ok_or("unknown output_datatype")?;
    one(cast_tensor(&Tensor::new(vec![n], Data::F64(v)), dt)?)
}
pub(crate) fn hann_window(ctx: &mut Ctx) -> R<Vec<Value>> {
    window_op(ctx, &[0.5, 0.5])
}
pub(crate) fn hamming_window(ctx: &mut Ctx) -> R<Vec<Value>> {
    window_op(ctx, &[25.0 / 46.0, 21.0 / 46.0])
}
pub(crate) fn blackman_window(ctx: &mut Ctx) -> R<Vec<Value>> {
    window_op(ctx, &[0.42, 0.5, 0.08])
}

/// MelWeightMatrix: triangular filters on the mel scale, `[dft_length / 2 + 1, num_mel_bins]`. As the
/// reference computes it: `num_mel_bins + 2` equally spaced mel points (the step divides the range by that
/// count), converted back to Hz and to spectrogram bins with `floor((dft_length + 1) * hz / sample_rate)`.
pub(crate) fn mel_weight_matrix(ctx: &mut Ctx) -> R<Vec<Value>> {
    let int = |i: usize| ctx.t(i).and_then(|t| t.scalar_i64());
    let float = |i: usize| ctx.t(i).and_then(|t| t.scalar_f64());
    let (mels, dft, rate) = (int(0)?, int(1)?, int(2)?);
    let (lo, hi) = (float(3)?, float(4)?);
    if mels < 0 || dft < 1 || rate < 1 {
        return Err(format!(
            "MelWeightMatrix needs num_mel_bins >= 0, dft_length and sample_rate >= 1 (got {mels}, {dft}, {rate})"
        ));
    }
    let (mels, bins) = (mels as usize, dft as usize / 2 + 1);
    let mel = |hz: f64| 2595.0 * (hz / 700.0).ln_1p() / std::f64::consts::LN_10;
    let (mlo, mhi) = (mel(lo), mel(hi));
    let step = (mhi - mlo) / (mels + 2) as f64;
    let points: Vec<usize> = (0..mels + 2)
        .map(|i| {
            let hz = 700.0 * ((i as f64 * step + mlo) / 2595.0 * std::f64::consts::LN_10).exp_m1();
            (((dft + 1) as f64 * hz) / rate as f64).floor().max(0.0) as usize
        })
        .collect();
    let mut out = vec![0f64; bins * mels];
    let mut set = |j: usize, i: usize, v: f64| -> R<()> {
        *out.get_mut(j * mels + i)
            .ok_or_else(|| format!("mel bin {i} reaches spectrogram bin {j} of {bins}"))? = v;
        Ok(())
    };
    for i in 0..mels {
        let (l, c, h) = (points[i], points[i + 1], points[i + 2]);
        if c == l {
            set(c, i, 1.0)?;
        } else {
            for j in l..=c {
                set(j, i, (j - l) as f64 / (c - l) as f64)?;
            }
        }
        for j in c..h {
            set(j, i, (h - j) as f64 / (h - c) as f64)?;
        }
    }
    let dt =
        DType::from_code(ctx.ai("output_datatype", 1) as i32).ok_or("unknown output_datatype")?;
    one(cast_tensor(
        &Tensor::new(vec![bins, mels], Data::F64(out)),
        dt,
    )?)
}

pub(crate) fn unique(ctx: &mut Ctx) -> R<Vec<Value>> {
    let t = ctx.t(0)?;
    let sorted = ctx.ai("sorted", 1) != 0;
    let (t, ax) = if ctx.has("axis") {
        (t.clone(), super::dim_axis(ctx.ai("axis", 0), t.rank())?)
    } else {
        let n = t.len();
        (t.clone().reshaped(vec![n]), 0)
    };
    let dim = t.shape[ax];
    let slices: Vec<Tensor> = (0..dim).map(|i| narrow(&t, ax, i, 1)).collect();
    let keys: Vec<Vec<f64>> = slices.iter().map(|s| s.to_f64s()).collect::<R<_>>()?;
    let mut first: Vec<usize> = Vec::new();
    let mut inverse = vec![0i64; dim];
    let mut counts: Vec<i64> = Vec::new();
    for i in 0..dim {
        match first.iter().position(|&f| keys[f] == keys[i]) {
            Some(u) => {
                inverse[i] = u as i64;
                counts[u] += 1;
            }
            None => {
                inverse[i] = first.len() as i64;
                first.push(i);
                counts.push(1);
            }
        }
    }
    let mut order: Vec<usize> = (0..first.len()).collect();
    if sorted {
        order.sort_by(|&a, &b| {
            keys[first[a]]
                .partial_cmp(&keys[first[b]])
                .unwrap_or(std::cmp::Ordering::Equal)
        });
    }
    let mut rank = vec![0i64; order.len()];
    for (r, &u) in order.iter().enumerate() {
        rank[u] = r as i64;
    }
    let parts: Vec<&Tensor> = order.iter().map(|&u| &slices[first[u]]).collect();
    let y = if parts.is_empty() {
        let mut s = t.shape.clone();
        s[ax] = 0;
        Tensor::new(s, Data::empty(t.dtype())?)
    } else {
        concat_t(&parts, ax)?
    };
    let n = order.len();
    Ok(vec![
        Value::Tensor(y),
        Value::Tensor(Tensor::i64(
            vec![n],
            order.iter().map(|&u| first[u] as i64).collect(),
        )),
        Value::Tensor(Tensor::i64(
            vec![dim],
            inverse.iter().map(|&u| rank[u as usize]).collect(),
        )),
        Value::Tensor(Tensor::i64(
            vec![n],
            order.iter().map(|&u| counts[u]).collect(),
        )),
    ])
}

pub(crate) fn det(ctx: &mut Ctx) -> R<Vec<Value>> {
    let t = ctx.t(0)?;
    let r = t.rank();
    if r < 2 || t.shape[r - 1] != t.shape[r - 2] {
        return Err(format!("Det takes [..., M, M], got {:?}", t.shape));
    }
    let m = t.shape[r - 1];
    let v = t.to_f64s()?;
    let batch = numel(&t.shape[..r - 2]);
    let out: Vec<f64> = (0..batch)
        .map(|b| {
            let mut a = v[b * m * m..(b + 1) * m * m].to_vec();
            let mut d = 1.0;
            for c in 0..m {
                let p = (c..m)
                    .max_by(|&i, &j| a[i * m + c].abs().total_cmp(&a[j * m + c].abs()))
                    .unwrap_or(c);
                if a[p * m + c] == 0.0 {
                    return 0.0;
                }
                if p != c {
                    for k in 0..m {
                        a.swap(p * m + k, c * m + k);
                    }
                    d = -d;
                }
                d *= a[c * m + c];
                for i in c + 1..m {
                    let f = a[i * m + c] / a[c * m + c];
                    for k in c..m {
                        a[i * m + k] -= f * a[c * m + k];
                    }
                }
            }
            d
        })
        .collect();
    one(cast_tensor(
        &Tensor::new(t.shape[..r - 2].to_vec(), Data::F64(out)),
        t.dtype(),
    )?)
}

/// TensorScatter (opset 24): a copy of `past_cache` with `update` written along `axis` (default -2) from each
/// batch's write index (0 when `write_indices` is absent), wrapping around the cache with `mode = circular`.
pub(crate) fn tensor_scatter(ctx: &mut Ctx) -> R<Vec<Value>> {
    let (cache, up) = (ctx.t(0)?, ctx.t(1)?);
    let ax = axis(ctx.ai("axis", -2), cache.rank())?;
    let circular = match ctx.as_str("mode").as_deref() {
        None | Some("linear") => false,
        Some("circular") => true,
        Some(m) => return Err(format!("unknown mode '{m}'")),
    };
    if ax == 0 || up.rank() != cache.rank() {
        return Err(format!(
            "update {:?} must match past_cache {:?} but along axis {ax} (not the batch axis)",
            up.shape, cache.shape
        ));
    }
    for (d, (&c, &u)) in cache.shape.iter().zip(&up.shape).enumerate() {
        if (d != ax && c != u) || (d == ax && u > c) {
            return Err(format!(
                "update {:?} does not fit past_cache {:?} along axis {ax}",
                up.shape, cache.shape
            ));
        }
    }
    let batch = cache.shape[0];
    let starts = match ctx.opt(2) {
        Some(w) => w.to_i64s()?,
        None => vec![0; batch],
    };
    if starts.len() < batch {
        return Err(format!(
            "{} write indices for a batch of {batch}",
            starts.len()
        ));
    }
    let (max_len, len) = (cache.shape[ax], up.shape[ax]);
    let inner = numel(&cache.shape[ax + 1..]);
    let outer = numel(&cache.shape[..ax]);
    let per_batch = outer / batch.max(1);
    let mut blocks = Vec::with_capacity(outer * len);
    for p in 0..outer {
        let b = p / per_batch.max(1);
        for s in 0..len {
            let mut at = starts[b] + s as i64;
            if circular {
                at = at.rem_euclid(max_len as i64);
            }
            let at = usize::try_from(at)
                .ok()
                .filter(|&a| a < max_len)
                .ok_or_else(|| format!("write position {at} is outside the cache's {max_len}"))?;
            blocks.push(((p * max_len + at) * inner, (p * len + s) * inner));
        }
    }
    let mut out = cache.clone();
    let d = std::mem::replace(&mut out.data, Data::Bool(vec![]));
    out.data = zip_same!(d, &up.data, |a, b| {
        let mut a = a;
        for &(dst, src) in &blocks {
            a[dst..dst + inner].clone_from_slice(&b[src..src + inner]);
        }
        a
    })?;
    one(out)
}
