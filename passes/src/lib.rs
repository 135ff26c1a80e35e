//! mpopt's passes.
//!
//! A [`Pass`] rewrites or annotates a [`Model`]. The [`PassManager`] runs a list of passes and owns what every
//! pass needs around it, so that passes stay small: it verifies the model after each pass (always in debug
//! builds and tests, on request in release builds), times each pass, collects its counters, prints the IR
//! after a named pass, and stops after a named pass to bisect a problem. The default order lives in
//! [`pipeline`], declared once.

#![deny(missing_docs)]

pub mod analyze_ranges;
pub mod assign_precision;
pub mod calibrate;
pub mod fuse_casts;
pub mod infer_types;
pub mod insert_casts;
pub mod measure_gates;
pub mod pipeline;
pub mod policy;
mod range_rules;
mod saturation;
pub mod search_precision;
mod shape_rules;
mod sym;

use std::time::{Duration, Instant};

use mpopt_ir::{Model, VerifyError};

/// What a pass reports about one run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PassOutcome {
    /// True when the model changed.
    pub changed: bool,
    /// Named counts (`values typed`, `casts removed`, ...), in a stable order.
    pub counters: Vec<(&'static str, u64)>,
    /// Findings worth showing the user (conflicts, values that could not be typed), one line each.
    pub notes: Vec<String>,
    /// Structured details for the JSON report (initializer conversions, ...).
    pub records: Vec<Record>,
}

impl PassOutcome {
    /// The outcome of a rewriting pass whose every counter counts a rewrite: the model changed when any is
    /// non-zero.
    pub fn rewrites(counters: Vec<(&'static str, u64)>) -> PassOutcome {
        PassOutcome {
            changed: counters.iter().any(|&(_, n)| n > 0),
            counters,
            notes: Vec::new(),
            records: Vec::new(),
        }
    }
}

/// One structured detail of a pass run: a kind and named fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// What it is (`initializer converted`).
    pub kind: &'static str,
    /// Its fields, in a stable order.
    pub fields: Vec<(&'static str, String)>,
}

/// A pass failed, or left the model invalid.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PassError {
    /// The pass could not do its work.
    #[error("pass {pass}: {message}")]
    Failed {
        /// Pass name.
        pass: String,
        /// What went wrong, naming the node or value.
        message: String,
    },
    /// The verifier rejected the model after the pass: a bug in the pass.
    #[error("the model is invalid after pass {pass}: {problems}")]
    Invalid {
        /// Pass name.
        pass: String,
        /// The verifier's findings.
        problems: VerifyError,
    },
    /// An unknown pass name.
    #[error("unknown pass '{name}'; the passes are: {}", valid.join(", "))]
    UnknownPass {
        /// The name given.
        name: String,
        /// Every valid name.
        valid: Vec<&'static str>,
    },
}

/// A model-to-model transformation or analysis.
pub trait Pass {
    /// The pass's name, in kebab case (`infer-types`); also its file name in snake case.
    fn name(&self) -> &'static str;
    /// Runs the pass.
    fn run(&mut self, model: &mut Model) -> Result<PassOutcome, PassError>;
}

/// One pass's run, as the manager records it.
#[derive(Clone, Debug)]
pub struct PassRun {
    /// Pass name.
    pub name: &'static str,
    /// Wall time.
    pub time: Duration,
    /// What the pass reported.
    pub outcome: PassOutcome,
}

/// Runs passes in order; see the crate documentation.
pub struct PassManager {
    passes: Vec<Box<dyn Pass>>,
    verify: bool,
    print_after: Vec<String>,
    stop_after: Option<String>,
    progress: Option<Progress>,
}

/// Called before each pass with (pass name, index, count).
type Progress = Box<dyn FnMut(&'static str, usize, usize)>;

impl PassManager {
    /// A manager for these passes. Verification after each pass is on in debug builds.
    pub fn new(passes: Vec<Box<dyn Pass>>) -> PassManager {
        PassManager {
            passes,
            verify: cfg!(debug_assertions),
            print_after: Vec::new(),
            stop_after: None,
            progress: None,
        }
    }

    /// Verify after every pass (also in release builds).
    pub fn verify_each(mut self, on: bool) -> Self {
        self.verify = on || cfg!(debug_assertions);
        self
    }

    /// Print the IR to stderr after these passes.
    pub fn print_after(mut self, names: Vec<String>) -> Result<Self, PassError> {
        for n in &names {
            pipeline::check_name(n)?;
        }
        self.print_after = names;
        Ok(self)
    }

    /// Stop after this pass.
    pub fn stop_after(mut self, name: Option<String>) -> Result<Self, PassError> {
        if let Some(n) = &name {
            pipeline::check_name(n)?;
        }
        self.stop_after = name;
        Ok(self)
    }

    /// Calls `f(pass name, index, count)` before each pass (for progress bars on long work).
    pub fn on_pass(mut self, f: impl FnMut(&'static str, usize, usize) + 'static) -> Self {
        self.progress = Some(Box::new(f));
        self
    }

    /// Runs every pass; returns what each reported.
    pub fn run(&mut self, model: &mut Model) -> Result<Vec<PassRun>, PassError> {
        let mut runs = Vec::new();
        let count = self.passes.len();
        for (i, p) in self.passes.iter_mut().enumerate() {
            let name = p.name();
            if let Some(f) = &mut self.progress {
                f(name, i, count);
            }
            let t = Instant::now();
            let outcome = p.run(model)?;
            let time = t.elapsed();
            if self.verify {
                mpopt_ir::verify_model(model).map_err(|problems| PassError::Invalid {
                    pass: name.to_string(),
                    problems,
                })?;
            }
            if self.print_after.iter().any(|n| n == name) {
                eprintln!("; IR after {name}\n{}", mpopt_ir::text::print_model(model));
            }
            runs.push(PassRun {
                name,
                time,
                outcome,
            });
            if self.stop_after.as_deref() == Some(name) {
                break;
            }
        }
        Ok(runs)
    }
}
