//! The norm kernels against the CPU reference, bit for bit, on random inputs (never zeros) and
//! the edge shapes: one token / row, d not a multiple of 4 (the scalar path) or of 128, one
//! head, vocab not a multiple of 32, ids at 0 and vocab - 1, many tokens on one id, views at
//! unaligned offsets. One body per kernel device: the host emulation (`emu_*`, in CI) and the
//! GPU (`gpu_*`, run by the GPU bundle).

use moekit_cuda::testing::{emulator_or_skip, gpu_or_skip};
use moekit_cuda::{BlockOrder, Error};
use moekit_dtype::bf16;
use moekit_norm::kernels::NORM;
use moekit_norm::{
    add, add_rmsnorm, embedding, embedding_backward, embedding_backward_into, embedding_deferred, reference, rmsnorm,
    rmsnorm_backward, rmsnorm_backward_into, to_bf16, IdStatus, Rope,
};
use moekit_tensor::{CudaDevice, DType, Device, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(-2.0f32..2.0)).collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn assert_bits(got: &[f32], want: &[f32], ctx: &str) {
    assert_eq!(got.len(), want.len(), "{ctx}: length");
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        panic!("{ctx}: element {i}: kernel {:e}, reference {:e}", got[i], want[i]);
    }
}

/// Ids in `[0, vocab)` with both ends and heavy repeats: every third token is id 5 % vocab.
fn ids(tokens: usize, vocab: usize, seed: u64) -> Vec<i32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..tokens)
        .map(|t| match t % 7 {
            0 => 0,
            1 => vocab as i32 - 1,
            2 | 4 => (5 % vocab) as i32,
            _ => rng.gen_range(0..vocab as i32),
        })
        .collect()
}

/// (tokens, vocab, dim): one token, two sort chunks (300 > 256), d % 4 != 0 (scalar path).
const EMBED_CASES: [(usize, usize, usize); 4] = [(1, 37, 12), (300, 37, 12), (41, 67, 13), (260, 5, 6)];

fn embedding_matches_reference(dev: &Device) {
    for (ci, &(tokens, vocab, dim)) in EMBED_CASES.iter().enumerate() {
        let seed = ci as u64;
        let table = random(vocab * dim, seed);
        let id = ids(tokens, vocab, seed + 1);
        let ctx = format!("{} T={tokens} V={vocab} d={dim}", dev.name());
        let mut want = vec![0.0f32; tokens * dim];
        reference::embedding(&table, vocab, &id, &mut want).unwrap();
        let tt = Tensor::from_slice(&table, &[vocab, dim], dev).unwrap();
        let it = Tensor::from_slice(&id, &[tokens], dev).unwrap();
        let got = embedding(&tt, &it, DType::F32).unwrap().to_vec::<f32>().unwrap();
        assert_bits(&got, &want, &format!("{ctx} forward f32"));
        let got = embedding(&tt, &it, DType::BF16).unwrap().to_vec::<bf16>().unwrap();
        let want_bf: Vec<bf16> = want.iter().map(|&x| to_bf16(x)).collect();
        assert_eq!(got, want_bf, "{ctx}: forward bf16");

        // Gradient: fresh, and accumulated into a random gradient; twice (same bits).
        let dout = random(tokens * dim, seed + 2);
        let dt = Tensor::from_slice(&dout, &[tokens, dim], dev).unwrap();
        let mut want_g = vec![0.0f32; vocab * dim];
        reference::embedding_backward(&id, &dout, &mut want_g, vocab, false).unwrap();
        // The model's order: += row by row in token order, from zeros.
        let mut model = vec![0.0f32; vocab * dim];
        for (t, &v) in id.iter().enumerate() {
            for c in 0..dim {
                model[v as usize * dim + c] += dout[t * dim + c];
            }
        }
        assert_bits(&want_g, &model, &format!("{ctx}: reference vs the model's loop"));
        for run in 0..2 {
            let got = embedding_backward(&it, &dt, vocab).unwrap().to_vec::<f32>().unwrap();
            assert_bits(&got, &want_g, &format!("{ctx} backward run {run}"));
        }
        let start = random(vocab * dim, seed + 3);
        let mut want_acc = start.clone();
        reference::embedding_backward(&id, &dout, &mut want_acc, vocab, true).unwrap();
        let mut acc = Tensor::from_slice(&start, &[vocab, dim], dev).unwrap();
        let check = embedding_backward_into(&it, &dt, &mut acc).unwrap();
        assert_eq!(check.status().unwrap(), IdStatus { bad: 0, first: None });
        assert_bits(&acc.to_vec::<f32>().unwrap(), &want_acc, &format!("{ctx} backward accumulate"));
    }
}

