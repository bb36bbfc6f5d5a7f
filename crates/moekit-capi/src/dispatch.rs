//! Dispatch layout, permute (BF16 or fused FP8), FP8 quantization, SwiGLU and combine
//! (`moekit-dispatch`).

use crate::*;
use moekit_dispatch::{raw, reference, ActFormat, DispatchConfig, Padding, ScaleKind};
use moekit_dtype::bf16;

/// f32 scales `amax / 448`.
pub const MOEKIT_SCALE_F32: i32 = 0;
/// Power-of-two (UE8M0) scales, stored as f32.
pub const MOEKIT_SCALE_UE8M0: i32 = 1;

/// A dispatch configuration (see `moekit_dispatch::DispatchConfig`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct MoekitDispatchConfig {
    /// Experts E, 1..=1024.
    pub experts: u32,
    /// Slots per token k, 1..=16.
    pub top_k: u32,
    /// Segment alignment in rows: 1, 16, 32, 64 or 128 (DeepGEMM's contiguous layout).
    pub align: u32,
    /// 1: permute writes zero rows (and zero-tile scales) into the padding rows inside segments
    /// (for k-grouped GEMM inputs); 0: padding rows are not written.
    pub zero_padding: i32,
}

/// The format of an activation a kernel writes: BF16, or FP8 E4M3 with one f32 scale per
/// 1x128 tile (`scales` of `[rows, cols / 128]` row-major, or MN-major
/// `[cols / 128, round_up(rows, 4)]`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct MoekitActFormat {
    /// `MOEKIT_DTYPE_BF16` or `MOEKIT_DTYPE_FP8_E4M3`.
    pub dtype: i32,
    /// FP8: `MOEKIT_SCALE_F32` or `MOEKIT_SCALE_UE8M0` (ignored for BF16).
    pub scale_kind: i32,
    /// FP8: `MOEKIT_LAYOUT_ROW_MAJOR` or `MOEKIT_LAYOUT_MN_MAJOR` (ignored for BF16).
    pub scale_layout: i32,
}

fn dispatch_config(cfg: *const MoekitDispatchConfig) -> R<DispatchConfig> {
    let c = by_ref("config", cfg)?;
    let padding = if flag("zero_padding", c.zero_padding)? { Padding::Zero } else { Padding::Skip };
    let cfg =
        DispatchConfig::new(c.experts as usize, c.top_k as usize).with_align(c.align as usize).with_padding(padding);
    cfg.validate()?;
    Ok(cfg)
}

fn act_format(f: *const MoekitActFormat) -> R<ActFormat> {
    let f = by_ref("format", f)?;
    match f.dtype {
        MOEKIT_DTYPE_BF16 => Ok(ActFormat::Bf16),
        MOEKIT_DTYPE_FP8_E4M3 => {
            let kind = match f.scale_kind {
                MOEKIT_SCALE_F32 => ScaleKind::F32,
                MOEKIT_SCALE_UE8M0 => ScaleKind::Ue8m0,
                k => return invalid(format!("scale_kind = {k} (0 = f32, 1 = UE8M0)")),
            };
            Ok(ActFormat::Fp8(kind, scale_layout(f.scale_layout)?))
        }
        d => Err(Error::Dtype {
            what: "activation format".into(),
            expected: "MOEKIT_DTYPE_BF16 or MOEKIT_DTYPE_FP8_E4M3".into(),
            got: format!("dtype {d}"),
        }
        .into()),
    }
}

/// A `[rows, cols]` activation output: data bytes and (FP8) scales.
struct ActBufs {
    format: ActFormat,
    data: Buf<u8>,
    scales: Option<Buf<f32>>,
}

