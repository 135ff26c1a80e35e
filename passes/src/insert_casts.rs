//! `insert-casts`: makes the graph agree with the precision decisions.
//!
//! **What.**
//! - A node decided low has its float32 data outputs retyped to the target. Its dtype-carrying attributes
//!   follow: Cast `to`, ConstantOfShape `value`, Random*, EyeLike and Bernoulli `dtype`, the windows' and
//!   MelWeightMatrix's `output_datatype`, and a Constant's `value`; only for a node that made float32 (a
//!   model's own Cast to f16 or f64 keeps its `to`).
//! - Every input then gets the dtype its node needs:
//!   - the target for the data type parameters of a low node;
//!   - the original dtype otherwise (shape-like and fixed-float32 inputs, fp32 nodes);
//!   - except that a parameter only inputs name (Shape, ArgMax, IsNaN, Equal, ...) reads a low value as it
//!     is (widening it would change nothing), unless onnx ties the output's type to it or the input's dtype
//!     is the result (`type_tied`: BitCast, RMSNormalization, ...).
//! - Where a value's dtype differs from what a consumer needs:
//!   - an initializer or Constant is converted once: in place when every use wants the new dtype, copied when
//!     fp32 and low consumers both need it. Clamping and flushing are reported per tensor, never silent.
//!     f32 `raw_data` of more than 4,096 values is measured here and becomes `TensorData::Narrowed`: the save
//!     converts it straight into the file (the same bits; see `mpopt_ir::Narrowed`);
//!   - any other value gets one Cast per (value, dtype), shared by all its consumers and placed before the
//!     first of them;
//!   - except a model's own `Cast(x) {to = FLOAT}` made low: its float32 readers get `x` (through one
//!     `Cast(x) {to = FLOAT}` when `x` is not float32), the value the original computed, instead of the
//!     rounded one widened back (f32 -> f16 -> f32).
//! - Graph outputs keep their original dtype and name (a Cast back, under the original name). Subgraph outputs
//!   always do, since If/Loop/Scan interfaces are unchanged; with `--io-types low`, the top graph's inputs
//!   and outputs become the target type instead: each lowered input feeds one Cast back to float32 that its
//!   readers take (`fuse-casts` cancels it before low readers; a low node's slot whose parameter only inputs
//!   name reads the input itself), each float32 output gets a Cast to the target.
//! - A model with no default-domain import (ai.onnx.ml only) that now has Casts imports it.
//!
//! **Invariants.**
//! - Runs after `assign-precision` and does nothing where no decision is low.
//! - Never changes a value silently: every conversion is a Cast node or a reported data conversion.
//! - Captured values keep their outer dtype; a subgraph that needs another one casts inside.
//! - Every new value name is unused anywhere in the model, subgraphs included (ONNX forbids a subgraph to
//!   redefine an outer name).
//!
//! ```text
//! before: %h = MatMul(%x, %w) ; prec f16          after: %w = const f16[16,4]  (converted in place)
//!         %y = Softmax(%h)    ; prec f32                 %x__f16 = Cast(%x) {to = 10}
//!                                                        %h = MatMul(%x__f16, %w) : f16[N,4]
//!                                                        %h__f32 = Cast(%h) {to = 1}
//!                                                        %y = Softmax(%h__f32)
//! ```

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

use bytes::Bytes;
use mpopt_ir::schema::{TypeSpec, registry};
use mpopt_ir::{
    AttrValue, Attribute, DType, Def, Graph, Model, Node, NodeId, Opsets, Tensor, TensorData, Type,
    TypeInfo, Use, ValueId,
};

use crate::assign_precision::{data_params, max_finite};
use crate::{Pass, PassError, PassOutcome, Record};

/// Which graph inputs and outputs may change dtype.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum IoTypes {
    /// Inputs and outputs keep their dtypes (the default).
    #[default]
    Keep,
    /// Float32 inputs and outputs become the target type.
    Low,
    /// These inputs and outputs become the target type; the others keep theirs.
    Names(Vec<String>),
}

/// The pass.
pub struct InsertCasts {
    target: DType,
    io: IoTypes,
    /// Large f32 weights become [`TensorData::Narrowed`] (converted when saved) instead of converted here.
    defer: bool,
}

impl InsertCasts {
    /// A pass converting to `target` with this I/O policy.
    pub fn new(target: DType, io: IoTypes) -> InsertCasts {
        InsertCasts {
            target,
            io,
            defer: true,
        }
    }

    /// Converts every weight here, in parallel, instead of leaving the large ones to the save: for a model
    /// that is run rather than saved (the accuracy search's candidates), where the executor would convert
    /// each narrowed weight on its own, on one core (open_nsfw's search: 1.07 -> 1.23 s).
    pub fn converting_now(mut self) -> InsertCasts {
        self.defer = false;
        self
    }
}

impl Default for InsertCasts {
    fn default() -> Self {
        InsertCasts::new(DType::F16, IoTypes::Keep)
    }
}

#[derive(Default)]
struct Out {
    casts: u64,
    converted: u64,
    copied: u64,
    outputs_cast_back: u64,
    /// float32 readers of a low model Cast given that Cast's source (see [`original_float_source`])
    cast_sources: u64,
    records: Vec<Record>,
    /// Every value name in the model, new ones included: a new name is used nowhere (a subgraph may not
    /// redefine an outer name).
    taken: Taken,
    /// [`InsertCasts::defer`].
    defer: bool,
    /// Converted tensors that had values clamped ([`Changed`]).
    clamped: Changed,
    /// Converted tensors that had non-zero values become zero.
    flushed: Changed,
}

/// Tensors whose conversion changed some values beyond rounding: how many, the values, the first names.
#[derive(Default)]
struct Changed {
    tensors: u64,
    values: u64,
    names: Vec<String>,
}

impl Changed {
    /// Names a note lists before it says "...".
    const NAMES: usize = 3;

    fn add(&mut self, values: usize, name: &str) {
        if values > 0 {
            self.tensors += 1;
            self.values += values as u64;
            if self.names.len() < Self::NAMES {
                self.names.push(name.to_string());
            }
        }
    }

    /// "N value(s) in M converted tensor(s) ('a', 'b', ...)".
    fn describe(&self, what: &str) -> String {
        let mut names: Vec<String> = self.names.iter().map(|n| format!("'{n}'")).collect();
        if self.tensors > self.names.len() as u64 {
            names.push("...".into());
        }
        format!(
            "{} {what}value(s) in {} converted tensor(s) ({})",
            self.values,
            self.tensors,
            names.join(", ")
        )
    }
}

impl Out {
    /// Records a conversion's statistics in the pass's totals (`name`: the initializer, or the node).
    fn tally(&mut self, c: &Change, name: &str) {
        self.clamped.add(c.clamped, name);
        self.flushed.add(c.flushed, name);
    }

    /// The notes that say what the conversions changed beyond rounding, so that it is never silent (the
    /// report's records give every tensor's figures).
    fn change_notes(&self, to: DType) -> Vec<String> {
        let mut notes = Vec::new();
        if self.clamped.values > 0 {
            notes.push(format!(
                "{} lay beyond the {to} range and were clamped to its largest finite value",
                self.clamped.describe("")
            ));
        }
        if self.flushed.values > 0 {
            notes.push(format!(
                "{} became zero in {to}",
                self.flushed.describe("non-zero ")
            ));
        }
        notes
    }
}

fn elem(g: &Graph, v: ValueId) -> Option<DType> {
    g.value(v).elem()
}

fn set_elem(g: &mut Graph, v: ValueId, d: DType) {
    if let Some(TypeInfo {
        ty: Type::Tensor { elem, .. },
        ..
    }) = &mut g.value_mut(v).ty
    {
        *elem = Some(d);
    }
}

/// A new value `name` of `v`'s type, with element type `d`.
fn retyped_value(g: &mut Graph, v: ValueId, d: DType, name: String) -> Result<ValueId, String> {
    let mut ty = g.value(v).ty.clone();
    if let Some(TypeInfo {
        ty: Type::Tensor { elem, .. },
        ..
    }) = &mut ty
    {
        *elem = Some(d);
    }
    g.add_value(name, ty).map_err(|e| e.to_string())
}

/// A Cast to `d` named `name`, undecided (it is not a node of the model's).
pub(crate) fn cast_node(name: String, d: DType) -> Node {
    let mut cast = Node::new("Cast");
    cast.name = name;
    cast.attributes
        .push(Attribute::new("to", AttrValue::Int(d.code() as i64)));
    cast.precision = None;
    cast
}

/// A converted tensor and the statistics the report gives for it.
type Converted = (Tensor, Change);

/// What converting one tensor changed: the report's figures for it. Equal when the report's figures are
/// (the element-by-element path measures the change in f64, the block paths in f32).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Change {
    elements: usize,
    /// Finite values beyond the type's range, set to its largest finite value (with their sign).
    clamped: usize,
    /// Non-zero values that became zero.
    flushed: usize,
    /// The largest relative change of a finite non-zero value.
    max_rel: f64,
}

