//! Graphs of nodes and values.
//!
//! A [`Graph`] is one scope: the main graph, a subgraph held by a node attribute (If/Loop/Scan bodies) or a
//! function body. Nodes and values live in arenas indexed by [`NodeId`] and [`ValueId`] (`u32`, never reused
//! within a graph, so an id held by a pass never silently points at something else). Schedule order is kept apart
//! from the arenas as a doubly linked list, so inserting or removing a node renumbers nothing and costs O(1).
//!
//! Every value knows how it is defined ([`Def`]) and every use of it ([`Use`]); the edit methods keep both
//! directions current in O(1) per edit (O(uses of one value) to unlink a use).
//!
//! Outer-scope reads are explicit: a subgraph that reads a value of an enclosing graph has a *capture* value of
//! the same name ([`Def::Capture`], listed by [`Graph::captures`]), and the node that owns the subgraph lists the
//! enclosing graph's values it thereby reads as *implicit inputs* ([`Node::implicit_inputs`]). An implicit input
//! is a real use: it orders the owning node after the producer, keeps the value alive, and shows up in
//! [`Graph::uses`].

use rustc_hash::FxHashMap;

use crate::{Attribute, SparseTensor, Tensor, TypeInfo};

/// A value's index in its graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(pub u32);

/// A node's index in its graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u32);

impl ValueId {
    /// The index as usize, for side tables.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl NodeId {
    /// The index as usize, for side tables.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// How a value comes to exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Def {
    /// Not defined (new, or its producer was removed).
    Detached,
    /// A graph input (it may also have an initializer, as a default value).
    Input,
    /// An initializer (dense or sparse) that is not a graph input.
    Initializer,
    /// Output `slot` of a node.
    Node(NodeId, u32),
    /// Read from an enclosing scope by name.
    Capture,
}

/// One use of a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Use {
    /// Input `slot` of a node.
    Input(NodeId, u32),
    /// Implicit input `slot` of a node (read by one of its subgraphs).
    Implicit(NodeId, u32),
}

impl Use {
    /// The using node.
    pub fn node(self) -> NodeId {
        match self {
            Use::Input(n, _) | Use::Implicit(n, _) => n,
        }
    }
}

/// A value (an ONNX tensor name) and what is known about it.
#[derive(Clone, Debug)]
pub struct Value {
    /// The ONNX name, unique in its graph.
    pub(crate) name: String,
    /// Declared or inferred type, if known.
    pub ty: Option<TypeInfo>,
    /// Dense initializer data (boxed: most values have none, and this keeps `Value` small).
    pub initializer: Option<Box<Tensor>>,
    /// Sparse initializer data.
    pub sparse_initializer: Option<Box<SparseTensor>>,
    /// Doc string from the model's value info.
    pub doc_string: String,
    /// Metadata properties from the model's value info.
    pub metadata_props: Vec<(String, String)>,
    /// Range facts from `analyze-ranges` and calibration (boxed: absent until that pass runs).
    pub range: Option<Box<crate::ValueRange>>,
    pub(crate) def: Def,
    pub(crate) uses: Vec<Use>,
    /// Listed in the graph's `value_info` (kept here so that listing is O(1)).
    pub(crate) in_value_info: bool,
}

impl Value {
    /// The ONNX name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// How it is defined.
    pub fn def(&self) -> Def {
        self.def
    }
    /// The element type, when this is a tensor of known dtype.
    pub fn elem(&self) -> Option<crate::DType> {
        self.ty.as_ref().and_then(TypeInfo::tensor_elem)
    }
    /// Every use.
    pub fn uses(&self) -> &[Use] {
        &self.uses
    }
    /// Sets the facts of a scan of this value's constant data ([`crate::ValueRange::constant`]), or clears
    /// them (`None`: the data changed, or a new scan found none), leaving the other range facts as they are.
    pub fn set_constant_facts(&mut self, facts: Option<crate::ConstantFacts>) {
        match facts {
            Some(f) => {
                self.range
                    .get_or_insert_with(Box::<crate::ValueRange>::default)
                    .constant = Some(f)
            }
            None => {
                if let Some(r) = &mut self.range {
                    r.constant = None;
                }
            }
        }
    }
}

/// An operator application.
#[derive(Clone, Debug)]
pub struct Node {
    /// Node name (may be empty).
    pub name: String,
    /// Operator type.
    pub op_type: String,
    /// Operator domain (`""` is ai.onnx).
    pub domain: String,
    /// Function overload id.
    pub overload: String,
    /// Attributes in model order.
    pub attributes: Vec<Attribute>,
    /// ONNX doc string.
    pub doc_string: String,
    /// ONNX metadata properties.
    pub metadata_props: Vec<(String, String)>,
    /// Device configurations, kept verbatim.
    pub device_configurations: Vec<crate::Opaque>,
    /// The precision decision for this node, once `assign-precision` has made it (an analysis fact: it is
    /// printed as a comment and never written to ONNX).
    pub precision: Option<Box<PrecisionDecision>>,
    pub(crate) inputs: Vec<Option<ValueId>>,
    pub(crate) outputs: Vec<Option<ValueId>>,
    pub(crate) implicit_inputs: Vec<ValueId>,
}

