//! Sub-byte and 8-bit types: float8 (e4m3fn, e4m3fnuz, e5m2, e5m2fnuz), float4 e2m1, and 4- and 2-bit
//! integers. The executor keeps them unpacked, one code per byte ([`crate::Data::Small`]); these functions
//! decode codes to numbers, encode numbers with round-to-nearest-even (saturating or not, as ONNX Cast says),
//! and pack/unpack the ONNX storage layout (sub-byte elements low bits first).

use mpopt_ir::DType;

/// True for the types stored as [`crate::Data::Small`].
pub fn is_small(d: DType) -> bool {
    matches!(
        d,
        DType::F8E4M3FN
            | DType::F8E4M3FNUZ
            | DType::F8E5M2
            | DType::F8E5M2FNUZ
            | DType::F4E2M1
            | DType::F8E8M0
            | DType::I4
            | DType::U4
            | DType::I2
            | DType::U2
    )
}

/// True for the small integer types.
pub fn is_small_int(d: DType) -> bool {
    matches!(d, DType::I4 | DType::U4 | DType::I2 | DType::U2)
}

/// Bits per element.
fn bits(d: DType) -> u32 {
    match d {
        DType::I4 | DType::U4 | DType::F4E2M1 => 4,
        DType::I2 | DType::U2 => 2,
        _ => 8,
    }
}

/// Exponent bits, mantissa bits, bias, and whether the format is "fnuz" (0x80 is NaN, no -0).
fn layout(d: DType) -> (u32, u32, i32, bool) {
    match d {
        DType::F8E4M3FN => (4, 3, 7, false),
        DType::F8E4M3FNUZ => (4, 3, 8, true),
        DType::F8E5M2 => (5, 2, 15, false),
        DType::F8E5M2FNUZ => (5, 2, 16, true),
        _ => (2, 1, 1, false), // F4E2M1
    }
}

/// The value of a small-float code (NaN, +-inf where the format has them).
pub fn decode_float(d: DType, c: u8) -> f64 {
    if d == DType::F8E8M0 {
        return if c == 0xFF {
            f64::NAN
        } else {
            2f64.powi(c as i32 - 127)
        };
    }
    let (e_bits, m_bits, bias, fnuz) = layout(d);
    let total = 1 + e_bits + m_bits;
    let sign_bit = 1u8 << (total - 1);
    if fnuz && c == 0x80 {
        return f64::NAN;
    }
    let neg = c & sign_bit != 0;
    let e = ((c >> m_bits) as u32) & ((1 << e_bits) - 1);
    let m = (c as u32) & ((1 << m_bits) - 1);
    let emax = (1 << e_bits) - 1;
    match d {
        DType::F8E4M3FN if e == emax && m == (1 << m_bits) - 1 => return f64::NAN,
        DType::F8E5M2 if e == emax => {
            return if m == 0 {
                if neg {
                    f64::NEG_INFINITY
                } else {
                    f64::INFINITY
                }
            } else {
                f64::NAN
            };
        }
        _ => {}
    }
    let frac = m as f64 / (1u32 << m_bits) as f64;
    let v = if e == 0 {
        frac * 2f64.powi(1 - bias)
    } else {
        (1.0 + frac) * 2f64.powi(e as i32 - bias)
    };
    if neg { -v } else { v }
}

/// The largest finite value.
fn max_finite(d: DType) -> f64 {
    match d {
        DType::F8E4M3FN => 448.0,
        DType::F8E4M3FNUZ => 240.0,
        DType::F8E5M2 | DType::F8E5M2FNUZ => 57344.0,
        _ => 6.0,
    }
}

/// Encodes a number: NaN to the format's NaN, out-of-range values to +-max when `saturate` (float4 always
/// saturates), else to inf (e5m2) or NaN; in range, round to nearest with ties to the even code.
pub fn encode_float(d: DType, x: f64, saturate: bool) -> u8 {
    let (e_bits, m_bits, _, fnuz) = layout(d);
    let total = 1 + e_bits + m_bits;
    let sign_bit = 1u8 << (total - 1);
    let nan = match d {
        DType::F8E4M3FN => 0x7F,
        DType::F8E5M2 => 0x7F,
        DType::F4E2M1 => 0x8,
        _ => 0x80,
    };
    if x.is_nan() {
        return nan;
    }
    let neg = x.is_sign_negative();
    let a = x.abs();
    let max = max_finite(d);
    let sat = saturate || d == DType::F4E2M1;
    // Positive codes in increasing value order (all finite codes with the sign bit clear).
    let positives: Vec<(u8, f64)> = (0..sign_bit)
        .map(|c| (c, decode_float(d, c)))
        .filter(|(_, v)| v.is_finite())
        .collect();
    let with_sign = |c: u8| {
        if neg && !(fnuz && c == 0) {
            c | sign_bit
        } else {
            c
        }
    };
    let top = positives.last().expect("formats have finite values");
    let prev = positives[positives.len() - 2].1;
    if a.is_infinite() || a >= max + (max - prev) / 2.0 {
        if sat {
            return with_sign(top.0);
        }
        return match d {
            DType::F8E5M2 => with_sign(0x7C),
            _ => nan,
        };
    }
    // Nearest, ties to the even code.
    let i = positives.partition_point(|(_, v)| *v < a);
    let pick = if i == 0 {
        positives[0].0
    } else if i == positives.len() {
        top.0
    } else {
        let (lo, hi) = (positives[i - 1], positives[i]);
        let (dl, dh) = (a - lo.1, hi.1 - a);
        if dl < dh || (dl == dh && lo.0 & 1 == 0) {
            lo.0
        } else {
            hi.0
        }
    };
    with_sign(pick)
}

