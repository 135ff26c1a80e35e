//! The GPU executor's run loop: placement, transfers, freeing, and the CPU fallback.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use mpopt_exec::{Executor, Tensor, Value, data_to_raw, raw_to_data};
use mpopt_ir::{DType, Model, Node, NodeId, ValueId};

use crate::CudaError;
use crate::backend::Backend;
use crate::ops;

/// A tensor in device memory: a shape, a dtype, and a byte offset into a (possibly shared) buffer.
/// Reshape-like ops return views of the same buffer.
pub struct DevTensor<B: Backend> {
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Element type.
    pub dtype: DType,
    /// The buffer (shared by views).
    pub buf: B::Buf,
    /// Byte offset of element 0.
    pub offset: usize,
}

impl<B: Backend> Clone for DevTensor<B> {
    fn clone(&self) -> Self {
        DevTensor {
            shape: self.shape.clone(),
            dtype: self.dtype,
            buf: self.buf.clone(),
            offset: self.offset,
        }
    }
}

impl<B: Backend> DevTensor<B> {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Bytes of data.
    pub fn bytes(&self) -> usize {
        self.numel() * elem_size(self.dtype).unwrap_or(0)
    }
}

/// Bytes per element of the dtypes kept on the device (None: strings and sub-byte types stay on the host).
pub(crate) fn elem_size(d: DType) -> Option<usize> {
    match d.bits() {
        8 | 16 | 32 | 64 => Some(d.bits() as usize / 8),
        _ => None,
    }
}

/// Where a run spent its nodes and copies.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RunStats {
    /// The backend.
    pub device: String,
    /// Nodes run on the device.
    pub gpu_nodes: usize,
    /// Nodes run on the CPU because their inputs were small and on the host (shape arithmetic).
    pub host_nodes: usize,
    /// Nodes run on the CPU reference executor with device-resident inputs copied down: op type -> count.
    pub fallback: BTreeMap<String, usize>,
    /// Host-to-device copies (graph inputs, fallback results) and their bytes.
    pub uploads: usize,
    /// Bytes uploaded.
    pub upload_bytes: usize,
    /// Device-to-host copies (outputs, fallback inputs, host-side parameters) and their bytes.
    pub downloads: usize,
    /// Bytes downloaded.
    pub download_bytes: usize,
    /// Constants uploaded during this run (only the first run uploads them).
    pub constant_uploads: usize,
    /// Device buffers allocated so far by this executor's backend.
    pub allocs: usize,
    /// Buffer requests served from the pool.
    pub reused: usize,
    /// Most bytes held at once.
    pub peak_bytes: usize,
    /// Wall time of the run in milliseconds (including the final synchronisation).
    pub ms: f64,
}

impl RunStats {
    /// Nodes that fell back to the CPU with device inputs.
    pub fn fallback_nodes(&self) -> usize {
        self.fallback.values().sum()
    }
}

/// A run's outputs (in graph output order, on the host) and statistics.
pub struct GpuRun {
    /// Graph outputs by name.
    pub outputs: Vec<(String, Value)>,
    /// Placement and copies.
    pub stats: RunStats,
}

/// The default-domain ops with a device implementation (for some types and attributes; see the docs).
pub fn gpu_ops() -> &'static [&'static str] {
    ops::GPU_OPS
}

/// A value during a run: a host copy, a device copy, or both.
pub(crate) struct Slot<B: Backend> {
    pub host: Option<Arc<Value>>,
    pub dev: Option<DevTensor<B>>,
}

impl<B: Backend> Default for Slot<B> {
    fn default() -> Self {
        Slot {
            host: None,
            dev: None,
        }
    }
}

/// A model prepared for a device.
pub struct GpuExecutor<'m, B: Backend> {
    pub(crate) dev: B,
    pub(crate) cpu: Executor<'m>,
    /// Constants uploaded on first use, kept for later runs.
    pub(crate) consts: Mutex<HashMap<ValueId, DevTensor<B>>>,
    is_const: Vec<bool>,
    pub(crate) opset: i64,
    host_limit: usize,
}

/// By default, inputs of at most this many elements, all on the host, keep a node on the host.
pub const HOST_LIMIT: usize = 4096;

impl<'m, B: Backend> GpuExecutor<'m, B> {
    /// Prepares `model` for `dev`: checks that every op has at least a CPU kernel (the CPU executor's check)
    /// and folds constants.
    pub fn new(model: &'m Model, dev: B) -> Result<Self, CudaError> {
        let cpu = Executor::new(model)?;
        let mut is_const = vec![false; model.graph.value_bound()];
        for (id, _) in cpu.constants() {
            is_const[id.index()] = true;
        }
        for &i in model.graph.inputs() {
            is_const[i.index()] = false;
        }
        Ok(GpuExecutor {
            dev,
            cpu,
            consts: Mutex::default(),
            is_const,
            opset: model.opset("").unwrap_or(21),
            host_limit: HOST_LIMIT,
        })
    }

