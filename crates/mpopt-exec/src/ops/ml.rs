//! ai.onnx.ml ops as the ONNX reference defines them: Binarizer, ArrayFeatureExtractor, LabelEncoder
//! (opsets 2-4: list or tensor keys and values) and TreeEnsemble (opset 5: every comparison mode, set
//! membership, missing values, the four aggregations).

use std::collections::HashMap;

use mpopt_ir::DType;

use super::elementwise::cast_tensor;
use super::{Ctx, R, one};
use crate::{Data, Tensor, Value};

/// Binarizer: 1 where x > threshold, else 0, in x's type.
pub(crate) fn binarizer(ctx: &mut Ctx) -> R<Vec<Value>> {
    let x = ctx.t(0)?;
    let th = ctx.af("threshold", 0.0) as f64;
    let v: Vec<f64> = x
        .to_f64s()?
        .iter()
        .map(|&a| if a > th { 1.0 } else { 0.0 })
        .collect();
    one(cast_tensor(
        &Tensor::new(x.shape.clone(), Data::F64(v)),
        x.dtype(),
    )?)
}

/// ArrayFeatureExtractor: the elements of the last axis that the indices name, for every leading index
/// (a 1-D input is one row).
pub(crate) fn array_feature_extractor(ctx: &mut Ctx) -> R<Vec<Value>> {
    let (x, idx) = (ctx.t(0)?, ctx.t(1)?);
    let idx = idx.to_i64s()?;
    let last = *x
        .shape
        .last()
        .ok_or("ArrayFeatureExtractor takes a tensor of rank >= 1")?;
    let rows = x.len().checked_div(last).unwrap_or(0);
    let mut offs = Vec::with_capacity(rows * idx.len());
    for r in 0..rows {
        for &i in &idx {
            let i = usize::try_from(i)
                .ok()
                .filter(|&i| i < last)
                .ok_or_else(|| format!("index {i} is outside the last axis of {}", last))?;
            offs.push(r * last + i);
        }
    }
    let mut shape = if x.rank() == 1 {
        vec![1]
    } else {
        x.shape[..x.rank() - 1].to_vec()
    };
    shape.push(idx.len());
    let data = crate::map_data!(&x.data, v => offs.iter().map(|&o| v[o].clone()).collect());
    one(Tensor::new(shape, data))
}

/// A lookup key of LabelEncoder (and a TfIdfVectorizer token): floats by their bits (with -0 as 0 and one
/// NaN, so NaN finds a NaN key).
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) enum Key {
    F(u32),
    I(i64),
    S(String),
}

fn float_key(x: f32) -> Key {
    Key::F(if x.is_nan() {
        f32::NAN.to_bits()
    } else if x == 0.0 {
        0
    } else {
        x.to_bits()
    })
}

/// A tensor's elements as keys.
pub(crate) fn keys_of(t: &Tensor) -> R<Vec<Key>> {
    Ok(match &t.data {
        Data::Str(v) => v.iter().cloned().map(Key::S).collect(),
        d if d.is_float() => t.to_f32s()?.into_iter().map(float_key).collect(),
        _ => t.to_i64s()?.into_iter().map(Key::I).collect(),
    })
}

