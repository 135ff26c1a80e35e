//! Protobuf encoding of a `ModelProto` that measures each nested message once.
//!
//! prost writes a nested message as its length and then its fields, and measures it for that length by
//! walking all of it; the fields' own nested messages are measured again when they are written, and so on
//! down. A message `d` levels deep is measured `d` times, and a model with control flow nests deep: a node
//! in an `If` branch sits in model, graph, node, attribute, graph. Converting silero_vad_v6 (684 of its
//! 689 nodes are in the branches of `If`s) took 29.6M instructions with prost's encoding and 27.0M with
//! this one (callgrind), for the same bytes.
//!
//! Here the save measures the messages that hold graphs (model, graph, node, attribute, function, training
//! info) once, bottom-up, keeping each one's length in a list in the order they are met; the write walks
//! the same order and takes each length from the list. The other messages (tensors, value infos, types,
//! ...) nest a few levels at most and are written by prost, which measures each once more. The bytes are
//! prost's own: fields in tag order, optional fields written when set, repeated scalars unpacked as
//! onnx.proto declares them (the tests compare with `prost::Message::encode_to_vec`).
//!
//! One walk serves both passes ([`Emit`]): the measuring pass and the writing pass cannot disagree on
//! the order of the messages.
//!
//! Example: a model whose graph holds one node with one attribute is measured into `[graph, node,
//! attribute]` lengths, e.g. `[31, 20, 9]`, and written as `key(7) 31 key(1) 20 ... key(5) 9 ...`.

use bytes::{BufMut, Bytes};
use prost::Message;

use crate::pb;

/// Wire types (protobuf encoding spec).
const VARINT: u32 = 0;
const LEN: u32 = 2;
const FIXED32: u32 = 5;

// Varints are written here: prost's public varint functions are for lengths (`usize`, and the writer
// fails on a bounded buffer), and its `encode_varint` is hidden API. The tests compare the lengths with
// prost's and every encoded model with prost's bytes.

/// Bytes of `v` as a base-128 varint.
fn varint_len(v: u64) -> usize {
    // 1 byte per started 7 bits; `| 1` makes zero one byte
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

fn put_varint(buf: &mut impl BufMut, mut v: u64) {
    while v >= 0x80 {
        buf.put_u8(v as u8 | 0x80);
        v >>= 7;
    }
    buf.put_u8(v as u8);
}

fn key_len(tag: u32) -> usize {
    varint_len(u64::from(tag << 3))
}

/// What a message's fields become: bytes counted ([`Measure`]) or written ([`Write`]).
trait Emit {
    /// An `int64` or `int32`/enum field (negative values sign-extended to ten bytes, as protobuf does).
    fn int(&mut self, tag: u32, v: i64);
    fn float(&mut self, tag: u32, v: f32);
    fn string(&mut self, tag: u32, s: &str);
    fn bytes(&mut self, tag: u32, b: &Bytes);
    /// A message written by prost.
    fn leaf<M: Message>(&mut self, tag: u32, m: &M);
    /// A message whose fields `body` emits; measured once.
    fn nested(&mut self, tag: u32, body: impl FnOnce(&mut Self));
}

/// Counts the bytes, and records each nested message's length in the order met.
struct Measure {
    len: usize,
    lens: Vec<usize>,
}

impl Emit for Measure {
    fn int(&mut self, tag: u32, v: i64) {
        self.len += key_len(tag) + varint_len(v as u64);
    }
    fn float(&mut self, tag: u32, _: f32) {
        self.len += key_len(tag) + 4;
    }
    fn string(&mut self, tag: u32, s: &str) {
        self.len += key_len(tag) + varint_len(s.len() as u64) + s.len();
    }
    fn bytes(&mut self, tag: u32, b: &Bytes) {
        self.len += key_len(tag) + varint_len(b.len() as u64) + b.len();
    }
    fn leaf<M: Message>(&mut self, tag: u32, m: &M) {
        let n = m.encoded_len();
        self.lens.push(n);
        self.len += key_len(tag) + varint_len(n as u64) + n;
    }
    fn nested(&mut self, tag: u32, body: impl FnOnce(&mut Self)) {
        let slot = self.lens.len();
        self.lens.push(0);
        let outer = std::mem::replace(&mut self.len, 0);
        body(self);
        let n = std::mem::replace(&mut self.len, outer);
        self.lens[slot] = n;
        self.len += key_len(tag) + varint_len(n as u64) + n;
    }
}

/// Writes the bytes, taking each nested message's length from [`Measure`]'s list.
struct Write<'a, B: BufMut> {
    buf: &'a mut B,
    lens: std::slice::Iter<'a, usize>,
    /// Bytes written, to check each nested message against its measured length (debug builds).
    written: usize,
}

