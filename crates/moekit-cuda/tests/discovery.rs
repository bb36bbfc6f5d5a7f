//! Discovery on any machine: never a panic, a typed error when there is no GPU.

use moekit_cuda::{device_count, driver_available, Error, Gpu, KernelImage};

#[test]
fn discovery_never_panics() {
    let count = device_count();
    match Gpu::new(0) {
        Ok(gpu) => {
            assert!(count.unwrap() >= 1);
            assert!(gpu.compute_capability().0 >= 5);
        }
        Err(Error::NoDriver) => {
            assert!(!driver_available());
            assert_eq!(count, Err(Error::NoDriver));
        }
        Err(Error::NoDevice { ordinal: 0, count: c }) => assert_eq!(count, Ok(c)),
        Err(e) => panic!("unexpected error {e}"),
    }
    // An ordinal past the end is always NoDevice or NoDriver.
    assert!(matches!(Gpu::new(1 << 20), Err(Error::NoDevice { .. } | Error::NoDriver)));
}

static MISSING: KernelImage = KernelImage::not_built("missing", false);

#[test]
#[ignore = "needs a GPU: cargo test -- --include-ignored gpu_ (the GPU bundle does)"]
fn gpu_unbuilt_image_is_a_typed_error() {
    let Some(gpu) = moekit_cuda::testing::gpu_or_skip("gpu_unbuilt_image_is_a_typed_error", &[]) else {
        return;
    };
    assert_eq!(gpu.function(&MISSING, "k").unwrap_err(), Error::KernelsNotBuilt { module: "missing" });
}

#[test]
fn errors_name_their_cause() {
    let e = Error::UnsupportedArchitecture { module: "gemm_sm90", major: 8, minor: 0, built_for: "sm_90a".into() };
    assert_eq!(e.to_string(), "kernel image `gemm_sm90` cannot run on sm_80: built for sm_90a");
    assert!(Error::NoDriver.to_string().contains("libcuda"));
}
