//! The attention kernels against the CPU reference, bit for bit (same operation order): the
//! forward, the cached forward step by step (= the forward's rows), the backward; twice each
//! (determinism) and in shuffled block order. One body per kernel device: the host emulation
//! (`emu_*`, in CI) and the GPU (`gpu_*`, run by the GPU bundle).

mod common;

use common::*;
use moekit_attention::kernels::ATTENTION;
use moekit_attention::{attention, attention_backward, attention_cached, raw, reference, AttnShape, Error};
use moekit_cuda::testing::{emulator_or_skip, gpu_or_skip};
use moekit_cuda::{BlockOrder, EmuBuffer};
use moekit_tensor::{CudaDevice, DType, Device, Tensor};

fn s(batch: usize, heads: usize, head_dim: usize, seq: usize) -> AttnShape {
    AttnShape { batch, heads, head_dim, seq }
}

/// Edge shapes: one token, lengths off the tiles (7, 17, 33), one and several heads, batch
/// > 1, every kernel variant (hd 16, 32 -> 1 chunk; 48, 64 -> 2; 96 -> 3; 128 -> 4).
fn forward_shapes() -> Vec<AttnShape> {
    vec![
        s(1, 1, 16, 1),
        s(1, 1, 32, 7),
        s(2, 3, 16, 33),
        s(1, 2, 64, 17),
        s(2, 1, 48, 8),
        s(1, 1, 96, 5),
        s(1, 1, 128, 9),
    ]
}

fn backward_shapes() -> Vec<AttnShape> {
    vec![
        s(1, 1, 16, 1),
        s(2, 2, 32, 33),
        s(1, 1, 64, 40),
        s(1, 2, 48, 7),
        s(1, 1, 96, 17),
        s(1, 2, 128, 9),
        s(1, 1, 16, 70),
    ]
}

fn forward_matches_reference(dev: &Device) {
    for (k, shape) in forward_shapes().into_iter().enumerate() {
        // Long rows (several key tiles) also with rising scores: the max moves in every tile.
        let qkv = if shape.seq > 64 { rising_qkv(&shape, 100 + k as u64) } else { random_qkv(&shape, 100 + k as u64) };
        let (want_o, want_l) = reference::forward(&qkv, &shape).unwrap();
        let t = Tensor::from_slice(&qkv, &[shape.batch * shape.seq, 3 * shape.d()], dev).unwrap();
        let ctx = format!("{} {shape:?}", dev.name());
        let got = attention(&t, &shape).unwrap();
        assert_bits(&format!("{ctx} out"), &got.out.to_vec::<f32>().unwrap(), &want_o);
        assert_bits(&format!("{ctx} lse"), &got.lse.to_vec::<f32>().unwrap(), &want_l);
        let again = attention(&t, &shape).unwrap();
        assert_bits(&format!("{ctx} out, second run"), &again.out.to_vec::<f32>().unwrap(), &want_o);
    }
}

