//! Element types of tensors, numbered as ONNX's `TensorProto.DataType` (onnx 1.23.2, IR version 14).

use std::fmt;

macro_rules! dtypes {
    ($( $variant:ident = $code:literal, $short:literal, $bits:literal, $doc:literal; )*) => {
        /// An element type. The discriminant is the ONNX `TensorProto.DataType` code.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(i32)]
        pub enum DType {
            $( #[doc = $doc] $variant = $code, )*
        }

        impl DType {
            /// Every element type, in code order.
            pub const ALL: &'static [DType] = &[$(DType::$variant),*];

            /// The type with this ONNX code; `None` for 0 (UNDEFINED) and unknown codes.
            pub fn from_code(code: i32) -> Option<DType> {
                match code { $( $code => Some(DType::$variant), )* _ => None }
            }

            /// The short name used by the IR text format (`f32`, `f16`, `bf16`, `i64`, ...).
            pub fn short_name(self) -> &'static str {
                match self { $( DType::$variant => $short, )* }
            }

            /// Parses a short name (see [`DType::short_name`]).
            pub fn from_short_name(s: &str) -> Option<DType> {
                match s { $( $short => Some(DType::$variant), )* _ => None }
            }

            /// Bits per element as stored packed in `raw_data` (0 for strings).
            pub fn bits(self) -> u32 {
                match self { $( DType::$variant => $bits, )* }
            }
        }
    };
}

dtypes! {
    F32 = 1, "f32", 32, "32-bit IEEE float (FLOAT).";
    U8 = 2, "u8", 8, "8-bit unsigned integer.";
    I8 = 3, "i8", 8, "8-bit signed integer.";
    U16 = 4, "u16", 16, "16-bit unsigned integer.";
    I16 = 5, "i16", 16, "16-bit signed integer.";
    I32 = 6, "i32", 32, "32-bit signed integer.";
    I64 = 7, "i64", 64, "64-bit signed integer.";
    Str = 8, "str", 0, "UTF-8 string.";
    Bool = 9, "bool", 8, "Boolean, one byte per element.";
    F16 = 10, "f16", 16, "IEEE half precision (FLOAT16).";
    F64 = 11, "f64", 64, "64-bit IEEE float (DOUBLE).";
    U32 = 12, "u32", 32, "32-bit unsigned integer.";
    U64 = 13, "u64", 64, "64-bit unsigned integer.";
    C64 = 14, "c64", 64, "Complex of two f32.";
    C128 = 15, "c128", 128, "Complex of two f64.";
    BF16 = 16, "bf16", 16, "bfloat16.";
    F8E4M3FN = 17, "f8e4m3fn", 8, "float8 e4m3, finite only.";
    F8E4M3FNUZ = 18, "f8e4m3fnuz", 8, "float8 e4m3, finite, no negative zero.";
    F8E5M2 = 19, "f8e5m2", 8, "float8 e5m2.";
    F8E5M2FNUZ = 20, "f8e5m2fnuz", 8, "float8 e5m2, finite, no negative zero.";
    U4 = 21, "u4", 4, "4-bit unsigned integer, two per byte.";
    I4 = 22, "i4", 4, "4-bit signed integer, two per byte.";
    F4E2M1 = 23, "f4e2m1", 4, "float4 e2m1, two per byte.";
    F8E8M0 = 24, "f8e8m0", 8, "float8 e8m0 (scale type).";
    U2 = 25, "u2", 2, "2-bit unsigned integer, four per byte.";
    I2 = 26, "i2", 2, "2-bit signed integer, four per byte.";
    F6E2M3 = 27, "f6e2m3", 6, "float6 e2m3, four per three bytes.";
    F6E3M2 = 28, "f6e3m2", 6, "float6 e3m2, four per three bytes.";
}

impl DType {
    /// The ONNX `TensorProto.DataType` code.
    pub fn code(self) -> i32 {
        self as i32
    }

    /// True for the floating-point types a precision pass reasons about (f16, bf16, f32, f64).
    pub fn is_float(self) -> bool {
        matches!(self, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
    }

    /// Bytes needed by `n` elements packed as in `raw_data` (`None` for strings).
    pub fn byte_len(self, n: usize) -> Option<usize> {
        match self.bits() {
            0 => None,
            b => Some((n * b as usize).div_ceil(8)),
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.short_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_names_round_trip() {
        for &d in DType::ALL {
            assert_eq!(DType::from_code(d.code()), Some(d));
            assert_eq!(DType::from_short_name(d.short_name()), Some(d));
        }
        assert_eq!(DType::from_code(0), None);
        assert_eq!(DType::from_code(29), None);
        assert_eq!(DType::U4.byte_len(3), Some(2));
        assert_eq!(DType::F6E2M3.byte_len(4), Some(3));
        assert_eq!(DType::Str.byte_len(3), None);
    }
}
