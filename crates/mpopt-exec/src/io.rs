//! Tensor files: NumPy `.npy` and `.npz` (read with `npyz`, archives with `zip`). ONNX `TensorProto` `.pb`
//! files are read by `mpopt-onnx`, which owns the protobuf types.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use half::f16;
use npyz::WriterBuilder;

use crate::{Data, Tensor};

/// A tensor file that cannot be read or written.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {msg}")]
pub struct IoError {
    /// The file.
    pub path: PathBuf,
    /// What went wrong (with the array name where one is at fault).
    pub msg: String,
}

fn err(path: &Path, msg: impl Into<String>) -> IoError {
    IoError {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Reads one `.npy` image.
pub fn read_npy(bytes: &[u8]) -> Result<Tensor, String> {
    let npy = npyz::NpyFile::new(bytes).map_err(|e| format!("not a valid .npy array: {e}"))?;
    if npy.order() == npyz::Order::Fortran && npy.shape().len() > 1 {
        return Err(
            "Fortran-ordered arrays are not supported; save with np.ascontiguousarray".into(),
        );
    }
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let descr = match npy.dtype() {
        npyz::DType::Plain(ts) => ts.to_string(),
        other => return Err(format!("unsupported array dtype {}", other.descr())),
    };
    let e = |e: std::io::Error| format!("cannot read the array data: {e}");
    let data = match descr.as_str() {
        "<f4" => Data::F32(npy.into_vec().map_err(e)?),
        "<f8" => Data::F64(npy.into_vec().map_err(e)?),
        "<f2" => Data::F16(npy.into_vec::<f16>().map_err(e)?),
        "|i1" | "<i1" => Data::I8(npy.into_vec().map_err(e)?),
        "<i2" => Data::I16(npy.into_vec().map_err(e)?),
        "<i4" => Data::I32(npy.into_vec().map_err(e)?),
        "<i8" => Data::I64(npy.into_vec().map_err(e)?),
        "|u1" | "<u1" => Data::U8(npy.into_vec().map_err(e)?),
        "<u2" => Data::U16(npy.into_vec().map_err(e)?),
        "<u4" => Data::U32(npy.into_vec().map_err(e)?),
        "<u8" => Data::U64(npy.into_vec().map_err(e)?),
        "|b1" => Data::Bool(npy.into_vec::<bool>().map_err(e)?),
        // NumPy's fixed-width unicode strings (`np.asarray(x, dtype=str)`); object arrays are pickles
        d if d.get(1..2) == Some("U") => Data::Str(npy.into_vec::<String>().map_err(e)?),
        "|O" => {
            return Err(
                "object arrays (pickled) are not read: save strings as a unicode array, np.asarray(x, dtype=str)"
                    .into(),
            );
        }
        other => return Err(format!("unsupported array dtype '{other}'")),
    };
    if data.len() != crate::numel(&shape) {
        return Err(format!(
            "array has {} elements for shape {shape:?}",
            data.len()
        ));
    }
    Ok(Tensor::new(shape, data))
}

/// Encodes one tensor as a `.npy` image (strings as a fixed-width unicode array; bf16 and the sub-byte types
/// have no NumPy type and are refused).
pub fn write_npy(t: &Tensor) -> Result<Vec<u8>, String> {
    let shape: Vec<u64> = t.shape.iter().map(|&d| d as u64).collect();
    let mut buf = Vec::new();
    macro_rules! put {
        ($v:expr, $ty:ty) => {{
            let mut w = npyz::WriteOptions::<$ty>::new()
                .default_dtype()
                .shape(&shape)
                .writer(&mut buf)
                .begin_nd()
                .map_err(|e| e.to_string())?;
            w.extend($v.iter().copied()).map_err(|e| e.to_string())?;
            w.finish().map_err(|e| e.to_string())?;
        }};
    }
    match &t.data {
        Data::F32(v) => put!(v, f32),
        Data::F64(v) => put!(v, f64),
        Data::F16(v) => put!(v, f16),
        Data::I8(v) => put!(v, i8),
        Data::I16(v) => put!(v, i16),
        Data::I32(v) => put!(v, i32),
        Data::I64(v) => put!(v, i64),
        Data::U8(v) => put!(v, u8),
        Data::U16(v) => put!(v, u16),
        Data::U32(v) => put!(v, u32),
        Data::U64(v) => put!(v, u64),
        Data::Bool(v) => put!(v, bool),
        Data::Str(v) => {
            // a fixed-width unicode array as wide as the longest string, in characters
            let width = v
                .iter()
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
                .max(1);
            let ts: npyz::TypeStr = format!("<U{width}").parse().map_err(|e| format!("{e}"))?;
            let dtype = npyz::DType::new_scalar(ts);
            let mut w = npyz::WriteOptions::<str>::new()
                .dtype(dtype)
                .shape(&shape)
                .writer(&mut buf)
                .begin_nd()
                .map_err(|e| e.to_string())?;
            for s in v {
                w.push(s.as_str()).map_err(|e| e.to_string())?;
            }
            w.finish().map_err(|e| e.to_string())?;
        }
        Data::BF16(_) | Data::Small(..) => {
            return Err(format!("{} tensors have no NumPy type", t.dtype()));
        }
    }
    Ok(buf)
}

/// Reads every array of an `.npz` archive, in archive order.
pub fn read_npz(path: &Path) -> Result<Vec<(String, Tensor)>, IoError> {
    let file = std::fs::File::open(path).map_err(|e| err(path, format!("cannot open: {e}")))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| err(path, format!("not a valid .npz (zip) archive: {e}")))?;
    let mut out = Vec::new();
    for i in 0..zip.len() {
        let mut f = zip
            .by_index(i)
            .map_err(|e| err(path, format!("entry {i}: {e}")))?;
        let name = f
            .name()
            .map_err(|e| err(path, format!("entry {i}: {e}")))?
            .to_string();
        let Some(array) = name.strip_suffix(".npy") else {
            continue;
        };
        let mut bytes = Vec::with_capacity(f.size() as usize);
        f.read_to_end(&mut bytes)
            .map_err(|e| err(path, format!("array '{array}': {e}")))?;
        let t = read_npy(&bytes).map_err(|m| err(path, format!("array '{array}': {m}")))?;
        out.push((array.to_string(), t));
    }
    Ok(out)
}

/// Writes tensors to an `.npz` archive atomically (a temporary file beside it, then a rename).
pub fn write_npz(path: &Path, items: &[(String, &Tensor)]) -> Result<(), IoError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().and_then(|s| s.to_str()).unwrap_or("out"),
        std::process::id()
    ));
    let result = (|| -> Result<(), IoError> {
        let file =
            std::fs::File::create(&tmp).map_err(|e| err(path, format!("cannot create: {e}")))?;
        let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(file));
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .large_file(true);
        for (name, t) in items {
            let bytes = write_npy(t).map_err(|m| err(path, format!("array '{name}': {m}")))?;
            zip.start_file(format!("{name}.npy"), opts)
                .map_err(|e| err(path, e.to_string()))?;
            zip.write_all(&bytes)
                .map_err(|e| err(path, e.to_string()))?;
        }
        let w = zip.finish().map_err(|e| err(path, e.to_string()))?;
        w.into_inner()
            .map_err(|e| err(path, e.to_string()))?
            .sync_all()
            .map_err(|e| err(path, e.to_string()))?;
        std::fs::rename(&tmp, path).map_err(|e| err(path, format!("cannot write: {e}")))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npz_round_trip_keeps_dtypes_shapes_and_bits() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.npz");
        let a = Tensor::f32(vec![2, 3], vec![1.0, -2.5, 3.0, f32::INFINITY, 0.0, 1e-8]);
        let b = Tensor::new(
            vec![3],
            Data::F16(vec![
                f16::from_f32(1.5),
                f16::MAX,
                f16::MIN_POSITIVE_SUBNORMAL,
            ]),
        );
        let c = Tensor::i64(vec![], vec![7]);
        let d = Tensor::bool(vec![2], vec![true, false]);
        // strings of different widths, non-ASCII and empty ones: a unicode array as wide as the longest
        let s = Tensor::new(
            vec![2, 2],
            Data::Str(vec![
                "a".into(),
                "".into(),
                "héllo wörld".into(),
                "日本".into(),
            ]),
        );
        write_npz(
            &p,
            &[
                ("a".into(), &a),
                ("b/c".into(), &b),
                ("c".into(), &c),
                ("d".into(), &d),
                ("s".into(), &s),
            ],
        )
        .unwrap();
        let back = read_npz(&p).unwrap();
        let names: Vec<&str> = back.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a", "b/c", "c", "d", "s"]);
        assert_eq!(back[0].1, a);
        assert_eq!(back[1].1, b);
        assert_eq!(back[2].1, c);
        assert_eq!(back[3].1, d);
        assert_eq!(back[4].1, s);
    }

    #[test]
    fn bad_archive_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.npz");
        std::fs::write(&p, b"not a zip").unwrap();
        let e = read_npz(&p).unwrap_err().to_string();
        assert!(
            e.contains("bad.npz") && e.contains("not a valid .npz"),
            "{e}"
        );
    }
}
