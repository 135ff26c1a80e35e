//! `mpopt run` and `mpopt compare`: the CPU reference executor (or the CUDA executor) on input files.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Args;
use mpopt_exec::metrics::{OutputMetrics, adapt_inputs};
use mpopt_exec::{Executor, RunOptions, RunOutput, Tensor, Value};
use mpopt_ir::{DType, Model, Type};

/// Where a model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Device {
    /// The CPU reference executor.
    Cpu,
    /// The CUDA executor on GPU 0 (an error when the machine has no NVIDIA driver).
    Cuda,
    /// The CUDA executor's device path on a CPU emulation of its kernels (slow; for checking the GPU path
    /// on a machine without a GPU).
    Emu,
}

/// A model prepared for a device.
enum Engine<'m> {
    Cpu(Executor<'m>),
    Cuda(
        mpopt_cuda::GpuExecutor<'m, mpopt_cuda::Profiled<mpopt_cuda::Cuda>>,
        mpopt_cuda::GemmLog,
    ),
    Emu(
        mpopt_cuda::GpuExecutor<'m, mpopt_cuda::Profiled<mpopt_cuda::Emu>>,
        mpopt_cuda::GemmLog,
    ),
}

impl<'m> Engine<'m> {
    fn new(model: &'m Model, device: Device, path: &Path) -> Result<Engine<'m>> {
        let ctx = || format!("{}", path.display());
        Ok(match device {
            Device::Cpu => Engine::Cpu(Executor::new(model).with_context(ctx)?),
            Device::Cuda => {
                let gpu = mpopt_cuda::Cuda::open(0).context("--device cuda")?;
                let (gpu, log) = mpopt_cuda::Profiled::new(gpu);
                Engine::Cuda(
                    mpopt_cuda::GpuExecutor::new(model, gpu).with_context(ctx)?,
                    log,
                )
            }
            Device::Emu => {
                let (emu, log) = mpopt_cuda::Profiled::new(mpopt_cuda::Emu::new());
                Engine::Emu(
                    mpopt_cuda::GpuExecutor::new(model, emu).with_context(ctx)?,
                    log,
                )
            }
        })
    }

    /// The GEMM timing of a GPU engine (None on the CPU).
    fn gemm_log(&self) -> Option<&mpopt_cuda::GemmLog> {
        match self {
            Engine::Cpu(_) => None,
            Engine::Cuda(_, l) | Engine::Emu(_, l) => Some(l),
        }
    }

    /// Runs; the GPU engines also return their placement statistics.
    fn run(
        &self,
        inputs: Vec<(String, Value)>,
        opts: &RunOptions,
    ) -> Result<(RunOutput, Option<mpopt_cuda::RunStats>)> {
        let gpu = |r: mpopt_cuda::GpuRun| {
            (
                RunOutput {
                    outputs: r.outputs,
                    trace: Vec::new(),
                    profile: Vec::new(),
                },
                Some(r.stats),
            )
        };
        Ok(match self {
            Engine::Cpu(e) => (e.run(inputs, opts)?, None),
            Engine::Cuda(e, _) => gpu(e.run(inputs)?),
            Engine::Emu(e, _) => gpu(e.run(inputs)?),
        })
    }
}

/// One line on where a GPU run spent its nodes and copies.
fn describe_stats(s: &mpopt_cuda::RunStats) -> String {
    let fallback = if s.fallback.is_empty() {
        "no CPU fallback".to_string()
    } else {
        let ops: Vec<String> = s
            .fallback
            .iter()
            .map(|(op, n)| format!("{op} x{n}"))
            .collect();
        format!("CPU fallback: {}", ops.join(", "))
    };
    format!(
        "{}: {} nodes on the device, {} small host nodes, {fallback}; {} uploads ({:.1} MB), {} downloads ({:.1} MB); buffers: {} allocated, {} reused, peak {:.1} MB",
        s.device,
        s.gpu_nodes,
        s.host_nodes,
        s.uploads,
        s.upload_bytes as f64 / 1e6,
        s.downloads,
        s.download_bytes as f64 / 1e6,
        s.allocs,
        s.reused,
        s.peak_bytes as f64 / 1e6
    )
}

/// Arguments of `mpopt run`.
#[derive(Args)]
pub(crate) struct RunArgs {
    /// The ONNX model.
    model: PathBuf,
    /// Inputs: an .npz (keys are input names; `NAME__setN` keys form extra sets; strings as unicode
    /// arrays, `np.asarray(x, dtype=str)`), a TensorProto .pb for a one-input model, or a folder of
    /// `input_K.pb` files (the ONNX backend-test layout).
    #[arg(long)]
    inputs: PathBuf,
    /// Which input set of the file to run (0 is the keys without a `__setN` suffix).
    #[arg(long, default_value_t = 0)]
    set: usize,
    /// Where to write the outputs (.npz; bf16 outputs are widened to float32 there).
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Worker threads for the kernels (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Write every value of the main graph (inputs and node outputs), not only the graph outputs.
    #[arg(long)]
    all_values: bool,
    /// Print the time spent per op type (of the last run).
    #[arg(long)]
    profile: bool,
    /// Run this many times after one warm-up run and report the median time (for benchmarks).
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    device: Device,
    /// Repeat every input this many times along its first axis (for benchmarks at a larger batch; the
    /// model's first input dimension must be free).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// With --device cuda (or emu): after the runs, one more in which every GEMM is timed (synchronized,
    /// repeated), written to this JSON file per shape (bench/gpu_gemm_peak.py compares it with cuBLAS's
    /// best for the same shapes). The reported run time excludes that run.
    #[arg(long)]
    gemm_profile: Option<PathBuf>,
}

/// The GEMM timing as JSON: `{"model", "device", "gemms": [{type, trans_a, trans_b, m, n, k, batch, calls,
/// ms, tflops}], "total_ms", "tflops"}` (`ms` per call; the totals over every call of the run).
fn gemm_json(
    model: &Path,
    device: &str,
    rows: &[(mpopt_cuda::GemmShape, usize, f64)],
) -> serde_json::Value {
    let (mut ms, mut flops) = (0.0, 0.0);
    let gemms: Vec<serde_json::Value> = rows
        .iter()
        .map(|(s, calls, secs)| {
            ms += secs * 1e3 * *calls as f64;
            flops += s.flops() * *calls as f64;
            serde_json::json!({
                "type": s.ty, "trans_a": s.trans_a, "trans_b": s.trans_b,
                "m": s.m, "n": s.n, "k": s.k, "batch": s.batch,
                "calls": calls, "ms": secs * 1e3,
                "tflops": s.flops() / secs.max(1e-12) / 1e12,
            })
        })
        .collect();
    serde_json::json!({
        "model": model.display().to_string(),
        "device": device,
        "gemms": gemms,
        "total_ms": ms,
        "tflops": if ms > 0.0 { flops / (ms / 1e3) / 1e12 } else { 0.0 },
    })
}

/// Every tensor repeated `n` times along axis 0.
fn tile_batch(values: Vec<(String, Value)>, n: usize) -> Result<Vec<(String, Value)>> {
    if n <= 1 {
        return Ok(values);
    }
    values
        .into_iter()
        .map(|(name, v)| match v {
            Value::Tensor(t) if t.rank() >= 1 => {
                let raw = mpopt_exec::data_to_raw(&t.data);
                let data = mpopt_exec::raw_to_data(t.dtype(), &raw.repeat(n))
                    .map_err(|e| anyhow::anyhow!("input '{name}': {e}"))?;
                let mut shape = t.shape.clone();
                shape[0] *= n;
                Ok((name, Value::Tensor(Tensor::new(shape, data))))
            }
            other => Ok((name, other)),
        })
        .collect()
}

/// Arguments of `mpopt compare`.
#[derive(Args)]
pub(crate) struct CompareArgs {
    /// The reference model (usually the fp32 original).
    reference: PathBuf,
    /// The candidate model (usually the converted one).
    candidate: PathBuf,
    /// Inputs, as for `mpopt run`; every input set in the file is run.
    #[arg(long)]
    inputs: PathBuf,
    /// Relative tolerance: an element passes when |cand - ref| <= atol + rtol * |ref|.
    #[arg(long, default_value_t = 1e-2)]
    rtol: f64,
    /// Absolute tolerance.
    #[arg(long, default_value_t = 1e-3)]
    atol: f64,
    /// List the first values (matched by name) where the two runs diverge past the tolerances.
    #[arg(long)]
    per_node: bool,
    /// How many diverging values `--per-node` lists.
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// Also write the metrics as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Worker threads for the kernels (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Where the candidate runs (the reference always runs on the CPU reference executor).
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    device: Device,
}

fn set_threads(n: Option<usize>) -> Result<()> {
    if let Some(n) = n {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .build_global()
            .context("cannot set the thread count")?;
    }
    Ok(())
}

/// One named set of inputs.
pub(crate) struct InputSet {
    pub index: usize,
    pub values: Vec<(String, Value)>,
}

fn proto_to_value(p: mpopt_onnx::ProtoValue) -> Result<Value, String> {
    use mpopt_onnx::ProtoValue as P;
    Ok(match p {
        P::Tensor(t) => Value::Tensor(Tensor::from_ir(&t)?),
        P::Sequence(ts, elem) => Value::Seq(
            ts.iter().map(Tensor::from_ir).collect::<Result<_, _>>()?,
            DType::from_code(elem).unwrap_or(DType::F32),
        ),
        P::Optional(None) => Value::Opt(None, DType::F32),
        P::Optional(Some(v)) => Value::Opt(Some(Box::new(proto_to_value(*v)?)), DType::F32),
    })
}

fn read_pb(path: &Path, ty: Option<&mpopt_ir::TypeInfo>) -> Result<Value> {
    let kind = match ty.map(|t| &t.ty) {
        Some(Type::Sequence(_)) => mpopt_onnx::ProtoKind::Sequence,
        Some(Type::Optional(_)) => mpopt_onnx::ProtoKind::Optional,
        _ => mpopt_onnx::ProtoKind::Tensor,
    };
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let v = mpopt_onnx::decode_value(Bytes::from(bytes), kind, path)?;
    proto_to_value(v).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// The graph inputs that need a value (inputs without an initializer), in order.
fn required_inputs(m: &Model) -> Vec<mpopt_ir::ValueId> {
    let g = &m.graph;
    g.inputs()
        .iter()
        .copied()
        .filter(|&i| g.value(i).initializer.is_none())
        .collect()
}

/// Reads every input set from `path` for `model`.
pub(crate) fn load_inputs(path: &Path, model: &Model) -> Result<Vec<InputSet>> {
    let g = &model.graph;
    let req = required_inputs(model);
    if path.is_dir() {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.is_dir()
                    && p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("test_data_set"))
            })
            .collect();
        dirs.sort();
        if dirs.is_empty() {
            dirs.push(path.to_path_buf());
        }
        let mut sets = Vec::new();
        for (index, d) in dirs.iter().enumerate() {
            let mut values = Vec::new();
            for (k, &i) in req.iter().enumerate() {
                let p = d.join(format!("input_{k}.pb"));
                if p.exists() {
                    values.push((
                        g.value(i).name().to_string(),
                        read_pb(&p, g.value(i).ty.as_ref())?,
                    ));
                }
            }
            if values.is_empty() {
                bail!("{}: no input_K.pb files", d.display());
            }
            sets.push(InputSet { index, values });
        }
        return Ok(sets);
    }
    if path.extension().is_some_and(|e| e == "pb") {
        let [i] = req[..] else {
            bail!(
                "{}: a single .pb file feeds a one-input model; this model has {} inputs (use an .npz or a folder)",
                path.display(),
                req.len()
            );
        };
        let v = read_pb(path, g.value(i).ty.as_ref())?;
        return Ok(vec![InputSet {
            index: 0,
            values: vec![(g.value(i).name().to_string(), v)],
        }]);
    }
    let arrays = mpopt_exec::io::read_npz(path)?;
    let mut sets: Vec<InputSet> = Vec::new();
    for (key, t) in arrays {
        let (name, index) = match key.rsplit_once("__set") {
            Some((n, k)) if k.parse::<usize>().is_ok() => {
                (n.to_string(), k.parse::<usize>().unwrap_or(0))
            }
            _ => (key.clone(), 0),
        };
        match sets.iter_mut().find(|s| s.index == index) {
            Some(s) => s.values.push((name, Value::Tensor(t))),
            None => sets.push(InputSet {
                index,
                values: vec![(name, Value::Tensor(t))],
            }),
        }
    }
    sets.sort_by_key(|s| s.index);
    if sets.is_empty() {
        bail!("{}: the archive holds no arrays", path.display());
    }
    Ok(sets)
}

