//! Per-request cost of the shim: a 4 KiB read through stacks of 0, 1 and 8 loaded but
//! disabled interceptors and 1 enabled no-op, against calling the backend directly. The
//! backend does no I/O, so the differences are the shim's own cost. Requests go through a
//! `LiveStack`, as a device's do (the read lock that lets the REST API edit the chain
//! included); an enabled instance also reads the clock twice for its latency histogram.
//!
//! `cargo bench -p compat --bench shim`

use compat::{
    BlockBackend, BlockRequestKind, BlockStack, InstanceSpec, IoRequest, LiveStack, Plugin,
    RequestStatus, Segment,
};
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use interceptor_sdk::{static_table, CreateContext, Interceptor};
use std::sync::Arc;

/// A backend that completes every request at once.
struct NullBackend;

impl BlockBackend for NullBackend {
    fn capacity(&self) -> u64 {
        1 << 30
    }

    unsafe fn execute(&self, req: &IoRequest<'_>) -> RequestStatus {
        black_box(req);
        RequestStatus::Ok
    }
}

/// An interceptor whose hooks do nothing (the SDK's default hooks).
struct Noop;

impl Interceptor for Noop {
    const NAME: &'static std::ffi::CStr = c"noop";
    fn create(_: CreateContext<'_>) -> Result<Self, String> {
        Ok(Noop)
    }
}

fn chain(n: usize, enabled: bool) -> Vec<InstanceSpec> {
    let plugin = Plugin::from_static("noop", static_table!(Noop)).expect("noop table");
    (0..n)
        .map(|i| InstanceSpec {
            id: format!("noop{i}"),
            plugin: plugin.clone(),
            config_json: "{}".into(),
            enabled,
        })
        .collect()
}

fn block_stack(n: usize, enabled: bool) -> Arc<BlockStack> {
    BlockStack::build("bench", Arc::new(NullBackend), &chain(n, enabled)).expect("stack")
}

fn shim(c: &mut Criterion) {
    let mut buf = vec![0u8; 4096];
    let segments = [Segment {
        base: buf.as_mut_ptr(),
        len: buf.len(),
    }];
    let mut g = c.benchmark_group("request_4k");
    let backend = NullBackend;
    g.bench_function("driver_direct", |b| {
        b.iter(|| {
            let req = IoRequest {
                kind: BlockRequestKind::Read,
                offset: black_box(8192),
                len: 4096,
                segments: &segments,
            };
            // SAFETY: the segment is a live buffer.
            unsafe { backend.execute(&req) }
        })
    });
    // The same empty chain without the live stack's snapshot: what taking it costs.
    let bare = block_stack(0, false);
    g.bench_function("stack_0_without_snapshot", |b| {
        // SAFETY: the segment is a live buffer.
        b.iter(|| unsafe { bare.submit(BlockRequestKind::Read, black_box(8192), &segments) })
    });
    for (name, n, enabled) in [
        ("shim_0", 0, false),
        ("shim_1_disabled", 1, false),
        ("shim_8_disabled", 8, false),
        ("shim_1_enabled_noop", 1, true),
    ] {
        // Requests run here on the bench thread rather than on the I/O thread: the cost
        // measured is the shim's, not a thread hop's.
        let s = LiveStack::start("bench", Arc::new(NullBackend), &chain(n, enabled), None)
            .expect("stack");
        g.bench_function(name, |b| {
            // SAFETY: the segment is a live buffer.
            b.iter(|| unsafe { s.submit(BlockRequestKind::Read, black_box(8192), &segments) })
        });
    }
    g.finish();
    drop(buf);
}

criterion_group!(benches, shim);
criterion_main!(benches);
