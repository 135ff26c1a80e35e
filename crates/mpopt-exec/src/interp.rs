//! The interpreter: plans each graph once (constants converted, use counts, subgraph plans), then runs nodes in
//! schedule order, freeing every value after its last use.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use mpopt_ir::{AttrValue, Graph, Model, Node, NodeId, ValueId};

use crate::fuse::{self, Step};
use crate::ops;
use crate::{ExecError, Tensor, Value};

/// How to run.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Keep every intermediate value of the main graph (for per-node comparison and calibration) instead of
    /// freeing it after its last use.
    pub keep_all: bool,
    /// Time every node and sum the times per op type (main graph; a subgraph's time counts to its node).
    pub profile: bool,
    /// With `keep_all`: keep only the values with these names (graph inputs and folded values included)
    /// and free the others after their last use, as a plain run does. What a caller that needs a few
    /// nodes' inputs uses on a model whose intermediates do not fit in memory.
    pub keep_only: Option<std::collections::HashSet<String>>,
}

/// What a run produced.
#[derive(Debug)]
pub struct RunOutput {
    /// The graph outputs, in order, by name.
    pub outputs: Vec<(String, Value)>,
    /// With [`RunOptions::keep_all`]: every node output of the main graph in schedule order (graph inputs
    /// first), by name.
    pub trace: Vec<(String, Arc<Value>)>,
    /// With [`RunOptions::profile`]: (op type, total time, node runs), slowest first.
    pub profile: Vec<(String, std::time::Duration, usize)>,
}

/// A callback that sees values as they are produced: (scope, name, value); the scope is `""` for the main
/// graph and [`subgraph_scope`] for a subgraph.
type Seer<'a> = dyn FnMut(&str, &str, &Value) + 'a;

/// The scope key of the subgraph held by attribute `attr` of node `node` in the graph whose scope is `parent`
/// (`""`: the main graph), as [`Executor::run_observed`] names it: `parent/NODE.attr` with the node's id.
pub fn subgraph_scope(parent: &str, node: NodeId, attr: &str) -> String {
    format!("{parent}/{}.{attr}", node.0)
}

/// The steps of a scope key that [`subgraph_scope`] made, outermost first: (node id, attribute name);
/// `None` for a key it did not make. `""` (the main graph) has none.
pub fn scope_steps(scope: &str) -> Option<Vec<(NodeId, &str)>> {
    scope
        .split('/')
        .skip(1)
        .map(|part| {
            let (id, attr) = part.split_once('.')?;
            Some((NodeId(id.parse().ok()?), attr))
        })
        .collect()
}

/// Named values as the interpreter holds them (moved, not copied).
fn shared(inputs: Vec<(String, Value)>) -> Vec<(String, Arc<Value>)> {
    inputs.into_iter().map(|(n, v)| (n, Arc::new(v))).collect()
}

/// A callback that sees each node run: (the scope of its graph, as [`subgraph_scope`] names it, `""` for the
/// main graph; the node; its inputs by slot; its outputs by slot). A node in a Loop or Scan body is seen once
/// per iteration.
pub type NodeHook<'a> = dyn FnMut(&str, NodeId, &[Option<Arc<Value>>], &[Option<Arc<Value>>]) + 'a;

/// Time and count per op type.
type Profile = HashMap<String, (std::time::Duration, usize)>;

/// Adds `runs` runs taking `time` in all to the profile entry `key`.
fn tally(p: &mut Profile, key: String, time: std::time::Duration, runs: usize) {
    let e = p.entry(key).or_default();
    e.0 += time;
    e.1 += runs;
}

/// What a run of one graph records besides its outputs.
#[derive(Default)]
struct Observe<'o, 'f> {
    /// Every value (main graph only).
    trace: Option<Vec<(String, Arc<Value>)>>,
    /// With `trace`: only these names go into it.
    keep_only: Option<&'o std::collections::HashSet<String>>,
    prof: Option<Profile>,
    /// Called with every value of the graph as it is produced (graph inputs and folded values first), and,
    /// through the node's [`SubRunner`], with its subgraphs' values.
    see: Option<&'o mut Seer<'f>>,
    /// The graph's scope key (see [`subgraph_scope`]).
    scope: String,
    /// Called after each node of the graph has run, with its inputs and outputs, and, through the node's
    /// [`SubRunner`], after each node of its subgraphs.
    each_node: Option<&'o mut NodeHook<'f>>,
}

