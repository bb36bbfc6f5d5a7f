//! moekit's router from a plain cudarc program, borrowing everything: the program creates the
//! context and the stream and allocates every buffer with cudarc's safe API; moekit only
//! launches on them (no allocation, no synchronisation, no ownership taken). The program then
//! copies the ids and weights back with cudarc and checks them against the CPU reference, bit
//! for bit.
//!
//! `cargo run --release -p moekit-gating --example plain_cudarc` (on a machine without a GPU it
//! says so and exits 0).

use cudarc::driver::{CudaContext, DevicePtr, DevicePtrMut};
use moekit_cuda::{DevPtr, DevPtrMut, Gpu, Stream};
use moekit_gating::raw::{self, Logits};
use moekit_gating::{reference, RouterConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if !moekit_cuda::driver_available() || moekit_cuda::device_count().unwrap_or(0) == 0 {
        println!("plain_cudarc: no CUDA device here; nothing to run (this example needs a GPU)");
        return Ok(());
    }
    let cfg = RouterConfig::deepseek_v3();
    let tokens = 4096;
    let n = tokens * cfg.experts;
    let logits_host: Vec<f32> =
        (0..n).map(|i| ((i as u32).wrapping_mul(2654435761) >> 8) as f32 / 2097152.0 - 4.0).collect();
    let bias_host: Vec<f32> = (0..cfg.experts).map(|e| (e % 7) as f32 * 1e-3).collect();

    // The program's own context, stream and buffers.
    let ctx = CudaContext::new(0)?;
    let stream = ctx.new_stream()?;
    let logits = stream.clone_htod(&logits_host)?;
    let bias = stream.clone_htod(&bias_host)?;
    let mut ids = stream.alloc_zeros::<i32>(tokens * cfg.top_k)?;
    let mut weights = stream.alloc_zeros::<f32>(tokens * cfg.top_k)?;

    {
        let (logits_ptr, _l) = logits.device_ptr(&stream);
        let (bias_ptr, _b) = bias.device_ptr(&stream);
        let (ids_ptr, _i) = ids.device_ptr_mut(&stream);
        let (w_ptr, _w) = weights.device_ptr_mut(&stream);
        // SAFETY: the context and the stream are cudarc's and outlive this block (ctx and
        // stream are alive until the end of main); moekit's handles only borrow them.
        let gpu = unsafe { Gpu::borrow_context(ctx.cu_ctx()) }?;
        // SAFETY: `stream` belongs to that context and outlives the launch's handle.
        let on = unsafe { Stream::borrowed(&gpu, stream.cu_stream()) };
        // SAFETY: each address is a live cudarc allocation of exactly this many elements on
        // this context, and cudarc's guards (`_l`, ...) keep its stream order for this block.
        let (l, b, i, w) = unsafe {
            (
                DevPtr::<f32>::from_raw(logits_ptr, n),
                DevPtr::<f32>::from_raw(bias_ptr, cfg.experts),
                DevPtrMut::<i32>::from_raw(ids_ptr, tokens * cfg.top_k),
                DevPtrMut::<f32>::from_raw(w_ptr, tokens * cfg.top_k),
            )
        };
        raw::route(&on, &cfg, Logits::F32(l), Some(b), i, w, None)?;
    }

    // cudarc's copy back waits for the stream.
    let ids_host = stream.clone_dtoh(&ids)?;
    let weights_host = stream.clone_dtoh(&weights)?;
    let want = reference::route(&logits_host, Some(&bias_host), &cfg)?;
    let same_ids = ids_host == want.ids;
    let same_weights = weights_host.iter().zip(&want.weights).all(|(a, b)| a.to_bits() == b.to_bits());
    println!("plain_cudarc: {tokens} tokens routed on cudarc's stream; ids equal: {same_ids}, weights bit-equal: {same_weights}");
    if !(same_ids && same_weights) {
        return Err("the GPU routing differs from the CPU reference".into());
    }
    Ok(())
}