impl PartialEq for Change {
    fn eq(&self, other: &Change) -> bool {
        self.fields() == other.fields()
    }
}

impl Change {
    /// The report record's fields.
    fn fields(&self) -> [(&'static str, String); 4] {
        [
            ("elements", self.elements.to_string()),
            ("clamped", self.clamped.to_string()),
            ("flushed_to_zero", self.flushed.to_string()),
            ("max_relative_change", format!("{:.3e}", self.max_rel)),
        ]
    }
}

/// `t` with the converted data `data` (of `to`), and what the conversion changed.
fn converted(t: &Tensor, to: DType, data: TensorData, change: Change) -> Converted {
    // the metadata only: cloning `t` whole copied its data first (Paddle's float_data weights)
    let out = Tensor {
        dtype: to,
        dims: t.dims.clone(),
        data,
        name: t.name.clone(),
        doc_string: t.doc_string.clone(),
        metadata_props: t.metadata_props.clone(),
        external: None,
    };
    (out, change)
}

/// Converts float data to `to`, with the statistics the report needs.
pub(crate) fn convert_tensor(t: &Tensor, to: DType) -> Option<Converted> {
    convert_f32_raw(t, to).or_else(|| convert_general(t, to))
}

/// Any float data to `to`, one element at a time (f64 data, and the types the fast path leaves).
fn convert_general(t: &Tensor, to: DType) -> Option<Converted> {
    let n = t.numel()?;
    let vals = t.values_f64(n)?;
    if vals.len() != n {
        return None;
    }
    let max = max_finite(to);
    let (mut clamped, mut flushed, mut max_rel) = (0usize, 0usize, 0f64);
    let mut raw = Vec::with_capacity(n * to.bits() as usize / 8);
    for &v in &vals {
        let x = v as f32;
        let (bits, back) = match to {
            DType::F16 => {
                let h = half::f16::from_f32(x);
                (h.to_le_bytes().to_vec(), h.to_f64())
            }
            DType::BF16 => {
                let h = half::bf16::from_f32(x);
                (h.to_le_bytes().to_vec(), h.to_f64())
            }
            DType::F32 => (x.to_le_bytes().to_vec(), x as f64),
            DType::F64 => (v.to_le_bytes().to_vec(), v),
            _ => return None,
        };
        let (bits, back) = if back.is_infinite() && v.is_finite() {
            // clamp to the largest finite value rather than produce inf
            clamped += 1;
            let c = max.copysign(v);
            match to {
                DType::F16 => (half::f16::from_f64(c).to_le_bytes().to_vec(), c),
                DType::BF16 => (half::bf16::from_f64(c).to_le_bytes().to_vec(), c),
                _ => (bits, back),
            }
        } else {
            (bits, back)
        };
        if v != 0.0 && back == 0.0 {
            flushed += 1;
        }
        if v != 0.0 && v.is_finite() {
            max_rel = max_rel.max(((back - v) / v).abs());
        }
        raw.extend_from_slice(&bits);
    }
    Some(converted(
        t,
        to,
        TensorData::Raw(Bytes::from(raw)),
        Change {
            elements: n,
            clamped,
            flushed,
            max_rel,
        },
    ))
}

/// (non-zero values that became zero, largest relative change, finite values that became infinite)
/// between `xs` and their conversions `ys`.
/// Eight lanes at a time, with selects instead of branches, so that each step is one vector operation,
/// with AVX2 where the CPU has it (the binary targets baseline x86-64; given to `pulp`'s dispatch as a
/// closure, this loop was compiled for SSE: 5% of vit's conversion).
fn change_stats(xs: &[f32], ys: &[f32]) -> (usize, f32, usize) {
    type Lanes = ([u32; 8], [f32; 8], [u32; 8]);
    #[inline(always)]
    fn step((flushed, rel, inf): &mut Lanes, x: &[f32; 8], y: &[f32; 8]) {
        for j in 0..8 {
            flushed[j] += ((x[j] != 0.0) & (y[j] == 0.0)) as u32;
            inf[j] += ((x[j].abs() < f32::INFINITY) & (y[j].abs() == f32::INFINITY)) as u32;
            // zero and non-finite inputs have no relative change (NaN or inf here): dropped
            let r = ((y[j] - x[j]) / x[j]).abs();
            let r = if r < f32::INFINITY { r } else { 0.0 };
            rel[j] = if r > rel[j] { r } else { rel[j] };
        }
    }
    #[inline(always)]
    fn all(xs: &[f32], ys: &[f32]) -> (usize, f32, usize) {
        let mut st: Lanes = ([0; 8], [0.0; 8], [0; 8]);
        let (xc, xr) = xs.as_chunks::<8>();
        let (yc, yr) = ys.as_chunks::<8>();
        for (x, y) in xc.iter().zip(yc) {
            step(&mut st, x, y);
        }
        // the tail, padded with zeros (no change)
        let (mut x, mut y) = ([0f32; 8], [0f32; 8]);
        x[..xr.len()].copy_from_slice(xr);
        y[..yr.len()].copy_from_slice(yr);
        step(&mut st, &x, &y);
        let (flushed, rel, inf) = st;
        (
            flushed.iter().map(|&f| f as usize).sum(),
            rel.iter().fold(0f32, |a, &b| a.max(b)),
            inf.iter().map(|&f| f as usize).sum(),
        )
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        unsafe fn avx2(xs: &[f32], ys: &[f32]) -> (usize, f32, usize) {
            all(xs, ys)
        }
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above)
            return unsafe { avx2(xs, ys) };
        }
    }
    all(xs, ys)
}

/// f32 to f16 and [`change_stats`] in one loop: each 8 values are rounded (F16C's `vcvtps2ph`,
/// round-to-nearest-even, as `half` and [`mpopt_ir::halfconv`]), stored, widened back and measured in
/// registers. As three passes (round, widen into a buffer, compare) the statistics' loop spent most of its
/// time packing comparison masks into bytes: 13% of converting vit_tiny. The same operations in the same
/// order: bit for bit the three passes' results (tested).
fn f16_measured(dst: &mut [half::f16], src: &[f32]) -> (usize, f32, usize) {
    assert_eq!(dst.len(), src.len(), "f16_measured: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("f16c") {
        // SAFETY: the CPU has AVX2 and F16C (checked just above); `src` holds `dst.len()` f32
        return unsafe { f16_measured_x86(dst, src.as_ptr()) };
    }
    measured_in_passes(dst, src)
}

/// [`f16_measured`] of little-endian f32 bytes read where they lie, at any alignment (`raw_data` in a
/// model's mmap is aligned for f32 one time in four; copying each block to an aligned buffer first was 6%
/// of converting vit_tiny). None where the CPU lacks AVX2 and F16C (the caller copies then).
fn f16_measured_bytes(dst: &mut [half::f16], src: &[u8]) -> Option<(usize, f32, usize)> {
    assert_eq!(
        dst.len() * 4,
        src.len(),
        "f16_measured_bytes: lengths differ"
    );
    #[cfg(all(target_arch = "x86_64", target_endian = "little"))]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("f16c") {
        // SAFETY: the CPU has AVX2 and F16C (checked just above); `src` holds `dst.len()` f32 in the
        // machine's byte order, and the loop reads them with unaligned loads
        return Some(unsafe { f16_measured_x86(dst, src.as_ptr().cast()) });
    }
    None
}

