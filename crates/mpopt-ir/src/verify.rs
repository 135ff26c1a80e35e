//! The verifier: structural and type invariants every pass must keep.
//!
//! Checked in every graph, subgraphs and function bodies included:
//! - producer/consumer indexes agree with node inputs and outputs, and the schedule holds each live node once;
//! - every used value is defined (graph input, initializer, node output, or capture), exactly once;
//! - the schedule is topological, counting the implicit inputs of nodes with subgraphs; when it is not, a cycle
//!   is told apart from a mere misordering (petgraph's `toposort` over the dependence graph);
//! - graph outputs are defined;
//! - a subgraph's captures are exactly what its owning node lists as implicit inputs; the main graph and
//!   function bodies capture nothing;
//! - dtypes agree where known: initializer data vs its declared type, data length vs dims, Cast `to` vs the
//!   output's declared element type.

use rustc_hash::FxHashSet as HashSet;
use std::fmt;

use petgraph::stable_graph::StableDiGraph;

use crate::{AttrValue, DType, Def, Graph, Model, NodeId, Type, Use, ValueId};

/// One violated invariant, with where it was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The scope: `graph 'main'`, `graph 'main' / node 'If_0' (If) / then_branch`, `function 'f'`.
    pub scope: String,
    /// What is wrong, naming the node or value.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.scope, self.message)
    }
}

/// The verifier's verdict: every problem found (at most [`MAX_PROBLEMS`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct VerifyError {
    /// The problems, in graph order.
    pub problems: Vec<Problem>,
}

/// The verifier stops collecting after this many problems.
pub const MAX_PROBLEMS: usize = 20;

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let first = &self.problems[0];
        write!(f, "{first}")?;
        if self.problems.len() > 1 {
            write!(f, " (and {} more problem(s))", self.problems.len() - 1)?;
        }
        Ok(())
    }
}

/// Verifies a whole model.
pub fn verify_model(m: &Model) -> Result<(), VerifyError> {
    let opsets = m.opsets();
    let mut cx = Cx {
        problems: Vec::new(),
        opsets,
    };
    cx.graph(&m.graph, &format!("graph '{}'", m.graph.name), true);
    for f in &m.functions {
        cx.graph(&f.body, &format!("function '{}'", f.name), true);
    }
    cx.finish()
}

/// Verifies one graph on its own (as a top-level scope when `top` is true).
pub fn verify_graph(g: &Graph, top: bool) -> Result<(), VerifyError> {
    let mut cx = Cx {
        problems: Vec::new(),
        opsets: crate::Opsets::default(),
    };
    cx.graph(g, &format!("graph '{}'", g.name), top);
    cx.finish()
}

/// A node's name for messages: `'name' (Op)` or `#id (Op)` when unnamed.
pub fn node_label(g: &Graph, n: NodeId) -> String {
    let node = g.node(n);
    if node.name.is_empty() {
        format!("#{} ({})", n.0, node.qualified_op())
    } else {
        format!("'{}' ({})", node.name, node.qualified_op())
    }
}

struct Cx {
    problems: Vec<Problem>,
    /// The model's opsets; type constraints are checked only when they are known.
    opsets: crate::Opsets,
}

impl Cx {
    fn finish(self) -> Result<(), VerifyError> {
        if self.problems.is_empty() {
            Ok(())
        } else {
            Err(VerifyError {
                problems: self.problems,
            })
        }
    }

