//! The kernels against the CPU reference, bit for bit, on the host emulation (`emu_*`, in CI)
//! and on a GPU (`gpu_*`, run by the GPU bundle): log-softmax statistics, the backward beside
//! and in place, cross-entropy, Philox known answers, sampled tokens for fixed seeds; and
//! the same typed errors on every device.

use moekit_cuda::testing::{emulator_or_skip, gpu_or_skip};
use moekit_cuda::{BlockOrder, EmuBuffer, Error};
use moekit_logits::kernels::{LOGITS, SAMPLING};
use moekit_logits::{
    cross_entropy, log_softmax, log_softmax_backward, log_softmax_backward_in_place, raw, reference, sample,
    SampleConfig,
};
use moekit_tensor::{CudaDevice, Device, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};

fn logits(rows: usize, v: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..rows * v).map(|_| rng.gen_range(-scale..scale)).collect()
}

/// Targets with 0, V - 1 and the ignore index -1 in every run of 5 rows.
fn targets(rows: usize, v: usize, seed: u64) -> Vec<i32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..rows)
        .map(|r| match r % 5 {
            0 => 0,
            1 => v as i32 - 1,
            2 => -1,
            _ => rng.gen_range(0..v as i32),
        })
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn assert_bits(ctx: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{ctx}: length");
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        panic!(
            "{ctx}: [{i}] = {:e} ({:#x}), reference {:e} ({:#x})",
            got[i],
            got[i].to_bits(),
            want[i],
            want[i].to_bits()
        );
    }
}

/// Shapes: vocab 1, 13, 37 (not multiples of 32), 300 (more than a block), 1000; one row and
/// several; the last case has -inf logits and an invalid target.
fn shapes() -> Vec<(usize, usize)> {
    vec![(1, 1), (1, 13), (6, 37), (3, 300), (2, 1000)]
}

fn log_softmax_matches_reference(dev: &Device) {
    for (ci, (rows, v)) in shapes().into_iter().enumerate() {
        let seed = 10 + ci as u64;
        let mut z = logits(rows, v, seed, 6.0);
        if v >= 37 {
            z[5] = f32::NEG_INFINITY; // a masked vocabulary entry
        }
        let mut t = targets(rows, v, seed);
        if rows > 2 {
            t[rows - 1] = v as i32; // invalid: counted, treated as no target
        }
        let mut rng = StdRng::seed_from_u64(seed + 1);
        let dl: Vec<f32> = (0..rows).map(|_| rng.gen_range(-1.5f32..1.5)).collect();
        let de: Vec<f32> = (0..rows).map(|_| rng.gen_range(-1.5f32..1.5)).collect();
        let ctx = format!("{} rows={rows} V={v}", dev.name());

        let want = reference::log_softmax_forward(&z, v, &t).unwrap();
        let zt = Tensor::from_slice(&z, &[rows, v], dev).unwrap();
        let tt = Tensor::from_slice(&t, &[rows], dev).unwrap();
        let got = log_softmax(&zt, &tt).unwrap();
        assert_bits(&format!("{ctx} logp"), &got.logp.to_vec::<f32>().unwrap(), &want.logp);
        assert_bits(&format!("{ctx} entropy"), &got.entropy.to_vec::<f32>().unwrap(), &want.entropy);
        assert_bits(&format!("{ctx} row_max"), &got.row_max.to_vec::<f32>().unwrap(), &want.row_max);
        assert_bits(&format!("{ctx} row_lse"), &got.row_lse.to_vec::<f32>().unwrap(), &want.row_lse);
        assert_eq!(got.status.to_vec::<i32>().unwrap(), vec![want.invalid as i32], "{ctx}: status");
        assert_eq!(got.check().is_err(), want.invalid > 0, "{ctx}: check");
        let again = log_softmax(&zt, &tt).unwrap();
        assert_eq!(bits(&again.entropy.to_vec::<f32>().unwrap()), bits(&want.entropy), "{ctx}: deterministic");

        // Backward: both terms, only the log-prob term, beside and in place.
        let dlt = Tensor::from_slice(&dl, &[rows], dev).unwrap();
        let det = Tensor::from_slice(&de, &[rows], dev).unwrap();
        for (name, with_dl, with_de) in
            [("both", true, true), ("logp only", true, false), ("entropy only", false, true)]
        {
            let wg = reference::log_softmax_backward(
                &z,
                v,
                &t,
                &want.row_lse,
                &want.entropy,
                with_dl.then_some(&dl[..]),
                with_de.then_some(&de[..]),
            )
            .unwrap();
            let g = log_softmax_backward(&zt, &tt, &got, with_dl.then_some(&dlt), with_de.then_some(&det)).unwrap();
            assert_bits(&format!("{ctx} grad {name}"), &g.to_vec::<f32>().unwrap(), &wg);
            let mut zi = Tensor::from_slice(&z, &[rows, v], dev).unwrap();
            log_softmax_backward_in_place(&mut zi, &tt, &got, with_dl.then_some(&dlt), with_de.then_some(&det))
                .unwrap();
            assert_bits(&format!("{ctx} grad {name} in place"), &zi.to_vec::<f32>().unwrap(), &wg);
        }

        // Cross-entropy: loss, count and gradient from the device-side count.
        let (wl, wc, wg, winv) = reference::cross_entropy(&z, v, &t).unwrap();
        let ce = cross_entropy(&zt, &tt).unwrap();
        assert_bits(&format!("{ctx} ce loss"), &ce.loss.to_vec::<f32>().unwrap(), &[wl]);
        assert_eq!(ce.count.to_vec::<i32>().unwrap(), vec![wc], "{ctx}: ce count");
        assert_bits(&format!("{ctx} ce grad"), &ce.grad.to_vec::<f32>().unwrap(), &wg);
        assert_eq!(ce.check().is_err(), winv > 0);
    }
}