/// [`f16_measured`] with AVX2 and F16C, eight lanes a step; the tail is padded with zeros (no change).
///
/// # Safety
/// The CPU has AVX2 and F16C, and `src` points at `dst.len()` readable f32, aligned or not.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn f16_measured_x86(dst: &mut [half::f16], src: *const f32) -> (usize, f32, usize) {
    use std::arch::x86_64::*;
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let (zero, inf) = (_mm256_setzero_ps(), _mm256_set1_ps(f32::INFINITY));
    let (mut flushed, mut over, mut rel) = (_mm256_setzero_si256(), _mm256_setzero_si256(), zero);
    let mut step = |x: __m256, d: *mut __m128i| {
        let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x);
        // SAFETY: `d` points at 8 writable f16 (the caller's)
        unsafe { _mm_storeu_si128(d, h) };
        let y = _mm256_cvtph_ps(h);
        // `x != 0` is true for NaN (unordered), `y == 0` is not (ordered): as `change_stats`
        let f = _mm256_and_ps(
            _mm256_cmp_ps::<_CMP_NEQ_UQ>(x, zero),
            _mm256_cmp_ps::<_CMP_EQ_OQ>(y, zero),
        );
        let o = _mm256_and_ps(
            _mm256_cmp_ps::<_CMP_LT_OQ>(_mm256_and_ps(x, abs), inf),
            _mm256_cmp_ps::<_CMP_EQ_OQ>(_mm256_and_ps(y, abs), inf),
        );
        // a true mask is -1: subtracting it counts
        flushed = _mm256_sub_epi32(flushed, _mm256_castps_si256(f));
        over = _mm256_sub_epi32(over, _mm256_castps_si256(o));
        let r = _mm256_and_ps(_mm256_div_ps(_mm256_sub_ps(y, x), x), abs);
        // NaN and infinite changes (zero or non-finite inputs) are dropped; `max(r, rel)` is `r > rel ? r : rel`
        let r = _mm256_and_ps(r, _mm256_cmp_ps::<_CMP_LT_OQ>(r, inf));
        rel = _mm256_max_ps(r, rel);
    };
    let n = dst.len();
    let whole = n / 8 * 8;
    let (s, d) = (src, dst.as_mut_ptr().cast::<u16>());
    for i in (0..whole).step_by(8) {
        // SAFETY: `i + 8 <= n` elements behind both pointers; `_mm256_loadu_ps` takes any alignment
        unsafe { step(_mm256_loadu_ps(s.add(i)), d.add(i).cast()) };
    }
    if whole < n {
        let (mut xs, mut hs) = ([0f32; 8], [0u16; 8]);
        // SAFETY: elements `whole..n` are readable (the caller's), possibly unaligned: copied as bytes
        unsafe {
            std::ptr::copy_nonoverlapping(
                s.add(whole).cast::<u8>(),
                xs.as_mut_ptr().cast::<u8>(),
                (n - whole) * 4,
            )
        };
        // SAFETY: 8 lanes each
        step(
            unsafe { _mm256_loadu_ps(xs.as_ptr()) },
            hs.as_mut_ptr().cast(),
        );
        for (o, &h) in dst[whole..].iter_mut().zip(&hs) {
            *o = half::f16::from_bits(h);
        }
    }
    let (mut f, mut o, mut r) = ([0u32; 8], [0u32; 8], [0f32; 8]);
    // SAFETY: each array holds 8 lanes
    unsafe {
        _mm256_storeu_si256(f.as_mut_ptr().cast(), flushed);
        _mm256_storeu_si256(o.as_mut_ptr().cast(), over);
        _mm256_storeu_ps(r.as_mut_ptr(), rel);
    }
    let sum = |v: [u32; 8]| v.iter().map(|&c| c as usize).sum::<usize>();
    (sum(f), r.iter().fold(0f32, |a, &b| a.max(b)), sum(o))
}

/// The common case, fast: f32 data (`raw_data`, or `float_data` as Paddle's exporter writes its Constant
/// weights) to f16/bf16 with the `half` slice conversions (F16C where the CPU has it), in parallel blocks
/// written straight into the output, with the same statistics as the general path.
fn convert_f32_raw(t: &Tensor, to: DType) -> Option<Converted> {
    // one block (a Constant's value, most often): converted here, without the batch's parallel loop
    if let Some(src) = crate::range_rules::F32Data::of(t)
        && src.len() <= CHUNK
        && matches!(to, DType::F16 | DType::BF16)
    {
        // (never narrowed: see `narrowed`)
        let mut raw = vec![0u8; src.len() * 2];
        let stats = convert_block_to(to, src, 0, &mut raw);
        let c = RawConversion {
            data: TensorData::Raw(Bytes::from(raw)),
            elements: src.len(),
            stats,
        };
        return Some(c.tensor(t, to));
    }
    let c = convert_f32_raw_all(&[(t, to)], true).pop().flatten()?;
    Some(c.tensor(t, to))
}

/// `t`'s f32 `raw_data` as [`TensorData::Narrowed`] to `to`: converted when the model is saved, straight
/// into the file (see [`mpopt_ir::Narrowed`]), or when something reads it first. None for `float_data` and
/// for tensors of one block ([`CHUNK`]) or less: those are converted here, into the batch's shared buffer
/// (a narrowed tensor's own allocation and the save's table entry cost more than its few bytes: 11 MB more
/// peak memory on the generated 100,000-node model, whose 50,000 weights hold 50 values each).
fn narrowed(t: &Tensor, to: DType) -> Option<mpopt_ir::Narrowed> {
    match (t.dtype, &t.data) {
        (DType::F32, TensorData::Raw(b)) if b.len() > CHUNK * 4 => {
            mpopt_ir::Narrowed::new(b.clone(), to)
        }
        _ => None,
    }
}

/// [`convert_block_to`]'s statistics of the elements `at..at + k` (at most [`CHUNK`]), the converted values
/// dropped (a narrowed tensor is converted again when it is written).
fn measure_block(to: DType, src: crate::range_rules::F32Data, at: usize, k: usize) -> ConvStats {
    // u16: aligned for the conversion to write f16/bf16 bits straight in
    let mut scratch = [0u16; CHUNK];
    convert_block_to(to, src, at, bytemuck::cast_slice_mut(&mut scratch[..k]))
}

/// One tensor's data converted by [`convert_f32_raw_all`], and its statistics.
struct RawConversion {
    data: TensorData,
    elements: usize,
    stats: ConvStats,
}

impl RawConversion {
    /// The converted tensor and the report's statistics (built only when used: on a model with 100,000
    /// initializers, holding them all at once was 60 MB more peak memory).
    fn tensor(self, t: &Tensor, to: DType) -> Converted {
        let (clamped, flushed, max_rel) = self.stats;
        let change = Change {
            elements: self.elements,
            clamped,
            flushed,
            max_rel: max_rel as f64,
        };
        converted(t, to, self.data, change)
    }
}

/// Elements a conversion block holds (on the stack, three times): rayon gets at least 16 blocks a task.
const CHUNK: usize = 4096;

/// (values clamped, non-zero values flushed to zero, largest relative change) of converted data.
type ConvStats = (usize, usize, f32);

/// [`convert_f32_raw`] for many tensors at once, the blocks of all the tensors in one parallel loop (the
/// small tensors each paid a parallel loop's start).
///
/// f32 `raw_data` (every weight of most models) is only measured here: its result is
/// [`TensorData::Narrowed`], converted when the model is saved. The converted `float_data` (Paddle's
/// Constant weights) lies in one buffer: one allocation per tensor had the allocator touch twice the
/// outputs' size (ddddocr_det_yolox: 22 MB of fresh huge pages for 10 MB of fp16). `None` where a tensor is
/// not f32 data or the target is not f16/bf16. With `defer` false every tensor is converted here.
fn convert_f32_raw_all(jobs: &[(&Tensor, DType)], defer: bool) -> Vec<Option<RawConversion>> {
    use rayon::prelude::*;
    let srcs: Vec<Option<crate::range_rules::F32Data>> = jobs
        .iter()
        .map(|&(t, to)| {
            matches!(to, DType::F16 | DType::BF16)
                .then(|| crate::range_rules::F32Data::of(t))
                .flatten()
        })
        .collect();
    let lazy: Vec<Option<mpopt_ir::Narrowed>> = jobs
        .iter()
        .map(|&(t, to)| if defer { narrowed(t, to) } else { None })
        .collect();
    // each eager tensor's byte offset in the shared buffer, and every block: (tensor, first element,
    // elements)
    let mut offsets = Vec::with_capacity(jobs.len());
    let mut blocks: Vec<(usize, usize, usize)> = Vec::new();
    let mut total = 0usize;
    for (j, src) in srcs.iter().enumerate() {
        offsets.push(total);
        if let Some(src) = src {
            let n = src.len();
            blocks.extend((0..n).step_by(CHUNK).map(|at| (j, at, (n - at).min(CHUNK))));
            if lazy[j].is_none() {
                total += n * 2;
            }
        }
    }
    let mut raw = vec![0u8; total];
    // the output slice of every eager block, in block order (blocks of one tensor are consecutive)
    let mut outs: Vec<Option<&mut [u8]>> = Vec::with_capacity(blocks.len());
    let mut rest: &mut [u8] = &mut raw;
    for &(j, _, k) in &blocks {
        if lazy[j].is_some() {
            outs.push(None);
            continue;
        }
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(k * 2);
        outs.push(Some(head));
        rest = tail;
    }
    let stats: Vec<ConvStats> = blocks
        .par_iter()
        .zip(outs.into_par_iter())
        .with_min_len(16)
        .map(|(&(j, at, k), out)| {
            let src = srcs[j].expect("only f32 data has blocks");
            match out {
                Some(out) => convert_block_to(jobs[j].1, src, at, out),
                None => measure_block(jobs[j].1, src, at, k),
            }
        })
        .collect();
    // per tensor: the sum of its blocks' statistics
    let mut per = vec![(0usize, 0usize, 0f32); jobs.len()];
    for (&(j, _, _), st) in blocks.iter().zip(&stats) {
        let p = &mut per[j];
        *p = (p.0 + st.0, p.1 + st.1, p.2.max(st.2));
    }
    let raw = Bytes::from(raw);
    srcs.iter()
        .zip(lazy)
        .zip(offsets.iter().zip(per))
        .map(|((src, lazy), (&at, stats))| {
            let n = src.as_ref()?.len();
            Some(RawConversion {
                data: lazy.map_or_else(
                    || TensorData::Raw(raw.slice(at..at + n * 2)),
                    TensorData::Narrowed,
                ),
                elements: n,
                stats,
            })
        })
        .collect()
}

