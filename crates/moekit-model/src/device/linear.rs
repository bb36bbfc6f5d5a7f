//! Dense linear layers as moekit's grouped GEMM with one group (BF16 operands, f32
//! accumulation), and the two dtype conversions the step needs, built from existing ops
//! (moekit has no standalone cast op yet):
//! - **narrow** F32 -> BF16: the embedding gather of rows `0..N` of the F32 tensor, in BF16
//!   (round to nearest even, the kernels' `to_bf16`): one pass, exact as a cast;
//! - **widen** BF16 -> F32: the k-grouped GEMM over `N / 8` groups of 8 tokens with
//!   `A = [I_8; I_8; ...] [N, 8]` (stacked 8x8 identities, BF16): group `g` gives
//!   `out[g, j, :] = sum over its 8 tokens t of A[t, j] Y[t, :] = Y[8 g + j, :]`, one exact
//!   product `1 * y` plus exact zeros, so the `[N / 8, 8, C]` result is `Y` widened, bit for
//!   bit, on every device. `8 N C` multiply-adds instead of `N C` copies: a stand-in until a
//!   cast kernel exists (see kernels/NOTES.md).

use crate::Result;
use moekit_gemm::{dgrad, k_grouped, m_grouped_contiguous, GemmInput};
use moekit_tensor::{DType, Device, Tensor};

/// Per-(batch, seq) constants of a step, uploaded once: `arange [N]` I32 (the narrowing
/// gather's ids), `eye [N, 8]` BF16 stacked 8x8 identities and `off8 [N / 8 + 1]` I32 groups of
/// 8 tokens (the widening GEMM), `mi0 [N]` I32 zeros (one-group `m_indices`), `off [2]` I32
/// `[0, N]` (one-group k-grouped offsets), `pos [N]` I32 RoPE positions `r % seq`.
/// `N` is a multiple of 8 (checked by the step).
#[derive(Debug)]
pub(crate) struct Consts {
    pub batch: usize,
    pub seq: usize,
    pub n: usize,
    pub arange: Tensor,
    pub eye: Tensor,
    pub off8: Tensor,
    pub mi0: Tensor,
    pub off: Tensor,
    pub pos: Tensor,
}

impl Consts {
    pub fn new(batch: usize, seq: usize, dev: &Device) -> Result<Self> {
        let n = batch * seq;
        let arange: Vec<i32> = (0..n as i32).collect();
        let mut eye = vec![moekit_dtype::bf16::from_f32(0.0); n * 8];
        for t in 0..n {
            eye[t * 8 + t % 8] = moekit_dtype::bf16::from_f32(1.0);
        }
        let off8: Vec<i32> = (0..=n / 8).map(|g| (8 * g) as i32).collect();
        let pos: Vec<i32> = (0..n).map(|r| (r % seq) as i32).collect();
        Ok(Consts {
            batch,
            seq,
            n,
            arange: Tensor::from_slice(&arange, &[n], dev)?,
            eye: Tensor::from_slice(&eye, &[n, 8], dev)?,
            off8: Tensor::from_slice(&off8, &[off8.len()], dev)?,
            mi0: Tensor::zeros(&[n], DType::I32, dev)?,
            off: Tensor::from_slice(&[0i32, n as i32], &[2], dev)?,
            pos: Tensor::from_slice(&pos, &[n], dev)?,
        })
    }

    /// BF16 `[N, C]` -> F32 `[N, C]`, exact (see the module docs).
    pub fn widen(&self, y: &Tensor) -> Result<Tensor> {
        let cols = y.dims()[1];
        Ok(k_grouped(GemmInput::Bf16(&self.eye), GemmInput::Bf16(y), &self.off8)?.reshape(&[self.n, cols])?)
    }

    /// F32 `[N, C]` -> BF16 `[N, C]`, round to nearest even.
    pub fn narrow(&self, x: &Tensor) -> Result<Tensor> {
        Ok(moekit_norm::embedding_deferred(x, &self.arange, DType::BF16)?.0)
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