const KAT: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
    ([0, 0, 0, 0], [0, 0], [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]),
    ([u32::MAX; 4], [u32::MAX; 2], [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]),
    (
        [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
        [0xa4093822, 0x299f31d0],
        [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1],
    ),
];

fn sample_cases(v: usize) -> Vec<SampleConfig> {
    vec![
        SampleConfig::greedy(),
        SampleConfig::default(),
        SampleConfig::with_temperature(0.7).top_k(5.min(v)),
        SampleConfig::with_temperature(1.3).top_p(0.9),
        SampleConfig::with_temperature(1.0).top_k(10.min(v)).top_p(0.5),
        SampleConfig::with_temperature(0.5).top_k(v),
    ]
}

/// Tokens on `dev` equal the reference's for every configuration of [`sample_cases`] on every
/// vocabulary, with continuous logits and (`ties`) logits on a grid of 0.5 (exact ties
/// everywhere); `full`: both seeds for each (the GPU), else one seed per configuration,
/// alternating, and ties only on the second vocabulary (the emulation: CI time).
fn sampling_matches_reference(dev: &Device, rows: usize, vocabs: &[usize], full: bool) {
    let seeds = [(1u64, 0u64), (0xdead_beef_0123, 7)];
    for (vi, &v) in vocabs.iter().enumerate() {
        for (ti, ties) in [false, true].into_iter().enumerate() {
            if ties && !full && vi != 1 {
                continue;
            }
            let mut z = logits(rows, v, 40 + v as u64 + ti as u64, 3.0);
            if ties {
                z.iter_mut().for_each(|x| *x = (*x * 2.0).round() * 0.5);
            }
            let zt = Tensor::from_slice(&z, &[rows, v], dev).unwrap();
            for (ci, cfg) in sample_cases(v).into_iter().enumerate() {
                for (si, &(seed, step)) in seeds.iter().enumerate() {
                    if !full && si != (ci + vi) % 2 {
                        continue;
                    }
                    let want = reference::sample(&z, v, &cfg, seed, step).unwrap();
                    let got = sample(&zt, &cfg, seed, step).unwrap().to_vec::<i32>().unwrap();
                    assert_eq!(got, want, "{} V={v} ties={ties} {cfg:?} seed={seed} step={step}", dev.name());
                    if cfg.temperature == 0.0 {
                        for (r, &tok) in got.iter().enumerate() {
                            assert_eq!(tok as usize, reference::argmax(&z[r * v..][..v]));
                        }
                    }
                }
            }
        }
    }
    // Two runs, the same tokens.
    let v = vocabs[vocabs.len() - 1];
    let zt = Tensor::from_slice(&logits(rows, v, 99, 1.0), &[rows, v], dev).unwrap();
    let cfg = SampleConfig::with_temperature(1.0).top_k(3.min(v));
    let a = sample(&zt, &cfg, 3, 1).unwrap().to_vec::<i32>().unwrap();
    assert_eq!(a, sample(&zt, &cfg, 3, 1).unwrap().to_vec::<i32>().unwrap(), "deterministic");
}