/// The plan of one graph.
#[derive(Default)]
struct GraphPlan {
    /// Initializers, converted once.
    consts: Vec<(ValueId, Arc<Value>)>,
    /// Uses of each value (input slots, implicit inputs, graph outputs).
    uses: Vec<u32>,
    /// Schedule.
    order: Vec<NodeId>,
    /// Plans of subgraphs by node, in attribute order (attribute name, graph plan).
    subs: HashMap<NodeId, Vec<(String, GraphPlan)>>,
    /// Outputs of nodes evaluated once at plan time (listed in traces with the graph inputs).
    folded: Vec<(ValueId, Arc<Value>)>,
    /// The schedule with fusions (see [`crate::fuse`]), run when nothing observes intermediate values.
    steps: Vec<Step>,
}

/// A model prepared to run: ops checked, constants converted. Cheap to run many times.
pub struct Executor<'m> {
    model: &'m Model,
    opset: i64,
    main: GraphPlan,
}

impl<'m> Executor<'m> {
    /// Prepares `model`; fails listing every op that has no kernel.
    pub fn new(model: &'m Model) -> Result<Executor<'m>, ExecError> {
        let opset = model.opset("").unwrap_or(21);
        let mut unsupported = Vec::new();
        collect_unsupported(&model.graph, &mut unsupported);
        if !unsupported.is_empty() {
            unsupported.sort();
            unsupported.dedup();
            return Err(ExecError::Unsupported(unsupported));
        }
        let mut main = plan(&model.graph)?;
        // Folding runs nodes without subgraphs, so the executor it runs them under needs no plan yet.
        let stub = Executor {
            model,
            opset,
            main: GraphPlan::default(),
        };
        stub.fold_all(&mut main, &model.graph)?;
        let exec = Executor { model, opset, main };
        Ok(exec)
    }

    /// Folds the constant nodes of `g` and, recursively, of its subgraphs (a subgraph's `Constant` nodes would
    /// otherwise convert their tensors on every run of the subgraph), then builds each fused schedule.
    fn fold_all(&self, plan: &mut GraphPlan, g: &Graph) -> Result<(), ExecError> {
        let folded = self.fold_constants(plan, g)?;
        plan.consts
            .extend(folded.iter().flat_map(|(_, outs)| outs.iter().cloned()));
        let skip: std::collections::HashSet<NodeId> = folded.iter().map(|(n, _)| *n).collect();
        plan.order.retain(|n| !skip.contains(n));
        plan.folded = folded.into_iter().flat_map(|(_, outs)| outs).collect();
        for (n, subs) in plan.subs.iter_mut() {
            let node = g.node(*n);
            for (attr, sp) in subs.iter_mut() {
                if let Some(AttrValue::Graph(sg)) = node.attr(attr).map(|a| &a.value) {
                    self.fold_all(sp, sg)?;
                }
            }
        }
        plan.steps = fuse::schedule(g, &plan.order, &plan.uses, &plan.consts);
        Ok(())
    }

    /// Evaluates, once, every node whose inputs are all constants (initializers, `Constant`
    /// nodes, and results of such nodes): weight transposes, casts and reshapes of constants then cost nothing
    /// per run. Nodes with subgraphs are left alone. Returns each folded node with its outputs.
    #[allow(clippy::type_complexity)]
    fn fold_constants(
        &self,
        plan: &GraphPlan,
        g: &Graph,
    ) -> Result<Vec<(NodeId, Vec<(ValueId, Arc<Value>)>)>, ExecError> {
        let mut known: HashMap<ValueId, Arc<Value>> = plan.consts.iter().cloned().collect();
        // Graph inputs with a default may be overridden at run time: not constants.
        for i in g.inputs() {
            known.remove(i);
        }
        let mut folded = Vec::new();
        for &n in &plan.order {
            let node = g.node(n);
            if node.has_subgraphs() || !node.implicit_inputs().is_empty() {
                continue;
            }
            let ins: Option<Vec<Option<Arc<Value>>>> = node
                .inputs()
                .iter()
                .map(|v| match v {
                    None => Some(None),
                    Some(v) => known.get(v).map(|x| Some(x.clone())),
                })
                .collect();
            let Some(ins) = ins else { continue };
            let sub = SubRunner {
                exec: self,
                prof: None,
                see: None,
                each: None,
                plans: None,
                node,
                implicit: &[],
                path: String::new(),
                scope: ("", n),
            };
            let mut ctx = ops::Ctx {
                node,
                inputs: ins,
                opset: self.opset,
                sub: &sub,
            };
            // A node that fails here fails at run time too, with its name: leave it to the run.
            let Ok(outs) = ops::run(&mut ctx) else {
                continue;
            };
            let mut these = Vec::new();
            for (o, v) in node.outputs().iter().zip(outs) {
                if let Some(o) = o {
                    known.insert(*o, v.clone());
                    these.push((*o, v));
                }
            }
            folded.push((n, these));
        }
        Ok(folded)
    }

    /// The model.
    pub fn model(&self) -> &Model {
        self.model
    }

    /// Checks named inputs against the main graph and resolves them to value ids: every name must be a graph
    /// input, dtypes and known dimensions must match the declared types, and every input without an
    /// initializer (its default) must be given.
    pub fn bind_inputs<V: std::borrow::Borrow<Value>>(
        &self,
        inputs: Vec<(String, V)>,
    ) -> Result<Vec<(ValueId, V)>, ExecError> {
        let g = &self.model.graph;
        let expected = describe_inputs(g);
        let mut given: HashMap<String, V> = HashMap::new();
        for (name, v) in inputs {
            let Some(id) = g.value_by_name(&name).filter(|id| g.inputs().contains(id)) else {
                return Err(ExecError::UnknownInput {
                    name,
                    expected: expected.clone(),
                });
            };
            check_input(g, id, &name, v.borrow())?;
            given.insert(name, v);
        }
        let mut bound = Vec::new();
        let mut missing = Vec::new();
        for &i in g.inputs() {
            let name = g.value(i).name();
            match given.remove(name) {
                Some(v) => bound.push((i, v)),
                None if g.value(i).initializer.is_some() => {}
                None => missing.push(format!("'{name}'")),
            }
        }
        if !missing.is_empty() {
            return Err(ExecError::MissingInput {
                missing: missing.join(", "),
                expected,
            });
        }
        Ok(bound)
    }

    /// The main graph's schedule after constant folding: the nodes [`Executor::run`] runs, in order.
    /// Another executor (the CUDA one) walks the same schedule and hands nodes it cannot run to
    /// [`Executor::run_node`].
    pub fn schedule(&self) -> &[NodeId] {
        &self.main.order
    }

    /// The main graph's constants: initializers, converted once, and the outputs of the nodes folded at
    /// plan time (the nodes missing from [`Executor::schedule`]).
    pub fn constants(&self) -> impl Iterator<Item = &(ValueId, Arc<Value>)> {
        self.main.consts.iter()
    }

    /// How many times each main-graph value is read (input slots, implicit inputs of control-flow nodes,
    /// graph outputs), indexed by [`ValueId::index`]: when a run may free a value.
    pub fn uses(&self) -> &[u32] {
        &self.main.uses
    }

    /// Runs one main-graph node on the CPU: `inputs` by slot (None for an absent optional input), and the
    /// values its subgraphs read from the outer scope (`implicit`, by name; see
    /// [`mpopt_ir::Node::implicit_inputs`]). The error names the node.
    pub fn run_node(
        &self,
        n: NodeId,
        inputs: Vec<Option<Arc<Value>>>,
        implicit: &[(String, Arc<Value>)],
    ) -> Result<Vec<Arc<Value>>, ExecError> {
        let g = &self.model.graph;
        let node = g.node(n);
        let label = if node.name.is_empty() {
            format!("#{}", n.0)
        } else {
            format!("'{}'", node.name)
        };
        let sub = SubRunner {
            exec: self,
            prof: None,
            see: None,
            each: None,
            plans: self.main.subs.get(&n),
            node,
            implicit,
            path: label.clone(),
            scope: ("", n),
        };
        let mut ctx = ops::Ctx {
            node,
            inputs,
            opset: self.opset,
            sub: &sub,
        };
        ops::run(&mut ctx).map_err(|msg| ExecError::Node {
            node: label,
            op: node.qualified_op(),
            msg,
        })
    }

    /// Runs the main graph on named inputs. Inputs with an initializer may be left out (the initializer is the
    /// default).
    pub fn run(
        &self,
        inputs: Vec<(String, Value)>,
        opts: &RunOptions,
    ) -> Result<RunOutput, ExecError> {
        self.run_with(shared(inputs), opts, None, None)
    }

    /// [`Executor::run`] on inputs the caller also holds: nothing is copied (the search's per-node pass
    /// feeds each candidate the reference run's values).
    pub fn run_shared(
        &self,
        inputs: Vec<(String, Arc<Value>)>,
        opts: &RunOptions,
    ) -> Result<RunOutput, ExecError> {
        self.run_with(inputs, opts, None, None)
    }

    /// Runs the main graph like [`Executor::run`], calling `see(scope, name, value)` on every value as it is
    /// produced (graph inputs, values folded at plan time, then node outputs in schedule order), without
    /// keeping them: how calibration records statistics on models whose intermediates do not fit in memory.
    /// The scope is `""` for the main graph; a subgraph's values are seen on every run of the subgraph (each
    /// iteration of a Loop), under [`subgraph_scope`].
    pub fn run_observed(
        &self,
        inputs: Vec<(String, Value)>,
        opts: &RunOptions,
        see: &mut dyn FnMut(&str, &str, &Value),
    ) -> Result<RunOutput, ExecError> {
        self.run_with(shared(inputs), opts, Some(see), None)
    }

    /// [`Executor::run_observed`], and `each` is called after every node that runs (not the folded ones:
    /// see [`Executor::schedule`]), subgraph nodes included, with its scope, inputs and outputs, while they
    /// are alive: a caller can measure each node against its reference values without keeping every value
    /// of the run.
    pub fn run_each_node(
        &self,
        inputs: Vec<(String, Value)>,
        opts: &RunOptions,
        see: &mut dyn FnMut(&str, &str, &Value),
        each: &mut NodeHook<'_>,
    ) -> Result<RunOutput, ExecError> {
        self.run_with(shared(inputs), opts, Some(see), Some(each))
    }

    fn run_with<'f>(
        &self,
        inputs: Vec<(String, Arc<Value>)>,
        opts: &RunOptions,
        see: Option<&mut Seer<'f>>,
        each_node: Option<&mut NodeHook<'f>>,
    ) -> Result<RunOutput, ExecError> {
        let g = &self.model.graph;
        let mut bound: HashMap<ValueId, Arc<Value>> =
            self.bind_inputs(inputs)?.into_iter().collect();
        let positional: Vec<Option<Arc<Value>>> =
            g.inputs().iter().map(|i| bound.remove(i)).collect();
        let mut obs = Observe {
            trace: opts.keep_all.then(Vec::new),
            keep_only: opts.keep_only.as_ref(),
            prof: opts.profile.then(HashMap::new),
            see,
            scope: String::new(),
            each_node,
        };
        let outs = self
            .run_graph(&self.main, g, positional, &[], &mut obs, "")
            .map_err(|e| *e)?;
        let Observe { trace, prof, .. } = obs;
        let outputs = g
            .outputs()
            .iter()
            .zip(outs)
            .map(|(&o, v)| {
                let v = Arc::try_unwrap(v).unwrap_or_else(|a| (*a).clone());
                (g.value(o).name().to_string(), v)
            })
            .collect();
        let mut profile: Vec<(String, std::time::Duration, usize)> = prof
            .unwrap_or_default()
            .into_iter()
            .map(|(k, (d, n))| (k, d, n))
            .collect();
        profile.sort_by_key(|p| std::cmp::Reverse(p.1));
        Ok(RunOutput {
            outputs,
            trace: trace.unwrap_or_default(),
            profile,
        })
    }

