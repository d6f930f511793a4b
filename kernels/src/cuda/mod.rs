//! Device twins of the CPU kernels, on an NVIDIA GPU through cudarc (feature `cuda`).
//!
//! Design note. libcuda and NVRTC are loaded at run time, so this builds on machines with no
//! CUDA and a binary built here runs wherever a driver is. cudarc panics when it first touches a
//! library that is absent, so [`Device::open`] asks whether each one can be loaded before
//! anything else and answers [`CudaError::NoDevice`] instead: callers (and the tests) can tell
//! "no GPU here" from a failure.
//!
//! The kernels are CUDA C in `kernels.cu`, compiled by NVRTC when a device is opened, straight
//! to machine code for that device's architecture rather than to PTX: PTX from an NVRTC newer
//! than the driver would be refused at load, while the driver accepts a cubin from any NVRTC of
//! its major version.
//!
//! Everything a kernel computes is checked bit for bit against the CPU twin in the crate root
//! (tests/cuda_twins.rs); the fingerprint and cast kernels use the same integer steps, and the
//! reductions are wrapping sums, so the bits do not depend on how the threads are scheduled.

mod snapshot;

pub use snapshot::{CopyPool, SnapshotConfig, Snapshotter, StagedSnapshot};

use std::ffi::{c_char, CString};
use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, DriverError, LaunchConfig,
    PushKernelArg, ValidAsZeroBits,
};

use crate::fingerprint::Fingerprint;
use crate::incremental::{chunk_count, compare, ChangedChunks};

const KERNELS: &str = include_str!("kernels.cu");

/// Threads per block for every kernel: a multiple of the warp, and enough blocks per
/// multiprocessor fit at this size to keep loads in flight.
const BLOCK: u32 = 256;
/// Words per fingerprint block: 16 16-byte loads per thread, large enough that a block's fixed
/// cost (the reduction, two atomics) is lost in its reads.
const FINGERPRINT_TILE_WORDS: usize = BLOCK as usize * 4 * 16;

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// No driver library, no device, or no device with that ordinal.
    #[error("no CUDA device")]
    NoDevice,
    #[error("the NVRTC library could not be loaded (is it on LD_LIBRARY_PATH?)")]
    NoNvrtc,
    #[error("the NCCL library could not be loaded (is it on LD_LIBRARY_PATH?)")]
    NoNccl,
    #[error("CUDA driver: {0}")]
    Driver(#[from] DriverError),
    #[error("NVRTC: {0}")]
    Compile(String),
    #[error("NCCL: {0}")]
    Nccl(String),
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("a background snapshot drain ended without returning its buffers")]
    DrainLost,
}

pub type Result<T> = std::result::Result<T, CudaError>;

