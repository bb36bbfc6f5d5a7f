//! Stream-ordered memory, the synchronisation counter and graph capture on a GPU (`gpu_*`,
//! ignored: skipped visibly without a GPU, run by the GPU bundle).

use moekit_cuda::testing::gpu_or_skip;
use moekit_cuda::{DeviceBuffer, Error, Gpu, Stream, SyncCounter};
use std::sync::Arc;

fn setup(test: &str) -> Option<(Gpu, Arc<Stream>)> {
    let gpu = gpu_or_skip(test, &[])?;
    let stream = Arc::new(Stream::new(&gpu).unwrap());
    Some((gpu, stream))
}

fn pattern(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32).map(|i| i.wrapping_mul(2_654_435_761).wrapping_add(seed) | 1).collect()
}

#[test]
#[ignore = "needs a GPU: cargo test -- --include-ignored gpu_ (the GPU bundle does)"]
fn gpu_pool_reuses_freed_memory_without_synchronising() {
    let Some((gpu, s)) = setup("gpu_pool_reuses_freed_memory_without_synchronising") else { return };
    if gpu.stream_pool().unwrap().is_none() {
        moekit_cuda::testing::skip_notice("gpu_pool_reuses_freed_memory_without_synchronising", "no memory pools");
        return;
    }
    const N: usize = 1 << 18; // 1 MiB of u32
    drop(DeviceBuffer::<u32>::uninit(&s, N).unwrap());
    s.synchronize().unwrap();
    let reserved = gpu.pool_reserved_bytes().unwrap().unwrap();
    assert!(reserved >= (N * 4) as u64, "the freed MiB stays cached (release threshold): {reserved}");
    let region = SyncCounter::start();
    let first = DeviceBuffer::<u32>::uninit(&s, N).unwrap().addr();
    let mut same_address = 0;
    for _ in 0..100 {
        let b = DeviceBuffer::<u32>::zeros(&s, N).unwrap();
        same_address += (b.addr() == first) as usize;
    }
    assert_eq!(region.count(), 0, "{:?}", region.calls());
    s.synchronize().unwrap();
    let after = gpu.pool_reserved_bytes().unwrap().unwrap();
    // Without reuse the 100 cycles would reserve 100 MiB more; the slack of 32 MiB leaves room
    // for the pool's chunk granularity and for tests running in parallel on the same pool.
    assert!(after <= reserved + (32 << 20), "100 alloc/free cycles reuse the cache: {reserved} -> {after} bytes");
    eprintln!("gpu_pool_reuses_freed_memory: {same_address}/100 allocations at the first address");
}

#[test]
#[ignore = "needs a GPU: cargo test -- --include-ignored gpu_ (the GPU bundle does)"]
fn gpu_async_memset_and_copies_give_the_values() {
    let Some((_gpu, s)) = setup("gpu_async_memset_and_copies_give_the_values") else { return };
    for n in [0usize, 1, 15, 4099] {
        let data = pattern(n, 3);
        // Dirty memory in the pool first, so zeros() really has to clear it.
        drop(DeviceBuffer::from_host(&s, &data).unwrap());
        let region = SyncCounter::start();
        let z = DeviceBuffer::<u32>::zeros(&s, n).unwrap();
        let mut c = DeviceBuffer::<u32>::uninit(&s, n).unwrap();
        let src = DeviceBuffer::from_host(&s, &data).unwrap();
        c.copy_from_device(src.view()).unwrap();
        drop(src);
        assert_eq!(region.count(), 0, "{:?}", region.calls());
        assert_eq!(z.to_host(&s).unwrap(), vec![0u32; n]);
        assert_eq!(c.to_host(&s).unwrap(), data);
        assert_eq!(region.count(), 2, "one point per readback: {:?}", region.calls());
        if n > 4 {
            let mut part = vec![0u32; 3];
            c.copy_range_to_host(&s, 2, &mut part).unwrap();
            assert_eq!(part, data[2..5]);
            let two = DeviceBuffer::from_host(&s, &data[..2]).unwrap();
            assert!(matches!(c.copy_from_device_at(n - 1, two.view()), Err(Error::Shape(_))));
            c.copy_from_device_at(n - 2, two.view()).unwrap();
            assert_eq!(c.to_host(&s).unwrap()[n - 2..], data[..2]);
        }
    }
}

#[test]
#[ignore = "needs a GPU: cargo test -- --include-ignored gpu_ (the GPU bundle does)"]
fn gpu_context_buffers_count_their_synchronisations() {
    let Some((gpu, s)) = setup("gpu_context_buffers_count_their_synchronisations") else { return };
    let region = SyncCounter::start();
    let b = DeviceBuffer::<u8>::zeros(&gpu, 15).unwrap(); // cuMemAlloc, cuMemsetD8 + sync
    assert_eq!(region.count(), 2, "{:?}", region.calls());
    assert_eq!(b.to_host(&s).unwrap(), vec![0u8; 15]);
    drop(b); // cuMemFree
    assert_eq!(region.count(), 4, "{:?}", region.calls());
}