    /// Runs one graph. `inputs` are positional (None: use the input's initializer); `captures` resolve the
    /// graph's outer-scope reads by name.
    fn run_graph(
        &self,
        plan: &GraphPlan,
        g: &Graph,
        inputs: Vec<Option<Arc<Value>>>,
        captures: &[(String, Arc<Value>)],
        obs: &mut Observe<'_, '_>,
        path: &str,
    ) -> Result<Vec<Arc<Value>>, Box<ExecError>> {
        let Observe {
            trace,
            keep_only,
            prof,
            see,
            scope,
            each_node,
        } = obs;
        let scope = scope.as_str();
        let kept = |name: &str| keep_only.is_none_or(|k| k.contains(name));
        let mut env: Vec<Option<Arc<Value>>> = vec![None; g.value_bound()];
        for (id, v) in &plan.consts {
            env[id.index()] = Some(v.clone());
        }
        for (&id, v) in g.inputs().iter().zip(inputs) {
            if let Some(v) = v {
                env[id.index()] = Some(v);
            }
        }
        for &c in g.captures() {
            let name = g.value(c).name();
            let v = captures
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone());
            match v {
                Some(v) => env[c.index()] = Some(v),
                None => {
                    return Err(Box::new(ExecError::Node {
                        node: path.to_string(),
                        op: "subgraph".into(),
                        msg: format!("outer-scope value '{name}' is not available"),
                    }));
                }
            }
        }
        if let Some(f) = see.as_mut() {
            for &i in g.inputs() {
                if let Some(v) = &env[i.index()] {
                    f(scope, g.value(i).name(), v);
                }
            }
            for (i, v) in &plan.folded {
                f(scope, g.value(*i).name(), v);
            }
        }
        if let Some(t) = trace.as_mut() {
            for &i in g.inputs() {
                if let Some(v) = &env[i.index()]
                    && kept(g.value(i).name())
                {
                    t.push((g.value(i).name().to_string(), v.clone()));
                }
            }
            for (i, v) in &plan.folded {
                if kept(g.value(*i).name()) {
                    t.push((g.value(*i).name().to_string(), v.clone()));
                }
            }
        }
        // a full trace holds every value anyway; otherwise values are freed after their last use
        let free = trace.is_none() || keep_only.is_some();
        let mut uses = plan.uses.clone();
        let observed = trace.is_some() || see.is_some() || each_node.is_some();
        let plain;
        let steps: &[Step] = if observed {
            plain = plan
                .order
                .iter()
                .map(|&n| Step::Node(n))
                .collect::<Vec<_>>();
            &plain
        } else {
            &plan.steps
        };
        for step in steps {
            let f = match step {
                Step::Node(n) => {
                    let n = *n;
                    let node = g.node(n);
                    let mut ins = Vec::with_capacity(node.inputs().len());
                    for (slot, v) in node.inputs().iter().enumerate() {
                        match v {
                            None => ins.push(None),
                            Some(v) => match &env[v.index()] {
                                Some(x) => ins.push(Some(x.clone())),
                                None => {
                                    return Err(self.node_error(
                                        g,
                                        n,
                                        path,
                                        format!(
                                            "input {slot} '{}' has no value (the graph does not define it)",
                                            g.value(*v).name()
                                        ),
                                    ));
                                }
                            },
                        }
                    }
                    let implicit: Vec<(String, Arc<Value>)> = node
                        .implicit_inputs()
                        .iter()
                        .filter_map(|&v| {
                            env[v.index()]
                                .clone()
                                .map(|x| (g.value(v).name().to_string(), x))
                        })
                        .collect();
                    let seen_ins = each_node.is_some().then(|| ins.clone());
                    let t0 = prof.is_some().then(std::time::Instant::now);
                    let outs = self.call(
                        plan,
                        g,
                        n,
                        ins,
                        &implicit,
                        (path, scope),
                        prof.as_mut(),
                        see.as_deref_mut(),
                        each_node.as_deref_mut(),
                    )?;
                    if let (Some(p), Some(t0)) = (prof.as_mut(), t0) {
                        tally(p, node.op_type.clone(), t0.elapsed(), 1);
                    }
                    let mut outs = outs.into_iter();
                    for (slot, o) in node.outputs().iter().enumerate() {
                        let v = outs.next();
                        let Some(o) = o else { continue };
                        let Some(v) = v else {
                            return Err(self.node_error(
                                g,
                                n,
                                path,
                                format!("the kernel produced no output {slot}"),
                            ));
                        };
                        if let Some(t) = trace.as_mut()
                            && kept(g.value(*o).name())
                        {
                            t.push((g.value(*o).name().to_string(), v.clone()));
                        }
                        if let Some(f) = see.as_mut() {
                            f(scope, g.value(*o).name(), &v);
                        }
                        env[o.index()] = Some(v);
                    }
                    if let (Some(f), Some(seen_ins)) = (each_node.as_mut(), seen_ins) {
                        let outs: Vec<Option<Arc<Value>>> = node
                            .outputs()
                            .iter()
                            .map(|o| o.and_then(|o| env[o.index()].clone()))
                            .collect();
                        f(scope, n, &seen_ins, &outs);
                    }
                    if free {
                        for v in node.inputs().iter().flatten().chain(node.implicit_inputs()) {
                            let u = &mut uses[v.index()];
                            *u = u.saturating_sub(1);
                            if *u == 0 {
                                env[v.index()] = None;
                            }
                        }
                    }
                    continue;
                }
                Step::Fused(f) => f,
            };
            // A fused step: take its inputs, release the ones read for the last time (so the kernel may reuse
            // their buffers), run the fast kernel or else the nodes one by one.
            let mut ins = Vec::with_capacity(f.inputs.len());
            for v in &f.inputs {
                let x = env[v.index()].clone();
                if x.is_none() {
                    let n = f.nodes[0];
                    return Err(self.node_error(
                        g,
                        n,
                        path,
                        format!("input '{}' has no value", g.value(*v).name()),
                    ));
                }
                ins.push(x);
                let u = &mut uses[v.index()];
                *u = u.saturating_sub(1);
                if *u == 0 {
                    env[v.index()] = None;
                }
            }
            let t0 = prof.is_some().then(std::time::Instant::now);
            let fast = fuse::run(g, f, &mut ins);
            let last = *f.nodes.last().expect("a fused step has nodes");
            let out = match fast {
                Some(Ok(v)) => Arc::new(v),
                Some(Err(msg)) => return Err(self.node_error(g, last, path, msg)),
                None => self.run_nodes(plan, g, f, ins, path)?,
            };
            if let (Some(p), Some(t0)) = (prof.as_mut(), t0) {
                tally(p, fuse::label(f), t0.elapsed(), 1);
            }
            env[f.output.index()] = Some(out);
        }
        g.outputs()
            .iter()
            .map(|&o| {
                env[o.index()].clone().ok_or_else(|| {
                    Box::new(ExecError::Node {
                        node: path.to_string(),
                        op: "graph".into(),
                        msg: format!("output '{}' was not computed", g.value(o).name()),
                    })
                })
            })
            .collect()
    }
}

