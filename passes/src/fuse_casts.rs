//! `fuse-casts`: removes the casts that change nothing, and only those.
//!
//! **Rules**, applied until nothing changes:
//! - *no-op*: a Cast to the dtype its input already has is removed.
//! - *chains*: `Cast(Cast(x: A -> B) -> C)` where A -> B is exact (every A value is a B value):
//!   - it cancels when C = A (f16 -> f32 -> f16, bf16 -> f32 -> bf16, f32 -> f64 -> f32);
//!   - it becomes one cast A -> C when A and C are ordered (f32 -> f64 -> f16 is f32 -> f16).
//!
//!   It stays when A -> B rounds (f32 -> f16 -> f32 changes values) or when A and C are incomparable
//!   (bf16 -> f32 -> f16). `unsafe_narrow_widen` also drops f32 -> f16 -> f32 pairs, on explicit request
//!   only.
//! - *duplicates*: Casts of the same value to the same dtype become one.
//! - *constants*: a Cast of an initializer or Constant is folded into the data when the result is computed
//!   here exactly as at run time: float to float (the same rounding) and integer or bool data whose every
//!   value the target holds exactly (widenings, an int64 flag of 0 or 1 to f16). The Cast's output becomes the initializer, keeping its
//!   name and uses; the source is removed when nothing else reads it.
//! - *captured*: Casts of a value that a control-flow node's bodies read from the enclosing graph move there,
//!   one per (value, dtype), when that saves a cast: two or more bodies (or body casts) cast it alike (the two
//!   branches of an `If`), the enclosing graph already casts it so, or the body is a `Loop` or `Scan`'s (the
//!   cast ran every iteration). The bodies read the enclosing graph's cast instead. Same values: the Cast is
//!   the same, only where it runs changes. A body cast that is the body's output, or that a nested subgraph
//!   reads by name, stays.
//!
//! **Invariants.**
//! - Never changes a value that the graph computes.
//! - Never renames a graph output: a cast producing one is kept.
//! - Idempotent.
//!
//! ```text
//! before: %a = Cast(%x16) {to = 1}     after: %y = Relu(%x16)
//!         %b = Cast(%a) {to = 10}
//!         %y = Relu(%b)
//! ```

use std::collections::BTreeMap;

use rustc_hash::FxHashMap as HashMap;

use mpopt_ir::{AttrValue, DType, Def, Graph, Model, Node, NodeId, ValueId};

use crate::insert_casts::{Taken, cast_node, convert_tensor, fresh, name_used};
use crate::{Pass, PassError, PassOutcome};

/// The pass.
#[derive(Default)]
pub struct FuseCasts {
    /// Also drop narrowing-then-widening pairs (f32 -> f16 -> f32). Changes values; off by default.
    pub unsafe_narrow_widen: bool,
}

/// True when every value of `a` is exactly a value of `b`.
pub fn exact_into(a: DType, b: DType) -> bool {
    use DType::*;
    a == b
        || matches!(
            (a, b),
            (F16, F32 | F64)
                | (BF16, F32 | F64)
                | (F32, F64)
                | (Bool, _)
                | (I8, I16 | I32 | I64 | F16 | BF16 | F32 | F64)
                | (
                    U8,
                    I16 | U16 | I32 | U32 | I64 | U64 | F16 | BF16 | F32 | F64
                )
                | (I16, I32 | I64 | F32 | F64)
                | (U16, I32 | U32 | I64 | U64 | F32 | F64)
                | (I32, I64 | F64)
                | (U32, I64 | U64 | F64)
        )
}

/// A value's dtype: its type if known, else the `to` of the Cast that produces it.
fn elem(g: &Graph, v: ValueId) -> Option<DType> {
    g.value(v)
        .elem()
        .or_else(|| g.producer(v).and_then(|(p, _)| cast_to(g.node(p))))
}

fn cast_to(n: &Node) -> Option<DType> {
    if n.op_type != "Cast" || !n.in_default_domain() {
        return None;
    }
    match n.attr("to").map(|a| &a.value) {
        Some(AttrValue::Int(c)) => DType::from_code(*c as i32),
        _ => None,
    }
}

#[derive(Default)]
struct Counts {
    noop: u64,
    chains: u64,
    duplicates: u64,
    folded: u64,
    hoisted: u64,
}

