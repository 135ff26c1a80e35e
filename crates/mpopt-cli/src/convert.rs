//! `mpopt MODEL -o OUT`: the conversion, its options, the policy file and the JSON report.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use mpopt_ir::{DType, Graph, Model};
use mpopt_passes::analyze_ranges::RangeOptions;
use mpopt_passes::assign_precision::{PrecisionOptions, Selector};
use mpopt_passes::calibrate::InputSet;
use mpopt_passes::insert_casts::IoTypes;
use mpopt_passes::pipeline::{self, ConvertOptions};
use mpopt_passes::policy::OpClass;
use mpopt_passes::search_precision::Tolerance;
use mpopt_passes::{PassManager, PassRun};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::Usage;

/// The conversion's command-line arguments.
#[derive(clap::Args, Debug, Default)]
pub struct ConvertArgs {
    /// The fp32 ONNX model to convert.
    pub model: Option<PathBuf>,
    /// Where to write the converted model.
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Low precision to convert to: fp16, bf16, or auto (fp16, and bf16 for the nodes whose only problem is
    /// fp16's range: values beyond 65504 or underflowing, proven or observed).
    #[arg(long, default_value = "fp16", value_name = "fp16|bf16|auto")]
    pub to: String,
    /// Graph inputs and outputs keep their dtypes (the default; see --io-types).
    #[arg(long, default_value_t = true)]
    pub keep_io_types: bool,
    /// `keep` (default), `low` (float32 inputs and outputs become the target type), or a comma-separated
    /// list of input/output names that become the target type.
    #[arg(long, value_name = "keep|low|NAME,...")]
    pub io_types: Option<String>,
    /// Keep these nodes in fp32: an op type (`Softmax`, `com.microsoft::Attention`), `node:REGEX` or
    /// `domain:NAME`. Repeatable.
    #[arg(long = "keep-fp32", value_name = "SELECTOR")]
    pub keep_fp32: Vec<String>,
    /// Lower these nodes whatever their class (the schema still has the last word). Repeatable.
    #[arg(long = "force-low", value_name = "SELECTOR")]
    pub force_low: Vec<String>,
    /// A TOML policy file: `to`, `keep_fp32`, `force_low`, and a `[classes]` table of op = class.
    #[arg(long, value_name = "FILE.toml")]
    pub policy: Option<PathBuf>,
    /// Write every decision, cast and conversion as JSON.
    #[arg(long, value_name = "FILE.json")]
    pub report: Option<PathBuf>,
    /// Run these passes instead of the default pipeline (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub passes: Option<Vec<String>>,
    /// Print the IR to stderr after this pass (repeatable).
    #[arg(long = "print-after", value_name = "PASS")]
    pub print_after: Vec<String>,
    /// Stop after this pass.
    #[arg(long = "stop-after", value_name = "PASS")]
    pub stop_after: Option<String>,
    /// Store tensors of 1 KiB or more in OUTPUT.data.
    #[arg(long)]
    pub external_data: bool,
    /// Also remove f32 -> f16 -> f32 cast pairs. This changes values: off unless asked.
    #[arg(long)]
    pub unsafe_fuse_casts: bool,
    #[command(flatten)]
    pub ranges: RangeArgs,
    /// Observed magnitudes times this must stay within the target's range (default 8).
    #[arg(long, value_name = "K", default_value_t = mpopt_passes::assign_precision::DEFAULT_RANGE_MARGIN)]
    pub range_margin: f64,
    /// Keep a node fp32 when more than this fraction of its observed non-zero outputs would become zero or
    /// subnormal in the target type although significant next to the tensor's largest values (default 0.5).
    #[arg(long, value_name = "FRACTION", default_value_t = mpopt_passes::assign_precision::DEFAULT_MAX_UNDERFLOW)]
    pub max_underflow: f64,
    /// An error budget on the outputs, measured on the --calib inputs with the GPU-faithful executor:
    /// `max-rel`, `max-abs`, `cosine` or `top1`, optionally for one output (`cosine@emb=0.9999`).
    /// Repeatable; all must hold. The search keeps as much low precision as the budget allows.
    #[arg(long = "tolerance", value_name = "METRIC[@OUTPUT]=VALUE")]
    pub tolerance: Vec<String>,
}

/// Range evidence: declared input ranges and calibration data (shared by conversion and `print --ranges`).
#[derive(clap::Args, Debug, Default, Clone)]
pub struct RangeArgs {
    /// Every element of graph input NAME lies in [LO, HI] (repeatable); undeclared float inputs are
    /// unbounded.
    #[arg(long = "input-range", value_name = "NAME=LO:HI")]
    pub input_range: Vec<String>,
    /// Calibration inputs: an .npz (keys are input names; NAME__setN keys are more sets), a folder of .npz
    /// files, or a folder of test_data_set_N folders. Repeatable.
    #[arg(long, value_name = "FILE.npz|DIR")]
    pub calib: Vec<PathBuf>,
}

impl RangeArgs {
    /// The declared ranges.
    pub fn ranges(&self) -> Result<RangeOptions> {
        let mut inputs = Vec::new();
        for s in &self.input_range {
            inputs.push(RangeOptions::parse_input(s).map_err(Usage)?);
        }
        Ok(RangeOptions { inputs })
    }

