//! External tensor data: reading it on load (memory-mapped, one map per file, zero-copy slices) and writing it
//! on save (one data file beside the model, offsets aligned), plus the atomic save itself.
//!
//! A `location` must be a relative path that stays inside the model's folder: absolute paths and any `..`
//! component are refused, so a model cannot make mpopt read arbitrary files.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Component, Path, PathBuf};

use bytes::Bytes;
use mpopt_ir::{ExternalOrigin, Graph, Model};

use crate::export::Sink;
use crate::stream::{Deferred, StreamBuf, stream_to};
use crate::{
    EXTERNAL_THRESHOLD, ExternalData, OnnxError, PROTOBUF_LIMIT, SaveSummary, export, wire,
};

pub(crate) struct Reader {
    base: Option<PathBuf>,
    files: HashMap<PathBuf, Bytes>,
}

impl Reader {
    pub(crate) fn new(base: Option<&Path>) -> Reader {
        Reader {
            base: base.map(Path::to_path_buf),
            files: HashMap::new(),
        }
    }

    pub(crate) fn read(
        &mut self,
        kv: &[(String, String)],
    ) -> Result<(Bytes, ExternalOrigin), String> {
        let get = |k: &str| kv.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
        let ctx = |e: String| format!("external data {e}");
        let location = get("location").ok_or_else(|| ctx("has no 'location'".into()))?;
        let num = |k: &str| -> Result<Option<u64>, String> {
            get(k)
                .map(|v| {
                    v.trim()
                        .parse::<u64>()
                        .map_err(|_| ctx(format!("'{k}' is not a number: '{v}'")))
                })
                .transpose()
        };
        let offset = num("offset")?.unwrap_or(0);
        let length = num("length")?;
        let rel = Path::new(location);
        let escapes = rel
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir));
        if rel.as_os_str().is_empty() || escapes {
            return Err(ctx(format!(
                "location '{location}' must be a relative path inside the model's folder"
            )));
        }
        let base = self
            .base
            .as_ref()
            .ok_or_else(|| ctx("cannot be read: the model was not loaded from a file".into()))?;
        let file = base.join(rel);
        let data = match self.files.get(&file) {
            Some(d) => d.clone(),
            None => {
                let f = File::open(&file)
                    .map_err(|e| ctx(format!("file '{}': {e}", file.display())))?;
                let len = f
                    .metadata()
                    .map_err(|e| ctx(format!("file '{}': {e}", file.display())))?
                    .len();
                let d = if len == 0 {
                    Bytes::new()
                } else {
                    // SAFETY: read-only map of a file mpopt never writes (see `crate::load`).
                    let m = unsafe { memmap2::Mmap::map(&f) }
                        .map_err(|e| ctx(format!("file '{}': {e}", file.display())))?;
                    Bytes::from_owner(m)
                };
                self.files.insert(file.clone(), d.clone());
                d
            }
        };
        let have = data.len() as u64;
        let end = match length {
            Some(l) => offset.checked_add(l),
            None => Some(have),
        };
        match end {
            Some(end) if offset <= end && end <= have => {
                let origin = ExternalOrigin {
                    location: location.to_string(),
                    offset,
                    length: end - offset,
                    file: file.clone(),
                };
                Ok((data.slice(offset as usize..end as usize), origin))
            }
            _ => Err(ctx(format!(
                "file '{}' is too short: needs bytes {offset}..{}, has {have}",
                file.display(),
                end.map_or("overflow".to_string(), |e| e.to_string())
            ))),
        }
    }
}

/// Collects the tensors placed in the external data file while the model is exported.
pub(crate) struct Writer {
    pub(crate) threshold: usize,
    location: String,
    len: u64,
    chunks: Vec<(u64, Bytes)>,
}

/// Offsets of tensors of at least 64 KiB are aligned to 4 KiB pages (so runtimes can map them directly), the
/// rest to 64 bytes.
fn alignment(len: usize) -> u64 {
    if len >= 64 << 10 { 4096 } else { 64 }
}

impl Writer {
    fn new(location: String) -> Writer {
        Writer {
            threshold: EXTERNAL_THRESHOLD,
            location,
            len: 0,
            chunks: Vec::new(),
        }
    }

    pub(crate) fn place(&mut self, raw: Bytes) -> Vec<(String, String)> {
        let offset = self.len.next_multiple_of(alignment(raw.len()));
        let length = raw.len() as u64;
        self.len = offset + length;
        self.chunks.push((offset, raw));
        vec![
            ("location".into(), self.location.clone()),
            ("offset".into(), offset.to_string()),
            ("length".into(), length.to_string()),
        ]
    }
}

fn tmp_path(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    target.with_file_name(format!(".{name}.mpopt-tmp-{}", std::process::id()))
}