impl Pass for FuseCasts {
    fn name(&self) -> &'static str {
        "fuse-casts"
    }

    fn run(&mut self, model: &mut Model) -> Result<PassOutcome, PassError> {
        let mut c = Counts::default();
        let mut names = Taken::of(&model.graph);
        fuse_graph(
            &mut model.graph,
            self.unsafe_narrow_widen,
            &mut names,
            &mut c,
        );
        Ok(PassOutcome::rewrites(vec![
            ("no-op casts removed", c.noop),
            ("cast chains shortened", c.chains),
            ("duplicate casts merged", c.duplicates),
            ("casts folded into constants", c.folded),
            ("casts hoisted out of subgraphs", c.hoisted),
        ]))
    }
}

/// Can a Cast's output be replaced by another value? Not a graph output (its name is the interface), and not
/// a value a subgraph reads by name (its body would still name it: the v6 search's nested `If`s).
fn replaceable(g: &Graph, out: ValueId) -> bool {
    !g.outputs().contains(&out)
        && g.uses(out)
            .iter()
            .all(|u| matches!(u, mpopt_ir::Use::Input(..)))
}

/// Replaces the Cast `n`'s output by `with` (a value of the same dtype) everywhere and removes the Cast. Not
/// for a graph output (its name is the interface). Subgraphs that read the output by name are made to read
/// `with`'s name instead (their captures renamed), unless one of them already has a value of that name:
/// then the Cast stays. Before, any such Cast stayed, so a model's own Cast made a no-op by the decisions
/// (onnxruntime's float16 converter's input casts, read by the branches of silero_vad_v6's `If`) was left.
fn bypass(g: &mut Graph, n: NodeId, with: ValueId) -> bool {
    let Some(out) = g.node(n).outputs()[0] else {
        return false;
    };
    if g.outputs().contains(&out) {
        return false;
    }
    // (a node lists each name it captures once among its implicit inputs)
    let readers: Vec<NodeId> = g
        .uses(out)
        .iter()
        .filter_map(|u| match *u {
            mpopt_ir::Use::Implicit(m, _) => Some(m),
            mpopt_ir::Use::Input(..) => None,
        })
        .collect();
    if !readers.is_empty() {
        let (old, new) = (
            g.value(out).name().to_string(),
            g.value(with).name().to_string(),
        );
        if readers
            .iter()
            .any(|&m| g.node(m).subgraphs().any(|(_, sg)| name_used(sg, &new)))
        {
            return false;
        }
        for m in readers {
            g.rename_captures(m, &old, &new);
        }
    }
    g.replace_all_uses(out, with);
    g.remove_node(n);
    true
}

/// The data of a constant value: an initializer, or a Constant node's `value` (or its `value_int(s)` and
/// `value_float(s)` forms, as function expansions write them).
fn constant_of(g: &Graph, v: ValueId) -> Option<std::borrow::Cow<'_, mpopt_ir::Tensor>> {
    use std::borrow::Cow;
    if g.value(v).def() == Def::Initializer {
        return g.value(v).initializer.as_deref().map(Cow::Borrowed);
    }
    let (p, _) = g.producer(v)?;
    let n = g.node(p);
    if n.op_type != "Constant" || !n.in_default_domain() {
        return None;
    }
    let a = n.attributes.first().filter(|_| n.attributes.len() == 1)?;
    Some(match (a.name.as_str(), &a.value) {
        ("value", AttrValue::Tensor(t)) => Cow::Borrowed(t),
        ("value_int", AttrValue::Int(i)) => Cow::Owned(mpopt_ir::Tensor::from_i64(vec![], &[*i])),
        ("value_ints", AttrValue::Ints(is)) => {
            Cow::Owned(mpopt_ir::Tensor::from_i64(vec![is.len() as i64], is))
        }
        ("value_float", AttrValue::Float(f)) => {
            Cow::Owned(mpopt_ir::Tensor::from_f32(vec![], &[*f]))
        }
        ("value_floats", AttrValue::Floats(fs)) => {
            Cow::Owned(mpopt_ir::Tensor::from_f32(vec![fs.len() as i64], fs))
        }
        _ => return None,
    })
}

