//! Dense f32 matrix products on the CPU: the `gemm` crate's packed SIMD kernels (AVX-512 or
//! AVX2/FMA, chosen at run time), split over rayon threads in tiles of the output.
//!
//! Chosen by measurement (`cargo bench -p moekit-benches --bench model`, 1 thread, default
//! model training step): `gemm` 0.19 with its AVX-512 kernels 160 ms, `matrixmultiply` 0.3
//! (AVX2/FMA only) 217 ms; see kernels/NOTES.md.
//!
//! Determinism: the tiles are a function of the problem's shape only ([`tiles`]), never of the
//! thread count, and each tile runs one single-threaded `gemm` call, whose reduction order
//! for an element is fixed. So the same inputs give the same bits on 1 or N threads.

use rayon::prelude::*;

/// Below this many multiply-adds a product runs as one tile on the calling thread.
const PARALLEL_MIN: usize = 1 << 18;

/// Output tile `(rows, cols)` for an `m x n x k` product: 256-row bands when there are many
/// rows, 64-row bands for the weight gradients' 128-512 rows (long reductions), column bands
/// below that, so that there are several tasks either way.
fn tiles(m: usize, n: usize, k: usize) -> (usize, usize) {
    if m * n * k < PARALLEL_MIN {
        (m.max(1), n.max(1))
    } else if m >= 512 {
        (256, n)
    } else if m >= 128 {
        (64, n)
    } else {
        (m, (n.div_ceil(4).div_ceil(16) * 16).max(16))
    }
}

/// A raw output pointer shared by tasks that write disjoint tiles.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: every task writes only its own tile (disjoint rows/columns of the output), and the
// output outlives the parallel loop (it is borrowed or owned by the caller for its whole span).
unsafe impl Send for Out {}
// SAFETY: as above; the pointer itself is only copied.
unsafe impl Sync for Out {}