/// Whether libcuda can be loaded; nothing else in this module may be called when it cannot.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library by its usual names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// How many GPUs the driver shows this process: 0 without a driver, or with a driver and no GPU.
pub fn device_count() -> Result<usize> {
    if !driver_present() {
        return Ok(0);
    }
    match CudaContext::device_count() {
        Ok(n) => Ok(n.max(0) as usize),
        // cuInit's answer on a machine whose driver is installed but has no GPU.
        Err(DriverError(cudarc::driver::sys::CUresult::CUDA_ERROR_NO_DEVICE)) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

/// A context on GPU `ordinal`, without compiling anything (no NVRTC needed): for NCCL, which
/// needs a device but none of the kernels. [`CudaError::NoDevice`] when there is no such GPU.
pub fn context(ordinal: usize) -> Result<Arc<CudaContext>> {
    if ordinal >= device_count()? {
        return Err(CudaError::NoDevice);
    }
    Ok(CudaContext::new(ordinal)?)
}

/// Whether NVRTC can be loaded.
pub fn nvrtc_present() -> bool {
    // SAFETY: as for `driver_present`.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// NVRTC's version, (major, minor).
pub fn nvrtc_version() -> Result<(i32, i32)> {
    if !nvrtc_present() {
        return Err(CudaError::NoNvrtc);
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two out-parameters, written by NVRTC.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| CudaError::Compile(format!("{e:?}")))?;
    Ok((major, minor))
}

/// The CUDA version the driver supports, as the driver encodes it (13000 for 13.0).
pub fn driver_version() -> Result<i32> {
    if !driver_present() {
        return Err(CudaError::NoDevice);
    }
    let mut v = 0;
    // SAFETY: one out-parameter; cuDriverGetVersion needs no cuInit.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) }.result()?;
    Ok(v)
}

/// Compiles the kernels to machine code for compute capability `major.minor`. Needs NVRTC but
/// no device, so a machine without a GPU can still check that the source compiles.
pub fn compile_kernels(major: i32, minor: i32) -> Result<Vec<u8>> {
    use cudarc::nvrtc::{result, sys};
    if !nvrtc_present() {
        return Err(CudaError::NoNvrtc);
    }
    let err = |what: &str, e: result::NvrtcError| CudaError::Compile(format!("{what}: {e:?}"));
    let src = CString::new(KERNELS).expect("kernel source has no NUL");
    let name = CString::new("ckpt_kernels.cu").expect("no NUL");
    let prog = result::create_program(&src, Some(&name)).map_err(|e| err("create", e))?;
    let options = [format!("--gpu-architecture=sm_{major}{minor}"), "--std=c++17".to_string()];
    let image = (|| {
        // SAFETY: `prog` is live until destroyed below; the buffers are sized by NVRTC.
        unsafe {
            if let Err(e) = result::compile_program(prog, &options) {
                let log = result::get_program_log(prog).unwrap_or_default();
                let log: Vec<u8> = log.iter().take_while(|c| **c != 0).map(|c| *c as u8).collect();
                return Err(CudaError::Compile(format!("{e:?} with {options:?}:\n{}", String::from_utf8_lossy(&log))));
            }
            let mut size = 0usize;
            sys::nvrtcGetCUBINSize(prog, &mut size).result().map_err(|e| err("cubin size", e))?;
            let mut image = vec![0u8; size];
            sys::nvrtcGetCUBIN(prog, image.as_mut_ptr() as *mut c_char).result().map_err(|e| err("cubin", e))?;
            Ok(image)
        }
    })();
    // SAFETY: created above and not used after this.
    unsafe { result::destroy_program(prog) }.map_err(|e| err("destroy", e))?;
    image
}

struct Kernels {
    fingerprint_chunks: CudaFunction,
    sum_chunks: CudaFunction,
    f32_to_bf16: CudaFunction,
    bf16_to_f32: CudaFunction,
    fill_pattern: CudaFunction,
}

/// One GPU: its context, a stream for the work here, and the compiled kernels.
pub struct Device {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kernels: Kernels,
    sm_count: u32,
}

impl Device {
    /// Opens GPU `ordinal` and compiles the kernels for it. [`CudaError::NoDevice`] when there is
    /// no driver or no such GPU; any other error is a real failure.
    pub fn open(ordinal: usize) -> Result<Device> {
        let ctx = context(ordinal)?;
        let (major, minor) = ctx.compute_capability()?;
        let image = compile_kernels(major, minor)?;
        let module = ctx.load_module(cudarc::nvrtc::Ptx::from_binary(image))?;
        let kernels = Kernels {
            fingerprint_chunks: module.load_function("fingerprint_chunks")?,
            sum_chunks: module.load_function("sum_chunks")?,
            f32_to_bf16: module.load_function("f32_to_bf16")?,
            bf16_to_f32: module.load_function("bf16_to_f32")?,
            fill_pattern: module.load_function("fill_pattern")?,
        };
        let sm_count =
            ctx.attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
        let stream = ctx.new_stream()?;
        Ok(Device { ctx, stream, kernels, sm_count })
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream this handle's kernels and copies run on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn name(&self) -> Result<String> {
        Ok(self.ctx.name()?)
    }

    pub fn compute_capability(&self) -> Result<(i32, i32)> {
        Ok(self.ctx.compute_capability()?)
    }

    pub fn total_memory(&self) -> Result<usize> {
        Ok(self.ctx.total_mem()?)
    }

    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }

    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        Ok(self.stream.clone_htod(host)?)
    }

    pub fn download<T: DeviceRepr, S: DevicePtr<T>>(&self, dev: &S) -> Result<Vec<T>> {
        let host = self.stream.clone_dtoh(dev)?;
        self.stream.synchronize()?;
        Ok(host)
    }

    pub fn alloc_zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        Ok(self.stream.alloc_zeros(len)?)
    }

    /// Blocks for a grid-stride kernel over `items`: enough to fill every multiprocessor
    /// several times over, no more.
    fn grid_for(&self, items: usize) -> u32 {
        let wanted = items.div_ceil(BLOCK as usize).max(1);
        wanted.min(self.sm_count as usize * 8) as u32
    }

    /// Per-chunk fingerprints of `words`, the twin of
    /// [`chunk_fingerprints`](crate::incremental::chunk_fingerprints).
    pub fn fingerprint_chunks<S: DevicePtr<u32>>(&self, words: &S, chunk_words: usize) -> Result<Vec<Fingerprint>> {
        let lanes = self.chunk_reduce(&self.kernels.fingerprint_chunks, words, chunk_words)?;
        Ok(lanes.chunks_exact(2).map(|l| Fingerprint([l[0], l[1]])).collect())
    }

    /// Per-chunk wrapping sums of the words as u64: the fingerprint's loads and reduction
    /// without its hashing. A diagnostic, for the device check to tell how much of the
    /// fingerprint's time is reading.
    pub fn sum_chunks<S: DevicePtr<u32>>(&self, words: &S, chunk_words: usize) -> Result<Vec<u64>> {
        let lanes = self.chunk_reduce(&self.kernels.sum_chunks, words, chunk_words)?;
        Ok(lanes.chunks_exact(2).map(|l| l[0]).collect())
    }

    /// Launches one of the chunk-reduction kernels: one block per tile, two u64 lanes per chunk.
    fn chunk_reduce<S: DevicePtr<u32>>(&self, f: &CudaFunction, words: &S, chunk_words: usize) -> Result<Vec<u64>> {
        if chunk_words == 0 {
            return Err(CudaError::Invalid("chunk size must be positive".into()));
        }
        let n = words.len();
        let chunks = chunk_count(n, chunk_words);
        if chunks == 0 {
            return Ok(Vec::new());
        }
        let tile = FINGERPRINT_TILE_WORDS.min(chunk_words);
        let tiles_per_chunk = chunk_words.div_ceil(tile);
        let blocks =
            u32::try_from(chunks * tiles_per_chunk).ok().filter(|b| *b < i32::MAX as u32).ok_or_else(|| {
                CudaError::Invalid(format!("{chunks} chunks of {chunk_words} words need too many blocks"))
            })?;
        let mut out = self.stream.alloc_zeros::<u64>(2 * chunks)?;
        let (ptr, _guard) = words.device_ptr(&self.stream);
        let (n, chunk_words, tile, tiles_per_chunk) =
            (n as u64, chunk_words as u64, tile as u64, tiles_per_chunk as u64);
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        let mut launch = self.stream.launch_builder(f);
        launch.arg(&ptr).arg(&n).arg(&chunk_words).arg(&tile).arg(&tiles_per_chunk).arg(&mut out);
        // SAFETY: the argument list matches the kernel's signature; `ptr` covers `n` words and
        // `out` holds two words per chunk, the most the kernel writes.
        unsafe { launch.launch(cfg) }?;
        let lanes = self.stream.clone_dtoh(&out)?;
        self.stream.synchronize()?;
        Ok(lanes)
    }

    /// The twin of [`changed_chunks`](crate::incremental::changed_chunks): fingerprints on the
    /// device, comparison (16 bytes per chunk) on the host.
    pub fn changed_chunks<S: DevicePtr<u32>>(
        &self,
        words: &S,
        chunk_words: usize,
        previous: &[Fingerprint],
    ) -> Result<ChangedChunks> {
        Ok(compare(self.fingerprint_chunks(words, chunk_words)?, previous))
    }

    /// fp32 (as raw bits) to bf16 bits, the twin of [`f32_to_bf16_slice`](crate::cast::f32_to_bf16_slice).
    /// Asynchronous on [`Device::stream`].
    pub fn f32_to_bf16<S: DevicePtr<u32>, D: DevicePtrMut<u16>>(&self, src: &S, dst: &mut D) -> Result<()> {
        self.cast(&self.kernels.f32_to_bf16, src, dst)
    }

    /// bf16 bits to fp32 (as raw bits), the twin of [`bf16_to_f32_slice`](crate::cast::bf16_to_f32_slice).
    /// Asynchronous on [`Device::stream`].
    pub fn bf16_to_f32<S: DevicePtr<u16>, D: DevicePtrMut<u32>>(&self, src: &S, dst: &mut D) -> Result<()> {
        self.cast(&self.kernels.bf16_to_f32, src, dst)
    }

    fn cast<A, B, S: DevicePtr<A>, D: DevicePtrMut<B>>(&self, f: &CudaFunction, src: &S, dst: &mut D) -> Result<()> {
        let n = src.len();
        if dst.len() != n {
            return Err(CudaError::Invalid(format!("cast of {n} elements into {}", dst.len())));
        }
        if n == 0 {
            return Ok(());
        }
        let (s, _gs) = src.device_ptr(&self.stream);
        let (d, _gd) = dst.device_ptr_mut(&self.stream);
        let n = n as u64;
        let cfg = LaunchConfig {
            grid_dim: (self.grid_for(n.div_ceil(4) as usize), 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = self.stream.launch_builder(f);
        launch.arg(&s).arg(&d).arg(&n);
        // SAFETY: both pointers cover `n` elements of the kernel's element types.
        unsafe { launch.launch(cfg) }?;
        Ok(())
    }

    /// Fills `dst` with [`pattern_word`](crate::pattern::pattern_word)`(seed, i)`: test and
    /// benchmark data made on the device, since uploading gigabytes would cost more than the
    /// measurement. Asynchronous on [`Device::stream`].
    pub fn fill_pattern<D: DevicePtrMut<u32>>(&self, dst: &mut D, seed: u64) -> Result<()> {
        let n = dst.len() as u64;
        if n == 0 {
            return Ok(());
        }
        let (d, _gd) = dst.device_ptr_mut(&self.stream);
        let cfg =
            LaunchConfig { grid_dim: (self.grid_for(n as usize), 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        let mut launch = self.stream.launch_builder(&self.kernels.fill_pattern);
        launch.arg(&d).arg(&n).arg(&seed);
        // SAFETY: `d` covers `n` words.
        unsafe { launch.launch(cfg) }?;
        Ok(())
    }
}