/// A prefill of 3 positions through the cache, then decode steps (one query per sequence) up
/// to 35 positions (past a key tile): each step equals the full forward's row bit for bit,
/// and the caches end holding every key and value.
fn decode_matches_forward_rows(dev: &Device, full: AttnShape, max_len: usize) {
    let qkv = random_qkv(&full, 7);
    let d = full.d();
    let (out, lse) = reference::forward(&qkv, &full).unwrap();
    let cache_dims = [full.batch, full.heads, max_len, full.head_dim];
    // Filled with a marker, so that a read of a position not yet written would show.
    let mut kc = Tensor::from_slice(&vec![7.5f32; full.cache_len(max_len)], &cache_dims, dev).unwrap();
    let mut vc = Tensor::from_slice(&vec![-7.5f32; full.cache_len(max_len)], &cache_dims, dev).unwrap();
    let mut pos = 0;
    while pos < full.seq {
        let n = if pos == 0 { 3 } else { 1 };
        let step = AttnShape { seq: n, ..full };
        let rows: Vec<f32> =
            (0..full.batch).flat_map(|b| qkv[(b * full.seq + pos) * 3 * d..][..n * 3 * d].to_vec()).collect();
        let rt = Tensor::from_slice(&rows, &[full.batch * n, 3 * d], dev).unwrap();
        let got = attention_cached(&rt, &mut kc, &mut vc, &step, pos).unwrap();
        let (o, l) = (got.out.to_vec::<f32>().unwrap(), got.lse.to_vec::<f32>().unwrap());
        for b in 0..full.batch {
            for i in 0..n {
                let t = pos + i;
                let ctx = format!("{} {full:?} b={b} t={t}", dev.name());
                assert_bits(&ctx, &o[(b * n + i) * d..][..d], &out[(b * full.seq + t) * d..][..d]);
                for h in 0..full.heads {
                    let (g, w) = (l[(b * full.heads + h) * n + i], lse[(b * full.heads + h) * full.seq + t]);
                    assert_eq!(g.to_bits(), w.to_bits(), "{ctx} h={h}: lse {g:e} vs {w:e}");
                }
            }
        }
        pos += n;
    }
    let (kv, vv) = (kc.to_vec::<f32>().unwrap(), vc.to_vec::<f32>().unwrap());
    let hd = full.head_dim;
    for b in 0..full.batch {
        for h in 0..full.heads {
            for t in 0..max_len {
                let at = ((b * full.heads + h) * max_len + t) * hd;
                if t < full.seq {
                    let src = (b * full.seq + t) * 3 * d + h * hd;
                    assert_bits("k cache", &kv[at..][..hd], &qkv[src + d..][..hd]);
                    assert_bits("v cache", &vv[at..][..hd], &qkv[src + 2 * d..][..hd]);
                } else {
                    assert!(kv[at..][..hd].iter().all(|&x| x == 7.5), "cache position {t} past the end written");
                }
            }
        }
    }
}

fn backward_matches_reference(dev: &Device) {
    for (k, shape) in backward_shapes().into_iter().enumerate() {
        let qkv = if shape.seq > 64 { rising_qkv(&shape, 200 + k as u64) } else { random_qkv(&shape, 200 + k as u64) };
        let dout = random(shape.out_len(), 1.0, 300 + k as u64);
        let (o, l) = reference::forward(&qkv, &shape).unwrap();
        let want = reference::backward(&qkv, &o, &l, &dout, &shape).unwrap();
        let rows = shape.batch * shape.seq;
        let qt = Tensor::from_slice(&qkv, &[rows, 3 * shape.d()], dev).unwrap();
        let fwd = attention(&qt, &shape).unwrap();
        let dt = Tensor::from_slice(&dout, &[rows, shape.d()], dev).unwrap();
        let ctx = format!("{} {shape:?}", dev.name());
        let got = attention_backward(&qt, &fwd.out, &fwd.lse, &dt, &shape).unwrap().to_vec::<f32>().unwrap();
        assert_bits(&format!("{ctx} dqkv"), &got, &want);
        let again = attention_backward(&qt, &fwd.out, &fwd.lse, &dt, &shape).unwrap().to_vec::<f32>().unwrap();
        assert_bits(&format!("{ctx} dqkv, second run"), &again, &want);
    }
}

/// BF16 qkv: the kernels widen it exactly when loading, so forward, cached steps and backward
/// equal the reference on the widened values bit for bit.
fn bf16_matches_reference(dev: &Device) {
    use moekit_dtype::bf16;
    for (k, shape) in [s(2, 2, 32, 33), s(1, 1, 128, 9)].into_iter().enumerate() {
        let h: Vec<bf16> = random_qkv(&shape, 400 + k as u64).iter().map(|&x| bf16::from_f32(x)).collect();
        let wide: Vec<f32> = h.iter().map(|x| x.to_f32()).collect();
        let (d, rows) = (shape.d(), shape.batch * shape.seq);
        let ctx = format!("{} bf16 {shape:?}", dev.name());
        let qt = Tensor::from_slice(&h, &[rows, 3 * d], dev).unwrap();
        let (want_o, want_l) = reference::forward(&wide, &shape).unwrap();
        let got = attention(&qt, &shape).unwrap();
        assert_bits(&format!("{ctx} out"), &got.out.to_vec::<f32>().unwrap(), &want_o);
        assert_bits(&format!("{ctx} lse"), &got.lse.to_vec::<f32>().unwrap(), &want_l);
        let dout = random(shape.out_len(), 1.0, 500 + k as u64);
        let dt = Tensor::from_slice(&dout, &[rows, d], dev).unwrap();
        let want_g = reference::backward(&wide, &want_o, &want_l, &dout, &shape).unwrap();
        let g = attention_backward(&qt, &got.out, &got.lse, &dt, &shape).unwrap();
        assert_eq!(g.dtype(), DType::F32);
        assert_bits(&format!("{ctx} dqkv"), &g.to_vec::<f32>().unwrap(), &want_g);
        // Whole sequences through a cache in one call: the same rows.
        let cache_dims = [shape.batch, shape.heads, shape.seq, shape.head_dim];
        let mut kc = Tensor::zeros(&cache_dims, DType::F32, dev).unwrap();
        let mut vc = Tensor::zeros(&cache_dims, DType::F32, dev).unwrap();
        let c = attention_cached(&qt, &mut kc, &mut vc, &shape, 0).unwrap();
        assert_bits(&format!("{ctx} cached out"), &c.out.to_vec::<f32>().unwrap(), &want_o);
    }
}