impl ActBufs {
    fn new(format: ActFormat, rows: u64, cols: u64, data: *mut c_void, scales: *mut f32) -> R<ActBufs> {
        let bytes = elems("out", &[rows, cols, format.elem_bytes() as u64])?;
        let scale_len = match format {
            ActFormat::Bf16 => 0,
            ActFormat::Fp8(_, l) => l.len(elems("rows", &[rows])?, elems("cols", &[cols])?),
        };
        Ok(ActBufs {
            format,
            data: output("out", data.cast(), bytes)?,
            scales: opt_output("scales", scales, scale_len)?,
        })
    }
    fn dev<'a>(&self, x: &Exec) -> raw::ActOut<'a> {
        raw::ActOut {
            data: self.data.dev_mut(x),
            scales: self.scales.as_ref().map(|s| s.dev_mut(x)),
            format: self.format,
        }
    }
    fn spans(&self) -> Vec<Span> {
        std::iter::once(self.data.span()).chain(self.scales.iter().map(Buf::span)).collect()
    }
    /// Host slices (the raw layer checked that scales are given exactly for FP8).
    fn host(&self) -> (&mut [u8], &mut [f32]) {
        (self.data.host_mut(), self.scales.as_ref().map_or(&mut [][..], |s| s.host_mut()))
    }
}

/// Upper bound of the rows a dispatch of `tokens` tokens can use (`T k + min(E, T k) (align - 1)`),
/// the `max_rows` to size every row-indexed buffer with, known without reading the ids.
#[no_mangle]
pub extern "C" fn moekit_dispatch_max_rows(tokens: u64, top_k: u32, experts: u32, align: u32) -> u64 {
    let pairs = tokens.saturating_mul(top_k as u64);
    pairs.saturating_add((experts as u64).min(pairs).saturating_mul((align.max(1) - 1) as u64))
}

/// Elements (int32) of the scratch buffer [`moekit_dispatch_layout`] needs.
#[no_mangle]
pub extern "C" fn moekit_dispatch_layout_scratch_len(tokens: u64, top_k: u32, experts: u32) -> u64 {
    let pairs = tokens.saturating_mul(top_k as u64);
    pairs.div_ceil(raw::CHUNK_PAIRS as u64).max(1).saturating_mul(experts as u64 + 1)
}

/// The dispatch layout of `topk_ids [T, k]` (int32, -1 = not routed): writes `offsets [E + 1]`
/// (aligned segment starts; `offsets[E]` = rows used), `counts [E]` (pairs per expert),
/// `row_map [T, k]` (row of each pair, -1: not routed or past `max_rows`), `m_indices
/// [max_rows]` (expert of each row, -1 for padding) and `status [2]` (ids outside `[-1, E)`,
/// which are skipped; rows needed, > `max_rows` when rows were dropped). Rows inside an expert
/// are in (token, slot) order. `scratch` has [`moekit_dispatch_layout_scratch_len`] int32
/// elements (used on the GPU and the emulator; checked everywhere). All buffers int32.
///
/// # Safety
/// As for `moekit_route`.
#[no_mangle]
pub unsafe extern "C" fn moekit_dispatch_layout(
    device: MoekitDevice,
    config: *const MoekitDispatchConfig,
    topk_ids: *const i32,
    tokens: u64,
    max_rows: u64,
    scratch: *mut i32,
    offsets: *mut i32,
    counts: *mut i32,
    row_map: *mut i32,
    m_indices: *mut i32,
    status: *mut i32,
) -> i32 {
    run(device, |x| {
        let cfg = dispatch_config(config)?;
        let (e, k) = (cfg.experts as u32, cfg.top_k as u32);
        let pairs = elems("topk_ids", &[tokens, k as u64])?;
        let ids = input("topk_ids", topk_ids, pairs)?;
        let scratch_len = moekit_dispatch_layout_scratch_len(tokens, k, e);
        let scratch = output("scratch", scratch, elems("scratch", &[scratch_len])?)?;
        let offsets = output("offsets", offsets, e as usize + 1)?;
        let counts = output("counts", counts, e as usize)?;
        let row_map = output("row_map", row_map, pairs)?;
        let m_indices = output("m_indices", m_indices, elems("m_indices", &[max_rows])?)?;
        let status = output("status", status, 2)?;
        disjoint(&[
            ids.span(),
            scratch.span(),
            offsets.span(),
            counts.span(),
            row_map.span(),
            m_indices.span(),
            status.span(),
        ])?;
        let out = raw::LayoutOut {
            offsets: offsets.dev_mut(x),
            counts: counts.dev_mut(x),
            row_map: row_map.dev_mut(x),
            m_indices: m_indices.dev_mut(x),
            status: status.dev_mut(x),
        };
        raw::layout(x.launcher(), &cfg, ids.dev(x), scratch.dev_mut(x), out)?;
        if x.is_cpu() {
            let l = reference::layout(ids.host(), &cfg, m_indices.len())?;
            offsets.host_mut().copy_from_slice(&l.offsets);
            counts.host_mut().copy_from_slice(&l.counts);
            row_map.host_mut().copy_from_slice(&l.row_map);
            m_indices.host_mut().copy_from_slice(&l.m_indices);
            status.host_mut().copy_from_slice(&[l.invalid_ids as i32, l.offsets[cfg.experts]]);
        }
        Ok(())
    })
}

