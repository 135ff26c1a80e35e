//! f32 <-> f16 slice conversions, with F16C in one loop where the CPU has it.
//!
//! `half`'s slice conversions use the same instructions (`vcvtps2ph` with round-to-nearest-even,
//! `vcvtph2ps`), but call a function for every 8 values, through arrays in memory. In the executor those
//! calls were 16% of an accuracy search on ppocrv4_rec (every f16 op widens its inputs and rounds its
//! outputs), and 5% of converting vit_tiny's weights. Here the loop itself is compiled for F16C, so each
//! 8 values are one load, one conversion and one store. The results are bit for bit those of `half`
//! (the same instruction; the tail goes through it too, padded to 8), and `half`'s own conversions are
//! used where the CPU lacks F16C.
//!
//! ```
//! use half::f16;
//! let x = [1.0f32, 65504.0, 65520.0, 1e-8, -0.5, 3.14159, 7.0, 8.0, 9.0];
//! let mut h = [f16::ZERO; 9];
//! mpopt_ir::halfconv::f32_to_f16(&x, &mut h);
//! assert_eq!(h[1], f16::MAX);
//! assert!(h[2].is_infinite()); // past the largest finite f16, rounding goes to infinity
//! let mut back = [0f32; 9];
//! mpopt_ir::halfconv::f16_to_f32(&h, &mut back);
//! assert_eq!(back[4], -0.5);
//! ```

use half::f16;

/// Rounds `src` to f16 (round to nearest, ties to even) into `dst`, element by element.
///
/// # Panics
/// When the slices' lengths differ.
pub fn f32_to_f16(src: &[f32], dst: &mut [f16]) {
    convert(src, dst)
}

/// Widens `src` to f32 into `dst` (exact), element by element.
///
/// # Panics
/// When the slices' lengths differ.
pub fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
    convert(src, dst)
}

/// [`f32_to_f16`] into a new vector, written once (never zero-filled first).
pub fn f32_to_f16_vec(src: &[f32]) -> Vec<f16> {
    convert_vec(src)
}

/// [`f16_to_f32`] into a new vector, written once (never zero-filled first).
pub fn f16_to_f32_vec(src: &[f16]) -> Vec<f32> {
    convert_vec(src)
}

/// [`f32_to_f16`] into uninitialized memory (a piece of a vector's spare capacity, written in parallel by
/// the caller); every element of `dst` is written.
///
/// # Panics
/// When the slices' lengths differ.
pub fn f32_to_f16_uninit(src: &[f32], dst: &mut [std::mem::MaybeUninit<f16>]) {
    convert_uninit(src, dst)
}

/// [`f16_to_f32`] into uninitialized memory; every element of `dst` is written.
///
/// # Panics
/// When the slices' lengths differ.
pub fn f16_to_f32_uninit(src: &[f16], dst: &mut [std::mem::MaybeUninit<f32>]) {
    convert_uninit(src, dst)
}

/// Little-endian f32 bytes at any alignment (`src`) to little-endian f16 bytes (`dst`, uninitialized
/// allowed; every byte is written), rounded to nearest even as [`f32_to_f16`], with finite values past f16's
/// largest finite value (65504) made that value with their sign instead of infinity. One F16C loop where the
/// CPU has it: the save converts narrowed weights with it (see [`crate::Narrowed`]).
///
/// # Panics
/// When `src` does not hold exactly twice `dst`'s bytes, or an odd number of them.
pub fn f32_bytes_to_f16_clamped(src: &[u8], dst: &mut [std::mem::MaybeUninit<u8>]) {
    check_narrowing(src, dst);
    #[cfg(all(target_arch = "x86_64", target_endian = "little"))]
    if f16c() {
        // SAFETY: the CPU has AVX and F16C (checked just above); `src` holds `dst.len() / 2` f32 and `dst`
        // as many f16, both read and written unaligned
        unsafe { x86::to_f16_clamped(src.as_ptr(), dst.as_mut_ptr().cast(), src.len() / 4) };
        return;
    }
    f32_bytes_to_f16_clamped_portable(src, dst)
}

