//! Deduplication and compression in the real guest (vmm under real KVM, in the lab on this
//! machine kind): fio verify through dedup, through compression, and through dedup over
//! compression over encryption; and a real tree of files (a tar of the guest's own /usr,
//! /bin, /lib...) written twice through that full stack: the second copy costs the image
//! almost nothing, compression stores about what `zstd -3` makes of the same tar (run on the
//! host, in this test), and overwriting and discarding it gives the space back. After every
//! boot `vmm-img check` finds the image clean.

mod common;

use common::chain::*;
use common::{out_file, stack::io};
use compat::{BlockRequestKind, RequestStatus};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use vmm_lab::plugins::plugins;

fn vmm_img() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_lab")).with_file_name("vmm-img")
}

/// `vmm-img CMD IMAGE --interceptors CHAIN --json`: exit status and parsed output.
fn vmm_img_json(cmd: &str, image: &Path, chain: &Path) -> (i32, serde_json::Value) {
    let out = Command::new(vmm_img())
        .arg(cmd)
        .arg(image)
        .arg("--interceptors")
        .arg(chain)
        .arg("--json")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let v = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "vmm-img {cmd}: {e}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), v)
}

fn assert_clean(image: &Path, chain: &Path) {
    let (code, v) = vmm_img_json("check", image, chain);
    assert_eq!(code, 0, "vmm-img check: {v}");
    assert_eq!(v["clean"], true, "{v}");
}

/// A chain file of `[[interceptor]]` entries (for the guest run and for vmm-img).
fn chain_file(name: &str, layers: &[&str]) -> (PathBuf, String) {
    let p = plugins().unwrap();
    let mut text = String::new();
    for l in layers {
        text += &match *l {
            "dedup" => interceptor("dedup", &p.dedup, "config = { index_mib = 16 }"),
            "zstd" => interceptor(
                "zstd",
                &p.compress,
                "config = { extent_kib = 64, level = 3 }",
            ),
            "enc" => {
                let key = out_file(&format!("{name}.key"));
                std::fs::write(&key, [0x3cu8; 32]).unwrap();
                interceptor(
                    "enc",
                    &p.encrypt,
                    &format!("config = {{ key_file = {key:?} }}"),
                )
            }
            other => panic!("no layer {other}"),
        };
    }
    let path = out_file(&format!("{name}-chain.toml"));
    std::fs::write(&path, &text).unwrap();
    (path, text)
}

fn fresh_image(name: &str, mib: u64) -> PathBuf {
    let disk = out_file(&format!("{name}.img"));
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(mib << 20)
        .unwrap();
    disk
}

fn allocated(image: &Path) -> u64 {
    std::fs::metadata(image).unwrap().blocks() * 512
}

#[test]
fn fio_verify_passes_through_dedup_through_compression_and_through_both_over_encryption() {
    for (name, layers) in [
        ("store-verify-dedup", &["dedup"][..]),
        ("store-verify-zstd", &["zstd"][..]),
        ("store-verify-full", &["dedup", "zstd", "enc"][..]),
    ] {
        let (chain, text) = chain_file(name, layers);
        let disk = fresh_image(name, 256);
        let Some((_, out, r)) = boot_with(name, &text, "fio=verify-crc32c", &disk) else {
            return;
        };
        assert_verified(&r);
        for id in layers {
            let s = plugin_stats(&out, id);
            assert_eq!(s["errors"].as_u64().unwrap_or(0), 0, "{id}: {s}");
            if *id != "enc" {
                assert_eq!(s["check_failures"], 0, "{id}: {s}");
                assert!(
                    s["logical_bytes"].as_u64().unwrap() >= 16 << 20,
                    "{id}: {s}"
                );
            } else {
                assert_eq!(s["auth_failures"], 0, "{s}");
            }
        }
        assert_clean(&disk, &chain);
    }
}