impl Out {
    /// The pointer (a method, so that closures capture the whole `Send` wrapper).
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// `c[m, n] (+)= a' b'` where `a'[i, p] = a[i * rsa + p * csa]`, `b'[p, j] = b[p * rsb + j * csb]`,
/// `c` row-major with row stride `n`.
///
/// # Safety
/// `c` must be valid for writes of `m * n` elements (and initialised when `accumulate`), not
/// aliased by `a` or `b`; the strided views must stay inside `a` and `b` (checked).
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_into(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    (rsa, csa): (usize, usize),
    b: &[f32],
    (rsb, csb): (usize, usize),
    c: *mut f32,
    accumulate: bool,
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    assert!((m - 1) * rsa + (k - 1) * csa < a.len(), "gemm: A too small");
    assert!((k - 1) * rsb + (n - 1) * csb < b.len(), "gemm: B too small");
    let (tr, tc) = tiles(m, n, k);
    let out = Out(c);
    let run = |r0: usize, c0: usize| {
        let (rows, cols) = (tr.min(m - r0), tc.min(n - c0));
        // SAFETY: the asserts above keep rows r0..r0 + rows of A' and columns c0..c0 + cols of
        // B' inside their slices; the tile of C at (r0, c0) is inside the m x n output the
        // caller provides, written by this task only; dst strides (1, n), lhs strides
        // (csa, rsa), rhs strides (csb, rsb) in gemm's (column, row) order.
        unsafe {
            gemm::gemm(
                rows,
                cols,
                k,
                out.ptr().add(r0 * n + c0),
                1,
                n as isize,
                accumulate,
                a.as_ptr().add(r0 * rsa),
                csa as isize,
                rsa as isize,
                b.as_ptr().add(c0 * csb),
                csb as isize,
                rsb as isize,
                1.0f32,
                1.0f32,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
    };
    let tasks: Vec<(usize, usize)> = (0..m).step_by(tr).flat_map(|r| (0..n).step_by(tc).map(move |c| (r, c))).collect();
    if tasks.len() == 1 {
        run(0, 0);
    } else {
        tasks.par_iter().for_each(|&(r, c)| run(r, c));
    }
}

/// A new `[m, n]` output written in full by one product (no zero-fill pass).
fn new_output(m: usize, n: usize, k: usize, write: impl FnOnce(*mut f32)) -> Vec<f32> {
    if k == 0 {
        return vec![0.0; m * n];
    }
    let mut out: Vec<f32> = Vec::with_capacity(m * n);
    write(out.as_mut_ptr());
    // SAFETY: `write` ran a non-accumulating product over the whole m x n output (k > 0), so
    // every element of the capacity's first m * n is initialised.
    unsafe { out.set_len(m * n) };
    out
}

fn check_out(c: &[f32], m: usize, n: usize) {
    assert!(c.len() >= m * n, "gemm output too small");
}

/// `c[m, n] (+)= a[m, k] b[n, k]^T` (a linear layer `y = x W^T` with `W [out, in]`).
pub fn matmul_nt(a: &[f32], b: &[f32], m: usize, n: usize, k: usize, c: &mut [f32], accumulate: bool) {
    check_out(c, m, n);
    if k == 0 && !accumulate {
        c[..m * n].fill(0.0);
    }
    // SAFETY: c holds m * n initialised elements and is a distinct &mut borrow.
    unsafe { gemm_into(m, n, k, a, (k, 1), b, (1, k), c.as_mut_ptr(), accumulate) }
}

/// `c[m, n] (+)= a[m, k] b[k, n]` (the input gradient `dx = dy W`).
pub fn matmul_nn(a: &[f32], b: &[f32], m: usize, n: usize, k: usize, c: &mut [f32], accumulate: bool) {
    check_out(c, m, n);
    if k == 0 && !accumulate {
        c[..m * n].fill(0.0);
    }
    // SAFETY: as in matmul_nt.
    unsafe { gemm_into(m, n, k, a, (k, 1), b, (n, 1), c.as_mut_ptr(), accumulate) }
}

/// `c[m, n] (+)= a[k, m]^T b[k, n]` (the weight gradient `dW = dy^T x`, k = tokens).
pub fn matmul_tn(a: &[f32], b: &[f32], m: usize, n: usize, k: usize, c: &mut [f32], accumulate: bool) {
    check_out(c, m, n);
    if k == 0 && !accumulate {
        c[..m * n].fill(0.0);
    }
    // SAFETY: as in matmul_nt.
    unsafe { gemm_into(m, n, k, a, (1, m), b, (n, 1), c.as_mut_ptr(), accumulate) }
}

/// `a[m, k] b[n, k]^T` as a new `[m, n]`.
pub fn nt(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    // SAFETY: the pointer is the new output's, valid for m * n writes.
    new_output(m, n, k, |c| unsafe { gemm_into(m, n, k, a, (k, 1), b, (1, k), c, false) })
}

/// `a[m, k] b[k, n]` as a new `[m, n]`.
pub fn nn(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    // SAFETY: as in nt.
    new_output(m, n, k, |c| unsafe { gemm_into(m, n, k, a, (k, 1), b, (n, 1), c, false) })
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
    fn products_match_naive_in_every_tiling() {
        let mut r = crate::rng::Rng::new(3);
        let close = |x: &[f32], y: &[f32]| x.iter().zip(y).all(|(p, q)| (p - q).abs() <= 1e-4 * (1.0 + q.abs()));
        // One tile, row bands, column bands.
        for (m, n, k) in [(7, 5, 9), (600, 40, 33), (77, 300, 130)] {
            let a: Vec<f32> = (0..m * k.max(n)).map(|_| r.normal()).collect();
            let b: Vec<f32> = (0..n * k.max(m)).map(|_| r.normal()).collect();
            let mut c = vec![0.0; m * n];
            matmul_nt(&a, &b, m, n, k, &mut c, false);
            assert!(close(&c, &naive(&a, &b, m, n, k, false, true)), "nt {m}x{n}x{k}");
            assert_eq!(c, nt(&a, &b, m, n, k));
            matmul_nn(&a, &b, m, n, k, &mut c, false);
            assert!(close(&c, &naive(&a, &b, m, n, k, false, false)), "nn {m}x{n}x{k}");
            assert_eq!(c, nn(&a, &b, m, n, k));
            matmul_tn(&a, &b, m, n, k, &mut c, false);
            assert!(close(&c, &naive(&a, &b, m, n, k, true, false)), "tn {m}x{n}x{k}");
            let before = c.clone();
            matmul_tn(&a, &b, m, n, k, &mut c, true);
            assert!(c.iter().zip(&before).all(|(x, y)| (x - 2.0 * y).abs() <= 1e-4 * (1.0 + y.abs())));
        }
        assert_eq!(nt(&[], &[], 3, 2, 0), vec![0.0; 6]);
    }
}
