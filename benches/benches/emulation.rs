//! Speed of the host emulation (kernels/include/moekit/emu/) on the CPU: what an emulated
//! test costs. `emu-reduce-64x256`: 64 blocks x 256 threads, a shared-memory tree reduction
//! (9 barriers per block); `emu-cast-1m`: the BF16 -> FP8 cast kernel on 1 Mi elements.

use criterion::{criterion_main, Throughput};
use moekit_benches::criterion;
use moekit_cast::{cast_bf16_to_fp8, Fp8Format};
use moekit_cuda::Emulator;
use moekit_dtype::bf16;
use moekit_tensor::{DType, Device, Tensor};

fn benches() {
    let mut c = criterion();
    for workers in [1u32, 2] {
        let dev = Device::Emulated(Emulator::new().with_workers(workers));
        let (blocks, n) = (64usize, 64 * 256);
        let x: Vec<f32> = (0..n).map(|i| (i % 13) as f32).collect();
        let xt = Tensor::from_slice(&x, &[n], &dev).unwrap();
        let mut out = Tensor::zeros(&[blocks], DType::F32, &dev).unwrap();
        let mut g = c.benchmark_group("emu-reduce-64x256");
        g.sample_size(20);
        g.bench_function(format!("{workers}-workers"), |b| {
            b.iter(|| {
                let args = (xt.dev_ptr::<f32>().unwrap(), out.dev_ptr_mut::<f32>().unwrap(), n as i32);
                // SAFETY: (x: n floats, out: one float per block, n), as the kernel expects.
                unsafe { moekit_emu_selftest::run(&dev, "selftest_block_reduce", blocks as u32, 256, 0, args) }.unwrap()
            })
        });
        g.finish();
    }
    let dev = Device::Emulated(Emulator::new());
    let n = 1 << 20;
    let x: Vec<bf16> = (0..n).map(|i| bf16::from_f32((i % 1000) as f32 * 0.37 - 180.0)).collect();
    let xt = Tensor::from_slice(&x, &[n], &dev).unwrap();
    let mut g = c.benchmark_group("emu-cast-1m");
    g.throughput(Throughput::Bytes(3 * n as u64));
    g.sample_size(10);
    g.bench_function("2-workers", |b| b.iter(|| cast_bf16_to_fp8(&xt, 0.5, Fp8Format::E4M3).unwrap()));
    g.finish();
}

criterion_main!(benches);
