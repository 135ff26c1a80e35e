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
//! - *constants*: a Cast of a float initializer or Constant is folded into the data (the same rounding the
//!   Cast would do at run time); the original is kept when something else still reads it.
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

use mpopt_ir::{AttrValue, DType, Def, Graph, Model, Node, NodeId, ValueId};

use crate::insert_casts::convert_tensor;
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
}

impl Pass for FuseCasts {
    fn name(&self) -> &'static str {
        "fuse-casts"
    }

    fn run(&mut self, model: &mut Model) -> Result<PassOutcome, PassError> {
        let mut c = Counts::default();
        fuse_graph(&mut model.graph, self.unsafe_narrow_widen, &mut c);
        Ok(PassOutcome {
            changed: c.noop + c.chains + c.duplicates + c.folded > 0,
            counters: vec![
                ("no-op casts removed", c.noop),
                ("cast chains shortened", c.chains),
                ("duplicate casts merged", c.duplicates),
                ("casts folded into constants", c.folded),
            ],
            notes: Vec::new(),
            records: Vec::new(),
        })
    }
}

/// Replaces the Cast `n`'s output by `with` everywhere and removes the Cast; refuses graph outputs.
fn bypass(g: &mut Graph, n: NodeId, with: ValueId) -> bool {
    let Some(out) = g.node(n).outputs()[0] else {
        return false;
    };
    if g.outputs().contains(&out) {
        return false;
    }
    g.replace_all_uses(out, with);
    g.remove_node(n);
    true
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

fn fuse_graph(g: &mut Graph, unsafe_nw: bool, c: &mut Counts) {
    let with_subgraphs: Vec<NodeId> = g
        .nodes()
        .filter(|(_, n)| n.has_subgraphs())
        .map(|(id, _)| id)
        .collect();
    for id in with_subgraphs {
        let mut attrs = std::mem::take(&mut g.node_mut(id).attributes);
        for a in &mut attrs {
            for sg in a.value.graphs_mut() {
                fuse_graph(sg, unsafe_nw, c);
            }
        }
        g.node_mut(id).attributes = attrs;
    }
    loop {
        let mut changed = false;
        let casts: Vec<NodeId> = g
            .nodes()
            .filter(|(_, n)| cast_to(n).is_some())
            .map(|(id, _)| id)
            .collect();
        for id in casts {
            if !g.is_live(id) {
                continue;
            }
            let to = cast_to(g.node(id)).expect("a Cast");
            let Some(x) = g.node(id).inputs().first().copied().flatten() else {
                continue;
            };
            let Some(from) = elem(g, x) else { continue };
            // no-op
            if from == to && bypass(g, id, x) {
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
            // a constant source: fold
            let src = g
                .value(x)
                .initializer
                .as_deref()
                .cloned()
                .filter(|_| g.value(x).def() == Def::Initializer);
            if let Some(t) = src.filter(|t| t.dtype.is_float() && to.is_float())
                && let Some((conv, _)) = convert_tensor(&t, to)
            {
                let Some(out) = g.node(id).outputs()[0] else {
                    continue;
                };
                if g.outputs().contains(&out) {
                    continue;
                }
                let name = g.fresh_name(&format!("{}__{to}", g.value(x).name()));
                let mut conv = conv;
                conv.name = name.clone();
                if let Ok(nv) = g.add_initializer(name, conv) {
                    g.replace_all_uses(out, nv);
                    g.remove_node(id);
                    if g.uses(x).is_empty() && !g.outputs().contains(&x) {
                        g.remove_initializer(x);
                    }
                    c.folded += 1;
                    changed = true;
                    continue;
                }
            }
        }
        // duplicates: the same value cast to the same dtype
        let mut seen: std::collections::HashMap<(ValueId, DType), NodeId> =
            std::collections::HashMap::new();
        let casts: Vec<NodeId> = g
            .nodes()
            .filter(|(_, n)| cast_to(n).is_some())
            .map(|(id, _)| id)
            .collect();
        for id in casts {
            let to = cast_to(g.node(id)).expect("a Cast");
            let Some(x) = g.node(id).inputs().first().copied().flatten() else {
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
