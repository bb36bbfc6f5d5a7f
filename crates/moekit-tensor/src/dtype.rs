//! Element types a tensor can hold.

use moekit_dtype::{bf16, F8E4M3, F8E5M2};

/// A tensor's element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// bfloat16.
    BF16,
    /// FP8 E4M3 (OCP "fn": no infinities, NaN = S.1111.111, max 448).
    F8E4M3,
    /// FP8 E5M2 (IEEE-like, max 57344).
    F8E5M2,
    /// 32-bit signed integer (ids, counts, offsets).
    I32,
    /// Byte.
    U8,
}

impl DType {
    /// Bytes per element.
    pub const fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::BF16 => 2,
            DType::F8E4M3 | DType::F8E5M2 | DType::U8 => 1,
        }
    }

    /// Lower-case name (`f32`, `bf16`, `f8e4m3`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F8E4M3 => "f8e4m3",
            DType::F8E5M2 => "f8e5m2",
            DType::I32 => "i32",
            DType::U8 => "u8",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A Rust type that is the element type of some [`DType`].
pub trait Element: bytemuck::Pod + Send + Sync + 'static {
    /// The matching dtype.
    const DTYPE: DType;
}

macro_rules! element {
    ($($t:ty => $d:ident),*) => {$(impl Element for $t { const DTYPE: DType = DType::$d; })*};
}
element!(f32 => F32, bf16 => BF16, F8E4M3 => F8E4M3, F8E5M2 => F8E5M2, i32 => I32, u8 => U8);
