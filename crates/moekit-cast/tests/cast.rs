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

/// A source pointer off its 2-byte BF16 alignment (only `from_raw` can make one) is an
/// `Alignment` error before any launch; nothing is written.
#[test]
fn emu_raw_rejects_a_misaligned_source_before_launch() {
    let Some(emu) =
        emulator_or_skip("emu_raw_rejects_a_misaligned_source_before_launch", &[&CAST], BlockOrder::InOrder)
    else {
        return;
    };
    let bytes = EmuBuffer::<u8>::zeros(&emu, 64).unwrap();
    let mut dst = EmuBuffer::<u8>::zeros(&emu, 16).unwrap();
    // SAFETY: 16 BF16 at byte 1 lie inside the 64-byte buffer, which outlives the call; the
    // launch must refuse the odd address before anything reads it.
    let src =
        unsafe { moekit_cuda::DevPtr::<bf16>::from_raw_in(bytes.view().addr() + 1, 16, moekit_cuda::MemSpace::Host) };
    let r = raw::cast_bf16_to_fp8(&emu, src, dst.view_mut(), 1.0, Fp8Format::E4M3);
    assert!(matches!(r, Err(Error::Alignment { required: 2, got: 1, .. })), "{r:?}");
    assert_eq!(dst.as_slice(), &[0u8; 16], "nothing was written");
}

mod same_outcome {
    //! Random inputs, good and bad, through the tensor op and the raw launcher on the CPU and
    //! the emulator: the same `Result` variant, and the same bits when both succeed.
    use super::*;
    use proptest::prelude::*;

    fn kind<T>(r: &moekit_cuda::Result<T>) -> String {
        match r {
            Ok(_) => "Ok".into(),
            Err(e) => format!("{e:?}").split(['(', ' ', '{']).next().unwrap_or_default().to_string(),
        }
    }

    fn bits(y: &Tensor) -> Vec<u8> {
        match y.dtype() {
            DType::F8E4M3 => y.to_vec::<F8E4M3>().unwrap().iter().map(|v| v.to_bits()).collect(),
            _ => y.to_vec::<F8E5M2>().unwrap().iter().map(|v| v.to_bits()).collect(),
        }
    }

    /// `n` values of `dtype` on `dev`, `shift` elements into a bigger tensor (misaligned views).
    fn input(dtype: DType, n: usize, shift: usize, seed: u64, dev: &Device) -> Tensor {
        let x = random_bf16(n + shift, seed);
        let t = match dtype {
            DType::BF16 => Tensor::from_slice(&x, &[n + shift], dev),
            DType::F32 => Tensor::from_slice(&x.iter().map(|v| v.to_f32()).collect::<Vec<_>>(), &[n + shift], dev),
            _ => Tensor::from_slice(&x.iter().map(|v| v.to_bits() as i32).collect::<Vec<_>>(), &[n + shift], dev),
        };
        t.unwrap().narrow(0, shift, n).unwrap()
    }

    fn emu() -> Option<Device> {
        emulator_or_skip("emu_cast_same_outcome_on_every_device", &[&CAST], BlockOrder::Shuffled(3))
            .map(Device::Emulated)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        #[test]
        fn emu_cast_same_outcome_on_every_device(
            dtype in prop::sample::select(vec![DType::BF16, DType::BF16, DType::F32, DType::I32]),
            n in 0usize..300,
            shift in 0usize..17,
            e5m2 in any::<bool>(),
            scale in prop::sample::select(vec![1.0f32, 0.37, 3.5, 0.0, f32::INFINITY, f32::NAN]),
            seed in any::<u64>(),
        ) {
            let Some(dev) = emu() else { return Ok(()) };
            let format = if e5m2 { Fp8Format::E5M2 } else { Fp8Format::E4M3 };
            let cpu = cast_bf16_to_fp8(&input(dtype, n, shift, seed, &Device::Cpu), scale, format);
            let got = cast_bf16_to_fp8(&input(dtype, n, shift, seed, &dev), scale, format);
            prop_assert_eq!(kind(&cpu), kind(&got), "CPU {:?}, emulator {:?}", cpu, got);
            if let (Ok(c), Ok(g)) = (&cpu, &got) {
                prop_assert_eq!(c.dims(), g.dims());
                prop_assert_eq!(bits(c), bits(g));
            }
        }

        /// The raw launcher at any source/destination element offset and any pair of lengths:
        /// the reference's outcome (`Shape` error or the same bits).
        #[test]
        fn emu_raw_cast_same_outcome_as_the_reference(
            n in 0usize..200,
            dst_extra in prop::sample::select(vec![0usize, 0, 0, 1, 5]),
            src_shift in 0usize..9,
            dst_shift in 0usize..17,
            seed in any::<u64>(),
        ) {
            let Some(Device::Emulated(emu)) = emu() else { return Ok(()) };
            let x = random_bf16(n + src_shift, seed);
            let m = n + dst_extra;
            let mut want = vec![0u8; m];
            let r = reference::cast_bf16_to_fp8(&x[src_shift..], 0.5, Fp8Format::E4M3, &mut want);
            let src = EmuBuffer::from_host(&emu, &x).unwrap();
            let mut dst = EmuBuffer::<u8>::zeros(&emu, m + dst_shift).unwrap();
            let got = raw::cast_bf16_to_fp8(
                &emu,
                src.slice(src_shift, n).unwrap(),
                dst.slice_mut(dst_shift, m).unwrap(),
                0.5,
                Fp8Format::E4M3,
            );
            prop_assert_eq!(kind(&r), kind(&got), "reference {:?}, emulator {:?}", r, got);
            if got.is_ok() {
                prop_assert_eq!(&dst.as_slice()[dst_shift..], &want[..]);
            }
            prop_assert!(dst.as_slice()[..dst_shift].iter().all(|&b| b == 0), "wrote before the view");
        }
    }
}