impl<B: BufMut> Write<'_, B> {
    fn key(&mut self, tag: u32, wire: u32) {
        put_varint(self.buf, u64::from(tag << 3 | wire));
        self.written += key_len(tag);
    }
    fn len(&mut self, n: usize) {
        put_varint(self.buf, n as u64);
        self.written += varint_len(n as u64);
    }
    fn next_len(&mut self) -> usize {
        *self
            .lens
            .next()
            .expect("the writing pass meets no more messages than the measuring pass")
    }
}

impl<B: BufMut> Emit for Write<'_, B> {
    fn int(&mut self, tag: u32, v: i64) {
        self.key(tag, VARINT);
        put_varint(self.buf, v as u64);
        self.written += varint_len(v as u64);
    }
    fn float(&mut self, tag: u32, v: f32) {
        self.key(tag, FIXED32);
        self.buf.put_f32_le(v);
        self.written += 4;
    }
    fn string(&mut self, tag: u32, s: &str) {
        self.key(tag, LEN);
        self.len(s.len());
        self.buf.put_slice(s.as_bytes());
        self.written += s.len();
    }
    fn bytes(&mut self, tag: u32, b: &Bytes) {
        self.key(tag, LEN);
        self.len(b.len());
        // `put` as prost does: the streaming save converts a narrowed tensor's placeholder there
        self.buf.put(b.clone());
        self.written += b.len();
    }
    fn leaf<M: Message>(&mut self, tag: u32, m: &M) {
        let n = self.next_len();
        self.key(tag, LEN);
        // prost measures it again for the length it writes first
        m.encode_length_delimited(self.buf)
            .expect("the save's buffers and Vec<u8> are unbounded");
        self.written += varint_len(n as u64) + n;
    }
    fn nested(&mut self, tag: u32, body: impl FnOnce(&mut Self)) {
        let n = self.next_len();
        self.key(tag, LEN);
        self.len(n);
        let start = self.written;
        body(self);
        debug_assert_eq!(
            self.written - start,
            n,
            "message with tag {tag} measured and written differently"
        );
    }
}

/// A model's encoded length and the lengths its writing needs ([`write`]).
pub(crate) struct Measured {
    pub(crate) len: usize,
    lens: Vec<usize>,
}

/// Measures `m` (each nested message once).
pub(crate) fn measure(m: &pb::ModelProto) -> Measured {
    let mut e = Measure {
        len: 0,
        lens: Vec::new(),
    };
    model(&mut e, m);
    Measured {
        len: e.len,
        lens: e.lens,
    }
}

/// Writes `m`, which `measured` measured, into `buf` (`measured.len` bytes).
pub(crate) fn write(m: &pb::ModelProto, measured: &Measured, buf: &mut impl BufMut) {
    let mut e = Write {
        buf,
        lens: measured.lens.iter(),
        written: 0,
    };
    model(&mut e, m);
    debug_assert_eq!(e.written, measured.len);
    debug_assert!(e.lens.next().is_none());
}

/// `m` encoded into a new vector.
pub(crate) fn to_vec(m: &pb::ModelProto) -> Vec<u8> {
    let measured = measure(m);
    let mut v = Vec::with_capacity(measured.len);
    write(m, &measured, &mut v);
    v
}

// One function per message below; fields in tag order, as prost writes them. Each destructures its message
// completely, so a field added to onnx.proto is a compile error here until it is written.

fn opt_int<E: Emit>(e: &mut E, tag: u32, v: Option<i64>) {
    if let Some(v) = v {
        e.int(tag, v);
    }
}

fn opt_str<E: Emit>(e: &mut E, tag: u32, s: &Option<String>) {
    if let Some(s) = s {
        e.string(tag, s);
    }
}

fn strings<E: Emit>(e: &mut E, tag: u32, v: &[String]) {
    for s in v {
        e.string(tag, s);
    }
}

