//! Tensor constants: initializers, `Constant` values and tensor attributes.
//!
//! Data is kept in the storage form the model used, so that a round trip writes back the same values without
//! conversion: `raw_data` (and external data) stays a [`Bytes`] slice that borrows the memory-mapped model file
//! until a pass replaces it; the typed repeated fields of ONNX (`float_data`, `int32_data`, ...) stay typed.

use bytes::Bytes;

use crate::DType;

/// Where a tensor's bytes came from when they were stored outside the model file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalOrigin {
    /// The `location` key: a path relative to the model's folder.
    pub location: String,
    /// Byte offset in that file.
    pub offset: u64,
    /// Byte length.
    pub length: u64,
    /// The file it was read from, as opened (the model's folder joined with `location`).
    pub file: std::path::PathBuf,
}

/// Tensor contents.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    /// Fixed-width little-endian bytes, packed as ONNX `raw_data` (also what external data loads into).
    Raw(Bytes),
    /// ONNX `float_data` (f32, and c64 as pairs).
    Floats(Vec<f32>),
    /// ONNX `double_data` (f64, and c128 as pairs).
    Doubles(Vec<f64>),
    /// ONNX `int32_data`: i32 and every narrower type, one element (or one packed group) per entry.
    Int32s(Vec<i32>),
    /// ONNX `int64_data`.
    Int64s(Vec<i64>),
    /// ONNX `uint64_data` (u32 and u64).
    Uint64s(Vec<u64>),
    /// ONNX `string_data`.
    Strings(Vec<Bytes>),
    /// Data left out by the text format; such a tensor cannot be exported or evaluated.
    Elided,
}

/// A dense tensor constant.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    /// Element type.
    pub dtype: DType,
    /// Dimensions.
    pub dims: Vec<i64>,
    /// Contents.
    pub data: TensorData,
    /// The tensor's own name (for initializers, the value's name).
    pub name: String,
    /// ONNX doc string.
    pub doc_string: String,
    /// ONNX metadata properties.
    pub metadata_props: Vec<(String, String)>,
    /// Set when the data was read from an external file.
    pub external: Option<ExternalOrigin>,
}

impl Tensor {
    /// A tensor from little-endian raw bytes.
    pub fn from_raw(dtype: DType, dims: Vec<i64>, raw: Bytes) -> Tensor {
        Tensor {
            dtype,
            dims,
            data: TensorData::Raw(raw),
            name: String::new(),
            doc_string: String::new(),
            metadata_props: Vec::new(),
            external: None,
        }
    }

    /// A tensor of f32 values.
    pub fn from_f32(dims: Vec<i64>, values: &[f32]) -> Tensor {
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor::from_raw(DType::F32, dims, Bytes::from(raw))
    }

    /// A tensor of i64 values.
    pub fn from_i64(dims: Vec<i64>, values: &[i64]) -> Tensor {
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor::from_raw(DType::I64, dims, Bytes::from(raw))
    }

    /// Number of elements (product of dims; 1 for a scalar). `None` on a negative dim or overflow.
    pub fn numel(&self) -> Option<usize> {
        self.dims.iter().try_fold(1usize, |acc, &d| {
            usize::try_from(d).ok().and_then(|d| acc.checked_mul(d))
        })
    }

    /// Bytes the data takes in memory (raw size, or the typed vector's size).
    pub fn byte_size(&self) -> usize {
        match &self.data {
            TensorData::Raw(b) => b.len(),
            TensorData::Floats(v) => v.len() * 4,
            TensorData::Doubles(v) => v.len() * 8,
            TensorData::Int32s(v) => v.len() * 4,
            TensorData::Int64s(v) => v.len() * 8,
            TensorData::Uint64s(v) => v.len() * 8,
            TensorData::Strings(v) => v.iter().map(|s| s.len()).sum(),
            TensorData::Elided => 0,
        }
    }

    /// Checks that the amount of data matches dtype and dims; returns a description of the mismatch.
    pub fn check_len(&self) -> Result<(), String> {
        let n = self
            .numel()
            .ok_or_else(|| format!("invalid dims {:?}", self.dims))?;
        let per_entry = |bits: u32| -> usize {
            // int32_data holds one element, or a packed group for sub-byte types.
            match bits {
                4 => n.div_ceil(2),
                2 => n.div_ceil(4),
                _ => n,
            }
        };
        let (have, want) = match &self.data {
            TensorData::Raw(b) => match self.dtype.byte_len(n) {
                Some(w) => (b.len(), w),
                None => return Err("string tensor stored as raw_data".into()),
            },
            TensorData::Floats(v) => (v.len(), if self.dtype == DType::C64 { 2 * n } else { n }),
            TensorData::Doubles(v) => (v.len(), if self.dtype == DType::C128 { 2 * n } else { n }),
            TensorData::Int32s(v) => (v.len(), per_entry(self.dtype.bits())),
            TensorData::Int64s(v) => (v.len(), n),
            TensorData::Uint64s(v) => (v.len(), n),
            TensorData::Strings(v) => (v.len(), n),
            TensorData::Elided => return Ok(()),
        };
        if have == want {
            Ok(())
        } else {
            Err(format!(
                "{} {:?} needs {want} {}, has {have}",
                self.dtype,
                self.dims,
                if matches!(self.data, TensorData::Raw(_)) {
                    "bytes"
                } else {
                    "entries"
                }
            ))
        }
    }

