//! FP8 E4M3 quantization of grouped weights per 128 x 128 block on the device
//! (`kernels/quant_blocks.cu`): what the FP8 GEMMs take as B, made where the weights live
//! (the f32 master weights of a device-resident trainer), optionally with the transpose's
//! quantization beside it (the FP8 weights of a dgrad through the K-major-only FP8 wgmma, as
//! DeepSeek-V3 keeps them). The oracle is [`crate::reference::quantize_blocks`]: the kernel
//! gives its bits on every device.

use crate::kernels::QUANT_BLOCKS;
use crate::ops::transpose;
use crate::{reference, Error, Result, SCALE_BLOCK};
use moekit_cuda::{DevPtr, DevPtrMut, LaunchConfig, Launcher};
use moekit_dtype::F8E4M3;
use moekit_tensor::{DType, Tensor};

/// FP8 weights `[G, n, k]` F8E4M3 with their `[G, n / 128, k / 128]` F32 block scales.
#[derive(Debug)]
pub struct BlockFp8 {
    /// E4M3 codes.
    pub codes: Tensor,
    /// One scale per 128 x 128 block.
    pub scales: Tensor,
}

/// Quantizes `w [G, n, k]` F32 (`n` and `k` multiples of 128) per 128 x 128 block: `scale =
/// max(amax, 1e-4) / 448`, `code = e4m3(w * 448 / max(amax, 1e-4))` (saturating, round to
/// nearest even; NaN does not count towards amax). With `transposed`, also the quantization
/// of `w^T [G, k, n]` (the same codes and scales, transposed). Errors: `Dtype` unless F32,
/// `Shape` unless 3-D, `Alignment` for `n` or `k` not multiples of 128.
///
/// ```
/// use moekit_tensor::{DType, Device, Tensor};
/// let w = Tensor::from_slice(&vec![0.5f32; 128 * 256], &[1, 128, 256], &Device::Cpu)?;
/// let (q, qt) = moekit_gemm::quantize_weights(&w, true)?;
/// assert_eq!(q.scales.dims(), &[1, 1, 2]);
/// assert_eq!(qt.unwrap().codes.dims(), &[1, 256, 128]);
/// # Ok::<(), moekit_gemm::Error>(())
/// ```
pub fn quantize_weights(w: &Tensor, transposed: bool) -> Result<(BlockFp8, Option<BlockFp8>)> {
    w.expect_dtype("weights", DType::F32)?;
    let &[g, n, k] = w.dims() else {
        return Err(Error::Shape(format!("weights {:?}: expected [G, n, k]", w.dims())));
    };
    for (what, v) in [("n", n), ("k", k)] {
        if v % SCALE_BLOCK != 0 {
            return Err(Error::Alignment {
                what: format!("{what} of block-quantized weights"),
                required: SCALE_BLOCK,
                got: v,
            });
        }
    }
    let dev = w.device().clone();
    let (nb, kb) = (n / SCALE_BLOCK, k / SCALE_BLOCK);
    let Some(on) = dev.launcher() else {
        // The reference, and for the transpose the same codes and scales transposed per group
        // (what the kernel writes: a 128 x 128 block transposes as a whole).
        let (codes, scales) = reference::quantize_blocks(w.cpu_slice::<f32>()?, g, n, k);
        let codes: Vec<F8E4M3> = codes.into_iter().map(F8E4M3).collect();
        let qt = match transposed {
            true => Some(BlockFp8 {
                codes: Tensor::from_slice(&transpose_groups(&codes, n, k), &[g, k, n], &dev)?,
                scales: Tensor::from_slice(&transpose_groups(&scales, nb, kb), &[g, kb, nb], &dev)?,
            }),
            false => None,
        };
        let q = BlockFp8 {
            codes: Tensor::from_slice(&codes, &[g, n, k], &dev)?,
            scales: Tensor::from_slice(&scales, &[g, nb, kb], &dev)?,
        };
        return Ok((q, qt));
    };
    let new = |dims: [usize; 3], sdims: [usize; 3]| -> Result<BlockFp8> {
        Ok(BlockFp8 {
            codes: Tensor::empty(&dims, DType::F8E4M3, &dev)?,
            scales: Tensor::empty(&sdims, DType::F32, &dev)?,
        })
    };
    let mut q = new([g, n, k], [g, nb, kb])?;
    let mut qt = if transposed { Some(new([g, k, n], [g, kb, nb])?) } else { None };
    let (codes_t, scales_t) = match qt.as_mut() {
        Some(t) => (Some(t.codes.dev_ptr_mut::<F8E4M3>()?), Some(t.scales.dev_ptr_mut::<f32>()?)),
        None => (None, None),
    };
    raw_quantize(on, (g, n, k), w.dev_ptr()?, q.codes.dev_ptr_mut()?, q.scales.dev_ptr_mut()?, codes_t, scales_t)?;
    Ok((q, qt))
}

