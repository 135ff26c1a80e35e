//! Runtime tensors: a shape and a typed, owned, row-major buffer.

use half::{bf16, f16};
use mpopt_ir::{DType, TensorData};

/// Typed tensor contents, row-major.
#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    /// float32
    F32(Vec<f32>),
    /// float64
    F64(Vec<f64>),
    /// IEEE half
    F16(Vec<f16>),
    /// bfloat16
    BF16(Vec<bf16>),
    /// int8
    I8(Vec<i8>),
    /// int16
    I16(Vec<i16>),
    /// int32
    I32(Vec<i32>),
    /// int64
    I64(Vec<i64>),
    /// uint8
    U8(Vec<u8>),
    /// uint16
    U16(Vec<u16>),
    /// uint32
    U32(Vec<u32>),
    /// uint64
    U64(Vec<u64>),
    /// bool
    Bool(Vec<bool>),
    /// string
    Str(Vec<String>),
    /// float8, float4 and 4-/2-bit integers: one code per byte, unpacked (see `small`).
    Small(DType, Vec<u8>),
}

/// The dtype of a `Small` variant bound by value or by reference (used by the dispatch macros).
#[doc(hidden)]
pub fn dt<B: std::borrow::Borrow<DType>>(b: B) -> DType {
    *b.borrow()
}

/// Applies `$e` to the buffer of any variant, binding it as `$v`; the result is rebuilt in the same variant.
#[macro_export]
#[doc(hidden)]
macro_rules! map_data {
    ($d:expr, $v:ident => $e:expr) => {
        match $d {
            $crate::Data::F32($v) => $crate::Data::F32($e),
            $crate::Data::F64($v) => $crate::Data::F64($e),
            $crate::Data::F16($v) => $crate::Data::F16($e),
            $crate::Data::BF16($v) => $crate::Data::BF16($e),
            $crate::Data::I8($v) => $crate::Data::I8($e),
            $crate::Data::I16($v) => $crate::Data::I16($e),
            $crate::Data::I32($v) => $crate::Data::I32($e),
            $crate::Data::I64($v) => $crate::Data::I64($e),
            $crate::Data::U8($v) => $crate::Data::U8($e),
            $crate::Data::U16($v) => $crate::Data::U16($e),
            $crate::Data::U32($v) => $crate::Data::U32($e),
            $crate::Data::U64($v) => $crate::Data::U64($e),
            $crate::Data::Bool($v) => $crate::Data::Bool($e),
            $crate::Data::Str($v) => $crate::Data::Str($e),
            $crate::Data::Small(__d, $v) => $crate::Data::Small($crate::tensor::dt(__d), $e),
        }
    };
}

/// Evaluates `$e` on the buffer of any variant, binding it as `$v` (the result type is the same for all).
#[macro_export]
#[doc(hidden)]
macro_rules! with_data {
    ($d:expr, $v:ident => $e:expr) => {
        match $d {
            $crate::Data::F32($v) => $e,
            $crate::Data::F64($v) => $e,
            $crate::Data::F16($v) => $e,
            $crate::Data::BF16($v) => $e,
            $crate::Data::I8($v) => $e,
            $crate::Data::I16($v) => $e,
            $crate::Data::I32($v) => $e,
            $crate::Data::I64($v) => $e,
            $crate::Data::U8($v) => $e,
            $crate::Data::U16($v) => $e,
            $crate::Data::U32($v) => $e,
            $crate::Data::U64($v) => $e,
            $crate::Data::Bool($v) => $e,
            $crate::Data::Str($v) => $e,
            $crate::Data::Small(_, $v) => $e,
        }
    };
}