fn leaves<E: Emit, M: Message>(e: &mut E, tag: u32, v: &[M]) {
    for m in v {
        e.leaf(tag, m);
    }
}

fn model<E: Emit>(e: &mut E, m: &pb::ModelProto) {
    let pb::ModelProto {
        ir_version,
        opset_import,
        producer_name,
        producer_version,
        domain,
        model_version,
        doc_string,
        graph: g,
        metadata_props,
        training_info,
        functions,
        configuration,
    } = m;
    opt_int(e, 1, *ir_version);
    opt_str(e, 2, producer_name);
    opt_str(e, 3, producer_version);
    opt_str(e, 4, domain);
    opt_int(e, 5, *model_version);
    opt_str(e, 6, doc_string);
    if let Some(g) = g {
        e.nested(7, |e| graph(e, g));
    }
    leaves(e, 8, opset_import);
    leaves(e, 14, metadata_props);
    for t in training_info {
        e.nested(20, |e| training(e, t));
    }
    for f in functions {
        e.nested(25, |e| function(e, f));
    }
    leaves(e, 26, configuration);
}

fn graph<E: Emit>(e: &mut E, g: &pb::GraphProto) {
    let pb::GraphProto {
        node,
        name,
        initializer,
        sparse_initializer,
        doc_string,
        input,
        output,
        value_info,
        quantization_annotation,
        metadata_props,
    } = g;
    for n in node {
        e.nested(1, |e| self::node(e, n));
    }
    opt_str(e, 2, name);
    leaves(e, 5, initializer);
    opt_str(e, 10, doc_string);
    leaves(e, 11, input);
    leaves(e, 12, output);
    leaves(e, 13, value_info);
    leaves(e, 14, quantization_annotation);
    leaves(e, 15, sparse_initializer);
    leaves(e, 16, metadata_props);
}

fn node<E: Emit>(e: &mut E, n: &pb::NodeProto) {
    let pb::NodeProto {
        input,
        output,
        name,
        op_type,
        domain,
        overload,
        attribute: attrs,
        doc_string,
        metadata_props,
        device_configurations,
    } = n;
    strings(e, 1, input);
    strings(e, 2, output);
    opt_str(e, 3, name);
    opt_str(e, 4, op_type);
    for a in attrs {
        e.nested(5, |e| attribute(e, a));
    }
    opt_str(e, 6, doc_string);
    opt_str(e, 7, domain);
    opt_str(e, 8, overload);
    leaves(e, 9, metadata_props);
    leaves(e, 10, device_configurations);
}

