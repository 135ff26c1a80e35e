//! The CPU executor against the ONNX backend node suite: each test's model runs on its `test_data_set_*`
//! inputs and every output must match the expected one (dtype, shape, and values within the backend suite's
//! default tolerance, rtol 1e-3 and atol 1e-7, NaN where NaN is expected). Runs on the node-suite folders in
//! `MPOPT_SUITE_DIRS` (CI sets it). Writes the per-op table to `target/exec-suite.md` (committed as
//! `docs/executor-conformance.md`) and fails when the pass rate drops under the floor or when an op that a
//! corpus model uses fails any of its tests.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use mpopt_exec::{Data, Executor, RunOptions, Tensor, Value};
use mpopt_ir::{DType, Model, Type};
use mpopt_onnx::{ProtoKind, ProtoValue};

/// The pass rate may not fall below this (share of the suite's tests).
const FLOOR: f64 = 0.98;

fn to_value(p: ProtoValue) -> Result<Value, String> {
    Ok(match p {
        ProtoValue::Tensor(t) => Value::Tensor(Tensor::from_ir(&t)?),
        ProtoValue::Sequence(ts, elem) => Value::Seq(
            ts.iter().map(Tensor::from_ir).collect::<Result<_, _>>()?,
            DType::from_code(elem).unwrap_or(DType::F32),
        ),
        ProtoValue::Optional(None) => Value::Opt(None, DType::F32),
        ProtoValue::Optional(Some(v)) => {
            let v = to_value(*v)?;
            Value::Opt(Some(Box::new(v)), DType::F32)
        }
    })
}

fn kind(t: Option<&mpopt_ir::TypeInfo>) -> ProtoKind {
    match t.map(|t| &t.ty) {
        Some(Type::Sequence(_)) => ProtoKind::Sequence,
        Some(Type::Optional(_)) => ProtoKind::Optional,
        _ => ProtoKind::Tensor,
    }
}

fn read(path: &Path, k: ProtoKind) -> Result<Value, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    to_value(mpopt_onnx::decode_value(Bytes::from(bytes), k, path).map_err(|e| e.to_string())?)
}

/// Compares one tensor; `Err` says how it differs.
fn close(got: &Tensor, want: &Tensor) -> Result<(), String> {
    if got.dtype() != want.dtype() {
        return Err(format!("dtype {} != {}", got.dtype(), want.dtype()));
    }
    if got.shape != want.shape {
        return Err(format!("shape {:?} != {:?}", got.shape, want.shape));
    }
    match (&got.data, &want.data) {
        (Data::Str(a), Data::Str(b)) => {
            return if a == b {
                Ok(())
            } else {
                Err("strings differ".into())
            };
        }
        (Data::Small(..), _) => {
            // float8/float4 codes: equal values (NaN payloads and signs aside).
            let (a, b) = (got.to_f64s()?, want.to_f64s()?);
            let same = a
                .iter()
                .zip(&b)
                .all(|(x, y)| x == y || (x.is_nan() && y.is_nan()));
            return if same {
                Ok(())
            } else {
                Err("values differ".into())
            };
        }
        (a, _) if !a.is_float() => {
            return if got.data == want.data {
                Ok(())
            } else {
                Err("values differ".into())
            };
        }
        _ => {}
    }
    let (a, b) = (got.to_f64s()?, want.to_f64s()?);
    for (i, (&x, &y)) in a.iter().zip(&b).enumerate() {
        let ok = if y.is_nan() {
            x.is_nan()
        } else if y.is_infinite() {
            x == y
        } else {
            (x - y).abs() <= 1e-7 + 1e-3 * y.abs()
        };
        if !ok {
            return Err(format!("element {i}: {x} != {y}"));
        }
    }
    Ok(())
}