/// Which precision a node's float data runs in, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrecisionDecision {
    /// The dtype of the node's float data (`f16`/`bf16` when lowered, `f32` when kept).
    pub dtype: crate::DType,
    /// The rule that decided (`allow`, `deny`, `infer: between low nodes`, `user: --keep-fp32 Softmax`, ...).
    pub rule: String,
    /// The evidence: op class and reason, initializer range, schema constraint.
    pub evidence: String,
}

impl Node {
    /// A node with no inputs, outputs or attributes yet.
    pub fn new(op_type: impl Into<String>) -> Node {
        Node {
            name: String::new(),
            op_type: op_type.into(),
            domain: String::new(),
            overload: String::new(),
            attributes: Vec::new(),
            doc_string: String::new(),
            metadata_props: Vec::new(),
            device_configurations: Vec::new(),
            precision: None,
            inputs: Vec::new(),
            outputs: Vec::new(),
            implicit_inputs: Vec::new(),
        }
    }
    /// Inputs; `None` is an omitted optional input.
    pub fn inputs(&self) -> &[Option<ValueId>] {
        &self.inputs
    }
    /// Outputs; `None` is an omitted optional output.
    pub fn outputs(&self) -> &[Option<ValueId>] {
        &self.outputs
    }
    /// Values of the enclosing graph read by this node's subgraphs.
    pub fn implicit_inputs(&self) -> &[ValueId] {
        &self.implicit_inputs
    }
    /// The attribute with this name.
    pub fn attr(&self, name: &str) -> Option<&Attribute> {
        self.attributes.iter().find(|a| a.name == name)
    }
    /// An `INT` attribute's value (`None` when absent or of another kind).
    pub fn attr_int(&self, name: &str) -> Option<i64> {
        match self.attr(name).map(|a| &a.value) {
            Some(crate::AttrValue::Int(i)) => Some(*i),
            _ => None,
        }
    }
    /// A `FLOAT` attribute's value.
    pub fn attr_float(&self, name: &str) -> Option<f32> {
        match self.attr(name).map(|a| &a.value) {
            Some(crate::AttrValue::Float(f)) => Some(*f),
            _ => None,
        }
    }
    /// An `INTS` attribute's values; a single `INT` reads as one value.
    pub fn attr_ints(&self, name: &str) -> Option<Vec<i64>> {
        match self.attr(name).map(|a| &a.value) {
            Some(crate::AttrValue::Ints(v)) => Some(v.clone()),
            Some(crate::AttrValue::Int(i)) => Some(vec![*i]),
            _ => None,
        }
    }
    /// A `STRING` attribute's value, decoded as UTF-8 (lossily).
    pub fn attr_string(&self, name: &str) -> Option<String> {
        match self.attr(name).map(|a| &a.value) {
            Some(crate::AttrValue::String(s)) => Some(String::from_utf8_lossy(s).into_owned()),
            _ => None,
        }
    }
    /// The subgraphs held by this node's attributes, with the attribute names.
    pub fn subgraphs(&self) -> impl Iterator<Item = (&str, &Graph)> {
        self.attributes
            .iter()
            .flat_map(|a| a.value.graphs().iter().map(move |g| (a.name.as_str(), g)))
    }
    /// The distinct names the subgraphs capture, in order of first capture: what the enclosing graph must
    /// resolve as this node's implicit inputs.
    pub fn captured_names(&self) -> Vec<String> {
        let mut seen = rustc_hash::FxHashSet::default();
        let mut out = Vec::new();
        for (_, g) in self.subgraphs() {
            for &c in g.captures() {
                let name = g.value(c).name();
                if seen.insert(name) {
                    out.push(name.to_string());
                }
            }
        }
        out
    }

    /// True when any attribute holds a graph.
    pub fn has_subgraphs(&self) -> bool {
        self.subgraphs().next().is_some()
    }
    /// True in the default domain (`""` or `"ai.onnx"`).
    pub fn in_default_domain(&self) -> bool {
        self.domain.is_empty() || self.domain == "ai.onnx"
    }
    /// `domain::op_type`, or just the op type in the default domain.
    pub fn qualified_op(&self) -> String {
        if self.domain.is_empty() || self.domain == "ai.onnx" {
            self.op_type.clone()
        } else {
            format!("{}::{}", self.domain, self.op_type)
        }
    }
}

