//! The remapping plugin as a shared object over a real file: what it formats and what it
//! refuses (a disk that holds data, a damaged header, a corrupt map, an old version), and
//! that what it writes lives where its map says and reads back after a reopen.

mod common;

use common::out_file;
use common::stack::{file_stack, io};
use compat::{BlockRequestKind, BlockStack, RequestStatus};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vmm_lab::plugins::plugins;

const SECTOR: usize = 512;
/// 16,384 sectors.
const DISK: usize = 8 << 20;

fn open(image: &Path, config: serde_json::Value) -> Result<Arc<BlockStack>, String> {
    file_stack(image, "remap", &plugins().unwrap().remap, config)
}

fn blank(name: &str) -> PathBuf {
    let path = out_file(name);
    std::fs::write(&path, vec![0u8; DISK]).unwrap();
    path
}

fn write(stack: &BlockStack, sector: usize, data: &[u8]) {
    let mut d = data.to_vec();
    assert_eq!(
        io(stack, BlockRequestKind::Write, sector * SECTOR, &mut d),
        RequestStatus::Ok
    );
}

fn read(stack: &BlockStack, sector: usize, len: usize) -> Vec<u8> {
    let mut d = vec![0xeeu8; len];
    assert_eq!(
        io(stack, BlockRequestKind::Read, sector * SECTOR, &mut d),
        RequestStatus::Ok
    );
    d
}

/// One sector of `tag` repeated.
fn sector_of(tag: &str) -> Vec<u8> {
    common::pattern(tag, SECTOR)
}

/// The layout by the documented format, version 2: (logical sectors, first data sector)
/// from the header, checked against what a disk of this size must have.
fn layout(raw: &[u8]) -> (usize, usize) {
    assert_eq!(&raw[..8], b"VMMREMAP");
    assert_eq!(u32::from_le_bytes(raw[8..12].try_into().unwrap()), 2);
    let n = u64::from_le_bytes(raw[16..24].try_into().unwrap()) as usize;
    let d = u64::from_le_bytes(raw[24..32].try_into().unwrap()) as usize;
    let total = raw.len() / SECTOR;
    assert_eq!(d, 1 + n.div_ceil(64));
    assert!(d + n <= total && 1 + (n + 1).div_ceil(64) + n + 1 > total);
    (n, d)
}

/// Map entry `s` (0: never written, else slot + 1).
fn entry(raw: &[u8], s: usize) -> u64 {
    let at = SECTOR + 8 * s;
    u64::from_le_bytes(raw[at..at + 8].try_into().unwrap())
}

/// Sets map entry `s` in the image file.
fn set_entry(image: &Path, s: usize, value: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(image).unwrap();
    f.write_all_at(&value.to_le_bytes(), (SECTOR + 8 * s) as u64)
        .unwrap();
}

/// The mapped sectors of the image, each checked: inside the data region, no slot twice.
fn mapped(raw: &[u8]) -> Vec<(usize, usize)> {
    let (n, _) = layout(raw);
    let mut seen = std::collections::HashMap::new();
    let mut out = Vec::new();
    for s in 0..n {
        let e = entry(raw, s) as usize;
        if e == 0 {
            continue;
        }
        assert!(e <= n, "sector {s} points past the data region");
        if let Some(other) = seen.insert(e, s) {
            panic!("sectors {other} and {s} share slot {}", e - 1);
        }
        out.push((s, e - 1));
    }
    out
}

/// Where logical sector `s` is stored in the image, in bytes.
fn stored(raw: &[u8], s: usize) -> Option<usize> {
    let (_, d) = layout(raw);
    let e = entry(raw, s) as usize;
    (e != 0).then(|| (d + e - 1) * SECTOR)
}

/// An unpartitioned ext4 filesystem, as far as the plugin can tell: zeros in its first
/// 1024 bytes (the boot block), the superblock's magic at 1080, data everywhere after.
fn ext4_like(name: &str) -> PathBuf {
    let path = out_file(name);
    let mut img = common::pattern("ext4 data, not a remap layout\n", DISK);
    img[..1024].fill(0);
    img[1080..1082].copy_from_slice(&0xef53u16.to_le_bytes());
    std::fs::write(&path, img).unwrap();
    path
}