/// Evaluates `$e` on two buffers of the same variant (bound as `$a`, `$b`), rebuilding that variant; an
/// `Err` when the variants differ.
#[macro_export]
#[doc(hidden)]
macro_rules! zip_same {
    ($x:expr, $y:expr, |$a:ident, $b:ident| $e:expr) => {
        match ($x, $y) {
            ($crate::Data::F32($a), $crate::Data::F32($b)) => Ok($crate::Data::F32($e)),
            ($crate::Data::F64($a), $crate::Data::F64($b)) => Ok($crate::Data::F64($e)),
            ($crate::Data::F16($a), $crate::Data::F16($b)) => Ok($crate::Data::F16($e)),
            ($crate::Data::BF16($a), $crate::Data::BF16($b)) => Ok($crate::Data::BF16($e)),
            ($crate::Data::I8($a), $crate::Data::I8($b)) => Ok($crate::Data::I8($e)),
            ($crate::Data::I16($a), $crate::Data::I16($b)) => Ok($crate::Data::I16($e)),
            ($crate::Data::I32($a), $crate::Data::I32($b)) => Ok($crate::Data::I32($e)),
            ($crate::Data::I64($a), $crate::Data::I64($b)) => Ok($crate::Data::I64($e)),
            ($crate::Data::U8($a), $crate::Data::U8($b)) => Ok($crate::Data::U8($e)),
            ($crate::Data::U16($a), $crate::Data::U16($b)) => Ok($crate::Data::U16($e)),
            ($crate::Data::U32($a), $crate::Data::U32($b)) => Ok($crate::Data::U32($e)),
            ($crate::Data::U64($a), $crate::Data::U64($b)) => Ok($crate::Data::U64($e)),
            ($crate::Data::Bool($a), $crate::Data::Bool($b)) => Ok($crate::Data::Bool($e)),
            ($crate::Data::Str($a), $crate::Data::Str($b)) => Ok($crate::Data::Str($e)),
            ($crate::Data::Small(__d, $a), $crate::Data::Small(__e, $b))
                if $crate::tensor::dt(__d) == $crate::tensor::dt(__e) =>
            {
                Ok($crate::Data::Small($crate::tensor::dt(__d), $e))
            }
            (p, q) => Err(format!("mismatched types {} and {}", p.dtype(), q.dtype())),
        }
    };
}

impl Data {
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            Data::F32(_) => DType::F32,
            Data::F64(_) => DType::F64,
            Data::F16(_) => DType::F16,
            Data::BF16(_) => DType::BF16,
            Data::I8(_) => DType::I8,
            Data::I16(_) => DType::I16,
            Data::I32(_) => DType::I32,
            Data::I64(_) => DType::I64,
            Data::U8(_) => DType::U8,
            Data::U16(_) => DType::U16,
            Data::U32(_) => DType::U32,
            Data::U64(_) => DType::U64,
            Data::Bool(_) => DType::Bool,
            Data::Str(_) => DType::Str,
            Data::Small(d, _) => *d,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        with_data!(self, v => v.len())
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// An empty buffer of this type.
    pub fn empty(dtype: DType) -> Result<Data, String> {
        Data::zeros(dtype, 0)
    }

    /// `n` zeros (false, empty strings) of `dtype`.
    pub fn zeros(dtype: DType, n: usize) -> Result<Data, String> {
        Ok(match dtype {
            DType::F32 => Data::F32(vec![0.0; n]),
            DType::F64 => Data::F64(vec![0.0; n]),
            DType::F16 => Data::F16(vec![f16::ZERO; n]),
            DType::BF16 => Data::BF16(vec![bf16::ZERO; n]),
            DType::I8 => Data::I8(vec![0; n]),
            DType::I16 => Data::I16(vec![0; n]),
            DType::I32 => Data::I32(vec![0; n]),
            DType::I64 => Data::I64(vec![0; n]),
            DType::U8 => Data::U8(vec![0; n]),
            DType::U16 => Data::U16(vec![0; n]),
            DType::U32 => Data::U32(vec![0; n]),
            DType::U64 => Data::U64(vec![0; n]),
            DType::Bool => Data::Bool(vec![false; n]),
            DType::Str => Data::Str(vec![String::new(); n]),
            d if crate::small::is_small(d) => Data::Small(d, vec![0; n]),
            other => return Err(format!("the executor has no {other} tensors")),
        })
    }

    /// True for f16, bf16, f32 and f64.
    pub fn is_float(&self) -> bool {
        matches!(
            self,
            Data::F32(_) | Data::F64(_) | Data::F16(_) | Data::BF16(_)
        )
    }
}