impl Executor<'_> {
    /// An error at node `n` of `g`, named with its subgraph path.
    fn node_error(&self, g: &Graph, n: NodeId, path: &str, msg: String) -> Box<ExecError> {
        let node = g.node(n);
        Box::new(ExecError::Node {
            node: label(node, n, path),
            op: node.qualified_op(),
            msg,
        })
    }

    /// Runs node `n` of `g` (planned by `plan`) on its inputs by slot; `at` is the graph's (error path,
    /// scope key). With `prof`, adds the times of its subgraphs' nodes; `see` is shown its subgraphs' values
    /// and `each` their nodes.
    #[allow(clippy::too_many_arguments)]
    fn call(
        &self,
        plan: &GraphPlan,
        g: &Graph,
        n: NodeId,
        inputs: Vec<Option<Arc<Value>>>,
        implicit: &[(String, Arc<Value>)],
        at: (&str, &str),
        prof: Option<&mut Profile>,
        see: Option<&mut Seer<'_>>,
        each: Option<&mut NodeHook<'_>>,
    ) -> Result<Vec<Arc<Value>>, Box<ExecError>> {
        let (path, scope) = at;
        let node = g.node(n);
        let sub = SubRunner {
            exec: self,
            prof: prof.is_some().then(Default::default),
            see: see.map(|s| RefCell::new(s as &mut Seer<'_>)),
            each: each.map(|e| RefCell::new(e as &mut NodeHook<'_>)),
            plans: plan.subs.get(&n),
            node,
            implicit,
            path: label(node, n, path),
            scope: (scope, n),
        };
        let mut ctx = ops::Ctx {
            node,
            inputs,
            opset: self.opset,
            sub: &sub,
        };
        let outs = ops::run(&mut ctx).map_err(|msg| self.node_error(g, n, path, msg));
        // Subgraph nodes are listed apart, as `op (inside If)`: their time is part of their node's too.
        if let (Some(p), Some(inner)) = (prof, sub.prof.as_ref().map(RefCell::take)) {
            for (op, (d, k)) in inner {
                let key = if op.contains(" (inside ") {
                    op
                } else {
                    format!("{op} (inside {})", node.op_type)
                };
                tally(p, key, d, k);
            }
        }
        outs
    }

    /// Runs the nodes of a fused step one by one: `ins` are the step's inputs in [`fuse::Fused::inputs`]
    /// order; returns the step's output.
    fn run_nodes(
        &self,
        plan: &GraphPlan,
        g: &Graph,
        f: &fuse::Fused,
        ins: Vec<Option<Arc<Value>>>,
        path: &str,
    ) -> Result<Arc<Value>, Box<ExecError>> {
        let mut local: Vec<(ValueId, Arc<Value>)> = f
            .inputs
            .iter()
            .zip(ins)
            .filter_map(|(v, x)| x.map(|x| (*v, x)))
            .collect();
        for &n in &f.nodes {
            let node = g.node(n);
            let args = node
                .inputs()
                .iter()
                .map(|v| {
                    v.and_then(|v| {
                        local
                            .iter()
                            .rev()
                            .find(|(id, _)| *id == v)
                            .map(|(_, x)| x.clone())
                    })
                })
                .collect();
            let outs = self.call(plan, g, n, args, &[], (path, ""), None, None, None)?;
            for (o, v) in node.outputs().iter().zip(outs) {
                if let Some(o) = o {
                    local.push((*o, v));
                }
            }
        }
        local
            .into_iter()
            .rev()
            .find(|(id, _)| *id == f.output)
            .map(|(_, v)| v)
            .ok_or_else(|| {
                let last = *f.nodes.last().expect("a fused step has nodes");
                self.node_error(g, last, path, "the kernel produced no output".into())
            })
    }
}

/// How errors name node `n`: `'name'` or `#id`, after its subgraph path.
fn label(node: &Node, n: NodeId, path: &str) -> String {
    let own = if node.name.is_empty() {
        format!("#{}", n.0)
    } else {
        format!("'{}'", node.name)
    };
    if path.is_empty() {
        own
    } else {
        format!("{path} > {own}")
    }
}

/// Lets a kernel run its node's subgraphs.
pub(crate) struct SubRunner<'a, 'm> {
    exec: &'a Executor<'m>,
    /// When profiling: the times of the subgraphs' nodes, by op type.
    prof: Option<RefCell<Profile>>,
    /// When observing: shown every value of the subgraphs' runs.
    see: Option<RefCell<&'a mut Seer<'a>>>,
    /// When observing: called after every node of the subgraphs' runs.
    each: Option<RefCell<&'a mut NodeHook<'a>>>,
    plans: Option<&'a Vec<(String, GraphPlan)>>,
    node: &'a Node,
    implicit: &'a [(String, Arc<Value>)],
    path: String,
    /// The enclosing graph's scope key and the node's id.
    scope: (&'a str, NodeId),
}

impl SubRunner<'_, '_> {
    /// Runs the subgraph held by attribute `attr` on positional inputs; returns its outputs.
    pub(crate) fn run(
        &self,
        attr: &str,
        inputs: Vec<Arc<Value>>,
    ) -> Result<Vec<Arc<Value>>, String> {
        let g = match self.node.attr(attr).map(|a| &a.value) {
            Some(AttrValue::Graph(g)) => g.as_ref(),
            _ => return Err(format!("attribute '{attr}' is not a graph")),
        };
        let plan = self
            .plans
            .and_then(|p| p.iter().find(|(a, _)| a == attr))
            .map(|(_, p)| p)
            .ok_or_else(|| format!("no plan for subgraph '{attr}'"))?;
        if inputs.len() != g.inputs().len() {
            return Err(format!(
                "subgraph '{attr}' takes {} inputs, given {}",
                g.inputs().len(),
                inputs.len()
            ));
        }
        let path = format!("{} > {attr}", self.path);
        let ins = inputs.into_iter().map(Some).collect();
        let mut seer = self.see.as_ref().map(|s| s.borrow_mut());
        let mut each = self.each.as_ref().map(|e| e.borrow_mut());
        let mut obs = Observe {
            prof: self.prof.as_ref().map(|_| HashMap::new()),
            see: seer.as_mut().map(|s| &mut ***s as &mut Seer<'_>),
            each_node: each.as_mut().map(|e| &mut ***e as &mut NodeHook<'_>),
            scope: subgraph_scope(self.scope.0, self.scope.1, attr),
            ..Observe::default()
        };
        let outs = self
            .exec
            .run_graph(plan, g, ins, self.implicit, &mut obs, &path)
            .map_err(|e| e.to_string());
        if let (Some(cell), Some(p)) = (&self.prof, obs.prof) {
            let mut all = cell.borrow_mut();
            for (op, (d, k)) in p {
                tally(&mut all, op, d, k);
            }
        }
        outs
    }

    /// The subgraph held by attribute `attr`.
    pub(crate) fn graph(&self, attr: &str) -> Option<&Graph> {
        match self.node.attr(attr).map(|a| &a.value) {
            Some(AttrValue::Graph(g)) => Some(g.as_ref()),
            _ => None,
        }
    }
}

fn plan(g: &Graph) -> Result<GraphPlan, ExecError> {
    let mut consts = Vec::new();
    for &i in g.initializers() {
        let v = g.value(i);
        if let Some(t) = &v.initializer {
            let t = Tensor::from_ir(t).map_err(|msg| ExecError::Constant {
                name: v.name().to_string(),
                msg,
            })?;
            consts.push((i, Arc::new(Value::Tensor(t))));
        }
    }
    // Inputs with a default value: the initializer is filled first and replaced when the input is given.
    for &i in g.inputs() {
        let v = g.value(i);
        if let (Some(t), false) = (&v.initializer, g.initializers().contains(&i)) {
            let t = Tensor::from_ir(t).map_err(|msg| ExecError::Constant {
                name: v.name().to_string(),
                msg,
            })?;
            consts.push((i, Arc::new(Value::Tensor(t))));
        }
    }
    let mut uses = vec![0u32; g.value_bound()];
    let mut order = Vec::with_capacity(g.node_count());
    let mut subs = HashMap::new();
    for (n, node) in g.nodes() {
        order.push(n);
        for v in node.inputs().iter().flatten().chain(node.implicit_inputs()) {
            uses[v.index()] += 1;
        }
        let mut plans = Vec::new();
        for a in &node.attributes {
            if let AttrValue::Graph(sg) = &a.value {
                plans.push((a.name.clone(), plan(sg)?));
            }
        }
        if !plans.is_empty() {
            subs.insert(n, plans);
        }
    }
    for &o in g.outputs() {
        uses[o.index()] += 1;
    }
    Ok(GraphPlan {
        consts,
        uses,
        order,
        subs,
        ..GraphPlan::default()
    })
}

fn collect_unsupported(g: &Graph, out: &mut Vec<String>) {
    for (_, node) in g.nodes() {
        if !ops::is_supported(&node.domain, &node.op_type) {
            out.push(node.qualified_op());
        }
        for (_, sg) in node.subgraphs() {
            collect_unsupported(sg, out);
        }
    }
}

fn describe_inputs(g: &Graph) -> String {
    let list: Vec<String> = g
        .inputs()
        .iter()
        .map(|&i| {
            let v = g.value(i);
            let ty =
                v.ty.as_ref()
                    .map_or("?".to_string(), mpopt_ir::text::type_string);
            format!("'{}' {ty}", v.name())
        })
        .collect();
    list.join(", ")
}

fn check_input(g: &Graph, id: ValueId, name: &str, v: &Value) -> Result<(), ExecError> {
    let Some(ty) = g.value(id).ty.as_ref() else {
        return Ok(());
    };
    let bad = |msg: String| ExecError::BadInput {
        name: name.to_string(),
        msg,
    };
    let (Some(elem), Value::Tensor(t)) = (ty.tensor_elem(), v) else {
        return Ok(());
    };
    if elem != t.dtype() {
        return Err(bad(format!(
            "dtype {} given, the model expects {}",
            t.dtype(),
            elem
        )));
    }
    if let Some(dims) = ty.tensor_shape() {
        let shape_s = || {
            let d: Vec<String> = dims
                .iter()
                .map(|d| {
                    d.value
                        .as_known()
                        .map_or("?".to_string(), |k| k.to_string())
                })
                .collect();
            format!("[{}]", d.join(", "))
        };
        if dims.len() != t.rank() {
            return Err(bad(format!(
                "shape {:?} given, the model expects {}",
                t.shape,
                shape_s()
            )));
        }
        for (d, &have) in dims.iter().zip(&t.shape) {
            if let Some(k) = d.value.as_known().filter(|&k| k >= 0)
                && k != have as i64
            {
                return Err(bad(format!(
                    "shape {:?} given, the model expects {}",
                    t.shape,
                    shape_s()
                )));
            }
        }
    }
    Ok(())
}
