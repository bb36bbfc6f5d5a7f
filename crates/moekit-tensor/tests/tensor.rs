//! Tensor semantics on the CPU, and the same body on a GPU when one is present.

use moekit_dtype::{bf16, F8E4M3};
use moekit_tensor::{CudaDevice, DType, Device, Error, Tensor};
use proptest::prelude::*;

fn round_trip_and_views(dev: &Device) {
    let data: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 3.0).collect();
    let t = Tensor::from_slice(&data, &[4, 6], dev).unwrap();
    assert_eq!((t.dims(), t.numel(), t.dtype(), t.size_in_bytes()), (&[4usize, 6][..], 24, DType::F32, 96));
    assert_eq!(t.to_vec::<f32>().unwrap(), data);
    let rows = t.narrow(0, 1, 2).unwrap();
    assert_eq!(rows.to_vec::<f32>().unwrap(), data[6..18].to_vec());
    let flat = rows.reshape(&[12]).unwrap().narrow(0, 3, 4).unwrap();
    assert_eq!(flat.to_vec::<f32>().unwrap(), data[9..13].to_vec());
    let back = flat.to_device(&Device::Cpu).unwrap();
    assert_eq!(back.to_vec::<f32>().unwrap(), data[9..13].to_vec());
    let z = Tensor::zeros(&[3, 5], DType::BF16, dev).unwrap();
    assert_eq!(z.to_vec::<bf16>().unwrap(), vec![bf16::ZERO; 15]);
    let e = Tensor::from_slice::<f32>(&[], &[0, 7], dev).unwrap();
    assert_eq!(e.to_vec::<f32>().unwrap(), Vec::<f32>::new());
}

#[test]
fn cpu_round_trip_and_views() {
    round_trip_and_views(&Device::Cpu);
}

#[test]
#[ignore = "needs a GPU: cargo test -- --include-ignored gpu_ (the GPU bundle does)"]
fn gpu_round_trip_and_views() {
    if moekit_cuda::testing::gpu_or_skip("gpu_round_trip_and_views", &[]).is_some() {
        round_trip_and_views(&Device::Cuda(CudaDevice::new(0).expect("GPU present")));
    }
}

#[test]
fn typed_errors() {
    let t = Tensor::from_slice(&[1i32, 2, 3, 4, 5, 6], &[2, 3], &Device::Cpu).unwrap();
    assert!(matches!(Tensor::from_slice(&[1.0f32; 5], &[2, 3], &Device::Cpu), Err(Error::Shape(_))));
    assert!(matches!(t.to_vec::<f32>(), Err(Error::Dtype { .. })));
    assert!(matches!(t.narrow(0, 1, 2), Err(Error::Shape(_))));
    assert!(matches!(t.narrow(2, 0, 1), Err(Error::Shape(_))));
    assert!(matches!(t.narrow(1, 0, 2), Err(Error::Shape(_))), "non-contiguous narrow");
    assert!(matches!(t.reshape(&[4, 2]), Err(Error::Shape(_))));
    assert!(matches!(Tensor::zeros(&[usize::MAX, 2], DType::F32, &Device::Cpu), Err(Error::Shape(_))));
    assert!(matches!(t.dev_ptr::<i32>(), Err(Error::InvalidArgument(_))));
    assert!(matches!(t.cpu_slice::<u8>(), Err(Error::Dtype { .. })));
}

#[test]
fn writes_need_unshared_storage() {
    let mut t = Tensor::zeros(&[4], DType::F8E4M3, &Device::Cpu).unwrap();
    t.cpu_slice_mut::<F8E4M3>().unwrap()[2] = F8E4M3::from_bits(0x38);
    let view = t.narrow(0, 2, 1).unwrap();
    assert_eq!(view.to_vec::<F8E4M3>().unwrap(), vec![F8E4M3::from_bits(0x38)]);
    assert!(matches!(t.cpu_slice_mut::<F8E4M3>(), Err(Error::InvalidArgument(_))));
    drop(view);
    assert!(t.cpu_slice_mut::<F8E4M3>().is_ok());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Any row range of any matrix reads back exactly the rows it names.
    #[test]
    fn narrow_rows_reads_those_rows(rows in 1usize..9, cols in 0usize..7, a in 0usize..9, b in 0usize..9) {
        let (start, end) = (a.min(b) % (rows + 1), a.max(b).min(rows));
        let data: Vec<i32> = (0..(rows * cols) as i32).map(|x| x * 7 - 3).collect();
        let t = Tensor::from_slice(&data, &[rows, cols], &Device::Cpu).unwrap();
        let v = t.narrow(0, start, end.saturating_sub(start)).unwrap();
        prop_assert_eq!(v.to_vec::<i32>().unwrap(), data[start * cols..end.max(start) * cols].to_vec());
    }
}

/// CPU storage starts 16-byte aligned (the kernel crates' alignment checks use the host
/// address of a CPU view and must agree with the devices, whose allocations are aligned):
/// a view's address modulo 16 is its byte offset modulo 16, for every constructor.
#[test]
fn cpu_storage_is_16_byte_aligned() {
    let addr = |t: &Tensor| t.cpu_slice::<f32>().unwrap().as_ptr() as usize;
    for n in [1usize, 3, 5, 17, 1000] {
        let z = Tensor::zeros(&[n], DType::F32, &Device::Cpu).unwrap();
        let v: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let s = Tensor::from_slice(&v, &[n], &Device::Cpu).unwrap();
        for t in [&z, &s] {
            assert_eq!(addr(t) % 16, 0, "n = {n}");
            if n > 1 {
                assert_eq!(addr(&t.narrow(0, 1, n - 1).unwrap()) % 16, 4, "n = {n}: a view one f32 in");
            }
        }
    }
}
