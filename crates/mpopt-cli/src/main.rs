//! The `mpopt` command line. Library crates return typed errors; this binary reports them in one line and
//! exits 1 (2 for usage errors, as clap does).

mod alloc;
mod convert;
mod inspect;
mod run;

/// mimalloc instead of the system allocator: loading a model is millions of small allocations (names, node
/// and tensor records). Measured on a 1,000,000-node model: freeing the model went from 2.5 s to 0.2 s and
/// encoding from 2.9 s to 1.6 s. Asked for plain blocks where they are aligned enough ([`alloc`]).
#[global_allocator]
static GLOBAL: alloc::Mimalloc = alloc::Mimalloc;

/// mimalloc v3's `mi_option_purge_delay` (its position in `mi_option_e`, mimalloc.h; the Rust bindings name
/// only the options before it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Freed memory stays with the process instead of going back to the OS after a delay (1 s: mimalloc v3's
/// default, options.c). The executor frees and allocates activations of megabytes per node; returned memory came back as fresh
/// pages the kernel zeroes on first touch. On ppocrv4_rec's accuracy search (2 GB of activations) half the
/// time was that zeroing: 4.1 s -> 2.6 s, 2.1 s -> 0.3 s of system time, the same peak RSS. The process is
/// short-lived; what it frees is reused, and all of it goes back at exit.
fn keep_freed_memory() {
    // SAFETY: sets one of mimalloc's global options (an atomic store); valid at any time, and done before
    // any thread starts.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// No transparent huge pages for this process (`prctl(PR_SET_THP_DISABLE)`; Linux only).
/// mimalloc asks for them on its arenas (`madvise(MADV_HUGEPAGE)`), and a process that converts one model
/// touches 20-70 MB. Where memory is virtualised with free-page reporting (cloud VMs with a balloon device,
/// such as the one the benchmarks ran on), a fresh 2 MiB page often has to be backed by the host first:
/// conversions started after a pause of 2.5 s took, with huge pages and without (median of 12,
/// 2026-11-30): ppocrv4_det 64.7 -> 16.8 ms, vit_tiny 85.2 -> 29.8 ms, ppocrv4_rec 40.3 -> 20.4 ms.
/// Back-to-back runs were faster with them (det 12.2 against 15.4 ms) but 1 in 5 of those took 60-75 ms.
/// With 4 KiB pages the time is steady. The flag is checked at each fault, but a page already faulted in
/// stays huge: hence the call before `main` ([`NO_HUGE_PAGES_BEFORE_MAIN`]).
#[cfg(target_os = "linux")]
fn no_transparent_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes one integer argument and only sets a flag on this process; a kernel
    // without it returns EINVAL, which is harmless (the process then behaves as before).
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

/// mpopt: a mixed-precision graph optimizer for ONNX models.
///
/// `mpopt MODEL -o OUT` converts an fp32 model to mixed fp16 (or bf16) precision; the subcommands inspect,
/// print, copy and type models.
#[derive(Parser)]
#[command(
    name = "mpopt",
    version,
    about,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    convert: convert::ConvertArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Summarize a model: opsets, node and op counts (subgraphs included), parameters by dtype, inputs/outputs.
    Inspect {
        /// The ONNX model.
        model: PathBuf,
    },
    /// Print a model in the IR text format.
    Print {
        /// The ONNX model.
        model: PathBuf,
        /// Infer every value's dtype and shape first, so that every node line shows them.
        #[arg(long)]
        types: bool,
        /// Also analyze value ranges (and calibrate with --calib) and show them beside each value.
        #[arg(long)]
        ranges: bool,
        #[command(flatten)]
        range_args: convert::RangeArgs,
    },
    /// Infer every value's dtype and shape and write them into the model's value_info.
    Infer {
        /// The ONNX model.
        model: PathBuf,
        /// Where to write the model.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Print the precision policy: every op's class (allow / infer / clear / deny / keep) and the reason.
    Policy {
        /// Print a Markdown table instead of plain columns.
        #[arg(long)]
        markdown: bool,
    },
    /// Run a model on the CPU reference executor (GPU-faithful fp16/bf16 numerics) and write its outputs.
    Run(run::RunArgs),
    /// Run two models (e.g. the fp32 original and its conversion) on the same inputs and compare every output:
    /// max abs/rel error, cosine, NaN/Inf counts, top-1 agreement; exits 1 past the tolerances.
    Compare(run::CompareArgs),
    /// Rewrite a model through the IR without changing it (also moves tensor data in or out of the file).
    Copy {
        /// The ONNX model.
        model: PathBuf,
        /// Where to write the copy.
        #[arg(short, long)]
        output: PathBuf,
        /// Store tensors of 1 KiB or more in `<OUTPUT>.data` beside the model (automatic past 2 GiB).
        #[arg(long)]
        external_data: bool,
    },
}

/// A usage error: reported like clap's, with exit code 2.
#[derive(Debug)]
pub(crate) struct Usage(pub(crate) String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Usage {}

/// [`no_transparent_huge_pages`] before anything allocates: from the executable's `.init_array`, which the C
/// runtime calls before `main` and before Rust's runtime starts. Called first thing in `main`, it came after
/// the runtime's own first allocations (the main thread's name), for which mimalloc had already reserved its
/// first arena and asked for huge pages on it: perf showed that first 2 MiB page zeroed by the kernel in
/// every run (2% of converting vit_tiny), and after a pause the host may have to back it first.
#[cfg(target_os = "linux")]
#[used]
#[unsafe(link_section = ".init_array")]
static NO_HUGE_PAGES_BEFORE_MAIN: extern "C" fn() = {
    extern "C" fn before_main() {
        no_transparent_huge_pages();
    }
    before_main
};

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<Usage>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

/// Loads a model; what loading repaired (a schedule put in topological order) is said on stderr.
pub(crate) fn load(path: &Path) -> Result<mpopt_ir::Model> {
    let (m, notes) = mpopt_onnx::load_with_notes(path)?;
    if !notes.is_empty() {
        let text: String = notes
            .iter()
            .map(|n| format!("note: {}: {n}\n", path.display()))
            .collect();
        eprint!("{text}");
    }
    Ok(m)
}

/// Runs `infer-types` on the model.
fn infer(m: &mut mpopt_ir::Model) -> Result<mpopt_passes::infer_types::InferReport> {
    use mpopt_passes::Pass;
    let mut pass = mpopt_passes::infer_types::InferTypes::default();
    pass.run(m)?;
    Ok(pass.report)
}

/// Writes to stdout; a closed pipe (`mpopt print m.onnx | head`) ends quietly.
fn emit(text: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("cannot write to stdout")
        }
        _ => Ok(()),
    }
}