/// An ONNX quantization annotation, kept verbatim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorAnnotation {
    /// The annotated tensor.
    pub tensor_name: String,
    /// Key/value pairs naming the quantization parameter tensors.
    pub quant_parameter_tensor_names: Vec<(String, String)>,
}

/// Errors of the graph edit API.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum EditError {
    /// A value name is already defined in this graph.
    #[error("value '{0}' is already defined in this graph")]
    DuplicateName(String),
    /// The value already has a definition.
    #[error("value '{0}' is already defined")]
    AlreadyDefined(String),
    /// A node output slot does not exist.
    #[error("node has no input slot {0}")]
    NoSuchSlot(u32),
}

/// One scope of nodes and values. See the module documentation.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    /// Graph name.
    pub name: String,
    /// ONNX doc string.
    pub doc_string: String,
    /// ONNX metadata properties.
    pub metadata_props: Vec<(String, String)>,
    /// Quantization annotations, kept verbatim.
    pub quantization_annotation: Vec<TensorAnnotation>,
    values: Vec<Value>,
    nodes: Vec<Option<Node>>,
    prev: Vec<Option<NodeId>>,
    next: Vec<Option<NodeId>>,
    first: Option<NodeId>,
    last: Option<NodeId>,
    live_nodes: usize,
    by_name: FxHashMap<String, ValueId>,
    inputs: Vec<ValueId>,
    outputs: Vec<ValueId>,
    initializers: Vec<ValueId>,
    sparse_initializers: Vec<ValueId>,
    value_info: Vec<ValueId>,
    captures: Vec<ValueId>,
}

impl Graph {
    /// An empty graph.
    pub fn new(name: impl Into<String>) -> Graph {
        Graph {
            name: name.into(),
            ..Graph::default()
        }
    }

    // ----- values -----

    /// Creates a detached value. Fails when the name is taken (the empty name is never valid).
    pub fn add_value(
        &mut self,
        name: impl Into<String>,
        ty: Option<TypeInfo>,
    ) -> Result<ValueId, EditError> {
        let id = ValueId(self.values.len() as u32);
        // One hash per new value: the entry both checks for and claims the name.
        let name = match self.by_name.entry(name.into()) {
            std::collections::hash_map::Entry::Vacant(e) if !e.key().is_empty() => {
                let name = e.key().clone();
                e.insert(id);
                name
            }
            e => return Err(EditError::DuplicateName(e.key().clone())),
        };
        self.values.push(Value {
            name,
            ty,
            initializer: None,
            sparse_initializer: None,
            doc_string: String::new(),
            metadata_props: Vec::new(),
            range: None,
            def: Def::Detached,
            uses: Vec::new(),
            in_value_info: false,
        });
        Ok(id)
    }

    /// Reserves room for this many more nodes and values (an importer knows the counts up front).
    pub fn reserve(&mut self, nodes: usize, values: usize) {
        self.nodes.reserve(nodes);
        self.prev.reserve(nodes);
        self.next.reserve(nodes);
        self.values.reserve(values);
        self.by_name.reserve(values);
    }

    /// A name not used in this graph, made from `base` (`base`, `base_1`, `base_2`, ...).
    pub fn fresh_name(&self, base: &str) -> String {
        if !base.is_empty() && !self.by_name.contains_key(base) {
            return base.to_string();
        }
        (1..)
            .map(|i| format!("{base}_{i}"))
            .find(|n| !self.by_name.contains_key(n))
            .unwrap()
    }

    /// Adds a graph input.
    pub fn add_input(
        &mut self,
        name: impl Into<String>,
        ty: Option<TypeInfo>,
    ) -> Result<ValueId, EditError> {
        let v = self.add_value(name, ty)?;
        self.values[v.index()].def = Def::Input;
        self.inputs.push(v);
        Ok(v)
    }

    /// Gives a value an initializer. A detached value becomes an initializer; a graph input keeps being an
    /// input (the initializer is its default).
    pub fn set_initializer(&mut self, v: ValueId, tensor: Tensor) -> Result<(), EditError> {
        let val = &mut self.values[v.index()];
        match val.def {
            Def::Detached => val.def = Def::Initializer,
            Def::Input | Def::Initializer => {}
            _ => return Err(EditError::AlreadyDefined(val.name.clone())),
        }
        if val.initializer.is_none() {
            self.initializers.push(v);
        }
        self.values[v.index()].initializer = Some(Box::new(tensor));
        Ok(())
    }

    /// Creates an initializer value.
    pub fn add_initializer(
        &mut self,
        name: impl Into<String>,
        tensor: Tensor,
    ) -> Result<ValueId, EditError> {
        let ty = TypeInfo::tensor(
            tensor.dtype,
            Some(tensor.dims.iter().map(|&d| crate::Dim::known(d)).collect()),
        );
        let v = self.add_value(name, Some(ty))?;
        self.set_initializer(v, tensor)?;
        Ok(v)
    }

