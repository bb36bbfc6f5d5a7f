//! Grouped GEMM on the `gg-*` shapes of `shared/reference/performance.md`, with the kernel the
//! dispatcher picks for the GPU (CUDA events; TFLOPS and fraction of the ceiling: BF16 against
//! the measured 790 TFLOPS, FP8 against the 1979 TFLOPS datasheet rate). Each shape is checked
//! for correctness first: sampled output rows against the CPU reference on the same inputs
//! (`diff < 1e-5`). CPU: the reference on a small shape. Also the device FP8 quantization of
//! weights (`quantize_weights`, GB/s of minimum bytes).

use criterion::{criterion_main, Criterion};
use moekit_benches::{
    criterion, median_gpu_us, report_bandwidth, report_tflops, time_gpu, BF16_FLOPS_PER_S, FP8_FLOPS_PER_S,
};
use moekit_cuda::{testing::skip_notice, DeviceBuffer, Gpu, Stream};
use moekit_dtype::{bf16, F8E4M3};
use moekit_gemm::raw::{self, Operand};
use moekit_gemm::{reference, ScaleLayout, Shape};

/// Pseudo-random bytes, fast: E4M3 codes with bit 6 clear (|x| <= 1.875, never NaN).
fn fp8_codes(n: usize, seed: u64) -> Vec<u8> {
    (0..n as u64).map(|i| ((i.wrapping_add(seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) as u8) & 0xBF).collect()
}
fn bf16s(n: usize, seed: u64) -> Vec<bf16> {
    fp8_codes(n, seed).into_iter().map(|c| bf16::from_f32(F8E4M3::from_bits(c).to_f32())).collect()
}
fn scales(n: usize, seed: u64) -> Vec<f32> {
    (0..n as u64).map(|i| 2f32.powi(((i.wrapping_add(seed).wrapping_mul(2654435761) >> 7) % 5) as i32 - 6)).collect()
}

enum Kind {
    Contiguous(Vec<usize>),
    Masked(usize),
    KGrouped(usize),
}

struct Case {
    name: &'static str,
    fp8: bool,
    kind: Kind,
    n: usize,
    k: usize,
}

/// m_indices of a DeepSeek-V3 routing of 4096 synthetic tokens (align 128).
fn v3_group_sizes() -> Vec<usize> {
    let logits: Vec<f32> =
        (0..4096 * 256).map(|i| ((i as u32).wrapping_mul(2246822519) >> 9) as f32 / 4194304.0 - 1.0).collect();
    let r = moekit_gating::reference::route(&logits, None, &moekit_gating::RouterConfig::deepseek_v3()).unwrap();
    r.counts.iter().map(|&c| c as usize).collect()
}

fn cases() -> Vec<Case> {
    use Kind::*;
    vec![
        Case { name: "gg-fp8-contig-a", fp8: true, kind: Contiguous(vec![8192; 4]), n: 4096, k: 7168 },
        Case { name: "gg-fp8-contig-b", fp8: true, kind: Contiguous(vec![8192; 4]), n: 7168, k: 2048 },
        Case { name: "gg-fp8-contig-c", fp8: true, kind: Contiguous(vec![4096; 8]), n: 4096, k: 7168 },
        Case { name: "gg-fp8-masked-a", fp8: true, kind: Masked(1), n: 4096, k: 7168 },
        Case { name: "gg-fp8-masked-b", fp8: true, kind: Masked(4), n: 4096, k: 7168 },
        Case { name: "gg-bf16-contig-a", fp8: false, kind: Contiguous(vec![8192; 4]), n: 4096, k: 7168 },
        Case { name: "gg-bf16-v3-prefill", fp8: false, kind: Contiguous(v3_group_sizes()), n: 4096, k: 7168 },
        Case { name: "gg-fp8-kgrouped", fp8: true, kind: KGrouped(4), n: 7168, k: 4096 },
    ]
}

fn cpu(c: &mut Criterion) {
    let (m, n, k) = (64, 64, 256);
    let a: Vec<f32> = bf16s(m * k, 1).iter().map(|v| v.to_f32()).collect();
    let b: Vec<f32> = bf16s(n * k, 2).iter().map(|v| v.to_f32()).collect();
    let mut g = c.benchmark_group("gg-cpu-64x64x256");
    g.sample_size(10);
    g.bench_function("reference", |bch| bch.iter(|| reference::gemm_nt(&a, &b, m, n, k)));
    g.finish();
}

fn gpu(c: &mut Criterion) {
    let gpu = match Gpu::new(0) {
        Ok(g) => g,
        Err(e) => return skip_notice("grouped GEMM GPU benchmark", &e.to_string()),
    };
    let stream = Stream::new(&gpu).expect("stream");
    for case in cases() {
        let (n, k) = (case.n, case.k);
        let kg = matches!(case.kind, Kind::KGrouped(_));
        // Sizes: m rows of A (contiguous: stacked groups padded to 128; masked: per group;
        // k-grouped: tokens), and the output rows checked against the reference.
        let (groups, m, ids, sample_rows): (usize, usize, Vec<i32>, Vec<usize>) = match &case.kind {
            Kind::Contiguous(sizes) => {
                let mut ids = vec![];
                let mut firsts = vec![];
                for (g, &s) in sizes.iter().enumerate() {
                    firsts.push(ids.len());
                    ids.extend(std::iter::repeat_n(g as i32, s));
                    ids.extend(std::iter::repeat_n(-1, s.div_ceil(128) * 128 - s));
                }
                let m = ids.len();
                (sizes.len(), m, ids, firsts.into_iter().filter(|&r| r < m).take(4).collect())
            }
            Kind::Masked(g) => (*g, if *g == 1 { 1024 } else { 256 }, vec![], vec![0, 1]),
            Kind::KGrouped(g) => (*g, 4096 * g, vec![], vec![0, 1]),
        };
        let shape = Shape { groups, m, n, k };
        // A [a_rows, a_red]; B [b_rows, b_red], for weights `groups` copies of one group's block
        // (the device time does not depend on the values; host generation stays fast even for
        // the 15 GB of gg-bf16-v3-prefill's weights).
        let (a_rows, a_red) = if kg {
            (n, m)
        } else if matches!(case.kind, Kind::Masked(_)) {
            (groups * m, k)
        } else {
            (m, k)
        };
        let (b_rows, b_red, b_copies) = if kg { (k, m, 1) } else { (n, k, groups) };
        let ha = fp8_codes(a_rows * a_red, 3);
        let hb = fp8_codes(b_rows * b_red, 4); // one copy
        let a_sc = a_rows * (a_red / 128);
        let b_sc = if kg { k * (m / 128) } else { groups * (n / 128) * (k / 128) };
        let (hsa, hsb) = (scales(a_sc, 5), scales(b_sc, 6));
        let tile = |v: Vec<u8>| -> Vec<u8> {
            if b_copies == 1 {
                v
            } else {
                v.repeat(b_copies)
            }
        };
        let to_bf16 =
            |v: &[u8]| -> Vec<bf16> { v.iter().map(|&q| bf16::from_f32(F8E4M3::from_bits(q).to_f32())).collect() };
        let (da, db, da16, db16) = if case.fp8 {
            (
                Some(DeviceBuffer::from_host(&gpu, &ha).unwrap()),
                Some(DeviceBuffer::from_host(&gpu, &tile(hb.clone())).unwrap()),
                None,
                None,
            )
        } else {
            let b16 = to_bf16(&hb);
            let b16 = if b_copies == 1 { b16 } else { b16.repeat(b_copies) };
            (
                None,
                None,
                Some(DeviceBuffer::from_host(&gpu, &to_bf16(&ha)).unwrap()),
                Some(DeviceBuffer::from_host(&gpu, &b16).unwrap()),
            )
        };
        let dsa = DeviceBuffer::from_host(&gpu, &hsa).unwrap();
        let dsb = DeviceBuffer::from_host(&gpu, &hsb).unwrap();
        let dids = DeviceBuffer::from_host(&gpu, &if ids.is_empty() { vec![0] } else { ids.clone() }).unwrap();
        let offs: Vec<i32> = (0..=groups).map(|g| (g * 4096) as i32).collect();
        let doffs = DeviceBuffer::from_host(&gpu, &offs).unwrap();
        let out_elems = if kg { groups * n * k } else { a_rows * n };
        let mut d16 = DeviceBuffer::<bf16>::zeros(&gpu, if kg { 1 } else { out_elems }).unwrap();
        let mut d32 = DeviceBuffer::<f32>::zeros(&gpu, if kg { out_elems } else { 1 }).unwrap();
        let run = |d16: &mut DeviceBuffer<bf16>, d32: &mut DeviceBuffer<f32>| -> moekit_cuda::Result<()> {
            let (a, b) = if case.fp8 {
                (
                    Operand::Fp8 { data: da.as_ref().unwrap().view(), scales: dsa.view() },
                    Operand::Fp8 { data: db.as_ref().unwrap().view(), scales: dsb.view() },
                )
            } else {
                (Operand::Bf16(da16.as_ref().unwrap().view()), Operand::Bf16(db16.as_ref().unwrap().view()))
            };
            match &case.kind {
                Kind::Contiguous(_) => {
                    raw::m_grouped_contiguous(&stream, shape, a, ScaleLayout::RowMajor, b, dids.view(), d16.view_mut())
                }
                Kind::Masked(_) => {
                    raw::m_grouped_masked(&stream, shape, a, ScaleLayout::RowMajor, b, None, d16.view_mut())
                }
                Kind::KGrouped(_) => raw::k_grouped(&stream, shape, a, b, doffs.view(), false, d32.view_mut()),
            }
        };
        // Reference rows: A row r and B row j (of the one weight block) dequantized.
        let a_row = |r: usize| -> Vec<f64> {
            (0..a_red)
                .map(|l| {
                    let s = if case.fp8 { hsa[r * (a_red / 128) + l / 128] as f64 } else { 1.0 };
                    F8E4M3::from_bits(ha[r * a_red + l]).to_f32() as f64 * s
                })
                .collect()
        };
        let b_row = |g: usize, j: usize| -> Vec<f64> {
            (0..b_red)
                .map(|l| {
                    let s = if !case.fp8 {
                        1.0
                    } else if kg {
                        hsb[j * (m / 128) + l / 128] as f64
                    } else {
                        hsb[(g * (n / 128) + j / 128) * (k / 128) + l / 128] as f64
                    };
                    F8E4M3::from_bits(hb[j * b_red + l]).to_f32() as f64 * s
                })
                .collect()
        };
        // Every kernel the dispatcher can pick for this GPU (Hopper: also the sm90 kernel).
        let kernels: Vec<raw::Kernel> = if gpu.compute_capability() == (9, 0) {
            vec![raw::Kernel::Portable, raw::Kernel::Sm90]
        } else {
            vec![raw::Kernel::Portable]
        };
        for kernel in kernels {
            raw::set_kernel_override(Some(kernel));
            // Correctness first: sampled rows (k-grouped: rows of group 0) against the reference.
            run(&mut d16, &mut d32).unwrap();
            let (mut got, mut want) = (vec![], vec![]);
            for &r in &sample_rows {
                let g = if let Kind::Contiguous(_) = case.kind { ids[r] as usize } else { 0 };
                let av = a_row(r);
                let red = if kg { 0..4096 } else { 0..a_red };
                for j in 0..if kg { k } else { n } {
                    let bv = b_row(g, j);
                    want.push(red.clone().map(|l| av[l] * bv[l]).sum::<f64>() as f32);
                }
                if kg {
                    let mut row = vec![0f32; k];
                    d32.copy_range_to_host(&stream, r * k, &mut row).unwrap();
                    got.extend(row);
                } else {
                    let mut row = vec![bf16::ZERO; n];
                    d16.copy_range_to_host(&stream, r * n, &mut row).unwrap();
                    got.extend(row.iter().map(|v| v.to_f32()));
                }
            }
            let d = reference::diff(&got, &want);
            assert!(d < 1e-5, "{} ({kernel:?}): sampled rows differ from the reference (diff {d:e})", case.name);

            let rows_used: usize = match &case.kind {
                Kind::Contiguous(s) => s.iter().sum(),
                Kind::Masked(_) => groups * m,
                Kind::KGrouped(_) => m,
            };
            let flops = 2.0 * rows_used as f64 * n as f64 * k as f64;
            let mut launch = |_: u64| run(&mut d16, &mut d32);
            let mut g = c.benchmark_group(format!("{}-{kernel:?}", case.name));
            g.sample_size(10);
            g.bench_function("gpu", |b| b.iter_custom(|iters| time_gpu(&stream, iters, &mut launch).unwrap()));
            g.finish();
            let us = median_gpu_us(&stream, 2, 10, &mut launch).unwrap();
            let ceiling = if case.fp8 { FP8_FLOPS_PER_S } else { BF16_FLOPS_PER_S };
            report_tflops(case.name, &format!("G={groups} M={m} N={n} K={k} ({kernel:?})"), us, flops, ceiling);
        }
        raw::set_kernel_override(None);
    }
    quantize(c, &gpu, &stream);
}

/// FP8 block quantization of weights on the device (`quantize_weights`), with the transpose:
/// 4 experts of DeepSeek-V3's gate/up weights `[4, 4096, 7168]` f32. Minimum bytes: 4 read and
/// 2 written per weight. The first 128 rows are checked against the reference first.
fn quantize(c: &mut Criterion, gpu: &Gpu, stream: &Stream) {
    let (g, n, k) = (4usize, 4096usize, 7168usize);
    let hw: Vec<f32> = (0..g * n * k).map(|i| ((i as u64 * 2654435761) % 2001) as f32 / 1000.0 - 1.0).collect();
    let w = DeviceBuffer::from_host(gpu, &hw).unwrap();
    let mut codes = DeviceBuffer::<F8E4M3>::zeros(gpu, g * n * k).unwrap();
    let mut sc = DeviceBuffer::<f32>::zeros(gpu, g * (n / 128) * (k / 128)).unwrap();
    let mut codes_t = DeviceBuffer::<F8E4M3>::zeros(gpu, g * n * k).unwrap();
    let mut sc_t = DeviceBuffer::<f32>::zeros(gpu, g * (n / 128) * (k / 128)).unwrap();
    let mut quant = |codes: &mut DeviceBuffer<F8E4M3>| {
        moekit_gemm::raw_quantize(
            stream,
            (g, n, k),
            w.view(),
            codes.view_mut(),
            sc.view_mut(),
            Some(codes_t.view_mut()),
            Some(sc_t.view_mut()),
        )
    };
    quant(&mut codes).unwrap();
    let (want, _) = reference::quantize_blocks(&hw[..128 * k], 1, 128, k);
    let mut got = vec![F8E4M3::from_bits(0); 128 * k];
    codes.copy_range_to_host(stream, 0, &mut got).unwrap();
    assert!(got.iter().map(|c| c.to_bits()).eq(want), "quantize_weights: first 128 rows differ from the reference");
    let mut run = |_: u64| quant(&mut codes);
    let mut grp = c.benchmark_group("quantize-weights-fp8");
    grp.sample_size(10);
    grp.bench_function("gpu", |b| b.iter_custom(|iters| time_gpu(stream, iters, &mut run).unwrap()));
    grp.finish();
    let us = median_gpu_us(stream, 2, 10, &mut run).unwrap();
    report_bandwidth("quantize-weights-fp8", &format!("[{g}, {n}, {k}] f32 + transpose"), us, (6 * g * n * k) as f64);
}

fn benches() {
    let mut c = criterion();
    cpu(&mut c);
    gpu(&mut c);
}

criterion_main!(benches);
