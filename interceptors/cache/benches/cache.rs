//! Cost of a cache hit: a 4 KiB read answered at the pre point, against the same read through
//! the shim without the cache and against the in-memory disk called directly.
//!
//! `cargo bench -p interceptor-cache --bench cache`

use compat::{
    BlockBackend, BlockRequestKind, BlockStack, InstanceSpec, IoRequest, Plugin, RequestStatus,
    Segment,
};
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use interceptor_cache::Cache;
use interceptor_sdk::static_table;
use std::sync::Arc;

/// A disk of zeros in memory: reads copy from it, writes are dropped.
struct MemDisk(Vec<u8>);

impl BlockBackend for MemDisk {
    fn capacity(&self) -> u64 {
        self.0.len() as u64
    }

    unsafe fn execute(&self, req: &IoRequest<'_>) -> RequestStatus {
        if req.kind == BlockRequestKind::Read {
            let mut at = req.offset as usize;
            for s in req.segments {
                std::ptr::copy_nonoverlapping(self.0[at..].as_ptr(), s.base, s.len);
                at += s.len;
            }
        }
        RequestStatus::Ok
    }
}

fn hit(c: &mut Criterion) {
    let disk = Arc::new(MemDisk(vec![0u8; 16 << 20]));
    let plugin = Plugin::from_static("cache", static_table!(Cache)).expect("table");
    let spec = InstanceSpec {
        id: "cache".into(),
        plugin,
        config_json: r#"{"size_mib": 8}"#.into(),
        enabled: true,
    };
    let cached = BlockStack::build("bench", disk.clone(), &[spec]).expect("stack");
    let plain = BlockStack::build("bench", disk.clone(), &[]).expect("stack");
    let mut buf = vec![0u8; 4096];
    let seg = [Segment {
        base: buf.as_mut_ptr(),
        len: buf.len(),
    }];
    // SAFETY (all submits below): the segment is a live buffer inside the disk's range.
    unsafe { cached.submit(BlockRequestKind::Read, 8192, &seg) }; // the miss that fills it
    let mut g = c.benchmark_group("read_4k");
    g.bench_function("disk_direct", |b| {
        let req = IoRequest {
            kind: BlockRequestKind::Read,
            offset: 8192,
            len: 4096,
            segments: &seg,
        };
        b.iter(|| unsafe { disk.execute(black_box(&req)) })
    });
    g.bench_function("shim_no_cache", |b| {
        b.iter(|| unsafe { plain.submit(BlockRequestKind::Read, black_box(8192), &seg) })
    });
    g.bench_function("cache_hit", |b| {
        b.iter(|| unsafe { cached.submit(BlockRequestKind::Read, black_box(8192), &seg) })
    });
    g.finish();
}

criterion_group!(benches, hit);
criterion_main!(benches);