/// [`convert_block`] to `to`: f16, or else bf16.
fn convert_block_to(
    to: DType,
    src: crate::range_rules::F32Data,
    at: usize,
    out: &mut [u8],
) -> ConvStats {
    match to {
        DType::F16 => convert_block::<half::f16>(src, at, out, to),
        _ => convert_block::<half::bf16>(src, at, out, to),
    }
}

/// Converts the elements `at..at + out.len() / 2` of `src` to `T` (f16 or bf16) into `out`, clamping to the
/// largest finite value instead of overflowing. The elements are read in place and converted straight into
/// `out` where their alignment allows (always, on the batch's buffer), else through blocks on the stack.
fn convert_block<T: HalfBits>(
    src: crate::range_rules::F32Data,
    at: usize,
    out: &mut [u8],
    to: DType,
) -> ConvStats {
    let k = out.len() / 2;
    // little-endian bits: the target's own layout on a little-endian machine
    let mut direct = if cfg!(target_endian = "little") {
        bytemuck::try_cast_slice_mut::<u8, T>(out).ok()
    } else {
        None
    };
    // unaligned data is converted from its bytes where T can (no value may overflow: clamping needs them
    // as f32), else copied here first (not zeroed: that cost a memset per block)
    let mut copy = [std::mem::MaybeUninit::<f32>::uninit(); CHUNK];
    let xs = match src.slice(at, k) {
        Some(xs) => xs,
        None => {
            if let (crate::range_rules::F32Data::Bytes(b), Some(hs)) = (src, direct.as_deref_mut())
                && let Some((flushed, max_rel, 0)) =
                    T::convert_measured_bytes(hs, &b[at * 4..(at + k) * 4])
            {
                return (0, flushed, max_rel);
            }
            src.fill(at, &mut copy[..k])
        }
    };
    match direct {
        Some(hs) => convert_into(xs, hs, to),
        None => {
            let mut hs = [T::ZERO; CHUNK];
            let stats = convert_into(xs, &mut hs[..k], to);
            for (d, h) in out.chunks_exact_mut(2).zip(&hs[..k]) {
                d.copy_from_slice(&h.bits().to_le_bytes());
            }
            stats
        }
    }
}

/// [`convert_block`]'s work: `xs` (at most [`CHUNK`]) to `hs`, and the statistics.
fn convert_into<T: HalfBits>(xs: &[f32], hs: &mut [T], to: DType) -> ConvStats {
    let k = xs.len();
    let (mut flushed, mut max_rel, overflowed) = T::convert_measured(hs, xs);
    let mut clamped = 0;
    // Overflow is rare: the statistics count it, and only then are the values clamped and measured again
    // (the widened copy is declared here: zeroing it in every block was a 16 KB memset per 4,096 values)
    if overflowed > 0 {
        let mut back = [0f32; CHUNK];
        let max = max_finite(to) as f32;
        for (h, &x) in hs.iter_mut().zip(xs) {
            if h.is_inf() && x.is_finite() {
                clamped += 1;
                *h = T::from_f32(max.copysign(x));
            }
        }
        T::to_f32s(hs, &mut back[..k]);
        (flushed, max_rel, _) = change_stats(xs, &back[..k]);
    }
    (clamped, flushed, max_rel)
}

/// The two 16-bit float types, for [`convert_block`].
trait HalfBits: bytemuck::Pod {
    const ZERO: Self;
    fn from_f32(x: f32) -> Self;
    fn from_f32s(dst: &mut [Self], src: &[f32]);
    fn to_f32s(src: &[Self], dst: &mut [f32]);
    fn is_inf(self) -> bool;
    fn bits(self) -> u16;
    /// `from_f32s`, and [`change_stats`] between `src` and the result.
    fn convert_measured(dst: &mut [Self], src: &[f32]) -> (usize, f32, usize) {
        measured_in_passes(dst, src)
    }
    /// `convert_measured` of little-endian f32 bytes at any alignment, where the type has a loop for them
    /// (None: the caller copies them to f32 first).
    fn convert_measured_bytes(_dst: &mut [Self], _src: &[u8]) -> Option<(usize, f32, usize)> {
        None
    }
}

/// [`HalfBits::convert_measured`] as three passes per [`CHUNK`]: round, widen into a buffer, compare.
fn measured_in_passes<T: HalfBits>(dst: &mut [T], src: &[f32]) -> (usize, f32, usize) {
    let mut back = [0f32; CHUNK];
    let (mut flushed, mut rel, mut over) = (0, 0f32, 0);
    for (d, s) in dst.chunks_mut(CHUNK).zip(src.chunks(CHUNK)) {
        T::from_f32s(d, s);
        T::to_f32s(d, &mut back[..s.len()]);
        let (f, r, o) = change_stats(s, &back[..s.len()]);
        (flushed, rel, over) = (flushed + f, rel.max(r), over + o);
    }
    (flushed, rel, over)
}

macro_rules! half_bits {
    ($t:ty, $from:expr, $to:expr) => {
        half_bits!($t, $from, $to, {});
    };
    ($t:ty, $from:expr, $to:expr, { $($measured:tt)* }) => {
        impl HalfBits for $t {
            const ZERO: Self = <$t>::ZERO;
            fn from_f32(x: f32) -> Self {
                <$t>::from_f32(x)
            }
            fn from_f32s(dst: &mut [Self], src: &[f32]) {
                $from(src, dst)
            }
            fn to_f32s(src: &[Self], dst: &mut [f32]) {
                $to(src, dst)
            }
            fn is_inf(self) -> bool {
                self.is_infinite()
            }
            fn bits(self) -> u16 {
                self.to_bits()
            }
            $($measured)*
        }
    };
}
// f16: F16C in one loop (`mpopt_ir::halfconv`); bf16: `half`'s conversions (bit operations)
half_bits!(
    half::f16,
    mpopt_ir::halfconv::f32_to_f16,
    mpopt_ir::halfconv::f16_to_f32,
    {
        fn convert_measured(dst: &mut [Self], src: &[f32]) -> (usize, f32, usize) {
            f16_measured(dst, src)
        }
        fn convert_measured_bytes(dst: &mut [Self], src: &[u8]) -> Option<(usize, f32, usize)> {
            f16_measured_bytes(dst, src)
        }
    }
);
half_bits!(
    half::bf16,
    |src: &[f32], dst: &mut [half::bf16]| {
        half::slice::HalfFloatSliceExt::convert_from_f32_slice(dst, src)
    },
    |src: &[half::bf16], dst: &mut [f32]| {
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, dst)
    }
);

impl Pass for InsertCasts {
    fn name(&self) -> &'static str {
        "insert-casts"
    }

    fn run(&mut self, model: &mut Model) -> Result<PassOutcome, PassError> {
        let opsets = model.opsets();
        let mut out = Out {
            defer: self.defer,
            ..Out::default()
        };
        let graph_name = model.graph.name.clone();
        // --io-types: retype the chosen top-level float32 inputs.
        let io_low = |name: &str| match &self.io {
            IoTypes::Keep => false,
            IoTypes::Low => true,
            IoTypes::Names(ns) => ns.iter().any(|n| n == name),
        };
        // Each becomes the target type and feeds one Cast back to float32, which its consumers read instead:
        // the graph is then made to agree with its decisions as if the input were still float32 (a low
        // consumer's Cast back to the target type is cancelled by fuse-casts: f16 -> f32 -> f16 is exact).
        out.taken = Taken::of(&model.graph);
        let inputs: Vec<ValueId> = model.graph.inputs().to_vec();
        let mut copies: HashMap<ValueId, ValueId> = HashMap::default();
        for v in inputs {
            if elem(&model.graph, v) == Some(DType::F32)
                && model.graph.value(v).initializer.is_none()
                && io_low(model.graph.value(v).name())
            {
                let copy =
                    low_input(&mut model.graph, v, self.target, &mut out.taken).map_err(|m| {
                        PassError::Failed {
                            pass: "insert-casts".into(),
                            message: m,
                        }
                    })?;
                if let Some(copy) = copy {
                    copies.insert(copy, v);
                    out.casts += 1;
                }
            }
        }
        out.casts -= read_lowered_inputs_as_they_are(&mut model.graph, &copies, &opsets);
        let orig = original_dtypes(&model.graph);
        let keep_output = |name: &str| !io_low(name);
        process(
            &mut model.graph,
            self.target,
            &opsets,
            &orig,
            &keep_output,
            &mut out,
            &format!("graph '{graph_name}'"),
        )
        .map_err(|m| PassError::Failed {
            pass: "insert-casts".into(),
            message: m,
        })?;
        // A model of other domains only (ai.onnx.ml) that now has Casts imports the default domain.
        if model.opset("").is_none() && uses_default_domain(&model.graph) {
            let (ir, version) = default_opset_for(model.ir_version, self.target);
            model.ir_version = ir;
            model.opset_imports.push(mpopt_ir::OpsetImport {
                domain: String::new(),
                version,
            });
        }
        let notes = out.change_notes(self.target);
        Ok(PassOutcome {
            records: out.records,
            notes,
            ..PassOutcome::rewrites(vec![
                ("casts added", out.casts),
                ("initializers converted in place", out.converted),
                ("initializers copied", out.copied),
                ("outputs cast back", out.outputs_cast_back),
                ("fp32 readers given a cast's source", out.cast_sources),
            ])
        })
    }
}