fn same(got: &Value, want: &Value) -> Result<(), String> {
    match (got, want) {
        (Value::Tensor(a), Value::Tensor(b)) => close(a, b),
        (Value::Seq(a, _), Value::Seq(b, _)) => {
            if a.len() != b.len() {
                return Err(format!("sequence of {} != {}", a.len(), b.len()));
            }
            a.iter().zip(b).try_for_each(|(x, y)| close(x, y))
        }
        (Value::Opt(a, _), Value::Opt(b, _)) => match (a, b) {
            (None, None) => Ok(()),
            (Some(x), Some(y)) => same(x, y),
            _ => Err("optional presence differs".into()),
        },
        (Value::Opt(Some(a), _), b) => same(a, b),
        (a, Value::Opt(Some(b), _)) => same(a, b),
        _ => Err("value kinds differ".into()),
    }
}

/// Runs a model on named inputs and returns its outputs in graph order.
type Runner<'a> = dyn Fn(&Model, Vec<(String, Value)>) -> Result<Vec<(String, Value)>, String> + 'a;

/// The CPU executor as a [`Runner`].
fn on_cpu(model: &Model, inputs: Vec<(String, Value)>) -> Result<Vec<(String, Value)>, String> {
    let exec = Executor::new(model).map_err(|e| e.to_string())?;
    Ok(exec
        .run(inputs, &RunOptions::default())
        .map_err(|e| e.to_string())?
        .outputs)
}

/// Runs one test folder on the CPU executor; `Err` is the reason it fails.
fn run_test(model: &Model, dir: &Path) -> Result<(), String> {
    run_test_with(model, dir, &on_cpu)
}

/// Runs one test folder with `run`; `Err` is the reason it fails.
fn run_test_with(model: &Model, dir: &Path, run: &Runner<'_>) -> Result<(), String> {
    let g = &model.graph;
    let mut sets: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| e.to_string())?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("test_data_set"))
        })
        .collect();
    sets.sort();
    for set in sets {
        let mut inputs = Vec::new();
        let real: Vec<_> = g
            .inputs()
            .iter()
            .filter(|&&i| g.value(i).initializer.is_none())
            .copied()
            .collect();
        for (k, &i) in real.iter().enumerate() {
            let p = set.join(format!("input_{k}.pb"));
            if !p.exists() {
                continue;
            }
            let v = read(&p, kind(g.value(i).ty.as_ref()))?;
            inputs.push((g.value(i).name().to_string(), v));
        }
        let outputs = run(model, inputs)?;
        for (k, &o) in g.outputs().iter().enumerate() {
            let p = set.join(format!("output_{k}.pb"));
            if !p.exists() {
                continue;
            }
            let want = read(&p, kind(g.value(o).ty.as_ref()))?;
            same(&outputs[k].1, &want)
                .map_err(|e| format!("output {k} '{}': {e}", outputs[k].0))?;
        }
    }
    Ok(())
}

/// The op a test exercises: its last node's op (`expanded` tests are labelled as such).
fn op_of(model: &Model, test: &str) -> String {
    if test.contains("_expanded") {
        return "(function expansions)".into();
    }
    model
        .graph
        .nodes()
        .last()
        .map_or("(empty)".into(), |(_, n)| n.op_type.clone())
}

fn corpus_ops() -> BTreeSet<String> {
    let mut ops = BTreeSet::new();
    for p in common::corpus_dir()
        .map(|d| common::models_under(&d))
        .unwrap_or_default()
    {
        let m = mpopt_onnx::load(&p).unwrap();
        fn walk(g: &mpopt_ir::Graph, ops: &mut BTreeSet<String>) {
            for (_, n) in g.nodes() {
                ops.insert(n.op_type.clone());
                for (_, sg) in n.subgraphs() {
                    walk(sg, ops);
                }
            }
        }
        walk(&m.graph, &mut ops);
    }
    ops
}

/// Failures accepted for corpus ops: test-name fragments, with the reason.
/// (None at present: every node test of every op a corpus model uses passes.)
const CORPUS_OP_EXCEPTIONS: &[(&str, &str)] = &[];