/// Refuses an output that is the input (or the same file under another name).
pub(crate) fn check_output(input: &Path, output: &Path) -> Result<()> {
    check_writes(&[("the input model", input)], &[("output", output)])
}

/// Writes `data` to `path` whole or not at all: into a temporary file beside it, then renamed over it. A
/// failed write (a full disk) leaves no partial report and keeps an older file at `path` as it was.
pub(crate) fn write_whole(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|s| s.to_str()).unwrap_or("out");
    let tmp = dir.join(format!(".{name}.mpopt-tmp-{}", std::process::id()));
    let result = std::fs::write(&tmp, data).and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Two paths naming one file (under any name, when both exist).
fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// Checks, before any work, every file a command will write: none is a file it reads (`reads`: what each
/// is, and its path), none is
/// written twice, none is a folder, and each one's folder exists. A mistake in a path then costs nothing: no
/// input is overwritten, and a long conversion or search never ends in "cannot write".
pub(crate) fn check_writes(reads: &[(&str, &Path)], writes: &[(&str, &Path)]) -> Result<()> {
    for (i, &(what, w)) in writes.iter().enumerate() {
        let shown = w.display();
        if let Some((read, _)) = reads.iter().find(|(_, r)| same_file(r, w)) {
            return Err(Usage(if *read == "the input model" {
                format!("the {what} '{shown}' is the input model; choose another {what} path")
            } else {
                format!(
                    "the {what} '{shown}' is {read}, which this command reads; choose another path"
                )
            })
            .into());
        }
        if let Some((other, _)) = writes[..i].iter().find(|(_, o)| same_file(o, w)) {
            return Err(Usage(format!(
                "the {what} '{shown}' is also the {other}; give them different paths"
            ))
            .into());
        }
        // (not usage errors: the paths are well formed, the file system says no)
        if w.is_dir() {
            bail!("cannot write the {what} '{shown}': it is a folder");
        }
        let folder = match w.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if !folder.is_dir() {
            bail!(
                "cannot write the {what} '{shown}': the folder '{}' does not exist",
                folder.display()
            );
        }
    }
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    let Some(cmd) = cli.cmd else {
        return convert::run(cli.convert);
    };
    match cmd {
        Cmd::Policy { markdown } => {
            use mpopt_passes::policy::{COM_MICROSOFT, DEFAULT_DOMAIN};
            let mut out = String::new();
            if markdown {
                out.push_str("| op | class | reason |\n|---|---|---|\n");
            }
            let domains = [("", DEFAULT_DOMAIN), ("com.microsoft::", COM_MICROSOFT)];
            for (prefix, table) in domains {
                for (op, class, reason) in table {
                    let op = format!("{prefix}{op}");
                    if markdown {
                        out.push_str(&format!("| {op} | {} | {reason} |\n", class.name()));
                    } else {
                        out.push_str(&format!("{op:40} {:6} {reason}\n", class.name()));
                    }
                }
            }
            let rest = "ai.onnx.ml ops: deny (f32/f64 by their schemas, rarely hot); \
                        any other domain: deny (mpopt does not lower what it does not know)";
            out.push_str(&if markdown {
                format!("\n{rest}\n")
            } else {
                format!("{rest}\n")
            });
            emit(&out)?;
        }
        Cmd::Run(a) => run::run(a)?,
        Cmd::Compare(a) => run::compare(a)?,
        Cmd::Inspect { model } => {
            let m = load(&model)?;
            emit(&inspect::report(&model, &m))?;
        }
        Cmd::Print {
            model,
            types,
            ranges,
            range_args,
        } => {
            let mut m = load(&model)?;
            if types || ranges {
                infer(&mut m)?;
            }
            if ranges {
                use mpopt_passes::Pass;
                mpopt_passes::analyze_ranges::AnalyzeRanges::new(range_args.ranges()?)
                    .run(&mut m)
                    .map_err(|e| Usage(e.to_string()))?;
                let sets = range_args.calibration(&m)?;
                if !sets.is_empty() {
                    mpopt_passes::calibrate::Calibrate::new(sets, mpopt_ir::DType::F16)
                        .run(&mut m)?;
                }
            } else if !range_args.input_range.is_empty() || !range_args.calib.is_empty() {
                return Err(Usage("--input-range and --calib go with --ranges".into()).into());
            }
            emit(&mpopt_ir::text::print_model(&m))?;
        }
        Cmd::Infer { model, output } => {
            check_output(&model, &output)?;
            let mut m = load(&model)?;
            let report = infer(&mut m)?;
            mpopt_passes::infer_types::record_value_info(&mut m);
            mpopt_onnx::save(&m, &output, mpopt_onnx::ExternalData::Auto)
                .context("cannot save the model")?;
            eprintln!(
                "wrote {}: {} node outputs, {} typed, {} shaped ({} fully), {} untyped, {} conflicts",
                output.display(),
                report.values,
                report.typed,
                report.shaped,
                report.fully_shaped,
                report.untyped.len(),
                report.conflicts.len()
            );
            for c in &report.conflicts {
                eprintln!("warning: {c}");
            }
        }
        Cmd::Copy {
            model,
            output,
            external_data,
        } => {
            check_output(&model, &output)?;
            let m = load(&model)?;
            let mode = if external_data {
                mpopt_onnx::ExternalData::Always
            } else {
                mpopt_onnx::ExternalData::Auto
            };
            let s = mpopt_onnx::save(&m, &output, mode)
                .with_context(|| "cannot save the copy".to_string())?;
            match s.external {
                Some((p, n)) => eprintln!(
                    "wrote {} ({} bytes) and {} ({n} bytes)",
                    output.display(),
                    s.model_bytes,
                    p.display()
                ),
                None => eprintln!("wrote {} ({} bytes)", output.display(), s.model_bytes),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_file_is_written_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.json");
        std::fs::write(&p, b"old, longer contents").unwrap();
        super::write_whole(&p, b"new").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        // a target that cannot be replaced (a folder): an error, and no temporary file left behind
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        std::fs::write(sub.join("keep"), b"x").unwrap();
        assert!(super::write_whole(&sub, b"data").is_err());
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["r.json", "sub"]);
    }

    /// The option's position is written down by hand (the bindings do not name it): it must still be the
    /// purge delay, whose default in the bundled mimalloc v3 is 1000 ms, and setting it must hold.
    #[test]
    fn the_purge_delay_option_is_the_one_we_set() {
        // SAFETY: reads and sets one of mimalloc's global options.
        let before = unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) };
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            assert_eq!(
                before,
                1000,
                "mimalloc's option {} is not purge_delay",
                super::MI_OPTION_PURGE_DELAY
            );
        }
        super::keep_freed_memory();
        let after = unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) };
        assert_eq!(after, -1);
    }

    /// The process runs without transparent huge pages from before `main`: this test binary has the same
    /// `.init_array` entry as the program, and nothing here turns them off otherwise. The kernel reports
    /// the flag back.
    #[cfg(target_os = "linux")]
    #[test]
    fn transparent_huge_pages_are_off_before_main() {
        // SAFETY: PR_GET_THP_DISABLE takes no argument and only reads the flag.
        let flag = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
        assert_eq!(flag, 1, "PR_GET_THP_DISABLE");
    }
}