/// The tensor a Cast would compute, when it is computed here exactly as at run time: float to float (the same
/// rounding), and integer or bool data whose every value the target holds exactly (an int64 flag of 0 or 1
/// cast to f16, a widening): no rounding or wrapping happens, so every runtime gives these values.
fn cast_tensor(t: &mpopt_ir::Tensor, to: DType) -> Option<mpopt_ir::Tensor> {
    if t.dtype.is_float() && to.is_float() {
        return convert_tensor(t, to).map(|(c, _)| c);
    }
    if t.dtype.is_float() {
        return None;
    }
    let n = t.numel()?;
    let vals = t.values_i128(n)?;
    if vals.len() != n || !vals.iter().all(|&v| holds_exactly(to, v)) {
        return None;
    }
    let mut raw = Vec::with_capacity(n * (to.bits() as usize / 8).max(1));
    for v in vals {
        match to {
            DType::I16 => raw.extend_from_slice(&(v as i16).to_le_bytes()),
            DType::U16 => raw.extend_from_slice(&(v as u16).to_le_bytes()),
            DType::I32 => raw.extend_from_slice(&(v as i32).to_le_bytes()),
            DType::U32 => raw.extend_from_slice(&(v as u32).to_le_bytes()),
            DType::I64 => raw.extend_from_slice(&(v as i64).to_le_bytes()),
            DType::U64 => raw.extend_from_slice(&(v as u64).to_le_bytes()),
            DType::F32 => raw.extend_from_slice(&(v as f32).to_le_bytes()),
            DType::F64 => raw.extend_from_slice(&(v as f64).to_le_bytes()),
            DType::F16 => raw.extend_from_slice(&half::f16::from_f64(v as f64).to_le_bytes()),
            DType::BF16 => raw.extend_from_slice(&half::bf16::from_f64(v as f64).to_le_bytes()),
            _ => return None,
        }
    }
    let mut out = mpopt_ir::Tensor::from_raw(to, t.dims.clone(), bytes::Bytes::from(raw));
    out.doc_string = t.doc_string.clone();
    Some(out)
}

/// True when `to` holds the integer `v` exactly.
fn holds_exactly(to: DType, v: i128) -> bool {
    let int = |lo: i128, hi: i128| (lo..=hi).contains(&v);
    // integers up to 2^53 are exact in f64, so the float checks below compare exact values
    let float = |back: f64| v.unsigned_abs() <= 1 << 53 && back == v as f64;
    match to {
        DType::I8 => int(i8::MIN.into(), i8::MAX.into()),
        DType::U8 => int(0, u8::MAX.into()),
        DType::I16 => int(i16::MIN.into(), i16::MAX.into()),
        DType::U16 => int(0, u16::MAX.into()),
        DType::I32 => int(i32::MIN.into(), i32::MAX.into()),
        DType::U32 => int(0, u32::MAX.into()),
        DType::I64 => int(i64::MIN.into(), i64::MAX.into()),
        DType::U64 => int(0, u64::MAX.into()),
        DType::F16 => float(half::f16::from_f64(v as f64).to_f64()),
        DType::BF16 => float(half::bf16::from_f64(v as f64).to_f64()),
        DType::F32 => float((v as f64) as f32 as f64),
        DType::F64 => float(v as f64),
        _ => false,
    }
}

/// Removes a constant (initializer or Constant node) nobody reads any more.
fn drop_if_unused(g: &mut Graph, v: ValueId) {
    if !g.uses(v).is_empty() || g.outputs().contains(&v) {
        return;
    }
    match g.value(v).def() {
        Def::Initializer => {
            g.remove_initializer(v);
        }
        Def::Node(p, _) => remove_if_dead(g, p),
        _ => {}
    }
}

/// Removes a node whose outputs nobody reads.
fn remove_if_dead(g: &mut Graph, n: NodeId) {
    if !g.is_live(n) {
        return;
    }
    let dead = g
        .node(n)
        .outputs()
        .iter()
        .flatten()
        .all(|&v| g.uses(v).is_empty() && !g.outputs().contains(&v));
    if dead {
        g.remove_node(n);
    }
}

/// A Cast's target dtype and its input, read afresh (earlier rewrites may have moved the input).
fn cast_parts(g: &Graph, id: NodeId) -> Option<(DType, ValueId)> {
    let n = g.node(id);
    Some((cast_to(n)?, n.inputs().first().copied().flatten()?))
}

/// The Cast nodes of a graph, in schedule order.
fn cast_nodes(g: &Graph) -> Vec<NodeId> {
    g.nodes()
        .filter(|(_, n)| cast_to(n).is_some())
        .map(|(id, _)| id)
        .collect()
}