    /// Gives a value a sparse initializer (see [`Graph::set_initializer`]).
    pub fn set_sparse_initializer(
        &mut self,
        v: ValueId,
        sparse: SparseTensor,
    ) -> Result<(), EditError> {
        let val = &mut self.values[v.index()];
        match val.def {
            Def::Detached => val.def = Def::Initializer,
            Def::Input | Def::Initializer => {}
            _ => return Err(EditError::AlreadyDefined(val.name.clone())),
        }
        if val.sparse_initializer.is_none() {
            self.sparse_initializers.push(v);
        }
        self.values[v.index()].sparse_initializer = Some(Box::new(sparse));
        Ok(())
    }

    /// Marks a detached value as read from the enclosing scope.
    pub fn add_capture(&mut self, name: impl Into<String>) -> Result<ValueId, EditError> {
        let v = self.add_value(name, None)?;
        self.values[v.index()].def = Def::Capture;
        self.captures.push(v);
        Ok(v)
    }

    /// Stops reading `v` from the enclosing scope when nothing here reads it any more (its last reader moved
    /// out, or reads another value). Returns whether it was dropped; the name stays taken.
    pub fn remove_capture(&mut self, v: ValueId) -> bool {
        let val = &self.values[v.index()];
        if val.def != Def::Capture || !val.uses.is_empty() || self.outputs.contains(&v) {
            return false;
        }
        self.captures.retain(|&x| x != v);
        self.values[v.index()].def = Def::Detached;
        true
    }

