//! The CUDA backend: cudarc with dynamic loading, NVRTC-compiled modules cached on disk, cuBLAS GEMMs.
//!
//! [`Cuda::open`] first probes for the driver, NVRTC and cuBLAS libraries (cudarc panics when it calls into a
//! library that is not there; the probe turns that into [`CudaError::NoDriver`]). Modules are compiled on
//! first use for the device's architecture and cached under [`cache_dir`] by a hash of the source and the
//! architecture, so a second process loads PTX from disk. Everything runs on one stream, in order.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use cudarc::cublas::{CudaBlas, result as blas, sys as blas_sys};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
    LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::{CompileOptions, Ptx};
use mpopt_kernels::{Kernel, Module};

use crate::CudaError;
use crate::backend::{Arg, BResult, Backend, GemmCall, GemmType, Grid, Strides3};
use crate::pool::{Pool, Pooled, take};

// SAFETY: Strides3 is #[repr(C)], plain old data, layout-checked against the C struct in a test.
unsafe impl DeviceRepr for Strides3 {}

/// Checks that the CUDA driver, NVRTC and cuBLAS libraries can be loaded, without calling into them.
pub fn probe_libraries() -> Result<(), CudaError> {
    // SAFETY: these only try to dlopen the libraries.
    let (drv, rtc, bl) = unsafe {
        (
            cudarc::driver::sys::is_culib_present(),
            cudarc::nvrtc::sys::is_culib_present(),
            cudarc::cublas::sys::is_culib_present(),
        )
    };
    if !drv {
        return Err(CudaError::NoDriver(
            "CUDA driver library (libcuda.so) not found: no NVIDIA driver on this machine".into(),
        ));
    }
    if !rtc {
        return Err(CudaError::NoDriver(
            "NVRTC library (libnvrtc.so) not found: install the CUDA runtime compiler".into(),
        ));
    }
    if !bl {
        return Err(CudaError::NoDriver(
            "cuBLAS library (libcublas.so) not found: install cuBLAS".into(),
        ));
    }
    Ok(())
}

/// Where compiled PTX is cached: `$MPOPT_CACHE_DIR`, else `$XDG_CACHE_HOME/mpopt/ptx`, else
/// `$HOME/.cache/mpopt/ptx`, else the system temporary folder.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("MPOPT_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("mpopt/ptx");
    }
    if let Some(d) = std::env::var_os("HOME") {
        return PathBuf::from(d).join(".cache/mpopt/ptx");
    }
    std::env::temp_dir().join("mpopt-ptx")
}

/// The cache file name of a module's source compiled for `arch`: FNV-1a 64 of the source, the architecture
/// and the NVRTC options, so any change to any of them misses the cache.
pub fn cache_key(module: &str, source: &str, arch: &str, options: &[String]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    };
    eat(source.as_bytes());
    eat(arch.as_bytes());
    for o in options {
        eat(o.as_bytes());
    }
    format!("{module}-{arch}-{h:016x}.ptx")
}

/// The NVRTC `--gpu-architecture` value for a compute capability: the virtual architecture `compute_XY`, for
/// which NVRTC emits PTX (a real `sm_XY` would make it emit a cubin instead, and no PTX); the driver compiles
/// the PTX for the exact device when the module loads.
pub fn arch_name(major: i32, minor: i32) -> &'static str {
    match (major, minor) {
        (5, _) => "compute_52",
        (6, 0) => "compute_60",
        (6, _) => "compute_61",
        (7, 0) => "compute_70",
        (7, 2) => "compute_72",
        (7, _) => "compute_75",
        (8, 0) => "compute_80",
        (8, 6) => "compute_86",
        (8, 7) => "compute_87",
        (8, _) => "compute_89",
        (9, _) => "compute_90",
        (10, 0) => "compute_100",
        (10, _) => "compute_101",
        (12, _) => "compute_120",
        _ => "compute_80",
    }
}

/// A device buffer from the pool.
pub type CudaBuf = Arc<Pooled<CudaSlice<u8>>>;

/// One GPU: context, stream, cuBLAS handle, loaded modules and the buffer pool.
pub struct Cuda {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    arch: &'static str,
    name: String,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    funcs: Mutex<HashMap<&'static str, CudaFunction>>,
    pool: Arc<Mutex<Pool<CudaSlice<u8>>>>,
}

fn drv(e: cudarc::driver::DriverError) -> String {
    format!("CUDA driver: {e}")
}