#[test]
fn a_disk_that_holds_data_is_refused_unless_format_is_true_and_then_the_map_is_cleared() {
    let image = ext4_like("remap-ext4.img");
    let before = std::fs::read(&image).unwrap();
    let e = open(&image, serde_json::json!({})).err().unwrap();
    assert!(
        e.contains(
            "the disk is not blank (byte 1024 is not zero) and holds no remap layout; set \
             format = true in the instance's config to format it, destroying what it holds"
        ),
        "{e}"
    );
    assert!(
        std::fs::read(&image).unwrap() == before,
        "a refusal changed the disk"
    );

    let stack = open(&image, serde_json::json!({ "format": true })).unwrap();
    let n = stack.capacity() as usize / SECTOR;
    // Every sector reads zeros before it is written: nothing of the old filesystem shows
    // through the map or the slots.
    for first in (0..n).step_by(128) {
        let count = 128.min(n - first);
        let got = read(&stack, first, count * SECTOR);
        assert!(
            got.iter().all(|&b| b == 0),
            "sector {first}.. reads old bytes"
        );
    }
    let written = [0, 7, 8, 100, 65, n - 1];
    for &s in &written {
        write(&stack, s, &sector_of(&format!("sector {s}\n")));
    }
    assert_eq!(stack.flush(), RequestStatus::Ok);
    drop(stack);

    let raw = std::fs::read(&image).unwrap();
    assert_eq!(layout(&raw).0, n);
    let map = mapped(&raw);
    assert_eq!(
        map.len(),
        written.len(),
        "only the written sectors are mapped"
    );
    for &s in &written {
        let at = stored(&raw, s).unwrap();
        assert_eq!(
            raw[at..at + SECTOR],
            sector_of(&format!("sector {s}\n"))[..]
        );
    }

    // Reopened, without format and with it (an existing layout is never reformatted).
    for config in [serde_json::json!({}), serde_json::json!({ "format": true })] {
        let stack = open(&image, config).unwrap();
        for &s in &written {
            assert_eq!(read(&stack, s, SECTOR), sector_of(&format!("sector {s}\n")));
        }
        assert!(read(&stack, 1, 6 * SECTOR).iter().all(|&b| b == 0));
        assert_eq!(common::stack::stats(&stack, "remap")["mapped_sectors"], 6);
    }
}

#[test]
fn a_blank_disk_is_formatted_and_sectors_land_where_the_map_says() {
    let image = blank("remap-blank.img");
    let stack = open(&image, serde_json::json!({})).unwrap();
    let n = stack.capacity() as usize / SECTOR;
    // 16,384 sectors: 1 + ceil(n/64) + n <= 16,384.
    assert_eq!(n, 16_130);
    // A write over several sectors, then an overwrite of part of it: one slot each.
    let data: Vec<u8> = (0..8).flat_map(|k| sector_of(&format!("s{k}"))).collect();
    write(&stack, 40, &data);
    write(&stack, 43, &sector_of("again"));
    assert_eq!(read(&stack, 43, SECTOR), sector_of("again"));
    drop(stack);
    let raw = std::fs::read(&image).unwrap();
    assert_eq!(mapped(&raw).len(), 8);
    assert_eq!(
        raw[stored(&raw, 40).unwrap()..][..SECTOR],
        sector_of("s0")[..]
    );
    assert_eq!(
        raw[stored(&raw, 43).unwrap()..][..SECTOR],
        sector_of("again")[..]
    );
    assert_ne!(raw[40 * SECTOR..41 * SECTOR], sector_of("s0")[..]);
}

/// A layout with sectors 0..4 written, as bytes.
fn small_layout(name: &str) -> PathBuf {
    let image = blank(name);
    let stack = open(&image, serde_json::json!({})).unwrap();
    for s in 0..4 {
        write(&stack, s, &sector_of(&format!("sector {s}\n")));
    }
    drop(stack);
    image
}

