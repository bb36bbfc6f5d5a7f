//! The cast against CUDA's own conversion (CPU reference) and against the reference (kernel).

use moekit_cast::kernels::CAST;
use moekit_cast::{cast_bf16_to_fp8, raw, reference, Fp8Format};
use moekit_cuda::testing::{emulator_or_skip, gpu_or_skip};
use moekit_cuda::{BlockOrder, EmuBuffer};
use moekit_dtype::{bf16, F8E4M3, F8E5M2};
use moekit_tensor::{CudaDevice, DType, Device, Error, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Random BF16 values over the whole FP8 range and beyond (never all zeros): normal values of
/// random sign and exponent 2^-20..2^20, plus specials (NaN, +-inf, +-0, FP8 boundaries).
fn random_bf16(n: usize, seed: u64) -> Vec<bf16> {
    let mut rng = StdRng::seed_from_u64(seed);
    let specials = [
        f32::NAN,
        -f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        0.0,
        -0.0,
        448.0,
        464.0,
        -57344.0,
        61440.0,
        1.0 / 512.0,
    ];
    (0..n)
        .map(|_| {
            if rng.gen_ratio(1, 50) {
                bf16::from_f32(specials[rng.gen_range(0..specials.len())])
            } else {
                let mag = 2f32.powf(rng.gen_range(-20.0..20.0));
                bf16::from_f32(if rng.gen() { mag } else { -mag })
            }
        })
        .collect()
}

#[test]
fn reference_matches_cuda_host_conversion() {
    if !moekit_cuda_oracle::require_or_skip("reference_matches_cuda_host_conversion") {
        return;
    }
    let x = random_bf16(200_000, 1);
    for (scale, format) in
        [(1.0, Fp8Format::E4M3), (0.37, Fp8Format::E4M3), (1.0, Fp8Format::E5M2), (3.5, Fp8Format::E5M2)]
    {
        let mut got = vec![0u8; x.len()];
        reference::cast_bf16_to_fp8(&x, scale, format, &mut got).unwrap();
        for (i, (&v, &g)) in x.iter().zip(&got).enumerate() {
            let f = v.to_f32() * scale;
            let want = match format {
                Fp8Format::E4M3 => moekit_cuda_oracle::f32_to_e4m3(f),
                Fp8Format::E5M2 => moekit_cuda_oracle::f32_to_e5m2(f),
            }
            .unwrap();
            assert_eq!(g, want, "element {i}: {f} ({format:?}, scale {scale})");
        }
    }
}

#[test]
fn tensor_op_on_cpu_and_typed_errors() {
    let x = random_bf16(1000, 2);
    let t = Tensor::from_slice(&x, &[10, 100], &Device::Cpu).unwrap();
    let y = cast_bf16_to_fp8(&t, 0.5, Fp8Format::E5M2).unwrap();
    assert_eq!((y.dims(), y.dtype()), (&[10usize, 100][..], DType::F8E5M2));
    let want: Vec<F8E5M2> = x.iter().map(|v| F8E5M2::from_f32(v.to_f32() * 0.5)).collect();
    assert_eq!(y.to_vec::<F8E5M2>().unwrap(), want);
    let ints = Tensor::from_slice(&[1i32, 2], &[2], &Device::Cpu).unwrap();
    assert!(matches!(cast_bf16_to_fp8(&ints, 1.0, Fp8Format::E4M3), Err(Error::Dtype { .. })));
    let mut short = vec![0u8; 3];
    assert!(matches!(reference::cast_bf16_to_fp8(&x[..4], 1.0, Fp8Format::E4M3, &mut short), Err(Error::Shape(_))));
    let empty = Tensor::from_slice::<bf16>(&[], &[0], &Device::Cpu).unwrap();
    assert_eq!(cast_bf16_to_fp8(&empty, 1.0, Fp8Format::E4M3).unwrap().numel(), 0);
}

/// Kernel == reference, bit for bit, over sizes that exercise the vector path, the tail and the
/// unaligned scalar path (views starting at odd elements), twice (determinism). One body for
/// every kernel device: the GPU and the host emulation.
fn kernel_matches_reference_bitwise(dev: &Device, sizes: &[usize]) {
    for (i, &n) in sizes.iter().enumerate() {
        let x = random_bf16(n + 1, 10 + i as u64);
        for offset in [0usize, 1] {
            let host = &x[offset..offset + n];
            let t = Tensor::from_slice(&x, &[n + 1], dev).unwrap().narrow(0, offset, n).unwrap();
            for (scale, format) in [(1.0, Fp8Format::E4M3), (0.37, Fp8Format::E4M3), (2.0, Fp8Format::E5M2)] {
                let mut want = vec![0u8; n];
                reference::cast_bf16_to_fp8(host, scale, format, &mut want).unwrap();
                let run = || -> Vec<u8> {
                    let y = cast_bf16_to_fp8(&t, scale, format).unwrap();
                    match format {
                        Fp8Format::E4M3 => y.to_vec::<F8E4M3>().unwrap().iter().map(|v| v.to_bits()).collect(),
                        Fp8Format::E5M2 => y.to_vec::<F8E5M2>().unwrap().iter().map(|v| v.to_bits()).collect(),
                    }
                };
                let got = run();
                if let Some(j) = (0..n).find(|&j| got[j] != want[j]) {
                    panic!(
                        "{}: n={n} offset={offset} {format:?} scale={scale}: element {j} = {} -> 0x{:02x}, want 0x{:02x}",
                        dev.name(),
                        host[j],
                        got[j],
                        want[j]
                    );
                }
                assert_eq!(run(), got, "not deterministic");
            }
        }
    }
}

#[test]
fn emu_cast_matches_reference_bitwise() {
    for order in [BlockOrder::InOrder, BlockOrder::Reversed, BlockOrder::Shuffled(7)] {
        let Some(emu) = emulator_or_skip("emu_cast_matches_reference_bitwise", &[&CAST], order) else { return };
        kernel_matches_reference_bitwise(&Device::Emulated(emu), &[1, 7, 8, 9, 255, 4096 + 3, 100_003]);
    }
}

#[test]
#[ignore = "needs a GPU: cargo test -- --include-ignored gpu_ (the GPU bundle does)"]
fn gpu_cast_matches_reference_bitwise() {
    let Some(_) = gpu_or_skip("gpu_cast_matches_reference_bitwise", &[&CAST]) else { return };
    let dev = Device::Cuda(CudaDevice::new(0).unwrap());
    kernel_matches_reference_bitwise(&dev, &[1, 7, 8, 9, 255, 4096 + 3, (1 << 20) + 5]);
}

#[test]
fn emu_raw_rejects_mismatched_lengths_before_launch() {
    let Some(emu) = emulator_or_skip("emu_raw_rejects_mismatched_lengths_before_launch", &[&CAST], BlockOrder::InOrder)
    else {
        return;
    };
    let src = EmuBuffer::from_host(&emu, &random_bf16(16, 3)).unwrap();
    let mut dst = EmuBuffer::<u8>::zeros(&emu, 15).unwrap();
    let r = raw::cast_bf16_to_fp8(&emu, src.view(), dst.view_mut(), 1.0, Fp8Format::E4M3);
    assert!(matches!(r, Err(Error::Shape(_))));
    assert_eq!(dst.as_slice(), &[0u8; 15], "nothing was written");
}

#[test]
#[ignore = "needs a GPU: cargo test -- --include-ignored gpu_ (the GPU bundle does)"]
fn gpu_raw_rejects_mismatched_lengths_before_launch() {
    let Some(gpu) = gpu_or_skip("gpu_raw_rejects_mismatched_lengths_before_launch", &[&CAST]) else {
        return;
    };
    let stream = moekit_cuda::Stream::new(&gpu).unwrap();
    let src = moekit_cuda::DeviceBuffer::from_host(&gpu, &random_bf16(16, 3)).unwrap();
    let mut dst = moekit_cuda::DeviceBuffer::<u8>::zeros(&gpu, 15).unwrap();
    let r = raw::cast_bf16_to_fp8(&stream, src.view(), dst.view_mut(), 1.0, Fp8Format::E4M3);
    assert!(matches!(r, Err(Error::Shape(_))));
    assert_eq!(dst.to_host(&stream).unwrap(), vec![0u8; 15], "nothing was written");
}

/// Safe code cannot hand device memory to the host emulation (or host memory to a GPU): the
/// launch checks where each pointer lives.
#[test]
fn emu_rejects_pointers_to_device_memory() {
    let Some(emu) = emulator_or_skip("emu_rejects_pointers_to_device_memory", &[&CAST], BlockOrder::InOrder) else {
        return;
    };
    let mut dst = EmuBuffer::<u8>::zeros(&emu, 16).unwrap();
    // SAFETY: never dereferenced: the launch must refuse it first.
    let src = unsafe { moekit_cuda::DevPtr::<bf16>::from_raw_in(0x7000_0000, 16, moekit_cuda::MemSpace::Device(1)) };
    let r = raw::cast_bf16_to_fp8(&emu, src, dst.view_mut(), 1.0, Fp8Format::E4M3);
    assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
}