fn describe(t: &Tensor) -> String {
    let (nan, inf) = nan_inf(t);
    format!("{}{:?} nan={nan} inf={inf}", t.dtype(), t.shape)
}

fn nan_inf(t: &Tensor) -> (usize, usize) {
    if !t.data.is_float() {
        return (0, 0);
    }
    let v = t.to_f32s().unwrap_or_default();
    (
        v.iter().filter(|x| x.is_nan()).count(),
        v.iter().filter(|x| x.is_infinite()).count(),
    )
}

pub(crate) fn run(a: RunArgs) -> Result<()> {
    set_threads(a.threads)?;
    let model = crate::load(&a.model)?;
    // the files written: neither an input nor each other
    let writes: Vec<(&str, &Path)> = [("output", &a.output), ("GEMM profile", &a.gemm_profile)]
        .into_iter()
        .filter_map(|(what, p)| p.as_deref().map(|p| (what, p)))
        .collect();
    crate::check_writes(
        &[
            ("the input model", &a.model),
            ("the inputs file", &a.inputs),
        ],
        &writes,
    )?;
    let sets = load_inputs(&a.inputs, &model)?;
    let set = sets
        .into_iter()
        .find(|s| s.index == a.set)
        .with_context(|| format!("{}: no input set {}", a.inputs.display(), a.set))?;
    let values = tile_batch(set.values, a.batch)?;
    if a.device != Device::Cpu && (a.all_values || a.profile) {
        bail!("--all-values and --profile need --device cpu");
    }
    if a.device == Device::Cpu && a.gemm_profile.is_some() {
        bail!("--gemm-profile needs --device cuda (or emu)");
    }
    let exec = Engine::new(&model, a.device, &a.model)?;
    let opts = RunOptions {
        keep_all: a.all_values,
        profile: a.profile,
        ..RunOptions::default()
    };
    // With --repeat, one warm-up run first, then the median of the timed runs.
    let runs = if a.repeat > 1 { a.repeat + 1 } else { 1 };
    let mut times = Vec::new();
    let mut last = None;
    for i in 0..runs {
        let t0 = Instant::now();
        let o = exec
            .run(values.clone(), &opts)
            .with_context(|| format!("{}", a.model.display()))?;
        if runs == 1 || i > 0 {
            times.push(t0.elapsed());
        }
        last = Some(o);
    }
    let (out, stats) = last.expect("ran at least once");
    if let Some(s) = &stats {
        eprintln!("{}", describe_stats(s));
    }
    if let (Some(path), Some(log)) = (&a.gemm_profile, exec.gemm_log()) {
        log.set_on(true);
        let timed = exec.run(values.clone(), &opts);
        log.set_on(false);
        timed.with_context(|| format!("{} (the GEMM-timing run)", a.model.display()))?;
        let device = stats.as_ref().map(|s| s.device.clone()).unwrap_or_default();
        let rows = log.rows();
        let j = gemm_json(&a.model, &device, &rows);
        eprintln!(
            "GEMMs: {} shapes, {:.3} ms in all, {:.1} TFLOP/s -> {}",
            rows.len(),
            j["total_ms"].as_f64().unwrap_or(0.0),
            j["tflops"].as_f64().unwrap_or(0.0),
            path.display()
        );
        let text = serde_json::to_string_pretty(&j).context("GEMM timing as JSON")?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    times.sort();
    let dt = times[times.len() / 2];
    for (name, v) in &out.outputs {
        match v {
            Value::Tensor(t) => eprintln!("{name}: {}", describe(t)),
            _ => eprintln!("{name}: (non-tensor)"),
        }
    }
    for (op, d, n) in &out.profile {
        eprintln!("  {op:24} {:9.3} ms  {n} nodes", d.as_secs_f64() * 1e3);
    }
    let how = if a.repeat > 1 {
        format!(" (median of {} runs after a warm-up)", times.len())
    } else {
        String::new()
    };
    eprintln!(
        "ran {} in {:.3} ms{how}",
        a.model.display(),
        dt.as_secs_f64() * 1e3
    );
    if let Some(o) = &a.output {
        let all: Vec<(String, &Value)> = if a.all_values {
            out.trace
                .iter()
                .map(|(n, v)| (n.clone(), v.as_ref()))
                .collect()
        } else {
            out.outputs.iter().map(|(n, v)| (n.clone(), v)).collect()
        };
        let tensors: Vec<(String, Tensor)> = all
            .iter()
            .filter(|(_, v)| !a.all_values || matches!(v, Value::Tensor(_)))
            .map(|(n, v)| {
                let t = v
                    .tensor()
                    .map_err(|e| anyhow::anyhow!("output '{n}': {e}"))?;
                let t = if t.dtype() == DType::BF16 {
                    mpopt_exec::cast_tensor(t, DType::F32).map_err(anyhow::Error::msg)?
                } else {
                    t.clone()
                };
                Ok((n.clone(), t))
            })
            .collect::<Result<_>>()?;
        let refs: Vec<(String, &Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), t)).collect();
        mpopt_exec::io::write_npz(o, &refs)?;
        eprintln!("wrote {}", o.display());
    }
    Ok(())
}