/// Ids out of range: a zero row / a skipped gradient row on the device, the status says so, and
/// the checked ops give the same error on every device.
fn bad_ids_same_outcome(devs: &[Device]) {
    let (vocab, dim) = (37, 8);
    let table = random(vocab * dim, 9);
    let id = [3, 37, 0, -1, 36, 37];
    let dout = random(id.len() * dim, 10);
    let mut outcomes = Vec::new();
    for dev in devs {
        let tt = Tensor::from_slice(&table, &[vocab, dim], dev).unwrap();
        let it = Tensor::from_slice(&id, &[id.len()], dev).unwrap();
        let dt = Tensor::from_slice(&dout, &[id.len(), dim], dev).unwrap();
        let e1 = embedding(&tt, &it, DType::F32).unwrap_err();
        let e2 = embedding_backward(&it, &dt, vocab).unwrap_err();
        assert!(matches!(e1, Error::InvalidArgument(_)), "{e1}");
        let (out, check) = embedding_deferred(&tt, &it, DType::F32).unwrap();
        assert_eq!(check.status().unwrap(), IdStatus { bad: 3, first: Some(1) }, "{}", dev.name());
        let out = out.to_vec::<f32>().unwrap();
        assert!(out[dim..2 * dim].iter().all(|&v| v == 0.0), "a bad id's row is zeros");
        assert_eq!(out[..dim], table[3 * dim..4 * dim]);
        let mut g = Tensor::from_slice(&vec![0.0f32; vocab * dim], &[vocab, dim], dev).unwrap();
        embedding_backward_into(&it, &dt, &mut g).unwrap();
        let mut want = vec![0.0f32; vocab * dim];
        reference::embedding_backward(&id, &dout, &mut want, vocab, true).unwrap();
        assert_bits(&g.to_vec::<f32>().unwrap(), &want, "bad ids skipped");
        // Shapes and dtypes.
        let short = Tensor::from_slice(&dout[..dim], &[1, dim], dev).unwrap();
        let e3 = embedding_backward(&it, &short, vocab).unwrap_err();
        let as_f32 = Tensor::from_slice(&[1.0f32], &[1], dev).unwrap();
        let e4 = embedding(&tt, &as_f32, DType::F32).unwrap_err();
        let e5 = embedding(&tt, &it.narrow(0, 0, 1).unwrap(), DType::I32).unwrap_err();
        outcomes.push([e1, e2, e3, e4, e5].map(|e| e.to_string()));
    }
    for o in &outcomes[1..] {
        assert_eq!(o, &outcomes[0]);
    }
    assert!(outcomes[0][0].contains("3 token ids outside [0, 37) (first at position 1)"), "{}", outcomes[0][0]);
}

/// (rows, d): one row, d % 4 != 0, d over 128 (several quads per lane), rows over 64 (two
/// backward blocks, the second partial).
const NORM_CASES: [(usize, usize); 5] = [(1, 16), (3, 13), (70, 64), (9, 264), (130, 7)];

