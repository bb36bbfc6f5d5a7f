//! BF16 -> FP8 cast: the CPU reference, and the kernel (CUDA events) when a GPU is present.
//! Shape `cast-v3-4k`: T = 4096 tokens x H = 7168 (a DeepSeek-V3 activation), 3 bytes moved
//! per element (88 MB per call, above the 60 MB L2; two input buffers alternate).

use criterion::{criterion_main, Criterion, Throughput};
use moekit_benches::{criterion, median_gpu_us, report_bandwidth, time_gpu};
use moekit_cast::{raw, reference, Fp8Format};
use moekit_cuda::{testing::skip_notice, DeviceBuffer, Gpu, Stream};
use moekit_dtype::bf16;

fn input(n: usize, seed: u32) -> Vec<bf16> {
    (0..n)
        .map(|i| bf16::from_f32(((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / 65536.0 - 128.0))
        .collect()
}

fn cpu(c: &mut Criterion) {
    let n = 1 << 20; // the CPU reference is benchmarked on 1 Mi elements
    let x = input(n, 1);
    let mut y = vec![0u8; n];
    let mut g = c.benchmark_group("cast-cpu-1m");
    g.throughput(Throughput::Bytes(3 * n as u64));
    g.bench_function("reference", |b| {
        b.iter(|| reference::cast_bf16_to_fp8(&x, 0.5, Fp8Format::E4M3, &mut y).unwrap())
    });
    g.finish();
}

fn gpu(c: &mut Criterion) {
    let gpu = match Gpu::new(0) {
        Ok(g) => g,
        Err(e) => return skip_notice("cast GPU benchmark", &e.to_string()),
    };
    let (t, h) = (4096usize, 7168usize);
    let n = t * h;
    let stream = Stream::new(&gpu).expect("stream");
    let xs =
        [DeviceBuffer::from_host(&gpu, &input(n, 1)).unwrap(), DeviceBuffer::from_host(&gpu, &input(n, 2)).unwrap()];
    let mut y = DeviceBuffer::<u8>::zeros(&gpu, n).unwrap();
    let mut launch =
        |i: u64| raw::cast_bf16_to_fp8(&stream, xs[i as usize % 2].view(), y.view_mut(), 0.5, Fp8Format::E4M3);
    let mut g = c.benchmark_group("cast-v3-4k");
    g.throughput(Throughput::Bytes(3 * n as u64));
    g.bench_function("gpu", |b| b.iter_custom(|iters| time_gpu(&stream, iters, &mut launch).unwrap()));
    g.finish();
    let us = median_gpu_us(&stream, 5, 50, &mut launch).unwrap();
    report_bandwidth("cast-v3-4k", &format!("T={t} H={h} bf16->e4m3"), us, 3.0 * n as f64);
}

fn benches() {
    let mut c = criterion();
    cpu(&mut c);
    gpu(&mut c);
}

criterion_main!(benches);