/// Writes through `write` into a temporary file beside `target` (converting the placeholders of `deferred`;
/// `expected` bytes, about); the caller renames it into place.
fn write_tmp(
    target: &Path,
    deferred: &Deferred,
    expected: u64,
    write: impl FnOnce(&mut StreamBuf<'_>),
) -> Result<(PathBuf, u64), OnnxError> {
    let tmp = tmp_path(target);
    let result = (|| {
        let f = File::create(&tmp)?;
        let (_, n) = stream_to(f, Some(deferred), expected, write)?;
        Ok(n)
    })();
    match result {
        Ok(n) => Ok((tmp, n)),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(OnnxError::io(target, e))
        }
    }
}

/// Moves the finished temporary file `tmp` to `target`, replacing any file there; on failure `tmp` is removed.
///
/// An existing regular file is unlinked first and the rename then creates the name. Renaming over an existing
/// file makes ext4 (`auto_da_alloc`, on by default) start writing the new file back to disk inside the
/// rename: 6 ms of a 10 MB save (ddddocr_det_yolox converted to `/tmp`), 60% of the save. At no time
/// does `target` name a partial file: it names the old file, then nothing, then the complete new one.
fn put_in_place(tmp: &Path, target: &Path) -> Result<(), OnnxError> {
    if std::fs::symlink_metadata(target).is_ok_and(|m| m.is_file()) {
        // if this fails, the rename below reports why (it needs the same permission on the folder)
        let _ = std::fs::remove_file(target);
    }
    std::fs::rename(tmp, target).map_err(|e| {
        let _ = std::fs::remove_file(tmp);
        OnnxError::io(target, e)
    })
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

fn external_files(g: &Graph, out: &mut Vec<PathBuf>) {
    for &v in g.initializers() {
        if let Some(o) = g
            .value(v)
            .initializer
            .as_ref()
            .and_then(|t| t.external.as_ref())
            && !out.contains(&o.file)
        {
            out.push(o.file.clone());
        }
    }
    for (_, n) in g.nodes() {
        for (_, sg) in n.subgraphs() {
            external_files(sg, out);
        }
    }
}

pub(crate) fn save(
    model: &Model,
    path: &Path,
    mode: ExternalData,
) -> Result<SaveSummary, OnnxError> {
    let unwritable = |msg: String| OnnxError::Unwritable {
        path: path.to_path_buf(),
        msg,
    };
    if path.is_dir() {
        return Err(unwritable("is a directory".into()));
    }
    let file_name = path
        .file_name()
        .ok_or_else(|| unwritable("has no file name".into()))?
        .to_string_lossy()
        .into_owned();
    let location = format!("{file_name}.data");
    let data_path = path.with_file_name(&location);

    let mut sources = Vec::new();
    external_files(&model.graph, &mut sources);
    for src in &sources {
        if same_file(src, path) || same_file(src, &data_path) {
            return Err(unwritable(format!(
                "would overwrite '{}', which the model reads its data from",
                src.display()
            )));
        }
    }

    // narrowed tensors are converted as they are written (placeholders until then)
    let mut deferred = Deferred::default();
    let mut build = |external: Option<&mut Writer>| {
        let sink = Sink {
            external,
            deferred: Some(&mut deferred),
        };
        export::model(model, sink).map_err(unwritable)
    };
    let mut writer = (mode == ExternalData::Always).then(|| Writer::new(location.clone()));
    let mut proto = build(writer.as_mut())?;
    let mut measured = wire::measure(&proto);
    if writer.is_none() && measured.len as u64 > PROTOBUF_LIMIT {
        proto = build(Some(writer.insert(Writer::new(location.clone()))))?;
        measured = wire::measure(&proto);
    }

    let mut external = None;
    if let Some(w) = writer {
        let data_len = w
            .chunks
            .last()
            .map_or(0, |(offset, bytes)| offset + bytes.len() as u64);
        let (tmp, n) = write_tmp(&data_path, &deferred, data_len, |sb| {
            let mut at = 0u64;
            for (offset, bytes) in &w.chunks {
                bytes::BufMut::put_bytes(sb, 0, (offset - at) as usize);
                // `put`, not `put_slice`: a narrowed tensor's placeholder is converted there
                bytes::BufMut::put(sb, bytes.clone());
                at = offset + bytes.len() as u64;
            }
        })?;
        put_in_place(&tmp, &data_path)?;
        external = Some((data_path, n));
    }
    let (tmp, model_bytes) = write_tmp(path, &deferred, measured.len as u64, |sb| {
        wire::write(&proto, &measured, sb);
    })?;
    put_in_place(&tmp, path)?;
    Ok(SaveSummary {
        model_bytes,
        external,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mpopt_ir::{AttrValue, DType, Narrowed, Tensor, TensorData};

    fn f32_bytes(xs: &[f32]) -> Bytes {
        Bytes::from(xs.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())
    }

    /// A narrowed initializer (longer than a stream buffer, so it straddles buffers, at odd offsets) and a
    /// narrowed Constant value, saved inline and with external data: the files hold the converted values
    /// (what `materialized` gives), the save converts without keeping a copy, and the model loads back.
    #[test]
    fn narrowed_tensors_are_converted_as_they_are_written() {
        let text = "ir_version 8\nopset ai.onnx 17\n\ngraph @g(%x: f16[300001]) -> (%y: f16[300001], %z: bf16[5]) {\n  %w = const f32[300001] <1200004 bytes>\n  %y = Add(%x, %w)\n  %z = Constant() {value = tensor f32[5] [1.0, 2.0, 3.0, 4.0, 5.0]}\n}\n";
        let mut model = mpopt_ir::text::parse_model(text).unwrap();
        let xs: Vec<f32> = (0..300_001)
            .map(|i| match i % 7 {
                0 => 7e4,
                1 => -1e-9,
                _ => (i as f32).sin() * 3.0,
            })
            .collect();
        let w = Narrowed::new(f32_bytes(&xs), DType::F16).unwrap();
        let cs = [1.0, 2.5, f32::MAX, -0.1, 3e38];
        let c = Narrowed::new(f32_bytes(&cs), DType::BF16).unwrap();
        // the expected bytes, converted apart (the tensors in the model must stay unconverted)
        let want_w = Narrowed::new(f32_bytes(&xs), DType::F16).unwrap();
        let want_c = Narrowed::new(f32_bytes(&cs), DType::BF16).unwrap();
        let g = &mut model.graph;
        let wv = g.value_by_name("w").unwrap();
        let mut t = Tensor::from_raw(DType::F16, vec![300_001], Bytes::new());
        t.name = "w".into();
        t.data = TensorData::Narrowed(w.clone());
        g.value_mut(wv).initializer = Some(Box::new(t));
        let cid = g
            .nodes()
            .find(|(_, n)| n.op_type == "Constant")
            .map(|(id, _)| id)
            .unwrap();
        let mut ct = Tensor::from_raw(DType::BF16, vec![5], Bytes::new());
        ct.data = TensorData::Narrowed(c.clone());
        g.node_mut(cid).attributes[0].value = AttrValue::Tensor(Box::new(ct));

        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        for mode in [ExternalData::Auto, ExternalData::Always] {
            let path = dir.join("m.onnx");
            save(&model, &path, mode).unwrap();
            assert!(
                !w.is_materialized() && !c.is_materialized(),
                "the save converts into the file without keeping the bytes"
            );
            let back = crate::load(&path).unwrap();
            let bw = back.graph.value_by_name("w").unwrap();
            let got = back.graph.value(bw).initializer.as_ref().unwrap();
            assert_eq!(got.dtype, DType::F16);
            let want = want_w.materialized();
            assert_eq!(got.data.view(), want, "{mode:?}");
            // 7e4 is clamped to 65504, not infinity
            let TensorData::Raw(b) = got.data.view() else {
                panic!("raw data")
            };
            assert_eq!(half::f16::from_le_bytes([b[0], b[1]]), half::f16::MAX);
            let (_, cn) = back
                .graph
                .nodes()
                .find(|(_, n)| n.op_type == "Constant")
                .unwrap();
            let AttrValue::Tensor(bt) = &cn.attributes[0].value else {
                panic!("a tensor attribute")
            };
            assert_eq!(bt.data.view(), want_c.materialized(), "{mode:?}");
            // f32::MAX rounds past bf16's largest finite value: clamped to it
            let bf = |x: f32| half::bf16::from_f32(x).to_f64();
            assert_eq!(
                bt.values_f64(5).unwrap(),
                vec![1.0, 2.5, half::bf16::MAX.to_f64(), bf(-0.1), bf(3e38)]
            );
            // the same file as the materialized model's
            let mut plain = model.clone();
            let pv = plain.graph.value_by_name("w").unwrap();
            plain.graph.value_mut(pv).initializer.as_mut().unwrap().data = want.clone();
            // (in a folder of its own: the model file names its data file)
            std::fs::create_dir_all(dir.join("plain")).unwrap();
            let p2 = dir.join("plain").join("m.onnx");
            save(&plain, &p2, mode).unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), std::fs::read(&p2).unwrap());
            if mode == ExternalData::Always {
                assert_eq!(
                    std::fs::read(dir.join("m.onnx.data")).unwrap(),
                    std::fs::read(dir.join("plain").join("m.onnx.data")).unwrap()
                );
            }
        }
        // `encode` (no streaming) converts, and keeps the bytes
        let enc = crate::decode(Bytes::from(crate::encode(&model).unwrap())).unwrap();
        let ev = enc.graph.value_by_name("w").unwrap();
        let got = enc.graph.value(ev).initializer.as_ref().unwrap();
        assert_eq!(got.data.view(), want_w.materialized());
        assert!(w.is_materialized());
    }
}