impl Cuda {
    /// Opens GPU `ordinal`: probes the libraries first, so a machine without CUDA gets an error value.
    pub fn open(ordinal: usize) -> Result<Cuda, CudaError> {
        probe_libraries()?;
        let count = CudaContext::device_count().map_err(|e| CudaError::Driver(drv(e)))?;
        if count <= 0 {
            return Err(CudaError::NoDriver("the CUDA driver reports no GPU".into()));
        }
        if ordinal >= count as usize {
            return Err(CudaError::Driver(format!(
                "GPU {ordinal} requested, the driver reports {count}"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| CudaError::Driver(drv(e)))?;
        // One stream, in order: cudarc's per-buffer events are not needed.
        // SAFETY: no buffer exists yet, and this executor never creates a second stream.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| CudaError::Driver(drv(e)))?;
        let name = ctx.name().map_err(|e| CudaError::Driver(drv(e)))?;
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone())
            .map_err(|e| CudaError::Driver(format!("cuBLAS: {e:?}")))?;
        Ok(Cuda {
            ctx,
            stream,
            blas,
            arch: arch_name(major, minor),
            name,
            modules: Mutex::default(),
            funcs: Mutex::default(),
            pool: Arc::default(),
        })
    }

    fn module(&self, m: Module) -> BResult<Arc<CudaModule>> {
        if let Some(x) = self.modules.lock().map_err(|_| "poisoned")?.get(m.name()) {
            return Ok(x.clone());
        }
        let src = m.source();
        let options: Vec<String> = vec!["--std=c++17".into()];
        let file = cache_dir().join(cache_key(m.name(), &src, self.arch, &options));
        let ptx = match std::fs::read_to_string(&file) {
            Ok(text) if text.contains(".entry") => Ptx::from_src(text),
            _ => {
                let opts = CompileOptions {
                    arch: Some(self.arch),
                    options,
                    name: Some(format!("{}.cu", m.name())),
                    ..Default::default()
                };
                let ptx = cudarc::nvrtc::compile_ptx_with_opts(&src, opts)
                    .map_err(|e| format!("NVRTC could not compile {}.cu: {e:?}", m.name()))?;
                // a cache that cannot be written only costs a recompile next time
                if let Some(dir) = file.parent() {
                    let _ = std::fs::create_dir_all(dir);
                    let tmp = file.with_extension(format!("tmp{}", std::process::id()));
                    if std::fs::write(&tmp, ptx.to_src()).is_ok() {
                        let _ = std::fs::rename(&tmp, &file);
                    }
                }
                ptx
            }
        };
        let module = self.ctx.load_module(ptx).map_err(drv)?;
        self.modules
            .lock()
            .map_err(|_| "poisoned")?
            .insert(m.name(), module.clone());
        Ok(module)
    }

    fn function(&self, k: Kernel) -> BResult<CudaFunction> {
        if let Some(f) = self.funcs.lock().map_err(|_| "poisoned")?.get(k.name) {
            return Ok(f.clone());
        }
        let f = self.module(k.module)?.load_function(k.name).map_err(drv)?;
        self.funcs
            .lock()
            .map_err(|_| "poisoned")?
            .insert(k.name, f.clone());
        Ok(f)
    }

    fn ptr(&self, b: &CudaBuf, offset: usize) -> u64 {
        let (p, _sync) = b.get().device_ptr(&self.stream);
        p + offset as u64
    }
}

impl Backend for Cuda {
    type Buf = CudaBuf;

    fn describe(&self) -> String {
        format!("cuda: {} ({})", self.name, self.arch)
    }

    fn alloc(&self, bytes: usize) -> BResult<CudaBuf> {
        take(&self.pool, bytes, |class| {
            // SAFETY: every buffer is written by a kernel, a copy or a GEMM before it is read.
            unsafe { self.stream.alloc::<u8>(class) }.map_err(drv)
        })
    }

    fn upload(&self, data: &[u8]) -> BResult<CudaBuf> {
        let b = self.alloc(data.len())?;
        if !data.is_empty() {
            let p = self.ptr(&b, 0);
            // SAFETY: the buffer was just allocated with at least data.len() bytes; the stream is
            // synchronised before `data` can go away.
            unsafe { cudarc::driver::result::memcpy_htod_async(p, data, self.stream.cu_stream()) }
                .map_err(drv)?;
            self.stream.synchronize().map_err(drv)?;
        }
        Ok(b)
    }

    fn download(&self, buf: &CudaBuf, offset: usize, bytes: usize) -> BResult<Vec<u8>> {
        let mut out = vec![0u8; bytes];
        if bytes > 0 {
            let p = self.ptr(buf, offset);
            // SAFETY: `out` has `bytes` bytes and the source range lies in the buffer (callers pass a tensor's
            // own range); the stream is synchronised before `out` is read.
            unsafe {
                cudarc::driver::result::memcpy_dtoh_async(&mut out, p, self.stream.cu_stream())
            }
            .map_err(drv)?;
        }
        self.stream.synchronize().map_err(drv)?;
        Ok(out)
    }

    fn launch(&self, k: Kernel, grid: Grid, args: &[Arg<'_, CudaBuf>]) -> BResult<()> {
        crate::backend::check_args(k, args)?;
        let f = self.function(k)?;
        // Every argument is passed by address: pointers as u64 device addresses.
        #[allow(clippy::large_enum_variant)]
        enum Val {
            U64(u64),
            I64(i64),
            I32(i32),
            F32(f32),
            S(Strides3),
        }
        let vals: Vec<Val> = args
            .iter()
            .map(|a| match a {
                Arg::Ptr(b, o) => Val::U64(self.ptr(b, *o)),
                Arg::Null => Val::U64(0),
                Arg::I64(v) => Val::I64(*v),
                Arg::I32(v) => Val::I32(*v),
                Arg::F32(v) => Val::F32(*v),
                Arg::U64(v) => Val::U64(*v),
                Arg::Strides(s) => Val::S(*s),
            })
            .collect();
        let mut lb = self.stream.launch_builder(&f);
        for v in &vals {
            match v {
                Val::U64(x) => lb.arg(x),
                Val::I64(x) => lb.arg(x),
                Val::I32(x) => lb.arg(x),
                Val::F32(x) => lb.arg(x),
                Val::S(x) => lb.arg(x),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: (grid.blocks, 1, 1),
            block_dim: (grid.threads, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the argument kinds were checked against the kernel's C signature above, and every pointer
        // addresses a live buffer held by the caller until the stream is synchronised.
        unsafe { lb.launch(cfg) }.map_err(drv)?;
        Ok(())
    }

    fn gemm(&self, c: &GemmCall<'_, CudaBuf>) -> BResult<()> {
        use blas_sys::cudaDataType_t as D;
        let dt = match c.ty {
            GemmType::F32 => D::CUDA_R_32F,
            GemmType::F16 => D::CUDA_R_16F,
            GemmType::BF16 => D::CUDA_R_16BF,
        };
        let op = |t: bool| {
            if t {
                blas_sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                blas_sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let (alpha, beta) = (c.alpha, c.beta);
        let pa = self.ptr(c.a.0, c.a.1);
        let pb = self.ptr(c.b.0, c.b.1);
        let pc = self.ptr(c.c.0, c.c.1);
        // SAFETY: the pointers address live buffers sized by the executor for these dimensions; alpha/beta
        // are host f32 values, as CUBLAS_COMPUTE_32F expects.
        unsafe {
            blas::gemm_strided_batched_ex(
                *self.blas.handle(),
                op(c.trans_a),
                op(c.trans_b),
                c.m as i32,
                c.n as i32,
                c.k as i32,
                (&alpha) as *const f32 as *const _,
                pa as *const _,
                dt,
                c.a.2 as i32,
                c.a.3 as i64,
                pb as *const _,
                dt,
                c.b.2 as i32,
                c.b.3 as i64,
                (&beta) as *const f32 as *const _,
                pc as *mut _,
                dt,
                c.c.2 as i32,
                c.c.3 as i64,
                c.batch as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| {
            format!(
                "cuBLAS GEMM ({}x{}x{}, batch {}): {e:?}",
                c.m, c.n, c.k, c.batch
            )
        })
    }

    fn synchronize(&self) -> BResult<()> {
        self.stream.synchronize().map_err(drv)
    }

    fn pool_stats(&self) -> (usize, usize, usize) {
        let p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        (p.allocs, p.reused, p.peak)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_keys_change_with_source_arch_and_options() {
        let o = vec!["--std=c++17".to_string()];
        let a = cache_key("nn", "src", "sm_90", &o);
        assert_eq!(a, cache_key("nn", "src", "sm_90", &o), "stable");
        assert!(a.starts_with("nn-sm_90-") && a.ends_with(".ptx"));
        assert_ne!(a, cache_key("nn", "src2", "sm_90", &o));
        assert_ne!(a, cache_key("nn", "src", "sm_80", &o));
        assert_ne!(a, cache_key("nn", "src", "sm_90", &[]));
        // the hash of a fixed input never changes between builds (it names files on disk)
        assert_eq!(
            cache_key("m", "", "", &[]),
            format!("m--{:016x}.ptx", {
                let mut h: u64 = 0xcbf2_9ce4_8422_2325;
                for _ in 0..2 {
                    h ^= 0xff;
                    h = h.wrapping_mul(0x0000_0100_0000_01b3);
                }
                h
            })
        );
    }

    #[test]
    fn architectures() {
        assert_eq!(arch_name(9, 0), "compute_90");
        assert_eq!(arch_name(8, 0), "compute_80");
        assert_eq!(arch_name(8, 9), "compute_89");
    }

    #[test]
    fn no_driver_is_an_error_value() {
        // On a machine with CUDA this opens the GPU; without, it must be NoDriver, never a panic.
        match Cuda::open(0) {
            Ok(c) => eprintln!("GPU present: {}", c.describe()),
            Err(CudaError::NoDriver(m)) => eprintln!("SKIP: no CUDA driver ({m})"),
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
}