/// A dense tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    /// Dimensions (empty for a scalar).
    pub shape: Vec<usize>,
    /// Contents; `data.len()` is the product of `shape`.
    pub data: Data,
}

/// A runtime value: a tensor, a sequence of tensors, or an optional.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// A tensor.
    Tensor(Tensor),
    /// A sequence of tensors (`seq(tensor(T))`), with the element type for empty sequences.
    Seq(Vec<Tensor>, DType),
    /// An optional: `None` is an empty optional, with the element type it would hold.
    Opt(Option<Box<Value>>, DType),
}

impl Value {
    /// The tensor, or an error naming what this value is instead.
    pub fn tensor(&self) -> Result<&Tensor, String> {
        match self {
            Value::Tensor(t) => Ok(t),
            Value::Seq(..) => Err("expected a tensor, got a sequence".into()),
            Value::Opt(Some(v), _) => v.tensor(),
            Value::Opt(None, _) => Err("expected a tensor, got an empty optional".into()),
        }
    }
    /// Moves the tensor out.
    pub fn into_tensor(self) -> Result<Tensor, String> {
        match self {
            Value::Tensor(t) => Ok(t),
            Value::Opt(Some(v), _) => v.into_tensor(),
            _ => Err("expected a tensor".into()),
        }
    }
}

impl From<Tensor> for Value {
    fn from(t: Tensor) -> Value {
        Value::Tensor(t)
    }
}

/// Product of the dims.
pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// The longest dim an op derives from a model's attributes or data (2^31): padded window dims, Resize,
/// ConvTranspose and CenterCropPad outputs. No real model comes near it; past it the attribute is an error
/// that would otherwise allocate an output the size of the address space.
pub const MAX_DIM: usize = 1 << 31;

/// The most elements one tensor made from a model's *data* (a shape input, repeats, a range) may have:
/// 2^32, 16 GiB of f32. Past it the data is an error in the model (a fuzzed shape of 4e9 x 4e9 asked for
/// an allocation larger than the address space, and aborted the process).
pub const MAX_ELEMENTS: usize = 1 << 32;

/// `numel(shape)`, or an error naming the shape when the count overflows or passes [`MAX_ELEMENTS`].
pub fn bounded_numel(shape: &[usize]) -> Result<usize, String> {
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .filter(|&n| n <= MAX_ELEMENTS)
        .ok_or_else(|| format!("a tensor of shape {shape:?} has more than 2^32 elements"))
}