fn rmsnorm_matches_reference(dev: &Device) {
    let eps = 1e-5;
    for (ci, &(rows, d)) in NORM_CASES.iter().enumerate() {
        let seed = 100 + ci as u64;
        let (x, r, g) = (random(rows * d, seed), random(rows * d, seed + 1), random(d, seed + 2));
        let ctx = format!("{} rows={rows} d={d}", dev.name());
        let (xt, rt, gt) = (
            Tensor::from_slice(&x, &[rows, d], dev).unwrap(),
            Tensor::from_slice(&r, &[rows, d], dev).unwrap(),
            Tensor::from_slice(&g, &[d], dev).unwrap(),
        );
        // Plain.
        let (mut y, mut inv) = (vec![0.0f32; rows * d], vec![0.0f32; rows]);
        reference::rmsnorm(&x, None, &g, eps, &mut y, &mut inv).unwrap();
        let out = rmsnorm(&xt, &gt, eps, DType::F32).unwrap();
        assert_bits(&out.y.to_vec::<f32>().unwrap(), &y, &format!("{ctx} y"));
        assert_bits(&out.inv_rms.to_vec::<f32>().unwrap(), &inv, &format!("{ctx} inv"));
        let ob = rmsnorm(&xt, &gt, eps, DType::BF16).unwrap();
        assert_eq!(ob.y.to_vec::<bf16>().unwrap(), y.iter().map(|&v| to_bf16(v)).collect::<Vec<_>>(), "{ctx} bf16");
        // Fused residual.
        let (mut yf, mut invf, mut sum) = (vec![0.0f32; rows * d], vec![0.0f32; rows], vec![0.0f32; rows * d]);
        reference::rmsnorm(&x, Some((&r, &mut sum)), &g, eps, &mut yf, &mut invf).unwrap();
        let of = add_rmsnorm(&xt, &rt, &gt, eps, DType::F32).unwrap();
        assert_bits(&of.sum.as_ref().unwrap().to_vec::<f32>().unwrap(), &sum, &format!("{ctx} fused sum"));
        assert_bits(&of.y.to_vec::<f32>().unwrap(), &yf, &format!("{ctx} fused y"));
        assert_bits(&of.inv_rms.to_vec::<f32>().unwrap(), &invf, &format!("{ctx} fused inv"));

        // Backward, with and without the residual gradient, fresh and accumulated.
        let (dy, dres, dg0) = (random(rows * d, seed + 3), random(rows * d, seed + 4), random(d, seed + 5));
        let (dyt, drt) =
            (Tensor::from_slice(&dy, &[rows, d], dev).unwrap(), Tensor::from_slice(&dres, &[rows, d], dev).unwrap());
        for with_res in [false, true] {
            let (mut dx, mut dg) = (vec![0.0f32; rows * d], vec![0.0f32; d]);
            let res = with_res.then_some(dres.as_slice());
            reference::rmsnorm_backward(&x, &g, &inv, &dy, res, &mut dx, &mut dg, false).unwrap();
            let gr = rmsnorm_backward(&xt, &gt, &out.inv_rms, &dyt, with_res.then_some(&drt)).unwrap();
            assert_bits(&gr.grad_x.to_vec::<f32>().unwrap(), &dx, &format!("{ctx} dx res={with_res}"));
            assert_bits(&gr.grad_weight.to_vec::<f32>().unwrap(), &dg, &format!("{ctx} dg res={with_res}"));
            let mut dga = dg0.clone();
            reference::rmsnorm_backward(&x, &g, &inv, &dy, res, &mut dx, &mut dga, true).unwrap();
            let mut dgt = Tensor::from_slice(&dg0, &[d], dev).unwrap();
            let dxt = rmsnorm_backward_into(&xt, &gt, &out.inv_rms, &dyt, with_res.then_some(&drt), &mut dgt).unwrap();
            assert_bits(&dxt.to_vec::<f32>().unwrap(), &dx, &format!("{ctx} dx accumulate"));
            assert_bits(&dgt.to_vec::<f32>().unwrap(), &dga, &format!("{ctx} dg accumulate"));
        }
    }
}

/// Views at an odd element offset take the kernels' scalar paths: the same bits.
fn unaligned_views_match(dev: &Device) {
    let (rows, d) = (5, 12);
    let all = random((rows + 1) * d + 1, 7);
    let g = Tensor::from_slice(&random(d, 8), &[d], dev).unwrap();
    let base = Tensor::from_slice(&all, &[all.len()], dev).unwrap();
    let x = base.narrow(0, 1, rows * d).unwrap().reshape(&[rows, d]).unwrap();
    let x_cpu = Tensor::from_slice(&all[1..1 + rows * d], &[rows, d], &Device::Cpu).unwrap();
    let g_cpu = Tensor::from_slice(&g.to_vec::<f32>().unwrap(), &[d], &Device::Cpu).unwrap();
    let want = rmsnorm(&x_cpu, &g_cpu, 1e-6, DType::F32).unwrap();
    let got = rmsnorm(&x, &g, 1e-6, DType::F32).unwrap();
    assert_bits(&got.y.to_vec::<f32>().unwrap(), &want.y.to_vec::<f32>().unwrap(), "unaligned rmsnorm");
    let s = add(&x, &x).unwrap();
    assert_bits(&s.to_vec::<f32>().unwrap(), &add(&x_cpu, &x_cpu).unwrap().to_vec::<f32>().unwrap(), "unaligned add");
    let table = base.narrow(0, 1, rows * d).unwrap().reshape(&[rows, d]).unwrap();
    let id = Tensor::from_slice(&[4i32, 0, 4], &[3], dev).unwrap();
    let id_cpu = Tensor::from_slice(&[4i32, 0, 4], &[3], &Device::Cpu).unwrap();
    assert_bits(
        &embedding(&table, &id, DType::F32).unwrap().to_vec::<f32>().unwrap(),
        &embedding(&x_cpu, &id_cpu, DType::F32).unwrap().to_vec::<f32>().unwrap(),
        "unaligned embedding",
    );
}