/// The expert of each row implied by a layout's `offsets` and `counts` (-1: padding), as
/// `moekit_dispatch_layout` writes it.
fn rows_of(offsets: &[i32], counts: &[i32], max_rows: usize) -> Vec<i32> {
    let mut m = vec![-1; max_rows];
    for (e, (&o, &c)) in offsets.iter().zip(counts).enumerate() {
        let lo = (o.max(0) as usize).min(max_rows);
        let hi = (o.max(0) as usize).saturating_add(c.max(0) as usize).min(max_rows);
        m[lo..hi].fill(e as i32);
    }
    m
}

/// Permutes `x [T, hidden]` (BF16) to the rows of a layout (`row_map [T, k]`, `offsets
/// [E + 1]`, `counts [E]`, int32, from `moekit_dispatch_layout`): `out [max_rows, hidden]` in
/// `format` (BF16 copies the bits; FP8 E4M3 quantizes per 1x128 tile in the same pass, `scales`
/// per the format, NULL for BF16). Padding rows inside segments per `zero_padding`; rows at and
/// past `offsets[E]` are never written. `x` and `out` 16-byte aligned; `hidden` a multiple of 8
/// (BF16) or 128 (FP8).
///
/// # Safety
/// As for `moekit_route`.
#[no_mangle]
pub unsafe extern "C" fn moekit_permute(
    device: MoekitDevice,
    config: *const MoekitDispatchConfig,
    x: *const u16,
    tokens: u64,
    hidden: u64,
    row_map: *const i32,
    offsets: *const i32,
    counts: *const i32,
    max_rows: u64,
    format: *const MoekitActFormat,
    out: *mut c_void,
    scales: *mut f32,
) -> i32 {
    run(device, |dev| {
        let cfg = dispatch_config(config)?;
        let e = cfg.experts;
        let x = input("x", x.cast::<bf16>(), elems("x", &[tokens, hidden])?)?;
        let row_map = input("row_map", row_map, elems("row_map", &[tokens, cfg.top_k as u64])?)?;
        let offsets = input("offsets", offsets, e + 1)?;
        let counts = input("counts", counts, e)?;
        let out = ActBufs::new(act_format(format)?, max_rows, hidden, out, scales)?;
        let mut spans = vec![x.span(), row_map.span(), offsets.span(), counts.span()];
        spans.extend(out.spans());
        disjoint(&spans)?;
        let (h, rows) = (hidden as usize, max_rows as usize);
        let on = dev.launcher();
        raw::permute(on, &cfg, x.dev(dev), h, row_map.dev(dev), offsets.dev(dev), counts.dev(dev), rows, out.dev(dev))?;
        if dev.is_cpu() {
            let layout = reference::Layout {
                offsets: offsets.host().to_vec(),
                counts: counts.host().to_vec(),
                row_map: row_map.host().to_vec(),
                m_indices: rows_of(offsets.host(), counts.host(), rows),
                invalid_ids: 0,
            };
            let (data, s) = out.host();
            reference::permute(x.host(), h, &layout, cfg.top_k, out.format, cfg.padding, data, s)?;
        }
        Ok(())
    })
}

/// Which row-wise activation kernel.
#[derive(Clone, Copy, PartialEq)]
enum Act {
    Quantize,
    Swiglu,
}

