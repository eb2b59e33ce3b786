//! Interceptor plugins in the real guest (vmm under real KVM, in the lab on this machine
//! kind): fio verify passes through the C plugin, the remapping plugin and both stacked,
//! and the host image holds the transformed bytes, not the guest's.

mod common;

use common::{out_file, output};
use std::path::Path;
use vmm_lab::plugins::plugins;

const BLOCK: usize = 4096;
const SECTOR: usize = 512;
const KEY: u8 = 0x5a;
/// hostcheck.base: past the 16 MiB that fio verify writes.
const HOST_BASE: usize = 8192;

fn pattern(text: &str, len: usize) -> Vec<u8> {
    text.bytes().cycle().take(len).collect()
}

fn xor(data: &[u8]) -> Vec<u8> {
    data.iter().map(|b| b ^ KEY).collect()
}

/// Boots the guest with `chain` (TOML `[[interceptor]]` entries) on a fresh 256 MiB data
/// disk prepared by `prepare`, runs fio verify (the first 16 MiB) and then the host check
/// at `HOST_BASE`; returns the run's
/// markers and output, and the disk's bytes afterwards.
fn run_with(
    name: &str,
    chain: &str,
    prepare: impl FnOnce(&Path),
) -> Option<(Vec<String>, String, Vec<u8>)> {
    common::images_or_skip()?;
    let disk = out_file(&format!("{name}.img"));
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    prepare(&disk);
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
        "fio=verify-crc32c hostcheck hostcheck.base=8192",
        "--data-disk",
        &disk_arg,
        "--interceptors",
        &toml_arg,
    ];
    let (out, r) = common::guest_run(name, &args)?;
    let text = output(&out);
    assert!(out.status.success(), "{text}");
    assert_eq!(r["problems"].as_array().map(Vec::len), Some(0), "{r}");
    assert_eq!(r["console"]["exit_rc"], 0, "{r}");
    let rows = r["fio"].as_array().unwrap();
    for dir in ["write", "read"] {
        assert!(
            rows.iter().any(|x| x["job"] == "verify-crc32c"
                && x["dir"] == dir
                && x["iops"].as_f64().unwrap_or(0.0) > 0.0),
            "verify {dir} missing: {rows:?}"
        );
    }
    let markers = r["console"]["markers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap_or("").to_string())
        .collect();
    Some((markers, text, std::fs::read(&disk).unwrap()))
}

/// The vmm's exit report line for an instance: its request count.
fn requests(text: &str, id: &str) -> u64 {
    let prefix = format!("vmm: interceptor {id} on data0: requests=");
    text.lines()
        .find_map(|l| l.split_once(&prefix).map(|(_, rest)| rest))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no report for {id} in {text}"))
}

fn interceptor(id: &str, path: &Path, extra: &str) -> String {
    format!("[[interceptor]]\nid = {id:?}\npath = {path:?}\n{extra}\n")
}

/// Where logical sector `s` is in a remapped image (per the plugin's documented format).
fn remapped(raw: &[u8], s: usize) -> Option<usize> {
    assert_eq!(&raw[..8], b"VMMREMAP");
    let data_start = u64::from_le_bytes(raw[24..32].try_into().unwrap()) as usize;
    let e =
        u32::from_le_bytes(raw[SECTOR + 4 * s..SECTOR + 4 * s + 4].try_into().unwrap()) as usize;
    (e != 0).then(|| (data_start + e - 1) * SECTOR)
}

/// Logical block `block` (4 KiB) read out of a remapped image, sector by sector.
fn remapped_block(raw: &[u8], block: usize) -> Vec<u8> {
    (0..BLOCK / SECTOR)
        .flat_map(|k| {
            let at = remapped(raw, block * 8 + k).expect("the guest wrote this block");
            raw[at..at + SECTOR].to_vec()
        })
        .collect()
}

#[test]
fn fio_verify_passes_through_the_c_xor_plugin_and_the_disk_holds_xored_bytes() {
    let p = plugins().expect("building the plugins");
    let chain = interceptor("count", &p.counter, "")
        + &interceptor("xor", &p.xor, &format!("config = {{ key = {KEY} }}"));
    let host_pattern = pattern("host-wrote-this\n", BLOCK);
    let stored = xor(&host_pattern);
    let Some((markers, text, raw)) = run_with("plugin-xor", &chain, |disk| {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(disk).unwrap();
        f.write_all_at(&stored, ((HOST_BASE + 2000) * BLOCK) as u64)
            .unwrap();
    }) else {
        return;
    };
    // The guest read the host's block through the plugin: XORed back to the plain pattern.
    let want = format!("hostcheck read-sha256={}", sha256(&host_pattern));
    assert!(markers.contains(&want), "{want} not in {markers:?}");
    // The guest's write is on disk XORed, never in the clear.
    let guest = pattern("guest-wrote-this\n", BLOCK);
    assert_eq!(
        raw[(HOST_BASE + 1000) * BLOCK..(HOST_BASE + 1001) * BLOCK],
        xor(&guest)[..]
    );
    assert!(
        !raw.chunks(SECTOR).any(|s| s == &guest[..SECTOR]),
        "the guest's plain bytes reached the disk"
    );
    assert!(
        requests(&text, "xor") > 1000 && requests(&text, "count") == requests(&text, "xor"),
        "{text}"
    );
}

#[test]
fn fio_verify_passes_through_the_remapping_plugin_and_blocks_live_where_its_map_says() {
    let p = plugins().expect("building the plugins");
    let Some((_, text, raw)) =
        run_with("plugin-remap", &interceptor("remap", &p.remap, ""), |_| {})
    else {
        return;
    };
    let guest = pattern("guest-wrote-this\n", BLOCK);
    assert_eq!(
        remapped_block(&raw, HOST_BASE + 1000),
        guest,
        "found through the plugin's map"
    );
    assert_ne!(
        raw[(HOST_BASE + 1000) * BLOCK..(HOST_BASE + 1001) * BLOCK],
        guest[..],
        "not at the guest's offset"
    );
    assert!(requests(&text, "remap") > 1000, "{text}");
}

#[test]
fn fio_verify_passes_through_xor_stacked_on_remap() {
    let p = plugins().expect("building the plugins");
    let chain = interceptor("xor", &p.xor, &format!("config = {{ key = {KEY} }}"))
        + &interceptor("remap", &p.remap, "");
    let Some((_, text, raw)) = run_with("plugin-stacked", &chain, |_| {}) else {
        return;
    };
    let guest = pattern("guest-wrote-this\n", BLOCK);
    // Remapped by the lower plugin, XORed by the upper one; the map itself is plain.
    assert_eq!(remapped_block(&raw, HOST_BASE + 1000), xor(&guest));
    assert!(
        !raw.chunks(SECTOR).any(|s| s == &guest[..SECTOR]),
        "the guest's plain bytes reached the disk"
    );
    assert_eq!(requests(&text, "xor"), requests(&text, "remap"));
}

fn sha256(bytes: &[u8]) -> String {
    let tmp = out_file("plugin-sha-input.bin");
    std::fs::write(&tmp, bytes).unwrap();
    let out = std::process::Command::new("sha256sum")
        .arg(&tmp)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}
