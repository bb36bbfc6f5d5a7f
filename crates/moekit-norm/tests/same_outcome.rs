//! Random (often bad) inputs: every op gives the same outcome on the CPU and on the emulator
//! (the same error message, or the same bits), empty shapes and ids out of range included.

use moekit_cuda::testing::emulator_or_skip;
use moekit_cuda::BlockOrder;
use moekit_norm::kernels::NORM;
use moekit_norm::{
    add, add_rmsnorm, embedding, embedding_backward, embedding_deferred, rmsnorm, rmsnorm_backward, Rope,
};
use moekit_tensor::{DType, Device, Tensor};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Case {
    vocab: usize,
    dim: usize,
    table_rows: usize,
    ids: Vec<i32>,
    rows: usize,
    weight_len: usize,
    bf16: bool,
    heads: usize,
    head_dim: usize,
    max_pos: usize,
    positions: Vec<i32>,
    seed: u64,
}

fn case() -> impl Strategy<Value = Case> {
    (1usize..40, 1usize..20, 0usize..24, 0usize..10, any::<bool>(), 0usize..4, 1usize..9, 1usize..12, any::<u64>())
        .prop_flat_map(|(vocab, dim, tokens, rows, bf16, heads, head_dim, max_pos, seed)| {
            (
                Just((vocab, dim, rows, bf16, heads, head_dim, max_pos, seed)),
                prop_oneof![Just(vocab), Just(vocab), Just(vocab + 1)],
                proptest::collection::vec(-2i32..vocab as i32 + 2, tokens),
                prop_oneof![Just(dim), Just(dim), Just(dim + 1)],
                proptest::collection::vec(-1i32..max_pos as i32 + 1, rows),
            )
        })
        .prop_map(
            |((vocab, dim, rows, bf16, heads, head_dim, max_pos, seed), table_rows, ids, weight_len, positions)| Case {
                vocab,
                dim,
                table_rows,
                ids,
                rows,
                weight_len,
                bf16,
                heads,
                head_dim,
                max_pos,
                positions,
                seed,
            },
        )
}

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect()
}

fn outcome(t: moekit_cuda::Result<Tensor>) -> String {
    match t {
        Ok(t) => match t.dtype() {
            DType::BF16 => format!(
                "{:?}",
                t.to_vec::<moekit_dtype::bf16>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            ),
            _ => format!("{:?}", t.to_vec::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>()),
        },
        Err(e) => format!("error: {e}"),
    }
}

fn run(c: &Case, dev: &Device) -> Vec<String> {
    let mut out = Vec::new();
    let dtype = if c.bf16 { DType::BF16 } else { DType::F32 };
    let table = Tensor::from_slice(&values(c.table_rows * c.dim, c.seed), &[c.table_rows, c.dim], dev).unwrap();
    let ids = Tensor::from_slice(&c.ids, &[c.ids.len()], dev).unwrap();
    out.push(outcome(embedding(&table, &ids, dtype)));
    out.push(match embedding_deferred(&table, &ids, dtype) {
        Ok((_, check)) => format!("{:?}", check.status().unwrap()),
        Err(e) => format!("error: {e}"),
    });
    let dout = Tensor::from_slice(&values(c.ids.len() * c.dim, c.seed + 1), &[c.ids.len(), c.dim], dev).unwrap();
    out.push(outcome(embedding_backward(&ids, &dout, c.vocab)));

    let x = Tensor::from_slice(&values(c.rows * c.dim, c.seed + 2), &[c.rows, c.dim], dev).unwrap();
    let r = Tensor::from_slice(&values(c.rows * c.dim, c.seed + 3), &[c.rows, c.dim], dev).unwrap();
    let g = Tensor::from_slice(&values(c.weight_len, c.seed + 4), &[c.weight_len], dev).unwrap();
    out.push(match rmsnorm(&x, &g, 1e-6, dtype) {
        Ok(n) => {
            let dy = Tensor::from_slice(&values(c.rows * c.dim, c.seed + 5), &[c.rows, c.dim], dev).unwrap();
            let grads = rmsnorm_backward(&x, &g, &n.inv_rms, &dy, Some(&r));
            format!(
                "{} {} {}",
                outcome(Ok(n.y)),
                outcome(Ok(n.inv_rms)),
                match grads {
                    Ok(gr) => format!("{} {}", outcome(Ok(gr.grad_x)), outcome(Ok(gr.grad_weight))),
                    Err(e) => format!("error: {e}"),
                }
            )
        }
        Err(e) => format!("error: {e}"),
    });
    out.push(match add_rmsnorm(&x, &r, &g, 1e-6, DType::F32) {
        Ok(n) => format!("{} {}", outcome(Ok(n.y)), outcome(Ok(n.sum.unwrap()))),
        Err(e) => format!("error: {e}"),
    });
    out.push(outcome(add(&x, &r)));

    let width = 3 * c.heads.max(1) * c.head_dim;
    out.push(match Rope::new(c.head_dim, c.max_pos, 10000.0, dev) {
        Ok(rope) => {
            let mut q = Tensor::from_slice(&values(c.rows * width, c.seed + 6), &[c.rows, width], dev).unwrap();
            let pos = Tensor::from_slice(&c.positions, &[c.positions.len()], dev).unwrap();
            let res = rope.apply(&mut q, 2 * c.heads, &pos, false);
            format!("{res:?} {}", outcome(Ok(q)))
        }
        Err(e) => format!("error: {e}"),
    });
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn emu_random_inputs_give_the_same_outcome_on_cpu_and_emulator(c in case()) {
        let Some(emu) = emulator_or_skip("emu_random_inputs_give_the_same_outcome_on_cpu_and_emulator", &[&NORM], BlockOrder::Reversed) else {
            return Ok(());
        };
        let want = run(&c, &Device::Cpu);
        let got = run(&c, &Device::Emulated(emu));
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            prop_assert_eq!(a, b, "op {} (emulator first)", i);
        }
    }
}