#[allow(clippy::too_many_arguments)]
fn act(
    device: MoekitDevice,
    which: Act,
    x: *const u16,
    rows: u64,
    cols: u64,
    f: *const MoekitActFormat,
    out: *mut c_void,
    scales: *mut f32,
) -> i32 {
    run(device, |dev| {
        let in_cols = if which == Act::Swiglu { cols.saturating_mul(2) } else { cols };
        let x = input("x", x.cast::<bf16>(), elems("x", &[rows, in_cols])?)?;
        let out = ActBufs::new(act_format(f)?, rows, cols, out, scales)?;
        let mut spans = vec![x.span()];
        spans.extend(out.spans());
        disjoint(&spans)?;
        let c = cols as usize;
        match which {
            Act::Quantize => raw::quantize(dev.launcher(), x.dev(dev), c, out.dev(dev))?,
            Act::Swiglu => raw::swiglu(dev.launcher(), x.dev(dev), c, out.dev(dev))?,
        }
        if dev.is_cpu() {
            let (data, s) = out.host();
            match which {
                Act::Quantize => reference::quantize(x.host(), c, out.format, data, s)?,
                Act::Swiglu => reference::swiglu(x.host(), c, out.format, data, s)?,
            }
        }
        Ok(())
    })
}

/// 1x128 FP8 quantization (or a BF16 copy) of `x [rows, cols]` (BF16) into `out [rows, cols]`
/// in `format` (scales per the format; NULL for BF16). `x`, `out` 16-byte aligned.
///
/// # Safety
/// As for `moekit_route`.
#[no_mangle]
pub unsafe extern "C" fn moekit_quantize(
    device: MoekitDevice,
    x: *const u16,
    rows: u64,
    cols: u64,
    format: *const MoekitActFormat,
    out: *mut c_void,
    scales: *mut f32,
) -> i32 {
    act(device, Act::Quantize, x, rows, cols, format, out, scales)
}

/// SwiGLU `silu(gate) * up` of `x [rows, 2 cols]` (BF16, gate columns first) into `out [rows,
/// cols]` in `format` (BF16, or FP8 with 1x128 scales for the down GEMM).
///
/// # Safety
/// As for `moekit_route`.
#[no_mangle]
pub unsafe extern "C" fn moekit_swiglu(
    device: MoekitDevice,
    x: *const u16,
    rows: u64,
    cols: u64,
    format: *const MoekitActFormat,
    out: *mut c_void,
    scales: *mut f32,
) -> i32 {
    act(device, Act::Swiglu, x, rows, cols, format, out, scales)
}

/// Combine: `out [T, hidden] = sum_j w[t, j] y[row_map[t, j]]` (BF16 out, f32 accumulation in
/// slot order) from `y [rows, hidden]` (BF16), `row_map [T, k]` (int32; rows outside `[0,
/// rows)` skipped) and `weights [T, k]` (f32; NULL: unweighted, the backward of dispatch).
/// `y`, `out` 16-byte aligned; `hidden` a multiple of 8.
///
/// # Safety
/// As for `moekit_route`.
#[no_mangle]
pub unsafe extern "C" fn moekit_combine(
    device: MoekitDevice,
    y: *const u16,
    rows: u64,
    hidden: u64,
    row_map: *const i32,
    tokens: u64,
    top_k: u32,
    weights: *const f32,
    out: *mut u16,
) -> i32 {
    run(device, |dev| {
        let pairs = elems("row_map", &[tokens, top_k as u64])?;
        let y = input("y", y.cast::<bf16>(), elems("y", &[rows, hidden])?)?;
        let row_map = input("row_map", row_map, pairs)?;
        let weights = opt_input("weights", weights, pairs)?;
        let out = output("out", out.cast::<bf16>(), elems("out", &[tokens, hidden])?)?;
        let mut spans = vec![y.span(), row_map.span(), out.span()];
        spans.extend(weights.iter().map(Buf::span));
        disjoint(&spans)?;
        let (h, k) = (hidden as usize, top_k as usize);
        raw::combine(
            dev.launcher(),
            y.dev(dev),
            h,
            row_map.dev(dev),
            k,
            weights.as_ref().map(|w| w.dev(dev)),
            out.dev_mut(dev),
        )?;
        if dev.is_cpu() {
            let r = reference::combine(y.host(), h, row_map.host(), k, weights.as_ref().map(|w| w.host()))?;
            out.host_mut().copy_from_slice(&r);
        }
        Ok(())
    })
}
