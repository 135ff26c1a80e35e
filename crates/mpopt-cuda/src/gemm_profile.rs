//! Timing of the executor's GEMMs, shape by shape, to compare the GEMM path with cuBLAS's own best for the
//! same shapes (`mpopt run --device cuda --gemm-profile FILE`, then `bench/gpu_gemm_peak.py` on the GPU
//! machine times `torch.matmul` on the shapes in FILE).
//!
//! [`Profiled`] wraps a [`Backend`] and passes every call through. While [`GemmLog::set_on`] is true, each
//! GEMM is timed on the host between two synchronizations: the stream is drained, the call is made
//! [`REPEAT`] times (once when `beta != 0`, where a repeat would add into C again; with `beta == 0` each
//! repeat writes the same C, so the outputs stay right) and drained again; the time per call is the
//! elapsed time over the calls. Off (the default), it adds nothing but a flag test. The times are wall
//! times of whole calls, launches included: what the executor's GEMMs cost, not a kernel's alone.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use mpopt_kernels::Kernel;

use crate::backend::{Arg, BResult, Backend, GemmCall, GemmType, Grid};

/// Calls per timed GEMM when `beta == 0`.
pub const REPEAT: usize = 10;

/// A GEMM's shape and layout, in cuBLAS's column-major terms ([`GemmCall`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GemmShape {
    /// `"f32"`, `"f16"` or `"bf16"`.
    pub ty: &'static str,
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
    /// Batch count.
    pub batch: usize,
}

impl GemmShape {
    /// Floating-point operations of one call (a multiply and an add per term).
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64 * self.batch as f64
    }
}

/// Calls and seconds per shape.
#[derive(Clone, Default)]
pub struct GemmLog {
    on: Arc<AtomicBool>,
    times: Arc<Mutex<BTreeMap<GemmShape, (usize, f64)>>>,
}

impl GemmLog {
    /// Turns the timing on or off.
    pub fn set_on(&self, on: bool) {
        self.on.store(on, Ordering::Relaxed);
    }

    fn is_on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// Every shape timed so far: (shape, calls, seconds per call).
    pub fn rows(&self) -> Vec<(GemmShape, usize, f64)> {
        let t = self.times.lock().unwrap_or_else(|e| e.into_inner());
        t.iter()
            .map(|(s, &(calls, secs))| (*s, calls, secs / calls.max(1) as f64))
            .collect()
    }
}

/// A backend whose GEMMs can be timed ([`GemmLog`]).
pub struct Profiled<B> {
    inner: B,
    log: GemmLog,
}

impl<B: Backend> Profiled<B> {
    /// `inner`, with timing off; `log` is a handle to turn it on and read it.
    pub fn new(inner: B) -> (Profiled<B>, GemmLog) {
        let log = GemmLog::default();
        (
            Profiled {
                inner,
                log: log.clone(),
            },
            log,
        )
    }
}

impl<B: Backend> Backend for Profiled<B> {
    type Buf = B::Buf;
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn alloc(&self, bytes: usize) -> BResult<Self::Buf> {
        self.inner.alloc(bytes)
    }
    fn upload(&self, data: &[u8]) -> BResult<Self::Buf> {
        self.inner.upload(data)
    }
    fn download(&self, buf: &Self::Buf, offset: usize, bytes: usize) -> BResult<Vec<u8>> {
        self.inner.download(buf, offset, bytes)
    }
    fn launch(&self, k: Kernel, grid: Grid, args: &[Arg<'_, Self::Buf>]) -> BResult<()> {
        self.inner.launch(k, grid, args)
    }
    fn gemm(&self, call: &GemmCall<'_, Self::Buf>) -> BResult<()> {
        if !self.log.is_on() {
            return self.inner.gemm(call);
        }
        let reps = if call.beta == 0.0 { REPEAT } else { 1 };
        self.inner.synchronize()?;
        let t = Instant::now();
        for _ in 0..reps {
            self.inner.gemm(call)?;
        }
        self.inner.synchronize()?;
        let secs = t.elapsed().as_secs_f64() / reps as f64;
        let shape = GemmShape {
            ty: match call.ty {
                GemmType::F32 => "f32",
                GemmType::F16 => "f16",
                GemmType::BF16 => "bf16",
            },
            trans_a: call.trans_a,
            trans_b: call.trans_b,
            m: call.m,
            n: call.n,
            k: call.k,
            batch: call.batch,
        };
        let mut times = self.log.times.lock().unwrap_or_else(|e| e.into_inner());
        let e = times.entry(shape).or_default();
        e.0 += 1;
        e.1 += secs;
        Ok(())
    }
    fn synchronize(&self) -> BResult<()> {
        self.inner.synchronize()
    }
    fn pool_stats(&self) -> (usize, usize, usize) {
        self.inner.pool_stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Emu, GpuExecutor};
    use mpopt_exec::{Tensor, Value};

    fn run(ex: &GpuExecutor<'_, Profiled<Emu>>, n: usize) -> Vec<(String, Value)> {
        let x: Vec<f32> = (0..n * 16).map(|i| (i as f32 * 0.37).sin()).collect();
        ex.run(vec![(
            "x".into(),
            Value::Tensor(Tensor::f32(vec![n, 16], x)),
        )])
        .expect("runs")
        .outputs
    }

    #[test]
    fn times_every_gemm_shape_without_changing_the_outputs() {
        // the source tree this was built from, else the working folder (the test binary run from the
        // repository's root on another machine: bench/gpu-device.sh)
        let rel = "testdata/models/tiny_mlp.onnx";
        let path = [
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../..")
                .join(rel),
            std::path::PathBuf::from(rel),
        ]
        .into_iter()
        .find(|p| p.exists())
        .expect("testdata/models/tiny_mlp.onnx (run from the repository's root)");
        let model = mpopt_onnx::load(&path).expect("tiny_mlp loads");
        let (dev, log) = Profiled::new(Emu::new());
        let mut ex = GpuExecutor::new(&model, dev).expect("executor");
        // every node on the device, however small
        ex.set_host_limit(0);
        let plain = run(&ex, 5);
        assert!(log.rows().is_empty(), "off by default");
        log.set_on(true);
        let timed = run(&ex, 5);
        run(&ex, 5);
        log.set_on(false);
        run(&ex, 5);
        let out = |o: &[(String, Value)]| -> Vec<u32> {
            let t = o[0].1.tensor().expect("a tensor");
            t.to_f32s()
                .expect("f32")
                .iter()
                .map(|v| v.to_bits())
                .collect()
        };
        assert_eq!(
            out(&plain),
            out(&timed),
            "timed GEMMs give the same outputs"
        );
        // x[5,16] @ w1[16,32] and h[5,32] @ w2[32,4], each once per timed run (two runs); in cuBLAS's
        // column-major terms the row-major product is C^T = W^T X^T: m is the output width, n the rows
        let rows = log.rows();
        let shapes: Vec<(usize, usize, usize, usize)> =
            rows.iter().map(|(s, c, _)| (s.m, s.n, s.k, *c)).collect();
        assert_eq!(shapes.len(), 2, "{rows:?}");
        for (m, k) in [(32, 16), (4, 32)] {
            assert!(
                shapes.contains(&(m, 5, k, 2)),
                "a {m}x5x{k} GEMM, twice: {shapes:?}"
            );
        }
        for (s, _, secs) in &rows {
            assert_eq!((s.ty, s.batch), ("f32", 1));
            assert!(*secs > 0.0 && s.flops() > 0.0);
        }
    }
}
