//! A CPU emulation of mpopt's CUDA kernels and of cuBLAS's strided batched GEMM.
//!
//! Each kernel of `kernels/cu/` has a transcription here that computes what the `.cu` code computes for
//! every thread (f32 arithmetic, one round-to-nearest-even store per element, raw-bit copies for data
//! movement), reading its arguments in signature order. Every memory access is bounds-checked: an offset
//! or stride bug in the executor is an error naming the kernel, not a silent wrong answer. Launch shapes are
//! checked too (the block-per-output kernels need a block per output and 256 threads).
//!
//! It is slow (plain loops) and exists for tests: the executor's whole GPU path runs on it on machines
//! with no GPU. Transcendentals use Rust's `f32` functions, which may differ from CUDA's by an ulp.

use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use half::{bf16, f16};
use mpopt_kernels::Kernel;

use crate::backend::{Arg, BResult, Backend, GemmCall, GemmType, Grid, Strides3};
use crate::pool::{Pool, Pooled, take};

/// An emulated buffer.
pub type EmuBuf = Arc<Pooled<RwLock<Vec<u8>>>>;

/// The emulator backend.
#[derive(Default)]
pub struct Emu {
    pool: Arc<Mutex<Pool<RwLock<Vec<u8>>>>>,
}

impl Emu {
    /// A fresh emulator.
    pub fn new() -> Emu {
        Emu::default()
    }
}

struct In<'g> {
    b: RwLockReadGuard<'g, Vec<u8>>,
    off: usize,
    k: &'static str,
}

fn oob(k: &str, what: &str, i: i64) -> String {
    format!("kernel {k}: {what} access at element {i} is out of bounds")
}

impl In<'_> {
    fn bytes<const N: usize>(&self, i: i64, what: &str) -> BResult<[u8; N]> {
        if i < 0 {
            return Err(oob(self.k, what, i));
        }
        let s = self.off + i as usize * N;
        self.b
            .get(s..s + N)
            .map(|x| x.try_into().expect("N bytes"))
            .ok_or_else(|| oob(self.k, what, i))
    }
    fn f(&self, i: i64, t: i32) -> BResult<f32> {
        Ok(match t {
            0 => f32::from_le_bytes(self.bytes::<4>(i, "input")?),
            1 => f16::from_bits(u16::from_le_bytes(self.bytes::<2>(i, "input")?)).to_f32(),
            _ => bf16::from_bits(u16::from_le_bytes(self.bytes::<2>(i, "input")?)).to_f32(),
        })
    }
    fn raw(&self, i: i64, es: i32) -> BResult<u64> {
        Ok(match es {
            1 => self.bytes::<1>(i, "input")?[0] as u64,
            2 => u16::from_le_bytes(self.bytes::<2>(i, "input")?) as u64,
            4 => u32::from_le_bytes(self.bytes::<4>(i, "input")?) as u64,
            _ => u64::from_le_bytes(self.bytes::<8>(i, "input")?),
        })
    }
    fn i64(&self, i: i64) -> BResult<i64> {
        Ok(i64::from_le_bytes(self.bytes::<8>(i, "index")?))
    }
    fn u8(&self, i: i64) -> BResult<u8> {
        Ok(self.bytes::<1>(i, "input")?[0])
    }
}

struct Out<'g> {
    b: RwLockWriteGuard<'g, Vec<u8>>,
    off: usize,
    k: &'static str,
}

