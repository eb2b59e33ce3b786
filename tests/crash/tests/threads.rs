//! Crash points with writers on several threads at once, as a disk's hook pool runs them
//! through a chain whose every instance declares `F_CONCURRENT` (encrypt): four threads
//! each write their own blocks (the device keeps requests on the same 4 KiB block apart),
//! whole blocks and parts of blocks, and read them back; between rounds, with nothing in
//! flight (a flush waits for everything), a flush. Then crashes at random log positions,
//! each reopened and checked block by block as `crash.rs` does: every block reads its
//! contents at the last completed flush or contents some later write gave it.

use compat::{BlockRequestKind, BlockStack, InstanceSpec, PluginRegistry, RequestStatus};
use crash_harness::{check, crash_image, submit, Model, RecordingDisk, Rng};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use vmm_lab::plugins::{plugin_dir, plugins};

const BLOCK: usize = 4096;
const THREADS: usize = 4;
/// Blocks each thread owns.
const OWN: usize = 16;
const ROUNDS: usize = 6;
/// Requests per thread per round.
const OPS: usize = 24;
/// At least the threads' 64 guest blocks in two slots, plus header and metadata.
const DISK_BLOCKS: usize = 160;

fn key_file() -> std::path::PathBuf {
    let dir = plugin_dir().join("crash-threads");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("test.key");
    std::fs::write(&path, "6a".repeat(32)).unwrap();
    path
}

fn open(reg: &PluginRegistry, disk: Arc<RecordingDisk>) -> Result<Arc<BlockStack>, String> {
    let p = plugins().map_err(|e| e.to_string())?;
    let spec = InstanceSpec {
        id: "enc".into(),
        plugin: reg.load(&p.encrypt, None).map_err(|e| e.to_string())?,
        config_json: serde_json::json!({ "key_file": key_file() }).to_string(),
        enabled: true,
    };
    BlockStack::build("threads", disk, &[spec]).map_err(|e| e.to_string())
}

/// One thread's round: writes (a part of one block one time in four, else 1 to 3 whole
/// blocks) and reads of its own blocks, each read checked against the model.
fn round(
    stack: &BlockStack,
    disk: &RecordingDisk,
    model: &Mutex<Model>,
    inside: &AtomicUsize,
    most: &AtomicUsize,
    thread: usize,
    rng: &mut Rng,
) -> Result<(), String> {
    let first = thread * OWN;
    for _ in 0..OPS {
        let read = rng.below(5) == 0;
        let (offset, len) = if read {
            ((first + rng.below(OWN as u64) as usize) * BLOCK, BLOCK)
        } else if rng.below(4) == 0 {
            let sectors = 1 + rng.below(7) as usize;
            let at = rng.below((OWN * 8 - sectors) as u64) as usize;
            (first * BLOCK + at * 512, sectors * 512)
        } else {
            let n = 1 + rng.below(3) as usize;
            (
                (first + rng.below((OWN - n + 1) as u64) as usize) * BLOCK,
                n * BLOCK,
            )
        };
        let mut buf: Vec<u8> = if read {
            vec![0u8; len]
        } else {
            (0..len).map(|_| rng.next_u64() as u8).collect()
        };
        if !read {
            let mut m = model.lock().unwrap();
            m.before_write(disk.position(), offset as u64, &buf);
        }
        let kind = if read {
            BlockRequestKind::Read
        } else {
            BlockRequestKind::Write
        };
        let n = inside.fetch_add(1, Ordering::SeqCst) + 1;
        most.fetch_max(n, Ordering::SeqCst);
        let status = submit(stack, kind, offset as u64, &mut buf);
        inside.fetch_sub(1, Ordering::SeqCst);
        if status != RequestStatus::Ok {
            return Err(format!(
                "thread {thread}: {kind:?} at {offset}+{len}: {status:?}"
            ));
        }
        if read {
            let m = model.lock().unwrap();
            if buf != m.current(offset / BLOCK) {
                return Err(format!(
                    "thread {thread}: block {} read back wrong",
                    offset / BLOCK
                ));
            }
        }
    }
    Ok(())
}

fn run(seed: u64, points: usize) -> Vec<String> {
    let reg = PluginRegistry::new();
    let base = vec![0u8; DISK_BLOCKS * BLOCK];
    let disk = RecordingDisk::new(base.clone());
    let stack = open(&reg, disk.clone()).expect("the first open");
    assert!(stack.concurrent(), "encrypt declares F_CONCURRENT");
    assert!(
        stack.capacity() >= (THREADS * OWN * BLOCK) as u64,
        "disk too small"
    );
    let model = Mutex::new(Model::new(THREADS * OWN, BLOCK));
    let (inside, most) = (AtomicUsize::new(0), AtomicUsize::new(0));
    for r in 0..ROUNDS {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..THREADS)
                .map(|t| {
                    let (stack, disk, model) = (&stack, &disk, &model);
                    let (inside, most) = (&inside, &most);
                    let mut rng = Rng(seed * 1000 + (r * THREADS + t) as u64);
                    s.spawn(move || round(stack, disk, model, inside, most, t, &mut rng))
                })
                .collect();
            for h in handles {
                h.join().unwrap().unwrap();
            }
        });
        let status = submit(&stack, BlockRequestKind::Flush, 0, &mut []);
        assert_eq!(status, RequestStatus::Ok, "the flush of round {r}");
        model.lock().unwrap().after_flush(disk.position());
    }
    assert!(
        most.load(Ordering::SeqCst) >= 2,
        "the threads never had requests in the plugin at once"
    );
    // No orderly shutdown: the crash images come from the log only.
    std::mem::forget(stack);
    let model = model.into_inner().unwrap();
    let log = disk.log();
    let mut rng = Rng(seed);
    let mut violations = Vec::new();
    for point in 0..points {
        let at = rng.below(log.len() as u64 + 1) as usize;
        let survive = rng.below(101);
        let image = crash_image(&base, &log, at, || rng.below(100) < survive);
        let result = open(&reg, RecordingDisk::new(image)).and_then(|s| {
            let r = check(&s, &model.expectation_at(at));
            std::mem::forget(s);
            r
        });
        if let Err(e) = result {
            violations.push(format!(
                "seed {seed}, crash point {point} at log position {at} of {}, {survive}% of \
                 unflushed writes kept: {e}",
                log.len()
            ));
        }
    }
    violations
}

#[test]
fn encrypt_with_writers_on_four_threads_survives_six_hundred_crash_points() {
    let mut all = Vec::new();
    for seed in [1, 2] {
        all.extend(run(seed, 300));
    }
    assert!(
        all.is_empty(),
        "{} of 600 crash points violated old-or-new:\n{}",
        all.len(),
        all[..all.len().min(20)].join("\n")
    );
}