impl Tensor {
    /// A tensor; `data` must hold `numel(shape)` elements.
    pub fn new(shape: Vec<usize>, data: Data) -> Tensor {
        debug_assert_eq!(numel(&shape), data.len(), "shape {shape:?}");
        Tensor { shape, data }
    }
    /// An f32 tensor.
    pub fn f32(shape: Vec<usize>, v: Vec<f32>) -> Tensor {
        Tensor::new(shape, Data::F32(v))
    }
    /// An i64 tensor.
    pub fn i64(shape: Vec<usize>, v: Vec<i64>) -> Tensor {
        Tensor::new(shape, Data::I64(v))
    }
    /// A bool tensor.
    pub fn bool(shape: Vec<usize>, v: Vec<bool>) -> Tensor {
        Tensor::new(shape, Data::Bool(v))
    }
    /// The element type.
    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }
    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    /// Rank.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    /// The same data with another shape of the same size.
    pub fn reshaped(mut self, shape: Vec<usize>) -> Tensor {
        debug_assert_eq!(numel(&shape), self.len());
        self.shape = shape;
        self
    }

    /// Integer (or bool) contents as i64; an error for floats and strings.
    pub fn to_i64s(&self) -> Result<Vec<i64>, String> {
        Ok(match &self.data {
            Data::I64(v) => v.clone(),
            Data::I32(v) => v.iter().map(|&x| x as i64).collect(),
            Data::I16(v) => v.iter().map(|&x| x as i64).collect(),
            Data::I8(v) => v.iter().map(|&x| x as i64).collect(),
            Data::U8(v) => v.iter().map(|&x| x as i64).collect(),
            Data::U16(v) => v.iter().map(|&x| x as i64).collect(),
            Data::U32(v) => v.iter().map(|&x| x as i64).collect(),
            Data::U64(v) => v.iter().map(|&x| x as i64).collect(),
            Data::Bool(v) => v.iter().map(|&x| x as i64).collect(),
            Data::Small(d, v) if crate::small::is_small_int(*d) => {
                v.iter().map(|&c| crate::small::decode_int(*d, c)).collect()
            }
            other => return Err(format!("expected integers, got {}", other.dtype())),
        })
    }

    /// Numeric contents as f64 (exact for every type but 64-bit integers past 2^53).
    pub fn to_f64s(&self) -> Result<Vec<f64>, String> {
        Ok(match &self.data {
            Data::F32(v) => v.iter().map(|&x| x as f64).collect(),
            Data::F64(v) => v.clone(),
            Data::F16(v) => v.iter().map(|x| x.to_f64()).collect(),
            Data::BF16(v) => v.iter().map(|x| x.to_f64()).collect(),
            Data::Str(_) => return Err("expected numbers, got strings".into()),
            Data::Small(d, v) => crate::small::to_f64s(*d, v),
            _ => self.to_i64s()?.into_iter().map(|x| x as f64).collect(),
        })
    }

    /// Numeric contents as f32 (f16/bf16 widened exactly; others rounded).
    pub fn to_f32s(&self) -> Result<Vec<f32>, String> {
        Ok(match &self.data {
            Data::F32(v) => v.clone(),
            Data::F16(v) => widen_f16(v),
            Data::BF16(v) => mpopt_ir::halfconv::blocks(v, |h, f| {
                half::slice::HalfFloatSliceExt::convert_to_f32_slice(h, f)
            }),
            _ => self.to_f64s()?.into_iter().map(|x| x as f32).collect(),
        })
    }

    /// A single integer (a scalar or a one-element tensor).
    pub fn scalar_i64(&self) -> Result<i64, String> {
        match self.to_i64s()?.as_slice() {
            [x] => Ok(*x),
            v => Err(format!("expected one integer, got {} values", v.len())),
        }
    }

    /// A single number (a scalar or a one-element tensor).
    pub fn scalar_f64(&self) -> Result<f64, String> {
        match self.to_f64s()?.as_slice() {
            [x] => Ok(*x),
            v => Err(format!("expected one number, got {} values", v.len())),
        }
    }

    /// Converts an IR constant (initializer, `Constant` value, tensor attribute).
    pub fn from_ir(t: &mpopt_ir::Tensor) -> Result<Tensor, String> {
        let shape: Vec<usize> = t
            .dims
            .iter()
            .map(|&d| usize::try_from(d).map_err(|_| format!("negative dim in {:?}", t.dims)))
            .collect::<Result<_, _>>()?;
        t.check_len()?;
        if crate::small::is_small(t.dtype) {
            let n = numel(&shape);
            let bytes: Vec<u8> = match t.data.view() {
                TensorData::Raw(b) => b.to_vec(),
                TensorData::Int32s(v) => v.iter().map(|&x| x as u8).collect(),
                _ => return Err(format!("{} tensor in an unexpected storage field", t.dtype)),
            };
            return Ok(Tensor::new(
                shape,
                Data::Small(t.dtype, crate::small::unpack(t.dtype, &bytes, n)),
            ));
        }
        let data = match t.data.view() {
            TensorData::Raw(b) => raw_to_data(t.dtype, b)?,
            TensorData::Floats(v) if t.dtype == DType::F32 => Data::F32(v.clone()),
            TensorData::Doubles(v) if t.dtype == DType::F64 => Data::F64(v.clone()),
            TensorData::Int64s(v) if t.dtype == DType::I64 => Data::I64(v.clone()),
            TensorData::Uint64s(v) => match t.dtype {
                DType::U64 => Data::U64(v.clone()),
                DType::U32 => Data::U32(v.iter().map(|&x| x as u32).collect()),
                d => return Err(format!("{d} stored in uint64_data")),
            },
            TensorData::Int32s(v) => match t.dtype {
                DType::I32 => Data::I32(v.clone()),
                DType::I16 => Data::I16(v.iter().map(|&x| x as i16).collect()),
                DType::I8 => Data::I8(v.iter().map(|&x| x as i8).collect()),
                DType::U16 => Data::U16(v.iter().map(|&x| x as u16).collect()),
                DType::U8 => Data::U8(v.iter().map(|&x| x as u8).collect()),
                DType::Bool => Data::Bool(v.iter().map(|&x| x != 0).collect()),
                DType::F16 => Data::F16(v.iter().map(|&x| f16::from_bits(x as u16)).collect()),
                DType::BF16 => Data::BF16(v.iter().map(|&x| bf16::from_bits(x as u16)).collect()),
                d => return Err(format!("the executor has no {d} tensors")),
            },
            TensorData::Strings(v) => Data::Str(
                v.iter()
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect(),
            ),
            TensorData::Elided => return Err("the tensor's data was elided".into()),
            _ => return Err(format!("{} tensor in an unexpected storage field", t.dtype)),
        };
        Ok(Tensor::new(shape, data))
    }

    /// Converts to an IR tensor (raw little-endian data; strings as `string_data`).
    pub fn to_ir(&self, name: &str) -> mpopt_ir::Tensor {
        let dims = self.shape.iter().map(|&d| d as i64).collect();
        let mut t = match &self.data {
            Data::Str(v) => {
                let mut t = mpopt_ir::Tensor::from_raw(DType::Str, dims, Default::default());
                t.data = TensorData::Strings(
                    v.iter()
                        .map(|s| bytes::Bytes::from(s.clone().into_bytes()))
                        .collect(),
                );
                t
            }
            d => mpopt_ir::Tensor::from_raw(d.dtype(), dims, bytes::Bytes::from(data_to_raw(d))),
        };
        t.name = name.to_string();
        t
    }
}