/// Encodes to float8 e8m0 (a power of two; the sign is dropped) from the f32 bits, as ONNX's reference does:
/// `mode` "up" rounds any fraction up, "down" truncates, "nearest" rounds to nearest even; NaN and inf become
/// 0xFF; with `saturate` rounding never goes past the largest exponent.
pub fn encode_e8m0(x: f32, saturate: bool, mode: &str) -> u8 {
    let bits = x.to_bits();
    let e = (bits >> 23) & 0xFF;
    if e == 0xFF {
        return 0xFF;
    }
    let round_up = match mode {
        "nearest" => {
            let g = bits & 0x40_0000 != 0;
            let r = bits & 0x20_0000 != 0;
            let s = bits & 0x1F_FFFF != 0;
            g && (r || s || e > 0)
        }
        "down" => false,
        _ => bits & 0x7F_FFFF != 0,
    };
    let inc = round_up && !(saturate && e == 0xFE);
    (e + inc as u32) as u8
}

/// The value of a small-integer code.
pub fn decode_int(d: DType, c: u8) -> i64 {
    let b = bits(d);
    let mask = (1u16 << b) as u8 - 1;
    let c = c & mask;
    match d {
        DType::I4 | DType::I2 => {
            let sign = 1u8 << (b - 1);
            if c & sign != 0 {
                c as i64 - (1i64 << b)
            } else {
                c as i64
            }
        }
        _ => c as i64,
    }
}

/// Encodes an integer by wrapping to the type's width (two's complement), as a C cast does.
pub fn encode_int(d: DType, x: i64) -> u8 {
    let mask = (1i64 << bits(d)) - 1;
    (x & mask) as u8
}

/// Unpacks ONNX storage (`raw_data`, or `int32_data` bytes) into one code per element.
pub fn unpack(d: DType, bytes: &[u8], n: usize) -> Vec<u8> {
    match bits(d) {
        8 => bytes[..n].to_vec(),
        b => {
            let per = (8 / b) as usize;
            let mask = ((1u16 << b) - 1) as u8;
            (0..n)
                .map(|i| (bytes[i / per] >> ((i % per) as u32 * b)) & mask)
                .collect()
        }
    }
}

/// Packs codes into ONNX storage.
pub fn pack(d: DType, codes: &[u8]) -> Vec<u8> {
    match bits(d) {
        8 => codes.to_vec(),
        b => {
            let per = (8 / b) as usize;
            let mut out = vec![0u8; codes.len().div_ceil(per)];
            for (i, &c) in codes.iter().enumerate() {
                out[i / per] |= (c & (((1u16 << b) - 1) as u8)) << ((i % per) as u32 * b);
            }
            out
        }
    }
}

/// Numbers of a small tensor as f64.
pub fn to_f64s(d: DType, codes: &[u8]) -> Vec<f64> {
    if is_small_int(d) {
        codes.iter().map(|&c| decode_int(d, c) as f64).collect()
    } else {
        codes.iter().map(|&c| decode_float(d, c)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float8_round_trips_every_code_and_rounds_to_even() {
        for d in [
            DType::F8E4M3FN,
            DType::F8E4M3FNUZ,
            DType::F8E5M2,
            DType::F8E5M2FNUZ,
        ] {
            for c in 0..=255u8 {
                let v = decode_float(d, c);
                if v.is_nan()
                    || (v == 0.0 && c != 0 && (d == DType::F8E4M3FNUZ || d == DType::F8E5M2FNUZ))
                {
                    continue;
                }
                assert_eq!(encode_float(d, v, false), c, "{d} code {c:#x} = {v}");
            }
        }
        assert_eq!(decode_float(DType::F8E4M3FN, 0x7E), 448.0);
        assert_eq!(encode_float(DType::F8E4M3FN, 1e6, true), 0x7E);
        assert_eq!(encode_float(DType::F8E5M2, 1e6, false), 0x7C);
        assert!(decode_float(DType::F8E4M3FN, encode_float(DType::F8E4M3FN, 1e6, false)).is_nan());
        // float4: 0.25 is halfway between 0 and 0.5 and goes to the even code (0); 9 saturates to 6.
        assert_eq!(
            decode_float(DType::F4E2M1, encode_float(DType::F4E2M1, 0.25, false)),
            0.0
        );
        assert_eq!(
            decode_float(DType::F4E2M1, encode_float(DType::F4E2M1, 9.0, false)),
            6.0
        );
    }

    #[test]
    fn small_ints_wrap_and_pack_low_bits_first() {
        assert_eq!(decode_int(DType::I4, encode_int(DType::I4, -9)), 7);
        assert_eq!(decode_int(DType::U2, encode_int(DType::U2, -3)), 1);
        let codes = [1u8, 2, 3, 0, 1];
        assert_eq!(unpack(DType::U2, &pack(DType::U2, &codes), 5), codes);
        assert_eq!(pack(DType::I4, &[0x1, 0x2, 0x3]), vec![0x21, 0x3]);
    }
}
