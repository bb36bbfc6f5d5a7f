//! Dense f32 matrix products on the CPU: `matrixmultiply`'s packed SIMD kernels, split over
//! rayon threads by blocks of output rows.
//!
//! Determinism: the row blocks have a fixed size ([`ROW_BLOCK`]), whatever the thread count,
//! and each output element's reduction runs in `matrixmultiply`'s fixed order, which does not
//! depend on how many rows a call has. So the same inputs give the same bits on 1 or N
//! threads, and a row gives the same bits whether it is computed alone (a decode step) or
//! with others (a full forward).

use rayon::prelude::*;

/// Output rows per parallel task.
pub const ROW_BLOCK: usize = 32;

/// Below this many multiply-adds a product runs on the calling thread.
const PARALLEL_MIN: usize = 1 << 16;

/// `c[m, n] (+)= a' b'` where `a'[i, p] = a[i * rsa + p * csa]`, `b'[p, j] = b[p * rsb + j * csb]`.
#[allow(clippy::too_many_arguments)]
fn gemm(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    (rsa, csa): (usize, usize),
    b: &[f32],
    (rsb, csb): (usize, usize),
    c: &mut [f32],
    accumulate: bool,
) {
    assert!(c.len() >= m * n, "gemm output too small");
    if m == 0 || n == 0 {
        return;
    }
    let beta = if accumulate { 1.0 } else { 0.0 };
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    // The last element each operand view reaches must be inside its slice.
    assert!((m - 1) * rsa + (k - 1) * csa < a.len(), "gemm: A too small");
    assert!((k - 1) * rsb + (n - 1) * csb < b.len(), "gemm: B too small");
    let run = |row0: usize, rows: usize, c: &mut [f32]| {
        // SAFETY: the asserts above bound every element the strided views of A (rows
        // row0..row0 + rows) and B touch inside their slices; `c` holds `rows * n` elements
        // written with row stride n; the three slices do not overlap (c is &mut).
        unsafe {
            matrixmultiply::sgemm(
                rows,
                k,
                n,
                1.0,
                a.as_ptr().add(row0 * rsa),
                rsa as isize,
                csa as isize,
                b.as_ptr(),
                rsb as isize,
                csb as isize,
                beta,
                c.as_mut_ptr(),
                n as isize,
                1,
            )
        }
    };
    let c = &mut c[..m * n];
    if m * n * k < PARALLEL_MIN || m <= ROW_BLOCK {
        for (blk, chunk) in c.chunks_mut(ROW_BLOCK * n).enumerate() {
            run(blk * ROW_BLOCK, chunk.len() / n, chunk);
        }
    } else {
        c.par_chunks_mut(ROW_BLOCK * n)
            .enumerate()
            .for_each(|(blk, chunk)| run(blk * ROW_BLOCK, chunk.len() / n, chunk));
    }
}

/// `c[m, n] (+)= a[m, k] b[n, k]^T` (a linear layer `y = x W^T` with `W [out, in]`).
pub fn matmul_nt(a: &[f32], b: &[f32], m: usize, n: usize, k: usize, c: &mut [f32], accumulate: bool) {
    gemm(m, n, k, a, (k, 1), b, (1, k), c, accumulate)
}

/// `c[m, n] (+)= a[m, k] b[k, n]` (the input gradient `dx = dy W`).
pub fn matmul_nn(a: &[f32], b: &[f32], m: usize, n: usize, k: usize, c: &mut [f32], accumulate: bool) {
    gemm(m, n, k, a, (k, 1), b, (n, 1), c, accumulate)
}

/// `c[m, n] (+)= a[k, m]^T b[k, n]` (the weight gradient `dW = dy^T x`, k = tokens).
pub fn matmul_tn(a: &[f32], b: &[f32], m: usize, n: usize, k: usize, c: &mut [f32], accumulate: bool) {
    gemm(m, n, k, a, (1, m), b, (n, 1), c, accumulate)
}

/// `y += x` elementwise.
pub fn add_assign(y: &mut [f32], x: &[f32]) {
    for (a, b) in y.iter_mut().zip(x) {
        *a += b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, n: usize, k: usize, at: bool, bt: bool) -> Vec<f32> {
        let mut c = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                for p in 0..k {
                    let x = if at { a[p * m + i] } else { a[i * k + p] };
                    let y = if bt { b[j * k + p] } else { b[p * n + j] };
                    c[i * n + j] += x as f64 * y as f64;
                }
            }
        }
        c.into_iter().map(|v| v as f32).collect()
    }

    #[test]
    fn products_match_naive_and_rows_are_independent() {
        let mut r = crate::rng::Rng::new(3);
        let (m, n, k) = (77, 45, 130);
        let a: Vec<f32> = (0..m * k).map(|_| r.normal()).collect();
        let b: Vec<f32> = (0..n * k).map(|_| r.normal()).collect();
        let close = |x: &[f32], y: &[f32]| x.iter().zip(y).all(|(p, q)| (p - q).abs() <= 1e-4 * (1.0 + q.abs()));
        let mut c = vec![0.0; m * n];
        matmul_nt(&a, &b, m, n, k, &mut c, false);
        assert!(close(&c, &naive(&a, &b, m, n, k, false, true)));
        // One row alone gives the same bits as within the full product.
        let mut row = vec![0.0; n];
        matmul_nt(&a[5 * k..6 * k], &b, 1, n, k, &mut row, false);
        assert_eq!(row, c[5 * n..6 * n]);
        matmul_nn(&a, &b, m, n, k, &mut c, false);
        assert!(close(&c, &naive(&a, &b, m, n, k, false, false)));
        // a as [k, m]: reuse the buffer (same length).
        matmul_tn(&a, &b, m, n, k, &mut c, false);
        assert!(close(&c, &naive(&a, &b, m, n, k, true, false)));
        let before = c.clone();
        matmul_tn(&a, &b, m, n, k, &mut c, true);
        assert!(c.iter().zip(&before).all(|(x, y)| (x - 2.0 * y).abs() <= 1e-4 * (1.0 + y.abs())));
    }
}
