//! Properties of the CPU reference.

use moekit_gemm::reference;
use proptest::prelude::*;

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Grouped = per-group GEMM; padding rows are never read and keep their content.
    #[test]
    fn contiguous_is_per_group_gemm(groups in 1usize..4, sizes in prop::collection::vec(0usize..9, 1..6), seed in any::<u64>()) {
        let (n, k) = (5, 7);
        let m_indices: Vec<i32> = sizes.iter().enumerate().flat_map(|(i, &s)| {
            let g = if i % 3 == 2 { -1 } else { (i % groups) as i32 };
            std::iter::repeat_n(g, s)
        }).collect();
        let m = m_indices.len();
        let a = values(m * k, seed);
        let b = values(groups * n * k, seed ^ 1);
        let mut d = vec![42.0f32; m * n];
        reference::m_grouped_contiguous(&a, &b, &m_indices, groups, n, k, &mut d).unwrap();
        // Poison the padding rows of A: nothing may change.
        let mut a2 = a.clone();
        for (r, &g) in m_indices.iter().enumerate() {
            if g < 0 { a2[r * k..(r + 1) * k].fill(f32::NAN); }
        }
        let mut d2 = vec![42.0f32; m * n];
        reference::m_grouped_contiguous(&a2, &b, &m_indices, groups, n, k, &mut d2).unwrap();
        prop_assert_eq!(&d, &d2);
        for (r, &g) in m_indices.iter().enumerate() {
            if g < 0 {
                prop_assert!(d[r * n..(r + 1) * n].iter().all(|&x| x == 42.0));
            } else {
                let g = g as usize;
                let want = reference::gemm_nt(&a[r * k..(r + 1) * k], &b[g * n * k..(g + 1) * n * k], 1, n, k);
                prop_assert_eq!(&d[r * n..(r + 1) * n], &want[..]);
            }
        }
    }

    #[test]
    fn masked_leaves_rows_past_the_mask(masked in prop::collection::vec(-2i32..9, 1..4), seed in any::<u64>()) {
        let (m_max, n, k) = (6, 3, 4);
        let g = masked.len();
        let a = values(g * m_max * k, seed);
        let b = values(g * n * k, seed ^ 2);
        let mut d = vec![-7.0f32; g * m_max * n];
        reference::m_grouped_masked(&a, &b, &masked, m_max, n, k, &mut d).unwrap();
        for gi in 0..g {
            let valid = masked[gi].clamp(0, m_max as i32) as usize;
            for r in 0..m_max {
                let row = &d[(gi * m_max + r) * n..(gi * m_max + r + 1) * n];
                if r >= valid {
                    prop_assert!(row.iter().all(|&x| x == -7.0));
                } else {
                    let want = reference::gemm_nt(&a[(gi * m_max + r) * k..(gi * m_max + r + 1) * k], &b[gi * n * k..(gi + 1) * n * k], 1, n, k);
                    prop_assert_eq!(row, &want[..]);
                }
            }
        }
    }

    /// Summing the k-grouped results over groups that tile the tokens gives dY^T X.
    #[test]
    fn k_grouped_sums_to_the_full_product(cuts in prop::collection::vec(0usize..12, 1..5), seed in any::<u64>()) {
        let (n, k) = (3, 5);
        let mut offsets = vec![0i32];
        for c in &cuts { offsets.push(offsets.last().unwrap() + *c as i32); }
        let m = *offsets.last().unwrap() as usize;
        let groups = cuts.len();
        let dy = values(m * n, seed);
        let x = values(m * k, seed ^ 3);
        let mut dw = vec![0.0f32; groups * n * k];
        reference::k_grouped(&dy, &x, &offsets, n, k, false, &mut dw).unwrap();
        for i in 0..n {
            for j in 0..k {
                let full: f64 = (0..m).map(|t| dy[t * n + i] as f64 * x[t * k + j] as f64).sum();
                let sum: f64 = (0..groups).map(|g| dw[g * n * k + i * k + j] as f64).sum();
                prop_assert!((full - sum).abs() <= 1e-5 * (1.0 + full.abs()));
            }
        }
        // Accumulating twice doubles.
        let mut acc = dw.clone();
        reference::k_grouped(&dy, &x, &offsets, n, k, true, &mut acc).unwrap();
        for (a, d) in acc.iter().zip(&dw) { prop_assert!((a - 2.0 * d).abs() <= 1e-6 * (1.0 + d.abs())); }
    }
}

#[test]
fn dgrad_is_the_transpose_product() {
    let (m, n, k, groups) = (4, 3, 5, 2);
    let dy = values(m * n, 1);
    let w = values(groups * n * k, 2);
    let ids = [1, -1, 0, 1];
    let mut dx = vec![9.0f32; m * k];
    reference::dgrad(&dy, &w, &ids, groups, n, k, &mut dx).unwrap();
    for (r, &g) in ids.iter().enumerate() {
        for j in 0..k {
            if g < 0 {
                assert_eq!(dx[r * k + j], 9.0);
                continue;
            }
            let want: f64 = (0..n).map(|i| dy[r * n + i] as f64 * w[g as usize * n * k + i * k + j] as f64).sum();
            assert!((dx[r * k + j] as f64 - want).abs() < 1e-6);
        }
    }
}

#[test]
fn block_quantization_round_trip_and_diff() {
    let (g, n, k) = (2, 256, 128);
    let w = values(g * n * k, 5);
    let (codes, scales) = reference::quantize_blocks(&w, g, n, k);
    assert_eq!(scales.len(), g * 2);
    let back = reference::dequantize_blocks(&codes, &scales, g, n, k).unwrap();
    for (x, y) in w.iter().zip(&back) {
        assert!((x - y).abs() <= x.abs() * 0.0625 + scales[0] * 2f32.powi(-9) * 2.0, "{x} vs {y}");
    }
    let d = reference::diff(&w, &back);
    assert!(d > 0.0 && d < 1e-3, "diff {d}");
    assert_eq!(reference::diff(&w, &w), 0.0);
}