fn fuse_graph(g: &mut Graph, unsafe_nw: bool, names: &mut Taken, c: &mut Counts) {
    g.for_each_subgraph_mut(|_, _, sg| fuse_graph(sg, unsafe_nw, names, c));
    let mut hoist = true;
    loop {
        let mut changed = false;
        // (once: what it brings here, the rules below then fuse with this graph's own casts)
        if std::mem::take(&mut hoist) && hoist_captured_casts(g, names, c) {
            changed = true;
        }
        let casts = cast_nodes(g);
        for id in casts {
            if !g.is_live(id) {
                continue;
            }
            let Some((to, x)) = cast_parts(g, id) else {
                continue;
            };
            // no-op (needs the input's dtype; the rules below find theirs themselves)
            if elem(g, x) == Some(to) && bypass(g, id, x) {
                c.noop += 1;
                changed = true;
                continue;
            }
            // chain through another Cast
            if let Some((p, _)) = g.producer(x)
                && let Some(mid) = cast_to(g.node(p))
            {
                let x0 = g.node(p).inputs().first().copied().flatten();
                if let Some((x0, a)) = x0.and_then(|x0| elem(g, x0).map(|a| (x0, a))) {
                    let exact_first = exact_into(a, mid);
                    let ordered = exact_into(a, to) || exact_into(to, a);
                    let narrow_widen = unsafe_nw && a == to && exact_into(mid, a);
                    if (exact_first && ordered) || narrow_widen {
                        g.set_input(id, 0, Some(x0));
                        remove_if_dead(g, p);
                        c.chains += 1;
                        changed = true;
                        if a == to && bypass(g, id, x0) {
                            c.noop += 1;
                        }
                        continue;
                    }
                }
            }
            // a constant source (initializer or Constant node): fold the cast into the data. The Cast's output
            // value becomes the initializer, so its name and every use stay as they are.
            if let Some(mut conv) = constant_of(g, x).and_then(|t| cast_tensor(&t, to)) {
                let Some(out) = g.node(id).outputs()[0] else {
                    continue;
                };
                let out_name = g.value(out).name().to_string();
                g.remove_node(id);
                conv.name = out_name;
                let dims = conv.dims.iter().map(|&d| mpopt_ir::Dim::known(d)).collect();
                g.value_mut(out).ty = Some(mpopt_ir::TypeInfo::tensor(to, Some(dims)));
                if g.set_initializer(out, conv).is_ok() {
                    drop_if_unused(g, x);
                    c.folded += 1;
                    changed = true;
                }
                continue;
            }
        }
        // duplicates: the same value cast to the same dtype
        let mut seen: HashMap<(ValueId, DType), NodeId> = HashMap::default();
        let casts = cast_nodes(g);
        for id in casts {
            let Some((to, x)) = cast_parts(g, id) else {
                continue;
            };
            match seen.get(&(x, to)).copied() {
                Some(first) => {
                    let Some(keep) = g.node(first).outputs()[0] else {
                        continue;
                    };
                    if bypass(g, id, keep) {
                        c.duplicates += 1;
                        changed = true;
                    }
                }
                None => {
                    seen.insert((x, to), id);
                }
            }
        }
        if !changed {
            break;
        }
    }
}

/// A Cast in a node's bodies: (attribute index, body index in it, the Cast).
type BodyCast = (usize, usize, NodeId);