    /// Every calibration input set, read for `model`.
    pub fn calibration(&self, model: &Model) -> Result<Vec<InputSet>> {
        let mut sets = Vec::new();
        for p in &self.calib {
            if !p.exists() {
                bail!("--calib {}: no such file or folder", p.display());
            }
            let npz: Vec<PathBuf> = if p.is_dir() {
                let mut v: Vec<PathBuf> = std::fs::read_dir(p)
                    .with_context(|| format!("cannot read {}", p.display()))?
                    .flatten()
                    .map(|e| e.path())
                    .filter(|f| f.extension().is_some_and(|e| e == "npz"))
                    .collect();
                v.sort();
                v
            } else {
                Vec::new()
            };
            let files = if npz.is_empty() { vec![p.clone()] } else { npz };
            for f in files {
                let loaded = crate::run::load_inputs(&f, model)
                    .with_context(|| format!("--calib {}", f.display()))?;
                sets.extend(loaded.into_iter().map(|s| s.values));
            }
        }
        Ok(sets)
    }
}

/// The policy file.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    to: Option<String>,
    #[serde(default)]
    keep_fp32: Vec<String>,
    #[serde(default)]
    force_low: Vec<String>,
    #[serde(default)]
    classes: BTreeMap<String, String>,
}

/// The target type and whether `auto` (fp16, with bf16 where fp16's range is the only problem) was asked.
fn target(s: &str) -> Result<(DType, bool)> {
    match s {
        "fp16" | "f16" | "float16" => Ok((DType::F16, false)),
        "bf16" | "bfloat16" => Ok((DType::BF16, false)),
        "auto" => Ok((DType::F16, true)),
        _ => Err(Usage(format!("--to '{s}': choose fp16, bf16 or auto")).into()),
    }
}

fn selectors(list: &[String], flag: &str) -> Result<Vec<Selector>> {
    list.iter()
        .map(|s| Selector::parse(s).map_err(|e| Usage(format!("{flag}: {e}")).into()))
        .collect()
}