/// Every rejected input gives the same error on `dev` as on the CPU.
fn error_outcomes(dev: &Device) -> Vec<String> {
    let ok = s(2, 2, 8, 3);
    let qkv = random_qkv(&ok, 1);
    let t = |v: &[f32], dims: &[usize]| Tensor::from_slice(v, dims, dev).unwrap();
    let qt = t(&qkv, &[6, 48]);
    let mut outcomes = Vec::new();
    let mut push = |r: Result<(), Error>| outcomes.push(format!("{:?}", r.err()));
    push(attention(&t(&qkv[..40], &[5, 8]), &ok).map(|_| ()));
    push(attention(&qt, &s(2, 2, 129, 3)).map(|_| ()));
    push(attention(&qt, &s(2, 2, 0, 3)).map(|_| ()));
    push(attention(&qt, &s(2, 2, 8, 0)).map(|_| ()));
    push(attention(&qt, &s(1, 1, 8, moekit_attention::MAX_SEQ_LEN + 1)).map(|_| ()));
    let ints: Vec<i32> = (0..6 * 48).collect();
    push(attention(&Tensor::from_slice(&ints, &[6, 48], dev).unwrap(), &ok).map(|_| ()));
    let cache_dims = [2, 2, 4, 8];
    let mut kc = Tensor::zeros(&cache_dims, DType::F32, dev).unwrap();
    let mut vc = Tensor::zeros(&cache_dims, DType::F32, dev).unwrap();
    push(attention_cached(&qt, &mut kc, &mut vc, &ok, 2).map(|_| ()));
    let mut short = Tensor::zeros(&[2, 2, 3, 8], DType::F32, dev).unwrap();
    push(attention_cached(&qt, &mut kc, &mut short, &ok, 0).map(|_| ()));
    let mut flat = Tensor::zeros(&[2 * 2 * 4 * 8], DType::F32, dev).unwrap();
    push(attention_cached(&qt, &mut flat, &mut vc, &ok, 0).map(|_| ()));
    let fwd = attention(&qt, &ok).unwrap();
    push(attention_backward(&qt, &fwd.out, &fwd.lse, &t(&qkv[..40], &[5, 8]), &ok).map(|_| ()));
    push(attention_backward(&qt, &fwd.lse, &fwd.lse, &fwd.out, &ok).map(|_| ()));
    let d16: Vec<moekit_dtype::bf16> = vec![moekit_dtype::bf16::from_f32(0.5); 6 * 16];
    let dt16 = Tensor::from_slice(&d16, &[6, 16], dev).unwrap();
    push(attention_backward(&qt, &fwd.out, &fwd.lse, &dt16, &ok).map(|_| ()));
    outcomes
}

#[test]
fn emu_forward_matches_reference_bitwise() {
    for order in [BlockOrder::InOrder, BlockOrder::Shuffled(5)] {
        let Some(emu) = emulator_or_skip("emu_forward_matches_reference_bitwise", &[&ATTENTION], order) else { return };
        forward_matches_reference(&Device::Emulated(emu));
    }
}

#[test]
fn emu_decode_matches_forward_rows_bitwise() {
    let Some(emu) = emulator_or_skip("emu_decode_matches_forward_rows_bitwise", &[&ATTENTION], BlockOrder::Reversed)
    else {
        return;
    };
    let dev = Device::Emulated(emu);
    decode_matches_forward_rows(&dev, s(2, 2, 32, 35), 37);
    decode_matches_forward_rows(&dev, s(1, 1, 128, 6), 6);
}

