//! Stores stacked on stores, through the real plugin libraries: the space dedup frees is
//! discarded in the compression store below it, which then gives it back too (without
//! that, every block dedup ever wrote would stay stored below it).

use compat::{BlockRequestKind, BlockStack, InstanceSpec, PluginRegistry, RequestStatus, Started};
use crash_harness::{submit, RecordingDisk};
use std::sync::Arc;
use vmm_lab::plugins::plugins;

fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn stat(stack: &BlockStack, id: &str, key: &str) -> u64 {
    let v = stack.instance(id).unwrap().plugin_stats().unwrap();
    v[key].as_u64().unwrap_or_else(|| panic!("{key} in {v}"))
}

#[test]
fn space_dedup_frees_is_given_back_by_the_compression_store_below() {
    let p = plugins().expect("building the plugins");
    let reg = PluginRegistry::new();
    let spec = |id: &str, path: &std::path::Path| InstanceSpec {
        id: id.into(),
        plugin: reg.load(path, None).unwrap(),
        config_json: "{}".into(),
        enabled: true,
    };
    let disk = RecordingDisk::new(vec![0u8; 32 << 20]);
    let stack = BlockStack::build(
        "d",
        disk,
        &[spec("dd", &p.dedup), spec("zstd", &p.compress)],
    )
    .unwrap();
    assert!(stack.handles_discard());
    let write = |at: u64, mut data: Vec<u8>| {
        assert_eq!(
            submit(&stack, BlockRequestKind::Write, at, &mut data),
            RequestStatus::Ok
        );
    };
    let flush = || assert_eq!(stack.flush(), RequestStatus::Ok);
    write(0, noise(4 << 20, 1));
    flush();
    assert!(stat(&stack, "zstd", "logical_bytes") >= 4 << 20);
    // Overwritten with other data, then discarded: dedup frees its blocks, and after its
    // commits compression holds about nothing of them.
    write(0, noise(4 << 20, 2));
    flush();
    let st = match unsafe { stack.begin(BlockRequestKind::Discard, 0, 4 << 20, Vec::new()) } {
        Started::Done(st) => st,
        Started::Backend(io) => io.finish(RequestStatus::Ok),
        Started::Parked(_) => panic!("no layer here leaves a request pending"),
    };
    assert_eq!(st, RequestStatus::Ok);
    flush();
    flush();
    assert!(stat(&stack, "dd", "discarded_below_bytes") >= 8 << 20);
    let left = stat(&stack, "zstd", "logical_bytes");
    assert!(left < 512 << 10, "compression still holds {left} bytes");
    drop(Arc::clone(&stack));
}