/// The outcome of a call: its values' bits or the error's variant.
type Outcome = Result<Vec<u32>, std::mem::Discriminant<Error>>;

fn outcome(r: moekit_logits::Result<Vec<u32>>) -> Outcome {
    r.map_err(|e| std::mem::discriminant(&e))
}

/// Every bad call fails with the same variant on `dev` as on the CPU, and good calls agree.
fn same_outcome_as_cpu(dev: &Device) {
    let z = logits(3, 13, 1, 2.0);
    let t = vec![0i32, 12, -1];
    let run_lsm = |d: &Device, zdims: &[usize], t: &[i32], tdims: &[usize]| -> Outcome {
        outcome((|| {
            let zt = Tensor::from_slice(&z[..zdims.iter().product()], zdims, d)?;
            let tt = Tensor::from_slice(t, tdims, d)?;
            let r = log_softmax(&zt, &tt)?;
            r.check()?;
            Ok(bits(&r.logp.to_vec::<f32>()?))
        })())
    };
    let cases: Vec<(Vec<usize>, Vec<i32>, Vec<usize>)> = vec![
        (vec![3, 13], t.clone(), vec![3]),
        (vec![3, 13], t.clone(), vec![2]),       // targets too short
        (vec![39], t.clone(), vec![3]),          // logits not 2-D
        (vec![3, 0], t.clone(), vec![3]),        // empty vocabulary
        (vec![3, 13], vec![0, 13, -1], vec![3]), // id out of range
        (vec![3, 13], vec![0, -7, 1 << 30], vec![3]),
        (vec![0, 13], vec![], vec![0]), // no rows: nothing to do
    ];
    for (zd, tv, td) in cases {
        let want = run_lsm(&Device::Cpu, &zd, &tv, &td);
        assert_eq!(run_lsm(dev, &zd, &tv, &td), want, "log_softmax {zd:?} {tv:?} {td:?}");
    }
    let run_sample = |d: &Device, cfg: &SampleConfig, dims: &[usize]| -> Outcome {
        outcome((|| {
            let zt = Tensor::from_slice(&z[..dims.iter().product()], dims, d)?;
            Ok(sample(&zt, cfg, 5, 0)?.to_vec::<i32>()?.iter().map(|&x| x as u32).collect())
        })())
    };
    for (cfg, dims) in [
        (SampleConfig::default(), vec![3, 13]),
        (SampleConfig::default().top_k(14), vec![3, 13]),
        (SampleConfig::default().top_k(13), vec![3, 13]),
        (SampleConfig::default().top_p(0.0), vec![3, 13]),
        (SampleConfig::default().top_p(1.01), vec![3, 13]),
        (SampleConfig::with_temperature(-1.0), vec![3, 13]),
        (SampleConfig::with_temperature(f32::NAN), vec![3, 13]),
        (SampleConfig::default(), vec![39]),
        (SampleConfig::default(), vec![3, 0]),
        (SampleConfig::default(), vec![0, 13]),
        (SampleConfig::greedy(), vec![0, 13]),
    ] {
        let want = run_sample(&Device::Cpu, &cfg, &dims);
        assert_eq!(run_sample(dev, &cfg, &dims), want, "sample {cfg:?} {dims:?}");
    }
    // Dtype errors.
    let zi = Tensor::from_slice(&[1i32; 13], &[1, 13], dev).unwrap();
    let tt = Tensor::from_slice(&[0i32], &[1], dev).unwrap();
    assert!(matches!(log_softmax(&zi, &tt), Err(Error::Dtype { .. })));
    assert!(matches!(sample(&zi, &SampleConfig::default(), 0, 0), Err(Error::Dtype { .. })));
}

