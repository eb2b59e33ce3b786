//! The encryption plugin as a shared object over a real file: what reaches the file, a
//! wrong key, a flipped bit, what "disabled" means, blank disks and bounded memory. The
//! attacks on the image (nonces, rollback, moved and forged metadata) are in
//! encrypt_tamper.rs.

mod common;

use common::encfmt;
use common::stack::{file_stack, io};
use common::{contains, out_file, pattern};
use compat::{BlockRequestKind, BlockStack, RequestStatus};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vmm_lab::plugins::plugins;

const BLOCK: usize = 4096;
const KEY_HEX: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

fn key_file(name: &str, hex: &str) -> PathBuf {
    let path = out_file(name);
    std::fs::write(&path, format!("{hex}\n")).unwrap();
    path
}

fn blank_disk(name: &str, bytes: usize) -> PathBuf {
    let path = out_file(name);
    std::fs::write(&path, vec![0u8; bytes]).unwrap();
    path
}

fn open(image: &Path, key: &Path) -> Result<Arc<BlockStack>, String> {
    open_with(image, serde_json::json!({ "key_file": key }))
}

fn open_with(image: &Path, config: serde_json::Value) -> Result<Arc<BlockStack>, String> {
    let plugin = plugins().unwrap().encrypt;
    file_stack(image, "enc", &plugin, config)
}

fn write(stack: &BlockStack, offset: usize, data: &[u8]) {
    let mut d = data.to_vec();
    assert_eq!(
        io(stack, BlockRequestKind::Write, offset, &mut d),
        RequestStatus::Ok
    );
}

fn read(stack: &BlockStack, offset: usize, len: usize) -> Result<Vec<u8>, RequestStatus> {
    let mut d = vec![0u8; len];
    match io(stack, BlockRequestKind::Read, offset, &mut d) {
        RequestStatus::Ok => Ok(d),
        other => Err(other),
    }
}

fn stats(stack: &BlockStack) -> serde_json::Value {
    common::stack::stats(stack, "enc")
}

#[test]
fn data_round_trips_and_the_file_never_holds_the_plaintext() {
    let image = blank_disk("enc-roundtrip.img", 4 << 20);
    let key = key_file("enc-roundtrip.key", KEY_HEX);
    let stack = open(&image, &key).unwrap();
    assert!(
        stack.capacity() < 2 << 20,
        "two slots per block: under half the disk"
    );
    let secret = pattern("the guest's secret! ", 3 * BLOCK);
    write(&stack, BLOCK, &secret);
    // Partial writes: 512-byte pieces inside and across block boundaries.
    let small = pattern("small piece ", 1024);
    write(&stack, 5 * BLOCK - 512, &small);
    assert_eq!(read(&stack, BLOCK, 3 * BLOCK).unwrap(), secret);
    assert_eq!(read(&stack, 5 * BLOCK - 512, 1024).unwrap(), small);
    assert_eq!(
        read(&stack, 6 * BLOCK, BLOCK).unwrap(),
        vec![0u8; BLOCK],
        "never written"
    );
    assert_eq!(
        io(&stack, BlockRequestKind::Flush, 0, &mut []),
        RequestStatus::Ok
    );
    let s = stats(&stack);
    assert!(s["blocks_encrypted"].as_u64().unwrap() >= 5, "{s}");
    assert!(s["read_modify_writes"].as_u64().unwrap() >= 2, "{s}");
    let text = s.to_string().to_lowercase();
    assert!(
        !text.contains(&KEY_HEX[..16]),
        "the key is never in stats: {text}"
    );
    drop(stack);
    let raw = std::fs::read(&image).unwrap();
    assert!(!contains(&raw, &secret[..32]), "plaintext reached the file");
    assert!(!contains(&raw, &small[..24]), "plaintext reached the file");
    // One commit (the flush; the close found nothing new), in header copy B.
    assert_eq!(encfmt::newest(&raw).generation, 1);
    // A second open reads it all back.
    let stack = open(&image, &key).unwrap();
    assert_eq!(read(&stack, BLOCK, 3 * BLOCK).unwrap(), secret);
    assert_eq!(read(&stack, 5 * BLOCK - 512, 1024).unwrap(), small);
    assert_eq!(stats(&stack)["generation"], 1);
}

