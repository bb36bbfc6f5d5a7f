//! moekit's main job until the GRPO trainer lands: quantise a BF16 activation matrix to FP8
//! with a per-tensor scale, on the CPU reference and, when asked or available, on the GPU;
//! report the quantisation error and whether the GPU produced the same bits.
//!
//! ```text
//! cargo run --release -p moekit-cast --example fp8_cast -- [--tokens 4096] [--hidden 7168] [--device auto|cpu|cuda]
//! ```

use moekit_cast::{cast_bf16_to_fp8, Fp8Format};
use moekit_dtype::{bf16, F8E4M3};
use moekit_tensor::{CudaDevice, Device, Tensor};
use std::time::Instant;

fn main() {
    if let Err(e) = run() {
        eprintln!("fp8_cast: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let (mut tokens, mut hidden, mut device) = (4096usize, 7168usize, "auto".to_string());
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--tokens" => tokens = value()?.parse()?,
            "--hidden" => hidden = value()?.parse()?,
            "--device" => device = value()?,
            "-h" | "--help" => {
                println!("usage: fp8_cast [--tokens N] [--hidden H] [--device auto|cpu|cuda]");
                return Ok(());
            }
            other => return Err(format!("unknown argument {other:?} (try --help)").into()),
        }
    }
    // Activations like a transformer's: roughly normal with a few large outliers (xorshift).
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let x: Vec<bf16> = (0..tokens * hidden)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let u = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            let outlier = if i % 997 == 0 { 40.0 } else { 1.0 };
            bf16::from_f32(u * 3.0 * outlier)
        })
        .collect();
    let amax = x.iter().fold(0f32, |m, v| m.max(v.to_f32().abs()));
    let scale = F8E4M3::MAX.to_f32() / amax; // per-tensor scale: amax maps to 448
    println!("input: [{tokens}, {hidden}] bf16, amax {amax:.3}, scale {scale:.4} (E4M3)");

    let cpu = Tensor::from_slice(&x, &[tokens, hidden], &Device::Cpu)?;
    let t0 = Instant::now();
    let y_cpu = cast_bf16_to_fp8(&cpu, scale, Fp8Format::E4M3)?.to_vec::<F8E4M3>()?;
    let cpu_s = t0.elapsed().as_secs_f64();
    let (mut err2, mut ref2) = (0f64, 0f64);
    for (a, q) in x.iter().zip(&y_cpu) {
        let (a, b) = (a.to_f32() as f64, q.to_f32() as f64 / scale as f64);
        err2 += (a - b) * (a - b);
        ref2 += a * a;
    }
    println!(
        "cpu reference: {:.1} ms ({:.2} GB/s), relative RMS quantisation error {:.4}",
        cpu_s * 1e3,
        3.0 * x.len() as f64 / cpu_s / 1e9,
        (err2 / ref2).sqrt()
    );

    let gpu = match device.as_str() {
        "cpu" => None,
        "cuda" => Some(CudaDevice::new(0)?),
        "auto" => match CudaDevice::new(0) {
            Ok(d) => Some(d),
            Err(e) => {
                println!("gpu: not used ({e})");
                None
            }
        },
        other => return Err(format!("--device {other:?}: expected auto, cpu or cuda").into()),
    };
    if let Some(d) = gpu {
        println!("gpu: {:?}", d.gpu());
        let dev = Device::Cuda(d);
        let xg = cpu.to_device(&dev)?;
        let _ = cast_bf16_to_fp8(&xg, scale, Fp8Format::E4M3)?.to_vec::<F8E4M3>()?; // warm-up: loads the module
        let y_gpu = cast_bf16_to_fp8(&xg, scale, Fp8Format::E4M3)?.to_vec::<F8E4M3>()?;
        let mismatches = y_gpu.iter().zip(&y_cpu).filter(|(a, b)| a != b).count();
        println!("gpu kernel: {} of {} codes differ from the CPU reference", mismatches, y_cpu.len());
        if mismatches != 0 {
            return Err("GPU and CPU disagree".into());
        }
    }
    Ok(())
}