    /// The value.
    pub fn value(&self, v: ValueId) -> &Value {
        &self.values[v.index()]
    }
    /// The value, mutably (name and definition stay under the graph's control).
    pub fn value_mut(&mut self, v: ValueId) -> &mut Value {
        &mut self.values[v.index()]
    }
    /// The value with this name.
    pub fn value_by_name(&self, name: &str) -> Option<ValueId> {
        self.by_name.get(name).copied()
    }
    /// Renames a value. Uses refer by id, so nothing else changes in this graph; subgraphs that capture the
    /// old name must be updated by the caller ([`Graph::rename_captures`]).
    pub fn rename_value(&mut self, v: ValueId, name: impl Into<String>) -> Result<(), EditError> {
        let name = name.into();
        if name.is_empty() || self.by_name.contains_key(&name) {
            return Err(EditError::DuplicateName(name));
        }
        let old = std::mem::replace(&mut self.values[v.index()].name, name.clone());
        self.by_name.remove(&old);
        self.by_name.insert(name, v);
        Ok(())
    }
    /// Every value id ever created in this graph (detached ones included).
    pub fn value_ids(&self) -> impl Iterator<Item = ValueId> + '_ {
        (0..self.values.len() as u32).map(ValueId)
    }
    /// Size of a side table indexed by [`ValueId`].
    pub fn value_bound(&self) -> usize {
        self.values.len()
    }
    /// The uses of a value.
    pub fn uses(&self, v: ValueId) -> &[Use] {
        &self.values[v.index()].uses
    }
    /// The producing node and output slot.
    pub fn producer(&self, v: ValueId) -> Option<(NodeId, u32)> {
        match self.values[v.index()].def {
            Def::Node(n, s) => Some((n, s)),
            _ => None,
        }
    }

    // ----- graph interface -----

    /// Graph inputs in order.
    pub fn inputs(&self) -> &[ValueId] {
        &self.inputs
    }
    /// Graph outputs in order.
    pub fn outputs(&self) -> &[ValueId] {
        &self.outputs
    }
    /// Appends a graph output.
    pub fn add_output(&mut self, v: ValueId) {
        self.outputs.push(v);
    }
    /// Replaces graph output `i`.
    pub fn set_output(&mut self, i: usize, v: ValueId) {
        self.outputs[i] = v;
    }
    /// Dense initializers in model order.
    pub fn initializers(&self) -> &[ValueId] {
        &self.initializers
    }
    /// Sparse initializers in model order.
    pub fn sparse_initializers(&self) -> &[ValueId] {
        &self.sparse_initializers
    }
    /// Values captured from the enclosing scope.
    pub fn captures(&self) -> &[ValueId] {
        &self.captures
    }
    /// Values the model listed in `value_info`, in order.
    pub fn value_info(&self) -> &[ValueId] {
        &self.value_info
    }
    /// Records a value for `value_info` (idempotent).
    pub fn add_value_info(&mut self, v: ValueId) {
        if !self.values[v.index()].in_value_info {
            self.values[v.index()].in_value_info = true;
            self.value_info.push(v);
        }
    }

    /// Replaces the data of an initializer in place (its position among the initializers is kept). Returns
    /// the old data, or `None` (and changes nothing) when the value has no initializer.
    pub fn replace_initializer(&mut self, v: ValueId, tensor: Tensor) -> Option<Tensor> {
        let slot = self.values[v.index()].initializer.as_mut()?;
        Some(std::mem::replace(slot.as_mut(), tensor))
    }
    /// Drops the initializer of a value; an initializer-only value becomes detached.
    pub fn remove_initializer(&mut self, v: ValueId) -> Option<Tensor> {
        let t = *self.values[v.index()].initializer.take()?;
        self.initializers.retain(|&x| x != v);
        let val = &mut self.values[v.index()];
        if val.def == Def::Initializer && val.sparse_initializer.is_none() {
            val.def = Def::Detached;
        }
        Some(t)
    }

    // ----- nodes -----

    /// The node.
    pub fn node(&self, n: NodeId) -> &Node {
        self.nodes[n.index()].as_ref().expect("removed node")
    }
    /// The node, mutably. Inputs and outputs change only through the edit methods.
    pub fn node_mut(&mut self, n: NodeId) -> &mut Node {
        self.nodes[n.index()].as_mut().expect("removed node")
    }
    /// True when the node exists (was not removed).
    pub fn is_live(&self, n: NodeId) -> bool {
        self.nodes.get(n.index()).is_some_and(|x| x.is_some())
    }
    /// Number of live nodes.
    pub fn node_count(&self) -> usize {
        self.live_nodes
    }
    /// Size of a side table indexed by [`NodeId`].
    pub fn node_bound(&self) -> usize {
        self.nodes.len()
    }
    /// Nodes in schedule order.
    pub fn nodes(&self) -> NodeIter<'_> {
        NodeIter {
            graph: self,
            cur: self.first,
        }
    }
    /// The node after `n` in schedule order.
    pub fn next_node(&self, n: NodeId) -> Option<NodeId> {
        self.next[n.index()]
    }
    /// The node before `n` in schedule order.
    pub fn prev_node(&self, n: NodeId) -> Option<NodeId> {
        self.prev[n.index()]
    }

    /// Appends a node at the end of the schedule. `inputs` are used, `outputs` must be detached values.
    pub fn add_node(
        &mut self,
        node: Node,
        inputs: &[Option<ValueId>],
        outputs: &[Option<ValueId>],
    ) -> Result<NodeId, EditError> {
        let id = self.create_node(node, inputs, outputs)?;
        self.link_after(self.last, id);
        Ok(id)
    }

    /// Inserts a node just before `anchor` in the schedule.
    pub fn insert_node_before(
        &mut self,
        anchor: NodeId,
        node: Node,
        inputs: &[Option<ValueId>],
        outputs: &[Option<ValueId>],
    ) -> Result<NodeId, EditError> {
        let id = self.create_node(node, inputs, outputs)?;
        self.link_after(self.prev[anchor.index()], id);
        Ok(id)
    }

    /// Inserts a node just after `anchor` in the schedule.
    pub fn insert_node_after(
        &mut self,
        anchor: NodeId,
        node: Node,
        inputs: &[Option<ValueId>],
        outputs: &[Option<ValueId>],
    ) -> Result<NodeId, EditError> {
        let id = self.create_node(node, inputs, outputs)?;
        self.link_after(Some(anchor), id);
        Ok(id)
    }

    fn create_node(
        &mut self,
        mut node: Node,
        inputs: &[Option<ValueId>],
        outputs: &[Option<ValueId>],
    ) -> Result<NodeId, EditError> {
        for o in outputs.iter().flatten() {
            let v = &self.values[o.index()];
            if v.def != Def::Detached {
                return Err(EditError::AlreadyDefined(v.name.clone()));
            }
        }
        let id = NodeId(self.nodes.len() as u32);
        for (i, o) in outputs.iter().enumerate() {
            if let Some(o) = o {
                self.values[o.index()].def = Def::Node(id, i as u32);
            }
        }
        for (i, inp) in inputs.iter().enumerate() {
            if let Some(v) = inp {
                self.values[v.index()].uses.push(Use::Input(id, i as u32));
            }
        }
        let implicit = std::mem::take(&mut node.implicit_inputs);
        for (i, v) in implicit.iter().enumerate() {
            self.values[v.index()]
                .uses
                .push(Use::Implicit(id, i as u32));
        }
        node.implicit_inputs = implicit;
        node.inputs = inputs.to_vec();
        node.outputs = outputs.to_vec();
        self.nodes.push(Some(node));
        self.prev.push(None);
        self.next.push(None);
        self.live_nodes += 1;
        Ok(id)
    }

    fn link_after(&mut self, after: Option<NodeId>, id: NodeId) {
        let next = match after {
            Some(a) => self.next[a.index()],
            None => self.first,
        };
        self.prev[id.index()] = after;
        self.next[id.index()] = next;
        match after {
            Some(a) => self.next[a.index()] = Some(id),
            None => self.first = Some(id),
        }
        match next {
            Some(n) => self.prev[n.index()] = Some(id),
            None => self.last = Some(id),
        }
    }

    fn unlink(&mut self, id: NodeId) {
        let (p, n) = (self.prev[id.index()], self.next[id.index()]);
        match p {
            Some(p) => self.next[p.index()] = n,
            None => self.first = n,
        }
        match n {
            Some(n) => self.prev[n.index()] = p,
            None => self.last = p,
        }
        self.prev[id.index()] = None;
        self.next[id.index()] = None;
    }

    /// Moves a node to just before `anchor` in the schedule.
    pub fn move_before(&mut self, n: NodeId, anchor: NodeId) {
        if n == anchor {
            return;
        }
        self.unlink(n);
        self.link_after(self.prev[anchor.index()], n);
    }

    /// Rewrites the schedule to `order`, which must hold every live node exactly once.
    pub fn set_order(&mut self, order: &[NodeId]) {
        debug_assert_eq!(order.len(), self.live_nodes);
        self.first = None;
        self.last = None;
        for &n in order {
            self.link_after(self.last, n);
        }
    }

    /// Puts the schedule in topological order when it is not (a node reading a value that a later node
    /// produces; onnxruntime's float16 converter appends its input casts at the end of the node list). The
    /// order is the stable one: among the nodes whose inputs are ready, the earliest in the old schedule
    /// goes first, so a schedule already in order is unchanged. Returns how many nodes read a value that a
    /// later node produced (0 when the schedule was in order, and is left as it is), or `None` when the
    /// graph has a cycle (left as it is, for the verifier to name). O(N log N). Subgraphs are not visited:
    /// call it on each.
    pub fn sort_topologically(&mut self) -> Option<usize> {
        let old: Vec<NodeId> = self.nodes().map(|(id, _)| id).collect();
        let mut pos = vec![usize::MAX; self.node_bound()];
        for (i, &n) in old.iter().enumerate() {
            pos[n.index()] = i;
        }
        // the producers each node waits for (a value read twice counts twice, and is released twice)
        let mut waiting = vec![0usize; self.node_bound()];
        let mut early = 0;
        for &n in &old {
            let node = self.node(n);
            let mut reads_later = false;
            for &v in node.inputs().iter().flatten().chain(node.implicit_inputs()) {
                if let Some((p, _)) = self.producer(v) {
                    waiting[n.index()] += 1;
                    reads_later |= pos[p.index()] >= pos[n.index()];
                }
            }
            early += usize::from(reads_later);
        }
        if early == 0 {
            return Some(0);
        }
        let mut ready: std::collections::BinaryHeap<std::cmp::Reverse<usize>> = old
            .iter()
            .filter(|n| waiting[n.index()] == 0)
            .map(|n| std::cmp::Reverse(pos[n.index()]))
            .collect();
        let mut order = Vec::with_capacity(old.len());
        while let Some(std::cmp::Reverse(i)) = ready.pop() {
            let n = old[i];
            order.push(n);
            for v in self.node(n).outputs().iter().flatten() {
                for u in self.uses(*v) {
                    let m = u.node();
                    waiting[m.index()] -= 1;
                    if waiting[m.index()] == 0 {
                        ready.push(std::cmp::Reverse(pos[m.index()]));
                    }
                }
            }
        }
        if order.len() != old.len() {
            return None;
        }
        self.set_order(&order);
        Some(early)
    }

    fn unuse(&mut self, v: ValueId, u: Use) {
        let uses = &mut self.values[v.index()].uses;
        if let Some(pos) = uses.iter().position(|&x| x == u) {
            uses.swap_remove(pos);
        }
    }

    /// Sets input `slot` of a node (`None` omits an optional input); pads with `None` when past the end.
    pub fn set_input(&mut self, n: NodeId, slot: u32, v: Option<ValueId>) {
        let old = {
            let node = self.node_mut(n);
            if node.inputs.len() <= slot as usize {
                node.inputs.resize(slot as usize + 1, None);
            }
            std::mem::replace(&mut node.inputs[slot as usize], v)
        };
        if let Some(o) = old {
            self.unuse(o, Use::Input(n, slot));
        }
        if let Some(v) = v {
            self.values[v.index()].uses.push(Use::Input(n, slot));
        }
    }

    /// Sets the implicit inputs of a node (after its subgraphs' captures changed).
    pub fn set_implicit_inputs(&mut self, n: NodeId, vs: Vec<ValueId>) {
        let old = std::mem::take(&mut self.node_mut(n).implicit_inputs);
        for (i, o) in old.into_iter().enumerate() {
            self.unuse(o, Use::Implicit(n, i as u32));
        }
        for (i, &v) in vs.iter().enumerate() {
            self.values[v.index()].uses.push(Use::Implicit(n, i as u32));
        }
        self.node_mut(n).implicit_inputs = vs;
    }

    /// Points every use of `old` (node inputs, implicit inputs and graph outputs) at `new`.
    pub fn replace_all_uses(&mut self, old: ValueId, new: ValueId) {
        if old == new {
            return;
        }
        let uses = std::mem::take(&mut self.values[old.index()].uses);
        for u in &uses {
            match *u {
                Use::Input(n, s) => self.node_mut(n).inputs[s as usize] = Some(new),
                Use::Implicit(n, s) => self.node_mut(n).implicit_inputs[s as usize] = new,
            }
        }
        self.values[new.index()].uses.extend(uses);
        for o in &mut self.outputs {
            if *o == old {
                *o = new;
            }
        }
    }

    /// Removes a node: its inputs lose the use, its outputs become detached. Returns the node.
    pub fn remove_node(&mut self, n: NodeId) -> Node {
        self.unlink(n);
        let node = self.nodes[n.index()].take().expect("removed node");
        self.live_nodes -= 1;
        for (i, v) in node.inputs.iter().enumerate() {
            if let Some(v) = v {
                self.unuse(*v, Use::Input(n, i as u32));
            }
        }
        for (i, v) in node.implicit_inputs.iter().enumerate() {
            self.unuse(*v, Use::Implicit(n, i as u32));
        }
        for v in node.outputs.iter().flatten() {
            self.values[v.index()].def = Def::Detached;
        }
        node
    }

    /// Replaces a subgraph by one node: removes `root` and `others`, then inserts `node` where `root` was in the
    /// schedule, reading `inputs` and defining `outputs` (typically the removed nodes' outputs that are still
    /// read, such as `root`'s own). `root` must come after `others` in the schedule. O(size of the subgraph).
    pub fn replace_subgraph(
        &mut self,
        root: NodeId,
        others: &[NodeId],
        node: Node,
        inputs: &[Option<ValueId>],
        outputs: &[Option<ValueId>],
    ) -> Result<NodeId, EditError> {
        let anchor = self.next_node(root);
        self.remove_node(root);
        for &n in others {
            if self.is_live(n) {
                self.remove_node(n);
            }
        }
        match anchor {
            Some(a) => self.insert_node_before(a, node, inputs, outputs),
            None => self.add_node(node, inputs, outputs),
        }
    }

    /// Renames captures of `old` to `new` in every subgraph of node `n` (recursively), after the enclosing
    /// value was renamed.
    pub fn rename_captures(&mut self, n: NodeId, old: &str, new: &str) {
        for a in &mut self.node_mut(n).attributes {
            for g in a.value.graphs_mut() {
                g.rename_capture_rec(old, new);
            }
        }
    }

    fn rename_capture_rec(&mut self, old: &str, new: &str) {
        if let Some(v) = self.value_by_name(old)
            && self.values[v.index()].def == Def::Capture
        {
            let _ = self.rename_value(v, new);
            let users: Vec<NodeId> = self.uses(v).iter().map(|u| u.node()).collect();
            for u in users {
                self.rename_captures(u, old, new);
            }
        }
    }

    /// Calls `f(owning node, attribute name, subgraph)` on every subgraph of this graph's nodes (one level; `f`
    /// recurses if it wants to). The attributes are lent to `f` and put back.
    pub fn for_each_subgraph_mut(&mut self, mut f: impl FnMut(NodeId, &str, &mut Graph)) {
        let owners: Vec<NodeId> = self
            .nodes()
            .filter(|(_, n)| n.has_subgraphs())
            .map(|(id, _)| id)
            .collect();
        for id in owners {
            let mut attrs = std::mem::take(&mut self.node_mut(id).attributes);
            for a in &mut attrs {
                for sg in a.value.graphs_mut() {
                    f(id, &a.name, sg);
                }
            }
            self.node_mut(id).attributes = attrs;
        }
    }

    /// Number of nodes here and in all nested subgraphs.
    pub fn node_count_deep(&self) -> usize {
        self.nodes()
            .map(|(_, n)| {
                1 + n
                    .subgraphs()
                    .map(|(_, g)| g.node_count_deep())
                    .sum::<usize>()
            })
            .sum()
    }
}