/// Is `name` a value of `g` or of a graph nested in it? (the graphs' name indexes, nothing collected)
pub(crate) fn name_used(g: &Graph, name: &str) -> bool {
    g.value_by_name(name).is_some()
        || g.nodes()
            .any(|(_, n)| n.subgraphs().any(|(_, sg)| name_used(sg, name)))
}

/// Calls `each` with every value name of `g` and of the graphs nested in it.
fn walk_names(g: &Graph, each: &mut impl FnMut(&str)) {
    for v in g.value_ids() {
        each(g.value(v).name());
    }
    for (_, n) in g.nodes() {
        for (_, sg) in n.subgraphs() {
            walk_names(sg, each);
        }
    }
}

/// The names a new value must not take: every value name of a graph and of its subgraphs, kept as 64-bit
/// hashes. A collision can only make [`fresh`] pass over a free name, never take a used one. As a set of
/// owned names, building it allocated once per value: 110 ms of converting the 100,000-node model, in
/// `insert-casts` and again in `fuse-casts`.
#[derive(Default)]
pub(crate) struct Taken(HashSet<u64>);

impl Taken {
    /// The names of `g` and its subgraphs.
    pub(crate) fn of(g: &Graph) -> Taken {
        let mut t = Taken::default();
        t.0.reserve(g.value_bound());
        walk_names(g, &mut |name| t.insert(name));
        t
    }

    fn key(name: &str) -> u64 {
        use std::hash::BuildHasher;
        rustc_hash::FxBuildHasher.hash_one(name)
    }

    /// Might `name` be taken? (false: it is not)
    pub(crate) fn contains(&self, name: &str) -> bool {
        self.0.contains(&Taken::key(name))
    }

    /// Takes `name`.
    pub(crate) fn insert(&mut self, name: &str) {
        self.0.insert(Taken::key(name));
    }
}

/// A new value name for `g` made from `base`, used nowhere in the model (`taken`), then taken.
pub(crate) fn fresh(g: &Graph, taken: &mut Taken, base: &str) -> String {
    let mut name = g.fresh_name(base);
    let mut k = 1;
    while taken.contains(&name) {
        name = g.fresh_name(&format!("{base}_{k}"));
        k += 1;
    }
    taken.insert(&name);
    name
}

/// Does a graph (or one nested in it) have a node of the default domain?
fn uses_default_domain(g: &Graph) -> bool {
    g.nodes()
        .any(|(_, n)| n.in_default_domain() || n.subgraphs().any(|(_, sg)| uses_default_domain(sg)))
}

/// The (IR version, default-domain opset) to import for Casts in a model of IR version `ir`: the newest opset
/// that IR version allows (onnx's VERSION_TABLE), and at least opset 13 (IR 7) for a Cast to bf16.
fn default_opset_for(ir: i64, target: DType) -> (i64, i64) {
    const NEWEST: [(i64, i64); 12] = [
        (3, 8),
        (4, 9),
        (5, 10),
        (6, 11),
        (7, 14),
        (8, 18),
        (9, 20),
        (10, 22),
        (11, 23),
        (12, 24),
        (13, 27),
        (14, 28),
    ];
    let ir = if target == DType::BF16 {
        ir.max(7)
    } else {
        ir.max(3)
    };
    let opset = NEWEST
        .iter()
        .rev()
        .find(|(i, _)| *i <= ir)
        .map_or(8, |&(_, o)| o);
    (ir, opset)
}

/// Retypes graph input `v` to `low` and gives its node consumers a float32 copy, made by a Cast at the start
/// of the schedule. Subgraphs keep capturing `v` by name: their captures follow its dtype like any other.
fn low_input(
    g: &mut Graph,
    v: ValueId,
    low: DType,
    taken: &mut Taken,
) -> Result<Option<ValueId>, String> {
    let readers: Vec<(NodeId, u32)> = g
        .uses(v)
        .iter()
        .filter_map(|u| match *u {
            Use::Input(n, s) => Some((n, s)),
            _ => None,
        })
        .collect();
    set_elem(g, v, low);
    if readers.is_empty() {
        return Ok(None);
    }
    let name = fresh(g, taken, &format!("{}__f32", g.value(v).name()));
    let wide = retyped_value(g, v, DType::F32, name.clone())?;
    let cast = cast_node(name, DType::F32);
    let first = g.nodes().next().map(|(id, _)| id).expect("a reader");
    g.insert_node_before(first, cast, &[Some(v)], &[Some(wide)])
        .map_err(|e| e.to_string())?;
    for (n, s) in readers {
        g.set_input(n, s, Some(wide));
    }
    Ok(Some(wide))
}

/// `--io-types`: a low node whose data slot has an input-only type parameter (no output uses it:
/// Attention's mask, ...) reads a lowered graph input as it is, not its float32 copy (`copies`: copy ->
/// input), as `process` lets such slots read low values: widening first would be exact and change nothing.
/// Every input bound to the parameter must then be low (or a copy). Without this, a second conversion of the
/// result lowered the copy's Cast (a clear node beside a low one), and the slot read the input directly:
/// not idempotent. Copies left unread are removed; returns how many.
fn read_lowered_inputs_as_they_are(
    g: &mut Graph,
    copies: &HashMap<ValueId, ValueId>,
    opsets: &Opsets,
) -> u64 {
    let mut repoint: Vec<(NodeId, u32, ValueId)> = Vec::new();
    let mut seen: HashSet<NodeId> = HashSet::default();
    // the copies in value order, so that the rewrite is deterministic
    let mut ordered: Vec<(ValueId, ValueId)> = copies.iter().map(|(&c, &x)| (c, x)).collect();
    ordered.sort_by_key(|&(c, _)| c.index());
    for &(copy, _) in &ordered {
        for u in g.uses(copy) {
            let Use::Input(n, _) = *u else { continue };
            if !seen.insert(n) {
                continue;
            }
            let node = g.node(n);
            // only for a node decided low: the next conversion lowers the copy's Cast beside it (a clear
            // node next to a low one), and the slot then reads the low input; an fp32 node keeps the copy
            if !node
                .precision
                .as_ref()
                .is_some_and(|d| matches!(d.dtype, DType::F16 | DType::BF16))
            {
                continue;
            }
            let Some(s) = registry().for_node(node, opsets) else {
                continue;
            };
            for (i, w) in node.inputs().iter().enumerate() {
                let Some(w) = *w else { continue };
                let Some(&x) = copies.get(&w) else { continue };
                let input_only = elem(g, x).is_some_and(|have| {
                    reads_low_as_it_is(node, s, i, have, |w| match copies.get(&w) {
                        Some(&x) => elem(g, x),
                        None => elem(g, w),
                    })
                });
                if input_only {
                    repoint.push((n, i as u32, x));
                }
            }
        }
    }
    for (n, i, x) in repoint {
        g.set_input(n, i, Some(x));
    }
    let mut removed = 0;
    for (copy, _) in ordered {
        if g.uses(copy).is_empty()
            && let Some((p, _)) = g.producer(copy)
        {
            g.remove_node(p);
            removed += 1;
        }
    }
    removed
}

fn original_dtypes(g: &Graph) -> Vec<Option<DType>> {
    g.value_ids().map(|v| elem(g, v)).collect()
}

/// Rewrites the dtype-carrying attributes of a node now running in `target`.
///
/// `pre` is the conversion of a Constant's f32 `value`, when it was made with the others in one batch;
/// `value_name` names an unnamed Constant in the pass's notes (its value's name).
fn retarget_attributes(
    n: &mut Node,
    target: DType,
    out: &mut Out,
    scope: &str,
    pre: Option<RawConversion>,
    value_name: Option<&str>,
) {
    if !n.in_default_domain() {
        return;
    }
    let code = target.code() as i64;
    let set_int = |n: &mut Node, name: &str| {
        if let Some(a) = n.attributes.iter_mut().find(|a| a.name == name) {
            a.value = AttrValue::Int(code);
        } else {
            n.attributes
                .push(Attribute::new(name, AttrValue::Int(code)));
        }
    };
    match n.op_type.as_str() {
        "Cast" => set_int(n, "to"),
        "RandomNormal" | "RandomUniform" | "RandomNormalLike" | "RandomUniformLike" | "EyeLike"
        | "Bernoulli" => set_int(n, "dtype"),
        "HannWindow" | "HammingWindow" | "BlackmanWindow" | "MelWeightMatrix" => {
            set_int(n, "output_datatype")
        }
        "ConstantOfShape" | "Constant" => {
            let label = if n.name.is_empty() {
                n.op_type.clone()
            } else {
                n.name.clone()
            };
            let conversion = match f32_value(n) {
                Some(t) => match pre {
                    Some(c) => Some(c.tensor(t, target)),
                    None => convert_tensor(t, target),
                },
                None if n.op_type == "ConstantOfShape" && n.attr("value").is_none() => {
                    convert_tensor(&Tensor::from_f32(vec![1], &[0.0]), target)
                }
                None => None,
            };
            if let Some((c, change)) = conversion {
                out.tally(&change, value_name.unwrap_or(&label));
                n.attributes.retain(|a| a.name != "value");
                n.attributes
                    .push(Attribute::new("value", AttrValue::Tensor(Box::new(c))));
                let mut fields = vec![
                    ("scope", scope.to_string()),
                    ("node", label),
                    ("to", target.to_string()),
                ];
                fields.extend(change.fields());
                out.records.push(Record {
                    kind: "constant converted",
                    fields,
                });
            }
            // value_float / value_floats become a `value` tensor of the target type
            for a in n.attributes.iter_mut() {
                let t = match (a.name.as_str(), &a.value) {
                    ("value_float", AttrValue::Float(f)) => Tensor::from_f32(vec![], &[*f]),
                    ("value_floats", AttrValue::Floats(fs)) => {
                        Tensor::from_f32(vec![fs.len() as i64], fs)
                    }
                    _ => continue,
                };
                if let Some((c, _)) = convert_tensor(&t, target) {
                    a.name = "value".into();
                    a.value = AttrValue::Tensor(Box::new(c));
                }
            }
        }
        _ => {}
    }
}

