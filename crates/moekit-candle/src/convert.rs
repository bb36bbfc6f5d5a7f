//! Moving data between candle tensors and moekit's CPU tensors, and the checks every op
//! makes before it touches data.
//!
//! Every conversion here is exact: BF16, F32, I32 and FP8 bits are copied, U32 ids are
//! reinterpreted as I32 (`u32::MAX` becomes moekit's "not routed" id `-1`).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Device, Layout, Result, Shape, Tensor};
use moekit_dtype::{bf16, F8E4M3};
use moekit_tensor as mt;

/// A moekit error as a candle error (its message kept).
pub(crate) fn wrap(e: moekit_cuda::Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// `Err(Error::Msg)` with "moekit-candle: " in front.
pub(crate) fn bad<T>(msg: String) -> Result<T> {
    Err(candle_core::Error::Msg(format!("moekit-candle: {msg}")))
}

/// CPU tensors have a path in every build, CUDA tensors with the `cuda` feature (see the
/// crate docs, "CUDA"); any other device is an error.
pub(crate) fn expect_cpu(what: &str, t: &Tensor) -> Result<()> {
    match t.device() {
        Device::Cpu => Ok(()),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => Ok(()),
        d => bad(format!(
            "{what} is on {:?}: this build of moekit-candle runs CPU tensors{}",
            d.location(),
            if cfg!(feature = "cuda") { " and CUDA tensors" } else { " only (CUDA tensors need the `cuda` feature)" }
        )),
    }
}

/// Checks `t`'s dtype against the allowed ones.
pub(crate) fn expect_dtype(what: &str, t: &Tensor, allowed: &[DType]) -> Result<()> {
    if allowed.contains(&t.dtype()) {
        Ok(())
    } else {
        bad(format!("{what} has dtype {:?}, expected one of {allowed:?}", t.dtype()))
    }
}

/// Checks `t`'s rank and returns its dims.
pub(crate) fn expect_rank<'a>(what: &str, t: &'a Tensor, rank: usize) -> Result<&'a [usize]> {
    if t.rank() == rank {
        Ok(t.dims())
    } else {
        bad(format!("{what} has shape {:?}, expected rank {rank}", t.dims()))
    }
}

/// Checks `t`'s dims exactly.
pub(crate) fn expect_dims(what: &str, t: &Tensor, dims: &[usize]) -> Result<()> {
    if t.dims() == dims {
        Ok(())
    } else {
        bad(format!("{what} has shape {:?}, expected {dims:?}", t.dims()))
    }
}

/// The contiguous element range of a custom op's input (the public functions make their
/// inputs contiguous before applying an op, so another layout is a bug, reported as an error).
fn range(layout: &Layout, what: &str) -> Result<std::ops::Range<usize>> {
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(a..b),
        None => bad(format!("{what}: non-contiguous layout reached a custom op")),
    }
}

/// A custom op's CPU input as a moekit CPU tensor of the same dims (bits copied; U32 as I32).
pub(crate) fn storage_to_mt(s: &CpuStorage, layout: &Layout, what: &str) -> Result<mt::Tensor> {
    let r = range(layout, what)?;
    let dims = layout.dims();
    let cpu = &mt::Device::Cpu;
    let t = match s {
        CpuStorage::F32(v) => mt::Tensor::from_slice(&v[r], dims, cpu),
        CpuStorage::BF16(v) => mt::Tensor::from_slice(&v[r], dims, cpu),
        CpuStorage::I32(v) => mt::Tensor::from_slice(&v[r], dims, cpu),
        CpuStorage::U32(v) => {
            let ids: Vec<i32> = v[r].iter().map(|&e| e as i32).collect();
            mt::Tensor::from_slice(&ids, dims, cpu)
        }
        CpuStorage::F8E4M3(v) => {
            let codes: Vec<F8E4M3> = v[r].iter().map(|e| F8E4M3::from_bits(e.to_bits())).collect();
            mt::Tensor::from_slice(&codes, dims, cpu)
        }
        other => return bad(format!("{what}: dtype {:?} is not taken by moekit", other.dtype())),
    };
    t.map_err(wrap)
}

/// A candle tensor (any layout, CPU) as a moekit CPU tensor of the same dims.
pub(crate) fn tensor_to_mt(t: &Tensor, what: &str) -> Result<mt::Tensor> {
    expect_cpu(what, t)?;
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    match &*s {
        candle_core::Storage::Cpu(c) => storage_to_mt(c, l, what),
        _ => bad(format!("{what} is not a CPU tensor")),
    }
}

/// A moekit CPU tensor as a candle CPU storage and shape (bits copied).
pub(crate) fn mt_to_storage(t: &mt::Tensor) -> Result<(CpuStorage, Shape)> {
    let shape = Shape::from_dims(t.dims());
    let s = match t.dtype() {
        mt::DType::F32 => CpuStorage::F32(t.to_vec::<f32>().map_err(wrap)?),
        mt::DType::BF16 => CpuStorage::BF16(t.to_vec::<bf16>().map_err(wrap)?),
        mt::DType::I32 => CpuStorage::I32(t.to_vec::<i32>().map_err(wrap)?),
        d => return bad(format!("moekit output of dtype {d} has no candle storage here")),
    };
    Ok((s, shape))
}

/// A moekit CPU tensor as a candle CPU tensor (no gradient).
pub(crate) fn mt_to_tensor(t: &mt::Tensor) -> Result<Tensor> {
    match t.dtype() {
        mt::DType::F8E4M3 => {
            let codes = t.to_vec::<F8E4M3>().map_err(wrap)?;
            let bytes: Vec<u8> = codes.iter().map(|c| c.to_bits()).collect();
            Tensor::from_raw_buffer(&bytes, DType::F8E4M3, t.dims(), &Device::Cpu)
        }
        _ => {
            let (s, shape) = mt_to_storage(t)?;
            Ok(Tensor::from_storage(candle_core::Storage::Cpu(s), shape, candle_core::op::BackpropOp::none(), false))
        }
    }
}

/// Expert ids `[T, k]` as I32 (U32 reinterpreted: `u32::MAX` is `-1`, "not routed").
pub(crate) fn ids_to_mt(ids: &Tensor, what: &str) -> Result<mt::Tensor> {
    expect_dtype(what, ids, &[DType::U32, DType::I32])?;
    tensor_to_mt(ids, what)
}
