//! Finding and building nodes: a small pattern matcher over op type, attributes and dtypes with captures, and a
//! node builder that keeps every index current.
//!
//! ```
//! use mpopt_ir::pattern::{NodeBuilder, Pattern};
//! use mpopt_ir::{DType, Graph, TypeInfo};
//!
//! let mut g = Graph::new("g");
//! let x = g.add_input("x", Some(TypeInfo::tensor(DType::F32, None))).unwrap();
//! let w = g.add_input("w", Some(TypeInfo::tensor(DType::F32, None))).unwrap();
//! let b = g.add_input("b", Some(TypeInfo::tensor(DType::F32, None))).unwrap();
//! let h = NodeBuilder::new("MatMul").input(x).input(w).output("h").append(&mut g).unwrap()[0];
//! let y = NodeBuilder::new("Add").input(h).input(b).output("y").append(&mut g).unwrap()[0];
//! g.add_output(y);
//!
//! // Add(MatMul(a, w), bias), capturing the MatMul and its inputs
//! let p = Pattern::op("Add")
//!     .input(0, Pattern::op("MatMul").capture("mm").input(0, Pattern::any().capture("a")))
//!     .input(1, Pattern::any().capture("bias"));
//! let found = p.find(&g);
//! assert_eq!(found.len(), 1);
//! assert_eq!(found[0].value("a"), Some(x));
//! assert_eq!(found[0].value("bias"), Some(b));
//! ```

use std::collections::BTreeMap;

use crate::{AttrValue, Attribute, DType, EditError, Graph, Node, NodeId, TypeInfo, ValueId};

/// Builds a node and its output values, and adds it to a graph.
#[derive(Clone, Debug)]
pub struct NodeBuilder {
    node: Node,
    inputs: Vec<Option<ValueId>>,
    outputs: Vec<(String, Option<TypeInfo>)>,
}

impl NodeBuilder {
    /// A node of this op type (default domain).
    pub fn new(op_type: impl Into<String>) -> NodeBuilder {
        NodeBuilder {
            node: Node::new(op_type),
            inputs: Vec::new(),
            outputs: Vec::new(),
        }
    }

    /// Sets the domain.
    pub fn domain(mut self, d: impl Into<String>) -> Self {
        self.node.domain = d.into();
        self
    }

    /// Sets the node name.
    pub fn name(mut self, n: impl Into<String>) -> Self {
        self.node.name = n.into();
        self
    }

    /// Appends an input.
    pub fn input(mut self, v: ValueId) -> Self {
        self.inputs.push(Some(v));
        self
    }

    /// Appends an omitted optional input.
    pub fn no_input(mut self) -> Self {
        self.inputs.push(None);
        self
    }

    /// Adds an attribute.
    pub fn attr(mut self, name: impl Into<String>, value: AttrValue) -> Self {
        self.node.attributes.push(Attribute::new(name, value));
        self
    }

    /// Appends an output value with this name (made unique in the graph when taken).
    pub fn output(mut self, name: impl Into<String>) -> Self {
        self.outputs.push((name.into(), None));
        self
    }

    /// Appends an output value with a type.
    pub fn typed_output(mut self, name: impl Into<String>, ty: TypeInfo) -> Self {
        self.outputs.push((name.into(), Some(ty)));
        self
    }

    fn values(&self, g: &mut Graph) -> Result<Vec<ValueId>, EditError> {
        self.outputs
            .iter()
            .map(|(n, t)| {
                let name = g.fresh_name(n);
                g.add_value(name, t.clone())
            })
            .collect()
    }

    /// Appends the node at the end of the schedule; returns its output values.
    pub fn append(self, g: &mut Graph) -> Result<Vec<ValueId>, EditError> {
        let outs = self.values(g)?;
        let o: Vec<Option<ValueId>> = outs.iter().map(|&v| Some(v)).collect();
        g.add_node(self.node, &self.inputs, &o)?;
        Ok(outs)
    }