    fn push(&mut self, scope: &str, message: String) {
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(Problem {
                scope: scope.to_string(),
                message,
            });
        }
    }

    fn graph(&mut self, g: &Graph, scope: &str, top: bool) {
        if top {
            for &c in g.captures() {
                self.push(
                    scope,
                    format!("value '{}' is used but never defined", g.value(c).name()),
                );
            }
        }
        // Schedule positions; also checks that the schedule holds each live node once.
        let mut pos = vec![usize::MAX; g.node_bound()];
        let mut count = 0;
        for (i, (n, _)) in g.nodes().enumerate() {
            if pos[n.index()] != usize::MAX {
                self.push(
                    scope,
                    format!("node {} is scheduled twice", node_label(g, n)),
                );
                return;
            }
            pos[n.index()] = i;
            count += 1;
        }
        if count != g.node_count() {
            self.push(
                scope,
                format!("schedule holds {count} nodes, graph has {}", g.node_count()),
            );
        }

        // Index integrity, value side.
        for v in g.value_ids() {
            let val = g.value(v);
            if let Def::Node(n, s) = val.def()
                && (!g.is_live(n) || g.node(n).outputs().get(s as usize) != Some(&Some(v)))
            {
                self.push(
                    scope,
                    format!(
                        "value '{}' names a producer that does not output it",
                        val.name()
                    ),
                );
            }
            for &u in val.uses() {
                let ok = g.is_live(u.node())
                    && match u {
                        Use::Input(n, s) => g.node(n).inputs().get(s as usize) == Some(&Some(v)),
                        Use::Implicit(n, s) => {
                            g.node(n).implicit_inputs().get(s as usize) == Some(&v)
                        }
                    };
                if !ok {
                    self.push(
                        scope,
                        format!("value '{}' lists a use that does not read it", val.name()),
                    );
                }
            }
        }

        // Definitions before uses.
        let mut misordered = false;
        for (n, node) in g.nodes() {
            let reads = node
                .inputs()
                .iter()
                .enumerate()
                .filter_map(|(i, v)| v.map(|v| (v, Use::Input(n, i as u32))))
                .chain(
                    node.implicit_inputs()
                        .iter()
                        .enumerate()
                        .map(|(i, &v)| (v, Use::Implicit(n, i as u32))),
                );
            for (v, u) in reads {
                if v.index() >= g.value_bound() {
                    self.push(
                        scope,
                        format!("node {} reads a value id out of range", node_label(g, n)),
                    );
                    continue;
                }
                let val = g.value(v);
                if !val.uses().contains(&u) {
                    self.push(
                        scope,
                        format!(
                            "node {} reads '{}' without a recorded use",
                            node_label(g, n),
                            val.name()
                        ),
                    );
                }
                match val.def() {
                    Def::Detached => self.push(
                        scope,
                        format!(
                            "node {} reads '{}', which nothing defines",
                            node_label(g, n),
                            val.name()
                        ),
                    ),
                    Def::Node(p, _) if g.is_live(p) && pos[p.index()] >= pos[n.index()] => {
                        misordered = true
                    }
                    _ => {}
                }
            }
            for (i, o) in node.outputs().iter().enumerate() {
                if let Some(o) = o
                    && g.value(*o).def() != Def::Node(n, i as u32)
                {
                    self.push(
                        scope,
                        format!(
                            "node {} outputs '{}', which is defined elsewhere",
                            node_label(g, n),
                            g.value(*o).name()
                        ),
                    );
                }
            }
            self.node_types(g, n, scope);
            self.subgraphs(g, n, scope);
        }
        if misordered {
            self.order(g, &pos, scope);
        }
        for &o in g.outputs() {
            if g.value(o).def() == Def::Detached {
                self.push(
                    scope,
                    format!("graph output '{}' is not produced", g.value(o).name()),
                );
            }
        }
        for &v in g.initializers() {
            self.initializer(g, v, scope);
        }
    }

    /// Called when some node reads a value produced later: name the cycle if there is one.
    fn order(&mut self, g: &Graph, pos: &[usize], scope: &str) {
        let mut dg: StableDiGraph<NodeId, ValueId> = StableDiGraph::new();
        let mut ix = vec![None; g.node_bound()];
        for (n, _) in g.nodes() {
            ix[n.index()] = Some(dg.add_node(n));
        }
        for (n, node) in g.nodes() {
            let reads = node
                .inputs()
                .iter()
                .flatten()
                .chain(node.implicit_inputs().iter());
            for &v in reads {
                if let Some((p, _)) = g.producer(v)
                    && let (Some(a), Some(b)) = (ix[p.index()], ix[n.index()])
                {
                    dg.add_edge(a, b, v);
                }
            }
        }
        match petgraph::algo::toposort(&dg, None) {
            Err(_) => {
                // Name every node of each cycle (a strongly connected component), in schedule order.
                for scc in petgraph::algo::tarjan_scc(&dg) {
                    let self_loop = scc.len() == 1 && dg.contains_edge(scc[0], scc[0]);
                    if scc.len() < 2 && !self_loop {
                        continue;
                    }
                    let mut nodes: Vec<NodeId> = scc.iter().map(|&i| dg[i]).collect();
                    nodes.sort_by_key(|n| pos[n.index()]);
                    let names: Vec<String> = nodes.iter().map(|&n| node_label(g, n)).collect();
                    self.push(scope, format!("cycle through nodes {}", names.join(" -> ")));
                }
            }
            Ok(_) => {
                for (n, node) in g.nodes() {
                    for &v in node.inputs().iter().flatten().chain(node.implicit_inputs()) {
                        if let Some((p, _)) = g.producer(v)
                            && pos[p.index()] >= pos[n.index()]
                        {
                            self.push(
                                    scope,
                                    format!(
                                        "node {} reads '{}' before node {} produces it (not in topological order)",
                                        node_label(g, n),
                                        g.value(v).name(),
                                        node_label(g, p)
                                    ),
                                );
                        }
                    }
                }
            }
        }
    }

    fn subgraphs(&mut self, g: &Graph, n: NodeId, scope: &str) {
        let node = g.node(n);
        if !node.has_subgraphs() && node.implicit_inputs().is_empty() {
            return;
        }
        let mut captured: HashSet<&str> = HashSet::default();
        for (attr, sub) in node.subgraphs() {
            let sub_scope = format!("{scope} / node {} / {attr}", node_label(g, n));
            self.graph(sub, &sub_scope, false);
            captured.extend(sub.captures().iter().map(|&c| sub.value(c).name()));
        }
        let implicit: HashSet<&str> = node
            .implicit_inputs()
            .iter()
            .map(|&v| g.value(v).name())
            .collect();
        let mut missing: Vec<_> = captured.difference(&implicit).collect();
        missing.sort();
        for name in missing {
            self.push(
                scope,
                format!(
                    "node {}: a subgraph reads '{name}', which is not an implicit input",
                    node_label(g, n)
                ),
            );
        }
        let mut extra: Vec<_> = implicit.difference(&captured).collect();
        extra.sort();
        for name in extra {
            self.push(
                scope,
                format!(
                    "node {}: implicit input '{name}' is read by no subgraph",
                    node_label(g, n)
                ),
            );
        }
    }

    /// Every homogeneous type parameter of the node's schema binds one dtype (where dtypes are known).
    fn type_params(&mut self, g: &Graph, n: NodeId, scope: &str) {
        let node = g.node(n);
        let dom = crate::canonical_domain(&node.domain);
        let Some(opset) = self.opsets.version(dom) else {
            return;
        };
        let Some(schema) = crate::schema::registry().get(dom, &node.op_type, opset) else {
            return;
        };
        // (parameter, dtype, is_input, slot, value): described only when two bindings disagree
        let mut bound: Vec<(&str, DType, bool, usize, crate::ValueId)> = Vec::new();
        for (vals, is_input) in [(node.inputs(), true), (node.outputs(), false)] {
            for (i, v) in vals.iter().enumerate() {
                let Some(v) = *v else { continue };
                let p = if is_input {
                    schema.input_param(i)
                } else {
                    schema.output_param(i)
                };
                let Some(p) = p else { continue };
                let crate::schema::TypeSpec::Param(name) = &p.ty else {
                    continue;
                };
                if !p.homogeneous {
                    continue;
                }
                let Some(d) = g.value(v).ty.as_ref().and_then(|t| t.tensor_elem()) else {
                    continue;
                };
                match bound.iter().find(|b| b.0 == name) {
                    Some(&(_, d0, in0, i0, v0)) if d0 != d => {
                        let describe = |is_input: bool, i: usize, v: crate::ValueId| {
                            format!(
                                "{} {i} '{}'",
                                if is_input { "input" } else { "output" },
                                g.value(v).name()
                            )
                        };
                        self.push(
                            scope,
                            format!(
                                "node {}: type parameter {name} is bound to {d0} ({}) and {d} ({})",
                                node_label(g, n),
                                describe(in0, i0, v0),
                                describe(is_input, i, v)
                            ),
                        );
                        return;
                    }
                    Some(_) => {}
                    None => bound.push((name.as_str(), d, is_input, i, v)),
                }
            }
        }
    }

    /// Dtype ties that onnx's type inference enforces beyond the schema's type parameters
    /// ([`crate::schema::INFERENCE_TIES`]; onnx.checker refuses a model that breaks one): BitCast keeps the
    /// bit width; the others' first output has their first input's type.
    fn inferred_ties(&mut self, g: &Graph, n: NodeId, scope: &str) {
        let node = g.node(n);
        if !node.in_default_domain() {
            return;
        }
        let elem = |v: Option<&Option<crate::ValueId>>| {
            v.copied()
                .flatten()
                .and_then(|v| g.value(v).ty.as_ref().and_then(|t| t.tensor_elem()))
        };
        let (input, output) = (elem(node.inputs().first()), elem(node.outputs().first()));
        let problem = match node.op_type.as_str() {
            "BitCast" => match (input, output) {
                (Some(i), Some(o)) if i.bits() != o.bits() => Some(format!(
                    "BitCast from {i} ({} bits) to {o} ({} bits): the widths must be equal",
                    i.bits(),
                    o.bits()
                )),
                _ => None,
            },
            op if crate::schema::INFERENCE_TIES.contains(&op)
                && (op == "RMSNormalization" || node.attr("dtype").is_none()) =>
            {
                match (input, output) {
                    (Some(i), Some(o)) if i != o => Some(format!(
                        "{} reads {i} but its output is {o}: onnx's type inference gives the output \
                         the input's type",
                        node.op_type
                    )),
                    _ => None,
                }
            }
            _ => None,
        };
        if let Some(p) = problem {
            self.push(scope, format!("node {}: {p}", node_label(g, n)));
        }
    }

    fn node_types(&mut self, g: &Graph, n: NodeId, scope: &str) {
        self.type_params(g, n, scope);
        self.inferred_ties(g, n, scope);
        let node = g.node(n);
        if node.op_type == "Cast" && (node.domain.is_empty() || node.domain == "ai.onnx") {
            let to = node.attr("to").and_then(|a| match a.value {
                AttrValue::Int(i) => Some(i),
                _ => None,
            });
            let out = node.outputs().first().copied().flatten();
            if let (Some(to), Some(out)) = (to, out) {
                let declared = g.value(out).ty.as_ref().and_then(|t| t.tensor_elem());
                match (DType::from_code(to as i32), declared) {
                    (None, _) => self.push(
                        scope,
                        format!("node {}: Cast to unknown dtype {to}", node_label(g, n)),
                    ),
                    (Some(d), Some(e)) if d != e => self.push(
                        scope,
                        format!(
                            "node {}: Cast to {d} but output '{}' is declared {e}",
                            node_label(g, n),
                            g.value(out).name()
                        ),
                    ),
                    _ => {}
                }
            }
        }
    }

    fn initializer(&mut self, g: &Graph, v: ValueId, scope: &str) {
        let val = g.value(v);
        let Some(t) = &val.initializer else { return };
        if let Err(e) = t.check_len() {
            self.push(scope, format!("initializer '{}': {e}", val.name()));
        }
        if let Some(Type::Tensor { elem, shape }) = val.ty.as_ref().map(|t| &t.ty) {
            if let Some(e) = elem
                && *e != t.dtype
            {
                self.push(
                    scope,
                    format!(
                        "initializer '{}' holds {} but is declared {e}",
                        val.name(),
                        t.dtype
                    ),
                );
            }
            if let Some(dims) = shape {
                let clash = dims.len() != t.dims.len()
                    || dims
                        .iter()
                        .zip(&t.dims)
                        .any(|(d, &n)| matches!(d.value, crate::DimValue::Known(k) if k != n));
                if clash {
                    self.push(
                        scope,
                        format!(
                            "initializer '{}' has dims {:?}, which its declared shape contradicts",
                            val.name(),
                            t.dims
                        ),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Node, Tensor, TypeInfo};

    fn chain() -> (Graph, NodeId, NodeId) {
        let mut g = Graph::new("main");
        let x = g
            .add_input("x", Some(TypeInfo::tensor(DType::F32, None)))
            .unwrap();
        let y = g.add_value("y", None).unwrap();
        let z = g.add_value("z", None).unwrap();
        let mut a = Node::new("Relu");
        a.name = "a".into();
        let a = g.add_node(a, &[Some(x)], &[Some(y)]).unwrap();
        let mut b = Node::new("Neg");
        b.name = "b".into();
        let b = g.add_node(b, &[Some(y)], &[Some(z)]).unwrap();
        g.add_output(z);
        (g, a, b)
    }

    #[test]
    fn accepts_a_valid_graph() {
        verify_graph(&chain().0, true).unwrap();
    }

    #[test]
    fn reports_misorder_and_cycles() {
        let (mut g, a, b) = chain();
        g.move_before(b, a);
        let e = verify_graph(&g, true).unwrap_err();
        assert_eq!(
            e.to_string(),
            "graph 'main': node 'b' (Neg) reads 'y' before node 'a' (Relu) produces it (not in topological order)"
        );
        let z = g.value_by_name("z").unwrap();
        g.set_input(a, 0, Some(z));
        let e = verify_graph(&g, true).unwrap_err();
        assert_eq!(
            e.to_string(),
            "graph 'main': cycle through nodes 'b' (Neg) -> 'a' (Relu)"
        );
    }

    #[test]
    fn reports_dangling_and_unproduced_outputs() {
        let (mut g, a, _) = chain();
        g.remove_node(a);
        let e = verify_graph(&g, true).unwrap_err();
        assert_eq!(
            e.to_string(),
            "graph 'main': node 'b' (Neg) reads 'y', which nothing defines"
        );
        let (mut g, _, b) = chain();
        g.remove_node(b);
        let e = verify_graph(&g, true).unwrap_err();
        assert_eq!(
            e.to_string(),
            "graph 'main': graph output 'z' is not produced"
        );
    }

    #[test]
    fn reports_initializer_type_clash() {
        let mut g = Graph::new("main");
        let w = g
            .add_initializer("w", Tensor::from_f32(vec![2], &[1.0, 2.0]))
            .unwrap();
        g.value_mut(w).ty = Some(TypeInfo::tensor(DType::F16, None));
        g.add_output(w);
        let e = verify_graph(&g, true).unwrap_err();
        assert_eq!(
            e.to_string(),
            "graph 'main': initializer 'w' holds f32 but is declared f16"
        );
    }

    #[test]
    fn reports_the_dtype_ties_of_onnx_type_inference() {
        // one node reading %y: f16 and writing %z
        let verdict = |z: &str, node: &str| {
            let src = format!(
                "ir_version 13\nopset ai.onnx 26\n\ngraph @g(%y: f16[2]) -> (%z: {z}) {{\n  \
                 %s = const f32[2] [1.0, 1.0]\n  %z = {node}\n}}"
            );
            verify_model(&crate::text::parse_model(&src).unwrap()).map_err(|e| e.to_string())
        };
        let e = verdict("i32[2]", "BitCast(%y) {to = 6}").unwrap_err();
        assert!(
            e.contains("BitCast from f16 (16 bits) to i32 (32 bits)"),
            "{e}"
        );
        let e = verdict("f32[2]", "RMSNormalization(%y, %s)").unwrap_err();
        assert!(
            e.contains("RMSNormalization reads f16 but its output is f32"),
            "{e}"
        );
        let e = verdict("f32[2]", "RandomNormalLike(%y)").unwrap_err();
        assert!(
            e.contains("RandomNormalLike reads f16 but its output is f32"),
            "{e}"
        );
        // the same widths, or a `dtype` that says the output's type: valid
        verdict("i16[2]", "BitCast(%y) {to = 5}").unwrap();
        verdict("f32[2]", "RandomNormalLike(%y) {dtype = 1}").unwrap();
    }
}
