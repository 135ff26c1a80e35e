//! Tensor constants: initializers, `Constant` values and tensor attributes.
//!
//! Data is kept in the storage form the model used, so that a round trip writes back the same values without
//! conversion: `raw_data` (and external data) stays a [`Bytes`] slice that borrows the memory-mapped model file
//! until a pass replaces it; the typed repeated fields of ONNX (`float_data`, `int32_data`, ...) stay typed.

use std::sync::{Arc, OnceLock};

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
///
/// Read them through [`TensorData::view`], which shows a [`TensorData::Narrowed`] tensor as the raw bytes it
/// stands for; a match on the field itself sees the variant as stored.
#[derive(Clone, Debug)]
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
    /// f32 `raw_data` narrowed to f16 or bf16, converted when first read ([`TensorData::view`]) or, by the
    /// ONNX save, straight into the file. It reads as [`TensorData::Raw`] of the narrowed bytes.
    Narrowed(Narrowed),
}

impl TensorData {
    /// The data as it reads: a [`TensorData::Narrowed`] tensor's converted bytes as [`TensorData::Raw`]
    /// (converted on the first call, then kept), any other variant itself.
    pub fn view(&self) -> &TensorData {
        match self {
            TensorData::Narrowed(n) => n.materialized(),
            d => d,
        }
    }
}

/// Equal when they read the same ([`TensorData::view`]): a narrowed tensor equals the raw bytes it stands for.
impl PartialEq for TensorData {
    fn eq(&self, other: &TensorData) -> bool {
        use TensorData::*;
        if let (Narrowed(a), Narrowed(b)) = (self, other)
            && a.dtype() == b.dtype()
            && a.source() == b.source()
        {
            return true;
        }
        match (self.view(), other.view()) {
            (Raw(a), Raw(b)) => a == b,
            (Floats(a), Floats(b)) => a == b,
            (Doubles(a), Doubles(b)) => a == b,
            (Int32s(a), Int32s(b)) => a == b,
            (Int64s(a), Int64s(b)) => a == b,
            (Uint64s(a), Uint64s(b)) => a == b,
            (Strings(a), Strings(b)) => a == b,
            (Elided, Elided) => true,
            _ => false,
        }
    }
}

/// f32 data that reads as f16 or bf16, for [`TensorData::Narrowed`]: the little-endian f32 bytes and the
/// target type; the conversion is [`narrow_f32_bytes`] (round to nearest even, finite values past the
/// target's range clamped to its largest finite value).
///
/// Why: insert-casts converted every lowered weight into a fresh buffer that the save then copied into the
/// file; on the big corpus models that buffer's new pages were a sixth of the process's CPU time (vit_tiny:
/// 11 MB, about 2,800 pages). The save converts a narrowed tensor block by block into its output buffers
/// instead; anything else that reads it gets the bytes converted once and kept. Clones share both.
///
/// ```
/// use bytes::Bytes;
/// use mpopt_ir::{DType, Narrowed, TensorData};
/// let src: Vec<u8> = [1.0f32, 70000.0, -0.5].iter().flat_map(|x| x.to_le_bytes()).collect();
/// let n = Narrowed::new(Bytes::from(src), DType::F16).unwrap();
/// assert_eq!(n.len(), 3);
/// let TensorData::Raw(b) = n.materialized() else { unreachable!() };
/// assert_eq!(&b[..], &[0x00, 0x3c, 0xff, 0x7b, 0x00, 0xb8]); // 1.0, 65504 (clamped), -0.5
/// ```
#[derive(Clone)]
pub struct Narrowed(Arc<NarrowedInner>);

struct NarrowedInner {
    src: Bytes,
    to: DType,
    raw: OnceLock<TensorData>,
}

impl Narrowed {
    /// `src`, little-endian f32, to read as `to`; `None` unless `to` is f16 or bf16 and `src` holds whole
    /// f32 values.
    pub fn new(src: Bytes, to: DType) -> Option<Narrowed> {
        (matches!(to, DType::F16 | DType::BF16) && src.len().is_multiple_of(4)).then(|| {
            Narrowed(Arc::new(NarrowedInner {
                src,
                to,
                raw: OnceLock::new(),
            }))
        })
    }

    /// The f32 bytes.
    pub fn source(&self) -> &Bytes {
        &self.0.src
    }

    /// f16 or bf16.
    pub fn dtype(&self) -> DType {
        self.0.to
    }

    /// Elements.
    pub fn len(&self) -> usize {
        self.0.src.len() / 4
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.0.src.is_empty()
    }

    /// Bytes once narrowed (two per element).
    pub fn byte_len(&self) -> usize {
        self.len() * 2
    }

    /// The f32 bytes of the elements from `first` that fill `out_len` narrowed bytes.
    fn piece(&self, first: usize, out_len: usize) -> &[u8] {
        assert!(out_len.is_multiple_of(2), "narrow_into: odd output length");
        &self.0.src[first * 4..(first + out_len / 2) * 4]
    }