/// `v [G, rows, cols]` -> `[G, cols, rows]`.
fn transpose_groups<T: Copy>(v: &[T], rows: usize, cols: usize) -> Vec<T> {
    v.chunks(rows * cols).flat_map(|m| transpose(m, rows, cols)).collect()
}

/// The raw launch of [`quantize_weights`] on device buffers: `w [g, n, k]` F32, `codes` and
/// `scales` (and, both or neither, `codes_t [g, k, n]` and `scales_t [g, k / 128, n / 128]`).
/// Checked before the launch: `n` and `k` multiples of 128, every length, 16-byte alignment of
/// `w` and the codes (vector accesses), 4 bytes of the scales, and that every buffer lives where
/// `on` runs.
pub fn raw_quantize(
    on: &dyn Launcher,
    (g, n, k): (usize, usize, usize),
    w: DevPtr<'_, f32>,
    codes: DevPtrMut<'_, F8E4M3>,
    scales: DevPtrMut<'_, f32>,
    codes_t: Option<DevPtrMut<'_, F8E4M3>>,
    scales_t: Option<DevPtrMut<'_, f32>>,
) -> Result<()> {
    if n % SCALE_BLOCK != 0 || k % SCALE_BLOCK != 0 || g * n * k > i32::MAX as usize {
        return Err(Error::Shape(format!("block quantization of [{g}, {n}, {k}]: n, k multiples of 128 within i32")));
    }
    let blocks = g * (n / SCALE_BLOCK) * (k / SCALE_BLOCK);
    let expect = |what: &str, got: usize, want: usize| crate::raw::expect(what, got, want);
    expect("weights", w.len(), g * n * k)?;
    expect("codes", codes.len(), g * n * k)?;
    expect("scales", scales.len(), blocks)?;
    moekit_cuda::check_aligned("weights", w.addr(), w.len(), 16)?;
    moekit_cuda::check_aligned("codes", codes.addr(), codes.len(), 16)?;
    moekit_cuda::check_aligned("scales", scales.addr(), scales.len(), 4)?;
    let mut spaces = vec![w.space(), codes.space(), scales.space()];
    let (ct, st) = match (&codes_t, &scales_t) {
        (Some(c), Some(s)) => {
            expect("transposed codes", c.len(), g * n * k)?;
            expect("transposed scales", s.len(), blocks)?;
            moekit_cuda::check_aligned("transposed codes", c.addr(), c.len(), 16)?;
            moekit_cuda::check_aligned("transposed scales", s.addr(), s.len(), 4)?;
            spaces.extend([c.space(), s.space()]);
            (c.addr(), s.addr())
        }
        (None, None) => (0, 0),
        _ => return Err(Error::InvalidArgument("transposed codes and scales: both or neither".into())),
    };
    moekit_cuda::ensure_addressable(on, &spaces)?;
    if blocks == 0 {
        return Ok(());
    }
    let params = moekit_abi::MoekitQuantBlocksParams {
        w: w.addr(),
        codes: codes.addr(),
        scales: scales.addr(),
        codes_t: ct,
        scales_t: st,
        groups: g as i32,
        n: n as i32,
        k: k as i32,
        _pad: 0,
    };
    let cfg = LaunchConfig { grid: (blocks as u32, 1, 1), block: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: one MoekitQuantBlocksParams by value (layout checked by moekit-abi's tests);
    // block b reads the 128 x 128 block b of `w` and writes the same block of `codes` (and of
    // `codes_t` transposed) and one scale: the lengths checked above are exactly g n k and
    // g (n / 128) (k / 128), with n and k multiples of 128, so every access is in bounds; the
    // 16-byte vector accesses are aligned (rows of k floats / bytes, k a multiple of 128, and
    // the bases checked); every buffer lives where `on` runs.
    unsafe { moekit_cuda::launch(on, &QUANT_BLOCKS, "moekit_quant_blocks_e4m3", cfg, (params,)) }
}