#[test]
fn a_wrong_key_is_refused_at_start_without_showing_either_key() {
    let image = blank_disk("enc-wrongkey.img", 1 << 20);
    let stack = open(&image, &key_file("enc-right.key", KEY_HEX)).unwrap();
    write(&stack, 0, &pattern("x", BLOCK));
    drop(stack);
    let other = "ff".repeat(32);
    let err = open(&image, &key_file("enc-wrong.key", &other)).unwrap_err();
    assert!(err.contains("wrong key"), "{err}");
    assert!(
        !err.contains(&other[..8]) && !err.contains(&KEY_HEX[..8]),
        "{err}"
    );
    let short = open(&image, &key_file("enc-short.key", "abcd")).unwrap_err();
    assert!(short.contains("64 hex digits"), "{short}");
}

#[test]
fn a_flipped_bit_in_data_fails_that_block_and_in_a_leaf_the_four_blocks_it_holds() {
    let image = blank_disk("enc-flip.img", 1 << 20);
    let key = key_file("enc-flip.key", KEY_HEX);
    let stack = open(&image, &key).unwrap();
    for b in 0..12 {
        write(&stack, b * BLOCK, &pattern(&format!("block {b} "), BLOCK));
    }
    drop(stack); // an orderly close commits every block
    let mut raw = std::fs::read(&image).unwrap();
    let h = encfmt::newest(&raw);
    // First writes go to data slot 0 and leaf slot 0: flip one bit of block 3's data and
    // one of the leaf holding blocks 8..12.
    raw[encfmt::data_offset(&h, 3, 0) + 1234] ^= 0x10;
    raw[encfmt::leaf_offset(9, 0) + 64 + 96 + 20] ^= 0x01;
    std::fs::write(&image, &raw).unwrap();
    let stack = open(&image, &key).unwrap();
    for b in 0..12 {
        let got = read(&stack, b * BLOCK, BLOCK);
        if b == 3 || b >= 8 {
            assert_eq!(got, Err(RequestStatus::IoError), "block {b}");
        } else {
            assert_eq!(
                got.unwrap(),
                pattern(&format!("block {b} "), BLOCK),
                "block {b}"
            );
        }
    }
    assert_eq!(stats(&stack)["auth_failures"], 5);
    assert_eq!(stats(&stack)["damaged_nodes"], 1);
    // Writing a failed block again makes it whole, the others in its leaf stay failed.
    write(&stack, 3 * BLOCK, &pattern("fresh ", BLOCK));
    write(&stack, 9 * BLOCK, &pattern("fresh 9 ", BLOCK));
    drop(stack);
    let stack = open(&image, &key).unwrap();
    assert_eq!(
        read(&stack, 3 * BLOCK, BLOCK).unwrap(),
        pattern("fresh ", BLOCK)
    );
    assert_eq!(
        read(&stack, 9 * BLOCK, BLOCK).unwrap(),
        pattern("fresh 9 ", BLOCK)
    );
    assert_eq!(read(&stack, 8 * BLOCK, BLOCK), Err(RequestStatus::IoError));
}

#[test]
fn disabled_means_new_writes_in_the_clear_and_old_blocks_still_decrypt() {
    let image = blank_disk("enc-disabled.img", 1 << 20);
    let key = key_file("enc-disabled.key", KEY_HEX);
    let stack = open(&image, &key).unwrap();
    let sealed = pattern("sealed while enabled ", BLOCK);
    let clear = pattern("written while disabled ", BLOCK);
    write(&stack, 0, &sealed);
    stack.instance("enc").unwrap().set_enabled(false);
    write(&stack, BLOCK, &clear);
    assert_eq!(
        read(&stack, 0, BLOCK).unwrap(),
        sealed,
        "old blocks still decrypt"
    );
    assert_eq!(read(&stack, BLOCK, BLOCK).unwrap(), clear);
    assert_eq!(stats(&stack)["blocks_clear"], 1);
    drop(stack);
    let mut raw = std::fs::read(&image).unwrap();
    assert!(
        contains(&raw, &clear[..32]),
        "disabled: stored in the clear"
    );
    assert!(!contains(&raw, &sealed[..32]));
    // Clear blocks are authenticated too.
    let h = encfmt::newest(&raw);
    raw[encfmt::data_offset(&h, 1, 0) + 7] ^= 0x80;
    std::fs::write(&image, &raw).unwrap();
    let stack = open(&image, &key).unwrap();
    assert_eq!(read(&stack, BLOCK, BLOCK), Err(RequestStatus::IoError));
    assert_eq!(read(&stack, 0, BLOCK).unwrap(), sealed);
}