fn add_matches_reference(dev: &Device) {
    for n in [1usize, 7, 1001] {
        let (a, b) = (random(n, n as u64), random(n, n as u64 + 1));
        let mut want = vec![0.0f32; n];
        reference::add(&a, &b, &mut want).unwrap();
        let got =
            add(&Tensor::from_slice(&a, &[n], dev).unwrap(), &Tensor::from_slice(&b, &[n], dev).unwrap()).unwrap();
        assert_bits(&got.to_vec::<f32>().unwrap(), &want, &format!("{} add n={n}", dev.name()));
    }
}

/// (rows, n_heads, head_dim): one head; half % 4 == 0 (vector path) and half = 3 (scalar).
const ROPE_CASES: [(usize, usize, usize); 4] = [(1, 1, 8), (5, 2, 6), (17, 3, 16), (4, 1, 2)];

fn rope_matches_reference(dev: &Device) {
    let max_pos = 40;
    for (ci, &(rows, heads, hd)) in ROPE_CASES.iter().enumerate() {
        let width = 3 * heads * hd;
        let x = random(rows * width, 200 + ci as u64);
        // Decode-style positions: an offset plus the row, and a repeated position.
        let pos: Vec<i32> = (0..rows).map(|r| ((7 + r * 3) % max_pos) as i32).collect();
        let rope = Rope::new(hd, max_pos, 10000.0, dev).unwrap();
        let pt = Tensor::from_slice(&pos, &[rows], dev).unwrap();
        let ctx = format!("{} rows={rows} heads={heads} hd={hd}", dev.name());
        for inverse in [false, true] {
            let mut want = x.clone();
            reference::rope(&mut want, width, 2 * heads, rope.table(), &pos, inverse).unwrap();
            let mut xt = Tensor::from_slice(&x, &[rows, width], dev).unwrap();
            rope.apply(&mut xt, 2 * heads, &pt, inverse).unwrap();
            let got = xt.to_vec::<f32>().unwrap();
            assert_bits(&got, &want, &format!("{ctx} inverse={inverse}"));
            assert_eq!(bits(&got[2 * heads * hd..width]), bits(&x[2 * heads * hd..width]), "{ctx}: v untouched");
        }
    }
}

fn rope_bad_inputs_same_outcome(devs: &[Device]) {
    let mut outcomes = Vec::new();
    for dev in devs {
        let rope = Rope::new(4, 8, 10000.0, dev).unwrap();
        let x = random(3 * 12, 5);
        let mut xt = Tensor::from_slice(&x, &[3, 12], dev).unwrap();
        let pt = Tensor::from_slice(&[0i32, 8, 2], &[3], dev).unwrap();
        let e1 = rope.apply(&mut xt, 2, &pt, false).unwrap_err().to_string();
        let got = xt.to_vec::<f32>().unwrap();
        assert_eq!(bits(&got[12..24]), bits(&x[12..24]), "the row at a bad position is untouched");
        let e2 = rope.apply(&mut xt, 4, &pt, false).unwrap_err().to_string();
        let short = Tensor::from_slice(&[0i32, 1], &[2], dev).unwrap();
        let e3 = rope.apply(&mut xt, 2, &short, false).unwrap_err().to_string();
        outcomes.push([e1, e2, e3]);
    }
    for o in &outcomes[1..] {
        assert_eq!(o, &outcomes[0]);
    }
    assert!(outcomes[0][0].contains("1 RoPE positions outside [0, 8)"), "{}", outcomes[0][0]);
}

