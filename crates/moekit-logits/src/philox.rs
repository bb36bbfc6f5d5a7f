//! Philox4x32-10 (Salmon, Moraes, Dror and Shaw, SC 2011): the Rust twin of
//! `kernels/include/moekit/philox.cuh`, bit for bit (integer arithmetic only). Checked against
//! the Random123 known-answer vectors in this crate's tests, on the emulated kernel too.

/// Round multiplier of words 0 and 2.
pub const M0: u32 = 0xD251_1F53;
/// Round multiplier of words 2 and 3.
pub const M1: u32 = 0xCD9E_8D57;
/// Key increment of word 0 (golden ratio).
pub const W0: u32 = 0x9E37_79B9;
/// Key increment of word 1 (sqrt(3) - 1).
pub const W1: u32 = 0xBB67_AE85;

#[inline(always)]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = a as u64 * b as u64;
    ((p >> 32) as u32, p as u32)
}

/// The block of four words of `ctr` under `key`: ten rounds, the key bumped by `(W0, W1)`
/// between rounds. One round maps `(c0, c1, c2, c3)` to
/// `(hi(M1 c2) ^ c1 ^ k0, lo(M1 c2), hi(M0 c0) ^ c3 ^ k1, lo(M0 c0))`.
pub fn philox4x32_10(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let [mut c0, mut c1, mut c2, mut c3] = ctr;
    let [mut k0, mut k1] = key;
    for round in 0..10 {
        if round > 0 {
            k0 = k0.wrapping_add(W0);
            k1 = k1.wrapping_add(W1);
        }
        let (hi0, lo0) = mulhilo(M0, c0);
        let (hi1, lo1) = mulhilo(M1, c2);
        (c0, c1, c2, c3) = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0);
    }
    [c0, c1, c2, c3]
}

/// A uniform in `[0, 1)` from one output word: `(x >> 8) * 2^-24` (exact in f32; at most
/// `1 - 2^-24`).
pub fn uniform24(x: u32) -> f32 {
    (x >> 8) as f32 * f32::from_bits(0x3380_0000) // 2^-24
}

/// The sampler's counter for `row` at decode `step`: `(row lo, row hi, step lo, step hi)`.
pub fn sample_counter(row: u64, step: u64) -> [u32; 4] {
    [row as u32, (row >> 32) as u32, step as u32, (step >> 32) as u32]
}

/// The sampler's key for `seed`: `(seed lo, seed hi)`.
pub fn sample_key(seed: u64) -> [u32; 2] {
    [seed as u32, (seed >> 32) as u32]
}

/// The uniform the sampler draws for `row` at `step` under `seed`: [`uniform24`] of word 0.
pub fn sample_uniform(seed: u64, row: u64, step: u64) -> f32 {
    uniform24(philox4x32_10(sample_counter(row, step), sample_key(seed))[0])
}