/// LabelEncoder: maps each element through the keys/values table, the default where it is missing.
pub(crate) fn label_encoder(ctx: &mut Ctx) -> R<Vec<Value>> {
    let x = ctx.t(0)?;
    let keys: Vec<Key> = if let Some(t) = ctx.atensor("keys_tensor")? {
        keys_of(&t)?
    } else if let Some(v) = ctx.astrs("keys_strings") {
        v.into_iter().map(Key::S).collect()
    } else if let Some(v) = ctx.ais("keys_int64s") {
        v.into_iter().map(Key::I).collect()
    } else if let Some(v) = ctx.afs("keys_floats") {
        v.into_iter().map(float_key).collect()
    } else {
        return Err("LabelEncoder has no keys".into());
    };
    // the values and the default, as a tensor of the output type
    let (values, default): (Tensor, Tensor) = if let Some(t) = ctx.atensor("values_tensor")? {
        let d = ctx
            .atensor("default_tensor")?
            .ok_or("LabelEncoder with values_tensor needs default_tensor")?;
        (t, d)
    } else if let Some(v) = ctx.astrs("values_strings") {
        let d = ctx
            .as_str("default_string")
            .unwrap_or_else(|| "_Unused".into());
        (
            Tensor::new(vec![v.len()], Data::Str(v)),
            Tensor::new(vec![1], Data::Str(vec![d])),
        )
    } else if let Some(v) = ctx.ais("values_int64s") {
        (
            Tensor::i64(vec![v.len()], v),
            Tensor::i64(vec![1], vec![ctx.ai("default_int64", -1)]),
        )
    } else if let Some(v) = ctx.afs("values_floats") {
        (
            Tensor::f32(vec![v.len()], v),
            Tensor::f32(vec![1], vec![ctx.af("default_float", -0.0)]),
        )
    } else {
        return Err("LabelEncoder has no values".into());
    };
    if values.len() != keys.len() || default.len() != 1 {
        return Err(format!(
            "LabelEncoder has {} keys, {} values and {} defaults",
            keys.len(),
            values.len(),
            default.len()
        ));
    }
    if values.dtype() != default.dtype() {
        return Err("LabelEncoder's values and default differ in type".into());
    }
    let table: HashMap<Key, usize> = keys.into_iter().enumerate().map(|(i, k)| (k, i)).collect();
    // index into values followed by the default
    let n = values.len();
    let picks: Vec<usize> = keys_of(x)?
        .iter()
        .map(|k| table.get(k).copied().unwrap_or(n))
        .collect();
    let all = super::shape::concat_t(&[&values.clone().reshaped(vec![n]), &default], 0)?;
    let data = crate::map_data!(&all.data, v => picks.iter().map(|&o| v[o].clone()).collect());
    one(Tensor::new(x.shape.clone(), data))
}

/// One TreeEnsemble node test (opset 5 `nodes_modes`).
#[derive(Clone, Copy)]
enum Mode {
    Leq,
    Lt,
    Gte,
    Gt,
    Eq,
    Neq,
    Member,
}

