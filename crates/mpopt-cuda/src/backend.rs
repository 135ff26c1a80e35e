//! The device interface the executor is written against, and the checks every launch passes.
//!
//! The executor ([`crate::GpuExecutor`]) never calls CUDA directly: it allocates, copies, launches kernels by their
//! typed names ([`mpopt_kernels::Kernel`]) with a list of [`Arg`]s, and calls a row-major batched GEMM. Two
//! backends implement that: [`crate::cuda::Cuda`] (cudarc: NVRTC modules, cuBLAS) and [`crate::emu::Emu`], a
//! CPU emulation of each kernel and of `cublasGemmStridedBatchedEx`. The emulator lets every shape, stride,
//! offset and GEMM-layout decision of the executor be tested on machines with no GPU, on real models, against
//! the CPU reference executor; the CUDA backend then only forwards the same calls.
//!
//! Both backends check each launch against the kernel's C signature, parsed from its `.cu` file
//! ([`signature`]): the argument count and kinds must match (a pointer, `i64`, `int`, `float`, `u64` or the
//! `Strides3` descriptor), so an argument list that would misread the kernel's parameters is an error here
//! instead of garbage on a GPU.

use std::collections::HashMap;
use std::sync::OnceLock;

use mpopt_kernels::{ALL_KERNELS, Kernel};

/// What a backend reports when a call fails.
pub type BResult<T> = Result<T, String>;

/// Number of dimensions a [`Strides3`] descriptor holds (`MAXR` in the prelude).
pub const MAXR: usize = 6;

/// The `Strides3` struct of the prelude: an iteration space and up to three operands' element strides and
/// base offsets. Layout-identical to the C struct (checked by a test).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Strides3 {
    /// Dimensions in use.
    pub rank: i32,
    /// Padding (the C struct has it too).
    pub pad: i32,
    /// The iteration space.
    pub shape: [i64; MAXR],
    /// Operand 0's strides.
    pub s0: [i64; MAXR],
    /// Operand 1's strides.
    pub s1: [i64; MAXR],
    /// Operand 2's strides.
    pub s2: [i64; MAXR],
    /// Operand 0's base offset (elements).
    pub base0: i64,
    /// Operand 1's base offset.
    pub base1: i64,
    /// Operand 2's base offset.
    pub base2: i64,
}

impl Strides3 {
    /// Builds a descriptor for iterating `shape` with up to three operands' strides, merging dimensions that
    /// are contiguous for every operand and dropping size-1 dimensions. `None` when more than [`MAXR`]
    /// dimensions remain (the caller falls back to the CPU).
    pub fn new(shape: &[usize], strides: &[&[i64]], bases: [i64; 3]) -> Option<Strides3> {
        let k = strides.len();
        assert!(k <= 3 && strides.iter().all(|s| s.len() == shape.len()));
        // (size, strides) per kept dimension, outermost first
        let mut dims: Vec<(i64, [i64; 3])> = Vec::new();
        for (d, &n) in shape.iter().enumerate() {
            if n == 1 {
                continue;
            }
            let mut s = [0i64; 3];
            for (j, st) in strides.iter().enumerate() {
                s[j] = st[d];
            }
            if let Some(last) = dims.last_mut() {
                // merge into the previous dimension when it steps exactly over this one for every operand
                if (0..k).all(|j| last.1[j] == s[j] * n as i64) {
                    last.0 *= n as i64;
                    last.1 = s;
                    continue;
                }
            }
            dims.push((n as i64, s));
        }
        if dims.is_empty() {
            dims.push((1, [0; 3]));
        }
        if dims.len() > MAXR {
            return None;
        }
        let mut v = Strides3 {
            rank: dims.len() as i32,
            base0: bases[0],
            base1: bases[1],
            base2: bases[2],
            ..Default::default()
        };
        for (d, (n, s)) in dims.iter().enumerate() {
            v.shape[d] = *n;
            v.s0[d] = s[0];
            v.s1[d] = s[1];
            v.s2[d] = s[2];
        }
        Some(v)
    }

