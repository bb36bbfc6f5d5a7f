//! The CPU reference against moekit-model's layers (the model's CPU versions, which the kernels
//! replace): RoPE bit for bit (same tables, same rotation), the embedding gradient bit for bit
//! (same order), RMSNorm's `dg` bit for bit given the same `inv`, and RMSNorm's `y`, `inv` and
//! `dx` within bounds argued from the f32 statistics (the model sums in f64), plus an f64 loop.
//!
//! moekit-model is about to depend on this crate, so it is not a dev-dependency (a cycle): the
//! module `layers` below is a verbatim single-threaded copy of the model's functions
//! (crates/moekit-model/src/layers.rs: `rmsnorm`, `rmsnorm_backward`, `Rope`; the rayon chunks
//! of 64 rows are the blocks here). Keep it in step with the model.

#[allow(clippy::needless_range_loop)]
mod layers {
    const ROWS: usize = 64;

    fn sum_sq_f64(x: &[f32]) -> f64 {
        let mut acc = [0.0f64; 8];
        let xc = x.chunks_exact(8);
        let xr = xc.remainder();
        for c in xc {
            for l in 0..8 {
                acc[l] += (c[l] * c[l]) as f64;
            }
        }
        for (l, v) in xr.iter().enumerate() {
            acc[l] += (v * v) as f64;
        }
        ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
    }

    pub fn rmsnorm(x: &[f32], g: &[f32], d: usize, eps: f32) -> (Vec<f32>, Vec<f32>) {
        let (mut y, mut inv) = (vec![0.0f32; x.len()], vec![0.0f32; x.len() / d]);
        for ((xr, yr), iv) in x.chunks(d).zip(y.chunks_mut(d)).zip(inv.iter_mut()) {
            let ms = sum_sq_f64(xr) / d as f64;
            *iv = (1.0 / (ms + eps as f64).sqrt()) as f32;
            for ((o, &v), &gg) in yr.iter_mut().zip(xr).zip(g) {
                *o = v * *iv * gg;
            }
        }
        (y, inv)
    }

    pub fn rmsnorm_backward(x: &[f32], g: &[f32], inv: &[f32], dy: &[f32], d: usize, dg: &mut [f32]) -> Vec<f32> {
        let mut dx = vec![0.0f32; x.len()];
        let mut partial = Vec::new();
        for (i, dxb) in dx.chunks_mut(ROWS * d).enumerate() {
            let n = dxb.len();
            let (xb, dyb, ib) = (&x[i * ROWS * d..][..n], &dy[i * ROWS * d..][..n], &inv[i * ROWS..][..n / d]);
            let mut dgb = vec![0.0f32; d];
            for (((xr, dyr), dxr), &iv) in xb.chunks(d).zip(dyb.chunks(d)).zip(dxb.chunks_mut(d)).zip(ib) {
                for j in 0..d {
                    dgb[j] += dyr[j] * xr[j] * iv;
                }
                let mut lanes = [0.0f64; 8];
                let (xc, dc, gc) = (xr.chunks_exact(8), dyr.chunks_exact(8), g.chunks_exact(8));
                let tail = xc.remainder().len();
                for ((xs, ds), gs) in xc.zip(dc).zip(gc) {
                    for l in 0..8 {
                        lanes[l] += (ds[l] * gs[l]) as f64 * xs[l] as f64;
                    }
                }
                for (l, lane) in lanes.iter_mut().enumerate().take(tail) {
                    let j = d - tail + l;
                    *lane += (dyr[j] * g[j]) as f64 * xr[j] as f64;
                }
                let total =
                    ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
                let c = (total / d as f64) as f32 * iv * iv * iv;
                for j in 0..d {
                    dxr[j] = dyr[j] * g[j] * iv - xr[j] * c;
                }
            }
            partial.push(dgb);
        }
        for p in &partial {
            for (a, b) in dg.iter_mut().zip(p) {
                *a += b;
            }
        }
        dx
    }

    pub struct Rope {
        half: usize,
        cos: Vec<f32>,
        sin: Vec<f32>,
    }

    impl Rope {
        pub fn new(hd: usize, max_pos: usize, theta: f32) -> Self {
            let half = hd / 2;
            let mut cos = Vec::with_capacity(max_pos * half);
            let mut sin = Vec::with_capacity(max_pos * half);
            for p in 0..max_pos {
                for i in 0..half {
                    let freq = (theta as f64).powf(-(2.0 * i as f64) / hd as f64);
                    let a = p as f64 * freq;
                    cos.push(a.cos() as f32);
                    sin.push(a.sin() as f32);
                }
            }
            Rope { half, cos, sin }
        }