// ---- BF16 <-> F32

/// Random f32 bit patterns (never all zeros): every exponent (subnormals, normals near the BF16
/// overflow boundary, inf/NaN of both signs with random payloads) with random mantissas, plus
/// exact rounding ties (low 16 bits 0x8000 with both parities of bit 16) and values just
/// below/above a tie.
fn random_f32(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let sign = (rng.gen::<bool>() as u32) << 31;
            let bits = match rng.gen_range(0..10) {
                0 => rng.gen_range(1..0x0080_0000u32),               // subnormal
                1 => 0x7f80_0000 | rng.gen_range(0..0x0080_0000u32), // inf or NaN (payload)
                2 => 0x7f7f_0000 | rng.gen_range(0..0x1_0000u32),    // near BF16 max: overflow ties
                3 => (rng.gen::<u32>() & 0x7fff_0000) | 0x8000,      // exact tie
                4 => (rng.gen::<u32>() & 0x7fff_0000) | [0x7fff, 0x8001][rng.gen_range(0..2)],
                _ => rng.gen::<u32>() & 0x7fff_ffff,
            };
            f32::from_bits(sign | bits)
        })
        .collect()
}

/// The f32 -> BF16 reference against half's round-to-nearest-even conversion (an independent
/// implementation) on every non-NaN input; NaN must give the quiet NaN 0x7fc0; plus hand
/// checked values (ties to even, overflow to inf, the largest subnormal rounding up to the
/// smallest normal BF16).
#[test]
fn reference_f32_to_bf16_is_round_to_nearest_even() {
    for x in random_f32(400_000, 5) {
        let got = reference::f32_to_bf16(x).to_bits();
        if x.is_nan() {
            assert_eq!(got, 0x7fc0, "{:#010x}", x.to_bits());
        } else {
            assert_eq!(got, bf16::from_f32(x).to_bits(), "{:#010x}", x.to_bits());
        }
    }
    let cases = [
        (0x3f80_8000u32, 0x3f80u16), // tie, even below
        (0x3f81_8000, 0x3f82),       // tie, odd: up
        (0x3f80_8001, 0x3f81),
        (0x7f7f_8000, 0x7f80), // tie at BF16 max rounds to inf
        (0x7f7f_7fff, 0x7f7f),
        (0x007f_ffff, 0x0080), // largest f32 subnormal -> smallest normal BF16
        (0x8000_0001, 0x8000), // -tiny -> -0
        (0xff80_0000, 0xff80),
        (0xffc1_2345, 0x7fc0),
    ];
    for (x, want) in cases {
        assert_eq!(reference::f32_to_bf16(f32::from_bits(x)).to_bits(), want, "{x:#010x}");
    }
}

/// BF16 -> F32 reference: every one of the 65536 BF16 patterns widens to its bits << 16.
#[test]
fn reference_bf16_to_f32_is_exact_on_every_pattern() {
    let all: Vec<bf16> = (0..=u16::MAX).map(bf16::from_bits).collect();
    let mut out = vec![0f32; all.len()];
    reference::cast_bf16_to_f32(&all, &mut out).unwrap();
    for (b, f) in all.iter().zip(&out) {
        assert_eq!(f.to_bits(), (b.to_bits() as u32) << 16);
        if !b.is_nan() {
            assert_eq!(*f, b.to_f32());
        }
    }
}