#[test]
fn node_suite_conformance() {
    let models: Vec<_> = common::suite_models()
        .into_iter()
        .filter(|p| {
            p.parent()
                .is_some_and(|d| d.join("test_data_set_0").is_dir())
        })
        .filter(|p| !p.components().any(|c| c.as_os_str() == "corpus"))
        .collect();
    if models.is_empty() {
        eprintln!("SKIP: no node-suite folders in MPOPT_SUITE_DIRS");
        return;
    }
    // op -> (passed, failed tests with reasons)
    let mut table: BTreeMap<String, (usize, Vec<(String, String)>)> = BTreeMap::new();
    let (mut total, mut passed) = (0, 0);
    for path in &models {
        let dir = path.parent().unwrap();
        let test = dir.file_name().unwrap().to_string_lossy().to_string();
        let Ok(model) = mpopt_onnx::load(path) else {
            continue;
        };
        total += 1;
        let op = op_of(&model, &test);
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_test(&model, dir)))
            .unwrap_or_else(|_| Err("PANIC".into()));
        let e = table.entry(op).or_default();
        match res {
            Ok(()) => {
                passed += 1;
                e.0 += 1;
            }
            Err(msg) => e.1.push((test, msg.chars().take(160).collect())),
        }
    }
    let rate = passed as f64 / total as f64;
    let mut md = format!(
        "# CPU executor conformance on the ONNX backend node suite\n\n\
         Generated by `tests/tests/exec_suite.rs` (onnx 1.23.2 node suite; tolerance rtol 1e-3, atol 1e-7).\n\n\
         **{passed} of {total} tests pass ({:.1}%).**\n\n| op | passed | failed | first failure |\n|---|---|---|---|\n",
        100.0 * rate
    );
    for (op, (ok, fails)) in &table {
        let first = fails
            .first()
            .map(|(t, m)| format!("{t}: {}", m.replace('|', "\\|")))
            .unwrap_or_default();
        md.push_str(&format!("| {op} | {ok} | {} | {first} |\n", fails.len()));
    }
    md.push_str("\n## Every failure\n\n");
    for (op, (_, fails)) in &table {
        for (t, m) in fails {
            md.push_str(&format!("- {op} / {t}: {}\n", m.replace('\n', " ")));
        }
    }
    let out = common::root().join("target/exec-suite.md");
    std::fs::write(&out, &md).unwrap();
    eprintln!(
        "executor: {passed}/{total} node tests pass ({:.1}%); table in {}",
        100.0 * rate,
        out.display()
    );
    let corpus = corpus_ops();
    let mut bad = Vec::new();
    for op in &corpus {
        if let Some((_, fails)) = table.get(op) {
            for (t, m) in fails {
                if !CORPUS_OP_EXCEPTIONS.iter().any(|(x, _)| t.contains(x)) {
                    bad.push(format!("{op} / {t}: {m}"));
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "corpus ops fail node tests:\n{}",
        bad.join("\n")
    );
    assert!(rate >= FLOOR, "pass rate {rate:.3} under the floor {FLOOR}");
}

/// Node-suite models for the suite-wide tests (the corpus excluded).
fn node_suite() -> Vec<PathBuf> {
    common::suite_models()
        .into_iter()
        .filter(|p| {
            p.parent()
                .is_some_and(|d| d.join("test_data_set_0").is_dir())
        })
        .filter(|p| !p.components().any(|c| c.as_os_str() == "corpus"))
        .collect()
}

/// The GPU executor's device path against the node suite, on the kernel emulator (always) and on a real GPU
/// (when one is present): every test whose op has a device implementation and that the CPU executor passes
/// must pass on the device too, with the same tolerance. This checks every shape, stride, offset and GEMM
/// layout the device path computes, on a machine with no GPU.
#[test]
fn node_suite_on_gpu_devices() {
    let models = node_suite();
    if models.is_empty() {
        eprintln!("SKIP: no node-suite folders in MPOPT_SUITE_DIRS");
        return;
    }
    let gpu_ops = mpopt_cuda::gpu_ops();
    let cuda_ok = match mpopt_cuda::Cuda::open(0) {
        Ok(_) => true,
        Err(e) => {
            eprintln!("SKIP (CUDA part): {e}");
            false
        }
    };
    // device nodes and fallback nodes over the whole run, per device
    let counts = std::cell::RefCell::new(BTreeMap::<&str, (usize, usize)>::new());
    fn on<B: mpopt_cuda::Backend>(
        m: &Model,
        dev: B,
        inputs: Vec<(String, Value)>,
        tally: &mut (usize, usize),
    ) -> Result<Vec<(String, Value)>, String> {
        let mut ex = mpopt_cuda::GpuExecutor::new(m, dev).map_err(|e| e.to_string())?;
        ex.set_host_limit(0);
        let r = ex.run(inputs).map_err(|e| e.to_string())?;
        tally.0 += r.stats.gpu_nodes;
        tally.1 += r.stats.fallback_nodes();
        Ok(r.outputs)
    }
    // MPOPT_GPU_ONLY (bench/gpu-device.sh on a GPU machine): the GPU alone, which must be there
    let gpu_only = std::env::var_os("MPOPT_GPU_ONLY").is_some();
    assert!(
        cuda_ok || !gpu_only,
        "MPOPT_GPU_ONLY is set but CUDA does not open"
    );
    let mut devices: Vec<(&str, Box<Runner<'_>>)> = Vec::new();
    if !gpu_only {
        devices.push((
            "emulator",
            Box::new(|m: &Model, inputs| {
                let mut c = counts.borrow_mut();
                on(
                    m,
                    mpopt_cuda::Emu::new(),
                    inputs,
                    c.entry("emulator").or_default(),
                )
            }),
        ));
    }
    if cuda_ok {
        devices.push((
            "cuda",
            Box::new(|m: &Model, inputs| {
                let gpu = mpopt_cuda::Cuda::open(0).map_err(|e| e.to_string())?;
                let mut c = counts.borrow_mut();
                on(m, gpu, inputs, c.entry("cuda").or_default())
            }),
        ));
    }
    for (name, run) in &devices {
        let (mut tried, mut passed) = (0, 0);
        let mut bad = Vec::new();
        for path in &models {
            let dir = path.parent().unwrap();
            let test = dir.file_name().unwrap().to_string_lossy().to_string();
            let Ok(model) = mpopt_onnx::load(path) else {
                continue;
            };
            let op = op_of(&model, &test);
            if !gpu_ops.contains(&op.as_str()) || run_test(&model, dir).is_err() {
                continue;
            }
            tried += 1;
            let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run_test_with(&model, dir, run.as_ref())
            }))
            .unwrap_or_else(|_| Err("PANIC".into()));
            match res {
                Ok(()) => passed += 1,
                Err(m) => bad.push(format!(
                    "{op} / {test}: {}",
                    m.chars().take(200).collect::<String>()
                )),
            }
        }
        let (on_dev, fell_back) = counts.borrow().get(name).copied().unwrap_or_default();
        eprintln!(
            "{name}: {passed}/{tried} node tests of device ops pass; {on_dev} nodes ran on the device, \
             {fell_back} fell back to the CPU"
        );
        assert!(tried > 100, "{name}: only {tried} tests ran");
        assert!(
            bad.is_empty(),
            "{name}: {} tests the CPU executor passes fail on the device:\n{}",
            bad.len(),
            bad.join("\n")
        );
        assert!(
            on_dev * 2 > tried,
            "{name}: the device path barely ran ({on_dev} nodes in {tried} tests)"
        );
    }
}
