//! Cost of a cache hit: a 4 KiB read answered at the pre point, against the same read through
//! the shim without the cache and against the in-memory disk called directly. And the
//! write-back cache's write-back: a flush of 1 MiB of adjacent dirty blocks (one lower write
//! of 1 MiB), and 4 KiB writes streaming through a full cache (evictions write back runs),
//! over a disk in memory (writes cost nothing: what is left is the cache's own work) and over
//! a temporary file (each request one system call); each prints the plugin's write-back
//! counters once done.
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

/// A disk in a temporary file: each request is one `pread`/`pwrite` (the page cache, no
/// fsync), so that a request costs what a system call costs.
struct FileDisk {
    file: std::fs::File,
    path: std::path::PathBuf,
    capacity: u64,
}

impl FileDisk {
    fn new(capacity: u64) -> FileDisk {
        let path = std::env::temp_dir().join(format!("cache-bench-{}.img", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("temporary disk file");
        file.set_len(capacity).expect("sizing the disk file");
        FileDisk {
            file,
            path,
            capacity,
        }
    }
}

impl Drop for FileDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl BlockBackend for FileDisk {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    unsafe fn execute(&self, req: &IoRequest<'_>) -> RequestStatus {
        use std::os::unix::fs::FileExt;
        let mut at = req.offset;
        for s in req.segments {
            let done = if req.kind == BlockRequestKind::Read {
                self.file
                    .read_exact_at(std::slice::from_raw_parts_mut(s.base, s.len), at)
            } else if req.kind == BlockRequestKind::Write {
                self.file
                    .write_all_at(std::slice::from_raw_parts(s.base, s.len), at)
            } else {
                Ok(())
            };
            if done.is_err() {
                return RequestStatus::IoError;
            }
            at += s.len as u64;
        }
        RequestStatus::Ok
    }
}

fn write_back_stack(disk: Arc<dyn BlockBackend>) -> Arc<BlockStack> {
    let plugin = Plugin::from_static("cache", static_table!(Cache)).expect("table");
    let spec = InstanceSpec {
        id: "cache".into(),
        plugin,
        config_json: r#"{"size_mib": 1, "write_back": true}"#.into(),
        enabled: true,
    };
    BlockStack::build("bench", disk, &[spec]).expect("stack")
}

fn report(name: &str, stack: &BlockStack) {
    if let Some(Ok(s)) = stack.instance("cache").map(|i| i.plugin_stats()) {
        println!(
            "{name}: {} blocks written back in {} lower writes",
            s["write_backs"], s["write_back_requests"]
        );
    }
}

/// The write-back cases over `disk` (64 MiB), named `<case>/<disk_name>`.
fn write_back_over(c: &mut Criterion, disk_name: &str, disk: Arc<dyn BlockBackend>) {
    let mut g = c.benchmark_group("write_back");
    {
        let stack = write_back_stack(disk.clone());
        let mut buf = vec![0x5au8; 1 << 20];
        let seg = [Segment {
            base: buf.as_mut_ptr(),
            len: buf.len(),
        }];
        // 256 adjacent blocks dirtied by one write (absorbed), then the flush writes them
        // back: one lower write of 1 MiB.
        let name = format!("dirty_1mib_then_flush/{disk_name}");
        g.bench_function(&name, |b| {
            b.iter(|| {
                // SAFETY: the segment is a live buffer inside the disk's range.
                unsafe { stack.submit(BlockRequestKind::Write, black_box(1 << 20), &seg) };
                stack.flush()
            })
        });
        report(&name, &stack);
    }
    {
        let stack = write_back_stack(disk);
        let mut buf = vec![0xa5u8; 4096];
        let seg = [Segment {
            base: buf.as_mut_ptr(),
            len: buf.len(),
        }];
        let blocks = (64u64 << 20) / 4096;
        let mut next = 0u64;
        // Sequential 4 KiB writes over 64 MiB through a 1 MiB cache: every write evicts, and
        // a dirty victim goes down with the run after it.
        let name = format!("stream_4k_writes_through_1mib/{disk_name}");
        g.bench_function(&name, |b| {
            b.iter(|| {
                next = (next + 1) % blocks;
                // SAFETY: as above.
                unsafe { stack.submit(BlockRequestKind::Write, black_box(next * 4096), &seg) }
            })
        });
        report(&name, &stack);
    }
    g.finish();
}

fn write_back(c: &mut Criterion) {
    write_back_over(c, "memory", Arc::new(MemDisk(vec![0u8; 64 << 20])));
    write_back_over(c, "file", Arc::new(FileDisk::new(64 << 20)));
}

criterion_group!(benches, hit, write_back);
criterion_main!(benches);
