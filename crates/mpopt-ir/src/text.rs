//! The IR text format (placeholder while the printer is written).
use crate::{Model, TypeInfo};
/// Prints a type.
pub fn type_string(t: &TypeInfo) -> String {
    format!("{t:?}")
}
/// Prints a model.
pub fn print_model(m: &Model) -> String {
    format!("{}", m.graph.name)
}
