//! Every pass, declared once: the registry that resolves names given on the command line, and the default
//! pipeline with the reason each entry is there.

use crate::{Pass, PassError, infer_types::InferTypes};

/// Makes a fresh pass.
type Constructor = fn() -> Box<dyn Pass>;

/// Every pass by name, with a constructor.
const REGISTRY: &[(&str, Constructor)] = &[("infer-types", || Box::new(InferTypes::default()))];

/// Every pass name.
pub fn names() -> Vec<&'static str> {
    REGISTRY.iter().map(|(n, _)| *n).collect()
}

/// The pass with this name.
pub fn by_name(name: &str) -> Result<Box<dyn Pass>, PassError> {
    match REGISTRY.iter().find(|(n, _)| *n == name) {
        Some((_, make)) => Ok(make()),
        None => Err(PassError::UnknownPass {
            name: name.to_string(),
            valid: names(),
        }),
    }
}

pub(crate) fn check_name(name: &str) -> Result<(), PassError> {
    by_name(name).map(|_| ())
}

/// The default pipeline, in order.
pub fn default_pipeline() -> Vec<Box<dyn Pass>> {
    vec![
        // Every later decision needs each value's dtype and shape: which tensors are float, how large a
        // reduction is, which inputs are shape arithmetic.
        Box::new(InferTypes::default()),
    ]
}