/// Iterates over nodes in schedule order.
pub struct NodeIter<'a> {
    graph: &'a Graph,
    cur: Option<NodeId>,
}

impl<'a> Iterator for NodeIter<'a> {
    type Item = (NodeId, &'a Node);
    fn next(&mut self) -> Option<Self::Item> {
        let id = self.cur?;
        self.cur = self.graph.next[id.index()];
        Some((id, self.graph.node(id)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DType, TypeInfo};

    fn f32_ty() -> Option<TypeInfo> {
        Some(TypeInfo::tensor(DType::F32, None))
    }

    #[test]
    fn sorts_a_schedule_out_of_order_stably() {
        // c reads b's output and a's, b reads the cast appended last (as onnxruntime's float16 converter
        // writes it); d depends on nothing and keeps its place among the ready nodes
        let mut g = Graph::new("g");
        let x = g.add_input("x", f32_ty()).unwrap();
        let [h, y, z, w] = ["h", "y", "z", "w"].map(|n| g.add_value(n, None).unwrap());
        let a = g
            .add_node(Node::new("Relu"), &[Some(x)], &[Some(y)])
            .unwrap();
        let b = g
            .add_node(Node::new("Neg"), &[Some(h)], &[Some(z)])
            .unwrap();
        let d = g
            .add_node(Node::new("Abs"), &[Some(x)], &[Some(w)])
            .unwrap();
        let cast = g
            .add_node(Node::new("Cast"), &[Some(x)], &[Some(h)])
            .unwrap();
        let order = |g: &Graph| g.nodes().map(|(id, _)| id).collect::<Vec<_>>();
        assert_eq!(
            g.sort_topologically(),
            Some(1),
            "one node read a later value"
        );
        assert_eq!(order(&g), vec![a, d, cast, b]);
        // in order now: nothing moves
        assert_eq!(g.sort_topologically(), Some(0));
        assert_eq!(order(&g), vec![a, d, cast, b]);
        // a cycle is left for the verifier
        let mut c = Graph::new("c");
        let [p, q] = ["p", "q"].map(|n| c.add_value(n, None).unwrap());
        c.add_node(Node::new("Neg"), &[Some(q)], &[Some(p)])
            .unwrap();
        c.add_node(Node::new("Neg"), &[Some(p)], &[Some(q)])
            .unwrap();
        let before = order(&c);
        assert_eq!(c.sort_topologically(), None);
        assert_eq!(order(&c), before);
    }

    #[test]
    fn edits_keep_indexes_current() {
        let mut g = Graph::new("g");
        let x = g.add_input("x", f32_ty()).unwrap();
        let y = g.add_value("y", None).unwrap();
        let z = g.add_value("z", None).unwrap();
        let a = g
            .add_node(Node::new("Relu"), &[Some(x)], &[Some(y)])
            .unwrap();
        let b = g
            .add_node(Node::new("Neg"), &[Some(y)], &[Some(z)])
            .unwrap();
        g.add_output(z);
        assert_eq!(g.producer(y), Some((a, 0)));
        assert_eq!(g.uses(y), &[Use::Input(b, 0)]);

        // insert a node between a and b, reroute b's input through it
        let y2 = g.add_value("y2", None).unwrap();
        let c = g
            .insert_node_before(b, Node::new("Abs"), &[Some(y)], &[Some(y2)])
            .unwrap();
        g.set_input(b, 0, Some(y2));
        assert_eq!(g.uses(y), &[Use::Input(c, 0)]);
        let order: Vec<_> = g.nodes().map(|(n, _)| n).collect();
        assert_eq!(order, vec![a, c, b]);

        // remove the middle node: its output is detached, and ids are not reused
        g.set_input(b, 0, Some(y));
        g.remove_node(c);
        assert_eq!(g.value(y2).def(), Def::Detached);
        assert!(g.uses(y).contains(&Use::Input(b, 0)));
        let w = g.add_value("w", None).unwrap();
        let d = g
            .add_node(Node::new("Neg"), &[Some(z)], &[Some(w)])
            .unwrap();
        assert_ne!(d, c);
        assert_eq!(g.node_count(), 3);
        assert_eq!(
            g.add_value("w", None),
            Err(EditError::DuplicateName("w".into()))
        );
        assert_eq!(g.fresh_name("w"), "w_1");
    }

    #[test]
    fn replace_all_uses_moves_outputs_too() {
        let mut g = Graph::new("g");
        let x = g.add_input("x", f32_ty()).unwrap();
        let y = g.add_value("y", None).unwrap();
        let n = g
            .add_node(Node::new("Relu"), &[Some(x)], &[Some(y)])
            .unwrap();
        g.add_output(y);
        let x2 = g.add_input("x2", f32_ty()).unwrap();
        g.replace_all_uses(x, x2);
        assert_eq!(g.node(n).inputs(), &[Some(x2)]);
        assert!(g.uses(x).is_empty());
        g.replace_all_uses(y, x2);
        assert_eq!(g.outputs(), &[x2]);
    }
}