#[test]
fn a_corrupt_map_is_refused_naming_the_sector_even_with_format_true() {
    let image = small_layout("remap-corrupt.img");
    let good = std::fs::read(&image).unwrap();
    let (n, _) = layout(&good);

    set_entry(&image, 5, n as u64 + 7);
    let corrupt = std::fs::read(&image).unwrap();
    for config in [serde_json::json!({}), serde_json::json!({ "format": true })] {
        let e = open(&image, config).err().unwrap();
        assert!(
            e.contains(&format!(
                "the map entry of logical sector 5 points at slot {}, past the data region",
                n + 6
            )),
            "{e}"
        );
        assert!(
            std::fs::read(&image).unwrap() == corrupt,
            "refused, unchanged"
        );
    }

    std::fs::write(&image, &good).unwrap();
    set_entry(&image, 9, entry(&good, 2));
    let e = open(&image, serde_json::json!({})).err().unwrap();
    assert!(
        e.contains(&format!(
            "logical sectors 2 and 9 both point at slot {}: corrupt metadata",
            entry(&good, 2) - 1
        )),
        "{e}"
    );

    // A huge entry, as a u32-era reader would never have seen: no overflow, a refusal.
    std::fs::write(&image, &good).unwrap();
    set_entry(&image, 3, u64::MAX);
    let e = open(&image, serde_json::json!({})).err().unwrap();
    assert!(e.contains("logical sector 3"), "{e}");
}

#[test]
fn a_damaged_or_old_header_is_refused_even_with_format_true() {
    use std::os::unix::fs::FileExt;
    let image = small_layout("remap-header.img");
    let good = std::fs::read(&image).unwrap();
    let (n, d) = layout(&good);
    let patch = |at: u64, bytes: &[u8]| {
        std::fs::write(&image, &good).unwrap();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap();
        f.write_all_at(bytes, at).unwrap();
        std::fs::read(&image).unwrap()
    };
    for (at, bytes, want) in [
        (
            16,
            (n as u64 + 1).to_le_bytes().to_vec(),
            format!(
                "header says {} logical sectors, a disk of 16384 sectors has {n}: the header \
                 is damaged or the disk was resized",
                n + 1
            ),
        ),
        (
            24,
            3u64.to_le_bytes().to_vec(),
            format!("header field data start is sector 3, a layout of {n} logical sectors has it at sector {d}"),
        ),
        (
            8,
            9u32.to_le_bytes().to_vec(),
            "header field version is 9, this plugin reads version 2".to_string(),
        ),
        (
            8,
            1u32.to_le_bytes().to_vec(),
            "the disk holds a remap layout of version 1".to_string(),
        ),
        (
            100,
            vec![1],
            "header byte 100 is not zero (it is reserved)".to_string(),
        ),
    ] {
        let damaged = patch(at, &bytes);
        for config in [serde_json::json!({}), serde_json::json!({ "format": true })] {
            let e = open(&image, config).err().unwrap();
            assert!(e.contains(&want), "{want}: {e}");
            assert!(
                std::fs::read(&image).unwrap() == damaged,
                "{want}: refused, unchanged"
            );
        }
    }
    patch(8, &1u32.to_le_bytes());
    let e = open(&image, serde_json::json!({})).err().unwrap();
    assert!(e.contains("re-create the disk"), "{e}");

    // The disk grew under its layout.
    std::fs::write(&image, &good).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap();
    f.set_len((DISK + (1 << 20)) as u64).unwrap();
    let e = open(&image, serde_json::json!({ "format": true }))
        .err()
        .unwrap();
    assert!(e.contains("the disk was resized"), "{e}");
}

#[test]
fn the_config_takes_format_and_nothing_else() {
    let image = blank("remap-config.img");
    for bad in [
        serde_json::json!({ "formatt": true }),
        serde_json::json!({ "format": "yes" }),
    ] {
        let e = open(&image, bad.clone()).err().unwrap();
        assert!(e.contains("config"), "{bad}: {e}");
    }
    assert!(
        std::fs::read(&image).unwrap().iter().all(|&b| b == 0),
        "a refused config formats nothing"
    );
    assert!(open(&image, serde_json::json!({ "format": false })).is_ok());
}