#[test]
fn emu_backward_matches_reference_bitwise() {
    for order in [BlockOrder::InOrder, BlockOrder::Shuffled(9)] {
        let Some(emu) = emulator_or_skip("emu_backward_matches_reference_bitwise", &[&ATTENTION], order) else {
            return;
        };
        backward_matches_reference(&Device::Emulated(emu));
    }
}

#[test]
fn emu_bf16_qkv_matches_reference_bitwise() {
    let Some(emu) = emulator_or_skip("emu_bf16_qkv_matches_reference_bitwise", &[&ATTENTION], BlockOrder::Reversed)
    else {
        return;
    };
    bf16_matches_reference(&Device::Emulated(emu));
}

#[test]
fn emu_errors_match_the_cpu() {
    let Some(emu) = emulator_or_skip("emu_errors_match_the_cpu", &[&ATTENTION], BlockOrder::InOrder) else { return };
    let cpu = error_outcomes(&Device::Cpu);
    assert!(cpu.iter().all(|o| o != "None"), "every case is an error: {cpu:#?}");
    assert_eq!(error_outcomes(&Device::Emulated(emu)), cpu);
}

/// The raw layer checks lengths before launching (nothing written).
#[test]
fn emu_raw_rejects_bad_lengths_before_launch() {
    let Some(emu) = emulator_or_skip("emu_raw_rejects_bad_lengths_before_launch", &[&ATTENTION], BlockOrder::InOrder)
    else {
        return;
    };
    let shape = s(1, 2, 16, 5);
    let qkv = EmuBuffer::from_host(&emu, &random_qkv(&shape, 3)).unwrap();
    let mut out = EmuBuffer::<f32>::from_host(&emu, &vec![9.0; shape.out_len() - 1]).unwrap();
    let mut lse = EmuBuffer::<f32>::zeros(&emu, shape.lse_len()).unwrap();
    let r = raw::forward(&emu, &shape, qkv.view().into(), out.view_mut(), lse.view_mut());
    assert!(matches!(r, Err(Error::Shape(ref m)) if m.contains("out")), "{r:?}");
    assert!(out.as_slice().iter().all(|&x| x == 9.0));
    let mut out = EmuBuffer::<f32>::zeros(&emu, shape.out_len()).unwrap();
    raw::forward(&emu, &shape, qkv.view().into(), out.view_mut(), lse.view_mut()).unwrap();
}

#[test]
fn gpu_forward_matches_reference_bitwise() {
    let Some(_) = gpu_or_skip("gpu_forward_matches_reference_bitwise", &[&ATTENTION]) else { return };
    forward_matches_reference(&Device::Cuda(CudaDevice::new(0).unwrap()));
}

#[test]
fn gpu_decode_matches_forward_rows_bitwise() {
    let Some(_) = gpu_or_skip("gpu_decode_matches_forward_rows_bitwise", &[&ATTENTION]) else { return };
    let dev = Device::Cuda(CudaDevice::new(0).unwrap());
    decode_matches_forward_rows(&dev, s(2, 2, 32, 35), 37);
    decode_matches_forward_rows(&dev, s(1, 4, 128, 70), 80);
}

#[test]
fn gpu_backward_matches_reference_bitwise() {
    let Some(_) = gpu_or_skip("gpu_backward_matches_reference_bitwise", &[&ATTENTION]) else { return };
    backward_matches_reference(&Device::Cuda(CudaDevice::new(0).unwrap()));
}

#[test]
fn gpu_bf16_qkv_matches_reference_bitwise() {
    let Some(_) = gpu_or_skip("gpu_bf16_qkv_matches_reference_bitwise", &[&ATTENTION]) else { return };
    bf16_matches_reference(&Device::Cuda(CudaDevice::new(0).unwrap()));
}

#[test]
fn gpu_errors_match_the_cpu() {
    let Some(_) = gpu_or_skip("gpu_errors_match_the_cpu", &[&ATTENTION]) else { return };
    assert_eq!(error_outcomes(&Device::Cuda(CudaDevice::new(0).unwrap())), error_outcomes(&Device::Cpu));
}
