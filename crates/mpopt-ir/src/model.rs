//! The model: metadata, opset imports, the main graph and local functions.

use bytes::Bytes;

use crate::{Attribute, Graph};

/// An opset import: (domain, version). The default domain is `""`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpsetImport {
    /// Domain (`""` is ai.onnx).
    pub domain: String,
    /// Opset version.
    pub version: i64,
}

/// Something the IR keeps verbatim without interpreting it: the encoded bytes of an ONNX message
/// (training info, device configurations). It is written back unchanged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opaque(pub Bytes);

/// A model-local function (`FunctionProto`). Its body is a [`Graph`] whose inputs are untyped.
#[derive(Clone, Debug)]
pub struct Function {
    /// Function (op type) name.
    pub name: String,
    /// Function domain.
    pub domain: String,
    /// Overload id.
    pub overload: String,
    /// Attribute names without defaults.
    pub attributes: Vec<String>,
    /// Attributes with default values.
    pub attribute_defaults: Vec<Attribute>,
    /// The body; `body.inputs()`/`outputs()` are the function's formal parameters.
    pub body: Graph,
    /// Opsets the body uses.
    pub opset_imports: Vec<OpsetImport>,
    /// ONNX doc string.
    pub doc_string: String,
    /// ONNX metadata properties.
    pub metadata_props: Vec<(String, String)>,
}

/// A whole ONNX model.
#[derive(Clone, Debug)]
pub struct Model {
    /// ONNX IR version of the file.
    pub ir_version: i64,
    /// Opset imports.
    pub opset_imports: Vec<OpsetImport>,
    /// Producer name.
    pub producer_name: String,
    /// Producer version.
    pub producer_version: String,
    /// Model domain.
    pub domain: String,
    /// Model version.
    pub model_version: i64,
    /// ONNX doc string.
    pub doc_string: String,
    /// Metadata properties, in order.
    pub metadata_props: Vec<(String, String)>,
    /// The main graph.
    pub graph: Graph,
    /// Model-local functions.
    pub functions: Vec<Function>,
    /// Training info, kept verbatim.
    pub training_info: Vec<Opaque>,
    /// Device configurations, kept verbatim.
    pub configuration: Vec<Opaque>,
}

impl Model {
    /// A model around a graph with the given default-domain opset.
    pub fn new(graph: Graph, opset: i64) -> Model {
        Model {
            ir_version: 10,
            opset_imports: vec![OpsetImport {
                domain: String::new(),
                version: opset,
            }],
            producer_name: "mpopt".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            domain: String::new(),
            model_version: 0,
            doc_string: String::new(),
            metadata_props: Vec::new(),
            graph,
            functions: Vec::new(),
            training_info: Vec::new(),
            configuration: Vec::new(),
        }
    }

    /// The imported version of `domain` (`""` or `"ai.onnx"` for the default domain).
    pub fn opset(&self, domain: &str) -> Option<i64> {
        self.opsets().version(domain)
    }

    /// The opset imports, looked up by domain.
    pub fn opsets(&self) -> Opsets {
        Opsets::new(&self.opset_imports)
    }
}

/// Opset versions by domain, with `"ai.onnx"` and `""` the same domain.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Opsets(Vec<(String, i64)>);

/// The default domain's canonical name (`""`).
pub fn canonical_domain(d: &str) -> &str {
    if d == "ai.onnx" { "" } else { d }
}

impl Opsets {
    /// From a model's or function's imports.
    pub fn new(imports: &[OpsetImport]) -> Opsets {
        Opsets(
            imports
                .iter()
                .map(|o| (canonical_domain(&o.domain).to_string(), o.version))
                .collect(),
        )
    }

    /// The imported version of `domain`.
    pub fn version(&self, domain: &str) -> Option<i64> {
        let d = canonical_domain(domain);
        self.0.iter().find(|(x, _)| x == d).map(|(_, v)| *v)
    }

    /// Adds the imports of `other` for domains not imported here (a function's opsets over its model's).
    pub fn or(mut self, other: &Opsets) -> Opsets {
        for (d, v) in &other.0 {
            if !self.0.iter().any(|(x, _)| x == d) {
                self.0.push((d.clone(), *v));
            }
        }
        self
    }
}