    /// Inserts the node just before `anchor`; returns its output values.
    pub fn insert_before(self, g: &mut Graph, anchor: NodeId) -> Result<Vec<ValueId>, EditError> {
        let outs = self.values(g)?;
        let o: Vec<Option<ValueId>> = outs.iter().map(|&v| Some(v)).collect();
        g.insert_node_before(anchor, self.node, &self.inputs, &o)?;
        Ok(outs)
    }
}

/// A pattern over a node and, recursively, the producers of its inputs.
#[derive(Clone, Debug, Default)]
pub struct Pattern {
    op: Option<(String, String)>,
    name: Option<String>,
    attrs: Vec<(String, AttrValue)>,
    dtype: Option<DType>,
    inputs: Vec<(usize, Pattern)>,
    capture: Option<String>,
    single_use: bool,
}

/// What a pattern matched: the root node and every capture by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Match {
    /// The node the pattern's root matched.
    pub root: NodeId,
    /// Captured nodes (patterns on ops).
    pub nodes: BTreeMap<String, NodeId>,
    /// Captured values (every capture, as the value the pattern matched).
    pub values: BTreeMap<String, ValueId>,
}

impl Match {
    /// A captured node.
    pub fn node(&self, name: &str) -> Option<NodeId> {
        self.nodes.get(name).copied()
    }
    /// A captured value.
    pub fn value(&self, name: &str) -> Option<ValueId> {
        self.values.get(name).copied()
    }
}

impl Pattern {
    /// Matches any value (a graph input, an initializer, any node's output).
    pub fn any() -> Pattern {
        Pattern::default()
    }

    /// Matches a value produced by this op type (default domain).
    pub fn op(op: &str) -> Pattern {
        Pattern {
            op: Some((String::new(), op.to_string())),
            ..Pattern::default()
        }
    }

    /// Matches a value produced by `domain::op`.
    pub fn domain_op(domain: &str, op: &str) -> Pattern {
        Pattern {
            op: Some((domain.to_string(), op.to_string())),
            ..Pattern::default()
        }
    }

    /// Requires the matched node's name.
    pub fn named(mut self, name: &str) -> Self {
        self.name = Some(name.to_string());
        self
    }

    /// Requires an attribute with this value.
    pub fn attr(mut self, name: &str, value: AttrValue) -> Self {
        self.attrs.push((name.to_string(), value));
        self
    }

    /// Requires the matched value's element type.
    pub fn dtype(mut self, d: DType) -> Self {
        self.dtype = Some(d);
        self
    }

    /// Requires input `i` of the matched node to match `p`.
    pub fn input(mut self, i: usize, p: Pattern) -> Self {
        self.inputs.push((i, p));
        self
    }

    /// Names what this pattern matches.
    pub fn capture(mut self, name: &str) -> Self {
        self.capture = Some(name.to_string());
        self
    }

    /// Requires the matched value to have exactly one use (so a rewrite may remove its producer).
    pub fn single_use(mut self) -> Self {
        self.single_use = true;
        self
    }

    /// Every match in the graph, roots in schedule order.
    pub fn find(&self, g: &Graph) -> Vec<Match> {
        let mut out = Vec::new();
        for (id, n) in g.nodes() {
            if !self.node_matches(g, id) {
                continue;
            }
            let mut m = Match {
                root: id,
                nodes: BTreeMap::new(),
                values: BTreeMap::new(),
            };
            if let Some(c) = &self.capture {
                m.nodes.insert(c.clone(), id);
                if let Some(v) = n.outputs().first().copied().flatten() {
                    m.values.insert(c.clone(), v);
                }
            }
            if self.inputs_match(g, id, &mut m) {
                out.push(m);
            }
        }
        out
    }

    fn node_matches(&self, g: &Graph, id: NodeId) -> bool {
        let n = g.node(id);
        let dom = if n.domain == "ai.onnx" {
            ""
        } else {
            n.domain.as_str()
        };
        if let Some((d, op)) = &self.op {
            if d != dom || *op != n.op_type {
                return false;
            }
        } else {
            return false;
        }
        if self.name.as_ref().is_some_and(|want| *want != n.name) {
            return false;
        }
        self.attrs
            .iter()
            .all(|(name, v)| n.attr(name).is_some_and(|a| attr_eq(&a.value, v)))
    }