#[test]
fn only_a_blank_disk_is_formatted_unless_the_config_says_format() {
    let key = key_file("enc-blank.key", KEY_HEX);
    // An unpartitioned filesystem has zeros in its first 1024 bytes: one byte far into
    // the disk is enough to make it not blank.
    let image = blank_disk("enc-notblank.img", 1 << 20);
    let mut raw = std::fs::read(&image).unwrap();
    raw[700_001] = 1;
    std::fs::write(&image, &raw).unwrap();
    let e = open(&image, &key).unwrap_err();
    assert!(
        e.contains("not blank (byte 700001") && e.contains("format = true"),
        "{e}"
    );
    assert_eq!(
        std::fs::read(&image).unwrap(),
        raw,
        "a refused disk is not touched"
    );
    let stack = open_with(
        &image,
        serde_json::json!({ "key_file": key, "format": true }),
    )
    .unwrap();
    write(&stack, 0, &pattern("formatted ", BLOCK));
    drop(stack);
    // format = true never formats over a layout: the data is still there.
    let stack = open_with(
        &image,
        serde_json::json!({ "key_file": key, "format": true }),
    )
    .unwrap();
    assert_eq!(
        read(&stack, 0, BLOCK).unwrap(),
        pattern("formatted ", BLOCK)
    );
    drop(stack);
    // Nor over a damaged one.
    let mut raw = std::fs::read(&image).unwrap();
    raw[100] ^= 1;
    raw[512 + 100] ^= 1;
    std::fs::write(&image, &raw).unwrap();
    let e = open_with(
        &image,
        serde_json::json!({ "key_file": key, "format": true }),
    )
    .unwrap_err();
    assert!(e.contains("header"), "{e}");
    assert_eq!(std::fs::read(&image).unwrap(), raw);
}

