//! Dense linear layers as moekit's grouped GEMM with one group (BF16 operands, f32
//! accumulation), and the two dtype conversions the step needs, moekit-cast's kernels:
//! - **narrow** F32 -> BF16: `cast_f32_to_bf16` (round to nearest even, NaN -> 0x7fc0: the
//!   bits of moekit-norm's `to_bf16`, which the kernels' BF16 outputs use too);
//! - **widen** BF16 -> F32: `cast_bf16_to_f32` (exact).
//!
//! One pass each, 6 bytes moved per element (until version 2 of the step the widening was a
//! k-grouped GEMM with stacked 8x8 identities, `8 N C` multiply-adds; the bits are the same).

use crate::Result;
use moekit_gemm::{dgrad, k_grouped, m_grouped_contiguous, GemmInput};
use moekit_tensor::{DType, Device, Tensor};

/// Per-(batch, seq) constants of a step, uploaded once: `mi0 [N]` I32 zeros (one-group
/// `m_indices`), `off [2]` I32 `[0, N]` (one-group k-grouped offsets), `pos [N]` I32 RoPE
/// positions `r % seq`.
#[derive(Debug)]
pub(crate) struct Consts {
    pub batch: usize,
    pub seq: usize,
    pub n: usize,
    pub mi0: Tensor,
    pub off: Tensor,
    pub pos: Tensor,
    /// `[batch]` F32 of `1 / batch`: the gradient of the balance loss's mean over sequences.
    pub seq_mean: Tensor,
}

impl Consts {
    pub fn new(batch: usize, seq: usize, dev: &Device) -> Result<Self> {
        let n = batch * seq;
        let pos: Vec<i32> = (0..n).map(|r| (r % seq) as i32).collect();
        Ok(Consts {
            batch,
            seq,
            n,
            mi0: Tensor::zeros(&[n], DType::I32, dev)?,
            off: Tensor::from_slice(&[0i32, n as i32], &[2], dev)?,
            pos: Tensor::from_slice(&pos, &[n], dev)?,
            seq_mean: Tensor::from_slice(&vec![1.0f32 / batch.max(1) as f32; batch], &[batch], dev)?,
        })
    }

    /// BF16 `[N, ..]` -> F32 `[N, C]` (the trailing dimensions flattened), exact.
    pub fn widen(&self, y: &Tensor) -> Result<Tensor> {
        Ok(moekit_cast::cast_bf16_to_f32(y)?.reshape(&[self.n, y.numel() / self.n.max(1)])?)
    }

    /// F32 `[N, ..]` -> BF16 `[N, C]` (the trailing dimensions flattened), round to nearest even.
    pub fn narrow(&self, x: &Tensor) -> Result<Tensor> {
        Ok(moekit_cast::cast_f32_to_bf16(x)?.reshape(&[self.n, x.numel() / self.n.max(1)])?)
    }

    /// `y = x W^T`: `x [N, in]` BF16, `w [out, in]` BF16 -> `[N, out]` BF16.
    pub fn linear(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let w3 = w.reshape(&[1, w.dims()[0], w.dims()[1]])?;
        Ok(m_grouped_contiguous(GemmInput::Bf16(x), GemmInput::Bf16(&w3), &self.mi0)?)
    }

    /// `dx = dy W`: `dy [N, out]` BF16, `w [out, in]` BF16 -> `[N, in]` BF16.
    pub fn linear_dx(&self, dy: &Tensor, w: &Tensor) -> Result<Tensor> {
        let w3 = w.reshape(&[1, w.dims()[0], w.dims()[1]])?;
        Ok(dgrad(GemmInput::Bf16(dy), GemmInput::Bf16(&w3), &self.mi0)?)
    }

    /// `dW = dy^T x`: `dy [N, out]`, `x [N, in]` BF16 -> `[out, in]` F32.
    pub fn linear_dw(&self, dy: &Tensor, x: &Tensor) -> Result<Tensor> {
        let (o, i) = (dy.dims()[1], x.dims()[1]);
        Ok(k_grouped(GemmInput::Bf16(dy), GemmInput::Bf16(x), &self.off)?.reshape(&[o, i])?)
    }
}
