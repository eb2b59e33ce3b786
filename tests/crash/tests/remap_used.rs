//! The remapping plugin formatted with `format = true` over a disk that held other data,
//! crashed at many points: every sector reads its old or its new contents, never the bytes
//! the disk held before. (A map entry that became durable before the data it points at
//! would show the old bytes of its slot.) Seeds are printed on failure.

use compat::{BlockRequestKind, BlockStack, InstanceSpec, PluginRegistry, RequestStatus};
use crash_harness::{check, crash_image, submit, Model, RecordingDisk, Rng};
use std::sync::Arc;
use vmm_lab::plugins::plugins;

const SECTOR: usize = 512;
const BLOCK: usize = 4096;
/// 4,096 sectors.
const DISK: usize = 2 << 20;
/// The workload's range: the first 64 blocks (512 sectors), so that most writes are a
/// sector's first (they take a new slot and write its map entry).
const BLOCKS: usize = 64;

fn open(reg: &PluginRegistry, disk: Arc<RecordingDisk>) -> Result<Arc<BlockStack>, String> {
    let spec = InstanceSpec {
        id: "remap".into(),
        plugin: reg
            .load(&plugins().unwrap().remap, None)
            .map_err(|e| e.to_string())?,
        config_json: serde_json::json!({ "format": true }).to_string(),
        enabled: true,
    };
    BlockStack::build("crash", disk, &[spec]).map_err(|e| e.to_string())
}

/// Writes (1 to 8 sectors), flushes and checked reads with `seed`, then `points` crashes,
/// each reopened and checked sector by sector; the violations.
fn run(old: &[u8], seed: u64, ops: usize, points: usize) -> Vec<String> {
    let reg = PluginRegistry::new();
    let disk = RecordingDisk::new(old.to_vec());
    let stack = open(&reg, disk.clone()).expect("the first open formats");
    let sectors = BLOCKS * BLOCK / SECTOR;
    assert!(stack.capacity() as usize >= BLOCKS * BLOCK);
    let mut model = Model::new(sectors, SECTOR);
    let mut rng = Rng(seed);
    for op in 0..ops {
        match rng.below(100) {
            0..=64 => {
                let len = 1 + rng.below(8) as usize;
                let first = rng.below((sectors - len) as u64 + 1) as usize;
                let mut data: Vec<u8> = (0..len * SECTOR).map(|_| rng.next_u64() as u8).collect();
                model.before_write(disk.position(), (first * SECTOR) as u64, &data);
                let st = submit(
                    &stack,
                    BlockRequestKind::Write,
                    (first * SECTOR) as u64,
                    &mut data,
                );
                assert_eq!(st, RequestStatus::Ok, "seed {seed}: write {op}");
            }
            65..=79 => {
                let st = submit(&stack, BlockRequestKind::Flush, 0, &mut []);
                assert_eq!(st, RequestStatus::Ok, "seed {seed}: flush {op}");
                model.after_flush(disk.position());
            }
            _ => {
                let s = rng.below(sectors as u64) as usize;
                let mut buf = vec![0u8; SECTOR];
                let st = submit(
                    &stack,
                    BlockRequestKind::Read,
                    (s * SECTOR) as u64,
                    &mut buf,
                );
                assert_eq!(st, RequestStatus::Ok, "seed {seed}: read {op}");
                assert!(
                    buf == model.current(s),
                    "seed {seed}: read {op} of sector {s}"
                );
            }
        }
    }
    let log = disk.log();
    // No orderly shutdown: the crash images come from the log only.
    std::mem::forget(stack);
    let mut violations = Vec::new();
    for point in 0..points {
        let at = rng.below(log.len() as u64 + 1) as usize;
        let survive = rng.below(101);
        let image = crash_image(old, &log, at, || rng.below(100) < survive);
        let expect = model.expectation_at(at);
        let result = open(&reg, RecordingDisk::new(image)).and_then(|s| check(&s, &expect));
        if let Err(e) = result {
            violations.push(format!(
                "seed {seed}, crash point {point}: at log position {at} of {}, {survive}% of \
                 unflushed writes kept: {e}",
                log.len()
            ));
        }
    }
    violations
}

#[test]
fn remap_formatted_over_old_data_survives_a_thousand_crash_points() {
    let old: Vec<u8> = b"old bytes of another filesystem\n"
        .iter()
        .copied()
        .cycle()
        .take(DISK)
        .collect();
    let mut all = Vec::new();
    for seed in [41, 42, 43, 44] {
        all.extend(run(&old, seed, 300, 300));
    }
    assert!(
        all.is_empty(),
        "{} of 1200 crash points violated old-or-new:\n{}",
        all.len(),
        all[..all.len().min(20)].join("\n")
    );
}