/// The f32 tensor of a node's `value` attribute (Constant, ConstantOfShape), if it has one.
fn f32_value(n: &Node) -> Option<&Tensor> {
    match n.attr("value").map(|a| &a.value) {
        Some(AttrValue::Tensor(t)) if t.dtype == DType::F32 => Some(t),
        _ => None,
    }
}

/// The source `x` of `v = Cast(x) {to = FLOAT}`, one of the model's casts that the decisions made low, when
/// a reader wants `v` as float32 (`d`) and `x` still has its original dtype: `Cast(x -> float32)` is then
/// exactly the value the original model computed.
fn original_float_source(
    g: &Graph,
    v: ValueId,
    d: DType,
    orig: &[Option<DType>],
) -> Option<ValueId> {
    if d != DType::F32 || orig.get(v.index()).copied().flatten() != Some(DType::F32) {
        return None;
    }
    let (p, _) = g.producer(v)?;
    let n = g.node(p);
    if n.op_type != "Cast" || !n.in_default_domain() || n.precision.is_none() {
        return None;
    }
    let x = n.inputs().first().copied().flatten()?;
    let now = elem(g, x)?;
    (orig.get(x.index()).copied().flatten() == Some(now)).then_some(x)
}

/// The data of an initializer value (None for any other value).
fn initializer_data(g: &Graph, v: ValueId) -> Option<&Tensor> {
    match g.value(v).def() {
        Def::Initializer => g.value(v).initializer.as_deref(),
        _ => None,
    }
}

/// Makes one graph agree with its decisions; then its subgraphs.
/// Inputs never read as a low value in place of the float32 one: those of the ops whose output's dtype
/// onnx's type inference ties to their input ([`mpopt_ir::schema::INFERENCE_TIES`]: BitCast, RMSNormalization,
/// the `*Like` ops without `dtype`, ...), and of the sequence and optional constructors, whose container's
/// element type is the input's. Found by onnx.checker (onnx 1.23) on models where that input was f16 and the
/// rest f32.
fn type_tied(op: &str) -> bool {
    mpopt_ir::schema::INFERENCE_TIES.contains(&op)
        || matches!(
            op,
            "SequenceConstruct"
                | "SequenceInsert"
                | "SplitToSequence"
                | "SequenceMap"
                | "Optional"
                | "OptionalGetElement"
                | "OptionalHasElement"
        )
}

/// Whether input `i` of `node`, now of dtype `have`, is read as it is: its type parameter types only inputs
/// (Shape, Size, ArgMax, IsNaN, Equal, Attention's mask, ...), every input bound to it has that dtype
/// (`dtype_of`), the schema allows it, and it is not fixed to float32. Widening first would be exact and
/// change nothing. Never for the ops [`type_tied`] names.
fn reads_low_as_it_is(
    node: &Node,
    s: &mpopt_ir::schema::OpSchema,
    i: usize,
    have: DType,
    dtype_of: impl Fn(ValueId) -> Option<DType>,
) -> bool {
    if node.in_default_domain() && type_tied(&node.op_type) {
        return false;
    }
    if s.input_fixed_f32(i) {
        return false;
    }
    let Some(p) = s.input_type_param(i) else {
        return false;
    };
    // no formal output uses the parameter, present or not
    !s.outputs
        .iter()
        .any(|o| o.ty == TypeSpec::Param(p.to_string()))
        && node.inputs().iter().enumerate().all(|(j, w)| {
            s.input_type_param(j) != Some(p) || w.is_none_or(|w| dtype_of(w) == Some(have))
        })
        && s.input_allows(i, have)
}

