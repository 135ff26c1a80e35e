//! The IR text format: readable, stable and diff-friendly, so that pass fixtures can be written by hand and
//! snapshots show what a pass changed.
//!
//! ```text
//! ir_version 8
//! opset ai.onnx 17
//!
//! graph @tiny(%x: f32[N,16]) -> (%y: f32[N,4]) {
//!   %w = const f32[16,4] <256 bytes>
//!   %b = const f32[4] [0.0, 0.5, 1.0, 1.5]
//!   %h = MatMul(%x, %w) : f32[N,4] @mm0
//!   %y = Add(%h, %b) : f32[N,4]
//! }
//! ```
//!
//! - ONNX value names are kept (`%name`, or `%"quoted name"` when it has other characters); nothing is renumbered.
//! - One node per line in schedule order: `outputs = [domain::]Op(inputs) {attributes} : output types @node_name`.
//!   An omitted optional input or output is `_`; attributes are sorted by name; floats print in shortest
//!   round-trip form; a type is `f32[N,?,16]` (`?` unknown dim, `[...]` unknown rank, `?` unknown type).
//! - Initializers are `const` lines first; tensors of at most 16 elements show their values, larger ones
//!   `<N bytes>` (parsed back as elided data, which cannot be exported or evaluated).
//! - A subgraph is an attribute value `graph @name(...) -> (...) captures (...) { ... }`; `captures` lists the
//!   outer values it reads.
//! - `; ...` to the end of a line is a comment: the printer uses it for analysis facts (`; prec f16: allow`
//!   once `assign-precision` has decided), the parser drops it.
//!
//! `print(parse(s)) == s` for every printed text.

mod parse;
mod print;

pub use parse::{ParseError, parse_attr_value, parse_graph, parse_model};
pub use print::{
    Annotate, INLINE_ELEMENTS, float_str, print_graph, print_model, print_model_with, quote,
    tensor_string, type_string, value_ref,
};
