//! The cache plugin as a shared object over a real file: hits without the backend,
//! write-back held until a flush, and disabled meaning written back and bypassed.

mod common;

use common::out_file;
use common::stack::{file_stack, io};
use compat::{BlockRequestKind, BlockStack, RequestStatus};
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use vmm_lab::plugins::plugins;

const BLOCK: usize = 4096;

fn open(name: &str, config: serde_json::Value) -> (PathBuf, Arc<BlockStack>) {
    let path = out_file(name);
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    let stack = file_stack(&path, "cache", &plugins().unwrap().cache, config).unwrap();
    (path, stack)
}

fn stats(stack: &BlockStack) -> serde_json::Value {
    common::stack::stats(stack, "cache")
}

fn on_disk(path: &PathBuf, block: usize) -> Vec<u8> {
    std::fs::read(path).unwrap()[block * BLOCK..(block + 1) * BLOCK].to_vec()
}

#[test]
fn rereads_are_answered_without_the_driver() {
    let (path, stack) = open("cache-hits.img", serde_json::json!({}));
    let mut file = std::fs::read(&path).unwrap();
    file[3 * BLOCK..4 * BLOCK].fill(0xab);
    std::fs::write(&path, &file).unwrap();
    for _ in 0..10 {
        let mut buf = vec![0u8; 2 * BLOCK];
        assert_eq!(
            io(&stack, BlockRequestKind::Read, 2 * BLOCK, &mut buf),
            RequestStatus::Ok
        );
        assert!(buf[BLOCK..].iter().all(|&b| b == 0xab));
    }
    let s = stats(&stack);
    assert_eq!(
        (s["misses"].as_u64(), s["hits"].as_u64()),
        (Some(1), Some(9)),
        "{s}"
    );
    assert_eq!(s["bytes_cached"], 2 * BLOCK);
    assert_eq!(stack.counters().completed_without_driver.load(Relaxed), 9);
    // Write-through: a write updates the cached copy and the file.
    let mut new = vec![0x11u8; BLOCK];
    assert_eq!(
        io(&stack, BlockRequestKind::Write, 3 * BLOCK, &mut new),
        RequestStatus::Ok
    );
    assert_eq!(on_disk(&path, 3), new);
    let mut buf = vec![0u8; BLOCK];
    assert_eq!(
        io(&stack, BlockRequestKind::Read, 3 * BLOCK, &mut buf),
        RequestStatus::Ok
    );
    assert_eq!(buf, new);
    assert_eq!(stats(&stack)["hits"], 10);
}

#[test]
fn write_back_holds_writes_until_a_flush_and_disabling_writes_them_back() {
    let (path, stack) = open("cache-wb.img", serde_json::json!({ "write_back": true }));
    let mut data = vec![0x42u8; 2 * BLOCK];
    assert_eq!(
        io(&stack, BlockRequestKind::Write, 0, &mut data),
        RequestStatus::Ok
    );
    assert_eq!(on_disk(&path, 0), vec![0u8; BLOCK], "held in the cache");
    assert_eq!(stats(&stack)["dirty_bytes"], 2 * BLOCK);
    let mut back = vec![0u8; 2 * BLOCK];
    assert_eq!(
        io(&stack, BlockRequestKind::Read, 0, &mut back),
        RequestStatus::Ok
    );
    assert_eq!(back, data);
    assert_eq!(
        io(&stack, BlockRequestKind::Flush, 0, &mut []),
        RequestStatus::Ok
    );
    assert_eq!(
        on_disk(&path, 1),
        vec![0x42u8; BLOCK],
        "written back by the flush"
    );
    assert_eq!(stats(&stack)["dirty_bytes"], 0);
    // A partial write over a dirty cached block is absorbed; the next flush writes the
    // block back whole.
    let mut whole = vec![0x77u8; BLOCK];
    assert_eq!(
        io(&stack, BlockRequestKind::Write, 4 * BLOCK, &mut whole),
        RequestStatus::Ok
    );
    let mut piece = vec![0x99u8; 512];
    assert_eq!(
        io(&stack, BlockRequestKind::Write, 4 * BLOCK + 512, &mut piece),
        RequestStatus::Ok
    );
    let mut want = whole.clone();
    want[512..1024].fill(0x99);
    assert_eq!(on_disk(&path, 4), vec![0u8; BLOCK], "absorbed");
    assert_eq!(stats(&stack)["partial_writes_absorbed"], 1);
    assert_eq!(
        io(&stack, BlockRequestKind::Flush, 0, &mut []),
        RequestStatus::Ok
    );
    assert_eq!(on_disk(&path, 4), want);
    // Disabled: dirty blocks are written back, the cache is dropped, requests pass through.
    let mut late = vec![0x55u8; BLOCK];
    assert_eq!(
        io(&stack, BlockRequestKind::Write, 6 * BLOCK, &mut late),
        RequestStatus::Ok
    );
    assert_eq!(on_disk(&path, 6), vec![0u8; BLOCK]);
    stack.instance("cache").unwrap().set_enabled(false);
    let mut buf = vec![0u8; BLOCK];
    assert_eq!(
        io(&stack, BlockRequestKind::Read, 6 * BLOCK, &mut buf),
        RequestStatus::Ok
    );
    assert_eq!(buf, late);
    assert_eq!(on_disk(&path, 6), late, "written back when disabled");
    assert_eq!(stats(&stack)["bytes_cached"], 0);
}
