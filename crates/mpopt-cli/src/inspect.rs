//! `mpopt inspect`: a summary of a model, stable enough to snapshot.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

use mpopt_ir::{DType, Graph, Model, text};

#[derive(Default)]
struct Stats {
    ops: BTreeMap<String, usize>,
    nodes: usize,
    subgraphs: usize,
    params: BTreeMap<DType, (u64, u64)>,
    external: BTreeMap<String, (usize, u64)>,
}

fn walk(g: &Graph, st: &mut Stats) {
    for &v in g.initializers() {
        let t = g.value(v).initializer.as_ref().expect("listed initializer");
        let e = st.params.entry(t.dtype).or_default();
        e.0 += t.numel().unwrap_or(0) as u64;
        e.1 += t.byte_size() as u64;
        if let Some(o) = &t.external {
            let x = st.external.entry(o.location.clone()).or_default();
            x.0 += 1;
            x.1 += o.length;
        }
    }
    for (_, n) in g.nodes() {
        st.nodes += 1;
        *st.ops.entry(n.qualified_op()).or_default() += 1;
        for (_, sg) in n.subgraphs() {
            st.subgraphs += 1;
            walk(sg, st);
        }
    }
}

fn value_line(g: &Graph, v: mpopt_ir::ValueId) -> String {
    let val = g.value(v);
    let ty = val.ty.as_ref().map_or("?".to_string(), text::type_string);
    format!("  {}: {ty}\n", val.name())
}

/// The report printed by `mpopt inspect`.
pub fn report(path: &Path, m: &Model) -> String {
    let mut st = Stats::default();
    walk(&m.graph, &mut st);
    let mut fn_nodes = 0;
    for f in &m.functions {
        fn_nodes += f.body.node_count();
    }
    let mut o = String::new();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let _ = writeln!(o, "model: {name}");
    let _ = writeln!(
        o,
        "ir_version: {}, producer: {}",
        m.ir_version,
        format!("{} {}", m.producer_name, m.producer_version).trim()
    );
    let opsets: Vec<String> = m
        .opset_imports
        .iter()
        .map(|o| {
            format!(
                "{} {}",
                if o.domain.is_empty() {
                    "ai.onnx"
                } else {
                    &o.domain
                },
                o.version
            )
        })
        .collect();
    let _ = writeln!(o, "opsets: {}", opsets.join(", "));
    let _ = writeln!(
        o,
        "graph '{}': {} nodes ({} top-level, {} in {} subgraphs), {} functions ({} nodes)",
        m.graph.name,
        st.nodes,
        m.graph.node_count(),
        st.nodes - m.graph.node_count(),
        st.subgraphs,
        m.functions.len(),
        fn_nodes
    );
    let _ = writeln!(o, "inputs:");
    for &v in m.graph.inputs() {
        if m.graph.value(v).initializer.is_none() {
            o.push_str(&value_line(&m.graph, v));
        }
    }
    let _ = writeln!(o, "outputs:");
    for &v in m.graph.outputs() {
        o.push_str(&value_line(&m.graph, v));
    }
    let _ = writeln!(o, "parameters (initializers, subgraphs included):");
    if st.params.is_empty() {
        let _ = writeln!(o, "  none");
    }
    for (dt, (n, b)) in &st.params {
        let _ = writeln!(o, "  {dt}: {n} elements, {b} bytes");
    }
    let _ = writeln!(o, "ops (subgraphs included):");
    let mut ops: Vec<_> = st.ops.iter().collect();
    ops.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    for (op, n) in ops {
        let _ = writeln!(o, "  {op}: {n}");
    }
    let mut typed = m.clone();
    let mut pass = mpopt_passes::infer_types::InferTypes::default();
    if mpopt_passes::Pass::run(&mut pass, &mut typed).is_ok() {
        let r = &pass.report;
        let _ = writeln!(
            o,
            "types: {} node outputs, {} typed, {} with a shape ({} fully static)",
            r.values, r.typed, r.shaped, r.fully_shaped
        );
        if !r.untyped.is_empty() {
            let _ = writeln!(o, "could not type {} value(s):", r.untyped.len());
            for u in r.untyped.iter().take(10) {
                let _ = writeln!(o, "  {u}");
            }
            if r.untyped.len() > 10 {
                let _ = writeln!(o, "  ...");
            }
        }
    }
    let _ = write!(o, "external data:");
    if st.external.is_empty() {
        let _ = writeln!(o, " none");
    } else {
        let _ = writeln!(o);
        for (loc, (n, b)) in &st.external {
            let _ = writeln!(
                o,
                "  {loc}: {n} tensor{}, {b} bytes",
                if *n == 1 { "" } else { "s" }
            );
        }
    }
    o
}