#[test]
#[ignore = "needs a GPU: cargo test -- --include-ignored gpu_ (the GPU bundle does)"]
fn gpu_graph_replays_memsets_copies_and_memory_nodes() {
    let Some((_gpu, s)) = setup("gpu_graph_replays_memsets_copies_and_memory_nodes") else { return };
    const N: usize = 1000;
    let mut input = DeviceBuffer::from_host(&s, &pattern(N, 1)).unwrap();
    let mut out = DeviceBuffer::<u32>::zeros(&s, N).unwrap();
    let mut tail = DeviceBuffer::<u32>::zeros(&s, 8).unwrap();
    let before = DeviceBuffer::from_host(&s, &pattern(8, 9)).unwrap(); // dropped inside the capture
    let region = SyncCounter::start();
    s.begin_capture().unwrap();
    assert!(s.is_capturing());
    {
        let mut tmp = DeviceBuffer::<u32>::zeros(&s, N).unwrap(); // alloc + memset nodes
        tmp.copy_from_device(input.view()).unwrap();
        out.copy_from_device(tmp.view()).unwrap();
        tail.copy_from_device(before.view()).unwrap();
        drop(before); // kept alive by the graph, not freed by it
    } // tmp: a free node
    let graph = s.end_capture().unwrap();
    assert_eq!(region.count(), 0, "{:?}", region.calls());
    assert!(!s.is_capturing());
    assert!(graph.node_count().unwrap() >= 5);
    let exec = graph.instantiate().unwrap();
    drop(graph); // the executable keeps what it needs
    assert_eq!(out.to_host(&s).unwrap(), vec![0u32; N], "nothing ran during the capture");
    exec.launch(&s).unwrap();
    assert_eq!(out.to_host(&s).unwrap(), pattern(N, 1));
    assert_eq!(tail.to_host(&s).unwrap(), pattern(8, 9));
    input.copy_from_host(&pattern(N, 2)).unwrap();
    for _ in 0..3 {
        exec.launch(&s).unwrap();
    }
    assert_eq!(out.to_host(&s).unwrap(), pattern(N, 2));
    assert_eq!(tail.to_host(&s).unwrap(), pattern(8, 9));
}

#[test]
#[ignore = "needs a GPU: cargo test -- --include-ignored gpu_ (the GPU bundle does)"]
fn gpu_synchronising_inside_a_capture_is_a_capture_error() {
    let Some((_gpu, s)) = setup("gpu_synchronising_inside_a_capture_is_a_capture_error") else { return };
    let before = DeviceBuffer::<u32>::zeros(&s, 4).unwrap();
    s.begin_capture().unwrap();
    let r = before.to_host(&s);
    assert!(matches!(r, Err(Error::Capture { .. })), "a readback cannot be captured: {r:?}");
    assert!(matches!(s.begin_capture(), Err(Error::InvalidArgument(_))), "one capture at a time");
    let r = s.synchronize();
    assert!(matches!(r, Err(Error::Capture { .. })), "{r:?}");
    assert!(matches!(s.end_capture(), Err(Error::Capture { .. })), "the capture was invalidated");
    assert!(matches!(s.end_capture(), Err(Error::InvalidArgument(_))), "not capturing any more");
    let b = DeviceBuffer::<u32>::zeros(&s, 4).unwrap();
    assert_eq!(b.to_host(&s).unwrap(), vec![0; 4], "the stream works eagerly again");
}

#[test]
#[ignore = "needs a GPU: cargo test -- --include-ignored gpu_ (the GPU bundle does)"]
fn gpu_allocation_escaping_a_capture_is_refused() {
    let Some((_gpu, s)) = setup("gpu_allocation_escaping_a_capture_is_refused") else { return };
    s.begin_capture().unwrap();
    let escaped = DeviceBuffer::<u32>::zeros(&s, 16).unwrap();
    let r = s.end_capture();
    assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
    drop(escaped); // memory of the discarded graph: not freed by the handle
    let b = DeviceBuffer::from_host(&s, &[1u32, 2, 3]).unwrap();
    assert_eq!(b.to_host(&s).unwrap(), vec![1, 2, 3]);
}

#[test]
#[ignore = "needs a GPU: cargo test -- --include-ignored gpu_ (the GPU bundle does)"]
fn gpu_events_order_two_streams_without_the_host() {
    let Some((gpu, a)) = setup("gpu_events_order_two_streams_without_the_host") else { return };
    let b = Arc::new(Stream::new(&gpu).unwrap());
    let data = pattern(1 << 16, 5);
    let region = SyncCounter::start();
    let src = DeviceBuffer::from_host(&a, &data).unwrap();
    let ready = a.record().unwrap();
    b.wait(&ready).unwrap();
    let mut dst = DeviceBuffer::<u32>::uninit(&b, data.len()).unwrap();
    dst.copy_from_device(src.view()).unwrap();
    let copied = b.record().unwrap();
    a.wait(&copied).unwrap(); // src is freed on `a` after b's copy
    drop(src);
    assert_eq!(region.count(), 0, "{:?}", region.calls());
    assert_eq!(dst.to_host(&b).unwrap(), data);
}