    /// Narrows the elements `first..first + out.len() / 2` into `out` (little-endian), without keeping them.
    ///
    /// # Panics
    /// When `out` has an odd length or the elements are out of range.
    pub fn narrow_into(&self, first: usize, out: &mut [u8]) {
        narrow_f32_bytes(self.piece(first, out.len()), self.0.to, out);
    }

    /// [`Narrowed::narrow_into`] into uninitialized memory (every byte of `out` is written).
    ///
    /// # Panics
    /// As [`Narrowed::narrow_into`].
    pub fn narrow_into_uninit(&self, first: usize, out: &mut [std::mem::MaybeUninit<u8>]) {
        narrow_f32_bytes_uninit(self.piece(first, out.len()), self.0.to, out);
    }

    /// The narrowed bytes as [`TensorData::Raw`], converted on the first call and kept.
    pub fn materialized(&self) -> &TensorData {
        self.0.raw.get_or_init(|| {
            let mut out = Vec::with_capacity(self.byte_len());
            self.narrow_into_uninit(0, &mut out.spare_capacity_mut()[..self.byte_len()]);
            // SAFETY: `narrow_into_uninit` wrote all `byte_len()` bytes
            unsafe { out.set_len(self.byte_len()) };
            TensorData::Raw(Bytes::from(out))
        })
    }

    /// [`Narrowed::materialized`]'s bytes.
    pub fn bytes(&self) -> &Bytes {
        match self.materialized() {
            TensorData::Raw(b) => b,
            _ => unreachable!("a narrowed tensor materializes as raw bytes"),
        }
    }

    /// Whether [`Narrowed::materialized`] has run.
    pub fn is_materialized(&self) -> bool {
        self.0.raw.get().is_some()
    }
}

impl std::fmt::Debug for Narrowed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Narrowed")
            .field("to", &self.0.to)
            .field("elements", &self.len())
            .finish()
    }
}

/// Little-endian f32 bytes to little-endian f16 or bf16 (`to`), rounded to nearest even; finite values past
/// the target's largest finite value become that value with their sign (not infinity), NaN stays NaN. f16
/// goes through [`crate::halfconv::f32_bytes_to_f16_clamped`] (one F16C loop where the CPU has it), bf16
/// through [`crate::halfconv::f32_bytes_to_bf16_clamped`].
///
/// # Panics
/// When `to` is neither f16 nor bf16, or `out` is not half the length of `src` (a multiple of 4).
pub fn narrow_f32_bytes(src: &[u8], to: DType, out: &mut [u8]) {
    // SAFETY: `MaybeUninit<u8>` has `u8`'s layout, and only initialized bytes are written through it
    let out = unsafe { &mut *(out as *mut [u8] as *mut [std::mem::MaybeUninit<u8>]) };
    narrow_f32_bytes_uninit(src, to, out)
}