fn process(
    g: &mut Graph,
    target: DType,
    opsets: &Opsets,
    orig: &[Option<DType>],
    keep_output: &dyn Fn(&str) -> bool,
    out: &mut Out,
    scope: &str,
) -> Result<(), String> {
    let order: Vec<NodeId> = g.nodes().map(|(id, _)| id).collect();
    let pos: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();

    // Phase 1: final output dtypes of low nodes; which inputs need which dtype.
    let mut needs: Vec<(ValueId, DType, Use)> = Vec::new();
    // Each low node's data parameters (and its low type), read before any output is retyped: they are the
    // parameters bound to float32 data as `assign-precision` decided, and a producer retyped first would
    // hide an input-only binding (Attention's V, T2, after a low MatMul: V was cast back to f32 beside an
    // f16 Q, which onnxruntime refuses).
    let mut low_params: HashMap<NodeId, (Vec<String>, DType, &mpopt_ir::schema::OpSchema)> =
        HashMap::default();
    for &id in &order {
        let node = g.node(id);
        let Some(low) = node.precision.as_ref().map(|d| d.dtype) else {
            continue;
        };
        // the node's own low type: the target, or bf16 where `--to auto` chose it
        if !matches!(low, DType::F16 | DType::BF16) {
            continue;
        }
        if let Some(schema) = registry().for_node(node, opsets) {
            low_params.insert(id, (data_params(g, id, schema), low, schema));
        }
    }
    // low Constant and ConstantOfShape nodes that made float32, retargeted after the loop
    let mut constants: Vec<(NodeId, DType)> = Vec::new();
    for &id in &order {
        let Some(&(ref params, low, schema)) = low_params.get(&id) else {
            continue;
        };
        let node = g.node(id);
        let outs: Vec<(usize, ValueId)> = node
            .outputs()
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.map(|v| (i, v)))
            .collect();
        for (i, v) in outs {
            if orig[v.index()] == Some(DType::F32)
                && schema
                    .output_type_param(i)
                    .is_some_and(|p| params.iter().any(|x| x == p))
            {
                set_elem(g, v, low);
            }
        }
        // only a node that made float32 now makes the low type: a Cast to f16 (or f64) in a model that
        // is already mixed keeps its `to`, which its consumers were built for
        let made_f32 = g
            .node(id)
            .outputs()
            .first()
            .copied()
            .flatten()
            .is_some_and(|v| orig[v.index()] == Some(DType::F32));
        if made_f32 {
            let n = g.node(id);
            if n.in_default_domain() && matches!(n.op_type.as_str(), "Constant" | "ConstantOfShape")
            {
                constants.push((id, low));
            } else {
                retarget_attributes(g.node_mut(id), low, out, scope, None, None);
            }
        }
    }
    // The constants' values are converted in one batch, then written in schedule order: Paddle's exporter
    // keeps every weight in a Constant (ppocrv4_det: 342), and one parallel loop each was most of the pass.
    let batch: Vec<Option<RawConversion>> = {
        let values: Vec<Option<&Tensor>> = constants
            .iter()
            .map(|&(id, _)| f32_value(g.node(id)))
            .collect();
        let pairs: Vec<(&Tensor, DType)> = values
            .iter()
            .zip(&constants)
            .filter_map(|(t, &(_, low))| Some(((*t)?, low)))
            .collect();
        let mut done = convert_f32_raw_all(&pairs, out.defer).into_iter();
        values
            .iter()
            .map(|t| t.and_then(|_| done.next().flatten()))
            .collect()
    };
    for ((id, low), pre) in constants.into_iter().zip(batch) {
        let node = g.node(id);
        let o = node.outputs().first().copied().flatten();
        // an unnamed node goes by its value's name in the notes
        let value_name = o
            .filter(|_| node.name.is_empty())
            .map(|o| g.value(o).name().to_string());
        retarget_attributes(g.node_mut(id), low, out, scope, pre, value_name.as_deref());
        // the analysis's facts were about the f32 value (and hold its data)
        if let Some(o) = o {
            g.value_mut(o).set_constant_facts(None);
        }
    }
    for &id in &order {
        let node = g.node(id);
        let schema = registry().for_node(node, opsets);
        let params = low_params.get(&id).map(|(ps, low, _)| (ps, low));
        for (i, v) in node.inputs().iter().enumerate() {
            let Some(v) = *v else { continue };
            let (Some(have), Some(was)) = (elem(g, v), orig[v.index()]) else {
                continue;
            };
            // A parameter that types only inputs (Shape, Size, ArgMax, IsNaN, ...): the node reads low values as
            // they are, since widening them first would be exact and change nothing.
            let input_only =
                schema.is_some_and(|s| reads_low_as_it_is(node, s, i, have, |w| elem(g, w)));
            if input_only {
                continue;
            }
            let want = match (params, schema) {
                // Every input bound to a lowered parameter follows it, as the type constraint requires, even a
                // non-differentiable one; parameters that only shape-like inputs use are never lowered.
                (Some((ps, low)), Some(s))
                    if s.input_type_param(i)
                        .is_some_and(|p| ps.iter().any(|x| x == p))
                        && (was == DType::F32 || was == target || was == *low) =>
                {
                    *low
                }
                _ => was,
            };
            if want != have {
                needs.push((v, want, Use::Input(id, i as u32)));
            }
        }
    }

    // Phase 2: one conversion per (value, dtype), in the order the needs were found.
    let mut groups: Vec<((ValueId, DType), Vec<Use>)> = Vec::new();
    let mut index: HashMap<(ValueId, DType), usize> = HashMap::default();
    for (v, d, u) in needs {
        let i = *index.entry((v, d)).or_insert_with(|| {
            groups.push(((v, d), Vec::new()));
            groups.len() - 1
        });
        groups[i].1.push(u);
    }
    // Readable initializer data is converted; anything else (elided data, packed types) gets a Cast below.
    // f32 data is converted first, all of it in one go (see `convert_f32_raw_all`); a group's data is still
    // its initializer's when its turn comes (an in-place conversion takes every use of its value, so no
    // other group reads that value).
    let jobs: Vec<(usize, &Tensor, DType)> = groups
        .iter()
        .enumerate()
        .filter_map(|(i, &((v, d), _))| Some((i, initializer_data(g, v)?, d)))
        .collect();
    let mut fast: Vec<Option<_>> = (0..groups.len()).map(|_| None).collect();
    let pairs: Vec<(&Tensor, DType)> = jobs.iter().map(|&(_, t, d)| (t, d)).collect();
    for ((i, _, _), c) in jobs.iter().zip(convert_f32_raw_all(&pairs, out.defer)) {
        fast[*i] = c;
    }
    for (((v, d), uses), fast) in groups.into_iter().zip(fast) {
        let all_uses = g.uses(v).len();
        let is_output = g.outputs().contains(&v);
        let converted = initializer_data(g, v).and_then(|t| match fast {
            Some(c) => Some(c.tensor(t, d)),
            None => convert_general(t, d),
        });
        if let Some((conv, change)) = converted {
            let name = g.value(v).name().to_string();
            out.tally(&change, &name);
            let in_place = uses.len() == all_uses && !is_output;
            let target_v = if in_place {
                let mut conv = conv;
                conv.name = name.clone();
                g.replace_initializer(v, conv);
                // the analysis's facts were about the f32 data (and hold it)
                g.value_mut(v).set_constant_facts(None);
                set_elem(g, v, d);
                out.converted += 1;
                v
            } else {
                let new_name = fresh(g, &mut out.taken, &format!("{name}__{d}"));
                let mut conv = conv;
                conv.name = new_name.clone();
                let nv = g
                    .add_initializer(new_name, conv)
                    .map_err(|e| e.to_string())?;
                out.copied += 1;
                nv
            };
            let mut fields = vec![
                ("scope", scope.to_string()),
                ("initializer", name),
                ("to", d.to_string()),
                (
                    "mode",
                    if in_place {
                        "in place".into()
                    } else {
                        "copy".to_string()
                    },
                ),
            ];
            fields.extend(change.fields());
            out.records.push(Record {
                kind: "initializer converted",
                fields,
            });
            for u in uses {
                if let Use::Input(n, s) = u {
                    g.set_input(n, s, Some(target_v));
                }
            }
            continue;
        }
        // What the readers get: one Cast of `v` to `d`, placed before the first of them. Except for a value
        // that one of the model's own casts made float32, now low, wanted as float32 again: the original
        // computed it as Cast(x -> float32), so that is what its readers get, from `x` itself (read as it is
        // when it is float32), not the rounded low value widened back.
        let source = original_float_source(g, v, d, orig);
        let from = source.unwrap_or(v);
        let src = if elem(g, from) == Some(d) {
            from
        } else {
            let first = uses
                .iter()
                .map(|u| u.node())
                .min_by_key(|n| pos.get(n).copied().unwrap_or(usize::MAX))
                .expect("a use");
            let cast_name = fresh(g, &mut out.taken, &format!("{}__{d}", g.value(v).name()));
            let cv = retyped_value(g, v, d, cast_name.clone())?;
            g.insert_node_before(first, cast_node(cast_name, d), &[Some(from)], &[Some(cv)])
                .map_err(|e| e.to_string())?;
            out.casts += 1;
            cv
        };
        out.cast_sources += u64::from(source.is_some());
        for u in uses {
            if let Use::Input(n, s) = u {
                g.set_input(n, s, Some(src));
            }
        }
    }

    // Graph outputs keep their dtype and name; those `--io-types` names (float32 ones) take the target type.
    for i in 0..g.outputs().len() {
        let v = g.outputs()[i];
        let (Some(have), Some(was)) = (elem(g, v), orig[v.index()]) else {
            continue;
        };
        let name = g.value(v).name().to_string();
        let was = if keep_output(&name) || was != DType::F32 {
            was
        } else {
            target
        };
        if have == was {
            continue;
        }
        let inner = fresh(g, &mut out.taken, &format!("{name}__{have}"));
        g.rename_value(v, inner).map_err(|e| e.to_string())?;
        let ov = retyped_value(g, v, was, name.clone())?;
        let cast = cast_node(format!("{name}__cast_back"), was);
        match g.producer(v) {
            Some((p, _)) => g.insert_node_after(p, cast, &[Some(v)], &[Some(ov)]),
            None => g.add_node(cast, &[Some(v)], &[Some(ov)]),
        }
        .map_err(|e| e.to_string())?;
        g.set_output(i, ov);
        out.outputs_cast_back += 1;
        // other nodes keep reading the low value under its new name; subgraphs that captured it by name follow
        let users: Vec<NodeId> = g.uses(v).iter().map(|u| u.node()).collect();
        for u in users {
            if g.node(u).has_subgraphs() {
                let new = g.value(v).name().to_string();
                g.rename_captures(u, &name, &new);
            }
        }
    }

    // Subgraphs: captures take their outer value's current dtype; outputs always keep theirs.
    let with_subgraphs: Vec<NodeId> = g
        .nodes()
        .filter(|(_, n)| n.has_subgraphs())
        .map(|(id, _)| id)
        .collect();
    for id in with_subgraphs {
        let outer: HashMap<String, Option<DType>> = g
            .node(id)
            .implicit_inputs()
            .iter()
            .map(|&v| (g.value(v).name().to_string(), elem(g, v)))
            .collect();
        let label = format!("{scope} / node {}", mpopt_ir::node_label(g, id));
        let mut attrs = std::mem::take(&mut g.node_mut(id).attributes);
        for a in &mut attrs {
            for sg in a.value.graphs_mut() {
                let sub_orig = original_dtypes(sg);
                for &c in sg.captures().to_vec().iter() {
                    if let Some(Some(d)) = outer.get(sg.value(c).name()) {
                        set_elem(sg, c, *d);
                    }
                }
                process(
                    sg,
                    target,
                    opsets,
                    &sub_orig,
                    &|_| true,
                    out,
                    &format!("{label} / {}", a.name),
                )?;
            }
        }
        g.node_mut(id).attributes = attrs;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh name avoids the names of subgraphs (a body may not redefine an outer name) and the names
    /// taken before, and is taken in turn.
    #[test]
    fn fresh_names_avoid_every_graph_and_each_other() {
        let m = mpopt_ir::text::parse_model(
            "ir_version 8
opset ai.onnx 17

graph @g(%c: bool[], %x: f32[2]) -> (%y: f32[2]) {
  %y = If(%c) {else_branch = graph @e() -> (%z: f32[2]) captures (%x: f32[2]) {
    %z = Identity(%x)
  }, then_branch = graph @t() -> (%x__f16: f32[2]) captures (%x: f32[2]) {
    %x__f16 = Identity(%x)
  }}
}
",
        )
        .unwrap();
        let g = &m.graph;
        let mut taken = Taken::of(g);
        assert!(taken.contains("x") && taken.contains("x__f16") && taken.contains("z"));
        assert!(!taken.contains("x__f32"));
        // taken inside the then-branch, though the main graph does not know it
        assert_eq!(fresh(g, &mut taken, "x__f16"), "x__f16_1");
        assert_eq!(fresh(g, &mut taken, "x__f16"), "x__f16_2");
        assert_eq!(fresh(g, &mut taken, "w"), "w");
        assert!(taken.contains("w"));
    }

    /// Values with known fates in f16, over a length that leaves partial blocks and lanes: 1e6 clamps, 1e-9
    /// flushes, NaN/inf/0 have no relative change.
    fn mixed(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| match i % 97 {
                0 => 1e6,
                1 => -7e4,
                2 => 1e-9,
                3 => -2e-8,
                4 => 0.0,
                5 => f32::NAN,
                6 => f32::INFINITY,
                _ => (i as f32 * 0.618).sin() * 3.0,
            })
            .collect()
    }

    #[test]
    fn fused_f16_statistics_match_the_three_passes() {
        // every f16 bit pattern widened (exact, subnormals, infinities, NaNs), the f32 values just around
        // each, and the mixed fates, over lengths that leave every tail
        let mut xs: Vec<f32> = (0..=u16::MAX)
            .flat_map(|b| {
                let x = half::f16::from_bits(b).to_f32();
                [
                    x,
                    f32::from_bits(x.to_bits() + 1),
                    f32::from_bits(x.to_bits().wrapping_sub(1)),
                ]
            })
            .collect();
        xs.extend(mixed(1000));
        xs.extend([1e-30, -1e-30, 65520.0, -65519.0, 3e38, f32::MIN_POSITIVE]);
        for n in [0usize, 1, 7, 8, 9, 4095, xs.len()] {
            for at in [0, 5] {
                let src = &xs[at.min(xs.len() - n)..][..n];
                let mut fused = vec![half::f16::ZERO; n];
                let stats = f16_measured(&mut fused, src);
                let mut plain = vec![half::f16::ZERO; n];
                half::slice::HalfFloatSliceExt::convert_from_f32_slice(&mut plain[..], src);
                let back: Vec<f32> = plain.iter().map(|h| h.to_f32()).collect();
                let want = change_stats(src, &back);
                assert_eq!(
                    fused.iter().map(|h| h.to_bits()).collect::<Vec<_>>(),
                    plain.iter().map(|h| h.to_bits()).collect::<Vec<_>>(),
                    "n {n}"
                );
                assert_eq!(
                    (stats.0, stats.1.to_bits(), stats.2),
                    (want.0, want.1.to_bits(), want.2),
                    "n {n}"
                );
            }
        }
        // the counts are what they say: one flush (a relative change of 1), one overflow (no relative
        // change: infinite); normal values change by 2^-11 at most
        let mut h = [half::f16::ZERO; 4];
        let (flushed, rel, over) = f16_measured(&mut h, &[1e-9, 7e4, 1.0 + 1.0 / 4096.0, 0.0]);
        assert_eq!((flushed, rel, over), (1, 1.0, 1));
        let (flushed, rel, over) = f16_measured(&mut h, &[3.0, 7e3, 1.0 + 1.0 / 4096.0, 0.0]);
        assert_eq!((flushed, over), (0, 0));
        assert!(rel > 0.0 && rel <= 1.0 / 2048.0, "{rel}");
    }

    #[test]
    fn fast_conversion_matches_the_general_path() {
        for n in [1usize, 7, 97, 4096 * 17 + 5] {
            let xs = mixed(n);
            let raw = Tensor::from_f32(vec![n as i64], &xs);
            let mut listed = raw.clone();
            listed.data = TensorData::Floats(xs.clone());
            for to in [DType::F16, DType::BF16] {
                let (fast, fs) = convert_f32_raw(&raw, to).expect("raw f32 takes the fast path");
                let (fast_listed, fls) =
                    convert_f32_raw(&listed, to).expect("float_data takes the fast path");
                let (slow, ss) = convert_general(&listed, to).expect("a float list converts");
                let bytes = |t: &Tensor| match t.data.view() {
                    TensorData::Raw(b) => b.clone(),
                    _ => panic!("converted data is raw"),
                };
                // raw f32 data past one block is narrowed when written; the rest converted here
                assert_eq!(
                    matches!(fast.data, TensorData::Narrowed(_)),
                    n > CHUNK,
                    "{to:?} n={n}"
                );
                assert!(matches!(fast_listed.data, TensorData::Raw(_)));
                assert_eq!(bytes(&fast), bytes(&slow), "{to:?} n={n}");
                assert_eq!(fs, ss, "{to:?} n={n}");
                assert_eq!(bytes(&fast_listed), bytes(&slow), "{to:?} n={n}");
                assert_eq!(fls, ss, "{to:?} n={n}");
            }
            // f16: counted independently
            let (_, st) = convert_f32_raw(&raw, DType::F16).unwrap();
            let count = |m: usize| (0..n).filter(|i| i % 97 == m).count();
            assert_eq!(st.clamped, count(0) + count(1), "n={n}");
            assert_eq!(st.flushed, count(2) + count(3), "n={n}");
        }
    }

    #[test]
    fn unaligned_raw_data_converts_as_aligned() {
        // raw_data at every misalignment, with and without values that overflow (those blocks are copied
        // to f32 first; the others are read where they lie): the same bits and statistics as aligned data
        for n in [1usize, 9, 4096, 4096 * 5 + 3] {
            let with_overflow = mixed(n);
            let without: Vec<f32> = with_overflow
                .iter()
                .map(|&x| {
                    if x.abs() > 6e4 && x.is_finite() {
                        0.5
                    } else {
                        x
                    }
                })
                .collect();
            for xs in [with_overflow, without] {
                let aligned = Tensor::from_f32(vec![n as i64], &xs);
                let bytes: Vec<u8> = xs.iter().flat_map(|x| x.to_le_bytes()).collect();
                for off in 1..4 {
                    let mut buf = vec![0u8; off];
                    buf.extend_from_slice(&bytes);
                    let mut t = aligned.clone();
                    t.data = TensorData::Raw(Bytes::from(buf).slice(off..));
                    let TensorData::Raw(b) = &t.data else {
                        unreachable!()
                    };
                    assert_ne!(b.as_ptr() as usize % 4, 0, "the test's data is unaligned");
                    for to in [DType::F16, DType::BF16] {
                        let (want, ws) = convert_f32_raw(&aligned, to).unwrap();
                        let (got, gs) = convert_f32_raw(&t, to).unwrap();
                        assert_eq!(got.data, want.data, "{to:?} n={n} offset {off}");
                        assert_eq!(gs, ws, "{to:?} n={n} offset {off}");
                    }
                }
            }
        }
    }

    #[test]
    fn batch_conversion_matches_one_at_a_time() {
        // raw and listed f32 of several lengths, to both targets, with tensors the fast path leaves (f64
        // data, an f32 target) in between: each result is the single conversion's, in its own slice
        let mut jobs: Vec<(Tensor, DType)> = Vec::new();
        for (i, n) in [5usize, 4096 * 3 + 1, 0, 97, 4096].into_iter().enumerate() {
            let xs = mixed(n);
            let mut t = Tensor::from_f32(vec![n as i64], &xs);
            if i % 2 == 1 {
                t.data = TensorData::Floats(xs);
            }
            jobs.push((t.clone(), [DType::F16, DType::BF16][i % 2]));
            jobs.push((t, DType::F32));
        }
        let mut wide = Tensor::from_f32(vec![2], &[1.0, 2.0]);
        wide.dtype = DType::F64;
        wide.data = TensorData::Doubles(vec![1.0, 2.0]);
        jobs.insert(3, (wide, DType::F16));
        let refs: Vec<(&Tensor, DType)> = jobs.iter().map(|(t, d)| (t, *d)).collect();
        let all = convert_f32_raw_all(&refs, true);
        assert_eq!(all.len(), jobs.len());
        // converted now instead: raw data, the same values and statistics
        for ((t, to), (now, later)) in jobs.iter().zip(
            convert_f32_raw_all(&refs, false)
                .into_iter()
                .zip(convert_f32_raw_all(&refs, true)),
        ) {
            if let (Some(now), Some(later)) = (now, later) {
                let ((n, ns), (l, ls)) = (now.tensor(t, *to), later.tensor(t, *to));
                assert!(matches!(n.data, TensorData::Raw(_)), "{to:?} {:?}", t.dims);
                assert_eq!((n, ns), (l, ls), "{to:?} {:?}", t.dims);
            }
        }
        for ((t, to), got) in jobs.iter().zip(all) {
            let got = got.map(|c| c.tensor(t, *to));
            let want = convert_f32_raw(t, *to);
            assert_eq!(got.is_some(), want.is_some(), "{to:?} {:?}", t.dims);
            if let (Some((g, gs)), Some((w, ws))) = (got, want) {
                assert_eq!(g, w, "{to:?} {:?}", t.dims);
                assert_eq!(gs, ws, "{to:?} {:?}", t.dims);
                assert_eq!(g.dtype, *to);
                // and the element-by-element path agrees
                let (slow, ss) = convert_general(t, *to).expect("f32 data converts");
                assert_eq!(g.data, slow.data, "{to:?} {:?}", t.dims);
                assert_eq!(gs, ss, "{to:?} {:?}", t.dims);
            }
        }
    }
}
