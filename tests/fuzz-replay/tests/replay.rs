//! Every committed corpus input through its target's harness, as ordinary tests: one test per
//! target, each input in turn (a failure names the file). `fuzz/artifacts-found/<target>/`
//! holds inputs that crashed code outside the fuzz crates when they were found; `found_crashes`
//! replays each in a child process (a hang may spin a disk's I/O thread for good), so an open
//! bug fails the suite until it is fixed and its input moved into the corpus. None is open.

use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

fn replay(target: &str, dir: &Path) -> usize {
    let harness = fuzz_replay::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .map(|t| t.1)
        .unwrap_or_else(|| panic!("no target {target}"));
    let files = inputs(dir);
    for file in &files {
        let data = std::fs::read(file).unwrap();
        let outcome = std::panic::catch_unwind(|| harness(&data));
        if let Err(e) = outcome {
            std::panic::resume_unwind(Box::new(format!(
                "{target}: {} failed: {}",
                file.display(),
                e.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            )));
        }
    }
    files.len()
}

fn corpus(target: &str) {
    let dir = fuzz_dir().join("corpus").join(target);
    let n = replay(target, &dir);
    assert!(n > 0, "{target}: no corpus in {}", dir.display());
    // The empty input decodes to something too.
    (fuzz_replay::TARGETS
        .iter()
        .find(|t| t.0 == target)
        .unwrap()
        .1)(&[]);
}

#[test]
fn blk_request() {
    corpus("blk_request");
}

#[test]
fn blk_queue() {
    corpus("blk_queue");
}

#[test]
fn mmio() {
    corpus("mmio");
}

#[test]
fn config() {
    corpus("config");
}

#[test]
fn api() {
    corpus("api");
}

#[test]
fn plugin_boundary() {
    corpus("plugin_boundary");
}

#[test]
fn encrypt_open() {
    corpus("encrypt_open");
}

#[test]
fn net_tx() {
    corpus("net_tx");
}

#[test]
fn net_worker() {
    corpus("net_worker");
}

#[test]
fn store_open() {
    corpus("store_open");
}

#[test]
fn every_target_has_a_test() {
    let tested = [
        "blk_request",
        "blk_queue",
        "mmio",
        "config",
        "api",
        "plugin_boundary",
        "encrypt_open",
        "net_tx",
        "store_open",
        "net_worker",
    ];
    for (name, _) in fuzz_replay::TARGETS {
        assert!(tested.contains(name), "{name} has no replay test");
        assert!(
            fuzz_dir()
                .join("fuzz_targets")
                .join(format!("{name}.rs"))
                .is_file(),
            "{name} has no fuzz target"
        );
    }
}

/// Each input of an open bug in a child process of its own (a hang may spin a disk's I/O
/// thread for good): a failure or a hang (no end within 30 s) is reported, and every input
/// is tried.
#[test]
fn found_crashes() {
    let dir = fuzz_dir().join("artifacts-found");
    let mut failed = Vec::new();
    for (target, _) in fuzz_replay::TARGETS {
        for file in inputs(&dir.join(target)) {
            let mut child = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "found_crash_child", "--nocapture"])
                .env("FUZZ_FOUND_TARGET", target)
                .env("FUZZ_FOUND_FILE", &file)
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap();
            let start = std::time::Instant::now();
            let status = loop {
                if let Some(status) = child.try_wait().unwrap() {
                    break Some(status);
                }
                if start.elapsed() > std::time::Duration::from_secs(30) {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            };
            match status {
                Some(s) if s.success() => {}
                Some(s) => failed.push(format!("{}: failed ({s})", file.display())),
                None => failed.push(format!("{}: no end within 30 s", file.display())),
            }
        }
    }
    assert!(failed.is_empty(), "open bugs:\n{}", failed.join("\n"));
}

/// `found_crashes`' child: one input, named by the environment (without it, nothing).
#[test]
fn found_crash_child() {
    let (Some(target), Some(file)) = (
        std::env::var_os("FUZZ_FOUND_TARGET"),
        std::env::var_os("FUZZ_FOUND_FILE"),
    ) else {
        return;
    };
    let target = target.to_string_lossy();
    let harness = fuzz_replay::TARGETS
        .iter()
        .find(|t| t.0 == target)
        .unwrap()
        .1;
    harness(&std::fs::read(file).unwrap());
}