/// TreeEnsemble (ai.onnx.ml 5): each tree of `tree_roots` routes a row of X from its root through
/// interior nodes (`x[feature] MODE split`, NaN going true where `nodes_missing_value_tracks_true`) to a
/// leaf, whose weight goes to its target; the trees' weights are aggregated per target (average, sum,
/// min, max), computed in f64 and rounded to X's type. `post_transform` other than NONE is an error, as in
/// the reference.
pub(crate) fn tree_ensemble(ctx: &mut Ctx) -> R<Vec<Value>> {
    let x = ctx.t(0)?;
    let [rows, cols] = x.shape[..] else {
        return Err(format!("TreeEnsemble takes a 2-D input, got {:?}", x.shape));
    };
    let ints = |name: &str| {
        ctx.ais(name)
            .ok_or_else(|| format!("TreeEnsemble needs {name}"))
    };
    let floats = |name: &str| -> R<Vec<f64>> {
        ctx.atensor(name)?
            .ok_or_else(|| format!("TreeEnsemble needs {name}"))?
            .to_f64s()
    };
    let splits = floats("nodes_splits")?;
    let features = ints("nodes_featureids")?;
    let modes: Vec<Mode> = ctx
        .atensor("nodes_modes")?
        .ok_or("TreeEnsemble needs nodes_modes")?
        .to_i64s()?
        .iter()
        .map(|&m| {
            Ok(match m {
                0 => Mode::Leq,
                1 => Mode::Lt,
                2 => Mode::Gte,
                3 => Mode::Gt,
                4 => Mode::Eq,
                5 => Mode::Neq,
                6 => Mode::Member,
                m => return Err(format!("unknown TreeEnsemble node mode {m}")),
            })
        })
        .collect::<R<_>>()?;
    let (true_ids, false_ids) = (ints("nodes_truenodeids")?, ints("nodes_falsenodeids")?);
    let (true_leaf, false_leaf) = (ints("nodes_trueleafs")?, ints("nodes_falseleafs")?);
    let (leaf_targets, leaf_weights) = (ints("leaf_targetids")?, floats("leaf_weights")?);
    let roots = ints("tree_roots")?;
    let targets = ctx.ai("n_targets", 0).max(0) as usize;
    let missing_true = ctx
        .ais("nodes_missing_value_tracks_true")
        .unwrap_or_default();
    if ctx.ai("post_transform", 0) != 0 {
        return Err("TreeEnsemble post_transform other than NONE is not supported".into());
    }
    let n = splits.len();
    if [features.len(), modes.len(), true_ids.len(), false_ids.len()]
        .iter()
        .chain(&[true_leaf.len(), false_leaf.len()])
        .any(|&l| l != n)
        || leaf_targets.len() != leaf_weights.len()
    {
        return Err("TreeEnsemble node or leaf attributes differ in length".into());
    }
    // each member node's set: the membership values in order, each set ended by a NaN
    let mut members: Vec<Vec<f64>> = vec![Vec::new(); n];
    if modes.iter().any(|m| matches!(m, Mode::Member)) {
        let vals = floats("membership_values")?;
        let mut sets = vals.split(|v| v.is_nan());
        for (i, m) in modes.iter().enumerate() {
            if matches!(m, Mode::Member) {
                members[i] = sets
                    .next()
                    .ok_or("membership_values holds fewer sets than member nodes")?
                    .to_vec();
            }
        }
    }
    let xv = x.to_f64s()?;
    // the leaf a row reaches from an interior node (a degenerate root is a leaf itself)
    let walk = |row: &[f64], root: usize| -> R<usize> {
        if root >= n {
            return Err(format!("tree root {root} is not one of the {n} nodes"));
        }
        if true_leaf[root] != 0 && false_leaf[root] != 0 && true_ids[root] == false_ids[root] {
            return Ok(true_ids[root] as usize);
        }
        let mut at = root;
        for _ in 0..=n {
            let f = usize::try_from(features[at])
                .ok()
                .filter(|&f| f < cols)
                .ok_or_else(|| format!("node {at} reads feature {} of {cols}", features[at]))?;
            let (v, s) = (row[f], splits[at]);
            let go = (v.is_nan() && missing_true.get(at).is_some_and(|&t| t != 0))
                || match modes[at] {
                    Mode::Leq => v <= s,
                    Mode::Lt => v < s,
                    Mode::Gte => v >= s,
                    Mode::Gt => v > s,
                    Mode::Eq => v == s,
                    Mode::Neq => v != s,
                    Mode::Member => members[at].contains(&v),
                };
            let (next, leaf) = if go {
                (true_ids[at], true_leaf[at])
            } else {
                (false_ids[at], false_leaf[at])
            };
            let next = usize::try_from(next).map_err(|_| format!("node {at} points to {next}"))?;
            if leaf != 0 {
                return Ok(next);
            }
            if next >= n {
                return Err(format!("node {at} points to node {next} of {n}"));
            }
            at = next;
        }
        Err("a TreeEnsemble tree has a cycle".into())
    };
    let agg = ctx.ai("aggregate_function", 1);
    let dtype = if x.data.is_float() {
        x.dtype()
    } else {
        DType::F32
    };
    // MIN and MAX start from the output type's largest finite values, as the reference does: a target no
    // tree reaches reads them
    let largest = match dtype {
        DType::F64 => f64::MAX,
        DType::F16 => half::f16::MAX.to_f64(),
        DType::BF16 => half::bf16::MAX.to_f64(),
        _ => f32::MAX as f64,
    };
    let init = match agg {
        0 | 1 => 0.0,
        2 => largest,
        3 => -largest,
        a => return Err(format!("unknown aggregate_function {a}")),
    };
    let mut out = vec![init; rows * targets];
    for r in 0..rows {
        let row = &xv[r * cols..(r + 1) * cols];
        for &root in &roots {
            let leaf = walk(row, root as usize)?;
            let (t, w) = match (leaf_targets.get(leaf), leaf_weights.get(leaf)) {
                (Some(&t), Some(&w)) if (t as usize) < targets => (t as usize, w),
                _ => return Err(format!("leaf {leaf} has no target below {targets}")),
            };
            let o = &mut out[r * targets + t];
            *o = match agg {
                0 => *o + w / roots.len() as f64,
                1 => *o + w,
                2 => o.min(w),
                _ => o.max(w),
            };
        }
    }
    one(cast_tensor(
        &Tensor::new(vec![rows, targets], Data::F64(out)),
        dtype,
    )?)
}