    /// The first few values of an integer or bool tensor, exactly (`None` for other dtypes and packed
    /// sub-byte types).
    pub fn values_i128(&self, limit: usize) -> Option<Vec<i128>> {
        let take = |it: &mut dyn Iterator<Item = i128>| it.take(limit).collect::<Vec<_>>();
        Some(match (&self.data, self.dtype) {
            (TensorData::Int64s(v), _) => take(&mut v.iter().map(|&x| x as i128)),
            (TensorData::Uint64s(v), _) => take(&mut v.iter().map(|&x| x as i128)),
            (
                TensorData::Int32s(v),
                DType::I32 | DType::I16 | DType::I8 | DType::U16 | DType::U8 | DType::Bool,
            ) => take(&mut v.iter().map(|&x| x as i128)),
            (TensorData::Raw(b), dt) => {
                let le = |w: usize| b.chunks_exact(w);
                match dt {
                    DType::I64 => {
                        take(&mut le(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as i128))
                    }
                    DType::U64 => {
                        take(&mut le(8).map(|c| u64::from_le_bytes(c.try_into().unwrap()) as i128))
                    }
                    DType::I32 => {
                        take(&mut le(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i128))
                    }
                    DType::U32 => {
                        take(&mut le(4).map(|c| u32::from_le_bytes(c.try_into().unwrap()) as i128))
                    }
                    DType::I16 => {
                        take(&mut le(2).map(|c| i16::from_le_bytes([c[0], c[1]]) as i128))
                    }
                    DType::U16 => {
                        take(&mut le(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as i128))
                    }
                    DType::I8 => take(&mut b.iter().map(|&x| x as i8 as i128)),
                    DType::U8 | DType::Bool => take(&mut b.iter().map(|&x| x as i128)),
                    _ => return None,
                }
            }
            _ => return None,
        })
    }

    /// The first few values as f64, for display (`None` for strings, elided data and packed sub-byte types).
    pub fn values_f64(&self, limit: usize) -> Option<Vec<f64>> {
        let take = |it: &mut dyn Iterator<Item = f64>| it.take(limit).collect::<Vec<_>>();
        Some(match &self.data {
            TensorData::Floats(v) => take(&mut v.iter().map(|&x| x as f64)),
            TensorData::Doubles(v) => take(&mut v.iter().copied()),
            TensorData::Int64s(v) => take(&mut v.iter().map(|&x| x as f64)),
            TensorData::Uint64s(v) => take(&mut v.iter().map(|&x| x as f64)),
            TensorData::Int32s(v) => match self.dtype {
                DType::F16 => take(&mut v.iter().map(|&x| half::f16::from_bits(x as u16).to_f64())),
                DType::BF16 => {
                    take(&mut v.iter().map(|&x| half::bf16::from_bits(x as u16).to_f64()))
                }
                DType::I32 | DType::I16 | DType::I8 | DType::U16 | DType::U8 | DType::Bool => {
                    take(&mut v.iter().map(|&x| x as f64))
                }
                _ => return None,
            },
            TensorData::Raw(b) => {
                let le = |w: usize| b.chunks_exact(w);
                match self.dtype {
                    DType::F32 => {
                        take(&mut le(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64))
                    }
                    DType::F64 => {
                        take(&mut le(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())))
                    }
                    DType::F16 => {
                        take(&mut le(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64()))
                    }
                    DType::BF16 => {
                        take(&mut le(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64()))
                    }
                    DType::I64 => {
                        take(&mut le(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64))
                    }
                    DType::U64 => {
                        take(&mut le(8).map(|c| u64::from_le_bytes(c.try_into().unwrap()) as f64))
                    }
                    DType::I32 => {
                        take(&mut le(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f64))
                    }
                    DType::U32 => {
                        take(&mut le(4).map(|c| u32::from_le_bytes(c.try_into().unwrap()) as f64))
                    }
                    DType::I16 => take(&mut le(2).map(|c| i16::from_le_bytes([c[0], c[1]]) as f64)),
                    DType::U16 => take(&mut le(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as f64)),
                    DType::I8 => take(&mut b.iter().map(|&x| x as i8 as f64)),
                    DType::U8 | DType::Bool => take(&mut b.iter().map(|&x| x as f64)),
                    _ => return None,
                }
            }
            TensorData::Strings(_) | TensorData::Elided => return None,
        })
    }
}

/// A sparse tensor (COO): `values` and `indices` plus the dense shape.
#[derive(Clone, Debug, PartialEq)]
pub struct SparseTensor {
    /// Non-zero values, 1-D.
    pub values: Tensor,
    /// Indices: `[NNZ]` linearized or `[NNZ, rank]`.
    pub indices: Tensor,
    /// Dense dims.
    pub dims: Vec<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_checks() {
        assert!(
            Tensor::from_f32(vec![2, 2], &[1.0, 2.0, 3.0, 4.0])
                .check_len()
                .is_ok()
        );
        let err = Tensor::from_f32(vec![2, 3], &[1.0, 2.0])
            .check_len()
            .unwrap_err();
        assert_eq!(err, "f32 [2, 3] needs 24 bytes, has 8");
        let mut t = Tensor::from_raw(DType::I4, vec![3], Bytes::new());
        t.data = TensorData::Int32s(vec![0x21, 0x3]);
        assert!(t.check_len().is_ok());
        assert_eq!(
            Tensor::from_f32(vec![3], &[1.5, -2.0, 7.0]).values_f64(2),
            Some(vec![1.5, -2.0])
        );
    }
}