#[test]
fn an_ext4_filesystem_is_refused_and_left_whole() {
    if !common::on_path("mkfs.ext4") {
        common::skip("mkfs.ext4 is not installed (scripts/setup.sh installs e2fsprogs)");
        return;
    }
    let key = key_file("enc-ext4.key", KEY_HEX);
    let image = blank_disk("enc-ext4.img", 16 << 20);
    let mkfs = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&image)
        .status()
        .unwrap();
    assert!(mkfs.success());
    let before = std::fs::read(&image).unwrap();
    assert!(
        before[..1024].iter().all(|&b| b == 0),
        "ext4 leaves its first 1 KiB zero"
    );
    let e = open(&image, &key).unwrap_err();
    assert!(e.contains("not blank"), "{e}");
    assert_eq!(std::fs::read(&image).unwrap(), before);
    let fsck = std::process::Command::new("e2fsck")
        .args(["-n", "-f"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}

#[test]
fn a_damaged_header_or_a_resized_disk_is_refused_naming_what_is_wrong() {
    let key = key_file("enc-hdr.key", KEY_HEX);
    let image = blank_disk("enc-hdr.img", 1 << 20);
    let stack = open(&image, &key).unwrap();
    write(&stack, 0, &pattern("x", BLOCK));
    drop(stack);
    let good = std::fs::read(&image).unwrap();
    // data_start (byte 56) flipped in both copies.
    let mut raw = good.clone();
    raw[56] ^= 1;
    raw[512 + 56] ^= 1;
    std::fs::write(&image, &raw).unwrap();
    let e = open(&image, &key).unwrap_err();
    assert!(
        e.contains("data_start") && !e.contains("blocks, the disk now"),
        "{e}"
    );
    // One copy damaged: the other one opens the disk.
    let mut raw = good.clone();
    raw[512 + 56] ^= 1;
    std::fs::write(&image, &raw).unwrap();
    let stack = open(&image, &key).unwrap();
    assert_eq!(read(&stack, 0, BLOCK).unwrap(), pattern("x", BLOCK));
    drop(stack);
    // Grown by 1 MiB.
    let mut raw = good.clone();
    raw.extend(vec![0u8; 1 << 20]);
    std::fs::write(&image, &raw).unwrap();
    let e = open(&image, &key).unwrap_err();
    assert!(e.contains("resized"), "{e}");
    // A version 1 image says what to do.
    let mut raw = vec![0u8; 1 << 20];
    raw[..8].copy_from_slice(b"VMMCRYPT");
    raw[8..12].copy_from_slice(&1u32.to_le_bytes());
    std::fs::write(&image, &raw).unwrap();
    let e = open(&image, &key).unwrap_err();
    assert!(e.contains("version 1") && e.contains("new disk"), "{e}");
}

/// Resident memory of this process, in KiB (VmRSS).
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[test]
fn metadata_memory_is_bounded_on_a_two_tib_image() {
    let key = key_file("enc-big.key", KEY_HEX);
    let image = out_file("enc-big.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(2 << 40)
        .unwrap();
    let before = rss_kib();
    let config = serde_json::json!({ "key_file": key, "format": true, "cache_mib": 4 });
    let stack = open_with(&image, config.clone()).unwrap();
    let cap = stack.capacity() as usize;
    assert!(cap > (1 << 40) - (64 << 30), "{cap}");
    // 6,000 blocks all over the disk, a commit every 500: leaves and inner nodes far more
    // than 4 MiB of cache holds.
    let stride = cap / BLOCK / 6000;
    for i in 0..6000 {
        write(
            &stack,
            i * stride * BLOCK,
            &pattern(&format!("b{i} "), BLOCK),
        );
        if i % 500 == 499 {
            assert_eq!(
                io(&stack, BlockRequestKind::Flush, 0, &mut []),
                RequestStatus::Ok
            );
        }
    }
    for i in (0..6000).step_by(7) {
        assert_eq!(
            read(&stack, i * stride * BLOCK, BLOCK).unwrap(),
            pattern(&format!("b{i} "), BLOCK)
        );
    }
    let s = stats(&stack);
    let grown = rss_kib().saturating_sub(before);
    eprintln!("2 TiB image, 4 MiB cache: RSS grew {grown} KiB, stats {s}");
    assert!(
        s["cached_nodes"].as_u64().unwrap() <= (4 << 20) / 2560,
        "{s}"
    );
    assert!(grown < 64 << 10, "RSS grew {grown} KiB");
    drop(stack);
    let stack = open_with(&image, config).unwrap();
    for i in (0..6000).step_by(13) {
        assert_eq!(
            read(&stack, i * stride * BLOCK, BLOCK).unwrap(),
            pattern(&format!("b{i} "), BLOCK)
        );
    }
    drop(stack);
    let _ = std::fs::remove_file(&image);
}

#[test]
fn config_values_out_of_range_are_clamped_or_refused() {
    let key = key_file("enc-cfg.key", KEY_HEX);
    let image = blank_disk("enc-cfg.img", 1 << 20);
    // A cache of 0 MiB is taken as the smallest cache (1 MiB), not as none.
    let stack = open_with(
        &image,
        serde_json::json!({ "key_file": key, "cache_mib": 0 }),
    )
    .unwrap();
    write(&stack, 0, &pattern("tiny cache ", BLOCK));
    assert_eq!(
        read(&stack, 0, BLOCK).unwrap(),
        pattern("tiny cache ", BLOCK)
    );
    drop(stack);
    for bad in [
        serde_json::json!({ "key_file": key, "cache_mib": -1 }),
        serde_json::json!({ "key_file": key, "min_generation": "x" }),
        serde_json::json!({ "key_file": key, "formatt": true }),
        serde_json::json!({}),
    ] {
        let e = open_with(&image, bad.clone()).unwrap_err();
        assert!(e.contains("config"), "{bad}: {e}");
    }
}