fn attribute<E: Emit>(e: &mut E, a: &pb::AttributeProto) {
    let pb::AttributeProto {
        name,
        ref_attr_name,
        doc_string,
        r#type,
        f,
        i,
        s,
        t,
        g,
        sparse_tensor,
        tp,
        floats,
        ints,
        strings,
        tensors,
        graphs,
        sparse_tensors,
        type_protos,
    } = a;
    opt_str(e, 1, name);
    if let Some(f) = f {
        e.float(2, *f);
    }
    opt_int(e, 3, *i);
    if let Some(s) = s {
        e.bytes(4, s);
    }
    if let Some(t) = t {
        e.leaf(5, t.as_ref());
    }
    if let Some(g) = g {
        e.nested(6, |e| graph(e, g));
    }
    for f in floats {
        e.float(7, *f);
    }
    for i in ints {
        e.int(8, *i);
    }
    for s in strings {
        e.bytes(9, s);
    }
    leaves(e, 10, tensors);
    for g in graphs {
        e.nested(11, |e| graph(e, g));
    }
    opt_str(e, 13, doc_string);
    if let Some(tp) = tp {
        e.leaf(14, tp.as_ref());
    }
    leaves(e, 15, type_protos);
    opt_int(e, 20, r#type.map(i64::from));
    opt_str(e, 21, ref_attr_name);
    if let Some(st) = sparse_tensor {
        e.leaf(22, st.as_ref());
    }
    leaves(e, 23, sparse_tensors);
}

fn function<E: Emit>(e: &mut E, f: &pb::FunctionProto) {
    let pb::FunctionProto {
        name,
        input,
        output,
        attribute: attr_names,
        attribute_proto,
        node,
        doc_string,
        opset_import,
        domain,
        overload,
        value_info,
        metadata_props,
    } = f;
    opt_str(e, 1, name);
    strings(e, 4, input);
    strings(e, 5, output);
    strings(e, 6, attr_names);
    for n in node {
        e.nested(7, |e| self::node(e, n));
    }
    opt_str(e, 8, doc_string);
    leaves(e, 9, opset_import);
    opt_str(e, 10, domain);
    for a in attribute_proto {
        e.nested(11, |e| attribute(e, a));
    }
    leaves(e, 12, value_info);
    opt_str(e, 13, overload);
    leaves(e, 14, metadata_props);
}

fn training<E: Emit>(e: &mut E, t: &pb::TrainingInfoProto) {
    let pb::TrainingInfoProto {
        initialization,
        algorithm,
        initialization_binding,
        update_binding,
    } = t;
    if let Some(g) = initialization {
        e.nested(1, |e| graph(e, g));
    }
    if let Some(g) = algorithm {
        e.nested(2, |e| graph(e, g));
    }
    leaves(e, 3, initialization_binding);
    leaves(e, 4, update_binding);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    fn s(v: &str) -> Option<String> {
        Some(v.to_string())
    }

    fn tensor(name: &str) -> pb::TensorProto {
        pb::TensorProto {
            name: s(name),
            dims: vec![2, -1],
            data_type: Some(1),
            raw_data: Some(Bytes::from_static(&[0, 0, 128, 63, 0, 0, 0, 64])),
            ..Default::default()
        }
    }

    fn value_info(name: &str) -> pb::ValueInfoProto {
        pb::ValueInfoProto {
            name: s(name),
            doc_string: s(""),
            ..Default::default()
        }
    }

    fn entry(k: &str) -> pb::StringStringEntryProto {
        pb::StringStringEntryProto {
            key: s(k),
            value: s("v"),
        }
    }

    /// A graph with every field set; `depth` more levels of graphs in its node's attributes.
    fn graph(depth: usize) -> pb::GraphProto {
        pb::GraphProto {
            node: vec![node(depth), pb::NodeProto::default()],
            name: s("g"),
            initializer: vec![tensor("w"), tensor("")],
            sparse_initializer: vec![pb::SparseTensorProto {
                values: Some(tensor("sv")),
                indices: None,
                dims: vec![4],
            }],
            doc_string: s("graph doc"),
            input: vec![value_info("x")],
            output: vec![value_info("y"), value_info("z")],
            value_info: vec![value_info("t")],
            quantization_annotation: vec![pb::TensorAnnotation {
                tensor_name: s("w"),
                quant_parameter_tensor_names: vec![entry("scale")],
            }],
            metadata_props: vec![entry("m")],
        }
    }

    fn node(depth: usize) -> pb::NodeProto {
        pb::NodeProto {
            input: vec!["x".into(), String::new()],
            output: vec!["y".into()],
            name: s("n"),
            op_type: s("If"),
            domain: s(""),
            overload: s("o"),
            attribute: vec![attribute(depth), pb::AttributeProto::default()],
            doc_string: s("node doc"),
            metadata_props: vec![entry("k")],
            device_configurations: vec![pb::NodeDeviceConfigurationProto {
                configuration_id: s("c"),
                ..Default::default()
            }],
        }
    }

    fn attribute(depth: usize) -> pb::AttributeProto {
        let sub = |d: usize| (d > 0).then(|| graph(d - 1));
        pb::AttributeProto {
            name: s("then_branch"),
            ref_attr_name: s("r"),
            doc_string: s("attr doc"),
            r#type: Some(-3),
            f: Some(-1.5),
            i: Some(-7),
            s: Some(Bytes::from_static(b"bytes")),
            t: Some(Box::new(tensor("t"))),
            g: sub(depth).map(Box::new),
            sparse_tensor: Some(Box::new(pb::SparseTensorProto::default())),
            tp: Some(Box::new(pb::TypeProto::default())),
            floats: vec![0.0, f32::NAN, -0.0],
            ints: vec![0, i64::MIN, i64::MAX, 300],
            strings: vec![Bytes::new(), Bytes::from_static(b"x")],
            tensors: vec![tensor("a")],
            graphs: sub(depth).into_iter().collect(),
            sparse_tensors: vec![pb::SparseTensorProto::default()],
            type_protos: vec![pb::TypeProto::default()],
        }
    }

    fn full_model() -> pb::ModelProto {
        pb::ModelProto {
            ir_version: Some(10),
            opset_import: vec![pb::OperatorSetIdProto {
                domain: s(""),
                version: Some(21),
            }],
            producer_name: s("p"),
            producer_version: s(""),
            domain: s("d"),
            model_version: Some(-1),
            doc_string: s("doc"),
            graph: Some(graph(3)),
            metadata_props: vec![entry("a"), entry("b")],
            training_info: vec![pb::TrainingInfoProto {
                initialization: Some(graph(1)),
                algorithm: Some(graph(0)),
                initialization_binding: vec![entry("i")],
                update_binding: vec![entry("u")],
            }],
            functions: vec![pb::FunctionProto {
                name: s("f"),
                input: vec!["a".into()],
                output: vec!["b".into()],
                attribute: vec!["alpha".into()],
                attribute_proto: vec![attribute(1)],
                node: vec![node(2)],
                doc_string: s("fn doc"),
                opset_import: vec![pb::OperatorSetIdProto::default()],
                domain: s("local"),
                overload: s(""),
                value_info: vec![value_info("v")],
                metadata_props: vec![entry("f")],
            }],
            configuration: vec![pb::DeviceConfigurationProto {
                name: s("cfg"),
                num_devices: Some(2),
                device: vec!["a".into()],
            }],
        }
    }

    fn assert_as_prost(m: &pb::ModelProto, what: &str) {
        let ours = to_vec(m);
        let theirs = m.encode_to_vec();
        assert_eq!(ours.len(), measure(m).len, "{what}: measured length");
        if ours != theirs {
            let at = ours.iter().zip(&theirs).take_while(|(a, b)| a == b).count();
            panic!(
                "{what}: {} bytes against prost's {}, first difference at byte {at}",
                ours.len(),
                theirs.len()
            );
        }
    }

    #[test]
    fn every_field_of_every_nested_message_is_written_as_prost_writes_it() {
        assert_as_prost(&full_model(), "every field set");
        assert_as_prost(&pb::ModelProto::default(), "empty model");
        let only_graph = pb::ModelProto {
            graph: Some(pb::GraphProto::default()),
            ..Default::default()
        };
        assert_as_prost(&only_graph, "an empty graph");
    }

    #[test]
    fn a_field_missing_from_the_writer_would_show() {
        // the comparison above can fail: the same model with one string more differs from its old bytes
        let m = full_model();
        let before = to_vec(&m);
        let mut changed = m.clone();
        changed.graph.as_mut().unwrap().node[0].attribute[0].doc_string = s("attr doc!");
        assert_ne!(to_vec(&changed), before);
        assert_eq!(to_vec(&changed), changed.encode_to_vec());
    }

    #[test]
    fn varint_lengths_match_the_bytes_written() {
        for v in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            assert_eq!(b.len(), varint_len(v), "{v}");
            assert_eq!(b.len(), prost::length_delimiter_len(v as usize), "{v}");
        }
    }

    /// `*/model.onnx` in the corpus and in each folder of `MPOPT_SUITE_DIRS` (the node suite in CI).
    fn real_models() -> Vec<PathBuf> {
        let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/corpus");
        let extra = std::env::var("MPOPT_SUITE_DIRS").unwrap_or_default();
        let dirs = std::iter::once(corpus).chain(
            extra
                .split(':')
                .filter(|s| !s.is_empty())
                .map(PathBuf::from),
        );
        let mut out: Vec<PathBuf> = dirs
            .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
            .map(|e| e.path().join("model.onnx"))
            .filter(|p| p.is_file())
            .collect();
        out.sort();
        out
    }

    #[test]
    fn real_models_and_their_exports_are_written_as_prost_writes_them() {
        let models = real_models();
        let mut exported = 0;
        for p in &models {
            let bytes = Bytes::from(std::fs::read(p).unwrap());
            let proto = pb::ModelProto::decode(bytes.clone()).unwrap();
            assert_as_prost(&proto, &p.display().to_string());
            // what the save writes: the proto export builds from the IR
            if let Ok(m) = crate::load(p) {
                let built = crate::export::model(&m, crate::export::Sink::default()).unwrap();
                assert_as_prost(&built, &format!("{} exported", p.display()));
                exported += 1;
            }
        }
        eprintln!(
            "{} models compared with prost, {exported} of them exported too",
            models.len()
        );
    }
}