pub(crate) fn compare(a: CompareArgs) -> Result<()> {
    set_threads(a.threads)?;
    if let Some(j) = &a.json {
        crate::check_writes(
            &[
                ("the reference model", &a.reference),
                ("the candidate model", &a.candidate),
                ("the inputs file", &a.inputs),
            ],
            &[("JSON metrics file", j)],
        )?;
    }
    let rm = crate::load(&a.reference)?;
    let cm = crate::load(&a.candidate)?;
    if a.device != Device::Cpu && a.per_node {
        bail!("--per-node needs --device cpu");
    }
    let re = Executor::new(&rm).with_context(|| format!("{}", a.reference.display()))?;
    let ce = Engine::new(&cm, a.device, &a.candidate)?;
    let sets = load_inputs(&a.inputs, &rm)?;
    let opts = RunOptions {
        keep_all: a.per_node,
        ..RunOptions::default()
    };
    let mut metrics: Vec<OutputMetrics> = Vec::new();
    let mut divergent: Vec<String> = Vec::new();
    for set in &sets {
        let ro = re
            .run(adapt_inputs(&rm, &set.values), &opts)
            .with_context(|| format!("{} (input set {})", a.reference.display(), set.index))?;
        let (co, stats) = ce
            .run(adapt_inputs(&cm, &set.values), &opts)
            .with_context(|| format!("{} (input set {})", a.candidate.display(), set.index))?;
        if let Some(s) = &stats
            && set.index == sets[0].index
        {
            println!("candidate on {}", describe_stats(s));
        }
        for (k, (name, rv)) in ro.outputs.iter().enumerate() {
            let Some((_, cv)) = co
                .outputs
                .iter()
                .find(|(n, _)| n == name)
                .or(co.outputs.get(k))
            else {
                bail!("the candidate has no output '{name}'");
            };
            if metrics.len() <= k {
                metrics.push(OutputMetrics::new(name.clone()));
            }
            metrics[k].add(rv, cv, a.rtol, a.atol);
        }
        if a.per_node && set.index == sets[0].index {
            let reference: std::collections::HashMap<&str, &Value> = ro
                .trace
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_ref()))
                .collect();
            for (name, cv) in &co.trace {
                if divergent.len() >= a.top {
                    break;
                }
                let Some(rv) = reference.get(name.as_str()) else {
                    continue;
                };
                let mut m = OutputMetrics::new(name.clone());
                m.add(rv, cv, a.rtol, a.atol);
                if !m.ok && m.bad > 0 {
                    let producer = cm
                        .graph
                        .value_by_name(name)
                        .and_then(|v| cm.graph.producer(v))
                        .map(|(n, _)| mpopt_ir::node_label(&cm.graph, n))
                        .unwrap_or_else(|| "graph input".into());
                    divergent.push(format!(
                        "  {name} (from {producer}): {} of {} elements past tolerance, max abs {:.3e}, max rel {:.3e}, nan {}->{}, inf {}->{}",
                        m.bad,
                        m.shape.iter().product::<usize>(),
                        m.max_abs,
                        m.max_rel,
                        m.nan_ref,
                        m.nan_cand,
                        m.inf_ref,
                        m.inf_cand
                    ));
                }
            }
        }
    }
    let mut all_ok = true;
    println!(
        "{} input set(s); pass when |cand - ref| <= {} + {} * |ref|",
        sets.len(),
        a.atol,
        a.rtol
    );
    for m in &metrics {
        all_ok &= m.ok;
        let top1 = m
            .top1
            .map(|(x, y)| format!(" top1 {x}/{y}"))
            .unwrap_or_default();
        println!(
            "{} {}: {} -> {} {:?} max_abs {:.3e} max_rel {:.3e} cosine {:.6} nan {}->{} inf {}->{}{top1}{}",
            if m.ok { "ok  " } else { "FAIL" },
            m.name,
            m.ref_dtype,
            m.cand_dtype,
            m.shape,
            m.max_abs,
            m.max_rel,
            m.cosine,
            m.nan_ref,
            m.nan_cand,
            m.inf_ref,
            m.inf_cand,
            if m.bad > 0 {
                format!(" ({} elements past tolerance)", m.bad)
            } else {
                String::new()
            }
        );
    }
    if a.per_node {
        if divergent.is_empty() {
            println!(
                "per node: no value shared by name diverges past the tolerances (input set 0)"
            );
        } else {
            println!("per node: first diverging values (input set 0, in the candidate's order):");
            for d in &divergent {
                println!("{d}");
            }
        }
    }
    if let Some(j) = &a.json {
        let text = serde_json::to_string_pretty(&metrics)?;
        crate::write_whole(j, text.as_bytes())
            .with_context(|| format!("cannot write {}", j.display()))?;
    }
    if !all_ok {
        bail!("the candidate's outputs differ from the reference past the tolerances");
    }
    Ok(())
}
