//! Dispatch (layout + permute, BF16 or FP8 with fused 1x128 quantization) and combine: the
//! CPU reference on a small shape, and the kernels (CUDA events) when a GPU is present, on the
//! shapes of `shared/reference/performance.md`: `dispatch-fp8-v3`, `dispatch-bf16-v3`,
//! `combine-v3` (T = 4096, H = 7168, k = 8, E = 256, alignment 128, ids from a DeepSeek-V3
//! routing of synthetic logits).
//!
//! Bytes counted are the bytes the kernels move: dispatch reads x once and writes every
//! used row (routed rows and zeroed padding rows; FP8 adds 4 bytes of scale per 128 values);
//! combine reads k rows per token and writes one.

use criterion::{criterion_main, Criterion, Throughput};
use moekit_benches::{criterion, median_gpu_us, report_bandwidth, time_gpu};
use moekit_cuda::{testing::skip_notice, DeviceBuffer, Gpu, Stream};
use moekit_dispatch::raw::{self, ActOut, LayoutOut};
use moekit_dispatch::{max_rows, reference, ActFormat, DispatchConfig, Padding};
use moekit_dtype::bf16;
use moekit_gating::RouterConfig;

fn input(n: usize, seed: u32) -> Vec<bf16> {
    (0..n)
        .map(|i| bf16::from_f32(((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / 65536.0 - 128.0))
        .collect()
}

/// Top-8 ids of a DeepSeek-V3 routing of `tokens` synthetic tokens.
fn v3_ids(tokens: usize) -> Vec<i32> {
    let logits: Vec<f32> =
        (0..tokens * 256).map(|i| ((i as u32).wrapping_mul(2246822519) >> 9) as f32 / 4194304.0 - 1.0).collect();
    moekit_gating::reference::route(&logits, None, &RouterConfig::deepseek_v3()).unwrap().ids
}

fn cpu(c: &mut Criterion) {
    let (t, h) = (256usize, 7168usize);
    let cfg = DispatchConfig::new(256, 8).with_align(16);
    let ids = v3_ids(t);
    let x = input(t * h, 1);
    let rows = max_rows(t, 8, 256, 16);
    let mut g = c.benchmark_group("dispatch-fp8-cpu-256-align16");
    g.sample_size(10);
    g.bench_function("reference", |b| {
        b.iter(|| {
            let l = reference::layout(&ids, &cfg, rows).unwrap();
            let mut out = vec![0u8; rows * h];
            let mut s = vec![0f32; rows * h / 128];
            reference::permute(&x, h, &l, 8, ActFormat::FP8, Padding::Zero, &mut out, &mut s).unwrap();
        })
    });
    g.finish();
}

fn gpu(c: &mut Criterion) {
    let gpu = match Gpu::new(0) {
        Ok(g) => g,
        Err(e) => return skip_notice("dispatch GPU benchmark", &e.to_string()),
    };
    let stream = Stream::new(&gpu).expect("stream");
    let (t, h, k, e) = (4096usize, 7168usize, 8usize, 256usize);
    let cfg = DispatchConfig::new(e, k);
    let ids_host = v3_ids(t);
    let rows = max_rows(t, k, e, 128);
    let used = reference::layout(&ids_host, &cfg, rows).unwrap().offsets[e] as usize;
    let ids = DeviceBuffer::from_host(&gpu, &ids_host).unwrap();
    let xs = [
        DeviceBuffer::from_host(&gpu, &input(t * h, 1)).unwrap(),
        DeviceBuffer::from_host(&gpu, &input(t * h, 2)).unwrap(),
    ];
    let mut scratch = DeviceBuffer::<i32>::zeros(&gpu, raw::layout_scratch_len(t * k, e)).unwrap();
    let mut offsets = DeviceBuffer::<i32>::zeros(&gpu, e + 1).unwrap();
    let mut counts = DeviceBuffer::<i32>::zeros(&gpu, e).unwrap();
    let mut row_map = DeviceBuffer::<i32>::zeros(&gpu, t * k).unwrap();
    let mut m_indices = DeviceBuffer::<i32>::zeros(&gpu, rows).unwrap();
    let mut status = DeviceBuffer::<i32>::zeros(&gpu, 2).unwrap();
    let mut out = DeviceBuffer::<u8>::zeros(&gpu, rows * h * 2).unwrap();
    let mut scales = DeviceBuffer::<f32>::zeros(&gpu, rows * h / 128).unwrap();

    for (name, format) in [("dispatch-fp8-v3", ActFormat::FP8), ("dispatch-bf16-v3", ActFormat::Bf16)] {
        let out_bytes = rows * h * format.elem_bytes();
        let mut launch = |i: u64| {
            let lo = LayoutOut {
                offsets: offsets.view_mut(),
                counts: counts.view_mut(),
                row_map: row_map.view_mut(),
                m_indices: m_indices.view_mut(),
                status: status.view_mut(),
            };
            raw::layout(&stream, &cfg, ids.view(), scratch.view_mut(), lo)?;
            let act = ActOut {
                data: out.slice_mut(0, out_bytes)?,
                scales: (format != ActFormat::Bf16).then(|| scales.view_mut()),
                format,
            };
            raw::permute(
                &stream,
                &cfg,
                xs[i as usize % 2].view(),
                h,
                row_map.view(),
                offsets.view(),
                counts.view(),
                rows,
                act,
            )
        };
        let bytes = (t * h * 2) as f64
            + (used * h * format.elem_bytes()) as f64
            + if format == ActFormat::Bf16 { 0.0 } else { (used * h / 128 * 4) as f64 };
        let mut g = c.benchmark_group(name);
        g.throughput(Throughput::Bytes(bytes as u64));
        g.bench_function("gpu", |b| b.iter_custom(|iters| time_gpu(&stream, iters, &mut launch).unwrap()));
        g.finish();
        let us = median_gpu_us(&stream, 5, 50, &mut launch).unwrap();
        report_bandwidth(name, &format!("T={t} H={h} k={k} E={e} align 128, {used} rows"), us, bytes);
    }

    let ys = [
        DeviceBuffer::from_host(&gpu, &input(rows * h, 3)).unwrap(),
        DeviceBuffer::from_host(&gpu, &input(rows * h, 4)).unwrap(),
    ];
    let w = DeviceBuffer::from_host(&gpu, &vec![0.125f32; t * k]).unwrap();
    let mut combined = DeviceBuffer::<bf16>::zeros(&gpu, t * h).unwrap();
    let mut launch = |i: u64| {
        raw::combine(&stream, ys[i as usize % 2].view(), h, row_map.view(), k, Some(w.view()), combined.view_mut())
    };
    let bytes = (t * k * h * 2 + t * h * 2) as f64;
    let mut g = c.benchmark_group("combine-v3");
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function("gpu", |b| b.iter_custom(|iters| time_gpu(&stream, iters, &mut launch).unwrap()));
    g.finish();
    let us = median_gpu_us(&stream, 5, 50, &mut launch).unwrap();
    report_bandwidth("combine-v3", &format!("T={t} H={h} k={k} bf16 in/out"), us, bytes);
}

fn benches() {
    let mut c = criterion();
    cpu(&mut c);
    gpu(&mut c);
}

criterion_main!(benches);