    /// Sets how many input elements (all on the host) keep a node on the host; 0 sends every node with a
    /// device implementation, and every graph input, to the device (what the tests use to exercise the
    /// device path on small models).
    pub fn set_host_limit(&mut self, elements: usize) {
        self.host_limit = elements;
    }

    /// The backend.
    pub fn device(&self) -> &B {
        &self.dev
    }

    /// The model.
    pub fn model(&self) -> &Model {
        self.cpu.model()
    }

    /// Runs the main graph on named inputs (checked like the CPU executor checks them).
    pub fn run(&self, inputs: Vec<(String, Value)>) -> Result<GpuRun, CudaError> {
        let t0 = Instant::now();
        let g = &self.cpu.model().graph;
        let bound = self.cpu.bind_inputs(inputs)?;
        let mut stats = RunStats {
            device: self.dev.describe(),
            ..Default::default()
        };
        let mut env: Vec<Slot<B>> = (0..g.value_bound()).map(|_| Slot::default()).collect();
        for (id, v) in self.cpu.constants() {
            env[id.index()].host = Some(v.clone());
        }
        // Graph inputs go to the device at once (the copies at the graph's edge).
        for (id, v) in bound {
            let slot = &mut env[id.index()];
            if let Value::Tensor(t) = &v
                && elem_size(t.dtype()).is_some()
                && t.len() > self.host_limit
            {
                slot.dev = Some(self.upload(t, &mut stats).map_err(|msg| CudaError::Node {
                    node: format!("input '{}'", g.value(id).name()),
                    op: "upload".into(),
                    device: stats.device.clone(),
                    msg,
                })?);
            }
            slot.host = Some(Arc::new(v));
        }
        let mut uses = self.cpu.uses().to_vec();
        for &n in self.cpu.schedule() {
            let node = g.node(n);
            let fail = |msg: String, stats: &RunStats| CudaError::Node {
                node: mpopt_ir::node_label(g, n),
                op: node.qualified_op(),
                device: stats.device.clone(),
                msg,
            };
            let mut done = false;
            if self.on_device(node, &env) {
                let mut cx = ops::Cx {
                    ex: self,
                    node,
                    env: &mut env,
                    stats: &mut stats,
                };
                match ops::run(&mut cx) {
                    Ok(Some(outs)) => {
                        for (o, v) in node.outputs().iter().zip(outs) {
                            if let Some(o) = o {
                                env[o.index()] = v;
                            }
                        }
                        stats.gpu_nodes += 1;
                        done = true;
                    }
                    Ok(None) => {}
                    Err(msg) => return Err(fail(msg, &stats)),
                }
            }
            if !done {
                self.run_on_cpu(n, node, &mut env, &mut stats)
                    .map_err(|e| match e {
                        Fallback::Exec(e) => CudaError::Exec(e),
                        Fallback::Copy(msg) => fail(msg, &stats),
                    })?;
            }
            for v in node.inputs().iter().flatten().chain(node.implicit_inputs()) {
                let u = &mut uses[v.index()];
                *u = u.saturating_sub(1);
                if *u == 0 {
                    env[v.index()] = Slot::default();
                }
            }
        }
        let mut outputs = Vec::new();
        for &o in g.outputs() {
            let name = g.value(o).name().to_string();
            let v = self
                .host_value(&mut env, o, &mut stats)
                .map_err(|msg| CudaError::Node {
                    node: format!("output '{name}'"),
                    op: "download".into(),
                    device: stats.device.clone(),
                    msg,
                })?;
            let Some(v) = v else {
                return Err(CudaError::Node {
                    node: format!("output '{name}'"),
                    op: "graph".into(),
                    device: stats.device.clone(),
                    msg: "was not computed".into(),
                });
            };
            outputs.push((name, Arc::try_unwrap(v).unwrap_or_else(|a| (*a).clone())));
        }
        drop(env);
        self.dev.synchronize().map_err(CudaError::Driver)?;
        let (allocs, reused, peak) = self.dev.pool_stats();
        stats.allocs = allocs;
        stats.reused = reused;
        stats.peak_bytes = peak;
        stats.ms = t0.elapsed().as_secs_f64() * 1e3;
        Ok(GpuRun { outputs, stats })
    }

    /// A node goes to the device when it has a device implementation and either some input lives only on
    /// the device or its inputs are large; small host-only work (shape arithmetic) stays on the host.
    fn on_device(&self, node: &Node, env: &[Slot<B>]) -> bool {
        if !node.domain.is_empty() && node.domain != "ai.onnx" {
            return false;
        }
        if !ops::GPU_OPS.contains(&node.op_type.as_str()) {
            return false;
        }
        let mut total = 0usize;
        for v in node.inputs().iter().flatten() {
            let s = &env[v.index()];
            if s.host.is_none() && s.dev.is_some() {
                return true;
            }
            total += match (&s.host, &s.dev) {
                (Some(h), _) => h.tensor().map(|t| t.len()).unwrap_or(0),
                (None, Some(d)) => d.numel(),
                _ => 0,
            };
        }
        total > self.host_limit
            || (self.host_limit == 0 && node.inputs().iter().any(Option::is_some))
    }