impl Out<'_> {
    fn put(&mut self, i: i64, bytes: &[u8]) -> BResult<()> {
        let n = bytes.len();
        if i < 0 {
            return Err(oob(self.k, "output", i));
        }
        let s = self.off + i as usize * n;
        let k = self.k;
        self.b
            .get_mut(s..s + n)
            .ok_or_else(|| oob(k, "output", i))?
            .copy_from_slice(bytes);
        Ok(())
    }
    fn setf(&mut self, i: i64, t: i32, v: f32) -> BResult<()> {
        match t {
            0 => self.put(i, &v.to_le_bytes()),
            1 => self.put(i, &f16::from_f32(v).to_bits().to_le_bytes()),
            _ => self.put(i, &bf16::from_f32(v).to_bits().to_le_bytes()),
        }
    }
    fn raw(&mut self, i: i64, es: i32, v: u64) -> BResult<()> {
        match es {
            1 => self.put(i, &[v as u8]),
            2 => self.put(i, &(v as u16).to_le_bytes()),
            4 => self.put(i, &(v as u32).to_le_bytes()),
            _ => self.put(i, &v.to_le_bytes()),
        }
    }
}

/// Positional access to a launch's arguments.
struct Args<'a, 'b> {
    k: &'static str,
    a: &'a [Arg<'b, EmuBuf>],
}

impl<'b> Args<'_, 'b> {
    fn ptr(&self, i: usize) -> BResult<Option<(&'b EmuBuf, usize)>> {
        match self.a.get(i) {
            Some(Arg::Ptr(b, o)) => Ok(Some((*b, *o))),
            Some(Arg::Null) => Ok(None),
            _ => Err(format!("kernel {}: argument {i} is not a pointer", self.k)),
        }
    }
    fn i64(&self, i: usize) -> i64 {
        match self.a.get(i) {
            Some(Arg::I64(v)) => *v,
            _ => 0,
        }
    }
    fn i32(&self, i: usize) -> i32 {
        match self.a.get(i) {
            Some(Arg::I32(v)) => *v,
            _ => 0,
        }
    }
    fn f32(&self, i: usize) -> f32 {
        match self.a.get(i) {
            Some(Arg::F32(v)) => *v,
            _ => 0.0,
        }
    }
    fn u64(&self, i: usize) -> u64 {
        match self.a.get(i) {
            Some(Arg::U64(v)) => *v,
            _ => 0,
        }
    }
    fn strides(&self, i: usize) -> Strides3 {
        match self.a.get(i) {
            Some(Arg::Strides(v)) => *v,
            _ => Strides3::default(),
        }
    }
}

// fmaxf/fminf chains, not clamp: a NaN input gives the bound, as on the device
#[allow(clippy::manual_clamp)]
fn unary_op(x: f32, op: i32, a: f32, b: f32) -> f32 {
    match op {
        0 => {
            if x > 0.0 {
                x
            } else {
                0.0
            }
        }
        1 => 1.0 / (1.0 + (-x).exp()),
        2 => x.tanh(),
        3 => x.exp(),
        4 => x.ln(),
        5 => x.sqrt(),
        6 => -x,
        7 => x.abs(),
        8 => libm::erff(x),
        9 => 1.0 / x,
        10 => {
            if x.is_nan() {
                x
            } else {
                x.max(a).min(b)
            }
        }
        11 => (a * x + b).max(0.0).min(1.0),
        12 => {
            if x >= 0.0 {
                x
            } else {
                a * x
            }
        }
        13 => 0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2)),
        14 => x * (x * (1.0 / 6.0) + 0.5).max(0.0).min(1.0),
        15 => x.floor(),
        16 => x.ceil(),
        17 => x.sin(),
        18 => x.cos(),
        19 => x,
        _ => f32::NAN,
    }
}

fn binary_op(x: f32, y: f32, op: i32, s: f32) -> f32 {
    match op {
        0 => x + y,
        1 => x - y,
        2 => x * y,
        3 => x / y,
        4 => x.powf(y),
        5 => {
            if x.is_nan() || y.is_nan() {
                f32::NAN
            } else {
                x.max(y)
            }
        }
        6 => {
            if x.is_nan() || y.is_nan() {
                f32::NAN
            } else {
                x.min(y)
            }
        }
        7 => x + s * y,
        _ => f32::NAN,
    }
}

fn compare<T: PartialOrd>(x: T, y: T, op: i32) -> u8 {
    (match op {
        0 => x == y,
        1 => x < y,
        2 => x > y,
        3 => x <= y,
        4 => x >= y,
        _ => false,
    }) as u8
}