/// The lengths the clamped narrowings need: whole f32 in `src`, half their bytes in `dst`.
fn check_narrowing(src: &[u8], dst: &[std::mem::MaybeUninit<u8>]) {
    assert!(
        src.len() == dst.len() * 2 && src.len().is_multiple_of(4),
        "halfconv: {} bytes of f32 into {}",
        src.len(),
        dst.len()
    );
}

/// [`f32_bytes_to_f16_clamped`] with `half`'s conversion, where the CPU lacks F16C.
fn f32_bytes_to_f16_clamped_portable(src: &[u8], dst: &mut [std::mem::MaybeUninit<u8>]) {
    clamped_blocks(
        src,
        dst,
        half::slice::HalfFloatSliceExt::convert_from_f32_slice,
        f16::to_bits,
        f16::INFINITY.to_bits(),
    )
}

/// [`f32_bytes_to_f16_clamped`] to bf16 (`half`'s rounding, to nearest even), finite values past bf16's
/// largest finite value made that value with their sign.
///
/// # Panics
/// As [`f32_bytes_to_f16_clamped`].
pub fn f32_bytes_to_bf16_clamped(src: &[u8], dst: &mut [std::mem::MaybeUninit<u8>]) {
    check_narrowing(src, dst);
    clamped_blocks(
        src,
        dst,
        half::slice::HalfFloatSliceExt::convert_from_f32_slice,
        half::bf16::to_bits,
        half::bf16::INFINITY.to_bits(),
    )
}