fn chunks<const W: usize, T>(b: &[u8], f: impl Fn([u8; W]) -> T) -> Vec<T> {
    b.chunks_exact(W)
        .map(|c| f(c.try_into().expect("exact chunk")))
        .collect()
}

/// Decodes little-endian bytes.
pub fn raw_to_data(dtype: DType, b: &[u8]) -> Result<Data, String> {
    Ok(match dtype {
        DType::F32 => Data::F32(chunks(b, f32::from_le_bytes)),
        DType::F64 => Data::F64(chunks(b, f64::from_le_bytes)),
        DType::F16 => Data::F16(chunks(b, f16::from_le_bytes)),
        DType::BF16 => Data::BF16(chunks(b, bf16::from_le_bytes)),
        DType::I8 => Data::I8(b.iter().map(|&x| x as i8).collect()),
        DType::I16 => Data::I16(chunks(b, i16::from_le_bytes)),
        DType::I32 => Data::I32(chunks(b, i32::from_le_bytes)),
        DType::I64 => Data::I64(chunks(b, i64::from_le_bytes)),
        DType::U8 => Data::U8(b.to_vec()),
        DType::U16 => Data::U16(chunks(b, u16::from_le_bytes)),
        DType::U32 => Data::U32(chunks(b, u32::from_le_bytes)),
        DType::U64 => Data::U64(chunks(b, u64::from_le_bytes)),
        DType::Bool => Data::Bool(b.iter().map(|&x| x != 0).collect()),
        d => return Err(format!("the executor has no {d} tensors")),
    })
}