    fn inputs_match(&self, g: &Graph, id: NodeId, m: &mut Match) -> bool {
        for (i, p) in &self.inputs {
            let Some(v) = g.node(id).inputs().get(*i).copied().flatten() else {
                return false;
            };
            if !p.value_matches(g, v, m) {
                return false;
            }
        }
        true
    }

    fn value_matches(&self, g: &Graph, v: ValueId, m: &mut Match) -> bool {
        if let Some(d) = self.dtype
            && g.value(v).ty.as_ref().and_then(TypeInfo::tensor_elem) != Some(d)
        {
            return false;
        }
        if self.single_use && (g.uses(v).len() != 1 || g.outputs().contains(&v)) {
            return false;
        }
        if self.op.is_some() {
            let Some((p, _)) = g.producer(v) else {
                return false;
            };
            if !self.node_matches(g, p) || !self.inputs_match(g, p, m) {
                return false;
            }
            if let Some(c) = &self.capture {
                m.nodes.insert(c.clone(), p);
            }
        }
        if let Some(c) = &self.capture {
            m.values.insert(c.clone(), v);
        }
        true
    }
}

fn attr_eq(a: &AttrValue, b: &AttrValue) -> bool {
    match (a, b) {
        (AttrValue::Int(x), AttrValue::Int(y)) => x == y,
        (AttrValue::Float(x), AttrValue::Float(y)) => x == y,
        (AttrValue::String(x), AttrValue::String(y)) => x == y,
        (AttrValue::Ints(x), AttrValue::Ints(y)) => x == y,
        (AttrValue::Floats(x), AttrValue::Floats(y)) => x == y,
        (AttrValue::Strings(x), AttrValue::Strings(y)) => x == y,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_with_attributes_dtypes_and_single_use() {
        let mut g = Graph::new("g");
        let t = |d| Some(TypeInfo::tensor(d, None));
        let x = g.add_input("x", t(DType::F32)).unwrap();
        let c = NodeBuilder::new("Cast")
            .input(x)
            .attr("to", AttrValue::Int(10))
            .typed_output("c", TypeInfo::tensor(DType::F16, None))
            .append(&mut g)
            .unwrap()[0];
        let r = NodeBuilder::new("Relu")
            .input(c)
            .output("r")
            .append(&mut g)
            .unwrap()[0];
        let r2 = NodeBuilder::new("Relu")
            .input(c)
            .output("r")
            .append(&mut g)
            .unwrap()[0];
        assert_ne!(
            g.value(r).name(),
            g.value(r2).name(),
            "output names are made unique"
        );
        let p = Pattern::op("Relu").input(
            0,
            Pattern::op("Cast")
                .attr("to", AttrValue::Int(10))
                .dtype(DType::F16)
                .capture("cast"),
        );
        assert_eq!(p.find(&g).len(), 2);
        let single = Pattern::op("Relu").input(0, Pattern::op("Cast").single_use());
        assert!(single.find(&g).is_empty(), "the cast has two uses");
        assert_eq!(Pattern::op("Cast").named("nope").find(&g).len(), 0);
        let mut named = Graph::new("n");
        let a = named.add_input("a", t(DType::F32)).unwrap();
        NodeBuilder::new("Relu")
            .name("first")
            .input(a)
            .output("o")
            .append(&mut named)
            .unwrap();
        NodeBuilder::new("Relu")
            .name("second")
            .input(a)
            .output("o")
            .append(&mut named)
            .unwrap();
        let m = Pattern::op("Relu").named("second").find(&named);
        assert_eq!(m.len(), 1);
        assert_eq!(named.node(m[0].root).name, "second");
        let wrong = Pattern::op("Relu").input(0, Pattern::op("Cast").attr("to", AttrValue::Int(1)));
        assert!(wrong.find(&g).is_empty());
    }
}
