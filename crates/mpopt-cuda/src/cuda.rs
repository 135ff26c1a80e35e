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

/// The NVRTC options every module is compiled with (besides the architecture); part of the cache key.
pub fn nvrtc_options() -> Vec<String> {
    vec!["--std=c++17".into()]
}

/// Compiles one kernel module with NVRTC for a virtual architecture (`compute_90`, see [`arch_name`]), as
/// [`Cuda`] does on first use. Needs only the NVRTC library, no driver or GPU; call [`nvrtc_present`] first
/// (cudarc panics when the library is missing).
pub fn compile(m: Module, arch: &'static str) -> BResult<Ptx> {
    let opts = CompileOptions {
        arch: Some(arch),
        options: nvrtc_options(),
        name: Some(format!("{}.cu", m.name())),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(m.source(), opts)
        .map_err(|e| format!("NVRTC could not compile {}.cu for {arch}: {e:?}", m.name()))
}

/// NVRTC's version, (major, minor). The library must load ([`nvrtc_present`]).
pub fn nvrtc_version() -> BResult<(i32, i32)> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two out-pointers to live ints; cudarc loads the library (present: probed by the callers)
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if r != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(format!("nvrtcVersion failed: {r:?}"));
    }
    Ok((major, minor))
}

/// The CUDA version the driver supports, as `cuDriverGetVersion` gives it (1000 * major + 10 * minor).
fn driver_version() -> BResult<i32> {
    let mut v = 0;
    // SAFETY: one out-pointer to a live int; the driver library was probed
    let r = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
    if r != cudarc::driver::sys::CUresult::CUDA_SUCCESS {
        return Err(format!("cuDriverGetVersion failed: {r:?}"));
    }
    Ok(v)
}

/// PTX loads only on a driver at least as new as the NVRTC that wrote it (NVRTC 12.9 writes PTX ISA 8.8,
/// which a 12.4 driver rejects with `CUDA_ERROR_UNSUPPORTED_PTX_VERSION` when the first kernel loads).
/// Checked when the GPU opens, so the error says what to change.
pub fn nvrtc_fits_driver(nvrtc: (i32, i32), driver: i32) -> Result<(), String> {
    let (dmaj, dmin) = (driver / 1000, driver % 1000 / 10);
    if nvrtc > (dmaj, dmin) {
        return Err(format!(
            "NVRTC {}.{} is newer than the CUDA driver ({dmaj}.{dmin}): the driver cannot load the PTX it \
             writes; install NVRTC {dmaj}.{dmin} or older (for example nvidia-cuda-nvrtc-cu{dmaj}=={dmaj}.{dmin}.*), \
             or update the driver",
            nvrtc.0, nvrtc.1
        ));
    }
    Ok(())
}

