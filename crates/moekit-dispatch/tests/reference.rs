//! Properties of the CPU reference: the layout is a stable bijection, dispatch then
//! unweighted combine returns each token once per routed slot, FP8 tiles stay within the E4M3
//! error bound, UE8M0 scales are powers of two that never saturate.

use moekit_dispatch::{
    combine, dispatch, max_rows, reference, ActFormat, DispatchConfig, Padding, ScaleKind, ScaleLayout, ALIGNMENTS,
};
use moekit_dtype::{bf16, F8E4M3};
use moekit_tensor::{Device, Error, Tensor};
use proptest::prelude::*;

fn ids_strategy() -> impl Strategy<Value = (DispatchConfig, Vec<i32>)> {
    (1usize..40, 1usize..=8, 0usize..50, 0usize..ALIGNMENTS.len(), any::<bool>()).prop_flat_map(
        |(experts, k, tokens, a, skewed)| {
            let cfg = DispatchConfig::new(experts, k).with_align(ALIGNMENTS[a]);
            // Skewed: most pairs on expert 0; -1 marks pairs not routed here.
            let id = if skewed {
                prop_oneof![6 => Just(0i32), 1 => -1i32..experts as i32].boxed()
            } else {
                (-1i32..experts as i32).boxed()
            };
            (Just(cfg), prop::collection::vec(id, tokens * k))
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn layout_is_a_stable_bijection_onto_routed_rows((cfg, ids) in ids_strategy()) {
        let tokens = ids.len() / cfg.top_k;
        let rows = max_rows(tokens, cfg.top_k, cfg.experts, cfg.align);
        let l = reference::layout(&ids, &cfg, rows).unwrap();
        prop_assert!(l.offsets[cfg.experts] as usize <= rows, "the bound holds");
        // Segments: aligned starts, sizes = counts rounded up, counts = ids per expert.
        for e in 0..cfg.experts {
            prop_assert_eq!(l.offsets[e] as usize % cfg.align, 0);
            prop_assert_eq!(l.counts[e] as usize, ids.iter().filter(|&&i| i == e as i32).count());
            prop_assert_eq!((l.offsets[e + 1] - l.offsets[e]) as usize, (l.counts[e] as usize).div_ceil(cfg.align) * cfg.align);
        }
        // Bijection: routed pairs <-> rows with m_indices >= 0, expert preserved, order stable.
        let mut seen = vec![false; rows];
        let mut last_row = vec![-1i32; cfg.experts];
        for (i, (&id, &r)) in ids.iter().zip(&l.row_map).enumerate() {
            if id < 0 {
                prop_assert_eq!(r, -1);
                continue;
            }
            prop_assert!(r >= 0 && !seen[r as usize], "pair {} -> row {}", i, r);
            seen[r as usize] = true;
            prop_assert_eq!(l.m_indices[r as usize], id);
            prop_assert!(r > last_row[id as usize], "stable order inside expert {}", id);
            last_row[id as usize] = r;
        }
        for (r, (&s, &m)) in seen.iter().zip(&l.m_indices).enumerate() {
            prop_assert_eq!(s, m >= 0, "row {} is padding iff unmapped", r);
        }
    }

    #[test]
    fn dispatch_then_unweighted_combine_returns_each_token_per_slot((cfg, ids) in ids_strategy(), seed in any::<u32>()) {
        let tokens = ids.len() / cfg.top_k;
        let hidden = 16;
        let x: Vec<bf16> = (0..tokens * hidden)
            .map(|i| bf16::from_f32((((i as u32).wrapping_mul(2654435761) ^ seed) >> 20) as f32 / 64.0 - 32.0))
            .collect();
        let xt = Tensor::from_slice(&x, &[tokens, hidden], &Device::Cpu).unwrap();
        let it = Tensor::from_slice(&ids, &[tokens, cfg.top_k], &Device::Cpu).unwrap();
        let (layout, p) = dispatch(&xt, &it, &cfg.with_padding(Padding::Zero), ActFormat::Bf16).unwrap();
        // Identity experts: y = the permuted rows.
        let back = combine(&p.data, &layout, None).unwrap().to_vec::<bf16>().unwrap();
        for t in 0..tokens {
            let n = ids[t * cfg.top_k..(t + 1) * cfg.top_k].iter().filter(|&&i| i >= 0).count() as f32;
            for h in 0..hidden {
                prop_assert_eq!(back[t * hidden + h], bf16::from_f32(n * x[t * hidden + h].to_f32()));
            }
        }
        // Padding rows inside the segments are zero (rows at and past offsets[E] are not written).
        let data = p.data.to_vec::<bf16>().unwrap();
        let m = layout.m_indices.to_vec::<i32>().unwrap();
        let used = layout.rows_used().unwrap();
        prop_assert!(used <= m.len(), "max_rows is a bound: {} rows used of {}", used, m.len());
        for r in (0..used).filter(|&r| m[r] < 0) {
            prop_assert!(data[r * hidden..(r + 1) * hidden].iter().all(|v| v.to_bits() == 0));
        }
    }

    #[test]
    fn fp8_tiles_within_the_e4m3_bound(
        vals in prop::collection::vec(prop_oneof![-1000.0f32..1000.0, -1e-3f32..1e-3, Just(0.0f32)], 256 * 3),
        ue8m0 in any::<bool>(),
    ) {
        let x: Vec<bf16> = vals.iter().map(|&v| bf16::from_f32(v)).collect();
        let kind = if ue8m0 { ScaleKind::Ue8m0 } else { ScaleKind::F32 };
        let format = ActFormat::Fp8(kind, ScaleLayout::RowMajor);
        let mut q = vec![0u8; x.len()];
        let mut s = vec![0f32; x.len() / 128];
        reference::quantize(&x, 256, format, &mut q, &mut s).unwrap();
        for (g, tile) in x.chunks(128).enumerate() {
            let scale = s[g];
            let amax = tile.iter().fold(0.0f32, |m, v| m.max(v.to_f32().abs()));
            if ue8m0 {
                prop_assert_eq!(scale.to_bits() & 0x7f_ffff, 0, "power of two");
                prop_assert!(amax / scale <= 448.0, "never saturates: {} / {}", amax, scale);
            }
            for (i, v) in tile.iter().enumerate() {
                let back = F8E4M3::from_bits(q[g * 128 + i]).to_f32() * scale;
                let x = v.to_f32();
                // E4M3: 3 mantissa bits (relative error <= 2^-4), subnormal step 2^-9 (absolute
                // error <= 2^-10 in units of the scale).
                let bound = (x.abs() * 2f32.powi(-4)).max(scale * 2f32.powi(-10)) * (1.0 + 1e-6);
                prop_assert!((back - x).abs() <= bound, "{} -> {} (scale {})", x, back, scale);
            }
        }
    }
}

#[test]
fn row_bound_counts_only_experts_that_can_have_pairs() {
    // T k + min(E, T k) (align - 1): a decode token at E = 256, align 128 needs 8 + 8 x 127 rows.
    assert_eq!(max_rows(1, 8, 256, 128), 8 + 8 * 127);
    assert_eq!(max_rows(4096, 8, 256, 128), 4096 * 8 + 256 * 127);
    assert_eq!(max_rows(0, 8, 256, 128), 0, "T = 0: no rows, no padding");
    assert_eq!(max_rows(5, 2, 4, 1), 10, "align 1: no padding");
    // Attained: every pair on its own expert.
    let cfg = DispatchConfig::new(256, 8);
    let ids: Vec<i32> = (0..8).collect();
    let l = reference::layout(&ids, &cfg, max_rows(1, 8, 256, 128)).unwrap();
    assert_eq!(l.offsets[256] as usize, max_rows(1, 8, 256, 128));
    // T = 0 through the tensor op: empty outputs, nothing written.
    let x = Tensor::from_slice::<bf16>(&[], &[0, 128], &Device::Cpu).unwrap();
    let ids = Tensor::from_slice::<i32>(&[], &[0, 8], &Device::Cpu).unwrap();
    let (l, p) = dispatch(&x, &ids, &cfg.with_padding(Padding::Zero), ActFormat::FP8).unwrap();
    assert_eq!((l.max_rows(), p.data.dims()), (0, &[0usize, 128][..]));
    l.check().unwrap();
}

#[test]
fn edge_cases() {
    // T = 0, T = 1, experts without tokens, all tokens on one expert, k = 1 and 8, E = 256.
    for (tokens, k, experts, all_on_one) in
        [(0, 8, 256, false), (1, 1, 4, false), (1, 8, 256, false), (64, 8, 256, true), (33, 1, 7, true)]
    {
        let cfg = DispatchConfig::new(experts, k);
        let ids: Vec<i32> = (0..tokens * k).map(|i| if all_on_one { 3 } else { ((i * 37) % experts) as i32 }).collect();
        let rows = max_rows(tokens, k, experts, 128);
        let l = reference::layout(&ids, &cfg, rows).unwrap();
        assert_eq!(l.counts.iter().sum::<i32>() as usize, tokens * k);
        assert_eq!(l.m_indices.iter().filter(|&&m| m >= 0).count(), tokens * k);
        if all_on_one {
            assert_eq!(l.counts[3] as usize, tokens * k);
            assert_eq!(l.offsets[4] as usize, (tokens * k).div_ceil(128) * 128);
        }
    }
}

#[test]
fn dropped_rows_past_the_bound_and_typed_errors() {
    let cfg = DispatchConfig::new(2, 1).with_align(16);
    let l = reference::layout(&[0, 0, 1], &cfg, 17).unwrap();
    assert_eq!(l.row_map, vec![0, 1, 16], "expert 1 starts at row 16");
    let l = reference::layout(&[0, 0, 1], &cfg, 16).unwrap();
    assert_eq!(l.row_map, vec![0, 1, -1], "expert 1's row 16 is dropped");
    assert_eq!(l.offsets[2], 32, "offsets still say what was needed");
    assert!(matches!(DispatchConfig::new(4, 2).with_align(8).validate(), Err(Error::Alignment { .. })));
    assert!(matches!(DispatchConfig::new(0, 2).validate(), Err(Error::InvalidArgument(_))));
    assert!(matches!(DispatchConfig::new(4, 17).validate(), Err(Error::InvalidArgument(_))));
    let x = Tensor::from_slice(&vec![bf16::ONE; 2 * 100], &[2, 100], &Device::Cpu).unwrap();
    let ids = Tensor::from_slice(&[0i32, 1], &[2, 1], &Device::Cpu).unwrap();
    let c = DispatchConfig::new(2, 1);
    assert!(matches!(dispatch(&x, &ids, &c, ActFormat::FP8), Err(Error::Alignment { .. })), "H % 128 != 0");
    // An id >= E is skipped and reported by check() (as on a device, which cannot see the ids).
    let bad_ids = Tensor::from_slice(&[0i32, 2], &[2, 1], &Device::Cpu).unwrap();
    let x8 = Tensor::from_slice(&vec![bf16::ONE; 2 * 128], &[2, 128], &Device::Cpu).unwrap();
    let (l, _) = dispatch(&x8, &bad_ids, &c, ActFormat::Bf16).unwrap();
    assert_eq!(l.row_map.to_vec::<i32>().unwrap(), vec![0, -1]);
    assert!(matches!(l.check(), Err(Error::InvalidArgument(_))), "id >= E");
    let wrong_k = Tensor::from_slice(&[0i32, 1], &[1, 2], &Device::Cpu).unwrap();
    assert!(matches!(dispatch(&x8, &wrong_k, &c, ActFormat::Bf16), Err(Error::Shape(_))));
}

#[test]
fn swiglu_reference_matches_the_formula() {
    let x: Vec<bf16> = (0..2 * 256).map(|i| bf16::from_f32((i as f32 - 256.0) / 37.0)).collect();
    let mut out = vec![0u8; 128 * 2 * 2];
    let mut none: Vec<f32> = vec![];
    reference::swiglu(&x, 128, ActFormat::Bf16, &mut out, &mut none).unwrap();
    for r in 0..2 {
        for c in 0..128 {
            let (g, u) = (x[r * 256 + c].to_f32() as f64, x[r * 256 + 128 + c].to_f64());
            let want = g / (1.0 + (-g).exp()) * u;
            let got =
                bf16::from_bits(u16::from_le_bytes([out[(r * 128 + c) * 2], out[(r * 128 + c) * 2 + 1]])).to_f64();
            assert!((got - want).abs() <= want.abs() * 2f64.powi(-8) + 1e-30, "{got} vs {want}");
        }
    }
    // Backward against central differences of the f64 formula.
    let dh: Vec<bf16> = (0..256).map(|i| bf16::from_f32(((i * 7) % 13) as f32 / 13.0 - 0.5)).collect();
    let gx = reference::swiglu_backward(&x, &dh, 128).unwrap();
    let f = |g: f64, u: f64| g / (1.0 + (-g).exp()) * u;
    for r in 0..2 {
        for c in 0..128 {
            let (g, u, d) = (x[r * 256 + c].to_f64(), x[r * 256 + 128 + c].to_f64(), dh[r * 128 + c].to_f64());
            let h = 1e-6;
            let dg = d * (f(g + h, u) - f(g - h, u)) / (2.0 * h);
            let du = d * (f(g, u + h) - f(g, u - h)) / (2.0 * h);
            for (got, want) in [(gx[r * 256 + c].to_f64(), dg), (gx[r * 256 + 128 + c].to_f64(), du)] {
                assert!((got - want).abs() <= want.abs() * 2f64.powi(-7) + 1e-6, "{got} vs {want}");
            }
        }
    }
}