/// [`narrow_f32_bytes`] into uninitialized memory (every byte of `out` is written).
///
/// # Panics
/// As [`narrow_f32_bytes`].
pub fn narrow_f32_bytes_uninit(src: &[u8], to: DType, out: &mut [std::mem::MaybeUninit<u8>]) {
    match to {
        DType::F16 => crate::halfconv::f32_bytes_to_f16_clamped(src, out),
        DType::BF16 => crate::halfconv::f32_bytes_to_bf16_clamped(src, out),
        other => panic!("narrow_f32_bytes: {other} is not f16 or bf16"),
    }
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
            TensorData::Narrowed(n) => n.byte_len(),
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
            TensorData::Narrowed(d) if d.dtype() != self.dtype => {
                return Err(format!(
                    "{} data narrowed to {} in a {} tensor",
                    DType::F32,
                    d.dtype(),
                    self.dtype
                ));
            }
            TensorData::Narrowed(d) => (d.byte_len(), n * 2),
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
                if matches!(self.data, TensorData::Raw(_) | TensorData::Narrowed(_)) {
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
        Some(match (self.data.view(), self.dtype) {
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
        Some(match self.data.view() {
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
            TensorData::Strings(_) | TensorData::Elided | TensorData::Narrowed(_) => return None,
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

    /// Values around both types' limits (overflow, ties, subnormals, NaN, infinities) and ordinary ones.
    fn probes() -> Vec<f32> {
        let mut xs = vec![
            0.0,
            -0.0,
            1.0,
            -1.0,
            65504.0,
            65519.99,
            65520.0,
            -65520.0,
            7e4,
            -1e9,
            f32::MAX,
            f32::MIN,
            3.39e38,
            -3.3961e38,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            1e-8,
            5.96e-8,
            2.98e-8,
            1.0 + 1.0 / 2048.0,
            1.0 + 3.0 / 2048.0,
            1e-40,
        ];
        let mut r = 0x2545_f491_u32;
        for i in 0..3000 {
            r ^= r << 13;
            r ^= r >> 17;
            r ^= r << 5;
            xs.push(if i % 3 == 0 {
                f32::from_bits(r)
            } else {
                (i as f32 - 1500.0) * 51.7
            });
        }
        xs
    }

    /// What `narrow_f32_bytes` must give: `half`'s rounding, finite overflow clamped.
    fn expected(xs: &[f32], to: DType) -> Vec<u8> {
        fn one<T: Copy>(h: T, x: f32, inf: fn(T) -> bool, max: T, min: T) -> T {
            match (inf(h) && x.is_finite(), x > 0.0) {
                (true, true) => max,
                (true, false) => min,
                _ => h,
            }
        }
        use half::{bf16, f16};
        xs.iter()
            .flat_map(|&x| {
                let bits = if to == DType::F16 {
                    one(f16::from_f32(x), x, f16::is_infinite, f16::MAX, f16::MIN).to_bits()
                } else {
                    one(
                        bf16::from_f32(x),
                        x,
                        bf16::is_infinite,
                        bf16::MAX,
                        bf16::MIN,
                    )
                    .to_bits()
                };
                bits.to_le_bytes()
            })
            .collect()
    }

    #[test]
    fn narrowed_data_reads_as_its_rounded_and_clamped_values() {
        let xs = probes();
        for to in [DType::F16, DType::BF16] {
            let want = expected(&xs, to);
            // lengths around the 8-lane steps and the 1024-element blocks, at every misalignment
            for n in [0usize, 1, 7, 8, 9, 1023, 1024, 1025, xs.len()] {
                for off in 0..4 {
                    let mut buf = vec![0u8; off];
                    buf.extend(xs[..n].iter().flat_map(|x| x.to_le_bytes()));
                    let nw = Narrowed::new(Bytes::from(buf).slice(off..), to).unwrap();
                    let TensorData::Raw(got) = nw.materialized() else {
                        panic!("materialized as raw bytes")
                    };
                    assert_eq!(got.len(), 2 * n);
                    for (i, (g, w)) in got.chunks(2).zip(want.chunks(2)).enumerate() {
                        let x = xs[i];
                        if x.is_nan() {
                            // a NaN stays a NaN (F16C and `half` may differ in its payload)
                            let g = u16::from_le_bytes([g[0], g[1]]);
                            let nan = if to == DType::F16 {
                                half::f16::from_bits(g).is_nan()
                            } else {
                                half::bf16::from_bits(g).is_nan()
                            };
                            assert!(nan, "{to} element {i}");
                        } else {
                            assert_eq!(g, w, "{to} n {n} offset {off} element {i}: {x:e}");
                        }
                    }
                    // a piece from the middle: the same bytes
                    if n >= 9 {
                        let mut part = vec![0u8; 2 * (n - 5)];
                        nw.narrow_into(3, &mut part);
                        assert_eq!(&part[..], &got[6..2 * (n - 2)]);
                    }
                }
            }
        }
    }

    #[test]
    fn a_narrowed_tensor_is_measured_and_compared_without_converting() {
        let xs = [1.0f32, -2.5, 7e4, 0.1, 3.0, 4.0];
        let src: Bytes = xs
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect::<Vec<u8>>()
            .into();
        assert!(Narrowed::new(src.clone(), DType::F32).is_none());
        assert!(Narrowed::new(src.slice(1..), DType::F16).is_none());
        let n = Narrowed::new(src.clone(), DType::F16).unwrap();
        let mut t = Tensor::from_raw(DType::F16, vec![2, 3], Bytes::new());
        t.data = TensorData::Narrowed(n.clone());
        assert_eq!(t.byte_size(), 12);
        assert!(t.check_len().is_ok());
        assert!(!n.is_materialized(), "sizes and checks do not convert");
        let mut wrong = t.clone();
        wrong.dims = vec![7];
        assert_eq!(
            wrong.check_len().unwrap_err(),
            "f16 [7] needs 14 bytes, has 12"
        );
        wrong.dims = vec![6];
        wrong.dtype = DType::BF16;
        assert_eq!(
            wrong.check_len().unwrap_err(),
            "f32 data narrowed to f16 in a bf16 tensor"
        );
        // the same source and type: equal without converting
        let twin = TensorData::Narrowed(Narrowed::new(src, DType::F16).unwrap());
        assert_eq!(t.data, twin);
        assert!(!n.is_materialized());
        // against raw bytes: compared as read, and a clone shares the conversion
        let raw = TensorData::Raw(Bytes::from(expected(&xs, DType::F16)));
        assert_eq!(t.data, raw);
        assert_eq!(raw, t.data);
        assert!(n.is_materialized());
        assert_eq!(t.values_f64(3), Some(vec![1.0, -2.5, 65504.0]));
        assert_ne!(t.data, TensorData::Raw(Bytes::from(vec![0u8; 12])));
    }
}
