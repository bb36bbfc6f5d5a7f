//! Dispatch (layout + permute, BF16 or FP8 with fused 1x128 quantization) and combine: the
//! CPU reference on a small shape, and the kernels (CUDA events) when a GPU is present, on the
//! shapes of `shared/reference/performance.md`: `dispatch-fp8-v3`, `dispatch-bf16-v3`,
//! `combine-v3` (T = 4096, H = 7168, k = 8, E = 256, alignment 128, ids from a DeepSeek-V3
//! routing of synthetic logits).
//!
//! GB/s are of the *minimum* bytes the op must move, not of what the kernels happen to move
//! (padding rows, re-reads of the row map, the layout's scratch are not useful work):
//! - dispatch: read x once per token that has a routed pair (the minimum: one read serves all
//!   of a token's k copies; reading it per pair would be k times as much), read the ids, write
//!   each routed pair's row (BF16, or FP8 plus one f32 scale per 128 values) and its entry of
//!   the row map;
//! - combine: read each routed pair's row of y and its row map entry and weight, write one row
//!   per token.
//!
//! The byte accounting of both shapes (minimum and moved, per padding policy) is printed
//! without a GPU too (`MOEKIT-BYTES` lines).

use criterion::{criterion_main, Criterion, Throughput};
use moekit_benches::{criterion, median_gpu_us, report_bandwidth, time_gpu, HBM_BYTES_PER_S};
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

/// Bytes of one dispatch of `ids` (layout `l` with `rows` output rows) in `format`: the minimum
/// (see the module docs) and what the kernels move (layout: ids twice, chunk counts, row map,
/// m_indices; permute: x once per token, the row map, the routed rows, the padding rows when
/// zeroed).
fn dispatch_bytes(ids: &[i32], l: &reference::Layout, k: usize, h: usize, format: ActFormat, zero: bool) -> (f64, f64) {
    let tokens = ids.len() / k;
    let routed_tokens = ids.chunks(k).filter(|t| t.iter().any(|&i| i >= 0)).count();
    let pairs = ids.iter().filter(|&&i| i >= 0).count();
    let row = (h * format.elem_bytes() + if format == ActFormat::Bf16 { 0 } else { h / 128 * 4 }) as f64;
    let used = l.offsets[l.counts.len()] as usize;
    let minimum = (routed_tokens * h * 2) as f64 + (8 * tokens * k) as f64 + pairs as f64 * row;
    let padding = if zero { (used - pairs) as f64 * row } else { 0.0 };
    let layout = (3 * 4 * tokens * k + 4 * l.m_indices.len()) as f64;
    (minimum, minimum + padding + layout + (tokens * k * 4) as f64 + ((tokens - routed_tokens) * h * 2) as f64)
}

/// Minimum bytes of a combine of `pairs` routed pairs into `tokens` rows of `h` BF16 values.
fn combine_bytes(tokens: usize, k: usize, pairs: usize, h: usize) -> f64 {
    (pairs * h * 2 + tokens * k * 8 + tokens * h * 2) as f64
}

/// Prints the byte accounting of the v3 shapes (no GPU needed).
fn report_bytes() {
    let (t, h, k, e) = (4096usize, 7168usize, 8usize, 256usize);
    let ids = v3_ids(t);
    let rows = max_rows(t, k, e, 128);
    let l = reference::layout(&ids, &DispatchConfig::new(e, k), rows).unwrap();
    let used = l.offsets[e] as usize;
    let pairs = ids.iter().filter(|&&i| i >= 0).count();
    let mb = |b: f64| b / 1e6;
    for (name, format) in [("dispatch-fp8-v3", ActFormat::FP8), ("dispatch-bf16-v3", ActFormat::Bf16)] {
        let (min, skip) = dispatch_bytes(&ids, &l, k, h, format, false);
        let (_, zero) = dispatch_bytes(&ids, &l, k, h, format, true);
        println!(
            "MOEKIT-BYTES | {name} | {pairs} pairs, {used} rows used of {rows} (bound) | minimum {:.1} MB | moved \
             {:.1} MB (Padding::Skip, the default), {:.1} MB (Padding::Zero) | floor {:.1} us at {:.1} TB/s |",
            mb(min),
            mb(skip),
            mb(zero),
            min / HBM_BYTES_PER_S * 1e6,
            HBM_BYTES_PER_S / 1e12
        );
    }
    let min = combine_bytes(t, k, pairs, h);
    println!(
        "MOEKIT-BYTES | combine-v3 | {pairs} pairs | minimum {:.1} MB | moved {:.1} MB | floor {:.1} us at {:.1} TB/s |",
        mb(min),
        mb(min),
        min / HBM_BYTES_PER_S * 1e6,
        HBM_BYTES_PER_S / 1e12
    );
}

fn cpu(c: &mut Criterion) {
    report_bytes();
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
    let host_layout = reference::layout(&ids_host, &cfg, rows).unwrap();
    let used = host_layout.offsets[e] as usize;
    let pairs = ids_host.iter().filter(|&&i| i >= 0).count();
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
        let (bytes, _) = dispatch_bytes(&ids_host, &host_layout, k, h, format, cfg.padding == Padding::Zero);
        let mut g = c.benchmark_group(name);
        g.throughput(Throughput::Bytes(bytes as u64));
        g.bench_function("gpu", |b| b.iter_custom(|iters| time_gpu(&stream, iters, &mut launch).unwrap()));
        g.finish();
        let us = median_gpu_us(&stream, 5, 50, &mut launch).unwrap();
        let shape =
            format!("T={t} H={h} k={k} E={e} align 128, {used} rows, {:?}; GB/s of the minimum bytes", cfg.padding);
        report_bandwidth(name, &shape, us, bytes);
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
    let bytes = combine_bytes(t, k, pairs, h);
    let mut g = c.benchmark_group("combine-v3");
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function("gpu", |b| b.iter_custom(|iters| time_gpu(&stream, iters, &mut launch).unwrap()));
    g.finish();
    let us = median_gpu_us(&stream, 5, 50, &mut launch).unwrap();
    report_bandwidth("combine-v3", &format!("T={t} H={h} k={k} bf16 in/out; GB/s of the minimum bytes"), us, bytes);
}

fn benches() {
    let mut c = criterion();
    cpu(&mut c);
    gpu(&mut c);
}

criterion_main!(benches);