/// Whether the NVRTC library can be loaded (without calling into it).
pub fn nvrtc_present() -> bool {
    // SAFETY: this only tries to dlopen the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// A device buffer from the pool.
pub type CudaBuf = Arc<Pooled<CudaSlice<u8>>>;

/// One GPU: context, stream, cuBLAS handle, loaded modules and the buffer pool.
pub struct Cuda {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    arch: &'static str,
    /// NVRTC's (major, minor): part of the PTX cache key.
    nvrtc: (i32, i32),
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
        let nvrtc = nvrtc_version().map_err(CudaError::Driver)?;
        let driver = driver_version().map_err(CudaError::Driver)?;
        nvrtc_fits_driver(nvrtc, driver).map_err(CudaError::NoDriver)?;
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
            nvrtc,
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
        // PTX from one NVRTC stays cached when another is installed: the version is part of the key, so that
        // going back to an older NVRTC (one the driver accepts) does not load the newer one's PTX
        let mut key = nvrtc_options();
        key.push(format!("nvrtc {}.{}", self.nvrtc.0, self.nvrtc.1));
        let file = cache_dir().join(cache_key(m.name(), &src, self.arch, &key));
        let ptx = match std::fs::read_to_string(&file) {
            Ok(text) if text.contains(".entry") => Ptx::from_src(text),
            _ => {
                let ptx = compile(m, self.arch)?;
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
    fn nvrtc_newer_than_the_driver_is_refused() {
        assert!(nvrtc_fits_driver((12, 4), 12040).is_ok());
        assert!(nvrtc_fits_driver((12, 4), 12090).is_ok());
        assert!(nvrtc_fits_driver((11, 8), 12000).is_ok());
        let e = nvrtc_fits_driver((12, 9), 12040).unwrap_err();
        assert!(
            e.contains("NVRTC 12.9") && e.contains("driver (12.4)"),
            "{e}"
        );
        assert!(nvrtc_fits_driver((13, 0), 12090).is_err());
    }

    #[test]
    fn architectures() {
        assert_eq!(arch_name(9, 0), "compute_90");
        assert_eq!(arch_name(8, 0), "compute_80");
        assert_eq!(arch_name(8, 9), "compute_89");
    }

    /// One `.param` of a PTX entry: its PTX type (`.u64`, `.u32`, `.f32`, or `.b8` for a struct), byte size
    /// and alignment.
    fn ptx_params<'p>(ptx: &'p str, entry: &str) -> Option<Vec<(&'p str, usize, usize)>> {
        let head = format!(".visible .entry {entry}(");
        let start = ptx.find(&head)? + head.len();
        let body = &ptx[start..start + ptx[start..].find(')')?];
        let params = body
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with(".param"))
            .map(|l| {
                let words: Vec<&str> = l.trim_end_matches(',').split_whitespace().collect();
                let ty = words
                    .iter()
                    .find(|w| [".u64", ".u32", ".f32", ".b8"].contains(w))
                    .unwrap_or_else(|| panic!("{entry}: unexpected PTX parameter '{l}'"));
                let align = words
                    .iter()
                    .position(|w| *w == ".align")
                    .map(|i| words[i + 1].parse().expect("alignment"));
                let size = match *ty {
                    ".u64" => 8,
                    ".u32" | ".f32" => 4,
                    _ => {
                        let name = words.last().expect("a name");
                        let n = &name[name.find('[').expect("an array") + 1..name.len() - 1];
                        n.parse().expect("array length")
                    }
                };
                (*ty, size, align.unwrap_or(size))
            })
            .collect();
        Some(params)
    }

    /// What the launch side passes for each C parameter kind: PTX type, size and alignment of the Rust value.
    fn launched(p: crate::backend::Param) -> (&'static str, usize, usize) {
        use crate::backend::Param;
        use std::mem::{align_of, size_of};
        match p {
            Param::Ptr | Param::U64 | Param::I64 => (".u64", size_of::<u64>(), align_of::<u64>()),
            Param::I32 => (".u32", size_of::<i32>(), align_of::<i32>()),
            Param::F32 => (".f32", size_of::<f32>(), align_of::<f32>()),
            Param::Strides => (".b8", size_of::<Strides3>(), align_of::<Strides3>()),
        }
    }

    /// `ptxas` from `$MPOPT_PTXAS` or the `PATH`, if it runs.
    fn ptxas() -> Option<PathBuf> {
        let p = std::env::var_os("MPOPT_PTXAS")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("ptxas"));
        let ok = std::process::Command::new(&p)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        ok.then_some(p)
    }

    /// The kernels as a GPU gets them, checked without one: NVRTC compiles every module for Ampere and Hopper
    /// with the options [`Cuda`] uses, every typed kernel is an entry point whose parameters have the size
    /// and alignment of the values the launch side passes (its C signature as `backend::signature` parses
    /// it), and `ptxas` assembles the PTX for the real architecture, as the driver's JIT will. Runs where the
    /// NVRTC library loads (CI installs NVIDIA's NVRTC and nvcc wheels for CUDA 12.9 and 13.0 and sets
    /// `MPOPT_REQUIRE_NVRTC=1`, which turns a missing NVRTC or ptxas into a failure, and
    /// `MPOPT_EXPECT_NVRTC`, the version that must have loaded).
    #[test]
    fn kernels_compile_with_nvrtc_and_match_their_launches() {
        let required = std::env::var_os("MPOPT_REQUIRE_NVRTC").is_some();
        if !nvrtc_present() {
            assert!(
                !required,
                "MPOPT_REQUIRE_NVRTC is set but libnvrtc.so does not load"
            );
            eprintln!("SKIP: NVRTC (libnvrtc.so) not found");
            return;
        }
        let (major, minor) = nvrtc_version().expect("NVRTC's version");
        eprintln!("NVRTC {major}.{minor}");
        // MPOPT_EXPECT_NVRTC=13.0: CI's check that the library it means to test is the one loaded
        if let Ok(want) = std::env::var("MPOPT_EXPECT_NVRTC") {
            assert_eq!(format!("{major}.{minor}"), want, "the NVRTC loaded");
        }
        let ptxas = ptxas();
        assert!(
            ptxas.is_some() || !required,
            "MPOPT_REQUIRE_NVRTC is set but ptxas does not run (set MPOPT_PTXAS)"
        );
        let dir = std::env::temp_dir().join(format!("mpopt-ptxas-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temporary folder");
        for arch in ["compute_80", "compute_90"] {
            for m in Module::ALL {
                let ptx = compile(m, arch).unwrap_or_else(|e| panic!("{e}"));
                let text = ptx.to_src();
                for k in m.kernels() {
                    let got = ptx_params(&text, k.name).unwrap_or_else(|| {
                        panic!("{arch}: {} is not an entry of {}.cu", k.name, m.name())
                    });
                    let want: Vec<(&str, usize, usize)> = crate::backend::signature(k)
                        .iter()
                        .map(|&p| launched(p))
                        .collect();
                    assert_eq!(got, want, "{arch}: parameters of {}", k.name);
                }
                if let Some(ptxas) = &ptxas {
                    let sm = arch.replace("compute_", "sm_");
                    let src = dir.join(format!("{}-{arch}.ptx", m.name()));
                    std::fs::write(&src, &text).expect("write PTX");
                    let out = std::process::Command::new(ptxas)
                        .arg(format!("-arch={sm}"))
                        .arg(&src)
                        .arg("-o")
                        .arg(src.with_extension("cubin"))
                        .output()
                        .expect("run ptxas");
                    assert!(
                        out.status.success(),
                        "ptxas -arch={sm} rejects {}.cu: {}",
                        m.name(),
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        if ptxas.is_none() {
            eprintln!("NVRTC checked; ptxas not found: PTX not assembled");
        }
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