    /// Like [`Strides3::new`] but keeps every dimension as given (no merging, no dropping), so that two
    /// descriptors built over the same shape index the same points in the same order (Where needs four
    /// operands, in two descriptors). `None` past [`MAXR`] dimensions.
    pub fn exact(shape: &[usize], strides: &[&[i64]], bases: [i64; 3]) -> Option<Strides3> {
        if shape.len() > MAXR || strides.len() > 3 {
            return None;
        }
        let mut v = Strides3 {
            rank: shape.len().max(1) as i32,
            base0: bases[0],
            base1: bases[1],
            base2: bases[2],
            ..Default::default()
        };
        v.shape[0] = 1;
        for (d, &n) in shape.iter().enumerate() {
            v.shape[d] = n as i64;
            for (j, st) in strides.iter().enumerate() {
                let s = st[d];
                match j {
                    0 => v.s0[d] = s,
                    1 => v.s1[d] = s,
                    _ => v.s2[d] = s,
                }
            }
        }
        Some(v)
    }

    /// Number of points in the iteration space.
    pub fn len(&self) -> i64 {
        self.shape[..self.rank as usize].iter().product()
    }

    /// Whether the iteration space is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The three operands' offsets of point `i` (what `offsets3` computes on the device).
    pub fn offsets(&self, mut i: i64) -> [i64; 3] {
        let mut o = [self.base0, self.base1, self.base2];
        for d in (0..self.rank as usize).rev() {
            let q = i % self.shape[d];
            i /= self.shape[d];
            o[0] += q * self.s0[d];
            o[1] += q * self.s1[d];
            o[2] += q * self.s2[d];
        }
        o
    }
}

/// One kernel argument. Built on the stack for one launch, so the descriptor is held by value.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Copy, Debug)]
pub enum Arg<'a, B> {
    /// A device pointer: a buffer plus a byte offset.
    Ptr(&'a B, usize),
    /// A null pointer (an absent optional operand).
    Null,
    /// `i64` (`long long`).
    I64(i64),
    /// `int`.
    I32(i32),
    /// `float`.
    F32(f32),
    /// `u64` (`unsigned long long`).
    U64(u64),
    /// The `Strides3` descriptor, by value.
    Strides(Strides3),
}

/// The parameter kinds of a kernel's C signature.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Param {
    /// Any pointer.
    Ptr,
    /// `i64`.
    I64,
    /// `int`.
    I32,
    /// `float`.
    F32,
    /// `u64`.
    U64,
    /// `Strides3`.
    Strides,
}

impl<B> Arg<'_, B> {
    fn kind(&self) -> Param {
        match self {
            Arg::Ptr(..) | Arg::Null => Param::Ptr,
            Arg::I64(_) => Param::I64,
            Arg::I32(_) => Param::I32,
            Arg::F32(_) => Param::F32,
            Arg::U64(_) => Param::U64,
            Arg::Strides(_) => Param::Strides,
        }
    }
}

/// The parameter kinds of `k`, parsed from its `.cu` source.
pub fn signature(k: Kernel) -> &'static [Param] {
    static SIGS: OnceLock<HashMap<&'static str, Vec<Param>>> = OnceLock::new();
    let sigs = SIGS.get_or_init(|| {
        let mut m = HashMap::new();
        for k in ALL_KERNELS {
            m.insert(k.name, parse_signature(k.module.file_source(), k.name));
        }
        m
    });
    sigs.get(k.name).map(|v| v.as_slice()).unwrap_or(&[])
}

fn parse_signature(src: &str, name: &str) -> Vec<Param> {
    let key = format!("__global__ void {name}(");
    let Some(start) = src.find(&key) else {
        return Vec::new();
    };
    let rest = &src[start + key.len()..];
    let params = &rest[..rest.find(')').unwrap_or(rest.len())];
    params
        .split(',')
        .map(|p| {
            let p = p.trim();
            if p.contains('*') {
                Param::Ptr
            } else if p.starts_with("i64") {
                Param::I64
            } else if p.starts_with("int") {
                Param::I32
            } else if p.starts_with("float") {
                Param::F32
            } else if p.starts_with("u64") {
                Param::U64
            } else if p.starts_with("Strides3") {
                Param::Strides
            } else {
                panic!("kernel {name}: unknown parameter type in '{p}'")
            }
        })
        .collect()
}

