//! Dense linear layers as moekit's grouped GEMM with one group (BF16 operands, f32
//! accumulation), and the two dtype conversions the step needs, built from existing ops
//! (moekit has no standalone cast op yet):
//! - **narrow** F32 -> BF16: the embedding gather of rows `0..N` of the F32 tensor, in BF16
//!   (round to nearest even, the kernels' `to_bf16`): one pass, exact as a cast;
//! - **widen** BF16 -> F32: the k-grouped GEMM `I^T Y` with the identity `I [N, N]` (BF16) and
//!   one group: every output is one exact product `1 * y` plus exact zeros, so the result is
//!   `y` widened, bit for bit, on every device. It costs `N^2 C` multiply-adds instead of `N C`
//!   copies: a stand-in until a cast kernel exists (see kernels/NOTES.md).

use crate::Result;
use moekit_gemm::{dgrad, k_grouped, m_grouped_contiguous, GemmInput};
use moekit_tensor::{DType, Device, Tensor};

/// Per-(batch, seq) constants of a step, uploaded once: `arange [N]` I32 (the narrowing
/// gather's ids), `eye [N, N]` BF16 (the widening GEMM), `mi0 [N]` I32 zeros (one-group
/// `m_indices`), `off [2]` I32 `[0, N]` (one-group k-grouped offsets), `pos [N]` I32 RoPE
/// positions `r % seq`.
#[derive(Debug)]
pub(crate) struct Consts {
    pub batch: usize,
    pub seq: usize,
    pub n: usize,
    pub arange: Tensor,
    pub eye: Tensor,
    pub mi0: Tensor,
    pub off: Tensor,
    pub pos: Tensor,
}

impl Consts {
    pub fn new(batch: usize, seq: usize, dev: &Device) -> Result<Self> {
        let n = batch * seq;
        let arange: Vec<i32> = (0..n as i32).collect();
        let mut eye = vec![moekit_dtype::bf16::from_f32(0.0); n * n];
        for i in 0..n {
            eye[i * n + i] = moekit_dtype::bf16::from_f32(1.0);
        }
        let pos: Vec<i32> = (0..n).map(|r| (r % seq) as i32).collect();
        Ok(Consts {
            batch,
            seq,
            n,
            arange: Tensor::from_slice(&arange, &[n], dev)?,
            eye: Tensor::from_slice(&eye, &[n, n], dev)?,
            mi0: Tensor::zeros(&[n], DType::I32, dev)?,
            off: Tensor::from_slice(&[0i32, n as i32], &[2], dev)?,
            pos: Tensor::from_slice(&pos, &[n], dev)?,
        })
    }

    /// BF16 `[N, C]` -> F32 `[N, C]`, exact (see the module docs).
    pub fn widen(&self, y: &Tensor) -> Result<Tensor> {
        let cols = y.dims()[1];
        Ok(k_grouped(GemmInput::Bf16(&self.eye), GemmInput::Bf16(y), &self.off)?.reshape(&[self.n, cols])?)
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