/// The `tarcopy` marker's bytes and sha256.
fn tarcopy(markers: &[String], mib: u64) -> (u64, String) {
    let prefix = format!("tarcopy mib={mib} bytes=");
    let m = markers
        .iter()
        .find_map(|m| m.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no tarcopy at {mib}: {markers:?}"));
    let (bytes, sum) = m.split_once(" sha256=").unwrap();
    (bytes.parse().unwrap(), sum.to_string())
}

fn sha256(bytes: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// The first `len` bytes at `offset` of the guest's disk, read on the host through the
/// chain (as vmm-img opens it: read-only, nothing written back).
fn read_through(image: &Path, chain: &Path, offset: u64, len: u64) -> Vec<u8> {
    let target = vmm::image::Target {
        image: image.to_path_buf(),
        chain: vmm::image::chain_file(chain).unwrap(),
    };
    let opened = vmm::image::open(&target).unwrap_or_else(|_| panic!("opening {image:?}"));
    let mut buf = vec![0u8; len.next_multiple_of(512) as usize];
    assert_eq!(
        io(
            &opened.stack,
            BlockRequestKind::Read,
            offset as usize,
            &mut buf
        ),
        RequestStatus::Ok
    );
    buf.truncate(len as usize);
    buf
}

fn layer<'a>(info: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    info["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["id"] == id)
        .map(|l| &l["stats"])
        .unwrap_or_else(|| panic!("no layer {id} in {info}"))
}

#[test]
fn a_tree_written_twice_costs_little_more_compresses_like_zstd_and_comes_back_when_overwritten() {
    let name = "store-tree";
    let (chain, text) = chain_file(name, &["dedup", "zstd", "enc"]);
    let disk = fresh_image(name, 512);
    let before = allocated(&disk);

    // The first copy.
    let Some((markers, _, _)) = boot_with(name, &text, "tarcopy=16", &disk) else {
        return;
    };
    let (tar_bytes, tar_sum) = tarcopy(&markers, 16);
    assert!(
        tar_bytes > 1 << 20,
        "a tar of {tar_bytes} bytes is too small to say much"
    );
    assert_clean(&disk, &chain);
    let first = allocated(&disk);
    // End to end: the host reads back, through the layers, the tar the guest wrote.
    let tar = read_through(&disk, &chain, 16 << 20, tar_bytes);
    assert_eq!(
        sha256(&tar),
        tar_sum,
        "the tar read back through the chain differs"
    );

    // What zstd -3 makes of the same bytes, and what dedup at best could (unique blocks).
    let tar_file = out_file("store-tree.tar");
    std::fs::write(&tar_file, &tar).unwrap();
    let z = Command::new("zstd")
        .args(["-3", "-c", "-q"])
        .arg(&tar_file)
        .output()
        .expect("zstd (scripts/setup.sh installs it)");
    assert!(z.status.success());
    let zstd_bytes = z.stdout.len() as u64;
    let mut blocks: Vec<&[u8]> = tar.chunks(4096).collect();
    let total_blocks = blocks.len();
    blocks.sort_unstable();
    blocks.dedup();
    let (_, info) = vmm_img_json("info", &disk, &chain);
    let zstd = layer(&info, "zstd");
    let stored = zstd["physical_bytes"].as_u64().unwrap();
    println!(
        "tree: tar {tar_bytes} bytes; zstd -3 {zstd_bytes} (x{:.2}); the compression layer \
         stores {stored} (x{:.2}, its metadata and dedup's included); {} unique blocks of \
         {total_blocks} (ideal dedup x{:.2}); image allocated {} -> {}",
        tar_bytes as f64 / zstd_bytes as f64,
        tar_bytes as f64 / stored as f64,
        blocks.len(),
        total_blocks as f64 / blocks.len() as f64,
        before,
        first
    );
    assert!(
        (stored as f64) < zstd_bytes as f64 * 1.15,
        "stored {stored} bytes, more than 15% over zstd -3's {zstd_bytes}: {zstd}"
    );

    // The second copy, elsewhere: stored as references.
    let Some((markers, out, _)) = boot_with(name, &text, "tarcopy=128", &disk) else {
        return;
    };
    let (bytes2, sum2) = tarcopy(&markers, 128);
    assert_eq!(
        (bytes2, &sum2),
        (tar_bytes, &tar_sum),
        "the guest's tree changed"
    );
    let second = allocated(&disk);
    let dedup = plugin_stats(&out, "dedup");
    println!(
        "second copy: image allocated {first} -> {second} (+{}); dedup hits {}",
        second.saturating_sub(first),
        dedup["dedup_hits"]
    );
    assert!(
        second.saturating_sub(first) < tar_bytes / 10,
        "the second copy grew the image by {} bytes (tar: {tar_bytes}): {dedup}",
        second - first
    );
    assert!(
        dedup["dedup_hits"].as_u64().unwrap() * 4096 >= tar_bytes * 9 / 10,
        "{dedup}"
    );
    assert_clean(&disk, &chain);

    // Overwrite the first copy with zeroes and discard the whole disk: every layer's
    // space comes back (the encryption layer keeps its slots: docs/store.md).
    let Some((markers, out, _)) = boot_with(name, &text, "zerofill=16,112 discard", &disk) else {
        return;
    };
    assert!(markers.iter().any(|m| m == "discard ok"), "{markers:?}");
    let (_, info) = vmm_img_json("info", &disk, &chain);
    let dedup = layer(&info, "dedup");
    assert_eq!(dedup["logical_bytes"], 0, "{dedup}");
    assert_eq!(dedup["physical_bytes"], 0, "{dedup}");
    let zstd = layer(&info, "zstd");
    assert!(
        zstd["physical_bytes"].as_u64().unwrap() < stored / 4,
        "the compression layer still holds {}: {zstd}",
        zstd["physical_bytes"]
    );
    let reclaimed = plugin_stats(&out, "zstd")["reclaimed_bytes"]
        .as_u64()
        .unwrap();
    println!(
        "after zerofill and discard: dedup logical 0, compression holds {} bytes; it reclaimed {reclaimed}",
        zstd["physical_bytes"]
    );
    assert_clean(&disk, &chain);
}

/// The value of `key=` in the marker that starts with `prefix`.
fn marker_value(markers: &[String], prefix: &str, key: &str) -> String {
    let m = markers
        .iter()
        .find(|m| m.starts_with(prefix))
        .unwrap_or_else(|| panic!("no `{prefix}` marker: {markers:?}"));
    m.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {m}"))
        .to_string()
}

/// Issue 29, item 3: thin provisioning through the real loading path, in a real guest: an
/// ext4 file system on a dedup disk 4 times larger than its image. Files of random data
/// until a write fails (the guest sees the I/O error, dedup counts it), every file written
/// before reads back, rm + fstrim give the space back and new files fit again, e2fsck finds
/// the file system clean and `vmm-img check` the store.
#[test]
fn a_thin_disk_in_a_guest_fails_writes_past_its_space_and_takes_them_again_after_fstrim() {
    let name = "store-thin";
    let p = plugins().unwrap();
    let text = interceptor(
        "dedup",
        &p.dedup,
        "config = { index_mib = 16, logical_mib = 192 }",
    );
    let chain = out_file(&format!("{name}-chain.toml"));
    std::fs::write(&chain, &text).unwrap();
    let disk = fresh_image(name, 48);
    let Some((markers, out, _)) = boot_with(name, &text, "thinfill", &disk) else {
        return;
    };
    let written: u64 = marker_value(&markers, "thinfill written=", "written")
        .parse()
        .unwrap();
    assert!(
        (20..48).contains(&written),
        "{written} files of 1 MiB on a 48 MiB image: {markers:?}"
    );
    assert_eq!(
        marker_value(&markers, "thinfill readback", "bad"),
        "0",
        "{markers:?}"
    );
    assert_eq!(
        marker_value(&markers, "thinfill fstrim", "rc"),
        "0",
        "{markers:?}"
    );
    assert_eq!(
        marker_value(&markers, "thinfill after-trim", "written"),
        "8",
        "{markers:?}"
    );
    assert_eq!(
        marker_value(&markers, "thinfill fsck-at-end", "rc"),
        "0",
        "{markers:?}"
    );
    let s = plugin_stats(&out, "dedup");
    assert!(s["no_space_errors"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(s["check_failures"], 0, "{s}");
    assert_clean(&disk, &chain);
}