#[test]
fn emu_log_softmax_matches_reference_bitwise() {
    let Some(emu) = emulator_or_skip("emu_log_softmax_matches_reference_bitwise", &[&LOGITS], BlockOrder::Reversed)
    else {
        return;
    };
    log_softmax_matches_reference(&Device::Emulated(emu));
}

#[test]
fn emu_philox_known_answers() {
    let Some(emu) = emulator_or_skip("emu_philox_known_answers", &[&SAMPLING], BlockOrder::InOrder) else { return };
    let ctr: Vec<u32> = KAT.iter().flat_map(|k| k.0).collect();
    let key: Vec<u32> = KAT.iter().flat_map(|k| k.1).collect();
    let c = EmuBuffer::from_host(&emu, &ctr).unwrap();
    let k = EmuBuffer::from_host(&emu, &key).unwrap();
    let mut out = EmuBuffer::<u32>::zeros(&emu, 12).unwrap();
    raw::philox_probe(&emu, c.view(), k.view(), out.view_mut()).unwrap();
    let want: Vec<u32> = KAT.iter().flat_map(|k| k.2).collect();
    assert_eq!(out.as_slice(), &want[..]);
}

#[test]
fn emu_sampling_matches_reference() {
    let Some(emu) = emulator_or_skip("emu_sampling_matches_reference", &[&SAMPLING], BlockOrder::Shuffled(7)) else {
        return;
    };
    sampling_matches_reference(&Device::Emulated(emu), 2, &[1, 37, 300], false);
}

#[test]
fn emu_same_outcome_as_cpu() {
    let Some(emu) = emulator_or_skip("emu_same_outcome_as_cpu", &[&LOGITS, &SAMPLING], BlockOrder::InOrder) else {
        return;
    };
    same_outcome_as_cpu(&Device::Emulated(emu));
}

/// The raw layer refuses bad lengths before any launch and writes nothing.
#[test]
fn emu_raw_rejects_bad_lengths_before_launch() {
    let Some(emu) =
        emulator_or_skip("emu_raw_rejects_bad_lengths_before_launch", &[&LOGITS, &SAMPLING], BlockOrder::InOrder)
    else {
        return;
    };
    let z = EmuBuffer::from_host(&emu, &logits(2, 13, 3, 1.0)).unwrap();
    let t = EmuBuffer::from_host(&emu, &[0i32, 1]).unwrap();
    let mut short = EmuBuffer::<f32>::zeros(&emu, 1).unwrap();
    let mut a = EmuBuffer::<f32>::zeros(&emu, 2).unwrap();
    let mut b = EmuBuffer::<f32>::zeros(&emu, 2).unwrap();
    let mut c = EmuBuffer::<f32>::zeros(&emu, 2).unwrap();
    let mut s = EmuBuffer::<i32>::zeros(&emu, 1).unwrap();
    let out = raw::StatsOut {
        logp: short.view_mut(),
        entropy: a.view_mut(),
        row_max: b.view_mut(),
        row_lse: c.view_mut(),
        status: s.view_mut(),
    };
    let r = raw::log_softmax_forward(&emu, z.view(), 13, t.view(), out);
    assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
    assert!(a.as_slice().iter().all(|&x| x == 0.0), "nothing written");
    let mut w = EmuBuffer::<f32>::zeros(&emu, 25).unwrap();
    let mut tok = EmuBuffer::<i32>::zeros(&emu, 2).unwrap();
    let r = raw::sample(&emu, &SampleConfig::default(), z.view(), 13, 0, 0, w.view_mut(), tok.view_mut());
    assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
    let r = raw::sample(&emu, &SampleConfig::default().top_k(14), z.view(), 13, 0, 0, w.view_mut(), tok.view_mut());
    assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
}

#[test]
#[ignore = "needs a GPU: cargo test -- --include-ignored gpu_ (the GPU bundle does)"]
fn gpu_logits_and_sampling_match_reference() {
    let Some(_) = gpu_or_skip("gpu_logits_and_sampling_match_reference", &[&LOGITS, &SAMPLING]) else { return };
    let dev = Device::Cuda(CudaDevice::new(0).unwrap());
    log_softmax_matches_reference(&dev);
    sampling_matches_reference(&dev, 16, &[1, 13, 37, 1000, 32000], true);
    same_outcome_as_cpu(&dev);
}
