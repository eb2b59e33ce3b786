//! Interceptor plugins in the real guest (vmm under real KVM, in the lab on this machine
//! kind): fio verify passes through the C plugin, the remapping plugin and both stacked,
//! and the host image holds the transformed bytes, not the guest's.

mod common;

use common::chain::*;
use common::{contains, encfmt, out_file, output, pattern};
use vmm_lab::plugins::plugins;

const BLOCK: usize = 4096;
const SECTOR: usize = 512;
const KEY: u8 = 0x5a;
/// hostcheck.base: past the 16 MiB that fio verify writes.
const HOST_BASE: usize = 8192;

fn xor(data: &[u8]) -> Vec<u8> {
    data.iter().map(|b| b ^ KEY).collect()
}

/// Where logical sector `s` is in a remapped image (per the plugin's documented format,
/// version 2: a `u64` map entry per sector, 0 or slot + 1, from sector 1).
fn remapped(raw: &[u8], s: usize) -> Option<usize> {
    assert_eq!(&raw[..8], b"VMMREMAP");
    assert_eq!(u32::from_le_bytes(raw[8..12].try_into().unwrap()), 2);
    let data_start = u64::from_le_bytes(raw[24..32].try_into().unwrap()) as usize;
    let at = SECTOR + 8 * s;
    let e = u64::from_le_bytes(raw[at..at + 8].try_into().unwrap()) as usize;
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

/// Issue 31, item 1: a plugin built from the first header (ABI version 1, as third parties
/// wrote them) loads under this VMM and fio verify passes through it in a guest.
#[test]
fn fio_verify_passes_through_a_plugin_built_from_the_version_1_header() {
    plugins().expect("building the plugins");
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let v1 = vmm_lab::plugins::build_c_with(
        &repo.join("interceptors/xor/xor.c"),
        "libxor-v1.so",
        &repo.join("interceptors/include/v1"),
    )
    .expect("building xor against the v1 header");
    let loaded = compat::PluginRegistry::new().load(&v1, None).unwrap();
    assert_eq!(loaded.abi_version(), 1, "built from the first header");
    let chain = interceptor("xor1", &v1, &format!("config = {{ key = {KEY} }}"));
    let Some((markers, _text, _raw)) = run_with("plugin-xor-v1", &chain, |_| {}) else {
        return;
    };
    assert!(
        markers.iter().any(|m| m.starts_with("hostcheck")),
        "the run's host check: {markers:?}"
    );
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

fn key_file(name: &str) -> std::path::PathBuf {
    let key = out_file(name);
    std::fs::write(&key, "7e".repeat(32)).unwrap();
    key
}

/// Asserts a `readcheck` marker for each (block, "ok" or "eio").
fn assert_readcheck(markers: &[String], want: &[(usize, &str)]) {
    for (b, what) in want {
        let line = format!("readcheck block={b} {what}");
        assert!(
            markers.iter().any(|m| m.starts_with(&line)),
            "{line} not in {markers:?}"
        );
    }
}

#[test]
fn fio_verify_passes_through_encrypt_and_tampering_with_the_image_is_an_io_error_or_refused() {
    let p = plugins().expect("building the plugins");
    let key = key_file("guest-enc.key");
    let chain = interceptor(
        "enc",
        &p.encrypt,
        &format!("config = {{ key_file = {key:?} }}"),
    );
    let Some((disk, _, text)) = verify_with("guest-enc", &chain, |_| {}) else {
        return;
    };
    let stats = plugin_stats(&text, "enc");
    assert!(
        stats["blocks_encrypted"].as_u64().unwrap() >= 4096,
        "{stats}"
    );
    assert_eq!(stats["auth_failures"], 0, "{stats}");
    let raw = std::fs::read(&disk).unwrap();
    assert!(
        !contains(&raw, b"guest-wrote-this\nguest-wrote-this"),
        "the guest's pattern reached the disk in the clear"
    );
    // A second version of the host check's block: its leaf moves to the other slot.
    let hc = HOST_BASE + 1000;
    let task = format!("hostcheck hostcheck.base={HOST_BASE}");
    if boot_with("guest-enc-again", &chain, &task, &disk).is_none() {
        return;
    }
    let mut raw = std::fs::read(&disk).unwrap();
    let h = encfmt::newest(&raw);
    // (1) One bit of block 100's data (fio wrote it).
    let slot = encfmt::entry_slot(&raw, 100, encfmt::committed_leaf_slot(&raw, 100));
    raw[encfmt::data_offset(&h, 100, slot) + 777] ^= 0x04;
    // (2) One bit of the entry of block 201, in its committed leaf (blocks 200..204).
    let leaf = encfmt::leaf_offset(201, encfmt::committed_leaf_slot(&raw, 201));
    raw[leaf + 64 + 96 + 30] ^= 0x02;
    // (3) The host check block's first entry put back over its second (its first data
    // slot still holds the first version).
    let (old, new) = (encfmt::leaf_offset(hc, 0), encfmt::leaf_offset(hc, 1));
    assert_eq!(encfmt::committed_leaf_slot(&raw, hc), 1);
    let first = raw[old..old + 512].to_vec();
    raw[new..new + 512].copy_from_slice(&first);
    std::fs::write(&disk, &raw).unwrap();
    let task = format!(
        "readcheck=99,100,101,199,200,201,203,204,{},{hc},{}",
        hc - 4,
        hc + 4
    );
    let Some((markers, text, _)) = boot_with("guest-enc-flip", &chain, &task, &disk) else {
        return;
    };
    assert_readcheck(
        &markers,
        &[
            (99, "ok"),
            (100, "eio"),
            (101, "ok"),
            (199, "ok"),
            (200, "eio"),
            (201, "eio"),
            (203, "eio"),
            (204, "ok"),
            (hc - 4, "ok"),
            (hc, "eio"),
            (hc + 4, "ok"),
        ],
    );
    let stats = plugin_stats(&text, "enc");
    assert_eq!(stats["auth_failures"], 5, "{stats}");
    assert_eq!(stats["damaged_nodes"], 2, "{stats}");
    // (4) A bit of the generation in both header copies: the vmm refuses the disk at start.
    raw[72] ^= 1;
    raw[512 + 72] ^= 1;
    std::fs::write(&disk, &raw).unwrap();
    let toml = out_file("guest-enc-header.toml");
    std::fs::write(&toml, &chain).unwrap();
    let args = [
        "--backend",
        "vmm",
        "--task",
        "selftest",
        "--data-disk",
        &disk.to_string_lossy(),
        "--interceptors",
        &toml.to_string_lossy(),
    ];
    let Some((out, _)) = common::guest_run("guest-enc-header", &args) else {
        return;
    };
    let text = output(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("fails its MAC"), "{text}");
}

#[test]
fn fio_verify_passes_through_a_write_back_cache_which_hits_on_rereads_and_over_encrypt() {
    let p = plugins().expect("building the plugins");
    let cache = interceptor(
        "cache",
        &p.cache,
        "config = { size_mib = 32, write_back = true }",
    );
    // The cache alone: a small re-read region makes hits; dirty blocks reach the disk at
    // shutdown at the latest.
    let disk = fresh_disk("guest-cache");
    let Some((_, text, r)) = boot_with(
        "guest-cache",
        &cache,
        "fio=verify-crc32c,randread-4k-qd1 fio.size=4M hostcheck hostcheck.base=8192",
        &disk,
    ) else {
        return;
    };
    assert_verified(&r);
    let stats = plugin_stats(&text, "cache");
    assert!(stats["hits"].as_u64().unwrap() > 100, "{stats}");
    assert!(stats["hit_ratio"].as_f64().unwrap() > 0.5, "{stats}");
    let raw = std::fs::read(&disk).unwrap();
    let at = (HOST_BASE + 1000) * BLOCK;
    assert_eq!(
        raw[at..at + BLOCK],
        pattern("guest-wrote-this\n", BLOCK)[..]
    );
    // The cache over encryption.
    let key = key_file("guest-cache-enc.key");
    let chain = cache
        + &interceptor(
            "enc",
            &p.encrypt,
            &format!("config = {{ key_file = {key:?} }}"),
        );
    let Some((disk, _, text)) = verify_with("guest-cache-enc", &chain, |_| {}) else {
        return;
    };
    assert_eq!(plugin_stats(&text, "enc")["auth_failures"], 0);
    assert!(!contains(
        &std::fs::read(&disk).unwrap(),
        b"guest-wrote-this\nguest-wrote-this"
    ));
}