        fn rotate(&self, v: &mut [f32], pos: usize, inverse: bool) {
            let (c, s) = (&self.cos[pos * self.half..][..self.half], &self.sin[pos * self.half..][..self.half]);
            for i in 0..self.half {
                let (a, b) = (v[i], v[i + self.half]);
                let sn = if inverse { -s[i] } else { s[i] };
                v[i] = a * c[i] - b * sn;
                v[i + self.half] = b * c[i] + a * sn;
            }
        }

        pub fn apply(
            &self,
            x: &mut [f32],
            (width, rotated): (usize, usize),
            pos: impl Fn(usize) -> usize,
            inverse: bool,
        ) {
            let hd = 2 * self.half;
            for (r, row) in x.chunks_mut(width).enumerate() {
                for head in row[..rotated].chunks_mut(hd) {
                    self.rotate(head, pos(r), inverse);
                }
            }
        }
    }
}

use moekit_norm::reference::{self, RopeTable};
use rand::{rngs::StdRng, Rng, SeedableRng};

const U: f64 = f32::EPSILON as f64 / 2.0; // unit roundoff 2^-24

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(-2.0f32..2.0)).collect()
}

/// Terms per lane of the kernels' sum of squares: lane l owns the quads l, l + 32, ...
fn terms_per_lane(d: usize) -> usize {
    4 * d.div_ceil(4 * reference::LANES)
}

#[test]
fn rmsnorm_matches_the_model_within_the_f32_statistics_bound() {
    for (ci, &(rows, d)) in [(1usize, 16usize), (70, 64), (9, 264), (130, 7), (3, 1024)].iter().enumerate() {
        let x = random(rows * d, ci as u64);
        let g = random(d, ci as u64 + 50);
        let eps = 1e-5f32;
        let (mut y, mut inv) = (vec![0.0f32; rows * d], vec![0.0f32; rows]);
        reference::rmsnorm(&x, None, &g, eps, &mut y, &mut inv).unwrap();
        let (ym, invm) = layers::rmsnorm(&x, &g, d, eps);
        // inv: the f32 sum of m = terms_per_lane(d) non-negative terms per lane plus 5 butterfly
        // adds has relative error <= (m + 5) u; the mean, + eps, sqrt (halves it) and the
        // reciprocal add 0.5 + 0.5 + 0.5 + 0.5 u: |dinv| / inv <= ((m + 5) / 2 + 2) u; the
        // model's inv is the f64 value rounded once (0.5 u). y = (x inv) g rounds the same two
        // products on both sides, so it differs by the inv difference plus 2 roundings (2 u).
        // Bound used: ((m + 5) / 2 + 5) u, relative.
        let m = terms_per_lane(d) as f64;
        let rel_inv = ((m + 5.0) / 2.0 + 2.5) * U;
        let rel_y = rel_inv + 2.5 * U;
        for r in 0..rows {
            let e = ((inv[r] as f64) - invm[r] as f64).abs() / invm[r] as f64;
            assert!(
                e <= rel_inv,
                "rows={rows} d={d} row {r}: inv {} vs model {} ({e:e} > {rel_inv:e})",
                inv[r],
                invm[r]
            );
            // And against the exact f64 value.
            let ss: f64 = x[r * d..][..d].iter().map(|&v| (v as f64) * (v as f64)).sum();
            let exact = 1.0 / (ss / d as f64 + eps as f64).sqrt();
            assert!(((inv[r] as f64) - exact).abs() / exact <= rel_inv, "inv vs f64 loop");
        }
        for i in 0..rows * d {
            let e = ((y[i] as f64) - ym[i] as f64).abs();
            assert!(e <= rel_y * (ym[i] as f64).abs() + 1e-30, "rows={rows} d={d} y[{i}]: {} vs {}", y[i], ym[i]);
        }

        // Backward with the same inv (the model's): dg is the model's bit for bit (same 64-row
        // blocks, same order); dx within the bound of the f32 dot product.
        let dy = random(rows * d, ci as u64 + 100);
        let start = random(d, ci as u64 + 150);
        let mut dgm = start.clone();
        let dxm = layers::rmsnorm_backward(&x, &g, &invm, &dy, d, &mut dgm);
        let (mut dx, mut dg) = (vec![0.0f32; rows * d], start.clone());
        reference::rmsnorm_backward(&x, &g, &invm, &dy, None, &mut dx, &mut dg, true).unwrap();
        assert_eq!(
            dg.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            dgm.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "rows={rows} d={d}: dg"
        );
        for r in 0..rows {
            let iv = invm[r] as f64;
            // dot = sum (dy g) x: the f32 lane sum has error <= (m + 6) u * S (S = sum |terms|,
            // the products dy g rounded: one more u); k = dot / d inv^3 adds 4 roundings of
            // |k|; dx = (dy g) inv - x k then differs by |x| dk + u |x k| + u |dx|.
            let (xr, dr) = (&x[r * d..][..d], &dy[r * d..][..d]);
            let s: f64 = (0..d).map(|c| (dr[c] as f64 * g[c] as f64 * xr[c] as f64).abs()).sum();
            let dot: f64 = (0..d).map(|c| dr[c] as f64 * g[c] as f64 * xr[c] as f64).sum();
            let k = dot / d as f64 * iv * iv * iv;
            let dk = (m + 6.0) * U * s / d as f64 * iv * iv * iv + 6.0 * U * k.abs();
            for c in 0..d {
                let (a, b) = (dx[r * d + c] as f64, dxm[r * d + c] as f64);
                let bound = (xr[c] as f64).abs() * dk + 2.0 * U * ((xr[c] as f64 * k).abs() + b.abs()) + 1e-30;
                assert!((a - b).abs() <= bound, "rows={rows} d={d} dx[{r}, {c}]: {a} vs {b} (bound {bound:e})");
            }
        }
    }
}