/// Checks an argument list against the kernel's signature.
pub fn check_args<B>(k: Kernel, args: &[Arg<'_, B>]) -> BResult<()> {
    let sig = signature(k);
    let got: Vec<Param> = args.iter().map(Arg::kind).collect();
    if sig != got.as_slice() {
        return Err(format!(
            "kernel {}: arguments {got:?} do not match its signature {sig:?}",
            k.name
        ));
    }
    Ok(())
}

/// A launch shape: blocks and threads per block (1-D).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grid {
    /// Blocks.
    pub blocks: u32,
    /// Threads per block.
    pub threads: u32,
}

impl Grid {
    /// For grid-stride kernels over `n` elements: 256 threads, at most 65,535 blocks.
    pub fn elems(n: usize) -> Grid {
        Grid {
            blocks: n.div_ceil(256).clamp(1, 65_535) as u32,
            threads: 256,
        }
    }
    /// One block of 256 threads per output element (the reduce kernels).
    pub fn per_output(n: usize) -> Grid {
        Grid {
            blocks: n.max(1) as u32,
            threads: 256,
        }
    }
}

/// Element types cuBLAS multiplies here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmType {
    /// f32 in and out.
    F32,
    /// f16 in and out, f32 accumulation.
    F16,
    /// bf16 in and out, f32 accumulation.
    BF16,
}