fn resize_coord(o: i64, in_len: i64, out_len: i64, scale: f32, ctm: i32) -> f32 {
    match ctm {
        1 => o as f32 / scale,
        2 => {
            let ol = in_len as f32 * scale;
            if ol <= 1.0 {
                0.0
            } else {
                o as f32 * (in_len - 1) as f32 / (ol - 1.0)
            }
        }
        3 => {
            if out_len > 1 {
                (o as f32 + 0.5) / scale - 0.5
            } else {
                0.0
            }
        }
        _ => (o as f32 + 0.5) / scale - 0.5,
    }
}

fn nearest_index(c: f32, mode: i32, len: i64) -> i64 {
    let f = match mode {
        0 => {
            if c - c.floor() == 0.5 {
                c.floor()
            } else {
                c.round_ties_even()
            }
        }
        1 => {
            if c - c.floor() == 0.5 {
                c.ceil()
            } else {
                c.round_ties_even()
            }
        }
        2 => c.floor(),
        _ => c.ceil(),
    };
    (f as i64).clamp(0, len - 1)
}

/// Combines two values like `block_reduce`'s max/min (NaN propagates).
fn extreme(acc: f32, v: f32, max: bool) -> f32 {
    if acc.is_nan() || v.is_nan() {
        acc + v
    } else if max {
        acc.max(v)
    } else {
        acc.min(v)
    }
}

impl Emu {
    fn read<'g>(&self, k: &'static str, p: (&'g EmuBuf, usize)) -> BResult<In<'g>> {
        Ok(In {
            b: p.0
                .get()
                .read()
                .map_err(|_| format!("kernel {k}: poisoned"))?,
            off: p.1,
            k,
        })
    }

    fn write<'g>(
        &self,
        k: &'static str,
        p: (&'g EmuBuf, usize),
        inputs: &[Option<(&EmuBuf, usize)>],
    ) -> BResult<Out<'g>> {
        if inputs.iter().flatten().any(|i| Arc::ptr_eq(i.0, p.0)) {
            return Err(format!(
                "kernel {k}: the output buffer is also an input (in-place launches are not used)"
            ));
        }
        Ok(Out {
            b: p.0
                .get()
                .write()
                .map_err(|_| format!("kernel {k}: poisoned"))?,
            off: p.1,
            k,
        })
    }

