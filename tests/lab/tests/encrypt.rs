//! The encryption plugin as a shared object over a real file: what reaches the file, a
//! wrong key, tampering, and what "disabled" means.

mod common;

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
    let plugin = plugins().unwrap().encrypt;
    file_stack(
        image,
        "enc",
        &plugin,
        serde_json::json!({ "key_file": key }),
    )
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

/// (data start block, guest blocks) from the header.
fn geometry(image: &[u8]) -> (usize, usize) {
    let u64_at = |o: usize| u64::from_le_bytes(image[o..o + 8].try_into().unwrap()) as usize;
    (u64_at(32), u64_at(16))
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
    // A second open reads it all back, with a new epoch.
    let stack = open(&image, &key).unwrap();
    assert_eq!(read(&stack, BLOCK, 3 * BLOCK).unwrap(), secret);
    assert_eq!(read(&stack, 5 * BLOCK - 512, 1024).unwrap(), small);
    assert_eq!(stats(&stack)["epoch"], 2);
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
fn a_flipped_bit_fails_exactly_that_block() {
    let image = blank_disk("enc-flip.img", 1 << 20);
    let key = key_file("enc-flip.key", KEY_HEX);
    let stack = open(&image, &key).unwrap();
    for b in 0..8 {
        write(&stack, b * BLOCK, &pattern(&format!("block {b} "), BLOCK));
    }
    drop(stack); // an orderly close settles every block
    let mut raw = std::fs::read(&image).unwrap();
    let (data_start, _) = geometry(&raw);
    // First writes go to slot 0; flip one bit of block 3's data and of block 5's metadata.
    raw[(data_start + 3) * BLOCK + 1234] ^= 0x10;
    raw[BLOCK + 5 * 128 + 20] ^= 0x01;
    std::fs::write(&image, &raw).unwrap();
    let stack = open(&image, &key).unwrap();
    for b in 0..8 {
        let got = read(&stack, b * BLOCK, BLOCK);
        if b == 3 || b == 5 {
            assert_eq!(got, Err(RequestStatus::IoError), "block {b}");
        } else {
            assert_eq!(
                got.unwrap(),
                pattern(&format!("block {b} "), BLOCK),
                "block {b}"
            );
        }
    }
    assert_eq!(stats(&stack)["auth_failures"], 2);
    // Writing a failed block again makes it whole.
    write(&stack, 3 * BLOCK, &pattern("fresh ", BLOCK));
    assert_eq!(
        read(&stack, 3 * BLOCK, BLOCK).unwrap(),
        pattern("fresh ", BLOCK)
    );
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
    let (data_start, _) = geometry(&raw);
    raw[(data_start + 1) * BLOCK + 7] ^= 0x80;
    std::fs::write(&image, &raw).unwrap();
    let stack = open(&image, &key).unwrap();
    assert_eq!(read(&stack, BLOCK, BLOCK), Err(RequestStatus::IoError));
    assert_eq!(read(&stack, 0, BLOCK).unwrap(), sealed);
}
