//! FP8 block quantization of weights (`quantize_weights`): the emulated kernel against
//! `reference::quantize_blocks`, bit for bit (the arithmetic is the reference's: an amax, one
//! IEEE division, one product and one rounding per weight), the transposed output against the
//! reference on the transposed weights, and typed errors before any launch.

use moekit_cuda::testing::{emulator_or_skip, gpu_or_skip};
use moekit_cuda::BlockOrder;
use moekit_dtype::F8E4M3;
use moekit_gemm::kernels::QUANT_BLOCKS;
use moekit_gemm::{quantize_weights, reference, Error};
use moekit_tensor::{CudaDevice, DType, Device, Tensor};

/// Weights whose magnitude changes per 128 x 128 block (so every block has its own scale),
/// with zeros, a NaN (not counted in amax: its block's scale stays the others'), signed zeros,
/// values that round to ties, a subnormal-range block and an all-zero block (amax floor).
fn weights(g: usize, n: usize, k: usize) -> Vec<f32> {
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    let mut v: Vec<f32> = (0..g * n * k)
        .map(|i| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let u = (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
            let (r, c) = ((i / k) % n, i % k);
            let block = (i / (n * k)) * 7 + (r / 128) * 3 + c / 128;
            u * [0.25f32, 1.0, 4.0, 1e-6, 300.0][block % 5]
        })
        .collect();
    v[5] = f32::NAN;
    v[6] = -0.0;
    v[k + 3] = 0.0;
    // The second column block of the first group's first row block (if any): all zero.
    if k >= 256 {
        for r in 0..128 {
            v[r * k + 128..r * k + 256].fill(0.0);
        }
    }
    v
}

fn codes(t: &Tensor) -> Vec<u8> {
    t.to_vec::<F8E4M3>().unwrap().iter().map(|c| c.0).collect()
}

fn check(dev: &Device) {
    for &(g, n, k) in &[(1usize, 128usize, 128usize), (2, 256, 384), (3, 128, 256)] {
        let w = weights(g, n, k);
        let (want_c, want_s) = reference::quantize_blocks(&w, g, n, k);
        let wt: Vec<f32> = (0..g * n * k).map(|i| w[i / (n * k) * n * k + (i % n) * k + (i % (n * k)) / n]).collect();
        let (want_ct, want_st) = reference::quantize_blocks(&wt, g, k, n);
        let t = Tensor::from_slice(&w, &[g, n, k], dev).unwrap();
        for transposed in [false, true] {
            let (q, qt) = quantize_weights(&t, transposed).unwrap();
            assert_eq!(codes(&q.codes), want_c, "{} codes [{g}, {n}, {k}]", dev.name());
            let s = q.scales.to_vec::<f32>().unwrap();
            assert_eq!(
                s.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                want_s.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
            match qt {
                Some(qt) => {
                    assert!(transposed);
                    assert_eq!(qt.codes.dims(), &[g, k, n]);
                    assert_eq!(codes(&qt.codes), want_ct, "{} transposed codes [{g}, {n}, {k}]", dev.name());
                    assert_eq!(qt.scales.to_vec::<f32>().unwrap(), want_st);
                }
                None => assert!(!transposed),
            }
        }
    }
    // The floor: an all-zero block gets scale 1e-4 / 448 and zero codes.
    let (_, s) = reference::quantize_blocks(&weights(1, 128, 256), 1, 128, 256);
    assert_eq!(s[1], 1e-4f32 / 448.0);
}

#[test]
fn cpu_quantize_weights_is_the_reference() {
    check(&Device::Cpu);
}

#[test]
fn emu_quantize_weights_matches_reference_bitwise() {
    let Some(e) =
        emulator_or_skip("emu_quantize_weights_matches_reference_bitwise", &[&QUANT_BLOCKS], BlockOrder::Shuffled(3))
    else {
        return;
    };
    check(&Device::Emulated(e));
}

#[test]
#[ignore = "needs a GPU: cargo test -- --include-ignored gpu_ (the GPU bundle does)"]
fn gpu_quantize_weights_matches_reference_bitwise() {
    let Some(_gpu) = gpu_or_skip("gpu_quantize_weights_matches_reference_bitwise", &[&QUANT_BLOCKS]) else { return };
    check(&Device::Cuda(CudaDevice::new(0).unwrap()));
}

#[test]
fn typed_errors() {
    let dev = Device::Cpu;
    let w = Tensor::zeros(&[1, 128, 200], DType::F32, &dev).unwrap();
    assert!(matches!(quantize_weights(&w, false), Err(Error::Alignment { required: 128, got: 200, .. })));
    let w = Tensor::zeros(&[128, 128], DType::F32, &dev).unwrap();
    assert!(matches!(quantize_weights(&w, false), Err(Error::Shape(_))));
    let w = Tensor::zeros(&[1, 128, 128], DType::BF16, &dev).unwrap();
    assert!(matches!(quantize_weights(&w, false), Err(Error::Dtype { .. })));
}