    fn run(&self, k: Kernel, grid: Grid, a: &Args<'_, '_>) -> BResult<()> {
        let name = k.name;
        fn need(p: BResult<Option<(&EmuBuf, usize)>>) -> BResult<(&EmuBuf, usize)> {
            p?.ok_or_else(|| "a required kernel pointer is null".to_string())
        }
        let per_output = |n: i64| -> BResult<()> {
            if (grid.blocks as i64) < n || grid.threads != 256 {
                return Err(format!(
                    "kernel {name}: needs one block of 256 threads per output ({n}), launched {grid:?}"
                ));
            }
            Ok(())
        };
        match name {
            "unary" => {
                let (x, yp) = (need(a.ptr(0))?, need(a.ptr(1))?);
                let (n, tx, ty, op, p, q) =
                    (a.i64(2), a.i32(3), a.i32(4), a.i32(5), a.f32(6), a.f32(7));
                let x_in = self.read(name, x)?;
                let mut y = self.write(name, yp, &[Some(x)])?;
                for i in 0..n {
                    y.setf(i, ty, unary_op(x_in.f(i, tx)?, op, p, q))?;
                }
            }
            "binary" => {
                let (pa, pb, py) = (need(a.ptr(0))?, need(a.ptr(1))?, need(a.ptr(2))?);
                let (n, v, t, op, s) = (a.i64(3), a.strides(4), a.i32(5), a.i32(6), a.f32(7));
                let (ia, ib) = (self.read(name, pa)?, self.read(name, pb)?);
                let mut y = self.write(name, py, &[Some(pa), Some(pb)])?;
                for i in 0..n {
                    let [oa, ob, oy] = v.offsets(i);
                    y.setf(oy, t, binary_op(ia.f(oa, t)?, ib.f(ob, t)?, op, s))?;
                }
            }
            "compare" | "compare_int" => {
                let (pa, pb, py) = (need(a.ptr(0))?, need(a.ptr(1))?, need(a.ptr(2))?);
                let (n, v) = (a.i64(3), a.strides(4));
                let (ia, ib) = (self.read(name, pa)?, self.read(name, pb)?);
                let mut y = self.write(name, py, &[Some(pa), Some(pb)])?;
                for i in 0..n {
                    let [oa, ob, oy] = v.offsets(i);
                    let r = if name == "compare" {
                        let (t, op) = (a.i32(5), a.i32(6));
                        compare(ia.f(oa, t)?, ib.f(ob, t)?, op)
                    } else if a.i32(6) == 4 {
                        let (x, z) = (ia.raw(oa, 4)? as u32 as i32, ib.raw(ob, 4)? as u32 as i32);
                        compare(x, z, a.i32(5))
                    } else {
                        compare(ia.i64(oa)?, ib.i64(ob)?, a.i32(5))
                    };
                    y.raw(oy, 1, r as u64)?;
                }
            }
            "where_sel" => {
                let (pc, pa, pb, py) = (
                    need(a.ptr(0))?,
                    need(a.ptr(1))?,
                    need(a.ptr(2))?,
                    need(a.ptr(3))?,
                );
                let (n, v, w, es) = (a.i64(4), a.strides(5), a.strides(6), a.i32(7));
                let (ic, ia, ib) = (
                    self.read(name, pc)?,
                    self.read(name, pa)?,
                    self.read(name, pb)?,
                );
                let mut y = self.write(name, py, &[Some(pc), Some(pa), Some(pb)])?;
                for i in 0..n {
                    let [oc, oa, oy] = v.offsets(i);
                    let [ob, _, _] = w.offsets(i);
                    let bits = if ic.u8(oc)? != 0 {
                        ia.raw(oa, es)?
                    } else {
                        ib.raw(ob, es)?
                    };
                    y.raw(oy, es, bits)?;
                }
            }
            "cast_float" => {
                let (x, yp) = (need(a.ptr(0))?, need(a.ptr(1))?);
                let (n, tx, ty) = (a.i64(2), a.i32(3), a.i32(4));
                let xi = self.read(name, x)?;
                let mut y = self.write(name, yp, &[Some(x)])?;
                for i in 0..n {
                    y.setf(i, ty, xi.f(i, tx)?)?;
                }
            }
            "cast_int_float" => {
                let (x, yp) = (need(a.ptr(0))?, need(a.ptr(1))?);
                let (n, es, ty) = (a.i64(2), a.i32(3), a.i32(4));
                let xi = self.read(name, x)?;
                let mut y = self.write(name, yp, &[Some(x)])?;
                for i in 0..n {
                    let r = xi.raw(i, es)?;
                    let v = match es {
                        1 => r as u8 as f32,
                        4 => r as u32 as i32 as f32,
                        _ => r as i64 as f32,
                    };
                    y.setf(i, ty, v)?;
                }
            }
            "not_bool" => {
                let (x, yp) = (need(a.ptr(0))?, need(a.ptr(1))?);
                let n = a.i64(2);
                let xi = self.read(name, x)?;
                let mut y = self.write(name, yp, &[Some(x)])?;
                for i in 0..n {
                    y.raw(i, 1, (xi.u8(i)? == 0) as u64)?;
                }
            }
            "strided_copy" => {
                let (s, d) = (need(a.ptr(0))?, need(a.ptr(1))?);
                let (n, v, es) = (a.i64(2), a.strides(3), a.i32(4));
                let si = self.read(name, s)?;
                let mut y = self.write(name, d, &[Some(s)])?;
                for i in 0..n {
                    let [os, od, _] = v.offsets(i);
                    y.raw(od, es, si.raw(os, es)?)?;
                }
            }
            "gather" => {
                let (s, ix, d) = (need(a.ptr(0))?, need(a.ptr(1))?, need(a.ptr(2))?);
                let (outer, axis_len, nidx, inner, es) =
                    (a.i64(3), a.i64(4), a.i64(5), a.i64(6), a.i32(7));
                let (si, ii) = (self.read(name, s)?, self.read(name, ix)?);
                let mut y = self.write(name, d, &[Some(s), Some(ix)])?;
                for i in 0..outer * nidx * inner {
                    let inn = i % inner;
                    let j = (i / inner) % nidx;
                    let o = i / (inner * nidx);
                    let mut k = ii.i64(j)?;
                    if k < 0 {
                        k += axis_len;
                    }
                    let k = k.clamp(0, axis_len - 1);
                    y.raw(i, es, si.raw((o * axis_len + k) * inner + inn, es)?)?;
                }
            }
            "pad_index" => {
                let (s, d) = (need(a.ptr(0))?, need(a.ptr(1))?);
                let (n, v, mode, es) = (a.i64(2), a.strides(3), a.i32(4), a.i32(5));
                let si = self.read(name, s)?;
                let mut y = self.write(name, d, &[Some(s)])?;
                for i in 0..n {
                    let (mut rem, mut off) = (i, 0i64);
                    for dd in (0..v.rank as usize).rev() {
                        let o = rem % v.shape[dd];
                        rem /= v.shape[dd];
                        let len = v.s1[dd];
                        let mut c = o - v.s2[dd];
                        if mode == 0 || len == 1 {
                            c = c.clamp(0, len - 1);
                        } else {
                            let period = 2 * (len - 1);
                            c = c.rem_euclid(period);
                            if c >= len {
                                c = period - c;
                            }
                        }
                        off += c * v.s0[dd];
                    }
                    y.raw(i, es, si.raw(off, es)?)?;
                }
            }
            "fill" => {
                let d = need(a.ptr(0))?;
                let (n, bits, es) = (a.i64(1), a.u64(2), a.i32(3));
                let mut y = self.write(name, d, &[])?;
                for i in 0..n {
                    y.raw(i, es, bits)?;
                }
            }
            "reduce" => {
                let (x, yp) = (need(a.ptr(0))?, need(a.ptr(1))?);
                let (outer, r, inner, tx, ty, op) =
                    (a.i64(2), a.i64(3), a.i64(4), a.i32(5), a.i32(6), a.i32(7));
                per_output(outer * inner)?;
                let xi = self.read(name, x)?;
                let mut y = self.write(name, yp, &[Some(x)])?;
                for out in 0..outer * inner {
                    let (o, k) = (out / inner, out % inner);
                    let base = o * r * inner + k;
                    let mut acc = match op {
                        2 => f32::NEG_INFINITY,
                        3 => f32::INFINITY,
                        _ => 0.0,
                    };
                    for j in 0..r {
                        let mut v = xi.f(base + j * inner, tx)?;
                        match op {
                            4 | 6 => v *= v,
                            5 => v = v.abs(),
                            _ => {}
                        }
                        acc = match op {
                            2 => extreme(acc, v, true),
                            3 => extreme(acc, v, false),
                            _ => acc + v,
                        };
                    }
                    if op == 1 {
                        acc /= r as f32;
                    }
                    if op == 6 {
                        acc = acc.sqrt();
                    }
                    y.setf(out, ty, acc)?;
                }
            }
            "softmax" => {
                let (x, yp) = (need(a.ptr(0))?, need(a.ptr(1))?);
                let (outer, r, inner, t, op) = (a.i64(2), a.i64(3), a.i64(4), a.i32(5), a.i32(6));
                per_output(outer * inner)?;
                let xi = self.read(name, x)?;
                let mut y = self.write(name, yp, &[Some(x)])?;
                for out in 0..outer * inner {
                    let base = (out / inner) * r * inner + out % inner;
                    let mut m = f32::NEG_INFINITY;
                    for j in 0..r {
                        m = extreme(m, xi.f(base + j * inner, t)?, true);
                    }
                    let mut s = 0.0f32;
                    for j in 0..r {
                        s += (xi.f(base + j * inner, t)? - m).exp();
                    }
                    for j in 0..r {
                        let e = xi.f(base + j * inner, t)? - m;
                        let v = if op == 0 { e.exp() / s } else { e - s.ln() };
                        y.setf(base + j * inner, t, v)?;
                    }
                }
            }
            "layer_norm" => {
                let (x, sc, yp) = (need(a.ptr(0))?, need(a.ptr(1))?, need(a.ptr(3))?);
                let bias = a.ptr(2)?;
                let (outer, r, eps, t, tp) = (a.i64(4), a.i64(5), a.f32(6), a.i32(7), a.i32(8));
                per_output(outer)?;
                let (xi, si) = (self.read(name, x)?, self.read(name, sc)?);
                let bi = bias.map(|b| self.read(name, b)).transpose()?;
                let mut y = self.write(name, yp, &[Some(x), Some(sc), bias])?;
                for o in 0..outer {
                    let base = o * r;
                    let mut s = 0.0f32;
                    for j in 0..r {
                        s += xi.f(base + j, t)?;
                    }
                    let mean = s / r as f32;
                    let mut q = 0.0f32;
                    for j in 0..r {
                        let d = xi.f(base + j, t)? - mean;
                        q += d * d;
                    }
                    let inv = 1.0 / (q / r as f32 + eps).sqrt();
                    for j in 0..r {
                        let mut v = (xi.f(base + j, t)? - mean) * inv * si.f(j, tp)?;
                        if let Some(b) = &bi {
                            v += b.f(j, tp)?;
                        }
                        y.setf(base + j, t, v)?;
                    }
                }
            }
            "im2col" => {
                let (x, c) = (need(a.ptr(0))?, need(a.ptr(1))?);
                let v: Vec<i64> = (2..15).map(|i| a.i64(i)).collect();
                let [cc, h, w, kh_, kw_, oh_, ow_, sh, sw, ph, pw, dh, dw] = v[..] else {
                    unreachable!()
                };
                let es = a.i32(15);
                let xi = self.read(name, x)?;
                let mut y = self.write(name, c, &[Some(x)])?;
                for i in 0..cc * kh_ * kw_ * oh_ * ow_ {
                    let ow = i % ow_;
                    let oh = (i / ow_) % oh_;
                    let kw = (i / (ow_ * oh_)) % kw_;
                    let kh = (i / (ow_ * oh_ * kw_)) % kh_;
                    let ch = i / (ow_ * oh_ * kw_ * kh_);
                    let ih = oh * sh - ph + kh * dh;
                    let iw = ow * sw - pw + kw * dw;
                    let inside = ih >= 0 && ih < h && iw >= 0 && iw < w;
                    let bits = if inside {
                        xi.raw((ch * h + ih) * w + iw, if es == 2 { 2 } else { 4 })?
                    } else {
                        0
                    };
                    y.raw(i, if es == 2 { 2 } else { 4 }, bits)?;
                }
            }
            "pool2d" => {
                let (x, yp) = (need(a.ptr(0))?, need(a.ptr(1))?);
                let v: Vec<i64> = (2..17).map(|i| a.i64(i)).collect();
                let [nc, h, w, oh_, ow_, kh_, kw_, sh, sw, ph, pw, dh, dw, eh, ew] = v[..] else {
                    unreachable!()
                };
                let (mode, cip, t) = (a.i32(17), a.i32(18), a.i32(19));
                let xi = self.read(name, x)?;
                let mut y = self.write(name, yp, &[Some(x)])?;
                for i in 0..nc * oh_ * ow_ {
                    let ow = i % ow_;
                    let oh = (i / ow_) % oh_;
                    let c = i / (ow_ * oh_);
                    let mut acc = if mode == 0 { f32::NEG_INFINITY } else { 0.0 };
                    let (mut cnt, mut cnt_pad) = (0i64, 0i64);
                    for kh in 0..kh_ {
                        let ih = oh * sh - ph + kh * dh;
                        for kw in 0..kw_ {
                            let iw = ow * sw - pw + kw * dw;
                            if ih < 0 || ih >= h || iw < 0 || iw >= w {
                                cnt_pad += (ih < eh && iw < ew) as i64;
                                continue;
                            }
                            let v = xi.f((c * h + ih) * w + iw, t)?;
                            acc = if mode == 0 {
                                extreme(acc, v, true)
                            } else {
                                acc + v
                            };
                            cnt += 1;
                            cnt_pad += 1;
                        }
                    }
                    if mode == 1 {
                        let div = if cip != 0 { cnt_pad } else { cnt };
                        acc = if div > 0 { acc / div as f32 } else { 0.0 };
                    }
                    y.setf(i, t, acc)?;
                }
            }
            "batch_norm" => {
                let ps: Vec<(&EmuBuf, usize)> =
                    (0..6).map(|i| need(a.ptr(i))).collect::<BResult<_>>()?;
                let (n, c, hw, eps, t, tp) =
                    (a.i64(6), a.i64(7), a.i64(8), a.f32(9), a.i32(10), a.i32(11));
                let ins: Vec<In<'_>> = ps[..5]
                    .iter()
                    .map(|p| self.read(name, *p))
                    .collect::<BResult<_>>()?;
                let srcs: Vec<Option<(&EmuBuf, usize)>> =
                    ps[..5].iter().copied().map(Some).collect();
                let mut y = self.write(name, ps[5], &srcs)?;
                for i in 0..n * c * hw {
                    let ch = (i / hw) % c;
                    let v =
                        (ins[0].f(i, t)? - ins[3].f(ch, tp)?) / (ins[4].f(ch, tp)? + eps).sqrt();
                    y.setf(i, t, v * ins[1].f(ch, tp)? + ins[2].f(ch, tp)?)?;
                }
            }
            "resize2d" => {
                let (x, yp) = (need(a.ptr(0))?, need(a.ptr(1))?);
                let (nc, h, w, oh_, ow_) = (a.i64(2), a.i64(3), a.i64(4), a.i64(5), a.i64(6));
                let (sh, sw, mode, ctm, nm, t) = (
                    a.f32(7),
                    a.f32(8),
                    a.i32(9),
                    a.i32(10),
                    a.i32(11),
                    a.i32(12),
                );
                let xi = self.read(name, x)?;
                let mut y = self.write(name, yp, &[Some(x)])?;
                for i in 0..nc * oh_ * ow_ {
                    let ow = i % ow_;
                    let oh = (i / ow_) % oh_;
                    let c = i / (ow_ * oh_);
                    let mut ch = resize_coord(oh, h, oh_, sh, ctm);
                    let mut cw = resize_coord(ow, w, ow_, sw, ctm);
                    let plane = c * h * w;
                    let v = if mode == 0 {
                        xi.f(
                            plane + nearest_index(ch, nm, h) * w + nearest_index(cw, nm, w),
                            t,
                        )?
                    } else {
                        ch = ch.max(0.0).min((h - 1) as f32);
                        cw = cw.max(0.0).min((w - 1) as f32);
                        let (h0, w0) = (ch.floor() as i64, cw.floor() as i64);
                        let h1 = (h0 + 1).min(h - 1);
                        let w1 = (w0 + 1).min(w - 1);
                        let (fh, fw) = (ch - h0 as f32, cw - w0 as f32);
                        let v00 = xi.f(plane + h0 * w + w0, t)?;
                        let v01 = xi.f(plane + h0 * w + w1, t)?;
                        let v10 = xi.f(plane + h1 * w + w0, t)?;
                        let v11 = xi.f(plane + h1 * w + w1, t)?;
                        let top = v00 + (v01 - v00) * fw;
                        let bot = v10 + (v11 - v10) * fw;
                        top + (bot - top) * fh
                    };
                    y.setf(i, t, v)?;
                }
            }
            other => return Err(format!("the emulator has no kernel {other}")),
        }
        Ok(())
    }
}