/// Both kernels == their references, bit for bit, over lengths around the 4-element vector and
/// the 1024-element block step (and a long one: several grid-stride rounds on the emulator),
/// views at element offsets 0..3 (the vector path only at offset 0 of 16-byte aligned
/// storage), twice each (determinism). One body for the GPU and the emulation.
fn widen_narrow_match_reference(dev: &Device, sizes: &[usize]) {
    for (i, &n) in sizes.iter().enumerate() {
        let xf = random_f32(n + 3, 100 + i as u64);
        let xb: Vec<bf16> = random_f32(n + 3, 200 + i as u64)
            .into_iter()
            .map(|v| bf16::from_bits((v.to_bits() >> 16) as u16))
            .collect();
        for offset in 0..4usize {
            let tf = Tensor::from_slice(&xf, &[n + 3], dev).unwrap().narrow(0, offset.min(3), n).unwrap();
            let tb = Tensor::from_slice(&xb, &[n + 3], dev).unwrap().narrow(0, offset.min(3), n).unwrap();
            let mut want_b = vec![bf16::ZERO; n];
            reference::cast_f32_to_bf16(&xf[offset..offset + n], &mut want_b).unwrap();
            let mut want_f = vec![0f32; n];
            reference::cast_bf16_to_f32(&xb[offset..offset + n], &mut want_f).unwrap();
            let nb = || -> Vec<u16> {
                moekit_cast::cast_f32_to_bf16(&tf)
                    .unwrap()
                    .to_vec::<bf16>()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect()
            };
            let wf = || -> Vec<u32> {
                moekit_cast::cast_bf16_to_f32(&tb)
                    .unwrap()
                    .to_vec::<f32>()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect()
            };
            let (got_b, got_f) = (nb(), wf());
            if let Some(j) = (0..n).find(|&j| got_b[j] != want_b[j].to_bits()) {
                panic!(
                    "{}: f32->bf16 n={n} offset={offset}: element {j} = {:#010x} -> {:#06x}, want {:#06x}",
                    dev.name(),
                    xf[offset + j].to_bits(),
                    got_b[j],
                    want_b[j].to_bits()
                );
            }
            if let Some(j) = (0..n).find(|&j| got_f[j] != want_f[j].to_bits()) {
                panic!(
                    "{}: bf16->f32 n={n} offset={offset}: element {j} = {:#06x} -> {:#010x}, want {:#010x}",
                    dev.name(),
                    xb[offset + j].to_bits(),
                    got_f[j],
                    want_f[j].to_bits()
                );
            }
            assert_eq!((nb(), wf()), (got_b, got_f), "not deterministic");
        }
    }
}

#[test]
fn emu_widen_narrow_match_reference_bitwise() {
    for order in [BlockOrder::InOrder, BlockOrder::Reversed, BlockOrder::Shuffled(5)] {
        let Some(emu) = emulator_or_skip("emu_widen_narrow_match_reference_bitwise", &[&CAST], order) else { return };
        widen_narrow_match_reference(&Device::Emulated(emu), &[1, 3, 4, 5, 7, 255, 1023, 1025, 4096 + 3, 300_001]);
    }
}

#[test]
#[ignore = "needs a GPU: cargo test -- --include-ignored gpu_ (the GPU bundle does)"]
fn gpu_widen_narrow_match_reference_bitwise() {
    let Some(_) = gpu_or_skip("gpu_widen_narrow_match_reference_bitwise", &[&CAST]) else { return };
    let dev = Device::Cuda(CudaDevice::new(0).unwrap());
    widen_narrow_match_reference(&dev, &[1, 3, 4, 5, 7, 255, 1023, 1025, 4096 + 3, (1 << 22) + 1]);
}

/// Typed errors, the same on the CPU and the emulator: wrong dtype (`Dtype`), mismatched raw
/// lengths (`Shape`, nothing written), a misaligned `from_raw` destination (`Alignment`).
#[test]
fn emu_widen_narrow_typed_errors() {
    let Some(emu) = emulator_or_skip("emu_widen_narrow_typed_errors", &[&CAST], BlockOrder::InOrder) else { return };
    for dev in [Device::Cpu, Device::Emulated(emu.clone())] {
        let b = Tensor::from_slice(&[bf16::ONE; 4], &[4], &dev).unwrap();
        let f = Tensor::from_slice(&[1f32; 4], &[4], &dev).unwrap();
        assert!(matches!(moekit_cast::cast_f32_to_bf16(&b), Err(Error::Dtype { .. })));
        assert!(matches!(moekit_cast::cast_bf16_to_f32(&f), Err(Error::Dtype { .. })));
        assert_eq!(moekit_cast::cast_f32_to_bf16(&f).unwrap().dims(), &[4]);
        let e = Tensor::from_slice::<f32>(&[], &[0], &dev).unwrap();
        assert_eq!(moekit_cast::cast_f32_to_bf16(&e).unwrap().numel(), 0);
    }
    let src = EmuBuffer::from_host(&emu, &random_f32(16, 4)).unwrap();
    let mut dst = EmuBuffer::<bf16>::zeros(&emu, 15).unwrap();
    assert!(matches!(raw::cast_f32_to_bf16(&emu, src.view(), dst.view_mut()), Err(Error::Shape(_))));
    assert!(dst.as_slice().iter().all(|v| v.to_bits() == 0), "nothing was written");
    let bytes = EmuBuffer::<u8>::zeros(&emu, 80).unwrap();
    // SAFETY: 16 F32 at byte 2 lie inside the 80-byte buffer, which outlives the call; the
    // launch must refuse the address (2 mod 4) before anything writes it.
    let bad =
        unsafe { moekit_cuda::DevPtrMut::<f32>::from_raw_in(bytes.view().addr() + 2, 16, moekit_cuda::MemSpace::Host) };
    let b16 = EmuBuffer::from_host(&emu, &[bf16::ONE; 16]).unwrap();
    let r = raw::cast_bf16_to_f32(&emu, b16.view(), bad);
    assert!(matches!(r, Err(Error::Alignment { required: 4, got: 2, .. })), "{r:?}");
    assert!(bytes.as_slice().iter().all(|&v| v == 0), "nothing was written");
}