#[test]
fn rope_tables_and_rotation_are_the_model_bits() {
    for &(hd, heads, rows) in &[(8usize, 2usize, 5usize), (6, 1, 3), (64, 4, 2)] {
        let max_pos = 33;
        let table = RopeTable::new(hd, max_pos, 10000.0).unwrap();
        let model = layers::Rope::new(hd, max_pos, 10000.0);
        let width = 3 * heads * hd;
        let x = random(rows * width, hd as u64);
        for inverse in [false, true] {
            let pos: Vec<i32> = (0..rows).map(|r| (r * 7 % max_pos) as i32).collect();
            let mut mine = x.clone();
            reference::rope(&mut mine, width, 2 * heads, &table, &pos, inverse).unwrap();
            let mut theirs = x.clone();
            model.apply(&mut theirs, (width, 2 * heads * hd), |r| pos[r] as usize, inverse);
            assert_eq!(
                mine.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                theirs.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "hd={hd} heads={heads} inverse={inverse}"
            );
        }
        // Forward then backward is the identity up to rounding (rotation by -angle).
        let pos = vec![5i32; rows];
        let mut v = x.clone();
        reference::rope(&mut v, width, 2 * heads, &table, &pos, false).unwrap();
        reference::rope(&mut v, width, 2 * heads, &table, &pos, true).unwrap();
        for (a, b) in v.iter().zip(&x) {
            assert!((a - b).abs() <= 8.0 * f32::EPSILON * 4.0, "{a} vs {b}");
        }
    }
}

#[test]
fn embedding_and_gradient_against_plain_loops() {
    let (vocab, dim, tokens) = (37usize, 5usize, 400usize);
    let table = random(vocab * dim, 1);
    let ids: Vec<i32> = (0..tokens).map(|t| if t % 3 == 0 { 36 } else { (t * 11 % vocab) as i32 }).collect();
    let mut out = vec![0.0f32; tokens * dim];
    reference::embedding(&table, vocab, &ids, &mut out).unwrap();
    for (t, &v) in ids.iter().enumerate() {
        assert_eq!(out[t * dim..][..dim], table[v as usize * dim..][..dim]);
    }
    let dout = random(tokens * dim, 2);
    let mut g = vec![1.0f32; vocab * dim];
    reference::embedding_backward(&ids, &dout, &mut g, vocab, false).unwrap();
    for v in 0..vocab {
        for c in 0..dim {
            let exact: f64 = (0..tokens).filter(|&t| ids[t] == v as i32).map(|t| dout[t * dim + c] as f64).sum();
            let n = ids.iter().filter(|&&i| i == v as i32).count() as f64;
            let abs: f64 = (0..tokens).filter(|&t| ids[t] == v as i32).map(|t| dout[t * dim + c].abs() as f64).sum();
            // A sequential f32 sum of n terms: error <= (n - 1) u sum |terms|.
            assert!((g[v * dim + c] as f64 - exact).abs() <= n * U * abs + 1e-30, "v={v} c={c}");
        }
    }
}
