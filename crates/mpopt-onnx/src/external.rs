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
use prost::Message;

use crate::stream::{StreamBuf, stream_to};
use crate::{EXTERNAL_THRESHOLD, ExternalData, OnnxError, PROTOBUF_LIMIT, SaveSummary, export};

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

/// Writes through `write` into a temporary file beside `target`; the caller renames it into place.
fn write_tmp(
    target: &Path,
    write: impl FnOnce(&mut StreamBuf),
) -> Result<(PathBuf, u64), OnnxError> {
    let tmp = tmp_path(target);
    let result = (|| {
        let f = File::create(&tmp)?;
        let (_, n) = stream_to(f, write)?;
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

    let mut writer = None;
    let mut proto = match mode {
        ExternalData::Auto => export::model(model, None).map_err(unwritable)?,
        ExternalData::Always => {
            let mut w = Writer::new(location.clone());
            let p = export::model(model, Some(&mut w)).map_err(unwritable)?;
            writer = Some(w);
            p
        }
    };
    if writer.is_none() && proto.encoded_len() as u64 > PROTOBUF_LIMIT {
        let mut w = Writer::new(location.clone());
        proto = export::model(model, Some(&mut w)).map_err(unwritable)?;
        writer = Some(w);
    }

    let mut external = None;
    if let Some(w) = writer {
        let (tmp, n) = write_tmp(&data_path, |sb| {
            let mut at = 0u64;
            for (offset, bytes) in &w.chunks {
                bytes::BufMut::put_bytes(sb, 0, (offset - at) as usize);
                bytes::BufMut::put_slice(sb, bytes);
                at = offset + bytes.len() as u64;
            }
        })?;
        put_in_place(&tmp, &data_path)?;
        external = Some((data_path, n));
    }
    let (tmp, model_bytes) = write_tmp(path, |sb| {
        // encode() only fails when the buffer is too small, and StreamBuf is unbounded.
        proto.encode(sb).expect("StreamBuf has unbounded capacity");
    })?;
    put_in_place(&tmp, path)?;
    Ok(SaveSummary {
        model_bytes,
        external,
    })
}