/// Little-endian f32 bytes at any alignment to a 16-bit float's little-endian bits, block by block on the
/// stack: `convert` rounds a block; a finite input that rounded to infinity (`inf`, either sign) becomes
/// the largest finite value with its sign, which in both f16 and bf16 is the bits just below infinity's.
fn clamped_blocks<T: Copy + Default>(
    src: &[u8],
    dst: &mut [std::mem::MaybeUninit<u8>],
    convert: impl Fn(&mut [T], &[f32]),
    bits: impl Fn(T) -> u16,
    inf: u16,
) {
    const BLOCK: usize = 1024;
    let (mut xs, mut hs) = ([0f32; BLOCK], [T::default(); BLOCK]);
    for (s, d) in src.chunks(BLOCK * 4).zip(dst.chunks_mut(BLOCK * 2)) {
        let k = s.len() / 4;
        for (x, c) in xs.iter_mut().zip(s.chunks_exact(4)) {
            *x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        convert(&mut hs[..k], &xs[..k]);
        for ((o, &h), &x) in d.chunks_exact_mut(2).zip(&hs[..k]).zip(&xs[..k]) {
            let b = bits(h);
            let b = if b & 0x7fff == inf && x.is_finite() {
                (inf - 1) | (b & 0x8000)
            } else {
                b
            };
            let [lo, hi] = b.to_le_bytes();
            o[0].write(lo);
            o[1].write(hi);
        }
    }
}

/// A slice converted by `convert` (a slice conversion: `half`'s bf16 ones, or one of these) into a new
/// vector, through a block on the stack: the vector is written once, never zero-filled first (that
/// `memset` cost as much as the conversion on the accuracy search's per-node pass).
pub fn blocks<S: Copy, D: Copy + Default>(src: &[S], convert: impl Fn(&[S], &mut [D])) -> Vec<D> {
    const BLOCK: usize = 1024;
    let mut out = Vec::with_capacity(src.len());
    let mut buf = [D::default(); BLOCK];
    for c in src.chunks(BLOCK) {
        convert(c, &mut buf[..c.len()]);
        out.extend_from_slice(&buf[..c.len()]);
    }
    out
}

/// One direction of conversion: F16C's loop where the CPU has it, `half`'s slice conversion elsewhere.
trait Direction: Copy + Default {
    type To: Copy + Default;
    /// `half`'s conversion.
    fn fallback(src: &[Self], dst: &mut [Self::To]);
    /// F16C's loop.
    ///
    /// # Safety
    /// The CPU has AVX and F16C; `src` is readable and `dst` writable for `n` elements, and they do not
    /// overlap (`dst` may be uninitialized).
    #[cfg(target_arch = "x86_64")]
    unsafe fn f16c(src: *const Self, dst: *mut Self::To, n: usize);
}

impl Direction for f32 {
    type To = f16;
    fn fallback(src: &[f32], dst: &mut [f16]) {
        half::slice::HalfFloatSliceExt::convert_from_f32_slice(dst, src)
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn f16c(src: *const f32, dst: *mut f16, n: usize) {
        // SAFETY: the caller's contract
        unsafe { x86::to_f16(src, dst, n) }
    }
}

impl Direction for f16 {
    type To = f32;
    fn fallback(src: &[f16], dst: &mut [f32]) {
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, dst)
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn f16c(src: *const f16, dst: *mut f32, n: usize) {
        // SAFETY: the caller's contract
        unsafe { x86::to_f32(src, dst, n) }
    }
}

fn convert<S: Direction>(src: &[S], dst: &mut [S::To]) {
    assert_eq!(src.len(), dst.len(), "halfconv: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if f16c() {
        // SAFETY: the CPU has AVX and F16C (checked just above); both slices hold `src.len()` elements
        unsafe { S::f16c(src.as_ptr(), dst.as_mut_ptr(), src.len()) };
        return;
    }
    S::fallback(src, dst)
}

fn convert_vec<S: Direction>(src: &[S]) -> Vec<S::To> {
    let mut v = Vec::with_capacity(src.len());
    convert_uninit(src, &mut v.spare_capacity_mut()[..src.len()]);
    // SAFETY: `convert_uninit` wrote all `src.len()` elements
    unsafe { v.set_len(src.len()) };
    v
}

fn convert_uninit<S: Direction>(src: &[S], dst: &mut [std::mem::MaybeUninit<S::To>]) {
    assert_eq!(src.len(), dst.len(), "halfconv: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if f16c() {
        // SAFETY: the CPU has AVX and F16C; `dst` holds `src.len()` writable elements (uninitialized is
        // allowed: the loop only writes them)
        unsafe { S::f16c(src.as_ptr(), dst.as_mut_ptr().cast(), src.len()) };
        return;
    }
    const BLOCK: usize = 1024;
    let mut buf = [S::To::default(); BLOCK];
    for (s, d) in src.chunks(BLOCK).zip(dst.chunks_mut(BLOCK)) {
        S::fallback(s, &mut buf[..s.len()]);
        for (o, &v) in d.iter_mut().zip(&buf[..s.len()]) {
            o.write(v);
        }
    }
}

/// Whether the CPU converts with F16C (the check is cached by the standard library: one atomic load).
#[cfg(target_arch = "x86_64")]
fn f16c() -> bool {
    std::is_x86_feature_detected!("f16c") && std::is_x86_feature_detected!("avx")
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use half::f16;
    use std::arch::x86_64::{
        __m128i, _MM_FROUND_TO_NEAREST_INT, _mm_loadu_si128, _mm_storeu_si128, _mm256_cvtph_ps,
        _mm256_cvtps_ph, _mm256_loadu_ps, _mm256_storeu_ps,
    };

    /// `step` (8 elements from `s` to `d`) over `n` elements, the tail through a padded step.
    ///
    /// # Safety
    /// As [`super::Direction::f16c`]; `step` reads 8 elements at `s` and writes 8 at `d`.
    #[inline(always)]
    unsafe fn steps<S: Copy + Default, D: Copy + Default>(
        src: *const S,
        dst: *mut D,
        n: usize,
        step: impl Fn(*const S, *mut D),
    ) {
        let whole = n / 8 * 8;
        for i in (0..whole).step_by(8) {
            // SAFETY: `i + 8 <= n`
            step(unsafe { src.add(i) }, unsafe { dst.add(i) });
        }
        if whole < n {
            let (mut s, mut d) = ([S::default(); 8], [D::default(); 8]);
            // SAFETY: the `n - whole` (< 8) elements from `whole` are within both buffers
            unsafe {
                std::ptr::copy_nonoverlapping(src.add(whole), s.as_mut_ptr(), n - whole);
                step(s.as_ptr(), d.as_mut_ptr());
                std::ptr::copy_nonoverlapping(d.as_ptr(), dst.add(whole), n - whole);
            }
        }
    }

    /// Rounds `n` f32 at `src` to f16 at `dst`.
    ///
    /// # Safety
    /// As [`super::Direction::f16c`].
    #[target_feature(enable = "avx,f16c")]
    pub(super) unsafe fn to_f16(src: *const f32, dst: *mut f16, n: usize) {
        // SAFETY: the caller's contract; each step reads 8 f32 and writes 8 f16 (16 bytes), unaligned
        unsafe {
            steps(src, dst, n, |s, d| {
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(s));
                _mm_storeu_si128(d.cast::<__m128i>(), h);
            })
        }
    }

    /// [`super::f32_bytes_to_f16_clamped`]: `n` little-endian f32 at `src` to f16 at `dst`.
    ///
    /// # Safety
    /// The CPU has AVX and F16C; `src` is readable for `4 * n` bytes and `dst` writable for `2 * n`, at any
    /// alignment, and they do not overlap.
    #[target_feature(enable = "avx,f16c")]
    pub(super) unsafe fn to_f16_clamped(src: *const u8, dst: *mut u8, n: usize) {
        use std::arch::x86_64::*;
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let (max, inf) = (_mm256_set1_ps(65504.0), _mm256_set1_ps(f32::INFINITY));
        let step = |x: __m256| {
            // finite and past 65504 (ordered compares: NaN is neither): 65504 with x's sign
            let a = _mm256_and_ps(x, abs);
            let over = _mm256_and_ps(
                _mm256_cmp_ps::<_CMP_GT_OQ>(a, max),
                _mm256_cmp_ps::<_CMP_LT_OQ>(a, inf),
            );
            let clamped = _mm256_or_ps(_mm256_andnot_ps(abs, x), max);
            _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_blendv_ps(x, clamped, over))
        };
        // SAFETY: the caller's contract, in 4- and 2-byte elements (alignment 1); each step reads 8 f32 and
        // writes 8 f16, unaligned
        unsafe {
            steps(src.cast::<[u8; 4]>(), dst.cast::<[u8; 2]>(), n, |s, d| {
                _mm_storeu_si128(d.cast(), step(_mm256_loadu_ps(s.cast())));
            })
        }
    }

    /// Widens `n` f16 at `src` to f32 at `dst`.
    ///
    /// # Safety
    /// As [`super::Direction::f16c`].
    #[target_feature(enable = "avx,f16c")]
    pub(super) unsafe fn to_f32(src: *const f16, dst: *mut f32, n: usize) {
        // SAFETY: the caller's contract; each step reads 8 f16 (16 bytes) and writes 8 f32, unaligned
        unsafe {
            steps(src, dst, n, |s, d| {
                _mm256_storeu_ps(d, _mm256_cvtph_ps(_mm_loadu_si128(s.cast::<__m128i>())));
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every f16 bit pattern widens as `half` widens it, and rounds back to itself (NaNs: to a NaN);
    /// f32 values around every f16 (halfway points, just above and below, overflow, subnormals)
    /// round as `half`'s scalar conversion rounds them. Lengths 0..=17 cover the padded tails.
    #[test]
    fn matches_half_bit_for_bit() {
        let all: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
        let mut wide = vec![0f32; all.len()];
        f16_to_f32(&all, &mut wide);
        for (h, w) in all.iter().zip(&wide) {
            assert_eq!(h.to_f32().to_bits(), w.to_bits(), "{:#06x}", h.to_bits());
        }
        let mut back = vec![f16::ZERO; all.len()];
        f32_to_f16(&wide, &mut back);
        for (h, b) in all.iter().zip(&back) {
            if h.is_nan() {
                assert!(b.is_nan());
            } else {
                assert_eq!(h.to_bits(), b.to_bits());
            }
        }
        let mut probes = Vec::new();
        for w in wide.iter().filter(|w| w.is_finite()) {
            let b = w.to_bits();
            probes.extend([
                *w,
                f32::from_bits(b.wrapping_add(1)),
                f32::from_bits(b.wrapping_sub(1)),
                f32::from_bits(b.wrapping_add(1 << 12)),
                f32::from_bits(b.wrapping_add(1 << 13)),
            ]);
        }
        probes.extend([
            65504.0,
            65519.99,
            65520.0,
            1e9,
            -1e9,
            f32::INFINITY,
            5.96e-8,
            2.98e-8,
        ]);
        let mut ours = vec![f16::ZERO; probes.len()];
        f32_to_f16(&probes, &mut ours);
        for (x, h) in probes.iter().zip(&ours) {
            if x.is_nan() {
                assert!(h.is_nan());
            } else {
                assert_eq!(f16::from_f32(*x).to_bits(), h.to_bits(), "{x:e}");
            }
        }
        for n in 0..=17 {
            let x: Vec<f32> = (0..n).map(|i| i as f32 * 0.3 - 2.0).collect();
            let mut h = vec![f16::ZERO; n];
            f32_to_f16(&x, &mut h);
            let mut w = vec![0f32; n];
            f16_to_f32(&h, &mut w);
            for i in 0..n {
                assert_eq!(h[i], f16::from_f32(x[i]), "length {n}, element {i}");
                assert_eq!(w[i], h[i].to_f32());
            }
            assert_eq!(f32_to_f16_vec(&x), h);
            assert_eq!(f16_to_f32_vec(&h), w);
            let mut hu = vec![std::mem::MaybeUninit::new(f16::NAN); n];
            f32_to_f16_uninit(&x, &mut hu);
            let mut wu = vec![std::mem::MaybeUninit::new(f32::NAN); n];
            f16_to_f32_uninit(&h, &mut wu);
            for i in 0..n {
                // SAFETY: initialized with NaN above, and overwritten by the conversions
                let (hi, wi) = unsafe { (hu[i].assume_init(), wu[i].assume_init()) };
                assert_eq!(
                    (hi.to_bits(), wi.to_bits()),
                    (h[i].to_bits(), w[i].to_bits())
                );
            }
        }
    }

    /// The F16C loop and the portable one give the same bytes (NaNs: a NaN), at any alignment and length.
    #[test]
    fn clamped_narrowing_is_the_same_with_and_without_f16c() {
        let mut xs: Vec<f32> = vec![
            65504.0,
            65519.99,
            65520.0,
            -7e4,
            f32::MAX,
            f32::INFINITY,
            1e-9,
        ];
        xs.extend((0..2100).map(|i| (i as f32 - 1000.0) * 77.3));
        xs.push(f32::NAN);
        let bytes: Vec<u8> = xs.iter().flat_map(|x| x.to_le_bytes()).collect();
        for n in [0, 1, 7, 8, 9, 1025, xs.len()] {
            for off in 0..4 {
                let mut buf = vec![0u8; off];
                buf.extend_from_slice(&bytes[..4 * n]);
                let src = &buf[off..];
                let mut a = vec![std::mem::MaybeUninit::new(0xAAu8); 2 * n];
                let mut b = vec![std::mem::MaybeUninit::new(0x55u8); 2 * n];
                f32_bytes_to_f16_clamped(src, &mut a);
                f32_bytes_to_f16_clamped_portable(src, &mut b);
                for i in 0..n {
                    // SAFETY: initialized above, and written by both conversions
                    let (ha, hb) = unsafe {
                        (
                            f16::from_le_bytes([
                                a[2 * i].assume_init(),
                                a[2 * i + 1].assume_init(),
                            ]),
                            f16::from_le_bytes([
                                b[2 * i].assume_init(),
                                b[2 * i + 1].assume_init(),
                            ]),
                        )
                    };
                    if xs[i].is_nan() {
                        assert!(ha.is_nan() && hb.is_nan());
                    } else {
                        assert_eq!(ha.to_bits(), hb.to_bits(), "n {n} offset {off} element {i}");
                        assert!(!ha.is_infinite() || xs[i].is_infinite());
                    }
                }
            }
        }
    }
}