/// A batched GEMM in cuBLAS's column-major terms: for each batch b,
/// `C_b = alpha · op(A_b) · op(B_b) + beta · C_b`, with `op(A)` m×k, `op(B)` k×n and C m×n, each matrix at
/// `ptr + b · stride` (elements) with leading dimension `ld`. Exactly `cublasGemmStridedBatchedEx` with
/// `CUBLAS_COMPUTE_32F`.
#[derive(Clone, Copy, Debug)]
pub struct GemmCall<'a, B> {
    /// Element type of A, B and C.
    pub ty: GemmType,
    /// Transpose A.
    pub trans_a: bool,
    /// Transpose B.
    pub trans_b: bool,
    /// Rows of op(A) and C.
    pub m: usize,
    /// Columns of op(B) and C.
    pub n: usize,
    /// Inner dimension.
    pub k: usize,
    /// Scale of the product.
    pub alpha: f32,
    /// A, its byte offset, leading dimension and batch stride.
    pub a: (&'a B, usize, usize, usize),
    /// B, likewise.
    pub b: (&'a B, usize, usize, usize),
    /// Scale of the old C.
    pub beta: f32,
    /// C, likewise.
    pub c: (&'a B, usize, usize, usize),
    /// Batch count.
    pub batch: usize,
}

/// What the executor needs from a device.
pub trait Backend {
    /// A device buffer handle; cloning shares the buffer, and the memory is reused once the last clone drops.
    type Buf: Clone;
    /// A short name for reports ("cuda: NVIDIA H200 (compute_90)", "emulator").
    fn describe(&self) -> String;
    /// An uninitialised buffer of `bytes` bytes (from the pool when one of that size is free).
    fn alloc(&self, bytes: usize) -> BResult<Self::Buf>;
    /// A buffer holding `data`.
    fn upload(&self, data: &[u8]) -> BResult<Self::Buf>;
    /// `bytes` bytes of `buf` from byte `offset`.
    fn download(&self, buf: &Self::Buf, offset: usize, bytes: usize) -> BResult<Vec<u8>>;
    /// Launches `k` (arguments already checked against its signature by the caller).
    fn launch(&self, k: Kernel, grid: Grid, args: &[Arg<'_, Self::Buf>]) -> BResult<()>;
    /// A batched GEMM.
    fn gemm(&self, call: &GemmCall<'_, Self::Buf>) -> BResult<()>;
    /// Waits for the queued work (timing).
    fn synchronize(&self) -> BResult<()>;
    /// Buffer statistics: (allocations made, allocations served from the pool, peak bytes held).
    fn pool_stats(&self) -> (usize, usize, usize);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strides3_has_the_c_layout() {
        // int, int, four i64[6] arrays, three i64: 4 + 4 + 4·48 + 24
        assert_eq!(std::mem::size_of::<Strides3>(), 224);
        assert_eq!(std::mem::align_of::<Strides3>(), 8);
        assert_eq!(std::mem::offset_of!(Strides3, shape), 8);
        assert_eq!(std::mem::offset_of!(Strides3, base0), 200);
        let src = mpopt_kernels::PRELUDE;
        let body = &src[src.find("struct Strides3 {").unwrap()..];
        let body = &body[..body.find("};").unwrap()];
        let fields: Vec<&str> = body
            .lines()
            .skip(1)
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        assert_eq!(
            fields,
            [
                "int rank;",
                "int pad;",
                "i64 shape[MAXR];",
                "i64 s0[MAXR];",
                "i64 s1[MAXR];",
                "i64 s2[MAXR];",
                "i64 base0;",
                "i64 base1;",
                "i64 base2;"
            ]
        );
        assert!(src.contains(&format!("#define MAXR {MAXR}")));
    }

    #[test]
    fn strides_merge_contiguous_dims_and_drop_ones() {
        // a contiguous [2,3,4] copy is one dimension of 24
        let v = Strides3::new(&[2, 3, 4], &[&[12, 4, 1], &[12, 4, 1]], [0; 3]).unwrap();
        assert_eq!((v.rank, v.shape[0], v.s0[0], v.s1[0]), (1, 24, 1, 1));
        // a transpose [2,3] -> [3,2] keeps two dimensions
        let v = Strides3::new(&[3, 2], &[&[1, 3], &[2, 1]], [0; 3]).unwrap();
        assert_eq!(v.rank, 2);
        let offs: Vec<[i64; 3]> = (0..6).map(|i| v.offsets(i)).collect();
        assert_eq!(
            offs.iter().map(|o| o[0]).collect::<Vec<_>>(),
            [0, 3, 1, 4, 2, 5]
        );
        assert_eq!(
            offs.iter().map(|o| o[1]).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4, 5]
        );
        // broadcast of [3,1] against [3,4]: size-1 dims vanish, stride 0 kept
        let v = Strides3::new(&[1, 3, 4], &[&[0, 1, 0], &[12, 4, 1]], [0; 3]).unwrap();
        assert_eq!(v.rank, 2);
        assert_eq!(v.offsets(5), [1, 5, 0]);
        // a scalar
        let v = Strides3::new(&[], &[&[], &[]], [7, 0, 0]).unwrap();
        assert_eq!((v.rank, v.len(), v.offsets(0)[0]), (1, 1, 7));
        // seven dims that cannot merge
        let shape = [2usize; 7];
        let s: Vec<i64> = (0..7).map(|d| 1i64 << (2 * d)).collect();
        assert!(Strides3::new(&shape, &[&s], [0; 3]).is_none());
    }

    #[test]
    fn signatures_parse_from_the_sources() {
        assert_eq!(
            signature(mpopt_kernels::UNARY),
            [
                Param::Ptr,
                Param::Ptr,
                Param::I64,
                Param::I32,
                Param::I32,
                Param::I32,
                Param::F32,
                Param::F32
            ]
        );
        assert_eq!(
            signature(mpopt_kernels::STRIDED_COPY),
            [
                Param::Ptr,
                Param::Ptr,
                Param::I64,
                Param::Strides,
                Param::I32
            ]
        );
        for k in ALL_KERNELS {
            assert!(!signature(*k).is_empty(), "{}", k.name);
        }
        let bad: [Arg<'_, ()>; 2] = [Arg::Null, Arg::I32(1)];
        let e = check_args(mpopt_kernels::FILL, &bad).unwrap_err();
        assert!(e.contains("do not match"), "{e}");
    }
}