impl Backend for Emu {
    type Buf = EmuBuf;

    fn describe(&self) -> String {
        "emulator (CPU transcription of the CUDA kernels)".into()
    }

    fn alloc(&self, bytes: usize) -> BResult<EmuBuf> {
        take(&self.pool, bytes, |class| {
            Ok::<_, String>(RwLock::new(vec![0xA5; class]))
        })
    }

    fn upload(&self, data: &[u8]) -> BResult<EmuBuf> {
        let b = self.alloc(data.len())?;
        b.get().write().map_err(|_| "poisoned")?[..data.len()].copy_from_slice(data);
        Ok(b)
    }

    fn download(&self, buf: &EmuBuf, offset: usize, bytes: usize) -> BResult<Vec<u8>> {
        let g = buf.get().read().map_err(|_| "poisoned")?;
        g.get(offset..offset + bytes)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| format!("download of {bytes} bytes at {offset} is out of bounds"))
    }

    fn launch(&self, k: Kernel, grid: Grid, args: &[Arg<'_, EmuBuf>]) -> BResult<()> {
        crate::backend::check_args(k, args)?;
        self.run(k, grid, &Args { k: k.name, a: args })
    }

    fn gemm(&self, c: &GemmCall<'_, EmuBuf>) -> BResult<()> {
        let t = match c.ty {
            GemmType::F32 => 0,
            GemmType::F16 => 1,
            GemmType::BF16 => 2,
        };
        let k = "gemm";
        let ai = self.read(k, (c.a.0, c.a.1))?;
        let bi = self.read(k, (c.b.0, c.b.1))?;
        let old = if c.beta != 0.0 {
            Some(self.download(c.c.0, c.c.1, c.c.0.class().saturating_sub(c.c.1))?)
        } else {
            None
        };
        let mut y = self.write(
            k,
            (c.c.0, c.c.1),
            &[Some((c.a.0, c.a.1)), Some((c.b.0, c.b.1))],
        )?;
        let (lda, sa) = (c.a.2 as i64, c.a.3 as i64);
        let (ldb, sb) = (c.b.2 as i64, c.b.3 as i64);
        let (ldc, sc) = (c.c.2 as i64, c.c.3 as i64);
        let es = if t == 0 { 4 } else { 2 };
        for b in 0..c.batch as i64 {
            for j in 0..c.n as i64 {
                for i in 0..c.m as i64 {
                    let mut acc = 0.0f32;
                    for p in 0..c.k as i64 {
                        let av = if c.trans_a { p + i * lda } else { i + p * lda };
                        let bv = if c.trans_b { j + p * ldb } else { p + j * ldb };
                        acc += ai.f(b * sa + av, t)? * bi.f(b * sb + bv, t)?;
                    }
                    let ci = b * sc + i + j * ldc;
                    let mut v = c.alpha * acc;
                    if let Some(old) = &old {
                        let o = ci as usize * es;
                        let prev = match t {
                            0 => f32::from_le_bytes(old[o..o + 4].try_into().expect("4")),
                            1 => f16::from_bits(u16::from_le_bytes(
                                old[o..o + 2].try_into().expect("2"),
                            ))
                            .to_f32(),
                            _ => bf16::from_bits(u16::from_le_bytes(
                                old[o..o + 2].try_into().expect("2"),
                            ))
                            .to_f32(),
                        };
                        v += c.beta * prev;
                    }
                    y.setf(ci, t, v)?;
                }
            }
        }
        Ok(())
    }

    fn synchronize(&self) -> BResult<()> {
        Ok(())
    }

    fn pool_stats(&self) -> (usize, usize, usize) {
        let p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        (p.allocs, p.reused, p.peak)
    }
}