/// Builds the options from the flags and the policy file (flags add to the file's lists).
fn options(a: &ConvertArgs) -> Result<ConvertOptions> {
    let mut file = PolicyFile::default();
    if let Some(p) = &a.policy {
        let text = std::fs::read_to_string(p).with_context(|| format!("{}", p.display()))?;
        file = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: {}", p.display(), e.to_string().trim()))?;
    }
    let to = if a.to != "fp16" {
        a.to.clone()
    } else {
        file.to.clone().unwrap_or_else(|| a.to.clone())
    };
    let mut keep = file.keep_fp32.clone();
    keep.extend(a.keep_fp32.iter().cloned());
    let mut force = file.force_low.clone();
    force.extend(a.force_low.iter().cloned());
    let mut classes = Vec::new();
    for (op, class) in &file.classes {
        let c = OpClass::parse(class).ok_or_else(|| {
            Usage(format!(
                "policy class for '{op}': '{class}' is not one of allow, infer, clear, deny, keep"
            ))
        })?;
        match Selector::parse(op).map_err(|e| Usage(format!("policy [classes]: {e}")))? {
            Selector::Op { domain, op } => classes.push((domain, op, c)),
            _ => bail!(Usage(format!(
                "policy [classes]: '{op}' must be an op type (Op or domain::Op)"
            ))),
        }
    }
    let io = match a.io_types.as_deref() {
        None | Some("keep") => IoTypes::Keep,
        Some("low") => IoTypes::Low,
        Some(list) => IoTypes::Names(list.split(',').map(|s| s.trim().to_string()).collect()),
    };
    Ok(ConvertOptions {
        precision: PrecisionOptions {
            target: target(&to)?.0,
            auto_bf16: target(&to)?.1,
            keep_fp32: selectors(&keep, "--keep-fp32")?,
            force_low: selectors(&force, "--force-low")?,
            classes,
            range_margin: positive(a.range_margin, "--range-margin")?,
            max_underflow: fraction(a.max_underflow, "--max-underflow")?,
            search: None,
        },
        ranges: a.ranges.ranges()?,
        calib: Vec::new(),
        io,
        unsafe_fuse: a.unsafe_fuse_casts,
        tolerances: a
            .tolerance
            .iter()
            .map(|t| Tolerance::parse(t).map_err(|e| Usage(format!("--tolerance: {e}")).into()))
            .collect::<Result<_>>()?,
        search_progress: None,
    })
}

fn positive(x: f64, flag: &str) -> Result<f64> {
    if x.is_finite() && x >= 1.0 {
        Ok(x)
    } else {
        bail!(Usage(format!("{flag} {x}: must be a number >= 1")))
    }
}

fn fraction(x: f64, flag: &str) -> Result<f64> {
    if (0.0..=1.0).contains(&x) {
        Ok(x)
    } else {
        bail!(Usage(format!("{flag} {x}: must be between 0 and 1")))
    }
}

fn check_io_names(m: &Model, io: &IoTypes) -> Result<()> {
    if let IoTypes::Names(names) = io {
        let g = &m.graph;
        let valid: Vec<&str> = g
            .inputs()
            .iter()
            .chain(g.outputs())
            .map(|&v| g.value(v).name())
            .collect();
        for n in names {
            if !valid.contains(&n.as_str()) {
                bail!(Usage(format!(
                    "--io-types: '{n}' is not a graph input or output; they are: {}",
                    valid.join(", ")
                )));
            }
        }
    }
    Ok(())
}

fn decisions(g: &Graph, scope: &str, out: &mut Vec<Value>) {
    for (id, n) in g.nodes() {
        if let Some(p) = &n.precision {
            let mut d = json!({
                "graph": scope,
                "node": n.name,
                "op": n.qualified_op(),
                "precision": p.dtype.to_string(),
                "rule": p.rule,
                "evidence": p.evidence,
            });
            let ranges = node_ranges(g, n);
            if !ranges.is_empty() {
                d["ranges"] = Value::Object(ranges);
            }
            out.push(d);
        }
        for (attr, sg) in n.subgraphs() {
            decisions(
                sg,
                &format!("{scope} / node {} / {attr}", mpopt_ir::node_label(g, id)),
                out,
            );
        }
    }
}

