//! Throughput of the encryption interceptor: the cipher work per block (seal and open, one
//! 4 KiB block or sixteen for 64 KiB, as the plugin does them) and whole requests through the
//! shim and the plugin (metadata included) over a disk in memory. The peer is
//! `openssl speed -evp aes-256-gcm -bytes 4096` (and 65536) on the same machine.
//!
//! `cargo bench -p interceptor-encrypt --bench encrypt`

use compat::{
    BlockBackend, BlockRequestKind, BlockStack, InstanceSpec, IoRequest, Plugin, RequestStatus,
    Segment,
};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use interceptor_encrypt::seal::Sealer;
use interceptor_encrypt::{Encrypt, Mode};
use interceptor_sdk::static_table;
use std::sync::{Arc, Mutex};

struct MemDisk(Mutex<Vec<u8>>);

impl BlockBackend for MemDisk {
    fn capacity(&self) -> u64 {
        self.0.lock().map(|d| d.len() as u64).unwrap_or(0)
    }

    unsafe fn execute(&self, req: &IoRequest<'_>) -> RequestStatus {
        let Ok(mut d) = self.0.lock() else {
            return RequestStatus::IoError;
        };
        let mut at = req.offset as usize;
        for s in req.segments {
            match req.kind {
                BlockRequestKind::Read => {
                    std::ptr::copy_nonoverlapping(d[at..].as_ptr(), s.base, s.len)
                }
                BlockRequestKind::Write => {
                    std::ptr::copy_nonoverlapping(s.base, d[at..].as_mut_ptr(), s.len)
                }
                _ => {}
            }
            at += s.len;
        }
        RequestStatus::Ok
    }
}

fn cipher(c: &mut Criterion) {
    let sealer = Sealer::new(&[7u8; 32], [1; 16], [2; 16]);
    for size in [4096usize, 65536] {
        let mut g = c.benchmark_group(format!("cipher_{}k", size / 1024));
        g.throughput(Throughput::Bytes(size as u64));
        let mut buf = vec![0x5au8; size];
        g.bench_function("seal", |b| {
            b.iter(|| {
                for (i, block) in buf.chunks_mut(4096).enumerate() {
                    black_box(sealer.seal(i as u64, Mode::Encrypted, 0, block).ok());
                }
            })
        });
        let mut sealed = vec![0x5au8; size];
        let versions: Vec<_> = sealed
            .chunks_mut(4096)
            .enumerate()
            .filter_map(|(i, block)| sealer.seal(i as u64, Mode::Encrypted, 0, block).ok())
            .collect();
        g.bench_function("open", |b| {
            b.iter(|| {
                let mut data = sealed.clone();
                for ((i, block), v) in data.chunks_mut(4096).enumerate().zip(&versions) {
                    black_box(sealer.open(i as u64, v, block));
                }
            })
        });
        g.finish();
    }
}

fn plugin(c: &mut Criterion) {
    let key = std::env::temp_dir().join(format!("encrypt-bench-{}.key", std::process::id()));
    std::fs::write(&key, "11".repeat(32)).expect("key file");
    let plugin = Plugin::from_static("encrypt", static_table!(Encrypt)).expect("table");
    let disk = Arc::new(MemDisk(Mutex::new(vec![0u8; 256 << 20])));
    let spec = InstanceSpec {
        id: "enc".into(),
        plugin,
        config_json: serde_json::json!({ "key_file": key }).to_string(),
        enabled: true,
    };
    let stack = BlockStack::build("bench", disk, &[spec]).expect("stack");
    for size in [4096usize, 65536] {
        let mut g = c.benchmark_group(format!("plugin_{}k", size / 1024));
        g.throughput(Throughput::Bytes(size as u64));
        let mut buf = vec![0x5au8; size];
        let seg = [Segment {
            base: buf.as_mut_ptr(),
            len: size,
        }];
        for (name, kind) in [
            ("write", BlockRequestKind::Write),
            ("read", BlockRequestKind::Read),
        ] {
            g.bench_function(name, |b| {
                // SAFETY: the segment is a live buffer; the range is inside the disk.
                b.iter(|| unsafe { stack.submit(kind, black_box(1 << 20), &seg) })
            });
        }
        // A write and a flush, over 1,000 blocks in turn: the metadata commit's cost.
        let mut i = 0u64;
        g.bench_function("write_flush", |b| {
            b.iter(|| {
                i = (i + 1) % 1000;
                let at = (1 << 20) + i * size as u64;
                // SAFETY: as above.
                unsafe {
                    stack.submit(BlockRequestKind::Write, at, &seg);
                    stack.submit(BlockRequestKind::Flush, 0, &[])
                }
            })
        });
        g.finish();
    }
    let _ = std::fs::remove_file(&key);
}

criterion_group!(benches, cipher, plugin);
criterion_main!(benches);