fn norm_bad_inputs_same_outcome(devs: &[Device]) {
    let mut outcomes = Vec::new();
    for dev in devs {
        let x = Tensor::from_slice(&random(12, 1), &[3, 4], dev).unwrap();
        let g3 = Tensor::from_slice(&random(3, 2), &[3], dev).unwrap();
        let g4 = Tensor::from_slice(&random(4, 2), &[4], dev).unwrap();
        let xi = Tensor::from_slice(&[1i32; 12], &[3, 4], dev).unwrap();
        let inv2 = Tensor::from_slice(&random(2, 3), &[2], dev).unwrap();
        let o = [
            rmsnorm(&x, &g3, 1e-6, DType::F32).unwrap_err(),
            rmsnorm(&xi, &g4, 1e-6, DType::F32).unwrap_err(),
            rmsnorm(&x, &g4, 1e-6, DType::I32).unwrap_err(),
            add_rmsnorm(&x, &x.reshape(&[4, 3]).unwrap(), &g4, 1e-6, DType::F32).unwrap_err(),
            rmsnorm_backward(&x, &g4, &inv2, &x, None).unwrap_err(),
            add(&x, &x.reshape(&[12]).unwrap()).unwrap_err(),
        ];
        outcomes.push(o.map(|e| e.to_string()));
    }
    for o in &outcomes[1..] {
        assert_eq!(o, &outcomes[0]);
    }
}

fn emulator(test: &str, order: BlockOrder) -> Option<Device> {
    emulator_or_skip(test, &[&NORM], order).map(Device::Emulated)
}

#[test]
fn emu_embedding_and_gradient_match_reference_bitwise() {
    for order in [BlockOrder::InOrder, BlockOrder::Reversed, BlockOrder::Shuffled(3)] {
        let Some(dev) = emulator("emu_embedding_and_gradient_match_reference_bitwise", order) else { return };
        embedding_matches_reference(&dev);
    }
}

#[test]
fn emu_bad_ids_same_outcome_on_every_device() {
    let Some(dev) = emulator("emu_bad_ids_same_outcome_on_every_device", BlockOrder::Reversed) else { return };
    bad_ids_same_outcome(&[Device::Cpu, dev]);
}

#[test]
fn emu_rmsnorm_forward_backward_match_reference_bitwise() {
    for order in [BlockOrder::InOrder, BlockOrder::Reversed] {
        let Some(dev) = emulator("emu_rmsnorm_forward_backward_match_reference_bitwise", order) else { return };
        rmsnorm_matches_reference(&dev);
    }
}

#[test]
fn emu_unaligned_views_match() {
    let Some(dev) = emulator("emu_unaligned_views_match", BlockOrder::InOrder) else { return };
    unaligned_views_match(&dev);
}

#[test]
fn emu_add_matches_reference_bitwise() {
    let Some(dev) = emulator("emu_add_matches_reference_bitwise", BlockOrder::Reversed) else { return };
    add_matches_reference(&dev);
}

#[test]
fn emu_rope_matches_reference_bitwise() {
    let Some(dev) = emulator("emu_rope_matches_reference_bitwise", BlockOrder::Shuffled(5)) else { return };
    rope_matches_reference(&dev);
}

#[test]
fn emu_rope_bad_inputs_same_outcome_on_every_device() {
    let Some(dev) = emulator("emu_rope_bad_inputs_same_outcome_on_every_device", BlockOrder::InOrder) else { return };
    rope_bad_inputs_same_outcome(&[Device::Cpu, dev]);
}

#[test]
fn emu_norm_bad_inputs_same_outcome_on_every_device() {
    let Some(dev) = emulator("emu_norm_bad_inputs_same_outcome_on_every_device", BlockOrder::InOrder) else { return };
    norm_bad_inputs_same_outcome(&[Device::Cpu, dev]);
}

fn gpu(test: &str) -> Option<Device> {
    gpu_or_skip(test, &[&NORM])?;
    Some(Device::Cuda(CudaDevice::new(0).unwrap()))
}

#[test]
#[ignore = "needs a GPU: cargo test -- --include-ignored gpu_ (the GPU bundle does)"]
fn gpu_norm_kernels_match_reference_bitwise() {
    let Some(dev) = gpu("gpu_norm_kernels_match_reference_bitwise") else { return };
    embedding_matches_reference(&dev);
    rmsnorm_matches_reference(&dev);
    unaligned_views_match(&dev);
    add_matches_reference(&dev);
    rope_matches_reference(&dev);
    bad_ids_same_outcome(&[Device::Cpu, dev.clone()]);
    rope_bad_inputs_same_outcome(&[Device::Cpu, dev.clone()]);
    norm_bad_inputs_same_outcome(&[Device::Cpu, dev]);
}