/// The *captured* rule: for each node with bodies, the Casts of a value captured from `g` move into `g`, one per
/// (value, dtype), placed before the node, where that saves a cast (see the module doc). Returns whether any
/// moved.
fn hoist_captured_casts(g: &mut Graph, names: &mut Taken, c: &mut Counts) -> bool {
    let owners: Vec<NodeId> = g
        .nodes()
        .filter(|(_, n)| n.has_subgraphs())
        .map(|(id, _)| id)
        .collect();
    // schedule positions (x2, so that a node moved just before another fits between): one walk, not one per
    // question
    let mut pos: HashMap<NodeId, i64> = g
        .nodes()
        .enumerate()
        .map(|(i, (id, _))| (id, 2 * i as i64))
        .collect();
    let mut any = false;
    for n in owners {
        let looped =
            matches!(g.node(n).op_type.as_str(), "Loop" | "Scan") && g.node(n).in_default_domain();
        // (captured name, dtype code) -> its body casts, as (attribute, body, cast), over all the node's bodies
        let mut plan: BTreeMap<(String, i32), Vec<BodyCast>> = BTreeMap::new();
        for (ai, a) in g.node(n).attributes.iter().enumerate() {
            for (gi, sg) in a.value.graphs().iter().enumerate() {
                for id in cast_nodes(sg) {
                    if let Some((name, to)) = captured_cast(sg, id) {
                        plan.entry((name, to.code()))
                            .or_default()
                            .push((ai, gi, id));
                    }
                }
            }
        }
        // what moves: the body casts, and the name and type of the enclosing graph's Cast they read instead
        let mut moves = Vec::new();
        for ((name, code), casts) in plan {
            let (Some(v), Some(to)) = (g.value_by_name(&name), DType::from_code(code)) else {
                continue;
            };
            // a Cast of `v` to `to` that `g` already has
            let existing = g.uses(v).iter().find_map(|u| match *u {
                mpopt_ir::Use::Input(p, 0) if cast_to(g.node(p)) == Some(to) => Some(p),
                _ => None,
            });
            if existing.is_none() && casts.len() < 2 && !looped {
                continue;
            }
            // the cast's type: the captured value's shape in `to`
            let ty = match g.value(v).ty.as_ref().map(|t| &t.ty) {
                Some(mpopt_ir::Type::Tensor { shape, .. }) => {
                    Some(mpopt_ir::TypeInfo::tensor(to, shape.clone()))
                }
                _ => None,
            };
            let out = match existing {
                Some(p) => {
                    // before the node, so that its bodies can read it (its input is defined before the node)
                    if pos.get(&p).is_none_or(|&at| at > pos[&n]) {
                        g.move_before(p, n);
                        pos.insert(p, pos[&n] - 1);
                    }
                    g.node(p).outputs()[0]
                }
                None => {
                    let new_name = fresh(g, names, &format!("{name}__{to}"));
                    let Ok(o) = g.add_value(new_name.clone(), ty.clone()) else {
                        continue;
                    };
                    let Ok(id) =
                        g.insert_node_before(n, cast_node(new_name, to), &[Some(v)], &[Some(o)])
                    else {
                        continue;
                    };
                    // (a later node's bodies may reuse it)
                    pos.insert(id, pos[&n] - 1);
                    Some(o)
                }
            };
            if let Some(out) = out {
                moves.push((casts, g.value(out).name().to_string(), ty));
            }
        }
        if moves.is_empty() {
            continue;
        }
        // the bodies read the enclosing graph's Casts
        let mut attrs = std::mem::take(&mut g.node_mut(n).attributes);
        for (casts, out_name, ty) in moves {
            for (ai, gi, id) in casts {
                let sg = &mut attrs[ai].value.graphs_mut()[gi];
                let (Some(inner), Some(x)) = (sg.node(id).outputs()[0], sg.node(id).inputs()[0])
                else {
                    continue;
                };
                let cap = match sg.value_by_name(&out_name) {
                    Some(cap) => cap,
                    None => match sg.add_capture(out_name.clone()) {
                        Ok(cap) => cap,
                        Err(_) => continue,
                    },
                };
                sg.value_mut(cap).ty = sg.value(inner).ty.clone().or(ty.clone());
                if bypass(sg, id, cap) {
                    sg.remove_capture(x);
                    c.hoisted += 1;
                    any = true;
                }
            }
        }
        g.node_mut(n).attributes = attrs;
        // the node's implicit inputs: the names its bodies now capture, as `g` resolves them
        let vs: Vec<ValueId> = g
            .node(n)
            .captured_names()
            .iter()
            .filter_map(|nm| g.value_by_name(nm))
            .collect();
        g.set_implicit_inputs(n, vs);
    }
    any
}

/// (captured name, dtype) of a body Cast that reads a value captured from the enclosing graph and whose output
/// is [`replaceable`].
fn captured_cast(sg: &Graph, id: NodeId) -> Option<(String, DType)> {
    let (to, x) = cast_parts(sg, id)?;
    let out = sg.node(id).outputs()[0]?;
    (sg.value(x).def() == Def::Capture && replaceable(sg, out))
        .then(|| (sg.value(x).name().to_string(), to))
}