    fn run_on_cpu(
        &self,
        n: NodeId,
        node: &Node,
        env: &mut [Slot<B>],
        stats: &mut RunStats,
    ) -> Result<(), Fallback> {
        let g = &self.cpu.model().graph;
        let before = stats.downloads;
        let mut ins = Vec::with_capacity(node.inputs().len());
        for v in node.inputs() {
            ins.push(match v {
                None => None,
                Some(v) => self.host_value(env, *v, stats).map_err(Fallback::Copy)?,
            });
        }
        let mut implicit = Vec::new();
        for &v in node.implicit_inputs() {
            if let Some(x) = self.host_value(env, v, stats).map_err(Fallback::Copy)? {
                implicit.push((g.value(v).name().to_string(), x));
            }
        }
        let outs = self
            .cpu
            .run_node(n, ins, &implicit)
            .map_err(Fallback::Exec)?;
        if stats.downloads > before {
            *stats.fallback.entry(node.qualified_op()).or_default() += 1;
        } else {
            stats.host_nodes += 1;
        }
        for (o, v) in node.outputs().iter().zip(outs) {
            if let Some(o) = o {
                env[o.index()] = Slot {
                    host: Some(v),
                    dev: None,
                };
            }
        }
        Ok(())
    }

    /// The host copy of a value, downloading (and keeping) it when only the device has it.
    pub(crate) fn host_value(
        &self,
        env: &mut [Slot<B>],
        v: ValueId,
        stats: &mut RunStats,
    ) -> Result<Option<Arc<Value>>, String> {
        let slot = &mut env[v.index()];
        if let Some(h) = &slot.host {
            return Ok(Some(h.clone()));
        }
        let Some(d) = &slot.dev else {
            return Ok(None);
        };
        let t = self.download(d, stats)?;
        let h = Arc::new(Value::Tensor(t));
        slot.host = Some(h.clone());
        Ok(Some(h))
    }

    /// The device copy of a value: constants are uploaded once per executor, other host values once per run.
    pub(crate) fn dev_value(
        &self,
        env: &mut [Slot<B>],
        v: ValueId,
        stats: &mut RunStats,
    ) -> Result<Option<DevTensor<B>>, String> {
        if let Some(d) = &env[v.index()].dev {
            return Ok(Some(d.clone()));
        }
        let Some(h) = env[v.index()].host.clone() else {
            return Ok(None);
        };
        let Value::Tensor(t) = h.as_ref() else {
            return Err("a sequence or optional value cannot go to the device".into());
        };
        if elem_size(t.dtype()).is_none() {
            return Err(format!("{} tensors stay on the host", t.dtype()));
        }
        let d = if self.is_const[v.index()] {
            let mut c = self.consts.lock().map_err(|_| "poisoned")?;
            match c.get(&v) {
                Some(d) => d.clone(),
                None => {
                    let d = self.upload(t, stats)?;
                    stats.constant_uploads += 1;
                    c.insert(v, d.clone());
                    d
                }
            }
        } else {
            self.upload(t, stats)?
        };
        env[v.index()].dev = Some(d.clone());
        Ok(Some(d))
    }

    pub(crate) fn upload(&self, t: &Tensor, stats: &mut RunStats) -> Result<DevTensor<B>, String> {
        let raw = data_to_raw(&t.data);
        stats.uploads += 1;
        stats.upload_bytes += raw.len();
        Ok(DevTensor {
            shape: t.shape.clone(),
            dtype: t.dtype(),
            buf: self.dev.upload(&raw)?,
            offset: 0,
        })
    }

    pub(crate) fn download(
        &self,
        d: &DevTensor<B>,
        stats: &mut RunStats,
    ) -> Result<Tensor, String> {
        let bytes = self.dev.download(&d.buf, d.offset, d.bytes())?;
        stats.downloads += 1;
        stats.download_bytes += bytes.len();
        Ok(Tensor::new(d.shape.clone(), raw_to_data(d.dtype, &bytes)?))
    }

    /// An uninitialised device tensor.
    pub(crate) fn alloc(&self, shape: Vec<usize>, dtype: DType) -> Result<DevTensor<B>, String> {
        let es = elem_size(dtype).ok_or_else(|| format!("{dtype} cannot live on the device"))?;
        let n: usize = shape.iter().product();
        Ok(DevTensor {
            shape,
            dtype,
            buf: self.dev.alloc(n * es)?,
            offset: 0,
        })
    }
}

enum Fallback {
    Exec(mpopt_exec::ExecError),
    Copy(String),
}