/// The range facts of a node's inputs and outputs, by value name.
fn node_ranges(g: &Graph, n: &mpopt_ir::Node) -> serde_json::Map<String, Value> {
    let num = |x: f64| {
        if x.is_finite() {
            json!(x)
        } else {
            json!(x.to_string())
        }
    };
    let mut m = serde_json::Map::new();
    for v in n.inputs().iter().chain(n.outputs()).flatten() {
        let val = g.value(*v);
        let Some(r) = val.range.as_deref() else {
            continue;
        };
        let mut o = serde_json::Map::new();
        if let Some(p) = r.proven {
            o.insert("proven".into(), json!([num(p.lo), num(p.hi)]));
        }
        if let Some(ob) = r.observed {
            o.insert(
                "observed".into(),
                json!({
                    "min": num(ob.min), "max": num(ob.max), "abs_max": num(ob.abs_max),
                    "count": ob.count, "underflow_share": ob.underflow_share(),
                    "to_zero": ob.to_zero, "to_subnormal": ob.to_subnormal,
                }),
            );
        }
        // an initializer's scan, while it still holds the scanned f32 data
        if let Some(c) = &r.constant
            && val.initializer.as_deref().is_some_and(|t| c.describes(t))
        {
            let against =
                |(overflow, flush): (u64, u64)| json!({"overflow": overflow, "flush": flush});
            o.insert(
                "constant".into(),
                json!({
                    "min": num(c.min as f64), "max": num(c.max as f64),
                    "f16": against(c.beyond[0]), "bf16": against(c.beyond[1]),
                }),
            );
        }
        if !o.is_empty() {
            m.insert(val.name().to_string(), Value::Object(o));
        }
    }
    m
}

fn file_bytes(p: &Path) -> u64 {
    let data = PathBuf::from(format!("{}.data", p.display()));
    std::fs::metadata(p).map_or(0, |m| m.len()) + std::fs::metadata(data).map_or(0, |m| m.len())
}

/// Models with less tensor data than this, and fewer nodes than [`ONE_THREAD_NODES`], are converted on the
/// main thread alone.
///
/// What the passes do in parallel is per weight (range scans, narrowing) or per node, and starting the
/// worker threads and handing them each parallel loop costs more than that saves on a small model: the
/// passes on one thread made the conversions of the corpus models up to 11 MB faster (silero_vad_v6
/// -0.74 ms, silero_16k -0.39, magika -0.43, ppocrv4_rec -1.58; paired runs, 2 vCPUs, 2026-12-03), those of
/// 20 MB the same within noise and those above slower (vit_tiny +1.5, open_nsfw +3.0, paraphrase_minilm
/// +7.7 ms). Runs of the model (calibration, the accuracy search) keep every core whatever the size.
const ONE_THREAD_BYTES: usize = 16 << 20;

/// See [`ONE_THREAD_BYTES`]: generated chains of small nodes converted as fast on one thread up to 10,000
/// nodes (134 against 138 ms), and slower from 20,000 (294 against 254 ms; 100,000: 1.6 against 1.35 s).
const ONE_THREAD_NODES: usize = 10_000;

/// Bytes of tensor data in `g` and its subgraphs: initializers and tensor attributes (Constant values).
fn tensor_bytes(g: &mpopt_ir::Graph) -> usize {
    let init: usize = g
        .initializers()
        .iter()
        .filter_map(|&v| g.value(v).initializer.as_deref())
        .map(|t| t.byte_size())
        .sum();
    let in_nodes: usize = g
        .nodes()
        .flat_map(|(_, n)| n.attributes.iter())
        .map(|a| match &a.value {
            mpopt_ir::AttrValue::Tensor(t) => t.byte_size(),
            mpopt_ir::AttrValue::Tensors(ts) => ts.iter().map(|t| t.byte_size()).sum(),
            v => v.graphs().iter().map(tensor_bytes).sum(),
        })
        .sum();
    init + in_nodes
}

/// Makes the main thread rayon's only worker, so that no worker thread is started and parallel loops run
/// in place. Done before anything parallel has run; if the pool exists already, it stays as it is.
fn one_thread() {
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .use_current_thread()
        .build_global();
}

