//! Booting the guest on a data disk under a chain of interceptors, and reading what the
//! run reports: fio verify's rows, the vmm's exit report per instance.

use super::{out_file, output};
use std::path::Path;

/// Boots the guest with `chain` (TOML `[[interceptor]]` entries) on the data disk `disk`
/// with `task`; checks that the run passed; returns its markers and output.
pub fn boot_with(
    name: &str,
    chain: &str,
    task: &str,
    disk: &Path,
) -> Option<(Vec<String>, String, serde_json::Value)> {
    super::images_or_skip()?;
    let toml = out_file(&format!("{name}.toml"));
    std::fs::write(&toml, chain).unwrap();
    let (disk_arg, toml_arg) = (
        disk.to_string_lossy().into_owned(),
        toml.to_string_lossy().into_owned(),
    );
    let args = [
        "--backend",
        "vmm",
        "--task",
        task,
        "--data-disk",
        &disk_arg,
        "--interceptors",
        &toml_arg,
    ];
    let (out, r) = super::guest_run(name, &args)?;
    let text = output(&out);
    assert!(out.status.success(), "{text}");
    assert_eq!(r["problems"].as_array().map(Vec::len), Some(0), "{r}");
    assert_eq!(r["console"]["exit_rc"], 0, "{r}");
    let markers = r["console"]["markers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap_or("").to_string())
        .collect();
    Some((markers, text, r))
}

/// A fresh sparse 256 MiB data disk.
pub fn fresh_disk(name: &str) -> std::path::PathBuf {
    let disk = out_file(&format!("{name}.img"));
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    disk
}

/// fio verify must have run both ways.
pub fn assert_verified(r: &serde_json::Value) {
    let rows = r["fio"].as_array().unwrap();
    for dir in ["write", "read"] {
        assert!(
            rows.iter().any(|x| x["job"] == "verify-crc32c"
                && x["dir"] == dir
                && x["iops"].as_f64().unwrap_or(0.0) > 0.0),
            "verify {dir} missing: {rows:?}"
        );
    }
}

/// The task of the verify runs: fio verify (the first 16 MiB), then the host check.
pub const VERIFY_TASK: &str = "fio=verify-crc32c hostcheck hostcheck.base=8192";

/// Boots the guest with `chain` on a fresh 256 MiB data disk prepared by `prepare` and runs
/// `VERIFY_TASK`, checking that fio verified both ways; returns the disk, the run's markers
/// and its output.
pub fn verify_with(
    name: &str,
    chain: &str,
    prepare: impl FnOnce(&Path),
) -> Option<(std::path::PathBuf, Vec<String>, String)> {
    let disk = fresh_disk(name);
    prepare(&disk);
    let (markers, text, r) = boot_with(name, chain, VERIFY_TASK, &disk)?;
    assert_verified(&r);
    Some((disk, markers, text))
}

/// `verify_with`, returning the disk's bytes afterwards.
pub fn run_with(
    name: &str,
    chain: &str,
    prepare: impl FnOnce(&Path),
) -> Option<(Vec<String>, String, Vec<u8>)> {
    let (disk, markers, text) = verify_with(name, chain, prepare)?;
    Some((markers, text, std::fs::read(&disk).unwrap()))
}

/// The plugin's stats object from the vmm's exit report line for an instance.
pub fn plugin_stats(text: &str, id: &str) -> serde_json::Value {
    let prefix = format!("vmm: interceptor {id} on data0: ");
    text.lines()
        .find_map(|l| l.split_once(&prefix).map(|(_, rest)| rest))
        .and_then(|rest| rest.split_once("stats=").map(|(_, j)| j))
        .and_then(|j| serde_json::from_str(j.trim()).ok())
        .unwrap_or_else(|| panic!("no stats for {id} in {text}"))
}

/// The vmm's exit report line for an instance: its request count.
pub fn requests(text: &str, id: &str) -> u64 {
    let prefix = format!("vmm: interceptor {id} on data0: requests=");
    text.lines()
        .find_map(|l| l.split_once(&prefix).map(|(_, rest)| rest))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no report for {id} in {text}"))
}

pub fn interceptor(id: &str, path: &Path, extra: &str) -> String {
    format!("[[interceptor]]\nid = {id:?}\npath = {path:?}\n{extra}\n")
}
