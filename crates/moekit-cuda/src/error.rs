//! The one error type of moekit's runtime and kernel crates.

use cudarc::driver::{sys, DriverError};

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong between a caller and a kernel.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The CUDA driver library (`libcuda.so`) is not installed on this machine.
    #[error("no CUDA driver: libcuda was not found on this machine")]
    NoDriver,
    /// The driver is present but the requested device is not.
    #[error("no CUDA device with ordinal {ordinal} (the driver reports {count} device(s))")]
    NoDevice {
        /// Requested ordinal.
        ordinal: usize,
        /// Devices the driver sees.
        count: usize,
    },
    /// The crate was built without nvcc, so its kernels are not embedded.
    #[error(
        "kernel image `{module}` was not built (nvcc was not found at build time); run `cargo xtask setup` and rebuild"
    )]
    KernelsNotBuilt {
        /// Kernel module name.
        module: &'static str,
    },
    /// The crate was built without the CUDA headers, so its kernels have no host build.
    #[error("kernel image `{module}` has no host emulation build (CUDA headers were not found at build time); run `cargo xtask setup` and rebuild")]
    EmulationNotBuilt {
        /// Kernel module name.
        module: &'static str,
    },
    /// An emulated kernel misbehaved: a deadlock at a barrier, or a write outside a buffer
    /// or outside its dynamic shared memory.
    #[error("kernel fault: {0}")]
    KernelFault(String),
    /// The embedded image has no code the device can run.
    #[error("kernel image `{module}` cannot run on sm_{major}{minor}: built for {built_for}")]
    UnsupportedArchitecture {
        /// Kernel module name.
        module: &'static str,
        /// Device compute capability, major.
        major: u32,
        /// Device compute capability, minor.
        minor: u32,
        /// Architectures in the image, comma-separated.
        built_for: String,
    },
    /// A tensor or buffer has the wrong shape or length.
    #[error("bad shape: {0}")]
    Shape(String),
    /// A tensor or buffer has the wrong element type.
    #[error("bad dtype for {what}: expected {expected}, got {got}")]
    Dtype {
        /// Which argument.
        what: String,
        /// Accepted dtype(s).
        expected: String,
        /// Given dtype.
        got: String,
    },
    /// A size, pointer or stride is not aligned as the kernel requires.
    #[error("bad alignment of {what}: must be a multiple of {required}, got {got}")]
    Alignment {
        /// Which argument.
        what: String,
        /// Required multiple.
        required: usize,
        /// Given value.
        got: usize,
    },
    /// Any other invalid argument (an id out of range, a device mismatch, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A call that a stream capture does not permit (a synchronising call, such as a
    /// synchronous allocation, memset, copy or `cuStreamSynchronize`, made while a stream is
    /// being captured), or a capture that such a call (or work merged from another stream)
    /// invalidated: the driver's `CUDA_ERROR_STREAM_CAPTURE_*` and `CUDA_ERROR_CAPTURED_EVENT`.
    /// The capture must still be ended ([`crate::Stream::end_capture`] reports this too).
    #[error("CUDA stream capture error {name} ({code}) in {call}")]
    Capture {
        /// The driver function.
        call: &'static str,
        /// The error's name, e.g. `CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED`.
        name: String,
        /// The numeric `CUresult`.
        code: u32,
    },
    /// An operation this target does not provide (e.g. graph capture on the host emulation).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A CUDA driver call failed.
    #[error("CUDA error {name} ({code}) in {call}")]
    Cuda {
        /// The driver function.
        call: &'static str,
        /// The error's name, e.g. `CUDA_ERROR_ILLEGAL_ADDRESS`.
        name: String,
        /// The numeric `CUresult`.
        code: u32,
    },
}

impl Error {
    /// Wraps a driver error with the call that produced it.
    pub fn cuda(call: &'static str, e: DriverError) -> Error {
        let name = e.error_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|_| format!("{:?}", e.0));
        let code = e.0 as u32;
        if Self::is_capture_error(&e) {
            Error::Capture { call, name, code }
        } else {
            Error::Cuda { call, name, code }
        }
    }

    /// Whether the driver reports a call a stream capture does not permit, or an invalidated
    /// capture.
    fn is_capture_error(e: &DriverError) -> bool {
        use sys::CUresult::*;
        matches!(
            e.0,
            CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED
                | CUDA_ERROR_STREAM_CAPTURE_INVALIDATED
                | CUDA_ERROR_STREAM_CAPTURE_MERGE
                | CUDA_ERROR_STREAM_CAPTURE_UNMATCHED
                | CUDA_ERROR_STREAM_CAPTURE_UNJOINED
                | CUDA_ERROR_STREAM_CAPTURE_ISOLATION
                | CUDA_ERROR_STREAM_CAPTURE_IMPLICIT
                | CUDA_ERROR_CAPTURED_EVENT
                | CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD
        )
    }

    /// Whether this is the driver's "no binary for GPU" family, which [`crate::Gpu`] reports
    /// as [`Error::UnsupportedArchitecture`].
    pub(crate) fn is_no_binary(e: &DriverError) -> bool {
        matches!(
            e.0,
            sys::CUresult::CUDA_ERROR_NO_BINARY_FOR_GPU
                | sys::CUresult::CUDA_ERROR_INVALID_PTX
                | sys::CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION
        )
    }
}

/// Adds the call name to a driver result.
pub(crate) trait CudaContext<T> {
    fn during(self, call: &'static str) -> Result<T>;
}

impl<T> CudaContext<T> for std::result::Result<T, DriverError> {
    fn during(self, call: &'static str) -> Result<T> {
        self.map_err(|e| Error::cuda(call, e))
    }
}