/// Runs the conversion.
pub fn run(a: ConvertArgs) -> Result<()> {
    let (Some(model_path), Some(output)) = (a.model.clone(), a.output.clone()) else {
        bail!(Usage(
            "convert a model with `mpopt MODEL -o OUT`, or run a subcommand (see --help)".into()
        ));
    };
    let mut reads: Vec<(&str, &Path)> = vec![("the input model", &model_path)];
    reads.extend(
        a.ranges
            .calib
            .iter()
            .map(|p| ("a calibration file", p.as_path())),
    );
    reads.extend(a.policy.iter().map(|p| ("the policy file", p.as_path())));
    let mut writes: Vec<(&str, &Path)> = vec![("output", &output)];
    writes.extend(a.report.iter().map(|p| ("report", p.as_path())));
    crate::check_writes(&reads, &writes)?;
    let start = Instant::now();
    let mut opts = options(&a)?;
    let mut m = crate::load(&model_path)?;
    let load_secs = start.elapsed().as_secs_f64();
    check_io_names(&m, &opts.io)?;
    opts.calib = a.ranges.calibration(&m)?;
    if !opts.tolerances.is_empty() && opts.calib.is_empty() {
        bail!(Usage(
            "--tolerance needs inputs to measure on: give --calib FILE.npz (or a folder)".into()
        ));
    }
    if !opts.tolerances.is_empty() && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        // The search runs the model many times: show where it is.
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} search: {msg} [{pos}/{len}] ({elapsed})",
            )
            .expect("a valid template"),
        );
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        opts.search_progress = Some(mpopt_passes::search_precision::Progress(
            std::sync::Arc::new(move |stage: &str, done: usize, total: usize| {
                if stage == "done" {
                    bar.finish_and_clear();
                    return;
                }
                bar.set_message(stage.to_string());
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            }),
        ));
    }
    let before = pipeline::census(&m.graph);
    if opts.calib.is_empty()
        && before.nodes < ONE_THREAD_NODES
        && tensor_bytes(&m.graph) < ONE_THREAD_BYTES
    {
        one_thread();
    }
    let usage = |e: mpopt_passes::PassError| Usage(e.to_string());
    let passes = match &a.passes {
        Some(names) => names
            .iter()
            .map(|n| pipeline::by_name(n.trim()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(usage)?,
        None => pipeline::default_pipeline(&opts),
    };
    // A progress bar over the passes for big models, when a person is watching.
    let nodes = before.nodes;
    let mut manager = PassManager::new(passes);
    if nodes >= 20_000 && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{pos}/{len}] {msg} ({elapsed})")
                .expect("a valid template"),
        );
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        manager = manager.on_pass(move |name, i, n| {
            bar.set_length(n as u64);
            bar.set_position(i as u64);
            bar.set_message(format!("{name} on {nodes} nodes"));
            if i + 1 == n {
                bar.finish_and_clear();
            }
        });
    }
    // The model is verified when loaded and again before it is written (`mpopt_onnx::save`), so an invalid
    // result is never saved; debug builds and the tests also verify after every pass, to name the pass at
    // fault. In release builds that was 5 more verifications, 10% of a small model's conversion.
    let runs: Vec<PassRun> = manager
        .verify_each(false)
        .print_after(a.print_after.clone())
        .map_err(usage)?
        .stop_after(a.stop_after.clone())
        .map_err(usage)?
        .run(&mut m)?;
    // Record every inferred type, so that downstream tools see the new dtypes without re-inferring.
    mpopt_passes::infer_types::record_value_info(&mut m);
    let mode = if a.external_data {
        mpopt_onnx::ExternalData::Always
    } else {
        mpopt_onnx::ExternalData::Auto
    };
    let save_start = Instant::now();
    mpopt_onnx::save(&m, &output, mode).context("cannot save the converted model")?;
    let save_secs = save_start.elapsed().as_secs_f64();
    let after = pipeline::census(&m.graph);
    let (bytes_before, bytes_after) = (file_bytes(&model_path), file_bytes(&output));
    let secs = start.elapsed().as_secs_f64();
    // the notes and the summary are formatted first and written at once: stderr is unbuffered, and
    // formatting straight into it made one write per piece (30 for the summary line)
    use std::fmt::Write as _;
    let mut text = String::new();
    for r in &runs {
        for n in &r.outcome.notes {
            let _ = writeln!(text, "note: {}: {n}", r.name);
        }
    }
    let _ = writeln!(
        text,
        "converted {} -> {} ({}): {} nodes, {} {} / {} fp32 ({:.1}% of FLOPs low); casts {} -> {}; {} -> {} bytes; {:.3} s",
        model_path.display(),
        output.display(),
        opts.precision.target,
        after.nodes,
        after.low,
        if opts.precision.auto_bf16 {
            "f16/bf16".to_string()
        } else {
            opts.precision.target.to_string()
        },
        after.fp32,
        if after.flops > 0 {
            100.0 * after.flops_low as f64 / after.flops as f64
        } else {
            0.0
        },
        before.casts,
        after.casts,
        bytes_before,
        bytes_after,
        secs
    );
    eprint!("{text}");
    if let Some(report) = &a.report {
        let mut nodes = Vec::new();
        decisions(&m.graph, &format!("graph '{}'", m.graph.name), &mut nodes);
        let passes: Vec<Value> = runs
            .iter()
            .map(|r| {
                json!({
                    "name": r.name,
                    "ms": r.time.as_secs_f64() * 1e3,
                    "counters": r.outcome.counters.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
                    "notes": r.outcome.notes,
                })
            })
            .collect();
        let record = |rec: &mpopt_passes::Record| {
            let mut o = serde_json::Map::new();
            o.insert("kind".into(), json!(rec.kind));
            for (k, v) in &rec.fields {
                o.insert((*k).into(), json!(v));
            }
            Value::Object(o)
        };
        let all = || runs.iter().flat_map(|r| r.outcome.records.iter());
        let records: Vec<Value> = all()
            .filter(|r| !r.kind.starts_with("search"))
            .map(record)
            .collect();
        let search: Vec<Value> = all()
            .filter(|r| r.kind.starts_with("search"))
            .map(record)
            .collect();
        let doc = json!({
            "model": model_path.display().to_string(),
            "output": output.display().to_string(),
            "target": opts.precision.target.to_string(),
            "summary": {
                "nodes": after.nodes,
                "nodes_low": after.low,
                "nodes_fp32": after.fp32,
                "flops": after.flops,
                "flops_low": after.flops_low,
                "flops_low_share": if after.flops > 0 { after.flops_low as f64 / after.flops as f64 } else { 0.0 },
                "casts_before": before.casts,
                "casts_after": after.casts,
                "bytes_before": bytes_before,
                "bytes_after": bytes_after,
                "seconds": secs,
                "load_seconds": load_secs,
                "save_seconds": save_secs,
            },
            "passes": passes,
            "nodes": nodes,
            "conversions": records,
            "search": search,
        });
        let text = serde_json::to_string_pretty(&doc)?;
        crate::write_whole(report, text.as_bytes())
            .with_context(|| format!("cannot write the report {}", report.display()))?;
    }
    // The process ends next, and the OS takes its memory back at once: freeing the model's nodes, values
    // and names one by one first was 0.7 ms of ppocrv4_det's 14.
    std::mem::forget(m);
    std::mem::forget(runs);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Initializers, Constant values and what subgraphs hold all count, each once.
    #[test]
    fn tensor_bytes_counts_every_graph() {
        let text = "ir_version 8\nopset ai.onnx 17\n\ngraph @g(%x: f32[4]) -> (%y: f32[4]) {\n  %c = const bool[] [true]\n  %w = const f32[4] [1.0, 2.0, 3.0, 4.0]\n  %k = Constant() {value = tensor f32[2] [1.0, 2.0]}\n  %y = If(%c) {else_branch = graph @e() -> (%u: f32[4]) captures (%x: f32[4]) {\n    %v = Constant() {value = tensor f32[1] [3.0]}\n    %u = Add(%x, %v)\n  }, then_branch = graph @t() -> (%t: f32[4]) captures (%x: f32[4], %w: f32[4]) {\n    %t = Mul(%x, %w)\n  }}\n}\n";
        let m = mpopt_ir::text::parse_model(text).unwrap();
        // bool[] 1, w 16, k 8, v 4
        assert_eq!(tensor_bytes(&m.graph), 1 + 16 + 8 + 4);
    }
}