/// Encodes as little-endian bytes (strings: empty).
pub fn data_to_raw(d: &Data) -> Vec<u8> {
    fn le<T: Copy, const W: usize>(v: &[T], f: impl Fn(T) -> [u8; W]) -> Vec<u8> {
        let mut out = Vec::with_capacity(v.len() * W);
        for &x in v {
            out.extend_from_slice(&f(x));
        }
        out
    }
    match d {
        Data::F32(v) => le(v, f32::to_le_bytes),
        Data::F64(v) => le(v, f64::to_le_bytes),
        Data::F16(v) => le(v, f16::to_le_bytes),
        Data::BF16(v) => le(v, bf16::to_le_bytes),
        Data::I8(v) => v.iter().map(|&x| x as u8).collect(),
        Data::I16(v) => le(v, i16::to_le_bytes),
        Data::I32(v) => le(v, i32::to_le_bytes),
        Data::I64(v) => le(v, i64::to_le_bytes),
        Data::U8(v) => v.clone(),
        Data::U16(v) => le(v, u16::to_le_bytes),
        Data::U32(v) => le(v, u32::to_le_bytes),
        Data::U64(v) => le(v, u64::to_le_bytes),
        Data::Bool(v) => v.iter().map(|&x| x as u8).collect(),
        Data::Str(_) => Vec::new(),
        Data::Small(d, v) => crate::small::pack(*d, v),
    }
}

/// Row-major strides of a shape.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Converts f32 values to f16 with IEEE round-to-nearest-even (overflow to +-inf, gradual underflow).
pub fn round_f16(v: &[f32]) -> Vec<f16> {
    half_convert(v, mpopt_ir::halfconv::f32_to_f16_uninit)
}

/// Rounds f32 values to the half type `t` (f16 or bf16) once, as a low-precision op stores its result.
///
/// # Panics
/// For any other `t`.
pub(crate) fn round_to(v: &[f32], t: DType) -> Data {
    match t {
        DType::F16 => Data::F16(round_f16(v)),
        DType::BF16 => Data::BF16(round_bf16(v)),
        other => unreachable!("round_to a half type, not {other}"),
    }
}

/// Widens f16 values to f32 (exact).
pub(crate) fn widen_f16(v: &[f16]) -> Vec<f32> {
    half_convert(v, mpopt_ir::halfconv::f16_to_f32_uninit)
}

/// Elements from which [`half_convert`] splits across threads.
const CONVERT_PAR_MIN: usize = 1 << 16;

/// `convert` (one of `halfconv`'s conversions into uninitialized memory) over `v` into a new vector, in
/// parallel chunks for big tensors. In the GPU-faithful mode every f16 op widens its inputs and rounds its
/// outputs; on one thread those two loops were a fifth of ppocrv4_rec's accuracy search.
fn half_convert<S: Sync, D: Send>(
    v: &[S],
    convert: impl Fn(&[S], &mut [std::mem::MaybeUninit<D>]) + Sync + Send,
) -> Vec<D> {
    let chunk = if v.len() >= CONVERT_PAR_MIN {
        crate::ops::elementwise::PAR_MIN
    } else {
        v.len()
    };
    // SAFETY: each chunk is converted from the equally long piece of `v` at the same start, and the
    // conversions write every element they are given.
    unsafe {
        crate::ops::elementwise::par_fill(v.len(), chunk, |s, o| convert(&v[s..s + o.len()], o))
    }
}

/// Converts f32 values to bf16 with round-to-nearest-even.
pub fn round_bf16(v: &[f32]) -> Vec<bf16> {
    mpopt_ir::halfconv::blocks(v, |f, h| {
        half::slice::HalfFloatSliceExt::convert_from_f32_slice(h, f)
    })
}

/// Reserves room for `n` more elements.
pub(crate) fn reserve(d: &mut Data, n: usize) {
    with_data!(d, v => v.reserve(n))
}

/// Appends `src[start..start + len]` to `dst`; both must have the same dtype.
pub(crate) fn extend_from(
    dst: &mut Data,
    src: &Data,
    start: usize,
    len: usize,
) -> Result<(), String> {
    macro_rules! arms {
        ($($var:ident),*) => {
            match (dst, src) {
                $((Data::$var(a), Data::$var(b)) => a.extend_from_slice(&b[start..start + len]),)*
                (a, b) => return Err(format!("mismatched types {} and {}", a.dtype(), b.dtype())),
            }
        };
    }
    arms!(
        F32, F64, F16, BF16, I8, I16, I32, I64, U8, U16, U32, U64, Bool, Str
    );
    Ok(())
}
