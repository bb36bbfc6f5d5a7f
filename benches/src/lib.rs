//! Shared benchmark helpers: the ceilings of `shared/reference/performance.md`, CUDA-event
//! timing, quick mode, and the one-line summaries the GPU bundle collects.

use criterion::Criterion;
use moekit_cuda::{Result, Stream};
use std::time::Duration;

/// Measured HBM bandwidth of the reference H200 (device-to-device copy, bytes read + written).
pub const HBM_BYTES_PER_S: f64 = 4.3e12;

/// Whether `MOEKIT_BENCH_QUICK=1` (the GPU bundle's short mode).
pub fn quick() -> bool {
    std::env::var("MOEKIT_BENCH_QUICK").is_ok_and(|v| v == "1")
}

/// A Criterion configured for quick or full runs.
pub fn criterion() -> Criterion {
    let c = Criterion::default().configure_from_args();
    if quick() {
        c.warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1)).sample_size(10)
    } else {
        c
    }
}

/// Times `iters` back-to-back runs of `f` on `stream` with CUDA events; for
/// `Bencher::iter_custom`.
pub fn time_gpu(stream: &Stream, iters: u64, mut f: impl FnMut(u64) -> Result<()>) -> Result<Duration> {
    let start = stream.record()?;
    for i in 0..iters {
        f(i)?;
    }
    let end = stream.record()?;
    let ms = start.elapsed_ms(&end)? as f64;
    Ok(Duration::from_secs_f64(ms / 1e3))
}

/// Median per-run microseconds of `f` over `reps` event-timed runs (after `warmup` runs).
pub fn median_gpu_us(stream: &Stream, warmup: u64, reps: usize, mut f: impl FnMut(u64) -> Result<()>) -> Result<f64> {
    for i in 0..warmup {
        f(i)?;
    }
    stream.synchronize()?;
    let mut v = Vec::with_capacity(reps);
    for r in 0..reps {
        v.push(time_gpu(stream, 1, |i| f(i + r as u64))?.as_secs_f64() * 1e6);
    }
    v.sort_by(f64::total_cmp);
    Ok(v[v.len() / 2])
}

/// Prints the summary line of a memory-bound benchmark (collected by the bundle's run.sh):
/// `MOEKIT-BENCH | name | shape | median | GB/s | fraction of HBM ceiling |`. `bytes` must be
/// the *minimum* the op has to move (each input read once, each output written once), never
/// what the kernel happens to move; the line says so.
pub fn report_bandwidth(name: &str, shape: &str, median_us: f64, bytes: f64) {
    let gbs = bytes / (median_us * 1e-6) / 1e9;
    println!(
        "MOEKIT-BENCH | {name} | {shape} | {median_us:.1} us | {gbs:.0} GB/s of minimum bytes | {:.0}% of the measured {:.1} TB/s |",
        100.0 * gbs * 1e9 / HBM_BYTES_PER_S,
        HBM_BYTES_PER_S / 1e12
    );
}

/// Measured dense BF16 tensor-core rate of the reference H200 (8192^3 matmul, random data).
pub const BF16_FLOPS_PER_S: f64 = 790e12;
/// Dense FP8 tensor-core rate of the H200 (datasheet; not measured yet).
pub const FP8_FLOPS_PER_S: f64 = 1979e12;

/// Prints the summary line of a compute-bound benchmark (collected by the bundle's run.sh):
/// `MOEKIT-BENCH | name | shape | median | TFLOPS | fraction of the ceiling |`.
pub fn report_tflops(name: &str, shape: &str, median_us: f64, flops: f64, ceiling_flops_per_s: f64) {
    let tflops = flops / (median_us * 1e-6) / 1e12;
    println!(
        "MOEKIT-BENCH | {name} | {shape} | {median_us:.1} us | {tflops:.0} TFLOPS | {:.0}% of {:.0} TFLOPS |",
        100.0 * tflops * 1e12 / ceiling_flops_per_s,
        ceiling_flops_per_s / 1e12
    );
}
